//! The feeding side of replication (a primary, or a cascading replica).

pub mod capture;
pub mod clone_serve;
pub mod feed;
pub mod history;
pub mod restored;
pub mod semisync;
pub mod sender;
