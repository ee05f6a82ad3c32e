//! Semi-synchronous commits on the primary (`ack_mode = "semi-sync"`).
//!
//! Replicas acknowledge what they hold: `Received` (fsynced in the replica
//! zrelay's spool, see [`crate::replication::spool`]) and `Ack` (committed by its
//! backend). The watermark W is the newest tid acknowledged at `ack_level`
//! by `min_acks` replicas. Client sessions on the primary never show a tid
//! above W (invariant 6): [`SemiSyncHooks`] holds the committing client's
//! `tpc_finish` reply, every `invalidateTransaction` and every reply that
//! carries a newer tid (`register` included: it is the point the backend
//! sends invalidations from) until W reaches it, and clamps
//! `lastTransaction` answers to W. The holding itself is the relay's generic
//! [`crate::relay::HoldUntil`].
//!
//! Degrade: when a commit has waited `ack_timeout_ms`, the primary releases
//! everything (the released position becomes [`RELEASE_ALL`]) until enough
//! replicas are back in sync (W reaches the backend's newest tid); with
//! `strict` it never degrades.
//!
//! [`SemiSyncState`] is I/O-free; [`SemiSync`] shares it between the
//! replica streams (which report acks) and [`run_coordinator`] (timers,
//! status, metrics).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::AckLevel;
use crate::relay::hooks::{HoldUntil, PendingCall};
use crate::relay::{
    ClientVerdict, LocalVerdict, ServerVerdict, SessionHooks, SessionInfo, WakeVerdict,
};
use crate::replication::txn::{tid_hex, Tid, Z64};
use crate::status::{SemiSyncStatus, StatusHub};
use crate::wire::calls::ServerMsg;
use crate::wire::{Message, Value};

/// The released position while degraded: every tid is visible.
pub const RELEASE_ALL: Tid = [0xff; 8];

const DEGRADED: &str = "zrelay_semisync_degraded";
const DEGRADES: &str = "zrelay_semisync_degrades_total";
const WAITING: &str = "zrelay_semisync_waiting_commits";
const ACK_WAIT: &str = "zrelay_semisync_ack_wait_seconds";

pub fn describe() {
    metrics::describe_gauge!(
        DEGRADED,
        "1 while a semi-sync primary has degraded to async (acknowledgements timed out), else 0."
    );
    metrics::describe_counter!(
        DEGRADES,
        "Times a semi-sync primary degraded to async after ack_timeout_ms."
    );
    metrics::describe_gauge!(
        WAITING,
        "Commits on the backend not yet acknowledged by min_acks replicas."
    );
    metrics::describe_histogram!(
        ACK_WAIT,
        metrics::Unit::Seconds,
        "Time from when the primary saw a commit until min_acks replicas acknowledged it."
    );
}

#[derive(Debug, Clone, Copy)]
pub struct SemiSyncConfig {
    pub min_acks: usize,
    pub level: AckLevel,
    pub timeout: Duration,
    pub strict: bool,
}

/// What one replica acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Acks {
    received: Tid,
    applied: Tid,
}

/// A change worth logging and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Degraded,
    Rearmed,
}

/// Bound on remembered unacknowledged commits (beyond it the oldest are
/// forgotten; the timeout is judged by the oldest remembered).
const MAX_WAITING: usize = 100_000;

pub struct SemiSyncState {
    cfg: SemiSyncConfig,
    replicas: BTreeMap<String, Acks>,
    /// Tids at or below it count as acknowledged: what the backend held when
    /// this primary started (nobody can tell what acknowledged them).
    base: Option<Tid>,
    /// Newest tid committed on the backend, as the feed saw it.
    last: Tid,
    /// Commits seen and not yet acknowledged, oldest first.
    waiting: VecDeque<(Tid, Instant)>,
    degraded: bool,
    degrades: u64,
    /// Ack waits measured since the last call of `take_waits`.
    waits: Vec<Duration>,
}

impl SemiSyncState {
    pub fn new(cfg: SemiSyncConfig) -> Self {
        SemiSyncState {
            cfg,
            replicas: BTreeMap::new(),
            base: None,
            last: Z64,
            waiting: VecDeque::new(),
            degraded: false,
            degrades: 0,
            waits: Vec::new(),
        }
    }

    /// W: the newest tid acknowledged at the configured level by
    /// `min_acks` replicas (never below the start position). `None` before
    /// the start position is known.
    pub fn watermark(&self) -> Option<Tid> {
        let base = self.base?;
        let mut acked: Vec<Tid> = self
            .replicas
            .values()
            .map(|a| match self.cfg.level {
                // An applied transaction was received as well.
                AckLevel::Received => a.received.max(a.applied),
                AckLevel::Applied => a.applied,
            })
            .collect();
        acked.sort_unstable_by(|a, b| b.cmp(a));
        let kth = match self.cfg.min_acks {
            0 => Some(RELEASE_ALL),
            k => acked.get(k - 1).copied(),
        };
        Some(kth.map_or(base, |t| t.max(base)))
    }

    /// What sessions may show: W, or everything while degraded; [`Z64`]
    /// while W is unknown.
    pub fn release(&self) -> Tid {
        if self.degraded {
            return RELEASE_ALL;
        }
        self.watermark().unwrap_or(Z64)
    }

    pub fn degraded(&self) -> bool {
        self.degraded
    }

    /// The backend's newest tid when this primary started.
    pub fn on_start(&mut self, tid: Tid, now: Instant) -> Option<Event> {
        if self.base.is_none() {
            self.base = Some(tid);
            self.last = self.last.max(tid);
        }
        self.settle(now)
    }

    /// The backend's newest tid (from the feed).
    pub fn on_commit(&mut self, tid: Tid, now: Instant) -> Option<Event> {
        if tid > self.last {
            self.last = tid;
            if !self.degraded && self.watermark().is_some_and(|w| tid > w) {
                if self.waiting.len() >= MAX_WAITING {
                    self.waiting.pop_front();
                }
                self.waiting.push_back((tid, now));
            }
        }
        self.settle(now)
    }

    pub fn on_received(&mut self, replica: &str, tid: Tid, now: Instant) -> Option<Event> {
        let a = self.replicas.entry(replica.to_string()).or_default();
        a.received = a.received.max(tid);
        self.settle(now)
    }

    pub fn on_applied(&mut self, replica: &str, tid: Tid, now: Instant) -> Option<Event> {
        let a = self.replicas.entry(replica.to_string()).or_default();
        a.applied = a.applied.max(tid);
        a.received = a.received.max(tid);
        self.settle(now)
    }

    /// A replica's stream ended: its acks no longer count.
    pub fn on_gone(&mut self, replica: &str, now: Instant) -> Option<Event> {
        self.replicas.remove(replica);
        self.settle(now)
    }

    /// Drops acknowledged commits; re-arms a degraded primary once the
    /// replicas caught up.
    fn settle(&mut self, now: Instant) -> Option<Event> {
        let w = self.watermark()?;
        while let Some((t, seen)) = self.waiting.front() {
            if *t > w {
                break;
            }
            self.waits.push(now.saturating_duration_since(*seen));
            self.waiting.pop_front();
        }
        if self.degraded && w >= self.last {
            self.degraded = false;
            return Some(Event::Rearmed);
        }
        None
    }

    /// When [`Self::tick`] has something to decide.
    pub fn deadline(&self) -> Option<Instant> {
        if self.degraded || self.cfg.strict {
            return None;
        }
        self.waiting
            .front()
            .map(|(_, seen)| *seen + self.cfg.timeout)
    }

    pub fn tick(&mut self, now: Instant) -> Option<Event> {
        match self.deadline() {
            Some(d) if d <= now => {
                self.degraded = true;
                self.degrades += 1;
                self.waiting.clear();
                Some(Event::Degraded)
            }
            _ => None,
        }
    }

    pub fn take_waits(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.waits)
    }

    fn status(&self, last_degraded_unix: Option<f64>) -> SemiSyncStatus {
        SemiSyncStatus {
            ack_level: match self.cfg.level {
                AckLevel::Received => "received",
                AckLevel::Applied => "applied",
            },
            min_acks: self.cfg.min_acks,
            strict: self.cfg.strict,
            degraded: self.degraded,
            watermark_tid: self.watermark().map(|t| tid_hex(&t)),
            waiting_commits: self.waiting.len(),
            degrades_total: self.degrades,
            last_degraded_unix,
        }
    }
}

/// Shared by the replica streams (acks) and the coordinator.
pub struct SemiSync {
    state: Mutex<SemiSyncState>,
    release: watch::Sender<Tid>,
    changed: Notify,
}

impl SemiSync {
    pub fn new(cfg: SemiSyncConfig) -> Arc<Self> {
        Arc::new(SemiSync {
            state: Mutex::new(SemiSyncState::new(cfg)),
            release: watch::channel(Z64).0,
            changed: Notify::new(),
        })
    }

    /// The released position sessions wait on.
    pub fn subscribe(&self) -> watch::Receiver<Tid> {
        self.release.subscribe()
    }

    /// Updates the state from a replica stream and wakes the coordinator.
    fn with(&self, f: impl FnOnce(&mut SemiSyncState) -> Option<Event>) {
        self.update(f);
        self.changed.notify_one();
    }

    /// Updates the state and publishes the released position.
    fn update(&self, f: impl FnOnce(&mut SemiSyncState) -> Option<Event>) {
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let ev = f(&mut st);
        let r = st.release();
        drop(st);
        self.release.send_if_modified(|cur| {
            let changed = *cur != r;
            *cur = r;
            changed
        });
        if let Some(ev) = ev {
            log_event(ev);
        }
    }

    /// `ack_level = "received"`: replicas are asked to spool and send
    /// `Received` (the Welcome lists the feature only then).
    pub fn counts_received(&self) -> bool {
        let st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        st.cfg.level == AckLevel::Received
    }

    pub fn received(&self, replica: &str, tid: Tid) {
        self.with(|s| s.on_received(replica, tid, Instant::now()));
    }

    pub fn applied(&self, replica: &str, tid: Tid) {
        self.with(|s| s.on_applied(replica, tid, Instant::now()));
    }

    pub fn gone(&self, replica: &str) {
        self.with(|s| s.on_gone(replica, Instant::now()));
    }
}

fn log_event(ev: Event) {
    match ev {
        Event::Degraded => {
            metrics::counter!(DEGRADES).increment(1);
            metrics::gauge!(DEGRADED).set(1.0);
            warn!("semi-sync: replicas did not acknowledge within ack_timeout_ms; degraded to async until they catch up");
        }
        Event::Rearmed => {
            metrics::gauge!(DEGRADED).set(0.0);
            info!("semi-sync: replicas back in sync; commits wait for acknowledgements again");
        }
    }
}

/// Follows the feed's newest tid, fires the ack timeout and keeps status
/// and metrics current.
///
/// `fence`: while it is up (a primary that lost its leader key, or a
/// switchover under way), the degrade timer is not run: degrading would
/// release replies held for commits no replica has, and such a commit is
/// lost when another node takes over. They stay held until their sessions
/// close (the client sees an unknown outcome, not an acknowledgement).
pub async fn run_coordinator(
    ss: Arc<SemiSync>,
    link: crate::replication::feed::BackendLink,
    mut last_tid: watch::Receiver<Tid>,
    status: Arc<StatusHub>,
    fence: Option<Arc<crate::role::fence::RoleCell>>,
    shutdown: CancellationToken,
) {
    metrics::gauge!(DEGRADED).set(0.0);
    metrics::counter!(DEGRADES).increment(0);
    let mut last_degraded: Option<f64> = None;
    // The start position: what the backend holds before any commit this
    // process could have held back.
    loop {
        match link.open(true).await {
            Ok((_conn, last)) => {
                ss.update(|s| s.on_start(last, Instant::now()));
                break;
            }
            Err(e) => {
                warn!(error = %e, "semi-sync: backend not reachable yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
    loop {
        let t = *last_tid.borrow_and_update();
        if t != Z64 {
            ss.update(|s| s.on_commit(t, Instant::now()));
        }
        let fenced = fence.as_ref().is_some_and(|f| f.fenced());
        ss.update(|s| {
            if fenced {
                return None;
            }
            let ev = s.tick(Instant::now());
            if ev == Some(Event::Degraded) {
                last_degraded = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs_f64());
            }
            ev
        });
        let (deadline, st) = {
            let mut s = match ss.state.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            for w in s.take_waits() {
                metrics::histogram!(ACK_WAIT).record(w.as_secs_f64());
            }
            metrics::gauge!(WAITING).set(s.waiting.len() as f64);
            (s.deadline(), s.status(last_degraded))
        };
        status.update(|s| s.semisync = Some(st));
        let wake = deadline
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
            .min(Instant::now() + Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = last_tid.changed() => if r.is_err() { return },
            _ = ss.changed.notified() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

// ------------------------------------------------------------- sessions

/// Session hooks of a semi-sync primary, wrapped around the role's own.
pub struct SemiSyncHooks {
    inner: Box<dyn SessionHooks>,
    release: watch::Receiver<Tid>,
}

impl SemiSyncHooks {
    pub fn new(inner: Box<dyn SessionHooks>, release: watch::Receiver<Tid>) -> Self {
        SemiSyncHooks { inner, release }
    }

    fn hold(&self, until: Tid) -> ServerVerdict {
        ServerVerdict::Hold(HoldUntil {
            until,
            release: self.release.clone(),
        })
    }
}

fn tid_of(v: &Value) -> Option<Tid> {
    v.as_bytes().and_then(|b| b.try_into().ok())
}

/// The tid a reply shows the client, by the call it answers.
fn reply_tid(method: &str, msg: &Message) -> Option<Tid> {
    match method {
        "tpc_finish" | "lastTransaction" | "register" => tid_of(&msg.args),
        // (tid, oids)
        "getInvalidations" => match &*msg.args {
            Value::Tuple(a) | Value::List(a) => a.first().and_then(tid_of),
            _ => None,
        },
        // (data, start, end)
        "loadBefore" => match &*msg.args {
            Value::Tuple(a) | Value::List(a) => a.get(1).and_then(tid_of),
            _ => None,
        },
        _ => None,
    }
}

/// Whether a reply that shows no tid above the watermark `w` may be
/// delivered ahead of invalidations held for its client (`strict`, or
/// while a commit waits): then a client's reads do not wait for a commit it
/// is not told about. Only replies whose every tid is `<= w`, to calls
/// whose order relative to invalidations the client does not depend on:
/// `ping`, `new_oids`, and `loadBefore` of a current revision (end None)
/// started at or before `w` — the server answered it after committing
/// every held transaction, so none of them touched that object (else it
/// would have started there), and the client caches it as current at a
/// position it has been told of.
fn may_overtake(method: &str, msg: &Message, w: &Tid) -> bool {
    match method {
        "ping" | "new_oids" => true,
        "loadBefore" => match &*msg.args {
            Value::Tuple(a) | Value::List(a) if a.len() == 3 => {
                matches!(a[2], Value::None)
                    && a[1].as_bytes().is_some_and(|s| s.len() == 8 && s <= &w[..])
            }
            _ => false,
        },
        _ => false,
    }
}

/// What a session does with a message showing a tid above W.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Above {
    /// Answer W instead: a position that promises nothing else.
    Clamp,
    /// Deliver it (and everything behind it) once W reaches its tid.
    Hold,
}

fn above_watermark(answers: Option<&str>) -> Above {
    match answers {
        // A position only: a lower one is still true of what the client
        // was shown.
        Some("lastTransaction") => Above::Clamp,
        // `register` is not only a position: the backend registered the
        // session at its newest tid L and sends it invalidations only for
        // commits after L. Answered W < L, the client would take its cache
        // as valid up to W and never hear of (W, L]: a reconnecting cache
        // at W keeps its stale entries ("Cache up to date"), and a door
        // that offloads loads at the client's snapshot W to a replica that
        // has not applied (W, L] yet stores "current" revisions no
        // invalidation will ever correct (a mixed snapshot). Held, the
        // client is told L once W reaches it, exactly what it is
        // registered at.
        //
        // Every other tid-carrying answer (tpc_finish, getInvalidations,
        // loadBefore) and every invalidation is held as well.
        _ => Above::Hold,
    }
}

impl SessionHooks for SemiSyncHooks {
    fn on_client_message(&mut self, info: &SessionInfo, msg: &Message) -> ClientVerdict {
        self.inner.on_client_message(info, msg)
    }

    fn on_server_message(
        &mut self,
        info: &SessionInfo,
        msg: &Message,
        answers: Option<&PendingCall>,
    ) -> ServerVerdict {
        let v = self.inner.on_server_message(info, msg, answers);
        if !matches!(v, ServerVerdict::Forward) {
            return v;
        }
        let release = *self.release.borrow();
        if release == RELEASE_ALL {
            return v;
        }
        let tid = match answers {
            Some(call) if msg.flag != crate::wire::Flag::Error => {
                match reply_tid(&call.method, msg) {
                    Some(t) if t > release => t,
                    _ if may_overtake(&call.method, msg, &release) => {
                        return ServerVerdict::Overtake
                    }
                    _ => return v,
                }
            }
            Some(_) => return v,
            None => match ServerMsg::parse(msg) {
                Ok(ServerMsg::InvalidateTransaction { tid, .. }) => {
                    match <[u8; 8]>::try_from(tid) {
                        Ok(t) if t > release => t,
                        _ => return v,
                    }
                }
                _ => return v,
            },
        };
        match above_watermark(answers.map(|c| &*c.method)) {
            Above::Clamp if release != Z64 => {
                tracing::debug!(
                    conn = info.conn_id,
                    tid = %tid_hex(&tid),
                    watermark = %tid_hex(&release),
                    "semi-sync: lastTransaction answer clamped to the watermark"
                );
                ServerVerdict::Replace(vec![Message::reply(
                    msg.msgid.clone(),
                    Value::bytes(release.to_vec()),
                )])
            }
            Above::Clamp | Above::Hold => {
                if answers.is_some_and(|c| c.method == "register") {
                    tracing::debug!(
                        conn = info.conn_id,
                        tid = %tid_hex(&tid),
                        watermark = %tid_hex(&release),
                        "semi-sync: register answer held until acknowledged"
                    );
                }
                self.hold(tid)
            }
        }
    }

    fn on_close(&mut self, info: &SessionInfo) {
        self.inner.on_close(info)
    }

    fn on_local_reply(&mut self, info: &SessionInfo, msg: &Message) -> LocalVerdict {
        self.inner.on_local_reply(info, msg)
    }

    fn on_deferred(&mut self, info: &SessionInfo, msg: &Message, expired: bool) -> ClientVerdict {
        self.inner.on_deferred(info, msg, expired)
    }

    fn wake_signal(&mut self) -> Option<watch::Receiver<u64>> {
        self.inner.wake_signal()
    }

    fn on_wake(&mut self, info: &SessionInfo) -> WakeVerdict {
        self.inner.on_wake(info)
    }

    fn on_local_lost(&mut self, info: &SessionInfo) {
        self.inner.on_local_lost(info)
    }

    fn early_route(&mut self) -> Option<Arc<dyn crate::relay::UpstreamOpener>> {
        self.inner.early_route()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u8) -> Tid {
        [0, 0, 0, 0, 0, 0, 0, n]
    }

    fn cfg(min_acks: usize, level: AckLevel, strict: bool) -> SemiSyncConfig {
        SemiSyncConfig {
            min_acks,
            level,
            timeout: Duration::from_millis(100),
            strict,
        }
    }

    #[test]
    fn watermark_is_the_kth_newest_ack_never_below_start() {
        let now = Instant::now();
        let mut s = SemiSyncState::new(cfg(2, AckLevel::Applied, false));
        assert_eq!(s.watermark(), None);
        assert_eq!(s.release(), Z64);
        s.on_start(t(5), now);
        assert_eq!(s.watermark(), Some(t(5)));
        s.on_commit(t(9), now);
        s.on_applied("a", t(8), now);
        assert_eq!(s.watermark(), Some(t(5)), "one ack of two");
        s.on_applied("b", t(7), now);
        assert_eq!(s.watermark(), Some(t(7)));
        s.on_applied("c", t(9), now);
        assert_eq!(s.watermark(), Some(t(8)));
        s.on_gone("a", now);
        assert_eq!(s.watermark(), Some(t(7)));
    }

    #[test]
    fn received_level_counts_applied_too_applied_level_not_received() {
        let now = Instant::now();
        let mut r = SemiSyncState::new(cfg(1, AckLevel::Received, false));
        let mut a = SemiSyncState::new(cfg(1, AckLevel::Applied, false));
        for s in [&mut r, &mut a] {
            s.on_start(t(1), now);
            s.on_received("x", t(4), now);
            s.on_applied("y", t(3), now);
        }
        assert_eq!(r.watermark(), Some(t(4)));
        assert_eq!(a.watermark(), Some(t(3)));
    }

    #[test]
    fn degrades_after_timeout_and_rearms_when_in_sync() {
        let t0 = Instant::now();
        let mut s = SemiSyncState::new(cfg(1, AckLevel::Applied, false));
        s.on_start(t(1), t0);
        s.on_commit(t(2), t0);
        assert_eq!(s.deadline(), Some(t0 + Duration::from_millis(100)));
        assert_eq!(s.tick(t0 + Duration::from_millis(99)), None);
        assert_eq!(s.release(), t(1));
        assert_eq!(
            s.tick(t0 + Duration::from_millis(100)),
            Some(Event::Degraded)
        );
        assert_eq!(s.release(), RELEASE_ALL);
        assert_eq!(s.deadline(), None);
        s.on_commit(t(3), t0);
        assert_eq!(s.on_applied("r", t(2), t0), None, "still behind");
        assert_eq!(s.release(), RELEASE_ALL);
        assert_eq!(s.on_applied("r", t(3), t0), Some(Event::Rearmed));
        assert_eq!(s.release(), t(3));
        assert_eq!(s.degrades, 1);
    }

    #[test]
    fn strict_never_degrades_and_acks_measure_waits() {
        let t0 = Instant::now();
        let mut s = SemiSyncState::new(cfg(1, AckLevel::Received, true));
        s.on_start(t(1), t0);
        s.on_commit(t(2), t0);
        assert_eq!(s.deadline(), None);
        assert_eq!(s.tick(t0 + Duration::from_secs(3600)), None);
        assert_eq!(s.release(), t(1));
        s.on_received("r", t(2), t0 + Duration::from_millis(5));
        assert_eq!(s.release(), t(2));
        assert_eq!(s.take_waits(), vec![Duration::from_millis(5)]);
    }

    #[test]
    fn register_is_held_last_transaction_clamped() {
        // A register answered below the backend's registration point would
        // lose the invalidations in between (see above_watermark).
        assert_eq!(above_watermark(Some("register")), Above::Hold);
        assert_eq!(above_watermark(Some("lastTransaction")), Above::Clamp);
        for m in ["tpc_finish", "getInvalidations", "loadBefore"] {
            assert_eq!(above_watermark(Some(m)), Above::Hold, "{m}");
        }
        assert_eq!(above_watermark(None), Above::Hold, "invalidations");
    }

    #[test]
    fn reply_tids() {
        let tid = Value::bytes(t(7).to_vec());
        let r = Message::reply(Value::Int(1), tid.clone());
        assert_eq!(reply_tid("tpc_finish", &r), Some(t(7)));
        assert_eq!(reply_tid("lastTransaction", &r), Some(t(7)));
        let lb = Message::reply(
            Value::Int(2),
            Value::Tuple(vec![Value::bytes(b"x".to_vec()), tid.clone(), Value::None]),
        );
        assert_eq!(reply_tid("loadBefore", &lb), Some(t(7)));
        let gi = Message::reply(Value::Int(3), Value::Tuple(vec![tid, Value::List(vec![])]));
        assert_eq!(reply_tid("getInvalidations", &gi), Some(t(7)));
        assert_eq!(reply_tid("vote", &r), None);
    }

    #[test]
    fn only_replies_showing_nothing_above_w_overtake() {
        let load = |start: u8, end: Value| {
            Message::reply(
                Value::Int(1),
                Value::Tuple(vec![
                    Value::bytes(b"x".to_vec()),
                    Value::bytes(t(start).to_vec()),
                    end,
                ]),
            )
        };
        let w = t(5);
        assert!(may_overtake("loadBefore", &load(5, Value::None), &w));
        assert!(may_overtake("loadBefore", &load(3, Value::None), &w));
        // Started above W: held instead (never reaches this check).
        assert!(!may_overtake("loadBefore", &load(6, Value::None), &w));
        // A past revision names the next one's tid: keeps its place.
        let ended = load(3, Value::bytes(t(4).to_vec()));
        assert!(!may_overtake("loadBefore", &ended, &w));
        assert!(!may_overtake(
            "loadBefore",
            &Message::reply(Value::Int(1), Value::None),
            &w
        ));
        let ok = Message::reply(Value::Int(2), Value::None);
        assert!(may_overtake("ping", &ok, &w));
        assert!(may_overtake("new_oids", &ok, &w));
        for m in [
            "history",
            "undoLog",
            "getTid",
            "lastTransaction",
            "iterator_next",
        ] {
            assert!(!may_overtake(m, &ok, &w), "{m}");
        }
    }
}
