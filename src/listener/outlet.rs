//! The listener's way into the pipeline: a batch goes to the decoder only after taking one
//! unit of the in-flight budget per event it carries, and stopping cuts any wait for room short.

use std::pin::pin;
use std::sync::Arc;

use actix::Recipient;
use futures_util::future::{select, Either};
use tokio::sync::{watch, Semaphore};

use crate::decoder::RawBatch;
use crate::event::RawNotification;
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
    /// nothing more is read. Returns how many events it carried, or `None` — the batch is not
    /// handed over — when told to stop while waiting (or the pipeline is gone).
    pub async fn forward(&self, batch: Vec<RawNotification>) -> Option<u64> {
        if batch.is_empty() {
            return Some(0);
        }
        let units: u32 = batch.iter().map(|raw| raw.events).sum();
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
