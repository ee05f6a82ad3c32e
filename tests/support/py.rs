//! Python scenario runs (`.venv/bin/python tests/py/<script>`).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{repo, tail, temp_dir, venv_bin, Addr, Enc, PY_TIMEOUT};

/// One run of `.venv/bin/python tests/py/<script> ARGS...`.
pub struct Py {
    script: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Duration,
    /// Run inside this network namespace (`ip netns exec`).
    netns: Option<String>,
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
            netns: None,
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

    /// Run inside network namespace `ns` (see `netns::Net`).
    pub fn netns(mut self, ns: &str) -> Py {
        self.netns = Some(ns.to_string());
        self
    }

    fn describe(&self) -> String {
        format!("{} {}", self.script, self.args.join(" "))
    }

    fn command(&self, dir: &Path) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => super::netns::Net::cmd(ns, &venv_bin("python").display().to_string()),
            None => Command::new(venv_bin("python")),
        };
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

    /// Wait for a stdout line starting with `prefix` and return it.
    pub fn expect_prefix(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("no line starting {prefix:?} within {timeout:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail(&format!("stdout closed before a line starting {prefix:?}"))
                }
            }
        }
    }

    /// A stdout line printed already, if any (does not wait).
    pub fn try_line(&mut self) -> Option<String> {
        let line = self.lines.try_recv().ok()?;
        self.stdout.push(line.clone());
        Some(line)
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
