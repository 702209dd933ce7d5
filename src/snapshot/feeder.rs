//! The actor behind a [`SnapshotFeed`](super::SnapshotFeed): subscribes to the table's
//! channels, reads the snapshot into the feed, then passes on the changes the snapshot does
//! not already reflect. A read is dropped where it stands — its transaction rolled back, its
//! connection closed — as soon as the feed is dropped or the notifier stops
//! ([`read_rows`]), rather than read to the end for nobody.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::{mpsc, watch};

use super::fence::Fence;
use super::Progress;
use crate::dialect::Dialect;
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Channel, Key, RawNotification};
use crate::filter::Filter;
use crate::payload::{decode, Decoded};
use crate::registry::{Registry, SubscribeEvery, Unsubscribe};
use crate::stats::Counters;
use crate::subscriber::Sink;
use crate::subscription::SubscriptionId;

/// What the feeder needs to start, used once.
pub(crate) struct Start {
    pub dialect: Arc<dyn Dialect>,
    pub registry: Addr<Registry>,
    pub chunk_rows: usize,
    pub buffer: usize,
    /// Turns `true` when the notifier stops ([`stopping`]).
    pub stopping: watch::Receiver<bool>,
}

/// Most backfill fences a feeder keeps (see [`Feeder::backfills`]).
const MAX_BACKFILL_FENCES: usize = 64;

/// Most bytes the keys the kept backfill fences sent may take, counted as [`Sent::bytes`]
/// does (see [`Feeder::backfills`]): 64 MiB, about a million short keys.
const MAX_BACKFILL_KEY_BYTES: usize = 64 << 20;

/// What one backfill sent: the keys of its rows, each as the compact JSON text of its values
/// ([`key_text`]), so a change is skipped only for a key whose row the feed got from it.
#[derive(Debug, Default)]
struct Sent {
    keys: HashSet<Box<str>>,
    /// The keys' text plus a set entry's overhead each: what [`MAX_BACKFILL_KEY_BYTES`] bounds.
    bytes: usize,
    /// Set when the keys went past [`MAX_BACKFILL_KEY_BYTES`] on their own: the fence is not
    /// kept (its changes all come after its rows).
    overflowed: bool,
}

impl Sent {
    /// What a key takes besides its text (the box and the set's slot).
    const ENTRY: usize = 32;

    /// Records that the backfill sent a row with `key`.
    fn add(&mut self, key: &crate::event::Key) {
        if self.overflowed {
            return;
        }
        let text = key_text(key);
        let bytes = text.len() + Self::ENTRY;
        if self.keys.insert(text) {
            self.bytes += bytes;
        }
        if self.bytes > MAX_BACKFILL_KEY_BYTES {
            self.overflowed = true;
            self.keys = HashSet::new();
            self.bytes = 0;
        }
    }

    /// Whether the backfill sent a row with `key`.
    fn has(&self, key: &crate::event::Key) -> bool {
        !self.keys.is_empty() && self.keys.contains(&*key_text(key))
    }
}

/// A key's values as compact JSON text: how a backfill remembers the keys it sent.
fn key_text(key: &crate::event::Key) -> Box<str> {
    serde_json::to_string(key.values())
        .unwrap_or_default()
        .into_boxed_str()
}

/// Feeds one [`SnapshotFeed`](super::SnapshotFeed). Its mailbox holds at most the feed's
/// buffer of live events; while a snapshot or a backfill streams it reads none (so they wait,
/// in order, in the mailbox and then in the registry's buffer for it).
pub(crate) struct Feeder {
    /// The table's channels: the live events it passes on.
    channels: HashSet<String>,
    /// How to read the table (the channel, the feed's filters, where rows go).
    read: Read,
    /// Set once every snapshot row was handed over.
    fence: Option<Fence>,
    /// The fences of backfills, each with the keys of the rows it sent: a change one of them
    /// already reflects is not passed on when that backfill sent its key's row (which is as
    /// new as the change or newer). A change of a key the backfill did not send is passed on
    /// even when its read reflects it — the row was deleted, or no longer matched the
    /// backfill's filters, and the feed learns that only from the change. The oldest fences
    /// are forgotten beyond [`MAX_BACKFILL_FENCES`] or [`MAX_BACKFILL_KEY_BYTES`] of keys (a
    /// backfill whose keys alone pass that bound is not kept at all): a change a forgotten
    /// fence would have skipped then comes after the row — a duplicate or an older state
    /// followed by the newer ones, never a gap.
    backfills: VecDeque<(Fence, Sent)>,
    /// What the keys of `backfills` take ([`Sent::bytes`] summed).
    backfill_bytes: usize,
    /// Where the subscription is, to end it when the feeder stops.
    registry: Addr<Registry>,
    /// The subscription to every event, once made.
    subscription: Option<SubscriptionId>,
    start: Option<Start>,
}

impl Feeder {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        channels: HashSet<String>,
        channel: Arc<Channel>,
        filters: Vec<Filter>,
        tx: mpsc::Sender<Result<ChangeEvent>>,
        progress: Arc<Progress>,
        stats: Arc<Counters>,
        start: Start,
    ) -> Self {
        Feeder {
            channels,
            read: Read {
                dialect: start.dialect.clone(),
                channel,
                chunk_rows: start.chunk_rows,
                filters,
                tx,
                progress,
                stats,
                stopping: start.stopping.clone(),
            },
            fence: None,
            backfills: VecDeque::new(),
            backfill_bytes: 0,
            registry: start.registry.clone(),
            subscription: None,
            start: Some(start),
        }
    }

    /// Whether the snapshot, or a backfill that sent `event`'s key, already reflects `event`.
    /// (The snapshot's fence needs no keys: a change it reflects of a key it did not send —
    /// a row deleted before the read — must be skipped too, the feed never having shown it.)
    fn covered(&self, event: &ChangeEvent) -> bool {
        self.fence.as_ref().is_some_and(|f| f.covers(event))
            || self
                .backfills
                .iter()
                .any(|(fence, sent)| fence.covers(event) && sent.has(event.id()))
    }

    /// Keeps a backfill's fence and sent keys, forgetting the oldest fences beyond
    /// [`MAX_BACKFILL_FENCES`] and [`MAX_BACKFILL_KEY_BYTES`].
    fn keep_backfill(&mut self, fence: Fence, sent: Sent) {
        if sent.overflowed {
            log::warn!(
                "sqlnotify: a backfill of {}.{} sent more keys than {} MiB hold: the changes \
                 its read reflects come after its rows anyway (older states may follow newer ones)",
                self.read.channel.schema(),
                self.read.channel.table(),
                MAX_BACKFILL_KEY_BYTES >> 20
            );
            return;
        }
        self.backfill_bytes += sent.bytes;
        self.backfills.push_back((fence, sent));
        while self.backfills.len() > MAX_BACKFILL_FENCES
            || self.backfill_bytes > MAX_BACKFILL_KEY_BYTES
        {
            let Some((_, old)) = self.backfills.pop_front() else {
                break;
            };
            self.backfill_bytes -= old.bytes;
        }
    }
}

/// Subscribes `me`, then reads the snapshot into the feed ([`read_rows`]), a failure of
/// either [`reported`]. Returns the subscription (when made) and the read's fence (`None`
/// when the feed was dropped, or after a failure).
async fn subscribe_and_read(
    start: Start,
    me: Recipient<ChangeEvent>,
    read: Read,
) -> (Option<SubscriptionId>, Option<Fence>) {
    // The subscription first: every change committed after the read is taken reaches it.
    let subscribed = start
        .registry
        .send(SubscribeEvery {
            sink: Sink::Recipient(me),
            buffer: start.buffer,
        })
        .await
        .map_err(Error::from);
    let what = "the snapshot";
    match subscribed {
        Ok(id) => {
            let rows = read.clone();
            let read_one = async move {
                let mut opened = None;
                let whole = read_rows(rows, true, &mut opened).await?;
                Ok(opened.filter(|_| whole).map(|(fence, _)| fence))
            };
            (Some(id), reported(read, what, read_one).await.flatten())
        }
        Err(e) => (None, reported(read, what, async { Err(e) }).await.flatten()),
    }
}

/// What one read of the table needs.
#[derive(Clone)]
struct Read {
    dialect: Arc<dyn Dialect>,
    channel: Arc<Channel>,
    chunk_rows: usize,
    filters: Vec<Filter>,
    tx: mpsc::Sender<Result<ChangeEvent>>,
    progress: Arc<Progress>,
    stats: Arc<Counters>,
    /// Turns `true` when the notifier stops: a read still open then ends.
    stopping: watch::Receiver<bool>,
}

/// Resolves once the notifier is stopping (`stopping` turned `true`); never when it was
/// dropped without a stop (its reads then go on until the feed ends them).
async fn stopping(mut stopping: watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Reads the table into the feed ([`read_table`]) unless the feed is dropped or the notifier
/// stops first: the read is then dropped where it stands, which rolls its transaction back
/// and closes its connection (the dialects' readers end their read when dropped), instead of
/// holding its snapshot — PostgreSQL's xmin, MySQL's consistent read, SQLite's read
/// transaction — until the whole table went to a feed nobody reads. A read the stop cut
/// marks the feed's [`Progress::cut`] (and an `initial` one not done), so that the feed ends
/// with [`Error::NotRunning`] after the rows it got. Returns what [`read_table`] does (`sent`
/// as it left it), or `false` when the read was dropped.
async fn read_rows(read: Read, initial: bool, sent: &mut Option<(Fence, Sent)>) -> Result<bool> {
    let table = read_table(&read, initial, sent);
    let stop = stopping(read.stopping.clone());
    let closed = read.tx.closed();
    tokio::select! {
        // A read that is over counts as over, even when the stop came meanwhile.
        biased;
        done = table => done,
        () = stop => {
            if initial {
                read.progress.done.store(false, Ordering::Release);
            }
            read.progress.cut.store(true, Ordering::Release);
            log::debug!(
                "sqlnotify: the notifier stopped: a read of {}.{} ends before its last row",
                read.channel.schema(),
                read.channel.table()
            );
            Ok(false)
        }
        () = closed => Ok(false),
    }
}

/// Opens a consistent read of the table and hands every row that passes the filters to the
/// feed, as snapshot events, the last one marked
/// ([`ChangeEvent::ends_snapshot`]); for the `initial` read, marks the snapshot done just
/// before that last event goes out. Each chunk is handed over while the next one is fetched.
/// Puts the read's fence in `sent` once the read is open, with the keys of the rows the feed
/// got so far (collected for a backfill only, each once its row was handed over) — also when
/// the read fails later, or panics: a backfill's rows reflect its read whether or not it got
/// to the end. Returns whether it did (`false`: the feed was dropped).
async fn read_table(read: &Read, initial: bool, sent: &mut Option<(Fence, Sent)>) -> Result<bool> {
    let mut reader = read
        .dialect
        .open_snapshot(read.channel.clone(), read.chunk_rows)
        .await?;
    let (_, sent) = sent.insert((reader.fence().clone(), Sent::default()));
    let total = reader.total();
    read.progress.total.fetch_add(total, Ordering::Relaxed);
    read.progress.opened.store(true, Ordering::Release);
    Counters::add(&read.stats.snapshot_rows_total, total);
    // One receipt time for the whole read: the rows are as of its snapshot.
    let raw = RawNotification::new(read.channel.name(), String::new());
    // The last event that passed the filters, held back until it is known whether another
    // one follows.
    let mut held: Option<ChangeEvent> = None;
    let mut current = reader.next_chunk().await?;
    while !current.is_empty() {
        let rows = current.len() as u64;
        read.progress.rows.fetch_add(rows, Ordering::Relaxed);
        Counters::add(&read.stats.snapshot_rows, rows);
        let mut events = Vec::with_capacity(current.len() + 1);
        events.extend(held.take());
        for payload in current {
            let event = snapshot_event(&read.channel, &raw, &payload)?;
            if read.filters.iter().all(|f| f.matches(&event)) {
                events.push(event);
            }
        }
        held = events.pop();
        // Recorded once handed over: a key the feed did not get (the row held back, rows a
        // panic in the next fetch cut off) must not fence its changes.
        let keys: Vec<Key> = if initial {
            Vec::new()
        } else {
            events.iter().map(|e| e.id().clone()).collect()
        };
        let (next, open) = tokio::join!(reader.next_chunk(), send(&read.tx, events));
        if !open {
            return Ok(false);
        }
        keys.iter().for_each(|key| sent.add(key));
        current = next?;
    }
    if initial {
        read.progress.done.store(true, Ordering::Release);
    }
    if let Some(mut last) = held {
        last.set_ends_snapshot();
        let key = last.id().clone();
        if !send(&read.tx, vec![last]).await {
            return Ok(false);
        }
        if !initial {
            sent.add(&key);
        }
    }
    Ok(true)
}

/// `read_one` (the snapshot or a backfill, `what`), its failure — an error, or a panic in the
/// dialect's read — logged and handed to the feed; `None` after a failure. The failure is
/// sent with a wait for room: the feed is usually full in the middle of a read (its reader
/// paces it), and a failure dropped there would end the feed as if the notifier had stopped,
/// the rows before it passing for the whole snapshot.
async fn reported<T>(
    read: Read,
    what: &str,
    read_one: impl std::future::Future<Output = Result<Option<T>>>,
) -> Option<Option<T>> {
    let channel = &read.channel;
    let doing = || format!("reading {}.{}", channel.schema(), channel.table());
    let failure = match crate::error::caught(doing, read_one).await {
        Ok(fence) => return Some(fence),
        Err(e) => e,
    };
    log::warn!(
        "sqlnotify: {what} of {}.{} failed: {failure}",
        channel.schema(),
        channel.table()
    );
    let _ = read.tx.send(Err(failure)).await;
    None
}

/// A snapshot row (payload JSON a dialect's read produced) as a snapshot event.
fn snapshot_event(
    channel: &Arc<Channel>,
    raw: &RawNotification,
    payload: &str,
) -> Result<ChangeEvent> {
    match decode(payload, channel) {
        Ok(Decoded::Row {
            id,
            extra,
            truncated,
            change,
        }) => Ok(ChangeEvent::new(channel.clone(), id, extra, raw, truncated)
            .with_change(change)
            .into_snapshot()),
        other => {
            let reason = match other {
                Err(reason) => reason,
                Ok(_) => "an overflow reference".to_string(),
            };
            Err(Error::InvalidPayload {
                channel: channel.name().to_string(),
                reason: format!(
                    "a snapshot row of {}.{}: {reason}",
                    channel.schema(),
                    channel.table()
                ),
            })
        }
    }
}

/// Sends `events` to the feed in order; `false` when the feed was dropped.
async fn send(tx: &mpsc::Sender<Result<ChangeEvent>>, events: Vec<ChangeEvent>) -> bool {
    for event in events {
        if tx.send(Ok(event)).await.is_err() {
            return false;
        }
    }
    true
}

impl Actor for Feeder {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(start) = self.start.take() else {
            return;
        };
        ctx.set_mailbox_capacity(start.buffer);
        let read = subscribe_and_read(start, ctx.address().recipient(), self.read.clone());
        // ctx.wait: no live event is looked at before the last snapshot row went out.
        ctx.wait(
            read.into_actor(self)
                .map(|(subscription, fence), act, ctx| {
                    act.subscription = subscription;
                    match fence {
                        Some(fence) => {
                            act.fence = Some(fence);
                            act.read.progress.done.store(true, Ordering::Release);
                        }
                        // The feed was dropped, or the failure is in it.
                        None => ctx.stop(),
                    }
                }),
        );
    }

    /// Ends the subscription: a feeder that stopped (its feed dropped, its read failed) takes
    /// no more of the pipeline's events, which it would otherwise hold up (its buffer waits)
    /// and count as delivered.
    fn stopped(&mut self, _: &mut Context<Self>) {
        if let Some(id) = self.subscription.take() {
            self.registry.do_send(Unsubscribe(id));
        }
    }
}

/// Stops the feeder: its feed was dropped ([`SnapshotFeed`](super::SnapshotFeed)'s `Drop`).
pub(crate) struct Stop;

impl Message for Stop {
    type Result = ();
}

impl Handler<Stop> for Feeder {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<ChangeEvent> for Feeder {
    type Result = ();

    fn handle(&mut self, event: ChangeEvent, ctx: &mut Context<Self>) {
        if self.fence.is_none() {
            return; // stopping after a failed read
        }
        // The feed was dropped: stop on the next event, whether or not it would pass (most
        // may not, and only a send would tell).
        if self.read.tx.is_closed() {
            ctx.stop();
            return;
        }
        if !self.channels.contains(event.channel())
            || self.covered(&event)
            || !self.read.filters.iter().all(|f| f.matches(&event))
        {
            return;
        }
        let tx = self.read.tx.clone();
        // One at a time: the next event waits (in the mailbox) until the feed took this one.
        ctx.wait(
            async move { tx.send(Ok(event)).await.is_ok() }
                .into_actor(self)
                .map(|open, _, ctx| {
                    if !open {
                        ctx.stop();
                    }
                }),
        );
    }
}

/// Reads the table's current rows again (those `filters` select, besides the feed's own) into
/// the feed, between the changes: see [`SnapshotFeed::backfill`](super::SnapshotFeed::backfill).
pub(crate) struct Backfill {
    pub filters: Vec<Filter>,
}

impl Message for Backfill {
    type Result = ();
}

impl Handler<Backfill> for Feeder {
    type Result = ();

    fn handle(&mut self, msg: Backfill, ctx: &mut Context<Self>) {
        let mut read = self.read.clone();
        read.filters.extend(msg.filters);
        // ctx.wait: the changes after the backfill's read wait until its last row went out.
        let backfill = async move {
            let mut sent = None;
            let result = reported(read.clone(), "a backfill", async {
                Ok(read_rows(read, false, &mut sent).await?.then_some(()))
            })
            .await;
            (result, sent)
        };
        ctx.wait(
            backfill
                .into_actor(self)
                .map(move |(result, sent), act, ctx| match (result, sent) {
                    (Some(None), _) => ctx.stop(),
                    // Read whole, or failed (the failure is in the feed; the changes go on)
                    // after the rows it sent: those reflect its read all the same.
                    (_, Some((fence, sent))) => act.keep_backfill(fence, sent),
                    // Failed before it was open: nothing sent.
                    (_, None) => {}
                }),
        );
    }
}
