//! The listener's way into the pipeline: a batch goes to the decoder only after taking one
//! unit of the in-flight budget per event it carries, and stopping cuts any wait for room short.

use std::pin::pin;
use std::sync::Arc;

use actix::Recipient;
use futures_util::future::{select, Either};
use tokio::sync::{watch, Semaphore};

use crate::decoder::RawBatch;
use crate::event::RawNotification;
use crate::pipeline::MIN_IN_FLIGHT;
use crate::stats::Counters;

/// Where every reader of a listener hands its notifications. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Outlet {
    decoder: Recipient<RawBatch>,
    budget: Arc<Semaphore>,
    stats: Arc<Counters>,
    stop: watch::Receiver<bool>,
}

impl Outlet {
    pub fn new(
        decoder: Recipient<RawBatch>,
        budget: Arc<Semaphore>,
        stats: Arc<Counters>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Outlet {
            decoder,
            budget,
            stats,
            stop,
        }
    }

    /// The pipeline's counters.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub fn stats(&self) -> &Counters {
        &self.stats
    }

    /// Whether the listener was told to stop.
    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves once the listener is told to stop.
    pub async fn stopping(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|s| *s).await;
    }

    /// Hands `batch` to the decoder once the pipeline has room for its events: meanwhile
    /// nothing more is read. A batch with more events than the smallest budget holds
    /// ([`MIN_IN_FLIGHT`]: a large transaction read whole) goes in consecutive parts, each
    /// waiting for its own room — one wait for all of it would never end. Returns how many
    /// events it carried, or `None` when told to stop while waiting (or the pipeline is gone):
    /// then the rest of the batch is not handed over (parts before it may have been; the
    /// caller does not move its position, so they come again after a restart, as at least
    /// once allows).
    pub async fn forward(&self, batch: Vec<RawNotification>) -> Option<u64> {
        const LIMIT: u32 = MIN_IN_FLIGHT as u32;
        let units: u32 = batch.iter().map(|raw| raw.events).sum();
        if units <= LIMIT {
            return self.forward_part(batch, units).await;
        }
        let mut rows = batch.into_iter().peekable();
        let mut total = 0;
        while rows.peek().is_some() {
            let mut part = Vec::new();
            let mut units = 0u32;
            // At least one row per part: a row never carries more than LIMIT events (its
            // source chunks statements below it).
            while let Some(raw) = rows.next_if(|raw| part.is_empty() || units + raw.events <= LIMIT)
            {
                units += raw.events;
                part.push(raw);
            }
            total += self.forward_part(part, units).await?;
        }
        Some(total)
    }

    /// [`Outlet::forward`] for a part that fits the budget: `units` events.
    async fn forward_part(&self, batch: Vec<RawNotification>, units: u32) -> Option<u64> {
        if batch.is_empty() {
            return Some(0);
        }
        match self.budget.try_acquire_many(units) {
            Ok(permits) => permits.forget(),
            Err(tokio::sync::TryAcquireError::Closed) => return None,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let acquire = pin!(self.budget.acquire_many(units));
                let stopping = pin!(self.stopping());
                match select(acquire, stopping).await {
                    Either::Left((Ok(permits), _)) => permits.forget(),
                    Either::Left((Err(_), _)) | Either::Right(_) => return None,
                }
            }
        }
        self.stats.forward(u64::from(units));
        self.decoder.do_send(RawBatch(batch));
        Some(u64::from(units))
    }
}
