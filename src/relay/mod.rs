//! The client side of the proxy: accepting ZEO clients and relaying each one
//! to its own backend connection. Knows the ZEO wire layer and the session
//! hooks; knows nothing of replication streams or TLS.

pub mod backend;
pub mod hooks;
pub mod listener;
pub mod session;

pub use hooks::{
    ClientVerdict, HoldUntil, LocalVerdict, PassThrough, Reroute, ServerVerdict, SessionHooks,
    SessionInfo, UpstreamOpener, WakeVerdict,
};
pub use session::{Session, SessionLimits};
