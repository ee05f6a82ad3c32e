//! What the running node's pieces read of its role, and the commit fence of
//! a primary's client sessions.
//!
//! [`RoleCell`] has one writer, the role controller (`crate::rolectl`); the
//! feed, the replica task and the door read the epoch from it, and every
//! session of a primary passes through [`FenceHooks`]:
//! - not fenced: a `vote` is counted as a commit in flight until its
//!   `tpc_finish` (or `tpc_abort`) is answered or the session ends;
//! - fenced: a new transaction gets `ReadOnlyError` at `vote` (nothing of it
//!   is committed; the client aborts), a transaction that voted before the
//!   fence completes. The controller waits for the in-flight count to reach
//!   zero before it reads the primary's last tid: after that nothing more
//!   commits, so "the target has everything" is a fact, never half a commit.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::relay::hooks::PendingCall;
use crate::relay::{ClientVerdict, ServerVerdict, SessionHooks, SessionInfo};
use crate::wire::error::read_only_error;
use crate::wire::{Flag, Message, Value};

use super::Promotion;

/// Things the replica task tells the role controller.
#[derive(Debug, Clone, PartialEq)]
pub enum RoleEvent {
    /// The feeder is at a newer epoch: adopt and persist it.
    SawEpoch(u64),
    /// The feeder handed over (switchover): promote if `primary` is this
    /// node, else follow it.
    Handover {
        epoch: u64,
        primary: String,
        replication_addr: Option<String>,
    },
}

/// The node's role as its running pieces see it.
pub struct RoleCell {
    epoch: AtomicU64,
    fenced: AtomicBool,
    in_flight: AtomicUsize,
    /// Newest tid this replica acknowledged as received (fsynced in its
    /// spool), u64; 0 when none. Writer: the replica task.
    durable: AtomicU64,
    /// A primary whose coordinator does not hold the leader key: its door
    /// sends sessions elsewhere (see `crate::door`). Writer: the controller.
    stepped_down: AtomicBool,
    /// This node's eligibility, announced in its Hello.
    pub promotion: Promotion,
    /// Where the replica task reports (None: no controller, e.g. tests).
    pub events: Option<mpsc::UnboundedSender<RoleEvent>>,
}

impl RoleCell {
    pub fn new(
        epoch: u64,
        promotion: Promotion,
        events: Option<mpsc::UnboundedSender<RoleEvent>>,
    ) -> Arc<Self> {
        Arc::new(RoleCell {
            epoch: AtomicU64::new(epoch),
            fenced: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            durable: AtomicU64::new(0),
            stepped_down: AtomicBool::new(false),
            promotion,
            events,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Writer: the role controller.
    pub fn set_epoch(&self, e: u64) {
        self.epoch.store(e, Ordering::SeqCst)
    }

    /// Writer: the role controller.
    pub fn set_fenced(&self, f: bool) {
        self.fenced.store(f, Ordering::SeqCst)
    }

    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Commits between their `vote` and the answer to their finish/abort.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Writer: the role controller.
    pub fn set_stepped_down(&self, v: bool) {
        self.stepped_down.store(v, Ordering::SeqCst)
    }

    pub fn stepped_down(&self) -> bool {
        self.stepped_down.load(Ordering::SeqCst)
    }

    /// Writer: the replica task, after the spool is fsynced up to `tid`.
    pub fn note_durable(&self, tid: u64) {
        self.durable.fetch_max(tid, Ordering::SeqCst);
    }

    /// What this replica acknowledged as received (the coordinator's
    /// `acknowledged_tid`).
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }

    pub fn report(&self, ev: RoleEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }
}

/// A primary session's hooks: the fence around the role's own hooks.
pub struct FenceHooks {
    cell: Arc<RoleCell>,
    inner: Box<dyn SessionHooks>,
    /// This session holds one count of `in_flight`.
    counted: bool,
    /// This session's current transaction was begun after the fence and
    /// never reached the backend.
    swallowed: bool,
}

impl FenceHooks {
    pub fn new(cell: Arc<RoleCell>, inner: Box<dyn SessionHooks>) -> Self {
        FenceHooks {
            cell,
            inner,
            counted: false,
            swallowed: false,
        }
    }

    fn release(&mut self) {
        if self.counted {
            self.counted = false;
            self.cell.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Calls of a transaction that may still reach the backend before its vote
/// (the backend holds them in its own transaction until vote/abort).
fn is_txn_call(method: &str) -> bool {
    matches!(
        method,
        "storea"
            | "restorea"
            | "checkCurrentSerialInTransaction"
            | "deleteObject"
            | "undoa"
            | "storeBlobStart"
            | "storeBlobChunk"
            | "storeBlobEnd"
            | "storeBlobShared"
    )
}

impl SessionHooks for FenceHooks {
    fn on_client_message(&mut self, info: &SessionInfo, msg: &Message) -> ClientVerdict {
        let method = &*msg.method;
        match method {
            "tpc_begin" if self.cell.fenced() => {
                // Nothing of this transaction reaches the backend; its vote
                // gets the ReadOnlyError.
                self.swallowed = true;
                crate::metrics::rejected_write("tpc_begin");
                return ClientVerdict::Swallow;
            }
            "tpc_begin" => self.swallowed = false,
            m if self.swallowed && is_txn_call(m) => return ClientVerdict::Swallow,
            "vote" => {
                if !self.counted {
                    self.counted = true;
                    self.cell.in_flight.fetch_add(1, Ordering::SeqCst);
                }
                if self.swallowed || self.cell.fenced() {
                    // Refused at vote: the client aborts; nothing committed.
                    self.release();
                    crate::metrics::rejected_write("vote");
                    return ClientVerdict::Reply(read_only_error(msg.msgid.clone()));
                }
            }
            "tpc_abort" if self.swallowed => {
                self.swallowed = false;
                return if msg.flag == Flag::Sync {
                    ClientVerdict::Reply(Message::reply(msg.msgid.clone(), Value::None))
                } else {
                    ClientVerdict::Swallow
                };
            }
            "tpc_abort" => self.release(),
            _ => {}
        }
        self.inner.on_client_message(info, msg)
    }

    fn on_server_message(
        &mut self,
        info: &SessionInfo,
        msg: &Message,
        answers: Option<&PendingCall>,
    ) -> ServerVerdict {
        if let Some(a) = answers {
            if a.method == "tpc_finish" || a.method == "tpc_abort" {
                self.release();
            }
        }
        if answers.is_none() && replayed_invalidation(msg) {
            // This node was demoted and its backend now applies replicated
            // transactions, which ZEO announces without their oids: a
            // client that took this one would keep stale objects. It
            // reconnects through its door and revalidates instead.
            return ServerVerdict::Close(
                "this node follows another primary now: reconnect to revalidate".into(),
            );
        }
        self.inner.on_server_message(info, msg, answers)
    }

    fn on_close(&mut self, info: &SessionInfo) {
        self.release();
        self.inner.on_close(info);
    }
}

/// `invalidateTransaction(tid, [])`: how ZEO announces a transaction the
/// applier replayed (`restore`); a client's own commits always name oids.
fn replayed_invalidation(msg: &Message) -> bool {
    msg.method == "invalidateTransaction"
        && matches!(
            crate::wire::calls::ServerMsg::parse(msg),
            Ok(crate::wire::calls::ServerMsg::InvalidateTransaction { oids, .. }) if oids.is_empty()
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::PassThrough;

    #[test]
    fn a_replayed_invalidation_closes_a_primary_session() {
        let mut h = FenceHooks::new(
            RoleCell::new(1, Promotion::default(), None),
            Box::new(PassThrough),
        );
        let tid = Value::bytes(vec![0u8, 0, 0, 0, 0, 0, 0, 9]);
        let empty = Message::async_call(
            "invalidateTransaction",
            vec![tid.clone(), Value::List(vec![])],
        );
        assert!(matches!(
            h.on_server_message(&info(), &empty, None),
            ServerVerdict::Close(_)
        ));
        let named = Message::async_call(
            "invalidateTransaction",
            vec![tid, Value::List(vec![Value::bytes(vec![0u8; 8])])],
        );
        assert!(matches!(
            h.on_server_message(&info(), &named, None),
            ServerVerdict::Forward
        ));
    }
    use crate::wire::Encoding;

    fn info() -> SessionInfo {
        SessionInfo {
            conn_id: 1,
            peer: "t".into(),
            encoding: Encoding::Msgpack,
            registered: None,
            in_transaction: false,
            route: String::new(),
            access: crate::relay::Access::ReadWrite,
            identity: None,
        }
    }

    fn call(method: &str, id: i64) -> Message {
        let mut m = Message::async_call(method, vec![]);
        m.msgid = Value::Int(id);
        m.flag = Flag::Sync;
        m
    }

    fn pending(method: &str) -> PendingCall {
        PendingCall {
            msgid: Value::Int(0),
            method: crate::wire::method_name(method),
            sent: Some(std::time::Instant::now()),
        }
    }

    fn is_read_only_error(v: &ClientVerdict) -> bool {
        matches!(v, ClientVerdict::Reply(m) if format!("{m:?}").contains("ReadOnlyError"))
    }

    #[test]
    fn voted_commit_completes_across_the_fence() {
        let cell = RoleCell::new(0, Promotion::default(), None);
        let mut h = FenceHooks::new(cell.clone(), Box::new(PassThrough));
        let i = info();
        assert!(matches!(
            h.on_client_message(&i, &call("tpc_begin", 1)),
            ClientVerdict::Forward
        ));
        assert!(matches!(
            h.on_client_message(&i, &call("vote", 2)),
            ClientVerdict::Forward
        ));
        assert_eq!(cell.in_flight(), 1);
        cell.set_fenced(true);
        assert!(matches!(
            h.on_client_message(&i, &call("tpc_finish", 3)),
            ClientVerdict::Forward
        ));
        assert_eq!(cell.in_flight(), 1, "counted until the finish is answered");
        h.on_server_message(
            &i,
            &Message::reply(Value::Int(3), Value::None),
            Some(&pending("tpc_finish")),
        );
        assert_eq!(cell.in_flight(), 0);
    }

    #[test]
    fn begun_before_fence_refused_at_vote() {
        let cell = RoleCell::new(0, Promotion::default(), None);
        let mut h = FenceHooks::new(cell.clone(), Box::new(PassThrough));
        let i = info();
        h.on_client_message(&i, &call("tpc_begin", 1));
        assert!(matches!(
            h.on_client_message(&i, &call("storea", 2)),
            ClientVerdict::Forward
        ));
        cell.set_fenced(true);
        assert!(is_read_only_error(
            &h.on_client_message(&i, &call("vote", 3))
        ));
        assert_eq!(cell.in_flight(), 0);
        // The backend began it: the abort goes there.
        assert!(matches!(
            h.on_client_message(&i, &call("tpc_abort", 4)),
            ClientVerdict::Forward
        ));
    }

    #[test]
    fn begun_after_fence_never_reaches_backend() {
        let cell = RoleCell::new(0, Promotion::default(), None);
        cell.set_fenced(true);
        let mut h = FenceHooks::new(cell.clone(), Box::new(PassThrough));
        let i = info();
        assert!(matches!(
            h.on_client_message(&i, &call("tpc_begin", 1)),
            ClientVerdict::Swallow
        ));
        assert!(matches!(
            h.on_client_message(&i, &call("storea", 2)),
            ClientVerdict::Swallow
        ));
        assert!(is_read_only_error(
            &h.on_client_message(&i, &call("vote", 3))
        ));
        assert!(matches!(
            h.on_client_message(&i, &call("tpc_abort", 4)),
            ClientVerdict::Reply(_)
        ));
        // Reads still pass.
        assert!(matches!(
            h.on_client_message(&i, &call("loadBefore", 5)),
            ClientVerdict::Forward
        ));
        assert_eq!(cell.in_flight(), 0);
    }

    #[test]
    fn session_end_releases_its_count() {
        let cell = RoleCell::new(0, Promotion::default(), None);
        let mut h = FenceHooks::new(cell.clone(), Box::new(PassThrough));
        let i = info();
        h.on_client_message(&i, &call("tpc_begin", 1));
        h.on_client_message(&i, &call("vote", 2));
        assert_eq!(cell.in_flight(), 1);
        h.on_close(&i);
        assert_eq!(cell.in_flight(), 0);
        h.on_close(&i);
        assert_eq!(cell.in_flight(), 0);
    }
}
