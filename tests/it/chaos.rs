//! Fault scenarios judged by the history checker (`crates/check`, [docs/reliability.md]): a
//! 3-broker cluster (RF 3, min ISR 2), idempotent Cairn producers writing unique values with
//! acks=all and consumers reading every partition, while a nemesis injects one kind of fault
//! again and again; then the faults heal, a fresh consumer drains every partition to its high
//! watermark, and `cairn-check` must find no anomaly. Every event goes to a JSON-lines history
//! kept under `target/chaos/` with the verdict.
//!
//! The workload is Cairn's client, or with `CAIRN_CHAOS_CLIENT=confluent` (and in the
//! `chaos_confluent_*` tests) confluent-kafka's: `tests/kafka/chaos.py`, an idempotent producer
//! and a consumer group of two members that commit, writing their own history on the same clock
//! (CLOCK_MONOTONIC), merged with the harness's.
//!
//! Each scenario runs about `CAIRN_CHAOS_SECONDS` (default 20 in CI; `scripts/chaos.sh` runs
//! them for 70): warm-up, faults, recovery, drain. Scenarios that cut the network run the
//! brokers in network namespaces (root, `ip`, `iptables`); without them they say they skipped.
//! The proxy scenarios (`slow-leader`, `proxy-*`) put a fault-injecting TCP proxy in front of each
//! broker instead and run anywhere; `disk-full` needs root for its tmpfs mounts.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_client::{Consumer, ConsumerConfig, Position, Producer, ProducerConfig, ProducerRecord};
use serde_json::json;

use crate::broker::runtime;
use crate::cluster::TestCluster;
use crate::netns::Netns;
use crate::replication::{leader_and_isr, patient_producer, wait_isr};

const TOPIC: &str = "chaos";
const PARTITIONS: u32 = 3;
const PRODUCERS: u64 = 2;

/// The history, shared by every workload thread; times in ms since `origin` (CLOCK_MONOTONIC,
/// the clock a workload in another process logs with too).
struct History {
    origin_ns: i128,
    lines: Mutex<Vec<String>>,
}

fn monotonic_ns() -> i128 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec)
}

impl History {
    fn new() -> History {
        History {
            origin_ns: monotonic_ns(),
            lines: Mutex::new(Vec::new()),
        }
    }

    fn log(&self, mut event: serde_json::Value) {
        event["time"] = json!((monotonic_ns() - self.origin_ns) as f64 / 1e6);
        let line = event.to_string();
        self.lines.lock().unwrap().push(line);
    }

    /// Adds another process's history (JSON lines on the same clock) and orders everything by
    /// time (stable: one process's events keep their order).
    fn merge(&self, other: &str) {
        let mut lines = self.lines.lock().unwrap();
        lines.extend(
            other
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
        let time = |line: &String| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["time"].as_f64())
                .unwrap_or(0.0)
        };
        let mut timed: Vec<(f64, String)> = lines.drain(..).map(|l| (time(&l), l)).collect();
        timed.sort_by(|a, b| a.0.total_cmp(&b.0));
        lines.extend(timed.into_iter().map(|(_, l)| l));
    }
}

/// Who produces and consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    /// Two idempotent Cairn producers and a Cairn consumer reading every partition.
    Cairn,
    /// `tests/kafka/chaos.py`: librdkafka's idempotent producer and a group of two consumers
    /// that commit.
    Confluent,
}

impl Client {
    /// The default workload: Cairn's, unless `CAIRN_CHAOS_CLIENT=confluent`.
    fn from_env() -> Client {
        match std::env::var("CAIRN_CHAOS_CLIENT").as_deref() {
            Ok("confluent") => Client::Confluent,
            _ => Client::Cairn,
        }
    }
}

/// The confluent-kafka workload, a child process writing its own history until `stop` exists.
struct ConfluentWorkload {
    child: std::process::Child,
    history: tempfile::NamedTempFile,
    stop: std::path::PathBuf,
    /// Holds the stop file and the workload's output.
    dir: tempfile::TempDir,
}

impl ConfluentWorkload {
    fn start(kafka_bootstrap: &str, history: &History) -> ConfluentWorkload {
        let dir = tempfile::tempdir().unwrap();
        let stop = dir.path().join("stop");
        let file = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        let (partitions, origin) = (PARTITIONS.to_string(), history.origin_ns.to_string());
        let args: Vec<&std::ffi::OsStr> = [
            "--bootstrap",
            kafka_bootstrap,
            "--topic",
            TOPIC,
            "--partitions",
            &partitions,
            "--group",
            "chaos-group",
            "--origin-ns",
            &origin,
            "--history",
        ]
        .into_iter()
        .map(std::ffi::OsStr::new)
        .chain([file.path().as_os_str(), "--stop".as_ref(), stop.as_os_str()])
        .collect();
        let child = crate::kafka::spawn_workload("chaos.py", &args, dir.path());
        ConfluentWorkload {
            child,
            history: file,
            stop,
            dir,
        }
    }

    /// Stops it (it flushes what it holds and reads its group's committed offsets) and merges
    /// its history.
    fn finish(self, history: &History) {
        std::fs::write(&self.stop, b"").unwrap();
        let (status, stdout, stderr) = crate::kafka::finish_workload(self.child, self.dir.path());
        assert!(status.success(), "chaos.py failed\n{stdout}\n{stderr}");
        // Its report: how long the consumers took to receive every acknowledged value.
        print!("{stdout}");
        history.merge(&std::fs::read_to_string(self.history.path()).unwrap());
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
/// outstanding, logging invoke and, the moment each resolves, its outcome (a send blocked on one
/// partition does not hold up the others' acknowledgements).
fn produce(
    bootstrap: String,
    process: u64,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    settle_within: Duration,
) -> std::thread::JoinHandle<u64> {
    const OUTSTANDING: u32 = 32;
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let config = ProducerConfig {
                linger: Duration::from_millis(1),
                ..patient_producer()
            };
            let producer = Producer::connect(&bootstrap, config).await.unwrap();
            let outstanding = Arc::new(tokio::sync::Semaphore::new(OUTSTANDING as usize));
            let settle = move |history: &History, value: String, outcome| {
                let event = match outcome {
                    Ok(meta) => {
                        let meta: cairn_client::RecordMetadata = meta;
                        json!({"type": "ok", "f": "send", "process": process, "value": value,
                               "topic": TOPIC, "partition": meta.partition, "offset": meta.offset})
                    }
                    Err(err) => {
                        let err: cairn_client::ClientError = err;
                        json!({"type": "info", "f": "send", "process": process, "value": value,
                               "error": format!("{err}")})
                    }
                };
                history.log(event);
            };
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A cluster that stopped acknowledging (a broken one's livelock) holds every
                // permit: the wait for one ends with the run.
                let permit = loop {
                    let acquire = Arc::clone(&outstanding).acquire_owned();
                    match tokio::time::timeout(Duration::from_millis(100), acquire).await {
                        Ok(permit) => break Some(permit.unwrap()),
                        Err(_) if stop.load(Ordering::Relaxed) => break None,
                        Err(_) => {}
                    }
                };
                let Some(permit) = permit else { break };
                let value = format!("{process}-{i}");
                let partition = (i % u64::from(PARTITIONS)) as u32;
                history.log(json!({"type": "invoke", "f": "send", "process": process,
                                   "value": value, "topic": TOPIC, "partition": partition}));
                let record = ProducerRecord::new(TOPIC, value.clone()).partition(partition);
                match producer.send(record).await {
                    Ok(delivery) => {
                        let history = Arc::clone(&history);
                        tokio::spawn(async move {
                            settle(&history, value, delivery.await);
                            drop(permit);
                        });
                    }
                    Err(err) => settle(&history, value, Err(err)),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // Every send settles before the history is judged, within `settle_within` of the
            // faults healing (a send still open then stays unknown in the history: a sound cluster's
            // run asserts there is none, a broken one's may have them).
            let settled = outstanding.acquire_many(OUTSTANDING);
            let unresolved = match tokio::time::timeout(settle_within, settled).await {
                Ok(_) => 0,
                Err(_) => u64::from(OUTSTANDING) - outstanding.available_permits() as u64,
            };
            if unresolved > 0 {
                println!(
                    "producer {process}: {unresolved} sends unresolved {settle_within:?} after the faults"
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), producer.close()).await;
            unresolved
        })
    })
}

/// A consumer reading every partition from the start, logging each record; after an error it
/// starts a new consumer where it left off.
fn consume(
    bootstrap: String,
    process: u64,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
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
                            value_of(&record);
                        history.log(json!({"type": "ok", "f": "poll", "process": process,
                                           "value": value, "topic": TOPIC,
                                           "partition": record.partition, "offset": record.offset}));
                        if let Some(n) = next.get_mut(record.partition as usize) {
                            *n = record.offset + 1;
                        }
                    }
                }
            }
            0 // nothing left unresolved: a consumer's reads are logged as they come
        })
    })
}

/// A record's value as the history logs it.
fn value_of(record: &cairn_client::ConsumerRecord) -> String {
    String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned()
}

/// A fresh consumer reads every partition from its start to its high watermark (`strict`: it
/// must get there within a minute; otherwise, a broken cluster's run, it keeps what it read).
fn drain(bootstrap: &str, history: &History, strict: bool) {
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
        // A broken cluster's drain gets less time: it may never get there.
        let deadline = Instant::now() + Duration::from_secs(if strict { 60 } else { 20 });
        while (0..PARTITIONS).any(|p| consumer.position(TOPIC, p).unwrap_or(0) < ends[p as usize]) {
            if Instant::now() >= deadline {
                assert!(!strict, "could not drain to {ends:?}");
                println!("drained short of {ends:?}: a broken cluster's partitions stalled");
                return;
            }
            let polled = tokio::time::timeout(Duration::from_secs(5), consumer.poll()).await;
            let Ok(polled) = polled else { continue };
            let records = match polled {
                Ok(records) => records,
                Err(err) if !strict => {
                    println!("drain: {err}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(err) => panic!("drain: {err}"),
            };
            for record in records {
                let value = value_of(&record);
                history.log(json!({"type": "ok", "f": "drain", "process": "drain",
                                   "value": value, "topic": TOPIC,
                                   "partition": record.partition, "offset": record.offset}));
            }
        }
    });
}

/// A size-limited tmpfs mounted on a broker's data directory (root only): a real full disk.
pub(crate) struct Tmpfs {
    dir: std::path::PathBuf,
}

impl Tmpfs {
    const FILL: &str = "chaos-fill";

    pub(crate) fn mount(dir: &std::path::Path, bytes: u64) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// Takes all but `leave` bytes of what is available with a file of reserved blocks.
    pub(crate) fn fill_to(&self, leave: u64) {
        let stat = rustix::fs::statvfs(&self.dir).unwrap();
        let available = stat.f_bavail * stat.f_frsize;
        let file = std::fs::File::create(self.dir.join(Self::FILL)).unwrap();
        // The file system may keep a little for itself: the largest allocation it grants.
        let mut len = available.saturating_sub(leave);
        while let Err(err) =
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len)
        {
            assert!(len > 0, "cannot fill {}: {err}", self.dir.display());
            len = len.saturating_sub(4096);
        }
    }

    pub(crate) fn free(&self) {
        std::fs::remove_file(self.dir.join(Self::FILL)).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the broker may still hold files open until the cluster is dropped.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// What a scenario does to the cluster, round after round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nemesis {
    /// kill -9 the leader of partition 0, restart it after a second.
    KillLeader,
    /// Stop the leader of partition 0 cleanly (SIGTERM: controlled shutdown moves its
    /// leaderships first), start it again after a second.
    RestartLeader,
    /// SIGSTOP the leader of partition 0 past its session, then SIGCONT.
    PauseLeader,
    /// Cut the leader of partition 0 off from every other node (both directions), then heal.
    IsolateLeader,
    /// kill -9 a follower of partition 0, restart it after a second.
    KillFollower,
    /// The leader of partition 0 can no longer send to the other brokers (they still hear it)
    /// for 5 s.
    OneWayLeader,
    /// The leader of partition 0 and one follower cut from each other for 5 s, both still
    /// reaching the third broker (a bridge).
    Bridge,
    /// 30% of the packets between brokers dropped, on every link, for 8 s.
    Loss,
    /// kill -9 the active controller (a broker too), restart it after a second.
    KillController,
    /// kill -9 every broker at once, restart them all after a second.
    KillAll,
    /// Cut a follower of partition 0 off from every other node for 5 s.
    IsolateFollower,
    /// Cut the active controller (a broker too) off from every other node for 5 s.
    IsolateController,
    /// Add a fourth broker, then again and again move partition 0's replicas: the broker not
    /// holding one gets a replica, the leader's is removed (KIP-455 reassignment under load).
    MovePartition,
    /// Fill the leader's disk (each broker's data directory is a 512 MiB tmpfs) to below its
    /// `storage_min_free_bytes` (32 MiB) for 5 s, then free the space.
    DiskFull,
    /// Through fault-injecting proxies (no root needed): 100 ms more each way on every byte to
    /// and from the leader of partition 0 (clients' and followers') for 8 s.
    SlowLeader,
    /// Through the proxies: every connection to the leader of partition 0 reset and new ones
    /// refused for 5 s (clients and followers cannot reach it; the controller still can).
    ProxyDropLeader,
    /// Through the proxies: the leader of partition 0's answers held for 5 s (requests still
    /// arrive: it appends, but neither followers nor producers hear back), then delivered.
    ProxyHoldLeaderAnswers,
    /// kill -9 a follower of partition 0; 2 s later the leader and the other follower; restart
    /// the stale follower alone for 3 s (only an unclean election could make it lead), then the
    /// other two. Runs with a dedicated controller, so the quorum survives.
    Cascade,
}

impl Nemesis {
    fn name(self) -> &'static str {
        match self {
            Nemesis::KillLeader => "kill-leader",
            Nemesis::RestartLeader => "restart-leader",
            Nemesis::PauseLeader => "pause-leader",
            Nemesis::IsolateLeader => "isolate-leader",
            Nemesis::KillFollower => "kill-follower",
            Nemesis::Cascade => "cascade",
            Nemesis::OneWayLeader => "one-way-leader",
            Nemesis::Bridge => "bridge",
            Nemesis::Loss => "loss",
            Nemesis::KillController => "kill-controller",
            Nemesis::KillAll => "kill-all",
            Nemesis::IsolateFollower => "isolate-follower",
            Nemesis::IsolateController => "isolate-controller",
            Nemesis::MovePartition => "move-partition",
            Nemesis::DiskFull => "disk-full",
            Nemesis::SlowLeader => "slow-leader",
            Nemesis::ProxyDropLeader => "proxy-drop-leader",
            Nemesis::ProxyHoldLeaderAnswers => "proxy-hold-leader-answers",
        }
    }

    /// Whether the scenario needs a controller of its own (it kills most brokers at once).
    fn dedicated_controller(self) -> bool {
        matches!(self, Nemesis::Cascade)
    }

    /// Whether the brokers are reached through fault-injecting proxies.
    fn proxied(self) -> bool {
        matches!(
            self,
            Nemesis::SlowLeader | Nemesis::ProxyDropLeader | Nemesis::ProxyHoldLeaderAnswers
        )
    }

    fn needs_netns(self) -> bool {
        matches!(
            self,
            Nemesis::IsolateLeader
                | Nemesis::IsolateFollower
                | Nemesis::IsolateController
                | Nemesis::OneWayLeader
                | Nemesis::Bridge
                | Nemesis::Loss
        )
    }
}

/// Runs one scenario with the default workload and requires a clean verdict.
fn run(nemesis: Nemesis) {
    run_with(nemesis, Client::from_env());
}

/// Runs one scenario with `client`'s workload and requires a clean verdict.
fn run_with(nemesis: Nemesis, client: Client) {
    let Some(verdict) = run_scenario(nemesis, client, None, "", &[]) else {
        return;
    };
    assert!(
        verdict.valid,
        "{}",
        serde_json::to_string_pretty(&verdict).unwrap()
    );
}

/// Runs one scenario with a broken safety rule (`control`, a broker setting of test builds):
/// the checker must find `expected`, or the harness could not tell a broken broker from a
/// sound one. A fault does not always hit the broken rule's window (a kill between a batch's
/// append and its acknowledgement, say): up to three runs, the first red one ends it. A sound
/// broker is never red, so retrying cannot hide a defect.
fn run_control(
    nemesis: Nemesis,
    control: &str,
    toml: &str,
    configs: &[(&str, &str)],
    expected: &str,
) {
    let toml = format!("{toml}negative_control = \"{control}\"\n");
    // A broken rule shows in most runs, not all (and this one can livelock a run: see
    // reliability.md), so a control gets up to five.
    for attempt in 1..=CONTROL_RUNS {
        let Some(verdict) = run_scenario(nemesis, Client::Cairn, Some(control), &toml, configs)
        else {
            return;
        };
        let found = verdict.anomalies.get(expected).copied().unwrap_or(0);
        if found > 0 {
            println!(
                "negative control {control} turned the {} scenario red (run {attempt}): {found} \
                 {expected}",
                nemesis.name()
            );
            return;
        }
        println!(
            "negative control {control}: run {attempt} found no {expected}: {}",
            serde_json::to_string(&verdict.anomalies).unwrap()
        );
    }
    panic!(
        "negative control {control}: {CONTROL_RUNS} runs and the checker never found {expected}"
    );
}

/// Runs a negative control gets to turn its scenario red.
const CONTROL_RUNS: u32 = 5;

/// Runs one scenario and checks its history: the verdict (`None`: skipped, the scenario needs
/// network namespaces and this machine has none).
fn run_scenario(
    nemesis: Nemesis,
    client: Client,
    control: Option<&str>,
    extra_toml: &str,
    configs: &[(&str, &str)],
) -> Option<cairn_check::Verdict> {
    let netns = if nemesis.needs_netns() {
        match Netns::create(if nemesis.dedicated_controller() { 4 } else { 3 }) {
            Ok(netns) => {
                netns.enter_client();
                Some(netns)
            }
            Err(why) => {
                println!(
                    "SKIPPED {}: network namespaces are not available ({why}); run as root with \
                     ip and iptables (scripts/test.sh installs them)",
                    nemesis.name()
                );
                return None;
            }
        }
    } else {
        None
    };
    let total = seconds();
    let toml = format!(
        "broker_session_timeout_ms = 3000\nbroker_heartbeat_interval_ms = 500\n{}",
        if extra_toml.contains("replica_lag_time_max_ms") {
            extra_toml.to_string()
        } else {
            format!("replica_lag_time_max_ms = 3000\n{extra_toml}")
        }
    );
    use crate::cluster::Roles;
    let (roles, brokers): (Vec<Roles>, Vec<u32>) = if nemesis.dedicated_controller() {
        (
            vec![
                Roles::Controller,
                Roles::Broker,
                Roles::Broker,
                Roles::Broker,
            ],
            vec![2, 3, 4],
        )
    } else if nemesis == Nemesis::MovePartition {
        // The fourth broker joins at the first round.
        let mut roles = vec![Roles::Combined; 3];
        roles.push(Roles::Broker);
        (roles, vec![1, 2, 3, 4])
    } else {
        (vec![Roles::Combined; 3], vec![1, 2, 3])
    };
    let toml = if nemesis == Nemesis::DiskFull {
        format!("{toml}storage_min_free_bytes = {}\n", 32 << 20)
    } else {
        toml
    };
    let mut cluster = TestCluster::plan(netns.as_ref(), &roles, &toml);
    if nemesis.proxied() {
        cluster.proxy_all();
    }
    // Each broker's data directory on a file system of its own, for disk-full (declared after
    // the cluster: unmounted before its directories are removed).
    let mut disks = Vec::new();
    if nemesis == Nemesis::DiskFull {
        for &id in &brokers {
            match Tmpfs::mount(&cluster.node(id).dir, 512 << 20) {
                Ok(disk) => disks.push(disk),
                Err(why) => {
                    println!("SKIPPED disk-full: cannot mount a tmpfs ({why}); run as root");
                    return None;
                }
            }
        }
    }
    // move-partition adds its fourth broker later; every other scenario starts them all.
    let running = if nemesis == Nemesis::MovePartition {
        3
    } else {
        roles.len() as u32
    };
    cluster.start_planned(running);
    let rt = runtime();
    rt.block_on(async {
        let admin = cairn_client::Admin::connect(&cluster.bootstrap_except(None))
            .await
            .unwrap();
        let configs: Vec<(String, String)> = configs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        admin
            .create_topic_replicated(TOPIC, PARTITIONS, Some(3), &configs)
            .await
            .unwrap();
    });
    let bootstrap = cluster.bootstrap_except(None);
    wait_isr(&bootstrap, &rt, TOPIC, 3);
    let history = Arc::new(History::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let mut confluent = None;
    match client {
        Client::Cairn => {
            for p in 1..=PRODUCERS {
                // A broken cluster (a negative control) may never settle: less time.
                let settle_within = Duration::from_secs(if control.is_none() { 60 } else { 15 });
                workers.push(produce(
                    bootstrap.clone(),
                    p,
                    Arc::clone(&history),
                    Arc::clone(&stop),
                    settle_within,
                ));
            }
            workers.push(consume(
                bootstrap.clone(),
                100,
                Arc::clone(&history),
                Arc::clone(&stop),
            ));
        }
        Client::Confluent => {
            let kafka: Vec<String> = brokers
                .iter()
                .map(|&n| cluster.node(n).kafka.clone())
                .collect();
            confluent = Some(ConfluentWorkload::start(&kafka.join(","), &history));
        }
    }

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
            Nemesis::KillController | Nemesis::IsolateController => rt.block_on(async {
                let admin = cairn_client::Admin::connect(&cluster.bootstrap_except(None))
                    .await
                    .unwrap();
                crate::cluster::active_controller(&admin).await
            }),
            Nemesis::KillFollower
            | Nemesis::IsolateFollower
            | Nemesis::Cascade
            | Nemesis::Bridge => brokers
                .iter()
                .copied()
                .find(|n| *n != leader)
                .unwrap_or(leader),
            _ => leader,
        };
        let what = format!("{} node {target}", nemesis.name());
        // Logged once the fault is in effect (rules installed, process killed or stopped): the
        // recovery time runs from there.
        let in_effect = || {
            history.log(
                json!({"type": "info", "f": "fault", "value": what, "topic": TOPIC,
                               "partition": 0}),
            );
        };
        match nemesis {
            Nemesis::OneWayLeader => {
                let netns = netns.as_ref().unwrap();
                for other in brokers.iter().copied().filter(|n| *n != leader) {
                    netns.cut_one_way(leader, other);
                }
                in_effect();
                std::thread::sleep(Duration::from_secs(5));
                netns.heal(leader);
            }
            Nemesis::Bridge => {
                let netns = netns.as_ref().unwrap();
                netns.cut(leader, target);
                netns.cut(target, leader);
                in_effect();
                std::thread::sleep(Duration::from_secs(5));
                netns.heal(leader);
                netns.heal(target);
            }
            Nemesis::Loss => {
                let netns = netns.as_ref().unwrap();
                for &id in &brokers {
                    netns.lossy(id, 0.3);
                }
                in_effect();
                std::thread::sleep(Duration::from_secs(8));
                for &id in &brokers {
                    netns.heal(id);
                }
            }
            Nemesis::RestartLeader => {
                cluster.stop(target);
                in_effect();
                std::thread::sleep(Duration::from_secs(1));
                cluster.start_node(target);
                cluster.wait_ready(target);
            }
            Nemesis::KillLeader | Nemesis::KillFollower | Nemesis::KillController => {
                cluster.kill9(target);
                in_effect();
                std::thread::sleep(Duration::from_secs(1));
                cluster.start_node(target);
                cluster.wait_ready(target);
            }
            Nemesis::KillAll => {
                for &id in &brokers {
                    cluster.kill9(id);
                }
                in_effect();
                std::thread::sleep(Duration::from_secs(1));
                for &id in &brokers {
                    cluster.start_node(id);
                }
                for &id in &brokers {
                    cluster.wait_ready(id);
                }
            }
            Nemesis::Cascade => {
                let other = brokers
                    .iter()
                    .copied()
                    .find(|n| *n != leader && *n != target)
                    .unwrap_or(leader);
                cluster.kill9(target);
                std::thread::sleep(Duration::from_secs(2));
                cluster.kill9(leader);
                cluster.kill9(other);
                in_effect();
                std::thread::sleep(Duration::from_millis(500));
                cluster.start_node(target);
                cluster.wait_ready(target);
                std::thread::sleep(Duration::from_secs(3));
                cluster.start_node(leader);
                cluster.start_node(other);
                cluster.wait_ready(leader);
                cluster.wait_ready(other);
            }
            Nemesis::PauseLeader => {
                cluster.process(leader).signal("STOP");
                in_effect();
                std::thread::sleep(Duration::from_secs(4));
                cluster.process(leader).signal("CONT");
            }
            Nemesis::IsolateLeader | Nemesis::IsolateFollower | Nemesis::IsolateController => {
                let netns = netns.as_ref().unwrap();
                for other in (1..=roles.len() as u32).filter(|n| *n != target) {
                    netns.cut(target, other);
                }
                in_effect();
                std::thread::sleep(Duration::from_secs(5));
                netns.heal(target);
            }
            Nemesis::SlowLeader | Nemesis::ProxyDropLeader | Nemesis::ProxyHoldLeaderAnswers => {
                use crate::proxy::Mode;
                let (mode, window) = match nemesis {
                    Nemesis::SlowLeader => (Mode::Delay(Duration::from_millis(100)), 8),
                    Nemesis::ProxyDropLeader => (Mode::Drop, 5),
                    _ => (Mode::HoldOutbound, 5),
                };
                cluster.proxy_fault(leader, mode);
                in_effect();
                std::thread::sleep(Duration::from_secs(window));
                cluster.proxy_fault(leader, Mode::Pass);
            }
            Nemesis::DiskFull => {
                let disk = disks
                    .iter()
                    .find(|d| d.dir == cluster.node(leader).dir)
                    .unwrap();
                disk.fill_to(16 << 20);
                // In effect once the broker has looked at its disk again (every 100 ms).
                std::thread::sleep(Duration::from_millis(200));
                in_effect();
                std::thread::sleep(Duration::from_secs(5));
                disk.free();
            }
            Nemesis::MovePartition => {
                let all = cluster.bootstrap_except(None);
                if !cluster.running(4) {
                    cluster.start_node(4);
                    cluster.wait_ready(4);
                }
                let replicas = rt.block_on(async {
                    let admin = cairn_client::Admin::connect(&all).await.unwrap();
                    let metadata = admin.metadata(&[TOPIC.to_string()]).await.unwrap();
                    metadata.topics[0].partitions[0].replicas.clone()
                });
                let spare = brokers.iter().copied().find(|n| !replicas.contains(n));
                let target: Vec<u32> = replicas
                    .iter()
                    .map(|&r| if r == leader { spare.unwrap_or(r) } else { r })
                    .collect();
                let results = rt.block_on(async {
                    let admin = cairn_client::Admin::connect(&all).await.unwrap();
                    admin
                        .reassign(&[(TOPIC.to_string(), 0, Some(target.clone()))])
                        .await
                        .unwrap()
                });
                assert_eq!(
                    results[0].2,
                    cairn_protocol::native::ErrorCode::NONE,
                    "{replicas:?} -> {target:?}: {results:?}"
                );
                in_effect();
                crate::replication::wait_replicas(&all, &rt, TOPIC, &target);
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
    let unresolved: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    if let Some(confluent) = confluent {
        confluent.finish(&history);
    }
    // A sound cluster heals: every replica back in sync. One with a broken rule may not (its
    // replicas disagree); its drain reads what the leader serves.
    if control.is_none() {
        wait_isr(&bootstrap, &rt, TOPIC, 3);
    } else {
        std::thread::sleep(Duration::from_secs(3));
    }
    drain(&bootstrap, &history, control.is_none());

    let lines = std::mem::take(&mut *history.lines.lock().unwrap());
    let text = lines.join("\n") + "\n";
    let verdict = cairn_check::check_reader(text.as_bytes()).unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos");
    std::fs::create_dir_all(&dir).unwrap();
    let mut name = match control {
        Some(control) => format!("{}-{control}", nemesis.name()),
        None => nemesis.name().to_string(),
    };
    if client == Client::Confluent {
        name.push_str("-confluent");
    }
    let history_path = dir.join(format!("{name}.jsonl"));
    std::fs::write(&history_path, &text).unwrap();
    let verdict_text = serde_json::to_string_pretty(&verdict).unwrap();
    let mut file = std::fs::File::create(dir.join(format!("{name}.verdict.json"))).unwrap();
    file.write_all(verdict_text.as_bytes()).unwrap();
    let s = &verdict.stats;
    let a = &verdict.availability;
    println!(
        "{name}: {rounds} faults in {total} s; {} sends, {} acknowledged, {} unknown, {} failed; {} \
         polled, {} drained, {} commits; recovery after a fault p50 {:?} ms, p99 {:?} ms, max {:?} ms; \
         anomalies: {}; history {}",
        s.sends,
        s.acknowledged,
        s.unknown,
        s.failed,
        s.polled,
        s.drained,
        s.commits,
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
    if control.is_none() {
        // Once healed, every send resolves (acknowledged, failed, or known to be unknown).
        assert_eq!(
            unresolved, 0,
            "sends never resolved after the faults healed"
        );
    }
    if control.is_none() && nemesis == Nemesis::MovePartition {
        // Moving a replica is an operator's routine, not a failure: writes go on at once. (A
        // produce the old leader held when its replica left waited out librdkafka's 30 s request
        // timeout until a broker woke such waiters on removal.)
        let slowest = a.recovery_max_ms.unwrap_or(0.0);
        assert!(
            slowest < 5_000.0,
            "a write waited {slowest} ms after a replica move"
        );
    }
    if control.is_none() {
        // The consumers keep up through every fault (a consumer that stops fetching is no
        // anomaly of the history, but it is a broken client: seen once after every broker was
        // killed at once). The confluent consumers get up to chaos.py's CATCH_UP_S after the
        // producer stops (librdkafka's fetcher can lose a partition for seconds when its leader
        // moves, until a metadata refresh; see docs/reliability.md); Cairn's read until the end.
        assert!(
            s.polled * 10 >= s.drained * 9,
            "the consumers fell behind: {} records polled, {} in the final read",
            s.polled,
            s.drained
        );
    }
    assert!(s.acknowledged > 0 && s.drained > 0);
    if client == Client::Confluent {
        assert!(s.commits > 0, "the group committed nothing");
    }
    Some(verdict)
}

#[test]
fn chaos_kill_leader() {
    run(Nemesis::KillLeader);
}

#[test]
fn chaos_restart_leader() {
    run(Nemesis::RestartLeader);
}

#[test]
fn chaos_kill_follower() {
    run(Nemesis::KillFollower);
}

#[test]
fn chaos_one_way_leader() {
    run(Nemesis::OneWayLeader);
}

#[test]
fn chaos_bridge() {
    run(Nemesis::Bridge);
}

#[test]
fn chaos_loss() {
    run(Nemesis::Loss);
}

#[test]
fn chaos_kill_controller() {
    run(Nemesis::KillController);
}

#[test]
fn chaos_kill_all() {
    run(Nemesis::KillAll);
}

#[test]
fn chaos_cascade() {
    run(Nemesis::Cascade);
}

#[test]
fn chaos_pause_leader() {
    run(Nemesis::PauseLeader);
}

#[test]
fn chaos_isolate_leader() {
    run(Nemesis::IsolateLeader);
}

#[test]
fn chaos_isolate_follower() {
    run(Nemesis::IsolateFollower);
}

#[test]
fn chaos_isolate_controller() {
    run(Nemesis::IsolateController);
}

#[test]
fn chaos_move_partition() {
    run(Nemesis::MovePartition);
}

#[test]
fn chaos_disk_full() {
    run(Nemesis::DiskFull);
}

/// A single broker whose data directory fills up: appends are refused with a retriable
/// KAFKA_STORAGE_ERROR and nothing is written, reads go on, and appends resume by themselves once
/// space is freed (no restart: the log was never poisoned).
#[test]
fn a_full_disk_refuses_appends_keeps_serving_reads_and_resumes_once_space_is_freed() {
    use cairn_protocol::native::ErrorCode;

    use crate::replication::produce_once;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let disk = match Tmpfs::mount(&data, 128 << 20) {
        Ok(disk) => disk,
        Err(why) => {
            println!("SKIPPED: cannot mount a tmpfs ({why}); run as root");
            return;
        }
    };
    let broker = crate::broker_process::BrokerProcess::start_with_config(
        &data,
        &format!("storage_min_free_bytes = {}\n", 32 << 20),
    );
    let rt = runtime();
    let (code, _) = rt.block_on(produce_once(&broker.addr, "full", 1, "before"));
    assert_eq!(code, ErrorCode::NONE);
    disk.fill_to(16 << 20);
    let refused_after = Instant::now();
    // Accepted until the guard's next look at the disk (at most 100 ms), then refused.
    let mut attempt = 0;
    let refused = loop {
        attempt += 1;
        let value = format!("try-{attempt}");
        let (code, _) = rt.block_on(produce_once(&broker.addr, "full", 1, &value));
        if code == ErrorCode::KAFKA_STORAGE_ERROR {
            break value;
        }
        assert_eq!(code, ErrorCode::NONE);
        assert!(
            refused_after.elapsed() < Duration::from_secs(2),
            "appends still accepted with 16 MiB free"
        );
    };
    let refused_in = refused_after.elapsed();
    // Reads go on.
    let values = rt.block_on(async {
        let mut consumer = Consumer::connect(&broker.addr, ConsumerConfig::default())
            .await
            .unwrap();
        consumer
            .assign("full", Some(vec![0]), Position::Earliest)
            .await
            .unwrap();
        let mut values = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The last value accepted: everything before the refusal is there once it is.
        let last = match attempt {
            1 => "before".to_string(),
            n => format!("try-{}", n - 1),
        };
        while !values.contains(&last) && Instant::now() < deadline {
            for record in consumer.poll().await.unwrap() {
                values.push(value_of(&record));
            }
        }
        values
    });
    assert!(
        !values.contains(&refused),
        "a refused append was written: {values:?}"
    );
    assert!(values.iter().any(|v| v == "before"), "{values:?}");
    disk.free();
    let freed = Instant::now();
    loop {
        let (code, _) = rt.block_on(produce_once(&broker.addr, "full", 1, "after"));
        if code == ErrorCode::NONE {
            break;
        }
        assert_eq!(code, ErrorCode::KAFKA_STORAGE_ERROR);
        assert!(
            freed.elapsed() < Duration::from_secs(2),
            "appends still refused after the space was freed"
        );
    }
    let log = std::fs::read_to_string(&broker.log).unwrap();
    assert!(log.contains("disk almost full"), "{log}");
    assert!(!log.contains("poisoned"), "{log}");
    println!(
        "full disk: appends refused {refused_in:?} after the disk filled, accepted again {:?} \
         after it was freed",
        freed.elapsed()
    );
}

#[test]
fn chaos_slow_leader() {
    run(Nemesis::SlowLeader);
}

#[test]
fn chaos_proxy_drop_leader() {
    run(Nemesis::ProxyDropLeader);
}

#[test]
fn chaos_proxy_hold_leader_answers() {
    run(Nemesis::ProxyHoldLeaderAnswers);
}

#[test]
fn chaos_confluent_kill_leader() {
    run_with(Nemesis::KillLeader, Client::Confluent);
}

#[test]
fn chaos_confluent_isolate_leader() {
    run_with(Nemesis::IsolateLeader, Client::Confluent);
}

#[test]
fn chaos_confluent_move_partition() {
    run_with(Nemesis::MovePartition, Client::Confluent);
}

#[test]
fn negative_control_acks_on_the_leaders_log_end_loses_acknowledged_records() {
    run_control(Nemesis::IsolateLeader, "acks-on-log-end", "", &[], "lost");
}

#[test]
fn negative_control_followers_forgetting_producers_duplicate_retried_records() {
    // A paused leader leaves batches its followers copied but it never acknowledged (it learns
    // of their copies at their next fetch): the producer retries them at the new leader, which
    // must recognise them from the producer state it kept as a follower.
    run_control(
        Nemesis::PauseLeader,
        "followers-forget-producers",
        "",
        &[],
        "duplicate",
    );
}

#[test]
fn negative_control_unclean_elections_by_default_lose_acknowledged_records() {
    run_control(
        Nemesis::Cascade,
        "unclean-election-by-default",
        "",
        &[],
        "lost",
    );
}

#[test]
fn negative_control_followers_keeping_divergent_logs_serve_inconsistent_offsets() {
    // The isolated leader appends records its followers never get; once healed it follows the
    // new leader without truncating them, and leads again in the next round (it is the
    // preferred replica): its stale records sit at offsets that hold other values elsewhere.
    run_control(
        Nemesis::IsolateLeader,
        "followers-keep-divergent-logs",
        "",
        &[],
        "inconsistent-offset",
    );
}

#[test]
fn negative_control_an_isr_shrink_without_the_controller_loses_acknowledged_records() {
    // Kafka's own defaults: min.insync.replicas 1 (the controller-gated ISR is what protects
    // acks=all then), and a lag limit shorter than the session, so the isolated leader drops
    // its followers while its lease still holds.
    run_control(
        Nemesis::IsolateLeader,
        "isr-shrink-without-controller",
        "replica_lag_time_max_ms = 1000\n",
        &[("min.insync.replicas", "1")],
        "lost",
    );
}
