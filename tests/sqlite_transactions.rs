//! Transaction ids on SQLite (issue 15 §1): a connection that calls
//! `sqlnotify::sqlite_transactions::track` gives every event of one transaction the same id
//! and every transaction another one, the last event of each marked — across watches,
//! autocommit statements, savepoints rolled back to and rollbacks; connections that do not
//! track write as before and their events say `None`.

mod common;

use std::time::Duration;

use common::sqlite_file::SqliteFile;
use rusqlite::Connection;
use sqlnotify::{ChangeEvent, Notifier, Operation, Subscription, Watch};

/// How long nothing more must arrive after the expected events.
const QUIET: Duration = Duration::from_millis(300);

fn writer(db: &SqliteFile) -> Connection {
    let conn = Connection::open(&db.path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

/// (row id, operation, transaction id, last mark) of each event.
fn summary(events: &[ChangeEvent]) -> Vec<(i64, &'static str, Option<u64>, Option<bool>)> {
    events
        .iter()
        .map(|e| {
            (
                e.id().as_i64().unwrap(),
                e.operation().as_str(),
                e.transaction_id(),
                e.last_in_transaction(),
            )
        })
        .collect()
}

#[actix_rt::test]
async fn tracked_connections_give_each_transaction_one_id_and_mark_its_last_event() {
    let db =
        SqliteFile::new("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert).extra_columns(["v"]))
        .watch(Watch::new("t", Operation::Update).extra_columns(["v"]))
        .start()
        .await
        .unwrap();
    // Both watches into one channel, in arrival order: every `subscribe_fn` closure of a
    // notifier runs in one actor on its arbiter, a routed batch's events for all of them in
    // one message, so they arrive in the order the listener read them — commit order.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for op in [Operation::Insert, Operation::Update] {
        let tx = tx.clone();
        notifier
            .subscribe_fn(Subscription::new("t", op), move |e| {
                let _ = tx.send(e);
            })
            .await
            .unwrap();
    }
    let (mut a, mut c, b) = (writer(&db), writer(&db), writer(&db));
    sqlnotify::sqlite_transactions::track(&a).unwrap();
    sqlnotify::sqlite_transactions::track(&a).unwrap(); // twice does no harm
    sqlnotify::sqlite_transactions::track(&c).unwrap();

    // A: one transaction over two watches.
    let tx = a.transaction().unwrap();
    tx.execute("INSERT INTO t (id) VALUES (1)", []).unwrap();
    tx.execute("INSERT INTO t (id) VALUES (2)", []).unwrap();
    tx.execute("UPDATE t SET v = 1 WHERE id = 1", []).unwrap();
    tx.commit().unwrap();
    // C: an autocommit statement is a transaction of its own; so is the next one.
    c.execute("INSERT INTO t (id) VALUES (3)", []).unwrap();
    c.execute("INSERT INTO t (id) VALUES (4)", []).unwrap();
    // A: a savepoint rolled back to, the first row of the transaction with it.
    let mut tx = a.transaction().unwrap();
    {
        let sp = tx.savepoint().unwrap();
        sp.execute("INSERT INTO t (id) VALUES (5)", []).unwrap();
        // dropped: rolled back
    }
    tx.execute("INSERT INTO t (id) VALUES (6)", []).unwrap();
    tx.execute("INSERT INTO t (id) VALUES (7)", []).unwrap();
    tx.commit().unwrap();
    // C: rolled back — no event, and the next transaction gets an id of its own.
    let tx = c.transaction().unwrap();
    tx.execute("INSERT INTO t (id) VALUES (8)", []).unwrap();
    tx.rollback().unwrap();
    let tx = c.transaction().unwrap();
    tx.execute("INSERT INTO t (id) VALUES (9)", []).unwrap();
    tx.execute("INSERT INTO t (id) VALUES (10)", []).unwrap();
    tx.commit().unwrap();
    // B does not track: its write works as ever, its event has no transaction.
    b.execute("INSERT INTO t (id) VALUES (11)", []).unwrap();

    let mut got = Vec::new();
    while got.len() < 10 {
        let event = tokio::time::timeout(common::ARRIVES_WITHIN, rx.recv())
            .await
            .expect("an event should have arrived")
            .unwrap();
        got.push(event);
    }
    assert!(
        tokio::time::timeout(QUIET, rx.recv()).await.is_err(),
        "nothing more (no rolled-back row)"
    );
    // As they arrived (before, sorted by sequence first: out-of-order delivery passed).
    let sequences: Vec<Option<i64>> = got.iter().map(|e| e.sequence()).collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "arrival in journal order: {sequences:?}"
    );
    let s = summary(&got);
    let rows: Vec<(i64, &str)> = s.iter().map(|(id, op, ..)| (*id, *op)).collect();
    assert_eq!(
        rows,
        [
            (1, "insert"),
            (2, "insert"),
            (1, "update"),
            (3, "insert"),
            (4, "insert"),
            (6, "insert"),
            (7, "insert"),
            (9, "insert"),
            (10, "insert"),
            (11, "insert")
        ],
        "commit order"
    );
    let tx: Vec<Option<u64>> = s.iter().map(|e| e.2).collect();
    let marks: Vec<Option<bool>> = s.iter().map(|e| e.3).collect();
    let groups = [&tx[0..3], &tx[3..4], &tx[4..5], &tx[5..7], &tx[7..9]];
    for group in groups {
        assert!(group[0].is_some(), "{s:?}");
        assert!(
            group.iter().all(|t| *t == group[0]),
            "one id per transaction: {s:?}"
        );
    }
    let mut ids: Vec<u64> = groups.iter().map(|g| g[0].unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 5, "another id for every transaction: {s:?}");
    assert_eq!(tx[9], None, "an untracked connection: {s:?}");
    assert_eq!(
        marks,
        [
            Some(false),
            Some(false),
            Some(true),
            Some(true),
            Some(true),
            Some(false),
            Some(true),
            Some(false),
            Some(true),
            None
        ],
        "{s:?}"
    );
    drop((a, b, c));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn tracking_before_the_journal_exists_is_a_clear_error_and_breaks_no_write() {
    let db = SqliteFile::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let conn = writer(&db);
    let err = sqlnotify::sqlite_transactions::track(&conn).unwrap_err();
    assert!(
        matches!(&err, sqlnotify::Error::UnknownTable { table, .. } if table.contains("sqlnotify_journal")),
        "{err}"
    );
    conn.execute("INSERT INTO t (id) VALUES (1)", []).unwrap();
}

/// A tracked transaction larger than the whole in-flight budget (read whole, to mark its last
/// row) reaches the subscriber in parts instead of waiting forever for room it can never
/// have: every row once, in order, one transaction id, only the last marked.
#[actix_rt::test]
async fn a_transaction_larger_than_the_in_flight_budget_is_delivered_whole() {
    const ROWS: i64 = 5_000;
    let db = SqliteFile::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert))
        .max_in_flight(1) // raised to the smallest budget there is (1,024 events)
        .start()
        .await
        .unwrap();
    let mut events =
        common::Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let mut conn = writer(&db);
    sqlnotify::sqlite_transactions::track(&conn).unwrap();
    let tx = conn.transaction().unwrap();
    for id in 1..=ROWS {
        tx.execute("INSERT INTO t (id) VALUES (?1)", [id]).unwrap();
    }
    tx.commit().unwrap();

    let got = events.take(ROWS as usize).await;
    let s = summary(&got);
    let ids: Vec<i64> = s.iter().map(|e| e.0).collect();
    assert_eq!(ids, (1..=ROWS).collect::<Vec<_>>());
    let txid = s[0].2;
    assert!(txid.is_some());
    assert!(s.iter().all(|e| e.2 == txid), "one transaction id");
    let marked: Vec<i64> = s
        .iter()
        .filter(|e| e.3 == Some(true))
        .map(|e| e.0)
        .collect();
    assert_eq!(marked, vec![ROWS], "only the last row is marked last");
    events.assert_none_within(QUIET).await;
    notifier.stop().await.unwrap();
}

/// Rows larger than what one journal read may hold (64 MiB of payloads, or one row larger):
/// three rows of 40 MiB in one tracked transaction, then a small row. The reads end between
/// the transaction's rows; its events still arrive whole, in order, once, with one
/// transaction id and its last one marked, and the small row after them.
#[actix_rt::test]
async fn rows_larger_than_a_reads_bytes_arrive_whole_in_order_once() {
    const BIG: usize = 40 << 20;
    let db = SqliteFile::new("CREATE TABLE big (id INTEGER PRIMARY KEY, body TEXT NOT NULL)");
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("big", Operation::Insert).extra_columns(["body"]))
        .start()
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    notifier
        .subscribe_fn(Subscription::new("big", Operation::Insert), move |e| {
            let _ = tx.send(e);
        })
        .await
        .unwrap();
    let body = |id: i64| char::from(b'a' + id as u8).to_string().repeat(BIG);
    let path = db.path.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(30)).unwrap();
        sqlnotify::sqlite_transactions::track(&conn).unwrap();
        let tx = conn.transaction().unwrap();
        for id in 1..=3 {
            tx.execute(
                "INSERT INTO big (id, body) VALUES (?1, ?2)",
                rusqlite::params![id, body(id)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        conn.execute("INSERT INTO big (id, body) VALUES (4, 'small')", [])
            .unwrap();
    })
    .await
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("an event should have arrived")
            .unwrap();
        got.push(event);
    }
    assert!(
        tokio::time::timeout(QUIET, rx.recv()).await.is_err(),
        "each row once"
    );
    let s = summary(&got);
    let ids: Vec<i64> = s.iter().map(|e| e.0).collect();
    assert_eq!(ids, [1, 2, 3, 4], "in order");
    for (event, id) in got.iter().zip(1..=3) {
        let text = event.get("body").and_then(|v| v.as_str()).expect("a body");
        assert!(
            text.len() == BIG && text.bytes().all(|b| b == b'a' + id as u8),
            "row {id} whole: {} bytes",
            text.len()
        );
    }
    assert_eq!(got[3].get("body").and_then(|v| v.as_str()), Some("small"));
    assert!(s[0].2.is_some());
    assert!(
        s[..3].iter().all(|e| e.2 == s[0].2),
        "one transaction: {s:?}"
    );
    assert_ne!(s[3].2, s[0].2, "the small row's transaction is another");
    // Each read held one big row (a second would take it past 64 MiB), so two reads ended
    // inside the transaction: a row a read ended on says it does not know whether it is the
    // last (`None`); the last row says it is. (Read whole, rows 1 and 2 said `Some(false)`.)
    let marks: Vec<Option<bool>> = s.iter().map(|e| e.3).collect();
    assert_eq!(marks, [None, None, Some(true), Some(true)], "{s:?}");
    notifier.stop().await.unwrap();
}
