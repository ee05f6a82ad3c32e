//! The state machine of role changes: promote, demote, fence, follow,
//! detach, and the cluster **epoch** that fences stale primaries.
//!
//! I/O-free like `replication::sender`/`receiver`: [`RoleState`] decides,
//! the controller (`crate::rolectl`) moves bytes and starts/stops the role's
//! tasks. [`persist`] writes the state to `data_dir/role.json` (atomically,
//! fsynced) so an epoch never goes backwards across restarts.
//!
//! Epoch rules:
//! - every change of who is primary creates a new epoch (`promote`,
//!   `demote`, `detach` take `max(known) + 1`); a replica that hears of a
//!   newer epoch from its primary adopts it ([`RoleState::adopt`]);
//! - a node refuses a stream or a forwarded door session from a lower epoch
//!   ([`RoleState::check_peer`]): a primary fenced out by a newer one can
//!   feed nobody, and a door that lags behind is told to retry.
//! - `fenced` is the short state of a primary that stopped taking commits
//!   (a switchover in progress); it keeps the epoch.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod fence;
pub mod persist;
pub mod replayed;

/// A node's role as the state machine knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleKind {
    Primary,
    Replica,
    /// A primary that takes no new commits (switchover, demotion under way).
    Fenced,
    /// A former replica that left its cluster: an independent primary of a
    /// new cluster identity.
    Detached,
}

impl RoleKind {
    /// Serves writes.
    pub fn is_primary(self) -> bool {
        matches!(self, RoleKind::Primary | RoleKind::Detached)
    }
}

/// `promotion` in `[replication]`: `"never"` (a remote replica that must not
/// take over) or a priority (higher is preferred; default 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Promotion {
    Priority(u32),
    Never(NeverWord),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NeverWord {
    Never,
}

impl Default for Promotion {
    fn default() -> Self {
        Promotion::Priority(100)
    }
}

impl Promotion {
    pub fn eligible(self) -> bool {
        matches!(self, Promotion::Priority(_))
    }
    /// As carried in the replication Hello: None = never.
    pub fn priority(self) -> Option<u32> {
        match self {
            Promotion::Priority(p) => Some(p),
            Promotion::Never(_) => None,
        }
    }
}

/// One entry of the role-change history (shown in `/status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub epoch: u64,
    pub at_unix: f64,
    pub role: RoleKind,
    pub why: String,
    /// The backend's last tid when the change was made (hex), if known: at
    /// a promotion, what a diverged old primary rewinds to.
    #[serde(default)]
    pub last_tid: Option<String>,
}

/// How many history entries are kept.
pub const HISTORY_LEN: usize = 32;

/// The persisted role state of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleState {
    /// The cluster identity this node belongs to (changes on detach).
    pub cluster: String,
    pub epoch: u64,
    pub role: RoleKind,
    /// The node this replica follows, when chosen at run time (None: the
    /// configured `replication.upstream`).
    #[serde(default)]
    pub following: Option<String>,
    #[serde(default)]
    pub history: Vec<Change>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("this node is {0:?}; {1}")]
    WrongRole(RoleKind, &'static str),
    #[error("epoch {peer} is older than this node's epoch {mine}")]
    StaleEpoch { peer: u64, mine: u64 },
    #[error("node {0} may not be promoted (promotion = \"never\")")]
    Ineligible(String),
    #[error("node {0} is not a connected replica of this primary")]
    UnknownTarget(String),
    #[error("a node cannot switch over to itself")]
    SelfTarget,
}

impl RoleState {
    /// The state of a node that has never changed role: what its config
    /// says, epoch 0.
    pub fn initial(cluster: &str, primary: bool) -> Self {
        RoleState {
            cluster: cluster.to_string(),
            epoch: 0,
            role: if primary {
                RoleKind::Primary
            } else {
                RoleKind::Replica
            },
            following: None,
            history: Vec::new(),
        }
    }

    fn record(&mut self, role: RoleKind, at_unix: f64, why: String) {
        self.role = role;
        self.history.push(Change {
            epoch: self.epoch,
            at_unix,
            role,
            why,
            last_tid: None,
        });
        if self.history.len() > HISTORY_LEN {
            let cut = self.history.len() - HISTORY_LEN;
            self.history.drain(..cut);
        }
    }

    /// A replica (or a fenced primary) becomes the primary at a new epoch
    /// (`at_least`: the newest epoch known elsewhere, e.g. the one the
    /// demoting primary announced). Returns the new epoch.
    pub fn promote(&mut self, at_least: u64, at_unix: f64, why: &str) -> Result<u64, RoleError> {
        match self.role {
            RoleKind::Replica | RoleKind::Fenced => {}
            r => return Err(RoleError::WrongRole(r, "only a replica can be promoted")),
        }
        self.epoch = self.epoch.max(at_least.saturating_sub(1)) + 1;
        self.following = None;
        self.record(RoleKind::Primary, at_unix, why.to_string());
        Ok(self.epoch)
    }

    /// The primary stops taking commits (first step of demote/switchover).
    /// Idempotent.
    pub fn fence(&mut self, at_unix: f64, why: &str) -> Result<(), RoleError> {
        match self.role {
            RoleKind::Primary => {
                self.record(RoleKind::Fenced, at_unix, why.to_string());
                Ok(())
            }
            RoleKind::Fenced => Ok(()),
            r => Err(RoleError::WrongRole(r, "only a primary can be fenced")),
        }
    }

    /// A fenced primary gets its commits back (a switchover that failed
    /// before anything was handed over).
    pub fn unfence(&mut self, at_unix: f64, why: &str) -> Result<(), RoleError> {
        match self.role {
            RoleKind::Fenced => {
                self.record(RoleKind::Primary, at_unix, why.to_string());
                Ok(())
            }
            r => Err(RoleError::WrongRole(r, "only a fenced primary can resume")),
        }
    }

    /// A primary (fenced or not) becomes a replica of `follow` at a new
    /// epoch, which it returns: the new primary must be promoted at it.
    pub fn demote(&mut self, follow: &str, at_unix: f64, why: &str) -> Result<u64, RoleError> {
        match self.role {
            RoleKind::Primary | RoleKind::Fenced => {}
            r => return Err(RoleError::WrongRole(r, "only a primary can be demoted")),
        }
        self.epoch += 1;
        self.following = Some(follow.to_string());
        self.record(RoleKind::Replica, at_unix, why.to_string());
        Ok(self.epoch)
    }

    /// A replica is told to follow another primary at `epoch`.
    pub fn follow(
        &mut self,
        node: &str,
        epoch: u64,
        at_unix: f64,
        why: &str,
    ) -> Result<(), RoleError> {
        if self.role != RoleKind::Replica {
            return Err(RoleError::WrongRole(self.role, "only a replica follows"));
        }
        self.check_peer(Some(epoch))?;
        self.epoch = epoch;
        self.following = Some(node.to_string());
        self.record(RoleKind::Replica, at_unix, why.to_string());
        Ok(())
    }

    /// A replica leaves its cluster for good: an independent primary of the
    /// cluster identity `new_cluster`, at a new epoch.
    pub fn detach(&mut self, new_cluster: &str, at_unix: f64, why: &str) -> Result<u64, RoleError> {
        if self.role != RoleKind::Replica {
            return Err(RoleError::WrongRole(
                self.role,
                "only a replica can be detached",
            ));
        }
        self.cluster = new_cluster.to_string();
        self.epoch += 1;
        self.following = None;
        self.record(RoleKind::Detached, at_unix, why.to_string());
        Ok(self.epoch)
    }

    /// Notes the backend's last tid on the newest history entry.
    pub fn note_last_tid(&mut self, tid_hex: String) {
        if let Some(c) = self.history.last_mut() {
            c.last_tid = Some(tid_hex);
        }
    }

    /// The fencing token: a peer's epoch (None: an older build that sends
    /// none, accepted) must not be lower than ours.
    pub fn check_peer(&self, peer: Option<u64>) -> Result<(), RoleError> {
        match peer {
            Some(p) if p < self.epoch => Err(RoleError::StaleEpoch {
                peer: p,
                mine: self.epoch,
            }),
            _ => Ok(()),
        }
    }

    /// A replica learns its primary's (newer) epoch. True if it changed
    /// (the state should be persisted).
    pub fn adopt(&mut self, peer: u64) -> bool {
        if self.role == RoleKind::Replica && peer > self.epoch {
            self.epoch = peer;
            true
        } else {
            false
        }
    }

    /// Whether a switchover from this node to `target` may start.
    pub fn check_switchover(
        &self,
        me: &str,
        target: &str,
        target_promotion: Option<Promotion>,
    ) -> Result<(), RoleError> {
        if !self.role.is_primary() && self.role != RoleKind::Fenced {
            return Err(RoleError::WrongRole(
                self.role,
                "switch over from the primary",
            ));
        }
        if target == me {
            return Err(RoleError::SelfTarget);
        }
        match target_promotion {
            None => Err(RoleError::UnknownTarget(target.to_string())),
            Some(p) if !p.eligible() => Err(RoleError::Ineligible(target.to_string())),
            Some(_) => Ok(()),
        }
    }
}

/// The most eligible candidate for promotion among `(node, promotion)`:
/// the highest priority, ties broken by name. None if nobody may be
/// promoted. (The rule the coming automatic failover uses too.)
pub fn best_candidate<'a>(
    candidates: impl IntoIterator<Item = (&'a str, Promotion)>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter_map(|(n, p)| p.priority().map(|pr| (pr, n)))
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(a.1)))
        .map(|(_, n)| n)
}

/// Where the state file of a node lives.
pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join("role.json")
}

/// A fresh cluster identity for a detached node: the old name, this node's
/// name and the time, so two detaches never collide.
pub fn detached_cluster_name(old: &str, node: &str, unix_nanos: u128) -> String {
    format!("{old}~{node}-{unix_nanos:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promote_bumps_epoch_and_records() {
        let mut s = RoleState::initial("c", false);
        assert_eq!(s.promote(0, 1.0, "operator"), Ok(1));
        assert_eq!(s.role, RoleKind::Primary);
        assert_eq!(s.history.len(), 1);
        assert_eq!(s.history[0].epoch, 1);
        assert_eq!(s.history[0].why, "operator");
        // A primary cannot be promoted again.
        assert!(matches!(
            s.promote(0, 2.0, "again"),
            Err(RoleError::WrongRole(RoleKind::Primary, _))
        ));
    }

    #[test]
    fn promote_takes_at_least_the_announced_epoch() {
        let mut s = RoleState::initial("c", false);
        assert_eq!(s.promote(7, 1.0, "switchover"), Ok(7));
        let mut t = RoleState::initial("c", false);
        t.epoch = 9;
        assert_eq!(t.promote(7, 1.0, "switchover"), Ok(10));
    }

    #[test]
    fn switchover_sequence() {
        let mut a = RoleState::initial("c", true);
        let mut b = RoleState::initial("c", false);
        a.fence(1.0, "switchover to b").unwrap();
        assert_eq!(a.role, RoleKind::Fenced);
        assert_eq!(a.epoch, 0, "fencing keeps the epoch");
        let e = a.demote("b", 2.0, "switchover to b").unwrap();
        assert_eq!(e, 1);
        assert_eq!(a.following.as_deref(), Some("b"));
        assert_eq!(b.promote(e, 2.0, "switchover from a"), Ok(1));
        // The old primary, now a replica at the same epoch, may follow b.
        assert_eq!(a.check_peer(Some(b.epoch)), Ok(()));
        // And back.
        b.fence(3.0, "back").unwrap();
        let e2 = b.demote("a", 3.0, "back").unwrap();
        assert_eq!(e2, 2);
        assert_eq!(a.promote(e2, 3.0, "back"), Ok(2));
        assert_eq!(
            a.history.iter().map(|c| c.role).collect::<Vec<_>>(),
            vec![RoleKind::Fenced, RoleKind::Replica, RoleKind::Primary]
        );
    }

    #[test]
    fn lower_epoch_refused_older_build_accepted() {
        let mut s = RoleState::initial("c", false);
        s.epoch = 3;
        assert_eq!(
            s.check_peer(Some(2)),
            Err(RoleError::StaleEpoch { peer: 2, mine: 3 })
        );
        assert_eq!(s.check_peer(Some(3)), Ok(()));
        assert_eq!(s.check_peer(Some(4)), Ok(()));
        assert_eq!(s.check_peer(None), Ok(()));
        assert!(s
            .follow("x", 2, 1.0, "stale announcement")
            .unwrap_err()
            .to_string()
            .contains("older"));
    }

    #[test]
    fn adopt_only_raises_and_only_on_replicas() {
        let mut s = RoleState::initial("c", false);
        assert!(s.adopt(4));
        assert_eq!(s.epoch, 4);
        assert!(!s.adopt(3));
        assert_eq!(s.epoch, 4);
        let mut p = RoleState::initial("c", true);
        assert!(!p.adopt(9), "a primary never adopts: it refuses");
        assert_eq!(p.epoch, 0);
    }

    #[test]
    fn unfence_restores_primary() {
        let mut a = RoleState::initial("c", true);
        a.fence(1.0, "x").unwrap();
        a.fence(1.5, "x").unwrap();
        assert_eq!(a.history.len(), 1, "fence is idempotent");
        a.unfence(2.0, "target never caught up").unwrap();
        assert_eq!(a.role, RoleKind::Primary);
        assert!(a.unfence(3.0, "x").is_err());
    }

    #[test]
    fn detach_changes_identity() {
        let mut r = RoleState::initial("prod", false);
        r.epoch = 5;
        let name = detached_cluster_name("prod", "r1", 0xabc);
        assert_eq!(name, "prod~r1-abc");
        assert_eq!(r.detach(&name, 1.0, "clone for staging"), Ok(6));
        assert_eq!(r.role, RoleKind::Detached);
        assert!(r.role.is_primary());
        assert_eq!(r.cluster, name);
        assert!(r.detach("again", 2.0, "x").is_err());
        assert!(
            r.demote("p", 2.0, "x").is_err(),
            "a detached node is not demoted"
        );
        let mut p = RoleState::initial("prod", true);
        assert!(
            p.detach("x", 1.0, "x").is_err(),
            "a primary is not detached"
        );
    }

    #[test]
    fn switchover_target_rules() {
        let a = RoleState::initial("c", true);
        assert_eq!(
            a.check_switchover("a", "b", Some(Promotion::Priority(1))),
            Ok(())
        );
        assert_eq!(
            a.check_switchover("a", "b", Some(Promotion::Never(NeverWord::Never))),
            Err(RoleError::Ineligible("b".into()))
        );
        assert_eq!(
            a.check_switchover("a", "b", None),
            Err(RoleError::UnknownTarget("b".into()))
        );
        assert_eq!(
            a.check_switchover("a", "a", Some(Promotion::Priority(1))),
            Err(RoleError::SelfTarget)
        );
        let r = RoleState::initial("c", false);
        assert!(r
            .check_switchover("r", "b", Some(Promotion::Priority(1)))
            .is_err());
    }

    #[test]
    fn best_candidate_by_priority_never_excluded() {
        let never = Promotion::Never(NeverWord::Never);
        let c = vec![
            ("remote", never),
            ("b", Promotion::Priority(50)),
            ("c", Promotion::Priority(80)),
            ("a", Promotion::Priority(80)),
        ];
        assert_eq!(best_candidate(c), Some("a"));
        assert_eq!(best_candidate(vec![("remote", never)]), None);
    }

    #[test]
    fn history_is_bounded() {
        let mut a = RoleState::initial("c", true);
        for i in 0..100 {
            a.fence(i as f64, "x").unwrap();
            a.unfence(i as f64, "y").unwrap();
        }
        assert_eq!(a.history.len(), HISTORY_LEN);
        assert_eq!(a.history.last().unwrap().at_unix, 99.0);
    }

    #[test]
    fn promotion_parses_never_or_priority() {
        #[derive(Deserialize)]
        struct T {
            promotion: Promotion,
        }
        let t: T = toml::from_str("promotion = \"never\"").unwrap();
        assert!(!t.promotion.eligible());
        let t: T = toml::from_str("promotion = 7").unwrap();
        assert_eq!(t.promotion, Promotion::Priority(7));
        assert!(toml::from_str::<T>("promotion = \"sometimes\"").is_err());
    }
}
