//! The broker as a user runs it: real `cairn broker` processes on ephemeral loopback ports, the
//! `cairn` command, the client library, SIGTERM and SIGKILL, and malformed frames sent while a
//! control client keeps producing.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use cairn_client::{
    Acks, Admin, BatchRecord, ClientError, Consumer, ConsumerConfig, Position, Producer,
    ProducerConfig, ProducerRecord, partition_for_key,
};
use cairn_protocol::native::*;
use serde_json::Value;

use crate::broker_process::{BrokerProcess, cairn, cairn_ok};

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn cli_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let b = broker.addr.as_str();

    let out = cairn_ok(
        b,
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "3",
            "--config",
            "retention.ms=86400000",
        ],
        "",
    );
    assert_eq!(
        out,
        "created topic orders: 3 partitions, replication factor 1\n"
    );

    let input = "alice:order-1\nbob:order-2\nalice:order-3\ncarol:order-4\n";
    let out = cairn_ok(
        b,
        &[
            "produce",
            "orders",
            "--key-separator",
            ":",
            "--output",
            "json",
        ],
        input,
    );
    let acks: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(acks.len(), 4);
    // One key, one partition: the murmur2 partition Kafka's default partitioner would choose.
    for (ack, key) in acks.iter().zip(["alice", "bob", "alice", "carol"]) {
        assert_eq!(
            ack["partition"].as_u64().unwrap() as u32,
            partition_for_key(key.as_bytes(), 3),
            "{key}"
        );
    }
    let alice = partition_for_key(b"alice", 3);
    let out = cairn_ok(
        b,
        &[
            "consume",
            "orders",
            "--partition",
            &alice.to_string(),
            "--until-end",
            "--format",
            "%p:%o %k=%v",
        ],
        "",
    );
    let expected: String = [
        ("alice", "order-1"),
        ("bob", "order-2"),
        ("alice", "order-3"),
        ("carol", "order-4"),
    ]
    .iter()
    .filter(|(key, _)| partition_for_key(key.as_bytes(), 3) == alice)
    .enumerate()
    .map(|(offset, (key, value))| {
        format!(
            "{alice}:{offset} {key}={value}
"
        )
    })
    .collect();
    assert_eq!(out, expected);

    let out = cairn_ok(b, &["consume", "orders", "--until-end"], "");
    let mut values: Vec<&str> = out.lines().collect();
    values.sort_unstable();
    assert_eq!(values, ["order-1", "order-2", "order-3", "order-4"]);
    let out = cairn_ok(
        b,
        &["consume", "orders", "--count", "2", "--output", "json"],
        "",
    );
    assert_eq!(out.lines().count(), 2);

    let out = cairn_ok(b, &["topic", "describe", "orders", "--output", "json"], "");
    let described: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(described["configs"]["retention.ms"], "86400000");
    let ends: u64 = described["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["log_end_offset"].as_u64().unwrap())
        .sum();
    assert_eq!(ends, 4);
    assert!(cairn_ok(b, &["topic", "list"], "").contains("orders"));

    // Failures: exit non-zero with one clear line.
    let dup = cairn(b, &["topic", "create", "orders"], "");
    assert!(!dup.status.success());
    let stderr = String::from_utf8_lossy(&dup.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("TOPIC_ALREADY_EXISTS"), "{stderr}");
    let bad = cairn(b, &["topic", "create", "bad/name"], "");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("INVALID_TOPIC_EXCEPTION"));
    let missing = cairn(b, &["consume", "nope", "--until-end"], "");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("UNKNOWN_TOPIC_OR_PARTITION"));
    let bad_config = cairn(
        b,
        &["topic", "create", "t2", "--config", "retention.ms=soon"],
        "",
    );
    assert!(String::from_utf8_lossy(&bad_config.stderr).contains("INVALID_CONFIG"));
    let unreachable = cairn("127.0.0.1:1", &["topic", "list"], "");
    assert!(!unreachable.status.success());
    assert!(
        String::from_utf8_lossy(&unreachable.stderr)
            .starts_with("cairn: connecting to 127.0.0.1:1")
    );

    let out = cairn_ok(b, &["topic", "delete", "orders"], "");
    assert_eq!(out, "deleted topic orders\n");
    assert!(!cairn_ok(b, &["topic", "list"], "").contains("orders"));
}

/// Value of record `i` of partition `p`: its identity and deterministic filler.
fn value_of(p: u32, i: u64) -> Vec<u8> {
    let mut value = format!("{p}:{i}:").into_bytes();
    value.extend((0..40).map(|k| b'a' + ((i + k) % 26) as u8));
    value
}

#[test]
fn a_million_records_across_8_partitions_survive_a_restart() {
    const N_PARTITIONS: u32 = 8;
    const N_RECORDS: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = BrokerProcess::start(&data);
    let rt = runtime();
    rt.block_on(async {
        let admin = Admin::connect(&broker.addr).await.unwrap();
        admin.create_topic("bulk", N_PARTITIONS, &[]).await.unwrap();
        let config = ProducerConfig {
            acks: Acks::Leader,
            linger: Duration::from_millis(2),
            ..ProducerConfig::default()
        };
        let producer = Producer::connect(&broker.addr, config).await.unwrap();
        let mut deliveries = Vec::with_capacity(N_RECORDS as usize);
        for i in 0..N_RECORDS {
            let p = (i % u64::from(N_PARTITIONS)) as u32;
            let record = ProducerRecord::new("bulk", value_of(p, i / u64::from(N_PARTITIONS)))
                .partition(p)
                .key(i.to_be_bytes().to_vec());
            deliveries.push(producer.send(record).await.unwrap());
        }
        producer.flush().await.unwrap();
        for (i, delivery) in deliveries.into_iter().enumerate() {
            let metadata = delivery.await.unwrap();
            assert_eq!(metadata.offset, Some(i as u64 / u64::from(N_PARTITIONS)));
        }
        producer.close().await.unwrap();
    });
    let read_all = |addr: &str| {
        rt.block_on(async {
            let mut consumer = Consumer::connect(addr, ConsumerConfig::default())
                .await
                .unwrap();
            consumer
                .assign("bulk", None, Position::Earliest)
                .await
                .unwrap();
            let mut next = [0u64; N_PARTITIONS as usize];
            let per_partition = N_RECORDS / u64::from(N_PARTITIONS);
            while next.iter().any(|&n| n < per_partition) {
                for record in consumer.poll().await.unwrap() {
                    let p = record.partition as usize;
                    assert_eq!(record.offset, next[p], "partition {p} in order, no gaps");
                    assert_eq!(
                        record.value.as_deref(),
                        Some(&value_of(record.partition, record.offset)[..])
                    );
                    let i = record.offset * u64::from(N_PARTITIONS) + u64::from(record.partition);
                    assert_eq!(record.key.as_deref(), Some(&i.to_be_bytes()[..]));
                    next[p] += 1;
                }
            }
            assert!(next.iter().all(|&n| n == per_partition));
        })
    };
    read_all(&broker.addr);
    assert!(broker.terminate().success());
    let broker = BrokerProcess::start(&data);
    let log = std::fs::read_to_string(&broker.log).unwrap();
    assert!(
        log.contains("clean=true") && !log.contains("clean=false"),
        "a SIGTERM shutdown is clean:\n{log}"
    );
    read_all(&broker.addr);
}

/// The batch API beside the per-record one: a batch's records get consecutive offsets after
/// the records queued before it, one future answers for all of them, a tiny record buffer only
/// slows sending down, bad batches are refused with a clear error, and a producer dropped with
/// records queued still delivers them.
#[test]
fn batches_and_records_share_a_partition_in_order_under_backpressure() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    runtime().block_on(async {
        let admin = Admin::connect(&broker.addr).await.unwrap();
        admin.create_topic("mixed", 2, &[]).await.unwrap();
        let config = ProducerConfig {
            acks: Acks::All,
            buffer_records_max: 10,
            batch_bytes: 512,
            ..ProducerConfig::default()
        };
        let producer = Producer::connect(&broker.addr, config).await.unwrap();
        let topic: std::sync::Arc<str> = "mixed".into();
        let mut expected = Vec::new();
        let mut singles = Vec::new();
        let mut batches = Vec::new();
        for round in 0..20u32 {
            for i in 0..7u32 {
                let value = format!("r{round}-{i}");
                expected.push(value.clone());
                singles.push(
                    producer
                        .send(ProducerRecord::new(&topic, value).partition(1))
                        .await
                        .unwrap(),
                );
            }
            let records: Vec<BatchRecord> = (0..25u32)
                .map(|i| {
                    let value = format!("b{round}-{i}");
                    expected.push(value.clone());
                    BatchRecord::new(value).key(i.to_be_bytes().to_vec())
                })
                .collect();
            batches.push(producer.send_batch("mixed", 1, &records).await.unwrap());
        }
        // Nothing was lost to the 10-record buffer; offsets follow send order.
        let mut offsets = Vec::new();
        for delivery in singles {
            let metadata = delivery.await.unwrap();
            assert_eq!((&*metadata.topic, metadata.partition), ("mixed", 1));
            offsets.push(metadata.offset.unwrap());
        }
        for batch in batches {
            let metadata = batch.await.unwrap();
            assert_eq!((&*metadata.topic, metadata.partition), ("mixed", 1));
            assert_eq!(metadata.records, 25);
            let base = metadata.base_offset.unwrap();
            offsets.extend(base..base + 25);
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..expected.len() as u64).collect::<Vec<_>>());

        // Refused with a clear error, nothing sent.
        let empty = producer.send_batch("mixed", 0, &[]).await.unwrap_err();
        assert!(matches!(empty, ClientError::InvalidArgument(_)), "{empty}");
        let missing = producer
            .send_batch("mixed", 2, &[BatchRecord::new("x")])
            .await
            .unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
        let huge = vec![BatchRecord::new(vec![0u8; 600 * 1024]); 2];
        let too_big = producer.send_batch("mixed", 0, &huge).await.unwrap_err();
        assert!(
            too_big.to_string().contains("request_bytes_max"),
            "{too_big}"
        );

        // Dropped with records queued (a long linger holds them): they are still sent.
        let lingering = Producer::connect(
            &broker.addr,
            ProducerConfig {
                linger: Duration::from_secs(1),
                ..ProducerConfig::default()
            },
        )
        .await
        .unwrap();
        let last = lingering
            .send(ProducerRecord::new("mixed", "after-drop").partition(0))
            .await
            .unwrap();
        drop(lingering);
        let metadata = tokio::time::timeout(Duration::from_secs(10), last)
            .await
            .expect("a dropped producer still sends what it holds")
            .unwrap();
        assert_eq!(metadata.offset, Some(0));
        producer.close().await.unwrap();

        let mut consumer = Consumer::connect(&broker.addr, ConsumerConfig::default())
            .await
            .unwrap();
        consumer
            .assign("mixed", Some(vec![1]), Position::Earliest)
            .await
            .unwrap();
        let mut read = Vec::new();
        while read.len() < expected.len() {
            for record in consumer.poll().await.unwrap() {
                read.push(String::from_utf8(record.value.unwrap().to_vec()).unwrap());
            }
        }
        assert_eq!(
            read, expected,
            "partition 1 holds the records in send order"
        );
    });
}

/// A producer at the broker's batch limit across many partitions: a full batch never exceeds
/// `batch_bytes` (the broker takes 1 MiB batches), and a request never exceeds
/// `request_bytes_max` however many partitions have batches ready.
#[test]
fn full_batches_over_many_partitions_stay_within_the_limits() {
    const PARTITIONS: u32 = 200;
    const RECORDS: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    runtime().block_on(async {
        let admin = Admin::connect(&broker.addr).await.unwrap();
        admin.create_topic("wide", PARTITIONS, &[]).await.unwrap();
        let config = ProducerConfig {
            acks: Acks::Leader,
            batch_bytes: 1 << 20,
            linger: Duration::from_millis(50),
            retries: 0,
            ..ProducerConfig::default()
        };
        let producer = Producer::connect(&broker.addr, config).await.unwrap();
        let value = vec![7u8; 1000];
        let mut deliveries = Vec::new();
        for i in 0..RECORDS {
            // Most records to partition 0 (full 1 MiB batches), the others spread over all.
            let record = ProducerRecord::new("wide", value.clone()).partition(if i % 2 == 0 {
                0
            } else {
                (i % u64::from(PARTITIONS)) as u32
            });
            deliveries.push(producer.send(record).await.unwrap());
        }
        producer.flush().await.unwrap();
        for delivery in deliveries {
            delivery.await.expect("every record is acknowledged");
        }
        producer.close().await.unwrap();
    });
}

/// Bytes the files under `dir` take on their file system (allocated blocks).
fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += meta.blocks() * 512;
        if meta.is_dir() {
            total += allocated_bytes(&entry.path());
        }
    }
    total
}

/// 10,000 partitions on one broker, in a data directory on a 512 MiB tmpfs when the test may
/// mount one (else on disk): created, written with keyed records spread over all of them,
/// described, restarted cleanly and read back. An empty partition takes a few KiB (16 MiB
/// preallocations would fill the tmpfs at the 32nd partition), and the broker logs a summary,
/// not a line per partition. Prints how long each step took.
#[test]
fn ten_thousand_partitions_on_one_broker() {
    const PARTITIONS: u32 = 10_000;
    const RECORDS: u64 = 30_000;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _tmpfs = match crate::chaos::Tmpfs::mount(&data, 512 << 20) {
        Ok(tmpfs) => Some(tmpfs),
        Err(err) => {
            eprintln!("no tmpfs ({err}): the data directory is on disk");
            None
        }
    };
    let config = format!("storage_min_free_bytes = {}\n", 16 << 20);
    let broker = BrokerProcess::start_with_config(&data, &config);
    let rt = runtime();
    let started = std::time::Instant::now();
    rt.block_on(async {
        let admin = Admin::connect(&broker.addr).await.unwrap();
        admin.create_topic("wide", PARTITIONS, &[]).await.unwrap();
        // The topic is usable once every partition is open and led.
        loop {
            let described = admin.describe_topics(&["wide".into()]).await;
            if described.is_ok_and(|topics| {
                topics.first().is_some_and(|t| {
                    t.partitions.len() == PARTITIONS as usize
                        && t.partitions.iter().all(|p| p.error_code == 0)
                })
            }) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    eprintln!("10,000 partitions created in {:?}", started.elapsed());
    let allocated = allocated_bytes(&data);
    eprintln!("data directory: {} KiB allocated", allocated >> 10);
    assert!(
        allocated < 160 << 20,
        "10,000 empty partitions take {allocated} bytes"
    );
    let produced = std::time::Instant::now();
    rt.block_on(async {
        let producer = Producer::connect(&broker.addr, ProducerConfig::default())
            .await
            .unwrap();
        let mut deliveries = Vec::with_capacity(RECORDS as usize);
        for i in 0..RECORDS {
            let record = ProducerRecord::new("wide", format!("v{i}")).key(i.to_be_bytes().to_vec());
            deliveries.push(producer.send(record).await.unwrap());
        }
        for delivery in deliveries {
            delivery.await.unwrap();
        }
        producer.close().await.unwrap();
        let described = std::time::Instant::now();
        let admin = Admin::connect(&broker.addr).await.unwrap();
        let topics = admin.describe_topics(&["wide".into()]).await.unwrap();
        assert_eq!(topics[0].partitions.len(), PARTITIONS as usize);
        eprintln!("described 10,000 partitions in {:?}", described.elapsed());
    });
    eprintln!(
        "{RECORDS} keyed records produced in {:?}",
        produced.elapsed()
    );
    let stopped = std::time::Instant::now();
    assert!(broker.terminate().success());
    eprintln!("clean shutdown in {:?}", stopped.elapsed());
    let restarted = std::time::Instant::now();
    let broker = BrokerProcess::start_with_config(&data, &config);
    eprintln!("restart (to listening) in {:?}", restarted.elapsed());
    rt.block_on(async {
        let mut consumer = Consumer::connect(&broker.addr, ConsumerConfig::default())
            .await
            .unwrap();
        consumer
            .assign("wide", None, Position::Earliest)
            .await
            .unwrap();
        let mut seen = std::collections::HashSet::new();
        while (seen.len() as u64) < RECORDS {
            for record in consumer.poll().await.unwrap() {
                let key = u64::from_be_bytes(record.key.unwrap()[..].try_into().unwrap());
                assert_eq!(
                    record.partition,
                    partition_for_key(&key.to_be_bytes(), PARTITIONS)
                );
                seen.insert(key);
            }
        }
    });
    eprintln!("read back after the restart in {:?}", restarted.elapsed());
    let log = std::fs::read_to_string(&broker.log).unwrap();
    assert!(
        log.contains("partitions opened opened=10000 topics=1")
            && log.contains("clean=true unclean=0"),
        "a clean restart opens every partition clean:\n{log}"
    );
    assert!(
        log.lines().count() < 60,
        "a summary, not a line per partition:\n{log}"
    );
}

#[test]
fn acks_all_records_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = BrokerProcess::start(&data);
    let rt = runtime();
    let acked: BTreeMap<u64, Vec<u8>> = rt.block_on(async {
        Admin::connect(&broker.addr)
            .await
            .unwrap()
            .create_topic("durable", 1, &[])
            .await
            .unwrap();
        let config = ProducerConfig {
            acks: Acks::All,
            linger: Duration::from_millis(1),
            retries: 0,
            ..ProducerConfig::default()
        };
        let producer = Producer::connect(&broker.addr, config).await.unwrap();
        let mut pending = std::collections::VecDeque::new();
        let mut acked = BTreeMap::new();
        // Produce until a few thousand records are acknowledged, keeping requests in flight.
        for i in 0..200_000u64 {
            let value = value_of(0, i);
            pending.push_back((
                value.clone(),
                producer
                    .send(ProducerRecord::new("durable", value).partition(0))
                    .await
                    .unwrap(),
            ));
            while pending.len() > 2_000 {
                let (value, delivery) = pending.pop_front().unwrap();
                let metadata = delivery.await.unwrap();
                acked.insert(metadata.offset.unwrap(), value);
            }
            if acked.len() >= 5_000 {
                break;
            }
        }
        acked
    });
    // Records in flight when the broker dies may or may not have landed: only the acked ones count.
    broker.kill9();
    let broker = BrokerProcess::start(&data);
    let log = std::fs::read_to_string(&broker.log).unwrap();
    assert!(
        log.contains("clean=false"),
        "a killed broker recovers:\n{log}"
    );
    rt.block_on(async {
        let mut consumer = Consumer::connect(&broker.addr, ConsumerConfig::default())
            .await
            .unwrap();
        consumer
            .assign("durable", Some(vec![0]), Position::Earliest)
            .await
            .unwrap();
        let last = *acked.keys().next_back().unwrap();
        let mut seen = 0u64;
        while consumer.position("durable", 0).unwrap() <= last {
            for record in consumer.poll().await.unwrap() {
                assert_eq!(record.offset, seen, "no gaps, no duplicates");
                if let Some(value) = acked.get(&record.offset) {
                    assert_eq!(
                        record.value.as_deref(),
                        Some(&value[..]),
                        "acked offset {} holds its value",
                        record.offset
                    );
                }
                seen += 1;
            }
        }
        assert!(seen > last);
    });
}

/// Sends raw bytes on a fresh connection and returns the first response frame (length prefix
/// included), or nothing if the broker closes the connection instead. Fails after 5 s.
/// A control producer: one record to `control`-0 at a time, each awaited, for `run`; returns how
/// many were acknowledged (a failure panics).
/// A producer writing acks=all records to a new topic `control` (with `configs`) for 6 s, one
/// at a time, while a test throws bad input at the broker: how many were acknowledged.
pub(crate) fn start_control_producer(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    configs: &[(String, String)],
) -> tokio::task::JoinHandle<u64> {
    let (addr, configs) = (addr.to_string(), configs.to_vec());
    rt.spawn(async move {
        Admin::connect(&addr)
            .await
            .unwrap()
            .create_topic("control", 1, &configs)
            .await
            .unwrap();
        let config = ProducerConfig {
            linger: Duration::ZERO,
            ..ProducerConfig::default()
        };
        let producer = Producer::connect(&addr, config).await.unwrap();
        produce_acknowledged_until(&producer, Duration::from_secs(6)).await
    })
}

pub(crate) async fn produce_acknowledged_until(producer: &Producer, run: Duration) -> u64 {
    let mut n = 0u64;
    let deadline = std::time::Instant::now() + run;
    while std::time::Instant::now() < deadline {
        producer
            .send(ProducerRecord::new("control", format!("c{n}")).partition(0))
            .await
            .unwrap()
            .await
            .unwrap();
        n += 1;
    }
    n
}

pub(crate) fn raw_exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Vec::new(),
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return Vec::new(),
        Err(err) => panic!("no response and no close: {err}"),
    }
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).unwrap();
    let mut out = len.to_vec();
    out.extend_from_slice(&body);
    out
}

pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// The top-level error code of the first response frame in `bytes`.
pub(crate) fn response_error(bytes: &[u8]) -> Option<i16> {
    let payload = bytes.get(4..)?;
    let mut buf = Bytes::copy_from_slice(payload);
    ResponseHeader::decode(&mut buf, "header")
        .ok()
        .map(|h| h.error_code)
}

fn produce_payload(records: Bytes, acks: i8) -> Vec<u8> {
    encode_request(
        1,
        "bad",
        &Request::Produce(ProduceRequest {
            acks,
            timeout_ms: 1000,
            topics: vec![ProduceTopic {
                name: "control".into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    records,
                }],
            }],
        }),
    )
}

fn produce_error(bytes: &[u8]) -> i16 {
    let payload = Bytes::copy_from_slice(&bytes[4..]);
    let mut buf = payload;
    let header = ResponseHeader::decode(&mut buf, "header").unwrap();
    assert_eq!(header.error_code, 0);
    let response: ProduceResponse = decode_exact(buf).unwrap();
    response.topics[0].partitions[0].error_code
}

#[test]
fn malformed_input_gets_an_error_or_a_clean_close_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let rt = runtime();
    // A control producer keeps producing acks=all through everything below.
    let control = start_control_producer(
        &rt,
        &broker.addr,
        &[("max.message.bytes".into(), "10000".into())],
    );
    std::thread::sleep(Duration::from_millis(300));
    let b = broker.addr.as_str();

    // Framing: a zero length, a length past frame_bytes_max, a stalled partial header: closed.
    assert!(raw_exchange(b, &0u32.to_be_bytes()).is_empty());
    assert!(raw_exchange(b, &u32::MAX.to_be_bytes()).is_empty());
    assert!(raw_exchange(b, &(64u32 << 20).to_be_bytes()).is_empty());
    assert!(
        raw_exchange(b, &frame(&[0, 1])).is_empty(),
        "an undecodable header closes the connection"
    );

    // Headers: unknown API, unsupported version, a huge client id: an error response.
    let unknown_api = [0u8, 99, 0, 0, 0, 0, 0, 7, 0, 0];
    assert_eq!(
        response_error(&raw_exchange(b, &frame(&unknown_api))),
        Some(ErrorCode::UNSUPPORTED_VERSION.0)
    );
    let bad_version = [0u8, 1, 0, 9, 0, 0, 0, 7, 0, 0];
    assert_eq!(
        response_error(&raw_exchange(b, &frame(&bad_version))),
        Some(ErrorCode::UNSUPPORTED_VERSION.0)
    );
    let mut long_id = vec![0u8, 0, 0, 0, 0, 0, 0, 7, 4, 0];
    long_id.extend(std::iter::repeat_n(b'x', 1024));
    assert_eq!(
        response_error(&raw_exchange(b, &frame(&long_id))),
        Some(ErrorCode::INVALID_REQUEST.0)
    );

    // Bodies: an array count of 2^32-1, truncation, trailing bytes: INVALID_REQUEST.
    let mut huge_count = vec![0u8, 1, 0, 0, 0, 0, 0, 7, 0, 0];
    huge_count.extend_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        response_error(&raw_exchange(b, &frame(&huge_count))),
        Some(ErrorCode::INVALID_REQUEST.0)
    );
    let truncated = [0u8, 6, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0];
    assert_eq!(
        response_error(&raw_exchange(b, &frame(&truncated))),
        Some(ErrorCode::INVALID_REQUEST.0)
    );

    // Record batches: bad CRC, garbage, too large, invalid acks: per-partition errors.
    let mut builder =
        cairn_protocol::batch::BatchBuilder::new(cairn_protocol::batch::Compression::None);
    builder.push(0, None, Some(b"x"), &[]);
    let mut bad_crc = builder.build().unwrap().to_vec();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 1;
    let reply = raw_exchange(b, &frame(&produce_payload(Bytes::from(bad_crc), 1)));
    assert_eq!(produce_error(&reply), ErrorCode::CORRUPT_MESSAGE.0);
    let reply = raw_exchange(
        b,
        &frame(&produce_payload(Bytes::from_static(&[7; 100]), 1)),
    );
    assert_eq!(produce_error(&reply), ErrorCode::CORRUPT_MESSAGE.0);
    let mut big =
        cairn_protocol::batch::BatchBuilder::new(cairn_protocol::batch::Compression::None);
    big.push(0, None, Some(&[1u8; 20_000]), &[]);
    let reply = raw_exchange(b, &frame(&produce_payload(big.build().unwrap(), 1)));
    assert_eq!(produce_error(&reply), ErrorCode::MESSAGE_TOO_LARGE.0);
    let reply = raw_exchange(b, &frame(&produce_payload(Bytes::new(), 5)));
    assert_eq!(produce_error(&reply), ErrorCode::INVALID_REQUIRED_ACKS.0);
    // A compression bomb is just bytes to the broker: stored as sent, never decompressed.

    // Group requests: a 2 MiB subscription (over group_member_bytes_max), a bad session timeout,
    // an empty group id: error responses; a DescribeGroups whose count exceeds the frame:
    // INVALID_REQUEST.
    let join = |metadata: Vec<u8>, session_timeout_ms: u32, group_id: &str| {
        encode_request(
            1,
            "bad",
            &Request::JoinGroup(JoinGroupRequest {
                group_id: group_id.into(),
                member_id: String::new(),
                session_timeout_ms,
                rebalance_timeout_ms: 10_000,
                protocol_type: "consumer".into(),
                protocols: vec![JoinProtocol {
                    name: "range".into(),
                    metadata: Bytes::from(metadata),
                }],
            }),
        )
    };
    let join_error = |reply: Vec<u8>| -> i16 {
        let mut buf = Bytes::copy_from_slice(&reply[4..]);
        let header = ResponseHeader::decode(&mut buf, "header").unwrap();
        assert_eq!(header.error_code, 0);
        decode_exact::<JoinGroupResponse>(buf).unwrap().error_code
    };
    // As clients do, the group's coordinator is looked up first (this creates the offsets
    // topic; before it exists, group requests get COORDINATOR_NOT_AVAILABLE).
    let reply = raw_exchange(b, &frame(&join(vec![], 10_000, "g")));
    assert_eq!(join_error(reply), ErrorCode::COORDINATOR_NOT_AVAILABLE.0);
    let find = encode_request(
        1,
        "bad",
        &Request::FindCoordinator(FindCoordinatorRequest {
            group_id: "g".into(),
        }),
    );
    let reply = raw_exchange(b, &frame(&find));
    let mut buf = Bytes::copy_from_slice(&reply[4..]);
    ResponseHeader::decode(&mut buf, "header").unwrap();
    assert_eq!(
        decode_exact::<FindCoordinatorResponse>(buf)
            .unwrap()
            .error_code,
        0
    );
    let reply = raw_exchange(b, &frame(&join(vec![0; 2 << 20], 10_000, "g")));
    assert_eq!(join_error(reply), ErrorCode::POLICY_VIOLATION.0);
    let reply = raw_exchange(b, &frame(&join(vec![], 10, "g")));
    assert_eq!(join_error(reply), ErrorCode::INVALID_SESSION_TIMEOUT.0);
    let reply = raw_exchange(b, &frame(&join(vec![], 10_000, "")));
    assert_eq!(join_error(reply), ErrorCode::INVALID_GROUP_ID.0);
    let mut describe_bomb = vec![0u8, 16, 0, 0, 0, 0, 0, 7, 0, 0];
    describe_bomb.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    assert_eq!(
        response_error(&raw_exchange(b, &frame(&describe_bomb))),
        Some(ErrorCode::INVALID_REQUEST.0)
    );

    let n = rt.block_on(control).unwrap();
    assert!(
        n > 20,
        "the control producer kept going ({n} acks=all records)"
    );
    let (status, body) = broker.http_get("/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(
        body.contains("cairn_request_errors_total{api=\"produce\",error=\"CORRUPT_MESSAGE\"} 2"),
        "{body}"
    );
    assert!(body.contains("cairn_topic_messages_in_total{topic=\"control\"}"));
    assert!(broker.http_get("/health").0.contains("200"));
    assert!(broker.http_get("/ready").0.contains("200"));
    assert!(broker.http_get("/nope").0.contains("404"));
}

#[test]
fn clients_report_broker_errors_with_retriability() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    runtime().block_on(async {
        let admin = Admin::connect(&broker.addr).await.unwrap();
        let err = admin.delete_topic("missing").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION));
        assert!(err.is_retriable());
        let err = admin.create_topic("x", 100_000, &[]).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::INVALID_PARTITIONS));
        assert!(!err.is_retriable());
        let mut consumer = Consumer::connect(&broker.addr, ConsumerConfig::default())
            .await
            .unwrap();
        assert!(matches!(
            consumer.poll().await,
            Err(ClientError::InvalidArgument(_))
        ));
    });
}

#[test]
fn idle_and_stalled_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let config = "connection_idle_timeout_ms = 800\nframe_read_timeout_ms = 300\n";
    let broker = BrokerProcess::start_with_config(&dir.path().join("data"), config);
    let started = std::time::Instant::now();
    // Two bytes of a length prefix, then silence (slow-loris): closed after the frame timeout.
    assert!(raw_exchange(&broker.addr, &[0, 0]).is_empty());
    // Nothing at all: closed after the idle timeout.
    assert!(raw_exchange(&broker.addr, &[]).is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // A client that keeps talking stays connected past the idle timeout.
    runtime().block_on(async {
        let admin = Admin::connect(&broker.addr).await.unwrap();
        for _ in 0..4 {
            admin.list_topics().await.unwrap();
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    });
}

#[test]
fn bench_runs_every_workload_and_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    for (workload, extra) in [
        ("produce", &["--acks", "all"][..]),
        ("consume", &[][..]),
        ("e2e", &["--rate", "5"][..]),
    ] {
        let mut args = vec![
            "--output",
            "json",
            "bench",
            workload,
            "--records",
            "3000",
            "--record-bytes",
            "200",
        ];
        args.extend_from_slice(extra);
        let out = cairn_ok(&broker.addr, &args, "");
        let report: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(report["workload"], workload);
        assert_eq!(report["records"], 3000);
        assert!(report["mb_per_sec"].as_f64().unwrap() > 0.0, "{report}");
        if workload != "e2e" {
            assert!(
                report["baseline"]["mb_per_sec"].as_f64().unwrap() > 0.0,
                "{report}"
            );
        }
        if workload != "consume" {
            assert!(
                report["latency_us"]["p99"].as_u64().unwrap() > 0,
                "{report}"
            );
        }
    }
    // The benchmark cleans up its topics.
    assert_eq!(
        cairn_ok(&broker.addr, &["topic", "list", "--output", "json"], "").trim(),
        "[]"
    );
}

#[test]
fn fetch_long_polls_until_an_append_and_acks_0_is_silent() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    runtime().block_on(async {
        use futures::StreamExt;
        Admin::connect(&broker.addr)
            .await
            .unwrap()
            .create_topic("poll", 1, &[])
            .await
            .unwrap();
        let config = ConsumerConfig {
            fetch_max_wait: Duration::from_secs(20),
            ..ConsumerConfig::default()
        };
        let mut consumer = Consumer::connect(&broker.addr, config).await.unwrap();
        consumer
            .assign("poll", None, Position::Latest)
            .await
            .unwrap();
        let mut stream = Box::pin(consumer.into_stream());
        let addr = broker.addr.clone();
        let producer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let config = ProducerConfig {
                acks: Acks::None,
                ..ProducerConfig::default()
            };
            let producer = Producer::connect(&addr, config).await.unwrap();
            let sent = producer
                .send(ProducerRecord::new("poll", "wake up"))
                .await
                .unwrap()
                .await
                .unwrap();
            assert_eq!(sent.offset, None, "acks=0 has no offset to report");
            producer.close().await.unwrap();
        });
        let started = std::time::Instant::now();
        let record = stream.next().await.unwrap().unwrap();
        // The fetch waits up to 20 s; an append wakes it at once.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(record.value.as_deref(), Some(&b"wake up"[..]));
        producer.await.unwrap();
    });
}

#[test]
fn the_inflight_byte_budget_bounds_memory_under_a_flood_of_large_frames() {
    const N_CLIENTS: usize = 40;
    const FRAME: usize = 4 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("frame_bytes_max = {FRAME}\ninflight_bytes_max = {FRAME}\n");
    let broker = BrokerProcess::start_with_config(&dir.path().join("data"), &config);
    let before = broker.peak_rss_kib();
    // Every client sends a full-size produce frame at once; each frame is answered (its records
    // are garbage, so with CORRUPT_MESSAGE), but the broker may hold only one frame body at a time.
    let mut payload = produce_payload(Bytes::from(vec![7u8; FRAME - 200]), 1);
    payload.resize(FRAME.min(payload.len()), 0);
    let frame_bytes = frame(&payload);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(N_CLIENTS));
    let clients: Vec<_> = (0..N_CLIENTS)
        .map(|_| {
            let (addr, frame_bytes, barrier) =
                (broker.addr.clone(), frame_bytes.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(&addr).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                barrier.wait();
                for chunk in frame_bytes.chunks(64 * 1024) {
                    stream.write_all(chunk).unwrap();
                }
                let mut len = [0u8; 4];
                stream.read_exact(&mut len).unwrap();
                let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                stream.read_exact(&mut body).unwrap();
                let mut reply = len.to_vec();
                reply.extend_from_slice(&body);
                produce_error(&reply)
            })
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap(), ErrorCode::CORRUPT_MESSAGE.0);
    }
    let growth_mib = broker.peak_rss_kib().saturating_sub(before) / 1024;
    println!(
        "peak RSS grew {growth_mib} MiB while {N_CLIENTS} clients sent {} MiB at once",
        (N_CLIENTS * FRAME) >> 20
    );
    // Unbounded, the broker would hold all 160 MiB; the budget allows one frame (plus the copy made
    // to stamp it and allocator slack).
    assert!(growth_mib < 48, "peak RSS grew {growth_mib} MiB");
}
