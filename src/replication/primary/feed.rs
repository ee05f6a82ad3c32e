//! The primary's side: learn every commit in order, read it back from the
//! backend, and stream it to each connected replica.
//!
//! - The *observer* is a ZEO connection registered with the backend; its
//!   `invalidateTransaction` stream is the total order of every commit,
//!   including writes that bypassed the proxy (invariant 2).
//! - For each new tid the feed reads the committed transaction from the
//!   backend's history (never from what a client sent: resolved conflicts and
//!   undo differ from it) and publishes it on a bounded broadcast.
//! - Each replica connection runs a [`SenderState`] (I/O-free) that catches
//!   up from history and then follows the broadcast with no gap and no
//!   duplicate; a slow replica overflows back to history reading.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use crate::config::BackendAddr;
use crate::live::Live;
use crate::metrics as m;
use crate::replication::capture::{self, CaptureHub, Taken};
use crate::replication::clone_serve::{self, CloneServeError, CloneSource};
use crate::replication::history::{fetch_txn, packed_away, read_txn, HistoryCursor};
use crate::replication::pack::{PackGate, PackOp};
use crate::replication::protocol::{self, StreamMsg};
use crate::replication::sender::{SenderConfig, SenderMode, SenderState};
use crate::replication::stages::{self, Stage};
use crate::replication::stream_io::{read_msg, ReadError};
use crate::replication::tls;
use crate::replication::txn::{tid_after, tid_hex, Tid, Txn, Z64};
use crate::status::{ReplicaPeerStatus, StatusHub, StreamState};
use crate::wire::calls::ServerMsg;
use crate::zeoclient::{ZeoConn, ZeoError};

/// How the feed reaches its backend.
#[derive(Clone)]
pub struct BackendLink {
    pub addr: BackendAddr,
    pub storage: String,
    pub connect_timeout: Duration,
    pub call_timeout: Duration,
    pub max_message_bytes: usize,
}

impl BackendLink {
    pub async fn open(&self, read_only: bool) -> Result<(ZeoConn, Tid), ZeoError> {
        let (c, last) = ZeoConn::open(
            &self.addr,
            &self.storage,
            read_only,
            self.connect_timeout,
            self.call_timeout,
            self.max_message_bytes,
        )
        .await?;
        let last: Tid = last[..]
            .try_into()
            .map_err(|_| ZeoError::Protocol("register reply is not a tid".into()))?;
        Ok((c, last))
    }
}

/// What replica connections subscribe to.
#[derive(Clone)]
pub struct FeedHandle {
    pub commits: broadcast::Sender<Arc<Txn>>,
    /// Newest tid known committed on the backend.
    pub last_tid: watch::Receiver<Tid>,
    /// The latest pack to replay on replicas (see [`crate::replication::pack`]).
    pub packs: watch::Receiver<Option<PackOp>>,
}

/// The capture fast path of a primary's feed (see `capture`).
#[derive(Clone)]
pub struct CaptureLink {
    pub hub: Arc<CaptureHub>,
    /// Also read each captured commit back and compare (publishing the
    /// read-back on a difference): a safety check, at the read-back's cost.
    pub verify: bool,
    /// How long the feed waits for a session whose `tpc_finish` reply is
    /// racing the observer's invalidation.
    pub wait: Duration,
}

/// Runs the observer and fetcher until shutdown, reconnecting on errors.
/// `status`: the hub to report the backend's last commit to, on a primary
/// (on a cascading replica the replica task reports it). `capture`: client
/// commits captured by this primary's sessions.
pub async fn run_feed(
    link: BackendLink,
    commits: broadcast::Sender<Arc<Txn>>,
    last_tid: watch::Sender<Tid>,
    status: Option<Arc<StatusHub>>,
    shutdown: CancellationToken,
    capture: Option<CaptureLink>,
) {
    // Newest tid published on `commits` (Z64: nothing published yet).
    let mut published: Tid = Z64;
    let mut backoff = Duration::from_millis(100);
    loop {
        let r = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = feed_once(&link, &commits, &last_tid, status.as_deref(), &mut published, capture.as_ref()) => r,
        };
        if let Err(e) = r {
            warn!(error = %e, "commit feed lost its backend connection; reconnecting");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn feed_once(
    link: &BackendLink,
    commits: &broadcast::Sender<Arc<Txn>>,
    last_tid: &watch::Sender<Tid>,
    status: Option<&StatusHub>,
    published: &mut Tid,
    capture: Option<&CaptureLink>,
) -> Result<(), ZeoError> {
    // One connection observes and reads back: every registered connection
    // costs the backend an `invalidateTransaction` per commit (and this
    // process a wake-up to read it), so a second, mostly idle reader would
    // add work to every commit. Invalidations arriving during a read-back
    // wait in `pending_async` and are taken, in order, before new ones.
    let (mut observer, last) = link.open(true).await?;
    if *published == Z64 {
        // First start: replicas catch up from history; publish from here on.
        *published = last;
    } else if last > *published {
        // Commits made while the observer was away: publish them in order
        // (or just note them, if nobody streams).
        if commits.receiver_count() == 0 {
            *published = last;
        } else {
            publish_range(&mut observer, published, last, commits, last_tid, status).await?;
        }
    }
    set_last(last_tid, status, last.max(*published));
    info!(last = %tid_hex(&last), "commit feed observing the backend");
    loop {
        let msg = match observer.pending_async.pop_front() {
            Some(m) => m,
            None => observer.read_message().await?,
        };
        let Ok(ServerMsg::InvalidateTransaction { tid, oids }) = ServerMsg::parse(&msg) else {
            continue;
        };
        let Ok(tid): Result<Tid, _> = tid.try_into() else {
            continue;
        };
        if tid <= *published {
            continue;
        }
        if commits.receiver_count() == 0 {
            // Nobody streams: skip the read-back (it would double the
            // backend's work per commit). A replica that connects later
            // subscribes before reading history, so whatever is skipped
            // here was committed before it subscribed and is in history.
            if let Some(c) = capture {
                c.hub.discard_upto(&tid);
            }
            *published = tid;
            set_last(last_tid, status, tid);
            continue;
        }
        stages::record(Stage::Observed, &tid);
        if let Some(c) = capture {
            if let Some(txn) = captured(c, &mut observer, &tid, &oids).await? {
                *published = txn.tid;
                set_last(last_tid, status, txn.tid);
                send_commit(commits, txn);
                continue;
            }
        }
        // The observer sees every commit in order, so this is the next one:
        // read it in one round trip. Anything unexpected falls back to
        // reading the whole range since the last published tid.
        match fetch_txn(&mut observer, &tid, oids.len()).await? {
            Some(txn) => {
                *published = txn.tid;
                set_last(last_tid, status, txn.tid);
                send_commit(commits, txn);
            }
            None => publish_range(&mut observer, published, tid, commits, last_tid, status).await?,
        }
    }
}

/// The client's own commit of `tid`, when capture proves it exact (and, in
/// verify mode, the read-back agrees); None: read it back. Counts either.
async fn captured(
    c: &CaptureLink,
    reader: &mut ZeoConn,
    tid: &Tid,
    oids: &[&[u8]],
) -> Result<Option<Txn>, ZeoError> {
    let txn = match c.hub.take(tid, c.wait).await {
        Taken::Captured(txn) => match capture::check_oids(&txn, oids) {
            Ok(()) => txn,
            Err(r) => {
                capture::count_read_back(r);
                return Ok(None);
            }
        },
        Taken::ReadBack(r) => {
            capture::count_read_back(r);
            return Ok(None);
        }
    };
    if c.verify {
        let back = fetch_txn(reader, tid, oids.len()).await?;
        if back.as_ref() != Some(&txn) {
            capture::count_read_back(capture::Reason::Mismatch);
            error!(
                tid = %tid_hex(tid),
                captured = ?txn,
                read_back = ?back,
                "captured commit differs from the backend's; publishing the read-back"
            );
            return Ok(back);
        }
    }
    capture::count_captured();
    Ok(Some(txn))
}

/// Reads the committed transactions in `(published, upto]` and publishes
/// them in order. Reading a range, not one tid, means a missed invalidation
/// can never become a gap.
async fn publish_range(
    reader: &mut ZeoConn,
    published: &mut Tid,
    upto: Tid,
    commits: &broadcast::Sender<Arc<Txn>>,
    last_tid: &watch::Sender<Tid>,
    status: Option<&StatusHub>,
) -> Result<(), ZeoError> {
    let mut cursor = HistoryCursor::open(reader, tid_after(published), Some(upto)).await?;
    while let Some(txn) = cursor.next(reader).await? {
        if txn.tid <= *published {
            continue;
        }
        *published = txn.tid;
        set_last(last_tid, status, txn.tid);
        send_commit(commits, txn);
    }
    Ok(())
}

/// Hands a committed transaction to the replica streams.
fn send_commit(commits: &broadcast::Sender<Arc<Txn>>, txn: Txn) {
    stages::record(Stage::Published, &txn.tid);
    // No receivers is fine: nobody is streaming right now.
    let _ = commits.send(Arc::new(txn));
}

fn set_last(last_tid: &watch::Sender<Tid>, status: Option<&StatusHub>, tid: Tid) {
    last_tid.send_if_modified(|t| {
        if tid > *t {
            *t = tid;
            true
        } else {
            false
        }
    });
    let Some(status) = status else {
        return;
    };
    let unix = crate::replication::txn::tid_unix_secs(&tid);
    m::primary_last_commit(unix);
    status.update(|s| {
        s.storage_last_tid = Some(tid_hex(&tid));
        s.storage_last_commit_unix = Some(unix);
    });
}

/// A client session another node's door relays to this one (see
/// `crate::door`): the TLS stream after the [`StreamMsg::DoorWelcome`],
/// carrying plain ZEO frames from here on.
pub struct DoorConn {
    pub stream: Box<dyn DoorStream>,
    /// The door's node name (from its certificate).
    pub node: String,
    pub peer_addr: String,
    pub read_only: bool,
}

pub trait DoorStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> DoorStream for T {}

/// Takes door sessions off the replication listener (the process wiring
/// runs them as client sessions; this module knows nothing of sessions).
pub type DoorSink = Arc<dyn Fn(DoorConn) + Send + Sync>;

/// Settings of the replication listener on a primary.
#[derive(Clone)]
pub struct ListenerConfig {
    /// Replaced on reload: new handshakes use the new certificate files,
    /// open streams keep theirs.
    pub acceptor: Arc<Live<TlsAcceptor>>,
    pub allowed_peers: Arc<Live<Vec<String>>>,
    pub sender: SenderConfig,
    pub max_message_bytes: usize,
    pub handshake_timeout: Duration,
    /// Tells replicas who is who (sent every second).
    pub cluster: Option<Arc<crate::cluster::ClusterView>>,
    /// Where door sessions go; `None`: doors are refused.
    pub doors: Option<DoorSink>,
    /// The backend's files for `zrelay clone` (None: clones are refused).
    pub clone_source: Option<CloneSource>,
    /// Semi-sync primary: where replica acknowledgements are counted.
    pub semisync: Option<Arc<crate::replication::semisync::SemiSync>>,
    /// The node's epoch (None: 0, as before epochs existed).
    pub role: Option<Arc<crate::role::fence::RoleCell>>,
    /// Set by the role controller at a switchover: once a replica has been
    /// sent every transaction up to the tid, it is sent the message (a
    /// [`StreamMsg::Handover`]) and its stream ends.
    pub handover: Option<watch::Receiver<Option<(StreamMsg, Tid)>>>,
}

/// Accepts replica connections until shutdown. A refused or failed peer
/// never affects the others.
pub async fn serve_replicas(
    listener: TcpListener,
    cfg: ListenerConfig,
    link: BackendLink,
    feed: FeedHandle,
    status: Arc<StatusHub>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "replication accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        // Replicas and other nodes' doors: a vanished host must not keep a
        // door session (maybe holding runzeo's commit lock) alive.
        if let Err(e) = crate::liveness::arm_between_nodes(&tcp) {
            warn!(error = %e, %peer, "could not enable dead-peer detection");
        }
        let cfg = cfg.clone();
        let link = link.clone();
        let feed = feed.clone();
        let status = status.clone();
        let shutdown = shutdown.clone();
        let span = info_span!("replica_conn", peer = %peer, node = tracing::field::Empty);
        tokio::spawn(
            async move {
                let (stream, name) = match tls::accept(
                    &cfg.acceptor.get(),
                    tcp,
                    &cfg.allowed_peers.get(),
                    cfg.handshake_timeout,
                )
                .await
                {
                    Ok(x) => x,
                    Err(e) => {
                        tls::record_handshake_failure(&e);
                        warn!(reason = e.reason(), error = %e, "replication peer refused");
                        return;
                    }
                };
                tracing::Span::current().record("node", name.as_str());
                let mut stream = stream;
                let mut rbuf = BytesMut::with_capacity(4096);
                let first = match tokio::time::timeout(
                    cfg.handshake_timeout,
                    read_msg(&mut stream, &mut rbuf, cfg.max_message_bytes),
                )
                .await
                {
                    Err(_) => Err(StreamError::NoHello(cfg.handshake_timeout)),
                    Ok(r) => r.map_err(StreamError::from),
                };
                let hello = match first {
                    Ok(StreamMsg::Hello(h)) => h,
                    Ok(StreamMsg::Door(d)) => {
                        if let Err(e) = crate::liveness::arm_door_link(stream.get_ref().0) {
                            warn!(error = %e, "could not enable dead-peer detection");
                        }
                        admit_door(stream, rbuf, d, &name, peer.to_string(), &cfg, &status).await;
                        return;
                    }
                    Ok(StreamMsg::CloneRequest(req)) => {
                        // A clone instead of a stream (see protocol's module doc).
                        if let Err(e) = serve_clone(stream, &req, &cfg, &shutdown).await {
                            warn!(error = %e, "clone ended");
                        }
                        return;
                    }
                    Ok(other) => {
                        warn!(
                            got = other.kind(),
                            "replication peer did not start with Hello or Door"
                        );
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "replication peer sent no opening message");
                        return;
                    }
                };
                info!("replica connected");
                let r = serve_one(
                    stream,
                    rbuf,
                    hello,
                    &name,
                    peer.to_string(),
                    &cfg,
                    &link,
                    feed,
                    &status,
                    shutdown,
                )
                .await;
                status.update(|s| {
                    if let Some(p) = s.replicas.get_mut(&name) {
                        p.state = StreamState::Disconnected;
                    }
                });
                m::peer_connected(&name, false);
                match r {
                    Ok(()) => info!("replica stream ended"),
                    // A replica going away (restart, shutdown) is routine.
                    Err(StreamError::Closed) => info!("replica closed the stream"),
                    Err(StreamError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        info!("replica closed the stream")
                    }
                    Err(e) => warn!(error = %e, "replica stream ended"),
                }
            }
            .instrument(span),
        );
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("stream: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("primary backend: {0}")]
    Backend(#[from] ZeoError),
    #[error("replica sent no Hello within {0:?}")]
    NoHello(Duration),
    #[error("replica closed the stream")]
    Closed,
    #[error("refused replica: {0}")]
    Refused(String),
    #[error("clone: {0}")]
    Clone(#[from] CloneServeError),
}

impl From<ReadError> for StreamError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Protocol(p) => StreamError::Protocol(p),
            ReadError::Io(e) => StreamError::Io(e),
            ReadError::Closed => StreamError::Closed,
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sends a copy of the backend's files to a `zrelay clone` client.
async fn serve_clone<S>(
    stream: S,
    req: &protocol::CloneRequest,
    cfg: &ListenerConfig,
    shutdown: &CancellationToken,
) -> Result<(), StreamError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (_rh, mut wh) = tokio::io::split(stream);
    info!(node = %req.node, "clone requested");
    let r = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = clone_serve::serve(&mut wh, req, cfg.clone_source.as_ref(), &cfg.sender) => r,
    };
    match r {
        Ok(s) => {
            let secs = s.elapsed.as_secs_f64().max(1e-6);
            info!(
                last_tid = %tid_hex(&s.last_tid),
                files = s.files,
                bytes = s.bytes,
                seconds = secs,
                mb_per_second = s.bytes as f64 / secs / 1e6,
                "clone sent"
            );
            Ok(())
        }
        Err(CloneServeError::Refused(m)) => Err(StreamError::Refused(m)),
        Err(e) => Err(e.into()),
    }
}

/// A door's session: checked (cluster, storage, this node is the primary),
/// welcomed, and handed to the [`DoorSink`].
async fn admit_door<S>(
    mut stream: S,
    rbuf: BytesMut,
    door: protocol::DoorHello,
    name: &str,
    peer_addr: String,
    cfg: &ListenerConfig,
    status: &StatusHub,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    use protocol::RefuseReason as R;
    let refusal = if door.version != protocol::PROTOCOL_VERSION {
        Some((
            R::VersionMismatch,
            format!("door speaks version {}", door.version),
        ))
    } else if door.cluster != cfg.sender.cluster {
        Some((
            R::WrongCluster,
            format!("door is of cluster {:?}", door.cluster),
        ))
    } else if door.storage != cfg.sender.storage {
        Some((
            R::WrongStorage,
            format!("door serves storage {:?}", door.storage),
        ))
    } else if let Some(e) = door
        .epoch
        .filter(|e| cfg.role.as_ref().is_some_and(|r| *e < r.epoch()))
    {
        Some((
            R::StaleEpoch,
            format!(
                "door is at epoch {e}, this node at epoch {}",
                cfg.role.as_ref().map(|r| r.epoch()).unwrap_or(0)
            ),
        ))
    } else if status.role() != crate::status::Role::Primary && !door.read_only {
        // A replica takes read-only sessions from other doors (its own door
        // decides where they are served); writers only go to the primary.
        Some((R::NotPrimary, "this node is not the primary".to_string()))
    } else if cfg.doors.is_none() {
        Some((
            R::NotPrimary,
            "this node takes no door sessions".to_string(),
        ))
    } else if !rbuf.is_empty() {
        Some((R::Protocol, "bytes after the Door message".to_string()))
    } else {
        None
    };
    let mut wbuf = BytesMut::new();
    let reply = match &refusal {
        Some((reason, message)) => StreamMsg::Refuse {
            reason: *reason,
            message: message.clone(),
            primary_last_tid: None,
            rewind_to: None,
        },
        None => StreamMsg::DoorWelcome {
            node: cfg.sender.primary_node.clone(),
        },
    };
    if protocol::encode(&reply, &mut wbuf).is_err() || stream.write_all(&wbuf).await.is_err() {
        return;
    }
    if let Some((reason, message)) = refusal {
        m::door_refused(reason.as_str());
        warn!(door = name, reason = reason.as_str(), %message, "door session refused");
        let _ = stream.shutdown().await;
        return;
    }
    if let Some(sink) = &cfg.doors {
        sink(DoorConn {
            stream: Box::new(stream),
            node: name.to_string(),
            peer_addr,
            read_only: door.read_only,
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_one<S>(
    stream: S,
    mut rbuf: BytesMut,
    hello: protocol::Hello,
    name: &str,
    peer_addr: String,
    cfg: &ListenerConfig,
    link: &BackendLink,
    feed: FeedHandle,
    status: &StatusHub,
    shutdown: CancellationToken,
) -> Result<(), StreamError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // Subscribe before anything is read from history: every commit from
    // here on is either in history or in this subscription.
    let mut live = feed.commits.subscribe();
    let (mut rh, mut wh) = tokio::io::split(stream);
    let max = cfg.max_message_bytes;
    status.update(|s| match hello.promotion {
        Some(p) => {
            s.replica_promotion.insert(name.to_string(), p);
        }
        None => {
            s.replica_promotion.remove(name);
        }
    });
    if hello.client_addr.is_some() || hello.replication_addr.is_some() {
        status.update(|s| {
            s.replica_adverts.insert(
                name.to_string(),
                (hello.client_addr.clone(), hello.replication_addr.clone()),
            );
        });
    }
    let (mut conn, primary_last) = link.open(true).await?;
    let digest = if hello.last_tid == Z64 {
        None
    } else {
        match read_txn(&mut conn, &hello.last_tid).await? {
            Some(t) => Some(t.digest()),
            // A pack on the primary may have removed the replica's last
            // transaction (all its records were superseded): the replica is
            // then a correct, less packed copy; stream what comes after.
            None if packed_away(&mut conn, &hello.last_tid).await? => {
                warn!(
                    replica = name,
                    tid = %tid_hex(&hello.last_tid),
                    "the replica's last transaction was removed by a pack here; resuming after it"
                );
                hello.last_digest
            }
            None => None,
        }
    };
    let mut state = SenderState::new(cfg.sender.clone())
        .with_epoch(cfg.role.as_ref().map(|r| r.epoch()).unwrap_or(0));
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let known_last = *feed.last_tid.borrow();
    match state.on_hello(&hello, primary_last.max(known_last), digest, Instant::now()) {
        Ok(mut welcome) => {
            // Only a primary counting `Received` acks asks its replicas to
            // spool (an fsync per transaction on their side).
            if !cfg.semisync.as_ref().is_some_and(|s| s.counts_received()) {
                if let StreamMsg::Welcome { features, .. } = &mut welcome {
                    features.retain(|f| f != protocol::FEATURE_RECEIVED_ACK);
                }
            }
            protocol::encode(&welcome, &mut wbuf)?
        }
        Err(mut refusal) => {
            if refusal.reason == protocol::RefuseReason::Diverged {
                // The way back: where this primary's history began.
                let promoted = status.snapshot().role_state.and_then(|r| {
                    r.history
                        .iter()
                        .rev()
                        .find(|c| c.role == crate::role::RoleKind::Primary)
                        .and_then(|c| c.last_tid.clone().map(|t| (c.epoch, t)))
                });
                if let Some((epoch, t)) = promoted {
                    refusal.rewind_to = u64::from_str_radix(&t, 16).ok().map(u64::to_be_bytes);
                    refusal.message = format!(
                        "{}; this primary was promoted at epoch {epoch} holding up to {t}: \
                         stop the replica's runzeo, `zrelay rewind --data-fs PATH --to {t}`, restart",
                        refusal.message
                    );
                }
            }
            protocol::encode(&refusal.to_msg(), &mut wbuf)?;
            wh.write_all(&wbuf).await?;
            let _ = wh.shutdown().await;
            if refusal.reason == protocol::RefuseReason::Diverged {
                m::peer_diverged(name, true);
                error!(replica = name, message = %refusal.message, "replica has diverged from the primary; not feeding it");
                status.update(|s| {
                    s.replicas.insert(
                        name.to_string(),
                        ReplicaPeerStatus {
                            node: name.to_string(),
                            peer_addr: peer_addr.clone(),
                            state: StreamState::Diverged,
                            sent_tid: None,
                            acked_tid: Some(tid_hex(&hello.last_tid)),
                            lag_seconds: 0.0,
                            lag_transactions: 0,
                            lag_bytes: 0,
                            diverged: true,
                        },
                    );
                });
            }
            return Err(StreamError::Refused(refusal.message));
        }
    }
    wh.write_all(&wbuf).await?;
    wh.flush().await?;
    wbuf.clear();
    m::peer_connected(name, true);
    m::peer_diverged(name, false);
    info!(replica = name, from = %tid_hex(&hello.last_tid), "replica accepted; streaming");

    // Acks arrive on their own task so history reading never stalls them;
    // a semi-sync primary counts them here at once.
    let (ack_tx, mut ack_rx) = mpsc::channel::<Result<Tid, StreamError>>(1024);
    let semisync = cfg.semisync.clone();
    let _gone = semisync.clone().map(|ss| {
        ss.applied(name, hello.last_tid);
        Gone(ss, name.to_string())
    });
    let ack_name = name.to_string();
    let reader = tokio::spawn(async move {
        loop {
            let r = read_msg(&mut rh, &mut rbuf, max)
                .await
                .map_err(StreamError::from);
            let item = match r {
                Ok(StreamMsg::Received { tid }) => {
                    if let Some(ss) = &semisync {
                        ss.received(&ack_name, tid);
                    }
                    continue;
                }
                Ok(StreamMsg::Ack { tid }) => {
                    if let Some(ss) = &semisync {
                        ss.applied(&ack_name, tid);
                    }
                    Ok(tid)
                }
                Ok(other) => Err(StreamError::Protocol(protocol::ProtocolError::Unexpected {
                    got: other.kind(),
                    state: "streaming",
                })),
                Err(e) => Err(e),
            };
            let stop = item.is_err();
            if ack_tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    let mut conn = Some(conn);
    let features_pack = hello.features.iter().any(|f| f == protocol::FEATURE_PACK);
    let features_roles = hello.features.iter().any(|f| f == protocol::FEATURE_ROLES);
    let mut handover = cfg.handover.clone();
    let mut packs = PackGate::new(feed.packs.clone(), features_pack, hello.last_tid);
    let result = stream_loop(
        &mut state,
        &mut wh,
        &mut wbuf,
        (&mut conn, link),
        &mut live,
        &mut ack_rx,
        &mut packs,
        &feed,
        name,
        &peer_addr,
        status,
        cfg.cluster.as_deref(),
        (&mut handover, features_roles),
        &shutdown,
    )
    .await;
    reader.abort();
    result
}

#[allow(clippy::too_many_arguments)]
async fn stream_loop<W: AsyncWrite + Unpin>(
    state: &mut SenderState,
    wh: &mut W,
    wbuf: &mut BytesMut,
    (conn, link): (&mut Option<ZeoConn>, &BackendLink),
    live: &mut broadcast::Receiver<Arc<Txn>>,
    acks: &mut mpsc::Receiver<Result<Tid, StreamError>>,
    packs: &mut PackGate,
    feed: &FeedHandle,
    name: &str,
    peer_addr: &str,
    status: &StatusHub,
    cluster: Option<&crate::cluster::ClusterView>,
    (handover, understands): (&mut Option<HandoverRx>, bool),
    shutdown: &CancellationToken,
) -> Result<(), StreamError> {
    let mut next_roster = Instant::now();
    // Live transactions in `wbuf`, timed once written (`stages`).
    let mut unsent: Vec<Tid> = Vec::new();
    loop {
        // Catch-up rounds from history.
        while let Some(after) = state.start_history() {
            if conn.is_none() {
                *conn = Some(link.open(true).await?.0);
            }
            let conn = conn.as_mut().expect("opened above");
            let mut cursor = HistoryCursor::open(conn, tid_after(&after), None).await?;
            loop {
                drain_live(state, live);
                drain_acks(state, acks)?;
                let Some(txn) = cursor.next(conn).await? else {
                    break;
                };
                // This registered connection's own invalidations.
                conn.pending_async.clear();
                let size = txn.size_bytes();
                if let Some(msg) = state.on_history_txn(Arc::new(txn), Instant::now()) {
                    protocol::encode(&msg, wbuf)?;
                    m::replica_sent(name, size);
                }
                if wbuf.len() >= 256 * 1024 {
                    wh.write_all(wbuf).await?;
                    wh.flush().await?;
                    wbuf.clear();
                    publish(state, feed, name, peer_addr, status);
                }
                if shutdown.is_cancelled() {
                    return Ok(());
                }
            }
            state.on_history_end();
        }
        if state.mode() == SenderMode::Live && conn.is_some() {
            // Live: history is not read until the stream falls behind again.
            // A registered connection costs the backend an invalidation per
            // commit, sent in the middle of replicating it: close it.
            *conn = None;
        }
        while let Some(msg) = state.poll_send(Instant::now(), unix_ms()) {
            if let StreamMsg::Txn { txn, .. } = &msg {
                m::replica_sent(name, txn.size_bytes());
                unsent.push(txn.tid);
            }
            protocol::encode(&msg, wbuf)?;
        }
        if let Some(c) = cluster {
            if Instant::now() >= next_roster {
                protocol::encode(&StreamMsg::Roster { nodes: c.roster() }, wbuf)?;
                next_roster = Instant::now() + ROSTER_INTERVAL;
            }
        }
        if let Some(msg) = packs.poll(state.last_sent()) {
            info!(
                replica = name,
                "replaying a pack of the primary on the replica"
            );
            protocol::encode(&msg, wbuf)?;
        }
        if !wbuf.is_empty() {
            wh.write_all(wbuf).await?;
            // TLS: write_all may leave the last records in the session.
            wh.flush().await?;
            wbuf.clear();
            for tid in unsent.drain(..) {
                stages::record(Stage::Sent, &tid);
            }
        }
        publish(state, feed, name, peer_addr, status);
        if state.mode() != SenderMode::Live && state.mode() != SenderMode::CatchingUp {
            return Ok(());
        }
        let due = handover
            .as_ref()
            .and_then(|h| h.borrow().clone())
            .filter(|(_, upto)| state.last_sent() >= *upto);
        if let Some((msg, upto)) = due {
            // Everything this primary committed was sent: hand over, end.
            if understands {
                protocol::encode(&msg, wbuf)?;
                wh.write_all(wbuf).await?;
                wbuf.clear();
            }
            wh.flush().await?;
            if understands {
                status.update(|s| {
                    s.handed_over.insert(name.to_string());
                });
            }
            info!(replica = name, upto = %tid_hex(&upto), told = understands, "switchover: stream handed over");
            return Ok(());
        }
        let mut wake = state
            .next_wakeup()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        if cluster.is_some() {
            wake = wake.min(next_roster);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = live.recv() => match r {
                Ok(txn) => state.on_live_txn(txn),
                Err(broadcast::error::RecvError::Lagged(_)) => state.on_live_lost(),
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            a = acks.recv() => match a {
                Some(Ok(tid)) => state.on_ack(tid)?,
                Some(Err(e)) => return Err(e),
                None => return Err(StreamError::Closed),
            },
            open = packs.changed(), if packs.is_open() => if open {
                packs.on_changed()
            },
            r = handover_changed(handover) => if r.is_err() {
                *handover = None;
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
            // Idle between history rounds: drop the invalidations the
            // backend sends this registered connection (see feed_once).
            m = read_idle(conn) => {
                m?;
            }
        }
    }
}

/// The next message of an idle history connection, dropped (its
/// invalidations); never resolves without one.
async fn read_idle(conn: &mut Option<ZeoConn>) -> Result<(), ZeoError> {
    match conn {
        Some(c) => {
            c.read_message().await?;
            c.pending_async.clear();
            Ok(())
        }
        None => std::future::pending().await,
    }
}

/// Removes a replica's acknowledgements from the semi-sync count when its
/// stream ends, however it ends.
struct Gone(Arc<crate::replication::semisync::SemiSync>, String);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.gone(&self.1);
    }
}

type HandoverRx = watch::Receiver<Option<(StreamMsg, Tid)>>;

async fn handover_changed(h: &mut Option<HandoverRx>) -> Result<(), watch::error::RecvError> {
    match h {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// How often a feeder tells its replicas who is who.
const ROSTER_INTERVAL: Duration = Duration::from_secs(1);

fn drain_live(state: &mut SenderState, live: &mut broadcast::Receiver<Arc<Txn>>) {
    loop {
        match live.try_recv() {
            Ok(txn) => state.on_live_txn(txn),
            Err(broadcast::error::TryRecvError::Lagged(_)) => state.on_live_lost(),
            Err(_) => return,
        }
    }
}

fn drain_acks(
    state: &mut SenderState,
    acks: &mut mpsc::Receiver<Result<Tid, StreamError>>,
) -> Result<(), StreamError> {
    loop {
        match acks.try_recv() {
            Ok(Ok(tid)) => state.on_ack(tid)?,
            Ok(Err(e)) => return Err(e),
            Err(mpsc::error::TryRecvError::Empty) => return Ok(()),
            Err(mpsc::error::TryRecvError::Disconnected) => return Err(StreamError::Closed),
        }
    }
}

fn publish(
    state: &SenderState,
    feed: &FeedHandle,
    name: &str,
    peer_addr: &str,
    status: &StatusHub,
) {
    let primary_last = *feed.last_tid.borrow();
    let lag = state.lag(primary_last);
    let st = if state.mode() == SenderMode::Live {
        StreamState::Live
    } else {
        StreamState::CatchingUp
    };
    status.update(|s| {
        s.replicas.insert(
            name.to_string(),
            ReplicaPeerStatus {
                node: name.to_string(),
                peer_addr: peer_addr.to_string(),
                state: st,
                sent_tid: Some(tid_hex(&state.last_sent())),
                acked_tid: Some(tid_hex(&state.acked())),
                lag_seconds: lag.seconds,
                lag_transactions: lag.unacked_txns,
                lag_bytes: lag.unacked_bytes,
                diverged: false,
            },
        );
    });
}
