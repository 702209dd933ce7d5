//! Subscriber adapters: where the registry can deliver events besides a user's own actor.
//!
//! [`Sink`] is the registry's view of a subscriber. [`FnSubscriber`] wraps a closure in an
//! actor of its own, so a slow closure never blocks routing and a panicking one is caught
//! and counted instead of taking the arbiter down.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use actix::prelude::*;

use crate::event::ChangeEvent;
use crate::stats::Counters;

/// Where a subscription's events go.
pub(crate) enum Sink {
    /// A user's actor.
    Recipient(Recipient<ChangeEvent>),
    /// A closure running in its own actor.
    Fn(Addr<FnSubscriber>),
    /// A channel read by blocking code.
    Channel(crossbeam_channel::Sender<ChangeEvent>),
}

/// Outcome of handing one event to a sink.
pub(crate) enum Delivery {
    Delivered,
    /// The receiving end is gone: the subscription should be removed.
    Closed,
}

impl Sink {
    pub fn deliver(&self, event: ChangeEvent) -> Delivery {
        let closed = match self {
            Sink::Recipient(r) => match r.try_send(event) {
                Ok(()) => false,
                // A full mailbox still gets the event: mailbox policies arrive with bounded
                // delivery; dropping here would lose events silently.
                Err(SendError::Full(event)) => {
                    r.do_send(event);
                    false
                }
                Err(SendError::Closed(_)) => true,
            },
            Sink::Fn(addr) => {
                if addr.connected() {
                    addr.do_send(event);
                    false
                } else {
                    true
                }
            }
            Sink::Channel(tx) => tx.send(event).is_err(),
        };
        if closed {
            Delivery::Closed
        } else {
            Delivery::Delivered
        }
    }
}

/// An actor that runs a closure for every event, catching panics.
pub(crate) struct FnSubscriber {
    f: Box<dyn FnMut(ChangeEvent)>,
    stats: Arc<Counters>,
}

impl FnSubscriber {
    pub fn new(f: impl FnMut(ChangeEvent) + 'static, stats: Arc<Counters>) -> Self {
        FnSubscriber {
            f: Box::new(f),
            stats,
        }
    }
}

impl Actor for FnSubscriber {
    type Context = Context<Self>;
}

impl Handler<ChangeEvent> for FnSubscriber {
    type Result = ();

    fn handle(&mut self, event: ChangeEvent, _: &mut Context<Self>) {
        let channel = event.channel().to_string();
        if catch_unwind(AssertUnwindSafe(|| (self.f)(event))).is_err() {
            Counters::add(&self.stats.subscriber_panics, 1);
            log::error!(
                "sqlnotify: a subscriber closure panicked on an event from {channel}; continuing"
            );
        }
    }
}

/// Resolves once every event sent before it has been handled.
pub(crate) struct Flush;

impl Message for Flush {
    type Result = ();
}

impl Handler<Flush> for FnSubscriber {
    type Result = ();

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) {}
}
