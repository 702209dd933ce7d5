//! Row changes to browsers (feature `web`): a server-sent-events endpoint for actix-web.
//!
//! Each client gets the events of the subscriptions an authorization hook grants it, as
//! server-sent events: `id:` the event's position in the journal, `event:` `table/operation`
//! (`orders/insert`), `data:` the event's JSON record ([`ChangeEvent::to_record`]). The hook
//! runs once per connection and fixes the subscriptions and their filters; query parameters
//! map to filters only through an allow-list declared on the builder and are added to the
//! grant's filters (AND), so a client can narrow its stream but never widen it.
//!
//! A client that reconnects with `Last-Event-ID` gets everything after that position from the
//! journal, then live events, without a gap or a duplicate. A client that cannot set the
//! header (a browser's `EventSource` on its first connection) may give the position as the
//! query parameter `last_event_id` instead ([`LAST_EVENT_ID_PARAM`]): a page that read the
//! table and the journal's position in one transaction opens
//! `/events?last_event_id=POSITION` and misses nothing between the two. The header, when
//! present, wins (a browser's reconnect sends the last id it got). Resuming works on SQLite and
//! on PostgreSQL's durable and poll tiers (a PostgreSQL event's id names the journal read that
//! delivered it, since its journal ids are not in commit order — see README, "Resume"). Where
//! the events after the position are no longer in the journal, or on PostgreSQL's notify tier
//! (no journal, no ids; also when a grant mixes its channels with journal ones), the client
//! gets an explicit `event: reset` instead: it should reload its state. A gap is never
//! silent: a stream that starts live first sends an `id:` alone naming where the journal
//! stood once it was subscribed (or `none` where there is no such position, which gets a
//! `reset`), so a browser that drops before its first event has an id to send back. On the logical-decoding tier
//! ([`Tier::Logical`](crate::Tier::Logical)) events have ids (their WAL positions) but there
//! is no journal to replay from — the replication slot moves past what was delivered — so a
//! client that resumes always gets a `reset` whose reason names the tier, then live events.
//!
//! A slow client is contained by its buffer and the endpoint's [`SlowClient`] policy, never by
//! memory growth or by holding up anyone else; idle streams get heartbeat comments;
//! [`Sse::shutdown`] ends every stream, so actix-web's graceful shutdown does not wait for
//! them.
//!
//! ```no_run
//! use actix_web::{App, HttpServer};
//! use sqlnotify::web::{Denied, Grant, Param, ParamType, Sse};
//! use sqlnotify::{Filter, Notifier, Operation, Subscription, Watch};
//!
//! #[actix_web::main]
//! async fn main() -> std::io::Result<()> {
//!     let notifier = Notifier::builder("sqlite:///var/lib/app/app.db")
//!         .watch(Watch::new("orders", Operation::Insert).extra_columns(["owner_id", "status"]))
//!         .start()
//!         .await
//!         .expect("notifier");
//!     let sse = Sse::builder(notifier.clone(), |req| {
//!         // Your session lookup: here a header set by an authenticating proxy.
//!         let user: i64 = req
//!             .headers()
//!             .get("x-user-id")
//!             .and_then(|v| v.to_str().ok()?.parse().ok())
//!             .ok_or_else(|| Denied::unauthorized("log in first"))?;
//!         Ok(Grant::new().subscription(
//!             Subscription::new("orders", Operation::Insert).filter(Filter::eq("owner_id", user)),
//!         ))
//!     })
//!     .param("status", Param::eq("status", ParamType::Text))
//!     .build();
//!
//!     let endpoint = sse.clone();
//!     let server = HttpServer::new(move || App::new().route("/events", endpoint.route()))
//!         .bind(("127.0.0.1", 8080))?
//!         .run();
//!     let handle = server.handle();
//!     actix_web::rt::spawn(async move {
//!         let _ = actix_web::rt::signal::ctrl_c().await;
//!         sse.shutdown(); // end the streams, so the graceful stop does not wait for them
//!         handle.stop(true).await;
//!     });
//!     server.await?;
//!     notifier.stop().await.ok();
//!     Ok(())
//! }
//! ```
//!
//! [`ChangeEvent::to_record`]: crate::ChangeEvent::to_record

mod builder;
mod frame;
mod grant;
mod params;
mod stats;
mod stream;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse};

pub use self::builder::{SlowClient, SseBuilder};
pub use self::grant::{Denied, Grant};
pub use self::params::{Param, ParamType};
pub use self::stats::SseStats;

use self::builder::Config;
pub(crate) use self::frame::Position;
use self::frame::NO_POSITION;
use self::stats::Counters;
use self::stream::{Connection, Start};
use crate::error::Error;
use crate::notifier::Notifier;
use crate::stream_sink::CutHook;
use crate::subscription::OverflowPolicy;

/// The query parameter a client may give its `Last-Event-ID` in (`/events?last_event_id=17`)
/// where it cannot set the header — a browser's `EventSource` cannot. It is used only when the
/// request has no `Last-Event-ID` header, and is never a filter parameter.
pub const LAST_EVENT_ID_PARAM: &str = "last_event_id";

/// A server-sent-events endpoint on a notifier. Cheap to clone: every clone serves the same
/// endpoint (share one between actix-web's workers).
#[derive(Clone)]
pub struct Sse {
    config: Arc<Config>,
}

impl std::fmt::Debug for Sse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sse")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Sse {
    /// An endpoint for `notifier`'s events. `authorize` runs once per connection, on the
    /// request (its headers, cookies, peer address …), and answers what the client gets — a
    /// [`Grant`] — or why it gets nothing ([`Denied`]: that status and message are the
    /// response).
    pub fn builder(
        notifier: Notifier,
        authorize: impl Fn(&HttpRequest) -> Result<Grant, Denied> + Send + Sync + 'static,
    ) -> SseBuilder {
        SseBuilder::new(notifier, builder::Authorize::Sync(Box::new(authorize)))
    }

    /// [`Sse::builder`] with a hook that awaits (a session looked up in a database, a call
    /// to an auth service). It runs once per connection, on the worker's thread, so its future
    /// need not be `Send`.
    ///
    /// ```no_run
    /// # async fn run(notifier: sqlnotify::Notifier) {
    /// use sqlnotify::web::{Denied, Grant, Sse};
    /// use sqlnotify::{Filter, Operation, Subscription};
    ///
    /// async fn user_of(session: Option<String>) -> Option<i64> {
    ///     // SELECT user_id FROM sessions WHERE token = $1 …
    /// #   session?.parse().ok()
    /// }
    ///
    /// let sse = Sse::builder_async(notifier, |req| async move {
    ///     let session = req.headers().get("x-session").and_then(|v| v.to_str().ok()).map(String::from);
    ///     let user = user_of(session).await.ok_or_else(|| Denied::unauthorized("log in first"))?;
    ///     Ok(Grant::new().subscription(
    ///         Subscription::new("orders", Operation::Insert).filter(Filter::eq("owner_id", user)),
    ///     ))
    /// })
    /// .build();
    /// # let _ = sse;
    /// # }
    /// ```
    pub fn builder_async<F, Fut>(notifier: Notifier, authorize: F) -> SseBuilder
    where
        F: Fn(HttpRequest) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Grant, Denied>> + 'static,
    {
        SseBuilder::new(
            notifier,
            builder::Authorize::Async(Box::new(move |req| Box::pin(authorize(req)))),
        )
    }

    /// A `GET` route serving the endpoint: `App::new().route("/events", sse.route())`.
    pub fn route(&self) -> actix_web::Route {
        let sse = self.clone();
        actix_web::web::get().to(move |req: HttpRequest| {
            let sse = sse.clone();
            async move { sse.respond(req).await }
        })
    }

    /// Answers one request: the event stream, or the error response (401/403 from the hook,
    /// 400 for a query parameter that is not allowed or does not fit — checked only once the
    /// hook granted something, so a refused client never sees the allow-list —, 503 after
    /// [`shutdown`](Self::shutdown)). For handlers of your own.
    pub async fn respond(&self, req: HttpRequest) -> HttpResponse {
        match self.open(&req).await {
            Ok(connection) => {
                let body = futures_util::stream::unfold(connection, |mut c| async move {
                    let chunk = c.next().await?;
                    Some((Ok::<_, std::convert::Infallible>(Bytes::from(chunk)), c))
                });
                HttpResponse::Ok()
                    .content_type("text/event-stream")
                    .insert_header((header::CACHE_CONTROL, "no-cache"))
                    // nginx: do not buffer the stream.
                    .insert_header(("X-Accel-Buffering", "no"))
                    .streaming(body)
            }
            Err(denied) => {
                Counters::add(&self.config.counters.refused, 1);
                HttpResponse::build(denied.status)
                    .content_type("text/plain; charset=utf-8")
                    .body(denied.message)
            }
        }
    }

    async fn open(&self, req: &HttpRequest) -> Result<Connection, Denied> {
        let config = &self.config;
        if *config.shutdown.borrow() {
            return Err(Denied {
                status: actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                message: "the server is shutting down".into(),
            });
        }
        // The hook first: a client it refuses learns nothing else — not the allowed parameters
        // a 400 below names.
        let grant = config.authorize.grant(req).await?;
        if grant.subscriptions.is_empty() {
            return Err(Denied::forbidden("nothing is granted to this client"));
        }
        let query = actix_web::web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .map_err(|e| Denied::bad_request(format!("query string: {e}")))?;
        // `last_event_id` is the stream's own parameter, never a filter.
        let (resume, query): (Vec<_>, Vec<_>) = query
            .into_inner()
            .into_iter()
            .partition(|(name, _)| name == LAST_EVENT_ID_PARAM);
        let narrowing = params::filters(&query, &config.params).map_err(Denied::bad_request)?;
        // The header wins: a browser sends it on reconnect, with the last id it got, while
        // the URL still carries the position the page started from.
        let last_event_id = match req.headers().get("last-event-id") {
            Some(value) => Some(value.to_str().ok()),
            None => resume.last().map(|(_, text)| Some(text.as_str())),
        };
        let start = match last_event_id {
            None => Start::Live,
            Some(Some(NO_POSITION)) => Start::NoPosition,
            Some(text) => match text.and_then(Position::parse) {
                Some(position) => Start::After(position),
                None => Start::Unknown,
            },
        };
        let policy = config.slow_client.policy();
        let mut subscriptions = Vec::with_capacity(grant.subscriptions.len());
        let mut routes = Vec::with_capacity(grant.subscriptions.len());
        // Channels whose events have no journal to replay: the logical tier's, and
        // PostgreSQL's notify tier's (the other dialects journal every channel).
        let postgres = config.notifier.dialect_name() == "postgresql";
        let mut no_journal = None;
        for mut subscription in grant.subscriptions {
            subscription.filters.extend(narrowing.iter().cloned());
            let subscription = subscription.policy(policy).buffer(config.buffer);
            let channel = config
                .notifier
                .channel_set()
                .find(
                    subscription.schema.as_deref(),
                    &subscription.table,
                    subscription.operation,
                    subscription.label.as_deref(),
                )
                .map_err(refused)?;
            match channel.tier() {
                crate::Tier::Logical => no_journal = Some(crate::Tier::Logical),
                crate::Tier::Notify if postgres => {
                    no_journal = no_journal.or(Some(crate::Tier::Notify))
                }
                _ => {}
            }
            routes.push((channel.name().to_string(), subscription.filters.clone()));
            subscriptions.push(subscription);
        }
        // `Disconnect` is the registry's to enforce: a client that stops reading is not polled
        // any more (actix-web polls a body only while it can write), so its stream could not
        // notice that it fell behind, and its waiting events would keep their in-flight budget.
        let on_cut = (config.slow_client == SlowClient::Disconnect).then(|| {
            let counters = config.counters.clone();
            Box::new(move |lost| {
                Counters::add(&counters.slow_disconnects, 1);
                Counters::add(&counters.lost, lost);
                log::debug!(
                    "sqlnotify: closing the event stream of a client too slow for its buffer \
                     ({lost} events lost)"
                );
            }) as CutHook
        });
        // Dropped with this future or its connection, it removes the subscriptions again.
        let stream = config
            .notifier
            .subscribe_stream(
                subscriptions,
                config.channel,
                policy != OverflowPolicy::KeepLatestPerKey,
                on_cut,
            )
            .await
            .map_err(refused)?;
        // A stream with a channel that has no journal cannot resume: a client that comes
        // back starts over (a resume of the journal's channels alone would skip the others'
        // events silently).
        let start = match (start, no_journal) {
            (Start::Live, _) => Start::Live,
            (_, Some(tier)) => Start::NoJournal(tier),
            (start, None) => start,
        };
        // Where the journal stands now that the subscriptions are made: the first `id:` of a
        // stream that starts live, and the `id:` of a `reset`, so that a client that drops
        // before its next event resumes from here.
        let head = match no_journal {
            Some(_) => None,
            None => match config.notifier.dialect().replay_head().await {
                Ok(head) => head,
                Err(e) => {
                    log::warn!(
                        "sqlnotify: an event stream starts without a position to resume from \
                         (a reconnect before its first event gets a reset): {e}"
                    );
                    None
                }
            },
        };
        let head = head.map_or_else(
            || NO_POSITION.to_string(),
            |h| Position::head(h).to_string(),
        );
        Ok(Connection::new(config.clone(), stream, routes, start, head))
    }

    /// The endpoint's counters: clients connected now, events, lag notices, resets, heartbeats.
    pub fn stats(&self) -> SseStats {
        self.config.counters.snapshot()
    }

    /// Ends every open stream (at once, after the chunk each is sending) and refuses new ones
    /// with 503. Call it before stopping actix-web's server gracefully, which otherwise waits
    /// for open streams until its shutdown timeout. A browser reconnects on its own and, once
    /// a server is back, resumes with its `Last-Event-ID`. Streams also end when the notifier
    /// stops.
    pub fn shutdown(&self) {
        self.config.shutdown.send_replace(true);
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shut_down(&self) -> bool {
        *self.config.shutdown.borrow()
    }

    /// Clients connected now.
    pub fn clients(&self) -> u64 {
        self.config.counters.clients.load(Ordering::Relaxed)
    }
}

/// A granted subscription the notifier refused: the client's filter names a column the watch
/// does not carry (400), or the grant names what is not watched (a server error, 500).
fn refused(e: Error) -> Denied {
    match e {
        Error::UnknownFilterColumn { .. } => Denied::bad_request(e.to_string()),
        e => {
            log::error!("sqlnotify: an event stream's grant cannot be subscribed: {e}");
            Denied {
                status: actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
                message: "this stream cannot be served".into(),
            }
        }
    }
}
