//! [`Notifier`], the handle on a running pipeline: subscribe, notify, stats, stop. A notifier
//! is configured and started by [`NotifierBuilder`](crate::NotifierBuilder) (`Notifier::builder`
//! is defined in `builder.rs`, so that this module does not import the builder).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use serde_json::Value;
use tokio::sync::oneshot::error::TryRecvError;

use crate::acked::{held_channel, Deliveries};
use crate::backlog::BacklogWatch;
use crate::consumer::ConsumerInfo;
use crate::custom::CustomEvent;
use crate::dead_letters::DeadLetters;
use crate::dialect::Dialect;
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Channel};
use crate::handling::engine::{ActorCall, Call, Engine, FnCall};
use crate::handling::{Attempt, HandlerError, Handling};
use crate::instruments::HandlerMetrics;
use crate::listener::ListenerHandle;
use crate::operation::Operation;
use crate::payload::encode_custom;
use crate::pipeline::Pipeline;
use crate::registry::{
    Registry, StatusSink, Subscribe, SubscribeEvery, SubscribeStatus, Unsubscribe,
};
use crate::snapshot::{Feeder, Snapshot, SnapshotFeed};
use crate::stats::Stats;
use crate::status::StatusEvent;
use crate::subscriber::{spawn_blocking_subscriber, FnSubscriber, Sink};
use crate::subscription::{Subscription, SubscriptionId};

/// Everything `NotifierBuilder::start` set up, handed to the [`Notifier`] it returns.
pub(crate) struct Started {
    pub dialect: Arc<dyn Dialect>,
    pub pipeline: Pipeline,
    pub listener: Box<dyn ListenerHandle>,
    /// Counts a named consumer's backlog (stops when dropped).
    pub backlog: Option<BacklogWatch>,
    pub cleanup_on_stop: bool,
    /// Remove at stop the triggers of `installed` (unless `cleanup_on_stop` removes them all).
    pub cleanup_installed_on_stop: bool,
    /// The channels whose triggers `start()` created or replaced.
    pub installed: Vec<String>,
    pub install_timeout: Duration,
}

struct Running {
    listener: Box<dyn ListenerHandle>,
    /// Counts a named consumer's backlog (stops when dropped).
    backlog: Option<BacklogWatch>,
}

struct Inner {
    dialect: Arc<dyn Dialect>,
    /// Decoder, registry and what they share.
    pipeline: Pipeline,
    cleanup_on_stop: bool,
    cleanup_installed_on_stop: bool,
    /// The channels whose triggers `start()` created or replaced.
    installed: Vec<String>,
    install_timeout: Duration,
    running: Mutex<Option<Running>>,
    /// Resolve when the thread of a blocking subscriber has run its last event.
    blocking: Mutex<Vec<tokio::sync::oneshot::Receiver<()>>>,
    /// Set to `true` by [`Notifier::stop`]: snapshot feeds end the reads they still have open.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl Drop for Inner {
    /// The last clone of a notifier dropped without [`Notifier::stop`]: its listener is told
    /// to stop (its connections close, a named consumer's lease goes to another process of
    /// the group) and the pipeline shuts down after what is in its mailboxes — with no final
    /// save (the last periodic one stands: what came after is delivered again) and no
    /// cleanup. Without this the listener's session, which keeps the pipeline's actors
    /// alive, would read and deliver for as long as the actix system runs.
    fn drop(&mut self) {
        let running = match self.running.get_mut() {
            Ok(running) => running.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(mut running) = running else {
            return;
        };
        log::warn!(
            "sqlnotify: a notifier was dropped without stop(): its listener stops, with no \
             final save and no cleanup"
        );
        self.stopping.send_replace(true);
        drop(running.backlog.take());
        running.listener.abandon();
        self.pipeline.shutdown();
    }
}

/// A running notifier. Cheap to clone; every clone controls the same pipeline. Dropping the
/// last clone without [`stop`](Notifier::stop) stops it too, without the final save and the
/// cleanup `stop` does.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("dialect", &self.dialect_name())
            .field(
                "channels",
                &self.channels().iter().map(|c| c.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Notifier {
    pub(crate) fn new(started: Started) -> Notifier {
        let Started {
            dialect,
            pipeline,
            listener,
            backlog,
            cleanup_on_stop,
            cleanup_installed_on_stop,
            installed,
            install_timeout,
        } = started;
        Notifier {
            inner: Arc::new(Inner {
                dialect,
                pipeline,
                cleanup_on_stop,
                cleanup_installed_on_stop,
                installed,
                install_timeout,
                running: Mutex::new(Some(Running { listener, backlog })),
                blocking: Mutex::new(Vec::new()),
                stopping: tokio::sync::watch::Sender::new(false),
            }),
        }
    }

    /// The channels whose triggers [`start`](crate::NotifierBuilder::start) created or
    /// replaced, sorted: empty when it found every watch installed as generated (by another
    /// notifier sharing the database, or an earlier run), with
    /// [`manage_triggers(false)`](crate::NotifierBuilder::manage_triggers), and on the logical
    /// tier (no trigger). What
    /// [`cleanup_installed_on_stop`](crate::NotifierBuilder::cleanup_installed_on_stop) removes.
    pub fn installed_channels(&self) -> Vec<String> {
        let mut installed = self.inner.installed.clone();
        installed.sort();
        installed
    }

    /// `"postgresql"`, `"sqlite"` or `"mysql"`.
    pub fn dialect_name(&self) -> &'static str {
        self.inner.dialect.name()
    }

    /// The watched channels.
    pub fn channels(&self) -> Vec<Channel> {
        let mut channels: Vec<Channel> = self
            .inner
            .pipeline
            .channels
            .names()
            .filter_map(|n| self.inner.pipeline.channels.get(n))
            .map(|c| (**c).clone())
            .collect();
        channels.sort_by(|a, b| a.name().cmp(b.name()));
        channels
    }

    /// The registry actor, for sending [`Subscribe`] / [`Unsubscribe`] yourself.
    pub fn registry(&self) -> Addr<Registry> {
        self.inner.pipeline.registry.clone()
    }

    /// Delivers the events `subscription` selects to an actor.
    pub async fn subscribe(
        &self,
        subscription: Subscription,
        recipient: Recipient<ChangeEvent>,
    ) -> Result<SubscriptionId> {
        self.inner
            .pipeline
            .registry
            .send(Subscribe::new(subscription, recipient))
            .await?
    }

    /// The current rows of a watched table, then every change after them, in one feed (see
    /// [`Snapshot`]): first each row that passes the snapshot's filters as an event with
    /// [`is_snapshot`](ChangeEvent::is_snapshot) set (in key order — on MySQL in an index's
    /// order when none has the key's — read in chunks as the feed is read, so memory stays
    /// flat on a table of any size), then the changes of every watch on the table that commit
    /// after the snapshot, in commit order, filtered the same way.
    ///
    /// No change is missed and none is delivered twice: a change whose transaction the
    /// snapshot already reflects is skipped, every later one is delivered. On PostgreSQL's
    /// journal tiers (durable and poll), on SQLite and on MySQL that holds without condition;
    /// on the notify tier it
    /// holds for the notifications the listener receives (a NOTIFY sent while the listener
    /// is disconnected is lost there as it is for any subscription). While the rows stream,
    /// changes wait in the feed's buffer and, once it is full, the pipeline waits (the other
    /// subscribers of this notifier pause for as long; nothing is dropped).
    ///
    /// How the read is taken: on PostgreSQL, a `REPEATABLE READ` read-only transaction on a
    /// connection of its own (the notifier's role needs `SELECT` on the table), whose
    /// snapshot decides by transaction id which changes it reflects; on SQLite, one read
    /// transaction on a connection of its own (WAL mode: it blocks no writer) that reads the
    /// journal's head first, so the changes it reflects are the journal rows up to that head;
    /// on MySQL / MariaDB, a `REPEATABLE READ` transaction `WITH CONSISTENT SNAPSHOT` on a
    /// connection of its own (the notifier's user needs `SELECT` on the table; InnoDB) that
    /// reads the journal ids it sees above the listener's low watermark, so the changes it
    /// reflects are those at or below the watermark and those ids (journal ids are not in
    /// commit order there), and pages through the rows by key. A filter on a column the watches do not
    /// carry is refused with [`Error::UnknownFilterColumn`]; a table without a watch with
    /// [`Error::NotWatched`].
    pub async fn subscribe_snapshot(&self, snapshot: Snapshot) -> Result<SnapshotFeed> {
        let channels = &self.inner.pipeline.channels;
        let schema = snapshot.schema.as_deref();
        let labels: Vec<Option<&str>> = match snapshot.labels.as_slice() {
            [] => vec![None],
            labels => labels.iter().map(|l| Some(l.as_str())).collect(),
        };
        let mut found: Vec<Arc<Channel>> = Vec::new();
        for operation in [Operation::Insert, Operation::Update, Operation::Delete] {
            for &label in &labels {
                if let Ok(channel) = channels.find(schema, &snapshot.table, operation, label) {
                    if !found.iter().any(|c| c.name() == channel.name()) {
                        found.push(channel.clone());
                    }
                }
            }
        }
        let channel = match found.first() {
            Some(channel) => channel.clone(),
            // No watch on the table at all: the error names it (and the first label).
            None => channels
                .find(schema, &snapshot.table, Operation::Insert, labels[0])?
                .clone(),
        };
        crate::filter::check_columns(&channel, &snapshot.filters)?;
        let (tx, rx) = tokio::sync::mpsc::channel(snapshot.buffer);
        let progress = Arc::new(crate::snapshot::Progress::new());
        let start = crate::snapshot::feeder::Start {
            dialect: self.inner.dialect.clone(),
            registry: self.inner.pipeline.registry.clone(),
            chunk_rows: snapshot.chunk_rows,
            buffer: snapshot.buffer,
            stopping: self.inner.stopping.subscribe(),
        };
        let feeder = Feeder::new(
            found.iter().map(|c| c.name().to_string()).collect(),
            channel.clone(),
            snapshot.filters,
            tx,
            progress.clone(),
            self.inner.pipeline.stats.clone(),
            start,
        )
        .start();
        Ok(SnapshotFeed::new(rx, progress, feeder, channel))
    }

    /// Runs `f` for every event `subscription` selects, on the current arbiter — the thread the
    /// notifier's own actors run on — in one actor that runs every closure subscribed to this
    /// notifier there (a routed batch's events for all of them arrive as one message).
    /// **`f` must be quick**: while it runs, nothing else is routed, so a closure that blocks
    /// (a sleep, blocking I/O, a lock held long, a synchronous database call) delays every
    /// other subscriber and, once the in-flight budget is used up, the listener. Give such handlers
    /// [`subscribe_blocking`](Self::subscribe_blocking) instead, or an actor of your own on
    /// another [`Arbiter`](actix::Arbiter) with [`subscribe`](Self::subscribe).
    ///
    /// A panic in `f` is caught, logged and counted; later events still arrive.
    pub async fn subscribe_fn<F>(&self, subscription: Subscription, f: F) -> Result<SubscriptionId>
    where
        F: FnMut(ChangeEvent) + 'static,
    {
        let sink = Sink::Fn(self.inner.pipeline.closures.add(f));
        self.inner
            .pipeline
            .registry
            .send(Subscribe::with_sink(subscription, sink))
            .await?
    }

    /// Runs `f` for every event `subscription` selects on a thread of its own, so a handler
    /// that blocks or takes long never stalls the pipeline or the other subscribers: use it
    /// for blocking I/O, synchronous database or HTTP calls, sleeps, or heavy work.
    ///
    /// Events reach the thread through a bounded channel whose capacity is the subscription's
    /// [`buffer`](Subscription::buffer); when it is full, events wait in the subscription's
    /// buffer under its [`policy`](Subscription::policy) like any subscriber's — with
    /// [`Wait`](crate::OverflowPolicy::Wait) (the default) a handler that falls far enough
    /// behind makes the whole notifier wait for it; with
    /// [`DropOldest`](crate::OverflowPolicy::DropOldest) or
    /// [`KeepLatestPerKey`](crate::OverflowPolicy::KeepLatestPerKey) it only loses events of
    /// its own (reported as [`Status::Lagged`](crate::Status::Lagged)). Events are counted as
    /// delivered when they enter the channel.
    ///
    /// Events arrive in commit order. A panic in `f` is caught, logged and counted; later
    /// events still arrive. After [`unsubscribe`](Self::unsubscribe) the thread runs what is
    /// already in its channel, then ends; [`stop`](Self::stop) returns once every such thread
    /// has run every event it was handed (so a handler that never returns keeps `stop` waiting).
    ///
    /// ```no_run
    /// # use sqlnotify::{Notifier, Operation, Subscription};
    /// # async fn run(notifier: Notifier) -> sqlnotify::Result<()> {
    /// notifier
    ///     .subscribe_blocking(Subscription::new("orders", Operation::Insert), |event| {
    ///         // a blocking call is fine here
    ///         std::thread::sleep(std::time::Duration::from_millis(5));
    ///         println!("order {}", event.id());
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn subscribe_blocking<F>(
        &self,
        subscription: Subscription,
        f: F,
    ) -> Result<SubscriptionId>
    where
        F: FnMut(ChangeEvent) + Send + 'static,
    {
        let (tx, finished) =
            spawn_blocking_subscriber(subscription.buffer, f, self.inner.pipeline.stats.clone())
                .map_err(|e| Error::db("starting the thread of a blocking subscriber", e))?;
        if let Ok(mut threads) = self.inner.blocking.lock() {
            // Forget the threads of subscriptions that are gone.
            threads.retain_mut(|t| t.try_recv().is_err_and(|e| e == TryRecvError::Empty));
            threads.push(finished);
        }
        // On an error the sender is dropped with the message, and the thread ends.
        self.inner
            .pipeline
            .registry
            .send(Subscribe::with_sink(subscription, Sink::Channel(tx)))
            .await?
    }

    /// Delivers the events `subscription` selects into a bounded channel (capacity: the
    /// subscription's buffer), for blocking code. When the channel is full, events wait in the
    /// subscription's buffer under its overflow policy.
    pub async fn subscribe_channel(
        &self,
        subscription: Subscription,
    ) -> Result<(SubscriptionId, crossbeam_channel::Receiver<ChangeEvent>)> {
        let (tx, rx) = crossbeam_channel::bounded(subscription.buffer);
        let id = self
            .inner
            .pipeline
            .registry
            .send(Subscribe::with_sink(subscription, Sink::Channel(tx)))
            .await??;
        Ok((id, rx))
    }

    /// The events of every subscription in `subscriptions` through one bounded channel of
    /// `capacity` (see `src/stream_sink.rs`): in commit order across them unless `ordered` is
    /// false, each event once; what their overflow policies drop is counted on the receiver.
    /// With `on_cut`, the reader is cut off rather than lose events once it is armed, and the
    /// hook is told when. The subscriptions are removed when the returned
    /// [`StreamSubscriptions`] is dropped — also when this future is dropped part way, or
    /// returns an error.
    ///
    /// [`StreamSubscriptions`]: crate::registry::StreamSubscriptions
    #[cfg_attr(not(feature = "web"), allow(dead_code))]
    pub(crate) async fn subscribe_stream(
        &self,
        subscriptions: Vec<Subscription>,
        capacity: usize,
        ordered: bool,
        on_cut: Option<crate::stream_sink::CutHook>,
    ) -> Result<crate::registry::StreamSubscriptions> {
        let (sink, receiver) = crate::stream_sink::stream_channel(capacity, ordered, on_cut);
        let registry = &self.inner.pipeline.registry;
        // From before the first `Subscribe`: dropped anywhere from here, it removes them all.
        let stream = crate::registry::StreamSubscriptions::new(receiver, registry.clone());
        for subscription in subscriptions {
            registry
                .send(Subscribe::with_sink(
                    subscription,
                    Sink::Stream(sink.clone()),
                ))
                .await??;
        }
        Ok(stream)
    }

    /// The dialect (journal reads for clients that resume).
    #[cfg_attr(not(feature = "web"), allow(dead_code))]
    pub(crate) fn dialect(&self) -> &Arc<dyn Dialect> {
        &self.inner.dialect
    }

    /// The watched channels, by name.
    #[cfg_attr(not(feature = "web"), allow(dead_code))]
    pub(crate) fn channel_set(&self) -> &Arc<crate::event::Channels> {
        &self.inner.pipeline.channels
    }

    /// The channels whose journal the listener reads (durable and poll tiers): the order of a
    /// PostgreSQL journal read, and so of a replay, depends on them.
    #[cfg_attr(not(feature = "web"), allow(dead_code))]
    pub(crate) fn journal_channels(&self) -> Vec<String> {
        self.channel_set()
            .list()
            .into_iter()
            .filter(|c| matches!(c.tier(), crate::Tier::Durable | crate::Tier::Poll))
            .map(|c| c.name().to_string())
            .collect()
    }

    /// An acknowledged subscription: the events `subscription` selects, each with an
    /// [`Ack`](crate::Ack), in commit order. A named consumer's position moves past an event
    /// only once every acknowledged subscription that selected it has acknowledged it (and
    /// every event before it), so an event whose handling did not finish — the process was
    /// killed, the handler dropped the `Ack`, or the [`Deliveries`] were dropped without
    /// [`unsubscribe`](Notifier::unsubscribe) before it was received — is delivered again
    /// after a restart. Without
    /// a named consumer, or on PostgreSQL's notify tier, there is no position: the ack only
    /// keeps [`Notifier::stop`] waiting (a bounded while) for the events in hand.
    ///
    /// The subscription's overflow policy is always [`OverflowPolicy::Wait`](crate::OverflowPolicy):
    /// an acknowledged event is never dropped. Up to the subscription's buffer of deliveries
    /// wait in the channel, and as many again in its buffer; beyond that the listener waits.
    pub async fn subscribe_acked(
        &self,
        subscription: Subscription,
    ) -> Result<(SubscriptionId, Deliveries)> {
        let subscription = subscription.policy(crate::OverflowPolicy::Wait);
        let holds = self.inner.pipeline.stats.holds.clone();
        let (sink, deliveries) = held_channel(subscription.buffer, holds);
        let id = self
            .inner
            .pipeline
            .registry
            .send(Subscribe::with_sink(subscription, Sink::Held(sink)))
            .await??;
        Ok((id, deliveries))
    }

    /// Runs `handler` on the events `subscription` selects, with retries, dead letters and
    /// per-key order (see [`Handling`]). The handler answers `Ok(())` when an event is
    /// handled, or an error ([`HandlerError`]; a panic counts as one) to have it tried again
    /// after a capped, jittered delay; once [`max_attempts`](Handling::max_attempts) failed,
    /// the event is stored as a dead letter ([`Notifier::dead_letters`]) and the handler goes
    /// on. Events with the same table and key are handled one at a time, in commit order, also
    /// across retries: a failing key holds back only its own later events, while up to
    /// [`keys_in_flight`](Handling::keys_in_flight) other keys are handled meanwhile.
    ///
    /// With a named consumer on a journal tier, the consumer's position moves past an event
    /// only once it was handled or dead-lettered, so an event whose handling did not finish
    /// (the process was killed mid-handler or mid-retry) is delivered again after a restart,
    /// or to the process that takes over a consumer group — which continues its attempt count.
    /// Events handled after it may be delivered again too (at least once). Without a named
    /// consumer, or on PostgreSQL's notify tier, retries and dead letters work the same within
    /// the process, but nothing is delivered again after a restart.
    ///
    /// [`Notifier::unsubscribe`] with the returned id ends the handler: it lets go of the
    /// events it has not started (a named consumer's position moves past them, and they are
    /// not delivered again) once the calls running then finish. [`Notifier::stop`] keeps them
    /// for the next start instead.
    ///
    /// The subscription's overflow policy is always `Wait` (nothing is dropped). Runs on the
    /// current actix arbiter; `handler` need not be `Send`.
    ///
    /// ```no_run
    /// # async fn run(notifier: sqlnotify::Notifier) -> sqlnotify::Result<()> {
    /// use sqlnotify::{Handling, Operation, Subscription};
    ///
    /// notifier
    ///     .handle(
    ///         Subscription::new("users", Operation::Insert),
    ///         Handling::new("welcome-mail").max_attempts(8),
    ///         |event| async move {
    ///             let email = event.get("email").and_then(|v| v.as_str()).ok_or("no email")?;
    ///             println!("sending a welcome mail to {email}");
    ///             Ok(())
    ///         },
    ///     )
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn handle<F, Fut>(
        &self,
        subscription: Subscription,
        handling: Handling,
        handler: F,
    ) -> Result<SubscriptionId>
    where
        F: Fn(ChangeEvent) -> Fut + 'static,
        Fut: std::future::Future<Output = std::result::Result<(), HandlerError>> + 'static,
    {
        self.start_handler(subscription, handling, FnCall(handler))
            .await
    }

    /// [`Notifier::handle`] with an actor: it receives an [`Attempt`] per try and answers
    /// `Ok(())` or an error. An actor that handles messages concurrently (returning a
    /// future) gets up to [`keys_in_flight`](Handling::keys_in_flight) attempts at once, each
    /// on a different key. If the actor stops, the handler ends; events it did not handle
    /// stay unacknowledged: a named consumer's position stays before the first of them until
    /// the notifier stops, and a restart delivers them again.
    pub async fn handle_actor(
        &self,
        subscription: Subscription,
        handling: Handling,
        handler: Recipient<Attempt>,
    ) -> Result<SubscriptionId> {
        self.start_handler(subscription, handling, ActorCall(handler))
            .await
    }

    /// [`Notifier::handle`] with exactly-once effects on the source database (PostgreSQL,
    /// durable or poll tier): each attempt runs in a [`Transaction`](crate::Transaction) that
    /// first records the event as done for this handler (`sqlnotify.effects`) and commits the
    /// handler's writes together with that record when it returns `Ok(())` (an error rolls
    /// both back and the attempt is retried). An event delivered again — after a crash at any
    /// point, a restart or a consumer-group failover, before the consumer's position passed it
    /// — finds its record and is skipped without calling the handler
    /// ([`Stats::effects_skipped`](crate::Stats::effects_skipped)).
    ///
    /// What is exactly once: the writes the handler makes through the transaction, in this
    /// database. What is not: anything else the handler does (calls to other services, other
    /// databases, files) — those happen at least once, since a process can die after them and
    /// before the commit. A handler that fails every attempt leaves no effect and becomes a
    /// dead letter like any other.
    ///
    /// One connection per key in flight is opened beside the notifier's own. Fails with
    /// [`Error::Unsupported`] on SQLite and MySQL (use [`Notifier::handle`] and make the
    /// effect idempotent, e.g. keyed by the event's sequence) and when the subscription's
    /// channel is on the notify tier (no journal id to record) or the logical tier (no
    /// journal: its records could never be pruned).
    ///
    /// ```no_run
    /// # async fn run(notifier: sqlnotify::Notifier) -> sqlnotify::Result<()> {
    /// use sqlnotify::{Handling, Operation, Subscription};
    ///
    /// notifier
    ///     .handle_in_transaction(
    ///         Subscription::new("orders", Operation::Insert),
    ///         Handling::new("order-totals"),
    ///         |event, tx| async move {
    ///             let customer = event.get("customer_id").and_then(|v| v.as_i64()).ok_or("no customer")?;
    ///             tx.client()
    ///                 .execute("UPDATE totals SET orders = orders + 1 WHERE customer_id = $1", &[&customer])
    ///                 .await?;
    ///             Ok(())
    ///         },
    ///     )
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "postgres")]
    pub async fn handle_in_transaction<F, Fut>(
        &self,
        subscription: Subscription,
        handling: Handling,
        handler: F,
    ) -> Result<SubscriptionId>
    where
        F: Fn(ChangeEvent, crate::Transaction) -> Fut + 'static,
        Fut: std::future::Future<Output = std::result::Result<(), HandlerError>> + 'static,
    {
        let Some(config) = self.inner.dialect.postgres_config() else {
            return Err(Error::Unsupported {
                what: format!(
                    "handler {:?}: transactional handlers need PostgreSQL, not {}; use \
                     handle() and make the effect idempotent",
                    handling.name,
                    self.dialect_name()
                ),
            });
        };
        if let Ok(channel) = self.inner.pipeline.channels.find(
            subscription.schema.as_deref(),
            &subscription.table,
            subscription.operation,
            subscription.label.as_deref(),
        ) {
            // The effects table keys records by journal id, pruned as the journal is: a
            // logical-tier event's WAL position is neither.
            if !matches!(channel.tier(), crate::Tier::Durable | crate::Tier::Poll) {
                return Err(Error::Unsupported {
                    what: format!(
                        "handler {:?}: transactional handlers need a journal (durable or poll \
                         tier); channel {} is on the {} tier",
                        handling.name,
                        channel.name(),
                        format!("{:?}", channel.tier()).to_lowercase()
                    ),
                });
            }
        }
        handling.check()?;
        crate::postgres::effects::ensure(&config).await?;
        let call = crate::postgres::effects::TxCall::new(
            handler,
            handling.name.clone(),
            config,
            self.inner.pipeline.stats.effects_skipped.clone(),
        );
        self.start_handler(subscription, handling, call).await
    }

    async fn start_handler<C: Call>(
        &self,
        subscription: Subscription,
        handling: Handling,
        call: C,
    ) -> Result<SubscriptionId> {
        handling.check()?;
        let store = crate::dead_letters::guarded(self.inner.dialect.dead_letter_store()?);
        let (id, deliveries) = self.subscribe_acked(subscription).await?;
        let engine = Engine {
            metrics: HandlerMetrics::new(&handling.name),
            handling,
            store,
            counters: self.inner.pipeline.stats.clone(),
            channels: self.inner.pipeline.channels.clone(),
        };
        actix::spawn(engine.run(call, deliveries));
        Ok(id)
    }

    /// An acknowledged subscription to every event of every watched channel, in commit order
    /// across channels (the relay's feed); `buffer` deliveries wait in the channel.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) async fn subscribe_acked_every(&self, buffer: usize) -> Result<Deliveries> {
        let holds = self.inner.pipeline.stats.holds.clone();
        let (sink, deliveries) = held_channel(buffer, holds);
        self.inner
            .pipeline
            .registry
            .send(SubscribeEvery {
                sink: Sink::Held(sink),
                buffer,
            })
            .await?;
        Ok(deliveries)
    }

    /// The pipeline's lease fence (`src/holds.rs`): events whose ordinal is below its value
    /// were read under a consumer-group lease this notifier has lost since.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) fn lease_fence(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.pipeline.stats.holds.watch_fence()
    }

    /// Sends [`StatusEvent`]s (connected, disconnected, gap, lagged …) to an actor.
    pub async fn subscribe_status(&self, recipient: Recipient<StatusEvent>) -> Result<()> {
        Ok(self
            .inner
            .pipeline
            .registry
            .send(SubscribeStatus(StatusSink::Recipient(recipient)))
            .await?)
    }

    /// Runs `f` for every [`StatusEvent`], in an actor of its own.
    pub async fn subscribe_status_fn<F>(&self, f: F) -> Result<()>
    where
        F: FnMut(StatusEvent) + 'static,
    {
        let actor = FnSubscriber::new(f, self.inner.pipeline.stats.clone()).start();
        Ok(self
            .inner
            .pipeline
            .registry
            .send(SubscribeStatus(StatusSink::Fn(actor)))
            .await?)
    }

    /// Removes a subscription. No event is delivered to it once this returns.
    ///
    /// The events it selected and had not handed over are let go (reported in
    /// [`Status::Lagged`](crate::Status::Lagged)): a named consumer's position may move past them. An
    /// acknowledged subscription's [`Deliveries`] still yield what was in them already
    /// (dropping them lets go of those too); a handler ([`Notifier::handle`]) lets go of the
    /// events it had not started, after the calls running then finish, and hands its dead
    /// letters being delivered again back `requested`.
    pub async fn unsubscribe(&self, id: SubscriptionId) -> Result<()> {
        self.inner.pipeline.registry.send(Unsubscribe(id)).await?
    }

    /// Sends a custom event on the channel of the watch of `operation` on `table`; see
    /// [`notify_with`](Self::notify_with).
    pub async fn notify(&self, table: &str, operation: Operation, payload: Value) -> Result<()> {
        self.notify_with(CustomEvent::new(table, operation, payload))
            .await
    }

    /// Sends a custom event. It goes through the database (on a connection other than the
    /// listener's), so every notifier listening on the channel receives it, and subscribers
    /// get it exactly like a trigger's event. A payload over the NOTIFY limit is stored in the
    /// overflow table when allowed, else fails with [`Error::PayloadTooLarge`].
    pub async fn notify_with(&self, event: CustomEvent) -> Result<()> {
        if !self.is_running() {
            return Err(Error::NotRunning);
        }
        let s = &event.subscription;
        let channel = self
            .inner
            .pipeline
            .channels
            .find(
                s.schema.as_deref(),
                &s.table,
                s.operation,
                s.label.as_deref(),
            )?
            .clone();
        let payload =
            encode_custom(&event.payload, &channel).map_err(|reason| Error::InvalidPayload {
                channel: channel.name().to_string(),
                reason,
            })?;
        self.inner
            .dialect
            .send_custom(&channel, payload, &event.payload, event.allow_overflow)
            .await
    }

    /// The pipeline's counters.
    pub async fn stats(&self) -> Result<Stats> {
        Ok(self.inner.pipeline.stats.snapshot())
    }

    /// The error that stopped the listener for good, if one did: it reads nothing more (see
    /// [`Status::Failed`](crate::Status::Failed)): [`Error::SlotLost`], a
    /// [`Tier::Logical`](crate::Tier::Logical) slot the server invalidated, or the
    /// [`Error::Database`] of a panic in the listener's own code (a bug); every other failure
    /// is retried with backoff. [`stop`](Self::stop) returns
    /// it too.
    pub fn failure(&self) -> Option<Error> {
        self.inner.pipeline.stats.failure()
    }

    /// The named consumers registered in this database — this notifier's and every other
    /// application's — with their state, position, backlog and last activity, by name. Works
    /// on every dialect, also after `stop()`; empty when sqlnotify was never installed.
    pub async fn consumers(&self) -> Result<Vec<ConsumerInfo>> {
        self.inner.dialect.consumers().await
    }

    /// Drops the named consumer `name` on purpose: from now on it protects nothing, so the
    /// purge deletes journal rows it has not read once they are older than the retention. Its
    /// record stays, marked dropped: if a consumer of that name starts again, it resumes from
    /// where it was with what is left, and first gets a [`Status::Gap`](crate::Status::Gap)
    /// naming the channels on which rows it had not read were purged. Dropping a consumer
    /// that is running lasts until its next save (at most 10 s): it registers again. Fails
    /// with [`Error::UnknownConsumer`] when no consumer has that name.
    pub async fn drop_consumer(&self, name: &str) -> Result<()> {
        self.inner.dialect.drop_consumer(name.to_string()).await
    }

    /// The dead letters of this database: the events handlers ([`Notifier::handle`]) failed
    /// on, to list, inspect, retry and discard.
    pub fn dead_letters(&self) -> Result<DeadLetters> {
        Ok(DeadLetters::new(self.inner.dialect.dead_letter_store()?))
    }

    /// Whether [`stop`](Self::stop) has not been called yet.
    pub fn is_running(&self) -> bool {
        self.inner
            .running
            .lock()
            .map(|r| r.is_some())
            .unwrap_or(false)
    }

    /// Stops the notifier: stops listening, hands every notification already received to the
    /// subscribers (closure subscribers have run by the time this returns; actor subscribers
    /// have it in their mailbox) — waiting as long as the pipeline makes progress, and giving
    /// up on the rest, counted as dropped, once it made none for 15 s — removes this
    /// notifier's triggers if `cleanup_on_stop` (those its start() installed if
    /// `cleanup_installed_on_stop`), and closes the connections. A second call returns [`Error::NotRunning`]. When the listener
    /// had stopped for good ([`failure`](Self::failure)), stop still does all this and then
    /// returns that error.
    ///
    /// Snapshot reads still open ([`subscribe_snapshot`](Self::subscribe_snapshot) and
    /// backfills) are ended first, where they stand — their transactions rolled back, their
    /// connections closed — not read to the end: their feeds end with
    /// [`Error::NotRunning`] after the rows read before (see [`SnapshotFeed::next`]).
    pub async fn stop(&self) -> Result<()> {
        let mut running = self
            .inner
            .running
            .lock()
            .map_err(|_| Error::NotRunning)?
            .take()
            .ok_or(Error::NotRunning)?;
        // First: a feeder in the middle of a read takes no live event, so the flush below
        // would wait for it.
        self.inner.stopping.send_replace(true);
        drop(running.backlog.take());
        running.listener.shutdown().await;
        let handed_over = self.inner.pipeline.flush_on_stop().await;
        self.inner.pipeline.shutdown_counted().await;
        let mut result = running.listener.finish(handed_over).await;
        // The registry is gone with its senders: blocking subscribers run what they were
        // handed, then their threads end.
        let threads = match self.inner.blocking.lock() {
            Ok(mut threads) => std::mem::take(&mut *threads),
            Err(_) => Vec::new(),
        };
        let joined = futures_util::future::join_all(threads);
        if handed_over {
            joined.await;
        } else if tokio::time::timeout(crate::pipeline::STALLED_ON_STOP, joined)
            .await
            .is_err()
        {
            log::warn!(
                "sqlnotify: stopping without waiting longer for blocking subscribers that have \
                 not finished what they were handed"
            );
        }
        let remove: Option<Vec<String>> = if self.inner.cleanup_on_stop {
            let names = self.inner.pipeline.channels.names();
            Some(names.map(str::to_string).collect())
        } else if self.inner.cleanup_installed_on_stop && !self.inner.installed.is_empty() {
            Some(self.inner.installed.clone())
        } else {
            None
        };
        if let Some(names) = remove {
            let uninstalled = self
                .inner
                .dialect
                .uninstall(names, self.inner.install_timeout)
                .await;
            result = result.and(uninstalled);
        }
        self.inner.dialect.close().await;
        result
    }
}
