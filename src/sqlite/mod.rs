//! The SQLite dialect: triggers append to a journal table that listeners read by cursor.
//!
//! What sqlnotify changes on a SQLite database: it switches it to WAL mode (persistent, so
//! the application's writers are never blocked by a listener's reads), and creates five
//! tables — `sqlnotify_catalog`, `sqlnotify_journal`, `sqlnotify_consumers` (registered
//! consumers, see `consumers.rs`), `sqlnotify_dead_letters` (see `dead_letters.rs`),
//! `sqlnotify_trimmed` (how far the purge deleted, for streams that resume: `journal::replay`)
//! — and one trigger per watch, named after its channel. Every
//! connection it opens sets a busy timeout and keeps its transactions short.
//!
//! URLs: `sqlite:///absolute/path.db` and `sqlite://relative/path.db`. The file must exist.
//! In-memory databases are refused: each connection to `:memory:` has a private database,
//! so a listener could never see the application's writes.

mod catalog;
mod consumers;
pub mod context;
mod ddl;
mod dead_letters;
mod journal;
mod listener;
mod snapshot;
pub mod transactions;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use crate::consumer::{Backlog, ConsumerInfo};
use crate::dead_letters::DeadLetterStore;
use crate::dialect::{CleanupReport, Dialect, InstallOptions};
use crate::error::{Error, Result};
use crate::event::Channel;
use crate::listener::{ListenParams, ListenerHandle};
use crate::overflow::OverflowStore;
use crate::resolve::{ResolvedWatch, TableInfo};

/// How long a sqlnotify connection waits for a lock before giving up.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a connection to an existing database file, with sqlnotify's settings.
pub(crate) fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::db(format!("opening SQLite database {}", path.display()), e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| Error::db("setting the busy timeout", e))?;
    Ok(conn)
}

/// Runs `stmt`, a write with a `RETURNING` clause, to its end and returns its first row as
/// `f` reads it (`None`: no row).
///
/// Not `query_row`: it reads one row and leaves the statement to be reset when dropped, which
/// is where an autocommit write commits — and rusqlite drops that step's error (busy past the
/// timeout, disk full, an I/O error), so a write that was rolled back read as done. Stepping to
/// `SQLITE_DONE` commits before this returns, and a failed commit is this call's error.
pub(crate) fn returning_one<T>(
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<T>> {
    let mut rows = stmt.query(params)?;
    let first = match rows.next()? {
        Some(row) => f(row)?,
        None => return Ok(None),
    };
    while rows.next()?.is_some() {}
    Ok(Some(first))
}

/// The file a `sqlite://` URL names.
pub(crate) fn parse_url(url: &str) -> Result<PathBuf> {
    let invalid = |reason: &str| Error::InvalidUrl {
        reason: format!("{:?}: {reason}", crate::redact::redact(url)),
    };
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| {
            invalid("expected sqlite:///absolute/path.db or sqlite://relative/path.db")
        })?;
    if rest.contains(":memory:") || rest.contains("mode=memory") {
        return Err(invalid(
            "in-memory SQLite databases cannot be watched: every connection gets its own private \
             database, so the listener would never see the application's writes; use a file \
             (a temporary directory is fine)",
        ));
    }
    if rest.contains('?') {
        return Err(invalid(
            "query parameters are not supported in sqlite:// URLs",
        ));
    }
    if rest.is_empty() {
        return Err(invalid("no database file given"));
    }
    Ok(PathBuf::from(rest))
}

/// SQLite behind the [`Dialect`] interface.
pub(crate) struct Sqlite {
    path: PathBuf,
    control: Arc<Mutex<Option<Connection>>>,
    /// Wakes this notifier's listener after its own writes.
    wake: crate::listener::Wake,
}

impl Sqlite {
    pub fn new(url: &str) -> Result<Self> {
        Ok(Sqlite {
            path: parse_url(url)?,
            control: Arc::new(Mutex::new(None)),
            wake: crate::listener::Wake::default(),
        })
    }

    /// Runs `f` on the control connection, on a blocking thread.
    fn blocking<T, F>(&self, f: F) -> BoxFuture<'static, Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        run_blocking(self.control.clone(), self.path.clone(), f)
    }
}

fn run_blocking<T, F>(
    control: Arc<Mutex<Option<Connection>>>,
    path: PathBuf,
    f: F,
) -> BoxFuture<'static, Result<T>>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
{
    Box::pin(async move {
        tokio::task::spawn_blocking(move || {
            let mut slot = control
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if slot.is_none() {
                *slot = Some(open(&path)?);
            }
            f(slot.as_mut().expect("just opened"))
        })
        .await
        .map_err(|e| Error::db("running a SQLite call", e))?
    })
}

impl Dialect for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn check_watches(&self, watches: &[ResolvedWatch]) -> BoxFuture<'static, Result<()>> {
        let checked = crate::resolve::check_context(
            watches,
            ddl::MAX_CONTEXT_NAMES,
            ddl::is_context_name,
            "SQLite context names are the names the application sets with \
             sqlite_context::set: any non-empty name without control characters",
        );
        Box::pin(async move { checked })
    }

    fn default_schema(&self) -> String {
        "main".to_string()
    }

    fn describe_tables(
        &self,
        tables: Vec<(String, String)>,
    ) -> BoxFuture<'static, Result<Vec<TableInfo>>> {
        self.blocking(move |conn| {
            tables
                .iter()
                .map(|(schema, table)| catalog::describe_table(conn, schema, table))
                .collect()
        })
    }

    fn install(
        &self,
        watches: Vec<ResolvedWatch>,
        options: InstallOptions,
    ) -> BoxFuture<'static, Result<Vec<String>>> {
        self.blocking(move |conn| catalog::install(conn, &watches, options))
    }

    fn install_sql(&self, watches: &[ResolvedWatch], grant_to: Option<&str>) -> Result<String> {
        if grant_to.is_some() {
            return Err(Error::InvalidOption {
                option: "grant_to",
                reason: "SQLite has no roles: who may read and write the events is whoever may \
                         read and write the database file"
                    .into(),
            });
        }
        Ok(ddl::install_script(watches))
    }

    fn uninstall(
        &self,
        channels: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<()>> {
        self.blocking(move |conn| catalog::uninstall(conn, &channels, timeout))
    }

    fn cleanup_all(&self, timeout: Duration) -> BoxFuture<'static, Result<CleanupReport>> {
        self.blocking(move |conn| catalog::cleanup_all(conn, timeout).map(CleanupReport::watches))
    }

    fn listen(&self, params: ListenParams) -> BoxFuture<'static, Result<Box<dyn ListenerHandle>>> {
        let source = listener::SqliteSource::new(
            self.path.clone(),
            params.channel_names(),
            self.wake.clone(),
        );
        Box::pin(crate::listener::start(source, params))
    }

    /// A journal row, like a trigger's: SQLite has no payload limit, so nothing overflows.
    fn send_custom(
        &self,
        channel: &Channel,
        payload: String,
        _value: &Value,
        _allow_overflow: bool,
    ) -> BoxFuture<'static, Result<()>> {
        let channel = channel.name.clone();
        self.wake
            .after(self.blocking(move |conn| journal::append(conn, &channel, &payload)))
    }

    fn overflow_store(&self) -> Arc<dyn OverflowStore> {
        Arc::new(JournalStore {
            control: self.control.clone(),
            path: self.path.clone(),
        })
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let control = self.control.clone();
        Box::pin(async move {
            let conn = control.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(conn) = conn {
                let _ = tokio::task::spawn_blocking(move || drop(conn)).await;
            }
        })
    }
    fn consumers(&self) -> BoxFuture<'static, Result<Vec<ConsumerInfo>>> {
        self.blocking(consumers::list)
    }

    fn drop_consumer(&self, name: String) -> BoxFuture<'static, Result<()>> {
        self.blocking(move |conn| consumers::drop_consumer(conn, &name))
    }

    fn consumer_backlog(&self, name: String) -> BoxFuture<'static, Result<Option<Backlog>>> {
        self.blocking(move |conn| consumers::backlog(conn, &name))
    }

    fn replay(
        &self,
        from: crate::replay::ReplayFrom,
        channels: Vec<String>,
        _all: Vec<String>,
        limit: i64,
    ) -> BoxFuture<'static, Result<crate::replay::Replay>> {
        let crate::replay::ReplayFrom::Journal { since, cursor } = from else {
            // A position of another dialect's journal.
            return Box::pin(async { Ok(crate::replay::Replay::TooOld) });
        };
        let channels = channels.into_iter().map(Arc::from).collect();
        self.blocking(move |conn| journal::replay(conn, (since, cursor), limit, &channels))
    }

    fn replay_head(&self) -> BoxFuture<'static, Result<Option<crate::replay::Head>>> {
        self.blocking(|conn| {
            journal::last_given(conn).map(|id| Some(crate::replay::Head::Journal(id)))
        })
    }

    fn open_snapshot(
        &self,
        channel: Arc<Channel>,
        chunk_rows: usize,
    ) -> BoxFuture<'static, Result<Box<dyn crate::snapshot::reader::SnapshotReader>>> {
        let path = self.path.clone();
        Box::pin(async move {
            let reader = snapshot::SqliteSnapshot::open(path, channel, chunk_rows).await?;
            Ok(Box::new(reader) as Box<dyn crate::snapshot::reader::SnapshotReader>)
        })
    }

    fn dead_letter_store(&self) -> Result<Arc<dyn DeadLetterStore>> {
        Ok(Arc::new(dead_letters::SqliteDeadLetters::new(
            self.control.clone(),
            self.path.clone(),
        )))
    }
}

/// The decoder's view of SQLite: payloads are never references (no size limit), and the
/// periodic purge trims the journal.
struct JournalStore {
    control: Arc<Mutex<Option<Connection>>>,
    path: PathBuf,
}

impl OverflowStore for JournalStore {
    fn purge(&self, retention: Duration) -> BoxFuture<'static, Result<u64>> {
        run_blocking(self.control.clone(), self.path.clone(), move |conn| {
            consumers::purge(conn, retention)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("sqlite:///tmp/a.db").unwrap(),
            PathBuf::from("/tmp/a.db")
        );
        assert_eq!(
            parse_url("sqlite://data/a.db").unwrap(),
            PathBuf::from("data/a.db")
        );
        for bad in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://file:x?mode=memory&cache=shared",
        ] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(e.contains("in-memory"), "{bad}: {e}");
        }
        assert!(parse_url("sqlite://").is_err());
        assert!(parse_url("sqlite:///a.db?x=1").is_err());
    }
}
