//! One small error enum per operation. [`Fatal`] is the part every operation shares: the log is
//! unusable (an I/O failure poisoned it) and must be reopened.

use std::io;
use std::path::PathBuf;

use cairn_protocol::Offset;
use cairn_protocol::batch::BatchError;
use thiserror::Error;

use crate::config::ConfigError;

/// The log can no longer be trusted: a write or sync failed. Nothing more is acknowledged until
/// the log is reopened (and recovered from what is really on disk).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Fatal {
    /// This operation's I/O failed; the log is now poisoned.
    #[error("{op} failed on {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An earlier I/O failure poisoned the log.
    #[error("log {} is offline after an earlier failure: {cause}", dir.display())]
    PreviousIo {
        /// The log's directory.
        dir: PathBuf,
        /// The first failure.
        cause: String,
    },
}

/// Opening (and recovering) a log failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another process (or another `Log` in this one) holds the directory.
    #[error("log directory {} is locked by another process", dir.display())]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// The configuration is outside its limits.
    #[error("invalid log configuration")]
    Config(#[from] ConfigError),
    /// The files cannot be read or repaired.
    #[error("{op} failed on {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl From<Fatal> for OpenError {
    fn from(fatal: Fatal) -> Self {
        match fatal {
            Fatal::Io { op, path, source } => OpenError::Io { op, path, source },
            Fatal::PreviousIo { dir, cause } => OpenError::Io {
                op: "recover",
                path: dir,
                source: io::Error::other(cause),
            },
        }
    }
}

/// An append was refused. Everything but `Fatal` leaves the log as it was.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The bytes are not a valid batch.
    #[error("invalid record batch")]
    InvalidBatch(#[from] BatchError),
    /// A producer batch must number its records 0..n without gaps.
    #[error(
        "batch declares {records_count} records but a last offset delta of {last_offset_delta}"
    )]
    RecordCountMismatch {
        /// `recordsCount`.
        records_count: i32,
        /// `lastOffsetDelta`.
        last_offset_delta: i32,
    },
    /// A replicated batch does not continue the log.
    #[error("batch base offset {got} does not continue the log end offset {log_end}")]
    OffsetNotMonotonic {
        /// The batch's base offset.
        got: i64,
        /// The log end offset.
        log_end: Offset,
    },
    /// The appender's leader epoch is older than one the log already has.
    #[error("leader epoch {epoch} is older than the log's latest epoch {latest}")]
    StaleLeaderEpoch {
        /// The epoch given.
        epoch: u32,
        /// The newest epoch in the log.
        latest: u32,
    },
    /// Offsets would pass `i64::MAX`, or the epoch `i32::MAX`.
    #[error("offset or leader epoch overflow")]
    Overflow,
    /// An empty append.
    #[error("no record batch to append")]
    Empty,
    /// The file system had no room for the batches: nothing was written and the log stays
    /// usable (the append may be retried once space is freed).
    #[error("no space left to append to {path}")]
    NoSpace {
        /// The segment that could not grow.
        path: PathBuf,
        /// The error (ENOSPC, EDQUOT).
        #[source]
        source: io::Error,
    },
    /// The log is unusable.
    #[error(transparent)]
    Fatal(#[from] Fatal),
}

/// A read was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The offset is not in `log_start..=log_end`.
    #[error("offset {offset} is out of range {log_start}..={log_end}")]
    OffsetOutOfRange {
        /// The requested offset.
        offset: Offset,
        /// First offset in the log.
        log_start: Offset,
        /// Next offset to be written.
        log_end: Offset,
    },
    /// The log is unusable.
    #[error(transparent)]
    Fatal(#[from] Fatal),
}
