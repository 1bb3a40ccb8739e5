//! Golden vectors: RecordBatch v2 batches written by kafka-python's record builder (see
//! `protocol/vectors/make_vectors.py`). Our codec must decode each to the records the generator
//! recorded, and re-encode the uncompressed ones byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;

use bytes::Bytes;
use cairn_protocol::batch::{Batch, BatchBuilder, Compression, Record, validate};
use cairn_protocol::limits::{BATCH_BYTES_MAX, DECOMPRESSED_BYTES_MAX};
use serde_json::Value;

const VECTORS: &[(&str, Compression)] = &[
    ("none", Compression::None),
    ("none-idempotent", Compression::None),
    ("gzip", Compression::Gzip),
    ("snappy", Compression::Snappy),
    ("lz4", Compression::Lz4),
    ("zstd", Compression::Zstd),
    ("zstd-transactional", Compression::Zstd),
];

fn vectors_dir() -> PathBuf {
    manifest_dir().join("../../protocol/vectors")
}

fn load(name: &str) -> (Bytes, Value) {
    let dir = vectors_dir();
    let bin = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
    let json = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
    (Bytes::from(bin), serde_json::from_str(&json).unwrap())
}

fn hex(value: &Value) -> Option<Vec<u8>> {
    let text = value.as_str()?;
    Some(
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect(),
    )
}

fn check_records(name: &str, records: &[Record], expect: &Value) {
    let expect = expect["records"].as_array().unwrap();
    assert_eq!(records.len(), expect.len(), "{name}");
    for (record, want) in records.iter().zip(expect) {
        let at = format!("{name} offset {}", record.offset);
        assert_eq!(record.offset, want["offset"].as_i64().unwrap(), "{at}");
        assert_eq!(
            record.timestamp,
            want["timestamp"].as_i64().unwrap(),
            "{at}"
        );
        assert_eq!(
            record.key.as_deref().map(<[u8]>::to_vec),
            hex(&want["key"]),
            "{at}"
        );
        assert_eq!(
            record.value.as_deref().map(<[u8]>::to_vec),
            hex(&want["value"]),
            "{at}"
        );
        let headers = want["headers"].as_array().unwrap();
        assert_eq!(record.headers.len(), headers.len(), "{at}");
        for (got, want) in record.headers.iter().zip(headers) {
            assert_eq!(got.key, want[0].as_str().unwrap(), "{at}");
            assert_eq!(
                got.value.as_deref().map(<[u8]>::to_vec),
                hex(&want[1]),
                "{at}"
            );
        }
    }
}

#[test]
fn kafka_python_batches_decode() {
    for &(name, codec) in VECTORS {
        let (bytes, expect) = load(name);
        let header = validate(&bytes, BATCH_BYTES_MAX).unwrap();
        assert_eq!(header.total_bytes(), bytes.len(), "{name}");
        assert_eq!(header.compression().unwrap(), codec, "{name}");
        assert_eq!(header.producer_id, expect["producer_id"].as_i64().unwrap());
        assert_eq!(
            i64::from(header.producer_epoch),
            expect["producer_epoch"].as_i64().unwrap()
        );
        assert_eq!(
            i64::from(header.base_sequence),
            expect["base_sequence"].as_i64().unwrap()
        );
        assert_eq!(
            header.is_transactional(),
            expect["transactional"].as_bool().unwrap()
        );
        let batch = Batch::parse(bytes, BATCH_BYTES_MAX).unwrap();
        let records = batch.records(DECOMPRESSED_BYTES_MAX).unwrap();
        check_records(name, &records, &expect);
    }
}

#[test]
fn uncompressed_batches_re_encode_byte_identically() {
    for &(name, codec) in VECTORS.iter().filter(|(_, c)| *c == Compression::None) {
        let (bytes, _) = load(name);
        let batch = Batch::parse(bytes.clone(), BATCH_BYTES_MAX).unwrap();
        let header = *batch.header();
        let mut builder = BatchBuilder::new(codec)
            .producer(
                header.producer_id,
                header.producer_epoch,
                header.base_sequence,
            )
            .partition_leader_epoch(header.partition_leader_epoch)
            .transactional(header.is_transactional());
        for record in batch.records(DECOMPRESSED_BYTES_MAX).unwrap() {
            builder.push_record(&record);
        }
        assert_eq!(builder.build().unwrap(), bytes, "{name}");
    }
}

#[test]
fn compressed_batches_re_encode_to_the_same_records() {
    for &(name, codec) in VECTORS {
        let (bytes, expect) = load(name);
        let batch = Batch::parse(bytes, BATCH_BYTES_MAX).unwrap();
        let mut builder = BatchBuilder::new(codec);
        for record in batch.records(DECOMPRESSED_BYTES_MAX).unwrap() {
            builder.push_record(&record);
        }
        let rebuilt = Batch::parse(builder.build().unwrap(), BATCH_BYTES_MAX).unwrap();
        check_records(
            name,
            &rebuilt.records(DECOMPRESSED_BYTES_MAX).unwrap(),
            &expect,
        );
    }
}

/// This package's directory, as the test runner says at run time (a build cache shared by
/// clones at different paths may hold a binary compiled in another clone, with that clone's
/// path baked in by `env!`).
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
