//! `cairn partition`: moving partitions' replicas between brokers (KIP-455), and
//! `cairn broker decommission`.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::Output;

/// (topic, partition, target replicas, or `None` to cancel).
type Move = (String, u32, Option<Vec<u32>>);

#[derive(Debug, Subcommand)]
pub enum PartitionCommand {
    /// Move a partition's replicas to other brokers: the new ones copy the log and join the ISR,
    /// then the old ones are dropped (the first replica becomes the preferred leader). With
    /// `--plan FILE.json` (Kafka's reassignment JSON: {"partitions": [{"topic", "partition",
    /// "replicas"}]}) several at once.
    Reassign(ReassignArgs),
    /// Reassignments under way: every replica, the ones being added and removed.
    Reassignments {
        /// Only these topics.
        topics: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct ReassignArgs {
    /// The topic (with `--partition` and `--replicas`).
    topic: Option<String>,
    /// The partition.
    #[arg(long, requires = "topic")]
    partition: Option<u32>,
    /// The target replicas, comma-separated node ids (the first leads by preference).
    #[arg(long, value_delimiter = ',', requires = "partition")]
    replicas: Vec<u32>,
    /// Cancel the partition's reassignment under way instead.
    #[arg(long, requires = "partition", conflicts_with = "replicas")]
    cancel: bool,
    /// A reassignment plan (Kafka's JSON format).
    #[arg(long, conflicts_with_all = ["topic", "partition", "replicas", "cancel"])]
    plan: Option<std::path::PathBuf>,
}

/// Runs `cairn partition ...`.
pub async fn run(
    brokers: &crate::Brokers,
    output: Output,
    command: PartitionCommand,
) -> anyhow::Result<()> {
    let admin = brokers.admin().await?;
    match command {
        PartitionCommand::Reassign(args) => {
            let asked: Vec<Move> = match (&args.plan, &args.topic) {
                (Some(path), _) => plan(path)?,
                (None, Some(topic)) => {
                    let partition = args
                        .partition
                        .context("--partition is needed with a topic")?;
                    if !args.cancel && args.replicas.is_empty() {
                        bail!("give --replicas (or --cancel)");
                    }
                    let replicas = (!args.cancel).then(|| args.replicas.clone());
                    vec![(topic.clone(), partition, replicas)]
                }
                (None, None) => bail!("give a topic with --partition and --replicas, or --plan"),
            };
            report(output, &admin.reassign(&asked).await?, &REASSIGNED)
        }
        PartitionCommand::Reassignments { topics } => {
            let ongoing = admin.list_reassignments(&topics).await?;
            let mut out = std::io::stdout().lock();
            match output {
                Output::Table => {
                    if ongoing.is_empty() {
                        writeln!(out, "no reassignment under way")?;
                    }
                    for r in &ongoing {
                        writeln!(
                            out,
                            "{}-{}: replicas {:?}, adding {:?}, removing {:?}",
                            r.topic, r.partition, r.replicas, r.adding, r.removing
                        )?;
                    }
                }
                Output::Json => {
                    let list: Vec<_> = ongoing
                        .iter()
                        .map(|r| {
                            json!({"topic": r.topic, "partition": r.partition,
                                "replicas": r.replicas, "adding": r.adding, "removing": r.removing})
                        })
                        .collect();
                    writeln!(out, "{}", serde_json::Value::Array(list))?;
                }
            }
            Ok(())
        }
    }
}

/// Kafka's reassignment JSON: `{"version": 1, "partitions": [{"topic": "t", "partition": 0,
/// "replicas": [1, 2, 3]}]}`.
fn plan(path: &std::path::Path) -> anyhow::Result<Vec<Move>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let partitions = value
        .get("partitions")
        .and_then(|p| p.as_array())
        .context("the plan has no \"partitions\" array")?;
    partitions
        .iter()
        .map(|p| {
            let field = |name: &str| p.get(name).cloned().unwrap_or_default();
            let topic = field("topic");
            let topic = topic.as_str().context("a partition without \"topic\"")?;
            let partition = field("partition")
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .context("a partition without a valid \"partition\"")?;
            let replicas = field("replicas");
            let replicas = replicas
                .as_array()
                .context("a partition without \"replicas\"")?
                .iter()
                .map(|r| {
                    r.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .context("a replica that is not a node id")
                })
                .collect::<anyhow::Result<Vec<u32>>>()?;
            Ok((topic.to_string(), partition, Some(replicas)))
        })
        .collect()
}

/// How per-partition outcomes of an operation are reported.
pub(crate) struct Outcomes<'a> {
    /// Said of a partition that succeeded.
    pub(crate) done: &'a str,
    /// Said when nothing was reported.
    pub(crate) none: Option<&'a str>,
    /// An error that is not a failure (nothing needed doing).
    pub(crate) harmless: Option<cairn_protocol::native::ErrorCode>,
    /// The end of the error message when some failed ("partition(s) ...").
    pub(crate) failed: &'a str,
}

/// Prints per-partition outcomes (table or JSON) and fails if any partition failed.
pub(crate) fn report(
    output: Output,
    results: &[(String, u32, cairn_protocol::native::ErrorCode, String)],
    how: &Outcomes<'_>,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match output {
        Output::Table => {
            if let (true, Some(none)) = (results.is_empty(), how.none) {
                writeln!(out, "{none}")?;
            }
            for (topic, partition, code, message) in results {
                if code.0 == 0 {
                    writeln!(out, "{topic}-{partition}: {}", how.done)?;
                } else {
                    writeln!(out, "{topic}-{partition}: {} {message}", code.name())?;
                }
            }
        }
        Output::Json => {
            let list: Vec<_> = results
                .iter()
                .map(|(topic, partition, code, message)| {
                    json!({"topic": topic, "partition": partition,
                        "error": (code.0 != 0).then(|| code.name()), "message": message})
                })
                .collect();
            writeln!(out, "{}", serde_json::Value::Array(list))?;
        }
    }
    let failed = results
        .iter()
        .filter(|(_, _, code, _)| code.0 != 0 && Some(*code) != how.harmless)
        .count();
    if failed > 0 {
        bail!("{failed} {}", how.failed);
    }
    Ok(())
}

const REASSIGNED: Outcomes<'static> = Outcomes {
    done: "reassignment started",
    none: None,
    harmless: None,
    failed: "reassignment(s) refused",
};

/// `cairn broker decommission N`: moves every replica off broker N (each to the live broker
/// holding the fewest replicas among those the partition does not use yet), so that it can be
/// stopped. Prints the reassignments started.
pub async fn decommission(
    brokers: &crate::Brokers,
    output: Output,
    node: u32,
) -> anyhow::Result<()> {
    let admin = brokers.admin().await?;
    let metadata = admin.metadata(&[]).await?;
    let live: Vec<u32> = metadata
        .brokers
        .iter()
        .map(|b| b.node_id)
        .filter(|id| *id != node)
        .collect();
    let mut load: BTreeMap<u32, usize> = live.iter().map(|id| (*id, 0)).collect();
    for p in metadata.topics.iter().flat_map(|t| &t.partitions) {
        for r in &p.replicas {
            if let Some(n) = load.get_mut(r) {
                *n += 1;
            }
        }
    }
    let mut asked = Vec::new();
    for topic in &metadata.topics {
        for p in &topic.partitions {
            if !p.replicas.contains(&node) {
                continue;
            }
            let Some((&to, _)) = load
                .iter()
                .filter(|(id, _)| !p.replicas.contains(id))
                .min_by_key(|(id, n)| (**n, **id))
            else {
                bail!(
                    "{}-{}: no live broker outside its replicas {:?} to take node {node}'s place",
                    topic.name,
                    p.partition,
                    p.replicas
                );
            };
            *load.entry(to).or_default() += 1;
            let replicas: Vec<u32> = p
                .replicas
                .iter()
                .map(|r| if *r == node { to } else { *r })
                .collect();
            asked.push((topic.name.clone(), p.partition, Some(replicas)));
        }
    }
    if asked.is_empty() {
        writeln!(std::io::stdout(), "broker {node} holds no replicas")?;
        return Ok(());
    }
    report(output, &admin.reassign(&asked).await?, &REASSIGNED)
}
