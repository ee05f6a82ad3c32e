//! The accept loop: a connection limit, a span per connection, and an accept
//! error that never kills the listener.
//!
//! An optional [`Gate`] turns each accepted TCP connection into a client
//! stream and an [`Access`] (TLS lives behind it, outside this layer). It
//! runs inside the connection's own task, so a slow or garbage client in
//! its handshake never holds up the accept loop.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info_span, warn, Instrument};

use super::hooks::{Access, SessionHooks};
use super::limits::PeerLimit;
use super::read_only::ReadOnlyGate;
use super::session::{Session, SessionLimits};
use crate::metrics as m;

/// Builds the hooks of each new session (the role decides which).
pub type HooksFactory = Arc<dyn Fn() -> Box<dyn SessionHooks> + Send + Sync>;

/// A client byte stream of any kind (plain TCP, TLS, ...).
pub trait ClientStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientStream for T {}

/// A client connection accepted elsewhere (e.g. a session another node's
/// door relays here) to be served like one from the listener.
pub struct InjectedClient {
    pub stream: Box<dyn ClientStream>,
    /// For logs: who sent it.
    pub peer: String,
}

/// A connection a [`Gate`] let in.
pub struct Admitted {
    pub stream: Box<dyn ClientStream>,
    pub access: Access,
    /// Who the client proved to be, for logs (e.g. its certificate's name).
    pub identity: Option<String>,
}

pub type Admission = Pin<Box<dyn Future<Output = Option<Admitted>> + Send>>;

/// Admission of a new connection: `None` refuses it (the gate has logged and
/// counted why; the connection is closed and nothing reaches the backend).
/// The gate bounds its own handshake time.
pub trait Gate: Send + Sync {
    fn admit(&self, tcp: TcpStream, peer: SocketAddr) -> Admission;
}

pub struct ClientListener {
    pub listener: TcpListener,
    pub limits: SessionLimits,
    pub max_connections: usize,
    pub hooks: HooksFactory,
    /// `None`: plaintext, every client read-write.
    pub gate: Option<Arc<dyn Gate>>,
    /// Open connections per client IP address.
    pub peer_limit: Arc<PeerLimit>,
    /// Connections accepted elsewhere (sessions other nodes' doors relay
    /// here); they share the connection limit.
    pub injected: Option<tokio::sync::mpsc::Receiver<InjectedClient>>,
}

async fn recv_injected(
    rx: &mut Option<tokio::sync::mpsc::Receiver<InjectedClient>>,
) -> Option<InjectedClient> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

impl ClientListener {
    /// Accepts until `shutdown` fires, then waits for the sessions to drain
    /// (each session enforces the grace deadline itself).
    pub async fn serve(mut self, shutdown: CancellationToken) {
        let mut injected = self.injected.take();
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let mut sessions = JoinSet::new();
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
                Some(c) = recv_injected(&mut injected) => {
                    // Already authenticated by whoever accepted it (another
                    // node's door over mutual TLS): no gate, no peer limit.
                    let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
                    let span = info_span!("session", conn = conn_id, peer = %c.peer, enc = tracing::field::Empty);
                    let session = Session::new(
                        c.stream,
                        conn_id,
                        c.peer,
                        self.limits.clone(),
                        (self.hooks)(),
                        shutdown.clone(),
                    );
                    spawn_session(&mut sessions, session, span, permit);
                    continue;
                }
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            m::connection_accepted();
            let Some(slot) = self.peer_limit.admit(peer.ip()) else {
                m::connection_refused("per_peer_limit");
                if self.peer_limit.should_log() {
                    warn!(
                        %peer,
                        max_connections_per_peer = self.peer_limit.max(),
                        "too many connections from this address: closing new ones"
                    );
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            if let Err(e) = crate::liveness::arm(
                &stream,
                self.limits.dead_peer_timeout,
                self.limits.write_stall,
            ) {
                warn!(error = %e, %peer, "could not enable dead-peer detection");
            }
            let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
            let span = info_span!(
                "session",
                conn = conn_id,
                peer = %peer,
                enc = tracing::field::Empty,
                client = tracing::field::Empty
            );
            let limits = self.limits.clone();
            let hooks = self.hooks.clone();
            let gate = self.gate.clone();
            let shutdown = shutdown.clone();
            sessions.spawn(
                async move {
                    let peer_s = peer.to_string();
                    match gate {
                        None => {
                            Session::new(stream, conn_id, peer_s, limits, hooks(), shutdown)
                                .run()
                                .await
                        }
                        Some(gate) => {
                            let admitted = tokio::select! {
                                a = gate.admit(stream, peer) => a,
                                _ = shutdown.cancelled() => None,
                            };
                            if let Some(a) = admitted {
                                if let Some(id) = &a.identity {
                                    tracing::Span::current().record("client", id.as_str());
                                }
                                let hooks = match a.access {
                                    Access::ReadWrite => hooks(),
                                    Access::ReadOnly => Box::new(ReadOnlyGate::wrap(hooks())),
                                };
                                Session::new(a.stream, conn_id, peer_s, limits, hooks, shutdown)
                                    .with_access(a.access, a.identity)
                                    .run()
                                    .await
                            }
                        }
                    }
                    drop(slot);
                    drop(permit);
                }
                .instrument(span),
            );
            reap(&mut sessions);
        }
        drop(self.listener);
        while sessions.join_next().await.is_some() {}
    }
}

/// Runs a session in the set; `guard` (connection permit, per-peer slot)
/// is released when it ends.
fn spawn_session<C, G>(
    sessions: &mut JoinSet<()>,
    session: Session<C>,
    span: tracing::Span,
    guard: G,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    G: Send + 'static,
{
    sessions.spawn(
        async move {
            session.run().await;
            drop(guard);
        }
        .instrument(span),
    );
    reap(sessions);
}

/// Reaps finished sessions so the set does not grow.
fn reap(sessions: &mut JoinSet<()>) {
    while sessions.try_join_next().is_some() {}
}
