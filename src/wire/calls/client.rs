//! Client → server calls.

use std::sync::LazyLock;

use super::args::Args;
use crate::wire::{Message, Value, WireError};

/// A client call, borrowing from the [`Message`]. Transaction ids are
/// opaque (`id(txn)` in ClientStorage, up to 64 bits), so they stay Values.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientCall<'a> {
    /// `register(storage_id, read_only)`; read_only arrives as int 0/1 or bool.
    Register {
        storage: &'a str,
        read_only: bool,
    },
    /// `tpc_begin(id, user, description, ext, tid=None, status=' ')`.
    /// ClientStorage sends user/description as UTF-8 bytes and ext as a
    /// dict; ext may also be raw pickle bytes.
    TpcBegin {
        txn_id: &'a Value,
        user: &'a Value,
        description: &'a Value,
        ext: &'a Value,
        tid: Option<&'a [u8]>,
        status: &'a Value,
    },
    Storea {
        oid: &'a [u8],
        serial: &'a [u8],
        data: Option<&'a [u8]>,
        txn_id: &'a Value,
    },
    Restorea {
        oid: &'a [u8],
        serial: &'a [u8],
        data: Option<&'a [u8]>,
        prev_txn: Option<&'a [u8]>,
        txn_id: &'a Value,
    },
    CheckCurrentSerialInTransaction {
        oid: &'a [u8],
        serial: &'a [u8],
        txn_id: &'a Value,
    },
    DeleteObject {
        oid: &'a [u8],
        serial: &'a [u8],
        txn_id: &'a Value,
    },
    /// `undoa(trans_id, id)`: `undone_tid` is the undoLog id as sent, for
    /// FileStorage the base64 of the tid (see [`undo_id_to_tid`]).
    Undoa {
        undone_tid: &'a [u8],
        txn_id: &'a Value,
    },
    StoreBlobStart,
    StoreBlobChunk {
        chunk: &'a [u8],
    },
    StoreBlobEnd {
        oid: &'a [u8],
        serial: &'a [u8],
        data: &'a [u8],
        txn_id: &'a Value,
    },
    StoreBlobShared {
        oid: &'a [u8],
        serial: &'a [u8],
        data: &'a [u8],
        filename: &'a str,
        txn_id: &'a Value,
    },
    Vote {
        txn_id: &'a Value,
    },
    TpcFinish {
        txn_id: &'a Value,
    },
    TpcAbort {
        txn_id: &'a Value,
    },
    /// `new_oids(n=100)`; ClientStorage sends no argument.
    NewOids {
        n: Option<i64>,
    },
    LastTransaction,
    GetInvalidations {
        tid: &'a [u8],
    },
    LoadBefore {
        oid: &'a [u8],
        before: &'a [u8],
    },
    IteratorStart {
        start: Option<&'a [u8]>,
        stop: Option<&'a [u8]>,
    },
    IteratorNext {
        iid: i64,
    },
    IteratorRecordStart {
        iid: i64,
        tid: &'a [u8],
    },
    IteratorRecordNext {
        iid: i64,
    },
    IteratorGc {
        iids: &'a [Value],
    },
    /// `pack(time, wait=1)`.
    Pack {
        t: f64,
        wait: bool,
    },
    SendBlob {
        oid: &'a [u8],
        serial: &'a [u8],
    },
    /// Any other method (get_info, history, undoLog, ping, a heartbeat...).
    Other {
        method: &'a str,
    },
}

impl<'a> ClientCall<'a> {
    /// Wrong arity or argument types for a known method is `Malformed`,
    /// naming the method.
    pub fn parse(msg: &'a Message) -> Result<ClientCall<'a>, WireError> {
        let args = |min, max| Args::new(msg, min, max);
        Ok(match &*msg.method {
            "register" => {
                let a = args(2, 2)?;
                ClientCall::Register {
                    storage: a.str(0)?,
                    read_only: a.flag(1)?,
                }
            }
            "tpc_begin" => {
                let a = args(4, 6)?;
                ClientCall::TpcBegin {
                    txn_id: a.value(0)?,
                    user: a.value(1)?,
                    description: a.value(2)?,
                    ext: a.value(3)?,
                    tid: a.opt_bytes(4)?,
                    status: a.opt(5).unwrap_or(&*DEFAULT_STATUS),
                }
            }
            "storea" => {
                let a = args(4, 4)?;
                ClientCall::Storea {
                    oid: a.bytes(0)?,
                    serial: a.bytes(1)?,
                    data: a.opt_bytes(2)?,
                    txn_id: a.value(3)?,
                }
            }
            "restorea" => {
                let a = args(5, 5)?;
                ClientCall::Restorea {
                    oid: a.bytes(0)?,
                    serial: a.bytes(1)?,
                    data: a.opt_bytes(2)?,
                    prev_txn: a.opt_bytes(3)?,
                    txn_id: a.value(4)?,
                }
            }
            "checkCurrentSerialInTransaction" => {
                let a = args(3, 3)?;
                ClientCall::CheckCurrentSerialInTransaction {
                    oid: a.bytes(0)?,
                    serial: a.bytes(1)?,
                    txn_id: a.value(2)?,
                }
            }
            "deleteObject" => {
                let a = args(3, 3)?;
                ClientCall::DeleteObject {
                    oid: a.bytes(0)?,
                    serial: a.bytes(1)?,
                    txn_id: a.value(2)?,
                }
            }
            "undoa" => {
                let a = args(2, 2)?;
                let undone_tid = match a.value(0)? {
                    Value::Bytes(b) => &b[..],
                    Value::Str(s) => s.as_bytes(),
                    _ => return Err(WireError::malformed("undoa: argument 0 must be bytes")),
                };
                ClientCall::Undoa {
                    undone_tid,
                    txn_id: a.value(1)?,
                }
            }
            "storeBlobStart" => {
                args(0, 0)?;
                ClientCall::StoreBlobStart
            }
            "storeBlobChunk" => ClientCall::StoreBlobChunk {
                chunk: args(1, 1)?.bytes(0)?,
            },
            "storeBlobEnd" => {
                let a = args(4, 4)?;
                ClientCall::StoreBlobEnd {
                    oid: a.bytes(0)?,
                    serial: a.bytes(1)?,
                    data: a.bytes(2)?,
                    txn_id: a.value(3)?,
                }
            }
            "storeBlobShared" => {
                let a = args(5, 5)?;
                ClientCall::StoreBlobShared {
                    oid: a.bytes(0)?,
                    serial: a.bytes(1)?,
                    data: a.bytes(2)?,
                    filename: a.str(3)?,
                    txn_id: a.value(4)?,
                }
            }
            "vote" => ClientCall::Vote {
                txn_id: args(1, 1)?.value(0)?,
            },
            "tpc_finish" => ClientCall::TpcFinish {
                txn_id: args(1, 1)?.value(0)?,
            },
            "tpc_abort" => ClientCall::TpcAbort {
                txn_id: args(1, 1)?.value(0)?,
            },
            "new_oids" => {
                let a = args(0, 1)?;
                let n = match a.opt(0) {
                    None => None,
                    Some(_) => Some(a.int(0)?),
                };
                ClientCall::NewOids { n }
            }
            "lastTransaction" => {
                args(0, 0)?;
                ClientCall::LastTransaction
            }
            "getInvalidations" => ClientCall::GetInvalidations {
                tid: args(1, 1)?.bytes(0)?,
            },
            "loadBefore" => {
                let a = args(2, 2)?;
                ClientCall::LoadBefore {
                    oid: a.bytes(0)?,
                    before: a.bytes(1)?,
                }
            }
            "iterator_start" => {
                let a = args(2, 2)?;
                ClientCall::IteratorStart {
                    start: a.opt_bytes(0)?,
                    stop: a.opt_bytes(1)?,
                }
            }
            "iterator_next" => ClientCall::IteratorNext {
                iid: args(1, 1)?.int(0)?,
            },
            "iterator_record_start" => {
                let a = args(2, 2)?;
                ClientCall::IteratorRecordStart {
                    iid: a.int(0)?,
                    tid: a.bytes(1)?,
                }
            }
            "iterator_record_next" => ClientCall::IteratorRecordNext {
                iid: args(1, 1)?.int(0)?,
            },
            "iterator_gc" => ClientCall::IteratorGc {
                iids: args(1, 1)?.seq(0)?,
            },
            "pack" => {
                let a = args(1, 2)?;
                let t = a
                    .value(0)?
                    .as_f64()
                    .ok_or_else(|| WireError::malformed("pack: argument 0 must be a number"))?;
                let wait = match a.opt(1) {
                    None => true,
                    Some(_) => a.flag(1)?,
                };
                ClientCall::Pack { t, wait }
            }
            "sendBlob" => {
                let a = args(2, 2)?;
                ClientCall::SendBlob {
                    oid: a.bytes(0)?,
                    serial: a.bytes(1)?,
                }
            }
            method => ClientCall::Other { method },
        })
    }

    /// Calls that change the database, or reserve oids for doing so. A
    /// replica refuses these; pack is separate ([`Self::is_pack`]).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            ClientCall::NewOids { .. }
                | ClientCall::TpcBegin { .. }
                | ClientCall::Storea { .. }
                | ClientCall::Restorea { .. }
                | ClientCall::CheckCurrentSerialInTransaction { .. }
                | ClientCall::DeleteObject { .. }
                | ClientCall::Undoa { .. }
                | ClientCall::StoreBlobStart
                | ClientCall::StoreBlobChunk { .. }
                | ClientCall::StoreBlobEnd { .. }
                | ClientCall::StoreBlobShared { .. }
                | ClientCall::Vote { .. }
                | ClientCall::TpcFinish { .. }
        )
    }

    /// ZEO allows pack even on read-only servers.
    pub fn is_pack(&self) -> bool {
        matches!(self, ClientCall::Pack { .. })
    }
}

/// tpc_begin's default status, `' '` (an ordinary transaction).
static DEFAULT_STATUS: LazyLock<Value> = LazyLock::new(|| Value::str(" "));

/// FileStorage's undo id is `base64.encodebytes(tid).rstrip()`; this is the
/// tid back, or None if `id` is not that form.
pub fn undo_id_to_tid(id: &[u8]) -> Option<[u8; 8]> {
    let id = id.strip_suffix(b"\n").unwrap_or(id);
    let (body, pad) = match id {
        [body @ .., b'='] => (body, 1),
        body => (body, 0),
    };
    if body.len() + pad != 12 || pad != 1 {
        return None;
    }
    let mut bits: u128 = 0;
    for &c in body {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u128::from(v);
    }
    // 11 symbols carry 66 bits: the 64 of the tid, then 2 zero bits.
    if bits & 0b11 != 0 {
        return None;
    }
    u64::try_from(bits >> 2).ok().map(u64::to_be_bytes)
}
