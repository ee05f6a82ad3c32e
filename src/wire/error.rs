//! Errors of the wire layer, and builders for the POSException error
//! replies a proxy sends on the server's behalf.

use super::message::Message;
use super::value::Value;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("payload truncated")]
    Truncated,
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("unsupported pickle opcode 0x{0:02x}")]
    UnsupportedOpcode(u8),
    #[error("integer does not fit in 128 bits")]
    IntegerTooLarge,
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
    #[error("nesting deeper than {} levels", super::MAX_DEPTH)]
    TooDeep,
    #[error("decoder limit exceeded: {0}")]
    LimitExceeded(&'static str),
    #[error("value cannot be encoded: {0}")]
    Unencodable(String),
    #[error("not a ZEO message envelope: {0}")]
    NotAnEnvelope(String),
}

impl WireError {
    pub(crate) fn malformed(msg: impl Into<String>) -> Self {
        WireError::Malformed(msg.into())
    }
}

/// `('ZODB.POSException.ReadOnlyError', ())`, what a read-only ZEO server
/// answers to a write.
pub fn read_only_error(msgid: Value) -> Message {
    pos_error(msgid, "ReadOnlyError", Value::Tuple(Vec::new()))
}

/// An error reply carrying `ZODB.POSException.<name>`; `args` is the
/// exception's `__dict__` (a Dict) or its `args` (a Tuple), as ZEO sends it.
pub fn pos_error(msgid: Value, name: &str, args: Value) -> Message {
    Message::error_reply(msgid, &format!("ZODB.POSException.{name}"), args)
}
