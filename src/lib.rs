//! zrelay: a replication and high-availability sidecar for ZEO servers.
//!
//! Layers (see ARCHITECTURE.md): `wire` (ZEO framing and codecs, no policy),
//! `relay` (client sessions and their hooks), `admin` (HTTP, read-only view of
//! state), `server` (process wiring).

pub mod admin;
pub mod certgen;
pub mod cluster;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod door;
pub mod live;
pub mod liveness;
pub mod metrics;
pub mod monitor;
pub mod own_conns;
pub mod relay;
pub mod reload;
pub mod replication;
pub mod role;
pub mod rolectl;
pub mod server;
pub mod status;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod verify;
pub mod wire;
pub mod zeoclient;
