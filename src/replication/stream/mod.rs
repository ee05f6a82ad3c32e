//! What both ends of a replication stream share.

pub mod protocol;
pub mod stream_io;
pub mod tls;
pub mod txn;
