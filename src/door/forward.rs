//! Opening a door session on another node: TCP, mutual TLS with the cluster
//! certificates, the [`DoorHello`] handshake on the replication listener,
//! then plain ZEO frames. The session relay gets two halves and never sees
//! the TLS stream (it only knows [`UpstreamOpener`]).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::cluster::Target;
use crate::relay::backend::{BoxRead, BoxWrite};
use crate::relay::hooks::Opening;
use crate::relay::UpstreamOpener;
use crate::replication::protocol::{self, DoorHello, StreamMsg};
use crate::replication::{stream_io, tls};

pub struct ForwardOpener {
    pub target: Target,
    pub hello: DoorHello,
    pub connector: TlsConnector,
    pub timeout: Duration,
}

impl UpstreamOpener for ForwardOpener {
    fn open(&self) -> Opening {
        let target = self.target.clone();
        let hello = self.hello.clone();
        let connector = self.connector.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let r = open(&target, hello, &connector, timeout).await;
            if r.is_err() {
                crate::metrics::door_route_failed();
            }
            r
        })
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.target.node, self.target.replication_addr)
    }
}

async fn open(
    target: &Target,
    hello: DoorHello,
    connector: &TlsConnector,
    timeout: Duration,
) -> Result<(BoxRead, BoxWrite), String> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&target.replication_addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    crate::liveness::arm_door_link(&tcp).map_err(|e| format!("dead-peer detection: {e}"))?;
    let (mut stream, _) = tls::connect(connector, tcp, &target.node, timeout)
        .await
        .map_err(|e| {
            tls::record_handshake_failure(&e);
            format!("TLS: {e}")
        })?;
    let mut out = BytesMut::new();
    protocol::encode(&StreamMsg::Door(hello), &mut out).map_err(|e| e.to_string())?;
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("send Door: {e}"))?;
    let mut buf = BytesMut::with_capacity(4096);
    let reply = tokio::time::timeout(
        timeout,
        stream_io::read_msg(&mut stream, &mut buf, 64 * 1024),
    )
    .await
    .map_err(|_| "no answer to Door".to_string())?
    .map_err(|e| format!("Door answer: {e}"))?;
    match reply {
        StreamMsg::DoorWelcome { .. } => {}
        StreamMsg::Refuse {
            reason, message, ..
        } => {
            return Err(format!("refused ({reason}): {message}"));
        }
        other => return Err(format!("unexpected {} answer to Door", other.kind())),
    }
    let (r, w) = tokio::io::split(stream);
    Ok((
        Box::new(Prefixed {
            prefix: buf,
            inner: r,
        }),
        Box::new(w),
    ))
}

/// A reader that first yields bytes already read off the stream (what came
/// behind the DoorWelcome in the same read).
struct Prefixed<R> {
    prefix: BytesMut,
    inner: R,
}

impl<R: AsyncRead + Unpin> AsyncRead for Prefixed<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}
