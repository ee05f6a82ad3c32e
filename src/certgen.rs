//! Certificates for the replication TLS without openssl (`zrelay cert`).
//!
//! One directory holds a cluster CA (`ca.pem`, `ca-key.pem`) and, per node,
//! `NAME.pem` + `NAME-key.pem` signed by it. Every node certificate is good
//! for both ends of a replication link (serverAuth and clientAuth), names the
//! node in its first DNS SAN (which [`crate::replication::tls::peer_name`]
//! reports and `allowed_peers` matches), and also carries `localhost`,
//! `127.0.0.1` and `::1` so a single-host demo can connect by loopback address.
//!
//! Keys are ECDSA P-256; private keys are written with mode 0600. Files are
//! written to a temporary name and renamed, so an interrupted run leaves no
//! half-written PEM behind.

use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// File name of the cluster CA certificate inside the certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the cluster CA private key inside the certificate directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Validity of a CA created by [`ensure_ca`].
const CA_VALIDITY_DAYS: u64 = 3650;
/// Certificates start this much in the past, so a peer whose clock is a
/// little behind does not reject a freshly issued certificate as not yet valid.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {problem}", path.display())]
    BadFile { path: PathBuf, problem: String },
    #[error("no CA in {}: {CA_CERT_FILE} and {CA_KEY_FILE} are missing (create one with `zrelay cert --dir {}`)", dir.display(), dir.display())]
    NoCa { dir: PathBuf },
    #[error("incomplete CA in {}: {present} exists but {missing} does not; restore {missing} or remove {present} to create a new CA (node certificates of the old CA then stop working)", dir.display())]
    IncompleteCa {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error("invalid node name {name:?}: {problem}")]
    InvalidName { name: String, problem: &'static str },
    #[error("invalid validity: {0}")]
    Validity(String),
    #[error("generate {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
}

/// Creates the cluster CA in `dir` (creating `dir` too) unless one is already
/// there: `ca.pem` (the certificate every node lists as `ca_file`) and
/// `ca-key.pem` (mode 0600; only needed to issue node certificates, keep it
/// off the nodes if you can). An existing CA is kept untouched, so running
/// `zrelay cert` again only adds or renews node certificates.
pub fn ensure_ca(dir: &Path) -> Result<(), CertError> {
    ensure_ca_created(dir).map(|_| ())
}

/// [`ensure_ca`], telling whether it created a new CA.
fn ensure_ca_created(dir: &Path) -> Result<bool, CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if ca_present(dir, &cert_path, &key_path)? {
        return Ok(false);
    }

    let key = KeyPair::generate().map_err(|source| generate("CA key", source))?;
    let mut params = CertificateParams::default();
    // A per-CA suffix keeps two clusters' CAs distinguishable by name, so a
    // certificate from the wrong cluster fails as "unknown issuer" rather than
    // as a signature mismatch against a same-named CA.
    let suffix: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "zrelay");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("zrelay cluster CA {suffix}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    set_validity(
        &mut params,
        now - CLOCK_SKEW_ALLOWANCE,
        now + Duration::from_secs(CA_VALIDITY_DAYS * 86400),
    )?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| generate("CA certificate", source))?;

    // Key first: a crash in between leaves an "incomplete CA" that is
    // reported, never a certificate whose key is lost.
    write_file(&key_path, &key.serialize_pem(), 0o600)?;
    write_file(&cert_path, &cert.pem(), 0o644)?;
    Ok(true)
}

/// Issues (or re-issues, overwriting) the certificate of node `name`, valid
/// for `days` days from now and signed by the CA in `dir` (see [`ensure_ca`];
/// it must exist). Writes `dir/NAME.pem` and `dir/NAME-key.pem` (mode 0600)
/// and returns their paths in that order.
///
/// The certificate has CN = NAME and SANs DNS:NAME, DNS:localhost,
/// IP:127.0.0.1, IP:::1, and both serverAuth and clientAuth extended key
/// usages. `name` must be a DNS host name (letters, digits, `-`, `.`).
pub fn issue_node(dir: &Path, name: &str, days: u32) -> Result<(PathBuf, PathBuf), CertError> {
    if days == 0 {
        return Err(CertError::Validity(
            "a node certificate must be valid for at least 1 day".into(),
        ));
    }
    let now = SystemTime::now();
    issue_node_with_validity(
        dir,
        name,
        now - CLOCK_SKEW_ALLOWANCE,
        now + Duration::from_secs(u64::from(days) * 86400),
    )
}

/// [`issue_node`] with an explicit validity period, e.g. one entirely in the
/// past so tests can present an expired certificate. (A certificate from
/// another CA needs no helper: call [`ensure_ca`] and [`issue_node`] on
/// another directory.)
pub fn issue_node_with_validity(
    dir: &Path,
    name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(PathBuf, PathBuf), CertError> {
    check_node_name(name)?;
    let issuer = load_ca(dir)?;

    let key = KeyPair::generate().map_err(|source| generate(&format!("key for {name}"), source))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = vec![
        SanType::DnsName(
            name.try_into()
                .map_err(|source| generate(&format!("certificate for {name}"), source))?,
        ),
        SanType::DnsName(
            "localhost"
                .try_into()
                .map_err(|source| generate("certificate", source))?,
        ),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, not_before, not_after)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| generate(&format!("certificate for {name}"), source))?;

    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}-key.pem"));
    write_file(&key_path, &key.serialize_pem(), 0o600)?;
    write_file(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

/// `zrelay cert --dir DIR [--days N] NAME...`: makes sure `DIR` holds a
/// cluster CA, then issues a certificate for each node NAME, printing every
/// file it wrote to stdout. All names are checked before anything is written.
///
/// Wiring for `main.rs` (suggested):
///
/// ```text
/// /// Create a cluster CA (if DIR has none) and node certificates for replication TLS.
/// Cert {
///     #[arg(long)]
///     dir: PathBuf,
///     /// Validity of the node certificates.
///     #[arg(long, default_value_t = 825)]
///     days: u32,
///     /// Node names (DNS names; also used as the file names NAME.pem, NAME-key.pem).
///     #[arg(required = true)]
///     names: Vec<String>,
/// },
/// ...
/// Command::Cert { dir, days, names } => match zrelay::certgen::run_cert_command(&dir, &names, days) {
///     Ok(()) => ExitCode::SUCCESS,
///     Err(e) => { eprintln!("zrelay: {e}"); ExitCode::from(1) }
/// },
/// ```
///
/// A node's `[replication.tls]` then is `ca_file = "DIR/ca.pem"`,
/// `cert_file = "DIR/NAME.pem"`, `key_file = "DIR/NAME-key.pem"`.
pub fn run_cert_command(dir: &Path, names: &[String], days: u32) -> Result<(), CertError> {
    for (i, name) in names.iter().enumerate() {
        check_node_name(name)?;
        if names[..i].contains(name) {
            return Err(CertError::InvalidName {
                name: name.clone(),
                problem: "given twice",
            });
        }
    }
    if days == 0 {
        return Err(CertError::Validity(
            "a node certificate must be valid for at least 1 day".into(),
        ));
    }
    let ca_cert = dir.join(CA_CERT_FILE);
    if ensure_ca_created(dir)? {
        println!(
            "created CA {} (private key {}: keep it secret; it is only needed to issue certificates)",
            ca_cert.display(),
            dir.join(CA_KEY_FILE).display()
        );
    } else {
        println!("using existing CA {}", ca_cert.display());
    }
    for name in names {
        let (cert, key) = issue_node(dir, name, days)?;
        println!(
            "issued {name}: {} (private key {}), valid {days} days",
            cert.display(),
            key.display()
        );
    }
    Ok(())
}

fn check_node_name(name: &str) -> Result<(), CertError> {
    let invalid = |problem| {
        Err(CertError::InvalidName {
            name: name.to_string(),
            problem,
        })
    };
    if name.is_empty() || name.len() > 253 {
        return invalid("must be 1 to 253 characters long");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !name.split('.').all(label_ok) {
        return invalid(
            "must be a DNS host name (letters, digits and '-', in dot-separated labels)",
        );
    }
    if name.eq_ignore_ascii_case("localhost") {
        return invalid("\"localhost\" is in every node certificate and cannot name a node");
    }
    if name.eq_ignore_ascii_case("ca") || name.ends_with("-key") {
        return invalid("would clash with the CA's or another node's file names");
    }
    Ok(())
}

/// Whether `dir` holds a CA: both its certificate and its key (true) or
/// neither (false); one without the other is an error naming the missing
/// file.
fn ca_present(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<bool, CertError> {
    let incomplete = |present, missing| CertError::IncompleteCa {
        dir: dir.to_path_buf(),
        present,
        missing,
    };
    match (exists(cert_path)?, exists(key_path)?) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(incomplete(CA_CERT_FILE, CA_KEY_FILE)),
        (false, true) => Err(incomplete(CA_KEY_FILE, CA_CERT_FILE)),
    }
}

/// Loads the CA of `dir` as an issuer for node certificates.
fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !ca_present(dir, &cert_path, &key_path)? {
        return Err(CertError::NoCa {
            dir: dir.to_path_buf(),
        });
    }
    let key_pem = read_to_string(&key_path)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::BadFile {
        path: key_path.clone(),
        problem: format!("not a usable PEM private key: {e}"),
    })?;
    let cert_pem = read_to_string(&cert_path)?;
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CertError::BadFile {
        path: cert_path,
        problem: format!("not a usable PEM CA certificate: {e}"),
    })
}

fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), CertError> {
    if not_after <= not_before {
        return Err(CertError::Validity(
            "not_after must be later than not_before".into(),
        ));
    }
    params.not_before = OffsetDateTime::from(not_before);
    params.not_after = OffsetDateTime::from(not_after);
    Ok(())
}

fn generate(what: &str, source: rcgen::Error) -> CertError {
    CertError::Generate {
        what: what.to_string(),
        source,
    }
}

fn exists(path: &Path) -> Result<bool, CertError> {
    path.try_exists().map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_to_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `contents` to `path` via a temporary file in the same directory
/// that is created with `mode` (so a private key is never readable by
/// others, not even briefly) and then renamed over `path`.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| CertError::Io { path: p, source }
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(io_err(&tmp))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn der_of(path: &Path) -> Vec<u8> {
        CertificateDer::from_pem_file(path).unwrap().to_vec()
    }

    #[cfg(unix)]
    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn ensure_ca_creates_then_keeps_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("certs");
        ensure_ca(&ca_dir).unwrap();
        let cert = fs::read(ca_dir.join(CA_CERT_FILE)).unwrap();
        let key = fs::read(ca_dir.join(CA_KEY_FILE)).unwrap();
        #[cfg(unix)]
        assert_eq!(mode_of(&ca_dir.join(CA_KEY_FILE)), 0o600);

        ensure_ca(&ca_dir).unwrap();
        assert_eq!(fs::read(ca_dir.join(CA_CERT_FILE)).unwrap(), cert);
        assert_eq!(fs::read(ca_dir.join(CA_KEY_FILE)).unwrap(), key);

        let der = der_of(&ca_dir.join(CA_CERT_FILE));
        let (_, ca) = X509Certificate::from_der(&der).unwrap();
        assert!(ca.is_ca());
        assert!(ca
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap()
            .starts_with("zrelay cluster CA "));
    }

    #[test]
    fn two_cas_have_different_names() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        ensure_ca(a.path()).unwrap();
        ensure_ca(b.path()).unwrap();
        let (da, db) = (
            der_of(&a.path().join(CA_CERT_FILE)),
            der_of(&b.path().join(CA_CERT_FILE)),
        );
        let (_, ca_a) = X509Certificate::from_der(&da).unwrap();
        let (_, ca_b) = X509Certificate::from_der(&db).unwrap();
        assert_ne!(ca_a.subject().as_raw(), ca_b.subject().as_raw());
    }

    #[test]
    fn incomplete_ca_is_an_error_not_silently_replaced() {
        let dir = tempfile::tempdir().unwrap();
        ensure_ca(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let e = ensure_ca(dir.path()).unwrap_err();
        assert!(matches!(e, CertError::IncompleteCa { missing, .. } if missing == CA_KEY_FILE));
        assert!(e.to_string().contains("ca-key.pem"), "{e}");
        let e = issue_node(dir.path(), "node-a", 1).unwrap_err();
        assert!(matches!(e, CertError::IncompleteCa { .. }), "{e}");
    }

    #[test]
    fn issue_without_ca_names_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let e = issue_node(dir.path(), "node-a", 1).unwrap_err();
        assert!(matches!(e, CertError::NoCa { .. }));
        assert!(e.to_string().contains(&dir.path().display().to_string()));
    }

    #[test]
    fn node_certificate_has_sans_ekus_and_issuer() {
        let dir = tempfile::tempdir().unwrap();
        ensure_ca(dir.path()).unwrap();
        let (cert_path, key_path) = issue_node(dir.path(), "primary", 30).unwrap();
        assert_eq!(cert_path, dir.path().join("primary.pem"));
        assert_eq!(key_path, dir.path().join("primary-key.pem"));
        #[cfg(unix)]
        assert_eq!(mode_of(&key_path), 0o600);
        assert!(fs::read_to_string(&key_path)
            .unwrap()
            .contains("BEGIN PRIVATE KEY"));

        let der = der_of(&cert_path);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let ca_der = der_of(&dir.path().join(CA_CERT_FILE));
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        assert_eq!(cert.issuer().as_raw(), ca.subject().as_raw());
        cert.verify_signature(Some(ca.public_key())).unwrap();
        assert!(!cert.is_ca());

        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            vec![
                "DNS:primary".to_string(),
                "DNS:localhost".to_string(),
                format!("IP:{:?}", &[127u8, 0, 0, 1][..]),
                format!("IP:{:?}", &Ipv6Addr::LOCALHOST.octets()[..]),
            ]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);

        let validity = cert.validity();
        let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86400;
        assert_eq!(days, 30, "30 days plus the 1 h clock-skew allowance");
    }

    #[test]
    fn reissuing_overwrites_the_node_files() {
        let dir = tempfile::tempdir().unwrap();
        ensure_ca(dir.path()).unwrap();
        let (cert, key) = issue_node(dir.path(), "replica", 1).unwrap();
        let before = (fs::read(&cert).unwrap(), fs::read(&key).unwrap());
        issue_node(dir.path(), "replica", 1).unwrap();
        assert_ne!(fs::read(&cert).unwrap(), before.0);
        assert_ne!(fs::read(&key).unwrap(), before.1);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn bad_names_and_validities_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        ensure_ca(dir.path()).unwrap();
        for name in [
            "",
            "../x",
            "a/b",
            "a_b",
            "-a",
            "a-",
            "a..b",
            "localhost",
            "ca",
            "x-key",
            "node a",
        ] {
            let e = issue_node(dir.path(), name, 1).unwrap_err();
            assert!(matches!(e, CertError::InvalidName { .. }), "{name:?}: {e}");
        }
        assert!(matches!(
            issue_node(dir.path(), "a", 0),
            Err(CertError::Validity(_))
        ));
        let now = SystemTime::now();
        assert!(matches!(
            issue_node_with_validity(dir.path(), "a", now, now),
            Err(CertError::Validity(_))
        ));
        issue_node(dir.path(), "node-1.example.org", 1).unwrap();
    }

    #[test]
    fn run_cert_command_writes_ca_and_all_nodes_and_checks_names_first() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["primary".to_string(), "replica-1".to_string()];
        run_cert_command(dir.path(), &names, 10).unwrap();
        for f in [
            "ca.pem",
            "ca-key.pem",
            "primary.pem",
            "primary-key.pem",
            "replica-1.pem",
            "replica-1-key.pem",
        ] {
            assert!(dir.path().join(f).is_file(), "{f}");
        }

        let other = tempfile::tempdir().unwrap();
        let bad = vec!["good".to_string(), "bad/name".to_string()];
        assert!(run_cert_command(other.path(), &bad, 10).is_err());
        assert_eq!(fs::read_dir(other.path()).unwrap().count(), 0);
        let twice = vec!["a".to_string(), "a".to_string()];
        assert!(run_cert_command(other.path(), &twice, 10).is_err());
    }
}
