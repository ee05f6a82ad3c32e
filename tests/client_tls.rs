//! TLS on the client port against real components: runzeo, the zrelay
//! binary with `[client.tls]`, and unmodified `ZEO.ClientStorage` clients
//! given an `ssl.SSLContext` (`tests/py/zclient.py` builds it from
//! `ZRELAY_TLS_*`). Certificates come from `zrelay cert`, plus an expired
//! one and one from another CA made with `zrelay::certgen`.

mod support;

use std::time::{Duration, SystemTime};

use support::cluster::{http_get, metric_value, Certs};
use support::{
    free_port, scenario_cmd, Addr, Enc, Py, Raw, Relay, RelayOpts, Zeo, ZeoOpts, CLOSE_TIMEOUT,
};

const RELAY_NAME: &str = "relay";
const WRITER: &str = "writer-1";
const READER: &str = "reader";

/// Client certificates for every case, from two CAs.
struct Pki {
    ours: Certs,
    other: Certs,
}

impl Pki {
    fn new() -> Pki {
        let ours = Certs::new(&[RELAY_NAME, WRITER, READER]);
        let day = Duration::from_secs(86400);
        let now = SystemTime::now();
        zrelay::certgen::issue_node_with_validity(
            ours.dir(),
            "writer-old",
            now - 30 * day,
            now - day,
        )
        .expect("issue an expired certificate");
        Pki {
            ours,
            other: Certs::new(&["writer-2"]),
        }
    }
}

/// A runzeo backend and a zrelay whose client port speaks TLS only.
struct TlsStack {
    enc: Enc,
    zeo: Zeo,
    relay: Relay,
    admin: std::net::SocketAddr,
    pki: Pki,
}

impl TlsStack {
    /// `tls_extra`: lines added to `[client.tls]` (after cert, key, CA).
    fn start(enc: Enc, tls_extra: &str) -> TlsStack {
        let pki = Pki::new();
        let zeo = Zeo::start(enc, ZeoOpts::default());
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let c = &pki.ours;
        let client = format!(
            "handshake_timeout_ms = 2000\n\
             [client.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nca_file = {ca:?}\n{tls_extra}\n",
            cert = c.dir().join(format!("{RELAY_NAME}.pem")),
            key = c.dir().join(format!("{RELAY_NAME}-key.pem")),
            ca = c.ca(),
        );
        let relay = Relay::start(
            zeo.addr(),
            RelayOpts {
                top: format!("[admin]\nlisten = \"{admin}\"\n"),
                client,
                ..RelayOpts::default()
            },
        );
        TlsStack {
            enc,
            zeo,
            relay,
            admin,
            pki,
        }
    }

    fn front(&self) -> &Addr {
        self.relay.addr()
    }

    /// A Python run whose client reaches the relay over TLS presenting the
    /// certificate `cert` (a node name in `certs`), or none.
    fn client(&self, py: Py, certs: Option<(&Certs, &str)>) -> Py {
        let mut py = py
            .env("ZRELAY_TLS_ADDRS", &self.front().to_string())
            .env("ZRELAY_TLS_CA", &self.pki.ours.ca().display().to_string())
            .env("ZRELAY_TLS_HOSTNAME", RELAY_NAME);
        if let Some((certs, name)) = certs {
            py = py
                .env(
                    "ZRELAY_TLS_CERT",
                    &certs
                        .dir()
                        .join(format!("{name}.pem"))
                        .display()
                        .to_string(),
                )
                .env(
                    "ZRELAY_TLS_KEY",
                    &certs
                        .dir()
                        .join(format!("{name}-key.pem"))
                        .display()
                        .to_string(),
                );
        }
        py
    }

    fn scenario(&self, name: &str, cert: &str) -> Py {
        self.client(
            scenario_cmd(name, self.enc, &[self.front()]),
            Some((&self.pki.ours, cert)),
        )
    }

    fn metrics(&self) -> String {
        let (code, body) = http_get(self.admin, "/metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics(), sample)
    }

    /// Sessions ever started (each one opens a backend connection).
    fn sessions_ended(&self) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with("zrelay_client_sessions_ended_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    fn assert_healthy(&mut self) {
        self.relay.assert_running();
        assert!(
            !self.relay.log().contains("panicked"),
            "{}",
            self.relay.log()
        );
    }
}

const WRITERS: &str = "require_client_cert = true\nread_write_clients = [\"writer-*\"]\n";

/// The relay scenarios, unchanged, over TLS with a read-write certificate.
fn scenarios_over_tls(enc: Enc) {
    let mut s = TlsStack::start(enc, WRITERS);
    for name in [
        "basic",
        "invalidation",
        "conflict",
        "resolved",
        "undo",
        "blobs",
        "concurrency",
        "ruok",
    ] {
        s.scenario(name, WRITER).run();
    }
    assert!(s.metric("zrelay_client_tls_admitted_total{access=\"read-write\"}") >= 8.0);
    assert_eq!(
        s.metric("zrelay_client_tls_admitted_total{access=\"read-only\"}"),
        0.0
    );
    // A certificate not matching read_write_clients is read-only at this
    // door: every write path refused, nothing reaches the backend.
    let out = s
        .client(
            Py::new("repl.py").args(&[
                "refuse-writes",
                &s.front().to_string(),
                &s.zeo.addr().to_string(),
            ]),
            Some((&s.pki.ours, READER)),
        )
        .run();
    assert!(String::from_utf8_lossy(&out.stdout).contains("last="));
    assert!(s.metric("zrelay_client_tls_admitted_total{access=\"read-only\"}") >= 1.0);
    assert!(s.metric("zrelay_client_rejected_writes_total{method=\"register\"}") >= 1.0);
    assert!(s.metric("zrelay_client_rejected_writes_total{method=\"vote\"}") >= 1.0);
    s.assert_healthy();
}

#[test]
fn scenarios_over_tls_pickle() {
    scenarios_over_tls(Enc::Pickle);
}

#[test]
fn scenarios_over_tls_msgpack() {
    scenarios_over_tls(Enc::Msgpack);
}

/// Every refusal while a writer keeps committing over TLS: each is logged
/// and counted by reason, none becomes a session (nothing reaches the
/// backend), and the writer sees no error or disconnect.
fn refusals_by_reason(enc: Enc) {
    let mut s = TlsStack::start(enc, WRITERS);
    let mut worker = s.scenario("garbage-neighbour", WRITER).spawn();
    worker.expect_line("READY", Duration::from_secs(60));
    let sessions_before = s.sessions_ended();

    let refused = |certs: Option<(&Certs, &str)>, reason: &str| {
        let sample = format!("zrelay_client_tls_handshake_failures_total{{reason=\"{reason}\"}}");
        let before = s.metric(&sample);
        s.client(scenario_cmd("refused", s.enc, &[s.front()]), certs)
            .run();
        let after = s.metric(&sample);
        assert!(after > before, "{reason}: {before} -> {after}");
        assert!(
            s.relay.log().contains(&format!("reason=\"{reason}\""))
                || s.relay.log().contains(&format!("reason={reason}")),
            "no log line for {reason}:\n{}",
            s.relay.log()
        );
    };
    refused(None, "no_client_certificate");
    refused(Some((&s.pki.other, "writer-2")), "unknown_ca");
    refused(Some((&s.pki.ours, "writer-old")), "expired");

    // A plaintext ZEO client waits for the server's offer, which a TLS port
    // never sends: cut at the handshake timeout.
    let before = s.metric("zrelay_client_tls_handshake_failures_total{reason=\"timeout\"}");
    scenario_cmd("refused", s.enc, &[s.front()]).run();
    assert!(s.metric("zrelay_client_tls_handshake_failures_total{reason=\"timeout\"}") > before);
    // Plaintext ZEO bytes on the TLS port: refused at once, no ZEO offer.
    let mut raw = Raw::connect(s.front());
    let _ = raw.send_frame(b"ruok");
    let got = raw.assert_closed(CLOSE_TIMEOUT);
    assert!(
        !support::contains(&got, b"Z5") && !support::contains(&got, b"M5"),
        "{got:02x?}"
    );
    assert!(s.metric("zrelay_client_tls_handshake_failures_total{reason=\"not_tls\"}") >= 1.0);

    assert_eq!(
        s.sessions_ended(),
        sessions_before,
        "a refused connection became a session"
    );
    // Clients stuck in (or never starting) their TLS handshake do not hold
    // up anyone else: the handshake runs in each connection's own task.
    let silent: Vec<_> = (0..5)
        .map(|_| std::net::TcpStream::connect(s.front().to_string()).unwrap())
        .collect();
    let started = std::time::Instant::now();
    let offer = tls_offer(&s, WRITER);
    assert_eq!(&offer[..], s.enc.protocol());
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "TLS client waited {:?} behind silent connections (handshake timeout 2 s)",
        started.elapsed()
    );
    drop(silent);

    worker.send_line("stop");
    let out = worker.finish();
    assert!(String::from_utf8_lossy(&out.stdout).contains("commits="));
    s.assert_healthy();
}

#[test]
fn refusals_by_reason_pickle() {
    refusals_by_reason(Enc::Pickle);
}

#[test]
fn refusals_by_reason_msgpack() {
    refusals_by_reason(Enc::Msgpack);
}

/// Connects over TLS with `cert` (rustls, like a replica does) and returns
/// the ZEO protocol offer zrelay relays from the backend.
fn tls_offer(s: &TlsStack, cert: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let files = zrelay::replication::tls::TlsFiles {
        ca_file: s.pki.ours.ca(),
        cert_file: s.pki.ours.dir().join(format!("{cert}.pem")),
        key_file: s.pki.ours.dir().join(format!("{cert}-key.pem")),
    };
    let connector =
        tokio_rustls::TlsConnector::from(zrelay::replication::tls::client_config(&files).unwrap());
    let addr = s.front().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tls, _) =
            zrelay::replication::tls::connect(&connector, tcp, RELAY_NAME, Duration::from_secs(5))
                .await
                .expect("TLS handshake");
        let len = tls.read_u32().await.expect("offer length") as usize;
        let mut offer = vec![0u8; len];
        tls.read_exact(&mut offer).await.expect("offer");
        offer
    })
}

/// Without `require_client_cert`: clients without a certificate get
/// `default_access`; a listed certificate still writes.
#[test]
fn default_access_without_required_certificate() {
    let mut s = TlsStack::start(
        Enc::Pickle,
        "read_write_clients = [\"writer-1\"]\ndefault_access = \"read-only\"\nmin_version = \"1.3\"\n",
    );
    // The writer creates the root (a read-only client cannot).
    s.scenario("basic", WRITER).run();
    let out = s
        .client(
            Py::new("repl.py").args(&[
                "refuse-writes",
                &s.front().to_string(),
                &s.zeo.addr().to_string(),
            ]),
            None,
        )
        .run();
    assert!(String::from_utf8_lossy(&out.stdout).contains("last="));
    assert!(s.metric("zrelay_client_tls_admitted_total{access=\"read-only\"}") >= 1.0);
    assert!(s.metric("zrelay_client_tls_admitted_total{access=\"read-write\"}") >= 1.0);

    // min_version = "1.3": a TLS 1.2 client is refused as incompatible.
    let sample = "zrelay_client_tls_handshake_failures_total{reason=\"incompatible\"}";
    let before = s.metric(sample);
    s.client(
        scenario_cmd("refused", s.enc, &[s.front()]).env("ZRELAY_TLS_MAX_VERSION", "1.2"),
        Some((&s.pki.ours, WRITER)),
    )
    .run();
    assert!(s.metric(sample) > before);

    // Certificate expiry: gauge and /status, for the certificate and the CA.
    let status = support::cluster::status_of(s.admin);
    let certs = status["certificates"].as_array().expect("certificates");
    for kind in ["cert", "ca"] {
        let c = certs
            .iter()
            .find(|c| c["use"] == "client" && c["kind"] == kind)
            .unwrap_or_else(|| panic!("no client {kind} in {status}"));
        let unix = c["not_after_unix"].as_f64().unwrap();
        let gauge = s.metric(&format!(
            "zrelay_tls_certificate_expiry_timestamp_seconds{{use=\"client\",kind=\"{kind}\"}}"
        ));
        assert_eq!(gauge, unix, "{kind}");
        assert!(c["not_after"].as_str().unwrap().ends_with('Z'), "{c}");
    }
    s.assert_healthy();
}

/// `[backend.tls]`: a ZEO server with `<ssl>` (which always requires a
/// client certificate) behind a plaintext client port. Every backend
/// connection (sessions, monitor) goes over TLS.
#[test]
fn backend_over_tls() {
    let certs = Certs::new(&["zeo", RELAY_NAME]);
    let pem = |n: &str| certs.dir().join(format!("{n}.pem"));
    let zeo = Zeo::start(
        Enc::Msgpack,
        ZeoOpts {
            extra_zeo: format!(
                "  <ssl>\n    certificate {}\n    key {}\n    authenticate {}\n  </ssl>\n",
                pem("zeo").display(),
                pem("zeo-key").display(),
                certs.ca().display()
            ),
            ..ZeoOpts::default()
        },
    );
    // runzeo really speaks TLS only: a plaintext client gets no offer.
    let mut raw = Raw::connect(zeo.addr());
    assert!(raw.read_frame(Duration::from_millis(500)).is_err());
    drop(raw);
    let mut relay = Relay::start(
        zeo.addr(),
        RelayOpts {
            backend: format!(
                "[backend.tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nserver_name = \"zeo\"\n",
                certs.ca(),
                pem(RELAY_NAME),
                pem(&format!("{RELAY_NAME}-key")),
            ),
            ..RelayOpts::default()
        },
    );
    scenario_cmd("basic", Enc::Msgpack, &[relay.addr()]).run();
    scenario_cmd("invalidation", Enc::Msgpack, &[relay.addr()]).run();
    relay.assert_running();
    let log = relay.log();
    assert!(log.contains("backend connections over TLS"), "{log}");
    assert!(log.contains("backend ZEO server is up"), "{log}");
}

/// A TLS client with a tiny receive window that starts reading late: 12 MB
/// of replies fill the socket, so the end of the last one can still be
/// inside the TLS session when zrelay's write returns. It must arrive anyway (zrelay
/// flushes), not only when something else is written to that client.
#[test]
fn large_replies_to_a_slow_tls_reader_arrive_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TlsStack::start(Enc::Pickle, WRITERS);
    s.scenario("basic", WRITER).run(); // root holds a 300 KB string
    let files = zrelay::replication::tls::TlsFiles {
        ca_file: s.pki.ours.ca(),
        cert_file: s.pki.ours.dir().join(format!("{WRITER}.pem")),
        key_file: s.pki.ours.dir().join(format!("{WRITER}-key.pem")),
    };
    let connector =
        tokio_rustls::TlsConnector::from(zrelay::replication::tls::client_config(&files).unwrap());
    let addr: std::net::SocketAddr = s.front().to_string().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let tcp = sock.connect(addr).await.unwrap();
        let (mut tls, _) =
            zrelay::replication::tls::connect(&connector, tcp, RELAY_NAME, Duration::from_secs(5))
                .await
                .expect("TLS handshake");
        async fn frame<R: AsyncReadExt + Unpin>(r: &mut R) -> Vec<u8> {
            let len = r.read_u32().await.expect("frame length") as usize;
            let mut buf = vec![0u8; len];
            r.read_exact(&mut buf).await.expect("frame");
            buf
        }
        assert_eq!(frame(&mut tls).await, b"Z5");
        let mut out = support::framed(b"Z5");
        out.extend(support::framed(&support::encode_call(
            Enc::Pickle,
            1,
            false,
            "register",
            &[support::Val::Str("1"), support::Val::Bool(false)],
        )));
        let root = [0u8; 8];
        let maxtid = [0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        // 40 of them: 12 MB of replies, more than the socket buffers hold.
        for msgid in 2..42 {
            out.extend(support::framed(&support::encode_call(
                Enc::Pickle,
                msgid,
                false,
                "loadBefore",
                &[support::Val::Bytes(&root), support::Val::Bytes(&maxtid)],
            )));
        }
        tls.write_all(&out).await.unwrap();
        tls.flush().await.unwrap();
        // Let zrelay fill the small window before reading anything.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = tokio::time::timeout(Duration::from_secs(20), async {
            let mut big = 0;
            while big < 40 {
                if frame(&mut tls).await.len() > 300_000 {
                    big += 1;
                }
            }
            big
        })
        .await
        .expect("all 40 loadBefore replies, whole, within 20 s");
        assert_eq!(got, 40);
    });
}
