//! Fault scenarios judged by the history checker (`crates/check`, [docs/reliability.md]): a
//! 3-broker cluster (RF 3, min ISR 2), idempotent Cairn producers writing unique values with
//! acks=all and consumers reading every partition, while a nemesis injects one kind of fault
//! again and again; then the faults heal, a fresh consumer drains every partition to its high
//! watermark, and `cairn-check` must find no anomaly. Every event goes to a JSON-lines history
//! kept under `target/chaos/` with the verdict.
//!
//! Each scenario runs about `CAIRN_CHAOS_SECONDS` (default 20 in CI; `scripts/chaos.sh` runs
//! them for 70): warm-up, faults, recovery, drain. Scenarios that cut the network run the
//! brokers in network namespaces (root, `ip`, `iptables`); without them they say they skipped.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_client::{
    Consumer, ConsumerConfig, DeliveryFuture, Position, Producer, ProducerConfig, ProducerRecord,
};
use serde_json::json;

use crate::broker::runtime;
use crate::cluster::TestCluster;
use crate::netns::Netns;
use crate::replication::{create_topic, leader_and_isr, patient_producer, wait_isr};

const TOPIC: &str = "chaos";
const PARTITIONS: u32 = 3;
const PRODUCERS: u64 = 2;

/// The history, shared by every workload thread; times in ms since `origin`.
struct History {
    origin: Instant,
    lines: Mutex<Vec<String>>,
}

impl History {
    fn log(&self, mut event: serde_json::Value) {
        event["time"] = json!(self.origin.elapsed().as_secs_f64() * 1000.0);
        let line = event.to_string();
        self.lines.lock().unwrap().push(line);
    }
}

/// How long each phase lasts.
fn seconds() -> u64 {
    std::env::var("CAIRN_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
        .max(10)
}

/// A producer sending `{process}-{i}` round-robin over the partitions, up to 32 sends
/// outstanding, logging invoke and outcome.
fn produce(
    bootstrap: String,
    process: u64,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let config = ProducerConfig {
                linger: Duration::from_millis(1),
                ..patient_producer()
            };
            let producer = Producer::connect(&bootstrap, config).await.unwrap();
            let mut pending: VecDeque<(String, DeliveryFuture)> = VecDeque::new();
            let settle = |value: String, outcome| {
                let event = match outcome {
                    Ok(meta) => {
                        let meta: cairn_client::RecordMetadata = meta;
                        json!({"type": "ok", "f": "send", "process": process, "value": value,
                               "topic": TOPIC, "partition": meta.partition, "offset": meta.offset})
                    }
                    Err(err) => {
                        json!({"type": "info", "f": "send", "process": process, "value": value,
                               "error": format!("{err}")})
                    }
                };
                history.log(event);
            };
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let value = format!("{process}-{i}");
                let partition = (i % u64::from(PARTITIONS)) as u32;
                history.log(json!({"type": "invoke", "f": "send", "process": process,
                                   "value": value, "topic": TOPIC, "partition": partition}));
                let record = ProducerRecord::new(TOPIC, value.clone()).partition(partition);
                match producer.send(record).await {
                    Ok(delivery) => pending.push_back((value, delivery)),
                    Err(err) => settle(value, Err(err)),
                }
                while pending.len() >= 32 {
                    if let Some((value, delivery)) = pending.pop_front() {
                        settle(value, delivery.await);
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            while let Some((value, delivery)) = pending.pop_front() {
                settle(value, delivery.await);
            }
            let _ = producer.close().await;
        });
    })
}

/// A consumer reading every partition from the start, logging each record; after an error it
/// starts a new consumer where it left off.
fn consume(
    bootstrap: String,
    process: u64,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let mut next: Vec<u64> = vec![0; PARTITIONS as usize];
            while !stop.load(Ordering::Relaxed) {
                let connect = async {
                    let mut consumer = Consumer::connect(&bootstrap, ConsumerConfig::default())
                        .await
                        .ok()?;
                    for p in 0..PARTITIONS {
                        consumer
                            .assign(TOPIC, Some(vec![p]), Position::Offset(next[p as usize]))
                            .await
                            .ok()?;
                    }
                    Some(consumer)
                };
                let Ok(Some(mut consumer)) =
                    tokio::time::timeout(Duration::from_secs(5), connect).await
                else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    let polled = tokio::time::timeout(Duration::from_secs(5), consumer.poll());
                    let Ok(Ok(records)) = polled.await else {
                        break;
                    };
                    for record in records {
                        let value =
                            String::from_utf8_lossy(record.value.as_deref().unwrap_or_default())
                                .to_string();
                        history.log(json!({"type": "ok", "f": "poll", "process": process,
                                           "value": value, "topic": TOPIC,
                                           "partition": record.partition, "offset": record.offset}));
                        if let Some(n) = next.get_mut(record.partition as usize) {
                            *n = record.offset + 1;
                        }
                    }
                }
            }
        });
    })
}

/// A fresh consumer reads every partition from its start to its high watermark.
fn drain(bootstrap: &str, history: &History) {
    runtime().block_on(async {
        let mut consumer = Consumer::connect(bootstrap, ConsumerConfig::default())
            .await
            .unwrap();
        consumer
            .assign(TOPIC, None, Position::Earliest)
            .await
            .unwrap();
        let mut ends = Vec::new();
        for p in 0..PARTITIONS {
            ends.push(consumer.end_offset(TOPIC, p).await.unwrap());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while (0..PARTITIONS).any(|p| consumer.position(TOPIC, p).unwrap_or(0) < ends[p as usize]) {
            assert!(Instant::now() < deadline, "could not drain to {ends:?}");
            for record in consumer.poll().await.unwrap() {
                let value = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default())
                    .to_string();
                history.log(json!({"type": "ok", "f": "drain", "process": "drain",
                                   "value": value, "topic": TOPIC,
                                   "partition": record.partition, "offset": record.offset}));
            }
        }
    });
}

/// What a scenario does to the cluster, round after round.
#[derive(Clone, Copy, Debug)]
enum Nemesis {
    /// kill -9 the leader of partition 0, restart it after a second.
    KillLeader,
    /// SIGSTOP the leader of partition 0 past its session, then SIGCONT.
    PauseLeader,
    /// Cut the leader of partition 0 off from every other node (both directions), then heal.
    IsolateLeader,
    /// kill -9 a follower of partition 0, restart it after a second.
    KillFollower,
}

impl Nemesis {
    fn name(self) -> &'static str {
        match self {
            Nemesis::KillLeader => "kill-leader",
            Nemesis::PauseLeader => "pause-leader",
            Nemesis::IsolateLeader => "isolate-leader",
            Nemesis::KillFollower => "kill-follower",
        }
    }

    fn needs_netns(self) -> bool {
        matches!(self, Nemesis::IsolateLeader)
    }
}

/// Runs one scenario and checks its history.
fn run(nemesis: Nemesis) {
    let netns = if nemesis.needs_netns() {
        match Netns::create(3) {
            Ok(netns) => {
                netns.enter_client();
                Some(netns)
            }
            Err(why) => {
                println!(
                    "SKIPPED {}: network namespaces are not available ({why})",
                    nemesis.name()
                );
                return;
            }
        }
    } else {
        None
    };
    let total = seconds();
    let toml = "broker_session_timeout_ms = 3000\nbroker_heartbeat_interval_ms = 500\nreplica_lag_time_max_ms = 3000\n";
    let roles = [crate::cluster::Roles::Combined; 3];
    let mut cluster = TestCluster::start_roles_in(netns.as_ref(), &roles, toml);
    let rt = runtime();
    create_topic(&cluster, &rt, TOPIC, PARTITIONS);
    let bootstrap = cluster.bootstrap_except(None);
    wait_isr(&bootstrap, &rt, TOPIC, 3);
    let history = Arc::new(History {
        origin: Instant::now(),
        lines: Mutex::new(Vec::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for p in 1..=PRODUCERS {
        workers.push(produce(
            bootstrap.clone(),
            p,
            Arc::clone(&history),
            Arc::clone(&stop),
        ));
    }
    workers.push(consume(
        bootstrap.clone(),
        100,
        Arc::clone(&history),
        Arc::clone(&stop),
    ));

    // Warm-up, then faults for about half the time, then recovery.
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(total / 5));
    let faults_until = started + Duration::from_secs(total * 7 / 10);
    let mut rounds = 0;
    while Instant::now() < faults_until {
        let (leader, _) = rt.block_on(leader_and_isr(&cluster, TOPIC));
        let Some(leader) = leader else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let target = match nemesis {
            Nemesis::KillFollower => (1..=3).find(|n| *n != leader).unwrap_or(leader),
            _ => leader,
        };
        let what = format!("{} node {target}", nemesis.name());
        history.log(json!({"type": "info", "f": "fault", "value": what}));
        match nemesis {
            Nemesis::KillLeader | Nemesis::KillFollower => {
                cluster.kill9(target);
                std::thread::sleep(Duration::from_secs(1));
                cluster.start_node(target);
                cluster.wait_ready(target);
            }
            Nemesis::PauseLeader => {
                cluster.process(leader).signal("STOP");
                std::thread::sleep(Duration::from_secs(4));
                cluster.process(leader).signal("CONT");
            }
            Nemesis::IsolateLeader => {
                let netns = netns.as_ref().unwrap();
                for other in (1..=3).filter(|n| *n != leader) {
                    netns.cut(leader, other);
                }
                std::thread::sleep(Duration::from_secs(5));
                netns.heal(leader);
            }
        }
        history.log(json!({"type": "info", "f": "heal", "value": what}));
        rounds += 1;
        // Let the cluster settle before the next round.
        std::thread::sleep(Duration::from_secs(2));
    }
    let recover_until = started + Duration::from_secs(total);
    std::thread::sleep(recover_until.saturating_duration_since(Instant::now()));
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }
    wait_isr(&bootstrap, &rt, TOPIC, 3);
    drain(&bootstrap, &history);

    let lines = std::mem::take(&mut *history.lines.lock().unwrap());
    let text = lines.join("\n") + "\n";
    let verdict = cairn_check::check_reader(text.as_bytes()).unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos");
    std::fs::create_dir_all(&dir).unwrap();
    let history_path = dir.join(format!("{}.jsonl", nemesis.name()));
    std::fs::write(&history_path, &text).unwrap();
    let verdict_text = serde_json::to_string_pretty(&verdict).unwrap();
    let mut file =
        std::fs::File::create(dir.join(format!("{}.verdict.json", nemesis.name()))).unwrap();
    file.write_all(verdict_text.as_bytes()).unwrap();
    let s = &verdict.stats;
    let a = &verdict.availability;
    println!(
        "{}: {rounds} faults in {total} s; {} sends, {} acknowledged, {} unknown, {} failed; {} \
         polled, {} drained; recovery after a fault p50 {:?} ms, p99 {:?} ms, max {:?} ms; \
         anomalies: {}; history {}",
        nemesis.name(),
        s.sends,
        s.acknowledged,
        s.unknown,
        s.failed,
        s.polled,
        s.drained,
        a.recovery_p50_ms.map(|v| v.round()),
        a.recovery_p99_ms.map(|v| v.round()),
        a.recovery_max_ms.map(|v| v.round()),
        if verdict.valid {
            "none".to_string()
        } else {
            serde_json::to_string(&verdict.anomalies).unwrap()
        },
        history_path.display()
    );
    assert!(rounds > 0, "no fault was injected");
    assert!(s.acknowledged > 0 && s.drained > 0);
    assert!(verdict.valid, "{verdict_text}");
}

#[test]
fn chaos_kill_leader() {
    run(Nemesis::KillLeader);
}

#[test]
fn chaos_kill_follower() {
    run(Nemesis::KillFollower);
}

#[test]
fn chaos_pause_leader() {
    run(Nemesis::PauseLeader);
}

#[test]
fn chaos_isolate_leader() {
    run(Nemesis::IsolateLeader);
}
