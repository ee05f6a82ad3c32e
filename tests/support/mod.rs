//! Real-component test harness: `runzeo` from `<repo>/.venv`, the `zrelay`
//! binary, and ZEO client scenarios (`tests/py/*.py`) run with the venv's
//! Python.
//!
//! Every process is killed when its owner is dropped. Output goes to files
//! in a temp dir; when a test panics, the owners print the tails of their
//! logs, and failed Python runs put their output into the panic message.
//! All waits poll a condition with a deadline.
//!
//! - [`Zeo`] (zeo.rs): runzeo with a FileStorage and blob dir;
//! - [`Relay`] (relay.rs): `zrelay run --config FILE`;
//! - [`py`], [`scenario`], [`Py`] (py.rs): `tests/py` scripts, also
//!   interactive ones driven line by line;
//! - [`Raw`], [`send_raw`], [`encode_call`] (raw.rs): handcrafted traffic;
//! - [`netns::Net`] (netns.rs): private namespaces + bridge, partitions with
//!   nftables, code run inside a namespace ([`netns::in_ns`]); root only;
//! - [`etcd::Etcd`] (etcd.rs): real etcd members (one or three) in a namespace.
//! - [`hanodes::HaCluster`] (hanodes.rs): full nodes (runzeo + zrelay with
//!   `[coordinator]`) each in its own namespace, etcd beside them, clients
//!   inside the namespaces, split-brain checkers; root only.
#![allow(dead_code)]

pub mod etcd;
pub mod netns;
mod proc;
mod py;
mod raw;
mod relay;
mod zeo;

// Not every test crate uses every helper.
#[allow(unused_imports)]
pub use py::{py, scenario, scenario_cmd, Py, PyChild};
#[allow(unused_imports)]
pub use raw::{contains, encode_call, framed, send_raw, Raw, Val};
#[allow(unused_imports)]
pub use relay::{Relay, RelayOpts};
pub use zeo::{Zeo, ZeoOpts};

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server process may take to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit for one Python scenario run.
pub const PY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a closed connection may take to show EOF.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

const VENV_MISSING: &str = "run `make test` (or scripts/ensure-venv.sh) to create .venv";

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A program from `<repo>/.venv/bin`; panics (never skips) if it is missing.
pub fn venv_bin(name: &str) -> PathBuf {
    let path = repo().join(".venv").join("bin").join(name);
    assert!(
        path.exists(),
        "{} not found: {VENV_MISSING}",
        path.display()
    );
    path
}

/// A port that was free a moment ago (bound to 127.0.0.1:0, then released),
/// and never handed out before by this test process: the kernel may give
/// the same ephemeral port to two binds in a row once the first is released
/// (seen: a node's client and admin ports equal).
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no fresh free port in 1000 tries")
}

pub(crate) fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir")
}

/// Poll `cond` every few ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn print_tail(what: &str, path: &Path) {
    eprintln!(
        "---- {what}: last {LOG_TAIL_LINES} lines of {} ----\n{}\n---- end of {what} ----",
        path.display(),
        tail(path, LOG_TAIL_LINES)
    );
}

/// A ZEO address: TCP or an absolute unix socket path. `Display` gives the
/// form both zrelay's config and `scenarios.py` accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Addr {
    pub fn local(port: u16) -> Addr {
        Addr::Tcp(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    pub fn port(&self) -> u16 {
        match self {
            Addr::Tcp(a) => a.port(),
            Addr::Unix(p) => panic!("{} is a unix socket", p.display()),
        }
    }

    pub(crate) fn connect(&self, timeout: Duration) -> io::Result<Stream> {
        match self {
            Addr::Tcp(a) => TcpStream::connect_timeout(a, timeout).map(Stream::Tcp),
            Addr::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

/// The encoding a ZEO server offers (`msgpack true|false` in zeo.conf).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enc {
    Pickle,
    Msgpack,
}

impl Enc {
    /// The protocol string of the server's offer and the client's answer.
    pub fn protocol(self) -> &'static [u8] {
        match self {
            Enc::Pickle => b"Z5",
            Enc::Msgpack => b"M5",
        }
    }
}
pub mod cluster;
pub mod hanodes;
pub mod ops;
