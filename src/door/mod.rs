//! Every node is a door to the whole cluster.
//!
//! A client may connect to any zrelay. At `register` the door decides where
//! the session lives:
//! - **read-write at a replica** (`write_policy = "forward"`): the session
//!   is relayed to the primary's zrelay over mutual TLS (a [`DoorHello`] on
//!   the primary's replication listener, then plain ZEO frames; the primary
//!   runs it as one of its own client sessions, so errors, invalidations and
//!   `lastTransaction` are the primary's). The node's own backend connection
//!   is kept and registered read-only: `loadBefore` calls the replica can
//!   answer exactly as the primary would go there ([`offload`]).
//!   `write_policy = "refuse"`: `ReadOnlyError`, as before doors existed.
//! - **read-only at a replica**: served here while this replica is live and
//!   within `max_replica_lag_ms`; else relayed to the primary. A local
//!   read-only session whose replica falls behind is closed at a safe point,
//!   and its client reconnects through this door (and is then routed to the
//!   primary, which is never behind anything it saw). A replica that has
//!   lost its stream (partitioned from the primary, or the primary is down)
//!   serves read-only sessions itself, stale, with its lag growing in
//!   `/status`, the metrics and `/replica?lag=`: a read-only server until it
//!   can reconnect.
//! - **at the primary**: served locally.
//!
//! The primary's identity comes from the [`ClusterView`]. When it changes,
//! forwarded sessions are closed at a safe point (no call or transaction in
//! flight) so their clients reconnect and reach the new primary through the
//! same door ([`DoorHooks::on_wake`]).
//!
//! State: [`Door`] is shared by the node's sessions (config, the local
//! replica's position, the current primary); it has one writer, the
//! [`run_monitor`] task. Each session's hooks own their own [`Offload`].

pub mod forward;
pub mod offload;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::cluster::{ClusterView, Target};
use crate::metrics as m;
use crate::relay::hooks::PendingCall;
use crate::relay::{
    ClientVerdict, LocalVerdict, Reroute, ServerVerdict, SessionHooks, SessionInfo, WakeVerdict,
};
use crate::replication::protocol::{DoorHello, PROTOCOL_VERSION};
use crate::replication::txn::Tid;
use crate::status::{Role, StatusHub, StreamState};
use crate::wire::calls::ClientCall;
use crate::wire::error::read_only_error;
use crate::wire::Message;
use offload::{Decision, Local, Offload};

/// `[door]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoorConfig {
    /// What a replica does with a read-write `register`: "forward" it to the
    /// primary or "refuse" it with ReadOnlyError.
    #[serde(default)]
    pub write_policy: WritePolicy,
    /// Serve `loadBefore` of forwarded sessions from the local replica when
    /// that is provably what the primary would answer.
    #[serde(default = "yes")]
    pub offload_loads: bool,
    /// How long a load may wait for the local replica to catch up before it
    /// goes to the primary.
    #[serde(default = "default_offload_wait_ms")]
    pub offload_wait_ms: u64,
    /// A replica lagging more than this (or not live) serves no read-only
    /// session and no offloaded load.
    #[serde(default = "default_max_replica_lag_ms")]
    pub max_replica_lag_ms: u64,
    /// At the primary: "local" serves read-only sessions here; "replicas"
    /// sends each to the least-lagged replica within `max_replica_lag_ms`
    /// that has a replication listener (else serves it here).
    #[serde(default)]
    pub read_only_route: ReadOnlyRoute,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadOnlyRoute {
    #[default]
    Local,
    Replicas,
}

impl Default for DoorConfig {
    fn default() -> Self {
        DoorConfig {
            write_policy: WritePolicy::default(),
            offload_loads: true,
            offload_wait_ms: default_offload_wait_ms(),
            max_replica_lag_ms: default_max_replica_lag_ms(),
            read_only_route: ReadOnlyRoute::default(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_offload_wait_ms() -> u64 {
    20
}
fn default_max_replica_lag_ms() -> u64 {
    5_000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WritePolicy {
    #[default]
    Forward,
    Refuse,
}

/// The door of one node, shared by its client sessions.
pub struct Door {
    cfg: DoorConfig,
    cluster: Arc<ClusterView>,
    /// Shared with the replica task: a certificate reload applies here too.
    connector: Arc<crate::live::Live<TlsConnector>>,
    cluster_name: String,
    storage: String,
    node: String,
    connect_timeout: Duration,
    /// Hooks of the sessions this node serves itself (read-only replica
    /// sessions on a replica; the primary's own hooks on a primary).
    local_hooks: crate::relay::listener::HooksFactory,
    status: Arc<StatusHub>,
    role: Option<Arc<crate::role::fence::RoleCell>>,
    /// Newest tid committed on the local backend (u64). Writer: monitor.
    applied: AtomicU64,
    /// Live and within the lag limit. Writer: monitor.
    usable: AtomicBool,
    /// This replica has lost its stream from the primary (partition, primary
    /// down): read-only sessions are served here, stale, rather than sent
    /// to a primary that is probably out of reach. Writer: monitor.
    cut_off: AtomicBool,
    /// The primary sessions are forwarded to now. Writer: monitor.
    primary: RwLock<Option<Target>>,
    /// Bumped by the monitor on any change above; sessions wake on it.
    changed: watch::Sender<u64>,
}

pub struct DoorParts {
    pub cfg: DoorConfig,
    pub cluster: Arc<ClusterView>,
    pub connector: Arc<crate::live::Live<TlsConnector>>,
    pub cluster_name: String,
    pub storage: String,
    pub node: String,
    pub connect_timeout: Duration,
    pub local_hooks: crate::relay::listener::HooksFactory,
    pub status: Arc<StatusHub>,
    /// The node's epoch, sent in every [`DoorHello`].
    pub role: Option<Arc<crate::role::fence::RoleCell>>,
}

impl Door {
    pub fn new(p: DoorParts) -> Arc<Self> {
        m::init_door_series();
        let (changed, _) = watch::channel(0);
        Arc::new(Door {
            cfg: p.cfg,
            cluster: p.cluster,
            connector: p.connector,
            cluster_name: p.cluster_name,
            storage: p.storage,
            node: p.node,
            connect_timeout: p.connect_timeout,
            local_hooks: p.local_hooks,
            status: p.status,
            role: p.role,
            applied: AtomicU64::new(0),
            usable: AtomicBool::new(false),
            cut_off: AtomicBool::new(false),
            primary: RwLock::new(None),
            changed,
        })
    }

    /// A new session's hooks.
    pub fn hooks(self: &Arc<Self>) -> Box<dyn SessionHooks> {
        Box::new(DoorHooks {
            door: self.clone(),
            mode: Mode::Undecided,
            register_deadline: None,
        })
    }

    /// Another replica fit to serve read-only sessions: live, within the
    /// lag limit, reachable (it has a replication listener), least lagged.
    fn replica_for_reads(&self) -> Option<Target> {
        self.cluster
            .replica_for_reads(self.cfg.max_replica_lag_ms)
            .filter(|t| t.node != self.node)
    }

    /// A primary whose coordinator does not hold the leader key (see
    /// `RoleCell::stepped_down`): it serves no read-write session.
    fn stepped_down(&self) -> bool {
        self.role.as_ref().is_some_and(|r| r.stepped_down())
    }

    fn primary(&self) -> Option<Target> {
        match self.primary.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn local(&self, connected: bool) -> Local {
        Local {
            applied: self.applied.load(Ordering::Acquire),
            usable: self.usable.load(Ordering::Acquire),
            connected,
        }
    }

    fn reroute(&self, target: Target, read_only: bool, keep_local: bool) -> Reroute {
        Reroute {
            opener: Arc::new(forward::ForwardOpener {
                target,
                hello: DoorHello {
                    version: PROTOCOL_VERSION,
                    cluster: self.cluster_name.clone(),
                    storage: self.storage.clone(),
                    node: self.node.clone(),
                    read_only,
                    epoch: self.role.as_ref().map(|r| r.epoch()),
                },
                connector: (*self.connector.get()).clone(),
                timeout: self.connect_timeout,
            }),
            keep_local,
        }
    }
}

/// Keeps the door's view of the local replica and of the primary current:
/// on every applied transaction (`applied_rx`) and every 100 ms (lag and
/// stream state, the roster).
pub async fn run_monitor(
    door: Arc<Door>,
    mut applied_rx: watch::Receiver<Tid>,
    status: Arc<StatusHub>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let max_lag = Duration::from_millis(door.cfg.max_replica_lag_ms).as_secs_f64();
    let mut role = status.role();
    let mut stepped_down = false;
    loop {
        let mut bump = false;
        let sd = door.stepped_down();
        if sd != stepped_down {
            // A primary lost (or regained) the leader key: its sessions
            // leave at a safe point (see DoorHooks::on_wake).
            stepped_down = sd;
            bump = true;
        }
        if status.role() != role {
            // Promoted or demoted: sessions served here under the old role
            // end at a safe point (see DoorHooks::on_wake).
            role = status.role();
            bump = true;
        }
        let applied = u64::from_be_bytes(*applied_rx.borrow_and_update());
        if door.applied.swap(applied, Ordering::AcqRel) != applied {
            bump = true;
        }
        let st = status.snapshot();
        let live = st.upstream.as_ref().map(|u| u.state) == Some(StreamState::Live);
        let lag = crate::admin::health::lag_seconds(&st, crate::admin::health::Now::current());
        // A primary serves everything it is asked.
        let usable = st.role == crate::status::Role::Primary
            || live && st.backend_up && lag.is_some_and(|l| l <= max_lag);
        if door.usable.swap(usable, Ordering::AcqRel) != usable {
            bump = true;
        }
        let cut_off = st.role == crate::status::Role::Replica
            && st.upstream.as_ref().map(|u| u.state) == Some(StreamState::Disconnected);
        if door.cut_off.swap(cut_off, Ordering::AcqRel) != cut_off {
            bump = true;
        }
        let primary = door.cluster.primary();
        if primary != door.primary() {
            tracing::info!(primary = ?primary.as_ref().map(|t| &t.node), "door: primary is now");
            match door.primary.write() {
                Ok(mut g) => *g = primary,
                Err(p) => *p.into_inner() = primary,
            }
            bump = true;
        }
        if bump {
            door.changed.send_modify(|g| *g += 1);
            let ds = crate::status::DoorStatus {
                local_usable: usable,
                primary: door.primary().map(|t| t.node),
                write_policy: match door.cfg.write_policy {
                    WritePolicy::Forward => "forward",
                    WritePolicy::Refuse => "refuse",
                },
                offload_loads: door.cfg.offload_loads,
            };
            status.update(|s| {
                if s.door.as_ref() != Some(&ds) {
                    s.door = Some(ds);
                }
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = applied_rx.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

enum Mode {
    /// Before `register`.
    Undecided,
    /// Served by this node: read-only at a replica, anything at the primary
    /// (the role it was opened under: a role change closes it).
    Local(Box<dyn SessionHooks>, Role),
    /// Read-write, relayed to `primary`; loads possibly offloaded.
    Forwarded {
        primary: String,
        offload: Option<Offload>,
        local_connected: bool,
    },
    /// Read-only, relayed to the primary (this replica is behind).
    ForwardedReadOnly { primary: String },
    /// Relayed to the primary from the start (this replica was not usable
    /// when the client connected); nothing is served here.
    ForwardedEarly { primary: String },
}

pub struct DoorHooks {
    door: Arc<Door>,
    mode: Mode,
    /// When a held read-write register gives up (see `no_route_yet`).
    register_deadline: Option<Instant>,
}

/// How long a read-write `register` waits for the door to know a primary
/// (an election: up to ttl + loop_wait with a coordinator) before the
/// session is closed.
const REGISTER_WAIT: Duration = Duration::from_secs(20);

impl DoorHooks {
    /// A read-write register with nowhere to go yet: held until the door's
    /// view changes (woken) or `REGISTER_WAIT` passed (`expired`: closed).
    fn no_route_yet(&mut self, expired: bool, why: &'static str) -> ClientVerdict {
        if expired {
            m::door_route_failed();
            return ClientVerdict::Close(why.into());
        }
        let until = *self
            .register_deadline
            .get_or_insert_with(|| Instant::now() + REGISTER_WAIT);
        ClientVerdict::Defer(until)
    }

    fn on_register(&mut self, info: &SessionInfo, msg: &Message, expired: bool) -> ClientVerdict {
        let read_only = match ClientCall::parse(msg) {
            Ok(ClientCall::Register { read_only, .. }) => read_only,
            _ => return ClientVerdict::Close("malformed register".into()),
        };
        let door = self.door.clone();
        if door.status.role() == Role::Primary && !read_only && door.stepped_down() {
            // No leader key here: wait (bounded) until this node holds it or
            // follows whoever does (DoorHooks::on_deferred asks again).
            return self.no_route_yet(expired, "this primary does not hold the leader key");
        }
        if door.status.role() == Role::Primary {
            if read_only && door.cfg.read_only_route == ReadOnlyRoute::Replicas {
                if let Some(target) = door.replica_for_reads() {
                    m::door_session(true, true);
                    self.mode = Mode::ForwardedReadOnly {
                        primary: door.primary().map(|t| t.node).unwrap_or_default(),
                    };
                    return ClientVerdict::Reroute(door.reroute(target, true, false));
                }
            }
            let mut local = (door.local_hooks)();
            let v = local.on_client_message(info, msg);
            self.mode = Mode::Local(local, Role::Primary);
            return v;
        }
        let primary = door.primary();
        if !read_only {
            if door.cfg.write_policy == WritePolicy::Refuse {
                m::rejected_write("register");
                return ClientVerdict::Reply(read_only_error(msg.msgid.clone()));
            }
            let Some(target) = primary else {
                // No primary known (yet, e.g. an election under way): hold
                // the register (bounded) until the door knows one. Closing
                // would make a ZEO client wait ~9 s (its register_failed
                // poll); a ReadOnlyError ~10 s.
                return self.no_route_yet(expired, "no primary known to forward to");
            };
            m::door_session(true, false);
            let offload = door
                .cfg
                .offload_loads
                .then(|| Offload::new(Duration::from_millis(door.cfg.offload_wait_ms)));
            let keep_local = offload.is_some();
            self.mode = Mode::Forwarded {
                primary: target.node.clone(),
                offload,
                local_connected: keep_local,
            };
            return ClientVerdict::Reroute(door.reroute(target, false, keep_local));
        }
        // Cut off from the primary (partition, primary down): keep serving
        // read-only clients from this backend, as a read-only server with a
        // growing (reported) lag, rather than send them to where it cannot
        // reach.
        if !door.usable.load(Ordering::Acquire) && !door.cut_off.load(Ordering::Acquire) {
            // The least-lagged other replica within the limit, else the
            // primary (never behind anything a client saw).
            if let Some(target) = door.replica_for_reads().or(primary) {
                m::door_session(true, true);
                self.mode = Mode::ForwardedReadOnly {
                    primary: target.node.clone(),
                };
                return ClientVerdict::Reroute(door.reroute(target, true, false));
            }
        }
        m::door_session(false, true);
        let mut local = (door.local_hooks)();
        let v = local.on_client_message(info, msg);
        self.mode = Mode::Local(local, Role::Replica);
        v
    }
}

impl SessionHooks for DoorHooks {
    fn early_route(&mut self) -> Option<Arc<dyn crate::relay::UpstreamOpener>> {
        if self.door.usable.load(Ordering::Acquire)
            || self.door.cut_off.load(Ordering::Acquire)
            || self.door.status.role() == Role::Primary
        {
            return None;
        }
        let target = self.door.primary()?;
        self.mode = Mode::ForwardedEarly {
            primary: target.node.clone(),
        };
        Some(self.door.reroute(target, false, false).opener)
    }

    fn on_client_message(&mut self, info: &SessionInfo, msg: &Message) -> ClientVerdict {
        match &mut self.mode {
            Mode::Undecided if msg.method == "register" => self.on_register(info, msg, false),
            Mode::ForwardedEarly { .. } if msg.method == "register" => {
                let read_only = match ClientCall::parse(msg) {
                    Ok(ClientCall::Register { read_only, .. }) => read_only,
                    _ => return ClientVerdict::Close("malformed register".into()),
                };
                if !read_only && self.door.cfg.write_policy == WritePolicy::Refuse {
                    m::rejected_write("register");
                    return ClientVerdict::Reply(read_only_error(msg.msgid.clone()));
                }
                m::door_session(true, read_only);
                ClientVerdict::Forward
            }
            Mode::ForwardedEarly { .. } => ClientVerdict::Forward,
            Mode::Undecided => ClientVerdict::Close("call before register".into()),
            Mode::Local(h, _) => h.on_client_message(info, msg),
            Mode::ForwardedReadOnly { .. } => ClientVerdict::Forward,
            Mode::Forwarded { offload: None, .. } => ClientVerdict::Forward,
            Mode::Forwarded {
                offload: Some(o),
                local_connected,
                ..
            } => {
                let local = self.door.local(*local_connected);
                verdict(o.decide(msg, local, Instant::now(), false))
            }
        }
    }

    fn on_server_message(
        &mut self,
        info: &SessionInfo,
        msg: &Message,
        answers: Option<&PendingCall>,
    ) -> ServerVerdict {
        match &mut self.mode {
            Mode::Local(h, _) => h.on_server_message(info, msg, answers),
            Mode::Forwarded {
                offload: Some(o), ..
            } => {
                o.observe(msg, answers.map(|a| &*a.method));
                ServerVerdict::Forward
            }
            _ => ServerVerdict::Forward,
        }
    }

    fn on_local_reply(&mut self, info: &SessionInfo, msg: &Message) -> LocalVerdict {
        let Mode::Forwarded {
            offload: Some(o), ..
        } = &mut self.mode
        else {
            return LocalVerdict::Retry;
        };
        let seen = o.seen();
        let verdict = o.on_local_reply(msg);
        // Which load the replica answered, with what (start..end), at what
        // client position: the trail of a stale-cache investigation.
        if tracing::enabled!(tracing::Level::TRACE) {
            let tids = match &*msg.args {
                crate::wire::Value::Tuple(a) | crate::wire::Value::List(a) => a
                    .iter()
                    .skip(1)
                    .map(|v| {
                        v.as_bytes()
                            .map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<String>())
                            .unwrap_or_else(|| "None".into())
                    })
                    .collect::<Vec<_>>()
                    .join(".."),
                _ => "None".into(),
            };
            tracing::trace!(
                conn = info.conn_id,
                msgid = ?msg.msgid,
                seen = %format!("{seen:016x}"),
                reply = %tids,
                delivered = verdict.is_some(),
                "door: local loadBefore reply"
            );
        }
        match verdict {
            Some(reason) => {
                m::door_load(true, reason);
                LocalVerdict::Deliver
            }
            None => {
                m::door_load(false, "invalidated");
                LocalVerdict::Retry
            }
        }
    }

    fn on_deferred(&mut self, info: &SessionInfo, msg: &Message, expired: bool) -> ClientVerdict {
        match &mut self.mode {
            Mode::Undecided if msg.method == "register" => self.on_register(info, msg, expired),
            Mode::Forwarded {
                offload: Some(o),
                local_connected,
                ..
            } => {
                let local = self.door.local(*local_connected);
                verdict(o.decide(msg, local, Instant::now(), expired))
            }
            _ => ClientVerdict::Forward,
        }
    }

    fn wake_signal(&mut self) -> Option<watch::Receiver<u64>> {
        Some(self.door.changed.subscribe())
    }

    fn on_wake(&mut self, _info: &SessionInfo) -> WakeVerdict {
        match &self.mode {
            Mode::Local(_, opened_as) if *opened_as != self.door.status.role() => {
                WakeVerdict::CloseAtSafePoint("this node changed role; reconnect to be routed")
            }
            Mode::Local(_, Role::Primary) if self.door.stepped_down() => {
                WakeVerdict::CloseAtSafePoint(
                    "this primary lost the leader key; reconnect to be routed",
                )
            }
            Mode::Local(..)
                if !self.door.usable.load(Ordering::Acquire)
                    && !self.door.cut_off.load(Ordering::Acquire)
                    && self.door.status.role() == Role::Replica =>
            {
                WakeVerdict::CloseAtSafePoint("this replica fell behind; reconnect to be routed")
            }
            Mode::Forwarded { primary, .. }
            | Mode::ForwardedReadOnly { primary }
            | Mode::ForwardedEarly { primary }
                if self.door.primary().map(|t| t.node).as_ref() != Some(primary) =>
            {
                WakeVerdict::CloseAtSafePoint("the primary changed; reconnect to follow it")
            }
            _ => WakeVerdict::Nothing,
        }
    }

    fn on_close(&mut self, info: &SessionInfo) {
        if let Mode::Local(h, _) = &mut self.mode {
            h.on_close(info);
        }
    }

    fn on_local_lost(&mut self, _info: &SessionInfo) {
        if let Mode::Forwarded {
            offload,
            local_connected,
            ..
        } = &mut self.mode
        {
            *local_connected = false;
            if let Some(o) = offload {
                o.on_local_lost();
            }
        }
    }
}

fn verdict(d: Option<Decision>) -> ClientVerdict {
    match d {
        None => ClientVerdict::Forward,
        Some(Decision::Local) => ClientVerdict::Local,
        Some(Decision::Wait(until)) => ClientVerdict::Defer(until),
        Some(Decision::Primary(reason)) => {
            m::door_load(false, reason);
            ClientVerdict::Forward
        }
    }
}
