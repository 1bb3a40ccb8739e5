//! The checker's own tests: a hand-written history for each anomaly is flagged (and nothing
//! else is), a clean one passes, a broken file is refused with its line, and a history of a
//! million events is checked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use cairn_check::{ANOMALIES, Event, Op, Process, Type, Verdict, check, check_reader};

fn event(kind: Type, f: Op, process: u64, time: f64) -> Event {
    Event {
        kind,
        f,
        process: Process::Number(process),
        time,
        topic: None,
        partition: None,
        value: None,
        offset: None,
        producer_id: None,
        sequence: None,
        error: None,
        group: None,
    }
}

/// A history under construction; time advances 1 ms per event.
#[derive(Default)]
struct H {
    events: Vec<Event>,
    now: f64,
}

impl H {
    fn push(&mut self, kind: Type, f: Op, process: u64, value: &str, at: Option<(u32, u64)>) {
        self.now += 1.0;
        let mut e = event(kind, f, process, self.now);
        e.value = Some(value.to_string());
        if let Some((partition, offset)) = at {
            e.topic = Some("t".into());
            e.partition = Some(partition);
            e.offset = Some(offset);
        }
        self.events.push(e);
    }

    /// An acknowledged send of `value` to partition 0 at `offset`.
    fn sent(&mut self, process: u64, value: &str, offset: u64) -> &mut Self {
        self.push(Type::Invoke, Op::Send, process, value, None);
        self.push(Type::Ok, Op::Send, process, value, Some((0, offset)));
        self
    }

    fn invoke(&mut self, process: u64, value: &str) -> &mut Self {
        self.push(Type::Invoke, Op::Send, process, value, None);
        self
    }

    fn ack(&mut self, process: u64, value: &str, offset: u64) -> &mut Self {
        self.push(Type::Ok, Op::Send, process, value, Some((0, offset)));
        self
    }

    fn failed(&mut self, process: u64, value: &str) -> &mut Self {
        self.push(Type::Invoke, Op::Send, process, value, None);
        self.push(Type::Fail, Op::Send, process, value, None);
        self
    }

    fn unknown(&mut self, process: u64, value: &str) -> &mut Self {
        self.push(Type::Invoke, Op::Send, process, value, None);
        self.push(Type::Info, Op::Send, process, value, None);
        self
    }

    fn poll(&mut self, process: u64, value: &str, offset: u64) -> &mut Self {
        self.push(Type::Ok, Op::Poll, process, value, Some((0, offset)));
        self
    }

    fn drain(&mut self, value: &str, offset: u64) -> &mut Self {
        self.push(Type::Ok, Op::Drain, 99, value, Some((0, offset)));
        self
    }

    fn assign(&mut self, process: u64) -> &mut Self {
        self.now += 1.0;
        self.events
            .push(event(Type::Info, Op::Assign, process, self.now));
        self
    }

    /// A member of group "g" receiving `value` at `offset` of partition 0.
    fn group_poll(&mut self, process: u64, value: &str, offset: u64) -> &mut Self {
        self.poll(process, value, offset);
        self.events.last_mut().unwrap().group = Some("g".into());
        self
    }

    /// Group "g" committing `offset` (the next to read) of partition 0: `f` is `Commit` (by
    /// `process`, with `kind` its outcome) or `Committed` (read after healing).
    fn commit(&mut self, f: Op, kind: Type, process: u64, offset: u64) -> &mut Self {
        self.now += 1.0;
        let mut e = event(kind, f, process, self.now);
        e.topic = Some("t".into());
        e.partition = Some(0);
        e.offset = Some(offset);
        e.group = Some("g".into());
        self.events.push(e);
        self
    }

    fn fault(&mut self, at: f64, what: &str) -> &mut Self {
        self.now = at;
        let mut e = event(Type::Info, Op::Fault, 0, at);
        e.value = Some(what.into());
        self.events.push(e);
        self
    }

    fn check(&self) -> Verdict {
        check(&self.events).unwrap()
    }
}

/// Asserts that exactly `expected` (anomaly, count) pairs are flagged, every other anomaly zero,
/// and each flagged anomaly has an example.
fn assert_only(verdict: &Verdict, expected: &[(&str, u64)]) {
    for anomaly in ANOMALIES {
        let want = expected
            .iter()
            .find(|(a, _)| *a == anomaly)
            .map_or(0, |(_, n)| *n);
        assert_eq!(
            verdict.anomalies[anomaly],
            want,
            "{anomaly}: {}",
            serde_json::to_string_pretty(verdict).unwrap()
        );
        if want > 0 {
            assert!(!verdict.examples[anomaly].is_empty());
        }
    }
    assert_eq!(verdict.valid, expected.is_empty());
}

/// Three acknowledged sends, read in order by a consumer and by the drain.
fn clean() -> H {
    let mut h = H::default();
    h.sent(1, "a", 0).sent(1, "b", 1).sent(1, "c", 2);
    h.poll(2, "a", 0).poll(2, "b", 1).poll(2, "c", 2);
    h.drain("a", 0).drain("b", 1).drain("c", 2);
    h
}

#[test]
fn a_clean_history_passes() {
    let verdict = clean().check();
    assert_only(&verdict, &[]);
    assert_eq!(verdict.stats.acknowledged, 3);
    assert_eq!(verdict.stats.drained, 3);
    assert_eq!(verdict.stats.polled, 3);
    // Unknown and failed sends that never show up are fine.
    let mut h = clean();
    h.unknown(1, "d").failed(1, "e");
    let verdict = h.check();
    assert_only(&verdict, &[]);
    assert_eq!((verdict.stats.unknown, verdict.stats.failed), (1, 1));
    // An unknown send that shows up is fine too.
    let mut h = H::default();
    h.unknown(1, "a").drain("a", 0);
    assert_only(&h.check(), &[]);
}

#[test]
fn lost_an_acknowledged_send_missing_from_the_final_read() {
    let mut h = H::default();
    h.sent(1, "a", 0)
        .sent(1, "b", 1)
        .poll(2, "a", 0)
        .poll(2, "b", 1);
    h.drain("a", 0);
    // b was read by a consumer, then vanished: lost and read-then-lost.
    assert_only(&h.check(), &[("lost", 1), ("read-then-lost", 1)]);
}

#[test]
fn lost_write_acknowledged_never_read_while_a_later_offset_was() {
    let mut h = H::default();
    h.sent(1, "a", 0).sent(1, "b", 1).sent(1, "c", 2);
    h.drain("a", 0).drain("c", 2);
    let verdict = h.check();
    assert_only(&verdict, &[("lost", 1), ("lost-write", 1)]);
    assert_eq!(verdict.examples["lost-write"][0]["send"]["value"], "b");
    // Never read but nothing later read either: lost only (the drain misses it).
    let mut h = H::default();
    h.sent(1, "a", 0).sent(1, "b", 1).drain("a", 0);
    assert_only(&h.check(), &[("lost", 1)]);
}

#[test]
fn duplicate_one_value_at_two_offsets() {
    let mut h = H::default();
    h.sent(1, "a", 0).unknown(1, "b");
    h.drain("a", 0).drain("b", 1).drain("a", 2);
    let verdict = h.check();
    assert_only(&verdict, &[("duplicate", 1)]);
    assert_eq!(verdict.examples["duplicate"][0]["value"], "a");
}

#[test]
fn inconsistent_offset_one_offset_holding_two_values() {
    // A consumer read b at 1; after the faults offset 1 holds c and b is at 2.
    let mut h = H::default();
    h.sent(1, "a", 0).sent(1, "b", 1).sent(1, "c", 2);
    h.poll(2, "a", 0).poll(2, "b", 1);
    h.drain("a", 0).drain("c", 1).drain("b", 2);
    let verdict = h.check();
    // Offsets 1 (b read, c drained) and 2 (c acknowledged, b drained); b and c each at two.
    assert_only(&verdict, &[("inconsistent-offset", 2), ("duplicate", 2)]);
}

#[test]
fn unexpected_a_value_never_sent() {
    let mut h = clean();
    h.drain("ghost", 3);
    assert_only(&h.check(), &[("unexpected", 1)]);
}

#[test]
fn failed_write_read_a_surely_failed_send_that_shows_up() {
    let mut h = clean();
    h.failed(1, "d").drain("d", 3);
    assert_only(&h.check(), &[("failed-write-read", 1)]);
}

#[test]
fn read_then_lost_a_value_read_then_gone() {
    let mut h = H::default();
    h.unknown(1, "a").poll(2, "a", 0);
    h.sent(1, "b", 0).drain("b", 0);
    // a was read at 0, which now holds b.
    assert_only(
        &h.check(),
        &[("read-then-lost", 1), ("inconsistent-offset", 1)],
    );
}

#[test]
fn nonmonotonic_send_a_later_send_at_an_earlier_offset() {
    let mut h = H::default();
    h.invoke(1, "a")
        .invoke(1, "b")
        .ack(1, "b", 0)
        .ack(1, "a", 1);
    h.drain("b", 0).drain("a", 1);
    let verdict = h.check();
    assert_only(&verdict, &[("nonmonotonic-send", 1)]);
    assert_eq!(verdict.examples["nonmonotonic-send"][0]["value"], "b");
    // Two producers interleaving is fine.
    let mut h = H::default();
    h.invoke(1, "a")
        .invoke(2, "b")
        .ack(2, "b", 0)
        .ack(1, "a", 1);
    h.drain("b", 0).drain("a", 1);
    assert_only(&h.check(), &[]);
}

#[test]
fn nonmonotonic_poll_a_consumer_going_back_unless_reassigned() {
    let mut h = clean();
    h.poll(3, "b", 1).poll(3, "a", 0);
    assert_only(&h.check(), &[("nonmonotonic-poll", 1)]);
    let mut h = clean();
    h.poll(3, "b", 1).assign(3).poll(3, "a", 0).poll(3, "b", 1);
    assert_only(&h.check(), &[]);
}

#[test]
fn poll_skip_a_consumer_jumping_over_a_record() {
    let mut h = H::default();
    h.sent(1, "a", 0).sent(1, "b", 1).sent(1, "c", 2);
    h.poll(2, "a", 0).poll(2, "c", 2);
    h.drain("a", 0).drain("b", 1).drain("c", 2);
    let verdict = h.check();
    assert_only(&verdict, &[("poll-skip", 1)]);
    assert_eq!(verdict.examples["poll-skip"][0]["skipped_value"], "b");
    // A gap the log has too (nothing there: compaction, or a failed batch's offsets) is no skip.
    let mut h = H::default();
    h.sent(1, "a", 0).sent(1, "c", 2);
    h.poll(2, "a", 0).poll(2, "c", 2);
    h.drain("a", 0).drain("c", 2);
    assert_only(&h.check(), &[]);
}

#[test]
fn group_skip_a_group_committing_past_a_record_no_member_received() {
    let base = || {
        let mut h = H::default();
        h.sent(1, "a", 0).sent(1, "b", 1).sent(1, "c", 2);
        // Two members: one read a, the partition moved, the other read c. Nobody read b.
        h.group_poll(2, "a", 0)
            .commit(Op::Commit, Type::Ok, 2, 1)
            .group_poll(3, "c", 2);
        h.drain("a", 0).drain("b", 1).drain("c", 2);
        h
    };
    // Committed up to a: nothing skipped yet; a commit that failed or is unknown says nothing.
    assert_only(&base().check(), &[]);
    let mut h = base();
    h.commit(Op::Commit, Type::Invoke, 3, 3)
        .commit(Op::Commit, Type::Fail, 3, 3);
    assert_only(&h.check(), &[]);
    // Acknowledged past b: the group skipped it.
    let mut h = base();
    h.commit(Op::Commit, Type::Invoke, 3, 3)
        .commit(Op::Commit, Type::Ok, 3, 3);
    let verdict = h.check();
    assert_only(&verdict, &[("group-skip", 1)]);
    assert_eq!(verdict.examples["group-skip"][0]["value"], "b");
    // Had the first member read b too, nothing is skipped.
    let mut h = base();
    h.group_poll(2, "b", 1).commit(Op::Commit, Type::Ok, 3, 3);
    assert_only(&h.check(), &[]);
}

#[test]
fn lost_commit_a_committed_offset_below_an_acknowledged_commit() {
    let base = || {
        let mut h = clean();
        h.group_poll(4, "a", 0)
            .group_poll(4, "b", 1)
            .commit(Op::Commit, Type::Ok, 4, 2);
        h
    };
    // Not read after healing: not judged.
    assert_only(&base().check(), &[]);
    let mut h = base();
    h.commit(Op::Committed, Type::Ok, 0, 2);
    assert_only(&h.check(), &[]);
    let mut h = base();
    h.commit(Op::Committed, Type::Ok, 0, 1);
    let verdict = h.check();
    assert_only(&verdict, &[("lost-commit", 1)]);
    assert_eq!(verdict.examples["lost-commit"][0]["acknowledged"], 2);
    // A group whose committed offsets were read, missing this partition's: lost too.
    let mut h = base();
    h.commit(Op::Committed, Type::Ok, 0, 2);
    h.events.last_mut().unwrap().partition = Some(7);
    assert_only(&h.check(), &[("lost-commit", 1)]);
}

#[test]
fn availability_counts_acknowledgements_per_second_and_recovery_after_faults() {
    let mut h = H::default();
    h.sent(1, "a", 0);
    h.fault(1_000.0, "kill -9 node 2");
    // Invoked before the fault, acknowledged after: not a recovery.
    h.now = 900.0;
    h.invoke(1, "b");
    h.now = 1_100.0;
    h.ack(1, "b", 1);
    h.now = 1_200.0;
    h.invoke(1, "c");
    h.now = 1_700.0;
    h.ack(1, "c", 2);
    h.fault(3_000.0, "SIGSTOP node 1");
    h.drain("a", 0).drain("b", 1).drain("c", 2);
    let verdict = h.check();
    assert_only(&verdict, &[]);
    let a = &verdict.availability;
    assert_eq!(a.faults.len(), 2);
    // Times count from the first event (1 ms); each logged event takes 1 ms more: the fault at
    // 1,000, c acknowledged at 1,701.
    assert_eq!(a.faults[0].recovered_after_ms, Some(701.0));
    assert_eq!(a.faults[1].recovered_after_ms, None);
    assert_eq!(a.recovery_max_ms, Some(701.0));
    assert_eq!(a.acknowledged_per_second, vec![1, 2]);
}

#[test]
fn a_fault_that_names_its_partition_recovers_when_that_partition_acknowledges() {
    let mut h = H::default();
    h.sent(1, "a", 0);
    let mut fault = event(Type::Info, Op::Fault, 0, 100.0);
    fault.value = Some("kill -9 the leader of t-0".into());
    fault.topic = Some("t".into());
    fault.partition = Some(0);
    h.events.push(fault);
    // Partition 1 acknowledges at once; partition 0 only 900 ms after the fault.
    h.now = 150.0;
    h.push(Type::Invoke, Op::Send, 1, "b", None);
    h.push(Type::Ok, Op::Send, 1, "b", Some((1, 0)));
    h.push(Type::Invoke, Op::Send, 1, "c", None);
    h.now = 999.0;
    h.push(Type::Ok, Op::Send, 1, "c", Some((0, 1)));
    h.drain("a", 0);
    h.push(Type::Ok, Op::Drain, 99, "c", Some((0, 1)));
    h.push(Type::Ok, Op::Drain, 99, "b", Some((1, 0)));
    let verdict = h.check();
    assert_only(&verdict, &[]);
    // Times count from the first event (1 ms).
    assert_eq!(
        verdict.availability.faults[0].recovered_after_ms,
        Some(900.0)
    );
}

#[test]
fn a_broken_history_is_refused_with_its_line() {
    let text = "{\"type\":\"invoke\",\"f\":\"send\",\"process\":1,\"time\":1,\"value\":\"a\"}\n\n{\"type\":\"ok\",\"f\":\"send\"";
    let err = check_reader(text.as_bytes()).unwrap_err();
    assert_eq!(err.line, 3, "{err}");
    let twice = "{\"type\":\"invoke\",\"f\":\"send\",\"value\":\"a\"}\n{\"type\":\"invoke\",\"f\":\"send\",\"value\":\"a\"}\n";
    let err = check_reader(twice.as_bytes()).unwrap_err();
    assert!(err.message.contains("unique"), "{err}");
    let no_offset =
        "{\"type\":\"ok\",\"f\":\"drain\",\"topic\":\"t\",\"partition\":0,\"value\":\"a\"}\n";
    let err = check_reader(no_offset.as_bytes()).unwrap_err();
    assert!(err.message.contains("offset"), "{err}");
    // A time far from the others (a broken file) is refused rather than sizing the
    // per-second counts; so is an offset at the very end of the range next to a read before it.
    let far = "{\"type\":\"invoke\",\"f\":\"send\",\"time\":0,\"value\":\"a\"}\n{\"type\":\"ok\",\"f\":\"send\",\"time\":1e300,\"value\":\"a\",\"topic\":\"t\",\"partition\":0,\"offset\":0}\n";
    let err = check_reader(far.as_bytes()).unwrap_err();
    assert_eq!(err.line, 2, "{err}");
    let mut h = H::default();
    h.poll(2, "x", u64::MAX - 1).poll(2, "y", u64::MAX);
    assert_eq!(h.check().anomalies["nonmonotonic-poll"], 0);
    // Names work as processes too.
    let named = "{\"type\":\"invoke\",\"f\":\"send\",\"process\":\"producer-1\",\"value\":\"a\"}\n{\"type\":\"ok\",\"f\":\"send\",\"process\":\"producer-1\",\"value\":\"a\",\"topic\":\"t\",\"partition\":0,\"offset\":0}\n";
    let verdict = check_reader(named.as_bytes()).unwrap();
    assert!(verdict.valid);
    assert!(!verdict.stats.has_drain);
}

#[test]
fn a_million_events_are_checked() {
    // 250,000 acknowledged sends over 8 partitions (invoke + ok), each polled once and drained
    // once: 1,000,000 events, written as JSON lines and read back as the binary does.
    let n = 250_000u64;
    let mut text = String::with_capacity(120 * 4 * n as usize);
    let line = |kind: &str,
                f: &str,
                process: u64,
                time: u64,
                value: u64,
                at: Option<(u64, u64)>| {
        let at = at.map_or(String::new(), |(p, o)| {
            format!(",\"topic\":\"t\",\"partition\":{p},\"offset\":{o}")
        });
        format!(
            "{{\"type\":\"{kind}\",\"f\":\"{f}\",\"process\":{process},\"time\":{time},\"value\":\"v{value}\"{at}}}\n"
        )
    };
    for i in 0..n {
        let (p, o) = (i % 8, i / 8);
        text.push_str(&line("invoke", "send", p, i, i, None));
        text.push_str(&line("ok", "send", p, i, i, Some((p, o))));
    }
    for i in 0..n {
        let (p, o) = (i % 8, i / 8);
        text.push_str(&line("ok", "poll", 100 + p, n + i, i, Some((p, o))));
    }
    for i in 0..n {
        let (p, o) = (i % 8, i / 8);
        text.push_str(&line("ok", "drain", 200, 2 * n + i, i, Some((p, o))));
    }
    let started = std::time::Instant::now();
    let verdict = check_reader(text.as_bytes()).unwrap();
    println!(
        "{} events ({} MB) checked in {:?}",
        verdict.stats.events,
        text.len() / 1_000_000,
        started.elapsed()
    );
    assert_eq!(verdict.stats.events, 4 * n);
    assert_only(&verdict, &[]);
}
