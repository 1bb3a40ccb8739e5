//! `cairn bench`: produce, consume and end-to-end workloads against a broker, each reported beside
//! the physical baseline of this machine measured in the same run, without a broker:
//! - produce: one task sends the same bytes over loopback TCP, another receives and writes them to
//!   a file;
//! - consume: one task reads a page-cached file and sends it over loopback TCP to a receiver.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use cairn_client::{
    Acks, Admin, Compression, Consumer, ConsumerConfig, Position, Producer, ProducerConfig,
    ProducerRecord,
};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
            cairn_client::Cluster::connect(&self.addr, client_id).await
        };
        cluster.with_context(|| format!("connecting to {} ({})", self.addr, self.name))
    }
}

pub async fn run(bootstrap: &str, output: Output, args: BenchArgs) -> anyhow::Result<()> {
    let acks = crate::parse_acks(&args.acks)?;
    let compression = crate::parse_compression(&args.compression)?;
    if args.records == 0 || args.record_bytes < 8 || args.producers == 0 || args.partitions == 0 {
        bail!(
            "--records, --producers and --partitions must be positive and --record-bytes at least 8"
        );
    }
    let native = Target {
        name: "native",
        addr: bootstrap.to_string(),
        kafka: false,
    };
    let kafka = Target {
        name: "kafka",
        addr: args.kafka_bootstrap.clone(),
        kafka: true,
    };
    let targets = match args.protocol {
        ProtocolChoice::Native => vec![native],
        ProtocolChoice::Kafka => vec![kafka],
        // Twice each, in mirrored order (native, kafka, kafka, native), so neither protocol
        // always runs second (into the first run's page-cache writeback).
        ProtocolChoice::Both => vec![native.clone(), kafka.clone(), kafka, native],
    };
    let mut results = Vec::with_capacity(targets.len());
    for target in &targets {
        settle();
        let result = run_workload(target, output, &args, acks, compression).await?;
        results.push((target.name, result));
    }
    let total_bytes = args.records * args.record_bytes as u64;
    let (baseline, baseline_name) = match args.workload {
        _ if args.no_baseline => (None, ""),
        Workload::Produce => (
            Some(produce_baseline(total_bytes).await?),
            "loopback TCP + file write",
        ),
        Workload::Consume => (
            Some(consume_baseline(total_bytes).await?),
            "page-cached file over loopback TCP",
        ),
        Workload::E2e => (None, ""),
    };
    // Written, not printed: a closed pipe is an error to return, not a panic.
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (protocol, result) in &results {
        Report {
            result,
            protocol,
            baseline,
            baseline_name,
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

/// Runs the workload over one protocol, on a fresh topic unless one was named.
async fn run_workload(
    target: &Target,
    output: Output,
    args: &BenchArgs,
    acks: Acks,
    compression: Compression,
) -> anyhow::Result<Measured> {
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
    Ok(result)
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
}

struct Report<'a> {
    result: &'a Measured,
    protocol: &'a str,
    baseline: Option<f64>,
    baseline_name: &'static str,
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
        let ratio = self.baseline.map(|b| mb_per_sec / b);
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
                    "baseline": self.baseline.map(|b| json!({"name": self.baseline_name, "mb_per_sec": b})),
                    "ratio_to_baseline": ratio,
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
                if let (Some(baseline), Some(ratio)) = (self.baseline, ratio) {
                    writeln!(
                        out,
                        "  baseline    {:>9.1} MB/s ({}), ratio {ratio:.2}",
                        baseline, self.baseline_name
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).context("creating a histogram")
}

/// Sends `args.records` records; latency is from `send` to acknowledgement.
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
        let (topic, value, progress) = (topic.to_string(), value.clone(), progress.clone());
        let per_record = rate_mb.map(|mb| {
            Duration::from_secs_f64(
                args.record_bytes as f64 * f64::from(args.producers) / (mb * 1e6),
            )
        });
        tasks.push(tokio::spawn(async move {
            let (tx, mut rx) = mpsc::channel(50_000);
            let acker = tokio::spawn(async move {
                let mut latency = histogram()?;
                while let Some((sent, delivery)) = rx.recv().await {
                    let delivery: cairn_client::DeliveryFuture = delivery;
                    delivery.await?;
                    let _ = latency.record((Instant::elapsed(&sent).as_micros() as u64).max(1));
                    progress.inc(1);
                }
                anyhow::Ok(latency)
            });
            let begin = Instant::now();
            for i in 0..n {
                if let Some(per_record) = per_record {
                    let due = begin + per_record.mul_f64(i as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let delivery = producer
                    .send(ProducerRecord {
                        topic: topic.clone(),
                        value: Some(value.clone()),
                        ..Default::default()
                    })
                    .await?;
                if tx.send((Instant::now(), delivery)).await.is_err() {
                    // The acknowledgement task stopped at a failed delivery: report that.
                    return match acker.await? {
                        Err(err) => Err(err.context("a record was not acknowledged")),
                        Ok(_) => Err(anyhow::anyhow!("acknowledgement task stopped")),
                    };
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
                topic: topic.to_string(),
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
    })
}

/// MB/s of sending `total` bytes over loopback TCP to a receiver that writes them to a file.
async fn produce_baseline(total: u64) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("baseline");
    let receiver = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut file = tokio::fs::File::create(&path).await?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            file.write_all(buf.get(..n).unwrap_or_default()).await?;
        }
        file.flush().await?;
        anyhow::Ok(())
    });
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(chunk.len() as u64) as usize;
        socket.write_all(chunk.get(..n).unwrap_or_default()).await?;
        sent += n as u64;
    }
    socket.shutdown().await?;
    receiver.await??;
    Ok(total as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// MB/s of reading a page-cached file of `total` bytes and sending it over loopback TCP.
async fn consume_baseline(total: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("baseline");
    {
        let mut file = tokio::fs::File::create(&path).await?;
        let chunk = vec![7u8; 1 << 20];
        let mut written = 0u64;
        while written < total {
            let n = (total - written).min(chunk.len() as u64) as usize;
            file.write_all(chunk.get(..n).unwrap_or_default()).await?;
            written += n as u64;
        }
        file.flush().await?;
    }
    // Warm the page cache, as a broker's recently written segments are.
    let _ = tokio::fs::read(&path).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let mut socket = tokio::net::TcpStream::connect(addr).await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut received = 0u64;
        loop {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            received += n as u64;
        }
        anyhow::Ok(received)
    });
    let started = Instant::now();
    let (mut socket, _) = listener.accept().await?;
    let mut file = tokio::fs::File::open(&path).await?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        socket.write_all(buf.get(..n).unwrap_or_default()).await?;
    }
    socket.shutdown().await?;
    let received = receiver.await??;
    Ok(received as f64 / started.elapsed().as_secs_f64() / 1e6)
}
