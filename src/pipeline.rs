//! The pipeline after the listener, wired in one place: the in-flight budget, the counters,
//! the registry and the decoder, for a notifier's channels. `NotifierBuilder::start` puts a
//! listener in front of it; `bench_support` feeds it by hand.
//!
//! The in-flight budget (a `Semaphore`) is what keeps memory bounded: a listener takes one
//! unit per event before it reads on, and the registry and the subscriber buffers give the
//! units back once an event is handed over or dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::Semaphore;

use crate::closure_host::ClosureHosts;
use crate::decoder::{Decoder, Retention};
use crate::event::Channels;
use crate::lifecycle::{Flush, Shutdown};
use crate::overflow::OverflowStore;
use crate::registry::Registry;
use crate::stats::Counters;

/// Default in-flight budget (events).
pub(crate) const DEFAULT_MAX_IN_FLIGHT: usize = 4_096;
/// Smallest in-flight budget a notifier accepts: one listener batch must fit.
pub(crate) const MIN_IN_FLIGHT: usize = 1_024;
/// How long `stop()` waits for a pipeline that makes no progress before it stops without
/// handing the rest over: longer than the decoder may wait for one overflow row.
pub(crate) const STALLED_ON_STOP: Duration = Duration::from_secs(15);

/// How the pipeline is sized and paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PipelineOptions {
    /// The in-flight budget, in events.
    pub max_in_flight: usize,
    /// Shortest time between two `Lagged` notices for one subscription.
    pub lag_interval: Duration,
    /// How long delivered rows are kept, and how often older ones are purged.
    pub retention: Retention,
}

/// A running decoder and registry, with what they share.
pub(crate) struct Pipeline {
    /// The channels events arrive on.
    pub channels: Arc<Channels>,
    /// The counters every stage adds to.
    pub stats: Arc<Counters>,
    /// The in-flight budget: whoever hands the decoder a batch holds one unit per event.
    pub budget: Arc<Semaphore>,
    /// Routes events to subscribers.
    pub registry: Addr<Registry>,
    /// Decodes batches (resolving references through the store) and passes them on.
    pub decoder: Addr<Decoder>,
    /// Where closure subscribers run.
    pub closures: ClosureHosts,
}

impl Pipeline {
    /// Starts the registry and the decoder for `channels`; `store` resolves overflow
    /// references and runs the retention purge. Must run inside an actix system.
    pub fn start(
        channels: Channels,
        store: Arc<dyn OverflowStore>,
        options: PipelineOptions,
    ) -> Pipeline {
        let channels = Arc::new(channels);
        let stats = Arc::new(Counters::default());
        let budget = Arc::new(Semaphore::new(options.max_in_flight));
        let registry = Registry::new(channels.clone(), stats.clone(), budget.clone())
            .lag_interval(options.lag_interval)
            .start();
        let decoder = Decoder::new(
            channels.clone(),
            crate::overflow::guarded(store),
            registry.clone(),
            stats.clone(),
            options.retention,
            budget.clone(),
        )
        .start();
        Pipeline {
            closures: ClosureHosts::new(stats.clone()),
            channels,
            stats,
            budget,
            registry,
            decoder,
        }
    }

    /// Resolves once everything handed to the decoder before has been routed and handed
    /// over, and closure subscribers have run it.
    pub async fn flush(&self) {
        let _ = self.decoder.send(Flush).await;
    }

    /// [`flush`](Self::flush) for `stop()`: waits as long as the pipeline makes progress
    /// (events decoded and routed, handed over or dropped, run by closure subscribers), and
    /// gives up once it made none for [`STALLED_ON_STOP`] — a subscriber that reads nothing
    /// (a channel whose reader is gone but not dropped, a stuck actor) would otherwise hold
    /// `stop()` for ever. Returns whether everything was handed over; what was not is dropped
    /// (and counted) when the pipeline shuts down.
    pub async fn flush_on_stop(&self) -> bool {
        let progress = || {
            let s = &self.stats;
            [&s.settled, &s.delivered, &s.dropped, &s.closures_ran]
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        let flush = self.flush();
        tokio::pin!(flush);
        let mut seen = progress();
        loop {
            if tokio::time::timeout(STALLED_ON_STOP, &mut flush)
                .await
                .is_ok()
            {
                return true;
            }
            let now = progress();
            if now == seen {
                log::warn!(
                    "sqlnotify: stopping with {} events still waiting for subscribers, after \
                     {} s in which the pipeline made no progress; they are dropped",
                    self.stats.queued.load(Ordering::Relaxed),
                    STALLED_ON_STOP.as_secs()
                );
                return false;
            }
            seen = now;
        }
    }

    /// Stops the decoder and the registry, after what is already in their mailboxes.
    pub fn shutdown(&self) {
        self.decoder.do_send(Shutdown);
        self.registry.do_send(Shutdown);
    }

    /// [`shutdown`](Self::shutdown), resolving once both have stopped: the decoder first
    /// (after the batches it still holds, whose events the registry then routes), then the
    /// registry, so that what could not be handed over is counted as dropped by then.
    pub async fn shutdown_counted(&self) {
        let _ = self.decoder.send(Shutdown).await;
        let _ = self.registry.send(Shutdown).await;
    }
}
