//! Replication end to end: two real runzeo, a primary zrelay and a replica
//! zrelay over mutual TLS, real ZODB clients (`tests/py/repl.py`).
//!
//! Every test waits by polling with a deadline; convergence is checked by
//! comparing both storages transaction by transaction (tid, status, user,
//! description, extension, every record) and both Data.fs files byte for
//! byte. Needs `<repo>/.venv` (`make test` or `scripts/ensure-venv.sh`).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::cluster::{
    metric_value, repl_py, value_of, wait_until, Certs, Cluster, ClusterOpts, TlsFiles,
};
use support::{Enc, PyChild, Zeo};
// Unused here; importing them keeps support/mod.rs's re-export from being
// reported unused in this test crate.
#[allow(unused_imports)]
use support::{Relay, RelayOpts};

/// How long a replica may take to catch up with what a test committed.
const SYNC: Duration = Duration::from_secs(30);
/// The pre-door behaviour: a read-write client at a replica gets ReadOnlyError.
const REFUSE_WRITES: &str = "[door]\nwrite_policy = \"refuse\"\n";
/// An empty storage's last tid.
const Z64_HEX: &str = "0000000000000000";

fn status_str(v: &serde_json::Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// The replica converged: same transactions, same bytes, healthy, lag 0.
fn assert_converged(c: &mut Cluster) -> String {
    let last = c.wait_in_sync(SYNC);
    let summary = c.compare();
    eprintln!("compare: {summary}");
    assert!(
        summary.contains(&format!("last={last}")),
        "{summary}: primary last is {last}"
    );
    let (p, r) = c.data_fs_digests();
    assert_eq!(
        p, r,
        "Data.fs files differ although every transaction matches"
    );
    let st = c.replica.status();
    assert_eq!(st["upstream"]["applied_tid"], last.as_str(), "{st}");
    assert_eq!(st["upstream"]["state"], "live", "{st}");
    // The primary's newest tid reaches the replica with the stream.
    wait_until(SYNC, "replica lag 0 once caught up", || {
        c.replica.status()["lag_seconds"] == 0.0
    });
    c.assert_healthy();
    last
}

// ------------------------------------------------ 1. the workload mix

fn workload_mix(enc: Enc, small: &str, big_mb: &str) {
    // Every commit the primary captures is also read back and compared
    // (capture_verify): a difference is counted as outcome "mismatch".
    let mut c = Cluster::with(ClusterOpts {
        primary_replication: "capture_verify = true".into(),
        ..ClusterOpts::new(enc)
    });
    let out = c.run_py(&[
        "workload",
        &c.primary.addr().to_string(),
        &c.pzeo.addr().to_string(),
        small,
        big_mb,
    ]);
    let last = value_of(&out, "last").to_string();
    c.wait_applied(&last, SYNC);
    // The primary's own status follows its backend.
    wait_until(SYNC, "primary /status storage_last_tid", || {
        c.primary.status()["storage_last_tid"] == last.as_str()
    });
    assert_eq!(assert_converged(&mut c), last);
    let (code, body) = c.replica.get("/replica");
    assert_eq!(code, 200, "/replica of a caught-up replica: {body}");
    let st = c.replica.status();
    assert_eq!(st["lag_seconds"], 0.0, "{st}");
    assert_eq!(st["upstream"]["lag_seconds"], 0.0, "{st}");
    assert_eq!(st["upstream"]["primary_last_tid"], last.as_str(), "{st}");
    let p = c.primary.status();
    assert_eq!(
        p["replicas"]["replica"]["acked_tid"],
        last.as_str(),
        "primary's view of the replica: {p}"
    );
    assert_capture_outcomes(&c, enc, small.parse().unwrap());
}

/// What the capture fast path did with the workload's commits: every kind
/// of record the workload writes through the proxy (new objects, updates,
/// non-ASCII metadata, blobs, an empty blob, a big transaction) was captured
/// and equal to its read-back; what it cannot prove was read back.
fn assert_capture_outcomes(c: &Cluster, enc: Enc, small: u64) {
    let metrics = c.primary.metrics();
    let n = |outcome: &str| {
        metric_value(
            &metrics,
            &format!("zrelay_replication_capture_total{{outcome=\"{outcome}\"}}"),
        ) as u64
    };
    let summary: Vec<String> = [
        "captured",
        "bypass",
        "late",
        "resolved_conflict",
        "undo",
        "delete",
        "blob_not_at_hand",
        "extension",
        "oid_mismatch",
        "mismatch",
    ]
    .iter()
    .map(|o| format!("{o}={}", n(o)))
    .collect();
    let summary = summary.join(" ");
    eprintln!("capture outcomes: {summary}");
    assert_eq!(n("mismatch"), 0, "captured commits differ: {summary}");
    assert_eq!(n("oid_mismatch"), 0, "{summary}");
    assert_eq!(
        n("blob_not_at_hand"),
        0,
        "blobs are sent in chunks: {summary}"
    );
    // The small transactions, the blobs, the big one...
    assert!(n("captured") >= small, "{summary}");
    // ...and what only the backend knows.
    assert!(n("resolved_conflict") >= 1, "{summary}");
    assert!(n("undo") >= 1, "{summary}");
    assert!(n("delete") >= 1, "{summary}");
    // The commits made directly on the backend.
    assert!(n("bypass") > small / 50, "{summary}");
    // The first commit's extension holds a tuple: exact in pickle only.
    match enc {
        Enc::Pickle => assert_eq!(n("extension"), 0, "{summary}"),
        Enc::Msgpack => assert!(n("extension") >= 1, "{summary}"),
    }
}

#[test]
fn workload_mix_pickle() {
    workload_mix(Enc::Pickle, "500", "8");
}

#[test]
fn workload_mix_msgpack() {
    workload_mix(Enc::Msgpack, "500", "8");
}

/// The size: one 50 MB transaction (a 12 MB record and 1 MB ones),
/// committed while another client keeps committing small ones.
#[test]
fn big_transaction_50mb() {
    let mut c = Cluster::start(Enc::Msgpack);
    let mut w = c.py(&["writer", &c.primary.addr().to_string()]).spawn();
    w.expect_line("READY", Duration::from_secs(60));
    let out = c.run_py(&["big", &c.primary.addr().to_string(), "50"]);
    eprintln!("{out}");
    let tid = value_of(&out, "tid").to_string();
    let started = Instant::now();
    mark(&mut w);
    w.send_line("stop");
    w.finish();
    let last = c.wait_in_sync(Duration::from_secs(60));
    eprintln!(
        "50 MB transaction {tid} and all up to {last} applied {:?} after the commit",
        started.elapsed()
    );
    assert_converged(&mut c);
}

/// Transaction metadata that only survives if it is copied byte for byte:
/// extensions with many value types (floats, big ints, bytes, tuples,
/// frozensets, 30 kB strings, 300 keys), non-UTF-8 user and description.
fn unusual_metadata(enc: Enc) {
    let mut c = Cluster::start(enc);
    let out = c.run_py(&["metadata", &c.primary.addr().to_string()]);
    c.wait_applied(value_of(&out, "tid"), SYNC);
    assert_converged(&mut c);
}

#[test]
fn unusual_metadata_pickle() {
    unusual_metadata(Enc::Pickle);
}

#[test]
fn unusual_metadata_msgpack() {
    unusual_metadata(Enc::Msgpack);
}

// ------------------------------------------------ 2. fresh caches

fn fresh_caches(enc: Enc) {
    let mut c = Cluster::start(enc);
    let out = c.run_py(&[
        "fresh-cache",
        &c.primary.addr().to_string(),
        &c.pzeo.addr().to_string(),
        &c.replica.addr().to_string(),
        &c.replica.admin().to_string(),
        "12",
    ]);
    eprintln!("{out}");
    c.assert_healthy();
    assert_stages(&c);
}

/// The per-stage trace of the replication path
/// (`zrelay_replication_stage_seconds`): every stage of both ends was
/// passed, and each transaction the replica applied passed its stages once,
/// in path order (the sums of the ages cannot decrease along the path).
fn assert_stages(c: &Cluster) {
    const H: &str = "zrelay_replication_stage_seconds";
    let stat = |m: &str, stage: &str| {
        (
            metric_value(m, &format!("{H}_count{{stage=\"{stage}\"}}")),
            metric_value(m, &format!("{H}_sum{{stage=\"{stage}\"}}")),
        )
    };
    let path = ["received", "begin_sent", "voted", "finished"];
    // The last transaction may still be between two stages.
    wait_until(
        Duration::from_secs(20),
        "every applied transaction's stages",
        || {
            let r = c.replica.metrics();
            let n = stat(&r, path[0]).0;
            n > 0.0 && path.iter().all(|s| stat(&r, s).0 == n)
        },
    );
    let (p, r) = (c.primary.metrics(), c.replica.metrics());
    for stage in ["finish_reply", "observed", "published", "sent"] {
        assert!(stat(&p, stage).0 > 0.0, "primary: no {stage} stage\n{p}");
    }
    assert!(
        stat(&r, "invalidated").0 > 0.0,
        "replica: no invalidated stage"
    );
    let (n, mut prev) = stat(&r, path[0]);
    assert!(n > 0.0, "replica: no received stage");
    for stage in &path[1..] {
        let (count, sum) = stat(&r, stage);
        assert_eq!(
            count, n,
            "replica: {stage} passed {count} times, received {n}"
        );
        assert!(
            sum >= prev,
            "replica: {stage} (sum {sum}) before the stage ahead of it ({prev})"
        );
        prev = sum;
    }
}

#[test]
fn fresh_caches_pickle() {
    fresh_caches(Enc::Pickle);
}

#[test]
fn fresh_caches_msgpack() {
    fresh_caches(Enc::Msgpack);
}

/// A persistent client cache reopened on the replica after commits it did
/// not see, with the replica proxy up the whole time, then across a restart
/// of the replica proxy (which forgets its record of applied transactions).
#[test]
fn persistent_cache_reconnect() {
    let mut c = Cluster::start(Enc::Pickle);
    let var = tempfile::tempdir().expect("temp dir");
    let var_s = var.path().display().to_string();
    let (p, r) = (c.primary.addr().to_string(), c.replica.addr().to_string());

    // Disconnect, commit more on the primary, reconnect.
    let out = c.run_py(&["pcache-prime", &p, &r, &var_s, "pc"]);
    let oid = value_of(&out, "oid").to_string();
    c.run_py(&["set", &p, "pc", "1"]);
    let out = c.run_py(&["set", &p, "pc", "2"]);
    c.wait_applied(value_of(&out, "tid"), SYNC);
    c.run_py(&["pcache-check", &r, &var_s, "pc", &oid, "2"]);

    // Again, with the replica proxy restarted while the client is away and
    // the commit applied during its catch-up.
    let out = c.run_py(&["pcache-prime", &p, &r, &var_s, "pc2"]);
    let oid2 = value_of(&out, "oid").to_string();
    c.replica.stop();
    let out = c.run_py(&["set", &p, "pc2", "7"]);
    c.replica.start();
    c.wait_applied(value_of(&out, "tid"), SYNC);
    c.run_py(&["pcache-check", &r, &var_s, "pc2", &oid2, "7"]);
    c.assert_healthy();
}

// ------------------------------------------------ 3. writes refused

fn writes_refused(enc: Enc) {
    let mut opts = ClusterOpts::new(enc);
    opts.replica_extra = REFUSE_WRITES.into();
    let mut c = Cluster::with(opts);
    let out = c.run_py(&["set", &c.primary.addr().to_string(), "k", "v"]);
    let tid = value_of(&out, "tid").to_string();
    c.wait_applied(&tid, SYNC);
    wait_until(SYNC, "replica /status storage_last_tid", || {
        c.replica.status()["storage_last_tid"] == tid.as_str()
    });
    let out = c.run_py(&[
        "refuse-writes",
        &c.replica.addr().to_string(),
        &c.rzeo.addr().to_string(),
    ]);
    assert_eq!(value_of(&out, "last"), tid);
    let st = c.replica.status();
    assert_eq!(st["storage_last_tid"], tid.as_str(), "{st}");
    assert_eq!(c.last_tid(c.rzeo.addr()), tid);
    // The pair still replicates.
    c.run_py(&["set", &c.primary.addr().to_string(), "k", "w"]);
    assert_converged(&mut c);
}

#[test]
fn writes_refused_pickle() {
    writes_refused(Enc::Pickle);
}

#[test]
fn writes_refused_msgpack() {
    writes_refused(Enc::Msgpack);
}

// ------------------------------------------------ 4. faults

/// Ask the writer for three more successful commits and wait for them.
fn mark(w: &mut PyChild) {
    w.send_line("mark");
    w.expect_line("MARKED", Duration::from_secs(60));
}

/// A writer commits through the primary proxy all along; `fault` runs in
/// the middle of the stream; then the replica must converge.
fn fault_while_writing(enc: Enc, fault: impl FnOnce(&mut Cluster, &mut PyChild)) {
    let mut c = Cluster::start(enc);
    let mut w = c.py(&["writer", &c.primary.addr().to_string()]).spawn();
    w.expect_line("READY", Duration::from_secs(60));
    mark(&mut w);
    // The stream is flowing before the fault.
    wait_until(SYNC, "replica to apply the writer's commits", || {
        c.replica.applied_tid().is_some()
    });
    fault(&mut c, &mut w);
    mark(&mut w);
    w.send_line("stop");
    let out = w.finish();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("writer: {}", out.lines().last().unwrap_or(""));
    assert_converged(&mut c);
}

#[test]
fn fault_replica_zrelay_restart() {
    fault_while_writing(Enc::Pickle, |c, w| {
        c.replica.restart();
        mark(w);
    });
}

#[test]
fn fault_primary_zrelay_restart() {
    fault_while_writing(Enc::Msgpack, |c, w| {
        c.primary.restart();
        // The writer reconnects by itself and commits again.
        mark(w);
    });
}

#[test]
fn fault_primary_zrelay_kill9() {
    fault_while_writing(Enc::Pickle, |c, w| {
        c.primary.kill();
        c.primary.start();
        mark(w);
    });
}

/// The primary's runzeo restarts: the proxy's feed must reconnect and not
/// lose what is committed around its reconnection.
#[test]
fn fault_primary_backend_restart() {
    fault_while_writing(Enc::Msgpack, |c, w| {
        c.pzeo.restart();
        mark(w);
    });
}

#[test]
fn fault_replica_backend_restart() {
    fault_while_writing(Enc::Pickle, |c, w| {
        c.rzeo.stop();
        mark(w);
        c.rzeo.start_again();
        mark(w);
    });
}

#[test]
fn fault_primary_backend_kill9() {
    fault_while_writing(Enc::Pickle, |c, w| {
        c.pzeo.kill();
        c.pzeo.start_again();
        mark(w);
    });
}

#[test]
fn fault_replica_backend_kill9() {
    fault_while_writing(Enc::Msgpack, |c, w| {
        c.rzeo.kill();
        mark(w);
        c.rzeo.start_again();
        mark(w);
    });
}

#[test]
fn fault_stream_cut_kill9() {
    fault_while_writing(Enc::Msgpack, |c, w| {
        c.replica.kill();
        mark(w);
        c.replica.start();
        mark(w);
    });
}

/// The replica's runzeo dies between vote and finish of a transaction it
/// applies (made deterministic by writing the state such a crash leaves:
/// the transaction appended with the checkpoint status 'c'). On restart
/// FileStorage truncates it, but its `lastTransaction()` reports the
/// truncated tid. The replica must apply that transaction again, not
/// believe it has it.
#[test]
fn replica_backend_crash_mid_commit() {
    let mut c = Cluster::start(Enc::Pickle);
    let p = c.primary.addr().to_string();
    c.run_py(&["set", &p, "k", "1"]);
    c.wait_in_sync(SYNC);
    c.rzeo.stop();
    let out = c.run_py(&["set", &p, "k", "2"]);
    let tid = value_of(&out, "tid").to_string();
    c.run_py(&[
        "crash-tail",
        &c.pzeo.dir().display().to_string(),
        &c.rzeo.dir().display().to_string(),
        &tid,
    ]);
    c.rzeo.start_again();
    c.run_py(&["set", &p, "k", "3"]);
    assert_converged(&mut c);
}

/// A replica started after the primary has history catches up from it,
/// while new commits keep arriving.
#[test]
fn catch_up_from_empty() {
    let mut opts = ClusterOpts::new(Enc::Msgpack);
    opts.start_replica = false;
    let mut c = Cluster::with(opts);
    c.run_py(&[
        "workload",
        &c.primary.addr().to_string(),
        &c.pzeo.addr().to_string(),
        "300",
        "2",
    ]);
    assert_eq!(c.last_tid(c.rzeo.addr()), Z64_HEX, "replica backend empty");
    let mut w = c.py(&["writer", &c.primary.addr().to_string()]).spawn();
    w.expect_line("READY", Duration::from_secs(60));
    c.replica.start();
    mark(&mut w);
    wait_until(SYNC, "replica to apply something", || {
        c.replica.applied_tid().is_some()
    });
    mark(&mut w);
    w.send_line("stop");
    w.finish();
    assert_converged(&mut c);
}

// ------------------------------------------------ 5. TLS refusals

/// Wait until a refused replica reports a TLS error; it must never get data.
fn assert_refused(name: &str, zeo: &Zeo, node: &mut support::cluster::Node, enc: Enc) {
    wait_until(SYNC, &format!("{name} to report a TLS error"), || {
        let st = node.status();
        status_str(&st["upstream"]["last_error"])
            .to_lowercase()
            .contains("tls")
    });
    let st = node.status();
    assert_eq!(st["upstream"]["state"], "disconnected", "{name}: {st}");
    assert!(st["upstream"]["applied_tid"].is_null(), "{name}: {st}");
    let (code, _) = node.get("/replica");
    assert_eq!(code, 503, "{name}: /replica");
    let out = repl_py(enc, &["lasttid", &zeo.addr().to_string()]).run();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(value_of(&out, "last"), Z64_HEX, "{name}'s backend got data");
    node.assert_healthy();
}

#[test]
fn tls_foreign_ca_refused() {
    let mut c = Cluster::start(Enc::Pickle);
    c.run_py(&["set", &c.primary.addr().to_string(), "k", "1"]);
    let other = Certs::new(&["replica"]);
    // Its certificate is from another CA, but it trusts the cluster's CA:
    // the primary refuses it.
    let rogue_tls = TlsFiles {
        ca: c.certs.ca(),
        ..other.tls("replica")
    };
    let (rogue_zeo, mut rogue) = c.extra_replica("rogue", rogue_tls);
    // Entirely from the other CA: it refuses the primary as well.
    let (alien_zeo, mut alien) = c.extra_replica("alien", other.tls("replica"));
    wait_until(SYNC, "primary to count unknown_ca handshakes", || {
        metric_value(
            &c.primary.metrics(),
            "zrelay_tls_handshake_failures_total{reason=\"unknown_ca\"}",
        ) > 0.0
    });
    assert_refused("rogue", &rogue_zeo, &mut rogue, c.enc());
    assert_refused("alien", &alien_zeo, &mut alien, c.enc());
    assert!(
        metric_value(
            &alien.metrics(),
            "zrelay_tls_handshake_failures_total{reason=\"unknown_ca\"}"
        ) > 0.0,
        "alien's metrics:\n{}",
        alien.metrics()
    );
    let p = c.primary.status();
    assert!(p["replicas"].get("rogue").is_none(), "{p}");
    // The real replica is unaffected.
    c.run_py(&["set", &c.primary.addr().to_string(), "k", "2"]);
    assert_converged(&mut c);
}

#[test]
fn tls_peer_not_allowed_and_garbage() {
    let mut opts = ClusterOpts::new(Enc::Msgpack);
    opts.allowed_peers = vec!["replica".into()];
    opts.extra_certs = vec!["intruder".into()];
    let mut c = Cluster::with(opts);
    c.run_py(&["set", &c.primary.addr().to_string(), "k", "1"]);
    let (zeo, mut intruder) = c.extra_replica("intruder", c.certs.tls("intruder"));
    wait_until(SYNC, "primary to count peer_not_allowed", || {
        metric_value(
            &c.primary.metrics(),
            "zrelay_tls_handshake_failures_total{reason=\"peer_not_allowed\"}",
        ) > 0.0
    });
    assert_refused("intruder", &zeo, &mut intruder, c.enc());
    let last = c.wait_in_sync(SYNC);

    // Plaintext on the replication port: each connection is closed, the
    // healthy replica's stream is not disturbed.
    let garbage: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x00\x00\x02Z5\x00\x00\x00\x04ruok",
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0, 0, 1, 2, 3],
        &[0xAB; 70_000],
    ];
    for g in garbage {
        let mut s = TcpStream::connect(c.primary.repl()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let _ = s.write_all(g);
        let mut buf = Vec::new();
        // Closed (EOF or reset) rather than left hanging.
        match s.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "replication port kept a garbage connection open: {e}"
            ),
        }
    }
    assert!(
        metric_value(
            &c.primary.metrics(),
            "zrelay_tls_handshake_failures_total{reason=\"not_tls\"}"
        ) > 0.0,
        "{}",
        c.primary.metrics()
    );
    let st = c.replica.status();
    assert_eq!(st["upstream"]["state"], "live", "{st}");
    assert_eq!(st["upstream"]["applied_tid"], last.as_str(), "{st}");
    c.run_py(&["set", &c.primary.addr().to_string(), "k", "2"]);
    assert_converged(&mut c);
    assert!(
        !c.replica.log().contains("replication stream down"),
        "the garbage disturbed the replica's stream:\n{}",
        c.replica.log()
    );
}

// ------------------------------------------------ 6. divergence

/// The replica reports `diverged`, answers 503 on /replica, and its backend
/// keeps `last` while the primary commits more.
fn assert_diverged(c: &mut Cluster, last: &str) {
    wait_until(SYNC, "replica to report diverged", || {
        c.replica.upstream_state() == "diverged"
    });
    let (code, body) = c.replica.get("/replica");
    assert_eq!(code, 503, "/replica of a diverged replica: {body}");
    let out = c.run_py(&["set", &c.primary.addr().to_string(), "after", "1"]);
    let newer = value_of(&out, "tid").to_string();
    assert!(newer.as_str() > last);
    // The primary's real position, not the replica's own last tid, and a
    // lag that grows (never a frozen 0).
    let st = c.replica.status();
    let primary_tid = st["upstream"]["primary_last_tid"].as_str().unwrap_or("");
    assert!(!primary_tid.is_empty() && primary_tid != last, "{st}");
    let lag_before = lag_of(c);
    // Nothing can say "nothing happened" sooner than a while of nothing.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let st = c.replica.status();
        assert_eq!(st["upstream"]["state"], "diverged", "{st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let lag_after = lag_of(c);
    assert!(
        lag_before > 0.0 && lag_after > lag_before,
        "diverged replica's lag {lag_before} -> {lag_after}"
    );
    assert_eq!(c.last_tid(c.rzeo.addr()), last, "diverged replica changed");
    let (code, _) = c.replica.get("/replica");
    assert_eq!(code, 503);
    c.replica.assert_healthy();
    c.primary.assert_healthy();
}

#[test]
fn divergence_foreign_transaction_before_start() {
    let mut opts = ClusterOpts::new(Enc::Pickle);
    opts.start_replica = false;
    let mut c = Cluster::with(opts);
    c.run_py(&["set", &c.primary.addr().to_string(), "k", "primary"]);
    let out = c.run_py(&["set", &c.rzeo.addr().to_string(), "k", "foreign"]);
    let local = value_of(&out, "tid").to_string();
    c.replica.start();
    assert_diverged(&mut c, &local);
}

#[test]
fn divergence_local_write_while_stopped() {
    let mut c = Cluster::start(Enc::Msgpack);
    c.run_py(&["set", &c.primary.addr().to_string(), "k", "1"]);
    c.wait_in_sync(SYNC);
    c.replica.stop();
    let out = c.run_py(&["set", &c.rzeo.addr().to_string(), "k", "local"]);
    let local = value_of(&out, "tid").to_string();
    c.run_py(&["set", &c.primary.addr().to_string(), "k", "2"]);
    c.replica.start();
    assert_diverged(&mut c, &local);
}

// ------------------------------------------------ 7. lag figures

fn lag_of(c: &Cluster) -> f64 {
    c.replica.status()["lag_seconds"]
        .as_f64()
        .expect("lag_seconds is a number")
}

#[test]
fn lag_figures() {
    let mut c = Cluster::start(Enc::Pickle);
    c.run_py(&["set", &c.primary.addr().to_string(), "k", "1"]);
    c.wait_in_sync(SYNC);
    wait_until(SYNC, "lag 0 and /replica 200 when caught up", || {
        lag_of(&c) == 0.0 && c.replica.get("/replica").0 == 200
    });
    // An idle primary: heartbeats keep the replica current for longer than
    // stale_after_ms (5 s by default).
    let idle_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < idle_until {
        let st = c.replica.status();
        assert_eq!(st["lag_seconds"], 0.0, "idle replica: {st}");
        assert_eq!(st["upstream"]["state"], "live", "idle replica: {st}");
        assert_eq!(c.replica.get("/replica").0, 200, "idle replica: {st}");
        std::thread::sleep(Duration::from_millis(250));
    }
    // A replica zrelay stopped longer than stale_after (SIGSTOP: a long
    // stall) finds the primary's heartbeats waiting when it resumes: no
    // needless reconnect.
    c.replica.pause();
    std::thread::sleep(Duration::from_secs(6));
    c.replica.resume();
    wait_until(SYNC, "replica answers again", || {
        c.replica.get("/replica").0 == 200
    });
    c.run_py(&["set", &c.primary.addr().to_string(), "k", "after-pause"]);
    c.wait_in_sync(SYNC);
    assert!(
        !c.replica.log().contains("upstream silent"),
        "the idle stream was declared silent:\n{}",
        c.replica.log()
    );

    c.rzeo.stop();
    let mut w = c.py(&["writer", &c.primary.addr().to_string()]).spawn();
    w.expect_line("READY", Duration::from_secs(60));
    wait_until(SYNC, "/replica 503 with the replica's backend down", || {
        c.replica.get("/replica").0 == 503
    });
    wait_until(SYNC, "lag over 1 s", || lag_of(&c) > 1.0);
    let first = lag_of(&c);
    wait_until(SYNC, "lag to keep growing", || lag_of(&c) > first + 0.5);
    mark(&mut w);
    assert_eq!(c.replica.get("/replica").0, 503);
    eprintln!(
        "primary's view of the replica while its backend is down: {}",
        c.primary.status()["replicas"]["replica"]
    );

    c.rzeo.start_again();
    mark(&mut w);
    w.send_line("stop");
    w.finish();
    c.wait_in_sync(SYNC);
    wait_until(SYNC, "lag back to 0 and /replica 200", || {
        lag_of(&c) == 0.0 && c.replica.get("/replica").0 == 200
    });
    assert_converged(&mut c);
}

// ------------------------------------------------ blobs

/// A transaction that creates two blobs, replicated, then the replica proxy
/// restarts (its Hello carries the digest of that last transaction) and
/// replication goes on.
#[test]
fn two_blobs_in_one_transaction() {
    let mut c = Cluster::start(Enc::Pickle);
    let out = c.run_py(&["blobs", &c.primary.addr().to_string(), "2"]);
    let tid = value_of(&out, "tid").to_string();
    c.wait_applied(&tid, SYNC);
    // Same records in the same order, same bytes.
    assert_converged(&mut c);
    c.replica.restart();
    let out = c.run_py(&["set", &c.primary.addr().to_string(), "k", "after"]);
    c.wait_applied(value_of(&out, "tid"), SYNC);
    assert_converged(&mut c);
}

// ------------------------------------------------ pack on the primary

/// The primary packs away records of the replica's last transaction while
/// the replica proxy is down; the replica has not diverged: it must be
/// recognised and catch up. First one of two records of that transaction
/// goes (the transaction differs), then all of it (the primary no longer
/// has the transaction).
#[test]
fn primary_pack_while_replica_down() {
    let mut c = Cluster::start(Enc::Pickle);
    let p = c.primary.addr().to_string();
    // (the replica's last transaction, a later one on the primary)
    for (last, newer) in [("a,b", "a"), ("a", "a")] {
        c.run_py(&["set", &p, last, "1"]);
        c.wait_in_sync(SYNC);
        c.replica.stop();
        let out = c.run_py(&["set", &p, newer, "2"]);
        let newest = value_of(&out, "tid").to_string();
        c.run_py(&["pack", &p]);
        c.replica.start();
        c.wait_applied(&newest, SYNC);
        let st = c.replica.status();
        assert_eq!(st["upstream"]["state"], "live", "{st}");
    }
    c.assert_healthy();
}

// ------------------------------------------------ 8. cascading

/// primary → replica → replica2: the middle replica feeds a further replica
/// from its own backend; all three end identical.
#[test]
fn cascading_replica_feeds_another() {
    let (c, zeo2, mut leaf) = Cluster::cascade(Enc::Pickle);
    let out = c.run_py(&[
        "workload",
        &c.primary.addr().to_string(),
        &c.pzeo.addr().to_string(),
        "50",
        "1",
    ]);
    let last = value_of(&out, "last").to_string();
    c.wait_applied(&last, SYNC);
    wait_until(SYNC, "replica2 applies the primary's last tid", || {
        leaf.applied_tid().as_deref() == Some(last.as_str())
    });
    assert_eq!(leaf.upstream_state(), "live");
    let (code, text) = {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zrelay"))
            .args([
                "verify",
                "--primary",
                &c.pzeo.addr().to_string(),
                "--replica",
                &zeo2.addr().to_string(),
            ])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(code, Some(0), "{text}");
    assert!(text.starts_with("OK"), "{text}");
    // The middle replica reports its downstream in /status.
    let st = c.replica.status();
    assert_eq!(
        st["replicas"]["replica2"]["acked_tid"],
        last.as_str(),
        "{st}"
    );
    leaf.assert_healthy();
}
