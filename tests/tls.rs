//! Replication TLS over real 127.0.0.1 TCP, with certificates from
//! `zrelay::certgen` (including the wrong ones). Every refusal is checked by
//! its metric reason on the side that detects it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use zrelay::certgen;
use zrelay::replication::tls::{self, TlsError, TlsFiles};

/// Handshake timeout for the code under test; never reached by a passing test.
const HANDSHAKE: Duration = Duration::from_secs(3);
/// Guard so a broken test fails instead of hanging.
const GUARD: Duration = Duration::from_secs(4);

/// A certificate directory with a CA and the nodes asked for.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new(nodes: &[&str]) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        certgen::ensure_ca(dir.path()).unwrap();
        for node in nodes {
            certgen::issue_node(dir.path(), node, 1).unwrap();
        }
        Pki { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Files of `node`, trusting this PKI's CA.
    fn files(&self, node: &str) -> TlsFiles {
        self.files_trusting(node, self)
    }

    /// Files of `node` from this PKI, trusting `ca`'s CA.
    fn files_trusting(&self, node: &str, ca: &Pki) -> TlsFiles {
        TlsFiles {
            ca_file: ca.path().join(certgen::CA_CERT_FILE),
            cert_file: self.path().join(format!("{node}.pem")),
            key_file: self.path().join(format!("{node}-key.pem")),
        }
    }
}

/// A TLS listener on 127.0.0.1:0 that reports every accept outcome and
/// echoes whatever an admitted peer sends until it half-closes.
struct Server {
    addr: SocketAddr,
    outcomes: mpsc::UnboundedReceiver<Result<String, TlsError>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(files: &TlsFiles, allowed: &[&str]) -> Server {
        let acceptor = TlsAcceptor::from(tls::server_config(files).unwrap());
        let allowed: Arc<Vec<String>> = Arc::new(allowed.iter().map(|s| s.to_string()).collect());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, outcomes) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, allowed, tx) = (acceptor.clone(), allowed.clone(), tx.clone());
                tokio::spawn(async move {
                    match tls::accept(&acceptor, tcp, &allowed, HANDSHAKE).await {
                        Ok((stream, name)) => {
                            let _ = tx.send(Ok(name));
                            let (mut r, mut w) = tokio::io::split(stream);
                            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                                let _ = w.shutdown().await;
                            }
                        }
                        Err(e) => {
                            tls::record_handshake_failure(&e);
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            }
        });
        Server {
            addr,
            outcomes,
            task,
        }
    }

    /// The outcome of the next accepted connection.
    async fn outcome(&mut self) -> Result<String, TlsError> {
        tokio::time::timeout(GUARD, self.outcomes.recv())
            .await
            .expect("server reported no outcome in time")
            .expect("server task ended")
    }

    async fn refusal(&mut self) -> TlsError {
        match self.outcome().await {
            Ok(name) => panic!("server admitted {name:?}"),
            Err(e) => e,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn connector(files: &TlsFiles) -> TlsConnector {
    TlsConnector::from(tls::client_config(files).unwrap())
}

/// Connects, and if the client's handshake completes, waits for the
/// server's verdict: in TLS 1.3 a refused client certificate shows up as an
/// alert on the client's first read. Returns the server's node name if the
/// server admitted the client (proven by an echoed byte).
async fn client_attempt(
    connector: &TlsConnector,
    addr: SocketAddr,
    server_name: &str,
) -> Result<String, TlsError> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut stream, name) = tls::connect(connector, tcp, server_name, HANDSHAKE).await?;
    let _ = stream.write_all(b"?").await;
    let _ = stream.flush().await;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(GUARD, stream.read(&mut byte))
        .await
        .expect("client read timed out")
    {
        Ok(1) => Ok(name),
        Ok(_) => Err(TlsError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        Err(e) => Err(TlsError::from(e)),
    }
}

#[tokio::test]
async fn good_pair_handshakes_and_exchanges_bytes_both_ways() {
    let pki = Pki::new(&["primary", "replica"]);
    let mut server = Server::start(&pki.files("primary"), &["replica"]).await;

    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (stream, server_peer) =
        tls::connect(&connector(&pki.files("replica")), tcp, "primary", HANDSHAKE)
            .await
            .unwrap();
    assert_eq!(server_peer, "primary");
    assert_eq!(server.outcome().await.unwrap(), "replica");

    // More than one TLS record each way, written and read concurrently.
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = async {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), echoed) = tokio::time::timeout(GUARD, async { tokio::join!(writer, reader) })
        .await
        .unwrap();
    assert_eq!(echoed, sent);
}

#[tokio::test]
async fn connecting_by_loopback_address_works_and_names_the_node() {
    let pki = Pki::new(&["primary", "replica"]);
    let mut server = Server::start(&pki.files("primary"), &[]).await;
    let name = client_attempt(&connector(&pki.files("replica")), server.addr, "127.0.0.1")
        .await
        .unwrap();
    assert_eq!(name, "primary");
    assert_eq!(server.outcome().await.unwrap(), "replica");
}

#[tokio::test]
async fn client_cert_from_another_ca_is_unknown_ca() {
    let cluster = Pki::new(&["primary"]);
    let stranger = Pki::new(&["replica"]);
    let mut server = Server::start(&cluster.files("primary"), &[]).await;

    // The stranger trusts the cluster's CA, so it accepts the server...
    let client = connector(&stranger.files_trusting("replica", &cluster));
    let client_result = client_attempt(&client, server.addr, "primary").await;
    // ...but the server does not accept the stranger.
    let e = server.refusal().await;
    assert_eq!(e.reason(), "unknown_ca", "{e}");
    assert!(e.to_string().contains("ca_file"), "{e}");
    let e = client_result.unwrap_err();
    assert_eq!(e.reason(), "unknown_ca", "client side: {e}");
}

#[tokio::test]
async fn server_cert_from_another_ca_is_unknown_ca() {
    let cluster = Pki::new(&["replica"]);
    let stranger = Pki::new(&["primary"]);
    // The stranger server trusts the cluster's CA for its clients.
    let mut server = Server::start(&stranger.files_trusting("primary", &cluster), &[]).await;

    let e = client_attempt(
        &connector(&cluster.files("replica")),
        server.addr,
        "primary",
    )
    .await
    .unwrap_err();
    assert_eq!(e.reason(), "unknown_ca", "client side: {e}");
    let e = server.refusal().await;
    assert_eq!(
        e.reason(),
        "unknown_ca",
        "server side (alert from client): {e}"
    );
}

#[tokio::test]
async fn client_without_certificate_is_no_client_certificate() {
    let pki = Pki::new(&["primary"]);
    let mut server = Server::start(&pki.files("primary"), &[]).await;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.path().join(certgen::CA_CERT_FILE)).unwrap())
        .unwrap();
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let client_result = client_attempt(
        &TlsConnector::from(Arc::new(anonymous)),
        server.addr,
        "primary",
    )
    .await;

    let e = server.refusal().await;
    assert_eq!(e.reason(), "no_client_certificate", "{e}");
    let e = client_result.unwrap_err();
    assert_eq!(e.reason(), "no_client_certificate", "client side: {e}");
}

#[tokio::test]
async fn expired_client_certificate_is_expired() {
    let pki = Pki::new(&["primary"]);
    let day = Duration::from_secs(86400);
    let now = SystemTime::now();
    certgen::issue_node_with_validity(pki.path(), "replica", now - 10 * day, now - day).unwrap();
    let mut server = Server::start(&pki.files("primary"), &[]).await;

    let client_result =
        client_attempt(&connector(&pki.files("replica")), server.addr, "primary").await;
    let e = server.refusal().await;
    assert_eq!(e.reason(), "expired", "{e}");
    let e = client_result.unwrap_err();
    assert_eq!(e.reason(), "expired", "client side: {e}");
}

#[tokio::test]
async fn expired_server_certificate_is_expired_on_the_client() {
    let pki = Pki::new(&["replica"]);
    let day = Duration::from_secs(86400);
    let now = SystemTime::now();
    certgen::issue_node_with_validity(pki.path(), "primary", now - 10 * day, now - day).unwrap();
    let mut server = Server::start(&pki.files("primary"), &[]).await;

    let e = client_attempt(&connector(&pki.files("replica")), server.addr, "primary")
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "expired", "{e}");
    assert_eq!(server.refusal().await.reason(), "expired");
}

#[tokio::test]
async fn server_certificate_for_another_name_is_bad_certificate() {
    let pki = Pki::new(&["primary", "replica"]);
    let mut server = Server::start(&pki.files("primary"), &[]).await;
    let e = client_attempt(&connector(&pki.files("replica")), server.addr, "primary-2")
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "bad_certificate", "{e}");
    assert_eq!(server.refusal().await.reason(), "bad_certificate");
}

#[tokio::test]
async fn peer_not_in_allow_list_is_refused_and_others_are_admitted() {
    let pki = Pki::new(&["primary", "replica-1", "replica-2"]);
    let mut server = Server::start(&pki.files("primary"), &["replica-2", "REPLICA-3"]).await;

    let client_result =
        client_attempt(&connector(&pki.files("replica-1")), server.addr, "primary").await;
    let e = server.refusal().await;
    assert_eq!(e.reason(), "peer_not_allowed", "{e}");
    assert!(e.to_string().contains("replica-1"), "{e}");
    assert!(
        client_result.is_err(),
        "refused client must not get an echo"
    );

    let name = client_attempt(&connector(&pki.files("replica-2")), server.addr, "primary")
        .await
        .unwrap();
    assert_eq!(name, "primary");
    assert_eq!(server.outcome().await.unwrap(), "replica-2");
}

/// Sends `bytes` in plaintext and reads whatever comes back until the server
/// closes the connection.
async fn plaintext_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(GUARD, tcp.read_to_end(&mut reply))
        .await
        .expect("server did not close the plaintext connection")
        .ok();
    reply
}

#[tokio::test]
async fn plaintext_is_not_tls_and_the_listener_keeps_accepting() {
    let pki = Pki::new(&["primary", "replica"]);
    let mut server = Server::start(&pki.files("primary"), &[]).await;

    // A ZEO client's handshake, then an HTTP probe.
    for bytes in [
        &b"\x00\x00\x00\x02Z5"[..],
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ] {
        plaintext_exchange(server.addr, bytes).await;
        let e = server.refusal().await;
        assert_eq!(e.reason(), "not_tls", "{e}");
        assert!(e.to_string().contains("not speaking TLS"), "{e}");
    }

    let name = client_attempt(&connector(&pki.files("replica")), server.addr, "primary")
        .await
        .unwrap();
    assert_eq!(name, "primary");
    assert_eq!(server.outcome().await.unwrap(), "replica");
}

#[tokio::test]
async fn client_connecting_to_a_plaintext_server_is_not_tls() {
    let pki = Pki::new(&["replica"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // A ZEO server speaks first: its protocol handshake.
    let zeo = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.write_all(b"\x00\x00\x00\x02Z5").await.unwrap();
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
    });
    let e = client_attempt(&connector(&pki.files("replica")), addr, "primary")
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "not_tls", "{e}");
    zeo.await.unwrap();
}

/// A TLS 1.2 ClientHello, as sent by a client that cannot do TLS 1.3;
/// with `supported_versions` listing only TLS 1.2 (newer stacks capped at
/// 1.2) or without it (older stacks).
fn tls12_client_hello(with_supported_versions: bool) -> Vec<u8> {
    fn push_ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend(kind.to_be_bytes());
        out.extend((data.len() as u16).to_be_bytes());
        out.extend(data);
    }
    let mut ext = Vec::new();
    push_ext(&mut ext, 0x000a, &[0, 4, 0x00, 0x17, 0x00, 0x1d]); // groups: P-256, X25519
    push_ext(&mut ext, 0x000b, &[1, 0]); // EC point formats: uncompressed
    push_ext(
        &mut ext,
        0x000d,
        &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
    ); // signature algorithms
    if with_supported_versions {
        push_ext(&mut ext, 0x002b, &[2, 0x03, 0x03]);
    }
    let mut body = vec![0x03, 0x03]; // legacy_version TLS 1.2
    body.extend([0x5a; 32]); // random
    body.push(0); // no session id
    let suites: [u16; 4] = [0xc02b, 0xc02f, 0xc02c, 0xc030];
    body.extend((suites.len() as u16 * 2).to_be_bytes());
    suites.iter().for_each(|s| body.extend(s.to_be_bytes()));
    body.extend([1, 0]); // compression: null
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut handshake = vec![0x01]; // ClientHello
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

#[tokio::test]
async fn tls12_only_client_is_refused() {
    let pki = Pki::new(&["primary"]);
    let mut server = Server::start(&pki.files("primary"), &[]).await;
    for with_supported_versions in [true, false] {
        let reply =
            plaintext_exchange(server.addr, &tls12_client_hello(with_supported_versions)).await;
        let e = server.refusal().await;
        assert_eq!(e.reason(), "incompatible", "{e}");
        // A fatal protocol_version alert (level 2, description 70).
        assert_eq!(reply.first(), Some(&0x15), "alert record: {reply:02x?}");
        assert_eq!(reply.get(5..7), Some(&[2u8, 70][..]), "{reply:02x?}");
    }
}

#[tokio::test]
async fn silent_peer_times_out() {
    let pki = Pki::new(&["primary"]);
    let acceptor = TlsAcceptor::from(tls::server_config(&pki.files("primary")).unwrap());
    // The peer end stays open and never sends: only the timeout can end this.
    let (_silent_peer, io) = tokio::io::duplex(1024);
    let e = tls::accept(&acceptor, io, &[], Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "timeout", "{e}");
    assert!(e.to_string().contains("100ms"), "{e}");
}

#[tokio::test]
async fn peer_closing_during_handshake_is_io() {
    let pki = Pki::new(&["primary"]);
    let mut server = Server::start(&pki.files("primary"), &[]).await;
    drop(TcpStream::connect(server.addr).await.unwrap());
    assert_eq!(server.refusal().await.reason(), "io");
}
