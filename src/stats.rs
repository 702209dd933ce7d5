//! Pipeline counters: shared atomics the actors bump, and the [`Stats`] snapshot users read.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::holds::Holds;
use crate::instruments::PipelineMetrics;

/// A snapshot of a notifier's counters since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Notifications read by the listener (including malformed ones); a statement-capture
    /// journal row counts as the rows it says it carries.
    pub received: u64,
    /// Events handed to subscribers (one per subscriber per event): put into the subscriber's
    /// mailbox, channel or closure host. An event a subscriber never got is `dropped` instead,
    /// so once nothing is `queued`, `delivered + dropped` is the number of (event,
    /// subscription) pairs the filters matched. A closure that panics on an event was still
    /// handed it (and counts in `subscriber_panics`).
    pub delivered: u64,
    /// Events a subscriber did not get because its filters rejected them.
    pub filtered_out: u64,
    /// Notifications on our channels that could not be decoded (logged and dropped).
    pub malformed: u64,
    /// Notifications on our signed channels (PostgreSQL notify tier) whose signature is
    /// missing or wrong: sent by someone other than sqlnotify's triggers, dropped unread.
    /// See [`sign_notifications`](crate::NotifierBuilder::sign_notifications).
    pub forged: u64,
    /// Events whose payload was resolved from the overflow table.
    pub overflow_resolved: u64,
    /// Overflow references whose row was already gone (delivered truncated).
    pub overflow_missing: u64,
    /// Overflow references (PostgreSQL notify tier) heard again on their channel: every row
    /// too large for a notification is stored under a fresh token and its notification
    /// reaches a listener once, so a repeat was sent by someone who heard the first (any role
    /// may `LISTEN`; a signed reference still verifies). Dropped unread: the row is not
    /// fetched again and its event comes once. The last 65,536 references are remembered.
    pub replayed: u64,
    /// Events with no matching subscriber.
    pub unrouted: u64,
    /// Times the listener was restarted after losing its connection.
    pub restarts: u64,
    /// Subscriber closures that panicked (caught; routing continued).
    pub subscriber_panics: u64,
    /// Events a subscription selected but never handed over: dropped by its overflow policy
    /// (`DropOldest`, `KeepLatestPerKey` replacements), or still waiting in its buffer when its
    /// receiver went away, it was unsubscribed or the notifier stopped. Every one is also
    /// reported, per subscription, in a [`Status::Lagged`](crate::Status::Lagged).
    pub dropped: u64,
    /// Events currently waiting in subscriber buffers.
    pub queued: u64,
    /// Subscriptions open now in the registry (every kind: actors, closures, channels,
    /// handlers, event streams). One whose receiver went away counts until the registry
    /// notices — when it next hands it an event, or at once for an event stream
    /// (`sqlnotify::web`).
    pub subscriptions: u64,
    /// Events read by the listener that have not reached the subscriptions yet (being
    /// decoded, or waiting for the registry). With `queued`, what the in-flight budget
    /// ([`max_in_flight`](crate::NotifierBuilder::max_in_flight)) holds; 0 when the pipeline
    /// has caught up.
    pub in_flight: u64,
    /// Journal position of the last event routed (SQLite); 0 when none or not journal-based.
    pub last_sequence: i64,
    /// A named consumer's backlog: journal rows on its channels at or after its saved
    /// position — read but not yet handed to every subscription, or not read yet. Counted in
    /// the database every 2 s (so up to that old); 0 without a named consumer. Past
    /// [`backlog_warning`](crate::NotifierBuilder::backlog_warning) it is also logged.
    pub backlog: u64,
    /// [`Tier::Logical`](crate::Tier::Logical): bytes of WAL the server keeps for this
    /// notifier's replication slot past its confirmed position, read every 2 s; past 1 GiB it
    /// is also logged. 0 on the other tiers.
    pub slot_lag: u64,
    /// This notifier's part in its named consumer's group.
    pub role: Role,
    /// Whether the listener stopped for good after an error it cannot recover from (a
    /// [`Tier::Logical`](crate::Tier::Logical) slot the server invalidated): nothing more is
    /// read. Announced as [`Status::Failed`](crate::Status::Failed); the error is
    /// [`Notifier::failure`](crate::Notifier::failure), and `stop()` returns it.
    pub failed: bool,
    /// Events handlers ([`Notifier::handle`](crate::Notifier::handle)) handled successfully
    /// (a dead letter delivered again and handled counts too, and so does an event a
    /// transactional handler skipped as done before: see `effects_skipped`).
    pub handled: u64,
    /// Handler attempts that failed (errors and panics).
    pub handler_errors: u64,
    /// Failed attempts scheduled to be tried again.
    pub retries: u64,
    /// Events stored as dead letters after their last attempt failed.
    pub dead_lettered: u64,
    /// Dead letters taken to be delivered again after a retry was asked for.
    pub redelivered: u64,
    /// Events a transactional handler
    /// (`Notifier::handle_in_transaction`, PostgreSQL) skipped
    /// because their transaction had committed before: delivered again after a crash, a
    /// restart or a failover, and not applied twice.
    pub effects_skipped: u64,
    /// Dead letters of this notifier's handlers waiting in the database (retry or discard
    /// them: [`DeadLetters`](crate::DeadLetters)), counted by each handler's active process
    /// at its redelivery poll (every second by default); a handler that ends (unsubscribed,
    /// stopped, gone) or stands by takes its count back.
    pub dead_letters: u64,
    /// Rows read by [snapshot feeds](crate::Snapshot) so far (before their filters).
    pub snapshot_rows: u64,
    /// Rows the snapshot feeds opened so far hold, counted when each opens: with
    /// `snapshot_rows`, how far the snapshots have come (equal once all are read).
    pub snapshot_rows_total: u64,
}

/// A notifier's part in the group of processes running the same named consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// No named consumer (or one on PostgreSQL's notify tier alone): every notifier delivers.
    #[default]
    Independent,
    /// Connecting — at start, or reconnecting after its connection was lost (it holds no
    /// lease then) — or waiting for its first lease attempt.
    Starting,
    /// Holds the consumer's lease: reads and delivers.
    Active,
    /// Another process holds the lease: delivers nothing, ready to take over.
    Standby,
}

impl Role {
    fn from_u8(n: u8) -> Self {
        match n {
            1 => Role::Starting,
            2 => Role::Active,
            3 => Role::Standby,
            _ => Role::Independent,
        }
    }

    pub(crate) fn as_u8(self) -> u8 {
        match self {
            Role::Independent => 0,
            Role::Starting => 1,
            Role::Active => 2,
            Role::Standby => 3,
        }
    }
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub received: AtomicU64,
    pub delivered: AtomicU64,
    pub filtered_out: AtomicU64,
    pub malformed: AtomicU64,
    pub forged: AtomicU64,
    pub overflow_resolved: AtomicU64,
    pub overflow_missing: AtomicU64,
    pub replayed: AtomicU64,
    pub unrouted: AtomicU64,
    pub restarts: AtomicU64,
    pub subscriber_panics: AtomicU64,
    pub dropped: AtomicU64,
    pub queued: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Journal id of the last event routed (reported as `Stats::last_sequence`).
    pub routed_sequence: AtomicI64,
    /// Notifications handed to the decoder, and of those, how many were routed or dropped as
    /// malformed: when `settled` reaches a value `forwarded` had, everything forwarded up to
    /// then has left the pipeline (what a consumer may save a cursor against).
    pub forwarded: AtomicU64,
    pub settled: AtomicU64,
    /// Events closure subscribers have run: how `stop()` sees closures on other arbiters
    /// progress once the registry has handed everything over.
    pub closures_ran: AtomicU64,
    /// Set when the first subscription is registered: journal replay waits for it.
    pub has_subscriber: AtomicBool,
    /// The named consumer's backlog, as last counted.
    pub backlog: AtomicU64,
    /// The logical tier's slot lag in bytes, as last read.
    pub slot_lag: AtomicU64,
    /// [`Role`], as its `as_u8`.
    pub role: AtomicU8,
    /// How many times the role became [`Role::Standby`]: a reader that may have missed a short
    /// standby (another process active meanwhile) learns of it from a change of this count.
    pub standbys: AtomicU64,
    /// The error that stopped the listener for good.
    pub failure: std::sync::Mutex<Option<crate::Error>>,
    /// Events acknowledged subscriptions have not acknowledged yet.
    pub holds: Arc<Holds>,
    pub handled: AtomicU64,
    pub handler_errors: AtomicU64,
    pub retries: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub redelivered: AtomicU64,
    pub effects_skipped: Arc<AtomicU64>,
    pub dead_letters: AtomicU64,
    pub snapshot_rows: AtomicU64,
    pub snapshot_rows_total: AtomicU64,
    /// Readers of the listener waiting for in-flight budget now (`Outlet::forward`): while
    /// one does, the registry takes back what stuck event streams hold (`Registry::relieve`).
    pub budget_waiters: AtomicUsize,
    /// The pipeline's unlabelled metrics (`metrics.rs`), registered with the counters.
    pub metrics: PipelineMetrics,
}

impl Counters {
    pub fn role(&self) -> Role {
        Role::from_u8(self.role.load(Ordering::Relaxed))
    }

    pub fn set_role(&self, role: Role) {
        if role == Role::Standby {
            self.standbys.fetch_add(1, Ordering::Relaxed);
        }
        self.role.store(role.as_u8(), Ordering::Relaxed);
    }

    /// See `standbys`.
    pub fn standbys(&self) -> u64 {
        self.standbys.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` notifications' units as handed to the decoder (their budget taken).
    pub fn forward(&self, n: u64) {
        self.forwarded.fetch_add(n, Ordering::Relaxed);
        self.metrics.in_flight.increment(n as f64);
    }

    /// Counts `n` notifications' units as having left the pipeline. Listeners count
    /// `forwarded` before handing over, so `settled` can never pass it; in debug builds (the
    /// tests) a pipeline that settles more than it was given — budget handed back twice,
    /// which would let a consumer save its horizon too early — stops right here.
    pub fn settle(&self, n: u64) {
        // Release: whoever sees the new count also sees the holds taken before it.
        let settled = self.settled.fetch_add(n, Ordering::Release) + n;
        self.metrics.in_flight.decrement(n as f64);
        debug_assert!(
            settled <= self.forwarded.load(Ordering::Relaxed),
            "sqlnotify: settled {settled} events, more than were forwarded"
        );
    }

    /// How many forwarded units have fully left the pipeline: settled, and none before them
    /// still held by an acknowledged subscription. What a named consumer may save against.
    pub fn safe(&self) -> u64 {
        let settled = self.settled.load(Ordering::Acquire);
        match self.holds.floor() {
            Some(floor) => floor.min(settled),
            None => settled,
        }
    }

    /// Records the error that stopped the listener for good (the first one stays).
    pub fn fail(&self, error: crate::Error) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert(error);
    }

    /// A copy of the error that stopped the listener for good, if one did.
    pub fn failure(&self) -> Option<crate::Error> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(crate::Error::fatal_copy)
    }

    pub fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            received: get(&self.received),
            delivered: get(&self.delivered),
            filtered_out: get(&self.filtered_out),
            malformed: get(&self.malformed),
            forged: get(&self.forged),
            overflow_resolved: get(&self.overflow_resolved),
            overflow_missing: get(&self.overflow_missing),
            replayed: get(&self.replayed),
            unrouted: get(&self.unrouted),
            restarts: get(&self.restarts),
            subscriber_panics: get(&self.subscriber_panics),
            dropped: get(&self.dropped),
            queued: get(&self.queued),
            subscriptions: get(&self.subscriptions),
            in_flight: get(&self.forwarded).saturating_sub(get(&self.settled)),
            last_sequence: self.routed_sequence.load(Ordering::Relaxed),
            backlog: get(&self.backlog),
            slot_lag: get(&self.slot_lag),
            role: self.role(),
            failed: self.failure().is_some(),
            handled: get(&self.handled),
            handler_errors: get(&self.handler_errors),
            retries: get(&self.retries),
            dead_lettered: get(&self.dead_lettered),
            redelivered: get(&self.redelivered),
            effects_skipped: get(&self.effects_skipped),
            dead_letters: get(&self.dead_letters),
            snapshot_rows: get(&self.snapshot_rows),
            snapshot_rows_total: get(&self.snapshot_rows_total),
        }
    }
}
