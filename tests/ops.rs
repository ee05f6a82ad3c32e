//! Operations on a live primary + replica with real ZEO clients: admin
//! authentication, SIGHUP / POST /reload (certificate rotation without
//! dropping the stream, keys that need a restart), and drain.

#[allow(unused_imports)] // shared harness: this file uses part of it
mod support;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use support::cluster::{metric_value, wait_until, Cluster, ClusterOpts};
use support::ops::{zrelay_cli as zrelay, AdminToken};
use support::{Enc, Py};
use zrelay::replication::tls;

const SYNC: Duration = Duration::from_secs(30);
const TOKEN: &str = "ops-test-token-0123456789abcdef";

/// The DER of the certificate the replication listener at `addr` presents
/// to a replica holding `client` files.
fn presented_cert(addr: SocketAddr, client: &tls::TlsFiles) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let connector = tokio_rustls::TlsConnector::from(tls::client_config(client).unwrap());
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, _) = tls::connect(&connector, tcp, "primary", Duration::from_secs(10))
            .await
            .unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    })
}

fn pem_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .unwrap()
        .to_vec()
}

/// Replaces `dst` by `src` the way a rotation tool does: write aside, rename.
fn replace_file(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

fn auth_failures(metrics: &str, reason: &str) -> f64 {
    metric_value(
        metrics,
        &format!("zrelay_admin_auth_failures_total{{reason=\"{reason}\"}}"),
    )
}

#[test]
fn reload_rotation_and_drain_with_real_clients() {
    let token = AdminToken::new(TOKEN);
    let admin = token.config_line();
    let mut opts = ClusterOpts::new(Enc::Pickle);
    opts.primary_admin = admin.clone();
    opts.replica_admin = admin;
    let mut c = Cluster::with(opts);
    let tf = token.path();
    let p_admin = c.primary.admin().to_string();
    let r_admin = c.replica.admin().to_string();
    c.run_py(&["set", &c.primary.addr().to_string(), "k1", "1"]);
    c.wait_in_sync(SYNC);

    // --- authentication: no token / a wrong one are refused and counted.
    let (code, text) = zrelay(&["drain", "--admin", &p_admin]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("401"), "{text}");
    let wrong = token.wrong_file();
    let (code, text) = zrelay(&[
        "reload",
        "--admin",
        &p_admin,
        "--token-file",
        &wrong.display().to_string(),
    ]);
    assert_eq!(code, 1, "{text}");
    let m = c.primary.metrics();
    assert_eq!(auth_failures(&m, "missing"), 1.0, "{m}");
    assert_eq!(auth_failures(&m, "invalid_token"), 1.0);
    assert_eq!(c.primary.get("/readiness").0, 200);

    // --- rotation on the primary: new certificate files, SIGHUP; a new
    // handshake presents the new certificate, the stream stays up.
    let replica_files = tls::TlsFiles {
        ca_file: c.certs.ca(),
        cert_file: c.certs.tls("replica").cert,
        key_file: c.certs.tls("replica").key,
    };
    let old = pem_der(&c.certs.tls("primary").cert);
    assert_eq!(presented_cert(c.primary.repl(), &replica_files), old);
    let (code, text) = zrelay(&[
        "cert",
        "--dir",
        &c.certs.dir().display().to_string(),
        "primary",
    ]);
    assert_eq!(code, 0, "{text}");
    let new = pem_der(&c.certs.tls("primary").cert);
    assert_ne!(new, old, "zrelay cert reissued the same certificate");
    c.primary.hup();
    wait_until(
        SYNC,
        "the primary to present the rotated certificate",
        || presented_cert(c.primary.repl(), &replica_files) == new,
    );
    assert_eq!(
        metric_value(
            &c.primary.metrics(),
            "zrelay_config_reloads_total{result=\"ok\"}"
        ),
        1.0
    );

    // --- rotation on the replica: its certificate now names "replica-b".
    // SIGHUP keeps the open stream; the next connection presents the new
    // certificate (the primary logs the name it saw).
    let (code, text) = zrelay(&[
        "cert",
        "--dir",
        &c.certs.dir().display().to_string(),
        "replica-b",
    ]);
    assert_eq!(code, 0, "{text}");
    let b = c.certs.tls("replica-b");
    let r = c.certs.tls("replica");
    replace_file(&b.key, &r.key);
    replace_file(&b.cert, &r.cert);
    let (code, text) = zrelay(&["reload", "--admin", &r_admin, "--token-file", &tf]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("replication.tls"), "{text}");
    let tid = {
        c.run_py(&["set", &c.primary.addr().to_string(), "k2", "2"]);
        c.wait_in_sync(SYNC)
    };
    assert_eq!(c.replica.upstream_state(), "live");
    assert_eq!(
        c.replica.log().matches("replication stream up").count(),
        1,
        "the stream was re-established"
    );
    assert!(!c.primary.log().contains("node=\"replica-b\""));
    assert_eq!(c.replica.applied_tid().as_deref(), Some(tid.as_str()));
    c.primary.restart();
    wait_until(
        SYNC,
        "the replica to reconnect with its new certificate",
        || c.primary.log().contains("node=\"replica-b\""),
    );

    // --- a key that needs a restart is refused by name; the rest applies.
    // Log level: a client session on the replica logs "session ended" at
    // DEBUG; after the reload to "info" it no longer does. The counter is
    // bumped just before that line, in the same step of the same task.
    let ended = |c: &Cluster| {
        metric_value(
            &c.replica.metrics(),
            "zrelay_client_sessions_ended_total{reason=\"client_closed\"}",
        )
    };
    let session_logs = |c: &Cluster| {
        let mark = c.replica.log().len();
        let n = ended(c);
        c.last_tid(c.replica.addr());
        wait_until(SYNC, "the replica session to end", || ended(c) > n);
        c.replica.log()[mark..].contains("session ended")
    };
    assert!(session_logs(&c), "DEBUG lines before the reload");
    let new_token = token.dir().join("admin2.token");
    std::fs::write(&new_token, "rotated-token-0123456789abcdef\n").unwrap();
    let cfg = std::fs::read_to_string(c.replica.config_path()).unwrap();
    let changed = cfg
        .replace(
            "log_level = \"info,zrelay=debug,zrelay::monitor=info\"",
            "log_level = \"info\"",
        )
        .replace("probe_interval_ms = 200", "probe_interval_ms = 300")
        .replace(&tf, &new_token.display().to_string());
    assert_ne!(changed, cfg);
    std::fs::write(c.replica.config_path(), changed).unwrap();
    let (code, text) = zrelay(&["reload", "--admin", &r_admin, "--token-file", &tf]);
    assert_eq!(code, 0, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["needs_restart"],
        serde_json::json!(["backend.probe_interval_ms"]),
        "{v}"
    );
    assert!(
        v["applied"]
            .as_array()
            .unwrap()
            .contains(&"log_level".into()),
        "{v}"
    );
    assert!(c
        .replica
        .log()
        .lines()
        .any(|l| l.contains("needs a restart") && l.contains("backend.probe_interval_ms")));
    assert!(!session_logs(&c), "DEBUG lines after the reload to info");
    // The admin token was replaced: the old one is refused now.
    let nt = new_token.display().to_string();
    let (code, text) = zrelay(&["reload", "--admin", &r_admin, "--token-file", &tf]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("401"), "{text}");
    let (code, text) = zrelay(&["reload", "--admin", &r_admin, "--token-file", &nt]);
    assert_eq!(code, 0, "{text}");
    // A file that does not load changes nothing and says why.
    std::fs::write(c.replica.config_path(), "[client]\nlisten = 1\n").unwrap();
    let (code, text) = zrelay(&["reload", "--admin", &r_admin, "--token-file", &nt]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("500"), "{text}");
    c.replica.hup();
    wait_until(SYNC, "the failed SIGHUP reload to be counted", || {
        metric_value(
            &c.replica.metrics(),
            "zrelay_config_reloads_total{result=\"error\"}",
        ) == 2.0
    });

    // --- drain the primary while a real client is mid-transaction.
    let mut hold = Py::new("ops.py")
        .args(&["hold", &c.primary.addr().to_string()])
        .spawn();
    hold.expect_line("BEGUN", SYNC);
    let (code, text) = zrelay(&["drain", "--admin", &p_admin, "--token-file", &tf]);
    assert_eq!(code, 0, "{text}");
    let (code, body) = c.primary.get("/readiness");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(c.primary.get("/health").0, 200);
    // No new sessions: the listener is closed.
    let client: SocketAddr = c.primary.addr().to_string().parse().unwrap();
    wait_until(SYNC, "the client port to refuse connections", || {
        TcpStream::connect_timeout(&client, Duration::from_secs(1)).is_err()
    });
    // The open transaction still commits (within client.shutdown_grace_ms
    // of the drain: keep the steps above quick), then the session ends.
    hold.send_line("finish");
    hold.expect_line("CLOSED", SYNC);
    // A new ZEO client cannot connect.
    Py::new("ops.py")
        .args(&["refused", &c.primary.addr().to_string()])
        .run();
    let out = hold.finish();
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    let committed = support::cluster::value_of(&out, "committed").to_string();
    // It reached the primary's backend and, as usual, the replica.
    assert_eq!(c.last_tid(c.pzeo.addr()), committed);
    c.wait_applied(&committed, SYNC);
    assert!(c.primary.log().contains("draining"));
    c.assert_healthy();
}

/// A pack on the primary is replayed on the replica, and by the replica on
/// a cascaded one: their Data.fs files shrink too, all stay identical
/// (verify), and the streams go on.
#[test]
fn pack_on_the_primary_is_replicated() {
    let (mut c, zeo2, mut leaf) = Cluster::cascade(Enc::Pickle);
    let p = c.primary.addr().to_string();
    let churn = |n: &str| {
        let out = Py::new("ops.py").args(&["churn", &p, n]).run();
        support::cluster::value_of(&String::from_utf8_lossy(&out.stdout), "last").to_string()
    };
    let last = churn("40");
    c.wait_applied(&last, SYNC);
    wait_until(SYNC, "replica2 to apply the churn", || {
        leaf.applied_tid().as_deref() == Some(last.as_str())
    });
    let size = |dir: &Path| std::fs::metadata(dir.join("Data.fs")).unwrap().len();
    let (p_before, r_before, l_before) = (size(c.pzeo.dir()), size(c.rzeo.dir()), size(zeo2.dir()));
    assert!(r_before > 40 * 20_000, "{r_before}");
    c.run_py(&["pack", &p]);
    let p_after = size(c.pzeo.dir());
    assert!(p_after < p_before / 4, "primary {p_before} -> {p_after}");
    wait_until(
        SYNC,
        "the replica's Data.fs to shrink like the primary's",
        || size(c.rzeo.dir()) < r_before / 4,
    );
    wait_until(SYNC, "the cascaded replica's Data.fs to shrink too", || {
        size(zeo2.dir()) < l_before / 4
    });
    for node in [&c.replica, &leaf] {
        wait_until(SYNC, "the replica to count the pack", || {
            metric_value(
                &node.metrics(),
                "zrelay_replication_packs_applied_total{result=\"ok\"}",
            ) == 1.0
        });
    }
    assert_eq!(
        metric_value(
            &c.primary.metrics(),
            "zrelay_replication_packs_captured_total"
        ),
        1.0
    );
    assert!(c
        .replica
        .log()
        .contains("packed the replica backend like the primary"));
    let (pd, rd) = c.data_fs_digests();
    assert_eq!(pd, rd, "packed Data.fs files differ");
    assert_eq!(
        support::cluster::sha256_file(&zeo2.dir().join("Data.fs")),
        pd
    );
    // The streams go on after the pack, and all stay identical.
    let last = churn("3");
    c.wait_applied(&last, SYNC);
    wait_until(SYNC, "replica2 to apply the new commits", || {
        leaf.applied_tid().as_deref() == Some(last.as_str())
    });
    for replica in [c.rzeo.addr().to_string(), zeo2.addr().to_string()] {
        let (code, text) = zrelay(&[
            "verify",
            "--primary",
            &c.pzeo.addr().to_string(),
            "--replica",
            &replica,
        ]);
        assert_eq!(code, 0, "{text}");
        assert!(text.starts_with("OK"), "{text}");
    }
    assert!(c.compare().starts_with("identical"));
    c.assert_healthy();
    leaf.assert_healthy();
}
