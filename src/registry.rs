//! The registry actor: holds subscriptions and routes each decoded event to the subscribers
//! whose channel, operation and filters match.
//!
//! Subscriptions are added and removed by message ([`Subscribe`], [`Unsubscribe`]), so users
//! who wire actors themselves can talk to the registry's `Addr` directly. A subscription is
//! checked when it is made — an unwatched table/operation/label or a filter on a column the
//! channel does not carry is an error then, not a subscription that silently never fires.
//! Events arrive from the decoder in commit order and are handed out in that order.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use futures_util::future::join_all;

use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Channels};
use crate::filter::Filter;
use crate::stats::Counters;
use crate::subscriber::{Delivery, Flush, Sink};
use crate::subscription::{Subscription, SubscriptionId};

struct Subscriber {
    id: SubscriptionId,
    filters: Vec<Filter>,
    sink: Sink,
}

/// Routes events to subscribers. Started by the notifier; reach it with
/// [`Notifier::registry`](crate::Notifier::registry).
pub struct Registry {
    channels: Arc<Channels>,
    by_channel: HashMap<String, Vec<Subscriber>>,
    next_id: u64,
    stats: Arc<Counters>,
}

impl Registry {
    pub(crate) fn new(channels: Arc<Channels>, stats: Arc<Counters>) -> Self {
        Registry {
            channels,
            by_channel: HashMap::new(),
            next_id: 1,
            stats,
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
            });
        log::debug!("sqlnotify: subscription {id} on {}", channel.name());
        self.stats.has_subscriber.store(true, Ordering::Release);
        Ok(id)
    }

    fn route(&mut self, event: ChangeEvent) {
        if let Some(sequence) = event.sequence() {
            self.stats
                .routed_sequence
                .fetch_max(sequence, Ordering::Relaxed);
        }
        let Some(subscribers) = self.by_channel.get_mut(event.channel()) else {
            Counters::add(&self.stats.unrouted, 1);
            return;
        };
        let (mut delivered, mut filtered) = (0, 0);
        subscribers.retain(|s| {
            if !s.filters.iter().all(|f| f.matches(&event)) {
                filtered += 1;
                return true;
            }
            match s.sink.deliver(event.clone()) {
                Delivery::Delivered => {
                    delivered += 1;
                    true
                }
                Delivery::Closed => {
                    log::debug!("sqlnotify: subscriber {} is gone; removing it", s.id);
                    false
                }
            }
        });
        if delivered == 0 && filtered == 0 {
            Counters::add(&self.stats.unrouted, 1);
        }
        Counters::add(&self.stats.delivered, delivered);
        Counters::add(&self.stats.filtered_out, filtered);
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

/// Decoded events, in commit order, from the decoder.
pub(crate) struct Route(pub Vec<ChangeEvent>);

impl Message for Route {
    type Result = ();
}

impl Handler<Route> for Registry {
    type Result = ();

    fn handle(&mut self, Route(events): Route, _: &mut Context<Self>) {
        for event in events {
            self.route(event);
        }
    }
}

impl Handler<Flush> for Registry {
    type Result = ResponseFuture<()>;

    /// Everything routed before the flush has been handed out; closures have also run.
    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        let pending: Vec<_> = self
            .by_channel
            .values()
            .flatten()
            .filter_map(|s| match &s.sink {
                Sink::Fn(addr) => Some(addr.send(Flush)),
                _ => None,
            })
            .collect();
        Box::pin(async move {
            join_all(pending).await;
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
        ctx.stop();
    }
}
