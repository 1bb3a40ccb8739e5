//! Helpers shared by the storage tests.

use bytes::Bytes;
use cairn_protocol::Offset;
use cairn_protocol::batch::{Batch, Batches};
use cairn_protocol::limits::{BATCH_BYTES_MAX, DECOMPRESSED_BYTES_MAX};
use cairn_storage::Log;

/// Every batch from `from` to the log end, validated.
pub fn read_all(log: &Log, from: Offset) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let fetched = log.read(next, 1 << 20).unwrap();
        if fetched.bytes.is_empty() {
            return out;
        }
        for batch in Batches::new(fetched.bytes, BATCH_BYTES_MAX) {
            let batch = batch.expect("the log returned a corrupt batch");
            next = Offset(batch.header().last_offset() as u64 + 1);
            out.push(batch);
        }
    }
}

/// (offset, value) of every record from `from` to the log end.
pub fn read_values(log: &Log, from: Offset) -> Vec<(u64, Bytes)> {
    read_all(log, from)
        .iter()
        .flat_map(|b| b.records(DECOMPRESSED_BYTES_MAX).unwrap())
        .map(|r| (r.offset as u64, r.value.unwrap_or_default()))
        .collect()
}
