//! The accept loop: a connection limit, a span per connection, and an accept
//! error that never kills the listener.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info_span, warn, Instrument};

use super::hooks::SessionHooks;
use super::session::{Session, SessionLimits};
use crate::metrics as m;

/// Builds the hooks of each new session (the role decides which).
pub type HooksFactory = Arc<dyn Fn() -> Box<dyn SessionHooks> + Send + Sync>;

/// A client connection accepted elsewhere (e.g. a session another node's
/// door relays here) to be served like one from the listener.
pub struct InjectedClient {
    pub stream: Box<dyn ClientStream>,
    /// For logs: who sent it.
    pub peer: String,
}

pub trait ClientStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> ClientStream for T {}

pub struct ClientListener {
    pub listener: TcpListener,
    pub limits: SessionLimits,
    pub max_connections: usize,
    pub hooks: HooksFactory,
    /// Connections accepted elsewhere; they share the connection limit.
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
                    sessions.spawn(
                        async move {
                            session.run().await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                    while sessions.try_join_next().is_some() {}
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
            let _ = stream.set_nodelay(true);
            let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
            let span =
                info_span!("session", conn = conn_id, peer = %peer, enc = tracing::field::Empty);
            let session = Session::new(
                stream,
                conn_id,
                peer.to_string(),
                self.limits.clone(),
                (self.hooks)(),
                shutdown.clone(),
            );
            sessions.spawn(
                async move {
                    session.run().await;
                    drop(permit);
                }
                .instrument(span),
            );
            // Reap finished sessions so the set does not grow.
            while sessions.try_join_next().is_some() {}
        }
        drop(self.listener);
        while sessions.join_next().await.is_some() {}
    }
}
