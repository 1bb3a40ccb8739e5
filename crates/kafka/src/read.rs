//! A bounded reader for Kafka request bodies: classic (`int16`/`int32` lengths) and flexible
//! ("compact" unsigned-varint lengths, tagged fields) encodings.
//!
//! Every length and count is checked against the bytes left before anything is allocated: an
//! array of `n` elements whose smallest encoding is `m` bytes needs `n * m` bytes, so a count the
//! frame cannot hold is an error, never a `Vec::with_capacity(n)`. Byte fields are zero-copy
//! slices of the frame. Tagged fields are skipped without allocating.

use bytes::{Buf, Bytes};

/// Why a request body did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {problem}")]
pub struct DecodeError {
    /// The field being read.
    pub what: &'static str,
    /// What was wrong with it.
    pub problem: String,
}

pub(crate) fn error(what: &'static str, problem: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        problem: problem.into(),
    }
}

/// Reads one request body. `flexible` selects compact lengths and tagged fields.
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Bytes,
    flexible: bool,
}

impl Reader {
    pub(crate) fn new(buf: Bytes, flexible: bool) -> Reader {
        Reader { buf, flexible }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.remaining()
    }

    pub(crate) fn flexible(&self) -> bool {
        self.flexible
    }

    fn need(&self, what: &'static str, n: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            return Err(error(
                what,
                format!("needs {n} bytes, {} left", self.buf.remaining()),
            ));
        }
        Ok(())
    }

    pub(crate) fn i8(&mut self, what: &'static str) -> Result<i8, DecodeError> {
        self.need(what, 1)?;
        Ok(self.buf.get_i8())
    }

    pub(crate) fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        Ok(self.i8(what)? != 0)
    }

    pub(crate) fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.need(what, 2)?;
        Ok(self.buf.get_i16())
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(what, 4)?;
        Ok(self.buf.get_i32())
    }

    pub(crate) fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(what, 8)?;
        Ok(self.buf.get_i64())
    }

    /// An unsigned varint of at most 5 bytes (32 bits).
    pub(crate) fn uvarint(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..5 {
            self.need(what, 1)?;
            let byte = self.buf.get_u8();
            if i == 4 && byte > 0x0f {
                return Err(error(what, "varint longer than 32 bits"));
            }
            value |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(error(what, "varint longer than 5 bytes"))
    }

    /// A length prefix: `int16` (classic strings) or compact varint (`n + 1`, 0 = null).
    /// `None` is null.
    fn string_len(&mut self, what: &'static str) -> Result<Option<usize>, DecodeError> {
        if self.flexible {
            match self.uvarint(what)? {
                0 => Ok(None),
                n => Ok(Some(n as usize - 1)),
            }
        } else {
            match self.i16(what)? {
                -1 => Ok(None),
                n if n < 0 => Err(error(what, format!("negative length {n}"))),
                n => Ok(Some(n as usize)),
            }
        }
    }

    /// A bytes length or array count: `int32` (-1 null) or compact varint (`n + 1`, 0 null).
    fn length32(&mut self, what: &'static str, kind: &str) -> Result<Option<usize>, DecodeError> {
        if self.flexible {
            return Ok(match self.uvarint(what)? {
                0 => None,
                n => Some(n as usize - 1),
            });
        }
        match self.i32(what)? {
            -1 => Ok(None),
            n if n < 0 => Err(error(what, format!("negative {kind} {n}"))),
            n => Ok(Some(n as usize)),
        }
    }

    fn take(&mut self, what: &'static str, n: usize) -> Result<Bytes, DecodeError> {
        self.need(what, n)?;
        Ok(self.buf.split_to(n))
    }

    pub(crate) fn nullable_string(
        &mut self,
        what: &'static str,
    ) -> Result<Option<String>, DecodeError> {
        let Some(len) = self.string_len(what)? else {
            return Ok(None);
        };
        let bytes = self.take(what, len)?;
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| error(what, "not UTF-8"))
    }

    pub(crate) fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        self.nullable_string(what)?
            .ok_or_else(|| error(what, "null where a string is required"))
    }

    /// A classic-only `string` in a flexible request (the request header's client id).
    pub(crate) fn classic_nullable_string(
        &mut self,
        what: &'static str,
    ) -> Result<Option<String>, DecodeError> {
        let flexible = std::mem::replace(&mut self.flexible, false);
        let result = self.nullable_string(what);
        self.flexible = flexible;
        result
    }

    /// `bytes`/`records`: `int32` length or compact varint; zero-copy.
    pub(crate) fn nullable_bytes(
        &mut self,
        what: &'static str,
    ) -> Result<Option<Bytes>, DecodeError> {
        match self.length32(what, "length")? {
            None => Ok(None),
            Some(len) => self.take(what, len).map(Some),
        }
    }

    /// An array whose elements each take at least `min_element_bytes` on the wire; `None` is
    /// null. The count is checked against the bytes left before any element is read.
    pub(crate) fn nullable_array<T>(
        &mut self,
        what: &'static str,
        min_element_bytes: usize,
        mut element: impl FnMut(&mut Reader) -> Result<T, DecodeError>,
    ) -> Result<Option<Vec<T>>, DecodeError> {
        let Some(count) = self.length32(what, "count")? else {
            return Ok(None);
        };
        let min = min_element_bytes.max(1);
        if count > self.remaining() / min {
            return Err(error(
                what,
                format!(
                    "count {count} needs at least {} bytes, {} left",
                    count.saturating_mul(min),
                    self.remaining()
                ),
            ));
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(element(self)?);
        }
        Ok(Some(items))
    }

    /// A non-nullable array (null reads as empty, as Kafka's own decoders do for most fields).
    pub(crate) fn array<T>(
        &mut self,
        what: &'static str,
        min_element_bytes: usize,
        element: impl FnMut(&mut Reader) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        Ok(self
            .nullable_array(what, min_element_bytes, element)?
            .unwrap_or_default())
    }

    /// Skips a tagged-field section (flexible versions only): each field's size is checked
    /// against the bytes left, nothing is allocated.
    pub(crate) fn tagged_fields(&mut self, what: &'static str) -> Result<(), DecodeError> {
        if !self.flexible {
            return Ok(());
        }
        let count = self.uvarint(what)?;
        // Each field takes at least two bytes (tag and size).
        if count as usize > self.remaining() / 2 {
            return Err(error(
                what,
                format!("{count} tagged fields, {} bytes left", self.remaining()),
            ));
        }
        let mut last_tag: Option<u32> = None;
        for _ in 0..count {
            let tag = self.uvarint(what)?;
            if last_tag.is_some_and(|last| tag <= last) {
                return Err(error(what, "tagged fields out of order"));
            }
            last_tag = Some(tag);
            let size = self.uvarint(what)? as usize;
            self.need(what, size)?;
            self.buf.advance(size);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counts_beyond_the_bytes_left_are_refused_before_allocating() {
        let mut r = Reader::new(Bytes::from_static(&[0x7f, 0xff, 0xff, 0xff, 0, 0]), false);
        let err = r.array("topics", 2, |r| r.i16("x")).unwrap_err();
        assert!(err.problem.contains("count 2147483647"), "{err}");
        // Compact: 2^32-2 elements.
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f]), true);
        assert!(r.array("topics", 1, |r| r.i8("x")).is_err());
    }

    #[test]
    fn varints_are_bounded_to_32_bits() {
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x7f]), true);
        assert!(r.uvarint("v").is_err());
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f]), true);
        assert_eq!(r.uvarint("v").unwrap(), u32::MAX);
        let mut r = Reader::new(Bytes::from_static(&[0x80, 0x80]), true);
        assert!(r.uvarint("v").is_err());
    }

    #[test]
    fn tagged_field_bombs_are_refused() {
        // 2^32-1 fields in three bytes.
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0]), true);
        assert!(r.tagged_fields("t").is_err());
        // One field claiming 2^32-1 bytes.
        let mut r = Reader::new(
            Bytes::from_static(&[1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            true,
        );
        assert!(r.tagged_fields("t").is_err());
        // Two well-formed fields are skipped.
        let mut r = Reader::new(Bytes::from_static(&[2, 0, 1, 9, 3, 0]), true);
        r.tagged_fields("t").unwrap();
        assert_eq!(r.remaining(), 0);
    }
}
