//! SQL text for SQLite: sqlnotify's tables and one trigger per watch. Pure functions,
//! unit-tested here.
//!
//! A trigger appends the payload to `sqlnotify_journal` inside the user's transaction. SQLite
//! has no payload limit, so there is no overflow path; the only things that could make the
//! trigger (and so the user's write) fail are guarded against: BLOB values, which JSON cannot
//! hold, are sent as hex text, and only functions present in every SQLite with JSON support
//! are used (no `unixepoch()`), because the trigger runs in whatever SQLite the *writer* uses.
//! Infinite REALs are sent as the strings `"Infinity"` / `"-Infinity"` (as PostgreSQL does):
//! SQLite's JSON writes them as `9.0e+999`, which JSON parsers reject, and the event was lost.

use crate::resolve::ResolvedWatch;
use crate::sql::{quote_ident, quote_sqlite_literal};

/// Current time as fractional Unix seconds, in SQL every SQLite version understands.
pub(crate) const NOW: &str = "((julianday('now') - 2440587.5) * 86400.0)";

/// `json_object` takes at most 127 arguments by default; wider payloads are built in pieces.
const MAX_OBJECT_COLUMNS: usize = 60;

/// Creates sqlnotify's tables if missing. Runs inside the install transaction. (A consumers
/// table of an older version gets its new columns from `consumers::ensure`, a journal its
/// `tx` column from [`JOURNAL_TX_UPGRADE`]; an install without [`TRIMMED_TABLE`] gets it from
/// the purge's first delete.)
pub(crate) fn setup_sql() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS sqlnotify_catalog (
    channel TEXT PRIMARY KEY,
    table_name TEXT NOT NULL,
    operation TEXT NOT NULL,
    definition TEXT NOT NULL,
    installed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sqlnotify_journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    tx INTEGER
);
CREATE TABLE IF NOT EXISTS sqlnotify_consumers (
    name TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',
    channels TEXT,
    expire_after REAL,
    missed TEXT
);
{TRIMMED_TABLE};
{}",
        super::dead_letters::setup_sql()
    )
}

/// How far the retention purge has deleted: the highest journal id it ever deleted, in its
/// one row, written in the transaction of each delete. A stream that resumes from a position
/// below it may lack a row that is gone (see `journal::replay`): the purge keeps rows a
/// registered consumer has not read and deletes the rows of other channels around them, so
/// the oldest row left says nothing about what was deleted after it. The purge creates the
/// table when an older install lacks it.
pub(crate) const TRIMMED_TABLE: &str = "CREATE TABLE IF NOT EXISTS sqlnotify_trimmed (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    upto INTEGER NOT NULL
)";

/// A JSON-text expression of `columns` of `row` (NEW or OLD), in order.
pub(crate) fn json_expr(row: &str, columns: &[&String]) -> String {
    let pieces: Vec<String> = columns
        .chunks(MAX_OBJECT_COLUMNS)
        .map(|chunk| {
            let args: Vec<String> = chunk
                .iter()
                .map(|c| {
                    let v = format!("{row}.{}", quote_ident(c));
                    format!(
                        "{}, CASE WHEN typeof({v}) = 'blob' THEN hex({v}) \
                         WHEN typeof({v}) = 'real' AND abs({v}) > 1.7976931348623157e308 \
                         THEN CASE WHEN {v} > 0 THEN 'Infinity' ELSE '-Infinity' END ELSE {v} END",
                        quote_sqlite_literal(c)
                    )
                })
                .collect();
            format!("json_object({})", args.join(", "))
        })
        .collect();
    if pieces.len() == 1 {
        return pieces.into_iter().next().expect("one piece");
    }
    // '{"a":1}' + '{"b":2}' -> '{"a":1,"b":2}': strip each piece's braces and join. Values are
    // scalars (a string ends with '"'), so exactly one brace is trimmed on each side.
    let inner: Vec<String> = pieces
        .iter()
        .map(|p| format!("ltrim(rtrim({p}, '}}'), '{{')"))
        .collect();
    format!("('{{' || {} || '}}')", inner.join(" || ',' || "))
}

/// The payload expression of a watch: the row's columns, and in the metadata member the old
/// row (and on UPDATE the changed columns) for a watch with `old_values`, and the context
/// object — every name `null` — for a watch with `context` (the writer's connection fills it in
/// if it set values, see [`CONTEXT_TRIGGER`]). Changed means `OLD.c IS NOT NEW.c`: SQLite's own
/// comparison of the stored values (NULL to NULL is no change; JSON held in TEXT compares as
/// text).
fn payload_expr(w: &ResolvedWatch) -> String {
    let channel = &w.channel;
    let columns = channel.payload_columns();
    let row = json_expr(channel.operation.row_variable(), &columns);
    let mut members: Vec<String> = Vec::new();
    if w.old_values {
        members.push(format!("'old', json({})", json_expr("OLD", &columns)));
        if channel.operation == crate::operation::Operation::Update {
            let tests: Vec<String> = w
                .table_columns
                .iter()
                .map(|(c, _)| {
                    let q = quote_ident(c);
                    let name = serde_json::to_string(c).expect("a string serializes");
                    format!(
                        "CASE WHEN OLD.{q} IS NOT NEW.{q} THEN {} ELSE '' END",
                        quote_sqlite_literal(&format!("{name},"))
                    )
                })
                .collect();
            members.push(format!(
                "'changed', json('[' || rtrim({}, ',') || ']')",
                tests.join(" || ")
            ));
        }
    }
    if !w.context.is_empty() {
        let names: Vec<String> = w
            .context
            .iter()
            .map(|n| format!("{}, NULL", quote_sqlite_literal(n)))
            .collect();
        members.push(format!("'context', json_object({})", names.join(", ")));
    }
    if members.is_empty() {
        return row;
    }
    format!(
        "json_set({row}, {}, json_object({}))",
        quote_sqlite_literal(&format!("$.{}", crate::payload::META_KEY)),
        members.join(", ")
    )
}

/// The most context names one watch may capture on SQLite (`json_object` takes at most 127
/// arguments by default).
pub(crate) const MAX_CONTEXT_NAMES: usize = MAX_OBJECT_COLUMNS;

/// Whether SQLite can capture context value `name`: any non-empty name without control
/// characters (it is only ever a quoted literal and a JSON key).
pub(crate) fn is_context_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(char::is_control)
}

/// The per-connection table the application's context values live in
/// ([`crate::sqlite_context::set`]): `name`, and `value` as JSON text.
pub(crate) const CONTEXT_TABLE: &str = "CREATE TEMP TABLE IF NOT EXISTS sqlnotify_context \
     (name TEXT PRIMARY KEY, value TEXT NOT NULL)";

/// The per-connection trigger that fills in a journal row's context values from the
/// connection's [`CONTEXT_TABLE`]. A trigger in the main schema may not read a TEMP table, and
/// an application-defined SQL function would fail the write on every connection that did not
/// register it; a TEMP trigger may read any schema, and exists only on connections that set
/// values — elsewhere the names the watch's trigger wrote as `null` stay `null`. It fires on
/// every journal insert of its connection and rewrites only rows that carry a context object;
/// nothing in it can raise: the payload is checked to be JSON before it is read, and a stored
/// value that is not JSON text reads as `null`. Dropping the journal drops it too.
pub(crate) const CONTEXT_TRIGGER: &str = "CREATE TEMP TRIGGER IF NOT EXISTS sqlnotify_context \
     AFTER INSERT ON main.sqlnotify_journal FOR EACH ROW \
     WHEN CASE WHEN json_valid(NEW.payload) \
     THEN json_type(NEW.payload, '$.__sqlnotify.context') = 'object' END \
     BEGIN UPDATE sqlnotify_journal SET payload = json_set(payload, '$.__sqlnotify.context', \
     json((SELECT json_group_object(k.key, CASE WHEN json_valid(c.value) THEN json(c.value) END) \
     FROM json_each(NEW.payload, '$.__sqlnotify.context') AS k \
     LEFT JOIN temp.sqlnotify_context AS c ON c.name = k.key))) \
     WHERE id = NEW.id; END";

/// Adds the `tx` column to a journal of an older version (run when `pragma_table_info` lacks
/// it: SQLite has no `ADD COLUMN IF NOT EXISTS`). Adding a nullable column rewrites nothing.
pub(crate) const JOURNAL_TX_UPGRADE: &str = "ALTER TABLE sqlnotify_journal ADD COLUMN tx INTEGER";

/// The per-connection trigger that records the writer's transaction in each journal row of a
/// connection that tracks its transactions ([`crate::sqlite_transactions::track`]):
/// `sqlnotify_tx(id)` is a function registered on that connection only (like the TEMP
/// trigger itself, so no other connection can fail on it) that answers the id of the
/// transaction's first journal row. Dropping the journal drops it too.
pub(crate) const TRANSACTION_TRIGGER: &str = "CREATE TEMP TRIGGER IF NOT EXISTS sqlnotify_tx      AFTER INSERT ON main.sqlnotify_journal FOR EACH ROW      BEGIN UPDATE sqlnotify_journal SET tx = sqlnotify_tx(NEW.id) WHERE id = NEW.id; END";

/// `CREATE TRIGGER` for a watch: append the payload to the journal.
pub(crate) fn trigger_sql(w: &ResolvedWatch) -> String {
    let channel = &w.channel;
    let (event, changed) = w.trigger_event(|c, _, _| format!("OLD.{c} IS NOT NEW.{c}"));
    let when = changed.map(|c| format!(" WHEN {c}")).unwrap_or_default();
    format!(
        "CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW{when} BEGIN \
         INSERT INTO sqlnotify_journal (channel, payload, created_at) VALUES ({chan}, {payload}, {NOW}); END",
        name = quote_ident(&channel.name),
        table = quote_ident(&channel.table),
        chan = quote_sqlite_literal(&channel.name),
        payload = payload_expr(w),
    )
}

/// Drops a watch's trigger.
pub(crate) fn drop_sql(channel: &str) -> String {
    format!("DROP TRIGGER IF EXISTS {};\n", quote_ident(channel))
}

/// Upserts a watch's catalog row.
pub(crate) fn catalog_upsert_sql(w: &ResolvedWatch) -> String {
    format!(
        "INSERT INTO sqlnotify_catalog (channel, table_name, operation, definition, installed_at) \
         VALUES ({}, {}, {}, {}, {NOW}) ON CONFLICT (channel) DO UPDATE SET table_name = excluded.table_name, \
         operation = excluded.operation, definition = excluded.definition, installed_at = excluded.installed_at;\n",
        quote_sqlite_literal(&w.channel.name),
        quote_sqlite_literal(&w.channel.table),
        quote_sqlite_literal(w.channel.operation.as_str()),
        quote_sqlite_literal(&trigger_sql(w)),
    )
}

/// A complete, idempotent install script for `watches`.
pub(crate) fn install_script(watches: &[ResolvedWatch]) -> String {
    let mut sql = format!(
        "-- sqlnotify install script (SQLite)\nPRAGMA journal_mode = WAL;\nBEGIN IMMEDIATE;\n{}\n",
        setup_sql()
    );
    for w in watches {
        sql.push_str(&format!("\n-- {}\n", crate::sql::comment(&w.channel.name)));
        sql.push_str(&drop_sql(&w.channel.name));
        sql.push_str(&trigger_sql(w));
        sql.push_str(";\n");
        sql.push_str(&catalog_upsert_sql(w));
    }
    sql.push_str("COMMIT;\n");
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Channel;
    use crate::operation::Operation;

    fn watch(op: Operation, extra: usize) -> ResolvedWatch {
        ResolvedWatch {
            channel: Channel {
                name: "sqlnotify_o'brien\\x".into(),
                schema: "main".into(),
                table: "Camel\"Case".into(),
                operation: op,
                label: Some("o'brien\\x".into()),
                key_columns: vec!["select".into()],
                extra_columns: (0..extra).map(|i| format!("c{i}")).collect(),
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
    fn quotes_everything_sqlite_style() {
        let t = trigger_sql(&watch(Operation::Insert, 0));
        assert!(
            t.starts_with(
                "CREATE TRIGGER \"sqlnotify_o'brien\\x\" AFTER INSERT ON \"Camel\"\"Case\""
            ),
            "{t}"
        );
        assert!(t.contains("VALUES ('sqlnotify_o''brien\\x', json_object('select', CASE WHEN typeof(NEW.\"select\")"));
    }

    #[test]
    fn updates_compare_with_is_not_and_deletes_read_old() {
        let mut w = watch(Operation::Update, 0);
        w.trigger_columns = vec![("a".into(), true), ("b".into(), true)];
        let t = trigger_sql(&w);
        assert!(t.contains("AFTER UPDATE OF \"a\", \"b\" ON"));
        assert!(t.contains("WHEN OLD.\"a\" IS NOT NEW.\"a\" OR OLD.\"b\" IS NOT NEW.\"b\""));
        assert!(trigger_sql(&watch(Operation::Delete, 0)).contains("OLD.\"select\""));
    }

    #[test]
    fn the_install_script_creates_every_table() {
        let script = install_script(&[]);
        for table in ["catalog", "journal", "consumers", "dead_letters", "trimmed"] {
            assert!(
                script.contains(&format!("CREATE TABLE IF NOT EXISTS sqlnotify_{table} (")),
                "{table}"
            );
        }
        assert!(script.contains(
            "CREATE INDEX IF NOT EXISTS sqlnotify_dead_letters_handler_state\n    ON sqlnotify_dead_letters (handler, state);"
        ));
    }

    #[test]
    fn context_names_are_written_null_beside_old_values() {
        let mut w = watch(Operation::Update, 1);
        w.context = vec!["app.user_id".into(), "o'brien".into()];
        let t = trigger_sql(&w);
        assert!(
            t.contains(
                "'$.__sqlnotify', json_object('context', json_object('app.user_id', NULL, 'o''brien', NULL)))"
            ),
            "{t}"
        );
        w.old_values = true;
        let t = trigger_sql(&w);
        assert!(
            t.contains("json_object('old', json(json_object(")
                && t.contains("'context', json_object('app.user_id', NULL"),
            "{t}"
        );
        assert!(is_context_name("app.user_id") && is_context_name("who am i?"));
        assert!(!is_context_name("") && !is_context_name("a\nb"));
    }

    #[test]
    fn old_values_add_the_old_row_and_the_changed_columns() {
        let mut w = watch(Operation::Update, 1);
        assert!(!trigger_sql(&w).contains("OLD."));
        w.old_values = true;
        w.table_columns = vec![("select".into(), true), ("we\"ird,".into(), true)];
        let t = trigger_sql(&w);
        assert!(t.contains("json_set(json_object('select', "), "{t}");
        assert!(t.contains("'$.__sqlnotify', json_object('old', json(json_object('select', CASE WHEN typeof(OLD.\"select\")"), "{t}");
        assert!(
            t.contains("'changed', json('[' || rtrim(CASE WHEN OLD.\"select\" IS NOT NEW.\"select\" THEN '\"select\",' ELSE '' END || CASE WHEN OLD.\"we\"\"ird,\" IS NOT NEW.\"we\"\"ird,\" THEN '\"we\\\"ird,\",' ELSE '' END, ',') || ']')"),
            "{t}"
        );
        w.channel.operation = Operation::Delete;
        let t = trigger_sql(&w);
        assert!(
            t.contains("json_object('old', json(json_object('select'"),
            "{t}"
        );
        assert!(!t.contains("changed"), "{t}");
    }

    #[test]
    fn wide_rows_are_built_in_pieces() {
        let t = trigger_sql(&watch(Operation::Insert, 100));
        assert_eq!(t.matches("json_object(").count(), 2);
        assert!(t.contains("|| ',' ||"));
    }
}
