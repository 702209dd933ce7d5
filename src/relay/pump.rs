//! The relay's loop: takes the notifier's acknowledged deliveries in commit order, publishes
//! them pipelined, and acknowledges each delivery — letting the consumer's position move past
//! it — only once the broker confirmed storing it and everything before it.
//!
//! On a failed confirmation or a lost link, the link is dropped and a new one opened (capped,
//! jittered backoff); every unconfirmed message is sent again in order, with the same id, so
//! the broker stores what it had not and drops what it had. After a new link the first
//! message goes alone: the pipeline opens only once the broker stores again, so a message that
//! a recovering server refuses cannot be overtaken by the next one.
//!
//! **Fencing.** When the relay's notifier loses its consumer-group lease to another relay,
//! the events it read under that lease are the new holder's to publish: it reads them again
//! from the saved position and publishes them itself. This relay must not publish them any
//! more — sent late, after the stream's duplicate window, they would be stored a second time,
//! behind newer changes of the same keys. The notifier raises its lease fence then
//! (`src/holds.rs`: every ordinal below it was read under a lease since lost; the module docs
//! there say why the comparison is exact, also across several losses and a lease taken again
//! later). The loop never *sends* a message below the fence, for the first time or again: it
//! drops, unpublished and counted in `fenced`, the unsent messages below it when it rises,
//! every message below it when a new link opens (the ones sent on the old link included),
//! and every later delivery below it as it comes (the lost lease's events still in the
//! pipeline, in the subscription's buffer and channel). Their holds were forgotten or never
//! taken, so dropping their `Ack`s keeps nothing back. The messages already sent on the
//! current link when the fence rises are left to it: their bytes are out of the process —
//! stored promptly if the link works, which is within the window of the new holder's sends
//! of the same ids — and waiting for their confirmations costs nothing; should the link fail
//! instead, they are dropped with the rest when the next one opens. What a link had written
//! to its socket before the loss can still reach the broker later (the operating system
//! delivers what it holds once a hung path recovers): at most `max_pending` messages, stored
//! twice only if they arrive after the duplicate window. Messages read under a lease taken
//! again later are above the fence, and published as ever.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::watch;

use super::broker::{Broker, Link, Outgoing};
use super::subject::{key_text, Naming};
use crate::acked::Deliveries;
use crate::backoff::Backoff;
use crate::event::ChangeEvent;
use crate::holds::Ack;

/// The relay's live counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub published: AtomicU64,
    pub duplicates: AtomicU64,
    pub pending: AtomicU64,
    pub links: AtomicU64,
    pub failures: AtomicU64,
    pub truncated: AtomicU64,
    pub skipped: AtomicU64,
    pub fenced: AtomicU64,
    pub connected: AtomicBool,
}

/// What the loop needs besides the broker.
pub(crate) struct Pump {
    pub naming: Naming,
    /// Channel name → subject without the partition token.
    pub bases: HashMap<String, String>,
    pub max_pending: usize,
    pub counters: Arc<Counters>,
    pub backoff: Backoff,
}

/// A message taken and not confirmed yet, with its delivery.
struct Pending {
    message: Outgoing,
    ack: Ack,
    /// What the message was made of: a smaller one is made of it when it does not fit.
    event: ChangeEvent,
}

impl Pump {
    /// Makes `pending`'s message fit in `max_size`: as it is, or with the change's key only,
    /// marked truncated (as a trigger sends a row too large for a notification), counted in
    /// `truncated`. `false` when not even that fits: the change is counted in `skipped` and
    /// logged, for it cannot be stored.
    fn fit(&self, pending: &mut Pending, max_size: usize) -> bool {
        let size = pending.message.size();
        if size <= max_size {
            return true;
        }
        let smaller = self.message(&pending.event.key_only());
        let event = &pending.event;
        if smaller.size() > max_size {
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            log::error!(
                "sqlnotify: relay skips the {} of {}.{} at sequence {:?}: even with its key only \
                 its message has {} bytes, more than the {max_size} the stream takes (counted in \
                 RelayStats::skipped)",
                event.operation().as_str(),
                event.schema(),
                event.table(),
                event.sequence(),
                smaller.size()
            );
            return false;
        }
        self.counters.truncated.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "sqlnotify: relay publishes the {} of {}.{} at sequence {:?} with its key only: its \
             message has {size} bytes, more than the {max_size} the stream takes (counted in \
             RelayStats::truncated)",
            event.operation().as_str(),
            event.schema(),
            event.table(),
            event.sequence()
        );
        pending.message = smaller;
        true
    }

    /// Drops the messages of `unconfirmed` from index `from` on (those not sent on the
    /// current link) that were read under a lease the notifier lost: their ordinal is below
    /// `fence` (see the module docs). Counted in `fenced`, and logged.
    fn fence_off(&self, unconfirmed: &mut VecDeque<Pending>, from: usize, fence: u64) {
        let mut rest = unconfirmed.split_off(from.min(unconfirmed.len()));
        let before = rest.len();
        rest.retain(|pending| pending.event.ordinal() >= fence);
        let dropped = before - rest.len();
        unconfirmed.append(&mut rest);
        if dropped > 0 {
            self.counters
                .fenced
                .fetch_add(dropped as u64, Ordering::Relaxed);
            self.counters
                .pending
                .store(unconfirmed.len() as u64, Ordering::Relaxed);
            log::warn!(
                "sqlnotify: relay lost its consumer's lease: {dropped} messages read under it \
                 are dropped unpublished, the relay holding the lease now publishes them \
                 (counted in RelayStats::fenced)"
            );
        }
    }

    fn message(&self, event: &ChangeEvent) -> Outgoing {
        let base = self
            .bases
            .get(event.channel())
            .expect("the relay subscribed to its own channels only");
        let sequence = event.sequence().unwrap_or_default();
        Outgoing {
            subject: self.naming.subject(base, event),
            id: self
                .naming
                .message_id(event)
                .expect("the relay watches journal tiers only"),
            headers: vec![
                ("Sqlnotify-Sequence", sequence.to_string()),
                ("Sqlnotify-Part", event.part().to_string()),
                (
                    "Sqlnotify-Table",
                    format!("{}.{}", event.schema(), event.table()),
                ),
                (
                    "Sqlnotify-Operation",
                    event.operation().as_str().to_string(),
                ),
                ("Sqlnotify-Key", key_text(event)),
            ],
            body: Bytes::from(event.to_record()),
        }
    }

    /// Runs until the deliveries end (the notifier stopped) and every one is confirmed or
    /// fenced off, or `stop` is set. `fence` is the notifier's lease fence
    /// ([`Holds::watch_fence`](crate::holds::Holds::watch_fence)).
    pub async fn run<B: Broker>(
        self,
        broker: B,
        mut deliveries: Deliveries,
        mut stop: watch::Receiver<bool>,
        mut fence: watch::Receiver<u64>,
    ) {
        // Whether the fence can still move (its notifier's pipeline is there).
        let mut fence_open = true;
        // Messages taken, oldest first, with their deliveries' acks; the first `sent` of them
        // went out on the current link.
        let mut unconfirmed: VecDeque<Pending> = VecDeque::new();
        let mut ended = false;
        let mut attempt = 0u32;
        loop {
            if ended && unconfirmed.is_empty() || *stop.borrow() {
                return;
            }
            if attempt > 0 {
                let delay = self.backoff.delay(attempt);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            attempt = attempt.saturating_add(1);
            let mut link = tokio::select! {
                link = broker.open() => match link {
                    Ok(link) => link,
                    Err(e) => {
                        self.counters.failures.fetch_add(1, Ordering::Relaxed);
                        log::warn!("sqlnotify: relay cannot use the broker (attempt {attempt}): {e}");
                        continue;
                    }
                },
                _ = stop.wait_for(|s| *s) => return,
            };
            // Nothing is sent on this link yet: none of what the lease lost goes on it.
            self.fence_off(&mut unconfirmed, 0, *fence.borrow_and_update());
            self.counters.links.fetch_add(1, Ordering::Relaxed);
            self.counters.connected.store(true, Ordering::Relaxed);
            if attempt > 1 {
                log::info!(
                    "sqlnotify: relay reconnected; sending {} unconfirmed messages again",
                    unconfirmed.len()
                );
            }
            let mut confirmations = FuturesOrdered::new();
            // Until the broker stores one message on this link, one at a time.
            let mut proven = false;
            let failed = 'link: loop {
                // Send what waits, as far as the window allows.
                let window = if proven { self.max_pending } else { 1 };
                while confirmations.len() < unconfirmed.len() && confirmations.len() < window {
                    let next = confirmations.len();
                    if fence.has_changed().unwrap_or(false) {
                        // The lease was lost since the last look (a send can wait).
                        self.fence_off(&mut unconfirmed, next, *fence.borrow_and_update());
                        continue;
                    }
                    if !self.fit(&mut unconfirmed[next], link.max_size()) {
                        // Not even its key fits: the broker would refuse it for ever, and
                        // everything behind it would wait. It goes, counted and logged.
                        if let Some(gone) = unconfirmed.remove(next) {
                            gone.ack.ack();
                        }
                        self.counters
                            .pending
                            .store(unconfirmed.len() as u64, Ordering::Relaxed);
                        continue;
                    }
                    let message = &unconfirmed[next].message;
                    // A send can wait for room in the client's buffer, which a lost
                    // connection never empties: race it against the loss.
                    let lost = link.lost();
                    tokio::select! {
                        sent = link.send(message) => match sent {
                            Ok(confirmation) => confirmations.push_back(confirmation),
                            Err(e) => break 'link Some(e.to_string()),
                        },
                        _ = lost => break 'link Some("the connection was lost".to_string()),
                    }
                }
                if ended && unconfirmed.is_empty() {
                    break None;
                }
                let room = unconfirmed.len() < self.max_pending;
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break None,
                    changed = fence.changed(), if fence_open => match changed {
                        // What waits behind the sent ones goes now, freeing room.
                        Ok(()) => self.fence_off(
                            &mut unconfirmed,
                            confirmations.len(),
                            *fence.borrow_and_update(),
                        ),
                        Err(_) => fence_open = false,
                    },
                    confirmed = confirmations.next(), if !confirmations.is_empty() => {
                        match confirmed.expect("not empty") {
                            Ok(stored) => {
                                let done = unconfirmed.pop_front().expect("one per confirmation");
                                done.ack.ack();
                                proven = true;
                                attempt = 0;
                                let counter = if stored.duplicate {
                                    &self.counters.duplicates
                                } else {
                                    &self.counters.published
                                };
                                counter.fetch_add(1, Ordering::Relaxed);
                                self.counters.pending.store(unconfirmed.len() as u64, Ordering::Relaxed);
                            }
                            Err(e) => break Some(e.to_string()),
                        }
                    }
                    delivery = deliveries.recv(), if room && !ended => match delivery {
                        Some(delivery) if delivery.event.ordinal() < *fence.borrow() => {
                            // Read under a lease lost since: the holder publishes it.
                            self.counters.fenced.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(delivery) => {
                            let message = self.message(&delivery.event);
                            unconfirmed.push_back(Pending {
                                message,
                                ack: delivery.ack,
                                event: delivery.event,
                            });
                            self.counters.pending.store(unconfirmed.len() as u64, Ordering::Relaxed);
                        }
                        None => ended = true,
                    },
                    _ = link.lost() => break Some("the connection was lost".to_string()),
                }
            };
            self.counters.connected.store(false, Ordering::Relaxed);
            if let Some(e) = failed {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "sqlnotify: relay link failed with {} messages unconfirmed: {e}",
                    unconfirmed.len()
                );
            }
            // The old link and its confirmations go; nothing more is sent on it.
            drop(confirmations);
            drop(link);
        }
    }
}
