//! A running named consumer's backlog: counted in the database every few seconds into
//! [`Stats::backlog`](crate::Stats::backlog) and the consumer's backlog and lag gauges, with a
//! rate-limited warning past a threshold.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dialect::Dialect;
use crate::instruments::ConsumerMetrics;
use crate::stats::Counters;

/// How often a running consumer's backlog is counted.
pub(crate) const BACKLOG_EVERY: Duration = Duration::from_secs(2);
/// How often the backlog warning may repeat while the backlog stays over the threshold.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Decides when a backlog is worth a warning: when it first reaches the threshold, then at
/// most every [`WARN_EVERY`] while it stays there; falling below re-arms it.
#[derive(Debug)]
pub(crate) struct BacklogWarning {
    threshold: u64,
    last: Option<Instant>,
}

impl BacklogWarning {
    /// A threshold of 0 never warns.
    pub fn new(threshold: u64) -> Self {
        BacklogWarning {
            threshold,
            last: None,
        }
    }

    /// Whether `backlog`, observed at `now`, should be logged as a warning.
    pub fn observe(&mut self, backlog: u64, now: Instant) -> bool {
        if self.threshold == 0 || backlog < self.threshold {
            self.last = None;
            return false;
        }
        match self.last {
            Some(at) if now.saturating_duration_since(at) < WARN_EVERY => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

/// The task counting a running consumer's backlog; dropping it stops the task.
pub(crate) struct BacklogWatch(tokio::task::JoinHandle<()>);

impl Drop for BacklogWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts a running consumer's backlog every [`BACKLOG_EVERY`] into `stats` and its gauges
/// (the oldest row's age too), warning past
/// `threshold`, until the returned handle is dropped.
pub(crate) fn watch_backlog(
    dialect: Arc<dyn Dialect>,
    name: String,
    stats: Arc<Counters>,
    threshold: u64,
) -> BacklogWatch {
    BacklogWatch(actix::spawn(async move {
        let mut warning = BacklogWarning::new(threshold);
        let metrics = ConsumerMetrics::new(&name);
        loop {
            // Guarded: a panic (a driver's, on a row it cannot convert) would end the task,
            // and with it the count and the warning, for good.
            let counting = crate::error::caught(
                || format!("counting the backlog of consumer {name:?}"),
                dialect.consumer_backlog(name.clone()),
            );
            match counting.await {
                Ok(counted) => {
                    let counted = counted.unwrap_or_default();
                    let backlog = counted.rows;
                    stats.backlog.store(backlog, Ordering::Relaxed);
                    metrics.backlog.set(backlog as f64);
                    metrics.lag.set(
                        counted
                            .oldest_age
                            .filter(|_| backlog > 0)
                            .map_or(0.0, |age| age.as_secs_f64()),
                    );
                    if warning.observe(backlog, Instant::now()) {
                        log::warn!(
                            "sqlnotify: consumer {name:?} has {backlog} journal rows not yet \
                             handed to its subscribers (warning threshold {threshold}); they are \
                             kept in the database until it reads them"
                        );
                    }
                }
                Err(e) => log::debug!("sqlnotify: cannot count the backlog of {name:?}: {e}"),
            }
            tokio::time::sleep(BACKLOG_EVERY).await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warning_fires_once_per_minute_while_over_and_rearms_below() {
        let t0 = Instant::now();
        let mut w = BacklogWarning::new(100);
        assert!(!w.observe(99, t0));
        assert!(w.observe(100, t0));
        assert!(!w.observe(5_000, t0 + Duration::from_secs(59)));
        assert!(w.observe(5_000, t0 + Duration::from_secs(60)));
        assert!(!w.observe(10, t0 + Duration::from_secs(61)));
        assert!(w.observe(100, t0 + Duration::from_secs(62)), "re-armed");
        let mut off = BacklogWarning::new(0);
        assert!(!off.observe(u64::MAX, t0));
    }
}
