//! Helpers shared by Cairn's benchmarks.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use cairn_protocol::batch::{BatchBuilder, Compression};

/// Bytes of each record's value in the standard workload.
pub const RECORD_BYTES: usize = 1024;
/// Bytes of each batch in the standard workload.
pub const BATCH_BYTES: usize = 64 * 1024;

/// A batch of ~1 KiB records filling ~64 KiB, uncompressed, as a producer would send it.
pub fn standard_batch() -> Vec<u8> {
    let mut builder = BatchBuilder::new(Compression::None);
    let value: Vec<u8> = (0..RECORD_BYTES - 40).map(|i| (i * 7) as u8).collect();
    let mut idx = 0u64;
    while builder.uncompressed_bytes() + RECORD_BYTES <= BATCH_BYTES {
        builder.push(
            1_700_000_000_000 + idx as i64,
            Some(&idx.to_be_bytes()),
            Some(&value),
            &[],
        );
        idx += 1;
    }
    builder.build().unwrap().to_vec()
}

/// Whether to run with small data sets (CI's smoke run: `CAIRN_BENCH_QUICK=1`).
pub fn quick() -> bool {
    std::env::var_os("CAIRN_BENCH_QUICK").is_some()
}
