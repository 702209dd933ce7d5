//! The MySQL / MariaDB test database: a database of its own per test on the server named by
//! `SQLNOTIFY_TEST_MYSQL_URL` ([`TestDb`]), with the [`Backend`] and [`ConsumerDb`]
//! implementations the shared scenarios run on.

use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts};
use sqlnotify::{Notifier, Operation, Watch};

use super::backend::{Backend, Kind};
use super::consumers::ConsumerDb;

/// The MySQL server tests use: `SQLNOTIFY_TEST_MYSQL_URL`, else the local server.
pub fn server_url() -> String {
    std::env::var("SQLNOTIFY_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// `url` with its database replaced by `db` (query parameters kept).
pub fn with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").expect("a URL") + 3;
    let base = match base[after_scheme..].find('/') {
        Some(slash) => &base[..after_scheme + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// `url` with an extra query parameter.
pub fn with_param(url: &str, param: &str) -> String {
    if url.contains('?') {
        format!("{url}&{param}")
    } else {
        format!("{url}?{param}")
    }
}

pub async fn connect(url: &str) -> Conn {
    let opts = Opts::from_url(url).unwrap_or_else(|e| panic!("bad test URL: {e}"));
    Conn::new(opts).await.unwrap_or_else(|e| {
        panic!("cannot connect to the test server: {e} (set SQLNOTIFY_TEST_MYSQL_URL)")
    })
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// The administrator's URL of the server it lives on.
    pub server: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        TestDb::on(&server_url()).await
    }

    /// A database of its own on the server `server` (an administrator's URL) connects to.
    pub async fn on(server: &str) -> TestDb {
        TestDb::named(server, super::unique_name("sqlnotify_test")).await
    }

    /// Database `name` on the server `server` (an administrator's URL) connects to, made now
    /// and dropped with the value.
    pub async fn named(server: &str, name: String) -> TestDb {
        super::init_logging();
        let mut admin = connect(server).await;
        admin
            .query_drop(format!(
                "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
            ))
            .await
            .expect("create the test database");
        let _ = admin.disconnect().await;
        let url = with_db(server, &name);
        TestDb {
            name,
            url,
            server: server.to_string(),
        }
    }

    pub async fn conn(&self) -> Conn {
        connect(&self.url).await
    }

    /// Runs SQL (several statements allowed) on a fresh connection.
    pub async fn exec(&self, sql: &str) {
        let mut conn = self.conn().await;
        conn.query_drop(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = conn.disconnect().await;
    }

    /// A query returning one integer.
    pub async fn count(&self, sql: &str) -> i64 {
        let mut conn = self.conn().await;
        let value: Option<Option<i64>> = conn
            .query_first(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = conn.disconnect().await;
        value.flatten().unwrap_or_else(|| panic!("{sql}: no value"))
    }

    /// A query returning one string per row.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        let mut conn = self.conn().await;
        let rows: Vec<String> = conn
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = conn.disconnect().await;
        rows
    }

    /// The sqlnotify triggers in this database, sorted.
    pub async fn triggers(&self) -> Vec<String> {
        self.strings(&format!(
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = '{}' \
             AND TRIGGER_NAME LIKE 'sqlnotify%' ORDER BY TRIGGER_NAME",
            self.name
        ))
        .await
    }

    /// The channels recorded in the catalog, sorted.
    pub async fn catalog(&self) -> Vec<String> {
        self.strings("SELECT channel FROM sqlnotify_catalog ORDER BY channel")
            .await
    }

    pub fn channel(&self, table: &str, op: &str) -> String {
        format!("sqlnotify_{}_{table}_{op}", self.name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (name, server) = (self.name.clone(), self.server.clone());
        // Drop runs outside async; use a runtime of our own on a plain thread.
        super::on_a_runtime_of_its_own(async move {
            if let Ok(opts) = Opts::from_url(&server) {
                if let Ok(mut conn) = Conn::new(opts).await {
                    // As PostgreSQL's `DROP DATABASE … WITH (FORCE)`: a test that failed may
                    // leave sessions in open transactions (its tasks frozen while this drop
                    // blocks their runtime), whose metadata locks would hold the drop for ever.
                    let sessions: Vec<u64> = conn
                        .exec(
                            "SELECT ID FROM information_schema.PROCESSLIST \
                             WHERE DB = ? AND ID <> CONNECTION_ID()",
                            (name.as_str(),),
                        )
                        .await
                        .unwrap_or_default();
                    for id in sessions {
                        let _ = conn.query_drop(format!("KILL {id}")).await;
                    }
                    let _ = conn
                        .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                        .await;
                    let _ = conn.disconnect().await;
                }
            }
        });
    }
}

/// Inserts `ids` into `table (id)`, one transaction per row.
pub async fn insert_rows(db: &TestDb, table: &str, ids: impl IntoIterator<Item = i64>) {
    let mut conn = db.conn().await;
    for id in ids {
        conn.exec_drop(format!("INSERT INTO `{table}` (id) VALUES (?)"), (id,))
            .await
            .unwrap();
    }
    let _ = conn.disconnect().await;
}

/// The most payload bytes a MySQL listener's read holds at once (`READ_BYTES` in
/// `src/mysql/listener.rs`).
pub const READ_BYTES: usize = 64 << 20;

/// The size of a large row's `big` value (see [`create_large_table`]).
pub const LARGE_SIZE: usize = 1 << 20;

/// Creates `table (id INT, big LONGTEXT)` whose `big` is [`LARGE_SIZE`] bytes of the letter of
/// the row's id (so a swapped payload shows): a virtual column, so that only the journal
/// stores it — a test writes half the bytes.
pub async fn create_large_table(db: &TestDb, table: &str) {
    db.exec(&format!(
        "CREATE TABLE `{table}` (id INT PRIMARY KEY, \
         big LONGTEXT AS (REPEAT(CHAR(97 + id % 26), {LARGE_SIZE})) VIRTUAL)"
    ))
    .await;
}

/// Inserts rows `1..=rows` into a [`create_large_table`] table in one statement: one
/// transaction, its journal rows together `rows` × [`LARGE_SIZE`] bytes of payload.
pub async fn insert_large_rows(db: &TestDb, table: &str, rows: i64) {
    let values: Vec<String> = (1..=rows).map(|id| format!("({id})")).collect();
    db.exec(&format!(
        "INSERT INTO `{table}` (id) VALUES {}",
        values.join(", ")
    ))
    .await;
}

/// The letter row `id`'s `big` is made of (see [`create_large_table`]).
pub fn large_letter(id: i64) -> char {
    (b'a' + (id % 26) as u8) as char
}

/// The sizes of the runs of consecutive events the listener received at the same moment
/// (`ChangeEvent::timestamp`: a MySQL read stamps the rows of one share of its payloads with
/// the time that share was fetched), and each run's payload bytes (its `big` values).
pub fn shares(events: &[sqlnotify::ChangeEvent]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(std::time::SystemTime, usize, usize)> = Vec::new();
    for e in events {
        let bytes = e.get("big").and_then(|v| v.as_str()).map_or(0, str::len);
        match runs.last_mut() {
            Some((at, n, held)) if *at == e.timestamp() => {
                *n += 1;
                *held += bytes;
            }
            _ => runs.push((e.timestamp(), 1, bytes)),
        }
    }
    runs.into_iter().map(|(_, n, held)| (n, held)).collect()
}

impl ConsumerDb for TestDb {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn builder_at(&self, url: &str) -> sqlnotify::NotifierBuilder {
        Notifier::builder(url).gap_timeout(Duration::from_millis(500))
    }

    fn watch(&self, table: &str) -> Watch {
        Watch::new(table, Operation::Insert)
    }

    async fn insert(&self, table: &str, ids: std::ops::RangeInclusive<i64>) {
        insert_rows(self, table, ids).await;
    }

    async fn journal_head(&self) -> i64 {
        self.count("SELECT COALESCE(MAX(id), 0) FROM sqlnotify_journal")
            .await
    }

    async fn journal_has(&self, id: i64) -> bool {
        self.count(&format!(
            "SELECT COUNT(*) FROM sqlnotify_journal WHERE id = {id}"
        ))
        .await
            == 1
    }

    fn channel(&self, table: &str) -> String {
        format!("sqlnotify_{}_{table}_insert", self.name)
    }

    async fn make_stale(&self, name: &str) {
        self.exec(&format!(
            "UPDATE sqlnotify_consumers SET updated_at = FROM_UNIXTIME({}) WHERE name = '{name}'",
            super::consumers::LONG_AGO
        ))
        .await;
    }

    async fn saved_position(&self, name: &str) -> sqlnotify::ConsumerPosition {
        sqlnotify::ConsumerPosition::JournalId(
            self.count(&format!(
                "SELECT watermark FROM sqlnotify_consumers WHERE name = '{name}'"
            ))
            .await,
        )
    }

    async fn create_old_consumer(&self, name: &str) {
        self.exec(&format!(
            "CREATE TABLE sqlnotify_consumers (
                 `name` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
                 `watermark` BIGINT NOT NULL,
                 `updated_at` TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
                 PRIMARY KEY (`name`)
             ) ENGINE=InnoDB;
             INSERT INTO sqlnotify_consumers VALUES ('{name}', 0, FROM_UNIXTIME({}))",
            super::consumers::LONG_AGO
        ))
        .await;
    }

    type Open = OpenMysql;

    async fn purge_in_progress(&self, name: &str, channel: &str) -> OpenMysql {
        let mut conn = self.conn().await;
        conn.query_drop(format!(
            "START TRANSACTION; UPDATE sqlnotify_consumers SET missed = JSON_ARRAY('{channel}') \
             WHERE name = '{name}'"
        ))
        .await
        .unwrap();
        OpenMysql(conn)
    }
}

/// A transaction left open on a connection of its own.
pub struct OpenMysql(Conn);

impl super::consumers::OpenTransaction for OpenMysql {
    async fn commit(mut self) {
        self.0.query_drop("COMMIT").await.unwrap();
        let _ = self.0.disconnect().await;
    }
}

/// A test database with the scenarios' tables `t` and `other`.
pub async fn consumer_db() -> TestDb {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id BIGINT PRIMARY KEY); CREATE TABLE other (id BIGINT PRIMARY KEY)")
        .await;
    db
}

impl Backend for TestDb {
    fn kind(&self) -> Kind {
        Kind::Mysql
    }
    fn url(&self) -> String {
        self.url.clone()
    }
    fn schema(&self) -> String {
        self.name.clone()
    }
    async fn run(&self, sql: &str) {
        self.exec(sql).await
    }
    async fn run_with_context(&self, context: &[(&str, &str)], sql: &str) {
        let sets: Vec<String> = context
            .iter()
            .map(|(name, value)| format!("SET {name} = '{}';", value.replace('\'', "''")))
            .collect();
        self.exec(&format!("{} {sql}", sets.join(" "))).await
    }
    async fn number(&self, sql: &str) -> i64 {
        self.count(sql).await
    }
    async fn insert_ids(&self, table: &str, ids: std::ops::RangeInclusive<i64>) {
        insert_rows(self, table, ids).await
    }
    async fn installed_triggers(&self) -> Vec<String> {
        self.triggers().await
    }
    async fn catalog_channels(&self) -> Vec<String> {
        self.catalog().await
    }
    async fn installed_at(&self, channel: &str) -> String {
        installed(self, channel).await.0
    }
    async fn sqlnotify_objects(&self) -> i64 {
        self.count(&format!(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{}' \
             AND TABLE_NAME LIKE 'sqlnotify%'",
            self.name
        ))
        .await
    }
    async fn definition(&self, channel: &str) -> String {
        installed(self, channel).await.2
    }
    async fn fingerprint(&self, channel: &str) -> String {
        let (at, created, statement) = installed(self, channel).await;
        format!("{at} {created} {statement}")
    }
}

/// (catalog installed_at, trigger created, trigger statement) of a channel.
pub async fn installed(db: &TestDb, channel: &str) -> (String, String, String) {
    let mut conn = db.conn().await;
    let row: Option<(String, String, String)> = conn
        .exec_first(
            "SELECT CAST(c.installed_at AS CHAR), CAST(t.CREATED AS CHAR), t.ACTION_STATEMENT \
             FROM sqlnotify_catalog c JOIN information_schema.TRIGGERS t \
               ON t.TRIGGER_SCHEMA = DATABASE() AND t.TRIGGER_NAME = c.channel \
             WHERE c.channel = ?",
            (channel,),
        )
        .await
        .unwrap();
    let _ = conn.disconnect().await;
    row.unwrap_or_else(|| panic!("{channel} is not installed"))
}
