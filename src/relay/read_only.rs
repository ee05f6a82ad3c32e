//! Refusing writes: the one place that decides what a read-only session
//! answers to a write path, used by replica sessions and by sessions a gate
//! admitted read-only (e.g. a TLS client certificate not in
//! `read_write_clients`).
//!
//! Nothing of a refused write reaches the backend. `register(read_only=
//! False)` gets `ZODB.POSException.ReadOnlyError`, so ZEO clients with several
//! addresses move on and `read_only_fallback` clients register read-only.
//! Async writes (no reply) are swallowed: their refusal surfaces at the
//! transaction's next sync call (`vote` or `tpc_finish`), which gets the
//! `ReadOnlyError`.

use super::hooks::{ClientVerdict, PendingCall, ServerVerdict, SessionHooks, SessionInfo};
use crate::metrics as m;
use crate::wire::calls::ClientCall;
use crate::wire::error::read_only_error;
use crate::wire::{Flag, Message, Value};

/// Calls that modify the storage, and whether each is a sync call.
fn write_kind(method: &str) -> Option<bool /* sync */> {
    match method {
        "new_oids" | "new_oid" | "vote" | "tpc_finish" | "undo" | "pack" => Some(true),
        "tpc_begin"
        | "storea"
        | "restorea"
        | "checkCurrentSerialInTransaction"
        | "deleteObject"
        | "undoa"
        | "storeBlobStart"
        | "storeBlobChunk"
        | "storeBlobEnd"
        | "storeBlobShared" => Some(false),
        _ => None,
    }
}

/// The verdict of a read-only session on a client message: `Some` for a
/// write path (refused, swallowed, or answered locally), `None` for anything
/// else (the caller decides). `allow_pack` forwards `pack`.
pub fn refuse_write(msg: &Message, allow_pack: bool) -> Option<ClientVerdict> {
    let method = &*msg.method;
    if method == "register" {
        return Some(match ClientCall::parse(msg) {
            Ok(ClientCall::Register {
                read_only: false, ..
            }) => {
                m::rejected_write("register");
                ClientVerdict::Reply(read_only_error(msg.msgid.clone()))
            }
            Ok(_) => ClientVerdict::Forward,
            Err(e) => ClientVerdict::Close(format!("malformed register: {e}")),
        });
    }
    if method == "tpc_abort" {
        // Nothing was begun on the backend; acknowledge locally.
        return Some(if msg.flag == Flag::Sync {
            ClientVerdict::Reply(Message::reply(msg.msgid.clone(), Value::None))
        } else {
            ClientVerdict::Swallow
        });
    }
    if method == "pack" && allow_pack {
        return Some(ClientVerdict::Forward);
    }
    let sync = write_kind(method)?;
    m::rejected_write(method);
    Some(if sync && msg.flag == Flag::Sync {
        ClientVerdict::Reply(read_only_error(msg.msgid.clone()))
    } else {
        ClientVerdict::Swallow
    })
}

/// Wraps the role's hooks for a session admitted read-only: write paths are
/// refused here, everything else goes to the inner hooks.
pub struct ReadOnlyGate {
    inner: Box<dyn SessionHooks>,
}

impl ReadOnlyGate {
    pub fn wrap(inner: Box<dyn SessionHooks>) -> Self {
        ReadOnlyGate { inner }
    }
}

impl SessionHooks for ReadOnlyGate {
    fn on_client_message(&mut self, info: &SessionInfo, msg: &Message) -> ClientVerdict {
        match refuse_write(msg, false) {
            Some(v) => v,
            None => self.inner.on_client_message(info, msg),
        }
    }

    fn on_server_message(
        &mut self,
        info: &SessionInfo,
        msg: &Message,
        answers: Option<&PendingCall>,
    ) -> ServerVerdict {
        self.inner.on_server_message(info, msg, answers)
    }

    fn on_close(&mut self, info: &SessionInfo) {
        self.inner.on_close(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &str, flag: Flag, args: Vec<Value>) -> Message {
        Message {
            msgid: Value::Int(7),
            flag,
            method: crate::wire::method_name(method),
            args: Value::Tuple(args).into(),
        }
    }

    fn is_read_only_error(v: &Option<ClientVerdict>) -> bool {
        matches!(v, Some(ClientVerdict::Reply(m)) if m.flag == Flag::Error)
    }

    #[test]
    fn writes_are_refused_reads_pass() {
        let reg = |ro| {
            call(
                "register",
                Flag::Sync,
                vec![Value::Str("1".into()), Value::Bool(ro)],
            )
        };
        assert!(is_read_only_error(&refuse_write(&reg(false), false)));
        assert!(matches!(
            refuse_write(&reg(true), false),
            Some(ClientVerdict::Forward)
        ));
        for m in ["vote", "tpc_finish", "new_oids", "pack"] {
            assert!(
                is_read_only_error(&refuse_write(&call(m, Flag::Sync, vec![]), false)),
                "{m}"
            );
        }
        assert!(matches!(
            refuse_write(&call("pack", Flag::Sync, vec![]), true),
            Some(ClientVerdict::Forward)
        ));
        for m in ["tpc_begin", "storea", "undoa", "storeBlobChunk"] {
            assert!(
                matches!(
                    refuse_write(&call(m, Flag::Async, vec![]), false),
                    Some(ClientVerdict::Swallow)
                ),
                "{m}"
            );
        }
        assert!(matches!(
            refuse_write(&call("tpc_abort", Flag::Sync, vec![]), false),
            Some(ClientVerdict::Reply(m)) if m.flag == Flag::Reply
        ));
        for m in ["loadBefore", "lastTransaction", "getInvalidations", "ping"] {
            assert!(
                refuse_write(&call(m, Flag::Sync, vec![]), false).is_none(),
                "{m}"
            );
        }
    }
}
