//! The Kafka listener, proven with clients we did not write: confluent-kafka, kafka-python and
//! kcat (tests/kafka/clients.py) against a real `cairn broker`; interop between Cairn's client and
//! confluent-kafka; hostile Kafka frames while a control client keeps producing;
//! docs/kafka-compatibility.md against what ApiVersions advertises.
//!
//! The Python clients live in a virtualenv that `scripts/test.sh` creates
//! (`$CAIRN_PYTHON`, default `~/.cache/cairn-venv/bin/python`); kcat comes from Debian
//! (installed by `scripts/test.sh` when it runs as root).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cairn_client::{
    Admin, Consumer, ConsumerConfig, Position, Producer, ProducerConfig, ProducerRecord,
};
use cairn_kafka::kp::messages as kp;
use cairn_kafka::kp::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use crate::broker::{frame, produce_acknowledged_until, raw_exchange, runtime};
use crate::broker_process::BrokerProcess;

/// The virtualenv's Python with the Kafka clients installed.
pub fn python() -> PathBuf {
    let path = std::env::var_os("CAIRN_PYTHON").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/cairn-venv/bin/python")
        },
        PathBuf::from,
    );
    let ok = Command::new(&path)
        .args(["-c", "import confluent_kafka, kafka"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import confluent_kafka and kafka: run scripts/test.sh (the README's test \
         command), which installs them into a virtualenv, or set CAIRN_PYTHON",
        path.display()
    );
    path
}

pub fn script(name: &str) -> PathBuf {
    manifest_dir().join("kafka").join(name)
}

/// A long-running Python workload (`script` with `args`) whose stdout and stderr go to files in
/// `dir`, never to pipes: librdkafka logs from its own threads (a broker disconnect, a failed
/// connection), and a pipe nobody reads until the end fills after some 64 KiB of such lines and
/// blocks the thread that logs, holding its locks: a producer stalled until the run ended and
/// its output was read (chaos kill-all, every record acknowledged at once at the stop).
pub fn spawn_workload(script_name: &str, args: &[&std::ffi::OsStr], dir: &Path) -> Child {
    let file = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    Command::new(python())
        .arg(script(script_name))
        .args(args)
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        .spawn()
        .unwrap()
}

/// Waits for a workload from [`spawn_workload`]: (exit status, stdout, stderr).
pub fn finish_workload(mut child: Child, dir: &Path) -> (std::process::ExitStatus, String, String) {
    let status = child.wait().unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    (status, read("stdout"), read("stderr"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs tests/kafka/clients.py for one client against a fresh broker that advertises the
/// script's proxy.
fn run_client(client: &str) {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let proxy_port = free_port();
    let broker = BrokerProcess::start_with_config(
        &dir.path().join("data"),
        &format!("kafka_advertised = \"127.0.0.1:{proxy_port}\"\n"),
    );
    let out = Command::new(python)
        .arg(script("clients.py"))
        .args([client, "--broker", &broker.kafka, "--proxy-port"])
        .arg(proxy_port.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    let (_, metrics) = broker.http_get("/metrics");
    for line in metrics.lines().filter(|l| l.contains("duplicate")) {
        println!("{line}");
    }
    assert!(
        out.status.success(),
        "{client} failed:\n{stdout}\n{}\nbroker log: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.starts_with('%'))
            .collect::<Vec<_>>()
            .join("\n"),
        std::fs::read_to_string(&broker.log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn confluent_kafka_produces_consumes_and_administers() {
    run_client("confluent");
}

#[test]
fn kafka_python_produces_consumes_and_administers() {
    run_client("kafka-python");
}

#[test]
fn kcat_produces_and_consumes() {
    let found = Command::new("kcat")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        // Debian's kcat is installed by scripts/test.sh only where it runs as root.
        println!("skipped: kcat is not installed (scripts/test.sh installs it with apt as root)");
        return;
    }
    run_client("kcat");
}

/// Record `i` of the interop run, as tests/kafka/interop.py generates it.
fn interop_record(i: u64) -> (Bytes, Bytes, Vec<(String, Option<Bytes>)>, i64) {
    let key = Bytes::from(format!("interop-{i}"));
    let value: Vec<u8> = (0..(i * 13) % 500)
        .map(|j| ((i * 7 + j * 13) % 256) as u8)
        .collect();
    let headers = vec![("i".to_string(), Some(Bytes::from(i.to_string())))];
    (
        key,
        Bytes::from(value),
        headers,
        1_700_000_000_000 + i as i64,
    )
}

#[test]
fn cairn_client_and_confluent_kafka_read_each_others_records_byte_for_byte() {
    const N: u64 = 2000;
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let rt = runtime();
    let addr = broker.addr.clone();
    // Cairn's client over the native protocol writes; confluent-kafka reads over Kafka.
    rt.block_on(async {
        let admin = Admin::connect(&addr).await.unwrap();
        admin.create_topic("from-cairn", 1, &[]).await.unwrap();
        admin.create_topic("from-kafka", 1, &[]).await.unwrap();
        let producer = Producer::connect(&addr, ProducerConfig::default())
            .await
            .unwrap();
        let mut deliveries = Vec::new();
        for i in 0..N {
            let (key, value, headers, ts) = interop_record(i);
            deliveries.push(
                producer
                    .send(ProducerRecord {
                        topic: "from-cairn".into(),
                        partition: Some(0),
                        key: Some(key),
                        value: Some(value),
                        headers,
                        timestamp: Some(ts),
                    })
                    .await
                    .unwrap(),
            );
        }
        for d in deliveries {
            d.await.unwrap();
        }
        producer.close().await.unwrap();
    });
    let run = |mode: &str, topic: &str| {
        let out = Command::new(&python)
            .arg(script("interop.py"))
            .args([mode, &broker.kafka, topic, &N.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "interop.py {mode}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("verify", "from-cairn");
    // confluent-kafka writes (zstd); Cairn's consumer reads over the native protocol.
    run("produce", "from-kafka");
    rt.block_on(async {
        let mut consumer = Consumer::connect(&addr, ConsumerConfig::default())
            .await
            .unwrap();
        consumer
            .assign("from-kafka", Some(vec![0]), Position::Earliest)
            .await
            .unwrap();
        let mut i = 0u64;
        while i < N {
            for record in consumer.poll().await.unwrap() {
                let (key, value, headers, ts) = interop_record(i);
                assert_eq!(record.offset, i);
                assert_eq!(record.key, Some(key), "record {i}");
                assert_eq!(record.value, Some(value), "record {i}");
                assert_eq!(record.headers, headers, "record {i}");
                assert_eq!(record.timestamp, ts, "record {i}");
                i += 1;
            }
        }
    });
}

/// A request frame as the `kafka-protocol` crate encodes it.
fn kafka_frame<M: Encodable + HeaderVersion>(api_key: i16, version: i16, body: &M) -> Vec<u8> {
    let header = kp::RequestHeader::default()
        .with_request_api_key(api_key)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .with_client_id(Some(StrBytes::from_static_str("test")));
    let mut buf = BytesMut::new();
    header.encode(&mut buf, M::header_version(version)).unwrap();
    body.encode(&mut buf, version).unwrap();
    frame(&buf)
}

/// Decodes a response frame (length prefix included) of a flexible or classic version.
fn kafka_response<M: Decodable + HeaderVersion>(reply: &[u8], version: i16) -> M {
    assert!(!reply.is_empty(), "the broker closed the connection");
    let mut buf = Bytes::copy_from_slice(&reply[4..]);
    kp::ResponseHeader::decode(&mut buf, M::header_version(version)).unwrap();
    M::decode(&mut buf, version).unwrap()
}

fn produce_v9(topic: &str, records: Bytes) -> Vec<u8> {
    let body = kp::ProduceRequest::default()
        .with_transactional_id(None)
        .with_acks(1)
        .with_timeout_ms(5000)
        .with_topic_data(vec![
            kp::produce_request::TopicProduceData::default()
                .with_name(kp::TopicName(StrBytes::from_string(topic.into())))
                .with_partition_data(vec![
                    kp::produce_request::PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(records)),
                ]),
        ]);
    kafka_frame(0, 9, &body)
}

fn produce_error_code(reply: &[u8]) -> i16 {
    let response: kp::ProduceResponse = kafka_response(reply, 9);
    response.responses[0].partition_responses[0].error_code
}

#[test]
fn hostile_kafka_frames_get_an_error_or_a_close_and_the_broker_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let rt = runtime();
    let kafka_addr = broker.kafka.clone();
    // A control producer speaks the Kafka protocol, acks=all, through everything below.
    let control = rt.spawn(async move {
        let admin = Admin::with_connection(
            cairn_kafka_client::connect(&kafka_addr, "control")
                .await
                .unwrap(),
        );
        admin.create_topic("control", 1, &[]).await.unwrap();
        let producer = Producer::with_connection(
            cairn_kafka_client::connect(&kafka_addr, "control")
                .await
                .unwrap(),
            ProducerConfig {
                linger: Duration::ZERO,
                acks: cairn_client::Acks::All,
                ..ProducerConfig::default()
            },
        )
        .unwrap();
        produce_acknowledged_until(&producer, Duration::from_secs(8)).await
    });
    std::thread::sleep(Duration::from_millis(500));
    let before = broker.peak_rss_kib();
    let b = broker.kafka.as_str();

    // Framing: zero and huge lengths, a truncated header: closed.
    assert!(raw_exchange(b, &0u32.to_be_bytes()).is_empty());
    assert!(raw_exchange(b, &0x7fff_ffffu32.to_be_bytes()).is_empty());
    assert!(raw_exchange(b, &u32::MAX.to_be_bytes()).is_empty());
    assert!(raw_exchange(b, &frame(&[0, 3, 0])).is_empty());
    // Unknown API and unserved versions: closed, as Kafka does; ApiVersions of an unknown version:
    // the v0 response with UNSUPPORTED_VERSION and the versions served.
    assert!(raw_exchange(b, &frame(&[3, 231, 0, 0, 0, 0, 0, 1, 0, 0])).is_empty());
    assert!(raw_exchange(b, &frame(&[0, 3, 0, 13, 0, 0, 0, 1, 0, 0, 0])).is_empty());
    assert!(raw_exchange(b, &frame(&[0, 0, 0, 2, 0, 0, 0, 1, 0, 0])).is_empty());
    let reply = raw_exchange(b, &frame(&[0, 18, 0, 99, 0, 0, 0, 5, 0, 0]));
    let versions: kp::ApiVersionsResponse = kafka_response(&reply, 0);
    assert_eq!(versions.error_code, 35);
    assert!(
        versions
            .api_keys
            .iter()
            .any(|k| k.api_key == 18 && k.max_version == 3)
    );

    // Array counts of 2^31-1 (classic) and 2^32-2 (compact), a string longer than the frame, a
    // tagged-field bomb: closed, nothing allocated for them (memory is checked below).
    let mut metadata_v1 = vec![0u8, 3, 0, 1, 0, 0, 0, 1, 0, 0];
    metadata_v1.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    assert!(raw_exchange(b, &frame(&metadata_v1)).is_empty());
    let metadata_v9 = [
        0u8, 3, 0, 9, 0, 0, 0, 1, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 0x0f,
    ];
    assert!(raw_exchange(b, &frame(&metadata_v9)).is_empty());
    let mut long_string = vec![0u8, 3, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1];
    long_string.extend_from_slice(&0x7fffu16.to_be_bytes());
    assert!(raw_exchange(b, &frame(&long_string)).is_empty());
    let tag_bomb = [
        0u8, 3, 0, 9, 0, 0, 0, 1, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 0,
    ];
    assert!(raw_exchange(b, &frame(&tag_bomb)).is_empty());
    let tag_size_bomb = [
        0u8, 3, 0, 9, 0, 0, 0, 1, 0, 0, 1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f,
    ];
    assert!(raw_exchange(b, &frame(&tag_size_bomb)).is_empty());

    // Record batches: a bad CRC and garbage are CORRUPT_MESSAGE; a transactional batch is
    // refused.
    let mut builder =
        cairn_protocol::batch::BatchBuilder::new(cairn_protocol::batch::Compression::None);
    builder.push(0, None, Some(b"x"), &[]);
    let mut bad_crc = builder.build().unwrap().to_vec();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 1;
    let reply = raw_exchange(b, &produce_v9("control", Bytes::from(bad_crc)));
    assert_eq!(produce_error_code(&reply), 2, "CORRUPT_MESSAGE");
    let reply = raw_exchange(b, &produce_v9("control", Bytes::from_static(&[7; 100])));
    assert_eq!(produce_error_code(&reply), 2, "CORRUPT_MESSAGE");
    let mut transactional =
        cairn_protocol::batch::BatchBuilder::new(cairn_protocol::batch::Compression::None)
            .producer(5, 0, 0)
            .transactional(true);
    transactional.push(0, None, Some(b"t"), &[]);
    let transactional = transactional.build().unwrap().to_vec();
    let reply = raw_exchange(b, &produce_v9("control", Bytes::from(transactional)));
    assert_eq!(produce_error_code(&reply), 87, "INVALID_RECORD");
    // A compression bomb: 64 MiB of zeros in a 64 KiB gzip batch. The broker stores batches as
    // sent (it never decompresses them); consumers decompress under a cap.
    let mut builder =
        cairn_protocol::batch::BatchBuilder::new(cairn_protocol::batch::Compression::Gzip);
    builder.push(0, None, Some(&vec![0u8; 64 << 20]), &[]);
    let bomb = builder.build().unwrap();
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let reply = raw_exchange(b, &produce_v9("control", bomb));
    assert_eq!(produce_error_code(&reply), 0, "stored as sent");

    let n = rt.block_on(control).unwrap();
    assert!(
        n > 20,
        "the control producer kept going ({n} acks=all records)"
    );
    let growth_mib = broker.peak_rss_kib().saturating_sub(before) / 1024;
    println!("peak RSS grew {growth_mib} MiB through the hostile frames");
    assert!(growth_mib < 48, "peak RSS grew {growth_mib} MiB");
    let (_, metrics) = broker.http_get("/metrics");
    assert!(metrics.contains("api=\"kafka:malformed\""), "{metrics}");
}

/// One batch of `n` records from producer `pid` at `epoch`, starting at sequence `seq`.
fn idempotent_batch(pid: i64, epoch: i16, seq: i32, n: usize) -> Bytes {
    let mut builder =
        cairn_protocol::batch::BatchBuilder::new(cairn_protocol::batch::Compression::None)
            .producer(pid, epoch, seq);
    for i in 0..n {
        builder.push(0, None, Some(format!("{seq}-{i}").as_bytes()), &[]);
    }
    builder.build().unwrap()
}

/// (error code, base offset) of a Produce v9 of `batch` to `idem`-0.
fn produce_idempotent(addr: &str, batch: Bytes) -> (i16, i64) {
    let response: kp::ProduceResponse =
        kafka_response(&raw_exchange(addr, &produce_v9("idem", batch)), 9);
    let p = &response.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

#[test]
fn idempotent_retries_get_their_first_offsets_even_after_a_crash_and_gaps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = BrokerProcess::start(&data);
    let k = broker.kafka.clone();
    let create = kp::CreateTopicsRequest::default().with_topics(vec![
        kp::create_topics_request::CreatableTopic::default()
            .with_name(kp::TopicName(StrBytes::from_static_str("idem")))
            .with_num_partitions(1)
            .with_replication_factor(1),
    ]);
    let created: kp::CreateTopicsResponse =
        kafka_response(&raw_exchange(&k, &kafka_frame(19, 5, &create)), 5);
    assert_eq!(created.topics[0].error_code, 0);
    let pid = 4242;
    assert_eq!(
        produce_idempotent(&k, idempotent_batch(pid, 0, 0, 3)),
        (0, 0)
    );
    // The same batch again (a retry after a lost response): its first offsets, nothing written.
    assert_eq!(
        produce_idempotent(&k, idempotent_batch(pid, 0, 0, 3)),
        (0, 0)
    );
    // A gap in the sequence: OUT_OF_ORDER_SEQUENCE_NUMBER.
    assert_eq!(
        produce_idempotent(&k, idempotent_batch(pid, 0, 10, 1)).0,
        45
    );
    assert_eq!(
        produce_idempotent(&k, idempotent_batch(pid, 0, 3, 2)),
        (0, 3)
    );
    // kill -9: the producer state is rebuilt from the log's batch headers at restart.
    broker.kill9();
    let broker = BrokerProcess::start(&data);
    let k = broker.kafka.clone();
    assert_eq!(
        produce_idempotent(&k, idempotent_batch(pid, 0, 3, 2)),
        (0, 3)
    );
    assert_eq!(
        produce_idempotent(&k, idempotent_batch(pid, 0, 0, 3)),
        (0, 0)
    );
    // A new epoch must start at sequence 0; afterwards the old epoch is fenced.
    assert_eq!(produce_idempotent(&k, idempotent_batch(pid, 1, 5, 1)).0, 45);
    assert_eq!(
        produce_idempotent(&k, idempotent_batch(pid, 1, 0, 1)),
        (0, 5)
    );
    assert_eq!(produce_idempotent(&k, idempotent_batch(pid, 0, 5, 1)).0, 47);
    // Every offset once: 0..=5.
    let fetch = kp::FetchRequest::default()
        .with_replica_id(kp::BrokerId(-1))
        .with_max_bytes(1 << 20)
        .with_topics(vec![
            kp::fetch_request::FetchTopic::default()
                .with_topic(kp::TopicName(StrBytes::from_static_str("idem")))
                .with_partitions(vec![
                    kp::fetch_request::FetchPartition::default()
                        .with_partition(0)
                        .with_fetch_offset(0)
                        .with_partition_max_bytes(1 << 20),
                ]),
        ]);
    let fetched: kp::FetchResponse =
        kafka_response(&raw_exchange(&k, &kafka_frame(1, 12, &fetch)), 12);
    let p = &fetched.responses[0].partitions[0];
    assert_eq!(p.high_watermark, 6);
    let records = p.records.clone().unwrap();
    let offsets: Vec<i64> = cairn_protocol::batch::Batches::new(records, u32::MAX)
        .flat_map(|b| b.unwrap().records(1 << 20).unwrap())
        .map(|r| r.offset)
        .collect();
    assert_eq!(offsets, vec![0, 1, 2, 3, 4, 5]);
    // A fetch from inside a batch (offset 4 of the batch 3..=4) returns that whole batch.
    let inside = fetch.clone().with_topics(vec![
        kp::fetch_request::FetchTopic::default()
            .with_topic(kp::TopicName(StrBytes::from_static_str("idem")))
            .with_partitions(vec![
                kp::fetch_request::FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(4)
                    .with_partition_max_bytes(1 << 20),
            ]),
    ]);
    let fetched: kp::FetchResponse =
        kafka_response(&raw_exchange(&k, &kafka_frame(1, 12, &inside)), 12);
    let records = fetched.responses[0].partitions[0].records.clone().unwrap();
    let first = cairn_protocol::batch::BatchHeader::parse(&records).unwrap();
    assert_eq!((first.base_offset, first.last_offset()), (3, 4));
    // InitProducerId hands out distinct ids, also across a restart.
    let init = kp::InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(60_000);
    let first: kp::InitProducerIdResponse =
        kafka_response(&raw_exchange(&k, &kafka_frame(22, 4, &init)), 4);
    broker.terminate();
    let broker = BrokerProcess::start(&data);
    let second: kp::InitProducerIdResponse =
        kafka_response(&raw_exchange(&broker.kafka, &kafka_frame(22, 4, &init)), 4);
    assert_eq!((first.error_code, second.error_code), (0, 0));
    assert!(
        second.producer_id.0 > first.producer_id.0,
        "{first:?} then {second:?}"
    );
    // A transactional id is refused.
    let transactional =
        init.with_transactional_id(Some(kp::TransactionalId(StrBytes::from_static_str("tx"))));
    let refused: kp::InitProducerIdResponse = kafka_response(
        &raw_exchange(&broker.kafka, &kafka_frame(22, 4, &transactional)),
        4,
    );
    assert_eq!(refused.error_code, 53);
}

#[test]
fn kafka_compatibility_doc_matches_what_api_versions_advertises() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let request = kp::ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str("cairn-test"))
        .with_client_software_version(StrBytes::from_static_str("1"));
    let reply = raw_exchange(&broker.kafka, &kafka_frame(18, 3, &request));
    let response: kp::ApiVersionsResponse = kafka_response(&reply, 3);
    assert_eq!(response.error_code, 0);
    let mut advertised: Vec<(i16, i16, i16)> = response
        .api_keys
        .iter()
        .map(|k| (k.api_key, k.min_version, k.max_version))
        .collect();
    advertised.sort_unstable();

    // Table rows: | key | name | versions | notes |, versions "a–b" (or "a-b") or "—" (not served).
    let doc =
        std::fs::read_to_string(manifest_dir().join("../docs/kafka-compatibility.md")).unwrap();
    let mut documented = Vec::new();
    let mut unserved = Vec::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, key, _name, versions, ..] = cells.as_slice() else {
            continue;
        };
        let Ok(key) = key.parse::<i16>() else {
            continue;
        };
        let versions = versions.replace('–', "-");
        match versions.split_once('-') {
            Some((min, max)) if !min.is_empty() => documented.push((
                key,
                min.trim().parse::<i16>().unwrap(),
                max.trim().parse::<i16>().unwrap(),
            )),
            _ => unserved.push(key),
        }
    }
    documented.sort_unstable();
    assert_eq!(
        documented, advertised,
        "docs/kafka-compatibility.md (left) and ApiVersions (right) disagree"
    );
    assert!(
        !unserved.is_empty(),
        "the table lists what is not served too"
    );
    for key in unserved {
        assert!(
            advertised.iter().all(|(k, _, _)| *k != key),
            "API {key} is documented as not served but advertised"
        );
    }
    println!("ApiVersions v3 advertises {advertised:?}");
}

#[test]
fn committed_offsets_survive_kill_9_and_restart_for_kafka_clients() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = BrokerProcess::start(&data);
    let rt = runtime();
    let addr = broker.addr.clone();
    rt.block_on(async {
        let admin = Admin::connect(&addr).await.unwrap();
        admin.create_topic("tracked", 3, &[]).await.unwrap();
    });
    let run = |mode: &str, client: &str, kafka: &str| {
        let group = format!("group-{client}");
        let out = Command::new(&python)
            .arg(script("offsets.py"))
            .args([mode, client, kafka, &group, "tracked"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "offsets.py {mode} {client}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| !l.starts_with('%'))
                .collect::<Vec<_>>()
                .join("\n")
        );
    };
    for client in ["confluent", "kafka-python"] {
        run("commit", client, &broker.kafka);
    }
    let (_, metrics) = broker.http_get("/metrics");
    assert!(
        metrics.contains(
            "cairn_consumergroup_lag{group=\"group-confluent\",partition=\"1\",topic=\"tracked\"} 0"
        ),
        "{metrics}"
    );
    // The internal topic cannot be created or deleted by clients.
    rt.block_on(async {
        let admin = Admin::connect(&addr).await.unwrap();
        assert!(
            admin
                .create_topic("__consumer_offsets", 1, &[])
                .await
                .is_err()
        );
        assert!(admin.delete_topic("__consumer_offsets").await.is_err());
    });
    // kill -9: the commits were durable before they were acknowledged.
    broker.kill9();
    let broker = BrokerProcess::start(&data);
    for client in ["confluent", "kafka-python"] {
        run("verify", client, &broker.kafka);
    }
    // A clean restart, and the internal topic is listed as internal.
    broker.terminate();
    let broker = BrokerProcess::start(&data);
    for client in ["confluent", "kafka-python"] {
        run("verify", client, &broker.kafka);
    }
    let metadata = kp::MetadataRequest::default().with_topics(None);
    let response: kp::MetadataResponse = kafka_response(
        &raw_exchange(&broker.kafka, &kafka_frame(3, 9, &metadata)),
        9,
    );
    let internal: Vec<_> = response
        .topics
        .iter()
        .filter(|t| t.is_internal)
        .map(|t| t.name.as_ref().map(|n| n.0.to_string()))
        .collect();
    assert_eq!(internal, vec![Some("__consumer_offsets".to_string())]);
    // DeleteGroups forgets a group's offsets, also across a restart.
    run("delete", "confluent", &broker.kafka);
    broker.terminate();
    let broker = BrokerProcess::start(&data);
    run("verify", "kafka-python", &broker.kafka);
    let out = Command::new(&python)
        .arg(script("offsets.py"))
        .args([
            "verify",
            "confluent",
            &broker.kafka,
            "group-confluent",
            "tracked",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the deleted group's offsets came back"
    );
}

/// Runs `groups.py MODE KAFKA_ADDRESS ARGS...` against a fresh broker process (a short initial
/// rebalance delay: members start together) with `env`; asserts it succeeded and returns the
/// broker (for its metrics), its directory and the script's output.
fn groups_py(
    mode: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (BrokerProcess, tempfile::TempDir, String) {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with_config(
        &dir.path().join("data"),
        "group_initial_rebalance_delay_ms = 1000\n",
    );
    let out = Command::new(python)
        .arg(script("groups.py"))
        .args([mode, broker.kafka.as_str()])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "groups.py {mode} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.starts_with('%'))
            .collect::<Vec<_>>()
            .join("\n")
    );
    (broker, dir, stdout)
}

/// Runs the groups.py scenario with members m1..m4 of the given clients, confluent-kafka members
/// using `assignor`.
fn run_group(clients: &str, assignor: &str) {
    let (broker, _dir, _) = groups_py(
        "run",
        &["grouped", "group-1", clients],
        &[("CAIRN_GROUP_ASSIGNOR", assignor)],
    );
    let (_, metrics) = broker.http_get("/metrics");
    let members: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("cairn_consumergroup_"))
        .collect();
    println!("{}", members.join("\n"));
    assert!(
        members
            .iter()
            .any(|l| l.starts_with("cairn_consumergroup_generation{group=\"group-1\"}")),
        "{members:?}"
    );
}

#[test]
fn a_confluent_kafka_consumer_group_shares_partitions_and_survives_a_member_kill_9() {
    run_group("confluent,confluent,confluent,confluent", "range");
}

#[test]
fn a_cooperative_sticky_group_rebalances_incrementally() {
    run_group(
        "confluent,confluent,confluent,confluent",
        "cooperative-sticky",
    );
}

#[test]
fn a_mixed_confluent_and_kafka_python_group_works_the_same() {
    run_group("confluent,kafka-python,confluent,kafka-python", "range");
}

/// The figure beside Cairn's own (tests/it/groups.rs): confluent-kafka members with librdkafka's
/// default settings (45 s session, 3 s heartbeat interval, range assignor), a fourth joining a
/// group of three over 12 partitions with a producer running. Printed, not asserted: Kafka's
/// clients learn of a rebalance at their next heartbeat.
#[test]
fn confluent_kafka_rebalance_time_with_default_settings() {
    let (_broker, _dir, stdout) = groups_py("jointime", &["joined", "group-defaults"], &[]);
    assert!(stdout.contains("ok: confluent-kafka"), "{stdout}");
}

/// Static membership (KIP-345) with confluent-kafka: a member with `group.instance.id` killed
/// with SIGKILL and restarted within its session timeout gets its partitions back and the other
/// members see no rebalance.
#[test]
fn a_restarted_static_member_gets_its_partitions_back_without_a_rebalance() {
    groups_py("static", &["statics", "group-static"], &[]);
}

/// This package's directory, as the test runner says at run time (a build cache shared by
/// clones at different paths may hold a binary compiled in another clone, with that clone's
/// path baked in by `env!`).
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
