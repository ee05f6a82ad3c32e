//! Helpers shared by the unit tests of several modules (compiled only for
//! `cargo test`).

use rand::distr::uniform::SampleUniform;
use rand::rngs::StdRng;
use rand::{Rng as _, RngCore, SeedableRng};

/// A seeded generator (rand's `StdRng`): deterministic, so the seed names a
/// failing case.
pub(crate) struct Rng(StdRng);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(StdRng::seed_from_u64(seed))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n`; 0 when `n` is 0.
    pub(crate) fn below<T: SampleUniform + PartialOrd + Default + Copy>(&mut self, n: T) -> T {
        if n <= T::default() {
            return T::default();
        }
        self.0.random_range(T::default()..n)
    }

    /// True `per_mille` times in a thousand.
    pub(crate) fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000u64) < per_mille
    }

    /// `len` random bytes.
    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.0.fill_bytes(&mut v);
        v
    }
}
