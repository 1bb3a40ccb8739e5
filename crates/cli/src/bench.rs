//! `cairn bench`: produce, consume and end-to-end workloads against a broker, each reported beside
//! the physical baseline of this machine measured in the same run, without a broker:
//! - produce: one task sends the same bytes over loopback TCP, another receives and writes them to
//!   a file (with acks=all: one receiver per replica of the topic, each writing its own file, and
//!   syncing it where replication is durable);
//! - consume: one task reads a page-cached file and sends it over loopback TCP to a receiver.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use cairn_client::{
    Acks, Admin, BatchRecord, Compression, Consumer, ConsumerConfig, Position, Producer,
    ProducerConfig, ProducerRecord,
};
use clap::{Args, ValueEnum};
use futures::FutureExt as _;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::mpsc;

use crate::Output;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Producer throughput and acknowledgement latency.
    Produce,
    /// Consumer throughput over records produced first.
    Consume,
    /// Latency from send to receipt by a consumer, at a fixed rate.
    E2e,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    workload: Workload,
    /// Records to send.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Concurrent producers.
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// Acknowledgement: 0, 1 or all.
    #[arg(long, default_value = "1")]
    acks: String,
    /// Producer batch size.
    #[arg(long, default_value_t = 65_536)]
    batch_bytes: usize,
    /// Give each record a key (its index, 8 bytes), so the partitioner spreads records over
    /// every partition (murmur2), instead of filling one partition's batch at a time (sticky).
    #[arg(long)]
    keyed: bool,
    /// Records per `send_batch` call (the batch API, one future per batch, partitions in turn);
    /// 0 sends each record with `send` (one future per record).
    #[arg(long, default_value_t = 0)]
    batch_records: usize,
    /// Producer linger, milliseconds.
    #[arg(long, default_value_t = 1)]
    linger_ms: u64,
    /// Produce requests in flight per producer (idempotent with acks=all: at most 16, or 5
    /// against Apache Kafka).
    #[arg(long, default_value_t = 5)]
    max_in_flight: usize,
    /// Target rate, MB/s (e2e defaults to 50; others unlimited).
    #[arg(long)]
    rate: Option<f64>,
    /// Batch compression.
    #[arg(long, default_value = "none")]
    compression: String,
    /// Topic to use [default: a fresh cairn-bench-<time> topic].
    #[arg(long)]
    topic: Option<String>,
    /// Replicas per partition of the fresh topic [default: the cluster's, min(3, brokers)].
    #[arg(long, short = 'r')]
    replication_factor: Option<u16>,
    /// Topic configs of the fresh topic, KEY=VALUE (repeatable), e.g.
    /// `replication.durability=memory`.
    #[arg(long = "topic-config", value_name = "KEY=VALUE")]
    topic_configs: Vec<String>,
    /// Skip the baseline measurement.
    #[arg(long)]
    no_baseline: bool,
    /// Protocol to drive the broker with; `both` runs native, Kafka, Kafka, native and reports
    /// the Kafka/native throughput ratio.
    #[arg(long, value_enum, default_value_t = ProtocolChoice::Native)]
    protocol: ProtocolChoice,
    /// The broker's Kafka-protocol address, for `--protocol kafka` or `both` (any
    /// Kafka-compatible broker works with `--protocol kafka`).
    #[arg(long, env = "CAIRN_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    kafka_bootstrap: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolChoice {
    /// Cairn's native protocol.
    Native,
    /// The Apache Kafka protocol.
    Kafka,
    /// Native and Kafka, twice each in mirrored order, in one run.
    Both,
}

/// Where and how the workload connects.
#[derive(Debug, Clone)]
struct Target {
    name: &'static str,
    addr: String,
    kafka: bool,
    /// TLS for the native protocol's connections.
    tls: Option<cairn_client::ClientTls>,
}

impl Target {
    /// The cluster behind the bootstrap address, routing each partition to its leader.
    async fn cluster(&self, client_id: &str) -> anyhow::Result<cairn_client::Cluster> {
        let cluster = if self.kafka {
            cairn_client::Cluster::connect_with_dialect(
                &self.addr,
                client_id,
                std::sync::Arc::new(cairn_kafka_client::KafkaDialect),
            )
            .await
        } else {
            cairn_client::Cluster::connect_tls(&self.addr, client_id, self.tls.clone()).await
        };
        cluster.with_context(|| format!("connecting to {} ({})", self.addr, self.name))
    }
}

pub async fn run(brokers: &crate::Brokers, output: Output, args: BenchArgs) -> anyhow::Result<()> {
    let acks = crate::parse_acks(&args.acks)?;
    let compression = crate::parse_compression(&args.compression)?;
    if args.records == 0 || args.record_bytes < 8 || args.producers == 0 || args.partitions == 0 {
        bail!(
            "--records, --producers and --partitions must be positive and --record-bytes at least 8"
        );
    }
    let native = Target {
        name: "native",
        addr: brokers.bootstrap.clone(),
        kafka: false,
        tls: brokers.tls.clone(),
    };
    let kafka = Target {
        name: "kafka",
        addr: args.kafka_bootstrap.clone(),
        kafka: true,
        tls: None,
    };
    let targets = match args.protocol {
        ProtocolChoice::Native => vec![native],
        ProtocolChoice::Kafka => vec![kafka],
        // Twice each, in mirrored order (native, kafka, kafka, native), so neither protocol
        // always runs second (into the first run's page-cache writeback).
        ProtocolChoice::Both => vec![native.clone(), kafka.clone(), kafka, native],
    };
    let mut results = Vec::with_capacity(targets.len());
    let mut copies = Copies {
        replicas: 1,
        synced: true,
    };
    for target in &targets {
        settle();
        let (result, topic_copies) = run_workload(target, output, &args, acks, compression).await?;
        copies = topic_copies;
        results.push((target.name, result));
    }
    let total_bytes = args.records * args.record_bytes as u64;
    // acks=all waits for every in-sync replica: the baseline makes as many copies (and syncs
    // them where the topic's replication is durable).
    let replicas = copies.replicas.max(1);
    let copies_text = if replicas > 1 {
        format!(", {replicas} copies at once")
    } else {
        String::new()
    };
    // Not into the runs' writeback (or a broker deleting the run's topic).
    settle();
    let (baseline, baseline_name) = match args.workload {
        _ if args.no_baseline => (None, String::new()),
        Workload::Produce if acks == Acks::All => (
            Some(produce_baseline(total_bytes, copies.synced, replicas).await?),
            format!(
                "loopback TCP + file write{}{copies_text}",
                if copies.synced { " + fdatasync" } else { "" }
            ),
        ),
        Workload::Produce => (
            Some(produce_baseline(total_bytes, false, 1).await?),
            "loopback TCP + file write".to_string(),
        ),
        Workload::Consume => (
            Some(consume_baseline(total_bytes).await?),
            "page-cached file over loopback TCP".to_string(),
        ),
        Workload::E2e => (None, String::new()),
    };
    // Written, not printed: a closed pipe is an error to return, not a panic.
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (protocol, result) in &results {
        Report {
            result,
            protocol,
            baseline,
            baseline_name: &baseline_name,
        }
        .print(&mut out, output, &args, args.workload)?;
    }
    if args.protocol == ProtocolChoice::Both {
        // Bytes over seconds, summed over each protocol's runs.
        let rate = |name: &str| {
            let (bytes, secs) = results
                .iter()
                .filter(|(n, _)| *n == name)
                .fold((0.0, 0.0), |(b, s), (_, m)| {
                    (b + m.bytes as f64, s + m.elapsed.as_secs_f64())
                });
            bytes / f64::max(secs, 1e-9)
        };
        let ratio = rate("kafka") / rate("native");
        match output {
            Output::Json => writeln!(out, "{}", json!({ "kafka_to_native": ratio }))?,
            Output::Table => writeln!(out, "kafka / native throughput: {ratio:.2}")?,
        }
    }
    Ok(())
}

/// Writes dirty pages back before a run, so one run's writeback does not land in the next
/// (a no-op where `sync` is missing, or harmless when the broker is on another machine).
fn settle() {
    let _ = std::process::Command::new("sync").status();
}

/// How many copies of each byte the topic's replication makes, and whether they are synced
/// before acks=all is answered (durable replication) or only written.
#[derive(Debug, Clone, Copy)]
struct Copies {
    replicas: usize,
    synced: bool,
}

impl Copies {
    /// The topic's, as the cluster describes it (one synced copy if it cannot say: another
    /// Kafka-compatible broker, say).
    async fn of(admin: &Admin, topic: &str) -> Copies {
        let described = admin.describe_topics(&[topic.to_string()]).await.ok();
        let Some(topic) = described.as_ref().and_then(|t| t.first()) else {
            return Copies {
                replicas: 1,
                synced: true,
            };
        };
        Copies {
            replicas: topic.partitions.first().map_or(1, |p| p.replicas.len()),
            synced: !topic
                .configs
                .iter()
                .any(|c| c.key == "replication.durability" && c.value == "memory"),
        }
    }
}

/// Runs the workload over one protocol, on a fresh topic unless one was named.
async fn run_workload(
    target: &Target,
    output: Output,
    args: &BenchArgs,
    acks: Acks,
    compression: Compression,
) -> anyhow::Result<(Measured, Copies)> {
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| format!("cairn-bench-{}-{}", now_ms(), target.name));
    let admin = Admin::with_cluster(target.cluster("cairn-bench-admin").await?);
    if args.topic.is_none() {
        let configs = args
            .topic_configs
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| anyhow::anyhow!("--topic-config {kv:?} is not KEY=VALUE"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        admin
            .create_topic_replicated(&topic, args.partitions, args.replication_factor, &configs)
            .await?;
    }
    let copies = Copies::of(&admin, &topic).await;
    let progress = progress_bar(output, args.records);
    progress.set_message(target.name);
    let result = match args.workload {
        Workload::Produce => {
            produce(
                target,
                &topic,
                args,
                acks,
                compression,
                args.rate,
                &progress,
            )
            .await?
        }
        Workload::Consume => {
            progress.set_message("producing the records to consume");
            produce(target, &topic, args, acks, compression, None, &progress).await?;
            progress.reset();
            progress.set_message("consuming");
            consume(target, &topic, args, &progress).await?
        }
        Workload::E2e => {
            let rate = args.rate.unwrap_or(50.0);
            e2e(target, &topic, args, acks, compression, rate, &progress).await?
        }
    };
    progress.finish_and_clear();
    if args.topic.is_none() {
        admin.delete_topic(&topic).await?;
    }
    Ok((result, copies))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn progress_bar(output: Output, total: u64) -> indicatif::ProgressBar {
    if output == Output::Json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {bar:40} {pos}/{len} records ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar
}

struct Measured {
    records: u64,
    bytes: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    /// CPU time (user, system) this process spent on the run: the client's cost.
    cpu: Option<(Duration, Duration)>,
}

/// This process's CPU time so far (user, system), from `/proc/self/stat` (Linux; 10 ms ticks).
fn process_cpu() -> Option<(Duration, Duration)> {
    cpu_of("/proc/self/stat")
}

/// User and system CPU time from a `stat` file of /proc.
fn cpu_of(path: &str) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses: utime and stime
    // are the 12th and 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let tick = |t: &str| t.parse::<u64>().ok().map(|t| Duration::from_millis(t * 10));
    Some((tick(fields.next()?)?, tick(fields.next()?)?))
}

/// Process CPU spent since `before` (from [`process_cpu`]).
fn cpu_since(before: Option<(Duration, Duration)>) -> Option<(Duration, Duration)> {
    cpu_delta(before, process_cpu())
}

fn cpu_delta(
    before: Option<(Duration, Duration)>,
    after: Option<(Duration, Duration)>,
) -> Option<(Duration, Duration)> {
    let ((u0, s0), (u1, s1)) = (before?, after?);
    Some((u1.saturating_sub(u0), s1.saturating_sub(s0)))
}

struct Report<'a> {
    result: &'a Measured,
    protocol: &'a str,
    baseline: Option<Baseline>,
    baseline_name: &'a str,
}

impl Report<'_> {
    fn print(
        &self,
        out: &mut impl std::io::Write,
        output: Output,
        args: &BenchArgs,
        workload: Workload,
    ) -> std::io::Result<()> {
        let secs = self.result.elapsed.as_secs_f64().max(1e-9);
        let records_per_sec = self.result.records as f64 / secs;
        let mb_per_sec = self.result.bytes as f64 / secs / 1e6;
        let h = &self.result.latency_us;
        let q = |q: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        let ratio = self.baseline.map(|b| mb_per_sec / b.mb_per_sec);
        let gb = self.result.bytes as f64 / 1e9;
        let cpu_per_gb = self
            .result
            .cpu
            .map(|(user, sys)| (user.as_secs_f64() / gb, sys.as_secs_f64() / gb));
        match output {
            Output::Json => writeln!(
                out,
                "{}",
                json!({
                    "workload": format!("{workload:?}").to_lowercase(),
                    "protocol": self.protocol,
                    "records": self.result.records, "record_bytes": args.record_bytes, "partitions": args.partitions,
                    "producers": args.producers, "acks": args.acks, "batch_bytes": args.batch_bytes, "compression": args.compression,
                    "seconds": secs, "records_per_sec": records_per_sec, "mb_per_sec": mb_per_sec,
                    "latency_us": {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "p99_9": q(0.999), "max": if h.is_empty() { 0 } else { h.max() }},
                    "baseline": self.baseline.map(|b| json!({
                        "name": self.baseline_name, "mb_per_sec": b.mb_per_sec,
                        "client_cpu_s_per_gb": b.client_cpu.map(|(u, s)| json!({"user": u.as_secs_f64() / gb, "sys": s.as_secs_f64() / gb})),
                    })),
                    "ratio_to_baseline": ratio,
                    "client_cpu_s_per_gb": cpu_per_gb.map(|(u, s)| json!({"user": u, "sys": s, "total": u + s})),
                })
            )?,
            Output::Table => {
                writeln!(
                    out,
                    "bench {} ({}): {} records x {} B, {} partition(s), {} producer(s), acks={}, batch {} B, compression {}",
                    format!("{workload:?}").to_lowercase(),
                    self.protocol,
                    self.result.records,
                    args.record_bytes,
                    args.partitions,
                    args.producers,
                    args.acks,
                    args.batch_bytes,
                    args.compression
                )?;
                writeln!(
                    out,
                    "  throughput  {records_per_sec:>12.0} records/s  {mb_per_sec:>9.1} MB/s  ({secs:.2} s)"
                )?;
                if !h.is_empty() {
                    writeln!(
                        out,
                        "  latency us  p50 {}  p95 {}  p99 {}  p99.9 {}  max {}",
                        q(0.5),
                        q(0.95),
                        q(0.99),
                        q(0.999),
                        h.max()
                    )?;
                }
                if let Some((user, sys)) = cpu_per_gb {
                    writeln!(
                        out,
                        "  client CPU  {:.2} s/GB ({user:.2} user + {sys:.2} sys)",
                        user + sys
                    )?;
                }
                if let (Some(baseline), Some(ratio)) = (self.baseline, ratio) {
                    writeln!(
                        out,
                        "  baseline    {:>9.1} MB/s ({}), ratio {ratio:.2}",
                        baseline.mb_per_sec, self.baseline_name
                    )?;
                    if let Some((user, sys)) = baseline.client_cpu {
                        let (user, sys) = (user.as_secs_f64() / gb, sys.as_secs_f64() / gb);
                        writeln!(
                            out,
                            "  baseline client CPU {:.2} s/GB ({user:.2} user + {sys:.2} sys)",
                            user + sys
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).context("creating a histogram")
}

/// A send awaiting its acknowledgement.
enum Pending {
    Record(cairn_client::DeliveryFuture),
    Batch(cairn_client::BatchFuture),
}

/// Sends handed to the acknowledgement task at once: one channel hop per chunk, not per record.
const ACK_CHUNK: usize = 256;

/// Sends `args.records` records (one `send` each, or `send_batch` calls of
/// `--batch-records`); latency is from the send to its acknowledgement.
async fn produce(
    target: &Target,
    topic: &str,
    args: &BenchArgs,
    acks: Acks,
    compression: Compression,
    rate_mb: Option<f64>,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Measured> {
    let value = Bytes::from(
        (0..args.record_bytes)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..u64::from(args.producers) {
        let n = args.records / u64::from(args.producers)
            + u64::from(k < args.records % u64::from(args.producers));
        let config = ProducerConfig {
            acks,
            compression,
            batch_bytes: args.batch_bytes,
            linger: Duration::from_millis(args.linger_ms),
            client_id: format!("cairn-bench-{k}"),
            max_in_flight: args.max_in_flight,
            ..ProducerConfig::default()
        };
        let producer = Producer::with_cluster(target.cluster(&config.client_id).await?, config)?;
        let (topic, value, progress) = (Arc::<str>::from(topic), value.clone(), progress.clone());
        let per_record = rate_mb.map(|mb| {
            Duration::from_secs_f64(
                args.record_bytes as f64 * f64::from(args.producers) / (mb * 1e6),
            )
        });
        let (batch_records, partitions, keyed) =
            (args.batch_records as u64, args.partitions, args.keyed);
        tasks.push(tokio::spawn(async move {
            // Chunks of sends, each with the time of its first send (a chunk of 256 fills in
            // well under a millisecond; paced runs send chunks of one).
            let (tx, mut rx) = mpsc::channel::<(Instant, Vec<(u64, Pending)>)>(256);
            let acker = tokio::spawn(async move {
                let mut latency = histogram()?;
                while let Some((sent, chunk)) = rx.recv().await {
                    let mut acked = 0;
                    // The clock is read again only after waiting.
                    let mut now = Instant::now();
                    for (records, pending) in chunk {
                        let waited = match pending {
                            Pending::Record(mut delivery) => match (&mut delivery).now_or_never() {
                                Some(done) => done.map(|_| false)?,
                                None => delivery.await.map(|_| true)?,
                            },
                            Pending::Batch(mut batch) => match (&mut batch).now_or_never() {
                                Some(done) => done.map(|_| false)?,
                                None => batch.await.map(|_| true)?,
                            },
                        };
                        if waited {
                            now = Instant::now();
                        }
                        let _ = latency.record_n((now - sent).as_micros().max(1) as u64, records);
                        acked += records;
                    }
                    progress.inc(acked);
                }
                anyhow::Ok(latency)
            });
            let batch: Vec<BatchRecord> = (0..batch_records)
                .map(|_| BatchRecord {
                    value: Some(value.clone()),
                    ..BatchRecord::default()
                })
                .collect();
            let chunk_len = if per_record.is_some() { 1 } else { ACK_CHUNK };
            let mut chunk = Vec::with_capacity(chunk_len);
            let mut chunk_sent = Instant::now();
            let begin = Instant::now();
            let mut i = 0u64;
            let mut calls = 0u64;
            while i < n {
                if let Some(per_record) = per_record {
                    let due = begin + per_record.mul_f64(i as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                if chunk.is_empty() {
                    chunk_sent = Instant::now();
                }
                let (records, pending) = if batch_records == 0 {
                    let key = keyed.then(|| Bytes::copy_from_slice(&(k << 48 | i).to_be_bytes()));
                    let delivery = producer
                        .send(ProducerRecord {
                            topic: Arc::clone(&topic),
                            key,
                            value: Some(value.clone()),
                            ..Default::default()
                        })
                        .await?;
                    (1, Pending::Record(delivery))
                } else {
                    let records = batch_records.min(n - i);
                    let partition = ((k + calls) % u64::from(partitions)) as u32;
                    let slice = batch.get(..records as usize).unwrap_or_default();
                    let future = producer.send_batch(&topic, partition, slice).await?;
                    calls += 1;
                    (records, Pending::Batch(future))
                };
                i += records;
                chunk.push((records, pending));
                if chunk.len() == chunk_len || i == n {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(chunk_len));
                    if tx.send((chunk_sent, full)).await.is_err() {
                        // The acknowledgement task stopped at a failed delivery: report that.
                        return match acker.await? {
                            Err(err) => Err(err.context("a record was not acknowledged")),
                            Ok(_) => Err(anyhow::anyhow!("acknowledgement task stopped")),
                        };
                    }
                }
            }
            drop(tx);
            producer.flush().await?;
            let latency = acker.await??;
            producer.close().await?;
            anyhow::Ok(latency)
        }));
    }
    let mut latency_us = histogram()?;
    for task in tasks {
        latency_us.add(task.await??).context("merging histograms")?;
    }
    Ok(Measured {
        records: args.records,
        bytes: args.records * args.record_bytes as u64,
        elapsed: started.elapsed(),
        latency_us,
        cpu: cpu_since(cpu_before),
    })
}

async fn consume(
    target: &Target,
    topic: &str,
    args: &BenchArgs,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Measured> {
    let mut consumer = Consumer::with_cluster(
        target.cluster("cairn-bench").await?,
        ConsumerConfig {
            client_id: "cairn-bench".into(),
            ..ConsumerConfig::default()
        },
    );
    consumer.assign(topic, None, Position::Earliest).await?;
    let cpu_before = process_cpu();
    let started = Instant::now();
    let (mut records, mut bytes) = (0u64, 0u64);
    while records < args.records {
        for record in consumer.poll().await? {
            records += 1;
            bytes += record.value.map_or(0, |v| v.len() as u64);
        }
        progress.set_position(records);
    }
    Ok(Measured {
        records,
        bytes,
        elapsed: started.elapsed(),
        latency_us: histogram()?,
        cpu: cpu_since(cpu_before),
    })
}

/// A producer at `rate_mb` and a consumer; latency from send to receipt (the send time travels in
/// the first 8 bytes of each value, on this process's monotonic clock).
async fn e2e(
    target: &Target,
    topic: &str,
    args: &BenchArgs,
    acks: Acks,
    compression: Compression,
    rate_mb: f64,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Measured> {
    let origin = Instant::now();
    let mut consumer = Consumer::with_cluster(
        target.cluster("cairn-bench-e2e").await?,
        ConsumerConfig {
            client_id: "cairn-bench-e2e".into(),
            fetch_max_wait: Duration::from_millis(100),
            ..ConsumerConfig::default()
        },
    );
    consumer.assign(topic, None, Position::Latest).await?;
    let n = args.records;
    let reader = tokio::spawn(async move {
        let mut latency = histogram()?;
        let mut seen = 0u64;
        while seen < n {
            for record in consumer.poll().await? {
                let value = record.value.unwrap_or_default();
                let sent_us = value
                    .first_chunk::<8>()
                    .map_or(0, |b| u64::from_be_bytes(*b));
                let now_us = origin.elapsed().as_micros() as u64;
                let _ = latency.record(now_us.saturating_sub(sent_us).max(1));
                seen += 1;
            }
        }
        anyhow::Ok(latency)
    });
    let config = ProducerConfig {
        acks,
        compression,
        batch_bytes: args.batch_bytes,
        linger: Duration::from_millis(args.linger_ms),
        max_in_flight: args.max_in_flight,
        client_id: "cairn-bench-e2e".into(),
        ..ProducerConfig::default()
    };
    let producer = Producer::with_cluster(target.cluster(&config.client_id).await?, config)?;
    let per_record = Duration::from_secs_f64(args.record_bytes as f64 / (rate_mb * 1e6));
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let mut filler = vec![7u8; args.record_bytes];
    for i in 0..n {
        tokio::time::sleep_until((started + per_record.mul_f64(i as f64)).into()).await;
        if let Some(stamp) = filler.first_chunk_mut::<8>() {
            *stamp = (origin.elapsed().as_micros() as u64).to_be_bytes();
        }
        producer
            .send(ProducerRecord {
                topic: topic.into(),
                value: Some(Bytes::copy_from_slice(&filler)),
                ..Default::default()
            })
            .await?;
        sent.fetch_add(1, Ordering::Relaxed);
        progress.inc(1);
    }
    producer.close().await?;
    let latency_us = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .context("the consumer fell behind")???;
    Ok(Measured {
        records: n,
        bytes: n * args.record_bytes as u64,
        elapsed: started.elapsed(),
        latency_us,
        cpu: None,
    })
}

/// A baseline's figures.
#[derive(Debug, Clone, Copy)]
struct Baseline {
    mb_per_sec: f64,
    /// CPU (user, system) of its client side: the thread that sends (produce) or receives
    /// (consume), the floor for a client's CPU.
    client_cpu: Option<(Duration, Duration)>,
}

/// The calling thread's CPU time so far (user, system), from `/proc/thread-self/stat`.
fn thread_cpu() -> Option<(Duration, Duration)> {
    cpu_of("/proc/thread-self/stat")
}

/// Buffer size of the baselines: large, so system calls cost little.
const BASELINE_CHUNK: usize = 1 << 20;

/// Writes `total` filler bytes to `out` in [`BASELINE_CHUNK`] pieces.
fn write_filler(out: &mut impl std::io::Write, total: u64) -> std::io::Result<()> {
    let chunk = vec![7u8; BASELINE_CHUNK];
    let mut written = 0u64;
    while written < total {
        let n = (total - written).min(chunk.len() as u64) as usize;
        out.write_all(chunk.get(..n).unwrap_or_default())?;
        written += n as u64;
    }
    Ok(())
}

/// How often a durable baseline's receiver syncs what it wrote. Measured on the 2-core VM with
/// three writers at once (`fdatasync` every 0/8/16/32/64 MiB, 1 GiB each, alternating runs):
/// every 8-16 MiB was the fastest (381-633 MB/s per copy at 16 MiB, 255-618 syncing only at the
/// end, when the whole file is dirty and writers stall on dirty-page throttling); a broker's group
/// commit syncs as it goes too.
const BASELINE_SYNC_EVERY: u64 = 16 << 20;

/// MB/s of sending `total` bytes over loopback TCP to `copies` receivers that each write them
/// to a file of their own (and, with `sync`, make them durable: an fdatasync every
/// [`BASELINE_SYNC_EVERY`] and at the end):
/// the fastest simple program for what a broker, or a partition's replicas, do with produced
/// bytes; blocking I/O on a thread each, 1 MiB buffers. The MB/s counts `total` once.
async fn produce_baseline(total: u64, sync: bool, copies: usize) -> anyhow::Result<Baseline> {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir()?;
        let mut addrs = Vec::with_capacity(copies);
        let mut receivers = Vec::with_capacity(copies);
        for copy in 0..copies {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            addrs.push(listener.local_addr()?);
            let path = dir.path().join(format!("baseline-{copy}"));
            receivers.push(std::thread::spawn(move || {
                let (mut socket, _) = listener.accept()?;
                let mut file = std::fs::File::create(&path)?;
                let mut buf = vec![0u8; BASELINE_CHUNK];
                let mut unsynced = 0u64;
                loop {
                    let n = socket.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(buf.get(..n).unwrap_or_default())?;
                    unsynced += n as u64;
                    if sync && unsynced >= BASELINE_SYNC_EVERY {
                        file.sync_data()?;
                        unsynced = 0;
                    }
                }
                if sync {
                    file.sync_data()?;
                }
                anyhow::Ok(())
            }));
        }
        let send = move |addr: std::net::SocketAddr| {
            let mut socket = std::net::TcpStream::connect(addr)?;
            write_filler(&mut socket, total)?;
            socket.shutdown(std::net::Shutdown::Write)?;
            anyhow::Ok(())
        };
        let cpu_before = thread_cpu();
        let started = Instant::now();
        // Each copy its own sender, as a leader serves each follower on its own: a copy whose
        // receiver is syncing does not hold up the others.
        let (first, others) = addrs.split_first().context("no copies")?;
        let senders = others
            .iter()
            .map(|addr| {
                let addr = *addr;
                std::thread::spawn(move || send(addr))
            })
            .collect::<Vec<_>>();
        send(*first)?;
        // The sender's CPU is a client's floor only with one copy (a client sends once; the
        // replicas copy among themselves).
        let client_cpu = cpu_delta(cpu_before, thread_cpu()).filter(|_| copies == 1);
        for sender in senders {
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("baseline sender panicked"))??;
        }
        for receiver in receivers {
            receiver
                .join()
                .map_err(|_| anyhow::anyhow!("baseline receiver panicked"))??;
        }
        Ok(Baseline {
            mb_per_sec: total as f64 / started.elapsed().as_secs_f64() / 1e6,
            client_cpu,
        })
    })
    .await?
}

/// MB/s of reading a page-cached file of `total` bytes and sending it over loopback TCP to a
/// receiver: blocking I/O on two threads with 1 MiB buffers.
async fn consume_baseline(total: u64) -> anyhow::Result<Baseline> {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("baseline");
        {
            let mut file = std::fs::File::create(&path)?;
            write_filler(&mut file, total)?;
        }
        // Warm the page cache, as a broker's recently written segments are.
        let _ = std::fs::read(&path)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let receiver = std::thread::spawn(move || {
            let cpu_before = thread_cpu();
            let mut socket = std::net::TcpStream::connect(addr)?;
            let mut buf = vec![0u8; BASELINE_CHUNK];
            let mut received = 0u64;
            loop {
                let n = socket.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                received += n as u64;
            }
            anyhow::Ok((received, cpu_delta(cpu_before, thread_cpu())))
        });
        let started = Instant::now();
        let (mut socket, _) = listener.accept()?;
        let mut file = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; BASELINE_CHUNK];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            socket.write_all(buf.get(..n).unwrap_or_default())?;
        }
        socket.shutdown(std::net::Shutdown::Write)?;
        let (received, client_cpu) = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("baseline receiver panicked"))??;
        Ok(Baseline {
            mb_per_sec: received as f64 / started.elapsed().as_secs_f64() / 1e6,
            client_cpu,
        })
    })
    .await?
}
