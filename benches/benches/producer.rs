//! The producer's own cost, without a network: records in, encoded batches out. The producer
//! talks to a broker stand-in that answers every request at once without reading the records,
//! so what is measured is the client's path (accumulating, encoding, CRC-32C, futures), against
//! the floor for the same bytes measured in the same run (`benches/report.py` prints the ratios):
//! - `producer/copy_crc`: copying 1,000 values of 1,000 bytes into a batch buffer and computing
//!   the CRC-32C of the buffer (what any producer must do with the bytes);
//! - `producer/send`: the same records through `Producer::send`, one future per record, all
//!   awaited;
//! - `producer/send_batch`: the same records through one `Producer::send_batch`.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::{
    Acks, BatchRecord, ClientError, Connection, Producer, ProducerConfig, ProducerRecord, Reply,
    Transport,
};
use cairn_protocol::native::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const TOPIC: &str = "bench";
const RECORDS: usize = 1_000;
const VALUE_BYTES: usize = 1_000;

/// Answers metadata (one topic of one partition, led by node 0) and produce requests (success)
/// at once; every other request is a test error.
#[derive(Debug)]
struct InstantBroker;

impl InstantBroker {
    fn answer(payload: &[Bytes]) -> Result<Bytes, ClientError> {
        let mut head = payload.first().cloned().unwrap_or_default();
        let header = RequestHeader::decode(&mut head, "request header")?;
        let corr = header.correlation_id;
        let body = match ApiKey::from_u16(header.api_key) {
            Some(ApiKey::Metadata) => encode_response(
                corr,
                &MetadataResponse {
                    brokers: vec![BrokerMetadata {
                        node_id: 0,
                        host: "in-process".into(),
                        port: 1,
                        rack: String::new(),
                    }],
                    controller_id: 0,
                    topics: vec![TopicMetadata {
                        error_code: 0,
                        name: TOPIC.into(),
                        partitions: vec![PartitionMetadata {
                            partition: 0,
                            error_code: 0,
                            leader: 0,
                            leader_epoch: 0,
                            replicas: vec![0],
                            isr: vec![0],
                            offline_replicas: vec![],
                        }],
                    }],
                },
            ),
            Some(ApiKey::Produce) => encode_response(
                corr,
                &ProduceResponse {
                    topics: vec![ProduceTopicResponse {
                        name: TOPIC.into(),
                        partitions: vec![ProducePartitionResponse {
                            partition: 0,
                            error_code: 0,
                            error_message: String::new(),
                            base_offset: 0,
                            log_append_time: -1,
                            log_start_offset: 0,
                        }],
                    }],
                },
            ),
            other => {
                return Err(ClientError::InvalidArgument(format!(
                    "the bench broker does not answer {other:?}"
                )));
            }
        };
        Ok(Bytes::from(body))
    }
}

impl Transport for InstantBroker {
    fn submit(&self, payload: Vec<Bytes>, _expects_response: bool) -> Reply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(InstantBroker::answer(&payload));
        rx
    }

    fn peer(&self) -> &str {
        "in-process"
    }
}

fn producer() -> Producer {
    let conn = Connection::from_transport(Arc::new(InstantBroker), "bench");
    Producer::with_connection(
        conn,
        ProducerConfig {
            acks: Acks::Leader,
            batch_bytes: 1 << 20,
            linger: Duration::from_millis(1),
            ..ProducerConfig::default()
        },
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let value = Bytes::from((0..VALUE_BYTES).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("producer");
    group.throughput(Throughput::Bytes((RECORDS * VALUE_BYTES) as u64));
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
    group.bench_function("copy_crc", |b| {
        let mut buffer = Vec::with_capacity(RECORDS * (VALUE_BYTES + 32));
        b.iter(|| {
            buffer.clear();
            for _ in 0..RECORDS {
                buffer.extend_from_slice(&value);
            }
            std::hint::black_box(crc32c::crc32c(&buffer))
        })
    });
    group.bench_function("send", |b| {
        let producer = rt.block_on(async { producer() });
        let topic: Arc<str> = TOPIC.into();
        let mut futures = Vec::with_capacity(RECORDS);
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    for _ in 0..RECORDS {
                        let record = ProducerRecord {
                            topic: Arc::clone(&topic),
                            partition: Some(0),
                            value: Some(value.clone()),
                            ..ProducerRecord::default()
                        };
                        futures.push(producer.send(record).await.unwrap());
                    }
                    producer.flush().await.unwrap();
                    for delivery in futures.drain(..) {
                        delivery.await.unwrap();
                    }
                }
                started.elapsed()
            })
        })
    });
    group.bench_function("send_batch", |b| {
        let producer = rt.block_on(async { producer() });
        let records: Vec<BatchRecord> = (0..RECORDS)
            .map(|_| BatchRecord {
                value: Some(value.clone()),
                ..BatchRecord::default()
            })
            .collect();
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let batch = producer.send_batch(TOPIC, 0, &records).await.unwrap();
                    batch.await.unwrap();
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
