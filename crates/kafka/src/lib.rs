//! The Apache Kafka wire protocol, as Cairn serves it.
//!
//! Requests are decoded by [`request::decode`], our own bounded decoder: every count and length
//! is checked against the bytes left before allocating (the `kafka-protocol` crate's request
//! decoders call `Vec::with_capacity` with counts straight off the wire, so a few bytes can ask
//! for gigabytes; see `docs/kafka-compatibility.md`). Responses are built as `kafka-protocol`
//! messages and encoded by [`response::encode`], except Fetch, encoded zero-copy by
//! [`response::encode_fetch`]. Record batches pass through as bytes in both directions.
#![forbid(unsafe_code)]

mod read;
pub mod request;
pub mod response;

pub use kafka_protocol as kp;
pub use read::DecodeError;
pub use request::{Api, Decoded, Request, RequestError, RequestHeader};
