//! Backend liveness: a periodic probe of the backend ZEO server, the single
//! writer of `NodeStatus::backend_up` and `zrelay_backend_up`.
//!
//! A probe connects, reads the server's greeting (the first sized frame,
//! `Z5` or `M5`) and closes. Accepting a TCP connection is not enough: a
//! ZEO server whose event loop is stuck accepts but never greets.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::BackendAddr;
use crate::relay::backend::{connect, BoxRead};
use crate::status::StatusHub;

/// Probes closer together than this would only load the backend.
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// Probes `addr` every `interval` until `shutdown`, writing the result into
/// `status` and the `zrelay_backend_up` gauge. Logs WARN when the backend
/// goes down (or is down at start-up) and INFO when it comes (back) up;
/// repeated results are DEBUG only.
pub async fn backend_monitor(
    addr: BackendAddr,
    connect_timeout: Duration,
    interval: Duration,
    status: Arc<StatusHub>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval.max(MIN_INTERVAL));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<bool> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = probe(&addr, connect_timeout) => r,
        };
        let up = result.is_ok();
        status.update(|s| s.backend_up = up);
        crate::metrics::backend_up(up);
        match (last, result) {
            (Some(true), Ok(proto)) | (Some(false), Err(proto)) => {
                debug!(backend = %addr, up, detail = %proto, "backend probe");
            }
            (_, Ok(proto)) => {
                info!(backend = %addr, protocol = %proto, "backend ZEO server is up");
            }
            (_, Err(e)) => {
                warn!(backend = %addr, error = %e, "backend ZEO server is down");
            }
        }
        last = Some(up);
    }
}

/// Connects and reads the greeting; returns the protocol it announced.
async fn probe(addr: &BackendAddr, timeout: Duration) -> Result<String, String> {
    let (mut r, w) = connect(addr, timeout).await.map_err(|e| e.to_string())?;
    let greeting = tokio::time::timeout(timeout, read_greeting(&mut r)).await;
    drop(w);
    match greeting {
        Ok(g) => g,
        Err(_) => Err(format!("no greeting within {timeout:?}")),
    }
}

async fn read_greeting(r: &mut BoxRead) -> Result<String, String> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .await
        .map_err(|e| format!("reading the greeting: {e}"))?;
    let len = u32::from_be_bytes(len) as usize;
    // `Z5`, `M5`; allow a little room for a future version string.
    if !(2..=16).contains(&len) {
        return Err(format!("greeting of {len} bytes is not a ZEO protocol"));
    }
    let mut proto = vec![0u8; len];
    r.read_exact(&mut proto)
        .await
        .map_err(|e| format!("reading the greeting: {e}"))?;
    let ok = matches!(proto[0], b'Z' | b'M') && proto[1..].iter().all(u8::is_ascii_digit);
    if ok {
        Ok(String::from_utf8_lossy(&proto).into_owned())
    } else {
        Err(format!(
            "greeting {:?} is not a ZEO protocol",
            String::from_utf8_lossy(&proto)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Role;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A fake backend that greets each connection with `greeting`.
    async fn fake_backend(greeting: &'static [u8]) -> (String, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let _ = c.write_all(greeting).await;
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
        addr: &str,
    ) -> (
        Arc<StatusHub>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let status = Arc::new(StatusHub::new("n".into(), Role::Primary, addr.into()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(backend_monitor(
            BackendAddr::Tcp(addr.into()),
            Duration::from_millis(500),
            Duration::from_millis(50),
            status.clone(),
            shutdown.clone(),
        ));
        (status, shutdown, task)
    }

    #[tokio::test]
    async fn up_then_down() {
        let (addr, server) = fake_backend(b"\x00\x00\x00\x02M5").await;
        let (status, shutdown, task) = start(&addr);
        wait_for(&status, true).await;
        server.abort();
        let _ = server.await;
        wait_for(&status, false).await;
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_server_that_does_not_speak_zeo_is_down() {
        for junk in [
            &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
            b"\x00\x00\x00\x02XX",
            b"\xff\xff\xff\xff",
            b"\x00\x00",
        ] {
            let (addr, server) = fake_backend(junk).await;
            let (status, shutdown, task) = start(&addr);
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
    async fn pickle_greeting_and_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zeo.sock");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let _ = c.write_all(b"\x00\x00\x00\x02Z5").await;
            }
        });
        let status = Arc::new(StatusHub::new("n".into(), Role::Replica, "sock".into()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(backend_monitor(
            BackendAddr::Unix(path),
            Duration::from_millis(500),
            Duration::ZERO,
            status.clone(),
            shutdown.clone(),
        ));
        wait_for(&status, true).await;
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = l.accept().await {
                held.push(c);
            }
        });
        let r = probe(
            &BackendAddr::Tcp(addr.to_string()),
            Duration::from_millis(100),
        )
        .await;
        assert!(r.unwrap_err().contains("no greeting"));
    }
}
