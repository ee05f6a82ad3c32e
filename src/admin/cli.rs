//! Operator commands that read other nodes' admin endpoints: `zrelay status`
//! (a `patronictl list`-like table) and `zrelay check` (a Nagios / SlapOS
//! promise plugin). Both only GET `/status`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::HOST;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// `zrelay status` waits this long for each node.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// Larger `/status` answers are refused (a primary with many replicas is a
/// few kilobytes).
const MAX_BODY_BYTES: usize = 1 << 20;

/// Parses a lag limit: plain seconds (`5`, `0.5`) or a number with a unit
/// (`500ms`, `5s`, `2m`, `1h`). Used by `?lag=` and the CLI.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use seconds, or ms, s, m, h)"
            ))
        }
    };
    if num.is_empty() {
        return Err(format!(
            "{s:?} is not a duration (e.g. 5, 0.5, 500ms, 5s, 2m)"
        ));
    }
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 5, 0.5, 500ms, 5s, 2m)"))?;
    Duration::try_from_secs_f64(n * scale).map_err(|_| format!("{s:?} is out of range"))
}

/// The part of `/status` the CLI reads; unknown fields are ignored so an
/// older CLI reads a newer node.
#[derive(Debug, Deserialize)]
struct StatusView {
    node: String,
    role: String,
    #[serde(default)]
    state: Option<String>,
    backend_up: bool,
    #[serde(default)]
    backend_address: Option<String>,
    #[serde(default)]
    lag_seconds: Option<f64>,
    #[serde(default)]
    storage_last_commit_unix: Option<f64>,
    #[serde(default)]
    upstream: Option<UpstreamView>,
    /// Earliest expiry first (see `tls::expiry`).
    #[serde(default)]
    certificates: Vec<CertView>,
    /// The node's cluster view (`crate::cluster::NodeView` rows).
    #[serde(default)]
    cluster: Vec<ClusterRow>,
    /// With `[coordinator]`: what the node last read from etcd.
    #[serde(default)]
    coordinator: Option<crate::coordinator::ClusterSnapshot>,
}

#[derive(Debug, Clone, Deserialize)]
struct ClusterRow {
    node: String,
    role: String,
    state: String,
    #[serde(default)]
    lag_seconds: Option<f64>,
    #[serde(default)]
    client_addr: Option<String>,
    #[serde(default)]
    reported_by: String,
}

#[derive(Debug, Deserialize)]
struct CertView {
    #[serde(rename = "use")]
    use_: String,
    kind: String,
    not_after_unix: i64,
}

/// Certificates expiring sooner than this are called out under the table
/// (the alert rule `ZrelayCertificateExpiresSoon` uses the same horizon).
const CERT_WARN_DAYS: i64 = 14;

#[derive(Debug, Deserialize)]
struct UpstreamView {
    state: String,
    #[serde(default)]
    lag_seconds: Option<f64>,
}

impl StatusView {
    fn state(&self) -> &str {
        match (&self.state, &self.upstream) {
            (Some(s), _) => s,
            (None, Some(u)) => &u.state,
            (None, None) => "-",
        }
    }

    fn lag(&self) -> Option<f64> {
        self.lag_seconds
            .or_else(|| self.upstream.as_ref().and_then(|u| u.lag_seconds))
    }
}

/// `host:port` or `http://host:port[/]` → `host:port`.
fn authority(admin: &str) -> Result<&str, String> {
    if admin.starts_with("https://") {
        return Err("https is not supported; give host:port".into());
    }
    let a = admin.strip_prefix("http://").unwrap_or(admin);
    let a = a.strip_suffix('/').unwrap_or(a);
    if a.is_empty() || a.contains('/') {
        return Err(format!("{admin:?} is not host:port"));
    }
    Ok(a)
}

/// One HTTP/1.1 request to an admin endpoint, bounded by `timeout` as a
/// whole.
pub(crate) async fn request(
    admin: &str,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    request_as(admin, method, path, None, timeout).await
}

/// How to reach an `https://` admin address: the CA that issued the
/// admin certificate and, optionally, a client certificate to present.
#[derive(Clone)]
pub struct AdminTls {
    pub connector: tokio_rustls::TlsConnector,
    /// Name the server certificate must carry; default: the address's host.
    pub server_name: Option<String>,
}

impl AdminTls {
    pub fn load(
        ca_file: &std::path::Path,
        client: Option<(&std::path::Path, &std::path::Path)>,
        server_name: Option<String>,
    ) -> Result<AdminTls, String> {
        let cfg = crate::replication::tls::https_client_config(ca_file, client)
            .map_err(|e| e.to_string())?;
        Ok(AdminTls {
            connector: tokio_rustls::TlsConnector::from(cfg),
            server_name,
        })
    }
}

/// [`request`] with an optional bearer token, over TLS when `admin` is an
/// `https://` address (then `tls` is required).
pub(crate) async fn request_as(
    admin: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    request_tls(admin, method, path, token, None, timeout).await
}

pub(crate) async fn request_tls(
    admin: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    tls: Option<&AdminTls>,
    timeout: Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let (https, host) = match admin.strip_prefix("https://") {
        Some(rest) => (true, authority(rest)?),
        None => (false, authority(admin)?),
    };
    let req = async {
        let stream = TcpStream::connect(host).await.map_err(|e| e.to_string())?;
        if !https {
            return exchange(stream, host, method, path, token).await;
        }
        let tls = tls.ok_or("an https:// admin address needs --ca-file")?;
        let name = match &tls.server_name {
            Some(n) => n.clone(),
            None => host
                .rsplit_once(':')
                .map_or(host, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        };
        let name = rustls::pki_types::ServerName::try_from(name)
            .map_err(|e| format!("TLS server name: {e}"))?;
        let stream = tls
            .connector
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        exchange(stream, host, method, path, token).await
    };
    match tokio::time::timeout(timeout, req).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn exchange<IO>(
    io: IO,
    host: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> Result<(StatusCode, HeaderMap, Bytes), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, host);
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    driver.abort();
    Ok((parts.status, parts.headers, body))
}

/// `zrelay drain` / `zrelay reload`: POSTs `path` with the token read from
/// `token_file` (if given), prints the answer, exits 0 on 200, 1 on a
/// refusal or error answer, 2 if the node could not be reached.
pub async fn control_command(
    admin: &str,
    path: &str,
    token_file: Option<&std::path::Path>,
    tls: Option<&AdminTls>,
    timeout: Duration,
) -> i32 {
    let token = match token_file.map(std::fs::read_to_string).transpose() {
        Ok(t) => t.map(|t| t.trim().to_string()),
        Err(e) => {
            eprintln!("zrelay: token file: {e}");
            return 2;
        }
    };
    match request_tls(admin, Method::POST, path, token.as_deref(), tls, timeout).await {
        Ok((code, _, body)) => {
            let text = String::from_utf8_lossy(&body);
            if code == StatusCode::OK {
                print!("{text}");
                0
            } else {
                eprint!("zrelay: {admin}{path}: HTTP {code}: {text}");
                1
            }
        }
        Err(e) => {
            eprintln!("zrelay: {admin}{path}: {e}");
            2
        }
    }
}

async fn fetch_status(admin: &str, timeout: Duration) -> Result<StatusView, String> {
    let (code, _, body) = request(admin, Method::GET, "/status", timeout).await?;
    if code != StatusCode::OK {
        return Err(format!("/status answered HTTP {code}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("/status is not a zrelay status: {e}"))
}

/// `zrelay status --admin A --admin B ...`: prints one row per node and
/// returns 0 if every node answered, 1 otherwise.
pub async fn status_command(admins: &[String]) -> i32 {
    let (text, code) = status_report(admins, STATUS_TIMEOUT).await;
    print!("{text}");
    code
}

pub(crate) async fn status_report(admins: &[String], timeout: Duration) -> (String, i32) {
    let tasks: Vec<_> = admins
        .iter()
        .map(|a| {
            let a = a.clone();
            tokio::spawn(async move { fetch_status(&a, timeout).await })
        })
        .collect();
    let mut rows = vec![[
        "Node",
        "Role",
        "State",
        "Backend",
        "Last tid time (UTC)",
        "Lag (s)",
        "Cert expires (UTC)",
        "Admin",
    ]
    .map(String::from)
    .to_vec()];
    let mut errors = Vec::new();
    let mut view: Option<(String, Vec<ClusterRow>)> = None;
    let mut etcd: Option<(String, crate::coordinator::ClusterSnapshot)> = None;
    let mut warnings = Vec::new();
    for (admin, task) in admins.iter().zip(tasks) {
        let result = task.await.unwrap_or_else(|e| Err(e.to_string()));
        if let Ok(s) = &result {
            if view.is_none() && !s.cluster.is_empty() {
                view = Some((s.node.clone(), s.cluster.clone()));
            }
            if let Some(c) = s.coordinator.as_ref().filter(|c| c.reachable) {
                if etcd.is_none() {
                    etcd = Some((s.node.clone(), c.clone()));
                }
            }
        }
        rows.push(match result {
            Ok(s) => vec![
                s.node.clone(),
                s.role.clone(),
                s.state().to_string(),
                if s.backend_up { "up" } else { "down" }.to_string(),
                s.storage_last_commit_unix
                    .map(iso_utc)
                    .unwrap_or_else(|| "-".into()),
                s.lag()
                    .map(|l| format!("{l:.3}"))
                    .unwrap_or_else(|| "-".into()),
                first_cert_expiry(&s, &mut warnings),
                admin.clone(),
            ],
            Err(e) => {
                errors.push(format!("{admin}: {e}"));
                ["?", "-", "unreachable", "-", "-", "-", "-", admin.as_str()]
                    .map(String::from)
                    .to_vec()
            }
        });
    }
    let mut text = table(&rows);
    for e in warnings.iter().chain(&errors) {
        text.push_str(e);
        text.push('\n');
    }
    if let Some((from, nodes)) = view {
        text.push_str(&format!("Cluster view from {from}:\n"));
        let mut rows = vec![[
            "Node",
            "Role",
            "State",
            "Lag (s)",
            "Client address",
            "Reported by",
        ]
        .map(String::from)
        .to_vec()];
        for n in nodes {
            rows.push(vec![
                n.node,
                n.role,
                n.state,
                n.lag_seconds
                    .map(|l| format!("{l:.3}"))
                    .unwrap_or_else(|| "-".into()),
                n.client_addr.unwrap_or_else(|| "-".into()),
                n.reported_by,
            ]);
        }
        text.push_str(&table(&rows));
    }
    if let Some((from, snap)) = etcd {
        text.push_str(&format!("Coordinator (etcd) as {from} last read it:\n"));
        text.push_str(&crate::coordinator::view::render_snapshot(&snap, None));
    }
    (text, if errors.is_empty() { 0 } else { 1 })
}

/// The earliest certificate expiry of a node as `DATE (use kind)`, noting
/// in `warnings` every certificate that expires within [`CERT_WARN_DAYS`].
fn first_cert_expiry(s: &StatusView, warnings: &mut Vec<String>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for c in &s.certificates {
        let days = (c.not_after_unix - now).div_euclid(86_400);
        if days < CERT_WARN_DAYS {
            let when = if c.not_after_unix <= now {
                "has EXPIRED".to_string()
            } else {
                format!("expires in {days} days")
            };
            let what = if c.kind == "ca" {
                "CA certificate"
            } else {
                "certificate"
            };
            warnings.push(format!(
                "{}: {} {what} {when} ({})",
                s.node,
                c.use_,
                iso_utc(c.not_after_unix as f64)
            ));
        }
    }
    match s.certificates.iter().min_by_key(|c| c.not_after_unix) {
        Some(c) => format!(
            "{} ({} {})",
            &iso_utc(c.not_after_unix as f64)[..10],
            c.use_,
            c.kind
        ),
        None => "-".into(),
    }
}

/// A `patronictl list`-style box table; the first row is the header.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let rule = {
        let mut s = String::from("+");
        for w in &widths {
            s.push_str(&"-".repeat(w + 2));
            s.push('+');
        }
        s.push('\n');
        s
    };
    let mut out = rule.clone();
    for (i, row) in rows.iter().enumerate() {
        out.push('|');
        for (c, w) in widths.iter().enumerate() {
            let cell = row.get(c).map_or("", String::as_str);
            let pad = w - cell.chars().count();
            out.push(' ');
            out.push_str(cell);
            out.push_str(&" ".repeat(pad + 1));
            out.push('|');
        }
        out.push('\n');
        if i == 0 {
            out.push_str(&rule);
        }
    }
    out.push_str(&rule);
    out
}

/// Unix seconds → `2024-05-01T12:34:56.789Z`.
fn iso_utc(unix: f64) -> String {
    if !(0.0..=253_402_300_799.0).contains(&unix) {
        return "-".into();
    }
    let millis = (unix * 1000.0).round() as i64;
    let (secs, ms) = (millis.div_euclid(1000), millis.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = crate::wire::tid::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Nagios plugin exit codes.
const OK: i32 = 0;
const WARNING: i32 = 1;
const CRITICAL: i32 = 2;
const UNKNOWN: i32 = 3;

/// `zrelay check --admin A --max-lag 5s`: one Nagios status line; exit 0
/// OK, 1 WARNING (lag over half the max, or catching up), 2 CRITICAL (lag
/// over the max, stream disconnected or diverged, backend down), 3 UNKNOWN
/// (admin unreachable or not making sense).
pub async fn check_command(admin: &str, max_lag: Duration, timeout: Duration) -> i32 {
    let (code, line) = check(admin, max_lag, timeout).await;
    println!("{line}");
    code
}

pub(crate) async fn check(admin: &str, max_lag: Duration, timeout: Duration) -> (i32, String) {
    let s = match fetch_status(admin, timeout).await {
        Ok(s) => s,
        Err(e) => {
            return (
                UNKNOWN,
                format!("ZRELAY UNKNOWN - admin {admin}: {}", one_line(&e)),
            )
        }
    };
    let (code, summary, perf) = judge(&s, max_lag);
    let word = match code {
        OK => "OK",
        WARNING => "WARNING",
        CRITICAL => "CRITICAL",
        _ => "UNKNOWN",
    };
    (
        code,
        format!("ZRELAY {word} - {} {} {summary} | {perf}", s.role, s.node),
    )
}

fn judge(s: &StatusView, max_lag: Duration) -> (i32, String, String) {
    let crit = max_lag.as_secs_f64();
    let warn = crit / 2.0;
    let backend = s.backend_address.as_deref().unwrap_or("backend");
    match s.role.as_str() {
        "primary" => {
            let perf = format!("backend_up={}", u8::from(s.backend_up));
            if s.backend_up {
                (OK, format!("{}, backend up", s.state()), perf)
            } else {
                (CRITICAL, format!("backend {backend} down"), perf)
            }
        }
        "replica" => {
            let lag = s.lag();
            let lag_text = lag.map_or("unknown".into(), |l| format!("{l:.3}s"));
            let perf = format!(
                "lag={};{warn};{crit};0",
                lag.map_or("U".into(), |l| format!("{l:.3}s"))
            );
            let state = s.state();
            let summary = |what: &str| format!("{state}, lag {lag_text}{what}");
            let l = lag.unwrap_or(f64::INFINITY);
            let (code, summary) = if !s.backend_up {
                (CRITICAL, format!("backend {backend} down, {state}"))
            } else if state == "disconnected" || state == "diverged" {
                (CRITICAL, summary(""))
            } else if l > crit {
                (CRITICAL, summary(&format!(" > {crit}s")))
            } else if state == "catching_up" {
                (WARNING, summary(""))
            } else if l > warn {
                (WARNING, summary(&format!(" > {warn}s")))
            } else if state == "live" {
                (OK, summary(""))
            } else {
                (UNKNOWN, summary(" (unknown state)"))
            };
            (code, summary, perf)
        }
        other => (UNKNOWN, format!("unknown role {other:?}"), String::new()),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::http::tests::start;
    use crate::status::{Role, StreamState};
    use tokio::io::AsyncWriteExt;

    #[test]
    fn durations() {
        let ok = [
            ("5", 5_000),
            ("0.5", 500),
            (" 2.5 ", 2_500),
            ("500ms", 500),
            ("5s", 5_000),
            ("2m", 120_000),
            ("1.5m", 90_000),
            ("1h", 3_600_000),
            ("0", 0),
            (".25", 250),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        for bad in [
            "",
            "s",
            "ms",
            "-1",
            "-1s",
            "5x",
            "five",
            "1.2.3",
            "1e3",
            "NaN",
            "inf",
            "5 s s",
            "99999999999999999999999",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn iso_times() {
        assert_eq!(iso_utc(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_utc(1_700_000_000.25), "2023-11-14T22:13:20.250Z");
        assert_eq!(iso_utc(951_782_400.0), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso_utc(f64::NAN), "-");
        assert_eq!(iso_utc(-1.0), "-");
    }

    #[test]
    fn admin_addresses() {
        assert_eq!(authority("127.0.0.1:8300"), Ok("127.0.0.1:8300"));
        assert_eq!(authority("http://node1:8300/"), Ok("node1:8300"));
        assert!(authority("https://node1:8300").is_err());
        assert!(authority("node1:8300/status").is_err());
        assert!(authority("").is_err());
    }

    const T: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(5);

    fn set(s: &crate::admin::http::tests::TestServer, state: StreamState, lag: f64) {
        s.status.update(|st| {
            let up = st.upstream.as_mut().unwrap();
            up.state = state;
            up.lag_seconds = lag;
        });
    }

    #[tokio::test]
    async fn check_exit_codes() {
        let s = start(Role::Replica).await;
        set(&s, StreamState::Live, 0.012);
        let (code, line) = check(&s.addr, MAX, T).await;
        assert_eq!(code, OK, "{line}");
        assert_eq!(
            line,
            "ZRELAY OK - replica node2 live, lag 0.012s | lag=0.012s;2.5;5;0"
        );

        set(&s, StreamState::Live, 3.0);
        let (code, line) = check(&s.addr, MAX, T).await;
        assert_eq!(code, WARNING, "{line}");
        assert!(line.starts_with("ZRELAY WARNING - "), "{line}");

        set(&s, StreamState::CatchingUp, 0.1);
        let (code, line) = check(&s.addr, MAX, T).await;
        assert_eq!(code, WARNING, "{line}");
        assert!(line.contains("catching_up"), "{line}");

        set(&s, StreamState::Live, 6.0);
        let (code, line) = check(&s.addr, MAX, T).await;
        assert_eq!(code, CRITICAL, "{line}");
        assert!(line.starts_with("ZRELAY CRITICAL - "), "{line}");

        for st in [StreamState::Disconnected, StreamState::Diverged] {
            set(&s, st, 0.0);
            let (code, line) = check(&s.addr, MAX, T).await;
            assert_eq!(code, CRITICAL, "{line}");
        }

        set(&s, StreamState::Live, 0.0);
        s.status.update(|st| st.backend_up = false);
        let (code, line) = check(&s.addr, MAX, T).await;
        assert_eq!(code, CRITICAL, "{line}");
        assert!(line.contains("backend 127.0.0.1:8200 down"), "{line}");
        s.shutdown.cancel();

        let p = start(Role::Primary).await;
        let (code, line) = check(&p.addr, MAX, T).await;
        assert_eq!(code, OK, "{line}");
        assert_eq!(
            line,
            "ZRELAY OK - primary node2 running, backend up | backend_up=1"
        );
        p.shutdown.cancel();
    }

    #[tokio::test]
    async fn check_unknown() {
        // Nobody listening.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let (code, line) = check(&addr, MAX, T).await;
        assert_eq!(code, UNKNOWN, "{line}");
        assert!(line.starts_with("ZRELAY UNKNOWN - admin "), "{line}");
        assert_eq!(line.lines().count(), 1);

        // Something that answers HTTP, but not a zrelay status.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let _ = c
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                    .await;
            }
        });
        let (code, line) = check(&addr, MAX, T).await;
        assert_eq!(code, UNKNOWN, "{line}");

        // Accepts and says nothing: the timeout decides.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (code, line) = check(&addr, MAX, Duration::from_millis(200)).await;
        assert_eq!(code, UNKNOWN, "{line}");
        assert!(line.contains("no answer"), "{line}");
        drop(l);
    }

    #[tokio::test]
    async fn status_table() {
        let a = start(Role::Replica).await;
        let soon = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 3 * 86_400
            + 3600;
        a.status.update(|st| {
            st.storage_last_commit_unix = Some(1_700_000_000.25);
            st.certificates = vec![crate::tls::expiry::CertExpiry {
                use_: "client",
                kind: "cert",
                file: "c.pem".into(),
                subject: "node2".into(),
                not_after: String::new(),
                not_after_unix: soon,
            }];
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = l.local_addr().unwrap().to_string();
        drop(l);
        let (text, code) = status_report(&[a.addr.clone(), dead.clone()], T).await;
        assert_eq!(code, 1, "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("+-"), "{text}");
        assert!(
            lines[1].contains("| Node ") && lines[1].contains("| Lag (s) "),
            "{text}"
        );
        let row = lines.iter().find(|l| l.contains("node2")).unwrap();
        for cell in [
            "replica",
            "live",
            "up",
            "2023-11-14T22:13:20.250Z",
            "0.100",
            a.addr.as_str(),
        ] {
            assert!(row.contains(cell), "{cell} not in {row}");
        }
        assert!(
            row.contains(&format!("{} (client cert)", &iso_utc(soon as f64)[..10])),
            "{row}"
        );
        assert!(
            text.contains("node2: client certificate expires in 3 days"),
            "{text}"
        );
        let row = lines.iter().find(|l| l.contains(dead.as_str())).unwrap();
        assert!(row.contains("unreachable"), "{text}");
        // Every table line has the same width.
        let widths: Vec<usize> = lines
            .iter()
            .filter(|l| l.starts_with(['+', '|']))
            .map(|l| l.chars().count())
            .collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{text}");

        let (text, code) = status_report(std::slice::from_ref(&a.addr), T).await;
        assert_eq!(code, 0, "{text}");
        a.shutdown.cancel();
    }
}
