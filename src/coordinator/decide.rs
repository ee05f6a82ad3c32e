//! The coordinator's decisions, without I/O: who is the best candidate, what
//! epoch a winner takes, and when a leader must fence itself. The etcd task
//! (`super::etcd`) only moves values between etcd and these functions, so
//! every rule here is unit-tested with plain values and a fake clock.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// A node's role as published in its member key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    Primary,
    Replica,
}

/// What a node publishes under `/<name>/members/<node>` (JSON), and what the
/// role machinery hands the coordinator through its `watch` (the `name` is
/// filled in by the coordinator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub role: MemberRole,
    /// host:port of the ZEO client listener other nodes can reach.
    #[serde(default)]
    pub client: Option<String>,
    /// host:port of the replication (TLS) listener.
    #[serde(default)]
    pub replication: Option<String>,
    /// `promotion != "never"`: may be elected.
    pub eligible: bool,
    /// Among equally caught-up candidates, the higher priority wins.
    #[serde(default)]
    pub priority: u32,
    /// Newest tid committed to this node's backend (a replica: applied).
    #[serde(default)]
    pub applied_tid: u64,
    /// Newest tid this node acknowledged to its primary (semi-sync; with
    /// `ack_level = "received"` it can be ahead of `applied_tid`, the spool
    /// holding the rest). A primary reports its own last tid.
    #[serde(default)]
    pub acknowledged_tid: u64,
    /// The cluster epoch this node is in.
    #[serde(default)]
    pub epoch: u64,
}

impl Member {
    /// The tid a promotion would start from without losing anything this node
    /// promised: what it applied or acknowledged, whichever is newer.
    pub fn durable_tid(&self) -> u64 {
        self.applied_tid.max(self.acknowledged_tid)
    }
}

/// The value of `/<name>/leader`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderValue {
    pub node: String,
    pub epoch: u64,
}

/// Order of candidates: newest durable tid, then higher priority, then the
/// smaller name (a deterministic tie-break every node computes alike).
fn better(a: &Member, b: &Member) -> bool {
    (a.durable_tid(), a.priority, std::cmp::Reverse(&a.name))
        > (b.durable_tid(), b.priority, std::cmp::Reverse(&b.name))
}

/// The best eligible candidate among the live members (those whose member key
/// exists, i.e. whose lease is alive), or None when nobody may be elected.
pub fn best_candidate(live: &[Member]) -> Option<&Member> {
    live.iter()
        .filter(|m| m.eligible)
        .fold(None, |best: Option<&Member>, m| match best {
            Some(b) if !better(m, b) => Some(b),
            _ => Some(m),
        })
}

/// Why a node does not run for leader this round (also the
/// `zrelay_coordinator_elections_total{outcome}` label when it was close).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standoff {
    /// `/<name>/maintenance` exists: automatic failover is paused.
    Maintenance,
    /// `promotion = "never"` (or not yet known to be eligible).
    NotEligible,
    /// Another live member is better (it should win).
    NotBest(String),
    /// A live member still reports itself primary: it should retake the key
    /// (start-up, or an etcd hiccup), so a replica waits instead of racing it.
    PrimaryAlive(String),
    /// Our own record is not among the live members yet.
    NotRegistered,
    /// A replica that started less than one ttl ago: a live primary may not
    /// have registered yet (cluster start-up), so it does not race it.
    Settling,
}

/// What a node with no leader key in sight should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Try the election transaction for this epoch.
    Run {
        epoch: u64,
    },
    Wait(Standoff),
}

/// The election decision for `me` when the leader key is absent.
///
/// `stored_epoch` is `/<name>/epoch` (0 when absent): the newest epoch any
/// leader ever took. A replica that wins takes one more than everything it
/// has seen; a primary retaking the key keeps its epoch, but only if nobody
/// took a newer one meanwhile (then it must follow, not lead).
///
/// `settled`: this node's coordinator has been running for at least one ttl
/// (a primary alive at that time has registered by then).
pub fn plan(
    me: &str,
    live: &[Member],
    stored_epoch: u64,
    maintenance: bool,
    settled: bool,
) -> Plan {
    if maintenance {
        return Plan::Wait(Standoff::Maintenance);
    }
    let Some(own) = live.iter().find(|m| m.name == me) else {
        return Plan::Wait(Standoff::NotRegistered);
    };
    let newest = live
        .iter()
        .map(|m| m.epoch)
        .max()
        .unwrap_or(0)
        .max(stored_epoch);
    if own.role == MemberRole::Primary {
        // A primary (re)acquiring: no epoch change, and never over a newer one.
        return if own.epoch >= newest {
            Plan::Run { epoch: own.epoch }
        } else {
            Plan::Wait(Standoff::NotBest(format!("epoch {newest} is newer")))
        };
    }
    if !own.eligible {
        return Plan::Wait(Standoff::NotEligible);
    }
    if !settled {
        return Plan::Wait(Standoff::Settling);
    }
    if let Some(p) = live
        .iter()
        .find(|m| m.name != me && m.role == MemberRole::Primary && m.epoch >= own.epoch)
    {
        return Plan::Wait(Standoff::PrimaryAlive(p.name.clone()));
    }
    match best_candidate(live) {
        Some(b) if b.name == me => Plan::Run { epoch: newest + 1 },
        Some(b) => Plan::Wait(Standoff::NotBest(b.name.clone())),
        None => Plan::Wait(Standoff::NotEligible),
    }
}

/// The leader's self-fencing clock (see the module doc of `super` for the
/// timing argument).
///
/// A renewal *attempt* starts at `t`; when etcd confirms it, the lease in etcd
/// lasts at least until `t + ttl` (etcd restarts the TTL when it processes
/// the request, which is after we sent it). So the lease is certainly alive
/// until `t + ttl`, and we stop being primary at `t + ttl - margin`.
#[derive(Debug, Clone)]
pub struct FenceClock {
    ttl: Duration,
    margin: Duration,
    /// Start of the newest attempt that etcd confirmed.
    confirmed_start: Option<Instant>,
}

impl FenceClock {
    pub fn new(ttl: Duration, margin: Duration) -> Self {
        assert!(margin < ttl, "fencing margin must be shorter than the ttl");
        Self {
            ttl,
            margin,
            confirmed_start: None,
        }
    }

    /// An attempt (grant or keep-alive) that started at `start` succeeded.
    /// Out-of-order confirmations never move the deadline back.
    pub fn confirmed(&mut self, start: Instant) {
        if self.confirmed_start.map_or(true, |s| start > s) {
            self.confirmed_start = Some(start);
        }
    }

    /// We no longer hold the key (released, lost, or fenced).
    pub fn clear(&mut self) {
        self.confirmed_start = None;
    }

    pub fn holding(&self) -> bool {
        self.confirmed_start.is_some()
    }

    /// When this node must have stopped accepting commits: last confirmed
    /// attempt start + ttl − margin. None when not holding.
    pub fn fence_deadline(&self) -> Option<Instant> {
        self.confirmed_start.map(|s| s + self.ttl - self.margin)
    }

    /// The earliest moment etcd may expire the lease (for status): start + ttl.
    pub fn lease_floor(&self) -> Option<Instant> {
        self.confirmed_start.map(|s| s + self.ttl)
    }

    /// True once `now` reached the fencing deadline.
    pub fn must_fence(&self, now: Instant) -> bool {
        self.fence_deadline().is_some_and(|d| now >= d)
    }

    /// Time since the last confirmed attempt started (the metric).
    pub fn since_confirmed(&self, now: Instant) -> Option<Duration> {
        self.confirmed_start
            .map(|s| now.saturating_duration_since(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, role: MemberRole, eligible: bool, prio: u32, tid: u64, epoch: u64) -> Member {
        Member {
            name: name.into(),
            role,
            client: None,
            replication: None,
            eligible,
            priority: prio,
            applied_tid: tid,
            acknowledged_tid: 0,
            epoch,
        }
    }
    use MemberRole::{Primary, Replica};

    #[test]
    fn newest_tid_then_priority_then_name() {
        let a = m("a", Replica, true, 0, 10, 1);
        let b = m("b", Replica, true, 5, 9, 1);
        let c = m("c", Replica, true, 0, 10, 1);
        assert_eq!(
            best_candidate(&[b.clone(), c.clone(), a.clone()])
                .unwrap()
                .name,
            "a"
        );
        let c5 = m("c", Replica, true, 5, 10, 1);
        assert_eq!(
            best_candidate(&[a.clone(), c5, b.clone()]).unwrap().name,
            "c"
        );
        assert_eq!(best_candidate(std::slice::from_ref(&b)).unwrap().name, "b");
        assert!(best_candidate(&[]).is_none());
    }

    #[test]
    fn acknowledged_counts_as_durable() {
        let mut a = m("a", Replica, true, 0, 10, 1);
        a.acknowledged_tid = 12;
        let b = m("b", Replica, true, 0, 11, 1);
        assert_eq!(best_candidate(&[b, a]).unwrap().name, "a");
    }

    #[test]
    fn never_is_never_elected_even_when_most_caught_up() {
        let far = m("far", Replica, false, 9, 100, 1);
        let near = m("near", Replica, true, 0, 50, 1);
        let live = [far.clone(), near];
        assert_eq!(best_candidate(&live).unwrap().name, "near");
        assert_eq!(
            plan("far", &live, 1, false, true),
            Plan::Wait(Standoff::NotEligible)
        );
        assert_eq!(plan("near", &live, 1, false, true), Plan::Run { epoch: 2 });
        assert_eq!(best_candidate(&[far]), None);
    }

    #[test]
    fn plan_rules() {
        let a = m("a", Replica, true, 0, 10, 3);
        let b = m("b", Replica, true, 0, 9, 3);
        let live = [a.clone(), b.clone()];
        assert_eq!(plan("a", &live, 3, false, true), Plan::Run { epoch: 4 });
        assert_eq!(
            plan("b", &live, 3, false, true),
            Plan::Wait(Standoff::NotBest("a".into()))
        );
        // the stored epoch wins over older member epochs
        assert_eq!(plan("a", &live, 7, false, true), Plan::Run { epoch: 8 });
        assert_eq!(
            plan("a", &live, 3, true, true),
            Plan::Wait(Standoff::Maintenance)
        );
        assert_eq!(
            plan("zz", &live, 3, false, true),
            Plan::Wait(Standoff::NotRegistered)
        );
        assert_eq!(
            plan("a", &live, 3, false, false),
            Plan::Wait(Standoff::Settling)
        );
        // a live primary retakes; replicas wait for it
        let p = m("p", Primary, true, 0, 10, 3);
        let live = [a.clone(), b, p];
        assert_eq!(plan("p", &live, 3, false, true), Plan::Run { epoch: 3 });
        assert_eq!(
            plan("a", &live, 3, false, true),
            Plan::Wait(Standoff::PrimaryAlive("p".into()))
        );
        // a stale primary (someone took a newer epoch) must not retake
        assert!(matches!(plan("p", &live, 4, false, true), Plan::Wait(_)));
        // ... and replicas no longer wait for it
        let stale = m("p", Primary, true, 0, 10, 3);
        let a4 = m("a", Replica, true, 0, 10, 4);
        assert_eq!(
            plan("a", &[a4, stale], 4, false, true),
            Plan::Run { epoch: 5 }
        );
    }

    #[test]
    fn fence_deadline_is_before_the_lease_can_expire() {
        let ttl = Duration::from_secs(10);
        let margin = Duration::from_secs(2);
        let mut c = FenceClock::new(ttl, margin);
        assert!(!c.holding() && !c.must_fence(Instant::now()));
        let t0 = Instant::now();
        c.confirmed(t0);
        assert_eq!(c.fence_deadline(), Some(t0 + Duration::from_secs(8)));
        assert!(c.fence_deadline() < c.lease_floor());
        let t1 = t0 + Duration::from_secs(5);
        // a stale (earlier) confirmation arriving late does not move it back
        c.confirmed(t0);
        c.confirmed(t1);
        c.confirmed(t0);
        assert_eq!(c.fence_deadline(), Some(t1 + Duration::from_secs(8)));
        assert!(!c.must_fence(t1 + Duration::from_millis(7999)));
        assert!(c.must_fence(t1 + Duration::from_secs(8)));
        assert_eq!(
            c.since_confirmed(t1 + Duration::from_secs(3)),
            Some(Duration::from_secs(3))
        );
        c.clear();
        assert!(!c.must_fence(t1 + Duration::from_secs(100)));
    }
}
