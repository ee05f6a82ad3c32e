//! Operator tooling on the coordinator's keys, straight from etcd (no node
//! needs to be up): `zrelay status --config FILE` (leader, epoch, lease time
//! left, members) and `zrelay pause` / `resume` (the maintenance key).

use std::time::Duration;

use etcd_client::{Client, GetOptions};

use super::decide::{best_candidate, MemberRole};
use super::etcd::{connect_options, parse};
use super::{keys, ClusterSnapshot, CoordinatorConfig};
use crate::wire::tid::tid_to_hex;

const TIMEOUT: Duration = Duration::from_secs(5);

async fn client(cfg: &CoordinatorConfig) -> Result<Client, String> {
    let opts = connect_options(cfg)?;
    tokio::time::timeout(TIMEOUT, Client::connect(cfg.endpoints.clone(), Some(opts)))
        .await
        .map_err(|_| format!("etcd {:?}: no answer within {TIMEOUT:?}", cfg.endpoints))?
        .map_err(|e| format!("etcd {:?}: {e}", cfg.endpoints))
}

/// Read `/<name>/` once: the cluster as etcd sees it.
pub async fn read_cluster(cfg: &CoordinatorConfig) -> Result<ClusterSnapshot, String> {
    let mut c = client(cfg).await?;
    let get = c.get(
        keys::prefix(&cfg.name),
        Some(GetOptions::new().with_prefix()),
    );
    let resp = tokio::time::timeout(TIMEOUT, get)
        .await
        .map_err(|_| "etcd get: no answer".to_string())?
        .map_err(|e| format!("etcd get: {e}"))?;
    let p = parse(&cfg.name, resp.kvs());
    let mut ttl_left = None;
    if let Some((_, lease)) = &p.leader {
        if let Ok(Ok(r)) = tokio::time::timeout(TIMEOUT, c.lease_time_to_live(*lease, None)).await {
            ttl_left = Some(r.ttl());
        }
    }
    let mut members = p.members;
    members.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(ClusterSnapshot {
        reachable: true,
        leader: p.leader.map(|(l, _)| l),
        leader_ttl_left_secs: ttl_left,
        stored_epoch: p.stored_epoch,
        maintenance: p.maintenance,
        members,
        holding: false,
        last_error: None,
    })
}

/// The text `zrelay status --config` prints.
pub fn render(cfg: &CoordinatorConfig, s: &ClusterSnapshot) -> String {
    let mut out = format!("Cluster {:?} in etcd {:?}\n", cfg.name, cfg.endpoints);
    out.push_str(&render_snapshot(s, Some(cfg.ttl_secs)));
    out
}

/// Leader, epoch, lease time left, maintenance and the members table (also
/// under `zrelay status --admin`, from a running node's `/status`).
pub fn render_snapshot(s: &ClusterSnapshot, ttl_secs: Option<u64>) -> String {
    let mut out = String::new();
    if !s.reachable {
        out.push_str(&format!(
            "etcd not reachable from this node: {}\n",
            s.last_error.as_deref().unwrap_or("no round completed yet")
        ));
    }
    match &s.leader {
        Some(l) => out.push_str(&format!(
            "Leader: {} (epoch {}), lease {} left{}\n",
            l.node,
            l.epoch,
            s.leader_ttl_left_secs
                .map_or("?".into(), |t| format!("{t} s")),
            ttl_secs.map_or(String::new(), |t| format!(" of {t} s"))
        )),
        None => out.push_str("Leader: none\n"),
    }
    out.push_str(&format!("Newest epoch taken: {}\n", s.stored_epoch));
    if s.maintenance {
        out.push_str("Maintenance mode: ON (automatic failover paused; `zrelay resume`)\n");
    }
    let best = best_candidate(&s.members).map(|m| m.name.clone());
    let newest = s.members.iter().map(|m| m.durable_tid()).max().unwrap_or(0);
    let mut rows = vec![[
        "Member",
        "Role",
        "Epoch",
        "Eligible",
        "Priority",
        "Applied tid",
        "Acked tid",
        "Behind",
        "Lag (s)",
        "Client",
        "Replication",
    ]
    .map(String::from)];
    for m in &s.members {
        let leader = s.leader.as_ref().is_some_and(|l| l.node == m.name);
        rows.push([
            format!(
                "{}{}",
                m.name,
                if leader {
                    " *"
                } else if best.as_deref() == Some(&m.name) && s.leader.is_none() {
                    " (best)"
                } else {
                    ""
                }
            ),
            match m.role {
                MemberRole::Primary => "primary".into(),
                MemberRole::Replica => "replica".into(),
            },
            m.epoch.to_string(),
            if m.eligible { "yes" } else { "never" }.into(),
            m.priority.to_string(),
            tid_to_hex(&m.applied_tid.to_be_bytes()),
            tid_to_hex(&m.acknowledged_tid.to_be_bytes()),
            if m.durable_tid() < newest {
                "yes"
            } else {
                "no"
            }
            .into(),
            if m.durable_tid() == 0 {
                "-".into()
            } else {
                format!("{:.3}", tid_seconds(newest) - tid_seconds(m.durable_tid()))
            },
            m.client.clone().unwrap_or_else(|| "-".into()),
            m.replication.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A tid as seconds (its commit time; 0 for no tid), for lags.
fn tid_seconds(t: u64) -> f64 {
    crate::wire::tid::tid_to_unix(&t.to_be_bytes()).unwrap_or(0.0)
}

/// `zrelay status --config FILE`: 0 shown, 2 etcd unreachable.
pub async fn status_command(cfg: &CoordinatorConfig) -> i32 {
    match read_cluster(cfg).await {
        Ok(s) => {
            print!("{}", render(cfg, &s));
            0
        }
        Err(e) => {
            eprintln!("zrelay status: {e}");
            2
        }
    }
}

/// `zrelay pause|resume --config FILE`: set or clear the maintenance key.
pub async fn set_maintenance(cfg: &CoordinatorConfig, on: bool, why: &str) -> i32 {
    let r = async {
        let mut c = client(cfg).await?;
        let key = keys::maintenance(&cfg.name);
        let op = async {
            if on {
                c.put(key, why, None).await.map(|_| ())
            } else {
                c.delete(key, None).await.map(|_| ())
            }
        };
        tokio::time::timeout(TIMEOUT, op)
            .await
            .map_err(|_| "etcd: no answer".to_string())?
            .map_err(|e| format!("etcd: {e}"))
    }
    .await;
    match r {
        Ok(()) => {
            println!(
                "maintenance mode {} for cluster {:?}",
                if on {
                    "ON: automatic failover paused"
                } else {
                    "OFF"
                },
                cfg.name
            );
            0
        }
        Err(e) => {
            eprintln!("zrelay: {e}");
            2
        }
    }
}
