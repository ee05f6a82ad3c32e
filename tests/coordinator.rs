//! The coordinator against REAL etcd (Debian etcd-server), with each node's
//! coordinator running in its own network namespace so partitions are real
//! (nftables drop rules inside the node's namespace). Needs root, as CI has.
//!
//! Layout of every test: a private bridge; etcd at 10.77.0.100 (its own
//! namespace, which also hosts the observer that watches `/<name>/` and
//! timestamps every change); nodes at 10.77.0.1, .2, ... Settings are tight
//! (ttl 4 s, loop_wait 1 s, margin 1 s; 10 s for the etcd leader kill) so the
//! file stays well under a minute;
//! deadlines are generous for a loaded 2-core machine.

mod support;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions};
use support::etcd::Etcd;
use support::netns::{in_ns, Net};
use support::wait_for;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use zrelay::coordinator::{
    self, ClusterSnapshot, CoordinatorConfig, Event, FenceReason, Member, MemberRole,
};

const ETCD_HOST: u8 = 100;
const CLUSTER: &str = "t";

fn config(endpoints: &[String], ttl: u64) -> CoordinatorConfig {
    let text = format!(
        "kind = \"etcd\"\nendpoints = {endpoints:?}\nname = \"{CLUSTER}\"\n\
         ttl_secs = {ttl}\nloop_wait_secs = 1\nfence_margin_ms = 1000\n"
    );
    let c: CoordinatorConfig = toml::from_str(&text).unwrap();
    c.check().unwrap();
    c
}

/// A node config file with this `[coordinator]`, for the zrelay CLI.
fn config_file(dir: &std::path::Path, endpoints: &[String]) -> std::path::PathBuf {
    let path = dir.join("zrelay.toml");
    std::fs::write(
        &path,
        format!(
            "[client]\nlisten = \"127.0.0.1:8100\"\n[backend]\naddress = \"127.0.0.1:8200\"\n\
             [coordinator]\nkind = \"etcd\"\nendpoints = {endpoints:?}\nname = \"{CLUSTER}\"\n\
             ttl_secs = 4\nloop_wait_secs = 1\nfence_margin_ms = 1000\n"
        ),
    )
    .unwrap();
    path
}

/// Run `zrelay ARGS` inside namespace `ns`; (exit code, stdout + stderr).
fn zrelay_cli(ns: &str, args: &[&str]) -> (i32, String) {
    support::ops::cli_output(Net::cmd(ns, env!("CARGO_BIN_EXE_zrelay")).args(args))
}

fn member(role: MemberRole, eligible: bool, priority: u32, tid: u64, epoch: u64) -> Member {
    Member {
        name: String::new(),
        role,
        client: None,
        replication: None,
        eligible,
        priority,
        applied_tid: tid,
        acknowledged_tid: tid,
        epoch,
    }
}

type Log<T> = Arc<Mutex<Vec<(Instant, T)>>>;

/// One node's coordinator, in-process but in its own namespace.
struct Node {
    name: String,
    ns: String,
    state: watch::Sender<Member>,
    snapshot: watch::Receiver<ClusterSnapshot>,
    events: Log<Event>,
    stop: CancellationToken,
    kill: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Node {
    fn start(ns: &str, name: &str, cfg: CoordinatorConfig, m: Member) -> Node {
        let (state, rx) = watch::channel(m);
        let events: Log<Event> = Arc::default();
        let (stop, kill) = (CancellationToken::new(), CancellationToken::new());
        let (ev, st, kl, me) = (events.clone(), stop.clone(), kill.clone(), name.to_string());
        let (snap_tx, snap_rx) = std::sync::mpsc::channel();
        let thread = in_ns(ns, move || async move {
            let mut c = coordinator::spawn(cfg, me, rx, st);
            snap_tx.send(c.snapshot.clone()).unwrap();
            loop {
                tokio::select! {
                    e = c.events.recv() => match e {
                        Some(e) => ev.lock().unwrap().push((Instant::now(), e)),
                        None => break,
                    },
                    // Abrupt end: the runtime is dropped with the task in it,
                    // so nothing is revoked (like SIGKILL).
                    _ = kl.cancelled() => return,
                }
            }
            let _ = c.task.await;
        });
        let snapshot = snap_rx.recv().expect("coordinator started");
        Node {
            name: name.to_string(),
            snapshot,
            ns: ns.to_string(),
            state,
            events,
            stop,
            kill,
            thread: Some(thread),
        }
    }

    fn events(&self) -> Vec<(Instant, Event)> {
        self.events.lock().unwrap().clone()
    }

    fn first(&self, pred: impl Fn(&Event) -> bool) -> Option<Instant> {
        self.events()
            .into_iter()
            .find(|(_, e)| pred(e))
            .map(|(t, _)| t)
    }

    fn wait_event(&self, what: &str, pred: impl Fn(&Event) -> bool) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(t) = self.first(&pred) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after 30 s: {}: {what}; events: {:?}; last view: {:?}",
                self.name,
                self.events(),
                *self.snapshot.borrow()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Graceful: the coordinator revokes its leases.
    fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            t.join().expect("node thread");
        }
    }

    /// Abrupt: leases are left to expire.
    fn kill(mut self) {
        self.kill.cancel();
        if let Some(t) = self.thread.take() {
            t.join().expect("node thread");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A key change seen by the observer: (key, value or None when deleted).
type Change = (String, Option<String>);

/// Watches `/<CLUSTER>/` from etcd's namespace and timestamps every change.
struct Observer {
    log: Log<Change>,
    ns: String,
    endpoints: Vec<String>,
    opts: etcd_client::ConnectOptions,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Observer {
    fn start(etcd: &Etcd) -> Observer {
        let log: Log<Change> = Arc::default();
        let stop = CancellationToken::new();
        let (l, s, eps) = (log.clone(), stop.clone(), etcd.endpoints());
        let opts = etcd.connect_options();
        let o = opts.clone();
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ready.clone();
        let thread = in_ns(&etcd.ns, move || async move {
            let mut c = Client::connect(eps, Some(o))
                .await
                .expect("observer connect");
            let mut w = c
                .watch(
                    format!("/{CLUSTER}/"),
                    Some(WatchOptions::new().with_prefix()),
                )
                .await
                .expect("watch");
            r.store(true, std::sync::atomic::Ordering::SeqCst);
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    m = w.message() => {
                        let Ok(Some(m)) = m else { return };
                        let now = Instant::now();
                        for e in m.events() {
                            let Some(kv) = e.kv() else { continue };
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            let val = (e.event_type() == EventType::Put)
                                .then(|| String::from_utf8_lossy(kv.value()).into_owned());
                            l.lock().unwrap().push((now, (key, val)));
                        }
                    }
                }
            }
        });
        wait_for(Duration::from_secs(20), "observer watching", || {
            ready
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(())
        });
        Observer {
            log,
            ns: etcd.ns.clone(),
            endpoints: etcd.endpoints(),
            opts,
            stop,
            thread: Some(thread),
        }
    }

    fn changes(&self) -> Vec<(Instant, Change)> {
        self.log.lock().unwrap().clone()
    }

    /// First change of `key` matching `pred` on its value.
    fn first(&self, key: &str, pred: impl Fn(Option<&str>) -> bool) -> Option<Instant> {
        self.changes()
            .into_iter()
            .find(|(_, (k, v))| k == key && pred(v.as_deref()))
            .map(|(t, _)| t)
    }

    fn wait(&self, what: &str, key: &str, pred: impl Fn(Option<&str>) -> bool) -> Instant {
        wait_for(Duration::from_secs(30), what, || self.first(key, &pred))
    }

    /// Current value of a key (a direct read, not the log).
    fn get(&self, key: &str) -> Option<(String, i64)> {
        let (eps, key, opts) = (self.endpoints.clone(), key.to_string(), self.opts.clone());
        in_ns(&self.ns, move || async move {
            // One endpoint at a time: some members may have been killed.
            let mut last = None;
            for ep in eps {
                let r = async {
                    let mut c = Client::connect([ep], Some(opts.clone())).await?;
                    c.get(key.clone(), None).await
                }
                .await;
                match r {
                    Ok(r) => {
                        return r.kvs().first().map(|kv| {
                            (
                                String::from_utf8_lossy(kv.value()).into_owned(),
                                kv.create_revision(),
                            )
                        })
                    }
                    Err(e) => last = Some(e),
                }
            }
            panic!("no etcd endpoint answered: {last:?}")
        })
        .join()
        .expect("get thread")
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What every scenario starts with: the test network, etcd (`members` of
/// them) in its own namespace (returned too, for the CLI) and an observer of
/// its keys.
fn cluster(members: usize) -> (Net, String, Etcd, Observer) {
    let mut net = Net::new();
    let ens = net.node(ETCD_HOST);
    let etcd = Etcd::start(&ens, &Net::addr(ETCD_HOST), members);
    let obs = Observer::start(&etcd);
    (net, ens, etcd, obs)
}

/// A primary "p" on host 1 and a replica "r" on host 2, both eligible,
/// priority 0, at `tid` and `epoch`.
fn primary_and_replica(
    net: &mut Net,
    cfg: CoordinatorConfig,
    tid: u64,
    epoch: u64,
) -> (Node, Node) {
    let (pn, rn) = (net.node(1), net.node(2));
    let p = Node::start(
        &pn,
        "p",
        cfg.clone(),
        member(MemberRole::Primary, true, 0, tid, epoch),
    );
    let r = Node::start(
        &rn,
        "r",
        cfg,
        member(MemberRole::Replica, true, 0, tid, epoch),
    );
    (p, r)
}

fn key(k: &str) -> String {
    format!("/{CLUSTER}/{k}")
}

fn leader_is(node: &'static str, epoch: u64) -> impl Fn(Option<&str>) -> bool {
    move |v| {
        v.and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
            .is_some_and(|j| j["node"] == node && j["epoch"] == epoch)
    }
}

/// Members register and vanish with their leases; the primary takes the
/// leader key and keeps renewing it past several ttls; a graceful stop
/// revokes at once.
#[test]
fn membership_and_leader_lease() {
    let (mut net, ens, etcd, obs) = cluster(1);
    let (p, r) = primary_and_replica(&mut net, config(&etcd.endpoints(), 4), 10, 1);

    obs.wait("p registered", &key("members/p"), |v| v.is_some());
    obs.wait("r registered", &key("members/r"), |v| v.is_some());
    let t_lead = obs.wait("p leads epoch 1", &key("leader"), leader_is("p", 1));
    p.wait_event("holding", |e| *e == Event::Holding { epoch: 1 });
    r.wait_event("sees p", |e| {
        *e == Event::Leader {
            node: "p".into(),
            epoch: 1,
        }
    });
    let (_, rev) = obs.get(&key("leader")).expect("leader key");
    let member_json = obs.get(&key("members/r")).unwrap().0;
    let m: Member = serde_json::from_str(&member_json).unwrap();
    assert_eq!(
        (m.name.as_str(), m.role, m.applied_tid),
        ("r", MemberRole::Replica, 10)
    );

    // `zrelay status --config` shows it from etcd.
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(dir.path(), &etcd.endpoints());
    let (code, text) = zrelay_cli(&ens, &["status", "--config", &file.display().to_string()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("Leader: p (epoch 1), lease "), "{text}");
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("p *") || l.starts_with("r "))
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(
        rows[0].contains("primary") && rows[1].contains("replica"),
        "{text}"
    );

    // Renewed: still the same key (same create revision) after 2.5 ttls.
    wait_for(Duration::from_secs(30), "2.5 ttls of leadership", || {
        (t_lead.elapsed() > Duration::from_secs(10)).then_some(())
    });
    assert_eq!(obs.get(&key("leader")).map(|(_, r)| r), Some(rev));
    assert!(
        p.first(|e| matches!(e, Event::Fence { .. })).is_none(),
        "healthy leader fenced: {:?}",
        p.events()
    );
    assert!(r.first(|e| matches!(e, Event::Elected { .. })).is_none());

    // Killed: its member key outlives it, then expires with its lease.
    let t_kill = Instant::now();
    r.kill();
    let t_gone = obs.wait("r expired", &key("members/r"), |v| v.is_none());
    let lived = t_gone - t_kill;
    assert!(
        lived > Duration::from_secs(1) && lived < Duration::from_secs(15),
        "r's member key vanished {lived:?} after the kill (lease 4 s)"
    );

    // Graceful stop: both keys revoked at once, not after a ttl.
    let t_stop = Instant::now();
    p.stop();
    let t1 = obs.wait("leader released", &key("leader"), |v| v.is_none());
    let t2 = obs.wait("p deregistered", &key("members/p"), |v| v.is_none());
    assert!(
        t1.max(t2) - t_stop < Duration::from_secs(3),
        "release took too long"
    );
}

/// The leader-holder cut off from etcd fences itself strictly before its
/// lease expires in etcd; only then is the best candidate elected: newest
/// durable tid beats priority, and `promotion = never` is never elected.
#[test]
fn partitioned_leader_fences_before_expiry_then_best_candidate_wins() {
    let (mut net, _ens, etcd, obs) = cluster(1);
    let cfg = config(&etcd.endpoints(), 4);
    let ns: Vec<String> = (1..=4).map(|h| net.node(h)).collect();
    let p = Node::start(
        &ns[0],
        "p",
        cfg.clone(),
        member(MemberRole::Primary, true, 0, 100, 1),
    );
    p.wait_event("holding", |e| *e == Event::Holding { epoch: 1 });
    // r1: most caught up eligible; r2: higher priority but behind;
    // far: newest of all but promotion = never.
    let r1 = Node::start(
        &ns[1],
        "r1",
        cfg.clone(),
        member(MemberRole::Replica, true, 0, 100, 1),
    );
    let r2 = Node::start(
        &ns[2],
        "r2",
        cfg.clone(),
        member(MemberRole::Replica, true, 9, 90, 1),
    );
    let far = Node::start(
        &ns[3],
        "far",
        cfg,
        member(MemberRole::Replica, false, 9, 100, 1),
    );
    for n in ["r1", "r2", "far"] {
        obs.wait("registered", &key(&format!("members/{n}")), |v| v.is_some());
    }

    Net::partition(&p.ns, &Net::addr(ETCD_HOST));
    let t_cut = Instant::now();
    let t_fence = p.wait_event("fence", |e| {
        *e == Event::Fence {
            reason: FenceReason::Deadline,
        }
    });
    let t_expired = obs.wait("leader lease expired", &key("leader"), |v| v.is_none());
    let t_new = obs.wait("r1 leads epoch 2", &key("leader"), leader_is("r1", 2));
    let t_elected = r1.wait_event("elected", |e| *e == Event::Elected { epoch: 2 });
    // What the role machinery will do on Elected: promote, in epoch 2.
    r1.state.send_modify(|m| {
        m.role = MemberRole::Primary;
        m.epoch = 2;
    });
    assert!(
        t_fence < t_expired,
        "fenced {:?} after the cut but the lease expired at {:?}",
        t_fence - t_cut,
        t_expired - t_cut
    );
    assert!(
        t_fence <= t_cut + Duration::from_secs(4),
        "fenced late: {:?}",
        t_fence - t_cut
    );
    // The observer sees etcd's changes in revision order: the old key's
    // expiry, then r1's key. (r1's own event may be logged before the
    // observer's: different threads, so no order between those two.)
    assert!(t_expired <= t_new);
    assert_eq!(obs.get(&key("epoch")).map(|(v, _)| v), Some("2".into()));
    for n in [&r2, &far] {
        assert!(
            n.first(|e| matches!(e, Event::Elected { .. })).is_none(),
            "{} elected: {:?}",
            n.name,
            n.events()
        );
        n.wait_event("sees r1", |e| {
            *e == Event::Leader {
                node: "r1".into(),
                epoch: 2,
            }
        });
    }
    eprintln!(
        "partition: fenced after {:?}, lease expired after {:?} ({:?} later), r1 elected after {:?}",
        t_fence - t_cut,
        t_expired - t_cut,
        t_expired - t_fence,
        t_elected - t_cut
    );

    // Healed: the old primary (still reporting primary in epoch 1) sees the
    // new leader and does not retake the key.
    Net::heal(&p.ns);
    p.wait_event("sees r1 after healing", |e| {
        *e == Event::Leader {
            node: "r1".into(),
            epoch: 2,
        }
    });
    assert!(obs.first(&key("leader"), leader_is("p", 2)).is_none());
    // r1 kept the key all along: one election, epoch 2.
    assert_eq!(obs.get(&key("epoch")).map(|(v, _)| v), Some("2".into()));
    assert!(
        obs.changes()
            .iter()
            .filter(|(_, (k, v))| k == &key("leader") && v.is_some())
            .count()
            == 2,
        "leader key written more than twice (p, then r1): {:?}",
        obs.changes()
    );
}

/// With the maintenance key set, a dead primary's key expires and nobody is
/// elected; removing it lets the best replica win.
#[test]
fn maintenance_mode_blocks_elections() {
    let (mut net, ens, etcd, obs) = cluster(1);
    let cfg = config(&etcd.endpoints(), 4);
    let (pn, rn) = (net.node(1), net.node(2));
    let p = Node::start(
        &pn,
        "p",
        cfg.clone(),
        member(MemberRole::Primary, true, 0, 5, 3),
    );
    p.wait_event("holding", |e| *e == Event::Holding { epoch: 3 });
    let r = Node::start(&rn, "r", cfg, member(MemberRole::Replica, true, 0, 5, 3));
    obs.wait("r registered", &key("members/r"), |v| v.is_some());

    let dir = tempfile::tempdir().unwrap();
    let file = config_file(dir.path(), &etcd.endpoints());
    let file = file.display().to_string();
    let (code, text) = zrelay_cli(
        &ens,
        &["pause", "--config", &file, "--reason", "planned work"],
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        obs.get(&key("maintenance")).map(|(v, _)| v),
        Some("planned work".into())
    );
    p.kill();
    let t_gone = obs.wait("p's leader key expired", &key("leader"), |v| v.is_none());
    obs.wait("p's member key expired", &key("members/p"), |v| v.is_none());
    r.wait_event("sees no leader", |e| *e == Event::NoLeader);
    // Several election rounds (loop_wait 1 s) pass without an election.
    wait_for(Duration::from_secs(30), "4 s after expiry", || {
        (t_gone.elapsed() > Duration::from_secs(4)).then_some(())
    });
    assert!(
        obs.get(&key("leader")).is_none(),
        "elected during maintenance"
    );
    assert!(r.first(|e| matches!(e, Event::Elected { .. })).is_none());

    let t_resume = Instant::now();
    let (code, text) = zrelay_cli(&ens, &["status", "--config", &file]);
    assert!(code == 0 && text.contains("Maintenance mode: ON"), "{text}");
    assert!(
        text.contains("Leader: none") && text.contains("r (best)"),
        "{text}"
    );
    let (code, text) = zrelay_cli(&ens, &["resume", "--config", &file]);
    assert_eq!(code, 0, "{text}");
    let t_elected = r.wait_event("elected after resume", |e| {
        *e == Event::Elected { epoch: 4 }
    });
    assert!(t_elected > t_resume);
}

/// Killing the etcd raft leader of a three-member cluster: the primary keeps
/// its lease (no fence), nobody is elected, the leader key is the same key.
#[test]
fn etcd_leader_killed_causes_no_failover() {
    let (mut net, _ens, mut etcd, obs) = cluster(3);
    // ttl 10 s: a raft election on a loaded 2-core machine can take a few
    // seconds, during which no lease can be renewed; the leader must ride
    // that out (deadline 9 s after its last renewal).
    let (p, r) = primary_and_replica(&mut net, config(&etcd.endpoints(), 10), 5, 1);
    p.wait_event("holding", |e| *e == Event::Holding { epoch: 1 });
    r.wait_event("sees p", |e| {
        *e == Event::Leader {
            node: "p".into(),
            epoch: 1,
        }
    });
    let (_, rev) = obs.get(&key("leader")).expect("leader key");

    let old = etcd.leader();
    let t_kill = Instant::now();
    etcd.kill(old);
    let new = etcd.leader();
    assert_ne!(old, new);
    let t_new = Instant::now();
    // 1.5 ttls after the kill: still the same key, no fence, no election.
    wait_for(Duration::from_secs(40), "15 s after the kill", || {
        (t_kill.elapsed() > Duration::from_secs(15)).then_some(())
    });
    eprintln!("etcd leader re-elected {:?} after the kill", t_new - t_kill);
    assert_eq!(
        obs.get(&key("leader")).map(|(_, r)| r),
        Some(rev),
        "leader key replaced; p: {:?}; r: {:?}",
        p.events(),
        r.events()
    );
    assert!(
        p.first(|e| matches!(e, Event::Fence { .. })).is_none(),
        "spurious fence: {:?}",
        p.events()
    );
    assert!(r.first(|e| matches!(e, Event::Elected { .. })).is_none());
    assert!(
        obs.changes()
            .iter()
            .all(|(_, (k, v))| k != &key("leader") || v.is_some()),
        "the leader key was deleted"
    );
}

/// etcd with TLS and client-certificate auth: a node with a certificate of
/// the cluster CA registers and leads; one from another CA is refused and
/// its error shows in its view.
#[test]
fn etcd_over_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    for (dir, names) in [
        (certs.path(), &["etcd", "p"][..]),
        (other.path(), &["q"][..]),
    ] {
        zrelay::certgen::ensure_ca(dir).unwrap();
        for n in names {
            zrelay::certgen::issue_node(dir, n, 1).unwrap();
        }
    }
    let mut net = Net::new();
    let ens = net.node(ETCD_HOST);
    let etcd = Etcd::start_with(&ens, &Net::addr(ETCD_HOST), 1, Some(certs.path().into()));
    let obs = Observer::start(&etcd);
    let tls_cfg = |dir: &std::path::Path, name: &str| {
        let mut c = config(&etcd.endpoints(), 4);
        let f = |n: String| Some(dir.join(n));
        c.tls = Some(coordinator::EtcdTls {
            ca_file: certs.path().join("ca.pem"),
            cert_file: f(format!("{name}.pem")),
            key_file: f(format!("{name}-key.pem")),
            server_name: Some("etcd".into()),
        });
        c.check().unwrap();
        c
    };
    let (pn, qn) = (net.node(1), net.node(2));
    let p = Node::start(
        &pn,
        "p",
        tls_cfg(certs.path(), "p"),
        member(MemberRole::Primary, true, 0, 1, 1),
    );
    let q = Node::start(
        &qn,
        "q",
        tls_cfg(other.path(), "q"),
        member(MemberRole::Replica, true, 0, 1, 1),
    );
    p.wait_event("holding over TLS", |e| *e == Event::Holding { epoch: 1 });
    obs.wait("p registered", &key("members/p"), |v| v.is_some());
    let err = wait_for(Duration::from_secs(30), "q's TLS error", || {
        q.snapshot.borrow().last_error.clone()
    });
    assert!(
        obs.get(&key("members/q")).is_none(),
        "q registered with a foreign certificate"
    );
    assert!(q.events().is_empty(), "q saw the cluster: {:?}", q.events());
    eprintln!("q refused: {err}");
}

/// etcd v3 auth: a node with `username` + `password_file` registers and
/// leads within its permitted prefix; a wrong password is refused.
#[test]
fn etcd_with_user_and_password() {
    let mut net = Net::new();
    let ens = net.node(ETCD_HOST);
    let etcd = Etcd::start(&ens, &Net::addr(ETCD_HOST), 1);
    let eps = etcd.endpoints();
    let e2 = eps.clone();
    in_ns(&ens, move || async move {
        let mut c = Client::connect(e2, None).await.expect("connect");
        c.user_add("root", "rootpw", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.role_add("zr").await.unwrap();
        let perm = etcd_client::Permission::read_write(format!("/{CLUSTER}/")).with_prefix();
        c.role_grant_permission("zr", perm).await.unwrap();
        c.user_add("zr", "s3cret", None).await.unwrap();
        c.user_grant_role("zr", "zr").await.unwrap();
        c.auth_enable().await.unwrap();
    })
    .join()
    .expect("set up etcd auth");
    let dir = tempfile::tempdir().unwrap();
    let with_password = |pw: &str, file: &str| {
        let path = dir.path().join(file);
        std::fs::write(&path, format!("{pw}\n")).unwrap();
        let mut c = config(&eps, 4);
        c.username = Some("zr".into());
        c.password_file = Some(path);
        c.check().unwrap();
        c
    };
    let (pn, qn) = (net.node(1), net.node(2));
    let p = Node::start(
        &pn,
        "p",
        with_password("s3cret", "good"),
        member(MemberRole::Primary, true, 0, 1, 1),
    );
    let q = Node::start(
        &qn,
        "q",
        with_password("wrong", "bad"),
        member(MemberRole::Replica, true, 0, 1, 1),
    );
    p.wait_event("holding with auth", |e| *e == Event::Holding { epoch: 1 });
    wait_for(Duration::from_secs(30), "p sees itself registered", || {
        p.snapshot
            .borrow()
            .members
            .iter()
            .any(|m| m.name == "p")
            .then_some(())
    });
    let err = wait_for(Duration::from_secs(30), "q's auth error", || {
        q.snapshot.borrow().last_error.clone()
    });
    assert!(q.events().is_empty(), "q saw the cluster: {:?}", q.events());
    assert!(
        p.snapshot.borrow().members.iter().all(|m| m.name != "q"),
        "q registered with a wrong password"
    );
    eprintln!("q refused: {err}");
}
