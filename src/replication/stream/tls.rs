//! TLS 1.3 with mutual authentication for the primary ↔ replica stream.
//!
//! Both ends present a certificate issued by the cluster CA (`ca_file`; see
//! [`crate::certgen`]) and verify the other's against it. The replica (TLS
//! client) checks that the primary's certificate is valid for the name it
//! dialled; the primary (TLS server) requires a client certificate and then
//! checks the client's node name against `allowed_peers`.
//!
//! PEM loading, peer names and failure reasons are shared with the client
//! port's TLS ([`crate::tls`]). Every failure has a [`TlsError::reason`] from a small fixed set
//! ([`REASONS`]) that labels `zrelay_tls_handshake_failures_total`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use crate::tls::{file_error, load_certs, load_key, load_roots, provider};

/// Counter of failed replication TLS handshakes, labelled by `reason`.
pub const HANDSHAKE_FAILURES: &str = "zrelay_tls_handshake_failures_total";

pub use crate::tls::{peer_name, TlsError, REASONS};

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

fn identity_error(files: &TlsFiles, e: rustls::Error) -> TlsError {
    crate::tls::identity_error(&files.cert_file, &files.key_file, e)
}

fn tls13_only(e: rustls::Error) -> TlsError {
    TlsError::Config(format!("TLS 1.3 with the ring provider: {e}"))
}

/// The primary's side: TLS 1.3 only, a client certificate issued by
/// `ca_file` is required, and this node presents `cert_file`/`key_file`.
/// Session resumption is off, so every connection re-verifies the peer's
/// certificate (an expired or replaced certificate cannot ride on a ticket).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    tls13_server(files, true).map(Arc::new)
}

/// The admin HTTP listener's side (`[admin.tls]`): TLS 1.3, this node
/// presents `cert_file`/`key_file`; a client certificate issued by `ca_file`
/// is verified if presented but not required (health probes carry none;
/// mutating calls may authenticate with one, see `admin::auth`).
pub fn admin_server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = tls13_server(files, false)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS 1.3 server presenting `cert_file`/`key_file` and verifying client
/// certificates against `ca_file` (`require_client_cert`: or refusing
/// clients without one). No session resumption.
fn tls13_server(files: &TlsFiles, require_client_cert: bool) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let roots = load_roots(&files.ca_file)?;
    let mut verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    if !require_client_cert {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier.build().map_err(|e| {
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
    Ok(config)
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
    use rustls::InvalidMessage;
    use std::fs;

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
