//! The actor behind a [`SnapshotFeed`](super::SnapshotFeed): subscribes to the table's
//! channels, reads the snapshot into the feed, then passes on the changes the snapshot does
//! not already reflect.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc;

use super::fence::Fence;
use super::Progress;
use crate::dialect::Dialect;
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Channel, RawNotification};
use crate::filter::Filter;
use crate::payload::{decode, Decoded};
use crate::registry::{Registry, SubscribeEvery};
use crate::stats::Counters;
use crate::subscriber::Sink;

/// What the feeder needs to start, used once.
pub(crate) struct Start {
    pub dialect: Arc<dyn Dialect>,
    pub registry: Addr<Registry>,
    pub chunk_rows: usize,
    pub buffer: usize,
}

/// Most backfill fences a feeder keeps (see [`Feeder::backfills`]).
const MAX_BACKFILL_FENCES: usize = 64;

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
    /// The fences of backfills, each with the filters it was read with: a change one of them
    /// already reflects (and that its filters select) is not passed on. The oldest is
    /// forgotten beyond [`MAX_BACKFILL_FENCES`] (a change it would have skipped then comes
    /// after the row: a duplicate, never a gap).
    backfills: Vec<(Fence, Vec<Filter>)>,
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
            },
            fence: None,
            backfills: Vec::new(),
            start: Some(start),
        }
    }

    /// Whether a snapshot or backfill already reflects `event`.
    fn covered(&self, event: &ChangeEvent) -> bool {
        self.fence.as_ref().is_some_and(|f| f.covers(event))
            || self.backfills.iter().any(|(fence, filters)| {
                fence.covers(event) && filters.iter().all(|f| f.matches(event))
            })
    }
}

/// Subscribes `me`, then reads the snapshot into `tx` ([`read_rows`]).
async fn subscribe_and_read(
    start: Start,
    me: Recipient<ChangeEvent>,
    read: Read,
) -> Result<Option<Fence>> {
    // The subscription first: every change committed after the read is taken reaches it.
    start
        .registry
        .send(SubscribeEvery {
            sink: Sink::Recipient(me),
            buffer: start.buffer,
        })
        .await?;
    read_rows(read, true).await
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
}

/// Opens a consistent read of the table and hands every row that passes the filters to the
/// feed, as snapshot events, the last one marked
/// ([`ChangeEvent::ends_snapshot`]); for the `initial` read, marks the snapshot done just
/// before that last event goes out. Each chunk is handed over while the next one is fetched.
/// Returns the read's fence, or `None` when the feed was dropped.
async fn read_rows(read: Read, initial: bool) -> Result<Option<Fence>> {
    let mut reader = read
        .dialect
        .open_snapshot(read.channel.clone(), read.chunk_rows)
        .await?;
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
        let (next, open) = tokio::join!(reader.next_chunk(), send(&read.tx, events));
        if !open {
            return Ok(None);
        }
        current = next?;
    }
    if initial {
        read.progress.done.store(true, Ordering::Release);
    }
    if let Some(mut last) = held {
        last.set_ends_snapshot();
        if !send(&read.tx, vec![last]).await {
            return Ok(None);
        }
    }
    Ok(Some(reader.fence().clone()))
}

/// `read_one` (the snapshot or a backfill, `what`), its failure — an error, or a panic in the
/// dialect's read — logged and handed to the feed; `None` after a failure. The failure is
/// sent with a wait for room: the feed is usually full in the middle of a read (its reader
/// paces it), and a failure dropped there would end the feed as if the notifier had stopped,
/// the rows before it passing for the whole snapshot.
async fn reported(
    read: Read,
    what: &str,
    read_one: impl std::future::Future<Output = Result<Option<Fence>>>,
) -> Option<Option<Fence>> {
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
        let read = reported(self.read.clone(), "the snapshot", read);
        // ctx.wait: no live event is looked at before the last snapshot row went out.
        ctx.wait(read.into_actor(self).map(|result, act, ctx| match result {
            Some(Some(fence)) => {
                act.fence = Some(fence);
                act.read.progress.done.store(true, Ordering::Release);
            }
            // The feed was dropped, or the failure is in it.
            Some(None) | None => ctx.stop(),
        }));
    }
}

impl Handler<ChangeEvent> for Feeder {
    type Result = ();

    fn handle(&mut self, event: ChangeEvent, ctx: &mut Context<Self>) {
        if self.fence.is_none() {
            return; // stopping after a failed read
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
        read.filters.extend(msg.filters.iter().cloned());
        let filters = msg.filters;
        // ctx.wait: the changes after the backfill's read wait until its last row went out.
        let backfill = reported(read.clone(), "a backfill", read_rows(read, false));
        ctx.wait(
            backfill
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Some(Some(fence)) => {
                        if act.backfills.len() == MAX_BACKFILL_FENCES {
                            act.backfills.remove(0);
                        }
                        act.backfills.push((fence, filters));
                    }
                    Some(None) => ctx.stop(),
                    // The failure is in the feed; the changes go on.
                    None => {}
                }),
        );
    }
}
