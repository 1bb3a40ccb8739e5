//! Response encoding. Every response but Fetch is encoded by the `kafka-protocol` crate (its
//! encoders are safe: they only write what we built). Fetch is encoded here so that record bytes
//! mapped from a segment go to the socket as their own chunks, without a copy; a test checks it
//! byte for byte against `kafka-protocol`'s encoder of the same value at every served version.
//!
//! Tagged fields are written only when set: `kafka-protocol` writes an empty tagged-field section
//! for default values, which older librdkafka (2.0.x, as in kcat 1.7.1) requires.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::FetchResponse;
use kafka_protocol::messages::api_versions_response::{ApiVersion, ApiVersionsResponse};
use kafka_protocol::protocol::{Encodable, HeaderVersion};

use crate::request::Api;

/// A response could not be encoded (a field was set that the version cannot carry, or a value
/// does not fit its encoding): a broker bug, reported instead of sending a malformed frame.
#[derive(Debug, thiserror::Error)]
#[error("encoding {what} v{version}: {message}")]
pub struct EncodeError {
    /// The response type.
    pub what: &'static str,
    /// Its version.
    pub version: i16,
    /// What went wrong.
    pub message: String,
}

/// Encodes a response with its header (v0, or v1 for flexible versions; always v0 for
/// ApiVersions, whose response header is never flexible).
pub fn encode<M: Encodable + HeaderVersion>(
    what: &'static str,
    correlation_id: i32,
    version: i16,
    message: &M,
) -> Result<Vec<u8>, EncodeError> {
    let fail = |err: &dyn std::fmt::Display| EncodeError {
        what,
        version,
        message: err.to_string(),
    };
    let size = message.compute_size(version).map_err(|e| fail(&e))?;
    let mut buf: Vec<u8> = Vec::with_capacity(size + 5);
    buf.put_i32(correlation_id);
    if M::header_version(version) >= 1 {
        buf.put_u8(0); // no tagged fields in the header
    }
    message.encode(&mut buf, version).map_err(|e| fail(&e))?;
    Ok(buf)
}

/// The ApiVersions response listing every served API, at `version` (also used at v0 with error
/// 35 when a client asks for a version this broker does not know).
pub fn api_versions(error_code: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            Api::ALL
                .iter()
                .map(|api| {
                    ApiVersion::default()
                        .with_api_key(api.key)
                        .with_min_version(api.min)
                        .with_max_version(api.max)
                })
                .collect(),
        )
}

/// Encodes a Fetch response (v4..=v12) as chunks written back to back: the framing in small
/// buffers, each partition's records as the `Bytes` it holds (a slice of a segment's map).
pub fn encode_fetch(
    correlation_id: i32,
    version: i16,
    response: &FetchResponse,
) -> Result<Vec<Bytes>, EncodeError> {
    let fail = |message: String| EncodeError {
        what: "FetchResponse",
        version,
        message,
    };
    if !Api::FETCH.serves(version) {
        return Err(fail("version not served".into()));
    }
    let flexible = Api::FETCH.is_flexible(version);
    let mut w = Writer {
        chunks: Vec::new(),
        buf: BytesMut::with_capacity(256),
        flexible,
    };
    w.buf.put_i32(correlation_id);
    if flexible {
        w.buf.put_u8(0);
    }
    w.buf.put_i32(response.throttle_time_ms);
    if version >= 7 {
        w.buf.put_i16(response.error_code);
        w.buf.put_i32(response.session_id);
    }
    w.len(response.responses.len()).map_err(fail)?;
    for topic in &response.responses {
        w.string(topic.topic.as_str()).map_err(fail)?;
        w.len(topic.partitions.len()).map_err(fail)?;
        for p in &topic.partitions {
            w.buf.put_i32(p.partition_index);
            w.buf.put_i16(p.error_code);
            w.buf.put_i64(p.high_watermark);
            w.buf.put_i64(p.last_stable_offset);
            if version >= 5 {
                w.buf.put_i64(p.log_start_offset);
            }
            match &p.aborted_transactions {
                None => w.null(),
                Some(aborted) => {
                    w.len(aborted.len()).map_err(fail)?;
                    for a in aborted {
                        w.buf.put_i64(a.producer_id.0);
                        w.buf.put_i64(a.first_offset);
                        w.tags();
                    }
                }
            }
            if version >= 11 {
                w.buf.put_i32(p.preferred_read_replica.0);
            }
            match &p.records {
                None => w.null(),
                Some(records) => {
                    w.len(records.len()).map_err(fail)?;
                    w.chunk(records.clone());
                }
            }
            w.tags();
        }
        w.tags();
    }
    w.tags();
    Ok(w.finish())
}

struct Writer {
    chunks: Vec<Bytes>,
    buf: BytesMut,
    flexible: bool,
}

impl Writer {
    /// An array count or bytes length: classic `int32` or compact `n + 1`.
    fn len(&mut self, n: usize) -> Result<(), String> {
        if self.flexible {
            let n = u32::try_from(n)
                .ok()
                .and_then(|n| n.checked_add(1))
                .ok_or("length too large")?;
            self.uvarint(n);
        } else {
            self.buf
                .put_i32(i32::try_from(n).map_err(|_| "length too large")?);
        }
        Ok(())
    }

    fn null(&mut self) {
        if self.flexible {
            self.uvarint(0);
        } else {
            self.buf.put_i32(-1);
        }
    }

    fn string(&mut self, s: &str) -> Result<(), String> {
        if self.flexible {
            self.len(s.len())?;
        } else {
            self.buf
                .put_i16(i16::try_from(s.len()).map_err(|_| "string too long")?);
        }
        self.buf.put_slice(s.as_bytes());
        Ok(())
    }

    fn uvarint(&mut self, mut n: u32) {
        while n >= 0x80 {
            self.buf.put_u8((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        self.buf.put_u8(n as u8);
    }

    fn tags(&mut self) {
        if self.flexible {
            self.buf.put_u8(0);
        }
    }

    fn chunk(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        let framing = std::mem::replace(&mut self.buf, BytesMut::with_capacity(64));
        self.chunks.push(framing.freeze());
        self.chunks.push(bytes);
    }

    fn finish(mut self) -> Vec<Bytes> {
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.freeze());
        }
        self.chunks
    }
}
