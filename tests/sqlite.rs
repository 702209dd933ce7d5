//! End-to-end tests of the SQLite dialect on real database files: URLs, delivery for every
//! operation and naming oddity, validation through the catalog, custom notifications, drift /
//! revoke / cleanup, writers in other processes, several listeners, named consumers resuming
//! after a restart, journal retention, and application writes that never see SQLITE_BUSY.

mod common;
mod scenarios;

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use common::sqlite::{consumer_db, TempDb};
use common::{ids, Events};
use rusqlite::Connection;
use serde_json::json;
use sqlnotify::{Error, Notifier, Operation, Subscription, Watch};

/// Set in a child process re-executing this test binary: the database file it writes to.
const CHILD_ENV: &str = "SQLNOTIFY_SQLITE_CHILD";

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

/// Two applications on one file whose labels differ only in case: SQLite trigger names ignore
/// case, so the second's install dropped the first's trigger (`DROP TRIGGER IF EXISTS
/// "sqlnotify_orders"` removes `sqlnotify_Orders`) and put its own in its place — and the
/// first's next start did the same back. The second is refused, naming both; nothing of it
/// is installed, and the first keeps its trigger and its events.
#[actix_rt::test]
async fn labels_differing_only_in_case_across_notifiers_are_refused() {
    let db = TempDb::new();
    db.exec(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY); \
         CREATE TABLE payments (id INTEGER PRIMARY KEY)",
    );
    let first = Notifier::builder(db.url())
        .watch(Watch::new("orders", Operation::Insert).channel_label("Orders"))
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(
        &first,
        Subscription::new("orders", Operation::Insert).channel_label("Orders"),
    )
    .await;
    let e = Notifier::builder(db.url())
        .watch(Watch::new("payments", Operation::Insert))
        .watch(Watch::new("payments", Operation::Insert).channel_label("orders"))
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ChannelCaseConflict { channel, watch, installed, installed_watch }
            if channel == "sqlnotify_orders"
                && watch == "main.payments INSERT"
                && installed == "sqlnotify_Orders"
                && installed_watch == "main.orders INSERT"),
        "{e:?}"
    );
    let message = e.to_string();
    assert!(
        message.contains("(label \"orders\")") && message.contains("(label \"Orders\")"),
        "{message}"
    );
    assert_eq!(db.triggers(), ["sqlnotify_Orders"]);
    assert_eq!(db.catalog(), ["sqlnotify_Orders"]);
    db.exec("INSERT INTO orders (id) VALUES (1)");
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    // The same label again (the first application restarting, or a second process of it)
    // is no conflict.
    let again = Notifier::builder(db.url())
        .watch(Watch::new("orders", Operation::Insert).channel_label("Orders"))
        .start()
        .await
        .unwrap();
    again.stop().await.unwrap();
    events.assert_empty();
    first.stop().await.unwrap();
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

/// SQLite's own schemas (what the shared validation scenario cannot name): `temp` and a
/// database that is not attached are unknown; nothing is installed.
#[actix_rt::test]
async fn watches_in_temp_or_an_unattached_database_name_the_schema_and_install_nothing() {
    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)");
    let ok = Watch::new("users", Operation::Insert).extra_columns(["email"]);
    for (bad, schema) in [
        (Watch::new("other.t", Operation::Insert), "other"),
        (
            Watch::new("users", Operation::Insert).schema("temp"),
            "temp",
        ),
    ] {
        let e = Notifier::builder(db.url())
            .watch(ok.clone())
            .watch(bad)
            .start()
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::UnknownSchema { schema: s } if s == schema),
            "{e:?}"
        );
    }
    assert_eq!(db.triggers(), Vec::<String>::new());
    assert_eq!(
        db.count("SELECT count(*) FROM sqlite_master WHERE name LIKE 'sqlnotify%'"),
        0
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Custom notifications
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// 5. Revoke, drift, cleanup, externally managed DDL
// ---------------------------------------------------------------------------------------------

fn schema_version(db: &TempDb) -> i64 {
    db.count("PRAGMA schema_version")
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

// ---------------------------------------------------------------------------------------------
// 8. Named consumers
// ---------------------------------------------------------------------------------------------

/// Two processes of one group, one opening the database through a symbolic link (a deploy's
/// `releases/2/app.db`): they share one lease, so one is active and the other stands by.
#[cfg(unix)]
#[actix_rt::test]
async fn a_group_member_opening_the_database_through_a_symlink_shares_the_lease() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let release = db.dir.join("release-2");
    std::fs::create_dir_all(&release).unwrap();
    let linked = release.join("app.db");
    std::os::unix::fs::symlink(&db.path, &linked).unwrap();
    let mut members = Vec::new();
    for url in [db.url(), format!("sqlite://{}", linked.display())] {
        let member = Notifier::builder(url)
            .watch(Watch::new("t", Operation::Insert))
            .consumer("mailer")
            .start()
            .await
            .unwrap();
        members.push(member);
    }
    let roles = std::cell::RefCell::new(Vec::new());
    let settled = common::wait_until(common::ARRIVES_WITHIN, || async {
        let mut now = Vec::new();
        for member in &members {
            now.push(format!("{:?}", member.stats().await.unwrap().role));
        }
        now.sort();
        *roles.borrow_mut() = now;
        *roles.borrow() == ["Active", "Standby"]
    })
    .await;
    assert!(settled, "one active member and one standing by: {roles:?}");
    for member in members {
        member.stop().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Retention
// ---------------------------------------------------------------------------------------------

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

/// The retention purge, every 10 ms with nothing to purge (an hour's retention), takes no write
/// lock: writes with a busy timeout of 0 never fail across its ticks. (Before, every tick took
/// `BEGIN IMMEDIATE` for the consumers' expiry and a write that came then got `SQLITE_BUSY`.)
/// The purge is seen running first: it deletes a row written as two hours old.
#[actix_rt::test]
async fn application_writes_never_see_busy_while_the_purge_has_nothing_to_do() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert).extra_columns(["v"]))
        .retention(Duration::from_secs(3600))
        .purge_interval(Duration::from_millis(10))
        .start()
        .await
        .unwrap();
    db.exec(
        "INSERT INTO sqlnotify_journal (channel, payload, created_at) \
         VALUES ('elsewhere', '{}', (julianday('now') - 2440587.5) * 86400.0 - 7200)",
    );
    assert!(
        common::wait_until(Duration::from_secs(60), || async {
            db.count("SELECT count(*) FROM sqlnotify_journal") == 0
        })
        .await,
        "the purge runs"
    );
    // The write lock taken again and again for two seconds (some 200 ticks): a purge that
    // took it meanwhile fails one of these at once.
    let path = db.path.clone();
    let (attempts, busy) = tokio::task::spawn_blocking(move || {
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(Duration::ZERO).unwrap();
        let (started, mut attempts, mut busy) = (std::time::Instant::now(), 0u64, Vec::new());
        while started.elapsed() < Duration::from_secs(2) {
            attempts += 1;
            match conn.execute_batch("BEGIN IMMEDIATE") {
                Ok(()) => conn.execute_batch("COMMIT").unwrap(),
                Err(e) => busy.push(e.to_string()),
            }
        }
        (attempts, busy)
    })
    .await
    .unwrap();
    assert!(
        busy.is_empty(),
        "{} of {attempts} write transactions could not begin, first: {:?}",
        busy.len(),
        busy.first()
    );
    writes_never_fail(&db, &notifier, Duration::ZERO).await;
    notifier.stop().await.unwrap();
    assert_eq!(
        db.count("SELECT count(*) FROM sqlnotify_journal"),
        BUSY_ROWS + 1
    );
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
    let mut statuses = common::statuses(&notifier).await;
    db.exec("INSERT INTO t VALUES (1)");
    assert_eq!(events.next().await.id().as_i64(), Some(1));

    db.exec("ALTER TABLE sqlnotify_journal RENAME TO sqlnotify_journal_away");
    db.exec("INSERT INTO t VALUES (2), (3), (4)");
    let within = Duration::from_secs(30);
    match common::next_status_within(&mut statuses, within).await {
        sqlnotify::Status::Disconnected { error } => {
            assert!(error.contains("sqlnotify_journal"), "{error}")
        }
        other => panic!("expected the watcher to fail, got {other:?}"),
    }
    db.exec("ALTER TABLE sqlnotify_journal_away RENAME TO sqlnotify_journal");
    // Restarted (possibly after more failed attempts while the journal was away).
    loop {
        match common::next_status_within(&mut statuses, within).await {
            sqlnotify::Status::Disconnected { .. } => continue,
            sqlnotify::Status::Connected => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(
        common::next_status_within(&mut statuses, within).await,
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
    let object = format!("the SQLite database {}", db.path.display());
    common::assert_lock_timeout(outcome, &object, &[], timeout);
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

consumer_scenarios!();
consumer_scenarios!(an_unnamed_listener_that_falls_behind_the_retention_gets_a_gap);

// ---------------------------------------------------------------------------------------------
// 12. The shared scenarios (tests/scenarios/), on a database file of their own each
// ---------------------------------------------------------------------------------------------

journal_dialect_scenarios!(TempDb::new());

scenarios!(TempDb::new() => old_values::old_values_and_changed_columns_on_update_and_delete);

scenarios!(TempDb::new() => {
    context::context_comes_from_the_writers_session,
    context::unknown_context_names_are_refused_at_start,
});

/// Turning `old_values` on is a changed watch: drift with `revoke_on_model_change(false)`, a
/// reinstall with it on (and the reinstalled trigger carries old values). An INSERT watch has no
/// old row: the option leaves its trigger as it is.
#[actix_rt::test]
async fn switching_old_values_is_drift_and_reinstalls_on_request() {
    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)");
    let watches = |old: bool| {
        [
            Watch::new("users", Operation::Insert).old_values(old),
            Watch::new("users", Operation::Update)
                .extra_columns(["email"])
                .old_values(old),
        ]
    };
    let [ins, upd] = watches(false);
    let n = Notifier::builder(db.url())
        .watch(ins)
        .watch(upd)
        .start()
        .await
        .unwrap();
    n.stop().await.unwrap();

    let [ins, upd] = watches(true);
    let e = Notifier::builder(db.url())
        .watch(ins.clone())
        .watch(upd.clone())
        .revoke_on_model_change(false)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::DefinitionDrift { channel, .. } if channel == "sqlnotify_main_users_update"),
        "{e:?}"
    );
    let n = Notifier::builder(db.url())
        .watch(ins)
        .watch(upd)
        .revoke_on_model_change(true)
        .start()
        .await
        .unwrap();
    let mut upd = Events::subscribe(&n, Subscription::new("users", Operation::Update)).await;
    db.exec("INSERT INTO users VALUES (1, NULL); UPDATE users SET email = 'a@b.c' WHERE id = 1");
    let e = upd.next().await;
    assert_eq!(e.old("email"), Some(&json!(null)));
    assert_eq!(e.changed_columns(), Some(&["email".to_string()][..]));
    n.stop().await.unwrap();
}

/// SQLite context values live on the writing connection: `clear` and a rolled-back `set` take
/// them away again, a value that is not JSON (written to the table by hand) is null and never
/// fails the write, other connections write null, and `set` before sqlnotify is installed says
/// so.
#[actix_rt::test]
async fn sqlite_context_values_follow_the_writing_connection() {
    use sqlnotify::sqlite_context;

    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY)");
    let early = sqlite_context::set(&db.conn(), "app.user_id", 1).unwrap_err();
    assert!(
        matches!(&early, Error::Database { context, .. } if context.contains("start a notifier")),
        "{early}"
    );
    assert!(matches!(
        sqlite_context::set(&db.conn(), "", 1),
        Err(Error::InvalidOption { .. })
    ));
    let n = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Insert).context(["app.user_id", "tenant"]))
        .start()
        .await
        .unwrap();
    let mut ins = Events::subscribe(&n, Subscription::new("users", Operation::Insert)).await;
    let conn = db.conn();
    sqlite_context::set(&conn, "app.user_id", 42).unwrap();
    sqlite_context::set(&conn, "tenant", json!({"id": "t1"})).unwrap();
    assert_eq!(
        sqlite_context::values(&conn).unwrap().get("app.user_id"),
        Some(&json!(42))
    );
    conn.execute_batch("INSERT INTO users VALUES (1)").unwrap();
    let e = ins.next().await;
    assert_eq!(e.context("app.user_id"), Some(&json!(42)));
    assert_eq!(e.context("tenant"), Some(&json!({"id": "t1"})));

    // another connection: null
    db.exec("INSERT INTO users VALUES (2)");
    assert_eq!(ins.next().await.context("app.user_id"), Some(&json!(null)));

    // a set inside a transaction that rolls back is undone; clear removes one value
    conn.execute_batch("BEGIN").unwrap();
    sqlite_context::set(&conn, "app.user_id", 7).unwrap();
    conn.execute_batch("ROLLBACK").unwrap();
    sqlite_context::clear(&conn, "tenant").unwrap();
    conn.execute_batch("INSERT INTO users VALUES (3)").unwrap();
    let e = ins.next().await;
    assert_eq!(e.context("app.user_id"), Some(&json!(42)));
    assert_eq!(e.context("tenant"), Some(&json!(null)));

    // a value that is not JSON text: null, and the write goes through
    conn.execute_batch("UPDATE temp.sqlnotify_context SET value = 'not json{'")
        .unwrap();
    conn.execute_batch("INSERT INTO users VALUES (4)").unwrap();
    assert_eq!(ins.next().await.context("app.user_id"), Some(&json!(null)));
    sqlite_context::clear_all(&conn).unwrap();
    assert!(sqlite_context::values(&conn).unwrap().is_empty());
    ins.assert_empty();
    n.stop().await.unwrap();
}

/// Changing a watch's context list changes its trigger: drift with
/// `revoke_on_model_change(false)`, a reinstall with it on.
#[actix_rt::test]
async fn changing_the_context_list_is_drift() {
    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY)");
    let watch = |names: &[&str]| Watch::new("users", Operation::Insert).context(names.to_vec());
    let n = Notifier::builder(db.url())
        .watch(watch(&["a"]))
        .start()
        .await
        .unwrap();
    n.stop().await.unwrap();
    let e = Notifier::builder(db.url())
        .watch(watch(&["a", "b"]))
        .revoke_on_model_change(false)
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DefinitionDrift { .. }), "{e:?}");
    let n = Notifier::builder(db.url())
        .watch(watch(&["a", "b"]))
        .start()
        .await
        .unwrap();
    let mut ins = Events::subscribe(&n, Subscription::new("users", Operation::Insert)).await;
    let conn = db.conn();
    sqlnotify::sqlite_context::set(&conn, "b", "x").unwrap();
    conn.execute_batch("INSERT INTO users VALUES (1)").unwrap();
    let e = ins.next().await;
    assert_eq!(e.context("a"), Some(&json!(null)));
    assert_eq!(e.context("b"), Some(&json!("x")));
    n.stop().await.unwrap();
}

/// Queue sizes past `MAX_BUFFER` are taken as `MAX_BUFFER`: a channel subscription, a
/// snapshot feed's buffer and chunk given `usize::MAX` allocate nothing absurd and deliver.
#[actix_rt::test]
async fn sizes_past_max_buffer_are_taken_as_max_buffer() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY); INSERT INTO t (id) VALUES (1)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let (_, rx) = notifier
        .subscribe_channel(Subscription::new("t", Operation::Insert).buffer(usize::MAX))
        .await
        .unwrap();
    assert_eq!(rx.capacity(), Some(sqlnotify::MAX_BUFFER));
    let mut feed = notifier
        .subscribe_snapshot(
            sqlnotify::Snapshot::new("t")
                .chunk_rows(usize::MAX)
                .buffer(usize::MAX),
        )
        .await
        .unwrap();
    let row = tokio::time::timeout(Duration::from_secs(30), feed.next())
        .await
        .expect("a snapshot row in time")
        .expect("the feed is open")
        .expect("the snapshot reads");
    assert_eq!(row.id().as_i64(), Some(1));
    db.exec("INSERT INTO t (id) VALUES (2)");
    let live = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the live event");
    assert_eq!(live.id().as_i64(), Some(2));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_stored_attempt_count_at_its_limit_ends_in_a_dead_letter() {
    let db = TempDb::new();
    scenarios::handling::a_stored_attempt_count_at_its_limit_ends_in_a_dead_letter(
        &db,
        "sqlnotify_dead_letters",
    )
    .await;
}

/// A label is shown in the install script's comment line above its watch: a line break in
/// it must not end the comment and make the rest a statement of the script.
#[actix_rt::test]
async fn a_label_with_a_line_break_stays_inside_the_install_scripts_comment() {
    let db = TempDb::new();
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY); CREATE TABLE victim (id INTEGER)");
    let sql = Notifier::builder(db.url())
        .watch(Watch::new("users", Operation::Insert).channel_label("x\nDROP TABLE victim; --"))
        .install_sql()
        .await
        .unwrap();
    assert!(
        sql.contains("\n-- sqlnotify_x?DROP TABLE victim; --\n"),
        "the comment line shows the break as ?: {sql}"
    );
    db.conn()
        .execute_batch(&sql)
        .unwrap_or_else(|e| panic!("the install script must apply: {e}\n{sql}"));
    assert_eq!(
        db.count("SELECT count(*) FROM victim"),
        0,
        "victim is still there"
    );
}

/// A named consumer catching up on a backlog that its subscriber works through slowly saves
/// its position as it goes — and so stays alive for the purge — not once the backlog is done:
/// a read hands over one batch (1,000 rows) at most, and the shell saves between reads. (A
/// read used to go on until the journal was exhausted, waiting for room in the pipeline batch
/// after batch: no save, no heartbeat and no look at `stop()` for the whole catch-up.)
#[actix_rt::test]
async fn a_consumer_catching_up_saves_its_position_as_it_goes() {
    let db = TempDb::new();
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let url = db.url();
    let start = || async {
        Notifier::builder(&url)
            .watch(Watch::new("t", Operation::Insert))
            .consumer("slow")
            .start()
            .await
    };
    start().await.unwrap().stop().await.unwrap();
    let cursor = || db.count("SELECT cursor FROM sqlnotify_consumers WHERE name = 'slow'");
    let before = cursor();
    // A backlog of 200 transactions of 100 rows while the consumer is stopped.
    let mut conn = db.conn();
    for i in 0..200i64 {
        let tx = conn.transaction().unwrap();
        for id in i * 100..(i + 1) * 100 {
            tx.execute("INSERT INTO t VALUES (?1)", [id]).unwrap();
        }
        tx.commit().unwrap();
    }
    let notifier = start().await.unwrap();
    let (_, deliveries) = notifier
        .subscribe_acked(Subscription::new("t", Operation::Insert))
        .await
        .unwrap();
    let (handled, worker) = common::slow_acker(deliveries);
    let moved = common::wait_until(Duration::from_secs(120), || async { cursor() > before }).await;
    let done = handled.load(std::sync::atomic::Ordering::Relaxed);
    assert!(moved, "the position never moved");
    assert!(
        done < 10_000,
        "the position moved only once {done} of 20,000 events were handled"
    );
    notifier.stop().await.unwrap();
    worker.abort();
}
