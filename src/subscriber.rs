//! Subscriber adapters and per-subscriber buffering.
//!
//! [`Sink`] is the registry's view of a subscriber: a user's actor, a closure run by its
//! arbiter's closure host (`src/closure_host.rs`, which catches panics), or a bounded channel for
//! blocking code — read by the user, or by a thread of its own that runs a blocking closure
//! ([`spawn_blocking_subscriber`]). Delivery is non-blocking (`try_send`); what does not fit waits in the
//! subscriber's [`Buffer`], where its [`OverflowPolicy`] decides what happens when full.
//! Each buffered event holds a [`Ticket`]: its units of the pipeline's in-flight budget, given
//! back when the event is handed over or dropped, so a stalled subscriber eventually stops the
//! listener instead of growing memory — unless it is an event stream (the web endpoint's
//! clients), whose events the registry takes back when it is stuck (`src/registry.rs`).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::Semaphore;

use crate::acked::{HeldRefused, HeldSink};
use crate::closure_host::{FnSink, Outbox};
use crate::event::ChangeEvent;
use crate::lifecycle::Flush;
use crate::stats::Counters;
use crate::status::StatusEvent;
use crate::stream_sink::{StreamRefused, StreamSink};
use crate::subscription::OverflowPolicy;

/// Where a subscription's events go.
pub(crate) enum Sink {
    /// A user's actor.
    Recipient(Recipient<ChangeEvent>),
    /// A closure, run by its arbiter's closure host.
    Fn(FnSink),
    /// A bounded channel read by blocking code.
    Channel(crossbeam_channel::Sender<ChangeEvent>),
    /// An acknowledged subscription: each event is held until acknowledged.
    Held(HeldSink),
    /// One async reader's channel, shared by its subscriptions (the SSE endpoint).
    Stream(StreamSink),
}

/// Why an event could not be handed over.
pub(crate) enum Refused {
    /// The subscriber's mailbox is full: keep the event and retry.
    Full(ChangeEvent),
    /// The subscriber is gone: remove the subscription.
    Closed,
}

impl Sink {
    /// Hands `event` over; a closure's events go into `outbox`, sent to its host when the
    /// registry flushes it.
    pub fn try_deliver(&self, event: ChangeEvent, outbox: &mut Outbox) -> Result<(), Refused> {
        match self {
            Sink::Recipient(r) => r.try_send(event).map_err(|e| match e {
                SendError::Full(event) => Refused::Full(event),
                SendError::Closed(_) => Refused::Closed,
            }),
            Sink::Fn(sink) => sink.try_deliver(event, outbox).map_err(|e| match e {
                Some(event) => Refused::Full(event),
                None => Refused::Closed,
            }),
            Sink::Channel(tx) => tx.try_send(event).map_err(|e| match e {
                crossbeam_channel::TrySendError::Full(event) => Refused::Full(event),
                crossbeam_channel::TrySendError::Disconnected(_) => Refused::Closed,
            }),
            Sink::Held(held) => held.try_deliver(event).map_err(|e| match e {
                HeldRefused::Full(event) => Refused::Full(event),
                HeldRefused::Closed => Refused::Closed,
            }),
            Sink::Stream(stream) => stream.try_deliver(event).map_err(|e| match e {
                StreamRefused::Full(event) => Refused::Full(event),
                StreamRefused::Closed => Refused::Closed,
            }),
        }
    }

    /// Called for an event this sink selected before it is buffered or handed over.
    pub fn selected(&self, event: &ChangeEvent) {
        match self {
            Sink::Held(held) => held.hold(event),
            Sink::Stream(stream) => stream.selected(event),
            _ => {}
        }
    }

    /// Called when the subscription is unsubscribed (not when the notifier stops), before
    /// its buffer is discarded and the sink dropped.
    pub fn unsubscribed(&self) {
        if let Sink::Held(held) = self {
            held.unsubscribed();
        }
    }

    /// The event stream this sink feeds, if it is one.
    pub fn stream(&self) -> Option<&StreamSink> {
        match self {
            Sink::Stream(stream) => Some(stream),
            _ => None,
        }
    }

    /// For an event stream whose reader is cut off rather than lose `oldest`, the event a
    /// full buffer would drop ([`StreamSink::cuts_rather_than_drop`]): cuts it and returns
    /// its key. `None` for any other.
    pub fn cut_rather_than_drop(&self, oldest: &ChangeEvent) -> Option<u64> {
        let stream = self.stream().filter(|s| s.cuts_rather_than_drop(oldest))?;
        stream.cut();
        Some(stream.key())
    }

    /// Called for a selected event this sink will never hand over.
    pub fn lost(&self, event: &ChangeEvent) {
        match self {
            Sink::Held(held) => held.lost(event),
            Sink::Stream(stream) => stream.lost(event),
            _ => {}
        }
    }
}

/// An event's units of the pipeline's in-flight budget (one, and its payload's weight),
/// returned when dropped.
pub(crate) struct Ticket(Arc<Semaphore>, usize);

impl Ticket {
    pub fn new(budget: &Arc<Semaphore>, units: usize) -> Rc<Ticket> {
        Rc::new(Ticket(budget.clone(), units))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.add_permits(self.1);
    }
}

/// Events waiting for one subscriber, under its overflow policy.
pub(crate) struct Buffer {
    queue: VecDeque<(ChangeEvent, Rc<Ticket>)>,
    policy: OverflowPolicy,
    capacity: usize,
    /// Events this subscriber lost (dropped by the policy, or discarded because the
    /// subscriber went away) since the last `Lagged` notice.
    pub dropped: u64,
}

impl Buffer {
    pub fn new(policy: OverflowPolicy, capacity: usize) -> Self {
        Buffer {
            queue: VecDeque::new(),
            policy,
            capacity: capacity.max(1),
            dropped: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// The event one more makes `DropOldest` drop, when it holds as many as its size.
    pub fn full_of(&self) -> Option<&ChangeEvent> {
        (self.queue.len() >= self.capacity)
            .then(|| self.queue.front().map(|(event, _)| event))
            .flatten()
    }

    /// Buffers `event`, applying the policy if full; `sink` is told of every event dropped.
    /// Returns how many events were dropped.
    pub fn push(&mut self, event: ChangeEvent, ticket: Rc<Ticket>, sink: &Sink) -> u64 {
        let before = self.dropped;
        match self.policy {
            OverflowPolicy::Wait => {}
            OverflowPolicy::KeepLatestPerKey => {
                let same = self
                    .queue
                    .iter()
                    .position(|(e, _)| e.channel() == event.channel() && e.id() == event.id());
                if let Some(pos) = same {
                    let (replaced, _) = std::mem::replace(&mut self.queue[pos], (event, ticket));
                    sink.lost(&replaced);
                    self.dropped += 1;
                    return self.dropped - before;
                }
                self.make_room(sink);
            }
            OverflowPolicy::DropOldest => self.make_room(sink),
        }
        self.queue.push_back((event, ticket));
        self.dropped - before
    }

    fn make_room(&mut self, sink: &Sink) {
        while self.queue.len() >= self.capacity {
            if let Some((event, _)) = self.queue.pop_front() {
                sink.lost(&event);
            }
            self.dropped += 1;
        }
    }

    /// Hands buffered events to `sink` until it refuses. Returns how many were handed over,
    /// and — when the sink is gone — how many were lost with it (every event still buffered,
    /// counted in `dropped`).
    pub fn drain_into(&mut self, sink: &Sink, outbox: &mut Outbox) -> (u64, Option<u64>) {
        let mut handed = 0;
        while let Some((event, ticket)) = self.queue.pop_front() {
            match sink.try_deliver(event, outbox) {
                Ok(()) => handed += 1,
                Err(Refused::Full(event)) => {
                    self.queue.push_front((event, ticket));
                    return (handed, None);
                }
                Err(Refused::Closed) => {
                    self.dropped += 1;
                    return (handed, Some(1 + self.discard(sink)));
                }
            }
        }
        (handed, None)
    }

    /// Throws away every buffered event (the subscriber is gone or removed), counting them in
    /// `dropped`. Returns how many there were.
    pub fn discard(&mut self, sink: &Sink) -> u64 {
        let lost = self.queue.len() as u64;
        for (event, _) in self.queue.drain(..) {
            sink.lost(&event);
        }
        self.dropped += lost;
        lost
    }
}

/// Mailbox capacity of status closures.
pub(crate) const FN_MAILBOX_CAPACITY: usize = 1024;

/// An actor that runs a closure for every status message, catching panics.
pub(crate) struct FnSubscriber<M> {
    f: Box<dyn FnMut(M)>,
    stats: Arc<Counters>,
}

impl<M> FnSubscriber<M> {
    pub fn new(f: impl FnMut(M) + 'static, stats: Arc<Counters>) -> Self {
        FnSubscriber {
            f: Box::new(f),
            stats,
        }
    }

    fn call(&mut self, message: M) {
        call_catching(&mut self.f, message, &self.stats);
    }
}

/// Runs a subscriber closure; a panic is caught, logged and counted.
pub(crate) fn call_catching<M>(f: &mut dyn FnMut(M), message: M, stats: &Counters) {
    if catch_unwind(AssertUnwindSafe(|| f(message))).is_err() {
        Counters::add(&stats.subscriber_panics, 1);
        log::error!("sqlnotify: a subscriber closure panicked; continuing with the next event");
    }
}

/// Starts a thread (`sqlnotify-subscriber`) that runs `f` for every event sent into the
/// returned bounded channel of `capacity`, catching panics, until the sender is dropped and
/// the channel is empty; then `finished` resolves.
pub(crate) fn spawn_blocking_subscriber(
    capacity: usize,
    mut f: impl FnMut(ChangeEvent) + Send + 'static,
    stats: Arc<Counters>,
) -> std::io::Result<(
    crossbeam_channel::Sender<ChangeEvent>,
    tokio::sync::oneshot::Receiver<()>,
)> {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let (finished_tx, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("sqlnotify-subscriber".into())
        .spawn(move || {
            for event in rx {
                call_catching(&mut f, event, &stats);
            }
            let _ = finished_tx.send(());
        })?;
    Ok((tx, finished))
}

impl<M: 'static> Actor for FnSubscriber<M> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Bursts go straight into the mailbox instead of waiting in the registry's buffer.
        ctx.set_mailbox_capacity(FN_MAILBOX_CAPACITY);
    }
}

impl Handler<StatusEvent> for FnSubscriber<StatusEvent> {
    type Result = ();

    fn handle(&mut self, status: StatusEvent, _: &mut Context<Self>) {
        self.call(status);
    }
}

impl<M: 'static> Handler<Flush> for FnSubscriber<M> {
    type Result = ();

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Key, RawNotification};
    use serde_json::{json, Map};
    use std::sync::atomic::Ordering;

    fn event(id: i64) -> ChangeEvent {
        let channel = crate::event::test_channel(crate::tier::Tier::Notify);
        let raw = RawNotification::new("c", "");
        ChangeEvent::new(channel, Key::Single(json!(id)), Map::new(), &raw, false)
    }

    fn ids(rx: &crossbeam_channel::Receiver<ChangeEvent>) -> Vec<i64> {
        rx.try_iter().map(|e| e.id().as_i64().unwrap()).collect()
    }

    #[test]
    fn drain_counts_what_was_handed_over_and_what_a_gone_sink_lost() {
        let budget = Arc::new(Semaphore::new(0));
        let mut buffer = Buffer::new(OverflowPolicy::DropOldest, 3);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let sink = Sink::Channel(tx);
        for id in 1..=5 {
            buffer.push(event(id), Ticket::new(&budget, 1), &sink);
        }
        assert_eq!((buffer.len(), buffer.dropped), (3, 2));
        assert_eq!(
            budget.available_permits(),
            2,
            "dropped events gave their budget back"
        );

        assert_eq!(
            buffer.drain_into(&sink, &mut Outbox::default()),
            (1, None),
            "one fits; the rest wait"
        );
        assert_eq!(ids(&rx), [3]);
        drop(rx);
        assert_eq!(
            buffer.drain_into(&sink, &mut Outbox::default()),
            (0, Some(2)),
            "the receiver is gone"
        );
        assert_eq!((buffer.len(), buffer.dropped), (0, 4));
        assert_eq!(budget.available_permits(), 5);
    }

    #[test]
    fn discard_counts_every_waiting_event_as_dropped_and_releases_its_holds() {
        let budget = Arc::new(Semaphore::new(0));
        let holds = Arc::new(crate::holds::Holds::default());
        let (held, _deliveries) = crate::acked::held_channel(1, holds.clone());
        let sink = Sink::Held(held);
        let mut buffer = Buffer::new(OverflowPolicy::Wait, 1);
        for id in 1..=4 {
            let event = event(id).placed(id as u64, 0);
            sink.selected(&event);
            buffer.push(event, Ticket::new(&budget, 1), &sink);
        }
        assert_eq!((buffer.len(), buffer.dropped), (4, 0), "Wait never drops");
        assert_eq!(holds.floor(), Some(1));
        assert_eq!(buffer.discard(&sink), 4);
        assert_eq!((buffer.len(), buffer.dropped), (0, 4));
        assert_eq!(holds.floor(), None, "a discarded event holds nothing back");
        assert_eq!(buffer.discard(&sink), 0);
        assert_eq!(budget.available_permits(), 4);
    }

    #[test]
    fn a_blocking_subscriber_runs_every_event_in_order_and_survives_panics() {
        let stats = Arc::new(Counters::default());
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let (tx, mut finished) = spawn_blocking_subscriber(
            2,
            move |e: ChangeEvent| {
                let id = e.id().as_i64().unwrap();
                if id == 2 {
                    panic!("handler fails on 2");
                }
                seen_tx.send(id).unwrap();
            },
            stats.clone(),
        )
        .unwrap();
        for id in 1..=4 {
            tx.send(event(id)).unwrap();
        }
        drop(tx);
        assert_eq!(seen.iter().collect::<Vec<_>>(), [1, 3, 4]);
        // The thread has ended (its closure, and with it `seen_tx`, is gone).
        assert_eq!(finished.try_recv(), Ok(()));
        assert_eq!(stats.subscriber_panics.load(Ordering::Relaxed), 1);
    }
}
