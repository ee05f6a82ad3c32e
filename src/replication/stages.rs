//! Where replication lag goes: each transaction is timed as it passes the
//! stages of the replication path, on both ends, in one histogram
//! (`zrelay_replication_stage_seconds{stage}`).
//!
//! Every stage measures the same thing: the transaction's age when it
//! passed, i.e. wall-clock now minus its tid's timestamp (the primary's
//! backend sets the tid when the commit takes its lock, at vote). One
//! reference for every stage on both nodes, carried by the tid itself: no
//! timestamps in the stream, and the difference between two stages' quantiles
//! is what that part of the path adds. Replica-side stages are only as
//! accurate as the two hosts' clocks agree (exact on one host, as in the
//! benchmark; NTP-synchronised hosts: the offset shows as a constant).
//!
//! Recording is one clock read and one histogram update per stage per
//! transaction (the `sent` and `invalidated` stages: per replica and per
//! client session).

use std::time::{SystemTime, UNIX_EPOCH};

use metrics::{describe_histogram, histogram};

use crate::replication::txn::{tid_unix_secs, Tid};

pub const STAGE_SECONDS: &str = "zrelay_replication_stage_seconds";

/// The stages in path order (the label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Primary: a client session saw the backend's `tpc_finish` reply
    /// (commits made through this proxy).
    FinishReply,
    /// Primary: the observer connection got the backend's invalidation.
    Observed,
    /// Primary: the transaction was handed to the replica streams (captured
    /// or read back).
    Published,
    /// Primary: its frame was written and flushed to a replica's TLS stream.
    Sent,
    /// Replica: its frame was read and decoded from the stream.
    Received,
    /// Replica: `tpc_begin`, the records and `vote` were written to the
    /// replica's backend.
    BeginSent,
    /// Replica: the backend answered `vote`.
    Voted,
    /// Replica: the backend answered `tpc_finish` (committed).
    Finished,
    /// Replica: the rewritten `invalidateTransaction` was passed to a client
    /// session's output.
    Invalidated,
}

pub const ALL: [Stage; 9] = [
    Stage::FinishReply,
    Stage::Observed,
    Stage::Published,
    Stage::Sent,
    Stage::Received,
    Stage::BeginSent,
    Stage::Voted,
    Stage::Finished,
    Stage::Invalidated,
];

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::FinishReply => "finish_reply",
            Stage::Observed => "observed",
            Stage::Published => "published",
            Stage::Sent => "sent",
            Stage::Received => "received",
            Stage::BeginSent => "begin_sent",
            Stage::Voted => "voted",
            Stage::Finished => "finished",
            Stage::Invalidated => "invalidated",
        }
    }
}

/// Buckets of the stage histogram: 100 µs steps up to 3 ms (where a healthy
/// stream's stages lie, so quantiles interpolate within 100 µs), then
/// coarser up to 10 s (a stalled or catching-up replica).
pub const STAGE_BUCKETS: [f64; 42] = [
    0.0001, 0.0002, 0.0003, 0.0004, 0.0005, 0.0006, 0.0007, 0.0008, 0.0009, 0.001, 0.0011, 0.0012,
    0.0013, 0.0014, 0.0015, 0.0016, 0.0017, 0.0018, 0.0019, 0.002, 0.0021, 0.0022, 0.0023, 0.0024,
    0.0025, 0.0026, 0.0027, 0.0028, 0.0029, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 10.0,
];

pub fn describe() {
    describe_histogram!(
        STAGE_SECONDS,
        metrics::Unit::Seconds,
        "Age of a replicated transaction (now minus its tid's time) when it passed a stage of the replication path, by stage."
    );
}

/// The transaction `tid` passed `stage` now.
pub fn record(stage: Stage, tid: &Tid) {
    histogram!(STAGE_SECONDS, "stage" => stage.label()).record(age(tid, unix_now()));
}

/// Seconds from the tid's timestamp to `now` (Unix seconds); never negative
/// (a clock step back, or another host's clock ahead).
pub fn age(tid: &Tid, now: f64) -> f64 {
    (now - tid_unix_secs(tid)).max(0.0)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::txn::tid_from_unix_secs;

    #[test]
    fn age_is_time_since_the_tid() {
        let t = 1_800_000_000.25;
        let tid = tid_from_unix_secs(t);
        let a = age(&tid, t + 0.0015);
        assert!((a - 0.0015).abs() < 1e-5, "{a}");
        assert_eq!(age(&tid, t - 1.0), 0.0);
    }

    #[test]
    fn labels_are_distinct_and_buckets_ascend() {
        let labels: std::collections::HashSet<_> = ALL.iter().map(|s| s.label()).collect();
        assert_eq!(labels.len(), ALL.len());
        assert!(STAGE_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
