//! Static checks of `dashboards/`: the Prometheus alerting rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), the
//! Grafana dashboard is valid JSON whose every panel has a PromQL query that
//! parses, and every `zrelay_*` metric the dashboard and the rules use is
//! documented in `docs/metrics.md` and declared in the code.
//!
//! promtool is required, never skipped: `make test` installs it through
//! `scripts/ensure-tools.sh`. Set `PROMTOOL` to use another binary.
//!
//! (A live cross-check of these names against a running primary and replica
//! scrape lives with the integration tests.)

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn promtool_bin() -> String {
    std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_string())
}

/// Runs promtool with `args`; returns (success, stdout + stderr). Panics —
/// never skips — when promtool cannot be started.
fn promtool(args: &[&str]) -> (bool, String) {
    let bin = promtool_bin();
    let out = match Command::new(&bin).args(args).current_dir(root()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "promtool not found ({bin:?} is not on PATH). The dashboard tests need it: \
             run `make test`, or `scripts/ensure-tools.sh` (installs the Debian package \
             `prometheus`, which ships /usr/bin/promtool), or set PROMTOOL=/path/to/promtool."
        ),
        Err(e) => panic!("cannot run {bin:?}: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn path_arg(p: &Path) -> &str {
    p.to_str().expect("non-UTF-8 path")
}

const RULES: &str = "dashboards/zrelay-alerts.yml";
const RULE_TESTS: &str = "dashboards/zrelay-alerts.test.yml";
const DASHBOARD: &str = "dashboards/zrelay-grafana.json";
const METRICS_DOC: &str = "docs/metrics.md";

#[test]
fn alert_rules_pass_promtool_check() {
    let rules = root().join(RULES);
    let (ok, out) = promtool(&["check", "rules", path_arg(&rules)]);
    assert!(ok, "promtool check rules {RULES} failed:\n{out}");
    assert!(
        out.contains("SUCCESS"),
        "unexpected promtool output:\n{out}"
    );
}

/// Alert names defined by the rules file (`- alert: Name`).
fn alert_names(rules: &str) -> BTreeSet<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn alert_rules_unit_tests_pass() {
    let tests = root().join(RULE_TESTS);
    let (ok, out) = promtool(&["test", "rules", path_arg(&tests)]);
    assert!(ok, "promtool test rules {RULE_TESTS} failed:\n{out}");
    assert!(
        out.contains("SUCCESS"),
        "unexpected promtool output:\n{out}"
    );

    // Every alert is exercised (the ones the brief insists on included).
    let names = alert_names(&read(RULES));
    for must in [
        "ZrelayReplicaLagHigh",
        "ZrelayReplicationStreamDown",
        "ZrelayReplicaDiverged",
        "ZrelayBackendDown",
        "ZrelayTlsHandshakeFailures",
        "ZrelayCertificateExpiresSoon",
        "ZrelayDown",
    ] {
        assert!(names.contains(must), "{RULES} lacks alert {must}");
    }
    let test_text = read(RULE_TESTS);
    for name in &names {
        assert!(
            test_text.contains(&format!("alertname: {name}\n")),
            "{RULE_TESTS} never evaluates alert {name}"
        );
    }
}

/// Every panel, including those nested in collapsed rows.
fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

fn panel_name(p: &Value) -> String {
    format!("panel {} {:?}", p["id"], p["title"].as_str().unwrap_or(""))
}

/// (panel name, refId, expr) of every target.
fn exprs(dash: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                let r = t["refId"].as_str().unwrap_or("?").to_string();
                out.push((panel_name(p), r, e.to_string()));
            }
        }
    }
    out
}

#[test]
fn dashboard_is_valid_and_every_panel_has_a_query() {
    let dash = dashboard();
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion should be a recent one (39), got {}",
        dash["schemaVersion"]
    );
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));

    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("dashboard lacks the `{name}` variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in ["job", "instance"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "`{name}` should be a query variable");
        assert_eq!(v["datasource"]["uid"], "${datasource}");
    }

    let all = panels(&dash);
    assert!(all.len() >= 15, "only {} panels", all.len());
    let mut ids = BTreeSet::new();
    let mut bad = Vec::new();
    for p in &all {
        let name = panel_name(p);
        assert!(ids.insert(p["id"].to_string()), "duplicate id: {name}");
        assert!(p["gridPos"].is_object(), "{name} has no gridPos");
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let has_query = targets
            .iter()
            .any(|t| t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()));
        if !has_query {
            bad.push(format!("{name}: no target with a non-empty expr"));
        }
        // Queries go to the data source the viewer picked, never a fixed uid.
        for ds in std::iter::once(&p["datasource"]).chain(targets.iter().map(|t| &t["datasource"]))
        {
            if !ds.is_null() && ds["uid"] != "${datasource}" {
                bad.push(format!("{name}: data source {ds} is not ${{datasource}}"));
            }
        }
    }
    assert!(bad.is_empty(), "{DASHBOARD}:\n{}", bad.join("\n"));

    // The panels the operators asked for are there.
    let titles: Vec<String> = all
        .iter()
        .map(|p| p["title"].as_str().unwrap_or("").to_lowercase())
        .collect();
    for want in [
        "replication lag (seconds)",
        "replication lag (transactions)",
        "replication lag (bytes)",
        "commit rate",
        "client commit duration",
        "apply duration",
        "applied",
        "sessions by kind",
        "rejected writes",
        "stream state",
        "diverged",
        "tls handshake failures",
        "backend up",
        "uptime",
        "build info",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "no panel titled like {want:?}; titles: {titles:?}"
        );
    }
}

/// Grafana's variables replaced by values that keep PromQL valid.
fn substitute_grafana_vars(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$job", ".+")
        .replace("$instance", ".+")
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let dash = dashboard();
    let exprs = exprs(&dash);
    assert!(!exprs.is_empty());
    // promtool parses the expressions of recording rules: one per query.
    // JSON strings are valid YAML double-quoted scalars.
    let mut rules = String::from("groups:\n  - name: zrelay-dashboard-queries\n    rules:\n");
    for (i, (_, _, expr)) in exprs.iter().enumerate() {
        let e = substitute_grafana_vars(expr);
        assert!(!e.contains('$'), "unknown Grafana variable in {expr:?}");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    fs::write(&file, &rules).unwrap();
    let (ok, out) = promtool(&["check", "rules", path_arg(&file)]);
    let index: Vec<String> = exprs
        .iter()
        .enumerate()
        .map(|(i, (p, r, _))| format!("dashboard:query_{i} = {p} target {r}"))
        .collect();
    assert!(
        ok,
        "a dashboard query is not valid PromQL:\n{out}\n{}",
        index.join("\n")
    );
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
}

/// Every `zrelay_[a-z0-9_]+` token of `text` that starts a word.
fn metric_tokens(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find("zrelay_") {
        let start = from + pos;
        let mut end = start + "zrelay_".len();
        while end < bytes.len() && is_name_byte(bytes[end]) {
            end += 1;
        }
        let word_start =
            start == 0 || !(is_name_byte(bytes[start - 1]) || bytes[start - 1] == b':');
        if word_start && end > start + "zrelay_".len() {
            out.insert(text[start..end].to_string());
        }
        from = end;
    }
    out
}

/// Names the code declares: string literals `"zrelay_..."` in `src/`.
fn declared_names() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.extend(quoted_names(&fs::read_to_string(&path).unwrap(), b'"'));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&root().join("src"), &mut out);
    out
}

/// Names `docs/metrics.md` documents: `` `zrelay_...` `` spans.
fn documented_names() -> BTreeSet<String> {
    quoted_names(&read(METRICS_DOC), b'`')
}

/// Every `zrelay_[a-z0-9_]+` name written between two `quote` bytes.
fn quoted_names(text: &str, quote: u8) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let open = format!("{}zrelay_", quote as char);
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find(&open) {
        let start = from + pos + 1;
        let mut end = start + "zrelay_".len();
        while end < bytes.len() && is_name_byte(bytes[end]) {
            end += 1;
        }
        if bytes.get(end) == Some(&quote) && end > start + "zrelay_".len() {
            out.insert(text[start..end].to_string());
        }
        from = end;
    }
    out
}

/// A histogram is queried through its `_bucket`/`_sum`/`_count` series.
fn base_name(token: &str, declared: &BTreeSet<String>) -> String {
    if !declared.contains(token) {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = token.strip_suffix(suffix) {
                return base.to_string();
            }
        }
    }
    token.to_string()
}

#[test]
fn metric_names_used_by_dashboard_and_rules_exist() {
    let declared = declared_names();
    let documented = documented_names();
    // The scans work at all.
    for known in [
        "zrelay_replication_lag_seconds",
        "zrelay_client_requests_total",
        "zrelay_tls_handshake_failures_total",
        "zrelay_client_commit_duration_seconds",
    ] {
        assert!(declared.contains(known), "{known} not found in src/");
        assert!(
            documented.contains(known),
            "{known} not found in {METRICS_DOC}"
        );
    }

    let mut bad = Vec::new();
    for file in [DASHBOARD, RULES, RULE_TESTS] {
        let used: BTreeSet<String> = metric_tokens(&read(file))
            .iter()
            .map(|t| base_name(t, &declared))
            .collect();
        assert!(!used.is_empty(), "no zrelay_ metric found in {file}");
        for name in used {
            if !documented.contains(&name) {
                bad.push(format!("{file}: {name} is not documented in {METRICS_DOC}"));
            }
            if !declared.contains(&name) {
                bad.push(format!(
                    "{file}: {name} is not declared in src/ (no \"{name}\" literal)"
                ));
            }
        }
    }
    assert!(bad.is_empty(), "\n{}", bad.join("\n"));
}

/// The code and `docs/metrics.md` list the same metrics, so operators neither
/// miss a metric nor build alerts on one that does not exist.
#[test]
fn code_and_metrics_doc_agree() {
    let declared = declared_names();
    let documented = documented_names();
    let undocumented: Vec<_> = declared.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&declared).collect();
    assert!(
        undocumented.is_empty() && phantom.is_empty(),
        "declared in src/ but not documented in {METRICS_DOC}: {undocumented:?}\n\
         documented in {METRICS_DOC} but not declared in src/: {phantom:?}"
    );
}

#[test]
fn metric_token_scanner() {
    let declared: BTreeSet<String> = ["zrelay_x_seconds".to_string()].into();
    let toks = metric_tokens(
        "rate(zrelay_x_seconds_bucket{job=~\"zrelay.*\"}[5m]) + dashboard:zrelay_no + my_zrelay_no",
    );
    assert_eq!(
        toks.into_iter().collect::<Vec<_>>(),
        vec!["zrelay_x_seconds_bucket".to_string()]
    );
    assert_eq!(
        base_name("zrelay_x_seconds_bucket", &declared),
        "zrelay_x_seconds"
    );
    assert_eq!(base_name("zrelay_x_seconds", &declared), "zrelay_x_seconds");
}
