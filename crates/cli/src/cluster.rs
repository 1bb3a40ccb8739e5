//! `cairn cluster status` and `cairn dev cluster`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use cairn_broker::{Broker, BrokerConfig, RunningBroker};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::Output;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Brokers (id, address, rack, state, partitions led), the active controller, the Raft
    /// term, the quorum's voters and their lag, and offline and under-replicated partitions.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum LeaderCommand {
    /// Elect partition leaders: the preferred replica (the first; where it is live and in
    /// sync), or with `--unclean` any live replica for partitions without a leader (records
    /// only the lost replicas held are gone).
    Elect(ElectArgs),
}

#[derive(Debug, Args)]
pub struct ElectArgs {
    /// Preferred-replica election (the default).
    #[arg(long, conflicts_with = "unclean")]
    preferred: bool,
    /// Unclean election for partitions without a leader, whatever the topic's
    /// unclean.leader.election.enable.
    #[arg(long)]
    unclean: bool,
    /// Only this topic's partitions (every partition of the cluster without it).
    #[arg(long)]
    topic: Option<String>,
    /// Only this partition of `--topic`.
    #[arg(long, requires = "topic")]
    partition: Option<u32>,
}

/// `cairn leader elect`.
pub async fn elect(
    brokers: &crate::Brokers,
    output: Output,
    args: ElectArgs,
) -> anyhow::Result<()> {
    let admin = brokers.admin().await?;
    let partitions: Option<Vec<(String, u32)>> = match (&args.topic, args.partition) {
        (None, _) => None,
        (Some(topic), Some(p)) => Some(vec![(topic.clone(), p)]),
        (Some(topic), None) => {
            let described = admin.describe_topics(std::slice::from_ref(topic)).await?;
            let n = described.first().map_or(0, |t| t.partitions.len() as u32);
            Some((0..n).map(|p| (topic.clone(), p)).collect())
        }
    };
    let results = admin
        .elect_leaders(args.unclean, partitions.as_deref())
        .await?;
    crate::partition::report(
        output,
        &results,
        &crate::partition::Outcomes {
            done: "elected",
            none: Some("no election needed"),
            harmless: Some(cairn_protocol::native::ErrorCode::ELECTION_NOT_NEEDED),
            failed: "partition(s) could not be elected",
        },
    )
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Run N brokers on loopback in this process, each a controller voter too: a cluster for
    /// development and tests. Ports are printed; Ctrl-C stops them all.
    Cluster(DevClusterArgs),
}

#[derive(Debug, Args)]
pub struct DevClusterArgs {
    /// How many brokers.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Where their data directories go (node-1, node-2, ...).
    #[arg(long, default_value = "cairn-dev-cluster")]
    dir: PathBuf,
}

pub async fn status(brokers: &crate::Brokers, output: Output) -> anyhow::Result<()> {
    let admin = brokers.admin().await?;
    let cluster = admin.describe_cluster().await?;
    let metadata = admin.metadata(&[]).await?;
    let mut led: BTreeMap<u32, u32> = BTreeMap::new();
    let (mut n_partitions, mut offline, mut under) = (0u32, Vec::new(), Vec::new());
    for topic in &metadata.topics {
        for p in &topic.partitions {
            n_partitions += 1;
            if p.leader == u32::MAX {
                offline.push(format!("{}-{}", topic.name, p.partition));
            } else {
                *led.entry(p.leader).or_default() += 1;
            }
            if p.isr.len() < p.replicas.len() {
                under.push(format!("{}-{}", topic.name, p.partition));
            }
        }
    }
    let controller = |id: u32| (id != u32::MAX).then_some(id);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match output {
        Output::Table => {
            writeln!(
                out,
                "active controller {}, term {}, metadata offset {}",
                controller(cluster.controller_id).map_or("unknown".into(), |c| c.to_string()),
                cluster.term,
                cluster.metadata_offset
            )?;
            writeln!(
                out,
                "\n{:>6} {:<22} {:<22} {:<10} {:<8} {:>5}",
                "BROKER", "ADDRESS", "KAFKA", "RACK", "STATE", "LEADS"
            )?;
            for b in &cluster.brokers {
                writeln!(
                    out,
                    "{:>6} {:<22} {:<22} {:<10} {:<8} {:>5}",
                    b.node_id,
                    format!("{}:{}", b.host, b.port),
                    if b.kafka.is_empty() { "-" } else { &b.kafka },
                    if b.rack.is_empty() { "-" } else { &b.rack },
                    if b.fenced { "fenced" } else { "live" },
                    led.get(&b.node_id).copied().unwrap_or(0)
                )?;
            }
            writeln!(out, "\n{:>6} {:>8}", "VOTER", "LAG")?;
            for v in &cluster.voters {
                let lag = if v.lag < 0 {
                    "unknown".to_string()
                } else {
                    v.lag.to_string()
                };
                let active = if v.node_id == cluster.controller_id {
                    "  (active)"
                } else {
                    ""
                };
                writeln!(out, "{:>6} {:>8}{active}", v.node_id, lag)?;
            }
            writeln!(
                out,
                "\npartitions: {n_partitions}, offline: {}, under-replicated: {}",
                offline.len(),
                under.len()
            )?;
            if !offline.is_empty() {
                writeln!(out, "offline: {}", offline.join(" "))?;
            }
        }
        Output::Json => {
            let brokers: Vec<_> = cluster
                .brokers
                .iter()
                .map(|b| {
                    json!({
                        "node_id": b.node_id, "host": b.host, "port": b.port,
                        "kafka": (!b.kafka.is_empty()).then_some(&b.kafka),
                        "rack": (!b.rack.is_empty()).then_some(&b.rack),
                        "fenced": b.fenced, "broker_epoch": b.broker_epoch,
                        "partitions_led": led.get(&b.node_id).copied().unwrap_or(0),
                    })
                })
                .collect();
            let voters: Vec<_> = cluster
                .voters
                .iter()
                .map(|v| json!({"node_id": v.node_id, "lag": (v.lag >= 0).then_some(v.lag)}))
                .collect();
            writeln!(
                out,
                "{}",
                json!({
                    "controller_id": controller(cluster.controller_id),
                    "term": cluster.term,
                    "metadata_offset": cluster.metadata_offset,
                    "brokers": brokers,
                    "voters": voters,
                    "partitions": n_partitions,
                    "offline_partitions": offline,
                    "under_replicated_partitions": under,
                })
            )?;
        }
    }
    Ok(())
}

/// A free loopback port (bound, read, released: good enough for a development cluster).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

pub async fn dev_cluster(args: DevClusterArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > 9 {
        anyhow::bail!(
            "--nodes {}: a development cluster has 1 to 9 nodes",
            args.nodes
        );
    }
    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let mut ports = Vec::new();
    for _ in 0..args.nodes {
        ports.push((free_port()?, free_port()?, free_port()?, free_port()?));
    }
    let quorum = ports
        .iter()
        .enumerate()
        .map(|(i, (_, _, _, controller))| format!("{}@127.0.0.1:{controller}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let starts = ports
        .iter()
        .enumerate()
        .map(|(i, (native, kafka, http, controller))| {
            let node_id = i as u32 + 1;
            let config = BrokerConfig {
                node_id,
                data_dir: args.dir.join(format!("node-{node_id}")),
                listen: loopback(*native),
                kafka_listen: Some(loopback(*kafka)),
                http_listen: Some(loopback(*http)),
                controller_quorum: quorum.clone(),
                controller_listen: Some(loopback(*controller)),
                ..BrokerConfig::default()
            };
            Broker::builder().config(config).start()
        });
    let brokers: Vec<RunningBroker> = futures::future::try_join_all(starts)
        .await
        .context("starting the brokers")?;
    eprintln!(
        "cairn dev cluster: {} brokers, data in {}",
        brokers.len(),
        args.dir.display()
    );
    for (i, broker) in brokers.iter().enumerate() {
        eprintln!(
            "  node {}: native {}, kafka {}, http {}, controller 127.0.0.1:{}",
            i + 1,
            broker.native_addr(),
            broker
                .kafka_addr()
                .map_or("-".to_string(), |a| a.to_string()),
            broker
                .http_addr()
                .map_or("-".to_string(), |a| a.to_string()),
            ports.get(i).map_or(0, |p| p.3)
        );
    }
    let natives: Vec<String> = brokers
        .iter()
        .map(|b| b.native_addr().to_string())
        .collect();
    let kafkas: Vec<String> = brokers
        .iter()
        .filter_map(|b| b.kafka_addr().map(|a| a.to_string()))
        .collect();
    eprintln!(
        "bootstrap: --bootstrap {} (native), {} (kafka); Ctrl-C stops the cluster",
        natives.join(","),
        kafkas.join(",")
    );
    crate::broker::wait_for_signal().await?;
    for broker in brokers {
        broker.shutdown().await;
    }
    Ok(())
}
