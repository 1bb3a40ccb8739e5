//! Helpers shared by the storage tests.

use bytes::Bytes;
use cairn_protocol::Offset;
use cairn_protocol::batch::{Batch, Batches};
use cairn_protocol::limits::{BATCH_BYTES_MAX, DECOMPRESSED_BYTES_MAX};
use cairn_storage::Log;

/// Every batch from `from` to the log end, validated.
pub fn read_all(log: &Log, from: Offset) -> Vec<Batch> {
    try_read_all(log, from).unwrap()
}

/// Every batch from `from` to the log end, or what went wrong reading or validating them.
pub fn try_read_all(log: &Log, from: Offset) -> Result<Vec<Batch>, String> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let fetched = log
            .read(next, 1 << 20)
            .map_err(|e| format!("read at {next}: {e}"))?;
        if fetched.bytes.is_empty() {
            return Ok(out);
        }
        for batch in Batches::new(fetched.bytes, BATCH_BYTES_MAX) {
            let batch = batch.map_err(|e| format!("the log returned a corrupt batch: {e}"))?;
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

/// XORs the byte at `pos` of a real file with `xor`.
pub fn flip_byte(path: &std::path::Path, pos: u64, xor: u8) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, pos).unwrap();
    file.write_all_at(&[byte[0] ^ xor], pos).unwrap();
}
