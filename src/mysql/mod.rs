//! The MySQL / MariaDB dialect: triggers append to a journal table that listeners poll by
//! cursor.
//!
//! Requirements: MySQL ≥ 8.0.17 or MariaDB ≥ 10.2.3, with InnoDB. Every watch has a trigger
//! of its own, which needs several triggers per table, timing and event (they fire in
//! creation order); payloads need `JSON_OBJECT` and, for FLOAT columns, `CAST(… AS DOUBLE)`
//! (MySQL 8.0.17). Tested on MariaDB 10.11, Oracle MySQL 8.0.46 and Oracle MySQL 9.7.4 (with
//! their defaults: binary logging on, `caching_sha2_password`, strict mode); the generated
//! SQL is the same for all except that MariaDB replaces a changed trigger in one statement.
//!
//! Privileges: TRIGGER on the watched tables (and SELECT, for snapshot feeds: see
//! `snapshot.rs`); CREATE, SELECT, INSERT, UPDATE and DELETE on the URL's database. Binary logging is on by default on MySQL 8 and later (and on many
//! MariaDB setups): then the server lets only a user with SUPER create triggers unless
//! `log_bin_trust_function_creators = 1` — otherwise `start()` fails with an error naming
//! that setting. Either set it (server configuration, or `SET PERSIST` as an administrator),
//! or have an administrator apply `install_sql()` and start with `manage_triggers(false)`.
//! Triggers are created under a non-strict `sql_mode` so a row too large for a payload never
//! fails the user's write (see `ddl.rs`).
//!
//! What sqlnotify creates: five tables in the URL's database — `sqlnotify_catalog`,
//! `sqlnotify_journal`, `sqlnotify_consumers` (registered consumers, see `consumers.rs`),
//! `sqlnotify_dead_letters` (see `dead_letters.rs`), `sqlnotify_trimmed` (how far the purge
//! went, for streams that resume, see `replay.rs`) — and one trigger per watch, named after its channel, in the watched table's database. Triggers name the journal with its database, so
//! tables of other databases on the same server can be watched too
//! (`Watch::new("otherdb.table", …)`). Triggers do not fire for changes made by foreign-key
//! cascades (a MySQL limitation).
//!
//! URLs: `mysql://user:password@host:3306/database` or `mariadb://…`; the database is
//! required and is the default schema of watches. The driver is `mysql_async`; TLS (rustls,
//! feature `tls`) follows MySQL's `ssl-mode`, `ssl-ca`, `ssl-cert` and `ssl-key` in the URL,
//! taken out before the driver sees it (`tls.rs`). The driver's URL parameters apply
//! (`socket=…`, `prefer_socket=false`, …; its TLS ones are refused for `ssl-mode`), plus
//! sqlnotify's own `sqlnotify_gap_timeout_ms` (default 10000, not zero): how long a missing
//! journal id is waited for before the listener checks whether it was rolled back — see
//! `journal.rs`.
//! `NotifierBuilder::gap_timeout` sets the same and wins over the URL parameter.

mod catalog;
mod consumers;
mod ddl;
mod dead_letters;
mod journal;
mod listener;
mod replay;
mod snapshot;
mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts};
use serde_json::Value;

use self::tls::{MysqlConfig, TlsParams};

use crate::consumer::{Backlog, ConsumerInfo};
use crate::dead_letters::DeadLetterStore;
use crate::dialect::{CleanupReport, Dialect, DialectOptions, InstallOptions};
use crate::error::{Error, Result};
use crate::event::Channel;
use crate::listener::{ListenParams, ListenerHandle};
use crate::overflow::OverflowStore;
use crate::resolve::{ResolvedWatch, TableInfo};

/// Default time a journal id may stay missing before it is treated as rolled back.
const DEFAULT_GAP_TIMEOUT: Duration = Duration::from_secs(10);
/// sqlnotify's own URL parameter (removed before the URL reaches the driver).
const GAP_TIMEOUT_PARAM: &str = "sqlnotify_gap_timeout_ms";

/// What a `mysql://` URL says.
pub(crate) struct Target {
    pub opts: MysqlConfig,
    pub database: String,
    pub gap_timeout: Duration,
}

impl std::fmt::Debug for Target {
    /// Without the driver options: their `Debug` shows the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.opts.ip_or_hostname())
            .field("port", &self.opts.tcp_port())
            .field("user", &self.opts.user())
            .field("database", &self.database)
            .field("gap_timeout", &self.gap_timeout)
            .finish_non_exhaustive()
    }
}

/// Parses a `mysql://` or `mariadb://` URL. Errors never echo the URL (it may carry a
/// password).
pub(crate) fn parse_url(url: &str) -> Result<Target> {
    let invalid = |reason: String| Error::InvalidUrl { reason };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid("expected mysql://user@host:port/database".into()))?;
    if !matches!(scheme.to_ascii_lowercase().as_str(), "mysql" | "mariadb") {
        return Err(invalid(format!(
            "expected a mysql:// or mariadb:// URL, got {scheme}://"
        )));
    }
    let (base, query) = match rest.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (rest, None),
    };
    let mut gap_timeout = DEFAULT_GAP_TIMEOUT;
    let mut tls = TlsParams::default();
    let mut kept = Vec::new();
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        match pair.split_once('=') {
            Some((key, value)) if tls.take(key, value)? => {}
            Some((GAP_TIMEOUT_PARAM, value)) => {
                let ms: u64 = value.parse().map_err(|_| {
                    invalid(format!(
                        "{GAP_TIMEOUT_PARAM} must be a number of milliseconds, got {value:?}"
                    ))
                })?;
                if ms == 0 {
                    return Err(invalid(format!(
                        "{GAP_TIMEOUT_PARAM} must be longer than zero"
                    )));
                }
                gap_timeout = crate::durations::capped(Duration::from_millis(ms));
            }
            _ if pair.is_empty() => {}
            _ => kept.push(pair),
        }
    }
    let mut driver_url = format!("mysql://{base}");
    if !kept.is_empty() {
        driver_url.push('?');
        driver_url.push_str(&kept.join("&"));
    }
    let opts = Opts::from_url(&driver_url).map_err(|e| invalid(e.to_string()))?;
    let database = opts
        .db_name()
        .filter(|db| !db.is_empty())
        .ok_or_else(|| {
            invalid("the URL must name a database: mysql://user@host:3306/database".into())
        })?
        .to_string();
    Ok(Target {
        opts: MysqlConfig::new(opts, &tls)?,
        database,
        gap_timeout,
    })
}

/// The dialect's own connections (catalog, install, notify, retention): at most
/// [`MAX_CONTROL_CONNECTIONS`] at once, opened on first use and reopened after a failure.
struct Control {
    opts: MysqlConfig,
    /// The connections not in use, and when each was last used.
    idle: std::sync::Mutex<Vec<(Conn, Instant)>>,
    /// One permit per connection in use.
    permits: Arc<tokio::sync::Semaphore>,
    /// Set by [`close`](Control::close): a call that ends afterwards closes its connection
    /// instead of keeping it.
    closed: std::sync::atomic::AtomicBool,
}

/// A control connection idle for longer than this is pinged before use: the server may have
/// closed it meanwhile (`wait_timeout`, a restart, `KILL`), and the caller's statement must
/// not be the one to find out.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);
/// How long that ping may take.
const PING_LIMIT: Duration = Duration::from_secs(5);
/// How long opening a control connection may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(30);
/// Most control connections at once: a call stuck on the server (a purge behind a lock, a
/// path gone silent) holds one, and the others go on; a burst of calls (many `notify`s, every
/// handler's dead-letter writes) queues for these instead of opening one each.
const MAX_CONTROL_CONNECTIONS: usize = 4;

impl Control {
    fn new(opts: MysqlConfig) -> Self {
        Control {
            opts,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS)),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Runs `f` on a connection of its own. A failed or abandoned call drops its connection
    /// (the next call opens a new one), so a broken connection is never reused.
    ///
    /// No lock is held while anything waits on the server: a call already running (a purge
    /// behind a lock, a connection whose path went silent, a connect the server never
    /// answers) holds up no other while a connection is free — held, one lock made every
    /// `notify`, dead-letter write and consumer listing wait for the slowest call before it,
    /// for ever on a silent path.
    fn run<T, F>(self: &Arc<Self>, f: F) -> BoxFuture<'static, Result<T>>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut Conn) -> BoxFuture<'c, Result<T>> + Send + 'static,
    {
        let control = self.clone();
        Box::pin(async move {
            // Bounded: should every connection be stuck on a path gone silent, calls fail
            // after the wait instead of queueing for ever.
            let permit =
                tokio::time::timeout(CONNECT_LIMIT, control.permits.clone().acquire_owned());
            let _permit = match permit.await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(Error::NotRunning),
                Err(_) => {
                    return Err(Error::Database {
                        context: "waiting for a MySQL control connection".into(),
                        source: format!(
                            "all {MAX_CONTROL_CONNECTIONS} were busy for {CONNECT_LIMIT:?} \
                             (statements stuck on the server?)"
                        )
                        .into(),
                    })
                }
            };
            // Out of the pool while in use: should this future be dropped part way (a client
            // that resumes a stream and goes), the connection, its reply half read, goes with
            // it instead of handing that reply to the next statement.
            let mut conn = match control.take_idle().await {
                Some(conn) => conn,
                None => control.connect().await?,
            };
            let result = f(&mut conn).await;
            if matches!(result, Err(Error::Database { .. })) {
                let _ = conn.disconnect().await;
            } else {
                control.put_back(conn).await;
            }
            result
        })
    }

    /// An idle connection still alive, if any (one idle for over [`CHECK_IDLE_AFTER`] is
    /// pinged first; a dead one is dropped).
    async fn take_idle(&self) -> Option<Conn> {
        loop {
            let (mut conn, used) = self.idle.lock().expect("not poisoned").pop()?;
            if used.elapsed() <= CHECK_IDLE_AFTER
                || matches!(
                    tokio::time::timeout(PING_LIMIT, conn.ping()).await,
                    Ok(Ok(()))
                )
            {
                return Some(conn);
            }
        }
    }

    /// Keeps `conn` for the next call, unless the dialect was closed meanwhile.
    async fn put_back(&self, conn: Conn) {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = conn.disconnect().await;
            return;
        }
        self.idle
            .lock()
            .expect("not poisoned")
            .push((conn, Instant::now()));
    }

    /// A new connection, within [`CONNECT_LIMIT`]: mysql_async bounds no part of a connect,
    /// and a server that takes the socket and never answers would hold the caller for ever.
    async fn connect(&self) -> Result<Conn> {
        match tokio::time::timeout(CONNECT_LIMIT, self.opts.connect()).await {
            Ok(connected) => connected.map_err(|e| Error::db("connecting to MySQL", e)),
            Err(_) => Err(Error::Database {
                context: "connecting to MySQL".into(),
                source: format!("no answer within {CONNECT_LIMIT:?}").into(),
            }),
        }
    }

    /// Closes the idle connections; a call still running closes its own when it ends.
    fn close(self: &Arc<Self>) -> BoxFuture<'static, ()> {
        let control = self.clone();
        Box::pin(async move {
            control
                .closed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let idle = std::mem::take(&mut *control.idle.lock().expect("not poisoned"));
            for (conn, _) in idle {
                let _ = conn.disconnect().await;
            }
        })
    }
}

/// MySQL / MariaDB behind the [`Dialect`] interface.
pub(crate) struct Mysql {
    opts: MysqlConfig,
    database: Arc<str>,
    gap_timeout: Duration,
    /// Make the journal record transactions at install (`mysql_transaction_ids`).
    transaction_ids: bool,
    control: Arc<Control>,
    /// Wakes this notifier's listener after its own writes.
    wake: crate::listener::Wake,
    /// The listener's settled low watermark, where snapshots fence (see `snapshot.rs`).
    settled: Arc<snapshot::Watermark>,
    /// The channels the listener reads (set by `listen`): a snapshot's fence keeps the
    /// journal ids of its table's channels only.
    listened: Arc<std::sync::Mutex<Vec<Channel>>>,
}

impl Mysql {
    /// The dialect for `url`; the builder's gap timeout, when set, wins over the URL's.
    pub fn new(url: &str, options: DialectOptions) -> Result<Self> {
        let target = parse_url(url)?;
        Ok(Mysql {
            control: Arc::new(Control::new(target.opts.clone())),
            opts: target.opts,
            database: Arc::from(target.database),
            gap_timeout: options.gap_timeout.unwrap_or(target.gap_timeout),
            transaction_ids: options.mysql_transaction_ids,
            wake: crate::listener::Wake::default(),
            settled: Arc::new(snapshot::Watermark::default()),
            listened: Arc::default(),
        })
    }
}

impl Dialect for Mysql {
    fn name(&self) -> &'static str {
        "mysql"
    }

    fn check_watches(&self, watches: &[ResolvedWatch]) -> BoxFuture<'static, Result<()>> {
        let checked = crate::resolve::check_context(
            watches,
            ddl::MAX_CONTEXT_NAMES,
            |name| ddl::context_expr(name).is_some(),
            "MySQL / MariaDB offer current_user, user, connection_id and user variables named \
             with @ (such as @app_user_id)",
        );
        Box::pin(async move { checked })
    }

    fn default_schema(&self) -> String {
        self.database.to_string()
    }

    fn describe_tables(
        &self,
        tables: Vec<(String, String)>,
    ) -> BoxFuture<'static, Result<Vec<TableInfo>>> {
        self.control.run(move |conn| {
            Box::pin(async move {
                let mut out = Vec::with_capacity(tables.len());
                for (schema, table) in &tables {
                    out.push(catalog::describe_table(conn, schema, table).await?);
                }
                Ok(out)
            })
        })
    }

    fn install(
        &self,
        watches: Vec<ResolvedWatch>,
        options: InstallOptions,
    ) -> BoxFuture<'static, Result<Vec<String>>> {
        let (database, transaction_ids) = (self.database.clone(), self.transaction_ids);
        self.control.run(move |conn| {
            Box::pin(async move {
                catalog::install(conn, &database, &watches, options, transaction_ids).await
            })
        })
    }

    fn install_sql(&self, watches: &[ResolvedWatch], grant_to: Option<&str>) -> Result<String> {
        let mut sql = ddl::install_script(watches, &self.database);
        if self.transaction_ids {
            sql.push_str(&ddl::transactions_script(&self.database));
        }
        if let Some(account) = grant_to {
            sql.push_str(&ddl::grant_sql(watches, &self.database, account)?);
            if self.transaction_ids {
                sql.push_str(&ddl::transactions_grant_sql(&self.database, account)?);
            }
        }
        Ok(sql)
    }

    fn uninstall(
        &self,
        channels: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<()>> {
        let database = self.database.clone();
        self.control.run(move |conn| {
            Box::pin(async move { catalog::uninstall(conn, &database, &channels, timeout).await })
        })
    }

    fn cleanup_all(&self, timeout: Duration) -> BoxFuture<'static, Result<CleanupReport>> {
        let database = self.database.clone();
        self.control.run(move |conn| {
            Box::pin(async move {
                let watches = catalog::cleanup_all(conn, &database, timeout).await?;
                Ok(CleanupReport::watches(watches))
            })
        })
    }

    fn listen(&self, params: ListenParams) -> BoxFuture<'static, Result<Box<dyn ListenerHandle>>> {
        *self.listened.lock().unwrap_or_else(|p| p.into_inner()) = params.channels.clone();
        let source = listener::MysqlSource::new(
            self.opts.clone(),
            self.database.clone(),
            self.gap_timeout,
            params.health_check,
            params.channel_names(),
            self.wake.clone(),
            self.settled.clone(),
        );
        Box::pin(crate::listener::start(source, params))
    }

    /// A journal row, like a trigger's: MySQL journal rows have no payload limit, so nothing
    /// overflows.
    fn send_custom(
        &self,
        channel: &Channel,
        payload: String,
        _value: &Value,
        _allow_overflow: bool,
    ) -> BoxFuture<'static, Result<()>> {
        let (database, channel) = (self.database.clone(), channel.name.clone());
        self.wake.after(self.control.run(move |conn| {
            Box::pin(async move { journal::append(conn, &database, &channel, &payload).await })
        }))
    }

    fn overflow_store(&self) -> Arc<dyn OverflowStore> {
        Arc::new(JournalStore {
            control: self.control.clone(),
            database: self.database.clone(),
        })
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        self.control.close()
    }

    fn consumers(&self) -> BoxFuture<'static, Result<Vec<ConsumerInfo>>> {
        let database = self.database.clone();
        self.control
            .run(move |conn| Box::pin(async move { consumers::list(conn, &database).await }))
    }

    fn drop_consumer(&self, name: String) -> BoxFuture<'static, Result<()>> {
        let database = self.database.clone();
        self.control.run(move |conn| {
            Box::pin(async move { consumers::drop_consumer(conn, &database, &name).await })
        })
    }

    fn consumer_backlog(&self, name: String) -> BoxFuture<'static, Result<Option<Backlog>>> {
        let database = self.database.clone();
        self.control.run(move |conn| {
            Box::pin(async move { consumers::backlog(conn, &database, &name).await })
        })
    }

    fn dead_letter_store(&self) -> Result<Arc<dyn DeadLetterStore>> {
        Ok(Arc::new(dead_letters::MysqlDeadLetters::new(
            self.control.clone(),
            self.database.clone(),
        )))
    }

    /// A consistent snapshot fenced by the journal ids it saw above the listener's watermark
    /// (see `snapshot.rs`).
    fn replay(
        &self,
        from: crate::replay::ReplayFrom,
        channels: Vec<String>,
        _all: Vec<String>,
        limit: i64,
    ) -> BoxFuture<'static, Result<crate::replay::Replay>> {
        let crate::replay::ReplayFrom::Cursor { read, pos } = from else {
            // A position of another dialect's journal.
            return Box::pin(async { Ok(crate::replay::Replay::TooOld) });
        };
        let (database, settled) = (self.database.clone(), self.settled.clone());
        self.control.run(move |conn| {
            Box::pin(async move {
                let settled = settled.get();
                replay::replay(conn, &database, read, pos, &channels, limit, settled).await
            })
        })
    }

    fn open_snapshot(
        &self,
        channel: Arc<Channel>,
        chunk_rows: usize,
    ) -> BoxFuture<'static, Result<Box<dyn crate::snapshot::reader::SnapshotReader>>> {
        // The watermark first: before the read opens (see `snapshot.rs`).
        let low = self.settled.get();
        let mut channels: Vec<String> = self
            .listened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|c| c.schema == channel.schema && c.table == channel.table)
            .map(|c| c.name.clone())
            .collect();
        if channels.is_empty() {
            channels.push(channel.name.clone());
        }
        channels.sort();
        channels.dedup();
        let (opts, database) = (self.opts.clone(), self.database.clone());
        Box::pin(async move {
            let reader =
                snapshot::MysqlSnapshot::open(opts, &database, channel, channels, low, chunk_rows)
                    .await?;
            Ok(Box::new(reader) as Box<dyn crate::snapshot::reader::SnapshotReader>)
        })
    }
}

/// The decoder's view of MySQL: payloads are never references (no size limit), and the
/// periodic purge trims the journal.
struct JournalStore {
    control: Arc<Control>,
    database: Arc<str>,
}

impl OverflowStore for JournalStore {
    fn purge(&self, retention: Duration) -> BoxFuture<'static, Result<u64>> {
        let database = self.database.clone();
        self.control.run(move |conn| {
            Box::pin(async move {
                let deleted = consumers::purge(conn, &database, retention).await?;
                if deleted > 0 && journal::records_transactions(conn, &database).await? {
                    journal::trim_history(conn, &database).await?;
                }
                Ok(deleted)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("mysql://root@127.0.0.1:3306/app").unwrap();
        assert_eq!(t.database, "app");
        assert_eq!(t.gap_timeout, DEFAULT_GAP_TIMEOUT);
        assert_eq!(t.opts.user(), Some("root"));
        let t = parse_url(
            "MariaDB://u:secret@localhost/db?sqlnotify_gap_timeout_ms=250&prefer_socket=false",
        )
        .unwrap();
        assert_eq!(t.database, "db");
        assert_eq!(t.gap_timeout, Duration::from_millis(250));
        assert!(!t.opts.prefer_socket());
        let shown = format!("{t:?}");
        assert!(
            shown.contains("\"db\"") && !shown.contains("secret"),
            "{shown}"
        );
        for bad in [
            "mysql://root@127.0.0.1:3306",
            "mysql://root@127.0.0.1:3306/",
            "mysql://u:secret@host/db?sqlnotify_gap_timeout_ms=soon",
            "mysql://u:secret@host/db?sqlnotify_gap_timeout_ms=0",
            "mysql://u:secret@host/db?no_such_parameter=1",
            "mysql://u@host/db?password=secret",
            "postgres://u@host/db",
        ] {
            let e = parse_url(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidUrl { .. }), "{bad}: {e:?}");
            assert!(!e.to_string().contains("secret"), "{bad}: {e}");
        }
    }
}
