//! Child processes whose output appends to a log file.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A child process whose stdout and stderr append to one log file.
pub(crate) struct Proc {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path, launch: u32) -> Proc {
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

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    pub(crate) fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    pub(crate) fn signal(&mut self, sig: i32) {
        if self.try_wait().is_none() {
            // SAFETY: kill(2) on the pid of our own child, which has not
            // been reaped yet (try_wait said so), so the pid is still ours.
            let rc = unsafe { libc::kill(self.pid(), sig) };
            assert_eq!(rc, 0, "kill({}, {sig}) failed", self.name);
        }
    }

    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
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

    pub(crate) fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_timeout(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{} survived SIGKILL", self.name))
    }

    /// SIGTERM, then wait up to `timeout`; SIGKILL and panic if it hangs.
    pub(crate) fn terminate(&mut self, timeout: Duration) -> ExitStatus {
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
