//! [`SseBuilder`]: the endpoint's settings — the authorization hook, the allow-list of query
//! parameters, heartbeats, the reconnect delay and what happens to a slow client
//! ([`SlowClient`]) — validated into the shared configuration of an `Sse`.

use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpRequest;
use futures_util::future::LocalBoxFuture;
use tokio::sync::watch;

use super::grant::{Denied, Grant};
use super::params::Param;
use super::stats::Counters;
use super::Sse;
use crate::durations::capped;
use crate::notifier::Notifier;
use crate::subscription::OverflowPolicy;

/// What happens to a client that reads its stream slower than events arrive, once its buffer
/// is full. A slow client never holds up the notifier or the other clients, and never makes
/// the server's memory grow: each client has a bounded buffer.
///
/// That holds for a client that stops reading altogether, too — one actix-web no longer polls,
/// since it polls a response only while it can write to it. The notifier sees to it: while
/// its listener waits for in-flight budget
/// ([`max_in_flight`](crate::NotifierBuilder::max_in_flight)), every client that has had
/// events waiting for a second without taking one (nor asking for anything: a client reading its
/// replay or its other events keeps them) gives them back — disconnected under
/// `Disconnect`, its waiting events dropped (and reported as `lag`) under the others. So a
/// client that stopped reading pauses the notifier for about a second at most, and only once
/// such clients hold the whole budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowClient {
    /// Close its stream. A browser reconnects with `Last-Event-ID` and, where the dialect can
    /// resume (SQLite, PostgreSQL's journal tiers), gets what it missed from the journal: no
    /// gap, no duplicate. Where it
    /// cannot, it gets a `reset` event. The default.
    ///
    /// Once the client takes events live (after its replay, if it resumes), it is cut off the
    /// moment its buffer is full, whether or not it still reads: what waited for it is
    /// dropped at once, and it counts in [`SseStats::slow_disconnects`]. A client that no
    /// longer reads has its connection end when actix-web next writes to it — when the
    /// client reads again, or goes away.
    ///
    /// [`SseStats::slow_disconnects`]: super::SseStats::slow_disconnects
    #[default]
    Disconnect,
    /// Drop its oldest waiting events; it gets an `event: lag` (`data: {"dropped": n}`)
    /// before the events that follow the loss.
    DropOldest,
    /// Keep only the newest waiting event per row (then drop the oldest if still full): for
    /// clients that show the latest state. Replaced events are reported as `lag`; events of
    /// different rows may arrive out of commit order once the client fell behind.
    ///
    /// Event ids stay in order as the client sees them: an event that overtakes an older one
    /// still waiting is sent without an `id:`, so the client keeps the id of the last event
    /// it had everything up to. A client that reconnects with it gets the events after it
    /// from the journal — the ones that came without an id again (duplicates, never a gap);
    /// what was replaced was reported as `lag` and is not sent again if it lies before the id.
    KeepLatestPerKey,
}

impl SlowClient {
    pub(crate) fn policy(self) -> OverflowPolicy {
        match self {
            SlowClient::Disconnect | SlowClient::DropOldest => OverflowPolicy::DropOldest,
            SlowClient::KeepLatestPerKey => OverflowPolicy::KeepLatestPerKey,
        }
    }
}

/// `Sse::builder`'s hook.
type SyncHook = dyn Fn(&HttpRequest) -> Result<Grant, Denied> + Send + Sync;
/// `Sse::builder_async`'s hook (a session looked up in a database, say).
type AsyncHook =
    dyn Fn(HttpRequest) -> LocalBoxFuture<'static, Result<Grant, Denied>> + Send + Sync;

/// The authorization hook: runs once per connection, before anything is subscribed.
pub(crate) enum Authorize {
    Sync(Box<SyncHook>),
    Async(Box<AsyncHook>),
}

impl Authorize {
    pub async fn grant(&self, req: &HttpRequest) -> Result<Grant, Denied> {
        match self {
            Authorize::Sync(f) => f(req),
            Authorize::Async(f) => f(req.clone()).await,
        }
    }
}

/// What every connection of one endpoint shares.
pub(crate) struct Config {
    pub notifier: Notifier,
    pub authorize: Authorize,
    pub params: Vec<(String, Param)>,
    pub heartbeat: Duration,
    pub retry: Duration,
    pub slow_client: SlowClient,
    pub buffer: usize,
    pub channel: usize,
    pub replay_page: i64,
    /// Shared with the hook that counts a stream the registry cuts off (`Sse::open`).
    pub counters: Arc<Counters>,
    pub shutdown: watch::Sender<bool>,
}

/// Builds an [`Sse`] endpoint; made by [`Sse::builder`].
pub struct SseBuilder {
    notifier: Notifier,
    authorize: Authorize,
    params: Vec<(String, Param)>,
    heartbeat: Duration,
    retry: Duration,
    slow_client: SlowClient,
    buffer: usize,
    replay_page: usize,
}

impl std::fmt::Debug for SseBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseBuilder")
            .field("params", &self.params)
            .field("heartbeat", &self.heartbeat)
            .field("retry", &self.retry)
            .field("slow_client", &self.slow_client)
            .field("buffer", &self.buffer)
            .field("replay_page", &self.replay_page)
            .finish_non_exhaustive()
    }
}

impl SseBuilder {
    pub(crate) fn new(notifier: Notifier, authorize: Authorize) -> Self {
        SseBuilder {
            notifier,
            authorize,
            params: Vec::new(),
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(3),
            slow_client: SlowClient::default(),
            buffer: 256,
            replay_page: 500,
        }
    }

    /// Allows the query parameter `name`: its value becomes `param`'s filter, added to every
    /// granted subscription (AND), so it can only narrow the grant. A request with a
    /// parameter that is not allowed, or a value that does not parse, is refused with 400;
    /// so is one whose filter names a column a granted subscription's watch does not carry.
    /// Parameters are checked after the authorization hook: a client it refuses gets only
    /// the hook's answer. Default: none allowed. `last_event_id` is the stream's own parameter (the
    /// `Last-Event-ID` of a client that cannot set the header) and is never a filter.
    pub fn param(mut self, name: impl Into<String>, param: Param) -> Self {
        let name = name.into();
        self.params.retain(|(n, _)| *n != name);
        self.params.push((name, param));
        self
    }

    /// How often an idle stream gets a comment line, so proxies do not close it (and a client
    /// that went away is noticed). Default: 15 s; at least 10 ms.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = capped(every).max(Duration::from_millis(10));
        self
    }

    /// The `retry:` sent at the start of each stream: how long a browser waits before it
    /// reconnects. Default: 3 s.
    pub fn retry(mut self, after: Duration) -> Self {
        self.retry = capped(after);
        self
    }

    /// What happens to a client that cannot keep up. Default: [`SlowClient::Disconnect`].
    pub fn slow_client(mut self, slow_client: SlowClient) -> Self {
        self.slow_client = slow_client;
        self
    }

    /// How many events may wait for one client, per granted subscription, before
    /// [`slow_client`](Self::slow_client) applies. Default: 256; from 1 to
    /// [`MAX_BUFFER`](crate::MAX_BUFFER).
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events.clamp(1, crate::MAX_BUFFER);
        self
    }

    /// How many journal rows a client that resumes (`Last-Event-ID`) has read per query,
    /// every channel's rows counted (the client is sent only its own): larger pages mean
    /// fewer queries, smaller ones less memory per resuming client. Default: 500; from 1 to
    /// [`MAX_BUFFER`](crate::MAX_BUFFER).
    pub fn replay_page(mut self, rows: usize) -> Self {
        self.replay_page = rows.clamp(1, crate::MAX_BUFFER);
        self
    }

    /// The endpoint.
    pub fn build(self) -> Sse {
        let (shutdown, _) = watch::channel(false);
        Sse {
            config: Arc::new(Config {
                notifier: self.notifier,
                authorize: self.authorize,
                params: self.params,
                heartbeat: self.heartbeat,
                retry: self.retry,
                slow_client: self.slow_client,
                buffer: self.buffer,
                channel: 16,
                replay_page: self.replay_page as i64,
                counters: Arc::default(),
                shutdown,
            }),
        }
    }
}
