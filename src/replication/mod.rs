//! Replication between zrelay proxies, laid out by side:
//!
//! - [`stream`]: what both ends share: the unit of replication ([`txn`]),
//!   the framed stream messages ([`protocol`]), the one read loop
//!   ([`stream_io`]) and mutual TLS ([`tls`]);
//! - [`primary`]: the feeding side: the commit feed and replication listener
//!   ([`feed`]), the I/O-free sender state ([`sender`]), history reads
//!   ([`history`]), the capture fast path ([`capture`]), semi-sync
//!   acknowledgements ([`semisync`]) and serving clones ([`clone_serve`]);
//! - [`replica`]: the following side: the replica task (in `replica` itself),
//!   the I/O-free receiver state ([`receiver`]), the applier ([`applier`],
//!   [`applied`]), the replica's client sessions ([`replica_session`]), its
//!   relay log ([`spool`]) and `zrelay clone` ([`clone`]);
//! - both sides or offline: packs ([`pack`]), the FileStorage format
//!   ([`filestorage`]), `zrelay rewind` ([`rewind`]), the restore benchmark
//!   ([`restore_bench`]).
//!
//! The modules are re-exported here under their short names
//! (`replication::feed`, ...), so paths read the same from anywhere.

pub mod filestorage;
pub mod pack;
pub mod primary;
pub mod replica;
pub mod restore_bench;
pub mod rewind;
pub mod stages;
pub mod stream;

pub use primary::{capture, clone_serve, feed, history, semisync, sender};
pub use replica::{applied, applier, clone, receiver, replica_session, spool};
pub use stream::{protocol, stream_io, tls, txn};
