//! Replication between zrelay proxies.

pub mod applied;
pub mod applier;
pub mod capture;
pub mod clone;
pub mod clone_serve;
pub mod feed;
pub mod filestorage;
pub mod history;
pub mod pack;
pub mod protocol;
pub mod receiver;
pub mod replica;
pub mod replica_session;
pub mod restore_bench;
pub mod rewind;
pub mod semisync;
pub mod sender;
pub mod spool;
pub mod stream_io;
pub mod tls;
pub mod txn;
