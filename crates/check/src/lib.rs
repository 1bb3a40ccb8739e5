//! Cairn's history checker, in the spirit of Jepsen's Kafka and Redpanda analyses.
//!
//! A workload run under faults writes a **history**: one JSON event per line, in the order things
//! happened (see [`Event`]). Producers log an `invoke` before each send and an `ok` (acknowledged,
//! with its offset), `fail` (surely not applied) or `info` (unknown: a timeout, a dropped
//! connection) after it; consumers log an `ok` `poll` per record they receive; after the faults
//! heal, a fresh consumer reads every partition from its start to the high watermark and logs a
//! `drain` per record. Faults are `info` events of `f: "fault"`. Values are unique.
//!
//! [`check`] reports, each with the events that show it:
//! - **lost**: an acknowledged send absent from the final read (the drain);
//! - **lost-write**: an acknowledged send never read by anyone although a later offset of its
//!   partition was;
//! - **duplicate**: one value at two offsets;
//! - **inconsistent-offset**: one offset holding two values (or acknowledged for a value and
//!   read with another);
//! - **unexpected**: a value read that was never sent;
//! - **failed-write-read**: a value whose send surely failed, read anyway;
//! - **read-then-lost**: a value a consumer read, absent from the drain;
//! - **nonmonotonic-send**: one producer's acknowledged sends to a partition whose offsets do
//!   not rise in the order they were sent;
//! - **nonmonotonic-poll**: one consumer reading a partition's offsets out of order (since its
//!   last `assign`);
//! - **poll-skip**: one consumer jumping over offsets the drain holds;
//! - **group-skip**: a record below an offset its consumer group committed (acknowledged) that
//!   no member of the group received: the group moved past a record it never processed;
//! - **lost-commit**: a group's committed offset, read after the faults healed (`committed`),
//!   below one it committed with an acknowledgement;
//!
//! plus availability: acknowledged sends per second, and the time from each fault to the first
//! acknowledgement of a send invoked after it.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What an event says about an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    /// The operation starts.
    Invoke,
    /// It took effect (a send acknowledged, a record received).
    Ok,
    /// It surely did not take effect.
    Fail,
    /// Unknown whether it took effect; or a note (faults, assignments).
    Info,
}

/// The operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A producer's send of one value.
    Send,
    /// One record a consumer received.
    Poll,
    /// A consumer group's offset commit: `offset` is the next offset to read (Kafka's
    /// convention), `group` the group.
    Commit,
    /// A group's committed offset, read after the faults healed.
    Committed,
    /// One record of the final read after the faults healed.
    Drain,
    /// A consumer's new assignment or seek: its order checks start over.
    Assign,
    /// A fault injected (`value` says which).
    Fault,
    /// A fault healed.
    Heal,
}

/// A process: a number or a name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Process {
    /// A number.
    Number(u64),
    /// A name.
    Name(String),
}

impl Default for Process {
    fn default() -> Self {
        Process::Number(0)
    }
}

/// One line of a history.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Event {
    /// invoke, ok, fail or info.
    #[serde(rename = "type")]
    pub kind: Type,
    /// The operation.
    pub f: Op,
    /// Which client did it.
    #[serde(default)]
    pub process: Process,
    /// Monotonic time, milliseconds.
    #[serde(default)]
    pub time: f64,
    /// Topic.
    #[serde(default)]
    pub topic: Option<String>,
    /// Partition.
    #[serde(default)]
    pub partition: Option<u32>,
    /// The (unique) value sent or read; a fault's description.
    #[serde(default)]
    pub value: Option<String>,
    /// The offset acknowledged or read.
    #[serde(default)]
    pub offset: Option<u64>,
    /// The idempotent producer's id, if known.
    #[serde(default)]
    pub producer_id: Option<i64>,
    /// The batch sequence, if known.
    #[serde(default)]
    pub sequence: Option<i64>,
    /// An error, for fail and info.
    #[serde(default)]
    pub error: Option<String>,
    /// The consumer group of a poll, commit or committed event.
    #[serde(default)]
    pub group: Option<String>,
}

/// Every anomaly the checker knows, in report order.
pub const ANOMALIES: [&str; 12] = [
    "lost",
    "lost-write",
    "duplicate",
    "inconsistent-offset",
    "unexpected",
    "failed-write-read",
    "read-then-lost",
    "nonmonotonic-send",
    "nonmonotonic-poll",
    "poll-skip",
    "group-skip",
    "lost-commit",
];

/// Examples kept per anomaly.
const EXAMPLES: usize = 8;

/// Longest history accepted, in ms from its first event (the per-second counts are allocated
/// over the span, so a time from a broken file must not size them).
pub const SPAN_MS_MAX: f64 = 30.0 * 24.0 * 3600.0 * 1000.0;

/// The checker's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// No anomaly found.
    pub valid: bool,
    /// Per anomaly, how many.
    pub anomalies: BTreeMap<&'static str, u64>,
    /// Per anomaly found, up to a few examples with the events that show it.
    pub examples: BTreeMap<&'static str, Vec<Value>>,
    /// Counts of what the history holds.
    pub stats: Stats,
    /// Acknowledged sends per second, and the recovery after each fault.
    pub availability: Availability,
}

/// What the history holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Events read.
    pub events: u64,
    /// Sends invoked.
    pub sends: u64,
    /// Sends acknowledged.
    pub acknowledged: u64,
    /// Sends that surely failed.
    pub failed: u64,
    /// Sends with an unknown outcome (or never completed).
    pub unknown: u64,
    /// Records consumers received.
    pub polled: u64,
    /// Records the final read holds.
    pub drained: u64,
    /// Offset commits acknowledged.
    pub commits: u64,
    /// Whether a final read is in the history (without one, lost and read-then-lost cannot be
    /// judged and are not reported).
    pub has_drain: bool,
}

/// Availability over time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Availability {
    /// Acknowledged sends in each second since the first event.
    pub acknowledged_per_second: Vec<u64>,
    /// Per fault: its time (ms since the first event), what it was, and how long until the first
    /// acknowledgement of a send invoked after it (ms; `null` if none came), to the fault's
    /// partition when its event names one (`topic`, `partition`), else to any.
    pub faults: Vec<FaultRecovery>,
    /// Of the recovery times: p50, p99, max (ms).
    pub recovery_p50_ms: Option<f64>,
    /// p99.
    pub recovery_p99_ms: Option<f64>,
    /// Longest.
    pub recovery_max_ms: Option<f64>,
}

/// One fault and the recovery after it.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecovery {
    /// When (ms since the first event).
    pub at_ms: f64,
    /// What.
    pub fault: String,
    /// Until the next acknowledged send invoked after it.
    pub recovered_after_ms: Option<f64>,
}

/// A history that cannot be read.
#[derive(Debug)]
pub struct BadHistory {
    /// Line number (from 1).
    pub line: u64,
    /// Why.
    pub message: String,
}

impl std::fmt::Display for BadHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for BadHistory {}

/// Reads a JSON-lines history (blank lines skipped) and checks it.
pub fn check_reader(reader: impl BufRead) -> Result<Verdict, BadHistory> {
    let mut checker = Checker::default();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = line.map_err(|e| BadHistory {
            line: line_no,
            message: e.to_string(),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&line).map_err(|e| BadHistory {
            line: line_no,
            message: e.to_string(),
        })?;
        checker.add(&event, line_no).map_err(|message| BadHistory {
            line: line_no,
            message,
        })?;
    }
    Ok(checker.finish())
}

/// Checks a history given as events.
pub fn check<'a>(events: impl IntoIterator<Item = &'a Event>) -> Result<Verdict, BadHistory> {
    let mut checker = Checker::default();
    for (i, event) in events.into_iter().enumerate() {
        let line = i as u64 + 1;
        checker
            .add(event, line)
            .map_err(|message| BadHistory { line, message })?;
    }
    Ok(checker.finish())
}

/// A topic-partition, interned.
type Tp = u32;

/// An acknowledged send: its invocation order, value and offset.
type Acked<'a> = (u64, &'a str, u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    Ok,
    Fail,
    Info,
}

#[derive(Debug)]
struct Send {
    process: u32,
    /// Order of invocation over the whole history.
    order: u64,
    invoked_ms: f64,
    line: u64,
    outcome: Outcome,
    tp: Option<Tp>,
    offset: Option<u64>,
    done_ms: f64,
}

#[derive(Debug, Default)]
struct Reads {
    /// (partition, offset) where consumers read the value.
    polled: Vec<(Tp, u64)>,
    /// Where the drain read it.
    drained: Vec<(Tp, u64)>,
}

#[derive(Debug, Default)]
struct Checker {
    events: u64,
    first_ms: Option<f64>,
    processes: Interned<String>,
    tps: Interned<(String, u32)>,
    sends: HashMap<String, Send>,
    reads: HashMap<String, Reads>,
    /// Per consumer and partition, the last offset polled (reset by `assign`).
    last_polled: HashMap<(u32, Tp), u64>,
    /// Gaps in a consumer's reads: (process, partition, from, to), both read, nothing between.
    gaps: Vec<(u32, Tp, u64, u64)>,
    /// Per partition, what the drain holds.
    drain: HashMap<Tp, BTreeMap<u64, String>>,
    polled: u64,
    drained: u64,
    acknowledged_commits: u64,
    groups: Interned<String>,
    /// Per group and partition, the offsets its members received.
    group_polled: HashMap<(u32, Tp), Vec<u64>>,
    /// Per group and partition, the highest acknowledged commit: (offset, line).
    commits: HashMap<(u32, Tp), (u64, u64)>,
    /// Per group and partition, the committed offset read after healing.
    committed: HashMap<(u32, Tp), u64>,
    /// (time, description, the partition it aims at, if the event names one).
    faults: Vec<(f64, String, Option<Tp>)>,
    counts: BTreeMap<&'static str, u64>,
    examples: BTreeMap<&'static str, Vec<Value>>,
    next_order: u64,
}

/// Names (processes, partitions, groups) numbered in the order first seen, so that the
/// per-event bookkeeping keys on small numbers.
#[derive(Debug)]
struct Interned<K> {
    ids: HashMap<K, u32>,
    names: Vec<K>,
}

impl<K> Default for Interned<K> {
    fn default() -> Self {
        Interned {
            ids: HashMap::new(),
            names: Vec::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Interned<K> {
    /// The number of `name`, given one if it is new (`name` is cloned only then).
    fn id<Q>(&mut self, name: &Q) -> u32
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.ids.insert(name.to_owned(), id);
        self.names.push(name.to_owned());
        id
    }

    fn name(&self, id: u32) -> Option<&K> {
        self.names.get(id as usize)
    }
}

impl Checker {
    fn process(&mut self, process: &Process) -> u32 {
        match process {
            Process::Number(n) => self.processes.id(n.to_string().as_str()),
            Process::Name(s) => self.processes.id(s.as_str()),
        }
    }

    fn group(&mut self, event: &Event) -> Option<u32> {
        Some(self.groups.id(event.group.as_deref()?))
    }

    fn tp(&mut self, event: &Event) -> Result<Tp, String> {
        let (Some(topic), Some(partition)) = (&event.topic, event.partition) else {
            return Err(format!(
                "a {:?} {:?} event needs a topic and a partition",
                event.kind, event.f
            ));
        };
        Ok(self.tps.id(&(topic.clone(), partition)))
    }

    fn flag(&mut self, anomaly: &'static str, example: impl FnOnce(&Checker) -> Value) {
        *self.counts.entry(anomaly).or_default() += 1;
        if self.examples.get(anomaly).map_or(0, Vec::len) < EXAMPLES {
            let example = example(self);
            self.examples.entry(anomaly).or_default().push(example);
        }
    }

    fn since_start(&self, ms: f64) -> f64 {
        ms - self.first_ms.unwrap_or(ms)
    }

    fn add(&mut self, event: &Event, line: u64) -> Result<(), String> {
        self.events += 1;
        let first = *self.first_ms.get_or_insert(event.time);
        if !event.time.is_finite() || (event.time - first).abs() > SPAN_MS_MAX {
            return Err(format!(
                "time {} is not within 30 days of the first event's ({first})",
                event.time
            ));
        }
        let value = || {
            event
                .value
                .clone()
                .ok_or_else(|| format!("a {:?} {:?} event needs a value", event.kind, event.f))
        };
        let offset = || {
            event
                .offset
                .ok_or_else(|| format!("a {:?} {:?} event needs an offset", event.kind, event.f))
        };
        match (event.f, event.kind) {
            (Op::Send, Type::Invoke) => {
                let value = value()?;
                let process = self.process(&event.process);
                let tp = match (&event.topic, event.partition) {
                    (Some(_), Some(_)) => Some(self.tp(event)?),
                    _ => None,
                };
                let send = Send {
                    process,
                    order: self.next_order,
                    invoked_ms: event.time,
                    line,
                    outcome: Outcome::Pending,
                    tp,
                    offset: None,
                    done_ms: event.time,
                };
                self.next_order += 1;
                if self.sends.insert(value.clone(), send).is_some() {
                    return Err(format!("value {value} sent twice: values must be unique"));
                }
            }
            (Op::Send, kind) => {
                let value = value()?;
                let tp = match (&event.topic, event.partition) {
                    (Some(_), Some(_)) => Some(self.tp(event)?),
                    _ => None,
                };
                let Some(send) = self.sends.get_mut(&value) else {
                    return Err(format!("value {value} completed without an invoke"));
                };
                send.outcome = match kind {
                    Type::Ok => Outcome::Ok,
                    Type::Fail => Outcome::Fail,
                    _ => Outcome::Info,
                };
                send.done_ms = event.time;
                if tp.is_some() {
                    send.tp = tp;
                }
                if kind == Type::Ok {
                    send.offset = event.offset;
                }
            }
            (Op::Poll, Type::Ok) => {
                let (value, offset, tp) = (value()?, offset()?, self.tp(event)?);
                let process = self.process(&event.process);
                self.polled += 1;
                if let Some(group) = self.group(event) {
                    self.group_polled
                        .entry((group, tp))
                        .or_default()
                        .push(offset);
                }
                self.reads
                    .entry(value)
                    .or_default()
                    .polled
                    .push((tp, offset));
                match self.last_polled.insert((process, tp), offset) {
                    Some(last) if offset <= last => {
                        let time = self.since_start(event.time);
                        self.flag("nonmonotonic-poll", |c| {
                            json!({"process": c.process_name(process), "partition": c.tp_json(tp), "offset": offset, "after_offset": last, "time_ms": time, "line": line})
                        });
                    }
                    Some(last) if offset > last.saturating_add(1) => {
                        self.gaps.push((process, tp, last, offset));
                    }
                    _ => {}
                }
            }
            (Op::Drain, Type::Ok) => {
                let (value, offset, tp) = (value()?, offset()?, self.tp(event)?);
                self.drained += 1;
                self.reads
                    .entry(value.clone())
                    .or_default()
                    .drained
                    .push((tp, offset));
                self.drain.entry(tp).or_default().insert(offset, value);
            }
            (Op::Commit, Type::Ok) | (Op::Committed, Type::Ok) => {
                let (offset, tp) = (offset()?, self.tp(event)?);
                let Some(group) = self.group(event) else {
                    return Err(format!(
                        "a {:?} {:?} event needs a group",
                        event.kind, event.f
                    ));
                };
                if event.f == Op::Commit {
                    self.acknowledged_commits += 1;
                    let highest = self.commits.entry((group, tp)).or_insert((offset, line));
                    if offset > highest.0 {
                        *highest = (offset, line);
                    }
                } else {
                    self.committed.insert((group, tp), offset);
                }
            }
            (Op::Assign, _) => {
                let process = self.process(&event.process);
                self.last_polled.retain(|(p, _), _| *p != process);
            }
            (Op::Fault, _) => {
                let tp = match (&event.topic, event.partition) {
                    (Some(_), Some(_)) => Some(self.tp(event)?),
                    _ => None,
                };
                let at = event.time;
                self.faults
                    .push((at, event.value.clone().unwrap_or_default(), tp));
            }
            // Poll invokes, failed polls, unacknowledged commits and heals carry nothing to
            // check.
            _ => {}
        }
        Ok(())
    }

    fn tp_json(&self, tp: Tp) -> Value {
        match self.tps.name(tp) {
            Some((topic, partition)) => json!(format!("{topic}-{partition}")),
            None => Value::Null,
        }
    }

    fn process_name(&self, process: u32) -> &str {
        self.processes.name(process).map_or("?", String::as_str)
    }

    fn send_json(&self, value: &str, send: &Send) -> Value {
        json!({
            "value": value,
            "process": self.process_name(send.process),
            "outcome": format!("{:?}", send.outcome).to_lowercase(),
            "partition": send.tp.map(|tp| self.tp_json(tp)),
            "offset": send.offset,
            "invoked_ms": self.since_start(send.invoked_ms),
            "completed_ms": self.since_start(send.done_ms),
            "line": send.line,
        })
    }

    fn finish(mut self) -> Verdict {
        let has_drain = self.drained > 0;
        let mut stats = Stats {
            events: self.events,
            sends: self.sends.len() as u64,
            polled: self.polled,
            drained: self.drained,
            commits: self.acknowledged_commits,
            has_drain,
            ..Stats::default()
        };
        // Everything observed at each offset: reads, and acknowledged sends' offsets.
        let mut at_offset: HashMap<(Tp, u64), Vec<&str>> = HashMap::new();
        let mut highest_read: HashMap<Tp, u64> = HashMap::new();
        for (value, reads) in &self.reads {
            for &(tp, offset) in reads.polled.iter().chain(&reads.drained) {
                let values = at_offset.entry((tp, offset)).or_default();
                if !values.contains(&value.as_str()) {
                    values.push(value);
                }
                let high = highest_read.entry(tp).or_default();
                *high = (*high).max(offset);
            }
        }
        for (value, send) in &self.sends {
            if let (Outcome::Ok, Some(tp), Some(offset)) = (send.outcome, send.tp, send.offset) {
                let values = at_offset.entry((tp, offset)).or_default();
                if !values.contains(&value.as_str()) {
                    values.push(value);
                }
            }
        }
        let mut found: Vec<(&'static str, Value)> = Vec::new();
        // Deterministic output: sends in invocation order.
        let mut sends: Vec<(&String, &Send)> = self.sends.iter().collect();
        sends.sort_by_key(|(_, s)| s.order);
        // Per producer and partition: its acknowledged sends (order, value, offset).
        let mut acked_by: HashMap<(u32, Tp), Vec<Acked<'_>>> = HashMap::new();
        for &(value, send) in &sends {
            match send.outcome {
                Outcome::Ok => stats.acknowledged += 1,
                Outcome::Fail => stats.failed += 1,
                Outcome::Pending | Outcome::Info => stats.unknown += 1,
            }
            let reads = self.reads.get(value.as_str());
            let read_anywhere =
                reads.is_some_and(|r| !r.polled.is_empty() || !r.drained.is_empty());
            let drained = reads.is_some_and(|r| !r.drained.is_empty());
            if send.outcome == Outcome::Ok {
                if has_drain && !drained {
                    found.push(("lost", self.send_json(value, send)));
                }
                if let (Some(tp), Some(offset)) = (send.tp, send.offset) {
                    if !read_anywhere && highest_read.get(&tp).is_some_and(|h| *h > offset) {
                        let example = json!({
                            "send": self.send_json(value, send),
                            "highest_offset_read": highest_read.get(&tp),
                        });
                        found.push(("lost-write", example));
                    }
                    acked_by
                        .entry((send.process, tp))
                        .or_default()
                        .push((send.order, value, offset));
                }
            }
            if send.outcome == Outcome::Fail && read_anywhere {
                found.push(("failed-write-read", self.send_json(value, send)));
            }
        }
        for ((process, tp), acked) in &acked_by {
            let mut highest: Option<(u64, &str)> = None;
            for &(_, value, offset) in acked {
                if let Some((before, before_value)) = highest
                    && offset <= before
                {
                    found.push((
                        "nonmonotonic-send",
                        json!({"process": self.process_name(*process), "partition": self.tp_json(*tp),
                               "value": value, "offset": offset, "sent_after": before_value, "at_offset": before}),
                    ));
                }
                if highest.is_none_or(|(h, _)| offset > h) {
                    highest = Some((offset, value));
                }
            }
        }
        let mut values: Vec<(&String, &Reads)> = self.reads.iter().collect();
        values.sort_by(|a, b| a.0.cmp(b.0));
        for (value, reads) in values {
            let mut positions: Vec<(Tp, u64)> =
                reads.polled.iter().chain(&reads.drained).copied().collect();
            if let Some(send) = self.sends.get(value.as_str())
                && let (Outcome::Ok, Some(tp), Some(offset)) = (send.outcome, send.tp, send.offset)
            {
                positions.push((tp, offset));
            }
            positions.sort_unstable();
            positions.dedup();
            if positions.len() > 1 {
                let at: Vec<Value> = positions
                    .iter()
                    .map(|&(tp, o)| json!({"partition": self.tp_json(tp), "offset": o}))
                    .collect();
                found.push(("duplicate", json!({"value": value, "at": at})));
            }
            if !self.sends.contains_key(value.as_str()) {
                let at: Vec<Value> = positions
                    .iter()
                    .map(|&(tp, o)| json!({"partition": self.tp_json(tp), "offset": o}))
                    .collect();
                found.push(("unexpected", json!({"value": value, "read_at": at})));
            }
            if has_drain && reads.drained.is_empty() && !reads.polled.is_empty() {
                let at: Vec<Value> = reads
                    .polled
                    .iter()
                    .map(|&(tp, o)| json!({"partition": self.tp_json(tp), "offset": o}))
                    .collect();
                found.push(("read-then-lost", json!({"value": value, "polled_at": at})));
            }
        }
        let mut offsets: Vec<(&(Tp, u64), &Vec<&str>)> =
            at_offset.iter().filter(|(_, v)| v.len() > 1).collect();
        offsets.sort();
        for (&(tp, offset), values) in offsets {
            found.push((
                "inconsistent-offset",
                json!({"partition": self.tp_json(tp), "offset": offset, "values": values}),
            ));
        }
        for &(process, tp, from, to) in &self.gaps {
            if let Some(drain) = self.drain.get(&tp)
                && let Some((skipped, value)) = drain.range(from + 1..to).next()
            {
                found.push((
                    "poll-skip",
                    json!({"process": self.process_name(process), "partition": self.tp_json(tp),
                           "from": from, "to": to, "skipped_offset": skipped, "skipped_value": value}),
                ));
            }
        }
        self.check_groups(&mut found);
        for (anomaly, example) in found {
            self.flag(anomaly, move |_| example);
        }
        let availability = self.availability();
        let mut anomalies: BTreeMap<&'static str, u64> =
            ANOMALIES.iter().map(|a| (*a, 0)).collect();
        for (anomaly, n) in &self.counts {
            anomalies.insert(anomaly, *n);
        }
        Verdict {
            valid: anomalies.values().all(|n| *n == 0),
            anomalies,
            examples: self.examples,
            stats,
            availability,
        }
    }

    /// group-skip and lost-commit.
    fn check_groups(&mut self, found: &mut Vec<(&'static str, Value)>) {
        for polled in self.group_polled.values_mut() {
            polled.sort_unstable();
            polled.dedup();
        }
        // Groups whose committed offsets were read after healing (only they are judged).
        let read_back: std::collections::HashSet<u32> =
            self.committed.keys().map(|(group, _)| *group).collect();
        let mut commits: Vec<((u32, Tp), (u64, u64))> =
            self.commits.iter().map(|(k, v)| (*k, *v)).collect();
        commits.sort_unstable();
        for ((group, tp), (commit, line)) in commits {
            let name = self.groups.name(group).map_or("?", String::as_str);
            let polled = self
                .group_polled
                .get(&(group, tp))
                .map_or(&[][..], Vec::as_slice);
            if let Some(drain) = self.drain.get(&tp) {
                for (&offset, value) in drain.range(..commit) {
                    if polled.binary_search(&offset).is_err() {
                        found.push((
                            "group-skip",
                            json!({"group": name, "partition": self.tp_json(tp), "offset": offset,
                                   "value": value, "committed": commit, "commit_line": line}),
                        ));
                    }
                }
            }
            if read_back.contains(&group) {
                let read = self.committed.get(&(group, tp)).copied();
                if read.is_none_or(|read| read < commit) {
                    found.push((
                        "lost-commit",
                        json!({"group": name, "partition": self.tp_json(tp), "acknowledged": commit,
                               "commit_line": line, "committed_after_healing": read}),
                    ));
                }
            }
        }
    }

    fn availability(&self) -> Availability {
        let mut acks: Vec<(f64, f64, Option<Tp>)> = self
            .sends
            .values()
            .filter(|s| s.outcome == Outcome::Ok)
            .map(|s| {
                let (invoked, done) = (self.since_start(s.invoked_ms), self.since_start(s.done_ms));
                (invoked, done, s.tp)
            })
            .collect();
        acks.sort_by(|a, b| a.1.total_cmp(&b.1));
        let mut per_second: Vec<u64> = Vec::new();
        for &(_, done, _) in &acks {
            let second = (done.max(0.0) / 1000.0) as usize;
            if per_second.len() <= second {
                per_second.resize(second + 1, 0);
            }
            if let Some(n) = per_second.get_mut(second) {
                *n += 1;
            }
        }
        let faults: Vec<FaultRecovery> = self
            .faults
            .iter()
            .map(|(time, fault, aimed)| {
                let at = self.since_start(*time);
                // A fault that names its partition recovers when that partition acknowledges.
                let recovered = acks
                    .iter()
                    .filter(|(invoked, _, tp)| *invoked >= at && (aimed.is_none() || tp == aimed))
                    .map(|(_, done, _)| done - at)
                    .min_by(f64::total_cmp);
                FaultRecovery {
                    at_ms: at,
                    fault: fault.clone(),
                    recovered_after_ms: recovered,
                }
            })
            .collect();
        let mut times: Vec<f64> = faults.iter().filter_map(|f| f.recovered_after_ms).collect();
        times.sort_by(f64::total_cmp);
        let pick = |q: f64| -> Option<f64> {
            let n = times.len();
            let rank = ((n as f64 * q).ceil() as usize).clamp(1, n.max(1));
            times.get(rank - 1).copied()
        };
        Availability {
            acknowledged_per_second: per_second,
            recovery_p50_ms: pick(0.5),
            recovery_p99_ms: pick(0.99),
            recovery_max_ms: times.last().copied(),
            faults,
        }
    }
}
