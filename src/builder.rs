//! [`NotifierBuilder`]: the URL, the watches and every option of a notifier, and `start()`.
//!
//! `start()` does everything that can fail before anything runs: it checks the watches,
//! validates them against the live schema (and the subscriptions registered on the builder
//! against their channels), installs (or verifies) the triggers in one
//! transaction, then starts the pipeline and the listener, and returns once the listener is
//! LISTENing — so a row committed after `start()` returns is delivered. The builder also
//! serves the calls that need no running notifier (`install_sql`, `cleanup`, `consumers`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::Semaphore;

use crate::backlog::watch_backlog;
use crate::consumer::{ConsumerInfo, ConsumerParams, MIN_EXPIRY};
use crate::dead_letters::DeadLetters;
use crate::decoder::Retention;
use crate::dialect::open::open_dialect;
use crate::dialect::{CleanupReport, Dialect, DialectOptions, InstallOptions};
use crate::durations::capped;
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Channels};
use crate::listener::ListenParams;
use crate::notifier::{Notifier, Started};
use crate::pipeline::{
    Pipeline, PipelineOptions, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_IN_FLIGHT_BYTES, MIN_IN_FLIGHT,
    MIN_IN_FLIGHT_BYTES,
};
use crate::registry::{StatusSink, Subscribe, SubscribeStatus};
use crate::resolve::{resolve, ResolvedWatch};
use crate::status::StatusEvent;
use crate::subscription::Subscription;
use crate::watch::{check_set, Watch};

/// Configures and starts a [`Notifier`]. Made by [`Notifier::builder`].
///
/// ```no_run
/// use sqlnotify::{Notifier, Operation, Watch};
///
/// # async fn run() -> sqlnotify::Result<()> {
/// let notifier = Notifier::builder("postgres://app@127.0.0.1/app")
///     .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]))
///     .start()
///     .await?;
/// # notifier.stop().await }
/// ```
#[derive(Clone)]
pub struct NotifierBuilder {
    url: String,
    watches: Vec<Watch>,
    consumer: Option<String>,
    subscriptions: Vec<(Subscription, Recipient<ChangeEvent>)>,
    revoke_on_model_change: bool,
    cleanup_on_start: bool,
    cleanup_on_stop: bool,
    cleanup_installed_on_stop: bool,
    manage_triggers: bool,
    pipeline: PipelineOptions,
    health_check: Duration,
    gap_timeout: Option<Duration>,
    mysql_transaction_ids: bool,
    sign_notifications: bool,
    install_timeout: Duration,
    consumer_expiry: Option<Duration>,
    backlog_warning: u64,
    status_subscribers: Vec<Recipient<StatusEvent>>,
}

impl std::fmt::Debug for NotifierBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifierBuilder")
            .field("url", &crate::redact::redact(&self.url))
            .field("watches", &self.watches)
            .field("consumer", &self.consumer)
            .field("subscriptions", &self.subscriptions.len())
            .field("revoke_on_model_change", &self.revoke_on_model_change)
            .field("cleanup_on_start", &self.cleanup_on_start)
            .field("cleanup_on_stop", &self.cleanup_on_stop)
            .field("cleanup_installed_on_stop", &self.cleanup_installed_on_stop)
            .field("manage_triggers", &self.manage_triggers)
            .field("gap_timeout", &self.gap_timeout)
            .field("mysql_transaction_ids", &self.mysql_transaction_ids)
            .field("sign_notifications", &self.sign_notifications)
            .field("install_timeout", &self.install_timeout)
            .field("lag_report_interval", &self.pipeline.lag_interval)
            .finish()
    }
}

impl NotifierBuilder {
    /// A builder for `url` with every option at its default.
    pub(crate) fn new(url: String) -> Self {
        NotifierBuilder {
            url,
            watches: Vec::new(),
            consumer: None,
            subscriptions: Vec::new(),
            revoke_on_model_change: true,
            cleanup_on_start: false,
            cleanup_on_stop: false,
            cleanup_installed_on_stop: false,
            manage_triggers: true,
            pipeline: PipelineOptions {
                max_in_flight: DEFAULT_MAX_IN_FLIGHT,
                max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
                lag_interval: crate::registry::LAG_INTERVAL,
                retention: Retention {
                    keep: Duration::from_secs(3600),
                    every: Duration::from_secs(60),
                },
            },
            health_check: Duration::from_secs(10),
            gap_timeout: None,
            mysql_transaction_ids: false,
            sign_notifications: true,
            install_timeout: crate::lockwait::DEFAULT_INSTALL_TIMEOUT,
            consumer_expiry: None,
            backlog_warning: DEFAULT_BACKLOG_WARNING,
            status_subscribers: Vec::new(),
        }
    }

    /// Adds a watch.
    pub fn watch(mut self, watch: Watch) -> Self {
        self.watches.push(watch);
        self
    }

    /// When an installed trigger's definition differs from its watch (columns, key, options,
    /// or a new sqlnotify version), drop and recreate it. When false, `start()` fails with
    /// [`Error::DefinitionDrift`] instead. Unchanged triggers are never touched. Default: true.
    pub fn revoke_on_model_change(mut self, yes: bool) -> Self {
        self.revoke_on_model_change = yes;
        self
    }

    /// Before installing, remove every sqlnotify trigger in the database — including those of
    /// watches no longer in the code, and those of other applications using sqlnotify on the
    /// same database. Default: false.
    pub fn cleanup_on_start(mut self, yes: bool) -> Self {
        self.cleanup_on_start = yes;
        self
    }

    /// On [`Notifier::stop`], remove this notifier's triggers. Default: false (triggers stay
    /// installed; the next start finds them unchanged and does nothing).
    ///
    /// [`Tier::Logical`](crate::Tier::Logical) installs no trigger. A notifier without a named
    /// consumer drops its throwaway replication slot and publication at every stop, whatever
    /// this says. A [named consumer](Self::consumer)'s slot and publication are kept, also
    /// with `cleanup_on_stop(true)`: the slot is the consumer's position, and keeping the WAL
    /// after it is how the consumer resumes after a restart without missing the changes
    /// committed meanwhile — dropping it on stop would make every restart a silent gap. Drop
    /// a consumer that will not come back on purpose, with
    /// [`Notifier::drop_consumer`] (or `sqlnotify consumers drop`, or
    /// [`cleanup`](Self::cleanup), which drops every sqlnotify slot): until then its slot
    /// keeps WAL on the server.
    pub fn cleanup_on_stop(mut self, yes: bool) -> Self {
        self.cleanup_on_stop = yes;
        self
    }

    /// On [`Notifier::stop`], remove the triggers this notifier's `start()` created or
    /// replaced ([`Notifier::installed_channels`]), and only those: a watch `start()` found
    /// installed as generated — by another notifier on the same database, which may still be
    /// reading it, or by an earlier run — is left alone. For a notifier that visits a database
    /// other applications watch (`sqlnotify tail --cleanup-on-exit`); combine it with
    /// [`revoke_on_model_change(false)`](Self::revoke_on_model_change) so that `start()` never
    /// replaces someone else's trigger either. [`cleanup_on_stop(true)`](Self::cleanup_on_stop)
    /// removes every trigger of this notifier's, whoever installed it, and wins over this.
    /// Default: false.
    pub fn cleanup_installed_on_stop(mut self, yes: bool) -> Self {
        self.cleanup_installed_on_stop = yes;
        self
    }

    /// Whether `start()` creates and replaces database objects. Set it to false when you apply
    /// [`install_sql`](Self::install_sql) through your own migrations: `start()` then only
    /// verifies that every watch is installed as generated ([`Error::DefinitionDrift`] if not).
    /// Default: true.
    pub fn manage_triggers(mut self, yes: bool) -> Self {
        self.manage_triggers = yes;
        self
    }

    /// How long delivered data is kept in the database: overflow rows (PostgreSQL), so every
    /// listening process can resolve them, and journal rows (journal tiers, SQLite, MySQL), so
    /// every listener can read them. Older rows are deleted in small batches — except journal
    /// rows a registered [`consumer`](Self::consumer) reading their channel has not read yet,
    /// whoever runs the purge and whatever its retention, however long ago that consumer was
    /// last seen (unless it set a [`consumer_expiry`](Self::consumer_expiry)). On PostgreSQL a
    /// journal row counts from its transaction's start, and is deleted once it and every row
    /// written before it are older (so a long transaction's rows may stay a little longer,
    /// never shorter). Default: 1 hour.
    pub fn retention(mut self, keep: Duration) -> Self {
        self.pipeline.retention.keep = capped(keep);
        self
    }

    /// How often expired rows are deleted. Default: every minute.
    pub fn purge_interval(mut self, every: Duration) -> Self {
        self.pipeline.retention.every = capped(every).max(Duration::from_millis(10));
        self
    }

    /// Names this notifier as a durable consumer (journal tiers on PostgreSQL, SQLite, MySQL).
    /// Its read position is saved in the database, so a restarted process resumes where the
    /// previous one stopped instead of starting from "now". Delivery is then at least once: events
    /// routed but not yet saved when a process dies are delivered again.
    ///
    /// A named consumer replays nothing until its first subscription exists; register the
    /// subscriptions with [`subscribe`](Self::subscribe) on the builder so every one of them
    /// sees the replay. Default: none (start from the events committed after `start()`).
    ///
    /// `start()` registers the consumer in the database (a new one at "now"), with the
    /// channels it reads: from then on no purge deletes a row of those channels it has not
    /// read, however long it stays stopped, until it is dropped
    /// ([`Notifier::drop_consumer`], `sqlnotify consumers drop`) or expires
    /// ([`consumer_expiry`](Self::consumer_expiry)). A consumer that comes back after rows it
    /// had not read were purged resumes with what is left and first gets a
    /// [`Status::Gap`](crate::Status::Gap) naming the channels (subscribe to status on the
    /// builder with [`subscribe_status`](Self::subscribe_status) to see it). An empty name, or
    /// one with a control character (a line break …), is refused by `start()`
    /// ([`Error::InvalidOption`]).
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// The named consumer, if one is set.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) fn consumer_name(&self) -> Option<&str> {
        self.consumer.as_deref()
    }

    /// How many subscriptions are registered on the builder.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    /// Registers a subscription before the listener starts, so it receives everything from
    /// the first event on (including a named consumer's replay).
    pub fn subscribe(
        mut self,
        subscription: Subscription,
        recipient: Recipient<ChangeEvent>,
    ) -> Self {
        self.subscriptions.push((subscription, recipient));
        self
    }

    /// The pipeline's in-flight budget: how many events may be on their way (read but not yet
    /// handed to every subscriber) at once. When it is used up — a subscriber with the
    /// [`Wait`](crate::OverflowPolicy::Wait) policy is behind — the listener stops reading
    /// until there is room, so memory stays bounded. Default: 4,096 (larger budgets measured
    /// slower: more memory in flight, more allocator work, no extra throughput).
    pub fn max_in_flight(mut self, events: usize) -> Self {
        self.pipeline.max_in_flight = events.clamp(MIN_IN_FLIGHT, Semaphore::MAX_PERMITS);
        self
    }

    /// The pipeline's in-flight budget in payload bytes: how much payload the events on their
    /// way may hold at once, about. Each event takes one unit of the
    /// [`max_in_flight`](Self::max_in_flight) budget, and one more per whole
    /// `max_in_flight_bytes / max_in_flight` bytes its payload holds (a journal row's or
    /// overflow row's JSON, a MySQL payload, a logical-decoding message), so a budget full of
    /// large payloads holds about this many bytes, and the listener stops reading until there
    /// is room. One event counts for at most 1,024 units (a quarter of the default budget),
    /// whatever its size. Decoded events take more memory than their payload text (about two
    /// to four times, for JSON values). Default: 256 MiB (with the default event budget, one
    /// more unit per 64 KiB: NOTIFY payloads, at most 8,000 bytes, weigh one unit). At least
    /// 1 MiB.
    pub fn max_in_flight_bytes(mut self, bytes: usize) -> Self {
        self.pipeline.max_in_flight_bytes = bytes.max(MIN_IN_FLIGHT_BYTES);
        self
    }

    /// How often the listener checks that its connection is alive (a query that must answer
    /// within this interval; TCP keepalive is also set to it unless the URL sets its own).
    /// A connection that fails the check is dropped and re-established. Default: 10 s.
    pub fn health_check_interval(mut self, every: Duration) -> Self {
        self.health_check = capped(every).max(Duration::from_millis(100));
        self
    }

    /// MySQL / MariaDB: how long a missing journal id is waited for before the listener checks
    /// whether it was rolled back. Journal ids are taken when a trigger runs, not when its
    /// transaction commits, so a missing id is either a transaction still running — its events
    /// arrive, late, when it commits — or a rolled-back insert that never fills. After this
    /// time the listener looks for the id's row, uncommitted rows included: none means a
    /// rolled-back insert, and the listener moves past it; a row means a transaction still
    /// running, which is waited for (and checked again after the same time) until it commits
    /// or rolls back. A named consumer's saved position never passes an id still waited for.
    ///
    /// Default: 10 s, or the URL parameter `sqlnotify_gap_timeout_ms`; this setting wins over
    /// the URL parameter. Zero is refused by `start()` with [`Error::InvalidOption`]. The other
    /// dialects have no such gaps (PostgreSQL fences its journal with transaction snapshots,
    /// SQLite commits one writer at a time) and ignore it, so one configuration can serve
    /// every database.
    pub fn gap_timeout(mut self, wait: Duration) -> Self {
        self.gap_timeout = Some(capped(wait));
        self
    }

    /// MariaDB: record each journal row's transaction, so that events carry
    /// [`transaction_id`](crate::ChangeEvent::transaction_id) and
    /// [`last_in_transaction`](crate::ChangeEvent::last_in_transaction), and arrive
    /// transaction by transaction in commit order. A trigger cannot learn its transaction on
    /// MySQL or MariaDB; MariaDB's server can stamp it: `start()` makes the journal
    /// transaction-precise system-versioned (`GENERATED ALWAYS AS ROW START`), once, for every
    /// notifier of the database. What it costs and how the journal and MariaDB's
    /// `mysql.transaction_registry` are trimmed: README, "Transactions".
    ///
    /// Default: false (events say `None`), unless the journal already records them — then
    /// every listener reads them. Oracle MySQL has no such stamp: `start()` fails with
    /// [`Error::Unsupported`]. The other dialects ignore it (PostgreSQL always records
    /// transactions; SQLite per writing connection, see
    /// `sqlnotify::sqlite_transactions`).
    pub fn mysql_transaction_ids(mut self, yes: bool) -> Self {
        self.mysql_transaction_ids = yes;
        self
    }

    /// PostgreSQL's notify tier: sign every payload (HMAC-SHA256 over channel and payload,
    /// computed by the trigger with a key only sqlnotify's owner can read) and drop — counting
    /// them in [`Stats::forged`](crate::Stats::forged) — notifications that do not verify. Any role that can connect
    /// can NOTIFY on any channel; with signing, what it sends on ours never reaches a
    /// subscriber. The journal tiers, SQLite and MySQL need no signature: their events are
    /// rows only privileged roles can write. Costs the writer one HMAC per row (README,
    /// "Security", has the numbers). Default: true.
    pub fn sign_notifications(mut self, yes: bool) -> Self {
        self.sign_notifications = yes;
        self
    }

    /// How long installing, replacing or removing triggers (in `start()`, in `stop()` with
    /// [`cleanup_on_stop`](Self::cleanup_on_stop), in [`cleanup`](Self::cleanup)) keeps trying
    /// when another session holds a lock it needs — an open transaction that wrote to a
    /// watched table, or another instance installing. Then it fails with
    /// [`Error::LockTimeout`], which names the table and the holding session's pid. On the
    /// logical tier it also bounds how long `start()` waits for another process making the
    /// consumer's slot and publication (one that froze while it held their lock); that error
    /// names the slot and its consumer.
    ///
    /// Meanwhile your application is not held up: sqlnotify never waits for a lock for longer
    /// than one short attempt (200 ms on PostgreSQL and SQLite, MySQL's minimum of 1 s), then
    /// rolls that attempt back — releasing every lock it took — and retries after a backoff,
    /// logging (at `warn`) which table it waits for and who holds it. So a write that arrives
    /// while sqlnotify waits is delayed by at most one attempt instead of queueing behind it.
    ///
    /// Default: 30 s. Zero is refused with [`Error::InvalidOption`].
    pub fn install_timeout(mut self, wait: Duration) -> Self {
        self.install_timeout = capped(wait);
        self
    }

    /// The dialect the URL selects, with this builder's settings; connects to nothing yet.
    fn open_dialect(&self) -> Result<Box<dyn Dialect>> {
        open_dialect(
            &self.url,
            DialectOptions {
                sign_notifications: self.sign_notifications,
                gap_timeout: self.gap_timeout,
                mysql_transaction_ids: self.mysql_transaction_ids,
            },
        )
    }

    fn check_install_timeout(&self) -> Result<()> {
        if self.install_timeout.is_zero() {
            return Err(Error::InvalidOption {
                option: "install_timeout",
                reason: "it must be longer than zero (a zero wait could never take a lock)".into(),
            });
        }
        Ok(())
    }

    /// The shortest time between two [`Status::Lagged`](crate::Status::Lagged) notices for one
    /// subscription. A subscription's first drop is reported at once; drops within the next
    /// interval are added up and reported in one notice when it has passed (so a subscriber
    /// that lags constantly gets one notice per interval, carrying the count), and whatever is
    /// unreported when the subscription ends or the notifier stops is reported then. Zero
    /// reports every batch of drops as it happens. Default: 1 s.
    pub fn lag_report_interval(mut self, every: Duration) -> Self {
        self.pipeline.lag_interval = capped(every);
        self
    }

    /// Lets the purge expire this notifier's [`consumer`](Self::consumer) once it has been
    /// away (not running) longer than `away`: from then on it protects nothing, and if it
    /// comes back after rows it had not read were purged, it gets
    /// [`Status::Gap`](crate::Status::Gap) naming their channels. The expiry is stored with the
    /// consumer, so whichever notifier purges honours this consumer's own setting. While it
    /// runs, the consumer says it is alive at least every quarter of `away`.
    ///
    /// Default: off (a registered consumer is kept until dropped). Under 1 s, or without a
    /// consumer name, `start()` fails with [`Error::InvalidOption`].
    pub fn consumer_expiry(mut self, away: Duration) -> Self {
        self.consumer_expiry = Some(capped(away));
        self
    }

    /// The backlog of this notifier's [`consumer`](Self::consumer) (journal rows on its
    /// channels it has not yet handed to every subscription, counted every 2 s, see
    /// [`Stats::backlog`](crate::Stats::backlog)) above which a warning is logged — once when it is reached, then at
    /// most once a minute while it stays there. 0 turns the warning off. Default: 10,000.
    pub fn backlog_warning(mut self, rows: u64) -> Self {
        self.backlog_warning = rows;
        self
    }

    /// Sends [`StatusEvent`]s to an actor from the very start, including what `start()`
    /// itself finds — such as a consumer's [`Status::Gap`](crate::Status::Gap) when rows it
    /// had not read were purged while it was away, which a status subscription made after
    /// `start()` would miss.
    pub fn subscribe_status(mut self, recipient: Recipient<StatusEvent>) -> Self {
        self.status_subscribers.push(recipient);
        self
    }

    /// The named consumers registered in the database at the URL, without starting a
    /// notifier: see [`Notifier::consumers`].
    pub async fn consumers(&self) -> Result<Vec<ConsumerInfo>> {
        let dialect = self.open_dialect()?;
        let list = dialect.consumers().await;
        dialect.close().await;
        list
    }

    /// Drops a named consumer of the database at the URL, without starting a notifier: see
    /// [`Notifier::drop_consumer`].
    pub async fn drop_consumer(&self, name: &str) -> Result<()> {
        let dialect = self.open_dialect()?;
        let dropped = dialect.drop_consumer(name.to_string()).await;
        dialect.close().await;
        dropped
    }

    /// The dead letters of the database at the URL, without starting a notifier: see
    /// [`Notifier::dead_letters`]. Each call opens its own connection when it runs.
    pub fn dead_letters(&self) -> Result<DeadLetters> {
        let dialect: Arc<dyn Dialect> = self.open_dialect()?.into();
        Ok(DeadLetters::new(dialect.dead_letter_store()?))
    }

    /// The dialect the URL selects: `"postgresql"`, `"sqlite"` or `"mysql"`.
    pub fn dialect_name(&self) -> Result<&'static str> {
        Ok(self.open_dialect()?.name())
    }

    async fn resolve(&self, dialect: &dyn Dialect) -> Result<Vec<ResolvedWatch>> {
        let schema = dialect.default_schema();
        let watches: Vec<Watch> = self
            .watches
            .iter()
            .map(|w| w.clone().or_schema(&schema))
            .collect();
        for watch in &watches {
            watch.precheck()?;
        }
        check_set(&watches)?;
        let tables: BTreeSet<(String, String)> = watches
            .iter()
            .map(|w| (w.schema_name().to_string(), w.table.clone()))
            .collect();
        let tables = dialect
            .describe_tables(tables.into_iter().collect())
            .await?;
        let resolved = watches
            .iter()
            .map(|w| {
                let table = tables
                    .iter()
                    .find(|t| t.schema == w.schema_name() && t.table == w.table)
                    .expect("every watched table was described");
                let mut resolved = resolve(w, table)?;
                dialect.finish_watch(&mut resolved);
                Ok(resolved)
            })
            .collect::<Result<Vec<_>>>()?;
        check_logical(dialect.name(), &resolved)?;
        dialect.check_watches(&resolved).await?;
        Ok(resolved)
    }

    /// The DDL `start()` would apply for these watches (schema, catalog, trigger functions,
    /// triggers), as one idempotent script. Validates against the live schema; installs nothing.
    pub async fn install_sql(&self) -> Result<String> {
        self.script(None).await
    }

    /// [`install_sql`](Self::install_sql) followed by the grants that `role` needs to run a
    /// notifier with [`manage_triggers(false)`](Self::manage_triggers) against what an
    /// administrator installed: on PostgreSQL a role name, on MySQL an account (`user` or
    /// `user@host`). Roles that only write to watched tables need nothing (README,
    /// "Security"). SQLite has no roles: [`Error::InvalidOption`].
    pub async fn install_sql_granting(&self, role: &str) -> Result<String> {
        self.script(Some(role)).await
    }

    async fn script(&self, grant_to: Option<&str>) -> Result<String> {
        let dialect = self.open_dialect()?;
        let watches = self.resolve(&*dialect).await;
        let sql = watches.and_then(|w| dialect.install_sql(&w, grant_to));
        dialect.close().await;
        sql
    }

    /// Removes every sqlnotify trigger (and, on PostgreSQL, trigger function) from the
    /// database — the watches of every notifier — and empties the catalog; returns how many
    /// watches were removed. sqlnotify's own tables (journal, overflow, consumers) are kept:
    /// other processes may still be reading them, and the journal tiers' named consumers keep
    /// their positions. On PostgreSQL with feature `logical`, every sqlnotify replication slot
    /// and publication is dropped too — a logical consumer's position is its slot, so those
    /// positions go; [`cleanup_with_report`](Self::cleanup_with_report) names them. Needs no
    /// watches.
    pub async fn cleanup(&self) -> Result<u64> {
        Ok(self.cleanup_with_report().await?.watches)
    }

    /// [`cleanup`](Self::cleanup), saying what it removed: how many watches, and (PostgreSQL,
    /// feature `logical`) which replication slots and publications it dropped, and the named
    /// consumers whose positions went with them.
    pub async fn cleanup_with_report(&self) -> Result<CleanupReport> {
        self.check_install_timeout()?;
        let dialect = self.open_dialect()?;
        let report = dialect.cleanup_all(self.install_timeout).await;
        dialect.close().await;
        report
    }

    /// Validates the watches against the live schema, installs their triggers, starts the
    /// actors and resolves once the listener is listening. Must run inside an actix system.
    /// Nothing is installed (and, with [`cleanup_on_start`](Self::cleanup_on_start), nothing
    /// removed) if any watch is invalid, or if a subscription registered with
    /// [`subscribe`](Self::subscribe) selects no watch ([`Error::NotWatched`]) or filters on a
    /// column its channel does not carry ([`Error::UnknownFilterColumn`]).
    pub async fn start(&self) -> Result<Notifier> {
        if self.gap_timeout == Some(Duration::ZERO) {
            return Err(Error::InvalidOption {
                option: "gap_timeout",
                reason: "it must be longer than zero (a zero wait would skip every transaction \
                         that commits after a later one)"
                    .into(),
            });
        }
        self.check_install_timeout()?;
        self.check_consumer()?;
        let dialect: Arc<dyn Dialect> = Arc::from(self.open_dialect()?);
        match self.start_with(dialect.clone()).await {
            Ok(notifier) => Ok(notifier),
            Err(e) => {
                dialect.close().await;
                Err(e)
            }
        }
    }

    fn check_consumer(&self) -> Result<()> {
        if self.consumer.as_deref() == Some("") {
            return Err(Error::InvalidOption {
                option: "consumer",
                reason: "a consumer needs a non-empty name".into(),
            });
        }
        if let Some(name) = self
            .consumer
            .as_deref()
            .filter(|n| n.chars().any(char::is_control))
        {
            // It goes into logs, message headers (the relay's ids) and the CLI's output.
            return Err(Error::InvalidOption {
                option: "consumer",
                reason: format!("the name {name:?} holds a control character"),
            });
        }
        match self.consumer_expiry {
            Some(_) if self.consumer.is_none() => Err(Error::InvalidOption {
                option: "consumer_expiry",
                reason: "it applies to a named consumer: set consumer(name) too".into(),
            }),
            Some(away) if away < MIN_EXPIRY => Err(Error::InvalidOption {
                option: "consumer_expiry",
                reason: format!(
                    "{away:?} is too short: a running consumer says it is alive every quarter \
                     of its expiry; use at least {MIN_EXPIRY:?}"
                ),
            }),
            _ => Ok(()),
        }
    }

    async fn start_with(&self, dialect: Arc<dyn Dialect>) -> Result<Notifier> {
        let watches = self.resolve(&*dialect).await?;
        let channels = Channels::new(
            watches.iter().map(|w| w.channel.clone()),
            dialect.default_schema(),
        );
        // The builder's subscriptions are part of what start() validates: checked before
        // anything is installed (with cleanup_on_start, before anything is removed), as the
        // registry will check them again once the pipeline runs.
        for (subscription, _) in &self.subscriptions {
            subscription.channel_in(&channels)?;
        }
        let installed = dialect
            .install(
                watches,
                InstallOptions {
                    revoke_on_model_change: self.revoke_on_model_change,
                    cleanup_on_start: self.cleanup_on_start,
                    manage_triggers: self.manage_triggers,
                    timeout: self.install_timeout,
                },
            )
            .await?;
        let pipeline = Pipeline::start(channels, dialect.overflow_store(), self.pipeline);
        for (subscription, recipient) in &self.subscriptions {
            let subscribe = Subscribe::new(subscription.clone(), recipient.clone());
            if let Err(e) = pipeline.registry.send(subscribe).await? {
                pipeline.shutdown();
                return Err(e);
            }
        }
        for recipient in &self.status_subscribers {
            let sink = StatusSink::Recipient(recipient.clone());
            pipeline.registry.send(SubscribeStatus(sink)).await?;
        }
        let consumer = self.consumer.clone().map(|name| ConsumerParams {
            name,
            expire_after: self.consumer_expiry,
        });
        let params = ListenParams {
            channels: pipeline.channels.list(),
            consumer: consumer.clone(),
            decoder: pipeline.decoder.clone().recipient(),
            stats: pipeline.stats.clone(),
            status: pipeline.decoder.clone().recipient(),
            budget: pipeline.budget.clone(),
            weight: pipeline.weight,
            health_check: self.health_check,
        };
        let listener = match dialect.listen(params).await {
            Ok(listener) => listener,
            Err(e) => {
                pipeline.shutdown();
                return Err(e);
            }
        };
        // A logical consumer has no journal backlog: its slot's lag is read by its listener.
        let journal = !pipeline
            .channels
            .list()
            .iter()
            .any(|c| c.tier() == crate::Tier::Logical);
        let backlog = consumer.filter(|_| journal).map(|c| {
            watch_backlog(
                dialect.clone(),
                c.name,
                pipeline.stats.clone(),
                self.backlog_warning,
            )
        });
        Ok(Notifier::new(Started {
            dialect,
            pipeline,
            listener,
            backlog,
            cleanup_on_stop: self.cleanup_on_stop,
            cleanup_installed_on_stop: self.cleanup_installed_on_stop,
            installed,
            install_timeout: self.install_timeout,
        }))
    }
}

/// [`Tier::Logical`](crate::Tier::Logical) is PostgreSQL's, and a notifier's watches use it
/// all or not at all (one listener per notifier keeps commit order: a slot and a journal
/// cannot be read in one order).
fn check_logical(dialect: &str, watches: &[ResolvedWatch]) -> Result<()> {
    let logical = |w: &&ResolvedWatch| w.tier == crate::Tier::Logical;
    let Some(first) = watches.iter().find(logical) else {
        return Ok(());
    };
    let describe = |w: &ResolvedWatch| {
        format!(
            "{}.{} {}",
            w.channel.schema,
            w.channel.table,
            w.channel.operation.as_str()
        )
    };
    if dialect != "postgresql" {
        return Err(Error::InvalidWatch {
            watch: describe(first),
            reason: format!("Tier::Logical is PostgreSQL's logical decoding; {dialect} has none"),
        });
    }
    if let Some(other) = watches.iter().find(|w| w.tier != crate::Tier::Logical) {
        return Err(Error::InvalidWatch {
            watch: describe(other),
            reason: "a notifier with Tier::Logical watches reads a replication slot only: give \
                     every watch Tier::Logical, or use a second notifier for the others"
                .into(),
        });
    }
    Ok(())
}

/// Default backlog (journal rows) past which a named consumer's backlog is logged.
const DEFAULT_BACKLOG_WARNING: u64 = 10_000;

impl Notifier {
    /// Starts configuring a notifier for the database at `url` (`postgres://…`,
    /// `postgresql://…`, `sqlite://…`, `mysql://…` or `mariadb://…`). The scheme picks the
    /// dialect; it is checked by `start()`.
    pub fn builder(url: impl Into<String>) -> NotifierBuilder {
        NotifierBuilder::new(url.into())
    }
}
