//! The SQLite test database: a file in a directory of its own ([`TempDb`]), with the
//! [`Backend`] and [`ConsumerDb`] implementations the shared scenarios run on.

use std::path::PathBuf;
use std::time::Duration;

use rusqlite::Connection;
use sqlnotify::{Operation, Watch};

use super::backend::{Backend, Kind};
use super::consumers::ConsumerDb;

/// A database file in a directory of its own under the system temp dir, removed on drop.
pub struct TempDb {
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl TempDb {
    pub fn new() -> TempDb {
        super::init_logging();
        let dir = std::env::temp_dir().join(super::unique_name("sqlnotify-sqlite-test"));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let path = dir.join("app.db");
        // Creates the file (sqlnotify itself never creates one).
        Connection::open(&path).expect("create the database file");
        TempDb { dir, path }
    }

    pub fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    /// A fresh application connection (the application's writes never go through sqlnotify).
    pub fn conn(&self) -> Connection {
        let conn = Connection::open(&self.path).expect("open the database");
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn
    }

    /// Runs SQL on a fresh connection (short writes: fine on the test thread).
    pub fn exec(&self, sql: &str) {
        self.conn()
            .execute_batch(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Runs a query returning one integer.
    pub fn count(&self, sql: &str) -> i64 {
        self.conn()
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Names of the sqlnotify triggers installed, sorted.
    pub fn triggers(&self) -> Vec<String> {
        self.strings(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'sqlnotify_%' \
             ORDER BY name",
        )
    }

    /// The channels recorded in the catalog, sorted.
    pub fn catalog(&self) -> Vec<String> {
        self.strings("SELECT channel FROM sqlnotify_catalog ORDER BY channel")
    }

    pub fn strings(&self, sql: &str) -> Vec<String> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap();
        rows
    }

    pub fn ids(&self, sql: &str) -> Vec<i64> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let rows = stmt
            .query_map([], |r| r.get::<_, i64>(0))
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap();
        rows
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Inserts `ids` into `table (id)`, one transaction per row, on a blocking thread.
pub async fn insert_rows(db: &TempDb, table: &str, ids: impl IntoIterator<Item = i64>) {
    let (path, table) = (db.path.clone(), table.to_string());
    let ids: Vec<i64> = ids.into_iter().collect();
    tokio::task::spawn_blocking(move || {
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let sql = format!("INSERT INTO \"{table}\" (id) VALUES (?1)");
        for id in ids {
            conn.execute(&sql, [id]).unwrap();
        }
    })
    .await
    .unwrap();
}

impl ConsumerDb for TempDb {
    fn url(&self) -> String {
        TempDb::url(self)
    }

    fn watch(&self, table: &str) -> Watch {
        Watch::new(table, Operation::Insert)
    }

    async fn insert(&self, table: &str, ids: std::ops::RangeInclusive<i64>) {
        insert_rows(self, table, ids).await;
    }

    async fn journal_head(&self) -> i64 {
        self.count("SELECT coalesce(max(id), 0) FROM sqlnotify_journal")
    }

    async fn journal_has(&self, id: i64) -> bool {
        self.count(&format!(
            "SELECT count(*) FROM sqlnotify_journal WHERE id = {id}"
        )) == 1
    }

    fn channel(&self, table: &str) -> String {
        format!("sqlnotify_main_{table}_insert")
    }

    async fn make_stale(&self, name: &str) {
        self.exec(&format!(
            "UPDATE sqlnotify_consumers SET updated_at = {} WHERE name = '{name}'",
            super::consumers::LONG_AGO
        ));
    }

    async fn saved_position(&self, name: &str) -> sqlnotify::ConsumerPosition {
        sqlnotify::ConsumerPosition::JournalId(self.count(&format!(
            "SELECT cursor FROM sqlnotify_consumers WHERE name = '{name}'"
        )))
    }

    async fn create_old_consumer(&self, name: &str) {
        self.exec(&format!(
            "CREATE TABLE sqlnotify_consumers (
                 name TEXT PRIMARY KEY,
                 cursor INTEGER NOT NULL,
                 updated_at REAL NOT NULL
             );
             INSERT INTO sqlnotify_consumers VALUES ('{name}', 0, {})",
            super::consumers::LONG_AGO
        ));
    }

    type Open = OpenSqlite;

    async fn purge_in_progress(&self, name: &str, channel: &str) -> OpenSqlite {
        let conn = self.conn();
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; UPDATE sqlnotify_consumers SET missed = json_array('{channel}') \
             WHERE name = '{name}'"
        ))
        .unwrap();
        OpenSqlite(conn)
    }
}

/// A write transaction left open on a connection of its own.
pub struct OpenSqlite(Connection);

impl super::consumers::OpenTransaction for OpenSqlite {
    async fn commit(self) {
        self.0.execute_batch("COMMIT").unwrap();
    }
}

/// A test database with the scenarios' tables `t` and `other`.
pub async fn consumer_db() -> TempDb {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE TABLE other (id INTEGER PRIMARY KEY)");
    db
}

impl Backend for TempDb {
    fn kind(&self) -> Kind {
        Kind::Sqlite
    }
    fn url(&self) -> String {
        TempDb::url(self)
    }
    fn schema(&self) -> String {
        "main".into()
    }
    async fn run(&self, sql: &str) {
        self.exec(sql)
    }
    async fn run_with_context(&self, context: &[(&str, &str)], sql: &str) {
        let conn = self.conn();
        for (name, value) in context {
            sqlnotify::sqlite_context::set(&conn, name, *value).unwrap();
        }
        conn.execute_batch(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    async fn number(&self, sql: &str) -> i64 {
        self.count(sql)
    }
    async fn insert_ids(&self, table: &str, ids: std::ops::RangeInclusive<i64>) {
        insert_rows(self, table, ids).await
    }
    async fn installed_triggers(&self) -> Vec<String> {
        self.triggers()
    }
    async fn catalog_channels(&self) -> Vec<String> {
        self.catalog()
    }
    async fn installed_at(&self, channel: &str) -> String {
        let at: f64 = self
            .conn()
            .query_row(
                "SELECT installed_at FROM sqlnotify_catalog WHERE channel = ?1",
                [channel],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("{channel} is not in the catalog: {e}"));
        format!("{at:030.9}")
    }
    async fn sqlnotify_objects(&self) -> i64 {
        self.count("SELECT count(*) FROM sqlite_master WHERE name LIKE 'sqlnotify%'")
    }
    async fn definition(&self, channel: &str) -> String {
        self.conn()
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                [channel],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("{channel} is not installed: {e}"))
    }
    async fn fingerprint(&self, channel: &str) -> String {
        let conn = self.conn();
        let version: i64 = conn
            .query_row("PRAGMA schema_version", [], |r| r.get(0))
            .unwrap();
        let (at, sql): (f64, String) = conn
            .query_row(
                "SELECT c.installed_at, t.sql FROM sqlnotify_catalog c \
                 JOIN sqlite_master t ON t.type = 'trigger' AND t.name = c.channel \
                 WHERE c.channel = ?1",
                [channel],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap_or_else(|e| panic!("{channel} is not installed: {e}"));
        format!("{version} {at} {sql}")
    }
}
