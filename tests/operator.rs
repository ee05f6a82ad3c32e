//! The operator surface on a live primary + replica: every metric the
//! dashboard and the alert rules use is exported by a running pair, and the
//! `status` and `check` commands print and exit as documented.

#[allow(unused_imports)] // shared harness: this file uses part of it
mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use support::cluster::{wait_until, Cluster};
use support::ops::zrelay_cli;
use support::Enc;

const SYNC: Duration = Duration::from_secs(30);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `zrelay_*` metric names referenced by the dashboard and the alert rules
/// (histogram series reduced to their base name).
fn referenced() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for f in [
        "dashboards/zrelay-grafana.json",
        "dashboards/zrelay-alerts.yml",
    ] {
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        let bytes = text.as_bytes();
        let mut i = 0;
        while let Some(pos) = text[i..].find("zrelay_") {
            let start = i + pos;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
                end += 1;
            }
            let mut name = &text[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(n) = name.strip_suffix(suffix) {
                    name = n;
                }
            }
            names.insert(name.to_string());
            i = end;
        }
    }
    names
}

/// Metric names present in a scrape (from sample lines).
fn exported(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            let mut n = n;
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(b) = n.strip_suffix(suffix) {
                    n = b;
                }
            }
            n.to_string()
        })
        .collect()
}

#[test]
fn live_pair_exports_every_metric_the_dashboard_and_alerts_use() {
    let mut opts = support::cluster::ClusterOpts::new(Enc::Pickle);
    opts.replica_extra = "[door]\nwrite_policy = \"refuse\"\n".into();
    let mut c = Cluster::with(opts);
    // Commits (with a conflict error reply) through the primary, a refused
    // write through the replica, a TLS refusal on the replication port.
    let out = c.run_py(&[
        "workload",
        &c.primary.addr().to_string(),
        &c.pzeo.addr().to_string(),
        "20",
        "1",
    ]);
    let last = out
        .lines()
        .find_map(|l| l.strip_prefix("last="))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("workload printed no last tid: {out}"));
    c.wait_applied(&last, SYNC);
    c.run_py(&[
        "refuse-writes",
        &c.replica.addr().to_string(),
        &c.rzeo.addr().to_string(),
    ]);
    let mut garbage = TcpStream::connect(c.primary.repl()).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    wait_until(SYNC, "TLS failure counted", || {
        let m = c.primary.metrics();
        m.lines().any(|l| {
            l.starts_with("zrelay_tls_handshake_failures_total{reason=\"not_tls\"}")
                && !l.ends_with(" 0")
        })
    });

    let mut have = exported(&c.primary.metrics());
    have.extend(exported(&c.replica.metrics()));
    let missing: Vec<_> = referenced().difference(&have).cloned().collect();
    assert!(
        missing.is_empty(),
        "referenced by dashboards/ but not exported by a live pair: {missing:?}"
    );

    // zrelay status: a table with both nodes, exit 0.
    let p = c.primary.admin().to_string();
    let r = c.replica.admin().to_string();
    let (code, text) = zrelay_cli(&["status", "--admin", &p, "--admin", &r]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("primary") && text.contains("replica") && text.contains("live"),
        "{text}"
    );

    // zrelay check: OK on a caught-up replica, CRITICAL once it is cut off
    // and lagging beyond the limit, UNKNOWN for an address that answers
    // nothing.
    let (code, text) = zrelay_cli(&["check", "--admin", &r, "--max-lag", "5s"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("ZRELAY OK"), "{text}");
    c.primary.stop();
    wait_until(SYNC, "replica notices the primary is gone", || {
        c.replica.status()["upstream"]["state"] == "disconnected"
    });
    let (code, text) = zrelay_cli(&["check", "--admin", &r, "--max-lag", "5s"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.starts_with("ZRELAY CRITICAL"), "{text}");
    let (code, body) = c.replica.get("/replica");
    assert_eq!(code, 503, "{body}");
    let dead = support::free_port();
    let (code, text) = zrelay_cli(&[
        "check",
        "--admin",
        &format!("127.0.0.1:{dead}"),
        "--timeout",
        "1s",
    ]);
    assert_eq!(code, 3, "{text}");
}
