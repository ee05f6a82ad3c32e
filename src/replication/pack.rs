//! Pack replication: a `pack` committed on the primary is replayed on each
//! replica as an operation (`replicate_pack = true`).
//!
//! A pack creates no transaction and the backend broadcasts no invalidation
//! for it (only `info`), so the commit feed cannot see it. The capture point
//! is the primary's client sessions: [`PackCapture`] sees the client's
//! `pack(t, wait)` call and its successful reply. A pack issued on the
//! backend directly (bypassing zrelay) cannot be seen and is not replicated.
//!
//! On the primary, [`relay_packs`] turns each captured pack into a
//! [`PackOp`] `{pack_time, upto}` where `upto` is the backend's last tid
//! after the pack, published once the feed has published `upto`. Each
//! replica stream sends it as [`StreamMsg::Pack`] right after it has sent
//! the transaction `upto` (only to replicas announcing the `pack` feature).
//! The replica completes everything it received (so `upto` is applied),
//! then [`PackRunner`] packs its own backend with the same time, in the
//! background: applying goes on meanwhile (FileStorage packs while
//! committing). The replica's own clients still cannot pack
//! (`allow_pack = false`).
//!
//! Only the latest pack is kept: a replica that connects while behind
//! `upto` gets it after catching up past `upto`; one that was past `upto`
//! when it disconnected may have missed it and is not sent it again (it
//! packs at the next pack).

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::feed::BackendLink;
use super::protocol::StreamMsg;
use super::txn::{tid_hex, Tid};
use crate::relay::hooks::PendingCall;
use crate::relay::{ClientVerdict, ServerVerdict, SessionHooks, SessionInfo};
use crate::wire::{Flag, Message, Value};

pub const PACKS_CAPTURED: &str = "zrelay_replication_packs_captured_total";
pub const PACKS_APPLIED: &str = "zrelay_replication_packs_applied_total";

/// A pack of the primary, as replicas replay it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PackOp {
    /// The `t` of the client's `pack(t, wait)` (Unix seconds).
    pub pack_time_unix: f64,
    /// The primary's last tid once the pack was done.
    pub upto: Tid,
}

impl PackOp {
    pub fn to_msg(self) -> StreamMsg {
        StreamMsg::Pack {
            pack_time_unix: self.pack_time_unix,
            upto: self.upto,
        }
    }
}

/// How long a replica's backend may take to pack (a pack reads the whole
/// Data.fs).
const PACK_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// How long the relay waits for the feed to publish `upto`.
const PUBLISH_WAIT: Duration = Duration::from_secs(60);

pub fn describe() {
    metrics::describe_counter!(
        PACKS_CAPTURED,
        "Client packs of this primary's storage seen through zrelay and handed to the replication streams."
    );
    metrics::describe_counter!(
        PACKS_APPLIED,
        "Packs replayed on this replica's backend from the stream, by result (ok, error)."
    );
}

pub fn init_series(replica: bool) {
    if replica {
        for r in ["ok", "error"] {
            metrics::counter!(PACKS_APPLIED, "result" => r).increment(0);
        }
    } else {
        metrics::counter!(PACKS_CAPTURED).increment(0);
    }
}

// ------------------------------------------------------------- primary

/// Session hooks of the primary: relay everything, note successful packs.
pub struct PackCapture {
    packs: mpsc::Sender<f64>,
    /// msgid and pack time of `pack` calls awaiting their reply.
    waiting: Vec<(Value, f64)>,
}

impl PackCapture {
    pub fn new(packs: mpsc::Sender<f64>) -> Self {
        PackCapture {
            packs,
            waiting: Vec::new(),
        }
    }
}

/// ZEO's `pack(t, wait=True)`; `t` a float (or an int) in Unix seconds.
fn pack_time(msg: &Message) -> Option<f64> {
    let first = match &*msg.args {
        Value::Tuple(a) | Value::List(a) => a.first()?,
        _ => return None,
    };
    match first {
        Value::Float(f) if f.is_finite() => Some(*f),
        Value::Int(i) => Some(*i as f64),
        _ => None,
    }
}

impl SessionHooks for PackCapture {
    fn on_client_message(&mut self, _info: &SessionInfo, msg: &Message) -> ClientVerdict {
        if msg.method == "pack" && msg.flag == Flag::Sync {
            match pack_time(msg) {
                Some(t) => self.waiting.push((msg.msgid.clone(), t)),
                None => warn!("pack call without a usable time; it will not be replicated"),
            }
        }
        ClientVerdict::Forward
    }

    fn on_server_message(
        &mut self,
        _info: &SessionInfo,
        msg: &Message,
        answers: Option<&PendingCall>,
    ) -> ServerVerdict {
        let Some(call) = answers.filter(|c| c.method == "pack") else {
            return ServerVerdict::Forward;
        };
        let Some(i) = self.waiting.iter().position(|(id, _)| *id == call.msgid) else {
            return ServerVerdict::Forward;
        };
        let (_, t) = self.waiting.swap_remove(i);
        if msg.flag == Flag::Reply {
            metrics::counter!(PACKS_CAPTURED).increment(1);
            if self.packs.try_send(t).is_err() {
                warn!(
                    pack_time = t,
                    "pack replication queue full; this pack is not replicated"
                );
            }
        }
        ServerVerdict::Forward
    }
}

/// Primary: turns captured packs into [`PackOp`]s on `out` once the feed
/// (`published`: its last published tid) has published the backend's last
/// tid after the pack.
pub async fn relay_packs(
    link: BackendLink,
    mut packs: mpsc::Receiver<f64>,
    mut published: watch::Receiver<Tid>,
    out: watch::Sender<Option<PackOp>>,
    shutdown: CancellationToken,
) {
    loop {
        let t = tokio::select! {
            _ = shutdown.cancelled() => return,
            t = packs.recv() => match t {
                Some(t) => t,
                None => return,
            },
        };
        let upto = match link.open(true).await {
            Ok((_, last)) => last,
            Err(e) => {
                error!(error = %e, pack_time = t, "cannot read the backend's last tid after a pack; not replicated");
                continue;
            }
        };
        let caught_up = tokio::time::timeout(PUBLISH_WAIT, published.wait_for(|p| *p >= upto));
        let ok = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = caught_up => matches!(r, Ok(Ok(_))),
        };
        if !ok {
            warn!(upto = %tid_hex(&upto), "the feed did not publish the pack's last tid in time; not replicated");
            continue;
        }
        info!(pack_time = t, upto = %tid_hex(&upto), "pack on the primary: replicas will pack the same way");
        out.send_replace(Some(PackOp {
            pack_time_unix: t,
            upto,
        }));
    }
}

/// Per replica stream on the primary: the pack still to send.
pub struct PackGate {
    ops: watch::Receiver<Option<PackOp>>,
    enabled: bool,
    pending: Option<PackOp>,
    /// False once the sender side is gone (then `changed` would spin).
    open: bool,
}

impl PackGate {
    /// `enabled`: the replica announced the feature. A replica that was
    /// behind the latest pack (`replica_last < upto`) still gets it.
    pub fn new(mut ops: watch::Receiver<Option<PackOp>>, enabled: bool, replica_last: Tid) -> Self {
        let pending = (*ops.borrow_and_update()).filter(|op| enabled && replica_last < op.upto);
        PackGate {
            ops,
            enabled,
            pending,
            open: true,
        }
    }

    /// A new pack was published (call after `changed()`).
    pub fn on_changed(&mut self) {
        let op = *self.ops.borrow_and_update();
        if self.enabled {
            self.pending = op.or(self.pending);
        }
    }

    /// The message to send now that `last_sent` was sent, if any.
    pub fn poll(&mut self, last_sent: Tid) -> Option<StreamMsg> {
        match self.pending {
            Some(op) if last_sent >= op.upto => {
                self.pending = None;
                Some(op.to_msg())
            }
            _ => None,
        }
    }

    /// Waits for a new pack; false (and closed for good) if none can come.
    pub async fn changed(&mut self) -> bool {
        self.open = self.ops.changed().await.is_ok();
        self.open
    }

    pub fn is_open(&self) -> bool {
        self.open
    }
}

// ------------------------------------------------------------- replica

/// Replica: packs its own backend, one pack at a time, off the apply path.
#[derive(Clone)]
pub struct PackRunner {
    tx: mpsc::Sender<PackOp>,
}

impl PackRunner {
    /// Starts the runner task. `downstream`: a cascading replica's own pack
    /// channel, told once the pack is done here.
    pub fn start(
        link: BackendLink,
        downstream: Option<watch::Sender<Option<PackOp>>>,
        shutdown: CancellationToken,
    ) -> (PackRunner, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<PackOp>(4);
        let task = tokio::spawn(async move {
            loop {
                let op = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    op = rx.recv() => match op {
                        Some(op) => op,
                        None => return,
                    },
                };
                let started = std::time::Instant::now();
                let r = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = pack_backend(&link, op.pack_time_unix) => r,
                };
                match r {
                    Ok(()) => {
                        metrics::counter!(PACKS_APPLIED, "result" => "ok").increment(1);
                        info!(pack_time = op.pack_time_unix, upto = %tid_hex(&op.upto), seconds = started.elapsed().as_secs_f64(), "packed the replica backend like the primary");
                        if let Some(d) = &downstream {
                            d.send_replace(Some(op));
                        }
                    }
                    Err(e) => {
                        metrics::counter!(PACKS_APPLIED, "result" => "error").increment(1);
                        error!(error = %e, pack_time = op.pack_time_unix, "packing the replica backend failed");
                    }
                }
            }
        });
        (PackRunner { tx }, task)
    }

    /// Queues a pack (all it depends on is applied already).
    pub fn submit(&self, op: PackOp) {
        if self.tx.try_send(op).is_err() {
            warn!(
                pack_time = op.pack_time_unix,
                "replica pack queue full; skipping this pack"
            );
        }
    }
}

async fn pack_backend(link: &BackendLink, t: f64) -> Result<(), crate::zeoclient::ZeoError> {
    let link = BackendLink {
        call_timeout: PACK_TIMEOUT,
        ..link.clone()
    };
    let (mut conn, _) = link.open(false).await?;
    conn.call("pack", vec![Value::Float(t), Value::Bool(true)])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_sends_after_upto_and_only_when_enabled() {
        let (tx, rx) = watch::channel(None);
        let mut g = PackGate::new(rx.clone(), true, [0; 8]);
        assert!(g.poll([9; 8]).is_none());
        tx.send_replace(Some(PackOp {
            pack_time_unix: 1.5,
            upto: [0, 0, 0, 0, 0, 0, 0, 5],
        }));
        g.on_changed();
        assert!(g.poll([0, 0, 0, 0, 0, 0, 0, 4]).is_none());
        assert_eq!(
            g.poll([0, 0, 0, 0, 0, 0, 0, 5]),
            Some(StreamMsg::Pack {
                pack_time_unix: 1.5,
                upto: [0, 0, 0, 0, 0, 0, 0, 5]
            })
        );
        assert!(g.poll([0, 0, 0, 0, 0, 0, 0, 6]).is_none(), "sent once");
        // A replica behind the latest pack gets it; one past it does not.
        let mut behind = PackGate::new(rx.clone(), true, [0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(behind.poll([0, 0, 0, 0, 0, 0, 0, 5]).is_some());
        let mut past = PackGate::new(rx.clone(), true, [0, 0, 0, 0, 0, 0, 0, 5]);
        assert!(past.poll([0, 0, 0, 0, 0, 0, 0, 6]).is_none());
        let mut old = PackGate::new(rx, false, [0; 8]);
        assert!(old.poll([9; 8]).is_none(), "replica without the feature");
    }
}
