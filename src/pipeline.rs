//! The pipeline after the listener, wired in one place: the in-flight budget, the counters,
//! the registry and the decoder, for a notifier's channels. `NotifierBuilder::start` puts a
//! listener in front of it; `bench_support` feeds it by hand.
//!
//! The in-flight budget (a `Semaphore`) is what keeps memory bounded: a listener takes one
//! unit per event before it reads on, and the registry and the subscriber buffers give the
//! units back once an event is handed over or dropped. A large payload weighs more: it takes
//! one more unit per whole share of bytes it holds ([`Weight`]) (the byte budget divided by the
//! event budget), so the budget bounds the payload bytes in flight as well as the events.

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
/// Default in-flight budget in payload bytes: with the default event budget, a payload
/// weighs one more unit per 64 KiB, so NOTIFY payloads (at most 8,000 bytes) weigh one.
pub(crate) const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 256 << 20;
/// Smallest in-flight byte budget a notifier accepts.
pub(crate) const MIN_IN_FLIGHT_BYTES: usize = 1 << 20;
/// Most units one notification weighs: a listener hands its batches over in parts of at most
/// this many units, each of which must fit the smallest budget.
pub(crate) const MAX_WEIGHT: u32 = MIN_IN_FLIGHT as u32;
/// How long `stop()` waits for a pipeline that makes no progress before it stops without
/// handing the rest over: longer than the decoder may wait for one overflow row.
pub(crate) const STALLED_ON_STOP: Duration = Duration::from_secs(15);

/// How the pipeline is sized and paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PipelineOptions {
    /// The in-flight budget, in events.
    pub max_in_flight: usize,
    /// The in-flight budget, in payload bytes (see [`Weight`]).
    pub max_in_flight_bytes: usize,
    /// Shortest time between two `Lagged` notices for one subscription.
    pub lag_interval: Duration,
    /// How long delivered rows are kept, and how often older ones are purged.
    pub retention: Retention,
}

/// How much of the in-flight budget a notification's payload takes beyond its one unit per
/// event: one unit per whole `unit_bytes` it holds, where `unit_bytes` is the byte budget
/// divided by the event budget — so that a budget full of large payloads holds about the
/// byte budget, and one of small payloads the event budget. A notification weighs at most
/// [`MAX_WEIGHT`] units in all (a larger payload counts as that much: at most
/// `max_in_flight / MAX_WEIGHT` of them are in flight at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Weight {
    unit_bytes: usize,
}

impl Weight {
    /// The weight for a budget of `events` events and `bytes` payload bytes.
    pub fn new(events: usize, bytes: usize) -> Weight {
        Weight {
            unit_bytes: (bytes / events.max(1)).max(1),
        }
    }

    /// How many payload bytes one unit stands for.
    #[cfg(test)]
    pub fn unit_bytes(self) -> usize {
        self.unit_bytes
    }

    /// Units a notification of `events` events whose payload holds `bytes` takes beyond its
    /// `events`; the sum stays within [`MAX_WEIGHT`] (and is `events` alone past it).
    pub fn extra(self, bytes: usize, events: u32) -> u32 {
        let extra = u32::try_from(bytes / self.unit_bytes).unwrap_or(u32::MAX);
        extra.min(MAX_WEIGHT.saturating_sub(events))
    }
}

/// A running decoder and registry, with what they share.
pub(crate) struct Pipeline {
    /// The channels events arrive on.
    pub channels: Arc<Channels>,
    /// The counters every stage adds to.
    pub stats: Arc<Counters>,
    /// The in-flight budget: whoever hands the decoder a batch holds one unit per event,
    /// and more for large payloads ([`Weight`]).
    pub budget: Arc<Semaphore>,
    /// How payloads weigh in `budget`.
    pub weight: Weight,
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
        let weight = Weight::new(options.max_in_flight, options.max_in_flight_bytes);
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
            weight,
        )
        .start();
        Pipeline {
            closures: ClosureHosts::new(stats.clone()),
            channels,
            stats,
            budget,
            weight,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_weighs_one_unit_per_whole_share_of_the_byte_budget() {
        let weight = Weight::new(DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_IN_FLIGHT_BYTES);
        assert_eq!(weight.unit_bytes(), 64 << 10);
        // A NOTIFY payload (at most 8,000 bytes) weighs nothing extra.
        assert_eq!(weight.extra(8_000, 1), 0);
        assert_eq!(weight.extra((64 << 10) - 1, 1), 0);
        assert_eq!(weight.extra(64 << 10, 1), 1);
        assert_eq!(weight.extra(1 << 20, 1), 16);
        // Capped so that one notification never weighs more than MAX_WEIGHT in all.
        assert_eq!(weight.extra(1 << 30, 1), MAX_WEIGHT - 1);
        assert_eq!(weight.extra(1 << 30, 1_000), MAX_WEIGHT - 1_000);
        assert_eq!(weight.extra(1 << 30, MAX_WEIGHT), 0);
        assert_eq!(weight.extra(usize::MAX, 2_000), 0);
    }

    #[test]
    fn a_byte_budget_smaller_than_the_event_budget_makes_every_byte_count() {
        let weight = Weight::new(4_096, 1_000);
        assert_eq!(weight.unit_bytes(), 1);
        assert_eq!(weight.extra(300, 1), 300);
        assert_eq!(Weight::new(0, 0).unit_bytes(), 1);
    }
}
