//! Which loads of a forwarded session the local replica may answer: the
//! I/O-free half of invariant 5 ("snapshot-consistent reads anywhere").
//!
//! A forwarded session talks to the primary; its `loadBefore(oid, before)`
//! calls may instead go to this node's own backend (a replica) when that
//! answer is provably the one the primary would give *at the session's
//! snapshot*, and reaches the client in an order the primary could have
//! produced:
//!
//! 1. **The replica knows everything the client knows.** `seen` (S) is the
//!    newest tid delivered to the client in any form: the `register` and
//!    `lastTransaction` answers, `tpc_finish` results, `invalidateTransaction`
//!    messages and `getInvalidations` answers. A load goes local only if the
//!    replica has applied A ≥ max(S, before − 1). The client's snapshot tid
//!    (its `before` − 1) never exceeds what it was told, so the revision
//!    valid before `before` is the same on both nodes; the replica cannot
//!    name a newer revision the client already heard of and miss it. A load
//!    beyond what the client has seen (`before` − 1 > S, e.g.
//!    `ClientStorage.load`'s "current" marker) always goes to the primary.
//!    This relies on the `register` answer being the tid the primary's
//!    backend registered the session at: invalidations come only for
//!    commits after it, so a "current" revision (end None) the replica
//!    gives at a position below it could miss a commit no invalidation
//!    will ever name. A semi-sync primary therefore holds that answer
//!    until acknowledged instead of lowering it (`semisync::above_watermark`).
//! 2. **The reply cannot overtake an invalidation.** The session writes
//!    everything to the client in one ordered buffer. If an
//!    `invalidateTransaction` naming the oid (or any `tpc_finish` result:
//!    the client's own commit, whose oids the proxy may not fully know
//!    after an undo) is delivered while the local load is in flight, its
//!    reply is dropped and the call goes to the primary instead. A local
//!    reply delivered before such an invalidation is what the primary would
//!    have answered before that commit: the invalidation that follows makes
//!    the client drop it, as with a direct server.
//! 3. **Behind, briefly**: when A < need, the load waits up to
//!    `offload_wait` for the replica to catch up (a writer reading its own
//!    write), then goes to the primary. A replica that is not live or lags
//!    more than the door's limit is not asked at all.

use std::time::{Duration, Instant};

use crate::wire::calls::{ClientCall, ServerMsg};
use crate::wire::tid::tid_to_u64;
use crate::wire::{Flag, Message, Value};

/// What to do with a load now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Ask the local replica (reason: "fresh" or "waited", counted when the
    /// reply is delivered).
    Local,
    /// Hold until the deadline or the next position change.
    Wait(Instant),
    /// Send to the primary; the reason is a label of
    /// `crate::metrics::DOOR_LOAD_OUTCOMES`.
    Primary(&'static str),
}

/// What the local replica's situation is, as the door sees it.
#[derive(Debug, Clone, Copy)]
pub struct Local {
    /// Newest tid committed on the local backend (as u64).
    pub applied: u64,
    /// Live stream and lag within the door's limit.
    pub usable: bool,
    /// The session's local connection is up.
    pub connected: bool,
}

#[derive(Debug)]
struct PendingLoad {
    msgid: Value,
    oid: [u8; 8],
    waited: bool,
    tainted: bool,
}

#[derive(Debug)]
pub struct Offload {
    wait: Duration,
    /// S: newest tid delivered to the client.
    seen: u64,
    /// Loads sent to the local replica, reply not yet delivered.
    pending: Vec<PendingLoad>,
    /// Loads that waited once (so their local answer counts as "waited").
    waited: Vec<Value>,
}

fn oid8(b: &[u8]) -> Option<[u8; 8]> {
    b.try_into().ok()
}

impl Offload {
    pub fn new(wait: Duration) -> Self {
        Offload {
            wait,
            seen: 0,
            pending: Vec::new(),
            waited: Vec::new(),
        }
    }

    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Decides for a client message; `None`: not a load this module handles.
    /// `expired`: the message waited already and its deadline passed.
    pub fn decide(
        &mut self,
        msg: &Message,
        local: Local,
        now: Instant,
        expired: bool,
    ) -> Option<Decision> {
        if msg.method != "loadBefore" || msg.flag != Flag::Sync {
            return None;
        }
        let Ok(ClientCall::LoadBefore { oid, before }) = ClientCall::parse(msg) else {
            return Some(Decision::Primary("not_snapshot"));
        };
        let (Some(oid), Some(before)) = (oid8(oid), tid_to_u64(before)) else {
            return Some(Decision::Primary("not_snapshot"));
        };
        let snapshot = before.saturating_sub(1);
        if snapshot > self.seen {
            return Some(Decision::Primary("not_snapshot"));
        }
        if !local.connected {
            return Some(Decision::Primary("local_unavailable"));
        }
        if !local.usable {
            return Some(Decision::Primary("lagging"));
        }
        let need = self.seen.max(snapshot);
        if local.applied >= need {
            let waited = match self.waited.iter().position(|m| *m == msg.msgid) {
                Some(i) => {
                    self.waited.swap_remove(i);
                    true
                }
                None => false,
            };
            self.pending.push(PendingLoad {
                msgid: msg.msgid.clone(),
                oid,
                waited,
                tainted: false,
            });
            return Some(Decision::Local);
        }
        if expired || self.wait.is_zero() {
            self.waited.retain(|m| *m != msg.msgid);
            return Some(Decision::Primary("behind"));
        }
        if !self.waited.contains(&msg.msgid) {
            self.waited.push(msg.msgid.clone());
        }
        Some(Decision::Wait(now + self.wait))
    }

    /// Every message from the primary, in the order it is delivered to the
    /// client; `answered`: the method of the call it replies to.
    pub fn observe(&mut self, msg: &Message, answered: Option<&str>) {
        if msg.method == "invalidateTransaction" {
            if let Ok(ServerMsg::InvalidateTransaction { tid, oids }) = ServerMsg::parse(msg) {
                self.see(tid);
                for p in &mut self.pending {
                    if oids.iter().any(|o| o[..] == p.oid[..]) {
                        p.tainted = true;
                    }
                }
            } else {
                self.taint_all();
            }
            return;
        }
        let Some(method) = answered else {
            return;
        };
        if msg.flag == Flag::Error {
            return;
        }
        match (method, &*msg.args) {
            ("register" | "lastTransaction", Value::Bytes(t)) => self.see(t),
            ("tpc_finish", Value::Bytes(t)) => {
                self.see(t);
                self.taint_all();
            }
            ("tpc_finish", _) => self.taint_all(),
            ("getInvalidations", Value::Tuple(items) | Value::List(items)) => {
                if let Some(Value::Bytes(t)) = items.first() {
                    self.see(t);
                }
                self.taint_all();
            }
            _ => {}
        }
    }

    fn see(&mut self, tid: &[u8]) {
        if let Some(t) = tid_to_u64(tid) {
            self.seen = self.seen.max(t);
        }
    }

    fn taint_all(&mut self) {
        for p in &mut self.pending {
            p.tainted = true;
        }
    }

    /// The local reply to a load: `Some(reason)` to deliver it ("fresh" or
    /// "waited"), `None` to drop it and ask the primary.
    pub fn on_local_reply(&mut self, msg: &Message) -> Option<&'static str> {
        let i = self.pending.iter().position(|p| p.msgid == msg.msgid)?;
        let p = self.pending.swap_remove(i);
        if p.tainted {
            None
        } else if p.waited {
            Some("waited")
        } else {
            Some("fresh")
        }
    }

    /// The local connection is gone: its loads went to the primary.
    pub fn on_local_lost(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::wire::tid::tid_from_u64;

    const OID: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 7];

    fn b(x: &[u8]) -> Value {
        Value::Bytes(Bytes::copy_from_slice(x))
    }

    fn load(before: u64) -> Message {
        Message::call(
            Value::Tuple(vec![b(&OID), b(&tid_from_u64(before))]),
            "loadBefore",
            vec![b(&OID), b(&tid_from_u64(before))],
        )
    }

    fn local(applied: u64) -> Local {
        Local {
            applied,
            usable: true,
            connected: true,
        }
    }

    fn registered(o: &mut Offload, tid: u64) {
        o.observe(
            &Message::reply(Value::Int(1), b(&tid_from_u64(tid))),
            Some("register"),
        );
    }

    fn inval(tid: u64, oids: &[[u8; 8]]) -> Message {
        Message::async_call(
            "invalidateTransaction",
            vec![
                b(&tid_from_u64(tid)),
                Value::List(oids.iter().map(|o| b(o)).collect()),
            ],
        )
    }

    #[test]
    fn a_caught_up_replica_answers_snapshot_loads() {
        let mut o = Offload::new(Duration::from_millis(5));
        registered(&mut o, 100);
        let now = Instant::now();
        assert_eq!(
            o.decide(&load(101), local(100), now, false),
            Some(Decision::Local)
        );
        assert_eq!(o.on_local_reply(&load_reply(101)), Some("fresh"));
    }

    fn load_reply(before: u64) -> Message {
        Message::reply(load(before).msgid, Value::None)
    }

    #[test]
    fn a_load_beyond_what_the_client_saw_goes_to_the_primary() {
        let mut o = Offload::new(Duration::from_millis(5));
        registered(&mut o, 100);
        let d = o.decide(&load(u64::MAX >> 1), local(u64::MAX), Instant::now(), false);
        assert_eq!(d, Some(Decision::Primary("not_snapshot")));
    }

    #[test]
    fn behind_waits_then_goes_to_the_primary() {
        let mut o = Offload::new(Duration::from_millis(5));
        registered(&mut o, 100);
        // The client committed 120 itself.
        o.observe(
            &Message::reply(Value::Int(9), b(&tid_from_u64(120))),
            Some("tpc_finish"),
        );
        let now = Instant::now();
        let d = o.decide(&load(121), local(110), now, false);
        assert_eq!(d, Some(Decision::Wait(now + Duration::from_millis(5))));
        // Caught up in time: served locally, counted as waited.
        assert_eq!(
            o.decide(&load(121), local(120), now, false),
            Some(Decision::Local)
        );
        assert_eq!(o.on_local_reply(&load_reply(121)), Some("waited"));
        // Not in time.
        let _ = o.decide(&load(121), local(110), now, false);
        assert_eq!(
            o.decide(&load(121), local(110), now, true),
            Some(Decision::Primary("behind"))
        );
    }

    #[test]
    fn an_invalidation_delivered_meanwhile_voids_the_local_reply() {
        let mut o = Offload::new(Duration::from_millis(5));
        registered(&mut o, 100);
        assert_eq!(
            o.decide(&load(101), local(100), Instant::now(), false),
            Some(Decision::Local)
        );
        o.observe(&inval(105, &[[9; 8]]), None);
        assert_eq!(o.seen(), 105);
        // Another oid: no effect on this load... but a second load now needs 105.
        assert_eq!(
            o.decide(&load(101), local(100), Instant::now(), true),
            Some(Decision::Primary("behind"))
        );
        o.observe(&inval(106, &[OID]), None);
        assert_eq!(o.on_local_reply(&load_reply(101)), None);
    }

    #[test]
    fn own_commit_voids_every_local_load_in_flight() {
        let mut o = Offload::new(Duration::from_millis(5));
        registered(&mut o, 100);
        assert_eq!(
            o.decide(&load(101), local(100), Instant::now(), false),
            Some(Decision::Local)
        );
        o.observe(
            &Message::reply(Value::Int(9), b(&tid_from_u64(120))),
            Some("tpc_finish"),
        );
        assert_eq!(o.on_local_reply(&load_reply(101)), None);
    }

    #[test]
    fn a_lagging_or_missing_replica_is_not_asked() {
        let mut o = Offload::new(Duration::from_millis(5));
        registered(&mut o, 100);
        let mut l = local(100);
        l.usable = false;
        assert_eq!(
            o.decide(&load(101), l, Instant::now(), false),
            Some(Decision::Primary("lagging"))
        );
        l.usable = true;
        l.connected = false;
        assert_eq!(
            o.decide(&load(101), l, Instant::now(), false),
            Some(Decision::Primary("local_unavailable"))
        );
    }

    #[test]
    fn other_calls_are_not_loads() {
        let mut o = Offload::new(Duration::from_millis(5));
        let m = Message::call(Value::Int(3), "lastTransaction", vec![]);
        assert_eq!(o.decide(&m, local(0), Instant::now(), false), None);
    }
}
