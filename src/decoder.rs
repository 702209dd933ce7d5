//! The decoder actor: turns [`RawNotification`]s into [`ChangeEvent`]s and passes them, in
//! order, to the registry.
//!
//! A payload that is a reference to an overflow row is resolved here; while the row is being
//! fetched the decoder handles nothing else (`ctx.wait`), so commit order is kept. A payload
//! that cannot be decoded — someone else NOTIFYing garbage on our channel — is logged, counted
//! and dropped. A notification the listener decoded itself (the logical tier reads no
//! payload: `RawNotification::decoded`) is taken as it is. The decoder also expires old
//! overflow rows on a schedule.
//!
//! An overflow reference comes once: every trigger run (and custom event) writes its row
//! under a fresh random token, and a NOTIFY reaches a listener once. A reference the decoder
//! has already resolved or started resolving (of the last [`SEEN_REFERENCES`]) is a replay —
//! any role that can LISTEN observes a signed reference and may send it again with
//! `pg_notify`, and its signature still verifies — so it is dropped unfetched and counted in
//! `replayed`: otherwise each copy would fetch and hold the whole row again for one unit of
//! in-flight budget (`take_room` gives an overflow row only the room there is).
//!
//! A statement-capture journal row (a JSON array of rows) becomes one event per row. The
//! listener took [`RawNotification::events`] units of in-flight budget for it; the decoder
//! gives back whatever no event will carry (rows that did not decode), so the budget and the
//! settled count stay exact whatever the payload holds.

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::Semaphore;

use crate::throttle::Throttled;

use crate::event::{ChangeEvent, Channel, Channels, Extra, RawNotification};
use crate::lifecycle::{Flush, Shutdown};
use crate::overflow::OverflowStore;
use crate::payload::{decode, decode_rows, Decoded};
use crate::pipeline::Weight;
use crate::registry::{Registry, Route};
use crate::stats::Counters;
use crate::status::StatusEvent;

/// Overflow retention: how long overflow rows are kept, and how often old ones are deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retention {
    pub keep: Duration,
    pub every: Duration,
}

/// How many overflow references (channel and token) the decoder remembers to recognise a
/// replay: the most recent ones, the oldest forgotten first. About 6 MiB when full.
const SEEN_REFERENCES: usize = 65_536;

/// An overflow reference: the channel it arrived on and its token's 128 bits.
#[derive(Clone)]
struct Reference(Arc<Channel>, u128);

impl PartialEq for Reference {
    fn eq(&self, other: &Self) -> bool {
        self.1 == other.1 && self.0.name() == other.0.name()
    }
}

impl Eq for Reference {}

impl Hash for Reference {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.name().hash(state);
        self.1.hash(state);
    }
}

/// The overflow references resolved or being resolved, the most recent [`SEEN_REFERENCES`].
#[derive(Default)]
struct Seen {
    order: VecDeque<Reference>,
    set: HashSet<Reference>,
}

impl Seen {
    /// Records `token` (a reference in canonical UUID form, as the payload decoder passes
    /// them) on `channel`; false if it was already there: a replay.
    fn first(&mut self, channel: &Arc<Channel>, token: &str) -> bool {
        let bits = token
            .bytes()
            .filter(|b| *b != b'-')
            .try_fold(0u128, |bits, b| {
                Some(bits << 4 | u128::from(char::from(b).to_digit(16)?))
            });
        // Not a token (the payload decoder passes none such): nothing to compare, fetched.
        let Some(bits) = bits else {
            return true;
        };
        let reference = Reference(channel.clone(), bits);
        if self.set.contains(&reference) {
            return false;
        }
        // The oldest goes first, so neither collection ever grows past the bound.
        if self.order.len() >= SEEN_REFERENCES {
            if let Some(oldest) = self.order.pop_front() {
                self.set.remove(&oldest);
            }
        }
        self.set.insert(reference.clone());
        self.order.push_back(reference);
        true
    }
}

/// Decodes notifications. Started by the notifier.
pub(crate) struct Decoder {
    channels: Arc<Channels>,
    budget: Arc<Semaphore>,
    /// How payloads weigh in `budget` (for overflow rows, whose size only the fetch tells).
    weight: Weight,
    store: Arc<dyn OverflowStore>,
    registry: Addr<Registry>,
    stats: Arc<Counters>,
    retention: Retention,
    /// Units of every notification taken so far: the ordinal of the next one's first event.
    units: u64,
    /// Units no event will carry, not yet sent to the registry to be settled in order.
    skipped: u64,
    /// When the retention purge running now started: a tick meanwhile passes (a purge that
    /// waits for a lock would otherwise have one more connection waiting beside it at every
    /// tick), and says so.
    purging: Option<std::time::Instant>,
    /// Overflow references already resolved or being resolved: a repeat is a replay.
    seen: Seen,
    /// The warnings about replayed references, missing overflow rows and failed reads.
    replay_logged: Throttled,
    missing_logged: Throttled,
    failed_logged: Throttled,
}

impl Decoder {
    pub fn new(
        channels: Arc<Channels>,
        store: Arc<dyn OverflowStore>,
        registry: Addr<Registry>,
        stats: Arc<Counters>,
        retention: Retention,
        budget: Arc<Semaphore>,
        weight: Weight,
    ) -> Self {
        Decoder {
            channels,
            budget,
            weight,
            store,
            registry,
            stats,
            retention,
            units: 0,
            skipped: 0,
            purging: None,
            seen: Seen::default(),
            replay_logged: Throttled::default(),
            missing_logged: Throttled::default(),
            failed_logged: Throttled::default(),
        }
    }

    /// Decodes `queue` in order. On an overflow reference it sends what it has, waits for the
    /// row (blocking this actor's mailbox), and continues with the rest afterwards.
    fn process(&mut self, mut queue: VecDeque<RawNotification>, ctx: &mut Context<Self>) {
        let mut events = Vec::with_capacity(queue.len());
        // The channel of the notification before: a batch's are mostly one channel's.
        let mut last: Option<Arc<Channel>> = None;
        while let Some(mut raw) = queue.pop_front() {
            let start = self.units;
            self.units += u64::from(raw.events);
            let channel = match &last {
                Some(channel) if channel.name() == &*raw.channel => channel.clone(),
                _ => {
                    let Some(channel) = self.channels.get(&raw.channel).cloned() else {
                        self.malformed(&raw, "not a channel of this notifier");
                        continue;
                    };
                    last = Some(channel.clone());
                    channel
                }
            };
            // Only a journal row can hold a statement's rows; a NOTIFY payload never does.
            if raw.sequence.is_some() && raw.payload.starts_with('[') {
                self.expand(&raw, start, channel, &mut events);
                continue;
            }
            let decoded = match raw.decoded.take() {
                Some(decoded) => Ok(*decoded),
                None => decode(&raw.payload, &channel),
            };
            if decoded.is_ok() && raw.events > 1 {
                // One object: the row's other units of budget carry nothing.
                self.give_back(u64::from(raw.events - 1));
                raw.events = 1;
            }
            match decoded {
                Ok(Decoded::Row {
                    id,
                    extra,
                    truncated,
                    change,
                }) => {
                    events.push(
                        ChangeEvent::new(channel, id, extra, &raw, truncated)
                            .with_change(change)
                            .weighing(raw.extra_units)
                            .at(start),
                    );
                }
                Ok(Decoded::Overflow { reference, id }) => {
                    if !self.seen.first(&channel, &reference) {
                        self.replayed(&raw, &reference);
                        continue;
                    }
                    self.send(std::mem::take(&mut events));
                    let fetch = self
                        .store
                        .fetch(channel.name().to_string(), reference.clone());
                    ctx.wait(fetch.into_actor(self).map(move |result, act, ctx| {
                        act.resolved(channel, reference, id, (raw, start), result);
                        act.process(queue, ctx);
                    }));
                    return;
                }
                Err(reason) => self.malformed(&raw, &reason),
            }
        }
        self.send(events);
    }

    fn resolved(
        &mut self,
        channel: Arc<Channel>,
        reference: String,
        id: crate::Key,
        (raw, start): (RawNotification, u64),
        result: crate::Result<Option<String>>,
    ) {
        let event = match result {
            Ok(Some(payload)) => match decode(&payload, &channel) {
                Ok(Decoded::Row {
                    id,
                    extra,
                    truncated,
                    change,
                }) => {
                    Counters::add(&self.stats.overflow_resolved, 1);
                    let extra_units = raw.extra_units + self.take_room(&payload, &raw);
                    ChangeEvent::new(channel, id, extra, &raw, truncated)
                        .with_change(change)
                        .weighing(extra_units)
                }
                Ok(Decoded::Overflow { .. }) => {
                    return self.malformed(&raw, "overflow row is itself a reference");
                }
                Err(reason) => {
                    return self.malformed(&raw, &format!("overflow row {reference}: {reason}"))
                }
            },
            Ok(None) => {
                if self.missing_logged.due() {
                    log::warn!(
                        "sqlnotify: overflow row {reference} for {} is gone (retention expired?, \
                         or a reference someone else sent on an unsigned channel); delivering the \
                         key only (counted in stats().overflow_missing; further ones are logged at \
                         most once a minute)",
                        channel.name()
                    );
                }
                Counters::add(&self.stats.overflow_missing, 1);
                ChangeEvent::new(channel, id, Extra::default(), &raw, true)
                    .weighing(raw.extra_units)
            }
            Err(e) => {
                if self.failed_logged.due() {
                    log::error!(
                        "sqlnotify: cannot read overflow row {reference} for {}: {e}; delivering \
                         the key only (counted in stats().overflow_missing; further ones are \
                         logged at most once a minute)",
                        channel.name()
                    );
                }
                Counters::add(&self.stats.overflow_missing, 1);
                ChangeEvent::new(channel, id, Extra::default(), &raw, true)
                    .weighing(raw.extra_units)
            }
        };
        self.send(vec![event.at(start)]);
    }

    /// Turns a statement-capture journal row into one event per row, in order.
    fn expand(
        &mut self,
        raw: &RawNotification,
        start: u64,
        channel: Arc<Channel>,
        events: &mut Vec<ChangeEvent>,
    ) {
        let rows = match decode_rows(&raw.payload, &channel) {
            Ok(rows) if rows.len() <= raw.events as usize => rows,
            Ok(rows) => {
                let reason = format!(
                    "journal row holds {} rows but says {} (budget accounting would break)",
                    rows.len(),
                    raw.events
                );
                return self.malformed(raw, &reason);
            }
            Err(reason) => return self.malformed(raw, &reason),
        };
        let rows_len = rows.len();
        let mut carried = 0;
        // The row's weight goes with its events, the remainder with the first.
        let (share, mut remainder) = match raw.extra_units.checked_div(rows_len as u32) {
            Some(share) => (share, raw.extra_units % rows_len as u32),
            None => (0, raw.extra_units),
        };
        for (part, row) in (0u32..).zip(rows) {
            match row {
                Ok(Decoded::Row {
                    id,
                    extra,
                    truncated,
                    change,
                }) => {
                    let event = ChangeEvent::new(channel.clone(), id, extra, raw, truncated)
                        .with_change(change)
                        .weighing(share + std::mem::take(&mut remainder));
                    events.push(event.placed(start, part));
                    carried += 1;
                }
                other => {
                    let reason = match other {
                        Err(reason) => reason,
                        Ok(_) => "overflow reference inside a statement payload".into(),
                    };
                    Counters::add(&self.stats.malformed, 1);
                    self.stats.metrics.malformed.increment(1);
                    self.budget
                        .add_permits((share + std::mem::take(&mut remainder)) as usize);
                    log::warn!(
                        "sqlnotify: dropping a malformed row of journal row {:?} on channel {:?}: {reason}",
                        raw.sequence,
                        raw.channel
                    );
                }
            }
        }
        if rows_len == 0 {
            return self.malformed(raw, "it holds no row");
        }
        // The row's last-of-transaction mark belongs to its last event only.
        if carried > 1 {
            let end = events.len();
            for event in &mut events[end - carried as usize..end - 1] {
                event.set_last_in_transaction(false);
            }
        }
        self.give_back(u64::from(raw.events) - carried);
    }

    /// Returns `units` of in-flight budget that no event will carry; the registry counts them
    /// settled with the next events it routes, after every event before them.
    fn give_back(&mut self, units: u64) {
        if units > 0 {
            self.budget.add_permits(units as usize);
            self.skipped += units;
        }
    }

    fn send(&mut self, events: Vec<ChangeEvent>) {
        if !events.is_empty() || self.skipped > 0 {
            let skipped = std::mem::take(&mut self.skipped);
            self.registry.do_send(Route { events, skipped });
        }
    }

    /// Units of in-flight budget for an overflow row's `payload` (fetched for `raw`) beyond
    /// what `raw` carries, as far as the budget has room now: waiting here could wait for
    /// units held by notifications behind this one in the decoder's own mailbox. So an
    /// overflow row weighs what its size says when the pipeline has room, less when it is full.
    fn take_room(&self, payload: &str, raw: &RawNotification) -> u32 {
        let want = self.weight.extra(payload.len(), raw.events);
        let want = want.saturating_sub(raw.extra_units);
        let room = u32::try_from(self.budget.available_permits()).unwrap_or(u32::MAX);
        match self.budget.try_acquire_many(want.min(room)) {
            Ok(permits) => {
                permits.forget();
                want.min(room)
            }
            Err(_) => 0,
        }
    }

    /// Drops `raw`, a repeat of overflow reference `reference` (see the module docs), unread:
    /// counted in `replayed`, its units of in-flight budget given back.
    fn replayed(&mut self, raw: &RawNotification, reference: &str) {
        Counters::add(&self.stats.replayed, 1);
        self.give_back(u64::from(raw.events));
        self.budget.add_permits(raw.extra_units as usize);
        if self.replay_logged.due() {
            log::warn!(
                "sqlnotify: dropping a repeat of overflow reference {reference} on channel {:?}: \
                 a notification reaches a listener once, so someone sent it again (counted in \
                 stats().replayed; further ones are logged at most once a minute)",
                raw.channel
            );
        }
    }

    fn malformed(&mut self, raw: &RawNotification, reason: &str) {
        Counters::add(&self.stats.malformed, 1);
        self.stats.metrics.malformed.increment(1);
        // No event will carry this notification's units of in-flight budget: give them back
        // (its weight beyond one per event settles nothing: only the budget takes it).
        self.give_back(u64::from(raw.events));
        self.budget.add_permits(raw.extra_units as usize);
        let preview: String = raw.payload.chars().take(200).collect();
        log::warn!(
            "sqlnotify: dropping malformed notification on channel {:?}: {reason} (payload: {preview:?})",
            raw.channel
        );
    }
}

impl Actor for Decoder {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.retention.every, |act, ctx| {
            if let Some(started) = act.purging {
                log::warn!(
                    "sqlnotify: the retention purge started {:.0?} ago is still running \
                     (waiting for a lock?); the next one waits for it",
                    started.elapsed()
                );
                return;
            }
            act.purging = Some(std::time::Instant::now());
            let purge = act.store.purge(act.retention.keep);
            ctx.spawn(purge.into_actor(act).map(|result, act, _| {
                act.purging = None;
                match result {
                    Ok(0) => {}
                    Ok(n) => log::debug!("sqlnotify: deleted {n} expired overflow rows"),
                    Err(e) => log::warn!("sqlnotify: could not delete expired overflow rows: {e}"),
                }
            }));
        });
    }
}

/// Notifications read by a listener, in the order they were committed. The sender must hold
/// one unit of the notifier's in-flight budget per notification (listeners acquire them
/// before reading on); the pipeline gives each back once its event is handed over or dropped.
#[derive(Debug)]
pub(crate) struct RawBatch(pub Vec<RawNotification>);

impl Message for RawBatch {
    type Result = ();
}

impl Handler<RawBatch> for Decoder {
    type Result = ();

    fn handle(&mut self, RawBatch(batch): RawBatch, ctx: &mut Context<Self>) {
        let received = batch.iter().map(|raw| u64::from(raw.events)).sum();
        Counters::add(&self.stats.received, received);
        self.stats.metrics.received.increment(received);
        self.process(batch.into(), ctx);
    }
}

impl Handler<StatusEvent> for Decoder {
    type Result = ();

    /// Status travels through the decoder so it stays in order with the events around it.
    fn handle(&mut self, status: StatusEvent, _: &mut Context<Self>) {
        self.registry.do_send(status);
    }
}

impl Handler<Flush> for Decoder {
    type Result = ResponseFuture<()>;

    /// Resolves once every notification received before it has been routed and handled.
    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        let registry = self.registry.clone();
        Box::pin(async move {
            let _ = registry.send(Flush).await;
        })
    }
}

impl Handler<Shutdown> for Decoder {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Notifications read outside the pipeline (journal rows a client that resumes asks for)
/// decoded into events the way the decoder decodes them: statement rows expanded (each event
/// placed at its row index), overflow references resolved through `store` (the key only when
/// the row is gone), malformed payloads and rows logged and skipped. Nothing is counted in the
/// pipeline's stats: these events never went through it.
#[cfg_attr(not(feature = "web"), allow(dead_code))]
pub(crate) async fn decode_replayed(
    raws: Vec<RawNotification>,
    channels: &Channels,
    store: &dyn OverflowStore,
) -> Vec<ChangeEvent> {
    let skip = |raw: &RawNotification, reason: &str| {
        log::warn!(
            "sqlnotify: skipping a malformed journal row {:?} on channel {:?} while replaying: {reason}",
            raw.sequence,
            raw.channel
        );
    };
    let mut events = Vec::with_capacity(raws.len());
    for raw in raws {
        let Some(channel) = channels.get(&raw.channel).cloned() else {
            continue;
        };
        if raw.sequence.is_some() && raw.payload.starts_with('[') {
            match decode_rows(&raw.payload, &channel) {
                Ok(rows) => {
                    for (part, row) in (0u32..).zip(rows) {
                        match row {
                            Ok(Decoded::Row {
                                id,
                                extra,
                                truncated,
                                change,
                            }) => events.push(
                                ChangeEvent::new(channel.clone(), id, extra, &raw, truncated)
                                    .with_change(change)
                                    .placed(0, part),
                            ),
                            Ok(Decoded::Overflow { .. }) => {
                                skip(&raw, "overflow reference inside a statement payload")
                            }
                            Err(reason) => skip(&raw, &reason),
                        }
                    }
                }
                Err(reason) => skip(&raw, &reason),
            }
            continue;
        }
        let event = match decode(&raw.payload, &channel) {
            Ok(Decoded::Row {
                id,
                extra,
                truncated,
                change,
            }) => ChangeEvent::new(channel, id, extra, &raw, truncated).with_change(change),
            Ok(Decoded::Overflow { reference, id }) => {
                let fetched = store.fetch(channel.name().to_string(), reference).await;
                match fetched.ok().flatten().map(|p| decode(&p, &channel)) {
                    Some(Ok(Decoded::Row {
                        id,
                        extra,
                        truncated,
                        change,
                    })) => {
                        ChangeEvent::new(channel, id, extra, &raw, truncated).with_change(change)
                    }
                    _ => ChangeEvent::new(channel, id, Extra::default(), &raw, true),
                }
            }
            Err(reason) => {
                skip(&raw, &reason);
                continue;
            }
        };
        events.push(event);
    }
    events
}

#[cfg(test)]
mod tests {
    //! Ordering without a database: an in-memory overflow store that answers after a delay,
    //! and a registry whose subscriber is a bounded channel.

    use std::collections::HashMap;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;

    use futures_util::future::BoxFuture;
    use serde_json::json;

    use super::*;
    use crate::operation::Operation;
    use crate::registry::Subscribe;
    use crate::subscriber::Sink;
    use crate::subscription::Subscription;
    use crate::tier::Tier;

    const BUDGET: usize = 64;

    /// Overflow rows in memory; each fetch answers after `delay` and is recorded.
    struct SlowStore {
        rows: HashMap<(String, String), String>,
        delay: Duration,
        fetched: Mutex<Vec<String>>,
    }

    impl OverflowStore for Arc<SlowStore> {
        fn fetch(
            &self,
            channel: String,
            reference: String,
        ) -> BoxFuture<'static, crate::Result<Option<String>>> {
            let store = self.clone();
            Box::pin(async move {
                // Stands for the round trip to the database.
                tokio::time::sleep(store.delay).await;
                store.fetched.lock().unwrap().push(reference.clone());
                if reference == BROKEN {
                    return Err(crate::Error::NotRunning);
                }
                Ok(store.rows.get(&(channel, reference)).cloned())
            })
        }

        fn purge(&self, _retention: Duration) -> BoxFuture<'static, crate::Result<u64>> {
            Box::pin(async { Ok(0) })
        }
    }

    const STORED: &str = "00000000-0000-4000-8000-000000000001";
    const STORED_TOO: &str = "00000000-0000-4000-8000-000000000002";
    const MISSING: &str = "00000000-0000-4000-8000-000000000003";
    const BROKEN: &str = "00000000-0000-4000-8000-000000000004";

    fn reference(token: &str, id: i64) -> String {
        json!({ "__sqlnotify": { "overflow": token }, "id": id }).to_string()
    }

    fn row(id: i64, v: &str) -> String {
        json!({ "id": id, "v": v }).to_string()
    }

    struct Pipeline {
        decoder: Addr<Decoder>,
        stats: Arc<Counters>,
        budget: Arc<Semaphore>,
        events: crossbeam_channel::Receiver<ChangeEvent>,
        store: Arc<SlowStore>,
    }

    async fn pipeline(delay: Duration) -> Pipeline {
        pipeline_weighing(delay, Weight::new(BUDGET, 64 << 20)).await
    }

    /// [`pipeline`] whose payloads weigh by `weight`.
    async fn pipeline_weighing(delay: Duration, weight: Weight) -> Pipeline {
        let channels = Arc::new(Channels::new(
            [Channel {
                extra_columns: vec!["v".into()],
                ..(*crate::event::test_channel(Tier::Notify)).clone()
            }],
            "public",
        ));
        let rows = [
            (STORED, row(2, "from overflow")),
            (STORED_TOO, row(5, "also from overflow")),
        ]
        .into_iter()
        .map(|(token, payload)| (("c".to_string(), token.to_string()), payload))
        .collect();
        let store = Arc::new(SlowStore {
            rows,
            delay,
            fetched: Mutex::new(Vec::new()),
        });
        let stats = Arc::new(Counters::default());
        let budget = Arc::new(Semaphore::new(BUDGET));
        let registry = Registry::new(channels.clone(), stats.clone(), budget.clone()).start();
        let (tx, events) = crossbeam_channel::bounded(BUDGET);
        registry
            .send(Subscribe::with_sink(
                Subscription::new("t", Operation::Insert),
                Sink::Channel(tx),
            ))
            .await
            .unwrap()
            .unwrap();
        let retention = Retention {
            keep: Duration::from_secs(3600),
            every: Duration::from_secs(3600),
        };
        let decoder = Decoder::new(
            channels,
            Arc::new(store.clone()),
            registry,
            stats.clone(),
            retention,
            budget.clone(),
            weight,
        )
        .start();
        Pipeline {
            decoder,
            stats,
            budget,
            events,
            store,
        }
    }

    impl Pipeline {
        /// Hands `payloads` (on channel `c`) to the decoder the way a listener does.
        async fn send(&self, payloads: Vec<String>) {
            let n = payloads.len();
            self.budget.acquire_many(n as u32).await.unwrap().forget();
            Counters::add(&self.stats.forwarded, n as u64);
            self.decoder.do_send(RawBatch(
                payloads
                    .into_iter()
                    .map(|p| RawNotification::new("c", p))
                    .collect(),
            ));
        }

        /// Everything delivered once all that was sent has been decoded and routed.
        async fn delivered(&self) -> Vec<(i64, Option<String>, bool)> {
            tokio::time::timeout(Duration::from_secs(10), self.decoder.send(Flush))
                .await
                .expect("the pipeline drains")
                .unwrap();
            self.events
                .try_iter()
                .map(|e| {
                    (
                        e.id().as_i64().unwrap(),
                        e.get("v").and_then(|v| v.as_str()).map(str::to_string),
                        e.is_truncated(),
                    )
                })
                .collect()
        }
    }

    fn plain(id: i64, v: &str) -> (i64, Option<String>, bool) {
        (id, Some(v.to_string()), false)
    }

    #[actix_rt::test]
    async fn events_leave_in_order_while_overflow_rows_are_fetched() {
        let p = pipeline(Duration::from_millis(30)).await;
        p.send(vec![
            row(1, "a"),
            reference(STORED, 2),
            row(3, "c"),
            reference(MISSING, 4),
        ])
        .await;
        // A second batch arrives while the first still waits for its fetches.
        p.send(vec![reference(STORED_TOO, 5), row(6, "f")]).await;
        p.send(vec![row(7, "g")]).await;
        assert_eq!(
            p.delivered().await,
            [
                plain(1, "a"),
                plain(2, "from overflow"),
                plain(3, "c"),
                (4, None, true),
                plain(5, "also from overflow"),
                plain(6, "f"),
                plain(7, "g"),
            ]
        );
        assert_eq!(
            *p.store.fetched.lock().unwrap(),
            [STORED, MISSING, STORED_TOO],
            "one fetch per reference, in order"
        );
        let stats = p.stats.snapshot();
        assert_eq!((stats.received, stats.delivered), (7, 7));
        assert_eq!((stats.overflow_resolved, stats.overflow_missing), (2, 1));
        assert_eq!((stats.malformed, stats.in_flight), (0, 0));
        assert_eq!(p.budget.available_permits(), BUDGET);
        assert_eq!(p.stats.settled.load(Ordering::Relaxed), 7);
    }

    #[actix_rt::test]
    async fn a_payloads_weight_goes_with_its_events_and_comes_back_whole() {
        // One unit per 4 bytes: an overflow row's fetch weighs what it brings too.
        let p = pipeline_weighing(Duration::from_millis(1), Weight::new(BUDGET, BUDGET * 4)).await;
        let weighing = |mut raw: RawNotification, events: u32, extra: u32| {
            raw.events = events;
            raw.extra_units = extra;
            raw
        };
        let statement = json!([{ "id": 2, "v": "b" }, 17, { "id": 3, "v": "c" }]).to_string();
        let batch = vec![
            weighing(RawNotification::new("c", row(1, "a")), 1, 3),
            weighing(RawNotification::new("c", "not json"), 1, 2),
            weighing(RawNotification::new("c", statement).with_sequence(1), 3, 7),
            RawNotification::new("c", reference(STORED, 4)),
        ];
        let (events, units) = (6, 6 + 3 + 2 + 7);
        p.budget.acquire_many(units).await.unwrap().forget();
        Counters::add(&p.stats.forwarded, events);
        p.decoder.do_send(RawBatch(batch));
        tokio::time::timeout(Duration::from_secs(10), p.decoder.send(Flush))
            .await
            .expect("the pipeline drains")
            .unwrap();
        let got: Vec<(i64, usize)> = (p.events.try_iter())
            .map(|e| (e.id().as_i64().unwrap(), e.units()))
            .collect();
        // The statement's 7 go 3 (with the remainder), 2 back with the bad row, 2.
        let fetched = 1 + row(2, "from overflow").len() / 4;
        assert_eq!(got, [(1, 4), (2, 4), (3, 3), (2, fetched)]);
        assert_eq!(p.budget.available_permits(), BUDGET, "every unit came back");
        assert_eq!(p.stats.settled.load(Ordering::Relaxed), events);
    }

    #[actix_rt::test]
    async fn a_failed_fetch_or_a_bad_payload_drops_nothing_else_and_keeps_the_order() {
        let p = pipeline(Duration::from_millis(10)).await;
        p.send(vec![
            row(1, "a"),
            "not json".into(),
            reference(BROKEN, 2),
            json!({ "v": "no key" }).to_string(),
            reference(STORED, 2),
            row(3, "c"),
        ])
        .await;
        assert_eq!(
            p.delivered().await,
            [
                plain(1, "a"),
                (2, None, true),
                plain(2, "from overflow"),
                plain(3, "c"),
            ]
        );
        let stats = p.stats.snapshot();
        assert_eq!(
            (stats.received, stats.delivered, stats.malformed),
            (6, 4, 2)
        );
        assert_eq!((stats.overflow_resolved, stats.overflow_missing), (1, 1));
        assert_eq!(
            p.budget.available_permits(),
            BUDGET,
            "malformed ones gave theirs back"
        );
    }

    #[actix_rt::test]
    async fn a_repeated_overflow_reference_is_fetched_once_delivered_once_and_counted() {
        let p = pipeline(Duration::from_millis(20)).await;
        // Repeats in the batch still waiting for the first one's fetch, and in a later batch.
        p.send(vec![
            reference(STORED, 2),
            reference(STORED, 2),
            row(3, "c"),
            reference(STORED, 9),
        ])
        .await;
        p.send(vec![reference(STORED, 2), row(4, "d")]).await;
        assert_eq!(
            p.delivered().await,
            [plain(2, "from overflow"), plain(3, "c"), plain(4, "d")]
        );
        assert_eq!(*p.store.fetched.lock().unwrap(), [STORED], "fetched once");
        let stats = p.stats.snapshot();
        assert_eq!((stats.received, stats.delivered), (6, 3));
        assert_eq!((stats.replayed, stats.overflow_resolved), (3, 1));
        assert_eq!((stats.malformed, stats.in_flight), (0, 0));
        assert_eq!(
            p.budget.available_permits(),
            BUDGET,
            "repeats gave theirs back"
        );
        assert_eq!(p.stats.settled.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn the_oldest_references_are_forgotten_past_the_bound() {
        let channel = crate::event::test_channel(Tier::Notify);
        let other = Arc::new(Channel {
            name: "d".into(),
            ..(*channel).clone()
        });
        let token = |n: usize| format!("00000000-0000-4000-8000-{n:012x}");
        let mut seen = Seen::default();
        assert!(seen.first(&channel, &token(0)));
        assert!(!seen.first(&channel, &token(0)), "a repeat");
        assert!(seen.first(&other, &token(0)), "another channel's token");
        for n in 1..SEEN_REFERENCES - 1 {
            assert!(seen.first(&channel, &token(n)));
        }
        assert_eq!(seen.order.len(), SEEN_REFERENCES);
        assert!(!seen.first(&channel, &token(0)), "still remembered");
        assert!(seen.first(&channel, &token(SEEN_REFERENCES)));
        assert_eq!(
            (seen.order.len(), seen.set.len()),
            (SEEN_REFERENCES, SEEN_REFERENCES)
        );
        assert!(seen.first(&channel, &token(0)), "the oldest was forgotten");
    }
}
