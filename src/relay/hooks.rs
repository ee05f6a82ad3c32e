//! Interception points of a client session.
//!
//! A session moves ZEO messages between one client and the backend. What a
//! given kind of session does differently (a primary capturing commits, a
//! replica refusing writes and rewriting invalidations, a routed session
//! sending loads elsewhere) is expressed by overriding these hooks; the
//! defaults relay everything untouched.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use super::backend::{BoxRead, BoxWrite};
use crate::wire::{Message, Value};

/// Opens the connection a rerouted session continues on (another node's
/// door, for instance). Implemented outside the relay layer, which knows
/// nothing of how the bytes travel (TLS, handshakes): it gets two halves that
/// carry ZEO frames, starting with the server's protocol offer.
/// What [`UpstreamOpener::open`] returns: the two halves, or why not.
pub type Opening = Pin<Box<dyn Future<Output = Result<(BoxRead, BoxWrite), String>> + Send>>;

pub trait UpstreamOpener: Send + Sync {
    fn open(&self) -> Opening;
    /// Names the destination in logs.
    fn describe(&self) -> String;
}

/// Where a session continues after `register` (see [`ClientVerdict::Reroute`]).
pub struct Reroute {
    pub opener: std::sync::Arc<dyn UpstreamOpener>,
    /// Keep the connection opened so far (the node's own backend) as the
    /// *local* connection: messages the hooks answer with
    /// [`ClientVerdict::Local`] go there.
    pub keep_local: bool,
}

impl std::fmt::Debug for Reroute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reroute")
            .field("to", &self.opener.describe())
            .field("keep_local", &self.keep_local)
            .finish()
    }
}

/// What the session does with a message from the client.
#[derive(Debug)]
pub enum ClientVerdict {
    /// Send the original bytes to the backend.
    Forward,
    /// Do not forward; answer the client with this message instead
    /// (e.g. a `ReadOnlyError` error reply).
    Reply(Message),
    /// Do not forward and send nothing back (an async call whose error can
    /// only surface at the next sync call).
    Swallow,
    /// Close the session; the string is logged as the reason.
    Close(String),
    /// (`register` only) Continue the whole session on another connection:
    /// the client's handshake answer and this `register` are sent there.
    Reroute(Reroute),
    /// Send the original bytes to the local connection kept by a
    /// [`Reroute`]; its reply goes through [`SessionHooks::on_local_reply`].
    Local,
    /// Hold the message; [`SessionHooks::on_deferred`] decides again when
    /// the wake signal changes or at `until` at the latest.
    Defer(Instant),
}

/// What the session does with a reply from the local connection.
#[derive(Debug, PartialEq, Eq)]
pub enum LocalVerdict {
    /// Give it to the client.
    Deliver,
    /// Drop it and send the original call to the upstream instead.
    Retry,
}

/// What the session does when its wake signal changes.
#[derive(Debug, PartialEq, Eq)]
pub enum WakeVerdict {
    Nothing,
    /// End the session at the next safe point (no call or transaction in
    /// flight); the client reconnects.
    CloseAtSafePoint(&'static str),
}

/// What the session does with a message from the backend.
#[derive(Debug)]
pub enum ServerVerdict {
    Forward,
    Drop,
    Replace(Vec<Message>),
    /// Close the session (the client reconnects and revalidates its cache).
    Close(String),
    /// Deliver this message, and everything after it to this client (order
    /// is kept), only once `release` shows a tid `>= until` (see
    /// [`HoldUntil`]).
    Hold(HoldUntil),
    /// A reply delivered now, ahead of the messages held for this client
    /// that still wait for a later position (those the released position
    /// allows go first; the same as `Forward` when none are held). Only for a reply that shows
    /// nothing the held messages hide, and whose order relative to them the
    /// client does not depend on (e.g. a load of an object none of them
    /// touches: a reply to a sync call is matched by its msgid).
    Overtake,
}

/// Holds server->client messages until a tid is released. The relay knows
/// tids as 8-byte strings and nothing of what releases them (e.g. replica
/// acknowledgements on a semi-synchronous primary).
#[derive(Debug)]
pub struct HoldUntil {
    pub until: [u8; 8],
    /// The released position; a closed sender releases everything.
    pub release: tokio::sync::watch::Receiver<[u8; 8]>,
}

/// A sync call from the client whose reply has not arrived yet.
#[derive(Debug, Clone)]
pub struct PendingCall {
    pub msgid: Value,
    pub method: crate::wire::Method,
    /// When it went upstream; only for calls whose latency is measured
    /// (`tpc_finish`): reading the clock per call was a tenth of a relayed
    /// round trip's instructions.
    pub sent: Option<std::time::Instant>,
}

/// What a client may do through this door, decided before the session
/// starts (e.g. from its TLS client certificate) by whoever accepted the
/// connection. A read-only session is refused every write exactly like a
/// session on a replica (see [`super::read_only`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

impl Access {
    pub fn label(self) -> &'static str {
        match self {
            Access::ReadWrite => "read-write",
            Access::ReadOnly => "read-only",
        }
    }
}

/// Facts about the session that hooks may read; owned and updated by the
/// session itself.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub conn_id: u64,
    pub peer: String,
    pub encoding: crate::wire::Encoding,
    /// Storage name and read-only flag of an accepted `register`.
    pub registered: Option<(String, bool)>,
    /// A `tpc_begin` was relayed and no finish/abort has completed it.
    pub in_transaction: bool,
    /// Where the session's calls go after `register`: empty for the node's
    /// own backend, else the destination of a [`Reroute`] (for logs).
    pub route: String,
    /// What the door granted this client.
    pub access: Access,
    /// Who the client proved to be (e.g. its certificate's name), if anyone.
    pub identity: Option<String>,
}

pub trait SessionHooks: Send {
    /// Called for each decoded client message (heartbeats excluded).
    fn on_client_message(&mut self, _info: &SessionInfo, _msg: &Message) -> ClientVerdict {
        ClientVerdict::Forward
    }

    /// Called for each decoded backend message; `answers` is the client call
    /// a reply belongs to, if it is one.
    fn on_server_message(
        &mut self,
        _info: &SessionInfo,
        _msg: &Message,
        _answers: Option<&PendingCall>,
    ) -> ServerVerdict {
        ServerVerdict::Forward
    }

    /// Called once when the session ends, whatever the reason.
    fn on_close(&mut self, _info: &SessionInfo) {}

    /// A reply from the local connection to a call sent with
    /// [`ClientVerdict::Local`].
    fn on_local_reply(&mut self, _info: &SessionInfo, _msg: &Message) -> LocalVerdict {
        LocalVerdict::Deliver
    }

    /// A message held by [`ClientVerdict::Defer`]: decide again. `expired`:
    /// its deadline has passed (returning `Defer` again is then taken as
    /// `Forward`).
    fn on_deferred(
        &mut self,
        _info: &SessionInfo,
        _msg: &Message,
        _expired: bool,
    ) -> ClientVerdict {
        ClientVerdict::Forward
    }

    /// A signal that wakes the session when something the hooks depend on
    /// changed (e.g. the local replica's position). Taken once, at start.
    fn wake_signal(&mut self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// The wake signal changed.
    fn on_wake(&mut self, _info: &SessionInfo) -> WakeVerdict {
        WakeVerdict::Nothing
    }

    /// The local connection failed; everything goes upstream from now on.
    fn on_local_lost(&mut self, _info: &SessionInfo) {}

    /// Called once before the session connects anywhere: `Some` makes the
    /// whole session (handshake included) go there instead of the node's
    /// own backend (e.g. this node's backend is behind or stuck).
    fn early_route(&mut self) -> Option<std::sync::Arc<dyn UpstreamOpener>> {
        None
    }
}

/// A transparent relay: every message passes untouched.
pub struct PassThrough;

impl SessionHooks for PassThrough {}

/// Several hooks on one session, consulted in order: the first verdict that
/// is not `Forward` wins (the later hooks do not see that message); every
/// hook hears `on_close`. For hooks that mostly observe (capture of commits,
/// of packs) on the same session.
pub struct Chain(pub Vec<Box<dyn SessionHooks>>);

impl SessionHooks for Chain {
    fn on_client_message(&mut self, info: &SessionInfo, msg: &Message) -> ClientVerdict {
        for h in &mut self.0 {
            match h.on_client_message(info, msg) {
                ClientVerdict::Forward => {}
                other => return other,
            }
        }
        ClientVerdict::Forward
    }

    fn on_server_message(
        &mut self,
        info: &SessionInfo,
        msg: &Message,
        answers: Option<&PendingCall>,
    ) -> ServerVerdict {
        for h in &mut self.0 {
            match h.on_server_message(info, msg, answers) {
                ServerVerdict::Forward => {}
                other => return other,
            }
        }
        ServerVerdict::Forward
    }

    fn on_close(&mut self, info: &SessionInfo) {
        for h in &mut self.0 {
            h.on_close(info);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Refuse;
    impl SessionHooks for Refuse {
        fn on_client_message(&mut self, _: &SessionInfo, _: &Message) -> ClientVerdict {
            ClientVerdict::Swallow
        }
    }

    struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl SessionHooks for Count {
        fn on_client_message(&mut self, _: &SessionInfo, _: &Message) -> ClientVerdict {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ClientVerdict::Forward
        }
    }

    #[test]
    fn a_chain_asks_in_order_until_one_decides() {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let info = SessionInfo {
            conn_id: 1,
            peer: "p".into(),
            encoding: crate::wire::Encoding::Pickle,
            registered: None,
            in_transaction: false,
            route: String::new(),
            access: crate::relay::Access::ReadWrite,
            identity: None,
        };
        let msg = Message::call(Value::Int(1), "ping", vec![]);
        let mut c = Chain(vec![
            Box::new(Count(n.clone())),
            Box::new(Refuse),
            Box::new(Count(n.clone())),
        ]);
        assert!(matches!(
            c.on_client_message(&info, &msg),
            ClientVerdict::Swallow
        ));
        assert_eq!(n.load(std::sync::atomic::Ordering::Relaxed), 1);
        let mut c = Chain(vec![Box::new(Count(n.clone())), Box::new(Count(n.clone()))]);
        assert!(matches!(
            c.on_client_message(&info, &msg),
            ClientVerdict::Forward
        ));
        assert_eq!(n.load(std::sync::atomic::Ordering::Relaxed), 3);
    }
}
