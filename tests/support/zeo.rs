//! A real `runzeo` serving FileStorage "1" from a temp dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use tempfile::TempDir;

use super::proc::Proc;
use super::raw::read_frame_from;
use super::{free_port, print_tail, temp_dir, venv_bin, wait_for, Addr, Enc, START_TIMEOUT};

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
    /// Speaks TLS (`<ssl>` in extra_zeo): ready once its port accepts.
    tls: bool,
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
            tls: opts.extra_zeo.contains("<ssl>"),
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
        let (addr, log, tls) = (self.addr.clone(), self.log.clone(), self.tls);
        let proc = self.proc.as_mut().expect("just spawned");
        wait_for(START_TIMEOUT, "runzeo to answer the handshake", || {
            if let Some(status) = proc.try_wait() {
                print_tail("runzeo", &log);
                panic!("runzeo exited during start-up: {status}");
            }
            let mut s = addr.connect(Duration::from_secs(1)).ok()?;
            if tls {
                return Some(());
            }
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

    /// SIGSTOP: the server stops answering (a stall, not a crash).
    pub fn pause(&mut self) {
        if let Some(p) = &mut self.proc {
            p.signal(libc::SIGSTOP);
        }
    }

    /// SIGCONT after [`Zeo::pause`].
    pub fn resume(&mut self) {
        if let Some(p) = &mut self.proc {
            p.signal(libc::SIGCONT);
        }
    }
}

impl Drop for Zeo {
    fn drop(&mut self) {
        // A paused server would not see the SIGTERM of its owner.
        self.resume();
        if thread::panicking() {
            print_tail(&format!("runzeo at {}", self.addr), &self.log);
        }
    }
}
