//! A SQLite database file in a directory of its own, for tests that need a SQLite URL but not
//! the dialect's own test helpers (blocking API, CLI).

use std::path::PathBuf;
use std::time::Duration;

use rusqlite::Connection;

/// A SQLite database file in a directory of its own, removed on drop.
pub struct SqliteFile {
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl SqliteFile {
    /// A new file with `schema` applied.
    pub fn new(schema: &str) -> SqliteFile {
        super::init_logging();
        let dir = std::env::temp_dir().join(super::unique_name("sqlnotify-test"));
        std::fs::create_dir_all(&dir).unwrap();
        let db = SqliteFile {
            path: dir.join("app.db"),
            dir,
        };
        db.exec(schema);
        db
    }

    pub fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    /// Runs SQL on a fresh connection.
    pub fn exec(&self, sql: &str) {
        let conn = Connection::open(&self.path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute_batch(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// How many sqlnotify triggers are installed.
    pub fn triggers(&self) -> i64 {
        Connection::open(&self.path)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'sqlnotify_%'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    }
}

impl SqliteFile {
    /// Every sqlnotify trigger's name and SQL, one per line, by name.
    pub fn trigger_definitions(&self) -> String {
        Connection::open(&self.path)
            .unwrap()
            .query_row(
                "SELECT coalesce(group_concat(name || ': ' || sql, char(10)), '') FROM \
                 (SELECT name, sql FROM sqlite_master \
                   WHERE type = 'trigger' AND name LIKE 'sqlnotify_%' ORDER BY name)",
                [],
                |r| r.get(0),
            )
            .unwrap()
    }
}

impl Drop for SqliteFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
