//! Dead letters: the record, in the source database, of events a handler
//! ([`Notifier::handle`](crate::Notifier::handle)) failed on — while they are retried, and
//! once they ran out of attempts — and the [`DeadLetters`] API to list, inspect, retry and
//! discard them. Each dialect stores them behind [`DeadLetterStore`].
//!
//! A row's life: the first failed attempt of an event records it `retrying` (with the attempt
//! count, so a restart or a consumer-group failover continues the count); success deletes it;
//! the last allowed attempt marks it `dead`. [`DeadLetters::retry`] marks a dead letter
//! `requested`; the handler's active process takes it (`redelivering`) and delivers it again
//! with a fresh attempt count — success deletes the row, failure makes it `dead` again.

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::BoxFuture;

use crate::error::{Error, Result};

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterState {
    /// The event failed and is being retried (not dead yet): the row keeps its attempt count.
    Retrying,
    /// Every allowed attempt failed: the event waits here until retried or dropped.
    Dead,
    /// A retry was asked for ([`DeadLetters::retry`]): the handler's active process delivers
    /// it again shortly.
    Requested,
    /// Taken by the handler's active process and being delivered again.
    Redelivering,
}

impl DeadLetterState {
    /// The name stored in the database: `retrying`, `dead`, `requested`, `redelivering`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterState::Retrying => "retrying",
            DeadLetterState::Dead => "dead",
            DeadLetterState::Requested => "requested",
            DeadLetterState::Redelivering => "redelivering",
        }
    }

    /// The state stored as `text`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "retrying" => DeadLetterState::Retrying,
            "dead" => DeadLetterState::Dead,
            "requested" => DeadLetterState::Requested,
            "redelivering" => DeadLetterState::Redelivering,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DeadLetterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stored failure of a handler on an event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its id in the dead-letter table: what [`DeadLetters::retry`] and
    /// [`DeadLetters::discard`] take.
    pub id: i64,
    /// The handler's name ([`Handling::new`](crate::Handling::new)).
    pub handler: String,
    /// The channel the event arrived on.
    pub channel: String,
    /// The event's journal position (`None` on PostgreSQL's notify tier).
    pub sequence: Option<i64>,
    /// The event's row index in a statement-capture journal row (0 otherwise).
    pub part: u32,
    /// The event's key, as JSON text (an array for a composite key).
    pub key: String,
    /// The whole event, as [`ChangeEvent::to_record`](crate::ChangeEvent::to_record) wrote it.
    pub event: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failed: SystemTime,
    /// When the last attempt failed.
    pub last_failed: SystemTime,
    /// The last attempt's error text.
    pub error: String,
    /// Where it stands.
    pub state: DeadLetterState,
}

/// How many rows of the dead-letter table are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterCounts {
    /// Events failing and being retried.
    pub retrying: u64,
    /// Events out of attempts.
    pub dead: u64,
    /// Dead letters a retry was asked for, not taken yet.
    pub requested: u64,
    /// Dead letters being delivered again.
    pub redelivering: u64,
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// These ids.
    Ids(Vec<i64>),
    /// Every dead letter of this handler.
    Handler(String),
}

/// A failed attempt to record: the insert or update of the event's row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    /// The row already recorded for this event (known after its first failure, or for a
    /// dead letter being delivered again); `None` on a first failure.
    pub id: Option<i64>,
    pub handler: String,
    pub channel: String,
    pub sequence: Option<i64>,
    pub part: u32,
    pub key: String,
    pub event: String,
    /// Failed attempts including this one.
    pub attempts: u32,
    pub error: String,
    /// Out of attempts: the row becomes `dead` (else `retrying`).
    pub dead: bool,
}

/// An event failing and being retried, as recorded: what a process that takes over (restart,
/// failover) continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retrying {
    pub id: i64,
    pub sequence: i64,
    pub part: u32,
    pub attempts: u32,
}

/// The dead-letter table of one database. Every method is one statement or one short
/// transaction on a connection other than the listener's.
pub(crate) trait DeadLetterStore: Send + Sync + 'static {
    /// Records a failed attempt (creating the table first if needed). With `failure.id` the
    /// row is updated; otherwise an event with a sequence is upserted on `(handler, sequence,
    /// part)` — an earlier process may have recorded it — and one without is inserted. Sets
    /// `attempts`, `error`, `last_failed` (and `first_failed` on insert), and the state
    /// `dead` or `retrying`. Returns the row's id.
    fn record(&self, failure: Failure) -> BoxFuture<'static, Result<i64>>;
    /// The event of row `id` was handled: the row goes.
    fn resolve(&self, id: i64) -> BoxFuture<'static, Result<()>>;
    /// `handler`'s rows in state `retrying` that have a sequence.
    fn retrying(&self, handler: String) -> BoxFuture<'static, Result<Vec<Retrying>>>;
    /// Takes up to `limit` of `handler`'s `requested` rows, oldest first, marking them
    /// `redelivering` in the same transaction.
    fn take_requested(
        &self,
        handler: String,
        limit: u32,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter>>>;
    /// Marks `handler`'s `redelivering` rows `requested` again (a process that was delivering
    /// them is gone); returns how many.
    fn reset_redelivering(&self, handler: String) -> BoxFuture<'static, Result<u64>>;
    /// The rows, oldest first, of `handler` (or every handler), at most `limit`.
    fn list(
        &self,
        handler: Option<String>,
        limit: Option<u64>,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter>>>;
    /// The row `id`, if there is one.
    fn get(&self, id: i64) -> BoxFuture<'static, Result<Option<DeadLetter>>>;
    /// Marks the `dead` rows of `target` `requested`; returns how many.
    fn request_retry(&self, target: Target) -> BoxFuture<'static, Result<u64>>;
    /// Deletes the `dead` rows of `target`; returns how many.
    fn discard(&self, target: Target) -> BoxFuture<'static, Result<u64>>;
    /// How many rows of `handler` (or every handler) are in each state.
    fn counts(&self, handler: Option<String>) -> BoxFuture<'static, Result<DeadLetterCounts>>;
}

/// The dead letters of a database: events handlers failed on, to list, inspect, retry and
/// discard. From [`Notifier::dead_letters`](crate::Notifier::dead_letters), or without a
/// running notifier from
/// [`NotifierBuilder::dead_letters`](crate::NotifierBuilder::dead_letters).
#[derive(Clone)]
pub struct DeadLetters {
    store: Arc<dyn DeadLetterStore>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").finish_non_exhaustive()
    }
}

impl DeadLetters {
    pub(crate) fn new(store: Arc<dyn DeadLetterStore>) -> Self {
        DeadLetters { store }
    }

    /// The dead letters (and events being retried), oldest first, of `handler` or of every
    /// handler, at most `limit`.
    pub async fn list(&self, handler: Option<&str>, limit: Option<u64>) -> Result<Vec<DeadLetter>> {
        self.store.list(handler.map(str::to_string), limit).await
    }

    /// The dead letter `id`, whole.
    pub async fn get(&self, id: i64) -> Result<DeadLetter> {
        self.store
            .get(id)
            .await?
            .ok_or(Error::UnknownDeadLetter { id })
    }

    /// Delivers the dead letters `ids` again to their handler (its active process takes them
    /// within a second); returns how many were dead and are now requested.
    pub async fn retry(&self, ids: &[i64]) -> Result<u64> {
        self.store.request_retry(Target::Ids(ids.to_vec())).await
    }

    /// Delivers every dead letter of `handler` again; returns how many.
    pub async fn retry_handler(&self, handler: &str) -> Result<u64> {
        self.store
            .request_retry(Target::Handler(handler.to_string()))
            .await
    }

    /// Deletes the dead letters `ids` for good; returns how many were dead and are gone
    /// (events still being retried are not touched).
    pub async fn discard(&self, ids: &[i64]) -> Result<u64> {
        self.store.discard(Target::Ids(ids.to_vec())).await
    }

    /// Deletes every dead letter of `handler`; returns how many.
    pub async fn discard_handler(&self, handler: &str) -> Result<u64> {
        self.store
            .discard(Target::Handler(handler.to_string()))
            .await
    }

    /// How many rows of `handler` (or of every handler) are in each state.
    pub async fn counts(&self, handler: Option<&str>) -> Result<DeadLetterCounts> {
        self.store.counts(handler.map(str::to_string)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for state in [
            DeadLetterState::Retrying,
            DeadLetterState::Dead,
            DeadLetterState::Requested,
            DeadLetterState::Redelivering,
        ] {
            assert_eq!(DeadLetterState::parse(state.as_str()), Some(state));
        }
        assert_eq!(DeadLetterState::parse("Dead"), None);
    }
}
