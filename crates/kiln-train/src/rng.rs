//! The one random source of training: ChaCha8 with explicit, portable conversions.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Independent streams of one seed: initialisation and each epoch's shuffle draw from their own
/// stream, so changing the number of epochs never changes the weights, and vice versa.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Init,
    Shuffle { epoch: usize },
}

/// A seeded generator; identical output for identical (seed, stream) on every platform.
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64, stream: Stream) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        r.set_stream(match stream {
            Stream::Init => 0,
            Stream::Shuffle { epoch } => 1 + epoch as u64,
        });
        Rng(r)
    }

    /// Uniform in [0, 1) with 24 random bits, exactly representable in f32.
    pub fn unit_f32(&mut self) -> f32 {
        (self.0.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit_f32()
    }

    /// Uniform integer in [0, n) without modulo bias (Lemire's method with rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0) has no values");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.0.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_and_pinned_values() {
        let draw = |s| {
            let mut r = Rng::new(s, Stream::Init);
            (0..4).map(|_| r.unit_f32()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // Pinned so that an accidental change of generator or conversion is caught: these are
        // the numbers every platform must produce for seed 0.
        let mut r = Rng::new(0, Stream::Init);
        let v: Vec<u32> = (0..3).map(|_| (r.unit_f32() * 1e6) as u32).collect();
        assert_eq!(v, PINNED);
    }

    const PINNED: [u32; 3] = [654_697, 709_075, 729_869];

    #[test]
    fn streams_are_independent() {
        let mut a = Rng::new(1, Stream::Shuffle { epoch: 0 });
        let mut b = Rng::new(1, Stream::Shuffle { epoch: 1 });
        let mut c = Rng::new(1, Stream::Init);
        let (x, y, z) = (a.0.next_u64(), b.0.next_u64(), c.0.next_u64());
        assert!(x != y && y != z && x != z);
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = Rng::new(3, Stream::Init);
        let mut counts = [0usize; 6];
        for _ in 0..60_000 {
            counts[r.below(6) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..1000).collect();
        Rng::new(5, Stream::Shuffle { epoch: 2 }).shuffle(&mut v);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
    }
}
