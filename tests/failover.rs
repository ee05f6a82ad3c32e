//! Automatic failover through etcd with whole nodes: real etcd (one member
//! on loopback, started here), real runzeo, real zrelay processes with
//! `[coordinator]`, real ZODB clients committing through their doors.
//! Tight settings (ttl 4 s, loop_wait 1 s, margin 1 s) keep the file short;
//! deadlines are generous for a loaded 2-core machine, the measured times
//! are printed.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cluster::{metric_value, wait_until, Certs, Node, NodeRole, NodeSpec};
use support::etcd::Etcd;
use support::ops::{bank_load, finish_bank_load, py_for, zrelay_cli};
use support::{free_port, Enc, Py, Zeo, ZeoOpts};

const SYNC: Duration = Duration::from_secs(30);
const TTL: u64 = 4;
const TOKEN: &str = "failover-test-token-0123456789abcdef";

fn roles_py(enc: Enc, args: &[&str]) -> Py {
    py_for("roles.py", enc, args)
}

/// Three nodes a (primary at start), b, c (replicas of a), each with a
/// replication listener (any may lead), a spool, a token-protected admin
/// API and `[coordinator]` on one etcd.
struct Trio {
    // Relays first: they stop before their backends and etcd.
    nodes: Vec<Node>,
    zeos: Vec<Zeo>,
    repl: Vec<SocketAddr>,
    _etcd: Etcd,
    _certs: Certs,
    _dirs: tempfile::TempDir,
    token_file: String,
    enc: Enc,
}

const NAMES: [&str; 3] = ["a", "b", "c"];

impl Trio {
    /// `replication`: `[replication]` lines for every node; `promotion`:
    /// each node's `promotion` value.
    fn start(enc: Enc, replication: &str, promotion: [&str; 3]) -> Trio {
        let etcd = Etcd::start_loopback();
        let certs = Certs::new(&NAMES);
        let dirs = tempfile::tempdir().unwrap();
        let token_file = dirs.path().join("admin.token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let token_file = token_file.display().to_string();
        let zeos: Vec<Zeo> = NAMES
            .iter()
            .map(|_| Zeo::start(enc, ZeoOpts::default()))
            .collect();
        let repl: Vec<SocketAddr> = NAMES
            .iter()
            .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
            .collect();
        let coordinator = format!(
            "[door]\nmax_replica_lag_ms = 3000\n\n\
             [coordinator]\nkind = \"etcd\"\nendpoints = {:?}\nname = \"failover\"\n\
             ttl_secs = {TTL}\nloop_wait_secs = 1\nfence_margin_ms = 1000\n",
            etcd.endpoints()
        );
        // a's replication port is chosen by prepare; b and c listen on
        // theirs too (either may lead later).
        let prepare = |i: usize, a_repl: Option<SocketAddr>| {
            let name = NAMES[i];
            let (role, listen) = match a_repl {
                None => (
                    NodeRole::Primary {
                        allowed_peers: vec![],
                    },
                    String::new(),
                ),
                Some(up) => (
                    NodeRole::Replica {
                        upstream: up,
                        upstream_name: "a".into(),
                    },
                    format!("listen = \"{}\"\n", repl[i]),
                ),
            };
            Node::prepare(&NodeSpec {
                name: name.to_string(),
                backend: zeos[i].addr().clone(),
                role,
                tls: certs.tls(name),
                backend_extra: "probe_interval_ms = 200".into(),
                admin_extra: format!("token_file = {token_file:?}\n"),
                replication_extra: format!("{listen}promotion = {}\n{replication}\n", promotion[i],),
                extra: coordinator.clone(),
            })
        };
        let mut a = prepare(0, None);
        let a_repl = a.repl();
        a.start();
        let mut nodes = vec![a];
        for i in 1..3 {
            let mut n = prepare(i, Some(a_repl));
            n.start();
            nodes.push(n);
        }
        let mut repl = repl;
        repl[0] = a_repl;
        let t = Trio {
            nodes,
            zeos,
            repl,
            _etcd: etcd,
            _certs: certs,
            _dirs: dirs,
            token_file,
            enc,
        };
        wait_until(SYNC, "a holds the leader key", || t.writable(0));
        for (i, name) in NAMES.iter().enumerate().skip(1) {
            wait_until(SYNC, &format!("{name} follows a, live"), || {
                t.live_replica_of(i, 0)
            });
            wait_until(SYNC, &format!("{name}'s door knows a"), || {
                t.nodes[i].status()["door"]["primary"] == "a"
            });
        }
        t
    }

    fn status(&self, i: usize) -> Option<Value> {
        let (code, body) = support::cluster::try_http_get(self.nodes[i].admin(), "/status")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// Node i is primary, holds the leader key and takes commits.
    fn writable(&self, i: usize) -> bool {
        self.status(i).is_some_and(|s| {
            s["role"] == "primary"
                && s["role_state"]["role"] == "primary"
                && s["coordinator"]["holding"] == true
        })
    }

    /// Node i is a replica streaming live from node `of`.
    fn live_replica_of(&self, i: usize, of: usize) -> bool {
        self.status(i).is_some_and(|s| {
            s["role"] == "replica"
                && s["upstream"]["state"] == "live"
                && s["upstream"]["address"] == self.repl[of].to_string()
        })
    }

    fn epoch(&self, i: usize) -> u64 {
        self.status(i).expect("status")["role_state"]["epoch"]
            .as_u64()
            .expect("epoch")
    }

    fn door(&self, i: usize) -> String {
        self.nodes[i].addr().to_string()
    }

    fn cli(&self, args: &[&str]) -> String {
        let (code, text) = zrelay_cli(args);
        assert_eq!(code, 0, "zrelay {args:?}: {text}");
        text
    }

    fn switchover(&self, from: usize, to: usize) -> Value {
        let admin = self.nodes[from].admin().to_string();
        let text = self.cli(&[
            "switchover",
            "--admin",
            &admin,
            "--to",
            NAMES[to],
            "--token-file",
            &self.token_file,
        ]);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// SIGKILL the node's zrelay and its runzeo (the host dies).
    fn kill_host(&mut self, i: usize) {
        self.nodes[i].kill();
        self.zeos[i].kill();
    }
}

/// (a) Semi-sync, writers (in-memory and persistent caches) committing
/// through the replicas' doors; the primary's host is killed: a replica is
/// promoted within ttl + a few seconds, the writers continue through their
/// doors, the other replica follows the new primary; then (c) a switchover
/// through etcd to the other replica and back, under the same load. Every
/// writer commits again within `RESUME_WITHIN` of the new primary being
/// writable (and pauses no longer than that across a switchover). At the
/// end every acknowledged commit is there and no client saw "Cache newer
/// than server".
#[test]
fn primary_killed_replica_takes_over_then_switchover_and_back() {
    let mut t = Trio::start(
        Enc::Pickle,
        "ack_mode = \"semi-sync\"\nack_level = \"received\"\nack_timeout_ms = 10000",
        ["100", "100", "100"],
    );
    let enc = t.enc;
    let out = roles_py(enc, &["bank-init", &t.door(1), "10", "10000", "4"])
        .run()
        .stdout;
    assert!(String::from_utf8_lossy(&out).contains("tid="));
    let cache = tempfile::tempdir().unwrap();
    let (bd, cd) = (t.door(1), t.door(2));
    let wdoors = format!("{bd},{bd},{cd},{cd}");
    let rdoors = format!("{bd},{cd}");
    let mut load = bank_load(
        enc,
        &wdoors,
        &rdoors,
        cache.path(),
        Duration::from_secs(170),
    );

    // --- (a) the primary's host dies
    let killed = Instant::now();
    t.kill_host(0);
    let new = wait_for_new_primary(&t, killed);
    let promoted = killed.elapsed();
    let other = 3 - new;
    load.send_line("mark");
    load.expect_line("MARKED", Duration::from_secs(60));
    let writable_through_doors = killed.elapsed();
    // Every writer resumes soon after the new primary is writable, at
    // either door. A client whose `register` got an error (say a
    // ReadOnlyError from a door that already saw the new role but still
    // had the replica's hooks) waits ~9 s more before it tries again.
    let pauses = longest_pauses(&mut load);
    println!(
        "failover: longest pause per writer {pauses:.2?} s (new primary writable {:.2} s \
         after the kill)",
        promoted.as_secs_f64()
    );
    let bound = promoted.as_secs_f64() + RESUME_WITHIN.as_secs_f64();
    for (i, p) in pauses.iter().enumerate() {
        assert!(
            *p <= bound,
            "writer {i} paused {p:.2} s: more than {RESUME_WITHIN:?} after the new primary \
             was writable ({:.2} s after the kill); all pauses {pauses:?}",
            promoted.as_secs_f64()
        );
    }
    println!(
        "failover: {} writable {:.2} s after the kill (ttl {TTL} s); every writer committed \
         again through its door after {:.2} s",
        NAMES[new],
        promoted.as_secs_f64(),
        writable_through_doors.as_secs_f64()
    );
    assert!(
        promoted < Duration::from_secs(TTL + 8),
        "promotion took {promoted:?}"
    );
    wait_until(SYNC, "the other replica follows the new primary", || {
        t.live_replica_of(other, new)
    });
    assert_eq!(t.epoch(new), 1);
    assert_eq!(t.epoch(other), 1);
    let st = t.status(other).unwrap();
    assert_eq!(st["coordinator"]["leader"]["node"], NAMES[new], "{st}");
    assert_eq!(st["door"]["primary"], NAMES[new], "{st}");
    let m = t.nodes[new].metrics();
    assert_eq!(
        metric_value(&m, "zrelay_coordinator_elections_total{outcome=\"won\"}"),
        1.0,
        "{m}"
    );
    // `zrelay status --config` reads the same from etcd.
    let cfg = t.nodes[other].config_path().display().to_string();
    let text = t.cli(&["status", "--config", &cfg]);
    assert!(
        text.contains(&format!("Leader: {} (epoch 1)", NAMES[new])),
        "{text}"
    );

    // ... and so does `zrelay status --admin`, from the node's /status.
    let admin = t.nodes[other].admin().to_string();
    let text = t.cli(&["status", "--admin", &admin]);
    assert!(text.contains("Coordinator (etcd)"), "{text}");
    assert!(
        text.contains(&format!("Leader: {} (epoch 1)", NAMES[new])),
        "{text}"
    );

    // --- (c) switchover through etcd, and back
    let v = t.switchover(new, other);
    assert_eq!(v["new_primary"], NAMES[other], "{v}");
    println!(
        "switchover {} -> {} through etcd: commits fenced for {} ms",
        NAMES[new], NAMES[other], v["fenced_ms"]
    );
    wait_until(SYNC, "the target holds the key", || t.writable(other));
    wait_until(SYNC, "the old primary follows", || {
        t.live_replica_of(new, other)
    });
    assert_eq!(t.epoch(other), 2);
    load.send_line("mark");
    load.expect_line("MARKED", Duration::from_secs(60));
    let pauses = longest_pauses(&mut load);
    println!("switchover: longest pause per writer {pauses:.2?} s");
    assert!(
        pauses.iter().all(|p| *p <= RESUME_WITHIN.as_secs_f64()),
        "a writer paused more than {RESUME_WITHIN:?} across the switchover: {pauses:?}"
    );
    let v = t.switchover(other, new);
    assert_eq!(v["new_primary"], NAMES[new], "{v}");
    wait_until(SYNC, "switched back", || t.writable(new));
    wait_until(SYNC, "followed back", || t.live_replica_of(other, new));
    assert_eq!(t.epoch(new), 3);
    let st = t.status(other).unwrap();
    assert_eq!(st["coordinator"]["leader"]["epoch"], 3, "{st}");
    load.send_line("mark");
    load.expect_line("MARKED", Duration::from_secs(60));
    let pauses = longest_pauses(&mut load);
    println!("switchover back: longest pause per writer {pauses:.2?} s");
    assert!(
        pauses.iter().all(|p| *p <= RESUME_WITHIN.as_secs_f64()),
        "a writer paused more than {RESUME_WITHIN:?} across the switchover back: {pauses:?}"
    );

    // A manual promotion would race the coordinator: refused.
    let admin = t.nodes[other].admin().to_string();
    let (code, text) = zrelay_cli(&["promote", "--admin", &admin, "--token-file", &t.token_file]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("coordinator"), "{text}");

    finish_bank_load(load);
    for i in [new, other] {
        t.nodes[i].assert_healthy();
    }
}

/// How soon after the new primary is writable every writer commits again
/// (each writer's longest pause also covers the time before the kill was
/// noticed; a writer whose `register` failed waits ~9 s more).
const RESUME_WITHIN: Duration = Duration::from_secs(5);

/// Each writer's longest pause between two acknowledged commits since the
/// previous call (`roles.py switch-load`'s "pauses" command), in seconds.
fn longest_pauses(load: &mut support::PyChild) -> Vec<f64> {
    load.send_line("pauses");
    let line = load.expect_prefix("PAUSES ", Duration::from_secs(10));
    line["PAUSES ".len()..]
        .split_whitespace()
        .map(|p| p.parse().unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Polls the two survivors until one takes commits; its index.
fn wait_for_new_primary(t: &Trio, since: Instant) -> usize {
    let mut found = None;
    wait_until(Duration::from_secs(TTL + 30), "a new primary", || {
        found = (1..3).find(|&i| t.writable(i));
        found.is_some()
    });
    let i = found.expect("found");
    println!("new primary {} seen after {:?}", NAMES[i], since.elapsed());
    i
}

/// (b) b has `promotion = "never"` and is the most caught up (c's backend
/// is stalled while commits arrive); maintenance mode is on when the
/// primary dies: nobody is promoted. `zrelay resume`: c (eligible) is
/// elected, b never, and b follows c.
#[test]
fn never_and_maintenance_block_promotion() {
    let mut t = Trio::start(Enc::Msgpack, "", ["100", "\"never\"", "100"]);
    let enc = t.enc;
    let a = t.door(0);
    roles_py(enc, &["write", &a, "k0", "0"]).run();
    t.zeos[2].pause();
    for k in 1..4 {
        roles_py(enc, &["write", &a, &format!("k{k}"), "1"]).run();
    }
    let cfg = t.nodes[1].config_path().display().to_string();
    t.cli(&["pause", "--config", &cfg, "--reason", "test"]);
    // b's record in etcd is ahead of c's.
    wait_until(SYNC, "b ahead of c in etcd", || {
        let st = t.status(1).unwrap();
        let members = st["coordinator"]["members"].as_array().cloned();
        let tid = |n: &str| {
            members
                .iter()
                .flatten()
                .find(|m| m["name"] == n)
                .and_then(|m| m["applied_tid"].as_u64())
                .unwrap_or(0)
        };
        tid("b") > tid("c")
    });
    t.kill_host(0);
    // Maintenance: well past the ttl, nobody leads.
    let quiet = Instant::now() + Duration::from_secs(TTL + 3);
    while Instant::now() < quiet {
        for (i, name) in NAMES.iter().enumerate().skip(1) {
            assert!(!t.writable(i), "{name} promoted in maintenance");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = t.nodes[2].metrics();
    assert!(
        metric_value(
            &m,
            "zrelay_coordinator_elections_total{outcome=\"maintenance\"}"
        ) > 0.0,
        "{m}"
    );
    t.zeos[2].resume();
    let resumed = Instant::now();
    t.cli(&["resume", "--config", &cfg]);
    wait_until(
        Duration::from_secs(TTL + 30),
        "c elected after resume",
        || {
            assert!(!t.writable(1), "b (never) was promoted");
            t.writable(2)
        },
    );
    println!("c writable {:?} after resume", resumed.elapsed());
    let st = t.status(1).unwrap();
    assert_eq!(st["role"], "replica", "{st}");
    let b = st["coordinator"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "b")
        .cloned()
        .unwrap();
    assert_eq!(b["eligible"], false, "{b}");
    // b follows c (or reports that it holds commits c lacks: async mode).
    wait_until(SYNC, "b follows c", || {
        t.status(1)
            .is_some_and(|s| s["upstream"]["address"] == t.repl[2].to_string())
    });
    // c takes commits through b's door.
    let out = roles_py(enc, &["write", &t.door(2), "after", "2"])
        .run()
        .stdout;
    assert!(String::from_utf8_lossy(&out).contains("tid="));
}
