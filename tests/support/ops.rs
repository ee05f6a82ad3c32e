//! Operator-side helpers shared by the live-cluster tests (ops.rs,
//! roles.rs, doors.rs): the `zrelay` CLI, an admin token file, a door
//! session opened by hand, a `tests/py` script told which encoding to
//! expect.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::cluster::TlsFiles;
use super::{Enc, Py, PyChild};

/// Runs the `zrelay` binary under test: its exit code and its stdout
/// followed by its stderr.
pub fn zrelay_cli(args: &[&str]) -> (i32, String) {
    cli_output(Command::new(env!("CARGO_BIN_EXE_zrelay")).args(args))
}

/// Runs a prepared command (e.g. the `zrelay` binary inside a network
/// namespace): its exit code (-1 if killed) and its stdout followed by its
/// stderr.
pub fn cli_output(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("run zrelay");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// An admin bearer token in a file of its own temporary directory.
pub struct AdminToken {
    pub token: &'static str,
    pub file: PathBuf,
    dir: tempfile::TempDir,
}

impl AdminToken {
    pub fn new(token: &'static str) -> AdminToken {
        let dir = tempfile::tempdir().expect("token dir");
        let file = dir.path().join("admin.token");
        std::fs::write(&file, format!("{token}\n")).expect("write token");
        AdminToken { token, file, dir }
    }

    /// The `[admin]` line naming the file.
    pub fn config_line(&self) -> String {
        format!("token_file = {:?}\n", self.path())
    }

    /// The file's path, for `--token-file`.
    pub fn path(&self) -> String {
        self.file.display().to_string()
    }

    /// Another file in the same directory holding a wrong token.
    pub fn wrong_file(&self) -> PathBuf {
        let wrong = self.dir.path().join("wrong");
        std::fs::write(&wrong, "not-the-token-0123456789").expect("write wrong token");
        wrong
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A `tests/py` script with `ZRELAY_EXPECT_PROTOCOL` set for `enc`.
pub fn py_for(script: &str, enc: Enc, args: &[&str]) -> Py {
    Py::new(script).args(args).env(
        "ZRELAY_EXPECT_PROTOCOL",
        std::str::from_utf8(enc.protocol()).expect("ascii"),
    )
}

/// `roles.py switch-load`: bank writers at `wdoors` (comma-separated doors,
/// one writer each; the script gives some a persistent cache under
/// `cache`) and a reader checking every snapshot at `rdoors`, running until
/// "stop"; returned once it printed READY.
pub fn bank_load(enc: Enc, wdoors: &str, rdoors: &str, cache: &Path, limit: Duration) -> PyChild {
    let cache = cache.display().to_string();
    let mut load = py_for(
        "roles.py",
        enc,
        &["switch-load", "10", "10000", wdoors, rdoors, &cache],
    )
    .timeout(limit)
    .spawn();
    load.expect_line("READY", Duration::from_secs(30));
    load
}

/// Stops a [`bank_load`] and checks what it reports: no client refused a
/// server as older than its cache ("Cache newer than server"), and the
/// script's own checks (bank total in every snapshot, each writer's
/// acknowledged commits present) passed. Its stdout, printed too.
pub fn finish_bank_load(mut load: PyChild) -> String {
    load.send_line("stop");
    let out = load.finish();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("{text}");
    assert!(!err.contains("newer than"), "{err}");
    assert!(text.contains("ok switch-load"), "{text}\n{err}");
    text
}

/// Opens a door session to the replication listener at `replication_addr`
/// (node `target`) as node `node`'s door would, with `files` and announcing
/// `epoch`; the ZEO server's offer comes back on success.
pub fn open_door(
    files: TlsFiles,
    target: &str,
    replication_addr: &str,
    node: &str,
    epoch: Option<u64>,
) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    use zrelay::cluster::Target;
    use zrelay::door::forward::ForwardOpener;
    use zrelay::relay::UpstreamOpener;
    use zrelay::replication::protocol::{DoorHello, PROTOCOL_VERSION};
    use zrelay::replication::tls;

    let cfg = tls::client_config(&tls::TlsFiles {
        ca_file: files.ca,
        cert_file: files.cert,
        key_file: files.key,
    })
    .expect("client TLS config");
    let opener = ForwardOpener {
        target: Target {
            node: target.into(),
            replication_addr: replication_addr.into(),
        },
        hello: DoorHello {
            version: PROTOCOL_VERSION,
            cluster: "zrelay".into(),
            storage: "1".into(),
            node: node.into(),
            read_only: false,
            epoch,
        },
        connector: tokio_rustls::TlsConnector::from(cfg),
        timeout: Duration::from_secs(10),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (mut r, _w) = opener.open().await?;
        let mut offer = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut offer))
            .await
            .map_err(|_| "no offer".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(offer.to_vec())
    })
}
