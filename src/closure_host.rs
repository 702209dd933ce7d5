//! Closure subscribers (`subscribe_fn`): one actor per pipeline and arbiter, the
//! [`ClosureHost`], runs every closure subscribed on that arbiter.
//!
//! The registry hands a closure's events over by appending them to an [`Outbox`]; at the end of
//! a routed batch (or a retry) the outbox goes to each host as one [`Run`] message, which runs
//! them in order. So a batch of events for many closures costs one message and one actor
//! wake-up, not one per event as with an actor per closure, and an idle closure costs its box
//! and a counter, not an actor. Each closure may have [`CLOSURE_CAPACITY`] events handed over
//! and not yet run (its `pending` count, shared with the registry's [`FnSink`]); beyond that
//! the sink refuses as a full mailbox would, and the events wait in the subscriber's buffer
//! under its overflow policy. Dropping the sink (unsubscribe, a failed subscribe, the registry
//! stopping) sends [`Remove`] after whatever was handed over before, and the closure is dropped
//! once those have run.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use actix::WeakAddr;

use crate::event::ChangeEvent;
use crate::lifecycle::Flush;
use crate::stats::Counters;
use crate::subscriber::call_catching;

/// Events one closure may have handed over and not yet run (its mailbox, as it were).
pub(crate) const CLOSURE_CAPACITY: usize = 1024;

/// One subscribed closure.
struct Entry {
    f: Option<Box<dyn FnMut(ChangeEvent)>>,
    /// Events handed over and not yet run.
    pending: Arc<AtomicUsize>,
}

/// The closures of one host, by key (a slot that stays theirs until removed).
#[derive(Default)]
struct Closures {
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
}

impl Closures {
    fn insert(&mut self, entry: Entry) -> usize {
        match self.free.pop() {
            Some(key) => {
                self.slots[key] = Some(entry);
                key
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        }
    }
}

/// Runs the closures subscribed on one arbiter to one pipeline.
pub(crate) struct ClosureHost {
    closures: Rc<RefCell<Closures>>,
    stats: Arc<Counters>,
}

impl Actor for ClosureHost {
    type Context = Context<Self>;
}

/// Events to run, in order: each with its closure's key.
pub(crate) struct Run(pub Keyed);

impl Message for Run {
    type Result = ();
}

impl Handler<Run> for ClosureHost {
    type Result = ();

    fn handle(&mut self, Run(events): Run, _: &mut Context<Self>) {
        for (key, event) in events {
            // Taken out while it runs: a closure that subscribes another one may grow the table.
            let taken = match self.closures.borrow_mut().slots.get_mut(key) {
                Some(Some(entry)) => entry.f.take().map(|f| (f, entry.pending.clone())),
                _ => None,
            };
            let Some((mut f, pending)) = taken else {
                continue;
            };
            call_catching(&mut f, event, &self.stats);
            pending.fetch_sub(1, Ordering::Relaxed);
            self.stats.closures_ran.fetch_add(1, Ordering::Relaxed);
            if let Some(Some(entry)) = self.closures.borrow_mut().slots.get_mut(key) {
                entry.f = Some(f);
            }
        }
    }
}

/// Drops a closure, after the events handed over before.
pub(crate) struct Remove(usize);

impl Message for Remove {
    type Result = ();
}

impl Handler<Remove> for ClosureHost {
    type Result = ();

    fn handle(&mut self, Remove(key): Remove, _: &mut Context<Self>) {
        let removed = {
            let mut closures = self.closures.borrow_mut();
            let removed = closures.slots.get_mut(key).and_then(Option::take);
            if removed.is_some() {
                closures.free.push(key);
            }
            removed
        };
        // The closure (and what it captured) is dropped with no borrow held.
        drop(removed);
    }
}

impl Handler<Flush> for ClosureHost {
    type Result = ();

    /// Everything handed over before it has run.
    fn handle(&mut self, _: Flush, _: &mut Context<Self>) {}
}

/// The registry's view of one subscribed closure.
pub(crate) struct FnSink {
    host: Addr<ClosureHost>,
    key: usize,
    pending: Arc<AtomicUsize>,
}

impl FnSink {
    /// Hands `event` over through `outbox`; gives it back when the closure has
    /// [`CLOSURE_CAPACITY`] events not yet run, or `Err(None)` when its host is gone.
    pub fn try_deliver(
        &self,
        event: ChangeEvent,
        outbox: &mut Outbox,
    ) -> Result<(), Option<ChangeEvent>> {
        if self.pending.load(Ordering::Relaxed) >= CLOSURE_CAPACITY {
            return Err(Some(event));
        }
        if !self.host.connected() {
            return Err(None);
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        outbox.push(&self.host, self.key, event);
        Ok(())
    }

    /// The host this closure runs on.
    pub fn host(&self) -> &Addr<ClosureHost> {
        &self.host
    }
}

impl Drop for FnSink {
    fn drop(&mut self) {
        self.host.do_send(Remove(self.key));
    }
}

/// Events handed to closures and not yet sent to their hosts: one run per host, sent by
/// [`flush`](Outbox::flush) (the registry calls it before anything else can reach a host).
#[derive(Default)]
pub(crate) struct Outbox {
    runs: Vec<(Addr<ClosureHost>, Keyed)>,
}

/// Events, each with its closure's key.
type Keyed = Vec<(usize, ChangeEvent)>;

impl Outbox {
    fn push(&mut self, host: &Addr<ClosureHost>, key: usize, event: ChangeEvent) {
        // Most pipelines have one host; the last one used is tried first.
        let at = match self.runs.iter().rposition(|(h, _)| h == host) {
            Some(at) => at,
            None => {
                self.runs.push((host.clone(), Vec::new()));
                self.runs.len() - 1
            }
        };
        self.runs[at].1.push((key, event));
    }

    /// Sends every host its run.
    pub fn flush(&mut self) {
        for (host, run) in self.runs.drain(..) {
            // A host that is gone takes nothing: `FnSink::try_deliver` refused its events.
            host.do_send(Run(run));
        }
    }
}

/// Where one pipeline's closures run: its host on each arbiter a closure was subscribed on.
pub(crate) struct ClosureHosts {
    /// Tells this pipeline's hosts apart from other pipelines' on the same thread.
    id: u64,
    stats: Arc<Counters>,
}

/// A host on this thread, and its table (the host holds the table; these do not keep it).
struct Hosted {
    pipeline: u64,
    host: WeakAddr<ClosureHost>,
    closures: Weak<RefCell<Closures>>,
}

thread_local! {
    static HOSTS: RefCell<Vec<Hosted>> = const { RefCell::new(Vec::new()) };
}

impl ClosureHosts {
    pub fn new(stats: Arc<Counters>) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ClosureHosts {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            stats,
        }
    }

    /// Adds `f` to this pipeline's host on the current arbiter (started if there is none) and
    /// returns the sink the registry hands its events to. Must run inside an actix system.
    pub fn add(&self, f: impl FnMut(ChangeEvent) + 'static) -> FnSink {
        let (host, closures) = HOSTS.with(|hosts| {
            let mut hosts = hosts.borrow_mut();
            hosts.retain(|h| h.closures.strong_count() > 0);
            let found = hosts.iter().find(|h| h.pipeline == self.id).and_then(|h| {
                let host = h.host.upgrade().filter(Addr::connected)?;
                Some((host, h.closures.upgrade()?))
            });
            found.unwrap_or_else(|| {
                let closures = Rc::new(RefCell::new(Closures::default()));
                let host = ClosureHost {
                    closures: closures.clone(),
                    stats: self.stats.clone(),
                }
                .start();
                hosts.retain(|h| h.pipeline != self.id);
                hosts.push(Hosted {
                    pipeline: self.id,
                    host: host.downgrade(),
                    closures: Rc::downgrade(&closures),
                });
                (host, closures)
            })
        });
        let pending = Arc::new(AtomicUsize::new(0));
        let key = closures.borrow_mut().insert(Entry {
            f: Some(Box::new(f)),
            pending: pending.clone(),
        });
        FnSink { host, key, pending }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Key, RawNotification};
    use serde_json::{json, Map};
    use std::cell::Cell;

    fn event(id: i64) -> ChangeEvent {
        let channel = crate::event::test_channel(crate::tier::Tier::Notify);
        let raw = RawNotification::new("c", "");
        ChangeEvent::new(channel, Key::Single(json!(id)), Map::new(), &raw, false)
    }

    /// A closure that records `(tag, id)` for every event, panicking on id 0.
    fn recorder(tag: u8, seen: &Rc<RefCell<Vec<(u8, i64)>>>) -> impl FnMut(ChangeEvent) + 'static {
        let seen = seen.clone();
        move |e: ChangeEvent| {
            let id = e.id().as_i64().unwrap();
            assert_ne!(id, 0, "closure fails on 0");
            seen.borrow_mut().push((tag, id));
        }
    }

    #[actix_rt::test]
    async fn closures_of_one_arbiter_share_a_host_and_run_their_events_in_order() {
        let stats = Arc::new(Counters::default());
        let hosts = ClosureHosts::new(stats.clone());
        let other = ClosureHosts::new(stats.clone());
        let seen = Rc::new(RefCell::new(Vec::new()));
        let (a, b) = (hosts.add(recorder(1, &seen)), hosts.add(recorder(2, &seen)));
        let c = other.add(recorder(3, &seen));
        assert_eq!(a.host(), b.host(), "one host per pipeline and arbiter");
        assert_ne!(a.host(), c.host(), "another pipeline has its own");

        let mut outbox = Outbox::default();
        for (sink, id) in [(&a, 1), (&b, 1), (&c, 1), (&a, 0), (&a, 2), (&b, 2)] {
            assert!(sink.try_deliver(event(id), &mut outbox).is_ok());
        }
        assert_eq!(outbox.runs.len(), 2, "one run per host");
        assert_eq!(a.pending.load(Ordering::Relaxed), 3);
        outbox.flush();
        a.host().send(Flush).await.unwrap();
        c.host().send(Flush).await.unwrap();
        let mut got = seen.borrow().clone();
        got.sort_by_key(|(tag, _)| *tag); // stable: each closure's order is kept
        assert_eq!(got, [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]);
        assert_eq!(a.pending.load(Ordering::Relaxed), 0);
        assert_eq!(stats.subscriber_panics.load(Ordering::Relaxed), 1);
    }

    #[actix_rt::test]
    async fn a_closure_with_a_full_mailbox_refuses_and_a_dropped_sink_runs_what_it_was_handed() {
        let hosts = ClosureHosts::new(Arc::new(Counters::default()));
        let ran = Rc::new(Cell::new(0));
        let dropped = Rc::new(Cell::new(false));
        struct OnDrop(Rc<Cell<bool>>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.set(true);
            }
        }
        let sink = {
            let (ran, on_drop) = (ran.clone(), OnDrop(dropped.clone()));
            hosts.add(move |_| {
                let _ = &on_drop;
                ran.set(ran.get() + 1);
            })
        };
        let host = sink.host().clone();
        let mut outbox = Outbox::default();
        for id in 0..CLOSURE_CAPACITY as i64 {
            assert!(sink.try_deliver(event(id), &mut outbox).is_ok());
        }
        assert!(
            matches!(sink.try_deliver(event(-1), &mut outbox), Err(Some(_))),
            "full"
        );
        outbox.flush();
        drop(sink);
        host.send(Flush).await.unwrap();
        assert_eq!(ran.get(), CLOSURE_CAPACITY, "everything handed over ran");
        assert!(dropped.get(), "then the closure was dropped");
        let again = hosts.add(|_| {});
        assert_eq!(again.key, 0, "its slot is free again");
    }
}
