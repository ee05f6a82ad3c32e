//! Interception points of a client session.
//!
//! A session moves ZEO messages between one client and the backend. What a
//! given kind of session does differently (a primary capturing commits, a
//! replica refusing writes and rewriting invalidations, a routed session
//! sending loads elsewhere) is expressed by overriding these hooks; the
//! defaults relay everything untouched.

use crate::wire::{Message, Value};

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
}

/// What the session does with a message from the backend.
#[derive(Debug)]
pub enum ServerVerdict {
    Forward,
    Drop,
    Replace(Vec<Message>),
    /// Close the session (the client reconnects and revalidates its cache).
    Close(String),
}

/// A sync call from the client whose reply has not arrived yet.
#[derive(Debug, Clone)]
pub struct PendingCall {
    pub msgid: Value,
    pub method: String,
    pub sent: std::time::Instant,
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
}

/// A transparent relay: every message passes untouched.
pub struct PassThrough;

impl SessionHooks for PassThrough {}
