//! Authentication of the mutating admin endpoints (`POST /drain`,
//! `POST /reload`, and later promote/switchover).
//!
//! A caller is admitted with either
//! - a TLS client certificate (admin listener with `[admin.tls]`) issued by
//!   the admin CA whose node name (see [`crate::replication::tls::peer_name`])
//!   is in `admin_allowed`, or
//! - `Authorization: Bearer <token>` where the token equals the content of
//!   `token_file` (compared in constant time).
//!
//! Read-only endpoints (health, metrics, status) need neither, so load
//! balancers and Prometheus keep working without credentials. With neither
//! configured, mutating endpoints answer 403: there is no unauthenticated
//! control surface. Every refusal is counted in
//! `zrelay_admin_auth_failures_total{reason}`.

use std::path::Path;

use hyper::header::AUTHORIZATION;
use hyper::{HeaderMap, StatusCode};
use subtle::ConstantTimeEq;

use super::AdminConfig;

pub const AUTH_FAILURES: &str = "zrelay_admin_auth_failures_total";

/// Values of the `reason` label.
pub const REASONS: &[&str] = &["missing", "invalid_token", "not_allowed", "not_configured"];

/// Tokens shorter than this are refused at start-up: a guessable token is
/// worse than none because it looks like protection.
pub const MIN_TOKEN_BYTES: usize = 16;

/// The credentials mutating endpoints accept. Replaced whole on reload.
#[derive(Clone, Default)]
pub struct AdminAuth {
    token: Option<Vec<u8>>,
    allowed: Vec<String>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("allowed", &self.allowed)
            .finish()
    }
}

/// Why a request was refused; the HTTP status and the metric label follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No certificate on the allow-list and no `Authorization` header.
    Missing,
    /// An `Authorization` header that is not the configured bearer token.
    InvalidToken,
    /// A verified client certificate whose name is not in `admin_allowed`.
    NotAllowed(String),
    /// Neither a token file nor an allow-list is configured.
    NotConfigured,
}

impl Denied {
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::InvalidToken => "invalid_token",
            Denied::NotAllowed(_) => "not_allowed",
            Denied::NotConfigured => "not_configured",
        }
    }

    /// 401 when presenting (other) credentials could help, 403 when not.
    pub fn status(&self) -> StatusCode {
        match self {
            Denied::Missing | Denied::InvalidToken => StatusCode::UNAUTHORIZED,
            Denied::NotAllowed(_) | Denied::NotConfigured => StatusCode::FORBIDDEN,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Denied::Missing => "this endpoint needs credentials: a bearer token (admin.token_file) or a client certificate named in admin.admin_allowed".into(),
            Denied::InvalidToken => "the bearer token is not the configured one".into(),
            Denied::NotAllowed(n) => format!("client certificate {n:?} is not in admin.admin_allowed"),
            Denied::NotConfigured => "mutating endpoints are disabled: configure admin.token_file or admin.admin_allowed (with admin.tls)".into(),
        }
    }
}

impl AdminAuth {
    /// Reads `token_file` (if any). The token is the file's content without
    /// surrounding whitespace.
    pub fn load(cfg: &AdminConfig) -> Result<AdminAuth, String> {
        let token = match &cfg.token_file {
            Some(p) => Some(read_token(p)?),
            None => None,
        };
        Ok(AdminAuth {
            token,
            allowed: cfg.admin_allowed.clone(),
        })
    }

    /// Credentials without files, for unit tests and the admin fuzz
    /// harness ([`super::http::fuzzing`]).
    #[doc(hidden)]
    pub fn for_tests(token: Option<&str>, allowed: &[&str]) -> AdminAuth {
        AdminAuth {
            token: token.map(|t| t.as_bytes().to_vec()),
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The one check every mutating route runs. `cert_name` is the node
    /// name of the verified client certificate, if the connection has one.
    /// Returns who was admitted (for the log line), or why not.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        cert_name: Option<&str>,
    ) -> Result<String, Denied> {
        if let Some(name) = cert_name {
            if self.allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                return Ok(format!("certificate {name}"));
            }
        }
        if let Some(value) = headers.get(AUTHORIZATION) {
            let presented = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            return match (presented, &self.token) {
                (Some(p), Some(t)) if bool::from(p.as_bytes().ct_eq(t)) => {
                    Ok("bearer token".into())
                }
                (_, None) if self.allowed.is_empty() => Err(Denied::NotConfigured),
                _ => Err(Denied::InvalidToken),
            };
        }
        match cert_name {
            Some(name) => Err(Denied::NotAllowed(name.to_string())),
            None if self.token.is_none() && self.allowed.is_empty() => Err(Denied::NotConfigured),
            None => Err(Denied::Missing),
        }
    }
}

/// Counts a refusal in `zrelay_admin_auth_failures_total{reason}`.
pub fn record_denied(d: &Denied) {
    metrics::counter!(AUTH_FAILURES, "reason" => d.reason()).increment(1);
}

pub fn describe() {
    metrics::describe_counter!(
        AUTH_FAILURES,
        "Requests to mutating admin endpoints refused, by reason (missing, invalid_token, not_allowed, not_configured)."
    );
    for r in REASONS {
        metrics::counter!(AUTH_FAILURES, "reason" => *r).increment(0);
    }
}

fn read_token(path: &Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = raw.trim_ascii().to_vec();
    if token.len() < MIN_TOKEN_BYTES {
        return Err(format!(
            "{}: the token is {} bytes; use at least {MIN_TOKEN_BYTES} (e.g. `openssl rand -hex 32 > {}`)",
            path.display(),
            token.len(),
            path.display()
        ));
    }
    if token.iter().any(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "{}: the token must be printable ASCII without spaces (it travels in an HTTP header)",
            path.display()
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        h
    }

    const TOKEN: &str = "0123456789abcdef0123";

    #[test]
    fn token_and_certificate_rules() {
        let none = HeaderMap::new();
        let a = AdminAuth::for_tests(Some(TOKEN), &["ops"]);
        assert!(a.authorize(&bearer(TOKEN), None).is_ok());
        assert_eq!(
            a.authorize(&bearer("nope"), None),
            Err(Denied::InvalidToken)
        );
        assert_eq!(a.authorize(&none, None), Err(Denied::Missing));
        assert!(a.authorize(&none, Some("OPS")).is_ok());
        assert_eq!(
            a.authorize(&none, Some("replica1")),
            Err(Denied::NotAllowed("replica1".into()))
        );
        // A certificate that is not allowed can still use the token.
        assert!(a.authorize(&bearer(TOKEN), Some("replica1")).is_ok());
        let mut basic = HeaderMap::new();
        basic.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic b3BzOm9wcw=="),
        );
        assert_eq!(a.authorize(&basic, None), Err(Denied::InvalidToken));

        let off = AdminAuth::default();
        assert_eq!(off.authorize(&none, None), Err(Denied::NotConfigured));
        assert_eq!(
            off.authorize(&bearer(TOKEN), None),
            Err(Denied::NotConfigured)
        );
        assert_eq!(Denied::Missing.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Denied::NotConfigured.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn token_file_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let cfg = |p: &Path| -> AdminConfig {
            toml::from_str(&format!(
                "listen = \"127.0.0.1:1\"\ntoken_file = \"{}\"",
                p.display()
            ))
            .unwrap()
        };
        std::fs::write(&p, format!("  {TOKEN}\n")).unwrap();
        let a = AdminAuth::load(&cfg(&p)).unwrap();
        assert!(a.authorize(&bearer(TOKEN), None).is_ok());
        std::fs::write(&p, "short\n").unwrap();
        let e = AdminAuth::load(&cfg(&p)).unwrap_err();
        assert!(e.contains("at least 16"), "{e}");
        std::fs::write(&p, "0123456789 abcdef0123").unwrap();
        assert!(AdminAuth::load(&cfg(&p)).is_err());
        let e = AdminAuth::load(&cfg(&dir.path().join("missing"))).unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }
}
