//! One segment of a partition log: a `.log` file of record batches plus its sparse `.index` and
//! `.timeindex`, all named by the segment's base offset (20 digits).
//!
//! A segment is *active* (the last one: appended to, preallocated past its data, indexes in
//! memory) or *sealed* (immutable, trimmed to its exact length, indexes in files that are loaded
//! lazily through memory maps).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cairn_protocol::batch::{self, BATCH_HEADER_BYTES, BATCH_LENGTH_OVERHEAD, BatchHeader};
use cairn_protocol::limits::BATCH_BYTES_MAX;

use crate::config::{LogConfig, ReadMode};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::index;
use crate::mmap::MappedFile;

/// The first allocation of an active segment (a page): allocations then double up to the
/// configured step.
pub(crate) const PREALLOCATE_MIN: u64 = 4096;

/// Digits in a segment file name.
const NAME_DIGITS: usize = 20;
/// Bytes read at a time when scanning a segment.
const SCAN_CHUNK_BYTES: usize = 4 * 1024 * 1024;

pub(crate) const LOG_SUFFIX: &str = ".log";
pub(crate) const INDEX_SUFFIX: &str = index::INDEX;
pub(crate) const TIME_INDEX_SUFFIX: &str = index::TIME_INDEX;

/// `00000000000000001234.log` and friends.
pub(crate) fn file_name(base_offset: u64, suffix: &str) -> String {
    format!("{base_offset:0NAME_DIGITS$}{suffix}")
}

/// The base offset named by a segment file name with `suffix`, if it is one.
pub(crate) fn parse_file_name(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Reads published bytes of a segment: zero-copy from a map, or copied with `pread`.
pub(crate) trait SegmentReader: Send + Sync + fmt::Debug {
    /// `len` bytes at `pos`. The caller asks only for published bytes.
    fn read(&self, pos: u32, len: u32) -> io::Result<Bytes>;
    /// Fills `buf` from `pos`.
    fn read_into(&self, pos: u32, buf: &mut [u8]) -> io::Result<()>;
}

#[derive(Debug)]
struct MmapReader(MappedFile);

fn out_of_map() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "read past the mapped range")
}

impl SegmentReader for MmapReader {
    fn read(&self, pos: u32, len: u32) -> io::Result<Bytes> {
        let start = pos as usize;
        self.0
            .bytes(start, start + len as usize)
            .ok_or_else(out_of_map)
    }

    fn read_into(&self, pos: u32, buf: &mut [u8]) -> io::Result<()> {
        let start = pos as usize;
        let src = self
            .0
            .slice(start, start + buf.len())
            .ok_or_else(out_of_map)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[derive(Debug)]
struct PreadReader(Arc<dyn FsFile>);

impl SegmentReader for PreadReader {
    fn read(&self, pos: u32, len: u32) -> io::Result<Bytes> {
        let mut buf = vec![0u8; len as usize];
        self.0.read_exact_at(&mut buf, pos.into())?;
        Ok(Bytes::from(buf))
    }

    fn read_into(&self, pos: u32, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(buf, pos.into())
    }
}

/// Builds the sparse indexes as batches are appended or scanned.
#[derive(Debug, Clone)]
pub(crate) struct IndexBuilder {
    pub(crate) offsets: Vec<u8>,
    pub(crate) times: Vec<u8>,
    bytes_since_entry: u32,
    /// Largest batch `maxTimestamp` in the segment so far.
    pub(crate) max_timestamp: i64,
    last_time_entry: i64,
    last_relative_offset: Option<u32>,
}

impl Default for IndexBuilder {
    fn default() -> Self {
        IndexBuilder {
            offsets: Vec::new(),
            times: Vec::new(),
            bytes_since_entry: 0,
            max_timestamp: i64::MIN,
            last_time_entry: i64::MIN,
            last_relative_offset: None,
        }
    }
}

impl IndexBuilder {
    /// Continues indexes loaded from files (of a cleanly closed active segment).
    fn resume(offsets: Vec<u8>, times: Vec<u8>) -> IndexBuilder {
        let last_time = index::last_time_entry(&times);
        IndexBuilder {
            offsets,
            times,
            bytes_since_entry: 0,
            max_timestamp: last_time.map_or(i64::MIN, |(ts, _)| ts),
            last_time_entry: last_time.map_or(i64::MIN, |(ts, _)| ts),
            last_relative_offset: last_time.map(|(_, rel)| rel),
        }
    }

    fn on_batch(&mut self, rel_base: u32, rel_last: u32, pos: u32, n_bytes: u32, interval: u32) {
        let indexed = self.bytes_since_entry >= interval;
        if indexed {
            index::push_offset_entry(&mut self.offsets, rel_base, pos);
            self.bytes_since_entry = 0;
        }
        self.bytes_since_entry = self.bytes_since_entry.saturating_add(n_bytes);
        self.last_relative_offset = Some(rel_last);
        if indexed && self.max_timestamp > self.last_time_entry {
            index::push_time_entry(&mut self.times, self.max_timestamp, rel_last);
            self.last_time_entry = self.max_timestamp;
        }
    }

    fn on_timestamp(&mut self, max_timestamp: i64) {
        self.max_timestamp = self.max_timestamp.max(max_timestamp);
    }

    /// Adds the final time entry so the time index's last entry is the segment's newest timestamp.
    fn finish(&mut self) {
        if let Some(rel) = self.last_relative_offset
            && self.max_timestamp > self.last_time_entry
        {
            index::push_time_entry(&mut self.times, self.max_timestamp, rel);
            self.last_time_entry = self.max_timestamp;
        }
    }
}

/// What scanning a segment found.
#[derive(Debug)]
pub(crate) struct Scan {
    /// End of the last valid batch.
    pub(crate) valid_end: u32,
    /// Offset after the last valid batch.
    pub(crate) next_offset: u64,
    /// Why the scan stopped before the end of the file, if it did for a reason other than
    /// reaching zeros (the preallocated tail) or the end.
    pub(crate) invalid: Option<String>,
    pub(crate) first_batch_timestamp: Option<i64>,
    pub(crate) indexes: IndexBuilder,
    pub(crate) n_batches: u64,
}

/// Validates batches from `from_pos` to `file_len`: length bounds, magic, CRC-32C, offsets
/// increasing from `next_offset` and representable relative to `base_offset`. Stops at the first
/// invalid batch, or at a zero batch length (the preallocated tail). Reads with `pread`, never a
/// map: a torn tail must be trimmed before the file is mapped (mmap contract rule 3).
pub(crate) fn scan(
    file: &dyn FsFile,
    base_offset: u64,
    from_pos: u32,
    next_offset: u64,
    indexes: IndexBuilder,
    config: &LogConfig,
) -> io::Result<Scan> {
    let interval = config.index_interval_bytes;
    let file_len = file.file_len()?;
    let mut out = Scan {
        valid_end: from_pos,
        next_offset,
        invalid: None,
        first_batch_timestamp: None,
        indexes,
        n_batches: 0,
    };
    let mut window = Window::default();
    let mut pos = u64::from(from_pos);
    loop {
        if pos + BATCH_LENGTH_OVERHEAD as u64 > file_len {
            if pos < file_len && !window.is_zero(file, pos, file_len)? {
                out.invalid = Some(format!("{} trailing bytes", file_len - pos));
            }
            break;
        }
        let prefix = window.get(file, pos, BATCH_LENGTH_OVERHEAD, file_len)?;
        let Some((raw_offset, batch_length)) = batch::peek_offset_and_length(prefix) else {
            break;
        };
        if raw_offset == 0 && batch_length == 0 {
            if !window.is_zero(file, pos, file_len)? {
                out.invalid = Some("non-zero bytes after an end-of-log marker".into());
            }
            break;
        }
        let n_bytes = BATCH_LENGTH_OVERHEAD as u64 + batch_length.max(0) as u64;
        if batch_length < batch::BATCH_LENGTH_MIN as i32 || n_bytes > u64::from(BATCH_BYTES_MAX) {
            out.invalid = Some(format!("batch length {batch_length} at position {pos}"));
            break;
        }
        if pos + n_bytes > file_len {
            out.invalid = Some(format!(
                "batch at position {pos} runs past the end of the file"
            ));
            break;
        }
        let bytes = window.get(file, pos, n_bytes as usize, file_len)?;
        let header = match batch::validate(bytes, BATCH_BYTES_MAX) {
            Ok(header) => header,
            Err(err) => {
                out.invalid = Some(format!("batch at position {pos}: {err}"));
                break;
            }
        };
        let Some((rel_base, rel_last)) =
            relative_offsets(&header, base_offset, out.next_offset, config.compacted)
        else {
            out.invalid = Some(format!(
                "batch at position {pos} has offsets {}..={} after {}",
                header.base_offset,
                header.last_offset(),
                out.next_offset
            ));
            break;
        };
        out.indexes.on_timestamp(header.max_timestamp);
        out.indexes
            .on_batch(rel_base, rel_last, pos as u32, n_bytes as u32, interval);
        out.first_batch_timestamp
            .get_or_insert(header.max_timestamp);
        out.next_offset = header.last_offset() as u64 + 1;
        out.n_batches += 1;
        pos += n_bytes;
        out.valid_end = pos as u32;
    }
    Ok(out)
}

/// The batch's offsets relative to the segment base, if they continue the log from `next_offset`
/// (exactly, unless gaps are allowed) and fit the index's `u32`.
fn relative_offsets(
    header: &BatchHeader,
    base_offset: u64,
    next_offset: u64,
    gaps_allowed: bool,
) -> Option<(u32, u32)> {
    let first = u64::try_from(header.base_offset).ok()?;
    let last = u64::try_from(header.last_offset()).ok()?;
    if first < next_offset || first < base_offset || last < first {
        return None;
    }
    if !gaps_allowed && first != next_offset {
        return None;
    }
    Some((
        u32::try_from(first - base_offset).ok()?,
        u32::try_from(last - base_offset).ok()?,
    ))
}

/// A buffered window over a file for scanning.
#[derive(Default)]
struct Window {
    buf: Vec<u8>,
    start: u64,
}

impl Window {
    fn get<'a>(
        &'a mut self,
        file: &dyn FsFile,
        pos: u64,
        n: usize,
        file_len: u64,
    ) -> io::Result<&'a [u8]> {
        let end = self.start + self.buf.len() as u64;
        if pos < self.start || pos + n as u64 > end {
            let want = n.max(SCAN_CHUNK_BYTES) as u64;
            let len = want.min(file_len - pos) as usize;
            self.buf.resize(len, 0);
            file.read_exact_at(&mut self.buf, pos)?;
            self.start = pos;
        }
        let at = (pos - self.start) as usize;
        self.buf
            .get(at..at + n)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "scan window"))
    }

    /// Whether every byte from `pos` to the end of the file is zero.
    fn is_zero(&mut self, file: &dyn FsFile, mut pos: u64, file_len: u64) -> io::Result<bool> {
        while pos < file_len {
            let n = (file_len - pos).min(SCAN_CHUNK_BYTES as u64) as usize;
            if self.get(file, pos, n, file_len)?.iter().any(|&b| b != 0) {
                return Ok(false);
            }
            pos += n as u64;
        }
        Ok(true)
    }
}

#[derive(Debug)]
enum Indexes {
    /// A sealed segment's index files have not been read yet.
    Unloaded,
    /// A sealed segment's indexes.
    Sealed { offsets: Bytes, times: Bytes },
    /// The active segment's indexes, growing with each append.
    Active(IndexBuilder),
}

/// One segment.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base_offset: u64,
    pub(crate) file: Arc<dyn FsFile>,
    /// The published end: bytes below it are valid batches and never change.
    pub(crate) size: u32,
    /// Bytes the file holds, preallocated tail included.
    pub(crate) allocated: u64,
    /// The offset after the segment's last record (exact for the active segment; for a sealed
    /// one, the next segment's base offset).
    pub(crate) next_offset: u64,
    /// `maxTimestamp` of the first batch, for time-based rolls.
    pub(crate) first_batch_timestamp: Option<i64>,
    reader: Option<Arc<dyn SegmentReader>>,
    indexes: Indexes,
    /// Files of this segment written since they were last synced (a sealed segment's trimmed log
    /// and its index files): the next flush syncs them before the recovery point passes them.
    pub(crate) unsynced: Vec<Arc<dyn FsFile>>,
}

impl Segment {
    /// Creates an empty active segment. The caller syncs the directory.
    pub(crate) fn create(
        fs: &dyn Fs,
        dir: &Path,
        base_offset: u64,
        config: &LogConfig,
    ) -> io::Result<Segment> {
        let path = dir.join(file_name(base_offset, LOG_SUFFIX));
        let file = fs.open(&path, OpenMode::Truncate)?;
        let mut segment = Segment {
            base_offset,
            file,
            size: 0,
            allocated: 0,
            next_offset: base_offset,
            first_batch_timestamp: None,
            reader: None,
            indexes: Indexes::Active(IndexBuilder::default()),
            unsynced: Vec::new(),
        };
        segment.reserve(0, config)?;
        Ok(segment)
    }

    /// Opens an existing segment file as sealed, trusting its length. Indexes load lazily.
    pub(crate) fn open_sealed(fs: &dyn Fs, dir: &Path, base_offset: u64) -> io::Result<Segment> {
        let path = dir.join(file_name(base_offset, LOG_SUFFIX));
        let file = fs.open(&path, OpenMode::Existing)?;
        let len = file.file_len()?;
        let size = u32::try_from(len).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("segment of {len} bytes"),
            )
        })?;
        Ok(Segment {
            base_offset,
            file,
            size,
            allocated: len,
            next_offset: base_offset,
            first_batch_timestamp: None,
            reader: None,
            indexes: Indexes::Unloaded,
            unsynced: Vec::new(),
        })
    }

    pub(crate) fn log_path(&self, dir: &Path) -> PathBuf {
        dir.join(file_name(self.base_offset, LOG_SUFFIX))
    }

    /// Ensures the file has room for `n_bytes` more. The allocation doubles, from
    /// [`PREALLOCATE_MIN`] up to steps of `preallocate_bytes`: an idle partition's segment takes a
    /// few KiB of disk (10,000 empty partitions take 40 MiB, not 160 GB), a busy one grows by
    /// the full step with few `fallocate` calls.
    pub(crate) fn reserve(&mut self, n_bytes: u32, config: &LogConfig) -> io::Result<()> {
        let needed = u64::from(self.size) + u64::from(n_bytes);
        if needed <= self.allocated && self.allocated > 0 {
            return Ok(());
        }
        let step_max = u64::from(config.preallocate_bytes.min(config.segment_bytes)).max(1);
        let step = self
            .allocated
            .clamp(PREALLOCATE_MIN.min(step_max), step_max);
        let target = needed.div_ceil(step).max(1) * step;
        self.file.allocate(target)?;
        self.allocated = target;
        // A map covers only what was allocated when it was made; the next read maps afresh.
        self.reader = None;
        Ok(())
    }

    /// Writes a validated, stamped batch at the published end, then publishes it.
    pub(crate) fn append(
        &mut self,
        batch: &[u8],
        header: &BatchHeader,
        config: &LogConfig,
    ) -> io::Result<()> {
        let n_bytes = batch.len() as u32;
        self.reserve(n_bytes, config)?;
        let pos = self.size;
        self.file.write_all_at(batch, pos.into())?;
        let rel_base = (header.base_offset as u64 - self.base_offset) as u32;
        let rel_last = (header.last_offset() as u64 - self.base_offset) as u32;
        if let Indexes::Active(builder) = &mut self.indexes {
            builder.on_timestamp(header.max_timestamp);
            builder.on_batch(
                rel_base,
                rel_last,
                pos,
                n_bytes,
                config.index_interval_bytes,
            );
        }
        self.first_batch_timestamp
            .get_or_insert(header.max_timestamp);
        self.next_offset = header.last_offset() as u64 + 1;
        // INVARIANT: publishing is the last step; readers never see bytes of a failed write.
        self.size = pos + n_bytes;
        Ok(())
    }

    /// Adopts what a scan of this segment found, making it the active segment, and trims the
    /// file to the valid end if the scan stopped early. Nothing is mapped yet when this runs.
    pub(crate) fn adopt_scan(&mut self, scan: Scan) -> io::Result<()> {
        if scan.invalid.is_some() {
            self.file.set_len(scan.valid_end.into())?;
            self.allocated = scan.valid_end.into();
        }
        self.size = scan.valid_end;
        self.next_offset = scan.next_offset;
        self.first_batch_timestamp = scan.first_batch_timestamp;
        self.indexes = Indexes::Active(scan.indexes);
        self.reader = None;
        Ok(())
    }

    /// Continues a cleanly closed active segment from its index files, checking the tail after the
    /// last index entry. Falls back to a full scan if the index files are unusable.
    pub(crate) fn resume_active(
        &mut self,
        fs: &dyn Fs,
        dir: &Path,
        config: &LogConfig,
    ) -> io::Result<Scan> {
        let (offsets, times) = read_index_files(fs, dir, self.base_offset)?;
        let usable = index::offset_index_is_sane(&offsets, self.size.max(1))
            && index::time_index_is_sane(&times);
        let (from_pos, next_offset, builder) = match index::last_offset_entry(&offsets) {
            Some((rel, pos)) if usable => (
                pos,
                self.base_offset + u64::from(rel),
                IndexBuilder::resume(offsets, times),
            ),
            _ => (0, self.base_offset, IndexBuilder::default()),
        };
        scan(
            &*self.file,
            self.base_offset,
            from_pos,
            next_offset,
            builder,
            config,
        )
    }

    /// Seals the active segment: file trimmed to its data, index files written. Afterwards the
    /// segment never changes. Nothing is synced here (a roll must not stall appends behind an
    /// fsync of a whole segment): the files wait in `unsynced` for the next flush.
    pub(crate) fn seal(&mut self, fs: &dyn Fs, dir: &Path) -> io::Result<()> {
        self.trim_and_write_indexes(fs, dir)?;
        let Indexes::Active(builder) = std::mem::replace(&mut self.indexes, Indexes::Unloaded)
        else {
            return Ok(());
        };
        self.indexes = Indexes::Sealed {
            offsets: Bytes::from(builder.offsets),
            times: Bytes::from(builder.times),
        };
        Ok(())
    }

    /// Trims the preallocated tail and writes the index files, so that an open after this needs no
    /// scan; the touched files are queued in `unsynced`. Used by sealing and by clean shutdown.
    pub(crate) fn trim_and_write_indexes(&mut self, fs: &dyn Fs, dir: &Path) -> io::Result<()> {
        if self.allocated != u64::from(self.size) {
            // Only bytes past the published end go: no reader holds them (mmap contract rule 3).
            self.file.set_len(self.size.into())?;
            self.allocated = self.size.into();
        }
        // The new length is metadata: the flush syncs this file with fsync, not fdatasync.
        self.unsynced.push(Arc::clone(&self.file));
        if let Indexes::Active(builder) = &mut self.indexes {
            builder.finish();
            let offsets =
                write_index_file(fs, dir, self.base_offset, index::INDEX, &builder.offsets)?;
            let times =
                write_index_file(fs, dir, self.base_offset, index::TIME_INDEX, &builder.times)?;
            self.unsynced.extend([offsets, times]);
        }
        Ok(())
    }

    /// Syncs the files queued in `unsynced` (data and metadata).
    pub(crate) fn sync_unsynced(&mut self) -> io::Result<()> {
        for file in std::mem::take(&mut self.unsynced) {
            file.sync_all()?;
        }
        Ok(())
    }

    /// Validates the whole segment from its first byte, rebuilding its indexes.
    pub(crate) fn scan_all(&self, config: &LogConfig) -> io::Result<Scan> {
        scan(
            &*self.file,
            self.base_offset,
            0,
            self.base_offset,
            IndexBuilder::default(),
            config,
        )
    }

    /// Makes this (formerly sealed) segment the active one again, e.g. after truncation.
    pub(crate) fn reactivate(
        &mut self,
        fs: &dyn Fs,
        dir: &Path,
        config: &LogConfig,
    ) -> io::Result<()> {
        let scan = self.scan_all(config)?;
        self.adopt_scan(scan)?;
        // Stale index files would describe the old contents if we crashed before sealing again.
        remove_index_files(fs, dir, self.base_offset)?;
        self.unsynced.clear();
        self.reserve(0, config)
    }

    /// Whether the indexes are in memory (reading will not open or rebuild index files).
    pub(crate) fn indexes_loaded(&self) -> bool {
        !matches!(self.indexes, Indexes::Unloaded)
    }

    /// The indexes, loading a sealed segment's files on first use (rebuilding them from the log if
    /// they are missing or implausible).
    fn indexes(
        &mut self,
        fs: &dyn Fs,
        dir: &Path,
        config: &LogConfig,
    ) -> io::Result<(&[u8], &[u8])> {
        if matches!(self.indexes, Indexes::Unloaded) {
            self.indexes = self.load_sealed_indexes(fs, dir, config)?;
        }
        Ok(match &self.indexes {
            Indexes::Sealed { offsets, times } => (offsets, times),
            Indexes::Active(builder) => (&builder.offsets, &builder.times),
            Indexes::Unloaded => (&[], &[]),
        })
    }

    fn load_sealed_indexes(
        &self,
        fs: &dyn Fs,
        dir: &Path,
        config: &LogConfig,
    ) -> io::Result<Indexes> {
        let offsets = map_index_file(fs, dir, self.base_offset, index::INDEX);
        let times = map_index_file(fs, dir, self.base_offset, index::TIME_INDEX);
        if let (Ok(offsets), Ok(times)) = (offsets, times)
            && index::offset_index_is_sane(&offsets, self.size.max(1))
            && index::time_index_is_sane(&times)
            && (self.size == 0 || !times.is_empty())
        {
            return Ok(Indexes::Sealed { offsets, times });
        }
        tracing::warn!(
            segment = %self.log_path(dir).display(),
            "index files missing or implausible; rebuilding them from the log"
        );
        let mut scan = self.scan_all(config)?;
        scan.indexes.finish();
        // Best effort: the rebuilt indexes serve from memory even if they cannot be saved.
        let base = self.base_offset;
        let rewrite = |suffix, bytes: &[u8]| {
            write_index_file(fs, dir, base, suffix, bytes).and_then(|file| file.sync_all())
        };
        if let Err(err) = rewrite(index::INDEX, &scan.indexes.offsets)
            .and_then(|()| rewrite(index::TIME_INDEX, &scan.indexes.times))
        {
            tracing::warn!(error = %err, "could not rewrite rebuilt index files");
        }
        Ok(Indexes::Sealed {
            offsets: Bytes::from(scan.indexes.offsets),
            times: Bytes::from(scan.indexes.times),
        })
    }

    /// Position to start scanning from for `offset`.
    pub(crate) fn position_for(
        &mut self,
        fs: &dyn Fs,
        dir: &Path,
        config: &LogConfig,
        offset: u64,
    ) -> io::Result<u32> {
        let rel = u32::try_from(offset.saturating_sub(self.base_offset)).unwrap_or(u32::MAX);
        let (offsets, _) = self.indexes(fs, dir, config)?;
        Ok(index::lookup_position(offsets, rel))
    }

    /// The newest timestamp in the segment (`i64::MIN` if it has none).
    pub(crate) fn max_timestamp(
        &mut self,
        fs: &dyn Fs,
        dir: &Path,
        config: &LogConfig,
    ) -> io::Result<i64> {
        if let Indexes::Active(builder) = &self.indexes {
            return Ok(builder.max_timestamp);
        }
        let (_, times) = self.indexes(fs, dir, config)?;
        Ok(index::last_time_entry(times).map_or(i64::MIN, |(ts, _)| ts))
    }

    /// The offset after which to search for `timestamp`: every record at or below the returned
    /// offset is older than `timestamp`.
    pub(crate) fn offset_before_timestamp(
        &mut self,
        fs: &dyn Fs,
        dir: &Path,
        config: &LogConfig,
        timestamp: i64,
    ) -> io::Result<Option<u64>> {
        let base = self.base_offset;
        let (_, times) = self.indexes(fs, dir, config)?;
        Ok(index::lookup_time(times, timestamp).map(|rel| base + u64::from(rel)))
    }

    /// A reader of the published bytes.
    /// A positional-read reader that is not cached: for internal walks (epoch rebuild, truncation,
    /// verification), which must not replace the reader that serves fetches.
    pub(crate) fn pread_reader(&self) -> Arc<dyn SegmentReader> {
        Arc::new(PreadReader(Arc::clone(&self.file)))
    }

    /// The reader that serves fetches, created on first use and cached until the file grows or
    /// is replaced.
    pub(crate) fn reader(&mut self, mode: ReadMode) -> io::Result<Arc<dyn SegmentReader>> {
        if let Some(reader) = &self.reader {
            return Ok(Arc::clone(reader));
        }
        let reader: Arc<dyn SegmentReader> = match (mode, self.allocated) {
            (ReadMode::Mmap, len) if len > 0 => match self.file.map(len) {
                Some(map) => Arc::new(MmapReader(map?)),
                None => Arc::new(PreadReader(Arc::clone(&self.file))),
            },
            _ => Arc::new(PreadReader(Arc::clone(&self.file))),
        };
        self.reader = Some(Arc::clone(&reader));
        Ok(reader)
    }

    /// Replaces the file (after a copy-truncate); drops the reader so new reads use the new file.
    pub(crate) fn replace_file(&mut self, file: Arc<dyn FsFile>) -> io::Result<()> {
        self.allocated = file.file_len()?;
        self.file = file;
        self.reader = None;
        Ok(())
    }

    /// Unlinks the segment's files. Readers holding maps or handles keep working.
    pub(crate) fn remove_files(&self, fs: &dyn Fs, dir: &Path) -> io::Result<()> {
        fs.remove_file(&self.log_path(dir))?;
        remove_index_files(fs, dir, self.base_offset)
    }
}

fn read_index_files(fs: &dyn Fs, dir: &Path, base_offset: u64) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let read = |suffix| -> io::Result<Vec<u8>> {
        let path = dir.join(file_name(base_offset, suffix));
        if !fs.exists(&path)? {
            return Ok(Vec::new());
        }
        let file = fs.open(&path, OpenMode::Existing)?;
        let len = file.file_len()?;
        // An index holds at most one entry per indexed batch of a segment.
        if len > crate::config::SEGMENT_BYTES_MAX as u64 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    };
    Ok((read(index::INDEX)?, read(index::TIME_INDEX)?))
}

fn map_index_file(fs: &dyn Fs, dir: &Path, base_offset: u64, suffix: &str) -> io::Result<Bytes> {
    let path = dir.join(file_name(base_offset, suffix));
    let file = fs.open(&path, OpenMode::Existing)?;
    let len = file.file_len()?;
    if len == 0 {
        return Ok(Bytes::new());
    }
    if len > crate::config::SEGMENT_BYTES_MAX as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "index file too large",
        ));
    }
    match file.map(len) {
        // A sealed index never changes again, so it is published in full (mmap contract rule 1).
        Some(map) => map?
            .bytes(0, len as usize)
            .ok_or_else(|| io::Error::other("index map shorter than the file")),
        None => {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, 0)?;
            Ok(Bytes::from(buf))
        }
    }
}

fn write_index_file(
    fs: &dyn Fs,
    dir: &Path,
    base_offset: u64,
    suffix: &str,
    bytes: &[u8],
) -> io::Result<Arc<dyn FsFile>> {
    let file = fs.open(
        &dir.join(file_name(base_offset, suffix)),
        OpenMode::Truncate,
    )?;
    file.write_all_at(bytes, 0)?;
    Ok(file)
}

fn remove_index_files(fs: &dyn Fs, dir: &Path, base_offset: u64) -> io::Result<()> {
    for suffix in [index::INDEX, index::TIME_INDEX] {
        let path = dir.join(file_name(base_offset, suffix));
        match fs.remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Reads the 61-byte header of the batch at `pos` if a whole batch lies below `end`. `None` at the
/// end of the data; an `InvalidData` error if the bytes are not a plausible header (mmap contract
/// rule 4: even published bytes are checked before use).
pub(crate) fn read_header(
    reader: &dyn SegmentReader,
    pos: u32,
    end: u32,
) -> io::Result<Option<BatchHeader>> {
    if u64::from(pos) + BATCH_HEADER_BYTES as u64 > u64::from(end) {
        return Ok(None);
    }
    let mut buf = [0u8; BATCH_HEADER_BYTES];
    reader.read_into(pos, &mut buf)?;
    let header =
        BatchHeader::parse(&buf).map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
    if header.batch_length < batch::BATCH_LENGTH_MIN as i32
        || u64::from(pos) + header.total_bytes() as u64 > u64::from(end)
        || header.last_offset_delta < 0
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("implausible batch header at position {pos}"),
        ));
    }
    Ok(Some(header))
}

impl Segment {
    /// Checks the segment against a linear scan of its batches: every batch valid and in offset
    /// order from `next_offset`, every offset-index entry at a batch start with that batch's
    /// offset, every time-index entry bounding the timestamps before it. Returns the offset after
    /// the last batch. O(data): for tests and offline checks.
    pub(crate) fn verify(
        &mut self,
        fs: &dyn Fs,
        dir: &Path,
        config: &LogConfig,
        next_offset: u64,
    ) -> Result<u64, String> {
        let name = self.log_path(dir).display().to_string();
        let scan = scan(
            &*self.file,
            self.base_offset,
            0,
            next_offset.max(self.base_offset),
            IndexBuilder::default(),
            config,
        )
        .map_err(|e| format!("{name}: {e}"))?;
        if scan.valid_end != self.size {
            return Err(format!(
                "{name}: published size {} but valid batches end at {} ({:?})",
                self.size, scan.valid_end, scan.invalid
            ));
        }
        let reader = self.pread_reader();
        let mut batches = Vec::new();
        let mut pos = 0;
        while let Some(header) = read_header(&*reader, pos, self.size).map_err(|e| e.to_string())? {
            batches.push((pos, header));
            pos += header.total_bytes() as u32;
        }
        let (base, size) = (self.base_offset, self.size);
        let (offsets, times) = self
            .indexes(fs, dir, config)
            .map_err(|e| format!("{name}: {e}"))?;
        if !index::offset_index_is_sane(offsets, size.max(1)) || !index::time_index_is_sane(times) {
            return Err(format!("{name}: index not monotonic"));
        }
        for idx in 0.. {
            let Some((rel, pos)) = index::offset_entry(offsets, idx) else {
                break;
            };
            let hit = batches
                .iter()
                .any(|(p, h)| *p == pos && h.base_offset as u64 == base + u64::from(rel));
            if !hit {
                return Err(format!(
                    "{name}: index entry ({rel}, {pos}) is not a batch start"
                ));
            }
        }
        for idx in 0.. {
            let Some((ts, rel)) = index::time_entry(times, idx) else {
                break;
            };
            let bound = base + u64::from(rel);
            if let Some((_, h)) = batches
                .iter()
                .find(|(_, h)| h.last_offset() as u64 <= bound && h.max_timestamp > ts)
            {
                return Err(format!(
                    "{name}: time entry ({ts}, {rel}) but batch at {} has timestamp {}",
                    h.base_offset, h.max_timestamp
                ));
            }
        }
        Ok(scan.next_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(file_name(1234, LOG_SUFFIX), "00000000000000001234.log");
        assert_eq!(
            parse_file_name("00000000000000001234.log", LOG_SUFFIX),
            Some(1234)
        );
        assert_eq!(parse_file_name("0000000000000001234.log", LOG_SUFFIX), None);
        assert_eq!(
            parse_file_name("0000000000000000123x.log", LOG_SUFFIX),
            None
        );
        assert_eq!(
            parse_file_name("00000000000000001234.index", LOG_SUFFIX),
            None
        );
        assert_eq!(
            parse_file_name(&file_name(u64::MAX, INDEX_SUFFIX), INDEX_SUFFIX),
            Some(u64::MAX)
        );
    }
}
