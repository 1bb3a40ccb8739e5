//! Decoders never allocate more than their input justifies. A counting global allocator records
//! the largest single allocation while every native request decoder and the RecordBatch codec run
//! over random and adversarial inputs (array counts of 2^32-1, lengths past the input, bombs); the
//! test asserts it stays within a small multiple of the input size (plus the explicit decompression
//! cap). This is the check that catches `Vec::with_capacity(count_from_the_wire)`.
//!
//! One test function runs every case in sequence, so the allocator's record belongs to it alone.
#![allow(unsafe_code)] // the counting allocator; see its SAFETY comments
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use cairn_protocol::batch::{self, Batch, BatchBuilder, Compression};
use cairn_protocol::native::{ApiKey, Request};

#[path = "support/counting.rs"]
mod counting;
use counting::{Counting, Rng, hostile, largest_allocation};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SLACK_BYTES: usize = 64 * 1024;
const DECOMPRESSED_CAP: usize = 1 << 20;

#[test]
fn decoders_allocate_in_proportion_to_their_input() {
    let mut rng = Rng(0x5eed_cafe);
    // Native requests: every API, random and hostile bodies.
    for round in 0..4000 {
        let body = hostile(&mut rng);
        for api in ApiKey::ALL {
            let input = Bytes::from(body.clone());
            let largest = largest_allocation(|| {
                let _ = Request::decode_body(api, input);
            });
            assert!(
                largest <= SLACK_BYTES + 64 * body.len(),
                "round {round}: {api:?} allocated {largest} bytes for {} input bytes",
                body.len()
            );
        }
    }
    // Record batches: structurally valid headers with a fixed-up CRC around hostile records, for
    // every codec, so record decoding (and decompression) is reached.
    for round in 0..4000 {
        let codec = Compression::ALL[(rng.next() % 5) as usize];
        let mut builder = BatchBuilder::new(codec);
        for _ in 0..(1 + rng.next() % 4) {
            let n = (rng.next() % 64) as usize;
            builder.push(0, None, Some(&rng.bytes(n)), &[]);
        }
        let mut bytes = builder.build().unwrap().to_vec();
        let records_len = bytes.len() - batch::BATCH_HEADER_BYTES;
        let garbage = hostile(&mut rng);
        for (i, b) in garbage.iter().take(records_len).enumerate() {
            if rng.next().is_multiple_of(3) {
                bytes[batch::BATCH_HEADER_BYTES + i] = *b;
            }
        }
        if rng.next().is_multiple_of(2) {
            // A record count claiming far more than is there.
            bytes[batch::field::RECORDS_COUNT..][..4].copy_from_slice(&i32::MAX.to_be_bytes());
            bytes[batch::field::LAST_OFFSET_DELTA..][..4]
                .copy_from_slice(&(i32::MAX - 1).to_be_bytes());
        }
        let crc = batch::compute_crc(&bytes);
        bytes[batch::field::CRC..][..4].copy_from_slice(&crc.to_be_bytes());
        let input_len = bytes.len();
        let input = Bytes::from(bytes);
        let largest = largest_allocation(|| {
            if let Ok(batch) = Batch::parse(input, u32::MAX) {
                let _ = batch.records(DECOMPRESSED_CAP);
            }
        });
        // Decompression may fill up to its cap (and a Vec doubling past it); decoding records
        // costs at most one `Record` per 7 input bytes.
        assert!(
            largest <= SLACK_BYTES + 2 * DECOMPRESSED_CAP + 32 * input_len,
            "round {round}: {codec:?} batch allocated {largest} bytes for {input_len} input bytes"
        );
    }
}
