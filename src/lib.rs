//! sqlnotify turns row changes in your database (INSERT / UPDATE / DELETE) into typed
//! [`ChangeEvent`]s delivered to actix actors within milliseconds — no polling code, no Kafka.
//!
//! It installs and manages one trigger per [`Watch`], captures the key and the columns you
//! ask for, and routes each change to the subscribers whose table, operation and
//! [`Filter`]s match. A trigger never makes your write fail: rows too large for a
//! notification go to an overflow table and the event is resolved from there.
//!
//! # The pipeline
//!
//! ```text
//!  database ──► Listener ──RawBatch──► Decoder ──Route──► Registry ──► subscribers
//!  (trigger)    one per notifier,      parses payloads,   routes by     (actors, closures,
//!               supervised, restarted  resolves overflow  channel, op,   channels)
//!               with backoff           rows, in order     filters
//! ```
//!
//! Everything after the listener is database-independent: the listener converts the driver's
//! notifications to [`RawNotification`] at the edge.
//!
//! # Example
//!
//! ```no_run
//! use actix::prelude::*;
//! use sqlnotify::{ChangeEvent, Filter, Notifier, Operation, Subscription, Watch};
//!
//! struct Mailer;
//! impl Actor for Mailer {
//!     type Context = Context<Self>;
//! }
//! impl Handler<ChangeEvent> for Mailer {
//!     type Result = ();
//!     fn handle(&mut self, event: ChangeEvent, _: &mut Context<Self>) {
//!         println!("new user {}: {:?}", event.id(), event.get("email"));
//!     }
//! }
//!
//! #[actix::main]
//! async fn main() -> sqlnotify::Result<()> {
//!     let notifier = Notifier::builder("postgres://postgres@127.0.0.1/app")
//!         .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]))
//!         .watch(Watch::new("users", Operation::Update).extra_columns(["email"]).trigger_columns(["email"]))
//!         .start()
//!         .await?;
//!
//!     notifier
//!         .subscribe(Subscription::new("users", Operation::Insert), Mailer.start().recipient())
//!         .await?;
//!     notifier
//!         .subscribe_fn(
//!             Subscription::new("users", Operation::Update).filter(Filter::eq("id", 42)),
//!             |event| println!("user 42 changed email to {:?}", event.get("email")),
//!         )
//!         .await?;
//!
//!     actix_rt::signal::ctrl_c().await.ok();
//!     notifier.stop().await
//! }
//! ```
//!
//! # Features
//!
//! | feature    | default | what it enables |
//! |------------|---------|-----------------|
//! | `postgres` | yes     | the PostgreSQL dialect (`postgres://`, `postgresql://`), via tokio-postgres |
//! | `sqlite`   | yes     | the SQLite dialect (`sqlite:///path.db`), via rusqlite with bundled SQLite |
//! | `cli`      | no      | the `sqlnotify` command-line tool (`tail`, `install-sql`, `cleanup`, `consumers`) |
//! | `bench`    | no      | `bench_support`, the pipeline without a database for the benchmarks (not a supported API) |
//! | `mysql`    | no      | the MySQL / MariaDB dialect (`mysql://`, `mariadb://`), via mysql_async (TLS with `tls`) |
//! | `nats`     | no      | `sqlnotify::relay`: a named consumer's events into NATS JetStream, exactly once, via async-nats (and `sqlnotify relay` with `cli`) |
//! | `web`      | no      | `sqlnotify::web`: a server-sent-events endpoint for actix-web, with authorization per connection and `Last-Event-ID` resume |
//!
//! # Delivery guarantees
//!
//! On PostgreSQL each watch picks a [`Tier`]: `Notify` (the row travels in the NOTIFY; at most
//! once, a [`Status::Gap`] after reconnects), `Durable` (a journal row in the writer's
//! transaction; at least once, replayed after reconnects and — for a named
//! [`consumer`](NotifierBuilder::consumer) — after restarts) or `Poll` (the journal without
//! NOTIFY). A named consumer is registered in the database: no purge deletes a journal row it
//! has not read until it is dropped ([`Notifier::drop_consumer`]) or expires, and one that
//! comes back after such a purge gets a [`Status::Gap`] ([`Notifier::consumers`] lists them
//! with their backlog). On the journal tiers [`Capture::Statement`] writes one journal row per statement
//! instead of one per row — far cheaper for writers that change many rows per statement, same
//! events. SQLite and MySQL always journal. Delivery to subscribers is bounded: each
//! subscription has a buffer and an [`OverflowPolicy`].
//!
//! # Which subscription
//!
//! An actor of yours ([`Notifier::subscribe`]) runs wherever you started it. A closure given to
//! [`Notifier::subscribe_fn`] runs on the notifier's own thread and must be quick: while it
//! runs nothing else is routed. A closure that blocks — I/O, sleeps, synchronous calls — goes
//! to [`Notifier::subscribe_blocking`], which runs it on a thread of its own and cannot stall
//! the pipeline. Blocking code that wants to pull events reads a channel
//! ([`Notifier::subscribe_channel`]).
//!
//! # Database objects
//!
//! On PostgreSQL everything sqlnotify creates is in the `sqlnotify` schema (catalog, overflow
//! table, journal, consumers, one trigger function per watch); on SQLite it is three tables
//! prefixed `sqlnotify_`. The triggers sit on the watched tables and are named after their
//! channel: `sqlnotify_{schema}_{table}_{operation}`, or
//! `sqlnotify_{label}` for a watch with a [`channel_label`](Watch::channel_label).
//! Creating or dropping a trigger locks its table: sqlnotify waits for such a lock in short
//! attempts that never hold up your writes for long, and gives up with [`Error::LockTimeout`]
//! after [`install_timeout`](NotifierBuilder::install_timeout).

//!
//! # Security
//!
//! Writers need no privilege on sqlnotify's objects (each watch's helper function writes for
//! them, after checking the caller may write to the table), and roles that were granted
//! nothing can read nothing of them. PostgreSQL lets any role that can
//! connect LISTEN and NOTIFY on any channel: notify-tier payloads are therefore signed
//! ([`sign_notifications`](NotifierBuilder::sign_notifications)) and forgeries are dropped and
//! counted; overflow references are random tokens bound to their channel. README's "Security"
//! section has the threat model per tier and the grants each role needs
//! ([`install_sql_granting`](NotifierBuilder::install_sql_granting)).
//!
//! # Metrics
//!
//! Counters and gauges (`sqlnotify_events_delivered_total{channel}`, a named consumer's
//! `sqlnotify_consumer_lag_seconds{consumer}`, handler outcomes …) go through the
//! [`metrics`](https://docs.rs/metrics) facade to whatever exporter the application installs —
//! before it starts a notifier; sqlnotify never installs one. Their names are in
//! [`sqlnotify::metrics`](crate::metrics).
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod acked;
mod backlog;
mod backoff;
#[cfg(feature = "bench")]
pub mod bench_support;
pub mod blocking;
mod builder;
mod closure_host;
mod consumer;
mod custom;
mod dead_letters;
mod decoder;
mod dialect;
mod durations;
mod error;
mod event;
mod filter;
mod handling;
mod holds;
mod instruments;
mod lifecycle;
mod listener;
mod lockwait;
pub mod metrics;
mod notifier;
mod operation;
mod overflow;
mod payload;
mod pipeline;
mod read_point;
mod read_set;
mod redact;
mod registry;
#[cfg(feature = "nats")]
pub mod relay;
mod replay;
mod resolve;
mod route_index;
mod snapshot;
mod sql;
mod stats;
mod status;
mod stream_sink;
mod subscriber;
mod subscription;
mod throttle;
mod tier;
mod watch;
#[cfg(feature = "web")]
pub mod web;

// README.md's Rust code blocks are compiled (and run, unless marked `no_run`) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;
/// Context values on SQLite, set per connection ([`Watch::context`]).
#[cfg(feature = "sqlite")]
pub use crate::sqlite::context as sqlite_context;
/// Transaction ids on SQLite, tracked per connection ([`ChangeEvent::transaction_id`]).
#[cfg(feature = "sqlite")]
pub use crate::sqlite::transactions as sqlite_transactions;

pub use crate::acked::{Deliveries, Delivery};
pub use crate::builder::NotifierBuilder;
pub use crate::consumer::{ConsumerInfo, ConsumerPosition, ConsumerState};
pub use crate::custom::CustomEvent;
pub use crate::dead_letters::{DeadLetter, DeadLetterCounts, DeadLetterState, DeadLetters};
pub use crate::dialect::CleanupReport;
pub use crate::error::{Error, Result};
pub use crate::event::{ChangeEvent, Channel, Key, RawNotification};
pub use crate::filter::Filter;
pub use crate::handling::{Attempt, HandlerError, Handling, MAX_HANDLER_NAME};
pub use crate::holds::Ack;
pub use crate::notifier::Notifier;
pub use crate::operation::Operation;
pub use crate::payload::NOTIFY_PAYLOAD_LIMIT;
#[cfg(feature = "postgres")]
pub use crate::postgres::effects::Transaction;
pub use crate::read_point::{ReadPoint, ReadSnapshots};
pub use crate::read_set::{CursorPage, ReadSet};
pub use crate::registry::{Registry, Subscribe, Unsubscribe};
pub use crate::snapshot::{Snapshot, SnapshotFeed, SnapshotProgress, DEFAULT_CHUNK_ROWS};
pub use crate::stats::{Role, Stats};
pub use crate::status::{Status, StatusEvent};
pub use crate::subscription::{
    OverflowPolicy, Subscription, SubscriptionId, DEFAULT_BUFFER, MAX_BUFFER,
};
pub use crate::tier::{Capture, Tier, STATEMENT_CHUNK_ROWS};
pub use crate::watch::{Watch, MAX_IDENTIFIER_BYTES};
