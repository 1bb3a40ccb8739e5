//! Kafka's RecordBatch v2 ("magic 2"), byte for byte.
//!
//! ```text
//! offset  bytes  field                    covered by CRC
//!      0      8  baseOffset        i64    no  (stamped by the leader)
//!      8      4  batchLength       i32    no  (bytes after this field)
//!     12      4  partitionLeaderEpoch i32 no  (stamped by the leader)
//!     16      1  magic             i8 = 2 no
//!     17      4  crc               u32    no  (CRC-32C of bytes 21..end)
//!     21      2  attributes        i16    yes (bits 0-2 codec, 3 timestamp type, 4 transactional, 5 control)
//!     23      4  lastOffsetDelta   i32    yes
//!     27      8  baseTimestamp     i64    yes
//!     35      8  maxTimestamp      i64    yes
//!     43      8  producerId        i64    yes
//!     51      2  producerEpoch     i16    yes
//!     53      4  baseSequence      i32    yes
//!     57      4  recordsCount      i32    yes
//!     61      -  records (compressed as one blob when the codec is not none)
//! ```
//! All integers are big-endian. Each record is:
//! `length varint | attributes i8 | timestampDelta varlong | offsetDelta varint | keyLength varint |
//! key | valueLength varint | value | headersCount varint | (keyLength varint, key, valueLength
//! varint, value)*`, where a length of -1 means null.
//!
//! The hot path (append, fetch) only calls [`validate`] and [`stamp`], which read the 61-byte header
//! and checksum the rest; decoding records allocates and is for clients, compaction and tools.

use bytes::Bytes;
use thiserror::Error;

pub use crate::compression::Compression;
use crate::compression::CompressionError;
use crate::limits::{HEADERS_PER_RECORD_MAX, RECORD_BYTES_MIN};
use crate::varint::{self, VarintError};

/// Bytes of the fixed batch header, before the records.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes before what `batchLength` counts (`baseOffset` and `batchLength` itself).
pub const BATCH_LENGTH_OVERHEAD: usize = 12;
/// The smallest legal `batchLength`: a header with no records.
pub const BATCH_LENGTH_MIN: u32 = (BATCH_HEADER_BYTES - BATCH_LENGTH_OVERHEAD) as u32;
/// The only batch format Cairn reads and writes.
pub const MAGIC_V2: i8 = 2;
/// Producer id, epoch and sequence of a batch from a non-idempotent producer.
pub const NO_PRODUCER_ID: i64 = -1;
/// See [`NO_PRODUCER_ID`].
pub const NO_PRODUCER_EPOCH: i16 = -1;
/// See [`NO_PRODUCER_ID`].
pub const NO_SEQUENCE: i32 = -1;
/// The partition leader epoch a producer writes before the leader stamps its own.
pub const NO_PARTITION_LEADER_EPOCH: i32 = -1;

/// Byte positions of the header fields.
pub mod field {
    /// `baseOffset`, i64.
    pub const BASE_OFFSET: usize = 0;
    /// `batchLength`, i32.
    pub const BATCH_LENGTH: usize = 8;
    /// `partitionLeaderEpoch`, i32.
    pub const PARTITION_LEADER_EPOCH: usize = 12;
    /// `magic`, i8.
    pub const MAGIC: usize = 16;
    /// `crc`, u32.
    pub const CRC: usize = 17;
    /// `attributes`, i16; the CRC covers from here to the end of the batch.
    pub const ATTRIBUTES: usize = 21;
    /// `lastOffsetDelta`, i32.
    pub const LAST_OFFSET_DELTA: usize = 23;
    /// `baseTimestamp`, i64.
    pub const BASE_TIMESTAMP: usize = 27;
    /// `maxTimestamp`, i64.
    pub const MAX_TIMESTAMP: usize = 35;
    /// `producerId`, i64.
    pub const PRODUCER_ID: usize = 43;
    /// `producerEpoch`, i16.
    pub const PRODUCER_EPOCH: usize = 51;
    /// `baseSequence`, i32.
    pub const BASE_SEQUENCE: usize = 53;
    /// `recordsCount`, i32.
    pub const RECORDS_COUNT: usize = 57;
}

const ATTR_COMPRESSION_MASK: i16 = 0x07;
const ATTR_LOG_APPEND_TIME: i16 = 0x08;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;

/// Why a batch was refused. Every variant is caused by the bytes, never by a bug here.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BatchError {
    /// Fewer bytes than the header or `batchLength` promise.
    #[error("batch truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the batch needs.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// `batchLength` below the header size.
    #[error("batch length {batch_length} is below the minimum {BATCH_LENGTH_MIN}")]
    LengthTooSmall {
        /// The declared `batchLength`.
        batch_length: i32,
    },
    /// The batch is larger than allowed.
    #[error("batch of {n_bytes} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Size of the whole batch.
        n_bytes: u64,
        /// The limit.
        max: u32,
    },
    /// Not a v2 batch.
    #[error("unsupported record batch magic {magic} (only 2 is supported)")]
    Magic {
        /// The magic byte found.
        magic: i8,
    },
    /// The CRC-32C does not match the bytes.
    #[error("batch crc mismatch: header says {expected:#010x}, bytes give {actual:#010x}")]
    Crc {
        /// The CRC stored in the header.
        expected: u32,
        /// The CRC of the bytes.
        actual: u32,
    },
    /// `recordsCount` or `lastOffsetDelta` is impossible.
    #[error("invalid record count {records_count} with last offset delta {last_offset_delta}")]
    RecordCount {
        /// The declared `recordsCount`.
        records_count: i32,
        /// The declared `lastOffsetDelta`.
        last_offset_delta: i32,
    },
    /// More records declared than the bytes could hold.
    #[error("{records_count} records cannot fit in {n_bytes} bytes")]
    RecordCountTooLarge {
        /// The declared `recordsCount`.
        records_count: i32,
        /// Bytes of the records section.
        n_bytes: usize,
    },
    /// A record inside the batch cannot be decoded.
    #[error("record {record_idx} is malformed: {reason}")]
    Record {
        /// Position of the record in the batch.
        record_idx: usize,
        /// What is wrong.
        reason: RecordError,
    },
    /// The records section does not decompress.
    #[error(transparent)]
    Compression(#[from] CompressionError),
    /// A batch with no records cannot be built.
    #[error("a batch needs at least one record")]
    Empty,
    /// The builder was given more than a batch can hold.
    #[error("batch would exceed {max} bytes or {max_records} records")]
    BuilderFull {
        /// Byte limit.
        max: u32,
        /// Record limit.
        max_records: i32,
    },
}

/// What is wrong with one record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RecordError {
    /// A varint field is malformed.
    #[error("{field}: {source}")]
    Varint {
        /// Which field.
        field: &'static str,
        /// The varint error.
        source: VarintError,
    },
    /// A length field is negative (other than -1 for null) or runs past the record.
    #[error("{field} length {length} is invalid")]
    Length {
        /// Which field.
        field: &'static str,
        /// The length found.
        length: i64,
    },
    /// A header key is not UTF-8.
    #[error("header key is not valid UTF-8")]
    HeaderKeyUtf8,
    /// The record's declared length and its fields disagree.
    #[error("record length {declared} but fields take {used}")]
    LengthMismatch {
        /// `length` of the record.
        declared: usize,
        /// Bytes the fields took.
        used: usize,
    },
    /// Bytes remain after the last record.
    #[error("{n_bytes} bytes after the last record")]
    TrailingBytes {
        /// Bytes left over.
        n_bytes: usize,
    },
}

/// Whether record timestamps come from the producer or the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampType {
    /// The producer's clock (`CreateTime`).
    CreateTime,
    /// The broker's clock when it appended the batch (`LogAppendTime`).
    LogAppendTime,
}

/// The fixed 61-byte header of a batch, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)] // Fields are named as in Kafka's spec; see the module docs.
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

impl BatchHeader {
    /// Decodes the header fields from the first 61 bytes of `buf`, without checking them.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        let header: &[u8; BATCH_HEADER_BYTES] = buf.first_chunk().ok_or(BatchError::Truncated {
            needed: BATCH_HEADER_BYTES,
            available: buf.len(),
        })?;
        Ok(BatchHeader {
            base_offset: i64_at(header, field::BASE_OFFSET),
            batch_length: i32_at(header, field::BATCH_LENGTH),
            partition_leader_epoch: i32_at(header, field::PARTITION_LEADER_EPOCH),
            magic: i8::from_be_bytes(read_at(header, field::MAGIC)),
            crc: i32_at(header, field::CRC) as u32,
            attributes: i16_at(header, field::ATTRIBUTES),
            last_offset_delta: i32_at(header, field::LAST_OFFSET_DELTA),
            base_timestamp: i64_at(header, field::BASE_TIMESTAMP),
            max_timestamp: i64_at(header, field::MAX_TIMESTAMP),
            producer_id: i64_at(header, field::PRODUCER_ID),
            producer_epoch: i16_at(header, field::PRODUCER_EPOCH),
            base_sequence: i32_at(header, field::BASE_SEQUENCE),
            records_count: i32_at(header, field::RECORDS_COUNT),
        })
    }

    /// Encodes the header into its 61 bytes.
    pub fn encode(&self) -> [u8; BATCH_HEADER_BYTES] {
        let mut out = [0u8; BATCH_HEADER_BYTES];
        write_at(&mut out, field::BASE_OFFSET, self.base_offset.to_be_bytes());
        write_at(
            &mut out,
            field::BATCH_LENGTH,
            self.batch_length.to_be_bytes(),
        );
        write_at(
            &mut out,
            field::PARTITION_LEADER_EPOCH,
            self.partition_leader_epoch.to_be_bytes(),
        );
        write_at(&mut out, field::MAGIC, self.magic.to_be_bytes());
        write_at(&mut out, field::CRC, self.crc.to_be_bytes());
        write_at(&mut out, field::ATTRIBUTES, self.attributes.to_be_bytes());
        write_at(
            &mut out,
            field::LAST_OFFSET_DELTA,
            self.last_offset_delta.to_be_bytes(),
        );
        write_at(
            &mut out,
            field::BASE_TIMESTAMP,
            self.base_timestamp.to_be_bytes(),
        );
        write_at(
            &mut out,
            field::MAX_TIMESTAMP,
            self.max_timestamp.to_be_bytes(),
        );
        write_at(&mut out, field::PRODUCER_ID, self.producer_id.to_be_bytes());
        write_at(
            &mut out,
            field::PRODUCER_EPOCH,
            self.producer_epoch.to_be_bytes(),
        );
        write_at(
            &mut out,
            field::BASE_SEQUENCE,
            self.base_sequence.to_be_bytes(),
        );
        write_at(
            &mut out,
            field::RECORDS_COUNT,
            self.records_count.to_be_bytes(),
        );
        out
    }

    /// Bytes of the whole batch, header included (`12 + batchLength`), for a validated header.
    pub fn total_bytes(&self) -> usize {
        BATCH_LENGTH_OVERHEAD + self.batch_length.max(0) as usize
    }

    /// The offset of the batch's last record (`baseOffset + lastOffsetDelta`).
    pub fn last_offset(&self) -> i64 {
        self.base_offset
            .saturating_add(i64::from(self.last_offset_delta))
    }

    /// The compression codec named by the attributes.
    pub fn compression(&self) -> Result<Compression, BatchError> {
        Ok(Compression::from_attributes(self.attributes)?)
    }

    /// Whose clock the record timestamps come from.
    pub fn timestamp_type(&self) -> TimestampType {
        if self.attributes & ATTR_LOG_APPEND_TIME != 0 {
            TimestampType::LogAppendTime
        } else {
            TimestampType::CreateTime
        }
    }

    /// Whether the batch belongs to a transaction.
    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }

    /// Whether the batch holds a transaction marker rather than user records.
    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }
}

/// The `N` bytes at `pos`; zeros if `buf` is too short (never for the fixed header positions).
fn read_at<const N: usize>(buf: &[u8], pos: usize) -> [u8; N] {
    buf.get(pos..)
        .and_then(<[u8]>::first_chunk::<N>)
        .copied()
        .unwrap_or([0; N])
}

/// Writes `bytes` at `pos`; returns whether they fit.
fn write_at<const N: usize>(buf: &mut [u8], pos: usize, bytes: [u8; N]) -> bool {
    match buf.get_mut(pos..).and_then(<[u8]>::first_chunk_mut::<N>) {
        Some(dst) => {
            *dst = bytes;
            true
        }
        None => false,
    }
}

fn i16_at(header: &[u8; BATCH_HEADER_BYTES], pos: usize) -> i16 {
    i16::from_be_bytes(read_at(header, pos))
}

fn i32_at(header: &[u8; BATCH_HEADER_BYTES], pos: usize) -> i32 {
    i32::from_be_bytes(read_at(header, pos))
}

fn i64_at(header: &[u8; BATCH_HEADER_BYTES], pos: usize) -> i64 {
    i64::from_be_bytes(read_at(header, pos))
}

// Every field lies inside the fixed header, so `read_at`/`write_at` at these positions always fit.
const _: () = assert!(field::RECORDS_COUNT + 4 == BATCH_HEADER_BYTES);
const _: () = assert!(field::ATTRIBUTES + 2 == field::LAST_OFFSET_DELTA);

/// The `baseOffset` and `batchLength` at the front of `buf`, if 12 bytes are there. Used to walk a
/// log or a fetch response batch by batch without checking anything else.
pub fn peek_offset_and_length(buf: &[u8]) -> Option<(i64, i32)> {
    let prefix: &[u8; BATCH_LENGTH_OVERHEAD] = buf.first_chunk()?;
    let (offset, length) = prefix.split_at(8);
    Some((
        i64::from_be_bytes(offset.try_into().ok()?),
        i32::from_be_bytes(length.try_into().ok()?),
    ))
}

/// The CRC-32C a batch header should carry: bytes from `attributes` to the end of the batch.
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(batch.get(field::ATTRIBUTES..).unwrap_or_default())
}

/// Checks the batch at the front of `buf` and returns its header: enough bytes, a legal length no
/// larger than `batch_bytes_max`, magic 2, a matching CRC-32C, a known codec and a possible record
/// count. Reads only the header and checksums the rest; never decodes records. `buf` may continue
/// past the batch; the batch is `buf[..header.total_bytes()]`.
pub fn validate(buf: &[u8], batch_bytes_max: u32) -> Result<BatchHeader, BatchError> {
    let (_, batch_length) = peek_offset_and_length(buf).ok_or(BatchError::Truncated {
        needed: BATCH_LENGTH_OVERHEAD,
        available: buf.len(),
    })?;
    if batch_length < BATCH_LENGTH_MIN as i32 {
        return Err(BatchError::LengthTooSmall { batch_length });
    }
    let n_bytes = BATCH_LENGTH_OVERHEAD as u64 + batch_length as u64;
    if n_bytes > u64::from(batch_bytes_max) {
        return Err(BatchError::TooLarge {
            n_bytes,
            max: batch_bytes_max,
        });
    }
    let n_bytes = n_bytes as usize;
    let batch = buf.get(..n_bytes).ok_or(BatchError::Truncated {
        needed: n_bytes,
        available: buf.len(),
    })?;
    let header = BatchHeader::parse(batch)?;
    if header.magic != MAGIC_V2 {
        return Err(BatchError::Magic {
            magic: header.magic,
        });
    }
    let actual = compute_crc(batch);
    if actual != header.crc {
        return Err(BatchError::Crc {
            expected: header.crc,
            actual,
        });
    }
    let compression = header.compression()?;
    if header.records_count < 0
        || header.last_offset_delta < 0
        || i64::from(header.records_count) > i64::from(header.last_offset_delta) + 1
    {
        return Err(BatchError::RecordCount {
            records_count: header.records_count,
            last_offset_delta: header.last_offset_delta,
        });
    }
    let records_bytes = n_bytes - BATCH_HEADER_BYTES;
    if compression == Compression::None
        && (header.records_count as usize).saturating_mul(RECORD_BYTES_MIN) > records_bytes
    {
        return Err(BatchError::RecordCountTooLarge {
            records_count: header.records_count,
            n_bytes: records_bytes,
        });
    }
    Ok(header)
}

/// Writes `baseOffset` and `partitionLeaderEpoch` into the batch at the front of `batch`. Neither
/// field is covered by the CRC, so a leader assigns them without rehashing the batch.
pub fn stamp(
    batch: &mut [u8],
    base_offset: i64,
    partition_leader_epoch: i32,
) -> Result<(), BatchError> {
    let available = batch.len();
    let truncated = BatchError::Truncated {
        needed: BATCH_HEADER_BYTES,
        available,
    };
    let header: &mut [u8; BATCH_HEADER_BYTES] = batch.first_chunk_mut().ok_or(truncated)?;
    write_at(header, field::BASE_OFFSET, base_offset.to_be_bytes());
    write_at(
        header,
        field::PARTITION_LEADER_EPOCH,
        partition_leader_epoch.to_be_bytes(),
    );
    Ok(())
}

/// Rewrites the idempotent producer fields (`producerId`, `producerEpoch`, `baseSequence`) of the
/// batch at the front of `batch` and its CRC-32C, which covers them. A producer that restarts its
/// sequences under a new epoch re-sends already built batches this way.
pub fn restamp_producer(
    batch: &mut [u8],
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
) -> Result<(), BatchError> {
    let (_, length) = peek_offset_and_length(batch).ok_or(BatchError::Truncated {
        needed: BATCH_LENGTH_OVERHEAD,
        available: batch.len(),
    })?;
    let n_bytes = BATCH_LENGTH_OVERHEAD as u64 + u64::try_from(length).unwrap_or(0);
    let available = batch.len();
    let batch = batch
        .get_mut(..n_bytes as usize)
        .filter(|b| b.len() >= BATCH_HEADER_BYTES)
        .ok_or(BatchError::Truncated {
            needed: (n_bytes as usize).max(BATCH_HEADER_BYTES),
            available,
        })?;
    write_at(batch, field::PRODUCER_ID, producer_id.to_be_bytes());
    write_at(batch, field::PRODUCER_EPOCH, producer_epoch.to_be_bytes());
    write_at(batch, field::BASE_SEQUENCE, base_sequence.to_be_bytes());
    let crc = compute_crc(batch);
    write_at(batch, field::CRC, crc.to_be_bytes());
    Ok(())
}

/// One header of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The header key, UTF-8.
    pub key: String,
    /// The header value; `None` is null.
    pub value: Option<Bytes>,
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Absolute offset: the batch's base offset plus the record's offset delta.
    pub offset: i64,
    /// Absolute timestamp in Unix milliseconds (the batch's `maxTimestamp` for log-append time).
    pub timestamp: i64,
    /// The key; `None` is null.
    pub key: Option<Bytes>,
    /// The value; `None` is null (a tombstone on compacted topics).
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<Header>,
}

/// A validated batch and its bytes.
#[derive(Debug, Clone)]
pub struct Batch {
    header: BatchHeader,
    bytes: Bytes,
}

impl Batch {
    /// Validates the batch at the front of `bytes` (see [`validate`]) and keeps exactly its bytes.
    pub fn parse(bytes: Bytes, batch_bytes_max: u32) -> Result<Batch, BatchError> {
        let header = validate(&bytes, batch_bytes_max)?;
        let bytes = bytes.slice(..header.total_bytes());
        Ok(Batch { header, bytes })
    }

    /// The header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The whole batch, as stored and sent.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Decodes every record, decompressing first if needed (at most `decompressed_bytes_max`).
    pub fn records(&self, decompressed_bytes_max: usize) -> Result<Vec<Record>, BatchError> {
        let compression = self.header.compression()?;
        let section = self.bytes.slice(BATCH_HEADER_BYTES..);
        let section = match compression {
            Compression::None => section,
            codec => Bytes::from(codec.decompress(&section, decompressed_bytes_max)?),
        };
        decode_records(&self.header, &section)
    }
}

/// Iterates over the batches of a buffer (a fetch response or a segment slice). Yields an error for
/// a batch that fails [`validate`] and then stops; a trailing partial batch ends the iteration
/// silently, because fetch responses may legitimately end with one.
#[derive(Debug)]
pub struct Batches {
    rest: Bytes,
    batch_bytes_max: u32,
}

impl Batches {
    /// Batches of `bytes`, each at most `batch_bytes_max`.
    pub fn new(bytes: Bytes, batch_bytes_max: u32) -> Batches {
        Batches {
            rest: bytes,
            batch_bytes_max,
        }
    }
}

impl Iterator for Batches {
    type Item = Result<Batch, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (_, batch_length) = peek_offset_and_length(&self.rest)?;
        let total = BATCH_LENGTH_OVERHEAD as u64 + batch_length.max(0) as u64;
        if batch_length >= BATCH_LENGTH_MIN as i32
            && total <= u64::from(self.batch_bytes_max)
            && total > self.rest.len() as u64
        {
            self.rest = Bytes::new();
            return None;
        }
        match Batch::parse(self.rest.clone(), self.batch_bytes_max) {
            Ok(batch) => {
                self.rest = self.rest.slice(batch.bytes.len()..);
                Some(Ok(batch))
            }
            Err(err) => {
                self.rest = Bytes::new();
                Some(Err(err))
            }
        }
    }
}

fn decode_records(header: &BatchHeader, section: &Bytes) -> Result<Vec<Record>, BatchError> {
    let count = header.records_count.max(0) as usize;
    // Never trust the count for the allocation: each record takes at least RECORD_BYTES_MIN bytes.
    let mut records = Vec::with_capacity(count.min(section.len() / RECORD_BYTES_MIN));
    let mut cursor = RecordCursor {
        buf: section,
        pos: 0,
    };
    for record_idx in 0..count {
        let record = cursor
            .record(header)
            .map_err(|reason| BatchError::Record { record_idx, reason })?;
        records.push(record);
    }
    let n_bytes = section.len() - cursor.pos;
    if n_bytes != 0 {
        return Err(BatchError::Record {
            record_idx: count,
            reason: RecordError::TrailingBytes { n_bytes },
        });
    }
    Ok(records)
}

struct RecordCursor<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl RecordCursor<'_> {
    fn remaining(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn varint(&mut self, field: &'static str) -> Result<i32, RecordError> {
        let mut rest = self.remaining();
        let before = rest.len();
        let value = varint::get_varint(&mut rest)
            .map_err(|source| RecordError::Varint { field, source })?;
        self.pos += before - rest.len();
        Ok(value)
    }

    fn varlong(&mut self, field: &'static str) -> Result<i64, RecordError> {
        let mut rest = self.remaining();
        let before = rest.len();
        let value = varint::get_varlong(&mut rest)
            .map_err(|source| RecordError::Varint { field, source })?;
        self.pos += before - rest.len();
        Ok(value)
    }

    fn bytes(&mut self, field: &'static str, length: i32) -> Result<Option<Bytes>, RecordError> {
        if length == -1 {
            return Ok(None);
        }
        let invalid = RecordError::Length {
            field,
            length: i64::from(length),
        };
        let length = usize::try_from(length).map_err(|_| invalid.clone())?;
        if length > self.remaining().len() {
            return Err(invalid);
        }
        let value = self.buf.slice(self.pos..self.pos + length);
        self.pos += length;
        Ok(Some(value))
    }

    fn record(&mut self, header: &BatchHeader) -> Result<Record, RecordError> {
        let declared = self.varint("record length")?;
        let declared = usize::try_from(declared).map_err(|_| RecordError::Length {
            field: "record",
            length: i64::from(declared),
        })?;
        if declared > self.remaining().len() {
            return Err(RecordError::Length {
                field: "record",
                length: declared as i64,
            });
        }
        let start = self.pos;
        // Record attributes are unused in v2.
        self.pos += 1;
        let timestamp_delta = self.varlong("timestamp delta")?;
        let offset_delta = self.varint("offset delta")?;
        let key_length = self.varint("key length")?;
        let key = self.bytes("key", key_length)?;
        let value_length = self.varint("value length")?;
        let value = self.bytes("value", value_length)?;
        let n_headers = self.varint("header count")?;
        let n_headers = usize::try_from(n_headers)
            .ok()
            .filter(|&n| n <= HEADERS_PER_RECORD_MAX)
            .ok_or(RecordError::Length {
                field: "header count",
                length: i64::from(n_headers),
            })?;
        let mut headers = Vec::with_capacity(n_headers.min(self.remaining().len() / 2));
        for _ in 0..n_headers {
            let key_length = self.varint("header key length")?;
            let key = self
                .bytes("header key", key_length)?
                .ok_or(RecordError::Length {
                    field: "header key",
                    length: -1,
                })?;
            let key = String::from_utf8(key.to_vec()).map_err(|_| RecordError::HeaderKeyUtf8)?;
            let value_length = self.varint("header value length")?;
            let value = self.bytes("header value", value_length)?;
            headers.push(Header { key, value });
        }
        let used = self.pos - start;
        if used != declared {
            return Err(RecordError::LengthMismatch { declared, used });
        }
        let timestamp = match header.timestamp_type() {
            TimestampType::LogAppendTime => header.max_timestamp,
            TimestampType::CreateTime => header.base_timestamp.wrapping_add(timestamp_delta),
        };
        Ok(Record {
            offset: header.base_offset.wrapping_add(i64::from(offset_delta)),
            timestamp,
            key,
            value,
            headers,
        })
    }
}

/// Builds one batch from records, as a producer does: offsets from 0, `baseTimestamp` from the
/// first record, the CRC over the (possibly compressed) result.
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    compression: Compression,
    partition_leader_epoch: i32,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
    transactional: bool,
    /// The batch being built: room for its header, then the encoded records (uncompressed),
    /// so an uncompressed batch is finished in place.
    records: Vec<u8>,
    n_records: i32,
    /// The offset delta the next `push` gets (records pushed at explicit deltas move it on).
    next_delta: i32,
    /// The batch's last offset delta when it must cover more than its records.
    cover_delta: i32,
    first_timestamp: Option<i64>,
    max_timestamp: i64,
}

impl BatchBuilder {
    /// An empty builder for a batch compressed with `compression`.
    pub fn new(compression: Compression) -> BatchBuilder {
        BatchBuilder::with_capacity(compression, 0)
    }

    /// An empty builder that holds `bytes` of batch (header included) before it reallocates.
    pub fn with_capacity(compression: Compression, bytes: usize) -> BatchBuilder {
        BatchBuilder::with_buffer(
            compression,
            Vec::with_capacity(bytes.max(BATCH_HEADER_BYTES)),
        )
    }

    /// An empty builder writing into `buffer` (cleared first): a producer recycles the buffers
    /// of acknowledged batches, so its batches do not fault in fresh memory.
    pub fn with_buffer(compression: Compression, buffer: Vec<u8>) -> BatchBuilder {
        let mut records = buffer;
        records.clear();
        records.resize(BATCH_HEADER_BYTES, 0);
        BatchBuilder {
            compression,
            partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
            producer_id: NO_PRODUCER_ID,
            producer_epoch: NO_PRODUCER_EPOCH,
            base_sequence: NO_SEQUENCE,
            transactional: false,
            records,
            n_records: 0,
            next_delta: 0,
            cover_delta: -1,
            first_timestamp: None,
            max_timestamp: -1,
        }
    }

    /// Sets the idempotent producer's identity and the sequence of the first record.
    pub fn producer(mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Sets `partitionLeaderEpoch` (producers leave it at -1; some clients write 0).
    pub fn partition_leader_epoch(mut self, epoch: i32) -> Self {
        self.partition_leader_epoch = epoch;
        self
    }

    /// Marks the batch transactional.
    pub fn transactional(mut self, transactional: bool) -> Self {
        self.transactional = transactional;
        self
    }

    /// Records added so far.
    pub fn n_records(&self) -> usize {
        self.n_records as usize
    }

    /// Uncompressed size of the batch if built now (an upper bound for most codecs).
    pub fn uncompressed_bytes(&self) -> usize {
        self.records.len()
    }

    /// Makes the batch cover offsets up to `last_offset_delta` even if its records end earlier:
    /// a compacted batch keeps its original offset range (as Kafka's cleaner does), so the log's
    /// end and the producer's sequence range do not move.
    pub fn cover_offset_delta(mut self, last_offset_delta: i32) -> Self {
        self.cover_delta = last_offset_delta;
        self
    }

    /// Appends a record with the given timestamp (Unix ms), key, value and headers.
    pub fn push(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) {
        self.push_at(self.next_delta, timestamp, key, value, headers);
    }

    /// Appends a record at an explicit offset delta (compaction keeps each record's offset).
    /// Deltas must increase from record to record.
    pub fn push_at(
        &mut self,
        offset_delta: i32,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) {
        let first_timestamp = *self.first_timestamp.get_or_insert(timestamp);
        self.max_timestamp = self.max_timestamp.max(timestamp);
        let timestamp_delta = timestamp.wrapping_sub(first_timestamp);
        self.next_delta = offset_delta.saturating_add(1);
        let len_of = |bytes: Option<&[u8]>| bytes.map_or(-1, |b| b.len() as i32);
        let field_bytes = |bytes: Option<&[u8]>| {
            let len = len_of(bytes);
            varint::varint_len(len) + bytes.map_or(0, <[u8]>::len)
        };
        let mut body_len = 1
            + varint::varlong_len(timestamp_delta)
            + varint::varint_len(offset_delta)
            + field_bytes(key)
            + field_bytes(value)
            + varint::varint_len(headers.len() as i32);
        for (header_key, header_value) in headers {
            body_len += field_bytes(Some(header_key.as_bytes())) + field_bytes(*header_value);
        }
        let out = &mut self.records;
        varint::put_varint(out, body_len as i32);
        out.push(0); // record attributes
        varint::put_varlong(out, timestamp_delta);
        varint::put_varint(out, offset_delta);
        let put_field = |out: &mut Vec<u8>, bytes: Option<&[u8]>| {
            varint::put_varint(out, len_of(bytes));
            if let Some(bytes) = bytes {
                out.extend_from_slice(bytes);
            }
        };
        put_field(out, key);
        put_field(out, value);
        varint::put_varint(out, headers.len() as i32);
        for (header_key, header_value) in headers {
            put_field(out, Some(header_key.as_bytes()));
            put_field(out, *header_value);
        }
        self.n_records += 1;
    }

    /// Appends a decoded record (its offset is ignored: records are numbered in push order).
    pub fn push_record(&mut self, record: &Record) {
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_deref()))
            .collect();
        self.push(
            record.timestamp,
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
        );
    }

    /// Encodes the batch with base offset 0.
    pub fn build(self) -> Result<Bytes, BatchError> {
        let Some(first_timestamp) = self.first_timestamp else {
            return Err(BatchError::Empty);
        };
        let mut out = match self.compression {
            Compression::None => self.records,
            codec => {
                let body = self.records.get(BATCH_HEADER_BYTES..).unwrap_or_default();
                let compressed = codec.compress(body)?;
                let mut out = Vec::with_capacity(BATCH_HEADER_BYTES + compressed.len());
                out.resize(BATCH_HEADER_BYTES, 0);
                out.extend_from_slice(&compressed);
                out
            }
        };
        let batch_length = out.len() - BATCH_LENGTH_OVERHEAD;
        let full = BatchError::BuilderFull {
            max: i32::MAX as u32,
            max_records: i32::MAX,
        };
        let batch_length = i32::try_from(batch_length).map_err(|_| full)?;
        let mut attributes = self.compression.attribute_bits();
        if self.transactional {
            attributes |= ATTR_TRANSACTIONAL;
        }
        let header = BatchHeader {
            base_offset: 0,
            batch_length,
            partition_leader_epoch: self.partition_leader_epoch,
            magic: MAGIC_V2,
            crc: 0,
            attributes,
            last_offset_delta: (self.next_delta - 1).max(self.cover_delta),
            base_timestamp: first_timestamp,
            max_timestamp: self.max_timestamp,
            producer_id: self.producer_id,
            producer_epoch: self.producer_epoch,
            base_sequence: self.base_sequence,
            records_count: self.n_records,
        };
        if let Some(room) = out.first_chunk_mut::<BATCH_HEADER_BYTES>() {
            *room = header.encode();
        }
        let crc = compute_crc(&out);
        write_at(&mut out, field::CRC, crc.to_be_bytes());
        Ok(Bytes::from(out))
    }
}

const _: () = assert!(ATTR_COMPRESSION_MASK == 0x07);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{BATCH_BYTES_MAX, DECOMPRESSED_BYTES_MAX};
    use proptest::prelude::*;

    fn sample(compression: Compression) -> Bytes {
        let mut builder = BatchBuilder::new(compression).producer(7, 1, 100);
        builder.push(1_000, Some(b"k1"), Some(b"v1"), &[("h", Some(b"x"))]);
        builder.push(1_005, None, Some(b"v2"), &[]);
        builder.push(999, Some(b"k3"), None, &[("a", None), ("b", Some(b""))]);
        builder.build().unwrap()
    }

    #[test]
    fn header_round_trip_and_fields() {
        let bytes = sample(Compression::None);
        let header = validate(&bytes, BATCH_BYTES_MAX).unwrap();
        assert_eq!(header.total_bytes(), bytes.len());
        assert_eq!(header.records_count, 3);
        assert_eq!(header.last_offset_delta, 2);
        assert_eq!(header.base_timestamp, 1_000);
        assert_eq!(header.max_timestamp, 1_005);
        assert_eq!(header.producer_id, 7);
        assert_eq!(header.base_sequence, 100);
        assert_eq!(&header.encode()[..], &bytes[..BATCH_HEADER_BYTES]);
    }

    #[test]
    fn records_round_trip_for_every_codec() {
        for codec in Compression::ALL {
            let batch = Batch::parse(sample(codec), BATCH_BYTES_MAX).unwrap();
            assert_eq!(batch.header().compression().unwrap(), codec);
            let records = batch.records(DECOMPRESSED_BYTES_MAX).unwrap();
            assert_eq!(records.len(), 3, "{codec:?}");
            assert_eq!(records[0].key.as_deref(), Some(&b"k1"[..]));
            assert_eq!(records[0].headers[0].value.as_deref(), Some(&b"x"[..]));
            assert_eq!(records[1].key, None);
            assert_eq!(records[2].value, None);
            assert_eq!(records[2].timestamp, 999);
            assert_eq!(records[2].offset, 2);
            assert_eq!(records[2].headers[0].value, None);
        }
    }

    #[test]
    fn stamp_keeps_the_crc_valid() {
        let mut bytes = sample(Compression::Gzip).to_vec();
        stamp(&mut bytes, 42_000, 9).unwrap();
        let header = validate(&bytes, BATCH_BYTES_MAX).unwrap();
        assert_eq!(header.base_offset, 42_000);
        assert_eq!(header.partition_leader_epoch, 9);
        assert_eq!(header.last_offset(), 42_002);
        let records = Batch::parse(Bytes::from(bytes), BATCH_BYTES_MAX)
            .unwrap()
            .records(DECOMPRESSED_BYTES_MAX)
            .unwrap();
        assert_eq!(records[1].offset, 42_001);
    }

    #[test]
    fn restamping_the_producer_gives_the_batch_a_valid_crc() {
        let built = sample(Compression::Zstd);
        let mut bytes = built.to_vec();
        restamp_producer(&mut bytes, 4_096, 3, 0).unwrap();
        let header = validate(&bytes, BATCH_BYTES_MAX).unwrap();
        assert_eq!(
            (
                header.producer_id,
                header.producer_epoch,
                header.base_sequence
            ),
            (4_096, 3, 0)
        );
        assert_eq!(header.records_count, 3);
        // Everything but the producer fields and the CRC is unchanged.
        assert_eq!(bytes[BATCH_HEADER_BYTES..], built[BATCH_HEADER_BYTES..]);
        assert!(restamp_producer(&mut bytes[..40], 1, 1, 1).is_err());
        let mut cut = built.to_vec();
        cut.truncate(built.len() - 1);
        assert!(restamp_producer(&mut cut, 1, 1, 1).is_err());
    }

    #[test]
    fn every_covered_byte_is_checked() {
        let bytes = sample(Compression::None);
        for pos in field::MAGIC..bytes.len() {
            let mut corrupt = bytes.to_vec();
            corrupt[pos] ^= 0x01;
            assert!(validate(&corrupt, BATCH_BYTES_MAX).is_err(), "byte {pos}");
        }
    }

    #[test]
    fn structural_errors() {
        let bytes = sample(Compression::None);
        assert!(matches!(
            validate(&bytes[..20], BATCH_BYTES_MAX),
            Err(BatchError::Truncated { .. })
        ));
        assert!(matches!(
            validate(&bytes, 64),
            Err(BatchError::TooLarge { max: 64, .. })
        ));
        let mut short = bytes.to_vec();
        short[field::BATCH_LENGTH..][..4].copy_from_slice(&10i32.to_be_bytes());
        assert!(matches!(
            validate(&short, BATCH_BYTES_MAX),
            Err(BatchError::LengthTooSmall { batch_length: 10 })
        ));
        let mut negative = bytes.to_vec();
        negative[field::BATCH_LENGTH..][..4].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(validate(&negative, BATCH_BYTES_MAX).is_err());
        // A count that cannot fit, with a valid CRC: caught before any decoding.
        let mut bomb = bytes.to_vec();
        bomb[field::RECORDS_COUNT..][..4].copy_from_slice(&i32::MAX.to_be_bytes());
        bomb[field::LAST_OFFSET_DELTA..][..4].copy_from_slice(&(i32::MAX - 1).to_be_bytes());
        let crc = compute_crc(&bomb);
        bomb[field::CRC..][..4].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            validate(&bomb, BATCH_BYTES_MAX),
            Err(BatchError::RecordCountTooLarge { .. })
        ));
    }

    #[test]
    fn batches_iterator_splits_and_stops() {
        let mut joined = sample(Compression::None).to_vec();
        joined.extend_from_slice(&sample(Compression::Lz4));
        let partial = sample(Compression::None);
        joined.extend_from_slice(&partial[..30]);
        let batches: Vec<_> = Batches::new(Bytes::from(joined), BATCH_BYTES_MAX).collect();
        assert_eq!(batches.len(), 2);
        assert!(batches.iter().all(Result::is_ok));
    }

    #[test]
    fn empty_builder_is_an_error() {
        assert!(matches!(
            BatchBuilder::new(Compression::None).build(),
            Err(BatchError::Empty)
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let bytes = Bytes::from(bytes);
            for batch in Batches::new(bytes.clone(), BATCH_BYTES_MAX).flatten() {
                let _ = batch.records(1 << 20);
            }
        }

        #[test]
        fn corrupt_records_with_valid_crc_never_panic(
            pos in 61usize..120, value: u8, codec_idx in 0usize..5,
        ) {
            let mut bytes = sample(Compression::ALL[codec_idx]).to_vec();
            if pos < bytes.len() {
                bytes[pos] = value;
                let crc = compute_crc(&bytes);
                bytes[field::CRC..][..4].copy_from_slice(&crc.to_be_bytes());
                if let Ok(batch) = Batch::parse(Bytes::from(bytes), BATCH_BYTES_MAX) {
                    let _ = batch.records(1 << 20);
                }
            }
        }

        #[test]
        fn builder_round_trip(
            records in proptest::collection::vec(
                (any::<i64>(), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
                 proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))),
                1..20),
            codec_idx in 0usize..5,
        ) {
            let mut builder = BatchBuilder::new(Compression::ALL[codec_idx]);
            let base = records[0].0 / 2;
            for (ts, key, value) in &records {
                builder.push(base + ts / 2, key.as_deref(), value.as_deref(), &[("k", value.as_deref())]);
            }
            let batch = Batch::parse(builder.build().unwrap(), BATCH_BYTES_MAX).unwrap();
            let decoded = batch.records(DECOMPRESSED_BYTES_MAX).unwrap();
            prop_assert_eq!(decoded.len(), records.len());
            for (idx, (record, (ts, key, value))) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(record.offset, idx as i64);
                prop_assert_eq!(record.timestamp, base + ts / 2);
                prop_assert_eq!(record.key.as_deref(), key.as_deref());
                prop_assert_eq!(record.value.as_deref(), value.as_deref());
            }
        }
    }
}
