//! Reading table descriptions from `information_schema` and keeping sqlnotify's catalog:
//! installing, verifying and removing triggers.
//!
//! MySQL runs DDL outside transactions (each statement commits), so instead of one install
//! transaction, installs are serialised across processes with the named lock
//! `GET_LOCK('sqlnotify_install', …)`, released at the end whatever happened, and every
//! watch is planned (drift errors included) before the first trigger is touched.
//!
//! `CREATE TRIGGER` and `DROP TRIGGER` need the table's exclusive metadata lock, which waits
//! for every open transaction that touched the table — and every later statement on the table
//! queues behind that wait. So each DDL statement runs with `lock_wait_timeout` = 1 s and is
//! retried with backoff until the install timeout (`ddl_statement`), then fails with
//! `Error::LockTimeout`; waiting for the install lock is bounded by the same timeout. Drift detection
//! compares the generated trigger text with the one recorded in `sqlnotify_catalog` at install
//! time; unchanged triggers are left alone. A changed trigger is replaced in one statement on
//! MariaDB (`CREATE OR REPLACE TRIGGER`); on MySQL it is dropped and created again, so writes
//! to that table in the instant between the two are not seen.
//!
//! Triggers are created under `ddl::TRIGGER_SQL_MODE` (the session's mode is restored
//! afterwards), and an installed trigger whose `information_schema.TRIGGERS.SQL_MODE` differs
//! counts as changed: see `ddl.rs` for why. With binary logging on (the default on MySQL 8 and
//! later) the server refuses CREATE TRIGGER to a user without SUPER unless
//! `log_bin_trust_function_creators` is on; that refusal comes back as an error saying so.
//!
//! `information_schema` compares names case-insensitively on some servers, so every lookup
//! also compares the returned names exactly.

use std::collections::BTreeSet;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::Conn;

use super::ddl::{self, qualified, CATALOG, INSTALL_LOCK, TRIGGER_SQL_MODE};
use super::journal;
use crate::dialect::{InstallOptions, Installed};
use crate::error::{Error, Result};
use crate::lockwait::{Blocked, LockWait, INSTALL_LOCK_OBJECT};
use crate::resolve::{ColumnInfo, ResolvedWatch, TableInfo};

/// Wraps a driver error with what sqlnotify was doing.
pub(crate) fn db_err(context: impl Into<String>) -> impl FnOnce(mysql_async::Error) -> Error {
    let context = context.into();
    move |e| Error::db(context, e)
}

/// Reads one table: its columns in order, its primary key in key order, and how each
/// column's values go into a payload.
pub(crate) async fn describe_table(
    conn: &mut Conn,
    schema: &str,
    table: &str,
) -> Result<TableInfo> {
    let context = || format!("reading the columns of {schema}.{table}");
    let schemas: Vec<String> = conn
        .exec(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
            (schema,),
        )
        .await
        .map_err(db_err(context()))?;
    if !schemas.iter().any(|s| s == schema) {
        return Err(Error::UnknownSchema {
            schema: schema.to_string(),
        });
    }
    let tables: Vec<(String, String)> = conn
        .exec(
            "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
            (schema, table),
        )
        .await
        .map_err(db_err(context()))?;
    let is_table = tables
        .iter()
        .any(|(name, kind)| name == table && (kind == "BASE TABLE" || kind == "SYSTEM VERSIONED"));
    if !is_table {
        return Err(Error::UnknownTable {
            schema: schema.to_string(),
            table: table.to_string(),
        });
    }
    let columns: Vec<(String, String, String, String)> = conn
        .exec(
            "SELECT TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (schema, table),
        )
        .await
        .map_err(db_err(context()))?;
    let key: Vec<(String, String, String)> = conn
        .exec(
            "SELECT TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND INDEX_NAME = 'PRIMARY' \
             ORDER BY SEQ_IN_INDEX",
            (schema, table),
        )
        .await
        .map_err(db_err(context()))?;
    let key: Vec<String> = key
        .into_iter()
        .filter(|(s, t, _)| s == schema && t == table)
        .map(|(_, _, c)| c)
        .collect();
    let columns = columns
        .into_iter()
        .filter(|(s, t, _, _)| s == schema && t == table)
        .map(|(_, _, name, data_type)| ColumnInfo {
            pk_position: key.iter().position(|k| k == &name),
            name,
            has_equality: true,
            equality_schema: None,
            data_type,
        })
        .collect();
    Ok(TableInfo {
        schema: schema.to_string(),
        table: table.to_string(),
        columns,
        in_hierarchy: false,
    })
}

/// Whether `database` has sqlnotify's catalog table.
pub(crate) async fn catalog_exists(conn: &mut Conn, database: &str) -> Result<bool> {
    let names: Vec<String> = conn
        .exec(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
            (database, CATALOG),
        )
        .await
        .map_err(db_err("looking for the sqlnotify catalog"))?;
    Ok(names.iter().any(|n| n == CATALOG))
}

/// The trigger `schema`.`name`, if it exists: the table it is on, the `sql_mode` it runs
/// under and its body.
struct Trigger {
    table: String,
    mode: Vec<u8>,
    body: String,
}

/// A row of `information_schema.TRIGGERS`: schema, name, table, `sql_mode`, body.
type TriggerRow = (String, String, String, Vec<u8>, Vec<u8>);

async fn trigger_table(conn: &mut Conn, schema: &str, name: &str) -> Result<Option<Trigger>> {
    // SQL_MODE is a SET on MySQL and a VARCHAR on MariaDB: read as bytes on both.
    let rows: Vec<TriggerRow> = conn
        .exec(
            "SELECT TRIGGER_SCHEMA, TRIGGER_NAME, EVENT_OBJECT_TABLE, SQL_MODE, ACTION_STATEMENT \
             FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = ? AND TRIGGER_NAME = ?",
            (schema, name),
        )
        .await
        .map_err(db_err(format!("looking for trigger {name}")))?;
    Ok(rows
        .into_iter()
        .find(|(s, n, ..)| s == schema && n == name)
        .map(|(_, _, table, mode, body)| Trigger {
            table,
            mode,
            body: String::from_utf8_lossy(&body).into_owned(),
        }))
}

/// The journal, other than `journal`, that a trigger with body `body` writes to: a sqlnotify
/// trigger installed for another database (a notifier whose URL names another one), shown
/// as its body names it. `None` for one writing to `journal`, or to no sqlnotify journal.
fn other_journal<'b>(body: &'b str, journal: &str) -> Option<&'b str> {
    if body.contains(journal) {
        return None;
    }
    let end = body.find(&format!(".`{}`", ddl::JOURNAL))? + ddl::JOURNAL.len() + 3;
    let start = body[..end]
        .rfind("INSERT INTO ")
        .map_or(0, |i| i + "INSERT INTO ".len());
    Some(&body[start..end])
}

async fn installed_state(
    conn: &mut Conn,
    w: &ResolvedWatch,
    database: &str,
    catalog: bool,
) -> Result<Installed> {
    let name = &w.channel.name;
    // One trigger name per watched table and operation (and label): were another database's
    // notifier to own it, installing here would silently take its events away, and it would
    // take them back at its next start.
    let trigger = trigger_table(conn, &w.channel.schema, name).await?;
    if let Some(trigger) = &trigger {
        let journal = qualified(database, ddl::JOURNAL);
        if let Some(other) = (trigger.table == w.channel.table)
            .then(|| other_journal(&trigger.body, &journal))
            .flatten()
        {
            return Err(Error::InvalidWatch {
                watch: describe(w),
                reason: format!(
                    "its trigger {name} already feeds the journal {} of another database's \
                     sqlnotify, not {journal}: remove that watch first (`sqlnotify cleanup` \
                     on that database), or give this one a channel_label",
                    crate::sql::comment(other)
                ),
            });
        }
    }
    if !catalog {
        return Ok(Installed::Missing);
    }
    type Entry = (Vec<u8>, String, String, String);
    let recorded: Option<Entry> = conn
        .exec_first(
            format!(
                "SELECT `definition`, `table_schema`, `table_name`, `operation` FROM {} \
                 WHERE `channel` = ?",
                qualified(database, CATALOG)
            ),
            (name,),
        )
        .await
        .map_err(db_err(format!("reading the catalog entry of {name}")))?;
    let Some((recorded, schema, table, operation)) = recorded else {
        return Ok(Installed::Missing);
    };
    // A label may move to another table (its old trigger is dropped, by design); a default
    // name is the table's own (`a_b.c` and `a.b_c` both give `sqlnotify_a_b_c_insert`), so
    // another table's entry under it is a collision — while that table still has the
    // channel's trigger (else the entry is stale: the table renamed or dropped).
    if w.channel.label.is_none() && (schema != w.channel.schema || table != w.channel.table) {
        let installed = trigger_table(conn, &schema, name).await?;
        // Any case: with `lower_case_table_names` the server shows the table in lower case.
        if installed.is_some_and(|t| t.table.eq_ignore_ascii_case(&table)) {
            return Err(Error::ChannelTaken {
                channel: name.clone(),
                watch: describe(w),
                installed_watch: format!("{schema}.{table} {}", operation.to_ascii_uppercase()),
            });
        }
    }
    let on_table = trigger.as_ref().is_some_and(|t| t.table == w.channel.table);
    // A trigger created under another sql_mode (by hand, or by an older version) could fail
    // the user's writes: it counts as changed.
    let mode_ok = trigger
        .as_ref()
        .is_none_or(|t| t.mode == TRIGGER_SQL_MODE.as_bytes());
    Ok(Installed::Recorded {
        same: recorded == ddl::trigger_sql(w, database).into_bytes() && mode_ok,
        trigger: on_table,
    })
}

/// Takes the install lock, waiting for another installer in slices of at most a second (so
/// the wait is logged with the holder's connection id) until `wait` runs out; then sets the
/// session's `lock_wait_timeout` for DDL (see [`ddl`]). [`unlock`] undoes both.
async fn lock(conn: &mut Conn, wait: &mut LockWait) -> Result<()> {
    loop {
        let slice = wait.remaining().min(Duration::from_secs(1));
        let got: Option<Option<i64>> = conn
            .exec_first("SELECT GET_LOCK(?, ?)", (INSTALL_LOCK, slice.as_secs_f64()))
            .await
            .map_err(db_err("taking the sqlnotify install lock"))?;
        if got.flatten() == Some(1) {
            break;
        }
        let holder: Option<Option<u64>> = conn
            .exec_first("SELECT IS_USED_LOCK(?)", (INSTALL_LOCK,))
            .await
            .map_err(db_err(
                "looking for the holder of the sqlnotify install lock",
            ))?;
        let blocked = Blocked {
            object: INSTALL_LOCK_OBJECT.to_string(),
            holder_pids: holder.flatten().into_iter().collect(),
        };
        // Give up when the time is over; no backoff sleep: GET_LOCK itself waited.
        wait.note(blocked)?;
    }
    let set = conn
        .query_drop(format!(
            "SET @sqlnotify_saved_lock_wait = @@SESSION.lock_wait_timeout, \
             SESSION lock_wait_timeout = {DDL_LOCK_WAIT_SECS}"
        ))
        .await
        .map_err(db_err("setting lock_wait_timeout"));
    if let Err(e) = set {
        return unlock(conn, Err(e)).await;
    }
    Ok(())
}

/// How long one DDL statement waits for a table's metadata lock: the smallest wait MySQL
/// allows (whole seconds; MariaDB's 0 would be "no wait at all", which never gets a lock on
/// a busy table).
const DDL_LOCK_WAIT_SECS: u32 = 1;

/// MySQL's and MariaDB's error for a lock wait over `lock_wait_timeout`.
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;

/// Runs one DDL statement that locks `table` (`schema`, `name`), retrying while another
/// session holds the table's metadata lock: each try waits at most [`DDL_LOCK_WAIT_SECS`], so
/// the application's writes queued behind it wait at most that long. DDL statements commit
/// on their own, so no lock is held between tries or across statements. Other errors go
/// through `on_error`.
async fn ddl_statement(
    conn: &mut Conn,
    wait: &mut LockWait,
    sql: &str,
    table: (&str, &str),
    on_error: impl FnOnce(mysql_async::Error) -> Error,
) -> Result<()> {
    loop {
        match conn.query_drop(sql).await {
            Ok(()) => return Ok(()),
            Err(mysql_async::Error::Server(e)) if e.code == ER_LOCK_WAIT_TIMEOUT => {
                let holder_pids = metadata_lock_holders(conn, table.0, table.1).await;
                let blocked = Blocked {
                    object: format!("{}.{}", table.0, table.1),
                    holder_pids,
                };
                wait.retry_after(blocked).await?;
            }
            Err(e) => return Err(on_error(e)),
        }
    }
}

/// The connection ids of the sessions holding a metadata lock on `schema`.`table`, from
/// MariaDB's `metadata_lock_info` plugin or from `performance_schema` (on by default in
/// MySQL, off in MariaDB); empty when neither is available — never guessed.
async fn metadata_lock_holders(conn: &mut Conn, schema: &str, table: &str) -> Vec<u64> {
    const SOURCES: [&str; 2] = [
        "SELECT DISTINCT THREAD_ID FROM information_schema.METADATA_LOCK_INFO \
         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND THREAD_ID <> CONNECTION_ID() \
         ORDER BY THREAD_ID",
        "SELECT DISTINCT t.PROCESSLIST_ID FROM performance_schema.metadata_locks m \
         JOIN performance_schema.threads t ON t.THREAD_ID = m.OWNER_THREAD_ID \
         WHERE m.OBJECT_TYPE = 'TABLE' AND m.OBJECT_SCHEMA = ? AND m.OBJECT_NAME = ? \
         AND m.LOCK_STATUS = 'GRANTED' AND t.PROCESSLIST_ID <> CONNECTION_ID() \
         ORDER BY t.PROCESSLIST_ID",
    ];
    for sql in SOURCES {
        // A missing plugin or schema is an error here: try the next source.
        if let Ok(ids) = conn.exec::<Option<u64>, _, _>(sql, (schema, table)).await {
            let ids: Vec<u64> = ids.into_iter().flatten().collect();
            if !ids.is_empty() {
                return ids;
            }
        }
    }
    Vec::new()
}

/// Restores the session's `lock_wait_timeout` and releases the install lock, whatever
/// `outcome` was; returns `outcome`.
async fn unlock<T>(conn: &mut Conn, outcome: Result<T>) -> Result<T> {
    let restored = conn
        .query_drop(
            "SET SESSION lock_wait_timeout = \
             COALESCE(@sqlnotify_saved_lock_wait, @@GLOBAL.lock_wait_timeout)",
        )
        .await
        .map_err(db_err("restoring lock_wait_timeout"));
    let released = conn
        .exec_drop("SELECT RELEASE_LOCK(?)", (INSTALL_LOCK,))
        .await
        .map_err(db_err("releasing the sqlnotify install lock"));
    let value = outcome?;
    restored?;
    released?;
    Ok(value)
}

/// Installs (or, with `manage_triggers` off, verifies) `watches`; returns the channels whose
/// triggers it created or replaced.
pub(crate) async fn install(
    conn: &mut Conn,
    database: &str,
    watches: &[ResolvedWatch],
    options: InstallOptions,
    transaction_ids: bool,
) -> Result<Vec<String>> {
    check_trigger_names(watches)?;
    if !options.manage_triggers {
        verify(conn, database, watches).await?;
        if transaction_ids && !journal::records_transactions(conn, database).await? {
            return Err(Error::InvalidOption {
                option: "mysql_transaction_ids",
                reason: format!(
                    "the journal of {database:?} does not record transactions, and with \
                     manage_triggers(false) sqlnotify changes nothing: apply install_sql()'s \
                     transaction part (`{}`) as an administrator",
                    ddl::journal_transactions_statement(database)
                ),
            });
        }
        return Ok(Vec::new());
    }
    let version: Option<String> = conn
        .query_first("SELECT VERSION()")
        .await
        .map_err(db_err("reading the server version"))?;
    let mariadb = version.as_deref().is_some_and(|v| v.contains("MariaDB"));
    if transaction_ids && !mariadb {
        return Err(Error::Unsupported {
            what: format!(
                "mysql_transaction_ids on {} (MySQL): a MySQL trigger cannot learn its \
                 transaction and the server has no per-row transaction stamp; MariaDB (10.3.4 \
                 or later) has one (transaction-precise system versioning)",
                version.as_deref().unwrap_or("this server")
            ),
        });
    }
    let mut wait = LockWait::new("installing triggers", options.timeout);
    lock(conn, &mut wait).await?;
    let outcome = async {
        for (statement, table) in ddl::setup_statements(database).into_iter().zip([
            CATALOG,
            ddl::JOURNAL,
            ddl::CONSUMERS,
            ddl::DEAD_LETTERS,
            ddl::TRIMMED,
        ]) {
            ddl_statement(
                conn,
                &mut wait,
                &statement,
                (database, table),
                db_err("creating the sqlnotify tables"),
            )
            .await?;
        }
        if transaction_ids {
            record_transactions(conn, database, &mut wait).await?;
        }
        if options.cleanup_on_start {
            let removed = drop_all(conn, database, &mut wait).await?;
            log::info!("sqlnotify: cleanup_on_start removed {removed} installed watches");
        }
        // Plan every watch before changing any: MySQL DDL cannot be rolled back, so a drift
        // error must come before the first trigger is touched.
        let mut plan = Vec::new();
        for w in watches {
            let state = installed_state(conn, w, database, true).await?;
            if let Some(action) = state.plan(w, options)? {
                plan.push((w, action));
            }
        }
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        if !mariadb {
            // MySQL replaces a trigger by dropping it first: make sure the server will let us
            // create one before any is dropped.
            probe_trigger_privilege(conn, database, &mut wait).await?;
        }
        conn.query_drop(ddl::enter_trigger_sql_mode())
            .await
            .map_err(db_err("setting the sql_mode for creating triggers"))?;
        let mut installed = Vec::with_capacity(plan.len());
        let mut outcome = Ok(());
        for (w, action) in plan {
            outcome = install_one(conn, database, w, action, mariadb, &mut wait).await;
            if outcome.is_err() {
                break;
            }
            installed.push(w.channel.name.clone());
        }
        let restored = conn
            .query_drop(ddl::LEAVE_TRIGGER_SQL_MODE)
            .await
            .map_err(db_err("restoring the session's sql_mode"));
        outcome?;
        restored.map(|()| installed)
    }
    .await;
    unlock(conn, outcome).await
}

/// Makes the journal record each row's transaction (MariaDB), unless it does. The rows it
/// already has are stamped with that change's own transaction: the journal's comment says up
/// to which id, so that they read as rows without a transaction rather than as one.
async fn record_transactions(conn: &mut Conn, database: &str, wait: &mut LockWait) -> Result<()> {
    if journal::records_transactions(conn, database).await? {
        return Ok(());
    }
    let context = "making the journal record transactions";
    let journal_table = qualified(database, ddl::JOURNAL);
    let had_rows: Option<Option<i64>> = conn
        .query_first(format!("SELECT MAX(`id`) FROM {journal_table}"))
        .await
        .map_err(db_err(context))?;
    ddl_statement(
        conn,
        wait,
        &ddl::journal_transactions_statement(database),
        (database, ddl::JOURNAL),
        db_err(context),
    )
    .await?;
    // Every row there was before has the lowest row's stamp (ids only grow).
    let before: Option<Option<i64>> = conn
        .query_first(format!(
            "SELECT MAX(`id`) FROM {journal_table} WHERE `{tx}` = \
             (SELECT `{tx}` FROM {journal_table} ORDER BY `id` LIMIT 1)",
            tx = ddl::JOURNAL_TX
        ))
        .await
        .map_err(db_err(context))?;
    let before = match had_rows.flatten() {
        Some(_) => before.flatten().unwrap_or(0),
        None => 0,
    };
    ddl_statement(
        conn,
        wait,
        &format!(
            "ALTER TABLE {journal_table} COMMENT = {}",
            ddl::quote_literal(&journal::journal_comment(before))
        ),
        (database, ddl::JOURNAL),
        db_err(context),
    )
    .await?;
    log::info!(
        "sqlnotify: the journal of {database:?} records transactions after journal id {before}"
    );
    Ok(())
}

/// MySQL's and MariaDB's error for CREATE TRIGGER by a user without SUPER while binary
/// logging is on and `log_bin_trust_function_creators` is off.
const ER_BINLOG_CREATE_ROUTINE_NEED_SUPER: u16 = 1419;

/// The error for a failed trigger statement (`doing`: what sqlnotify was doing); the
/// binary-logging refusal says what to change.
fn trigger_err(doing: String) -> impl FnOnce(mysql_async::Error) -> Error {
    move |e| {
        let context = match &e {
            mysql_async::Error::Server(s) if s.code == ER_BINLOG_CREATE_ROUTINE_NEED_SUPER => {
                format!(
                    "{doing}: binary logging is on, and the server lets only a user with SUPER \
                     create triggers unless log_bin_trust_function_creators = 1 (set it in the \
                     server configuration, or SET PERSIST / SET GLOBAL \
                     log_bin_trust_function_creators = 1 as an administrator); or have an \
                     administrator apply install_sql() and start with manage_triggers(false)"
                )
            }
            _ => doing,
        };
        Error::db(context, e)
    }
}

/// Creates and drops a do-nothing trigger on sqlnotify's own catalog table: fails with
/// [`trigger_err`]'s explanation when the server refuses this user triggers (binary logging
/// without SUPER), before any of the user's triggers is touched.
async fn probe_trigger_privilege(
    conn: &mut Conn,
    database: &str,
    wait: &mut LockWait,
) -> Result<()> {
    let probe = "sqlnotify_probe_privileges";
    let drop = ddl::drop_sql(database, probe);
    let context = "checking the privilege to create triggers";
    let table = (database, CATALOG);
    ddl_statement(conn, wait, &drop, table, db_err(context)).await?;
    let create = format!(
        "CREATE TRIGGER {} BEFORE DELETE ON {} FOR EACH ROW SET @sqlnotify_probe = 1",
        qualified(database, probe),
        qualified(database, CATALOG)
    );
    ddl_statement(conn, wait, &create, table, |e| {
        trigger_err(context.into())(e)
    })
    .await?;
    ddl_statement(conn, wait, &drop, table, db_err(context)).await
}

async fn install_one(
    conn: &mut Conn,
    database: &str,
    w: &ResolvedWatch,
    action: &str,
    mariadb: bool,
    wait: &mut LockWait,
) -> Result<()> {
    let name = &w.channel.name;
    log::info!(
        "sqlnotify: {action} {name} on {}.{}",
        w.channel.schema,
        w.channel.table
    );
    let create = ddl::trigger_sql(w, database);
    let table = (w.channel.schema.as_str(), w.channel.table.as_str());
    let context = format!("installing trigger {name}");
    let on_error = |e| trigger_err(context.clone())(e);
    if mariadb {
        let replace = create.replacen("CREATE TRIGGER", "CREATE OR REPLACE TRIGGER", 1);
        ddl_statement(conn, wait, &replace, table, on_error).await?;
    } else {
        // A trigger of this name on another table (a label moved) locks that table: it is
        // named in the error only as this watch's table.
        let drop = ddl::drop_sql(&w.channel.schema, name);
        ddl_statement(conn, wait, &drop, table, on_error).await?;
        ddl_statement(conn, wait, &create, table, on_error).await?;
    }
    conn.query_drop(ddl::catalog_upsert_sql(w, database))
        .await
        .map_err(db_err(format!("recording trigger {name} in the catalog")))
}

fn describe(w: &ResolvedWatch) -> String {
    let c = &w.channel;
    format!("{}.{} {}", c.schema, c.table, c.operation)
}

/// Trigger names are case-insensitive on some platforms (and with `lower_case_table_names`):
/// two channels differing only in case could share one trigger, and installing the second
/// would replace the first. Refused everywhere, so a program behaves the same on every server.
fn check_trigger_names(watches: &[ResolvedWatch]) -> Result<()> {
    for (i, a) in watches.iter().enumerate() {
        for b in &watches[i + 1..] {
            if a.channel.name.eq_ignore_ascii_case(&b.channel.name)
                && a.channel.schema.eq_ignore_ascii_case(&b.channel.schema)
            {
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

async fn verify(conn: &mut Conn, database: &str, watches: &[ResolvedWatch]) -> Result<()> {
    let catalog = catalog_exists(conn, database).await?;
    for w in watches {
        installed_state(conn, w, database, catalog)
            .await?
            .verify(w)?;
    }
    Ok(())
}

/// Drops every trigger recorded in the catalog (but one that now writes to another
/// database's journal), plus any `sqlnotify_…` trigger that writes to this database's
/// journal, and empties the catalog. Returns how many triggers were dropped.
async fn drop_all(conn: &mut Conn, database: &str, wait: &mut LockWait) -> Result<u64> {
    let context = "listing sqlnotify triggers";
    let recorded: BTreeSet<(String, String)> = conn
        .query::<(String, String), _>(format!(
            "SELECT `table_schema`, `channel` FROM {}",
            qualified(database, CATALOG)
        ))
        .await
        .map_err(db_err(context))?
        .into_iter()
        .collect();
    let journal = qualified(database, ddl::JOURNAL);
    let existing: Vec<(String, String, String, Vec<u8>)> = conn
        .query(
            "SELECT TRIGGER_SCHEMA, TRIGGER_NAME, EVENT_OBJECT_TABLE, ACTION_STATEMENT \
             FROM information_schema.TRIGGERS WHERE TRIGGER_NAME LIKE 'sqlnotify%'",
        )
        .await
        .map_err(db_err(context))?;
    let ours: Vec<(String, String, String)> = existing
        .into_iter()
        .filter(|(schema, name, _, statement)| {
            let statement = String::from_utf8_lossy(statement);
            // Never one that feeds another database's journal, even if recorded here.
            statement.contains(&journal)
                || recorded.contains(&(schema.clone(), name.clone()))
                    && other_journal(&statement, &journal).is_none()
        })
        .map(|(schema, name, table, _)| (schema, name, table))
        .collect();
    for (schema, name, table) in &ours {
        ddl_statement(
            conn,
            wait,
            &ddl::drop_sql(schema, name),
            (schema, table),
            db_err(format!("removing trigger {name}")),
        )
        .await?;
    }
    conn.query_drop(format!("DELETE FROM {}", qualified(database, CATALOG)))
        .await
        .map_err(db_err("emptying the sqlnotify catalog"))?;
    Ok(ours.len() as u64)
}

/// Removes every sqlnotify trigger of this database's journal.
pub(crate) async fn cleanup_all(conn: &mut Conn, database: &str, timeout: Duration) -> Result<u64> {
    if !catalog_exists(conn, database).await? {
        return Ok(0);
    }
    let mut wait = LockWait::new("removing triggers", timeout);
    lock(conn, &mut wait).await?;
    let outcome = drop_all(conn, database, &mut wait).await;
    unlock(conn, outcome).await
}

/// Removes the triggers of `channels` and their catalog entries.
pub(crate) async fn uninstall(
    conn: &mut Conn,
    database: &str,
    channels: &[String],
    timeout: Duration,
) -> Result<()> {
    if !catalog_exists(conn, database).await? {
        return Ok(());
    }
    let mut wait = LockWait::new("removing triggers", timeout);
    lock(conn, &mut wait).await?;
    let outcome = async {
        let catalog = qualified(database, CATALOG);
        for channel in channels {
            let context = || format!("removing trigger {channel}");
            let recorded: Option<(String, String)> = conn
                .exec_first(
                    format!(
                        "SELECT `table_schema`, `table_name` FROM {catalog} WHERE `channel` = ?"
                    ),
                    (channel,),
                )
                .await
                .map_err(db_err(context()))?;
            let (schema, table) = recorded.unwrap_or_else(|| (database.to_string(), String::new()));
            let table = match trigger_table(conn, &schema, channel).await? {
                Some(trigger) => trigger.table,
                None => table,
            };
            ddl_statement(
                conn,
                &mut wait,
                &ddl::drop_sql(&schema, channel),
                (&schema, &table),
                db_err(context()),
            )
            .await?;
            conn.exec_drop(
                format!("DELETE FROM {catalog} WHERE `channel` = ?"),
                (channel,),
            )
            .await
            .map_err(db_err(format!("removing the catalog entry of {channel}")))?;
        }
        Ok(())
    }
    .await;
    unlock(conn, outcome).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trigger_feeding_another_databases_journal_is_told_apart() {
        let ours = "`a`.`sqlnotify_journal`";
        let body = |db: &str| {
            format!(
                "BEGIN IF NOT (x) THEN INSERT INTO `{db}`.`sqlnotify_journal` (`channel`, \
                 `payload`) VALUES (_utf8mb4 X'00', 1); END IF; END"
            )
        };
        assert_eq!(other_journal(&body("a"), ours), None);
        assert_eq!(
            other_journal(&body("b``c"), ours),
            Some("`b``c`.`sqlnotify_journal`")
        );
        assert_eq!(other_journal("INSERT INTO `t` VALUES (1)", ours), None);
    }
}
