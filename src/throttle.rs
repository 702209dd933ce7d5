//! A warning logged at most once a minute: what arrives from the database or a channel may be
//! sent by anyone, and each one of it must not cost a log line.

use std::time::{Duration, Instant};

/// How often a throttled warning is logged at most (each occurrence is still counted).
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(60);

/// When a warning was last logged.
#[derive(Debug, Default)]
pub(crate) struct Throttled(Option<Instant>);

impl Throttled {
    /// Whether to log now (and, if so, not again for [`WARN_EVERY`]).
    pub fn due(&mut self) -> bool {
        let due = self.0.is_none_or(|at| at.elapsed() >= WARN_EVERY);
        if due {
            self.0 = Some(Instant::now());
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_is_due_once_then_not_until_the_interval_passed() {
        let mut warned = Throttled::default();
        assert!(warned.due());
        assert!(!warned.due());
        warned.0 = Some(Instant::now() - WARN_EVERY);
        assert!(warned.due());
        assert!(!warned.due());
    }
}
