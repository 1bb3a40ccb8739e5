//! The log's operations one at a time on real files: append and read back, roll, reopen after a
//! clean close, lookups by time, retention, truncation, the directory lock, poisoning.

use std::sync::Arc;
use std::time::Duration;

use cairn_protocol::Offset;
use cairn_protocol::batch::{self, BatchBuilder, Compression};
use cairn_storage::{
    AppendError, Fatal, FlushPolicy, Log, LogConfig, OpenError, ReadError, ReadMode,
};
use cairn_testkit::{FaultFs, Faults, tagged_batch, tagged_value};

use crate::support::read_values;

fn small_config(read_mode: ReadMode) -> LogConfig {
    LogConfig {
        segment_bytes: 16 * 1024,
        index_interval_bytes: 1024,
        preallocate_bytes: 8 * 1024,
        read_mode,
        ..LogConfig::default()
    }
}

fn fill(log: &Log, n_batches: u64, records_per_batch: usize, ts: i64) {
    for idx in 0..n_batches {
        let tag = log.log_end_offset().0;
        let mut batch = tagged_batch(tag, records_per_batch, 100, ts + idx as i64);
        log.append(&mut batch, 0).unwrap();
    }
}

#[test]
fn append_assigns_offsets_and_reads_back_in_both_modes() {
    for mode in [ReadMode::Mmap, ReadMode::Pread] {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config(mode)).unwrap();
        fill(&log, 200, 5, 1_000);
        assert_eq!(log.log_end_offset(), Offset(1000));
        assert!(log.n_segments() > 5, "small segments roll");
        let values = read_values(&log, Offset(0));
        assert_eq!(values.len(), 1000);
        for (idx, (offset, value)) in values.iter().enumerate() {
            assert_eq!(*offset, idx as u64);
            assert_eq!(value.as_ref(), tagged_value(idx as u64, 100).as_slice());
        }
        // A read starting inside a batch returns that whole batch.
        let fetched = log.read(Offset(502), 1).unwrap();
        let header = batch::validate(&fetched.bytes, u32::MAX).unwrap();
        assert_eq!(header.base_offset, 500);
        assert_eq!(
            fetched.bytes.len(),
            header.total_bytes(),
            "max_bytes 1 still returns one batch"
        );
        // Reads past the end are errors; at the end, empty.
        assert!(log.read(Offset(1000), 1 << 20).unwrap().bytes.is_empty());
        assert!(matches!(
            log.read(Offset(1001), 1 << 20),
            Err(ReadError::OffsetOutOfRange { .. })
        ));
        // Bounded reads stop before the bound.
        let bounded = log.read_until(Offset(0), 1 << 20, Offset(7)).unwrap();
        let headers: Vec<_> = batch::Batches::new(bounded.bytes, u32::MAX)
            .map(|b| *b.unwrap().header())
            .collect();
        assert_eq!(headers.last().unwrap().last_offset(), 4);
        log.close().unwrap();
    }
}

#[test]
fn clean_reopen_scans_nothing_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(ReadMode::Mmap)).unwrap();
    fill(&log, 100, 3, 5_000);
    let before = read_values(&log, Offset(0));
    log.close().unwrap();
    let log = Log::open(dir.path(), small_config(ReadMode::Mmap)).unwrap();
    assert!(log.recovery_report().clean);
    assert_eq!(log.recovery_report().n_segments_scanned, 0);
    assert_eq!(log.log_end_offset(), Offset(300));
    assert_eq!(read_values(&log, Offset(0)), before);
    fill(&log, 10, 3, 6_000);
    assert_eq!(read_values(&log, Offset(0)).len(), 330);
    // Dropping without close is a crash: the next open scans.
    drop(log);
    let log = Log::open(dir.path(), small_config(ReadMode::Mmap)).unwrap();
    assert!(!log.recovery_report().clean);
    assert!(log.recovery_report().n_segments_scanned >= 1);
    assert_eq!(log.recovery_report().n_bytes_truncated, 0);
    assert_eq!(read_values(&log, Offset(0)).len(), 330);
}

#[test]
fn zero_copy_reads_outlive_truncation_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(ReadMode::Mmap);
    config.retention_bytes = Some(0);
    let log = Log::open(dir.path(), config).unwrap();
    fill(&log, 100, 5, 1_000);
    let held = log.read(Offset(480), 1 << 20).unwrap().bytes;
    let copy = held.to_vec();
    let new_end = log.truncate_to(Offset(452)).unwrap();
    assert_eq!(new_end, Offset(450), "the batch containing 452 goes whole");
    assert_eq!(
        held.as_ref(),
        copy.as_slice(),
        "a held read is never rewritten"
    );
    fill(&log, 5, 5, 2_000);
    assert_eq!(held.as_ref(), copy.as_slice());
    let early = log.read(Offset(0), 1 << 20).unwrap().bytes;
    let early_copy = early.to_vec();
    let report = log.apply_retention(0).unwrap();
    assert!(report.n_segments > 0);
    assert!(log.log_start_offset() > Offset(0));
    assert_eq!(
        early.as_ref(),
        early_copy.as_slice(),
        "unlinked segments stay readable while held"
    );
    assert!(matches!(
        log.read(Offset(0), 100),
        Err(ReadError::OffsetOutOfRange { .. })
    ));
}

#[test]
fn truncation_survives_reopen_and_keeps_epochs_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(ReadMode::Mmap)).unwrap();
    fill(&log, 50, 4, 1_000);
    let mut batch = tagged_batch(200, 4, 100, 2_000);
    log.append(&mut batch, 3).unwrap();
    fill_epoch(&log, 30, 3);
    let mut batch = tagged_batch(log.log_end_offset().0, 4, 100, 2_000);
    log.append(&mut batch, 5).unwrap();
    assert_eq!(log.end_offset_for_epoch(0), Some((0, Offset(200))));
    assert_eq!(log.end_offset_for_epoch(4), Some((3, Offset(324))));
    let end = log.truncate_to(Offset(300)).unwrap();
    assert_eq!(end, Offset(300));
    assert_eq!(log.leader_epochs().last().unwrap().epoch, 3);
    assert!(matches!(
        log.append(&mut tagged_batch(0, 1, 10, 0), 2),
        Err(AppendError::StaleLeaderEpoch { .. })
    ));
    drop(log);
    let log = Log::open(dir.path(), small_config(ReadMode::Mmap)).unwrap();
    assert_eq!(log.log_end_offset(), Offset(300));
    assert_eq!(read_values(&log, Offset(0)).len(), 300);
    assert_eq!(log.end_offset_for_epoch(3), Some((3, Offset(300))));
    // Truncating below the log start starts afresh there.
    let end = log.truncate_to(Offset(0)).unwrap();
    assert_eq!(end, Offset(0));
    assert!(read_values(&log, Offset(0)).is_empty());
}

#[test]
fn a_log_reset_to_a_later_offset_starts_there_empty_and_stays_so_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(ReadMode::Mmap)).unwrap();
    fill(&log, 60, 4, 1_000);
    assert!(log.n_segments() > 1);
    // A reader holding bytes from before the reset keeps them.
    let before = log.read(Offset(0), 4096).unwrap();
    log.reset_to(Offset(5_000)).unwrap();
    assert_eq!(log.log_start_offset(), Offset(5_000));
    assert_eq!(log.log_end_offset(), Offset(5_000));
    assert_eq!(log.n_segments(), 1);
    assert!(log.leader_epochs().is_empty());
    assert!(matches!(
        log.read(Offset(0), 100),
        Err(ReadError::OffsetOutOfRange { .. })
    ));
    let kept: usize = batch::Batches::new(before.bytes.clone(), u32::MAX)
        .map(|b| b.unwrap().records(1 << 20).unwrap().len())
        .sum();
    assert!(kept > 0);
    // A follower's next batches land at the leader's offsets, with their epoch.
    let mut batch = tagged_batch(5_000, 4, 100, 3_000);
    batch::stamp(&mut batch, 5_000, 7).unwrap();
    log.append_replicated(&batch).unwrap();
    log.flush_all().unwrap();
    assert_eq!(log.log_end_offset(), Offset(5_004));
    drop(log);
    let log = Log::open(dir.path(), small_config(ReadMode::Mmap)).unwrap();
    assert_eq!(log.log_start_offset(), Offset(5_000));
    assert_eq!(log.log_end_offset(), Offset(5_004));
    assert_eq!(log.end_offset_for_epoch(7), Some((7, Offset(5_004))));
    assert_eq!(read_values(&log, Offset(5_000)).len(), 4);
}

fn fill_epoch(log: &Log, n_batches: u64, epoch: u32) {
    for _ in 0..n_batches {
        let tag = log.log_end_offset().0;
        log.append(&mut tagged_batch(tag, 4, 100, 2_000), epoch)
            .unwrap();
    }
}

#[test]
fn offset_for_timestamp_finds_the_first_record_at_or_after() {
    for mode in [ReadMode::Mmap, ReadMode::Pread] {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config(mode)).unwrap();
        // Batch i holds records with timestamps 10*i + j for j in 0..5.
        for i in 0..300i64 {
            let mut builder = BatchBuilder::new(if i % 2 == 0 {
                Compression::Lz4
            } else {
                Compression::None
            });
            for j in 0..5 {
                builder.push(10 * i + j, None, Some(&[0u8; 60]), &[]);
            }
            log.append(&mut builder.build().unwrap().to_vec(), 0)
                .unwrap();
        }
        for (target, expect) in [
            (0, Some(0)),
            (3, Some(3)),
            (7, Some(5)),
            (1234, Some(619)),
            (1235, Some(620)),
            (2994, Some(1499)),
            (2995, None),
        ] {
            let found = log.offset_for_timestamp(target).unwrap().map(|(o, _)| o.0);
            assert_eq!(found, expect, "timestamp {target} ({mode:?})");
        }
        log.close().unwrap();
        let log = Log::open(dir.path(), small_config(mode)).unwrap();
        assert_eq!(
            log.offset_for_timestamp(1235).unwrap(),
            Some((Offset(620), 1240))
        );
    }
}

#[test]
fn retention_by_age_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(ReadMode::Mmap);
    config.retention_age = Some(Duration::from_millis(1_000));
    let log = Log::open(dir.path(), config.clone()).unwrap();
    fill(&log, 100, 5, 10_000); // timestamps 10_000..10_100
    fill(&log, 100, 5, 50_000);
    let n_before = log.n_segments();
    // Nothing is old at time 10_500.
    assert_eq!(log.apply_retention(10_500).unwrap().n_segments, 0);
    // At 20_000 the first hundred batches' segments are older than a second; the 50_000 ones not.
    let report = log.apply_retention(20_000).unwrap();
    assert!(report.n_segments > 0 && report.n_segments < n_before);
    let start = log.log_start_offset().0;
    assert!(start <= 500, "never deletes records newer than the limit");
    assert!(start > 0);
    drop(log);
    config.retention_age = None;
    config.retention_bytes = Some(20_000);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.log_start_offset().0, start);
    log.apply_retention(0).unwrap();
    assert!(log.size_bytes() >= 20_000);
    assert!(log.size_bytes() < 20_000 + 16 * 1024);
}

#[test]
fn segments_roll_by_record_age() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(ReadMode::Mmap);
    config.segment_bytes = 1 << 20;
    config.segment_age = Some(Duration::from_millis(100));
    let log = Log::open(dir.path(), config).unwrap();
    fill(&log, 3, 1, 1_000);
    assert_eq!(log.n_segments(), 1);
    fill(&log, 1, 1, 1_200);
    assert_eq!(log.n_segments(), 2);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    let err = Log::open(dir.path(), LogConfig::default()).unwrap_err();
    assert!(matches!(err, OpenError::Locked { .. }));
    assert!(err.to_string().contains("locked"), "{err}");
    drop(log);
    Log::open(dir.path(), LogConfig::default()).unwrap();
}

#[test]
fn invalid_batches_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(ReadMode::Mmap)).unwrap();
    fill(&log, 1, 2, 0);
    let mut bad_crc = tagged_batch(0, 2, 10, 0);
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 1;
    assert!(matches!(
        log.append(&mut bad_crc, 0),
        Err(AppendError::InvalidBatch(_))
    ));
    let mut huge = tagged_batch(0, 200, 100, 0);
    let mut config = small_config(ReadMode::Mmap);
    config.batch_bytes_max = 1000;
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert!(matches!(
        log.append(&mut huge, 0),
        Err(AppendError::InvalidBatch(_))
    ));
    assert!(matches!(log.append(&mut [], 0), Err(AppendError::Empty)));
    // Valid first batch, garbage second: neither is written.
    let mut two = tagged_batch(0, 2, 10, 0);
    two.extend_from_slice(&[1, 2, 3]);
    assert!(log.append(&mut two, 0).is_err());
    assert_eq!(log.log_end_offset(), Offset(2));
}

#[test]
fn a_failed_sync_poisons_the_log_until_reopened() {
    let fs = FaultFs::new();
    let dir = std::path::Path::new("/log");
    let config = LogConfig {
        flush: FlushPolicy::EveryAppend,
        read_mode: ReadMode::Pread,
        ..small_config(ReadMode::Pread)
    };
    let log = Log::open_with(Arc::new(fs.clone()), dir, config.clone()).unwrap();
    fill(&log, 3, 2, 0);
    fs.set_faults(Faults {
        fail_sync: true,
        ..Faults::default()
    });
    let err = log.append(&mut tagged_batch(6, 2, 10, 0), 0).unwrap_err();
    assert!(matches!(err, AppendError::Fatal(Fatal::Io { .. })), "{err}");
    fs.set_faults(Faults::default());
    // Syncs work again, but the log stays offline: no retry-and-ack after a failed fsync.
    let err = log.append(&mut tagged_batch(8, 2, 10, 0), 0).unwrap_err();
    assert!(
        matches!(err, AppendError::Fatal(Fatal::PreviousIo { .. })),
        "{err}"
    );
    assert!(log.read(Offset(0), 100).is_err());
    assert!(log.flush(Offset(100)).is_err());
    drop(log);
    let log = Log::open_with(Arc::new(fs.clone()), dir, config).unwrap();
    assert!(
        log.log_end_offset() >= Offset(6),
        "acknowledged records survive"
    );
    fill(&log, 1, 2, 0);
}

#[test]
fn a_full_file_system_refuses_an_append_whole_and_the_log_goes_on_once_there_is_room() {
    let fs = FaultFs::new();
    let dir = std::path::Path::new("/log");
    let config = small_config(ReadMode::Pread);
    let log = Log::open_with(Arc::new(fs.clone()), dir, config.clone()).unwrap();
    fill(&log, 3, 2, 0);
    fs.set_faults(Faults {
        no_space: true,
        ..Faults::default()
    });
    // Appends fill what the segment has reserved, then one needs more room and is refused.
    let mut refused = None;
    for _ in 0..100 {
        let tag = log.log_end_offset().0;
        match log.append(&mut tagged_batch(tag, 2, 100, 0), 0) {
            Ok(_) => {}
            Err(err) => {
                refused = Some((err, tag));
                break;
            }
        }
    }
    let (err, end) = refused.expect("the file system never ran out");
    assert!(matches!(err, AppendError::NoSpace { .. }), "{err}");
    assert_eq!(log.log_end_offset(), Offset(end), "nothing of it written");
    // Not poisoned: reads and flushes go on, and appends succeed once there is room again.
    assert!(log.read(Offset(0), 100).is_ok());
    log.flush(Offset(end)).unwrap();
    fs.set_faults(Faults::default());
    fill(&log, 40, 2, 0);
    assert_eq!(log.log_end_offset(), Offset(end + 80));
    drop(log);
    let log = Log::open_with(Arc::new(fs.clone()), dir, config).unwrap();
    assert_eq!(log.log_end_offset(), Offset(end + 80));
    let mut next = 0;
    let mut offset = Offset(0);
    while offset < log.log_end_offset() {
        let read = log.read(offset, 1 << 20).unwrap();
        for batch in batch::Batches::new(read.bytes, u32::MAX) {
            let header = *batch.unwrap().header();
            assert_eq!(header.base_offset as u64, next, "offsets without a gap");
            next = header.last_offset() as u64 + 1;
        }
        offset = Offset(next);
    }
    assert_eq!(next, end + 80);
}

/// Real files whose data syncs take at least a millisecond, as on a disk rather than a page
/// cache that acknowledges `fdatasync` in microseconds (which leaves writers nothing to share).
#[derive(Debug)]
struct SlowSyncFs;

#[derive(Debug)]
struct SlowSyncFile(Arc<dyn cairn_storage::FsFile>);

impl cairn_storage::FsFile for SlowSyncFile {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, pos)
    }
    fn write_all_at(&self, buf: &[u8], pos: u64) -> std::io::Result<()> {
        self.0.write_all_at(buf, pos)
    }
    fn file_len(&self) -> std::io::Result<u64> {
        self.0.file_len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn allocate(&self, len: u64) -> std::io::Result<()> {
        self.0.allocate(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_millis(1));
        self.0.sync_data()
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.0.sync_all()
    }
    fn map(&self, len: u64) -> Option<std::io::Result<cairn_storage::MappedFile>> {
        self.0.map(len)
    }
}

impl cairn_storage::Fs for SlowSyncFs {
    fn create_dir_all(&self, path: &std::path::Path) -> std::io::Result<()> {
        cairn_storage::StdFs.create_dir_all(path)
    }
    fn list_dir(&self, path: &std::path::Path) -> std::io::Result<Vec<String>> {
        cairn_storage::StdFs.list_dir(path)
    }
    fn open(
        &self,
        path: &std::path::Path,
        mode: cairn_storage::OpenMode,
    ) -> std::io::Result<Arc<dyn cairn_storage::FsFile>> {
        let file = cairn_storage::StdFs.open(path, mode)?;
        Ok(Arc::new(SlowSyncFile(file)))
    }
    fn exists(&self, path: &std::path::Path) -> std::io::Result<bool> {
        cairn_storage::StdFs.exists(path)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        cairn_storage::StdFs.rename(from, to)
    }
    fn remove_dir_all(&self, path: &std::path::Path) -> std::io::Result<()> {
        cairn_storage::StdFs.remove_dir_all(path)
    }
    fn remove_file(&self, path: &std::path::Path) -> std::io::Result<()> {
        cairn_storage::StdFs.remove_file(path)
    }
    fn sync_dir(&self, path: &std::path::Path) -> std::io::Result<()> {
        cairn_storage::StdFs.sync_dir(path)
    }
    fn lock_dir(
        &self,
        path: &std::path::Path,
    ) -> std::io::Result<Box<dyn std::any::Any + Send + Sync>> {
        cairn_storage::StdFs.lock_dir(path)
    }
}

#[test]
fn concurrent_durable_appends_share_syncs() {
    // Group commit: while one append's fdatasync runs, others queue behind it and are covered by
    // the next single sync. With 4 writers this needs far fewer syncs than appends. (On this
    // machine's page cache an fdatasync can take microseconds, too short for writers to overlap
    // reliably: the syncs here take a millisecond, as a disk's do.)
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        flush: FlushPolicy::EveryAppend,
        ..LogConfig::default()
    };
    let log = Arc::new(Log::open_with(Arc::new(SlowSyncFs), dir.path(), config).unwrap());
    let (n_threads, n_appends) = (4u64, 100u64);
    let writers: Vec<_> = (0..n_threads)
        .map(|_| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for _ in 0..n_appends {
                    let info = log.append(&mut tagged_batch(0, 1, 100, 0), 0).unwrap();
                    // Durable on return: the flushed offset covers it.
                    assert!(log.flushed_offset() > info.last_offset);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let total = n_threads * n_appends;
    assert_eq!(log.log_end_offset(), Offset(total));
    let n_syncs = log.n_syncs();
    println!("group commit: {total} durable appends from {n_threads} threads took {n_syncs} syncs");
    assert!(
        n_syncs * 10 <= total * 9,
        "{n_syncs} syncs for {total} appends: no sharing"
    );
}

#[test]
fn limits_are_checked_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        LogConfig {
            segment_bytes: 1024,
            ..LogConfig::default()
        },
        LogConfig {
            segment_bytes: 2 << 30,
            ..LogConfig::default()
        },
        LogConfig {
            batch_bytes_max: 64 << 20,
            ..LogConfig::default()
        },
        LogConfig {
            index_interval_bytes: 0,
            ..LogConfig::default()
        },
        LogConfig {
            preallocate_bytes: 1 << 30,
            ..LogConfig::default()
        },
    ];
    for config in cases {
        let err = Log::open(dir.path(), config.clone()).unwrap_err();
        let OpenError::Config(limit) = &err else {
            panic!("{config:?}: {err}")
        };
        assert!(limit.to_string().contains("is outside"), "{limit}");
    }
}

/// A replica of a compacted log receives batches with offset gaps, possibly wider than a segment's
/// u32 relative offsets: the log starts a segment at such a batch (replacing an empty one) rather
/// than truncating its relative offset, and keeps the data across a reopen.
#[test]
fn replicated_batches_after_a_wide_gap_start_their_own_segment() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        compacted: true,
        ..small_config(ReadMode::Mmap)
    };
    let far = 5_000_000_000u64;
    let stamped = |base: u64| {
        let mut batch = tagged_batch(base, 3, 20, 0);
        batch::stamp(&mut batch, base as i64, 1).unwrap();
        batch
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    // Into the empty first segment: it is replaced by one at the batch.
    log.append_replicated(&stamped(far)).unwrap();
    assert_eq!(log.segment_bases(), vec![Offset(far)]);
    assert_eq!(log.log_start_offset(), Offset(far));
    // A second gap wider than u32 from a non-empty segment.
    log.append_replicated(&stamped(2 * far)).unwrap();
    assert_eq!(log.segment_bases(), vec![Offset(far), Offset(2 * far)]);
    log.verify().unwrap();
    let offsets: Vec<u64> = read_values(&log, log.log_start_offset())
        .iter()
        .map(|(o, _)| *o)
        .collect();
    assert_eq!(
        offsets,
        [far, far + 1, far + 2, 2 * far, 2 * far + 1, 2 * far + 2]
    );
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    log.verify().unwrap();
    assert_eq!(read_values(&log, log.log_start_offset()).len(), 6);
    assert_eq!(log.log_end_offset(), Offset(2 * far + 3));
}

#[test]
fn a_new_epoch_reaches_its_checkpoint_with_the_next_flush_or_from_the_batches_after_a_crash() {
    let fs = FaultFs::new();
    let dir = std::path::Path::new("/log");
    let config = small_config(ReadMode::Pread);
    let open = || Log::open_with(Arc::new(fs.clone()), dir, config.clone()).unwrap();
    let epochs = |log: &Log| -> Vec<(u32, u64)> {
        log.leader_epochs()
            .iter()
            .map(|e| (e.epoch, e.start_offset))
            .collect()
    };
    let log = open();
    fill_epoch(&log, 2, 1);
    log.flush_all().unwrap();
    // A new epoch is not written at the append (no fsync on the append path)...
    fill_epoch(&log, 2, 4);
    assert_eq!(epochs(&log), [(1, 0), (4, 8)]);
    // ...and a dead process's surviving batches bring it back at the next open.
    drop(log);
    fs.kill_process();
    let log = open();
    assert_eq!(epochs(&log), [(1, 0), (4, 8)]);
    // A flush makes it durable with the batches: it survives a power loss.
    fill_epoch(&log, 1, 6);
    log.flush_all().unwrap();
    drop(log);
    fs.crash(7);
    let log = open();
    assert_eq!(epochs(&log), [(1, 0), (4, 8), (6, 16)]);
    log.verify().unwrap();
}

#[test]
fn a_nonblocking_append_declines_rolls_and_syncs_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(ReadMode::Mmap)).unwrap();
    let mut n_declined = 0;
    for _ in 0..100 {
        let end = log.log_end_offset();
        let mut batch = tagged_batch(end.0, 5, 100, 0);
        match log.append_nonblocking(&mut batch, 0).unwrap() {
            Some(info) => assert_eq!(info.base_offset, end),
            None => {
                n_declined += 1;
                assert_eq!(log.log_end_offset(), end, "nothing written");
                let n_segments = log.n_segments();
                log.append(&mut batch, 0).unwrap();
                assert_eq!(log.n_segments(), n_segments + 1, "declined for a roll");
            }
        }
    }
    assert!(n_declined >= 3, "16 KiB segments roll: {n_declined}");
    log.verify().unwrap();
    assert_eq!(read_values(&log, Offset(0)).len(), 500);
    // A policy that syncs every append always declines.
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        flush: FlushPolicy::EveryAppend,
        ..small_config(ReadMode::Mmap)
    };
    let log = Log::open(dir.path(), config).unwrap();
    assert!(
        log.append_nonblocking(&mut tagged_batch(0, 1, 10, 0), 0)
            .unwrap()
            .is_none()
    );
    assert_eq!(log.log_end_offset(), Offset(0));
}
