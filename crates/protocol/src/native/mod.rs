//! The native protocol: length-prefixed frames over TCP carrying versioned requests and responses.
//! `protocol/SPEC.md` is normative; this module is its codec.

mod error;
mod group_messages;
mod messages;
pub mod wire;

pub use error::ErrorCode;
pub use group_messages::*;
pub use messages::*;
pub use wire::{Chunks, DecodeError, Wire, decode_exact, encode_to_vec};
