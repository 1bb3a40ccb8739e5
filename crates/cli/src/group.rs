//! `cairn group ...`: consumer groups, their members, committed offsets and lag.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use anyhow::{Context, bail};
use cairn_client::{Admin, Assignment, ErrorCode};
use clap::Subcommand;
use serde_json::json;

use crate::Output;

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List groups (with members or committed offsets).
    List,
    /// Show a group's state, members, assignments, committed offsets and lag per partition.
    Describe {
        /// Group id.
        group: String,
    },
    /// Set a group's committed offsets for a topic (the group must have no members).
    ResetOffsets {
        /// Group id.
        group: String,
        /// Topic whose offsets to set.
        #[arg(long)]
        topic: String,
        /// Only this partition [default: all].
        #[arg(long, short)]
        partition: Option<u32>,
        /// earliest, latest, an OFFSET, or @UNIX_MS (the first record at or after that time).
        #[arg(long)]
        to: String,
        /// Print the new offsets without committing them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete a group without members (its committed offsets).
    Delete {
        /// Group id.
        group: String,
    },
}

pub async fn run(
    brokers: &crate::Brokers,
    output: Output,
    command: GroupCommand,
) -> anyhow::Result<()> {
    let admin = brokers.admin().await?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match command {
        GroupCommand::List => {
            let groups = admin.list_groups().await?;
            match output {
                Output::Table => {
                    writeln!(out, "{:<32} {:<20} TYPE", "GROUP", "STATE")?;
                    for g in groups {
                        writeln!(
                            out,
                            "{:<32} {:<20} {}",
                            g.group_id, g.state, g.protocol_type
                        )?;
                    }
                }
                Output::Json => {
                    let list: Vec<_> = groups
                        .iter()
                        .map(|g| json!({"group": g.group_id, "state": g.state, "protocol_type": g.protocol_type}))
                        .collect();
                    writeln!(out, "{}", json!(list))?;
                }
            }
        }
        GroupCommand::Describe { group } => describe(&admin, output, &group, &mut out).await?,
        GroupCommand::ResetOffsets {
            group,
            topic,
            partition,
            to,
            dry_run,
        } => {
            let timestamp = match to.as_str() {
                "earliest" => Some(cairn_protocol::native::EARLIEST_TIMESTAMP),
                "latest" => Some(cairn_protocol::native::LATEST_TIMESTAMP),
                t if t.starts_with('@') => Some(
                    t.strip_prefix('@')
                        .unwrap_or(t)
                        .parse::<i64>()
                        .ok()
                        .filter(|ms| *ms >= 0)
                        .with_context(|| format!("--to {t:?}: @ needs Unix ms"))?,
                ),
                _ => None,
            };
            let partitions = match partition {
                Some(p) => vec![p],
                None => {
                    let described = admin.describe_topics(std::slice::from_ref(&topic)).await?;
                    described
                        .iter()
                        .flat_map(|t| t.partitions.iter().map(|p| p.partition))
                        .collect()
                }
            };
            let offsets: Vec<(u32, u64)> = match timestamp {
                Some(ts) => admin.list_offsets(&topic, &partitions, ts).await?,
                None => {
                    let offset: u64 = to.parse().with_context(|| {
                        format!("--to {to:?}: use earliest, latest, OFFSET or @UNIX_MS")
                    })?;
                    partitions.iter().map(|p| (*p, offset)).collect()
                }
            };
            let commits: Vec<(String, u32, u64)> = offsets
                .iter()
                .map(|(p, o)| (topic.clone(), *p, *o))
                .collect();
            if !dry_run {
                admin
                    .commit_offsets(&group, &commits)
                    .await
                    .map_err(|err| {
                        if err.code() == Some(ErrorCode::UNKNOWN_MEMBER_ID) {
                            anyhow::anyhow!(
                                "{err} (the group has members: stop its consumers first)"
                            )
                        } else {
                            err.into()
                        }
                    })?;
            }
            match output {
                Output::Table => {
                    writeln!(
                        out,
                        "{:<32} {:>9} {:>14}",
                        "TOPIC", "PARTITION", "NEW-OFFSET"
                    )?;
                    for (t, p, o) in &commits {
                        writeln!(out, "{t:<32} {p:>9} {o:>14}")?;
                    }
                    if dry_run {
                        writeln!(out, "(dry run: nothing committed)")?;
                    }
                }
                Output::Json => {
                    let list: Vec<_> = commits
                        .iter()
                        .map(|(t, p, o)| json!({"topic": t, "partition": p, "offset": o}))
                        .collect();
                    writeln!(
                        out,
                        "{}",
                        json!({"group": group, "dry_run": dry_run, "offsets": list})
                    )?;
                }
            }
        }
        GroupCommand::Delete { group } => {
            admin.delete_group(&group).await?;
            match output {
                Output::Table => writeln!(out, "deleted group {group}")?,
                Output::Json => writeln!(out, "{}", json!({"deleted": group}))?,
            }
        }
    }
    Ok(())
}

/// One partition's row in `describe`.
struct Row {
    topic: String,
    partition: u32,
    committed: Option<u64>,
    end: Option<u64>,
    owner: Option<String>,
}

async fn describe(
    admin: &Admin,
    output: Output,
    group: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let info = admin.describe_group(group).await?;
    if info.state == "Dead" {
        bail!("group {group} not found");
    }
    let committed = admin.committed_offsets(group).await?;
    // Partitions: the assigned ones and the committed ones.
    let mut rows: BTreeMap<(String, u32), Row> = BTreeMap::new();
    let mut members = Vec::new();
    for member in &info.members {
        let assigned = Assignment::decode(member.assignment.clone())
            .map(|a| a.partitions)
            .unwrap_or_default();
        for (topic, p) in &assigned {
            rows.entry((topic.clone(), *p))
                .or_insert_with(|| Row {
                    topic: topic.clone(),
                    partition: *p,
                    committed: None,
                    end: None,
                    owner: None,
                })
                .owner = Some(member.member_id.clone());
        }
        members.push((member, assigned));
    }
    for (topic, p, offset) in committed {
        rows.entry((topic.clone(), p))
            .or_insert_with(|| Row {
                topic,
                partition: p,
                committed: None,
                end: None,
                owner: None,
            })
            .committed = Some(offset);
    }
    let topics: BTreeSet<String> = rows.keys().map(|(t, _)| t.clone()).collect();
    if !topics.is_empty() {
        let names: Vec<String> = topics.into_iter().collect();
        for topic in admin.describe_topics(&names).await.unwrap_or_default() {
            for p in topic.partitions {
                if let Some(row) = rows.get_mut(&(topic.name.clone(), p.partition)) {
                    row.end = Some(p.high_watermark);
                }
            }
        }
    }
    let lag = |row: &Row| match (row.committed, row.end) {
        (Some(c), Some(e)) => Some(e.saturating_sub(c)),
        (None, Some(e)) if row.owner.is_some() => Some(e),
        _ => None,
    };
    let dash = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    match output {
        Output::Table => {
            writeln!(
                out,
                "group {group}: state {}, assignor {}, generation {}, {} members",
                info.state,
                if info.protocol.is_empty() {
                    "-"
                } else {
                    &info.protocol
                },
                info.generation,
                info.members.len()
            )?;
            if !members.is_empty() {
                writeln!(out)?;
                writeln!(out, "{:<48} {:<24} PARTITIONS", "MEMBER", "CLIENT")?;
                for (member, assigned) in &members {
                    let list: Vec<String> =
                        assigned.iter().map(|(t, p)| format!("{t}-{p}")).collect();
                    writeln!(
                        out,
                        "{:<48} {:<24} {}",
                        member.member_id,
                        member.client_id,
                        list.join(",")
                    )?;
                }
            }
            writeln!(out)?;
            writeln!(
                out,
                "{:<24} {:>9} {:>14} {:>14} {:>10}  MEMBER",
                "TOPIC", "PARTITION", "COMMITTED", "LOG-END", "LAG"
            )?;
            for row in rows.values() {
                writeln!(
                    out,
                    "{:<24} {:>9} {:>14} {:>14} {:>10}  {}",
                    row.topic,
                    row.partition,
                    dash(row.committed),
                    dash(row.end),
                    dash(lag(row)),
                    row.owner.as_deref().unwrap_or("-")
                )?;
            }
        }
        Output::Json => {
            let partitions: Vec<_> = rows
                .values()
                .map(|row| {
                    json!({
                        "topic": row.topic,
                        "partition": row.partition,
                        "committed": row.committed,
                        "log_end": row.end,
                        "lag": lag(row),
                        "member": row.owner,
                    })
                })
                .collect();
            let members: Vec<_> = members
                .iter()
                .map(|(m, assigned)| {
                    json!({
                        "member_id": m.member_id,
                        "client_id": m.client_id,
                        "partitions": assigned.iter().map(|(t, p)| json!({"topic": t, "partition": p})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            writeln!(
                out,
                "{}",
                json!({
                    "group": group,
                    "state": info.state,
                    "assignor": info.protocol,
                    "generation": info.generation,
                    "members": members,
                    "partitions": partitions,
                })
            )?;
        }
    }
    Ok(())
}
