//! Acknowledged subscriptions, the subscriber's side: each [`Delivery`] carries its event and
//! the [`Ack`] that lets the named consumer's position move past it.
//!
//! How a subscription ends decides what becomes of the events it selected and did not hand
//! over. Unsubscribed, it lets them go, like the events waiting in its buffer: their holds are
//! released (the registry's discard; [`Deliveries`] dropped after it, for those still in the
//! channel; a handler, for those it received and had not started). Its receiver gone without
//! an unsubscribe — a handler whose actor stopped, a [`Deliveries`] dropped — it keeps the
//! first of them held, as a dropped [`Ack`] does: the position stays before it while the
//! process runs, and a restart delivers it (and everything after it) again. The notifier
//! stopping keeps what is in hand held too: a restart delivers it again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::event::ChangeEvent;
use crate::holds::{Ack, Holds};

/// One event of an acknowledged subscription and its acknowledgement.
#[derive(Debug)]
#[non_exhaustive]
pub struct Delivery {
    /// The event.
    pub event: ChangeEvent,
    /// Say it is done with; until then the named consumer's position stays before it.
    pub ack: Ack,
}

/// The receiving end of an acknowledged subscription
/// ([`Notifier::subscribe_acked`](crate::Notifier::subscribe_acked)), in commit order.
///
/// Dropped after [`Notifier::unsubscribe`](crate::Notifier::unsubscribe), it lets go of the
/// deliveries still waiting in it unreceived, as the subscription's buffer does. Dropped
/// without one, it leaves the first event it did not hand over unacknowledged, like a dropped
/// [`Ack`]: the named consumer's position stays before it until the notifier stops, and it is
/// delivered again after a restart.
#[derive(Debug)]
pub struct Deliveries {
    rx: mpsc::Receiver<Delivery>,
    /// Set by the registry when the subscription is unsubscribed (not when the notifier stops).
    unsubscribed: Arc<AtomicBool>,
}

impl Deliveries {
    /// The next delivery; `None` once the subscription is gone (unsubscribed, or the notifier
    /// stopped) and everything sent before was received.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// The next delivery if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }

    /// Whether the subscription was unsubscribed (rather than ended by the notifier's stop):
    /// once [`recv`](Self::recv) returned `None`, why the deliveries ended.
    pub(crate) fn unsubscribed(&self) -> bool {
        self.unsubscribed.load(Ordering::Acquire)
    }
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        if self.unsubscribed() {
            // Nothing more comes (the registry drops its sender once it set the flag): what
            // waits unreceived is let go, as the subscription's buffer was.
            self.rx.close();
            while let Ok(delivery) = self.rx.try_recv() {
                delivery.ack.let_go();
            }
        }
    }
}

/// The registry's end of an acknowledged subscription.
pub(crate) struct HeldSink {
    tx: mpsc::Sender<Delivery>,
    holds: Arc<Holds>,
    /// Shared with [`Deliveries`]: set by [`unsubscribed`](Self::unsubscribed).
    unsubscribed: Arc<AtomicBool>,
    /// Whether the receiver was found gone: the first event refused then stays held.
    closed: AtomicBool,
}

/// A bounded acknowledged subscription's two ends.
pub(crate) fn held_channel(capacity: usize, holds: Arc<Holds>) -> (HeldSink, Deliveries) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let unsubscribed = Arc::new(AtomicBool::new(false));
    let sink = HeldSink {
        tx,
        holds,
        unsubscribed: unsubscribed.clone(),
        closed: AtomicBool::new(false),
    };
    (sink, Deliveries { rx, unsubscribed })
}

/// Why a held event was not handed over.
pub(crate) enum HeldRefused {
    Full(ChangeEvent),
    Closed,
}

impl HeldSink {
    /// Holds `event` (before it counts as settled), so the position waits for its ack.
    pub fn hold(&self, event: &ChangeEvent) {
        self.holds.hold(event.ordinal());
    }

    /// Releases an event this subscription will never hand over: it was unsubscribed (or the
    /// notifier stops), or its receiver is gone and an earlier event stays held.
    pub fn lost(&self, event: &ChangeEvent) {
        self.holds.release(event.ordinal());
    }

    /// The subscription is being unsubscribed (the registry drops this sink next): its
    /// [`Deliveries`], and a handler reading them, let go of what they did not hand over or
    /// start.
    pub fn unsubscribed(&self) {
        self.unsubscribed.store(true, Ordering::Release);
    }

    /// Hands `event` over with its [`Ack`]. A receiver found gone refuses it `Closed`, and the
    /// first event so refused stays held: the position may not pass the events its subscriber
    /// never took. The later ones — refused, or discarded from the buffer — are released
    /// behind it: one hold, not one per event.
    pub fn try_deliver(&self, event: ChangeEvent) -> Result<(), HeldRefused> {
        let ack = Ack::new(event.ordinal(), self.holds.clone());
        match self.tx.try_send(Delivery { event, ack }) {
            Ok(()) => Ok(()),
            // The ack is dropped unused: the hold stays, as it should.
            Err(mpsc::error::TrySendError::Full(d)) => Err(HeldRefused::Full(d.event)),
            Err(mpsc::error::TrySendError::Closed(d)) => {
                if self.closed.swap(true, Ordering::Relaxed) {
                    self.lost(&d.event);
                } else {
                    // Its Ack goes unused with `d`: the hold stays, on the first of the events
                    // this subscriber did not take.
                    log::warn!(
                        "sqlnotify: an acknowledged subscription's receiver is gone without an \
                         unsubscribe (a handler whose actor stopped?): the named consumer's \
                         position stays before {}.{} key {} until the notifier stops, and a \
                         restart delivers it again",
                        d.event.schema(),
                        d.event.table(),
                        d.event.id()
                    );
                }
                Err(HeldRefused::Closed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::event::test_event as event;

    /// What the registry does with an event it selects for a held sink: holds it, then hands
    /// it over — or, refused `Closed`, counts it lost (as `Buffer::discard` does after).
    fn offer(sink: &HeldSink, ordinal: u64) -> bool {
        let event = event(ordinal);
        sink.hold(&event);
        sink.try_deliver(event).is_ok()
    }

    /// A receiver dropped without an unsubscribe (a handler whose actor stopped) keeps the
    /// first event it never took held, and only that one: the position stays before it.
    /// Before, each was released as it was refused, and the position moved past them all.
    #[test]
    fn a_receiver_gone_keeps_the_first_event_it_did_not_take_held() {
        let holds = Arc::new(Holds::default());
        let (sink, mut deliveries) = held_channel(4, holds.clone());
        assert!(offer(&sink, 1));
        deliveries.try_recv().expect("delivered").ack.ack();
        drop(deliveries);
        assert!(!offer(&sink, 2), "refused: the receiver is gone");
        assert!(!offer(&sink, 3));
        sink.hold(&event(4));
        sink.lost(&event(4)); // discarded from the buffer behind it
        assert_eq!(
            holds.floor(),
            Some(2),
            "the first event not taken stays held"
        );
        assert_eq!(holds.len(), 1, "one hold, not one per event");
    }

    /// Deliveries waiting unreceived when their receiver is dropped after an unsubscribe are
    /// let go, as the subscription's buffer is; dropped after a stop (no unsubscribe), they
    /// stay held. Before, both stayed held for good.
    #[test]
    fn deliveries_dropped_after_an_unsubscribe_let_go_of_what_waits_in_them() {
        for unsubscribed in [true, false] {
            let holds = Arc::new(Holds::default());
            let (sink, deliveries) = held_channel(4, holds.clone());
            assert!(offer(&sink, 1) && offer(&sink, 2));
            if unsubscribed {
                sink.unsubscribed();
            }
            drop(sink);
            assert_eq!(deliveries.unsubscribed(), unsubscribed);
            drop(deliveries);
            let floor = if unsubscribed { None } else { Some(1) };
            assert_eq!(holds.floor(), floor, "unsubscribed: {unsubscribed}");
        }
    }

    /// Deliveries still in the channel when the receiver goes keep their holds too (their
    /// Acks are dropped unused), so the first refused event is never the floor's only guard.
    #[test]
    fn deliveries_dropped_unreceived_keep_their_holds() {
        let holds = Arc::new(Holds::default());
        let (sink, deliveries) = held_channel(4, holds.clone());
        assert!(offer(&sink, 5));
        drop(deliveries);
        assert!(!offer(&sink, 6));
        assert_eq!(holds.floor(), Some(5));
        assert_eq!(holds.len(), 2);
    }
}
