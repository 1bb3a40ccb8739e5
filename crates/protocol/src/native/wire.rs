//! Primitive wire types of the native protocol and the `Wire` trait every message implements.
//!
//! All integers are big-endian. `string` is a `u16` length then UTF-8; `bytes` is a `u32` length
//! then raw bytes; `array<T>` is a `u32` count then the items. Every length and count is checked
//! against the bytes remaining (and, for arrays, against the smallest possible item) before
//! anything is allocated, so a hostile frame cannot make the decoder allocate more than the frame.

use bytes::{Buf, BufMut, Bytes};
use thiserror::Error;

/// Why bytes could not be decoded as a message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message ended early.
    #[error("{field}: need {needed} more bytes, {remaining} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes it needed.
        needed: usize,
        /// Bytes left.
        remaining: usize,
    },
    /// An array count larger than the remaining bytes could hold.
    #[error("{field}: count {count} cannot fit in {remaining} bytes")]
    CountTooLarge {
        /// The array.
        field: &'static str,
        /// The count read.
        count: u32,
        /// Bytes left.
        remaining: usize,
    },
    /// A string that is not UTF-8.
    #[error("{field}: not valid UTF-8")]
    Utf8 {
        /// The field.
        field: &'static str,
    },
    /// Bytes left over after the message.
    #[error("{n_bytes} unexpected bytes after the message")]
    TrailingBytes {
        /// How many.
        n_bytes: usize,
    },
    /// A field holds a value the protocol does not allow.
    #[error("{field}: invalid value {value}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// The value.
        value: i64,
    },
}

/// Bytes fields at least this large are passed by reference in chunked encoding, not copied.
pub const CHUNK_BYTES_MIN: usize = 16 * 1024;

/// An encoding as a list of chunks: small fields are copied into a buffer, large `Bytes` fields
/// (fetched records, sliced from a memory map) are kept as they are, so a response is written to
/// the socket without copying its records.
#[derive(Debug, Default)]
pub struct Chunks {
    done: Vec<Bytes>,
    current: Vec<u8>,
}

impl Chunks {
    /// The buffer small fields are written to.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.current
    }

    /// Appends `bytes`, by reference if large.
    pub fn push_bytes(&mut self, bytes: &Bytes) {
        if bytes.len() < CHUNK_BYTES_MIN {
            self.current.extend_from_slice(bytes);
        } else {
            if !self.current.is_empty() {
                self.done
                    .push(Bytes::from(std::mem::take(&mut self.current)));
            }
            self.done.push(bytes.clone());
        }
    }

    /// The chunks, in order.
    pub fn finish(mut self) -> Vec<Bytes> {
        if !self.current.is_empty() {
            self.done.push(Bytes::from(self.current));
        }
        self.done
    }
}

/// A value with a wire encoding.
pub trait Wire: Sized {
    /// The fewest bytes any value of this type takes; bounds array counts before allocation.
    const MIN_BYTES: usize;
    /// Appends the encoding to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// Appends the encoding to `out` as chunks (large byte fields by reference).
    fn encode_chunks(&self, out: &mut Chunks) {
        self.encode(out.buf());
    }
    /// Decodes one value from the front of `buf`, advancing it.
    fn decode(buf: &mut Bytes, field: &'static str) -> Result<Self, DecodeError>;
}

fn need(buf: &Bytes, n: usize, field: &'static str) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        return Err(DecodeError::Truncated {
            field,
            needed: n,
            remaining: buf.remaining(),
        });
    }
    Ok(())
}

macro_rules! int_wire {
    ($($ty:ty => $put:ident, $get:ident;)*) => {$(
        impl Wire for $ty {
            const MIN_BYTES: usize = std::mem::size_of::<$ty>();
            fn encode(&self, out: &mut Vec<u8>) {
                out.$put(*self);
            }
            fn decode(buf: &mut Bytes, field: &'static str) -> Result<Self, DecodeError> {
                need(buf, Self::MIN_BYTES, field)?;
                Ok(buf.$get())
            }
        }
    )*};
}

int_wire! {
    u8 => put_u8, get_u8;
    i8 => put_i8, get_i8;
    u16 => put_u16, get_u16;
    i16 => put_i16, get_i16;
    u32 => put_u32, get_u32;
    i32 => put_i32, get_i32;
    u64 => put_u64, get_u64;
    i64 => put_i64, get_i64;
}

impl Wire for bool {
    const MIN_BYTES: usize = 1;
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(u8::from(*self));
    }
    fn decode(buf: &mut Bytes, field: &'static str) -> Result<Self, DecodeError> {
        match u8::decode(buf, field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::InvalidValue {
                field,
                value: other.into(),
            }),
        }
    }
}

impl Wire for String {
    const MIN_BYTES: usize = 2;
    fn encode(&self, out: &mut Vec<u8>) {
        // INVARIANT: callers never build strings over u16::MAX bytes (names and messages are
        // bounded by limits well below it); a longer one is cut at a char boundary, not sent wrong.
        let mut end = self.len().min(u16::MAX as usize);
        while !self.is_char_boundary(end) {
            end -= 1;
        }
        out.put_u16(end as u16);
        out.extend_from_slice(self.as_bytes().get(..end).unwrap_or_default());
    }
    fn decode(buf: &mut Bytes, field: &'static str) -> Result<Self, DecodeError> {
        let len = u16::decode(buf, field)? as usize;
        need(buf, len, field)?;
        let raw = buf.split_to(len);
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::Utf8 { field })
    }
}

impl Wire for Bytes {
    const MIN_BYTES: usize = 4;
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.len() as u32);
        out.extend_from_slice(self);
    }
    fn encode_chunks(&self, out: &mut Chunks) {
        out.buf().put_u32(self.len() as u32);
        out.push_bytes(self);
    }
    fn decode(buf: &mut Bytes, field: &'static str) -> Result<Self, DecodeError> {
        let len = u32::decode(buf, field)? as usize;
        need(buf, len, field)?;
        // Zero-copy: a slice of the frame.
        Ok(buf.split_to(len))
    }
}

impl<T: Wire> Wire for Vec<T> {
    const MIN_BYTES: usize = 4;
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.len() as u32);
        for item in self {
            item.encode(out);
        }
    }
    fn encode_chunks(&self, out: &mut Chunks) {
        out.buf().put_u32(self.len() as u32);
        for item in self {
            item.encode_chunks(out);
        }
    }
    fn decode(buf: &mut Bytes, field: &'static str) -> Result<Self, DecodeError> {
        let count = u32::decode(buf, field)?;
        let max = buf.remaining() / T::MIN_BYTES.max(1);
        if count as usize > max {
            return Err(DecodeError::CountTooLarge {
                field,
                count,
                remaining: buf.remaining(),
            });
        }
        let mut items = Vec::with_capacity(count as usize);
        for _ in 0..count {
            items.push(T::decode(buf, field)?);
        }
        Ok(items)
    }
}

/// Declares a message struct whose wire encoding is its fields in order.
macro_rules! wire_struct {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Default)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty,)* }

        impl $crate::native::wire::Wire for $name {
            const MIN_BYTES: usize = 0 $(+ <$ty as $crate::native::wire::Wire>::MIN_BYTES)*;
            #[allow(unused_variables)]
            fn encode(&self, out: &mut Vec<u8>) {
                $(<$ty as $crate::native::wire::Wire>::encode(&self.$field, out);)*
            }
            #[allow(unused_variables)]
            fn encode_chunks(&self, out: &mut $crate::native::wire::Chunks) {
                $(<$ty as $crate::native::wire::Wire>::encode_chunks(&self.$field, out);)*
            }
            #[allow(unused_variables)]
            fn decode(
                buf: &mut bytes::Bytes,
                _field: &'static str,
            ) -> Result<Self, $crate::native::wire::DecodeError> {
                Ok($name {
                    $($field: <$ty as $crate::native::wire::Wire>::decode(
                        buf,
                        concat!(stringify!($name), ".", stringify!($field)),
                    )?,)*
                })
            }
        }
    };
}
pub(crate) use wire_struct;

/// Decodes a whole message: `buf` must hold exactly one value.
pub fn decode_exact<T: Wire>(mut buf: Bytes) -> Result<T, DecodeError> {
    let value = T::decode(&mut buf, "message")?;
    if !buf.is_empty() {
        return Err(DecodeError::TrailingBytes { n_bytes: buf.len() });
    }
    Ok(value)
}

/// Encodes a value into a fresh buffer.
pub fn encode_to_vec<T: Wire>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    value.encode(&mut out);
    out
}
