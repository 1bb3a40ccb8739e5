//! `cairn produce`: one record per line of stdin.

use std::collections::VecDeque;
use std::io::Write;

use anyhow::Context;
use bytes::Bytes;
use cairn_client::{DeliveryFuture, Producer, ProducerConfig, ProducerRecord};
use clap::Args;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::Output;

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to produce to.
    topic: String,
    /// Split each line at the first SEP: the text before is the key, after is the value.
    #[arg(long, short = 'K')]
    key_separator: Option<String>,
    /// Partition to produce to [default: by key hash, or sticky for unkeyed records].
    #[arg(long, short)]
    partition: Option<u32>,
    /// Acknowledgement: 0 (none), 1 (leader appended) or all (durable).
    #[arg(long, default_value = "all")]
    acks: String,
    /// Batch compression: none, gzip, snappy, lz4, zstd.
    #[arg(long, default_value = "none")]
    compression: String,
}

/// Deliveries awaited in order; past this many pending, reading stdin waits.
const PENDING_MAX: usize = 100_000;

pub async fn run(
    brokers: &crate::Brokers,
    output: Output,
    args: ProduceArgs,
) -> anyhow::Result<()> {
    let acks = crate::parse_acks(&args.acks)?;
    let compression = crate::parse_compression(&args.compression)?;
    let config = ProducerConfig {
        acks,
        compression,
        client_id: "cairn-cli".into(),
        tls: brokers.tls.clone(),
        ..ProducerConfig::default()
    };
    let producer = Producer::connect(&brokers.bootstrap, config)
        .await
        .with_context(|| format!("connecting to {}", brokers.bootstrap))?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut pending: VecDeque<DeliveryFuture> = VecDeque::new();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut n_records = 0u64;
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        let (key, value) = match &args.key_separator {
            Some(sep) => match line.split_once(sep.as_str()) {
                Some((key, value)) => (Some(Bytes::from(key.to_string())), value.to_string()),
                None => (None, line),
            },
            None => (None, line),
        };
        let mut record = ProducerRecord::new(&args.topic, value);
        record.key = key;
        record.partition = args.partition;
        pending.push_back(producer.send(record).await?);
        n_records += 1;
        while pending.len() >= PENDING_MAX {
            if let Some(delivery) = pending.pop_front() {
                report(&mut out, output, delivery.await?)?;
            }
        }
    }
    producer.flush().await?;
    while let Some(delivery) = pending.pop_front() {
        report(
            &mut out,
            output,
            delivery
                .await
                .with_context(|| format!("producing to {}", args.topic))?,
        )?;
    }
    out.flush()?;
    producer.close().await?;
    if output == Output::Table {
        eprintln!("produced {n_records} records to {}", args.topic);
    }
    Ok(())
}

fn report(
    out: &mut impl Write,
    output: Output,
    metadata: cairn_client::RecordMetadata,
) -> anyhow::Result<()> {
    if output == Output::Json {
        match metadata.offset {
            Some(offset) => writeln!(
                out,
                "{}",
                json!({"partition": metadata.partition, "offset": offset})
            )?,
            None => writeln!(
                out,
                "{}",
                json!({"partition": metadata.partition, "offset": null})
            )?,
        }
    }
    Ok(())
}
