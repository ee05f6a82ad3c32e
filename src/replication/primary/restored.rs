//! A primary whose backend holds transactions it *restored* as a replica
//! (before a promotion, a switchover, a detach) cannot answer
//! `getInvalidations` for them: ZEO's `restorea` does not record the oids a
//! transaction changed, so runzeo's invalidation queue lists those
//! transactions with no oids. A client reconnecting with a cache older than
//! the promotion point would then keep stale entries (mixed snapshots; the
//! bank test of a failover caught it). [`RestoredTailHooks`] answers such a
//! call with `None`, ZEO's "too old": the client clears its cache (in-memory
//! and persistent) and reloads what it needs. Calls from the promotion point
//! on are answered by the backend (its own commits record their oids).

use crate::relay::{ClientVerdict, SessionHooks, SessionInfo};
use crate::replication::txn::Tid;
use crate::wire::calls::ClientCall;
use crate::wire::{Message, Value};

/// The backend's last tid when this node last became a primary, from the
/// role history (`last_tid` of the newest primary/detached entry), if the
/// node was ever anything else.
pub fn restored_upto(history: &[crate::role::Change]) -> Option<Tid> {
    use crate::role::RoleKind;
    history
        .iter()
        .rev()
        .find(|c| matches!(c.role, RoleKind::Primary | RoleKind::Detached))
        .and_then(|c| c.last_tid.as_deref())
        .and_then(|t| u64::from_str_radix(t, 16).ok())
        .map(u64::to_be_bytes)
}

pub struct RestoredTailHooks {
    /// Transactions at or below it may have been restored.
    upto: Tid,
}

impl RestoredTailHooks {
    pub fn new(upto: Tid) -> Self {
        RestoredTailHooks { upto }
    }
}

impl SessionHooks for RestoredTailHooks {
    fn on_client_message(&mut self, _info: &SessionInfo, msg: &Message) -> ClientVerdict {
        if msg.method != "getInvalidations" {
            return ClientVerdict::Forward;
        }
        let Ok(ClientCall::GetInvalidations { tid }) = ClientCall::parse(msg) else {
            return ClientVerdict::Forward;
        };
        match <[u8; 8]>::try_from(tid) {
            // Newer than some restored transaction: the backend's answer
            // would miss their oids.
            Ok(t) if t < self.upto => {
                ClientVerdict::Reply(Message::reply(msg.msgid.clone(), Value::None))
            }
            _ => ClientVerdict::Forward,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::{Change, RoleKind};

    fn change(role: RoleKind, last: Option<&str>) -> Change {
        Change {
            epoch: 1,
            at_unix: 0.0,
            role,
            why: String::new(),
            last_tid: last.map(str::to_string),
        }
    }

    #[test]
    fn promotion_point_is_the_newest_primary_entry() {
        assert_eq!(restored_upto(&[]), None);
        let h = [
            change(RoleKind::Primary, Some("0000000000000005")),
            change(RoleKind::Fenced, None),
            change(RoleKind::Replica, Some("0000000000000009")),
            change(RoleKind::Primary, Some("000000000000000c")),
        ];
        assert_eq!(restored_upto(&h), Some(12u64.to_be_bytes()));
        assert_eq!(restored_upto(&h[..3]), Some(5u64.to_be_bytes()));
    }
}
