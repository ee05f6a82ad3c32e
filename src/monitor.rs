//! Backend liveness: the single writer of `NodeStatus::backend_up` and
//! `zrelay_backend_up`.
//!
//! The monitor keeps one registered, read-only ZEO connection to the backend
//! and calls `ping` on it every interval. A TCP accept is not enough (a ZEO
//! server whose event loop is stuck accepts but never answers), and one
//! long-lived connection keeps the server's log quiet (a connection per
//! probe would log two lines each time).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::BackendAddr;
use crate::status::StatusHub;
use crate::zeoclient::ZeoConn;

/// Probes no more often than this, whatever the configuration says.
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// Runs until `shutdown`: probes the backend every `interval` and records the
/// result. Logs transitions (WARN when it goes down, INFO when it comes up).
pub async fn backend_monitor(
    addr: BackendAddr,
    storage: String,
    timeout: Duration,
    interval: Duration,
    status: Arc<StatusHub>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval.max(MIN_INTERVAL));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<bool> = None;
    let mut conn: Option<ZeoConn> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = probe(&mut conn, &addr, &storage, timeout) => r,
        };
        if result.is_err() {
            conn = None;
        }
        let up = result.is_ok();
        status.update(|s| s.backend_up = up);
        crate::metrics::backend_up(up);
        match (last, result) {
            (Some(true), Ok(())) => debug!(backend = %addr, "backend probe ok"),
            (Some(false), Err(e)) => debug!(backend = %addr, error = %e, "backend probe failed"),
            (_, Ok(())) => info!(backend = %addr, "backend ZEO server is up"),
            (_, Err(e)) => warn!(backend = %addr, error = %e, "backend ZEO server is down"),
        }
        last = Some(up);
    }
}

async fn probe(
    conn: &mut Option<ZeoConn>,
    addr: &BackendAddr,
    storage: &str,
    timeout: Duration,
) -> Result<(), String> {
    let fut = async {
        if conn.is_none() {
            let (c, _) = ZeoConn::open(addr, storage, true, timeout, timeout, 1 << 20)
                .await
                .map_err(|e| e.to_string())?;
            *conn = Some(c);
        }
        let c = conn.as_mut().ok_or("no connection")?;
        c.call("ping", vec![]).await.map_err(|e| e.to_string())?;
        // A registered connection also receives every invalidation: drop them.
        c.pending_async.clear();
        Ok::<(), String>(())
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Role;
    use crate::wire::{frame, Encoding, Message, Value};
    use bytes::BytesMut;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A minimal ZEO server: greets with `greeting`, answers `register` and
    /// `ping` (pickle) when `answer` is set.
    async fn serve_fake<S: AsyncRead + AsyncWrite + Unpin>(
        mut c: S,
        greeting: &[u8],
        answer: bool,
    ) {
        if c.write_all(greeting).await.is_err() || !answer {
            let mut sink = [0u8; 1024];
            while let Ok(n) = c.read(&mut sink).await {
                if n == 0 {
                    return;
                }
            }
            return;
        }
        let mut buf = BytesMut::new();
        let mut first = true;
        loop {
            while let Ok(Some(f)) = frame::parse_frame(&mut buf, 1 << 20) {
                if first {
                    first = false;
                    continue;
                }
                let Ok(m) = Message::decode(Encoding::Pickle, &f) else {
                    return;
                };
                let result = if m.method == "register" {
                    Value::Bytes(bytes::Bytes::from_static(&[0; 8]))
                } else {
                    Value::None
                };
                let payload = Message::reply(m.msgid, result)
                    .encode(Encoding::Pickle)
                    .unwrap();
                let mut out = BytesMut::new();
                frame::write_frame(&mut out, &payload);
                if c.write_all(&out).await.is_err() {
                    return;
                }
            }
            buf.reserve(4096);
            match c.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    async fn fake_backend(
        greeting: &'static [u8],
        answer: bool,
    ) -> (String, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((c, _)) = l.accept().await {
                conns.spawn(serve_fake(c, greeting, answer));
            }
        });
        (addr, task)
    }

    async fn wait_for(status: &StatusHub, up: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while status.snapshot().backend_up != up {
            assert!(
                tokio::time::Instant::now() < deadline,
                "backend_up never became {up}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn start(
        addr: BackendAddr,
        interval: Duration,
    ) -> (
        Arc<StatusHub>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let status = Arc::new(StatusHub::new("n".into(), Role::Primary, "b".into()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(backend_monitor(
            addr,
            "1".into(),
            Duration::from_millis(300),
            interval,
            status.clone(),
            shutdown.clone(),
        ));
        (status, shutdown, task)
    }

    #[tokio::test]
    async fn up_then_down() {
        let (addr, server) = fake_backend(b"\x00\x00\x00\x02Z5", true).await;
        let (status, shutdown, task) = start(BackendAddr::Tcp(addr), Duration::from_millis(50));
        wait_for(&status, true).await;
        server.abort();
        let _ = server.await;
        wait_for(&status, false).await;
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_server_that_does_not_answer_zeo_is_down() {
        for (junk, answer) in [
            (&b"HTTP/1.1 400 Bad Request\r\n\r\n"[..], false),
            (b"\x00\x00\x00\x02XX", true),
            (b"\xff\xff\xff\xff", false),
            // Greets but never answers a call: a stuck event loop.
            (b"\x00\x00\x00\x02Z5", false),
        ] {
            let (addr, server) = fake_backend(junk, answer).await;
            let (status, shutdown, task) = start(BackendAddr::Tcp(addr), Duration::from_millis(50));
            // Let a few probes run; it must never be reported up.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                assert!(!status.snapshot().backend_up, "{junk:?} taken for ZEO");
            }
            shutdown.cancel();
            task.await.unwrap();
            server.abort();
        }
    }

    #[tokio::test]
    async fn unix_socket_and_a_zero_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zeo.sock");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                tokio::spawn(serve_fake(c, b"\x00\x00\x00\x02Z5", true));
            }
        });
        let (status, shutdown, task) = start(BackendAddr::Unix(path), Duration::ZERO);
        wait_for(&status, true).await;
        shutdown.cancel();
        task.await.unwrap();
    }
}
