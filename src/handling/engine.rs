//! A handler's loop: takes an acknowledged subscription's deliveries, runs the handler per
//! key in commit order (several keys at once), retries failures after a jittered delay,
//! stores the failures (and, after the last attempt, the dead letter) and acknowledges an
//! event only once it was handled or its dead letter is stored. Its active process also
//! delivers again the dead letters a retry was asked for.
//!
//! What survives the process: the attempt counts of failing events are stored with their
//! rows (`retrying`), and a process that becomes active — after a restart or a
//! consumer-group failover — reads them back, so the count (and the dead-lettering after the
//! last attempt) continues where the previous process stopped. The events themselves come
//! back from the journal in commit order, since the position never moved past them. It reads
//! back the `dead` rows too (`Resume`, once per activation: no look at the table per event):
//! a dead-lettered event comes back when its process ended before the position was saved past
//! it, and handled now, its dead letter goes — retried later, it would run the event again
//! after newer ones of its key.
//!
//! Dead letters being delivered again (`redelivering`) go back to `requested` when a process
//! becomes active that may not hold them: at its start, and after it stood by (another
//! process was active meanwhile). A reconnect that ends with this process active again
//! without standing by takes nothing back: the rows are still in its hands. A process that
//! stands by hands back the ones it took — those in its queues, timers and running attempts,
//! and those a poll under way took — and its attempts still running write nothing more.
//! The events it read under the lease it lost and received only after the loss (still in the
//! subscription's buffer or channel) are below the lease fence (`src/holds.rs`): it drops them
//! unhandled, as the relay does — the process holding the lease handles them.
//!
//! How the loop ends decides what becomes of the events in its hands. Unsubscribed, it lets go
//! of those it has not started — waiting for their key, a slot or a retry's delay — as the
//! registry lets go of those in the subscription's buffer: their holds are released, so a
//! named consumer's position moves on, and the dead letters among them go back to
//! `requested`. The calls running then finish first. The notifier stopping, or the handler
//! gone, leaves them held: a restart delivers them again.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use actix::Recipient;
use futures_util::future::LocalBoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;

use super::keys::{key_of, KeyId, KeyQueues};
use super::{Attempt, HandlerError, Handling};
use crate::acked::Deliveries;
use crate::dead_letters::{DeadLetterState, DeadLetterStore, Failure, Retrying, Target};
use crate::event::{ChangeEvent, Channels, Key};
use crate::holds::Ack;
use crate::instruments::HandlerMetrics;
use crate::stats::{Counters, Role};

/// A handler as the loop calls it.
pub(crate) trait Call: 'static {
    /// One attempt; `None` when the handler is gone (its actor stopped).
    fn call(
        &self,
        attempt: Attempt,
    ) -> LocalBoxFuture<'static, Option<std::result::Result<(), HandlerError>>>;
}

/// A closure handler.
pub(crate) struct FnCall<F>(pub F);

impl<F, Fut> Call for FnCall<F>
where
    F: Fn(ChangeEvent) -> Fut + 'static,
    Fut: std::future::Future<Output = std::result::Result<(), HandlerError>> + 'static,
{
    fn call(
        &self,
        attempt: Attempt,
    ) -> LocalBoxFuture<'static, Option<std::result::Result<(), HandlerError>>> {
        let done = (self.0)(attempt.event);
        Box::pin(async move { Some(done.await) })
    }
}

/// An actor handler.
pub(crate) struct ActorCall(pub Recipient<Attempt>);

impl Call for ActorCall {
    fn call(
        &self,
        attempt: Attempt,
    ) -> LocalBoxFuture<'static, Option<std::result::Result<(), HandlerError>>> {
        let sent = self.0.send(attempt);
        Box::pin(async move { sent.await.ok() })
    }
}

/// An event in the handler's hands.
struct Item {
    event: ChangeEvent,
    /// `None` for a dead letter delivered again (the position is past it already).
    ack: Option<Ack>,
    /// Attempts that failed so far.
    failed: u32,
    /// Its dead-letter row, once it has one.
    row: Option<i64>,
    /// For a dead letter delivered again, the row this process took (`redelivering`): what
    /// it holds until the attempts end.
    taken: Option<i64>,
    /// A live event an earlier process dead-lettered (read at activation, [`Resume`]): the
    /// journal delivers it again when that process ended before the position was saved past
    /// it. Handled, its row goes ([`DeadLetterStore::resolve_event`]), else the stale dead
    /// letter, retried later, would run it again after newer events of its key.
    dead_before: bool,
}

/// What a process that became active continues, by `(sequence, part)`: the rows an earlier
/// process left of the events the journal delivers again. Each is taken out by the event it
/// matches; the rest go at the next activation.
#[derive(Default)]
struct Resume {
    /// Events failing and being retried: their attempt counts continue.
    retrying: HashMap<(i64, u32), Retrying>,
    /// Events out of attempts, their dead letters stored and acknowledged: what goes if they
    /// are handled now. Read once per activation — not a look at the table per event.
    dead: HashSet<(i64, u32)>,
}

impl Resume {
    fn clear(&mut self) {
        self.retrying.clear();
        self.dead.clear();
    }

    /// Gives `item`, a live event, what an earlier process left of it.
    fn continue_with(&mut self, item: &mut Item) {
        let Some(sequence) = item.event.sequence() else {
            return;
        };
        let at = (sequence, item.event.part());
        if let Some(r) = self.retrying.remove(&at) {
            item.failed = r.attempts;
            item.row = Some(r.id);
        } else if self.dead.remove(&at) {
            item.dead_before = true;
        }
    }
}

enum Outcome {
    /// Handled, or stored as a dead letter: the key's next event may run, and the row
    /// taken to deliver it again (if it was one) is no longer held.
    Done(KeyId, Option<i64>),
    /// Failed; to be tried again after a delay.
    Retry(KeyId, Item),
    /// This process stood by while the call ran: what follows from it is the active
    /// process's.
    Stale,
    /// The handler is gone; the item it was given.
    Gone(Item),
}

/// An item waiting out its retry's delay: given back when the delay is over, or taken out
/// before ([`Delayed::into_item`]) when the handler lets it go.
struct Delayed {
    sleep: Pin<Box<tokio::time::Sleep>>,
    waiting: Option<(KeyId, Item)>,
}

impl Delayed {
    fn new(delay: Duration, key: KeyId, item: Item) -> Self {
        Delayed {
            sleep: Box::pin(tokio::time::sleep(delay)),
            waiting: Some((key, item)),
        }
    }

    /// The item, unless it was given back already.
    fn into_item(self) -> Option<Item> {
        self.waiting.map(|(_, item)| item)
    }
}

impl Future for Delayed {
    type Output = (KeyId, Item);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        ready!(self.sleep.as_mut().poll(cx));
        Poll::Ready(
            self.waiting
                .take()
                .expect("a delayed item is given back once"),
        )
    }
}

/// What a look at the dead-letter table brought.
struct Polled {
    /// Dead letters to deliver again.
    redeliver: Vec<Item>,
    /// Rows of this handler that are dead.
    dead: Option<u64>,
}

/// This engine's share of `Counters::dead_letters`, the gauge that adds up the dead letters
/// of every handler of the notifier: set from each poll's count, taken back when the engine
/// stands by (the active process counts them) and when it ends, however it ends (dropped) —
/// else a handler unsubscribed and handled again counted its rows twice.
struct DeadGauge {
    counters: Arc<Counters>,
    counted: u64,
}

impl DeadGauge {
    fn new(counters: Arc<Counters>) -> Self {
        DeadGauge {
            counters,
            counted: 0,
        }
    }

    /// This engine counts `dead` now.
    fn set(&mut self, dead: u64) {
        // One change by the difference: a `stats()` in between never reads both counts.
        let gauge = &self.counters.dead_letters;
        match dead.cmp(&self.counted) {
            std::cmp::Ordering::Greater => gauge.fetch_add(dead - self.counted, Ordering::Relaxed),
            std::cmp::Ordering::Less => gauge.fetch_sub(self.counted - dead, Ordering::Relaxed),
            std::cmp::Ordering::Equal => 0,
        };
        self.counted = dead;
    }
}

impl Drop for DeadGauge {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// The loop and what it shares with its attempts.
pub(crate) struct Engine {
    pub handling: Handling,
    pub store: Arc<dyn DeadLetterStore>,
    pub counters: Arc<Counters>,
    pub channels: Arc<Channels>,
    /// This handler's outcome counters, labelled with its name.
    pub metrics: HandlerMetrics,
}

/// The key as stored with a dead letter: JSON, an array for a composite key.
fn key_text(event: &ChangeEvent) -> String {
    match event.id() {
        Key::Single(v) => v.to_string(),
        Key::Composite(vs) => serde_json::Value::Array(vs.clone()).to_string(),
    }
}

impl Engine {
    /// Runs until the deliveries end (unsubscribed, or the notifier stopped) and the calls
    /// running then have finished, or the handler is gone. Unsubscribed, it lets go of the
    /// events it did not start ([`Engine::let_go`]). Stopped or gone, it leaves them
    /// unacknowledged: a named consumer delivers them again after a restart. A handler gone
    /// leaves the deliveries' receiver dropped, so the next event the registry offers stays
    /// held too.
    pub async fn run<C: Call>(self, call: C, mut deliveries: Deliveries) {
        let engine = Rc::new(self);
        let call = Rc::new(call);
        let mut queues: KeyQueues<Item> = KeyQueues::new(engine.handling.keys_in_flight);
        let mut running = FuturesUnordered::new();
        let mut timers: FuturesUnordered<Delayed> = FuturesUnordered::new();
        let mut resume = Resume::default();
        let mut poll = tokio::time::interval(engine.handling.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A look at the dead-letter table under way, and the generation it started in.
        let mut polling: Option<LocalBoxFuture<'static, (u64, Polled)>> = None;
        // Whether this process read back the attempt counts since it last became active (or
        // independent).
        let mut activated = false;
        // Whether this process took back the rows a previous one was delivering again, since
        // it last stood by (or started). Only then: a reconnect (`Role::Starting`) that ends
        // with this process active again without standing by leaves it the rows it took, in
        // its queues, timers and running attempts; taking them back would deliver them twice.
        let mut took_back = false;
        let mut ended = false;
        let mut dead_gauge = DeadGauge::new(engine.counters.clone());
        // Bumped when this process stands by: attempts started before are stale — they write
        // nothing to the dead-letter table (they read it, shared, before each write), and
        // their outcomes are ignored.
        let generation = Rc::new(Cell::new(0u64));
        // The standbys seen (`Counters::standbys`): a standby may have begun and ended between
        // two looks at the role — another process active meanwhile, its state to read back.
        let mut standbys = engine.counters.standbys();
        // The lease fence (`src/holds.rs`): a delivery below it was read under a consumer-group
        // lease this process lost since. The process holding the lease now handles it again;
        // handled here too, once this one is active again, it would run after that process
        // handled it and the key's newer events.
        let fence = engine.counters.holds.watch_fence();
        // The rows of the dead letters this process delivers again — taken by its polls, in
        // its queues, timers and running attempts — since it last stood by. A poll that takes
        // one of them again (someone marked it `requested` meanwhile: a process standing by
        // that hands back what it had taken) leaves it where it is: delivered once.
        let mut held: HashSet<i64> = HashSet::new();
        // The rows of `held` whose attempts ended while a poll was under way: the poll may
        // have taken them again before they went.
        let mut finished: HashSet<i64> = HashSet::new();
        // Another process of the consumer group took over: it delivers what this one held
        // again, in order (handling it here too would run a key's events in two places), and
        // once this one is active again it reads back what that one left. The dead letters
        // this one was delivering again go back to `requested` for it: it may have taken
        // over before this one took them, and would then not take them back itself.
        macro_rules! stand_by {
            () => {
                log::info!(
                    "sqlnotify: handler {:?} stands by; {} events and {} dead letters it held \
                     are the active process's now",
                    engine.handling.name,
                    queues.len(),
                    held.len()
                );
                generation.set(generation.get() + 1);
                queues = KeyQueues::new(engine.handling.keys_in_flight);
                timers = FuturesUnordered::new();
                resume.clear();
                activated = false;
                took_back = false;
                standbys = engine.counters.standbys();
                finished.clear();
                dead_gauge.set(0);
                engine.hand_back(held.drain().collect(), "stood by").await;
            };
        }
        // Unsubscribed: the events waiting for their key, a slot or a retry's delay are let
        // go (their holds released). Done as the deliveries end, so a call that runs long
        // holds back only its own event, and again at the end, for retries that came back.
        macro_rules! let_go_waiting {
            () => {
                let waiting = std::mem::take(&mut timers)
                    .into_iter()
                    .filter_map(Delayed::into_item)
                    .chain(queues.take_waiting());
                engine.let_go(waiting);
            };
        }
        // Reads back the attempt counts, unless done since this process last became active,
        // and — `$active`: the role is active or independent — takes back the rows a previous
        // process was delivering again, unless done since this process last stood by.
        macro_rules! activate {
            ($active:expr) => {
                let take_back = $active && !took_back;
                if !activated || take_back {
                    resume = engine.activate(take_back).await;
                    activated = true;
                    took_back |= take_back;
                }
            };
        }
        loop {
            let role = engine.counters.role();
            if role == Role::Standby && (!queues.is_empty() || !timers.is_empty())
                || engine.counters.standbys() != standbys
            {
                stand_by!();
            }
            // Starting (reconnecting): attempts wait until the lease is known again.
            if !ended && matches!(role, Role::Active | Role::Independent) {
                while let Some((key, item)) = queues.next() {
                    let started = generation.get();
                    let attempt = engine.clone().attempt(
                        call.clone(),
                        key,
                        item,
                        (generation.clone(), started),
                    );
                    running.push(attempt.map(move |outcome| (started, outcome)));
                }
            }
            if ended && running.is_empty() {
                if deliveries.unsubscribed() {
                    let_go_waiting!();
                    // The dead letters it was delivering again (their attempts over or never
                    // started), and those a poll under way took, go back to `requested`.
                    if let Some(poll) = polling.take() {
                        let (_, polled) = poll.await;
                        held.extend(polled.redeliver.iter().filter_map(|item| item.taken));
                    }
                    engine
                        .hand_back(held.drain().collect(), "was unsubscribed")
                        .await;
                }
                return;
            }
            let room = queues.len() < engine.handling.max_waiting;
            tokio::select! {
                biased;
                Some((started, outcome)) = running.next(), if !running.is_empty() => match outcome {
                    _ if started != generation.get() => {}
                    Outcome::Stale => {}
                    Outcome::Done(key, taken) => {
                        queues.done(key);
                        if let Some(row) = taken {
                            held.remove(&row);
                            if polling.is_some() {
                                finished.insert(row);
                            }
                        }
                    }
                    Outcome::Retry(key, item) => {
                        queues.retry_later(key);
                        let delay = engine.handling.backoff.delay(item.failed);
                        timers.push(Delayed::new(delay, key, item));
                    }
                    Outcome::Gone(item) if ended && deliveries.unsubscribed() => {
                        // Unsubscribed meanwhile: let go of it with the others.
                        log::debug!(
                            "sqlnotify: handler {:?} is gone (its actor stopped) after it was \
                             unsubscribed",
                            engine.handling.name
                        );
                        engine.let_go(std::iter::once(item));
                    }
                    Outcome::Gone(_) => {
                        // Returning drops the events in hand with their Acks unused, and the
                        // deliveries: the registry keeps the first event it offers after that
                        // held (`HeldSink::try_deliver`), so the position stays before every
                        // event not handled, also when none was in hand (a dead letter
                        // delivered again carries no Ack).
                        log::error!(
                            "sqlnotify: handler {:?} is gone (its actor stopped); its \
                             subscription delivers nothing more, a named consumer's position \
                             stays before the first event it did not handle until the notifier \
                             stops, and those events are delivered again after a restart",
                            engine.handling.name
                        );
                        return;
                    }
                },
                Some((key, item)) = timers.next(), if !timers.is_empty() => {
                    queues.retry_now(key, item);
                }
                (started, polled) = async { polling.as_mut().expect("checked").await }, if polling.is_some() => {
                    polling = None;
                    if engine.counters.standbys() != standbys {
                        stand_by!();
                    }
                    if started != generation.get() {
                        // Taken, but this process stood by meanwhile: handed back.
                        let taken = polled.redeliver.iter().filter_map(|item| item.taken);
                        engine.hand_back(taken.collect(), "stood by").await;
                    } else {
                        if let Some(dead) = polled.dead {
                            dead_gauge.set(dead);
                        }
                        for item in polled.redeliver {
                            let row = item.taken.expect("a dead letter delivered again was taken");
                            if held.contains(&row) || finished.contains(&row) {
                                log::debug!(
                                    "sqlnotify: handler {:?} took dead letter {row} again, \
                                     which it delivers already (or just did)",
                                    engine.handling.name
                                );
                                continue;
                            }
                            held.insert(row);
                            Counters::add(&engine.counters.redelivered, 1);
                            queues.push(key_of(&item.event), item);
                        }
                    }
                    finished.clear();
                }
                _ = poll.tick(), if polling.is_none() && !ended => {
                    if engine.counters.standbys() != standbys {
                        stand_by!();
                    }
                    if matches!(engine.counters.role(), Role::Active | Role::Independent) {
                        activate!(true);
                        let room = engine.handling.max_waiting.saturating_sub(queues.len());
                        let started = generation.get();
                        let poll = engine.clone().poll(room).map(move |polled| (started, polled));
                        polling = Some(Box::pin(poll));
                    } else {
                        activated = false;
                        resume.clear();
                        if engine.counters.role() == Role::Standby {
                            // The active process counts them.
                            dead_gauge.set(0);
                        }
                    }
                }
                delivery = deliveries.recv(), if room && !ended => match delivery {
                    Some(delivery) if delivery.event.ordinal() < *fence.borrow() => {
                        // Read under a lease lost since (still in the subscription's buffer or
                        // channel when the fence rose): the holder handles it. Its hold was
                        // forgotten or never taken, so its Ack goes unused, as the relay's
                        // does (`fence_off`): it keeps nothing back.
                        log::debug!(
                            "sqlnotify: handler {:?} drops {}.{} key {}: it was read under a \
                             consumer-group lease this process lost since, the process holding \
                             the lease handles it",
                            engine.handling.name,
                            delivery.event.schema(),
                            delivery.event.table(),
                            delivery.event.id()
                        );
                    }
                    Some(delivery) => {
                        if engine.counters.standbys() != standbys {
                            stand_by!();
                        }
                        // Only an active process gets events: it continues what the
                        // previous one left before it handles any. (An event read before a
                        // reconnect or a stand-by may arrive while the role says otherwise:
                        // the counts are read, the rows taken back only once active.)
                        activate!(matches!(
                            engine.counters.role(),
                            Role::Active | Role::Independent
                        ));
                        let event = delivery.event;
                        let mut item = Item {
                            event,
                            ack: Some(delivery.ack),
                            failed: 0,
                            row: None,
                            taken: None,
                            dead_before: false,
                        };
                        resume.continue_with(&mut item);
                        queues.push(key_of(&item.event), item);
                    }
                    None => {
                        ended = true;
                        if deliveries.unsubscribed() {
                            let_go_waiting!();
                        }
                    }
                },
            }
        }
    }

    /// Lets go of `items`, events the handler will not handle because its subscription was
    /// unsubscribed: their holds are released, as the registry releases those still in the
    /// subscription's buffer, so a named consumer's position moves past them and they are not
    /// delivered again. (A `retrying` row of one stays, as the README says.) The dead letters
    /// among them carry no hold; their rows are handed back by the caller.
    fn let_go(&self, items: impl Iterator<Item = Item>) {
        let mut events = 0;
        for item in items {
            if let Some(ack) = item.ack {
                ack.let_go();
                events += 1;
            }
        }
        if events > 0 {
            log::info!(
                "sqlnotify: handler {:?} was unsubscribed: it lets go of {events} events it \
                 had not handled",
                self.handling.name
            );
        }
    }

    /// One attempt at `item`, and what follows from it — unless `generation` moved on from
    /// `started`, the one it started in, while the handler ran (this process stood by): then
    /// it writes nothing to the dead-letter table, where the event is the active process's
    /// now, and is [`Outcome::Stale`].
    async fn attempt<C: Call>(
        self: Rc<Self>,
        call: Rc<C>,
        key: KeyId,
        mut item: Item,
        (generation, started): (Rc<Cell<u64>>, u64),
    ) -> Outcome {
        // Saturating: a stored count comes from a table anyone who can write it may set.
        let number = item.failed.saturating_add(1);
        let attempt = Attempt {
            event: item.event.clone(),
            attempt: number,
        };
        // The call itself runs inside the caught future too: a closure handler may panic
        // before it returns its future (in the code in front of its `async` block), and that
        // panic would otherwise end this handler's loop, silently.
        let caught = AssertUnwindSafe(async move { call.call(attempt).await }).catch_unwind();
        let result = match caught.await {
            Ok(Some(result)) => result,
            Ok(None) => return Outcome::Gone(item),
            Err(panic) => {
                Counters::add(&self.counters.subscriber_panics, 1);
                Err(format!(
                    "the handler panicked: {}",
                    crate::error::panic_message(&*panic)
                )
                .into())
            }
        };
        let error = match result {
            Ok(()) => {
                // Counted before the row goes: whoever sees the row gone sees the count.
                Counters::add(&self.counters.handled, 1);
                self.metrics.handled.increment(1);
                if self.stood_by(&item, &generation, started) {
                    return Outcome::Stale;
                }
                if let Some(row) = item.row {
                    if let Err(e) = self.store.resolve(row).await {
                        log::warn!(
                            "sqlnotify: handler {:?} handled {}.{} key {} but could not \
                             remove its dead-letter row {row}: {e}",
                            self.handling.name,
                            item.event.schema(),
                            item.event.table(),
                            item.event.id()
                        );
                    }
                } else if let Some(sequence) = item.event.sequence().filter(|_| item.dead_before) {
                    // Dead-lettered by an earlier process, delivered again: its stale row goes.
                    let (name, part) = (self.handling.name.clone(), item.event.part());
                    if let Err(e) = self.store.resolve_event(name, sequence, part).await {
                        log::warn!(
                            "sqlnotify: handler {:?} handled {}.{} key {} but could not \
                             remove the dead letter an earlier process stored of it: {e}",
                            self.handling.name,
                            item.event.schema(),
                            item.event.table(),
                            item.event.id()
                        );
                    }
                }
                if let Some(ack) = item.ack.take() {
                    ack.ack();
                }
                return Outcome::Done(key, item.taken);
            }
            // As it is stored (and logged): no NUL, at most 64 KiB.
            Err(e) => crate::dead_letters::storable_error(e.to_string()),
        };
        Counters::add(&self.counters.handler_errors, 1);
        self.metrics.errors.increment(1);
        if self.stood_by(&item, &generation, started) {
            return Outcome::Stale;
        }
        item.failed = number;
        let dead = number >= self.handling.max_attempts;
        let event = &item.event;
        let failure = Failure {
            id: item.row,
            handler: self.handling.name.clone(),
            channel: event.channel().to_string(),
            sequence: event.sequence(),
            part: event.part(),
            key: key_text(event),
            event: event.to_record(),
            attempts: number,
            error: error.clone(),
            state: if dead {
                DeadLetterState::Dead
            } else if item.ack.is_none() {
                // A dead letter delivered again (live events carry their ack): nothing in
                // the journal brings it back, so it must not be left `retrying`.
                DeadLetterState::Redelivering
            } else {
                DeadLetterState::Retrying
            },
        };
        match self.store.record(failure).await {
            Ok(row) => item.row = Some(row),
            Err(e) if dead => {
                // Never acknowledged without its dead letter: try again (the handler too).
                log::warn!(
                    "sqlnotify: handler {:?} could not store the dead letter of {}.{} key {} \
                     (tried again later): {e}",
                    self.handling.name,
                    event.schema(),
                    event.table(),
                    event.id()
                );
                Counters::add(&self.counters.retries, 1);
                self.metrics.retries.increment(1);
                return Outcome::Retry(key, item);
            }
            Err(e) => log::warn!(
                "sqlnotify: handler {:?} could not record attempt {number} on {}.{} key {}: {e}",
                self.handling.name,
                event.schema(),
                event.table(),
                event.id()
            ),
        }
        if dead {
            log::warn!(
                "sqlnotify: handler {:?} gave up on {}.{} key {} after {number} attempt(s); \
                 stored as dead letter {}: {error}",
                self.handling.name,
                event.schema(),
                event.table(),
                event.id(),
                item.row.unwrap_or_default()
            );
            Counters::add(&self.counters.dead_lettered, 1);
            self.metrics.dead_lettered.increment(1);
            if let Some(ack) = item.ack.take() {
                ack.ack();
            }
            Outcome::Done(key, item.taken)
        } else {
            log::debug!(
                "sqlnotify: handler {:?} failed on {}.{} key {} (attempt {number} of {}): {error}",
                self.handling.name,
                event.schema(),
                event.table(),
                event.id(),
                self.handling.max_attempts
            );
            Counters::add(&self.counters.retries, 1);
            self.metrics.retries.increment(1);
            Outcome::Retry(key, item)
        }
    }

    /// Marks `rows`, dead letters this process took to deliver again, `requested` again —
    /// those still `redelivering` — for the active process to take, when this one stood by
    /// (`why`), or for the next process of the handler, when it was unsubscribed.
    async fn hand_back(&self, rows: Vec<i64>, why: &str) {
        if rows.is_empty() {
            return;
        }
        let n = rows.len();
        if let Err(e) = self.store.reset_redelivering(Target::Ids(rows)).await {
            log::warn!(
                "sqlnotify: handler {:?} {why} but could not hand back the {n} dead letters \
                 it was delivering again (they stay `redelivering` until a process of the \
                 handler next takes over): {e}",
                self.handling.name
            );
        }
    }

    /// Whether this process stood by since the attempt at `item` started (`generation` is
    /// no longer `started`); says so.
    fn stood_by(&self, item: &Item, generation: &Cell<u64>, started: u64) -> bool {
        let stood_by = generation.get() != started;
        if stood_by {
            log::debug!(
                "sqlnotify: handler {:?} stood by while it ran on {}.{} key {}: what follows \
                 is the active process's",
                self.handling.name,
                item.event.schema(),
                item.event.table(),
                item.event.id()
            );
        }
        stood_by
    }

    /// What a process that becomes active continues: the attempt counts of the events that
    /// were failing, and the events that are dead, by `(sequence, part)`; and, with
    /// `take_back` (it did not hold the role since it last took them back: it started, or
    /// stood by while another process was active), the dead letters a gone process was
    /// delivering again go back to `requested`.
    async fn activate(&self, take_back: bool) -> Resume {
        let name = &self.handling.name;
        if take_back {
            let every = Target::Handler(name.clone());
            if let Err(e) = self.store.reset_redelivering(every).await {
                log::warn!(
                    "sqlnotify: handler {name:?} could not take back the dead letters a \
                     previous process was delivering again: {e}"
                );
            }
        }
        let retrying = match self.store.retrying(name.clone()).await {
            Ok(rows) => rows
                .into_iter()
                .map(|r| ((r.sequence, r.part), r))
                .collect(),
            Err(e) => {
                log::warn!(
                    "sqlnotify: handler {name:?} could not read the attempt counts of failing \
                     events (they start again from 1): {e}"
                );
                HashMap::new()
            }
        };
        let dead = match self.store.dead(name.clone()).await {
            Ok(rows) => rows.into_iter().map(|r| (r.sequence, r.part)).collect(),
            Err(e) => {
                log::warn!(
                    "sqlnotify: handler {name:?} could not read its dead events (a dead letter \
                     whose event the journal delivers again and which is handled now stays): \
                     {e}"
                );
                HashSet::new()
            }
        };
        Resume { retrying, dead }
    }

    /// A look at the dead-letter table: the dead letters a retry was asked for (at most
    /// `room`), and the count of dead ones.
    async fn poll(self: Rc<Self>, room: usize) -> Polled {
        let name = self.handling.name.clone();
        let warn = |what: &str, e: crate::Error| {
            log::warn!("sqlnotify: handler {name:?} could not {what}: {e}");
        };
        let mut redeliver = Vec::new();
        if room > 0 {
            let limit = room.min(1_000) as u32;
            match self.store.take_requested(name.clone(), limit).await {
                Ok(letters) => {
                    for letter in letters {
                        match ChangeEvent::from_record(&letter.event, letter.part, &self.channels) {
                            Ok(event) => redeliver.push(Item {
                                event,
                                ack: None,
                                failed: 0,
                                row: Some(letter.id),
                                taken: Some(letter.id),
                                dead_before: false,
                            }),
                            Err(e) => {
                                let failure = Failure {
                                    id: Some(letter.id),
                                    handler: letter.handler,
                                    channel: letter.channel,
                                    sequence: letter.sequence,
                                    part: letter.part,
                                    key: letter.key,
                                    event: letter.event,
                                    attempts: letter.attempts,
                                    error: format!("cannot be delivered again: {e}"),
                                    state: DeadLetterState::Dead,
                                };
                                if let Err(e) = self.store.record(failure).await {
                                    warn("mark an undeliverable dead letter dead again", e);
                                }
                            }
                        }
                    }
                }
                Err(e) => warn("look for dead letters to deliver again", e),
            }
        }
        let dead = match self.store.counts(Some(name.clone())).await {
            Ok(counts) => Some(counts.dead),
            Err(e) => {
                warn("count its dead letters", e);
                None
            }
        };
        Polled { redeliver, dead }
    }
}

#[cfg(test)]
// Most of these tests run on a paused clock (feature `test-paused-clock`); without it, their
// helpers go unused.
#[cfg_attr(not(feature = "test-paused-clock"), allow(dead_code, unused_imports))]
mod tests {
    //! The engine's loop against an in-memory dead-letter store and the role set by hand.
    //! Tests that need time to pass in a role (a reconnect longer than a poll interval, a
    //! retry's delay) run on tokio's paused clock: it moves on only once every task waits,
    //! so what the loop does in that time is done when the test looks, on any machine.

    use std::cell::{Cell, RefCell};
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;
    use std::time::{Duration, SystemTime};

    use futures_util::future::BoxFuture;
    use serde_json::{json, Map};
    use tokio::sync::oneshot;

    use super::*;
    use crate::acked::held_channel;
    use crate::dead_letters::{DeadLetter, DeadLetterCounts, Target};
    use crate::error::Result;
    use crate::event::RawNotification;
    use crate::tier::Tier;

    /// The test handler's name.
    const NAME: &str = "h";
    /// The poll interval of the tests that set one.
    const POLL: Duration = Duration::from_millis(10);

    /// An in-memory dead-letter table of one handler — each row's state and event — that
    /// counts the engine's calls.
    #[derive(Default)]
    struct Store {
        /// Activations that took back the handler's rows being delivered again.
        resets: AtomicU64,
        /// Activations (reads of the attempt counts).
        reads: AtomicU64,
        /// Failed attempts recorded.
        records: AtomicU64,
        /// The rows handed back by id, in order.
        handed_back: Mutex<Vec<i64>>,
        rows: Mutex<BTreeMap<i64, (DeadLetterState, ChangeEvent)>>,
        /// When set, the next take marks its rows at once but answers only once the sender
        /// is used or dropped (a take under way).
        gate: Mutex<Option<oneshot::Receiver<()>>>,
    }

    impl Store {
        fn count(counter: &AtomicU64) -> u64 {
            counter.load(Ordering::Relaxed)
        }

        fn rows(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, (DeadLetterState, ChangeEvent)>> {
            self.rows.lock().unwrap()
        }

        /// A dead letter of `event` a retry was asked for, as row `id`.
        fn requested(&self, id: i64, event: ChangeEvent) {
            self.rows().insert(id, (DeadLetterState::Requested, event));
        }

        fn state(&self, id: i64) -> Option<DeadLetterState> {
            self.rows().get(&id).map(|(state, _)| *state)
        }

        fn handed_back(&self) -> Vec<i64> {
            self.handed_back.lock().unwrap().clone()
        }
    }

    fn ok<T: Send + 'static>(value: T) -> BoxFuture<'static, Result<T>> {
        Box::pin(async move { Ok(value) })
    }

    impl DeadLetterStore for Store {
        fn record(&self, f: Failure) -> BoxFuture<'static, Result<i64>> {
            self.records.fetch_add(1, Ordering::Relaxed);
            let mut rows = self.rows();
            let channels = channels();
            let event = ChangeEvent::from_record(&f.event, f.part, &channels).unwrap();
            let id = match f.id.filter(|id| rows.contains_key(id)) {
                Some(id) => id,
                None => rows.keys().last().map_or(1, |last| last + 1),
            };
            rows.insert(id, (f.state, event));
            ok(id)
        }
        fn resolve(&self, id: i64) -> BoxFuture<'static, Result<()>> {
            self.rows().remove(&id);
            ok(())
        }
        fn in_state(&self, _: String, state: &str) -> BoxFuture<'static, Result<Vec<Retrying>>> {
            if state == "retrying" {
                self.reads.fetch_add(1, Ordering::Relaxed);
            }
            ok(Vec::new())
        }
        fn resolve_event(&self, _: String, _: i64, _: u32) -> BoxFuture<'static, Result<u64>> {
            ok(0)
        }
        fn take_requested(
            &self,
            _: String,
            limit: u32,
        ) -> BoxFuture<'static, Result<Vec<DeadLetter>>> {
            let mut taken = Vec::new();
            for (&id, (state, event)) in self.rows().iter_mut() {
                if *state == DeadLetterState::Requested && taken.len() < limit as usize {
                    *state = DeadLetterState::Redelivering;
                    taken.push(letter(id, event));
                }
            }
            let gate = self.gate.lock().unwrap().take();
            Box::pin(async move {
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                Ok(taken)
            })
        }
        fn reset_redelivering(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
            let ids = match target {
                Target::Handler(_) => {
                    self.resets.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Target::Ids(ids) => {
                    self.handed_back.lock().unwrap().extend(&ids);
                    Some(ids)
                }
            };
            let mut n = 0;
            for (id, (state, _)) in self.rows().iter_mut() {
                let targeted = ids.as_ref().is_none_or(|ids| ids.contains(id));
                if targeted && *state == DeadLetterState::Redelivering {
                    *state = DeadLetterState::Requested;
                    n += 1;
                }
            }
            ok(n)
        }
        fn list(
            &self,
            _: Option<String>,
            _: Option<u64>,
        ) -> BoxFuture<'static, Result<Vec<DeadLetter>>> {
            ok(Vec::new())
        }
        fn get(&self, _: i64) -> BoxFuture<'static, Result<Option<DeadLetter>>> {
            ok(None)
        }
        fn request_retry(&self, _: Target) -> BoxFuture<'static, Result<u64>> {
            ok(0)
        }
        fn discard(&self, _: Target) -> BoxFuture<'static, Result<u64>> {
            ok(0)
        }
        fn counts(&self, _: Option<String>) -> BoxFuture<'static, Result<DeadLetterCounts>> {
            ok(DeadLetterCounts::default())
        }
    }

    /// Row `id` of `event` as `take_requested` returns it.
    fn letter(id: i64, event: &ChangeEvent) -> DeadLetter {
        DeadLetter {
            id,
            handler: NAME.into(),
            channel: event.channel().to_string(),
            sequence: event.sequence(),
            part: event.part(),
            key: key_text(event),
            event: event.to_record(),
            attempts: 1,
            first_failed: SystemTime::UNIX_EPOCH,
            last_failed: SystemTime::UNIX_EPOCH,
            error: "failed".into(),
            state: DeadLetterState::Redelivering,
        }
    }

    /// A handler that handles every event.
    struct Handles;

    impl Call for Handles {
        fn call(
            &self,
            _: Attempt,
        ) -> LocalBoxFuture<'static, Option<std::result::Result<(), HandlerError>>> {
            Box::pin(async { Some(Ok(())) })
        }
    }

    /// What a [`Script`]ed call answers.
    enum Answer {
        /// An error.
        Fail,
        /// An error, once the sender is used or dropped.
        FailAfter(oneshot::Receiver<()>),
        /// Handled, once the sender is used or dropped.
        HandleAfter(oneshot::Receiver<()>),
    }

    /// A handler that answers its calls from a script, in order, and handles every event
    /// once the script is used up; it counts its calls.
    #[derive(Clone, Default)]
    struct Script {
        calls: Rc<Cell<u32>>,
        answers: Rc<RefCell<VecDeque<Answer>>>,
    }

    impl Script {
        fn new(answers: impl IntoIterator<Item = Answer>) -> Self {
            Script {
                calls: Rc::default(),
                answers: Rc::new(RefCell::new(answers.into_iter().collect())),
            }
        }

        fn calls(&self) -> u32 {
            self.calls.get()
        }
    }

    impl Call for Script {
        fn call(
            &self,
            _: Attempt,
        ) -> LocalBoxFuture<'static, Option<std::result::Result<(), HandlerError>>> {
            self.calls.set(self.calls.get() + 1);
            let answer = self.answers.borrow_mut().pop_front();
            Box::pin(async move {
                match answer {
                    None => Some(Ok(())),
                    Some(Answer::Fail) => Some(Err("scripted failure".into())),
                    Some(Answer::FailAfter(release)) => {
                        let _ = release.await;
                        Some(Err("scripted failure".into()))
                    }
                    Some(Answer::HandleAfter(release)) => {
                        let _ = release.await;
                        Some(Ok(()))
                    }
                }
            })
        }
    }

    fn channels() -> Channels {
        Channels::new(
            [(*crate::event::test_channel(Tier::Durable)).clone()],
            "public",
        )
    }

    fn event(id: i64) -> ChangeEvent {
        let channel = crate::event::test_channel(Tier::Durable);
        let raw = RawNotification::new("c", "").with_sequence(id);
        ChangeEvent::new(channel, Key::Single(json!(id)), Map::new(), &raw, false).at(id as u64)
    }

    /// The engine of handler [`NAME`] on `store`, with `counters`.
    fn engine(store: &Arc<Store>, counters: &Arc<Counters>, handling: Handling) -> Engine {
        Engine {
            handling,
            store: store.clone(),
            counters: counters.clone(),
            channels: Arc::new(channels()),
            metrics: HandlerMetrics::new(NAME),
        }
    }

    /// Handler [`NAME`] polling every [`POLL`], retrying after 0.5–1 s.
    fn handling() -> Handling {
        Handling::new(NAME)
            .redelivery_poll(POLL)
            .backoff(Duration::from_secs(1), Duration::from_secs(1))
    }

    /// Counters of an active process.
    fn active() -> Arc<Counters> {
        let counters = Arc::new(Counters::default());
        counters.set_role(Role::Active);
        counters
    }

    #[cfg(feature = "test-paused-clock")]
    /// An active engine on tokio's paused clock, running `script`, with dead letter 17
    /// `requested` for it to deliver again: its store, counters, script and the sink that
    /// feeds it events (kept, so that the engine's deliveries stay open).
    fn delivering_17(
        script: Script,
    ) -> (Arc<Store>, Arc<Counters>, Script, crate::acked::HeldSink) {
        tokio::time::pause();
        let store = Arc::new(Store::default());
        store.requested(17, event(17));
        let counters = active();
        let (sink, deliveries) = held_channel(16, counters.holds.clone());
        actix::spawn(engine(&store, &counters, handling()).run(script.clone(), deliveries));
        (store, counters, script, sink)
    }

    /// Waits until `done` holds, for at most 5 s; whether it does.
    async fn until(mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..500 {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        done()
    }

    async fn resets_reach(store: &Store, n: u64) -> bool {
        until(|| Store::count(&store.resets) >= n).await
    }

    /// An event of key `key` at `ordinal` (its sequence too).
    fn keyed(key: i64, ordinal: u64) -> ChangeEvent {
        let channel = crate::event::test_channel(Tier::Durable);
        let raw = RawNotification::new("c", "").with_sequence(ordinal as i64);
        ChangeEvent::new(channel, Key::Single(json!(key)), Map::new(), &raw, false).at(ordinal)
    }

    /// Holds `event`, as the registry does when it selects it, and hands it to the loop.
    fn offer(sink: &crate::acked::HeldSink, event: ChangeEvent) {
        sink.hold(&event);
        assert!(sink.try_deliver(event).is_ok());
    }

    /// Ends the loop's deliveries: as an unsubscribe does, or as the notifier's stop does.
    fn end(sink: crate::acked::HeldSink, unsubscribed: bool) {
        if unsubscribed {
            sink.unsubscribed();
        }
        drop(sink);
    }

    /// An unsubscribed handler lets go of the events it did not start — key 1's first event
    /// waiting out a minute's retry delay, its second waiting behind it — so the position may
    /// move past them; a stopped one keeps them held, to be delivered again after a restart.
    /// Before, an unsubscribe kept them held too, for the rest of the process: the consumer's
    /// position never moved again.
    #[cfg(feature = "test-paused-clock")]
    #[actix_rt::test]
    async fn an_unsubscribed_handler_lets_go_of_the_events_it_did_not_start() {
        tokio::time::pause();
        for unsubscribed in [true, false] {
            let store = Arc::new(Store::default());
            let counters = active();
            let (sink, deliveries) = held_channel(16, counters.holds.clone());
            let script = Script::new([Answer::Fail]);
            let minute = Duration::from_secs(60);
            let handling = handling().backoff(minute, minute);
            actix::spawn(engine(&store, &counters, handling).run(script.clone(), deliveries));
            offer(&sink, keyed(1, 1));
            offer(&sink, keyed(1, 2));
            let errors = || Store::count(&counters.handler_errors);
            assert!(until(|| errors() == 1).await, "the first attempt failed");
            end(sink, unsubscribed);
            // Every Ack used or dropped: the loop has ended.
            tokio::time::timeout(Duration::from_secs(5), counters.holds.settled())
                .await
                .expect("the loop ends");
            let floor = counters.holds.floor();
            if unsubscribed {
                assert_eq!(floor, None, "both let go");
            } else {
                assert_eq!(floor, Some(1), "a stop keeps them held");
                assert_eq!(counters.holds.len(), 2);
            }
            assert_eq!(script.calls(), 1, "nothing more started");
        }
    }

    /// Unsubscribed while a call runs long, the loop lets go of the events waiting for a slot
    /// at once: the long call holds back only its own event until it ends.
    #[cfg(feature = "test-paused-clock")]
    #[actix_rt::test]
    async fn an_unsubscribe_lets_go_of_the_waiting_events_while_a_call_runs() {
        tokio::time::pause();
        let store = Arc::new(Store::default());
        let counters = active();
        let (sink, deliveries) = held_channel(16, counters.holds.clone());
        let (finish, finished) = oneshot::channel();
        let script = Script::new([Answer::HandleAfter(finished)]);
        let handling = handling().keys_in_flight(1);
        actix::spawn(engine(&store, &counters, handling).run(script.clone(), deliveries));
        offer(&sink, keyed(1, 1));
        offer(&sink, keyed(2, 2));
        offer(&sink, keyed(3, 3));
        assert!(until(|| script.calls() == 1).await, "key 1 runs");
        end(sink, true);
        assert!(
            until(|| counters.holds.len() == 1).await,
            "keys 2 and 3 let go while key 1 runs: {} held",
            counters.holds.len()
        );
        assert_eq!(counters.holds.floor(), Some(1));
        finish.send(()).unwrap();
        assert!(until(|| counters.holds.floor().is_none()).await, "handled");
        assert_eq!(script.calls(), 1);
    }

    /// An unsubscribed handler hands back the dead letter it was delivering again (here one
    /// waiting for its retry) — `requested` again, for the next process of the handler — and
    /// does not retry it. Before, the row stayed `redelivering` until a process of the handler
    /// next took over.
    #[cfg(feature = "test-paused-clock")]
    #[actix_rt::test]
    async fn an_unsubscribed_handler_hands_back_the_dead_letters_it_was_delivering_again() {
        let (store, _counters, script, sink) = delivering_17(Script::new([Answer::Fail]));
        assert!(
            until(|| Store::count(&store.records) == 1).await,
            "first attempt failed"
        );
        end(sink, true);
        assert!(until(|| store.handed_back() == [17]).await, "handed back");
        assert_eq!(store.state(17), Some(DeadLetterState::Requested));
        // Paused clock: past the retry's delay.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(script.calls(), 1, "no retry");
    }

    /// A standby that begins and ends between two looks of the loop at the role (another
    /// process active for less than a poll interval) is still followed by a new activation
    /// before the next event: that process's state is read back. Before, the loop kept its
    /// old activation and never read it.
    #[actix_rt::test]
    async fn a_standby_between_two_looks_at_the_role_is_followed_by_a_new_activation() {
        let store = Arc::new(Store::default());
        let counters = Arc::new(Counters::default());
        counters.set_role(Role::Active);
        let (sink, deliveries) = held_channel(16, counters.holds.clone());
        let engine = Engine {
            handling: Handling::new("h").redelivery_poll(Duration::from_secs(3600)),
            store: store.clone(),
            counters: counters.clone(),
            channels: Arc::new(Channels::new(Vec::new(), "public")),
            metrics: HandlerMetrics::new("h"),
        };
        actix::spawn(engine.run(Handles, deliveries));
        assert!(resets_reach(&store, 1).await, "activated at its first poll");
        let _ = sink.try_deliver(event(1));
        // A short standby the loop never looks at while it lasts.
        counters.set_role(Role::Standby);
        counters.set_role(Role::Active);
        let _ = sink.try_deliver(event(2));
        assert!(
            resets_reach(&store, 2).await,
            "activated again: {} activations",
            store.resets.load(Ordering::Relaxed)
        );
    }

    /// A handler that handles every event and records each one's ordinal.
    #[derive(Clone, Default)]
    struct Records(Rc<RefCell<Vec<u64>>>);

    impl Call for Records {
        fn call(
            &self,
            attempt: Attempt,
        ) -> LocalBoxFuture<'static, Option<std::result::Result<(), HandlerError>>> {
            self.0.borrow_mut().push(attempt.event.ordinal());
            Box::pin(async { Some(Ok(())) })
        }
    }

    /// An event read under a consumer-group lease this process lost since — still in the
    /// subscription's channel when the fence rose — is dropped unhandled once the process is
    /// active again; the event of the same key read under the lease taken again (above the
    /// fence) is handled, and nothing stays held. Before, the stale event was handled first:
    /// after the process that held the lease meanwhile had handled it and newer ones.
    #[actix_rt::test]
    async fn an_event_read_under_a_lost_lease_is_not_handled() {
        let store = Arc::new(Store::default());
        let counters = Arc::new(Counters::default());
        counters.set_role(Role::Active);
        let (sink, deliveries) = held_channel(16, counters.holds.clone());
        // Read and routed under the lease, not received yet when the lease is lost.
        offer(&sink, keyed(1, 5));
        counters.holds.fence(10);
        counters.set_role(Role::Standby);
        // The lease taken again (retried every 250 ms): read above the fence.
        counters.set_role(Role::Active);
        offer(&sink, keyed(1, 12));
        let records = Records::default();
        actix::spawn(engine(&store, &counters, handling()).run(records.clone(), deliveries));
        assert!(
            until(|| records.0.borrow().contains(&12)).await,
            "the event above the fence is handled"
        );
        assert_eq!(*records.0.borrow(), [12], "the stale event is not handled");
        assert!(
            until(|| counters.holds.floor().is_none()).await,
            "nothing stays held: {:?}",
            counters.holds.floor()
        );
    }

    /// A reconnect — the role `Starting` for longer than a poll interval, then active again
    /// without standing by — reads the attempt counts back but takes back none of the rows
    /// this process delivers again: it still holds them. Before, every reconnect took them
    /// back (two activations taking back here).
    #[cfg(feature = "test-paused-clock")]
    #[actix_rt::test]
    async fn a_reconnect_takes_back_no_rows() {
        tokio::time::pause();
        let store = Arc::new(Store::default());
        let counters = active();
        let (_sink, deliveries) = held_channel(16, counters.holds.clone());
        actix::spawn(engine(&store, &counters, handling()).run(Handles, deliveries));
        assert!(until(|| Store::count(&store.reads) == 1).await, "activated");
        assert_eq!(Store::count(&store.resets), 1, "took back at its start");
        counters.set_role(Role::Starting);
        // Paused clock: five poll intervals pass, each tick seen by the loop.
        tokio::time::sleep(POLL * 5).await;
        counters.set_role(Role::Active);
        assert!(
            until(|| Store::count(&store.reads) == 2).await,
            "the counts read back once active again"
        );
        assert_eq!(Store::count(&store.resets), 1, "no rows taken back");
    }

    /// A dead letter delivered again whose first attempt failed, and whose retry waits
    /// across a reconnect, is handled by that retry, once: two calls in all, one failure
    /// recorded, the row gone. Before, the reconnect took the row back, the next poll took it
    /// again, and the second copy ran the handler a third time after the first had handled
    /// the event (and, failing, would have recorded it afresh, to end up dead).
    #[cfg(feature = "test-paused-clock")]
    #[actix_rt::test]
    async fn a_dead_letter_delivered_again_is_handled_once_across_a_reconnect() {
        let (store, counters, script, _sink) = delivering_17(Script::new([Answer::Fail]));
        assert!(
            until(|| Store::count(&store.records) == 1).await,
            "first attempt failed"
        );
        assert_eq!(store.state(17), Some(DeadLetterState::Redelivering));
        // A reconnect shorter than the retry's delay (at least 0.5 s).
        counters.set_role(Role::Starting);
        tokio::time::sleep(POLL * 10).await;
        counters.set_role(Role::Active);
        assert!(
            until(|| store.state(17).is_none()).await,
            "handled by the retry"
        );
        // Paused clock: a second copy, queued behind the first, would have run by now.
        tokio::time::sleep(POLL * 10).await;
        assert_eq!(script.calls(), 2, "the failed attempt and the retry");
        assert_eq!(Store::count(&store.records), 1);
        assert!(store.rows().is_empty());
    }

    /// An attempt that fails after its process stood by records nothing: the event is the
    /// active process's, which delivers it again. Before, it recorded a `retrying` row (or,
    /// on the last attempt, a dead letter) for an event the active process may have handled.
    #[cfg(feature = "test-paused-clock")]
    #[actix_rt::test]
    async fn an_attempt_failing_after_a_stand_by_records_nothing() {
        tokio::time::pause();
        let store = Arc::new(Store::default());
        let counters = active();
        let (sink, deliveries) = held_channel(16, counters.holds.clone());
        let (release, released) = oneshot::channel();
        let script = Script::new([Answer::FailAfter(released)]);
        actix::spawn(engine(&store, &counters, handling()).run(script.clone(), deliveries));
        assert!(sink.try_deliver(event(1)).is_ok());
        assert!(until(|| script.calls() == 1).await, "the attempt runs");
        counters.set_role(Role::Standby);
        // Paused clock: the loop sees the standby at its next tick.
        tokio::time::sleep(POLL * 5).await;
        release.send(()).unwrap();
        let errors = || Store::count(&counters.handler_errors);
        assert!(until(|| errors() == 1).await, "the attempt failed");
        assert_eq!(Store::count(&store.records), 0, "nothing recorded");
        assert!(store.rows().is_empty());
    }

    /// A dead letter delivered again whose attempt succeeds after its process stood by keeps
    /// its row: the active process delivers it again (it may be doing so already). Before,
    /// the row was deleted under it.
    #[cfg(feature = "test-paused-clock")]
    #[actix_rt::test]
    async fn an_attempt_succeeding_after_a_stand_by_keeps_the_row() {
        let (release, released) = oneshot::channel();
        let (store, counters, script, _sink) =
            delivering_17(Script::new([Answer::HandleAfter(released)]));
        assert!(
            until(|| script.calls() == 1).await,
            "the letter is delivered"
        );
        counters.set_role(Role::Standby);
        tokio::time::sleep(POLL * 5).await;
        release.send(()).unwrap();
        assert!(
            until(|| Store::count(&counters.handled) == 1).await,
            "handled"
        );
        assert!(store.state(17).is_some(), "the row stays");
    }

    /// A dead letter this process delivers again, marked `requested` while it waits for its
    /// retry (as a process standing by that hands back what it took does), is taken again
    /// but delivered once: two calls in all. Before, the copy taken again ran the handler a
    /// third time after the retry had handled the event.
    #[cfg(feature = "test-paused-clock")]
    #[actix_rt::test]
    async fn a_dead_letter_taken_again_while_held_is_delivered_once() {
        let (store, counters, script, _sink) = delivering_17(Script::new([Answer::Fail]));
        assert!(
            until(|| Store::count(&store.records) == 1).await,
            "first attempt failed"
        );
        store.requested(17, event(17));
        let taken = || store.state(17) == Some(DeadLetterState::Redelivering);
        assert!(until(taken).await, "taken again");
        assert!(
            until(|| store.state(17).is_none()).await,
            "handled by the retry"
        );
        // Paused clock: a copy queued behind the retry would have run by now.
        tokio::time::sleep(POLL * 10).await;
        assert_eq!(script.calls(), 2, "the failed attempt and the retry");
        assert_eq!(Store::count(&counters.redelivered), 1);
    }

    /// A dead letter whose attempt succeeds while a poll that took it again is under way is
    /// not delivered again when that poll's answer comes: one call. Before, it was.
    #[cfg(feature = "test-paused-clock")]
    #[actix_rt::test]
    async fn a_dead_letter_handled_while_a_poll_took_it_again_is_delivered_once() {
        let (handle, handled) = oneshot::channel();
        let (store, _counters, script, _sink) =
            delivering_17(Script::new([Answer::HandleAfter(handled)]));
        assert!(
            until(|| script.calls() == 1).await,
            "the letter is delivered"
        );
        let (answer, gate) = oneshot::channel();
        *store.gate.lock().unwrap() = Some(gate);
        store.requested(17, event(17));
        let taken = || store.state(17) == Some(DeadLetterState::Redelivering);
        assert!(until(taken).await, "taken again, the answer held back");
        handle.send(()).unwrap();
        assert!(until(|| store.state(17).is_none()).await, "handled");
        answer.send(()).unwrap();
        tokio::time::sleep(POLL * 10).await;
        assert_eq!(script.calls(), 1);
    }

    /// A process that stands by hands back the dead letters it was delivering again — here
    /// one waiting for its retry — for the active process to take: it may have taken over
    /// (and taken back what was `redelivering`) before this one took them. Its retry does not
    /// run. Before, the row stayed `redelivering` until the active process next took over.
    #[cfg(feature = "test-paused-clock")]
    #[actix_rt::test]
    async fn the_dead_letters_held_at_a_stand_by_are_handed_back() {
        let (store, counters, script, _sink) = delivering_17(Script::new([Answer::Fail]));
        assert!(
            until(|| Store::count(&store.records) == 1).await,
            "first attempt failed"
        );
        counters.set_role(Role::Standby);
        assert!(until(|| store.handed_back() == [17]).await, "handed back");
        assert_eq!(store.state(17), Some(DeadLetterState::Requested));
        // Paused clock: past the retry's delay.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(script.calls(), 1, "no retry");
        assert_eq!(store.state(17), Some(DeadLetterState::Requested));
    }

    /// A poll under way when its process stands by hands back what it took, and delivers
    /// none of it. Before, the rows stayed `redelivering` until the active process next took
    /// over.
    #[cfg(feature = "test-paused-clock")]
    #[actix_rt::test]
    async fn a_poll_under_way_at_a_stand_by_hands_back_what_it_took() {
        tokio::time::pause();
        let store = Arc::new(Store::default());
        store.requested(17, event(17));
        store.requested(18, event(18));
        let (answer, gate) = oneshot::channel();
        *store.gate.lock().unwrap() = Some(gate);
        let counters = active();
        let (_sink, deliveries) = held_channel(16, counters.holds.clone());
        let script = Script::default();
        actix::spawn(engine(&store, &counters, handling()).run(script.clone(), deliveries));
        let taken = || store.state(18) == Some(DeadLetterState::Redelivering);
        assert!(until(taken).await, "taken, the answer held back");
        counters.set_role(Role::Standby);
        answer.send(()).unwrap();
        assert!(
            until(|| store.handed_back() == [17, 18]).await,
            "handed back"
        );
        assert_eq!(store.state(17), Some(DeadLetterState::Requested));
        assert_eq!(store.state(18), Some(DeadLetterState::Requested));
        tokio::time::sleep(POLL * 10).await;
        assert_eq!(script.calls(), 0, "nothing delivered");
        assert_eq!(Store::count(&counters.redelivered), 0);
    }
}
