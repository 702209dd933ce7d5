//! Per-key order with several keys in flight: which event a handler may run next.
//!
//! Events arrive in commit order. Those of one key (table + key value) run one at a time, in
//! that order, also across retries: a key whose head event failed waits for its retry and
//! holds back only its own later events. At most `limit` handler calls run at once; keys wait
//! for a slot in the order they became ready, and a key coming back from a retry goes first.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::event::ChangeEvent;

/// A key's identity: a hash of schema, table and key values. Two keys that collide are only
/// serialised together; order within each is kept.
pub(crate) type KeyId = u64;

/// The identity of `event`'s key.
pub(crate) fn key_of(event: &ChangeEvent) -> KeyId {
    let mut hasher = DefaultHasher::new();
    event.schema().hash(&mut hasher);
    event.table().hash(&mut hasher);
    for value in event.id().values() {
        // serde_json's Value has no Hash: its text is the value's identity.
        value.to_string().hash(&mut hasher);
    }
    hasher.finish()
}

/// Events waiting per key, and which keys may run.
#[derive(Debug)]
pub(crate) struct KeyQueues<T> {
    /// Each key's events not running yet, in commit order.
    queues: HashMap<KeyId, VecDeque<T>>,
    /// Keys whose head event is running or waiting for its retry.
    busy: std::collections::HashSet<KeyId>,
    /// Keys with events, not busy, waiting for a slot (oldest first).
    ready: VecDeque<KeyId>,
    /// Handler calls running.
    running: usize,
    /// Most handler calls at once.
    limit: usize,
    /// Events held (waiting, running, or waiting for a retry).
    len: usize,
}

impl<T> KeyQueues<T> {
    /// Empty, with at most `limit` (at least 1) calls at once.
    pub fn new(limit: usize) -> Self {
        KeyQueues {
            queues: HashMap::new(),
            busy: Default::default(),
            ready: VecDeque::new(),
            running: 0,
            limit: limit.max(1),
            len: 0,
        }
    }

    /// Events held: waiting, running, or waiting for a retry.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Handler calls running.
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.running
    }

    /// A new event of `key`, after every event of `key` pushed before.
    pub fn push(&mut self, key: KeyId, item: T) {
        let queue = self.queues.entry(key).or_default();
        if queue.is_empty() && !self.busy.contains(&key) {
            self.ready.push_back(key);
        }
        queue.push_back(item);
        self.len += 1;
    }

    /// The next event to run, if a slot is free and a key is ready; its key is busy until
    /// [`done`](Self::done) or [`retry_later`](Self::retry_later).
    pub fn next(&mut self) -> Option<(KeyId, T)> {
        if self.running >= self.limit {
            return None;
        }
        let key = self.ready.pop_front()?;
        let queue = self.queues.get_mut(&key).expect("a ready key has a queue");
        let item = queue.pop_front().expect("a ready key has an event");
        self.busy.insert(key);
        self.running += 1;
        Some((key, item))
    }

    /// `key`'s running event is finished (handled, or dead-lettered, or given up): its next
    /// event may run.
    pub fn done(&mut self, key: KeyId) {
        self.running -= 1;
        self.len -= 1;
        self.busy.remove(&key);
        match self.queues.get(&key) {
            Some(queue) if !queue.is_empty() => self.ready.push_back(key),
            _ => {
                self.queues.remove(&key);
            }
        }
    }

    /// `key`'s running event failed and waits for its retry: its slot is free, the key stays
    /// busy.
    pub fn retry_later(&mut self, _key: KeyId) {
        self.running -= 1;
    }

    /// `key`'s event is due again: it is the key's head, and the key goes first for a slot.
    pub fn retry_now(&mut self, key: KeyId, item: T) {
        self.busy.remove(&key);
        self.queues.entry(key).or_default().push_front(item);
        self.ready.push_front(key);
    }

    /// Takes every event that waits for its key or a slot (not those running or waiting for
    /// a retry, held elsewhere): the handler lets them go. The running calls still count, and
    /// may end with [`done`](Self::done) or [`retry_later`](Self::retry_later) as before.
    pub fn take_waiting(&mut self) -> Vec<T> {
        self.ready.clear();
        let waiting: Vec<T> = self.queues.drain().flat_map(|(_, q)| q).collect();
        self.len -= waiting.len();
        waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain<T>(q: &mut KeyQueues<T>) -> Vec<(KeyId, T)> {
        std::iter::from_fn(|| q.next()).collect()
    }

    #[test]
    fn taking_the_waiting_events_leaves_the_running_ones_counted() {
        let mut q = KeyQueues::new(1);
        q.push(1, "1a");
        q.push(1, "1b");
        q.push(2, "2a");
        assert_eq!(q.next(), Some((1, "1a")));
        let mut waiting = q.take_waiting();
        waiting.sort_unstable();
        assert_eq!(waiting, ["1b", "2a"]);
        assert_eq!((q.len(), q.running()), (1, 1), "1a still runs");
        assert_eq!(q.next(), None, "nothing left to start");
        q.retry_later(1);
        q.push(3, "3a");
        assert_eq!(q.next(), Some((3, "3a")), "a slot is free again");
        q.done(3);
        assert!(q.take_waiting().is_empty());
        q.retry_now(1, "1a");
        assert_eq!(q.take_waiting(), ["1a"]);
        assert!(q.is_empty());
    }

    #[test]
    fn one_event_per_key_at_a_time_in_order() {
        let mut q = KeyQueues::new(10);
        q.push(1, "1a");
        q.push(1, "1b");
        q.push(2, "2a");
        assert_eq!(drain(&mut q), vec![(1, "1a"), (2, "2a")]);
        q.done(1);
        assert_eq!(drain(&mut q), vec![(1, "1b")]);
        q.done(2);
        q.done(1);
        assert!(q.is_empty());
        assert_eq!(q.next(), None);
    }

    #[test]
    fn at_most_limit_calls_run() {
        let mut q = KeyQueues::new(2);
        for k in 0..5 {
            q.push(k, k);
        }
        assert_eq!(drain(&mut q), vec![(0, 0), (1, 1)]);
        assert_eq!(q.running(), 2);
        q.done(0);
        assert_eq!(drain(&mut q), vec![(2, 2)]);
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn a_key_waiting_for_a_retry_holds_back_only_its_own_events() {
        let mut q = KeyQueues::new(1);
        q.push(1, "1a");
        q.push(1, "1b");
        q.push(2, "2a");
        assert_eq!(drain(&mut q), vec![(1, "1a")]);
        q.retry_later(1);
        // The slot is free: key 2 runs, key 1's next event does not.
        assert_eq!(drain(&mut q), vec![(2, "2a")]);
        q.done(2);
        assert_eq!(drain(&mut q), vec![]);
        q.retry_now(1, "1a");
        assert_eq!(drain(&mut q), vec![(1, "1a")]);
        q.done(1);
        assert_eq!(drain(&mut q), vec![(1, "1b")]);
        q.done(1);
        assert!(q.is_empty());
    }

    #[test]
    fn a_retried_key_goes_first() {
        let mut q = KeyQueues::new(1);
        q.push(1, "1a");
        assert_eq!(drain(&mut q), vec![(1, "1a")]);
        q.retry_later(1);
        q.push(2, "2a");
        q.push(3, "3a");
        q.retry_now(1, "1a");
        assert_eq!(drain(&mut q), vec![(1, "1a")]);
    }

    #[test]
    fn events_pushed_while_a_key_runs_wait_for_it() {
        let mut q = KeyQueues::new(4);
        q.push(7, 1);
        assert_eq!(drain(&mut q), vec![(7, 1)]);
        q.push(7, 2);
        assert_eq!(drain(&mut q), vec![], "key 7 is busy");
        q.done(7);
        assert_eq!(drain(&mut q), vec![(7, 2)]);
    }
}
