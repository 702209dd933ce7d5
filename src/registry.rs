//! The registry actor: holds subscriptions and routes each decoded event to the subscribers
//! whose channel, operation and filters match.
//!
//! Subscriptions are added and removed by message ([`Subscribe`], [`Unsubscribe`]), so users
//! who wire actors themselves can talk to the registry's `Addr` directly. A subscription is
//! checked when it is made — an unwatched table/operation/label or a filter on a column the
//! channel does not carry is an error then, not a subscription that silently never fires.
//!
//! Events arrive from the decoder in commit order and are handed out in that order. Handing
//! over never blocks: an event a subscriber's mailbox cannot take waits in that subscriber's
//! buffer (under its overflow policy) and the registry retries — at once while the subscriber
//! is draining, every millisecond while it is stuck — so one slow subscriber never delays the
//! others unless its policy is to wait. Status messages go to status subscribers.
//!
//! Event streams (the web endpoint's clients, `src/stream_sink.rs`) never hold the notifier:
//! a client that stops reading is not polled any more (actix-web polls a response body only
//! while it can write), so it cannot be left to notice that it fell behind. A stream whose
//! reader is to be disconnected rather than lose events is cut here when one of its buffers is
//! full of events it was to get live ([`Registry::cut`]); and while the listener waits for in-flight budget, every stream
//! that has had events waiting for [`STUCK`] without taking one, its reader asking for
//! nothing meanwhile (`StreamSink::idle`), gives them back — cut, or under
//! a dropping policy, its waiting events dropped ([`Registry::relieve`]). Either way the
//! budget its events held comes back at once.
//!
//! Counting: an event a subscription selects is `delivered` once it is handed to the
//! subscriber (its mailbox, channel or closure host), or `dropped` if it never is — its
//! policy discarded it, its receiver was gone, or it was unsubscribed while the event waited.
//! Drops are reported per subscription in [`Status::Lagged`], at most once per lag interval
//! (the first drop at once, then what accumulated, when the interval has passed); what is still
//! unreported when a subscription ends or the notifier stops is reported then.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::join_all;
use tokio::sync::{oneshot, Semaphore};

use crate::closure_host::{ClosureHost, Outbox};
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Channel, Channels};
use crate::filter::Filter;
use crate::instruments::ChannelMetrics;
use crate::lifecycle::{Flush, Shutdown};
use crate::route_index::RouteIndex;
use crate::stats::Counters;
use crate::status::{Status, StatusEvent};
use crate::stream_sink::StreamReceiver;
use crate::subscriber::{Buffer, FnSubscriber, Refused, Sink, Ticket};
use crate::subscription::{OverflowPolicy, Subscription, SubscriptionId};

/// Retry interval while a subscriber's mailbox stays full.
const RETRY: Duration = Duration::from_millis(1);
/// Retries after a yield without progress before falling back to the timer.
const YIELD_RETRIES: u32 = 3;
/// Default shortest time between two `Lagged` notices for one subscription.
pub(crate) const LAG_INTERVAL: Duration = Duration::from_secs(1);
/// How long an event stream may have events waiting without taking one — its reader asking for
/// nothing meanwhile, not even a page of its journal replay — while the listener
/// waits for in-flight budget, before it gives them back ([`Registry::relieve`]): long enough
/// for a client that reads, however slowly, to take one; short enough that the notifier
/// pauses only briefly for clients that stopped reading.
pub(crate) const STUCK: Duration = Duration::from_secs(1);

struct Subscriber {
    id: SubscriptionId,
    /// Its channel's place in `Registry::routes`.
    route: usize,
    filters: Vec<Filter>,
    /// Being its channel index's candidate for an event means its filters match
    /// (`RouteIndex::settles`): they are not checked again.
    settled: bool,
    sink: Sink,
    buffer: Buffer,
    closed: bool,
    /// Listed in `Registry::attention`.
    listed: bool,
    /// When its last `Lagged` notice went out.
    lag_reported: Option<Instant>,
    /// Since when it has had events waiting without taking one (seen by `pump`).
    waiting_since: Option<Instant>,
}

/// The subscriptions of one channel.
struct ChannelRoute {
    /// Which of them an event can match, by the values their filters require.
    index: RouteIndex,
    /// How many of them have a receiver not known to be gone.
    open: usize,
    /// The channel's counters, and what routing the current batch added to them so far.
    metrics: ChannelMetrics,
    counted: RouteCounts,
}

impl ChannelRoute {
    fn new(channel: &str) -> Self {
        // The subscriptions to every channel are counted apart, as channel `*`.
        let label = if channel == EVERY_CHANNEL {
            "*"
        } else {
            channel
        };
        ChannelRoute {
            index: RouteIndex::default(),
            open: 0,
            metrics: ChannelMetrics::new(label),
            counted: RouteCounts::default(),
        }
    }
}

/// What routing a batch did on one channel, emitted to its metrics once per batch.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct RouteCounts {
    delivered: u64,
    filtered: u64,
    dropped: u64,
}

/// Where status messages go.
pub(crate) enum StatusSink {
    Recipient(Recipient<StatusEvent>),
    Fn(Addr<FnSubscriber<StatusEvent>>),
}

/// Routes events to subscribers. Started by the notifier; reach it with
/// [`Notifier::registry`](crate::Notifier::registry).
pub struct Registry {
    channels: Arc<Channels>,
    /// Each channel's place in `routes`.
    by_channel: HashMap<String, usize>,
    routes: Vec<ChannelRoute>,
    /// Every subscriber, in a slot that stays its own while it lives (`None`: free).
    slots: Vec<Option<Subscriber>>,
    free: Vec<usize>,
    by_id: HashMap<SubscriptionId, usize>,
    /// The subscriptions of each event stream, by its channel's key (`StreamSink::key`):
    /// what [`UnsubscribeStream`] removes.
    streams: HashMap<u64, Vec<SubscriptionId>>,
    /// The subscribers `pump` and lag reports look at — something buffered, drops not yet
    /// reported, or a receiver gone — by slot and id (an entry whose slot holds another
    /// subscription by now is stale and skipped). Idle subscribers are not here, so they cost
    /// nothing per event.
    attention: Vec<(usize, SubscriptionId)>,
    /// The routes whose `counted` the current batch added to.
    counted: Vec<usize>,
    /// Events handed to closures, sent to their hosts once per batch, retry or removal.
    outbox: Outbox,
    status: Vec<StatusSink>,
    next_id: u64,
    stats: Arc<Counters>,
    budget: Arc<Semaphore>,
    /// A retry is already scheduled.
    retry_pending: bool,
    /// Consecutive retries that handed nothing over.
    idle_retries: u32,
    /// Waiting for every buffer to drain (stop()).
    flush_waiters: Vec<oneshot::Sender<()>>,
    /// Shortest time between two `Lagged` notices for one subscription.
    lag_interval: Duration,
    /// The pending report of drops not yet announced: when it runs, and its handle.
    lag_timer: Option<(Instant, SpawnHandle)>,
    /// See [`STUCK`].
    stuck: Duration,
}

impl Registry {
    pub(crate) fn new(
        channels: Arc<Channels>,
        stats: Arc<Counters>,
        budget: Arc<Semaphore>,
    ) -> Self {
        Registry {
            channels,
            by_channel: HashMap::new(),
            routes: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::new(),
            streams: HashMap::new(),
            attention: Vec::new(),
            counted: Vec::new(),
            outbox: Outbox::default(),
            status: Vec::new(),
            next_id: 1,
            stats,
            budget,
            retry_pending: false,
            idle_retries: 0,
            flush_waiters: Vec::new(),
            lag_interval: LAG_INTERVAL,
            lag_timer: None,
            stuck: STUCK,
        }
    }

    /// Sets how long an event stream may be stuck (see [`STUCK`]).
    #[cfg(test)]
    fn stuck_after(mut self, stuck: Duration) -> Self {
        self.stuck = stuck;
        self
    }

    /// Sets the shortest time between two `Lagged` notices for one subscription.
    pub(crate) fn lag_interval(mut self, every: Duration) -> Self {
        self.lag_interval = every;
        self
    }

    fn add(&mut self, subscription: Subscription, sink: Sink) -> Result<SubscriptionId> {
        let channel = subscription.channel_in(&self.channels)?;
        let buffer = Buffer::new(subscription.policy, subscription.buffer);
        let name = channel.name().to_string();
        Ok(self.insert(&name, subscription.filters, sink, buffer))
    }

    fn insert(
        &mut self,
        channel: &str,
        filters: Vec<Filter>,
        sink: Sink,
        buffer: Buffer,
    ) -> SubscriptionId {
        let id = SubscriptionId(self.next_id);
        self.next_id += 1;
        let route = match self.by_channel.get(channel) {
            Some(&route) => route,
            None => {
                self.routes.push(ChannelRoute::new(channel));
                self.by_channel
                    .insert(channel.to_string(), self.routes.len() - 1);
                self.routes.len() - 1
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.routes[route].index.insert(slot, &filters);
        self.routes[route].open += 1;
        let stream = match &sink {
            Sink::Stream(stream) => Some(stream.key()),
            _ => None,
        };
        self.slots[slot] = Some(Subscriber {
            id,
            route,
            settled: RouteIndex::settles(&filters),
            filters,
            sink,
            buffer,
            closed: false,
            listed: false,
            lag_reported: None,
            waiting_since: None,
        });
        self.by_id.insert(id, slot);
        if let Some(key) = stream {
            self.streams.entry(key).or_default().push(id);
        }
        Counters::add(&self.stats.subscriptions, 1);
        log::debug!("sqlnotify: subscription {id} on {channel:?}");
        self.stats.has_subscriber.store(true, Ordering::Release);
        id
    }

    /// Routes one event, adding to `tally`. The event's units of in-flight budget go into a
    /// [`Ticket`] only if some buffer keeps the event; otherwise the caller gives them back.
    fn route(&mut self, event: ChangeEvent, tally: &mut Tally, found: &mut Found) {
        if let Some(sequence) = event.sequence() {
            tally.sequence = tally.sequence.max(sequence);
        }
        let channel = event.channel_arc();
        let own = match &found.last {
            Some((last, route)) if Arc::ptr_eq(last, channel) => *route,
            _ => {
                let route = self.by_channel.get(event.channel()).copied();
                found.last = Some((channel.clone(), route));
                route
            }
        };
        let mut considered = false;
        let mut unit = Unit {
            budget: &self.budget,
            units: event.units(),
            ticket: None,
        };
        for r in [own, found.every].into_iter().flatten() {
            let route = &mut self.routes[r];
            considered |= route.open > 0;
            let before = (tally.delivered, tally.filtered, tally.dropped);
            route.open -= offer(
                route,
                &mut self.slots,
                &mut self.attention,
                &mut self.outbox,
                &event,
                tally,
                &mut unit,
            );
            // Per channel, for its metrics: emitted once per batch (`emit_counted`).
            let idle = route.counted == RouteCounts::default();
            route.counted.delivered += tally.delivered - before.0;
            route.counted.filtered += tally.filtered - before.1;
            route.counted.dropped += tally.dropped - before.2;
            if idle && route.counted != RouteCounts::default() {
                self.counted.push(r);
            }
        }
        if !considered {
            tally.unrouted += 1;
        }
        if unit.ticket.is_none() {
            tally.release += event.units();
        }
        for key in std::mem::take(&mut tally.cuts) {
            self.cut(key);
        }
    }

    /// Where a batch's routing starts: no channel looked up yet.
    fn found(&self) -> Found {
        Found {
            last: None,
            every: self.by_channel.get(EVERY_CHANNEL).copied(),
        }
    }

    /// Adds what routing the batch counted per channel to the channels' metrics.
    fn emit_counted(&mut self) {
        for r in self.counted.drain(..) {
            let route = &mut self.routes[r];
            let counted = std::mem::take(&mut route.counted);
            for (counter, n) in [
                (&route.metrics.delivered, counted.delivered),
                (&route.metrics.filtered, counted.filtered),
                (&route.metrics.dropped, counted.dropped),
            ] {
                if n > 0 {
                    counter.increment(n);
                }
            }
        }
    }

    /// Sets the queued count (and moves the gauge of every notifier's queued events with it).
    fn set_queued(&self, queued: u64) {
        let before = self.stats.queued.swap(queued, Ordering::Relaxed);
        if before != queued {
            self.stats
                .metrics
                .queued
                .increment(queued as f64 - before as f64);
        }
    }

    /// Hands buffered events over; reports lag; schedules the next retry if needed. While
    /// the listener waits for budget, stuck event streams give theirs back first.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        if self.stats.budget_waiters.load(Ordering::Relaxed) > 0 {
            self.relieve(now);
        }
        let (mut progress, mut waiting, mut queued) = (false, false, 0);
        let (mut delivered, mut lost) = (0, 0);
        for &(slot, id) in &self.attention {
            let Some(s) = live(&mut self.slots, slot, id) else {
                continue;
            };
            let mut handed = 0;
            if !s.buffer.is_empty() && !s.closed {
                let gone;
                (handed, gone) = s.buffer.drain_into(&s.sink, &mut self.outbox);
                progress |= handed > 0;
                delivered += handed;
                let route = &mut self.routes[s.route];
                if handed > 0 {
                    route.metrics.delivered.increment(handed);
                }
                if let Some(n) = gone {
                    s.closed = true;
                    route.open -= 1;
                    lost += n;
                    route.metrics.dropped.increment(n);
                }
            }
            if !s.closed {
                waiting |= !s.buffer.is_empty();
                queued += s.buffer.len();
            }
            s.waiting_since = match s.waiting_since {
                _ if s.buffer.is_empty() || s.closed => None,
                Some(since) if handed == 0 => Some(since),
                _ => Some(now),
            };
        }
        self.outbox.flush();
        Counters::add(&self.stats.delivered, delivered);
        Counters::add(&self.stats.dropped, lost);
        self.set_queued(queued as u64);
        self.report_lag(ctx, false);
        self.prune();
        if !waiting {
            for waiter in self.flush_waiters.drain(..) {
                let _ = waiter.send(());
            }
        } else if !self.retry_pending {
            self.retry_pending = true;
            // Draining: try again as soon as the subscribers had their turn on this thread (a
            // yield, not a timer: a full mailbox of 16 would otherwise cap an actor at 16
            // events per millisecond). Stuck for a few turns: back off to a timer.
            self.idle_retries = if progress { 0 } else { self.idle_retries + 1 };
            if self.idle_retries <= YIELD_RETRIES {
                ctx.spawn(
                    tokio::task::yield_now()
                        .into_actor(self)
                        .map(|_, act, ctx| {
                            act.retry_pending = false;
                            act.pump(ctx);
                        }),
                );
            } else {
                ctx.notify_later(Retry, RETRY);
            }
        }
    }

    /// Publishes a `Lagged` notice for every subscription with unreported drops whose last
    /// notice is at least the lag interval old (or that is gone, or when `now` is set), and
    /// schedules the report of the others for when their interval has passed.
    fn report_lag(&mut self, ctx: &mut Context<Self>, now: bool) {
        let at = Instant::now();
        let (mut due, mut next) = (Vec::new(), None::<Instant>);
        for &(slot, id) in &self.attention {
            let Some(s) = live(&mut self.slots, slot, id) else {
                continue;
            };
            if s.buffer.dropped == 0 {
                continue;
            }
            let ready = match s.lag_reported {
                Some(last) if !now && !s.closed => last + self.lag_interval,
                _ => at,
            };
            if ready <= at {
                due.push((s.id, std::mem::take(&mut s.buffer.dropped)));
                s.lag_reported = Some(at);
                self.routes[s.route].metrics.lagged.increment(1);
            } else {
                next = Some(next.map_or(ready, |n| n.min(ready)));
            }
        }
        for (subscription, dropped) in due {
            self.publish(Status::Lagged {
                subscription,
                dropped,
            });
        }
        let Some(next) = next else { return };
        if let Some((scheduled, handle)) = self.lag_timer {
            if scheduled <= next {
                return;
            }
            ctx.cancel_future(handle);
        }
        let handle = ctx.run_later(next - at, |act, ctx| {
            act.lag_timer = None;
            act.report_lag(ctx, false);
        });
        self.lag_timer = Some((next, handle));
    }

    /// The listener waits for in-flight budget: every event stream that has had events
    /// waiting for `self.stuck` without taking one, and whose reader asked for nothing for as
    /// long, gives them back. One whose reader is to be
    /// cut off rather than lose events is cut ([`Registry::cut`]); any other loses them, as
    /// its policy drops events (told to its reader, and in a `Lagged`). A subscriber of
    /// another kind keeps its events: one that took nothing for a second may just be slow,
    /// and its policy says what it keeps (under `Wait` it is meant to hold the notifier).
    fn relieve(&mut self, now: Instant) {
        let (mut cut, mut lost) = (Vec::new(), 0);
        for &(slot, id) in &self.attention {
            let Some(s) = live(&mut self.slots, slot, id) else {
                continue;
            };
            // Only event streams: a plain subscriber that took nothing for a second may just be
            // slow (one event every two seconds), and its policy keeps its newest events.
            let Some(stream) = s.sink.stream() else {
                continue;
            };
            // Stuck: nothing taken for that long, by a reader that did not ask for anything
            // either (one that keeps asking may be replaying the journal, or taking the events
            // of another of its subscriptions that must go first).
            let stuck = s
                .waiting_since
                .is_some_and(|since| now.duration_since(since) >= self.stuck)
                && stream.idle(now) >= self.stuck;
            if s.closed || s.buffer.is_empty() || !stuck {
                continue;
            }
            if stream.cuts() {
                cut.push(stream.key());
                continue;
            }
            let n = s.buffer.discard(&s.sink);
            log::debug!(
                "sqlnotify: event stream subscription {id} took nothing for {:?} while the \
                 listener waits for in-flight budget; its {n} waiting events are dropped",
                self.stuck
            );
            self.routes[s.route].metrics.dropped.increment(n);
            lost += n;
            s.waiting_since = None;
        }
        Counters::add(&self.stats.dropped, lost);
        cut.sort_unstable();
        cut.dedup();
        for key in cut {
            self.cut(key);
        }
    }

    /// Cuts the event stream `key` off (its reader is disconnected rather than lose events):
    /// every subscription of it is closed and what its buffer held is discarded — the budget
    /// it held given back now, though the reader may never be polled again — then the
    /// reader's hook is told. `pump` reports the losses (`Lagged`) and removes the
    /// subscriptions.
    fn cut(&mut self, key: u64) {
        let Some(ids) = self.streams.get(&key) else {
            return;
        };
        let (mut reader, mut lost) = (None, 0);
        for &id in ids {
            let Some(&slot) = self.by_id.get(&id) else {
                continue;
            };
            let Some(s) = live(&mut self.slots, slot, id) else {
                continue;
            };
            let Some(stream) = s.sink.stream() else {
                continue;
            };
            if reader.is_none() {
                // Before the losses below: the reader sees the cut, not them.
                stream.cut();
                reader = Some(stream.clone());
            }
            if s.closed {
                continue;
            }
            let n = s.buffer.discard(&s.sink);
            s.closed = true;
            let route = &mut self.routes[s.route];
            route.open -= 1;
            if n > 0 {
                route.metrics.dropped.increment(n);
            }
            lost += n;
            attend(s, slot, &mut self.attention);
        }
        Counters::add(&self.stats.dropped, lost);
        if let Some(reader) = reader {
            log::debug!("sqlnotify: event stream {key} cut off ({lost} waiting events dropped)");
            reader.report_cut();
        }
    }

    /// Removes subscriptions whose receiver is gone, and takes those with nothing left to
    /// hand over or report off the attention list.
    fn prune(&mut self) {
        let mut keep = Vec::new();
        for (slot, id) in std::mem::take(&mut self.attention) {
            let Some(s) = live(&mut self.slots, slot, id) else {
                continue;
            };
            if s.closed {
                log::debug!("sqlnotify: subscriber {id} is gone; removing it");
                self.remove(slot);
            } else if !s.buffer.is_empty() || s.buffer.dropped > 0 {
                keep.push((slot, id));
            } else {
                s.listed = false;
            }
        }
        self.attention = keep;
    }

    /// Takes the subscriber in `slot` out of its slot, its channel's index and the counts.
    fn remove(&mut self, slot: usize) -> Option<Subscriber> {
        // A closure's sink, once dropped, tells its host to drop it: after its events.
        self.outbox.flush();
        let s = self.slots.get_mut(slot)?.take()?;
        let route = &mut self.routes[s.route];
        route.index.remove(slot, &s.filters);
        if !s.closed {
            route.open -= 1;
        }
        self.by_id.remove(&s.id);
        if let Sink::Stream(stream) = &s.sink {
            if let Some(ids) = self.streams.get_mut(&stream.key()) {
                ids.retain(|&id| id != s.id);
                if ids.is_empty() {
                    self.streams.remove(&stream.key());
                }
            }
        }
        self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
        self.free.push(slot);
        Some(s)
    }

    /// Removes subscription `id`, counting and reporting what still waited for it.
    fn unsubscribe(&mut self, id: SubscriptionId) -> Result<()> {
        let removed = self
            .by_id
            .get(&id)
            .copied()
            .and_then(|slot| self.remove(slot));
        let Some(mut s) = removed else {
            return Err(Error::UnknownSubscription { id: id.0 });
        };
        // Unsubscribed, not stopped: an acknowledged subscription's receiver (and a handler
        // reading it) lets go of what it did not hand over or start, as the buffer does here.
        s.sink.unsubscribed();
        // What was still waiting for it is lost: count and report it with the rest.
        let lost = s.buffer.discard(&s.sink);
        Counters::add(&self.stats.dropped, lost);
        let metrics = self.routes[s.route].metrics.clone();
        if lost > 0 {
            metrics.dropped.increment(lost);
        }
        if s.buffer.dropped > 0 {
            metrics.lagged.increment(1);
            self.publish(Status::Lagged {
                subscription: s.id,
                dropped: s.buffer.dropped,
            });
        }
        Ok(())
    }

    fn publish(&mut self, status: Status) {
        let event = StatusEvent::now(status);
        self.status.retain(|sink| match sink {
            // Past the mailbox's capacity too: statuses are few, and one dropped (a Gap, a
            // LostLease) would not be seen at all.
            StatusSink::Recipient(r) => {
                r.do_send(event.clone());
                r.connected()
            }
            StatusSink::Fn(addr) => {
                addr.do_send(event.clone());
                addr.connected()
            }
        });
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

/// Subscribes an actor to events: send to the registry's `Addr`.
///
/// ```no_run
/// # use actix::prelude::*;
/// # use sqlnotify::{ChangeEvent, Notifier, Operation, Subscribe, Subscription};
/// # struct Printer;
/// # impl Actor for Printer { type Context = Context<Self>; }
/// # impl Handler<ChangeEvent> for Printer { type Result = (); fn handle(&mut self, _: ChangeEvent, _: &mut Context<Self>) {} }
/// # async fn run(notifier: Notifier) -> sqlnotify::Result<()> {
/// let printer = Printer.start();
/// let id = notifier
///     .registry()
///     .send(Subscribe::new(Subscription::new("users", Operation::Insert), printer.recipient()))
///     .await??;
/// # let _ = id; Ok(()) }
/// ```
pub struct Subscribe {
    subscription: Subscription,
    sink: Sink,
}

impl Subscribe {
    /// Subscribes `recipient` to the events `subscription` selects.
    pub fn new(subscription: Subscription, recipient: Recipient<ChangeEvent>) -> Self {
        Subscribe {
            subscription,
            sink: Sink::Recipient(recipient),
        }
    }

    pub(crate) fn with_sink(subscription: Subscription, sink: Sink) -> Self {
        Subscribe { subscription, sink }
    }
}

impl Message for Subscribe {
    type Result = Result<SubscriptionId>;
}

impl Handler<Subscribe> for Registry {
    type Result = Result<SubscriptionId>;

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) -> Self::Result {
        if let Sink::Stream(stream) = &msg.sink {
            if stream.is_closed() {
                // Its reader is gone — a subscribing future dropped while this waited (see
                // `StreamSubscriptions`): nobody reads the answer, and a subscription made now
                // would outlive its `UnsubscribeStream`.
                return Err(Error::NotRunning);
            }
        }
        self.add(msg.subscription, msg.sink)
    }
}

/// Removes a subscription; no event is delivered to it after this is handled.
#[derive(Debug, Clone, Copy)]
pub struct Unsubscribe(pub SubscriptionId);

impl Message for Unsubscribe {
    type Result = Result<()>;
}

impl Handler<Unsubscribe> for Registry {
    type Result = Result<()>;

    fn handle(&mut self, Unsubscribe(id): Unsubscribe, ctx: &mut Context<Self>) -> Self::Result {
        self.unsubscribe(id)?;
        self.pump(ctx);
        Ok(())
    }
}

/// Removes every subscription of one event stream (by its channel's key,
/// `StreamSink::key`): sent by [`StreamSubscriptions`] when dropped.
pub(crate) struct UnsubscribeStream(pub u64);

impl Message for UnsubscribeStream {
    type Result = ();
}

impl Handler<UnsubscribeStream> for Registry {
    type Result = ();

    fn handle(&mut self, UnsubscribeStream(key): UnsubscribeStream, ctx: &mut Context<Self>) {
        let ids = self.streams.remove(&key).unwrap_or_default();
        if ids.is_empty() {
            return;
        }
        for id in ids {
            let _ = self.unsubscribe(id);
        }
        self.pump(ctx);
    }
}

/// One event stream's subscriptions ([`Notifier::subscribe_stream`](crate::Notifier)) and
/// the receiver of their events. Dropping it closes the receiver, then removes every
/// subscription made for it — those whose `Subscribe` was answered, and one whose answer
/// nobody waited for any more (the subscribing future was dropped: a request cancelled, a
/// worker stopped): such a subscription is in the registry's list of the stream's by then,
/// or its `Subscribe` is handled later, finds the receiver closed and is refused. So from the
/// first `Subscribe` on, no subscription is left behind — not even one whose filters never
/// match, which no delivery would ever find closed.
pub(crate) struct StreamSubscriptions {
    events: StreamReceiver,
    registry: Addr<Registry>,
}

#[cfg_attr(not(feature = "web"), allow(dead_code))]
impl StreamSubscriptions {
    /// The stream of `events`' subscriptions, on `registry`: made before the first of them.
    pub fn new(events: StreamReceiver, registry: Addr<Registry>) -> Self {
        StreamSubscriptions { events, registry }
    }

    /// The receiver of the subscriptions' events.
    pub fn events(&mut self) -> &mut StreamReceiver {
        &mut self.events
    }
}

impl Drop for StreamSubscriptions {
    fn drop(&mut self) {
        // Closed first: a `Subscribe` handled after the message below is refused.
        self.events.close();
        self.registry.do_send(UnsubscribeStream(self.events.key()));
    }
}

/// Subscribes to status messages.
pub(crate) struct SubscribeStatus(pub StatusSink);

impl Message for SubscribeStatus {
    type Result = ();
}

impl Handler<SubscribeStatus> for Registry {
    type Result = ();

    fn handle(&mut self, SubscribeStatus(sink): SubscribeStatus, _: &mut Context<Self>) {
        self.status.push(sink);
    }
}

impl Handler<StatusEvent> for Registry {
    type Result = ();

    fn handle(&mut self, event: StatusEvent, _: &mut Context<Self>) {
        self.publish(event.status);
    }
}

/// What routing one batch did, applied to the shared counters once per batch.
#[derive(Default)]
struct Tally {
    delivered: u64,
    filtered: u64,
    unrouted: u64,
    dropped: u64,
    /// Budget units to give back (those of events no buffer kept).
    release: usize,
    /// Some buffer kept an event, or a subscriber is gone: pump() has work.
    pump: bool,
    sequence: i64,
    /// Event streams to cut off once the event is offered to every subscription
    /// (`Registry::cut`).
    cuts: Vec<u64>,
}

/// Offers `event` to the subscriptions of `route` that it can match (its index's candidates):
/// filters, then hands it over or buffers it (taking one [`Ticket`] for every buffer that
/// keeps it). Every open subscription of the route that does not take the event is counted as
/// filtered out, without being looked at. Returns how many subscribers turned out to be gone.
fn offer(
    route: &ChannelRoute,
    slots: &mut [Option<Subscriber>],
    attention: &mut Vec<(usize, SubscriptionId)>,
    outbox: &mut Outbox,
    event: &ChangeEvent,
    tally: &mut Tally,
    unit: &mut Unit,
) -> usize {
    let (mut selected, mut gone) = (0, 0);
    route.index.candidates(
        |column| event.get(column),
        |slot| {
            let Some(s) = slots.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if s.closed || !(s.settled || s.filters.iter().all(|f| f.matches(event))) {
                return;
            }
            selected += 1;
            s.sink.selected(event);
            let event = if s.buffer.is_empty() {
                match s.sink.try_deliver(event.clone(), outbox) {
                    Ok(()) => {
                        tally.delivered += 1;
                        return;
                    }
                    Err(Refused::Closed) => {
                        // Lost with its subscriber; pump() reports and removes it.
                        s.closed = true;
                        gone += 1;
                        s.buffer.dropped += 1;
                        tally.dropped += 1;
                        tally.pump = true;
                        attend(s, slot, attention);
                        return;
                    }
                    Err(Refused::Full(event)) => event,
                }
            } else {
                event.clone()
            };
            if let Some(oldest) = s.buffer.full_of() {
                if let Some(key) = s.sink.cut_rather_than_drop(oldest) {
                    // Its reader is disconnected rather than lose an event: this one is lost
                    // with what its subscriptions hold (`Registry::cut`, once every
                    // subscription had the event).
                    s.sink.lost(&event);
                    s.buffer.dropped += 1;
                    tally.dropped += 1;
                    tally.cuts.push(key);
                    tally.pump = true;
                    attend(s, slot, attention);
                    return;
                }
            }
            tally.dropped += s.buffer.push(event, unit.ticket(), &s.sink);
            tally.pump = true;
            attend(s, slot, attention);
        },
    );
    tally.filtered += (route.open - selected) as u64;
    gone
}

/// An event's units of in-flight budget: put in a [`Ticket`] when the first buffer keeps the
/// event (every buffer that keeps it shares the ticket), else given back after routing.
struct Unit<'a> {
    budget: &'a Arc<Semaphore>,
    units: usize,
    ticket: Option<Rc<Ticket>>,
}

impl Unit<'_> {
    fn ticket(&mut self) -> Rc<Ticket> {
        let (budget, units) = (self.budget, self.units);
        self.ticket
            .get_or_insert_with(|| Ticket::new(budget, units))
            .clone()
    }
}

/// The routes of a batch's events, looked up once per batch (subscriptions to every channel)
/// and once per run of events on one channel, not twice per event: no subscription comes or
/// goes while a batch is routed.
struct Found {
    /// The channel of the event routed last, and its route.
    last: Option<(Arc<Channel>, Option<usize>)>,
    /// The route of the subscriptions to every channel.
    every: Option<usize>,
}

/// Puts `s` (in `slot`) on the attention list, once.
fn attend(s: &mut Subscriber, slot: usize, attention: &mut Vec<(usize, SubscriptionId)>) {
    if !s.listed {
        s.listed = true;
        attention.push((slot, s.id));
    }
}

/// The subscriber in `slot`, if it is still subscription `id`.
fn live(
    slots: &mut [Option<Subscriber>],
    slot: usize,
    id: SubscriptionId,
) -> Option<&mut Subscriber> {
    slots.get_mut(slot)?.as_mut().filter(|s| s.id == id)
}

/// Where subscriptions to every channel are kept in `by_channel` (no channel has this name).
const EVERY_CHANNEL: &str = "";

/// Subscribes a sink to every event of every channel, in commit order (the relay's feed).
pub(crate) struct SubscribeEvery {
    pub sink: Sink,
    pub buffer: usize,
}

impl Message for SubscribeEvery {
    type Result = SubscriptionId;
}

impl Handler<SubscribeEvery> for Registry {
    type Result = MessageResult<SubscribeEvery>;

    fn handle(&mut self, msg: SubscribeEvery, _: &mut Context<Self>) -> Self::Result {
        let id = self.insert(
            EVERY_CHANNEL,
            Vec::new(),
            msg.sink,
            Buffer::new(OverflowPolicy::Wait, msg.buffer),
        );
        MessageResult(id)
    }
}

/// Decoded events, in commit order, from the decoder; then `skipped` units no event carries
/// (malformed input), settled after the events so the settled count never runs ahead of an
/// event still on its way.
pub(crate) struct Route {
    pub events: Vec<ChangeEvent>,
    pub skipped: u64,
}

impl Message for Route {
    type Result = ();
}

impl Handler<Route> for Registry {
    type Result = ();

    fn handle(&mut self, Route { events, skipped }: Route, ctx: &mut Context<Self>) {
        let mut tally = Tally::default();
        let count = events.len() as u64 + skipped;
        let mut found = self.found();
        for event in events {
            self.route(event, &mut tally, &mut found);
        }
        self.outbox.flush();
        // Shared counters, metrics and the budget are touched once per batch, not per event.
        self.emit_counted();
        let stats = &self.stats;
        stats
            .routed_sequence
            .fetch_max(tally.sequence, Ordering::Relaxed);
        Counters::add(&stats.unrouted, tally.unrouted);
        Counters::add(&stats.delivered, tally.delivered);
        Counters::add(&stats.filtered_out, tally.filtered);
        Counters::add(&stats.dropped, tally.dropped);
        stats.settle(count);
        self.budget.add_permits(tally.release);
        if tally.pump || stats.queued.load(Ordering::Relaxed) > 0 {
            self.pump(ctx);
        }
    }
}

/// Retry handing buffered events over.
struct Retry;

impl Message for Retry {
    type Result = ();
}

impl Handler<Retry> for Registry {
    type Result = ();

    fn handle(&mut self, _: Retry, ctx: &mut Context<Self>) {
        self.retry_pending = false;
        self.pump(ctx);
    }
}

impl Handler<Flush> for Registry {
    type Result = ResponseFuture<()>;

    /// Resolves once everything routed before the flush has been handed over (buffers empty)
    /// and closure subscribers have run it.
    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) -> Self::Result {
        let (drained, is_drained) = oneshot::channel();
        self.flush_waiters.push(drained);
        self.pump(ctx);
        // Every closure host (a pipeline has one per arbiter closures were subscribed on).
        let mut closures: Vec<Addr<ClosureHost>> = Vec::new();
        for s in self.slots.iter().flatten() {
            if let Sink::Fn(sink) = &s.sink {
                if !closures.contains(sink.host()) {
                    closures.push(sink.host().clone());
                }
            }
        }
        let status_closures: Vec<_> = self
            .status
            .iter()
            .filter_map(|s| match s {
                StatusSink::Fn(addr) => Some(addr.clone()),
                StatusSink::Recipient(_) => None,
            })
            .collect();
        Box::pin(async move {
            let _ = is_drained.await;
            join_all(closures.iter().map(|a| a.send(Flush))).await;
            join_all(status_closures.iter().map(|a| a.send(Flush))).await;
        })
    }
}

impl Handler<Shutdown> for Registry {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        // Whatever still waits is lost; every drop not yet reported is reported now.
        let mut lost = 0;
        for (slot, s) in self.slots.iter_mut().enumerate() {
            if let Some(s) = s {
                let discarded = s.buffer.discard(&s.sink);
                if discarded > 0 {
                    self.routes[s.route].metrics.dropped.increment(discarded);
                }
                lost += discarded;
                if s.buffer.dropped > 0 {
                    attend(s, slot, &mut self.attention);
                }
            }
        }
        Counters::add(&self.stats.dropped, lost);
        self.set_queued(0);
        self.report_lag(ctx, true);
        self.by_channel.clear();
        self.routes.clear();
        self.slots.clear();
        self.free.clear();
        self.by_id.clear();
        self.streams.clear();
        self.stats.subscriptions.store(0, Ordering::Relaxed);
        self.attention.clear();
        self.status.clear();
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    //! Routing without a database: hand-made channels, events routed straight into the
    //! registry, subscribers that are bounded channels (an event handed over is in the channel
    //! at once, so what arrived — and what did not — is read exactly, with no waiting).

    use super::*;
    use crate::event::{Channel, Key, RawNotification};
    use crate::operation::Operation;
    use crate::stream_sink::Received;
    use crate::subscription::OverflowPolicy;
    use crate::tier::Tier;
    use serde_json::{json, Value};

    const BUDGET: usize = 100;

    fn channel(name: &str, table: &str, op: Operation, label: Option<&str>) -> Channel {
        Channel {
            name: name.into(),
            schema: "public".into(),
            table: table.into(),
            operation: op,
            label: label.map(Into::into),
            key_columns: vec!["id".into()],
            extra_columns: vec!["email".into(), "score".into()],
            tier: Tier::Notify,
            signed: false,
        }
    }

    /// A registry over `users` insert / update / delete, a labelled `users` insert
    /// (`vip`) and `orders` insert.
    struct Harness {
        registry: Addr<Registry>,
        channels: Arc<Channels>,
        stats: Arc<Counters>,
        budget: Arc<Semaphore>,
    }

    impl Harness {
        fn start() -> Harness {
            Harness::stuck_after(STUCK)
        }

        /// A harness whose event streams are stuck after `stuck` (see [`STUCK`]).
        fn stuck_after(stuck: Duration) -> Harness {
            let channels = Arc::new(Channels::new(
                [
                    channel("users_insert", "users", Operation::Insert, None),
                    channel("users_update", "users", Operation::Update, None),
                    channel("users_delete", "users", Operation::Delete, None),
                    channel("vip", "users", Operation::Insert, Some("vip")),
                    channel("orders_insert", "orders", Operation::Insert, None),
                ],
                "public",
            ));
            let stats = Arc::new(Counters::default());
            let budget = Arc::new(Semaphore::new(BUDGET));
            let registry = Registry::new(channels.clone(), stats.clone(), budget.clone())
                .lag_interval(Duration::from_secs(3600))
                .stuck_after(stuck)
                .start();
            Harness {
                registry,
                channels,
                stats,
                budget,
            }
        }

        fn event(&self, channel: &str, id: i64, extra: Value) -> ChangeEvent {
            let Value::Object(extra) = extra else {
                panic!("extra columns are an object")
            };
            let channel = self.channels.get(channel).expect("a test channel").clone();
            ChangeEvent::new(
                channel,
                Key::Single(json!(id)),
                extra,
                &RawNotification::new("", ""),
                false,
            )
        }

        /// Subscribes a bounded channel of `capacity`.
        async fn subscribe(
            &self,
            subscription: Subscription,
            capacity: usize,
        ) -> Result<(SubscriptionId, crossbeam_channel::Receiver<ChangeEvent>)> {
            let (tx, rx) = crossbeam_channel::bounded(capacity);
            let id = self
                .registry
                .send(Subscribe::with_sink(subscription, Sink::Channel(tx)))
                .await
                .unwrap()?;
            Ok((id, rx))
        }

        /// Subscribes a bounded channel of `capacity` to every `users` insert.
        async fn inserts(
            &self,
            capacity: usize,
        ) -> (SubscriptionId, crossbeam_channel::Receiver<ChangeEvent>) {
            self.subscribe(Subscription::new("users", Operation::Insert), capacity)
                .await
                .unwrap()
        }

        async fn unsubscribe(&self, id: SubscriptionId) -> Result<()> {
            self.registry.send(Unsubscribe(id)).await.unwrap()
        }

        /// Routes `events` the way the decoder does (after the listener took their budget).
        async fn route(&self, events: Vec<ChangeEvent>) {
            let n = events.len();
            self.budget.acquire_many(n as u32).await.unwrap().forget();
            Counters::add(&self.stats.forwarded, n as u64);
            self.registry
                .send(Route { events, skipped: 0 })
                .await
                .unwrap();
        }

        async fn flush(&self) {
            self.registry.send(Flush).await.unwrap();
        }

        /// Has the registry pump every 5 ms (routing nothing) until at most `queued` events
        /// wait; panics after 10 s.
        async fn pump_until_queued(&self, queued: u64) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while self.stats.snapshot().queued > queued {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{:?}",
                    self.stats.snapshot()
                );
                self.route(Vec::new()).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        /// An event stream of `subscriptions` (each under `policy` with a buffer of `buffer`)
        /// through a channel of one event; with `cut`, cut off rather than lose events once
        /// armed, the losses its hook is told of going into the returned list.
        async fn stream(
            &self,
            subscriptions: &[Subscription],
            policy: OverflowPolicy,
            buffer: usize,
            cut: bool,
        ) -> (
            StreamSubscriptions,
            Vec<SubscriptionId>,
            Arc<std::sync::Mutex<Vec<u64>>>,
        ) {
            let told = Arc::new(std::sync::Mutex::new(Vec::new()));
            let hook = {
                let told = told.clone();
                Box::new(move |lost| told.lock().unwrap().push(lost)) as crate::stream_sink::CutHook
            };
            let (sink, receiver) = crate::stream_sink::stream_channel(1, true, cut.then_some(hook));
            let stream = StreamSubscriptions::new(receiver, self.registry.clone());
            let mut ids = Vec::new();
            for subscription in subscriptions {
                let subscription = subscription.clone().policy(policy).buffer(buffer);
                let id = self
                    .registry
                    .send(Subscribe::with_sink(
                        subscription,
                        Sink::Stream(sink.clone()),
                    ))
                    .await
                    .unwrap()
                    .unwrap();
                ids.push(id);
            }
            (stream, ids, told)
        }

        /// An event with no extra columns, `id` also its place in commit order (what an event
        /// stream orders by).
        fn placed(&self, channel: &str, id: i64) -> ChangeEvent {
            self.event(channel, id, json!({})).placed(id as u64, 0)
        }

        /// Waits (bounded) until every unit of the budget is back.
        async fn budget_returns(&self) -> bool {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while self.budget.available_permits() < BUDGET {
                if tokio::time::Instant::now() > deadline {
                    return false;
                }
                tokio::task::yield_now().await;
            }
            true
        }
    }

    fn ids(rx: &crossbeam_channel::Receiver<ChangeEvent>) -> Vec<i64> {
        rx.try_iter().map(|e| e.id().as_i64().unwrap()).collect()
    }

    /// Status messages, into a channel.
    struct Statuses(tokio::sync::mpsc::UnboundedSender<Status>);

    impl Actor for Statuses {
        type Context = Context<Self>;
    }

    impl Handler<StatusEvent> for Statuses {
        type Result = ();
        fn handle(&mut self, event: StatusEvent, _: &mut Context<Self>) {
            let _ = self.0.send(event.status);
        }
    }

    async fn statuses(h: &Harness) -> tokio::sync::mpsc::UnboundedReceiver<Status> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let addr = Statuses(tx).start();
        h.registry
            .send(SubscribeStatus(StatusSink::Recipient(addr.recipient())))
            .await
            .unwrap();
        rx
    }

    async fn next_status(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Status>) -> Status {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a status should have arrived")
            .unwrap()
    }

    #[actix_rt::test]
    async fn each_event_reaches_exactly_the_subscriptions_whose_channel_and_filters_match() {
        let h = Harness::start();
        let sub = |table: &str, op| Subscription::new(table, op);
        let (_, all) = h
            .subscribe(sub("users", Operation::Insert), 64)
            .await
            .unwrap();
        let (_, schema) = h
            .subscribe(sub("users", Operation::Insert).schema("public"), 64)
            .await
            .unwrap();
        let (_, email_a) = h
            .subscribe(
                sub("users", Operation::Insert).filter(Filter::eq("email", "a")),
                64,
            )
            .await
            .unwrap();
        let (_, both) = h
            .subscribe(
                sub("users", Operation::Insert)
                    .filter(Filter::gt("score", 10))
                    .filter(Filter::ne("email", "c")),
                64,
            )
            .await
            .unwrap();
        let (_, updates) = h
            .subscribe(sub("users", Operation::Update), 64)
            .await
            .unwrap();
        let (_, vip) = h
            .subscribe(sub("users", Operation::Insert).channel_label("vip"), 64)
            .await
            .unwrap();

        h.route(vec![
            h.event("users_insert", 1, json!({"email": "a", "score": 5})),
            h.event("users_insert", 2, json!({"email": "b", "score": 20})),
            h.event("users_insert", 3, json!({"email": "c", "score": 30})),
            h.event("users_update", 1, json!({"email": "a", "score": 6})),
            h.event("vip", 4, json!({"email": "v", "score": 1})),
            h.event("users_delete", 5, json!({})),
            h.event("orders_insert", 6, json!({})),
        ])
        .await;
        h.flush().await;

        assert_eq!(ids(&all), [1, 2, 3]);
        assert_eq!(ids(&schema), [1, 2, 3], "the default schema spelled out");
        assert_eq!(ids(&email_a), [1]);
        assert_eq!(ids(&both), [2], "filters combine with AND");
        assert_eq!(ids(&updates), [1]);
        assert_eq!(ids(&vip), [4], "a label is a channel of its own");
        let stats = h.stats.snapshot();
        assert_eq!(stats.delivered, 3 + 3 + 1 + 1 + 1 + 1);
        assert_eq!(stats.filtered_out, 2 + 2, "{stats:?}");
        assert_eq!(stats.unrouted, 2, "delete and orders have no subscriber");
        assert_eq!((stats.dropped, stats.queued, stats.in_flight), (0, 0, 0));
        assert_eq!(h.budget.available_permits(), BUDGET, "every unit came back");
    }

    #[actix_rt::test]
    async fn subscribing_to_what_is_not_watched_or_not_carried_is_an_error() {
        let h = Harness::start();
        let err = |r: Result<(SubscriptionId, _)>| r.map(|_| ()).unwrap_err();
        let e = err(h
            .subscribe(Subscription::new("nope", Operation::Insert), 1)
            .await);
        assert!(
            matches!(&e, Error::NotWatched { table, operation: Operation::Insert, label: None }
                if table == "public.nope"),
            "{e:?}"
        );
        let e = err(h
            .subscribe(Subscription::new("orders", Operation::Delete), 1)
            .await);
        assert!(
            matches!(
                &e,
                Error::NotWatched {
                    operation: Operation::Delete,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = err(h
            .subscribe(
                Subscription::new("users", Operation::Insert).channel_label("other"),
                1,
            )
            .await);
        assert!(
            matches!(&e, Error::NotWatched { label: Some(l), .. } if l == "other"),
            "{e:?}"
        );
        let e = err(h
            .subscribe(
                Subscription::new("users", Operation::Insert).schema("elsewhere"),
                1,
            )
            .await);
        assert!(
            matches!(&e, Error::NotWatched { table, .. } if table == "elsewhere.users"),
            "{e:?}"
        );
        let e = err(h
            .subscribe(
                Subscription::new("users", Operation::Insert).filter(Filter::eq("name", "x")),
                1,
            )
            .await);
        match e {
            Error::UnknownFilterColumn {
                channel,
                column,
                available,
            } => {
                assert_eq!(
                    (channel.as_str(), column.as_str()),
                    ("users_insert", "name")
                );
                assert_eq!(available, ["id", "email", "score"]);
            }
            other => panic!("expected UnknownFilterColumn, got {other:?}"),
        }
        assert!(!h.stats.has_subscriber.load(Ordering::Acquire));
        let (first, _) = h
            .subscribe(Subscription::new("users", Operation::Insert), 1)
            .await
            .unwrap();
        let (second, _) = h
            .subscribe(Subscription::new("users", Operation::Insert), 1)
            .await
            .unwrap();
        assert!(h.stats.has_subscriber.load(Ordering::Acquire));
        assert_eq!(
            (first.get(), second.get()),
            (1, 2),
            "failed attempts use no id"
        );
    }

    #[actix_rt::test]
    async fn an_unsubscribed_subscription_gets_nothing_more_and_its_waiting_events_are_reported() {
        let h = Harness::start();
        let mut statuses = statuses(&h).await;
        let (gone, gone_rx) = h.inserts(1).await;
        let (_, kept) = h.inserts(64).await;
        // 1 fills its channel, 2 and 3 wait in its buffer
        h.route(
            (1..=3)
                .map(|id| h.event("users_insert", id, json!({})))
                .collect(),
        )
        .await;
        assert_eq!(h.stats.snapshot().queued, 2);
        h.unsubscribe(gone).await.unwrap();
        assert_eq!(
            next_status(&mut statuses).await,
            Status::Lagged {
                subscription: gone,
                dropped: 2
            }
        );
        h.route(vec![h.event("users_insert", 4, json!({}))]).await;
        h.flush().await;
        assert_eq!(ids(&gone_rx), [1], "nothing after the unsubscribe");
        assert_eq!(ids(&kept), [1, 2, 3, 4]);
        let e = h.unsubscribe(gone).await.unwrap_err();
        assert!(
            matches!(e, Error::UnknownSubscription { id } if id == gone.get()),
            "{e:?}"
        );
        let stats = h.stats.snapshot();
        assert_eq!((stats.delivered, stats.dropped, stats.queued), (5, 2, 0));
        assert_eq!(h.budget.available_permits(), BUDGET);
    }

    #[actix_rt::test]
    async fn a_subscriber_whose_receiver_is_gone_is_removed_and_its_loss_reported() {
        let h = Harness::start();
        let mut statuses = statuses(&h).await;
        let (gone, gone_rx) = h.inserts(8).await;
        let (_, kept) = h.inserts(8).await;
        drop(gone_rx);
        h.route(vec![h.event("users_insert", 1, json!({}))]).await;
        assert_eq!(
            next_status(&mut statuses).await,
            Status::Lagged {
                subscription: gone,
                dropped: 1
            }
        );
        h.route(vec![h.event("users_insert", 2, json!({}))]).await;
        h.flush().await;
        assert_eq!(ids(&kept), [1, 2]);
        let e = h.unsubscribe(gone).await.unwrap_err();
        assert!(
            matches!(e, Error::UnknownSubscription { .. }),
            "pruned: {e:?}"
        );
        let stats = h.stats.snapshot();
        assert_eq!((stats.delivered, stats.dropped), (2, 1));
    }

    #[actix_rt::test]
    async fn status_messages_reach_every_status_subscriber_in_order() {
        let h = Harness::start();
        let (mut one, mut two) = (statuses(&h).await, statuses(&h).await);
        for status in [
            Status::Connected,
            Status::Gap {
                channels: vec!["users_insert".into()],
            },
            Status::Resynced { replayed: 3 },
        ] {
            h.registry.do_send(StatusEvent::now(status));
        }
        for rx in [&mut one, &mut two] {
            assert_eq!(next_status(rx).await, Status::Connected);
            assert_eq!(
                next_status(rx).await,
                Status::Gap {
                    channels: vec!["users_insert".into()]
                }
            );
            assert_eq!(next_status(rx).await, Status::Resynced { replayed: 3 });
        }
    }

    /// A subscriber whose channel holds one event, with a buffer of `buffer` under `policy`:
    /// routes `events` (id, email) in one batch while nobody reads, then reads until the
    /// buffer is empty, and asserts it got `expected`, in order, and that what it lost was
    /// counted and reported to it in one `Lagged` notice.
    async fn through_a_stuck_subscriber(
        policy: OverflowPolicy,
        buffer: usize,
        events: &[(i64, &str)],
        expected: &[(i64, &str)],
    ) {
        let h = Harness::start();
        let mut statuses = statuses(&h).await;
        let (id, rx) = h
            .subscribe(
                Subscription::new("users", Operation::Insert)
                    .policy(policy)
                    .buffer(buffer),
                1,
            )
            .await
            .unwrap();
        h.route(
            events
                .iter()
                .map(|(id, email)| h.event("users_insert", *id, json!({ "email": email })))
                .collect(),
        )
        .await;
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match rx.try_recv() {
                Ok(e) => got.push((
                    e.id().as_i64().unwrap(),
                    e.get("email").unwrap().as_str().unwrap().to_string(),
                )),
                Err(_)
                    if h.stats.snapshot().queued == 0 && h.budget.available_permits() == BUDGET =>
                {
                    break
                }
                Err(_) => {
                    assert!(tokio::time::Instant::now() < deadline, "got only {got:?}");
                    tokio::task::yield_now().await;
                }
            }
        }
        h.flush().await;
        got.extend(
            rx.try_iter()
                .map(|e| (e.id().as_i64().unwrap(), "late".into())),
        );
        let expected: Vec<(i64, String)> =
            expected.iter().map(|(i, e)| (*i, e.to_string())).collect();
        assert_eq!(got, expected);
        let lost = (events.len() - expected.len()) as u64;
        let stats = h.stats.snapshot();
        assert_eq!(
            (stats.delivered, stats.dropped),
            (expected.len() as u64, lost)
        );
        if lost > 0 {
            assert_eq!(
                next_status(&mut statuses).await,
                Status::Lagged {
                    subscription: id,
                    dropped: lost
                }
            );
        }
        assert_eq!(statuses.try_recv().ok(), None);
    }

    #[actix_rt::test]
    async fn a_stream_cut_off_rather_than_lose_an_event_gives_back_all_its_subscriptions_held() {
        let h = Harness::start();
        let mut statuses = statuses(&h).await;
        let (mut stream, ids, told) = h
            .stream(
                &[
                    Subscription::new("users", Operation::Insert),
                    Subscription::new("users", Operation::Update),
                ],
                OverflowPolicy::DropOldest,
                2,
                true,
            )
            .await;
        stream.events().arm();
        // 1 fills the channel; 2, 3 wait in the inserts' buffer, 4 in the updates' (after
        // them: the stream is in commit order).
        h.route(vec![
            h.placed("users_insert", 1),
            h.placed("users_insert", 2),
            h.placed("users_insert", 3),
            h.placed("users_update", 4),
        ])
        .await;
        assert_eq!(h.stats.snapshot().queued, 3);
        assert!(told.lock().unwrap().is_empty());
        // The inserts' buffer is full: 5 would drop 2. Cut off instead, with all it held.
        h.route(vec![h.placed("users_insert", 5)]).await;
        assert_eq!(*told.lock().unwrap(), [4u64], "2, 3, 4 and 5, told once");
        assert_eq!(
            h.budget.available_permits(),
            BUDGET,
            "the budget is back, though nobody read"
        );
        let mut lagged = vec![
            next_status(&mut statuses).await,
            next_status(&mut statuses).await,
        ];
        lagged.sort_by_key(|s| match s {
            Status::Lagged { subscription, .. } => *subscription,
            other => panic!("{other:?}"),
        });
        assert_eq!(
            lagged,
            [
                Status::Lagged {
                    subscription: ids[0],
                    dropped: 3
                },
                Status::Lagged {
                    subscription: ids[1],
                    dropped: 1
                }
            ]
        );
        assert!(
            matches!(stream.events().next().await, Received::Cut),
            "the cut, before the event in the channel"
        );
        h.route(vec![h.placed("users_insert", 6)]).await;
        h.flush().await;
        let stats = h.stats.snapshot();
        assert_eq!(
            (
                stats.delivered,
                stats.dropped,
                stats.queued,
                stats.subscriptions
            ),
            (1, 4, 0, 0),
            "{stats:?}"
        );
        assert_eq!(told.lock().unwrap().len(), 1);
    }

    #[actix_rt::test]
    async fn events_that_waited_from_before_a_stream_was_armed_are_dropped_not_cut_for() {
        let h = Harness::start();
        let inserts = [Subscription::new("users", Operation::Insert)];
        let (mut stream, _, told) = h
            .stream(&inserts, OverflowPolicy::DropOldest, 2, true)
            .await;
        // While its reader reads the journal: 1 in the channel, 2 and 3 wait.
        h.route((1..=3).map(|id| h.placed("users_insert", id)).collect())
            .await;
        stream.events().arm();
        // 4 and 5 push 2 and 3 out, as before (the reader checks those losses against what
        // it read); 6 would push 4 out, selected since: cut off.
        h.route(vec![h.placed("users_insert", 4)]).await;
        h.route(vec![h.placed("users_insert", 5)]).await;
        assert!(told.lock().unwrap().is_empty());
        assert_eq!(h.stats.snapshot().dropped, 2);
        h.route(vec![h.placed("users_insert", 6)]).await;
        assert_eq!(
            *told.lock().unwrap(),
            [5u64],
            "2 and 3 (not yet taken by the reader), then 4, 5 and 6"
        );
        assert!(matches!(stream.events().next().await, Received::Cut));
        assert_eq!(h.budget.available_permits(), BUDGET);
    }

    #[actix_rt::test]
    async fn while_the_listener_waits_for_budget_stuck_streams_give_theirs_back() {
        let h = Harness::stuck_after(Duration::from_millis(20));
        let inserts = [Subscription::new("users", Operation::Insert)];
        let (mut cut, _, told) = h
            .stream(&inserts, OverflowPolicy::DropOldest, 8, true)
            .await;
        cut.events().arm();
        let (mut dropping, _, _) = h
            .stream(&inserts, OverflowPolicy::DropOldest, 8, false)
            .await;
        let (_, plain) = h.inserts(1).await;
        // 1 fills each channel; 2 and 3 wait, within the buffers.
        h.route((1..=3).map(|id| h.placed("users_insert", id)).collect())
            .await;
        assert_eq!(h.stats.snapshot().queued, 6);
        // Not waiting for budget: stuck or not, they keep their events.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(h.stats.snapshot().queued, 6);
        assert!(told.lock().unwrap().is_empty());
        // The listener waits: the streams give their events back, the plain subscription —
        // its policy is to wait — keeps its own.
        h.stats.budget_waiters.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while h.stats.snapshot().queued > 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                h.stats.snapshot()
            );
            tokio::task::yield_now().await;
        }
        h.stats.budget_waiters.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(
            *told.lock().unwrap(),
            [2u64],
            "cut off, with its two waiting events"
        );
        assert!(matches!(cut.events().next().await, Received::Cut));
        // The other loses them, as its policy drops events, and is told so.
        assert!(matches!(
            dropping.events().next().await,
            Received::Lost(crate::stream_sink::Lost { count: 2, .. })
        ));
        assert!(matches!(
            dropping.events().next().await,
            Received::Event { .. }
        ));
        let mut got = ids(&plain);
        while got.len() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "{got:?}");
            tokio::task::yield_now().await;
            got.extend(ids(&plain));
        }
        assert_eq!(got, [1, 2, 3]);
        assert!(h.budget_returns().await);
    }

    /// A reader that keeps asking — reading its journal replay first, or the events of another
    /// of its subscriptions that must go first — is not stuck, though a subscription of it
    /// took nothing for longer than `STUCK`: it keeps its events. Once it stops asking, it
    /// gives them back.
    #[actix_rt::test]
    async fn a_stream_whose_reader_keeps_asking_keeps_its_events() {
        let h = Harness::stuck_after(Duration::from_millis(20));
        let inserts = [Subscription::new("users", Operation::Insert)];
        let (mut asking, _, told) = h
            .stream(&inserts, OverflowPolicy::DropOldest, 8, true)
            .await;
        asking.events().arm();
        h.route((1..=3).map(|id| h.placed("users_insert", id)).collect())
            .await;
        assert_eq!(
            h.stats.snapshot().queued,
            2,
            "1 in the channel, 2 and 3 waiting"
        );
        h.stats.budget_waiters.fetch_add(1, Ordering::Relaxed);
        // Five times `STUCK`, the reader asking all along (a replay page every 5 ms).
        let until = tokio::time::Instant::now() + Duration::from_millis(100);
        while tokio::time::Instant::now() < until {
            asking.events().touch();
            h.route(Vec::new()).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(h.stats.snapshot().queued, 2, "it keeps its events");
        assert!(told.lock().unwrap().is_empty());
        // It stops asking: cut off, with its two waiting events.
        h.pump_until_queued(0).await;
        h.stats.budget_waiters.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(*told.lock().unwrap(), [2u64]);
        assert!(matches!(asking.events().next().await, Received::Cut));
    }

    #[actix_rt::test]
    async fn wait_hands_over_every_event_in_order_however_small_the_buffer() {
        let events = [(1, "a"), (2, "b"), (1, "c"), (3, "d"), (4, "e"), (5, "f")];
        through_a_stuck_subscriber(OverflowPolicy::Wait, 1, &events, &events).await;
    }

    #[actix_rt::test]
    async fn drop_oldest_keeps_the_newest_events_in_order_and_reports_the_rest() {
        let events = [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e"), (6, "f")];
        // 1 fills the channel; of 2..=6 the buffer of 2 keeps the newest
        let expected = [(1, "a"), (5, "e"), (6, "f")];
        through_a_stuck_subscriber(OverflowPolicy::DropOldest, 2, &events, &expected).await;
    }

    #[actix_rt::test]
    async fn keep_latest_per_key_replaces_a_waiting_event_of_the_same_row_in_place() {
        let events = [(1, "a"), (2, "b"), (3, "c"), (2, "d"), (3, "e"), (2, "f")];
        // 1 fills the channel; 2 and 3 wait and are replaced where they stand
        let expected = [(1, "a"), (2, "f"), (3, "e")];
        through_a_stuck_subscriber(OverflowPolicy::KeepLatestPerKey, 10, &events, &expected).await;
    }

    #[actix_rt::test]
    async fn keep_latest_per_key_drops_the_oldest_row_when_full_of_distinct_rows() {
        let events = [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (3, "e")];
        // 1 fills the channel; 2, 3 wait; 4 pushes 2 out; 3's newer state replaces it
        let expected = [(1, "a"), (3, "e"), (4, "d")];
        through_a_stuck_subscriber(OverflowPolicy::KeepLatestPerKey, 2, &events, &expected).await;
    }
}

#[cfg(test)]
mod properties {
    //! The registry's routing against a linear scan of the same filters: what each subscriber
    //! receives, and the delivered / filtered-out / dropped counts.

    use super::*;
    use crate::event::{Channel, Key, RawNotification};
    use crate::operation::Operation;
    use crate::tier::Tier;
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    const COLUMNS: [&str; 3] = ["id", "email", "score"];

    fn channels() -> Arc<Channels> {
        Arc::new(Channels::new(
            [Channel {
                name: "users_insert".into(),
                schema: "public".into(),
                table: "users".into(),
                operation: Operation::Insert,
                label: None,
                key_columns: vec!["id".into()],
                extra_columns: vec!["email".into(), "score".into()],
                tier: Tier::Notify,
                signed: false,
            }],
            "public",
        ))
    }

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-2i64..3).prop_map(Value::from),
            (-2i64..3).prop_map(|n| Value::from(n as f64)),
            Just(Value::from(1.5)),
            // Integers that share a routing key (2^53 and 2^53 + 1).
            Just(Value::from(9_007_199_254_740_992i64)),
            Just(Value::from(9_007_199_254_740_993i64)),
            "[xy]{0,1}".prop_map(Value::String),
        ]
    }

    fn filter() -> impl Strategy<Value = Filter> {
        let column = prop::sample::select(&COLUMNS[..]);
        prop_oneof![
            (column.clone(), scalar()).prop_map(|(c, v)| Filter::eq(c, v)),
            (column.clone(), prop::collection::vec(scalar(), 0..3))
                .prop_map(|(c, v)| Filter::is_in(c, v)),
            (column.clone(), scalar()).prop_map(|(c, v)| Filter::ne(c, v)),
            (column.clone(), scalar()).prop_map(|(c, v)| Filter::gt(c, v)),
            column.prop_map(Filter::is_null),
        ]
    }

    /// A subscription: its filters, whether it is unsubscribed before routing, and whether its
    /// receiver is dropped before routing.
    fn subscription() -> impl Strategy<Value = (Vec<Filter>, bool, bool)> {
        (
            prop::collection::vec(filter(), 0..3),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.1),
        )
    }

    /// An event: its key, and some of the extra columns.
    fn event() -> impl Strategy<Value = (Value, Vec<(bool, Value)>)> {
        (
            scalar(),
            prop::collection::vec((any::<bool>(), scalar()), 0..2),
        )
    }

    proptest! {
        #[test]
        fn indexed_routing_delivers_and_counts_what_a_linear_scan_does(
            subscriptions in prop::collection::vec(subscription(), 0..20),
            events in prop::collection::vec(event(), 1..12),
        ) {
            let channels = channels();
            let channel = channels.get("users_insert").unwrap().clone();
            let stats = Arc::new(Counters::default());
            let budget = Arc::new(Semaphore::new(1_000));
            let mut registry = Registry::new(channels, stats, budget);
            let mut receivers = Vec::new();
            for (filters, unsubscribed, gone) in &subscriptions {
                let (tx, rx) = crossbeam_channel::bounded(64);
                let mut subscription = Subscription::new("users", Operation::Insert);
                for f in filters {
                    subscription = subscription.filter(f.clone());
                }
                let id = registry.add(subscription, Sink::Channel(tx)).unwrap();
                receivers.push((id, (!gone).then_some(rx)));
                if *unsubscribed {
                    let slot = registry.by_id[&id];
                    registry.remove(slot).unwrap();
                }
            }
            let events: Vec<ChangeEvent> = events
                .into_iter()
                .map(|(key, extra)| {
                    let extra: Map<String, Value> = extra
                        .into_iter()
                        .map(|(email, v)| ((if email { "email" } else { "score" }).to_string(), v))
                        .collect();
                    ChangeEvent::new(channel.clone(), Key::Single(key), extra, &RawNotification::new("", ""), false)
                })
                .collect();
            let (mut tally, mut found) = (Tally::default(), registry.found());
            for event in &events {
                registry.route(event.clone(), &mut tally, &mut found);
            }
            // The linear scan: every subscription still subscribed, every event; a gone
            // receiver loses the first event it is selected for and is counted as filtered
            // for nothing after that.
            let (mut delivered, mut filtered, mut dropped) = (0, 0, 0);
            for (i, (filters, unsubscribed, gone)) in subscriptions.iter().enumerate() {
                if *unsubscribed {
                    continue;
                }
                let mut open = true;
                let mut expected = Vec::new();
                for (n, event) in events.iter().enumerate() {
                    if !open {
                        continue;
                    }
                    if filters.iter().all(|f| f.matches(event)) {
                        if *gone {
                            open = false;
                            dropped += 1;
                        } else {
                            delivered += 1;
                            expected.push(n);
                        }
                    } else {
                        filtered += 1;
                    }
                }
                if let Some(rx) = &receivers[i].1 {
                    let got: Vec<usize> = rx
                        .try_iter()
                        .map(|e| events.iter().position(|x| x.id() == e.id() && x.extra_columns() == e.extra_columns()).unwrap())
                        .collect();
                    // Events may repeat (same key and columns): compare what they carry.
                    let carried = |ns: &[usize]| ns.iter().map(|n| (events[*n].id().to_string(), events[*n].extra_columns().clone())).collect::<Vec<_>>();
                    prop_assert_eq!(carried(&got), carried(&expected), "subscription {}", i);
                }
            }
            prop_assert_eq!((tally.delivered, tally.filtered, tally.dropped), (delivered, filtered, dropped));
        }
    }
}
