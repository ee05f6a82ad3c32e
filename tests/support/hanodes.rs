//! Full nodes in network namespaces, for partition tests: each node is a
//! real `runzeo` + a `zrelay` with `[coordinator]`, alone in its namespace
//! on a private bridge ([`Net`]), with etcd members in a namespace of their
//! own. Faults are real: a node is cut off the bridge with nftables
//! ([`HaCluster::isolate`]), processes are SIGKILLed, etcd members killed.
//!
//! Inside node `k`'s namespace (address 10.77.0.`k+1`): runzeo on the
//! namespace's own loopback (127.0.0.1:8200, reachable by nothing else),
//! zrelay's client port (the door) on 10.77.0.`k+1`:8100, admin HTTP on
//! :8300, replication on :8400. Every node has a replication listener (any
//! may become primary); node 0 starts as primary, the others follow it.
//! ZODB clients run inside a node's namespace ([`HaCluster::py`]), so an
//! isolated node's own clients still reach its door, as on a real host.
//!
//! Checkers: [`AckLog`] collects writers' acknowledgements (`ACK <tid>
//! <unix time>` lines of `tests/py/hanet.py writer`) and proves no tid was
//! acknowledged twice; [`history`] lists a backend's transactions (tid +
//! digest) from its `Data.fs`, [`check_no_split_brain`] compares two
//! histories and the acknowledgements for overlapping commit intervals.

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::cluster::{metric_value, try_http_get, value_of, Certs};
use super::etcd::Etcd;
use super::netns::{in_ns_blocking, Net};
use super::proc::Proc;
use super::{print_tail, temp_dir, venv_bin, wait_for, Py, PyChild, START_TIMEOUT};

pub const ETCD_HOST: u8 = 100;
pub const CLUSTER: &str = "ha";
pub const CLIENT_PORT: u16 = 8100;
pub const ADMIN_PORT: u16 = 8300;
pub const REPL_PORT: u16 = 8400;
/// runzeo inside each node's namespace (its own loopback).
pub const BACKEND: &str = "127.0.0.1:8200";

/// How an [`HaCluster`] is built.
#[derive(Clone, Debug)]
pub struct HaOpts {
    pub nodes: usize,
    pub etcd_members: usize,
    /// Lease TTL (loop_wait 1 s, fence margin 1 s).
    pub ttl_secs: u64,
    /// `ack_mode = "semi-sync"` (`ack_level = "received"`, spool under the
    /// node's data_dir) instead of async.
    pub semi_sync: bool,
    /// Extra `[replication]` lines per node (index = node).
    pub replication_extra: Vec<String>,
}

impl Default for HaOpts {
    fn default() -> Self {
        HaOpts {
            nodes: 3,
            etcd_members: 1,
            ttl_secs: 4,
            semi_sync: false,
            replication_extra: Vec::new(),
        }
    }
}

/// One node: runzeo + zrelay in namespace `ns`.
pub struct HaNode {
    // Processes first: killed before their directories go.
    relay: Option<Proc>,
    zeo: Option<Proc>,
    pub name: String,
    pub host: u8,
    pub ns: String,
    dir: TempDir,
    launches: u32,
}

impl HaNode {
    pub fn ip(&self) -> String {
        Net::addr(self.host)
    }

    /// Where ZEO clients connect (the node's door).
    pub fn door(&self) -> String {
        format!("{}:{CLIENT_PORT}", self.ip())
    }

    pub fn admin(&self) -> SocketAddr {
        format!("{}:{ADMIN_PORT}", self.ip()).parse().expect("addr")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("zrelay.toml")
    }

    pub fn zeo_dir(&self) -> PathBuf {
        self.dir.path().join("zeo")
    }

    fn relay_log(&self) -> PathBuf {
        self.dir.path().join("zrelay.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.relay_log()).unwrap_or_default()
    }

    /// `GET path` on the admin port, from inside the node's namespace (so it
    /// answers while the node is isolated); None while it does not answer.
    pub fn try_get(&self, path: &str) -> Option<(u16, String)> {
        let (addr, path) = (self.admin(), path.to_string());
        in_ns_blocking(&self.ns, move || try_http_get(addr, &path))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path)
            .unwrap_or_else(|| panic!("{}: no answer on {path}", self.name))
    }

    pub fn status(&self) -> Value {
        let (code, body) = self.get("/status");
        assert_eq!(code, 200, "{}: /status answered {code}: {body}", self.name);
        serde_json::from_str(&body).expect("/status JSON")
    }

    pub fn try_status(&self) -> Option<Value> {
        self.try_get("/status")
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
    }

    pub fn metric(&self, sample: &str) -> f64 {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200);
        metric_value(&body, sample)
    }

    /// `role_state.role` in /status ("primary", "replica", "fenced", ...).
    pub fn role_kind(&self) -> String {
        self.try_status()
            .and_then(|s| s["role_state"]["role"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Restart zrelay and runzeo after a kill (same data, same ports).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// Stop both (SIGKILL; the data stays) for offline work such as rewind.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Unix time (seconds) of the first line of zrelay's log that contains
    /// every one of `needles`, after `after` (Unix seconds).
    pub fn log_time(&self, needles: &[&str], after: f64) -> Option<f64> {
        self.log().lines().find_map(|l| {
            if !needles.iter().all(|n| l.contains(n)) {
                return None;
            }
            let ts = l.split_whitespace().next()?;
            let t = chrono_like_unix(ts)?;
            (t > after).then_some(t)
        })
    }

    /// `role` in /status ("primary", "replica", ...).
    pub fn role(&self) -> String {
        self.try_status()
            .and_then(|s| s["role"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    fn start_zeo(&mut self) {
        let mut cmd = Net::cmd(&self.ns, &venv_bin("runzeo").display().to_string());
        cmd.arg("-C")
            .arg(self.zeo_dir().join("zeo.conf"))
            .current_dir(self.zeo_dir());
        let log = self.zeo_dir().join("runzeo.log");
        self.zeo = Some(Proc::spawn(
            &format!("runzeo {}", self.name),
            cmd,
            &log,
            self.launches,
        ));
        let ns = self.ns.clone();
        wait_for(START_TIMEOUT, "runzeo to listen", || {
            in_ns_blocking(&ns, || {
                std::net::TcpStream::connect_timeout(
                    &BACKEND.parse().expect("addr"),
                    Duration::from_secs(1),
                )
                .ok()
            })
        });
    }

    fn start_relay(&mut self) {
        let mut cmd = Net::cmd(&self.ns, env!("CARGO_BIN_EXE_zrelay"));
        cmd.arg("run")
            .arg("--config")
            .arg(self.config_path())
            .current_dir(self.dir.path())
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1");
        let what = format!("zrelay {}", self.name);
        self.relay = Some(Proc::spawn(&what, cmd, &self.relay_log(), self.launches));
        let log = self.relay_log();
        let admin = self.admin();
        wait_for(START_TIMEOUT, &format!("{what} to answer"), || {
            if let Some(st) = self.relay.as_mut().and_then(|p| p.try_wait()) {
                print_tail(&what, &log);
                panic!("{what} exited during start-up: {st}");
            }
            let ns = self.ns.clone();
            in_ns_blocking(&ns, move || try_http_get(admin, "/liveness"))
        });
    }

    /// Start runzeo and zrelay (again, on the same data).
    pub fn start(&mut self) {
        self.launches += 1;
        if self.zeo.is_none() {
            self.start_zeo();
        }
        self.start_relay();
    }

    /// SIGKILL both processes (a host crash).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.relay.take() {
            p.kill();
        }
        if let Some(mut p) = self.zeo.take() {
            p.kill();
        }
    }

    /// zrelay still running and never panicked.
    pub fn assert_healthy(&mut self) {
        let st = self.relay.as_mut().and_then(|p| p.try_wait());
        assert!(st.is_none(), "zrelay {} exited: {st:?}", self.name);
        assert!(
            !self.log().contains("panicked"),
            "zrelay {} panicked:\n{}",
            self.name,
            self.log()
        );
    }
}

impl Drop for HaNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The whole log outlives the temp dir, for a post-mortem.
            let keep = std::env::temp_dir().join(format!("zrelay-ha-failed-{}.log", self.name));
            if fs::copy(self.relay_log(), &keep).is_ok() {
                eprintln!("zrelay {}: full log kept in {}", self.name, keep.display());
            }
            print_tail(&format!("zrelay {}", self.name), &self.relay_log());
            print_tail(
                &format!("runzeo {}", self.name),
                &self.zeo_dir().join("runzeo.log"),
            );
        }
    }
}

/// Nodes + etcd on one private bridge. Dropped in field order: nodes, etcd,
/// certificates, then the namespaces.
pub struct HaCluster {
    pub nodes: Vec<HaNode>,
    pub etcd: Etcd,
    pub certs: Certs,
    pub opts: HaOpts,
    pub net: Net,
}

impl HaCluster {
    /// Start etcd, then every node (node 0 as primary); returns once every
    /// replica's stream is live.
    pub fn start(opts: HaOpts) -> HaCluster {
        let mut net = Net::new();
        let ens = net.node(ETCD_HOST);
        let etcd = Etcd::start(&ens, &Net::addr(ETCD_HOST), opts.etcd_members);
        let names: Vec<String> = (1..=opts.nodes).map(|k| format!("n{k}")).collect();
        let certs = Certs::new(&names.iter().map(String::as_str).collect::<Vec<_>>());
        let mut nodes = Vec::new();
        for (k, name) in names.iter().enumerate() {
            let host = u8::try_from(k + 1).expect("few nodes");
            let ns = net.node(host);
            let dir = temp_dir(&format!("zrelay-ha-{name}-"));
            let node = HaNode {
                relay: None,
                zeo: None,
                name: name.clone(),
                host,
                ns,
                dir,
                launches: 0,
            };
            write_configs(&node, k, &names, &certs, &etcd.endpoints(), &opts);
            nodes.push(node);
        }
        let mut c = HaCluster {
            nodes,
            etcd,
            certs,
            opts,
            net,
        };
        for n in &mut c.nodes {
            n.start();
        }
        for k in 1..c.nodes.len() {
            c.wait_live(k, Duration::from_secs(60));
        }
        c
    }

    /// Wait until replica `k`'s stream is live.
    pub fn wait_live(&self, k: usize, timeout: Duration) {
        let n = &self.nodes[k];
        wait_for(timeout, &format!("{} live", n.name), || {
            let st = n.try_status()?;
            (st["upstream"]["state"] == "live").then_some(())
        });
    }

    /// `python tests/py/SCRIPT` inside node `k`'s namespace.
    pub fn py(&self, k: usize, script: &str) -> Py {
        Py::new(script).netns(&self.nodes[k].ns)
    }

    /// Cut node `k` off the bridge (etcd and every other node).
    pub fn isolate(&self, k: usize) {
        Net::isolate(&self.nodes[k].ns);
    }

    pub fn rejoin(&self, k: usize) {
        Net::rejoin(&self.nodes[k].ns);
    }

    /// Limits the replication stream node `k` receives (from any primary's
    /// replication port) to `rate` (see [`Net::limit_into`]).
    pub fn limit_stream_into(&self, k: usize, rate: Option<&str>) {
        self.net.limit_into(self.nodes[k].host, REPL_PORT, rate);
    }

    /// Every door, comma-separated (for the Python scripts).
    pub fn doors(&self) -> String {
        self.nodes
            .iter()
            .map(HaNode::door)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the node whose /status says primary and not fenced.
    pub fn primary(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|k| {
            self.nodes[*k]
                .try_status()
                .is_some_and(|s| s["role"] == "primary" && s["fenced"] != true)
        })
    }

    /// The backend's newest tid on node `k` (hex), asked inside its namespace.
    pub fn backend_last_tid(&self, k: usize) -> String {
        let out = self.py(k, "hanet.py").args(&["lasttid", BACKEND]).run();
        value_of(&String::from_utf8_lossy(&out.stdout), "last").to_string()
    }

    /// Node `k`'s config file with `[coordinator]`, for `zrelay status` etc.
    pub fn zrelay_cli(&self, k: usize, args: &[&str]) -> (i32, String) {
        super::ops::cli_output(Net::cmd(&self.nodes[k].ns, env!("CARGO_BIN_EXE_zrelay")).args(args))
    }
}

fn write_configs(
    node: &HaNode,
    k: usize,
    names: &[String],
    certs: &Certs,
    endpoints: &[String],
    opts: &HaOpts,
) {
    let zdir = node.zeo_dir();
    fs::create_dir_all(&zdir).expect("zeo dir");
    fs::write(
        zdir.join("zeo.conf"),
        format!(
            "<zeo>\n  address {BACKEND}\n</zeo>\n\
             <filestorage 1>\n  path {}\n  blob-dir {}\n</filestorage>\n\
             <eventlog>\n  level INFO\n  <logfile>\n    path STDERR\n    \
             format %(asctime)s %(levelname)s %(name)s %(message)s\n  </logfile>\n</eventlog>\n",
            zdir.join("Data.fs").display(),
            zdir.join("blobs").display(),
        ),
    )
    .expect("write zeo.conf");
    let ip = node.ip();
    let role = if k == 0 {
        "role = \"primary\"\n".to_string()
    } else {
        format!(
            "role = \"replica\"\nupstream = \"{}:{REPL_PORT}\"\nupstream_name = \"{}\"\n",
            Net::addr(1),
            names[0]
        )
    };
    let ack = if opts.semi_sync {
        // The ack timeout exceeds the lease ttl: a partitioned primary
        // fences (at ttl - margin) before it could degrade to async and
        // acknowledge commits no replica has.
        "ack_mode = \"semi-sync\"\nack_level = \"received\"\nack_timeout_ms = 15000\n"
    } else {
        ""
    };
    let book: String = names
        .iter()
        .enumerate()
        .map(|(j, n)| {
            let a = Net::addr(u8::try_from(j + 1).expect("few nodes"));
            format!(
                "[[cluster.nodes]]\nname = \"{n}\"\nclient = \"{a}:{CLIENT_PORT}\"\n\
                 replication = \"{a}:{REPL_PORT}\"\n"
            )
        })
        .collect();
    let tls = certs.tls(&node.name);
    let state = node.dir().join("state");
    let config = format!(
        "node_name = \"{name}\"\ndata_dir = {state:?}\n\
         log_level = \"info,zrelay=debug,zrelay::monitor=info\"\n\n\
         [client]\nlisten = \"{ip}:{CLIENT_PORT}\"\n\n\
         [backend]\naddress = \"{BACKEND}\"\nprobe_interval_ms = 200\n\n\
         [admin]\nlisten = \"{ip}:{ADMIN_PORT}\"\n\n\
         [replication]\n{role}listen = \"{ip}:{REPL_PORT}\"\n\
         heartbeat_interval_ms = 200\nstale_after_ms = 2000\n\
         {ack}{extra}\n\n\
         [replication.tls]\nca_file = {ca:?}\ncert_file = {cert:?}\nkey_file = {key:?}\n\n\
         {book}\n\
         [coordinator]\nkind = \"etcd\"\nendpoints = {endpoints:?}\nname = \"{CLUSTER}\"\n\
         ttl_secs = {ttl}\nloop_wait_secs = 1\nfence_margin_ms = 1000\n",
        name = node.name,
        state = state.display().to_string(),
        extra = opts.replication_extra.get(k).cloned().unwrap_or_default(),
        ca = tls.ca.display().to_string(),
        cert = tls.cert.display().to_string(),
        key = tls.key.display().to_string(),
        ttl = opts.ttl_secs,
    );
    fs::write(node.config_path(), config).expect("write zrelay.toml");
}

/// Unix seconds of an RFC 3339 UTC timestamp as zrelay logs it
/// (`2026-11-30T11:07:20.931046Z`). Hand-written: the test crate has no
/// date library, and this is the one format it needs.
fn chrono_like_unix(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// Now, as Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

// ---------------------------------------------------------------- checkers

/// One acknowledged commit as a writer saw it.
#[derive(Clone, Debug)]
pub struct Ack {
    pub writer: usize,
    pub tid: String,
    /// Wall-clock time (Unix seconds) when `commit()` returned.
    pub at: f64,
}

/// Acknowledgements from `hanet.py writer` outputs.
#[derive(Default, Debug)]
pub struct AckLog {
    pub acks: Vec<Ack>,
}

impl AckLog {
    /// Parse the `ACK <tid> <time>` lines of writer `w`'s stdout.
    pub fn add(&mut self, w: usize, stdout: &str) {
        for l in stdout.lines() {
            let mut it = l.split_whitespace();
            if it.next() != Some("ACK") {
                continue;
            }
            let tid = it.next().expect("tid").to_string();
            let at = it.next().expect("time").parse().expect("float time");
            self.acks.push(Ack { writer: w, tid, at });
        }
    }

    /// Panics if two acknowledgements carry the same tid.
    pub fn assert_unique_tids(&self) {
        let mut seen: HashMap<&str, &Ack> = HashMap::new();
        for a in &self.acks {
            if let Some(b) = seen.insert(&a.tid, a) {
                panic!("tid {} acknowledged twice: {a:?} and {b:?}", a.tid);
            }
        }
    }
}

/// A backend's transactions in commit order: (tid hex, digest hex), read
/// from its `Data.fs` with the FileStorage iterator (`hanet.py history`).
pub fn history(data_fs: &Path) -> Vec<(String, String)> {
    let out = Py::new("hanet.py")
        .args(&["history", &data_fs.display().to_string()])
        .run();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (t, d) = l.strip_prefix("T ")?.split_once(' ')?;
            Some((t.to_string(), d.to_string()))
        })
        .collect()
}

/// What [`check_no_split_brain`] found.
#[derive(Debug)]
pub struct SplitCheck {
    /// Length of the common prefix of both histories.
    pub common: usize,
    /// Transactions only the old primary has (after the common prefix).
    pub old_only: Vec<String>,
    /// Transactions the new primary committed after the common prefix.
    pub new_only: Vec<String>,
    /// Newest acknowledgement of a commit of the old primary, oldest of the
    /// new one (Unix seconds).
    pub last_old_ack: Option<f64>,
    pub first_new_ack: Option<f64>,
    /// Acknowledged commits of the old primary that never reached the new
    /// one (async replication only; always empty when `lossless`).
    pub lost: Vec<Ack>,
}

/// Old primary's history `old` (taken before it rejoined) and the new
/// primary's `new`: no tid names two different transactions; the old
/// primary's own commits all precede the new primary's first one (tids are
/// commit timestamps from one host clock); and every acknowledgement of an
/// old-primary commit came before the first of a new-primary commit (no
/// overlapping commit intervals as the clients saw them). Also, with
/// `lossless` (semi-sync), every acknowledged tid is in `new`; without
/// (async), an acknowledged tid missing there must be in the old primary's
/// own tail (`SplitCheck::lost`), never nowhere.
pub fn check_no_split_brain(
    old: &[(String, String)],
    new: &[(String, String)],
    acks: &AckLog,
    lossless: bool,
) -> SplitCheck {
    let common = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let new_digest: HashMap<&str, &str> =
        new.iter().map(|(t, d)| (t.as_str(), d.as_str())).collect();
    for (t, d) in old {
        if let Some(nd) = new_digest.get(t.as_str()) {
            assert_eq!(
                d, nd,
                "tid {t} names two different transactions on the old and the new primary"
            );
        }
    }
    let old_only: Vec<String> = old[common..].iter().map(|(t, _)| t.clone()).collect();
    let new_only: Vec<String> = new[common..].iter().map(|(t, _)| t.clone()).collect();
    if let (Some(o), Some(n)) = (old.last(), new_only.first()) {
        assert!(
            o.0 < *n,
            "the old primary committed {} after the new primary's first commit {n}",
            o.0
        );
    }
    acks.assert_unique_tids();
    let in_new: std::collections::HashSet<&str> = new.iter().map(|(t, _)| t.as_str()).collect();
    let new_set: std::collections::HashSet<&str> = new_only.iter().map(String::as_str).collect();
    let old_tail: std::collections::HashSet<&str> = old_only.iter().map(String::as_str).collect();
    let mut last_old_ack: Option<f64> = None;
    let mut first_new_ack: Option<f64> = None;
    let mut lost = Vec::new();
    for a in &acks.acks {
        if !lossless && !in_new.contains(a.tid.as_str()) {
            assert!(
                old_tail.contains(a.tid.as_str()),
                "acknowledged commit {} (writer {}) is on neither primary",
                a.tid,
                a.writer
            );
            lost.push(a.clone());
            last_old_ack = Some(last_old_ack.map_or(a.at, |l| l.max(a.at)));
            continue;
        }
        assert!(
            in_new.contains(a.tid.as_str()),
            "acknowledged commit {} (writer {}) is missing on the new primary",
            a.tid,
            a.writer
        );
        if new_set.contains(a.tid.as_str()) {
            first_new_ack = Some(first_new_ack.map_or(a.at, |f| f.min(a.at)));
        } else {
            last_old_ack = Some(last_old_ack.map_or(a.at, |l| l.max(a.at)));
        }
    }
    if let (Some(o), Some(n)) = (last_old_ack, first_new_ack) {
        assert!(
            o < n,
            "commit intervals overlap: the old primary acknowledged a commit at {o:.3}, \
             the new one already at {n:.3}"
        );
    }
    SplitCheck {
        common,
        old_only,
        new_only,
        last_old_ack,
        first_new_ack,
        lost,
    }
}

/// A writer committing through `door` inside node `k`'s namespace
/// (`hanet.py writer`); `stop_writer` ends it and returns its stdout.
pub fn start_writer(c: &HaCluster, k: usize, id: usize, n: usize) -> PyChild {
    let mut w = c
        .py(k, "hanet.py")
        .args(&[
            "writer",
            &c.nodes[k].door(),
            &id.to_string(),
            &n.to_string(),
        ])
        .timeout(Duration::from_secs(400))
        .spawn();
    w.expect_line("READY", Duration::from_secs(90));
    w
}

pub fn stop_writer(mut w: PyChild) -> String {
    w.send_line("stop");
    String::from_utf8_lossy(&w.finish().stdout).into_owned()
}
