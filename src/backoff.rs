//! Capped, jittered exponential backoff for reconnect attempts.
//!
//! Jitter keeps many instances that lost the same server from reconnecting in lock-step. The
//! random source is std's per-process `RandomState` seed, which is enough for spreading
//! retries and saves a dependency.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Delay policy: `base * 2^(attempt-1)`, capped at `max`, then scaled by a random factor in
/// `[0.5, 1.0]` ("equal jitter").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// Delay before the first retry (before jitter).
    pub base: Duration,
    /// Largest delay (before jitter).
    pub max: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling up to 10 s.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The un-jittered delay before retry number `attempt` (1 = first retry; 0 = no delay).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The jittered delay before retry number `attempt`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(attempt);
        let unit = (hasher.finish() % 1_000_001) as f64 / 1_000_000.0;
        ceiling.mul_f64(0.5 + unit / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        assert_eq!(b.ceiling(0), Duration::ZERO);
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(400));
        assert_eq!(b.ceiling(10), Duration::from_secs(2));
        assert_eq!(b.ceiling(200), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let b = Backoff::default();
        let mut distinct = std::collections::HashSet::new();
        for _ in 0..200 {
            let d = b.delay(4);
            assert!(d >= b.ceiling(4) / 2 && d <= b.ceiling(4), "{d:?}");
            distinct.insert(d);
        }
        assert!(distinct.len() > 1, "delays are jittered");
    }
}
