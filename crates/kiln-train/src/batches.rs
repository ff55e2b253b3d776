//! Which examples each step sees: d2l's `DataLoader(shuffle=True)` order, with the last partial
//! batch kept.

use std::ops::Range;

use crate::rng::{Rng, Stream};

/// The order of the `n` training examples in `epoch`: a seeded shuffle, or `0..n` when
/// `shuffle` is false. Each epoch has its own random stream.
pub fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    if shuffle {
        Rng::new(seed, Stream::Shuffle { epoch }).shuffle(&mut order);
    }
    order
}

/// Consecutive batches covering `0..n`: full batches of `batch_size`, then the remainder
/// (60,000 at 256 gives 234 x 256 + 96).
pub fn batch_ranges(n: usize, batch_size: usize) -> Vec<Range<usize>> {
    assert!(batch_size > 0, "batch size must be positive");
    (0..n.div_ceil(batch_size))
        .map(|b| b * batch_size..((b + 1) * batch_size).min(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixty_thousand_at_256_keeps_the_last_96() {
        let b = batch_ranges(60_000, 256);
        assert_eq!(b.len(), 235);
        assert!(b[..234].iter().all(|r| r.len() == 256));
        assert_eq!(b[234], 59_904..60_000);
        assert_eq!(batch_ranges(10, 20), vec![0..10]);
        assert!(batch_ranges(0, 4).is_empty());
    }

    #[test]
    fn orders_are_seeded_per_epoch() {
        assert_eq!(epoch_order(100, 1, 0, true), epoch_order(100, 1, 0, true));
        assert_ne!(epoch_order(100, 1, 0, true), epoch_order(100, 1, 1, true));
        assert_ne!(epoch_order(100, 1, 0, true), epoch_order(100, 2, 0, true));
        assert_eq!(epoch_order(5, 1, 0, false), [0, 1, 2, 3, 4]);
        // Pinned for platform independence.
        assert_eq!(epoch_order(8, 0, 0, true), PINNED);
    }

    const PINNED: [u32; 8] = [7, 0, 2, 1, 4, 3, 5, 6];
}
