//! A replicated pair on loopback: two real `runzeo` backends, replication
//! certificates from `zrelay cert`, a primary zrelay and a replica zrelay,
//! each with its admin HTTP port.
//!
//! Every process keeps its ports and data across stop/start/kill, so a test
//! can restart, kill or cut any of them and watch the pair converge.
//! Comparisons and workloads run `tests/py/repl.py` with the venv's Python.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::proc::Proc;
use super::{
    free_port, print_tail, temp_dir, wait_for, Addr, Enc, Py, Zeo, ZeoOpts, START_TIMEOUT,
};

/// Poll `cond` until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()));
}

// ------------------------------------------------------------- admin HTTP

/// `GET path` on an admin port with a raw HTTP/1.0 request: (status, body).
/// `None` when the port does not answer (process down).
pub fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|| panic!("no HTTP answer from {addr}{path}"))
}

/// `/status` as JSON.
pub fn status_of(addr: SocketAddr) -> Value {
    let (code, body) = http_get(addr, "/status");
    assert_eq!(code, 200, "/status answered {code}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

/// The value of one Prometheus sample (`name{labels}` exactly as written,
/// e.g. `zrelay_tls_handshake_failures_total{reason="unknown_ca"}`), 0 if
/// absent.
pub fn metric_value(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

// ----------------------------------------------------------- certificates

/// A directory made by `zrelay cert --dir DIR NAMES...`: `ca.pem` and
/// `NAME.pem` / `NAME-key.pem` for each node.
pub struct Certs {
    dir: TempDir,
}

impl Certs {
    pub fn new(names: &[&str]) -> Certs {
        let dir = temp_dir("zrelay-certs-");
        let out = Command::new(env!("CARGO_BIN_EXE_zrelay"))
            .arg("cert")
            .arg("--dir")
            .arg(dir.path())
            .args(names)
            .output()
            .expect("run zrelay cert");
        assert!(
            out.status.success(),
            "zrelay cert failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Certs { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// This node's certificate and key, trusting this directory's CA.
    pub fn tls(&self, name: &str) -> TlsFiles {
        TlsFiles {
            ca: self.ca(),
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
        }
    }
}

/// The `[replication.tls]` files of one node.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

// ------------------------------------------------------------ zrelay node

/// The replication role of a [`Node`] and what it needs.
#[derive(Clone, Debug)]
pub enum NodeRole {
    Primary {
        /// Empty: any certificate signed by the cluster CA.
        allowed_peers: Vec<String>,
    },
    Replica {
        upstream: SocketAddr,
        upstream_name: String,
    },
}

/// Everything a [`Node`]'s config file is made of.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub backend: Addr,
    pub role: NodeRole,
    pub tls: TlsFiles,
    /// Extra `[backend]` lines.
    pub backend_extra: String,
    /// Extra `[admin]` lines.
    pub admin_extra: String,
    /// Extra `[replication]` lines.
    pub replication_extra: String,
    /// Extra sections at the end of the file (`[door]`, `[cluster]`).
    pub extra: String,
}

/// One zrelay process with replication and admin HTTP, run as
/// `zrelay run --config FILE`; ports, config and log survive restarts.
pub struct Node {
    // First, so the process is killed before its temp dir is removed.
    proc: Option<Proc>,
    name: String,
    client: Addr,
    admin: SocketAddr,
    repl: Option<SocketAddr>,
    dir: TempDir,
    config: PathBuf,
    log: PathBuf,
    launches: u32,
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Node {
    /// Write the config file and choose the ports; not started yet.
    pub fn prepare(spec: &NodeSpec) -> Node {
        let dir = temp_dir(&format!("zrelay-{}-", spec.name));
        let client = Addr::local(free_port());
        let admin = local(free_port());
        let (role, repl) = match &spec.role {
            NodeRole::Primary { allowed_peers } => {
                let repl = local(free_port());
                let peers: Vec<String> = allowed_peers.iter().map(|p| format!("{p:?}")).collect();
                let peers = if peers.is_empty() {
                    String::new()
                } else {
                    format!("allowed_peers = [{}]\n", peers.join(", "))
                };
                (
                    format!("role = \"primary\"\nlisten = \"{repl}\"\n{peers}"),
                    Some(repl),
                )
            }
            NodeRole::Replica {
                upstream,
                upstream_name,
            } => (
                format!(
                    "role = \"replica\"\nupstream = \"{upstream}\"\n\
                     upstream_name = {upstream_name:?}\n"
                ),
                None,
            ),
        };
        let config = format!(
            "node_name = {name:?}\nlog_level = \"info,zrelay=debug,zrelay::monitor=info\"\n\
             data_dir = {data_dir:?}\n\n\
             [client]\nlisten = \"{client}\"\n\n\
             [backend]\naddress = \"{backend}\"\n{backend_extra}\n\n\
             [admin]\nlisten = \"{admin}\"\n{admin_extra}\n\n\
             [replication]\n{role}{replication_extra}\n\n\
             [replication.tls]\nca_file = {ca:?}\ncert_file = {cert:?}\nkey_file = {key:?}\n\n\
             {extra}\n",
            name = spec.name,
            data_dir = dir.path().join("state").display().to_string(),
            backend = spec.backend,
            backend_extra = spec.backend_extra,
            admin_extra = spec.admin_extra,
            replication_extra = spec.replication_extra,
            extra = spec.extra,
            ca = spec.tls.ca.display().to_string(),
            cert = spec.tls.cert.display().to_string(),
            key = spec.tls.key.display().to_string(),
        );
        let config_path = dir.path().join("zrelay.toml");
        fs::write(&config_path, config).expect("write zrelay.toml");
        let log = dir.path().join("zrelay.log");
        Node {
            proc: None,
            name: spec.name.clone(),
            client,
            admin,
            repl,
            dir,
            config: config_path,
            log,
            launches: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where ZEO clients connect.
    pub fn addr(&self) -> &Addr {
        &self.client
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The replication listener (primary only).
    pub fn repl(&self) -> SocketAddr {
        self.repl.expect("only a primary listens for replicas")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Everything zrelay wrote, over all launches.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_wait().is_none())
    }

    /// Start (again) on the same ports; waits until the client and admin
    /// ports accept.
    pub fn start(&mut self) {
        assert!(
            !self.is_running(),
            "zrelay {} is already running",
            self.name
        );
        self.launches += 1;
        let cmd = super::relay::zrelay_run(&self.config, self.dir.path());
        let what = format!("zrelay {}", self.name);
        self.proc = Some(Proc::spawn(&what, cmd, &self.log, self.launches));
        let (client, admin, log) = (self.client.clone(), self.admin, self.log.clone());
        let proc = self.proc.as_mut().expect("just spawned");
        wait_for(START_TIMEOUT, &format!("{what} to accept"), || {
            if let Some(status) = proc.try_wait() {
                print_tail(&what, &log);
                panic!("{what} exited during start-up: {status}");
            }
            client.connect(Duration::from_secs(1)).ok()?;
            TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
            Some(())
        });
    }

    /// SIGTERM and wait up to 15 s; panics if it hangs or exits non-zero.
    pub fn stop(&mut self) {
        let status = self
            .proc
            .take()
            .expect("zrelay running")
            .terminate(Duration::from_secs(15));
        assert!(
            status.success(),
            "zrelay {} exited with {status} after SIGTERM",
            self.name
        );
    }

    /// SIGHUP: reload the config file.
    pub fn hup(&mut self) {
        self.proc
            .as_mut()
            .expect("zrelay running")
            .signal(libc::SIGHUP);
    }

    /// SIGKILL (the stream is cut without a goodbye).
    /// SIGSTOP / SIGCONT the zrelay process (a stall, not a crash).
    pub fn pause(&mut self) {
        if let Some(p) = &mut self.proc {
            p.signal(libc::SIGSTOP);
        }
    }

    pub fn resume(&mut self) {
        if let Some(p) = &mut self.proc {
            p.signal(libc::SIGCONT);
        }
    }

    pub fn kill(&mut self) {
        self.proc.take().expect("zrelay running").kill();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// Still running and never panicked.
    pub fn assert_healthy(&mut self) {
        match self.proc.as_mut() {
            Some(p) => {
                if let Some(status) = p.try_wait() {
                    panic!("zrelay {} exited unexpectedly: {status}", self.name);
                }
            }
            None => panic!("zrelay {} is not started", self.name),
        }
        let log = self.log();
        assert!(
            !log.contains("panicked"),
            "zrelay {} panicked:\n{log}",
            self.name
        );
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    pub fn status(&self) -> Value {
        status_of(self.admin)
    }

    pub fn metrics(&self) -> String {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "/metrics answered {code}");
        body
    }

    /// `upstream.applied_tid` of a replica (hex), if any.
    pub fn applied_tid(&self) -> Option<String> {
        self.status()["upstream"]["applied_tid"]
            .as_str()
            .map(str::to_string)
    }

    /// `upstream.state` of a replica.
    pub fn upstream_state(&self) -> String {
        self.status()["upstream"]["state"]
            .as_str()
            .unwrap_or("<none>")
            .to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A paused process would not see its owner's SIGTERM.
        self.resume();
        if thread::panicking() {
            print_tail(&format!("zrelay {}", self.name), &self.log);
        }
    }
}

// ---------------------------------------------------------------- cluster

/// How a [`Cluster`] is built.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub enc: Enc,
    /// Start the replica zrelay at once (else: `cluster.replica.start()`).
    pub start_replica: bool,
    /// The primary's `allowed_peers`.
    pub allowed_peers: Vec<String>,
    /// Extra certificates made in the cluster's cert dir.
    pub extra_certs: Vec<String>,
    pub primary_replication: String,
    pub replica_replication: String,
    pub replica_admin: String,
    /// Extra sections for the primary's / the replica's config.
    pub primary_extra: String,
    pub replica_extra: String,
    /// Extra `[admin]` lines of the primary.
    pub primary_admin: String,
}

impl ClusterOpts {
    pub fn new(enc: Enc) -> ClusterOpts {
        ClusterOpts {
            enc,
            start_replica: true,
            allowed_peers: Vec::new(),
            extra_certs: Vec::new(),
            primary_replication: String::new(),
            replica_replication: String::new(),
            replica_admin: String::new(),
            primary_extra: String::new(),
            replica_extra: String::new(),
            primary_admin: String::new(),
        }
    }
}

/// Two runzeo, a primary zrelay in front of the first and a replica zrelay
/// in front of the second, streaming from the primary over mutual TLS.
pub struct Cluster {
    // Relays first: they stop before their backends.
    pub primary: Node,
    pub replica: Node,
    pub pzeo: Zeo,
    pub rzeo: Zeo,
    pub certs: Certs,
    enc: Enc,
}

/// Backend lines for every node: probe often, so /status follows quickly.
const BACKEND_EXTRA: &str = "probe_interval_ms = 200";

impl Cluster {
    pub fn start(enc: Enc) -> Cluster {
        Cluster::with(ClusterOpts::new(enc))
    }

    /// primary → replica → "replica2": the replica also listens for
    /// replicas and feeds a further one (its own runzeo, returned with it,
    /// started) from its backend.
    pub fn cascade(enc: Enc) -> (Cluster, Zeo, Node) {
        let mut opts = ClusterOpts::new(enc);
        let mid_repl = SocketAddr::from(([127, 0, 0, 1], free_port()));
        opts.replica_replication = format!("listen = \"{mid_repl}\"\n");
        opts.extra_certs = vec!["replica2".into()];
        let c = Cluster::with(opts);
        let zeo2 = Zeo::start(enc, ZeoOpts::default());
        let mut leaf = Node::prepare(&NodeSpec {
            name: "replica2".into(),
            backend: zeo2.addr().clone(),
            role: NodeRole::Replica {
                upstream: mid_repl,
                upstream_name: "replica".into(),
            },
            tls: c.certs.tls("replica2"),
            backend_extra: "probe_interval_ms = 200".into(),
            admin_extra: String::new(),
            replication_extra: String::new(),
            extra: String::new(),
        });
        leaf.start();
        (c, zeo2, leaf)
    }

    pub fn with(opts: ClusterOpts) -> Cluster {
        let mut names = vec!["primary", "replica"];
        names.extend(opts.extra_certs.iter().map(String::as_str));
        let certs = Certs::new(&names);
        let (pzeo, rzeo) = thread::scope(|s| {
            let p = s.spawn(|| Zeo::start(opts.enc, ZeoOpts::default()));
            let r = Zeo::start(opts.enc, ZeoOpts::default());
            (p.join().expect("start primary runzeo"), r)
        });
        let mut primary = Node::prepare(&NodeSpec {
            name: "primary".into(),
            backend: pzeo.addr().clone(),
            role: NodeRole::Primary {
                allowed_peers: opts.allowed_peers.clone(),
            },
            tls: certs.tls("primary"),
            backend_extra: BACKEND_EXTRA.into(),
            admin_extra: opts.primary_admin.clone(),
            replication_extra: opts.primary_replication.clone(),
            extra: opts.primary_extra.clone(),
        });
        primary.start();
        let mut replica = Node::prepare(&NodeSpec {
            name: "replica".into(),
            backend: rzeo.addr().clone(),
            role: NodeRole::Replica {
                upstream: primary.repl(),
                upstream_name: "primary".into(),
            },
            tls: certs.tls("replica"),
            backend_extra: BACKEND_EXTRA.into(),
            admin_extra: opts.replica_admin.clone(),
            replication_extra: opts.replica_replication.clone(),
            extra: opts.replica_extra.clone(),
        });
        if opts.start_replica {
            replica.start();
        }
        Cluster {
            primary,
            replica,
            pzeo,
            rzeo,
            certs,
            enc: opts.enc,
        }
    }

    pub fn enc(&self) -> Enc {
        self.enc
    }

    /// Another replica of this primary with its own (empty) runzeo, started.
    pub fn extra_replica(&self, name: &str, tls: TlsFiles) -> (Zeo, Node) {
        self.extra_replica_with(name, tls, "")
    }

    /// [`Cluster::extra_replica`] with extra config sections.
    pub fn extra_replica_with(&self, name: &str, tls: TlsFiles, extra: &str) -> (Zeo, Node) {
        let zeo = Zeo::start(self.enc, ZeoOpts::default());
        let mut node = Node::prepare(&NodeSpec {
            name: name.into(),
            backend: zeo.addr().clone(),
            role: NodeRole::Replica {
                upstream: self.primary.repl(),
                upstream_name: "primary".into(),
            },
            tls,
            backend_extra: BACKEND_EXTRA.into(),
            admin_extra: String::new(),
            replication_extra: String::new(),
            extra: extra.into(),
        });
        node.start();
        (zeo, node)
    }

    /// `repl.py ARGS...`, expecting clients to negotiate this cluster's
    /// encoding.
    pub fn py(&self, args: &[&str]) -> Py {
        repl_py(self.enc, args)
    }

    /// Run `repl.py ARGS...` to completion; its stdout.
    pub fn run_py(&self, args: &[&str]) -> String {
        let out = self.py(args).run();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The last tid of a ZEO server (a backend or a proxy), hex.
    pub fn last_tid(&self, addr: &Addr) -> String {
        let out = self.run_py(&["lasttid", &addr.to_string()]);
        value_of(&out, "last").to_string()
    }

    /// Wait until the replica has applied `tid` (hex) as its newest
    /// transaction.
    pub fn wait_applied(&self, tid: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let st = try_http_get(self.replica.admin(), "/status")
                .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok());
            let applied = st
                .as_ref()
                .and_then(|s| s["upstream"]["applied_tid"].as_str());
            if applied == Some(tid) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?}: replica to apply {tid}; its last /status: {}",
                st.map_or_else(|| "<no answer>".to_string(), |s| s.to_string())
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ask the primary backend for its last tid, wait until the replica
    /// applied it; returns it.
    pub fn wait_in_sync(&self, timeout: Duration) -> String {
        let last = self.last_tid(self.pzeo.addr());
        self.wait_applied(&last, timeout);
        last
    }

    /// Compare both storages transaction by transaction (FileStorage
    /// iterator over each Data.fs: tid, status, user, description,
    /// extension, every record's oid/data/data_txn; tids strictly
    /// increasing) and every blob file. Panics with the first difference.
    /// Returns the script's summary line.
    pub fn compare(&self) -> String {
        let out = self.run_py(&[
            "compare",
            &self.pzeo.dir().display().to_string(),
            &self.rzeo.dir().display().to_string(),
        ]);
        out.lines()
            .find(|l| l.starts_with("identical"))
            .unwrap_or_else(|| panic!("compare printed no summary: {out}"))
            .to_string()
    }

    /// sha256 of both Data.fs files.
    pub fn data_fs_digests(&self) -> (String, String) {
        (
            sha256_file(&self.pzeo.dir().join("Data.fs")),
            sha256_file(&self.rzeo.dir().join("Data.fs")),
        )
    }

    /// Both zrelays still run and never panicked.
    pub fn assert_healthy(&mut self) {
        self.primary.assert_healthy();
        self.replica.assert_healthy();
    }
}

/// `repl.py ARGS...` with ZRELAY_EXPECT_PROTOCOL set for `enc`.
pub fn repl_py(enc: Enc, args: &[&str]) -> Py {
    Py::new("repl.py").args(args).env(
        "ZRELAY_EXPECT_PROTOCOL",
        std::str::from_utf8(enc.protocol()).expect("ascii"),
    )
}

/// `KEY=VALUE` from a line of `key=value` words in `out` (first match).
pub fn value_of<'a>(out: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key}= in output:\n{out}"))
}

pub fn sha256_file(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
