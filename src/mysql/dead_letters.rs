//! MySQL's dead-letter table, `sqlnotify_dead_letters` in the URL's database: the SQL behind
//! [`DeadLetterStore`] (the contract and the row's life are in `crate::dead_letters`).
//!
//! Every call runs on the dialect's control connection (never the listener's). The table is
//! part of the install (`ddl::setup_statements`) and of the install script; a database
//! installed by an older version, or never installed, gets it from the first
//! [`record`](DeadLetterStore::record) (`CREATE TABLE IF NOT EXISTS` is atomic in MySQL: two
//! sessions creating it at once cannot collide). The other calls find no table as no rows and
//! create nothing.
//!
//! Text columns are `utf8mb4_bin`, so handler names and states compare exactly, as on the
//! other databases. Taking requested rows is one transaction that moves each candidate by its
//! primary key while it is still `requested` (see [`take_once`]): a second process taking at
//! the same time waits for such a row and then finds it taken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use mysql_async::prelude::*;
use mysql_async::{Conn, Params, Row, Value};

use super::catalog::db_err;
use super::ddl::{qualified, DEAD_LETTERS};
use super::Control;
use crate::dead_letters::{
    invalid_row, sort_taken, stored_counts, DeadLetter, DeadLetterCounts, DeadLetterStore, Failure,
    Retrying, StoredRow, Target,
};
use crate::error::{Error, Result};

/// Ids per statement when acting on a list of ids (MySQL allows 65,535 placeholders).
const IDS_PER_STATEMENT: usize = 1_000;

/// The columns a [`StoredRow`] is read from, in its order (times as Unix seconds).
const COLUMNS: &str = "`id`, `handler`, `channel`, `sequence`, `part`, `key`, `event`, `attempts`, \
     CAST(UNIX_TIMESTAMP(`first_failed`) AS DOUBLE), CAST(UNIX_TIMESTAMP(`last_failed`) AS DOUBLE), \
     `error`, `state`";

/// Creates the table in `database` if missing (one of `ddl::setup_statements`).
pub(crate) fn create_table_sql(database: &str) -> String {
    let text = "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin";
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
    `id` BIGINT NOT NULL AUTO_INCREMENT,
    `handler` VARCHAR(255) {text} NOT NULL,
    `channel` VARCHAR(255) {text} NOT NULL,
    `sequence` BIGINT NULL,
    `part` INT NOT NULL DEFAULT 0,
    `key` LONGTEXT {text} NOT NULL,
    `event` LONGTEXT {text} NOT NULL,
    `attempts` INT NOT NULL,
    `first_failed` TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    `last_failed` TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    `error` LONGTEXT {text} NOT NULL,
    `state` VARCHAR(16) {text} NOT NULL,
    PRIMARY KEY (`id`),
    UNIQUE KEY `sqlnotify_dead_letters_event` (`handler`, `sequence`, `part`),
    KEY `sqlnotify_dead_letters_handler_state` (`handler`, `state`)
) ENGINE=InnoDB",
        qualified(database, DEAD_LETTERS)
    )
}

/// The dead-letter table of one MySQL database.
pub(crate) struct MysqlDeadLetters {
    control: Arc<Control>,
    database: Arc<str>,
    /// Whether the table is known to exist (it is never dropped: `cleanup` keeps it).
    ready: Arc<AtomicBool>,
}

impl MysqlDeadLetters {
    pub(super) fn new(control: Arc<Control>, database: Arc<str>) -> Self {
        MysqlDeadLetters {
            control,
            database,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs `f` (given the table's qualified name) on the control connection once the table
    /// exists; when it does not, `create` creates it first, else the answer is `absent`
    /// without asking `f`.
    fn call<T, F>(&self, create: bool, absent: T, f: F) -> BoxFuture<'static, Result<T>>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut Conn, String) -> BoxFuture<'c, Result<T>> + Send + 'static,
    {
        let (database, ready) = (self.database.clone(), self.ready.clone());
        self.control.run(move |conn| {
            Box::pin(async move {
                if !ready.load(Ordering::Acquire) {
                    if !exists(conn, &database).await? {
                        if !create {
                            return Ok(absent);
                        }
                        conn.query_drop(create_table_sql(&database))
                            .await
                            .map_err(db_err(format!("creating {DEAD_LETTERS}")))?;
                    }
                    ready.store(true, Ordering::Release);
                }
                f(conn, qualified(&database, DEAD_LETTERS)).await
            })
        })
    }
}

async fn exists(conn: &mut Conn, database: &str) -> Result<bool> {
    let n: Option<i64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
            (database, DEAD_LETTERS),
        )
        .await
        .map_err(db_err(format!("looking for {DEAD_LETTERS}")))?;
    Ok(n.unwrap_or(0) > 0)
}

/// Column `i` of `row` as stored text (`""` for NULL; invalid UTF-8 replaced).
fn text(row: &mut Row, i: usize) -> String {
    match row.take::<Value, _>(i) {
        Some(Value::Bytes(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        Some(Value::NULL) | None => String::new(),
        Some(other) => other.as_sql(true),
    }
}

/// Column `i` of `row` as `T`; anything else is an error naming the row and column.
fn value<T: FromValue>(row: &mut Row, i: usize, id: i64, column: &str) -> Result<T> {
    match row.take_opt::<T, _>(i) {
        Some(Ok(v)) => Ok(v),
        _ => Err(invalid_row(
            DEAD_LETTERS,
            id,
            format_args!("has an unreadable {column}"),
        )),
    }
}

fn dead_letter(mut row: Row) -> Result<DeadLetter> {
    let id: i64 = value(&mut row, 0, 0, "id")?;
    StoredRow {
        id,
        handler: text(&mut row, 1),
        channel: text(&mut row, 2),
        sequence: value(&mut row, 3, id, "sequence")?,
        part: value(&mut row, 4, id, "part")?,
        key: text(&mut row, 5),
        event: text(&mut row, 6),
        attempts: value(&mut row, 7, id, "attempts")?,
        first_failed: value(&mut row, 8, id, "first_failed")?,
        last_failed: value(&mut row, 9, id, "last_failed")?,
        error: text(&mut row, 10),
        state: text(&mut row, 11),
    }
    .check(DEAD_LETTERS)
}

fn dead_letters(rows: Vec<Row>) -> Result<Vec<DeadLetter>> {
    let mut letters = rows
        .into_iter()
        .map(dead_letter)
        .collect::<Result<Vec<_>>>()?;
    letters.sort_by_key(|l| l.id);
    Ok(letters)
}

/// `?, ?, …` for `n` values.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

fn ids_params(ids: &[i64]) -> Params {
    Params::Positional(ids.iter().map(|&id| Value::from(id)).collect())
}

/// A count as the table's `INT` columns store it: counts beyond are kept at the maximum (one
/// past it fails the write under a strict `sql_mode` — for a last attempt, a dead letter never
/// stored and the event retried for ever).
fn int(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

async fn record(conn: &mut Conn, table: &str, f: Failure) -> Result<i64> {
    let context = || {
        format!(
            "recording a failure of handler {:?} in {DEAD_LETTERS}",
            f.handler
        )
    };
    let (attempts, state) = (int(f.attempts), f.state.as_str());
    if let Some(id) = f.id {
        conn.exec_drop(
            format!(
                "UPDATE {table} SET `attempts` = ?, `error` = ?, `state` = ?, \
                 `last_failed` = NOW(6) WHERE `id` = ?"
            ),
            (attempts, f.error.as_str(), state, id),
        )
        .await
        .map_err(db_err(context()))?;
        // MySQL counts changed rows only: an update that changed nothing still found it.
        if conn.affected_rows() > 0 {
            return Ok(id);
        }
        let found: Option<i64> = conn
            .exec_first(format!("SELECT `id` FROM {table} WHERE `id` = ?"), (id,))
            .await
            .map_err(db_err(context()))?;
        if found.is_some() {
            return Ok(id);
        }
        // The row is gone (deleted by hand): recorded afresh below.
    }
    let conflict = if f.sequence.is_some() {
        // LAST_INSERT_ID(`id`): the existing row's id is what the statement reports.
        "ON DUPLICATE KEY UPDATE `id` = LAST_INSERT_ID(`id`), `channel` = VALUES(`channel`), \
         `key` = VALUES(`key`), `event` = VALUES(`event`), `attempts` = VALUES(`attempts`), \
         `error` = VALUES(`error`), `state` = VALUES(`state`), `last_failed` = VALUES(`last_failed`)"
    } else {
        // Without a sequence nothing identifies the event across processes: a new row.
        ""
    };
    conn.exec_drop(
        format!(
            "INSERT INTO {table} (`handler`, `channel`, `sequence`, `part`, `key`, `event`, \
             `attempts`, `first_failed`, `last_failed`, `error`, `state`) \
             VALUES (?, ?, ?, ?, ?, ?, ?, NOW(6), NOW(6), ?, ?) {conflict}"
        ),
        (
            f.handler.as_str(),
            f.channel.as_str(),
            f.sequence,
            f.part,
            f.key.as_str(),
            f.event.as_str(),
            attempts,
            f.error.as_str(),
            state,
        ),
    )
    .await
    .map_err(db_err(context()))?;
    match conn.last_insert_id().filter(|&id| id > 0) {
        Some(id) => i64::try_from(id)
            .map_err(|_| invalid_row(DEAD_LETTERS, i64::MAX, "has an id beyond BIGINT")),
        None => Err(Error::db(
            context(),
            std::io::Error::other("the server reported no id for the row"),
        )),
    }
}

/// Runs `sql` — a statement on the rows `WHERE {target}` — and returns how many it changed.
async fn on_target(conn: &mut Conn, sql: &str, target: Target, doing: &str) -> Result<u64> {
    let context = || format!("{doing} in {DEAD_LETTERS}");
    match target {
        Target::Handler(handler) => {
            conn.exec_drop(sql.replace("{target}", "`handler` = ?"), (handler,))
                .await
                .map_err(db_err(context()))?;
            Ok(conn.affected_rows())
        }
        Target::Ids(ids) => {
            let mut total = 0;
            for chunk in ids.chunks(IDS_PER_STATEMENT) {
                let condition = format!("`id` IN ({})", placeholders(chunk.len()));
                conn.exec_drop(sql.replace("{target}", &condition), ids_params(chunk))
                    .await
                    .map_err(db_err(context()))?;
                total += conn.affected_rows();
            }
            Ok(total)
        }
    }
}

/// MySQL's error for a transaction it rolled back to break a deadlock.
const ER_LOCK_DEADLOCK: u16 = 1213;
/// Attempts at taking requested rows when MySQL keeps choosing this transaction to break a
/// deadlock (with another statement on the table's index; takers do not deadlock each other).
const TAKE_ATTEMPTS: u32 = 5;

async fn take_requested(
    conn: &mut Conn,
    table: &str,
    handler: &str,
    limit: u32,
) -> Result<Vec<DeadLetter>> {
    let mut attempt = 1;
    loop {
        match take_once(conn, table, handler, limit).await {
            Err(mysql_async::Error::Server(e))
                if e.code == ER_LOCK_DEADLOCK && attempt < TAKE_ATTEMPTS =>
            {
                log::debug!("sqlnotify: taking requested dead letters: deadlock, again ({e})");
                attempt += 1;
            }
            Err(e) => {
                return Err(Error::db(
                    format!(
                        "taking the dead letters of handler {handler:?} requested for retry \
                         from {DEAD_LETTERS}"
                    ),
                    e,
                ))
            }
            Ok(rows) => {
                let (letters, unreadable) = sort_taken(
                    DEAD_LETTERS,
                    rows.into_iter().map(|row| {
                        let id = row.get::<Option<i64>, _>(0).flatten().unwrap_or_default();
                        (id, dead_letter(row))
                    }),
                );
                for (id, error) in unreadable {
                    conn.exec_drop(
                        format!("UPDATE {table} SET `state` = 'dead', `error` = ? WHERE `id` = ?"),
                        (error, id),
                    )
                    .await
                    .map_err(|e| {
                        Error::db(
                            format!("marking dead letter {id} of {DEAD_LETTERS} dead"),
                            e,
                        )
                    })?;
                }
                return Ok(letters);
            }
        }
    }
}

/// One transaction taking requested rows: the candidates are read without locks, then each is
/// moved by its primary key only while it is still `requested` (MySQL reads the latest
/// version for that) — so two takers never take one row twice. Rows are locked one at a
/// time, by primary key, in id order, and no range of the `(handler, state)` index is locked:
/// `SELECT … FOR UPDATE` over that index took next-key locks whose gaps the other taker's
/// moved rows had to be inserted into, and two takers deadlocked.
async fn take_once(
    conn: &mut Conn,
    table: &str,
    handler: &str,
    limit: u32,
) -> std::result::Result<Vec<Row>, mysql_async::Error> {
    let mut tx = conn.start_transaction(Default::default()).await?;
    let candidates: Vec<i64> = tx
        .exec(
            format!(
                "SELECT `id` FROM {table} WHERE `handler` = ? AND `state` = 'requested' \
                 ORDER BY `id` LIMIT ?"
            ),
            (handler, limit),
        )
        .await?;
    let mut taken = Vec::with_capacity(candidates.len());
    for id in candidates {
        tx.exec_drop(
            format!(
                "UPDATE {table} SET `state` = 'redelivering' WHERE `id` = ? AND `state` = 'requested'"
            ),
            (id,),
        )
        .await?;
        if tx.affected_rows() == 1 {
            taken.push(id);
        }
    }
    if taken.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    // Locking read: the rows as this transaction left them (they are its own, locked).
    let rows: Vec<Row> = tx
        .exec(
            format!(
                "SELECT {COLUMNS} FROM {table} WHERE `id` IN ({}) ORDER BY `id` FOR UPDATE",
                placeholders(taken.len())
            ),
            ids_params(&taken),
        )
        .await?;
    tx.commit().await?;
    Ok(rows)
}

impl DeadLetterStore for MysqlDeadLetters {
    fn record(&self, failure: Failure) -> BoxFuture<'static, Result<i64>> {
        self.call(true, 0, move |conn, table| {
            Box::pin(async move { record(conn, &table, failure).await })
        })
    }

    fn resolve(&self, id: i64) -> BoxFuture<'static, Result<()>> {
        self.call(false, (), move |conn, table| {
            Box::pin(async move {
                conn.exec_drop(format!("DELETE FROM {table} WHERE `id` = ?"), (id,))
                    .await
                    .map_err(db_err(format!(
                        "deleting dead letter {id} from {DEAD_LETTERS}"
                    )))
            })
        })
    }

    fn in_state(
        &self,
        handler: String,
        state: &'static str,
    ) -> BoxFuture<'static, Result<Vec<Retrying>>> {
        self.call(false, Vec::new(), move |conn, table| {
            Box::pin(async move {
                let rows: Vec<Row> = conn
                    .exec(
                        format!(
                            "SELECT `id`, `sequence`, `part`, `attempts` FROM {table} \
                             WHERE `handler` = ? AND `state` = ? \
                               AND `sequence` IS NOT NULL ORDER BY `id`"
                        ),
                        (handler.as_str(), state),
                    )
                    .await
                    .map_err(db_err(format!(
                        "reading the {state} events of handler {handler:?} from {DEAD_LETTERS}"
                    )))?;
                rows.into_iter()
                    .map(|mut row| {
                        let id: i64 = value(&mut row, 0, 0, "id")?;
                        Retrying::checked(
                            DEAD_LETTERS,
                            id,
                            value(&mut row, 1, id, "sequence")?,
                            value(&mut row, 2, id, "part")?,
                            value(&mut row, 3, id, "attempts")?,
                        )
                    })
                    .collect()
            })
        })
    }

    fn resolve_event(
        &self,
        handler: String,
        sequence: i64,
        part: u32,
    ) -> BoxFuture<'static, Result<u64>> {
        self.call(false, 0, move |conn, table| {
            Box::pin(async move {
                conn.exec_drop(
                    format!(
                        "DELETE FROM {table} WHERE `handler` = ? AND `sequence` = ? \
                         AND `part` = ? AND `state` IN ('retrying', 'dead')"
                    ),
                    (handler.as_str(), sequence, part),
                )
                .await
                .map_err(db_err(format!(
                    "deleting the row of handler {handler:?} at sequence {sequence} from \
                     {DEAD_LETTERS}"
                )))?;
                Ok(conn.affected_rows())
            })
        })
    }

    fn take_requested(
        &self,
        handler: String,
        limit: u32,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter>>> {
        self.call(false, Vec::new(), move |conn, table| {
            Box::pin(async move { take_requested(conn, &table, &handler, limit).await })
        })
    }

    fn reset_redelivering(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        self.call(false, 0, move |conn, table| {
            Box::pin(async move {
                let sql = format!(
                    "UPDATE {table} SET `state` = 'requested' \
                     WHERE `state` = 'redelivering' AND {{target}}"
                );
                on_target(
                    conn,
                    &sql,
                    target,
                    "handing back dead letters being delivered again",
                )
                .await
            })
        })
    }

    fn list(
        &self,
        handler: Option<String>,
        limit: Option<u64>,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter>>> {
        self.call(false, Vec::new(), move |conn, table| {
            Box::pin(async move {
                // MySQL has no "no limit": the largest BIGINT UNSIGNED is its documented stand-in.
                let limit = limit.unwrap_or(u64::MAX);
                let rows: Vec<Row> = conn
                    .exec(
                        format!(
                            "SELECT {COLUMNS} FROM {table} WHERE (? IS NULL OR `handler` = ?) \
                             ORDER BY `id` LIMIT ?"
                        ),
                        (handler.as_deref(), handler.as_deref(), limit),
                    )
                    .await
                    .map_err(db_err(format!(
                        "listing the dead letters in {DEAD_LETTERS}"
                    )))?;
                dead_letters(rows)
            })
        })
    }

    fn get(&self, id: i64) -> BoxFuture<'static, Result<Option<DeadLetter>>> {
        self.call(false, None, move |conn, table| {
            Box::pin(async move {
                let row: Option<Row> = conn
                    .exec_first(
                        format!("SELECT {COLUMNS} FROM {table} WHERE `id` = ?"),
                        (id,),
                    )
                    .await
                    .map_err(db_err(format!(
                        "reading dead letter {id} from {DEAD_LETTERS}"
                    )))?;
                row.map(dead_letter).transpose()
            })
        })
    }

    fn request_retry(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        self.call(false, 0, move |conn, table| {
            Box::pin(async move {
                let sql = format!(
                    "UPDATE {table} SET `state` = 'requested' WHERE `state` = 'dead' AND {{target}}"
                );
                on_target(conn, &sql, target, "requesting a retry of dead letters").await
            })
        })
    }

    fn discard(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        self.call(false, 0, move |conn, table| {
            Box::pin(async move {
                let sql = format!("DELETE FROM {table} WHERE `state` = 'dead' AND {{target}}");
                on_target(conn, &sql, target, "discarding dead letters").await
            })
        })
    }

    fn counts(&self, handler: Option<String>) -> BoxFuture<'static, Result<DeadLetterCounts>> {
        self.call(false, DeadLetterCounts::default(), move |conn, table| {
            Box::pin(async move {
                let rows: Vec<(Vec<u8>, i64)> = conn
                    .exec(
                        format!(
                            "SELECT `state`, COUNT(*) FROM {table} \
                             WHERE (? IS NULL OR `handler` = ?) GROUP BY `state`"
                        ),
                        (handler.as_deref(), handler.as_deref()),
                    )
                    .await
                    .map_err(db_err(format!(
                        "counting the dead letters in {DEAD_LETTERS}"
                    )))?;
                stored_counts(
                    DEAD_LETTERS,
                    rows.into_iter()
                        .map(|(state, n)| (String::from_utf8_lossy(&state).into_owned(), n)),
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_compares_text_exactly_and_is_indexed_for_its_lookups() {
        let sql = create_table_sql("app");
        assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS `app`.`sqlnotify_dead_letters` ("));
        assert!(sql.contains("`state` VARCHAR(16) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"));
        assert!(sql
            .contains("UNIQUE KEY `sqlnotify_dead_letters_event` (`handler`, `sequence`, `part`)"));
        assert!(sql.contains("KEY `sqlnotify_dead_letters_handler_state` (`handler`, `state`)"));
        assert_eq!(placeholders(3), "?, ?, ?");
    }
}
