//! Context values on SQLite ([`Watch::context`](crate::Watch::context)): SQLite has no server
//! session to read a user or a setting from, so the application sets per-connection values on
//! the connection it writes with, and the triggers of watches that name them carry them.
//!
//! How: [`set`] keeps the values in a TEMP table of that connection and creates, on that
//! connection only, a TEMP trigger on sqlnotify's journal that copies them into each journal
//! row that asks for context (a trigger in the main schema may not read a TEMP table, and an
//! application-defined SQL function would make every write on a connection that did not
//! register it fail). Connections that never call [`set`] write `null` for every name; no
//! write ever fails because of context.
//!
//! The values follow the connection's transactions like any write: set inside a transaction
//! that rolls back, a value is gone again. They last until [`clear`] / [`clear_all`] or until
//! the connection closes. Call [`set`] after sqlnotify's tables exist (after a notifier started
//! once on the database); if they are dropped (`cleanup`), call it again.

use rusqlite::Connection;
use serde_json::Value;

use crate::error::{Error, Result};

/// Sets context value `name` to `value` on `conn` (rusqlite 0.32, the version sqlnotify
/// uses): events of watches whose [`context`](crate::Watch::context) names `name`, caused by
/// writes on this connection from now on, carry `value`
/// ([`ChangeEvent::context`](crate::ChangeEvent::context)). Setting a name again replaces its
/// value. `conn` must be a connection to the database sqlnotify watches, opened as its main
/// database.
///
/// Fails with [`Error::InvalidOption`] for an empty name or one with control characters, and
/// with [`Error::Database`] when sqlnotify's journal is not in the database yet (start a
/// notifier on it first).
///
/// ```no_run
/// # fn main() -> sqlnotify::Result<()> {
/// let conn = rusqlite::Connection::open("/var/lib/app/app.db").unwrap();
/// sqlnotify::sqlite_context::set(&conn, "app.user_id", 42)?;
/// conn.execute("UPDATE orders SET state = 'paid' WHERE id = 7", []).unwrap();
/// # Ok(())
/// # }
/// ```
pub fn set(conn: &Connection, name: &str, value: impl Into<Value>) -> Result<()> {
    check_name(name)?;
    let value = value.into().to_string();
    ensure(conn)?;
    conn.execute(
        "INSERT INTO temp.sqlnotify_context (name, value) VALUES (?1, ?2) \
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        rusqlite::params![name, value],
    )
    .map_err(|e| Error::db(format!("setting context value {name:?}"), e))?;
    Ok(())
}

/// Removes context value `name` from `conn`: later events carry `null` for it. Removing a
/// name that is not set does nothing.
pub fn clear(conn: &Connection, name: &str) -> Result<()> {
    if !has_table(conn)? {
        return Ok(());
    }
    conn.execute("DELETE FROM temp.sqlnotify_context WHERE name = ?1", [name])
        .map_err(|e| Error::db(format!("clearing context value {name:?}"), e))?;
    Ok(())
}

/// Removes every context value from `conn`.
pub fn clear_all(conn: &Connection) -> Result<()> {
    if !has_table(conn)? {
        return Ok(());
    }
    conn.execute("DELETE FROM temp.sqlnotify_context", [])
        .map_err(|e| Error::db("clearing the context values", e))?;
    Ok(())
}

/// The context values set on `conn`, by name.
pub fn values(conn: &Connection) -> Result<serde_json::Map<String, Value>> {
    let mut out = serde_json::Map::new();
    if !has_table(conn)? {
        return Ok(out);
    }
    let read = |e| Error::db("reading the context values", e);
    let mut stmt = conn
        .prepare("SELECT name, value FROM temp.sqlnotify_context ORDER BY name")
        .map_err(read)?;
    let mut rows = stmt.query([]).map_err(read)?;
    while let Some(row) = rows.next().map_err(read)? {
        let name: String = row.get(0).map_err(read)?;
        let value: String = row.get(1).map_err(read)?;
        out.insert(name, serde_json::from_str(&value).unwrap_or(Value::Null));
    }
    Ok(out)
}

fn check_name(name: &str) -> Result<()> {
    if super::ddl::is_context_name(name) {
        Ok(())
    } else {
        Err(Error::InvalidOption {
            option: "sqlite_context name",
            reason: format!("{name:?} is empty or holds control characters"),
        })
    }
}

/// Creates the connection's TEMP table and trigger if missing.
fn ensure(conn: &Connection) -> Result<()> {
    conn.execute_batch(&format!(
        "{};\n{};",
        super::ddl::CONTEXT_TABLE,
        super::ddl::CONTEXT_TRIGGER
    ))
    .map_err(|e| {
        Error::db(
            "preparing this connection's context values (is sqlnotify installed in its main \
             database? start a notifier on it first)",
            e,
        )
    })
}

fn has_table(conn: &Connection) -> Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_temp_master WHERE type = 'table' AND name = 'sqlnotify_context'",
        [],
        |row| row.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .map_err(|e| Error::db("reading this connection's context table", e))
}
