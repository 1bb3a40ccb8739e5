//! Test-only helpers for Cairn: a fault-injecting file system and batch generators.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod fault_fs;

pub use fault_fs::{FaultFs, Faults};

use cairn_protocol::batch::{BatchBuilder, Compression};

/// A batch of `n_records` records whose values are `value_bytes` long and start with the record's
/// tag (`tag`, `tag + 1`, ...), so a reader can tell exactly which records it got.
pub fn tagged_batch(tag: u64, n_records: usize, value_bytes: usize, timestamp: i64) -> Vec<u8> {
    let mut builder = BatchBuilder::new(Compression::None);
    for idx in 0..n_records as u64 {
        let value = tagged_value(tag + idx, value_bytes);
        let key = (tag + idx).to_be_bytes();
        builder.push(timestamp, Some(&key), Some(&value), &[]);
    }
    builder.build().expect("a non-empty batch builds").to_vec()
}

/// The value [`tagged_batch`] gives record `tag`.
pub fn tagged_value(tag: u64, value_bytes: usize) -> Vec<u8> {
    let mut value = vec![0u8; value_bytes.max(8)];
    value[..8].copy_from_slice(&tag.to_be_bytes());
    for (idx, byte) in value.iter_mut().enumerate().skip(8) {
        *byte = (tag as usize).wrapping_mul(31).wrapping_add(idx) as u8;
    }
    value
}
