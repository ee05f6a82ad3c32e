//! Health decisions: pure functions from a status snapshot, a clock reading
//! and a lag limit to an HTTP status and a JSON body. No I/O, so every rule
//! is unit-tested here and the HTTP layer only routes.
//!
//! Lag contract with the replica applier: `UpstreamStatus::lag_seconds` is
//! the lag computed from the last message received from the primary
//! (transaction or heartbeat) and `last_contact` is when that message came.
//! The applier does not age it; while the stream is `disconnected` this
//! module adds the time since `last_contact`, so the reported lag keeps
//! growing while the replica cannot prove it is current.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use serde_json::{json, Map, Value};

use crate::status::{NodeStatus, Role, StreamState, UpstreamStatus};

/// The probe endpoints (everything but `/metrics` and `/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Health,
    Primary,
    Replica,
    ReadOnly,
    Liveness,
    Readiness,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Check::Health => "health",
            Check::Primary => "primary",
            Check::Replica => "replica",
            Check::ReadOnly => "read-only",
            Check::Liveness => "liveness",
            Check::Readiness => "readiness",
        }
    }

    /// Whether `?lag=` may override the configured maximum lag.
    pub fn takes_lag_param(self) -> bool {
        matches!(self, Check::Replica | Check::ReadOnly)
    }
}

/// One reading of both clocks: the monotonic one for `last_contact`, the
/// wall clock for commit timestamps.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub unix: f64,
}

impl Now {
    pub fn current() -> Now {
        Now {
            instant: Instant::now(),
            unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }
}

/// The `state` word of health bodies, `/status` and the CLI: a replica's
/// stream state, or `running` / `backend_down` for a primary.
pub fn node_state(st: &NodeStatus) -> &'static str {
    match (&st.upstream, st.role) {
        (Some(up), _) => stream_state_name(up.state),
        (None, Role::Replica) => stream_state_name(StreamState::Disconnected),
        (None, Role::Primary) if st.backend_up => "running",
        (None, Role::Primary) => "backend_down",
    }
}

pub fn stream_state_name(s: StreamState) -> &'static str {
    match s {
        StreamState::Disconnected => "disconnected",
        StreamState::CatchingUp => "catching_up",
        StreamState::Live => "live",
        StreamState::Diverged => "diverged",
    }
}

/// This node's replication lag in seconds, or None when it has no upstream
/// (a primary). While disconnected the last known lag grows with the time
/// since the last message from the primary; a replica that never heard from
/// it counts from its own last applied commit, if known.
pub fn lag_seconds(st: &NodeStatus, now: Now) -> Option<f64> {
    match &st.upstream {
        Some(up) => Some(upstream_lag(up, st, now)),
        None if st.role == Role::Replica => st
            .storage_last_commit_unix
            .map(|applied| non_negative(now.unix - applied)),
        None => None,
    }
}

fn upstream_lag(up: &UpstreamStatus, st: &NodeStatus, now: Now) -> f64 {
    let applied_unix = st.storage_last_commit_unix;
    // What the stream says, and at least what the leader's record in etcd
    // says (the stream can be the slower of the two).
    let known = non_negative(up.lag_seconds).max(leader_lag(st, up));
    // Disconnected or diverged: nothing applied since the last contact, so
    // the lag grows with the clock (never a frozen 0).
    if up.state != StreamState::Disconnected && up.state != StreamState::Diverged {
        return known;
    }
    match (up.last_contact, applied_unix) {
        (Some(t), _) => known + now.instant.saturating_duration_since(t).as_secs_f64(),
        (None, Some(applied)) => known.max(now.unix - applied),
        (None, None) => known,
    }
}

/// Seconds between the leader's newest tid per etcd and the applied one (0
/// when unknown or not behind). Both are the primary's timestamps: no clock
/// of this host is involved.
fn leader_lag(st: &NodeStatus, up: &UpstreamStatus) -> f64 {
    let tid = |h: &str| {
        u64::from_str_radix(h, 16)
            .ok()
            .filter(|_| h.len() == 16)
            .map(u64::to_be_bytes)
    };
    match (
        st.leader_last_tid.as_deref().and_then(tid),
        up.applied_tid.as_deref().and_then(tid),
    ) {
        (Some(leader), Some(applied)) => crate::replication::txn::tid_delta_secs(&leader, &applied),
        _ => 0.0,
    }
}

/// Maps negative and NaN to 0: a clock step on the primary must not make a
/// replica look ahead of it.
fn non_negative(x: f64) -> f64 {
    if x > 0.0 {
        x
    } else {
        0.0
    }
}

/// Decides one probe. `max_lag` is the configured maximum or the request's
/// `?lag=`; it is ignored by checks that do not look at lag.
pub fn evaluate(check: Check, st: &NodeStatus, now: Now, max_lag: Duration) -> (StatusCode, Value) {
    let lag = lag_seconds(st, now);
    let verdict = match check {
        Check::Liveness => Ok(()),
        Check::Health => backend(st),
        Check::Primary => primary(st),
        Check::Replica => replica(st, lag, max_lag),
        Check::ReadOnly | Check::Readiness => match st.role {
            Role::Primary => primary(st),
            Role::Replica => replica(st, lag, max_lag),
        },
    };
    let verdict = verdict.and_then(|()| not_draining(check, st));
    let mut body = json!({
        "status": if verdict.is_ok() { "ok" } else { "unavailable" },
        "check": check.name(),
        "node": st.node,
        "role": st.role,
        "state": node_state(st),
        "backend_up": st.backend_up,
        "lag_seconds": lag,
        "max_lag_seconds": max_lag.as_secs_f64(),
    });
    match verdict {
        Ok(()) => (StatusCode::OK, body),
        Err(reason) => {
            body["reason"] = Value::String(reason);
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
    }
}

/// A draining node takes no new client sessions: the probes load balancers
/// route clients by turn 503 at once. `/primary` and `/health` keep telling
/// the node's role and backend state.
fn not_draining(check: Check, st: &NodeStatus) -> Result<(), String> {
    match check {
        Check::Readiness | Check::Replica | Check::ReadOnly if st.draining => {
            Err("draining: not accepting new client sessions".into())
        }
        _ => Ok(()),
    }
}

fn backend(st: &NodeStatus) -> Result<(), String> {
    if st.backend_up {
        Ok(())
    } else {
        Err(format!(
            "backend ZEO server {} is not answering",
            st.backend_address
        ))
    }
}

fn primary(st: &NodeStatus) -> Result<(), String> {
    if st.role != Role::Primary {
        return Err("node is a replica".into());
    }
    backend(st)
}

fn replica(st: &NodeStatus, lag: Option<f64>, max_lag: Duration) -> Result<(), String> {
    if st.role != Role::Replica {
        return Err("node is the primary".into());
    }
    backend(st)?;
    let Some(up) = &st.upstream else {
        return Err("no replication stream".into());
    };
    match up.state {
        StreamState::Live | StreamState::CatchingUp => {}
        StreamState::Disconnected => {
            return Err(match &up.last_error {
                Some(e) => format!("replication stream from {} is down: {e}", up.address),
                None => format!("replication stream from {} is down", up.address),
            })
        }
        StreamState::Diverged => {
            return Err(format!(
                "replica diverged from the primary at {}; applying stopped",
                up.address
            ))
        }
    }
    let lag = lag.unwrap_or(0.0);
    let max = max_lag.as_secs_f64();
    if lag > max {
        return Err(format!(
            "replication lag {lag:.3}s exceeds the maximum {max:.3}s"
        ));
    }
    Ok(())
}

/// The `/status` body: the snapshot, plus what a reader would otherwise have
/// to recompute (`uptime_seconds`, `state`, `lag_seconds` as health sees it).
pub fn status_body(st: &NodeStatus, now: Now, uptime_seconds: f64) -> Value {
    let mut v = match serde_json::to_value(st) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    v.insert("uptime_seconds".into(), json!(uptime_seconds));
    v.insert("state".into(), json!(node_state(st)));
    v.insert("lag_seconds".into(), json!(lag_seconds(st, now)));
    Value::Object(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn upstream(state: StreamState, lag: f64) -> UpstreamStatus {
        UpstreamStatus {
            address: "primary:8101".into(),
            state,
            primary_last_tid: None,
            applied_tid: None,
            lag_seconds: lag,
            lag_transactions: 0,
            lag_bytes: 0,
            last_error: None,
            last_contact: None,
        }
    }

    pub(crate) fn node(role: Role, up: Option<UpstreamStatus>) -> NodeStatus {
        NodeStatus {
            backend_up: true,
            upstream: up,
            ..NodeStatus::new("node2".into(), role, "127.0.0.1:8200".into())
        }
    }

    const MAX: Duration = Duration::from_secs(5);

    fn code(check: Check, st: &NodeStatus, max: Duration) -> StatusCode {
        evaluate(check, st, Now::current(), max).0
    }

    #[test]
    fn live_replica_within_lag() {
        let st = node(Role::Replica, Some(upstream(StreamState::Live, 0.1)));
        for c in [
            Check::Health,
            Check::Replica,
            Check::ReadOnly,
            Check::Readiness,
            Check::Liveness,
        ] {
            assert_eq!(code(c, &st, MAX), StatusCode::OK, "{c:?}");
        }
        assert_eq!(
            code(Check::Primary, &st, MAX),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let (_, body) = evaluate(Check::Replica, &st, Now::current(), MAX);
        assert_eq!(body["status"], "ok");
        assert_eq!(body["role"], "replica");
        assert_eq!(body["state"], "live");
        assert_eq!(body["lag_seconds"], 0.1);
        assert!(body.get("reason").is_none());
    }

    #[test]
    fn draining_fails_the_routing_probes_at_once() {
        let mut st = node(Role::Replica, Some(upstream(StreamState::Live, 0.1)));
        st.draining = true;
        for c in [Check::Readiness, Check::Replica, Check::ReadOnly] {
            assert_eq!(code(c, &st, MAX), StatusCode::SERVICE_UNAVAILABLE, "{c:?}");
        }
        let (_, body) = evaluate(Check::Readiness, &st, Now::current(), MAX);
        assert!(
            body["reason"].as_str().unwrap().contains("draining"),
            "{body}"
        );
        assert_eq!(code(Check::Health, &st, MAX), StatusCode::OK);
        assert_eq!(code(Check::Liveness, &st, MAX), StatusCode::OK);
        let mut p = node(Role::Primary, None);
        p.draining = true;
        assert_eq!(
            code(Check::Readiness, &p, MAX),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(code(Check::Primary, &p, MAX), StatusCode::OK);
    }

    #[test]
    fn lag_over_max_fails_replica_checks_only() {
        let st = node(Role::Replica, Some(upstream(StreamState::Live, 0.1)));
        let tight = Duration::from_millis(50);
        assert_eq!(
            code(Check::Replica, &st, tight),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            code(Check::ReadOnly, &st, tight),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            code(Check::Readiness, &st, tight),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(code(Check::Health, &st, tight), StatusCode::OK);
        let (_, body) = evaluate(Check::Replica, &st, Now::current(), tight);
        assert_eq!(body["status"], "unavailable");
        assert!(body["reason"].as_str().unwrap().contains("lag"), "{body}");
        // Equal to the maximum passes.
        assert_eq!(
            code(Check::Replica, &st, Duration::from_millis(100)),
            StatusCode::OK
        );
    }

    #[test]
    fn catching_up_within_lag_is_a_replica() {
        let st = node(Role::Replica, Some(upstream(StreamState::CatchingUp, 1.0)));
        assert_eq!(code(Check::Replica, &st, MAX), StatusCode::OK);
        let st = node(Role::Replica, Some(upstream(StreamState::CatchingUp, 60.0)));
        assert_eq!(
            code(Check::Replica, &st, MAX),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn not_streaming_fails_whatever_the_lag() {
        for s in [StreamState::Disconnected, StreamState::Diverged] {
            let mut up = upstream(s, 0.0);
            up.last_error = Some("connection refused".into());
            let st = node(Role::Replica, Some(up));
            let (c, body) = evaluate(Check::Replica, &st, Now::current(), MAX);
            assert_eq!(c, StatusCode::SERVICE_UNAVAILABLE, "{s:?}");
            assert_eq!(body["state"], stream_state_name(s));
            assert_eq!(
                code(Check::ReadOnly, &st, MAX),
                StatusCode::SERVICE_UNAVAILABLE
            );
            assert_eq!(
                code(Check::Readiness, &st, MAX),
                StatusCode::SERVICE_UNAVAILABLE
            );
            assert_eq!(code(Check::Health, &st, MAX), StatusCode::OK);
        }
        let st = node(Role::Replica, None);
        assert_eq!(
            code(Check::Replica, &st, MAX),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(node_state(&st), "disconnected");
    }

    #[test]
    fn backend_down_fails_everything_but_liveness() {
        let mut st = node(Role::Replica, Some(upstream(StreamState::Live, 0.0)));
        st.backend_up = false;
        for c in [
            Check::Health,
            Check::Replica,
            Check::ReadOnly,
            Check::Readiness,
        ] {
            let (code, body) = evaluate(c, &st, Now::current(), MAX);
            assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{c:?}");
            assert!(body["reason"].as_str().unwrap().contains("backend"));
        }
        assert_eq!(code(Check::Liveness, &st, MAX), StatusCode::OK);
        let mut p = node(Role::Primary, None);
        p.backend_up = false;
        assert_eq!(
            code(Check::Primary, &p, MAX),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(node_state(&p), "backend_down");
    }

    #[test]
    fn healthy_primary() {
        let st = node(Role::Primary, None);
        for c in [
            Check::Health,
            Check::Primary,
            Check::ReadOnly,
            Check::Readiness,
            Check::Liveness,
        ] {
            assert_eq!(code(c, &st, MAX), StatusCode::OK, "{c:?}");
        }
        let (c, body) = evaluate(Check::Replica, &st, Now::current(), MAX);
        assert_eq!(c, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["role"], "primary");
        assert_eq!(body["state"], "running");
        assert!(body["lag_seconds"].is_null());
    }

    #[test]
    fn lag_grows_while_disconnected() {
        let now = Now::current();
        let mut up = upstream(StreamState::Disconnected, 0.5);
        up.last_contact = now.instant.checked_sub(Duration::from_secs(10));
        let st = node(Role::Replica, Some(up.clone()));
        let lag = lag_seconds(&st, now).unwrap();
        assert!((lag - 10.5).abs() < 1e-6, "{lag}");
        // The same silence on a live stream is not counted: heartbeats set
        // lag_seconds, and an idle in-sync replica's lag is 0.
        up.state = StreamState::Live;
        let st = node(Role::Replica, Some(up));
        assert_eq!(lag_seconds(&st, now), Some(0.5));
        // Never connected: count from the last applied commit.
        let mut st = node(
            Role::Replica,
            Some(upstream(StreamState::Disconnected, 0.0)),
        );
        st.storage_last_commit_unix = Some(now.unix - 30.0);
        let lag = lag_seconds(&st, now).unwrap();
        assert!((lag - 30.0).abs() < 1e-6, "{lag}");
        st.upstream = None;
        let lag = lag_seconds(&st, now).unwrap();
        assert!((lag - 30.0).abs() < 1e-6, "{lag}");
        // Garbage from the applier never makes a replica look ahead.
        let st = node(Role::Replica, Some(upstream(StreamState::Live, f64::NAN)));
        assert_eq!(lag_seconds(&st, now), Some(0.0));
        let st = node(Role::Replica, Some(upstream(StreamState::Live, -3.0)));
        assert_eq!(lag_seconds(&st, now), Some(0.0));
    }

    /// A live stream that believes it is current (its news of the primary
    /// queue behind its data) while the leader's etcd record is ahead: the
    /// lag is the leader's, from the primary's own timestamps.
    #[test]
    fn the_leaders_record_bounds_the_lag_from_below() {
        let tid = |secs: u32| {
            // ZODB tid: minutes since 1900 in the high 32 bits, seconds
            // scaled to 2^32 / 60 in the low 32 bits.
            let low = (f64::from(secs) * (f64::from(u32::MAX) + 1.0) / 60.0) as u64;
            format!("{:016x}", (62_000_000u64 << 32) | low)
        };
        let now = Now::current();
        let mut up = upstream(StreamState::Live, 0.0);
        up.applied_tid = Some(tid(10));
        let mut st = node(Role::Replica, Some(up.clone()));
        assert_eq!(lag_seconds(&st, now), Some(0.0));
        st.leader_last_tid = Some(tid(13));
        let lag = lag_seconds(&st, now).unwrap();
        assert!((lag - 3.0).abs() < 1e-3, "{lag}");
        let (code, _) = evaluate(Check::Replica, &st, now, Duration::from_secs(1));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        // The stream's own larger figure wins; a leader tid at or behind the
        // applied one adds nothing; garbage is ignored.
        st.upstream.as_mut().unwrap().lag_seconds = 5.0;
        assert_eq!(lag_seconds(&st, now), Some(5.0));
        st.upstream.as_mut().unwrap().lag_seconds = 0.0;
        st.leader_last_tid = Some(tid(10));
        assert_eq!(lag_seconds(&st, now), Some(0.0));
        st.leader_last_tid = Some("zz".into());
        assert_eq!(lag_seconds(&st, now), Some(0.0));
    }

    #[test]
    fn status_body_adds_derived_fields() {
        let st = node(Role::Replica, Some(upstream(StreamState::Live, 0.25)));
        let v = status_body(&st, Now::current(), 12.5);
        assert_eq!(v["node"], "node2");
        assert_eq!(v["uptime_seconds"], 12.5);
        assert_eq!(v["state"], "live");
        assert_eq!(v["lag_seconds"], 0.25);
        assert_eq!(v["upstream"]["state"], "live");
        assert_eq!(v["backend_up"], true);
    }
}
