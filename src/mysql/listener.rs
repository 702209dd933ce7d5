//! The MySQL listener: a supervised actor that runs a watcher task polling the journal.
//!
//! MySQL has no LISTEN/NOTIFY. The watcher keeps a connection of its own (autocommit: every
//! poll is a transaction of its own and sees everything committed before it, no snapshot is
//! held — under REPEATABLE READ too; no isolation level is forced, because READ COMMITTED
//! would make the consumer's watermark saves fail on servers logging with
//! `binlog_format = STATEMENT`) and reads
//! the journal by cursor (see `journal.rs` for how late commits are caught) at an adaptive
//! interval: every millisecond while rows flow, backing off to 25 ms when idle. The
//! notifier's own writes (`notify()`) wake it at once. Every query must answer within the
//! health-check interval, else the connection counts as dead.
//!
//! Rows are handed to the decoder in batches, after taking one unit of the in-flight budget
//! per row: when the pipeline is full the cursor simply waits. A named consumer registers when
//! it is placed (one that was dropped or expired and missed purged rows announces
//! [`Status::Gap`]), reads nothing before its first subscription, saves its low watermark once
//! everything read up to it has left the pipeline, and refreshes its "alive" mark while idle.
//!
//! If the watcher fails (lost connection, failed query), the actor stops and its supervisor
//! restarts it after a jittered backoff; the new watcher resumes from the shared cursor and
//! announces the catch-up as [`Status::Resynced`].

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use actix::WeakAddr;
use futures_util::future::{select, BoxFuture, Either};
use mysql_async::prelude::*;
use mysql_async::{Conn, Opts};
use tokio::sync::{oneshot, watch, Notify, Semaphore};

use super::catalog::db_err;
use super::consumers;
use super::journal::{self, Cursor};
use crate::backoff::Backoff;
use crate::consumer::{report_gap, ConsumerParams};
use crate::decoder::RawBatch;
use crate::dialect::{ListenParams, ListenerHandle};
use crate::error::{Error, Result};
use crate::event::RawNotification;
use crate::stats::Counters;
use crate::status::{Status, StatusEvent};

/// Polling interval while rows flow.
const ACTIVE_INTERVAL: Duration = Duration::from_millis(1);
/// Polling interval once idle (the worst-case latency after a quiet period).
const IDLE_INTERVAL: Duration = Duration::from_millis(25);
/// How long after the last row the watcher stays at the active interval.
const STAY_ACTIVE: Duration = Duration::from_millis(500);
/// Rows read per query.
const READ_BATCH: usize = 1_000;
/// How often a named consumer saves its watermark while events flow.
const SAVE_EVERY: Duration = Duration::from_millis(100);
/// Shortest time a query may take before the connection counts as dead.
const MIN_QUERY_LIMIT: Duration = Duration::from_secs(2);

/// A named consumer's saving state; survives restarts.
#[derive(Default)]
struct Saving {
    /// (events forwarded when the watermark moved, the watermark), oldest first.
    unsaved: VecDeque<(u64, i64)>,
    /// Last saved watermark and when.
    saved: Option<(i64, Instant)>,
}

/// What every generation of the watcher shares.
#[derive(Clone)]
struct Shared {
    opts: Opts,
    database: Arc<str>,
    gap_timeout: Duration,
    query_limit: Duration,
    channels: Arc<HashSet<String>>,
    /// The same channels, sorted (what a named consumer registers).
    channel_list: Arc<Vec<String>>,
    consumer: Option<ConsumerParams>,
    decoder: Recipient<RawBatch>,
    status: Recipient<StatusEvent>,
    budget: Arc<Semaphore>,
    stats: Arc<Counters>,
    /// `None` until the first watcher has placed it.
    cursor: Arc<Mutex<Option<Cursor>>>,
    saving: Arc<Mutex<Saving>>,
    /// The newest low watermark (-1: none yet), for the final save.
    latest: Arc<AtomicI64>,
    wake: Arc<Notify>,
    stop: watch::Receiver<bool>,
}

impl Shared {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn cursor(&self) -> std::sync::MutexGuard<'_, Option<Cursor>> {
        self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn saving(&self) -> std::sync::MutexGuard<'_, Saving> {
        self.saving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a query future; fails if it takes longer than the health-check limit.
    async fn within<T>(&self, what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.query_limit, fut).await {
            Ok(result) => result,
            Err(_) => Err(Error::Database {
                context: what.to_string(),
                source: format!("no answer within {:?}", self.query_limit).into(),
            }),
        }
    }

    /// Waits for `interval`, a wake-up or stop. Returns true when told to stop.
    async fn pause(&self, interval: Duration) -> bool {
        let mut stop = self.stop.clone();
        let sleep = pin!(tokio::time::sleep(interval));
        let woken = pin!(self.wake.notified());
        let stopped = pin!(stop.wait_for(|s| *s));
        let stop_now = match select(sleep, select(woken, stopped)).await {
            Either::Left(_) => false,
            Either::Right((Either::Left(_), _)) => self.stopped(),
            Either::Right((Either::Right(_), _)) => true,
        };
        stop_now
    }
}

pub(crate) struct MysqlListener {
    shared: Shared,
    stop: watch::Sender<bool>,
    backoff: Backoff,
    attempt: u32,
    ready: Option<oneshot::Sender<Result<()>>>,
    task: Option<tokio::task::JoinHandle<()>>,
    generation: u64,
    was_connected: bool,
    shutting_down: bool,
}

impl MysqlListener {
    fn spawn(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        self.generation += 1;
        let (shared, generation) = (self.shared.clone(), self.generation);
        let me = ctx.address().downgrade();
        let ready = self.ready.take();
        let restarted = self.was_connected;
        self.task = Some(actix::spawn(async move {
            let outcome = watch_journal(&shared, ready, restarted, &me, generation).await;
            if let Err(e) = &outcome {
                let error = e.to_string();
                shared
                    .status
                    .do_send(StatusEvent::now(Status::Disconnected { error }));
            }
            if let Some(addr) = me.upgrade() {
                addr.do_send(TaskEnded {
                    generation,
                    error: outcome.err(),
                });
            }
        }));
    }
}

/// Connects the watcher's connection.
async fn connect(shared: &Shared) -> Result<Conn> {
    let mut conn = shared
        .within("connecting the listener to MySQL", async {
            Conn::new(shared.opts.clone())
                .await
                .map_err(db_err("connecting the listener to MySQL"))
        })
        .await?;
    shared
        .within("configuring the listener connection", async {
            // Autocommit, whatever `init_connect` set: a transaction left open would hold
            // one snapshot, and the polls would never see a new row.
            conn.query_drop("SET SESSION autocommit = 1")
                .await
                .map_err(db_err("configuring the listener connection"))
        })
        .await?;
    Ok(conn)
}

/// Places a new cursor: at a named consumer's saved watermark, else at "now" (rows already
/// committed are marked read; rows of transactions still running are delivered when they
/// commit). A new consumer saves the head right away, so a quick restart does not replay the
/// history it never saw (the price: a transaction still running at its very first start that
/// commits only after a restart is not delivered).
async fn place(conn: &mut Conn, shared: &Shared) -> Result<()> {
    if shared.cursor().is_some() {
        return Ok(());
    }
    let db = &*shared.database;
    let saved = match &shared.consumer {
        Some(consumer) => {
            consumers::ensure(conn, db).await?;
            consumers::reactivate(conn, db, consumer, &shared.channel_list).await?
        }
        None => None,
    };
    let now = Instant::now();
    let cursor = match saved {
        Some((low, missed)) => {
            log::debug!("sqlnotify: MySQL consumer resumes after journal id {low}");
            gap(shared, missed);
            shared.saving().saved = Some((low, now));
            Cursor::new(low, shared.gap_timeout)
        }
        None => {
            let (low, ids) = journal::placement(conn, db, shared.gap_timeout).await?;
            let head = ids.last().copied().unwrap_or(low);
            let mut cursor = Cursor::new(low, shared.gap_timeout);
            cursor.mark(ids, now);
            cursor.advance(now);
            if let Some(consumer) = &shared.consumer {
                consumers::insert(conn, db, consumer, &shared.channel_list, head).await?;
                shared.saving().saved = Some((head, now));
            }
            log::debug!("sqlnotify: MySQL listener starts after journal id {head}");
            cursor
        }
    };
    shared.latest.store(cursor.low(), Ordering::Release);
    *shared.cursor() = Some(cursor);
    Ok(())
}

/// The watcher's body. Reports readiness (or the first failure) through `ready`.
async fn watch_journal(
    shared: &Shared,
    mut ready: Option<oneshot::Sender<Result<()>>>,
    restarted: bool,
    me: &WeakAddr<MysqlListener>,
    generation: u64,
) -> Result<()> {
    let setup = async {
        let mut conn = connect(shared).await?;
        shared
            .within("placing the journal cursor", place(&mut conn, shared))
            .await?;
        Ok::<_, Error>(conn)
    }
    .await;
    let mut conn = match setup {
        Ok(conn) => conn,
        Err(e) => {
            if let Some(ready) = ready.take() {
                let _ = ready.send(Err(e));
                return Ok(());
            }
            return Err(e);
        }
    };
    if let Some(ready) = ready.take() {
        let _ = ready.send(Ok(()));
    }
    if let Some(addr) = me.upgrade() {
        addr.do_send(Up { generation });
    }
    if restarted {
        shared.status.do_send(StatusEvent::now(Status::Connected));
        let Some(replayed) = read_all(&mut conn, shared).await? else {
            let _ = conn.disconnect().await;
            return Ok(());
        };
        shared
            .status
            .do_send(StatusEvent::now(Status::Resynced { replayed }));
    }
    let mut last_row = Instant::now();
    let mut last_query = Instant::now();
    let mut interval = ACTIVE_INTERVAL;
    loop {
        let gate_open =
            shared.consumer.is_none() || shared.stats.has_subscriber.load(Ordering::Acquire);
        if gate_open {
            match read_all(&mut conn, shared).await? {
                None => break,
                Some(0) => {}
                Some(_) => {
                    last_row = Instant::now();
                    interval = ACTIVE_INTERVAL;
                }
            }
            last_query = Instant::now();
        } else if last_query.elapsed() >= shared.query_limit / 2 {
            shared
                .within("checking the listener connection", async {
                    conn.ping()
                        .await
                        .map_err(db_err("checking the listener connection"))
                })
                .await?;
            last_query = Instant::now();
        }
        if let (Some(consumer), Some(watermark)) = (&shared.consumer, save_due(shared)) {
            let missed = shared
                .within(
                    "saving the consumer cursor",
                    consumers::save_running(
                        &mut conn,
                        &shared.database,
                        consumer,
                        &shared.channel_list,
                        watermark,
                    ),
                )
                .await?;
            gap(shared, missed);
            shared.saving().saved = Some((watermark, Instant::now()));
        }
        if last_row.elapsed() > STAY_ACTIVE {
            interval = (interval * 2).min(IDLE_INTERVAL);
        }
        if shared.pause(interval).await {
            break;
        }
    }
    let _ = conn.disconnect().await;
    Ok(())
}

/// The watermark a named consumer should save now, if a save is due: everything read up to
/// it has left the pipeline, and it moved (at most every `SAVE_EVERY`) or the heartbeat is
/// due.
fn save_due(shared: &Shared) -> Option<i64> {
    let heartbeat = shared.consumer.as_ref()?.heartbeat();
    let settled = shared.stats.settled.load(Ordering::Relaxed);
    let mut saving = shared.saving();
    let settled_entries = saving
        .unsaved
        .iter()
        .take_while(|(forwarded, _)| *forwarded <= settled)
        .count();
    let newest = saving
        .unsaved
        .iter()
        .take(settled_entries)
        .map(|(_, watermark)| *watermark)
        .max();
    let safe = match (saving.saved.map(|(w, _)| w), newest) {
        (Some(saved), Some(newest)) => saved.max(newest),
        (saved, newest) => saved.or(newest)?,
    };
    let due = match saving.saved {
        None => true,
        Some((saved, at)) => {
            (safe > saved && at.elapsed() >= SAVE_EVERY) || at.elapsed() >= heartbeat
        }
    };
    if !due {
        return None;
    }
    saving.unsaved.drain(..settled_entries);
    Some(safe)
}

/// Announces that a (re)registered consumer missed purged rows on `missed`, if any.
fn gap(shared: &Shared, missed: Vec<String>) {
    if let (false, Some(consumer)) = (missed.is_empty(), &shared.consumer) {
        report_gap(&consumer.name, &missed);
        shared
            .status
            .do_send(StatusEvent::now(Status::Gap { channels: missed }));
    }
}

/// Reads and forwards every unread row. Returns how many events were forwarded, or `None`
/// when told to stop while waiting for room in the pipeline.
async fn read_all(conn: &mut Conn, shared: &Shared) -> Result<Option<u64>> {
    let (mut pos, condition) = {
        let cursor = shared.cursor();
        let cursor = cursor
            .as_ref()
            .expect("the cursor is placed before reading");
        (cursor.low(), cursor.unread_condition())
    };
    let mut forwarded = 0;
    loop {
        if shared.stopped() {
            return Ok(None);
        }
        let rows = shared
            .within(
                "reading the journal",
                journal::read_page(conn, &shared.database, pos, &condition, READ_BATCH),
            )
            .await?;
        let full = rows.len() == READ_BATCH;
        if let Some((last, _, _)) = rows.last() {
            pos = *last;
        }
        let now = SystemTime::now();
        let (batch, ids) = {
            let cursor = shared.cursor();
            let cursor = cursor.as_ref().expect("placed");
            let mut batch = Vec::new();
            let mut ids = Vec::new();
            for (id, channel, payload) in rows {
                if !cursor.is_new(id) {
                    continue;
                }
                ids.push(id);
                if shared.channels.contains(&channel) {
                    batch.push(RawNotification {
                        channel,
                        payload,
                        received_at: now,
                        sequence: Some(id),
                        events: 1,
                    });
                }
            }
            (batch, ids)
        };
        if !batch.is_empty() {
            let n = batch.len();
            // One unit of in-flight budget per event; when the pipeline is full the cursor
            // waits here (and stop still gets through). Rows count as read only once handed
            // over.
            let mut stop = shared.stop.clone();
            let acquire = pin!(shared.budget.acquire_many(n as u32));
            let stopped = pin!(stop.wait_for(|s| *s));
            match select(acquire, stopped).await {
                Either::Left((Ok(permits), _)) => permits.forget(),
                Either::Left((Err(_), _)) | Either::Right(_) => return Ok(None),
            }
            shared
                .stats
                .forwarded
                .fetch_add(n as u64, Ordering::Relaxed);
            shared.decoder.do_send(RawBatch(batch));
            forwarded += n as u64;
        }
        if let Some(cursor) = shared.cursor().as_mut() {
            cursor.mark(ids, Instant::now());
        }
        if !full {
            break;
        }
    }
    let moved = {
        let mut cursor = shared.cursor();
        let cursor = cursor.as_mut().expect("placed");
        cursor.advance(Instant::now()).then(|| cursor.low())
    };
    if let Some(low) = moved {
        shared.latest.store(low, Ordering::Release);
        if shared.consumer.is_some() {
            let forwarded_total = shared.stats.forwarded.load(Ordering::Relaxed);
            shared.saving().unsaved.push_back((forwarded_total, low));
        }
    }
    Ok(Some(forwarded))
}

impl Actor for MysqlListener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.attempt == 0 {
            self.spawn(ctx);
        } else {
            let delay = self.backoff.delay(self.attempt);
            log::info!(
                "sqlnotify: restarting the MySQL listener in {delay:?} (attempt {})",
                self.attempt
            );
            ctx.run_later(delay, |act, ctx| act.spawn(ctx));
        }
    }
}

impl Supervised for MysqlListener {
    fn restarting(&mut self, _: &mut Context<Self>) {
        if !self.shutting_down {
            self.attempt = self.attempt.saturating_add(1);
            Counters::add(&self.shared.stats.restarts, 1);
        }
    }
}

/// The watcher is connected and its cursor placed.
struct Up {
    generation: u64,
}

impl Message for Up {
    type Result = ();
}

impl Handler<Up> for MysqlListener {
    type Result = ();

    fn handle(&mut self, msg: Up, _: &mut Context<Self>) {
        if msg.generation == self.generation {
            self.attempt = 0;
            self.was_connected = true;
        }
    }
}

/// The watcher task ended.
struct TaskEnded {
    generation: u64,
    error: Option<Error>,
}

impl Message for TaskEnded {
    type Result = ();
}

impl Handler<TaskEnded> for MysqlListener {
    type Result = ();

    fn handle(&mut self, msg: TaskEnded, ctx: &mut Context<Self>) {
        if msg.generation != self.generation || self.shutting_down {
            return;
        }
        match msg.error {
            Some(e) => {
                log::warn!("sqlnotify: MySQL listener failed: {e}");
                ctx.stop();
            }
            // A clean end: told to stop, or the first start failed and was reported.
            None => self.shutting_down = true,
        }
    }
}

/// Stops the watcher for good; resolves once it has passed on what it read and exited.
struct Shutdown;

impl Message for Shutdown {
    type Result = ();
}

impl Handler<Shutdown> for MysqlListener {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        let _ = self.stop.send(true);
        let task = self.task.take();
        Box::pin(async move {
            if let Some(task) = task {
                let _ = task.await;
            }
        })
    }
}

/// The notifier's handle on a running MySQL listener.
pub(crate) struct MysqlListenerHandle {
    addr: Addr<MysqlListener>,
    opts: Opts,
    database: Arc<str>,
    consumer: Option<String>,
    latest: Arc<AtomicI64>,
}

impl ListenerHandle for MysqlListenerHandle {
    fn shutdown(&mut self) -> BoxFuture<'static, ()> {
        let addr = self.addr.clone();
        Box::pin(async move {
            let _ = addr.send(Shutdown).await;
        })
    }

    /// The pipeline is flushed: everything read was routed, so a named consumer may save the
    /// newest low watermark.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let latest = self.latest.load(Ordering::Acquire);
        let (Some(name), true) = (self.consumer.clone(), latest >= 0) else {
            return Box::pin(async { Ok(()) });
        };
        let (opts, database) = (self.opts.clone(), self.database.clone());
        Box::pin(async move {
            let mut conn = Conn::new(opts)
                .await
                .map_err(db_err("connecting to save the consumer cursor"))?;
            let saved = consumers::save(&mut conn, &database, &name, latest)
                .await
                .map(|_| ());
            let _ = conn.disconnect().await;
            saved
        })
    }
}

/// Starts a supervised MySQL listener; resolves once its cursor is placed.
pub(crate) async fn start(
    opts: Opts,
    database: Arc<str>,
    gap_timeout: Duration,
    params: ListenParams,
    wake: Arc<Notify>,
) -> Result<Box<dyn ListenerHandle>> {
    let (ready, is_ready) = oneshot::channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let latest = Arc::new(AtomicI64::new(-1));
    let mut channel_list: Vec<String> = params.channels.into_iter().map(|(name, _)| name).collect();
    channel_list.sort();
    channel_list.dedup();
    let consumer_name = params.consumer.as_ref().map(|c| c.name.clone());
    let shared = Shared {
        opts: opts.clone(),
        database: database.clone(),
        gap_timeout,
        query_limit: params.health_check.max(MIN_QUERY_LIMIT),
        channels: Arc::new(channel_list.iter().cloned().collect()),
        channel_list: Arc::new(channel_list),
        consumer: params.consumer,
        decoder: params.decoder,
        status: params.status,
        budget: params.budget,
        stats: params.stats,
        cursor: Arc::new(Mutex::new(None)),
        saving: Arc::new(Mutex::new(Saving::default())),
        latest: latest.clone(),
        wake,
        stop: stop_rx,
    };
    let addr = Supervisor::start(move |_| MysqlListener {
        shared,
        stop: stop_tx,
        backoff: Backoff::default(),
        attempt: 0,
        ready: Some(ready),
        task: None,
        generation: 0,
        was_connected: false,
        shutting_down: false,
    });
    match is_ready.await {
        Ok(Ok(())) => Ok(Box::new(MysqlListenerHandle {
            addr,
            opts,
            database,
            consumer: consumer_name,
            latest,
        })),
        Ok(Err(e)) => {
            let _ = addr.send(Shutdown).await;
            Err(e)
        }
        Err(_) => Err(Error::NotRunning),
    }
}
