//! The one supervised listener: the lifecycle every dialect shares, around a [`Source`] that
//! supplies only a dialect's I/O (connect, place the position, read, wait, check, save).
//!
//! A listener is an actix actor under a [`Supervisor`]. Each generation runs one *session* —
//! connect, place the position on the first connection, then read / save / check / wait until
//! stopped or failed (see `session.rs`). A failed session is announced as
//! [`Status::Disconnected`]; the supervisor restarts the actor, which starts the next session
//! after a jittered [`Backoff`]. The first session reports readiness (or its failure) to
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

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::BoxFuture;
use tokio::sync::{oneshot, watch};

pub(crate) use self::outlet::Outlet;
use self::saving::Saving;
use self::session::{Outcome, Session};
use crate::backoff::Backoff;
use crate::consumer::ConsumerParams;
use crate::dialect::{ListenParams, ListenerHandle};
use crate::error::{Error, Result};
use crate::stats::Counters;
use crate::status::{Status, StatusEvent};

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

    /// Places the position, on the first connection only: at a named consumer's saved
    /// position — registering a new consumer at "now" — else at "now". Returns the channels on
    /// which a returning consumer missed purged rows.
    async fn place(
        &mut self,
        conn: &mut Self::Conn,
        consumer: Option<&ConsumerParams>,
    ) -> Result<Vec<String>>;

    /// Whether there is a journal to read (false: PostgreSQL's notify tier alone).
    fn reads(&self) -> bool {
        true
    }

    /// Reads every row past the position and hands it to `outlet`. Returns how many events
    /// went, or `None` when told to stop while waiting for room in the pipeline.
    async fn read(&mut self, conn: &mut Self::Conn, outlet: &Outlet) -> Result<Option<u64>>;

    /// The position after everything read so far; `None` before it is placed.
    fn position(&self) -> Option<Self::Position>;

    /// Waits at most `timeout` for a sign that rows may have arrived; returns whether one
    /// came (a wake-up, a changed data version). Fails when the connection is lost.
    async fn wait(&mut self, conn: &mut Self::Conn, timeout: Duration) -> Result<bool>;

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
}

/// The supervised actor.
pub(crate) struct Listener<S: Source> {
    shell: Arc<Shell<S::Position>>,
    /// `None` while a session runs (it holds the state).
    state: Option<State<S>>,
    stop: watch::Sender<bool>,
    ready: Option<oneshot::Sender<Result<()>>>,
    backoff: Backoff,
    /// Consecutive restarts without a successful connection.
    attempt: u32,
    /// Resolved when the running session ends (Shutdown waits for them).
    waiters: Vec<oneshot::Sender<()>>,
    shutting_down: bool,
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
        ctx.spawn(
            session
                .run(state)
                .into_actor(self)
                .map(|(state, outcome), act, ctx| act.ended(state, outcome, ctx)),
        );
    }

    fn ended(&mut self, state: State<S>, outcome: Outcome, ctx: &mut Context<Self>) {
        if outcome.connected {
            self.attempt = 0;
        }
        self.state = Some(state);
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(());
        }
        match outcome.failure {
            Some(error) if !self.shutting_down => {
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
        if self.state.is_some() {
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
}

impl<S: Source> ListenerHandle for Handle<S> {
    fn shutdown(&mut self) -> BoxFuture<'static, ()> {
        let addr = self.addr.clone();
        Box::pin(async move {
            let _ = addr.send(Shutdown).await;
        })
    }

    /// The pipeline is flushed: everything read has left it, so a named consumer saves the
    /// newest position. Dropping the last address then lets the idle actor stop.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match (self.consumer, latest) {
            (Some(name), Some(position)) => (self.final_save)(name, position),
            _ => Box::pin(async { Ok(()) }),
        }
    }
}

/// Starts a supervised listener over `source`; resolves once it is connected and its position
/// placed (or with the first connection's error).
pub(crate) async fn start<S: Source>(
    source: S,
    params: ListenParams,
) -> Result<Box<dyn ListenerHandle>> {
    let (stop, stop_rx) = watch::channel(false);
    let outlet = Outlet::new(params.decoder, params.budget, params.stats.clone(), stop_rx);
    let latest = Arc::new(Mutex::new(None));
    let final_save = source.final_save();
    let consumer = params.consumer.as_ref().map(|c| c.name.clone());
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
    });
    match is_ready.await {
        Ok(Ok(())) => Ok(Box::new(Handle::<S> {
            addr,
            consumer,
            latest,
            final_save,
        })),
        Ok(Err(e)) => {
            let _ = addr.send(Shutdown).await;
            Err(e)
        }
        Err(_) => Err(Error::NotRunning),
    }
}
