//! The SQLite listener: a supervised actor that runs a watcher thread over the journal.
//!
//! SQLite has no NOTIFY. The watcher keeps its own connection and checks `PRAGMA
//! data_version` — which changes when any other connection commits — at an adaptive
//! interval: every millisecond while events flow, backing off to 10 ms when idle. Only when
//! the version moved does it read the journal past its cursor. A wake-up channel lets the
//! notifier's own writes (`notify()`) and shutdown cut the wait short. The blocking SQLite
//! work stays on this thread, never on the actix arbiter.
//!
//! If the thread fails (I/O error, database replaced), the actor stops and its supervisor
//! restarts it after a jittered backoff; the new thread resumes from the shared cursor.
//!
//! A named consumer registers when the first thread starts (see `consumers.rs`; one that was
//! dropped or expired and missed purged rows announces [`Status::Gap`]), reads nothing until
//! its first subscription exists, and saves its cursor as events are routed.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::WeakAddr;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use super::consumers;
use super::journal;
use super::open;
use crate::backoff::Backoff;
use crate::consumer::{report_gap, ConsumerParams};
use crate::decoder::RawBatch;
use crate::dialect::{ListenParams, ListenerHandle};
use crate::error::{Error, Result};
use crate::stats::Counters;
use crate::status::{Status, StatusEvent};
use tokio::sync::Semaphore;

/// Polling interval while events flow.
const ACTIVE_INTERVAL: Duration = Duration::from_millis(1);
/// Polling interval once idle (the worst-case wake-up latency after a quiet period).
const IDLE_INTERVAL: Duration = Duration::from_millis(10);
/// How long after the last event the watcher stays at the active interval.
const STAY_ACTIVE: Duration = Duration::from_millis(500);
/// Rows read per query.
const READ_BATCH: i64 = 1_000;
/// How often a named consumer saves its cursor while events flow.
const SAVE_EVERY: Duration = Duration::from_millis(100);

/// Messages to the watcher thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Look at the journal now (the notifier just wrote to it).
    Now,
    /// Stop.
    Stop,
}

/// What every generation of the watcher thread shares.
#[derive(Clone)]
struct Shared {
    path: PathBuf,
    channels: Arc<HashSet<String>>,
    /// The same channels, sorted (what a named consumer registers).
    channel_list: Arc<Vec<String>>,
    consumer: Option<ConsumerParams>,
    decoder: Recipient<RawBatch>,
    status: Recipient<StatusEvent>,
    budget: Arc<Semaphore>,
    stats: Arc<Counters>,
    /// Last journal id read; -1 until the first thread has placed it.
    cursor: Arc<AtomicI64>,
    wake: Receiver<Wake>,
}

pub(crate) struct SqliteListener {
    shared: Shared,
    backoff: Backoff,
    attempt: u32,
    ready: Option<oneshot::Sender<Result<()>>>,
    thread: Option<JoinHandle<()>>,
    generation: u64,
    shutting_down: bool,
}

impl SqliteListener {
    fn spawn(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        self.generation += 1;
        let (shared, generation) = (self.shared.clone(), self.generation);
        let me = ctx.address().downgrade();
        let ready = self.ready.take();
        let restarted = self.attempt > 0;
        let spawned = std::thread::Builder::new()
            .name("sqlnotify-sqlite".into())
            .spawn(move || {
                let outcome = watch(&shared, ready, restarted);
                if let Err(e) = &outcome {
                    let error = e.to_string();
                    shared
                        .status
                        .do_send(StatusEvent::now(Status::Disconnected { error }));
                }
                notify_end(me, generation, outcome.err());
            });
        match spawned {
            Ok(handle) => self.thread = Some(handle),
            Err(e) => {
                log::error!("sqlnotify: cannot start the SQLite watcher thread: {e}");
                ctx.stop();
            }
        }
    }
}

fn notify_end(me: WeakAddr<SqliteListener>, generation: u64, error: Option<Error>) {
    if let Some(addr) = me.upgrade() {
        addr.do_send(ThreadEnded { generation, error });
    }
}

/// The watcher thread's body. Reports readiness (or the first failure) through `ready`.
fn watch(
    shared: &Shared,
    mut ready: Option<oneshot::Sender<Result<()>>>,
    restarted: bool,
) -> Result<()> {
    let setup = || -> Result<_> {
        let mut conn = open(&shared.path)?;
        if shared.cursor.load(Ordering::Acquire) < 0 {
            let start = match &shared.consumer {
                Some(consumer) => {
                    let (cursor, missed) =
                        consumers::register(&mut conn, consumer, &shared.channel_list)?;
                    gap(shared, consumer, missed);
                    cursor
                }
                None => journal::head(&conn)?,
            };
            log::debug!("sqlnotify: SQLite listener starts after journal id {start}");
            shared.cursor.store(start, Ordering::Release);
        }
        Ok(conn)
    };
    let mut conn = match setup() {
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

    if restarted {
        // Resuming from the shared cursor: nothing committed meanwhile is lost.
        shared.status.do_send(StatusEvent::now(Status::Connected));
        let Some(replayed) = read_all(&conn, shared)? else {
            return Ok(());
        };
        shared
            .status
            .do_send(StatusEvent::now(Status::Resynced { replayed }));
    }
    let mut last_event = Instant::now();
    let mut interval = ACTIVE_INTERVAL;
    let mut saved = (
        shared.stats.routed_sequence.load(Ordering::Relaxed),
        Instant::now(),
    );
    loop {
        // Take the version before reading: a commit after this point changes it again.
        let version = journal::data_version(&conn)?;
        let gate_open =
            shared.consumer.is_none() || shared.stats.has_subscriber.load(Ordering::Acquire);
        if gate_open {
            match read_all(&conn, shared)? {
                None => return Ok(()),
                Some(0) => {}
                Some(_) => {
                    last_event = Instant::now();
                    interval = ACTIVE_INTERVAL;
                }
            }
        }
        if let Some(consumer) = &shared.consumer {
            if save_due(shared, saved) {
                let routed = shared.stats.routed_sequence.load(Ordering::Relaxed);
                let cursor = routed.max(saved.0);
                let missed =
                    consumers::save_running(&mut conn, consumer, &shared.channel_list, cursor)?;
                gap(shared, consumer, missed);
                saved = (cursor, Instant::now());
            }
        }
        // Wait until the database changes, the notifier wakes us, or we are told to stop.
        loop {
            match shared.wake.recv_timeout(interval) {
                Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return Ok(()),
                Ok(Wake::Now) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if journal::data_version(&conn)? != version {
                break;
            }
            if !gate_open && shared.stats.has_subscriber.load(Ordering::Acquire) {
                break;
            }
            // Events routed after the last check, or the heartbeat: save while idle too.
            if save_due(shared, saved) {
                break;
            }
            if last_event.elapsed() > STAY_ACTIVE {
                interval = (interval * 2).min(IDLE_INTERVAL);
            }
        }
    }
}

/// Whether a named consumer should save its cursor now: events were routed since the last
/// save (at most every `SAVE_EVERY`), or the heartbeat is due.
fn save_due(shared: &Shared, saved: (i64, Instant)) -> bool {
    let Some(consumer) = &shared.consumer else {
        return false;
    };
    let routed = shared.stats.routed_sequence.load(Ordering::Relaxed);
    (routed > saved.0 && saved.1.elapsed() >= SAVE_EVERY)
        || saved.1.elapsed() >= consumer.heartbeat()
}

/// Announces that a (re)registered consumer missed purged rows on `missed`, if any.
fn gap(shared: &Shared, consumer: &ConsumerParams, missed: Vec<String>) {
    if !missed.is_empty() {
        report_gap(&consumer.name, &missed);
        shared
            .status
            .do_send(StatusEvent::now(Status::Gap { channels: missed }));
    }
}

/// Reads and forwards every row past the cursor. Returns how many events were forwarded, or
/// `None` when told to stop while waiting for room in the pipeline.
fn read_all(conn: &rusqlite::Connection, shared: &Shared) -> Result<Option<u64>> {
    let mut forwarded = 0;
    loop {
        let cursor = shared.cursor.load(Ordering::Acquire);
        let (batch, last) = journal::read_after(conn, cursor, READ_BATCH, &shared.channels)?;
        if last == cursor {
            return Ok(Some(forwarded));
        }
        if !batch.is_empty() {
            forwarded += batch.len() as u64;
            // One unit of in-flight budget per event; when the pipeline is full, the cursor
            // simply waits here (and stop still gets through).
            loop {
                match shared.budget.try_acquire_many(batch.len() as u32) {
                    Ok(permits) => {
                        permits.forget();
                        break;
                    }
                    Err(tokio::sync::TryAcquireError::Closed) => return Ok(None),
                    Err(tokio::sync::TryAcquireError::NoPermits) => {
                        match shared.wake.recv_timeout(ACTIVE_INTERVAL) {
                            Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => {
                                return Ok(None)
                            }
                            Ok(Wake::Now) | Err(RecvTimeoutError::Timeout) => {}
                        }
                    }
                }
            }
            shared
                .stats
                .forwarded
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            shared.decoder.do_send(RawBatch(batch));
        }
        shared.cursor.store(last, Ordering::Release);
    }
}

impl Actor for SqliteListener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.attempt == 0 {
            self.spawn(ctx);
        } else {
            let delay = self.backoff.delay(self.attempt);
            log::info!(
                "sqlnotify: restarting the SQLite watcher in {delay:?} (attempt {})",
                self.attempt
            );
            ctx.run_later(delay, |act, ctx| act.spawn(ctx));
        }
    }
}

impl Supervised for SqliteListener {
    fn restarting(&mut self, _: &mut Context<Self>) {
        if !self.shutting_down {
            self.attempt = self.attempt.saturating_add(1);
            Counters::add(&self.shared.stats.restarts, 1);
        }
    }
}

/// The watcher thread ended.
struct ThreadEnded {
    generation: u64,
    error: Option<Error>,
}

impl Message for ThreadEnded {
    type Result = ();
}

impl Handler<ThreadEnded> for SqliteListener {
    type Result = ();

    fn handle(&mut self, msg: ThreadEnded, ctx: &mut Context<Self>) {
        if msg.generation != self.generation || self.shutting_down {
            return;
        }
        match msg.error {
            Some(e) => {
                log::warn!("sqlnotify: SQLite watcher failed: {e}");
                ctx.stop();
            }
            // A clean end: told to stop, the notifier is gone, or the first start failed and
            // was reported to start(). Nothing to restart.
            None => self.shutting_down = true,
        }
    }
}

/// Stops the watcher thread for good; resolves once it has exited.
struct Shutdown {
    wake: Sender<Wake>,
}

impl Message for Shutdown {
    type Result = ();
}

impl Handler<Shutdown> for SqliteListener {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        let _ = msg.wake.send(Wake::Stop);
        let thread = self.thread.take();
        Box::pin(async move {
            if let Some(thread) = thread {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
        })
    }
}

/// The notifier's handle on a running SQLite listener.
pub(crate) struct SqliteListenerHandle {
    addr: Addr<SqliteListener>,
    wake: Sender<Wake>,
    path: PathBuf,
    consumer: Option<String>,
    cursor: Arc<AtomicI64>,
}

impl ListenerHandle for SqliteListenerHandle {
    fn shutdown(&mut self) -> BoxFuture<'static, ()> {
        let (addr, wake) = (self.addr.clone(), self.wake.clone());
        Box::pin(async move {
            let _ = addr.send(Shutdown { wake }).await;
        })
    }

    /// The pipeline is flushed: everything read was routed, so a named consumer's cursor may
    /// move to the last row read.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let Some(name) = self.consumer.clone() else {
            return Box::pin(async { Ok(()) });
        };
        let (path, cursor) = (self.path.clone(), self.cursor.load(Ordering::Acquire));
        Box::pin(async move {
            if cursor < 0 {
                return Ok(());
            }
            tokio::task::spawn_blocking(move || {
                consumers::save(&open(&path)?, &name, cursor).map(|_| ())
            })
            .await
            .map_err(|e| Error::db("saving the consumer cursor", e))?
        })
    }
}

/// Starts a supervised SQLite listener; resolves once its thread has placed its cursor.
pub(crate) async fn start(
    path: PathBuf,
    params: ListenParams,
    wake: (Sender<Wake>, Receiver<Wake>),
) -> Result<Box<dyn ListenerHandle>> {
    let (ready, is_ready) = oneshot::channel();
    let cursor = Arc::new(AtomicI64::new(-1));
    let mut channel_list: Vec<String> = params.channels.into_iter().map(|(name, _)| name).collect();
    channel_list.sort();
    channel_list.dedup();
    let consumer_name = params.consumer.as_ref().map(|c| c.name.clone());
    let shared = Shared {
        path: path.clone(),
        channels: Arc::new(channel_list.iter().cloned().collect()),
        channel_list: Arc::new(channel_list),
        consumer: params.consumer,
        decoder: params.decoder,
        status: params.status,
        budget: params.budget,
        stats: params.stats,
        cursor: cursor.clone(),
        wake: wake.1,
    };
    let addr = Supervisor::start(move |_| SqliteListener {
        shared,
        backoff: Backoff::default(),
        attempt: 0,
        ready: Some(ready),
        thread: None,
        generation: 0,
        shutting_down: false,
    });
    match is_ready.await {
        Ok(Ok(())) => Ok(Box::new(SqliteListenerHandle {
            addr,
            wake: wake.0,
            path,
            consumer: consumer_name,
            cursor,
        })),
        Ok(Err(e)) => {
            let _ = addr.send(Shutdown { wake: wake.0 }).await;
            Err(e)
        }
        Err(_) => Err(Error::NotRunning),
    }
}
