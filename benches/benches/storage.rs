//! Storage benchmarks. Every Cairn figure has a baseline measured in the same run on the same
//! machine, and `benches/report.py` prints the ratios:
//! - `append/log` vs `append/write_all`: 64 KiB batches of 1 KiB records, no fsync, against plain
//!   `write_all` of the same bytes to a file;
//! - `append_fsync/log` vs `append_fsync/write_all_fdatasync`: the same with one fdatasync per batch;
//! - `read/mmap` and `read/pread` vs `read/memcpy`: reading the whole log from offset 0, copying
//!   every returned slice into a 1 MiB buffer as a socket write would, against memcpy of the same
//!   bytes from memory;
//! - `recovery/scan_1gib`: opening a 1 GiB log after an unclean stop with no recovery point (a full
//!   scan), reported as bytes per second;
//! - `open/clean_1000_segments`: opening a cleanly closed log of 1,000 segments;
//! - `compaction/compact` vs `compaction/copy_fsync`: one compaction pass over a log of keyed
//!   1 KiB records (1,000 keys, so most records are superseded), against reading the same
//!   segment files and writing them to a new file with one fsync.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use cairn_benches::{quick, standard_batch};
use cairn_protocol::Offset;
use cairn_storage::{FlushPolicy, Log, LogConfig, ReadMode};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn append(c: &mut Criterion) {
    let batch = standard_batch();
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Bytes(batch.len() as u64));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    group.bench_function("write_all", |b| {
        b.iter_custom(|iters| {
            let dir = tempfile::tempdir().unwrap();
            let mut file = File::create(dir.path().join("raw")).unwrap();
            let started = Instant::now();
            for _ in 0..iters {
                file.write_all(&batch).unwrap();
            }
            started.elapsed()
        })
    });
    group.bench_function("log", |b| {
        b.iter_custom(|iters| {
            let dir = tempfile::tempdir().unwrap();
            let log = Log::open(dir.path(), LogConfig::default()).unwrap();
            // The broker appends from the request buffer it owns: stamping it in place again
            // each time costs what a real append costs.
            let mut buf = batch.clone();
            let started = Instant::now();
            for _ in 0..iters {
                log.append(&mut buf, 0).unwrap();
            }
            started.elapsed()
        })
    });
    group.finish();
}

fn append_fsync(c: &mut Criterion) {
    let batch = standard_batch();
    let mut group = c.benchmark_group("append_fsync");
    group.throughput(Throughput::Bytes(batch.len() as u64));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(6));
    group.bench_function("write_all_fdatasync", |b| {
        b.iter_custom(|iters| {
            let dir = tempfile::tempdir().unwrap();
            let mut file = File::create(dir.path().join("raw")).unwrap();
            let started = Instant::now();
            for _ in 0..iters {
                file.write_all(&batch).unwrap();
                file.sync_data().unwrap();
            }
            started.elapsed()
        })
    });
    group.bench_function("log", |b| {
        b.iter_custom(|iters| {
            let dir = tempfile::tempdir().unwrap();
            let config = LogConfig {
                flush: FlushPolicy::EveryAppend,
                ..LogConfig::default()
            };
            let log = Log::open(dir.path(), config).unwrap();
            let mut buf = batch.clone();
            let started = Instant::now();
            for _ in 0..iters {
                log.append(&mut buf, 0).unwrap();
            }
            started.elapsed()
        })
    });
    group.finish();
}

/// A closed log of `n_bytes` of standard batches.
fn filled_log(dir: &Path, n_bytes: u64, config: &LogConfig) -> u64 {
    let log = Log::open(dir, config.clone()).unwrap();
    let mut buf = standard_batch();
    let mut written = 0;
    while written < n_bytes {
        log.append(&mut buf, 0).unwrap();
        written += buf.len() as u64;
    }
    log.close().unwrap();
    written
}

fn read(c: &mut Criterion) {
    let n_bytes: u64 = if quick() { 16 << 20 } else { 256 << 20 };
    let dir = tempfile::tempdir().unwrap();
    let written = filled_log(dir.path(), n_bytes, &LogConfig::default());
    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Bytes(written));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    let source = vec![7u8; written as usize];
    let mut sink = vec![0u8; 1 << 20];
    group.bench_function("memcpy", |b| {
        b.iter(|| {
            for chunk in source.chunks(1 << 20) {
                sink[..chunk.len()].copy_from_slice(chunk);
            }
            std::hint::black_box(&sink);
        })
    });
    for (name, mode) in [("mmap", ReadMode::Mmap), ("pread", ReadMode::Pread)] {
        let log = Log::open(
            dir.path(),
            LogConfig {
                read_mode: mode,
                ..LogConfig::default()
            },
        )
        .unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut next = Offset(0);
                let mut total = 0usize;
                loop {
                    let fetched = log.read(next, 1 << 20).unwrap();
                    if fetched.bytes.is_empty() {
                        break;
                    }
                    sink[..fetched.bytes.len()].copy_from_slice(&fetched.bytes);
                    total += fetched.bytes.len();
                    next = last_offset_after(&fetched.bytes);
                }
                assert_eq!(total as u64, written);
                std::hint::black_box(&sink);
            })
        });
        log.close().unwrap();
    }
    group.finish();
}

/// The offset after the last batch of a read.
fn last_offset_after(bytes: &[u8]) -> Offset {
    let mut pos = 0;
    let mut next = 0;
    while let Some((base, len)) = cairn_protocol::batch::peek_offset_and_length(&bytes[pos..]) {
        let header = cairn_protocol::batch::BatchHeader::parse(&bytes[pos..]).unwrap();
        next = base as u64 + header.last_offset_delta as u64 + 1;
        pos += 12 + len as usize;
        if pos >= bytes.len() {
            break;
        }
    }
    Offset(next)
}

fn recovery(c: &mut Criterion) {
    let n_bytes: u64 = if quick() { 32 << 20 } else { 1 << 30 };
    let dir = tempfile::tempdir().unwrap();
    let written = filled_log(dir.path(), n_bytes, &LogConfig::default());
    let mut group = c.benchmark_group("recovery");
    group.throughput(Throughput::Bytes(written));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("scan_1gib", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // An unclean stop long after the last checkpoint: no marker, no recovery point,
                // so every segment is scanned batch by batch.
                let _ = std::fs::remove_file(dir.path().join(".clean-shutdown"));
                let _ = std::fs::remove_file(dir.path().join("recovery-point-offset-checkpoint"));
                let started = Instant::now();
                let log = Log::open(dir.path(), LogConfig::default()).unwrap();
                total += started.elapsed();
                assert_eq!(log.recovery_report().n_bytes_scanned, written);
                drop(log);
            }
            total
        })
    });
    group.finish();
}

fn open_clean(c: &mut Criterion) {
    let n_segments: u64 = if quick() { 100 } else { 1000 };
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        ..LogConfig::default()
    };
    // Standard batches are ~64 KiB, so each lands in a segment of its own.
    filled_log(dir.path(), n_segments * 64 * 1024, &config);
    let mut group = c.benchmark_group("open");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("clean_1000_segments", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let log = Log::open(dir.path(), config.clone()).unwrap();
                total += started.elapsed();
                assert!(log.recovery_report().clean);
                assert!(log.n_segments() as u64 >= n_segments);
                log.close().unwrap();
            }
            total
        })
    });
    group.finish();
}

/// A closed, compacted-topic log of `n_bytes` of batches of 64 keyed 1 KiB records.
fn keyed_log(dir: &Path, n_bytes: u64, config: &LogConfig) -> u64 {
    let log = Log::open(dir, config.clone()).unwrap();
    let value = vec![7u8; 1024];
    let (mut written, mut i) = (0u64, 0u64);
    while written < n_bytes {
        let mut builder =
            cairn_protocol::batch::BatchBuilder::new(cairn_protocol::batch::Compression::None);
        for _ in 0..64 {
            builder.push(
                1,
                Some(format!("key-{}", i % 1000).as_bytes()),
                Some(&value),
                &[],
            );
            i += 1;
        }
        let mut batch = builder.build().unwrap().to_vec();
        log.append(&mut batch, 0).unwrap();
        written += batch.len() as u64;
    }
    log.close().unwrap();
    written
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn compaction(c: &mut Criterion) {
    let n_bytes: u64 = if quick() { 16 << 20 } else { 128 << 20 };
    let pristine = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 16 << 20,
        compacted: true,
        ..LogConfig::default()
    };
    let written = keyed_log(pristine.path(), n_bytes, &config);
    let mut group = c.benchmark_group("compaction");
    group.throughput(Throughput::Bytes(written));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("copy_fsync", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let out = tempfile::tempdir().unwrap();
                let started = Instant::now();
                let mut file = File::create(out.path().join("copy")).unwrap();
                let mut paths: Vec<_> = std::fs::read_dir(pristine.path())
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|e| e == "log"))
                    .collect();
                paths.sort();
                for path in paths {
                    file.write_all(&std::fs::read(path).unwrap()).unwrap();
                }
                file.sync_all().unwrap();
                total += started.elapsed();
            }
            total
        })
    });
    group.bench_function("compact", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let work = tempfile::tempdir().unwrap();
                copy_dir(pristine.path(), work.path());
                let log = Log::open(work.path(), config.clone()).unwrap();
                let started = Instant::now();
                let report = log.compact(2).unwrap();
                total += started.elapsed();
                assert!(report.n_segments_replaced > 0, "{report:?}");
                drop(log);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    append,
    append_fsync,
    read,
    recovery,
    open_clean,
    compaction
);
criterion_main!(benches);
