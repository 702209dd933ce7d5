//! One client's stream ([`Connection`]): the `retry:` field, then — for a client that resumes
//! — the journal after its `Last-Event-ID` page by page (or a `reset`), then live events,
//! `lag` notices and heartbeats, until the client goes, the endpoint shuts down or the
//! notifier stops.
//!
//! Resuming without a gap or a duplicate: the live subscriptions are made before the journal
//! is read, so a row committed meanwhile is in both; every live event the replay read covers
//! (its [`Fence`]) is dropped. SQLite: journal ids are in commit order, so the fence is the
//! last journal row read and what is above it arrives live, in order. PostgreSQL: the replay
//! reads in one snapshot (`src/postgres/replay.rs`), and the live events of transactions that
//! snapshot saw are dropped. MySQL: the replay reads the ids the client's set lacks
//! (`src/mysql/replay.rs`), and live events whose ids are in the grown set are dropped.

use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::builder::{Config, SlowClient};
use super::frame::{
    comment, event_frame, event_frame_at, frame, id_frame, retry, Position, ReadAt,
};
use super::stats::Counters;
use crate::event::ChangeEvent;
use crate::filter::Filter;
use crate::read_point::later_snapshot;
use crate::registry::StreamSubscriptions;
use crate::replay::{Head, Replay, ReplayFrom};
use crate::snapshot::fence::Fence;
use crate::stream_sink::Received;

/// Where the stream starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Start {
    /// Live events only (no `Last-Event-ID`).
    Live,
    /// After this position: the journal first.
    After(Position),
    /// A `Last-Event-ID` that is not one of ours: a `reset`, then live events.
    Unknown,
    /// The `Last-Event-ID` of a stream that had no position to resume from
    /// ([`NO_POSITION`](super::frame::NO_POSITION)): a `reset`, then live events.
    NoPosition,
    /// A `Last-Event-ID` on a stream with a channel that has no journal to replay (this tier:
    /// [`Tier::Logical`], or PostgreSQL's [`Tier::Notify`]): a `reset` naming the tier, then
    /// live events.
    ///
    /// [`Tier::Logical`]: crate::Tier::Logical
    /// [`Tier::Notify`]: crate::Tier::Notify
    NoJournal(crate::Tier),
}

enum Phase {
    Start(Start),
    /// Reading the journal: `read` reads the page that starts at `from`; the client has
    /// `after` and what came before it.
    Replaying {
        from: ReplayFrom,
        after: Position,
        read: PageRead,
    },
    Live,
    Done,
}

/// A page of a replay being read (kept across heartbeats: a page that takes long is not read
/// again).
type PageRead = LocalBoxFuture<'static, crate::error::Result<Page>>;

/// A page of a replay, decoded.
enum Page {
    /// See [`Replay::Rows`]: the events of its rows on the client's channels, in order.
    Rows {
        events: Vec<ChangeEvent>,
        next: Option<ReplayFrom>,
        fence: Fence,
    },
    TooOld,
    Unsupported,
}

/// One client's stream: [`next`](Self::next) gives the text to send, chunk by chunk.
pub(crate) struct Connection {
    config: Arc<Config>,
    /// The granted subscriptions and their events (dropped with the connection, it removes
    /// the subscriptions).
    events: StreamSubscriptions,
    /// The granted subscriptions' channels and filters (query filters included), to select
    /// journal rows as the registry selects live events.
    routes: Vec<(String, Vec<Filter>)>,
    /// The routes' channels, sorted, once: what a replay reads.
    channels: Vec<String>,
    phase: Phase,
    /// The live events the journal replay sent already.
    floor: Option<Fence>,
    /// The `id:` of where the journal stood once the subscriptions were made (or
    /// [`NO_POSITION`](super::frame::NO_POSITION)): the first frame of a stream that starts
    /// live, and the id of a `reset`, so that a client that drops before its next event
    /// resumes from there rather than from nothing (a browser sends no `Last-Event-ID` before
    /// it got an id, and would miss silently what was committed while it was away).
    head: String,
    heartbeat: Interval,
    shutdown: watch::Receiver<bool>,
}

impl Connection {
    pub fn new(
        config: Arc<Config>,
        events: StreamSubscriptions,
        routes: Vec<(String, Vec<Filter>)>,
        start: Start,
        head: String,
    ) -> Connection {
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + config.heartbeat, config.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let shutdown = config.shutdown.subscribe();
        Counters::add(&config.counters.clients, 1);
        Counters::add(&config.counters.connections, 1);
        metrics::gauge!(crate::metrics::SSE_CLIENTS).increment(1.0);
        let mut channels: Vec<String> = routes.iter().map(|(c, _)| c.clone()).collect();
        channels.sort();
        channels.dedup();
        Connection {
            config,
            events,
            routes,
            channels,
            phase: Phase::Start(start),
            floor: None,
            head,
            heartbeat,
            shutdown,
        }
    }

    /// The next chunk of the stream; `None` when it ends.
    pub async fn next(&mut self) -> Option<String> {
        // actix asks for the next chunk only while it can write to the client: a client that
        // keeps reading is never taken for stuck, also while its replay is read.
        self.events.events().touch();
        loop {
            if *self.shutdown.borrow() {
                self.phase = Phase::Done;
            }
            return match std::mem::replace(&mut self.phase, Phase::Live) {
                Phase::Done => {
                    self.phase = Phase::Done;
                    None
                }
                Phase::Start(start) => Some(self.start(start)),
                Phase::Replaying {
                    from,
                    after,
                    mut read,
                } => {
                    // A replay sends heartbeats too: a page may take long to read, and a run
                    // of pages may hold nothing of this client's (a proxy would close the
                    // idle stream, and the client would start that replay over and over).
                    let page = tokio::select! {
                        biased;
                        changed = self.shutdown.changed() => {
                            let _ = changed;
                            self.phase = Phase::Done;
                            return None;
                        }
                        page = &mut read => page,
                        _ = self.heartbeat.tick() => {
                            self.phase = Phase::Replaying { from, after, read };
                            Counters::add(&self.config.counters.heartbeats, 1);
                            return Some(comment("heartbeat"));
                        }
                    };
                    match self.replayed(page, &from, after) {
                        // Nothing of this client's on that page, and no progress to name: the
                        // next one at once (a loop, not a call: a long run of such pages must
                        // not deepen the stack).
                        Some(out) if out.is_empty() => continue,
                        other => other,
                    }
                }
                Phase::Live => self.live().await,
            };
        }
    }

    fn start(&mut self, start: Start) -> String {
        let mut out = retry(self.config.retry.as_millis());
        match start {
            Start::Live => out += &id_frame(&self.head),
            Start::After(after) => {
                let from = after.replay_from();
                self.phase = Phase::Replaying {
                    read: self.read_page(from.clone()),
                    from,
                    after,
                };
            }
            Start::Unknown => out += &self.reset("Last-Event-ID is not a position of this stream"),
            Start::NoPosition => {
                out += &self.reset(
                    "the stream this client had gave it no position to resume from (its \
                     events have none); reload your state, live events follow",
                )
            }
            Start::NoJournal(crate::Tier::Logical) => {
                out += &self.reset(
                    "resuming from Last-Event-ID is not possible on Tier::Logical: it has no \
                     journal to replay from (its replication slot moves past what was \
                     delivered); reload your state, live events follow",
                )
            }
            Start::NoJournal(tier) => {
                out += &self.reset(&format!(
                    "resuming from Last-Event-ID is not possible on Tier::{tier:?}: it has no \
                     journal to replay from; reload your state, live events follow"
                ))
            }
        }
        out
    }

    /// A `reset` frame: its `id:` is the stream's head, so that a client that drops again
    /// before its next event resumes from there, not from the position that was reset.
    fn reset(&mut self, reason: &str) -> String {
        Counters::add(&self.config.counters.resets, 1);
        let data = serde_json::json!({ "reason": reason }).to_string();
        frame(Some(&self.head), Some("reset"), &data)
    }

    /// Reads the replay's page that starts at `from` (when polled).
    fn read_page(&self, from: ReplayFrom) -> PageRead {
        let notifier = self.config.notifier.clone();
        let channels = self.channels.clone();
        let limit = self.config.replay_page;
        Box::pin(async move {
            let all = notifier.journal_channels();
            let read = notifier
                .dialect()
                .replay(from, channels, all, limit)
                .await?;
            Ok(match read {
                Replay::Rows { rows, next, fence } => {
                    let store = crate::overflow::guarded(notifier.dialect().overflow_store());
                    let events =
                        crate::decoder::decode_replayed(rows, notifier.channel_set(), &*store)
                            .await;
                    Page::Rows {
                        events,
                        next,
                        fence,
                    }
                }
                Replay::TooOld => Page::TooOld,
                Replay::Unsupported => Page::Unsupported,
            })
        })
    }

    /// What to send for a page read from `from`: the client's events on it; when there are
    /// none, an `id:` alone naming how far the replay got (where the dialect can say), so
    /// that a client that drops meanwhile resumes from there rather than from the start of a
    /// replay that may never reach its next event before the client drops again. Empty when
    /// there is nothing to send.
    fn replayed(
        &mut self,
        page: crate::error::Result<Page>,
        from: &ReplayFrom,
        after: Position,
    ) -> Option<String> {
        let notifier = &self.config.notifier;
        match page {
            Ok(Page::Rows {
                events,
                next,
                fence,
            }) => {
                let mut out = String::new();
                for event in &events {
                    if after.has(event) || !self.selects(event) {
                        continue;
                    }
                    Counters::add(&self.config.counters.replayed, 1);
                    Counters::add(&self.config.counters.events, 1);
                    out += &event_frame(event);
                }
                if out.is_empty() {
                    if let Some(progress) = progress(from, &after, &events, next.is_none(), &fence)
                    {
                        out += &id_frame(&progress.to_string());
                    }
                }
                self.floor = Some(fence);
                if let Some(from) = next {
                    self.phase = Phase::Replaying {
                        read: self.read_page(from.clone()),
                        from,
                        after,
                    };
                }
                Some(out)
            }
            Ok(Page::TooOld) => {
                Some(self.reset(
                    "the events after Last-Event-ID are no longer in the journal (retention)",
                ))
            }
            Ok(Page::Unsupported) => Some(self.reset(&format!(
                "resuming from Last-Event-ID is not supported on {}",
                notifier.dialect_name()
            ))),
            Err(e) => {
                // The client reconnects with the last id it got and tries again.
                log::error!("sqlnotify: reading the journal for a client that resumes: {e}");
                self.phase = Phase::Done;
                None
            }
        }
    }

    /// The position of a live event, as this client has it. After a PostgreSQL replay the
    /// client has every transaction the replay's snapshot saw — also those the listener, if
    /// it lags, delivers only later, in the same read as this event or after it: the snapshot
    /// of what it had before this event's read is the later of the two (`src/read_point.rs`),
    /// so a resume from here does not send those again.
    ///
    /// On MySQL the same for the set of ids it has: the listener's, and the replay's.
    fn position(&self, event: &ChangeEvent) -> Option<Position> {
        let mut position = Position::of(event)?;
        match (position.read.as_mut(), self.floor.as_ref()) {
            (Some(ReadAt::Snapshots { before, .. }), Some(floor)) => {
                if let Some(replayed) = floor.postgres_text() {
                    *before = later_snapshot(before, &replayed).to_string();
                }
            }
            (Some(ReadAt::Cursor(read)), Some(Fence::Set(replayed))) => {
                *read = read.union(replayed);
            }
            _ => {}
        }
        Some(position)
    }

    /// Whether a granted subscription selects `event` (a journal row read for a resume).
    fn selects(&self, event: &ChangeEvent) -> bool {
        self.routes.iter().any(|(channel, filters)| {
            channel == event.channel() && filters.iter().all(|f| f.matches(event))
        })
    }

    async fn live(&mut self) -> Option<String> {
        // From here on, under `Disconnect`, the registry cuts this client off rather than drop
        // its events (before, while it read the journal, a loss is checked against the replay).
        self.events.events().arm();
        loop {
            let received = tokio::select! {
                biased;
                changed = self.shutdown.changed() => {
                    // Shut down, or the endpoint is gone.
                    let _ = changed;
                    self.phase = Phase::Done;
                    return None;
                }
                received = self.events.events().next() => received,
                _ = self.heartbeat.tick() => {
                    Counters::add(&self.config.counters.heartbeats, 1);
                    return Some(comment("heartbeat"));
                }
            };
            match received {
                Received::Event { event, in_order } => {
                    if self
                        .floor
                        .as_ref()
                        .is_some_and(|floor| floor.covers(&event))
                    {
                        continue;
                    }
                    Counters::add(&self.config.counters.events, 1);
                    // An event that overtook an older one (`KeepLatestPerKey`) goes without an
                    // `id:`: the client keeps its last id, and a resume from it sends this one
                    // again rather than skip the older one.
                    let position = if in_order {
                        self.position(&event)
                    } else {
                        None
                    };
                    return Some(event_frame_at(&event, position));
                }
                Received::Lost(lost) => {
                    if self.floor.as_ref().is_some_and(|floor| match floor {
                        Fence::Journal { head } => lost.newest.is_some_and(|n| n <= *head),
                        // Which transactions the lost events were of is not known: counted
                        // as lost (a lag notice), though the replay may have sent them.
                        _ => false,
                    }) {
                        // Waiting live events the journal replay sent already.
                        continue;
                    }
                    let dropped = lost.count;
                    Counters::add(&self.config.counters.lost, dropped);
                    if self.config.slow_client == SlowClient::Disconnect {
                        // Counted once: here, or by the hook of a cut the registry reported
                        // first (a loss taken while it cuts the stream off is the cut's).
                        if self.events.events().claim_report() {
                            Counters::add(&self.config.counters.slow_disconnects, 1);
                            log::debug!(
                                "sqlnotify: closing the event stream of a client too slow for its buffer ({dropped} events lost)"
                            );
                        }
                        self.phase = Phase::Done;
                        return None;
                    }
                    Counters::add(&self.config.counters.lag_notices, 1);
                    let data = serde_json::json!({ "dropped": dropped }).to_string();
                    return Some(frame(None, Some("lag"), &data));
                }
                // Cut off by the registry (`Disconnect`), and counted there.
                Received::Cut | Received::Closed => {
                    self.phase = Phase::Done;
                    return None;
                }
            }
        }
    }
}

/// Where a client stands after a replay page read from `from` that sent it nothing (`events`:
/// the page's events on its channels; `last`: the replay's last page; `fence`: what the
/// replay read so far): a position that has every event up to the page's end that it needs,
/// and none that it lacks — or `None` where the page says nothing beyond what the client has.
///
/// * SQLite (a journal in commit order): the last journal row the page read, on any channel.
/// * MySQL / MariaDB: the set of ids the replay has read, this page's included.
/// * PostgreSQL: the position of the page's last row (its read point is that of the read the
///   listener would have made); after the last page, the replay's snapshot (`0@0@S@S`: every
///   transaction it saw).
fn progress(
    from: &ReplayFrom,
    after: &Position,
    events: &[ChangeEvent],
    last: bool,
    fence: &Fence,
) -> Option<Position> {
    match (from, fence) {
        (ReplayFrom::Journal { cursor, .. }, Fence::Journal { head }) => {
            // Past the rows the page started after, and past the client's own position
            // (`17.2` is re-read from row 17: a page that read only row 17 is no progress).
            (*head > *cursor && *head > after.sequence).then_some(Position {
                sequence: *head,
                part: 0,
                read: None,
            })
        }
        (ReplayFrom::Cursor { .. }, Fence::Set(read)) => Some(Position {
            sequence: read.high,
            part: 0,
            read: Some(ReadAt::Cursor(read.clone())),
        }),
        (ReplayFrom::Read { .. }, fence) if last => fence
            .postgres_text()
            .map(|snapshot| Position::head(Head::Snapshot(snapshot))),
        (ReplayFrom::Read { .. }, _) => events.last().and_then(Position::of),
        _ => None,
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.config
            .counters
            .clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!(crate::metrics::SSE_CLIENTS).decrement(1.0);
    }
}
