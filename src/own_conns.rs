//! zrelay's own registered connections to its backend, per storage.
//!
//! ZEO's `server_status()`/`ruok` report `connections`: the connections
//! *registered* with a storage (a connection that only did the handshake, or
//! a `ruok` probe, is not counted). zrelay's observer, history readers and
//! applier must register, so the backend counts them; client sessions read
//! the count through `relay::transparency`, which subtracts what is recorded
//! here so monitors see only the connections clients opened.
//!
//! Each registration is an RAII [`Registration`]: counted when the backend
//! accepted `register`, uncounted when the connection is dropped.

use std::collections::BTreeMap;
use std::sync::Mutex;

use metrics::{describe_gauge, gauge};

pub const OWN_CONNECTIONS: &str = "zrelay_backend_own_connections";

static OWN: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

pub fn describe() {
    describe_gauge!(
        OWN_CONNECTIONS,
        "zrelay's own connections registered with the backend storage (observer, history readers, applier); not shown to clients in server_status/ruok."
    );
    record(&OWN.lock().unwrap_or_else(|e| e.into_inner()));
}

fn record(map: &BTreeMap<String, usize>) {
    gauge!(OWN_CONNECTIONS).set(map.values().sum::<usize>() as f64);
}

/// How many of zrelay's own connections are registered with `storage`.
pub fn registered(storage: &str) -> usize {
    OWN.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(storage)
        .copied()
        .unwrap_or(0)
}

/// One own connection registered with a storage; uncounted on drop.
#[derive(Debug)]
pub struct Registration {
    storage: String,
}

impl Registration {
    pub fn new(storage: &str) -> Registration {
        let mut map = OWN.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(storage.to_string()).or_insert(0) += 1;
        record(&map);
        Registration {
            storage: storage.to_string(),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = OWN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.storage) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.storage);
            }
        }
        record(&map);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_while_held() {
        // A storage name no other test uses (the registry is process-wide).
        let s = "own-conns-test";
        assert_eq!(registered(s), 0);
        let a = Registration::new(s);
        let b = Registration::new(s);
        assert_eq!(registered(s), 2);
        drop(a);
        assert_eq!(registered(s), 1);
        drop(b);
        assert_eq!(registered(s), 0);
    }
}
