//! Dead letters: the record, in the source database, of events a handler
//! ([`Notifier::handle`](crate::Notifier::handle)) failed on — while they are retried, and
//! once they ran out of attempts — and the [`DeadLetters`] API to list, inspect, retry and
//! discard them. Each dialect stores them behind [`DeadLetterStore`].
//!
//! A row's life: the first failed attempt of an event records it `retrying` (with the attempt
//! count, so a restart or a consumer-group failover continues the count); success deletes it;
//! the last allowed attempt marks it `dead`. Success deletes a `dead` row too when the journal
//! delivers its event again (its process ended before the position was saved past it; the
//! process that becomes active reads the `dead` rows back, [`DeadLetterStore::dead`]).
//! [`DeadLetters::retry`] marks a dead letter `requested`; the handler's active process takes
//! it (`redelivering`) and delivers it again with a fresh attempt count — success deletes the
//! row, failure makes it `dead` again.

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::BoxFuture;

use crate::error::{Error, Result};

/// Most bytes of a handler's error text stored with a row ([`storable_error`]).
pub(crate) const MAX_ERROR_BYTES: usize = 64 * 1024;

/// A handler's error text as every dialect can store it: each NUL character — PostgreSQL
/// refuses one in `text`, and a failure that can never be stored was retried for ever, the
/// event's key and a named consumer's position stuck behind it — becomes U+FFFD, and text
/// longer than [`MAX_ERROR_BYTES`] is cut on a character boundary, ending with a note of
/// its whole length. Text already storable comes back as it is (so applying it twice changes
/// nothing).
pub(crate) fn storable_error(text: String) -> String {
    let text = if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    };
    if text.len() <= MAX_ERROR_BYTES {
        return text;
    }
    let note = format!(" … [cut: {} bytes in all]", text.len());
    let mut end = MAX_ERROR_BYTES - note.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = text;
    cut.truncate(end);
    cut.push_str(&note);
    cut
}

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

/// A failed attempt to record: the insert or update of the event's row. Public only through
/// `bench_support` (as `FailedAttempt`), for tests that seed the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The row already recorded for this event (known after its first failure, or for a
    /// dead letter being delivered again); `None` on a first failure.
    pub id: Option<i64>,
    /// The handler's name.
    pub handler: String,
    /// The channel the event arrived on.
    pub channel: String,
    /// The event's journal position (`None` on PostgreSQL's notify tier).
    pub sequence: Option<i64>,
    /// The event's row index in a statement-capture journal row.
    pub part: u32,
    /// The event's key, as JSON text.
    pub key: String,
    /// The whole event, as JSON text.
    pub event: String,
    /// Failed attempts including this one.
    pub attempts: u32,
    /// The attempt's error text.
    pub error: String,
    /// What the row becomes: [`Retrying`](DeadLetterState::Retrying) (a live event that
    /// failed, its position held until it is handled), [`Dead`](DeadLetterState::Dead) (out of
    /// attempts) or [`Redelivering`](DeadLetterState::Redelivering) (a dead letter delivered
    /// again that failed an attempt: nothing holds its position, so the row itself is what
    /// brings it back — a process that takes over returns it to `requested`).
    pub state: DeadLetterState,
}

/// An event's row as a process that takes over (restart, failover) reads it back: one failing
/// and being retried ([`DeadLetterStore::retrying`]), whose count it continues, or one out of
/// attempts ([`DeadLetterStore::dead`]), which goes if the event, delivered again from the
/// journal, is handled.
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
    /// `dead` or `retrying`. Returns the row's id (a new one when the row of `failure.id` was
    /// deleted meanwhile, by hand: the failure is recorded afresh). The other methods find no
    /// table as no rows and create nothing.
    fn record(&self, failure: Failure) -> BoxFuture<'static, Result<i64>>;
    /// The event of row `id` was handled: the row goes.
    fn resolve(&self, id: i64) -> BoxFuture<'static, Result<()>>;
    /// `handler`'s rows in `state` (`retrying` or `dead`) that have a sequence, oldest first.
    fn in_state(
        &self,
        handler: String,
        state: &'static str,
    ) -> BoxFuture<'static, Result<Vec<Retrying>>>;
    /// `handler`'s rows in state `retrying` that have a sequence.
    fn retrying(&self, handler: String) -> BoxFuture<'static, Result<Vec<Retrying>>> {
        self.in_state(handler, "retrying")
    }
    /// `handler`'s rows in state `dead` that have a sequence: events whose dead letter was
    /// stored and acknowledged, and which the journal delivers again when the process ended
    /// before the position was saved past them.
    fn dead(&self, handler: String) -> BoxFuture<'static, Result<Vec<Retrying>>> {
        self.in_state(handler, "dead")
    }
    /// `handler` handled the event (`sequence`, `part`), delivered live, after an earlier
    /// process left a row of it ([`dead`](Self::dead)): deletes its row if it is `retrying` or
    /// `dead` (a row a retry was asked for, or being delivered again, is left alone); returns
    /// how many went.
    fn resolve_event(
        &self,
        handler: String,
        sequence: i64,
        part: u32,
    ) -> BoxFuture<'static, Result<u64>>;
    /// Takes up to `limit` of `handler`'s `requested` rows, oldest first, marking them
    /// `redelivering` in the same transaction.
    fn take_requested(
        &self,
        handler: String,
        limit: u32,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter>>>;
    /// Marks the `redelivering` rows of `target` `requested` again; returns how many. Every
    /// one of a handler: a process that was delivering them is gone (or stood by). Some ids:
    /// a process that stood by hands back the rows it had taken (those still `redelivering`;
    /// the others, handled or dead meanwhile, are left alone).
    fn reset_redelivering(&self, target: Target) -> BoxFuture<'static, Result<u64>>;
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

/// `store`, with every call's panic turned into that call's error. A driver can panic on a
/// row it cannot convert (a NULL in a column altered to allow one): unguarded, the panic
/// would end the handler's loop — which then handles nothing more, silently — or unwind
/// into the caller of the [`DeadLetters`] API.
pub(crate) fn guarded(store: Arc<dyn DeadLetterStore>) -> Arc<dyn DeadLetterStore> {
    Arc::new(Guarded(store))
}

struct Guarded(Arc<dyn DeadLetterStore>);

/// Runs `call` (which makes the store's future, and may panic doing so) and its future,
/// catching a panic in either as the error of `doing`.
fn guard<T: Send + 'static>(
    doing: &'static str,
    call: impl FnOnce() -> BoxFuture<'static, Result<T>> + Send + 'static,
) -> BoxFuture<'static, Result<T>> {
    Box::pin(crate::error::caught(
        move || format!("{doing} in the dead-letter table"),
        async move { call().await },
    ))
}

impl DeadLetterStore for Guarded {
    fn record(&self, mut failure: Failure) -> BoxFuture<'static, Result<i64>> {
        let store = self.0.clone();
        failure.error = storable_error(failure.error);
        guard("recording a failure", move || store.record(failure))
    }
    fn resolve(&self, id: i64) -> BoxFuture<'static, Result<()>> {
        let store = self.0.clone();
        guard("removing a handled row", move || store.resolve(id))
    }
    fn in_state(
        &self,
        handler: String,
        state: &'static str,
    ) -> BoxFuture<'static, Result<Vec<Retrying>>> {
        let store = self.0.clone();
        guard("reading the events of a state", move || {
            store.in_state(handler, state)
        })
    }
    fn resolve_event(
        &self,
        handler: String,
        sequence: i64,
        part: u32,
    ) -> BoxFuture<'static, Result<u64>> {
        let store = self.0.clone();
        guard("removing a handled event's row", move || {
            store.resolve_event(handler, sequence, part)
        })
    }
    fn take_requested(
        &self,
        handler: String,
        limit: u32,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter>>> {
        let store = self.0.clone();
        guard("taking the rows to deliver again", move || {
            store.take_requested(handler, limit)
        })
    }
    fn reset_redelivering(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        let store = self.0.clone();
        guard("taking back rows being delivered again", move || {
            store.reset_redelivering(target)
        })
    }
    fn list(
        &self,
        handler: Option<String>,
        limit: Option<u64>,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter>>> {
        let store = self.0.clone();
        guard("listing", move || store.list(handler, limit))
    }
    fn get(&self, id: i64) -> BoxFuture<'static, Result<Option<DeadLetter>>> {
        let store = self.0.clone();
        guard("reading a row", move || store.get(id))
    }
    fn request_retry(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        let store = self.0.clone();
        guard("asking for a retry", move || store.request_retry(target))
    }
    fn discard(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        let store = self.0.clone();
        guard("discarding", move || store.discard(target))
    }
    fn counts(&self, handler: Option<String>) -> BoxFuture<'static, Result<DeadLetterCounts>> {
        let store = self.0.clone();
        guard("counting", move || store.counts(handler))
    }
}

/// The dead letters of a database: events handlers failed on, to list, inspect, retry and
/// discard. From [`Notifier::dead_letters`](crate::Notifier::dead_letters), or without a
/// running notifier from
/// [`NotifierBuilder::dead_letters`](crate::NotifierBuilder::dead_letters).
///
/// The table is sqlnotify's (`sqlnotify.dead_letters` on PostgreSQL, `sqlnotify_dead_letters`
/// on SQLite and MySQL), created with its other tables or by the first failure recorded;
/// reading a database where none was finds nothing and creates nothing. No call uses the
/// listener's connection.
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
        DeadLetters {
            store: guarded(store),
        }
    }

    /// The store behind it (for `bench_support`, which tests drive it through).
    #[cfg_attr(not(feature = "bench"), allow(dead_code))]
    pub(crate) fn store(&self) -> &Arc<dyn DeadLetterStore> {
        &self.store
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

/// A dead-letter row as a dialect read it, before what it holds is checked. The table is
/// untrusted input like every table of sqlnotify's (whoever may write it may store anything):
/// [`StoredRow::check`] turns what cannot be a dead letter into an error naming the table and
/// the row, never a panic.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredRow {
    pub id: i64,
    pub handler: String,
    pub channel: String,
    pub sequence: Option<i64>,
    pub part: i64,
    pub key: String,
    pub event: String,
    pub attempts: i64,
    /// Unix seconds; `None` where the dialect could not read a number.
    pub first_failed: Option<f64>,
    pub last_failed: Option<f64>,
    pub error: String,
    pub state: String,
}

impl StoredRow {
    /// The dead letter this row holds; `table` names the table in errors.
    pub fn check(self, table: &str) -> Result<DeadLetter> {
        let id = self.id;
        Ok(DeadLetter {
            id,
            part: stored_count(table, id, "part", self.part)?,
            attempts: stored_count(table, id, "attempts", self.attempts)?,
            first_failed: stored_time(table, id, "first_failed", self.first_failed)?,
            last_failed: stored_time(table, id, "last_failed", self.last_failed)?,
            state: stored_state(table, id, &self.state)?,
            handler: self.handler,
            channel: self.channel,
            sequence: self.sequence,
            key: self.key,
            event: self.event,
            error: self.error,
        })
    }
}

impl Retrying {
    /// A `retrying` row as read (with a sequence), checked like [`StoredRow::check`].
    pub fn checked(table: &str, id: i64, sequence: i64, part: i64, attempts: i64) -> Result<Self> {
        Ok(Retrying {
            id,
            sequence,
            part: stored_count(table, id, "part", part)?,
            attempts: stored_count(table, id, "attempts", attempts)?,
        })
    }
}

/// The error for a row of the dead-letter table that holds what no dead letter can.
/// The rows a taker moved to `redelivering`, sorted into the dead letters they are (by id)
/// and the ids of those that cannot be one, with why: one such row must not hold up every
/// other retry of its handler, so the taker marks it `dead` (its error saying why) and hands
/// out the rest. Each is logged.
pub(crate) fn sort_taken(
    table: &str,
    taken: impl IntoIterator<Item = (i64, Result<DeadLetter>)>,
) -> (Vec<DeadLetter>, Vec<(i64, String)>) {
    let (mut letters, mut unreadable) = (Vec::new(), Vec::new());
    for (id, letter) in taken {
        match letter {
            Ok(letter) => letters.push(letter),
            Err(e) => {
                log::warn!(
                    "sqlnotify: {table} row {id} was requested for retry but cannot be \
                     delivered again ({e}): marked dead"
                );
                unreadable.push((id, format!("cannot be delivered again: {e}")));
            }
        }
    }
    letters.sort_by_key(|l| l.id);
    (letters, unreadable)
}

pub(crate) fn invalid_row(table: &str, id: i64, what: impl std::fmt::Display) -> Error {
    Error::InvalidPayload {
        channel: table.to_string(),
        reason: format!("dead letter {id} {what}"),
    }
}

/// A stored state name, checked.
pub(crate) fn stored_state(table: &str, id: i64, text: &str) -> Result<DeadLetterState> {
    DeadLetterState::parse(text).ok_or_else(|| {
        invalid_row(
            table,
            id,
            format_args!(
                "has an unknown state {text:?} (expected retrying, dead, requested or redelivering)"
            ),
        )
    })
}

/// A stored count (`part`, `attempts`), checked: not negative, within `u32`.
fn stored_count(table: &str, id: i64, column: &str, value: i64) -> Result<u32> {
    u32::try_from(value)
        .map_err(|_| invalid_row(table, id, format_args!("has {column} {value}, not a count")))
}

/// A stored time in Unix seconds, checked: a finite number.
fn stored_time(table: &str, id: i64, column: &str, secs: Option<f64>) -> Result<SystemTime> {
    let bad = || {
        let shown = secs.map_or("no number".to_string(), |s| s.to_string());
        invalid_row(table, id, format_args!("has {column} {shown}, not a time"))
    };
    let secs = secs.filter(|s| s.is_finite()).ok_or_else(bad)?;
    let offset = std::time::Duration::try_from_secs_f64(secs.abs()).map_err(|_| bad())?;
    let time = if secs >= 0.0 {
        SystemTime::UNIX_EPOCH.checked_add(offset)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(offset)
    };
    time.ok_or_else(bad)
}

/// The counts per state from `(state, rows)` pairs as a dialect read them; an unknown state
/// is an error, like a row's.
pub(crate) fn stored_counts(
    table: &str,
    rows: impl IntoIterator<Item = (String, i64)>,
) -> Result<DeadLetterCounts> {
    let mut counts = DeadLetterCounts::default();
    for (state, n) in rows {
        let n = n.max(0) as u64;
        let state = DeadLetterState::parse(&state).ok_or_else(|| Error::InvalidPayload {
            channel: table.to_string(),
            reason: format!(
                "{n} dead letter(s) have an unknown state {state:?} (expected retrying, dead, \
                 requested or redelivering)"
            ),
        })?;
        *match state {
            DeadLetterState::Retrying => &mut counts.retrying,
            DeadLetterState::Dead => &mut counts.dead,
            DeadLetterState::Requested => &mut counts.requested,
            DeadLetterState::Redelivering => &mut counts.redelivering,
        } += n;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storable_errors_hold_no_nul_and_are_cut_to_the_limit() {
        // Short text without NUL: as it is.
        assert_eq!(
            storable_error("timed out\nretry".into()),
            "timed out\nretry"
        );
        assert_eq!(storable_error(String::new()), "");
        // NUL characters replaced, nothing else touched.
        assert_eq!(
            storable_error("bad\0byte \0".into()),
            "bad\u{FFFD}byte \u{FFFD}"
        );
        // Exactly at the limit: kept whole.
        let full = "x".repeat(MAX_ERROR_BYTES);
        assert_eq!(storable_error(full.clone()), full);
        // Past it: cut on a character boundary (a 3-byte character straddling the cut), at
        // most the limit, saying how long it was; applying it again changes nothing.
        let long = "é€".repeat(MAX_ERROR_BYTES);
        let cut = storable_error(long.clone());
        assert!(cut.len() <= MAX_ERROR_BYTES, "{}", cut.len());
        assert!(cut.len() > MAX_ERROR_BYTES - 64, "{}", cut.len());
        let note = format!(" … [cut: {} bytes in all]", long.len());
        assert!(cut.ends_with(&note), "{}", &cut[cut.len() - 60..]);
        assert!(long.starts_with(cut.strip_suffix(&note).unwrap()));
        assert_eq!(storable_error(cut.clone()), cut);
        // A long text of NUL characters: replaced, then cut (each U+FFFD is 3 bytes).
        let nuls = storable_error("\0".repeat(MAX_ERROR_BYTES));
        assert!(nuls.len() <= MAX_ERROR_BYTES && !nuls.contains('\0'));
        assert!(nuls.starts_with('\u{FFFD}'));
        assert!(nuls.ends_with(&format!("[cut: {} bytes in all]", 3 * MAX_ERROR_BYTES)));
    }

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

    fn row() -> StoredRow {
        StoredRow {
            id: 7,
            handler: "billing".into(),
            channel: "sqlnotify_public_orders_insert".into(),
            sequence: Some(42),
            part: 1,
            key: "[42]".into(),
            event: "{}".into(),
            attempts: 3,
            first_failed: Some(1_700_000_000.25),
            last_failed: Some(1_700_000_060.5),
            error: "boom".into(),
            state: "dead".into(),
        }
    }

    #[test]
    fn a_stored_row_becomes_a_dead_letter() {
        let letter = row().check("sqlnotify.dead_letters").unwrap();
        assert_eq!((letter.id, letter.part, letter.attempts), (7, 1, 3));
        assert_eq!(letter.state, DeadLetterState::Dead);
        let since = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(since(letter.first_failed).as_millis(), 1_700_000_000_250);
        assert_eq!(since(letter.last_failed).as_millis(), 1_700_000_060_500);
        let mut early = row();
        early.first_failed = Some(-1.5);
        let letter = early.check("t").unwrap();
        assert_eq!(
            SystemTime::UNIX_EPOCH
                .duration_since(letter.first_failed)
                .unwrap(),
            std::time::Duration::from_millis(1500)
        );
    }

    #[test]
    fn what_no_dead_letter_holds_is_an_error_naming_the_table_and_the_row() {
        type Spoil = fn(&mut StoredRow);
        let cases: [(Spoil, &str); 6] = [
            (
                |r| r.state = "Dead".into(),
                "dead letter 7 has an unknown state \"Dead\"",
            ),
            (
                |r| r.attempts = -1,
                "dead letter 7 has attempts -1, not a count",
            ),
            (
                |r| r.part = 1 << 40,
                "dead letter 7 has part 1099511627776, not a count",
            ),
            (
                |r| r.first_failed = None,
                "dead letter 7 has first_failed no number, not a time",
            ),
            (
                |r| r.last_failed = Some(f64::INFINITY),
                "has last_failed inf, not a time",
            ),
            (
                |r| r.last_failed = Some(f64::NAN),
                "has last_failed NaN, not a time",
            ),
        ];
        for (spoil, expected) in cases {
            let mut stored = row();
            spoil(&mut stored);
            let e = stored.check("sqlnotify.dead_letters").unwrap_err();
            assert!(matches!(e, Error::InvalidPayload { .. }), "{e:?}");
            let text = e.to_string();
            assert!(
                text.contains("\"sqlnotify.dead_letters\"") && text.contains(expected),
                "{text}"
            );
        }
        let e = Retrying::checked("t", 3, 10, 0, -2).unwrap_err();
        assert!(
            e.to_string().contains("dead letter 3 has attempts -2"),
            "{e}"
        );
    }

    #[test]
    fn counts_add_up_per_state_and_refuse_unknown_states() {
        let counts = stored_counts(
            "t",
            [
                ("dead".to_string(), 2),
                ("retrying".to_string(), 5),
                ("redelivering".to_string(), 1),
            ],
        )
        .unwrap();
        assert_eq!(
            (
                counts.retrying,
                counts.dead,
                counts.requested,
                counts.redelivering
            ),
            (5, 2, 0, 1)
        );
        let e = stored_counts("t", [("gone".to_string(), 4)]).unwrap_err();
        assert!(
            e.to_string()
                .contains("4 dead letter(s) have an unknown state \"gone\""),
            "{e}"
        );
    }
}
