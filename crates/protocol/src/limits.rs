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

/// Most headers accepted on one record; each costs an allocation when decoded.
pub const HEADERS_PER_RECORD_MAX: usize = 64 * 1024;

const _: () = assert!(BATCH_BYTES_MAX as u64 <= i32::MAX as u64); // batchLength is an i32
const _: () = assert!(BATCH_BYTES_MAX as usize <= DECOMPRESSED_BYTES_MAX);
