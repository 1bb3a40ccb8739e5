//! Replicated partitions on real `cairn broker` processes: three brokers, replication factor 3,
//! min.insync.replicas 2, acks=all. The partition leader is killed with SIGKILL again and again,
//! chasing each new leader, while a producer writes at a steady rate; afterwards a fresh
//! consumer reads the partition to its high watermark and every acknowledged record is there, at
//! the offset it was acknowledged with, in order. The time from each kill to the next
//! acknowledged write is measured (p99 of at least 20 kills within 3 s). The producer is Cairn's
//! idempotent one: every record is in the log exactly once, in the order it was sent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_client::{
    Acks, Admin, Connection, Consumer, ConsumerConfig, Position, Producer, ProducerConfig,
    ProducerRecord,
};
use cairn_protocol::batch::{BatchBuilder, Compression};
use cairn_protocol::native::{
    ErrorCode, ProducePartition, ProduceRequest, ProduceResponse, ProduceTopic, Request,
};

use crate::broker::runtime;
use crate::cluster::{Roles, TestCluster, metric, tail};
use crate::netns::Netns;

/// What the producer saw: (value number, offset, when acknowledged), and failed sends.
#[derive(Default)]
struct History {
    /// (value number, offset, when sent, when acknowledged).
    acked: Vec<(u64, u64, Instant, Instant)>,
    failed: Vec<String>,
}

/// A producer for writing through faults: acks=all (idempotent), retrying for as long as the
/// test runs, quickly, and giving up on an unanswered request after 2 s (a paused broker).
pub(crate) fn patient_producer() -> ProducerConfig {
    ProducerConfig {
        acks: Acks::All,
        retries: 10_000,
        retry_backoff: Duration::from_millis(20),
        retry_backoff_max: Duration::from_millis(200),
        request_timeout: Duration::from_secs(2),
        ..ProducerConfig::default()
    }
}

/// Produces `v0, v1, ...` to partition 0 of `topic` with acks=all, one at a time, until `stop`.
fn produce_steadily(
    bootstrap: String,
    topic: &'static str,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let config = ProducerConfig {
                max_in_flight: 1,
                retry_backoff_max: Duration::from_millis(100),
                linger: Duration::ZERO,
                ..patient_producer()
            };
            let producer = Producer::connect(&bootstrap, config).await.unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let record = ProducerRecord {
                    partition: Some(0),
                    ..ProducerRecord::new(topic, format!("v{i}"))
                };
                let sent_at = Instant::now();
                let sent = match producer.send(record).await {
                    Ok(delivery) => delivery.await,
                    Err(err) => Err(err),
                };
                match sent {
                    Ok(meta) => {
                        let at = (i, meta.offset.unwrap(), sent_at, Instant::now());
                        history.lock().unwrap().acked.push(at);
                    }
                    Err(err) => history.lock().unwrap().failed.push(format!("v{i}: {err}")),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            producer.close().await.unwrap();
        });
    })
}

/// Creates `topic` with `partitions` partitions and three replicas.
pub(crate) fn create_topic(
    cluster: &TestCluster,
    rt: &tokio::runtime::Runtime,
    topic: &str,
    partitions: u32,
) {
    rt.block_on(async {
        let admin = Admin::connect(&cluster.bootstrap_except(None))
            .await
            .unwrap();
        admin
            .create_topic_replicated(topic, partitions, Some(3), &[])
            .await
            .unwrap();
    });
}

/// A steady acks=all producer on partition 0 of `topic` ([`produce_steadily`]): its history,
/// its stop flag and its thread.
fn start_producing(
    bootstrap: String,
    topic: &'static str,
) -> (
    Arc<Mutex<History>>,
    Arc<AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = produce_steadily(bootstrap, topic, Arc::clone(&history), Arc::clone(&stop));
    (history, stop, producer)
}

/// Partition 0's leader and ISR, from any broker that answers.
pub(crate) async fn leader_and_isr(cluster: &TestCluster, topic: &str) -> (Option<u32>, Vec<u32>) {
    leader_and_isr_at(&cluster.bootstrap_except(None), topic).await
}

/// Partition 0's leader and ISR, asking `bootstrap` (give up after 2 s: a paused broker accepts
/// connections but never answers).
async fn leader_and_isr_at(bootstrap: &str, topic: &str) -> (Option<u32>, Vec<u32>) {
    let ask = async {
        let admin = Admin::connect(bootstrap).await.ok()?;
        admin.metadata(&[topic.to_string()]).await.ok()
    };
    let Ok(Some(metadata)) = tokio::time::timeout(Duration::from_secs(2), ask).await else {
        return (None, Vec::new());
    };
    let Some(p) = metadata.topics.first().and_then(|t| t.partitions.first()) else {
        return (None, Vec::new());
    };
    ((p.leader != u32::MAX).then_some(p.leader), p.isr.clone())
}

/// When the first write sent after `t` was acknowledged, if one was.
fn acked_after(history: &Mutex<History>, t: Instant) -> Option<Instant> {
    history
        .lock()
        .unwrap()
        .acked
        .iter()
        .rev()
        .take_while(|(_, _, sent, _)| *sent > t)
        .last()
        .map(|(_, _, _, at)| *at)
}

/// `rounds` times: waits for a healthy partition 0 (three in sync, writes flowing), applies
/// `fault` to its leader, waits for the next acknowledged write, then `heal`s the leader. Returns
/// the times from each fault to the next acknowledgement, sorted.
fn chase_leader(
    cluster: &mut TestCluster,
    rt: &tokio::runtime::Runtime,
    topic: &str,
    history: &Mutex<History>,
    rounds: usize,
    mut fault: impl FnMut(&mut TestCluster, u32),
    mut heal: impl FnMut(&mut TestCluster, u32),
) -> Vec<Duration> {
    let mut failovers = Vec::new();
    for round in 0..rounds {
        let deadline = Instant::now() + Duration::from_secs(60);
        let leader = loop {
            let (leader, isr) = rt.block_on(leader_and_isr(cluster, topic));
            let flowing =
                acked_after(history, Instant::now() - Duration::from_millis(500)).is_some();
            if let Some(leader) = leader.filter(|_| isr.len() == 3 && flowing) {
                break leader;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: partition not healthy: leader {leader:?}, ISR {isr:?}; failures {:?}",
                history.lock().unwrap().failed
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        fault(cluster, leader);
        let faulted = Instant::now();
        let deadline = faulted + Duration::from_secs(30);
        let recovered = loop {
            if let Some(at) = acked_after(history, faulted) {
                break at;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no write acknowledged 30 s after leader {leader}'s fault\n{}",
                (1..=3)
                    .filter(|n| *n != leader)
                    .map(|n| tail(&cluster.process(n).log))
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        failovers.push(recovered - faulted);
        heal(cluster, leader);
    }
    failovers.sort();
    failovers
}

/// p50 and p99 of sorted durations.
fn percentiles(sorted: &[Duration]) -> (Duration, Duration) {
    let n = sorted.len();
    (sorted[n / 2], sorted[(n * 99).div_ceil(100) - 1])
}

#[test]
fn acknowledged_records_survive_the_leader_killed_twenty_times_in_a_row() {
    const TOPIC: &str = "failover";
    let kills: usize = std::env::var("CAIRN_SOAK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(20, |n: usize| n.max(20));
    let mut cluster = TestCluster::start(3, "");
    let rt = runtime();
    create_topic(&cluster, &rt, TOPIC, 1);
    let (history, stop, producer) = start_producing(cluster.bootstrap_except(None), TOPIC);
    let failovers = chase_leader(
        &mut cluster,
        &rt,
        TOPIC,
        &history,
        kills,
        |cluster, leader| cluster.kill9(leader),
        |cluster, leader| {
            cluster.start_node(leader);
            cluster.wait_ready(leader);
        },
    );
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    let (p50, p99) = percentiles(&failovers);
    let history = history.lock().unwrap();
    println!(
        "partition leader killed {kills} times: next acks=all write after p50 {p50:?}, p99 {p99:?}, \
         max {:?}; {} writes acknowledged, {} failed",
        failovers[kills - 1],
        history.acked.len(),
        history.failed.len()
    );

    // A fresh consumer reads the partition to its high watermark.
    let log = read_partition(&cluster, &rt, TOPIC);
    assert_exactly_once_in_order(&history, &log);
    println!(
        "{} records in the log, {} acknowledged: each exactly once, in order",
        log.len(),
        history.acked.len()
    );
    assert!(
        history.failed.is_empty(),
        "writes failed despite retries: {:?}",
        &history.failed[..history.failed.len().min(5)]
    );
    if p99 > Duration::from_secs(3) {
        for n in 1..=3 {
            let text = std::fs::read_to_string(&cluster.process(n).log).unwrap_or_default();
            for l in text.lines().filter(|l| {
                [
                    "fenced",
                    "connection closed",
                    "registered",
                    "controller changed",
                    "preferred",
                ]
                .iter()
                .any(|k| l.contains(k))
            }) {
                eprintln!("node {n}: {}", &l[..l.len().min(180)]);
            }
        }
    }
    assert!(
        p99 <= Duration::from_secs(3),
        "failover p99 {p99:?} over 3 s: {failovers:?}"
    );
}

/// Produces one record to partition 0 of `topic` at `addr` with `acks`, directly (no client
/// retries): the error code and how long the answer took.
pub(crate) async fn produce_once(
    addr: &str,
    topic: &str,
    acks: i8,
    value: &str,
) -> (ErrorCode, Duration) {
    let produce = produce_once_unbounded(addr, topic, acks, value);
    tokio::time::timeout(Duration::from_secs(20), produce)
        .await
        .expect("no answer to a produce within 20 s")
}

async fn produce_once_unbounded(
    addr: &str,
    topic: &str,
    acks: i8,
    value: &str,
) -> (ErrorCode, Duration) {
    let conn = Connection::connect(addr, "probe").await.unwrap();
    let mut builder = BatchBuilder::new(Compression::None);
    builder.push(0, None, Some(value.as_bytes()), &[]);
    let started = Instant::now();
    let response: ProduceResponse = conn
        .call(&Request::Produce(ProduceRequest {
            acks,
            timeout_ms: 10_000,
            topics: vec![ProduceTopic {
                name: topic.into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    records: builder.build().unwrap(),
                }],
            }],
        }))
        .await
        .unwrap();
    (
        ErrorCode(response.topics[0].partitions[0].error_code),
        started.elapsed(),
    )
}

/// Waits until partition 0's ISR (as `bootstrap` tells it) has `n` members; returns how long it
/// took.
pub(crate) fn wait_isr(
    bootstrap: &str,
    rt: &tokio::runtime::Runtime,
    topic: &str,
    n: usize,
) -> Duration {
    let started = Instant::now();
    loop {
        let (_, isr) = rt.block_on(leader_and_isr_at(bootstrap, topic));
        if isr.len() == n {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "ISR {isr:?} did not reach {n} members"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a test takes a follower away from its leader, and gives it back.
#[derive(Clone, Copy)]
enum FollowerFault<'a> {
    /// SIGSTOP / SIGCONT: the process stops; its connections stay open.
    Pause,
    /// Every packet between the follower and the leader dropped (iptables in the follower's
    /// namespace); the follower still reaches the controller.
    Cut(&'a Netns),
}

impl FollowerFault<'_> {
    fn apply(self, cluster: &TestCluster, follower: u32, leader: u32) {
        match self {
            FollowerFault::Pause => cluster.process(follower).signal("STOP"),
            FollowerFault::Cut(netns) => netns.cut(follower, leader),
        }
    }

    fn heal(self, cluster: &TestCluster, follower: u32) {
        match self {
            FollowerFault::Pause => cluster.process(follower).signal("CONT"),
            FollowerFault::Cut(netns) => netns.heal(follower),
        }
    }

    fn name(self) -> &'static str {
        match self {
            FollowerFault::Pause => "paused (SIGSTOP)",
            FollowerFault::Cut(_) => "cut off from the leader (packets dropped)",
        }
    }
}

#[test]
fn a_stalled_follower_leaves_the_isr_and_below_min_insync_acks_all_fails_fast() {
    followers_leave_the_isr_and_return(FollowerFault::Pause);
}

#[test]
fn a_follower_cut_off_from_its_leader_leaves_the_isr_and_returns_when_the_network_heals() {
    let netns = match Netns::create(4) {
        Ok(netns) => netns,
        Err(why) => {
            println!("SKIPPED: network namespaces are not available here ({why})");
            return;
        }
    };
    netns.enter_client();
    followers_leave_the_isr_and_return(FollowerFault::Cut(&netns));
}

/// Both followers of a partition taken away one after the other by `fault`: each leaves the ISR
/// on the leader's lag rule; at min.insync.replicas acks=all goes on, below it acks=all is refused
/// at once and acks=1 goes on; healed, both return to the ISR and nothing acknowledged is lost.
fn followers_leave_the_isr_and_return(fault: FollowerFault) {
    const TOPIC: &str = "stalls";
    // A dedicated controller (faults on brokers must not touch the quorum), a long session (the
    // controller keeps the brokers registered), a short lag limit (the leader drops them from the
    // ISR itself).
    let netns = match fault {
        FollowerFault::Cut(netns) => Some(netns),
        FollowerFault::Pause => None,
    };
    let cluster = TestCluster::start_roles_in(
        netns,
        &[
            Roles::Controller,
            Roles::Broker,
            Roles::Broker,
            Roles::Broker,
        ],
        "broker_session_timeout_ms = 60000\nbroker_heartbeat_interval_ms = 1000\nreplica_lag_time_max_ms = 1500\n",
    );
    let rt = runtime();
    create_topic(&cluster, &rt, TOPIC, 1);
    wait_isr(&cluster.bootstrap_except(None), &rt, TOPIC, 3);
    let (leader, _) = rt.block_on(leader_and_isr(&cluster, TOPIC));
    let leader = leader.unwrap();
    let leader_addr = cluster.node(leader).native.clone();
    let followers: Vec<u32> = (2..=4).filter(|n| *n != leader).collect();
    let mut acked = Vec::new();
    let (code, _) = rt.block_on(produce_once(&leader_addr, TOPIC, -1, "before"));
    assert_eq!(code, ErrorCode::NONE);
    acked.push("before".to_string());

    // One follower goes away: it leaves the ISR; acks=all goes on with two in sync.
    fault.apply(&cluster, followers[0], leader);
    let shrunk = wait_isr(&leader_addr, &rt, TOPIC, 2);
    let (code, took) = rt.block_on(produce_once(&leader_addr, TOPIC, -1, "two-in-sync"));
    assert_eq!(
        code,
        ErrorCode::NONE,
        "acks=all with the ISR at min.insync.replicas"
    );
    acked.push("two-in-sync".to_string());

    // The second goes: the ISR is the leader alone, below min.insync.replicas 2. acks=all is
    // refused at once; acks=1 is still taken.
    fault.apply(&cluster, followers[1], leader);
    wait_isr(&leader_addr, &rt, TOPIC, 1);
    let (code, refused_in) = rt.block_on(produce_once(&leader_addr, TOPIC, -1, "refused"));
    assert_eq!(code, ErrorCode::NOT_ENOUGH_REPLICAS);
    assert!(
        refused_in < Duration::from_secs(1),
        "refused after {refused_in:?}"
    );
    let (code, _) = rt.block_on(produce_once(&leader_addr, TOPIC, 1, "acks-one"));
    assert_eq!(code, ErrorCode::NONE, "acks=1 goes on");
    // `cairn topic describe` shows the ISR and how far each follower is behind.
    let described = crate::broker_process::cairn_ok(
        &leader_addr,
        &["topic", "describe", TOPIC, "--output", "json"],
        "",
    );
    let described: serde_json::Value = serde_json::from_str(&described).unwrap();
    let p = &described["partitions"][0];
    assert_eq!(p["isr"], serde_json::json!([leader]), "{p}");
    assert_eq!(p["follower_lag"].as_array().unwrap().len(), 2, "{p}");
    let (_, stalled) = cluster.process(leader).http_get("/metrics");
    assert_eq!(metric(&stalled, "cairn_under_replicated_partitions"), 1);
    assert_eq!(metric(&stalled, "cairn_under_min_isr_partitions"), 1);
    assert!(
        metric(&stalled, "cairn_isr_shrinks_total") >= 2,
        "{stalled}"
    );
    assert!(metric(&stalled, "cairn_replica_max_lag_seconds") >= 1);

    // Healed: both catch up and return to the ISR; acks=all works again.
    fault.heal(&cluster, followers[0]);
    fault.heal(&cluster, followers[1]);
    let returned = wait_isr(&leader_addr, &rt, TOPIC, 3);
    let (code, _) = rt.block_on(produce_once(&leader_addr, TOPIC, -1, "after"));
    assert_eq!(code, ErrorCode::NONE);
    acked.push("after".to_string());
    let (_, healed) = cluster.process(leader).http_get("/metrics");
    assert_eq!(metric(&healed, "cairn_under_replicated_partitions"), 0);
    assert_eq!(metric(&healed, "cairn_under_min_isr_partitions"), 0);
    assert!(metric(&healed, "cairn_isr_expands_total") >= 1, "{healed}");
    assert!(metric(&healed, "cairn_replica_fetch_bytes_total") > 0);
    println!(
        "follower {} out of the ISR after {shrunk:?} (lag limit 1.5 s); acks=all with one \
         in-sync replica refused in {refused_in:?}; acks=all with two took {took:?}; both back in \
         the ISR {returned:?} after healing",
        fault.name()
    );
    // Every replica holds the same log: read it from each broker as leader would be costly;
    // the leader's log has every acknowledged record, and a follower's log end equals it.
    let read = read_partition(&cluster, &rt, TOPIC);
    for value in &acked {
        assert!(read.values().any(|v| v == value), "{value} lost: {read:?}");
    }
}

/// What the idempotent producer promises, checked against the partition read back: every
/// acknowledged record is at the offset it was acknowledged with, acknowledged offsets rise with
/// the values, and no value is in the log twice (retries after lost answers and leader changes
/// were recognised as duplicates).
fn assert_exactly_once_in_order(history: &History, log: &std::collections::BTreeMap<u64, String>) {
    assert_exactly_once_in_order_of("v", &history.acked, log);
}

/// [`assert_exactly_once_in_order`] for values `{prefix}{i}`, acknowledged as `acked` (value
/// number, offset, ...).
fn assert_exactly_once_in_order_of<T>(
    prefix: &str,
    acked: &[(u64, u64, T, T)],
    log: &std::collections::BTreeMap<u64, String>,
) {
    let lost: Vec<_> = acked
        .iter()
        .filter(|(i, offset, _, _)| log.get(offset) != Some(&format!("{prefix}{i}")))
        .map(|(i, offset, _, _)| (i, offset, log.get(offset)))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged records lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let mut offsets: Vec<_> = acked.iter().map(|a| (a.0, a.1)).collect();
    offsets.sort_unstable();
    assert!(
        offsets.windows(2).all(|w| w[0].1 < w[1].1),
        "acknowledged offsets do not rise with the values"
    );
    let mut seen = std::collections::HashMap::new();
    let duplicates: Vec<_> = log
        .iter()
        .filter_map(|(offset, value)| {
            seen.insert(value, *offset)
                .map(|first| (value, first, offset))
        })
        .collect();
    assert!(
        duplicates.is_empty(),
        "{} values written twice (value, first offset, again at), e.g. {:?}",
        duplicates.len(),
        &duplicates[..duplicates.len().min(5)]
    );
    // In order: values (sent one after another) appear with rising numbers.
    let numbers: Vec<u64> = log
        .values()
        .filter_map(|v| v.strip_prefix(prefix)?.parse().ok())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "values out of order in the log"
    );
}

/// Partition 0 of `topic` read to its high watermark by a fresh consumer: offset -> value.
fn read_partition(
    cluster: &TestCluster,
    rt: &tokio::runtime::Runtime,
    topic: &str,
) -> std::collections::BTreeMap<u64, String> {
    rt.block_on(async {
        let mut consumer =
            Consumer::connect(&cluster.bootstrap_except(None), ConsumerConfig::default())
                .await
                .unwrap();
        consumer
            .assign(topic, Some(vec![0]), Position::Earliest)
            .await
            .unwrap();
        // Writes have stopped: wait until the high watermark settles (a new leader learns its
        // followers' positions from their next fetches).
        let mut end = consumer.end_offset(topic, 0).await.unwrap();
        let settle = Instant::now() + Duration::from_secs(10);
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = consumer.end_offset(topic, 0).await.unwrap();
            if now == end || Instant::now() > settle {
                break;
            }
            end = now;
        }
        let mut log = std::collections::BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while consumer.position(topic, 0).unwrap_or(0) < end {
            assert!(Instant::now() < deadline, "could not read to {end}");
            for record in consumer.poll().await.unwrap() {
                let value = String::from_utf8(record.value.unwrap().to_vec()).unwrap();
                log.insert(record.offset, value);
            }
        }
        log
    })
}

#[test]
fn a_killed_follower_catches_up_and_the_whole_cluster_killed_keeps_every_acknowledged_record() {
    const TOPIC: &str = "restarts";
    let mut cluster = TestCluster::start(3, "");
    let rt = runtime();
    create_topic(&cluster, &rt, TOPIC, 1);
    wait_isr(&cluster.bootstrap_except(None), &rt, TOPIC, 3);
    let (history, stop, producer) = start_producing(cluster.bootstrap_except(None), TOPIC);
    let acked = || history.lock().unwrap().acked.len();
    let wait_acked = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked() < n {
            assert!(Instant::now() < deadline, "only {} acknowledged", acked());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_acked(200);
    let (leader, _) = rt.block_on(leader_and_isr(&cluster, TOPIC));
    let follower = (1..=3).find(|n| Some(*n) != leader).unwrap();
    cluster.kill9(follower);
    wait_isr(&cluster.bootstrap_except(None), &rt, TOPIC, 2);
    let at_kill = acked();
    wait_acked(at_kill + 300);
    cluster.start_node(follower);
    cluster.wait_ready(follower);
    let caught_up = wait_isr(&cluster.bootstrap_except(None), &rt, TOPIC, 3);
    wait_acked(acked() + 100);
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();

    // Every broker killed at once, then restarted.
    for id in 1..=3 {
        cluster.kill9(id);
    }
    for id in 1..=3 {
        cluster.start_node(id);
    }
    for id in 1..=3 {
        cluster.wait_ready(id);
    }
    let log = read_partition(&cluster, &rt, TOPIC);
    let history = history.lock().unwrap();
    assert_exactly_once_in_order(&history, &log);
    println!(
        "a killed follower restarted and rejoined the ISR {caught_up:?} after it was ready; \
         {} acknowledged records all read back after every broker was killed and restarted",
        history.acked.len()
    );
}

/// The node coordinating `group` (FindCoordinator through node `via`).
fn coordinator_of(cluster: &TestCluster, via: u32, group: &str) -> u32 {
    runtime().block_on(async {
        let conn = Connection::connect(&cluster.node(via).native, "probe")
            .await
            .unwrap();
        let found: cairn_protocol::native::FindCoordinatorResponse = conn
            .call(&Request::FindCoordinator(
                cairn_protocol::native::FindCoordinatorRequest {
                    group_id: group.into(),
                },
            ))
            .await
            .unwrap();
        assert_eq!(found.error_code, 0);
        found.node_id
    })
}

/// What a group member's polling task saw: every (generation, member id, partitions) it was in,
/// and the values it read.
#[derive(Default, Debug)]
struct MemberView {
    generations: Vec<(i32, String, Vec<u32>)>,
    values: std::collections::BTreeSet<String>,
}

#[test]
fn a_group_keeps_its_members_and_generation_when_its_coordinator_is_killed() {
    const TOPIC: &str = "steady";
    const GROUP: &str = "keepers";
    let mut cluster = TestCluster::start(3, "");
    let rt = runtime();
    create_topic(&cluster, &rt, TOPIC, 2);
    let bootstrap = cluster.bootstrap_except(None);
    let stop = Arc::new(AtomicBool::new(false));
    let views: Vec<Arc<Mutex<MemberView>>> = (0..2).map(|_| Arc::default()).collect();
    let members: Vec<_> = views
        .iter()
        .enumerate()
        .map(|(i, view)| {
            let (bootstrap, view, stop) = (bootstrap.clone(), Arc::clone(view), Arc::clone(&stop));
            std::thread::spawn(move || {
                runtime().block_on(async move {
                    let mut config = cairn_client::GroupConfig::new(GROUP, &[TOPIC]);
                    config.reset = Position::Earliest;
                    config.consumer.client_id = format!("member-{i}");
                    let mut member = cairn_client::GroupConsumer::connect(&bootstrap, config)
                        .await
                        .unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        let polled = member.poll().await;
                        let mut view = view.lock().unwrap();
                        let mut owned: Vec<u32> =
                            member.assignment().iter().map(|(_, p)| *p).collect();
                        owned.sort();
                        let now = (member.generation(), member.member_id().to_string(), owned);
                        if member.generation() > 0 && view.generations.last() != Some(&now) {
                            view.generations.push(now);
                        }
                        for record in polled.unwrap_or_default() {
                            if let Some(value) = record.value {
                                view.values
                                    .insert(String::from_utf8_lossy(&value).into_owned());
                            }
                        }
                    }
                    member.close().await.unwrap();
                })
            })
        })
        .collect();
    let settled = |views: &[Arc<Mutex<MemberView>>]| -> Option<i32> {
        let seen: Vec<(i32, usize)> = views
            .iter()
            .filter_map(|v| {
                let v = v.lock().unwrap();
                v.generations.last().map(|(g, _, p)| (*g, p.len()))
            })
            .collect();
        (seen.len() == 2 && seen[0].0 == seen[1].0 && seen.iter().all(|(_, n)| *n == 1))
            .then(|| seen[0].0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let generation = loop {
        if let Some(g) = settled(&views) {
            break g;
        }
        assert!(
            Instant::now() < deadline,
            "the group did not settle: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let coordinator = coordinator_of(&cluster, 1, GROUP);
    cluster.kill9(coordinator);
    let killed = Instant::now();
    // Records written after the kill reach the same members, in the same generation.
    let sent: Vec<String> = (0..200).map(|i| format!("after-{i}")).collect();
    rt.block_on(async {
        let producer = Producer::connect(
            &cluster.bootstrap_except(Some(coordinator)),
            patient_producer(),
        )
        .await
        .unwrap();
        for (i, value) in sent.iter().enumerate() {
            let record =
                ProducerRecord::new(TOPIC, value.clone().into_bytes()).partition(i as u32 % 2);
            producer.send(record).await.unwrap().await.unwrap();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let read: usize = views
            .iter()
            .map(|v| {
                let v = v.lock().unwrap();
                sent.iter().filter(|s| v.values.contains(*s)).count()
            })
            .sum();
        if read == sent.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{read} of {} records read after the coordinator was killed: {views:?}",
            sent.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let new_coordinator = coordinator_of(&cluster, (coordinator % 3) + 1, GROUP);
    println!(
        "coordinator {coordinator} killed; node {new_coordinator} took the group over; \
         everything read again after {:?}",
        killed.elapsed()
    );
    // Before the members leave (the first to go rebalances the other).
    let seen: Vec<Vec<(i32, String, Vec<u32>)>> = views
        .iter()
        .map(|v| v.lock().unwrap().generations.clone())
        .collect();
    stop.store(true, Ordering::Relaxed);
    for member in members {
        member.join().unwrap();
    }
    for generations in seen {
        assert_eq!(
            generations.len(),
            1,
            "a member rejoined although only the coordinator moved: {generations:?}"
        );
        assert_eq!(generations[0].0, generation);
    }
    assert_ne!(new_coordinator, coordinator);
}

#[test]
fn committed_offsets_survive_their_coordinator_killed() {
    let mut cluster = TestCluster::start(3, "");
    let rt = runtime();
    let group = "survivors";
    let offsets: Vec<(String, u32, u64)> = (0..3)
        .map(|p| ("orders".to_string(), p, 100 + u64::from(p)))
        .collect();
    rt.block_on(async {
        let admin = Admin::connect(&cluster.bootstrap_except(None))
            .await
            .unwrap();
        admin
            .create_topic_replicated("orders", 3, Some(3), &[])
            .await
            .unwrap();
        // The first commit creates the (replicated) offsets topic through FindCoordinator.
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(err) = admin.commit_offsets(group, &offsets).await {
            assert!(Instant::now() < deadline, "commit: {err}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let coordinator = coordinator_of(&cluster, 1, group);
    cluster.kill9(coordinator);
    let bootstrap = cluster.bootstrap_except(Some(coordinator));
    let started = Instant::now();
    let committed = rt.block_on(async {
        let admin = Admin::connect(&bootstrap).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match admin.committed_offsets(group).await {
                Ok(committed) if !committed.is_empty() => return committed,
                other => {
                    assert!(Instant::now() < deadline, "no committed offsets: {other:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    let mut committed = committed;
    committed.sort();
    assert_eq!(
        committed, offsets,
        "the new coordinator serves what was committed"
    );
    println!(
        "coordinator {coordinator} killed: the group's committed offsets served by its new \
         coordinator after {:?}",
        started.elapsed()
    );
}

#[test]
fn a_rolling_restart_under_acks_all_load_fails_no_write_and_leaders_return_to_their_preferred_replicas()
 {
    const TOPIC: &str = "rolling";
    let mut cluster = TestCluster::start(3, "leader_imbalance_check_interval_ms = 1000\n");
    let rt = runtime();
    create_topic(&cluster, &rt, TOPIC, 1);
    wait_isr(&cluster.bootstrap_except(None), &rt, TOPIC, 3);
    let (history, stop, producer) = start_producing(cluster.bootstrap_except(None), TOPIC);
    let mut longest_gap = Duration::ZERO;
    for id in 1..=3 {
        let before = history.lock().unwrap().acked.len();
        cluster.stop(id);
        cluster.start_node(id);
        cluster.wait_ready(id);
        wait_isr(&cluster.bootstrap_except(None), &rt, TOPIC, 3);
        // Writes go on after the restart.
        let deadline = Instant::now() + Duration::from_secs(30);
        while history.lock().unwrap().acked.len() <= before {
            assert!(
                Instant::now() < deadline,
                "no write after node {id} restarted"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let history = history.lock().unwrap();
        let gap = history.acked[before.saturating_sub(1)..]
            .windows(2)
            .map(|w| w[1].3 - w[0].3)
            .max()
            .unwrap_or_default();
        longest_gap = longest_gap.max(gap);
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    let history = history.lock().unwrap();
    assert!(
        history.failed.is_empty(),
        "writes failed during the rolling restart: {:?}",
        &history.failed[..history.failed.len().min(5)]
    );
    let log = read_partition(&cluster, &rt, TOPIC);
    assert_exactly_once_in_order(&history, &log);
    // Leadership goes back to the preferred replica (the first) once it is in sync.
    let deadline = Instant::now() + Duration::from_secs(15);
    let preferred = rt.block_on(async {
        loop {
            let admin = Admin::connect(&cluster.bootstrap_except(None))
                .await
                .unwrap();
            let metadata = admin.metadata(&[TOPIC.to_string()]).await.unwrap();
            let p = &metadata.topics[0].partitions[0];
            if p.leader == p.replicas[0] {
                return p.leader;
            }
            assert!(
                Instant::now() < deadline,
                "leader {} is not the preferred {}",
                p.leader,
                p.replicas[0]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    println!(
        "rolling restart of 3 brokers under acks=all: {} writes acknowledged, none failed, longest \
         pause between acknowledgements {longest_gap:?}; leadership back on preferred replica \
         {preferred}",
        history.acked.len()
    );
}

#[test]
fn an_unclean_election_happens_only_where_the_topic_allows_it_and_is_counted() {
    let mut cluster = TestCluster::start_roles(
        &[
            Roles::Controller,
            Roles::Broker,
            Roles::Broker,
            Roles::Broker,
        ],
        "",
    );
    let rt = runtime();
    rt.block_on(async {
        let admin = Admin::connect(&cluster.bootstrap_except(None))
            .await
            .unwrap();
        admin
            .create_topic_replicated(
                "unclean",
                1,
                Some(3),
                &[("unclean.leader.election.enable".into(), "true".into())],
            )
            .await
            .unwrap();
        admin
            .create_topic_replicated("clean", 1, Some(3), &[])
            .await
            .unwrap();
    });
    for topic in ["unclean", "clean"] {
        wait_isr(&cluster.bootstrap_except(None), &rt, topic, 3);
    }
    // Both topics' partitions: replicas on brokers 2, 3, 4 in some order. Kill two followers of
    // "unclean", then its leader: the ISR is the dead leader alone.
    let (leader, _) = rt.block_on(leader_and_isr(&cluster, "unclean"));
    let leader = leader.unwrap();
    let followers: Vec<u32> = (2..=4).filter(|n| *n != leader).collect();
    for f in &followers {
        cluster.kill9(*f);
    }
    wait_isr(&cluster.node(leader).native.clone(), &rt, "unclean", 1);
    cluster.kill9(leader);
    // A follower comes back: "unclean" takes it as leader; "clean" stays offline unless its
    // last in-sync replica was this one.
    cluster.start_node(followers[0]);
    cluster.wait_ready(followers[0]);
    let bootstrap = cluster.node(followers[0]).native.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (l, isr) = rt.block_on(leader_and_isr_at(&bootstrap, "unclean"));
        if l == Some(followers[0]) {
            assert_eq!(isr, vec![followers[0]]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no unclean election: {l:?} {isr:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (clean_leader, clean_isr) = rt.block_on(leader_and_isr_at(&bootstrap, "clean"));
    if !clean_isr.contains(&followers[0]) {
        assert_eq!(
            clean_leader, None,
            "a clean topic never elects outside its ISR"
        );
    }
    let (_, metrics) = cluster.process(1).http_get("/metrics");
    assert_eq!(
        metric(&metrics, "cairn_controller_unclean_leader_elections_total"),
        1,
        "{metrics}"
    );
}

#[test]
fn an_idempotent_kafka_producer_writes_each_record_once_across_leader_follower_and_cluster_kills() {
    const TOPIC: &str = "failover-kafka";
    let mut cluster = TestCluster::start(3, "");
    let rt = runtime();
    create_topic(&cluster, &rt, TOPIC, 1);
    wait_isr(&cluster.bootstrap_except(None), &rt, TOPIC, 3);
    let kafka_bootstrap = (1..=3)
        .map(|n| cluster.node(n).kafka.clone())
        .collect::<Vec<_>>()
        .join(",");
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let args: Vec<&std::ffi::OsStr> = ["--bootstrap", &kafka_bootstrap, "--topic", TOPIC, "--stop"]
        .into_iter()
        .map(std::ffi::OsStr::new)
        .chain([stop.as_os_str()])
        .collect();
    let producer = crate::kafka::spawn_workload("failover.py", &args, dir.path());
    std::thread::sleep(Duration::from_secs(2));
    for round in 0..5 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let leader = loop {
            let (leader, isr) = rt.block_on(leader_and_isr(&cluster, TOPIC));
            if let Some(leader) = leader.filter(|_| isr.len() == 3) {
                break leader;
            }
            assert!(Instant::now() < deadline, "round {round}: not healthy");
            std::thread::sleep(Duration::from_millis(50));
        };
        std::thread::sleep(Duration::from_millis(500));
        cluster.kill9(leader);
        std::thread::sleep(Duration::from_millis(1000));
        cluster.start_node(leader);
        cluster.wait_ready(leader);
    }
    // A follower killed and restarted: it catches up into the ISR.
    wait_isr(&cluster.bootstrap_except(None), &rt, TOPIC, 3);
    let (leader, _) = rt.block_on(leader_and_isr(&cluster, TOPIC));
    let follower = (1..=3).find(|n| Some(*n) != leader).unwrap();
    cluster.kill9(follower);
    std::thread::sleep(Duration::from_millis(1000));
    cluster.start_node(follower);
    cluster.wait_ready(follower);
    wait_isr(&cluster.bootstrap_except(None), &rt, TOPIC, 3);
    // Every broker killed at once while the producer writes, then restarted.
    std::thread::sleep(Duration::from_millis(500));
    for id in 1..=3 {
        cluster.kill9(id);
    }
    std::thread::sleep(Duration::from_millis(500));
    for id in 1..=3 {
        cluster.start_node(id);
    }
    for id in 1..=3 {
        cluster.wait_ready(id);
    }
    wait_isr(&cluster.bootstrap_except(None), &rt, TOPIC, 3);
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&stop, b"").unwrap();
    let (status, stdout, stderr) = crate::kafka::finish_workload(producer, dir.path());
    assert!(status.success(), "{stdout}\n{stderr}");
    let result: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let failed = result["failed"].as_array().unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    let acked: Vec<(u64, u64, (), ())> = result["acked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| (pair[0].as_u64().unwrap(), pair[1].as_u64().unwrap(), (), ()))
        .collect();
    let log = read_partition(&cluster, &rt, TOPIC);
    assert_exactly_once_in_order_of("c", &acked, &log);
    println!(
        "confluent-kafka idempotent producer across 5 leader kills, a follower kill and the whole \
         cluster killed: {} acknowledged, {} in the log, each once, in order",
        acked.len(),
        log.len()
    );
}

#[test]
fn a_paused_leader_is_replaced_within_its_session_and_three_seconds() {
    const TOPIC: &str = "paused";
    const SESSION_MS: u64 = 2000;
    let rounds = 5;
    let mut cluster = TestCluster::start(
        3,
        &format!("broker_session_timeout_ms = {SESSION_MS}\nbroker_heartbeat_interval_ms = 300\n"),
    );
    let rt = runtime();
    create_topic(&cluster, &rt, TOPIC, 1);
    let (history, stop, producer) = start_producing(cluster.bootstrap_except(None), TOPIC);
    let failovers = chase_leader(
        &mut cluster,
        &rt,
        TOPIC,
        &history,
        rounds,
        |cluster, leader| cluster.process(leader).signal("STOP"),
        |cluster, leader| {
            cluster.process(leader).signal("CONT");
            cluster.wait_ready(leader);
        },
    );
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    let (p50, p99) = percentiles(&failovers);
    println!(
        "partition leader paused (SIGSTOP) {rounds} times, session {SESSION_MS} ms, producer \
         request timeout 2 s: next acks=all write after p50 {p50:?}, p99 {p99:?}"
    );
    let history = history.lock().unwrap();
    let log = read_partition(&cluster, &rt, TOPIC);
    let events = || {
        (1..=3)
            .map(|n| {
                let text = std::fs::read_to_string(&cluster.process(n).log).unwrap_or_default();
                text.lines()
                    .filter(|l| {
                        [
                            "truncated",
                            "fenced",
                            "lease",
                            "ISR",
                            "unfenced",
                            "elect",
                            "leading",
                            "following",
                        ]
                        .iter()
                        .any(|k| l.contains(k))
                    })
                    .map(|l| format!("node {n}: {}", &l[..l.len().min(220)]))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    if history
        .acked
        .iter()
        .any(|(i, offset, _, _)| log.get(offset) != Some(&format!("v{i}")))
    {
        eprintln!("{}", events());
    }
    assert_exactly_once_in_order(&history, &log);
    assert!(
        p99 <= Duration::from_millis(SESSION_MS) + Duration::from_secs(3),
        "p99 {p99:?}: {failovers:?}"
    );
}

#[test]
fn leaders_return_to_preferred_replicas_when_an_operator_asks() {
    const TOPIC: &str = "elections";
    let mut cluster = TestCluster::start(3, "auto_leader_rebalance_enable = false\n");
    let rt = runtime();
    create_topic(&cluster, &rt, TOPIC, 3);
    // Nodes 2 and 3 stay up: ask them.
    let bootstrap = format!("{},{}", cluster.node(2).native, cluster.node(3).native);
    let placement = || {
        rt.block_on(async {
            let admin = Admin::connect(&bootstrap).await.unwrap();
            let metadata = admin.metadata(&[TOPIC.to_string()]).await.unwrap();
            metadata.topics[0]
                .partitions
                .iter()
                .map(|p| (p.leader, p.replicas[0], p.isr.len()))
                .collect::<Vec<_>>()
        })
    };
    // Every broker knows the topic and every replica is in sync.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = placement();
        if p.len() == 3 && p.iter().all(|(_, _, isr)| *isr == 3) {
            break;
        }
        assert!(Instant::now() < deadline, "{p:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Node 1 restarts: what it led moves away and, with auto rebalance off, stays away.
    cluster.kill9(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while placement().iter().any(|(l, _, _)| *l == 1) {
        assert!(
            Instant::now() < deadline,
            "node 1 still leads: {:?}",
            placement()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.start_node(1);
    cluster.wait_ready(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while placement().iter().any(|(_, _, isr)| *isr < 3) {
        assert!(
            Instant::now() < deadline,
            "ISR not full again: {:?}",
            placement()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = placement();
    let moved = before.iter().filter(|(l, pref, _)| l != pref).count();
    assert_eq!(moved, 1, "node 1 preferred-led one partition: {before:?}");

    // confluent-kafka's AdminClient.elect_leaders (Kafka's ElectLeaders) moves it back.
    let out = std::process::Command::new(crate::kafka::python())
        .arg(crate::kafka::script("elect.py"))
        .args(["--bootstrap", &cluster.node(2).kafka, "--topic", TOPIC])
        .args(["--partitions", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let elected = results
        .as_object()
        .unwrap()
        .values()
        .filter(|v| v.is_null())
        .count();
    let not_needed = results
        .as_object()
        .unwrap()
        .values()
        .filter(|v| v.as_str() == Some("ELECTION_NOT_NEEDED"))
        .count();
    assert_eq!((elected, not_needed), (1, 2), "{results}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while placement().iter().any(|(l, pref, _)| l != pref) {
        assert!(Instant::now() < deadline, "{:?}", placement());
        std::thread::sleep(Duration::from_millis(50));
    }

    // `cairn leader elect` over every partition: nothing left to do.
    let out = crate::broker_process::cairn_ok(
        &cluster.node(3).native,
        &["leader", "elect", "--preferred"],
        "",
    );
    assert!(out.contains("no election needed"), "{out}");
    // An unclean election where every partition has a leader: not needed either.
    let out = crate::broker_process::cairn_ok(
        &cluster.node(3).native,
        &[
            "leader",
            "elect",
            "--unclean",
            "--topic",
            TOPIC,
            "--partition",
            "0",
        ],
        "",
    );
    assert!(out.contains("ELECTION_NOT_NEEDED"), "{out}");
}

/// Waits until partition 0 of `topic` has exactly `replicas` (in any order), all in sync, and no
/// reassignment under way; returns how long it took.
pub(crate) fn wait_replicas(
    bootstrap: &str,
    rt: &tokio::runtime::Runtime,
    topic: &str,
    replicas: &[u32],
) -> Duration {
    let started = Instant::now();
    let mut want = replicas.to_vec();
    want.sort_unstable();
    loop {
        let state = rt.block_on(async {
            let admin = Admin::connect(bootstrap).await.ok()?;
            let metadata = admin.metadata(&[topic.to_string()]).await.ok()?;
            let ongoing = admin.list_reassignments(&[topic.to_string()]).await.ok()?;
            let p = metadata.topics.first()?.partitions.first()?.clone();
            Some((p, ongoing.len()))
        });
        if let Some((p, ongoing)) = &state {
            let (mut have, mut isr) = (p.replicas.clone(), p.isr.clone());
            have.sort_unstable();
            isr.sort_unstable();
            if *ongoing == 0 && have == want && isr == want {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "replicas did not become {replicas:?}: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Three combined nodes (brokers and voters) and a fourth broker with no replica yet.
fn three_brokers_and_a_spare(toml: &str) -> TestCluster {
    TestCluster::start_roles(
        &[
            Roles::Combined,
            Roles::Combined,
            Roles::Combined,
            Roles::Broker,
        ],
        toml,
    )
}

#[test]
fn replicas_move_between_brokers_under_acks_all_load_and_nothing_is_lost() {
    const TOPIC: &str = "moving";
    let cluster = three_brokers_and_a_spare("");
    let rt = runtime();
    let bootstrap = cluster.bootstrap_except(None);
    create_topic(&cluster, &rt, TOPIC, 1);
    wait_isr(&bootstrap, &rt, TOPIC, 3);
    let (history, stop, producer) = start_producing(bootstrap.clone(), TOPIC);
    std::thread::sleep(Duration::from_millis(500));
    // Move the partition off its leader, onto the broker that holds no replica.
    let (leader, isr) = rt.block_on(leader_and_isr(&cluster, TOPIC));
    let leader = leader.unwrap();
    let spare = (1..=4).find(|n| !isr.contains(n)).unwrap();
    let followers: Vec<u32> = isr.iter().copied().filter(|n| *n != leader).collect();
    let target = [spare, followers[0], followers[1]];
    let target_text = target.map(|n| n.to_string()).join(",");
    let out = crate::broker_process::cairn_ok(
        &cluster.node(1).native,
        &[
            "partition",
            "reassign",
            TOPIC,
            "--partition",
            "0",
            "--replicas",
            &target_text,
        ],
        "",
    );
    assert!(out.contains("reassignment started"), "{out}");
    let moved_in = wait_replicas(&bootstrap, &rt, TOPIC, &target);
    // The old leader no longer holds the partition.
    let dir = cluster.node(leader).dir.join(format!("{TOPIC}-0"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.exists() {
        assert!(Instant::now() < deadline, "{} still there", dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Decommission one of the remaining replicas: it moves to the old leader, the only
    // broker left without one.
    let out = crate::broker_process::cairn_ok(
        &cluster.node(2).native,
        &["broker", "decommission", &followers[0].to_string()],
        "",
    );
    assert!(out.contains("reassignment started"), "{out}");
    let decommissioned_in = wait_replicas(&bootstrap, &rt, TOPIC, &[spare, followers[1], leader]);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    let history = history.lock().unwrap();
    assert!(
        history.failed.is_empty(),
        "writes failed during the moves: {:?}",
        &history.failed[..history.failed.len().min(5)]
    );
    let log = read_partition(&cluster, &rt, TOPIC);
    assert_exactly_once_in_order(&history, &log);
    // A write the old leader held when its replica moved away is answered at once (and retried
    // at the new leader), never left to the producer's request timeout.
    let slowest = history
        .acked
        .iter()
        .map(|(_, _, sent, at)| at.duration_since(*sent))
        .max()
        .unwrap_or_default();
    assert!(
        slowest < patient_producer().request_timeout,
        "a write waited {slowest:?} for its acknowledgement: held past the move until the \
         request timed out"
    );
    println!(
        "partition moved off its leader to {target:?} in {moved_in:?}, then broker {} \
         decommissioned in {decommissioned_in:?}, under acks=all load: {} writes acknowledged \
         (the slowest in {slowest:?}), none failed, each exactly once and in order",
        followers[0],
        history.acked.len()
    );
}

#[test]
fn a_new_replica_of_a_partition_trimmed_by_retention_starts_at_the_leaders_log_start() {
    const TOPIC: &str = "trimmed";
    let cluster = three_brokers_and_a_spare("retention_check_interval_ms = 100\n");
    let rt = runtime();
    let bootstrap = cluster.bootstrap_except(None);
    // Small segments and a small size limit: retention deletes the first segments soon.
    rt.block_on(async {
        let admin = Admin::connect(&bootstrap).await.unwrap();
        let configs = [
            ("segment.bytes".to_string(), "4096".to_string()),
            ("retention.bytes".to_string(), "16384".to_string()),
        ];
        admin
            .create_topic_replicated(TOPIC, 1, Some(3), &configs)
            .await
            .unwrap();
    });
    wait_isr(&bootstrap, &rt, TOPIC, 3);
    let acked: Vec<(u64, u64)> = rt.block_on(async {
        let config = ProducerConfig {
            linger: Duration::ZERO,
            ..ProducerConfig::default()
        };
        let producer = Producer::connect(&bootstrap, config).await.unwrap();
        let mut acked = Vec::new();
        for i in 0..400u64 {
            let record =
                ProducerRecord::new(TOPIC, format!("r{i}-{}", "x".repeat(200))).partition(0);
            let meta = producer.send(record).await.unwrap().await.unwrap();
            acked.push((i, meta.offset.unwrap()));
        }
        producer.close().await.unwrap();
        acked
    });
    let log_start = |node: Option<u32>| {
        rt.block_on(async {
            let addr = node.map_or(bootstrap.clone(), |n| cluster.node(n).native.clone());
            let admin = Admin::connect(&addr).await.unwrap();
            let topics = admin.describe_topics(&[TOPIC.to_string()]).await.unwrap();
            topics[0].partitions[0].log_start_offset
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader_start = loop {
        let start = log_start(None);
        if start > 0 {
            break start;
        }
        assert!(Instant::now() < deadline, "retention deleted nothing");
        std::thread::sleep(Duration::from_millis(100));
    };
    // A replica on the spare broker: its log must begin where the leader's now does.
    let (leader, isr) = rt.block_on(leader_and_isr(&cluster, TOPIC));
    let leader = leader.unwrap();
    let spare = (1..=4).find(|n| !isr.contains(n)).unwrap();
    let kept: Vec<u32> = isr.iter().copied().filter(|n| *n != leader).collect();
    let target = [spare, kept[0], kept[1]];
    let results = rt.block_on(async {
        let admin = Admin::connect(&bootstrap).await.unwrap();
        admin
            .reassign(&[(TOPIC.to_string(), 0, Some(target.to_vec()))])
            .await
            .unwrap()
    });
    assert_eq!(results[0].2, ErrorCode::NONE, "{results:?}");
    let moved_in = wait_replicas(&bootstrap, &rt, TOPIC, &target);
    let spare_log = std::fs::read_to_string(&cluster.process(spare).log).unwrap();
    assert!(
        spare_log.contains("starts again at the leader's log start"),
        "the new replica never started over at the leader's log start:\n{}",
        tail(&cluster.process(spare).log)
    );
    // The spare leads once asked (it is the preferred replica now), and serves every record
    // from its log start on.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        rt.block_on(async {
            let admin = Admin::connect(&bootstrap).await.unwrap();
            let _ = admin
                .elect_leaders(false, Some(&[(TOPIC.to_string(), 0)]))
                .await;
        });
        if rt.block_on(leader_and_isr(&cluster, TOPIC)).0 == Some(spare) {
            break;
        }
        assert!(Instant::now() < deadline, "broker {spare} never led");
        std::thread::sleep(Duration::from_millis(200));
    }
    let spare_start = log_start(Some(spare));
    assert!(
        spare_start >= leader_start,
        "the new replica starts at {spare_start}, below the old leader's log start {leader_start}"
    );
    let log = read_partition(&cluster, &rt, TOPIC);
    let first = *log.keys().next().unwrap();
    assert_eq!(first, spare_start);
    for (i, offset) in acked.iter().filter(|(_, o)| *o >= spare_start) {
        let value = log
            .get(offset)
            .unwrap_or_else(|| panic!("r{i} at {offset} missing"));
        assert!(value.starts_with(&format!("r{i}-")), "{offset}: {value}");
    }
    println!(
        "a new replica of a partition whose leader starts at {leader_start} (retention) caught up \
         into the ISR in {moved_in:?} from {spare_start}, and as leader serves the {} records \
         from there",
        log.len()
    );
}

/// A broker whose log cannot write (its file system full, with the free-space margin off: an
/// append that finds no room to grow its segment, or an I/O error while rolling one that poisons
/// the log) asks the controller to fence it: its leaderships move to replicas that can write,
/// the producer goes on, and after a restart the broker recovers its log and rejoins the ISR.
/// Nothing acknowledged is lost or duplicated. Needs root (a tmpfs per broker). Which of the two
/// failures comes first depends on where the segment's allocation stands when the disk fills
/// (it grows 4 KiB, 8 KiB, ... up to 64 KiB segments here); both fence.
#[test]
fn a_broker_whose_log_fails_is_fenced_and_its_leaderships_move() {
    const TOPIC: &str = "poisoned";
    let roles = [
        Roles::Controller,
        Roles::Broker,
        Roles::Broker,
        Roles::Broker,
    ];
    let toml = "storage_min_free_bytes = 0\nbroker_session_timeout_ms = 3000\n\
                broker_heartbeat_interval_ms = 500\n";
    let mut cluster = TestCluster::plan(None, &roles, toml);
    let mut disks = Vec::new();
    for id in 2..=4 {
        match crate::chaos::Tmpfs::mount(&cluster.node(id).dir, 64 << 20) {
            Ok(disk) => disks.push((id, disk)),
            Err(why) => {
                println!("SKIPPED: cannot mount a tmpfs ({why}); run as root");
                return;
            }
        }
    }
    cluster.start_planned(4);
    let rt = runtime();
    let bootstrap = cluster.bootstrap_except(None);
    rt.block_on(async {
        let admin = Admin::connect(&bootstrap).await.unwrap();
        // Small segments: the leader rolls (creates files) every 64 KiB.
        let configs = [("segment.bytes".to_string(), "65536".to_string())];
        admin
            .create_topic_replicated(TOPIC, 1, Some(3), &configs)
            .await
            .unwrap();
    });
    wait_isr(&bootstrap, &rt, TOPIC, 3);
    let (history, stop, producer) = start_producing(bootstrap.clone(), TOPIC);
    std::thread::sleep(Duration::from_secs(1));
    let (leader, _) = rt.block_on(leader_and_isr(&cluster, TOPIC));
    let leader = leader.unwrap();
    let disk = &disks.iter().find(|(id, _)| *id == leader).unwrap().1;
    disk.fill_to(0);
    let filled = Instant::now();
    // The next append or roll fails: the broker asks to be fenced, another leads.
    let moved = loop {
        let (now, _) = rt.block_on(leader_and_isr(&cluster, TOPIC));
        if now.is_some_and(|l| l != leader) {
            break filled.elapsed();
        }
        assert!(
            filled.elapsed() < Duration::from_secs(30),
            "leadership never left the broker with the full disk:\n{}",
            tail(&cluster.process(leader).log)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&cluster.process(leader).log).unwrap();
    assert!(
        log.contains("poisoned") || log.contains("an append found no space"),
        "{}",
        tail(&cluster.process(leader).log)
    );
    std::thread::sleep(Duration::from_secs(1));
    let acked_since = |t: Instant| {
        history
            .lock()
            .unwrap()
            .acked
            .iter()
            .filter(|(_, _, sent, _)| *sent > t)
            .count()
    };
    let moved_at = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert!(acked_since(moved_at) > 0, "the producer did not go on");
    // Space back and a restart: the log is reopened and recovered, and the replica catches up.
    disk.free();
    cluster.kill9(leader);
    cluster.start_node(leader);
    cluster.wait_ready(leader);
    wait_isr(&bootstrap, &rt, TOPIC, 3);
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    let history = history.lock().unwrap();
    assert!(history.failed.is_empty(), "{:?}", history.failed);
    let log = read_partition(&cluster, &rt, TOPIC);
    assert_exactly_once_in_order(&history, &log);
    println!(
        "a log that cannot write: leadership moved {moved:?} after the leader's disk filled; {} \
         acknowledged, each once, in order",
        history.acked.len()
    );
}
