//! TLS on the ZEO client port (`[client.tls]`): zrelay terminates TLS and
//! relays to its backend as usual. Unmodified ZEO clients connect with
//! `ClientStorage(addr, ssl=context, ssl_server_hostname=...)`.
//!
//! Authorization is by client certificate: a certificate from `ca_file`
//! with a name (DNS subject alternative name or common name) matching one of
//! `read_write_clients` may write; any other authenticated client is
//! read-only at this gate (refused like on a replica,
//! [`crate::relay::read_only`]). A client without a certificate (only
//! possible without `require_client_cert`) gets `default_access`.
//!
//! The handshake runs in the connection's own task (see
//! [`crate::relay::listener::Gate`]) within the client handshake timeout. A
//! refusal is logged with its reason and counted in
//! `zrelay_client_tls_handshake_failures_total{reason}`; the connection is
//! closed before anything reaches the backend.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::ServerConfig;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{cert_names, file_error, identity_error, load_certs, load_key, load_roots, peer_name};
use super::{provider, TlsError, REASONS};
use crate::relay::listener::{Admission, Admitted, Gate};
use crate::relay::Access;

/// Counter of refused client TLS connections, by reason.
pub const HANDSHAKE_FAILURES: &str = "zrelay_client_tls_handshake_failures_total";
/// Counter of client TLS connections admitted, by the access granted.
pub const ADMITTED: &str = "zrelay_client_tls_admitted_total";

/// Oldest TLS version a client may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MinVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// The `[client.tls]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// This node's certificate (chain) presented to clients, end-entity first.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// CA certificate(s) client certificates must chain to. Absent: clients
    /// present no certificate and all get `default_access`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate from `ca_file`.
    #[serde(default)]
    pub require_client_cert: bool,
    /// "1.2" (default) or "1.3".
    #[serde(default = "default_min_version")]
    pub min_version: MinVersion,
    /// Client certificate names (DNS SAN or CN; `*` matches any run of
    /// characters, case is ignored) that may write. Other authenticated
    /// clients are read-only.
    #[serde(default)]
    pub read_write_clients: Vec<String>,
    /// Access of clients that present no certificate matching
    /// `read_write_clients`, when `require_client_cert` is false:
    /// "read-write" (default) or "read-only".
    #[serde(default)]
    pub default_access: Option<Access>,
}

fn default_min_version() -> MinVersion {
    MinVersion::Tls12
}

impl ClientTlsConfig {
    /// Cross-key checks; `Err((key, message))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.require_client_cert && self.ca_file.is_none() {
            return Err((
                "client.tls.require_client_cert",
                "needs ca_file (the CA client certificates must chain to)".into(),
            ));
        }
        if !self.read_write_clients.is_empty() && self.ca_file.is_none() {
            return Err((
                "client.tls.read_write_clients",
                "needs ca_file: without it no client certificate is ever checked".into(),
            ));
        }
        if self.require_client_cert && self.default_access.is_some() {
            return Err((
                "client.tls.default_access",
                "has no effect with require_client_cert = true (clients not in read_write_clients are read-only)".into(),
            ));
        }
        let files = [
            ("client.tls.cert_file", Some(&self.cert_file)),
            ("client.tls.key_file", Some(&self.key_file)),
            ("client.tls.ca_file", self.ca_file.as_ref()),
        ];
        for (key, p) in files {
            if let Some(p) = p.filter(|p| !p.is_file()) {
                return Err((key, format!("{} is not a readable file", p.display())));
            }
        }
        Ok(())
    }

    /// The access of a client: `names` are its verified certificate's names
    /// (`None` without a certificate).
    pub fn access_for(&self, names: Option<&[String]>) -> Access {
        let listed = names.is_some_and(|names| {
            self.read_write_clients
                .iter()
                .any(|pat| names.iter().any(|n| matches_pattern(pat, n)))
        });
        if listed {
            Access::ReadWrite
        } else if self.require_client_cert {
            Access::ReadOnly
        } else {
            self.default_access.unwrap_or(Access::ReadWrite)
        }
    }
}

/// `*` matches any run of characters (including none); everything else
/// matches itself, ignoring ASCII case like DNS names. Hand-written: a glob
/// crate would bring path semantics (`/`, `**`, classes) that names do not
/// need and an operator would not expect.
pub fn matches_pattern(pattern: &str, name: &str) -> bool {
    let p = pattern.as_bytes();
    let n = name.as_bytes();
    // Classic wildcard matching with one backtrack point: linear in practice.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi].eq_ignore_ascii_case(&n[ni]) {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The rustls server configuration of the client port.
pub fn server_config(cfg: &ClientTlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let versions: &[&rustls::SupportedProtocolVersion] = match cfg.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Config(format!("TLS versions with the ring provider: {e}")))?;
    let builder = match &cfg.ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = load_roots(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier = if cfg.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| file_error(ca, format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let certs = load_certs(&cfg.cert_file)?;
    let key = load_key(&cfg.key_file)?;
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| identity_error(&cfg.cert_file, &cfg.key_file, e))?;
    // No resumption: every connection presents (and we check) its current
    // certificate, so an expired or re-issued one cannot ride on a ticket.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The [`Gate`] of a TLS client port.
pub struct ClientTlsGate {
    acceptor: TlsAcceptor,
    policy: Arc<ClientTlsConfig>,
    timeout: Duration,
}

impl ClientTlsGate {
    pub fn new(cfg: &ClientTlsConfig, handshake_timeout: Duration) -> Result<Self, TlsError> {
        if cfg.require_client_cert && cfg.read_write_clients.is_empty() {
            warn!("client.tls: read_write_clients is empty, so every client is read-only");
        }
        if !cfg.require_client_cert
            && !cfg.read_write_clients.is_empty()
            && cfg.default_access.unwrap_or(Access::ReadWrite) == Access::ReadWrite
        {
            warn!("client.tls: read_write_clients changes nothing while default_access is read-write (set require_client_cert or default_access = \"read-only\")");
        }
        Ok(ClientTlsGate {
            acceptor: TlsAcceptor::from(server_config(cfg)?),
            policy: Arc::new(cfg.clone()),
            timeout: handshake_timeout,
        })
    }
}

impl Gate for ClientTlsGate {
    fn admit(&self, tcp: TcpStream, peer: SocketAddr) -> Admission {
        let acceptor = self.acceptor.clone();
        let policy = self.policy.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Err(_) => return refused(TlsError::Timeout(timeout), peer),
                Ok(Err(e)) => return refused(TlsError::from(e), peer),
                Ok(Ok(s)) => s,
            };
            let certs = stream.get_ref().1.peer_certificates();
            let names = certs.and_then(|c| c.first()).map(cert_names);
            let identity = certs.and_then(peer_name);
            let access = policy.access_for(names.as_deref());
            metrics::counter!(ADMITTED, "access" => access.label()).increment(1);
            debug!(
                client = identity.as_deref().unwrap_or("-"),
                access = access.label(),
                "client TLS handshake done"
            );
            Some(Admitted {
                stream: Box::new(stream),
                access,
                identity,
            })
        })
    }
}

fn refused(e: TlsError, peer: SocketAddr) -> Option<Admitted> {
    let reason = e.reason();
    metrics::counter!(HANDSHAKE_FAILURES, "reason" => reason).increment(1);
    // A connection dropped mid-handshake (a port probe) is routine; a
    // certificate or protocol refusal is worth an operator's look.
    if reason == "io" {
        info!(%peer, reason, error = %e, "client TLS connection refused");
    } else {
        warn!(%peer, reason, error = %e, "client TLS connection refused");
    }
    None
}

/// Describes this module's metrics and zeroes every reason's series.
pub fn describe_and_init() {
    metrics::describe_counter!(
        HANDSHAKE_FAILURES,
        "Client-port TLS connections refused, by reason (not_tls, unknown_ca, bad_certificate, expired, no_client_certificate, incompatible, protocol, timeout, io)."
    );
    metrics::describe_counter!(
        ADMITTED,
        "Client-port TLS connections admitted, by the access granted (read-write, read-only)."
    );
    for reason in REASONS {
        metrics::counter!(HANDSHAKE_FAILURES, "reason" => *reason).increment(0);
    }
    for access in [Access::ReadWrite, Access::ReadOnly] {
        metrics::counter!(ADMITTED, "access" => access.label()).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> ClientTlsConfig {
        toml::from_str(&format!("cert_file = \"c\"\nkey_file = \"k\"\n{toml_text}")).unwrap()
    }

    #[test]
    fn patterns() {
        assert!(matches_pattern("app-1", "APP-1"));
        assert!(matches_pattern("*", "anything"));
        assert!(matches_pattern("app-*", "app-"));
        assert!(matches_pattern("app-*.example.org", "app-7.example.org"));
        assert!(matches_pattern("*.a*b", "x.aXXbYb"));
        assert!(!matches_pattern("app-*", "web-1"));
        assert!(!matches_pattern("app", "app-1"));
        assert!(!matches_pattern("a*b", "ac"));
        assert!(!matches_pattern("", "a"));
        assert!(matches_pattern("", ""));
    }

    #[test]
    fn access_decision() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = cfg(
            "ca_file = \"ca\"\nrequire_client_cert = true\nread_write_clients = [\"writer-*\"]\n",
        );
        assert_eq!(
            c.access_for(Some(&names(&["localhost", "writer-1"]))),
            Access::ReadWrite
        );
        assert_eq!(c.access_for(Some(&names(&["reader"]))), Access::ReadOnly);
        assert_eq!(c.access_for(None), Access::ReadOnly);
        let c =
            cfg("ca_file = \"ca\"\nread_write_clients = [\"w\"]\ndefault_access = \"read-only\"\n");
        assert_eq!(c.access_for(Some(&names(&["w"]))), Access::ReadWrite);
        assert_eq!(c.access_for(Some(&names(&["x"]))), Access::ReadOnly);
        assert_eq!(c.access_for(None), Access::ReadOnly);
        let c = cfg("");
        assert_eq!(c.access_for(None), Access::ReadWrite);
        assert_eq!(c.min_version, MinVersion::Tls12);
    }

    #[test]
    fn inconsistent_settings_are_named() {
        let e = cfg("require_client_cert = true\n").validate().unwrap_err();
        assert_eq!(e.0, "client.tls.require_client_cert");
        let e = cfg("read_write_clients = [\"a\"]\n")
            .validate()
            .unwrap_err();
        assert_eq!(e.0, "client.tls.read_write_clients");
        let e =
            cfg("ca_file = \"ca\"\nrequire_client_cert = true\ndefault_access = \"read-write\"\n")
                .validate()
                .unwrap_err();
        assert_eq!(e.0, "client.tls.default_access");
        let e = cfg("").validate().unwrap_err();
        assert_eq!(e.0, "client.tls.cert_file");
        assert!(toml::from_str::<ClientTlsConfig>(
            "cert_file = \"c\"\nkey_file = \"k\"\nmin_version = \"1.1\"\n"
        )
        .is_err());
        assert!(toml::from_str::<ClientTlsConfig>(
            "cert_file = \"c\"\nkey_file = \"k\"\nrequire_cert = true\n"
        )
        .is_err());
    }
}
