//! TLS pieces shared by every door zrelay serves over TLS: loading PEM
//! files with errors an operator can act on, naming the peer of a
//! certificate, reading certificate expiry, and classifying handshake
//! failures into a small fixed set of reasons.
//!
//! The doors themselves live with their owners: the replication stream in
//! [`crate::replication::tls`], the ZEO client port in [`client`]. The crypto
//! provider is always ring, passed explicitly: nothing depends on a
//! process-wide default provider being installed.

pub mod backend;
pub mod client;
pub mod expiry;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
/// Re-exported for callers (and fuzz targets) handing us raw DER.
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;
use rustls::{AlertDescription, CertificateError, InconsistentKeys, RootCertStore};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Every value [`TlsError::reason`] can return (the `reason` label's value set
/// of the handshake failure counters).
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

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or has the wrong content.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    /// The files are fine one by one but do not make a usable configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("TLS handshake did not complete within {0:?} (a plaintext ZEO client waits for the server to speak first: is the client configured for TLS?)")]
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
        // probe on a TLS port, or a peer without TLS enabled.
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
        ("unknown_ca", false) => " (the peer's certificate is not issued by our ca_file: a certificate of another CA, or a stale ca_file?)",
        ("unknown_ca", true) => " (the peer does not trust our certificate: it uses a different CA file)",
        ("expired", false) => " (the peer's certificate has expired: reissue it, e.g. with `zrelay cert`)",
        ("expired", true) => " (the peer says our certificate has expired: reissue it with `zrelay cert`)",
        ("no_client_certificate", _) => " (the peer presented no client certificate, and one is required)",
        ("incompatible", _) => " (the peer offers no TLS version or cipher suite we accept: check min_version)",
        _ => "",
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn file_error(path: &Path, problem: impl Into<String>) -> TlsError {
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

/// The certificates of a PEM file (a chain, end-entity first, or CAs).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from_pem(path, &read_file(path)?)
}

/// [`load_certs`] of bytes already read from `path` (named in errors).
pub fn certs_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| file_error(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        let problem = if has_section::<PrivateKeyDer<'static>>(pem) {
            "no certificate in PEM file (it holds a private key: cert_file and key_file swapped?)"
        } else {
            "no certificate in PEM file (expected a \"BEGIN CERTIFICATE\" section)"
        };
        return Err(file_error(path, problem));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    key_from_pem(path, &read_file(path)?)
}

/// [`load_key`] of bytes already read from `path` (named in errors).
pub fn key_from_pem(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        pem::Error::NoItemsFound if has_section::<CertificateDer<'static>>(pem) => file_error(
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

/// A trust store holding every certificate of a PEM file.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    roots_from_pem(path, &read_file(path)?)
}

/// [`load_roots`] of bytes already read from `path` (named in errors).
pub fn roots_from_pem(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(path, pem)? {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// Error of `with_single_cert` / `with_client_auth_cert`: blame the key or
/// the certificate file.
pub fn identity_error(cert_file: &Path, key_file: &Path, e: rustls::Error) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => file_error(
            key_file,
            format!(
                "private key does not match the certificate in {}",
                cert_file.display()
            ),
        ),
        rustls::Error::InconsistentKeys(_) | rustls::Error::General(_) => {
            file_error(key_file, format!("unusable private key: {e}"))
        }
        e => file_error(cert_file, format!("unusable certificate: {e}")),
    }
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

/// Every name a certificate vouches for, for authorization: all its DNS
/// subject alternative names, then its subject common names. Empty if the
/// certificate does not parse.
pub fn cert_names(cert: &CertificateDer) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(cert) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            names.push(cn.to_string());
        }
    }
    names
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

    pub(crate) fn cert_with(sans: &[&str], cn: Option<&str>) -> CertificateDer<'static> {
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
    fn cert_names_lists_dns_sans_then_cn() {
        let c = cert_with(&["localhost", "127.0.0.1", "app-1", "app"], Some("cn-x"));
        assert_eq!(cert_names(&c), ["localhost", "app-1", "app", "cn-x"]);
        assert!(cert_names(&CertificateDer::from(vec![1, 2, 3])).is_empty());
    }
}
