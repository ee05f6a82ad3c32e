//! Resource bounds shared by all client sessions: the global budget of
//! bytes buffered for client messages, and the per-peer-address connection
//! limit.
//!
//! Every session reads into a small buffer of its own that costs nothing
//! from the budget ([`FREE_BYTES`]): a client sending ordinary messages never
//! waits. Only a session holding more than that (a large message in
//! progress, possibly a hostile one announcing hundreds of megabytes and
//! trickling it) draws from the budget, in steps of [`STEP_BYTES`]. When the
//! budget is exhausted such a session stops reading its client
//! (backpressure: TCP flow control pushes back) and, if it cannot get budget
//! within `buffer_wait_ms`, is closed with a logged reason. It never takes
//! the process down and never starves the small-message sessions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics as m;

/// Bytes a session may buffer without drawing from the budget.
pub const FREE_BYTES: usize = 256 * 1024;
/// Granularity of budget draws (fewer semaphore operations per big message).
pub const STEP_BYTES: usize = 1024 * 1024;

/// The global budget of buffered client bytes.
#[derive(Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total: usize,
}

impl Budget {
    pub fn new(total: usize) -> Arc<Budget> {
        Arc::new(Budget {
            sem: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            total,
        })
    }

    pub fn in_use(&self) -> usize {
        self.total.saturating_sub(self.sem.available_permits())
    }

    fn report(&self) {
        m::client_buffered_bytes(self.in_use());
    }
}

/// What one session holds of the budget.
pub struct Charge {
    budget: Arc<Budget>,
    held: Option<OwnedSemaphorePermit>,
}

/// The session needs `bytes` more than it holds; it must wait for them.
#[derive(Debug, Clone, Copy)]
pub struct Shortfall(pub u32);

impl Charge {
    pub fn new(budget: Arc<Budget>) -> Charge {
        Charge { budget, held: None }
    }

    pub fn held(&self) -> usize {
        self.held.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Adjusts the charge for a session about to hold up to `bytes`
    /// buffered: releases what it no longer needs, takes more if it can.
    /// `Err` when the budget cannot cover it now.
    pub fn fit(&mut self, bytes: usize) -> Result<(), Shortfall> {
        let need = bytes.saturating_sub(FREE_BYTES).div_ceil(STEP_BYTES) * STEP_BYTES;
        let held = self.held();
        if need == held {
            return Ok(());
        }
        if need < held {
            if need == 0 {
                self.held = None;
            } else if let Some(p) = self.held.as_mut() {
                drop(p.split(held - need));
            }
            self.budget.report();
            return Ok(());
        }
        let more = u32::try_from(need - held).unwrap_or(u32::MAX);
        match self.budget.sem.clone().try_acquire_many_owned(more) {
            Ok(p) => {
                self.add(p);
                Ok(())
            }
            Err(_) => Err(Shortfall(more)),
        }
    }

    /// Waits until the budget can give `s` (FIFO among waiting sessions).
    pub async fn wait(&mut self, s: Shortfall) {
        if let Ok(p) = self.budget.sem.clone().acquire_many_owned(s.0).await {
            self.add(p);
        }
    }

    fn add(&mut self, p: OwnedSemaphorePermit) {
        match self.held.as_mut() {
            Some(h) => h.merge(p),
            None => self.held = Some(p),
        }
        self.budget.report();
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.held.take().is_some() {
            self.budget.report();
        }
    }
}

/// Connections open per peer IP address.
#[derive(Debug)]
pub struct PeerLimit {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
    last_log: Mutex<Option<Instant>>,
}

/// One admitted connection; counts against its peer until dropped.
pub struct PeerSlot {
    limit: Arc<PeerLimit>,
    ip: IpAddr,
}

impl PeerLimit {
    pub fn new(max: usize) -> Arc<PeerLimit> {
        Arc::new(PeerLimit {
            max,
            open: Mutex::new(HashMap::new()),
            last_log: Mutex::new(None),
        })
    }

    /// A slot for a new connection from `ip`, or `None` if it already has
    /// `max` open.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            limit: self.clone(),
            ip,
        })
    }

    /// Whether a refusal should be logged now: at most one line per second,
    /// so a connection flood cannot flood the log too.
    pub fn should_log(&self) -> bool {
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charge_follows_the_buffer() {
        let budget = Budget::new(4 * STEP_BYTES);
        let mut a = Charge::new(budget.clone());
        let mut b = Charge::new(budget.clone());
        a.fit(FREE_BYTES).unwrap();
        assert_eq!(a.held(), 0);
        a.fit(FREE_BYTES + 1).unwrap();
        assert_eq!(a.held(), STEP_BYTES);
        a.fit(FREE_BYTES + 3 * STEP_BYTES).unwrap();
        assert_eq!(budget.in_use(), 3 * STEP_BYTES);
        let s = b.fit(FREE_BYTES + 2 * STEP_BYTES).unwrap_err();
        assert_eq!(s.0 as usize, 2 * STEP_BYTES);
        a.fit(FREE_BYTES + STEP_BYTES).unwrap();
        assert_eq!(budget.in_use(), STEP_BYTES);
        b.fit(FREE_BYTES + 2 * STEP_BYTES).unwrap();
        assert_eq!(budget.in_use(), 3 * STEP_BYTES);
        drop(b);
        a.fit(0).unwrap();
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn waiting_session_gets_budget_when_released() {
        let budget = Budget::new(2 * STEP_BYTES);
        let mut a = Charge::new(budget.clone());
        let mut b = Charge::new(budget.clone());
        a.fit(FREE_BYTES + 2 * STEP_BYTES).unwrap();
        let s = b.fit(FREE_BYTES + STEP_BYTES).unwrap_err();
        let waiter = tokio::spawn(async move {
            b.wait(s).await;
            b.held()
        });
        tokio::task::yield_now().await;
        a.fit(0).unwrap();
        assert_eq!(waiter.await.unwrap(), STEP_BYTES);
    }

    #[test]
    fn peer_limit_counts_per_address() {
        let l = PeerLimit::new(2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let s1 = l.admit(a).unwrap();
        let _s2 = l.admit(a).unwrap();
        assert!(l.admit(a).is_none());
        let _s3 = l.admit(b).unwrap();
        drop(s1);
        assert!(l.admit(a).is_some());
        assert!(l.should_log());
        assert!(!l.should_log());
    }
}
