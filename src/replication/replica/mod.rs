//! The replica's side: connect to the primary proxy over mutual TLS, send a
//! Hello with the backend's last tid and its digest, apply each transaction
//! in order, ack it, and keep the status (lag, stream state) current.
//!
//! Decisions (apply, skip a resend, divergence) belong to the I/O-free
//! [`ReceiverState`]; this task moves bytes and drives the [`Applier`].

pub mod applied;
pub mod applier;
pub mod clone;
pub mod receiver;
pub mod replica_session;
pub mod spool;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::live::Live;
use crate::metrics as m;
use crate::replication::applier::{Applier, ApplyError};
use crate::replication::history::read_txn;
use crate::replication::protocol::{self, StreamMsg};
use crate::replication::receiver::{Incoming, ReceiverError, ReceiverMode, ReceiverState};
use crate::replication::spool::{Spool, Spooled};
use crate::replication::stages::{self, Stage};
use crate::replication::stream_io::{self, ReadError};
use crate::replication::tls;
use crate::replication::txn::{tid_hex, tid_unix_secs, Tid, Z64};
use crate::status::{StatusHub, StreamState, UpstreamStatus};

/// After the silence timeout: how long to look for bytes already waiting.
const SILENCE_RECHECK: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct ReplicaConfig {
    pub cluster: String,
    pub storage: String,
    pub node: String,
    pub upstream: String,
    pub upstream_name: String,
    /// Replaced on reload (certificate rotation): the next connection uses
    /// the new files, an open stream keeps running.
    pub connector: Arc<Live<TlsConnector>>,
    pub stale_after: Duration,
    pub max_message_bytes: usize,
    pub connect_timeout: Duration,
    /// The addresses this node advertises in its Hello: ZEO clients, and
    /// its replication listener if it has one.
    pub client_addr: Option<String>,
    pub replication_addr: Option<String>,
    /// Published with every confirmed apply: the newest tid committed on
    /// this node's backend (a door's offload waits on it).
    pub applied: Arc<watch::Sender<Tid>>,
    /// `replicate_pack`: where packs from the stream are executed (None:
    /// they are ignored).
    pub packer: Option<crate::replication::pack::PackRunner>,
    /// `data_dir`: where the spool lives (None: no spool, no `Received`
    /// acks).
    pub spool_dir: Option<std::path::PathBuf>,
    pub spool_max_bytes: u64,
    /// The node's epoch and eligibility, and where epoch news and handovers
    /// are reported (None: epoch 0, nothing reported).
    pub role: Option<Arc<crate::role::fence::RoleCell>>,
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("connect to upstream {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("upstream TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("stream: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("upstream closed the stream")]
    Closed,
    #[error("upstream silent for {0:?}")]
    Silent(Duration),
    #[error("{0}")]
    Receiver(#[from] ReceiverError),
    #[error("apply: {0}")]
    Apply(#[from] ApplyError),
    #[error("upstream refused: {0}")]
    Refused(String),
}

/// Runs until shutdown. Never returns early on divergence: the replica keeps
/// serving reads and reporting its state, but applies nothing more.
pub async fn run_replica(
    cfg: ReplicaConfig,
    mut applier: Applier,
    status: Arc<StatusHub>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut state: Option<ReceiverState> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    // The spool, and what it held at start (applied before the first
    // stream asks the primary for more).
    let mut spool: Option<Spool> = None;
    let mut to_replay: Vec<Spooled> = Vec::new();
    if let Some(dir) = &cfg.spool_dir {
        crate::replication::spool::describe();
        match Spool::open(dir) {
            Ok((s, d)) => {
                if d.dropped > 0 {
                    warn!(path = %s.path().display(), bytes = d.dropped, "spool: dropped a torn tail (never acknowledged)");
                }
                info!(path = %s.path().display(), transactions = d.records.len(), "spool opened");
                to_replay = d.records;
                spool = Some(s);
            }
            Err(e) => {
                error!(dir = %dir.display(), error = %e, "cannot open the spool; acknowledging applied transactions only")
            }
        }
    }
    loop {
        // Learn where the backend really is (after any failure too: a
        // tpc_finish whose reply was lost may have committed).
        if state.is_none() {
            match init_state(&mut applier, &cfg).await {
                Ok(s) => state = Some(s),
                Err(e) => {
                    warn!(error = %e, "replica backend not ready");
                    set_upstream(&status, &cfg, None, Some(e.to_string()));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        let st = state.as_mut().expect("initialised above");
        if !to_replay.is_empty() {
            match replay(&mut applier, st, std::mem::take(&mut to_replay)).await {
                Ok(n) => {
                    info!(transactions = n, applied = %tid_hex(&st.applied()), "spool replayed into the backend");
                    cfg.applied.send_if_modified(|t| bump(t, st.applied()));
                }
                Err(e) => warn!(error = %e, "spool replay failed; the stream resends"),
            }
            if let Some(sp) = spool.as_mut() {
                if sp.all_applied(st.applied()) {
                    if let Err(e) = sp.clear() {
                        warn!(error = %e, "spool: cannot empty it");
                    }
                }
            }
        }
        if st.mode() == ReceiverMode::Diverged {
            // Stay alive for status and lag; apply nothing.
            publish(&status, &cfg, st, None);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => continue,
            }
        }
        let r = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = stream_once(&cfg, &mut applier, st, &status, &mut ticker, &mut spool) => r,
        };
        let mut err = r.err().map(|e| e.to_string());
        match &mut err {
            Some(e) if st.mode() == ReceiverMode::Diverged => {
                if let Some(shared) = st.rewind_to() {
                    // Name what this node holds that the primary lacks.
                    match extra_tids(&mut applier, shared).await {
                        Ok((n, first)) if n > 0 => {
                            let list: Vec<String> = first.iter().map(tid_hex).collect();
                            e.push_str(&format!(
                                "; this node holds {n} transaction(s) after {} that the primary lacks: {}{}",
                                tid_hex(&shared),
                                list.join(", "),
                                if n as usize > list.len() { ", ..." } else { "" }
                            ));
                        }
                        Ok(_) => {}
                        Err(x) => warn!(error = %x, "could not list the diverged transactions"),
                    }
                }
                error!(error = %e, "replica diverged from the primary: applying stopped; serving read-only");
                m::diverged(true);
            }
            Some(e) => warn!(error = %e, "replication stream down; retrying"),
            None => {}
        }
        st.on_disconnect(Instant::now());
        m::stream_connected(false);
        // An apply may have been cut mid-way: re-learn the backend position.
        if let Err(e) = resync(&mut applier, st).await {
            warn!(error = %e, "replica backend lost; will re-read its position");
            state = None;
        }
        if let Some(st) = &state {
            publish(&status, &cfg, st, err);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// The transactions of this node's backend after `shared`: how many, and
/// the first few tids (at most 20; a bounded scan of 10 000).
async fn extra_tids(applier: &mut Applier, shared: Tid) -> Result<(u64, Vec<Tid>), ApplyError> {
    let mut reader = applier.reader().await?;
    let after = u64::from_be_bytes(shared).saturating_add(1).to_be_bytes();
    let mut cursor =
        crate::replication::history::HistoryCursor::open(&mut reader, after, None).await?;
    let (mut n, mut first) = (0u64, Vec::new());
    while n < 10_000 {
        let Some(t) = cursor.next(&mut reader).await? else {
            break;
        };
        n += 1;
        if first.len() < 20 {
            first.push(t.tid);
        }
    }
    Ok((n, first))
}

async fn init_state(
    applier: &mut Applier,
    cfg: &ReplicaConfig,
) -> Result<ReceiverState, ApplyError> {
    let (last, digest) = connect_at_position(applier).await?;
    info!(applied = %tid_hex(&last), "replica backend position");
    Ok(ReceiverState::new(last, digest, Instant::now()).with_stale_after(cfg.stale_after))
}

/// (Re)connects the applier and returns the backend's real position: its
/// newest transaction and that transaction's digest.
async fn connect_at_position(applier: &mut Applier) -> Result<(Tid, Option<[u8; 32]>), ApplyError> {
    let reported = applier.connect().await?;
    let (last, digest) = newest_readable(applier, reported).await?;
    if last != reported {
        warn!(
            reported = %tid_hex(&reported),
            newest = %tid_hex(&last),
            "replica backend reports a last tid it does not hold (a commit cut by a crash); resuming from its newest transaction"
        );
        applier.set_real_last(last);
    }
    Ok((last, digest))
}

/// The newest transaction the backend holds at or before `reported`, with
/// its digest. Normally `reported` itself; otherwise found by reading
/// history in widening windows before it.
async fn newest_readable(
    applier: &mut Applier,
    reported: Tid,
) -> Result<(Tid, Option<[u8; 32]>), ApplyError> {
    if reported == Z64 {
        return Ok((Z64, None));
    }
    if let Some(d) = digest_of(applier, &reported).await? {
        return Ok((reported, Some(d)));
    }
    let mut reader = applier.reader().await?;
    let at = crate::replication::txn::tid_unix_secs(&reported);
    for window in [60.0, 3600.0, 86400.0 * 31.0, f64::INFINITY] {
        let start = if window.is_finite() {
            crate::replication::txn::tid_from_unix_secs(at - window)
        } else {
            Z64
        };
        let mut cursor =
            crate::replication::history::HistoryCursor::open(&mut reader, start, Some(reported))
                .await?;
        cursor.with_blobs = false;
        let mut newest = None;
        while let Some(t) = cursor.next(&mut reader).await? {
            newest = Some((t.tid, t.digest()));
        }
        if let Some((tid, d)) = newest {
            return Ok((tid, Some(d)));
        }
    }
    Ok((Z64, None))
}

async fn digest_of(applier: &mut Applier, tid: &Tid) -> Result<Option<[u8; 32]>, ApplyError> {
    if *tid == Z64 {
        return Ok(None);
    }
    let mut reader = applier.reader().await?;
    Ok(read_txn(&mut reader, tid).await?.map(|t| t.digest()))
}

/// After a failure: if the backend committed more than the state knows (a
/// lost tpc_finish reply), record it as applied.
async fn resync(applier: &mut Applier, st: &mut ReceiverState) -> Result<(), ApplyError> {
    let in_doubt = applier.in_doubt();
    // Anything confirmed before the failure was acked already; the
    // backend's position decides the rest.
    let (last, digest) = connect_at_position(applier).await?;
    if last == st.applied() {
        return Ok(());
    }
    if Some(last) == in_doubt {
        // The lost tpc_finish did commit.
        if let Some(d) = digest {
            st.on_applied(last, d);
        }
        return Ok(());
    }
    let d = st.on_local_divergence(format!(
        "replica backend's last tid is {}, the stream applied up to {}",
        tid_hex(&last),
        tid_hex(&st.applied())
    ));
    error!(error = %d, "replica backend changed behind the applier: applying stopped");
    Ok(())
}

/// At a promotion: applies what the spool in `dir` holds beyond the
/// backend's position, so every transaction this replica acknowledged as
/// received is committed before it serves writes. The replica task must be
/// stopped. Returns how many transactions were applied.
pub async fn apply_spool(dir: &std::path::Path, mut applier: Applier) -> Result<usize, String> {
    let (mut sp, d) = Spool::open(dir).map_err(|e| format!("open the spool: {e}"))?;
    if d.records.is_empty() {
        return Ok(0);
    }
    let (last, digest) = connect_at_position(&mut applier)
        .await
        .map_err(|e| format!("replica backend: {e}"))?;
    let mut st = ReceiverState::new(last, digest, Instant::now());
    let n = replay(&mut applier, &mut st, d.records)
        .await
        .map_err(|e| format!("apply the spool: {e}"))?;
    if sp.all_applied(st.applied()) {
        if let Err(e) = sp.clear() {
            warn!(error = %e, "spool: cannot empty it");
        }
    }
    Ok(n)
}

/// Applies spooled transactions beyond the backend's position, in order,
/// stopping at a gap (the stream resends from there).
async fn replay(
    applier: &mut Applier,
    st: &mut ReceiverState,
    recs: Vec<Spooled>,
) -> Result<usize, ApplyError> {
    let mut n = 0;
    for r in recs {
        if r.txn.tid <= st.applied() {
            continue;
        }
        if r.prev != st.applied() {
            warn!(
                tid = %tid_hex(&r.txn.tid),
                prev = %tid_hex(&r.prev),
                applied = %tid_hex(&st.applied()),
                "spool: gap before a record; the rest comes from the stream"
            );
            break;
        }
        applier.apply(&r.txn, false).await?;
        if applier.has_pending() {
            applier.complete().await?;
        }
        applier.take_confirmed();
        st.on_applied(r.txn.tid, r.txn.digest());
        n += 1;
    }
    Ok(n)
}

/// Spooled transactions not yet durable: fsync, then acknowledge them as
/// received (only to a primary that accepts `Received`).
async fn flush_received<W: tokio::io::AsyncWrite + Unpin>(
    spool: &mut Option<Spool>,
    unsynced: &mut Option<Tid>,
    send: bool,
    wh: &mut W,
    role: Option<&crate::role::fence::RoleCell>,
) -> Result<(), RunError> {
    let (Some(sp), Some(tid)) = (spool.as_mut(), unsynced.take()) else {
        return Ok(());
    };
    sp.sync_off_thread().await?;
    if let Some(r) = role {
        r.note_durable(u64::from_be_bytes(tid));
    }
    if send {
        let mut b = BytesMut::new();
        protocol::encode(&StreamMsg::Received { tid }, &mut b)?;
        wh.write_all(&b).await?;
    }
    Ok(())
}

async fn stream_once(
    cfg: &ReplicaConfig,
    applier: &mut Applier,
    st: &mut ReceiverState,
    status: &StatusHub,
    ticker: &mut tokio::time::Interval,
    spool: &mut Option<Spool>,
) -> Result<(), RunError> {
    let tcp = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(&cfg.upstream))
        .await
        .map_err(|_| {
            RunError::Connect(
                cfg.upstream.clone(),
                std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            )
        })?
        .map_err(|e| RunError::Connect(cfg.upstream.clone(), e))?;
    let _ = tcp.set_nodelay(true);
    crate::liveness::arm_between_nodes(&tcp)
        .map_err(|e| RunError::Connect(cfg.upstream.clone(), e))?;
    let (stream, peer) = match tls::connect(
        &cfg.connector.get(),
        tcp,
        &cfg.upstream_name,
        cfg.connect_timeout,
    )
    .await
    {
        Ok(x) => x,
        Err(e) => {
            tls::record_handshake_failure(&e);
            return Err(e.into());
        }
    };
    let (mut rh, mut wh) = tokio::io::split(stream);
    let mut wbuf = BytesMut::new();
    if let Some(r) = &cfg.role {
        st.set_epoch(r.epoch());
    }
    let mut hello = st.hello(&cfg.cluster, &cfg.storage, &cfg.node);
    if let StreamMsg::Hello(h) = &mut hello {
        h.client_addr = cfg.client_addr.clone();
        h.replication_addr = cfg.replication_addr.clone();
        h.promotion = cfg.role.as_ref().map(|r| r.promotion);
    }
    protocol::encode(&hello, &mut wbuf)?;
    wh.write_all(&wbuf).await?;
    wh.flush().await?;
    wbuf.clear();
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut connected_logged = false;
    let mut inflight: VecDeque<(Tid, [u8; 32], u64, Instant)> = VecDeque::new();
    // Spool: the tid before the next transaction, the newest one appended
    // but not fsynced, and whether the primary takes `Received` acks.
    let mut spool_prev = st.applied();
    let mut unsynced: Option<Tid> = None;
    let mut received_ok = false;
    // When the stream counts as silent: `stale_after` after the last message.
    // A deadline, not a timeout around each read: the ticker below cancels
    // the read every 250 ms, and a timeout restarted with it never fired
    // (a partitioned primary, whose TCP connection neither delivers nor
    // fails, kept the stream "live" forever).
    let mut silent_at = tokio::time::Instant::now() + cfg.stale_after;
    loop {
        let msg = tokio::select! {
            r = read_msg(&mut rh, &mut rbuf, cfg.max_message_bytes) => r?,
            // Silence is judged by what arrived, not by wall time: after
            // this process was stopped (SIGSTOP, a long stall) the timer
            // is due at once while the primary's messages are waiting in
            // the socket. Look once more before giving up.
            _ = tokio::time::sleep_until(silent_at) => match tokio::time::timeout(
                SILENCE_RECHECK,
                read_msg(&mut rh, &mut rbuf, cfg.max_message_bytes),
            )
            .await
            {
                Err(_) => return Err(RunError::Silent(cfg.stale_after)),
                Ok(r) => r?,
            },
            _ = ticker.tick() => {
                publish(status, cfg, st, None);
                continue;
            }
        };
        silent_at = tokio::time::Instant::now() + cfg.stale_after;
        let now = Instant::now();
        if let StreamMsg::Welcome { features, .. } = &msg {
            received_ok = features.iter().any(|f| f == protocol::FEATURE_RECEIVED_ACK);
        }
        match st.on_message(msg, now).map_err(|e| {
            if let ReceiverError::Protocol(p) = &e {
                // A closed connection surfaced by the first read after a
                // refused TLS client certificate.
                return RunError::Protocol(p.clone());
            }
            RunError::Receiver(e)
        })? {
            Incoming::Nothing | Incoming::Skip => {}
            Incoming::Roster(nodes) => status.update(|s| s.upstream_roster = nodes),
            Incoming::Refused { reason, message } => {
                return Err(RunError::Refused(format!("{reason}: {message}")));
            }
            Incoming::NewEpoch(e) => {
                if let Some(r) = &cfg.role {
                    r.report(crate::role::fence::RoleEvent::SawEpoch(e));
                }
            }
            Incoming::Handover {
                epoch,
                primary,
                replication_addr,
            } => {
                // Everything received is applied first: the new primary
                // (this node or another) must have it all.
                if applier.has_pending() {
                    let r = applier.complete().await;
                    confirm(applier, st, &mut inflight, &mut wbuf)?;
                    cfg.applied.send_if_modified(|t| bump(t, st.applied()));
                    r?;
                }
                if !wbuf.is_empty() {
                    wh.write_all(&wbuf).await?;
                    wbuf.clear();
                }
                info!(%primary, epoch, applied = %tid_hex(&st.applied()), "handover from the primary");
                if let Some(r) = &cfg.role {
                    r.report(crate::role::fence::RoleEvent::Handover {
                        epoch,
                        primary,
                        replication_addr,
                    });
                }
                // The controller restarts this task (or promotes); until
                // then, do not reconnect to the old primary.
                return Err(RunError::Closed);
            }
            Incoming::Pack {
                pack_time_unix,
                upto,
            } => {
                // In tid order: everything received before it is applied
                // first.
                if applier.has_pending() {
                    let r = applier.complete().await;
                    confirm(applier, st, &mut inflight, &mut wbuf)?;
                    r?;
                }
                match &cfg.packer {
                    Some(p) if st.applied() >= upto => p.submit(crate::replication::pack::PackOp {
                        pack_time_unix,
                        upto,
                    }),
                    Some(_) => warn!(
                        upto = %tid_hex(&upto),
                        applied = %tid_hex(&st.applied()),
                        "pack from the primary ahead of what is applied; not packing"
                    ),
                    None => {
                        info!(
                            pack_time = pack_time_unix,
                            "pack on the primary; replicate_pack = false here"
                        )
                    }
                }
            }
            Incoming::Apply { txn, digest } => {
                stages::record(Stage::Received, &txn.tid);
                inflight.push_back((txn.tid, digest, txn.size_bytes(), Instant::now()));
                // Pipeline: if the next message is already here, its
                // transaction goes out while this one finishes.
                let more = stream_io::has_frame(&rbuf);
                // Spooled only for a primary that counts `Received` acks
                // (semi-sync `received`): else the fsync buys nothing.
                if let Some(sp) = spool.as_mut().filter(|_| received_ok) {
                    if sp.len() > cfg.spool_max_bytes {
                        // Bounded: apply what is spooled, then empty it.
                        if applier.has_pending() {
                            let r = applier.complete().await;
                            confirm(applier, st, &mut inflight, &mut wbuf)?;
                            r?;
                        }
                        if sp.all_applied(st.applied()) {
                            sp.clear()?;
                        }
                    }
                    sp.append(spool_prev, &txn)?;
                    spool_prev = txn.tid;
                    unsynced = Some(txn.tid);
                    if !more {
                        flush_received(
                            spool,
                            &mut unsynced,
                            received_ok,
                            &mut wh,
                            cfg.role.as_deref(),
                        )
                        .await?;
                    }
                }
                let oldest = inflight.front().map(|i| i.0).unwrap_or(txn.tid);
                let r = {
                    let fut = applier.apply(&txn, more);
                    tokio::pin!(fut);
                    loop {
                        tokio::select! {
                            r = &mut fut => break r,
                            _ = ticker.tick() => publish_applying(status, cfg, st, oldest),
                        }
                    }
                };
                confirm(applier, st, &mut inflight, &mut wbuf)?;
                cfg.applied.send_if_modified(|t| bump(t, st.applied()));
                if let Err(e) = r {
                    if let ApplyError::Foreign(m) = &e {
                        st.on_local_divergence(m.clone());
                    }
                    return Err(e.into());
                }
            }
        }
        if !stream_io::has_frame(&rbuf) {
            flush_received(
                spool,
                &mut unsynced,
                received_ok,
                &mut wh,
                cfg.role.as_deref(),
            )
            .await?;
            if applier.has_pending() {
                let oldest = inflight.front().map(|i| i.0);
                let r = {
                    let fut = applier.complete();
                    tokio::pin!(fut);
                    loop {
                        tokio::select! {
                            r = &mut fut => break r,
                            _ = ticker.tick() => if let Some(o) = oldest {
                                publish_applying(status, cfg, st, o)
                            },
                        }
                    }
                };
                confirm(applier, st, &mut inflight, &mut wbuf)?;
                cfg.applied.send_if_modified(|t| bump(t, st.applied()));
                r?;
            }
            if let Some(sp) = spool.as_mut() {
                // Everything spooled is applied: start the file over (not
                // after every transaction: each emptying is an fsync).
                if sp.len() > cfg.spool_max_bytes / 16 && sp.all_applied(st.applied()) {
                    sp.clear()?;
                }
            }
            if !wbuf.is_empty() {
                wh.write_all(&wbuf).await?;
                wh.flush().await?;
                wbuf.clear();
            }
        } else if wbuf.len() > 64 * 1024 {
            wh.write_all(&wbuf).await?;
            wh.flush().await?;
            wbuf.clear();
        }
        if !connected_logged && st.mode() != ReceiverMode::Handshaking {
            connected_logged = true;
            m::stream_connected(true);
            m::diverged(false);
            info!(upstream = %cfg.upstream, primary = %peer, applied = %tid_hex(&st.applied()), "replication stream up");
        }
        publish(status, cfg, st, None);
    }
}

/// Marks what the applier confirmed as applied and queues the acks.
fn confirm(
    applier: &mut Applier,
    st: &mut ReceiverState,
    inflight: &mut VecDeque<(Tid, [u8; 32], u64, Instant)>,
    wbuf: &mut BytesMut,
) -> Result<(), RunError> {
    for tid in applier.take_confirmed() {
        while let Some((t, digest, size, started)) = inflight.pop_front() {
            if t == tid {
                m::replica_applied(size, started.elapsed());
                let ack = st.on_applied(tid, digest);
                protocol::encode(&ack, wbuf)?;
                break;
            }
        }
    }
    Ok(())
}

fn stream_state(mode: ReceiverMode) -> StreamState {
    match mode {
        ReceiverMode::Live => StreamState::Live,
        ReceiverMode::CatchingUp => StreamState::CatchingUp,
        ReceiverMode::Diverged => StreamState::Diverged,
        _ => StreamState::Disconnected,
    }
}

fn set_upstream(
    status: &StatusHub,
    cfg: &ReplicaConfig,
    st: Option<&ReceiverState>,
    err: Option<String>,
) {
    let now = Instant::now();
    status.update(|s| {
        let prev_err = s.upstream.as_ref().and_then(|u| u.last_error.clone());
        let u = match st {
            Some(st) => {
                // The admin layer adds the time since last contact while
                // disconnected; publish the tid lag only.
                let lag = st.lag(now);
                let tid_lag =
                    crate::replication::txn::tid_delta_secs(&st.primary_last_tid(), &st.applied());
                let tid_s = |t: Tid| (t != Z64).then(|| tid_hex(&t));
                let connected = matches!(st.mode(), ReceiverMode::Live | ReceiverMode::CatchingUp);
                UpstreamStatus {
                    address: cfg.upstream.clone(),
                    state: stream_state(st.mode()),
                    primary_last_tid: st.primary_last_known().and_then(tid_s),
                    applied_tid: tid_s(st.applied()),
                    lag_seconds: tid_lag,
                    lag_transactions: lag.transactions.unwrap_or(0),
                    lag_bytes: 0,
                    // A live stream clears the last error: an operator reads
                    // last_error as a current problem.
                    last_error: if connected && err.is_none() {
                        None
                    } else {
                        err.or(prev_err)
                    },
                    last_contact: st.last_contact(),
                }
            }
            None => UpstreamStatus {
                address: cfg.upstream.clone(),
                state: StreamState::Disconnected,
                primary_last_tid: None,
                applied_tid: None,
                lag_seconds: 0.0,
                lag_transactions: 0,
                lag_bytes: 0,
                last_error: err.or(prev_err),
                last_contact: None,
            },
        };
        if let Some(st) = st {
            let applied = st.applied();
            if applied != Z64 {
                s.storage_last_tid = Some(tid_hex(&applied));
                s.storage_last_commit_unix = Some(tid_unix_secs(&applied));
            }
        }
        s.upstream = Some(u);
    });
}

/// While an apply is stuck (a stalled or overloaded backend), the replica
/// lacks `oldest` at least: its lag is at least the age of that commit, and
/// keeps growing, although no new message is read meanwhile.
fn publish_applying(status: &StatusHub, cfg: &ReplicaConfig, st: &ReceiverState, oldest: Tid) {
    publish(status, cfg, st, None);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let behind = now - tid_unix_secs(&oldest);
    status.update(|s| {
        if let Some(u) = &mut s.upstream {
            if behind > u.lag_seconds {
                u.lag_seconds = behind;
            }
        }
    });
}

/// Moves a published position forward (never back).
fn bump(t: &mut Tid, applied: Tid) -> bool {
    if applied > *t {
        *t = applied;
        true
    } else {
        false
    }
}

fn publish(status: &StatusHub, cfg: &ReplicaConfig, st: &ReceiverState, err: Option<String>) {
    cfg.applied.send_if_modified(|t| bump(t, st.applied()));
    if st.applied() != Z64 {
        m::applied_last_commit(tid_unix_secs(&st.applied()));
    }
    if st.primary_last_tid() != Z64 {
        m::primary_last_commit(tid_unix_secs(&st.primary_last_tid()));
    }
    set_upstream(status, cfg, Some(st), err);
}

async fn read_msg<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<StreamMsg, RunError> {
    match stream_io::read_msg(r, buf, max).await {
        Ok(m) => Ok(m),
        Err(ReadError::Protocol(p)) => Err(RunError::Protocol(p)),
        Err(ReadError::Closed) => Err(RunError::Closed),
        // TLS alerts (e.g. our certificate refused) come as i/o errors
        // wrapping a rustls error; anything else is plain i/o.
        Err(ReadError::Io(e)) => match tls::TlsError::from(e) {
            tls::TlsError::Io(e) => Err(RunError::Io(e)),
            t => {
                tls::record_handshake_failure(&t);
                Err(RunError::Tls(t))
            }
        },
    }
}
