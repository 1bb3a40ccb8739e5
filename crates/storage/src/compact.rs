//! Log compaction (Kafka `cleanup.policy=compact`): keep the latest record of every key, drop
//! tombstones (null values) once they are older than the tombstone retention, rewrite sealed
//! segments without the rest. The active segment is never touched.
//!
//! A log has a **checkpoint** (kept in memory, 0 after an open): below it the log holds at most
//! one record per key. The sealed bytes above it are the **dirty section**. One pass, if the dirty
//! section is at least `min_cleanable_dirty_ratio` of the sealed bytes:
//! 1. Snapshot the sealed segments (immutable: only their files are read, without the lock).
//! 2. Map the dirty section's keys, oldest first, to their latest offsets, in a map bounded by
//!    `compaction_key_map_bytes` (keys are kept as 128-bit hashes); if it fills, the mapped range
//!    ends at the first record that did not fit, and the next pass goes on from there. A key seen
//!    twice makes the segment of the older record dirty.
//! 3. Check the clean section against the map: a record superseded by a newer mapped record, or
//!    an expired tombstone, makes its segment dirty.
//! 4. Group consecutive segments (total input size at most `segment_bytes`, relative offsets
//!    within `u32`); a group with a dirty member is rewritten into one new segment at the group's
//!    base offset, without superseded records and expired tombstones (a tombstone goes only where
//!    it is the latest of its key, so every older record of the key goes in the same pass). A
//!    batch keeps its base offset and offset range (Kafka's cleaner does the same): whole batches
//!    are copied byte for byte, partly emptied ones re-encoded with the kept records at their
//!    original offsets, emptied ones dropped.
//! 5. If every dirty group was replaced, the checkpoint moves to the end of the mapped range.
//!
//! Crash safety (the replacement is all or nothing, and nothing a reader was handed changes):
//! - the group is written to `<base>.log.cleaned` and synced; a crash now leaves the old segments
//!   intact and a `.cleaned` file that recovery deletes;
//! - the commit point: `.cleaned` is renamed to `<base>.log.swap-<end>` (`end` is the base of the
//!   first segment after the group) and the directory is synced;
//! - the group's old files are deleted (open readers keep their inodes), the swap file is renamed
//!   to `<base>.log`, its index files are written and synced, and the directory is synced.
//!   Recovery completes an interrupted replacement: a `.swap-<end>` file replaces every segment
//!   with a base in `[base, end)`.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use cairn_protocol::batch::{self, Batch, BatchBuilder, BatchHeader, Record};
use cairn_protocol::limits::DECOMPRESSED_BYTES_MAX;

use crate::error::Fatal;
use crate::fs::{FsFile, OpenMode};
use crate::log::{Log, lock};
use crate::segment::{self, IndexBuilder, Segment};

/// The suffix of a compacted group being written (deleted by recovery).
pub(crate) const CLEANED_SUFFIX: &str = ".cleaned";
/// The infix of a committed replacement: `<base>.log.swap-<end>`.
pub(crate) const SWAP_INFIX: &str = ".swap-";

/// What one compaction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Sealed segments read.
    pub n_segments_read: usize,
    /// Segments replaced by rewritten ones.
    pub n_segments_replaced: usize,
    /// Rewritten segments written in their place.
    pub n_segments_written: usize,
    /// Bytes of the replaced segments.
    pub n_bytes_before: u64,
    /// Bytes of the segments written in their place.
    pub n_bytes_after: u64,
    /// Records dropped because a later record has the same key.
    pub n_records_superseded: u64,
    /// Tombstones dropped because they were older than the tombstone retention.
    pub n_tombstones_dropped: u64,
    /// Every key written since the last pass fit in the key map (else the next pass goes on
    /// from where this one stopped).
    pub complete: bool,
    /// Not run: the dirty section was below `min_cleanable_dirty_ratio` of the sealed bytes.
    pub skipped: bool,
    /// Stopped early (shutdown).
    pub aborted: bool,
}

/// A sealed segment as it was when the pass started.
struct Input {
    base: u64,
    /// The base of the segment after it.
    end: u64,
    size: u32,
    file: Arc<dyn FsFile>,
}

/// Calls `f` with every batch of a sealed segment file, in order.
fn for_each_batch(
    input: &Input,
    batch_bytes_max: u32,
    mut f: impl FnMut(Batch) -> io::Result<()>,
) -> io::Result<()> {
    let mut pos = 0u32;
    let mut header_buf = [0u8; batch::BATCH_HEADER_BYTES];
    while u64::from(pos) + batch::BATCH_HEADER_BYTES as u64 <= u64::from(input.size) {
        input.file.read_exact_at(&mut header_buf, pos.into())?;
        let header = BatchHeader::parse(&header_buf).map_err(invalid)?;
        let len = header.total_bytes();
        if u64::from(pos) + len as u64 > u64::from(input.size) {
            return Err(invalid(format!("batch at {pos} runs past the segment end")));
        }
        let mut bytes = vec![0u8; len];
        input.file.read_exact_at(&mut bytes, pos.into())?;
        f(Batch::parse(Bytes::from(bytes), batch_bytes_max.max(len as u32)).map_err(invalid)?)?;
        pos += len as u32;
    }
    Ok(())
}

fn invalid(err: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err.to_string())
}

/// Whether a batch is rewritten record by record (control and transactional batches are kept
/// whole: they carry no user keys).
fn is_compactable(header: &BatchHeader) -> bool {
    !header.is_control() && !header.is_transactional()
}

/// Bytes of memory one key-map entry is budgeted (a 16-byte key hash and an 8-byte offset in a
/// hash table that may be half empty after growing).
pub const KEY_MAP_ENTRY_BYTES: usize = 64;

/// A hasher for keys that are already uniformly random hashes.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// The latest offset of every key of the mapped section, by a 128-bit hash of the key (two
/// SipHash values under fresh random keys per pass: two keys collide with probability 2^-128,
/// and a collision cannot repeat across passes), holding at most `capacity` keys.
struct KeyMap {
    hashers: (RandomState, RandomState),
    offsets: HashMap<u128, u64, BuildHasherDefault<PreHashed>>,
    capacity: usize,
}

/// What inserting a key did.
enum Inserted {
    /// A new key.
    New,
    /// A known key; its previous offset.
    Seen(u64),
    /// The map is full and the key is new: nothing recorded.
    Full,
}

impl KeyMap {
    fn new(bytes: usize) -> KeyMap {
        KeyMap {
            hashers: (RandomState::new(), RandomState::new()),
            offsets: HashMap::default(),
            capacity: (bytes / KEY_MAP_ENTRY_BYTES).max(1),
        }
    }

    fn hash(&self, key: &[u8]) -> u128 {
        let (a, b) = (&self.hashers.0, &self.hashers.1);
        (u128::from(a.hash_one(key)) << 64) | u128::from(b.hash_one(key))
    }

    fn insert(&mut self, key: &[u8], offset: u64) -> Inserted {
        let h = self.hash(key);
        let full = self.offsets.len() >= self.capacity;
        match self.offsets.get_mut(&h) {
            Some(at) => {
                let previous = *at;
                *at = previous.max(offset);
                Inserted::Seen(previous)
            }
            None if full => Inserted::Full,
            None => {
                self.offsets.insert(h, offset);
                Inserted::New
            }
        }
    }

    fn get(&self, key: &[u8]) -> Option<u64> {
        self.offsets.get(&self.hash(key)).copied()
    }
}

/// What a rewrite needs to decide, record by record, what stays.
struct Keep<'a> {
    map: &'a KeyMap,
    /// Records at or after this offset were not mapped: they stay.
    mapped_end: u64,
    /// Tombstones older than this (by timestamp) may go.
    horizon: i64,
}

/// Why a record goes.
enum Drop {
    Superseded,
    Tombstone,
}

impl Keep<'_> {
    /// Whether a keyed record at `offset` goes. Superseded: a mapped record of its key is newer.
    /// An expired tombstone goes when it is the latest of its key among the mapped records, or
    /// lies in the clean section (below the checkpoint, at most one record per key: no older
    /// value can resurface); either way every older record of its key goes in the same pass.
    fn drop(&self, key: &[u8], offset: u64, tombstone: bool, timestamp: i64) -> Option<Drop> {
        if offset >= self.mapped_end {
            return None;
        }
        if self.map.get(key).is_some_and(|latest| latest > offset) {
            return Some(Drop::Superseded);
        }
        (tombstone && timestamp < self.horizon).then_some(Drop::Tombstone)
    }
}

impl Log {
    /// One compaction pass (see the module docs). `now_ms` judges tombstones against the
    /// config's `tombstone_retention`. Runs alongside appends and reads; passes run one at a
    /// time.
    pub fn compact(&self, now_ms: i64) -> Result<CompactionReport, Fatal> {
        self.compact_unless(now_ms, &|| false)
    }

    /// A compaction pass that stops early (between segments, leaving the log as it was or with
    /// some groups replaced, always consistent) once `stop` says so: at shutdown.
    pub fn compact_unless(
        &self,
        now_ms: i64,
        stop: &dyn Fn() -> bool,
    ) -> Result<CompactionReport, Fatal> {
        let mut checkpoint = lock(&self.compaction_lock);
        let horizon = now_ms.saturating_sub(
            i64::try_from(self.config.tombstone_retention.as_millis()).unwrap_or(i64::MAX),
        );
        let inputs: Vec<Input> = {
            let state = lock(&self.state);
            self.check_poisoned(&state)?;
            let bases: Vec<u64> = state.segments.keys().copied().collect();
            let n_sealed = state.segments.len().saturating_sub(1);
            state
                .segments
                .values()
                .take(n_sealed)
                .zip(bases.iter().skip(1))
                .map(|(s, end)| Input {
                    base: s.base_offset,
                    end: *end,
                    size: s.size,
                    file: Arc::clone(&s.file),
                })
                .collect()
        };
        let mut report = CompactionReport {
            n_segments_read: inputs.len(),
            ..CompactionReport::default()
        };
        let (Some(first), Some(last)) = (inputs.first(), inputs.last()) else {
            report.complete = true;
            return Ok(report);
        };
        let sealed_end = last.end;
        // Below `clean` the log holds at most one record per key (a pass mapped it).
        let clean = (*checkpoint).clamp(first.base, sealed_end);
        let total: u64 = inputs.iter().map(|i| u64::from(i.size)).sum();
        let dirty_bytes: u64 = inputs
            .iter()
            .filter(|i| i.end > clean)
            .map(|i| u64::from(i.size))
            .sum();
        if total == 0 || (dirty_bytes as f64) < self.config.min_cleanable_dirty_ratio * total as f64
        {
            report.skipped = true;
            return Ok(report);
        }
        let read_error = |input: &Input, source: io::Error| Fatal::Io {
            op: "read segment for compaction",
            path: self
                .dir
                .join(segment::file_name(input.base, segment::LOG_SUFFIX)),
            source,
        };
        let segment_of = |offset: u64| inputs.partition_point(|input| input.end <= offset);
        let mut dirty = vec![false; inputs.len()];

        // Pass 1: map the dirty section, oldest first, until the map is full. A key seen again
        // makes the segment of its older record dirty; an expired tombstone makes its own dirty
        // (whether or not its key was seen before).
        let mut map = KeyMap::new(self.config.compaction_key_map_bytes);
        let mut mapped_end = sealed_end;
        for (i, input) in inputs.iter().enumerate().filter(|(_, i)| i.end > clean) {
            if stop() {
                report.aborted = true;
                return Ok(report);
            }
            let result = for_each_batch(input, self.config.batch_bytes_max, |batch| {
                if mapped_end < sealed_end || !is_compactable(batch.header()) {
                    return Ok(());
                }
                for record in batch.records(DECOMPRESSED_BYTES_MAX).map_err(invalid)? {
                    let offset = record.offset.max(0) as u64;
                    let Some(key) = record.key.as_deref() else {
                        continue;
                    };
                    if offset < clean {
                        continue;
                    }
                    match map.insert(key, offset) {
                        Inserted::Full => {
                            mapped_end = offset;
                            return Ok(());
                        }
                        Inserted::Seen(previous) => {
                            if let Some(d) = dirty.get_mut(segment_of(previous.min(offset))) {
                                *d = true;
                            }
                        }
                        Inserted::New => {}
                    }
                    // An expired tombstone goes if it stays the latest of its key.
                    if record.value.is_none()
                        && record.timestamp < horizon
                        && let Some(d) = dirty.get_mut(i)
                    {
                        *d = true;
                    }
                }
                Ok(())
            });
            result.map_err(|e| read_error(input, e))?;
            if mapped_end < sealed_end {
                break;
            }
        }
        let keep = Keep {
            map: &map,
            mapped_end,
            horizon,
        };

        // Pass 2: the clean section against the map: records superseded by newer mapped ones,
        // and expired tombstones, make their segment dirty.
        for (i, input) in inputs.iter().enumerate().filter(|(_, i)| i.base < clean) {
            if dirty.get(i).copied().unwrap_or(true) {
                continue;
            }
            let mut found = false;
            let result = for_each_batch(input, self.config.batch_bytes_max, |batch| {
                if found || !is_compactable(batch.header()) {
                    return Ok(());
                }
                for record in batch.records(DECOMPRESSED_BYTES_MAX).map_err(invalid)? {
                    let offset = record.offset.max(0) as u64;
                    if let Some(key) = record.key.as_deref()
                        && offset < clean
                        && keep
                            .drop(key, offset, record.value.is_none(), record.timestamp)
                            .is_some()
                    {
                        found = true;
                        break;
                    }
                }
                Ok(())
            });
            result.map_err(|e| read_error(input, e))?;
            if let Some(d) = dirty.get_mut(i) {
                *d = found;
            }
        }

        // Pass 3: rewrite each group with a dirty member.
        let segment_bytes = u64::from(self.config.segment_bytes);
        let mut start = 0;
        let mut all_rewritten = true;
        while start < inputs.len() {
            let base = inputs.get(start).map_or(0, |i| i.base);
            let mut stop_at = start + 1;
            let mut group_bytes = inputs.get(start).map_or(0, |i| u64::from(i.size));
            while let Some(next) = inputs.get(stop_at) {
                if group_bytes + u64::from(next.size) > segment_bytes
                    || next.end - base > u64::from(u32::MAX)
                {
                    break;
                }
                group_bytes += u64::from(next.size);
                stop_at += 1;
            }
            let group = inputs.get(start..stop_at).unwrap_or_default();
            let group_dirty = dirty
                .get(start..stop_at)
                .unwrap_or_default()
                .iter()
                .any(|d| *d);
            start = stop_at;
            if !group_dirty {
                continue;
            }
            if stop() {
                report.aborted = true;
                return Ok(report);
            }
            all_rewritten &= self.rewrite_group(group, &keep, &mut report)?;
        }
        // The checkpoint moves only when every dirty group was replaced: below it, at most one
        // record per key.
        if all_rewritten {
            *checkpoint = mapped_end;
        }
        report.complete = mapped_end == sealed_end;
        if report.n_segments_replaced > 0 {
            tracing::info!(
                dir = %self.dir.display(),
                replaced = report.n_segments_replaced,
                written = report.n_segments_written,
                bytes_before = report.n_bytes_before,
                bytes_after = report.n_bytes_after,
                superseded = report.n_records_superseded,
                tombstones = report.n_tombstones_dropped,
                complete = report.complete,
                "log compacted"
            );
        }
        Ok(report)
    }

    /// Rewrites one group of consecutive sealed segments without the records `keep` drops;
    /// returns false if the group changed meanwhile (retention, truncation) and was left alone.
    fn rewrite_group(
        &self,
        group: &[Input],
        keep: &Keep<'_>,
        report: &mut CompactionReport,
    ) -> Result<bool, Fatal> {
        let (Some(first), Some(last)) = (group.first(), group.last()) else {
            return Ok(true);
        };
        let (base, end) = (first.base, last.end);
        let fs = &*self.fs;
        let log_name = segment::file_name(base, segment::LOG_SUFFIX);
        let cleaned = self.dir.join(format!("{log_name}{CLEANED_SUFFIX}"));
        let io = |op: &'static str, path: &PathBuf| {
            let path = path.clone();
            move |source| Fatal::Io { op, path, source }
        };
        let out = fs
            .open(&cleaned, OpenMode::Truncate)
            .map_err(io("create compacted segment", &cleaned))?;
        let mut pos = 0u64;
        let (mut superseded, mut tombstones) = (0u64, 0u64);
        for input in group {
            let result = for_each_batch(input, self.config.batch_bytes_max, |batch| {
                let kept = if is_compactable(batch.header()) {
                    let records = batch.records(DECOMPRESSED_BYTES_MAX).map_err(invalid)?;
                    let n = records.len();
                    let kept: Vec<&Record> = records
                        .iter()
                        .filter(|r| {
                            let Some(key) = &r.key else { return true };
                            let offset = r.offset.max(0) as u64;
                            match keep.drop(key, offset, r.value.is_none(), r.timestamp) {
                                Some(Drop::Superseded) => superseded += 1,
                                Some(Drop::Tombstone) => tombstones += 1,
                                None => return true,
                            }
                            false
                        })
                        .collect();
                    if kept.len() == n {
                        Some(batch.bytes().clone())
                    } else if kept.is_empty() {
                        None
                    } else {
                        Some(rebuild(batch.header(), &kept).map_err(invalid)?)
                    }
                } else {
                    Some(batch.bytes().clone())
                };
                if let Some(bytes) = kept {
                    out.write_all_at(&bytes, pos)?;
                    pos += bytes.len() as u64;
                }
                Ok(())
            });
            result.map_err(|source| Fatal::Io {
                op: "compact segment",
                path: self
                    .dir
                    .join(segment::file_name(input.base, segment::LOG_SUFFIX)),
                source,
            })?;
        }
        out.sync_all()
            .map_err(io("sync compacted segment", &cleaned))?;
        // Index the new segment before taking the lock (its file is complete and private).
        let scan = segment::scan(&*out, base, 0, base, IndexBuilder::default(), &self.config)
            .map_err(io("scan compacted segment", &cleaned))?;
        if let Some(why) = &scan.invalid {
            let _ = fs.remove_file(&cleaned);
            return Err(Fatal::Io {
                op: "check compacted segment",
                path: cleaned,
                source: invalid(why),
            });
        }

        let mut guard = lock(&self.state);
        let state = &mut *guard;
        self.check_poisoned(state)?;
        // Retention or truncation may have removed or replaced a member meanwhile: give up on
        // this group (the next pass starts from what is there then).
        let unchanged = group.iter().all(|input| {
            state
                .segments
                .get(&input.base)
                .is_some_and(|s| s.size == input.size && Arc::ptr_eq(&s.file, &input.file))
        }) && state.segments.range(base..end).count() == group.len();
        if !unchanged {
            drop(guard);
            fs.remove_file(&cleaned)
                .map_err(io("remove compacted segment", &cleaned))?;
            return Ok(false);
        }
        let swap = self.dir.join(format!(
            "{log_name}{SWAP_INFIX}{}",
            segment::file_name(end, "")
        ));
        let final_path = self.dir.join(&log_name);
        let steps = (|| -> Result<Segment, (&'static str, PathBuf, io::Error)> {
            fs.rename(&cleaned, &swap)
                .map_err(|e| ("commit compacted segment", swap.clone(), e))?;
            fs.sync_dir(&self.dir)
                .map_err(|e| ("sync directory", self.dir.clone(), e))?;
            // Committed: from here recovery finishes the replacement if we crash.
            for input in group {
                if let Some(old) = state.segments.remove(&input.base) {
                    old.remove_files(fs, &self.dir)
                        .map_err(|e| ("delete compacted segment", old.log_path(&self.dir), e))?;
                }
            }
            fs.rename(&swap, &final_path)
                .map_err(|e| ("rename compacted segment", final_path.clone(), e))?;
            let mut segment = Segment::open_sealed(fs, &self.dir, base)
                .map_err(|e| ("open compacted segment", final_path.clone(), e))?;
            segment
                .adopt_scan(scan)
                .map_err(|e| ("adopt compacted segment", final_path.clone(), e))?;
            segment
                .seal(fs, &self.dir)
                .map_err(|e| ("index compacted segment", final_path.clone(), e))?;
            segment
                .sync_unsynced()
                .map_err(|e| ("sync compacted segment", final_path.clone(), e))?;
            segment.next_offset = end;
            fs.sync_dir(&self.dir)
                .map_err(|e| ("sync directory", self.dir.clone(), e))?;
            Ok(segment)
        })();
        let segment = steps.map_err(|(op, path, source)| self.poison(state, op, path, source))?;
        report.n_segments_replaced += group.len();
        report.n_segments_written += 1;
        report.n_bytes_before += group.iter().map(|i| u64::from(i.size)).sum::<u64>();
        report.n_bytes_after += u64::from(segment.size);
        report.n_records_superseded += superseded;
        report.n_tombstones_dropped += tombstones;
        state.segments.insert(base, segment);
        Ok(true)
    }
}

/// A batch holding only `keep` (a non-empty subset of its records, in order), with the original
/// base offset, offset range, codec, producer fields and leader epoch.
fn rebuild(header: &BatchHeader, keep: &[&Record]) -> Result<Bytes, batch::BatchError> {
    let mut builder = BatchBuilder::new(header.compression()?)
        .producer(
            header.producer_id,
            header.producer_epoch,
            header.base_sequence,
        )
        .partition_leader_epoch(header.partition_leader_epoch)
        .cover_offset_delta(header.last_offset_delta);
    for record in keep {
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_deref()))
            .collect();
        let delta = record.offset.wrapping_sub(header.base_offset);
        builder.push_at(
            i32::try_from(delta).unwrap_or(i32::MAX),
            record.timestamp,
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
        );
    }
    let mut bytes = builder.build()?.to_vec();
    batch::stamp(
        &mut bytes,
        header.base_offset,
        header.partition_leader_epoch,
    )?;
    Ok(Bytes::from(bytes))
}
