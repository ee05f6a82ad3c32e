//! The client side of the proxy: accepting ZEO clients and relaying each one
//! to its own backend connection. Knows the ZEO wire layer and the session
//! hooks; knows nothing of replication streams or TLS (a door outside this
//! layer turns a TCP connection into a client stream and an [`Access`]).

pub mod backend;
pub mod hooks;
pub mod limits;
pub mod listener;
pub mod read_only;
pub mod session;
pub mod transparency;

pub use hooks::{
    Access, ClientVerdict, HoldUntil, LocalVerdict, PassThrough, Reroute, ServerVerdict,
    SessionHooks, SessionInfo, UpstreamOpener, WakeVerdict,
};
pub use session::{Session, SessionLimits};
