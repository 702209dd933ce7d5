//! End-to-end tests of the SQLite dialect on real database files: URLs, delivery for every
//! operation and naming oddity, validation through the catalog, custom notifications, drift /
//! revoke / cleanup, writers in other processes, several listeners, named consumers resuming
//! after a restart, journal retention, and application writes that never see SQLITE_BUSY.

mod common;

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{wait_until, Events, ARRIVES_WITHIN};
use rusqlite::Connection;
use serde_json::json;
use sqlnotify::{ChangeEvent, Error, Filter, Key, Notifier, Operation, Subscription, Watch};
use tokio::sync::mpsc;

/// Set in a child process re-executing this test binary: the database file it writes to.
const CHILD_ENV: &str = "SQLNOTIFY_SQLITE_CHILD";

/// A database file in a directory of its own under the system temp dir, removed on drop.
struct TempDb {
    dir: PathBuf,
    path: PathBuf,
}

impl TempDb {
    fn new() -> TempDb {
        common::init_logging();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "sqlnotify-sqlite-test-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos
        ));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let path = dir.join("app.db");
        // Creates the file (sqlnotify itself never creates one).
        Connection::open(&path).expect("create the database file");
        TempDb { dir, path }
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    /// A fresh application connection (the application's writes never go through sqlnotify).
    fn conn(&self) -> Connection {
        let conn = Connection::open(&self.path).expect("open the database");
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn
    }

    /// Runs SQL on a fresh connection (short writes: fine on the test thread).
    fn exec(&self, sql: &str) {
        self.conn()
            .execute_batch(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Runs a query returning one integer.
    fn count(&self, sql: &str) -> i64 {
        self.conn()
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Names of the sqlnotify triggers installed, sorted.
    fn triggers(&self) -> Vec<String> {
        self.strings(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'sqlnotify_%' \
             ORDER BY name",
        )
    }

    /// The channels recorded in the catalog, sorted.
    fn catalog(&self) -> Vec<String> {
        self.strings("SELECT channel FROM sqlnotify_catalog ORDER BY channel")
    }

    fn strings(&self, sql: &str) -> Vec<String> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap();
        rows
    }

    fn ids(&self, sql: &str) -> Vec<i64> {
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

fn ids(events: &[ChangeEvent]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.id().as_i64().expect("an integer key"))
        .collect()
}

/// Inserts `ids` into `table (id)`, one transaction per row, on a blocking thread.
async fn insert_rows(db: &TempDb, table: &str, ids: impl IntoIterator<Item = i64>) {
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

// ---------------------------------------------------------------------------------------------
// 1. URLs
// ---------------------------------------------------------------------------------------------

/// `to`, written relative to the current directory (through `..` components).
fn relative_to_cwd(to: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
    let to = to.canonicalize().unwrap();
    let mut rel = PathBuf::new();
    for c in cwd.components() {
        if matches!(c, Component::Normal(_)) {
            rel.push("..");
        }
    }
    for c in to.components() {
        if let Component::Normal(part) = c {
            rel.push(part);
        }
    }
    rel
}

#[actix_rt::test]
async fn urls_absolute_relative_in_memory_and_missing_files() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY)");

    // sqlite:///absolute/path
    assert!(db.path.is_absolute());
    assert!(db.url().starts_with("sqlite:///"));
    let builder = Notifier::builder(db.url()).watch(Watch::new("t", Operation::Insert));
    assert_eq!(builder.dialect_name().unwrap(), "sqlite");
    let notifier = builder.start().await.unwrap();
    assert_eq!(notifier.dialect_name(), "sqlite");
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (1)");
    let e = ev.next().await;
    assert_eq!(e.channel(), "sqlnotify_main_t_insert");
    assert_eq!((e.schema(), e.table()), ("main", "t"));
    assert_eq!(e.id().as_i64(), Some(1));
    notifier.stop().await.unwrap();

    // sqlite://relative/path (relative to the current directory)
    let rel = relative_to_cwd(&db.path);
    assert!(rel.is_relative());
    let url = format!("sqlite://{}", rel.display());
    assert!(!url.starts_with("sqlite:///"), "{url}");
    let builder = Notifier::builder(&url).watch(Watch::new("t", Operation::Insert));
    assert_eq!(builder.dialect_name().unwrap(), "sqlite");
    let notifier = builder.start().await.unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (2)");
    assert_eq!(ev.next().await.id().as_i64(), Some(2));
    ev.assert_empty();
    notifier.stop().await.unwrap();

    // in-memory databases are refused, whatever the spelling
    for url in [
        "sqlite::memory:",
        "sqlite://:memory:",
        "sqlite://file:x?mode=memory&cache=shared",
    ] {
        let builder = Notifier::builder(url).watch(Watch::new("t", Operation::Insert));
        let e = builder.dialect_name().unwrap_err();
        assert!(matches!(e, Error::InvalidUrl { .. }), "{url}: {e:?}");
        assert!(e.to_string().contains("in-memory"), "{url}: {e}");
        let e = builder.start().await.unwrap_err();
        assert!(matches!(e, Error::InvalidUrl { .. }), "{url}: {e:?}");
        assert!(e.to_string().contains("in-memory"), "{url}: {e}");
    }

    // a missing file: a database error naming the path, and no file is created
    let missing = db.dir.join("missing.db");
    let url = format!("sqlite://{}", missing.display());
    let builder = Notifier::builder(&url).watch(Watch::new("t", Operation::Insert));
    assert_eq!(builder.dialect_name().unwrap(), "sqlite");
    let e = builder.start().await.unwrap_err();
    assert!(matches!(e, Error::Database { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );
    assert!(!missing.exists(), "sqlnotify must not create the database");
    // relative and missing
    let e = Notifier::builder("sqlite://no/such/dir/app.db")
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Database { .. }), "{e:?}");
    assert!(e.to_string().contains("no/such/dir/app.db"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// 2. Delivery
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn insert_update_delete_carry_key_and_extra_columns_with_increasing_sequences() {
    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, name TEXT)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Insert).extra_columns(["email", "name"]))
        .watch(Watch::new("users", Operation::Update).extra_columns(["email"]))
        .watch(Watch::new("users", Operation::Delete))
        .start()
        .await
        .unwrap();
    let mut ins = Events::subscribe(&notifier, Subscription::new("users", Operation::Insert)).await;
    let mut upd = Events::subscribe(&notifier, Subscription::new("users", Operation::Update)).await;
    let mut del = Events::subscribe(
        &notifier,
        Subscription::new("main.users", Operation::Delete),
    )
    .await;

    db.exec("INSERT INTO users VALUES (1, 'a@b.c', 'Ann')");
    let e = ins.next().await;
    assert_eq!(e.channel(), "sqlnotify_main_users_insert");
    assert_eq!(
        (e.schema(), e.table(), e.operation()),
        ("main", "users", Operation::Insert)
    );
    assert_eq!(e.id(), &Key::Single(json!(1)));
    assert_eq!(e.key_columns(), ["id"]);
    assert_eq!(e.get("email"), Some(&json!("a@b.c")));
    assert_eq!(e.get("name"), Some(&json!("Ann")));
    assert!(!e.is_truncated());
    let s1 = e.sequence().expect("SQLite events carry their journal id");

    db.exec("UPDATE users SET email = 'x@y.z', name = 'Bob' WHERE id = 1");
    let e = upd.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("email")),
        (Some(1), Some(&json!("x@y.z")))
    );
    assert_eq!(e.get("name"), None, "only the watched columns are carried");
    let s2 = e.sequence().unwrap();

    db.exec("DELETE FROM users WHERE id = 1");
    let e = del.next().await;
    assert_eq!(e.id().as_i64(), Some(1));
    assert!(e.extra_columns().is_empty());
    let s3 = e.sequence().unwrap();
    assert!(s1 < s2 && s2 < s3, "{s1} {s2} {s3}");

    // many rows in one transaction: in order, sequences strictly increasing
    db.exec(
        "BEGIN; INSERT INTO users (id, email) VALUES (10, 'a'), (11, 'b'), (12, 'c'); \
         UPDATE users SET email = 'z' WHERE id = 11; COMMIT;",
    );
    let batch = ins.take(3).await;
    assert_eq!(ids(&batch), [10, 11, 12]);
    assert_eq!(batch[2].get("name"), Some(&json!(null)));
    let seqs: Vec<i64> = batch.iter().map(|e| e.sequence().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(seqs[0] > s3);
    let e = upd.next().await;
    assert_eq!(e.id().as_i64(), Some(11));
    assert!(e.sequence().unwrap() > seqs[2]);

    // a rolled-back transaction produces nothing; the sentinel proves it
    db.exec("BEGIN; INSERT INTO users (id) VALUES (99); ROLLBACK;");
    db.exec("INSERT INTO users (id) VALUES (13)");
    assert_eq!(ins.next().await.id().as_i64(), Some(13));
    ins.assert_empty();
    upd.assert_empty();
    del.assert_empty();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn composite_keys_come_in_declared_order() {
    let db = TempDb::new();
    db.exec(
        "CREATE TABLE order_items (item_id INTEGER, order_id INTEGER, qty INTEGER, \
         PRIMARY KEY (order_id, item_id))",
    );
    let notifier = Notifier::builder(db.url())
        // default: the real primary key, in key order (order_id, item_id)
        .watch(Watch::new("order_items", Operation::Insert).extra_columns(["qty"]))
        // declared order wins
        .watch(Watch::new("order_items", Operation::Update).primary_keys(["item_id", "order_id"]))
        .start()
        .await
        .unwrap();
    let mut ins = Events::subscribe(
        &notifier,
        Subscription::new("order_items", Operation::Insert),
    )
    .await;
    let mut upd = Events::subscribe(
        &notifier,
        Subscription::new("order_items", Operation::Update),
    )
    .await;
    db.exec("INSERT INTO order_items VALUES (7, 100, 2)");
    let e = ins.next().await;
    assert_eq!(e.id(), &Key::Composite(vec![json!(100), json!(7)]));
    assert_eq!(e.key_columns(), ["order_id", "item_id"]);
    assert_eq!(e.get("qty"), Some(&json!(2)));
    db.exec("UPDATE order_items SET qty = 3");
    let e = upd.next().await;
    assert_eq!(e.id(), &Key::Composite(vec![json!(7), json!(100)]));
    assert_eq!(e.key_columns(), ["item_id", "order_id"]);
    ins.assert_empty();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn without_rowid_tables_are_watched() {
    let db = TempDb::new();
    db.exec("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID");
    let mut builder = Notifier::builder(db.url());
    for op in Operation::ALL {
        builder = builder.watch(Watch::new("kv", op).extra_columns(["v"]));
    }
    let notifier = builder.start().await.unwrap();
    let mut all = Vec::new();
    for op in Operation::ALL {
        all.push(Events::subscribe(&notifier, Subscription::new("kv", op)).await);
    }
    db.exec("INSERT INTO kv VALUES ('a', 'one')");
    db.exec("UPDATE kv SET v = 'two' WHERE k = 'a'");
    db.exec("DELETE FROM kv WHERE k = 'a'");
    let expected = ["one", "two", "two"];
    for (events, v) in all.iter_mut().zip(expected) {
        let e = events.next().await;
        assert_eq!(e.id().as_str(), Some("a"));
        assert_eq!(e.get("v"), Some(&json!(v)));
    }
    for events in &mut all {
        events.assert_empty();
    }
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn mixed_case_names_keyword_columns_and_quotes_in_labels_work() {
    let db = TempDb::new();
    db.exec(
        r#"CREATE TABLE "CamelCase" ("Id" INTEGER PRIMARY KEY, "select" TEXT, "we""ird" TEXT)"#,
    );
    let label = "o'brien\\x";
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("CamelCase", Operation::Insert).extra_columns(["select", "we\"ird"]))
        .watch(
            Watch::new("CamelCase", Operation::Insert)
                .channel_label(label)
                .extra_columns(["select"]),
        )
        .start()
        .await
        .unwrap();
    assert_eq!(
        db.triggers(),
        ["sqlnotify_main_CamelCase_insert", "sqlnotify_o'brien\\x"]
    );
    let mut plain =
        Events::subscribe(&notifier, Subscription::new("CamelCase", Operation::Insert)).await;
    let mut labelled = Events::subscribe(
        &notifier,
        Subscription::new("CamelCase", Operation::Insert).channel_label(label),
    )
    .await;
    db.exec(r#"INSERT INTO "CamelCase" VALUES (1, 'drop table x; --', 'q"uo''te\')"#);
    let e = plain.next().await;
    assert_eq!(e.channel(), "sqlnotify_main_CamelCase_insert");
    assert_eq!(e.table(), "CamelCase");
    assert_eq!(e.get("Id"), Some(&json!(1)));
    assert_eq!(e.get("select"), Some(&json!("drop table x; --")));
    assert_eq!(e.get("we\"ird"), Some(&json!("q\"uo'te\\")));
    let e = labelled.next().await;
    assert_eq!(e.channel(), "sqlnotify_o'brien\\x");
    assert_eq!(e.channel_info().label(), Some(label));
    assert_eq!(e.id().as_i64(), Some(1));
    assert_eq!(e.get("select"), Some(&json!("drop table x; --")));
    plain.assert_empty();
    labelled.assert_empty();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn trigger_columns_fire_only_on_a_real_change() {
    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, name TEXT, score REAL)");
    let notifier = Notifier::builder(db.url())
        .watch(
            Watch::new("users", Operation::Update)
                .extra_columns(["email", "score"])
                .trigger_columns(["email", "score"]),
        )
        .start()
        .await
        .unwrap();
    let mut upd = Events::subscribe(&notifier, Subscription::new("users", Operation::Update)).await;
    db.exec("INSERT INTO users VALUES (1, 'a', 'n', NULL)");
    db.exec("UPDATE users SET name = 'other'"); // not a trigger column
    db.exec("UPDATE users SET email = 'a'"); // named, but unchanged
    db.exec("UPDATE users SET score = NULL"); // NULL -> NULL is no change
    db.exec("UPDATE users SET email = 'b'"); // real change: the sentinel
    let e = upd.next().await;
    assert_eq!(
        e.get("email"),
        Some(&json!("b")),
        "the earlier no-op updates produced no event"
    );
    upd.assert_empty();
    db.exec("UPDATE users SET score = 1.5"); // NULL -> value
    let e = upd.next().await;
    assert_eq!(e.get("score"), Some(&json!(1.5)));
    db.exec("UPDATE users SET score = 1.5, email = 'b'"); // unchanged again
    db.exec("UPDATE users SET email = NULL"); // value -> NULL
    let e = upd.next().await;
    assert_eq!(e.get("email"), Some(&json!(null)));
    assert_eq!(e.get("score"), Some(&json!(1.5)));
    db.exec("UPDATE users SET email = NULL"); // NULL -> NULL
    db.exec("UPDATE users SET score = NULL"); // value -> NULL: the sentinel
    let e = upd.next().await;
    assert_eq!(e.get("score"), Some(&json!(null)));
    upd.assert_empty();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn filters_match_typed_values() {
    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, score REAL)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Insert).extra_columns(["email", "score"]))
        .start()
        .await
        .unwrap();
    let sub = |f: Option<Filter>| {
        let s = Subscription::new("users", Operation::Insert);
        match f {
            Some(f) => s.filter(f),
            None => s,
        }
    };
    let mut id42 = Events::subscribe(&notifier, sub(Some(Filter::eq("id", 42)))).await;
    let mut id_str = Events::subscribe(&notifier, sub(Some(Filter::eq("id", "42")))).await;
    let mut high = Events::subscribe(&notifier, sub(Some(Filter::gt("score", 10)))).await;
    let mut some =
        Events::subscribe(&notifier, sub(Some(Filter::is_in("email", ["a@x", "b@x"])))).await;
    let mut no_email = Events::subscribe(&notifier, sub(Some(Filter::is_null("email")))).await;
    let mut all = Events::subscribe(&notifier, sub(None)).await;

    db.exec(
        "INSERT INTO users VALUES (1, 'a@x', 5), (42, 'c@x', 11.5), (3, NULL, 20), \
         (4, 'b@x', 100), (5, '42', 10)",
    );
    assert_eq!(ids(&all.take(5).await), [1, 42, 3, 4, 5]);
    assert_eq!(ids(&id42.take(1).await), [42]);
    assert_eq!(ids(&high.take(3).await), [42, 3, 4]);
    assert_eq!(ids(&some.take(2).await), [1, 4]);
    assert_eq!(ids(&no_email.take(1).await), [3]);
    // "all" got the last row: nothing else can still be on its way to the others
    for e in [
        &mut id42,
        &mut id_str,
        &mut high,
        &mut some,
        &mut no_email,
        &mut all,
    ] {
        e.assert_empty();
    }
    let stats = notifier.stats().await.unwrap();
    // 5 rows for the five filtered subscribers, of which they took 1 + 0 + 3 + 2 + 1
    assert_eq!(stats.filtered_out, 5 * 5 - 7, "{stats:?}");
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn blob_values_arrive_as_hex_text_and_the_write_succeeds() {
    let db = TempDb::new();
    db.exec("CREATE TABLE files (id INTEGER PRIMARY KEY, data BLOB, note ANY_TYPE)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("files", Operation::Insert).extra_columns(["data", "note"]))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("files", Operation::Insert)).await;
    let conn = db.conn();
    conn.execute(
        "INSERT INTO files VALUES (1, ?1, ?2)",
        rusqlite::params![vec![0xde_u8, 0xad, 0xbe, 0xef, 0x00], "text"],
    )
    .expect("a BLOB must not make the write fail");
    conn.execute("INSERT INTO files VALUES (2, X'', x'00ff')", [])
        .unwrap();
    let e = ev.next().await;
    assert_eq!(e.get("data"), Some(&json!("DEADBEEF00")));
    assert_eq!(e.get("note"), Some(&json!("text")));
    let e = ev.next().await;
    assert_eq!(e.id().as_i64(), Some(2));
    assert_eq!(e.get("data"), Some(&json!("")));
    assert_eq!(e.get("note"), Some(&json!("00FF")));
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn wide_rows_and_infinite_reals_arrive_whole() {
    let db = TempDb::new();
    // 130 extra columns: over what one json_object() call takes, so the payload is built in
    // pieces; values that look like braces must survive the joining.
    let cols: Vec<String> = (0..130).map(|i| format!("c{i}")).collect();
    let defs: Vec<String> = cols.iter().map(|c| format!("{c} TEXT")).collect();
    db.exec(&format!(
        "CREATE TABLE w (id INTEGER PRIMARY KEY, r REAL, {})",
        defs.join(", ")
    ));
    let mut extra = cols.clone();
    extra.push("r".into());
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("w", Operation::Insert).extra_columns(extra))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("w", Operation::Insert)).await;
    db.exec("INSERT INTO w (id, r, c0, c59, c60, c129) VALUES (1, 2.5, '}{', '}', '{', '{x}')");
    let e = ev.next().await;
    assert_eq!(e.extra_columns().len(), 131);
    assert_eq!(e.get("c0"), Some(&json!("}{")));
    assert_eq!(e.get("c59"), Some(&json!("}")));
    assert_eq!(e.get("c60"), Some(&json!("{")));
    assert_eq!(e.get("c129"), Some(&json!("{x}")));
    assert_eq!(e.get("c5"), Some(&json!(null)));
    assert_eq!(e.get("r"), Some(&json!(2.5)));

    // SQLite stores overflowing REALs as infinities; the event must not be dropped.
    db.exec("INSERT INTO w (id, r) VALUES (2, 1e999), (3, -1e999), (4, 1e308)");
    let e = ev.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("r")),
        (Some(2), Some(&json!("Infinity")))
    );
    let e = ev.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("r")),
        (Some(3), Some(&json!("-Infinity")))
    );
    let e = ev.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("r")),
        (Some(4), Some(&json!(1e308)))
    );
    ev.assert_empty();
    assert_eq!(notifier.stats().await.unwrap().malformed, 0);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn text_that_is_not_utf8_does_not_wedge_the_listener() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert).extra_columns(["v"]))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    // SQLite stores whatever bytes it is given as TEXT; the trigger copies them as they are.
    db.exec("INSERT INTO t VALUES (1, CAST(X'61FF62' AS TEXT))");
    db.exec("INSERT INTO t VALUES (2, 'ok')");
    let e = ev.next().await;
    assert_eq!(e.id().as_i64(), Some(1));
    assert_eq!(e.get("v"), Some(&json!("a\u{FFFD}b")));
    let e = ev.next().await;
    assert_eq!((e.id().as_i64(), e.get("v")), (Some(2), Some(&json!("ok"))));
    ev.assert_empty();
    let stats = notifier.stats().await.unwrap();
    assert_eq!(stats.restarts, 0, "{stats:?}");
    notifier.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. Validation
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn invalid_watches_fail_through_the_catalog_and_install_nothing() {
    let db = TempDb::new();
    db.exec(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT); \
         CREATE TABLE logs (msg TEXT, at REAL); \
         CREATE VIEW active AS SELECT * FROM users;",
    );
    let ok = Watch::new("users", Operation::Insert).extra_columns(["email"]);
    let start = |bad: Watch| {
        let builder = Notifier::builder(db.url()).watch(ok.clone()).watch(bad);
        async move { builder.start().await.unwrap_err() }
    };

    let e = start(Watch::new("nope", Operation::Insert)).await;
    assert!(
        matches!(&e, Error::UnknownTable { schema, table } if schema == "main" && table == "nope"),
        "{e:?}"
    );
    let e = start(Watch::new("users", Operation::Update).extra_columns(["name"])).await;
    assert!(
        matches!(&e, Error::UnknownColumn { column, list: "extra_columns", .. } if column == "name"),
        "{e:?}"
    );
    let e = start(Watch::new("users", Operation::Update).trigger_columns(["name"])).await;
    assert!(
        matches!(&e, Error::UnknownColumn { column, list: "trigger_columns", .. } if column == "name"),
        "{e:?}"
    );
    let e = start(Watch::new("users", Operation::Update).primary_keys(["name"])).await;
    assert!(
        matches!(&e, Error::UnknownColumn { column, list: "primary_keys", .. } if column == "name"),
        "{e:?}"
    );
    let e = start(Watch::new("users", Operation::Update).primary_keys(["email"])).await;
    assert!(
        matches!(&e, Error::NotPrimaryKey { column, table, .. } if column == "email" && table == "users"),
        "{e:?}"
    );
    let e = start(Watch::new("logs", Operation::Insert)).await;
    assert!(
        matches!(&e, Error::NoPrimaryKey { table, .. } if table == "logs"),
        "{e:?}"
    );
    let e = start(Watch::new("active", Operation::Insert)).await;
    assert!(
        matches!(&e, Error::UnknownTable { table, .. } if table == "active"),
        "a view is not a table: {e:?}"
    );
    let e = start(Watch::new("other.t", Operation::Insert)).await;
    assert!(
        matches!(&e, Error::UnknownSchema { schema } if schema == "other"),
        "{e:?}"
    );
    let e = start(Watch::new("users", Operation::Insert).schema("temp")).await;
    assert!(
        matches!(&e, Error::UnknownSchema { schema } if schema == "temp"),
        "{e:?}"
    );

    // nothing was installed by any failed start
    assert_eq!(db.triggers(), Vec::<String>::new());
    assert_eq!(
        db.count("SELECT count(*) FROM sqlite_master WHERE name LIKE 'sqlnotify%'"),
        0
    );

    // a table without a primary key works when the watch names the key columns
    let notifier = Notifier::builder(db.url())
        .watch(ok)
        .watch(Watch::new("logs", Operation::Insert).primary_keys(["msg"]))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("logs", Operation::Insert)).await;
    db.exec("INSERT INTO logs VALUES ('hello', 1.0)");
    assert_eq!(ev.next().await.id().as_str(), Some("hello"));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn labels_differing_only_in_case_are_rejected() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    // SQLite trigger names ignore case: both would be trigger "sqlnotify_a".
    let e = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert).channel_label("Changes"))
        .watch(Watch::new("t", Operation::Update).channel_label("changes"))
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::DuplicateWatch { channel, .. } if channel == "sqlnotify_changes"),
        "{e:?}"
    );
    assert!(db.triggers().is_empty());
    let e = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert))
        .watch(Watch::new("t", Operation::Update).channel_label("MAIN_T_INSERT"))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DuplicateWatch { .. }), "{e:?}");
    assert!(db.triggers().is_empty());
}

// ---------------------------------------------------------------------------------------------
// 4. Custom notifications
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn custom_notifications_reach_every_notifier_and_bad_payloads_are_rejected() {
    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)");
    let builder = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]));
    let (n1, n2) = (
        builder.start().await.unwrap(),
        builder.start().await.unwrap(),
    );
    let mut e1 = Events::subscribe(&n1, Subscription::new("users", Operation::Insert)).await;
    let mut e2 = Events::subscribe(&n2, Subscription::new("users", Operation::Insert)).await;

    n1.notify("users", Operation::Insert, json!({"id": 7, "email": "x@y"}))
        .await
        .unwrap();
    for events in [&mut e1, &mut e2] {
        let e = events.next().await;
        assert_eq!(e.channel(), "sqlnotify_main_users_insert");
        assert_eq!(e.id().as_i64(), Some(7));
        assert_eq!(e.get("email"), Some(&json!("x@y")));
        assert!(e.sequence().is_some());
    }

    // invalid payloads are rejected before anything is written
    let journal = db.count("SELECT count(*) FROM sqlnotify_journal");
    for bad in [
        json!([1, 2]),
        json!("text"),
        json!({"email": "no key"}),
        json!({"id": 1, "__sqlnotify": {"overflow": 1}}),
    ] {
        let e = n1
            .notify("users", Operation::Insert, bad.clone())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidPayload { .. }), "{bad}: {e:?}");
    }
    let e = n1
        .notify("users", Operation::Delete, json!({"id": 1}))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotWatched { .. }), "{e:?}");
    assert_eq!(db.count("SELECT count(*) FROM sqlnotify_journal"), journal);

    // no size limit: a 100 KB payload goes through whole (from the second notifier)
    let big = "x".repeat(100 * 1024);
    n2.notify_with(
        sqlnotify::CustomEvent::new(
            "users",
            Operation::Insert,
            json!({"id": 8, "email": big.clone()}),
        )
        .allow_overflow(false),
    )
    .await
    .unwrap();
    for events in [&mut e1, &mut e2] {
        let e = events.next().await;
        assert_eq!(
            e.id().as_i64(),
            Some(8),
            "the invalid payloads sent nothing"
        );
        assert!(!e.is_truncated());
        assert_eq!(e.get("email").and_then(|v| v.as_str()), Some(big.as_str()));
        events.assert_empty();
    }
    n1.stop().await.unwrap();
    n2.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5. Revoke, drift, cleanup, externally managed DDL
// ---------------------------------------------------------------------------------------------

fn schema_version(db: &TempDb) -> i64 {
    db.count("PRAGMA schema_version")
}

fn installed_at(db: &TempDb, channel: &str) -> f64 {
    db.conn()
        .query_row(
            "SELECT installed_at FROM sqlnotify_catalog WHERE channel = ?1",
            [channel],
            |r| r.get(0),
        )
        .unwrap()
}

fn trigger_sql(db: &TempDb, name: &str) -> String {
    db.conn()
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
            [name],
            |r| r.get(0),
        )
        .unwrap()
}

#[actix_rt::test]
async fn unchanged_watches_are_not_reinstalled_and_drift_is_an_error_or_a_replacement() {
    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, name TEXT)");
    let channel = "sqlnotify_main_users_update";
    let v1 = Watch::new("users", Operation::Update).extra_columns(["email"]);
    let n = Notifier::builder(db.url())
        .watch(v1.clone())
        .start()
        .await
        .unwrap();
    n.stop().await.unwrap();
    let (version, at, sql) = (
        schema_version(&db),
        installed_at(&db, channel),
        trigger_sql(&db, channel),
    );

    // unchanged: not touched at all
    let n = Notifier::builder(db.url())
        .watch(v1.clone())
        .revoke_on_model_change(false)
        .start()
        .await
        .unwrap();
    assert_eq!(schema_version(&db), version, "no DDL ran");
    assert_eq!(installed_at(&db, channel), at);
    assert_eq!(trigger_sql(&db, channel), sql);
    n.stop().await.unwrap();

    // changed extra columns, revoke off: drift error, nothing changed
    let v2 = Watch::new("users", Operation::Update).extra_columns(["email", "name"]);
    let e = Notifier::builder(db.url())
        .watch(v2.clone())
        .revoke_on_model_change(false)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::DefinitionDrift { channel: c, table, .. } if c == channel && table == "main.users"),
        "{e:?}"
    );
    assert_eq!(schema_version(&db), version);
    assert_eq!(trigger_sql(&db, channel), sql);

    // revoke on: replaced, the new column is carried
    let n = Notifier::builder(db.url())
        .watch(v2)
        .revoke_on_model_change(true)
        .start()
        .await
        .unwrap();
    assert_ne!(trigger_sql(&db, channel), sql);
    assert!(installed_at(&db, channel) >= at);
    let mut ev = Events::subscribe(&n, Subscription::new("users", Operation::Update)).await;
    db.exec("INSERT INTO users VALUES (1, 'a', 'Ann'); UPDATE users SET email = 'b';");
    let e = ev.next().await;
    assert_eq!(e.get("email"), Some(&json!("b")));
    assert_eq!(e.get("name"), Some(&json!("Ann")));
    n.stop().await.unwrap();

    // a trigger dropped by hand is reinstalled even though its catalog entry is unchanged
    db.exec(&format!("DROP TRIGGER \"{channel}\""));
    let n = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Update).extra_columns(["email", "name"]))
        .revoke_on_model_change(false)
        .start()
        .await
        .unwrap();
    assert_eq!(db.triggers(), [channel]);
    n.stop().await.unwrap();
}

#[actix_rt::test]
async fn cleanup_on_start_removes_watches_dropped_from_the_code() {
    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)");
    let n = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Insert))
        .watch(Watch::new("users", Operation::Delete))
        .watch(Watch::new("users", Operation::Update).channel_label("changes"))
        .start()
        .await
        .unwrap();
    n.stop().await.unwrap();
    assert_eq!(
        db.triggers(),
        [
            "sqlnotify_changes",
            "sqlnotify_main_users_delete",
            "sqlnotify_main_users_insert"
        ]
    );

    // without cleanup, watches no longer in the code stay installed
    let n = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Insert))
        .start()
        .await
        .unwrap();
    n.stop().await.unwrap();
    assert_eq!(db.triggers().len(), 3);

    let n = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Insert))
        .cleanup_on_start(true)
        .start()
        .await
        .unwrap();
    assert_eq!(db.triggers(), ["sqlnotify_main_users_insert"]);
    assert_eq!(db.catalog(), ["sqlnotify_main_users_insert"]);
    let mut ev = Events::subscribe(&n, Subscription::new("users", Operation::Insert)).await;
    db.exec(
        "INSERT INTO users VALUES (1, 'a'); DELETE FROM users; INSERT INTO users VALUES (2, 'b');",
    );
    assert_eq!(ids(&ev.take(2).await), [1, 2]);
    ev.assert_empty();
    n.stop().await.unwrap();
    assert_eq!(
        db.count(
            "SELECT count(*) FROM sqlnotify_journal WHERE channel != 'sqlnotify_main_users_insert'"
        ),
        0,
        "the removed triggers wrote nothing"
    );

    // cleanup() removes everything, needs no watches
    assert_eq!(Notifier::builder(db.url()).cleanup().await.unwrap(), 1);
    assert!(db.triggers().is_empty());
    assert!(db.catalog().is_empty());
}

#[actix_rt::test]
async fn cleanup_on_stop_removes_this_notifiers_triggers() {
    let db = TempDb::new();
    db.exec(
        "CREATE TABLE users (id INTEGER PRIMARY KEY); CREATE TABLE other (id INTEGER PRIMARY KEY);",
    );
    let keep = Notifier::builder(db.url())
        .watch(Watch::new("other", Operation::Insert))
        .start()
        .await
        .unwrap();
    let n = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Insert))
        .watch(Watch::new("users", Operation::Update))
        .cleanup_on_stop(true)
        .start()
        .await
        .unwrap();
    assert_eq!(db.triggers().len(), 3);
    let mut ev = Events::subscribe(&n, Subscription::new("users", Operation::Insert)).await;
    db.exec("INSERT INTO users VALUES (1)");
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    n.stop().await.unwrap();
    assert_eq!(db.triggers(), ["sqlnotify_main_other_insert"]);
    assert_eq!(db.catalog(), ["sqlnotify_main_other_insert"]);
    // the application's writes still work, and the other notifier still delivers
    let mut other = Events::subscribe(&keep, Subscription::new("other", Operation::Insert)).await;
    db.exec("INSERT INTO users VALUES (2); INSERT INTO other VALUES (3);");
    assert_eq!(other.next().await.id().as_i64(), Some(3));
    keep.stop().await.unwrap();
    assert!(matches!(n.stop().await, Err(Error::NotRunning)));
}

#[actix_rt::test]
async fn install_sql_applied_by_hand_then_started_without_managing_triggers() {
    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)");
    let builder = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]))
        .watch(
            Watch::new("users", Operation::Update)
                .extra_columns(["email"])
                .trigger_columns(["email"]),
        )
        .manage_triggers(false);

    // not installed yet: start() only verifies, and fails
    let e = builder.start().await.unwrap_err();
    assert!(matches!(e, Error::DefinitionDrift { .. }), "{e:?}");
    assert!(db.triggers().is_empty(), "verification installs nothing");

    let sql = builder.install_sql().await.unwrap();
    assert!(db.triggers().is_empty(), "install_sql() installs nothing");
    db.conn()
        .execute_batch(&sql)
        .unwrap_or_else(|e| panic!("the install script must apply: {e}\n{sql}"));
    // and again: the script is idempotent
    db.conn().execute_batch(&sql).unwrap();
    assert_eq!(
        db.triggers(),
        ["sqlnotify_main_users_insert", "sqlnotify_main_users_update"]
    );
    let version = schema_version(&db);

    let notifier = builder.start().await.unwrap();
    assert_eq!(schema_version(&db), version);
    let mut ins = Events::subscribe(&notifier, Subscription::new("users", Operation::Insert)).await;
    let mut upd = Events::subscribe(&notifier, Subscription::new("users", Operation::Update)).await;
    db.exec("INSERT INTO users VALUES (1, 'a'); UPDATE users SET email = 'a'; UPDATE users SET email = 'b';");
    let e = ins.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("email")),
        (Some(1), Some(&json!("a")))
    );
    assert_eq!(upd.next().await.get("email"), Some(&json!("b")));
    upd.assert_empty();
    notifier.stop().await.unwrap();

    // a watch that differs from what was applied is drift
    let e = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Insert))
        .manage_triggers(false)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::DefinitionDrift { channel, .. } if channel == "sqlnotify_main_users_insert"),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. A writer in another process
// ---------------------------------------------------------------------------------------------

const CHILD_ROWS: i64 = 500;

#[actix_rt::test]
async fn a_writer_in_another_process_is_seen_exactly_once_in_order() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        // The child: write, one transaction per row, and exit.
        let mut conn = Connection::open(&path).expect("child: open");
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        for id in 1..=CHILD_ROWS {
            let tx = conn.transaction().unwrap();
            tx.execute("INSERT INTO t (id, v) VALUES (?1, 'child')", [id])
                .unwrap();
            tx.commit().unwrap();
        }
        return;
    }
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert).extra_columns(["v"]))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;

    let exe = std::env::current_exe().unwrap();
    let path = db.path.clone();
    let child = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args([
                "--exact",
                "a_writer_in_another_process_is_seen_exactly_once_in_order",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, path)
            .output()
            .expect("run the child process")
    });
    let events = ev.take(CHILD_ROWS as usize).await;
    let output = child.await.unwrap();
    assert!(
        output.status.success(),
        "child failed: {:?}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "the child ran the test: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(ids(&events), (1..=CHILD_ROWS).collect::<Vec<_>>());
    assert!(events.iter().all(|e| e.get("v") == Some(&json!("child"))));
    // sentinel: nothing more (no duplicates) after the last row
    db.exec(&format!(
        "INSERT INTO t VALUES ({}, 'parent')",
        CHILD_ROWS + 1
    ));
    assert_eq!(ev.next().await.id().as_i64(), Some(CHILD_ROWS + 1));
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 7. Several listeners
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn two_notifiers_on_one_file_each_receive_every_event() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let builder = Notifier::builder(db.url()).watch(Watch::new("t", Operation::Insert));
    let (n1, n2) = (
        builder.start().await.unwrap(),
        builder.start().await.unwrap(),
    );
    let mut e1 = Events::subscribe(&n1, Subscription::new("t", Operation::Insert)).await;
    let mut e2 = Events::subscribe(&n2, Subscription::new("t", Operation::Insert)).await;
    insert_rows(&db, "t", 1..=200).await;
    for events in [&mut e1, &mut e2] {
        assert_eq!(ids(&events.take(200).await), (1..=200).collect::<Vec<_>>());
    }
    db.exec("INSERT INTO t VALUES (201)");
    for events in [&mut e1, &mut e2] {
        assert_eq!(events.next().await.id().as_i64(), Some(201));
        events.assert_empty();
    }
    n1.stop().await.unwrap();
    n2.stop().await.unwrap();
}

#[actix_rt::test]
async fn notifiers_starting_together_on_a_fresh_file_all_start() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    // Four installs race on a database without sqlnotify's tables (nor WAL mode) yet.
    let builder = Notifier::builder(db.url()).watch(Watch::new("t", Operation::Insert));
    let started = futures_util::future::join_all((0..4).map(|i| {
        let builder = builder.clone().consumer(format!("c{i}"));
        async move { builder.start().await }
    }))
    .await;
    let notifiers: Vec<Notifier> = started
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("a racing start() failed: {e:?}")))
        .collect();
    assert_eq!(db.triggers(), ["sqlnotify_main_t_insert"]);
    let mut events = Vec::new();
    for n in &notifiers {
        events.push(Events::subscribe(n, Subscription::new("t", Operation::Insert)).await);
    }
    db.exec("INSERT INTO t VALUES (1)");
    for e in &mut events {
        assert_eq!(e.next().await.id().as_i64(), Some(1));
        e.assert_empty();
    }
    for n in notifiers {
        n.stop().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Named consumers
// ---------------------------------------------------------------------------------------------

/// Starts a notifier on `t` inserts, with a `Forward` actor subscribed on the builder.
async fn start_forwarding(
    db: &TempDb,
    consumer: Option<&str>,
) -> (Notifier, mpsc::UnboundedReceiver<ChangeEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut builder = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert))
        .subscribe(
            Subscription::new("t", Operation::Insert),
            common::Forward(tx).start_actor().recipient(),
        );
    if let Some(name) = consumer {
        builder = builder.consumer(name);
    }
    (builder.start().await.unwrap(), rx)
}

async fn take_ids(rx: &mut mpsc::UnboundedReceiver<ChangeEvent>, n: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let e = tokio::time::timeout(ARRIVES_WITHIN, rx.recv())
            .await
            .expect("an event should have arrived")
            .expect("subscription closed");
        out.push(e.id().as_i64().unwrap());
    }
    out
}

fn assert_drained(rx: &mut mpsc::UnboundedReceiver<ChangeEvent>) {
    if let Ok(e) = rx.try_recv() {
        panic!("unexpected event: {:?}", e.to_json());
    }
}

#[actix_rt::test]
async fn a_named_consumer_resumes_where_it_stopped() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let (notifier, mut rx) = start_forwarding(&db, Some("billing")).await;
    insert_rows(&db, "t", 1..=3).await;
    assert_eq!(take_ids(&mut rx, 3).await, [1, 2, 3]);
    notifier.stop().await.unwrap();
    assert_drained(&mut rx);

    // written while nobody listens
    insert_rows(&db, "t", 4..=8).await;

    let (notifier, mut rx) = start_forwarding(&db, Some("billing")).await;
    assert_eq!(take_ids(&mut rx, 5).await, [4, 5, 6, 7, 8]);
    db.exec("INSERT INTO t VALUES (9)");
    assert_eq!(
        take_ids(&mut rx, 1).await,
        [9],
        "no duplicates, nothing missing"
    );
    assert_drained(&mut rx);
    notifier.stop().await.unwrap();

    // and once more, with nothing written in between: nothing replayed
    let (notifier, mut rx) = start_forwarding(&db, Some("billing")).await;
    db.exec("INSERT INTO t VALUES (10)");
    assert_eq!(take_ids(&mut rx, 1).await, [10]);
    assert_drained(&mut rx);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_running_consumer_saves_its_cursor_while_the_database_is_idle() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let (notifier, mut rx) = start_forwarding(&db, Some("idle")).await;
    insert_rows(&db, "t", 1..=3).await;
    assert_eq!(take_ids(&mut rx, 3).await, [1, 2, 3]);
    // Nothing else is written: the save must not wait for the next commit (a crash now
    // would otherwise replay everything since the previous save).
    let last = db.count("SELECT max(id) FROM sqlnotify_journal");
    let saved = || async { db.count("SELECT cursor FROM sqlnotify_consumers WHERE name = 'idle'") };
    assert!(
        wait_until(Duration::from_secs(5), || async { saved().await == last }).await,
        "saved cursor {} never reached {last} while running",
        saved().await
    );
    notifier.stop().await.unwrap();
    assert_drained(&mut rx);
}

#[actix_rt::test]
async fn a_new_consumer_and_an_unnamed_notifier_start_at_the_head() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    // history: rows 1..5 in the journal
    let (notifier, mut rx) = start_forwarding(&db, Some("old")).await;
    insert_rows(&db, "t", 1..=5).await;
    assert_eq!(take_ids(&mut rx, 5).await, [1, 2, 3, 4, 5]);
    notifier.stop().await.unwrap();
    insert_rows(&db, "t", 6..=7).await;
    assert!(db.count("SELECT count(*) FROM sqlnotify_journal") >= 7);

    // a brand-new consumer does not replay the history
    let (notifier, mut rx) = start_forwarding(&db, Some("brand-new")).await;
    db.exec("INSERT INTO t VALUES (100)");
    assert_eq!(take_ids(&mut rx, 1).await, [100]);
    assert_drained(&mut rx);
    notifier.stop().await.unwrap();

    // nor does an unnamed notifier
    let (notifier, mut rx) = start_forwarding(&db, None).await;
    db.exec("INSERT INTO t VALUES (101)");
    assert_eq!(take_ids(&mut rx, 1).await, [101]);
    assert_drained(&mut rx);
    notifier.stop().await.unwrap();

    // while the old consumer still gets everything it missed
    let (notifier, mut rx) = start_forwarding(&db, Some("old")).await;
    assert_eq!(take_ids(&mut rx, 4).await, [6, 7, 100, 101]);
    db.exec("INSERT INTO t VALUES (102)");
    assert_eq!(take_ids(&mut rx, 1).await, [102]);
    assert_drained(&mut rx);
    notifier.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 9. Retention
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn retention_trims_the_journal_but_keeps_what_an_active_consumer_has_not_read() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert))
        .retention(Duration::from_millis(300))
        .purge_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    insert_rows(&db, "t", 1..=20).await;
    assert_eq!(ids(&ev.take(20).await), (1..=20).collect::<Vec<_>>());
    let journal_len = || async { db.count("SELECT count(*) FROM sqlnotify_journal") };
    assert!(
        wait_until(ARRIVES_WITHIN, || async { journal_len().await == 0 }).await,
        "the journal was not trimmed"
    );

    // a consumer seen recently protects the rows it has not read yet
    let (cursor, last) = {
        let mut conn = db.conn();
        let tx = conn.transaction().unwrap();
        for id in 21..=30 {
            tx.execute("INSERT INTO t VALUES (?1)", [id]).unwrap();
        }
        let last: i64 = tx
            .query_row("SELECT max(id) FROM sqlnotify_journal", [], |r| r.get(0))
            .unwrap();
        let cursor = last - 4;
        tx.execute(
            "INSERT INTO sqlnotify_consumers (name, cursor, updated_at) VALUES ('reader', ?1, 1e12)",
            [cursor],
        )
        .unwrap();
        tx.commit().unwrap();
        (cursor, last)
    };
    assert_eq!(ids(&ev.take(10).await), (21..=30).collect::<Vec<_>>());
    assert!(
        wait_until(ARRIVES_WITHIN, || async { journal_len().await == 4 }).await,
        "rows up to the consumer's cursor should have been trimmed"
    );
    assert_eq!(
        db.ids("SELECT id FROM sqlnotify_journal ORDER BY id"),
        ((cursor + 1)..=last).collect::<Vec<_>>()
    );

    // a consumer last seen long ago still protects its rows (see
    // a_registered_consumer_protects_its_rows_however_long_ago_it_was_seen); once dropped on
    // purpose, it protects nothing
    db.exec("UPDATE sqlnotify_consumers SET updated_at = 0 WHERE name = 'reader'");
    notifier.drop_consumer("reader").await.unwrap();
    assert!(
        wait_until(ARRIVES_WITHIN, || async { journal_len().await == 0 }).await,
        "a dropped consumer kept rows"
    );
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 10. The application never sees SQLITE_BUSY
// ---------------------------------------------------------------------------------------------

const BUSY_ROWS: i64 = 2_000;

/// Inserts `BUSY_ROWS` rows one by one on a blocking thread with the given busy timeout while
/// the notifier delivers; asserts no write failed and every event arrived, in order.
async fn writes_never_fail(db: &TempDb, notifier: &Notifier, busy_timeout: Duration) {
    let mut ev = Events::subscribe(notifier, Subscription::new("t", Operation::Insert)).await;
    let path = db.path.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(busy_timeout).unwrap();
        let mut errors = Vec::new();
        for id in 1..=BUSY_ROWS {
            if let Err(e) = conn.execute("INSERT INTO t (id, v) VALUES (?1, 'x')", [id]) {
                errors.push(format!("row {id}: {e}"));
            }
        }
        errors
    });
    let events = ev.take(BUSY_ROWS as usize).await;
    let errors = writer.await.unwrap();
    assert!(
        errors.is_empty(),
        "{} application writes failed, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(ids(&events), (1..=BUSY_ROWS).collect::<Vec<_>>());
    db.exec(&format!(
        "INSERT INTO t VALUES ({}, 'sentinel')",
        BUSY_ROWS + 1
    ));
    assert_eq!(ev.next().await.id().as_i64(), Some(BUSY_ROWS + 1));
    ev.assert_empty();
}

#[actix_rt::test]
async fn application_writes_never_see_busy_with_an_unnamed_listener() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert).extra_columns(["v"]))
        .start()
        .await
        .unwrap();
    writes_never_fail(&db, &notifier, Duration::ZERO).await;
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn application_writes_never_see_busy_with_a_named_consumer() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert).extra_columns(["v"]))
        .consumer("saver")
        .start()
        .await
        .unwrap();
    writes_never_fail(&db, &notifier, Duration::from_millis(250)).await;
    notifier.stop().await.unwrap();
    // the consumer saved its position: everything was read
    assert_eq!(
        db.count("SELECT cursor FROM sqlnotify_consumers WHERE name = 'saver'"),
        db.count("SELECT max(id) FROM sqlnotify_journal")
    );
}

/// A real fault: the journal disappears under the watcher (renamed away by another
/// connection; the triggers follow the rename, so writes keep landing in it). The watcher's
/// reads fail, it is restarted with backoff, and once the journal is back it resumes from its
/// cursor: the rows written meanwhile arrive once each.
#[actix_rt::test]
async fn a_watcher_that_fails_is_restarted_and_resumes_from_its_cursor() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let (status_tx, mut statuses) = mpsc::unbounded_channel();
    notifier
        .subscribe_status_fn(move |e: sqlnotify::StatusEvent| {
            let _ = status_tx.send(e.status);
        })
        .await
        .unwrap();
    db.exec("INSERT INTO t VALUES (1)");
    assert_eq!(events.next().await.id().as_i64(), Some(1));

    db.exec("ALTER TABLE sqlnotify_journal RENAME TO sqlnotify_journal_away");
    db.exec("INSERT INTO t VALUES (2), (3), (4)");
    async fn next_status(rx: &mut mpsc::UnboundedReceiver<sqlnotify::Status>) -> sqlnotify::Status {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("a status should arrive")
            .unwrap()
    }
    match next_status(&mut statuses).await {
        sqlnotify::Status::Disconnected { error } => {
            assert!(error.contains("sqlnotify_journal"), "{error}")
        }
        other => panic!("expected the watcher to fail, got {other:?}"),
    }
    db.exec("ALTER TABLE sqlnotify_journal_away RENAME TO sqlnotify_journal");
    // Restarted (possibly after more failed attempts while the journal was away).
    loop {
        match next_status(&mut statuses).await {
            sqlnotify::Status::Disconnected { .. } => continue,
            sqlnotify::Status::Connected => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(
        next_status(&mut statuses).await,
        sqlnotify::Status::Resynced { replayed: 3 }
    ));
    let ids: Vec<i64> = events
        .take(3)
        .await
        .iter()
        .map(|e| e.id().as_i64().unwrap())
        .collect();
    assert_eq!(ids, [2, 3, 4]);
    db.exec("INSERT INTO t VALUES (5)");
    assert_eq!(events.next().await.id().as_i64(), Some(5));
    events.assert_empty();
    assert!(notifier.stats().await.unwrap().restarts >= 1);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn statement_capture_falls_back_to_row_triggers_with_the_same_events() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    let portable = |op| {
        Watch::new("t", op)
            .extra_columns(["v"])
            .tier(sqlnotify::Tier::Durable)
            .capture(sqlnotify::Capture::Statement)
    };
    let notifier = Notifier::builder(db.url())
        .watch(portable(Operation::Insert))
        .watch(portable(Operation::Update).trigger_columns(["v"]))
        .start()
        .await
        .unwrap();
    assert_eq!(
        db.count("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND sql LIKE '%FOR EACH ROW%'"),
        2,
        "SQLite has only row-level triggers"
    );
    let mut ins = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let mut upd = Events::subscribe(&notifier, Subscription::new("t", Operation::Update)).await;
    db.exec("INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')");
    assert_eq!(ids(&ins.take(3).await), [1, 2, 3]);
    db.exec("UPDATE t SET v = CASE WHEN id = 2 THEN 'B' ELSE v END");
    let e = upd.next().await;
    assert_eq!((e.id().as_i64(), e.get("v")), (Some(2), Some(&json!("B"))));
    db.exec("INSERT INTO t VALUES (4, 'd')");
    assert_eq!(ins.next().await.id().as_i64(), Some(4));
    upd.assert_empty();
    notifier.stop().await.unwrap();
    // the tier means nothing here: a statement watch without one is accepted too
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Delete).capture(sqlnotify::Capture::Statement))
        .start()
        .await
        .unwrap();
    notifier.stop().await.unwrap();
}

/// Asserts a lock timeout on the database file (SQLite does not say who holds its lock).
fn assert_file_lock_timeout<T>(db: &TempDb, outcome: sqlnotify::Result<T>, timeout: Duration) {
    match outcome {
        Err(Error::LockTimeout {
            object,
            holder_pids,
            waited,
        }) => {
            assert_eq!(object, format!("the SQLite database {}", db.path.display()));
            assert!(holder_pids.is_empty());
            assert!(
                waited >= timeout && waited < timeout + Duration::from_secs(5),
                "{waited:?}"
            );
        }
        Err(other) => panic!("expected a lock timeout, got {other:?}"),
        Ok(_) => panic!("expected a lock timeout, but it succeeded"),
    }
}

#[actix_rt::test]
async fn installing_and_removing_wait_for_another_writer_at_most_the_install_timeout() {
    let db = TempDb::new();
    db.exec("PRAGMA journal_mode = WAL; CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let builder = Notifier::builder(db.url()).watch(Watch::new("t", Operation::Insert));
    let short = Duration::from_secs(1);

    // another connection's write transaction, never finished: start() gives up, typed
    let blocker = db.conn();
    blocker
        .execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1)")
        .unwrap();
    let outcome = builder.clone().install_timeout(short).start().await;
    assert_file_lock_timeout(&db, outcome, short);
    assert!(db.triggers().is_empty(), "nothing installed");

    // held for longer than a connection's 5 s busy timeout, then committed: start() waits
    // it out (the install timeout bounds the wait, not the busy timeout)
    let held = Duration::from_millis(5500);
    let patient = builder.clone().install_timeout(Duration::from_secs(20));
    let started = std::time::Instant::now();
    let (notifier, ()) = tokio::join!(patient.start(), async {
        tokio::time::sleep(held).await; // how long the other writer works
        blocker.execute_batch("COMMIT").unwrap();
    });
    let notifier = notifier.expect("installed once the other writer committed");
    assert!(started.elapsed() >= held);
    assert_eq!(db.triggers(), ["sqlnotify_main_t_insert"]);
    notifier.stop().await.unwrap();

    // removing is bounded the same way
    blocker
        .execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (2)")
        .unwrap();
    let outcome = builder.clone().install_timeout(short).cleanup().await;
    assert_file_lock_timeout(&db, outcome, short);
    let notifier = {
        blocker.execute_batch("COMMIT").unwrap();
        let n = builder
            .clone()
            .cleanup_on_stop(true)
            .install_timeout(short)
            .start()
            .await
            .unwrap();
        blocker
            .execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (3)")
            .unwrap();
        n
    };
    assert_file_lock_timeout(&db, notifier.stop().await, short);
    blocker.execute_batch("COMMIT").unwrap();
    assert_eq!(
        db.triggers(),
        ["sqlnotify_main_t_insert"],
        "still installed"
    );
    assert_eq!(builder.cleanup().await.unwrap(), 1);
    assert!(db.triggers().is_empty());
}

// ---------------------------------------------------------------------------------------------
// 11. Registered consumers and retention (issue 11 §2); scenarios in common/consumers.rs
// ---------------------------------------------------------------------------------------------

impl common::consumers::ConsumerDb for TempDb {
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
            common::consumers::LONG_AGO
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
            common::consumers::LONG_AGO
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

impl common::consumers::OpenTransaction for OpenSqlite {
    async fn commit(self) {
        self.0.execute_batch("COMMIT").unwrap();
    }
}

/// A test database with the scenarios' tables `t` and `other`.
async fn consumer_db() -> TempDb {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE TABLE other (id INTEGER PRIMARY KEY)");
    db
}

consumer_scenarios!(
    a_stopped_consumer_gets_every_row_through_another_notifiers_purge,
    a_named_consumer_replays_nothing_until_its_first_subscription,
    a_registered_consumer_protects_its_rows_however_long_ago_it_was_seen,
    a_dropped_consumer_that_comes_back_gets_a_gap,
    an_expired_consumer_that_comes_back_gets_a_gap,
    stats_count_the_backlog_of_a_running_consumer,
    a_consumer_of_an_older_version_keeps_its_rows_after_the_upgrade,
    a_consumer_coming_back_during_a_purge_waits_and_sees_what_it_missed,
);
