//! SQL text for MySQL / MariaDB: quoting, sqlnotify's tables and one trigger per watch. Pure
//! functions, unit-tested here.
//!
//! Quoting. Every identifier is wrapped in backticks, embedded backticks doubled. A string
//! literal is written as `'…'` with single quotes doubled — which means the same under every
//! `sql_mode` — unless it contains a backslash or a control character: a backslash is an
//! escape character except under `NO_BACKSLASH_ESCAPES`, so such a string is written as a
//! hexadecimal literal with a character-set introducer (`_utf8mb4 X'…'`), which no mode
//! reinterprets. Double quotes (`ANSI_QUOTES`) and `||` (`PIPES_AS_CONCAT`) are never used.
//!
//! A trigger is a single `INSERT … VALUES` statement, so the install script applies it through
//! any client or migration tool without `DELIMITER` changes — except an UPDATE watch with
//! `trigger_columns`, whose trigger is the compound statement
//! `BEGIN IF <changed> THEN INSERT … VALUES (…); END IF; END`, which the script wraps in
//! `DELIMITER` lines ([`is_compound`]). Its single-statement form, `INSERT … SELECT … FROM DUAL
//! WHERE <changed>`, is a bulk insert to InnoDB: under `innodb_autoinc_lock_mode = 1`
//! (MariaDB's default) it holds the journal's table-level AUTO-INC lock to the end of the
//! user's statement, so a multi-row UPDATE waiting on a row lock held by a transaction that
//! then writes another watched table deadlocks — and the user's write fails. `INSERT … VALUES`
//! is a simple insert, which takes an id without holding that lock. "Changed" compares the
//! binary images of the values (`NOT (CAST(OLD.c AS BINARY) <=> CAST(NEW.c AS BINARY))`), so a
//! change of letter case under a case-insensitive collation, or of trailing spaces under a
//! PAD SPACE one, counts as the real change it is, and NULL to NULL does not.
//!
//! Payloads are built with `JSON_OBJECT`. Values JSON cannot hold as such are converted:
//! binary strings (BINARY, VARBINARY, BLOB) are sent as hex text, BIT as a number, spatial
//! values as WKT. Two kinds are converted so that MySQL and MariaDB send the same JSON, as
//! each server shows the value itself: DATETIME, TIMESTAMP and TIME go through
//! `CAST(… AS CHAR)` (MySQL's `JSON_OBJECT` would append `.000000` whatever the column's
//! precision), FLOAT through `CAST(CAST(… AS CHAR) AS DOUBLE)` (MySQL's would widen `1.1` to
//! `1.100000023841858`; the text form has the 6 significant digits both servers display).
//!
//! Should the object not be buildable (larger than `max_allowed_packet`), the event carries
//! the key only, marked truncated: a trigger never makes the user's write fail. A conversion
//! can hit the limit on its own (`HEX` doubles a value's size): it returns NULL then, and the
//! object is made NULL too, not sent with a `null` that would pass for the value (the same for
//! `ST_AsText`, should it fail). That needs
//! the trigger to run without strict mode: a trigger runs under the `sql_mode` it was created
//! with, and under `STRICT_TRANS_TABLES` (the default of both servers) the "result was larger
//! than max_allowed_packet" warning becomes an error that aborts the user's INSERT. So
//! triggers are created under [`TRIGGER_SQL_MODE`], and a trigger found with another mode is
//! treated as changed. Non-strict mode also keeps `NO_BACKSLASH_ESCAPES`, `ANSI_QUOTES` and
//! the like out of the trigger body, whatever the installing session used.

use std::collections::BTreeMap;

use crate::payload::META_KEY;
use crate::resolve::ResolvedWatch;

/// Named lock serialising installs across processes (`GET_LOCK`, session-scoped).
pub(crate) const INSTALL_LOCK: &str = "sqlnotify_install";
/// Seconds `GET_LOCK` waits for another installer.
pub(crate) const INSTALL_LOCK_WAIT_SECS: u32 = 30;

/// The journal table's name.
pub(crate) const JOURNAL: &str = "sqlnotify_journal";
/// The catalog table's name.
pub(crate) const CATALOG: &str = "sqlnotify_catalog";
/// The consumer cursor table's name.
pub(crate) const CONSUMERS: &str = "sqlnotify_consumers";
/// The dead-letter table's name (see `dead_letters.rs`).
pub(crate) const DEAD_LETTERS: &str = "sqlnotify_dead_letters";
/// The one-row table where the purge records the highest journal id it deleted: a client that
/// resumes from before it may lack rows that are gone (see `replay.rs`).
pub(crate) const TRIMMED: &str = "sqlnotify_trimmed";
/// The `sql_mode` triggers are created (and so run) under: none of the strict modes, so a
/// payload over `max_allowed_packet` becomes NULL (and a key-only event) instead of failing
/// the user's write. See the module documentation.
pub(crate) const TRIGGER_SQL_MODE: &str = "";
/// Saves the session's `sql_mode` in a user variable and switches to [`TRIGGER_SQL_MODE`].
pub(crate) fn enter_trigger_sql_mode() -> String {
    format!(
        "SET @sqlnotify_saved_sql_mode = @@SESSION.sql_mode, SESSION sql_mode = {}",
        quote_literal(TRIGGER_SQL_MODE)
    )
}
/// Restores the `sql_mode` saved by [`enter_trigger_sql_mode`].
pub(crate) const LEAVE_TRIGGER_SQL_MODE: &str = "SET SESSION sql_mode = @sqlnotify_saved_sql_mode";

/// How a column's value goes into the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ColumnKind {
    /// As is: numbers, text, dates, JSON, ENUM, SET …
    #[default]
    Plain,
    /// Binary strings: hex text (JSON has no bytes, and they need not be valid text).
    Binary,
    /// BIT(n): its numeric value.
    Bit,
    /// Spatial types: well-known text.
    Spatial,
    /// DATETIME, TIMESTAMP, TIME: their text, with the column's own fractional digits.
    Temporal,
    /// FLOAT: a number with the digits the server displays.
    Float,
}

impl ColumnKind {
    /// The kind for an `information_schema.COLUMNS.DATA_TYPE`.
    pub(crate) fn from_data_type(data_type: &str) -> Self {
        match data_type.to_ascii_lowercase().as_str() {
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
                ColumnKind::Binary
            }
            "bit" => ColumnKind::Bit,
            "geometry" | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring"
            | "multipolygon" | "geometrycollection" | "geomcollection" => ColumnKind::Spatial,
            "datetime" | "timestamp" | "time" => ColumnKind::Temporal,
            "float" => ColumnKind::Float,
            _ => ColumnKind::Plain,
        }
    }

    fn expr(self, value: &str) -> String {
        match self {
            ColumnKind::Plain => value.to_string(),
            ColumnKind::Binary => format!("HEX({value})"),
            ColumnKind::Bit => format!("({value} + 0)"),
            ColumnKind::Spatial => format!("ST_AsText({value})"),
            ColumnKind::Temporal => format!("CAST({value} AS CHAR)"),
            ColumnKind::Float => format!("CAST(CAST({value} AS CHAR) AS DOUBLE)"),
        }
    }

    /// Whether [`expr`](Self::expr) can be NULL for a value that is not: `HEX` returns NULL
    /// (with a warning) when its text would exceed `max_allowed_packet`, `ST_AsText` when it
    /// cannot write the text (MariaDB 10.11 writes it whatever its size; then the object is
    /// over the limit, and NULL, by itself).
    fn may_fail(self) -> bool {
        matches!(self, ColumnKind::Binary | ColumnKind::Spatial)
    }
}

/// Quotes an identifier with backticks, doubling embedded backticks.
pub(crate) fn quote_ident(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

/// `schema`.`name`.
pub(crate) fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// Quotes a string literal so that it means the same under every `sql_mode` (see the module
/// documentation).
pub(crate) fn quote_literal(value: &str) -> String {
    if value.chars().any(|c| c == '\\' || c.is_control()) {
        let hex: String = value.bytes().map(|b| format!("{b:02X}")).collect();
        return format!("_utf8mb4 X'{hex}'");
    }
    format!("'{}'", value.replace('\'', "''"))
}

/// The journal's transaction column on MariaDB with transaction ids on: the id of the InnoDB
/// transaction that inserted the row, stamped by the server (transaction-precise system
/// versioning, `GENERATED ALWAYS AS ROW START`), invisible to `SELECT *`.
pub(crate) const JOURNAL_TX: &str = "tx_start";
/// The end column system versioning needs beside [`JOURNAL_TX`].
const JOURNAL_TX_END: &str = "tx_end";
/// MariaDB's table of committed transactions of transaction-precise versioned tables (their
/// commit order and times): one row per transaction that writes to the journal, which the
/// server never trims. sqlnotify does not read it; the purge empties it (`journal.rs`).
pub(crate) const TRANSACTION_REGISTRY: &str = "`mysql`.`transaction_registry`";

/// Turns an existing journal into one that records each row's transaction (MariaDB only):
/// adds [`JOURNAL_TX`] and makes the table transaction-precise system-versioned. Existing rows
/// are stamped with this statement's own transaction.
pub(crate) fn journal_transactions_statement(database: &str) -> String {
    format!(
        "ALTER TABLE {} \
         ADD COLUMN {tx} BIGINT UNSIGNED GENERATED ALWAYS AS ROW START INVISIBLE, \
         ADD COLUMN {end} BIGINT UNSIGNED GENERATED ALWAYS AS ROW END INVISIBLE, \
         ADD PERIOD FOR SYSTEM_TIME ({tx}, {end}), ADD SYSTEM VERSIONING",
        qualified(database, JOURNAL),
        tx = quote_ident(JOURNAL_TX),
        end = quote_ident(JOURNAL_TX_END),
    )
}

/// The install script's part for `mysql_transaction_ids` (MariaDB): the journal made to record
/// transactions. Not repeatable: a journal that already records them refuses it.
pub(crate) fn transactions_script(database: &str) -> String {
    format!(
        "\n-- Transaction ids (MariaDB): the journal records each row's transaction. Run once: a\n\
         -- journal that already records them answers \"Duplicate column name\".\n{};\n",
        journal_transactions_statement(database)
    )
}

/// What the notifier's account needs beyond [`grant_sql`] when the journal records
/// transactions: to remove the journal's history and empty MariaDB's transaction registry.
pub(crate) fn transactions_grant_sql(database: &str, account: &str) -> crate::Result<String> {
    let to = account_sql(account)?;
    Ok(format!(
        "GRANT DELETE HISTORY ON {} TO {to};\n\
         GRANT DROP ON {TRANSACTION_REGISTRY} TO {to};\n",
        qualified(database, JOURNAL)
    ))
}

/// `'user'@'host'` for `user` or `user@host`.
fn account_sql(account: &str) -> crate::Result<String> {
    let (user, host) = account.split_once('@').unwrap_or((account, "%"));
    if user.is_empty() || host.is_empty() {
        return Err(crate::Error::InvalidOption {
            option: "grant_to",
            reason: format!("{account:?} is not a MySQL account (`user` or `user@host`)"),
        });
    }
    Ok(format!("{}@{}", quote_literal(user), quote_literal(host)))
}

/// Creates sqlnotify's tables in `database` if missing.
pub(crate) fn setup_statements(database: &str) -> Vec<String> {
    let text = "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin";
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
    `channel` VARCHAR(255) {text} NOT NULL,
    `table_schema` VARCHAR(255) {text} NOT NULL,
    `table_name` VARCHAR(255) {text} NOT NULL,
    `operation` VARCHAR(16) NOT NULL,
    `definition` LONGTEXT {text} NOT NULL,
    `installed_at` TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (`channel`)
) ENGINE=InnoDB",
            qualified(database, CATALOG)
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
    `id` BIGINT NOT NULL AUTO_INCREMENT,
    `channel` VARCHAR(255) {text} NOT NULL,
    `payload` LONGTEXT {text} NOT NULL,
    `created_at` TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (`id`)
) ENGINE=InnoDB",
            qualified(database, JOURNAL)
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
    `name` VARCHAR(255) {text} NOT NULL,
    `watermark` BIGINT NOT NULL,
    `updated_at` TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    `state` VARCHAR(16) NOT NULL DEFAULT 'active',
    `channels` LONGTEXT {text} NULL,
    `expire_after_us` BIGINT NULL,
    `missed` LONGTEXT {text} NULL,
    `seen` LONGTEXT {text} NULL,
    PRIMARY KEY (`name`)
) ENGINE=InnoDB",
            qualified(database, CONSUMERS)
        ),
        super::dead_letters::create_table_sql(database),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
    `id` TINYINT NOT NULL,
    `upto` BIGINT NOT NULL,
    PRIMARY KEY (`id`)
) ENGINE=InnoDB",
            qualified(database, TRIMMED)
        ),
    ]
}

/// The kind of column `c` (its `DATA_TYPE` looked up in `data_types`).
fn kind_of(c: &str, data_types: &BTreeMap<String, String>) -> ColumnKind {
    data_types
        .get(c)
        .map_or(ColumnKind::Plain, |t| ColumnKind::from_data_type(t))
}

/// `JSON_OBJECT(...)` of `columns` of `row` (NEW or OLD), in order, each converted by its kind
/// (looked up in `data_types`).
fn json_object(row: &str, columns: &[&String], data_types: &BTreeMap<String, String>) -> String {
    let args: Vec<String> = columns
        .iter()
        .map(|c| {
            let value = kind_of(c, data_types).expr(&format!("{row}.{}", quote_ident(c)));
            format!("{}, {value}", quote_literal(c))
        })
        .collect();
    format!("JSON_OBJECT({})", args.join(", "))
}

/// For each of `columns` of `row` whose conversion [may fail](ColumnKind::may_fail), the
/// condition that it did: a value, converted to NULL. `JSON_OBJECT` would carry it as `null`
/// and succeed, so the payload would pass for whole; instead the object is made NULL, and the
/// event carries its key only, marked truncated, as for any payload over the limit.
fn conversion_failures(
    row: &str,
    columns: &[&String],
    data_types: &BTreeMap<String, String>,
) -> Vec<String> {
    columns
        .iter()
        .filter(|c| kind_of(c, data_types).may_fail())
        .map(|c| {
            let value = format!("{row}.{}", quote_ident(c));
            let converted = kind_of(c, data_types).expr(&value);
            format!("({value} IS NOT NULL AND {converted} IS NULL)")
        })
        .collect()
}

/// `object`, or NULL when one of `failures` (from [`conversion_failures`]) holds.
fn unless_failed(object: String, failures: &[String]) -> String {
    if failures.is_empty() {
        return object;
    }
    format!("IF({}, NULL, {object})", failures.join(" OR "))
}

/// The metadata members of a watch with `old_values`: the old row's carried columns and, on
/// UPDATE, the names of the table's columns whose binary images differ (`<=>` of
/// `CAST(… AS BINARY)`, as for `trigger_columns`: NULL to NULL is no change). The list is
/// joined by `CONCAT_WS`, which skips the NULLs of unchanged columns, and parsed back to JSON.
fn old_values_members(w: &ResolvedWatch) -> Vec<String> {
    let all = w.channel.payload_columns();
    let old = format!("'old', {}", json_object("OLD", &all, &w.data_types));
    if w.channel.operation != crate::operation::Operation::Update {
        return vec![old];
    }
    let tests: Vec<String> = w
        .table_columns
        .iter()
        .map(|(c, _)| {
            let name = serde_json::to_string(c).expect("a string serializes");
            let c = quote_ident(c);
            format!(
                "IF(NOT (CAST(OLD.{c} AS BINARY) <=> CAST(NEW.{c} AS BINARY)), {}, NULL)",
                quote_literal(&name)
            )
        })
        .collect();
    vec![
        old,
        format!(
            "'changed', JSON_EXTRACT(CONCAT('[', CONCAT_WS(',', {}), ']'), '$')",
            tests.join(", ")
        ),
    ]
}

/// The most context names one watch may capture on MySQL (MySQL's `JSON_OBJECT` has no
/// argument limit of its own; this keeps trigger bodies small).
pub(crate) const MAX_CONTEXT_NAMES: usize = 50;

/// The SQL expression that reads context value `name` in the writer's session, or `None` for
/// a name MySQL does not offer: `current_user` (`CURRENT_USER()`, which inside a trigger is the
/// trigger's definer), `user` (`USER()`, the writer as it connected), `connection_id`, and user
/// variables `@name` (letters, digits, `_`, `$` and `.`, at most 64 bytes; NULL when unset),
/// read back-quoted.
pub(crate) fn context_expr(name: &str) -> Option<String> {
    Some(match name {
        "current_user" => "CURRENT_USER()".to_string(),
        "user" => "USER()".to_string(),
        "connection_id" => "CONNECTION_ID()".to_string(),
        _ => {
            let var = name.strip_prefix('@')?;
            let valid = !var.is_empty()
                && var.len() <= 64
                && var
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.'));
            if !valid {
                return None;
            }
            format!("@{}", quote_ident(var))
        }
    })
}

/// The payload expression of a watch: the full object, or the key marked truncated when the
/// full object cannot be built.
fn payload_expr(w: &ResolvedWatch) -> String {
    let channel = &w.channel;
    let row = channel.operation.row_variable();
    let all = channel.payload_columns();
    let keys: Vec<&String> = channel.key_columns.iter().collect();
    let mut full = json_object(row, &all, &w.data_types);
    let mut failures = conversion_failures(row, &all, &w.data_types);
    let mut members = if w.old_values {
        // The old row's values too: a `null` there would pass for the old value.
        for failure in conversion_failures("OLD", &all, &w.data_types) {
            if !failures.contains(&failure) {
                failures.push(failure);
            }
        }
        old_values_members(w)
    } else {
        Vec::new()
    };
    if !w.context.is_empty() {
        let values: Vec<String> = w
            .context
            .iter()
            .filter_map(|n| Some(format!("{}, {}", quote_literal(n), context_expr(n)?)))
            .collect();
        members.push(format!("'context', JSON_OBJECT({})", values.join(", ")));
    }
    if !members.is_empty() {
        full = format!(
            "JSON_INSERT({full}, {}, JSON_OBJECT({}))",
            quote_literal(&format!("$.{META_KEY}")),
            members.join(", ")
        );
    }
    or_key_only(unless_failed(full, &failures), row, &keys, &w.data_types)
}

/// `full`, or — when it cannot be built (NULL: larger than `max_allowed_packet`, or a value
/// whose conversion failed, see [`conversion_failures`]) — the `keys` of `row` marked
/// truncated. The key object is never NULL: keys are short (an index holds them), so their
/// conversions cannot fail.
fn or_key_only(
    full: String,
    row: &str,
    keys: &[&String],
    data_types: &BTreeMap<String, String>,
) -> String {
    let key_only = json_object(row, keys, data_types);
    format!(
        "COALESCE({full}, JSON_INSERT({key_only}, {}, JSON_OBJECT('truncated', TRUE)))",
        quote_literal(&format!("$.{META_KEY}"))
    )
}

/// The payload a trigger of `channel` writes for a row, as an expression on the row `alias`
/// of its table — the same expression (conversions and the truncated fallback included),
/// without the change's metadata (old values, context), which a row read by a snapshot does
/// not have. `data_types` as in a resolved watch (`DATA_TYPE` by column).
pub(crate) fn row_payload_expr(
    alias: &str,
    channel: &crate::event::Channel,
    data_types: &BTreeMap<String, String>,
) -> String {
    let keys: Vec<&String> = channel.key_columns.iter().collect();
    let columns = channel.payload_columns();
    let full = json_object(alias, &columns, data_types);
    let failures = conversion_failures(alias, &columns, data_types);
    or_key_only(unless_failed(full, &failures), alias, &keys, data_types)
}

/// Whether the trigger of `w` is a compound statement (`BEGIN … END`, with `;` inside): a
/// watch with `trigger_columns`. A script that a command-line client applies needs
/// `DELIMITER` lines around it (see the module documentation).
pub(crate) fn is_compound(w: &ResolvedWatch) -> bool {
    !w.trigger_columns.is_empty()
}

/// `CREATE TRIGGER` for a watch (trigger in the table's schema, journal in `database`).
pub(crate) fn trigger_sql(w: &ResolvedWatch, database: &str) -> String {
    let channel = &w.channel;
    let head = format!(
        "CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW",
        name = qualified(&channel.schema, &channel.name),
        event = channel.operation.sql_keyword(),
        table = qualified(&channel.schema, &channel.table),
    );
    // Always `INSERT … VALUES`, never `INSERT … SELECT`: see the module documentation.
    let insert = format!(
        "INSERT INTO {journal} (`channel`, `payload`) VALUES ({chan}, {payload})",
        journal = qualified(database, JOURNAL),
        chan = quote_literal(&channel.name),
        payload = payload_expr(w),
    );
    if !is_compound(w) {
        return format!("{head} {insert}");
    }
    let changed: Vec<String> = w
        .trigger_columns
        .iter()
        .map(|(c, _)| {
            let c = quote_ident(c);
            format!("NOT (CAST(OLD.{c} AS BINARY) <=> CAST(NEW.{c} AS BINARY))")
        })
        .collect();
    format!(
        "{head} BEGIN IF {} THEN {insert}; END IF; END",
        changed.join(" OR ")
    )
}

/// Drops a watch's trigger.
pub(crate) fn drop_sql(schema: &str, channel: &str) -> String {
    format!("DROP TRIGGER IF EXISTS {}", qualified(schema, channel))
}

/// Records a watch in the catalog (replacing an older record).
pub(crate) fn catalog_upsert_sql(w: &ResolvedWatch, database: &str) -> String {
    format!(
        "REPLACE INTO {} (`channel`, `table_schema`, `table_name`, `operation`, `definition`, `installed_at`) \
         VALUES ({}, {}, {}, {}, {}, CURRENT_TIMESTAMP(6))",
        qualified(database, CATALOG),
        quote_literal(&w.channel.name),
        quote_literal(&w.channel.schema),
        quote_literal(&w.channel.table),
        quote_literal(w.channel.operation.as_str()),
        quote_literal(&trigger_sql(w, database)),
    )
}

/// The statement delimiter the install script sets around a compound trigger. Never outside
/// quotes in a trigger's text (identifiers are back-quoted, literals quoted), where the
/// command-line client does not look for it.
pub(crate) const SCRIPT_DELIMITER: &str = "$$";

/// A complete, idempotent install script for `watches`.
pub(crate) fn install_script(watches: &[ResolvedWatch], database: &str) -> String {
    let mut sql = format!(
        "-- sqlnotify install script (MySQL >= 8.0.17 / MariaDB >= 10.2.3), database {}\n\
         -- Every statement is a single statement, except a trigger with trigger_columns: a\n\
         -- BEGIN ... END block between DELIMITER lines, as the mysql / mariadb client reads them.\n\
         SELECT GET_LOCK({}, {INSTALL_LOCK_WAIT_SECS});\n",
        crate::sql::comment(&quote_ident(database)),
        quote_literal(INSTALL_LOCK)
    );
    for statement in setup_statements(database) {
        sql.push_str(&statement);
        sql.push_str(";\n");
    }
    sql.push_str(
        "\n-- Triggers run under the sql_mode they were created with: non-strict, so that a row too\n\
         -- large for a notification never fails the write (see the sqlnotify documentation).\n",
    );
    sql.push_str(&enter_trigger_sql_mode());
    sql.push_str(";\n");
    for w in watches {
        // A comment line must not carry what a command-line client could take for one of its
        // own commands (`\q`, `\c` …) or a line break.
        sql.push_str(&format!("\n-- {}\n", crate::sql::comment(&w.channel.name)));
        sql.push_str(&drop_sql(&w.channel.schema, &w.channel.name));
        sql.push_str(";\n");
        if is_compound(w) {
            // The client would end the statement at its first `;`, inside the block.
            sql.push_str(&format!(
                "DELIMITER {SCRIPT_DELIMITER}\n{}{SCRIPT_DELIMITER}\nDELIMITER ;\n",
                trigger_sql(w, database)
            ));
        } else {
            sql.push_str(&trigger_sql(w, database));
            sql.push_str(";\n");
        }
        sql.push_str(&catalog_upsert_sql(w, database));
        sql.push_str(";\n");
    }
    sql.push_str(&format!(
        "\n{LEAVE_TRIGGER_SQL_MODE};\nSELECT RELEASE_LOCK({});\n",
        quote_literal(INSTALL_LOCK)
    ));
    sql
}

/// The privileges account `account` (`user` or `user@host`; host `%` when absent) needs to
/// run a notifier against objects someone else installed: see the watched tables and their
/// triggers (MySQL shows a table's columns only to accounts with a privilege on it, and its
/// triggers only to accounts with `TRIGGER` on it: verification reads both), read the catalog, read
/// and trim the journal, write custom events to it, keep consumer positions, record dead
/// letters. Writers need
/// none: triggers run with their definer's privileges.
pub(crate) fn grant_sql(
    watches: &[ResolvedWatch],
    database: &str,
    account: &str,
) -> crate::Result<String> {
    let to = account_sql(account)?;
    let mut tables: Vec<String> = watches
        .iter()
        .map(|w| qualified(&w.channel.schema, &w.channel.table))
        .collect();
    tables.sort();
    tables.dedup();
    let see: String = tables
        .iter()
        .map(|t| format!("GRANT SELECT, TRIGGER ON {t} TO {to};\n"))
        .collect();
    Ok(format!(
        "\n-- what the notifier's account {to} needs\n{see}\
         GRANT SELECT ON {} TO {to};\n\
         GRANT SELECT, INSERT (`channel`, `payload`), DELETE ON {} TO {to};\n\
         GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {to};\n\
         GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {to};\n\
         GRANT SELECT, INSERT, UPDATE ON {} TO {to};\n",
        qualified(database, CATALOG),
        qualified(database, JOURNAL),
        qualified(database, CONSUMERS),
        qualified(database, DEAD_LETTERS),
        qualified(database, TRIMMED),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Channel;
    use crate::operation::Operation;

    fn watch(op: Operation, extra: &[&str]) -> ResolvedWatch {
        ResolvedWatch {
            channel: Channel {
                name: "sqlnotify_o'brien\\x".into(),
                schema: "app".into(),
                table: "we`ird".into(),
                operation: op,
                label: Some("o'brien\\x".into()),
                key_columns: vec!["select".into()],
                extra_columns: extra.iter().map(|s| s.to_string()).collect(),
                tier: crate::tier::Tier::Notify,
                signed: false,
            },
            trigger_columns: vec![],
            data_types: Default::default(),
            use_overflow_table: true,
            tier: crate::tier::Tier::Notify,
            capture: crate::tier::Capture::Row,
            old_values: false,
            table_columns: vec![],
            context: vec![],
            in_hierarchy: false,
            equality_schemas: Default::default(),
        }
    }

    #[test]
    fn transaction_ids_script_and_grants() {
        let script = transactions_script("d`b");
        assert!(script.contains(
            "ALTER TABLE `d``b`.`sqlnotify_journal` ADD COLUMN `tx_start` BIGINT UNSIGNED \
             GENERATED ALWAYS AS ROW START INVISIBLE"
        ));
        assert!(script
            .contains("ADD PERIOD FOR SYSTEM_TIME (`tx_start`, `tx_end`), ADD SYSTEM VERSIONING;"));
        let grants = transactions_grant_sql("db", "app@10.0.0.%").unwrap();
        assert_eq!(
            grants,
            "GRANT DELETE HISTORY ON `db`.`sqlnotify_journal` TO 'app'@'10.0.0.%';\n\
             GRANT DROP ON `mysql`.`transaction_registry` TO 'app'@'10.0.0.%';\n"
        );
        assert!(transactions_grant_sql("db", "@host").is_err());
    }

    #[test]
    fn identifiers_and_literals() {
        assert_eq!(quote_ident("users"), "`users`");
        assert_eq!(quote_ident("a`b"), "`a``b`");
        assert_eq!(
            quote_ident("x`; DROP TABLE t; --"),
            "`x``; DROP TABLE t; --`"
        );
        assert_eq!(quote_literal("abc"), "'abc'");
        assert_eq!(quote_literal("o'brien"), "'o''brien'");
        assert_eq!(quote_literal("a\\b"), "_utf8mb4 X'615C62'");
        assert_eq!(quote_literal("a\nb"), "_utf8mb4 X'610A62'");
        assert_eq!(quote_literal("café"), "'café'");
    }

    #[test]
    fn triggers_quote_everything() {
        let t = trigger_sql(&watch(Operation::Insert, &[]), "db`x");
        assert!(
            t.starts_with(
                "CREATE TRIGGER `app`.`sqlnotify_o'brien\\x` AFTER INSERT ON `app`.`we``ird` \
                 FOR EACH ROW INSERT INTO `db``x`.`sqlnotify_journal` (`channel`, `payload`) VALUES (_utf8mb4 X'"
            ),
            "{t}"
        );
        assert!(t.contains("JSON_OBJECT('select', NEW.`select`)"), "{t}");
        assert!(!t.contains("BEGIN"), "{t}");
        let d = trigger_sql(&watch(Operation::Delete, &[]), "db");
        assert!(d.contains("OLD.`select`") && !d.contains("NEW."), "{d}");
    }

    #[test]
    fn updates_with_trigger_columns_compare_binary_images() {
        let mut w = watch(Operation::Update, &["a"]);
        w.trigger_columns = vec![("a".into(), true), ("b`".into(), true)];
        let t = trigger_sql(&w, "db");
        assert!(t.contains(
            "FOR EACH ROW BEGIN IF NOT (CAST(OLD.`a` AS BINARY) <=> CAST(NEW.`a` AS BINARY)) \
             OR NOT (CAST(OLD.`b``` AS BINARY) <=> CAST(NEW.`b``` AS BINARY)) \
             THEN INSERT INTO `db`.`sqlnotify_journal` (`channel`, `payload`) VALUES (_utf8mb4 X'"
        ));
        assert!(t.ends_with("); END IF; END"), "{t}");
        // never a bulk insert (INSERT … SELECT), which holds the journal's AUTO-INC lock
        assert!(!t.contains("SELECT") && !t.contains("DUAL"), "{t}");
        assert!(is_compound(&w));
        assert!(!is_compound(&watch(Operation::Update, &["a"])));
    }

    #[test]
    fn the_script_sets_a_delimiter_around_compound_triggers_only() {
        let mut compound = watch(Operation::Update, &["a"]);
        compound.channel.name = "sqlnotify_c".into();
        compound.trigger_columns = vec![("a".into(), true)];
        let plain = watch(Operation::Insert, &[]);
        let s = install_script(&[plain.clone(), compound.clone()], "db");
        assert_eq!(
            s.matches("DELIMITER $$\n").count(),
            1,
            "only around the compound trigger: {s}"
        );
        assert!(
            s.contains(&format!(
                "DELIMITER $$\n{}$$\nDELIMITER ;\nREPLACE INTO `db`.`sqlnotify_catalog`",
                trigger_sql(&compound, "db")
            )),
            "{s}"
        );
        assert!(
            s.contains(&format!("{};\nREPLACE INTO", trigger_sql(&plain, "db"))),
            "{s}"
        );
        assert!(!install_script(&[plain], "db").contains("\nDELIMITER"));
        // the delimiter appears nowhere else, so the client cannot end a statement early
        let body = trigger_sql(&compound, "db");
        assert!(!body.contains(SCRIPT_DELIMITER), "{body}");
    }

    #[test]
    fn column_kinds_convert_values() {
        let w = watch(
            Operation::Insert,
            &["data", "flags", "shape", "name", "at", "ratio"],
        );
        let mut w = w;
        w.data_types = [
            ("data", "LONGBLOB"),
            ("flags", "bit"),
            ("shape", "point"),
            ("name", "varchar"),
            ("at", "DATETIME"),
            ("ratio", "float"),
        ]
        .into_iter()
        .map(|(c, t)| (c.to_string(), t.to_string()))
        .collect();
        let t = trigger_sql(&w, "db");
        assert!(t.contains("'data', HEX(NEW.`data`)"), "{t}");
        assert!(t.contains("'flags', (NEW.`flags` + 0)"), "{t}");
        assert!(t.contains("'shape', ST_AsText(NEW.`shape`)"), "{t}");
        assert!(t.contains("'name', NEW.`name`"), "{t}");
        assert!(t.contains("'at', CAST(NEW.`at` AS CHAR)"), "{t}");
        assert!(
            t.contains("'ratio', CAST(CAST(NEW.`ratio` AS CHAR) AS DOUBLE)"),
            "{t}"
        );
        // A conversion that returned NULL for a value (over max_allowed_packet) makes the
        // whole object NULL: the key-only fallback, not a `null` passing for the value.
        assert!(
            t.contains(
                "COALESCE(IF((NEW.`data` IS NOT NULL AND HEX(NEW.`data`) IS NULL) \
                 OR (NEW.`shape` IS NOT NULL AND ST_AsText(NEW.`shape`) IS NULL), NULL, \
                 JSON_OBJECT('select', NEW.`select`, 'data', HEX(NEW.`data`)"
            ),
            "{t}"
        );
        assert!(
            t.contains("'$.__sqlnotify', JSON_OBJECT('truncated', TRUE)"),
            "{t}"
        );
        // the same in a snapshot's row payload
        let r = row_payload_expr("r", &w.channel, &w.data_types);
        assert!(
            r.starts_with("COALESCE(IF((r.`data` IS NOT NULL AND HEX(r.`data`) IS NULL) OR "),
            "{r}"
        );
        // and for the old row's values; none for columns that convert without fail
        w.channel.operation = Operation::Update;
        w.old_values = true;
        let t = trigger_sql(&w, "db");
        assert!(
            t.contains(
                "OR (NEW.`shape` IS NOT NULL AND ST_AsText(NEW.`shape`) IS NULL) \
                 OR (OLD.`data` IS NOT NULL AND HEX(OLD.`data`) IS NULL) \
                 OR (OLD.`shape` IS NOT NULL AND ST_AsText(OLD.`shape`) IS NULL), NULL, "
            ),
            "{t}"
        );
        w.channel.extra_columns = vec!["name".into(), "at".into()];
        w.old_values = false;
        let t = trigger_sql(&w, "db");
        assert!(t.contains("COALESCE(JSON_OBJECT("), "{t}");
        assert!(!t.contains("IS NULL"), "{t}");
    }

    #[test]
    fn context_reads_session_functions_and_user_variables() {
        assert_eq!(
            context_expr("@app_user_id").as_deref(),
            Some("@`app_user_id`")
        );
        assert_eq!(context_expr("@a.b$1").as_deref(), Some("@`a.b$1`"));
        assert_eq!(context_expr("user").as_deref(), Some("USER()"));
        for bad in ["@", "app.user_id", "@a`b", "@a b", "@x'", "session_user"] {
            assert!(context_expr(bad).is_none(), "{bad}");
        }
        let mut w = watch(Operation::Update, &["a"]);
        w.context = vec!["@app_user_id".into(), "connection_id".into()];
        let t = trigger_sql(&w, "db");
        assert!(
            t.contains(
                "COALESCE(JSON_INSERT(JSON_OBJECT('select', NEW.`select`, 'a', NEW.`a`), '$.__sqlnotify', \
                 JSON_OBJECT('context', JSON_OBJECT('@app_user_id', @`app_user_id`, 'connection_id', CONNECTION_ID()))), "
            ),
            "{t}"
        );
        w.old_values = true;
        let t = trigger_sql(&w, "db");
        assert!(
            t.contains("'$.__sqlnotify', JSON_OBJECT('old', JSON_OBJECT("),
            "{t}"
        );
        assert!(
            t.contains("'$'), 'context', JSON_OBJECT('@app_user_id'"),
            "{t}"
        );
    }

    #[test]
    fn old_values_add_the_old_row_and_the_changed_columns() {
        let mut w = watch(Operation::Update, &["a"]);
        assert!(!trigger_sql(&w, "db").contains("OLD."));
        w.old_values = true;
        w.table_columns = vec![("select".into(), true), ("a\\b".into(), true)];
        let t = trigger_sql(&w, "db");
        assert!(
            t.contains(
                "COALESCE(JSON_INSERT(JSON_OBJECT('select', NEW.`select`, 'a', NEW.`a`), '$.__sqlnotify', \
                 JSON_OBJECT('old', JSON_OBJECT('select', OLD.`select`, 'a', OLD.`a`), 'changed', \
                 JSON_EXTRACT(CONCAT('[', CONCAT_WS(',', \
                 IF(NOT (CAST(OLD.`select` AS BINARY) <=> CAST(NEW.`select` AS BINARY)), '\"select\"', NULL), \
                 IF(NOT (CAST(OLD.`a\\b` AS BINARY) <=> CAST(NEW.`a\\b` AS BINARY)), _utf8mb4 X'22615C5C6222', NULL)), ']'), '$'))), \
                 JSON_INSERT(JSON_OBJECT('select', NEW.`select`)"
            ),
            "{t}"
        );
        w.channel.operation = Operation::Delete;
        let t = trigger_sql(&w, "db");
        assert!(
            t.contains("'$.__sqlnotify', JSON_OBJECT('old', JSON_OBJECT('select', OLD.`select`, 'a', OLD.`a`)))"),
            "{t}"
        );
        assert!(!t.contains("changed"), "{t}");
    }

    #[test]
    fn install_script_is_locked_and_idempotent_in_form() {
        let s = install_script(&[watch(Operation::Insert, &[])], "db");
        assert!(s.contains("SELECT GET_LOCK('sqlnotify_install', 30);"));
        assert!(s.contains("CREATE TABLE IF NOT EXISTS `db`.`sqlnotify_journal`"));
        assert!(s.contains("CREATE TABLE IF NOT EXISTS `db`.`sqlnotify_dead_letters`"));
        assert!(s.contains("DROP TRIGGER IF EXISTS `app`.`sqlnotify_o'brien\\x`;"));
        assert!(s.contains("REPLACE INTO `db`.`sqlnotify_catalog`"));
        // triggers are created under the non-strict mode, and the session's mode is restored
        let enter = s
            .find(&enter_trigger_sql_mode())
            .expect("sql_mode switched");
        assert!(enter < s.find("CREATE TRIGGER").unwrap());
        assert!(s.find(LEAVE_TRIGGER_SQL_MODE).unwrap() > s.rfind("REPLACE INTO").unwrap());
        assert!(enter_trigger_sql_mode().ends_with("SESSION sql_mode = ''"));
        assert!(s
            .trim_end()
            .ends_with("SELECT RELEASE_LOCK('sqlnotify_install');"));
    }
}
