//! Cairn as a cluster: real `cairn broker` processes on loopback, each a broker and a voter of
//! the controller quorum. Every client (Cairn's, confluent-kafka, kafka-python, kcat) reaches
//! every partition's leader through any one bootstrap broker; the active controller killed with
//! SIGKILL is replaced and serves CreateTopics again (time measured over 20 kills); a broker
//! paused past its session is fenced and its partitions report no leader until it resumes; the
//! whole cluster killed and restarted keeps its metadata. And a quorum of one keeps every
//! committed record and topic through simulated power losses (the fault-injecting file system),
//! with a negative control that loses them when syncs do nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_broker::Broker;
use cairn_client::{
    Acks, Admin, Connection, Consumer, ConsumerConfig, Position, Producer, ProducerConfig,
    ProducerRecord,
};
use cairn_protocol::native::*;
use cairn_testkit::{FaultFs, Faults};

use crate::broker::runtime;
use crate::broker_process::{BrokerProcess, free_port};
use crate::netns::Netns;
use crate::proxy::FaultProxy;

/// What a node of a test cluster is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Roles {
    /// A broker and a voter.
    Combined,
    /// A voter only.
    Controller,
    /// A broker only, following the quorum.
    Broker,
}

/// One node of a test cluster: its addresses and data directory, and its process while it runs.
pub(crate) struct Node {
    id: u32,
    roles: Roles,
    pub(crate) dir: PathBuf,
    pub(crate) native: String,
    pub(crate) kafka: String,
    pub(crate) controller: String,
    process: Option<BrokerProcess>,
    /// Fault-injecting proxies in front of its native and Kafka listeners, which it advertises
    /// ([`TestCluster::proxy_all`]).
    proxies: Option<(FaultProxy, FaultProxy)>,
}

/// Nodes 1..=N: brokers, controller voters, or both.
pub(crate) struct TestCluster {
    nodes: Vec<Node>,
    quorum: String,
    toml: String,
    /// Each node's network namespace, when the cluster runs in [`Netns`] namespaces.
    netns: Option<Vec<String>>,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `n` nodes with `toml` settings and waits until each is ready (registered and
    /// unfenced). Node 1 starts alone first: without a quorum it must not say it is ready.
    pub(crate) fn start(n: u32, toml: &str) -> TestCluster {
        TestCluster::start_roles(&vec![Roles::Combined; n as usize], toml)
    }

    /// Starts nodes 1.. with `roles`, node 1 first (it must be a voter).
    pub(crate) fn start_roles(roles: &[Roles], toml: &str) -> TestCluster {
        TestCluster::start_roles_in(None, roles, toml)
    }

    /// [`TestCluster::start_roles`], each node in its own namespace of `netns` at its own
    /// address (the caller has entered the clients' namespace).
    pub(crate) fn start_roles_in(
        netns: Option<&Netns>,
        roles: &[Roles],
        toml: &str,
    ) -> TestCluster {
        let mut cluster = TestCluster::plan(netns, roles, toml);
        cluster.start_planned(roles.len() as u32);
        cluster
    }

    /// The nodes of [`TestCluster::start_roles_in`], none started yet (a test may prepare their
    /// data directories first): start them with [`TestCluster::start_planned`].
    pub(crate) fn plan(netns: Option<&Netns>, roles: &[Roles], toml: &str) -> TestCluster {
        let n = roles.len() as u32;
        let mut dir = tempfile::tempdir().unwrap();
        // CAIRN_TEST_KEEP=1 keeps the nodes' directories and logs for a look afterwards.
        if std::env::var_os("CAIRN_TEST_KEEP").is_some() {
            dir.disable_cleanup(true);
            println!("cluster directories kept in {}", dir.path().display());
        }
        let nodes: Vec<Node> = (1..=n)
            .map(|id| {
                let (native, kafka, controller) = match netns {
                    Some(_) => {
                        let host = Netns::host(id);
                        (
                            format!("{host}:9092"),
                            format!("{host}:9093"),
                            format!("{host}:9094"),
                        )
                    }
                    None => (free_port(), free_port(), free_port()),
                };
                Node {
                    id,
                    roles: roles[id as usize - 1],
                    dir: dir.path().join(format!("node-{id}")),
                    native,
                    kafka,
                    controller,
                    process: None,
                    proxies: None,
                }
            })
            .collect();
        let voters = nodes.iter().filter(|n| n.roles != Roles::Broker);
        let quorum = voters
            .map(|n| format!("{}@{}", n.id, n.controller))
            .collect::<Vec<_>>()
            .join(",");
        TestCluster {
            nodes,
            quorum,
            toml: toml.to_string(),
            netns: netns.map(|netns| (1..=n).map(|id| netns.ns(id)).collect()),
            _dir: dir,
        }
    }

    /// Starts planned nodes `1..=running`, node 1 first (it must be a voter), and waits until
    /// each is ready. Without a quorum node 1 must not say it is ready.
    pub(crate) fn start_planned(&mut self, running: u32) {
        let n_voters = self
            .nodes
            .iter()
            .filter(|n| n.roles != Roles::Broker)
            .count();
        self.start_node(1);
        if n_voters > 1 {
            std::thread::sleep(Duration::from_millis(500));
            let (status, _) = self.process(1).http_get("/ready");
            assert!(
                !status.contains("200"),
                "a voter alone in a quorum of {n_voters} says it is ready: {status}"
            );
        }
        for id in 2..=running {
            self.start_node(id);
        }
        for id in 1..=running {
            self.wait_ready(id);
        }
    }

    pub(crate) fn node(&self, id: u32) -> &Node {
        &self.nodes[id as usize - 1]
    }

    /// Puts a fault-injecting proxy ([`crate::proxy`]) in front of every broker's native and
    /// Kafka listeners and has the broker advertise it, so that clients and followers reach it
    /// only through the proxy. Before the nodes start.
    pub(crate) fn proxy_all(&mut self) {
        for node in &mut self.nodes {
            if node.roles != Roles::Controller {
                node.proxies = Some((
                    FaultProxy::start(&node.native),
                    FaultProxy::start(&node.kafka),
                ));
            }
        }
    }

    /// Switches the fault of node `id`'s proxies (both listeners).
    pub(crate) fn proxy_fault(&self, id: u32, mode: crate::proxy::Mode) {
        if let Some((native, kafka)) = &self.node(id).proxies {
            native.set(mode);
            kafka.set(mode);
        }
    }

    /// Whether node `id`'s process runs (started, not killed or stopped).
    pub(crate) fn running(&self, id: u32) -> bool {
        self.node(id).process.is_some()
    }

    pub(crate) fn process(&self, id: u32) -> &BrokerProcess {
        self.node(id).process.as_ref().unwrap()
    }

    pub(crate) fn start_node(&mut self, id: u32) {
        let quorum = self.quorum.clone();
        let toml = self.toml.clone();
        let netns = self
            .netns
            .as_ref()
            .map(|names| names[id as usize - 1].clone());
        let node = &mut self.nodes[id as usize - 1];
        let mut extra = vec![
            "--node-id".to_string(),
            id.to_string(),
            "--controller-quorum".to_string(),
            quorum,
        ];
        if node.roles != Roles::Broker {
            extra.extend(["--controller-listen".to_string(), node.controller.clone()]);
        }
        if let Some((native, kafka)) = &node.proxies {
            extra.extend([
                "--advertised".to_string(),
                native.addr.clone(),
                "--kafka-advertised".to_string(),
                kafka.addr.clone(),
            ]);
        }
        node.process = Some(if node.roles == Roles::Controller {
            extra.extend(["--roles".to_string(), "controller".to_string()]);
            let host = node
                .controller
                .rsplit_once(':')
                .map_or("127.0.0.1", |(h, _)| h);
            let http = format!("{host}:0");
            BrokerProcess::start_controller(netns.as_deref(), &http, &node.dir, &toml, &extra)
        } else {
            BrokerProcess::start_in(
                netns.as_deref(),
                &node.dir,
                &toml,
                &node.native,
                &node.kafka,
                &extra,
            )
        });
    }

    /// Waits until node `id` says `/ready` (registered, caught up, unfenced).
    pub(crate) fn wait_ready(&self, id: u32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, _) = self.process(id).http_get("/ready");
            if status.contains("200") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} not ready: {status}\n{}",
                tail(&self.process(id).log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A graceful stop (SIGTERM: controlled shutdown), waiting for the process to exit.
    pub(crate) fn stop(&mut self, id: u32) {
        if let Some(process) = self.nodes[id as usize - 1].process.take() {
            let status = process.terminate();
            assert!(status.success(), "node {id} exited with {status}");
        }
    }

    pub(crate) fn kill9(&mut self, id: u32) {
        if let Some(process) = self.nodes[id as usize - 1].process.take() {
            process.kill9();
        }
    }

    /// The native addresses of every running broker but `except`, comma-separated.
    pub(crate) fn bootstrap_except(&self, except: Option<u32>) -> String {
        self.nodes
            .iter()
            .filter(|n| Some(n.id) != except && n.process.is_some())
            .filter(|n| n.roles != Roles::Controller)
            .map(|n| n.native.clone())
            .collect::<Vec<_>>()
            .join(",")
    }
}

pub(crate) fn tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// An unlabelled metric's value in a Prometheus text exposition (0 when absent).
pub(crate) fn metric(exposition: &str, name: &str) -> u64 {
    exposition
        .lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

/// The active controller, once the answering broker knows it (right after an election, or on a
/// broker-only node before its next heartbeat, it may not).
pub(crate) async fn active_controller(admin: &Admin) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let described = admin.describe_cluster().await.unwrap();
        if described.controller_id != u32::MAX {
            return described.controller_id;
        }
        assert!(
            Instant::now() < deadline,
            "no active controller: {described:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each partition's leader, from the metadata.
pub(crate) async fn leaders(admin: &Admin, topic: &str) -> BTreeMap<u32, Option<u32>> {
    let metadata = admin.metadata(&[topic.to_string()]).await.unwrap();
    metadata.topics[0]
        .partitions
        .iter()
        .map(|p| (p.partition, (p.leader != u32::MAX).then_some(p.leader)))
        .collect()
}

#[test]
fn every_client_reaches_every_leader_through_any_one_broker() {
    let cluster = TestCluster::start(3, "");
    let rt = runtime();
    rt.block_on(async {
        let admin = Admin::connect(&cluster.node(1).native).await.unwrap();
        for topic in [
            "routed",
            "routed-confluent",
            "routed-kafka-python",
            "routed-kcat",
        ] {
            admin.create_topic(topic, 12, &[]).await.unwrap();
        }
        let placed = leaders(&admin, "routed").await;
        let mut per_node: BTreeMap<u32, usize> = BTreeMap::new();
        for leader in placed.values() {
            *per_node
                .entry(leader.expect("every partition has a leader"))
                .or_default() += 1;
        }
        assert_eq!(
            per_node.values().copied().collect::<Vec<_>>(),
            [4, 4, 4],
            "{placed:?}"
        );
        let metadata = admin.metadata(&["routed".into()]).await.unwrap();
        assert_eq!(metadata.brokers.len(), 3);
        for p in &metadata.topics[0].partitions {
            assert_eq!(
                p.replicas.len(),
                3,
                "default replication factor min(3, brokers)"
            );
            assert_eq!(p.replicas[0], p.leader, "the preferred replica leads");
        }

        // Cairn's client: produce through node 1 only, consume through node 2 only.
        let config = ProducerConfig {
            acks: Acks::All,
            ..ProducerConfig::default()
        };
        let producer = Producer::connect(&cluster.node(1).native, config)
            .await
            .unwrap();
        let mut deliveries = Vec::new();
        for i in 0..1200 {
            let record = ProducerRecord::new("routed", format!("cairn-{i}")).key(format!("k{i}"));
            deliveries.push(producer.send(record).await.unwrap());
        }
        let mut written: BTreeMap<u32, u64> = BTreeMap::new();
        for delivery in deliveries {
            let metadata = delivery.await.unwrap();
            *written.entry(metadata.partition).or_default() += 1;
        }
        producer.close().await.unwrap();
        let mut consumer = Consumer::connect(&cluster.node(2).native, ConsumerConfig::default())
            .await
            .unwrap();
        consumer
            .assign("routed", None, Position::Earliest)
            .await
            .unwrap();
        let mut read = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while read.len() < 1200 && Instant::now() < deadline {
            for record in consumer.poll().await.unwrap() {
                read.insert(record.value.unwrap());
            }
        }
        assert_eq!(
            read.len(),
            1200,
            "every record read back through another broker"
        );

        // Each partition's records are in its leader's log: Metadata put it where it is. Every
        // broker reports the same leader.
        for (partition, leader) in &placed {
            let leader = leader.unwrap();
            for node in 1..=3 {
                let conn = Connection::connect(&cluster.node(node).native, "probe")
                    .await
                    .unwrap();
                let described: DescribeTopicsResponse = conn
                    .call(&Request::DescribeTopics(DescribeTopicsRequest {
                        names: vec!["routed".into()],
                    }))
                    .await
                    .unwrap();
                let p = &described.topics[0].partitions[*partition as usize];
                assert_eq!(p.leader, leader);
                if node == leader {
                    assert_eq!(p.error_code, 0);
                    assert_eq!(p.log_end_offset, written[partition], "{partition}");
                }
            }
            // A produce sent to a broker that does not lead the partition is refused.
            let other = (1..=3).find(|n| *n != leader).unwrap();
            let conn = Connection::connect(&cluster.node(other).native, "probe")
                .await
                .unwrap();
            let mut builder =
                cairn_protocol::batch::BatchBuilder::new(cairn_protocol::batch::Compression::None);
            builder.push(0, None, Some(b"misrouted"), &[]);
            let response: ProduceResponse = conn
                .call(&Request::Produce(ProduceRequest {
                    acks: 1,
                    timeout_ms: 5_000,
                    topics: vec![ProduceTopic {
                        name: "routed".into(),
                        partitions: vec![ProducePartition {
                            partition: *partition,
                            records: builder.build().unwrap(),
                        }],
                    }],
                }))
                .await
                .unwrap();
            assert_eq!(
                response.topics[0].partitions[0].error_code,
                ErrorCode::NOT_LEADER_OR_FOLLOWER.0
            );
        }

        // Kafka clients: produce through one broker's Kafka listener, consume through another.
        for (client, topic, produce, consume) in [
            ("confluent", "routed-confluent", 1, 3),
            ("kafka-python", "routed-kafka-python", 2, 1),
        ] {
            let out = Command::new(crate::kafka::python())
                .arg(crate::kafka::script("cluster.py"))
                .args([
                    client,
                    "--produce",
                    &cluster.node(produce).kafka,
                    "--consume",
                    &cluster.node(consume).kafka,
                    "--topic",
                    topic,
                    "--records",
                    "600",
                ])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{client}: {stdout}\n{}\nbroker logs:\n{}",
                String::from_utf8_lossy(&out.stderr),
                (1..=3)
                    .map(|n| tail(&cluster.process(n).log))
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            let summary: serde_json::Value =
                serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
            println!("{summary}");
            assert_eq!(summary["consumed"], 600);
            let theirs = &summary["leaders"];
            for (partition, leader) in leaders(&admin, topic).await {
                assert_eq!(
                    theirs[partition.to_string()].as_u64(),
                    leader.map(u64::from),
                    "{client}'s metadata puts {topic}-{partition} at its leader"
                );
            }
        }
    });

    // kcat (librdkafka 2.0.2) through yet another pair of brokers.
    let kcat = Command::new("kcat")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !kcat {
        println!("skipped kcat: not installed (scripts/test.sh installs it with apt as root)");
        return;
    }
    let input: String = (0..300).map(|i| format!("k{i}:kcat-{i}\n")).collect();
    let mut produce = Command::new("kcat")
        .args([
            "-P",
            "-b",
            &cluster.node(2).kafka,
            "-t",
            "routed-kcat",
            "-K:",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    produce
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    assert!(produce.wait().unwrap().success());
    let consumed = Command::new("kcat")
        .args([
            "-C",
            "-b",
            &cluster.node(3).kafka,
            "-t",
            "routed-kcat",
            "-e",
            "-q",
        ])
        .output()
        .unwrap();
    let values: std::collections::BTreeSet<String> = String::from_utf8_lossy(&consumed.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        values.len(),
        300,
        "kcat read back every record through another broker"
    );
}

#[test]
fn dedicated_controllers_vote_and_brokers_alone_hold_partitions() {
    use Roles::{Broker, Controller};
    // A long session: a broker killed below is fenced because its connection closed, not
    // because its session ran out.
    let mut cluster = TestCluster::start_roles(
        &[Controller, Controller, Controller, Broker, Broker],
        "broker_session_timeout_ms = 30000\n",
    );
    let rt = runtime();
    let active = rt.block_on(async {
        let admin = Admin::connect(&cluster.node(4).native).await.unwrap();
        active_controller(&admin).await;
        let described = admin.describe_cluster().await.unwrap();
        let brokers: Vec<u32> = described.brokers.iter().map(|b| b.node_id).collect();
        assert_eq!(brokers, [4, 5], "controllers register as no broker");
        assert_eq!(described.voters.len(), 3);
        assert!((1..=3).contains(&described.controller_id), "{described:?}");
        admin
            .create_topic_replicated("dedicated", 6, Some(2), &[])
            .await
            .unwrap();
        let metadata = admin.metadata(&["dedicated".into()]).await.unwrap();
        let mut leaders = std::collections::BTreeSet::new();
        for p in &metadata.topics[0].partitions {
            let mut replicas = p.replicas.clone();
            replicas.sort_unstable();
            assert_eq!(replicas, [4, 5], "replicas on brokers only: {p:?}");
            leaders.insert(p.leader);
        }
        assert_eq!(leaders.into_iter().collect::<Vec<_>>(), [4, 5]);
        let producer = Producer::connect(&cluster.node(4).native, ProducerConfig::default())
            .await
            .unwrap();
        for i in 0..60 {
            let delivery = producer
                .send(ProducerRecord::new("dedicated", format!("v{i}")).key(format!("k{i}")))
                .await
                .unwrap();
            delivery.await.unwrap();
        }
        producer.close().await.unwrap();
        described.controller_id
    });
    // Exactly one controller says it is active.
    let actives: u64 = (1..=3)
        .map(|id| {
            metric(
                &cluster.process(id).http_get("/metrics").1,
                "cairn_controller_active",
            )
        })
        .sum();
    assert_eq!(actives, 1);
    // The active controller dies: another takes over, the brokers keep their registrations
    // and serve a new topic.
    cluster.kill9(active);
    let killed = Instant::now();
    rt.block_on(async {
        let admin = Admin::connect(&cluster.bootstrap_except(None))
            .await
            .unwrap();
        loop {
            match admin
                .create_topic_replicated("after", 2, Some(2), &[])
                .await
            {
                Ok(()) => break,
                Err(err) => assert!(killed.elapsed() < Duration::from_secs(30), "{err}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let described = admin.describe_cluster().await.unwrap();
        assert_ne!(described.controller_id, active);
        let mut consumer = Consumer::connect(&cluster.node(5).native, ConsumerConfig::default())
            .await
            .unwrap();
        consumer
            .assign("dedicated", None, Position::Earliest)
            .await
            .unwrap();
        let mut read = 0;
        while read < 60 {
            read += consumer.poll().await.unwrap().len();
            assert!(killed.elapsed() < Duration::from_secs(30), "read {read}");
        }
    });
    let failover = killed.elapsed();
    // A broker process killed: its heartbeat connection closes, the controller fences it at
    // once, a fraction of its 30 s session. The controller knows the connections its own
    // heartbeats came on only: give broker 5 two heartbeats (1 s apart) to reach the new active
    // controller first. (Should the active controller change again, the new one never saw that
    // connection and waits for the session: then only that is checked.)
    std::thread::sleep(Duration::from_secs(2));
    let term_before = rt.block_on(async {
        let admin = Admin::connect(&cluster.node(4).native).await.unwrap();
        admin.describe_cluster().await.unwrap().term
    });
    cluster.kill9(5);
    let killed = Instant::now();
    let term_after = rt.block_on(async {
        let admin = Admin::connect(&cluster.node(4).native).await.unwrap();
        loop {
            let described = admin.describe_cluster().await.unwrap();
            let state = described
                .brokers
                .iter()
                .find(|b| b.node_id == 5)
                .map(|b| b.fenced);
            if state == Some(true) {
                return described.term;
            }
            let limit = if described.term == term_before {
                10
            } else {
                45
            };
            assert!(
                killed.elapsed() < Duration::from_secs(limit),
                "term {term_before} before the kill: {described:?}\n{}",
                cluster
                    .nodes
                    .get((described.controller_id as usize).wrapping_sub(1))
                    .and_then(|n| n.process.as_ref())
                    .map(|p| tail(&p.log))
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let fenced = killed.elapsed();
    println!(
        "dedicated controllers: active controller {active} killed, CreateTopics served again \
         after {failover:?}; a broker killed with SIGKILL fenced after {fenced:?} (session 30 s, \
         Raft term {term_before} -> {term_after})"
    );
}

#[test]
fn a_single_node_grows_into_a_cluster_and_keeps_its_topics() {
    let dir = tempfile::tempdir().unwrap();
    let (native1, kafka1, controller1) = (free_port(), free_port(), free_port());
    let first = BrokerProcess::start_with(&dir.path().join("node-1"), "", &native1, &kafka1, &[]);
    let rt = runtime();
    rt.block_on(async {
        let admin = Admin::connect(&native1).await.unwrap();
        admin.create_topic("before", 2, &[]).await.unwrap();
        let producer = Producer::connect(&native1, ProducerConfig::default())
            .await
            .unwrap();
        for i in 0..20 {
            let record = ProducerRecord::new("before", format!("v{i}")).partition(i % 2);
            producer.send(record).await.unwrap().await.unwrap();
        }
        producer.close().await.unwrap();
    });
    assert!(first.terminate().success());
    // The same single voter, now reachable, and a second node that joins as a broker.
    let quorum = format!("1@{controller1}");
    let voter = [
        "--controller-quorum".to_string(),
        quorum.clone(),
        "--controller-listen".to_string(),
        controller1.clone(),
    ];
    let first =
        BrokerProcess::start_with(&dir.path().join("node-1"), "", &native1, &kafka1, &voter);
    let joining = [
        "--node-id".to_string(),
        "2".to_string(),
        "--controller-quorum".to_string(),
        quorum,
    ];
    let second = BrokerProcess::start_with(
        &dir.path().join("node-2"),
        "",
        &free_port(),
        &free_port(),
        &joining,
    );
    rt.block_on(async {
        let admin = Admin::connect(&second.addr).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let described = admin.describe_cluster().await.unwrap();
            if described.brokers.len() == 2 && described.controller_id == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "{described:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        admin
            .create_topic_replicated("after", 4, None, &[])
            .await
            .unwrap();
        let placed = leaders(&admin, "after").await;
        let nodes: std::collections::BTreeSet<u32> = placed.values().flatten().copied().collect();
        assert_eq!(nodes.into_iter().collect::<Vec<_>>(), [1, 2], "{placed:?}");
        let metadata = admin.metadata(&["after".into()]).await.unwrap();
        assert!(
            metadata.topics[0]
                .partitions
                .iter()
                .all(|p| p.replicas.len() == 2),
            "default replication factor min(3, brokers) = 2"
        );
        // The old topic's records, read through the new broker.
        let mut consumer = Consumer::connect(&second.addr, ConsumerConfig::default())
            .await
            .unwrap();
        consumer
            .assign("before", None, Position::Earliest)
            .await
            .unwrap();
        let mut read = 0;
        while read < 20 {
            read += consumer.poll().await.unwrap().len();
            assert!(Instant::now() < deadline, "read {read}");
        }
    });
    drop((first, second));
}

#[test]
fn the_active_controller_is_replaced_within_seconds_and_the_whole_cluster_restarts_intact() {
    let mut cluster = TestCluster::start(3, "");
    let rt = runtime();
    let rounds = 20;
    let mut failovers = Vec::new();
    for round in 0..rounds {
        let active = rt.block_on(async {
            let admin = Admin::connect(&cluster.bootstrap_except(None))
                .await
                .unwrap();
            active_controller(&admin).await
        });
        assert!(
            (1..=3).contains(&active),
            "round {round}: active controller {active}"
        );
        cluster.kill9(active);
        let killed = Instant::now();
        let bootstrap = cluster.bootstrap_except(Some(active));
        let topic = format!("after-kill-{round}");
        rt.block_on(async {
            let deadline = killed + Duration::from_secs(30);
            loop {
                let created = async {
                    let admin = Admin::connect(&bootstrap).await?;
                    admin.create_topic_replicated(&topic, 1, Some(1), &[]).await
                };
                match created.await {
                    Ok(()) => break,
                    Err(err) => {
                        assert!(Instant::now() < deadline, "round {round}: {err}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        failovers.push(killed.elapsed());
        cluster.start_node(active);
        cluster.wait_ready(active);
    }
    failovers.sort();
    let p50 = failovers[rounds / 2];
    let p99 = failovers[rounds - 1];
    println!(
        "active controller killed {rounds} times: CreateTopics served again after p50 {p50:?}, \
         p99 (max of {rounds}) {p99:?}; all: {failovers:?}"
    );
    assert!(p50 < Duration::from_secs(2), "p50 {p50:?}");
    assert!(p99 < Duration::from_secs(3), "p99 {p99:?}");

    // Every node killed at once, then restarted: the metadata is all there.
    for id in 1..=3 {
        cluster.kill9(id);
    }
    for id in 1..=3 {
        cluster.start_node(id);
    }
    for id in 1..=3 {
        cluster.wait_ready(id);
    }
    rt.block_on(async {
        let admin = Admin::connect(&cluster.bootstrap_except(None))
            .await
            .unwrap();
        let topics = admin.list_topics().await.unwrap();
        for round in 0..rounds {
            assert!(
                topics.contains(&format!("after-kill-{round}")),
                "after-kill-{round} lost: {topics:?}"
            );
        }
        let status = admin.describe_cluster().await.unwrap();
        assert_eq!(status.brokers.iter().filter(|b| !b.fenced).count(), 3);
    });
}

#[test]
fn a_paused_broker_is_fenced_and_leads_again_when_it_resumes() {
    let cluster = TestCluster::start(
        3,
        "broker_session_timeout_ms = 3000\nbroker_heartbeat_interval_ms = 300\n",
    );
    let rt = runtime();
    let (paused, led) = rt.block_on(async {
        let admin = Admin::connect(&cluster.bootstrap_except(None))
            .await
            .unwrap();
        admin
            .create_topic_replicated("fenced", 6, Some(1), &[])
            .await
            .unwrap();
        // Pause a broker that is not the active controller (that failover is tested above).
        let controller = active_controller(&admin).await;
        let paused = (1..=3).find(|n| *n != controller).unwrap();
        let led: Vec<u32> = leaders(&admin, "fenced")
            .await
            .into_iter()
            .filter(|(_, l)| *l == Some(paused))
            .map(|(p, _)| p)
            .collect();
        (paused, led)
    });
    assert!(!led.is_empty());
    cluster.process(paused).signal("STOP");
    let stopped = Instant::now();
    let bootstrap = cluster.bootstrap_except(Some(paused));
    rt.block_on(async {
        let admin = Admin::connect(&bootstrap).await.unwrap();
        loop {
            let metadata = admin.metadata(&["fenced".into()]).await.unwrap();
            let gone = !metadata.brokers.iter().any(|b| b.node_id == paused);
            // A broker other than the one that created the topic may not have applied it yet
            // (followers learn of commits with the next Raft heartbeat): an empty answer then.
            let partitions = &metadata.topics[0].partitions;
            let offline = !partitions.is_empty()
                && led.iter().all(|p| {
                    let partition = &partitions[*p as usize];
                    partition.leader == u32::MAX
                        && partition.error_code == ErrorCode::LEADER_NOT_AVAILABLE.0
                        && partition.offline_replicas == [paused]
                });
            if gone && offline {
                break;
            }
            assert!(
                stopped.elapsed() < Duration::from_secs(20),
                "not fenced: {metadata:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let fenced_after = stopped.elapsed();
    // The active controller's metrics say so; the other live node is not the active one.
    let controller = rt.block_on(async {
        let admin = Admin::connect(&bootstrap).await.unwrap();
        active_controller(&admin).await
    });
    let other = (1..=3).find(|n| *n != controller && *n != paused).unwrap();
    let (_, active_metrics) = cluster.process(controller).http_get("/metrics");
    let (_, other_metrics) = cluster.process(other).http_get("/metrics");
    assert_eq!(metric(&active_metrics, "cairn_controller_active"), 1);
    assert_eq!(metric(&other_metrics, "cairn_controller_active"), 0);
    assert_eq!(
        metric(&active_metrics, "cairn_controller_fenced_brokers"),
        1
    );
    assert_eq!(
        metric(&active_metrics, "cairn_controller_offline_partitions"),
        led.len() as u64
    );
    assert_eq!(
        metric(&active_metrics, "cairn_controller_raft_term"),
        metric(&other_metrics, "cairn_controller_raft_term")
    );
    assert!(metric(&other_metrics, "cairn_metadata_applied_offset") > 0);
    let elections_before = metric(&active_metrics, "cairn_controller_leader_elections_total");
    // Another broker never takes over an RF 1 partition: it has none of its data.
    cluster.process(paused).signal("CONT");
    let resumed = Instant::now();
    rt.block_on(async {
        let admin = Admin::connect(&bootstrap).await.unwrap();
        loop {
            let now = leaders(&admin, "fenced").await;
            if led.iter().all(|p| now[p] == Some(paused)) {
                break;
            }
            assert!(
                resumed.elapsed() < Duration::from_secs(20),
                "not back: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // And it serves its partitions again.
        let producer = Producer::connect(&bootstrap, ProducerConfig::default())
            .await
            .unwrap();
        let delivery = producer
            .send(ProducerRecord::new("fenced", "after").partition(led[0]))
            .await
            .unwrap();
        delivery.await.unwrap();
        producer.close().await.unwrap();
    });
    // Its partitions' return counts as elections (read at whichever voter is active now: a
    // loaded machine may have moved the controller).
    let controller = rt.block_on(async {
        let admin = Admin::connect(&bootstrap).await.unwrap();
        active_controller(&admin).await
    });
    let (_, active_metrics) = cluster.process(controller).http_get("/metrics");
    assert!(
        metric(&active_metrics, "cairn_controller_leader_elections_total")
            >= elections_before + led.len() as u64
    );
    assert_eq!(
        metric(&active_metrics, "cairn_controller_fenced_brokers"),
        0
    );
    println!(
        "broker {paused} paused: fenced, its {} partitions offline after {fenced_after:?} \
         (session 3 s); after SIGCONT it led them again within {:?}",
        led.len(),
        resumed.elapsed()
    );
}

/// A broker alone on the fault-injecting file system: topics and acks=all records.
async fn fill(fs: &FaultFs, round: u32) -> Vec<(String, u64)> {
    let broker = start_on(fs).await.unwrap();
    let admin = Admin::with_connection(broker.connection("admin"));
    let topic = format!("t{round}");
    admin.create_topic(&topic, 2, &[]).await.unwrap();
    let producer = Producer::with_connection(
        broker.connection("producer"),
        ProducerConfig {
            acks: Acks::All,
            linger: Duration::ZERO,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let mut acked = Vec::new();
    for i in 0..50u64 {
        let delivery = producer
            .send(ProducerRecord::new(topic.clone(), format!("r{round}-{i}")))
            .await
            .unwrap();
        let metadata = delivery.await.unwrap();
        acked.push((
            format!("{}-{}", metadata.partition, metadata.offset.unwrap()),
            i,
        ));
    }
    producer.close().await.unwrap();
    // The process dies (nothing more reaches the file system), then the power goes.
    fs.die_after(Some(0));
    broker.kill().await;
    acked
}

async fn start_on(fs: &FaultFs) -> Result<cairn_broker::RunningBroker, String> {
    Broker::builder()
        .fs(Arc::new(fs.clone()))
        .data_dir("/data")
        .listen("127.0.0.1:0".parse().unwrap())
        .http_listen(None)
        .kafka_listen(None)
        .start()
        .await
        .map_err(|e| cairn_broker::error_chain(&e))
}

/// What survived: the topics and, per topic, the number of records readable; or why the
/// broker could not even start.
async fn survivors(fs: &FaultFs) -> Result<BTreeMap<String, usize>, String> {
    let broker = start_on(fs).await?;
    let admin = Admin::with_connection(broker.connection("admin"));
    let mut out = BTreeMap::new();
    let fast = ConsumerConfig {
        fetch_max_wait: Duration::from_millis(20),
        ..ConsumerConfig::default()
    };
    for topic in admin.list_topics().await.map_err(|e| e.to_string())? {
        if !topic.starts_with('t') {
            continue;
        }
        let mut consumer = Consumer::with_connection(broker.connection("check"), fast.clone());
        consumer
            .assign(&topic, None, Position::Earliest)
            .await
            .map_err(|e| e.to_string())?;
        let mut n = 0;
        loop {
            let records = consumer.poll().await.map_err(|e| e.to_string())?;
            if records.is_empty() {
                break;
            }
            n += records.len();
        }
        out.insert(topic, n);
    }
    broker.shutdown().await;
    Ok(out)
}

#[test]
fn a_quorum_of_one_keeps_every_committed_topic_and_record_through_power_losses() {
    let rt = runtime();
    let seeds = 8u64;
    rt.block_on(async {
        for seed in 0..seeds {
            let fs = FaultFs::new();
            // Two lives, each ending in a power loss: metadata written in the first must
            // survive the second too.
            for round in 0..2 {
                fill(&fs, round).await;
                fs.crash(seed * 10 + u64::from(round));
            }
            let found = survivors(&fs).await;
            assert_eq!(
                found,
                Ok(BTreeMap::from([
                    ("t0".to_string(), 50),
                    ("t1".to_string(), 50)
                ])),
                "seed {seed}: every committed topic and acks=all record"
            );
        }
        // Negative control: syncs that do nothing lose committed metadata or records.
        let mut lost = 0;
        for seed in 0..seeds {
            let fs = FaultFs::new();
            fs.set_faults(Faults {
                sync_is_noop: true,
                ..Faults::default()
            });
            fill(&fs, 0).await;
            fs.set_faults(Faults::default());
            fs.crash(seed);
            // A start may fail outright (the metadata log is damaged): that is a loss too.
            match survivors(&fs).await {
                Ok(found) if found.get("t0") == Some(&50) => {}
                Ok(found) => {
                    println!("control seed {seed}: found {found:?}");
                    lost += 1;
                }
                Err(why) => {
                    println!("control seed {seed}: cannot start: {why}");
                    lost += 1;
                }
            }
        }
        assert!(
            lost > 0,
            "negative control: with no-op syncs nothing was lost in {seeds} seeds"
        );
        println!(
            "negative control (no-op fsync): {lost} of {seeds} power losses lost committed data"
        );
    });
}

/// Decodes a native response frame (`raw_exchange`'s reply) as `T`, after its header.
fn decode_reply<T: cairn_protocol::native::Wire>(reply: &[u8]) -> T {
    let mut buf = bytes::Bytes::copy_from_slice(&reply[4..]);
    let header = ResponseHeader::decode(&mut buf, "header").unwrap();
    assert_eq!(header.error_code, 0, "{header:?}");
    decode_exact::<T>(buf).unwrap()
}

#[test]
fn the_cluster_requests_and_the_controller_listener_refuse_bad_input_and_keep_serving() {
    let cluster = TestCluster::start(
        1,
        "frame_read_timeout_ms = 1000\nconnection_idle_timeout_ms = 1500\n",
    );
    let rt = runtime();
    let addr = cluster.node(1).native.clone();
    let control = crate::broker::start_control_producer(&rt, &addr, &[]);
    std::thread::sleep(Duration::from_millis(500));
    let b = addr.as_str();
    use crate::broker::{frame, raw_exchange, response_error};

    // Each request the cluster added, truncated: INVALID_REQUEST, the connection answered.
    for key in [20u8, 21, 22, 23, 24] {
        let truncated = [0u8, key, 0, 0, 0, 0, 0, 7, 0, 0, 0xff];
        assert_eq!(
            response_error(&raw_exchange(b, &frame(&truncated))),
            Some(ErrorCode::INVALID_REQUEST.0),
            "api key {key}"
        );
    }
    // A replica fetch from a broker that is not a replica, asking for everything at the end of
    // time: refused per partition at once (no 60 s long poll, nothing allocated for u32::MAX).
    let fetch = |topic: &str, current_leader_epoch: u32| {
        encode_request(
            7,
            "bad",
            &Request::ReplicaFetch(ReplicaFetchRequest {
                replica_id: 42,
                broker_epoch: u64::MAX,
                max_wait_ms: u32::MAX,
                min_bytes: u32::MAX,
                max_bytes: u32::MAX,
                topics: vec![ReplicaFetchTopic {
                    name: topic.into(),
                    partitions: vec![ReplicaFetchPartition {
                        partition: 0,
                        current_leader_epoch,
                        fetch_offset: u64::MAX,
                        last_fetched_epoch: i32::MAX,
                        flushed_offset: u64::MAX,
                        partition_max_bytes: u32::MAX,
                    }],
                }],
            }),
        )
    };
    let started = Instant::now();
    for (topic, epoch, expected) in [
        ("control", u32::MAX, ErrorCode::UNKNOWN_LEADER_EPOCH),
        ("control", 0, ErrorCode::NOT_LEADER_OR_FOLLOWER),
        ("missing", 0, ErrorCode::UNKNOWN_TOPIC_OR_PARTITION),
    ] {
        let reply: ReplicaFetchResponse =
            decode_reply(&raw_exchange(b, &frame(&fetch(topic, epoch))));
        let p = &reply.topics[0].partitions[0];
        assert_eq!(ErrorCode(p.error_code), expected, "{topic} epoch {epoch}");
        assert!(p.records.is_empty());
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Reassignments to brokers that do not exist, twice the same, or of a missing topic.
    let reassign = encode_request(
        8,
        "bad",
        &Request::AlterPartitionReassignments(AlterPartitionReassignmentsRequest {
            reassignments: vec![
                Reassignment {
                    topic: "control".into(),
                    partition: 0,
                    replicas: vec![999],
                    cancel: false,
                },
                Reassignment {
                    topic: "control".into(),
                    partition: 0,
                    replicas: vec![1, 1],
                    cancel: false,
                },
                Reassignment {
                    topic: "missing".into(),
                    partition: 0,
                    replicas: vec![1],
                    cancel: false,
                },
            ],
        }),
    );
    let reply: AlterPartitionReassignmentsResponse =
        decode_reply(&raw_exchange(b, &frame(&reassign)));
    let codes: Vec<ErrorCode> = reply
        .results
        .iter()
        .map(|r| ErrorCode(r.error_code))
        .collect();
    assert_eq!(
        codes,
        [
            ErrorCode::INVALID_REPLICA_ASSIGNMENT,
            ErrorCode::INVALID_REPLICA_ASSIGNMENT,
            ErrorCode::UNKNOWN_TOPIC_OR_PARTITION
        ],
        "{reply:?}"
    );
    // InitProducerId with a nonsense id and epoch: a fresh id.
    let init = encode_request(
        9,
        "bad",
        &Request::InitProducerId(InitProducerIdRequest {
            producer_id: -7,
            producer_epoch: -3,
        }),
    );
    let reply: InitProducerIdResponse = decode_reply(&raw_exchange(b, &frame(&init)));
    assert_eq!(
        (reply.error_code, reply.producer_epoch),
        (0, 0),
        "{reply:?}"
    );
    assert!(reply.producer_id >= 0);

    // The controller listener (length-prefixed JSON): empty, oversized, not JSON, the wrong
    // shape, nested past any parser's depth: each closes the connection.
    let c = cluster.node(1).controller.clone();
    let nested = "[".repeat(100_000);
    for (what, bytes) in [
        ("empty frame", frame(b"")),
        ("oversized length", u32::MAX.to_be_bytes().to_vec()),
        ("not JSON", frame(&[0xff; 64])),
        ("wrong shape", frame(br#"{"NoSuchRequest": 7}"#)),
        ("nested", frame(nested.as_bytes())),
    ] {
        assert!(raw_exchange(&c, &bytes).is_empty(), "{what}: answered");
    }
    // 64 connections at once, each claiming a 60 MiB frame and stalling after 100 bytes: each
    // is closed once the frame stalls past frame_read_timeout_ms (1 s here), and nothing is
    // allocated for the claimed lengths (the buffer grows with what arrives).
    let started = Instant::now();
    let stalled: Vec<_> = (0..64)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut bytes = (60u32 << 20).to_be_bytes().to_vec();
                bytes.extend_from_slice(&[b'['; 100]);
                raw_exchange(&c, &bytes)
            })
        })
        .collect();
    for connection in stalled {
        assert!(
            connection.join().unwrap().is_empty(),
            "a stalled frame was answered"
        );
    }
    let closed_in = started.elapsed();
    assert!(
        closed_in < Duration::from_secs(4),
        "stalled frames held for {closed_in:?}"
    );
    // A connection that sends nothing is closed once idle past connection_idle_timeout_ms.
    let mut idle = std::net::TcpStream::connect(&c).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let read = std::io::Read::read(&mut idle, &mut [0u8; 1]);
    assert!(
        matches!(read, Ok(0)) && started.elapsed() < Duration::from_secs(4),
        "an idle controller connection: {read:?} after {:?}",
        started.elapsed()
    );

    // Everyone else was served throughout, and the controller still works.
    let n = rt.block_on(control).unwrap();
    assert!(
        n > 20,
        "the control producer kept going ({n} acks=all records)"
    );
    rt.block_on(async {
        Admin::connect(b)
            .await
            .unwrap()
            .create_topic("after", 2, &[])
            .await
            .unwrap();
    });
    assert!(cluster.process(1).http_get("/ready").0.contains("200"));
}
