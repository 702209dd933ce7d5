//! The logical-decoding tier ([`Tier::Logical`](crate::Tier::Logical)): watches install no
//! trigger; changes are read from a replication slot over the streaming replication protocol
//! (`pgwire-replication`) and decoded from pgoutput here. This module owns the database
//! objects: the server check (`wal_level`), the tables' replica identity check, one
//! publication and one slot per notifier — named after its consumer, or a throwaway name for a
//! notifier without one (dropped at stop) — their removal, and the slot's lag.
//! `source.rs` is the listener's [`Source`](crate::listener::Source), `marks.rs` keeps a named
//! consumer's high-water mark (how a slot made again is told from its own by a process that
//! has read nothing yet, and why that is a table), `changes.rs` turns changes into decoded
//! events (no JSON in between), `pgoutput.rs` parses the messages, `values.rs` converts
//! values.

mod changes;
mod marks;
mod pgoutput;
mod source;
mod values;

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

pub(crate) use self::changes::Route;
pub(crate) use self::source::LogicalSource;
use crate::consumer::{ConsumerInfo, ConsumerPosition, ConsumerState};
use crate::error::{Error, Result};
use crate::operation::Operation;
use crate::resolve::ResolvedWatch;
use crate::sql::quote_ident;
use crate::tier::Tier;

/// Every slot and publication sqlnotify creates starts with this (`_` escaped for `LIKE`).
const PREFIX: &str = "sqlnotify_";
const PREFIX_LIKE: &str = "sqlnotify\\_%";
/// A consumer's publication's comment: this, then the consumer's name.
const COMMENT: &str = "sqlnotify consumer ";
/// Throwaway names of notifiers without a consumer.
const TEMPORARY: &str = "sqlnotify_tmp_";
/// The text whose hash, with a slot's and publication's name after it, keys the advisory lock
/// [`ensure`] takes (the leases hash `sqlnotify consumer <name>`).
const OBJECTS_LOCK: &str = "sqlnotify logical objects ";

/// The name of the slot and the publication of named consumer `consumer`: `sqlnotify_`, the
/// name's letters and digits (lower case, others as `_`, at most 40), `_`, and 8 hex digits
/// of a hash of the exact name — so names that differ only in case or punctuation do not
/// meet. Always `[a-z0-9_]`, at most 63 bytes.
pub(crate) fn consumer_object(consumer: &str) -> String {
    let readable: String = consumer
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .take(40)
        .collect();
    // FNV-1a: stable across versions and platforms (std's hasher is not).
    let hash = consumer.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{PREFIX}{readable}_{hash:08x}")
}

/// A throwaway name for a notifier without a consumer.
pub(crate) fn temporary_object() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mix = nanos ^ (u64::from(std::process::id()) << 40) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{TEMPORARY}{mix:016x}")
}

/// The watch options the logical tier cannot honour, refused by `start()`.
pub(crate) fn check_options(w: &ResolvedWatch) -> Result<()> {
    let refuse = |reason: &str| {
        Err(Error::InvalidWatch {
            watch: format!(
                "{}.{} {}",
                w.channel.schema,
                w.channel.table,
                w.channel.operation.as_str()
            ),
            reason: reason.into(),
        })
    };
    if !w.context.is_empty() {
        return refuse(
            "Tier::Logical cannot capture context values: they live in the writer's session, \
             which the write-ahead log does not record; use Tier::Durable",
        );
    }
    if !w.trigger_columns.is_empty() {
        return refuse(
            "Tier::Logical does not support trigger_columns (the log has no old row to compare \
             with unless the table has REPLICA IDENTITY FULL); filter on the subscriber or use \
             Tier::Durable",
        );
    }
    Ok(())
}

/// Fails unless the server can decode its log: `wal_level` must be `logical`.
pub(crate) async fn check_server(client: &Client) -> Result<()> {
    let row = client
        .query_one("SELECT pg_catalog.current_setting('wal_level')", &[])
        .await
        .map_err(|e| Error::db("reading wal_level", e))?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(Error::WalLevelNotLogical { wal_level: level });
    }
    Ok(())
}

/// Refuses a table whose replica identity would make publishing it break the application's
/// UPDATEs and DELETEs (no primary key and `DEFAULT`, or `NOTHING`) — the server fails every
/// such write once the table is in a publication that publishes them — and a watch that needs
/// values the identity does not log: a DELETE watch's columns must be in the identity, an
/// `old_values` watch needs `FULL`.
pub(crate) async fn check_tables(client: &Client, watches: &[&ResolvedWatch]) -> Result<()> {
    for w in watches {
        let (schema, table) = (&w.channel.schema, &w.channel.table);
        let row = client
            .query_typed_opt(
                "SELECT c.relreplident::text, c.relkind::text,
                        (SELECT pg_catalog.array_agg(a.attname::text)
                           FROM pg_catalog.pg_index i
                           JOIN pg_catalog.pg_attribute a
                             ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                          WHERE i.indrelid = c.oid
                            AND ((c.relreplident = 'd' AND i.indisprimary)
                              OR (c.relreplident = 'i' AND i.indisreplident)))
                   FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2",
                &[(schema, Type::TEXT), (table, Type::TEXT)],
            )
            .await
            .map_err(|e| {
                Error::db(
                    format!("reading the replica identity of {schema}.{table}"),
                    e,
                )
            })?
            .ok_or_else(|| Error::UnknownTable {
                schema: schema.clone(),
                table: table.clone(),
            })?;
        let (identity, kind): (String, String) = (row.get(0), row.get(1));
        let columns: Option<Vec<String>> = row.get(2);
        let refuse = |detail: String| Error::ReplicaIdentity {
            table: format!("{schema}.{table}"),
            detail,
        };
        if !matches!(kind.as_str(), "r" | "p") {
            return Err(refuse(
                "only tables can be published (a view or foreign table has no change log)".into(),
            ));
        }
        let identity_columns =
            match (identity.as_str(), columns) {
                ("f", _) => None, // every column
                (_, Some(columns)) if !columns.is_empty() => Some(columns),
                _ => return Err(refuse(
                    "it has no replica identity (no primary key, or REPLICA IDENTITY NOTHING): \
                     publishing it would make every UPDATE and DELETE on it fail. Add a primary \
                     key, or run ALTER TABLE … REPLICA IDENTITY FULL (or USING INDEX)"
                        .into(),
                )),
            };
        if w.old_values && identity != "f" {
            return Err(refuse(format!(
                "the {} watch wants old_values, which the log carries only under REPLICA \
                 IDENTITY FULL: run ALTER TABLE {}.{} REPLICA IDENTITY FULL, or drop old_values",
                w.channel.operation.as_str(),
                quote_ident(schema),
                quote_ident(table)
            )));
        }
        if let (Operation::Delete, Some(identity)) = (w.channel.operation, &identity_columns) {
            let missing: Vec<&String> = w
                .channel
                .payload_columns()
                .into_iter()
                .filter(|c| !identity.contains(c))
                .collect();
            if !missing.is_empty() {
                return Err(refuse(format!(
                    "a DELETE logs only the replica identity's columns ({}), not {missing:?}: \
                     run ALTER TABLE {}.{} REPLICA IDENTITY FULL, or watch fewer columns",
                    identity.join(", "),
                    quote_ident(schema),
                    quote_ident(table)
                )));
            }
        }
    }
    Ok(())
}

/// The logical watches among `watches`.
pub(crate) fn logical(watches: &[ResolvedWatch]) -> Vec<&ResolvedWatch> {
    watches.iter().filter(|w| w.tier == Tier::Logical).collect()
}

/// The routes the source decodes for.
pub(crate) fn routes(watches: &[ResolvedWatch]) -> Vec<Route> {
    logical(watches)
        .into_iter()
        .map(|w| Route {
            channel: w.channel.name.as_str().into(),
            schema: w.channel.schema.clone(),
            table: w.channel.table.clone(),
            operation: w.channel.operation,
            columns: w.channel.payload_columns().into_iter().cloned().collect(),
            keys: w.channel.key_columns.len(),
            old_values: w.old_values,
        })
        .collect()
}

/// Who asks [`ensure`] for a slot and publication, which decides what it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Making {
    /// `start()`, in any process of the consumer, lease or not: a new consumer's slot and
    /// publication (neither exists) are made, an existing one's publication gets the tables;
    /// but a named consumer that has one of them without the other lost the other while a
    /// process of its group may still run, and making it here, in a process that holds no
    /// lease, would hide the loss — the lease holder, finding a slot again, would report
    /// nothing, and the changes committed while it was missing would be lost silently. So
    /// nothing is made: the lease holder's `restore` makes it again and reports the Gap.
    Start,
    /// The lease holder's `restore` (or a notifier without a consumer): whatever is missing
    /// is made.
    Again,
}

/// Creates (or updates) publication `name` for `tables` and, when missing, logical slot
/// `name` — as far as `making` allows ([`Making::Start`] makes nothing for a named consumer
/// that has one of them without the other). A new slot reads changes committed after it was
/// created. The publication's comment keeps the consumer's own name (the object's name is
/// derived from it).
///
/// Processes of one consumer that start together run this at the same time, so the whole of
/// it holds a session advisory lock keyed by `name` ([`objects_key`]), and each step also
/// its transaction's ([`lock_sql`], what earlier versions took), the way the install
/// serializes on its own lock: without it both would find the publication missing and both
/// `CREATE` it (the second failing with a duplicate key on `pg_publication`), or both
/// `COMMENT` on it ("tuple concurrently updated"); one would find the slot the other is still
/// creating (waiting for running transactions) and go on to stream it while it is in use; and
/// one would find the publication the other just made without its slot, and leave the slot
/// to `restore` ([`Making::Start`]), which would report a Gap that is none. The session lock
/// is held until this returns, or until the connection closes: run it on a connection of its
/// own, so that a call cancelled in between leaves no lock behind.
///
/// The lock is waited for at most `wait` (the notifier's `install_timeout`), by
/// [`lock_objects`]: a process of the group that froze while it held it (stopped, swapped
/// out, its machine gone silent with the connection still open) must not keep every other
/// member's `start()` — or the lease holder's `restore` — waiting for ever. Then the call
/// fails with [`Error::LockTimeout`] naming the slot, its consumer and the holder's pid, and
/// nothing was made.
pub(crate) async fn ensure(
    client: &Client,
    name: &str,
    tables: &[(String, String)],
    consumer: Option<&str>,
    making: Making,
    wait: Duration,
) -> Result<()> {
    check_server(client).await?;
    let key = objects_key(name);
    lock_objects(client, name, consumer, &key, wait).await?;
    let made = make(client, name, tables, consumer, making).await;
    let unlocked = client
        .batch_execute(&format!("SELECT pg_catalog.pg_advisory_unlock({key})"))
        .await;
    made?;
    // Not unlocked: the connection is lost, and the lock with it.
    unlocked.map_err(|e| Error::db(format!("unlocking replication slot {name}"), e))
}

/// How often [`lock_objects`] tries the lock again while another session holds it.
const LOCK_RETRY: Duration = Duration::from_millis(100);

/// Takes [`ensure`]'s session lock (`key`, [`objects_key`] of slot `name`), trying without
/// waiting (`pg_try_advisory_lock`) every [`LOCK_RETRY`] for at most `wait`: a blocking
/// `pg_advisory_lock` waits for ever on a holder that froze. The first time it has to wait it
/// logs who holds the lock; once `wait` is over it fails with [`Error::LockTimeout`], whose
/// object names the slot and its consumer and whose pids are the holders'.
async fn lock_objects(
    client: &Client,
    name: &str,
    consumer: Option<&str>,
    key: &str,
    wait: Duration,
) -> Result<()> {
    let began = tokio::time::Instant::now();
    let mut logged = false;
    loop {
        let taken: bool = client
            .query_one(
                &format!("SELECT pg_catalog.pg_try_advisory_lock({key})"),
                &[],
            )
            .await
            .map_err(|e| Error::db(format!("locking replication slot {name} to make it"), e))?
            .get(0);
        if taken {
            return Ok(());
        }
        let waited = began.elapsed();
        if waited >= wait || !logged {
            let holders = lock_holders(client, key).await;
            let object = match consumer {
                Some(consumer) => format!("replication slot {name} of consumer {consumer:?}"),
                None => format!("replication slot {name}"),
            };
            if waited >= wait {
                return Err(Error::LockTimeout {
                    object,
                    holder_pids: holders,
                    waited,
                });
            }
            logged = true;
            log::warn!(
                "sqlnotify: waiting up to {wait:?} (install_timeout) for another session \
                 making {object} (pid {holders:?}); a process that froze while it held the \
                 lock is ended with pg_terminate_backend"
            );
        }
        tokio::time::sleep(LOCK_RETRY.min(wait.saturating_sub(waited))).await;
    }
}

/// The pids of the sessions holding advisory lock `key` in this database (none when the
/// look-up fails: the error is about the wait, not about this).
async fn lock_holders(client: &Client, key: &str) -> Vec<u64> {
    // A bigint key is held as classid (its high 32 bits) and objid (its low ones), objsubid 1.
    let sql = format!(
        "SELECT l.pid FROM pg_catalog.pg_locks l
          WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
            AND l.database = (SELECT oid FROM pg_catalog.pg_database
                               WHERE datname = pg_catalog.current_database())
            AND ((l.classid::int8 << 32) | l.objid::int8) = {key}
          ORDER BY 1"
    );
    match client.query(&sql, &[]).await {
        Ok(rows) => rows
            .iter()
            .map(|r| u64::try_from(r.get::<_, i32>(0)).unwrap_or(0))
            .collect(),
        Err(e) => {
            log::debug!("sqlnotify: reading who holds the lock of a replication slot: {e}");
            Vec::new()
        }
    }
}

/// [`ensure`]'s work, under its lock.
async fn make(
    client: &Client,
    name: &str,
    tables: &[(String, String)],
    consumer: Option<&str>,
    making: Making,
) -> Result<()> {
    let row = client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1),
                    (SELECT COALESCE(wal_status, '') FROM pg_catalog.pg_replication_slots
                      WHERE slot_name = $1)",
            &[(&name, Type::TEXT)],
        )
        .await
        .map_err(|e| Error::db(format!("reading replication slot {name}"), e))?;
    let (publication, slot): (bool, Option<String>) = (row.get(0), row.get(1));
    if slot.as_deref() == Some("lost") {
        return Err(Error::SlotLost {
            slot: name.to_string(),
            detail: "its wal_status is lost: it fell behind by more than max_slot_wal_keep_size"
                .into(),
        });
    }
    // The table of the consumers' high-water marks, for a new consumer's first mark below
    // and every save after.
    let marked = match consumer {
        Some(_) => marks::setup(client).await,
        None => false,
    };
    if let (Making::Start, Some(consumer)) = (making, consumer) {
        if publication != slot.is_some() {
            log::warn!(
                "sqlnotify: consumer {consumer:?} has its {} but not its {}: left for the \
                 process that holds its lease to make again, reporting the changes lost \
                 meanwhile (Status::Gap)",
                if publication {
                    "publication"
                } else {
                    "replication slot"
                },
                if publication {
                    "replication slot"
                } else {
                    "publication"
                },
            );
            return Ok(());
        }
    }
    let list = table_list(tables);
    let sql = publication_sql(name, &list, consumer);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.batch_execute(&sql).await {
            Ok(()) => break,
            // Made meanwhile by another process and not seen by this transaction's snapshot
            // (a default_transaction_isolation of repeatable read takes it before the lock is
            // granted; another version of sqlnotify takes no session lock): a new transaction
            // sees it.
            Err(e)
                if attempt < 3
                    && matches!(
                        e.code(),
                        Some(&SqlState::DUPLICATE_OBJECT | &SqlState::UNIQUE_VIOLATION)
                    ) => {}
            Err(e) => {
                return Err(Error::db(
                    format!("creating publication {name} for {list}"),
                    e,
                ))
            }
        }
    }
    if slot.is_some() {
        return Ok(());
    }
    // One implicit transaction: the lock, then the slot unless it exists (the slot list is
    // shared memory, current whatever the snapshot). Taking an advisory lock assigns no
    // transaction id, which creating a logical slot refuses; and a process waiting for the
    // lock has none either, so the creation, which waits for the transactions running, does
    // not wait for it.
    let created = client
        .simple_query(&format!(
            "{}SELECT pg_catalog.pg_create_logical_replication_slot({literal}, 'pgoutput')
              WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots
                                 WHERE slot_name = {literal})",
            lock_sql(name),
            literal = crate::sql::quote_literal(name),
        ))
        .await;
    match created {
        Ok(messages) => {
            // The last statement's count: the lock's own row does not count.
            let last = messages.iter().rev().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::CommandComplete(rows) => Some(*rows),
                _ => None,
            });
            if last.unwrap_or(0) > 0 {
                log::info!("sqlnotify: created replication slot {name}");
                if let (true, Some(consumer)) = (marked, consumer) {
                    marks::created(client, name, consumer, making == Making::Again).await;
                }
            }
            Ok(())
        }
        // Without the lock (another version of sqlnotify) another process may still win.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(()),
        Err(e) => Err(Error::db(format!("creating replication slot {name}"), e)),
    }
}

/// Creates slot and publication `name` again ([`ensure`]) for a running notifier that found
/// its slot missing, or `stale`: there, but left without its publication. pgoutput looks the
/// publication up as of each change it decodes, so one created again is not there for the
/// changes logged before it, and such a slot fails on the first of them whenever it is read:
/// it is dropped first (only this database's: a slot of the same name in another one is not
/// this notifier's). An invalidated slot is not made again: [`ensure`] refuses it with
/// [`Error::SlotLost`]. `wait`: how long [`ensure`] waits for its lock.
pub(crate) async fn recreate(
    client: &Client,
    name: &str,
    tables: &[(String, String)],
    consumer: Option<&str>,
    stale: bool,
    wait: Duration,
) -> Result<()> {
    if stale {
        let dropped = client
            .query_typed(
                "SELECT pg_catalog.pg_drop_replication_slot(slot_name)
                   FROM pg_catalog.pg_replication_slots
                  WHERE slot_name = $1 AND database = pg_catalog.current_database()",
                &[(&name, Type::TEXT)],
            )
            .await;
        match dropped {
            Ok(rows) if !rows.is_empty() => log::info!(
                "sqlnotify: dropped replication slot {name}, left without its publication"
            ),
            Ok(_) => {}
            // Dropped meanwhile by someone else.
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {}
            Err(e) => {
                return Err(Error::db(
                    format!("dropping replication slot {name}, left without its publication"),
                    e,
                ))
            }
        }
    }
    ensure(client, name, tables, consumer, Making::Again, wait).await
}

/// `tables` as a publication's table list: quoted, sorted, without duplicates.
fn table_list(tables: &[(String, String)]) -> String {
    let mut list: Vec<String> = tables
        .iter()
        .map(|(s, t)| format!("{}.{}", quote_ident(s), quote_ident(t)))
        .collect();
    list.sort();
    list.dedup();
    list.join(", ")
}

/// The key of the advisory lock serializing [`ensure`] for the slot and publication `name`,
/// as an SQL expression: the first 64 bits of the `md5` of [`OBJECTS_LOCK`] and the name, as
/// the leases key theirs on `sqlnotify consumer <name>`.
fn objects_key(name: &str) -> String {
    format!(
        "('x' || pg_catalog.substr(pg_catalog.md5({}), 1, 16))::bit(64)::bigint",
        crate::sql::quote_literal(&format!("{OBJECTS_LOCK}{name}"))
    )
}

/// The statement that takes [`objects_key`]'s lock for the transaction.
fn lock_sql(name: &str) -> String {
    format!(
        "SELECT pg_catalog.pg_advisory_xact_lock({});\n",
        objects_key(name)
    )
}

/// The statements that create publication `name` for the tables of `list` (or set its tables
/// when it exists) and name its consumer: one implicit transaction (one simple query, so an
/// error rolls all of it back) that first takes [`lock_sql`]'s lock and only then looks for
/// the publication, so a second process finds the first one's and only sets its tables.
fn publication_sql(name: &str, list: &str, consumer: Option<&str>) -> String {
    use crate::sql::quote_literal;
    let ident = quote_ident(name);
    let body = format!(
        "
BEGIN
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = {literal}) THEN
    ALTER PUBLICATION {ident} SET TABLE {list};
  ELSE
    CREATE PUBLICATION {ident} FOR TABLE {list}
      WITH (publish = 'insert, update, delete', publish_via_partition_root = true);
  END IF;
END
",
        literal = quote_literal(name),
    );
    let mut sql = format!(
        "{}DO {};\n",
        lock_sql(name),
        crate::postgres::ddl::dollar_quote(&body)
    );
    if let Some(consumer) = consumer {
        sql.push_str(&format!(
            "COMMENT ON PUBLICATION {ident} IS {};\n",
            quote_literal(&format!("{COMMENT}{consumer}"))
        ));
    }
    sql
}

/// How long a session reading a slot may take to end once terminated.
const TERMINATED_WITHIN: Duration = Duration::from_secs(10);

/// Drops slot `name` (terminating the session still reading it, waiting up to `wait` for it
/// to end), publication `name` and the slot's high-water mark (`marks.rs`). Returns whether
/// the slot or the publication existed. A reader this role may not
/// terminate, or one that does not end within [`TERMINATED_WITHIN`], is an error.
pub(crate) async fn drop_objects(client: &Client, name: &str, wait: Duration) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut slot = false;
    loop {
        let row = client
            .query_typed_opt(
                "SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[(&name, Type::TEXT)],
            )
            .await
            .map_err(|e| Error::db(format!("reading replication slot {name}"), e))?;
        let Some(row) = row else { break };
        slot = true;
        if let Some(pid) = row.get::<_, Option<i32>>(0) {
            let now = tokio::time::Instant::now();
            if now >= deadline + TERMINATED_WITHIN {
                return Err(Error::Database {
                    context: format!("dropping replication slot {name}"),
                    source: format!(
                        "the session reading it (pid {pid}) did not end within {:?} of being \
                         terminated; stop the notifier that reads it, then retry",
                        TERMINATED_WITHIN
                    )
                    .into(),
                });
            }
            if now >= deadline {
                // Not allowed (the reader is another role's, or a superuser's): an error that
                // says so, rather than waiting for ever.
                client
                    .query_typed(
                        "SELECT pg_catalog.pg_terminate_backend($1)",
                        &[(&pid, Type::INT4)],
                    )
                    .await
                    .map_err(|e| {
                        Error::db(
                            format!(
                                "ending the session (pid {pid}) that still reads replication \
                                 slot {name}; stop the notifier that reads it, then retry"
                            ),
                            e,
                        )
                    })?;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        match client
            .query_typed(
                "SELECT pg_catalog.pg_drop_replication_slot($1)",
                &[(&name, Type::TEXT)],
            )
            .await
        {
            Ok(_) => {
                log::info!("sqlnotify: dropped replication slot {name}");
                break;
            }
            // Gone meanwhile, or taken again for a moment: look again.
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => break,
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => continue,
            Err(e) => return Err(Error::db(format!("dropping replication slot {name}"), e)),
        }
    }
    let publication = client
        .query_typed(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[(&name, Type::TEXT)],
        )
        .await
        .map_err(|e| Error::db("reading publications", e))?
        .len()
        == 1;
    if publication {
        client
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
            .await
            .map_err(|e| Error::db(format!("dropping publication {name}"), e))?;
    }
    // Last: a slot made later under this name is a new consumer's, not one made again. (A
    // throwaway slot has no mark.)
    if !name.starts_with(TEMPORARY) {
        marks::remove(client, name).await?;
    }
    Ok(slot || publication)
}

/// What [`cleanup`] dropped, each list by name.
#[derive(Debug, Default)]
pub(crate) struct Dropped {
    pub slots: Vec<String>,
    pub publications: Vec<String>,
    /// The consumers their publications' comments name.
    pub consumers: Vec<String>,
}

/// Drops every sqlnotify slot of this database and every sqlnotify publication, and every
/// consumer's high-water mark (`marks.rs`); says which slots and publications there were (as
/// listed just before each was dropped), and whose.
pub(crate) async fn cleanup(client: &Client, wait: Duration) -> Result<Dropped> {
    let rows = client
        .query_typed(
            "SELECT n.name,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s
                             WHERE s.slot_name = n.name
                               AND s.database = pg_catalog.current_database()),
                    p.oid IS NOT NULL,
                    pg_catalog.obj_description(p.oid, 'pg_publication')
               FROM (SELECT slot_name::text AS name FROM pg_catalog.pg_replication_slots
                      WHERE slot_name LIKE $1 AND database = pg_catalog.current_database()
                     UNION
                     SELECT pubname::text FROM pg_catalog.pg_publication
                      WHERE pubname LIKE $1) n
               LEFT JOIN pg_catalog.pg_publication p ON p.pubname = n.name
              ORDER BY n.name",
            &[(&PREFIX_LIKE, Type::TEXT)],
        )
        .await
        .map_err(|e| Error::db("listing sqlnotify's slots and publications", e))?;
    let mut dropped = Dropped::default();
    for row in rows {
        let name: String = row.get(0);
        if !drop_objects(client, &name, wait).await? {
            continue; // gone meanwhile
        }
        if row.get::<_, bool>(1) {
            dropped.slots.push(name.clone());
        }
        if row.get::<_, bool>(2) {
            dropped.publications.push(name);
        }
        let comment: Option<String> = row.get(3);
        if let Some(consumer) = comment.and_then(|c| c.strip_prefix(COMMENT).map(str::to_string)) {
            dropped.consumers.push(consumer);
        }
    }
    // Also the marks of consumers whose slot and publication were gone already.
    marks::remove_all(client).await?;
    Ok(dropped)
}

/// The named consumers of the logical tier in this database: every sqlnotify slot whose
/// publication names its consumer. `backlog` is 0 (the lag is in the position); `last_active`
/// is now while a session reads the slot, else unknown (the UNIX epoch); `channels` lists the
/// published tables as `schema.table`.
pub(crate) async fn list(client: &Client) -> Result<Vec<ConsumerInfo>> {
    let rows = client
        .query_typed(
            "SELECT pg_catalog.obj_description(p.oid, 'pg_publication'),
                    (s.confirmed_flush_lsn - '0/0'::pg_lsn)::text,
                    COALESCE(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(),
                                                      s.confirmed_flush_lsn), 0)::bigint,
                    s.active,
                    COALESCE(s.wal_status, ''),
                    (SELECT pg_catalog.array_agg(t.schemaname || '.' || t.tablename ORDER BY 1)
                       FROM pg_catalog.pg_publication_tables t WHERE t.pubname = p.pubname)
               FROM pg_catalog.pg_replication_slots s
               JOIN pg_catalog.pg_publication p ON p.pubname = s.slot_name
              WHERE s.slot_name LIKE $1 AND s.database = pg_catalog.current_database()",
            &[(&PREFIX_LIKE, Type::TEXT)],
        )
        .await
        .map_err(|e| Error::db("listing the replication slots", e))?;
    let mut out = Vec::new();
    for r in rows {
        let Some(name) = r
            .get::<_, Option<String>>(0)
            .and_then(|c| c.strip_prefix(COMMENT).map(str::to_string))
        else {
            continue;
        };
        let confirmed = r
            .get::<_, Option<String>>(1)
            .and_then(|t| t.split('.').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let status: String = r.get(4);
        out.push(ConsumerInfo {
            name,
            state: if status == "lost" {
                ConsumerState::Expired
            } else {
                ConsumerState::Active
            },
            position: ConsumerPosition::Slot {
                confirmed,
                lag_bytes: r.get::<_, i64>(2).max(0) as u64,
            },
            backlog: 0,
            last_active: if r.get::<_, bool>(3) {
                std::time::SystemTime::now()
            } else {
                std::time::UNIX_EPOCH
            },
            channels: r.get(5),
            expire_after: None,
        });
    }
    Ok(out)
}

/// What the lag task reads of a slot ([`lag`]).
pub(crate) struct SlotState {
    /// WAL bytes the server keeps for the slot past its confirmed position.
    pub lag: u64,
    /// Its `wal_status`: `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: String,
    /// The server's next full transaction id (`xid8`).
    pub next_xid: u64,
}

/// Slot `name`'s lag and `wal_status`, with the server's next transaction id; `None` without
/// the slot.
pub(crate) async fn lag(client: &Client, name: &str) -> Result<Option<SlotState>> {
    let row = client
        .query_typed_opt(
            "SELECT COALESCE(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(),
                                                      confirmed_flush_lsn), 0)::bigint,
                    COALESCE(wal_status, ''),
                    pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text
               FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[(&name, Type::TEXT)],
        )
        .await
        .map_err(|e| Error::db(format!("reading the lag of replication slot {name}"), e))?;
    Ok(row.map(|r| SlotState {
        lag: r.get::<_, i64>(0).max(0) as u64,
        wal_status: r.get(1),
        next_xid: source::parse_xid8(&r.get::<_, String>(2)).unwrap_or(0),
    }))
}

/// Which of `xids` the server reports in progress (`pg_xact_status`): for transactions the
/// stream handed over, those whose commit is not visible to new snapshots yet; and the
/// server's oldest running transaction (`pg_snapshot_xmin` of a new snapshot).
pub(crate) async fn running(
    client: &Client,
    xids: &[u64],
) -> Result<(std::collections::HashSet<u64>, u64)> {
    let list: Vec<String> = xids.iter().map(u64::to_string).collect();
    let row = client
        .query_typed_one(
            "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text,
                    ARRAY(SELECT x FROM pg_catalog.unnest($1::text[]) AS x
                           WHERE pg_catalog.pg_xact_status(x::xid8) = 'in progress')",
            &[(&list, Type::TEXT_ARRAY)],
        )
        .await
        .map_err(|e| Error::db("reading the status of transactions", e))?;
    let oldest = source::parse_xid8(row.get::<_, &str>(0)).unwrap_or(0);
    let running: Vec<&str> = row.get(1);
    Ok((
        running.into_iter().filter_map(source::parse_xid8).collect(),
        oldest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_safe_identifiers_that_keep_names_apart() {
        for name in [
            "app",
            "App",
            "a-b",
            "a b",
            "é",
            &"x".repeat(300),
            "'; DROP TABLE t; --",
        ] {
            let n = consumer_object(name);
            assert!(n.len() <= 63, "{n}");
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{n}"
            );
            assert!(n.starts_with(PREFIX));
        }
        assert_ne!(consumer_object("app"), consumer_object("App"));
        assert_ne!(consumer_object("a-b"), consumer_object("a_b"));
        assert_eq!(consumer_object("app"), consumer_object("app"));
        let (a, b) = (temporary_object(), temporary_object());
        assert_ne!(a, b);
        assert!(a.starts_with(TEMPORARY) && a.len() <= 63);
    }
}
