//! Transaction ids on SQLite ([`ChangeEvent::transaction_id`](crate::ChangeEvent::transaction_id)):
//! SQLite's SQL has no transaction id, and a trigger cannot tell where a transaction began, so
//! a connection that wants its events to carry one says so with [`track`].
//!
//! How: [`track`] registers, on that connection only, a SQL function `sqlnotify_tx` and a
//! TEMP trigger on sqlnotify's journal that writes, into each journal row of the connection,
//! the id of the first journal row of its transaction; a commit or rollback hook forgets it,
//! so the next transaction starts again. Ids are unique: SQLite has one writer at a time, so a
//! transaction's journal rows are consecutive and the first one's id belongs to no other
//! transaction (a `ROLLBACK TO` that removes it removes every later row too, and the next
//! insert takes the same id back). Connections that do not call [`track`] write no id: their
//! events say `None`, and nothing on them can fail because of it (a trigger in the main
//! schema calling an application-defined function would fail every write on a connection that
//! did not register it — the TEMP trigger exists only where the function does).
//!
//! The last event of each tracked transaction is marked
//! ([`ChangeEvent::last_in_transaction`](crate::ChangeEvent::last_in_transaction)), counted
//! over the notifier's watches, and a transaction's events arrive together (they already do:
//! SQLite's journal is in commit order).
//!
//! [`track`] takes the connection's commit and rollback hooks (rusqlite keeps one of each per
//! connection): a hook the application sets afterwards replaces sqlnotify's, and the ids of
//! that connection's later transactions run together. Call it once per connection, after
//! sqlnotify's tables exist (after a notifier started once on the database); if they are
//! dropped (`cleanup`), call it again. Each tracked journal row costs one more row update in
//! the writer's transaction.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use rusqlite::functions::FunctionFlags;
use rusqlite::Connection;

use crate::error::{Error, Result};

/// Makes the journal rows written on `conn` from now on carry the id of their transaction
/// (rusqlite 0.32, the version sqlnotify uses). `conn` must be a connection to the database
/// sqlnotify watches, opened as its main database. Calling it again on the same connection
/// does no harm.
///
/// Fails with [`Error::UnknownTable`] when sqlnotify's journal is not in the database yet
/// (start a notifier on it first), and with [`Error::Unsupported`] when it is a journal of an
/// older version without the `tx` column (start a notifier of this version on it once).
///
/// ```no_run
/// # fn main() -> sqlnotify::Result<()> {
/// let mut conn = rusqlite::Connection::open("/var/lib/app/app.db").unwrap();
/// sqlnotify::sqlite_transactions::track(&conn)?;
/// let tx = conn.transaction().unwrap();
/// tx.execute("INSERT INTO orders (id, state) VALUES (7, 'new')", []).unwrap();
/// tx.execute("INSERT INTO order_lines (order_id, sku) VALUES (7, 'A-1')", []).unwrap();
/// tx.commit().unwrap(); // both events carry the same transaction_id()
/// # Ok(())
/// # }
/// ```
pub fn track(conn: &Connection) -> Result<()> {
    if !crate::sqlite::catalog::journal_has_tx(conn)? {
        // Without the column, the trigger would fail every write of this connection.
        let journal: i64 = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('sqlnotify_journal', 'main')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| Error::db("reading the columns of sqlnotify_journal", e))?;
        return Err(if journal == 0 {
            Error::UnknownTable {
                schema: "main".into(),
                table: "sqlnotify_journal (start a notifier on the database first)".into(),
            }
        } else {
            Error::Unsupported {
                what: "tracking transactions with a journal of an older sqlnotify version \
                       (sqlnotify_journal has no tx column): start a notifier of this \
                       version on the database first"
                    .into(),
            }
        });
    }
    // The id of the open transaction's first journal row; 0 between transactions.
    let first = Arc::new(AtomicI64::new(0));
    let current = first.clone();
    conn.create_scalar_function("sqlnotify_tx", 1, FunctionFlags::SQLITE_UTF8, move |ctx| {
        let id: i64 = ctx.get(0)?;
        Ok(
            match current.compare_exchange(0, id, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => id,
                Err(open) => open,
            },
        )
    })
    .map_err(|e| Error::db("registering sqlnotify_tx on this connection", e))?;
    let on_commit = first.clone();
    conn.commit_hook(Some(move || {
        on_commit.store(0, Ordering::SeqCst);
        false // let it commit
    }));
    let on_rollback = first;
    conn.rollback_hook(Some(move || on_rollback.store(0, Ordering::SeqCst)));
    conn.execute_batch(super::ddl::TRANSACTION_TRIGGER)
        .map_err(|e| Error::db("creating this connection's transaction trigger", e))
}
