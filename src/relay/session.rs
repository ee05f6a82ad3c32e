//! One client session: handshake, then a relay loop between the client and
//! its own backend connection.
//!
//! A single task owns both sockets and all buffers, so nothing is shared and
//! nothing crosses a task boundary on the hot path. Each loop iteration reads
//! whatever one side has, decodes every complete frame, consults the hooks,
//! and writes the resulting bytes in one `write_all` per side: ZEO clients
//! send bursts of small async messages (stores), which are coalesced this way.
//! A peer that stops reading stalls only its own session (backpressure).

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::backend;
use super::hooks::{
    ClientVerdict, HoldUntil, LocalVerdict, PendingCall, Reroute, ServerVerdict, SessionHooks,
    SessionInfo, WakeVerdict,
};
use super::limits::{Budget, Charge, Shortfall, FREE_BYTES};
use super::transparency;
use crate::metrics as m;
use crate::wire::calls::ClientCall;
use crate::wire::{frame, Encoding, Flag, Message, Value, WireError};

/// Everything a session needs from the process configuration.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_message_bytes: usize,
    pub handshake_timeout: Duration,
    pub shutdown_grace: Duration,
    pub backend: crate::config::BackendAddr,
    pub connect_timeout: Duration,
    /// Shared by all sessions: bytes buffered for large client messages.
    pub budget: std::sync::Arc<Budget>,
    /// How long a session waits for budget before it is closed.
    pub buffer_wait: Duration,
    /// A client that takes no reply bytes for this long is closed.
    pub write_stall: Duration,
    /// A client host silent at the TCP level for this long is gone
    /// (`crate::liveness`); zero: the system's defaults.
    pub dead_peer_timeout: Duration,
}

/// Why a session ended; logged once, counted by `side`.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    #[error("client closed the connection")]
    ClientClosed,
    #[error("backend closed the connection")]
    BackendClosed,
    #[error("client protocol error: {0}")]
    ClientProtocol(String),
    #[error("backend protocol error: {0}")]
    BackendProtocol(String),
    #[error("client i/o error: {0}")]
    ClientIo(std::io::Error),
    #[error("backend i/o error: {0}")]
    BackendIo(std::io::Error),
    #[error("{0}")]
    Backend(#[from] backend::ConnectError),
    #[error("closed by hook: {0}")]
    Hook(String),
    #[error("shut down at a safe point")]
    Drained,
    #[error("shut down: grace period over with a transaction or call in flight")]
    DrainDeadline,
    #[error("ruok answered")]
    Ruok,
    #[error("cannot reach {0}")]
    RouteUnavailable(String),
    #[error("closed at a safe point: {0}")]
    Rerouted(&'static str),
    #[error("closed with a call in flight (no safe point within the grace period): {0}")]
    ReroutedInFlight(&'static str),
    #[error("{0}")]
    BufferBudget(String),
    #[error("client read nothing of its replies for {0:?}")]
    ClientStalled(Duration),
}

impl SessionEnd {
    fn reason_label(&self) -> &'static str {
        match self {
            SessionEnd::ClientClosed => "client_closed",
            SessionEnd::BackendClosed => "backend_closed",
            SessionEnd::ClientProtocol(_) => "client_protocol_error",
            SessionEnd::BackendProtocol(_) => "backend_protocol_error",
            SessionEnd::ClientIo(_) => "client_io_error",
            SessionEnd::BackendIo(_) => "backend_io_error",
            SessionEnd::Backend(_) => "backend_unreachable",
            SessionEnd::Hook(_) => "hook",
            SessionEnd::Drained | SessionEnd::DrainDeadline => "shutdown",
            SessionEnd::Ruok => "ruok",
            SessionEnd::RouteUnavailable(_) => "route_unavailable",
            SessionEnd::Rerouted(_) | SessionEnd::ReroutedInFlight(_) => "rerouted",
            SessionEnd::BufferBudget(_) => "buffer_budget",
            SessionEnd::ClientStalled(_) => "client_stalled",
        }
    }
}

/// Messages pushed into a session from outside (e.g. invalidations produced
/// by a replica's applier). Bounded: see `Session::inject_tx`.
pub type Inject = mpsc::Receiver<Message>;

pub struct Session<C> {
    client: C,
    limits: SessionLimits,
    hooks: Box<dyn SessionHooks>,
    info: SessionInfo,
    shutdown: CancellationToken,
    inject: Option<Inject>,
}

const READ_CHUNK: usize = 64 * 1024;
/// How long a session a hook asked to close (role change, new primary,
/// replica fallen behind) may take to reach a safe point (at most
/// `shutdown_grace_ms`). Such a session can commit nothing more where it is:
/// a fenced primary refuses the vote; only a commit that voted before the
/// fence finishes, in milliseconds.
const SAFE_POINT_GRACE: Duration = Duration::from_secs(3);

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + Send + Unpin,
{
    pub fn new(
        client: C,
        conn_id: u64,
        peer: String,
        limits: SessionLimits,
        hooks: Box<dyn SessionHooks>,
        shutdown: CancellationToken,
    ) -> Self {
        Session {
            client,
            limits,
            hooks,
            info: SessionInfo {
                conn_id,
                peer,
                encoding: Encoding::Pickle,
                registered: None,
                in_transaction: false,
                route: String::new(),
                access: super::Access::ReadWrite,
                identity: None,
            },
            shutdown,
            inject: None,
        }
    }

    /// What the door granted (default: read-write, no identity). The hooks
    /// given to [`Session::new`] must already enforce it.
    pub fn with_access(mut self, access: super::Access, identity: Option<String>) -> Self {
        self.info.access = access;
        self.info.identity = identity;
        self
    }

    pub fn with_inject(mut self, rx: Inject) -> Self {
        self.inject = Some(rx);
        self
    }

    /// Runs the session to its end and logs why it ended.
    pub async fn run(mut self) {
        let result = self.run_inner().await;
        let end = match result {
            Ok(end) | Err(end) => end,
        };
        self.hooks.on_close(&self.info);
        if let Some((_, ro)) = &self.info.registered {
            m::session_closed(*ro);
        }
        m::session_ended(end.reason_label());
        match &end {
            SessionEnd::ClientClosed | SessionEnd::Ruok | SessionEnd::Drained => {
                debug!(reason = %end, "session ended")
            }
            SessionEnd::Rerouted(_) => info!(reason = %end, "session ended"),
            SessionEnd::ClientProtocol(_)
            | SessionEnd::Hook(_)
            | SessionEnd::BufferBudget(_)
            | SessionEnd::ClientStalled(_) => {
                warn!(reason = %end, "closing client connection")
            }
            _ => info!(reason = %end, "session ended"),
        }
    }

    async fn run_inner(&mut self) -> Result<SessionEnd, SessionEnd> {
        let early = self.hooks.early_route();
        let (mut br, mut bw) = match early {
            Some(opener) => {
                self.info.route = opener.describe();
                opener.open().await.map_err(|e| {
                    SessionEnd::RouteUnavailable(format!("{}: {e}", self.info.route))
                })?
            }
            None => match backend::connect(&self.limits.backend, self.limits.connect_timeout).await
            {
                Ok(halves) => halves,
                Err(e) => {
                    m::backend_connect_failed();
                    return Err(e.into());
                }
            },
        };
        // One task reads and writes the client, never both at once: no
        // `tokio::io::split` (a lock on every read and write).
        let mut client = &mut self.client;
        let max = self.limits.max_message_bytes;
        let mut cbuf = BytesMut::with_capacity(READ_CHUNK);
        let mut bbuf = BytesMut::with_capacity(READ_CHUNK);
        let hs = self.limits.handshake_timeout;

        // The server speaks first: its protocol offer.
        let shutdown = self.shutdown.clone();
        // Nothing is in flight before the handshakes are done: a shutdown
        // ends the session at once.
        let offer = tokio::select! {
            r = read_first_frame(&mut br, &mut bbuf, max, hs) => r,
            _ = shutdown.cancelled() => return Ok(SessionEnd::Drained),
        }
        .map_err(|e| match e {
            Side::Io(e) => SessionEnd::BackendIo(e),
            Side::Closed => SessionEnd::BackendClosed,
            Side::Protocol(p) => SessionEnd::BackendProtocol(format!("handshake: {p}")),
        })?;
        write_frames(&mut client, &[&offer])
            .await
            .map_err(SessionEnd::ClientIo)?;

        // The client's answer decides the session's encoding (the server
        // adopts it whatever it offered).
        let answer = tokio::select! {
            r = read_first_frame(&mut client, &mut cbuf, max, hs) => r,
            _ = shutdown.cancelled() => return Ok(SessionEnd::Drained),
        }
        .map_err(|e| match e {
            Side::Io(e) => SessionEnd::ClientIo(e),
            Side::Closed => SessionEnd::ClientClosed,
            Side::Protocol(p) => SessionEnd::ClientProtocol(format!("handshake: {p}")),
        })?;
        if &answer[..] == b"ruok" {
            write_frames(&mut bw, &[&answer])
                .await
                .map_err(SessionEnd::BackendIo)?;
            // The server answers with one JSON frame and closes. Its
            // `connections` leave out zrelay's own (relay::transparency).
            let mut raw = bbuf.split();
            let mut status_seen = false;
            loop {
                if !status_seen {
                    match frame::parse_frame(&mut raw, max) {
                        Ok(Some(json)) => {
                            status_seen = true;
                            let json = transparency::ruok_answer(&json).map_or(json, Bytes::from);
                            write_frames(&mut client, &[&json])
                                .await
                                .map_err(SessionEnd::ClientIo)?;
                        }
                        Ok(None) => {}
                        // Not ours to judge: pass the bytes on as they are.
                        Err(_) => status_seen = true,
                    }
                }
                if status_seen && !raw.is_empty() {
                    write_flush(&mut client, &raw)
                        .await
                        .map_err(SessionEnd::ClientIo)?;
                    raw.clear();
                }
                raw.reserve(READ_CHUNK);
                let read = tokio::time::timeout(hs, br.read_buf(&mut raw)).await;
                match read {
                    Ok(Ok(0)) | Err(_) => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(SessionEnd::BackendIo(e)),
                }
            }
            // An incomplete frame at the end goes on as it came.
            if !raw.is_empty() {
                client.write_all(&raw).await.map_err(SessionEnd::ClientIo)?;
            }
            let _ = client.shutdown().await;
            return Ok(SessionEnd::Ruok);
        }
        let Some(enc) = Encoding::from_handshake(&answer) else {
            return Err(SessionEnd::ClientProtocol(format!(
                "bad handshake {:?} (expected Z5, M5 or ruok)",
                String::from_utf8_lossy(&answer[..answer.len().min(32)])
            )));
        };
        self.info.encoding = enc;
        tracing::Span::current().record("enc", tracing::field::debug(enc));
        write_frames(&mut bw, &[&answer])
            .await
            .map_err(SessionEnd::BackendIo)?;

        let mut relay = Relay {
            info: &mut self.info,
            hooks: self.hooks.as_mut(),
            pending: Vec::new(),
            register_sent: false,
            register_args: None,
            cout: BytesMut::with_capacity(READ_CHUNK),
            bout: BytesMut::with_capacity(READ_CHUNK),
            lout: BytesMut::new(),
            reroute: None,
            local: LocalState::None,
            local_pending: Vec::new(),
            deferred: Vec::new(),
            close_reason: None,
            held: std::collections::VecDeque::new(),
            release: None,
        };
        let mut wake = relay.hooks.wake_signal();
        // Bytes that arrived with the handshakes (a client sends `register`
        // right behind its protocol answer) are in the buffers already.
        if !bbuf.is_empty() {
            relay.backend_bytes(&mut bbuf, max)?;
        }
        if !cbuf.is_empty() {
            relay.client_bytes(&mut cbuf, max)?;
        }
        let grace = self.limits.shutdown_grace;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        // A hook asked to close at a safe point: by then at the latest. A
        // session forwarded to a primary that was cut off by a partition
        // never reaches one (its call is never answered, and the connection
        // neither delivers nor fails); its client gets a disconnect (outcome
        // unknown) and reconnects through its door.
        let mut close_by: Option<tokio::time::Instant> = None;
        let close_grace = grace.min(SAFE_POINT_GRACE);
        let mut inject = self.inject.take();
        // The local connection of a rerouted session (the node's own
        // backend, kept for offloaded calls).
        let mut local: Option<(backend::BoxRead, backend::BoxWrite)> = None;
        let mut lbuf = BytesMut::new();
        // One waiter registration for the whole session, not one per loop
        // iteration (each `cancelled()` locks the token's waiter list twice),
        // and not even a poll per iteration (a lock each): it is polled once
        // here with a waker that raises `shutdown_seen` before it wakes the
        // task, and again only once that flag is up.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let shutdown_seen = ShutdownSeen::arm(cancelled.as_mut()).await;
        let mut charge = Charge::new(self.limits.budget.clone());
        // Set while the session waits for budget (not reading its client).
        let mut stalled_until: Option<tokio::time::Instant> = None;
        // One timer for deferred calls and local replies, re-armed only when
        // an earlier deadline is needed (not once per loop iteration while a
        // local call is out: registering a timer takes the driver's lock).
        // Firing early is harmless: what is not due is re-armed.
        let deferred_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(deferred_timer);
        let mut timer_armed: Option<tokio::time::Instant> = None;

        loop {
            if let Some((reroute, register)) = relay.reroute.take() {
                let (nbr, nbw, nbuf) = open_reroute(&reroute, &answer, &register, max, hs).await?;
                relay.info.route = reroute.opener.describe();
                debug!(to = %relay.info.route, "session rerouted");
                let old_r = std::mem::replace(&mut br, nbr);
                let old_w = std::mem::replace(&mut bw, nbw);
                let old_buf = std::mem::replace(&mut bbuf, nbuf);
                if reroute.keep_local {
                    local = Some((old_r, old_w));
                    lbuf = old_buf;
                    relay.start_local()?;
                } else {
                    relay.local = LocalState::None;
                }
                if !bbuf.is_empty() {
                    relay.backend_bytes(&mut bbuf, max)?;
                }
                if !cbuf.is_empty() {
                    relay.client_bytes(&mut cbuf, max)?;
                }
                continue;
            }
            if !relay.bout.is_empty() {
                // Flushed: over TLS, write_all can leave the last records
                // inside the TLS session when the socket was full.
                write_flush(&mut bw, &relay.bout)
                    .await
                    .map_err(SessionEnd::BackendIo)?;
                relay.bout.clear();
            }
            if !relay.lout.is_empty() {
                let failed = match &mut local {
                    Some((_, lw)) => write_flush(lw, &relay.lout).await.is_err(),
                    None => true,
                };
                relay.lout.clear();
                if failed {
                    local = None;
                    relay.local_lost();
                    continue;
                }
            }
            if !relay.cout.is_empty() {
                write_client(&mut client, &relay.cout, self.limits.write_stall).await?;
                relay.cout.clear();
            }
            if drain_deadline.is_some() && relay.at_safe_point() {
                return Ok(SessionEnd::Drained);
            }
            if let Some(reason) = relay.close_reason {
                if relay.at_safe_point() {
                    return Ok(SessionEnd::Rerouted(reason));
                }
                close_by.get_or_insert_with(|| tokio::time::Instant::now() + close_grace);
            }
            if cbuf.is_empty() && cbuf.capacity() > FREE_BYTES {
                // A large message went through: give its memory back.
                cbuf = BytesMut::with_capacity(READ_CHUNK);
            }
            if cbuf.capacity() - cbuf.len() < READ_CHUNK / 4 {
                cbuf.reserve(READ_CHUNK);
            }
            // The next read may bring the buffer to this size: covered by
            // the free allowance or the budget, else stop reading (wait).
            let shortfall = charge.fit(cbuf.len() + READ_CHUNK).err();
            match (shortfall, stalled_until) {
                (Some(s), None) => {
                    m::client_buffer_stall();
                    debug!(
                        buffered = cbuf.len(),
                        wanted = s.0,
                        "client buffer budget exhausted: not reading the client"
                    );
                    stalled_until = Some(tokio::time::Instant::now() + self.limits.buffer_wait);
                }
                (None, Some(_)) => stalled_until = None,
                _ => {}
            }
            if bbuf.capacity() - bbuf.len() < READ_CHUNK / 4 {
                bbuf.reserve(READ_CHUNK);
            }
            if local.is_some() && lbuf.capacity() - lbuf.len() < READ_CHUNK / 4 {
                lbuf.reserve(READ_CHUNK);
            }
            let deadline = drain_deadline;
            if let Some(next) = relay.next_deferred() {
                let earlier = match timer_armed {
                    Some(armed) => next < armed,
                    None => true,
                };
                if earlier {
                    deferred_timer.as_mut().reset(next);
                    timer_armed = Some(next);
                }
            }
            // Biased, shutdown last: a session woken by its sockets does not
            // re-poll the shutdown signal first (a lock each time). Shutdown
            // is still seen whenever the session waits, and tokio's
            // cooperative budget makes even a flooded session wait.
            tokio::select! {
                biased;
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    return Err(SessionEnd::DrainDeadline);
                }
                _ = sleep_until_opt(close_by), if close_by.is_some() => {
                    return Err(SessionEnd::ReroutedInFlight(
                        relay.close_reason.unwrap_or("asked to close"),
                    ));
                }
                r = br.read_buf(&mut bbuf) => {
                    match r {
                        Ok(0) => return Ok(SessionEnd::BackendClosed),
                        Ok(_) => relay.backend_bytes(&mut bbuf, max)?,
                        Err(e) => return Err(SessionEnd::BackendIo(e)),
                    }
                }
                // Guarded: a branch whose source is absent is not polled
                // (each poll of a pending future costs, round trip after
                // round trip).
                r = read_local(&mut local, &mut lbuf), if local.is_some() => {
                    match r {
                        Ok(n) if n > 0 => relay.local_bytes(&mut lbuf, max)?,
                        _ => {
                            local = None;
                            relay.local_lost();
                        }
                    }
                }
                got = wait_for_budget(&mut charge, shortfall, stalled_until), if shortfall.is_some() => {
                    if !got {
                        return Err(SessionEnd::BufferBudget(format!(
                            "client buffer budget exhausted for {:?} with {} bytes of an incomplete message buffered",
                            self.limits.buffer_wait,
                            cbuf.len()
                        )));
                    }
                }
                r = read_chunk(&mut client, &mut cbuf), if shortfall.is_none() && relay.reroute.is_none() => {
                    match r {
                        Ok(0) => return Ok(SessionEnd::ClientClosed),
                        Ok(n) => {
                            relay.client_bytes(&mut cbuf, max)?;
                            if n == READ_CHUNK {
                                // A client sending as fast as we read (a
                                // flood of small messages, a large store):
                                // let the other sessions run between its
                                // chunks instead of after tokio's budget
                                // of 128 reads.
                                tokio::task::yield_now().await;
                            }
                        }
                        Err(e) => return Err(SessionEnd::ClientIo(e)),
                    }
                }
                Some(msg) = recv_opt(&mut inject), if inject.is_some() => {
                    relay.push_client(&msg)?;
                }
                open = wait_release(&mut relay.release), if !relay.held.is_empty() => {
                    relay.release_held(open);
                }
                changed = wait_wake(&mut wake), if wake.is_some() => {
                    if changed {
                        relay.woken()?;
                    } else {
                        wake = None;
                    }
                }
                _ = &mut deferred_timer, if timer_armed.is_some() => {
                    timer_armed = None;
                    relay.retry_deferred(false)?;
                }
                _ = shutdown_seen.wait(cancelled.as_mut()), if drain_deadline.is_none() => {
                    drain_deadline = Some(tokio::time::Instant::now() + grace);
                    continue;
                }
            }
        }
    }
}

/// The session's view of its shutdown signal: a flag raised by the waker
/// the signal's future was first polled with, so the loop need not poll
/// that future (a lock) each time round; it polls it once the flag is up.
struct ShutdownSeen(std::sync::Arc<ShutdownWaker>);

struct ShutdownWaker {
    up: std::sync::atomic::AtomicBool,
    task: std::task::Waker,
}

impl std::task::Wake for ShutdownWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.up.store(true, std::sync::atomic::Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl ShutdownSeen {
    /// Polls `signal` once with the flag-raising waker (registering it);
    /// a signal already given raises the flag at once.
    async fn arm<F: std::future::Future>(mut signal: std::pin::Pin<&mut F>) -> ShutdownSeen {
        let task = std::future::poll_fn(|cx| std::task::Poll::Ready(cx.waker().clone())).await;
        let inner = std::sync::Arc::new(ShutdownWaker {
            up: std::sync::atomic::AtomicBool::new(false),
            task,
        });
        let waker = std::task::Waker::from(inner.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        if signal.as_mut().poll(&mut cx).is_ready() {
            inner.up.store(true, std::sync::atomic::Ordering::Release);
        }
        ShutdownSeen(inner)
    }

    /// Ready once the signal is given; until the flag is up, pending
    /// without touching the signal (its waker, registered by `arm`, wakes
    /// the task and raises the flag).
    async fn wait<F: std::future::Future>(&self, mut signal: std::pin::Pin<&mut F>) {
        std::future::poll_fn(|cx| {
            if !self.0.up.load(std::sync::atomic::Ordering::Acquire) {
                return std::task::Poll::Pending;
            }
            signal.as_mut().poll(cx).map(|_| ())
        })
        .await
    }
}

/// Opens a reroute's connection and replays the session's start on it: the
/// server's offer is read (and not shown to the client, which has one
/// already), then the client's handshake answer and its `register` go out.
async fn open_reroute(
    reroute: &Reroute,
    answer: &Bytes,
    register: &Bytes,
    max: usize,
    hs: Duration,
) -> Result<(backend::BoxRead, backend::BoxWrite, BytesMut), SessionEnd> {
    let to = reroute.opener.describe();
    let (mut r, mut w) = reroute
        .opener
        .open()
        .await
        .map_err(|e| SessionEnd::RouteUnavailable(format!("{to}: {e}")))?;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let offer = read_first_frame(&mut r, &mut buf, max, hs)
        .await
        .map_err(|e| match e {
            Side::Io(e) => SessionEnd::RouteUnavailable(format!("{to}: {e}")),
            Side::Closed => SessionEnd::RouteUnavailable(format!("{to}: closed")),
            Side::Protocol(p) => SessionEnd::RouteUnavailable(format!("{to}: handshake: {p}")),
        })?;
    if offer.len() < 2 || !offer.starts_with(b"M") && !offer.starts_with(b"Z") {
        return Err(SessionEnd::RouteUnavailable(format!(
            "{to}: not a ZEO server offer"
        )));
    }
    write_frames(&mut w, &[answer, register])
        .await
        .map_err(|e| SessionEnd::RouteUnavailable(format!("{to}: {e}")))?;
    Ok((r, w, buf))
}

async fn read_local(
    local: &mut Option<(backend::BoxRead, backend::BoxWrite)>,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    match local {
        Some((r, _)) => r.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

/// `true` when the signal changed, `false` when its sender is gone.
async fn wait_wake(w: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match w {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Reads at most one chunk, so the buffer never outgrows its budget charge.
async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> std::io::Result<usize> {
    r.read_buf(&mut buf.limit(READ_CHUNK)).await
}

/// Waits for the budget a stalled session lacks; `false` once `until` passes.
async fn wait_for_budget(
    charge: &mut Charge,
    shortfall: Option<Shortfall>,
    until: Option<tokio::time::Instant>,
) -> bool {
    match (shortfall, until) {
        (Some(s), Some(until)) => tokio::time::timeout_at(until, charge.wait(s)).await.is_ok(),
        _ => std::future::pending().await,
    }
}

/// `true` when the released position changed, `false` when its sender is
/// gone (everything held is then released).
async fn wait_release(w: &mut Option<tokio::sync::watch::Receiver<[u8; 8]>>) -> bool {
    match w {
        Some(rx) => rx.changed().await.is_ok(),
        None => false,
    }
}

async fn sleep_until_opt(d: Option<tokio::time::Instant>) {
    match d {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn recv_opt(rx: &mut Option<Inject>) -> Option<Message> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Per-session relay state: pending calls, transaction state and the output
/// buffers of one loop iteration.
struct Relay<'a> {
    info: &'a mut SessionInfo,
    hooks: &'a mut dyn SessionHooks,
    pending: Vec<PendingCall>,
    register_sent: bool,
    register_args: Option<(String, bool)>,
    cout: BytesMut,
    bout: BytesMut,
    /// Bytes for the local connection of a rerouted session.
    lout: BytesMut,
    /// A `register` the hooks rerouted, with its original payload; the
    /// session loop opens the new connection before reading more.
    reroute: Option<(Reroute, Bytes)>,
    local: LocalState,
    /// Calls sent to the local connection: (original payload, the call
    /// itself (moved here, not copied; its msgid matches the reply), when
    /// sent).
    local_pending: Vec<(Bytes, Message, Instant)>,
    /// Calls held by `ClientVerdict::Defer`.
    deferred: Vec<Deferred>,
    /// Set by a hook: end the session at the next safe point.
    close_reason: Option<&'static str>,
    /// Frames for the client held by [`ServerVerdict::Hold`], in order: a
    /// frame with a tid waits until `release` reaches it, and every frame
    /// behind it waits too.
    held: std::collections::VecDeque<(Option<[u8; 8]>, Bytes)>,
    release: Option<tokio::sync::watch::Receiver<[u8; 8]>>,
}

struct Deferred {
    msg: Message,
    payload: Bytes,
    until: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalState {
    /// No local connection: `Local` verdicts go upstream.
    None,
    /// Our own read-only `register` is in flight; calls may follow it.
    Registering,
    Ready,
}

/// How long a call sent to the local connection may take before the
/// session gives up on that connection and asks the upstream.
const LOCAL_REPLY_TIMEOUT: Duration = Duration::from_millis(500);

/// msgid of the proxy's own `register` on a kept local connection.
const LOCAL_REGISTER_MSGID: &str = "zrelay-local-register";

impl Relay<'_> {
    fn at_safe_point(&self) -> bool {
        self.pending.is_empty()
            && !self.info.in_transaction
            && self.local_pending.is_empty()
            && self.deferred.is_empty()
            && self.reroute.is_none()
            && self.held.is_empty()
    }

    /// Queues one frame for the client, behind anything held.
    fn emit_client(&mut self, payload: &[u8]) {
        if self.held.is_empty() {
            frame::write_frame(&mut self.cout, payload);
        } else {
            self.held.push_back((None, Bytes::copy_from_slice(payload)));
        }
    }

    fn hold(&mut self, h: HoldUntil, payload: Bytes) {
        self.release = Some(h.release);
        self.held.push_back((Some(h.until), payload));
        self.release_held(true);
    }

    /// Delivers the held frames the released position allows (`open`:
    /// false when the releasing side is gone: everything goes).
    fn release_held(&mut self, open: bool) {
        let released = match (&mut self.release, open) {
            (Some(rx), true) => Some(*rx.borrow_and_update()),
            _ => None,
        };
        while let Some((until, _)) = self.held.front() {
            if let (Some(u), Some(r)) = (until, released) {
                if *u > r {
                    return;
                }
            }
            let (_, payload) = self.held.pop_front().expect("front exists");
            frame::write_frame(&mut self.cout, &payload);
        }
        if !open {
            self.release = None;
        }
    }

    /// After a reroute that keeps the old connection: register it read-only
    /// (its client-side handshake was done already).
    fn start_local(&mut self) -> Result<(), SessionEnd> {
        let Some((storage, _)) = self
            .info
            .registered
            .clone()
            .or_else(|| self.register_args.clone())
        else {
            self.local = LocalState::None;
            return Ok(());
        };
        let reg = Message::call(
            Value::str(LOCAL_REGISTER_MSGID),
            "register",
            vec![Value::str(&storage), Value::Bool(true)],
        );
        let payload = reg
            .encode(self.info.encoding)
            .map_err(|e| SessionEnd::Hook(wire_err("encode", &e)))?;
        frame::write_frame(&mut self.lout, &payload);
        self.local = LocalState::Registering;
        Ok(())
    }

    /// The local connection is gone: what it owed goes upstream.
    fn local_lost(&mut self) {
        if self.local == LocalState::None && self.local_pending.is_empty() {
            return;
        }
        debug!("local connection lost; everything goes upstream");
        self.local = LocalState::None;
        self.lout.clear();
        self.hooks.on_local_lost(self.info);
        for (payload, msg, _) in std::mem::take(&mut self.local_pending) {
            self.track_client(msg);
            frame::write_frame(&mut self.bout, &payload);
        }
    }

    /// Replies from the local connection: to our `register`, or to calls the
    /// hooks sent there. Anything else it sends (invalidations of its own,
    /// `info`) is not for this client.
    fn local_bytes(&mut self, buf: &mut BytesMut, max: usize) -> Result<(), SessionEnd> {
        let enc = self.info.encoding;
        loop {
            let payload = match frame::parse_frame(buf, max) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(e) => {
                    debug!(error = %e, "local connection: bad frame");
                    buf.clear();
                    self.local_lost();
                    return Ok(());
                }
            };
            let Ok(msg) = Message::decode(enc, &payload) else {
                buf.clear();
                self.local_lost();
                return Ok(());
            };
            if !msg.is_reply() {
                continue;
            }
            if matches!(&msg.msgid, Value::Str(id) if id == LOCAL_REGISTER_MSGID) {
                if msg.flag == Flag::Error {
                    self.local_lost();
                } else if self.local == LocalState::Registering {
                    self.local = LocalState::Ready;
                }
                continue;
            }
            let Some(i) = self
                .local_pending
                .iter()
                .position(|p| p.1.msgid == msg.msgid)
            else {
                continue;
            };
            let (orig, call, _) = self.local_pending.swap_remove(i);
            let verdict = if msg.flag == Flag::Error {
                LocalVerdict::Retry
            } else {
                self.hooks.on_local_reply(self.info, &msg)
            };
            match verdict {
                LocalVerdict::Deliver => self.emit_client(&payload),
                LocalVerdict::Retry => {
                    self.track_client(call);
                    frame::write_frame(&mut self.bout, &orig);
                }
            }
        }
    }

    fn next_deferred(&self) -> Option<tokio::time::Instant> {
        let local = self
            .local_pending
            .iter()
            .map(|p| p.2 + LOCAL_REPLY_TIMEOUT)
            .min();
        self.deferred
            .iter()
            .map(|d| d.until)
            .chain(local)
            .min()
            .map(tokio::time::Instant::from_std)
    }

    fn woken(&mut self) -> Result<(), SessionEnd> {
        if let WakeVerdict::CloseAtSafePoint(reason) = self.hooks.on_wake(self.info) {
            self.close_reason = Some(reason);
        }
        self.retry_deferred(true)
    }

    /// Asks the hooks again about held calls (`any`: also those whose
    /// deadline has not passed).
    fn retry_deferred(&mut self, any: bool) -> Result<(), SessionEnd> {
        let now = Instant::now();
        if self
            .local_pending
            .iter()
            .any(|p| p.2 + LOCAL_REPLY_TIMEOUT <= now)
        {
            // A local backend that stopped answering (stalled, overloaded)
            // must not stall the client: give up on it for this session.
            tracing::warn!("local connection did not answer in time; using the upstream only");
            self.local_lost();
        }
        let held = std::mem::take(&mut self.deferred);
        for d in held {
            let expired = d.until <= now;
            if !expired && !any {
                self.deferred.push(d);
                continue;
            }
            match self.hooks.on_deferred(self.info, &d.msg, expired) {
                ClientVerdict::Defer(until) if !expired => {
                    self.deferred.push(Deferred { until, ..d })
                }
                // A register held until its route was known (a door waiting
                // for a primary): continues as at register.
                ClientVerdict::Reroute(r)
                    if d.msg.method == "register" && self.reroute.is_none() =>
                {
                    self.track_client(d.msg);
                    self.reroute = Some((r, d.payload));
                }
                verdict => self.apply_verdict(verdict, d.msg, d.payload)?,
            }
        }
        Ok(())
    }

    /// Carries out a verdict on a client message (not `Reroute`). Takes the
    /// message: a call sent to the local connection is kept as it is (for
    /// asking the upstream again), without a copy.
    fn apply_verdict(
        &mut self,
        verdict: ClientVerdict,
        msg: Message,
        payload: Bytes,
    ) -> Result<(), SessionEnd> {
        match verdict {
            ClientVerdict::Forward | ClientVerdict::Defer(_) | ClientVerdict::Reroute(_) => {
                self.track_client(msg);
                frame::write_frame(&mut self.bout, &payload);
            }
            ClientVerdict::Local if self.local != LocalState::None => {
                frame::write_frame(&mut self.lout, &payload);
                self.local_pending.push((payload, msg, Instant::now()));
            }
            ClientVerdict::Local => {
                self.track_client(msg);
                frame::write_frame(&mut self.bout, &payload);
            }
            ClientVerdict::Reply(reply) => self.push_client(&reply)?,
            ClientVerdict::Swallow => {}
            ClientVerdict::Close(reason) => return Err(SessionEnd::Hook(reason)),
        }
        Ok(())
    }

    fn client_bytes(&mut self, buf: &mut BytesMut, max: usize) -> Result<(), SessionEnd> {
        let enc = self.info.encoding;
        // After a reroute verdict nothing more is read until the session
        // continues on the new connection.
        while self.reroute.is_none() {
            let Some(payload) = frame::parse_frame(buf, max)
                .map_err(|e| SessionEnd::ClientProtocol(wire_err("frame", &e)))?
            else {
                break;
            };
            let msg = Message::decode(enc, &payload)
                .map_err(|e| SessionEnd::ClientProtocol(wire_err("message", &e)))?;
            if msg.is_heartbeat() {
                frame::write_frame(&mut self.bout, &payload);
                continue;
            }
            if !self.register_sent && msg.method != "register" {
                return Err(SessionEnd::ClientProtocol(format!(
                    "call {:?} before register",
                    truncate(&msg.method)
                )));
            }
            m::client_request(&msg.method);
            match self.hooks.on_client_message(self.info, &msg) {
                ClientVerdict::Reroute(r) if msg.method == "register" => {
                    // Sent on the new connection; tracked like any call.
                    self.track_client(msg);
                    self.reroute = Some((r, payload));
                }
                ClientVerdict::Reroute(_) => {
                    return Err(SessionEnd::Hook(
                        "reroute is only possible at register".into(),
                    ))
                }
                ClientVerdict::Defer(until) => self.deferred.push(Deferred {
                    msg,
                    payload,
                    until,
                }),
                verdict => self.apply_verdict(verdict, msg, payload)?,
            }
        }
        Ok(())
    }

    /// Bookkeeping for a call on its way upstream. Takes the message: a
    /// sync call's msgid and method move into the pending list (no copies).
    fn track_client(&mut self, msg: Message) {
        match &*msg.method {
            "register" => {
                self.register_sent = true;
                if let Ok(ClientCall::Register { storage, read_only }) = ClientCall::parse(&msg) {
                    self.register_args = Some((storage.to_string(), read_only));
                }
            }
            "tpc_begin" => self.info.in_transaction = true,
            // tpc_abort may be sent async; either way the transaction is over
            // once the backend has it.
            "tpc_abort" if msg.flag == Flag::Async => self.info.in_transaction = false,
            _ => {}
        }
        if msg.flag == Flag::Sync {
            self.pending.push(PendingCall {
                msgid: msg.msgid,
                sent: (msg.method == "tpc_finish").then(Instant::now),
                method: msg.method,
            });
        }
    }

    fn backend_bytes(&mut self, buf: &mut BytesMut, max: usize) -> Result<(), SessionEnd> {
        let enc = self.info.encoding;
        while let Some(payload) = frame::parse_frame(buf, max)
            .map_err(|e| SessionEnd::BackendProtocol(wire_err("frame", &e)))?
        {
            let msg = Message::decode(enc, &payload)
                .map_err(|e| SessionEnd::BackendProtocol(wire_err("message", &e)))?;
            let answered = if msg.is_reply() {
                self.pending
                    .iter()
                    .position(|p| p.msgid == msg.msgid)
                    .map(|i| self.pending.swap_remove(i))
            } else {
                None
            };
            if let Some(call) = &answered {
                self.track_reply(call, &msg);
                if call.method == "server_status" {
                    if let Some(fixed) = self.own_connections_hidden(&msg) {
                        self.push_client(&fixed)?;
                        continue;
                    }
                }
            }
            match self
                .hooks
                .on_server_message(self.info, &msg, answered.as_ref())
            {
                ServerVerdict::Forward => self.emit_client(&payload),
                ServerVerdict::Hold(h) => self.hold(h, payload),
                ServerVerdict::Overtake => {
                    // What the released position allows goes first: only
                    // messages still waiting for a later position are
                    // passed.
                    if !self.held.is_empty() {
                        self.release_held(true);
                    }
                    frame::write_frame(&mut self.cout, &payload)
                }
                ServerVerdict::Drop => {}
                ServerVerdict::Replace(msgs) => {
                    for m in &msgs {
                        self.push_client(m)?;
                    }
                }
                ServerVerdict::Close(reason) => return Err(SessionEnd::Hook(reason)),
            }
        }
        Ok(())
    }

    fn track_reply(&mut self, call: &PendingCall, reply: &Message) {
        let ok = reply.flag != Flag::Error;
        match &*call.method {
            "register" if ok => {
                if let Some((storage, ro)) = self.register_args.take() {
                    if let Some((_, old_ro)) = &self.info.registered {
                        m::session_closed(*old_ro);
                    }
                    m::session_opened(ro);
                    self.info.registered = Some((storage, ro));
                }
            }
            "tpc_finish" => {
                self.info.in_transaction = false;
                if let (true, Some(sent)) = (ok, call.sent) {
                    m::client_commit(sent.elapsed());
                }
            }
            "tpc_abort" => self.info.in_transaction = false,
            _ => {}
        }
        if !ok {
            m::client_error_reply(&call.method);
        }
    }

    /// A `server_status` reply without zrelay's own backend connections in
    /// its count (relay::transparency); None: forward the original.
    fn own_connections_hidden(&self, reply: &Message) -> Option<Message> {
        let (storage, _) = self.info.registered.as_ref()?;
        transparency::server_status_reply(reply, storage)
    }

    /// Queues a message produced by the proxy itself for the client.
    fn push_client(&mut self, msg: &Message) -> Result<(), SessionEnd> {
        let payload = msg
            .encode(self.info.encoding)
            .map_err(|e| SessionEnd::Hook(wire_err("encode", &e)))?;
        self.emit_client(&payload);
        Ok(())
    }
}

fn wire_err(what: &str, e: &WireError) -> String {
    format!("{what}: {e}")
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

enum Side {
    Io(std::io::Error),
    Closed,
    Protocol(String),
}

/// Reads the first frame of a connection (the protocol handshake). Extra
/// bytes stay in `buf` for the relay loop.
async fn read_first_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, Side> {
    // A handshake is a few bytes; refuse absurd sizes early.
    let max = max.min(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match frame::parse_frame(buf, max) {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(e) => return Err(Side::Protocol(e.to_string())),
        }
        buf.reserve(1024);
        match tokio::time::timeout_at(deadline, r.read_buf(buf)).await {
            Err(_) => return Err(Side::Protocol(format!("no handshake within {timeout:?}"))),
            Ok(Ok(0)) => return Err(Side::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Side::Io(e)),
        }
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, payloads: &[&[u8]]) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    for p in payloads {
        frame::write_frame(&mut out, p);
    }
    write_flush(w, &out).await
}

/// `write_all` then `flush`: over TLS, `write_all` may return with the last
/// records still inside the TLS session (the socket was full); only a flush
/// (or a later write) sends them. A no-op cost on plain TCP.
async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8]) -> std::io::Result<()> {
    w.write_all(buf).await?;
    w.flush().await
}

/// Writes to the client, closing the session if the client takes no bytes
/// for `stall` (it stopped reading: its replies, and the invalidations of
/// every later commit, would otherwise pile up in the backend for good).
/// Almost every write completes at once: it is tried first, and the stall
/// timer (a timer registration per use) is set up only when the socket is
/// full.
async fn write_client<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    stall: Duration,
) -> Result<(), SessionEnd> {
    let mut off = 0;
    while off < buf.len() {
        let rest = &buf[off..];
        let r = match now_or_pending(|cx| std::pin::Pin::new(&mut *w).poll_write(cx, rest)).await {
            Some(r) => r,
            None => match tokio::time::timeout(stall, w.write(&buf[off..])).await {
                Err(_) => return Err(SessionEnd::ClientStalled(stall)),
                Ok(r) => r,
            },
        };
        match r {
            Ok(0) => return Err(SessionEnd::ClientIo(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => off += n,
            Err(e) => return Err(SessionEnd::ClientIo(e)),
        }
    }
    let r = match now_or_pending(|cx| std::pin::Pin::new(&mut *w).poll_flush(cx)).await {
        Some(r) => r,
        None => match tokio::time::timeout(stall, w.flush()).await {
            Err(_) => return Err(SessionEnd::ClientStalled(stall)),
            Ok(r) => r,
        },
    };
    r.map_err(SessionEnd::ClientIo)
}

/// Polls once: the result if ready, `None` if it would wait (the waker it
/// registered is harmless).
async fn now_or_pending<T>(
    mut poll: impl FnMut(&mut std::task::Context<'_>) -> std::task::Poll<T>,
) -> Option<T> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}
