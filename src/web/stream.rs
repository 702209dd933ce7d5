//! One client's stream ([`Connection`]): the `retry:` field, then — for a client that resumes
//! — the journal after its `Last-Event-ID` page by page (or a `reset`), then live events,
//! `lag` notices and heartbeats, until the client goes, the endpoint shuts down or the
//! notifier stops.
//!
//! Resuming without a gap or a duplicate: the live subscriptions are made before the journal
//! is read, so a row committed meanwhile is in both; every live event at or below the last
//! journal row read is dropped. Journal ids are in commit order where a dialect resumes
//! (SQLite), so what is above that row arrives live, in order.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::builder::{Config, SlowClient};
use super::frame::{comment, event_frame, frame, retry, Position};
use super::stats::Counters;
use crate::dialect::Replay;
use crate::event::ChangeEvent;
use crate::filter::Filter;
use crate::registry::Unsubscribe;
use crate::stream_sink::{Received, StreamReceiver};
use crate::subscription::SubscriptionId;

/// Where the stream starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Start {
    /// Live events only (no `Last-Event-ID`).
    Live,
    /// After this position: the journal first.
    After(Position),
    /// A `Last-Event-ID` that is not one of ours: a `reset`, then live events.
    Unknown,
}

enum Phase {
    Start(Start),
    /// Reading the journal: the next page starts after journal id `cursor`; every row after
    /// `since` must still be there; events at or before `after` are the client's already.
    Replaying {
        since: i64,
        cursor: i64,
        after: Position,
    },
    Live,
    Done,
}

/// One client's stream: [`next`](Self::next) gives the text to send, chunk by chunk.
pub(crate) struct Connection {
    config: Arc<Config>,
    subscriptions: Vec<SubscriptionId>,
    events: StreamReceiver,
    /// The granted subscriptions' channels and filters (query filters included), to select
    /// journal rows as the registry selects live events.
    routes: Vec<(String, Vec<Filter>)>,
    phase: Phase,
    /// Live events at or below this journal id were sent from the journal.
    floor: Option<i64>,
    heartbeat: Interval,
    shutdown: watch::Receiver<bool>,
}

impl Connection {
    pub fn new(
        config: Arc<Config>,
        subscriptions: Vec<SubscriptionId>,
        events: StreamReceiver,
        routes: Vec<(String, Vec<Filter>)>,
        start: Start,
    ) -> Connection {
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + config.heartbeat, config.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let shutdown = config.shutdown.subscribe();
        Counters::add(&config.counters.clients, 1);
        Counters::add(&config.counters.connections, 1);
        metrics::gauge!(crate::metrics::SSE_CLIENTS).increment(1.0);
        Connection {
            config,
            subscriptions,
            events,
            routes,
            phase: Phase::Start(start),
            floor: None,
            heartbeat,
            shutdown,
        }
    }

    /// The next chunk of the stream; `None` when it ends.
    pub async fn next(&mut self) -> Option<String> {
        if *self.shutdown.borrow() {
            self.phase = Phase::Done;
        }
        match std::mem::replace(&mut self.phase, Phase::Live) {
            Phase::Done => {
                self.phase = Phase::Done;
                None
            }
            Phase::Start(start) => Some(self.start(start)),
            Phase::Replaying {
                since,
                cursor,
                after,
            } => self.replay(since, cursor, after).await,
            Phase::Live => self.live().await,
        }
    }

    fn start(&mut self, start: Start) -> String {
        let mut out = retry(self.config.retry.as_millis());
        match start {
            Start::Live => {}
            Start::After(after) => {
                // Row `after.sequence` is read again: the client may lack its later statement
                // rows. It must still be there when the client surely lacks some (`17.2` is
                // a statement's row); after `17` it may be gone (trimmed after the client
                // got it) — an ordinary row is one event. The one case this misses: the
                // first event of a statement's journal row received, the row trimmed by
                // retention before the client came back for the rest.
                let since = if after.part > 0 {
                    after.sequence - 1
                } else {
                    after.sequence
                };
                self.phase = Phase::Replaying {
                    since,
                    cursor: after.sequence - 1,
                    after,
                };
            }
            Start::Unknown => out += &self.reset("Last-Event-ID is not a position of this stream"),
        }
        out
    }

    fn reset(&mut self, reason: &str) -> String {
        Counters::add(&self.config.counters.resets, 1);
        let data = serde_json::json!({ "reason": reason }).to_string();
        frame(None, Some("reset"), &data)
    }

    async fn replay(&mut self, since: i64, cursor: i64, after: Position) -> Option<String> {
        let notifier = &self.config.notifier;
        let mut channels: Vec<String> = self.routes.iter().map(|(c, _)| c.clone()).collect();
        channels.sort();
        channels.dedup();
        let read = notifier
            .dialect()
            .replay(channels, since, cursor, self.config.replay_page)
            .await;
        match read {
            Ok(Replay::Rows { rows, last, done }) => {
                let store = notifier.dialect().overflow_store();
                let events =
                    crate::decoder::decode_replayed(rows, notifier.channel_set(), &*store).await;
                let mut out = String::new();
                for event in events {
                    if Position::of(&event).is_some_and(|p| p <= after) || !self.selects(&event) {
                        continue;
                    }
                    Counters::add(&self.config.counters.replayed, 1);
                    Counters::add(&self.config.counters.events, 1);
                    out += &event_frame(&event);
                }
                self.floor = Some(last);
                if !done {
                    self.phase = Phase::Replaying {
                        since: last,
                        cursor: last,
                        after,
                    };
                }
                if out.is_empty() {
                    // Nothing of this client's on that page: go on at once.
                    return Box::pin(self.next()).await;
                }
                Some(out)
            }
            Ok(Replay::TooOld) => {
                Some(self.reset(
                    "the events after Last-Event-ID are no longer in the journal (retention)",
                ))
            }
            Ok(Replay::Unsupported) => Some(self.reset(&format!(
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

    /// Whether a granted subscription selects `event` (a journal row read for a resume).
    fn selects(&self, event: &ChangeEvent) -> bool {
        self.routes.iter().any(|(channel, filters)| {
            channel == event.channel() && filters.iter().all(|f| f.matches(event))
        })
    }

    async fn live(&mut self) -> Option<String> {
        loop {
            let received = tokio::select! {
                biased;
                changed = self.shutdown.changed() => {
                    // Shut down, or the endpoint is gone.
                    let _ = changed;
                    self.phase = Phase::Done;
                    return None;
                }
                received = self.events.next() => received,
                _ = self.heartbeat.tick() => {
                    Counters::add(&self.config.counters.heartbeats, 1);
                    return Some(comment("heartbeat"));
                }
            };
            match received {
                Received::Event(event) => {
                    let position = event.sequence();
                    if self
                        .floor
                        .is_some_and(|floor| position.is_some_and(|p| p <= floor))
                    {
                        continue;
                    }
                    Counters::add(&self.config.counters.events, 1);
                    return Some(event_frame(&event));
                }
                Received::Lost(lost) => {
                    if self
                        .floor
                        .is_some_and(|floor| lost.newest.is_some_and(|n| n <= floor))
                    {
                        // Waiting live events the journal replay sent already.
                        continue;
                    }
                    let dropped = lost.count;
                    Counters::add(&self.config.counters.lost, dropped);
                    if self.config.slow_client == SlowClient::Disconnect {
                        Counters::add(&self.config.counters.slow_disconnects, 1);
                        log::debug!(
                            "sqlnotify: closing the event stream of a client too slow for its buffer ({dropped} events lost)"
                        );
                        self.phase = Phase::Done;
                        return None;
                    }
                    Counters::add(&self.config.counters.lag_notices, 1);
                    let data = serde_json::json!({ "dropped": dropped }).to_string();
                    return Some(frame(None, Some("lag"), &data));
                }
                Received::Closed => {
                    self.phase = Phase::Done;
                    return None;
                }
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let registry = self.config.notifier.registry();
        for id in self.subscriptions.drain(..) {
            registry.do_send(Unsubscribe(id));
        }
        self.config
            .counters
            .clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!(crate::metrics::SSE_CLIENTS).decrement(1.0);
    }
}
