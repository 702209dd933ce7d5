//! The endpoint's own counters ([`SseStats`]): clients connected now, and what was sent to
//! them. Kept apart from the pipeline's `Stats`: a client's events are counted there as
//! delivered once they enter its stream.

use std::sync::atomic::{AtomicU64, Ordering};

/// What the endpoint has done since it was built (see `Sse::stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SseStats {
    /// Streams open now (a stream cut off for a client that no longer reads counts until its
    /// connection ends: see [`SlowClient::Disconnect`](super::SlowClient::Disconnect)).
    pub clients: u64,
    /// Streams opened since the endpoint was built.
    pub connections: u64,
    /// Connections refused (authorization, parameters, a bad subscription, shutting down).
    pub refused: u64,
    /// Change events sent (live and replayed).
    pub events: u64,
    /// Change events sent from the journal to clients that resumed.
    pub replayed: u64,
    /// `lag` events sent (a client too slow for its buffer lost events).
    pub lag_notices: u64,
    /// Events lost by slow clients.
    pub lost: u64,
    /// `reset` events sent (a client could not resume from its `Last-Event-ID`).
    pub resets: u64,
    /// Streams closed because their client was too slow (`SlowClient::Disconnect`): counted
    /// when the stream is cut off, also for a client that no longer reads at all.
    pub slow_disconnects: u64,
    /// Heartbeat comments sent.
    pub heartbeats: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub clients: AtomicU64,
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub events: AtomicU64,
    pub replayed: AtomicU64,
    pub lag_notices: AtomicU64,
    pub lost: AtomicU64,
    pub resets: AtomicU64,
    pub slow_disconnects: AtomicU64,
    pub heartbeats: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> SseStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SseStats {
            clients: get(&self.clients),
            connections: get(&self.connections),
            refused: get(&self.refused),
            events: get(&self.events),
            replayed: get(&self.replayed),
            lag_notices: get(&self.lag_notices),
            lost: get(&self.lost),
            resets: get(&self.resets),
            slow_disconnects: get(&self.slow_disconnects),
            heartbeats: get(&self.heartbeats),
        }
    }
}
