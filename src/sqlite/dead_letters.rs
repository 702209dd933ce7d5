//! SQLite's dead-letter table, `sqlnotify_dead_letters`: the SQL behind [`DeadLetterStore`]
//! (the contract and the row's life are in `crate::dead_letters`).
//!
//! Every call runs on the dialect's control connection, on a blocking thread (never the
//! listener's connection). The table is part of the install (`ddl::setup_sql`) and of the
//! install script; a database installed by an older version, or never installed, gets it from
//! the first [`record`](DeadLetterStore::record), in a `BEGIN IMMEDIATE` transaction (SQLite
//! runs one writer at a time, so two processes creating it cannot collide). The other calls
//! find no table as no rows and create nothing.
//!
//! Times are Unix seconds (REAL), like the other sqlnotify tables. SQLite stores whatever a
//! column is given, so every value is read as it is stored and checked.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use super::catalog::db_err;
use super::ddl::NOW;
use super::{returning_one, run_blocking};
use crate::dead_letters::{
    invalid_row, sort_taken, stored_counts, DeadLetter, DeadLetterCounts, DeadLetterStore, Failure,
    Retrying, StoredRow, Target,
};
use crate::error::Result;

/// The table's name.
pub(crate) const TABLE: &str = "sqlnotify_dead_letters";

/// The columns a [`StoredRow`] is read from, in its order.
const COLUMNS: &str = "id, handler, channel, sequence, part, \"key\", event, attempts, \
     first_failed, last_failed, error, state";

/// Creates the table and its index if missing (part of `ddl::setup_sql`).
pub(crate) fn setup_sql() -> &'static str {
    "CREATE TABLE IF NOT EXISTS sqlnotify_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    handler TEXT NOT NULL,
    channel TEXT NOT NULL,
    sequence INTEGER,
    part INTEGER NOT NULL DEFAULT 0,
    \"key\" TEXT NOT NULL,
    event TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_failed REAL NOT NULL,
    last_failed REAL NOT NULL,
    error TEXT NOT NULL,
    state TEXT NOT NULL,
    UNIQUE (handler, sequence, part)
);
CREATE INDEX IF NOT EXISTS sqlnotify_dead_letters_handler_state
    ON sqlnotify_dead_letters (handler, state);"
}

/// The dead-letter table of one SQLite database.
pub(crate) struct SqliteDeadLetters {
    control: Arc<Mutex<Option<Connection>>>,
    path: PathBuf,
    /// Whether the table is known to exist (it is never dropped: `cleanup` keeps it).
    ready: Arc<AtomicBool>,
}

impl SqliteDeadLetters {
    pub fn new(control: Arc<Mutex<Option<Connection>>>, path: PathBuf) -> Self {
        SqliteDeadLetters {
            control,
            path,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs `f` on the control connection once the table exists; when it does not, `create`
    /// creates it first, else the answer is `absent` without asking `f`.
    fn call<T, F>(&self, create: bool, absent: T, f: F) -> BoxFuture<'static, Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let ready = self.ready.clone();
        run_blocking(self.control.clone(), self.path.clone(), move |conn| {
            if !ready.load(Ordering::Acquire) {
                if !exists(conn)? {
                    if !create {
                        return Ok(absent);
                    }
                    let context = || format!("creating {TABLE}");
                    let tx = conn
                        .transaction_with_behavior(TransactionBehavior::Immediate)
                        .map_err(db_err(context()))?;
                    tx.execute_batch(setup_sql()).map_err(db_err(context()))?;
                    tx.commit().map_err(db_err(context()))?;
                }
                ready.store(true, Ordering::Release);
            }
            f(conn)
        })
    }
}

fn exists(conn: &Connection) -> Result<bool> {
    conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [TABLE],
        |r| r.get(0),
    )
    .map_err(db_err(format!("looking for {TABLE}")))
}

/// A stored value as text, whatever its type (`None` for NULL).
fn text(value: Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::Integer(i) => Some(i.to_string()),
        Value::Real(r) => Some(r.to_string()),
        Value::Text(t) => Some(t),
        Value::Blob(b) => Some(String::from_utf8_lossy(&b).into_owned()),
    }
}

/// A stored value as a number (`None` for anything else).
fn real(value: &Value) -> Option<f64> {
    match *value {
        Value::Integer(i) => Some(i as f64),
        Value::Real(r) => Some(r),
        _ => None,
    }
}

/// A stored value as an integer; anything else is an error naming the row and column.
fn integer(id: i64, column: &str, value: Value) -> Result<i64> {
    match value {
        Value::Integer(i) => Ok(i),
        other => Err(invalid_row(
            TABLE,
            id,
            format_args!("has {column} {:?}, not an integer", text(other)),
        )),
    }
}

fn stored(row: &Row<'_>) -> rusqlite::Result<(i64, Vec<Value>)> {
    let id = row.get(0)?;
    let values = (1..12)
        .map(|i| row.get(i))
        .collect::<rusqlite::Result<_>>()?;
    Ok((id, values))
}

fn dead_letter((id, values): (i64, Vec<Value>)) -> Result<DeadLetter> {
    let mut values = values.into_iter();
    let mut next = || values.next().unwrap_or(Value::Null);
    let handler = text(next()).unwrap_or_default();
    let channel = text(next()).unwrap_or_default();
    let sequence = match next() {
        Value::Null => None,
        other => Some(integer(id, "sequence", other)?),
    };
    let part = integer(id, "part", next())?;
    let key = text(next()).unwrap_or_default();
    let event = text(next()).unwrap_or_default();
    let attempts = integer(id, "attempts", next())?;
    let first_failed = real(&next());
    let last_failed = real(&next());
    StoredRow {
        id,
        handler,
        channel,
        sequence,
        part,
        key,
        event,
        attempts,
        first_failed,
        last_failed,
        error: text(next()).unwrap_or_default(),
        state: text(next()).unwrap_or_default(),
    }
    .check(TABLE)
}

/// The rows `sql` selects (with `params`), as dead letters in id order.
fn query(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    context: &str,
) -> Result<Vec<DeadLetter>> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err(context))?;
    let rows = stmt
        .query_map(params, stored)
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(db_err(context))?;
    let mut letters = rows
        .into_iter()
        .map(dead_letter)
        .collect::<Result<Vec<_>>>()?;
    letters.sort_by_key(|l| l.id);
    Ok(letters)
}

fn record(conn: &mut Connection, f: Failure) -> Result<i64> {
    let context = format!("recording a failure of handler {:?} in {TABLE}", f.handler);
    let state = f.state.as_str();
    if let Some(id) = f.id {
        let updated = conn
            .prepare_cached(&format!(
                "UPDATE {TABLE} SET attempts = ?2, error = ?3, state = ?4, last_failed = {NOW} \
                 WHERE id = ?1"
            ))
            .and_then(|mut s| s.execute(params![id, f.attempts, f.error, state]))
            .map_err(db_err(&context))?;
        if updated > 0 {
            return Ok(id);
        }
        // The row is gone (deleted by hand): recorded afresh below.
    }
    let conflict = if f.sequence.is_some() {
        "ON CONFLICT (handler, sequence, part) DO UPDATE SET channel = excluded.channel, \
         \"key\" = excluded.\"key\", event = excluded.event, attempts = excluded.attempts, \
         error = excluded.error, state = excluded.state, last_failed = excluded.last_failed"
    } else {
        // Without a sequence nothing identifies the event across processes: a new row.
        ""
    };
    conn.prepare_cached(&format!(
        "INSERT INTO {TABLE} (handler, channel, sequence, part, \"key\", event, attempts, \
         first_failed, last_failed, error, state) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, {NOW}, {NOW}, ?8, ?9) {conflict} RETURNING id"
    ))
    .and_then(|mut s| {
        returning_one(
            &mut s,
            params![
                f.handler, f.channel, f.sequence, f.part, f.key, f.event, f.attempts, f.error,
                state
            ],
            |r| r.get(0),
        )
    })
    .and_then(|id| id.ok_or(rusqlite::Error::QueryReturnedNoRows))
    .map_err(db_err(context))
}

/// Runs `sql` — a statement on the rows `WHERE {target}` — and returns how many it changed.
fn on_target(conn: &Connection, sql: &str, target: &Target, doing: &str) -> Result<u64> {
    let (condition, param) = match target {
        Target::Ids(ids) if ids.is_empty() => return Ok(0),
        Target::Ids(ids) => (
            "id IN (SELECT value FROM json_each(?1))",
            serde_json::to_string(ids).expect("integers serialize"),
        ),
        Target::Handler(handler) => ("handler = ?1", handler.clone()),
    };
    let n = conn
        .execute(&sql.replace("{target}", condition), [param])
        .map_err(db_err(format!("{doing} in {TABLE}")))?;
    Ok(n as u64)
}

impl DeadLetterStore for SqliteDeadLetters {
    fn record(&self, failure: Failure) -> BoxFuture<'static, Result<i64>> {
        self.call(true, 0, move |conn| record(conn, failure))
    }

    fn resolve(&self, id: i64) -> BoxFuture<'static, Result<()>> {
        self.call(false, (), move |conn| {
            conn.execute(&format!("DELETE FROM {TABLE} WHERE id = ?1"), [id])
                .map_err(db_err(format!("deleting dead letter {id} from {TABLE}")))?;
            Ok(())
        })
    }

    fn in_state(
        &self,
        handler: String,
        state: &'static str,
    ) -> BoxFuture<'static, Result<Vec<Retrying>>> {
        self.call(false, Vec::new(), move |conn| {
            let context = format!("reading the {state} events of handler {handler:?} from {TABLE}");
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT id, sequence, part, attempts FROM {TABLE} \
                     WHERE handler = ?1 AND state = ?2 AND sequence IS NOT NULL ORDER BY id"
                ))
                .map_err(db_err(&context))?;
            let rows = stmt
                .query_map(params![handler, state], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .and_then(|rows| {
                    rows.collect::<rusqlite::Result<Vec<(i64, Value, Value, Value)>>>()
                })
                .map_err(db_err(&context))?;
            rows.into_iter()
                .map(|(id, sequence, part, attempts)| {
                    Retrying::checked(
                        TABLE,
                        id,
                        integer(id, "sequence", sequence)?,
                        integer(id, "part", part)?,
                        integer(id, "attempts", attempts)?,
                    )
                })
                .collect()
        })
    }

    fn resolve_event(
        &self,
        handler: String,
        sequence: i64,
        part: u32,
    ) -> BoxFuture<'static, Result<u64>> {
        self.call(false, 0, move |conn| {
            let n = conn
                .execute(
                    &format!(
                        "DELETE FROM {TABLE} WHERE handler = ?1 AND sequence = ?2 AND part = ?3 \
                         AND state IN ('retrying', 'dead')"
                    ),
                    params![handler, sequence, part],
                )
                .map_err(db_err(format!(
                    "deleting the row of handler {handler:?} at sequence {sequence} from {TABLE}"
                )))?;
            Ok(n as u64)
        })
    }

    fn take_requested(
        &self,
        handler: String,
        limit: u32,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter>>> {
        self.call(false, Vec::new(), move |conn| {
            let context = format!(
                "taking the dead letters of handler {handler:?} requested for retry from {TABLE}"
            );
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err(&context))?;
            let taken = {
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "UPDATE {TABLE} SET state = 'redelivering' WHERE id IN (
                           SELECT id FROM {TABLE} WHERE handler = ?1 AND state = 'requested'
                            ORDER BY id LIMIT ?2)
                         RETURNING {COLUMNS}"
                    ))
                    .map_err(db_err(&context))?;
                stmt.query_map(params![handler, limit], stored)
                    .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(db_err(&context))?
            };
            let (letters, unreadable) = sort_taken(
                TABLE,
                taken.into_iter().map(|row| (row.0, dead_letter(row))),
            );
            for (id, error) in unreadable {
                tx.execute(
                    &format!("UPDATE {TABLE} SET state = 'dead', error = ?2 WHERE id = ?1"),
                    params![id, error],
                )
                .map_err(db_err(&context))?;
            }
            tx.commit().map_err(db_err(&context))?;
            Ok(letters)
        })
    }

    fn reset_redelivering(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        self.call(false, 0, move |conn| {
            on_target(
                conn,
                &format!(
                    "UPDATE {TABLE} SET state = 'requested' \
                     WHERE state = 'redelivering' AND {{target}}"
                ),
                &target,
                "handing back dead letters being delivered again",
            )
        })
    }

    fn list(
        &self,
        handler: Option<String>,
        limit: Option<u64>,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter>>> {
        self.call(false, Vec::new(), move |conn| {
            // A negative LIMIT is no limit in SQLite.
            let limit = limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
            query(
                conn,
                &format!(
                    "SELECT {COLUMNS} FROM {TABLE} WHERE (?1 IS NULL OR handler = ?1) \
                     ORDER BY id LIMIT ?2"
                ),
                params![handler, limit],
                &format!("listing the dead letters in {TABLE}"),
            )
        })
    }

    fn get(&self, id: i64) -> BoxFuture<'static, Result<Option<DeadLetter>>> {
        self.call(false, None, move |conn| {
            let context = format!("reading dead letter {id} from {TABLE}");
            let row = conn
                .prepare_cached(&format!("SELECT {COLUMNS} FROM {TABLE} WHERE id = ?1"))
                .and_then(|mut s| s.query_row([id], stored).optional())
                .map_err(db_err(context))?;
            row.map(dead_letter).transpose()
        })
    }

    fn request_retry(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        self.call(false, 0, move |conn| {
            on_target(
                conn,
                &format!(
                    "UPDATE {TABLE} SET state = 'requested' WHERE state = 'dead' AND {{target}}"
                ),
                &target,
                "requesting a retry of dead letters",
            )
        })
    }

    fn discard(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        self.call(false, 0, move |conn| {
            on_target(
                conn,
                &format!("DELETE FROM {TABLE} WHERE state = 'dead' AND {{target}}"),
                &target,
                "discarding dead letters",
            )
        })
    }

    fn counts(&self, handler: Option<String>) -> BoxFuture<'static, Result<DeadLetterCounts>> {
        self.call(false, DeadLetterCounts::default(), move |conn| {
            let context = format!("counting the dead letters in {TABLE}");
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT state, count(*) FROM {TABLE} WHERE (?1 IS NULL OR handler = ?1) \
                     GROUP BY state"
                ))
                .map_err(db_err(&context))?;
            let rows = stmt
                .query_map([&handler], |r| {
                    Ok((r.get::<_, Value>(0)?, r.get::<_, i64>(1)?))
                })
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(db_err(&context))?;
            stored_counts(
                TABLE,
                rows.into_iter()
                    .map(|(state, n)| (text(state).unwrap_or_default(), n)),
            )
        })
    }
}
