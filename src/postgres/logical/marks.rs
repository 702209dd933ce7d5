//! A named consumer's high-water mark: the furthest position any process of the consumer has
//! let its replication slot confirm, kept in `sqlnotify.slot_marks` (one row per slot, in the
//! slot's database), so that a slot dropped and made again while no process of the consumer
//! read it is told from the one the consumer read by whichever process holds the lease next.
//!
//! Why it is needed. The lease holder tells a slot made again by someone else by its confirmed
//! position: the slot it reads never confirms past the furthest position it read, while a slot
//! made later starts past every position of the WAL written before it, so a slot found past
//! that is a new one, and the changes committed while none existed are lost (`Status::Gap`).
//! But a process that has just taken the lease — the reader gone, a standby winning the lease,
//! the whole group restarted — has read nothing to compare with: before this mark it accepted
//! any slot it found, and a slot made again in between (an operator's
//! `pg_create_logical_replication_slot`, an older sqlnotify, a member's `start()` after someone
//! dropped both slot and publication by hand) lost its changes silently.
//!
//! The invariant: the mark is never below the slot's confirmed position. Every way the slot is
//! moved saves the mark first, committed and flushed, and only then confirms: the running
//! listener's saves (`Source::save`: the mark, then `update_applied_lsn`, which the replication
//! client sends with its next status update) and the final save after stop (the mark, then
//! `pg_replication_slot_advance`). A crash between the two leaves the mark ahead of the slot,
//! which is harmless; the other order could leave the slot ahead of its mark, and a slot
//! legitimately advanced would look made again (a needless Gap). The mark only grows
//! (`GREATEST`), so a paused former lease holder that saves late cannot lower it, and it is
//! written with `synchronous_commit = local` whatever the role or server sets: a commit that a
//! crash could lose while the slot's new position (saved by the server at its next checkpoint,
//! which flushes the WAL before it) survives would put the slot past its mark again. A mark
//! may run ahead of what the slot confirmed (the furthest position read is written, so that
//! the saves that follow need no write): every position in it was read from a slot before any
//! slot made later, so a slot made again is still past it.
//!
//! A new consumer's slot is marked at its confirmed position when `ensure` creates it, so its
//! first start is no Gap; a slot `ensure` creates while an old mark is left (both slot and
//! publication removed by something other than `consumers drop` or `cleanup`, which remove the
//! mark too) keeps the old mark, and the lease holder reports the Gap. A slot found with no
//! mark at all — a consumer of an earlier version, or a slot whose creation was cut short
//! before its mark was written — is taken as it is, and marked from then on: there is nothing
//! to compare it with. The lease holder that reports a slot made again marks the new one, so
//! the Gap is reported once.
//!
//! Why a table, not a replication origin (`pg_replication_origin_advance`), which would live
//! beside the slot in the server's replication state: the origin functions are the
//! superuser's unless granted one by one, where the tier asks only for `REPLICATION` and
//! `CREATE` on the database; an origin's progress is set, not raised — two processes (a
//! paused former holder and the new one) could move it backwards, and with it the mark below
//! the slot — while an `UPDATE … GREATEST` cannot; and origins count against
//! `max_replication_slots`. The table costs one small upsert per position saved (at most every
//! `SAVE_EVERY`, skipped when the position read was marked already).
//!
//! Where the table cannot be made or written (the role may not create in an existing
//! `sqlnotify` schema of another role, or has no privilege on the table), the consumer runs as
//! before the mark existed — confirming as it goes — with a warning: the next lease holder
//! then accepts the slot it finds, and a mark written before and not since can cost a needless
//! Gap.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::postgres::ddl::SCHEMA;
use crate::sql::{quote_ident, quote_literal};

/// The table's name in the schema.
const TABLE: &str = "slot_marks";

/// `sqlnotify.slot_marks`, quoted.
fn table() -> String {
    format!("{}.{}", quote_ident(SCHEMA), quote_ident(TABLE))
}

/// `sqlnotify.slot_marks` as a literal, for `to_regclass`.
fn table_literal() -> String {
    quote_literal(&table())
}

/// An LSN as `pg_lsn`'s text form.
pub(crate) fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The SQL expression that is true when this session may read the marks (the table exists
/// and it has `SELECT` on it).
pub(crate) fn readable_sql() -> String {
    format!(
        "COALESCE(pg_catalog.has_table_privilege(pg_catalog.to_regclass({}), 'SELECT'), false)",
        table_literal()
    )
}

/// The query that reads slot `slot`'s mark as a number of bytes (`text`), no row without one.
pub(crate) fn read_sql(slot: &str) -> String {
    format!(
        "SELECT (mark - '0/0'::pg_lsn)::text FROM {} WHERE slot = {}",
        table(),
        quote_literal(slot)
    )
}

/// Makes `sqlnotify.slot_marks` if missing (and the schema, if missing too), closed to
/// `PUBLIC`. Returns whether the table is there; a role that may not make it gets a warning
/// (the consumer runs without a mark, see the module docs), never an error.
pub(crate) async fn setup(client: &Client) -> bool {
    match exists(client).await {
        Ok(true) => return true,
        Ok(false) => {}
        Err(e) => {
            log::warn!("sqlnotify: looking for {}: {e}", table());
            return false;
        }
    }
    // `CREATE SCHEMA IF NOT EXISTS` wants CREATE on the database even when the schema exists.
    let sql = format!(
        "DO $sqn_marks$
BEGIN
  IF pg_catalog.to_regnamespace({schema_literal}) IS NULL THEN
    CREATE SCHEMA {schema};
  END IF;
END
$sqn_marks$;
CREATE TABLE IF NOT EXISTS {table} (
    slot text PRIMARY KEY,
    consumer text NOT NULL,
    mark pg_lsn NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON {table} FROM PUBLIC;",
        schema_literal = quote_literal(SCHEMA),
        schema = quote_ident(SCHEMA),
        table = table(),
    );
    match client.batch_execute(&sql).await {
        Ok(()) => true,
        // Made meanwhile by another consumer's process.
        Err(e)
            if matches!(
                e.code(),
                Some(
                    &SqlState::DUPLICATE_TABLE
                        | &SqlState::DUPLICATE_SCHEMA
                        | &SqlState::UNIQUE_VIOLATION
                )
            ) =>
        {
            exists(client).await.unwrap_or(false)
        }
        Err(e) => {
            log::warn!(
                "sqlnotify: cannot make {} ({}): a logical consumer's slot dropped and made \
                 again while none of its processes read it will not be told from its own",
                table(),
                crate::error::chain(&e)
            );
            false
        }
    }
}

/// Whether `sqlnotify.slot_marks` exists.
async fn exists(client: &Client) -> std::result::Result<bool, tokio_postgres::Error> {
    let sql = format!(
        "SELECT pg_catalog.to_regclass({}) IS NOT NULL",
        table_literal()
    );
    Ok(client.query_one(&sql, &[]).await?.get(0))
}

/// Marks slot `slot` of `consumer`, just created by this session, at its confirmed position.
/// `again`: made again by the lease holder, which reports the Gap itself: the mark is raised
/// to the new slot's position. Otherwise (a new consumer's slot) a mark left by an earlier
/// slot of that name is kept, so that the lease holder finds the new slot past it and reports
/// the Gap. Failures are warnings.
pub(crate) async fn created(client: &Client, slot: &str, consumer: &str, again: bool) {
    let conflict = if again {
        "UPDATE SET mark = GREATEST(m.mark, EXCLUDED.mark), consumer = EXCLUDED.consumer,
                    updated_at = now()"
    } else {
        "NOTHING"
    };
    let sql = format!(
        "INSERT INTO {} AS m (slot, consumer, mark)
         SELECT $1, $2, s.confirmed_flush_lsn FROM pg_catalog.pg_replication_slots s
          WHERE s.slot_name = $1 AND s.database = pg_catalog.current_database()
            AND s.confirmed_flush_lsn IS NOT NULL
         ON CONFLICT (slot) DO {conflict}",
        table()
    );
    if let Err(e) = client
        .query_typed(&sql, &[(&slot, Type::TEXT), (&consumer, Type::TEXT)])
        .await
    {
        log::warn!(
            "sqlnotify: marking replication slot {slot} of consumer {consumer:?}: {}",
            crate::error::chain(&e)
        );
    }
}

/// How a mark was written ([`save`]).
pub(crate) enum Saved {
    /// Committed and flushed: the slot may be confirmed up to it.
    Yes,
    /// The table is missing, or this role may not write it: the consumer runs without a mark.
    Unavailable(String),
}

/// Raises slot `slot`'s mark to `lsn` (never lowers it), committed with `synchronous_commit =
/// local` (see the module docs). One statement, so an error leaves no transaction open.
pub(crate) async fn save(client: &Client, slot: &str, consumer: &str, lsn: u64) -> Result<Saved> {
    let sql = format!(
        "WITH durable AS MATERIALIZED (
           SELECT pg_catalog.set_config('synchronous_commit', 'local', true))
         INSERT INTO {} AS m (slot, consumer, mark)
         SELECT $1, $2, $3::text::pg_lsn FROM durable
         ON CONFLICT (slot) DO UPDATE SET mark = GREATEST(m.mark, EXCLUDED.mark),
                                          consumer = EXCLUDED.consumer, updated_at = now()",
        table()
    );
    let lsn = lsn_text(lsn);
    match client
        .query_typed(
            &sql,
            &[
                (&slot, Type::TEXT),
                (&consumer, Type::TEXT),
                (&lsn, Type::TEXT),
            ],
        )
        .await
    {
        Ok(_) => Ok(Saved::Yes),
        Err(e)
            if matches!(
                e.code(),
                Some(&SqlState::UNDEFINED_TABLE | &SqlState::INSUFFICIENT_PRIVILEGE)
            ) =>
        {
            Ok(Saved::Unavailable(crate::error::chain(&e)))
        }
        Err(e) => Err(Error::db(
            format!("saving the high-water mark of replication slot {slot}"),
            e,
        )),
    }
}

/// [`save`] on a connection of its own (the final save after stop), within `limit`.
pub(crate) async fn save_within(
    client: &Client,
    slot: &str,
    consumer: &str,
    lsn: u64,
    limit: Duration,
) -> Result<()> {
    match tokio::time::timeout(limit, save(client, slot, consumer, lsn)).await {
        Ok(Ok(Saved::Yes)) => Ok(()),
        Ok(Ok(Saved::Unavailable(why))) => {
            log::warn!(
                "sqlnotify: cannot save the high-water mark of replication slot {slot} ({why}); \
                 advancing it all the same"
            );
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Database {
            context: format!("saving the high-water mark of replication slot {slot}"),
            source: format!("no answer within {limit:?}").into(),
        }),
    }
}

/// Removes slot `slot`'s mark (the consumer was dropped), where there is a table.
pub(crate) async fn remove(client: &Client, slot: &str) -> Result<()> {
    delete(client, "WHERE slot = $1", Some(slot)).await
}

/// Removes every mark (`cleanup()`), where there is a table.
pub(crate) async fn remove_all(client: &Client) -> Result<()> {
    delete(client, "", None).await
}

async fn delete(client: &Client, filter: &str, slot: Option<&str>) -> Result<()> {
    let sql = format!(
        "DO $sqn_marks$
BEGIN
  IF pg_catalog.to_regclass({literal}) IS NOT NULL THEN
    DELETE FROM {table} {filter};
  END IF;
END
$sqn_marks$",
        literal = table_literal(),
        table = table(),
        filter = filter.replace("$1", &slot.map(quote_literal).unwrap_or_default()),
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| Error::db(format!("removing the high-water marks in {}", table()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_read_as_pg_lsn_does() {
        assert_eq!(lsn_text(0), "0/0");
        assert_eq!(lsn_text(0x0194_B030), "0/194B030");
        assert_eq!(lsn_text((7 << 32) | 0xAB), "7/AB");
    }

    #[test]
    fn a_slot_name_is_a_literal_in_the_read_query() {
        assert!(
            read_sql("sqlnotify_app_1f6a832c").ends_with("WHERE slot = 'sqlnotify_app_1f6a832c'")
        );
        assert!(read_sql("x'y").contains("WHERE slot = 'x''y'"));
    }
}
