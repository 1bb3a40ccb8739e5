//! Zig-zag variable-length integers, as in Kafka (and protobuf's `sint32` / `sint64`).

use thiserror::Error;

/// A varint that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum VarintError {
    /// The buffer ended inside the varint.
    #[error("buffer ended inside a varint")]
    Truncated,
    /// More continuation bytes than the type can hold.
    #[error("varint longer than {max_bytes} bytes")]
    TooLong {
        /// The most bytes this varint type may take.
        max_bytes: usize,
    },
}

/// Appends `value` as a zig-zag varint (at most 5 bytes).
pub fn put_varint(out: &mut Vec<u8>, value: i32) {
    put_unsigned(out, u64::from(((value << 1) ^ (value >> 31)) as u32));
}

/// Appends `value` as a zig-zag varlong (at most 10 bytes).
pub fn put_varlong(out: &mut Vec<u8>, value: i64) {
    put_unsigned(out, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_unsigned(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Bytes `put_varint(value)` takes.
pub fn varint_len(value: i32) -> usize {
    unsigned_len(u64::from(((value << 1) ^ (value >> 31)) as u32))
}

/// Bytes `put_varlong(value)` takes.
pub fn varlong_len(value: i64) -> usize {
    unsigned_len(((value << 1) ^ (value >> 63)) as u64)
}

fn unsigned_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads a zig-zag varint from the front of `buf`, advancing it.
pub fn get_varint(buf: &mut &[u8]) -> Result<i32, VarintError> {
    let raw = get_unsigned(buf, 5)?;
    let raw = u32::try_from(raw).map_err(|_| VarintError::TooLong { max_bytes: 5 })?;
    Ok(((raw >> 1) as i32) ^ -((raw & 1) as i32))
}

/// Reads a zig-zag varlong from the front of `buf`, advancing it.
pub fn get_varlong(buf: &mut &[u8]) -> Result<i64, VarintError> {
    let raw = get_unsigned(buf, 10)?;
    Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
}

fn get_unsigned(buf: &mut &[u8], max_bytes: usize) -> Result<u64, VarintError> {
    let mut value: u64 = 0;
    for (idx, &byte) in buf.iter().enumerate() {
        if idx >= max_bytes {
            return Err(VarintError::TooLong { max_bytes });
        }
        let shift = 7 * idx as u32;
        let bits = u64::from(byte & 0x7f);
        // The tenth byte of a varlong may only carry the top bit of a u64.
        if shift == 63 && bits > 1 {
            return Err(VarintError::TooLong { max_bytes });
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            *buf = buf.get(idx + 1..).unwrap_or_default();
            return Ok(value);
        }
    }
    Err(VarintError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encodings() {
        // From Kafka's ByteUtilsTest.
        let cases: &[(i32, &[u8])] = &[
            (0, &[0x00]),
            (-1, &[0x01]),
            (1, &[0x02]),
            (63, &[0x7e]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
            (i32::MAX, &[0xfe, 0xff, 0xff, 0xff, 0x0f]),
            (i32::MIN, &[0xff, 0xff, 0xff, 0xff, 0x0f]),
        ];
        for &(value, bytes) in cases {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out, bytes, "encoding {value}");
            assert_eq!(varint_len(value), bytes.len());
            let mut buf = bytes;
            assert_eq!(get_varint(&mut buf), Ok(value));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn rejects_overlong_and_truncated() {
        let mut six: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(
            get_varint(&mut six),
            Err(VarintError::TooLong { max_bytes: 5 })
        );
        let mut too_big: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0x1f];
        assert_eq!(
            get_varint(&mut too_big),
            Err(VarintError::TooLong { max_bytes: 5 })
        );
        let mut truncated: &[u8] = &[0x80, 0x80];
        assert_eq!(get_varint(&mut truncated), Err(VarintError::Truncated));
        let mut eleven: &[u8] = &[0xff; 11];
        assert_eq!(
            get_varlong(&mut eleven),
            Err(VarintError::TooLong { max_bytes: 10 })
        );
    }

    proptest! {
        #[test]
        fn varint_round_trip(value: i32) {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            prop_assert_eq!(out.len(), varint_len(value));
            let mut buf = &out[..];
            prop_assert_eq!(get_varint(&mut buf), Ok(value));
        }

        #[test]
        fn varlong_round_trip(value: i64) {
            let mut out = Vec::new();
            put_varlong(&mut out, value);
            prop_assert_eq!(out.len(), varlong_len(value));
            let mut buf = &out[..];
            prop_assert_eq!(get_varlong(&mut buf), Ok(value));
        }
    }
}
