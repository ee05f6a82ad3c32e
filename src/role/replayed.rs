//! `getInvalidations` on a primary whose backend applied replicated
//! transactions (it was a replica, then promoted).
//!
//! The applier replays transactions with `restore`, and ZEO's server then
//! records them in its invalidation queue with an EMPTY oid list (the same
//! `invalidateTransaction(tid, [])` the replica's sessions rewrite; see
//! `replication::replica_session`). After a promotion, a client that
//! reconnects with a cache older than the promotion point would get
//! `getInvalidations` answers missing those oids and keep stale objects
//! (seen as a reader's inconsistent snapshot after a failover). So a
//! promoted primary answers `getInvalidations(tid)` itself with None ("too
//! old": the client drops its cache) when `tid` is older than its backend's
//! last tid at the start of the primary role; newer ones cover only
//! transactions committed here and go to the backend.

use crate::relay::{ClientVerdict, SessionHooks, SessionInfo};
use crate::replication::txn::Tid;
use crate::wire::calls::ClientCall;
use crate::wire::{Message, Value};

pub struct ReplayedGuard {
    /// The backend's last tid when this primary role started.
    floor: Tid,
}

impl ReplayedGuard {
    pub fn new(floor: Tid) -> Self {
        ReplayedGuard { floor }
    }
}

impl SessionHooks for ReplayedGuard {
    fn on_client_message(&mut self, _info: &SessionInfo, msg: &Message) -> ClientVerdict {
        if msg.method != "getInvalidations" {
            return ClientVerdict::Forward;
        }
        let Ok(ClientCall::GetInvalidations { tid }) = ClientCall::parse(msg) else {
            return ClientVerdict::Close("malformed getInvalidations".into());
        };
        let Ok(tid): Result<Tid, _> = tid.try_into() else {
            return ClientVerdict::Close("getInvalidations: tid is not 8 bytes".into());
        };
        if tid < self.floor {
            ClientVerdict::Reply(Message::reply(msg.msgid.clone(), Value::None))
        } else {
            ClientVerdict::Forward
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tid::tid_from_u64;

    fn get_inv(tid: u64) -> Message {
        Message::call(
            Value::Int(7),
            "getInvalidations",
            vec![Value::bytes(tid_from_u64(tid).to_vec())],
        )
    }

    #[test]
    fn older_than_the_promotion_point_is_too_old() {
        let mut g = ReplayedGuard::new(tid_from_u64(100));
        let info = SessionInfo {
            conn_id: 1,
            peer: "t".into(),
            encoding: crate::wire::Encoding::Msgpack,
            registered: None,
            in_transaction: false,
            route: String::new(),
            access: crate::relay::Access::ReadWrite,
            identity: None,
        };
        match g.on_client_message(&info, &get_inv(99)) {
            ClientVerdict::Reply(m) => assert_eq!(m.args, Value::None),
            _ => panic!("expected a reply"),
        }
        assert!(matches!(
            g.on_client_message(&info, &get_inv(100)),
            ClientVerdict::Forward
        ));
        let load = Message::call(Value::Int(8), "loadBefore", vec![]);
        assert!(matches!(
            g.on_client_message(&info, &load),
            ClientVerdict::Forward
        ));
    }
}
