//! The role controller: runs the role-dependent pieces of a replicated node
//! and swaps them at run time (promote, demote, switchover, detach).
//!
//! Structure: the pieces of one role run as a [`Running`] set of tasks under
//! their own cancellation token:
//! - primary: the commit feed + replication listener (and the pack relay);
//!   client sessions get the primary's hooks behind a [`FenceHooks`];
//! - replica: the replica task following an upstream, its applied log, the
//!   pack runner and, with `replication.listen`, a cascading feed; client
//!   sessions get [`ReplicaHooks`].
//!
//! A role change stops the running set (awaiting its tasks, so the listener
//! port is free again), flips the role in the [`StatusHub`] and the session
//! hooks factory the door uses, and starts the other set. The door closes
//! sessions opened under the old role at a safe point
//! (`door::DoorHooks::on_wake`); clients reconnect through a door and reach
//! the new primary.
//!
//! The controller task is the one owner of [`RoleState`] (persisted in
//! `data_dir/role.json`) and the one writer of [`RoleCell`]. Decisions are
//! the I/O-free [`crate::role`]'s; this module does the waiting and wiring.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cluster::ClusterView;
use crate::config::AckMode;
use crate::config::{Config, ReplicationConfig};
use crate::coordinator::{
    ClusterSnapshot, Event as CoordEvent, Member, MemberRole, Request as CoordRequest,
};
use crate::live::Live;
use crate::relay::hooks::Chain;
use crate::relay::listener::HooksFactory;
use crate::relay::{PassThrough, SessionHooks};
use crate::replication::applied::AppliedLog;
use crate::replication::applier::Applier;
use crate::replication::capture::{self, CaptureHooks, CaptureHub};
use crate::replication::feed::CaptureLink;
use crate::replication::feed::{self, BackendLink, DoorSink, FeedHandle, ListenerConfig};
use crate::replication::pack::{self, PackCapture, PackRunner};
use crate::replication::protocol::StreamMsg;
use crate::replication::replica::{self, ReplicaConfig};
use crate::replication::replica_session::ReplicaHooks;
use crate::replication::semisync::{self, SemiSync, SemiSyncConfig, SemiSyncHooks};
use crate::replication::sender::SenderConfig;
use crate::replication::txn::{tid_hex, Tid, Z64};
use crate::role::fence::{FenceHooks, RoleCell, RoleEvent};
use crate::role::{persist, Promotion, RoleKind, RoleState};
use crate::status::{Role, StatusHub};

/// An operator's request (admin HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Promote,
    Demote { follow: String },
    Switchover { to: String },
    Detach,
}

pub type Reply = oneshot::Sender<Result<serde_json::Value, String>>;
pub type Requests = mpsc::Sender<(Command, Reply)>;

pub const ROLE_EPOCH: &str = "zrelay_role_epoch";
pub const ROLE_FENCED: &str = "zrelay_role_fenced";
pub const ROLE_CHANGES: &str = "zrelay_role_changes_total";
pub const SWITCHOVER_FENCED: &str = "zrelay_switchover_fenced_seconds";
const CHANGES: &[&str] = &["promote", "demote", "fence", "unfence", "follow", "detach"];

/// Describes the role metrics and creates their series.
pub fn describe() {
    metrics::describe_gauge!(
        ROLE_EPOCH,
        "This node's cluster epoch (bumped by every change of primary)."
    );
    metrics::describe_gauge!(
        ROLE_FENCED,
        "1 while this primary takes no new commits (a switchover or demotion under way)."
    );
    metrics::describe_counter!(
        ROLE_CHANGES,
        "Role changes of this node, by change (promote, demote, fence, unfence, follow, detach)."
    );
    metrics::describe_histogram!(
        SWITCHOVER_FENCED,
        metrics::Unit::Seconds,
        "How long a switchover kept commits fenced (fence to handover), on the old primary."
    );
    for c in CHANGES {
        metrics::counter!(ROLE_CHANGES, "change" => *c).increment(0);
    }
}

fn changed(change: &'static str) {
    metrics::counter!(ROLE_CHANGES, "change" => change).increment(1);
}

/// How long a switchover waits for commits in flight to finish.
const INFLIGHT_WAIT: Duration = Duration::from_secs(15);
/// How long a switchover waits for the target to apply everything.
const CATCHUP_WAIT: Duration = Duration::from_secs(30);
/// How long the old primary waits for its replicas to get the handover.
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// What every role's wiring shares.
pub struct Env {
    pub cluster: Arc<ClusterView>,
    pub doors: DoorSink,
}

/// The session hooks the door gives local sessions; swapped at a role change.
pub type LocalHooks = Arc<RwLock<HooksFactory>>;

/// The pieces of the running role.
struct Running {
    token: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Primary only: the handover announcement of a switchover.
    handover: Option<HandoverTx>,
}

/// The handover announcement of a switchover: the message and the tid
/// after which each replica gets it.
type HandoverTx = Arc<watch::Sender<Option<(StreamMsg, Tid)>>>;

pub struct RoleCtl {
    cfg: Config,
    r: ReplicationConfig,
    path: Option<PathBuf>,
    state: RoleState,
    cell: Arc<RoleCell>,
    status: Arc<StatusHub>,
    env: Env,
    link: BackendLink,
    applied_tx: Arc<watch::Sender<Tid>>,
    connector: Arc<Live<TlsConnector>>,
    acceptor: Option<Arc<Live<TlsAcceptor>>>,
    allowed: Arc<Live<Vec<String>>>,
    local: LocalHooks,
    running: Option<Running>,
    shutdown: CancellationToken,
    /// With `[coordinator]`: the link to etcd (see [`CoordLink`]).
    coord: Option<Coord>,
}

/// The role controller's link to a running coordinator
/// (`crate::coordinator::spawn`): the node's member record it publishes, the
/// coordinator's events and view, and the switchover request channel.
pub struct CoordLink {
    pub member: watch::Sender<Member>,
    pub events: mpsc::Receiver<CoordEvent>,
    pub snapshot: watch::Receiver<ClusterSnapshot>,
    pub requests: mpsc::Sender<CoordRequest>,
}

struct Coord {
    member: watch::Sender<Member>,
    events: Option<mpsc::Receiver<CoordEvent>>,
    snapshot: watch::Receiver<ClusterSnapshot>,
    requests: mpsc::Sender<CoordRequest>,
    /// The coordinator said this node holds the leader key (Elected or
    /// Holding) and has not fenced since: a primary may take commits.
    holding: bool,
    /// A promotion after an election failed: withdraw eligibility so the
    /// coordinator gives the key back and someone else is elected.
    promote_failed: bool,
}

pub struct Parts {
    pub cfg: Config,
    pub env: Env,
    pub link: BackendLink,
    pub applied_tx: Arc<watch::Sender<Tid>>,
    pub status: Arc<StatusHub>,
    pub shutdown: CancellationToken,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn parse_hex(h: &str) -> Option<Tid> {
    u64::from_str_radix(h, 16).ok().map(|n| n.to_be_bytes())
}

/// The TLS server name of a `host:port` address.
fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

impl RoleCtl {
    /// Loads (or creates) the role state and the TLS pieces; starts nothing.
    pub fn new(p: Parts, events: mpsc::UnboundedSender<RoleEvent>) -> anyhow::Result<RoleCtl> {
        let r = p.cfg.replication.clone().context("replication")?;
        let path = p.cfg.data_dir.as_deref().map(crate::role::state_path);
        let loaded = match &path {
            Some(path) => persist::load(path).map_err(anyhow::Error::msg)?,
            None => None,
        };
        let state = loaded.unwrap_or_else(|| {
            RoleState::initial(&r.cluster, r.role == crate::config::RoleConfig::Primary)
        });
        let cell = RoleCell::new(state.epoch, r.promotion, Some(events));
        cell.set_fenced(state.role == RoleKind::Fenced);
        let tls_client =
            crate::replication::tls::client_config(&r.tls).context("load replication TLS files")?;
        crate::tls::expiry::track(
            &p.status,
            "replication",
            &r.tls.cert_file,
            Some(&r.tls.ca_file),
        )
        .context("read replication certificate expiry")?;
        let acceptor = match r.listen {
            Some(_) => Some(Live::new(TlsAcceptor::from(
                crate::replication::tls::server_config(&r.tls)
                    .context("load replication TLS files")?,
            ))),
            None => None,
        };
        if path.is_none() {
            warn!("no data_dir: role changes (switchover, promote, ...) are forgotten at restart");
        }
        let allowed = Live::new(r.allowed_peers.clone());
        let passthrough: HooksFactory = Arc::new(|| Box::new(PassThrough) as Box<dyn SessionHooks>);
        Ok(RoleCtl {
            cfg: p.cfg,
            r,
            path,
            state,
            cell,
            status: p.status,
            env: p.env,
            link: p.link,
            applied_tx: p.applied_tx,
            connector: Live::new(TlsConnector::from(tls_client)),
            acceptor,
            allowed,
            local: Arc::new(RwLock::new(passthrough)),
            running: None,
            shutdown: p.shutdown,
            coord: None,
        })
    }

    /// Puts the node's role under the coordinator (`[coordinator]`): call
    /// before [`RoleCtl::start`]. From then on a primary takes commits only
    /// while the coordinator holds the leader key for it, elections promote,
    /// a new leader is followed, and operator role changes other than
    /// switchover are refused (they would race the automatic path).
    pub fn attach_coordinator(&mut self, link: CoordLink) {
        self.coord = Some(Coord {
            member: link.member,
            events: Some(link.events),
            snapshot: link.snapshot,
            requests: link.requests,
            holding: false,
            promote_failed: false,
        });
        self.publish_member();
    }

    /// This node's record for etcd, from its role state and positions.
    pub fn member_record(&self) -> Member {
        let st = self.status.snapshot();
        let hex = |h: &Option<String>| {
            h.as_deref()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .unwrap_or(0)
        };
        let applied = u64::from_be_bytes(*self.applied_tx.borrow())
            .max(hex(&st.storage_last_tid))
            .max(st.upstream.as_ref().map_or(0, |u| hex(&u.applied_tid)));
        let primary = matches!(
            self.state.role,
            RoleKind::Primary | RoleKind::Fenced | RoleKind::Detached
        );
        let failed = self.coord.as_ref().is_some_and(|c| c.promote_failed);
        Member {
            name: self.cfg.node_name.clone(),
            role: if primary {
                MemberRole::Primary
            } else {
                MemberRole::Replica
            },
            client: Some(self.env.cluster.my_client_addr().to_string()),
            replication: self
                .cfg
                .cluster
                .advertise_replication
                .clone()
                .or_else(|| self.r.listen.map(|a| a.to_string())),
            eligible: self.r.promotion.eligible() && !failed,
            priority: self.r.promotion.priority().unwrap_or(0),
            applied_tid: applied,
            acknowledged_tid: if primary {
                applied
            } else {
                self.cell.durable().max(applied)
            },
            epoch: self.state.epoch,
        }
    }

    /// The serving leader's newest tid per etcd, into `status` (see
    /// `NodeStatus::leader_last_tid`); None on the leader itself or while no
    /// serving leader is known.
    fn publish_leader_tid(&self) {
        let Some(c) = &self.coord else { return };
        let tid = {
            let snap = c.snapshot.borrow();
            snap.leader
                .as_ref()
                .filter(|l| l.node != self.cfg.node_name)
                .and_then(|l| {
                    snap.members.iter().find(|m| {
                        m.name == l.node && m.role == MemberRole::Primary && m.applied_tid != 0
                    })
                })
                .map(|m| format!("{:016x}", m.applied_tid))
        };
        if self.status.snapshot().leader_last_tid != tid {
            self.status.update(|s| s.leader_last_tid = tid);
        }
    }

    fn publish_member(&self) {
        if let Some(c) = &self.coord {
            let m = self.member_record();
            c.member.send_if_modified(|old| {
                if *old != m {
                    *old = m;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// With a coordinator, commits need both the primary role and the
    /// leader key: the fence is up whenever one of them is missing.
    fn gate(&self) {
        if let Some(c) = &self.coord {
            let writable = self.state.role == RoleKind::Primary && c.holding;
            self.cell.set_fenced(!writable);
            // A primary without the key sends its sessions through their
            // doors (closed at a safe point; see door::DoorHooks::on_wake).
            self.cell
                .set_stepped_down(!c.holding && self.state.role != RoleKind::Replica);
        }
    }

    fn set_holding(&mut self, h: bool) {
        if let Some(c) = self.coord.as_mut() {
            c.holding = h;
        }
    }

    /// What the coordinator said (see `crate::coordinator::Event`).
    async fn coord_event(&mut self, ev: CoordEvent) {
        info!(event = ?ev, role = ?self.state.role, epoch = self.state.epoch, "coordinator event");
        match ev {
            CoordEvent::Fence { reason } => {
                // Prompt and local: the fence flag is all a vote checks.
                self.set_holding(false);
                self.gate();
                if self.state.role == RoleKind::Primary {
                    let why = format!("coordinator: leader key {}", reason.label());
                    if self.state.fence(unix_now(), &why).is_ok() {
                        changed("fence");
                        if let Err(e) = self.save() {
                            error!(error = %e, "could not persist the role state");
                        }
                    }
                }
                warn!(reason = reason.label(), "fenced: this node no longer holds the leader key; no commits until it does, or follows the new leader");
            }
            CoordEvent::Holding { epoch } | CoordEvent::Elected { epoch }
                if self.state.role != RoleKind::Replica =>
            {
                self.set_holding(true);
                if self.state.role == RoleKind::Fenced && epoch == self.state.epoch {
                    self.unfence("coordinator: holds the leader key again");
                }
                self.gate();
                info!(epoch, "holding the leader key: commits accepted");
            }
            CoordEvent::Holding { .. } => {}
            CoordEvent::Elected { epoch } => {
                self.set_holding(true);
                match self.promote(epoch, "elected by the coordinator").await {
                    Ok(()) => {}
                    Err(e) => {
                        error!(error = %e, "elected but the promotion failed; withdrawing from elections");
                        if let Some(c) = self.coord.as_mut() {
                            c.promote_failed = true;
                            c.holding = false;
                        }
                    }
                }
                self.gate();
            }
            CoordEvent::Leader { .. } => self.follow_leader().await,
            CoordEvent::NoLeader => {}
        }
        self.publish_member();
    }

    /// Level-triggered: when etcd names another leader, a primary that does
    /// not hold the key steps down and follows it, and a replica following
    /// someone else retargets its upstream to it.
    async fn follow_leader(&mut self) {
        let Some(c) = &self.coord else { return };
        if c.holding {
            return;
        }
        let snap = c.snapshot.borrow().clone();
        let Some(l) = snap.leader else { return };
        if l.node == self.cfg.node_name || l.epoch < self.state.epoch {
            return;
        }
        let addr = snap
            .members
            .iter()
            .find(|m| m.name == l.node)
            .and_then(|m| m.replication.clone())
            .or_else(|| self.address_of(&l.node).ok());
        let Some(addr) = addr else { return };
        match self.state.role {
            RoleKind::Primary | RoleKind::Fenced => {
                if l.epoch <= self.state.epoch {
                    // Not newer than ours: a stale key; the coordinator
                    // sorts it out (this node fenced meanwhile).
                    return;
                }
                if self.state.role == RoleKind::Primary {
                    let _ = self
                        .state
                        .fence(unix_now(), "coordinator: another node leads");
                }
                self.cell.set_fenced(true);
                let why = format!(
                    "coordinator: {} leads epoch {}; follows it",
                    l.node, l.epoch
                );
                if self.state.demote(&addr, unix_now(), &why).is_err() {
                    return;
                }
                self.state.adopt(l.epoch);
                self.cell.set_epoch(self.state.epoch);
                if let Err(e) = self.save() {
                    error!(error = %e, "could not persist the role state");
                }
                changed("demote");
                info!(leader = %l.node, epoch = l.epoch, "stepped down: following the new leader");
                if let Err(e) = self.become_replica(Some(addr)).await {
                    error!(error = %e, "could not follow the new leader");
                }
                self.gate();
            }
            RoleKind::Replica => {
                let current = self
                    .state
                    .following
                    .clone()
                    .or_else(|| self.r.upstream.clone());
                if current.as_deref() == Some(addr.as_str()) {
                    return;
                }
                let why = format!("coordinator: follows {} (epoch {})", l.node, l.epoch);
                if let Err(e) = self.state.follow(&addr, l.epoch, unix_now(), &why) {
                    warn!(error = %e, "cannot follow the leader etcd names");
                    return;
                }
                self.cell.set_epoch(self.state.epoch);
                if let Err(e) = self.save() {
                    error!(error = %e, "could not persist the role state");
                }
                changed("follow");
                info!(leader = %l.node, upstream = %addr, epoch = l.epoch, "following the leader");
                self.stop().await;
                if let Err(e) = self.start_replica(Some(addr)).await {
                    error!(error = %format!("{e:#}"), "could not follow the leader");
                }
            }
            RoleKind::Detached => {}
        }
    }

    pub fn cell(&self) -> Arc<RoleCell> {
        self.cell.clone()
    }
    pub fn connector(&self) -> Arc<Live<TlsConnector>> {
        self.connector.clone()
    }
    pub fn acceptor(&self) -> Option<Arc<Live<TlsAcceptor>>> {
        self.acceptor.clone()
    }
    pub fn allowed(&self) -> Arc<Live<Vec<String>>> {
        self.allowed.clone()
    }
    /// The cluster identity this node belongs to now.
    pub fn cluster_name(&self) -> String {
        self.state.cluster.clone()
    }
    /// The role the node starts in.
    pub fn initial_role(&self) -> Role {
        if self.state.role.is_primary() || self.state.role == RoleKind::Fenced {
            Role::Primary
        } else {
            Role::Replica
        }
    }

    /// The door's local-hooks factory: whatever the current role's is.
    pub fn local_hooks(&self) -> HooksFactory {
        let local = self.local.clone();
        Arc::new(move || {
            let f = match local.read() {
                Ok(g) => g.clone(),
                Err(p) => p.into_inner().clone(),
            };
            f()
        })
    }

    fn publish_state(&self) {
        metrics::gauge!(ROLE_EPOCH).set(self.state.epoch as f64);
        metrics::gauge!(ROLE_FENCED).set(if self.state.role == RoleKind::Fenced {
            1.0
        } else {
            0.0
        });
        let st = self.state.clone();
        self.status.update(|s| s.role_state = Some(st));
    }

    fn save(&self) -> Result<(), String> {
        self.publish_state();
        match &self.path {
            Some(p) => persist::save(p, &self.state),
            None => Ok(()),
        }
    }

    /// Starts the role the state says.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.publish_state();
        // With a coordinator a primary starts fenced: it takes commits once
        // it holds the leader key (never two writers).
        self.gate();
        match self.initial_role() {
            Role::Primary => self.start_primary().await,
            Role::Replica => {
                let up = self.state.following.clone();
                self.start_replica(up).await
            }
        }
    }

    async fn stop(&mut self) {
        if let Some(run) = self.running.take() {
            run.token.cancel();
            for t in run.tasks {
                if tokio::time::timeout(Duration::from_secs(10), t)
                    .await
                    .is_err()
                {
                    warn!("a task of the old role did not stop in 10 s");
                }
            }
        }
    }

    fn set_local(&self, f: HooksFactory) {
        match self.local.write() {
            Ok(mut g) => *g = f,
            Err(p) => *p.into_inner() = f,
        }
    }

    async fn start_primary(&mut self) -> anyhow::Result<()> {
        let token = self.shutdown.child_token();
        let mut tasks = Vec::new();
        // The role is published only once the primary's hooks are the door's
        // local hooks (below): a door that sees `Primary` serves read-write
        // sessions with whatever `local_hooks` returns, and the replica's
        // hooks answer a read-write `register` with ReadOnlyError (a ZEO
        // client then waits ~9 s: its register_failed poll). The other way
        // round (still `Replica`, primary hooks already) is harmless: a
        // read-only session served here is closed at its next safe point
        // once the role changes (`DoorHooks::on_wake`).
        self.status.update(|s| {
            s.upstream = None;
            s.upstream_roster.clear();
        });
        let (handover_tx, handover_rx) = watch::channel(None);
        let capture = (self.r.capture_max_bytes > 0).then(|| CaptureLink {
            hub: CaptureHub::new(),
            verify: self.r.capture_verify,
            wait: CAPTURE_WAIT,
        });
        let feed = self
            .start_feed(true, Some(handover_rx), capture.clone(), &token, &mut tasks)
            .await?;
        // The primary's own sessions: commits captured for the feed
        // (replication::capture), client packs replayed on the replicas
        // (replication::pack), replies held for semi-sync acknowledgements
        // (replication::semisync), all behind the fence of role changes.
        let mut parts: Vec<HooksFactory> = Vec::new();
        // Transactions restored while this node was a replica have no oids
        // in runzeo's invalidation queue: older caches are told "too old".
        if let Some(upto) =
            crate::replication::primary::restored::restored_upto(&self.state.history)
        {
            parts.push(Arc::new(move || {
                Box::new(crate::replication::primary::restored::RestoredTailHooks::new(upto))
                    as Box<dyn SessionHooks>
            }));
        }
        if let Some(c) = capture {
            capture::init_series();
            let max = self.r.capture_max_bytes;
            let storage = self.link.storage.clone();
            parts.push(Arc::new(move || {
                Box::new(CaptureHooks::new(c.hub.clone(), max, storage.clone()))
                    as Box<dyn SessionHooks>
            }));
        }
        let mut semisync = None;
        if let Some(feed) = feed {
            semisync = feed.semisync.clone();
            if self.r.replicate_pack {
                let (captured, packs) = mpsc::channel(16);
                tasks.push(tokio::spawn(pack::relay_packs(
                    self.link.clone(),
                    packs,
                    feed.published,
                    feed.packs,
                    token.clone(),
                )));
                parts.push(Arc::new(move || {
                    Box::new(PackCapture::new(captured.clone())) as Box<dyn SessionHooks>
                }));
            }
        }
        let role_hooks: HooksFactory = match parts.len() {
            0 => Arc::new(|| Box::new(PassThrough) as Box<dyn SessionHooks>),
            1 => parts.pop().expect("one"),
            _ => Arc::new(move || {
                Box::new(Chain(parts.iter().map(|f| f()).collect())) as Box<dyn SessionHooks>
            }),
        };
        let cell = self.cell.clone();
        let hooks: HooksFactory = match semisync {
            // Nothing a client sees runs ahead of the replicas'
            // acknowledgements (invariant 6).
            Some(ss) => Arc::new(move || {
                Box::new(FenceHooks::new(
                    cell.clone(),
                    Box::new(SemiSyncHooks::new(role_hooks(), ss.subscribe())),
                )) as Box<dyn SessionHooks>
            }),
            None => Arc::new(move || {
                Box::new(FenceHooks::new(cell.clone(), role_hooks())) as Box<dyn SessionHooks>
            }),
        };
        self.set_local(hooks);
        self.status.update(|s| s.role = Role::Primary);
        self.running = Some(Running {
            token,
            tasks,
            handover: Some(Arc::new(handover_tx)),
        });
        Ok(())
    }

    /// `upstream`: the replication address to follow (None: the configured
    /// `replication.upstream`).
    async fn start_replica(&mut self, upstream: Option<String>) -> anyhow::Result<()> {
        let token = self.shutdown.child_token();
        let mut tasks = Vec::new();
        self.status.update(|s| {
            s.role = Role::Replica;
            s.replicas.clear();
            s.replica_adverts.clear();
            s.replica_promotion.clear();
        });
        let r = self.r.clone();
        let applied = Arc::new(AppliedLog::new(r.applied_log_txns));
        // The replica's hooks right after the role (no await between): a
        // door that sees `Replica` serves only read-only sessions here, and
        // must not hand them the old primary's hooks (held replies on a
        // stopped feed). The other order would be worse: `Primary` with the
        // replica's hooks refuses a read-write `register` (see
        // `start_primary`).
        let allow_pack = r.allow_pack;
        {
            let applied = applied.clone();
            self.set_local(Arc::new(move || {
                Box::new(ReplicaHooks::new(applied.clone(), allow_pack)) as Box<dyn SessionHooks>
            }));
        }
        // Cascading: what this replica's backend commits (the applier's
        // replays, in tid order) is fed downstream exactly as a primary
        // feeds its replicas; so are its packs.
        let downstream = self
            .start_feed(false, None, None, &token, &mut tasks)
            .await?
            .map(|f| f.packs);
        let packer = r.replicate_pack.then(|| {
            let (p, task) = PackRunner::start(self.link.clone(), downstream, token.clone());
            tasks.push(task);
            p
        });
        let (upstream, upstream_name) = match upstream {
            // The certificate to expect is the node's name (certificates
            // are issued for node names); the host only when no node is
            // known at that address.
            Some(u) => (u.clone(), self.name_at(&u).unwrap_or_else(|| host_of(&u))),
            None => (
                r.upstream.clone().context("replication.upstream")?,
                r.upstream_server_name(),
            ),
        };
        info!(upstream = %upstream, cluster = %self.state.cluster, epoch = self.state.epoch, "replication: replica, read-only service");
        let applier = Applier::new(
            self.link.addr.clone(),
            self.link.storage.clone(),
            self.link.connect_timeout,
            self.link.call_timeout,
            r.max_message_bytes,
            applied.clone(),
        );
        let rcfg = ReplicaConfig {
            cluster: self.state.cluster.clone(),
            storage: self.link.storage.clone(),
            node: self.cfg.node_name.clone(),
            upstream_name,
            upstream,
            connector: self.connector.clone(),
            stale_after: Duration::from_millis(r.stale_after_ms),
            max_message_bytes: r.max_message_bytes,
            connect_timeout: self.link.connect_timeout,
            client_addr: Some(
                self.cfg
                    .cluster
                    .advertise_client
                    .clone()
                    .unwrap_or_else(|| self.cfg.client.listen.to_string()),
            ),
            replication_addr: self
                .cfg
                .cluster
                .advertise_replication
                .clone()
                .or_else(|| r.listen.map(|a| a.to_string())),
            applied: self.applied_tx.clone(),
            packer,
            role: Some(self.cell.clone()),
            spool_dir: self.cfg.spool_dir(),
            spool_max_bytes: r.spool_max_bytes,
        };
        tasks.push(tokio::spawn(replica::run_replica(
            rcfg,
            applier,
            self.status.clone(),
            token.clone(),
        )));
        self.running = Some(Running {
            token,
            tasks,
            handover: None,
        });
        Ok(())
    }

    /// The commit feed and the replication listener: on a primary, and on a
    /// replica that feeds further replicas. None without `replication.listen`.
    async fn start_feed(
        &self,
        primary: bool,
        handover: Option<watch::Receiver<Option<(StreamMsg, Tid)>>>,
        capture: Option<CaptureLink>,
        token: &CancellationToken,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> anyhow::Result<Option<FeedOut>> {
        let (Some(listen), Some(acceptor)) = (self.r.listen, self.acceptor.clone()) else {
            if primary {
                warn!("no replication.listen: this primary feeds no replicas");
            }
            return Ok(None);
        };
        let listener = bind_retrying(listen).await?;
        info!(listen = %listen, cluster = %self.state.cluster, "replication: accepting replicas over mutual TLS");
        // Bounded: a replica that falls this far behind the live feed reads
        // history instead (see SenderState). Each sender drains it into its
        // own byte-limited queue, so this only has to absorb a burst while a
        // sender is busy writing; it holds at most this many transactions.
        let (commits, _) = broadcast::channel(256);
        let (last_tx, last_rx) = watch::channel(Z64);
        let (packs_tx, packs_rx) = watch::channel(None);
        let report = primary.then(|| self.status.clone());
        let semisync = if primary {
            self.start_semisync(&last_rx, token, tasks)
        } else {
            None
        };
        tasks.push(tokio::spawn(feed::run_feed(
            self.link.clone(),
            commits.clone(),
            last_tx,
            report,
            token.clone(),
            capture,
        )));
        let r = &self.r;
        let lcfg = ListenerConfig {
            acceptor,
            allowed_peers: self.allowed.clone(),
            sender: SenderConfig {
                cluster: self.state.cluster.clone(),
                storage: self.link.storage.clone(),
                primary_node: self.cfg.node_name.clone(),
                heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms),
                live_queue_limit_txns: r.live_queue_txns,
                live_queue_limit_bytes: r.live_queue_bytes,
            },
            max_message_bytes: r.max_message_bytes,
            handshake_timeout: Duration::from_secs(10),
            cluster: Some(self.env.cluster.clone()),
            doors: Some(self.env.doors.clone()),
            clone_source: self.cfg.backend.clone_source(),
            role: Some(self.cell.clone()),
            handover,
            semisync: semisync.clone(),
        };
        tasks.push(tokio::spawn(feed::serve_replicas(
            listener,
            lcfg,
            self.link.clone(),
            FeedHandle {
                commits,
                last_tid: last_rx.clone(),
                packs: packs_rx,
            },
            self.status.clone(),
            token.clone(),
        )));
        Ok(Some(FeedOut {
            packs: packs_tx,
            published: last_rx,
            semisync,
        }))
    }

    /// A semi-sync primary's acknowledgement count and its coordinator.
    fn start_semisync(
        &self,
        last: &watch::Receiver<Tid>,
        token: &CancellationToken,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> Option<Arc<SemiSync>> {
        let r = &self.r;
        if r.ack_mode != AckMode::SemiSync {
            return None;
        }
        semisync::describe();
        info!(
            min_acks = r.min_acks,
            ack_level = ?r.ack_level,
            ack_timeout_ms = r.ack_timeout_ms,
            strict = r.strict,
            "replication: semi-synchronous commits"
        );
        let ss = SemiSync::new(SemiSyncConfig {
            min_acks: r.min_acks,
            level: r.ack_level,
            timeout: Duration::from_millis(r.ack_timeout_ms),
            strict: r.strict,
        });
        tasks.push(tokio::spawn(semisync::run_coordinator(
            ss.clone(),
            self.link.clone(),
            last.clone(),
            self.status.clone(),
            Some(self.cell.clone()),
            token.clone(),
        )));
        Some(ss)
    }

    /// The controller task: operator commands and the replica task's events.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<(Command, Reply)>,
        mut events: mpsc::UnboundedReceiver<RoleEvent>,
    ) {
        let mut coord_events = self.coord.as_mut().and_then(|c| c.events.take());
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                Some(ev) = async {
                    match coord_events.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.coord_event(ev).await,
                _ = tick.tick(), if self.coord.is_some() => {
                    self.publish_member();
                    self.publish_leader_tid();
                    self.follow_leader().await;
                }
                Some((cmd, reply)) = requests.recv() => {
                    info!(command = ?cmd, "role change requested");
                    let r = self.command(cmd.clone()).await;
                    match &r {
                        Ok(v) => info!(command = ?cmd, result = %v, "role change done"),
                        Err(e) => warn!(command = ?cmd, error = %e, "role change refused or failed"),
                    }
                    let _ = reply.send(r);
                }
                Some(ev) = events.recv() => self.event(ev).await,
            }
        }
    }

    fn summary(&self) -> serde_json::Value {
        json!({
            "node": self.cfg.node_name,
            "role": self.state.role,
            "epoch": self.state.epoch,
            "cluster": self.state.cluster,
            "following": self.state.following,
        })
    }

    async fn command(&mut self, cmd: Command) -> Result<serde_json::Value, String> {
        if self.coord.is_some() && !matches!(cmd, Command::Switchover { .. }) {
            return Err(
                "a coordinator is configured: the leader key in etcd decides who is primary; \
                 use switchover (it goes through etcd), or `zrelay pause` for planned work"
                    .into(),
            );
        }
        match cmd {
            Command::Promote => {
                let at_least = self.cell.epoch();
                self.promote(at_least, "promoted by the operator").await?;
                Ok(self.summary())
            }
            Command::Demote { follow } => {
                let addr = self.address_of(&follow)?;
                self.fence_and_drain(&format!("demote; will follow {follow}"))
                    .await?;
                let epoch = self
                    .state
                    .demote(
                        &addr,
                        unix_now(),
                        &format!("demoted by the operator; follows {follow}"),
                    )
                    .map_err(|e| e.to_string())?;
                self.cell.set_epoch(epoch);
                self.save()?;
                changed("demote");
                self.become_replica(Some(addr)).await?;
                Ok(self.summary())
            }
            Command::Switchover { to } => self.switchover(&to).await,
            Command::Detach => {
                let name = crate::role::detached_cluster_name(
                    &self.state.cluster,
                    &self.cfg.node_name,
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0),
                );
                let epoch = self
                    .state
                    .detach(&name, unix_now(), "detached by the operator")
                    .map_err(|e| e.to_string())?;
                self.stop().await;
                if let Ok((_, t)) = self.link.open(true).await {
                    self.state.note_last_tid(tid_hex(&t));
                }
                self.cell.set_epoch(epoch);
                self.cell.set_fenced(false);
                self.save()?;
                changed("detach");
                info!(cluster = %name, epoch, "detached: an independent primary of a new cluster");
                self.start_primary().await.map_err(|e| format!("{e:#}"))?;
                Ok(self.summary())
            }
        }
    }

    async fn event(&mut self, ev: RoleEvent) {
        match ev {
            RoleEvent::SawEpoch(e) => {
                if self.state.adopt(e) {
                    self.cell.set_epoch(e);
                    info!(epoch = e, "adopted the primary's epoch");
                    if let Err(err) = self.save() {
                        error!(error = %err, "could not persist the role state");
                    }
                }
            }
            RoleEvent::Handover {
                epoch,
                primary,
                replication_addr,
            } => {
                if self.state.role != RoleKind::Replica {
                    return;
                }
                if primary == self.cfg.node_name {
                    if let Err(e) = self
                        .promote(epoch, "switchover: the primary handed over")
                        .await
                    {
                        error!(error = %e, "promotion at handover failed");
                    }
                    return;
                }
                let addr = match replication_addr
                    .ok_or(())
                    .or_else(|_| self.address_of(&primary))
                {
                    Ok(a) => a,
                    Err(e) => {
                        error!(%primary, error = %e, "handover to a primary of unknown address; still following the old one");
                        return;
                    }
                };
                if let Err(e) = self.state.follow(
                    &addr,
                    epoch,
                    unix_now(),
                    &format!("switchover: follows {primary}"),
                ) {
                    error!(error = %e, "handover refused");
                    return;
                }
                self.cell.set_epoch(epoch);
                if let Err(e) = self.save() {
                    error!(error = %e, "could not persist the role state");
                }
                changed("follow");
                self.stop().await;
                if let Err(e) = self.start_replica(Some(addr)).await {
                    error!(error = %format!("{e:#}"), "could not follow the new primary");
                }
            }
        }
    }

    /// The replication address of `node`: the static cluster list, else what
    /// it advertised (as a replica of this node, or in a roster).
    /// The node whose replication address is `addr` (address book, etcd
    /// member records, the roster), if any.
    fn name_at(&self, addr: &str) -> Option<String> {
        if let Some(n) = self
            .cfg
            .cluster
            .nodes
            .iter()
            .find(|n| n.replication.as_deref() == Some(addr))
        {
            return Some(n.name.clone());
        }
        if let Some(c) = &self.coord {
            if let Some(m) = c
                .snapshot
                .borrow()
                .members
                .iter()
                .find(|m| m.replication.as_deref() == Some(addr))
            {
                return Some(m.name.clone());
            }
        }
        self.env
            .cluster
            .roster()
            .into_iter()
            .find(|e| e.replication_addr.as_deref() == Some(addr))
            .map(|e| e.node)
    }

    fn address_of(&self, node: &str) -> Result<String, String> {
        if let Some(a) = self
            .cfg
            .cluster
            .nodes
            .iter()
            .find(|n| n.name == node)
            .and_then(|n| n.replication.clone())
        {
            return Ok(a);
        }
        let st = self.status.snapshot();
        if let Some(a) = st.replica_adverts.get(node).and_then(|a| a.1.clone()) {
            return Ok(a);
        }
        self.env
            .cluster
            .roster()
            .into_iter()
            .find(|e| e.node == node)
            .and_then(|e| e.replication_addr)
            .ok_or_else(|| format!("no replication address known for node {node:?}"))
    }

    async fn promote(&mut self, at_least: u64, why: &str) -> Result<(), String> {
        if self.state.role != RoleKind::Replica && self.state.role != RoleKind::Fenced {
            return Err(format!(
                "this node is {:?}; only a replica can be promoted",
                self.state.role
            ));
        }
        // The replica task stops at a transaction boundary: what it applied
        // is committed; a replay cut mid-way is aborted by the backend.
        self.stop().await;
        info!("promotion: stopped following");
        // Everything this replica acknowledged as received (its spool) is
        // committed before it serves writes; else it stays a replica.
        if let Some(dir) = self.cfg.spool_dir() {
            let applier = Applier::new(
                self.link.addr.clone(),
                self.link.storage.clone(),
                self.link.connect_timeout,
                self.link.call_timeout,
                self.r.max_message_bytes,
                Arc::new(AppliedLog::new(16)),
            );
            match replica::apply_spool(&dir, applier).await {
                Ok(0) => {}
                Ok(n) => info!(transactions = n, "promotion: the spool applied first"),
                Err(e) => {
                    let up = self.state.following.clone();
                    if let Err(e2) = self.start_replica(up).await {
                        error!(error = %e2, "cannot restart the replica role");
                    }
                    return Err(format!("not promoted: {e}"));
                }
            }
        }
        let last = self.link.open(true).await.ok().map(|(_, t)| tid_hex(&t));
        let epoch = self
            .state
            .promote(at_least, unix_now(), why)
            .map_err(|e| e.to_string())?;
        if let Some(t) = last {
            self.state.note_last_tid(t);
        }
        self.cell.set_epoch(epoch);
        self.cell.set_fenced(false);
        // With a coordinator: writable only while the key is held.
        self.gate();
        self.save()?;
        changed("promote");
        info!(epoch, why, "promoted: serving writes");
        self.start_primary().await.map_err(|e| format!("{e:#}"))
    }

    /// Stops new commits and waits for the voted ones to finish; returns the
    /// backend's last tid, final from then on.
    async fn fence_and_drain(&mut self, why: &str) -> Result<Tid, String> {
        self.state
            .fence(unix_now(), why)
            .map_err(|e| e.to_string())?;
        self.cell.set_fenced(true);
        self.save()?;
        changed("fence");
        let deadline = Instant::now() + INFLIGHT_WAIT;
        while self.cell.in_flight() > 0 {
            if Instant::now() > deadline {
                self.unfence("commits in flight did not finish");
                return Err(format!(
                    "{} commit(s) still in flight after {INFLIGHT_WAIT:?}; fence lifted",
                    self.cell.in_flight()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match self.link.open(true).await {
            Ok((_, last)) => Ok(last),
            Err(e) => {
                self.unfence("backend unreachable");
                Err(format!("read the backend's last transaction: {e}"))
            }
        }
    }

    fn unfence(&mut self, why: &str) {
        if self.state.unfence(unix_now(), why).is_ok() {
            self.cell.set_fenced(false);
            self.gate();
            changed("unfence");
            if let Err(e) = self.save() {
                error!(error = %e, "could not persist the role state");
            }
        }
    }

    async fn become_replica(&mut self, upstream: Option<String>) -> Result<(), String> {
        self.stop().await;
        // Sessions opened as primary keep the fence (they still write to
        // this backend) until the door closes them at a safe point.
        self.start_replica(upstream)
            .await
            .map_err(|e| format!("{e:#}"))
    }

    async fn switchover(&mut self, to: &str) -> Result<serde_json::Value, String> {
        let st = self.status.snapshot();
        let promotion: Option<Promotion> = st
            .replicas
            .get(to)
            .filter(|p| p.state == crate::status::StreamState::Live)
            .and(st.replica_promotion.get(to).copied());
        self.state
            .check_switchover(&self.cfg.node_name, to, promotion)
            .map_err(|e| e.to_string())?;
        let addr = self.address_of(to)?;
        let started = Instant::now();
        let last = self.fence_and_drain(&format!("switchover to {to}")).await?;
        info!(target = to, last = %tid_hex(&last), "switchover: fenced; waiting for the target to apply everything");
        let deadline = Instant::now() + CATCHUP_WAIT;
        loop {
            let acked = self
                .status
                .snapshot()
                .replicas
                .get(to)
                .and_then(|p| p.acked_tid.as_deref().and_then(parse_hex));
            if acked.is_some_and(|a| a >= last) {
                break;
            }
            if Instant::now() > deadline {
                self.unfence("the switchover target did not catch up");
                return Err(format!(
                    "{to} did not apply up to {} within {CATCHUP_WAIT:?}; fence lifted, still primary",
                    tid_hex(&last)
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // With a coordinator the leader key moves to the target in one etcd
        // transaction (epoch + 1): no race with the automatic path.
        let mut epoch = self.state.epoch + 1;
        let coordinated = self.coord.is_some();
        if let Some(c) = &self.coord {
            let (tx, rx) = oneshot::channel();
            let asked = c
                .requests
                .send(CoordRequest::Handover {
                    to: to.to_string(),
                    reply: tx,
                })
                .await;
            let r = match asked {
                Ok(()) => tokio::time::timeout(HANDOVER_WAIT, rx)
                    .await
                    .map_err(|_| "the coordinator did not answer".to_string())
                    .and_then(|r| r.map_err(|_| "the coordinator stopped".to_string()))
                    .and_then(|r| r),
                Err(_) => Err("the coordinator stopped".into()),
            };
            match r {
                Ok(e) => {
                    epoch = e.max(epoch);
                    self.set_holding(false);
                    self.gate();
                    info!(
                        target = to,
                        epoch, "switchover: leader key handed over in etcd"
                    );
                }
                Err(e) => {
                    self.unfence("the leader key could not be handed over");
                    return Err(format!("switchover through etcd failed: {e}; fence lifted if the key is still held"));
                }
            }
        }
        // Hand over first, demote after: until the target has the handover
        // this node is still the primary and can give up cleanly.
        self.status.update(|s| s.handed_over.clear());
        let handover = self.running.as_ref().and_then(|r| r.handover.clone());
        if let Some(h) = &handover {
            h.send_replace(Some((
                StreamMsg::Handover {
                    epoch,
                    primary: to.to_string(),
                    replication_addr: Some(addr.clone()),
                },
                last,
            )));
        }
        let deadline = Instant::now() + HANDOVER_WAIT;
        loop {
            let st = self.status.snapshot();
            let target_told = st.handed_over.contains(to);
            let all_done = st.replicas.iter().all(|(n, p)| {
                st.handed_over.contains(n)
                    || (p.state != crate::status::StreamState::Live
                        && p.state != crate::status::StreamState::CatchingUp)
            });
            if target_told && all_done {
                break;
            }
            if Instant::now() > deadline {
                // Through etcd the key is the target's already: demote anyway
                // (it takes over when it sees the key).
                if target_told || coordinated {
                    break;
                }
                if let Some(h) = &handover {
                    h.send_replace(None);
                }
                self.unfence("the switchover target was not told");
                return Err(format!(
                    "{to} did not receive the handover within {HANDOVER_WAIT:?}; fence lifted, still primary"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let demoted = self
            .state
            .demote(
                &addr,
                unix_now(),
                &format!("switchover: {to} is the new primary"),
            )
            .map_err(|e| e.to_string())?;
        self.state.adopt(epoch);
        debug_assert_eq!(self.state.epoch, epoch);
        self.state.note_last_tid(tid_hex(&last));
        self.cell.set_epoch(demoted.max(epoch));
        self.save()?;
        changed("demote");
        metrics::histogram!(SWITCHOVER_FENCED).record(started.elapsed().as_secs_f64());
        self.become_replica(Some(addr)).await?;
        let mut v = self.summary();
        v["new_primary"] = json!(to);
        v["last_tid"] = json!(tid_hex(&last));
        v["fenced_ms"] = json!(started.elapsed().as_millis() as u64);
        Ok(v)
    }
}

/// What [`RoleCtl::start_feed`] hands back: where packs to replay go, and
/// the feed's last published tid.
struct FeedOut {
    packs: watch::Sender<Option<crate::replication::pack::PackOp>>,
    published: watch::Receiver<Tid>,
    /// Semi-sync primary: the acknowledgement count.
    semisync: Option<Arc<SemiSync>>,
}

/// How long the feed waits for a client session whose `tpc_finish` reply
/// races the observer's invalidation of the same commit; past it, the commit
/// is read back (correct either way).
const CAPTURE_WAIT: Duration = Duration::from_millis(200);

/// Binds the replication listener; right after a role change the previous
/// listener of this port may take a moment to be gone.
async fn bind_retrying(listen: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() < deadline && e.kind() == std::io::ErrorKind::AddrInUse => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("listen for replicas on {listen}"));
            }
        }
    }
}
