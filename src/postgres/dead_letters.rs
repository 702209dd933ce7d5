//! PostgreSQL's dead-letter table, `sqlnotify.dead_letters`: the SQL behind
//! [`DeadLetterStore`] (the contract and the row's life are in `crate::dead_letters`).
//!
//! Every call runs on the control connection (never the listener's). The table is part of
//! the install (`ddl::setup_sql`) and of the install script; a database installed by an older
//! version, or never installed, gets it from the first [`record`](DeadLetterStore::record) —
//! under the install advisory lock, because two sessions running `CREATE TABLE IF NOT EXISTS`
//! at once can still collide on the catalog. The other calls find no table as no rows and
//! create nothing, so listing dead letters never changes a database.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row};

use super::control::Control;
use super::ddl::{INSTALL_LOCK, SCHEMA};
use crate::dead_letters::{
    invalid_row, sort_taken, stored_counts, DeadLetter, DeadLetterCounts, DeadLetterStore, Failure,
    Retrying, StoredRow, Target,
};
use crate::error::{Error, Result};
use crate::sql::{quote_ident, quote_literal};

/// The table, as errors name it.
const TABLE: &str = "sqlnotify.dead_letters";

/// The columns a [`StoredRow`] is read from, in its order (times as Unix seconds).
const COLUMNS: &str = "id, handler, channel, sequence, part::int8, key, event, attempts::int8, \
     extract(epoch FROM first_failed)::float8, extract(epoch FROM last_failed)::float8, error, state";

/// Creates the table and its index if missing. Part of `ddl::setup_sql` (under the install
/// lock, at every start, and in the install script); the index is created in a `DO` block
/// only when absent, since `CREATE INDEX IF NOT EXISTS` locks the table before finding there
/// is nothing to do.
pub(crate) fn setup_sql() -> String {
    let s = quote_ident(SCHEMA);
    format!(
        "CREATE TABLE IF NOT EXISTS {s}.dead_letters (
    id bigserial PRIMARY KEY,
    handler text NOT NULL,
    channel text NOT NULL,
    sequence bigint,
    part integer NOT NULL DEFAULT 0,
    key text NOT NULL,
    event text NOT NULL,
    attempts integer NOT NULL,
    first_failed timestamptz NOT NULL DEFAULT now(),
    last_failed timestamptz NOT NULL DEFAULT now(),
    error text NOT NULL,
    state text NOT NULL,
    UNIQUE (handler, sequence, part)
);
DO $sqn_dead_letters$
BEGIN
  IF pg_catalog.to_regclass({index}) IS NULL THEN
    CREATE INDEX dead_letters_handler_state_idx ON {s}.dead_letters (handler, state);
  END IF;
END
$sqn_dead_letters$;",
        index = quote_literal(&format!("{s}.dead_letters_handler_state_idx")),
    )
}

/// What the first `record` runs when the table is missing: one implicit transaction (a
/// multi-statement simple query) holding the install lock, creating the schema when it is
/// missing and then the table.
fn create_sql() -> String {
    format!(
        "SELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK});
DO $sqn_schema$
BEGIN
  IF pg_catalog.to_regnamespace({schema}) IS NULL THEN
    CREATE SCHEMA {s};
  END IF;
END
$sqn_schema$;
{table}",
        s = quote_ident(SCHEMA),
        schema = quote_literal(&quote_ident(SCHEMA)),
        table = setup_sql(),
    )
}

/// The dead-letter table of one PostgreSQL database.
pub(crate) struct PgDeadLetters {
    control: Arc<Control>,
    /// Whether the table is known to exist (it is never dropped: `cleanup` keeps it).
    ready: Arc<AtomicBool>,
}

impl PgDeadLetters {
    pub fn new(control: Arc<Control>) -> Self {
        PgDeadLetters {
            control,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs `f` on the control connection once the table exists; when it does not, `create`
    /// creates it first, else the answer is `absent` without asking `f`.
    fn call<T, F>(&self, create: bool, absent: T, f: F) -> BoxFuture<'static, Result<T>>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c Client) -> BoxFuture<'c, Result<T>> + Send + 'static,
    {
        let (control, ready) = (self.control.clone(), self.ready.clone());
        Box::pin(async move {
            let client = control.client().await?;
            if !ready.load(Ordering::Acquire) {
                if !exists(&client).await? {
                    if !create {
                        return Ok(absent);
                    }
                    let creator =
                        Control::connect(control.config(), "creating dead letters").await?;
                    creator
                        .batch_execute(&create_sql())
                        .await
                        .map_err(|e| Error::db(format!("creating {TABLE}"), e))?;
                }
                ready.store(true, Ordering::Release);
            }
            f(&client).await
        })
    }
}

async fn exists(client: &Client) -> Result<bool> {
    Ok(client
        .query_typed_one(
            "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
            &[(&format!("{}.dead_letters", quote_ident(SCHEMA)), Type::TEXT)],
        )
        .await
        .map_err(|e| Error::db(format!("looking for {TABLE}"), e))?
        .get(0))
}

fn table() -> String {
    format!("{}.dead_letters", quote_ident(SCHEMA))
}

/// The dead letter `row` holds. Every column is read with `try_get`: a value the driver
/// cannot convert (a NULL, once someone let a column hold one) is an error naming the row,
/// which a taker marks dead (`sort_taken`) instead of failing its whole batch.
fn dead_letter(row: &Row) -> Result<DeadLetter> {
    let id = get(row, 0, 0)?;
    StoredRow {
        id,
        handler: get(row, 1, id)?,
        channel: get(row, 2, id)?,
        sequence: get(row, 3, id)?,
        part: get(row, 4, id)?,
        key: get(row, 5, id)?,
        event: get(row, 6, id)?,
        attempts: get(row, 7, id)?,
        first_failed: get(row, 8, id)?,
        last_failed: get(row, 9, id)?,
        error: get(row, 10, id)?,
        state: get(row, 11, id)?,
    }
    .check(TABLE)
}

/// Column `i` of a [`COLUMNS`] row (dead letter `id`), or an error naming it.
fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize, id: i64) -> Result<T> {
    row.try_get(i).map_err(|_| {
        let column = COLUMNS.split(", ").nth(i).unwrap_or("a column");
        invalid_row(TABLE, id, format_args!("has an unreadable {column}"))
    })
}

/// Rows as dead letters, in id order (oldest first).
fn dead_letters(rows: &[Row]) -> Result<Vec<DeadLetter>> {
    let mut letters = rows.iter().map(dead_letter).collect::<Result<Vec<_>>>()?;
    letters.sort_by_key(|l| l.id);
    Ok(letters)
}

/// A count as the table's `integer` columns store it (counts beyond are kept at the maximum).
fn int4(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

async fn record(client: &Client, f: Failure) -> Result<i64> {
    let t = table();
    let context = || format!("recording a failure of handler {:?} in {TABLE}", f.handler);
    let (attempts, state) = (int4(f.attempts), f.state.as_str());
    if let Some(id) = f.id {
        let sql = format!(
            "UPDATE {t} SET attempts = $2, error = $3, state = $4, last_failed = now()
              WHERE id = $1 RETURNING id"
        );
        let row = client
            .query_typed_opt(
                &sql,
                &[
                    (&id, Type::INT8),
                    (&attempts, Type::INT4),
                    (&f.error, Type::TEXT),
                    (&state, Type::TEXT),
                ],
            )
            .await
            .map_err(|e| Error::db(context(), e))?;
        if let Some(row) = row {
            return Ok(row.get(0));
        }
        // The row is gone (deleted by hand): recorded afresh below.
    }
    let conflict = if f.sequence.is_some() {
        "ON CONFLICT (handler, sequence, part) DO UPDATE SET channel = EXCLUDED.channel,
                key = EXCLUDED.key, event = EXCLUDED.event, attempts = EXCLUDED.attempts,
                error = EXCLUDED.error, state = EXCLUDED.state, last_failed = EXCLUDED.last_failed"
    } else {
        // Without a sequence nothing identifies the event across processes: a new row.
        ""
    };
    let sql = format!(
        "INSERT INTO {t} (handler, channel, sequence, part, key, event, attempts, first_failed,
                          last_failed, error, state)
         VALUES ($1, $2, $3, $4, $5, $6, $7, now(), now(), $8, $9) {conflict} RETURNING id"
    );
    let part = int4(f.part);
    let params: [(&(dyn ToSql + Sync), Type); 9] = [
        (&f.handler, Type::TEXT),
        (&f.channel, Type::TEXT),
        (&f.sequence, Type::INT8),
        (&part, Type::INT4),
        (&f.key, Type::TEXT),
        (&f.event, Type::TEXT),
        (&attempts, Type::INT4),
        (&f.error, Type::TEXT),
        (&state, Type::TEXT),
    ];
    Ok(client
        .query_typed_one(&sql, &params)
        .await
        .map_err(|e| Error::db(context(), e))?
        .get(0))
}

/// The condition selecting `target`'s rows, with its parameter as `$1`.
fn target_sql(target: &Target) -> &'static str {
    match target {
        Target::Ids(_) => "id = ANY($1)",
        Target::Handler(_) => "handler = $1",
    }
}

/// Runs `sql` (a statement whose `$1` is the target, see [`target_sql`]) and returns how many
/// rows it changed.
async fn on_target(client: &Client, sql: &str, target: &Target, doing: &str) -> Result<u64> {
    let context = || format!("{doing} in {TABLE}");
    match target {
        Target::Ids(ids) if ids.is_empty() => Ok(0),
        Target::Ids(ids) => client.execute_typed(sql, &[(ids, Type::INT8_ARRAY)]).await,
        Target::Handler(handler) => client.execute_typed(sql, &[(handler, Type::TEXT)]).await,
    }
    .map_err(|e| Error::db(context(), e))
}

impl DeadLetterStore for PgDeadLetters {
    fn record(&self, failure: Failure) -> BoxFuture<'static, Result<i64>> {
        self.call(true, 0, move |client| Box::pin(record(client, failure)))
    }

    fn resolve(&self, id: i64) -> BoxFuture<'static, Result<()>> {
        self.call(false, (), move |client| {
            Box::pin(async move {
                client
                    .execute_typed(
                        &format!("DELETE FROM {} WHERE id = $1", table()),
                        &[(&id, Type::INT8)],
                    )
                    .await
                    .map_err(|e| Error::db(format!("deleting dead letter {id} from {TABLE}"), e))?;
                Ok(())
            })
        })
    }

    fn in_state(
        &self,
        handler: String,
        state: &'static str,
    ) -> BoxFuture<'static, Result<Vec<Retrying>>> {
        self.call(false, Vec::new(), move |client| {
            Box::pin(async move {
                let sql = format!(
                    "SELECT id, sequence, part::int8, attempts::int8 FROM {}
                      WHERE handler = $1 AND state = $2 AND sequence IS NOT NULL
                      ORDER BY id",
                    table()
                );
                let rows = client
                    .query_typed(&sql, &[(&handler, Type::TEXT), (&state, Type::TEXT)])
                    .await
                    .map_err(|e| {
                        Error::db(
                            format!(
                                "reading the {state} events of handler {handler:?} from {TABLE}"
                            ),
                            e,
                        )
                    })?;
                rows.iter()
                    .map(|r| Retrying::checked(TABLE, r.get(0), r.get(1), r.get(2), r.get(3)))
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
        self.call(false, 0, move |client| {
            Box::pin(async move {
                let sql = format!(
                    "DELETE FROM {} WHERE handler = $1 AND sequence = $2 AND part = $3
                        AND state IN ('retrying', 'dead')",
                    table()
                );
                client
                    .execute_typed(
                        &sql,
                        &[
                            (&handler, Type::TEXT),
                            (&sequence, Type::INT8),
                            (&int4(part), Type::INT4),
                        ],
                    )
                    .await
                    .map_err(|e| {
                        Error::db(
                            format!(
                                "deleting the row of handler {handler:?} at sequence {sequence} \
                                 from {TABLE}"
                            ),
                            e,
                        )
                    })
            })
        })
    }

    fn take_requested(
        &self,
        handler: String,
        limit: u32,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter>>> {
        self.call(false, Vec::new(), move |client| {
            Box::pin(async move {
                // SKIP LOCKED: two processes taking at once (a failover) never take one row
                // twice, and neither waits for the other.
                let t = table();
                let sql = format!(
                    "UPDATE {t} SET state = 'redelivering'
                      WHERE state = 'requested' AND id IN (
                            SELECT id FROM {t} WHERE handler = $1 AND state = 'requested'
                             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING {COLUMNS}"
                );
                let rows = client
                    .query_typed(
                        &sql,
                        &[(&handler, Type::TEXT), (&i64::from(limit), Type::INT8)],
                    )
                    .await
                    .map_err(|e| {
                        Error::db(
                            format!(
                                "taking the dead letters of handler {handler:?} requested for \
                                 retry from {TABLE}"
                            ),
                            e,
                        )
                    })?;
                let (letters, unreadable) = sort_taken(
                    TABLE,
                    rows.iter()
                        .map(|r| (r.try_get(0).unwrap_or_default(), dead_letter(r))),
                );
                for (id, error) in unreadable {
                    client
                        .query_typed(
                            &format!("UPDATE {t} SET state = 'dead', error = $2 WHERE id = $1"),
                            &[(&id, Type::INT8), (&error, Type::TEXT)],
                        )
                        .await
                        .map_err(|e| {
                            Error::db(format!("marking dead letter {id} of {TABLE} dead"), e)
                        })?;
                }
                Ok(letters)
            })
        })
    }

    fn reset_redelivering(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        self.call(false, 0, move |client| {
            Box::pin(async move {
                let sql = format!(
                    "UPDATE {} SET state = 'requested' WHERE state = 'redelivering' AND {}",
                    table(),
                    target_sql(&target)
                );
                on_target(
                    client,
                    &sql,
                    &target,
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
        self.call(false, Vec::new(), move |client| {
            Box::pin(async move {
                let sql = format!(
                    "SELECT {COLUMNS} FROM {} WHERE ($1::text IS NULL OR handler = $1)
                      ORDER BY id LIMIT $2",
                    table()
                );
                let limit = limit.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
                let rows = client
                    .query_typed(&sql, &[(&handler, Type::TEXT), (&limit, Type::INT8)])
                    .await
                    .map_err(|e| Error::db(format!("listing the dead letters in {TABLE}"), e))?;
                dead_letters(&rows)
            })
        })
    }

    fn get(&self, id: i64) -> BoxFuture<'static, Result<Option<DeadLetter>>> {
        self.call(false, None, move |client| {
            Box::pin(async move {
                let sql = format!("SELECT {COLUMNS} FROM {} WHERE id = $1", table());
                let row = client
                    .query_typed_opt(&sql, &[(&id, Type::INT8)])
                    .await
                    .map_err(|e| Error::db(format!("reading dead letter {id} from {TABLE}"), e))?;
                row.as_ref().map(dead_letter).transpose()
            })
        })
    }

    fn request_retry(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        self.call(false, 0, move |client| {
            Box::pin(async move {
                let sql = format!(
                    "UPDATE {} SET state = 'requested' WHERE state = 'dead' AND {}",
                    table(),
                    target_sql(&target)
                );
                on_target(client, &sql, &target, "requesting a retry of dead letters").await
            })
        })
    }

    fn discard(&self, target: Target) -> BoxFuture<'static, Result<u64>> {
        self.call(false, 0, move |client| {
            Box::pin(async move {
                let sql = format!(
                    "DELETE FROM {} WHERE state = 'dead' AND {}",
                    table(),
                    target_sql(&target)
                );
                on_target(client, &sql, &target, "discarding dead letters").await
            })
        })
    }

    fn counts(&self, handler: Option<String>) -> BoxFuture<'static, Result<DeadLetterCounts>> {
        self.call(false, DeadLetterCounts::default(), move |client| {
            Box::pin(async move {
                let sql = format!(
                    "SELECT state, pg_catalog.count(*) FROM {}
                      WHERE ($1::text IS NULL OR handler = $1) GROUP BY state",
                    table()
                );
                let rows = client
                    .query_typed(&sql, &[(&handler, Type::TEXT)])
                    .await
                    .map_err(|e| Error::db(format!("counting the dead letters in {TABLE}"), e))?;
                stored_counts(TABLE, rows.iter().map(|r| (r.get(0), r.get(1))))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_created_under_the_install_lock_with_its_index() {
        let sql = create_sql();
        let lock = sql.find("pg_advisory_xact_lock").unwrap();
        assert!(lock < sql.find("CREATE SCHEMA").unwrap());
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"sqlnotify\".dead_letters ("));
        assert!(sql.contains("UNIQUE (handler, sequence, part)"));
        assert!(sql.contains(
            "IF pg_catalog.to_regclass('\"sqlnotify\".dead_letters_handler_state_idx') IS NULL"
        ));
        assert!(!sql.contains("BEGIN;"), "an implicit transaction: {sql}");
    }
}
