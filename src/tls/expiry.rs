//! When the certificates zrelay loaded expire: a gauge per use for alerting
//! (`zrelay_tls_certificate_expiry_timestamp_seconds{use,kind}`) and the
//! same dates in `/status` (`certificates`) and `zrelay status`.
//!
//! Recorded when a door loads its files. `use` is the door (`replication`,
//! `client`, `admin`, `backend`), `kind` is `cert` (the certificate zrelay presents) or
//! `ca` (the CA it verifies peers with). A PEM file holding several
//! certificates (a chain, a CA bundle) reports the earliest expiry: that is
//! when the file stops working.

use std::path::Path;

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{file_error, load_certs, TlsError};
use crate::status::StatusHub;

/// Gauge: Unix time at which a loaded certificate expires.
pub const EXPIRY: &str = "zrelay_tls_certificate_expiry_timestamp_seconds";

/// The values of the `use` label.
pub const USES: &[&str] = &["replication", "client", "admin", "backend"];

/// The expiry of one loaded PEM file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CertExpiry {
    #[serde(rename = "use")]
    pub use_: &'static str,
    pub kind: &'static str,
    pub file: String,
    /// Subject common name of the certificate that expires first.
    pub subject: String,
    /// RFC 3339, UTC.
    pub not_after: String,
    pub not_after_unix: i64,
}

/// Reads `path` and returns when its first-expiring certificate expires.
pub fn inspect(
    use_: &'static str,
    kind: &'static str,
    path: &Path,
) -> Result<CertExpiry, TlsError> {
    let mut earliest: Option<(i64, String)> = None;
    for der in load_certs(path)? {
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| file_error(path, format!("unparsable certificate: {e}")))?;
        let t = cert.validity().not_after.timestamp();
        if !earliest.as_ref().is_some_and(|(e, _)| *e <= t) {
            let subject = cert
                .subject()
                .iter_common_name()
                .find_map(|cn| cn.as_str().ok())
                .unwrap_or("")
                .to_string();
            earliest = Some((t, subject));
        }
    }
    let (t, subject) = earliest.ok_or_else(|| file_error(path, "no certificate"))?;
    let not_after = OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| t.to_string());
    Ok(CertExpiry {
        use_,
        kind,
        file: path.display().to_string(),
        subject,
        not_after,
        not_after_unix: t,
    })
}

/// Inspects the files of one door (`cert` presented, optional `ca`), sets
/// the gauges and replaces that door's entries in the status. Writer of
/// `NodeStatus::certificates` (one call per door, at start-up or reload).
pub fn track(
    status: &StatusHub,
    use_: &'static str,
    cert: &Path,
    ca: Option<&Path>,
) -> Result<(), TlsError> {
    let mut found = vec![inspect(use_, "cert", cert)?];
    if let Some(ca) = ca {
        found.push(inspect(use_, "ca", ca)?);
    }
    for e in &found {
        metrics::gauge!(EXPIRY, "use" => e.use_, "kind" => e.kind).set(e.not_after_unix as f64);
    }
    status.update(|st| {
        st.certificates.retain(|c| c.use_ != use_);
        st.certificates.extend(found);
        st.certificates.sort_by_key(|c| c.not_after_unix);
    });
    Ok(())
}

pub fn describe() {
    metrics::describe_gauge!(
        EXPIRY,
        metrics::Unit::Seconds,
        "Unix time at which a loaded certificate expires, by use (replication, client, admin, backend) and kind (cert, ca); the earliest of a PEM file's certificates."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    #[test]
    fn expiry_of_issued_certificates() {
        let dir = tempfile::tempdir().unwrap();
        crate::certgen::ensure_ca(dir.path()).unwrap();
        let now = SystemTime::now();
        let end = now + Duration::from_secs(10 * 86400);
        let (cert, _) =
            crate::certgen::issue_node_with_validity(dir.path(), "n1", now, end).unwrap();
        let e = inspect("client", "cert", &cert).unwrap();
        let want = end.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((e.not_after_unix - want).abs() <= 1, "{e:?}");
        assert_eq!(e.subject, "n1");
        assert!(
            e.not_after.ends_with('Z') && e.not_after.len() == 20,
            "{e:?}"
        );
        let ca = inspect(
            "client",
            "ca",
            &dir.path().join(crate::certgen::CA_CERT_FILE),
        )
        .unwrap();
        assert!(ca.not_after_unix > e.not_after_unix);

        let hub = StatusHub::new("n".into(), crate::status::Role::Primary, "b".into());
        track(&hub, "client", &cert, Some(&dir.path().join("ca.pem"))).unwrap();
        track(&hub, "replication", &cert, None).unwrap();
        track(&hub, "client", &cert, None).unwrap();
        let certs = hub.snapshot().certificates;
        assert_eq!(certs.len(), 2, "{certs:?}");
        assert!(certs.iter().all(|c| c.kind == "cert"));
        assert!(inspect("client", "cert", &dir.path().join("nope.pem")).is_err());
    }
}
