//! Benchmark support (hidden, unstable): the decoder + registry pipeline without a database.
//!
//! [`Pipeline::start`] builds the same actors a [`Notifier`](crate::Notifier) starts after its
//! listener — decoder, registry, in-flight budget, counters — for a list of [`Watch`]es whose
//! tables are described from the watches themselves (key columns from
//! [`primary_keys`](Watch::primary_keys), default `id`; the extra columns). [`Pipeline::send`]
//! then plays the listener's part exactly: it takes one unit of the in-flight budget per
//! notification (waiting for room when the pipeline is full) before handing the batch to the
//! decoder. Used by `benches/pipeline.rs`; not part of the supported API.
//!
//! [`DeadLetterCalls`] makes the calls the handler engine makes on a database's dead-letter
//! table (record a failure, resolve, take requested rows …), so `tests/dead_letters.rs` can
//! seed and drive the table through the same code on every dialect.
#![doc(hidden)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::BoxFuture;
use tokio::sync::Semaphore;

use crate::dead_letters::{DeadLetter, DeadLetterStore, DeadLetters, Target};
use crate::decoder::{RawBatch, Retention};
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Channels, RawNotification};
use crate::overflow::OverflowStore;
use crate::pipeline::PipelineOptions;
use crate::registry::{Registry, Subscribe, LAG_INTERVAL};
use crate::resolve::{resolve, ColumnInfo, TableInfo};
use crate::stats::Stats;
use crate::subscriber::Sink;
use crate::subscription::{Subscription, SubscriptionId};
use crate::watch::{check_set, Watch};

/// Schema assumed for watches named without one.
const SCHEMA: &str = "public";

/// A running decoder + registry pipeline fed by hand instead of by a listener.
pub struct Pipeline {
    pipeline: crate::pipeline::Pipeline,
    max_in_flight: usize,
}

impl Pipeline {
    /// Starts the actors for `watches` with an in-flight budget of `max_in_flight` events.
    /// Must run inside an actix system. Fails like `start()` would on invalid watches.
    pub fn start(watches: &[Watch], max_in_flight: usize) -> Result<Pipeline> {
        let watches: Vec<Watch> = watches
            .iter()
            .map(|w| w.clone().or_schema(SCHEMA))
            .collect();
        for watch in &watches {
            watch.precheck()?;
        }
        check_set(&watches)?;
        let resolved = watches
            .iter()
            .map(|w| resolve(w, &describe(w)))
            .collect::<Result<Vec<_>>>()?;
        let channels = Channels::new(resolved.into_iter().map(|w| w.channel), SCHEMA);
        let max_in_flight = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        let options = PipelineOptions {
            max_in_flight,
            max_in_flight_bytes: crate::pipeline::DEFAULT_MAX_IN_FLIGHT_BYTES,
            lag_interval: LAG_INTERVAL,
            retention: Retention {
                keep: Duration::from_secs(3600),
                every: Duration::from_secs(3600),
            },
        };
        Ok(Pipeline {
            pipeline: crate::pipeline::Pipeline::start(channels, Arc::new(NoOverflow), options),
            max_in_flight,
        })
    }

    /// The registry, for [`Subscribe`] messages with your own actors.
    pub fn registry(&self) -> Addr<Registry> {
        self.pipeline.registry.clone()
    }

    /// Like [`Notifier::subscribe`](crate::Notifier::subscribe).
    pub async fn subscribe(
        &self,
        subscription: Subscription,
        recipient: Recipient<ChangeEvent>,
    ) -> Result<SubscriptionId> {
        self.pipeline
            .registry
            .send(Subscribe::new(subscription, recipient))
            .await?
    }

    /// Like [`Notifier::subscribe_fn`](crate::Notifier::subscribe_fn): `f` runs in an actor
    /// of its own on the current arbiter.
    pub async fn subscribe_fn<F>(&self, subscription: Subscription, f: F) -> Result<SubscriptionId>
    where
        F: FnMut(ChangeEvent) + 'static,
    {
        let sink = Sink::Fn(self.pipeline.closures.add(f));
        self.pipeline
            .registry
            .send(Subscribe::with_sink(subscription, sink))
            .await?
    }

    /// Hands `batch` to the decoder the way a listener does: after taking one unit of the
    /// in-flight budget per notification, waiting while the pipeline is full.
    ///
    /// # Panics
    ///
    /// If the batch is larger than the whole budget (it could never fit).
    pub async fn send(&self, batch: Vec<RawNotification>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        assert!(
            batch.len() <= self.max_in_flight,
            "a batch of {} notifications can never fit an in-flight budget of {}",
            batch.len(),
            self.max_in_flight
        );
        let n = batch.len() as u32;
        self.pipeline
            .budget
            .acquire_many(n)
            .await
            .map_err(|_| Error::NotRunning)?
            .forget();
        self.pipeline.stats.forward(u64::from(n));
        self.pipeline.decoder.do_send(RawBatch(batch));
        Ok(())
    }

    /// Resolves once everything sent before has been routed and closure subscribers have run
    /// it (what `stop()` waits for).
    pub async fn flush(&self) {
        self.pipeline.flush().await;
    }

    /// The pipeline's counters.
    pub fn stats(&self) -> Stats {
        self.pipeline.stats.snapshot()
    }

    /// Flushes, then stops the actors.
    pub async fn stop(self) {
        self.flush().await;
        self.pipeline.shutdown();
    }
}

/// The table a watch implies: its key columns (default `id`) as the primary key, then every
/// other column it names.
fn describe(watch: &Watch) -> TableInfo {
    let keys: Vec<String> = watch
        .primary_keys
        .clone()
        .unwrap_or_else(|| vec!["id".to_string()]);
    let mut columns: Vec<ColumnInfo> = keys
        .iter()
        .enumerate()
        .map(|(i, name)| ColumnInfo {
            name: name.clone(),
            pk_position: Some(i),
            has_equality: true,
            equality_schema: None,
            data_type: String::new(),
        })
        .collect();
    let others: BTreeSet<&String> = watch
        .extra_columns
        .iter()
        .chain(&watch.trigger_columns)
        .filter(|c| !keys.contains(c))
        .collect();
    columns.extend(others.into_iter().map(|name| ColumnInfo {
        name: name.clone(),
        pk_position: None,
        has_equality: true,
        equality_schema: None,
        data_type: String::new(),
    }));
    TableInfo {
        schema: watch.schema_name().to_string(),
        table: watch.table.clone(),
        columns,
        in_hierarchy: false,
    }
}

/// No database behind the pipeline: overflow references resolve to nothing.
struct NoOverflow;

impl OverflowStore for NoOverflow {
    fn purge(&self, _retention: Duration) -> BoxFuture<'static, Result<u64>> {
        Box::pin(async { Ok(0) })
    }
}

/// A failed attempt of a handler on an event, to record (see [`DeadLetterCalls::record`]).
pub use crate::dead_letters::Failure as FailedAttempt;

/// The handler engine's calls on the dead-letter table behind a [`DeadLetters`].
#[derive(Clone)]
pub struct DeadLetterCalls {
    store: Arc<dyn DeadLetterStore>,
}

impl DeadLetterCalls {
    /// The calls on the table `dead_letters` manages.
    pub fn new(dead_letters: &DeadLetters) -> Self {
        DeadLetterCalls {
            store: dead_letters.store().clone(),
        }
    }

    /// Records a failed attempt; returns the row's id.
    pub async fn record(&self, attempt: FailedAttempt) -> Result<i64> {
        self.store.record(attempt).await
    }

    /// The event of row `id` was handled: the row goes.
    pub async fn resolve(&self, id: i64) -> Result<()> {
        self.store.resolve(id).await
    }

    /// `handler`'s `retrying` rows with a sequence, as `(id, sequence, part, attempts)`.
    pub async fn retrying(&self, handler: &str) -> Result<Vec<(i64, i64, u32, u32)>> {
        Ok(self
            .store
            .retrying(handler.to_string())
            .await?
            .into_iter()
            .map(|r| (r.id, r.sequence, r.part, r.attempts))
            .collect())
    }

    /// `handler`'s `dead` rows with a sequence, as `(id, sequence, part, attempts)`.
    pub async fn dead(&self, handler: &str) -> Result<Vec<(i64, i64, u32, u32)>> {
        Ok(self
            .store
            .dead(handler.to_string())
            .await?
            .into_iter()
            .map(|r| (r.id, r.sequence, r.part, r.attempts))
            .collect())
    }

    /// `handler` handled the event (`sequence`, `part`): its `retrying` or `dead` row goes;
    /// returns how many went.
    pub async fn resolve_event(&self, handler: &str, sequence: i64, part: u32) -> Result<u64> {
        self.store
            .resolve_event(handler.to_string(), sequence, part)
            .await
    }

    /// Takes up to `limit` of `handler`'s `requested` rows, marking them `redelivering`.
    pub async fn take_requested(&self, handler: &str, limit: u32) -> Result<Vec<DeadLetter>> {
        self.store.take_requested(handler.to_string(), limit).await
    }

    /// Marks `handler`'s `redelivering` rows `requested` again; returns how many.
    pub async fn reset_redelivering(&self, handler: &str) -> Result<u64> {
        self.store
            .reset_redelivering(Target::Handler(handler.to_string()))
            .await
    }

    /// Marks those of rows `ids` that are `redelivering` `requested` again (a process that
    /// stood by hands back what it had taken); returns how many.
    pub async fn hand_back(&self, ids: &[i64]) -> Result<u64> {
        self.store
            .reset_redelivering(Target::Ids(ids.to_vec()))
            .await
    }
}

/// Where the next page of a [`replay_page`] starts.
#[cfg(feature = "web")]
pub struct ReplayNext(crate::replay::ReplayFrom);

/// One page of the journal replay the SSE endpoint reads for a client that resumes after
/// event id `after` (or, with `next`, the page after one read before), at most `limit` rows,
/// on every channel of `notifier` (as for a client granted them all; the journal holds those
/// of PostgreSQL's journal tiers, and every channel of the other dialects): the rows'
/// sequences and where the next page starts (`None` after the last). `Ok(None)`: a reset (the position cannot be resumed, or
/// retention may have removed a row after it). For tests of the replay's pages.
#[cfg(feature = "web")]
pub async fn replay_page(
    notifier: &crate::Notifier,
    after: &str,
    next: Option<ReplayNext>,
    limit: i64,
) -> Result<Option<(Vec<i64>, Option<ReplayNext>)>> {
    let from = match next {
        Some(ReplayNext(from)) => Some(from),
        None => crate::web::Position::parse(after).map(|p| p.replay_from()),
    };
    Ok(replay_rows(notifier, from, limit)
        .await?
        .map(|(rows, next)| {
            (
                rows.iter().filter_map(|r| r.sequence).collect(),
                next.map(ReplayNext),
            )
        }))
}

/// The first page of `limit` rows of a replay after position `after` (a `Last-Event-ID`), as
/// (journal id, transaction id) pairs; `None` when it is refused (`TooOld`, `Unsupported`,
/// or not a position).
#[cfg(feature = "web")]
pub async fn replay_transactions(
    notifier: &crate::Notifier,
    after: &str,
    limit: i64,
) -> Result<Option<Vec<(i64, Option<u64>)>>> {
    let from = crate::web::Position::parse(after).map(|p| p.replay_from());
    Ok(replay_rows(notifier, from, limit).await?.map(|(rows, _)| {
        rows.iter()
            .filter_map(|r| Some((r.sequence?, r.transaction)))
            .collect()
    }))
}

/// A page of the replay from `from` on every channel of `notifier`: its rows and where the
/// next page starts; `None` when there is no position or the replay is refused.
#[cfg(feature = "web")]
async fn replay_rows(
    notifier: &crate::Notifier,
    from: Option<crate::replay::ReplayFrom>,
    limit: i64,
) -> Result<
    Option<(
        Vec<crate::event::RawNotification>,
        Option<crate::replay::ReplayFrom>,
    )>,
> {
    let Some(from) = from else {
        return Ok(None);
    };
    let channels = notifier
        .channel_set()
        .list()
        .into_iter()
        .map(|c| c.name().to_string())
        .collect();
    let replay = notifier
        .dialect()
        .replay(from, channels, notifier.journal_channels(), limit)
        .await?;
    Ok(match replay {
        crate::replay::Replay::Rows { rows, next, .. } => Some((rows, next)),
        crate::replay::Replay::TooOld | crate::replay::Replay::Unsupported => None,
    })
}

/// Runs `notifier`'s retention purge now, keeping what is younger than `keep`; returns how
/// many rows it deleted. For tests that must place a purge between two reads.
pub async fn purge_now(notifier: &crate::Notifier, keep: Duration) -> Result<u64> {
    notifier.dialect().overflow_store().purge(keep).await
}

/// Reads overflow row `reference` of `channel` the way the decoder does (`None`: no such
/// row). For tests that place a read beside a purge.
pub async fn fetch_overflow(
    notifier: &crate::Notifier,
    channel: &str,
    reference: &str,
) -> Result<Option<String>> {
    let store = notifier.dialect().overflow_store();
    store
        .fetch(channel.to_string(), reference.to_string())
        .await
}
