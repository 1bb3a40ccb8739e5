//! The client's error type: what went wrong, and whether trying again may help.

use cairn_protocol::native::{DecodeError, ErrorCode};
use thiserror::Error;

/// A client operation failed.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The connection could not be made or broke.
    #[error("connection to {addr}: {message}")]
    Connection {
        /// The broker address.
        addr: String,
        /// The OS error or reason.
        message: String,
    },
    /// The broker answered with an error.
    #[error("{context}: {code}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Broker {
        /// What was being done (`produce to orders-3`).
        context: String,
        /// The protocol error.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },
    /// The broker's response could not be decoded.
    #[error("malformed response: {0}")]
    Decode(#[from] DecodeError),
    /// The operation did not finish in time.
    #[error("{0} timed out")]
    Timeout(String),
    /// A caller mistake (unknown topic in an assignment, bad argument).
    #[error("{0}")]
    InvalidArgument(String),
    /// Records from the broker failed validation (CRC, lengths, decompression).
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The producer or consumer was closed.
    #[error("client closed")]
    Closed,
}

impl ClientError {
    /// Whether retrying the same operation may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Connection { .. } | ClientError::Timeout(_) => true,
            ClientError::Broker { code, .. } => code.is_retriable(),
            ClientError::Decode(_)
            | ClientError::Corrupt(_)
            | ClientError::InvalidArgument(_)
            | ClientError::Closed => false,
        }
    }

    /// The broker's error code, if the broker answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A broker error: what was being done, the code, the broker's message.
    pub fn broker(context: impl Into<String>, code: i16, message: String) -> ClientError {
        ClientError::Broker {
            context: context.into(),
            code: ErrorCode(code),
            message,
        }
    }
}
