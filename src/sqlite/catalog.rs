//! Reading SQLite's schema (`pragma_table_info`) and keeping sqlnotify's catalog: installing,
//! verifying and removing triggers. Synchronous; the dialect runs these on blocking threads.
//!
//! Installation runs in one `BEGIN IMMEDIATE` transaction, which SQLite serialises with every
//! other writer, so instances starting together do not race; waiting for it is bounded by the
//! install timeout (see `in_write_transaction`). Drift detection compares the
//! generated trigger text with the one recorded at install time; unchanged triggers are left
//! alone.

use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::{ddl, BUSY_TIMEOUT};
use crate::dialect::{InstallOptions, Installed};
use crate::error::{Error, Result};
use crate::lockwait::{Blocked, LockWait};
use crate::resolve::{ColumnInfo, ResolvedWatch, TableInfo};

pub(crate) fn db_err(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Error {
    let context = context.into();
    move |e| Error::db(context, e)
}

/// Reads one table. Only the `main` schema can be watched: triggers on an attached database
/// would write to a journal the other connections do not see.
pub(crate) fn describe_table(conn: &Connection, schema: &str, table: &str) -> Result<TableInfo> {
    if schema != "main" {
        return Err(Error::UnknownSchema {
            schema: schema.to_string(),
        });
    }
    let context = || format!("reading the columns of {table}");
    let kind: Option<String> = conn
        .query_row(
            "SELECT type FROM main.sqlite_master WHERE name = ?1 AND type IN ('table', 'view')",
            [table],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err(context()))?;
    if kind.as_deref() != Some("table") {
        return Err(Error::UnknownTable {
            schema: schema.to_string(),
            table: table.to_string(),
        });
    }
    let mut stmt = conn
        .prepare("SELECT name, pk, type FROM pragma_table_info(?1, 'main') ORDER BY cid")
        .map_err(db_err(context()))?;
    let columns = stmt
        .query_map([table], |r| {
            let pk: i64 = r.get(1)?;
            Ok(ColumnInfo {
                name: r.get(0)?,
                pk_position: (pk > 0).then(|| (pk - 1) as usize),
                has_equality: true,
                equality_schema: None,
                data_type: r.get(2)?,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(db_err(context()))?;
    Ok(TableInfo {
        schema: schema.to_string(),
        table: table.to_string(),
        columns,
        in_hierarchy: false,
    })
}

fn catalog_exists(conn: &Connection) -> Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM main.sqlite_master WHERE type = 'table' AND name = 'sqlnotify_catalog'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .map_err(db_err("looking for the sqlnotify catalog"))
}

fn installed_state(conn: &Connection, w: &ResolvedWatch, catalog: bool) -> Result<Installed> {
    if !catalog {
        return Ok(Installed::Missing);
    }
    let name = &w.channel.name;
    let recorded: Option<String> = conn
        .query_row(
            "SELECT definition FROM sqlnotify_catalog WHERE channel = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err(format!("reading the catalog entry of {name}")))?;
    let Some(recorded) = recorded else {
        return Ok(Installed::Missing);
    };
    let trigger: Option<String> = conn
        .query_row(
            "SELECT tbl_name FROM main.sqlite_master WHERE type = 'trigger' AND name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err(format!("looking for trigger {name}")))?;
    Ok(Installed::Recorded {
        same: recorded == ddl::trigger_sql(w),
        trigger: trigger.as_deref() == Some(w.channel.table.as_str()),
    })
}

/// Switches the database to WAL mode (persistent), so readers never block the application's
/// writers. A no-op when it already is.
///
/// The switch needs the database to itself, and SQLite answers "busy" at once — without
/// waiting the busy timeout — when another connection is switching or reading at that moment
/// (several instances starting together on a new file): retried with backoff for up to
/// `timeout`.
pub(crate) fn enable_wal(conn: &Connection, timeout: std::time::Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let backoff = crate::backoff::Backoff::default();
    let mut attempt = 0;
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                attempt += 1;
                std::thread::sleep(
                    backoff
                        .delay(attempt)
                        .min(std::time::Duration::from_millis(100)),
                );
            }
            other => break other.map_err(db_err("switching the database to WAL mode"))?,
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        log::warn!(
            "sqlnotify: the database stays in {mode} journal mode; listeners may make writers wait"
        );
    }
    Ok(())
}

/// Whether the journal has its `tx` column (journals of older versions lack it).
pub(crate) fn journal_has_tx(conn: &Connection) -> Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM pragma_table_info('sqlnotify_journal', 'main') WHERE name = 'tx'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .map_err(db_err("reading the columns of sqlnotify_journal"))
}

/// Installs (or, with `manage_triggers` off, verifies) `watches`, atomically; returns the
/// channels whose triggers it created or replaced.
pub(crate) fn install(
    conn: &mut Connection,
    watches: &[ResolvedWatch],
    options: InstallOptions,
) -> Result<Vec<String>> {
    check_trigger_names(watches)?;
    if !options.manage_triggers {
        return verify(conn, watches).map(|()| Vec::new());
    }
    enable_wal(conn, options.timeout)?;
    in_write_transaction(conn, "installing triggers", options.timeout, |tx| {
        tx.execute_batch(&ddl::setup_sql())
            .map_err(db_err("creating the sqlnotify tables"))?;
        if !journal_has_tx(tx)? {
            tx.execute_batch(ddl::JOURNAL_TX_UPGRADE)
                .map_err(db_err("adding the tx column to sqlnotify_journal"))?;
        }
        if options.cleanup_on_start {
            let removed = drop_all(tx)?;
            log::info!("sqlnotify: cleanup_on_start removed {removed} installed watches");
        }
        let mut installed = Vec::new();
        for w in watches {
            check_case_conflict(tx, w)?;
        }
        for w in watches {
            let name = &w.channel.name;
            let Some(action) = installed_state(tx, w, true)?.plan(w, options)? else {
                continue;
            };
            log::info!("sqlnotify: {action} {name} on {}", w.channel.table);
            let sql = format!(
                "{}{};\n{}",
                ddl::drop_sql(name),
                ddl::trigger_sql(w),
                ddl::catalog_upsert_sql(w)
            );
            tx.execute_batch(&sql)
                .map_err(db_err(format!("installing trigger {name}")))?;
            installed.push(name.clone());
        }
        Ok(installed)
    })
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Runs `f` in a write transaction (`BEGIN IMMEDIATE`, which SQLite serialises with every
/// other writer) and commits it, or rolls it back when `f` fails.
///
/// While another connection holds a write transaction, `BEGIN IMMEDIATE` waits in attempts of
/// [`LOCK_ATTEMPT`](crate::lockwait::LOCK_ATTEMPT) (the busy handler's wait), logging each
/// wait, until `timeout`: then [`Error::LockTimeout`] names the database file (SQLite does not
/// say which process holds the lock). Waiting holds no lock, so the application's writers are
/// never held up by it.
fn in_write_transaction<T>(
    conn: &mut Connection,
    doing: &'static str,
    timeout: Duration,
    f: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    let mut wait = LockWait::new(doing, timeout);
    loop {
        conn.busy_timeout(wait.attempt_budget())
            .map_err(db_err("setting the busy timeout"))?;
        let begun = conn.execute_batch("BEGIN IMMEDIATE");
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(db_err("setting the busy timeout"))?;
        match begun {
            Ok(()) => break,
            Err(e) if is_busy(&e) => {
                let object = format!(
                    "the SQLite database {}",
                    conn.path().filter(|p| !p.is_empty()).unwrap_or("(unnamed)")
                );
                let delay = wait.note(Blocked {
                    object,
                    holder_pids: Vec::new(),
                })?;
                std::thread::sleep(delay);
            }
            Err(e) => {
                return Err(Error::db(
                    format!("starting a write transaction ({doing})"),
                    e,
                ))
            }
        }
    }
    let outcome = f(conn).and_then(|value| {
        conn.execute_batch("COMMIT")
            .map_err(db_err(format!("committing ({doing})")))?;
        Ok(value)
    });
    if outcome.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    outcome
}

fn describe(w: &ResolvedWatch) -> String {
    let c = &w.channel;
    format!("{}.{} {}", c.schema, c.table, c.operation)
}

/// SQLite trigger names are case-insensitive: two channels differing only in case (labels
/// `A` and `a`) would share one trigger, and installing the second would drop the first.
fn check_trigger_names(watches: &[ResolvedWatch]) -> Result<()> {
    for (i, a) in watches.iter().enumerate() {
        for b in &watches[i + 1..] {
            if a.channel.name.eq_ignore_ascii_case(&b.channel.name) {
                return Err(Error::DuplicateWatch {
                    channel: b.channel.name.clone(),
                    first: describe(a),
                    second: describe(b),
                });
            }
        }
    }
    Ok(())
}

/// Refuses a watch whose channel differs only in case from one in the catalog — another
/// notifier's (two applications whose labels differ only in case): the trigger names would
/// be one, so installing it would drop that notifier's trigger, and that notifier's next start
/// this one's ([`check_trigger_names`] sees only the watches of one notifier).
fn check_case_conflict(conn: &Connection, w: &ResolvedWatch) -> Result<()> {
    let name = &w.channel.name;
    let other: Option<(String, String, String)> = conn
        .query_row(
            "SELECT channel, table_name, operation FROM sqlnotify_catalog \
             WHERE channel = ?1 COLLATE NOCASE AND channel <> ?1 COLLATE BINARY LIMIT 1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(db_err(format!("reading the catalog entries near {name}")))?;
    match other {
        Some((installed, table, operation)) => Err(Error::ChannelCaseConflict {
            channel: name.clone(),
            watch: describe(w),
            installed,
            installed_watch: format!("main.{table} {}", operation.to_ascii_uppercase()),
        }),
        None => Ok(()),
    }
}

fn verify(conn: &Connection, watches: &[ResolvedWatch]) -> Result<()> {
    let catalog = catalog_exists(conn)?;
    for w in watches {
        installed_state(conn, w, catalog)?.verify(w)?;
    }
    Ok(())
}

/// Drops every trigger recorded in the catalog, plus any trigger that writes to the journal,
/// and empties the catalog.
fn drop_all(conn: &Connection) -> Result<u64> {
    let mut stmt = conn
        .prepare(
            "SELECT name FROM main.sqlite_master WHERE type = 'trigger' \
             AND (name IN (SELECT channel FROM sqlnotify_catalog) OR sql LIKE '%INSERT INTO sqlnotify_journal%')",
        )
        .map_err(db_err("listing sqlnotify triggers"))?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(db_err("listing sqlnotify triggers"))?;
    let mut sql: String = names.iter().map(|n| ddl::drop_sql(n)).collect();
    sql.push_str("DELETE FROM sqlnotify_catalog;");
    conn.execute_batch(&sql)
        .map_err(db_err("removing sqlnotify triggers"))?;
    Ok(names.len() as u64)
}

/// Removes every sqlnotify trigger in the database.
pub(crate) fn cleanup_all(conn: &mut Connection, timeout: Duration) -> Result<u64> {
    if !catalog_exists(conn)? {
        return Ok(0);
    }
    in_write_transaction(conn, "removing triggers", timeout, drop_all)
}

/// Removes the triggers of `channels` and their catalog entries.
pub(crate) fn uninstall(
    conn: &mut Connection,
    channels: &[String],
    timeout: Duration,
) -> Result<()> {
    if !catalog_exists(conn)? {
        return Ok(());
    }
    in_write_transaction(conn, "removing triggers", timeout, |tx| {
        for channel in channels {
            tx.execute_batch(&ddl::drop_sql(channel))
                .map_err(db_err(format!("removing trigger {channel}")))?;
            tx.execute(
                "DELETE FROM sqlnotify_catalog WHERE channel = ?1",
                params![channel],
            )
            .map_err(db_err(format!("removing the catalog entry of {channel}")))?;
        }
        Ok(())
    })
}
