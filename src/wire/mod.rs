//! ZEO 5 wire layer: framing, the two payload encodings (pickle protocol 3
//! and msgpack) decoded into one [`Value`] model, the
//! `(msgid, flag, method, args)` envelope, and typed views of the calls a
//! proxy cares about. No I/O and no policy.

pub mod calls;
pub mod error;
pub mod frame;
pub mod message;
pub mod msgpack;
pub mod pickle;
pub mod tid;
pub mod value;

#[cfg(test)]
mod testdata;
#[cfg(test)]
mod tests;

pub use error::WireError;
pub use message::{method_name, Encoding, Flag, Message, Method};
pub use value::Value;

/// Deepest nesting (levels of containers, leaf included) the decoders
/// accept and the encoders produce. Python's msgpack packer stops at 511
/// and real ZEO messages nest a handful of levels; the bound keeps the
/// derived, recursive `Clone`/`PartialEq`/`Debug` of [`Value`] (about 1 KiB
/// of stack per level in debug builds) well inside a 2 MiB thread stack.
pub const MAX_DEPTH: usize = 512;
