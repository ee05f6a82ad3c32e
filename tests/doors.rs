//! Any node is a door: read-write sessions at a replica forwarded to the
//! primary, their loads offloaded to the replica when provably fresh,
//! read-only sessions routed by lag. Real runzeo, real zrelay, real ZODB
//! clients, both encodings.

mod support;

use std::time::Duration;

use support::cluster::{metric_value, value_of, wait_until, Cluster, ClusterOpts};
use support::ops::py_for;
use support::{Enc, Py};

const SYNC: Duration = Duration::from_secs(30);
/// Offload a little more patiently than the default: the test machine is
/// small and shared.
const DOOR: &str = "[door]\noffload_wait_ms = 50\nmax_replica_lag_ms = 1500\n";

fn doors_py(enc: Enc, args: &[&str]) -> Py {
    py_for("doors.py", enc, args)
}

fn run(enc: Enc, args: &[&str]) -> String {
    let out = doors_py(enc, args).run();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cluster(enc: Enc) -> Cluster {
    let mut opts = ClusterOpts::new(enc);
    opts.replica_extra = DOOR.into();
    let c = Cluster::with(opts);
    // The replica knows its primary once the first roster arrived.
    wait_until(SYNC, "replica's cluster view names the primary", || {
        c.replica.status()["cluster"].as_array().is_some_and(|n| {
            n.iter()
                .any(|n| n["role"] == "primary" && n["node"] == "primary")
        })
    });
    c
}

fn loads(metrics: &str, by: &str, reason: &str) -> f64 {
    metric_value(
        metrics,
        &format!("zrelay_door_loads_total{{served_by=\"{by}\",reason=\"{reason}\"}}"),
    )
}

fn bank(enc: Enc, seed: u64) {
    let mut c = cluster(enc);
    let p = c.primary.addr().to_string();
    let r = c.replica.addr().to_string();
    let out = run(enc, &["bank-init", &p, "20", "20000"]);
    c.wait_applied(value_of(&out, "tid"), SYNC);
    let doors = format!("{p},{r}");
    let out = run(
        enc,
        &[
            "bank",
            &seed.to_string(),
            "6",
            "20",
            "20000",
            &doors,
            &doors,
        ],
    );
    println!("{out}");
    let m = c.replica.metrics();
    let local = loads(&m, "local", "fresh") + loads(&m, "local", "waited");
    let forwarded: f64 = [
        "behind",
        "lagging",
        "invalidated",
        "not_snapshot",
        "local_unavailable",
    ]
    .iter()
    .map(|r| loads(&m, "primary", r))
    .sum();
    println!("loads: {local} local, {forwarded} forwarded");
    // Most reads of forwarded sessions stay on this node (the benchmark
    // measures the fraction on a quiet machine).
    assert!(
        local > forwarded,
        "the replica served {local} loads, the primary {forwarded}:\n{m}"
    );
    assert!(
        metric_value(
            &m,
            "zrelay_door_sessions_total{route=\"forwarded\",mode=\"read_write\"}"
        ) >= 2.0,
        "{m}"
    );
    // Everything written through either door reached both backends.
    let tid = c.last_tid(c.pzeo.addr());
    c.wait_applied(&tid, SYNC);
    c.assert_healthy();
}

#[test]
fn bank_through_every_door_pickle() {
    bank(Enc::Pickle, 7);
}

#[test]
fn bank_through_every_door_msgpack() {
    bank(Enc::Msgpack, 11);
}

fn forwarded_session_behaves_like_a_direct_one(enc: Enc) {
    let mut c = cluster(enc);
    let r = c.replica.addr().to_string();
    let out = run(enc, &["roundtrip", &r]);
    let tid = value_of(&out, "tid").to_string();
    // Written through the replica's door, committed on the primary.
    assert_eq!(c.last_tid(c.pzeo.addr()), tid);
    run(enc, &["semantics", &r, &c.primary.addr().to_string()]);
    // The cluster view is the same from both nodes' /status.
    for node in [&c.primary, &c.replica] {
        let st = node.status();
        let names: Vec<_> = st["cluster"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["node"].as_str().unwrap().to_string(),
                    n["role"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert!(
            names.contains(&("primary".into(), "primary".into())),
            "{st}"
        );
        assert!(
            names.contains(&("replica".into(), "replica".into())),
            "{st}"
        );
    }
    c.assert_healthy();
}

#[test]
fn forwarded_session_behaves_like_a_direct_one_msgpack() {
    forwarded_session_behaves_like_a_direct_one(Enc::Msgpack);
}

#[test]
fn forwarded_session_behaves_like_a_direct_one_pickle() {
    forwarded_session_behaves_like_a_direct_one(Enc::Pickle);
}

#[test]
fn primary_lost_mid_transaction_ends_forwarded_sessions_cleanly() {
    let mut c = cluster(Enc::Pickle);
    let r = c.replica.addr().to_string();
    let mut w = doors_py(Enc::Pickle, &["writer", &r]).spawn();
    w.expect_line("ready", SYNC);
    w.expect_line("n=5", SYNC);
    c.primary.kill();
    // The replica zrelay keeps running; the client sees disconnects and
    // errors, never a half-applied transaction.
    w.send_line("stop");
    let out = w.finish();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = value_of(&out, "last").to_string();
    // Every transaction the client saw committed is on the primary backend.
    let on_primary = c.last_tid(c.pzeo.addr());
    assert!(on_primary >= last, "{on_primary} < {last}");
    assert!(c.replica.is_running());
    c.replica.assert_healthy();
}

fn local_loads(c: &Cluster) -> f64 {
    let m = c.replica.metrics();
    loads(&m, "local", "fresh") + loads(&m, "local", "waited")
}

fn usable(c: &Cluster) -> bool {
    c.replica.status()["door"]["local_usable"] == true
}

#[test]
fn a_lagging_replica_is_bypassed_then_used_again() {
    let mut c = cluster(Enc::Pickle);
    let p = c.primary.addr().to_string();
    let r = c.replica.addr().to_string();
    let out = run(Enc::Pickle, &["bank-init", &p, "10", "1000"]);
    c.wait_applied(value_of(&out, "tid"), SYNC);
    // A read-write client at the replica's door, opened while all is well:
    // it keeps writing (forwarded) throughout.
    let mut w = doors_py(Enc::Pickle, &["writer", &r]).spawn();
    w.expect_line("ready", SYNC);
    w.expect_line("n=5", SYNC);
    wait_until(SYNC, "replica usable", || usable(&c));
    run(Enc::Pickle, &["read-for", &r, "1", "0"]);
    let before = local_loads(&c);
    assert!(before > 0.0, "no load served locally while in sync");

    c.rzeo.pause();
    wait_until(SYNC, "replica reported lagging", || !usable(&c));
    // New sessions, read-write and read-only, are served by the primary.
    let stalled = local_loads(&c);
    let out = run(Enc::Pickle, &["read-for", &r, "1", "0"]);
    assert!(value_of(&out, "reads").parse::<u64>().unwrap() > 0);
    let out = run(Enc::Pickle, &["read-for", &r, "1", "1"]);
    assert!(value_of(&out, "reads").parse::<u64>().unwrap() > 0);
    assert_eq!(local_loads(&c), stalled, "a lagging replica served loads");
    let m = c.replica.metrics();
    assert!(
        metric_value(
            &m,
            "zrelay_door_sessions_total{route=\"forwarded\",mode=\"read_only\"}"
        ) >= 1.0,
        "{m}"
    );

    c.rzeo.resume();
    // The writer at the door kept committing (forwarded) throughout.
    w.send_line("stop");
    let out = w.finish();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = value_of(&out, "last").to_string();
    assert_eq!(value_of(&out, "errors"), "0", "{out}");
    let on_primary = c.last_tid(c.pzeo.addr());
    assert!(on_primary >= last);
    // Caught up, the replica serves loads again.
    c.wait_applied(&on_primary, SYNC);
    wait_until(SYNC, "replica usable again", || usable(&c));
    let out = run(Enc::Pickle, &["read-for", &r, "1", "0"]);
    assert!(value_of(&out, "reads").parse::<u64>().unwrap() > 0);
    assert!(
        local_loads(&c) > stalled,
        "caught-up replica not used again"
    );
    c.wait_applied(&on_primary, SYNC);
    c.assert_healthy();
}

/// Opens a door session to the primary with the given node certificate, as
/// a replica's door would; the ZEO server's offer comes back on success.
fn open_door(c: &Cluster, cert: &str) -> Result<Vec<u8>, String> {
    let addr = c.primary.repl().to_string();
    support::ops::open_door(c.certs.tls(cert), "primary", &addr, cert, None)
}

#[test]
fn a_door_not_on_the_allow_list_is_refused() {
    let mut opts = ClusterOpts::new(Enc::Pickle);
    opts.allowed_peers = vec!["replica".into()];
    opts.extra_certs = vec!["rogue".into()];
    let mut c = Cluster::with(opts);
    // The allowed node's door gets the primary backend's ZEO offer...
    let offer = open_door(&c, "replica").expect("allowed door");
    assert_eq!(&offer[..4], &[0, 0, 0, 2], "{offer:?}");
    // ...a certificate of the same CA but not on the list gets nothing.
    let err = open_door(&c, "rogue").expect_err("rogue door admitted");
    println!("rogue refused: {err}");
    let m = c.primary.metrics();
    assert!(
        metric_value(
            &m,
            "zrelay_tls_handshake_failures_total{reason=\"peer_not_allowed\"}"
        ) >= 1.0,
        "{m}"
    );
    c.assert_healthy();
}

#[test]
fn read_only_sessions_go_to_the_least_lagged_replica() {
    // "replica" has a replication listener (other doors can reach it);
    // "replica2" is a second replica of the primary whose backend will stall.
    let mut opts = ClusterOpts::new(Enc::Msgpack);
    opts.extra_certs = vec!["replica2".into()];
    opts.replica_replication = format!("listen = \"127.0.0.1:{}\"\n", support::free_port());
    opts.replica_extra = DOOR.into();
    opts.primary_extra =
        "[door]\nread_only_route = \"replicas\"\nmax_replica_lag_ms = 1500\n".into();
    let mut c = Cluster::with(opts);
    let (mut zeo2, mut r2) = c.extra_replica_with("replica2", c.certs.tls("replica2"), DOOR);
    let p = c.primary.addr().to_string();
    let out = run(Enc::Msgpack, &["bank-init", &p, "10", "1000"]);
    c.wait_applied(value_of(&out, "tid"), SYNC);
    let routed_to_replica = |c: &Cluster| {
        metric_value(
            &c.replica.metrics(),
            "zrelay_door_sessions_total{route=\"local\",mode=\"read_only\"}",
        )
    };
    wait_until(
        SYNC,
        "replica2's door sees replica as a reader target",
        || {
            r2.status()["cluster"].as_array().is_some_and(|n| {
                n.iter()
                    .any(|n| n["node"] == "replica" && n["replication_addr"].is_string())
            }) && r2.status()["door"]["local_usable"] == true
        },
    );

    // The primary's door sends a read-only client to the replica.
    let before = routed_to_replica(&c);
    let out = run(Enc::Msgpack, &["read-for", &p, "1", "1"]);
    assert!(value_of(&out, "reads").parse::<u64>().unwrap() > 0);
    assert_eq!(
        routed_to_replica(&c),
        before + 1.0,
        "primary did not route to the replica"
    );

    // replica2 falls behind: its new sessions are relayed to the primary
    // from the start (the door cannot know yet whether they will write),
    // and the primary's door sends the read-only ones on to "replica".
    let mut w = doors_py(Enc::Msgpack, &["writer", &p]).spawn();
    w.expect_line("n=5", SYNC);
    zeo2.pause();
    wait_until(SYNC, "replica2 lagging", || {
        r2.status()["door"]["local_usable"] == false
    });
    let before = routed_to_replica(&c);
    let out = run(
        Enc::Msgpack,
        &["read-for", &r2.addr().to_string(), "1", "1"],
    );
    assert!(value_of(&out, "reads").parse::<u64>().unwrap() > 0);
    assert_eq!(
        routed_to_replica(&c),
        before + 1.0,
        "replica2 did not route to replica"
    );
    zeo2.resume();
    w.send_line("stop");
    w.finish();
    c.assert_healthy();
    r2.assert_healthy();
}

fn semisync_door_cluster(enc: Enc, door: &str) -> Cluster {
    let mut opts = ClusterOpts::new(enc);
    opts.replica_extra = door.into();
    opts.primary_replication =
        "ack_mode = \"semi-sync\"\nack_level = \"applied\"\nack_timeout_ms = 60000\n".into();
    let c = Cluster::with(opts);
    wait_until(SYNC, "replica's cluster view names the primary", || {
        c.replica.status()["cluster"].as_array().is_some_and(|n| {
            n.iter()
                .any(|n| n["role"] == "primary" && n["node"] == "primary")
        })
    });
    c
}

fn read_write_sessions(n: &support::cluster::Node) -> f64 {
    metric_value(&n.metrics(), "zrelay_client_sessions{kind=\"read-write\"}")
}

/// A client registering at a replica's door while a semi-sync commit T
/// waits for its acknowledgement: the primary's backend registers the
/// session after T (it never sends it T's invalidation), so the client
/// must not be told an older position and have its loads at that older
/// snapshot answered "current" by a replica that has not applied T yet:
/// that entry would stay in its cache, and a later snapshot would mix it
/// with newer revisions. Deterministic: the replica's backend cannot apply
/// T while another connection holds its commit lock, yet answers loads.
#[test]
fn a_client_registering_during_a_held_commit_never_caches_a_stale_revision() {
    let mut c = semisync_door_cluster(
        Enc::Pickle,
        "[door]\noffload_wait_ms = 50\nmax_replica_lag_ms = 60000\n",
    );
    let p = c.primary.addr().to_string();
    let r = c.replica.addr().to_string();
    let out = run(Enc::Pickle, &["bank-init", &p, "3", "3000"]);
    let t0 = value_of(&out, "tid").to_string();
    c.wait_applied(&t0, SYNC);
    wait_until(SYNC, "replica usable", || usable(&c));
    // The replica's backend answers loads but applies nothing.
    let mut lock = doors_py(Enc::Pickle, &["hold-lock", &c.rzeo.addr().to_string()]).spawn();
    lock.expect_line("LOCKED", SYNC);
    // T: account 0 -> 1, committed on the primary's backend, held there.
    let xfer = doors_py(Enc::Pickle, &["transfer", &p, "0", "1", "100"]).spawn();
    wait_until(SYNC, "T on the primary's backend", || {
        c.last_tid(c.pzeo.addr()) > t0
    });
    let before = read_write_sessions(&c.primary);
    let mut reader = doors_py(Enc::Pickle, &["probe-reader", &r, "3", "3000"]).spawn();
    wait_until(
        SYNC,
        "the reader registered with the primary's backend",
        || read_write_sessions(&c.primary) > before,
    );
    // (A client told the old position reads now; a held register waits.)
    lock.send_line("release");
    lock.expect_line("RELEASED", SYNC);
    let out = xfer.finish();
    let t = value_of(&String::from_utf8_lossy(&out.stdout), "tid").to_string();
    reader.expect_prefix("READ1", SYNC);
    // T2: account 1 -> 2. The reader's next snapshot reloads 1 and 2.
    let out = run(Enc::Pickle, &["transfer", &p, "1", "2", "100"]);
    let t2 = value_of(&out, "tid").to_string();
    assert!(t2 > t);
    reader.send_line(&format!("check {t2}"));
    reader.expect_prefix("OK", SYNC);
    reader.send_line("stop");
    reader.finish();
    assert!(local_loads(&c) > 0.0, "nothing was offloaded");
    c.assert_healthy();
}
