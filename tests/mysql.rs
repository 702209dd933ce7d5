//! End-to-end tests of the MySQL / MariaDB dialect against a real server: URLs, delivery for
//! every operation and naming oddity, value types, validation through `information_schema`,
//! custom notifications, drift / revoke / cleanup / install_sql, late-committing transactions
//! (also ones running at a first start, and the bounded gap that gives up on rolled-back
//! ids), several listeners, named consumers resuming after a restart, journal retention, a
//! journal row the driver cannot convert, and a listener restarted after its connection was
//! killed.
//!
//! Each test creates a database of its own (`sqlnotify_test_…`) on the server named by
//! `SQLNOTIFY_TEST_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`) and drops it at the
//! end. scripts/test starts a throwaway MariaDB when none is reachable.

mod common;
mod scenarios;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::consumers::ConsumerDb;
use common::mysql::{
    connect, consumer_db, insert_rows, installed, server_url, with_db, with_param, TestDb,
};
use common::{assert_lock_timeout, ids, wait_until, wait_until_every, Events, ARRIVES_WITHIN};
use mysql_async::prelude::*;
use mysql_async::{Conn, Opts};
use serde_json::json;
use sqlnotify::{Error, Notifier, Operation, Status, Subscription, Watch};

// ---------------------------------------------------------------------------------------------
// 1. URLs
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn mysql_and_mariadb_urls_select_the_mysql_dialect() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    for url in [db.url.clone(), db.url.replacen("mysql://", "mariadb://", 1)] {
        let builder = Notifier::builder(&url).watch(Watch::new("t", Operation::Insert));
        assert_eq!(builder.dialect_name().unwrap(), "mysql");
        let notifier = builder.start().await.unwrap();
        assert_eq!(notifier.dialect_name(), "mysql");
        let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
        db.exec("DELETE FROM t; INSERT INTO t VALUES (1)").await;
        let e = ev.next().await;
        assert_eq!(e.channel(), db.channel("t", "insert"));
        assert_eq!((e.schema(), e.table()), (db.name.as_str(), "t"));
        assert_eq!(e.id().as_i64(), Some(1));
        assert!(e.sequence().is_some());
        notifier.stop().await.unwrap();
    }

    // no database in the URL; a bad parameter; the password never shows in the error
    for url in [
        "mysql://root:s3cr3t@127.0.0.1:3306".to_string(),
        "mysql://root:s3cr3t@127.0.0.1:3306/".to_string(),
        with_param(&db.url, "sqlnotify_gap_timeout_ms=soon"),
    ] {
        let builder = Notifier::builder(&url).watch(Watch::new("t", Operation::Insert));
        let e = builder.dialect_name().unwrap_err();
        assert!(matches!(e, Error::InvalidUrl { .. }), "{url}: {e:?}");
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }

    // a server that does not answer: a database error, nothing echoing the password
    let e = Notifier::builder("mysql://root:s3cr3t@127.0.0.1:1/app?prefer_socket=false")
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Database { .. }), "{e:?}");
    assert!(!e.to_string().contains("s3cr3t"), "{e}");

    // a database that does not exist
    let e = Notifier::builder(with_db(&db.url, "sqlnotify_no_such_db"))
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Database { .. }), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. Delivery
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn backticks_keywords_and_quotes_in_names_and_labels_work() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE `we``ird` (`Id` INT PRIMARY KEY, `select` VARCHAR(50), `q\"uo'te` VARCHAR(50))",
    )
    .await;
    let table = "we`ird";
    let label = "o'brien\\x";
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new(table, Operation::Insert).extra_columns(["select", "q\"uo'te"]))
        // a second watch on the same table and operation: a second trigger
        .watch(
            Watch::new(table, Operation::Insert)
                .channel_label(label)
                .extra_columns(["select"]),
        )
        .start()
        .await
        .unwrap();
    let plain_channel = db.channel(table, "insert");
    let mut expected = vec![plain_channel.clone(), format!("sqlnotify_{label}")];
    expected.sort();
    assert_eq!(db.triggers().await, expected);
    let mut plain = Events::subscribe(&notifier, Subscription::new(table, Operation::Insert)).await;
    let mut labelled = Events::subscribe(
        &notifier,
        Subscription::new(table, Operation::Insert).channel_label(label),
    )
    .await;
    let mut conn = db.conn().await;
    conn.exec_drop(
        "INSERT INTO `we``ird` VALUES (?, ?, ?)",
        (1, "drop table x; --", "q\"uo'te\\ `tick`"),
    )
    .await
    .unwrap();
    let e = plain.next().await;
    assert_eq!(e.channel(), plain_channel);
    assert_eq!(e.table(), table);
    assert_eq!(e.get("Id"), Some(&json!(1)));
    assert_eq!(e.get("select"), Some(&json!("drop table x; --")));
    assert_eq!(e.get("q\"uo'te"), Some(&json!("q\"uo'te\\ `tick`")));
    let e = labelled.next().await;
    assert_eq!(e.channel(), format!("sqlnotify_{label}"));
    assert_eq!(e.channel_info().label(), Some(label));
    assert_eq!(e.id().as_i64(), Some(1));
    assert_eq!(e.get("select"), Some(&json!("drop table x; --")));
    plain.assert_empty();
    labelled.assert_empty();

    // under NO_BACKSLASH_ESCAPES the application's writes (and the triggers) still work
    conn.query_drop("SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@sql_mode, ''), 'NO_BACKSLASH_ESCAPES', 'ANSI_QUOTES')")
        .await
        .unwrap();
    conn.query_drop("INSERT INTO `we``ird` VALUES (2, 'a\\b', 'c')")
        .await
        .unwrap();
    let e = plain.next().await;
    assert_eq!(e.get("select"), Some(&json!("a\\b")));
    assert_eq!(labelled.next().await.id().as_i64(), Some(2));
    let _ = conn.disconnect().await;
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn values_of_every_kind_arrive_as_json() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE v (id BINARY(4) PRIMARY KEY, data BLOB, flags BIT(8), doc JSON, \
         price DECIMAL(10,2), at DATETIME, big BIGINT UNSIGNED, shape POINT, kind ENUM('a','b'), \
         note TEXT CHARACTER SET latin1, ratio FLOAT, span TIME, stamp TIMESTAMP(3) NULL)",
    )
    .await;
    let columns = [
        "data", "flags", "doc", "price", "at", "big", "shape", "kind", "note", "ratio", "span",
        "stamp",
    ];
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("v", Operation::Insert).extra_columns(columns))
        .watch(Watch::new("v", Operation::Delete).extra_columns(["data"]))
        .start()
        .await
        .unwrap();
    let mut ins = Events::subscribe(&notifier, Subscription::new("v", Operation::Insert)).await;
    let mut del = Events::subscribe(&notifier, Subscription::new("v", Operation::Delete)).await;
    db.exec(
        "INSERT INTO v VALUES (X'DEADBEEF', X'00FF10', b'101', '{\"a\": [1, 2]}', 12.50, \
         '2024-01-02 03:04:05', 18446744073709551615, POINT(1, 2), 'b', 'caf\u{e9}', 1.1, \
         '-01:02:03', '2024-01-02 03:04:05.120')",
    )
    .await;
    let e = ins.next().await;
    assert_eq!(
        e.id().as_str(),
        Some("DEADBEEF"),
        "binary keys arrive as hex"
    );
    assert_eq!(e.get("data"), Some(&json!("00FF10")));
    assert_eq!(e.get("flags"), Some(&json!(5)));
    assert_eq!(e.get("doc"), Some(&json!({"a": [1, 2]})));
    assert_eq!(e.get("price").and_then(|v| v.as_f64()), Some(12.5));
    // The same text on MySQL and MariaDB, as the server shows the value: MySQL's JSON_OBJECT
    // alone would send "2024-01-02 03:04:05.000000" and 1.100000023841858.
    assert_eq!(e.get("at"), Some(&json!("2024-01-02 03:04:05")));
    assert_eq!(e.get("span"), Some(&json!("-01:02:03")));
    assert_eq!(e.get("stamp"), Some(&json!("2024-01-02 03:04:05.120")));
    assert_eq!(e.get("ratio"), Some(&json!(1.1)));
    assert_eq!(e.get("big"), Some(&json!(18446744073709551615u64)));
    assert_eq!(e.get("shape"), Some(&json!("POINT(1 2)")));
    assert_eq!(e.get("kind"), Some(&json!("b")));
    assert_eq!(e.get("note"), Some(&json!("caf\u{e9}")));
    db.exec("DELETE FROM v").await;
    let e = del.next().await;
    assert_eq!(
        (e.id().as_str(), e.get("data")),
        (Some("DEADBEEF"), Some(&json!("00FF10")))
    );
    assert_eq!(notifier.stats().await.unwrap().malformed, 0);
    ins.assert_empty();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_row_too_large_for_a_payload_commits_and_arrives_key_only_even_in_strict_mode() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE big (id INT PRIMARY KEY, a LONGTEXT, b LONGTEXT)")
        .await;
    let channel = db.channel("big", "insert");
    let watch = Watch::new("big", Operation::Insert).extra_columns(["a", "b"]);
    let notifier = Notifier::builder(&db.url)
        .watch(watch.clone())
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("big", Operation::Insert)).await;

    // Two values of 5/8 of max_allowed_packet each (built on the server): the row is fine, its
    // JSON object is over the limit. In a strict session — both servers' default — the
    // insert must still commit.
    let mut conn = db.conn().await;
    conn.query_drop(
        "SET SESSION sql_mode = 'STRICT_TRANS_TABLES,STRICT_ALL_TABLES'; \
         SET @n = @@max_allowed_packet * 5 DIV 8; \
         INSERT INTO big VALUES (1, REPEAT('x', @n), REPEAT('y', @n)); \
         INSERT INTO big VALUES (2, 'small', 'row');",
    )
    .await
    .expect("a row too large for a payload never fails the user's write");
    let _ = conn.disconnect().await;
    assert_eq!(db.count("SELECT COUNT(*) FROM big").await, 2);
    let e = ev.next().await;
    assert_eq!(e.id().as_i64(), Some(1));
    assert!(e.is_truncated(), "{:?}", e.to_json());
    assert_eq!(e.get("a"), None);
    let e = ev.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("b")),
        (Some(2), Some(&json!("row")))
    );
    assert!(!e.is_truncated());
    notifier.stop().await.unwrap();

    // A trigger with the same text but created under a strict sql_mode (by hand, by an older
    // version) would fail such writes: it counts as changed.
    async fn mode(db: &TestDb, channel: &str) -> Vec<String> {
        db.strings(&format!(
            "SELECT SQL_MODE FROM information_schema.TRIGGERS \
             WHERE TRIGGER_SCHEMA = DATABASE() AND TRIGGER_NAME = '{channel}'"
        ))
        .await
    }
    assert_eq!(mode(&db, &channel).await, [""]);
    let definition = db
        .strings(&format!(
            "SELECT definition FROM sqlnotify_catalog WHERE channel = '{channel}'"
        ))
        .await
        .remove(0);
    db.exec(&format!(
        "SET SESSION sql_mode = 'STRICT_TRANS_TABLES'; DROP TRIGGER `{channel}`; {definition}"
    ))
    .await;
    assert_eq!(mode(&db, &channel).await, ["STRICT_TRANS_TABLES"]);
    let e = Notifier::builder(&db.url)
        .watch(watch.clone())
        .revoke_on_model_change(false)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::DefinitionDrift { channel: c, .. } if c == &channel),
        "{e:?}"
    );
    let notifier = Notifier::builder(&db.url)
        .watch(watch)
        .start()
        .await
        .unwrap();
    assert_eq!(
        mode(&db, &channel).await,
        [""],
        "replaced under the non-strict mode"
    );
    notifier.stop().await.unwrap();
}

/// Rows whose payloads together exceed what a read holds at once (70 rows of 1 MiB against
/// 64 MiB, read in one page): each arrives once, in order, with its own payload — received in
/// shares of at most 64 MiB, each handed over before the next was fetched (a read once held
/// the whole page: one share of 70 MiB).
#[actix_rt::test]
async fn a_page_larger_than_a_read_holds_arrives_in_shares() {
    const ROWS: i64 = 70;
    const SIZE: usize = common::mysql::LARGE_SIZE;
    let db = TestDb::new().await;
    common::mysql::create_large_table(&db, "big").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("big", Operation::Insert).extra_columns(["big"]))
        .start()
        .await
        .unwrap();
    let mut events =
        Events::subscribe(&notifier, Subscription::new("big", Operation::Insert)).await;
    common::mysql::insert_large_rows(&db, "big", ROWS).await;
    db.exec("INSERT INTO big (id) VALUES (71)").await;

    let got = events.take(ROWS as usize + 1).await;
    let ids: Vec<i64> = got.iter().map(|e| e.id().as_i64().unwrap()).collect();
    assert_eq!(
        ids,
        (1..=ROWS + 1).collect::<Vec<_>>(),
        "each row once, in order"
    );
    for (e, id) in got.iter().take(ROWS as usize).zip(1..) {
        let big = e.get("big").and_then(|v| v.as_str()).expect("the value");
        assert!(
            big.len() == SIZE && big.chars().all(|c| c == common::mysql::large_letter(id)),
            "row {id}'s own payload"
        );
        assert_eq!(e.last_in_transaction(), None);
    }
    events.assert_empty();
    let shares = common::mysql::shares(&got[..ROWS as usize]);
    assert!(shares.len() >= 2, "handed over in shares: {shares:?}");
    // Each payload is its `big` value and a few bytes more.
    assert!(
        shares
            .iter()
            .all(|&(_, bytes)| bytes < common::mysql::READ_BYTES),
        "no share held more than the budget: {shares:?}"
    );
    notifier.stop().await.unwrap();
}

/// A binary value whose hex text would exceed `max_allowed_packet`: `HEX` returns NULL (with a
/// warning) while `JSON_OBJECT` of the rest fits, so the payload once arrived whole-looking,
/// with `"data": null` and not marked truncated. It arrives with its key only, marked
/// truncated, and the write commits — also when it is the old row's value that is too large.
#[actix_rt::test]
async fn a_value_whose_hex_text_is_too_large_arrives_key_only_not_as_null() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE bin (id INT PRIMARY KEY, data LONGBLOB, note TEXT)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("bin", Operation::Insert).extra_columns(["data", "note"]))
        .watch(
            Watch::new("bin", Operation::Update)
                .extra_columns(["data"])
                .old_values(true),
        )
        .start()
        .await
        .unwrap();
    let mut ins = Events::subscribe(&notifier, Subscription::new("bin", Operation::Insert)).await;
    let mut upd = Events::subscribe(&notifier, Subscription::new("bin", Operation::Update)).await;

    // 5/8 of max_allowed_packet (built on the server): the row fits, its hex text does not.
    let mut conn = db.conn().await;
    conn.query_drop(
        "SET SESSION sql_mode = 'STRICT_TRANS_TABLES'; \
         SET @n = @@max_allowed_packet * 5 DIV 8; \
         INSERT INTO bin VALUES (1, REPEAT(X'AB', @n), 'big'); \
         INSERT INTO bin VALUES (2, X'00FF', 'small'), (3, NULL, 'none');",
    )
    .await
    .expect("a value too large for a payload never fails the user's write");
    assert_eq!(
        db.count("SELECT SUM(LENGTH(data)) FROM bin").await,
        db.count("SELECT @@max_allowed_packet * 5 DIV 8 + 2").await,
        "the large value was written"
    );
    let e = ins.next().await;
    assert_eq!(e.id().as_i64(), Some(1));
    assert!(e.is_truncated(), "{:?}", e.to_json());
    assert_eq!((e.get("data"), e.get("note")), (None, None), "key only");
    // values that convert, and NULL itself, are sent as they are
    let e = ins.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("data"), e.is_truncated()),
        (Some(2), Some(&json!("00FF")), false)
    );
    let e = ins.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("data"), e.is_truncated()),
        (Some(3), Some(&json!(null)), false)
    );

    // The old row's value too large: key only as well, not `"old": {"data": null}`.
    conn.query_drop("UPDATE bin SET data = X'01' WHERE id = 1")
        .await
        .expect("the update commits");
    let e = upd.next().await;
    assert_eq!(e.id().as_i64(), Some(1));
    assert!(e.is_truncated(), "{:?}", e.to_json());
    assert_eq!((e.get("data"), e.old("data")), (None, None), "key only");
    conn.query_drop("UPDATE bin SET data = X'02' WHERE id = 1")
        .await
        .unwrap();
    let e = upd.next().await;
    assert_eq!(
        (e.get("data"), e.old("data"), e.is_truncated()),
        (Some(&json!("02")), Some(&json!("01")), false)
    );
    let _ = conn.disconnect().await;
    ins.assert_empty();
    upd.assert_empty();
    notifier.stop().await.unwrap();
}

/// Longer than InnoDB keeps `information_schema.INNODB_TRX` after a read (100 ms).
const INNODB_TRX_REFRESH: Duration = Duration::from_millis(250);

/// A watch with `trigger_columns` never makes a write fail by deadlock. Its trigger once
/// inserted through `INSERT … SELECT … FROM DUAL WHERE <changed>`, a bulk insert to InnoDB:
/// under `innodb_autoinc_lock_mode = 1` (MariaDB's default) the statement that fired it held
/// the journal's table-level AUTO-INC lock to its end. T1, a multi-row UPDATE that fired it
/// on its first row, then waited for T2's row lock; T2 then wrote another watched table,
/// whose trigger needed that AUTO-INC lock: a deadlock, and T1 failed with error 1213.
#[actix_rt::test]
async fn a_statement_that_fired_a_trigger_columns_watch_and_waits_on_a_row_lock_commits() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE w (id INT PRIMARY KEY, v INT NOT NULL); \
         INSERT INTO w VALUES (1, 0), (2, 0), (3, 0); \
         CREATE TABLE o (id INT PRIMARY KEY)",
    )
    .await;
    let builder = Notifier::builder(&db.url)
        .watch(
            Watch::new("w", Operation::Update)
                .extra_columns(["v"])
                .trigger_columns(["v"]),
        )
        .watch(Watch::new("o", Operation::Insert));
    let notifier = builder.start().await.unwrap();
    let channel = db.channel("w", "update");
    let (_, _, statement) = installed(&db, &channel).await;
    assert!(statement.starts_with("BEGIN IF "), "{statement}");
    let mut updates = Events::subscribe(&notifier, Subscription::new("w", Operation::Update)).await;
    let mut inserts = Events::subscribe(&notifier, Subscription::new("o", Operation::Insert)).await;

    // T2 holds row 2.
    let mut t2 = db.conn().await;
    t2.query_drop("START TRANSACTION; UPDATE w SET v = v + 100 WHERE id = 2")
        .await
        .unwrap();
    // T1: row 1 fires the trigger, row 2 waits for T2.
    let mut t1 = db.conn().await;
    let t1_id = t1.id();
    let t1_update = actix_rt::spawn(async move {
        let done = t1
            .query_drop("UPDATE w SET v = v + 1 WHERE id BETWEEN 1 AND 3")
            .await;
        let _ = t1.disconnect().await;
        done
    });
    assert!(
        wait_until_every(ARRIVES_WITHIN, INNODB_TRX_REFRESH, || async {
            db.count(&format!(
                "SELECT COUNT(*) FROM information_schema.INNODB_TRX \
                 WHERE trx_mysql_thread_id = {t1_id} AND trx_state = 'LOCK WAIT'"
            ))
            .await
                == 1
        })
        .await,
        "T1 waits for T2's row lock"
    );
    // T2 writes another watched table: its trigger takes a journal id too.
    t2.query_drop("INSERT INTO o VALUES (1)")
        .await
        .expect("T2's insert into another watched table");
    t2.query_drop("COMMIT").await.unwrap();
    let _ = t2.disconnect().await;
    tokio::time::timeout(ARRIVES_WITHIN, t1_update)
        .await
        .expect("T1 finishes once T2 has committed")
        .unwrap()
        .expect("T1's UPDATE commits: no deadlock");
    assert_eq!(db.count("SELECT SUM(v) FROM w").await, 103);

    // T2's update of row 2, then T1's three rows; T2's insert.
    let events = updates.take(4).await;
    assert_eq!(ids(&events), [2, 1, 2, 3]);
    assert_eq!(events[2].get("v"), Some(&json!(101)));
    assert_eq!(inserts.next().await.id().as_i64(), Some(1));
    // an UPDATE that leaves the trigger column as it is fires nothing
    db.exec("UPDATE w SET v = v WHERE id = 1; INSERT INTO o VALUES (2)")
        .await;
    assert_eq!(inserts.next().await.id().as_i64(), Some(2));
    updates.assert_empty();
    notifier.stop().await.unwrap();

    // The catalog recognises the installed block: a restart leaves it alone.
    let before = installed(&db, &channel).await;
    builder.start().await.unwrap().stop().await.unwrap();
    assert_eq!(installed(&db, &channel).await, before, "not reinstalled");
}

// ---------------------------------------------------------------------------------------------
// 3. Validation
// ---------------------------------------------------------------------------------------------

/// MySQL's own ways to get a watch wrong (the rest is the shared validation scenario): table
/// names are matched exactly although `Users` and `users` may both exist, and trigger
/// columns are refused on inserts; nothing is installed.
#[actix_rt::test]
async fn names_differing_in_case_and_trigger_columns_on_inserts_are_refused() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE users (id INT PRIMARY KEY, email VARCHAR(100)); \
         CREATE TABLE Users (id INT PRIMARY KEY, other INT);",
    )
    .await;
    let ok = Watch::new("users", Operation::Insert).extra_columns(["email"]);
    let start = |bad: Watch| {
        let builder = Notifier::builder(&db.url).watch(ok.clone()).watch(bad);
        async move { builder.start().await.unwrap_err() }
    };
    let e = start(Watch::new("USERS", Operation::Insert)).await;
    assert!(
        matches!(&e, Error::UnknownTable { table, .. } if table == "USERS"),
        "table names are matched exactly: {e:?}"
    );
    let e = start(Watch::new("users", Operation::Update).extra_columns(["other"])).await;
    assert!(
        matches!(&e, Error::UnknownColumn { column, .. } if column == "other"),
        "columns of `Users` are not columns of `users`: {e:?}"
    );
    let e = start(Watch::new("users", Operation::Insert).trigger_columns(["email"])).await;
    assert!(
        matches!(&e, Error::TriggerColumnsNotAllowed { .. }),
        "{e:?}"
    );
    assert!(db.triggers().await.is_empty());
    assert_eq!(common::backend::Backend::sqlnotify_objects(&db).await, 0);
}

#[actix_rt::test]
async fn tables_of_another_database_on_the_server_can_be_watched() {
    let db = TestDb::new().await;
    let other = TestDb::new().await;
    other
        .exec("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(10))")
        .await;
    let table = format!("{}.t", other.name);
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new(&table, Operation::Insert).extra_columns(["v"]))
        .start()
        .await
        .unwrap();
    assert_eq!(other.triggers().await, [other.channel("t", "insert")]);
    let mut ev = Events::subscribe(&notifier, Subscription::new(&table, Operation::Insert)).await;
    other.exec("INSERT INTO t VALUES (1, 'x')").await;
    let e = ev.next().await;
    assert_eq!((e.schema(), e.table()), (other.name.as_str(), "t"));
    assert_eq!(e.get("v"), Some(&json!("x")));
    notifier.stop().await.unwrap();
    // the trigger writes to the notifier's database; cleanup finds it there
    assert_eq!(Notifier::builder(&db.url).cleanup().await.unwrap(), 1);
    assert!(other.triggers().await.is_empty());
    other.exec("INSERT INTO t VALUES (2, 'y')").await;
}

// ---------------------------------------------------------------------------------------------
// 4. Custom notifications
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// 5. Revoke, drift, cleanup, externally managed DDL
// ---------------------------------------------------------------------------------------------

/// `script` as one multi-statement text for the driver: its `DELIMITER` lines (a command of
/// the command-line client, not SQL) removed, and each statement ended by the delimiter they
/// set ended by `;` instead — what a client or migration tool that reads them sends.
fn delimited_statements(script: &str) -> String {
    let mut delimiter = ";".to_string();
    let mut out = String::new();
    for line in script.lines() {
        if let Some(set) = line.strip_prefix("DELIMITER ") {
            delimiter = set.trim().to_string();
            continue;
        }
        match line.strip_suffix(delimiter.as_str()) {
            Some(statement) if delimiter != ";" => {
                out.push_str(statement);
                out.push(';');
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Applies `script` with the `mysql` command-line client, when there is one; returns whether
/// it ran. Shows that the client applies it as it is, `DELIMITER` lines included.
fn apply_with_cli(db: &TestDb, script: &str) -> bool {
    use std::io::Write;
    let Ok(opts) = Opts::from_url(&db.url) else {
        return false;
    };
    let mut cmd = std::process::Command::new("mysql");
    cmd.args(["--protocol=TCP", "-h", opts.ip_or_hostname()])
        .args(["-P", &opts.tcp_port().to_string()])
        .args(["-u", opts.user().unwrap_or("root")]);
    if let Some(pass) = opts.pass() {
        cmd.arg(format!("-p{pass}"));
    }
    cmd.arg(&db.name)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the mysql client could not apply the script: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

#[actix_rt::test]
async fn install_sql_applied_by_hand_then_started_without_managing_triggers() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE `us'ers` (id INT PRIMARY KEY, email TEXT)")
        .await;
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("us'ers", Operation::Insert).extra_columns(["email"]))
        .watch(
            Watch::new("us'ers", Operation::Update)
                .extra_columns(["email"])
                .trigger_columns(["email"])
                .channel_label("a\\b"),
        )
        .manage_triggers(false);

    // not installed yet: start() only verifies, and fails
    let e = builder.start().await.unwrap_err();
    assert!(matches!(e, Error::DefinitionDrift { .. }), "{e:?}");
    assert!(
        db.triggers().await.is_empty(),
        "verification installs nothing"
    );

    let sql = builder.install_sql().await.unwrap();
    // Only the trigger_columns watch's trigger is a BEGIN … END block, between DELIMITER lines.
    assert_eq!(sql.matches("\nDELIMITER $$\n").count(), 1, "{sql}");
    assert_eq!(sql.matches("\nDELIMITER ;\n").count(), 1, "{sql}");
    assert!(
        db.triggers().await.is_empty(),
        "install_sql() installs nothing"
    );
    // As a migration tool that reads DELIMITER lines applies it, statement by statement.
    db.exec(&delimited_statements(&sql)).await;
    // and again: the script is idempotent (through the command-line client too, if any)
    if !apply_with_cli(&db, &sql) {
        db.exec(&delimited_statements(&sql)).await;
    }
    let insert = db.channel("us'ers", "insert");
    assert_eq!(
        db.triggers().await,
        ["sqlnotify_a\\b".to_string(), insert.clone()]
    );
    let before = installed(&db, &insert).await;

    let notifier = builder.start().await.unwrap();
    assert_eq!(
        installed(&db, &insert).await,
        before,
        "verification changed nothing"
    );
    let mut ins =
        Events::subscribe(&notifier, Subscription::new("us'ers", Operation::Insert)).await;
    let mut upd = Events::subscribe(
        &notifier,
        Subscription::new("us'ers", Operation::Update).channel_label("a\\b"),
    )
    .await;
    db.exec(
        "INSERT INTO `us'ers` VALUES (1, 'a'); UPDATE `us'ers` SET email = 'a'; \
         UPDATE `us'ers` SET email = 'b';",
    )
    .await;
    let e = ins.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("email")),
        (Some(1), Some(&json!("a")))
    );
    assert_eq!(upd.next().await.get("email"), Some(&json!("b")));
    upd.assert_empty();
    notifier.stop().await.unwrap();

    // a watch that differs from what was applied is drift
    let e = Notifier::builder(&db.url)
        .watch(Watch::new("us'ers", Operation::Insert))
        .manage_triggers(false)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::DefinitionDrift { channel, .. } if channel == &insert),
        "{e:?}"
    );
}

/// `url` with other credentials.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let after_scheme = url.find("://").expect("a URL") + 3;
    let host = match url[after_scheme..].find('@') {
        Some(at) => after_scheme + at + 1,
        None => after_scheme,
    };
    format!("{}{user}:{password}@{}", &url[..after_scheme], &url[host..])
}

/// A user of the test server with exactly the privileges the crate documents, on one test
/// database (at any host, and at localhost: the driver may switch to the unix socket).
/// Dropped when the test ends.
struct TestUser {
    name: String,
    url: String,
    server: String,
}

impl TestUser {
    async fn new(db: &TestDb) -> TestUser {
        let name = format!("sqlnotify_u{}", &db.name["sqlnotify_test_".len()..]);
        let name: String = name.chars().take(32).collect();
        let password = "Pw-1-sqlnotify";
        let mut admin = connect(&db.server).await;
        for host in ["%", "localhost"] {
            admin
                .query_drop(format!(
                    "CREATE USER '{name}'@'{host}' IDENTIFIED BY '{password}'; \
                     GRANT TRIGGER, CREATE, SELECT, INSERT, UPDATE, DELETE \
                     ON `{db}`.* TO '{name}'@'{host}'",
                    db = db.name
                ))
                .await
                .expect("the test server's user may create users");
        }
        let _ = admin.disconnect().await;
        TestUser {
            url: with_user(&db.url, &name, password),
            name,
            server: db.server.clone(),
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let (name, server) = (self.name.clone(), self.server.clone());
        common::on_a_runtime_of_its_own(async move {
            if let Ok(opts) = Opts::from_url(&server) {
                if let Ok(mut conn) = Conn::new(opts).await {
                    let _ = conn
                        .query_drop(format!(
                            "DROP USER IF EXISTS '{name}'@'%', '{name}'@'localhost'"
                        ))
                        .await;
                    let _ = conn.disconnect().await;
                }
            }
        });
    }
}

/// MySQL 8+ has binary logging on by default; then only a user with SUPER may create triggers
/// unless log_bin_trust_function_creators is on. A user with the documented privileges either
/// installs (binary logging off, or the setting on) or gets an error naming the setting — and
/// can start on triggers an administrator applied from install_sql().
#[actix_rt::test]
async fn a_user_without_super_installs_or_is_told_about_log_bin_trust_function_creators() {
    let refused = installs_or_is_told_about_log_bin_trust_function_creators(&server_url()).await;
    log::info!("the test server refuses triggers to users without SUPER: {refused}");
}

/// The refusing branch of the test above, on a server with binary logging on:
/// `SQLNOTIFY_TEST_MYSQL_BINLOG_URL` (an administrator's URL; scripts/test starts such a
/// MariaDB), unless the test server itself already has it on.
#[actix_rt::test]
async fn a_user_without_super_is_told_about_log_bin_trust_function_creators() {
    let server = match std::env::var("SQLNOTIFY_TEST_MYSQL_BINLOG_URL") {
        Ok(url) => url,
        Err(_) => {
            let db = TestDb::new().await;
            let default_refuses = db
                .count(
                    "SELECT @@GLOBAL.log_bin = 1 AND @@GLOBAL.log_bin_trust_function_creators = 0",
                )
                .await
                == 1;
            if !default_refuses {
                common::prerequisite_missing(
                    "a_user_without_super_is_told_about_log_bin_trust_function_creators",
                    "a server with binary logging on (set SQLNOTIFY_TEST_MYSQL_BINLOG_URL)",
                );
                return;
            }
            server_url()
        }
    };
    assert!(
        installs_or_is_told_about_log_bin_trust_function_creators(&server).await,
        "{server} should have binary logging on and log_bin_trust_function_creators off"
    );
}

/// Runs the scenario on the server `server` connects to; returns whether that server refused
/// the trigger (binary logging on, log_bin_trust_function_creators off).
async fn installs_or_is_told_about_log_bin_trust_function_creators(server: &str) -> bool {
    let db = TestDb::on(server).await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let user = TestUser::new(&db).await;
    let refused = db
        .count("SELECT @@GLOBAL.log_bin = 1 AND @@GLOBAL.log_bin_trust_function_creators = 0")
        .await
        == 1;
    let builder = Notifier::builder(&user.url).watch(Watch::new("t", Operation::Insert));
    let notifier = if refused {
        let e = builder.start().await.unwrap_err();
        assert!(matches!(e, Error::Database { .. }), "{e:?}");
        let text = e.to_string();
        for needle in [
            "binary logging is on",
            "log_bin_trust_function_creators = 1",
            "manage_triggers(false)",
        ] {
            assert!(text.contains(needle), "{needle:?} not in: {text}");
        }
        assert!(db.triggers().await.is_empty());
        // the way out without SUPER for the application: an administrator applies the script
        db.exec(&builder.install_sql().await.unwrap()).await;
        builder
            .clone()
            .manage_triggers(false)
            .start()
            .await
            .unwrap()
    } else {
        builder.start().await.unwrap()
    };
    let channel = db.channel("t", "insert");
    assert_eq!(db.triggers().await, [channel.as_str()]);
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    notifier.stop().await.unwrap();

    if refused {
        // A changed watch is refused before the installed trigger is touched (MySQL replaces
        // a trigger by dropping it first): the old one keeps capturing.
        db.exec("ALTER TABLE t ADD note TEXT").await;
        let e = Notifier::builder(&user.url)
            .watch(Watch::new("t", Operation::Insert).extra_columns(["note"]))
            .start()
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("log_bin_trust_function_creators"),
            "{e}"
        );
        assert_eq!(db.triggers().await, [channel.as_str()]);
        let before = journal_head(&db).await;
        db.exec("INSERT INTO t (id) VALUES (2)").await;
        assert!(
            journal_head(&db).await > before,
            "the old trigger still fires"
        );
    }
    refused
}

/// A member whose machine goes silent (its connections stay open on the server: no FIN, no
/// RST) leaves the consumer's lease to a standby within its listener connection's
/// `wait_timeout` — six health checks, at least 10 s. The server kept the connection, and its
/// `GET_LOCK`, for its default `wait_timeout` of 8 hours, while the standby stood by.
#[actix_rt::test]
async fn a_member_gone_silent_leaves_the_lease_to_a_standby() {
    use sqlnotify::Role;

    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let (proxy, through) = // prefer_socket=false: mysql_async would otherwise move a loopback connection to the
    // server's unix socket, past the proxy.
    common::proxy::in_front_of(&db.url, "prefer_socket=false").await;
    let start = |url: String| async move {
        Notifier::builder(&url)
            .watch(Watch::new("t", Operation::Insert))
            .consumer("silent")
            .health_check_interval(Duration::from_secs(1))
            .start()
            .await
            .unwrap()
    };
    let role = |notifier: &Notifier| {
        let notifier = notifier.clone();
        async move { notifier.stats().await.unwrap().role }
    };
    let a = start(through).await;
    assert!(wait_until(ARRIVES_WITHIN, || async { role(&a).await == Role::Active }).await);
    let b = start(db.url.clone()).await;
    let mut events = Events::subscribe(&b, Subscription::new("t", Operation::Insert)).await;
    assert!(wait_until(ARRIVES_WITHIN, || async { role(&b).await == Role::Standby }).await);

    proxy.black_hole();
    let took_over = wait_until(Duration::from_secs(40), || async {
        role(&b).await == Role::Active
    })
    .await;
    assert!(took_over, "B is still {:?}", role(&b).await);
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    b.stop().await.unwrap();
    drop(a);
}

/// Default channel names join schema, table and operation with `_`: `x_b.c` and `x.b_c` both
/// give `sqlnotify_x_b_c_insert`. A second notifier watching the other table is refused,
/// naming both; it used to replace the first one's catalog entry and write its rows into the
/// journal under the same channel, so each notifier received the other table's changes as its
/// own.
#[actix_rt::test]
async fn a_default_channel_installed_for_another_table_is_refused() {
    let db = TestDb::new().await;
    let other = TestDb::named(&db.server, format!("{}_b", db.name)).await;
    other.exec("CREATE TABLE c (id INT PRIMARY KEY)").await;
    db.exec("CREATE TABLE b_c (id INT PRIMARY KEY)").await;
    let first = Notifier::builder(&db.url)
        .watch(Watch::new("c", Operation::Insert).schema(&other.name))
        .start()
        .await
        .unwrap();
    let refused = Notifier::builder(&db.url)
        .watch(Watch::new("b_c", Operation::Insert))
        .start()
        .await;
    let Err(e) = refused else {
        panic!("the second watch took the channel");
    };
    let channel = format!("sqlnotify_{}_b_c_insert", db.name);
    assert!(
        matches!(&e, Error::ChannelTaken { channel: c, watch, installed_watch }
            if *c == channel
                && *watch == format!("{}.b_c INSERT", db.name)
                && *installed_watch == format!("{}.c INSERT", other.name)),
        "{e:?}"
    );
    // The first notifier still hears its table, and only its table.
    let mut events = Events::subscribe(
        &first,
        Subscription::new("c", Operation::Insert).schema(&other.name),
    )
    .await;
    db.exec("INSERT INTO b_c VALUES (2)").await;
    other.exec("INSERT INTO c VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    events.assert_empty();
    first.stop().await.unwrap();
}

/// A listener waiting for room in the pipeline (a subscriber holding it) keeps its connection,
/// and a named consumer its lease: it pings the connection meanwhile. The server ends a
/// connection that sends nothing for its `wait_timeout` (six health checks, at least 10 s):
/// it ended the waiting listener's, a `Disconnected` and, in a group, a failover for nothing.
#[actix_rt::test]
async fn a_listener_waiting_for_room_keeps_its_connection() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .consumer("waiting")
        .max_in_flight(1_024)
        .health_check_interval(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let mut statuses = common::statuses(&notifier).await;
    let (release, mut events, arbiter) = common::subscribe_gated(
        &notifier,
        Subscription::new("t", Operation::Insert)
            .policy(sqlnotify::OverflowPolicy::Wait)
            .buffer(10),
    )
    .await;
    // Past the in-flight budget (1,024, the least).
    const N: i64 = 3_000;
    insert_rows(&db, "t", 1..=N).await;
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            notifier.stats().await.unwrap().received > 0
        })
        .await
    );
    // Held past the connection's wait_timeout (10 s here).
    let held = wait_until(Duration::from_secs(13), || async {
        notifier.stats().await.unwrap().received >= N as u64
    })
    .await;
    assert!(!held, "the subscriber held the pipeline");
    release.send(()).unwrap();
    for id in 1..=N {
        let event = tokio::time::timeout(ARRIVES_WITHIN, events.recv())
            .await
            .expect("events keep arriving")
            .unwrap();
        assert_eq!(event.id().as_i64(), Some(id), "every row once, in order");
    }
    while let Ok(status) = statuses.try_recv() {
        assert!(
            !matches!(status, Status::Disconnected { .. } | Status::Gap { .. }),
            "{status:?}"
        );
    }
    assert_eq!(notifier.stats().await.unwrap().restarts, 0);
    notifier.stop().await.unwrap();
    arbiter.stop();
}

/// A burst of control calls (50 `notify`s at once) queues for at most four control
/// connections instead of opening one each (up to `max_connections`, which then refused the
/// listener's reconnect and the application's own connections too).
#[actix_rt::test]
async fn a_burst_of_control_calls_shares_a_few_connections() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    // prefer_socket=false: mysql_async would otherwise move a loopback connection to the
    // server's unix socket, past the proxy.
    let (proxy, through) = common::proxy::in_front_of(&db.url, "prefer_socket=false").await;
    let notifier = Notifier::builder(&through)
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let before = proxy.forwarded();
    let sent = futures_util::future::join_all(
        (0..50).map(|id| notifier.notify("t", Operation::Insert, json!({ "id": id }))),
    )
    .await;
    assert!(sent.iter().all(Result::is_ok), "{sent:?}");
    // Four connections; a connect may take two sockets (TLS asked first, then plain, on a
    // server without TLS).
    let opened = proxy.forwarded() - before;
    assert!(opened <= 8, "{opened} sockets opened for 50 calls");
    assert_eq!(db.count("SELECT COUNT(*) FROM sqlnotify_journal").await, 50);
    notifier.stop().await.unwrap();
}

/// The control connection is out of its slot, and its lock let go, while a statement runs on
/// it: a call stuck on a path gone silent (here the retention purge) holds up no other call,
/// which opens a connection of its own. `notify` waited behind it for ever before.
#[cfg(feature = "bench")]
#[actix_rt::test]
async fn a_control_call_stuck_on_a_silent_path_holds_up_no_other() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let (proxy, through) = // prefer_socket=false: mysql_async would otherwise move a loopback connection to the
    // server's unix socket, past the proxy.
    common::proxy::in_front_of(&db.url, "prefer_socket=false").await;
    let keep = Duration::from_secs(3600);
    let notifier = Notifier::builder(&through)
        .watch(Watch::new("t", Operation::Insert))
        .purge_interval(keep)
        .health_check_interval(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    // The control connection is open and was used just now: the purge takes it unchecked.
    notifier
        .notify("t", Operation::Insert, json!({"id": 1}))
        .await
        .unwrap();
    proxy.silence_existing();
    let stalled = proxy.stalled();
    let purging = notifier.clone();
    let purge = tokio::task::spawn_local(async move {
        sqlnotify::bench_support::purge_now(&purging, keep).await
    });
    assert!(
        wait_until(ARRIVES_WITHIN, || async { proxy.stalled() > stalled }).await,
        "the purge's statement went into the silent path"
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        notifier.notify("t", Operation::Insert, json!({"id": 2})),
    )
    .await
    .expect("notify opens a connection of its own")
    .unwrap();
    assert_eq!(
        db.count("SELECT COUNT(*) FROM sqlnotify_journal").await,
        2,
        "both custom events were written"
    );
    assert!(!purge.is_finished(), "the purge still waits for its answer");
    purge.abort();
    drop(notifier);
}

// ---------------------------------------------------------------------------------------------
// 6. Late commits and gaps
// ---------------------------------------------------------------------------------------------

/// The newest journal id (whatever the channel).
async fn journal_head(db: &TestDb) -> i64 {
    db.count("SELECT COALESCE(MAX(id), 0) FROM sqlnotify_journal")
        .await
}

async fn saved_watermark(db: &TestDb, consumer: &str) -> i64 {
    db.count(&format!(
        "SELECT COALESCE(MAX(watermark), -1) FROM sqlnotify_consumers WHERE name = '{consumer}'"
    ))
    .await
}

#[actix_rt::test]
async fn a_transaction_that_commits_late_is_not_skipped() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .consumer("late")
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;

    // A inserts first (its journal row takes the lower id) and stays open
    let mut a = db.conn().await;
    a.query_drop("START TRANSACTION").await.unwrap();
    a.query_drop("INSERT INTO t VALUES (1)").await.unwrap();
    let a_journal_id: i64 = a
        .query_first("SELECT MAX(id) FROM sqlnotify_journal")
        .await
        .unwrap()
        .unwrap();
    // B inserts after it and commits
    db.exec("INSERT INTO t VALUES (2)").await;
    let e = ev.next().await;
    assert_eq!(
        e.id().as_i64(),
        Some(2),
        "B's event arrives while A is open"
    );
    let b_journal_id = e.sequence().unwrap();
    assert!(b_journal_id > a_journal_id);
    // the consumer's saved position never passes A's open row
    assert!(saved_watermark(&db, "late").await < a_journal_id);

    // A commits: its event arrives, though its id is below one already delivered
    a.query_drop("COMMIT").await.unwrap();
    let _ = a.disconnect().await;
    let e = ev.next().await;
    assert_eq!(e.id().as_i64(), Some(1));
    assert_eq!(e.sequence(), Some(a_journal_id));
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            saved_watermark(&db, "late").await >= b_journal_id
        })
        .await,
        "the watermark moves on once the gap is filled"
    );
    db.exec("INSERT INTO t VALUES (3)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(3));
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

/// A consumer's very first start, while a transaction is running with a journal id below one
/// already committed: the position registered at once keeps that id unread, so the
/// transaction, committing only after a restart, is still delivered (it was registered at the
/// newest id, past it, for good) — and the history before the first start is not.
#[actix_rt::test]
async fn a_transaction_running_at_a_consumers_first_start_is_delivered_after_a_restart() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let start = || async {
        Notifier::builder(&db.url)
            .watch(Watch::new("t", Operation::Insert))
            .consumer("fresh")
            .start()
            .await
            .unwrap()
    };
    let (running, running_id) = running_below_a_commit(&db, &db.url).await;
    let notifier = start().await;
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    assert!(
        saved_watermark(&db, "fresh").await < running_id,
        "registered past a transaction still running"
    );
    notifier.stop().await.unwrap();
    ev.assert_empty();

    // Restarted while the transaction still runs; it commits after.
    running_one_arrives_alone(&db, start().await, running).await;
}

/// Installs the triggers on `t` (through `url`), then opens a transaction that inserts 1 and
/// stays open, and commits 2 after it (a higher journal id); returns the open transaction and
/// its journal id.
async fn running_below_a_commit(db: &TestDb, url: &str) -> (Conn, i64) {
    let installer = Notifier::builder(url)
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    installer.stop().await.unwrap();
    let (running, running_id) = open_insert(db, 1).await;
    db.exec("INSERT INTO t VALUES (2)").await;
    assert!(journal_head(db).await > running_id);
    (running, running_id)
}

/// Subscribes to `notifier`, commits `running` (which inserted 1 into `t`), and checks that its
/// event arrives, then 3's, and nothing else (not 2, committed before the first start).
async fn running_one_arrives_alone(db: &TestDb, notifier: Notifier, mut running: Conn) {
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    running.query_drop("COMMIT").await.unwrap();
    let _ = running.disconnect().await;
    assert_eq!(ev.next().await.id().as_i64(), Some(1), "the late commit");
    db.exec("INSERT INTO t VALUES (3)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(3));
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

/// A first start while a transaction has been running for longer than the gap timeout, its
/// journal id below a row committed since: the listener starts before it (it sees the server's
/// running transactions) and delivers it when it commits — not the row committed before the
/// start.
#[actix_rt::test]
async fn a_transaction_running_longer_than_the_gap_timeout_at_the_first_start_is_delivered() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let url = with_param(&db.url, "sqlnotify_gap_timeout_ms=300");
    let start = || async {
        Notifier::builder(&url)
            .watch(Watch::new("t", Operation::Insert))
            .start()
            .await
            .unwrap()
    };
    let (running, _) = running_below_a_commit(&db, &url).await;
    // Both rows older than the gap timeout, by the server's clock.
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            db.count(
                "SELECT COUNT(*) FROM sqlnotify_journal \
                 WHERE created_at < NOW(6) - INTERVAL 600000 MICROSECOND",
            )
            .await
                >= 1
        })
        .await
    );

    running_one_arrives_alone(&db, start().await, running).await;
}

/// A rolled-back insert burns its journal id: the watermark moves past it after the gap
/// timeout. A transaction still running past the gap timeout is waited for instead (its row is
/// there, uncommitted): its event arrives when it commits, and if it rolls back after all, its
/// ids are given up then.
#[actix_rt::test]
async fn rolled_back_ids_are_given_up_and_open_transactions_waited_for() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let url = with_param(&db.url, "sqlnotify_gap_timeout_ms=300");
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("t", Operation::Insert))
        .consumer("gaps")
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;

    // a rolled-back insert burns a journal id for good
    db.exec("START TRANSACTION; INSERT INTO t VALUES (1); ROLLBACK;")
        .await;
    db.exec("INSERT INTO t VALUES (2)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(2));
    let head = journal_head(&db).await;
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            saved_watermark(&db, "gaps").await >= head
        })
        .await,
        "the burned id stopped holding the watermark after the gap timeout"
    );

    // A transaction that stays open for many gap timeouts after its trigger ran holds the
    // watermark, and its event arrives when it commits.
    let mut a = held_open(&db, &mut ev, 10, Duration::from_millis(1500)).await;
    a.query_drop("COMMIT").await.unwrap();
    let _ = a.disconnect().await;
    assert_eq!(
        ev.next().await.id().as_i64(),
        Some(10),
        "the late commit arrives"
    );

    // One that rolls back after being waited for is given up then.
    let mut b = held_open(&db, &mut ev, 20, Duration::from_millis(900)).await;
    b.query_drop("ROLLBACK").await.unwrap();
    let _ = b.disconnect().await;
    let head = journal_head(&db).await;
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            saved_watermark(&db, "gaps").await >= head
        })
        .await,
        "the rolled-back transaction's id was given up"
    );
    db.exec("INSERT INTO t VALUES (22)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(22));
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

/// Opens a transaction that inserts `id` into `t` and stays open, has `id + 1` inserted and
/// delivered after it, and checks for `wait` that consumer "gaps"' saved position stays below
/// the open transaction's journal id; returns its connection.
async fn held_open(db: &TestDb, ev: &mut Events, id: i64, wait: Duration) -> Conn {
    let (conn, journal_id) = open_insert(db, id).await;
    db.exec(&format!("INSERT INTO t VALUES ({})", id + 1)).await;
    assert_eq!(ev.next().await.id().as_i64(), Some(id + 1));
    assert!(
        !wait_until(wait, || async {
            saved_watermark(db, "gaps").await >= journal_id
        })
        .await,
        "the watermark passed a transaction still running"
    );
    conn
}

/// Opens a transaction that inserts `id` into `t` and stays open; returns its connection and
/// the journal id its trigger took.
async fn open_insert(db: &TestDb, id: i64) -> (Conn, i64) {
    let mut conn = db.conn().await;
    conn.query_drop(format!("START TRANSACTION; INSERT INTO t VALUES ({id});"))
        .await
        .unwrap();
    let journal_id: i64 = conn
        .query_first("SELECT MAX(id) FROM sqlnotify_journal")
        .await
        .unwrap()
        .unwrap();
    (conn, journal_id)
}

#[actix_rt::test]
async fn the_builder_gap_timeout_is_used_and_wins_over_the_url_parameter() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;

    // zero is refused before anything is installed (here and in the URL)
    let e = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .gap_timeout(Duration::ZERO)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                option: "gap_timeout",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(db.triggers().await.is_empty());
    let e = Notifier::builder(with_param(&db.url, "sqlnotify_gap_timeout_ms=0"))
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidUrl { .. }), "{e:?}");

    // A short gap timeout on the builder (the URL says nothing: the default would be 10 s):
    // the listener moves past a rolled-back insert's id well within the default's 10 s.
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .consumer("short")
        .gap_timeout(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let (mut a, a_id) = open_insert(&db, 10).await;
    a.query_drop("ROLLBACK").await.unwrap();
    let _ = a.disconnect().await;
    db.exec("INSERT INTO t VALUES (11)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(11));
    assert!(
        wait_until(Duration::from_secs(5), || async {
            saved_watermark(&db, "short").await >= a_id
        })
        .await,
        "the burned id was given up on after the builder's 200 ms"
    );
    ev.assert_empty();
    notifier.stop().await.unwrap();

    // The URL asks for 200 ms, the builder for an hour: the builder wins, and the burned id
    // holds the watermark.
    let url = with_param(&db.url, "sqlnotify_gap_timeout_ms=200");
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("t", Operation::Insert))
        .consumer("long")
        .gap_timeout(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let (mut a, a_id) = open_insert(&db, 20).await;
    a.query_drop("ROLLBACK").await.unwrap();
    let _ = a.disconnect().await;
    db.exec("INSERT INTO t VALUES (21)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(21));
    assert!(
        !wait_until(Duration::from_millis(1500), || async {
            saved_watermark(&db, "long").await >= a_id
        })
        .await,
        "the watermark passed a burned id after the URL's 200 ms"
    );
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 7. Several listeners
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn concurrent_writers_committing_out_of_id_order_lose_nothing() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY, w INT)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert).extra_columns(["w"]))
        .consumer("many")
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    const WRITERS: i64 = 6;
    const ROWS: i64 = 150;
    // Each writer holds its transaction open across a few inserts, so journal ids are taken
    // in one order and committed in another.
    let writers = (0..WRITERS).map(|w| {
        let url = db.url.clone();
        async move {
            let mut conn = connect(&url).await;
            let mut id = w * ROWS;
            let mut tx = 0;
            while id < (w + 1) * ROWS {
                tx += 1;
                conn.query_drop("START TRANSACTION").await.unwrap();
                let start = id;
                for _ in 0..3.min((w + 1) * ROWS - id) {
                    id += 1;
                    conn.exec_drop("INSERT INTO t VALUES (?, ?)", (id, w))
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                }
                if tx % 5 == 0 {
                    // rolled back (and redone in the next transaction): burned journal ids
                    conn.query_drop("ROLLBACK").await.unwrap();
                    id = start;
                    continue;
                }
                conn.query_drop("COMMIT").await.unwrap();
            }
            let _ = conn.disconnect().await;
        }
    });
    futures_util::future::join_all(writers).await;
    let mut got = ids(&ev.take((WRITERS * ROWS) as usize).await);
    got.sort_unstable();
    assert_eq!(got, (1..=WRITERS * ROWS).collect::<Vec<_>>());
    db.exec("INSERT INTO t VALUES (100000, 0)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(100000));
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 8. Named consumers
// ---------------------------------------------------------------------------------------------

/// Journal rows of another application written above a consumer's watermark: more than the
/// listener can look through for gaps within its query limit, one primary-key probe each.
const BACKLOG: i64 = 2_000_000;

/// Writes [`BACKLOG`] journal rows on a channel no notifier reads, in one statement (a cross
/// join of digits: MySQL and MariaDB alike).
async fn write_backlog(db: &TestDb) {
    let digits = "(SELECT 0 UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 \
                  UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 \
                  UNION ALL SELECT 8 UNION ALL SELECT 9)";
    let millions = (1..=6)
        .map(|i| format!("{digits} d{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    db.exec(&format!(
        "INSERT INTO sqlnotify_journal (channel, payload) \
         SELECT 'sqlnotify_elsewhere', '{{}}' FROM {millions}, (SELECT 0 UNION ALL SELECT 1) twice"
    ))
    .await;
}

/// A named consumer millions of journal rows behind resumes. Placing it once looked for the
/// gaps to age through every row above its watermark — about 2 s per million rows here, over
/// the listener's query limit (2 s with this health check, its minimum) — so it failed on
/// every restart, for ever. A gap far above the watermark, beyond what placement looks
/// through, is given up a gap timeout after it is read, and every row arrives.
#[actix_rt::test]
async fn a_consumer_millions_of_rows_behind_resumes_and_gives_up_a_gap_far_above_its_watermark() {
    let db = consumer_db().await;
    let builder = db
        .builder()
        .health_check_interval(Duration::from_millis(100))
        .watch(db.watch("t"))
        .consumer("behind");
    builder.start().await.unwrap().stop().await.unwrap();
    let registered = saved_watermark(&db, "behind").await;
    db.insert("t", 1..=1).await;
    write_backlog(&db).await;
    // a rolled-back insert burns a journal id far above the watermark
    db.exec("START TRANSACTION; INSERT INTO t VALUES (2); ROLLBACK;")
        .await;
    db.insert("t", 3..=3).await;
    let head = journal_head(&db).await;
    assert!(head > registered + BACKLOG + 2, "{head}");

    let (notifier, mut rx) = common::consumers::start_collecting(&builder).await;
    assert_eq!(
        common::consumers::next_ids(&mut rx, 1).await,
        [1],
        "the consumer is placed within the query limit"
    );
    assert!(
        wait_until(Duration::from_secs(60), || async {
            saved_watermark(&db, "behind").await >= head
        })
        .await,
        "the backlog is read and the burned id far above the watermark given up"
    );
    assert_eq!(common::consumers::next_ids(&mut rx, 1).await, [3]);
    db.insert("t", 4..=4).await;
    assert_eq!(common::consumers::next_ids(&mut rx, 1).await, [4]);
    assert!(rx.try_recv().is_err(), "each row once");
    notifier.stop().await.unwrap();
}

/// Whether consumer `name`'s row still records channels it missed.
async fn records_missed(db: &TestDb, name: &str) -> bool {
    db.count(&format!(
        "SELECT COUNT(*) FROM sqlnotify_consumers WHERE name = '{name}' AND missed IS NOT NULL"
    ))
    .await
        == 1
}

/// A consumer that comes back after rows it had not read were purged gets its `Gap` even when
/// its start fails after it read its row — here reading the journal, locked past the query
/// limit. Reading its row once cleared what it missed: the failed start forgot the gap, and
/// no start after it reported one. What it missed is cleared by the save after the report
/// (periodic or final), so it is reported once — unless it was dropped and purged again
/// before that save.
#[actix_rt::test]
async fn a_gap_read_by_a_start_that_fails_is_reported_by_the_next_start() {
    use common::consumers::{assert_no_gap, next_gap, start_watching_status, ForwardStatus};
    let db = consumer_db().await;
    // the query limit: the health check, at least 2 s
    let builder = db
        .builder()
        .health_check_interval(Duration::from_millis(100))
        .watch(db.watch("t"))
        .consumer("c");
    builder.start().await.unwrap().stop().await.unwrap();
    // what a purge records for a dropped consumer whose unread rows it deleted
    let dropped_with_a_gap = format!(
        "UPDATE sqlnotify_consumers SET state = 'dropped', missed = '[\"{}\"]' WHERE name = 'c'",
        ConsumerDb::channel(&db, "t")
    );
    db.exec(&dropped_with_a_gap).await;

    let mut holder = db.conn().await;
    holder
        .query_drop("LOCK TABLES sqlnotify_journal WRITE")
        .await
        .unwrap();
    let (tx, mut statuses) = tokio::sync::mpsc::unbounded_channel();
    let forward = actix::Actor::start(ForwardStatus(tx));
    // installed already: installing again would wait for the journal first
    let failed = tokio::time::timeout(
        Duration::from_secs(30),
        builder
            .clone()
            .manage_triggers(false)
            .subscribe_status(forward.recipient())
            .start(),
    )
    .await
    .expect("start() is bounded by the query limit")
    .expect_err("the journal is locked");
    assert!(
        failed.to_string().contains("placing the journal cursor"),
        "{failed}"
    );
    holder.query_drop("UNLOCK TABLES").await.unwrap();
    let _ = holder.disconnect().await;
    assert_eq!(
        common::consumers::listed(&db, "c").await.state,
        sqlnotify::ConsumerState::Active,
        "the failed start had taken its row up again"
    );
    assert_no_gap(&mut statuses).await;
    assert!(records_missed(&db, "c").await, "not reported yet");

    let (notifier, mut rx, mut statuses) = start_watching_status(&builder).await;
    assert_eq!(
        next_gap(&mut statuses).await,
        [ConsumerDb::channel(&db, "t")]
    );
    // dropped again and purged on the same channel before a save: reported again
    db.exec(&dropped_with_a_gap).await;
    db.insert("t", 1..=1).await;
    assert_eq!(common::consumers::next_ids(&mut rx, 1).await, [1]);
    assert_eq!(
        next_gap(&mut statuses).await,
        [ConsumerDb::channel(&db, "t")]
    );
    db.insert("t", 2..=2).await;
    assert_eq!(common::consumers::next_ids(&mut rx, 1).await, [2]);
    assert!(
        wait_until(ARRIVES_WITHIN, || async { !records_missed(&db, "c").await }).await,
        "the save after the report clears it"
    );
    notifier.stop().await.unwrap();
    let (notifier, _rx, mut statuses) = start_watching_status(&builder).await;
    assert_no_gap(&mut statuses).await;
    notifier.stop().await.unwrap();

    // reported, then stopped before any periodic save: the final save clears it
    db.exec(&dropped_with_a_gap).await;
    let (notifier, _rx, mut statuses) = start_watching_status(&builder).await;
    assert_eq!(
        next_gap(&mut statuses).await,
        [ConsumerDb::channel(&db, "t")]
    );
    notifier.stop().await.unwrap();
    assert!(!records_missed(&db, "c").await);
}

// ---------------------------------------------------------------------------------------------
// 9. Retention
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// 10. Supervision
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn a_listener_whose_connection_is_killed_is_restarted_and_resumes() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let mut statuses = common::statuses(&notifier).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));

    // Kill the notifier's connections (listener and control), then write at once: the
    // listener cannot be back before the rows are committed (its restart waits a backoff).
    let mut conn = db.conn().await;
    let victims: Vec<u64> = conn
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = ? AND ID != CONNECTION_ID()",
            (&db.name,),
        )
        .await
        .unwrap();
    assert!(!victims.is_empty());
    for id in victims {
        match conn.query_drop(format!("KILL CONNECTION {id}")).await {
            // ER_NO_SUCH_THREAD: it closed between the SELECT and the KILL (a connection
            // the driver moved to the unix socket, one the notifier closed itself).
            Err(mysql_async::Error::Server(e)) if e.code == 1094 => {}
            other => other.unwrap(),
        }
    }
    conn.query_drop("INSERT INTO t VALUES (2), (3), (4)")
        .await
        .unwrap();
    let _ = conn.disconnect().await;

    match common::next_status_within(&mut statuses, Duration::from_secs(30)).await {
        Status::Disconnected { .. } => {}
        other => panic!("expected the listener to notice, got {other:?}"),
    }
    loop {
        match common::next_status_within(&mut statuses, Duration::from_secs(30)).await {
            Status::Disconnected { .. } => continue,
            Status::Connected => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        common::next_status_within(&mut statuses, Duration::from_secs(30)).await,
        Status::Resynced { replayed: 3 }
    );
    assert_eq!(ids(&events.take(3).await), [2, 3, 4]);
    db.exec("INSERT INTO t VALUES (5)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(5));
    events.assert_empty();
    assert!(notifier.stats().await.unwrap().restarts >= 1);
    // the control connection was killed too: notify() reconnects (after one failure at most)
    if notifier
        .notify("t", Operation::Insert, json!({"id": 6}))
        .await
        .is_err()
    {
        notifier
            .notify("t", Operation::Insert, json!({"id": 6}))
            .await
            .unwrap();
    }
    assert_eq!(events.next().await.id().as_i64(), Some(6));
    notifier.stop().await.unwrap();
}

/// The journal's ids go back under a running listener (a failover to a replica that was
/// behind, a restore, the journal truncated): here its newest 50 rows are deleted and
/// `AUTO_INCREMENT` set back, so the next rows take ids the listener had read. The session
/// after the listener's connection is lost finds the journal's newest id below what it read,
/// reads again after the rows written before its last read, announces a `Gap`, and sets the
/// named consumer's saved position back. (Defect: the cursor, kept across sessions, took every
/// new id for one it had read; the rows were skipped silently.)
#[actix_rt::test]
async fn a_journal_whose_ids_go_back_is_read_again_and_a_gap_announced() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .gap_timeout(Duration::from_millis(300))
        .consumer("back")
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let mut statuses = common::statuses(&notifier).await;
    insert_rows(&db, "t", 1..=100).await;
    assert_eq!(ids(&events.take(100).await), (1..=100).collect::<Vec<_>>());
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            saved_watermark(&db, "back").await >= 100
        })
        .await,
        "the consumer saved its position"
    );
    // Older than the gap timeout by far when the listener last reads them: not read again.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.count(
                "SELECT TIMESTAMPDIFF(MICROSECOND, MAX(created_at), NOW(6)) FROM sqlnotify_journal",
            )
            .await
                > 1_500_000
        })
        .await
    );
    db.exec("DELETE FROM sqlnotify_journal WHERE id > 50; ALTER TABLE sqlnotify_journal AUTO_INCREMENT = 51")
        .await;
    let mut conn = db.conn().await;
    let victims: Vec<u64> = conn
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = ? AND ID != CONNECTION_ID()",
            (&db.name,),
        )
        .await
        .unwrap();
    for id in victims {
        match conn.query_drop(format!("KILL CONNECTION {id}")).await {
            Err(mysql_async::Error::Server(e)) if e.code == 1094 => {}
            other => other.unwrap(),
        }
    }
    let _ = conn.disconnect().await;
    insert_rows(&db, "t", 101..=110).await;
    assert_eq!(
        journal_head(&db).await,
        60,
        "the new rows took ids the listener had read"
    );
    assert_eq!(ids(&events.take(10).await), (101..=110).collect::<Vec<_>>());
    assert_eq!(
        common::consumers::next_gap(&mut statuses).await,
        [db.channel("t", "insert")]
    );
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            saved_watermark(&db, "back").await == 60
        })
        .await,
        "the saved position was set back: {}",
        saved_watermark(&db, "back").await
    );
    db.exec("INSERT INTO t VALUES (111)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(111));
    events.assert_empty();
    notifier.stop().await.unwrap();
}

/// A named consumer whose saved position is past the journal's newest id when it starts (the
/// journal was truncated while it was stopped) starts again at the journal's start, says so
/// with a `Gap`, and saves the position it reads from: rows written since arrive — those
/// written while it was stopped too, however long ago (when the old journal was last read is
/// not known to the process that starts: it looked back one gap timeout and skipped them).
#[actix_rt::test]
async fn a_consumer_saved_past_a_truncated_journal_reads_it_again_and_gets_a_gap() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let builder = || {
        Notifier::builder(&db.url)
            .watch(Watch::new("t", Operation::Insert))
            .gap_timeout(Duration::from_millis(300))
            .consumer("back")
    };
    let notifier = builder().start().await.unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    insert_rows(&db, "t", 1..=20).await;
    assert_eq!(ids(&events.take(20).await), (1..=20).collect::<Vec<_>>());
    notifier.stop().await.unwrap();
    assert_eq!(saved_watermark(&db, "back").await, 20);
    db.exec("TRUNCATE TABLE sqlnotify_journal").await;
    insert_rows(&db, "t", 21..=23).await;
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            db.count(
                "SELECT COUNT(*) FROM sqlnotify_journal \
                  WHERE created_at <= NOW(6) - INTERVAL 1 SECOND",
            )
            .await
                == 3
        })
        .await,
        "rows 21..=23 written more than a second (over three gap timeouts) before the start"
    );

    let (notifier, mut rx, mut statuses) =
        common::consumers::start_watching_status(&builder()).await;
    insert_rows(&db, "t", 24..=25).await;
    assert_eq!(journal_head(&db).await, 5);
    assert_eq!(
        common::consumers::next_ids(&mut rx, 5).await,
        (21..=25).collect::<Vec<_>>()
    );
    assert_eq!(
        common::consumers::next_gap(&mut statuses).await,
        [db.channel("t", "insert")]
    );
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            saved_watermark(&db, "back").await == 5
        })
        .await,
        "the saved position was set back: {}",
        saved_watermark(&db, "back").await
    );
    assert!(rx.try_recv().is_err(), "nothing else");
    notifier.stop().await.unwrap();
}

/// A consumer's row filled by someone allowed to update `sqlnotify_consumers`: `seen` with
/// more gaps than a save ever writes, `missed` of 2 MB naming other channels. Neither is
/// loaded whole nor trusted: the rows above the watermark are read again (the made-up gaps
/// would have skipped row 2), the Gap names the consumer's own channel, and `missed` is
/// cleared once reported. (Defect: `seen` was parsed whatever its number of gaps.)
#[actix_rt::test]
async fn a_consumer_row_filled_by_someone_else_is_bounded_and_not_trusted() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .consumer("c");
    let (notifier, mut rx, _) = common::consumers::start_watching_status(&builder).await;
    insert_rows(&db, "t", [1]).await;
    assert_eq!(common::consumers::next_ids(&mut rx, 1).await, [1]);
    notifier.stop().await.unwrap();
    assert_eq!(saved_watermark(&db, "c").await, 1);
    insert_rows(&db, "t", [2]).await;
    // Journal rows up to id 2102 on a channel nobody reads, so the made-up high id is one the
    // journal has (a higher one reads as ids gone back, and is read again for that).
    let elsewhere = vec!["('elsewhere', '{}')"; 2_100].join(", ");
    db.exec(&format!(
        "INSERT INTO sqlnotify_journal (channel, payload) VALUES {elsewhere}"
    ))
    .await;
    assert_eq!(journal_head(&db).await, 2_102);
    // Gaps at 3, 5, …: everything else up to the high id, row 2 too, would count as read.
    let gaps: Vec<String> = (1..=1_001)
        .map(|i| format!("[{0}, {0}]", 2 * i + 1))
        .collect();
    let seen = format!(r#"{{"high": 2102, "gaps": [{}]}}"#, gaps.join(", "));
    let others: Vec<String> = (0..100_000).map(|i| format!(r#""other_{i:08}""#)).collect();
    let missed = format!("[{}]", others.join(", "));
    let mut conn = db.conn().await;
    conn.exec_drop(
        "UPDATE sqlnotify_consumers SET seen = ?, missed = ? WHERE name = 'c'",
        (seen, missed),
    )
    .await
    .unwrap();
    let _ = conn.disconnect().await;

    let (notifier, mut rx, mut statuses) = common::consumers::start_watching_status(&builder).await;
    assert_eq!(common::consumers::next_ids(&mut rx, 1).await, [2]);
    assert_eq!(
        common::consumers::next_gap(&mut statuses).await,
        [db.channel("t", "insert")]
    );
    insert_rows(&db, "t", [3]).await;
    assert_eq!(common::consumers::next_ids(&mut rx, 1).await, [3]);
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            db.count("SELECT COUNT(*) FROM sqlnotify_consumers WHERE name = 'c' AND missed IS NULL")
                .await
                == 1
        })
        .await,
        "missed was cleared once reported"
    );
    notifier.stop().await.unwrap();
}

/// A journal row with a `NULL` payload (an administrator let the column take one, and a
/// migration wrote it): mysql_async panics converting such a row as a tuple, which once ended
/// the listener for good. It is dropped and counted as malformed; reading goes on without a
/// restart.
#[actix_rt::test]
async fn a_journal_row_the_driver_cannot_convert_is_dropped_and_counted() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));

    let mut conn = db.conn().await;
    let channel: String = conn
        .query_first("SELECT `channel` FROM sqlnotify_journal LIMIT 1")
        .await
        .unwrap()
        .expect("the first row's channel");
    db.exec("ALTER TABLE sqlnotify_journal MODIFY `payload` LONGTEXT NULL")
        .await;
    conn.exec_drop(
        "INSERT INTO sqlnotify_journal (`channel`, `payload`) VALUES (?, NULL)",
        (&channel,),
    )
    .await
    .unwrap();
    let _ = conn.disconnect().await;
    db.exec("INSERT INTO t VALUES (2)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(2));
    events.assert_empty();
    let stats = notifier.stats().await.unwrap();
    assert_eq!(
        (stats.malformed, stats.restarts),
        (1, 0),
        "no session failed"
    );
    notifier.stop().await.unwrap();
}

/// An account of this test's own with a password and no privilege, dropped by the guard.
struct Account {
    name: String,
    url: String,
}

impl Account {
    async fn new(db: &TestDb, suffix: &str) -> Account {
        // MySQL user names hold at most 32 characters.
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sqn_{}_{}_{suffix}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        db.exec(&format!(
            "CREATE USER '{name}'@'%' IDENTIFIED BY 'sqlnotify-test'"
        ))
        .await;
        let rest = db.url.split_once("://").expect("a URL").1;
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let url = format!("mysql://{name}:sqlnotify-test@{host}");
        Account { name, url }
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let name = self.name.clone();
        common::on_a_runtime_of_its_own(async move {
            if let Ok(mut admin) = Conn::new(Opts::from_url(&server_url()).unwrap()).await {
                let _ = admin
                    .query_drop(format!("DROP USER IF EXISTS '{name}'@'%'"))
                    .await;
                let _ = admin.disconnect().await;
            }
        });
    }
}

/// An administrator applies `install_sql_granting(account)`; the application runs as that
/// account with `manage_triggers(false)` and a named consumer; events written by another
/// account arrive, custom events work, the position is saved. An account granted nothing
/// gets an error at start.
#[actix_rt::test]
async fn an_application_account_runs_against_an_administrators_install() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id INT PRIMARY KEY, email VARCHAR(100))")
        .await;
    let app = Account::new(&db, "app").await;
    let stranger = Account::new(&db, "no").await;
    let watches = |url: &str| {
        Notifier::builder(url)
            .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]))
    };
    let script = watches(&db.url)
        .install_sql_granting(&app.name)
        .await
        .unwrap();
    assert!(
        script.contains(&format!("TO '{}'@'%'", app.name)),
        "{script}"
    );
    db.exec(&script).await;

    let err = watches(&stranger.url)
        .manage_triggers(false)
        .start()
        .await
        .expect_err("an account granted nothing");
    assert!(matches!(err, Error::Database { .. }), "{err}");

    let notifier = watches(&app.url)
        .manage_triggers(false)
        .consumer("app")
        .start()
        .await
        .unwrap_or_else(|e| panic!("the granted account: {e}"));
    let mut events =
        Events::subscribe(&notifier, Subscription::new("users", Operation::Insert)).await;
    db.exec("INSERT INTO users VALUES (1, 'a@b.c')").await;
    assert_eq!(events.next().await.get("email"), Some(&json!("a@b.c")));
    notifier
        .notify(
            "users",
            Operation::Insert,
            json!({"id": 2, "email": "c@d.e"}),
        )
        .await
        .unwrap();
    assert_eq!(events.next().await.get("email"), Some(&json!("c@d.e")));
    notifier.stop().await.unwrap();
    assert_eq!(
        db.count("SELECT COUNT(*) FROM sqlnotify_consumers WHERE name = 'app'")
            .await,
        1
    );
    // The journal's id is not the application account's to set: a row at the top of the
    // range would fail every trigger's insert after it, and so every watched write.
    let mut conn = mysql_async::Conn::from_url(app.url.as_str()).await.unwrap();
    let refused = conn
        .query_drop(
            "INSERT INTO sqlnotify_journal (id, channel, payload) \
             VALUES (9223372036854775807, 'x', '{}')",
        )
        .await;
    assert!(refused.is_err(), "an id set by the application account");
    let _ = conn.disconnect().await;
    db.exec("INSERT INTO users VALUES (3, 'e@f.g')").await;
}

// ---------------------------------------------------------------------------------------------
// Lock contention: installing and removing triggers next to open transactions
// ---------------------------------------------------------------------------------------------

/// Whether the server can name a metadata lock's holders (MariaDB's `metadata_lock_info`
/// plugin, or `performance_schema` with its metadata lock instrument).
async fn names_metadata_lock_holders(db: &TestDb) -> bool {
    let mut conn = db.conn().await;
    let plugin: Option<i64> = conn
        .query_first(
            "SELECT COUNT(*) FROM information_schema.PLUGINS \
             WHERE PLUGIN_NAME = 'METADATA_LOCK_INFO' AND PLUGIN_STATUS = 'ACTIVE'",
        )
        .await
        .unwrap();
    let ps: Option<i64> = conn
        .query_first(
            "SELECT COUNT(*) FROM performance_schema.setup_instruments \
             WHERE NAME = 'wait/lock/metadata/sql/mdl' AND ENABLED = 'YES' \
             AND @@GLOBAL.performance_schema = 1",
        )
        .await
        .unwrap_or(Some(0));
    let _ = conn.disconnect().await;
    plugin.unwrap_or(0) + ps.unwrap_or(0) > 0
}

/// A session with an open transaction that wrote to `t` (holding its metadata lock).
async fn open_writer(db: &TestDb, id: i64) -> (Conn, u64) {
    let mut conn = db.conn().await;
    let pid: Option<u64> = conn.query_first("SELECT CONNECTION_ID()").await.unwrap();
    conn.query_drop(format!("START TRANSACTION; INSERT INTO t VALUES ({id});"))
        .await
        .unwrap();
    (conn, pid.unwrap())
}

/// Waits until a session waits for a metadata lock in the test database: sqlnotify's DDL is
/// in the lock queue, where the application's statements would queue behind it.
async fn someone_waits_for_a_metadata_lock(db: &TestDb) {
    let sql = format!(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = '{}' \
         AND STATE LIKE 'Waiting for table metadata lock%'",
        db.name
    );
    let seen = wait_until(Duration::from_secs(10), || async {
        db.count(&sql).await > 0
    })
    .await;
    assert!(seen, "nobody queued for a metadata lock");
}

/// The application's write, by a session that waits at most 4 s for a metadata lock.
async fn app_insert(db: &TestDb, id: i64) -> Result<(), String> {
    let mut conn = db.conn().await;
    conn.query_drop("SET SESSION lock_wait_timeout = 4")
        .await
        .unwrap();
    let written = conn
        .query_drop(format!("INSERT INTO t VALUES ({id})"))
        .await
        .map_err(|e| format!("INSERT {id}: {e}"));
    let _ = conn.disconnect().await;
    written
}

/// Fails (instead of hanging) when the code under test waits for a lock without bound.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("finished instead of waiting for a lock without bound")
}

#[actix_rt::test]
async fn installing_next_to_an_open_transaction_never_holds_up_writers_and_is_bounded() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY) ENGINE=InnoDB")
        .await;
    // sqlnotify's own tables first (a watch on another table), so only the trigger waits
    db.exec("CREATE TABLE u (id INT PRIMARY KEY) ENGINE=InnoDB")
        .await;
    Notifier::builder(&db.url)
        .watch(Watch::new("u", Operation::Insert))
        .start()
        .await
        .unwrap()
        .stop()
        .await
        .unwrap();
    let builder = Notifier::builder(&db.url).watch(Watch::new("t", Operation::Insert));
    let named = names_metadata_lock_holders(&db).await;
    let table = format!("{}.t", db.name);

    let (blocker, pid) = open_writer(&db, 1).await;
    let holders: Vec<u64> = if named { vec![pid] } else { vec![] };
    let timeout = Duration::from_secs(3);
    let short = builder.clone().install_timeout(timeout);
    let (outcome, written) = bounded(async {
        tokio::join!(short.start(), async {
            someone_waits_for_a_metadata_lock(&db).await;
            app_insert(&db, 2).await
        })
    })
    .await;
    assert_lock_timeout(outcome, &table, &holders, timeout);
    written.expect("the application's insert went through while sqlnotify waited");
    assert!(!db.triggers().await.contains(&db.channel("t", "insert")));

    // the blocker commits while start() waits: start() finishes
    let mut blocker = blocker;
    let (started, written) = bounded(async {
        tokio::join!(builder.start(), async {
            someone_waits_for_a_metadata_lock(&db).await;
            let written = app_insert(&db, 3).await;
            blocker.query_drop("COMMIT").await.unwrap();
            written
        })
    })
    .await;
    written.expect("the application's insert went through while sqlnotify waited");
    let notifier = started.expect("installed once the transaction committed");
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    insert_rows(&db, "t", [4]).await;
    assert_eq!(ev.next().await.id().as_i64(), Some(4));
    notifier.stop().await.unwrap();

    // removing is bounded the same way
    let (mut blocker, pid) = open_writer(&db, 5).await;
    let holders: Vec<u64> = if named { vec![pid] } else { vec![] };
    let outcome = bounded(
        Notifier::builder(&db.url)
            .install_timeout(timeout)
            .cleanup(),
    )
    .await;
    assert_lock_timeout(outcome, &table, &holders, timeout);
    blocker.query_drop("COMMIT").await.unwrap();
    let _ = blocker.disconnect().await;
}

#[actix_rt::test]
async fn a_second_installer_waits_for_the_install_lock_at_most_the_install_timeout() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY) ENGINE=InnoDB")
        .await;
    let mut other = db.conn().await;
    let pid: Option<u64> = other.query_first("SELECT CONNECTION_ID()").await.unwrap();
    // The lock is server-wide: another test's install may hold it for a moment.
    let got: Option<i64> = other
        .query_first("SELECT GET_LOCK('sqlnotify_install', 10)")
        .await
        .unwrap();
    assert_eq!(got, Some(1));
    let timeout = Duration::from_secs(1);
    let outcome = bounded(
        Notifier::builder(&db.url)
            .watch(Watch::new("t", Operation::Insert))
            .install_timeout(timeout)
            .start(),
    )
    .await;
    assert_lock_timeout(
        outcome,
        "the sqlnotify install lock",
        &[pid.unwrap()],
        timeout,
    );
    other
        .query_drop("SELECT RELEASE_LOCK('sqlnotify_install')")
        .await
        .unwrap();
    let _ = other.disconnect().await;
}

// ---------------------------------------------------------------------------------------------
// 11. Registered consumers and retention (issue 11 §2); scenarios in common/consumers.rs
// ---------------------------------------------------------------------------------------------

consumer_scenarios!();
consumer_scenarios!(an_unnamed_listener_that_falls_behind_the_retention_gets_a_gap);

/// Users of one test (users are server-wide), dropped when it ends.
struct Users(Vec<String>);

impl Users {
    fn new(kinds: &[&str]) -> Users {
        let unique = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Users(
            kinds
                .iter()
                .map(|k| format!("sqn_{k}_{}_{unique}", std::process::id()))
                .collect(),
        )
    }

    /// `url` connecting as user `i`.
    fn url(&self, url: &str, i: usize) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}@{rest}", self.0[i])
    }

    /// Creates the users, with what an application needs in the test's database.
    async fn grant(&self, db: &TestDb) {
        for user in &self.0 {
            db.exec(&format!(
                "CREATE USER '{user}'@'%';
                 GRANT SELECT, INSERT, UPDATE, DELETE, TRIGGER ON `{}`.* TO '{user}'@'%';",
                db.name
            ))
            .await;
        }
    }

    /// The owner installs the scenarios' watches; then the consumer (user 0) and the purging
    /// application (user 1) get what an application needs and connect as users of their own.
    async fn apps<'a>(&self, db: &'a TestDb) -> common::consumers::AsRoles<'a, TestDb> {
        common::consumers::install_as_owner(db).await;
        self.grant(db).await;
        common::consumers::AsRoles {
            db,
            consumer_url: self.url(&db.url, 0),
            purger_url: self.url(&db.url, 1),
        }
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        let users: Vec<String> = self.0.iter().map(|u| format!("'{u}'@'%'")).collect();
        let sql = format!("DROP USER IF EXISTS {}", users.join(", "));
        common::on_a_runtime_of_its_own(async move {
            if let Ok(opts) = Opts::from_url(&server_url()) {
                if let Ok(mut conn) = Conn::new(opts).await {
                    let _ = conn.query_drop(sql).await;
                    let _ = conn.disconnect().await;
                }
            }
        });
    }
}

#[actix_rt::test]
async fn applications_with_users_of_their_own_keep_each_others_rows() {
    let users = Users::new(&["consumer", "purger"]);
    let db = consumer_db().await;
    let apps = users.apps(&db).await;
    common::consumers::a_stopped_consumer_gets_every_row_through_another_notifiers_purge(&apps)
        .await;
}

#[actix_rt::test]
async fn a_purge_by_another_user_expires_a_consumer_and_it_gets_a_gap() {
    let users = Users::new(&["consumer", "purger"]);
    let db = consumer_db().await;
    let apps = users.apps(&db).await;
    common::consumers::an_expired_consumer_that_comes_back_gets_a_gap(&apps).await;
}

#[actix_rt::test]
async fn upgrading_an_old_consumers_table_waits_a_few_seconds_at_most_for_its_users() {
    let db = consumer_db().await;
    db.create_old_consumer("legacy").await;
    // another session reads the table and keeps its transaction (and metadata lock) open
    let mut holder = db.conn().await;
    holder.query_drop("START TRANSACTION").await.unwrap();
    holder
        .query_drop("SELECT * FROM sqlnotify_consumers")
        .await
        .unwrap();
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .consumer("legacy");
    let e = tokio::time::timeout(Duration::from_secs(30), builder.start())
        .await
        .expect("start() waited for the open transaction")
        .unwrap_err();
    assert!(
        matches!(e, Error::Database { .. }) && e.to_string().contains("retry"),
        "{e}"
    );
    // the reader was never blocked, and once it is done the upgrade goes through
    holder
        .query_drop("SELECT * FROM sqlnotify_consumers")
        .await
        .unwrap();
    holder.query_drop("COMMIT").await.unwrap();
    let _ = holder.disconnect().await;
    let notifier = builder.start().await.unwrap();
    let legacy = notifier.consumers().await.unwrap();
    assert_eq!(
        (legacy[0].name.as_str(), legacy[0].state),
        ("legacy", sqlnotify::ConsumerState::Active)
    );
    notifier.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 12. The shared scenarios (tests/scenarios/), on a database of their own each
// ---------------------------------------------------------------------------------------------

journal_dialect_scenarios!(TestDb::new().await);

scenarios!(TestDb::new().await => old_values::old_values_and_changed_columns_on_update_and_delete);

scenarios!(TestDb::new().await => {
    context::context_comes_from_the_writers_session,
    context::unknown_context_names_are_refused_at_start,
});

/// A server that speaks MySQL's handshake and then, asked for its public key
/// (`caching_sha2_password` over plaintext), sends one that is no PEM — mysql_async panics
/// on that: `start()` fails with a database error that says so, and nothing panics.
#[actix_rt::test]
async fn a_server_whose_authentication_replies_are_malformed_is_an_error_not_a_panic() {
    use std::io::{Read, Write};

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut out = vec![n as u8, (n >> 8) as u8, (n >> 16) as u8, seq];
        out.extend_from_slice(payload);
        out
    }
    fn read_packet(stream: &mut std::net::TcpStream) -> std::io::Result<Vec<u8>> {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header)?;
        let n = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
        let mut payload = vec![0u8; n];
        stream.read_exact(&mut payload)?;
        Ok(payload)
    }
    fn serve(mut stream: std::net::TcpStream) -> std::io::Result<()> {
        // LONG_PASSWORD, LONG_FLAG, CONNECT_WITH_DB, PROTOCOL_41, TRANSACTIONS,
        // SECURE_CONNECTION, PLUGIN_AUTH, PLUGIN_AUTH_LENENC_CLIENT_DATA, DEPRECATE_EOF; no SSL.
        let caps: u32 =
            0x1 | 0x4 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x8_0000 | 0x20_0000 | 0x100_0000;
        let mut hello = vec![0x0a];
        hello.extend_from_slice(b"8.0.36-not-really\0");
        hello.extend_from_slice(&7u32.to_le_bytes());
        hello.extend_from_slice(b"abcdefgh\0");
        hello.extend_from_slice(&(caps as u16).to_le_bytes());
        hello.extend_from_slice(&[0x21, 0x02, 0x00]);
        hello.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
        hello.push(21);
        hello.extend_from_slice(&[0; 10]);
        hello.extend_from_slice(b"ijklmnopqrst\0");
        hello.extend_from_slice(b"caching_sha2_password\0");
        stream.write_all(&packet(0, &hello))?;
        read_packet(&mut stream)?; // the client's handshake response
        stream.write_all(&packet(2, &[0x01, 0x04]))?; // perform full authentication
        read_packet(&mut stream)?; // "send me your public key"
        stream.write_all(&packet(4, b"\x01this is not a PEM public key"))?;
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        Ok(())
    }

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Detached: it answers whatever connections come, and goes with the test process.
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream));
        }
    });
    let url =
        format!("mysql://app:secret@127.0.0.1:{port}/app?prefer_socket=false&ssl-mode=DISABLED");
    let builder = Notifier::builder(&url).watch(Watch::new("t", Operation::Insert));
    let e = tokio::time::timeout(Duration::from_secs(60), builder.start())
        .await
        .expect("start() ends")
        .expect_err("no MySQL server there");
    assert!(matches!(e, Error::Database { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("the MySQL driver failed on the server's replies"),
        "{text}"
    );
}

/// A consumer whose saved watermark was altered to the end of the id range (no journal gets
/// there; the cursor counts past its ids) fails to start with an error naming it and what to
/// do — it once panicked on its first read — and starts afresh once its row is deleted.
#[actix_rt::test]
async fn a_consumer_saved_at_the_end_of_the_id_range_is_an_error_not_a_panic() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .consumer("app");
    builder.start().await.unwrap().stop().await.unwrap();
    db.exec("UPDATE sqlnotify_consumers SET watermark = 9223372036854775807 WHERE name = 'app'")
        .await;
    let e = builder.start().await.expect_err("an altered position");
    assert!(matches!(e, Error::Database { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("\"app\"")
            && text.contains("9223372036854775807")
            && text.contains("sqlnotify_consumers"),
        "{text}"
    );
    db.exec("DELETE FROM sqlnotify_consumers WHERE name = 'app'")
        .await;
    let notifier = builder.start().await.unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    notifier.stop().await.unwrap();
}

/// A connection attempt the caller gives up on (here: `start()` under a timeout, against a
/// server that accepts and never greets) goes with its socket — it is not left connecting.
#[actix_rt::test]
async fn a_connection_attempt_given_up_on_closes_its_socket() {
    use std::io::Read;

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let closed = closed_tx.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 64];
                // Never greets; reads until the client closes.
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                let _ = closed.send(());
            });
        }
    });
    let url = format!("mysql://app@127.0.0.1:{port}/app?prefer_socket=false&ssl-mode=DISABLED");
    let builder = Notifier::builder(&url).watch(Watch::new("t", Operation::Insert));
    let gave_up = tokio::time::timeout(Duration::from_millis(500), builder.start()).await;
    assert!(
        gave_up.is_err(),
        "start() cannot finish against a server that never greets"
    );
    let closed =
        tokio::task::spawn_blocking(move || closed_rx.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap();
    assert!(closed.is_ok(), "the abandoned attempt kept its socket open");
}

/// Two notifiers whose URLs name different databases watch one table: the second is refused
/// — its trigger would have replaced the first's and taken its events away, silently —
/// naming the first's journal. With a channel label of its own it runs beside the first, each
/// gets every row, and a cleanup of one database leaves the other's trigger alone.
#[actix_rt::test]
async fn a_table_watched_from_two_databases_needs_a_label_and_neither_takes_the_others_events() {
    let a = TestDb::new().await;
    let b = TestDb::new().await;
    a.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let watch = || Watch::new("t", Operation::Insert).schema(&a.name);
    let first = Notifier::builder(&a.url)
        .watch(watch())
        .start()
        .await
        .unwrap();
    let e = Notifier::builder(&b.url)
        .watch(watch())
        .start()
        .await
        .unwrap_err();
    let journal = format!("`{}`.`sqlnotify_journal`", a.name);
    assert!(
        matches!(e, Error::InvalidWatch { .. }) && e.to_string().contains(&journal),
        "{e}"
    );
    let second = Notifier::builder(&b.url)
        .watch(watch().channel_label("from_b"))
        .start()
        .await
        .unwrap();
    let subscription = || Subscription::new("t", Operation::Insert).schema(&a.name);
    let mut to_first = Events::subscribe(&first, subscription()).await;
    let mut to_second = Events::subscribe(&second, subscription().channel_label("from_b")).await;
    a.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(to_first.next().await.id().as_i64(), Some(1));
    assert_eq!(to_second.next().await.id().as_i64(), Some(1));
    second.stop().await.unwrap();
    Notifier::builder(&b.url).cleanup().await.unwrap();
    a.exec("INSERT INTO t VALUES (2)").await;
    assert_eq!(to_first.next().await.id().as_i64(), Some(2));
    first.stop().await.unwrap();
}

/// A named consumer catching up on a backlog that its subscriber works through slowly saves
/// its position as it goes, not once the backlog is done: a read hands over one page (1,000
/// rows) at most, and the shell saves between reads. (A read used to go on while its pages
/// came full, waiting for room in the pipeline page after page: no save and no heartbeat for
/// the whole catch-up.)
#[actix_rt::test]
async fn mysql_a_consumer_catching_up_saves_its_position_as_it_goes() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let start = || async {
        Notifier::builder(&db.url)
            .watch(Watch::new("t", Operation::Insert))
            .consumer("slow")
            .start()
            .await
    };
    start().await.unwrap().stop().await.unwrap();
    let watermark = || async {
        db.count("SELECT `watermark` FROM sqlnotify_consumers WHERE `name` = 'slow'")
            .await
    };
    let before = watermark().await;
    // A backlog of 200 transactions of 100 rows while the consumer is stopped.
    for i in 0..200i64 {
        let values: Vec<String> = (i * 100..(i + 1) * 100)
            .map(|id| format!("({id})"))
            .collect();
        db.exec(&format!("INSERT INTO t VALUES {}", values.join(",")))
            .await;
    }
    let notifier = start().await.unwrap();
    let (_, deliveries) = notifier
        .subscribe_acked(Subscription::new("t", Operation::Insert))
        .await
        .unwrap();
    let (handled, worker) = common::slow_acker(deliveries);
    let moved = common::wait_until(Duration::from_secs(120), || async {
        watermark().await > before
    })
    .await;
    let done = handled.load(std::sync::atomic::Ordering::Relaxed);
    assert!(moved, "the position never moved");
    assert!(
        done < 10_000,
        "the position moved only once {done} of 20,000 events were handled"
    );
    notifier.stop().await.unwrap();
    worker.abort();
}
