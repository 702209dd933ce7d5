//! The PostgreSQL listener actor: one dedicated connection, LISTENing on every watched channel.
//!
//! tokio-postgres only surfaces notifications to whoever drives `Connection::poll_message`
//! (the plain `Connection` future drops them), so a reader task owns the connection, collects
//! every notification that is ready into one [`RawBatch`] and hands it to the decoder — after
//! taking one unit of the in-flight budget per notification, so a pipeline that cannot keep
//! up stops the reading (PostgreSQL then holds notifications in its own queue) instead of
//! growing memory.
//!
//! The actor owns the client and the lifecycle: it connects and LISTENs in `started()`,
//! reports readiness once LISTEN is in effect, checks the connection with a query every
//! health-check interval (TCP keepalive alone can take hours to notice a dead peer), and stops
//! when the connection is lost — its [`Supervisor`](actix::Supervisor) then restarts it after
//! a jittered backoff. NOTIFY is fire-and-forget: whatever was committed while disconnected is
//! gone, so a reconnect is announced to status subscribers as a [`Status::Gap`] on the notify
//! channels.
//!
//! Journal tiers (see `journal.rs`): durable channels are LISTENed to as well, but their
//! (empty) notifications only wake a journal read; poll channels are read on an adaptive
//! timer. After a reconnect the journal is read right after LISTEN, and the catch-up is
//! announced as [`Status::Resynced`]. A named consumer registers when it first connects (a
//! consumer that was dropped or expired and missed purged rows announces [`Status::Gap`] then),
//! reads nothing until its first subscription exists, and saves its horizon once everything
//! read up to it has left the pipeline.

use std::collections::{HashSet, VecDeque};
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use actix::WeakAddr;
use futures_util::future::BoxFuture;
use tokio::sync::{oneshot, Semaphore};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Client, Config, Connection, NoTls, Socket};

use super::consumers;
use super::control::Control;
use super::journal::{self, JournalCursor, Position};
use super::signing::{Refused, Verifier};
use crate::backoff::Backoff;
use crate::consumer::{report_gap, ConsumerParams};
use crate::decoder::RawBatch;
use crate::dialect::{ListenParams, ListenerHandle};
use crate::error::{Error, Result};
use crate::event::RawNotification;
use crate::sql::quote_ident;
use crate::stats::Counters;
use crate::status::{Status, StatusEvent};
use crate::tier::Tier;

/// Most notifications handed to the decoder in one message (bounds latency and batch memory).
const MAX_BATCH: usize = 512;
/// tokio-postgres' default keepalive idle time; replaced by the health-check interval unless
/// the URL set its own.
const DRIVER_DEFAULT_KEEPALIVE_IDLE: Duration = Duration::from_secs(2 * 60 * 60);
/// Fastest poll-tier interval (while rows keep coming).
const POLL_MIN: Duration = Duration::from_millis(1);
/// Slowest poll-tier interval (when idle).
const POLL_MAX: Duration = Duration::from_millis(25);
/// How often a named consumer's horizon may be saved while events flow.
const SAVE_EVERY: Duration = Duration::from_millis(100);
/// How often a forged notification is logged at most (each one is counted).
const FORGERY_LOG_EVERY: Duration = Duration::from_secs(60);

/// A live connection: the client (shared with health checks and journal reads) and its
/// reader task.
struct Live {
    client: Arc<Client>,
    reader: tokio::task::JoinHandle<()>,
}

/// Journal-tier state; survives reconnects (a supervised actor keeps its value on restart).
struct Journal {
    channels: Vec<String>,
    /// Shared with the running read, if any (locked while it runs). A read abandoned on a
    /// lost connection leaves the cursor consistent: only rows handed over count as seen.
    cursor: Arc<tokio::sync::Mutex<JournalCursor>>,
    /// A wake-up arrived during a read: read again when it finishes.
    dirty: bool,
    /// A read was held back: a named consumer reads nothing before its first subscription.
    held: bool,
    poll: bool,
    poll_interval: Duration,
    /// (notifications forwarded when a read ended, position after it), oldest first.
    unsaved: VecDeque<(u64, Position)>,
    /// The newest position whose events have all left the pipeline, not saved yet.
    pending: Option<Position>,
    /// Last saved position and when.
    saved: Option<(Position, Instant)>,
    /// The newest position, for the final save after stop.
    latest: Arc<Mutex<Option<Position>>>,
}

pub(crate) struct PgListener {
    config: Config,
    params: ListenParams,
    /// Channels to LISTEN on: notify and durable tiers.
    listen: Vec<String>,
    /// Durable channels, whose notifications only wake a journal read.
    wake: Arc<HashSet<String>>,
    /// Signed notify-tier channels, and the key their payloads are verified with.
    signed: Arc<HashSet<String>>,
    verifier: Option<Arc<Verifier>>,
    /// Notify-tier channels (a reconnect may have lost their events).
    notify: Vec<String>,
    journal: Option<Journal>,
    backoff: Backoff,
    /// Consecutive restarts without a successful LISTEN.
    attempt: u32,
    ready: Option<oneshot::Sender<Result<()>>>,
    live: Option<Live>,
    /// Bumped per connection, so a stale reader's "connection lost" is ignored.
    generation: u64,
    /// Has been connected before: a new connection means notifications may have been missed.
    was_connected: bool,
    shutting_down: bool,
}

impl PgListener {
    fn status(&self, status: Status) {
        self.params.status.do_send(StatusEvent::now(status));
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        self.generation += 1;
        let config = self.config.clone();
        let reader = Reader {
            decoder: self.params.decoder.clone(),
            budget: self.params.budget.clone(),
            stats: self.params.stats.clone(),
            wake: self.wake.clone(),
            signed: self.signed.clone(),
            verifier: self.verifier.clone(),
            listener: ctx.address().downgrade(),
            generation: self.generation,
        };
        let listen: String = self
            .listen
            .iter()
            .map(|c| format!("LISTEN {};", quote_ident(c)))
            .collect();
        // A journal cursor not placed yet starts at a consumer's saved horizon, else at "now".
        let place = self
            .journal
            .as_ref()
            .map(|j| (j.cursor.clone(), j.channels.clone()));
        let placer = Placer {
            consumer: self.params.consumer.clone(),
            channels: self
                .journal
                .as_ref()
                .map(|j| j.channels.clone())
                .unwrap_or_default(),
            decoder: self.params.decoder.clone(),
            budget: self.params.budget.clone(),
            stats: self.params.stats.clone(),
        };
        let connecting = async move {
            let (client, connection) = config
                .connect(NoTls)
                .await
                .map_err(|e| Error::db("connecting the listener to PostgreSQL", e))?;
            let reader = tokio::task::spawn_local(reader.run(connection));
            let prepared = async {
                if !listen.is_empty() {
                    client
                        .batch_execute(&listen)
                        .await
                        .map_err(|e| Error::db("LISTENing on the watched channels", e))?;
                }
                // LISTEN first, then place the cursor: nothing committed in between is missed.
                if let Some((cursor, channels)) = place {
                    let mut cursor = cursor.lock().await;
                    let mut missed = Vec::new();
                    if cursor.horizon.is_none() {
                        missed = placer.place(&client, &mut cursor, &channels).await?;
                    }
                    return Ok((cursor.position(), missed));
                }
                Ok((None, Vec::new()))
            }
            .await;
            match prepared {
                Ok(placed) => Ok((
                    Live {
                        client: Arc::new(client),
                        reader,
                    },
                    placed,
                )),
                Err(e) => {
                    reader.abort();
                    Err(e)
                }
            }
        };
        ctx.wait(
            connecting
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok((live, (placed, missed))) => {
                        log::info!(
                            "sqlnotify: listening on {} channels",
                            act.params.channels.len()
                        );
                        act.live = Some(live);
                        act.attempt = 0;
                        if let (Some(journal), Some(position)) = (act.journal.as_mut(), placed) {
                            *journal.latest.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(position);
                        }
                        act.status(Status::Connected);
                        if let (false, Some(consumer)) = (missed.is_empty(), &act.params.consumer) {
                            report_gap(&consumer.name, &missed);
                            act.status(Status::Gap { channels: missed });
                        }
                        if act.was_connected && !act.notify.is_empty() {
                            act.status(Status::Gap {
                                channels: act.notify.clone(),
                            });
                        }
                        // Catch up with the journal: after a reconnect, everything missed meanwhile.
                        let resync = act.was_connected;
                        act.read_journal(ctx, resync);
                        act.was_connected = true;
                        if let Some(ready) = act.ready.take() {
                            let _ = ready.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        if let Some(ready) = act.ready.take() {
                            // The first connection failed: report it to start() instead of retrying.
                            act.shutting_down = true;
                            let _ = ready.send(Err(e));
                        } else {
                            log::warn!("sqlnotify: listener reconnect failed: {e}");
                        }
                        ctx.stop();
                    }
                }),
        );
    }

    /// Reads the journal past the cursor (coalescing wake-ups that arrive meanwhile).
    fn read_journal(&mut self, ctx: &mut Context<Self>, resync: bool) {
        let (Some(journal), Some(live)) = (self.journal.as_mut(), self.live.as_ref()) else {
            return;
        };
        if self.params.consumer.is_some()
            && !self.params.stats.has_subscriber.load(Ordering::Acquire)
        {
            // Rows read now would reach nobody, and the saved horizon would pass them.
            journal.held = true;
            return;
        }
        let Ok(mut cursor) = journal.cursor.clone().try_lock_owned() else {
            journal.dirty = true; // a read is running
            return;
        };
        let client = live.client.clone();
        let channels = journal.channels.clone();
        let (decoder, budget, stats) = (
            self.params.decoder.clone(),
            self.params.budget.clone(),
            self.params.stats.clone(),
        );
        let read = async move {
            let outcome = cursor
                .read(&client, &channels, true, &decoder, &budget, &stats)
                .await;
            (cursor.position(), outcome)
        };
        ctx.spawn(
            read.into_actor(self)
                .map(move |(position, outcome), act, ctx| {
                    act.journal_read(position, outcome, resync, ctx);
                }),
        );
    }

    fn journal_read(
        &mut self,
        position: Option<Position>,
        outcome: Result<journal::ReadOutcome>,
        resync: bool,
        ctx: &mut Context<Self>,
    ) {
        let forwarded = self.params.stats.forwarded.load(Ordering::Relaxed);
        let Some(journal) = self.journal.as_mut() else {
            return;
        };
        if let Some(position) = position {
            *journal.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(position.clone());
            journal.unsaved.push_back((forwarded, position));
        }
        let delivered = match outcome {
            Ok(outcome) => outcome.delivered,
            Err(e) => {
                // A lost connection is reported by the reader; anything else is retried later.
                log::warn!("sqlnotify: journal read failed: {e}");
                0
            }
        };
        let again = std::mem::take(&mut journal.dirty);
        let poll_after = journal.poll.then(|| {
            journal.poll_interval = if delivered > 0 {
                POLL_MIN
            } else {
                (journal.poll_interval * 2).min(POLL_MAX)
            };
            journal.poll_interval
        });
        if resync {
            self.status(Status::Resynced {
                replayed: delivered,
            });
        }
        if again {
            self.read_journal(ctx, false);
        } else if let Some(delay) = poll_after {
            ctx.run_later(delay, |act, ctx| act.read_journal(ctx, false));
        }
    }

    /// Saves a named consumer's horizon once everything read up to it has left the pipeline.
    fn save_horizon(&mut self, ctx: &mut Context<Self>) {
        let settled = self.params.stats.settled.load(Ordering::Relaxed);
        let (Some(consumer), Some(journal), Some(live)) = (
            self.params.consumer.clone(),
            self.journal.as_mut(),
            self.live.as_ref(),
        ) else {
            return;
        };
        let heartbeat = consumer.heartbeat();
        while journal
            .unsaved
            .front()
            .is_some_and(|(forwarded, _)| *forwarded <= settled)
        {
            journal.pending = journal.unsaved.pop_front().map(|(_, position)| position);
        }
        let Some(position) = journal
            .pending
            .clone()
            .or_else(|| journal.saved.as_ref().map(|(p, _)| p.clone()))
        else {
            return;
        };
        let due = match &journal.saved {
            None => true,
            Some((saved, at)) => {
                (position != *saved && at.elapsed() >= SAVE_EVERY) || at.elapsed() >= heartbeat
            }
        };
        if !due {
            return;
        }
        journal.pending = None;
        journal.saved = Some((position.clone(), Instant::now()));
        let (client, channels) = (live.client.clone(), journal.channels.clone());
        let status = self.params.status.clone();
        ctx.spawn(
            async move {
                match consumers::save_running(&client, &consumer, &channels, &position).await {
                    Ok(missed) if !missed.is_empty() => {
                        // Dropped or expired while running, and rows it had not read were
                        // purged meanwhile: registered again, and says so.
                        report_gap(&consumer.name, &missed);
                        status.do_send(StatusEvent::now(Status::Gap { channels: missed }));
                    }
                    Ok(_) => {}
                    Err(e) => log::warn!("sqlnotify: {e}"),
                }
            }
            .into_actor(self),
        );
    }

    /// A query that must answer within the interval; otherwise the connection is treated as
    /// dead even if the socket still looks open.
    fn health_check(&mut self, ctx: &mut Context<Self>) {
        let Some(live) = &self.live else { return };
        let (client, limit, generation) = (
            live.client.clone(),
            self.params.health_check,
            self.generation,
        );
        let check = async move {
            match tokio::time::timeout(limit, client.simple_query("")).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(describe(&e)),
                Err(_) => Err(format!("health check got no answer within {limit:?}")),
            }
        };
        ctx.spawn(check.into_actor(self).map(move |result, act, ctx| {
            if let Err(error) = result {
                if act.generation == generation && !act.shutting_down {
                    act.lost(error, ctx);
                }
            }
        }));
    }

    fn lost(&mut self, error: String, ctx: &mut Context<Self>) {
        log::warn!("sqlnotify: listener connection lost: {error}");
        if let Some(live) = self.live.take() {
            live.reader.abort();
        }
        self.status(Status::Disconnected { error });
        ctx.stop();
    }
}

/// Places a new journal cursor: at a named consumer's saved horizon, else at "now" (and
/// registers a new named consumer there).
struct Placer {
    consumer: Option<ConsumerParams>,
    channels: Vec<String>,
    decoder: Recipient<RawBatch>,
    budget: Arc<Semaphore>,
    stats: Arc<Counters>,
}

impl Placer {
    /// Returns the channels on which a returning consumer missed purged rows.
    async fn place(
        self,
        client: &Client,
        cursor: &mut JournalCursor,
        channels: &[String],
    ) -> Result<Vec<String>> {
        if let Some(consumer) = &self.consumer {
            consumers::ensure(client).await?;
            let registered = consumers::reactivate(client, consumer, &self.channels).await?;
            if let Some((position, missed)) = registered {
                log::debug!(
                    "sqlnotify: consumer {:?} resumes at horizon {}",
                    consumer.name,
                    position.horizon
                );
                let seen = position.seen.unwrap_or_default();
                let seen = journal::seen_xids(client, &seen).await?;
                *cursor = JournalCursor::resume(position.horizon, seen);
                return Ok(missed);
            }
        }
        // Mark what is already committed as seen, without delivering it.
        cursor
            .read(
                client,
                channels,
                false,
                &self.decoder,
                &self.budget,
                &self.stats,
            )
            .await?;
        if let (Some(consumer), Some(position)) = (&self.consumer, cursor.position()) {
            consumers::insert(client, consumer, &self.channels, &position).await?;
        }
        Ok(Vec::new())
    }
}

/// The reader task: owns the connection and forwards notifications in batches.
struct Reader {
    decoder: Recipient<RawBatch>,
    budget: Arc<Semaphore>,
    stats: Arc<Counters>,
    wake: Arc<HashSet<String>>,
    /// Signed channels and the key to verify them with.
    signed: Arc<HashSet<String>>,
    verifier: Option<Arc<Verifier>>,
    listener: WeakAddr<PgListener>,
    generation: u64,
}

impl Reader {
    /// The payload of a notification on `channel`, without its signature if the channel is
    /// signed; refused when that signature does not verify.
    fn open<'a>(&self, channel: &str, payload: &'a str) -> std::result::Result<&'a str, Refused> {
        match &self.verifier {
            Some(verifier) if self.signed.contains(channel) => verifier.open(channel, payload),
            _ => Ok(payload),
        }
    }

    async fn run(self, mut connection: Connection<Socket, NoTlsStream>) {
        let mut batch = Vec::new();
        // Forgeries are counted one by one but logged at most once a minute: whoever sends
        // them must not be able to flood the application's log.
        let mut forgery_logged: Option<Instant> = None;
        let outcome = loop {
            // Collect what is ready (at least one notification), or learn that the
            // connection ended.
            let mut wake = false;
            let ended = poll_fn(|cx| loop {
                match connection.poll_message(cx) {
                    Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                        if self.wake.contains(n.channel()) {
                            // A journal tier's wake-up: its payload is never read.
                            wake = true;
                            continue;
                        }
                        let payload = match self.open(n.channel(), n.payload()) {
                            Ok(payload) => payload,
                            Err(refused) => {
                                self.stats.forged.fetch_add(1, Ordering::Relaxed);
                                if forgery_logged.map_or(true, |at| at.elapsed() >= FORGERY_LOG_EVERY) {
                                    forgery_logged = Some(Instant::now());
                                    log::warn!(
                                        "sqlnotify: dropping a notification on {:?} that sqlnotify's trigger did not send: {refused} (counted in stats().forged; further ones are logged at most once a minute)",
                                        n.channel()
                                    );
                                }
                                continue;
                            }
                        };
                        batch.push(RawNotification {
                            channel: n.channel().to_owned(),
                            payload: payload.to_owned(),
                            received_at: SystemTime::now(),
                            sequence: None,
                            events: 1,
                        });
                        if batch.len() >= MAX_BATCH {
                            return Poll::Ready(None);
                        }
                    }
                    Poll::Ready(Some(Ok(AsyncMessage::Notice(notice)))) => {
                        log::debug!("sqlnotify: listener notice: {}", notice.message());
                    }
                    Poll::Ready(Some(Ok(_))) => {}
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Some(e))),
                    Poll::Ready(None) => return Poll::Ready(Some(None)),
                    Poll::Pending if batch.is_empty() && !wake => return Poll::Pending,
                    Poll::Pending => return Poll::Ready(None),
                }
            })
            .await;
            if wake {
                if let Some(listener) = self.listener.upgrade() {
                    listener.do_send(JournalWake);
                }
            }
            if !batch.is_empty() {
                // Wait for room in the pipeline; meanwhile nothing is read from the socket.
                match self.budget.acquire_many(batch.len() as u32).await {
                    Ok(permits) => permits.forget(),
                    Err(_) => break None,
                }
                self.stats
                    .forwarded
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                self.decoder.do_send(RawBatch(std::mem::take(&mut batch)));
            }
            if let Some(outcome) = ended {
                break outcome;
            }
        };
        if let Some(listener) = self.listener.upgrade() {
            listener.do_send(ConnectionLost {
                generation: self.generation,
                error: outcome.map(|e| describe(&e)),
            });
        }
    }
}

/// Why the connection failed, in the server's words when it sent any ("FATAL: terminating
/// connection due to administrator command"): tokio-postgres' own text is just "db error".
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => crate::error::chain(e),
    }
}

/// A durable channel was notified: read the journal.
struct JournalWake;

impl Message for JournalWake {
    type Result = ();
}

impl Handler<JournalWake> for PgListener {
    type Result = ();

    fn handle(&mut self, _: JournalWake, ctx: &mut Context<Self>) {
        self.read_journal(ctx, false);
    }
}

impl Actor for PgListener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.params.health_check, |act, ctx| {
            act.health_check(ctx);
            // A cheap safety net for durable channels: a read even without a wake-up.
            act.read_journal(ctx, false);
        });
        if self.params.consumer.is_some() && self.journal.is_some() {
            ctx.run_interval(SAVE_EVERY, |act, ctx| {
                let gate_opened = act.params.stats.has_subscriber.load(Ordering::Acquire);
                if let (Some(journal), true) = (act.journal.as_mut(), gate_opened) {
                    if std::mem::take(&mut journal.held) {
                        act.read_journal(ctx, false);
                    }
                }
                act.save_horizon(ctx);
            });
        }
        if self.attempt == 0 {
            self.connect(ctx);
        } else {
            let delay = self.backoff.delay(self.attempt);
            log::info!(
                "sqlnotify: reconnecting the listener in {delay:?} (attempt {})",
                self.attempt
            );
            ctx.run_later(delay, |act, ctx| act.connect(ctx));
        }
    }
}

impl Supervised for PgListener {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.live = None;
        if let Some(journal) = self.journal.as_mut() {
            // A read that was running went with the old context, releasing the cursor.
            journal.dirty = false;
        }
        if !self.shutting_down {
            self.attempt = self.attempt.saturating_add(1);
            Counters::add(&self.params.stats.restarts, 1);
        }
    }
}

/// The reader found the connection closed (error, server shutdown, terminated backend).
struct ConnectionLost {
    generation: u64,
    error: Option<String>,
}

impl Message for ConnectionLost {
    type Result = ();
}

impl Handler<ConnectionLost> for PgListener {
    type Result = ();

    fn handle(&mut self, msg: ConnectionLost, ctx: &mut Context<Self>) {
        if msg.generation != self.generation || self.shutting_down {
            return;
        }
        self.lost(
            msg.error.unwrap_or_else(|| "closed by the server".into()),
            ctx,
        );
    }
}

/// Stops listening for good; resolves after the reader has passed on what it read.
struct Shutdown;

impl Message for Shutdown {
    type Result = ();
}

impl Handler<Shutdown> for PgListener {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        let live = self.live.take();
        Box::pin(async move {
            if let Some(Live { client, reader }) = live {
                // Dropping the client makes the connection terminate cleanly; the reader then
                // passes on its last batch and ends.
                drop(client);
                let _ = reader.await;
            }
        })
    }
}

/// The notifier's handle on a running listener.
pub(crate) struct PgListenerHandle {
    addr: Addr<PgListener>,
    config: Config,
    consumer: Option<String>,
    latest: Option<Arc<Mutex<Option<Position>>>>,
}

impl ListenerHandle for PgListenerHandle {
    fn shutdown(&mut self) -> BoxFuture<'static, ()> {
        let addr = self.addr.clone();
        Box::pin(async move {
            let _ = addr.send(Shutdown).await;
        })
    }

    /// The pipeline is flushed: a named consumer saves the newest horizon. Dropping the last
    /// Addr then lets the idle actor stop without being restarted.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let position = self
            .latest
            .as_ref()
            .and_then(|l| l.lock().unwrap_or_else(|p| p.into_inner()).clone());
        let (Some(name), Some(position)) = (self.consumer.clone(), position) else {
            return Box::pin(async { Ok(()) });
        };
        let config = self.config.clone();
        Box::pin(async move {
            let client = Control::connect(&config, "consumer cursor").await?;
            consumers::save(&client, &name, &position).await.map(|_| ())
        })
    }
}

/// Starts a supervised listener and waits until it is LISTENing (or failed to).
pub(crate) async fn start(
    mut config: Config,
    params: ListenParams,
    verifier: Option<Verifier>,
) -> Result<Box<dyn ListenerHandle>> {
    let signed = Arc::new(params.signed.clone());
    let verifier = verifier.map(Arc::new);
    config.keepalives(true);
    if config.get_keepalives_idle() == DRIVER_DEFAULT_KEEPALIVE_IDLE {
        // The kernel takes whole seconds (and refuses 0).
        config.keepalives_idle(Duration::from_secs(params.health_check.as_secs().max(1)));
    }
    let by_tier = |tiers: &[Tier]| -> Vec<String> {
        params
            .channels
            .iter()
            .filter(|(_, t)| tiers.contains(t))
            .map(|(c, _)| c.clone())
            .collect()
    };
    let listen = by_tier(&[Tier::Notify, Tier::Durable]);
    let wake = Arc::new(by_tier(&[Tier::Durable]).into_iter().collect());
    let notify = by_tier(&[Tier::Notify]);
    let journal_channels = by_tier(&[Tier::Durable, Tier::Poll]);
    let journal = (!journal_channels.is_empty()).then(|| Journal {
        channels: journal_channels,
        cursor: Arc::new(tokio::sync::Mutex::new(JournalCursor::default())),
        dirty: false,
        held: false,
        poll: params.channels.iter().any(|(_, t)| *t == Tier::Poll),
        poll_interval: POLL_MIN,
        unsaved: VecDeque::new(),
        pending: None,
        saved: None,
        latest: Arc::new(Mutex::new(None)),
    });
    let consumer = params.consumer.as_ref().map(|c| c.name.clone());
    let handle_latest = journal.as_ref().map(|j| j.latest.clone());
    let handle = PgListenerHandle {
        addr: {
            let (ready, is_ready) = oneshot::channel();
            let config = config.clone();
            let addr = Supervisor::start(move |_| PgListener {
                config,
                params,
                listen,
                wake,
                signed,
                verifier,
                notify,
                journal,
                backoff: Backoff::default(),
                attempt: 0,
                ready: Some(ready),
                live: None,
                generation: 0,
                was_connected: false,
                shutting_down: false,
            });
            match is_ready.await {
                Ok(Ok(())) => addr,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::NotRunning),
            }
        },
        config,
        consumer,
        latest: handle_latest,
    };
    Ok(Box::new(handle))
}
