//! SQLite's I/O for the listener shell (`crate::listener`): a [`Source`] reading the journal by
//! id.
//!
//! SQLite has no NOTIFY. The source keeps a connection of its own and checks `PRAGMA
//! data_version` — which changes when any other connection commits — at the shell's adaptive
//! interval: every millisecond while events flow, backing off to 10 ms when idle. Only when
//! the version moved does it read the journal past its position. The notifier's own writes
//! (`notify()`) wake it at once. Every SQLite call runs on a blocking thread, never on the
//! actix arbiter. The position is the id of the last journal row read (AUTOINCREMENT ids are
//! in commit order, so nothing commits behind it).

use std::collections::HashSet;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{select, Either};

use rusqlite::Connection;

use super::consumers;
use super::journal;
use super::open;
use crate::consumer::ConsumerParams;
use crate::error::{Error, Result};
use crate::listener::{FinalSave, Outlet, Pace, Source, Wake};

/// Rows read per query (and at most [`journal::READ_BYTES`] of payloads: a read ends before
/// a row that would take it past them, unless it has none yet).
const READ_BATCH: i64 = 1_000;

/// The listener's connection, used from blocking threads one call at a time.
pub(crate) struct SqliteConn {
    conn: Arc<Mutex<Connection>>,
    /// `PRAGMA data_version` taken before the last read: a commit after it changes it.
    version: i64,
    /// The last read left rows behind (it reads one batch): the next wait ends at once.
    more: bool,
}

impl SqliteConn {
    /// Runs `f` on the connection on a blocking thread.
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(|e| Error::db("running a SQLite call", e))?
    }
}

/// Reads a SQLite database's journal.
pub(crate) struct SqliteSource {
    path: PathBuf,
    channels: Arc<HashSet<Arc<str>>>,
    /// The same channels, sorted (what a named consumer registers).
    channel_list: Arc<Vec<String>>,
    /// Id of the last journal row read; `None` until placed.
    position: Option<i64>,
    /// Woken by the notifier's own writes.
    wake: Wake,
    /// The consumer's lease, once taken: a lock on a file next to the database, which the
    /// OS releases when this process ends.
    lease: Option<std::fs::File>,
    /// Whether a named consumer reads (placed with one): the purge keeps its rows, and
    /// `place` and `save` report what it missed. Without one, each read checks that the
    /// purge deleted nothing after the position ([`Source::missed`]).
    named: bool,
    /// The last read found a row after the position purged.
    purged: bool,
}

impl SqliteSource {
    pub fn new(path: PathBuf, channels: Vec<String>, wake: Wake) -> Self {
        let mut channel_list = channels;
        channel_list.sort();
        channel_list.dedup();
        SqliteSource {
            path,
            channels: Arc::new(channel_list.iter().map(|c| Arc::from(c.as_str())).collect()),
            channel_list: Arc::new(channel_list),
            position: None,
            wake,
            lease: None,
            named: false,
            purged: false,
        }
    }
}

/// The lease file of consumer `name` of the database at `db`: the name's letters and digits
/// (for people listing the directory) and a hash of the whole name (FNV-1a, stable across
/// builds, so every process of the group finds the same file), beside the database's real
/// file — a process that opens it through a symbolic link (a deploy's `releases/2/app.db`)
/// or another relative path must find the same lease file as the others.
fn lease_path(db: &std::path::Path, name: &str) -> PathBuf {
    let db = &std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
    let readable: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let file = db
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    db.with_file_name(format!("{file}.sqlnotify-{readable}-{hash:016x}.lock"))
}

impl Source for SqliteSource {
    type Conn = SqliteConn;
    type Position = i64;
    const NAME: &'static str = "SQLite";

    async fn connect(&mut self, _: &Outlet) -> Result<SqliteConn> {
        let path = self.path.clone();
        let conn = tokio::task::spawn_blocking(move || open(&path))
            .await
            .map_err(|e| Error::db("opening the SQLite listener connection", e))??;
        Ok(SqliteConn {
            conn: Arc::new(Mutex::new(conn)),
            version: i64::MIN,
            more: false,
        })
    }

    async fn place(
        &mut self,
        conn: &mut SqliteConn,
        consumer: Option<&ConsumerParams>,
    ) -> Result<Vec<String>> {
        self.named = consumer.is_some();
        let (consumer, channels) = (consumer.cloned(), self.channel_list.clone());
        let (start, missed) = conn
            .call(move |conn| match &consumer {
                Some(consumer) => consumers::register(conn, consumer, &channels),
                None => Ok((journal::start(conn)?, Vec::new())),
            })
            .await?;
        log::debug!("sqlnotify: SQLite listener starts after journal id {start}");
        self.position = Some(start);
        Ok(missed)
    }

    /// A lock on `<database>.sqlnotify-<consumer>.lock` next to the database file: the OS
    /// releases it when the holding process ends, however it ends.
    async fn lease(&mut self, _: &mut SqliteConn, consumer: &ConsumerParams) -> Result<bool> {
        if self.lease.is_some() {
            return Ok(true);
        }
        let path = lease_path(&self.path, &consumer.name);
        let context = || {
            format!(
                "taking the lease of consumer {:?} ({})",
                consumer.name,
                path.display()
            )
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::db(context(), e))?;
        match file.try_lock() {
            Ok(()) => {
                self.lease = Some(file);
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::db(context(), e)),
        }
    }

    async fn read(&mut self, conn: &mut SqliteConn, outlet: &Outlet) -> Result<Option<u64>> {
        let position = self
            .position
            .expect("the position is placed before reading");
        let (channels, named) = (self.channels.clone(), self.named);
        let (version, purged, batch, last, all) = conn
            .call(move |conn| {
                // The version before reading: a commit after this point changes it again.
                let version = journal::data_version(conn)?;
                // The purge's record and the rows in one read transaction: a purge that
                // deleted rows after the position before this read is seen in both.
                let tx = conn
                    .unchecked_transaction()
                    .map_err(|e| Error::db("starting a journal read", e))?;
                let purged = !named && journal::purged_after(&tx, position)?;
                let (batch, last, all) = journal::read_after(
                    &tx,
                    position,
                    READ_BATCH,
                    journal::MAX_EXTENSION,
                    journal::READ_BYTES,
                    &channels,
                )?;
                drop(tx);
                Ok((version, purged, batch, last, all))
            })
            .await?;
        conn.version = version;
        self.purged |= purged;
        let Some(forwarded) = outlet.forward(batch).await else {
            return Ok(None);
        };
        self.position = Some(last);
        // One batch per read: the shell notes and saves the position (and sends a named
        // consumer's heartbeat) and sees a stop only between reads. A read that went on until
        // the journal was exhausted kept a consumer catching up on a long backlog behind a
        // slow subscriber from saving — the purge then counted it expired — and `stop()`
        // waiting for the whole backlog. The next wait ends at once.
        conn.more = !all;
        Ok(Some(forwarded))
    }

    fn position(&self) -> Option<i64> {
        self.position
    }

    fn missed(&mut self) -> Vec<String> {
        if std::mem::take(&mut self.purged) {
            self.channel_list.to_vec()
        } else {
            Vec::new()
        }
    }

    /// Looks at `PRAGMA data_version` before and after sleeping `timeout` (the shell's pace:
    /// 1 ms while events flow, up to 10 ms when idle), on the blocking thread in one call —
    /// a precise sleep, without a round trip to the arbiter per look. The notifier's own
    /// writes cut it short.
    async fn wait(&mut self, conn: &mut SqliteConn, timeout: Duration) -> Result<bool> {
        if std::mem::take(&mut conn.more) {
            return Ok(true); // the last read left rows behind
        }
        if conn.version == i64::MIN {
            // No read yet (a named consumer waits for its first subscription before it reads):
            // watch from now. Compared with a version never read, every wait ended at once,
            // and the listener spun on the blocking pool until the first read. The shell
            // reads anyway once it may (nothing was read yet), so no commit is missed.
            conn.version = conn.call(|c| journal::data_version(c)).await?;
        }
        let seen = conn.version;
        let watch = conn.call(move |conn| {
            let deadline = Instant::now() + timeout;
            loop {
                if journal::data_version(conn)? != seen {
                    return Ok(true);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                std::thread::sleep(left);
            }
        });
        let woken = self.wake.wait(timeout);
        match select(pin!(watch), pin!(woken)).await {
            Either::Left((changed, _)) => changed,
            Either::Right((true, _)) => Ok(true),
            Either::Right((false, watch)) => watch.await,
        }
    }

    async fn check(&mut self, _: &mut SqliteConn, _: Duration) -> Result<()> {
        // A file, not a server: every wait reads PRAGMA data_version already.
        Ok(())
    }

    async fn save(
        &mut self,
        conn: &mut SqliteConn,
        consumer: &ConsumerParams,
        position: &i64,
    ) -> Result<Vec<String>> {
        let (consumer, channels, position) =
            (consumer.clone(), self.channel_list.clone(), *position);
        conn.call(move |conn| consumers::save_running(conn, &consumer, &channels, position))
            .await
    }

    fn final_save(&self) -> FinalSave<i64> {
        let path = self.path.clone();
        Box::new(move |name, position| {
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    consumers::save(&open(&path)?, &name, position).map(|_| ())
                })
                .await
                .map_err(|e| Error::db("saving the consumer position", e))?
            })
        })
    }

    async fn close(&mut self, conn: SqliteConn) {
        let _ = tokio::task::spawn_blocking(move || drop(conn)).await;
    }

    fn pace(&self) -> Pace {
        Pace {
            active: Duration::from_millis(1),
            idle: Duration::from_millis(10),
            stay_active: Duration::from_millis(500),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that has not read yet (a named consumer waiting for its first
    /// subscription) waits its time out when nothing commits, rather than ending every wait at
    /// once; a commit from another connection ends it.
    #[tokio::test]
    async fn a_wait_before_the_first_read_waits_for_a_commit() {
        let dir = std::env::temp_dir().join(format!(
            "sqlnotify-wait-before-read-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db.sqlite");
        let writer = rusqlite::Connection::open(&path).unwrap();
        writer
            .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .unwrap();
        let mut source = SqliteSource::new(path.clone(), Vec::new(), Wake::default());
        let mut conn = SqliteConn {
            conn: Arc::new(Mutex::new(crate::sqlite::open(&path).unwrap())),
            version: i64::MIN,
            more: false,
        };
        let waited = Instant::now();
        assert!(!source
            .wait(&mut conn, Duration::from_millis(100))
            .await
            .unwrap());
        assert!(waited.elapsed() >= Duration::from_millis(100));
        writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        assert!(source
            .wait(&mut conn, Duration::from_secs(30))
            .await
            .unwrap());
        drop((conn, writer));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lease_files_sit_next_to_the_database_and_differ_by_name() {
        let db = std::path::Path::new("/data/app.db");
        let a = lease_path(db, "mailer");
        assert_eq!(a.parent(), db.parent());
        assert!(
            a.to_string_lossy()
                .starts_with("/data/app.db.sqlnotify-mailer-"),
            "{a:?}"
        );
        assert_eq!(a, lease_path(db, "mailer"), "stable");
        assert_ne!(a, lease_path(db, "mailer2"));
        assert_ne!(lease_path(db, "a/b"), lease_path(db, "ab"));
        let odd = lease_path(db, "../../etc/x y");
        assert_eq!(odd.parent(), db.parent(), "{odd:?}");
    }
}
