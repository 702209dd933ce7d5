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

/// Feeds one [`SnapshotFeed`](super::SnapshotFeed). Its mailbox holds at most the feed's
/// buffer of live events; while the snapshot streams it reads none (so they wait, in order,
/// in the mailbox and then in the registry's buffer for it).
pub(crate) struct Feeder {
    /// The table's channels: the live events it passes on.
    channels: HashSet<String>,
    /// The channel snapshot rows are read for (and report).
    channel: Arc<Channel>,
    filters: Vec<Filter>,
    /// Set once every snapshot row was handed over.
    fence: Option<Fence>,
    tx: mpsc::Sender<Result<ChangeEvent>>,
    progress: Arc<Progress>,
    stats: Arc<Counters>,
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
            channel,
            filters,
            fence: None,
            tx,
            progress,
            stats,
            start: Some(start),
        }
    }
}

/// Subscribes `me`, opens the snapshot and hands every row that passes `filters` to `tx`.
/// Returns the fence, or `None` when the feed was dropped.
#[allow(clippy::too_many_arguments)]
async fn read(
    start: Start,
    me: Recipient<ChangeEvent>,
    channel: Arc<Channel>,
    filters: Vec<Filter>,
    tx: mpsc::Sender<Result<ChangeEvent>>,
    progress: Arc<Progress>,
    stats: Arc<Counters>,
) -> Result<Option<Fence>> {
    // The subscription first: every change committed after the read is taken reaches it.
    start
        .registry
        .send(SubscribeEvery {
            sink: Sink::Recipient(me),
            buffer: start.buffer,
        })
        .await?;
    let mut reader = start
        .dialect
        .open_snapshot(channel.clone(), start.chunk_rows)
        .await?;
    let total = reader.total();
    progress.total.store(total, Ordering::Relaxed);
    Counters::add(&stats.snapshot_rows_total, total);
    loop {
        let rows = reader.next_chunk().await?;
        if rows.is_empty() {
            break;
        }
        progress
            .rows
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        Counters::add(&stats.snapshot_rows, rows.len() as u64);
        for payload in rows {
            let event = match decode(&payload, &channel) {
                Ok(Decoded::Row {
                    id,
                    extra,
                    truncated,
                    change,
                }) => ChangeEvent::new(
                    channel.clone(),
                    id,
                    extra,
                    &RawNotification::new(channel.name(), String::new()),
                    truncated,
                )
                .with_change(change)
                .into_snapshot(),
                other => {
                    let reason = match other {
                        Err(reason) => reason,
                        Ok(_) => "an overflow reference".to_string(),
                    };
                    return Err(Error::InvalidPayload {
                        channel: channel.name().to_string(),
                        reason: format!(
                            "a snapshot row of {}.{}: {reason}",
                            channel.schema(),
                            channel.table()
                        ),
                    });
                }
            };
            if filters.iter().all(|f| f.matches(&event)) && tx.send(Ok(event)).await.is_err() {
                return Ok(None);
            }
        }
    }
    progress.done.store(true, Ordering::Release);
    Ok(Some(reader.fence().clone()))
}

impl Actor for Feeder {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(start) = self.start.take() else {
            return;
        };
        ctx.set_mailbox_capacity(start.buffer);
        let read = read(
            start,
            ctx.address().recipient(),
            self.channel.clone(),
            self.filters.clone(),
            self.tx.clone(),
            self.progress.clone(),
            self.stats.clone(),
        );
        // ctx.wait: no live event is looked at before the last snapshot row went out.
        ctx.wait(read.into_actor(self).map(|result, act, ctx| match result {
            Ok(Some(fence)) => act.fence = Some(fence),
            Ok(None) => ctx.stop(),
            Err(e) => {
                log::warn!(
                    "sqlnotify: the snapshot of {}.{} failed: {e}",
                    act.channel.schema(),
                    act.channel.table()
                );
                let _ = act.tx.try_send(Err(e));
                ctx.stop();
            }
        }));
    }
}

impl Handler<ChangeEvent> for Feeder {
    type Result = ();

    fn handle(&mut self, event: ChangeEvent, ctx: &mut Context<Self>) {
        let Some(fence) = &self.fence else {
            return; // stopping after a failed read
        };
        if !self.channels.contains(event.channel())
            || fence.covers(&event)
            || !self.filters.iter().all(|f| f.matches(&event))
        {
            return;
        }
        let tx = self.tx.clone();
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
