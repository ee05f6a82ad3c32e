//! Coordinator: membership, the leader lease and elections in etcd.
//!
//! zrelay does not run a consensus protocol of its own; like Patroni and
//! Stolon it keeps a few keys in etcd (v3 API, 3.4+) under `/<name>/`:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `/<name>/members/<node>` | [`Member`] JSON: role, addresses, eligibility, priority, applied/acknowledged tid, epoch | the node's member lease (`ttl_secs`), refreshed every `loop_wait_secs` |
//! | `/<name>/leader` | [`LeaderValue`] JSON: node, epoch | the leader lease (`ttl_secs`), renewed every `loop_wait_secs` by the primary |
//! | `/<name>/epoch` | the newest epoch a leader took (decimal) | none |
//! | `/<name>/maintenance` | anything: automatic failover paused | none |
//!
//! **Seam with the role machinery.** This module never changes the node's
//! role. [`spawn`] takes a `watch` of the node's own [`Member`] record (the
//! role machinery writes role, tids, epoch, eligibility) and emits [`Event`]s
//! on a channel: [`Event::Elected`] ("promote now, epoch N"),
//! [`Event::Holding`], [`Event::Leader`] ("X leads epoch N: follow it"),
//! [`Event::NoLeader`] and [`Event::Fence`] ("stop accepting commits now").
//! When the role machinery demotes the node (its watch says replica), the
//! coordinator releases the leader key. A [`ClusterSnapshot`] `watch` carries
//! what `zrelay status` and `/status` show. The running node wires this in
//! `crate::rolectl` (`RoleCtl::attach_coordinator`): a primary takes
//! commits only while this task holds the key.
//!
//! **Switchover** ([`Request::Handover`]). The primary (fenced, the target
//! caught up) asks its coordinator to hand the key over: one transaction
//! that, if the leader key still holds this node's value under this node's
//! lease, puts it naming the target at epoch + 1 under a *fresh* lease and
//! bumps the epoch key. The old primary stops holding at once. The target's
//! coordinator sees a key naming it under a lease it does not renew yet and
//! adopts it: its first confirmed keep-alive starts its fencing clock, as a
//! grant would. If the target died meanwhile, the fresh lease expires after
//! `ttl` and a normal election follows; an automatic election can never race
//! it (elections need the key absent).
//!
//! **Elections** ([`decide::plan`]). When the leader key is absent, a live
//! eligible replica (`promotion != "never"`) runs only if it is the best
//! candidate among the live members (member key present): newest durable tid
//! (applied or acknowledged, whichever is newer, so no commit a client saw
//! acknowledged in semi-sync mode is lost), then priority, then the smaller
//! name. It waits while a member still reports itself primary in a current
//! epoch (that one retakes the key), while the maintenance key exists, and
//! during its first `ttl` after start (at cluster start-up the primary may
//! not have registered yet).
//! Running means one etcd transaction: *if* the leader key, the maintenance
//! key are absent and the epoch key is unchanged since read, *then* put the
//! leader key (under a fresh lease) and epoch + 1. etcd serializes
//! transactions, so at most one node wins an epoch.
//!
//! **Self-fencing: the timing argument.** Let `ttl` be the lease TTL,
//! `loop_wait` the renewal period and `margin` = `fence_margin_ms`.
//! 1. A renewal (grant or keep-alive) attempt starts at our local time `s`.
//!    etcd (its leader) restarts the lease's TTL when it *processes* the
//!    request, which happens after `s`; so once it confirms, the lease cannot
//!    expire before `s + ttl` in real time. An etcd leader change only
//!    extends leases (the new leader refreshes every lease to a full TTL).
//! 2. Our deadline is `s_last + ttl − margin`, `s_last` being the start of
//!    the newest *confirmed* attempt ([`decide::FenceClock`]). A timer that
//!    does not depend on any etcd call fires at the deadline; every etcd call
//!    and every pause between rounds races it. At the deadline the node emits
//!    [`Event::Fence`] and forgets it held the key.
//! 3. Clocks: both durations are measured with monotonic clocks, ours and the
//!    etcd leader's; no wall-clock agreement is needed. Their *rates* may
//!    differ by ρ (crystal oscillators: ≲ 100 ppm; NTP slews ≤ 500 ppm), so
//!    `ttl` on our clock may be `ttl·(1+ρ)` on etcd's: 10 s × 500 ppm = 5 ms.
//!    `margin` covers that, the scheduling delay of our timer on a loaded
//!    host, and the time the role machinery takes to refuse commits after
//!    [`Event::Fence`] (it must be a prompt, local action: no network I/O).
//!    The default margin, 2 s of a 10 s ttl, is generous for all three.
//! 4. Renewals happen every `loop_wait`, each attempt bounded by
//!    `loop_wait`, so a healthy leader renews about `ttl / loop_wait` times
//!    per lease; validation requires `2·loop_wait + margin < ttl`, so one lost
//!    round never fences a healthy leader.
//! 5. Other nodes only see the key vanish when etcd expires it (≥ `s + ttl`),
//!    and only then may one of them win: the old primary fenced itself at
//!    least `margin` earlier. Hence no two primaries accept commits at once.
//!
//! **etcd unreachable**: the primary fences at its deadline (like Patroni
//! without failsafe mode); replicas keep serving reads; nothing is elected
//! without etcd (an election is an etcd transaction).

pub mod decide;
mod etcd;
pub mod metrics;
pub mod view;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use decide::{LeaderValue, Member, MemberRole};

/// `[coordinator]` in the config file. Absent: static roles, manual switchover.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Only "etcd" today.
    pub kind: CoordinatorKind,
    /// etcd client URLs, e.g. `["https://10.0.0.1:2379", ...]` (http:// without TLS).
    pub endpoints: Vec<String>,
    /// Cluster name: every key lives under `/<name>/`.
    #[serde(default = "default_name")]
    pub name: String,
    /// Lifetime of the member and leader leases, in seconds.
    #[serde(default = "default_ttl")]
    pub ttl_secs: u64,
    /// Period of lease renewals, member updates and the leader check.
    #[serde(default = "default_loop_wait")]
    pub loop_wait_secs: u64,
    /// The leader stops accepting commits this long before its lease could
    /// expire in etcd (see the module doc for the timing argument).
    #[serde(default = "default_margin")]
    pub fence_margin_ms: u64,
    /// TLS to etcd (server verified against `ca_file`; client certificate
    /// optional). Absent: plain http:// endpoints.
    #[serde(default)]
    pub tls: Option<EtcdTls>,
    /// etcd user (v3 auth); the password is read from `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoordinatorKind {
    Etcd,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// CA that etcd's server certificate chains to.
    pub ca_file: PathBuf,
    /// Client certificate and key (etcd `--client-cert-auth`); both or neither.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Name to verify in etcd's certificate instead of the endpoint's host
    /// (for endpoints given as IP addresses whose certificates carry names).
    #[serde(default)]
    pub server_name: Option<String>,
}

fn default_name() -> String {
    "zrelay".into()
}
fn default_ttl() -> u64 {
    10
}
fn default_loop_wait() -> u64 {
    2
}
fn default_margin() -> u64 {
    2000
}

impl CoordinatorConfig {
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }
    pub fn loop_wait(&self) -> Duration {
        Duration::from_secs(self.loop_wait_secs)
    }
    pub fn fence_margin(&self) -> Duration {
        Duration::from_millis(self.fence_margin_ms)
    }

    /// Check the values (key name, message) for `config::Config::validate`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.endpoints.is_empty() {
            return Err(("coordinator.endpoints", "needs at least one URL".into()));
        }
        if let Some(e) = self
            .endpoints
            .iter()
            .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
        {
            return Err((
                "coordinator.endpoints",
                format!("{e:?}: expected http://host:port or https://host:port"),
            ));
        }
        if self.name.is_empty() || self.name.contains('/') {
            return Err((
                "coordinator.name",
                format!("{:?}: non-empty, without '/'", self.name),
            ));
        }
        // etcd refuses leases shorter than its minimum TTL (1.5 election timeouts).
        if self.ttl_secs < 2 {
            return Err(("coordinator.ttl_secs", "minimum 2".into()));
        }
        if self.loop_wait_secs == 0 {
            return Err(("coordinator.loop_wait_secs", "minimum 1".into()));
        }
        if self.fence_margin_ms == 0 {
            return Err(("coordinator.fence_margin_ms", "must be > 0".into()));
        }
        if 2 * self.loop_wait_secs * 1000 + self.fence_margin_ms >= self.ttl_secs * 1000 {
            return Err((
                "coordinator.ttl_secs",
                format!(
                    "{} s is too short: 2 × loop_wait_secs + fence_margin_ms must stay below it, \
                     so one missed renewal does not fence a healthy primary",
                    self.ttl_secs
                ),
            ));
        }
        if self.password_file.is_some() != self.username.is_some() {
            return Err((
                "coordinator.password_file",
                "username and password_file go together".into(),
            ));
        }
        if let Some(t) = &self.tls {
            if t.cert_file.is_some() != t.key_file.is_some() {
                return Err((
                    "coordinator.tls.cert_file",
                    "cert_file and key_file go together".into(),
                ));
            }
        }
        if self.tls.is_some() && self.endpoints.iter().any(|e| e.starts_with("http://")) {
            return Err((
                "coordinator.endpoints",
                "with [coordinator.tls] every endpoint must be https://".into(),
            ));
        }
        Ok(())
    }
}

/// Why the leader must stop accepting commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceReason {
    /// The renewal deadline passed (etcd unreachable or too slow).
    Deadline,
    /// etcd says the lease or the key is gone, or another node holds it.
    Lost,
}

impl FenceReason {
    pub fn label(self) -> &'static str {
        match self {
            FenceReason::Deadline => "deadline",
            FenceReason::Lost => "lost",
        }
    }
}

/// What the coordinator tells the role machinery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// This replica won the election: promote to primary in `epoch`.
    Elected { epoch: u64 },
    /// This primary holds the leader key for `epoch` (at start-up, or again
    /// after a fence whose cause went away): it may accept commits.
    Holding { epoch: u64 },
    /// Another node holds the leader key: follow it.
    Leader { node: String, epoch: u64 },
    /// No leader key (and this node is not taking it this round).
    NoLeader,
    /// Stop accepting commits now, before the leader lease can expire.
    Fence { reason: FenceReason },
}

/// What the coordinator last saw in etcd (for `zrelay status` and `/status`).
/// `holding` is the level-triggered truth the role machinery may also poll:
/// it turns false the moment the node fences (events are edge notifications,
/// sent without waiting, so a stuck consumer never delays a fence).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    /// Whether the last round reached etcd.
    pub reachable: bool,
    pub leader: Option<LeaderValue>,
    /// Seconds left on the leader's lease in etcd, when known.
    pub leader_ttl_left_secs: Option<i64>,
    pub stored_epoch: u64,
    pub maintenance: bool,
    pub members: Vec<Member>,
    /// Whether this node holds the leader key (its fencing deadline is ahead).
    pub holding: bool,
    pub last_error: Option<String>,
}

/// What the role machinery asks of the coordinator.
#[derive(Debug)]
pub enum Request {
    /// Switchover: give the leader key this node holds to `to` at epoch + 1
    /// (one etcd transaction; see `etcd::Task::hand_over`). Answers the new
    /// epoch, or why not.
    Handover {
        to: String,
        reply: tokio::sync::oneshot::Sender<Result<u64, String>>,
    },
}

/// Handles of a running coordinator.
pub struct Coordinator {
    pub events: mpsc::Receiver<Event>,
    pub snapshot: watch::Receiver<ClusterSnapshot>,
    pub requests: mpsc::Sender<Request>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Start the coordinator task for node `me`. `state` is the node's own
/// record, kept current by its owner (the role machinery); its `name` is
/// replaced by `me`. On `shutdown` the task revokes its leases (its keys
/// vanish at once) and ends; if the task is aborted instead, they vanish
/// when their leases expire.
pub fn spawn(
    cfg: CoordinatorConfig,
    me: String,
    state: watch::Receiver<Member>,
    shutdown: CancellationToken,
) -> Coordinator {
    metrics::describe();
    let (ev_tx, events) = mpsc::channel(64);
    let (snap_tx, snapshot) = watch::channel(ClusterSnapshot::default());
    let (requests, req_rx) = mpsc::channel(4);
    let task = tokio::spawn(etcd::run(cfg, me, state, ev_tx, snap_tx, req_rx, shutdown));
    Coordinator {
        events,
        snapshot,
        requests,
        task,
    }
}

/// Key layout, shared with the admin tooling (`zrelay pause`/`resume`).
pub mod keys {
    pub fn prefix(name: &str) -> String {
        format!("/{name}/")
    }
    pub fn member(name: &str, node: &str) -> String {
        format!("/{name}/members/{node}")
    }
    pub fn members(name: &str) -> String {
        format!("/{name}/members/")
    }
    pub fn leader(name: &str) -> String {
        format!("/{name}/leader")
    }
    pub fn epoch(name: &str) -> String {
        format!("/{name}/epoch")
    }
    pub fn maintenance(name: &str) -> String {
        format!("/{name}/maintenance")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Result<CoordinatorConfig, toml::de::Error> {
        toml::from_str(&format!(
            "kind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n{extra}"
        ))
    }

    #[test]
    fn defaults_and_checks() {
        let c = cfg("").unwrap();
        assert_eq!(
            (c.ttl_secs, c.loop_wait_secs, c.fence_margin_ms),
            (10, 2, 2000)
        );
        assert_eq!(c.name, "zrelay");
        c.check().unwrap();
        assert!(cfg("bogus = 1").is_err());
        assert!(cfg("ttl_secs = 4\nloop_wait_secs = 2")
            .unwrap()
            .check()
            .is_err());
        cfg("ttl_secs = 4\nloop_wait_secs = 1\nfence_margin_ms = 1000")
            .unwrap()
            .check()
            .unwrap();
        assert!(cfg("name = \"a/b\"").unwrap().check().is_err());
        assert!(cfg("username = \"u\"").unwrap().check().is_err());
        assert!(cfg("[tls]\nca_file = \"/x\"").unwrap().check().is_err());
        let e = toml::from_str::<CoordinatorConfig>("kind = \"zk\"\nendpoints = []");
        assert!(e.is_err());
    }

    /// The commented example in config/zrelay.toml parses and passes checks.
    #[test]
    fn documented_example_parses() {
        let text = include_str!("../../config/zrelay.toml");
        let start = text.find("# [coordinator]\n").expect("example present");
        let body: String = text[start..]
            .lines()
            .skip(1)
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .map(|l| l.replace("[coordinator.tls]", "[tls]"))
            .collect::<Vec<_>>()
            .join("\n");
        let c: CoordinatorConfig = toml::from_str(&body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.endpoints.len(), 3);
        assert!(c.tls.as_ref().unwrap().key_file.is_some());
        c.check().unwrap();
    }
}
