//! Capture fast path on a primary: publish a client's commit as the client
//! sent it, instead of reading it back from the backend, when that is
//! provably what the backend committed.
//!
//! A primary session sees the whole commit on the wire: `tpc_begin`'s
//! metadata, every `storea`, the blob chunks, `vote`'s answer and the tid in
//! `tpc_finish`'s reply. The observer's `invalidateTransaction(tid, oids)`
//! still decides what is published and in which order (invariant 2); for
//! each tid it asks the [`CaptureHub`] whether a session captured it.
//!
//! Proof obligations, each checked here; any one failing means the commit is
//! read back from the backend exactly as without capture ([`Reason`] names
//! which, counted in `zrelay_replication_capture_total{outcome}`):
//! - the transaction began without a tid and with status `' '` (no restore),
//!   and carried no `restorea`, `undoa` or `deleteObject`: records the client
//!   did not send, or whose on-disk form (backpointers) it does not know;
//! - `vote` answered an empty list: no conflict resolved by the server (the
//!   committed data of a resolved oid is not what the client sent), no
//!   client-side resolution round;
//! - the extension is a dict of plain values (strings, bytes, numbers, None,
//!   nested dicts; tuples and lists only in pickle sessions, since msgpack
//!   cannot tell them apart): the server re-pickles it and the read-back
//!   delivers it as that dict, so the captured value must equal it;
//! - every blob stored came with its bytes (`storeBlobStart/Chunk/End`);
//!   `storeBlobShared` has none at hand. The read-back attaches a blob to
//!   the last record of an oid whose data looks like a blob pickle and for
//!   which the backend has a file; the capture applies the same rule;
//! - the captured size stays within `capture_max_bytes`;
//! - exactly one client commit reported this tid, and its oid set equals the
//!   oid set of the observer's invalidation for it.
//!
//! Only sessions registered to the replicated storage capture (tids are per
//! storage). A captured [`Txn`] has the read-back's user, description and
//! extension bytes, so its digest is the same; `capture_verify` compares the
//! two whole transactions for every captured commit.
//!
//! Record order is the backend's: ZEO's server applies the logged stores in
//! order at vote, then the blob stores last-in first-out (its `blob_log` is
//! popped from the end). Commits that bypassed the proxy have no capture and
//! are read back.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use metrics::{counter, describe_counter};
use tokio::sync::Notify;

use crate::relay::hooks::PendingCall;
use crate::relay::{ServerVerdict, SessionHooks, SessionInfo};
use crate::replication::history::looks_like_blob;
use crate::replication::stages::{self, Stage};
use crate::replication::txn::{Oid, Record, Tid, Txn};
use crate::wire::{pickle, Encoding, Flag, Message, Value};

pub const CAPTURE_TOTAL: &str = "zrelay_replication_capture_total";

/// Why a commit was read back instead of published from its capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No client commit through this proxy reported the tid (another
    /// client of the backend, or a commit made while no session captured).
    Bypass,
    /// A session was finishing a commit but did not report within the wait.
    Late,
    ResolvedConflict,
    Undo,
    Restore,
    Delete,
    BlobNotAtHand,
    Extension,
    TooBig,
    /// The committed oids (observer) differ from the stored ones.
    OidMismatch,
    /// More than one client commit reported the tid.
    Ambiguous,
    /// The session's calls did not form a plain commit (malformed
    /// arguments, a second tpc_begin, an error reply...).
    Unexpected,
    /// `capture_verify`: the capture differed from the read-back.
    Mismatch,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::Bypass,
        Reason::Late,
        Reason::ResolvedConflict,
        Reason::Undo,
        Reason::Restore,
        Reason::Delete,
        Reason::BlobNotAtHand,
        Reason::Extension,
        Reason::TooBig,
        Reason::OidMismatch,
        Reason::Ambiguous,
        Reason::Unexpected,
        Reason::Mismatch,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Bypass => "bypass",
            Reason::Late => "late",
            Reason::ResolvedConflict => "resolved_conflict",
            Reason::Undo => "undo",
            Reason::Restore => "restore",
            Reason::Delete => "delete",
            Reason::BlobNotAtHand => "blob_not_at_hand",
            Reason::Extension => "extension",
            Reason::TooBig => "too_big",
            Reason::OidMismatch => "oid_mismatch",
            Reason::Ambiguous => "ambiguous",
            Reason::Unexpected => "unexpected",
            Reason::Mismatch => "mismatch",
        }
    }
}

pub fn describe() {
    describe_counter!(
        CAPTURE_TOTAL,
        "Commits published to replicas on a primary, by outcome: captured (from the client's own messages) or the reason it was read back from the backend."
    );
}

/// Zero-initialised series, so dashboards see every outcome from the start.
pub fn init_series() {
    counter!(CAPTURE_TOTAL, "outcome" => "captured").increment(0);
    for r in Reason::ALL {
        counter!(CAPTURE_TOTAL, "outcome" => r.label()).increment(0);
    }
}

pub fn count_captured() {
    counter!(CAPTURE_TOTAL, "outcome" => "captured").increment(1);
}

pub fn count_read_back(r: Reason) {
    counter!(CAPTURE_TOTAL, "outcome" => r.label()).increment(1);
}

// ---------------------------------------------------------------------------
// One session's capture (no I/O)

/// A record as stored, before the blob rule is applied.
struct Stored {
    oid: Oid,
    data: Bytes,
    /// Bytes of a `storeBlobEnd` (None for `storea`).
    blob: Option<Bytes>,
}

struct Building {
    user: Bytes,
    description: Bytes,
    extension: Bytes,
    stores: Vec<Stored>,
    /// `storeBlobEnd`s in arrival order; committed after the stores, last
    /// first.
    blob_stores: Vec<Stored>,
    /// The blob bytes since `storeBlobStart`.
    chunks: Option<Vec<u8>>,
    size: usize,
    fallback: Option<Reason>,
}

impl Building {
    fn fail(&mut self, r: Reason) {
        if self.fallback.is_none() {
            self.fallback = Some(r);
            // Nothing of it will be published: free the data now.
            self.stores = Vec::new();
            self.blob_stores = Vec::new();
            self.chunks = None;
        }
    }

    fn add_size(&mut self, n: usize, max: usize) {
        self.size += n;
        if self.size > max {
            self.fail(Reason::TooBig);
        }
    }
}

/// What a session reports to the hub.
#[derive(Debug)]
pub enum Event {
    /// A `tpc_finish` was forwarded: the feed should wait for its outcome.
    FinishSent,
    /// The `tpc_finish` that was in flight completed: committed as `tid`
    /// (with its capture or the reason there is none), or not committed.
    FinishDone(Option<(Tid, Result<Txn, Reason>)>),
}

/// The capture state of one client session.
pub struct Capture {
    max_bytes: usize,
    building: Option<Building>,
    finishing: bool,
}

/// A copy, not a slice of the received frame: a slice would keep the
/// session's whole read buffer alive for as long as the transaction sits in
/// the replicas' queues (their byte limits count record bytes only).
fn bytes_arg(args: &[Value], i: usize) -> Option<Bytes> {
    args.get(i)?.as_bytes().map(Bytes::copy_from_slice)
}

fn oid_arg(args: &[Value], i: usize) -> Option<Oid> {
    args.get(i)?.as_bytes()?.try_into().ok()
}

fn text_bytes(v: &Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b.clone()),
        Value::Str(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        _ => None,
    }
}

/// Values that reach the backend and come back through its iterator
/// unchanged (see the module doc).
fn plain(v: &Value, sequences: bool) -> bool {
    match v {
        Value::None
        | Value::Bool(_)
        | Value::Int(_)
        | Value::Float(_)
        | Value::Str(_)
        | Value::Bytes(_) => true,
        Value::Dict(items) => items
            .iter()
            .all(|(k, v)| plain(k, sequences) && plain(v, sequences)),
        Value::Tuple(items) | Value::List(items) => {
            sequences && items.iter().all(|v| plain(v, sequences))
        }
        _ => false,
    }
}

/// The extension bytes the read-back would produce, if provably equal.
fn extension_bytes(ext: &Value, enc: Encoding) -> Option<Bytes> {
    if !matches!(ext, Value::Dict(_)) || !plain(ext, enc == Encoding::Pickle) {
        return None;
    }
    let mut out = Vec::new();
    pickle::encode(ext, &mut out).ok()?;
    Some(Bytes::from(out))
}

impl Capture {
    pub fn new(max_bytes: usize) -> Capture {
        Capture {
            max_bytes,
            building: None,
            finishing: false,
        }
    }

    /// A client message the session forwards to the backend.
    pub fn on_client(&mut self, msg: &Message, enc: Encoding) -> Option<Event> {
        let args = msg.args.as_seq().unwrap_or(&[]);
        let max = self.max_bytes;
        match &*msg.method {
            "tpc_begin" => {
                let mut b = Building {
                    user: Bytes::new(),
                    description: Bytes::new(),
                    extension: Bytes::new(),
                    stores: Vec::new(),
                    blob_stores: Vec::new(),
                    chunks: None,
                    size: 0,
                    fallback: None,
                };
                if self.building.is_some() || self.finishing {
                    b.fail(Reason::Unexpected);
                }
                let tid = args.get(4).unwrap_or(&Value::None);
                let status_plain = match args.get(5) {
                    None => true,
                    Some(Value::Str(s)) => s == " ",
                    Some(Value::Bytes(s)) => &s[..] == b" ",
                    Some(_) => false,
                };
                if !tid.is_none() || !status_plain {
                    b.fail(Reason::Restore);
                }
                match (
                    args.get(1).and_then(text_bytes),
                    args.get(2).and_then(text_bytes),
                ) {
                    (Some(u), Some(d)) => {
                        b.user = u;
                        b.description = d;
                    }
                    _ => b.fail(Reason::Unexpected),
                }
                match args.get(3).and_then(|e| extension_bytes(e, enc)) {
                    Some(e) => b.extension = e,
                    None => b.fail(Reason::Extension),
                }
                let meta = b.user.len() + b.description.len() + b.extension.len();
                b.add_size(meta, max);
                self.building = Some(b);
            }
            "tpc_finish" => {
                if self.building.is_some() && !self.finishing {
                    self.finishing = true;
                    return Some(Event::FinishSent);
                }
            }
            "tpc_abort" => {
                if !self.finishing {
                    self.building = None;
                }
            }
            method => {
                let b = self.building.as_mut()?;
                if b.fallback.is_some() {
                    // Read back whatever comes next; nothing to keep.
                    return None;
                }
                match method {
                    "storea" => match (oid_arg(args, 0), bytes_arg(args, 2)) {
                        (Some(oid), Some(data)) => {
                            b.add_size(8 + data.len(), max);
                            b.stores.push(Stored {
                                oid,
                                data,
                                blob: None,
                            });
                        }
                        _ => b.fail(Reason::Unexpected),
                    },
                    "checkCurrentSerialInTransaction" => {}
                    "restorea" => b.fail(Reason::Restore),
                    "undoa" => b.fail(Reason::Undo),
                    "deleteObject" => b.fail(Reason::Delete),
                    "storeBlobShared" => b.fail(Reason::BlobNotAtHand),
                    "storeBlobStart" => b.chunks = Some(Vec::new()),
                    "storeBlobChunk" => match args.first().and_then(Value::as_bytes) {
                        Some(c) if b.chunks.is_some() => {
                            b.add_size(c.len(), max);
                            if let Some(chunks) = b.chunks.as_mut() {
                                chunks.extend_from_slice(c);
                            }
                        }
                        _ => b.fail(Reason::Unexpected),
                    },
                    "storeBlobEnd" => {
                        match (b.chunks.take(), oid_arg(args, 0), bytes_arg(args, 2)) {
                            (Some(chunks), Some(oid), Some(data)) => {
                                b.add_size(8 + data.len(), max);
                                b.blob_stores.push(Stored {
                                    oid,
                                    data,
                                    blob: Some(Bytes::from(chunks)),
                                });
                            }
                            _ => b.fail(Reason::Unexpected),
                        }
                    }
                    _ => {}
                }
            }
        }
        None
    }

    /// The backend's reply to a sync call of this session.
    pub fn on_reply(&mut self, call: &PendingCall, reply: &Message) -> Option<Event> {
        let ok = reply.flag != Flag::Error;
        match &*call.method {
            "vote" => {
                if let Some(b) = self.building.as_mut() {
                    let resolved = match &*reply.args {
                        Value::List(v) | Value::Tuple(v) => !v.is_empty(),
                        Value::None => false,
                        _ => true,
                    };
                    if !ok {
                        b.fail(Reason::Unexpected);
                    } else if resolved {
                        b.fail(Reason::ResolvedConflict);
                    }
                }
                None
            }
            "tpc_finish" if self.finishing => {
                self.finishing = false;
                let b = self.building.take()?;
                let tid: Option<Tid> = reply.args.as_bytes().and_then(|t| t.try_into().ok());
                if let (true, Some(t)) = (ok, &tid) {
                    stages::record(Stage::FinishReply, t);
                }
                Some(Event::FinishDone(match (ok, tid) {
                    (true, Some(tid)) => Some((tid, build(b, tid))),
                    _ => None,
                }))
            }
            "tpc_abort" => {
                if !self.finishing {
                    self.building = None;
                }
                None
            }
            _ => None,
        }
    }

    /// The session ended: a `tpc_finish` still in flight will never report.
    pub fn on_close(&mut self) -> Option<Event> {
        self.building = None;
        std::mem::take(&mut self.finishing).then_some(Event::FinishDone(None))
    }
}

/// The transaction as the backend committed it, or why that is not proven.
fn build(b: Building, tid: Tid) -> Result<Txn, Reason> {
    if let Some(r) = b.fallback {
        return Err(r);
    }
    let stored: Vec<Stored> = b
        .stores
        .into_iter()
        .chain(b.blob_stores.into_iter().rev())
        .collect();
    let mut records = Vec::with_capacity(stored.len());
    for (i, s) in stored.iter().enumerate() {
        // The read-back's rule (history::fetch_blobs): the blob file belongs
        // to the last record of its oid, if its data looks like a blob
        // pickle (any pickle referring to a blob does) and the backend has a
        // file for (oid, tid). It has one exactly when this transaction
        // stored the oid with storeBlob*: blob stores are committed after
        // every plain store, so such an oid's last record is a blob store.
        // For any other record `sendBlob` answers POSKeyError: no blob.
        let last_of_oid = !stored[i + 1..].iter().any(|r| r.oid == s.oid);
        let blob = if last_of_oid && looks_like_blob(&s.data) {
            s.blob.clone()
        } else {
            None
        };
        records.push(Record {
            oid: s.oid,
            data: Some(s.data.clone()),
            data_txn: None,
            blob,
        });
    }
    Ok(Txn {
        tid,
        status: " ".into(),
        user: b.user,
        description: b.description,
        extension: b.extension,
        records,
    })
}

/// The last obligation, checked by the feed: the observer's invalidation
/// names exactly the captured oids.
pub fn check_oids(txn: &Txn, invalidated: &[&[u8]]) -> Result<(), Reason> {
    let stored: HashSet<&[u8]> = txn.records.iter().map(|r| &r.oid[..]).collect();
    let committed: HashSet<&[u8]> = invalidated.iter().copied().collect();
    if stored == committed {
        Ok(())
    } else {
        Err(Reason::OidMismatch)
    }
}

// ---------------------------------------------------------------------------
// The hub between sessions and the feed

/// Outcomes kept for the feed at most (older ones are dropped: the feed is
/// not consuming, e.g. while its observer reconnects; it then reads back).
const MAX_DONE: usize = 256;

#[derive(Default)]
struct HubState {
    /// Sessions whose `tpc_finish` is in flight.
    finishing: usize,
    done: VecDeque<(Tid, Result<Txn, Reason>)>,
}

/// What the feed got for one observed tid.
#[derive(Debug)]
pub enum Taken {
    Captured(Txn),
    ReadBack(Reason),
}

/// Shared by a primary's sessions (which report) and its feed (which
/// takes). One lock, held only to move an outcome in or out.
#[derive(Default)]
pub struct CaptureHub {
    state: Mutex<HubState>,
    notify: Notify,
}

impl CaptureHub {
    pub fn new() -> Arc<CaptureHub> {
        Arc::new(CaptureHub::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn report(&self, ev: Event) {
        let mut st = self.lock();
        match ev {
            Event::FinishSent => st.finishing += 1,
            Event::FinishDone(outcome) => {
                st.finishing = st.finishing.saturating_sub(1);
                if let Some(o) = outcome {
                    if st.done.len() >= MAX_DONE {
                        st.done.pop_front();
                    }
                    st.done.push_back(o);
                }
            }
        }
        drop(st);
        self.notify.notify_waiters();
    }

    /// Forgets outcomes up to `tid` (the feed publishes nothing of them).
    pub fn discard_upto(&self, tid: &Tid) {
        self.lock().done.retain(|(t, _)| t > tid);
    }

    /// The capture of `tid`, waiting up to `wait` while some session's
    /// `tpc_finish` is still in flight (its reply and the observer's
    /// invalidation race on two connections). Outcomes of older tids are
    /// dropped: the observer sees commits in order, so they were handled.
    pub async fn take(&self, tid: &Tid, wait: Duration) -> Taken {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                st.done.retain(|(t, _)| t >= tid);
                let n = st.done.iter().filter(|(t, _)| t == tid).count();
                if n > 1 {
                    st.done.retain(|(t, _)| t != tid);
                    return Taken::ReadBack(Reason::Ambiguous);
                }
                if n == 1 {
                    let i = st.done.iter().position(|(t, _)| t == tid);
                    if let Some((_, r)) = i.and_then(|i| st.done.remove(i)) {
                        return match r {
                            Ok(txn) => Taken::Captured(txn),
                            Err(reason) => Taken::ReadBack(reason),
                        };
                    }
                }
                if st.finishing == 0 {
                    return Taken::ReadBack(Reason::Bypass);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Taken::ReadBack(Reason::Late);
            }
        }
    }
}

/// Primary session hooks: relay everything untouched and report commits to
/// the hub. Other primary hooks (routing) can embed a [`Capture`] the same
/// way.
pub struct CaptureHooks {
    capture: Capture,
    hub: Arc<CaptureHub>,
    /// The replicated storage: commits to any other storage of the same
    /// backend (tids are per storage) are not captured.
    storage: String,
}

impl CaptureHooks {
    pub fn new(hub: Arc<CaptureHub>, max_bytes: usize, storage: String) -> CaptureHooks {
        CaptureHooks {
            capture: Capture::new(max_bytes),
            hub,
            storage,
        }
    }
}

impl SessionHooks for CaptureHooks {
    fn on_client_message(
        &mut self,
        info: &SessionInfo,
        msg: &Message,
    ) -> crate::relay::ClientVerdict {
        let replicated = matches!(&info.registered, Some((s, _)) if *s == self.storage);
        if replicated {
            if let Some(ev) = self.capture.on_client(msg, info.encoding) {
                self.hub.report(ev);
            }
        }
        crate::relay::ClientVerdict::Forward
    }

    fn on_server_message(
        &mut self,
        _info: &SessionInfo,
        msg: &Message,
        answers: Option<&PendingCall>,
    ) -> ServerVerdict {
        if let Some(call) = answers {
            if let Some(ev) = self.capture.on_reply(call, msg) {
                self.hub.report(ev);
            }
        }
        ServerVerdict::Forward
    }

    fn on_close(&mut self, _info: &SessionInfo) {
        if let Some(ev) = self.capture.on_close() {
            self.hub.report(ev);
        }
    }
}

#[cfg(test)]
mod tests;
