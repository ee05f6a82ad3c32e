//! ZEO's own monitoring through zrelay: `server_status()`, `ruok` and
//! `python -m ZEO.nagios` report the `connections` the clients opened, as if
//! they were connected directly, through a pass-through zrelay, a primary and
//! a replica; zrelay's own backend connections show in its metrics instead.
//! Real runzeo, real ClientStorages (`tests/py/monitoring.py`).

mod support;

use std::time::Duration;

use support::cluster::{http_get, metric_value, value_of, wait_until, Cluster};
use support::{free_port, Addr, Enc, Py, Relay, RelayOpts, Zeo, ZeoOpts};

/// Clients each check opens.
const K: u64 = 3;
const SETTLE: Duration = Duration::from_secs(30);

/// (server_status, ruok, nagios) connection counts with K clients open.
fn counts(enc: Enc, addr: &Addr, mode: &str) -> (u64, u64, u64) {
    let out = Py::new("monitoring.py")
        .args(&["counts", &addr.to_string(), &K.to_string(), mode])
        .env(
            "ZRELAY_EXPECT_PROTOCOL",
            std::str::from_utf8(enc.protocol()).unwrap(),
        )
        .run();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let n = |k: &str| -> u64 {
        value_of(&out, k)
            .parse()
            .unwrap_or_else(|e| panic!("{k} in {out:?}: {e}"))
    };
    (n("status"), n("ruok"), n("nagios"))
}

fn own_connections(metrics: &str) -> u64 {
    metric_value(metrics, "zrelay_backend_own_connections") as u64
}

#[test]
fn zeo_monitoring_counts_only_the_clients_connections_pickle() {
    monitoring_counts(Enc::Pickle);
}

/// The `server_status` reply is re-encoded in the session's encoding.
#[test]
fn zeo_monitoring_counts_only_the_clients_connections_msgpack() {
    monitoring_counts(Enc::Msgpack);
}

fn monitoring_counts(enc: Enc) {
    let mut c = Cluster::start(enc);
    let zeo = Zeo::start(enc, ZeoOpts::default());
    let relay_admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let relay = Relay::start(
        zeo.addr(),
        RelayOpts {
            // Before [client]: a table of its own.
            top: format!("[admin]\nlisten = \"{relay_admin}\"\n"),
            ..RelayOpts::default()
        },
    );
    let relay_metrics = || {
        let (code, body) = http_get(relay_admin, "/metrics");
        assert_eq!(code, 200, "{body}");
        body
    };

    // The primary feeds the replica: the monitor and the observer (which
    // also reads back) on one side (the replica's history reader is closed
    // once its stream is live), the monitor and the applier on the other.
    c.run_py(&["set", &c.primary.addr().to_string(), "k", "1"]);
    c.wait_in_sync(SETTLE);
    wait_until(SETTLE, "own backend connections in the metrics", || {
        own_connections(&c.primary.metrics()) >= 2
            && own_connections(&c.replica.metrics()) >= 2
            && own_connections(&relay_metrics()) >= 1
    });

    assert_eq!(
        counts(enc, relay.addr(), "rw"),
        (K, K, K),
        "pass-through zrelay"
    );
    assert_eq!(
        counts(enc, c.primary.addr(), "rw"),
        (K, K, K),
        "primary zrelay"
    );
    // Clients of a replica register read-only (read-write is refused).
    assert_eq!(
        counts(enc, c.replica.addr(), "ro"),
        (K, K, K),
        "replica zrelay"
    );

    // Not vacuous: the backends themselves count zrelay's own connections,
    // exactly as many as its metric reports.
    for (name, metrics, zeo_addr) in [
        ("pass-through", relay_metrics(), zeo.addr()),
        ("primary", c.primary.metrics(), c.pzeo.addr()),
        ("replica", c.replica.metrics(), c.rzeo.addr()),
    ] {
        let own = own_connections(&metrics);
        assert!(own >= 1, "{name}: no own connection reported");
        assert_eq!(
            counts(enc, zeo_addr, "rw"),
            (K + own, K + own, K + own),
            "{name} backend direct, {own} own connections"
        );
    }
    c.assert_healthy();
}
