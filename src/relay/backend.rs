//! Connecting to the backend ZEO server over TCP or a unix socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::config::BackendAddr;

pub type BoxRead = Box<dyn AsyncRead + Send + Sync + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Sync + Unpin>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to backend {addr}: timed out after {timeout:?}")]
    Timeout {
        addr: BackendAddr,
        timeout: Duration,
    },
    #[error("connect to backend {addr}: {source}")]
    Io {
        addr: BackendAddr,
        source: std::io::Error,
    },
}

pub type Upgrading = Pin<Box<dyn Future<Output = std::io::Result<(BoxRead, BoxWrite)>> + Send>>;

/// Turns a freshly connected TCP stream to the backend into the stream the
/// ZEO conversation runs on (TLS, for a backend on another host). Installed
/// once by the process wiring ([`install_upgrade`]); this layer does not
/// know what it does. Every backend connection of the process (client
/// sessions, monitor, feed, applier) goes through it.
pub trait Upgrade: Send + Sync {
    fn upgrade(&self, tcp: TcpStream) -> Upgrading;
}

static UPGRADE: OnceLock<Arc<dyn Upgrade>> = OnceLock::new();

/// Installs the process's backend upgrade; `false` if one already was.
pub fn install_upgrade(u: Arc<dyn Upgrade>) -> bool {
    UPGRADE.set(u).is_ok()
}

/// Opens a connection and returns its read and write halves. TCP_NODELAY is
/// set: ZEO is a request/response protocol of small messages.
pub async fn connect(
    addr: &BackendAddr,
    timeout: Duration,
) -> Result<(BoxRead, BoxWrite), ConnectError> {
    let fut = async {
        match addr {
            BackendAddr::Tcp(a) => {
                let s = TcpStream::connect(a.as_str()).await?;
                s.set_nodelay(true)?;
                if let Some(u) = UPGRADE.get() {
                    return u.upgrade(s).await;
                }
                let (r, w) = s.into_split();
                Ok::<(BoxRead, BoxWrite), std::io::Error>((Box::new(r), Box::new(w)))
            }
            BackendAddr::Unix(p) => {
                let s = UnixStream::connect(p).await?;
                let (r, w) = s.into_split();
                Ok((Box::new(r) as BoxRead, Box::new(w) as BoxWrite))
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(ConnectError::Timeout {
            addr: addr.clone(),
            timeout,
        }),
        Ok(Err(source)) => Err(ConnectError::Io {
            addr: addr.clone(),
            source,
        }),
        Ok(Ok(halves)) => Ok(halves),
    }
}
