//! Wire and format limits. Every length read from a socket or a file is checked against one of
//! these (and against the bytes actually remaining) before anything is allocated.

/// Largest record batch (all 12 + `batchLength` bytes) accepted anywhere: produce, replication,
/// recovery. Kafka's default `message.max.bytes` is about 1 MiB and topics may raise theirs; this is
/// the hard ceiling no topic config can pass, and it keeps a batch's byte position within a segment
/// representable with room to spare.
pub const BATCH_BYTES_MAX: u32 = 32 * 1024 * 1024;

/// Largest decompressed records section of one batch. Compressed batches are only opened by clients,
/// compaction and optional validation; each decompression stops here (a compression bomb gets an
/// error instead of memory).
pub const DECOMPRESSED_BYTES_MAX: usize = 128 * 1024 * 1024;

/// zstd frames may ask the decoder for a window of up to 2^this bytes. Producers at default levels
/// use 2^21 to 2^23; a larger request from the network is refused rather than allocated.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Smallest possible encoded record (length, attributes, timestamp delta, offset delta, key length,
/// value length, header count: one byte each). Bounds `recordsCount` against the bytes present.
pub const RECORD_BYTES_MIN: usize = 7;

/// Largest native-protocol frame (after the 4-byte length prefix) any peer may send: a produce
/// request of one maximal batch plus headers fits. Brokers apply a lower configurable limit
/// (`frame_bytes_max`); tokio's codec defaults to 8 MiB, Apache Iggy to 64 MiB.
pub const FRAME_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// Bytes of the frame length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Longest client id accepted in a request header.
pub const CLIENT_ID_BYTES_MAX: usize = 256;

/// Longest topic name (Kafka's limit: it must fit in a file name with a partition suffix).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;

/// Longest consumer group id (the classic Kafka string's own maximum); longer ones get
/// INVALID_GROUP_ID.
pub const GROUP_ID_BYTES_MAX: usize = 32_767;

/// Longest metadata string of a committed offset (Kafka `offset.metadata.max.bytes`); longer ones
/// get OFFSET_METADATA_TOO_LARGE.
pub const OFFSET_METADATA_BYTES_MAX: usize = 4_096;

/// Most bytes one fetch response may carry.
pub const FETCH_BYTES_MAX: u32 = 52 * 1024 * 1024;

/// Most headers accepted on one record; each costs an allocation when decoded.
pub const HEADERS_PER_RECORD_MAX: usize = 64 * 1024;

/// A configured value outside its allowed range; every config layer reports limits with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value} is outside {min}..={max}")]
pub struct LimitError {
    /// The setting.
    pub field: &'static str,
    /// Its value.
    pub value: u64,
    /// Smallest allowed.
    pub min: u64,
    /// Largest allowed.
    pub max: u64,
}

/// Checks that `value` lies in `min..=max`.
pub fn check_limit(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), LimitError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(LimitError {
            field,
            value,
            min,
            max,
        })
    }
}

const _: () = assert!(BATCH_BYTES_MAX as u64 <= i32::MAX as u64); // batchLength is an i32
const _: () = assert!(BATCH_BYTES_MAX as usize <= DECOMPRESSED_BYTES_MAX);
const _: () = assert!(BATCH_BYTES_MAX as u64 + 64 * 1024 <= FRAME_BYTES_MAX as u64);
const _: () = assert!(FETCH_BYTES_MAX + 64 * 1024 <= FRAME_BYTES_MAX);
