//! The zrelay binary under test.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::Duration;

use tempfile::TempDir;

use super::proc::Proc;
use super::{free_port, print_tail, temp_dir, wait_for, Addr, START_TIMEOUT};

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

    /// The running zrelay's process id.
    pub fn pid(&self) -> i32 {
        self.proc.as_ref().expect("zrelay running").pid()
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
        let cmd = zrelay_run(&self.config, self.dir.path());
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

/// `zrelay run --config CONFIG` in DIR, with backtraces and plain logs.
pub fn zrelay_run(config: &std::path::Path, dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zrelay"));
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "1")
        .env("NO_COLOR", "1");
    cmd
}
