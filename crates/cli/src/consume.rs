//! `cairn consume`.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{Context, bail};
use cairn_client::{
    Consumer, ConsumerConfig, ConsumerRecord, GroupConfig, GroupConsumer, Position,
};
use clap::Args;
use serde_json::json;

use crate::Output;

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Where to start: earliest, latest, an OFFSET, or @UNIX_MS.
    #[arg(long, default_value = "earliest")]
    from: String,
    /// Only this partition [default: all].
    #[arg(long, short, conflicts_with = "group")]
    partition: Option<u32>,
    /// Consume as a member of this group: share the partitions with its other members, start
    /// from its committed offsets (`--from` earliest or latest where it has none), commit what
    /// was printed, leave the group on exit or Ctrl-C.
    #[arg(long, short)]
    group: Option<String>,
    /// Stop after this many records.
    #[arg(long, short = 'n')]
    count: Option<u64>,
    /// Stop at the end offsets seen when starting.
    #[arg(long, conflicts_with = "group")]
    until_end: bool,
    /// Output per record: %t topic, %p partition, %o offset, %k key, %v value, %T timestamp,
    /// %% a percent sign, \n newline, \t tab [default: %v]. A newline ends each record.
    #[arg(long, short)]
    format: Option<String>,
}

fn parse_from(from: &str) -> anyhow::Result<Position> {
    Ok(match from {
        "earliest" | "beginning" | "start" => Position::Earliest,
        "latest" | "end" => Position::Latest,
        ts if ts.starts_with('@') => {
            let ms = ts.trim_start_matches('@');
            Position::Timestamp(
                ms.parse()
                    .with_context(|| format!("--from {ts:?}: @ needs Unix ms"))?,
            )
        }
        offset => Position::Offset(offset.parse().with_context(|| {
            format!("--from {offset:?}: use earliest, latest, OFFSET or @UNIX_MS")
        })?),
    })
}

pub async fn run(
    brokers: &crate::Brokers,
    output: Output,
    args: ConsumeArgs,
) -> anyhow::Result<()> {
    let from = parse_from(&args.from)?;
    if let Some(group) = &args.group {
        return run_group(brokers, output, group, from, &args).await;
    }
    let mut consumer = Consumer::connect(
        &brokers.bootstrap,
        ConsumerConfig {
            client_id: "cairn-cli".into(),
            tls: brokers.tls.clone(),
            ..ConsumerConfig::default()
        },
    )
    .await
    .with_context(|| format!("connecting to {}", brokers.bootstrap))?;
    let partitions = consumer
        .assign(&args.topic, args.partition.map(|p| vec![p]), from)
        .await
        .with_context(|| format!("assigning {}", args.topic))?;
    let mut ends: HashMap<u32, u64> = HashMap::new();
    if args.until_end {
        for &p in &partitions {
            ends.insert(p, consumer.end_offset(&args.topic, p).await?);
        }
    }
    let format = args.record_format();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut n = 0u64;
    let done = |consumer: &Consumer, n: u64| {
        args.count.is_some_and(|count| n >= count)
            || (args.until_end
                && partitions.iter().all(|p| {
                    consumer.position(&args.topic, *p).unwrap_or(0)
                        >= ends.get(p).copied().unwrap_or(0)
                }))
    };
    while !done(&consumer, n) {
        let records = consumer.poll().await?;
        for record in records {
            if args.count.is_some_and(|count| n >= count) {
                break;
            }
            if args.until_end && record.offset >= ends.get(&record.partition).copied().unwrap_or(0)
            {
                continue;
            }
            print(&mut out, output, &format, &record)?;
            n += 1;
        }
        out.flush()?;
    }
    out.flush()?;
    Ok(())
}

async fn run_group(
    brokers: &crate::Brokers,
    output: Output,
    group: &str,
    from: Position,
    args: &ConsumeArgs,
) -> anyhow::Result<()> {
    if !matches!(from, Position::Earliest | Position::Latest) {
        bail!(
            "with --group, --from is earliest or latest (where the group has no committed offset)"
        );
    }
    let mut config = GroupConfig::new(group, &[args.topic.as_str()]);
    config.reset = from;
    config.consumer.client_id = "cairn-cli".into();
    config.consumer.tls = brokers.tls.clone();
    let mut consumer = GroupConsumer::connect(&brokers.bootstrap, config)
        .await
        .with_context(|| format!("joining group {group} at {}", brokers.bootstrap))?;
    let format = args.record_format();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut n = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    'outer: while args.count.is_none_or(|count| n < count) {
        let records = tokio::select! {
            records = consumer.poll() => records?,
            _ = &mut interrupted => break,
        };
        let mut records = records.into_iter();
        for record in records.by_ref() {
            if args.count.is_some_and(|count| n >= count) {
                // Not printed: rewind each partition to its first unprinted record, so the
                // group's commit does not skip them.
                let mut rewound = std::collections::BTreeSet::new();
                for r in std::iter::once(record).chain(records) {
                    if rewound.insert((r.topic.clone(), r.partition)) {
                        consumer
                            .seek(&r.topic, r.partition, Position::Offset(r.offset))
                            .await?;
                    }
                }
                out.flush()?;
                break 'outer;
            }
            print(&mut out, output, &format, &record)?;
            n += 1;
        }
        out.flush()?;
    }
    out.flush()?;
    consumer.close().await?;
    Ok(())
}

/// One record, as `--output` and `--format` say.
fn print(
    out: &mut impl Write,
    output: Output,
    format: &str,
    record: &ConsumerRecord,
) -> anyhow::Result<()> {
    match output {
        Output::Json => writeln!(out, "{}", to_json(record))?,
        Output::Table => write_formatted(out, format, record)?,
    }
    Ok(())
}

impl ConsumeArgs {
    /// `--format` with its escapes resolved (default: the value).
    fn record_format(&self) -> String {
        self.format
            .as_deref()
            .map(unescape)
            .unwrap_or_else(|| "%v".to_string())
    }
}

fn unescape(format: &str) -> String {
    format.replace("\\n", "\n").replace("\\t", "\t")
}

fn text(bytes: &Option<bytes::Bytes>) -> std::borrow::Cow<'_, str> {
    match bytes {
        Some(bytes) => String::from_utf8_lossy(bytes),
        None => std::borrow::Cow::Borrowed(""),
    }
}

fn write_formatted(
    out: &mut impl Write,
    format: &str,
    record: &ConsumerRecord,
) -> anyhow::Result<()> {
    let mut chars = format.chars().peekable();
    let mut line = String::new();
    while let Some(c) = chars.next() {
        if c != '%' {
            line.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => line.push_str(&record.topic),
            Some('p') => line.push_str(&record.partition.to_string()),
            Some('o') => line.push_str(&record.offset.to_string()),
            Some('k') => line.push_str(&text(&record.key)),
            Some('v') => line.push_str(&text(&record.value)),
            Some('T') => line.push_str(&record.timestamp.to_string()),
            Some('%') => line.push('%'),
            Some(other) => bail!("--format: unknown escape %{other}"),
            None => line.push('%'),
        }
    }
    if !line.ends_with('\n') {
        line.push('\n');
    }
    out.write_all(line.as_bytes())?;
    Ok(())
}

fn to_json(record: &ConsumerRecord) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = record
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_ref().map_or(serde_json::Value::Null, |v| {
                    json!(String::from_utf8_lossy(v))
                }),
            )
        })
        .collect();
    json!({
        "topic": &*record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": record.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
        "value": record.value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
        "headers": headers,
    })
}
