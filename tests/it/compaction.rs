//! Log compaction against a model: random puts and deletes of a few keys, rolls, compaction
//! passes at random moments, and the process dying at a random operation inside a pass (then a
//! power loss or a plain restart). After every step the log must hold, for every key, the latest
//! value written (or, for a deleted key, its tombstone or nothing, never an older value), every
//! record it holds must be exactly a record that was appended at that offset, and offsets must
//! increase. Every append is synced (flush every append), so every acknowledged record must
//! survive every crash.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_protocol::Offset;
use cairn_protocol::batch::{BatchBuilder, Batches, Compression};
use cairn_storage::{FlushPolicy, Log, LogConfig};
use cairn_testkit::FaultFs;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const KEYS: u32 = 12;
const TOMBSTONE_RETENTION_MS: i64 = 2_000;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        preallocate_bytes: 4096,
        flush: FlushPolicy::EveryAppend,
        compacted: true,
        retention_age: None,
        segment_age: None,
        tombstone_retention: Duration::from_millis(TOMBSTONE_RETENTION_MS as u64),
        // Every pass runs: the model decides when.
        min_cleanable_dirty_ratio: 0.0,
        ..LogConfig::default()
    }
}

/// The model's config for a seed: every third seed has a key map of 4 keys (of 12), so passes
/// map part of the dirty section and later passes go on from there.
fn model_config(seed: u64) -> LogConfig {
    let mut config = config();
    if seed.is_multiple_of(3) {
        config.compaction_key_map_bytes = 4 * cairn_storage::KEY_MAP_ENTRY_BYTES;
    }
    config
}

/// Every record of the log: (offset, key, value, timestamp).
type Row = (u64, Bytes, Option<Bytes>, i64);

fn read_all(log: &Log) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut offset = log.log_start_offset().0;
    let end = log.log_end_offset().0;
    while offset < end {
        let fetched = log.read(Offset(offset), 1 << 20).unwrap();
        if fetched.bytes.is_empty() {
            break;
        }
        for batch in Batches::new(fetched.bytes, u32::MAX) {
            let batch = batch.unwrap();
            offset = batch.header().last_offset() as u64 + 1;
            for r in batch.records(1 << 24).unwrap() {
                rows.push((r.offset as u64, r.key.unwrap(), r.value, r.timestamp));
            }
        }
    }
    rows
}

fn open(fs: &FaultFs, dir: &Path, config: &LogConfig) -> Log {
    Log::open_with(Arc::new(fs.clone()), dir, config.clone()).unwrap()
}

/// Checks the log against what was appended: `history` maps offsets to (key, value) as written,
/// `latest` every key to its latest value (`None`: deleted).
fn check(
    log: &Log,
    history: &BTreeMap<u64, (Bytes, Option<Bytes>)>,
    latest: &BTreeMap<Bytes, Option<Bytes>>,
    context: &str,
) {
    log.verify().unwrap_or_else(|e| panic!("{context}: {e}"));
    let rows = read_all(log);
    let mut last: BTreeMap<Bytes, Option<Bytes>> = BTreeMap::new();
    let mut previous = None;
    for (offset, key, value, _) in &rows {
        assert!(
            previous < Some(*offset),
            "{context}: offsets not increasing at {offset}"
        );
        previous = Some(*offset);
        let written = history
            .get(offset)
            .unwrap_or_else(|| panic!("{context}: offset {offset} was never written"));
        assert_eq!(
            (&written.0, &written.1),
            (key, value),
            "{context}: record at {offset} changed"
        );
        last.insert(key.clone(), value.clone());
    }
    for (key, value) in latest {
        match (value, last.get(key)) {
            (Some(v), Some(Some(got))) => {
                assert_eq!(v, got, "{context}: key {key:?} has a stale value")
            }
            (Some(_), other) => panic!("{context}: live key {key:?} ends with {other:?}"),
            (None, None | Some(None)) => {}
            (None, Some(Some(got))) => {
                let mine: Vec<_> = rows
                    .iter()
                    .filter(|r| r.1 == *key)
                    .map(|r| (r.0, r.2.is_some()))
                    .collect();
                let hist: Vec<_> = history
                    .iter()
                    .filter(|(_, (k, _))| k == key)
                    .map(|(o, (_, v))| (*o, v.is_some()))
                    .collect();
                panic!(
                    "{context}: deleted key {key:?} shows {got:?}\nlog {mine:?}\nhistory {hist:?}\nsegments {:?}",
                    log.segment_bases()
                )
            }
        }
    }
}

/// Drops the log, then a power loss or a process death, then opens it again.
fn restart(log: Log, fs: &FaultFs, dir: &Path, rng: &mut SmallRng, config: &LogConfig) -> Log {
    drop(log);
    if rng.random_bool(0.5) {
        fs.crash(rng.random());
    } else {
        fs.kill_process();
    }
    open(fs, dir, config)
}

/// Runs one seed; returns (compaction passes completed, passes the process died in).
fn run_seed(seed: u64) -> (u64, u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let fs = FaultFs::new();
    let dir = Path::new("/compacted");
    let config = model_config(seed);
    let mut log = open(&fs, dir, &config);
    let mut history: BTreeMap<u64, (Bytes, Option<Bytes>)> = BTreeMap::new();
    let mut latest: BTreeMap<Bytes, Option<Bytes>> = BTreeMap::new();
    let mut now_ms: i64 = 1_000_000;
    let mut n_compactions = 0u64;
    let mut n_dead = 0u64;
    for step in 0..160 {
        now_ms += rng.random_range(0..400);
        let context = format!("seed {seed} step {step}");
        match rng.random_range(0..100) {
            0..70 => {
                // A batch of 1-4 puts or deletes.
                let codec = [Compression::None, Compression::Lz4, Compression::Zstd]
                    [rng.random_range(0..3)];
                let mut builder = BatchBuilder::new(codec);
                let mut written = Vec::new();
                for _ in 0..rng.random_range(1..=4) {
                    let key = Bytes::from(format!("key-{}", rng.random_range(0..KEYS)));
                    let value = if rng.random_bool(0.2) {
                        None
                    } else {
                        Some(Bytes::from(format!(
                            "{key:?}@{step}-{}",
                            "x".repeat(rng.random_range(0..120))
                        )))
                    };
                    builder.push(now_ms, Some(&key), value.as_deref(), &[]);
                    written.push((key, value));
                }
                let mut bytes = builder.build().unwrap().to_vec();
                let info = log.append(&mut bytes, 0).unwrap();
                for (i, (key, value)) in written.into_iter().enumerate() {
                    history.insert(info.base_offset.0 + i as u64, (key.clone(), value.clone()));
                    latest.insert(key, value);
                }
            }
            70..78 => log.roll().unwrap(),
            78..93 => {
                // A compaction pass, perhaps dying at a random operation inside it.
                let die = rng.random_bool(0.5);
                if die {
                    fs.die_after(Some(rng.random_range(0..40)));
                }
                match log.compact(now_ms) {
                    Ok(_) => {
                        n_compactions += 1;
                        fs.die_after(None);
                    }
                    Err(_) => {
                        assert!(die, "{context}: compaction failed without a fault");
                        n_dead += 1;
                        log = restart(log, &fs, dir, &mut rng, &config);
                    }
                }
            }
            // A restart: power loss or process death.
            _ => log = restart(log, &fs, dir, &mut rng, &config),
        }
        check(&log, &history, &latest, &context);
    }
    // Finally, with everything sealed and old enough, compaction leaves one record per live key.
    log.roll().unwrap();
    // A small key map takes several passes to cover everything.
    for pass in 0.. {
        assert!(pass < 100, "seed {seed}: compaction never completes");
        let report = log.compact(now_ms + 10 * TOMBSTONE_RETENTION_MS).unwrap();
        check(
            &log,
            &history,
            &latest,
            &format!("seed {seed} final pass {pass}"),
        );
        if report.complete {
            break;
        }
    }
    check(&log, &history, &latest, &format!("seed {seed} final"));
    let rows = read_all(&log);
    let live = latest.values().filter(|v| v.is_some()).count();
    assert_eq!(rows.len(), live, "seed {seed}: {rows:?}");
    (n_compactions, n_dead)
}

#[test]
fn compaction_keeps_the_latest_value_of_every_key_through_crashes_mid_pass() {
    let seeds: u64 = std::env::var("CAIRN_SOAK_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(60, |n: u64| n / 4);
    // CAIRN_COMPACTION_SEED=N runs one seed (to reproduce a failure).
    let only: Option<u64> = std::env::var("CAIRN_COMPACTION_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let (mut passes, mut deaths) = (0, 0);
    for seed in (0..seeds).filter(|s| only.is_none_or(|o| o == *s)) {
        let (p, d) = run_seed(seed);
        passes += p;
        deaths += d;
    }
    println!("{passes} compaction passes completed, {deaths} died mid-pass and were recovered");
    assert!(
        only.is_some() || (passes > 100 && deaths > 100),
        "{passes} passes, {deaths} deaths"
    );
}

#[test]
fn compaction_on_real_files_keeps_bytes_already_handed_to_readers() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    for round in 0..200u32 {
        let mut builder = BatchBuilder::new(Compression::None);
        let key = format!("k{}", round % 5);
        builder.push(
            1,
            Some(key.as_bytes()),
            Some(format!("v{round}").as_bytes()),
            &[],
        );
        let mut bytes = builder.build().unwrap().to_vec();
        log.append(&mut bytes, 0).unwrap();
        if round % 20 == 19 {
            log.roll().unwrap();
        }
    }
    // A reader holds the first segment's bytes (a zero-copy slice of its map).
    let held = log.read(Offset(0), 1 << 20).unwrap().bytes;
    let copy = held.to_vec();
    let before = log.size_bytes();
    let report = log.compact(1_000_000).unwrap();
    assert!(report.n_segments_replaced > 0, "{report:?}");
    assert!(
        log.size_bytes() < before,
        "{} -> {}",
        before,
        log.size_bytes()
    );
    assert_eq!(
        &held[..],
        &copy[..],
        "bytes handed out before compaction changed"
    );
    let rows = read_all(&log);
    let keys: Vec<&[u8]> = rows.iter().map(|r| &r.1[..]).collect();
    // The active segment (rounds 180..200) is untouched; the sealed ones keep one record per key
    // unless the key has a later record.
    assert!(rows.len() <= 5 + 20, "{} rows: {keys:?}", rows.len());
    drop(log);
    let log = Log::open(dir.path(), config()).unwrap();
    log.verify().unwrap();
    assert_eq!(read_all(&log).len(), rows.len());
}

#[test]
fn a_compacted_topic_on_a_running_broker_keeps_the_latest_value_per_key() {
    use cairn_client::{
        Admin, ClientError, Consumer, ConsumerConfig, Position, Producer, ProducerConfig,
        ProducerRecord,
    };

    use crate::broker::runtime;
    use crate::broker_process::BrokerProcess;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = BrokerProcess::start_with_config(&data, "compaction_interval_ms = 100\n");
    let rt = runtime();
    let addr = broker.addr.clone();
    let n_keys = 20u32;
    let latest = rt.block_on(async {
        let admin = Admin::connect(&addr).await.unwrap();
        let configs = [
            ("cleanup.policy".to_string(), "compact".to_string()),
            ("segment.bytes".to_string(), "4096".to_string()),
            ("delete.retention.ms".to_string(), "0".to_string()),
        ];
        admin.create_topic("latest", 1, &configs).await.unwrap();
        let producer = Producer::connect(&addr, ProducerConfig::default())
            .await
            .unwrap();
        let mut latest = BTreeMap::new();
        let mut deliveries = Vec::new();
        for i in 0..3000u32 {
            let key = format!("key-{}", i % n_keys);
            // Every seventh update of keys 0..4 is a delete.
            let value = (!(i % n_keys < 5 && i % 7 == 0)).then(|| Bytes::from(format!("v{i}")));
            let mut record = ProducerRecord::new("latest", Bytes::new()).partition(0);
            record.key = Some(Bytes::from(key.clone()));
            record.value = value.clone();
            deliveries.push(producer.send(record).await.unwrap());
            latest.insert(key, value);
            // Rounds of 100, so that most batches end up in sealed segments (the active segment
            // is never compacted, as in Kafka).
            if i % 100 == 99 {
                for delivery in deliveries.drain(..) {
                    delivery.await.unwrap();
                }
            }
        }
        // A record without a key is refused.
        let keyless = producer
            .send(ProducerRecord::new("latest", "no key").partition(0))
            .await
            .unwrap()
            .await;
        assert!(
            matches!(&keyless, Err(ClientError::Broker { code, .. }) if code.0 == 87),
            "{keyless:?}"
        );
        producer.close().await.unwrap();
        latest
    });
    // Compaction runs in the background; wait for it to have shrunk the log.
    let read = |addr: &str| {
        rt.block_on(async {
            let mut consumer = Consumer::connect(addr, ConsumerConfig::default())
                .await
                .unwrap();
            consumer
                .assign("latest", Some(vec![0]), Position::Earliest)
                .await
                .unwrap();
            let mut rows = Vec::new();
            loop {
                let batch = consumer.poll().await.unwrap();
                if batch.is_empty() {
                    break;
                }
                rows.extend(batch.into_iter().map(|r| (r.key.unwrap(), r.value)));
            }
            rows
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = read(&broker.addr);
        if rows.len() < 500 || std::time::Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // At most one record per key in the sealed segments, plus the active segment (up to ~300
    // records: it is never compacted, as in Kafka).
    assert!(
        rows.len() < 500,
        "compaction never ran: {} records",
        rows.len()
    );
    let check = |rows: &[(Bytes, Option<Bytes>)]| {
        let mut last = BTreeMap::new();
        for (key, value) in rows {
            last.insert(String::from_utf8(key.to_vec()).unwrap(), value.clone());
        }
        for (key, value) in &latest {
            match value {
                Some(v) => assert_eq!(last.get(key), Some(&Some(v.clone())), "{key}"),
                None => assert!(!matches!(last.get(key), Some(Some(_))), "{key} deleted"),
            }
        }
    };
    check(&rows);
    let (_, metrics) = broker.http_get("/metrics");
    assert!(
        metrics.contains("cairn_log_cleaner_records_removed_total"),
        "{metrics}"
    );
    // The compacted log survives a restart as it is.
    broker.terminate();
    let broker = BrokerProcess::start(&data);
    let again = read(&broker.addr);
    check(&again);
    assert!(
        again.len() <= rows.len() + 1,
        "{} then {}",
        rows.len(),
        again.len()
    );
}

/// Passes wait for the dirty section to reach `min_cleanable_dirty_ratio` of the sealed bytes,
/// and a key map smaller than the dirty section's keys compacts it over several passes, each
/// going on from where the last stopped.
#[test]
fn passes_wait_for_the_dirty_ratio_and_a_small_key_map_takes_several_passes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config();
    config.min_cleanable_dirty_ratio = 0.5;
    config.compaction_key_map_bytes = 10 * cairn_storage::KEY_MAP_ENTRY_BYTES;
    let log = Log::open(dir.path(), config).unwrap();
    let append = |key: u32, round: u32| {
        let mut builder = BatchBuilder::new(Compression::None);
        builder.push(
            1,
            Some(format!("k{key}").as_bytes()),
            Some(format!("v{round}").as_bytes()),
            &[],
        );
        let mut bytes = builder.build().unwrap().to_vec();
        log.append(&mut bytes, 0).unwrap();
    };
    // 40 keys written 3 times, in sealed segments.
    for round in 0..3 {
        for key in 0..40 {
            append(key, round);
        }
    }
    log.roll().unwrap();
    let mut passes = 0;
    loop {
        passes += 1;
        let report = log.compact(1_000_000).unwrap();
        assert!(!report.skipped, "{report:?}");
        if report.complete {
            break;
        }
        assert!(passes < 20, "{report:?}");
    }
    let rows = read_all(&log);
    assert_eq!(rows.len(), 40, "one record per key after {passes} passes");
    assert!(
        passes >= 4,
        "10 keys per pass over 40 keys took {passes} passes"
    );
    // Nothing new: the dirty section is empty, the pass is skipped.
    assert!(log.compact(1_000_000).unwrap().skipped);
    // A little new data (below half the sealed bytes): still skipped; more: a pass runs.
    append(0, 9);
    log.roll().unwrap();
    assert!(log.compact(1_000_000).unwrap().skipped);
    for key in 0..40 {
        append(key, 10);
    }
    log.roll().unwrap();
    let mut report = log.compact(1_000_000).unwrap();
    assert!(!report.skipped, "{report:?}");
    let mut superseded = report.n_records_superseded;
    while !report.complete {
        report = log.compact(1_000_000).unwrap();
        superseded += report.n_records_superseded;
    }
    assert_eq!(superseded, 41, "40 keys rewritten, one of them twice");
    assert_eq!(read_all(&log).len(), 40);
}
