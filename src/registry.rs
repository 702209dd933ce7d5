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
//! Counting: an event a subscription selects is `delivered` once it is handed to the
//! subscriber (its mailbox, channel or closure actor), or `dropped` if it never is — its
//! policy discarded it, its receiver was gone, or it was unsubscribed while the event waited.
//! Drops are reported per subscription in [`Status::Lagged`], at most once per lag interval
//! (the first drop at once, then what accumulated, when the interval has passed); what is still
//! unreported when a subscription ends or the notifier stops is reported then.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::join_all;
use tokio::sync::{oneshot, Semaphore};

use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Channels};
use crate::filter::Filter;
use crate::lifecycle::{Flush, Shutdown};
use crate::stats::Counters;
use crate::status::{Status, StatusEvent};
use crate::subscriber::{Buffer, FnSubscriber, Refused, Sink, Ticket};
use crate::subscription::{Subscription, SubscriptionId};

/// Retry interval while a subscriber's mailbox stays full.
const RETRY: Duration = Duration::from_millis(1);
/// Retries after a yield without progress before falling back to the timer.
const YIELD_RETRIES: u32 = 3;
/// Default shortest time between two `Lagged` notices for one subscription.
pub(crate) const LAG_INTERVAL: Duration = Duration::from_secs(1);

struct Subscriber {
    id: SubscriptionId,
    filters: Vec<Filter>,
    sink: Sink,
    buffer: Buffer,
    closed: bool,
    /// When its last `Lagged` notice went out.
    lag_reported: Option<Instant>,
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
    by_channel: HashMap<String, Vec<Subscriber>>,
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
            status: Vec::new(),
            next_id: 1,
            stats,
            budget,
            retry_pending: false,
            idle_retries: 0,
            flush_waiters: Vec::new(),
            lag_interval: LAG_INTERVAL,
            lag_timer: None,
        }
    }

    /// Sets the shortest time between two `Lagged` notices for one subscription.
    pub(crate) fn lag_interval(mut self, every: Duration) -> Self {
        self.lag_interval = every;
        self
    }

    fn add(&mut self, subscription: Subscription, sink: Sink) -> Result<SubscriptionId> {
        let channel = self.channels.find(
            subscription.schema.as_deref(),
            &subscription.table,
            subscription.operation,
            subscription.label.as_deref(),
        )?;
        if let Some(f) = subscription
            .filters
            .iter()
            .find(|f| !channel.carries(f.column()))
        {
            return Err(Error::UnknownFilterColumn {
                channel: channel.name().to_string(),
                column: f.column().to_string(),
                available: channel
                    .key_columns()
                    .iter()
                    .chain(channel.extra_columns())
                    .cloned()
                    .collect(),
            });
        }
        let id = SubscriptionId(self.next_id);
        self.next_id += 1;
        self.by_channel
            .entry(channel.name().to_string())
            .or_default()
            .push(Subscriber {
                id,
                filters: subscription.filters,
                sink,
                buffer: Buffer::new(subscription.policy, subscription.buffer),
                closed: false,
                lag_reported: None,
            });
        log::debug!("sqlnotify: subscription {id} on {}", channel.name());
        self.stats.has_subscriber.store(true, Ordering::Release);
        Ok(id)
    }

    /// Routes one event, adding to `tally`. The event's unit of in-flight budget goes into a
    /// [`Ticket`] only if some buffer keeps the event; otherwise the caller gives it back.
    fn route(&mut self, event: ChangeEvent, tally: &mut Tally) {
        if let Some(sequence) = event.sequence() {
            tally.sequence = tally.sequence.max(sequence);
        }
        let budget = &self.budget;
        let Some(subscribers) = self.by_channel.get_mut(event.channel()) else {
            tally.unrouted += 1;
            tally.release += 1;
            return;
        };
        let (mut considered, mut ticket) = (false, None);
        for s in subscribers.iter_mut().filter(|s| !s.closed) {
            considered = true;
            if !s.filters.iter().all(|f| f.matches(&event)) {
                tally.filtered += 1;
                continue;
            }
            let event = if s.buffer.is_empty() {
                match s.sink.try_deliver(event.clone()) {
                    Ok(()) => {
                        tally.delivered += 1;
                        continue;
                    }
                    Err(Refused::Closed) => {
                        // Lost with its subscriber; pump() reports and removes it.
                        s.closed = true;
                        s.buffer.dropped += 1;
                        tally.dropped += 1;
                        tally.pump = true;
                        continue;
                    }
                    Err(Refused::Full(event)) => event,
                }
            } else {
                event.clone()
            };
            let ticket = ticket.get_or_insert_with(|| Ticket::new(budget)).clone();
            tally.dropped += s.buffer.push(event, ticket);
            tally.pump = true;
        }
        if !considered {
            tally.unrouted += 1;
        }
        if ticket.is_none() {
            tally.release += 1;
        }
    }

    /// Hands buffered events over; reports lag; schedules the next retry if needed.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let (mut progress, mut waiting, mut queued) = (false, false, 0);
        let (mut delivered, mut lost) = (0, 0);
        for s in self.by_channel.values_mut().flatten() {
            if !s.buffer.is_empty() && !s.closed {
                let (handed, gone) = s.buffer.drain_into(&s.sink);
                progress |= handed > 0;
                delivered += handed;
                if let Some(n) = gone {
                    s.closed = true;
                    lost += n;
                }
            }
            if !s.closed {
                waiting |= !s.buffer.is_empty();
                queued += s.buffer.len();
            }
        }
        Counters::add(&self.stats.delivered, delivered);
        Counters::add(&self.stats.dropped, lost);
        self.stats.queued.store(queued as u64, Ordering::Relaxed);
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
        for s in self.by_channel.values_mut().flatten() {
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

    /// Removes subscriptions whose receiver is gone.
    fn prune(&mut self) {
        for subscribers in self.by_channel.values_mut() {
            subscribers.retain(|s| {
                if s.closed {
                    log::debug!("sqlnotify: subscriber {} is gone; removing it", s.id);
                }
                !s.closed
            });
        }
    }

    fn publish(&mut self, status: Status) {
        let event = StatusEvent::now(status);
        self.status.retain(|sink| match sink {
            StatusSink::Recipient(r) => r.try_send(event.clone()).is_ok() || r.connected(),
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
        let removed = self.by_channel.values_mut().find_map(|subscribers| {
            let pos = subscribers.iter().position(|s| s.id == id)?;
            Some(subscribers.remove(pos))
        });
        let Some(mut s) = removed else {
            return Err(Error::UnknownSubscription { id: id.0 });
        };
        // What was still waiting for it is lost: count and report it with the rest.
        Counters::add(&self.stats.dropped, s.buffer.discard());
        if s.buffer.dropped > 0 {
            self.publish(Status::Lagged {
                subscription: s.id,
                dropped: s.buffer.dropped,
            });
        }
        self.pump(ctx);
        Ok(())
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
    /// Budget units to give back (events no buffer kept).
    release: usize,
    /// Some buffer kept an event, or a subscriber is gone: pump() has work.
    pump: bool,
    sequence: i64,
}

/// Decoded events, in commit order, from the decoder.
pub(crate) struct Route(pub Vec<ChangeEvent>);

impl Message for Route {
    type Result = ();
}

impl Handler<Route> for Registry {
    type Result = ();

    fn handle(&mut self, Route(events): Route, ctx: &mut Context<Self>) {
        let mut tally = Tally::default();
        let count = events.len() as u64;
        for event in events {
            self.route(event, &mut tally);
        }
        // Shared counters and the budget are touched once per batch, not once per event.
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
        let closures: Vec<_> = self
            .by_channel
            .values()
            .flatten()
            .filter_map(|s| match &s.sink {
                Sink::Fn(addr) => Some(addr.clone()),
                _ => None,
            })
            .collect();
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
        let lost: u64 = self
            .by_channel
            .values_mut()
            .flatten()
            .map(|s| s.buffer.discard())
            .sum();
        Counters::add(&self.stats.dropped, lost);
        self.report_lag(ctx, true);
        self.by_channel.clear();
        self.status.clear();
        ctx.stop();
    }
}
