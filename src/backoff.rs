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

    /// Whether a session that ended proved healthy, so that the next retry starts again from
    /// the shortest delay: it got through its setup and then did a step of its work without
    /// error that shows the connection works (`proved`: handed events to the pipeline, or a
    /// read or wait its source counts as proof — `Source::proved` in the listener), or it lasted at least [`Backoff::max`] (`lasted`), so a run of such
    /// sessions retries no faster than the longest delay would. A session that connects and
    /// fails at once — the server accepts the connection, then the step after it errors each
    /// time — proved nothing: its retries keep growing, rather than hammer the server at the
    /// shortest delay for ever.
    pub fn healthy(&self, proved: bool, lasted: Duration) -> bool {
        proved || lasted >= self.max
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
    fn only_a_session_that_proved_healthy_starts_the_delays_again() {
        let b = Backoff::default();
        let quick = Duration::from_millis(30);
        assert!(
            b.healthy(true, quick),
            "got through its setup and did some work"
        );
        assert!(
            b.healthy(false, b.max),
            "lasted as long as the longest delay"
        );
        assert!(b.healthy(false, Duration::from_secs(3600)));
        assert!(!b.healthy(false, quick), "connected, then failed at once");
        assert!(!b.healthy(false, b.max - Duration::from_millis(1)));
    }

    /// The attempts as the listener shell counts them: reset by a healthy session, one more
    /// for each restart.
    fn attempts(b: &Backoff, sessions: &[(bool, Duration)]) -> Vec<u32> {
        let mut attempt = 0u32;
        sessions
            .iter()
            .map(|&(proved, lasted)| {
                if b.healthy(proved, lasted) {
                    attempt = 0;
                }
                attempt = attempt.saturating_add(1);
                attempt
            })
            .collect()
    }

    #[test]
    fn sessions_that_connect_and_fail_at_once_retry_ever_more_slowly() {
        let b = Backoff::default();
        let failing = (false, Duration::from_millis(20));
        let seq = attempts(&b, &[failing; 9]);
        assert_eq!(seq, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let delays: Vec<Duration> = seq.iter().map(|&a| b.ceiling(a)).collect();
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert_eq!(delays[8], b.max, "up to the longest delay");
        // A session that worked starts them again; a long-lived one too.
        let healthy = (true, Duration::from_millis(20));
        let long = (false, b.max);
        assert_eq!(
            attempts(&b, &[failing, failing, healthy, failing, long, failing]),
            [1, 2, 1, 2, 1, 2]
        );
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
