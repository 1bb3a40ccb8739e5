//! Consumer groups of Cairn's own client (`GroupConsumer`, default settings), one member per
//! process (`tests/bin/group_member.rs`), against real broker processes, with a producer
//! running: partitions shared with one owner at a time, a fourth member joining, a member killed
//! with SIGKILL, the broker killed with SIGKILL and restarted under running members, and
//! committed offsets that survive it all.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_client::{Admin, Producer, ProducerConfig, ProducerRecord};

use crate::broker_process::{BrokerProcess, free_port};

const PARTITIONS: u32 = 12;
/// `GroupConfig`'s default session timeout, which the members use.
const SESSION_S: f64 = 10.0;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What the members printed, gathered by one reader thread per member.
#[derive(Debug, Default)]
struct State {
    /// Partition -> (owner, since), in the order the readers see events (for waiting only: the
    /// readers of different members run independently).
    owned: BTreeMap<u32, (String, f64)>,
    /// Every assignment (true) and revocation or loss (false) by the members' clocks:
    /// (time, partition, member, assigned).
    events: Vec<(f64, u32, String, bool)>,
    /// (partition, offset) processed, and when first.
    seen: BTreeMap<(u32, u64), f64>,
    /// Records processed, duplicates included.
    processed: u64,
    /// Every delivery: (partition, offset, time).
    deliveries: Vec<(u32, u64, f64)>,
    /// Per member, the time of its latest assignment (one per rebalance round, even if empty).
    assigned_at: HashMap<String, f64>,
    /// Per member, when it started joining.
    joining_at: HashMap<String, f64>,
    /// Members that left the group cleanly.
    closed: BTreeSet<String>,
    /// Rebalance events: (time, member, event).
    timeline: Vec<(f64, String, String)>,
}

impl State {
    fn apply(&mut self, name: &str, event: &serde_json::Value) {
        let t = event["t"].as_f64().unwrap_or_else(now);
        if event.get("p").is_none() {
            self.timeline.push((t, name.to_string(), event.to_string()));
        }
        let list = |key: &str| -> Vec<u32> {
            event[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64())
                        .map(|v| v as u32)
                        .collect()
                })
                .unwrap_or_default()
        };
        if event.get("assigned").is_some() {
            self.assigned_at.insert(name.to_string(), t);
            for p in list("assigned") {
                self.events.push((t, p, name.to_string(), true));
                self.owned.insert(p, (name.to_string(), t));
            }
        } else if event.get("revoked").is_some() || event.get("lost").is_some() {
            let key = if event.get("revoked").is_some() {
                "revoked"
            } else {
                "lost"
            };
            for p in list(key) {
                self.end(p, name, t);
            }
        } else if let (Some(p), Some(o)) = (event["p"].as_u64(), event["o"].as_u64()) {
            self.seen.entry((p as u32, o)).or_insert(t);
            self.deliveries.push((p as u32, o, t));
            self.processed += 1;
        } else if event.get("joining").is_some() {
            self.joining_at.insert(name.to_string(), t);
        } else if event.get("closed").is_some() {
            self.closed.insert(name.to_string());
        }
    }

    /// `name`'s ownership of `p` ends at `t`.
    fn end(&mut self, p: u32, name: &str, t: f64) {
        self.events.push((t, p, name.to_string(), false));
        if self.owned.get(&p).is_some_and(|(holder, _)| holder == name) {
            self.owned.remove(&p);
        }
    }

    fn owners(&self) -> BTreeMap<String, usize> {
        let mut owners = BTreeMap::new();
        for (name, _) in self.owned.values() {
            *owners.entry(name.clone()).or_default() += 1;
        }
        owners
    }

    /// No partition owned by two members at overlapping times: every member's events replayed
    /// in time order (the readers see them in no particular order across members).
    fn check_exclusive(&self) {
        let mut events = self.events.clone();
        events.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut owner: BTreeMap<u32, &str> = BTreeMap::new();
        for (t, p, name, assigned) in &events {
            if *assigned {
                if let Some(other) = owner.get(p).filter(|o| **o != name.as_str()) {
                    panic!("partition {p} assigned to {name} at {t:.3} while {other} owned it");
                }
                owner.insert(*p, name);
            } else if owner.get(p) == Some(&name.as_str()) {
                owner.remove(p);
            }
        }
    }
}

/// Member processes of one group.
struct Members {
    bootstrap: String,
    topic: String,
    group: String,
    assignor: Option<String>,
    state: Arc<Mutex<State>>,
    children: BTreeMap<String, Child>,
}

impl Members {
    fn new(bootstrap: &str, topic: &str, group: &str, assignor: Option<&str>) -> Members {
        Members {
            bootstrap: bootstrap.to_string(),
            topic: topic.to_string(),
            group: group.to_string(),
            assignor: assignor.map(str::to_string),
            state: Arc::new(Mutex::new(State::default())),
            children: BTreeMap::new(),
        }
    }

    fn start(&mut self, name: &str) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn-group-member"));
        command
            .args([&self.bootstrap, &self.topic, &self.group, name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(assignor) = &self.assignor {
            command.env("CAIRN_GROUP_ASSIGNOR", assignor);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (state, name_owned) = (Arc::clone(&self.state), name.to_string());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                    state.lock().unwrap().apply(&name_owned, &event);
                }
            }
        });
        self.children.insert(name.to_string(), child);
    }

    /// SIGKILL: its ownerships end now (it cannot say so).
    fn kill9(&mut self, name: &str) -> (Vec<u32>, f64) {
        let mut child = self.children.remove(name).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let killed = now();
        let mut state = self.state.lock().unwrap();
        let parts: Vec<u32> = state
            .owned
            .iter()
            .filter(|(_, (n, _))| n == name)
            .map(|(p, _)| *p)
            .collect();
        // Whatever it owned (by any reader's view) ends now.
        for p in 0..PARTITIONS {
            state.end(p, name, killed);
        }
        (parts, killed)
    }

    /// Closes every member's stdin: each commits, leaves the group and exits.
    fn close_all(&mut self) {
        for (name, mut child) in std::mem::take(&mut self.children) {
            drop(child.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "member {name} exited with {status}");
                    break;
                }
                assert!(Instant::now() < deadline, "member {name} did not leave");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn wait_for(&self, timeout_s: u64, what: &str, cond: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(timeout_s);
        loop {
            {
                let state = self.state.lock().unwrap();
                if cond(&state) {
                    return;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "timed out waiting for {what}: owners {:?}, seen {}",
                        state.owners(),
                        state.seen.len(),
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A producer of keyed records at a steady pace on its own thread, until stopped; returns the
/// acknowledged (partition, offset) pairs.
struct Steady {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<BTreeSet<(u32, u64)>>,
}

impl Steady {
    fn start(bootstrap: &str, topic: &str, tag: &str) -> Steady {
        let stop = Arc::new(AtomicBool::new(false));
        let (bootstrap, topic, tag, flag) = (
            bootstrap.to_string(),
            topic.to_string(),
            tag.to_string(),
            Arc::clone(&stop),
        );
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let producer = Producer::connect(&bootstrap, ProducerConfig::default())
                    .await
                    .unwrap();
                let mut deliveries = Vec::new();
                let mut i = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    for _ in 0..50 {
                        let record = ProducerRecord::new(topic.as_str(), format!("{tag}-{i}"))
                            .key(format!("k{i}"));
                        deliveries.push(producer.send(record).await.unwrap());
                        i += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let mut acked = BTreeSet::new();
                for delivery in deliveries {
                    let metadata = delivery.await.unwrap();
                    acked.insert((metadata.partition, metadata.offset.unwrap()));
                }
                producer.close().await.unwrap();
                acked
            })
        });
        Steady { stop, thread }
    }

    fn stop(self) -> BTreeSet<(u32, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Committed offsets of `group` and the log end offsets of `topic`, by partition.
fn committed_and_ends(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> (BTreeMap<u32, u64>, BTreeMap<u32, u64>) {
    block_on(async {
        let admin = Admin::connect(bootstrap).await.unwrap();
        let committed = admin
            .committed_offsets(group)
            .await
            .unwrap()
            .into_iter()
            .filter(|(t, _, _)| t == topic)
            .map(|(_, p, o)| (p, o))
            .collect();
        let ends = admin.describe_topics(&[topic.to_string()]).await.unwrap()[0]
            .partitions
            .iter()
            .map(|p| (p.partition, p.high_watermark))
            .collect();
        (committed, ends)
    })
}

fn create_topic(bootstrap: &str, topic: &str) {
    block_on(async {
        let admin = Admin::connect(bootstrap).await.unwrap();
        admin.create_topic(topic, PARTITIONS, &[]).await.unwrap();
    });
}

/// The scenario of issue 5 with Cairn's client: three members over 12 partitions with a
/// producer running, a fourth joins (timed), one is killed with SIGKILL (its partitions move
/// within the session timeout), every record is processed at least once, no partition has two
/// owners at once, and after the members leave the committed offsets are the log ends.
fn run_scenario(assignor: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    // The three members start together: a short initial delay (default 3 s) forms the group.
    let broker = BrokerProcess::start_with_config(
        &dir.path().join("data"),
        "group_initial_rebalance_delay_ms = 1000\n",
    );
    let (topic, group) = ("events", "workers");
    create_topic(&broker.addr, topic);
    let producer = Steady::start(&broker.addr, topic, "r");
    let mut members = Members::new(&broker.addr, topic, group, assignor);
    for name in ["m1", "m2", "m3"] {
        members.start(name);
    }
    members.wait_for(60, "three members sharing 12 partitions", |s| {
        s.owned.len() == PARTITIONS as usize && s.owners().len() == 3
    });
    members.wait_for(60, "records flowing", |s| s.seen.len() > 500);

    // A fourth member joins a healthy group of three.
    members.start("m4");
    members.wait_for(30, "four members with three partitions each", |s| {
        let owners = s.owners();
        owners.len() == 4 && owners.values().all(|n| *n == 3)
    });
    let join_s = {
        let s = members.state.lock().unwrap();
        let joined = s.joining_at["m4"];
        let done = ["m1", "m2", "m3", "m4"]
            .iter()
            .map(|m| s.assigned_at[*m])
            .fold(0.0, f64::max);
        for (t, name, event) in s.timeline.iter().filter(|e| e.0 >= joined) {
            println!("  +{:.3} s {name}: {event}", t - joined);
        }
        done - joined
    };
    println!(
        "ok: a fourth member joined a group of three over {PARTITIONS} partitions in {join_s:.3} s \
         (from its JoinGroup to every member's final assignment; assignor {})",
        assignor.unwrap_or("range (default list)")
    );
    // Heartbeats are long polls: members learn of the rebalance at once, not at their next
    // 3 s heartbeat. (A correctness bound, not a speed target: the figure is printed above.)
    assert!(join_s < 3.0, "the rebalance took {join_s:.3} s");

    // SIGKILL one member: its partitions move once its session expires.
    let (victim_parts, killed) = members.kill9("m2");
    members.wait_for(30, "the killed member's partitions moving", |s| {
        victim_parts
            .iter()
            .all(|p| s.owned.get(p).is_some_and(|(n, _)| n != "m2"))
    });
    let moved = {
        let s = members.state.lock().unwrap();
        victim_parts
            .iter()
            .map(|p| s.owned[p].1)
            .fold(0.0, f64::max)
            - killed
    };
    println!(
        "ok: after kill -9 of m2, its partitions {victim_parts:?} moved in {moved:.2} s (session timeout {SESSION_S} s)"
    );
    assert!(moved < SESSION_S + 5.0, "{moved}");

    // Every acknowledged record is processed at least once.
    std::thread::sleep(Duration::from_secs(1));
    let produced = producer.stop();
    members.wait_for(60, "every produced record processed", |s| {
        produced.iter().all(|k| s.seen.contains_key(k))
    });
    {
        let s = members.state.lock().unwrap();
        s.check_exclusive();
        println!(
            "ok: {} records produced while the group changed, all processed ({} deliveries, {} again after the kill)",
            produced.len(),
            s.processed,
            s.processed - s.seen.len() as u64
        );
    }
    // Leaving commits: the group's offsets are the log ends.
    members.close_all();
    let (committed, ends) = committed_and_ends(&broker.addr, group, topic);
    assert_eq!(committed, ends, "committed offsets after the members left");
    let (_, metrics) = broker.http_get("/metrics");
    assert!(
        metrics.contains(&format!("cairn_consumergroup_lag{{group=\"{group}\"")),
        "lag metrics missing"
    );
    // Formed, a fourth joined, one died, three left: at least three completed rebalances.
    let rebalances: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cairn_consumergroup_rebalances_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        rebalances >= 3,
        "cairn_consumergroup_rebalances_total {rebalances}"
    );
}

#[test]
fn a_cairn_group_shares_partitions_takes_a_fourth_member_and_survives_a_member_kill_9() {
    run_scenario(None);
}

#[test]
fn a_cairn_cooperative_sticky_group_does_the_same() {
    run_scenario(Some("cooperative-sticky"));
}

/// Committed offsets survive SIGKILL of the broker, and running members ride over it: they
/// reconnect, rejoin, and resume from the committed offsets.
#[test]
fn committed_offsets_survive_a_broker_kill_9_and_members_resume_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let toml = "group_initial_rebalance_delay_ms = 500\n";
    let listen = free_port();
    let broker = BrokerProcess::start_at(&data, toml, &listen);
    let (topic, group) = ("ledger", "auditors");
    create_topic(&listen, topic);

    // Phase 1: two members process a first lot, then leave (committing).
    let first = Steady::start(&listen, topic, "a");
    std::thread::sleep(Duration::from_secs(2));
    let mut produced = first.stop();
    let mut members = Members::new(&listen, topic, group, None);
    members.start("m1");
    members.start("m2");
    members.wait_for(60, "the first lot processed", |s| {
        produced.iter().all(|k| s.seen.contains_key(k))
    });
    members.close_all();
    let (committed, ends) = committed_and_ends(&listen, group, topic);
    assert_eq!(committed, ends);

    // The broker dies with SIGKILL; the commits are still there after the restart.
    broker.kill9();
    let broker = BrokerProcess::start_at(&data, toml, &listen);
    let (after, _) = committed_and_ends(&listen, group, topic);
    assert_eq!(
        after, committed,
        "committed offsets lost by kill -9 of the broker"
    );
    println!(
        "ok: {} committed offsets survived kill -9 of the broker",
        after.len()
    );

    // Phase 2: members start again and resume from the committed offsets: nothing below them
    // is delivered again.
    let restarted = now();
    let second = Steady::start(&listen, topic, "b");
    members.start("m1");
    members.start("m2");
    members.wait_for(60, "records after the restart", |s| {
        s.seen.values().filter(|t| **t >= restarted).count() > 200
    });

    // Phase 3: the broker dies again under the running members (the producer stops first: only
    // acknowledged records are expected), restarts, and more records come.
    produced.extend(second.stop());
    broker.kill9();
    let killed = now();
    std::thread::sleep(Duration::from_millis(500));
    let broker = BrokerProcess::start_at(&data, toml, &listen);
    let third = Steady::start(&listen, topic, "c");
    std::thread::sleep(Duration::from_secs(2));
    produced.extend(third.stop());
    members.wait_for(90, "every record processed across two broker kills", |s| {
        produced.iter().all(|k| s.seen.contains_key(k))
    });
    let s = members.state.lock().unwrap();
    let redelivered_below_commit = s
        .deliveries
        .iter()
        .filter(|(p, o, t)| *t >= restarted && *o < committed.get(p).copied().unwrap_or(0))
        .count();
    assert_eq!(
        redelivered_below_commit, 0,
        "records below the committed offsets were delivered again"
    );
    println!(
        "ok: members rode over kill -9 of the broker ({:.1} s ago) and processed all {} records; {} deliveries in all",
        now() - killed,
        produced.len(),
        s.processed
    );
    drop(s);
    members.close_all();
    let (committed, ends) = committed_and_ends(&listen, group, topic);
    assert_eq!(committed, ends);
    drop(broker);
}

/// The `cairn` commands for groups against a broker process: `consume --group` commits what it
/// printed, `group list`, `group describe` (members, committed offsets, lag), `group
/// reset-offsets` (earliest, an offset, a time; refused while the group has members), `group
/// delete`.
#[test]
fn cairn_group_commands() {
    use crate::broker_process::{cairn, cairn_ok};
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with_config(
        &dir.path().join("data"),
        "group_initial_rebalance_delay_ms = 100\n",
    );
    let b = broker.addr.as_str();
    cairn_ok(b, &["topic", "create", "tasks", "-p", "2"], "");
    let lines: String = (0..100).map(|i| format!("k{i}:v{i}\n")).collect();
    cairn_ok(b, &["produce", "tasks", "--key-separator", ":"], &lines);
    // A member reads 30 records and leaves, committing exactly what it printed.
    let printed = cairn_ok(b, &["consume", "tasks", "--group", "g", "-n", "30"], "");
    assert_eq!(printed.lines().count(), 30);
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&cairn_ok(b, &all, "")).unwrap()
    };
    // A sum over the described partitions of one field (missing counts as 0).
    let total = |field: &str| -> u64 {
        json(&["group", "describe", "g"])["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[field].as_u64().unwrap_or(0))
            .sum()
    };
    let described = json(&["group", "describe", "g"]);
    assert_eq!((total("committed"), total("lag")), (30, 70), "{described}");
    assert_eq!(described["state"], "Empty");
    // The next member goes on where the first stopped: 70 more, no repeats.
    let rest = cairn_ok(b, &["consume", "tasks", "--group", "g", "-n", "70"], "");
    let mut all: Vec<&str> = printed.lines().chain(rest.lines()).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 100);
    let listed = json(&["group", "list"]);
    assert_eq!(listed[0]["group"], "g", "{listed}");
    // Reset: to the earliest offsets, to offset 10 of partition 0, by time, and a dry run.
    let reset = |extra: &[&str]| -> String {
        let mut args = vec!["group", "reset-offsets", "g", "--topic", "tasks"];
        args.extend_from_slice(extra);
        cairn_ok(b, &args, "")
    };
    reset(&["--to", "earliest"]);
    assert_eq!(total("lag"), 100);
    reset(&["--to", "10", "-p", "0"]);
    let partition0 = &json(&["group", "describe", "g"])["partitions"][0];
    assert_eq!(
        partition0["lag"].as_u64(),
        Some(partition0["log_end"].as_u64().unwrap() - 10)
    );
    reset(&["--to", "@0"]);
    assert_eq!(total("lag"), 100);
    let dry = reset(&["--to", "latest", "--dry-run"]);
    assert!(dry.contains("dry run"), "{dry}");
    assert_eq!(total("lag"), 100);
    // Delete; then the group is gone.
    cairn_ok(b, &["group", "delete", "g"], "");
    let gone = cairn(b, &["group", "describe", "g"], "");
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not found"));
}
