//! `sqlnotify::relay` (feature `nats`): a named consumer's events published into a NATS
//! JetStream stream exactly once, for work sharing and fan-out beyond one database connection.
//!
//! ```text
//!  database ──► active relay ──► JetStream stream ──► workers (pull consumers)
//!           └─► standby relays (same consumer name: they take over when it dies)
//! ```
//!
//! A [`Relay`] is a [`Notifier`] running as a named consumer (so relays of the same name form
//! a consumer group: one publishes, the others stand by) with one acknowledged subscription
//! to every watched channel. Each event goes to subject `PREFIX.schema.table.operation`
//! (`….P` with [`partitions`](RelayBuilder::partitions)), its body the event as JSON
//! ([`ChangeEvent::to_record`](crate::ChangeEvent::to_record)), with headers:
//!
//! | header | value |
//! |---|---|
//! | `Nats-Msg-Id` | `SOURCE:SEQUENCE:PART`, the same for the same change whichever relay sends it |
//! | `Sqlnotify-Sequence` | the journal position ([`ChangeEvent::sequence`](crate::ChangeEvent::sequence)) |
//! | `Sqlnotify-Part` | the row's index in a statement-capture journal row (0 otherwise) |
//! | `Sqlnotify-Table` | `schema.table` |
//! | `Sqlnotify-Operation` | `insert`, `update` or `delete` |
//! | `Sqlnotify-Key` | the key as compact JSON (an array for a composite key) |
//!
//! **Exactly once into the stream.** Publishes are pipelined (up to
//! [`max_pending`](RelayBuilder::max_pending) unconfirmed); the consumer's position moves past
//! an event only once JetStream confirmed storing it and everything before it. A relay that
//! dies, or loses NATS, leaves the unconfirmed ones to be sent again — by itself on a new
//! connection, or by the standby that takes over — with the same `Nats-Msg-Id`, which the
//! stream drops as duplicates within its duplicate window. The window
//! ([`duplicate_window`](RelayBuilder::duplicate_window), 2 minutes by default) must outlast
//! the longest time a change can be sent again after it was first stored: a relay group down
//! for longer than that stores the last unconfirmed events twice.
//!
//! **Fencing.** A relay that loses its consumer's lease (its database connection ended and
//! another relay of the group took over) sends nothing more of what it read under that lease:
//! the new holder reads it again from the saved position and publishes it. What this relay
//! had not sent yet — waiting for room, for a connection to NATS, or still on its way to it —
//! is dropped unpublished and counted in [`RelayStats::fenced`]; only what it had already sent
//! can still be stored (promptly on a working connection; from a connection that hung, the
//! operating system may deliver it once the path recovers, stored again if that is after the
//! duplicate window: at most [`max_pending`](RelayBuilder::max_pending) messages). A relay
//! that takes the lease again later publishes what it then reads as before. How the lost
//! lease's events are told apart: `src/relay/pump.rs` and `src/holds.rs`.
//!
//! **Size.** A change whose message would be larger than the server's `max_payload` (1 MiB by
//! default) or the stream's `max_msg_size` is published with its key only and `"truncated":
//! true` in its body, as a trigger sends a row too large for a notification — the worker
//! reads the row by its key — and counted in [`RelayStats::truncated`]; refused, it would be
//! sent again for ever and hold up everything behind it. One whose key alone does not fit is
//! logged and counted in [`RelayStats::skipped`].
//!
//! **Order.** Messages are stored in commit order. Once a connection is lost a new one is
//! opened and what was not confirmed is sent again, in order, the first alone. Per-key order
//! therefore holds in the whole stream, and in each partition subject. Two exceptions: on a
//! link already storing, a message the stream refuses (say, no leader for a moment while it
//! changes) while it stores the next ones already sent is stored after them when it is sent
//! again — JetStream has no per-message precondition the relay could use without refusing
//! other sources' messages in a shared stream; and the lost connection's client reconnects
//! once by itself (see `nats.rs`), writing the publishes still queued in it, which can be
//! stored before earlier unconfirmed ones sent again on the new link.

mod broker;
mod nats;
mod pump;
mod subject;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::builder::NotifierBuilder;
use crate::durations::capped;
use crate::error::{Error, Result};
use crate::notifier::Notifier;
use crate::tier::Tier;

use self::nats::Nats;
use self::pump::{Counters, Pump};
use self::subject::{check_prefix, Naming};

/// The subject prefix when none is set.
pub const DEFAULT_SUBJECT_PREFIX: &str = "sqlnotify";

/// The duplicate window when none is set: NATS's own default.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Unconfirmed publishes at most, when not set.
pub const DEFAULT_MAX_PENDING: usize = 4096;

/// Builds a [`Relay`]: [`Relay::builder`].
#[must_use = "a relay builder does nothing until started"]
pub struct RelayBuilder {
    notifier: NotifierBuilder,
    nats: String,
    stream: String,
    prefix: String,
    partitions: Option<u32>,
    source: Option<String>,
    duplicate_window: Duration,
    max_age: Duration,
    max_pending: usize,
    ack_timeout: Duration,
}

impl std::fmt::Debug for RelayBuilder {
    /// The NATS URL with its password hidden.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("notifier", &self.notifier)
            .field("nats", &crate::redact::redact(&self.nats))
            .field("stream", &self.stream)
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("source", &self.source)
            .field("duplicate_window", &self.duplicate_window)
            .field("max_pending", &self.max_pending)
            .finish_non_exhaustive()
    }
}

impl RelayBuilder {
    /// The first subject token(s), default [`DEFAULT_SUBJECT_PREFIX`].
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Appends a partition token `0..n` to every subject, chosen by a hash (FNV-1a 64) of the
    /// key's compact JSON: one JetStream consumer per partition (filter `PREFIX.*.*.*.P`) gets
    /// every change of its keys, in order.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = Some(n);
        self
    }

    /// What makes message ids unique to this database: default, the consumer's name. Set one
    /// per database when several databases relay into one stream. Not empty, and no control
    /// characters (it goes into a header): else `start()` fails with
    /// [`Error::InvalidOption`].
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// How long the stream must remember message ids (see the module docs); a stream the
    /// relay creates gets this window, an existing one must have at least this.
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = capped(window);
        self
    }

    /// How long a stream the relay creates keeps messages (default 7 days).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = capped(age);
        self
    }

    /// Publishes awaiting JetStream's confirmation at most (default [`DEFAULT_MAX_PENDING`];
    /// at least 1, at most [`MAX_BUFFER`](crate::MAX_BUFFER)). Events wait in up to three
    /// queues of this size while NATS is unreachable.
    pub fn max_pending(mut self, n: usize) -> Self {
        self.max_pending = n.clamp(1, crate::MAX_BUFFER);
        self
    }

    /// How long to wait for one confirmation before the connection is given up and a new
    /// one opened (default 5 s).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = capped(timeout);
        self
    }

    /// Starts the notifier (waiting for its lease if another relay of the group holds it)
    /// and the publishing loop. Errors: the builder has no named consumer or holds
    /// subscriptions (they would take the replay before the relay's own is there), a watch uses
    /// PostgreSQL's notify tier (no journal position to make an id from), a prefix, schema or
    /// table is no valid subject token, or the notifier cannot start. NATS being unreachable
    /// is not an error: the relay retries with backoff, and nothing is read meanwhile beyond
    /// what fits in its window.
    pub async fn start(self) -> Result<Relay> {
        check_prefix(&self.prefix)?;
        if let Some(source) = &self.source {
            // Part of every message id, a NATS header: a line break there would end it.
            if source.is_empty() || source.chars().any(char::is_control) {
                return Err(Error::InvalidOption {
                    option: "source",
                    reason: format!("{source:?} is empty or holds a control character"),
                });
            }
        }
        if self.partitions == Some(0) {
            return Err(Error::InvalidOption {
                option: "partitions",
                reason: "a relay needs at least one partition".into(),
            });
        }
        let Some(consumer) = self.notifier.consumer_name().map(str::to_string) else {
            return Err(Error::InvalidOption {
                option: "consumer",
                reason: "a relay reads as a named consumer: call .consumer(\"name\") on the \
                         notifier builder (relays of one name form a group)"
                    .into(),
            });
        };
        if self.notifier.subscription_count() > 0 {
            // They would open the listener's gate before the relay's own subscription is
            // there: the replay and the first events would be handed to them alone and the
            // position saved past them, never published.
            return Err(Error::InvalidOption {
                option: "subscribe",
                reason: format!(
                    "a relay's notifier builder takes no subscriptions ({} registered): \
                     subscribe on relay.notifier() after start() instead",
                    self.notifier.subscription_count()
                ),
            });
        }
        let naming = Naming {
            prefix: self.prefix.clone(),
            partitions: self.partitions,
            source: self.source.clone().unwrap_or_else(|| consumer.clone()),
        };
        let notifier = self.notifier.start().await?;
        let setup = async {
            let mut bases = HashMap::new();
            let mut subjects = Vec::new();
            // Only PostgreSQL honours the tier; SQLite and MySQL always journal.
            let notify_exists = notifier.dialect_name() == "postgresql";
            for channel in notifier.channels() {
                if notify_exists && channel.tier() == Tier::Notify {
                    return Err(Error::InvalidOption {
                        option: "tier",
                        reason: format!(
                            "{}.{} {} is watched on the notify tier, which has no journal \
                             position to make a message id from: watch it with Tier::Durable \
                             or Tier::Poll",
                            channel.schema(),
                            channel.table(),
                            channel.operation().as_str()
                        ),
                    });
                }
                bases.insert(channel.name().to_string(), naming.base(&channel)?);
                subjects.extend(naming.subjects(&channel)?);
            }
            let deliveries = notifier.subscribe_acked_every(self.max_pending).await?;
            Ok((bases, subjects, deliveries))
        };
        let (bases, subjects, deliveries) = match setup.await {
            Ok(ok) => ok,
            Err(e) => {
                let _ = notifier.stop().await;
                return Err(e);
            }
        };
        let broker = Nats {
            url: self.nats,
            stream: self.stream.clone(),
            filter: format!("{}.>", self.prefix),
            subjects,
            duplicate_window: self.duplicate_window,
            max_age: self.max_age,
            ack_timeout: self.ack_timeout,
            max_pending: self.max_pending,
        };
        let fence = notifier.lease_fence();
        let counters = Arc::new(Counters::default());
        let pump = Pump {
            naming,
            bases,
            max_pending: self.max_pending,
            counters: counters.clone(),
            backoff: Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
        };
        let (stop, mut stop_rx) = watch::channel(false);
        let (stop_pump, stop_pump_rx) = watch::channel(false);
        let (done_tx, done) = watch::channel(false);
        let dropped = notifier.clone();
        actix_rt::spawn(async move {
            let run = pump.run(broker, deliveries, stop_pump_rx, fence);
            // `stop()` stops the notifier, then says so; a relay dropped without `stop()`
            // (an early return, a cancelled task) is stopped the same way here, the pump
            // confirming what is in flight meanwhile. Were the pump to end instead, the
            // notifier would go on reading with nobody to take its events: the first of them
            // stays held (`HeldSink::try_deliver`), so the position would stand still — the
            // journal kept, nothing published — for as long as the notifier ran.
            let stopping = async move {
                if stop_rx.wait_for(|s| *s).await.is_err() {
                    log::warn!(
                        "sqlnotify: a relay was dropped without stop(): stopping its notifier"
                    );
                    let _ = dropped.stop().await;
                }
                let _ = stop_pump.send(true);
            };
            tokio::pin!(run);
            tokio::pin!(stopping);
            tokio::select! {
                _ = &mut run => {}
                _ = &mut stopping => run.await,
            }
            let _ = done_tx.send(true);
        });
        Ok(Relay {
            notifier,
            stream: self.stream,
            counters,
            stop,
            done: Mutex::new(Some(done)),
        })
    }
}

/// A running relay: see the [module docs](self). Dropping it without
/// [`stop`](Relay::stop) stops it the same way, in the background.
///
/// ```no_run
/// # async fn run() -> sqlnotify::Result<()> {
/// use sqlnotify::relay::Relay;
/// use sqlnotify::{Notifier, Operation, Tier, Watch};
///
/// let relay = Relay::builder(
///     Notifier::builder("postgres://postgres@127.0.0.1/app")
///         .watch(Watch::new("orders", Operation::Insert).tier(Tier::Durable))
///         .watch(Watch::new("orders", Operation::Update).tier(Tier::Durable))
///         .consumer("orders-relay"),
///     "nats://127.0.0.1:4222",
///     "ORDERS",
/// )
/// .partitions(8)
/// .start()
/// .await?;
/// println!("{:?}", relay.stats());
/// relay.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Relay {
    notifier: Notifier,
    stream: String,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    done: Mutex<Option<watch::Receiver<bool>>>,
}

/// A snapshot of a relay's counters since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Messages the stream stored.
    pub published: u64,
    /// Messages the stream already had (sent again after a failure or a failover).
    pub duplicates: u64,
    /// Messages taken from the notifier and not confirmed yet.
    pub pending: u64,
    /// Connections to NATS opened (1 plus reconnects).
    pub connections: u64,
    /// Connection attempts that failed (NATS unreachable, the stream does not fit) and
    /// connections given up (lost, or a publish failed or timed out).
    pub failures: u64,
    /// Whether a connection is up now.
    pub connected: bool,
    /// Changes published with their key only, marked truncated: the whole event was larger
    /// than the server's `max_payload` or the stream's `max_msg_size`.
    pub truncated: u64,
    /// Changes not published at all: not even their key fitted (logged as errors).
    pub skipped: u64,
    /// Changes not published because they were read under the consumer's lease and this
    /// relay lost it since (its database connection ended and another relay of the group
    /// took over): the relay holding the lease reads them again and publishes them. Sent
    /// late, they could be stored twice, behind newer changes (see the module docs).
    pub fenced: u64,
}

impl Relay {
    /// A relay of the notifier `notifier` builds (it must have a
    /// [`consumer`](NotifierBuilder::consumer) name and watch journal tiers) into stream
    /// `stream` on the NATS server at `nats` (`nats://host:port`).
    pub fn builder(
        notifier: NotifierBuilder,
        nats: impl Into<String>,
        stream: impl Into<String>,
    ) -> RelayBuilder {
        RelayBuilder {
            notifier,
            nats: nats.into(),
            stream: stream.into(),
            prefix: DEFAULT_SUBJECT_PREFIX.to_string(),
            partitions: None,
            source: None,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_pending: DEFAULT_MAX_PENDING,
            ack_timeout: Duration::from_secs(5),
        }
    }

    /// The notifier the relay reads with: its [`stats`](Notifier::stats) show the group role,
    /// its status messages the database connection.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The relay's counters.
    pub fn stats(&self) -> RelayStats {
        let c = &self.counters;
        RelayStats {
            published: c.published.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            pending: c.pending.load(Ordering::Relaxed),
            connections: c.links.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            connected: c.connected.load(Ordering::Relaxed),
            truncated: c.truncated.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
            fenced: c.fenced.load(Ordering::Relaxed),
        }
    }

    /// Stops reading, lets the publishes in flight be confirmed (the notifier's final save
    /// waits for them a bounded while), then stops publishing. Whatever was not confirmed is
    /// sent again by the next relay of the group.
    pub async fn stop(&self) -> Result<()> {
        let result = self.notifier.stop().await;
        let _ = self.stop.send(true);
        let done = self.done.lock().ok().and_then(|mut d| d.take());
        if let Some(mut done) = done {
            let _ = done.wait_for(|d| *d).await;
        }
        result
    }
}
