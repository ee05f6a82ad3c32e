//! A value that a reload replaces while readers keep using the one they got.
//!
//! `get` hands out an `Arc` of the current value: a TLS handshake that began
//! with the old certificate finishes with it, the next one sees the new one.
//! A std `RwLock` around an `Arc` is enough here: readers hold the lock for
//! one clone, writes happen on SIGHUP.

use std::sync::{Arc, RwLock};

pub struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    pub fn new(value: T) -> Arc<Self> {
        Arc::new(Live(RwLock::new(Arc::new(value))))
    }

    pub fn get(&self) -> Arc<T> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set(&self, value: T) {
        let mut g = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = Arc::new(value);
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_keep_their_value_after_a_set() {
        let live = Live::new(1);
        let before = live.get();
        live.set(2);
        assert_eq!(*before, 1);
        assert_eq!(*live.get(), 2);
    }
}
