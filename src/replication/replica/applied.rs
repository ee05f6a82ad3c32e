//! The replica's record of applied transactions and the oids each changed.
//!
//! Owner: the applier (the only writer). Readers: replica client sessions,
//! which use it to turn the backend's empty `invalidateTransaction(tid, [])`
//! (ZEO records no oids for `restorea`) into the real oid list, and to answer
//! `getInvalidations` for reconnecting clients (invariant 4).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use crate::replication::txn::{Oid, Tid};

pub struct AppliedLog {
    inner: Mutex<Inner>,
    capacity: usize,
}

struct Inner {
    /// The log holds every transaction after this tid (exclusive).
    complete_after: Option<Tid>,
    entries: VecDeque<(Tid, Vec<Oid>)>,
}

/// Answer to a client's `getInvalidations(tid)`.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalidations {
    /// The client is current: nothing to invalidate.
    UpToDate,
    /// Everything after the client's tid: the newest tid and the union of oids.
    Since(Tid, Vec<Oid>),
    /// The log does not reach back far enough; the client must drop its cache.
    TooOld,
}

impl AppliedLog {
    pub fn new(capacity: usize) -> Self {
        AppliedLog {
            inner: Mutex::new(Inner {
                complete_after: None,
                entries: VecDeque::new(),
            }),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Starts (or restarts) the log at the backend's current last tid: from
    /// here on every applied transaction is recorded.
    pub fn start_at(&self, last: Tid) {
        let mut g = self.lock();
        if g.complete_after.is_none() {
            g.complete_after = Some(last);
        }
    }

    /// Records an applied transaction. Called before its `tpc_finish` is sent,
    /// so the entry exists when the backend broadcasts the invalidation.
    pub fn record(&self, tid: Tid, oids: Vec<Oid>) {
        let mut g = self.lock();
        if g.complete_after.is_none() {
            g.complete_after = Some([0; 8]);
        }
        if let Some((last, _)) = g.entries.back() {
            if *last >= tid {
                return;
            }
        }
        g.entries.push_back((tid, oids));
        while g.entries.len() > self.capacity {
            if let Some((t, _)) = g.entries.pop_front() {
                g.complete_after = Some(t);
            }
        }
    }

    /// The oids of an applied transaction, if it is in the log.
    pub fn oids_of(&self, tid: &Tid) -> Option<Vec<Oid>> {
        let g = self.lock();
        g.entries
            .iter()
            .rev()
            .find(|(t, _)| t == tid)
            .map(|(_, o)| o.clone())
    }

    /// What a client whose cache is current as of `tid` must invalidate.
    pub fn since(&self, tid: &Tid) -> Invalidations {
        let g = self.lock();
        let Some(after) = g.complete_after else {
            return Invalidations::TooOld;
        };
        if *tid < after {
            return Invalidations::TooOld;
        }
        let newer: Vec<&(Tid, Vec<Oid>)> = g.entries.iter().filter(|(t, _)| t > tid).collect();
        let Some((newest, _)) = newer.last() else {
            return Invalidations::UpToDate;
        };
        let mut seen = HashSet::new();
        let mut oids = Vec::new();
        for (_, os) in &newer {
            for o in os {
                if seen.insert(*o) {
                    oids.push(*o);
                }
            }
        }
        Invalidations::Since(*newest, oids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u64) -> Tid {
        n.to_be_bytes()
    }

    #[test]
    fn since_unions_oids_after_the_client_tid() {
        let log = AppliedLog::new(10);
        log.start_at(t(10));
        log.record(t(11), vec![t(1), t(2)]);
        log.record(t(12), vec![t(2), t(3)]);
        assert_eq!(log.since(&t(12)), Invalidations::UpToDate);
        assert_eq!(
            log.since(&t(11)),
            Invalidations::Since(t(12), vec![t(2), t(3)])
        );
        assert_eq!(
            log.since(&t(10)),
            Invalidations::Since(t(12), vec![t(1), t(2), t(3)])
        );
        assert_eq!(log.since(&t(9)), Invalidations::TooOld);
        assert_eq!(log.oids_of(&t(11)), Some(vec![t(1), t(2)]));
        assert_eq!(log.oids_of(&t(13)), None);
    }

    #[test]
    fn overflow_moves_the_horizon() {
        let log = AppliedLog::new(2);
        log.start_at(t(0));
        for i in 1..=5 {
            log.record(t(i), vec![t(100 + i)]);
        }
        assert_eq!(log.since(&t(2)), Invalidations::TooOld);
        assert_eq!(
            log.since(&t(3)),
            Invalidations::Since(t(5), vec![t(104), t(105)])
        );
    }

    #[test]
    fn unstarted_log_says_too_old() {
        let log = AppliedLog::new(2);
        assert_eq!(log.since(&t(3)), Invalidations::TooOld);
    }
}
