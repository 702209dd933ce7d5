//! The listener's way into the pipeline: a batch goes to the decoder only after taking one
//! unit of the in-flight budget per event it carries (and more for large payloads), and
//! stopping cuts any wait for room short. A wait is counted (`Counters::budget_waiters`), so
//! that the registry can take back what event streams whose clients stopped reading hold.

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::Recipient;
use futures_util::future::{select, Either};
use tokio::sync::{watch, Semaphore};

use crate::decoder::RawBatch;
use crate::event::RawNotification;
use crate::pipeline::{Weight, MAX_WEIGHT};
use crate::stats::Counters;

/// Where every reader of a listener hands its notifications. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Outlet {
    decoder: Recipient<RawBatch>,
    budget: Arc<Semaphore>,
    weight: Weight,
    stats: Arc<Counters>,
    stop: watch::Receiver<bool>,
}

impl Outlet {
    pub fn new(
        decoder: Recipient<RawBatch>,
        (budget, weight): (Arc<Semaphore>, Weight),
        stats: Arc<Counters>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Outlet {
            decoder,
            budget,
            weight,
            stats,
            stop,
        }
    }

    /// Whether a reader waits for room in the pipeline now. A reader that drives its
    /// connection itself (PostgreSQL's notifications) then reads nothing from it, so the
    /// connection cannot answer a health check: the shell does not ask for one meanwhile — the
    /// wait is the pipeline's, not the connection's, and failing the connection for it would
    /// lose the notifications PostgreSQL queued for it.
    pub fn waiting(&self) -> bool {
        self.stats.budget_waiters.load(Ordering::Relaxed) > 0
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

    /// Hands `batch` to the decoder once the pipeline has room for it: one unit per event,
    /// and more for a large payload ([`Weight`]). Meanwhile nothing more is read. A batch
    /// weighing more than the smallest budget holds ([`MAX_WEIGHT`]: a large transaction read
    /// whole, or large payloads) goes in consecutive parts, each waiting for its own room —
    /// one wait for all of it would never end. Returns how many events it carried, or `None`
    /// when told to stop while waiting (or the pipeline is gone): then the rest of the batch
    /// is not handed over (parts before it may have been; the caller does not move its
    /// position, so they come again after a restart, as at least once allows).
    pub async fn forward(&self, mut batch: Vec<RawNotification>) -> Option<u64> {
        let (mut units, mut events) = (0u32, 0u64);
        for raw in &mut batch {
            raw.extra_units = self.weight.extra(raw.bytes(), raw.events);
            units = units.saturating_add(raw.events + raw.extra_units);
            events += u64::from(raw.events);
        }
        if units <= MAX_WEIGHT {
            return self.forward_part(batch, units, events).await;
        }
        let mut rows = batch.into_iter().peekable();
        let mut total = 0;
        while rows.peek().is_some() {
            let mut part = Vec::new();
            let (mut units, mut events) = (0u32, 0u64);
            // At least one row per part: a row never weighs more than MAX_WEIGHT (its source
            // chunks statements below it, and `Weight::extra` caps the rest).
            while let Some(raw) = rows.next_if(|raw| {
                part.is_empty() || units + raw.events + raw.extra_units <= MAX_WEIGHT
            }) {
                units += raw.events + raw.extra_units;
                events += u64::from(raw.events);
                part.push(raw);
            }
            total += self.forward_part(part, units, events).await?;
        }
        Some(total)
    }

    /// [`Outlet::forward`] for a part that fits the budget: `events` events weighing `units`.
    async fn forward_part(
        &self,
        batch: Vec<RawNotification>,
        units: u32,
        events: u64,
    ) -> Option<u64> {
        if batch.is_empty() {
            return Some(0);
        }
        match self.budget.try_acquire_many(units) {
            Ok(permits) => permits.forget(),
            Err(tokio::sync::TryAcquireError::Closed) => return None,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                // Counted while it waits (the registry then frees what stuck event streams
                // hold, and the shell asks no health check), also when this future is dropped
                // part way.
                let _waiting = Waiting::new(&self.stats.budget_waiters);
                let acquire = pin!(self.budget.acquire_many(units));
                let stopping = pin!(self.stopping());
                match select(acquire, stopping).await {
                    Either::Left((Ok(permits), _)) => permits.forget(),
                    Either::Left((Err(_), _)) | Either::Right(_) => return None,
                }
            }
        }
        self.stats.forward(events);
        self.decoder.do_send(RawBatch(batch));
        Some(events)
    }
}

/// One reader waiting for budget, counted in `Counters::budget_waiters` while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(waiters: &'a AtomicUsize) -> Self {
        waiters.fetch_add(1, Ordering::Relaxed);
        Waiting(waiters)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
