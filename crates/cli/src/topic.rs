//! `cairn topic ...`.

use std::io::Write;

use anyhow::bail;
use clap::Subcommand;
use serde_json::json;

use crate::Output;

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Partition count [default: the broker's].
        #[arg(long, short)]
        partitions: Option<u32>,
        /// Replicas of each partition [default: min(3, live brokers)].
        #[arg(long, short = 'r')]
        replication_factor: Option<u16>,
        /// Topic config override, KEY=VALUE (Kafka keys: retention.ms, segment.bytes, ...).
        #[arg(long = "config", short = 'c', value_name = "KEY=VALUE")]
        configs: Vec<String>,
    },
    /// List topics.
    List,
    /// Show a topic's configs and partitions.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and its data.
    Delete {
        /// Topic name.
        name: String,
    },
    /// Grow a topic to more partitions.
    Alter {
        /// Topic name.
        name: String,
        /// The new partition count.
        #[arg(long, short)]
        partitions: u32,
    },
}

pub async fn run(
    brokers: &crate::Brokers,
    output: Output,
    command: TopicCommand,
) -> anyhow::Result<()> {
    let admin = brokers.admin().await?;
    // Written, not printed: a closed pipe (`| head`) is an error to return, not a panic.
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            configs,
        } => {
            let mut pairs = Vec::new();
            for config in configs {
                let Some((key, value)) = config.split_once('=') else {
                    bail!("--config {config:?} is not KEY=VALUE");
                };
                pairs.push((key.to_string(), value.to_string()));
            }
            admin
                .create_topic_replicated(&name, partitions.unwrap_or(0), replication_factor, &pairs)
                .await?;
            let described = admin.describe_topics(std::slice::from_ref(&name)).await?;
            let n = described.first().map_or(0, |t| t.partitions.len());
            let rf = described
                .first()
                .and_then(|t| t.partitions.first())
                .map_or(0, |p| p.replicas.len());
            match output {
                Output::Table => writeln!(
                    out,
                    "created topic {name}: {n} partitions, replication factor {rf}"
                )?,
                Output::Json => writeln!(
                    out,
                    "{}",
                    json!({"created": name, "partitions": n, "replication_factor": rf})
                )?,
            }
        }
        TopicCommand::List => {
            let topics = admin.describe_topics(&[]).await?;
            match output {
                Output::Table => {
                    writeln!(out, "{:<40} {:>10}", "NAME", "PARTITIONS")?;
                    for topic in &topics {
                        writeln!(out, "{:<40} {:>10}", topic.name, topic.partitions.len())?;
                    }
                }
                Output::Json => {
                    let list: Vec<_> = topics
                        .iter()
                        .map(|t| json!({"name": t.name, "partitions": t.partitions.len()}))
                        .collect();
                    writeln!(out, "{}", serde_json::Value::Array(list))?;
                }
            }
        }
        TopicCommand::Describe { name } => {
            let topics = admin.describe_topics(std::slice::from_ref(&name)).await?;
            let Some(topic) = topics.into_iter().next() else {
                bail!("topic {name} not found")
            };
            // Each follower's lag behind its leader's log end, in offsets.
            let replicas: Vec<(u32, Vec<u32>)> = topic
                .partitions
                .iter()
                .map(|p| (p.partition, p.replicas.clone()))
                .collect();
            let ends = admin.replica_log_ends(&name, &replicas).await;
            let lags = |p: &cairn_protocol::native::DescribedPartition| -> Vec<(u32, Option<u64>)> {
                p.replicas
                    .iter()
                    .filter(|r| **r != p.leader)
                    .map(|r| {
                        let lag = ends
                            .get(&(p.partition, *r))
                            .map(|end| p.log_end_offset.saturating_sub(*end));
                        (*r, lag)
                    })
                    .collect()
            };
            let lag_text = |p: &cairn_protocol::native::DescribedPartition| -> String {
                let text: Vec<String> = lags(p)
                    .into_iter()
                    .map(|(r, lag)| match lag {
                        Some(lag) => format!("{r}:{lag}"),
                        None => format!("{r}:?"),
                    })
                    .collect();
                if text.is_empty() {
                    "-".into()
                } else {
                    text.join(",")
                }
            };
            match output {
                Output::Table => {
                    writeln!(out, "topic {}", topic.name)?;
                    let width = topic
                        .configs
                        .iter()
                        .map(|c| c.key.len())
                        .max()
                        .unwrap_or(0)
                        .max(24);
                    writeln!(out, "\n{:<width$} {:<24} SOURCE", "CONFIG", "VALUE")?;
                    for config in &topic.configs {
                        writeln!(
                            out,
                            "{:<width$} {:<24} {}",
                            config.key,
                            config.value,
                            if config.is_default {
                                "default"
                            } else {
                                "topic"
                            }
                        )?;
                    }
                    writeln!(
                        out,
                        "\n{:>9} {:>6} {:>5} {:<12} {:<12} {:>12} {:>12} {:>12} {:>14} {:>8}  FOLLOWER-LAG",
                        "PARTITION",
                        "LEADER",
                        "EPOCH",
                        "REPLICAS",
                        "ISR",
                        "LOG-START",
                        "LOG-END",
                        "HIGH-WATER",
                        "SIZE-BYTES",
                        "SEGMENTS",
                    )?;
                    for p in &topic.partitions {
                        let leader = if p.leader == u32::MAX {
                            "none".to_string()
                        } else {
                            p.leader.to_string()
                        };
                        writeln!(
                            out,
                            "{:>9} {:>6} {:>5} {:<12} {:<12} {:>12} {:>12} {:>12} {:>14} {:>8}  {}",
                            p.partition,
                            leader,
                            p.leader_epoch,
                            ids(&p.replicas),
                            ids(&p.isr),
                            p.log_start_offset,
                            p.log_end_offset,
                            p.high_watermark,
                            p.size_bytes,
                            p.n_segments,
                            lag_text(p)
                        )?;
                    }
                }
                Output::Json => {
                    let configs: serde_json::Map<String, serde_json::Value> = topic
                        .configs
                        .iter()
                        .map(|c| (c.key.clone(), json!(c.value)))
                        .collect();
                    let partitions: Vec<_> = topic
                        .partitions
                        .iter()
                        .map(|p| {
                            json!({
                                "partition": p.partition,
                                "leader": (p.leader != u32::MAX).then_some(p.leader),
                                "leader_epoch": p.leader_epoch,
                                "replicas": p.replicas, "isr": p.isr,
                                "log_start_offset": p.log_start_offset, "log_end_offset": p.log_end_offset,
                                "high_watermark": p.high_watermark, "size_bytes": p.size_bytes, "segments": p.n_segments,
                                "follower_lag": lags(p).into_iter().map(|(r, lag)| json!({"node": r, "offsets": lag})).collect::<Vec<_>>(),
                            })
                        })
                        .collect();
                    writeln!(
                        out,
                        "{}",
                        json!({"name": topic.name, "configs": configs, "partitions": partitions})
                    )?;
                }
            }
        }
        TopicCommand::Alter { name, partitions } => {
            admin.create_partitions(&name, partitions).await?;
            match output {
                Output::Table => writeln!(out, "topic {name} now has {partitions} partitions")?,
                Output::Json => writeln!(
                    out,
                    "{}",
                    json!({"altered": name, "partitions": partitions})
                )?,
            }
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            match output {
                Output::Table => writeln!(out, "deleted topic {name}")?,
                Output::Json => writeln!(out, "{}", json!({"deleted": name}))?,
            }
        }
    }
    Ok(())
}

/// Node ids as `1,2,3`.
pub(crate) fn ids(nodes: &[u32]) -> String {
    nodes
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
