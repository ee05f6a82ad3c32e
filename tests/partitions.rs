//! Real partitions: full nodes (runzeo + zrelay with `[coordinator]`) each in
//! its own network namespace on a private bridge, etcd beside them, real
//! ZODB clients inside the namespaces committing through their doors
//! (tests/support/hanodes.rs, tests/py/hanet.py). Faults are nftables drop
//! rules (a node cut off the bridge) and SIGKILLs. Needs root, as CI has.
//!
//! Settings are tight (ttl 4 s, loop_wait 1 s, fence margin 1 s) and the
//! scenarios share their setups, so the file stays around a minute or two;
//! deadlines are generous for a loaded 2-core machine.

mod support;

use std::time::{Duration, Instant};

use support::cluster::value_of;
use support::hanodes::{history, start_writer, stop_writer, AckLog, HaCluster, HaOpts, BACKEND};
use support::wait_for;

const ACCOUNTS: usize = 10;
const TOTAL: u64 = 10_000;
/// Writers (one counter each) in the bank.
const WRITERS: usize = 3;

fn bank_init(c: &HaCluster) {
    let door = c.nodes[0].door();
    let (n, t, w) = (ACCOUNTS.to_string(), TOTAL.to_string(), WRITERS.to_string());
    c.py(0, "hanet.py")
        .args(&["bank-init", &door, &n, &t, &w])
        .run();
}

/// The bank total holds at `k`'s backend and each writer's counter equals
/// its acknowledged commits (plus at most its commits of unknown outcome).
fn check_bank(c: &HaCluster, k: usize, writers: &[(usize, String)]) {
    let (n, t, w) = (ACCOUNTS.to_string(), TOTAL.to_string(), WRITERS.to_string());
    let out = c
        .py(k, "hanet.py")
        .args(&["check", BACKEND, &n, &t, &w])
        .run();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    for (id, stdout) in writers {
        let got: u64 = value_of(&out, &format!("counter{id}")).parse().unwrap();
        let acked: u64 = value_of(stdout, "acked").parse().unwrap();
        let unknown: u64 = value_of(stdout, "unknown").parse().unwrap();
        assert!(
            acked <= got && got <= acked + unknown,
            "writer {id}: counter {got}, acknowledged {acked}, unknown {unknown}: \
             an acknowledged commit was lost"
        );
    }
}

/// The lag /status reports (it grows with the clock while disconnected).
fn lag_of(st: &serde_json::Value) -> f64 {
    st["lag_seconds"].as_f64().unwrap_or(0.0)
}

/// A replica cut off from the primary, the other replica and etcd keeps
/// serving read-only clients at its door (bank invariant holds), its lag
/// grows and shows in /status, the metric and `/replica?lag=` (503); it is
/// never promoted while isolated, the primary keeps committing; after
/// healing it catches up and answers 200 again.
fn replica_isolated(c: &mut HaCluster) {
    let r = 1;
    let mut w0 = start_writer(c, 0, 0, ACCOUNTS);
    let mut w2 = start_writer(c, 2, 2, ACCOUNTS);
    c.wait_live(r, Duration::from_secs(30));
    let (code, _) = c.nodes[r].get("/replica?lag=5s");
    assert_eq!(code, 200, "live replica not healthy before the cut");
    let epoch_before = c.nodes[0].status()["role_state"]["epoch"].clone();

    c.isolate(r);
    let cut = Instant::now();
    // Commits go on at the primary (through its door and another replica's).
    for w in [&mut w0, &mut w2] {
        for _ in 0..3 {
            w.expect_prefix("ACK ", Duration::from_secs(30));
        }
    }
    // The lag grows with the clock and the health check turns 503.
    let lag = wait_for(
        Duration::from_secs(30),
        "the isolated replica's lag > 3 s",
        || {
            let st = c.nodes[r].try_status()?;
            (lag_of(&st) > 3.0).then(|| lag_of(&st))
        },
    );
    let (code, body) = c.nodes[r].get("/replica?lag=2s");
    assert_eq!(
        code, 503,
        "isolated replica still healthy at lag 2s: {body}"
    );
    let metric = c.nodes[r].metric("zrelay_replication_lag_seconds");
    assert!(
        metric > 2.0,
        "lag metric {metric} while isolated {lag:.1} s"
    );
    // Read-only clients at its door are still served (from its own backend).
    let (n, t) = (ACCOUNTS.to_string(), TOTAL.to_string());
    let out = c
        .py(r, "hanet.py")
        .args(&["reads", &c.nodes[r].door(), &n, &t, "3"])
        .run();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("isolated replica served: {}", out.trim());
    // Several ttls later: still a replica, the primary still leads its epoch.
    wait_for(Duration::from_secs(30), "3 ttls of isolation", || {
        (cut.elapsed() > Duration::from_secs(12)).then_some(())
    });
    let st = c.nodes[r].status();
    assert_eq!(st["role"], "replica", "isolated replica changed role: {st}");
    let pst = c.nodes[0].status();
    assert_eq!(pst["role"], "primary", "primary lost its role: {pst}");
    assert_eq!(pst["role_state"]["epoch"], epoch_before, "epoch changed");

    c.rejoin(r);
    let healed = Instant::now();
    c.wait_live(r, Duration::from_secs(60));
    wait_for(
        Duration::from_secs(60),
        "the healed replica within 1 s",
        || {
            let (code, _) = c.nodes[r].try_get("/replica?lag=1s")?;
            (code == 200).then_some(())
        },
    );
    eprintln!(
        "replica isolated: lag reached {lag:.1} s; healthy again {:?} after healing",
        healed.elapsed()
    );
    let s0 = stop_writer(w0);
    let s2 = stop_writer(w2);
    // Everything the primary has, the healed replica applies.
    let last = c.backend_last_tid(0);
    wait_for(
        Duration::from_secs(60),
        "the replica applied the last tid",
        || {
            let st = c.nodes[r].try_status()?;
            (st["upstream"]["applied_tid"] == last.as_str()).then_some(())
        },
    );
    check_bank(c, 0, &[(0, s0.clone()), (2, s2.clone())]);
    let mut acks = AckLog::default();
    acks.add(0, &s0);
    acks.add(2, &s2);
    acks.assert_unique_tids();
    let prim = history(&c.nodes[0].zeo_dir().join("Data.fs"));
    let rep = history(&c.nodes[r].zeo_dir().join("Data.fs"));
    assert_eq!(prim, rep, "the healed replica's history differs");
    for n in &mut c.nodes {
        n.assert_healthy();
    }
}

#[test]
fn replica_isolated_keeps_serving_reads_and_catches_up() {
    let mut c = HaCluster::start(HaOpts::default());
    bank_init(&c);
    replica_isolated(&mut c);
}
