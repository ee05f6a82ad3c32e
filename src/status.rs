//! The node's observable state, for the admin surface.
//!
//! Each field group has exactly one writer (named on the field); the admin
//! HTTP layer and the metrics exporter only read snapshots. A plain RwLock is
//! enough: writes are a few per transaction, reads a few per scrape.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::{Instant, SystemTime};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
}

/// State of the replication stream as seen from a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamState {
    /// Not connected to the upstream (connecting, refused, cut).
    Disconnected,
    /// Connected and applying history older than the live stream.
    CatchingUp,
    /// Connected and applying transactions as they commit.
    Live,
    /// Found a tid or content the primary does not have; applying stopped.
    Diverged,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamStatus {
    pub address: String,
    pub state: StreamState,
    /// Newest tid the primary reported (transactions or heartbeats), hex.
    pub primary_last_tid: Option<String>,
    /// Newest tid applied to this node's backend, hex.
    pub applied_tid: Option<String>,
    pub lag_seconds: f64,
    pub lag_transactions: u64,
    pub lag_bytes: u64,
    pub last_error: Option<String>,
    #[serde(skip)]
    pub last_contact: Option<Instant>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaPeerStatus {
    pub node: String,
    pub peer_addr: String,
    pub state: StreamState,
    pub sent_tid: Option<String>,
    pub acked_tid: Option<String>,
    pub lag_seconds: f64,
    pub lag_transactions: u64,
    pub lag_bytes: u64,
    pub diverged: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub role: Role,
    pub version: &'static str,
    pub backend_address: String,
    /// Writer: the backend monitor.
    pub backend_up: bool,
    /// Writer: the backend monitor (primary) or the applier (replica).
    pub storage_last_tid: Option<String>,
    pub storage_last_commit_unix: Option<f64>,
    /// Writer: the replica applier. None on a primary.
    pub upstream: Option<UpstreamStatus>,
    /// Writer: the primary feed, one entry per connected or known replica.
    pub replicas: BTreeMap<String, ReplicaPeerStatus>,
    /// Writer: the primary feed: the addresses each replica advertised in
    /// its Hello (client, replication).
    #[serde(skip)]
    pub replica_adverts: BTreeMap<String, (Option<String>, Option<String>)>,
    /// Writer: the door monitor (replicas): how this node routes sessions.
    pub door: Option<DoorStatus>,
    /// Writer: the replica task: the roster its upstream sent last (see
    /// `crate::cluster`).
    #[serde(skip)]
    pub upstream_roster: Vec<crate::replication::protocol::RosterEntry>,
    /// Writer: `control::Control::drain`. No new client sessions accepted.
    pub draining: bool,
    /// Writer: `tls::expiry::track`, when a TLS door loads its files.
    /// Earliest expiry first.
    pub certificates: Vec<crate::tls::expiry::CertExpiry>,
    /// Writer: the semi-sync coordinator (primary with `ack_mode =
    /// "semi-sync"`; see `crate::replication::semisync`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semisync: Option<SemiSyncStatus>,
    /// Writer: the primary feed: each replica's promotion eligibility, as
    /// its Hello announced it (absent: an older build, never a target).
    #[serde(skip)]
    pub replica_promotion: BTreeMap<String, crate::role::Promotion>,
    /// Writer: the role controller (`crate::rolectl`): the detailed role,
    /// the cluster epoch and the role-change history.
    pub role_state: Option<crate::role::RoleState>,
    /// Writer: the primary feed: replicas sent the switchover `Handover`
    /// (cleared by the role controller when a switchover starts).
    #[serde(skip)]
    pub handed_over: std::collections::BTreeSet<String>,
    /// Writer: the role controller, from the coordinator's view: the newest
    /// tid the serving leader published in etcd (hex). A replica's lag is
    /// at least the time between it and the applied tid, also when the
    /// replication stream is slower than etcd (a saturated link: the
    /// stream's own news of the primary's position queue behind its data).
    pub leader_last_tid: Option<String>,
    #[serde(skip)]
    pub started: Option<SystemTime>,
}

/// A semi-synchronous primary's acknowledgement state.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SemiSyncStatus {
    pub ack_level: &'static str,
    pub min_acks: usize,
    pub strict: bool,
    /// Timed out waiting for acknowledgements: commits are released as in
    /// async mode until enough replicas are back in sync.
    pub degraded: bool,
    /// The newest tid acknowledged by `min_acks` replicas.
    pub watermark_tid: Option<String>,
    /// Commits the backend has that are not acknowledged yet.
    pub waiting_commits: usize,
    pub degrades_total: u64,
    pub last_degraded_unix: Option<f64>,
}

/// A replica door's routing state (see `crate::door`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DoorStatus {
    /// This replica serves read-only sessions and offloaded loads now.
    pub local_usable: bool,
    /// Where read-write sessions are forwarded.
    pub primary: Option<String>,
    pub write_policy: &'static str,
    pub offload_loads: bool,
}

pub struct StatusHub {
    inner: RwLock<NodeStatus>,
    started: Instant,
}

impl NodeStatus {
    /// A node that knows nothing yet beyond its name, role and backend.
    pub fn new(node: String, role: Role, backend_address: String) -> Self {
        NodeStatus {
            node,
            role,
            version: env!("CARGO_PKG_VERSION"),
            backend_address,
            backend_up: false,
            storage_last_tid: None,
            storage_last_commit_unix: None,
            upstream: None,
            replicas: BTreeMap::new(),
            replica_adverts: BTreeMap::new(),
            door: None,
            upstream_roster: Vec::new(),
            draining: false,
            certificates: Vec::new(),
            semisync: None,
            replica_promotion: BTreeMap::new(),
            role_state: None,
            handed_over: Default::default(),
            leader_last_tid: None,
            started: None,
        }
    }
}

impl StatusHub {
    pub fn new(node: String, role: Role, backend_address: String) -> Self {
        StatusHub {
            inner: RwLock::new(NodeStatus {
                started: Some(SystemTime::now()),
                ..NodeStatus::new(node, role, backend_address)
            }),
            started: Instant::now(),
        }
    }

    pub fn snapshot(&self) -> NodeStatus {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut NodeStatus)) {
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    /// The node's role now (cheaper than a snapshot).
    pub fn role(&self) -> Role {
        match self.inner.read() {
            Ok(g) => g.role,
            Err(p) => p.into_inner().role,
        }
    }

    pub fn uptime_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}
