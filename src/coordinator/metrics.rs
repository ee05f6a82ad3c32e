//! The coordinator's metrics (documented in `docs/metrics.md`).

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub const LEADER_CHANGES: &str = "zrelay_coordinator_leader_changes_total";
pub const IS_LEADER: &str = "zrelay_coordinator_is_leader";
pub const RENEWAL_AGE: &str = "zrelay_coordinator_lease_renewal_age_seconds";
pub const FENCES: &str = "zrelay_coordinator_fences_total";
pub const ELECTIONS: &str = "zrelay_coordinator_elections_total";
pub const ETCD_ERRORS: &str = "zrelay_coordinator_etcd_errors_total";
pub const ETCD_DURATION: &str = "zrelay_coordinator_etcd_request_duration_seconds";

/// Bounded label values of `op`.
pub const OPS: &[&str] = &[
    "connect",
    "grant",
    "keepalive",
    "put",
    "get",
    "txn",
    "revoke",
];

pub fn describe() {
    describe_counter!(
        LEADER_CHANGES,
        "Times the leader key seen in etcd changed (node or epoch, or appeared/vanished)."
    );
    describe_gauge!(IS_LEADER, "1 while this node holds the leader key, else 0.");
    describe_gauge!(
        RENEWAL_AGE,
        "Seconds since the start of the last confirmed leader lease renewal (0 when not leader)."
    );
    describe_counter!(FENCES, "Times this node fenced itself, by reason.");
    describe_counter!(ELECTIONS, "Election rounds with no leader key, by outcome.");
    describe_counter!(
        ETCD_ERRORS,
        "etcd requests that failed or timed out, by op."
    );
    describe_histogram!(ETCD_DURATION, "etcd request latency, by op.");
}

pub fn leader_changed() {
    counter!(LEADER_CHANGES).increment(1);
}

pub fn is_leader(v: bool) {
    gauge!(IS_LEADER).set(if v { 1.0 } else { 0.0 });
}

pub fn renewal_age(d: Option<Duration>) {
    gauge!(RENEWAL_AGE).set(d.map_or(0.0, |d| d.as_secs_f64()));
}

pub fn fenced(reason: &'static str) {
    counter!(FENCES, "reason" => reason).increment(1);
}

/// `outcome`: won, lost, not_best, maintenance, not_eligible, primary_alive,
/// not_registered, settling.
pub fn election(outcome: &'static str) {
    counter!(ELECTIONS, "outcome" => outcome).increment(1);
}

pub fn etcd_request(op: &'static str, d: Duration, ok: bool) {
    histogram!(ETCD_DURATION, "op" => op).record(d.as_secs_f64());
    if !ok {
        counter!(ETCD_ERRORS, "op" => op).increment(1);
    }
}
