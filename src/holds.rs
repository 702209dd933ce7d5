//! Events an acknowledged subscription still holds: a named consumer's position may not move
//! past the first of them until it is acknowledged.
//!
//! Every unit a listener forwards has an ordinal — how many units were forwarded before it —
//! which the decoder stamps on the event it becomes. The registry holds an event's ordinal
//! before it counts the event settled; an [`Ack`] releases it. The save rule
//! (`src/listener/saving.rs`) then treats `min(settled, first held ordinal)` as the number of
//! units that have fully left the pipeline.
//!
//! **The lease fence.** A member of a consumer group that lost its lease to another process
//! ([`Holds::fence`], called by the session that finds the lease taken) forgets its holds and
//! fences off every ordinal below the count of units forwarded by then: those events were read
//! under the lost lease, and the process holding it now reads them again from the saved
//! position. Ordinals make an exact fence because the decoder, started once per notifier,
//! numbers every unit the listener forwards, across sessions and leases, and never starts
//! again: a new session or a new lease places the *position* anew (the rows are read again),
//! but the rows read again get new, larger ordinals. So the units read under one lease are an
//! interval of ordinals; nothing is forwarded from the journal while standing by; and a
//! session ends — its reads forwarded and counted — before the next one finds the lease taken.
//! Hence "ordinal below the fence" is exactly "read under a lease this process has lost
//! since", whatever the number of losses (the fence only rises), and a member that takes the
//! lease again later reads above the fence and delivers as before. One number is enough: a
//! generation counter of the lease would have to be stamped on each event when it is read
//! (stamped on delivery it would mislabel an event read before the loss and routed after it),
//! which is what the ordinal already is.
//!
//! Events of the lost lease still on their way when the fence rises (in the decoder, in a
//! subscription's buffer) are not held when the registry routes them: a hold below the fence
//! would keep the position back for ever once its event is dropped. The relay drops them
//! unpublished (`src/relay/pump.rs`), and a handler unhandled (`src/handling/engine.rs`: it
//! would run them once active again, after the new holder ran them and newer events of their
//! keys); other acknowledged subscriptions still receive them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, Notify};

/// The ordinals held by acknowledged subscriptions (with how many subscriptions hold each),
/// and the lease fence.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    held: Mutex<Held>,
    /// Woken whenever the last hold is released, or the last live [`Ack`] goes.
    empty: Notify,
    /// The lease fence (see the module docs): ordinals below it were read under a lease this
    /// process lost. Only rises; changed under `held`'s lock, so a hold checked against
    /// `Held::fence` and this value agree.
    fence_watch: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Held {
    /// Held ordinals, with how many subscriptions hold each.
    ordinals: BTreeMap<u64, u32>,
    /// [`Ack`]s not used or dropped yet: what could still release a hold.
    live: usize,
    /// The lease fence: an ordinal below it is not held.
    fence: u64,
}

impl Holds {
    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One more subscription holds the event at `ordinal` — unless the event was read under a
    /// lease this process lost (below the fence): nothing holds such an event.
    pub fn hold(&self, ordinal: u64) {
        let mut held = self.lock();
        if ordinal >= held.fence {
            *held.ordinals.entry(ordinal).or_insert(0) += 1;
        }
    }

    /// One subscription is done with the event at `ordinal`.
    pub fn release(&self, ordinal: u64) {
        let now_empty = {
            let mut held = self.lock();
            if let Some(n) = held.ordinals.get_mut(&ordinal) {
                *n -= 1;
                if *n == 0 {
                    held.ordinals.remove(&ordinal);
                }
            }
            held.ordinals.is_empty()
        };
        if now_empty {
            self.empty.notify_waiters();
        }
    }

    /// The lease was lost with `forwarded` units forwarded: every ordinal below it was read
    /// under that lease, and the process that holds it now delivers those events again.
    /// Forgets their holds, and raises the fence to `forwarded` (it never goes down), so
    /// those still on their way are not held either. Their `Ack`s, if used later, release
    /// nothing; ordinals read from now on are all at or above the fence.
    pub fn fence(&self, forwarded: u64) {
        {
            let mut held = self.lock();
            let fence = held.fence.max(forwarded);
            held.fence = fence;
            held.ordinals.retain(|&ordinal, _| ordinal >= fence);
            self.fence_watch
                .send_if_modified(|f| std::mem::replace(f, fence) != fence);
        }
        self.empty.notify_waiters();
    }

    /// The lease fence, watched: its value is the first ordinal not read under a lease this
    /// process lost (0 while none was lost); it changes each time one is.
    pub fn watch_fence(&self) -> watch::Receiver<u64> {
        self.fence_watch.subscribe()
    }

    /// The first held ordinal: every unit before it is released (or was never held).
    pub fn floor(&self) -> Option<u64> {
        self.lock().ordinals.keys().next().copied()
    }

    /// How many events are held.
    pub fn len(&self) -> usize {
        self.lock().ordinals.len()
    }

    /// Resolves once nothing is held, or once nothing held can be released any more: every
    /// [`Ack`] was used or dropped (a handler that gave up, a subscription that ended).
    pub async fn settled(&self) {
        loop {
            let notified = self.empty.notified();
            {
                let held = self.lock();
                if held.ordinals.is_empty() || held.live == 0 {
                    return;
                }
            }
            notified.await;
        }
    }

    fn ack_born(&self) {
        self.lock().live += 1;
    }

    fn ack_gone(&self) {
        let none_left = {
            let mut held = self.lock();
            held.live -= 1;
            held.live == 0
        };
        if none_left {
            self.empty.notify_waiters();
        }
    }
}

/// The acknowledgement of one event delivered to an acknowledged subscription
/// ([`Notifier::subscribe_acked`](crate::Notifier::subscribe_acked)).
///
/// [`ack`](Ack::ack) says the event is done with: the named consumer's position may move past
/// it. An `Ack` dropped without `ack` keeps the event held — the position stays before it, so
/// the event is delivered again after the notifier restarts. Acknowledgements may come in any
/// order; the position moves only past a run of acknowledged events.
#[derive(Debug)]
#[must_use = "an event whose Ack is dropped unacknowledged holds the consumer's position back"]
pub struct Ack {
    ordinal: u64,
    holds: Arc<Holds>,
}

impl Ack {
    pub(crate) fn new(ordinal: u64, holds: Arc<Holds>) -> Self {
        holds.ack_born();
        Ack { ordinal, holds }
    }

    /// The event is done with.
    pub fn ack(self) {
        // Released before this Ack counts as gone (on drop), so a stop waiting for the
        // holds sees the release, not an Ack that vanished with its event still held.
        self.holds.release(self.ordinal);
    }

    /// The event's subscription was unsubscribed before it was handled: it is let go, as the
    /// registry lets go of the events still waiting in the subscription's buffer — the
    /// position may move past it, and it is not delivered again.
    pub(crate) fn let_go(self) {
        self.holds.release(self.ordinal);
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        self.holds.ack_gone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_first_ordinal_still_held() {
        let holds = Holds::default();
        assert_eq!(holds.floor(), None);
        holds.hold(3);
        holds.hold(5);
        holds.hold(5);
        assert_eq!(holds.floor(), Some(3));
        holds.release(5);
        assert_eq!(holds.floor(), Some(3));
        holds.release(3);
        assert_eq!(
            holds.floor(),
            Some(5),
            "a second subscription still holds 5"
        );
        holds.release(5);
        assert_eq!(holds.floor(), None);
        assert_eq!(holds.len(), 0);
    }

    #[tokio::test]
    async fn settled_resolves_once_the_last_hold_goes() {
        let holds = Arc::new(Holds::default());
        holds.hold(1);
        let ack = Ack::new(1, holds.clone());
        let waiter = tokio::spawn({
            let holds = holds.clone();
            async move { holds.settled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        ack.ack();
        waiter.await.unwrap();
        assert_eq!(holds.floor(), None);
    }

    #[tokio::test]
    async fn settled_resolves_once_no_ack_can_release_a_hold() {
        let holds = Arc::new(Holds::default());
        holds.hold(1);
        holds.hold(2);
        let one = Ack::new(1, holds.clone());
        let two = Ack::new(2, holds.clone());
        let waiter = tokio::spawn({
            let holds = holds.clone();
            async move { holds.settled().await }
        });
        drop(one);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the Ack of 2 could still release it");
        drop(two);
        waiter.await.unwrap();
        assert_eq!(holds.floor(), Some(1), "a dropped Ack keeps its hold");
    }

    #[test]
    fn forgotten_holds_release_nothing_later() {
        let holds = Arc::new(Holds::default());
        holds.hold(4);
        let ack = Ack::new(4, holds.clone());
        holds.fence(5);
        assert_eq!(holds.floor(), None);
        holds.hold(9);
        ack.ack();
        assert_eq!(holds.floor(), Some(9));
    }

    #[test]
    fn an_event_below_the_fence_is_not_held_and_the_fence_only_rises() {
        let holds = Holds::default();
        let mut fence = holds.watch_fence();
        assert_eq!(*fence.borrow_and_update(), 0);
        holds.hold(2);
        holds.fence(10);
        assert!(fence.has_changed().unwrap());
        assert_eq!(*fence.borrow_and_update(), 10);
        // Read under the lost lease, routed after the loss: not held.
        holds.hold(7);
        assert_eq!(holds.floor(), None);
        // Read under a lease taken again later: held as ever.
        holds.hold(10);
        assert_eq!(holds.floor(), Some(10));
        // A lower fence (never given, but harmless) changes nothing.
        holds.fence(3);
        assert!(!fence.has_changed().unwrap());
        assert_eq!(holds.floor(), Some(10));
        holds.fence(12);
        assert_eq!(*fence.borrow_and_update(), 12);
        assert_eq!(
            holds.floor(),
            None,
            "10 was read under the lease lost second"
        );
    }

    #[test]
    fn a_dropped_ack_keeps_its_event_held() {
        let holds = Arc::new(Holds::default());
        holds.hold(7);
        drop(Ack::new(7, holds.clone()));
        assert_eq!(holds.floor(), Some(7));
    }
}
