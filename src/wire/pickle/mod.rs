//! The pickle subset ZEO speaks: protocol 3, written by zodbpickle's
//! `Pickler(f, 3)` with `fast = 1` (no memo).
//!
//! Hand-written rather than serde-pickle, because we need: the exact
//! protocol-3 opcode choices of ZEO's encoder (so a decoded message
//! re-encodes byte for byte), dicts that keep their order, `Bytes` that are
//! zero-copy slices of the frame, and a decoder small enough to fuzz.
//! serde-pickle loses dict order and cannot hand out zero-copy slices.

mod decode;
mod encode;
mod memo;
mod op;
mod reader;
mod scan;

pub use decode::decode;
pub use encode::{encode, encode_tuple};
pub use memo::MAX_MEMO;
pub(crate) use scan::scan_envelope;
