//! Opening a log: finding its segments and bringing it to a state where every published byte is a
//! valid batch and every index agrees with the log.
//!
//! - After a clean shutdown (the marker file exists) segment lengths and index files are exact:
//!   only the active segment's tail after its last index entry is checked. The cost is
//!   O(segments) file opens, not O(data).
//! - After an unclean stop, every segment from the one holding the recovery point to the end is
//!   scanned batch by batch (length, magic, CRC-32C, offset order). The log is cut at the first
//!   invalid batch, later segments are deleted, indexes are rebuilt, and what remains is synced
//!   before it is served.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::time::Instant;

use crate::checkpoint;
use crate::config::LogConfig;
use crate::epoch::{EpochEntry, LeaderEpochCache};
use crate::error::OpenError;
use crate::fs::Fs;
use crate::log::{
    CLEAN_SHUTDOWN_FILE, LEADER_EPOCH_FILE, RECOVERY_POINT_FILE, RecoveryReport, State,
};
use crate::segment::{self, Segment};

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> OpenError {
    let path = path.to_path_buf();
    move |source| OpenError::Io { op, path, source }
}

pub(crate) fn recover(
    fs: &dyn Fs,
    dir: &Path,
    config: &LogConfig,
) -> Result<(State, RecoveryReport), OpenError> {
    let mut names = fs.list_dir(dir).map_err(io_err("list directory", dir))?;
    if finish_compactions(fs, dir, &names)? {
        names = fs.list_dir(dir).map_err(io_err("list directory", dir))?;
    }
    let mut bases = Vec::new();
    let mut index_files = Vec::new();
    let mut dir_changed = false;
    for name in &names {
        // Leftovers of an interrupted checkpoint write or copy-truncate: the rename never
        // happened, so the old file is intact and the temporary one is garbage.
        if name.ends_with(".tmp")
            || name.ends_with(".swap")
            || name.ends_with(crate::compact::CLEANED_SUFFIX)
        {
            let path = dir.join(name);
            fs.remove_file(&path)
                .map_err(io_err("remove leftover", &path))?;
            dir_changed = true;
        } else if let Some(base) = segment::parse_file_name(name, segment::LOG_SUFFIX) {
            bases.push(base);
        } else if let Some(base) = segment::parse_file_name(name, segment::INDEX_SUFFIX)
            .or_else(|| segment::parse_file_name(name, segment::TIME_INDEX_SUFFIX))
        {
            index_files.push((name, base));
        }
    }
    bases.sort_unstable();
    for (name, base) in index_files {
        if bases.binary_search(&base).is_err() {
            let path = dir.join(name);
            fs.remove_file(&path)
                .map_err(io_err("remove orphan index", &path))?;
            dir_changed = true;
        }
    }
    let clean = names.iter().any(|n| n == CLEAN_SHUTDOWN_FILE);
    if clean {
        let marker = dir.join(CLEAN_SHUTDOWN_FILE);
        fs.remove_file(&marker)
            .map_err(io_err("remove clean-shutdown marker", &marker))?;
        dir_changed = true;
    }
    if dir_changed {
        // A crash after we start appending must not find the old marker and trust sizes that are
        // no longer exact.
        fs.sync_dir(dir).map_err(io_err("sync directory", dir))?;
    }

    let recovery_point = read_recovery_point(fs, dir);
    let mut segments = BTreeMap::new();
    for &base in &bases {
        let segment = Segment::open_sealed(fs, dir, base).map_err(io_err(
            "open segment",
            &dir.join(segment::file_name(base, segment::LOG_SUFFIX)),
        ))?;
        segments.insert(base, segment);
    }
    if segments.is_empty() {
        let segment = Segment::create(fs, dir, 0, config).map_err(io_err(
            "create segment",
            &dir.join(segment::file_name(0, segment::LOG_SUFFIX)),
        ))?;
        fs.sync_dir(dir).map_err(io_err("sync directory", dir))?;
        segments.insert(0, segment);
    }

    let mut report = RecoveryReport {
        clean,
        ..RecoveryReport::default()
    };
    // After an unclean stop, the batches scanned may carry leader epochs the checkpoint never
    // saw: it is written by flushes, lazily (see `Log::flush`), not at every new epoch.
    let mut scanned_from = None;
    if clean {
        resume_clean(fs, dir, config, &mut segments, &mut report)?;
    } else {
        scanned_from = scan_unclean(fs, dir, config, &mut segments, recovery_point, &mut report)?;
        // After a process crash, names the dead process created (a rolled segment, say) may
        // still be only in the page cache; appends acknowledged after this open must not sit in
        // a file whose directory entry a power loss can take away.
        fs.sync_dir(dir).map_err(io_err("sync directory", dir))?;
    }

    // Sealed segments end where the next begins.
    let bases: Vec<u64> = segments.keys().copied().collect();
    for pair in bases.windows(2) {
        if let [base, next] = *pair
            && let Some(segment) = segments.get_mut(&base)
        {
            segment.next_offset = next;
        }
    }
    let log_start = segments.keys().next().copied().unwrap_or(0);
    let log_end = match segments.values_mut().next_back() {
        Some(last) => {
            last.reserve(0, config)
                .map_err(io_err("preallocate segment", &last.log_path(dir)))?;
            last.next_offset
        }
        None => 0,
    };

    let mut epochs = load_epochs(fs, dir, &segments);
    let trimmed_end = epochs.truncate_from_end(log_end);
    let trimmed_start = epochs.truncate_from_start(log_start);
    let extended = scanned_from.is_some_and(|from| {
        extend_epochs(
            &mut epochs,
            segments.range(from..).map(|(_, segment)| segment),
        )
    });
    if trimmed_end || trimmed_start || extended {
        checkpoint::write(
            fs,
            dir,
            LEADER_EPOCH_FILE,
            "leader-epochs",
            &epoch_lines(&epochs),
        )?;
    }
    // A fresh empty log needs no recovery point (without one, recovery scans from the start,
    // which holds nothing): creating 10,000 partitions costs no 20,000 fsyncs for it.
    let fresh = recovery_point.is_none() && log_end == 0;
    if recovery_point != Some(log_end) && !fresh {
        checkpoint::write(
            fs,
            dir,
            RECOVERY_POINT_FILE,
            "recovery-point",
            &[log_end.to_string()],
        )?;
    }
    let state = State {
        segments,
        log_start,
        log_end,
        flushed: log_end,
        epochs,
        poisoned: None,
        last_flush: Instant::now(),
        dir_unsynced: false,
        epochs_unsynced: false,
    };
    Ok((state, report))
}

/// Completes compactions that committed (a `<base>.log.swap-<end>` file) but did not finish:
/// every segment file with a base in `[base, end)` goes, and the swap file becomes `<base>.log`.
/// Returns whether anything changed.
fn finish_compactions(fs: &dyn Fs, dir: &Path, names: &[String]) -> Result<bool, OpenError> {
    let log_suffix = segment::LOG_SUFFIX;
    let mut changed = false;
    for name in names {
        let Some((log_name, end)) = name.split_once(crate::compact::SWAP_INFIX) else {
            continue;
        };
        let (Some(base), Ok(end)) = (
            segment::parse_file_name(log_name, log_suffix),
            end.parse::<u64>(),
        ) else {
            continue;
        };
        for other in names {
            let covered = [
                segment::LOG_SUFFIX,
                segment::INDEX_SUFFIX,
                segment::TIME_INDEX_SUFFIX,
            ]
            .iter()
            .find_map(|suffix| segment::parse_file_name(other, suffix))
            .is_some_and(|b| (base..end).contains(&b));
            if covered {
                let path = dir.join(other);
                fs.remove_file(&path)
                    .map_err(io_err("remove compacted segment", &path))?;
            }
        }
        let (from, to) = (dir.join(name), dir.join(log_name));
        fs.rename(&from, &to)
            .map_err(io_err("finish compacted segment", &to))?;
        tracing::warn!(segment = %to.display(), end, "finished an interrupted compaction");
        changed = true;
    }
    if changed {
        fs.sync_dir(dir).map_err(io_err("sync directory", dir))?;
    }
    Ok(changed)
}

fn read_recovery_point(fs: &dyn Fs, dir: &Path) -> Option<u64> {
    match checkpoint::read(fs, dir, RECOVERY_POINT_FILE, "recovery-point") {
        Ok(Some(lines)) => lines.first().and_then(|line| line.parse().ok()),
        Ok(None) => None,
        Err(err) => {
            tracing::warn!(dir = %dir.display(), error = %err, "unreadable recovery point; scanning the whole log");
            None
        }
    }
}

fn resume_clean(
    fs: &dyn Fs,
    dir: &Path,
    config: &LogConfig,
    segments: &mut BTreeMap<u64, Segment>,
    report: &mut RecoveryReport,
) -> Result<(), OpenError> {
    let Some(last) = segments.values_mut().next_back() else {
        return Ok(());
    };
    let path = last.log_path(dir);
    let scan = last
        .resume_active(fs, dir, config)
        .map_err(io_err("read segment", &path))?;
    if let Some(why) = &scan.invalid {
        tracing::warn!(segment = %path.display(), reason = %why, "cleanly closed segment has an invalid tail; truncating");
        report.n_bytes_truncated += u64::from(last.size).saturating_sub(scan.valid_end.into());
    }
    last.adopt_scan(scan)
        .map_err(io_err("truncate segment", &path))
}

fn scan_unclean(
    fs: &dyn Fs,
    dir: &Path,
    config: &LogConfig,
    segments: &mut BTreeMap<u64, Segment>,
    recovery_point: Option<u64>,
    report: &mut RecoveryReport,
) -> Result<Option<u64>, OpenError> {
    let Some(&last_base) = segments.keys().next_back() else {
        return Ok(None);
    };
    // Scan from the segment holding the last durable record (recovery point - 1): it may have
    // been sealed after the checkpoint, with its trim and indexes not yet synced. Every segment
    // before it was synced, indexes included, before the checkpoint passed it. The active
    // segment's length is never known after an unclean stop (it is preallocated), so it is always
    // scanned, whatever the recovery point says.
    let from = recovery_point
        .map_or(0, |r| r.saturating_sub(1))
        .min(last_base);
    let start = segments
        .range(..=from)
        .next_back()
        .or_else(|| segments.iter().next())
        .map_or(0, |(base, _)| *base);
    let to_scan: Vec<u64> = segments.range(start..).map(|(base, _)| *base).collect();
    let mut expected_next = start;
    for (idx, base) in to_scan.iter().enumerate() {
        let is_last = idx + 1 == to_scan.len();
        let Some(segment) = segments.get_mut(base) else {
            continue;
        };
        let path = segment.log_path(dir);
        // A segment overlapping the previous one cannot be trusted. Nor can one that starts past
        // the previous one's end in a log without gaps: the previous segment lost an unsynced
        // tail, so nothing after it was ever flushed (a flush syncs sealed segments first), and
        // the log must stay a prefix of what was appended.
        let hole = *base > expected_next && !config.compacted;
        if *base < expected_next || hole {
            tracing::warn!(segment = %path.display(), expected_next, "segment does not continue the log; deleting it and later ones");
            delete_from(fs, dir, segments, *base, report)?;
            break;
        }
        let file_len = segment
            .file
            .file_len()
            .map_err(io_err("stat segment", &path))?;
        let scan = segment
            .scan_all(config)
            .map_err(io_err("scan segment", &path))?;
        report.n_segments_scanned += 1;
        report.n_bytes_scanned += u64::from(scan.valid_end);
        let invalid = scan.invalid.clone();
        expected_next = scan.next_offset;
        segment
            .adopt_scan(scan)
            .map_err(io_err("truncate segment", &path))?;
        // The data survived a process crash in the page cache; make it durable before serving it.
        segment
            .file
            .sync_data()
            .map_err(io_err("sync segment", &path))?;
        if let Some(why) = invalid {
            report.n_bytes_truncated += file_len.saturating_sub(segment.size.into());
            tracing::warn!(segment = %path.display(), reason = %why, valid_bytes = segment.size, "invalid batch; log truncated here");
            let after = base.saturating_add(1);
            if !is_last {
                delete_from(fs, dir, segments, after, report)?;
            }
            break;
        }
        if !is_last {
            // Recovery is about to checkpoint past this segment: its trim and indexes must be
            // durable first.
            segment
                .seal(fs, dir)
                .and_then(|()| segment.sync_unsynced())
                .map_err(io_err("seal segment", &path))?;
        }
    }
    Ok(Some(start))
}

/// Deletes every segment with a base offset at or above `from`.
fn delete_from(
    fs: &dyn Fs,
    dir: &Path,
    segments: &mut BTreeMap<u64, Segment>,
    from: u64,
    report: &mut RecoveryReport,
) -> Result<(), OpenError> {
    let doomed: Vec<u64> = segments.range(from..).map(|(base, _)| *base).collect();
    for base in doomed {
        if let Some(segment) = segments.remove(&base) {
            report.n_segments_deleted += 1;
            report.n_bytes_truncated += u64::from(segment.size);
            let path = segment.log_path(dir);
            segment
                .remove_files(fs, dir)
                .map_err(io_err("delete segment", &path))?;
        }
    }
    fs.sync_dir(dir).map_err(io_err("sync directory", dir))
}

pub(crate) fn epoch_lines(epochs: &LeaderEpochCache) -> Vec<String> {
    epochs
        .entries()
        .iter()
        .map(|e| format!("{} {}", e.epoch, e.start_offset))
        .collect()
}

fn parse_epochs(lines: &[String]) -> Option<LeaderEpochCache> {
    let mut entries = Vec::with_capacity(lines.len());
    for line in lines {
        let (epoch, start) = line.split_once(' ')?;
        entries.push(EpochEntry {
            epoch: epoch.parse().ok()?,
            start_offset: start.parse().ok()?,
        });
    }
    let cache = LeaderEpochCache::from_entries(entries.iter().copied());
    (cache.entries() == entries.as_slice()).then_some(cache)
}

/// The leader-epoch cache from its checkpoint, or rebuilt from the batches' `partitionLeaderEpoch`
/// fields if the checkpoint is missing or damaged (it is derived data too).
fn load_epochs(fs: &dyn Fs, dir: &Path, segments: &BTreeMap<u64, Segment>) -> LeaderEpochCache {
    match checkpoint::read(fs, dir, LEADER_EPOCH_FILE, "leader-epochs") {
        Ok(Some(lines)) => {
            if let Some(cache) = parse_epochs(&lines) {
                return cache;
            }
            tracing::warn!(dir = %dir.display(), "malformed leader-epoch checkpoint; rebuilding it from the log");
        }
        Ok(None) => {}
        Err(err) => {
            tracing::warn!(dir = %dir.display(), error = %err, "unreadable leader-epoch checkpoint; rebuilding it from the log");
        }
    }
    let mut cache = LeaderEpochCache::default();
    extend_epochs(&mut cache, segments.values());
    cache
}

/// Adds to `cache` every epoch newer than its latest that the batches of `segments` (in offset
/// order) carry, at the first offset that carries it. Returns whether anything was added.
fn extend_epochs<'a>(
    cache: &mut LeaderEpochCache,
    segments: impl Iterator<Item = &'a Segment>,
) -> bool {
    let mut added = false;
    for segment in segments {
        let reader = segment.pread_reader();
        let mut pos = 0u32;
        while let Ok(Some(header)) = segment::read_header(&*reader, pos, segment.size) {
            if let (Ok(epoch), Ok(start)) = (
                u32::try_from(header.partition_leader_epoch),
                u64::try_from(header.base_offset),
            ) && cache.latest().is_none_or(|e| e.epoch < epoch)
            {
                added |= cache.assign(epoch, start);
            }
            pos += header.total_bytes() as u32;
        }
    }
    added
}
