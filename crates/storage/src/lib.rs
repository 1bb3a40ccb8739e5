//! Cairn's storage engine: a partition log of mmap'd segments.
//!
//! A [`Log`] lives in one directory. It appends Kafka RecordBatch v2 batches, assigning offsets,
//! and reads whole batches back as zero-copy `Bytes`. Durability follows a [`FlushPolicy`] with
//! group commit; the first failed write or sync poisons the log. Opening recovers from crashes.
//!
//! ```
//! use cairn_protocol::Offset;
//! use cairn_protocol::batch::{BatchBuilder, Compression};
//! use cairn_storage::{Log, LogConfig};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let log = Log::open(dir.path(), LogConfig::default()).unwrap();
//! let mut builder = BatchBuilder::new(Compression::None);
//! builder.push(1_700_000_000_000, None, Some(b"hello"), &[]);
//! let mut batch = builder.build().unwrap().to_vec();
//! let info = log.append(&mut batch, 0).unwrap();
//! assert_eq!(info.base_offset, Offset(0));
//! log.flush(Offset(1)).unwrap();
//! let fetched = log.read(Offset(0), 1 << 20).unwrap();
//! assert_eq!(fetched.bytes.as_ref(), batch.as_slice());
//! log.close().unwrap();
//! ```
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod checkpoint;
mod compact;
mod config;
mod epoch;
mod error;
mod fs;
mod index;
mod log;
mod mmap;
mod recovery;
mod segment;
mod truncate;

pub use compact::{CompactionReport, KEY_MAP_ENTRY_BYTES};
pub use config::{
    ConfigError, FlushPolicy, LogConfig, PREALLOCATE_BYTES_MAX, ReadMode, SEGMENT_BYTES_MAX,
    SEGMENT_BYTES_MIN,
};
pub use epoch::{EpochEntry, LeaderEpochCache};
pub use error::{AppendError, Fatal, OpenError, ReadError};
pub use fs::{Fs, FsFile, LOCK_FILE_NAME, OpenMode, StdFs};
pub use log::{AppendInfo, Fetched, Log, RecoveryReport, RetentionReport};
pub use mmap::MappedFile;
