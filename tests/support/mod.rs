//! Real-component test harness: `runzeo` from `<repo>/.venv`, the `zrelay`
//! binary, and ZEO client scenarios (`tests/py/*.py`) run with the venv's
//! Python.
//!
//! Every process is killed when its owner is dropped. Output goes to files
//! in a temp dir; when a test panics, the owners print the tails of their
//! logs, and failed Python runs put their output into the panic message.
//! All waits poll a condition with a deadline.
#![allow(dead_code)]

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
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

/// A port that was free a moment ago (bound to 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn temp_dir(prefix: &str) -> TempDir {
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

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn print_tail(what: &str, path: &Path) {
    eprintln!(
        "---- {what}: last {LOG_TAIL_LINES} lines of {} ----\n{}\n---- end of {what} ----",
        path.display(),
        tail(path, LOG_TAIL_LINES)
    );
}

// ------------------------------------------------------------ addresses --

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

    fn connect(&self, timeout: Duration) -> io::Result<Stream> {
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

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
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

// ------------------------------------------------------------ processes --

/// A child process whose stdout and stderr append to one log file.
struct Proc {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: &Path, launch: u32) -> Proc {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log file");
        writeln!(file, "==== harness: launch {launch} of {name} ====").expect("write log");
        let err = file.try_clone().expect("clone log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            exited: None,
        }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    fn signal(&mut self, sig: i32) {
        if self.try_wait().is_none() {
            // SAFETY: kill(2) on the pid of our own child, which has not
            // been reaped yet (try_wait said so), so the pid is still ours.
            let rc = unsafe { libc::kill(self.pid(), sig) };
            assert_eq!(rc, 0, "kill({}, {sig}) failed", self.name);
        }
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_timeout(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{} survived SIGKILL", self.name))
    }

    /// SIGTERM, then wait up to `timeout`; SIGKILL and panic if it hangs.
    fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_timeout(timeout) {
            Some(status) => status,
            None => {
                self.kill();
                panic!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ------------------------------------------------------------ encodings --

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

// ------------------------------------------------------------------ zeo --

#[derive(Clone, Debug, Default)]
pub struct ZeoOpts {
    /// Listen on a unix socket in the temp dir instead of 127.0.0.1:PORT.
    pub unix_socket: bool,
    /// Extra lines for the `<zeo>` section.
    pub extra_zeo: String,
}

/// A real `runzeo` serving FileStorage "1" (with a blob dir) from a temp dir.
pub struct Zeo {
    // First, so the process is killed before its temp dir is removed.
    proc: Option<Proc>,
    enc: Enc,
    addr: Addr,
    dir: TempDir,
    log: PathBuf,
    launches: u32,
}

impl Zeo {
    /// Start a server and wait until it answers the handshake.
    pub fn start(enc: Enc, opts: ZeoOpts) -> Zeo {
        let mut zeo = Zeo::prepare(enc, opts);
        zeo.start_again();
        zeo
    }

    /// Write the config and choose the address, but do not start it yet.
    pub fn prepare(enc: Enc, opts: ZeoOpts) -> Zeo {
        venv_bin("runzeo");
        let dir = temp_dir("zrelay-zeo-");
        let addr = if opts.unix_socket {
            Addr::Unix(dir.path().join("zeo.sock"))
        } else {
            Addr::local(free_port())
        };
        let conf = format!(
            "<zeo>\n  address {addr}\n  msgpack {msgpack}\n{extra}\n</zeo>\n\
             <filestorage 1>\n  path {data}\n  blob-dir {blobs}\n</filestorage>\n\
             <eventlog>\n  level INFO\n  <logfile>\n    path STDERR\n    \
             format %(asctime)s %(levelname)s %(name)s %(message)s\n  </logfile>\n</eventlog>\n",
            msgpack = enc == Enc::Msgpack,
            extra = opts.extra_zeo,
            data = dir.path().join("Data.fs").display(),
            blobs = dir.path().join("blobs").display(),
        );
        fs::write(dir.path().join("zeo.conf"), conf).expect("write zeo.conf");
        let log = dir.path().join("runzeo.log");
        Zeo {
            enc,
            addr,
            dir,
            log,
            proc: None,
            launches: 0,
        }
    }

    pub fn addr(&self) -> &Addr {
        &self.addr
    }

    pub fn enc(&self) -> Enc {
        self.enc
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_wait().is_none())
    }

    /// Start (again) on the same address and data file.
    pub fn start_again(&mut self) {
        assert!(!self.is_running(), "runzeo is already running");
        self.launches += 1;
        let mut cmd = Command::new(venv_bin("runzeo"));
        cmd.arg("-C")
            .arg(self.dir.path().join("zeo.conf"))
            .current_dir(self.dir.path());
        self.proc = Some(Proc::spawn("runzeo", cmd, &self.log, self.launches));
        let want = self.enc.protocol();
        let (addr, log) = (self.addr.clone(), self.log.clone());
        let proc = self.proc.as_mut().expect("just spawned");
        wait_for(START_TIMEOUT, "runzeo to answer the handshake", || {
            if let Some(status) = proc.try_wait() {
                print_tail("runzeo", &log);
                panic!("runzeo exited during start-up: {status}");
            }
            let mut s = addr.connect(Duration::from_secs(1)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            let offer = read_frame_from(&mut s).ok()??;
            assert_eq!(offer, want, "runzeo offered an unexpected protocol");
            Some(())
        });
    }

    /// SIGTERM and wait (SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
        if let Addr::Unix(path) = &self.addr {
            let _ = fs::remove_file(path);
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        if let Addr::Unix(path) = &self.addr {
            let _ = fs::remove_file(path);
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }
}

impl Drop for Zeo {
    fn drop(&mut self) {
        if thread::panicking() {
            print_tail(&format!("runzeo at {}", self.addr), &self.log);
        }
    }
}

// ---------------------------------------------------------------- relay --

/// Extra TOML lines for each part of the relay's config file.
#[derive(Clone, Debug, Default)]
pub struct RelayOpts {
    /// Top-level keys; `log_level` here replaces the harness's default.
    pub top: String,
    /// Extra `[client]` keys (besides `listen`).
    pub client: String,
    /// Extra `[backend]` keys (besides `address`).
    pub backend: String,
}

impl RelayOpts {
    pub fn client(lines: &str) -> RelayOpts {
        RelayOpts {
            client: lines.to_string(),
            ..RelayOpts::default()
        }
    }
}

/// The zrelay binary under test, run as `zrelay run --config FILE`.
pub struct Relay {
    // First, so the process is killed before its temp dir is removed.
    proc: Option<Proc>,
    addr: Addr,
    dir: TempDir,
    config: PathBuf,
    log: PathBuf,
    launches: u32,
}

impl Relay {
    /// Write the config, start zrelay and wait until its port accepts.
    pub fn start(backend: &Addr, opts: RelayOpts) -> Relay {
        let dir = temp_dir("zrelay-relay-");
        let addr = Addr::local(free_port());
        let log_level = if opts.top.contains("log_level") {
            ""
        } else {
            "log_level = \"info,zrelay=debug\"\n"
        };
        let config = format!(
            "node_name = \"test\"\n{log_level}{top}\n\
             [client]\nlisten = \"{addr}\"\n{client}\n\
             [backend]\naddress = \"{backend}\"\n{backend_extra}\n",
            top = opts.top,
            client = opts.client,
            backend_extra = opts.backend,
        );
        let config_path = dir.path().join("zrelay.toml");
        fs::write(&config_path, config).expect("write zrelay.toml");
        let log = dir.path().join("zrelay.log");
        let mut relay = Relay {
            addr,
            dir,
            config: config_path,
            log,
            proc: None,
            launches: 0,
        };
        relay.start_again();
        relay
    }

    pub fn addr(&self) -> &Addr {
        &self.addr
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything zrelay wrote to stdout/stderr, over all launches.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_wait().is_none())
    }

    pub fn assert_running(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            if let Some(status) = p.try_wait() {
                panic!("zrelay exited unexpectedly: {status}");
            }
        } else {
            panic!("zrelay is not started");
        }
    }

    /// Start (again) on the same port with the same config.
    pub fn start_again(&mut self) {
        assert!(!self.is_running(), "zrelay is already running");
        self.launches += 1;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zrelay"));
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1");
        self.proc = Some(Proc::spawn("zrelay", cmd, &self.log, self.launches));
        let addr = self.addr.clone();
        let proc = self.proc.as_mut().expect("just spawned");
        wait_for(START_TIMEOUT, "zrelay to accept connections", || {
            if let Some(status) = proc.try_wait() {
                panic!("zrelay exited during start-up: {status}");
            }
            addr.connect(Duration::from_secs(1)).ok().map(|_| ())
        });
    }

    /// Send SIGTERM without waiting.
    pub fn sigterm(&mut self) {
        self.proc
            .as_mut()
            .expect("zrelay running")
            .signal(libc::SIGTERM);
    }

    /// Wait for zrelay to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = self
            .proc
            .as_mut()
            .expect("zrelay started")
            .wait_timeout(timeout);
        if status.is_some() {
            self.proc = None;
        }
        status
    }

    /// SIGTERM and wait up to 15 s; panics if it hangs or fails.
    pub fn stop(&mut self) {
        let status = self
            .proc
            .take()
            .expect("zrelay running")
            .terminate(Duration::from_secs(15));
        assert!(
            status.success(),
            "zrelay exited with {status} after SIGTERM"
        );
    }

    pub fn kill(&mut self) {
        self.proc.take().expect("zrelay running").kill();
    }

    /// Graceful stop, then start again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if thread::panicking() {
            print_tail(&format!("zrelay at {}", self.addr), &self.log);
        }
    }
}

// --------------------------------------------------------------- python --

/// One run of `.venv/bin/python tests/py/<script> ARGS...`.
pub struct Py {
    script: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Duration,
}

/// Run a script to completion; panics (with its output) unless it exits 0.
pub fn py(script: &str, args: &[&str]) -> Output {
    Py::new(script).args(args).run()
}

/// Run `scenarios.py NAME ADDRS...`, expecting the client to negotiate the
/// protocol of `enc`.
pub fn scenario(name: &str, enc: Enc, addrs: &[&Addr]) -> Output {
    scenario_cmd(name, enc, addrs).run()
}

pub fn scenario_cmd(name: &str, enc: Enc, addrs: &[&Addr]) -> Py {
    let mut py = Py::new("scenarios.py").arg(name).env(
        "ZRELAY_EXPECT_PROTOCOL",
        std::str::from_utf8(enc.protocol()).expect("ascii"),
    );
    for a in addrs {
        py = py.arg(&a.to_string());
    }
    py
}

impl Py {
    pub fn new(script: &str) -> Py {
        Py {
            script: script.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            timeout: PY_TIMEOUT,
        }
    }

    pub fn arg(mut self, a: &str) -> Py {
        self.args.push(a.to_string());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Py {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Py {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Py {
        self.timeout = t;
        self
    }

    fn describe(&self) -> String {
        format!("{} {}", self.script, self.args.join(" "))
    }

    fn command(&self, dir: &Path) -> Command {
        let mut cmd = Command::new(venv_bin("python"));
        cmd.arg(repo().join("tests").join("py").join(&self.script))
            .args(&self.args)
            .current_dir(dir)
            .env("TMPDIR", dir)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            // Python dumps its stacks and exits a little before we kill it.
            .env(
                "ZRELAY_PY_TIMEOUT",
                self.timeout
                    .saturating_sub(Duration::from_secs(5))
                    .as_secs()
                    .max(1)
                    .to_string(),
            );
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Run to completion; panics unless it exits 0 within the timeout.
    pub fn run(self) -> Output {
        let desc = self.describe();
        let out = self.run_unchecked();
        assert!(
            out.status.success(),
            "`{desc}` failed: {}\n{}",
            out.status,
            show_output(&out)
        );
        out
    }

    /// Run to completion and return the output whatever the exit status;
    /// panics only on a timeout.
    pub fn run_unchecked(self) -> Output {
        let dir = temp_dir("zrelay-py-");
        let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
        let mut child = self
            .command(dir.path())
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).expect("create stdout file"))
            .stderr(File::create(&err_path).expect("create stderr file"))
            .spawn()
            .expect("spawn python");
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`{}` timed out after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.describe(),
                    self.timeout,
                    tail(&out_path, 200),
                    tail(&err_path, 200)
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: fs::read(&out_path).unwrap_or_default(),
            stderr: fs::read(&err_path).unwrap_or_default(),
        }
    }

    /// Start it with piped stdin/stdout for a scenario that talks to the
    /// harness (prints "READY", reads commands).
    pub fn spawn(self) -> PyChild {
        let dir = temp_dir("zrelay-py-");
        let err_path = dir.path().join("stderr");
        let mut child = self
            .command(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&err_path).expect("create stderr file"))
            .spawn()
            .expect("spawn python");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        PyChild {
            desc: self.describe(),
            stdin: child.stdin.take(),
            child,
            lines: rx,
            stdout: Vec::new(),
            err_path,
            timeout: self.timeout,
            started: Instant::now(),
            _dir: dir,
        }
    }
}

fn show_output(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A running Python scenario driven line by line.
pub struct PyChild {
    desc: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stdout: Vec<String>,
    err_path: PathBuf,
    timeout: Duration,
    started: Instant,
    _dir: TempDir,
}

impl PyChild {
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(l) = self.lines.try_recv() {
            self.stdout.push(l);
        }
        panic!(
            "`{}`: {why}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.desc,
            self.stdout.join("\n"),
            tail(&self.err_path, 200)
        );
    }

    /// Wait for a stdout line equal to `want` (earlier lines are kept).
    pub fn expect_line(&mut self, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line == want;
                    self.stdout.push(line);
                    if done {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("no line {want:?} within {timeout:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail(&format!("stdout closed before a line {want:?}"))
                }
            }
        }
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        if let Err(e) = writeln!(stdin, "{line}").and_then(|_| stdin.flush()) {
            self.fail(&format!("write {line:?} to stdin: {e}"));
        }
    }

    /// Wait for exit (within the run's timeout); panics unless it exits 0.
    pub fn finish(mut self) -> Output {
        self.stdin.take();
        let deadline = self.started + self.timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("timed out after {:?}", self.timeout));
            }
            thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at EOF, which follows the exit.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stdout.push(l);
        }
        if !status.success() {
            self.fail(&format!("exited with {status}"));
        }
        Output {
            status,
            stdout: (self.stdout.join("\n") + "\n").into_bytes(),
            stderr: fs::read(&self.err_path).unwrap_or_default(),
        }
    }
}

impl Drop for PyChild {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ------------------------------------------------------------- raw wire --

/// Largest frame the harness accepts from a server (zrelay's default limit).
const MAX_FRAME: usize = 256 << 20;

fn read_frame_from(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer announced a frame of {len} bytes"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some(payload))
}

pub fn framed(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame under 4 GiB");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn is_closed_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// A raw TCP connection for handcrafted (and malformed) ZEO traffic.
pub struct Raw {
    stream: TcpStream,
    /// Every byte received so far.
    pub received: Vec<u8>,
}

impl Raw {
    pub fn connect(addr: &Addr) -> Raw {
        let Addr::Tcp(sa) = addr else {
            panic!("Raw needs a TCP address, got {addr}")
        };
        let stream = TcpStream::connect_timeout(sa, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            received: Vec::new(),
        }
    }

    /// Write bytes; an error here (the peer already closed) is returned,
    /// not a panic, since garbage tests expect the peer to hang up.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    pub fn send_frame(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(&framed(payload))
    }

    /// Read one frame; `Ok(None)` on EOF (or reset) before its first byte.
    pub fn read_frame(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut tee = Tee {
            inner: &mut self.stream,
            copy: &mut self.received,
        };
        match read_frame_from(&mut tee) {
            Err(e) if is_closed_error(&e) => Ok(None),
            other => other,
        }
    }

    /// Read a frame that must be there.
    pub fn expect_frame(&mut self, timeout: Duration) -> Vec<u8> {
        match self.read_frame(timeout) {
            Ok(Some(f)) => f,
            Ok(None) => panic!("connection closed while a frame was expected"),
            Err(e) => panic!("no frame within {timeout:?}: {e}"),
        }
    }

    /// Read the server's protocol offer and answer with `answer`.
    pub fn handshake(&mut self, answer: &[u8]) -> Vec<u8> {
        let offer = self.expect_frame(Duration::from_secs(10));
        self.send_frame(answer).expect("send handshake answer");
        offer
    }

    /// Send a sync call and return the first reply frame after it (async
    /// frames such as `info` are skipped). Panics on an error reply.
    pub fn call(&mut self, enc: Enc, msgid: i64, name: &str, args: &[Val]) -> Vec<u8> {
        self.send_frame(&encode_call(enc, msgid, false, name, args))
            .expect("send call");
        loop {
            let frame = self.expect_frame(Duration::from_secs(10));
            // Without a decoder: a reply names '.reply'; an error reply
            // names its exception class (…Error).
            if contains(&frame, b".reply") {
                assert!(
                    !contains(&frame, b"Error"),
                    "{name} got an error reply: {}",
                    String::from_utf8_lossy(&frame)
                );
                return frame;
            }
        }
    }

    /// Handshake with `enc` and `register('1', False)`; returns the reply.
    pub fn register(&mut self, enc: Enc) -> Vec<u8> {
        self.handshake(enc.protocol());
        self.call(enc, 1, "register", &[Val::Str("1"), Val::Bool(false)])
    }

    /// The peer must close the connection within `timeout` (EOF or reset).
    /// Returns what it sent before closing (any bytes since connect).
    pub fn assert_closed(&mut self, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "connection still open after {timeout:?}; received {} bytes: {:02x?}",
                self.received.len(),
                &self.received[..self.received.len().min(64)]
            );
            self.stream
                .set_read_timeout(Some(left))
                .expect("set timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => return self.received.clone(),
                Ok(n) => self.received.extend_from_slice(&buf[..n]),
                Err(e) if is_closed_error(&e) => return self.received.clone(),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

struct Tee<'a> {
    inner: &'a mut TcpStream,
    copy: &'a mut Vec<u8>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Send `bytes` to `addr` and collect what comes back until the peer
/// closes or `timeout` passes. Returns (bytes received, peer closed).
pub fn send_raw(addr: &Addr, bytes: &[u8], timeout: Duration) -> (Vec<u8>, bool) {
    let mut raw = Raw::connect(addr);
    let _ = raw.send(bytes);
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (raw.received, false);
        }
        raw.stream
            .set_read_timeout(Some(left))
            .expect("set timeout");
        match raw.stream.read(&mut buf) {
            Ok(0) => return (raw.received, true),
            Ok(n) => raw.received.extend_from_slice(&buf[..n]),
            Err(e) if is_closed_error(&e) => return (raw.received, true),
            Err(_) => return (raw.received, false),
        }
    }
}

// ------------------------------------------------- minimal ZEO encoders --

/// A value in a handcrafted ZEO message.
#[derive(Clone, Debug)]
pub enum Val<'a> {
    None,
    Bool(bool),
    Int(i64),
    Str(&'a str),
    Bytes(&'a [u8]),
    Tuple(Vec<Val<'a>>),
}

/// Encode `(msgid, async, name, args)` the way a ZEO client would.
pub fn encode_call(enc: Enc, msgid: i64, is_async: bool, name: &str, args: &[Val]) -> Vec<u8> {
    let msg = Val::Tuple(vec![
        Val::Int(msgid),
        Val::Bool(is_async),
        Val::Str(name),
        Val::Tuple(args.to_vec()),
    ]);
    match enc {
        Enc::Pickle => {
            let mut out = vec![0x80, 3];
            pickle(&msg, &mut out);
            out.push(b'.');
            out
        }
        Enc::Msgpack => {
            let mut out = Vec::new();
            msgpack(&msg, &mut out);
            out
        }
    }
}

/// Pickle protocol 3 without memo, as ZEO writes it.
fn pickle(v: &Val, out: &mut Vec<u8>) {
    match v {
        Val::None => out.push(b'N'),
        Val::Bool(b) => out.push(if *b { 0x88 } else { 0x89 }),
        Val::Int(i) if (0..256).contains(i) => out.extend([b'K', *i as u8]),
        Val::Int(i) => {
            let i = i32::try_from(*i).expect("int fits in BININT");
            out.push(b'J');
            out.extend(i.to_le_bytes());
        }
        Val::Str(s) => {
            out.push(b'X');
            out.extend(u32::try_from(s.len()).expect("short").to_le_bytes());
            out.extend(s.as_bytes());
        }
        Val::Bytes(b) => {
            out.push(b'B');
            out.extend(u32::try_from(b.len()).expect("short").to_le_bytes());
            out.extend(*b);
        }
        Val::Tuple(items) if items.is_empty() => out.push(b')'),
        Val::Tuple(items) => {
            out.push(b'(');
            for item in items {
                pickle(item, out);
            }
            out.push(b't');
        }
    }
}

fn msgpack(v: &Val, out: &mut Vec<u8>) {
    match v {
        Val::None => out.push(0xc0),
        Val::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Val::Int(i) if (0..128).contains(i) => out.push(*i as u8),
        Val::Int(i) if (-32..0).contains(i) => out.push(*i as i8 as u8),
        Val::Int(i) => {
            out.push(0xd3);
            out.extend(i.to_be_bytes());
        }
        Val::Str(s) => {
            let n = s.len();
            if n < 32 {
                out.push(0xa0 | n as u8);
            } else {
                out.push(0xdb);
                out.extend(u32::try_from(n).expect("short").to_be_bytes());
            }
            out.extend(s.as_bytes());
        }
        Val::Bytes(b) => {
            out.push(0xc6);
            out.extend(u32::try_from(b.len()).expect("short").to_be_bytes());
            out.extend(*b);
        }
        Val::Tuple(items) => {
            let n = items.len();
            assert!(n < 16, "fixarray only");
            out.push(0x90 | n as u8);
            for item in items {
                msgpack(item, out);
            }
        }
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
