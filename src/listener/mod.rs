//! The one supervised listener: the lifecycle every dialect shares, around a [`Source`] that
//! supplies only a dialect's I/O (connect, place the position, read, wait, check, save).
//!
//! A listener is an actix actor under a [`Supervisor`]. Each generation runs one *session* —
//! connect, place the position on the first connection, then read / save / check / wait until
//! stopped or failed (see `session.rs`; a panic in the source's I/O fails the session like an
//! error, it does not end the actor). A failed session is announced as
//! [`Status::Disconnected`]; the supervisor restarts the actor, which starts the next session
//! after a jittered [`Backoff`] that grows with each failed session and starts again from its
//! shortest delay only after a session proved healthy — it got through its setup and then a
//! read or a wait went without error and the source agreed that showed it works
//! ([`Source::proved`]: a logical stream only once something the server sent went through),
//! or it handed events to the pipeline, or it lasted the longest delay ([`Backoff::healthy`]):
//! connecting is not enough, or a server that accepts the connection and then fails the lease,
//! the restore, the start of the stream or the stream's first message every time would be
//! retried at the shortest delay for ever — unless the error is fatal (`Error::is_fatal`: a replication
//! slot the server invalidated), which stops the listener for good, announced as
//! [`Status::Failed`] and kept in the counters for `Notifier::failure` and `stop()`. The first session reports readiness (or its failure) to
//! `start()` instead, so a notifier that cannot listen fails to start. Reading state — the
//! source's position, and the consumer's [`Saving`] state — lives across sessions: a new one
//! resumes where the last stopped and announces the catch-up as [`Status::Resynced`].
//!
//! The rules that hold for every dialect live here once: events reach the pipeline through the
//! [`Outlet`] (one unit of in-flight budget per event, stop cuts a wait for room short); a
//! named consumer reads nothing before its first subscription exists; its position is saved
//! by the rule in `saving.rs`; a connection is checked when it has been quiet for the
//! health-check interval; and after `stop()`, [`ListenerHandle::finish`] saves the newest
//! position once the pipeline is flushed.

mod outlet;
mod saving;
mod session;
mod wake;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::{oneshot, watch};

pub(crate) use self::outlet::Outlet;
use self::saving::Saving;
use self::session::{Outcome, Session};
pub(crate) use self::wake::Wake;
use crate::backoff::Backoff;
use crate::consumer::ConsumerParams;
use crate::decoder::RawBatch;
use crate::error::{Error, Result};
use crate::event::Channel;
use crate::stats::{Counters, Role};
use crate::status::{Status, StatusEvent};

/// What a listener is asked to listen to, and where its notifications go.
pub(crate) struct ListenParams {
    /// The channels to listen on (each with its tier and whether its payloads are signed:
    /// PostgreSQL reads them, the journal dialects only need the names).
    pub channels: Vec<Channel>,
    /// A named consumer registers and resumes from its saved position (journal tiers).
    pub consumer: Option<ConsumerParams>,
    /// Where notifications go.
    pub decoder: Recipient<RawBatch>,
    /// Counters (also: whether a subscriber exists, and how far the pipeline got).
    pub stats: Arc<Counters>,
    /// Where status messages go (the decoder, so they stay in order with events).
    pub status: Recipient<StatusEvent>,
    /// In-flight budget: one unit per event before it is passed on (and more for a large
    /// payload, by `weight`).
    pub budget: Arc<tokio::sync::Semaphore>,
    /// How payloads weigh in `budget`.
    pub weight: crate::pipeline::Weight,
    /// How often a quiet connection is checked.
    pub health_check: Duration,
}

impl ListenParams {
    /// The channels' names, sorted.
    #[cfg_attr(not(any(feature = "sqlite", feature = "mysql")), allow(dead_code))]
    pub fn channel_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.channels.iter().map(|c| c.name().to_string()).collect();
        names.sort();
        names.dedup();
        names
    }
}

/// A running listener, as the notifier holds it.
pub(crate) trait ListenerHandle: Send {
    /// Stops reading; resolves after everything already read was passed to the decoder.
    fn shutdown(&mut self) -> BoxFuture<'static, ()>;
    /// Tells the listener to stop, without waiting: for a notifier dropped without `stop()`.
    fn abandon(&mut self);
    /// Called once the pipeline is flushed: saves what must survive (a consumer's position).
    /// `handed_over`: whether every event read was handed to its subscribers; when not, the
    /// position read up to is not saved (what was left is delivered again after a restart).
    fn finish(self: Box<Self>, handed_over: bool) -> BoxFuture<'static, Result<()>>;
}

/// How a source wants to be polled: every `active` while events flow, slowing down (doubling)
/// to `idle` once none came for `stay_active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pace {
    pub active: Duration,
    pub idle: Duration,
    pub stay_active: Duration,
}

/// Saves a consumer's position after the listener stopped, on a connection of its own.
pub(crate) type FinalSave<P> = Box<dyn FnOnce(String, P) -> BoxFuture<'static, Result<()>> + Send>;

/// A dialect's I/O, all the shell needs. The source keeps the reading position (it survives
/// reconnects); a connection lives for one session.
pub(crate) trait Source: Unpin + 'static {
    /// One connection (and whatever runs beside it, such as a reader task).
    type Conn: 'static;
    /// Where reading stands: what a named consumer saves.
    type Position: Clone + PartialEq + std::fmt::Debug + Send + Unpin + 'static;

    /// The database, for logs: `"PostgreSQL"`.
    const NAME: &'static str;

    /// Opens a connection ready to read (PostgreSQL: LISTENing on every channel). Readers
    /// that run beside the session (PostgreSQL's notifications) hand events to `outlet`.
    async fn connect(&mut self, outlet: &Outlet) -> Result<Self::Conn>;

    /// Places the position, on the first connection, and again on the first one after a named
    /// consumer lost its lease (another process read meanwhile: what this source had read is
    /// stale): at a named consumer's saved position — registering a new consumer at "now" —
    /// else at "now". Returns the channels on which a returning consumer missed purged rows.
    async fn place(
        &mut self,
        conn: &mut Self::Conn,
        consumer: Option<&ConsumerParams>,
    ) -> Result<Vec<String>>;

    /// Called at the start of every session, once the position is placed and a named
    /// consumer's lease is held (so by the one process of a group that reads): checks that
    /// what keeps the position in the database is still there, and creates it again, at
    /// "now", when it was removed while this listener ran (the logical tier's slot, dropped
    /// by an operator or by `cleanup` / `consumers drop` in another process) — as a journal
    /// tier's [`save`](Source::save) registers again a consumer whose row was deleted.
    /// Returns the channels on which events may have been missed: every channel when it was
    /// created again, since nothing says what was lost; they are announced as a
    /// [`Status::Gap`], and what was saved or read up to before no longer counts. A removal
    /// that must not be undone is an error instead (a fatal one stops the listener).
    async fn restore(
        &mut self,
        _conn: &mut Self::Conn,
        _consumer: Option<&ConsumerParams>,
    ) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Tries to take named consumer `consumer`'s lease, without waiting: true when this
    /// process holds it now (taken, or still held). Of all the processes running one
    /// consumer, only the holder reads. The lease must be released by the holder's death —
    /// a session lock on the connection that also saves the position, or a lock the OS drops
    /// with the process — never by a timer alone, so two holders cannot overlap.
    async fn lease(&mut self, conn: &mut Self::Conn, consumer: &ConsumerParams) -> Result<bool>;

    /// Who holds `consumer`'s lease, as the database tells (a server process or connection,
    /// its role, its client), for the log of a process that stands by: any connected role can
    /// take a lease, and an operator must be able to tell a foreign holder from a process of
    /// the group. `None` where the database cannot tell (SQLite: an OS file lock) or the
    /// look-up failed.
    async fn lease_holder(
        &mut self,
        _conn: &mut Self::Conn,
        _consumer: &ConsumerParams,
    ) -> Option<String> {
        None
    }

    /// Whether there is a journal to read (false: PostgreSQL's notify tier alone).
    fn reads(&self) -> bool {
        true
    }

    /// Reads the rows past the position and hands them to `outlet`: every one, or a bounded
    /// share while more keep coming (the logical tier's stream), so that the position is noted
    /// and saved between reads; a source that leaves rows behind must have its next `wait`
    /// return at once. Returns how many events went, or `None` when told to stop while
    /// waiting for room in the pipeline. A panic in it fails the session like an error, and
    /// the next one reads from the position: a source must not count anything as read before
    /// it went to `outlet`, or must catch its own panics first (the logical tier does).
    async fn read(&mut self, conn: &mut Self::Conn, outlet: &Outlet) -> Result<Option<u64>>;

    /// The position after everything read so far; `None` before it is placed.
    fn position(&self) -> Option<Self::Position>;

    /// The channels on which the reads since the last call found rows gone that they had
    /// not read: a listener without a consumer, whose rows nothing keeps, that fell behind
    /// the journal's retention (a slow subscriber holding the pipeline for that long) and
    /// lost rows to the purge. The shell announces them as a [`Status::Gap`]. A named
    /// consumer's rows are kept for it ([`place`](Source::place) and
    /// [`save`](Source::save) report what a dropped or expired one missed).
    fn missed(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// Waits at most `timeout` for a sign that rows may have arrived; returns whether one
    /// came (a wake-up, a changed data version). Fails when the connection is lost.
    async fn wait(&mut self, conn: &mut Self::Conn, timeout: Duration) -> Result<bool>;

    /// Whether what this session's connection went through so far shows it works, asked after
    /// each read or wait that ended without error: a session that did prove healthy
    /// ([`Backoff::healthy`]) starts the reconnect delays again from the shortest. By default
    /// such a read or wait is proof — a journal read that returns, even empty, read the
    /// journal. A stream whose read can return before the server sent anything says no until
    /// something went through: the logical tier's, whose server fails a message it cannot
    /// decode (a poison message) only once the stream asks for it, so its first read returns
    /// empty every time and would otherwise prove a session that fails on that message each
    /// time, reconnecting at the shortest delay for ever. Events handed to the pipeline prove
    /// a session whatever this says.
    fn proved(&self, _conn: &Self::Conn) -> bool {
        true
    }

    /// Checks that the connection answers within `limit` (the health-check interval); called
    /// when it has been quiet that long.
    async fn check(&mut self, conn: &mut Self::Conn, limit: Duration) -> Result<()>;

    /// Saves a running consumer's position (also saying it is alive). Returns the channels on
    /// which rows it had not read were purged, when it had been dropped or expired meanwhile
    /// (it is registered again).
    async fn save(
        &mut self,
        conn: &mut Self::Conn,
        consumer: &ConsumerParams,
        position: &Self::Position,
    ) -> Result<Vec<String>>;

    /// How the final save after stop is made.
    fn final_save(&self) -> FinalSave<Self::Position>;

    /// Closes a connection for good; resolves once everything it read was handed over.
    async fn close(&mut self, conn: Self::Conn);

    /// How to poll.
    fn pace(&self) -> Pace;

    /// Channels whose events are lost while disconnected (PostgreSQL's notify tier): a new
    /// connection announces them as a [`Status::Gap`].
    fn lossy_channels(&self) -> Vec<String> {
        Vec::new()
    }

    /// What a failure says in [`Status::Disconnected`] (PostgreSQL: the server's own words
    /// when it closed the connection).
    fn describe(&self, _conn: Option<&Self::Conn>, error: &Error) -> String {
        error.to_string()
    }
}

/// What every session of one listener shares.
pub(crate) struct Shell<P> {
    pub consumer: Option<ConsumerParams>,
    pub status: Recipient<StatusEvent>,
    pub outlet: Outlet,
    pub stats: Arc<Counters>,
    pub health_check: Duration,
    /// The newest position, for the final save after stop.
    pub latest: Arc<Mutex<Option<P>>>,
}

impl<P> Shell<P> {
    fn status(&self, status: Status) {
        self.status.do_send(StatusEvent::now(status));
    }
}

/// What survives from one session to the next.
pub(crate) struct State<S: Source> {
    pub source: S,
    pub saving: Saving<S::Position>,
    pub placed: bool,
    pub was_connected: bool,
    /// The last session held the consumer's lease.
    pub held_lease: bool,
}

/// The supervised actor.
pub(crate) struct Listener<S: Source> {
    shell: Arc<Shell<S::Position>>,
    /// `None` while a session runs (it holds the state).
    state: Option<State<S>>,
    stop: watch::Sender<bool>,
    ready: Option<oneshot::Sender<Result<()>>>,
    backoff: Backoff,
    /// Consecutive restarts since the last session that proved healthy (not merely connected:
    /// [`Backoff::healthy`]).
    attempt: u32,
    /// Resolved when the running session ends (Shutdown waits for them).
    waiters: Vec<oneshot::Sender<()>>,
    shutting_down: bool,
    /// A session panicked and took the state with it: no session runs, nor will.
    lost: bool,
}

impl<S: Source> Listener<S> {
    fn run_session(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        let Some(state) = self.state.take() else {
            return;
        };
        let session = Session {
            shell: self.shell.clone(),
            ready: self.ready.take(),
        };
        let run = crate::error::caught(
            || format!("the {} listener's session", S::NAME),
            session.run(state).map(Ok),
        );
        ctx.spawn(run.into_actor(self).map(|ran, act, ctx| match ran {
            Ok((state, outcome)) => act.ended(state, outcome, ctx),
            Err(error) => act.panicked(error),
        }));
    }

    /// A session panicked outside the source's calls (those fail the session, which restarts
    /// from the source's position): a bug, which took the reading state with it. The
    /// listener stops for good and says so, as after an error retrying cannot help, rather
    /// than end without a word.
    fn panicked(&mut self, error: Error) {
        self.lost = true;
        self.session_over();
        self.stop_for_good(error.to_string(), error);
    }

    /// A session ended (or was lost): whoever waits for that is told, and the listener holds
    /// no lease between sessions, whatever it held before.
    fn session_over(&mut self) {
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(());
        }
        if matches!(self.shell.stats.role(), Role::Active | Role::Standby) {
            self.shell.stats.set_role(Role::Starting);
        }
    }

    /// Retrying cannot help: stop for good, and say so.
    fn stop_for_good(&mut self, message: String, error: Error) {
        log::error!(
            "sqlnotify: {} listener stopped for good: {message}",
            S::NAME
        );
        self.shell.stats.fail(error);
        self.shell.status(Status::Failed { error: message });
        self.shutting_down = true;
    }

    fn ended(&mut self, state: State<S>, outcome: Outcome, ctx: &mut Context<Self>) {
        if self.backoff.healthy(outcome.proved, outcome.lasted) {
            self.attempt = 0;
        }
        self.state = Some(state);
        self.session_over();
        match (outcome.failure, outcome.fatal) {
            (Some(error), Some(fatal)) if !self.shutting_down => self.stop_for_good(error, fatal),
            (Some(error), None) if !self.shutting_down => {
                log::warn!("sqlnotify: {} listener failed: {error}", S::NAME);
                self.shell.status(Status::Disconnected { error });
                ctx.stop();
            }
            // Stopped, told to stop, or the first start failed and was reported to start():
            // nothing to restart.
            _ => self.shutting_down = true,
        }
    }
}

impl<S: Source> Actor for Listener<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.attempt == 0 {
            self.run_session(ctx);
        } else {
            let delay = self.backoff.delay(self.attempt);
            log::info!(
                "sqlnotify: reconnecting the {} listener in {delay:?} (attempt {})",
                S::NAME,
                self.attempt
            );
            ctx.run_later(delay, |act, ctx| act.run_session(ctx));
        }
    }
}

impl<S: Source> Supervised for Listener<S> {
    fn restarting(&mut self, _: &mut Context<Self>) {
        if !self.shutting_down {
            self.attempt = self.attempt.saturating_add(1);
            Counters::add(&self.shell.stats.restarts, 1);
            crate::instruments::listener_restarted(S::NAME);
        }
    }
}

/// Stops the listener for good; resolves once its session has handed over what it read and
/// ended.
pub(crate) struct Shutdown;

impl Message for Shutdown {
    type Result = ();
}

impl<S: Source> Handler<Shutdown> for Listener<S> {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        let _ = self.stop.send(true);
        if self.state.is_some() || self.lost {
            // No session runs (a restart may be pending: it will not start).
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// The notifier's handle on a running listener.
struct Handle<S: Source> {
    addr: Addr<Listener<S>>,
    consumer: Option<String>,
    latest: Arc<Mutex<Option<S::Position>>>,
    final_save: FinalSave<S::Position>,
    stats: Arc<Counters>,
}

/// How long stopping waits for acknowledged subscriptions to acknowledge the events in hand
/// before the final save; past it, the last periodic save stands.
pub(crate) const ACK_WAIT_ON_STOP: Duration = Duration::from_secs(5);

/// How long the final save after stop may take (connecting included): a server that stopped
/// answering — a network path gone silent, which a new connection learns only from the
/// kernel's timeouts, minutes later or never — must not hold `stop()` for ever. Past it the
/// last periodic save stands, and `stop()` says so.
const FINAL_SAVE_WITHIN: Duration = Duration::from_secs(10);

impl<S: Source> ListenerHandle for Handle<S> {
    fn shutdown(&mut self) -> BoxFuture<'static, ()> {
        let addr = self.addr.clone();
        Box::pin(async move {
            let _ = addr.send(Shutdown).await;
        })
    }

    fn abandon(&mut self) {
        self.addr.do_send(Shutdown);
    }

    /// The pipeline is flushed: everything read has left it, so a named consumer saves the
    /// newest position — once acknowledged subscriptions acknowledged what they hold (for up
    /// to [`ACK_WAIT_ON_STOP`], and no longer than an unused `Ack` is alive; otherwise the last
    /// periodic save stands and they are delivered again). Dropping the last address then lets the idle actor stop.
    /// A listener that stopped for good saves nothing and returns its error.
    fn finish(self: Box<Self>, handed_over: bool) -> BoxFuture<'static, Result<()>> {
        if let Some(failure) = self.stats.failure() {
            // Nothing to save where reading cannot go on: say why it stopped.
            return Box::pin(async move { Err(failure) });
        }
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (Some(name), Some(position)) = (self.consumer, latest) else {
            return Box::pin(async { Ok(()) });
        };
        if !handed_over {
            log::warn!(
                "sqlnotify: consumer {name:?} stopped before its subscribers took every event \
                 read: no final save, so what was not routed yet (and what acknowledged \
                 subscriptions had not acknowledged) is delivered again after a restart"
            );
            return Box::pin(async { Ok(()) });
        }
        let holds = self.stats.holds.clone();
        let final_save = self.final_save;
        Box::pin(async move {
            let settled = tokio::time::timeout(ACK_WAIT_ON_STOP, holds.settled()).await;
            if settled.is_err() || holds.len() > 0 {
                log::warn!(
                    "sqlnotify: consumer {name:?} stopped with {} events unacknowledged; \
                     they will be delivered again",
                    holds.len()
                );
                return Ok(());
            }
            let saving =
                tokio::time::timeout(FINAL_SAVE_WITHIN, final_save(name.clone(), position));
            saving.await.unwrap_or_else(|_| {
                Err(Error::Database {
                    context: format!("saving consumer {name:?}'s position on stop"),
                    source: format!(
                        "no answer within {FINAL_SAVE_WITHIN:?}: the position saved last stands, \
                         and what was delivered after it comes again after a restart"
                    )
                    .into(),
                })
            })
        })
    }
}

/// Starts a supervised listener over `source`; resolves once it is connected and its position
/// placed (or with the first connection's error).
pub(crate) async fn start<S: Source>(
    source: S,
    params: ListenParams,
) -> Result<Box<dyn ListenerHandle>> {
    let (stop, stop_rx) = watch::channel(false);
    let budget = (params.budget, params.weight);
    let outlet = Outlet::new(params.decoder, budget, params.stats.clone(), stop_rx);
    let latest = Arc::new(Mutex::new(None));
    let final_save = source.final_save();
    let consumer = params.consumer.as_ref().map(|c| c.name.clone());
    let stats = params.stats.clone();
    let shell = Arc::new(Shell {
        consumer: params.consumer,
        status: params.status,
        outlet,
        stats: params.stats,
        health_check: params.health_check,
        latest: latest.clone(),
    });
    let (ready, is_ready) = oneshot::channel();
    let state = State {
        source,
        saving: Saving::default(),
        placed: false,
        was_connected: false,
        held_lease: false,
    };
    let addr = Supervisor::start(move |_| Listener {
        shell,
        state: Some(state),
        stop,
        ready: Some(ready),
        backoff: Backoff::default(),
        attempt: 0,
        waiters: Vec::new(),
        shutting_down: false,
        lost: false,
    });
    match is_ready.await {
        Ok(Ok(())) => Ok(Box::new(Handle::<S> {
            addr,
            consumer,
            latest,
            final_save,
            stats,
        })),
        Ok(Err(e)) => {
            let _ = addr.send(Shutdown).await;
            Err(e)
        }
        // The first session ended without a word: it panicked, and says why here.
        Err(_) => Err(stats.failure().unwrap_or(Error::NotRunning)),
    }
}

#[cfg(test)]
mod tests {
    //! The shell's lifecycle over an in-memory journal: the dialects' own tests run the same
    //! shell against real databases; these pin its rules without one.

    use std::sync::atomic::Ordering;
    use std::time::{Duration, SystemTime};

    use tokio::sync::{mpsc, Notify, Semaphore};

    use super::*;
    use crate::decoder::RawBatch;
    use crate::event::RawNotification;

    /// An in-memory journal: rows by id, and faults to inject.
    #[derive(Default)]
    struct Journal {
        rows: Vec<String>,
        /// The next wait of this listener fails (its connection is lost, and with it the
        /// lease it held).
        fail: Option<usize>,
        /// The listener holding the consumer's lease.
        holder: Option<usize>,
        /// A listener that cannot connect.
        down: Option<usize>,
        /// Positions saved by a running consumer, in order.
        saves: Vec<i64>,
        /// Connections opened.
        connects: u32,
        /// The next read of any listener panics (a driver's panic on a reply it did not
        /// expect).
        panic: bool,
        /// The next look at the position panics: a panic in the shell's own code, outside
        /// the source's guarded calls.
        panic_position: bool,
        /// Every read fails: sessions connect, then fail at once.
        broken: bool,
        /// A stream that fails on its first message: reads find nothing, waits fail, and the
        /// source counts nothing it went through as proof ([`Source::proved`]).
        poisoned: bool,
    }

    #[derive(Clone, Default)]
    struct Shared {
        journal: Arc<Mutex<Journal>>,
        wake: Arc<Notify>,
    }

    impl Shared {
        fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
            self.journal.lock().unwrap()
        }

        fn write(&self, payload: &str) {
            self.lock().rows.push(payload.to_string());
            self.wake.notify_one();
        }

        fn fail(&self, listener: usize) {
            self.lock().fail = Some(listener);
            self.wake.notify_waiters();
        }
    }

    struct MemorySource {
        id: usize,
        shared: Shared,
        position: Option<i64>,
    }

    impl Source for MemorySource {
        type Conn = ();
        type Position = i64;
        const NAME: &'static str = "memory";

        async fn connect(&mut self, _: &Outlet) -> Result<()> {
            let mut journal = self.shared.lock();
            if journal.down == Some(self.id) {
                return Err(Error::NotRunning);
            }
            journal.connects += 1;
            Ok(())
        }

        async fn lease(&mut self, _: &mut (), _: &ConsumerParams) -> Result<bool> {
            let mut journal = self.shared.lock();
            if journal.holder.is_none() {
                journal.holder = Some(self.id);
            }
            Ok(journal.holder == Some(self.id))
        }

        async fn place(&mut self, _: &mut (), _: Option<&ConsumerParams>) -> Result<Vec<String>> {
            self.position = Some(self.shared.lock().rows.len() as i64);
            Ok(Vec::new())
        }

        async fn read(&mut self, _: &mut (), outlet: &Outlet) -> Result<Option<u64>> {
            let from = self.position.expect("placed") as usize;
            if self.shared.lock().broken {
                return Err(Error::NotRunning);
            }
            if self.shared.lock().poisoned {
                return Ok(Some(0));
            }
            if std::mem::take(&mut self.shared.lock().panic) {
                panic!("a row the driver cannot convert");
            }
            let rows: Vec<String> = self.shared.lock().rows[from..].to_vec();
            let batch = rows
                .iter()
                .enumerate()
                .map(|(i, payload)| RawNotification {
                    channel: "c".into(),
                    payload: payload.clone(),
                    received_at: SystemTime::now(),
                    sequence: Some((from + i + 1) as i64),
                    events: 1,
                    transaction: None,
                    last_in_transaction: None,
                    read_point: None,
                    decoded: None,
                    part: 0,
                    read_bytes: 0,
                    extra_units: 0,
                })
                .collect();
            let Some(n) = outlet.forward(batch).await else {
                return Ok(None);
            };
            self.position = Some((from + rows.len()) as i64);
            Ok(Some(n))
        }

        fn position(&self) -> Option<i64> {
            if std::mem::take(&mut self.shared.lock().panic_position) {
                panic!("a bug in the shell");
            }
            self.position
        }

        async fn wait(&mut self, _: &mut (), timeout: Duration) -> Result<bool> {
            let woken = tokio::time::timeout(timeout, self.shared.wake.notified())
                .await
                .is_ok();
            let mut journal = self.shared.lock();
            if journal.poisoned {
                return Err(Error::NotRunning);
            }
            if journal.fail == Some(self.id) {
                journal.fail = None;
                if journal.holder == Some(self.id) {
                    journal.holder = None;
                }
                return Err(Error::NotRunning);
            }
            Ok(woken)
        }

        fn proved(&self, _: &()) -> bool {
            !self.shared.lock().poisoned
        }

        async fn check(&mut self, _: &mut (), _: Duration) -> Result<()> {
            Ok(())
        }

        async fn save(
            &mut self,
            _: &mut (),
            _: &ConsumerParams,
            position: &i64,
        ) -> Result<Vec<String>> {
            self.shared.lock().saves.push(*position);
            Ok(Vec::new())
        }

        fn final_save(&self) -> FinalSave<i64> {
            let shared = self.shared.clone();
            Box::new(move |_, position| {
                shared.lock().saves.push(-position);
                Box::pin(async { Ok(()) })
            })
        }

        async fn close(&mut self, _: ()) {}

        fn pace(&self) -> Pace {
            Pace {
                active: Duration::from_millis(1),
                idle: Duration::from_millis(20),
                stay_active: Duration::ZERO,
            }
        }
    }

    /// Collects what the listener hands over; gives the budget back and settles each batch
    /// unless `hold` is set.
    struct Sink {
        batches: mpsc::UnboundedSender<Vec<String>>,
        statuses: mpsc::UnboundedSender<Status>,
        budget: Arc<Semaphore>,
        stats: Arc<Counters>,
        hold: bool,
    }

    impl Actor for Sink {
        type Context = Context<Self>;
    }

    impl Handler<RawBatch> for Sink {
        type Result = ();
        fn handle(&mut self, RawBatch(batch): RawBatch, _: &mut Context<Self>) {
            if !self.hold {
                self.budget.add_permits(batch.len());
                self.stats.settle(batch.len() as u64);
            }
            let _ = self
                .batches
                .send(batch.into_iter().map(|raw| raw.payload).collect());
        }
    }

    impl Handler<StatusEvent> for Sink {
        type Result = ();
        fn handle(&mut self, event: StatusEvent, _: &mut Context<Self>) {
            let _ = self.statuses.send(event.status);
        }
    }

    struct Rig {
        shared: Shared,
        stats: Arc<Counters>,
        batches: mpsc::UnboundedReceiver<Vec<String>>,
        statuses: mpsc::UnboundedReceiver<Status>,
        handle: Box<dyn ListenerHandle>,
    }

    const WITHIN: Duration = Duration::from_secs(5);

    impl Rig {
        async fn start(consumer: bool, budget: usize, hold: bool) -> Rig {
            Rig::join(Shared::default(), 0, consumer, budget, hold).await
        }

        /// Another listener on the same journal.
        async fn join(shared: Shared, id: usize, consumer: bool, budget: usize, hold: bool) -> Rig {
            let stats = Arc::new(Counters::default());
            let budget = Arc::new(Semaphore::new(budget));
            let (batches_tx, batches) = mpsc::unbounded_channel();
            let (statuses_tx, statuses) = mpsc::unbounded_channel();
            let sink = Sink {
                batches: batches_tx,
                statuses: statuses_tx,
                budget: budget.clone(),
                stats: stats.clone(),
                hold,
            }
            .start();
            let params = ListenParams {
                channels: Vec::new(),
                consumer: consumer.then(|| ConsumerParams {
                    name: "app".into(),
                    expire_after: None,
                }),
                decoder: sink.clone().recipient(),
                stats: stats.clone(),
                status: sink.recipient(),
                budget,
                weight: crate::pipeline::Weight::new(1, 1 << 30),
                health_check: Duration::from_secs(10),
            };
            let source = MemorySource {
                id,
                shared: shared.clone(),
                position: None,
            };
            let handle = start(source, params).await.unwrap();
            Rig {
                shared,
                stats,
                batches,
                statuses,
                handle,
            }
        }

        async fn batch(&mut self) -> Vec<String> {
            tokio::time::timeout(WITHIN, self.batches.recv())
                .await
                .expect("a batch in time")
                .unwrap()
        }

        async fn status(&mut self) -> Status {
            tokio::time::timeout(WITHIN, self.statuses.recv())
                .await
                .expect("a status in time")
                .unwrap()
        }
    }

    #[actix_rt::test]
    async fn a_failed_session_is_announced_restarted_and_resumes_where_it_stopped() {
        let mut rig = Rig::start(false, 100, false).await;
        assert_eq!(rig.status().await, Status::Connected);
        rig.shared.write("a");
        assert_eq!(rig.batch().await, ["a"]);
        // Rows written while disconnected are read after the restart, and counted.
        rig.shared
            .lock()
            .rows
            .extend(["b".to_string(), "c".to_string()]);
        rig.shared.fail(0);
        assert!(matches!(rig.status().await, Status::Disconnected { .. }));
        assert_eq!(rig.status().await, Status::Connected);
        assert_eq!(rig.status().await, Status::Resynced { replayed: 2 });
        assert_eq!(rig.batch().await, ["b", "c"]);
        assert_eq!(rig.stats.restarts.load(Ordering::Relaxed), 1);
        assert_eq!(rig.shared.lock().connects, 2);
        rig.handle.shutdown().await;
        rig.handle.finish(true).await.unwrap();
    }

    #[actix_rt::test]
    async fn sessions_that_connect_then_fail_at_once_are_retried_ever_more_slowly() {
        let mut rig = Rig::start(false, 100, false).await;
        assert_eq!(rig.status().await, Status::Connected);
        rig.shared.lock().broken = true;
        rig.shared.write("a");
        // Every session connects, then its first read fails: the delays before the restarts
        // after the first five failures are at least 50, 100, 200, 400 and 800 ms (half of
        // each ceiling: jitter), where resetting on each connection kept them at 50–100 ms.
        let mut failures = Vec::new();
        while failures.len() < 6 {
            match rig.status().await {
                Status::Disconnected { .. } => failures.push(std::time::Instant::now()),
                Status::Connected => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let took = failures[5] - failures[0];
        assert!(took >= Duration::from_millis(1_550), "{took:?}");
        assert!(rig.shared.lock().connects >= 6, "each session connected");
        // A session that reads again proves healthy: the next failure is retried at once.
        rig.shared.lock().broken = false;
        assert_eq!(rig.batch().await, ["a"]);
        rig.shared.fail(0);
        let failed = loop {
            if let Status::Disconnected { .. } = rig.status().await {
                break std::time::Instant::now();
            }
        };
        while rig.status().await != Status::Connected {}
        // (At most 100 ms after a reset; without one, the seventh restart would wait at least
        // 3.2 s: a bound between them that a loaded machine does not cross.)
        let back = failed.elapsed();
        assert!(back < Duration::from_millis(2_000), "{back:?}");
        rig.handle.shutdown().await;
        rig.handle.finish(true).await.unwrap();
    }

    #[actix_rt::test]
    async fn sessions_whose_stream_fails_before_proving_anything_are_retried_ever_more_slowly() {
        let mut rig = Rig::start(false, 100, false).await;
        assert_eq!(rig.status().await, Status::Connected);
        rig.shared.write("a");
        assert_eq!(rig.batch().await, ["a"]);
        // Every session now connects and reads without error — nothing — and its stream then
        // fails: its source counts none of it as proof, so the delays before the restarts
        // after the first five failures are at least 50, 100, 200, 400 and 800 ms, where a
        // read without error kept them at 50–100 ms.
        rig.shared.lock().poisoned = true;
        let mut failures = Vec::new();
        while failures.len() < 6 {
            match rig.status().await {
                Status::Disconnected { .. } => failures.push(std::time::Instant::now()),
                Status::Connected | Status::Resynced { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let took = failures[5] - failures[0];
        assert!(took >= Duration::from_millis(1_550), "{took:?}");
        // Once the stream works again, its events arrive.
        rig.shared.lock().poisoned = false;
        rig.shared.write("b");
        assert_eq!(rig.batch().await, ["b"]);
        rig.handle.shutdown().await;
        rig.handle.finish(true).await.unwrap();
    }

    #[actix_rt::test]
    async fn a_panic_while_reading_is_a_failed_session_not_a_silent_stop() {
        let mut rig = Rig::start(false, 100, false).await;
        assert_eq!(rig.status().await, Status::Connected);
        rig.shared.write("a");
        assert_eq!(rig.batch().await, ["a"]);
        // The read of "b" panics: announced with the panic's message, then restarted.
        rig.shared.lock().panic = true;
        rig.shared.write("b");
        match rig.status().await {
            Status::Disconnected { error } => assert!(
                error.contains("the memory listener, reading")
                    && error.contains("panicked: a row the driver cannot convert"),
                "{error}"
            ),
            other => panic!("expected Disconnected, got {other:?}"),
        }
        assert_eq!(rig.status().await, Status::Connected);
        // Nothing was lost: the next session reads "b" from where the last one stood.
        assert_eq!(rig.status().await, Status::Resynced { replayed: 1 });
        assert_eq!(rig.batch().await, ["b"]);
        assert_eq!(rig.stats.restarts.load(Ordering::Relaxed), 1);
        rig.shared.write("c");
        assert_eq!(rig.batch().await, ["c"]);
        rig.handle.shutdown().await;
        rig.handle.finish(true).await.unwrap();
    }

    #[actix_rt::test]
    async fn a_panic_outside_the_sources_calls_stops_the_listener_and_says_so() {
        let mut rig = Rig::start(true, 100, false).await;
        rig.stats.has_subscriber.store(true, Ordering::Release);
        assert_eq!(rig.status().await, Status::Connected);
        assert_eq!(rig.status().await, Status::Active);
        rig.shared.lock().panic_position = true;
        rig.shared.write("a");
        match rig.status().await {
            Status::Failed { error } => assert!(
                error.contains("the memory listener's session")
                    && error.contains("panicked: a bug in the shell"),
                "{error}"
            ),
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(rig.stats.failure().is_some());
        rig.handle.shutdown().await;
        let e = rig.handle.finish(true).await.unwrap_err();
        assert!(e.to_string().contains("a bug in the shell"), "{e}");
    }

    #[actix_rt::test]
    async fn a_consumer_reads_nothing_before_its_first_subscription_and_saves_settled_positions() {
        let mut rig = Rig::start(true, 100, false).await;
        rig.shared.write("a");
        rig.shared.write("b");
        // No subscriber yet: the gate holds the read.
        assert_eq!(rig.status().await, Status::Connected);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), rig.batches.recv())
                .await
                .is_err(),
            "read before the first subscription"
        );
        rig.stats.has_subscriber.store(true, Ordering::Release);
        assert_eq!(rig.batch().await, ["a", "b"]);
        // Settled by the sink: the position after both rows is saved within a save interval.
        let deadline = std::time::Instant::now() + WITHIN;
        while !rig.shared.lock().saves.contains(&2) {
            assert!(
                std::time::Instant::now() < deadline,
                "position 2 never saved"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rig.handle.shutdown().await;
        rig.handle.finish(true).await.unwrap();
        assert_eq!(rig.shared.lock().saves.last(), Some(&-2), "the final save");
    }

    #[actix_rt::test]
    async fn a_stop_that_could_not_hand_everything_over_saves_nothing_more() {
        let mut rig = Rig::start(true, 100, false).await;
        rig.stats.has_subscriber.store(true, Ordering::Release);
        assert_eq!(rig.status().await, Status::Connected);
        rig.shared.write("a");
        assert_eq!(rig.batch().await, ["a"]);
        let saves = rig.shared.lock().saves.clone();
        rig.handle.shutdown().await;
        rig.handle.finish(false).await.unwrap();
        assert_eq!(rig.shared.lock().saves, saves, "no final save");
    }

    #[actix_rt::test]
    async fn an_unsettled_position_is_never_saved_and_stop_cuts_a_wait_for_room_short() {
        // A budget of one event, never given back: the second row waits for room.
        let mut rig = Rig::start(true, 1, true).await;
        rig.stats.has_subscriber.store(true, Ordering::Release);
        rig.shared.write("a");
        assert_eq!(rig.batch().await, ["a"]);
        rig.shared.write("b");
        tokio::time::timeout(WITHIN, rig.handle.shutdown())
            .await
            .expect("stop while the pipeline is full");
        assert!(
            rig.batches.try_recv().is_err(),
            "nothing handed over without room"
        );
        assert!(
            rig.shared.lock().saves.iter().all(|p| *p <= 0),
            "saved a position whose events never settled: {:?}",
            rig.shared.lock().saves
        );
    }

    #[actix_rt::test]
    async fn one_process_of_a_group_is_active_and_a_standby_takes_over_when_it_dies() {
        let mut a = Rig::start(true, 100, false).await;
        a.stats.has_subscriber.store(true, Ordering::Release);
        assert_eq!(a.status().await, Status::Connected);
        assert_eq!(a.status().await, Status::Active);
        assert_eq!(a.stats.snapshot().role, crate::Role::Active);
        let mut b = Rig::join(a.shared.clone(), 1, true, 100, false).await;
        b.stats.has_subscriber.store(true, Ordering::Release);
        assert_eq!(b.status().await, Status::Connected);
        assert_eq!(b.status().await, Status::Standby);
        assert_eq!(b.stats.snapshot().role, crate::Role::Standby);
        a.shared.write("x");
        assert_eq!(a.batch().await, ["x"]);
        // The active one loses its connection, and with it the lease: the standby takes over
        // and reads what was not saved as read; the old holder comes back as a standby.
        a.shared.lock().down = Some(0);
        a.shared.fail(0);
        assert!(matches!(a.status().await, Status::Disconnected { .. }));
        assert_eq!(b.status().await, Status::Active);
        a.shared.lock().down = None;
        let mut status = a.status().await;
        while matches!(status, Status::Disconnected { .. }) {
            status = a.status().await; // reconnect attempts while it was down
        }
        assert_eq!(status, Status::Connected);
        assert_eq!(a.status().await, Status::LostLease);
        assert_eq!(a.status().await, Status::Standby);
        a.shared.write("y");
        assert!(b.batch().await.ends_with(&["y".to_string()]));
        assert!(a.batches.try_recv().is_err(), "a standby delivered");
        for rig in [&mut a, &mut b] {
            rig.handle.shutdown().await;
        }
    }
}
