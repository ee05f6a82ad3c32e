//! TLS 1.3 with mutual authentication for the primary ↔ replica stream.
//!
//! Both ends present a certificate issued by the cluster CA (`ca_file`; see
//! [`crate::certgen`]) and verify the other's against it. The replica (TLS
//! client) checks that the primary's certificate is valid for the name it
//! dialled; the primary (TLS server) requires a client certificate and then
//! checks the client's node name against `allowed_peers`.
//!
//! The crypto provider is always ring, passed explicitly: nothing here
//! depends on a process-wide default provider being installed.
//!
//! Every failure has a [`TlsError::reason`] from a small fixed set
//! ([`REASONS`]) that labels `zrelay_tls_handshake_failures_total`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, InconsistentKeys, RootCertStore, ServerConfig,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Counter of failed replication TLS handshakes, labelled by `reason`.
pub const HANDSHAKE_FAILURES: &str = "zrelay_tls_handshake_failures_total";

/// Every value [`TlsError::reason`] can return (the `reason` label's value set).
pub const REASONS: &[&str] = &[
    "not_tls",
    "unknown_ca",
    "bad_certificate",
    "expired",
    "no_client_certificate",
    "peer_not_allowed",
    "incompatible",
    "protocol",
    "timeout",
    "io",
    "config",
];

/// The `[replication.tls]` section: PEM files of the cluster CA and of this
/// node's certificate and private key. Unknown keys are an error, so a typo
/// cannot silently leave a node without the intended configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificate(s) that peers' certificates must chain to.
    pub ca_file: PathBuf,
    /// This node's certificate (chain), end-entity first.
    pub cert_file: PathBuf,
    /// This node's private key (PKCS#8, SEC1 or PKCS#1 PEM).
    pub key_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of [`TlsFiles`] is missing, unreadable or has the wrong content.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    /// The files are fine one by one but do not make a usable configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("TLS handshake did not complete within {0:?}")]
    Timeout(Duration),
    /// The TLS library refused the handshake (or the peer did, with an alert).
    #[error("TLS handshake failed: {}{}", .0, hint(.0))]
    Handshake(#[source] rustls::Error),
    /// The handshake succeeded but the peer's node name is not allowed.
    #[error("peer {name:?} is not in allowed_peers")]
    PeerNotAllowed { name: String },
    /// The peer's certificate verified but names no node (no DNS SAN, no CN).
    #[error(
        "peer certificate carries no node name (no DNS subject alternative name or common name)"
    )]
    NoPeerName,
    #[error("I/O error during TLS handshake: {0}")]
    Io(#[source] io::Error),
}

impl TlsError {
    /// A short fixed label for metrics (one of [`REASONS`]).
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::File { .. } | TlsError::Config(_) => "config",
            TlsError::Timeout(_) => "timeout",
            TlsError::Handshake(e) => classify(e),
            TlsError::PeerNotAllowed { .. } => "peer_not_allowed",
            TlsError::NoPeerName => "bad_certificate",
            TlsError::Io(_) => "io",
        }
    }
}

/// tokio-rustls reports TLS failures as `io::Error`s wrapping a
/// `rustls::Error`; unwrap those so they get a precise reason. Also useful for
/// errors of the first reads after the handshake: in TLS 1.3 the client
/// finishes before the server has judged its certificate, so a rejection of
/// the client's certificate (an alert) reaches the client on its first read.
impl From<io::Error> for TlsError {
    fn from(e: io::Error) -> Self {
        if !e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
            return TlsError::Io(e);
        }
        let kind = e.kind();
        match e
            .into_inner()
            .map(|inner| inner.downcast::<rustls::Error>())
        {
            Some(Ok(tls)) => TlsError::Handshake(*tls),
            Some(Err(other)) => TlsError::Io(io::Error::new(kind, other)),
            None => TlsError::Io(kind.into()),
        }
    }
}

/// Maps a rustls error, raised locally or received as an alert from the
/// peer, to a reason label.
fn classify(e: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match e {
        // Bytes that are not TLS records: a plaintext ZEO client or an HTTP
        // probe on the replication port, or a peer without TLS enabled.
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. }
        | E::PeerSentOversizedRecord => "not_tls",
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            _ => "bad_certificate",
        },
        E::NoCertificatesPresented => "no_client_certificate",
        E::PeerIncompatible(_) | E::NoApplicationProtocol => "incompatible",
        E::AlertReceived(alert) => match alert {
            AlertDescription::UnknownCA => "unknown_ca",
            AlertDescription::CertificateExpired => "expired",
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateUnknown
            | AlertDescription::BadCertificateStatusResponse => "bad_certificate",
            AlertDescription::CertificateRequired => "no_client_certificate",
            AlertDescription::AccessDenied => "peer_not_allowed",
            AlertDescription::ProtocolVersion
            | AlertDescription::HandshakeFailure
            | AlertDescription::InsufficientSecurity
            | AlertDescription::NoApplicationProtocol => "incompatible",
            _ => "protocol",
        },
        // PeerMisbehaved, DecryptError, General, ...: a TLS peer that broke
        // the protocol, or a local problem.
        _ => "protocol",
    }
}

/// An operator's hint appended to the rustls message.
fn hint(e: &rustls::Error) -> &'static str {
    let received = matches!(e, rustls::Error::AlertReceived(_));
    match (classify(e), received) {
        ("not_tls", _) => " (the peer is not speaking TLS: plaintext client, or TLS not enabled on its side?)",
        ("unknown_ca", false) => " (the peer's certificate is not issued by our ca_file: nodes of different clusters, or a stale ca_file?)",
        ("unknown_ca", true) => " (the peer does not trust our certificate: it uses a different ca_file)",
        ("expired", false) => " (the peer's certificate has expired: reissue it with `zrelay cert`)",
        ("expired", true) => " (the peer says our certificate has expired: reissue it with `zrelay cert`)",
        ("no_client_certificate", _) => " (the peer presented no client certificate: is its [replication.tls] configured?)",
        ("incompatible", _) => " (the peer does not offer TLS 1.3?)",
        _ => "",
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => file_error(path, "file not found"),
        _ => file_error(path, format!("cannot read: {e}")),
    })
}

/// Whether `pem` holds a section of the given kind, for error hints.
fn has_section<T: PemObject>(pem: &[u8]) -> bool {
    T::pem_slice_iter(pem).any(|item| item.is_ok())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| file_error(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        let problem = if has_section::<PrivateKeyDer<'static>>(&pem) {
            "no certificate in PEM file (it holds a private key: cert_file and key_file swapped?)"
        } else {
            "no certificate in PEM file (expected a \"BEGIN CERTIFICATE\" section)"
        };
        return Err(file_error(path, problem));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound if has_section::<CertificateDer<'static>>(&pem) => file_error(
            path,
            "no private key in PEM file (it holds a certificate: cert_file and key_file swapped?)",
        ),
        pem::Error::NoItemsFound => file_error(
            path,
            "no private key in PEM file (expected a \"BEGIN PRIVATE KEY\" section)",
        ),
        e => file_error(path, format!("invalid PEM: {e}")),
    })
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// Error of `with_single_cert` / `with_client_auth_cert`: blame the key or
/// the certificate file.
fn identity_error(files: &TlsFiles, e: rustls::Error) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => file_error(
            &files.key_file,
            format!(
                "private key does not match the certificate in {}",
                files.cert_file.display()
            ),
        ),
        rustls::Error::InconsistentKeys(_) | rustls::Error::General(_) => {
            file_error(&files.key_file, format!("unusable private key: {e}"))
        }
        e => file_error(&files.cert_file, format!("unusable certificate: {e}")),
    }
}

fn tls13_only(e: rustls::Error) -> TlsError {
    TlsError::Config(format!("TLS 1.3 with the ring provider: {e}"))
}

/// The primary's side: TLS 1.3 only, a client certificate issued by
/// `ca_file` is required, and this node presents `cert_file`/`key_file`.
/// Session resumption is off, so every connection re-verifies the peer's
/// certificate (an expired or replaced certificate cannot ride on a ticket).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let roots = load_roots(&files.ca_file)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| {
            file_error(
                &files.ca_file,
                format!("cannot verify clients with it: {e}"),
            )
        })?;
    let certs = load_certs(&files.cert_file)?;
    let key = load_key(&files.key_file)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls13_only)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| identity_error(files, e))?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The admin HTTP listener's side (`[admin.tls]`): TLS 1.3, this node
/// presents `cert_file`/`key_file`; a client certificate issued by `ca_file`
/// is verified if presented but not required (health probes carry none;
/// mutating calls may authenticate with one, see `admin::auth`).
pub fn admin_server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let roots = load_roots(&files.ca_file)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| {
            file_error(
                &files.ca_file,
                format!("cannot verify clients with it: {e}"),
            )
        })?;
    let certs = load_certs(&files.cert_file)?;
    let key = load_key(&files.key_file)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls13_only)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| identity_error(files, e))?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client of an `https://` admin listener (`zrelay drain|reload`): trusts
/// `ca_file`; presents a client certificate if `client` names one.
pub fn https_client_config(
    ca_file: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(ca_file)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls13_only)?
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let files = TlsFiles {
                ca_file: ca_file.to_path_buf(),
                cert_file: cert.to_path_buf(),
                key_file: key.to_path_buf(),
            };
            builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|e| identity_error(&files, e))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The replica's side: TLS 1.3 only, the server must present a certificate
/// issued by `ca_file` valid for the name dialled, and this node presents
/// `cert_file`/`key_file` as its client certificate. No session resumption.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(&files.ca_file)?;
    let certs = load_certs(&files.cert_file)?;
    let key = load_key(&files.key_file)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls13_only)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| identity_error(files, e))?;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The node name of a peer: the first DNS subject alternative name of its
/// end-entity certificate (`certs[0]`) other than "localhost", else its
/// subject common name. `None` if there is neither or the certificate does
/// not parse.
pub fn peer_name(certs: &[CertificateDer]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(certs.first()?).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let dns = san.value.general_names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) if !d.eq_ignore_ascii_case("localhost") => Some(*d),
            _ => None,
        });
        if let Some(d) = dns {
            return Some(d.to_string());
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn
}

/// Runs the server side of the handshake on `io` (within `timeout`), then
/// admits the peer if its node name is in `allowed_peers` (compared ignoring
/// ASCII case, like DNS names; an empty list admits any certificate from the
/// CA). Returns the stream and the peer's node name.
///
/// On error the connection is dropped (closed). Count failures with
/// [`record_handshake_failure`]. A peer refused by the allow-list has already
/// completed its handshake and only sees the connection close.
pub async fn accept<S>(
    acceptor: &TlsAcceptor,
    io: S,
    allowed_peers: &[String],
    timeout: Duration,
) -> Result<(server::TlsStream<S>, String), TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stream = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Err(_) => return Err(TlsError::Timeout(timeout)),
        Ok(result) => result?,
    };
    let name = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(peer_name)
        .ok_or(TlsError::NoPeerName)?;
    if !allowed_peers.is_empty() && !allowed_peers.iter().any(|p| p.eq_ignore_ascii_case(&name)) {
        return Err(TlsError::PeerNotAllowed { name });
    }
    Ok((stream, name))
}

/// Runs the client side of the handshake on `io` (within `timeout`),
/// requiring the server's certificate to be valid for `server_name` (a DNS
/// name or an IP address). Returns the stream and the server's node name
/// (see [`peer_name`]).
///
/// In TLS 1.3 the client is done before the server has checked the client's
/// certificate: if the server refuses it, the alert surfaces as an error of
/// the first read, which `TlsError::from(io_error)` classifies.
pub async fn connect<S>(
    connector: &TlsConnector,
    io: S,
    server_name: &str,
    timeout: Duration,
) -> Result<(client::TlsStream<S>, String), TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| TlsError::Config(format!("invalid TLS server name {server_name:?}: {e}")))?;
    let stream = match tokio::time::timeout(timeout, connector.connect(name, io)).await {
        Err(_) => return Err(TlsError::Timeout(timeout)),
        Ok(result) => result?,
    };
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(peer_name)
        .ok_or(TlsError::NoPeerName)?;
    Ok((stream, peer))
}

/// Counts a failed handshake in `zrelay_tls_handshake_failures_total{reason}`.
pub fn record_handshake_failure(e: &TlsError) {
    metrics::counter!(HANDSHAKE_FAILURES, "reason" => e.reason()).increment(1);
}

/// Describes this module's metrics (call once, next to `crate::metrics::describe`).
pub fn describe() {
    metrics::describe_counter!(
        HANDSHAKE_FAILURES,
        "Replication TLS handshakes that failed, by reason (not_tls, unknown_ca, bad_certificate, expired, no_client_certificate, peer_not_allowed, incompatible, protocol, timeout, io, config)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{InvalidMessage, PeerIncompatible, PeerMisbehaved};

    #[test]
    fn rustls_errors_map_to_reasons() {
        use rustls::Error as E;
        let cases: Vec<(E, &str)> = vec![
            (
                E::InvalidMessage(InvalidMessage::InvalidContentType),
                "not_tls",
            ),
            (
                E::InvalidMessage(InvalidMessage::UnknownProtocolVersion),
                "not_tls",
            ),
            (E::PeerSentOversizedRecord, "not_tls"),
            (
                E::InvalidCertificate(CertificateError::UnknownIssuer),
                "unknown_ca",
            ),
            (E::InvalidCertificate(CertificateError::Expired), "expired"),
            (
                E::InvalidCertificate(CertificateError::BadSignature),
                "bad_certificate",
            ),
            (
                E::InvalidCertificate(CertificateError::NotValidYet),
                "bad_certificate",
            ),
            (
                E::InvalidCertificate(CertificateError::NotValidForName),
                "bad_certificate",
            ),
            (
                E::InvalidCertificate(CertificateError::InvalidPurpose),
                "bad_certificate",
            ),
            (E::NoCertificatesPresented, "no_client_certificate"),
            (
                E::PeerIncompatible(PeerIncompatible::Tls12NotOfferedOrEnabled),
                "incompatible",
            ),
            (
                E::PeerMisbehaved(PeerMisbehaved::TooManyKeyUpdateRequests),
                "protocol",
            ),
            (E::DecryptError, "protocol"),
            (E::AlertReceived(AlertDescription::UnknownCA), "unknown_ca"),
            (
                E::AlertReceived(AlertDescription::CertificateExpired),
                "expired",
            ),
            (
                E::AlertReceived(AlertDescription::BadCertificate),
                "bad_certificate",
            ),
            (
                E::AlertReceived(AlertDescription::CertificateRequired),
                "no_client_certificate",
            ),
            (
                E::AlertReceived(AlertDescription::AccessDenied),
                "peer_not_allowed",
            ),
            (
                E::AlertReceived(AlertDescription::ProtocolVersion),
                "incompatible",
            ),
            (E::AlertReceived(AlertDescription::DecodeError), "protocol"),
        ];
        for (e, want) in cases {
            let shown = format!("{e:?}");
            let e = TlsError::Handshake(e);
            assert_eq!(e.reason(), want, "{shown}");
            assert!(REASONS.contains(&e.reason()));
        }
        assert_eq!(
            TlsError::Timeout(Duration::from_secs(1)).reason(),
            "timeout"
        );
        assert_eq!(
            TlsError::PeerNotAllowed { name: "x".into() }.reason(),
            "peer_not_allowed"
        );
        assert_eq!(TlsError::NoPeerName.reason(), "bad_certificate");
        assert_eq!(TlsError::Config("x".into()).reason(), "config");
    }

    #[test]
    fn io_errors_wrapping_rustls_errors_are_unwrapped() {
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(TlsError::from(wrapped).reason(), "unknown_ca");
        let plain = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert!(matches!(TlsError::from(plain), TlsError::Io(_)));
        let other = io::Error::other("something else");
        assert_eq!(TlsError::from(other).reason(), "io");
    }

    #[test]
    fn tls_files_deserialize_strictly() {
        let files: TlsFiles =
            toml::from_str("ca_file = \"a\"\ncert_file = \"b\"\nkey_file = \"c\"\n").unwrap();
        assert_eq!(files.ca_file, PathBuf::from("a"));
        assert_eq!(files.key_file, PathBuf::from("c"));
        let typo = toml::from_str::<TlsFiles>(
            "ca_file = \"a\"\ncert_file = \"b\"\nkey_file = \"c\"\nca_fiel = \"d\"\n",
        );
        assert!(typo.unwrap_err().to_string().contains("ca_fiel"));
        assert!(toml::from_str::<TlsFiles>("ca_file = \"a\"\ncert_file = \"b\"\n").is_err());
    }

    fn pki() -> (tempfile::TempDir, TlsFiles) {
        let dir = tempfile::tempdir().unwrap();
        crate::certgen::ensure_ca(dir.path()).unwrap();
        let (cert_file, key_file) = crate::certgen::issue_node(dir.path(), "node-a", 1).unwrap();
        let files = TlsFiles {
            ca_file: dir.path().join(crate::certgen::CA_CERT_FILE),
            cert_file,
            key_file,
        };
        (dir, files)
    }

    fn both_fail(files: &TlsFiles) -> (TlsError, TlsError) {
        let s = server_config(files).expect_err("server_config should fail");
        let c = client_config(files).expect_err("client_config should fail");
        (s, c)
    }

    #[test]
    fn good_files_load() {
        let (_dir, files) = pki();
        let server = server_config(&files).unwrap();
        assert_eq!(server.send_tls13_tickets, 0);
        client_config(&files).unwrap();
    }

    #[test]
    fn missing_file_is_named() {
        let (dir, mut files) = pki();
        files.cert_file = dir.path().join("nope.pem");
        for e in <[TlsError; 2]>::from(both_fail(&files)) {
            assert_eq!(e.reason(), "config");
            let msg = e.to_string();
            assert!(
                msg.contains("nope.pem") && msg.contains("not found"),
                "{msg}"
            );
        }
    }

    #[test]
    fn swapped_cert_and_key_are_explained() {
        let (_dir, files) = pki();
        let swapped = TlsFiles {
            ca_file: files.ca_file.clone(),
            cert_file: files.key_file.clone(),
            key_file: files.cert_file.clone(),
        };
        for e in <[TlsError; 2]>::from(both_fail(&swapped)) {
            let msg = e.to_string();
            assert!(
                msg.starts_with(&files.key_file.display().to_string()),
                "{msg}"
            );
            assert!(
                msg.contains("no certificate") && msg.contains("swapped"),
                "{msg}"
            );
        }
        // The key check is reached when the cert file is right.
        let key_is_cert = TlsFiles {
            key_file: files.cert_file.clone(),
            ..files.clone()
        };
        for e in <[TlsError; 2]>::from(both_fail(&key_is_cert)) {
            let msg = e.to_string();
            assert!(
                msg.contains("no private key") && msg.contains("swapped"),
                "{msg}"
            );
        }
    }

    #[test]
    fn garbage_files_are_refused() {
        let (dir, files) = pki();
        let junk = dir.path().join("junk.pem");
        fs::write(&junk, "hello\n").unwrap();
        let with_junk_ca = TlsFiles {
            ca_file: junk.clone(),
            ..files.clone()
        };
        for e in <[TlsError; 2]>::from(both_fail(&with_junk_ca)) {
            let msg = e.to_string();
            assert!(
                msg.contains("junk.pem") && msg.contains("no certificate"),
                "{msg}"
            );
        }
        let with_junk_key = TlsFiles {
            key_file: junk,
            ..files
        };
        for e in <[TlsError; 2]>::from(both_fail(&with_junk_key)) {
            assert!(e.to_string().contains("no private key"), "{e}");
        }
    }

    #[test]
    fn key_not_matching_certificate_is_named() {
        let (dir, files) = pki();
        let (_, other_key) = crate::certgen::issue_node(dir.path(), "node-b", 1).unwrap();
        let mismatched = TlsFiles {
            key_file: other_key,
            ..files.clone()
        };
        for e in <[TlsError; 2]>::from(both_fail(&mismatched)) {
            let msg = e.to_string();
            assert!(msg.contains("node-b-key.pem"), "{msg}");
            assert!(msg.contains("does not match"), "{msg}");
            assert!(msg.contains("node-a.pem"), "{msg}");
        }
    }

    fn cert_with(sans: &[&str], cn: Option<&str>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn peer_name_prefers_first_non_localhost_dns_san_then_cn() {
        let c = cert_with(
            &["localhost", "127.0.0.1", "replica-2", "other"],
            Some("cn"),
        );
        assert_eq!(peer_name(&[c]).as_deref(), Some("replica-2"));
        let c = cert_with(&["localhost", "::1"], Some("node-cn"));
        assert_eq!(peer_name(&[c]).as_deref(), Some("node-cn"));
        let c = cert_with(&[], Some("only-cn"));
        assert_eq!(peer_name(&[c]).as_deref(), Some("only-cn"));
        let c = cert_with(&["LocalHost"], None);
        assert_eq!(peer_name(&[c]), None);
        assert_eq!(peer_name(&[]), None);
        assert_eq!(peer_name(&[CertificateDer::from(vec![1, 2, 3])]), None);
    }

    #[test]
    fn handshake_failures_are_counted_by_reason() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            record_handshake_failure(&TlsError::Timeout(Duration::from_secs(1)));
            record_handshake_failure(&TlsError::Timeout(Duration::from_secs(1)));
            record_handshake_failure(&TlsError::Handshake(rustls::Error::InvalidMessage(
                InvalidMessage::InvalidContentType,
            )));
        });
        let text = handle.render();
        assert!(
            text.contains("zrelay_tls_handshake_failures_total{reason=\"timeout\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("zrelay_tls_handshake_failures_total{reason=\"not_tls\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# HELP zrelay_tls_handshake_failures_total"),
            "{text}"
        );
    }
}
