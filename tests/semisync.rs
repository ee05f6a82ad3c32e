//! Semi-synchronous commits end to end: two real runzeo, a primary zrelay
//! with `ack_mode = "semi-sync"` and a replica zrelay, real ZEO clients
//! (`tests/py/semisync.py`, `tests/py/repl.py`). Waits poll with deadlines.

mod support;

use std::time::{Duration, Instant};

use support::cluster::{metric_value, value_of, wait_until, Cluster, ClusterOpts};
use support::{Enc, Py};
#[allow(unused_imports)]
use support::{PyChild, Relay, RelayOpts, Zeo};

const SYNC: Duration = Duration::from_secs(30);

fn semisync_cluster(enc: Enc, primary: &str, replica: &str) -> Cluster {
    let mut opts = ClusterOpts::new(enc);
    opts.primary_replication = format!("ack_mode = \"semi-sync\"\n{primary}");
    opts.replica_replication = replica.to_string();
    let c = Cluster::with(opts);
    wait_until(SYNC, "replica stream live", || {
        c.replica.upstream_state() == "live"
    });
    c
}

/// `semisync.py commit ADDR KEY`: (tid hex, seconds the commit took).
fn commit(c: &Cluster, key: &str) -> (String, f64) {
    let out = semisync_py(c.enc(), &["commit", &c.primary.addr().to_string(), key]).run();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        value_of(&out, "tid").to_string(),
        value_of(&out, "secs").parse().expect("secs"),
    )
}

fn semisync_py(enc: Enc, args: &[&str]) -> Py {
    Py::new("semisync.py").args(args).env(
        "ZRELAY_EXPECT_PROTOCOL",
        std::str::from_utf8(enc.protocol()).expect("ascii"),
    )
}

fn semisync_status(c: &Cluster) -> serde_json::Value {
    c.primary.status()["semisync"].clone()
}

/// Stops an `acked-writer` and returns the newest tid it saw acknowledged.
fn stop_writer_newest_ack(w: PyChild) -> String {
    let mut w = w;
    w.send_line("stop");
    let out = w.finish();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    out.lines()
        .filter_map(|l| l.strip_prefix("ACK "))
        .max()
        .expect("acknowledged commits")
        .to_string()
}

/// A commit returns only once the replica's backend has it; with the
/// replica stalled it waits `ack_timeout_ms`, then the primary degrades to
/// async (status, metrics) and re-arms once the replica caught up.
#[test]
fn commit_waits_for_the_replica_then_degrades_and_rearms() {
    let mut c = semisync_cluster(Enc::Pickle, "ack_timeout_ms = 3000", "");
    let (tid, _) = commit(&c, "a");
    // Acknowledged at "applied": the replica's backend holds it already.
    let on_replica = c.last_tid(c.rzeo.addr());
    assert!(on_replica >= tid, "replica has {on_replica} < acked {tid}");
    assert_eq!(semisync_status(&c)["degraded"], false);

    c.replica.pause();
    let (tid2, secs) = commit(&c, "b");
    assert!(secs >= 2.5, "commit returned after {secs}s without an ack");
    assert!(secs < 30.0, "commit took {secs}s");
    let st = semisync_status(&c);
    assert_eq!(st["degraded"], true, "{st}");
    assert_eq!(st["degrades_total"], 1, "{st}");
    let m = c.primary.metrics();
    assert_eq!(metric_value(&m, "zrelay_semisync_degraded"), 1.0);
    assert_eq!(metric_value(&m, "zrelay_semisync_degrades_total"), 1.0);
    // Degraded: commits no longer wait.
    let (_, secs) = commit(&c, "c");
    assert!(secs < 2.5, "degraded commit took {secs}s");

    c.replica.resume();
    wait_until(SYNC, "re-armed once the replica caught up", || {
        semisync_status(&c)["degraded"] == false
    });
    assert!(c.last_tid(c.rzeo.addr()) >= tid2);
    assert_eq!(
        metric_value(&c.primary.metrics(), "zrelay_semisync_degraded"),
        0.0
    );
    // Waiting again.
    let (tid4, _) = commit(&c, "d");
    assert!(c.last_tid(c.rzeo.addr()) >= tid4);
}

/// `strict`: a commit waits as long as the replica is stalled, other
/// clients never see its tid meanwhile, and reads go on. A client that
/// connects meanwhile waits with the commit: the backend registered it
/// after that commit (its invalidations start there), so it cannot be told
/// the older acknowledged position.
#[test]
fn strict_holds_the_commit_and_hides_its_tid() {
    let mut c = semisync_cluster(
        Enc::Msgpack,
        "ack_timeout_ms = 1000\nstrict = true\nack_level = \"received\"",
        "",
    );
    let out = semisync_py(c.enc(), &["commit", &c.primary.addr().to_string(), "a"]).run();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (acked, oid_a) = (
        value_of(&out, "tid").to_string(),
        value_of(&out, "oid").to_string(),
    );
    // A client connected all along: what its invalidations tell it.
    let mut obs = semisync_py(c.enc(), &["observer", &c.primary.addr().to_string()]).spawn();
    obs.expect_line("READY", SYNC);
    obs.send_line(&format!("wait {acked}"));
    obs.expect_line(&format!("AT {acked}"), SYNC);
    c.replica.pause();
    let started = Instant::now();
    let w = semisync_py(c.enc(), &["commit", &c.primary.addr().to_string(), "b"]).spawn();
    wait_until(SYNC, "the commit to reach the primary's backend", || {
        c.last_tid(c.pzeo.addr()) > acked
    });
    let committed = Instant::now();
    let mut late = semisync_py(c.enc(), &["observer", &c.primary.addr().to_string()])
        .env("ZRELAY_WAIT_TIMEOUT", "60")
        .spawn();
    // Well past ack_timeout_ms: still not shown to anyone.
    wait_until(SYNC, "ack timeout passed", || {
        started.elapsed() > Duration::from_millis(2500)
    });
    // The connected client's invalidation is held too.
    obs.send_line("probe");
    obs.expect_line(&format!("AT {acked}"), SYNC);
    // Its reads go on meanwhile: a load of an object the waiting commit did
    // not touch passes the held invalidation (the server answers it after
    // that commit; its revision is the acknowledged one).
    obs.send_line(&format!("load {oid_a}"));
    obs.expect_line(&format!("LOADED {acked}"), Duration::from_secs(5));
    if let Some(line) = late.try_line() {
        panic!("a client connected while a commit waited for its ack: {line}");
    }
    let st = semisync_status(&c);
    assert_eq!(st["degraded"], false, "{st}");
    assert!(st["waiting_commits"].as_u64().unwrap_or(0) >= 1, "{st}");
    // The client's commit began before its backend had it.
    let held_for = committed.elapsed();
    c.replica.resume();
    let out = w.finish();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let secs: f64 = value_of(&out, "secs").parse().expect("secs");
    assert!(
        secs >= held_for.as_secs_f64(),
        "the commit returned after {secs}s while the replica was stalled {held_for:?}"
    );
    let tid = value_of(&out, "tid").to_string();
    assert!(tid > acked);
    assert_eq!(c.last_tid(c.primary.addr()), tid);
    // The waiting client is registered at the commit.
    late.expect_line("READY", SYNC);
    late.send_line("probe");
    late.expect_line(&format!("AT {tid}"), SYNC);
    late.send_line("stop");
    late.finish();
    obs.send_line(&format!("wait {tid}"));
    obs.expect_line(&format!("AT {tid}"), SYNC);
    obs.send_line("stop");
    obs.finish();
}

/// kill -9 of the primary zrelay and its runzeo while a writer commits:
/// every tid the writer saw acknowledged is on the replica's backend.
fn kill_primary_while_writing(level: &str, replica_extra: &str, restart_replica: bool) {
    let mut c = semisync_cluster(
        Enc::Pickle,
        &format!("ack_level = \"{level}\"\nack_timeout_ms = 60000"),
        replica_extra,
    );
    let mut w = semisync_py(c.enc(), &["acked-writer", &c.primary.addr().to_string()]).spawn();
    w.expect_line("READY", Duration::from_secs(60));
    let base = c.replica.applied_tid();
    wait_until(SYNC, "the writer to commit through the replica", || {
        c.replica.applied_tid() != base
    });
    // Applied on the replica is not yet acknowledged to the writer: wait
    // for one acknowledgement (on a loaded machine the kill came first).
    w.expect_prefix("ACK ", SYNC);
    c.primary.kill();
    c.pzeo.kill();
    w.send_line("stop");
    let out = w.finish();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let acked: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("ACK ")).collect();
    assert!(!acked.is_empty(), "no acknowledged commit:\n{out}");
    let newest = acked.iter().max().expect("non-empty").to_string();
    if restart_replica {
        c.replica.kill();
        c.replica.start();
    }
    wait_until(SYNC, "every acknowledged tid on the replica", || {
        c.last_tid(c.rzeo.addr()) >= newest
    });
    eprintln!("{} acknowledged commits, newest {newest}", acked.len());
}

#[test]
fn kill9_primary_loses_nothing_acknowledged_applied() {
    kill_primary_while_writing("applied", "", false);
}

/// `ack_level = "received"`: with the replica's backend stalled, a commit
/// is acknowledged once it is fsynced in the replica zrelay's spool. Then
/// the primary zrelay and runzeo die (kill -9), the replica zrelay too, and
/// a torn record is left at the spool's end: on restart the replica drops
/// the torn tail and applies the spool, so its backend holds every tid the
/// writer saw acknowledged although it had not applied them before.
#[test]
fn kill9_primary_received_spool_carries_it_through_a_replica_restart() {
    // The replica's spool: `data_dir/spool/` (every test node has a
    // top-level data_dir).
    let mut c = semisync_cluster(
        Enc::Pickle,
        "ack_level = \"received\"\nack_timeout_ms = 60000",
        "",
    );
    let mut w = semisync_py(c.enc(), &["acked-writer", &c.primary.addr().to_string()]).spawn();
    w.expect_line("READY", Duration::from_secs(60));
    let base = c.replica.applied_tid();
    wait_until(SYNC, "the writer to commit through the replica", || {
        c.replica.applied_tid() != base
    });
    // Applies stall; the spool still takes what arrives.
    c.rzeo.pause();
    let mut received_only = String::new();
    wait_until(SYNC, "a commit acknowledged as received only", || {
        let w = semisync_status(&c)["watermark_tid"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let applied = c.replica.applied_tid().unwrap_or_default();
        if w > applied {
            received_only = w;
            true
        } else {
            false
        }
    });
    let applied_then = c.replica.applied_tid().unwrap_or_default();
    assert!(
        metric_value(&c.replica.metrics(), "zrelay_replication_spool_bytes") > 0.0,
        "nothing spooled"
    );
    // The writer was told: its commit returned.
    w.expect_line(&format!("ACK {received_only}"), SYNC);
    c.primary.kill();
    c.pzeo.kill();
    c.replica.kill();
    let newest = stop_writer_newest_ack(w);
    assert!(
        newest > applied_then,
        "{newest} was applied before the crash"
    );
    // A crash mid-append: half a record at the end of the spool.
    let log = c.replica.dir().join("state/spool/relay.log");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("spool file");
    std::io::Write::write_all(&mut f, &[0, 0, 1, 0, 7, 7, 7]).expect("torn tail");
    drop(f);
    c.rzeo.resume();
    c.replica.start();
    wait_until(SYNC, "the spool applied on the replica", || {
        c.last_tid(c.rzeo.addr()) >= newest
    });
    wait_until(SYNC, "the applied spool emptied", || {
        metric_value(&c.replica.metrics(), "zrelay_replication_spool_bytes") == 0.0
    });
    let log = c.replica.log();
    assert!(log.contains("dropped a torn tail"), "{log}");
    assert!(log.contains("spool replayed into the backend"), "{log}");
}

/// `received` acks, then the primary is lost while the replica's backend is
/// stalled: what the replica acknowledged sits only in its spool. A
/// promotion applies the spool before the node serves writes, so every
/// commit a client saw acknowledged is on the new primary.
#[test]
fn promotion_applies_the_spool_first() {
    let token_dir = tempfile::tempdir().expect("tempdir");
    let token_file = token_dir.path().join("admin.token");
    std::fs::write(&token_file, "promote-test-token-0123456789\n").unwrap();
    let mut opts = ClusterOpts::new(Enc::Msgpack);
    opts.primary_replication =
        "ack_mode = \"semi-sync\"\nack_level = \"received\"\nack_timeout_ms = 60000".into();
    opts.replica_admin = format!("token_file = {:?}", token_file.display().to_string());
    let mut c = Cluster::with(opts);
    wait_until(SYNC, "replica stream live", || {
        c.replica.upstream_state() == "live"
    });
    let mut w = semisync_py(
        c.enc(),
        &["acked-writer", &c.primary.addr().to_string(), "gated"],
    )
    .spawn();
    w.expect_line("READY", Duration::from_secs(60));
    // The replica's applier idle (nothing of the writer's start-up left to
    // apply), then the replica's backend stalls before the writer commits: whatever the
    // replica acknowledges can then only be in its spool (stalled later, the
    // backend might have committed one whose tpc_finish reply the applier
    // had not read yet, and the spool would have nothing left to apply).
    let primary_last = c.last_tid(c.pzeo.addr());
    wait_until(SYNC, "the replica applied everything", || {
        c.replica.applied_tid().unwrap_or_default() >= primary_last
    });
    c.rzeo.pause();
    let watermark = || {
        semisync_status(&c)["watermark_tid"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let before = watermark();
    w.send_line("go");
    wait_until(SYNC, "a commit acknowledged as received only", || {
        watermark() > before
    });
    c.primary.kill();
    c.pzeo.kill();
    let newest = stop_writer_newest_ack(w);
    let applied_then = c.replica.applied_tid().unwrap_or_default();
    assert!(newest > applied_then, "{newest} was applied already");
    // Promote while the backend is still stalled (the replica task stops;
    // the spool is applied once the backend answers again).
    let admin = c.replica.admin().to_string();
    let tf = token_file.display().to_string();
    let promote = std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_zrelay"))
            .args(["promote", "--admin", &admin, "--token-file", &tf])
            .output()
            .expect("run zrelay promote")
    });
    wait_until(SYNC, "the replica task stopped for the promotion", || {
        c.replica.log().contains("promotion: stopped following")
    });
    c.rzeo.resume();
    let out = promote.join().expect("promote thread");
    assert!(
        out.status.success(),
        "promote failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.replica.status()["role"], "primary");
    let last = c.last_tid(c.rzeo.addr());
    assert!(
        last >= newest,
        "new primary at {last}, acknowledged {newest}"
    );
    assert!(
        c.replica
            .log()
            .contains("promotion: the spool applied first"),
        "{}",
        c.replica.log()
    );
}

fn doors_py(enc: Enc, args: &[&str]) -> Py {
    Py::new("doors.py").args(args).env(
        "ZRELAY_EXPECT_PROTOCOL",
        std::str::from_utf8(enc.protocol()).expect("ascii"),
    )
}

/// A client with a persistent cache reconnects while a commit T waits for
/// its acknowledgement. The backend registers the new session after T (it
/// never sends it T's invalidation): told the older acknowledged position,
/// the client would find its cache "up to date" and keep T's objects stale
/// for good. Its register answer waits for the ack instead, and the cache
/// is verified against T. Deterministic: the replica's backend cannot
/// apply T while another connection holds its commit lock.
#[test]
fn a_cache_reconnecting_during_a_held_commit_is_verified_against_it() {
    let c = semisync_cluster(
        Enc::Pickle,
        "ack_level = \"applied\"\nack_timeout_ms = 60000",
        "",
    );
    let p = c.primary.addr().to_string();
    let out = doors_py(c.enc(), &["bank-init", &p, "3", "3000"]).run();
    let t0 = value_of(&String::from_utf8_lossy(&out.stdout), "tid").to_string();
    c.wait_applied(&t0, SYNC);
    let cache = tempfile::tempdir().unwrap();
    let cdir = cache.path().display().to_string();
    let probe = || doors_py(c.enc(), &["probe-reader", &p, "3", "3000", &cdir]).spawn();
    // The cache holds every account, current at t0.
    let mut first = probe();
    first.expect_prefix("READ1", SYNC);
    first.send_line("stop");
    first.finish();
    let mut lock = doors_py(c.enc(), &["hold-lock", &c.rzeo.addr().to_string()]).spawn();
    lock.expect_line("LOCKED", SYNC);
    // T: account 0 -> 1, on the primary's backend, not acknowledged.
    let xfer = doors_py(c.enc(), &["transfer", &p, "0", "1", "100"]).spawn();
    wait_until(SYNC, "T on the primary's backend", || {
        c.last_tid(c.pzeo.addr()) > t0
    });
    let sessions = || {
        metric_value(
            &c.primary.metrics(),
            "zrelay_client_sessions{kind=\"read-write\"}",
        )
    };
    let before = sessions();
    let mut again = probe();
    wait_until(
        SYNC,
        "the cache registered with the primary's backend",
        || sessions() > before,
    );
    lock.send_line("release");
    lock.expect_line("RELEASED", SYNC);
    xfer.finish();
    again.expect_prefix("READ1", SYNC);
    // T2: account 1 -> 2; the client reloads 1 and 2, and 0 must not be
    // the revision from before T.
    let out = doors_py(c.enc(), &["transfer", &p, "1", "2", "100"]).run();
    let t2 = value_of(&String::from_utf8_lossy(&out.stdout), "tid").to_string();
    again.send_line(&format!("check {t2}"));
    again.expect_prefix("OK", SYNC);
    again.send_line("stop");
    again.finish();
}
