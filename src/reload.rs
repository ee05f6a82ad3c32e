//! Live reload (`SIGHUP`, `POST /reload`): re-read the config file and put
//! into effect what can change without dropping anything.
//!
//! Reloadable: `log_level`, `admin.max_replica_lag_ms`, `admin.token_file`,
//! `admin.admin_allowed`, `replication.allowed_peers`, and the TLS files of
//! `[replication.tls]` and `[admin.tls]` (re-read even when their paths did
//! not change: rotation replaces the files in place). New handshakes use
//! the new certificates; open streams and sessions keep running.
//!
//! Any other changed key is reported and logged by name as needing a
//! restart; its running value is kept. A file that does not load (syntax,
//! validation, unreadable TLS files or token) changes nothing.
//!
//! Which keys changed is found by comparing the TOML documents themselves
//! (old text as loaded, new text), so it needs nothing from the config
//! structs; writing out a default that was implicit counts as a change.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::auth::AdminAuth;
use crate::admin::http::AdminSettings;
use crate::config::Config;
use crate::control::{ReloadReply, ReloadReport};
use crate::live::Live;
use crate::replication::tls;

pub const RELOADS: &str = "zrelay_config_reloads_total";

/// Keys (dotted paths) a reload may change.
pub const RELOADABLE: &[&str] = &[
    "log_level",
    "admin.max_replica_lag_ms",
    "admin.token_file",
    "admin.admin_allowed",
    "admin.tls.ca_file",
    "admin.tls.cert_file",
    "admin.tls.key_file",
    "replication.allowed_peers",
    "replication.tls.ca_file",
    "replication.tls.cert_file",
    "replication.tls.key_file",
];

pub type LogFilterSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The running pieces a reload replaces; None where the node has no such
/// piece (no admin listener, no replication...).
#[derive(Default)]
pub struct Reloadables {
    pub log_filter: Option<LogFilterSetter>,
    pub admin: Option<Arc<Live<AdminSettings>>>,
    pub admin_tls: Option<Arc<Live<TlsAcceptor>>>,
    pub repl_acceptor: Option<Arc<Live<TlsAcceptor>>>,
    pub repl_allowed: Option<Arc<Live<Vec<String>>>>,
    pub repl_connector: Option<Arc<Live<TlsConnector>>>,
    /// Where re-read certificates' expiry dates go (`tls::expiry`).
    pub status: Option<Arc<crate::status::StatusHub>>,
}

pub fn describe() {
    metrics::describe_counter!(
        RELOADS,
        "Configuration reloads (SIGHUP, POST /reload) by result: ok, needs_restart (some changed keys were not applied), error (nothing applied)."
    );
    for r in ["ok", "needs_restart", "error"] {
        metrics::counter!(RELOADS, "result" => r).increment(0);
    }
}

/// Installs the SIGHUP handler. Call first thing at start-up: until a
/// handler is installed, SIGHUP's default action ends the process.
pub fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            error!(error = %e, "cannot install the SIGHUP handler; reload only via POST /reload");
            None
        }
    }
}

/// Serves reload requests (SIGHUP and `requests`) until shutdown. `source`:
/// the config file and the text it had at start-up (None: every reload
/// fails, there is no file to re-read).
pub async fn run(
    source: Option<(PathBuf, String)>,
    mut hup: Option<tokio::signal::unix::Signal>,
    pieces: Reloadables,
    mut requests: mpsc::Receiver<ReloadReply>,
    shutdown: CancellationToken,
) {
    let (path, mut current) = match source {
        Some((p, t)) => (Some(p), t),
        None => (None, String::new()),
    };
    let file = path
        .as_ref()
        .map_or_else(|| "<none>".to_string(), |p| p.display().to_string());
    loop {
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                info!(file = %file, "SIGHUP: reloading the configuration");
                None
            }
            r = requests.recv() => match r {
                Some(r) => {
                    info!(file = %file, "reload requested over admin HTTP");
                    Some(r)
                }
                None => return,
            },
        };
        let result = match &path {
            Some(path) => reload_once(path, &mut current, &pieces),
            None => Err("zrelay was started without a config file to re-read".to_string()),
        };
        let label = match &result {
            Ok(r) if r.needs_restart.is_empty() => "ok",
            Ok(_) => "needs_restart",
            Err(e) => {
                error!(file = %file, error = %e, "reload failed; nothing changed");
                "error"
            }
        };
        metrics::counter!(RELOADS, "result" => label).increment(1);
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}

/// One reload: load and validate the file, build every new piece, then
/// swap them in. Updates `current` to the text now in effect.
pub fn reload_once(
    path: &std::path::Path,
    current: &mut String,
    pieces: &Reloadables,
) -> Result<ReloadReport, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg = Config::parse(&text, path).map_err(|e| e.to_string())?;
    let changed = changed_keys(current, &text)?;
    let (mut applied, needs_restart): (Vec<String>, Vec<String>) = changed
        .into_iter()
        .partition(|k| RELOADABLE.contains(&k.as_str()));
    for key in &needs_restart {
        warn!(key = %key, file = %path.display(), "changed key needs a restart; keeping the running value");
    }
    let restart = |k: &str| needs_restart.iter().any(|n| n == k);

    // Build everything first: a failure here must leave all as it was.
    let admin = match (&pieces.admin, &cfg.admin) {
        (Some(_), Some(a)) => Some(AdminSettings {
            max_replica_lag: a.max_replica_lag(),
            auth: AdminAuth::load(a).map_err(|e| format!("admin.token_file: {e}"))?,
        }),
        _ => None,
    };
    let admin_tls = match (
        &pieces.admin_tls,
        cfg.admin.as_ref().and_then(|a| a.tls.as_ref()),
    ) {
        (Some(_), Some(files)) => Some(TlsAcceptor::from(
            tls::admin_server_config(files).map_err(|e| format!("admin.tls: {e}"))?,
        )),
        _ => None,
    };
    let repl = cfg.replication.as_ref();
    let acceptor = match (&pieces.repl_acceptor, repl) {
        (Some(_), Some(r)) => Some(TlsAcceptor::from(
            tls::server_config(&r.tls).map_err(|e| format!("replication.tls: {e}"))?,
        )),
        _ => None,
    };
    let connector = match (&pieces.repl_connector, repl) {
        (Some(_), Some(r)) => Some(TlsConnector::from(
            tls::client_config(&r.tls).map_err(|e| format!("replication.tls: {e}"))?,
        )),
        _ => None,
    };

    if let Some(set) = &pieces.log_filter {
        if applied.iter().any(|k| k == "log_level") {
            set(&cfg.log_level).map_err(|e| format!("log_level: {e}"))?;
        }
    }
    if let (Some(live), Some(new)) = (&pieces.admin, admin) {
        live.set(new);
    }
    if let (Some(live), Some(new)) = (&pieces.admin_tls, admin_tls) {
        live.set(new);
        applied.push("admin.tls (files re-read)".into());
    }
    if let (Some(live), Some(new)) = (&pieces.repl_acceptor, acceptor) {
        live.set(new);
    }
    if let (Some(live), Some(new)) = (&pieces.repl_connector, connector) {
        live.set(new);
    }
    if pieces.repl_acceptor.is_some() || pieces.repl_connector.is_some() {
        applied.push("replication.tls (files re-read)".into());
    }
    // Rotated certificates: their new expiry dates (metric, /status).
    if let Some(status) = &pieces.status {
        if let (true, Some(r)) = (
            pieces.repl_acceptor.is_some() || pieces.repl_connector.is_some(),
            repl,
        ) {
            if let Err(e) = crate::tls::expiry::track(
                status,
                "replication",
                &r.tls.cert_file,
                Some(&r.tls.ca_file),
            ) {
                warn!(error = %e, "replication certificate expiry not updated");
            }
        }
        if let (true, Some(files)) = (
            pieces.admin_tls.is_some(),
            cfg.admin.as_ref().and_then(|a| a.tls.as_ref()),
        ) {
            if let Err(e) =
                crate::tls::expiry::track(status, "admin", &files.cert_file, Some(&files.ca_file))
            {
                warn!(error = %e, "admin certificate expiry not updated");
            }
        }
    }
    if let (Some(live), Some(r)) = (&pieces.repl_allowed, repl) {
        if !restart("replication") {
            live.set(r.allowed_peers.clone());
        }
    }
    *current = merge_applied(current, &text, &needs_restart)?;
    info!(applied = ?applied, needs_restart = ?needs_restart, "configuration reloaded");
    Ok(ReloadReport {
        applied,
        needs_restart,
    })
}

/// Dotted paths of the keys whose values differ between two TOML texts. A
/// table present on one side only is reported as the table's path.
pub fn changed_keys(old: &str, new: &str) -> Result<Vec<String>, String> {
    let old: toml::Table = toml::from_str(old).map_err(|e| e.to_string())?;
    let new: toml::Table = toml::from_str(new).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    diff_tables("", &old, &new, &mut out);
    out.sort();
    Ok(out)
}

fn diff_tables(prefix: &str, old: &toml::Table, new: &toml::Table, out: &mut Vec<String>) {
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for k in keys {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (old.get(k), new.get(k)) {
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                diff_tables(&path, a, b, out)
            }
            (a, b) if a != b => out.push(path),
            _ => {}
        }
    }
}

/// The text now in effect: the new file, except that keys needing a restart
/// keep their old values (so they are reported again on the next reload
/// until the process restarts).
fn merge_applied(old: &str, new: &str, needs_restart: &[String]) -> Result<String, String> {
    let old: toml::Table = toml::from_str(old).map_err(|e| e.to_string())?;
    let mut merged: toml::Table = toml::from_str(new).map_err(|e| e.to_string())?;
    for key in needs_restart {
        let parts: Vec<&str> = key.split('.').collect();
        let old_value = lookup(&old, &parts).cloned();
        set_path(&mut merged, &parts, old_value);
    }
    toml::to_string(&merged).map_err(|e| e.to_string())
}

fn lookup<'a>(t: &'a toml::Table, parts: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = parts.split_first()?;
    let v = t.get(*first)?;
    if rest.is_empty() {
        return Some(v);
    }
    lookup(v.as_table()?, rest)
}

fn set_path(t: &mut toml::Table, parts: &[&str], value: Option<toml::Value>) {
    let Some((first, rest)) = parts.split_first() else {
        return;
    };
    if rest.is_empty() {
        match value {
            Some(v) => {
                t.insert(first.to_string(), v);
            }
            None => {
                t.remove(*first);
            }
        }
        return;
    }
    if let Some(toml::Value::Table(sub)) = t.get_mut(*first) {
        set_path(sub, rest, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_are_dotted_paths() {
        let old = "log_level = \"info\"\n[client]\nlisten = \"127.0.0.1:1\"\n[admin]\nlisten = \"127.0.0.1:2\"\n";
        let new = "log_level = \"debug\"\n[client]\nlisten = \"127.0.0.1:3\"\n[admin]\nlisten = \"127.0.0.1:2\"\nmax_replica_lag_ms = 10\n[admin.tls]\nca_file = \"x\"\n";
        assert_eq!(
            changed_keys(old, new).unwrap(),
            vec![
                "admin.max_replica_lag_ms",
                "admin.tls",
                "client.listen",
                "log_level"
            ]
        );
        assert!(changed_keys(old, old).unwrap().is_empty());
        let merged =
            merge_applied(old, new, &["client.listen".into(), "admin.tls".into()]).unwrap();
        assert_eq!(
            changed_keys(&merged, new).unwrap(),
            vec!["admin.tls", "client.listen"]
        );
        assert_eq!(
            changed_keys(old, &merged).unwrap(),
            vec!["admin.max_replica_lag_ms", "log_level"]
        );
    }
}
