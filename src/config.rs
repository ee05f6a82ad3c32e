//! Configuration: one TOML file, read once at start-up.
//!
//! Policy on unknown keys: **rejected**. A typo in an HA proxy's config (say
//! `uptream` for `upstream`) silently falling back to a default is worse than
//! refusing to start, so every struct here is `deny_unknown_fields` and the
//! error names the key, the line and the file. Every key is documented in
//! `config/*.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of this node in logs, status and the replication handshake.
    #[serde(default = "default_node_name")]
    pub node_name: String,
    /// tracing env-filter directive, e.g. "info" or "zrelay=debug,info".
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Runtime threads. 1 (default): everything on one thread, the lowest
    /// latency per hop; more only helps with many busy sessions.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
    pub client: ClientConfig,
    pub backend: BackendConfig,
    /// Absent: a plain relay (a primary with no replicas).
    #[serde(default)]
    pub replication: Option<ReplicationConfig>,
    /// Absent: no admin HTTP server.
    #[serde(default)]
    pub admin: Option<crate::admin::AdminConfig>,
    /// The other nodes' addresses (roles come over the replication stream).
    #[serde(default)]
    pub cluster: crate::cluster::ClusterConfig,
    /// How this node routes client sessions (see `crate::door`).
    #[serde(default)]
    pub door: crate::door::DoorConfig,
    /// Absent: static roles, manual switchover (see `crate::coordinator`).
    #[serde(default)]
    pub coordinator: Option<crate::coordinator::CoordinatorConfig>,
    /// Where the node keeps its own durable state: the role state file
    /// `role.json` (role, cluster epoch, history) and, on a replica, the
    /// spool `spool/relay.log` (see [`Config::spool_dir`]). Absent: role
    /// changes are not persisted (the configured role is used at every
    /// start) and a replica acknowledges applied transactions only.
    #[serde(default)]
    pub data_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleConfig {
    Primary,
    Replica,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// "primary" or "replica".
    pub role: RoleConfig,
    /// Name shared by all nodes of one replicated database; a replica of
    /// another cluster is refused.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Address replicas connect to (TLS only). Required on a primary; on a
    /// replica it makes the replica feed further replicas (cascading) from
    /// its own backend.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Replica: the primary proxy's replication address, host:port.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Replica: the node name the upstream's certificate must carry.
    /// Default: the host part of `upstream`.
    #[serde(default)]
    pub upstream_name: Option<String>,
    /// Primary: node names (certificate DNS name or CN) allowed to connect;
    /// empty = any certificate signed by the cluster CA.
    #[serde(default)]
    pub allowed_peers: Vec<String>,
    /// Primary: heartbeat on an idle stream after this long.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Replica: a stream silent this long counts as stale (lag grows with
    /// the clock) and is reconnected.
    #[serde(default = "default_stale_after_ms")]
    pub stale_after_ms: u64,
    /// Replica: forward clients' pack() to the backend (default: refuse).
    #[serde(default)]
    pub allow_pack: bool,
    /// Primary: replay clients' packs on the replicas (as an operation in
    /// the stream); replica: execute them on its backend. Default on.
    #[serde(default = "default_true")]
    pub replicate_pack: bool,
    /// Largest stream message (one transaction with its blobs).
    #[serde(default = "default_stream_max_bytes")]
    pub max_message_bytes: usize,
    /// Primary: per replica, live transactions queued before a slow replica
    /// falls back to reading history.
    #[serde(default = "default_live_queue_txns")]
    pub live_queue_txns: usize,
    #[serde(default = "default_live_queue_bytes")]
    pub live_queue_bytes: u64,
    /// Replica: applied transactions remembered for invalidations and
    /// getInvalidations answers (older client caches are dropped).
    #[serde(default = "default_applied_log_txns")]
    pub applied_log_txns: usize,
    /// Primary: largest client commit (record data + blob bytes) published
    /// from what the client sent instead of being read back from the
    /// backend (the capture fast path); bigger ones are read back. 0 turns
    /// capture off.
    #[serde(default = "default_capture_max_bytes")]
    pub capture_max_bytes: usize,
    /// Primary: also read every captured commit back and compare (a
    /// mismatch is logged, counted, and the read-back is published).
    #[serde(default)]
    pub capture_verify: bool,
    /// Promotion eligibility of this node: a priority (higher preferred)
    /// or "never" (a remote replica that must not take over).
    #[serde(default)]
    pub promotion: crate::role::Promotion,
    pub tls: crate::replication::tls::TlsFiles,
    /// Primary: "async" (default) or "semi-sync" (see
    /// `crate::replication::semisync`).
    #[serde(default)]
    pub ack_mode: AckMode,
    /// Primary, semi-sync: how many replicas must acknowledge a commit.
    #[serde(default = "default_min_acks")]
    pub min_acks: usize,
    /// Primary, semi-sync: what an acknowledgement means.
    #[serde(default)]
    pub ack_level: AckLevel,
    /// Primary, semi-sync: how long a commit waits for acknowledgements
    /// before the primary degrades to async (unless `strict`).
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// Primary, semi-sync: never degrade; commits wait for the replicas.
    #[serde(default)]
    pub strict: bool,
    /// Deprecated (use the top-level `data_dir`, spool in
    /// `data_dir/spool/`): the replica's spool directory. Still honoured,
    /// with a warning (see [`Config::warnings`]), so an existing spool is
    /// not left behind.
    #[serde(default)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Replica: the spool is emptied once everything in it is applied; past
    /// this size the replica applies before it spools more.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
}

/// `replication.ack_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AckMode {
    #[default]
    Async,
    SemiSync,
}

/// `replication.ack_level`: what a replica's acknowledgement means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AckLevel {
    /// Durably in the replica zrelay's spool (fsynced).
    Received,
    /// Committed by the replica's backend.
    #[default]
    Applied,
}

fn default_min_acks() -> usize {
    1
}
fn default_ack_timeout_ms() -> u64 {
    10_000
}
fn default_spool_max_bytes() -> u64 {
    64 * 1024 * 1024
}

fn default_true() -> bool {
    true
}
fn default_cluster() -> String {
    "zrelay".to_string()
}
fn default_heartbeat_interval_ms() -> u64 {
    1_000
}
fn default_stale_after_ms() -> u64 {
    5_000
}
fn default_stream_max_bytes() -> usize {
    1024 * 1024 * 1024
}
fn default_live_queue_txns() -> usize {
    10_000
}
fn default_live_queue_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_applied_log_txns() -> usize {
    100_000
}
fn default_capture_max_bytes() -> usize {
    64 * 1024 * 1024
}

impl ReplicationConfig {
    pub fn upstream_server_name(&self) -> String {
        if let Some(n) = &self.upstream_name {
            return n.clone();
        }
        let up = self.upstream.as_deref().unwrap_or("");
        let host = up.rsplit_once(':').map(|(h, _)| h).unwrap_or(up);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Address ZEO clients connect to.
    pub listen: SocketAddr,
    /// Largest single ZEO message accepted from either side.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Sessions beyond this wait in the kernel accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// On SIGTERM/SIGINT, how long sessions get to reach a safe point
    /// (no transaction open, no call outstanding) before being cut.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// How long a new client may take to answer the protocol handshake
    /// (and, with `[client.tls]`, to complete its TLS handshake).
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Absent: plaintext clients, all read-write.
    #[serde(default)]
    pub tls: Option<crate::tls::client::ClientTlsConfig>,
    /// All sessions together may buffer this many bytes of client messages
    /// beyond a small free allowance each (see `relay::limits`).
    #[serde(default = "default_buffer_budget_bytes")]
    pub buffer_budget_bytes: usize,
    /// A session that cannot get budget for this long is closed.
    #[serde(default = "default_buffer_wait_ms")]
    pub buffer_wait_ms: u64,
    /// Open connections per client IP address; more are closed at once.
    #[serde(default = "default_max_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// A client that takes none of its replies for this long is closed.
    #[serde(default = "default_write_stall_timeout_ms")]
    pub write_stall_timeout_ms: u64,
    /// An idle client connection whose host stops answering TCP keepalive
    /// probes (powered off, partitioned away) ends after about this long;
    /// data it leaves unacknowledged ends it after `write_stall_timeout_ms`
    /// (`TCP_USER_TIMEOUT`; see `crate::liveness`). The session's end
    /// aborts a transaction it may hold runzeo's commit lock for. 0: the
    /// system's defaults (an idle connection to a vanished host then lives
    /// forever).
    #[serde(default = "default_dead_peer_timeout_ms")]
    pub dead_peer_timeout_ms: u64,
}

fn default_dead_peer_timeout_ms() -> u64 {
    15_000
}

fn default_write_stall_timeout_ms() -> u64 {
    60_000
}

fn default_buffer_budget_bytes() -> usize {
    512 * 1024 * 1024
}
fn default_buffer_wait_ms() -> u64 {
    10_000
}
fn default_max_connections_per_peer() -> usize {
    256
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// "host:port" or an absolute path to a unix socket.
    pub address: String,
    /// Storage names served by the backend (ZEO's `<filestorage NAME>`).
    #[serde(default = "default_storages")]
    pub storages: Vec<String>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How often the backend is probed for `/health` and `zrelay_backend_up`.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// Timeout of the proxy's own calls to the backend (history reads,
    /// replays). Generous: a 50 MB transaction takes a while to restore.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    /// The backend's FileStorage file (runzeo's `<filestorage> path`). On a
    /// primary: read-only source of `zrelay clone` (absent: clones are
    /// refused). For `zrelay clone`: where the copy is written.
    #[serde(default)]
    pub data_fs: Option<PathBuf>,
    /// The backend's blob directory (`<filestorage> blob-dir`), if any; same
    /// roles as `data_fs`.
    #[serde(default)]
    pub blob_dir: Option<PathBuf>,
    /// Absent: plaintext to the backend (the usual loopback or unix socket).
    #[serde(default)]
    pub tls: Option<crate::tls::backend::BackendTlsConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendAddr::Tcp(a) => write!(f, "{a}"),
            BackendAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

fn default_node_name() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "zrelay".to_string())
}
fn default_worker_threads() -> usize {
    1
}
fn default_log_level() -> String {
    "info".to_string()
}
fn default_max_message_bytes() -> usize {
    256 * 1024 * 1024
}
fn default_max_connections() -> usize {
    1024
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_handshake_timeout_ms() -> u64 {
    30_000
}
fn default_storages() -> Vec<String> {
    vec!["1".to_string()]
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_probe_interval_ms() -> u64 {
    1_000
}
fn default_call_timeout_ms() -> u64 {
    120_000
}

impl ClientConfig {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    pub fn buffer_wait(&self) -> Duration {
        Duration::from_millis(self.buffer_wait_ms)
    }
    pub fn write_stall_timeout(&self) -> Duration {
        Duration::from_millis(self.write_stall_timeout_ms)
    }

    pub fn dead_peer_timeout(&self) -> Duration {
        Duration::from_millis(self.dead_peer_timeout_ms)
    }
}

impl BackendConfig {
    pub fn addr(&self) -> BackendAddr {
        parse_backend_addr(&self.address)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn probe_interval(&self) -> Duration {
        Duration::from_millis(self.probe_interval_ms)
    }
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }
    /// What `zrelay clone` clients may copy (needs `data_fs`).
    pub fn clone_source(&self) -> Option<crate::replication::clone_serve::CloneSource> {
        Some(crate::replication::clone_serve::CloneSource {
            data_fs: self.data_fs.clone()?,
            blob_dir: self.blob_dir.clone(),
        })
    }

    /// The name the backend's TLS certificate must carry.
    pub fn tls_server_name(&self) -> Option<String> {
        let t = self.tls.as_ref()?;
        if let Some(n) = &t.server_name {
            return Some(n.clone());
        }
        let host = self
            .address
            .rsplit_once(':')
            .map_or(self.address.as_str(), |(h, _)| h);
        Some(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        )
    }
}

pub fn parse_backend_addr(s: &str) -> BackendAddr {
    if let Some(p) = s.strip_prefix("unix:") {
        BackendAddr::Unix(PathBuf::from(p))
    } else if s.starts_with('/') {
        BackendAddr::Unix(PathBuf::from(s))
    } else {
        BackendAddr::Tcp(s.to_string())
    }
}

/// Under the top-level `data_dir`: the replica's spool directory.
pub const SPOOL_SUBDIR: &str = "spool";

impl Config {
    /// The replica's spool directory (relay log making `ack_level =
    /// "received"` acknowledgements durable): `data_dir/spool/`, or the
    /// deprecated `[replication] data_dir` if set (the spool stays where it
    /// was). None: no spool; the replica acknowledges applied only.
    pub fn spool_dir(&self) -> Option<PathBuf> {
        if let Some(d) = self.replication.as_ref().and_then(|r| r.data_dir.clone()) {
            return Some(d);
        }
        self.data_dir.as_ref().map(|d| d.join(SPOOL_SUBDIR))
    }

    /// Settings that work but should change (deprecated keys): logged at
    /// start and printed by `zrelay check-config`.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(old) = self.replication.as_ref().and_then(|r| r.data_dir.as_ref()) {
            let now = match &self.data_dir {
                Some(d) => format!("top-level data_dir = {:?}", d.display().to_string()),
                None => "no top-level data_dir".to_string(),
            };
            w.push(format!(
                "[replication] data_dir is deprecated; the spool stays in {} while it is set. \
                 Remove it and use the top-level data_dir (now: {now}); the spool is then \
                 DATA_DIR/{SPOOL_SUBDIR}/relay.log. Change it while \
                 zrelay_replication_spool_bytes is 0 (or move relay.log there)",
                old.display()
            ));
        }
        w
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        if let Some(c) = &self.coordinator {
            c.check().map_err(|(key, message)| invalid(key, message))?;
        }
        if self.client.max_message_bytes < 1024 {
            return Err(invalid(
                "client.max_message_bytes",
                format!(
                    "{} is too small (minimum 1024)",
                    self.client.max_message_bytes
                ),
            ));
        }
        if self.client.max_message_bytes > u32::MAX as usize {
            return Err(invalid(
                "client.max_message_bytes",
                "ZEO frames carry a 32-bit length; maximum is 4294967295".into(),
            ));
        }
        if self.client.max_connections == 0 {
            return Err(invalid(
                "client.max_connections",
                "must be at least 1".into(),
            ));
        }
        if self.client.buffer_budget_bytes < 1024 * 1024 {
            return Err(invalid(
                "client.buffer_budget_bytes",
                "minimum is 1048576".into(),
            ));
        }
        if self.client.max_connections_per_peer == 0 {
            return Err(invalid(
                "client.max_connections_per_peer",
                "must be at least 1".into(),
            ));
        }
        if let Some(t) = &self.client.tls {
            t.validate()
                .map_err(|(key, message)| invalid(key, message))?;
        }
        if let Some(t) = &self.backend.tls {
            if !matches!(self.backend.addr(), BackendAddr::Tcp(_)) {
                return Err(invalid(
                    "backend.tls",
                    "TLS needs a host:port backend address, not a unix socket".into(),
                ));
            }
            for (key, p) in [
                ("backend.tls.ca_file", &t.ca_file),
                ("backend.tls.cert_file", &t.cert_file),
                ("backend.tls.key_file", &t.key_file),
            ] {
                if !p.is_file() {
                    return Err(invalid(
                        key,
                        format!("{} is not a readable file", p.display()),
                    ));
                }
            }
        }
        if self.backend.storages.is_empty() {
            return Err(invalid(
                "backend.storages",
                "name at least one storage".into(),
            ));
        }
        match self.backend.addr() {
            BackendAddr::Tcp(a) => {
                let ok = a
                    .rsplit_once(':')
                    .map(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                    .unwrap_or(false);
                if !ok {
                    return Err(invalid(
                        "backend.address",
                        format!("{a:?} is neither host:port nor an absolute unix socket path"),
                    ));
                }
            }
            BackendAddr::Unix(p) => {
                if !p.is_absolute() {
                    return Err(invalid(
                        "backend.address",
                        format!("unix socket path {} must be absolute", p.display()),
                    ));
                }
            }
        }
        if let Some(r) = &self.replication {
            match r.role {
                RoleConfig::Primary => {
                    if r.listen.is_none() {
                        return Err(invalid(
                            "replication.listen",
                            "a primary needs an address for replicas to connect to".into(),
                        ));
                    }
                    if r.upstream.is_some() {
                        return Err(invalid(
                            "replication.upstream",
                            "only a replica has an upstream".into(),
                        ));
                    }
                }
                RoleConfig::Replica => {
                    let ok = r
                        .upstream
                        .as_deref()
                        .and_then(|u| u.rsplit_once(':'))
                        .map(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                        .unwrap_or(false);
                    if !ok {
                        return Err(invalid(
                            "replication.upstream",
                            "a replica needs the primary's replication address as host:port".into(),
                        ));
                    }
                }
            }
            if r.ack_mode == AckMode::SemiSync && (r.min_acks == 0 || r.ack_timeout_ms == 0) {
                return Err(invalid(
                    "replication.min_acks",
                    "semi-sync needs min_acks >= 1 and ack_timeout_ms > 0".into(),
                ));
            }
            if r.max_message_bytes < 1024 * 1024 {
                return Err(invalid(
                    "replication.max_message_bytes",
                    "minimum is 1048576".into(),
                ));
            }
            if r.heartbeat_interval_ms == 0 || r.stale_after_ms <= r.heartbeat_interval_ms {
                return Err(invalid(
                    "replication.stale_after_ms",
                    "must be greater than heartbeat_interval_ms (> 0)".into(),
                ));
            }
            for (key, p) in [
                ("replication.tls.ca_file", &r.tls.ca_file),
                ("replication.tls.cert_file", &r.tls.cert_file),
                ("replication.tls.key_file", &r.tls.key_file),
            ] {
                if !p.is_file() {
                    return Err(invalid(
                        key,
                        format!("{} is not a readable file", p.display()),
                    ));
                }
            }
        }
        if let Some(a) = &self.admin {
            crate::admin::auth::AdminAuth::load(a).map_err(|e| invalid("admin.token_file", e))?;
            if !a.admin_allowed.is_empty() && a.tls.is_none() {
                return Err(invalid(
                    "admin.admin_allowed",
                    "client certificates need [admin.tls]; over plain HTTP use token_file".into(),
                ));
            }
            if let Some(t) = &a.tls {
                for (key, p) in [
                    ("admin.tls.ca_file", &t.ca_file),
                    ("admin.tls.cert_file", &t.cert_file),
                    ("admin.tls.key_file", &t.key_file),
                ] {
                    if !p.is_file() {
                        return Err(invalid(
                            key,
                            format!("{} is not a readable file", p.display()),
                        ));
                    }
                }
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(invalid(
                "log_level",
                format!("{:?} is not a valid log filter", self.log_level),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[client]
listen = "127.0.0.1:8100"
[backend]
address = "127.0.0.1:8200"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.backend.storages, vec!["1"]);
        assert_eq!(c.client.max_message_bytes, 256 * 1024 * 1024);
        assert_eq!(c.backend.addr(), BackendAddr::Tcp("127.0.0.1:8200".into()));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse(&format!("{MIN}\nuptream = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("uptream"), "{e}");
        assert!(e.contains("test.toml"), "{e}");
        let e = parse(&MIN.replace("[backend]", "[backend]\nadress = \"x\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("adress"), "{e}");
    }

    #[test]
    fn unix_backend() {
        let c = parse(&MIN.replace("127.0.0.1:8200", "/run/zeo.sock")).unwrap();
        assert_eq!(c.backend.addr(), BackendAddr::Unix("/run/zeo.sock".into()));
    }

    #[test]
    fn bad_values_are_rejected() {
        let e = parse(&MIN.replace("127.0.0.1:8200", "nonsense")).unwrap_err();
        assert!(e.to_string().contains("backend.address"), "{e}");
        let e = parse(&MIN.replace("[client]", "[client]\nmax_message_bytes = 10")).unwrap_err();
        assert!(e.to_string().contains("max_message_bytes"), "{e}");
        let e = parse(&MIN.replace("[backend]", "[backend]\nstorages = []")).unwrap_err();
        assert!(e.to_string().contains("storages"), "{e}");
        let e = parse(&MIN.replace("127.0.0.1:8100", "not an addr")).unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
    }

    #[test]
    fn example_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "ca.pem",
            "primary.pem",
            "primary-key.pem",
            "replica1.pem",
            "replica1-key.pem",
        ] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for name in [
            "zrelay.toml",
            "primary.toml",
            "replica.toml",
            "client-tls.toml",
        ] {
            let path = root.join(name);
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("/etc/zrelay/tls", &dir.path().display().to_string());
            Config::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn replication_roles_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "x").unwrap();
        let f = dir.path().join("f").display().to_string();
        let tls = format!(
            "[replication.tls]\nca_file = \"{f}\"\ncert_file = \"{f}\"\nkey_file = \"{f}\"\n"
        );
        let e = parse(&format!("{MIN}[replication]\nrole = \"replica\"\n{tls}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("replication.upstream"), "{e}");
        let e = parse(&format!("{MIN}[replication]\nrole = \"primary\"\n{tls}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("replication.listen"), "{e}");
        let e = parse(&format!("{MIN}[replication]\nrole = \"leader\"\n{tls}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("leader"), "{e}");
        let ok = parse(&format!(
            "{MIN}[replication]\nrole = \"replica\"\nupstream = \"127.0.0.1:9\"\n{tls}"
        ))
        .unwrap();
        assert_eq!(ok.replication.unwrap().upstream_server_name(), "127.0.0.1");
        let e = parse(&format!(
            "{MIN}[replication]\nrole = \"replica\"\nupstream = \"127.0.0.1:9\"\n[replication.tls]\nca_file = \"/nonexistent\"\ncert_file = \"{f}\"\nkey_file = \"{f}\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("ca_file"), "{e}");
    }

    /// One `data_dir`: the spool is `data_dir/spool/`; the old
    /// `[replication] data_dir` still names it, with a warning.
    #[test]
    fn spool_lives_under_data_dir_old_key_warns() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "x").unwrap();
        let f = dir.path().join("f").display().to_string();
        let repl = format!(
            "[replication]\nrole = \"replica\"\nupstream = \"127.0.0.1:9\"\n{{old}}\
             [replication.tls]\nca_file = \"{f}\"\ncert_file = \"{f}\"\nkey_file = \"{f}\"\n"
        );
        let top = "data_dir = \"/var/lib/zrelay\"\n";
        let c = parse(&format!("{top}{MIN}{}", repl.replace("{old}", ""))).unwrap();
        assert_eq!(c.spool_dir(), Some(PathBuf::from("/var/lib/zrelay/spool")));
        assert!(c.warnings().is_empty());
        let c = parse(&format!("{MIN}{}", repl.replace("{old}", ""))).unwrap();
        assert_eq!(c.spool_dir(), None);
        let old = "data_dir = \"/srv/spool\"\n";
        let c = parse(&format!("{top}{MIN}{}", repl.replace("{old}", old))).unwrap();
        assert_eq!(c.spool_dir(), Some(PathBuf::from("/srv/spool")));
        let w = c.warnings().join("\n");
        assert!(w.contains("[replication] data_dir is deprecated"), "{w}");
        assert!(
            w.contains("/srv/spool") && w.contains("/var/lib/zrelay"),
            "{w}"
        );
    }
}
