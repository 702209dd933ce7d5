//! Reading the PostgreSQL catalog (table descriptions) and keeping sqlnotify's own catalog:
//! installing, verifying and removing watches under the install advisory lock.
//!
//! Drift detection compares the md5 of a watch's generated definition with the one recorded
//! at install time. Unchanged watches are left alone — no DROP on every start, because
//! dropping a trigger takes an ACCESS EXCLUSIVE lock on the user's table.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Transaction};

use super::ddl;
use crate::dialect::{InstallOptions, Installed};
use crate::error::{Error, Result};
use crate::lockwait::{Blocked, LockWait, INSTALL_LOCK_OBJECT};
use crate::resolve::{ColumnInfo, ResolvedWatch, TableInfo};
use crate::sql::quote_ident;
use crate::tier::{Capture, Tier};

/// Reads one table's columns, primary-key positions and equality support: whether the type
/// has an `=` operator of its own, and in which schema (`pg_catalog`'s first, as the parser
/// picks it, then the one of the lowest oid) — generated comparisons name that schema unless it
/// is `pg_catalog`, so they never depend on the writer's `search_path`.
pub(crate) async fn describe_table(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<TableInfo> {
    const SQL: &str = "
        SELECT a.attname::text,
               -- int2vector subscripts start at 0 (or wherever array_lower says): 0-based position
               (SELECT pg_catalog.array_position(i.indkey::int2[], a.attnum) - pg_catalog.array_lower(i.indkey::int2[], 1)
                  FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) AS pk_pos,
               (SELECT s.nspname::text FROM pg_catalog.pg_operator o
                  JOIN pg_catalog.pg_namespace s ON s.oid = o.oprnamespace
                 WHERE o.oprname = '=' AND o.oprleft = a.atttypid AND o.oprright = a.atttypid
                 ORDER BY s.nspname <> 'pg_catalog', o.oid LIMIT 1) AS eq_schema,
               pg_catalog.format_type(a.atttypid, a.atttypmod),
               c.relkind = 'p' OR c.relispartition
                 OR EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
                             WHERE i.inhrelid = c.oid OR i.inhparent = c.oid) AS in_hierarchy
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
         ORDER BY a.attnum";
    let context = || format!("reading the columns of {schema}.{table}");
    let rows = client
        .query_typed(SQL, &[(&schema, Type::TEXT), (&table, Type::TEXT)])
        .await
        .map_err(|e| Error::db(context(), e))?;
    if rows.is_empty() {
        let schema_exists = client
            .query_typed_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
                &[(&schema, Type::TEXT)],
            )
            .await
            .map_err(|e| Error::db(context(), e))?
            .get::<_, bool>(0);
        return Err(if schema_exists {
            Error::UnknownTable {
                schema: schema.to_string(),
                table: table.to_string(),
            }
        } else {
            Error::UnknownSchema {
                schema: schema.to_string(),
            }
        });
    }
    let columns = rows
        .iter()
        .map(|r| {
            let eq_schema: Option<String> = r.get(2);
            ColumnInfo {
                name: r.get(0),
                pk_position: r.get::<_, Option<i32>>(1).map(|p| p as usize),
                has_equality: eq_schema.is_some(),
                equality_schema: eq_schema.filter(|s| s != "pg_catalog"),
                data_type: r.get(3),
            }
        })
        .collect();
    Ok(TableInfo {
        schema: schema.to_string(),
        table: table.to_string(),
        columns,
        in_hierarchy: rows[0].get(4),
    })
}

async fn installed_state(
    client: &impl GenericClient,
    w: &ResolvedWatch,
    catalog_exists: bool,
) -> Result<Installed> {
    if !catalog_exists {
        return Ok(Installed::Missing);
    }
    let sql = format!(
        "SELECT c.definition_hash = pg_catalog.md5($2),
                (SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger t
                   JOIN pg_catalog.pg_class r ON r.oid = t.tgrelid
                   JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
                  WHERE t.tgname = ANY($5) AND n.nspname = $3 AND r.relname = $4)
                  = pg_catalog.cardinality($5),
                c.table_schema::text, c.table_name::text, c.operation::text,
                EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                   JOIN pg_catalog.pg_class r ON r.oid = t.tgrelid
                   JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
                  WHERE t.tgname = ANY($5) AND n.nspname = c.table_schema
                    AND r.relname = c.table_name)
           FROM {}.catalog c WHERE c.channel = $1",
        quote_ident(ddl::SCHEMA)
    );
    let channel = &w.channel;
    let row = client
        .query_typed_opt(
            &sql,
            &[
                (&channel.name, Type::TEXT),
                (&ddl::definition(w), Type::TEXT),
                (&channel.schema, Type::TEXT),
                (&channel.table, Type::TEXT),
                (&ddl::trigger_names(w), Type::TEXT_ARRAY),
            ],
        )
        .await
        .map_err(|e| Error::db(format!("reading the catalog entry of {}", channel.name), e))?;
    let Some(r) = row else {
        return Ok(Installed::Missing);
    };
    let read = |e| Error::db(format!("reading the catalog entry of {}", channel.name), e);
    let (schema, table): (String, String) =
        (r.try_get(2).map_err(read)?, r.try_get(3).map_err(read)?);
    // A label may move to another table (its old trigger is dropped, by design); a default
    // name is the table's own, so another table's entry under it is a collision — while that
    // table still has the channel's trigger. An entry whose table is gone or has it no more
    // (renamed or moved into this watch's name: the trigger went with it; dropped) is stale.
    let taken = || r.try_get::<_, bool>(5).map_err(read);
    if channel.label.is_none() && (schema != channel.schema || table != channel.table) && taken()? {
        let operation: String = r.try_get(4).map_err(read)?;
        return Err(Error::ChannelTaken {
            channel: channel.name.clone(),
            watch: format!("{}.{} {}", channel.schema, channel.table, channel.operation),
            installed_watch: format!("{schema}.{table} {}", operation.to_ascii_uppercase()),
        });
    }
    Ok(Installed::Recorded {
        same: r.try_get(0).map_err(read)?,
        trigger: r.try_get(1).map_err(read)?,
    })
}

/// What both a `Client` and a `Transaction` can do, as far as the catalog code needs.
pub(crate) use tokio_postgres::GenericClient;

async fn catalog_exists(client: &impl GenericClient) -> Result<bool> {
    Ok(client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = 'catalog')",
            &[(&ddl::SCHEMA, Type::TEXT)],
        )
        .await
        .map_err(|e| Error::db("looking for the sqlnotify catalog", e))?
        .get(0))
}

/// Installs (or, with `manage_triggers` off, verifies) `watches`, atomically.
///
/// Two transactions, each retried until `options.timeout` whenever a lock is busy: first
/// sqlnotify's own tables (created, or upgraded: see `ddl::setup_sql`), committed on their
/// own so an upgrade never holds the journal while user tables are locked; then every
/// watch's objects, all or nothing. See [`attempt_locks`] for how an attempt takes its locks.
/// Returns the channels whose objects it created or replaced.
pub(crate) async fn install(
    client: &mut Client,
    watches: &[ResolvedWatch],
    options: InstallOptions,
) -> Result<Vec<String>> {
    if !options.manage_triggers {
        return verify(client, watches).await.map(|()| Vec::new());
    }
    check_signing(client, watches).await?;
    let mut wait = LockWait::new("installing triggers", options.timeout);
    loop {
        let tx = client
            .transaction()
            .await
            .map_err(|e| Error::db("starting the install transaction", e))?;
        let outcome = setup_attempt(&tx, &wait).await;
        match finish(tx, outcome).await? {
            Ok(()) => break,
            Err(busy) => wait.retry_after(busy.resolve(client).await?).await?,
        }
    }
    loop {
        let tx = client
            .transaction()
            .await
            .map_err(|e| Error::db("starting the install transaction", e))?;
        let outcome = install_attempt(&tx, watches, options, &wait).await;
        match finish(tx, outcome).await? {
            Ok(installed) => return Ok(installed),
            Err(busy) => wait.retry_after(busy.resolve(client).await?).await?,
        }
    }
}

/// Refuses to flip a notify-tier channel between signed and unsigned when this version
/// installed it: the notifiers already listening on it verify (or not) by their own setting,
/// and replacing the trigger would make them drop every event. Installs of older versions
/// (no helper yet) are upgraded whatever the setting: nothing of theirs verifies signatures.
async fn check_signing(client: &Client, watches: &[ResolvedWatch]) -> Result<()> {
    let notify: Vec<&ResolvedWatch> = watches.iter().filter(|w| w.tier == Tier::Notify).collect();
    if notify.is_empty() || !catalog_exists(client).await? {
        return Ok(());
    }
    let sql = format!(
        "SELECT channel, definition LIKE '%.signing WHERE id = 1;%' FROM {}.catalog
          WHERE channel = ANY($1) AND definition LIKE '%(_sqn_full text, _sqn_key text)%'",
        quote_ident(ddl::SCHEMA)
    );
    let names: Vec<String> = notify.iter().map(|w| w.channel.name.clone()).collect();
    let rows = client
        .query_typed(&sql, &[(&names, Type::TEXT_ARRAY)])
        .await
        .map_err(|e| Error::db("reading how notify channels are signed", e))?;
    for row in rows {
        let (channel, signed): (String, bool) = (row.get(0), row.get(1));
        let Some(w) = notify.iter().find(|w| w.channel.name == channel) else {
            continue;
        };
        if w.channel.signed != signed {
            let installed = if signed { "signed" } else { "unsigned" };
            return Err(Error::InvalidOption {
                option: "sign_notifications",
                reason: format!(
                    "channel {channel} is installed {installed} (by another notifier, or an \
                     earlier start); the notifiers listening on it would drop every event if its \
                     trigger changed. Give every notifier of this database the same \
                     sign_notifications setting, or remove the watch first (cleanup())"
                ),
            });
        }
    }
    Ok(())
}

/// Creates (or upgrades) sqlnotify's schema and tables.
async fn setup_attempt(tx: &Transaction<'_>, wait: &LockWait) -> Result<(), Failed> {
    setup_attempt_with(tx, wait, &ddl::setup_sql()).await
}

/// Runs setup SQL `sql` under the install lock, bounded by the attempt's lock timeout.
async fn setup_attempt_with(
    tx: &Transaction<'_>,
    wait: &LockWait,
    sql: &str,
) -> Result<(), Failed> {
    take_install_lock(tx, wait).await?;
    set_lock_timeout(tx, wait.attempt_budget()).await?;
    // The journal upgrade and a missing index lock sqlnotify's own tables: bounded by the
    // lock_timeout just set (the DO block keeps it when one is set).
    tx.batch_execute(sql)
        .await
        .map_err(|e| Failed::from_db(e, || Busy::OwnTables, "creating the sqlnotify schema"))
}

/// Creates sqlnotify's schema and signing key where they are missing, and nothing else: what
/// a notifier whose watches are all on the logical tier needs to sign its custom events
/// (no journal, whose purge would run in vain).
pub(crate) async fn set_up_signing(client: &mut Client, options: InstallOptions) -> Result<()> {
    let mut wait = LockWait::new("creating sqlnotify's signing key", options.timeout);
    let sql = ddl::signing_setup_sql();
    loop {
        let tx = client
            .transaction()
            .await
            .map_err(|e| Error::db("starting the install transaction", e))?;
        let outcome = setup_attempt_with(&tx, &wait, &sql).await;
        match finish(tx, outcome).await? {
            Ok(()) => return Ok(()),
            Err(busy) => wait.retry_after(busy.resolve(client).await?).await?,
        }
    }
}

/// One attempt at installing every watch that needs it; returns the channels it (re)created.
async fn install_attempt(
    tx: &Transaction<'_>,
    watches: &[ResolvedWatch],
    options: InstallOptions,
    wait: &LockWait,
) -> Result<Vec<String>, Failed> {
    take_install_lock(tx, wait).await?;
    let triggers = existing_triggers(tx).await?;
    let mut locks = Locks::default();
    if options.cleanup_on_start {
        for tables in triggers.values() {
            locks.add_all(tables, Mode::AccessExclusive);
        }
    }
    let mut plan = Vec::new();
    for w in watches {
        let action = if options.cleanup_on_start {
            "installing" // everything is dropped first
        } else {
            match installed_state(tx, w, true).await?.plan(w, options)? {
                Some(action) => action,
                None => continue,
            }
        };
        let mut targets = Locks::default();
        // Dropping the old function drops its triggers, wherever they are (a labelled
        // channel may have moved to another table).
        if !options.cleanup_on_start {
            if let Some(tables) = triggers.get(&w.channel.name) {
                targets.add_all(tables, Mode::AccessExclusive);
            }
        }
        targets.add(
            (w.channel.schema.clone(), w.channel.table.clone()),
            Mode::ShareRowExclusive,
        );
        locks.merge(&targets);
        plan.push((w, action, targets));
    }
    if !options.cleanup_on_start && plan.is_empty() {
        return Ok(Vec::new()); // nothing to change: no table is locked
    }
    attempt_locks(tx, &locks, wait).await?;
    if options.cleanup_on_start {
        let removed = drop_all(tx, &triggers).await?;
        log::info!("sqlnotify: cleanup_on_start removed {removed} installed watches");
    }
    let mut installed = Vec::with_capacity(plan.len());
    for (w, action, targets) in plan {
        let name = &w.channel.name;
        log::info!(
            "sqlnotify: {action} {name} on {}.{}",
            w.channel.schema,
            w.channel.table
        );
        let sql = format!(
            "{}{}{}",
            ddl::drop_sql(name),
            ddl::definition(w),
            ddl::catalog_upsert_sql(w)
        );
        tx.batch_execute(&sql).await.map_err(|e| {
            Failed::from_db(
                e,
                || Busy::Tables(targets.into_vec(), Vec::new()),
                format!("installing trigger {name}"),
            )
        })?;
        installed.push(name.clone());
    }
    Ok(installed)
}

/// How long an attempt waits for the install lock of another instance: waiting for it holds
/// up no writer, so longer than a table lock, but short enough to log who holds it.
const INSTALL_LOCK_SLICE: Duration = Duration::from_secs(1);

/// Takes the advisory install lock for the transaction, waiting at most one slice.
async fn take_install_lock(tx: &Transaction<'_>, wait: &LockWait) -> Result<(), Failed> {
    let slice = INSTALL_LOCK_SLICE
        .min(wait.remaining())
        .max(Duration::from_millis(1));
    set_lock_timeout(tx, slice).await?;
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1)",
        &[&ddl::INSTALL_LOCK],
    )
    .await
    .map_err(|e| Failed::from_db(e, || Busy::InstallLock, "taking the install lock"))?;
    Ok(())
}

async fn set_lock_timeout(tx: &Transaction<'_>, timeout: Duration) -> Result<(), Failed> {
    // An integer is milliseconds; 0 would mean "wait forever".
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128);
    tx.batch_execute(&format!("SET LOCAL lock_timeout = {ms}"))
        .await
        .map_err(|e| Failed::Error(Error::db("setting lock_timeout", e)))
}

/// Takes every table lock an attempt needs before its first DDL statement, one table at a
/// time in a fixed order, all within one lock budget ([`LockWait::attempt_budget`], counted
/// from the first lock): a writer of a table locked early waits at most that budget for the
/// attempt to get its other locks or give up (a rollback releases them all), never for as
/// long as someone else's transaction runs. The DDL then finds its locks already held.
///
/// `LOCK TABLE` needs UPDATE, DELETE or TRUNCATE on the table; where the installing role has
/// only TRIGGER, the table is left to the DDL, which waits at most one budget for it too.
async fn attempt_locks(tx: &Transaction<'_>, locks: &Locks, wait: &LockWait) -> Result<(), Failed> {
    let budget = wait.attempt_budget();
    let (schemas, tables): (Vec<&str>, Vec<&str>) = locks
        .0
        .keys()
        .map(|(s, t)| (s.as_str(), t.as_str()))
        .unzip();
    let lockable: Vec<bool> = tx
        .query(
            "SELECT c.oid IS NOT NULL AND pg_catalog.has_table_privilege(c.oid, 'UPDATE, DELETE, TRUNCATE')
               FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(s, t, i)
               LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = u.s
               LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = u.t
              ORDER BY u.i",
            &[&schemas, &tables],
        )
        .await
        .map_err(|e| Failed::Error(Error::db("checking table privileges", e)))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let started = Instant::now();
    for (((schema, table), mode), lockable) in locks.0.iter().zip(lockable) {
        if !lockable {
            continue;
        }
        // Who would make us wait, asked before waiting: by the time a timed-out attempt is
        // rolled back and asks again, the holder may just have finished.
        let holding = holders(tx, schema, table, *mode)
            .await
            .map_err(Failed::Error)?;
        let left = budget.saturating_sub(started.elapsed());
        set_lock_timeout(tx, left).await?;
        let sql = format!(
            "LOCK TABLE {}.{} IN {} MODE",
            quote_ident(schema),
            quote_ident(table),
            mode.sql()
        );
        tx.batch_execute(&sql).await.map_err(|e| {
            Failed::from_db(
                e,
                || Busy::Tables(vec![((schema.clone(), table.clone()), *mode)], holding),
                format!("locking {schema}.{table}"),
            )
        })?;
    }
    // For whatever the DDL still has to lock itself (see above).
    set_lock_timeout(tx, budget).await
}

/// Commits an attempt that succeeded; rolls back one that did not (releasing its locks).
async fn finish<T>(tx: Transaction<'_>, outcome: Result<T, Failed>) -> Result<Result<T, Busy>> {
    match outcome {
        Ok(value) => {
            tx.commit()
                .await
                .map_err(|e| Error::db("committing the install transaction", e))?;
            Ok(Ok(value))
        }
        Err(Failed::Busy(busy)) => {
            tx.rollback()
                .await
                .map_err(|e| Error::db("rolling back an install attempt", e))?;
            Ok(Err(busy))
        }
        Err(Failed::Error(e)) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// A table lock mode sqlnotify's DDL takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    /// `CREATE TRIGGER`.
    ShareRowExclusive,
    /// `DROP TRIGGER` (and `DROP FUNCTION … CASCADE`).
    AccessExclusive,
}

impl Mode {
    fn sql(self) -> &'static str {
        match self {
            Mode::ShareRowExclusive => "SHARE ROW EXCLUSIVE",
            Mode::AccessExclusive => "ACCESS EXCLUSIVE",
        }
    }

    /// The `pg_locks.mode`s this mode waits for.
    fn conflicts(self) -> &'static [&'static str] {
        const ALL: [&str; 8] = [
            "AccessShareLock",
            "RowShareLock",
            "RowExclusiveLock",
            "ShareUpdateExclusiveLock",
            "ShareLock",
            "ShareRowExclusiveLock",
            "ExclusiveLock",
            "AccessExclusiveLock",
        ];
        match self {
            Mode::ShareRowExclusive => &ALL[2..],
            Mode::AccessExclusive => &ALL,
        }
    }
}

/// The tables an attempt locks, each in the strongest mode it needs, in lock order.
#[derive(Debug, Clone, Default)]
struct Locks(BTreeMap<(String, String), Mode>);

impl Locks {
    fn add(&mut self, table: (String, String), mode: Mode) {
        let slot = self.0.entry(table).or_insert(mode);
        *slot = (*slot).max(mode);
    }

    fn add_all(&mut self, tables: &[(String, String)], mode: Mode) {
        for table in tables {
            self.add(table.clone(), mode);
        }
    }

    fn merge(&mut self, other: &Locks) {
        for (table, mode) in &other.0 {
            self.add(table.clone(), *mode);
        }
    }

    fn into_vec(self) -> Vec<((String, String), Mode)> {
        self.0.into_iter().collect()
    }
}

/// What an attempt could not get in time; resolved into a [`Blocked`] (with the holders'
/// pids) after the attempt's rollback.
#[derive(Debug)]
enum Busy {
    /// The advisory install lock: another instance is installing.
    InstallLock,
    /// sqlnotify's own tables (setup: the journal upgrade, a missing index).
    OwnTables,
    /// These user tables, in these modes; with the sessions seen holding a conflicting lock on
    /// the one table an attempt waited for, asked just before the wait (by the time the
    /// attempt is rolled back, they may be gone and others may hold the table).
    Tables(Vec<((String, String), Mode)>, Vec<u64>),
}

/// Why an attempt stopped.
#[derive(Debug)]
enum Failed {
    /// A lock wait hit `lock_timeout`: roll back and retry.
    Busy(Busy),
    /// Anything else: roll back and fail.
    Error(Error),
}

impl From<Error> for Failed {
    fn from(e: Error) -> Self {
        Failed::Error(e)
    }
}

impl Failed {
    /// A failed statement: a lock timeout becomes `busy()`, anything else an error.
    fn from_db(
        e: tokio_postgres::Error,
        busy: impl FnOnce() -> Busy,
        context: impl Into<String>,
    ) -> Failed {
        if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
            Failed::Busy(busy())
        } else {
            Failed::Error(Error::db(context, e))
        }
    }
}

impl Busy {
    /// Finds who holds the lock (after the attempt was rolled back, so on the plain
    /// connection). The holder may have finished meanwhile: then no pid is named.
    async fn resolve(self, client: &Client) -> Result<Blocked> {
        let context = "looking for the session holding a lock";
        let pids = |rows: Vec<tokio_postgres::Row>| -> Vec<u64> {
            rows.iter().map(|r| r.get::<_, i32>(0) as u64).collect()
        };
        match self {
            Busy::InstallLock => {
                let key = ddl::INSTALL_LOCK as u64;
                let rows = client
                    .query(
                        "SELECT DISTINCT l.pid FROM pg_catalog.pg_locks l
                          WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                            AND l.classid::int8 = $1 AND l.objid::int8 = $2
                            AND l.pid <> pg_catalog.pg_backend_pid()
                            AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                               WHERE datname = pg_catalog.current_database())
                          ORDER BY 1",
                        &[&((key >> 32) as i64), &((key & 0xffff_ffff) as i64)],
                    )
                    .await
                    .map_err(|e| Error::db(context, e))?;
                Ok(Blocked {
                    object: INSTALL_LOCK_OBJECT.to_string(),
                    holder_pids: pids(rows),
                })
            }
            Busy::OwnTables => {
                let rows = client
                    .query(
                        "SELECT c.relname::text, pg_catalog.array_agg(DISTINCT l.pid ORDER BY l.pid)
                           FROM pg_catalog.pg_locks l
                           JOIN pg_catalog.pg_class c ON c.oid = l.relation
                           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = $1 AND c.relkind = 'r' AND l.granted
                            AND l.pid <> pg_catalog.pg_backend_pid()
                            AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                               WHERE datname = pg_catalog.current_database())
                          GROUP BY 1 ORDER BY 1",
                        &[&ddl::SCHEMA],
                    )
                    .await
                    .map_err(|e| Error::db(context, e))?;
                let names: Vec<String> = rows
                    .iter()
                    .map(|r| format!("{}.{}", ddl::SCHEMA, r.get::<_, String>(0)))
                    .collect();
                let mut holder_pids: Vec<u64> = rows
                    .iter()
                    .flat_map(|r| r.get::<_, Vec<i32>>(1))
                    .map(|pid| pid as u64)
                    .collect();
                holder_pids.sort_unstable();
                holder_pids.dedup();
                Ok(Blocked {
                    object: if names.is_empty() {
                        format!("the tables of the {} schema", ddl::SCHEMA)
                    } else {
                        names.join(", ")
                    },
                    holder_pids,
                })
            }
            Busy::Tables(tables, seen) => {
                for ((schema, table), mode) in &tables {
                    // Those seen before the wait are the ones waited for; asking now may also
                    // find writers that got their lock after the attempt gave up.
                    let holder_pids = match (tables.len(), seen.is_empty()) {
                        (1, false) => seen.clone(),
                        _ => holders(client, schema, table, *mode).await?,
                    };
                    if !holder_pids.is_empty() {
                        return Ok(Blocked {
                            object: format!("{schema}.{table}"),
                            holder_pids,
                        });
                    }
                }
                Ok(Blocked {
                    object: tables
                        .first()
                        .map(|((s, t), _)| format!("{s}.{t}"))
                        .unwrap_or_else(|| "a table".into()),
                    holder_pids: Vec::new(),
                })
            }
        }
    }
}

/// The sessions holding a lock on `schema.table` (or one of its partitions or children, which
/// `LOCK TABLE` and trigger DDL lock too) that conflicts with `mode`.
async fn holders(
    client: &impl GenericClient,
    schema: &str,
    table: &str,
    mode: Mode,
) -> Result<Vec<u64>> {
    let rows = client
        .query(
            "WITH RECURSIVE rel(oid) AS (
                 SELECT c.oid FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2
               UNION
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i
                   JOIN rel ON i.inhparent = rel.oid)
             SELECT DISTINCT l.pid FROM pg_catalog.pg_locks l JOIN rel ON l.relation = rel.oid
              WHERE l.granted AND l.pid <> pg_catalog.pg_backend_pid()
                AND l.mode = ANY($3)
                AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                   WHERE datname = pg_catalog.current_database())
              ORDER BY 1",
            &[&schema, &table, &mode.conflicts()],
        )
        .await
        .map_err(|e| Error::db("looking for the session holding a lock", e))?;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0) as u64).collect())
}

/// Every sqlnotify trigger function (by name, which is its channel) with the tables its
/// triggers are on (partition clones left out: locking a parent locks its partitions).
async fn existing_triggers(
    tx: &impl GenericClient,
) -> Result<BTreeMap<String, Vec<(String, String)>>, Failed> {
    let rows = tx
        .query(
            "SELECT DISTINCT p.proname::text, n.nspname::text, c.relname::text
               FROM pg_catalog.pg_proc p
               JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace
               LEFT JOIN pg_catalog.pg_trigger t ON t.tgfoid = p.oid AND t.tgparentid = 0
               LEFT JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
               LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE pn.nspname = $1
              ORDER BY 1, 2, 3",
            &[&ddl::SCHEMA],
        )
        .await
        .map_err(|e| Failed::Error(Error::db("listing sqlnotify triggers", e)))?;
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for row in rows {
        let tables = out.entry(row.get(0)).or_default();
        if let (Some(schema), Some(table)) = (row.get(1), row.get(2)) {
            tables.push((schema, table));
        }
    }
    Ok(out)
}

/// Checks that every watch is installed exactly as generated (for externally managed DDL),
/// and that the journal tiers' tables have this version's columns (an install script of an
/// older version lacks the journal's `events`, which the listener reads, or the purge record's
/// `snapshot` and `writer`, which the purge writes).
async fn verify(client: &Client, watches: &[ResolvedWatch]) -> Result<()> {
    let exists = catalog_exists(client).await?;
    for w in watches {
        installed_state(client, w, exists).await?.verify(w)?;
    }
    let Some(journaled) = watches.iter().find(|w| w.tier != Tier::Notify) else {
        return Ok(());
    };
    let missing: Option<String> = client
        .query_typed_one(
            "SELECT (SELECT pg_catalog.string_agg(c.t || '.' || c.a, ', ')
                       FROM (VALUES ('journal', 'events'), ('trimmed', 'snapshot'), ('trimmed', 'writer')) c(t, a)
                      WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                                         WHERE attrelid = pg_catalog.to_regclass('sqlnotify.' || c.t)
                                           AND attname = c.a AND NOT attisdropped))",
            &[],
        )
        .await
        .map_err(|e| Error::db("checking the journal tables' columns", e))?
        .get(0);
    let Some(missing) = missing else {
        return Ok(());
    };
    Err(Error::DefinitionDrift {
        channel: journaled.channel.name.clone(),
        table: format!("{}.{}", journaled.channel.schema, journaled.channel.table),
        detail: format!(
            "sqlnotify's tables lack the columns this version uses ({missing}; they were \
             created by an older install script): apply this version's install_sql(), which \
             adds them"
        ),
    })
}

/// Refuses [`Capture::Statement`] on the notify tier (it has no journal to carry a
/// statement's rows) and where a statement-level trigger cannot see every write:
/// it fires only for the table a statement names, so on a partitioned or inheritance parent
/// it misses writes that name a partition or child, and on a partition or child it misses
/// writes made through the parent. Row triggers have neither problem (PostgreSQL clones them
/// to every partition), so such tables keep [`Capture::Row`].
pub(crate) async fn check_statement_capture(
    client: &Client,
    watches: &[ResolvedWatch],
) -> Result<()> {
    let describe = |w: &ResolvedWatch| {
        format!(
            "{}.{} {}",
            w.channel.schema, w.channel.table, w.channel.operation
        )
    };
    if let Some(w) = watches
        .iter()
        .find(|w| w.capture == Capture::Statement && w.tier == Tier::Notify)
    {
        return Err(Error::InvalidWatch {
            watch: describe(w),
            reason: "Capture::Statement needs a journal tier (Tier::Durable or Tier::Poll); \
                     the notify tier sends one notification per row"
                .into(),
        });
    }
    const SQL: &str = "
        SELECT c.relkind = 'p' OR c.relispartition
               OR EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
                           WHERE i.inhrelid = c.oid OR i.inhparent = c.oid)
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2";
    for w in watches
        .iter()
        .filter(|w| w.capture == Capture::Statement && w.tier != Tier::Notify)
    {
        let (schema, table) = (&w.channel.schema, &w.channel.table);
        let inherited = client
            .query_typed_opt(SQL, &[(schema, Type::TEXT), (table, Type::TEXT)])
            .await
            .map_err(|e| Error::db(format!("checking partitions of {schema}.{table}"), e))?
            .is_some_and(|r| r.get::<_, bool>(0));
        if inherited {
            return Err(Error::InvalidWatch {
                watch: describe(w),
                reason: "Capture::Statement cannot see every write to a partitioned or \
                         inheritance table (a statement-level trigger fires only for the table \
                         a statement names); use Capture::Row, whose trigger PostgreSQL clones \
                         to every partition"
                    .into(),
            });
        }
    }
    Ok(())
}

/// The locks dropping the triggers of `triggers` takes (channel → its tables).
fn drop_locks(triggers: &BTreeMap<String, Vec<(String, String)>>) -> Locks {
    let mut locks = Locks::default();
    for tables in triggers.values() {
        locks.add_all(tables, Mode::AccessExclusive);
    }
    locks
}

/// Drops the watches of `triggers` (functions, helpers and, by CASCADE, triggers); their
/// tables are locked already ([`attempt_locks`]). A lock failure names the watch's tables.
async fn drop_triggers(
    tx: &Transaction<'_>,
    triggers: &BTreeMap<String, Vec<(String, String)>>,
) -> Result<(), Failed> {
    for (channel, tables) in triggers {
        tx.batch_execute(&ddl::drop_sql(channel))
            .await
            .map_err(|e| {
                let mut locks = Locks::default();
                locks.add_all(tables, Mode::AccessExclusive);
                Failed::from_db(
                    e,
                    || Busy::Tables(locks.into_vec(), Vec::new()),
                    format!("removing trigger {channel}"),
                )
            })?;
    }
    Ok(())
}

/// Drops every sqlnotify trigger function (and, by CASCADE, trigger) and empties the catalog.
/// The tables are locked already ([`attempt_locks`]).
async fn drop_all(
    tx: &Transaction<'_>,
    triggers: &BTreeMap<String, Vec<(String, String)>>,
) -> Result<u64, Failed> {
    drop_triggers(tx, triggers).await?;
    if catalog_exists(tx).await? {
        tx.batch_execute(&format!(
            "DELETE FROM {}.catalog;\n",
            quote_ident(ddl::SCHEMA)
        ))
        .await
        .map_err(|e| Failed::Error(Error::db("emptying the sqlnotify catalog", e)))?;
    }
    Ok(triggers.len() as u64)
}

/// Removes every sqlnotify object in the database (triggers, functions, catalog entries),
/// retrying busy locks until `timeout`.
pub(crate) async fn cleanup_all(client: &mut Client, timeout: Duration) -> Result<u64> {
    let mut wait = LockWait::new("removing triggers", timeout);
    loop {
        let tx = client
            .transaction()
            .await
            .map_err(|e| Error::db("starting the cleanup transaction", e))?;
        let outcome = cleanup_attempt(&tx, &wait).await;
        match finish(tx, outcome).await? {
            Ok(n) => return Ok(n),
            Err(busy) => wait.retry_after(busy.resolve(client).await?).await?,
        }
    }
}

async fn cleanup_attempt(tx: &Transaction<'_>, wait: &LockWait) -> Result<u64, Failed> {
    take_install_lock(tx, wait).await?;
    let triggers = existing_triggers(tx).await?;
    attempt_locks(tx, &drop_locks(&triggers), wait).await?;
    drop_all(tx, &triggers).await
}

/// Removes the objects of `channels` and their catalog entries, retrying busy locks until
/// `timeout`.
pub(crate) async fn uninstall(
    client: &mut Client,
    channels: &[String],
    timeout: Duration,
) -> Result<()> {
    let mut wait = LockWait::new("removing triggers", timeout);
    loop {
        let tx = client
            .transaction()
            .await
            .map_err(|e| Error::db("starting the uninstall transaction", e))?;
        let outcome = uninstall_attempt(&tx, channels, &wait).await;
        match finish(tx, outcome).await? {
            Ok(()) => return Ok(()),
            Err(busy) => wait.retry_after(busy.resolve(client).await?).await?,
        }
    }
}

async fn uninstall_attempt(
    tx: &Transaction<'_>,
    channels: &[String],
    wait: &LockWait,
) -> Result<(), Failed> {
    take_install_lock(tx, wait).await?;
    let mut triggers = existing_triggers(tx).await?;
    triggers.retain(|channel, _| channels.contains(channel));
    attempt_locks(tx, &drop_locks(&triggers), wait).await?;
    drop_triggers(tx, &triggers).await?;
    if catalog_exists(tx).await? {
        let delete = format!(
            "DELETE FROM {}.catalog WHERE channel = ANY($1)",
            quote_ident(ddl::SCHEMA)
        );
        tx.execute(&delete, &[&channels])
            .await
            .map_err(|e| Failed::Error(Error::db("removing catalog entries", e)))?;
    }
    Ok(())
}
