//! Waiting for locks while installing or removing triggers, without holding up the
//! application: each attempt waits for a lock at most [`LOCK_ATTEMPT`], failed attempts are
//! rolled back and retried after a capped, jittered backoff, every wait is logged with what
//! is waited for and who holds it, and [`Error::LockTimeout`] ends the wait once the install
//! timeout has passed.
//!
//! Why short attempts: a DDL statement that waits for a table lock sits in the lock queue, and
//! every later writer of that table queues behind it. A DDL that waited for as long as the
//! longest open transaction would stall the application's writes for that long; an attempt
//! that gives up after [`LOCK_ATTEMPT`] stalls them for at most that.

use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::error::{Error, Result};

/// How long one attempt waits for a lock (PostgreSQL `lock_timeout`; SQLite's busy timeout
/// per attempt). Application writes queued behind the attempt wait at most this long.
/// MySQL counts lock waits in whole seconds: there one attempt waits 1 s.
pub(crate) const LOCK_ATTEMPT: Duration = Duration::from_millis(200);

/// The default of [`NotifierBuilder::install_timeout`](crate::NotifierBuilder::install_timeout).
pub(crate) const DEFAULT_INSTALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Delay between attempts: 50 ms doubling up to 2 s, jittered.
const RETRY: Backoff = Backoff {
    base: Duration::from_millis(50),
    max: Duration::from_secs(2),
};

/// A lock an attempt could not get in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Blocked {
    /// What was waited for: `schema.table`, a database file, or the install lock.
    pub object: String,
    /// Who holds it, when the database says.
    pub holder_pids: Vec<u64>,
}

/// The object name for the install lock (another instance installing).
#[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
pub(crate) const INSTALL_LOCK_OBJECT: &str = "the sqlnotify install lock";

/// One bounded wait: attempts until the timeout, with the state needed to log and to fail.
#[derive(Debug)]
pub(crate) struct LockWait {
    doing: &'static str,
    timeout: Duration,
    started: Instant,
    attempts: u32,
    last: Option<Blocked>,
}

impl LockWait {
    /// Starts the clock for `doing` (e.g. `"installing triggers"`).
    pub fn new(doing: &'static str, timeout: Duration) -> Self {
        LockWait {
            doing,
            timeout,
            started: Instant::now(),
            attempts: 0,
            last: None,
        }
    }

    /// Time left before giving up.
    pub fn remaining(&self) -> Duration {
        self.timeout.saturating_sub(self.started.elapsed())
    }

    /// How long the next attempt may wait for a lock: [`LOCK_ATTEMPT`], or what is left of
    /// the timeout when that is less (never zero: zero means "wait forever" to PostgreSQL).
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub fn attempt_budget(&self) -> Duration {
        LOCK_ATTEMPT
            .min(self.remaining())
            .max(Duration::from_millis(1))
    }

    /// Records a failed attempt: logs what is waited for, and returns how long to back off
    /// before the next one — or [`Error::LockTimeout`] when the timeout has passed.
    pub fn note(&mut self, blocked: Blocked) -> Result<Duration> {
        self.attempts += 1;
        let waited = self.started.elapsed();
        if waited >= self.timeout {
            log::warn!(
                "sqlnotify: {}: giving up after {:.1} s waiting for a lock on {} ({})",
                self.doing,
                waited.as_secs_f64(),
                blocked.object,
                holders(&blocked.holder_pids)
            );
            return Err(Error::LockTimeout {
                object: blocked.object,
                holder_pids: blocked.holder_pids,
                waited,
            });
        }
        if self.last.as_ref() != Some(&blocked) {
            log::warn!(
                "sqlnotify: {}: waiting for a lock on {} ({}); retrying every few seconds for \
                 up to {:.1} s, each attempt holding up writers at most {} ms",
                self.doing,
                blocked.object,
                holders(&blocked.holder_pids),
                self.timeout.as_secs_f64(),
                LOCK_ATTEMPT.as_millis()
            );
        } else {
            log::debug!(
                "sqlnotify: {}: still waiting for a lock on {} (attempt {})",
                self.doing,
                blocked.object,
                self.attempts
            );
        }
        self.last = Some(blocked);
        Ok(RETRY.delay(self.attempts).min(self.remaining()))
    }

    /// [`note`](Self::note), then sleeps through the backoff.
    #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
    pub async fn retry_after(&mut self, blocked: Blocked) -> Result<()> {
        let delay = self.note(blocked)?;
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

fn holders(pids: &[u64]) -> String {
    match pids {
        [] => "holder not known".to_string(),
        [pid] => format!("held by pid {pid}"),
        pids => format!(
            "held by pids {}",
            pids.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(pid: u64) -> Blocked {
        Blocked {
            object: "public.t".into(),
            holder_pids: vec![pid],
        }
    }

    #[test]
    fn attempts_are_short_and_never_unbounded() {
        let wait = LockWait::new("testing", Duration::from_secs(30));
        assert_eq!(wait.attempt_budget(), LOCK_ATTEMPT);
        let wait = LockWait::new("testing", Duration::from_millis(50));
        assert!(wait.attempt_budget() <= Duration::from_millis(50));
        let wait = LockWait::new("testing", Duration::ZERO);
        assert_eq!(wait.attempt_budget(), Duration::from_millis(1));
    }

    #[test]
    fn backs_off_within_the_timeout_then_fails_with_what_blocked() {
        let mut wait = LockWait::new("testing", Duration::from_secs(30));
        let delay = wait.note(blocked(7)).unwrap();
        assert!(delay <= RETRY.ceiling(1), "{delay:?}");
        let mut expired = LockWait::new("testing", Duration::ZERO);
        match expired.note(blocked(7)) {
            Err(Error::LockTimeout {
                object,
                holder_pids,
                ..
            }) => assert_eq!((object.as_str(), holder_pids), ("public.t", vec![7])),
            other => panic!("expected a lock timeout, got {other:?}"),
        }
    }
}
