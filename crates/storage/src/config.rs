//! Per-log configuration and its limits, checked by [`LogConfig::validate`] when a log opens.

use std::time::Duration;

use cairn_protocol::limits::BATCH_BYTES_MAX;

/// When appended data is made durable with `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Every append syncs before it returns (concurrent appends share one sync).
    EveryAppend,
    /// An append syncs when the last sync is older than this; a caller's timer should also call
    /// [`crate::Log::flush_if_due`] so a quiet log is synced too.
    Interval(Duration),
    /// Only explicit [`crate::Log::flush`] calls (for example an acks=all producer), segment rolls
    /// and clean shutdown sync; otherwise the OS writes back when it likes.
    Os,
}

/// How sealed and active segments are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Zero-copy reads from read-only memory maps (the default).
    Mmap,
    /// Positional reads into fresh buffers: the fallback, and the baseline mmap is measured against.
    Pread,
}

/// Smallest segment size accepted: below this, index and roll overheads dominate.
pub const SEGMENT_BYTES_MIN: u32 = 4 * 1024;
/// Largest segment size: byte positions within a segment are `u32` (`FilePos`) in the index.
pub const SEGMENT_BYTES_MAX: u32 = 1 << 30;
/// Largest preallocation step.
pub const PREALLOCATE_BYTES_MAX: u32 = 256 * 1024 * 1024;

const _: () = assert!(SEGMENT_BYTES_MAX as u64 + BATCH_BYTES_MAX as u64 <= u32::MAX as u64);

/// The configuration of one partition log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Roll to a new segment before one would pass this size (Kafka `segment.bytes`).
    pub segment_bytes: u32,
    /// Roll when the records of the active segment span more than this (Kafka `segment.ms`),
    /// judged by record timestamps as Kafka does.
    pub segment_age: Option<Duration>,
    /// Largest batch accepted (Kafka `max.message.bytes`).
    pub batch_bytes_max: u32,
    /// Bytes of log between two sparse index entries (Kafka `index.interval.bytes`).
    pub index_interval_bytes: u32,
    /// Delete the oldest sealed segments while the log would stay at least this large
    /// (Kafka `retention.bytes`; `None` keeps everything).
    pub retention_bytes: Option<u64>,
    /// Delete sealed segments whose newest record is older than this (Kafka `retention.ms`).
    pub retention_age: Option<Duration>,
    /// When appends become durable.
    pub flush: FlushPolicy,
    /// The active segment grows by up to this much at a time, with blocks reserved by
    /// `fallocate` (from 4 KiB, doubling: an idle partition costs a page, not a step).
    pub preallocate_bytes: u32,
    /// How reads are served.
    pub read_mode: ReadMode,
    /// The log may hold offset gaps (a compacted topic, or a replica of one). Otherwise every
    /// batch must start exactly where the previous one ended, which lets recovery reject a batch
    /// whose `baseOffset` (outside the CRC) was damaged.
    pub compacted: bool,
    /// How long a compacted log keeps a tombstone (a record with a null value) after it was
    /// written, judged by its timestamp (Kafka `delete.retention.ms`); consumers that were
    /// behind by less than this still see the delete.
    pub tombstone_retention: Duration,
    /// A compaction pass runs only when the sealed bytes written since the last pass (the dirty
    /// section) are at least this fraction of all sealed bytes (Kafka
    /// `min.cleanable.dirty.ratio`; 0 compacts whenever asked).
    pub min_cleanable_dirty_ratio: f64,
    /// Memory for a pass's map of keys to their latest offsets (Kafka
    /// `log.cleaner.dedupe.buffer.size`); a dirty section with more keys is compacted over
    /// several passes.
    pub compaction_key_map_bytes: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 128 * 1024 * 1024,
            segment_age: Some(Duration::from_secs(7 * 24 * 3600)),
            batch_bytes_max: 1024 * 1024 + 12,
            index_interval_bytes: 4096,
            retention_bytes: None,
            retention_age: Some(Duration::from_secs(7 * 24 * 3600)),
            flush: FlushPolicy::Os,
            preallocate_bytes: 16 * 1024 * 1024,
            read_mode: ReadMode::Mmap,
            compacted: false,
            tombstone_retention: Duration::from_secs(24 * 3600),
            min_cleanable_dirty_ratio: 0.5,
            compaction_key_map_bytes: 128 << 20,
        }
    }
}

/// A configuration value outside its limits.
pub use cairn_protocol::limits::LimitError as ConfigError;

impl LogConfig {
    /// Checks every limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = cairn_protocol::limits::check_limit;
        check(
            "segment_bytes",
            self.segment_bytes.into(),
            SEGMENT_BYTES_MIN.into(),
            SEGMENT_BYTES_MAX.into(),
        )?;
        check(
            "batch_bytes_max",
            self.batch_bytes_max.into(),
            cairn_protocol::batch::BATCH_HEADER_BYTES as u64,
            BATCH_BYTES_MAX.into(),
        )?;
        check(
            "index_interval_bytes",
            self.index_interval_bytes.into(),
            1,
            self.segment_bytes.into(),
        )?;
        check(
            "preallocate_bytes",
            self.preallocate_bytes.into(),
            0,
            PREALLOCATE_BYTES_MAX.into(),
        )?;
        // In thousandths (NaN and values outside 0..=1 are out of range).
        let ratio = self.min_cleanable_dirty_ratio;
        let per_mille = if (0.0..=1.0).contains(&ratio) {
            (ratio * 1000.0).round() as u64
        } else {
            u64::MAX
        };
        check("min_cleanable_dirty_ratio (per mille)", per_mille, 0, 1000)?;
        check(
            "compaction_key_map_bytes",
            self.compaction_key_map_bytes as u64,
            crate::compact::KEY_MAP_ENTRY_BYTES as u64,
            1 << 40,
        )?;
        Ok(())
    }
}
