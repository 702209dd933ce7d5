//! SQLite's record of named consumers (`sqlnotify_consumers`): registering, saving positions,
//! the journal purge that respects them, backlog, listing and dropping. Synchronous helpers
//! over one connection; the contract is in `crate::consumer`.
//!
//! A consumer's position is a journal id (stored in the `cursor` column): a row is unread by it
//! when `id > cursor` and it is on one of the consumer's `channels` (a JSON array; NULL or
//! unreadable: every channel).
//! SQLite runs one write transaction at a time, and every step that must not interleave — a
//! purge batch with the record of what it took from inactive consumers, a consumer taking up
//! again with what it missed — is one `BEGIN IMMEDIATE` transaction, so a consumer coming
//! back either protects its rows from the purge or sees what the purge recorded.

use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::catalog::db_err;
use super::ddl::NOW;
use super::journal;
use super::returning_one;
use crate::consumer::{
    add_missed, missed_channels, stored_channels, unix_time, Backlog, ConsumerInfo, ConsumerParams,
    ConsumerPosition, ConsumerState,
};
use crate::error::{Error, Result};

/// Journal rows deleted per transaction when trimming, so the write lock is held briefly.
const PURGE_BATCH: i64 = 2_000;

/// The columns registered consumers need, with their definitions, as added to a table of an
/// older version.
const COLUMNS: [(&str, &str); 4] = [
    ("state", "TEXT NOT NULL DEFAULT 'active'"),
    ("channels", "TEXT"),
    ("expire_after", "REAL"),
    ("missed", "TEXT"),
];

/// "Consumer `c` reads journal row `j`'s channel" (SQL): `channels` is a JSON array, read
/// defensively — anything else means every channel.
const READS_CHANNEL: &str = "(CASE WHEN json_valid(c.channels) \
     THEN (CASE WHEN json_type(c.channels) = 'array' \
                THEN j.channel IN (SELECT value FROM json_each(c.channels)) ELSE 1 END) \
     ELSE 1 END)";

/// Adds the columns an older `sqlnotify_consumers` lacks; returns whether the table exists
/// (sqlnotify installed).
pub(crate) fn ensure(conn: &mut Connection) -> Result<bool> {
    let missing = |conn: &Connection| -> Result<Option<Vec<&'static str>>> {
        let mut stmt = conn
            .prepare("SELECT name FROM pragma_table_info('sqlnotify_consumers', 'main')")
            .map_err(db_err("reading the columns of sqlnotify_consumers"))?;
        let have = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(db_err("reading the columns of sqlnotify_consumers"))?;
        if have.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            COLUMNS
                .iter()
                .filter(|(name, _)| !have.iter().any(|h| h == name))
                .map(|(name, _)| *name)
                .collect(),
        ))
    };
    match missing(conn)? {
        None => return Ok(false),
        Some(cols) if cols.is_empty() => return Ok(true),
        Some(_) => {}
    }
    // Look again inside the write transaction: another process may be upgrading too.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err("upgrading sqlnotify_consumers"))?;
    for name in missing(&tx)?.unwrap_or_default() {
        let definition = COLUMNS.iter().find(|(n, _)| *n == name).expect("known").1;
        tx.execute_batch(&format!(
            "ALTER TABLE sqlnotify_consumers ADD COLUMN {name} {definition}"
        ))
        .map_err(db_err("upgrading sqlnotify_consumers"))?;
    }
    tx.commit()
        .map_err(db_err("upgrading sqlnotify_consumers"))?;
    Ok(true)
}

fn channels_json(channels: &[String]) -> String {
    serde_json::to_string(channels).expect("strings serialize")
}

/// Registers consumer `consumer` reading `channels`: a known one takes up again (active,
/// what it missed taken and cleared) at its saved position; a new one starts at the journal's
/// head. Returns the position and the channels on which it missed purged rows.
pub(crate) fn register(
    conn: &mut Connection,
    consumer: &ConsumerParams,
    channels: &[String],
) -> Result<(i64, Vec<String>)> {
    let name = &consumer.name;
    let context = || format!("registering consumer {name:?}");
    ensure(conn)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err(context()))?;
    let known: Option<(i64, Option<String>)> = tx
        .query_row(
            "SELECT cursor, missed FROM sqlnotify_consumers WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(db_err(context()))?;
    let expire = consumer.expire_after.map(|d| d.as_secs_f64());
    let registered = match known {
        Some((position, missed)) => {
            tx.execute(
                &format!(
                    "UPDATE sqlnotify_consumers SET state = 'active', missed = NULL, channels = ?2, \
                     expire_after = ?3, updated_at = {NOW} WHERE name = ?1"
                ),
                params![name, channels_json(channels), expire],
            )
            .map_err(db_err(context()))?;
            (position, missed_channels(missed.as_deref(), channels))
        }
        None => {
            let head = journal::head(&tx)?;
            tx.execute(
                &format!(
                    "INSERT INTO sqlnotify_consumers (name, cursor, updated_at, state, channels, expire_after) \
                     VALUES (?1, ?2, {NOW}, 'active', ?3, ?4)"
                ),
                params![name, head, channels_json(channels), expire],
            )
            .map_err(db_err(context()))?;
            (head, Vec::new())
        }
    };
    tx.commit().map_err(db_err(context()))?;
    Ok(registered)
}

/// Saves consumer `name`'s position (never moving it backwards) and marks it alive; returns
/// whether it is still registered and active (`None`: its row is gone). Does not change its
/// state.
pub(crate) fn save(conn: &Connection, name: &str, position: i64) -> Result<Option<bool>> {
    conn.prepare_cached(&format!(
        "UPDATE sqlnotify_consumers SET cursor = max(cursor, ?2), updated_at = {NOW} \
         WHERE name = ?1 RETURNING state, missed IS NULL"
    ))
    .and_then(|mut s| {
        returning_one(&mut s, params![name, position], |r| {
            let state: String = r.get(0)?;
            let clear: bool = r.get(1)?;
            Ok(ConsumerState::parse(&state) == ConsumerState::Active && clear)
        })
    })
    .map_err(db_err(format!("saving the position of consumer {name:?}")))
}

/// A running listener's save: as [`save`], and a consumer dropped or expired while it runs
/// (or whose row was deleted) registers again. Returns the channels on which rows it had not
/// read were purged meanwhile (every channel when its row was deleted: nothing says what was
/// purged then).
pub(crate) fn save_running(
    conn: &mut Connection,
    consumer: &ConsumerParams,
    channels: &[String],
    position: i64,
) -> Result<Vec<String>> {
    match save(conn, &consumer.name, position)? {
        Some(true) => Ok(Vec::new()),
        Some(false) => Ok(register(conn, consumer, channels)?.1),
        None => {
            conn.execute(
                &format!(
                    "INSERT INTO sqlnotify_consumers (name, cursor, updated_at, state, channels, expire_after) \
                     VALUES (?1, ?2, {NOW}, 'active', ?3, ?4) ON CONFLICT (name) DO NOTHING"
                ),
                params![
                    consumer.name,
                    position,
                    channels_json(channels),
                    consumer.expire_after.map(|d| d.as_secs_f64())
                ],
            )
            .map_err(db_err(format!("registering consumer {:?}", consumer.name)))?;
            Ok(channels.to_vec())
        }
    }
}

/// The backlog of consumer row `c` (a correlated subquery).
fn backlog_sql() -> String {
    format!("(SELECT count(*) FROM sqlnotify_journal j WHERE j.id > c.cursor AND {READS_CHANNEL})")
}

/// Journal rows after consumer `name`'s position on its channels, and the oldest one's age;
/// `None` if not registered. (Registration upgraded the table: no [`ensure`] here, this runs
/// every few seconds.)
pub(crate) fn backlog(conn: &mut Connection, name: &str) -> Result<Option<Backlog>> {
    conn.query_row(
        &format!(
            "SELECT {}, (SELECT {NOW} - j.created_at FROM sqlnotify_journal j \
                         WHERE j.id > c.cursor AND {READS_CHANNEL} ORDER BY j.id LIMIT 1) \
             FROM sqlnotify_consumers c WHERE c.name = ?1",
            backlog_sql()
        ),
        [name],
        |r| Ok(Backlog::new(r.get(0)?, r.get(1)?)),
    )
    .optional()
    .map_err(db_err(format!("counting the backlog of consumer {name:?}")))
}

/// Every registered consumer.
pub(crate) fn list(conn: &mut Connection) -> Result<Vec<ConsumerInfo>> {
    if !ensure(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn
        .prepare(&format!(
            "SELECT c.name, c.state, c.cursor, c.updated_at, c.channels, c.expire_after, {} \
             FROM sqlnotify_consumers c ORDER BY c.name",
            backlog_sql()
        ))
        .map_err(db_err("listing the consumers"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok(ConsumerInfo {
                name: r.get(0)?,
                state: ConsumerState::parse(&r.get::<_, String>(1)?),
                position: ConsumerPosition::JournalId(r.get(2)?),
                last_active: unix_time(r.get(3)?),
                channels: stored_channels(r.get::<_, Option<String>>(4)?.as_deref()),
                expire_after: r
                    .get::<_, Option<f64>>(5)?
                    .and_then(|s| Duration::try_from_secs_f64(s).ok()),
                backlog: r.get::<_, i64>(6)?.max(0) as u64,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(db_err("listing the consumers"))?;
    Ok(rows)
}

/// Marks consumer `name` dropped.
pub(crate) fn drop_consumer(conn: &mut Connection, name: &str) -> Result<()> {
    if !ensure(conn)? {
        return Err(Error::UnknownConsumer { name: name.into() });
    }
    let n = conn
        .execute(
            "UPDATE sqlnotify_consumers SET state = 'dropped' WHERE name = ?1",
            [name],
        )
        .map_err(db_err(format!("dropping consumer {name:?}")))?;
    if n == 0 {
        return Err(Error::UnknownConsumer { name: name.into() });
    }
    log::info!("sqlnotify: consumer {name:?} dropped");
    Ok(())
}

/// Expires consumers away longer than their expiry, then deletes journal rows older than
/// `retention` that no active consumer still has to read, recording them on the inactive
/// consumers that had not read them and the highest id deleted in `sqlnotify_trimmed`.
/// Returns how many journal rows were deleted.
///
/// What there is to do is looked for with reads (a reader holds no writer up in WAL mode): the
/// write lock (`BEGIN IMMEDIATE`) is taken only when a consumer is due to expire or a row is
/// to be deleted, so a purge with nothing to do — most ticks — never makes an application
/// writer wait. (Before, every tick took it for the expiry's `UPDATE`, and a writer with a
/// busy timeout of 0 that came then got `SQLITE_BUSY`.)
pub(crate) fn purge(conn: &mut Connection, retention: Duration) -> Result<u64> {
    if !ensure(conn)? {
        return Ok(0);
    }
    let context = "trimming the journal";
    let due = format!(
        "state NOT IN ('dropped', 'expired') AND expire_after IS NOT NULL \
         AND updated_at < {NOW} - expire_after"
    );
    let any_due: bool = conn
        .prepare_cached(&format!(
            "SELECT EXISTS (SELECT 1 FROM sqlnotify_consumers WHERE {due})"
        ))
        .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
        .map_err(db_err(context))?;
    if any_due {
        // The same condition again under the write lock: a consumer may have saved since.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err(context))?;
        let expired = {
            let mut stmt = tx
                .prepare(&format!(
                    "UPDATE sqlnotify_consumers SET state = 'expired' WHERE {due} RETURNING name"
                ))
                .map_err(db_err(context))?;
            let names = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(db_err(context))?;
            names
        };
        tx.commit().map_err(db_err(context))?;
        for name in expired {
            log::info!("sqlnotify: consumer {name:?} expired (away longer than its expiry)");
        }
    }
    let deletable = format!(
        "j.created_at < {NOW} - ?1
         AND NOT EXISTS (SELECT 1 FROM sqlnotify_consumers c
                          WHERE c.state NOT IN ('dropped', 'expired') AND j.id > c.cursor
                            AND {READS_CHANNEL})"
    );
    // The rows to delete are looked for outside the write transaction: that search can read
    // the whole journal — no index on `created_at`, and an active consumer far behind protects
    // every row it must still read — and under the write lock it kept the application's
    // writers waiting (1.4 s for a million rows). The delete checks the same conditions again
    // on those rows only.
    let candidates =
        format!("SELECT j.id FROM sqlnotify_journal j WHERE {deletable} ORDER BY j.id LIMIT ?2");
    let delete = format!(
        "DELETE FROM sqlnotify_journal WHERE id IN (
            SELECT j.id FROM sqlnotify_journal j
             WHERE j.id IN (SELECT value FROM json_each(?3)) AND {deletable})
         RETURNING id, channel"
    );
    let mut total = 0u64;
    loop {
        let found: Vec<i64> = conn
            .prepare_cached(&candidates)
            .and_then(|mut stmt| {
                stmt.query_map(params![retention.as_secs_f64(), PURGE_BATCH], |r| r.get(0))?
                    .collect()
            })
            .map_err(db_err(context))?;
        if found.is_empty() {
            return Ok(total);
        }
        let ids = serde_json::to_string(&found).expect("a list of integers");
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err(context))?;
        let inactive = {
            let mut stmt = tx
                .prepare(
                    "SELECT name, cursor, channels, missed FROM sqlnotify_consumers \
                     WHERE state IN ('dropped', 'expired')",
                )
                .map_err(db_err(context))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                })
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(db_err(context))?;
            rows
        };
        let deleted = {
            let mut stmt = tx.prepare(&delete).map_err(db_err(context))?;
            let rows = stmt
                .query_map(params![retention.as_secs_f64(), PURGE_BATCH, ids], |r| {
                    Ok((r.get::<_, i64>(0)?, text(r, 1)?))
                })
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(db_err(context))?;
            rows
        };
        if let Some(upto) = deleted.iter().map(|(id, _)| *id).max() {
            // For streams that resume (`journal::replay`): what they lacked may be gone. In
            // this transaction, so a replay sees the rows gone and the record together.
            tx.execute_batch(super::ddl::TRIMMED_TABLE)
                .map_err(db_err(context))?;
            tx.execute(
                "INSERT INTO sqlnotify_trimmed (id, upto) VALUES (1, ?1) \
                 ON CONFLICT (id) DO UPDATE SET upto = max(upto, excluded.upto)",
                [upto],
            )
            .map_err(db_err(context))?;
        }
        for (name, position, channels, missed) in inactive {
            let channels = stored_channels(channels.as_deref());
            let missed = missed_channels(missed.as_deref(), channels.as_deref().unwrap_or(&[]));
            let unread = deleted
                .iter()
                .filter(|(id, _)| *id > position)
                .map(|(_, channel)| channel);
            if let Some(now_missed) = add_missed(&missed, channels.as_deref(), unread) {
                tx.execute(
                    "UPDATE sqlnotify_consumers SET missed = ?2 WHERE name = ?1",
                    params![name, channels_json(&now_missed)],
                )
                .map_err(db_err(context))?;
            }
        }
        tx.commit().map_err(db_err(context))?;
        total += deleted.len() as u64;
        if (found.len() as i64) < PURGE_BATCH {
            return Ok(total);
        }
    }
}

/// A TEXT column read lossily (an application may have stored text that is not UTF-8).
fn text(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<String> {
    let value = row.get_ref(index)?;
    Ok(match value.as_bytes() {
        Ok(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Err(_) => String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database file of the test's own, in a directory removed on drop.
    struct File(std::path::PathBuf);

    impl File {
        fn new(name: &str) -> File {
            let dir = std::env::temp_dir().join(format!(
                "sqlnotify-consumers-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            File(dir)
        }

        fn open(&self) -> Connection {
            let conn = Connection::open(self.0.join("db.sqlite")).unwrap();
            conn.busy_timeout(Duration::ZERO).unwrap();
            conn
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// With nothing to delete and no consumer due to expire, the purge takes no write lock:
    /// it runs (and returns) while an application transaction holds it, with a busy timeout
    /// of 0. Once there is work, it needs the lock — the same purge then fails busy.
    #[test]
    fn a_purge_with_nothing_to_do_takes_no_write_lock() {
        let file = File::new("idle-purge");
        let app = file.open();
        app.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; {}",
            crate::sqlite::ddl::setup_sql()
        ))
        .unwrap();
        // A recent row (kept by an hour's retention), a consumer not yet due to expire.
        app.execute_batch(&format!(
            "INSERT INTO sqlnotify_journal (channel, payload, created_at) VALUES ('c', '{{}}', {NOW});
             INSERT INTO sqlnotify_consumers (name, cursor, updated_at, state, channels, expire_after)
             VALUES ('billing', 1, {NOW}, 'active', '[\"c\"]', 3600)"
        ))
        .unwrap();
        let mut purger = file.open();
        app.execute_batch("BEGIN IMMEDIATE").unwrap();
        for _ in 0..3 {
            assert_eq!(purge(&mut purger, Duration::from_secs(3600)).unwrap(), 0);
        }
        // Work to do: a consumer due to expire.
        app.execute_batch("UPDATE sqlnotify_consumers SET updated_at = 0; COMMIT; BEGIN IMMEDIATE")
            .unwrap();
        let busy = purge(&mut purger, Duration::from_secs(3600)).unwrap_err();
        assert!(busy.to_string().contains("locked"), "{busy}");
        app.execute_batch("COMMIT").unwrap();
        assert_eq!(purge(&mut purger, Duration::from_secs(3600)).unwrap(), 0);
        let state: String = app
            .query_row("SELECT state FROM sqlnotify_consumers", [], |r| r.get(0))
            .unwrap();
        assert_eq!(state, "expired");
        // Work to do: a row past the retention (the expired consumer protects nothing).
        app.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert!(purge(&mut purger, Duration::ZERO).is_err());
        app.execute_batch("COMMIT").unwrap();
        assert_eq!(purge(&mut purger, Duration::ZERO).unwrap(), 1);
    }

    /// A save whose commit fails is an error: on a database in rollback-journal mode (WAL
    /// could not be enabled), a reader holding its shared lock keeps the update from
    /// committing. Read with `query_row`, the update committed only when its statement was
    /// reset on drop, and that error was dropped: the save answered "active" for a position
    /// that was never stored.
    #[test]
    fn a_save_that_could_not_commit_is_an_error() {
        let file = File::new("save-busy");
        let app = file.open();
        app.execute_batch(&crate::sqlite::ddl::setup_sql()).unwrap();
        let mode: String = app
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        app.execute_batch(&format!(
            "INSERT INTO sqlnotify_consumers (name, cursor, updated_at, state, channels) \
             VALUES ('billing', 1, {NOW}, 'active', '[\"c\"]')"
        ))
        .unwrap();
        let cursor = |conn: &Connection| -> i64 {
            conn.query_row("SELECT cursor FROM sqlnotify_consumers", [], |r| r.get(0))
                .unwrap()
        };
        let saver = file.open();
        app.execute_batch("BEGIN").unwrap();
        assert_eq!(cursor(&app), 1);
        let saved = save(&saver, "billing", 5);
        assert!(
            saved.is_err(),
            "saved while a reader held the lock: {saved:?}"
        );
        app.execute_batch("COMMIT").unwrap();
        assert_eq!(cursor(&app), 1);
        assert_eq!(save(&saver, "billing", 5).unwrap(), Some(true));
        assert_eq!(cursor(&app), 5);
        assert_eq!(save(&saver, "nobody", 5).unwrap(), None);
    }
}
