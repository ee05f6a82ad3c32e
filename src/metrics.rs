//! Metric names and the small functions that record them.
//!
//! Every metric zrelay exports is named here, so the names the code records,
//! the ones `docs/metrics.md` documents and the ones the dashboards query
//! cannot drift apart unnoticed (a test cross-checks them against a scrape).
//! Labels have small fixed value sets: never a tid, an oid or a peer address.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub const SESSIONS: &str = "zrelay_client_sessions";
pub const SESSIONS_ENDED: &str = "zrelay_client_sessions_ended_total";
pub const CONNECTIONS_ACCEPTED: &str = "zrelay_client_connections_accepted_total";
pub const REQUESTS: &str = "zrelay_client_requests_total";
pub const ERROR_REPLIES: &str = "zrelay_client_error_replies_total";
pub const COMMIT_DURATION: &str = "zrelay_client_commit_duration_seconds";
pub const BACKEND_UP: &str = "zrelay_backend_up";
pub const BACKEND_CONNECT_FAILURES: &str = "zrelay_backend_connect_failures_total";
pub const REJECTED_WRITES: &str = "zrelay_client_rejected_writes_total";
pub const REPL_CONNECTED: &str = "zrelay_replication_connected";
pub const REPL_DIVERGED: &str = "zrelay_replication_diverged";
pub const REPL_SENT_TXNS: &str = "zrelay_replication_sent_transactions_total";
pub const REPL_SENT_BYTES: &str = "zrelay_replication_sent_bytes_total";
pub const REPL_APPLIED_TXNS: &str = "zrelay_replication_applied_transactions_total";
pub const REPL_APPLIED_BYTES: &str = "zrelay_replication_applied_bytes_total";
pub const REPL_APPLY_DURATION: &str = "zrelay_replication_apply_duration_seconds";
pub const REPL_PRIMARY_LAST_COMMIT: &str =
    "zrelay_replication_primary_last_commit_timestamp_seconds";
pub const REPL_APPLIED_LAST_COMMIT: &str =
    "zrelay_replication_applied_last_commit_timestamp_seconds";
pub const BUILD_INFO: &str = "zrelay_build_info";

/// Methods a ZEO 5 server registers (plus `register`); anything else is
/// counted as "other" so a hostile client cannot grow the label set.
const METHODS: &[&str] = &[
    "register",
    "get_info",
    "lastTransaction",
    "getInvalidations",
    "new_oids",
    "pack",
    "loadBefore",
    "storea",
    "checkCurrentSerialInTransaction",
    "restorea",
    "storeBlobStart",
    "storeBlobChunk",
    "storeBlobEnd",
    "storeBlobShared",
    "deleteObject",
    "tpc_begin",
    "vote",
    "tpc_finish",
    "tpc_abort",
    "history",
    "record_iternext",
    "sendBlob",
    "getTid",
    "loadSerial",
    "new_oid",
    "undoa",
    "undoLog",
    "undoInfo",
    "iterator_start",
    "iterator_next",
    "iterator_record_start",
    "iterator_record_next",
    "iterator_gc",
    "server_status",
    "set_client_label",
    "ping",
];

pub fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

pub fn describe() {
    describe_gauge!(
        SESSIONS,
        "Registered client sessions, by kind (read-write, read-only)."
    );
    describe_counter!(
        SESSIONS_ENDED,
        "Client sessions ended, by reason (client_closed, backend_closed, client_protocol_error, backend_unreachable, shutdown, ...)."
    );
    describe_counter!(CONNECTIONS_ACCEPTED, "Client TCP connections accepted.");
    describe_counter!(REQUESTS, "ZEO calls received from clients, by method.");
    describe_counter!(
        ERROR_REPLIES,
        "Error replies sent to clients for their sync calls, by method."
    );
    describe_histogram!(
        COMMIT_DURATION,
        metrics::Unit::Seconds,
        "Client tpc_finish round trip as seen by the proxy."
    );
    describe_gauge!(
        BACKEND_UP,
        "1 if the backend ZEO server greeted the last probe (connect + protocol handshake), else 0."
    );
    describe_counter!(
        BACKEND_CONNECT_FAILURES,
        "Failed connection attempts to the backend ZEO server."
    );
    describe_counter!(
        REJECTED_WRITES,
        "Write calls refused with ReadOnlyError on a replica, by method."
    );
    describe_gauge!(
        REPL_CONNECTED,
        "1 while the replication stream is up (on a replica: to its upstream; on a primary: per replica label)."
    );
    describe_gauge!(
        REPL_DIVERGED,
        "1 if the replica holds history the primary does not have; applying stopped (per replica label on a primary)."
    );
    describe_counter!(
        REPL_SENT_TXNS,
        "Transactions sent to a replica, by replica."
    );
    describe_counter!(
        REPL_SENT_BYTES,
        metrics::Unit::Bytes,
        "Record and blob bytes sent to a replica, by replica."
    );
    describe_counter!(
        REPL_APPLIED_TXNS,
        "Transactions applied to this replica's backend."
    );
    describe_counter!(
        REPL_APPLIED_BYTES,
        metrics::Unit::Bytes,
        "Record and blob bytes applied to this replica's backend."
    );
    describe_histogram!(
        REPL_APPLY_DURATION,
        metrics::Unit::Seconds,
        "Time to apply one transaction to the replica's backend (tpc_begin to tpc_finish reply)."
    );
    describe_gauge!(
        REPL_PRIMARY_LAST_COMMIT,
        metrics::Unit::Seconds,
        "Commit time (Unix seconds) of the newest transaction on the primary, as last reported."
    );
    describe_gauge!(
        REPL_APPLIED_LAST_COMMIT,
        metrics::Unit::Seconds,
        "Commit time (Unix seconds) of the newest transaction applied on this replica."
    );
    describe_gauge!(BUILD_INFO, "Always 1; labels carry the version.");
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Bind the cached handles to the recorder installed just before.
    request_counters();
}

fn kind(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "read-write"
    }
}

pub fn session_opened(read_only: bool) {
    gauge!(SESSIONS, "kind" => kind(read_only)).increment(1.0);
}

pub fn session_closed(read_only: bool) {
    gauge!(SESSIONS, "kind" => kind(read_only)).decrement(1.0);
}

pub fn session_ended(reason: &'static str) {
    counter!(SESSIONS_ENDED, "reason" => reason).increment(1);
}

pub fn connection_accepted() {
    counter!(CONNECTIONS_ACCEPTED).increment(1);
}

/// Per-method request counters, registered once: looking a labelled
/// counter up in the registry on every message costs more than relaying it.
fn request_counters() -> &'static [metrics::Counter] {
    static COUNTERS: std::sync::OnceLock<Vec<metrics::Counter>> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| {
        METHODS
            .iter()
            .chain(std::iter::once(&"other"))
            .map(|m| counter!(REQUESTS, "method" => *m))
            .collect()
    })
}

pub fn client_request(method: &str) {
    let i = METHODS
        .iter()
        .position(|m| *m == method)
        .unwrap_or(METHODS.len());
    request_counters()[i].increment(1);
}

pub fn client_error_reply(method: &str) {
    counter!(ERROR_REPLIES, "method" => method_label(method)).increment(1);
}

pub fn client_commit(d: Duration) {
    histogram!(COMMIT_DURATION).record(d.as_secs_f64());
}

pub fn backend_up(up: bool) {
    gauge!(BACKEND_UP).set(if up { 1.0 } else { 0.0 });
}

pub fn backend_connect_failed() {
    counter!(BACKEND_CONNECT_FAILURES).increment(1);
}

pub fn rejected_write(method: &str) {
    counter!(REJECTED_WRITES, "method" => method_label(method)).increment(1);
}

pub fn primary_last_commit(unix: f64) {
    gauge!(REPL_PRIMARY_LAST_COMMIT).set(unix);
}

pub fn applied_last_commit(unix: f64) {
    gauge!(REPL_APPLIED_LAST_COMMIT).set(unix);
}

/// Primary side, per replica (node names are few and operator-chosen).
pub fn peer_connected(replica: &str, up: bool) {
    gauge!(REPL_CONNECTED, "replica" => replica.to_string()).set(if up { 1.0 } else { 0.0 });
}

pub fn peer_diverged(replica: &str, diverged: bool) {
    gauge!(REPL_DIVERGED, "replica" => replica.to_string()).set(if diverged { 1.0 } else { 0.0 });
}

pub fn replica_sent(replica: &str, bytes: u64) {
    counter!(REPL_SENT_TXNS, "replica" => replica.to_string()).increment(1);
    counter!(REPL_SENT_BYTES, "replica" => replica.to_string()).increment(bytes);
}

/// Replica side.
pub fn stream_connected(up: bool) {
    gauge!(REPL_CONNECTED).set(if up { 1.0 } else { 0.0 });
}

pub fn diverged(d: bool) {
    gauge!(REPL_DIVERGED).set(if d { 1.0 } else { 0.0 });
}

pub fn replica_applied(bytes: u64, d: Duration) {
    counter!(REPL_APPLIED_TXNS).increment(1);
    counter!(REPL_APPLIED_BYTES).increment(bytes);
    histogram!(REPL_APPLY_DURATION).record(d.as_secs_f64());
}

/// Registers the series that exist from the start with their zero values,
/// so dashboards and `increase()` alerts see them before the first event.
pub fn init_series(replica: bool, replication: bool) {
    counter!(BACKEND_CONNECT_FAILURES).increment(0);
    counter!(CONNECTIONS_ACCEPTED).increment(0);
    for kind in ["read-write", "read-only"] {
        gauge!(SESSIONS, "kind" => kind).increment(0.0);
    }
    if replica {
        counter!(REPL_APPLIED_TXNS).increment(0);
        counter!(REPL_APPLIED_BYTES).increment(0);
        gauge!(REPL_CONNECTED).set(0.0);
        gauge!(REPL_DIVERGED).set(0.0);
    }
    if replication {
        for reason in crate::replication::tls::REASONS {
            counter!(crate::replication::tls::HANDSHAKE_FAILURES, "reason" => *reason).increment(0);
        }
    }
}

// ---- Doors (crate::door): routing of sessions and loads. ----

pub const DOOR_SESSIONS: &str = "zrelay_door_sessions_total";
pub const DOOR_LOADS: &str = "zrelay_door_loads_total";
pub const DOOR_REFUSED: &str = "zrelay_door_refused_total";
pub const DOOR_ROUTE_FAILURES: &str = "zrelay_door_route_failures_total";

/// `(served_by, reason)` pairs of [`DOOR_LOADS`].
pub const DOOR_LOAD_OUTCOMES: &[(&str, &str)] = &[
    ("local", "fresh"),
    ("local", "waited"),
    ("primary", "behind"),
    ("primary", "lagging"),
    ("primary", "invalidated"),
    ("primary", "not_snapshot"),
    ("primary", "local_unavailable"),
];

pub fn describe_door() {
    describe_counter!(
        DOOR_SESSIONS,
        "Client sessions a door routed at register, by route (local, forwarded) and mode (read_write, read_only)."
    );
    describe_counter!(
        DOOR_LOADS,
        "loadBefore calls of forwarded sessions, by who served them (local replica, primary) and why (fresh, waited, behind, lagging, invalidated, not_snapshot, local_unavailable)."
    );
    describe_counter!(
        DOOR_REFUSED,
        "Door sessions this node refused, by reason (not_primary, wrong_cluster, wrong_storage, version_mismatch, protocol, stale_epoch)."
    );
    describe_counter!(
        DOOR_ROUTE_FAILURES,
        "Sessions a door could not route because the destination was unknown or unreachable."
    );
}

/// Zero-initialises the door series (a door exists on every replica).
pub fn init_door_series() {
    for route in ["local", "forwarded"] {
        for mode in ["read_write", "read_only"] {
            counter!(DOOR_SESSIONS, "route" => route, "mode" => mode).increment(0);
        }
    }
    for (by, reason) in DOOR_LOAD_OUTCOMES {
        counter!(DOOR_LOADS, "served_by" => *by, "reason" => *reason).increment(0);
    }
    counter!(DOOR_ROUTE_FAILURES).increment(0);
}

pub fn door_session(forwarded: bool, read_only: bool) {
    counter!(
        DOOR_SESSIONS,
        "route" => if forwarded { "forwarded" } else { "local" },
        "mode" => if read_only { "read_only" } else { "read_write" }
    )
    .increment(1);
}

/// `reason` is one of [`DOOR_LOAD_OUTCOMES`]' reasons. Counted per load:
/// the handles are looked up once (a labelled `counter!` hashes its labels
/// and takes the registry's lock on every call).
pub fn door_load(local: bool, reason: &'static str) {
    static COUNTERS: std::sync::OnceLock<Vec<metrics::Counter>> = std::sync::OnceLock::new();
    let counters = COUNTERS.get_or_init(|| {
        DOOR_LOAD_OUTCOMES
            .iter()
            .map(|(by, reason)| counter!(DOOR_LOADS, "served_by" => *by, "reason" => *reason))
            .collect()
    });
    let by = if local { "local" } else { "primary" };
    match DOOR_LOAD_OUTCOMES
        .iter()
        .position(|(b, r)| *b == by && *r == reason)
    {
        Some(i) => counters[i].increment(1),
        None => counter!(DOOR_LOADS, "served_by" => by, "reason" => reason).increment(1),
    }
}

pub fn door_refused(reason: &'static str) {
    counter!(DOOR_REFUSED, "reason" => reason).increment(1);
}

pub fn door_route_failed() {
    counter!(DOOR_ROUTE_FAILURES).increment(1);
}

// ------------------------------------------------ client resource bounds

pub const CLIENT_BUFFERED: &str = "zrelay_client_buffered_bytes";
pub const CLIENT_BUFFER_BUDGET: &str = "zrelay_client_buffer_budget_bytes";
pub const CLIENT_BUFFER_STALLS: &str = "zrelay_client_buffer_stalls_total";
pub const CONNECTIONS_REFUSED: &str = "zrelay_client_connections_refused_total";

/// Describes the resource-bound metrics and sets their initial values.
pub fn describe_limits(budget_bytes: usize) {
    describe_gauge!(
        CLIENT_BUFFERED,
        metrics::Unit::Bytes,
        "Bytes of the client buffer budget held by sessions (large client messages in progress)."
    );
    describe_gauge!(
        CLIENT_BUFFER_BUDGET,
        metrics::Unit::Bytes,
        "The configured client buffer budget (client.buffer_budget_bytes)."
    );
    describe_counter!(
        CLIENT_BUFFER_STALLS,
        "Times a session stopped reading its client because the buffer budget was exhausted."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Client connections closed at accept, by reason (per_peer_limit)."
    );
    gauge!(CLIENT_BUFFER_BUDGET).set(budget_bytes as f64);
    gauge!(CLIENT_BUFFERED).set(0.0);
    counter!(CLIENT_BUFFER_STALLS).increment(0);
    counter!(CONNECTIONS_REFUSED, "reason" => "per_peer_limit").increment(0);
}

pub fn client_buffered_bytes(bytes: usize) {
    gauge!(CLIENT_BUFFERED).set(bytes as f64);
}

pub fn client_buffer_stall() {
    counter!(CLIENT_BUFFER_STALLS).increment(1);
}

pub fn connection_refused(reason: &'static str) {
    counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}
