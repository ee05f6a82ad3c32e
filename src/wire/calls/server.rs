//! Server → client messages: replies and the async callbacks.

use super::args::Args;
use crate::wire::{Flag, Message, Value, WireError};

#[derive(Clone, Debug, PartialEq)]
pub enum ServerMsg<'a> {
    Reply {
        msgid: &'a Value,
        result: &'a Value,
    },
    /// Flag 2: `(qualified_class_name, exc.__dict__ or exc.args)`.
    ErrorReply {
        msgid: &'a Value,
        class_name: &'a str,
        args: &'a Value,
    },
    InvalidateTransaction {
        tid: &'a [u8],
        oids: Vec<&'a [u8]>,
    },
    /// `info({'length': n, 'size': bytes})`, e.g. before a tpc_finish reply.
    Info {
        info: &'a Value,
    },
    ReceiveBlobStart {
        oid: &'a [u8],
        serial: &'a [u8],
    },
    ReceiveBlobChunk {
        oid: &'a [u8],
        serial: &'a [u8],
        chunk: &'a [u8],
    },
    ReceiveBlobStop {
        oid: &'a [u8],
        serial: &'a [u8],
    },
    Other {
        method: &'a str,
    },
}

impl<'a> ServerMsg<'a> {
    pub fn parse(msg: &'a Message) -> Result<ServerMsg<'a>, WireError> {
        let args = |min, max| Args::new(msg, min, max);
        Ok(match &*msg.method {
            // The client treats any true flag on a reply as an error.
            ".reply" => match msg.flag {
                Flag::Sync | Flag::Reply => ServerMsg::Reply {
                    msgid: &msg.msgid,
                    result: &msg.args,
                },
                Flag::Error | Flag::Async | Flag::Other(_) => {
                    let a = args(2, 2)?;
                    ServerMsg::ErrorReply {
                        msgid: &msg.msgid,
                        class_name: a.str(0)?,
                        args: a.value(1)?,
                    }
                }
            },
            "invalidateTransaction" => {
                let a = args(2, 2)?;
                let oids = a
                    .seq(1)?
                    .iter()
                    .map(|oid| {
                        oid.as_bytes().ok_or_else(|| {
                            WireError::malformed("invalidateTransaction: oids must be bytes")
                        })
                    })
                    .collect::<Result<_, _>>()?;
                ServerMsg::InvalidateTransaction {
                    tid: a.bytes(0)?,
                    oids,
                }
            }
            "info" => ServerMsg::Info {
                info: args(1, 1)?.value(0)?,
            },
            "receiveBlobStart" => {
                let a = args(2, 2)?;
                ServerMsg::ReceiveBlobStart {
                    oid: a.bytes(0)?,
                    serial: a.bytes(1)?,
                }
            }
            "receiveBlobChunk" => {
                let a = args(3, 3)?;
                ServerMsg::ReceiveBlobChunk {
                    oid: a.bytes(0)?,
                    serial: a.bytes(1)?,
                    chunk: a.bytes(2)?,
                }
            }
            "receiveBlobStop" => {
                let a = args(2, 2)?;
                ServerMsg::ReceiveBlobStop {
                    oid: a.bytes(0)?,
                    serial: a.bytes(1)?,
                }
            }
            method => ServerMsg::Other { method },
        })
    }
}
