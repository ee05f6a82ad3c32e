//! Gauges derived from the status snapshot, refreshed on every `/metrics`
//! scrape so they are never older than the scrape itself (lag keeps growing
//! while a stream is down even though no code path records it).

use std::sync::atomic::{AtomicBool, Ordering};

use metrics::{describe_gauge, gauge};

use super::health::{self, stream_state_name, Now};
use crate::status::{NodeStatus, Role, StreamState};

pub const REPLICATION_LAG_SECONDS: &str = "zrelay_replication_lag_seconds";
pub const REPLICATION_LAG_TRANSACTIONS: &str = "zrelay_replication_lag_transactions";
pub const REPLICATION_LAG_BYTES: &str = "zrelay_replication_lag_bytes";
pub const REPLICATION_STREAM_STATE: &str = "zrelay_replication_stream_state";
pub const STORAGE_LAST_COMMIT_TIMESTAMP: &str = "zrelay_storage_last_commit_timestamp_seconds";
pub const UPTIME: &str = "zrelay_uptime_seconds";
pub const NODE_ROLE: &str = "zrelay_node_role";

/// Every name this module records (the `/metrics` test and `docs/metrics.md`
/// are checked against it).
pub const NAMES: &[&str] = &[
    REPLICATION_LAG_SECONDS,
    REPLICATION_LAG_TRANSACTIONS,
    REPLICATION_LAG_BYTES,
    REPLICATION_STREAM_STATE,
    STORAGE_LAST_COMMIT_TIMESTAMP,
    UPTIME,
    NODE_ROLE,
];

const STATES: [StreamState; 4] = [
    StreamState::Disconnected,
    StreamState::CatchingUp,
    StreamState::Live,
    StreamState::Diverged,
];

/// Set once this process has exported its own (unlabelled) lag, so a replica
/// promoted to primary reports 0 instead of its last lag forever.
static OWN_LAG_EXPORTED: AtomicBool = AtomicBool::new(false);

pub fn describe() {
    describe_gauge!(
        REPLICATION_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Replication lag: primary's newest commit time minus the applied commit time. Unlabelled on a replica (its own); labelled by replica on a primary."
    );
    describe_gauge!(
        REPLICATION_LAG_TRANSACTIONS,
        "Transactions committed on the primary and not yet applied (unlabelled on a replica, by replica on a primary)."
    );
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        metrics::Unit::Bytes,
        "Record bytes committed on the primary and not yet applied (unlabelled on a replica, by replica on a primary)."
    );
    describe_gauge!(
        REPLICATION_STREAM_STATE,
        "1 for the replica's current replication stream state, 0 for the others; all 0 on a primary."
    );
    describe_gauge!(
        STORAGE_LAST_COMMIT_TIMESTAMP,
        metrics::Unit::Seconds,
        "Commit time (Unix seconds) of the backend's newest transaction."
    );
    describe_gauge!(
        UPTIME,
        metrics::Unit::Seconds,
        "Seconds since this zrelay process started."
    );
    describe_gauge!(
        NODE_ROLE,
        "1 for this node's current role (primary, replica), 0 for the other."
    );
}

/// Sets every derived gauge from one snapshot. Also re-asserts
/// `zrelay_backend_up` so it matches `/health` exactly.
pub fn refresh(st: &NodeStatus, now: Now, uptime_seconds: f64) {
    gauge!(UPTIME).set(uptime_seconds);
    crate::metrics::backend_up(st.backend_up);
    for (role, name) in [(Role::Primary, "primary"), (Role::Replica, "replica")] {
        gauge!(NODE_ROLE, "role" => name).set(flag(st.role == role));
    }
    if let Some(t) = st.storage_last_commit_unix {
        gauge!(STORAGE_LAST_COMMIT_TIMESTAMP).set(t);
    }

    let current = match (&st.upstream, st.role) {
        (Some(up), _) => Some(up.state),
        (None, Role::Replica) => Some(StreamState::Disconnected),
        (None, Role::Primary) => None,
    };
    for s in STATES {
        gauge!(REPLICATION_STREAM_STATE, "state" => stream_state_name(s))
            .set(flag(current == Some(s)));
    }

    match health::lag_seconds(st, now) {
        Some(lag) => {
            OWN_LAG_EXPORTED.store(true, Ordering::Relaxed);
            gauge!(REPLICATION_LAG_SECONDS).set(lag);
            let (txns, bytes) = st
                .upstream
                .as_ref()
                .map(|u| (u.lag_transactions, u.lag_bytes))
                .unwrap_or((0, 0));
            gauge!(REPLICATION_LAG_TRANSACTIONS).set(txns as f64);
            gauge!(REPLICATION_LAG_BYTES).set(bytes as f64);
        }
        None if OWN_LAG_EXPORTED.load(Ordering::Relaxed) => {
            gauge!(REPLICATION_LAG_SECONDS).set(0.0);
            gauge!(REPLICATION_LAG_TRANSACTIONS).set(0.0);
            gauge!(REPLICATION_LAG_BYTES).set(0.0);
        }
        None => {}
    }

    // Replica names come from configuration (bounded), never from a peer
    // address.
    for peer in st.replicas.values() {
        let replica = peer.node.clone();
        gauge!(REPLICATION_LAG_SECONDS, "replica" => replica.clone())
            .set(peer.lag_seconds.max(0.0));
        gauge!(REPLICATION_LAG_TRANSACTIONS, "replica" => replica.clone())
            .set(peer.lag_transactions as f64);
        gauge!(REPLICATION_LAG_BYTES, "replica" => replica).set(peer.lag_bytes as f64);
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::health::tests::{node, upstream};
    use crate::status::ReplicaPeerStatus;
    use metrics_exporter_prometheus::PrometheusBuilder;

    fn render(st: &NodeStatus) -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            describe();
            refresh(st, Now::current(), 42.0)
        });
        recorder.handle().render()
    }

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[test]
    fn replica_gauges() {
        let mut up = upstream(StreamState::CatchingUp, 1.5);
        up.lag_transactions = 7;
        up.lag_bytes = 4096;
        let mut st = node(Role::Replica, Some(up));
        st.storage_last_commit_unix = Some(1_700_000_000.25);
        let text = render(&st);
        for line in [
            "zrelay_replication_lag_seconds 1.5",
            "zrelay_replication_lag_transactions 7",
            "zrelay_replication_lag_bytes 4096",
            "zrelay_replication_stream_state{state=\"catching_up\"} 1",
            "zrelay_replication_stream_state{state=\"live\"} 0",
            "zrelay_replication_stream_state{state=\"disconnected\"} 0",
            "zrelay_replication_stream_state{state=\"diverged\"} 0",
            "zrelay_storage_last_commit_timestamp_seconds 1700000000.25",
            "zrelay_uptime_seconds 42",
            "zrelay_backend_up 1",
            "zrelay_node_role{role=\"replica\"} 1",
            "zrelay_node_role{role=\"primary\"} 0",
        ] {
            assert!(has_line(&text, line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains("# TYPE zrelay_replication_lag_seconds gauge"));
    }

    #[test]
    fn primary_gauges_per_replica() {
        let mut st = node(Role::Primary, None);
        st.backend_up = false;
        st.replicas.insert(
            "node2".into(),
            ReplicaPeerStatus {
                node: "node2".into(),
                peer_addr: "10.0.0.2:5555".into(),
                state: StreamState::Live,
                sent_tid: None,
                acked_tid: None,
                lag_seconds: 0.75,
                lag_transactions: 3,
                lag_bytes: 100,
                diverged: false,
            },
        );
        let text = render(&st);
        for line in [
            "zrelay_replication_lag_seconds{replica=\"node2\"} 0.75",
            "zrelay_replication_lag_transactions{replica=\"node2\"} 3",
            "zrelay_replication_lag_bytes{replica=\"node2\"} 100",
            "zrelay_replication_stream_state{state=\"live\"} 0",
            "zrelay_backend_up 0",
            "zrelay_node_role{role=\"primary\"} 1",
        ] {
            assert!(has_line(&text, line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("10.0.0.2"),
            "peer address leaked into labels"
        );
    }

    #[test]
    fn every_name_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        for name in NAMES {
            assert!(doc.contains(name), "{name} missing from docs/metrics.md");
        }
        use crate::metrics as m;
        for name in [
            m::SESSIONS,
            m::SESSIONS_ENDED,
            m::CONNECTIONS_ACCEPTED,
            m::REQUESTS,
            m::ERROR_REPLIES,
            m::COMMIT_DURATION,
            m::BACKEND_UP,
            m::BACKEND_CONNECT_FAILURES,
            m::BUILD_INFO,
        ] {
            assert!(doc.contains(name), "{name} missing from docs/metrics.md");
        }
    }
}
