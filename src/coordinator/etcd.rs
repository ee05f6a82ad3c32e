//! The coordinator task: moves values between etcd and `decide`, nothing
//! more. One round every `loop_wait`: refresh the member lease and key, renew
//! the leader lease when held, read `/<name>/`, then act on `decide::plan`.
//! Every etcd call (and the pause between rounds) races the fencing deadline,
//! so a hung request never delays a fence.

use std::future::Future;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::decide::{self, FenceClock, LeaderValue, Member, MemberRole, Plan, Standoff};
use super::{keys, metrics, ClusterSnapshot, CoordinatorConfig, Event, FenceReason, Request};

/// Why a guarded call did not return a value.
enum CallError {
    /// The fencing deadline came first (the fence was already signalled).
    Fenced,
    Etcd(String),
}

struct Task {
    cfg: CoordinatorConfig,
    me: String,
    events: mpsc::Sender<Event>,
    snap: watch::Sender<ClusterSnapshot>,
    client: Option<Client>,
    member_lease: Option<i64>,
    leader_lease: Option<i64>,
    leader_epoch: u64,
    started: Instant,
    /// Our member record said primary while we held the current leader key.
    led_as_primary: bool,
    clock: FenceClock,
    /// Last leader seen, to emit Leader/NoLeader only on change.
    seen_leader: Option<Option<LeaderValue>>,
}

pub(super) async fn run(
    cfg: CoordinatorConfig,
    me: String,
    mut state: watch::Receiver<Member>,
    events: mpsc::Sender<Event>,
    snap: watch::Sender<ClusterSnapshot>,
    mut requests: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
) {
    let clock = FenceClock::new(cfg.ttl(), cfg.fence_margin());
    let mut t = Task {
        cfg,
        me,
        events,
        snap,
        client: None,
        member_lease: None,
        leader_lease: None,
        leader_epoch: 0,
        led_as_primary: false,
        started: Instant::now(),
        clock,
        seen_leader: None,
    };
    metrics::is_leader(false);
    loop {
        let next = Instant::now() + t.cfg.loop_wait();
        let own = {
            let mut m = state.borrow().clone();
            m.name = t.me.clone();
            m
        };
        if let Err(e) = t.round(&own).await {
            // Start the next round on a fresh connection: after a partition
            // heals, a channel whose requests timed out does not always
            // recover by itself.
            t.client = None;
            t.snap.send_modify(|s| {
                s.reachable = false;
                s.holding = t.clock.holding();
                s.last_error = Some(e.clone());
            });
            tracing::debug!(error = %e, "coordinator round failed");
        }
        metrics::renewal_age(t.clock.since_confirmed(Instant::now()));
        let (role, epoch) = (own.role, own.epoch);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sleep_until(next) => {}
            _ = t.deadline() => t.fence(FenceReason::Deadline).await,
            // A role change is published at once (a new primary's record,
            // a demoted node giving the key back), not a loop_wait later.
            _ = role_changed(&mut state, role, epoch) => {}
            Some(r) = requests.recv() => match r {
                Request::Handover { to, reply } => {
                    let r = t.hand_over(&to).await;
                    let _ = reply.send(r);
                }
            },
        }
    }
    t.release_all().await;
}

/// Resolves when the node's published role or epoch differs from these.
async fn role_changed(state: &mut watch::Receiver<Member>, role: MemberRole, epoch: u64) {
    loop {
        {
            let m = state.borrow_and_update();
            if m.role != role || m.epoch != epoch {
                return;
            }
        }
        if state.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

impl Task {
    /// Resolves at the fencing deadline while holding; never otherwise.
    async fn deadline(&self) {
        match self.clock.fence_deadline() {
            Some(d) => sleep_until(d).await,
            None => std::future::pending().await,
        }
    }

    /// Never waits for the consumer: a slow role machinery must not delay
    /// the fencing timer. (Events are a few per leader change; a full
    /// channel means the consumer is stuck, and `ClusterSnapshot::holding`
    /// still tells the truth.)
    fn emit(&self, e: Event) {
        if let Err(e) = self.events.try_send(e) {
            tracing::error!(event = ?e, "coordinator: event channel full or closed; event dropped");
        }
    }

    async fn fence(&mut self, reason: FenceReason) {
        if !self.clock.holding() {
            return;
        }
        self.clock.clear();
        // The lease may still be alive in etcd; it is abandoned (not
        // revoked: the revoke could hang too) and expires on its own.
        self.leader_lease = None;
        metrics::fenced(reason.label());
        metrics::is_leader(false);
        tracing::warn!(
            reason = reason.label(),
            "coordinator: fencing (leader lease not renewed in time)"
        );
        self.snap.send_modify(|s| s.holding = false);
        self.emit(Event::Fence { reason });
    }

    /// One etcd call: bounded by `loop_wait`, raced against the fencing
    /// deadline, timed and counted.
    async fn call<T, F>(&mut self, op: &'static str, fut: F) -> Result<T, CallError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let start = Instant::now();
        let limit = self.cfg.loop_wait();
        let r = tokio::select! {
            r = timeout(limit, fut) => r,
            _ = self.deadline() => {
                metrics::etcd_request(op, start.elapsed(), false);
                self.fence(FenceReason::Deadline).await;
                return Err(CallError::Fenced);
            }
        };
        match r {
            Ok(Ok(v)) => {
                metrics::etcd_request(op, start.elapsed(), true);
                Ok(v)
            }
            Ok(Err(e)) => {
                metrics::etcd_request(op, start.elapsed(), false);
                Err(CallError::Etcd(format!("etcd {op}: {e}")))
            }
            Err(_) => {
                metrics::etcd_request(op, start.elapsed(), false);
                Err(CallError::Etcd(format!(
                    "etcd {op}: no answer within {limit:?}"
                )))
            }
        }
    }

    async fn connect(&mut self) -> Result<Client, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let opts = connect_options(&self.cfg)?;
        let endpoints = self.cfg.endpoints.clone();
        match self
            .call("connect", Client::connect(endpoints, Some(opts)))
            .await
        {
            Ok(c) => {
                self.client = Some(c.clone());
                Ok(c)
            }
            Err(CallError::Fenced) => Err("fenced while connecting".into()),
            Err(CallError::Etcd(e)) => Err(e),
        }
    }

    async fn round(&mut self, own: &Member) -> Result<(), String> {
        let c = self.connect().await?;
        let err = |e: CallError| match e {
            CallError::Fenced => "fenced".to_string(),
            CallError::Etcd(e) => e,
        };
        let ttl = self.cfg.ttl_secs as i64;

        // Leader lease first: it has the deadline.
        if let Some(id) = self.leader_lease {
            let start = Instant::now();
            match self.call("keepalive", keep_alive(c.clone(), id)).await {
                Ok(true) => self.clock.confirmed(start),
                Ok(false) => {
                    self.fence(FenceReason::Lost).await;
                    self.leader_lease = None;
                }
                Err(e) => {
                    // Keep trying next round; the deadline fences if needed.
                    return Err(err(e));
                }
            }
        }

        // Member lease and key.
        let member_key = keys::member(&self.cfg.name, &self.me);
        if let Some(id) = self.member_lease {
            match self.call("keepalive", keep_alive(c.clone(), id)).await {
                Ok(true) => {}
                Ok(false) => self.member_lease = None,
                Err(e) => {
                    // Maybe expired meanwhile: the next round starts a new one
                    // (an old lease still alive just expires on its own).
                    self.member_lease = None;
                    return Err(err(e));
                }
            }
        }
        let member_lease = match self.member_lease {
            Some(id) => id,
            None => {
                let mut cc = c.clone();
                let g = self
                    .call("grant", async move { cc.lease_grant(ttl, None).await })
                    .await
                    .map_err(err)?;
                self.member_lease = Some(g.id());
                g.id()
            }
        };
        let value = serde_json::to_vec(own).expect("member serializes");
        let mut cc = c.clone();
        self.call("put", async move {
            cc.put(
                member_key,
                value,
                Some(PutOptions::new().with_lease(member_lease)),
            )
            .await
        })
        .await
        .map_err(err)?;

        // Give the key back when the role machinery demoted us after we led
        // as primary, or says we may not lead (eligibility withdrawn before
        // it promoted us). An elected replica still waiting for its promotion
        // keeps the key.
        if self.leader_lease.is_some() {
            if own.role == MemberRole::Primary {
                self.led_as_primary = true;
            } else if self.led_as_primary || !own.eligible {
                self.release_leader(&c).await;
            }
        }

        // Read the whole cluster prefix.
        let mut cc = c.clone();
        let prefix = keys::prefix(&self.cfg.name);
        let resp = self
            .call("get", async move {
                cc.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await
            .map_err(err)?;
        let Parsed {
            members,
            mut leader,
            stored_epoch,
            epoch_rev,
            maintenance,
        } = parse(&self.cfg.name, resp.kvs());

        match &leader {
            Some((l, lease)) if Some(*lease) == self.leader_lease && l.node == self.me => {
                // Ours and alive.
            }
            _ if self.clock.holding() => {
                // Someone else's key, or none: our lease is gone.
                self.fence(FenceReason::Lost).await;
            }
            Some((l, lease)) if l.node == self.me && l.epoch >= own.epoch => {
                // Handed to us by a switchover (`hand_over` on the old
                // primary): take over the renewals of its lease.
                let (epoch, id) = (l.epoch, *lease);
                self.adopt(&c, own, epoch, id).await.map_err(err)?;
            }
            _ => {}
        }
        if leader.is_none() && !self.clock.holding() {
            self.leader_lease = None;
            let settled = self.started.elapsed() >= self.cfg.ttl();
            let plan = decide::plan(&self.me, &members, stored_epoch, maintenance, settled);
            match plan {
                Plan::Run { epoch } => {
                    if self
                        .run_election(&c, own, epoch, epoch_rev)
                        .await
                        .map_err(err)?
                    {
                        leader = Some((
                            LeaderValue {
                                node: self.me.clone(),
                                epoch,
                            },
                            self.leader_lease.unwrap_or(0),
                        ));
                    }
                }
                Plan::Wait(s) => metrics::election(match s {
                    Standoff::Maintenance => "maintenance",
                    Standoff::NotEligible => "not_eligible",
                    Standoff::NotBest(_) => "not_best",
                    Standoff::PrimaryAlive(_) => "primary_alive",
                    Standoff::NotRegistered => "not_registered",
                    Standoff::Settling => "settling",
                }),
            }
        }

        let seen = leader.as_ref().map(|(l, _)| l.clone());
        if self.seen_leader.as_ref() != Some(&seen) {
            if self.seen_leader.is_some() {
                metrics::leader_changed();
            }
            self.seen_leader = Some(seen.clone());
            match &seen {
                Some(l) if l.node == self.me && self.clock.holding() => {}
                Some(l) => self.emit(Event::Leader {
                    node: l.node.clone(),
                    epoch: l.epoch,
                }),
                None => self.emit(Event::NoLeader),
            }
        }

        // Lease time left of the leader key, for status (best effort).
        let mut ttl_left = None;
        if let Some((_, lease)) = &leader {
            let (mut cc, id) = (c.clone(), *lease);
            if let Ok(r) = self
                .call("get", async move { cc.lease_time_to_live(id, None).await })
                .await
            {
                ttl_left = Some(r.ttl());
            }
        }
        let holding = self.clock.holding();
        metrics::is_leader(holding);
        self.snap.send_replace(ClusterSnapshot {
            reachable: true,
            leader: seen,
            leader_ttl_left_secs: ttl_left,
            stored_epoch,
            maintenance,
            members,
            holding,
            last_error: None,
        });
        Ok(())
    }

    /// The election transaction. True when this node now holds the key.
    async fn run_election(
        &mut self,
        c: &Client,
        own: &Member,
        epoch: u64,
        epoch_rev: i64,
    ) -> Result<bool, CallError> {
        let name = self.cfg.name.clone();
        let ttl = self.cfg.ttl_secs as i64;
        let start = Instant::now();
        let mut cc = c.clone();
        let lease = self
            .call("grant", async move { cc.lease_grant(ttl, None).await })
            .await?
            .id();
        let value = serde_json::to_vec(&LeaderValue {
            node: self.me.clone(),
            epoch,
        })
        .expect("leader serializes");
        let txn = Txn::new()
            .when([
                Compare::create_revision(keys::leader(&name), CompareOp::Equal, 0),
                Compare::create_revision(keys::maintenance(&name), CompareOp::Equal, 0),
                Compare::mod_revision(keys::epoch(&name), CompareOp::Equal, epoch_rev),
            ])
            .and_then([
                TxnOp::put(
                    keys::leader(&name),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(keys::epoch(&name), epoch.to_string(), None),
            ]);
        let mut cc = c.clone();
        let won = match self.call("txn", async move { cc.txn(txn).await }).await {
            Ok(r) => r.succeeded(),
            Err(e) => {
                self.revoke(c, lease).await;
                return Err(e);
            }
        };
        if !won {
            metrics::election("lost");
            self.revoke(c, lease).await;
            return Ok(false);
        }
        metrics::election("won");
        self.leader_lease = Some(lease);
        self.leader_epoch = epoch;
        self.led_as_primary = own.role == MemberRole::Primary;
        self.clock.confirmed(start);
        metrics::is_leader(true);
        tracing::info!(epoch, "coordinator: took the leader key");
        let ev = if own.role == MemberRole::Primary {
            Event::Holding { epoch }
        } else {
            Event::Elected { epoch }
        };
        self.emit(ev);
        Ok(true)
    }

    /// Takes over a leader key a switchover put under a lease for this node:
    /// renewing it is holding it (the fencing clock starts at the first
    /// confirmed renewal, as for a lease we granted).
    async fn adopt(
        &mut self,
        c: &Client,
        own: &Member,
        epoch: u64,
        lease: i64,
    ) -> Result<(), CallError> {
        let start = Instant::now();
        if !self.call("keepalive", keep_alive(c.clone(), lease)).await? {
            return Ok(());
        }
        self.leader_lease = Some(lease);
        self.leader_epoch = epoch;
        self.led_as_primary = own.role == MemberRole::Primary;
        self.clock.confirmed(start);
        metrics::election("won");
        metrics::is_leader(true);
        tracing::info!(
            epoch,
            "coordinator: took over the leader key handed to this node"
        );
        self.emit(if own.role == MemberRole::Primary {
            Event::Holding { epoch }
        } else {
            Event::Elected { epoch }
        });
        Ok(())
    }

    /// Switchover: hands the leader key held by this node to `to` in one
    /// transaction (if the key is still ours: then the key names `to` at
    /// epoch + 1, under a fresh lease `to` renews from then on, and the
    /// epoch key is bumped). This node stops holding at once; the caller has
    /// fenced its commits before. Returns the new epoch.
    async fn hand_over(&mut self, to: &str) -> Result<u64, String> {
        let err = |e: CallError| match e {
            CallError::Fenced => "fenced: this node no longer holds the leader key".to_string(),
            CallError::Etcd(e) => e,
        };
        let Some(old_lease) = self.leader_lease.filter(|_| self.clock.holding()) else {
            return Err("this node does not hold the leader key".into());
        };
        let c = self.connect().await?;
        let name = self.cfg.name.clone();
        let ttl = self.cfg.ttl_secs as i64;
        let epoch = self.leader_epoch + 1;
        let mut cc = c.clone();
        let lease = self
            .call("grant", async move { cc.lease_grant(ttl, None).await })
            .await
            .map_err(err)?
            .id();
        let mine = serde_json::to_vec(&LeaderValue {
            node: self.me.clone(),
            epoch: self.leader_epoch,
        })
        .expect("leader serializes");
        let theirs = serde_json::to_vec(&LeaderValue {
            node: to.to_string(),
            epoch,
        })
        .expect("leader serializes");
        let txn = Txn::new()
            .when([
                Compare::value(keys::leader(&name), CompareOp::Equal, mine),
                Compare::lease(keys::leader(&name), CompareOp::Equal, old_lease),
            ])
            .and_then([
                TxnOp::put(
                    keys::leader(&name),
                    theirs,
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(keys::epoch(&name), epoch.to_string(), None),
            ]);
        let mut cc = c.clone();
        let ok = match self.call("txn", async move { cc.txn(txn).await }).await {
            Ok(r) => r.succeeded(),
            Err(e) => {
                self.revoke(&c, lease).await;
                return Err(err(e));
            }
        };
        if !ok {
            self.revoke(&c, lease).await;
            return Err("the leader key changed meanwhile; not handed over".into());
        }
        // Ours no more: stop renewing; the old lease holds no key now.
        self.clock.clear();
        self.leader_lease = None;
        metrics::is_leader(false);
        self.snap.send_modify(|s| s.holding = false);
        self.revoke(&c, old_lease).await;
        tracing::info!(to, epoch, "coordinator: leader key handed over");
        Ok(epoch)
    }

    async fn revoke(&mut self, c: &Client, lease: i64) {
        let mut cc = c.clone();
        let _ = self
            .call("revoke", async move { cc.lease_revoke(lease).await })
            .await;
    }

    /// Give up the leader key (demoted, or shutting down).
    async fn release_leader(&mut self, c: &Client) {
        if let Some(id) = self.leader_lease.take() {
            self.clock.clear();
            metrics::is_leader(false);
            self.revoke(c, id).await;
            tracing::info!(
                epoch = self.leader_epoch,
                "coordinator: released the leader key"
            );
        }
    }

    async fn release_all(&mut self) {
        let Some(c) = self.client.clone() else { return };
        self.release_leader(&c).await;
        if let Some(id) = self.member_lease.take() {
            self.revoke(&c, id).await;
        }
    }
}

/// What `/<name>/` holds.
pub(super) struct Parsed {
    pub members: Vec<Member>,
    /// The leader value and the id of the lease it is under.
    pub leader: Option<(LeaderValue, i64)>,
    pub stored_epoch: u64,
    /// Mod revision of the epoch key (0: absent), for the election compare.
    pub epoch_rev: i64,
    pub maintenance: bool,
}

pub(super) fn parse(name: &str, kvs: &[etcd_client::KeyValue]) -> Parsed {
    let mut p = Parsed {
        members: Vec::new(),
        leader: None,
        stored_epoch: 0,
        epoch_rev: 0,
        maintenance: false,
    };
    let (members_prefix, leader_key, epoch_key, maint_key) = (
        keys::members(name),
        keys::leader(name),
        keys::epoch(name),
        keys::maintenance(name),
    );
    for kv in kvs {
        let k = String::from_utf8_lossy(kv.key());
        if k.starts_with(&members_prefix) {
            match serde_json::from_slice::<Member>(kv.value()) {
                Ok(m) => p.members.push(m),
                Err(e) => tracing::warn!(key = %k, error = %e, "coordinator: unreadable member"),
            }
        } else if k == leader_key {
            match serde_json::from_slice::<LeaderValue>(kv.value()) {
                Ok(l) => p.leader = Some((l, kv.lease())),
                Err(e) => tracing::warn!(error = %e, "coordinator: unreadable leader key"),
            }
        } else if k == epoch_key {
            p.stored_epoch = std::str::from_utf8(kv.value())
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            p.epoch_rev = kv.mod_revision();
        } else if k == maint_key {
            p.maintenance = true;
        }
    }
    p
}

/// One keep-alive exchange on a fresh stream (opening the stream sends one
/// request and waits for its answer): true when etcd renewed the lease, false
/// when it no longer exists. A fresh stream per call keeps a broken
/// connection from wedging later renewals.
async fn keep_alive(mut c: Client, id: i64) -> Result<bool, etcd_client::Error> {
    match c.lease_keep_alive(id).await {
        Ok(_) => Ok(true),
        Err(etcd_client::Error::LeaseKeepAliveError(m)) if m == "lease not found" => Ok(false),
        Err(e) => Err(e),
    }
}

pub(super) fn connect_options(cfg: &CoordinatorConfig) -> Result<ConnectOptions, String> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("coordinator: read {}: {e}", p.display()))
    };
    let wait = cfg.loop_wait();
    let mut o = ConnectOptions::new()
        .with_connect_timeout(wait)
        .with_timeout(wait)
        .with_keep_alive(wait, wait)
        .with_keep_alive_while_idle(true)
        // etcd auth tokens expire (--auth-token-ttl, 5 min by default).
        .with_auto_token_refresh(true);
    if let Some(t) = &cfg.tls {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&t.ca_file)?));
        if let Some(n) = &t.server_name {
            tls = tls.domain_name(n.clone());
        }
        if let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        o = o.with_tls(tls);
    }
    if let (Some(user), Some(pw)) = (&cfg.username, &cfg.password_file) {
        let pw = String::from_utf8(read(pw)?)
            .map_err(|_| format!("coordinator: {} is not UTF-8", pw.display()))?;
        o = o.with_user(user.clone(), pw.trim_end_matches(['\n', '\r']).to_string());
    }
    Ok(o)
}
