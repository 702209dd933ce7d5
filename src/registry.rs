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

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::join_all;
use tokio::sync::{oneshot, Semaphore};

use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Channels};
use crate::filter::Filter;
use crate::stats::Counters;
use crate::status::{Status, StatusEvent};
use crate::subscriber::{Buffer, Flush, FnSubscriber, Refused, Sink, Ticket};
use crate::subscription::{Subscription, SubscriptionId};

/// Retry interval while a subscriber's mailbox stays full.
const RETRY: Duration = Duration::from_millis(1);
/// Retries after a yield without progress before falling back to the timer.
const YIELD_RETRIES: u32 = 3;

struct Subscriber {
    id: SubscriptionId,
    filters: Vec<Filter>,
    sink: Sink,
    buffer: Buffer,
    closed: bool,
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
        }
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
            tally.delivered += 1;
            let event = if s.buffer.is_empty() {
                match s.sink.try_deliver(event.clone()) {
                    Ok(()) => continue,
                    Err(Refused::Closed) => {
                        s.closed = true;
                        continue;
                    }
                    Err(Refused::Full(event)) => event,
                }
            } else {
                event.clone()
            };
            let ticket = ticket.get_or_insert_with(|| Ticket::new(budget)).clone();
            tally.dropped += s.buffer.push(event, ticket);
            tally.buffered = true;
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
        let (mut progress, mut waiting, mut lagged, mut queued) = (false, false, Vec::new(), 0);
        for s in self.by_channel.values_mut().flatten() {
            if !s.buffer.is_empty() && !s.closed {
                let (handed, closed) = s.buffer.drain_into(&s.sink);
                progress |= handed > 0;
                s.closed |= closed;
            }
            if s.buffer.dropped > 0 {
                lagged.push((s.id, std::mem::take(&mut s.buffer.dropped)));
            }
            if !s.closed {
                waiting |= !s.buffer.is_empty();
                queued += s.buffer.len();
            }
        }
        self.prune();
        self.stats.queued.store(queued as u64, Ordering::Relaxed);
        for (subscription, dropped) in lagged {
            self.publish(Status::Lagged {
                subscription,
                dropped,
            });
        }
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

    fn handle(&mut self, Unsubscribe(id): Unsubscribe, _: &mut Context<Self>) -> Self::Result {
        for subscribers in self.by_channel.values_mut() {
            if let Some(pos) = subscribers.iter().position(|s| s.id == id) {
                subscribers.remove(pos);
                return Ok(());
            }
        }
        Err(Error::UnknownSubscription { id: id.0 })
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
    buffered: bool,
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
        if tally.buffered || stats.queued.load(Ordering::Relaxed) > 0 {
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

/// Stops the actor (after what is already in its mailbox).
pub(crate) struct Shutdown;

impl Message for Shutdown {
    type Result = ();
}

impl Handler<Shutdown> for Registry {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        self.by_channel.clear();
        self.status.clear();
        ctx.stop();
    }
}
