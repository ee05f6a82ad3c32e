//! Noticing a peer host that is gone (powered off, partitioned away) on a
//! TCP connection: kernel keepalive probes while it is idle, and
//! `TCP_USER_TIMEOUT` for data the peer never acknowledges.
//!
//! Without them, a connection to a vanished host lives for ~15 minutes when
//! data is outstanding (Linux's `tcp_retries2`) and forever when idle. That
//! matters to ZEO: a session whose transaction was voted and not finished
//! holds runzeo's commit lock, and every other writer of the storage waits
//! behind it until the session ends (runzeo has no transaction timeout by
//! default). A door cut off between `vote` and `tpc_finish` must not stop
//! the primary for minutes.
//!
//! The probes are answered by the peer's kernel, so a busy or paused peer
//! process is never mistaken for a dead host while the connection is idle.
//! `TCP_USER_TIMEOUT` is different: Linux (5.11 and later) also aborts a
//! connection whose peer has advertised a zero window for that long (a
//! process that stopped reading), so it is never set shorter than what the
//! proxy itself allows a peer that does not read (`write_stall_timeout_ms`
//! for clients, [`UNACKED_STREAMS`] for replication streams). Door links
//! carry sessions that may hold the commit lock with data in flight when
//! the network fails (a held invalidation, a reply): they get
//! [`BETWEEN_NODES`] for both, so a door whose client reads nothing for
//! that long loses its session too.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Between zrelay nodes (door-forwarded sessions, replication streams,
/// clones): an idle connection whose peer host answers no probe for this
/// long is gone. (Replication streams are never idle for long: their
/// heartbeats and silence timeouts find a dead peer first.)
pub const BETWEEN_NODES: Duration = Duration::from_secs(10);

/// Replication streams and clones: data unacknowledged, or a zero window,
/// for this long ends the connection (a replica that reads nothing for this
/// long, say while it applies one huge transaction, reconnects and catches
/// up; a shorter bound could cut that one forever).
pub const UNACKED_STREAMS: Duration = Duration::from_secs(60);

/// Keepalive probes sent before giving up on an idle connection.
const PROBES: u32 = 3;

/// Arms `tcp`: while idle, a peer host that answers no keepalive probe is
/// declared gone after about `idle`; data it leaves unacknowledged (or a
/// zero window) for `unacked` (at least `idle`) ends the connection too.
/// The next read or write then fails with `ETIMEDOUT`. A zero `idle` leaves
/// the system's defaults.
pub fn arm(tcp: &TcpStream, idle: Duration, unacked: Duration) -> std::io::Result<()> {
    if idle.is_zero() {
        return Ok(());
    }
    // Quiet for `first`, then PROBES probes `interval` apart: about `idle`
    // in all.
    let interval = (idle / (2 * PROBES)).max(Duration::from_secs(1));
    let first = idle
        .saturating_sub(interval * PROBES)
        .max(Duration::from_secs(1));
    let sock = SockRef::from(tcp);
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(first)
            .with_interval(interval)
            .with_retries(PROBES),
    )?;
    sock.set_tcp_user_timeout(Some(unacked.max(idle)))
}

/// [`arm`] for a connection between zrelay nodes that carries (or may
/// carry: a replication port does not know yet) a replication stream.
pub fn arm_between_nodes(tcp: &TcpStream) -> std::io::Result<()> {
    arm(tcp, BETWEEN_NODES, UNACKED_STREAMS)
}

/// [`arm`] for a door link: one client session forwarded to another node.
pub fn arm_door_link(tcp: &TcpStream) -> std::io::Result<()> {
    arm(tcp, BETWEEN_NODES, BETWEEN_NODES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn options_reach_the_socket() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        arm(&c, Duration::from_secs(12), Duration::from_secs(60)).unwrap();
        let s = SockRef::from(&c);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(6));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(2));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), PROBES);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(60)));
        // Never shorter than the idle bound.
        arm(&c, Duration::from_secs(12), Duration::from_secs(5)).unwrap();
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(12)));
        // Zero: untouched.
        let d = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        arm(&d, Duration::ZERO, Duration::from_secs(60)).unwrap();
        assert!(!SockRef::from(&d).keepalive().unwrap());
    }
}
