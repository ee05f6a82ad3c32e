//! Admin HTTP surface (metrics, health, status) and the operator CLI that
//! talks to it. Reads [`crate::status::StatusHub`] snapshots; owns no state.
//!
//! # Endpoints
//!
//! Every endpoint answers `GET` and `HEAD` (same status and headers, no
//! body); any other method gets `405` with an `Allow` header, an unknown path
//! `404`. Health bodies are JSON:
//! `{"status": "ok"|"unavailable", "check", "node", "role", "state",
//! "backend_up", "lag_seconds", "max_lag_seconds", "reason"}`, where `state`
//! is the replication stream state of a replica (`disconnected`,
//! `catching_up`, `live`, `diverged`) or, on a primary, `running` /
//! `backend_down`; `reason` is present on a `503` only.
//!
//! | path | 200 when | otherwise |
//! |---|---|---|
//! | `/metrics` | always: Prometheus text format 0.0.4 (see `docs/metrics.md`) | |
//! | `/health` | the backend ZEO server answers (the proxy can serve clients) | 503 |
//! | `/primary`, `/read-write` | role is primary and the backend is up | 503 |
//! | `/replica` | role is replica, backend up, stream `live` or `catching_up`, lag ≤ max | 503 |
//! | `/read-only` | `/replica` would answer 200, or the node is a healthy primary | 503 |
//! | `/liveness` | the admin task answers at all | (no answer) |
//! | `/readiness` | ready for its role: `/primary` on a primary, `/replica` with the configured max on a replica | 503 |
//! | `/status` | always: the node's status snapshot as JSON, plus `uptime_seconds`, `state` and `lag_seconds` | |
//!
//! `/replica` and `/read-only` take `?lag=MAX`, which overrides
//! `max_replica_lag_ms` for that request: plain seconds (`5`, `0.5`) or a
//! duration (`500ms`, `5s`, `1m`); a value that does not parse is a `400`.
//! A replica whose stream is `disconnected` or `diverged` answers `503`
//! whatever its last known lag. The names follow Patroni's REST API, so
//! HAProxy `option httpchk GET /replica?lag=5s`, Kubernetes probes and SlapOS
//! promises need nothing zrelay-specific.
//!
//! Lag is the primary's newest commit time minus the replica's applied
//! commit time (tids are timestamps); while the stream is down it grows with
//! the time since the last message from the primary (see [`health`]).
//!
//! Mutating endpoints answer `POST` only and run [`auth::AdminAuth::authorize`]
//! first (bearer token from `token_file`, or a client certificate named in
//! `admin_allowed`); a refusal is 401/403 and counted in
//! `zrelay_admin_auth_failures_total{reason}`:
//!
//! | path | effect | answer |
//! |---|---|---|
//! | `POST /drain` | stop accepting client sessions; open ones end at their next safe point (no transaction open, no call outstanding) or at `client.shutdown_grace_ms`; `/readiness`, `/replica`, `/read-only` answer 503 at once | 200 `{"status":"draining","already":bool}` |
//! | `POST /reload` | same as `SIGHUP`: re-read the config file, apply what can change live | 200 `{"status":"ok","applied":[keys],"needs_restart":[keys]}`, 500 if the file is invalid (nothing applied) |

pub mod auth;
pub mod cli;
pub mod gauges;
pub mod health;
pub mod http;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use http::{serve, AdminState};

/// Histogram buckets (seconds) for latencies from ~100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

/// The `[admin]` section of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP server (metrics, health, status).
    pub listen: SocketAddr,
    /// A replica lagging more than this answers 503 on `/replica`,
    /// `/read-only` (unless the request names its own `?lag=`) and
    /// `/readiness`.
    #[serde(default = "default_max_replica_lag_ms")]
    pub max_replica_lag_ms: u64,
    /// File holding the bearer token that mutating endpoints (`POST /drain`,
    /// `POST /reload`) accept. Absent: no token is accepted.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Client certificate names (DNS SAN or CN, issued by `tls.ca_file`)
    /// allowed to call mutating endpoints; needs `[admin.tls]`.
    #[serde(default)]
    pub admin_allowed: Vec<String>,
    /// Serve the admin endpoints over TLS 1.3 (client certificates optional:
    /// probes need none; mutating calls may authenticate with one).
    #[serde(default)]
    pub tls: Option<crate::replication::tls::TlsFiles>,
}

fn default_max_replica_lag_ms() -> u64 {
    5_000
}

impl AdminConfig {
    pub fn max_replica_lag(&self) -> Duration {
        Duration::from_millis(self.max_replica_lag_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_config_defaults_and_rejects_unknown_keys() {
        let c: AdminConfig = toml::from_str("listen = \"127.0.0.1:8300\"").unwrap();
        assert_eq!(c.max_replica_lag(), Duration::from_secs(5));
        let c: AdminConfig =
            toml::from_str("listen = \"127.0.0.1:8300\"\nmax_replica_lag_ms = 250").unwrap();
        assert_eq!(c.max_replica_lag(), Duration::from_millis(250));
        let e = toml::from_str::<AdminConfig>("listen = \"127.0.0.1:8300\"\nmax_lag = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_lag"), "{e}");
    }
}
