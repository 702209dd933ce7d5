//! Acknowledged subscriptions, the subscriber's side: each [`Delivery`] carries its event and
//! the [`Ack`] that lets the named consumer's position move past it.

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
#[derive(Debug)]
pub struct Deliveries {
    rx: mpsc::Receiver<Delivery>,
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
}

/// The registry's end of an acknowledged subscription.
pub(crate) struct HeldSink {
    tx: mpsc::Sender<Delivery>,
    holds: Arc<Holds>,
}

/// A bounded acknowledged subscription's two ends.
pub(crate) fn held_channel(capacity: usize, holds: Arc<Holds>) -> (HeldSink, Deliveries) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (HeldSink { tx, holds }, Deliveries { rx })
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

    /// Releases an event this subscription will never hand over (lost with its subscriber).
    pub fn lost(&self, event: &ChangeEvent) {
        self.holds.release(event.ordinal());
    }

    pub fn try_deliver(&self, event: ChangeEvent) -> Result<(), HeldRefused> {
        let ack = Ack::new(event.ordinal(), self.holds.clone());
        match self.tx.try_send(Delivery { event, ack }) {
            Ok(()) => Ok(()),
            // The ack is dropped unused: the hold stays, as it should.
            Err(mpsc::error::TrySendError::Full(d)) => Err(HeldRefused::Full(d.event)),
            Err(mpsc::error::TrySendError::Closed(d)) => {
                self.lost(&d.event);
                Err(HeldRefused::Closed)
            }
        }
    }
}
