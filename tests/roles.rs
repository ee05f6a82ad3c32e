//! Role changes at run time: switchover under load and back (no commit
//! lost, clients continue through their doors), authenticated control,
//! epoch fencing of a stale stream, detach. Real runzeo, real zrelay, real
//! ZODB clients, both encodings.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::cluster::{metric_value, value_of, wait_until, Certs, Node, NodeRole, NodeSpec};
use support::ops::{bank_load, finish_bank_load, py_for, zrelay_cli as zrelay, AdminToken};
use support::{free_port, Enc, Py, Zeo, ZeoOpts};

const SYNC: Duration = Duration::from_secs(30);
const TOKEN: &str = "roles-test-token-0123456789abcdef";

fn roles_py(enc: Enc, args: &[&str]) -> Py {
    py_for("roles.py", enc, args)
}

fn run(enc: Enc, args: &[&str]) -> String {
    String::from_utf8_lossy(&roles_py(enc, args).run().stdout).into_owned()
}

/// Two nodes, "a" (primary) and "b" (replica of a), both with a
/// replication listener (either may become primary) and a token-protected
/// admin API. `extra_b`: more `[replication]` lines for b.
struct Pair {
    a: Node,
    b: Node,
    a_repl: SocketAddr,
    azeo: Zeo,
    bzeo: Zeo,
    certs: Certs,
    token: AdminToken,
    enc: Enc,
}

const BACKEND_EXTRA: &str = "probe_interval_ms = 200";
const DOOR: &str = "[door]\nmax_replica_lag_ms = 3000\n";

fn pair(enc: Enc) -> Pair {
    pair_with(enc, "")
}

/// [`pair`] with more `[replication]` lines for a (the primary).
fn pair_with(enc: Enc, extra_a: &str) -> Pair {
    let certs = Certs::new(&["a", "b", "c", "d"]);
    let token = AdminToken::new(TOKEN);
    let admin = token.config_line();
    let azeo = Zeo::start(enc, ZeoOpts::default());
    let bzeo = Zeo::start(enc, ZeoOpts::default());
    let b_repl = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let book = |name: &str, addr: SocketAddr| {
        format!("{DOOR}\n[[cluster.nodes]]\nname = {name:?}\nreplication = \"{addr}\"\n")
    };
    let mut a = Node::prepare(&NodeSpec {
        name: "a".into(),
        backend: azeo.addr().clone(),
        role: NodeRole::Primary {
            allowed_peers: vec![],
        },
        tls: certs.tls("a"),
        backend_extra: BACKEND_EXTRA.into(),
        admin_extra: admin.clone(),
        replication_extra: format!("promotion = 50\n{extra_a}"),
        extra: book("b", b_repl),
    });
    a.start();
    let a_repl = a.repl();
    let mut b = Node::prepare(&NodeSpec {
        name: "b".into(),
        backend: bzeo.addr().clone(),
        role: NodeRole::Replica {
            upstream: a_repl,
            upstream_name: "a".into(),
        },
        tls: certs.tls("b"),
        backend_extra: BACKEND_EXTRA.into(),
        admin_extra: admin,
        replication_extra: format!("listen = \"{b_repl}\"\npromotion = 80\n"),
        extra: book("a", a_repl),
    });
    b.start();
    Pair {
        a,
        b,
        a_repl,
        azeo,
        bzeo,
        certs,
        token,
        enc,
    }
}

fn role_of(n: &Node) -> String {
    n.status()["role"].as_str().unwrap_or("").to_string()
}

fn epoch_of(n: &Node) -> u64 {
    n.status()["role_state"]["epoch"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// The node is a replica whose stream is live.
fn live_replica(n: &Node) -> bool {
    let st = n.status();
    st["role"] == "replica" && st["upstream"]["state"] == "live"
}

/// The door of `n` forwards writes to `primary`.
fn door_points_to(n: &Node, primary: &str) -> bool {
    n.status()["door"]["primary"].as_str() == Some(primary)
}

impl Pair {
    fn tf(&self) -> String {
        self.token.path()
    }

    fn switchover(&self, from: &Node, to: &str) -> Value {
        let (code, text) = zrelay(&[
            "switchover",
            "--admin",
            &from.admin().to_string(),
            "--to",
            to,
            "--token-file",
            &self.tf(),
        ]);
        assert_eq!(code, 0, "switchover to {to}: {text}");
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    fn wait_ready(&self) {
        wait_until(SYNC, "b follows a, live", || live_replica(&self.b));
        wait_until(SYNC, "b's door knows a", || door_points_to(&self.b, "a"));
    }
}

/// The bank under load through both doors (a writer with an in-memory and
/// one with a persistent cache at each), a switchover a -> b, then back
/// b -> a; after each the writers continue, and at the end every
/// acknowledged commit is there and the total holds.
fn switchover_and_back(p: &Pair) {
    let (a, b) = (&p.a, &p.b);
    p.wait_ready();
    let ad = a.addr().to_string();
    let bd = b.addr().to_string();
    let out = run(p.enc, &["bank-init", &ad, "10", "10000", "4"]);
    let tid = value_of(&out, "tid").to_string();
    wait_until(SYNC, "b applied the bank", || {
        b.applied_tid().as_deref() >= Some(tid.as_str())
    });
    let cache = tempfile::tempdir().unwrap();
    let wdoors = format!("{ad},{ad},{bd},{bd}");
    let mut load = bank_load(p.enc, &wdoors, &bd, cache.path(), Duration::from_secs(110));

    // --- a -> b
    let v = p.switchover(a, "b");
    assert_eq!(v["new_primary"], "b", "{v}");
    assert_eq!(v["role"], "replica", "{v}");
    wait_until(SYNC, "b is primary", || role_of(b) == "primary");
    wait_until(SYNC, "a follows b, live", || live_replica(a));
    wait_until(SYNC, "a's door forwards to b", || door_points_to(a, "b"));
    assert_eq!(epoch_of(a), 1);
    assert_eq!(epoch_of(b), 1);
    println!(
        "switchover a -> b: commits fenced for {} ms",
        v["fenced_ms"]
    );
    let m = b.metrics();
    assert_eq!(
        metric_value(&m, "zrelay_role_changes_total{change=\"promote\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(metric_value(&m, "zrelay_role_epoch"), 1.0);
    load.send_line("mark");
    load.expect_line("MARKED", Duration::from_secs(60));

    // --- b -> a (the switch back works the same way)
    let v = p.switchover(b, "a");
    assert_eq!(v["new_primary"], "a", "{v}");
    println!(
        "switchover b -> a: commits fenced for {} ms",
        v["fenced_ms"]
    );
    wait_until(SYNC, "a is primary again", || role_of(a) == "primary");
    wait_until(SYNC, "b follows a again, live", || live_replica(b));
    wait_until(SYNC, "b's door forwards to a", || door_points_to(b, "a"));
    assert_eq!(epoch_of(a), 2);
    load.send_line("mark");
    load.expect_line("MARKED", Duration::from_secs(60));
    finish_bank_load(load);

    // The history shows both changes with their epochs and reasons.
    let st = a.status();
    let hist = st["role_state"]["history"].as_array().unwrap().clone();
    let roles: Vec<&str> = hist.iter().map(|h| h["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["fenced", "replica", "primary"], "{st}");
    assert!(hist[2]["why"].as_str().unwrap().contains("switchover"));
    // Both backends hold the same last transaction.
    let last = a.status()["storage_last_tid"].as_str().unwrap().to_string();
    wait_until(SYNC, "b applied everything", || {
        b.applied_tid().as_deref() == Some(last.as_str())
    });
}

/// Opens a door session to `target` (a replication listener) as node b's
/// door would, announcing `epoch`; the ZEO server's offer on success.
fn open_door(p: &Pair, target: SocketAddr, epoch: Option<u64>) -> Result<Vec<u8>, String> {
    support::ops::open_door(p.certs.tls("b"), "a", &target.to_string(), "b", epoch)
}

/// After the switch back a is at epoch 2: a door at epoch 1 (it missed a
/// role change) is refused, one at epoch 2 is served.
fn stale_door_refused(p: &Pair) {
    // Real doors may have been refused already, during the switches (b's
    // door at the old epoch while a was handing over).
    let stale = |m: &str| metric_value(m, "zrelay_door_refused_total{reason=\"stale_epoch\"}");
    let before = stale(&p.a.metrics());
    let err = open_door(p, p.a_repl, Some(1)).expect_err("stale door admitted");
    assert!(
        err.contains("stale_epoch") || err.contains("epoch"),
        "{err}"
    );
    let offer = open_door(p, p.a_repl, Some(2)).expect("current door");
    assert_eq!(&offer[..4], &[0, 0, 0, 2], "{offer:?}");
    let m = p.a.metrics();
    assert_eq!(stale(&m), before + 1.0, "{m}");
}

#[test]
fn switchover_under_load_and_back_pickle() {
    let p = pair(Enc::Pickle);
    switchover_and_back(&p);
    stale_door_refused(&p);
    control_is_authenticated(&p);
    stale_epoch_refused_and_detach(&p);
}

#[test]
fn switchover_under_load_and_back_msgpack() {
    let p = pair(Enc::Msgpack);
    switchover_and_back(&p);
}

/// Control requests without the token, with a wrong one, or to a target
/// that may not be promoted are refused; nothing changes.
fn control_is_authenticated(p: &Pair) {
    let a = &p.a;
    let admin = a.admin().to_string();
    let (code, text) = zrelay(&["switchover", "--admin", &admin, "--to", "b"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("401"), "{text}");
    let wrong = p.token.wrong_file();
    for cmd in [
        vec!["promote"],
        vec!["detach"],
        vec!["demote", "--follow", "b"],
    ] {
        let mut args = cmd.clone();
        args.extend(["--admin", &admin, "--token-file", wrong.to_str().unwrap()]);
        let (code, text) = zrelay(&args);
        assert_eq!(code, 1, "{cmd:?}: {text}");
        assert!(text.contains("401") || text.contains("403"), "{text}");
    }
    let m = a.metrics();
    assert_eq!(
        metric_value(&m, "zrelay_admin_auth_failures_total{reason=\"missing\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "zrelay_admin_auth_failures_total{reason=\"invalid_token\"}"
        ),
        3.0,
        "{m}"
    );
    // Authenticated but wrong: a replica cannot be a switchover source, a
    // primary cannot be promoted, an unknown target is refused.
    let tf = p.tf();
    let (code, text) = zrelay(&["promote", "--admin", &admin, "--token-file", &tf]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("409"), "{text}");
    let (code, text) = zrelay(&[
        "switchover",
        "--admin",
        &admin,
        "--to",
        "nobody",
        "--token-file",
        &tf,
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("not a connected replica"), "{text}");
    assert_eq!(role_of(a), "primary");
}

/// A replica whose state says it knows a newer epoch than the primary's
/// refuses the stream (and the primary refuses to feed it); a replica that
/// detaches becomes an independent primary of a new cluster that the old
/// primary never feeds.
fn stale_epoch_refused_and_detach(p: &Pair) {
    let epoch = epoch_of(&p.a);
    let czeo = Zeo::start(p.enc, ZeoOpts::default());
    let mut c = Node::prepare(&NodeSpec {
        name: "c".into(),
        backend: czeo.addr().clone(),
        role: NodeRole::Replica {
            upstream: p.a_repl,
            upstream_name: "a".into(),
        },
        tls: p.certs.tls("c"),
        backend_extra: BACKEND_EXTRA.into(),
        admin_extra: p.token.config_line(),
        replication_extra: "promotion = \"never\"\n".into(),
        extra: String::new(),
    });
    // c's state: a replica that saw epoch+5 (a primary elected elsewhere).
    let state = c.dir().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("role.json"),
        format!(
            "{{\"cluster\":\"zrelay\",\"epoch\":{},\"role\":\"replica\",\"history\":[]}}",
            epoch + 5
        ),
    )
    .unwrap();
    c.start();
    wait_until(SYNC, "c refused for a stale epoch", || {
        c.status()["upstream"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("stale_epoch"))
    });
    assert_ne!(c.status()["upstream"]["state"], "live");
    assert!(
        p.a.log().contains("fenced out"),
        "the primary did not log the stale-epoch refusal"
    );
    // An ineligible replica is never a switchover target.
    c.stop();
    std::fs::remove_file(state.join("role.json")).unwrap();
    c.start();
    wait_until(SYNC, "c follows a, live", || live_replica(&c));
    let (code, text) = zrelay(&[
        "switchover",
        "--admin",
        &p.a.admin().to_string(),
        "--to",
        "c",
        "--token-file",
        &p.tf(),
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("may not be promoted"), "{text}");

    // --- detach c: an independent primary with a new cluster identity.
    let (code, text) = zrelay(&[
        "detach",
        "--admin",
        &c.admin().to_string(),
        "--token-file",
        &p.tf(),
    ]);
    assert_eq!(code, 0, "{text}");
    let v: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["role"], "detached", "{v}");
    let cluster = v["cluster"].as_str().unwrap().to_string();
    assert_ne!(cluster, "zrelay");
    wait_until(SYNC, "c serves writes", || role_of(&c) == "primary");
    let out = run(p.enc, &["write", &c.addr().to_string(), "clone-only", "1"]);
    assert!(out.contains("tid="), "{out}");
    let out = run(p.enc, &["write", &p.a.addr().to_string(), "prod-only", "2"]);
    let prod_tid = value_of(&out, "tid").to_string();
    wait_until(SYNC, "b applied the prod write", || {
        p.b.applied_tid().as_deref() >= Some(prod_tid.as_str())
    });
    let got = run(p.enc, &["read", &c.addr().to_string(), "prod-only"]);
    assert!(got.contains("value=None"), "{got}");
    let got = run(p.enc, &["read", &p.a.addr().to_string(), "clone-only"]);
    assert!(got.contains("value=None"), "{got}");
    // It stays detached across a restart (the state file).
    c.stop();
    c.start();
    wait_until(SYNC, "c restarted as primary", || role_of(&c) == "primary");
    assert_eq!(c.status()["role_state"]["cluster"], cluster.as_str());
}

/// Async mode's failure: the primary dies with a commit its replica never
/// received; the replica is promoted and commits on. The old primary,
/// demoted to follow it, is refused as diverged (the tids named); `zrelay
/// rewind` cuts what the new primary lacks (kept aside) and it follows.
#[test]
fn async_failure_divergence_and_rewind() {
    let mut p = pair(Enc::Pickle);
    p.wait_ready();
    let tf = p.tf();
    let ad = p.a.addr().to_string();
    let out = run(p.enc, &["write", &ad, "k1", "1"]);
    let t1 = value_of(&out, "tid").to_string();
    wait_until(SYNC, "b applied k1", || {
        p.b.applied_tid().as_deref() == Some(t1.as_str())
    });
    p.b.stop();
    let out = run(p.enc, &["write", &ad, "k2", "2"]);
    let t2 = value_of(&out, "tid").to_string();
    p.a.kill();

    // b takes over.
    p.b.start();
    let (code, text) = zrelay(&[
        "promote",
        "--admin",
        &p.b.admin().to_string(),
        "--token-file",
        &tf,
    ]);
    assert_eq!(code, 0, "{text}");
    wait_until(SYNC, "b is primary", || role_of(&p.b) == "primary");
    let hist = p.b.status()["role_state"]["history"].clone();
    assert_eq!(hist[0]["last_tid"], t1.as_str(), "{hist}");
    let out = run(p.enc, &["write", &p.b.addr().to_string(), "k3", "3"]);
    let t3 = value_of(&out, "tid").to_string();

    // The old primary comes back and is told to follow b: diverged.
    p.a.start();
    let (code, text) = zrelay(&[
        "demote",
        "--admin",
        &p.a.admin().to_string(),
        "--follow",
        "b",
        "--token-file",
        &tf,
    ]);
    assert_eq!(code, 0, "{text}");
    wait_until(SYNC, "a refused as diverged, the tids named", || {
        let st = p.a.status();
        st["upstream"]["state"] == "diverged"
            && st["upstream"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("lacks:"))
    });
    let err = p.a.status()["upstream"]["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        err.contains(&t2),
        "the divergence names a's extra tid: {err}"
    );
    assert!(
        err.contains(&format!("--to {t1}")),
        "and the way back: {err}"
    );

    // The way back, offline.
    p.a.stop();
    p.azeo.stop();
    let data_fs = p.azeo.dir().join("Data.fs");
    let (code, text) = zrelay(&[
        "rewind",
        "--data-fs",
        data_fs.to_str().unwrap(),
        "--to",
        &t1,
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&format!("cut {t2}")), "{text}");
    let kept = std::fs::metadata(format!("{}.rewound-{t1}", data_fs.display())).unwrap();
    assert!(kept.len() > 0);
    p.azeo.start_again();
    p.a.start();
    wait_until(SYNC, "a follows b, live", || live_replica(&p.a));
    wait_until(SYNC, "a applied k3", || {
        p.a.applied_tid().as_deref() == Some(t3.as_str())
    });
    let backend = p.azeo.addr().to_string();
    assert!(run(p.enc, &["read", &backend, "k3"]).contains("value='3'"));
    assert!(run(p.enc, &["read", &backend, "k2"]).contains("value=None"));
}

/// Semi-sync `received` with clients at b's door (writers with in-memory
/// and persistent caches, a reader checking every snapshot); b's runzeo stalls so b acknowledges commits it has only in
/// its spool; then the primary's zrelay and runzeo die (kill -9), b is
/// promoted (`restart_b`: b's zrelay is killed and restarted first, its
/// spool carrying the received-only commits). The clients reconnect
/// through b's door and continue, none meets "Cache newer than server",
/// and every commit any writer saw acknowledged is on b.
fn semisync_failover(enc: Enc, restart_b: bool) {
    let mut p = pair_with(
        enc,
        "ack_mode = \"semi-sync\"\nack_level = \"received\"\nack_timeout_ms = 60000\n",
    );
    p.wait_ready();
    let ad = p.a.addr().to_string();
    let bd = p.b.addr().to_string();
    let out = run(p.enc, &["bank-init", &ad, "10", "10000", "4"]);
    let tid = value_of(&out, "tid").to_string();
    wait_until(SYNC, "b applied the bank", || {
        p.b.applied_tid().as_deref() >= Some(tid.as_str())
    });
    let cache = tempfile::tempdir().unwrap();
    // Writers at b's door (the node that survives), two with a persistent
    // cache; a's clients go down with a.
    let wdoors = format!("{bd},{bd},{bd},{bd}");
    let mut load = bank_load(p.enc, &wdoors, &bd, cache.path(), Duration::from_secs(150));
    // A client with a persistent cache read k (then left); k changes.
    let cached = tempfile::tempdir().unwrap();
    let cdir = cached.path().display().to_string();
    run(p.enc, &["write", &bd, "k", "old"]);
    let got = run(p.enc, &["cached-read", &bd, "k", &cdir]);
    assert!(got.contains("value='old'"), "{got}");
    run(p.enc, &["write", &bd, "k", "new"]);
    // b's backend stalls: what b acknowledges now is only in its spool.
    p.bzeo.pause();
    let watermark = || {
        p.a.status()["semisync"]["watermark_tid"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    wait_until(SYNC, "a commit acknowledged as received only", || {
        watermark() > p.b.applied_tid().unwrap_or_default()
    });
    let w = watermark();
    p.a.kill();
    p.azeo.kill();
    assert!(
        metric_value(&p.b.metrics(), "zrelay_replication_spool_bytes") > 0.0,
        "nothing spooled on b"
    );
    if restart_b {
        p.b.kill();
        p.bzeo.resume();
        p.b.start();
        wait_until(SYNC, "b replayed its spool", || {
            p.b.log().contains("spool replayed into the backend")
        });
    } else {
        p.bzeo.resume();
    }
    let (code, text) = zrelay(&[
        "promote",
        "--admin",
        &p.b.admin().to_string(),
        "--token-file",
        &p.tf(),
    ]);
    assert_eq!(code, 0, "{text}");
    wait_until(SYNC, "b is primary", || role_of(&p.b) == "primary");
    wait_until(SYNC, "the new primary's backend at the watermark", || {
        p.b.status()["storage_last_tid"]
            .as_str()
            .is_some_and(|last| last >= w.as_str())
    });
    // The cache that left before k changed comes back: b restored that
    // change (runzeo records no oids for it), so b tells the client its
    // cache is too old rather than keep the stale k.
    let got = run(p.enc, &["cached-read", &bd, "k", &cdir]);
    assert!(
        got.contains("value='new'"),
        "stale cache after promotion: {got}"
    );
    // Every writer commits again through b's door.
    load.send_line("mark");
    load.expect_line("MARKED", Duration::from_secs(90));
    // The script checked every writer's acknowledged commits at b.
    finish_bank_load(load);
}

#[test]
fn semisync_failover_through_doors_loses_nothing_acknowledged() {
    semisync_failover(Enc::Pickle, false);
}

#[test]
fn semisync_failover_after_a_replica_restart_msgpack() {
    semisync_failover(Enc::Msgpack, true);
}
