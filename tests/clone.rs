//! `zrelay clone` end to end: real runzeo servers, a primary zrelay serving
//! its backend's Data.fs and blobs over mutual TLS, a new replica made from
//! the copy, real ZODB clients (`tests/py/repl.py`).
//!
//! Needs `<repo>/.venv` (`make test` or `scripts/ensure-venv.sh`).

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use support::cluster::{
    repl_py, sha256_file, value_of, wait_until, Certs, Node, NodeRole, NodeSpec,
};
use support::{wait_for, Enc, PyChild, Zeo, ZeoOpts};
// Unused here; importing them keeps support/mod.rs's re-export from being
// reported unused in this test crate.
#[allow(unused_imports)]
use support::{Relay, RelayOpts};

const SYNC: Duration = Duration::from_secs(60);
const Z64_HEX: &str = "0000000000000000";

/// A primary runzeo with a zrelay that serves clones (`[backend] data_fs`),
/// and the certificates of a cluster.
struct Primary {
    node: Node,
    zeo: Zeo,
    certs: Certs,
}

impl Primary {
    fn start(enc: Enc, allowed_peers: &[&str]) -> Primary {
        let certs = Certs::new(&["primary", "replica", "intruder"]);
        let zeo = Zeo::start(enc, ZeoOpts::default());
        let mut node = Node::prepare(&NodeSpec {
            name: "primary".into(),
            backend: zeo.addr().clone(),
            role: NodeRole::Primary {
                allowed_peers: allowed_peers.iter().map(|s| s.to_string()).collect(),
            },
            tls: certs.tls("primary"),
            backend_extra: backend_files(zeo.dir()),
            admin_extra: String::new(),
            replication_extra: String::new(),
            extra: String::new(),
        });
        node.start();
        Primary { node, zeo, certs }
    }

    fn addr(&self) -> String {
        self.node.addr().to_string()
    }

    fn py(&self, args: &[&str]) -> String {
        let out = repl_py(self.zeo.enc(), args).run();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn last_tid(&self) -> String {
        value_of(&self.py(&["lasttid", &self.zeo.addr().to_string()]), "last").to_string()
    }

    /// A replica node (not started) whose runzeo (not started either)
    /// serves `zeo`'s dir, with `name`'s certificate.
    fn replica_node(&self, zeo: &Zeo, name: &str) -> Node {
        Node::prepare(&NodeSpec {
            name: name.into(),
            backend: zeo.addr().clone(),
            role: NodeRole::Replica {
                upstream: self.node.repl(),
                upstream_name: "primary".into(),
            },
            tls: self.certs.tls(name),
            backend_extra: backend_files(zeo.dir()),
            admin_extra: String::new(),
            replication_extra: String::new(),
            extra: String::new(),
        })
    }
}

/// `[backend]` lines naming a runzeo dir's Data.fs and blobs.
fn backend_files(dir: &Path) -> String {
    format!(
        "probe_interval_ms = 200\ndata_fs = {:?}\nblob_dir = {:?}",
        dir.join("Data.fs").display().to_string(),
        dir.join("blobs").display().to_string()
    )
}

fn zrelay(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zrelay"));
    cmd.args(args).env("NO_COLOR", "1");
    cmd
}

fn run(mut cmd: Command) -> Output {
    let out = cmd.output().expect("run zrelay");
    eprintln!(
        "{:?}: {}\nstdout: {}stderr: {}",
        cmd.get_args().collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn clone_with(config: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["clone", "--config", config.to_str().unwrap()];
    args.extend(extra);
    run(zrelay(&args))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `zrelay verify` between two backends: exit 0 and "OK".
fn assert_verify_identical(primary: &Zeo, replica: &Zeo) {
    let out = run(zrelay(&[
        "verify",
        "--primary",
        &primary.addr().to_string(),
        "--replica",
        &replica.addr().to_string(),
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).starts_with("OK"), "{}", stdout(&out));
}

fn mark(w: &mut PyChild) {
    w.send_line("mark");
    w.expect_line("MARKED", Duration::from_secs(60));
}

/// Clone while a writer commits on the primary; runzeo and the replica
/// zrelay start on the copy and stream from its last tid; after catch-up
/// the two storages are identical (`zrelay verify`, transaction by
/// transaction with blobs, and Data.fs byte for byte).
#[test]
fn clone_while_writing_then_stream_catches_up() {
    let mut p = Primary::start(Enc::Msgpack, &["replica"]);
    let addr = p.addr();
    p.py(&["workload", &addr, &p.zeo.addr().to_string(), "300", "3"]);
    p.py(&["blobs", &addr, "5"]);
    let mut w = repl_py(p.zeo.enc(), &["writer", &addr]).spawn();
    w.expect_line("READY", Duration::from_secs(60));
    mark(&mut w);

    let mut rzeo = Zeo::prepare(Enc::Msgpack, ZeoOpts::default());
    let mut replica = p.replica_node(&rzeo, "replica");
    let out = clone_with(replica.config_path(), &[]);
    assert!(out.status.success(), "clone failed: {}", stderr(&out));
    let summary = stdout(&out);
    let cloned = value_of(&summary, "last_tid").to_string();
    assert_ne!(cloned, Z64_HEX, "{summary}");
    assert!(
        value_of(&summary, "blob_files").parse::<u64>().unwrap() >= 5,
        "{summary}"
    );
    // The copy is a committed prefix of the primary's file.
    let copy = fs::read(rzeo.dir().join("Data.fs")).unwrap();
    let orig = fs::read(p.zeo.dir().join("Data.fs")).unwrap();
    assert!(orig.len() >= copy.len() && orig[..copy.len()] == copy[..]);
    assert_eq!(
        value_of(&summary, "data_fs_bytes"),
        copy.len().to_string(),
        "{summary}"
    );
    assert!(!rzeo.dir().join("Data.fs.clone-partial").exists());
    assert!(!rzeo.dir().join("blobs.clone-partial").exists());
    // A second clone onto the now existing copy is refused.
    let again = clone_with(replica.config_path(), &["--quiet"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));

    rzeo.start_again();
    let r_last = value_of(
        &String::from_utf8_lossy(
            &repl_py(Enc::Msgpack, &["lasttid", &rzeo.addr().to_string()])
                .run()
                .stdout,
        ),
        "last",
    )
    .to_string();
    assert_eq!(
        r_last, cloned,
        "runzeo on the copy starts at the cloned tid"
    );
    replica.start();
    mark(&mut w);
    w.send_line("stop");
    w.finish();
    let last = p.last_tid();
    assert!(last > cloned, "the writer committed after the clone");
    wait_until(SYNC, "replica to catch up from the cloned tid", || {
        replica.applied_tid().as_deref() == Some(last.as_str())
    });
    // It streamed from the copy's last tid, not from the start.
    let log = replica.log();
    assert!(
        log.contains(&format!("applied={cloned}")),
        "replica did not start at the cloned tid:\n{log}"
    );
    let cmp = p.py(&[
        "compare",
        &p.zeo.dir().display().to_string(),
        &rzeo.dir().display().to_string(),
    ]);
    assert!(cmp.contains(&format!("last={last}")), "{cmp}");
    assert_eq!(
        sha256_file(&p.zeo.dir().join("Data.fs")),
        sha256_file(&rzeo.dir().join("Data.fs")),
        "Data.fs files differ after catch-up"
    );
    assert_verify_identical(&p.zeo, &rzeo);
    replica.assert_healthy();
    p.node.assert_healthy();
}

/// Forwards TCP to `target`, but passes at most `limit` bytes from the
/// server back to the client and then holds the rest (`cut`: closes the
/// client's connection instead): a clone through it stops half-way,
/// deterministically.
fn stalling_forwarder(target: SocketAddr, limit: u64, cut: bool) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let passed = Arc::new(AtomicU64::new(0));
    let counter = passed.clone();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(target) else {
                return;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
            });
            let counter = counter.clone();
            thread::spawn(move || {
                let (mut s_in, mut c_out) = (server, client);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let room = limit.saturating_sub(counter.load(Ordering::SeqCst));
                    if room == 0 && cut {
                        let _ = c_out.shutdown(std::net::Shutdown::Both);
                        let _ = s_in.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    if room == 0 {
                        // Hold the connection open, forward nothing more.
                        thread::sleep(Duration::from_secs(120));
                        return;
                    }
                    let want = buf.len().min(room as usize);
                    let n = match s_in.read(&mut buf[..want]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if c_out.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    counter.fetch_add(n as u64, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, passed)
}

/// Refused without a valid certificate (another CA; a CA-signed name not in
/// allowed_peers); a clone killed with SIGKILL half-way leaves no Data.fs
/// (a runzeo started there begins an empty storage), and the next clone
/// cleans up and completes.
#[test]
fn clone_refused_and_interrupted() {
    let mut p = Primary::start(Enc::Pickle, &["replica"]);
    let addr = p.addr();
    p.py(&["big", &addr, "20"]);
    p.py(&["blobs", &addr, "3"]);
    let last = p.last_tid();

    // 1. Certificates: a foreign CA, then a name the primary does not allow.
    let other = Certs::new(&["replica"]);
    for (name, ca, cert, key, reason) in [
        (
            "foreign-ca",
            p.certs.ca(),
            other.tls("replica").cert,
            other.tls("replica").key,
            "tls",
        ),
        (
            "not-allowed",
            p.certs.ca(),
            p.certs.tls("intruder").cert,
            p.certs.tls("intruder").key,
            "allowed_peers",
        ),
    ] {
        let zeo = Zeo::prepare(Enc::Pickle, ZeoOpts::default());
        let node = Node::prepare(&NodeSpec {
            name: name.into(),
            backend: zeo.addr().clone(),
            role: NodeRole::Replica {
                upstream: p.node.repl(),
                upstream_name: "primary".into(),
            },
            tls: support::cluster::TlsFiles { ca, cert, key },
            backend_extra: backend_files(zeo.dir()),
            admin_extra: String::new(),
            replication_extra: String::new(),
            extra: String::new(),
        });
        let out = clone_with(node.config_path(), &[]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(
            stderr(&out).to_lowercase().contains(reason),
            "{name}: {}",
            stderr(&out)
        );
        assert!(!zeo.dir().join("Data.fs").exists(), "{name} wrote Data.fs");
        assert!(!zeo.dir().join("Data.fs.clone-partial").exists());
        assert!(!zeo.dir().join("blobs").exists());
    }
    p.node.assert_healthy();

    let mut rzeo = Zeo::prepare(Enc::Pickle, ZeoOpts::default());
    let replica = p.replica_node(&rzeo, "replica");
    let partial: PathBuf = rzeo.dir().join("Data.fs.clone-partial");

    // 2. The connection cut after Data.fs, amid the blob files (3 of
    // ~100 KB): the clone fails and installs nothing.
    let data_fs_len = fs::metadata(p.zeo.dir().join("Data.fs")).unwrap().len();
    let (cut_at, _) = stalling_forwarder(p.node.repl(), data_fs_len + 150_000, true);
    let out = clone_with(
        replica.config_path(),
        &[
            "--upstream",
            &cut_at.to_string(),
            "--upstream-name",
            "primary",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("before the clone was complete"),
        "{}",
        stderr(&out)
    );
    assert!(
        !rzeo.dir().join("Data.fs").exists(),
        "a cut clone installed Data.fs"
    );
    assert!(
        !rzeo.dir().join("blobs").exists(),
        "a cut clone installed blobs"
    );
    assert!(!partial.exists(), "a failed clone left its partial file");

    // 3. SIGKILL half-way: the primary's bytes stall after 5 MB of ~21 MB.
    let (fwd, passed) = stalling_forwarder(p.node.repl(), 5 * 1024 * 1024, false);
    let mut child = zrelay(&[
        "clone",
        "--config",
        replica.config_path().to_str().unwrap(),
        "--upstream",
        &fwd.to_string(),
        "--upstream-name",
        "primary",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    wait_for(SYNC, "the clone to stall half-way", || {
        let size = fs::metadata(&partial).map(|m| m.len()).ok()?;
        (passed.load(Ordering::SeqCst) >= 5 * 1024 * 1024 && size > 1024 * 1024).then_some(())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !rzeo.dir().join("Data.fs").exists(),
        "an interrupted clone left a Data.fs"
    );
    // runzeo started there begins an empty storage, not a truncated copy.
    rzeo.start_again();
    let out = repl_py(Enc::Pickle, &["lasttid", &rzeo.addr().to_string()]).run();
    assert_eq!(
        value_of(&String::from_utf8_lossy(&out.stdout), "last"),
        Z64_HEX
    );
    // A clone while runzeo holds the storage is refused.
    let busy = clone_with(replica.config_path(), &["--force"]);
    assert_eq!(busy.status.code(), Some(1));
    assert!(stderr(&busy).contains("locked"), "{}", stderr(&busy));
    rzeo.stop();

    // 4. Again (replacing runzeo's empty file): leftovers go, the copy lands.
    let out = clone_with(replica.config_path(), &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(value_of(&stdout(&out), "last_tid"), last);
    assert!(!partial.exists());
    rzeo.start_again();
    let out = repl_py(Enc::Pickle, &["lasttid", &rzeo.addr().to_string()]).run();
    assert_eq!(
        value_of(&String::from_utf8_lossy(&out.stdout), "last"),
        last
    );
    assert_verify_identical(&p.zeo, &rzeo);
    p.node.assert_healthy();
}

/// `--from-file`: a backup whose tail is a commit in progress (status 'c')
/// and a torn record is copied up to its last committed transaction.
#[test]
fn clone_from_backup_file() {
    let zeo = Zeo::start(Enc::Msgpack, ZeoOpts::default());
    let addr = zeo.addr().to_string();
    let py = |args: &[&str]| {
        String::from_utf8_lossy(&repl_py(Enc::Msgpack, args).run().stdout).into_owned()
    };
    py(&["workload", &addr, &addr, "100", "1"]);
    py(&["blobs", &addr, "2"]);
    let last = value_of(&py(&["lasttid", &addr]), "last").to_string();
    let backup = support::temp_dir("zrelay-backup-");
    let src = backup.path().join("Data.fs");
    let mut bytes = fs::read(zeo.dir().join("Data.fs")).unwrap();
    let committed = bytes.len();
    // A voted, unfinished transaction (status 'c') cut short.
    let mut tail = vec![0xffu8; 8];
    tail.extend(1000u64.to_be_bytes());
    tail.push(b'c');
    tail.extend([0u8; 6]);
    tail.extend([0xab; 100]);
    bytes.extend(&tail);
    fs::write(&src, &bytes).unwrap();

    let mut target = Zeo::prepare(Enc::Msgpack, ZeoOpts::default());
    let out = run(zrelay(&[
        "clone",
        "--from-file",
        src.to_str().unwrap(),
        "--from-blob-dir",
        zeo.dir().join("blobs").to_str().unwrap(),
        "--data-fs",
        target.dir().join("Data.fs").to_str().unwrap(),
        "--blob-dir",
        target.dir().join("blobs").to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(value_of(&stdout(&out), "last_tid"), last);
    assert_eq!(
        fs::metadata(target.dir().join("Data.fs")).unwrap().len(),
        committed as u64
    );
    assert_eq!(
        sha256_file(&zeo.dir().join("Data.fs")),
        sha256_file(&target.dir().join("Data.fs"))
    );
    target.start_again();
    let cmp = py(&[
        "compare",
        &zeo.dir().display().to_string(),
        &target.dir().display().to_string(),
    ]);
    assert!(cmp.contains(&format!("last={last}")), "{cmp}");
    assert!(!cmp.contains("blobs=0 "), "{cmp}");

    // Not a FileStorage: refused, nothing written.
    fs::write(&src, b"not a Data.fs").unwrap();
    let other = support::temp_dir("zrelay-clone-bad-");
    let out = run(zrelay(&[
        "clone",
        "--from-file",
        src.to_str().unwrap(),
        "--data-fs",
        other.path().join("Data.fs").to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("FS21"), "{}", stderr(&out));
    assert!(!other.path().join("Data.fs").exists());
}
