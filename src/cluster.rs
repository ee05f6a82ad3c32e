//! The cluster view: which nodes exist, where they listen, their roles and
//! positions. The one place other modules ask "who is the primary now, and
//! how do I reach it?".
//!
//! Two sources, kept apart on purpose:
//! - **addresses** come from the static `[cluster] nodes` list when it names
//!   the node, else from what the node advertised (its own config);
//! - **roles and positions** come only over the mutually authenticated
//!   replication channel: a node's own state, its replicas as its feed sees
//!   them (acks), and the [`RosterEntry`] list its upstream sent last. An
//!   address never implies a role.
//!
//! The view is computed from a [`StatusHub`] snapshot on demand (a door asks
//! once per rerouted session; `/status` once per request), so it has no state
//! of its own to keep in sync.
//!
//! With a coordinator (etcd, [`ClusterView::set_coordinator`]) the primary
//! is the node named by the leader key, once its member record (or the
//! stream's roster) says it serves as primary in that epoch; its address
//! comes from the address book, else from its member record. A node named
//! by the leader key that has not finished its promotion yet is no target:
//! the door then has no primary and clients retry.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::replication::protocol::RosterEntry;
use crate::status::{Role, StatusHub, StreamState};
use crate::wire::tid::tid_to_hex;

/// `[cluster]` in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The nodes of the cluster and their addresses (an address book, not a
    /// role assignment).
    #[serde(default)]
    pub nodes: Vec<StaticNode>,
    /// The client address other nodes are told about (default:
    /// `client.listen`).
    #[serde(default)]
    pub advertise_client: Option<String>,
    /// The replication address other nodes are told about (default:
    /// `replication.listen`).
    #[serde(default)]
    pub advertise_replication: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticNode {
    pub name: String,
    /// host:port of its ZEO client listener.
    #[serde(default)]
    pub client: Option<String>,
    /// host:port of its replication (TLS) listener.
    #[serde(default)]
    pub replication: Option<String>,
}

/// A node a door can send a session to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub node: String,
    /// Replication listener, host:port.
    pub replication_addr: String,
}

/// One row of the cluster view, as `/status` and `zrelay status` show it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub node: String,
    pub role: String,
    pub state: String,
    pub last_tid: Option<String>,
    pub lag_seconds: Option<f64>,
    pub client_addr: Option<String>,
    pub replication_addr: Option<String>,
    pub reported_by: String,
}

pub struct ClusterView {
    cfg: ClusterConfig,
    me: String,
    client_addr: String,
    replication_addr: Option<String>,
    status: Arc<StatusHub>,
    /// What the coordinator last read from etcd (set once at start-up).
    coordinator:
        std::sync::OnceLock<tokio::sync::watch::Receiver<crate::coordinator::ClusterSnapshot>>,
}

fn state_name(s: StreamState) -> &'static str {
    match s {
        StreamState::Disconnected => "disconnected",
        StreamState::CatchingUp => "catching_up",
        StreamState::Live => "live",
        StreamState::Diverged => "diverged",
    }
}

fn parse_hex_tid(h: &str) -> Option<[u8; 8]> {
    let n = u64::from_str_radix(h, 16).ok()?;
    Some(n.to_be_bytes())
}

impl ClusterView {
    pub fn new(
        cfg: ClusterConfig,
        me: String,
        client_listen: String,
        replication_listen: Option<String>,
        status: Arc<StatusHub>,
    ) -> Self {
        let client_addr = cfg.advertise_client.clone().unwrap_or(client_listen);
        let replication_addr = cfg.advertise_replication.clone().or(replication_listen);
        ClusterView {
            cfg,
            me,
            client_addr,
            replication_addr,
            status,
            coordinator: std::sync::OnceLock::new(),
        }
    }

    /// Makes the coordinator's view of etcd the source of "who is primary".
    pub fn set_coordinator(
        &self,
        snapshot: tokio::sync::watch::Receiver<crate::coordinator::ClusterSnapshot>,
    ) {
        let _ = self.coordinator.set(snapshot);
    }

    /// The coordinator's last view of etcd, when one is configured.
    pub fn coordinator(&self) -> Option<crate::coordinator::ClusterSnapshot> {
        self.coordinator.get().map(|s| s.borrow().clone())
    }

    /// The leader per etcd, once it serves as primary in its epoch.
    fn coordinated_primary(&self, snap: &crate::coordinator::ClusterSnapshot) -> Option<Target> {
        let leader = snap.leader.as_ref().filter(|l| l.node != self.me)?;
        let member = snap.members.iter().find(|m| m.name == leader.node);
        let serving = member.is_some_and(|m| {
            m.role == crate::coordinator::MemberRole::Primary && m.epoch >= leader.epoch
        }) || self
            .status
            .snapshot()
            .upstream_roster
            .iter()
            .any(|e| e.node == leader.node && e.role == "primary");
        if !serving {
            return None;
        }
        let addr = self
            .cfg
            .nodes
            .iter()
            .find(|n| n.name == leader.node)
            .and_then(|n| n.replication.clone())
            .or_else(|| member.and_then(|m| m.replication.clone()))?;
        // Our own stream from that very node is down: it is most likely dead
        // and its key not expired yet. No target (the door holds the
        // register) rather than a connection that fails.
        let st = self.status.snapshot();
        if st
            .upstream
            .as_ref()
            .is_some_and(|u| u.address == addr && u.state != StreamState::Live)
        {
            return None;
        }
        // Not yet at the leader's epoch (this node has not followed it yet):
        // the leader would refuse our door as stale; wait for the follow.
        if st
            .role_state
            .as_ref()
            .is_some_and(|r| r.epoch < leader.epoch)
        {
            return None;
        }
        Some(Target {
            node: leader.node.clone(),
            replication_addr: addr,
        })
    }

    /// The client address this node advertises.
    pub fn my_client_addr(&self) -> &str {
        &self.client_addr
    }

    /// What this node tells its downstream replicas: itself, its replicas
    /// (as its feed sees them), then what its own upstream reported about
    /// anyone else.
    pub fn roster(&self) -> Vec<RosterEntry> {
        let st = self.status.snapshot();
        let (state, lag_ms) = match (&st.role, &st.upstream) {
            (Role::Primary, _) => ("live".to_string(), Some(0)),
            (Role::Replica, Some(u)) => (
                state_name(u.state).to_string(),
                Some((u.lag_seconds.max(0.0) * 1000.0) as u64),
            ),
            (Role::Replica, None) => ("disconnected".to_string(), None),
        };
        let mut out = vec![RosterEntry {
            node: self.me.clone(),
            role: role_name(st.role).to_string(),
            state,
            last_tid: st.storage_last_tid.as_deref().and_then(parse_hex_tid),
            lag_ms,
            client_addr: Some(self.client_addr.clone()),
            replication_addr: self.replication_addr.clone(),
            reported_by: self.me.clone(),
        }];
        for (name, r) in &st.replicas {
            out.push(RosterEntry {
                node: name.clone(),
                role: "replica".into(),
                state: state_name(r.state).to_string(),
                last_tid: r.acked_tid.as_deref().and_then(parse_hex_tid),
                lag_ms: Some((r.lag_seconds.max(0.0) * 1000.0) as u64),
                client_addr: st.replica_adverts.get(name).and_then(|a| a.0.clone()),
                replication_addr: st.replica_adverts.get(name).and_then(|a| a.1.clone()),
                reported_by: self.me.clone(),
            });
        }
        for e in &st.upstream_roster {
            if !out.iter().any(|o| o.node == e.node) {
                out.push(e.clone());
            }
        }
        out
    }

    /// The primary to forward writes to, if it is another node and known.
    pub fn primary(&self) -> Option<Target> {
        if self.status.snapshot().role == Role::Primary {
            return None;
        }
        if let Some(snap) = self.coordinator.get() {
            let snap = snap.borrow().clone();
            return self.coordinated_primary(&snap);
        }
        let entry = self
            .roster()
            .into_iter()
            .find(|e| e.role == "primary" && e.node != self.me)?;
        let addr = self
            .cfg
            .nodes
            .iter()
            .find(|n| n.name == entry.node)
            .and_then(|n| n.replication.clone())
            .or(entry.replication_addr)?;
        Some(Target {
            node: entry.node,
            replication_addr: addr,
        })
    }

    /// The least-lagged live replica within `max_lag_ms` that other doors
    /// can reach (it has a replication address).
    pub fn replica_for_reads(&self, max_lag_ms: u64) -> Option<Target> {
        self.roster()
            .into_iter()
            .filter(|e| e.role == "replica" && e.state == "live")
            .filter(|e| e.lag_ms.is_some_and(|l| l <= max_lag_ms))
            .filter_map(|e| {
                let addr = self
                    .cfg
                    .nodes
                    .iter()
                    .find(|n| n.name == e.node)
                    .and_then(|n| n.replication.clone())
                    .or(e.replication_addr)?;
                Some((e.lag_ms.unwrap_or(0), e.node, addr))
            })
            .min()
            .map(|(_, node, replication_addr)| Target {
                node,
                replication_addr,
            })
    }

    /// The view for `/status`: every node known, with the configured
    /// address book filling in addresses, and configured nodes nobody has
    /// reported on shown as "unknown".
    pub fn nodes(&self) -> Vec<NodeView> {
        let mut out: Vec<NodeView> = self
            .roster()
            .into_iter()
            .map(|e| {
                let stat = self.cfg.nodes.iter().find(|n| n.name == e.node);
                NodeView {
                    client_addr: stat.and_then(|n| n.client.clone()).or(e.client_addr),
                    replication_addr: stat
                        .and_then(|n| n.replication.clone())
                        .or(e.replication_addr),
                    last_tid: e.last_tid.map(|t| tid_to_hex(&t)),
                    lag_seconds: e.lag_ms.map(|ms| ms as f64 / 1000.0),
                    node: e.node,
                    role: e.role,
                    state: e.state,
                    reported_by: e.reported_by,
                }
            })
            .collect();
        for n in &self.cfg.nodes {
            if !out.iter().any(|o| o.node == n.name) {
                out.push(NodeView {
                    node: n.name.clone(),
                    role: "unknown".into(),
                    state: "unknown".into(),
                    last_tid: None,
                    lag_seconds: None,
                    client_addr: n.client.clone(),
                    replication_addr: n.replication.clone(),
                    reported_by: String::new(),
                });
            }
        }
        out
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Primary => "primary",
        Role::Replica => "replica",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(role: Role) -> Arc<StatusHub> {
        Arc::new(StatusHub::new("me".into(), role, "127.0.0.1:1".into()))
    }

    fn entry(node: &str, role: &str, repl: Option<&str>) -> RosterEntry {
        RosterEntry {
            node: node.into(),
            role: role.into(),
            state: "live".into(),
            last_tid: Some([0, 0, 0, 0, 0, 0, 0, 5]),
            lag_ms: Some(0),
            client_addr: None,
            replication_addr: repl.map(str::to_string),
            reported_by: "p".into(),
        }
    }

    #[test]
    fn a_primary_forwards_nowhere() {
        let v = ClusterView::new(
            ClusterConfig::default(),
            "me".into(),
            "127.0.0.1:1".into(),
            None,
            hub(Role::Primary),
        );
        assert_eq!(v.primary(), None);
        assert_eq!(v.roster()[0].role, "primary");
    }

    #[test]
    fn the_primary_is_whoever_the_stream_says() {
        let st = hub(Role::Replica);
        let v = ClusterView::new(
            ClusterConfig::default(),
            "me".into(),
            "127.0.0.1:1".into(),
            None,
            st.clone(),
        );
        assert_eq!(v.primary(), None, "nothing reported yet");
        st.update(|s| s.upstream_roster = vec![entry("p", "primary", Some("10.0.0.1:9"))]);
        assert_eq!(
            v.primary(),
            Some(Target {
                node: "p".into(),
                replication_addr: "10.0.0.1:9".into()
            })
        );
    }

    #[test]
    fn the_address_book_wins_over_advertised_addresses() {
        let st = hub(Role::Replica);
        let cfg = ClusterConfig {
            nodes: vec![
                StaticNode {
                    name: "p".into(),
                    client: None,
                    replication: Some("127.0.0.9:7".into()),
                },
                StaticNode {
                    name: "silent".into(),
                    client: Some("127.0.0.8:1".into()),
                    replication: None,
                },
            ],
            ..Default::default()
        };
        let v = ClusterView::new(cfg, "me".into(), "127.0.0.1:1".into(), None, st.clone());
        st.update(|s| s.upstream_roster = vec![entry("p", "primary", Some("0.0.0.0:9"))]);
        assert_eq!(v.primary().unwrap().replication_addr, "127.0.0.9:7");
        let nodes = v.nodes();
        assert_eq!(nodes.len(), 3, "{nodes:?}");
        assert!(nodes
            .iter()
            .any(|n| n.node == "silent" && n.role == "unknown"));
    }

    #[test]
    fn an_address_never_makes_a_primary() {
        let st = hub(Role::Replica);
        let cfg = ClusterConfig {
            nodes: vec![StaticNode {
                name: "p".into(),
                client: None,
                replication: Some("127.0.0.9:7".into()),
            }],
            ..Default::default()
        };
        let v = ClusterView::new(cfg, "me".into(), "127.0.0.1:1".into(), None, st.clone());
        assert_eq!(v.primary(), None);
        st.update(|s| s.upstream_roster = vec![entry("p", "replica", None)]);
        assert_eq!(v.primary(), None);
    }
}
