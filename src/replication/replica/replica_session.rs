//! Client sessions on a replica: read-only service with fresh caches.
//!
//! - Every write path is refused with `ZODB.POSException.ReadOnlyError` and
//!   nothing of it reaches the backend (invariant 3), by the same rules as
//!   any read-only door ([`crate::relay::read_only`]).
//! - The backend's `invalidateTransaction(tid, [])` for a replayed
//!   transaction is rewritten with the oids the applier recorded, and
//!   `getInvalidations` is answered from that record (invariant 4).

use std::sync::Arc;

use bytes::Bytes;
use tracing::warn;

use crate::relay::hooks::PendingCall;
use crate::relay::read_only;
use crate::relay::{ClientVerdict, ServerVerdict, SessionHooks, SessionInfo};
use crate::replication::applied::{AppliedLog, Invalidations};
use crate::replication::stages::{self, Stage};
use crate::replication::txn::Tid;
use crate::wire::calls::{ClientCall, ServerMsg};
use crate::wire::{Message, Value};

pub struct ReplicaHooks {
    applied: Arc<AppliedLog>,
    allow_pack: bool,
}

impl ReplicaHooks {
    pub fn new(applied: Arc<AppliedLog>, allow_pack: bool) -> Self {
        ReplicaHooks {
            applied,
            allow_pack,
        }
    }
}

fn bytes_v(b: &[u8]) -> Value {
    Value::Bytes(Bytes::copy_from_slice(b))
}

impl SessionHooks for ReplicaHooks {
    fn on_client_message(&mut self, _info: &SessionInfo, msg: &Message) -> ClientVerdict {
        // Invariant 3: the same refusals as any read-only door.
        if let Some(verdict) = read_only::refuse_write(msg, self.allow_pack) {
            return verdict;
        }
        let method = &*msg.method;
        if method == "getInvalidations" {
            let Ok(ClientCall::GetInvalidations { tid }) = ClientCall::parse(msg) else {
                return ClientVerdict::Close("malformed getInvalidations".into());
            };
            let Ok(tid): Result<Tid, _> = tid.try_into() else {
                return ClientVerdict::Close("getInvalidations: tid is not 8 bytes".into());
            };
            let result = match self.applied.since(&tid) {
                Invalidations::TooOld => Value::None,
                Invalidations::UpToDate => Value::Tuple(vec![bytes_v(&tid), Value::List(vec![])]),
                Invalidations::Since(newest, oids) => Value::Tuple(vec![
                    bytes_v(&newest),
                    Value::List(oids.iter().map(|o| bytes_v(o)).collect()),
                ]),
            };
            return ClientVerdict::Reply(Message::reply(msg.msgid.clone(), result));
        }
        ClientVerdict::Forward
    }

    fn on_server_message(
        &mut self,
        info: &SessionInfo,
        msg: &Message,
        _answers: Option<&PendingCall>,
    ) -> ServerVerdict {
        if msg.method != "invalidateTransaction" {
            return ServerVerdict::Forward;
        }
        let Ok(ServerMsg::InvalidateTransaction { tid, oids }) = ServerMsg::parse(msg) else {
            return ServerVerdict::Forward;
        };
        let Ok(t): Result<Tid, _> = tid.try_into() else {
            return ServerVerdict::Forward;
        };
        match self.applied.oids_of(&t) {
            Some(logged) => {
                let mut all: Vec<Value> = logged.iter().map(|o| bytes_v(o)).collect();
                // Keep anything the backend did report (nothing, for restores).
                for o in oids {
                    if !logged.iter().any(|l| l[..] == o[..]) {
                        all.push(bytes_v(o));
                    }
                }
                stages::record(Stage::Invalidated, &t);
                ServerVerdict::Replace(vec![Message::async_call(
                    "invalidateTransaction",
                    vec![bytes_v(&t), Value::List(all)],
                )])
            }
            None => {
                // Not applied by us: cannot vouch for its oids. Dropping the
                // client makes it reconnect, and our getInvalidations answer
                // (None) clears its cache: never a stale object.
                warn!(
                    conn = info.conn_id,
                    tid = %crate::wire::tid::tid_to_hex(&t),
                    "invalidation for a transaction the applier did not record; closing client so it revalidates"
                );
                ServerVerdict::Close("unrecorded invalidation".into())
            }
        }
    }
}
