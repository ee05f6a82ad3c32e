//! TLS to the backend ZEO server (`[backend.tls]`), for a backend on
//! another host. A ZEO server with `<ssl>` always requires a client
//! certificate, so zrelay presents one; the server's certificate must chain
//! to `ca_file` and be valid for `server_name`. The same TLS 1.3 client as
//! the replication stream ([`crate::replication::tls::client_config`]).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::TlsError;
use crate::relay::backend::{BoxRead, BoxWrite, Upgrade, Upgrading};
use crate::replication::tls::{client_config, connect, TlsFiles};

/// The `[backend.tls]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsConfig {
    /// CA certificate(s) the ZEO server's certificate must chain to.
    pub ca_file: PathBuf,
    /// zrelay's client certificate (ZEO servers with `<ssl>` require one).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Name the server's certificate must be valid for. Default: the host
    /// part of `backend.address`.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl BackendTlsConfig {
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

/// The backend [`Upgrade`]: a TLS handshake on each backend connection.
pub struct BackendTls {
    connector: TlsConnector,
    server_name: String,
    timeout: Duration,
}

impl BackendTls {
    pub fn new(
        cfg: &BackendTlsConfig,
        server_name: String,
        timeout: Duration,
    ) -> Result<Self, TlsError> {
        Ok(BackendTls {
            connector: TlsConnector::from(client_config(&cfg.files())?),
            server_name,
            timeout,
        })
    }
}

impl Upgrade for BackendTls {
    fn upgrade(&self, tcp: TcpStream) -> Upgrading {
        let connector = self.connector.clone();
        let name = self.server_name.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let (stream, _) = connect(&connector, tcp, &name, timeout)
                .await
                .map_err(|e| io::Error::other(format!("backend {e}")))?;
            let (r, w) = tokio::io::split(stream);
            Ok((Box::new(r) as BoxRead, Box::new(w) as BoxWrite))
        })
    }
}
