//! Log compaction (Kafka `cleanup.policy=compact`): keep the latest record of every key, drop
//! tombstones (null values) once they are older than the tombstone retention, rewrite sealed
//! segments without the rest. The active segment is never touched.
//!
//! One pass:
//! 1. Snapshot the sealed segments (immutable: only their files are read, without the lock).
//! 2. Map every key to the offset of its latest record among them, and note per segment whether
//!    it holds any superseded record or expired tombstone ("dirty").
//! 3. Group consecutive segments (total input size at most `segment_bytes`, relative offsets
//!    within `u32`); a group with a dirty member is rewritten into one new segment at the group's
//!    base offset. A batch keeps its base offset and offset range (Kafka's cleaner does the same):
//!    whole batches are copied byte for byte, partly superseded ones re-encoded with the kept
//!    records at their original offsets, fully superseded ones dropped.
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
}

/// A sealed segment as it was when the pass started.
struct Input {
    base: u64,
    /// The base of the segment after it.
    end: u64,
    size: u32,
    file: Arc<dyn FsFile>,
    dirty: bool,
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

impl Log {
    /// One compaction pass over the sealed segments (see the module docs). `now_ms` judges
    /// tombstones against the config's `tombstone_retention`. Runs alongside appends and reads;
    /// passes run one at a time.
    pub fn compact(&self, now_ms: i64) -> Result<CompactionReport, Fatal> {
        let _one_pass = lock(&self.compaction_lock);
        let horizon = now_ms.saturating_sub(
            i64::try_from(self.config.tombstone_retention.as_millis()).unwrap_or(i64::MAX),
        );
        let mut inputs: Vec<Input> = {
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
                    dirty: false,
                })
                .collect()
        };
        let mut report = CompactionReport {
            n_segments_read: inputs.len(),
            ..CompactionReport::default()
        };
        if inputs.is_empty() {
            return Ok(report);
        }
        let read_error = |input: &Input, source: io::Error| Fatal::Io {
            op: "read segment for compaction",
            path: self
                .dir
                .join(segment::file_name(input.base, segment::LOG_SUFFIX)),
            source,
        };

        // Pass 1: the latest offset of every key; per segment, keyed records and tombstones.
        let mut latest: HashMap<Box<[u8]>, u64> = HashMap::new();
        let mut keyed = vec![0u64; inputs.len()];
        for (i, input) in inputs.iter_mut().enumerate() {
            let mut dirty = false;
            let result = for_each_batch(input, self.config.batch_bytes_max, |batch| {
                if !is_compactable(batch.header()) {
                    return Ok(());
                }
                for record in batch.records(DECOMPRESSED_BYTES_MAX).map_err(invalid)? {
                    let Some(key) = record.key else { continue };
                    if let Some(k) = keyed.get_mut(i) {
                        *k += 1;
                    }
                    if record.value.is_none() && record.timestamp < horizon {
                        dirty = true;
                    }
                    let offset = record.offset.max(0) as u64;
                    match latest.get_mut(&key[..]) {
                        Some(at) => *at = offset,
                        None => {
                            latest.insert(key.to_vec().into_boxed_slice(), offset);
                        }
                    }
                }
                Ok(())
            });
            result.map_err(|e| read_error(input, e))?;
            input.dirty = dirty;
        }
        // A segment holding fewer latest records than keyed records has superseded ones.
        let mut latest_in = vec![0u64; inputs.len()];
        for offset in latest.values() {
            let i = inputs.partition_point(|input| input.end <= *offset);
            if let Some(n) = latest_in.get_mut(i) {
                *n += 1;
            }
        }
        for ((input, n_keyed), n_latest) in inputs.iter_mut().zip(&keyed).zip(&latest_in) {
            input.dirty |= n_latest < n_keyed;
        }

        // Pass 2: rewrite each group with a dirty member.
        let segment_bytes = u64::from(self.config.segment_bytes);
        let mut start = 0;
        while start < inputs.len() {
            let base = inputs.get(start).map_or(0, |i| i.base);
            let mut stop = start + 1;
            let mut total = inputs.get(start).map_or(0, |i| u64::from(i.size));
            while let Some(next) = inputs.get(stop) {
                if total + u64::from(next.size) > segment_bytes
                    || next.end - base > u64::from(u32::MAX)
                {
                    break;
                }
                total += u64::from(next.size);
                stop += 1;
            }
            let group = inputs.get(start..stop).unwrap_or_default();
            start = stop;
            if !group.iter().any(|i| i.dirty) {
                continue;
            }
            self.rewrite_group(group, &latest, horizon, &mut report)?;
        }
        if report.n_segments_replaced > 0 {
            tracing::info!(
                dir = %self.dir.display(),
                replaced = report.n_segments_replaced,
                written = report.n_segments_written,
                bytes_before = report.n_bytes_before,
                bytes_after = report.n_bytes_after,
                superseded = report.n_records_superseded,
                tombstones = report.n_tombstones_dropped,
                "log compacted"
            );
        }
        Ok(report)
    }

    fn rewrite_group(
        &self,
        group: &[Input],
        latest: &HashMap<Box<[u8]>, u64>,
        horizon: i64,
        report: &mut CompactionReport,
    ) -> Result<(), Fatal> {
        let (Some(first), Some(last)) = (group.first(), group.last()) else {
            return Ok(());
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
                    let keep: Vec<&Record> = records
                        .iter()
                        .filter(|r| {
                            let Some(key) = &r.key else { return true };
                            if latest.get(&key[..]) != Some(&(r.offset.max(0) as u64)) {
                                superseded += 1;
                                return false;
                            }
                            if r.value.is_none() && r.timestamp < horizon {
                                tombstones += 1;
                                return false;
                            }
                            true
                        })
                        .collect();
                    if keep.len() == n {
                        Some(batch.bytes().clone())
                    } else if keep.is_empty() {
                        None
                    } else {
                        Some(rebuild(batch.header(), &keep).map_err(invalid)?)
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
            return Ok(());
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
        Ok(())
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
