//! The msgpack encoding (`M5`): Python's `msgpack.packb(use_bin_type=True)`
//! and `unpackb(raw=False, use_list=False)`.
//!
//! Decoding is a small iterative loop over `rmp::Marker` rather than
//! `rmpv::decode::read_value_ref`, because rmpv silently reads the reserved
//! byte 0xc1 as nil (Python rejects it), recurses once per nesting level,
//! and would need a second pass to turn its tree into zero-copy [`Value`]s.

mod decode;
mod encode;
mod scan;

pub use decode::decode;
pub use encode::{encode, encode_tuple};
pub(crate) use scan::scan_envelope;
