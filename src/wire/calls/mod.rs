//! Typed, borrowing views of the messages a proxy intercepts. Method names
//! and argument lists follow ZEO 6.2's `ZEOStorage` (StorageServer.py) and
//! the client callbacks in `ZEO/asyncio/client.py`.

mod args;
mod client;
mod server;

pub use super::tid::{tid_to_hex, Z64};
pub use client::{undo_id_to_tid, ClientCall};
pub use server::ServerMsg;
