//! MySQL / MariaDB snapshots of tables whose watch key is not the leading primary key (a
//! `primary_keys` override naming the primary key's columns the other way round, or its second
//! column; on tables without a primary key, a unique index, a plain index, a column with no
//! index): every row arrives once, in the order the snapshot chose
//! (the key's where an index has it, the primary key's otherwise), and `EXPLAIN` of every
//! page query the snapshot ran (from its trace log, parameters inlined) reads an index range,
//! with no filesort — except on a table with no primary key, no unique `NOT NULL` index and
//! no index on the key, where every page must scan and sort (a warning says so).

mod common;

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use common::mysql::TestDb;
use mysql_async::prelude::*;
use sqlnotify::{Notifier, Operation, Snapshot, SnapshotFeed, Watch};

/// Rows per table: enough that the optimizer prefers an index range to a scan and sort.
const ROWS: i64 = 5_000;
/// Rows per page.
const CHUNK: usize = 250;

/// The snapshot module's log lines (trace: each page's query) of the whole test binary.
fn logs() -> &'static Mutex<Vec<String>> {
    static LOGS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    LOGS.get_or_init(Default::default)
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.target().starts_with("sqlnotify::mysql::snapshot")
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            logs().lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (before `TestDb::new`, whose env_logger then stays out).
fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        log::set_logger(&Capture).expect("the first logger");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// The log lines about the snapshot of `db`.`table` that contain `needle`, their text after it.
fn logged(db: &TestDb, table: &str, needle: &str) -> Vec<String> {
    let what = format!("reading a snapshot of {}.{table}: {needle}", db.name);
    logs()
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| l.split_once(&what).map(|(_, rest)| rest.to_string()))
        .collect()
}

async fn next(feed: &mut SnapshotFeed) -> sqlnotify::ChangeEvent {
    tokio::time::timeout(Duration::from_secs(60), feed.next())
        .await
        .expect("an event in time")
        .expect("the feed is open")
        .expect("the snapshot reads")
}

/// Every snapshot row of `table`: its key (as JSON) and its `v`.
async fn snapshot(notifier: &Notifier, table: &str) -> Vec<(Vec<serde_json::Value>, i64)> {
    let mut feed = notifier
        .subscribe_snapshot(Snapshot::new(table).chunk_rows(CHUNK))
        .await
        .unwrap();
    let mut rows = Vec::new();
    loop {
        let e = next(&mut feed).await;
        assert!(e.is_snapshot());
        rows.push((
            e.id().values().to_vec(),
            e.get("v").and_then(|v| v.as_i64()).expect("v"),
        ));
        if e.ends_snapshot() {
            break;
        }
    }
    rows
}

/// A query and its plan: `type`, `key` and `Extra` of `EXPLAIN`.
type Plan = (String, String, Option<String>, String);

/// `EXPLAIN` of each page query the snapshot of `table` ran.
async fn explain(db: &TestDb, table: &str) -> Vec<Plan> {
    let queries = logged(db, table, "page: ");
    assert!(
        queries.len() >= ROWS as usize / CHUNK,
        "{table}: the page queries are traced: {queries:?}"
    );
    let mut conn = db.conn().await;
    let mut plans = Vec::new();
    for sql in queries {
        let rows: Vec<mysql_async::Row> = conn
            .query(format!("EXPLAIN {sql}"))
            .await
            .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {e}"));
        assert_eq!(rows.len(), 1, "one table: {sql}");
        let row = &rows[0];
        let kind: String = row.get("type").expect("type");
        let key: Option<String> = row.get("key").expect("key");
        let extra: Option<String> = row.get("Extra").expect("Extra");
        plans.push((sql, kind, key, extra.unwrap_or_default()));
    }
    let _ = conn.disconnect().await;
    plans
}

/// Asserts that every page read a range (or the start) of `index`, with no sort.
async fn assert_index_pages(db: &TestDb, table: &str, index: &str) {
    for (sql, kind, key, extra) in explain(db, table).await {
        assert!(
            key.as_deref() == Some(index)
                && ["range", "index", "ref", "ref_or_null"].contains(&kind.as_str())
                && !extra.contains("filesort"),
            "{table}: a page read as {kind} on {key:?} ({extra}), not a range of {index}: {sql}"
        );
    }
}

#[actix_rt::test]
async fn mysql_snapshots_page_on_an_index_whatever_the_key() {
    capture_logs();
    let db = TestDb::new().await;
    // (`primary_keys` on a table with a primary key names columns of it; on one without,
    // any columns)
    db.exec(&format!(
        "CREATE TABLE d (i INT PRIMARY KEY);
         INSERT INTO d VALUES (0), (1), (2), (3), (4), (5), (6), (7), (8), (9);
         CREATE TABLE seq (n INT PRIMARY KEY);
         INSERT INTO seq SELECT a.i + 10 * b.i + 100 * c.i + 1000 * e.i FROM d a, d b, d c, d e
           WHERE a.i + 10 * b.i + 100 * c.i + 1000 * e.i < {ROWS};
         CREATE TABLE swapped (a INT NOT NULL, b INT NOT NULL, v INT NOT NULL,
           PRIMARY KEY (a, b));
         CREATE TABLE second (a INT NOT NULL, b INT NOT NULL, v INT NOT NULL,
           PRIMARY KEY (a, b), KEY b (b));
         CREATE TABLE by_code (code VARCHAR(20) NOT NULL, v INT NOT NULL, UNIQUE KEY code (code));
         CREATE TABLE keyed (k INT NULL, v INT NOT NULL, KEY k (k));
         CREATE TABLE uniq (u INT NOT NULL, k INT NOT NULL, v INT NOT NULL, UNIQUE KEY u (u));
         CREATE TABLE bare (k INT NOT NULL, v INT NOT NULL);
         INSERT INTO swapped SELECT n % 50, {ROWS} - n, n FROM seq;
         INSERT INTO second SELECT n, n % 100, n FROM seq;
         INSERT INTO by_code SELECT CONCAT('c', LPAD((n * 7919) % {ROWS}, 6, '0')), n FROM seq;
         INSERT INTO keyed SELECT IF(n % 97 = 0, NULL, n % 1000), n FROM seq;
         INSERT INTO uniq SELECT ({ROWS} - n) * 3, n % 11, n FROM seq;
         INSERT INTO bare SELECT n % 1000, n FROM seq;
         DROP TABLE seq, d;
         ANALYZE TABLE swapped, second, by_code, keyed, uniq, bare"
    ))
    .await;
    let mut builder = Notifier::builder(&db.url);
    for (table, keys) in [
        ("swapped", &["b", "a"][..]),
        ("second", &["b"][..]),
        ("by_code", &["code"][..]),
        ("keyed", &["k"][..]),
        ("uniq", &["k"][..]),
        ("bare", &["k"][..]),
    ] {
        builder = builder.watch(
            Watch::new(table, Operation::Insert)
                .primary_keys(keys.iter().copied())
                .extra_columns(["v"]),
        );
    }
    let notifier = builder.start().await.unwrap();
    // (v, the key as text) of every row, as `sql` lists them
    let table_rows = |sql: &'static str| {
        let db = &db;
        async move {
            let mut conn = db.conn().await;
            let rows: Vec<(i64, String)> = conn.query(sql).await.unwrap();
            let _ = conn.disconnect().await;
            rows
        }
    };
    let got = |rows: Vec<(Vec<serde_json::Value>, i64)>| -> Vec<(i64, String)> {
        rows.into_iter()
            .map(|(key, v)| {
                let key: Vec<String> = key
                    .iter()
                    .map(|k| match k {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                (v, key.join(","))
            })
            .collect()
    };

    // a composite primary key as the key, its columns the other way round, no index on them in
    // that order: the primary key's order
    let rows = got(snapshot(&notifier, "swapped").await);
    let want = table_rows("SELECT v, CONCAT(b, ',', a) FROM swapped ORDER BY a, b").await;
    assert_eq!(rows, want, "swapped: each row once, in (a, b) order");
    assert_index_pages(&db, "swapped", "PRIMARY").await;

    // the primary key's second column as the key, an index on it: the key's order (then the
    // primary key's), through that index
    let rows = got(snapshot(&notifier, "second").await);
    let want = table_rows("SELECT v, CAST(b AS CHAR) FROM second ORDER BY b, a").await;
    assert_eq!(rows, want, "second: each row once, in (b, a) order");
    assert_index_pages(&db, "second", "b").await;

    // no primary key, a unique index on the key: the key's order, through that index
    let rows = got(snapshot(&notifier, "by_code").await);
    let want = table_rows("SELECT v, code FROM by_code ORDER BY code").await;
    assert_eq!(rows, want, "by_code: each row once, in code order");
    assert_index_pages(&db, "by_code", "code").await;

    // no primary key, a unique NOT NULL index, no index on the key: the unique index's order
    let rows = got(snapshot(&notifier, "uniq").await);
    let want = table_rows("SELECT v, CAST(k AS CHAR) FROM uniq ORDER BY u").await;
    assert_eq!(rows, want, "uniq: each row once, in u order");
    assert_index_pages(&db, "uniq", "u").await;

    // no primary key, a non-unique index on the key: the key's order, pages on key
    // boundaries, both queries through the index
    let rows = snapshot(&notifier, "keyed").await;
    let keys: Vec<Option<i64>> = rows.iter().map(|(k, _)| k[0].as_i64()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "keyed: key order, NULL first");
    let mut vs: Vec<i64> = rows.iter().map(|(_, v)| *v).collect();
    vs.sort_unstable();
    assert_eq!(vs, (0..ROWS).collect::<Vec<_>>(), "keyed: each row once");
    assert_index_pages(&db, "keyed", "k").await;
    for (sql, kind, key, extra) in explain_boundaries(&db, "keyed").await {
        assert!(
            key.as_deref() == Some("k") && !extra.contains("filesort"),
            "keyed: a page boundary read as {kind} on {key:?} ({extra}): {sql}"
        );
    }

    // no primary key, no unique index, no index on the key: correct, but every page scans and
    // sorts the table, and a warning says so (only here)
    let rows = snapshot(&notifier, "bare").await;
    let keys: Vec<Option<i64>> = rows.iter().map(|(k, _)| k[0].as_i64()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "bare: key order");
    let mut vs: Vec<i64> = rows.iter().map(|(_, v)| *v).collect();
    vs.sort_unstable();
    assert_eq!(vs, (0..ROWS).collect::<Vec<_>>(), "bare: each row once");
    for (sql, kind, key, extra) in explain(&db, "bare").await {
        assert!(
            kind == "ALL" && extra.contains("filesort"),
            "bare: expected a scan and a sort, got {kind} on {key:?} ({extra}): {sql}"
        );
    }
    for table in ["swapped", "second", "by_code", "uniq", "keyed", "bare"] {
        let warned = !logged(&db, table, "the table has no primary key").is_empty();
        assert_eq!(warned, table == "bare", "{table}: the warning");
    }
    notifier.stop().await.unwrap();
}

/// `EXPLAIN` of each page-boundary query the snapshot of `table` ran.
async fn explain_boundaries(db: &TestDb, table: &str) -> Vec<Plan> {
    let queries = logged(db, table, "page boundary: ");
    assert!(!queries.is_empty(), "{table}: boundaries traced");
    let mut conn = db.conn().await;
    let mut plans = Vec::new();
    for sql in queries {
        let row: mysql_async::Row = conn
            .query_first(format!("EXPLAIN {sql}"))
            .await
            .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {e}"))
            .expect("a plan");
        let extra: Option<String> = row.get("Extra").expect("Extra");
        plans.push((
            sql,
            row.get("type").expect("type"),
            row.get("key").expect("key"),
            extra.unwrap_or_default(),
        ));
    }
    let _ = conn.disconnect().await;
    plans
}

/// Keys whose `ORDER BY` order is not their text's: `ENUM` and `SET` sort by their number
/// (definition order; the bit mask), `BIT` by its value. Pages of 2 rows used to continue with
/// `k > 'b'`, comparing text: on `ENUM('b','a')` the second page was empty and the `a` rows
/// never came. Every row comes once, in the order `ORDER BY` gives.
#[actix_rt::test]
async fn mysql_snapshots_page_enum_set_and_bit_keys_in_their_sort_order() {
    capture_logs();
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE en (k ENUM('b','a') NOT NULL, id INT NOT NULL, v INT NOT NULL,
           PRIMARY KEY (k, id));
         INSERT INTO en VALUES ('b', 1, 1), ('a', 1, 2), ('b', 2, 3), ('a', 2, 4);
         CREATE TABLE st (s SET('y','x') NOT NULL, id INT NOT NULL, v INT NOT NULL,
           PRIMARY KEY (s, id));
         INSERT INTO st VALUES ('x', 1, 1), ('y', 1, 2), ('x,y', 1, 3), ('', 1, 4), ('y', 2, 5);
         CREATE TABLE bt (b BIT(9) NOT NULL, id INT NOT NULL, v INT NOT NULL,
           PRIMARY KEY (b, id));
         INSERT INTO bt VALUES (b'100000000', 1, 1), (b'11', 1, 2), (b'1', 1, 3), (b'10', 1, 4),
           (b'11', 2, 5)",
    )
    .await;
    let mut builder = Notifier::builder(&db.url);
    for table in ["en", "st", "bt"] {
        builder = builder.watch(Watch::new(table, Operation::Insert).extra_columns(["v"]));
    }
    let notifier = builder.start().await.unwrap();
    for (table, order) in [("en", "k, id"), ("st", "s, id"), ("bt", "b, id")] {
        let mut feed = notifier
            .subscribe_snapshot(Snapshot::new(table).chunk_rows(2))
            .await
            .unwrap();
        let mut vs = Vec::new();
        loop {
            let e = next(&mut feed).await;
            assert!(e.is_snapshot(), "{table}: {}", e.to_record());
            vs.push(e.get("v").and_then(|v| v.as_i64()).expect("v"));
            if e.ends_snapshot() {
                break;
            }
        }
        let mut conn = db.conn().await;
        let want: Vec<i64> = conn
            .query(format!("SELECT v FROM {table} ORDER BY {order}"))
            .await
            .unwrap();
        let _ = conn.disconnect().await;
        assert_eq!(
            vs, want,
            "{table}: each row once, in ORDER BY {order}'s order"
        );
    }
    notifier.stop().await.unwrap();
}
