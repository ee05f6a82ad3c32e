//! The primary's side of one replica connection, as a state machine without
//! I/O. The network task feeds it events (the replica's messages, history
//! transactions, live commits, the clock) and sends what it returns; it owns
//! no sockets, no backend connection and no clock.
//!
//! # Driving it
//!
//! 1. Subscribe to the live commit feed (every committed transaction, in
//!    commit order) **before** reading any history, and hand each item to
//!    [`SenderState::on_live_txn`] (a lost feed item, e.g. a lagged
//!    broadcast, is reported with [`SenderState::on_live_lost`]).
//! 2. Read the replica's `Hello`, look up the primary's digest of the
//!    transaction `hello.last_tid`, call [`SenderState::on_hello`], send the
//!    `Welcome` it returns (or the `Refuse` from the [`Refusal`], then close).
//! 3. While [`SenderState::start_history`] returns `Some(after)`, open a
//!    backend iterator on the tids after `after` (`iterator_start(
//!    tid_after(after), None)`), hand each transaction to
//!    [`SenderState::on_history_txn`] and send what it returns, then call
//!    [`SenderState::on_history_end`] when the iterator is exhausted. A
//!    history round whose live queue overflowed meanwhile is followed by
//!    another one (start_history returns `Some` again).
//! 4. Always: send whatever [`SenderState::poll_send`] returns (live
//!    transactions, the `Live` marker, heartbeats), sleep at most until
//!    [`SenderState::next_wakeup`], and pass the replica's acks to
//!    [`SenderState::on_ack`] (an error there ends the connection).
//!
//! # Guarantees
//!
//! * Every `Txn` message has a tid greater than all sent before it on this
//!   connection and names the previous one (`prev`): no duplicate, no
//!   reordering, and the replica can detect a gap.
//! * Catch-up → live with no gap and no duplicate: the live queue keeps every
//!   commit observed since subscription (minus what history already sent);
//!   it is only trusted after a history round during which it never lost an
//!   item, and history is read by a fresh iterator (which sees every commit
//!   that happened before it was opened).
//! * Bounded memory: the live queue is capped in transactions and bytes; on
//!   overflow it is emptied and the state reads history again from the last
//!   tid sent. The unacked ring is capped at [`UNACKED_RING_LIMIT`] buckets.
//! * Acks are monotonic and never beyond the last tid sent.
//! * A heartbeat is due when nothing was sent for `heartbeat_interval`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::replication::protocol::{
    Hello, ProtocolError, RefuseReason, StreamMsg, PROTOCOL_VERSION,
};
use crate::replication::txn::{tid_delta_secs, tid_hex, Tid, Txn, Z64};

/// Maximum number of buckets in the unacked ring; past it the two oldest
/// buckets are merged (counts stay exact in total, only their split blurs).
pub const UNACKED_RING_LIMIT: usize = 1024;

/// Configuration of one sender.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub cluster: String,
    pub storage: String,
    pub primary_node: String,
    /// Send a heartbeat when nothing was sent for this long.
    pub heartbeat_interval: Duration,
    /// Live queue limit in transactions (at least 1 is used).
    pub live_queue_limit_txns: usize,
    /// Live queue limit in bytes ([`Txn::size_bytes`]); a single
    /// transaction larger than this always overflows to history reading.
    pub live_queue_limit_bytes: u64,
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderMode {
    /// No Hello yet.
    AwaitingHello,
    /// Reading history (and queueing live commits) until caught up.
    CatchingUp,
    /// Sending live commits as they arrive.
    Live,
    /// The Hello was refused; nothing more will be sent.
    Refused,
}

impl SenderMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            SenderMode::AwaitingHello => "awaiting_hello",
            SenderMode::CatchingUp => "catching_up",
            SenderMode::Live => "live",
            SenderMode::Refused => "refused",
        }
    }
}

/// A refused Hello: send [`Refusal::to_msg`] and close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefuseReason,
    pub message: String,
    /// The primary's newest tid, told to the refused replica.
    pub primary_last_tid: Option<Tid>,
    /// See [`StreamMsg::Refuse`]: set by the feed for a diverged replica.
    pub rewind_to: Option<Tid>,
}

impl Refusal {
    pub fn new(reason: RefuseReason, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            message: message.into(),
            primary_last_tid: None,
            rewind_to: None,
        }
    }

    pub fn to_msg(&self) -> StreamMsg {
        StreamMsg::Refuse {
            reason: self.reason,
            message: self.message.clone(),
            primary_last_tid: self.primary_last_tid,
            rewind_to: self.rewind_to,
        }
    }
}

/// Lag of this replica as the primary sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SenderLag {
    /// Commit time of the primary's newest tid − commit time of the acked
    /// tid; 0 only when they are equal.
    pub seconds: f64,
    /// Transactions sent but not yet acked (a partially acked merged bucket
    /// counts whole, so this may overstate, never understate).
    pub unacked_txns: u64,
    /// Bytes of those transactions.
    pub unacked_bytes: u64,
    /// Live transactions queued, not yet sent.
    pub queued_txns: u64,
    pub queued_bytes: u64,
    /// History is still being read: more is unsent than the figures show.
    pub catching_up: bool,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderStats {
    pub txns_sent: u64,
    pub bytes_sent: u64,
    pub history_rounds: u64,
    pub live_overflows: u64,
    pub heartbeats_sent: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    last: Tid,
    txns: u64,
    bytes: u64,
}

/// The state of one replica connection on the primary.
#[derive(Debug)]
pub struct SenderState {
    cfg: SenderConfig,
    epoch: u64,
    mode: SenderMode,
    replica_node: Option<String>,
    last_sent: Tid,
    acked: Tid,
    primary_last: Tid,
    /// A history round is open (between start_history and on_history_end).
    reading: bool,
    /// The live queue lost items during the open round: do not go live.
    dirty: bool,
    live: VecDeque<Arc<Txn>>,
    live_bytes: u64,
    /// Highest tid ever seen on the live feed (order check).
    live_high: Tid,
    live_marker_pending: bool,
    last_send_at: Option<Instant>,
    unacked: VecDeque<Bucket>,
    unacked_txns: u64,
    unacked_bytes: u64,
    stats: SenderStats,
}

impl SenderState {
    pub fn new(cfg: SenderConfig) -> Self {
        SenderState {
            cfg,
            mode: SenderMode::AwaitingHello,
            replica_node: None,
            last_sent: Z64,
            acked: Z64,
            primary_last: Z64,
            reading: false,
            dirty: false,
            live: VecDeque::new(),
            live_bytes: 0,
            live_high: Z64,
            live_marker_pending: false,
            last_send_at: None,
            unacked: VecDeque::new(),
            unacked_txns: 0,
            unacked_bytes: 0,
            stats: SenderStats::default(),
            epoch: 0,
        }
    }

    /// This feeder's cluster epoch (see `crate::role`): sent in the Welcome;
    /// a replica that knows a newer one is refused (this feeder is stale).
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// Handles the replica's Hello. `primary_last_tid` is the primary's
    /// `lastTransaction`; `primary_digest` is the digest of the primary's
    /// transaction `hello.last_tid` (`None` if the primary does not have that
    /// tid; ignored when `hello.last_tid` is [`Z64`]).
    ///
    /// Divergence rule: a replica with no transaction is fine; otherwise the
    /// primary must have the replica's last tid, with the same digest, and
    /// that tid may not be newer than the primary's last.
    pub fn on_hello(
        &mut self,
        hello: &Hello,
        primary_last_tid: Tid,
        primary_digest: Option<[u8; 32]>,
        now: Instant,
    ) -> Result<StreamMsg, Refusal> {
        let refusal = self.check_hello(hello, primary_last_tid, primary_digest);
        if let Err(r) = refusal {
            if self.mode == SenderMode::AwaitingHello {
                self.mode = SenderMode::Refused;
            }
            return Err(Refusal {
                primary_last_tid: Some(primary_last_tid),
                ..r
            });
        }
        self.mode = SenderMode::CatchingUp;
        self.replica_node = Some(hello.node.clone());
        self.last_sent = hello.last_tid;
        self.acked = hello.last_tid;
        self.primary_last = self.primary_last.max(primary_last_tid).max(hello.last_tid);
        self.trim_live();
        self.last_send_at = Some(now);
        Ok(StreamMsg::Welcome {
            version: PROTOCOL_VERSION,
            node: self.cfg.primary_node.clone(),
            primary_last_tid: self.primary_last,
            features: crate::replication::protocol::primary_features(),
            epoch: Some(self.epoch),
        })
    }

    fn check_hello(
        &self,
        hello: &Hello,
        primary_last_tid: Tid,
        primary_digest: Option<[u8; 32]>,
    ) -> Result<(), Refusal> {
        use RefuseReason::*;
        if self.mode != SenderMode::AwaitingHello {
            return Err(Refusal::new(Protocol, "a second Hello on one connection"));
        }
        if hello.version != PROTOCOL_VERSION {
            return Err(Refusal::new(
                VersionMismatch,
                format!(
                    "protocol version {} offered, {} spoken",
                    hello.version, PROTOCOL_VERSION
                ),
            ));
        }
        if hello.cluster != self.cfg.cluster {
            return Err(Refusal::new(
                WrongCluster,
                format!(
                    "cluster {:?} here, {:?} asked",
                    self.cfg.cluster, hello.cluster
                ),
            ));
        }
        if hello.storage != self.cfg.storage {
            return Err(Refusal::new(
                WrongStorage,
                format!(
                    "storage {:?} here, {:?} asked",
                    self.cfg.storage, hello.storage
                ),
            ));
        }
        if let Some(e) = hello.epoch.filter(|e| *e > self.epoch) {
            return Err(Refusal::new(
                StaleEpoch,
                format!(
                    "replica knows epoch {e}, this feeder is at epoch {}: it was fenced out",
                    self.epoch
                ),
            ));
        }
        if hello.node == self.cfg.primary_node {
            return Err(Refusal::new(
                Protocol,
                format!("node {:?} connected to itself", hello.node),
            ));
        }
        if hello.last_tid == Z64 {
            return Ok(());
        }
        let t = tid_hex(&hello.last_tid);
        if hello.last_tid > primary_last_tid {
            return Err(Refusal::new(
                Diverged,
                format!(
                    "replica's last tid {t} is newer than the primary's {}",
                    tid_hex(&primary_last_tid)
                ),
            ));
        }
        match (primary_digest, hello.last_digest) {
            (None, _) => Err(Refusal::new(
                Diverged,
                format!("the primary has no transaction {t}"),
            )),
            (Some(_), None) => Err(Refusal::new(
                Diverged,
                format!("replica sent no digest for its last tid {t}"),
            )),
            (Some(p), Some(r)) if p != r => Err(Refusal::new(
                Diverged,
                format!("transaction {t} differs between primary and replica"),
            )),
            _ => Ok(()),
        }
    }

    /// The exclusive lower bound of the history still to read (the last tid
    /// sent), while catching up.
    pub fn next_history_start(&self) -> Option<Tid> {
        (self.mode == SenderMode::CatchingUp).then_some(self.last_sent)
    }

    /// Opens a history round: `Some(after)` means "open a fresh iterator on
    /// the tids after `after`". `None` when not catching up or a round is
    /// already open.
    pub fn start_history(&mut self) -> Option<Tid> {
        if self.mode != SenderMode::CatchingUp || self.reading {
            return None;
        }
        self.reading = true;
        self.dirty = false;
        self.stats.history_rounds += 1;
        Some(self.last_sent)
    }

    /// Whether a history round is open.
    pub fn reading_history(&self) -> bool {
        self.reading
    }

    /// One transaction from the open history round. Returns the message to
    /// send, or `None` if it was already sent (or no round is open).
    pub fn on_history_txn(&mut self, txn: Arc<Txn>, now: Instant) -> Option<StreamMsg> {
        if !self.reading || self.mode != SenderMode::CatchingUp || txn.tid <= self.last_sent {
            return None;
        }
        self.primary_last = self.primary_last.max(txn.tid);
        let msg = self.emit(&txn, now);
        self.trim_live();
        Some(msg)
    }

    /// The open history round's iterator is exhausted. Goes live unless the
    /// live queue lost items during the round (then another round is due).
    pub fn on_history_end(&mut self) {
        if !self.reading || self.mode != SenderMode::CatchingUp {
            return;
        }
        self.reading = false;
        if !self.dirty {
            self.mode = SenderMode::Live;
            self.live_marker_pending = true;
        }
    }

    /// One commit from the live feed (in commit order, from subscription on).
    pub fn on_live_txn(&mut self, txn: Arc<Txn>) {
        if self.mode == SenderMode::Refused {
            return;
        }
        self.primary_last = self.primary_last.max(txn.tid);
        if txn.tid <= self.last_sent {
            // Already sent (read from history): the expected duplicate.
            self.live_high = self.live_high.max(txn.tid);
            return;
        }
        if txn.tid <= self.live_high {
            // The feed went backwards: do not guess, re-read history.
            self.overflow();
            return;
        }
        self.live_high = txn.tid;
        self.live_bytes += txn.size_bytes();
        self.live.push_back(txn);
        if self.live.len() > self.cfg.live_queue_limit_txns.max(1)
            || self.live_bytes > self.cfg.live_queue_limit_bytes
        {
            self.overflow();
        }
    }

    /// The live feed lost items (e.g. the subscription lagged): the queue can
    /// no longer be trusted; fall back to history.
    pub fn on_live_lost(&mut self) {
        if self.mode != SenderMode::Refused {
            self.overflow();
        }
    }

    fn overflow(&mut self) {
        self.stats.live_overflows += 1;
        self.live.clear();
        self.live_bytes = 0;
        match self.mode {
            SenderMode::Live => {
                self.mode = SenderMode::CatchingUp;
                self.reading = false;
                self.dirty = false;
                self.live_marker_pending = false;
            }
            SenderMode::CatchingUp => self.dirty = self.reading,
            // Before the Hello no round has started: the first one will open
            // its iterator after this point.
            SenderMode::AwaitingHello | SenderMode::Refused => {}
        }
    }

    /// The next message to send now, if any: the `Live` marker, queued live
    /// transactions (in Live mode), or a heartbeat when nothing was sent for
    /// `heartbeat_interval`. `unix_ms` is the wall clock for heartbeats.
    pub fn poll_send(&mut self, now: Instant, unix_ms: u64) -> Option<StreamMsg> {
        if !matches!(self.mode, SenderMode::CatchingUp | SenderMode::Live) {
            return None;
        }
        if self.live_marker_pending {
            self.live_marker_pending = false;
            self.last_send_at = Some(now);
            return Some(StreamMsg::Live {
                primary_last_tid: self.primary_last,
            });
        }
        if self.mode == SenderMode::Live {
            while let Some(txn) = self.live.pop_front() {
                self.live_bytes -= txn.size_bytes();
                if txn.tid > self.last_sent {
                    return Some(self.emit(&txn, now));
                }
            }
        }
        if self.heartbeat_due(now) {
            self.last_send_at = Some(now);
            self.stats.heartbeats_sent += 1;
            return Some(StreamMsg::Heartbeat {
                primary_last_tid: self.primary_last,
                primary_time_unix_ms: unix_ms,
            });
        }
        None
    }

    /// Whether [`Self::poll_send`] has a message other than a heartbeat.
    pub fn has_pending(&self) -> bool {
        self.live_marker_pending || (self.mode == SenderMode::Live && !self.live.is_empty())
    }

    fn heartbeat_due(&self, now: Instant) -> bool {
        self.last_send_at.map_or(true, |t| {
            now.saturating_duration_since(t) >= self.cfg.heartbeat_interval
        })
    }

    /// When the next heartbeat falls due (sleep no longer than this).
    pub fn next_wakeup(&self) -> Option<Instant> {
        match self.mode {
            SenderMode::CatchingUp | SenderMode::Live => {
                self.last_send_at.map(|t| t + self.cfg.heartbeat_interval)
            }
            _ => None,
        }
    }

    /// The replica applied everything up to `tid`.
    pub fn on_ack(&mut self, tid: Tid) -> Result<(), ProtocolError> {
        if !matches!(self.mode, SenderMode::CatchingUp | SenderMode::Live) {
            return Err(ProtocolError::Unexpected {
                got: "ack",
                state: self.mode.as_str(),
            });
        }
        if tid > self.last_sent {
            return Err(ProtocolError::AckBeyondSent {
                ack: tid,
                last_sent: self.last_sent,
            });
        }
        if tid < self.acked {
            return Err(ProtocolError::AckRegressed {
                ack: tid,
                acked: self.acked,
            });
        }
        self.acked = tid;
        while let Some(b) = self.unacked.front() {
            if b.last > tid {
                break;
            }
            self.unacked_txns -= b.txns;
            self.unacked_bytes -= b.bytes;
            self.unacked.pop_front();
        }
        Ok(())
    }

    /// Lag, given the primary's newest tid (the larger of it and what this
    /// state has seen is used).
    pub fn lag(&self, primary_last_tid: Tid) -> SenderLag {
        let newest = primary_last_tid.max(self.primary_last);
        SenderLag {
            seconds: tid_delta_secs(&newest, &self.acked),
            unacked_txns: self.unacked_txns,
            unacked_bytes: self.unacked_bytes,
            queued_txns: self.live.len() as u64,
            queued_bytes: self.live_bytes,
            catching_up: self.mode != SenderMode::Live,
        }
    }

    pub fn mode(&self) -> SenderMode {
        self.mode
    }
    pub fn last_sent(&self) -> Tid {
        self.last_sent
    }
    pub fn acked(&self) -> Tid {
        self.acked
    }
    /// Newest primary tid this state knows of.
    pub fn primary_last_tid(&self) -> Tid {
        self.primary_last
    }
    /// The replica's node name, once its Hello was accepted.
    pub fn replica_node(&self) -> Option<&str> {
        self.replica_node.as_deref()
    }
    pub fn stats(&self) -> SenderStats {
        self.stats
    }
    pub fn config(&self) -> &SenderConfig {
        &self.cfg
    }

    fn emit(&mut self, txn: &Txn, now: Instant) -> StreamMsg {
        let prev = self.last_sent;
        debug_assert!(txn.tid > prev);
        self.last_sent = txn.tid;
        self.last_send_at = Some(now);
        let size = txn.size_bytes();
        self.stats.txns_sent += 1;
        self.stats.bytes_sent += size;
        self.unacked_txns += 1;
        self.unacked_bytes += size;
        if self.unacked.len() >= UNACKED_RING_LIMIT {
            if let (Some(a), Some(b)) = (self.unacked.pop_front(), self.unacked.pop_front()) {
                self.unacked.push_front(Bucket {
                    last: b.last,
                    txns: a.txns + b.txns,
                    bytes: a.bytes + b.bytes,
                });
            }
        }
        self.unacked.push_back(Bucket {
            last: txn.tid,
            txns: 1,
            bytes: size,
        });
        StreamMsg::Txn {
            prev,
            txn: txn.clone(),
        }
    }

    /// Drops queued live transactions already sent.
    fn trim_live(&mut self) {
        while let Some(front) = self.live.front() {
            if front.tid > self.last_sent {
                break;
            }
            self.live_bytes -= front.size_bytes();
            self.live.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::replication::txn::{tid_from_u64, tid_to_u64, Record};

    const HB: Duration = Duration::from_secs(5);

    fn cfg(txns: usize, bytes: u64) -> SenderConfig {
        SenderConfig {
            cluster: "c".into(),
            storage: "1".into(),
            primary_node: "p".into(),
            heartbeat_interval: HB,
            live_queue_limit_txns: txns,
            live_queue_limit_bytes: bytes,
        }
    }

    fn t(n: u64) -> Tid {
        tid_from_u64(0x03f6_dd11_0000_0000 + n)
    }

    fn txn(n: u64) -> Arc<Txn> {
        Arc::new(Txn {
            tid: t(n),
            status: " ".into(),
            user: Bytes::new(),
            description: Bytes::from(format!("txn {n}")),
            extension: Bytes::new(),
            records: vec![Record {
                oid: n.to_be_bytes(),
                data: Some(Bytes::from(vec![n as u8; 10])),
                data_txn: None,
                blob: None,
            }],
        })
    }

    fn hello(last: Tid, digest: Option<[u8; 32]>) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            cluster: "c".into(),
            storage: "1".into(),
            node: "r".into(),
            last_tid: last,
            last_digest: digest,
            client_addr: None,
            replication_addr: None,
            features: vec![],
            epoch: None,
            promotion: None,
        }
    }

    fn sent_tid(m: &Option<StreamMsg>) -> Option<u64> {
        match m {
            Some(StreamMsg::Txn { txn, .. }) => Some(tid_to_u64(&txn.tid) - tid_to_u64(&t(0))),
            _ => None,
        }
    }

    fn accepted(limit: usize) -> (SenderState, Instant) {
        let now = Instant::now();
        let mut s = SenderState::new(cfg(limit, 1 << 20));
        let w = s.on_hello(&hello(Z64, None), t(0), None, now).unwrap();
        assert!(matches!(
            w,
            StreamMsg::Welcome {
                version: PROTOCOL_VERSION,
                ..
            }
        ));
        (s, now)
    }

    #[test]
    fn hello_checks() {
        let now = Instant::now();
        let d = txn(3).digest();
        // (hello, primary's last tid, primary's digest of hello.last_tid, expected refusal)
        type Case = (Hello, Tid, Option<[u8; 32]>, Option<RefuseReason>);
        let cases: Vec<Case> = vec![
            (hello(Z64, None), t(5), None, None),
            (hello(t(3), Some(d)), t(5), Some(d), None),
            (hello(t(5), Some(d)), t(5), Some(d), None),
            (
                Hello {
                    version: 2,
                    ..hello(Z64, None)
                },
                t(5),
                None,
                Some(RefuseReason::VersionMismatch),
            ),
            (
                Hello {
                    cluster: "x".into(),
                    ..hello(Z64, None)
                },
                t(5),
                None,
                Some(RefuseReason::WrongCluster),
            ),
            (
                Hello {
                    storage: "x".into(),
                    ..hello(Z64, None)
                },
                t(5),
                None,
                Some(RefuseReason::WrongStorage),
            ),
            (
                Hello {
                    node: "p".into(),
                    ..hello(Z64, None)
                },
                t(5),
                None,
                Some(RefuseReason::Protocol),
            ),
            (
                hello(t(3), Some(d)),
                t(5),
                None,
                Some(RefuseReason::Diverged),
            ),
            (
                hello(t(3), Some(d)),
                t(5),
                Some([0; 32]),
                Some(RefuseReason::Diverged),
            ),
            (
                hello(t(3), None),
                t(5),
                Some(d),
                Some(RefuseReason::Diverged),
            ),
            (
                hello(t(6), Some(d)),
                t(5),
                Some(d),
                Some(RefuseReason::Diverged),
            ),
        ];
        for (i, (h, last, pd, want)) in cases.into_iter().enumerate() {
            let mut s = SenderState::new(cfg(10, 1 << 20));
            let got = s.on_hello(&h, last, pd, now);
            match want {
                None => {
                    assert!(got.is_ok(), "case {i}: {got:?}");
                    assert_eq!(s.mode(), SenderMode::CatchingUp);
                    assert_eq!(s.last_sent(), h.last_tid);
                    assert_eq!(s.acked(), h.last_tid);
                    assert_eq!(s.replica_node(), Some("r"));
                }
                Some(r) => {
                    let e = got.unwrap_err();
                    assert_eq!(e.reason, r, "case {i}: {}", e.message);
                    assert_eq!(s.mode(), SenderMode::Refused);
                    assert!(matches!(e.to_msg(), StreamMsg::Refuse { reason, .. } if reason == r));
                    assert_eq!(s.poll_send(now, 0), None);
                }
            }
        }
        let (mut s, now) = accepted(10);
        let again = s.on_hello(&hello(Z64, None), t(0), None, now).unwrap_err();
        assert_eq!(again.reason, RefuseReason::Protocol);
        assert_eq!(
            s.mode(),
            SenderMode::CatchingUp,
            "a second Hello does not reset the state"
        );
    }

    #[test]
    fn catch_up_then_live_without_gap_or_duplicate() {
        let (mut s, now) = accepted(100);
        // Subscribed; commits 1..=3 happened before, 4..=5 during catch-up.
        assert_eq!(s.start_history(), Some(Z64));
        assert_eq!(s.start_history(), None, "one round at a time");
        assert_eq!(sent_tid(&s.on_history_txn(txn(1), now)), Some(1));
        s.on_live_txn(txn(4));
        assert_eq!(sent_tid(&s.on_history_txn(txn(2), now)), Some(2));
        assert_eq!(sent_tid(&s.on_history_txn(txn(3), now)), Some(3));
        // The iterator happened to see 4 as well.
        assert_eq!(sent_tid(&s.on_history_txn(txn(4), now)), Some(4));
        assert_eq!(s.on_history_txn(txn(4), now), None, "no duplicate");
        assert_eq!(s.on_history_txn(txn(2), now), None, "no reorder");
        s.on_live_txn(txn(5));
        // Nothing from the live queue while catching up.
        assert_eq!(s.poll_send(now, 0), None);
        s.on_history_end();
        assert_eq!(s.mode(), SenderMode::Live);
        assert!(s.has_pending());
        assert_eq!(
            s.poll_send(now, 0),
            Some(StreamMsg::Live {
                primary_last_tid: t(5)
            })
        );
        let m = s.poll_send(now, 0);
        assert_eq!(sent_tid(&m), Some(5));
        assert!(matches!(m, Some(StreamMsg::Txn { prev, .. }) if prev == t(4)));
        s.on_live_txn(txn(5));
        s.on_live_txn(txn(6));
        assert_eq!(sent_tid(&s.poll_send(now, 0)), Some(6));
        assert_eq!(s.poll_send(now, 0), None);
        assert_eq!(s.last_sent(), t(6));
        assert_eq!(s.stats().txns_sent, 6);
    }

    #[test]
    fn history_txn_outside_a_round_is_ignored() {
        let (mut s, now) = accepted(10);
        assert_eq!(s.on_history_txn(txn(1), now), None);
        s.on_history_end();
        assert_eq!(s.mode(), SenderMode::CatchingUp);
    }

    #[test]
    fn overflow_during_catch_up_forces_another_round() {
        let (mut s, now) = accepted(2);
        s.start_history();
        s.on_history_txn(txn(1), now);
        for n in 2..=4 {
            s.on_live_txn(txn(n));
        }
        assert_eq!(s.stats().live_overflows, 1);
        assert_eq!(s.lag(Z64).queued_txns, 0);
        s.on_live_txn(txn(5)); // queued after the overflow
        s.on_history_end();
        assert_eq!(
            s.mode(),
            SenderMode::CatchingUp,
            "queue lost items: not live yet"
        );
        assert_eq!(s.start_history(), Some(t(1)));
        for n in 2..=5 {
            assert_eq!(sent_tid(&s.on_history_txn(txn(n), now)), Some(n));
        }
        s.on_history_end();
        assert_eq!(s.mode(), SenderMode::Live);
        assert!(matches!(s.poll_send(now, 0), Some(StreamMsg::Live { .. })));
        assert_eq!(s.poll_send(now, 0), None, "5 was trimmed from the queue");
    }

    #[test]
    fn overflow_when_live_goes_back_to_history() {
        let (mut s, now) = accepted(2);
        s.start_history();
        s.on_history_end();
        assert!(matches!(s.poll_send(now, 0), Some(StreamMsg::Live { .. })));
        s.on_live_txn(txn(1));
        assert_eq!(sent_tid(&s.poll_send(now, 0)), Some(1));
        for n in 2..=4 {
            s.on_live_txn(txn(n));
        }
        assert_eq!(s.mode(), SenderMode::CatchingUp);
        assert_eq!(s.poll_send(now, 0), None);
        assert_eq!(s.next_history_start(), Some(t(1)));
        assert_eq!(s.start_history(), Some(t(1)));
        for n in 2..=4 {
            assert_eq!(sent_tid(&s.on_history_txn(txn(n), now)), Some(n));
        }
        s.on_history_end();
        assert_eq!(s.mode(), SenderMode::Live);
    }

    #[test]
    fn byte_limit_and_lost_feed_overflow() {
        let now = Instant::now();
        let mut s = SenderState::new(cfg(100, txn(1).size_bytes() * 2));
        s.on_hello(&hello(Z64, None), Z64, None, now).unwrap();
        s.start_history();
        s.on_live_txn(txn(1));
        s.on_live_txn(txn(2));
        assert_eq!(s.stats().live_overflows, 0);
        s.on_live_txn(txn(3));
        assert_eq!(s.stats().live_overflows, 1);
        s.on_history_end();
        assert_eq!(s.mode(), SenderMode::CatchingUp);
        s.start_history();
        s.on_history_end();
        assert_eq!(s.mode(), SenderMode::Live);
        s.on_live_lost();
        assert_eq!(s.mode(), SenderMode::CatchingUp);
        assert_eq!(s.stats().live_overflows, 2);
    }

    #[test]
    fn live_feed_going_backwards_falls_back_to_history() {
        let (mut s, now) = accepted(10);
        s.start_history();
        s.on_history_end();
        s.poll_send(now, 0);
        s.on_live_txn(txn(3));
        s.on_live_txn(txn(2));
        assert_eq!(s.mode(), SenderMode::CatchingUp);
        assert_eq!(s.poll_send(now, 0), None);
    }

    #[test]
    fn acks_are_checked_and_shrink_lag() {
        let (mut s, now) = accepted(10);
        assert!(matches!(
            SenderState::new(cfg(1, 1)).on_ack(Z64),
            Err(ProtocolError::Unexpected { .. })
        ));
        s.start_history();
        for n in 1..=3 {
            s.on_history_txn(txn(n), now);
        }
        let size = txn(1).size_bytes();
        let lag = s.lag(t(5));
        assert_eq!((lag.unacked_txns, lag.unacked_bytes), (3, 3 * size));
        assert!(lag.catching_up);
        assert!(lag.seconds > 0.0);
        assert_eq!(
            s.on_ack(t(4)),
            Err(ProtocolError::AckBeyondSent {
                ack: t(4),
                last_sent: t(3)
            })
        );
        s.on_ack(t(2)).unwrap();
        s.on_ack(t(2)).unwrap();
        assert_eq!(
            s.on_ack(t(1)),
            Err(ProtocolError::AckRegressed {
                ack: t(1),
                acked: t(2)
            })
        );
        assert_eq!(s.acked(), t(2));
        assert_eq!(s.lag(Z64).unacked_txns, 1);
        s.on_ack(t(3)).unwrap();
        let lag = s.lag(Z64);
        assert_eq!(
            (lag.unacked_txns, lag.unacked_bytes, lag.seconds),
            (0, 0, 0.0)
        );
        assert!(s.lag(t(4)).seconds > 0.0, "0 only when equal");
    }

    #[test]
    fn unacked_ring_is_bounded_and_conservative() {
        let (mut s, now) = accepted(10);
        s.start_history();
        let n = (UNACKED_RING_LIMIT * 3) as u64;
        for i in 1..=n {
            s.on_history_txn(txn(i), now);
        }
        assert!(s.unacked.len() <= UNACKED_RING_LIMIT);
        assert_eq!(s.lag(Z64).unacked_txns, n);
        s.on_ack(t(n - 10)).unwrap();
        assert_eq!(s.lag(Z64).unacked_txns, 10, "recent buckets are exact");
        s.on_ack(t(n)).unwrap();
        assert_eq!(s.lag(Z64).unacked_txns, 0);
        // In the middle of the merged oldest bucket, the count overstates.
        let (mut s, now) = accepted(10);
        s.start_history();
        for i in 1..=n {
            s.on_history_txn(txn(i), now);
        }
        s.on_ack(t(5)).unwrap();
        let left = s.lag(Z64).unacked_txns;
        assert!(left >= n - 5 && left <= n);
    }

    #[test]
    fn heartbeats_when_idle() {
        let (mut s, t0) = accepted(10);
        assert_eq!(s.next_wakeup(), Some(t0 + HB));
        assert_eq!(s.poll_send(t0 + HB / 2, 1), None);
        assert_eq!(
            s.poll_send(t0 + HB, 42),
            Some(StreamMsg::Heartbeat {
                primary_last_tid: t(0),
                primary_time_unix_ms: 42
            })
        );
        assert_eq!(s.poll_send(t0 + HB, 43), None);
        // Sending a transaction resets the idle timer.
        s.start_history();
        s.on_history_txn(txn(1), t0 + HB * 3 / 2);
        assert_eq!(s.poll_send(t0 + HB * 2, 0), None);
        assert!(matches!(
            s.poll_send(t0 + HB * 5 / 2, 0),
            Some(StreamMsg::Heartbeat { .. })
        ));
        assert_eq!(s.stats().heartbeats_sent, 2);
        assert_eq!(SenderState::new(cfg(1, 1)).next_wakeup(), None);
    }

    #[test]
    fn resume_from_replica_position() {
        let now = Instant::now();
        let mut s = SenderState::new(cfg(10, 1 << 20));
        // Live commits arrive before the Hello (subscribed first).
        s.on_live_txn(txn(2));
        s.on_live_txn(txn(3));
        s.on_hello(
            &hello(t(2), Some(txn(2).digest())),
            t(3),
            Some(txn(2).digest()),
            now,
        )
        .unwrap();
        assert_eq!(
            s.lag(Z64).queued_txns,
            1,
            "2 is trimmed: the replica has it"
        );
        assert_eq!(s.start_history(), Some(t(2)));
        assert_eq!(s.on_history_txn(txn(1), now), None);
        s.on_history_end();
        assert!(matches!(s.poll_send(now, 0), Some(StreamMsg::Live { .. })));
        let m = s.poll_send(now, 0);
        assert!(
            matches!(m, Some(StreamMsg::Txn { prev, ref txn }) if prev == t(2) && txn.tid == t(3))
        );
    }

    #[test]
    fn replica_of_a_newer_epoch_refuses_this_feeder() {
        let now = Instant::now();
        let mut h = hello(Z64, None);
        h.epoch = Some(5);
        let mut s = SenderState::new(cfg(100, 1 << 20)).with_epoch(3);
        let r = s.on_hello(&h, Z64, None, now).unwrap_err();
        assert_eq!(r.reason, RefuseReason::StaleEpoch);
        let mut s = SenderState::new(cfg(100, 1 << 20)).with_epoch(5);
        match s.on_hello(&h, Z64, None, now) {
            Ok(StreamMsg::Welcome { epoch, .. }) => assert_eq!(epoch, Some(5)),
            other => panic!("{other:?}"),
        }
        // An older build sends no epoch: accepted.
        let mut s = SenderState::new(cfg(100, 1 << 20)).with_epoch(5);
        assert!(s.on_hello(&hello(Z64, None), Z64, None, now).is_ok());
    }
}
