//! Cairn's pure codecs: no I/O, no async runtime.
//!
//! Record batches travel and rest in Kafka's RecordBatch v2 layout, byte for byte, so this crate is
//! shared by the storage engine (which validates and stamps batches), the broker and the clients.
//!
//! ```
//! use cairn_protocol::batch::{Batch, BatchBuilder, Compression};
//!
//! let mut builder = BatchBuilder::new(Compression::Lz4);
//! builder.push(1_700_000_000_000, Some(b"key"), Some(b"value"), &[("trace", Some(b"abc"))]);
//! let bytes = builder.build().unwrap();
//! let batch = Batch::parse(bytes, cairn_protocol::limits::BATCH_BYTES_MAX).unwrap();
//! let records = batch.records(cairn_protocol::limits::DECOMPRESSED_BYTES_MAX).unwrap();
//! assert_eq!(records[0].value.as_deref(), Some(&b"value"[..]));
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod batch;
pub mod compression;
pub mod limits;
pub mod native;
mod offset;
pub mod partitioner;
pub mod varint;

pub use offset::Offset;
