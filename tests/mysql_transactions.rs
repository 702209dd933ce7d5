//! Transaction ids on MariaDB (issue 15 §1): with `mysql_transaction_ids(true)` the journal
//! records each row's transaction (transaction-precise system versioning), and events carry it:
//! one id per transaction across watches, each transaction's events together and its last one
//! marked, transactions that wrote the same rows in commit order — with interleaved and
//! concurrent writers, savepoints and rollbacks; a journal that had rows before keeps them
//! without a transaction; the purge removes the journal's history and empties MariaDB's
//! transaction registry.
//!
//! Each test has a database of its own on the server named by `SQLNOTIFY_TEST_MYSQL_URL`
//! (default `mysql://root@127.0.0.1:3306/test`, which must be MariaDB).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::mysql::TestDb;
use common::wait_until;
use mysql_async::prelude::*;
use sqlnotify::{ChangeEvent, Notifier, NotifierBuilder, Operation, Subscription, Watch};
use tokio::sync::mpsc::UnboundedReceiver;

/// How long nothing more must arrive after the expected events.
const QUIET: Duration = Duration::from_millis(500);
/// Longest wait for expected events.
const ARRIVES: Duration = Duration::from_secs(30);

fn builder(db: &TestDb) -> NotifierBuilder {
    Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert).extra_columns(["v"]))
        .watch(Watch::new("t", Operation::Update).extra_columns(["v"]))
}

/// A notifier of [`builder`] with transaction ids, whose gaps expire after 200 ms, and its
/// [`stream`].
async fn start_tracked_fast(db: &TestDb) -> (Notifier, UnboundedReceiver<ChangeEvent>) {
    let notifier = builder(db)
        .mysql_transaction_ids(true)
        .gap_timeout(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let rx = stream(&notifier).await;
    (notifier, rx)
}

/// Both watches into one stream, in arrival order.
async fn stream(notifier: &Notifier) -> UnboundedReceiver<ChangeEvent> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for op in [Operation::Insert, Operation::Update] {
        let tx = tx.clone();
        notifier
            .subscribe_fn(Subscription::new("t", op), move |e| {
                let _ = tx.send(e);
            })
            .await
            .unwrap();
    }
    rx
}

async fn take(rx: &mut UnboundedReceiver<ChangeEvent>, n: usize) -> Vec<ChangeEvent> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(ARRIVES, rx.recv()).await {
            Ok(Some(e)) => got.push(e),
            _ => panic!("{} of {n} events arrived: {:?}", got.len(), summary(&got)),
        }
    }
    got
}

async fn assert_quiet(rx: &mut UnboundedReceiver<ChangeEvent>) {
    if let Ok(Some(e)) = tokio::time::timeout(QUIET, rx.recv()).await {
        panic!("unexpected event {}", e.to_record());
    }
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
async fn events_carry_their_transaction_arrive_whole_and_mark_its_last() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL DEFAULT 0)")
        .await;
    let notifier = builder(&db)
        .mysql_transaction_ids(true)
        .start()
        .await
        .unwrap();
    let mut rx = stream(&notifier).await;
    let (mut a, mut b) = (db.conn().await, db.conn().await);

    // A takes id 1, B takes 2 and 3 and commits first, A goes on over two watches.
    a.query_drop("BEGIN").await.unwrap();
    a.query_drop("INSERT INTO t (id) VALUES (1)").await.unwrap();
    b.query_drop("BEGIN; INSERT INTO t (id) VALUES (2); INSERT INTO t (id) VALUES (3); COMMIT")
        .await
        .unwrap();
    a.query_drop("INSERT INTO t (id) VALUES (4); UPDATE t SET v = 1 WHERE id = 1; COMMIT")
        .await
        .unwrap();
    // Autocommit statements: a transaction each.
    b.query_drop("INSERT INTO t (id) VALUES (5)").await.unwrap();
    b.query_drop("INSERT INTO t (id) VALUES (6)").await.unwrap();
    // A savepoint rolled back to, then a rollback.
    a.query_drop(
        "BEGIN; INSERT INTO t (id) VALUES (7); SAVEPOINT s; INSERT INTO t (id) VALUES (8); \
         ROLLBACK TO SAVEPOINT s; INSERT INTO t (id) VALUES (9); COMMIT",
    )
    .await
    .unwrap();
    a.query_drop("BEGIN; INSERT INTO t (id) VALUES (10); ROLLBACK")
        .await
        .unwrap();

    let got = take(&mut rx, 9).await;
    let s = summary(&got);
    let tx: Vec<u64> = s.iter().map(|e| e.2.expect("a transaction id")).collect();
    let shape: Vec<(i64, &str, Option<bool>)> = s.iter().map(|e| (e.0, e.1, e.3)).collect();
    assert_eq!(
        shape,
        [
            (2, "insert", Some(false)),
            (3, "insert", Some(true)),
            (1, "insert", Some(false)),
            (4, "insert", Some(false)),
            (1, "update", Some(true)),
            (5, "insert", Some(true)),
            (6, "insert", Some(true)),
            (7, "insert", Some(false)),
            (9, "insert", Some(true)),
        ],
        "{s:?}"
    );
    assert_eq!(tx[0], tx[1]);
    assert_eq!((tx[2], tx[2]), (tx[3], tx[4]));
    assert_eq!(tx[7], tx[8]);
    let distinct: HashSet<u64> = [tx[0], tx[2], tx[5], tx[6], tx[7]].into();
    assert_eq!(distinct.len(), 5, "one id per transaction: {s:?}");
    assert_quiet(&mut rx).await;

    // A notifier that did not ask reads them too: the journal records them for everyone.
    let other = builder(&db).start().await.unwrap();
    let mut rx2 = stream(&other).await;
    a.query_drop("BEGIN; INSERT INTO t (id) VALUES (11); INSERT INTO t (id) VALUES (12); COMMIT")
        .await
        .unwrap();
    let got = summary(&take(&mut rx2, 2).await);
    assert!(got[0].2.is_some() && got[0].2 == got[1].2, "{got:?}");
    assert_eq!((got[0].3, got[1].3), (Some(false), Some(true)));
    other.stop().await.unwrap();
    notifier.stop().await.unwrap();
}

/// On the versioned journal too, a transaction that stays open for many gap timeouts is
/// waited for (its uncommitted row is seen): its events arrive, whole, when it commits.
#[actix_rt::test]
async fn a_transaction_open_for_many_gap_timeouts_is_waited_for() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL DEFAULT 0)")
        .await;
    let (notifier, mut rx) = start_tracked_fast(&db).await;
    let mut a = db.conn().await;
    a.query_drop("BEGIN").await.unwrap();
    a.query_drop("INSERT INTO t (id) VALUES (1)").await.unwrap();
    db.exec("INSERT INTO t (id) VALUES (2)").await;
    let got = take(&mut rx, 1).await;
    assert_eq!(got[0].id().as_i64(), Some(2));
    // Ten gap timeouts with nothing else to read: the listener checks A's gap again and again.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .is_err(),
        "nothing arrives while A is open"
    );
    a.query_drop("INSERT INTO t (id) VALUES (3); COMMIT")
        .await
        .unwrap();
    let got = take(&mut rx, 2).await;
    let tx = got[0].transaction_id();
    assert!(tx.is_some(), "{:?}", summary(&got));
    assert_eq!(
        summary(&got),
        [
            (1, "insert", tx, Some(false)),
            (3, "insert", tx, Some(true))
        ]
    );
    assert_quiet(&mut rx).await;
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_journal_that_had_rows_keeps_them_without_a_transaction() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL DEFAULT 0)")
        .await;
    let plain = builder(&db).consumer("c").start().await.unwrap();
    let mut rx = stream(&plain).await;
    db.exec("INSERT INTO t (id) VALUES (1)").await;
    assert_eq!(summary(&take(&mut rx, 1).await)[0].2, None);
    plain.stop().await.unwrap();
    // Written while nobody listens, before the journal records transactions.
    db.exec("BEGIN; INSERT INTO t (id) VALUES (2); INSERT INTO t (id) VALUES (3); COMMIT")
        .await;

    let notifier = builder(&db)
        .consumer("c")
        .mysql_transaction_ids(true)
        .start()
        .await
        .unwrap();
    let mut rx = stream(&notifier).await;
    let comment = db
        .strings(&format!(
            "SELECT TABLE_COMMENT FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME = 'sqlnotify_journal'",
            db.name
        ))
        .await;
    let head = db.count("SELECT MAX(id) FROM sqlnotify_journal").await;
    assert_eq!(
        comment,
        [format!("sqlnotify: transactions recorded after id {head}")]
    );
    db.exec("BEGIN; INSERT INTO t (id) VALUES (4); INSERT INTO t (id) VALUES (5); COMMIT")
        .await;
    let got = summary(&take(&mut rx, 4).await);
    assert_eq!(
        got[..2],
        [(2, "insert", None, None), (3, "insert", None, None)],
        "{got:?}"
    );
    assert!(got[2].2.is_some() && got[2].2 == got[3].2, "{got:?}");
    assert_eq!((got[2].3, got[3].3), (Some(false), Some(true)));
    assert_quiet(&mut rx).await;
    // A browser stream's replay of the same rows (from before the first) says the same: the
    // rows from before the journal recorded transactions have none. (They all carry the
    // transaction that added the column, and read as one transaction.)
    #[cfg(all(feature = "bench", feature = "web"))]
    {
        let replayed = sqlnotify::bench_support::replay_transactions(&notifier, "0@0:0:", 100)
            .await
            .unwrap()
            .expect("a replay");
        let ids: Vec<i64> = replayed.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), 5, "{replayed:?}");
        assert!(
            replayed[..3].iter().all(|(_, tx)| tx.is_none()),
            "{replayed:?}"
        );
        assert!(
            replayed[3].1.is_some() && replayed[3].1 == replayed[4].1,
            "{replayed:?}"
        );
    }
    notifier.stop().await.unwrap();
}

/// Four writers, 60 transactions each, updating one to three of 12 shared rows (in id order,
/// so they wait for each other instead of deadlocking) in overlapping transactions, one in
/// seven rolled back: every committed transaction arrives as one run of consecutive events
/// ending with the one marked last, no transaction id comes back after its run ended, and each
/// row's versions arrive in order.
#[actix_rt::test]
async fn concurrent_writers_transactions_arrive_whole_and_in_order() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL DEFAULT 0);
         INSERT INTO t (id) VALUES (1),(2),(3),(4),(5),(6),(7),(8),(9),(10),(11),(12)",
    )
    .await;
    let notifier = builder(&db)
        .mysql_transaction_ids(true)
        .start()
        .await
        .unwrap();
    let mut rx = stream(&notifier).await;
    let mut writers = Vec::new();
    for w in 0..4i32 {
        let mut conn = db.conn().await;
        writers.push(tokio::spawn(async move {
            let mut committed = 0;
            for i in 0..60i32 {
                conn.query_drop("BEGIN").await.unwrap();
                let rows = 1 + (i % 3);
                let first = 1 + (w * 5 + i * 7) % 10;
                for r in 0..rows {
                    conn.exec_drop("UPDATE t SET v = v + 1 WHERE id = ?", (first + r,))
                        .await
                        .unwrap();
                }
                if i % 7 == 3 {
                    conn.query_drop("ROLLBACK").await.unwrap();
                } else {
                    conn.query_drop("COMMIT").await.unwrap();
                    committed += rows as usize;
                }
            }
            committed
        }));
    }
    let mut expected = 0;
    for w in writers {
        expected += w.await.unwrap();
    }
    let got = take(&mut rx, expected).await;
    let (transactions, total) = common::assert_transactions_whole_and_in_order(&got);
    assert_eq!(
        transactions,
        4 * (60 - 9),
        "every committed transaction, once"
    );
    assert_eq!(
        total,
        db.count("SELECT CAST(SUM(v) AS SIGNED) FROM t").await
    );
    assert_quiet(&mut rx).await;
    notifier.stop().await.unwrap();
}

/// A transaction whose rows' payloads together exceed what a read holds at once (70 rows of
/// 1 MiB against 64 MiB): every row arrives once, in order, one transaction with its last row
/// marked and no other — and the listener received them in shares of at most 64 MiB, the first
/// handed over before the rest was fetched (a read once held all 70 MiB: one share).
#[actix_rt::test]
async fn a_transaction_larger_than_a_read_holds_arrives_whole_in_shares() {
    const ROWS: i64 = 70;
    const SIZE: usize = common::mysql::LARGE_SIZE;
    let db = TestDb::new().await;
    common::mysql::create_large_table(&db, "big").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("big", Operation::Insert).extra_columns(["big"]))
        .mysql_transaction_ids(true)
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
    common::mysql::insert_large_rows(&db, "big", ROWS).await;

    let got = take(&mut rx, ROWS as usize).await;
    let ids: Vec<i64> = got.iter().map(|e| e.id().as_i64().unwrap()).collect();
    assert_eq!(
        ids,
        (1..=ROWS).collect::<Vec<_>>(),
        "each row once, in order"
    );
    for (e, id) in got.iter().zip(1..) {
        let big = e.get("big").and_then(|v| v.as_str()).expect("the value");
        assert!(
            big.len() == SIZE && big.chars().all(|c| c == common::mysql::large_letter(id)),
            "row {id}'s own payload"
        );
        assert!(!e.is_truncated(), "row {id}");
    }
    let transactions: HashSet<Option<u64>> = got.iter().map(|e| e.transaction_id()).collect();
    assert_eq!(transactions.len(), 1, "one transaction");
    assert!(got[0].transaction_id().is_some());
    let marks: Vec<Option<bool>> = got.iter().map(|e| e.last_in_transaction()).collect();
    let mut want = vec![Some(false); ROWS as usize - 1];
    want.push(Some(true));
    assert_eq!(marks, want, "only the last row is marked last");

    let shares = common::mysql::shares(&got);
    assert!(shares.len() >= 2, "handed over in shares: {shares:?}");
    // Each payload is its `big` value and a few bytes more.
    assert!(
        shares
            .iter()
            .all(|&(_, bytes)| bytes < common::mysql::READ_BYTES),
        "no share held more than the budget: {shares:?}"
    );
    assert_quiet(&mut rx).await;
    notifier.stop().await.unwrap();
}

/// A read that found more rows than it takes at once (10,000) completes the transactions it
/// began — and delivers first every transaction that ends before them: here one that updated
/// a row between the long transaction's rows and committed before the long one updated it
/// again. It once came in the next read, after the long transaction: its update arrived after
/// the one that followed it.
#[actix_rt::test]
async fn a_transaction_between_the_rows_of_a_long_one_comes_first_in_commit_order() {
    const LONG: i64 = 10_000;
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL DEFAULT 0)")
        .await;
    let ids: Vec<String> = (0..=LONG).map(|id| format!("({id})")).collect();
    db.exec(&format!("INSERT INTO t (id) VALUES {}", ids.join(", ")))
        .await;
    let start = || async {
        Notifier::builder(&db.url)
            .watch(Watch::new("t", Operation::Update).extra_columns(["v"]))
            .mysql_transaction_ids(true)
            .consumer("c")
            .start()
            .await
    };
    // Registered: the next start reads from here, once subscribed, in one read.
    start().await.unwrap().stop().await.unwrap();
    let (mut a, mut b) = (db.conn().await, db.conn().await);
    a.query_drop(format!(
        "BEGIN; UPDATE t SET v = 5 WHERE id BETWEEN 1 AND {LONG}"
    ))
    .await
    .unwrap();
    b.query_drop("UPDATE t SET v = 1 WHERE id = 0")
        .await
        .unwrap();
    a.query_drop("UPDATE t SET v = 2 WHERE id = 0; COMMIT")
        .await
        .unwrap();

    let notifier = start().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    notifier
        .subscribe_fn(Subscription::new("t", Operation::Update), move |e| {
            let _ = tx.send(e);
        })
        .await
        .unwrap();
    let got = take(&mut rx, LONG as usize + 2).await;
    let shape = |e: &ChangeEvent| {
        (
            e.id().as_i64().unwrap(),
            e.get("v").and_then(|v| v.as_i64()).unwrap(),
            e.last_in_transaction(),
        )
    };
    assert_eq!(
        shape(&got[0]),
        (0, 1, Some(true)),
        "the short transaction first"
    );
    for (e, id) in got[1..=LONG as usize].iter().zip(1..) {
        assert_eq!(shape(e), (id, 5, Some(false)));
    }
    assert_eq!(shape(&got[LONG as usize + 1]), (0, 2, Some(true)));
    let long: HashSet<Option<u64>> = got[1..].iter().map(|e| e.transaction_id()).collect();
    assert_eq!(long.len(), 1, "the long transaction's rows together");
    assert_ne!(got[0].transaction_id(), got[1].transaction_id());
    assert_quiet(&mut rx).await;
    notifier.stop().await.unwrap();
}

/// A read hands a transaction over share by share (at most 1,000 rows each), fetching each
/// share's payloads in turn: when its connection is lost between two shares, the next read
/// hands over the rest of that transaction before anything else — here before a transaction
/// whose journal row lies below the rest and which committed meanwhile. Every row arrives
/// once, the long transaction's rows together, its last one marked.
#[actix_rt::test]
async fn a_transaction_cut_by_a_lost_connection_is_finished_before_anything_else() {
    const LONG: i64 = 2_500;
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .mysql_transaction_ids(true)
        .max_in_flight(1_024)
        .start()
        .await
        .unwrap();
    // Nothing is taken from it until the connection is killed: the listener stalls for room
    // in the pipeline (1,024 events) after its first share.
    let (_, mut deliveries) = notifier
        .subscribe_acked(Subscription::new("t", Operation::Insert).buffer(1))
        .await
        .unwrap();
    let (mut short, mut long) = (db.conn().await, db.conn().await);
    // The short transaction takes the lowest journal id and commits after the long one was read.
    short
        .query_drop("BEGIN; INSERT INTO t VALUES (0)")
        .await
        .unwrap();
    let values: Vec<String> = (1..=LONG).map(|id| format!("({id})")).collect();
    long.query_drop(format!(
        "BEGIN; INSERT INTO t VALUES {}; COMMIT",
        values.join(", ")
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    let first = tokio::time::timeout(ARRIVES, deliveries.recv())
        .await
        .expect("the first share")
        .unwrap();
    got.push(first.event);
    first.ack.ack();
    short.query_drop("COMMIT").await.unwrap();
    // Kill the notifier's connections (every one to this database but the test's own).
    let mine: Vec<u64> = vec![
        short
            .query_first("SELECT CONNECTION_ID()")
            .await
            .unwrap()
            .unwrap(),
        long.query_first("SELECT CONNECTION_ID()")
            .await
            .unwrap()
            .unwrap(),
    ];
    let theirs: Vec<u64> = short
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = ?",
            (&db.name,),
        )
        .await
        .unwrap();
    let theirs: Vec<u64> = theirs.into_iter().filter(|id| !mine.contains(id)).collect();
    assert!(!theirs.is_empty(), "the listener's connection");
    for id in theirs {
        let _ = short.query_drop(format!("KILL CONNECTION {id}")).await;
    }
    while got.len() < LONG as usize + 1 {
        let delivery = tokio::time::timeout(ARRIVES, deliveries.recv())
            .await
            .unwrap_or_else(|_| panic!("{} events arrived", got.len()))
            .unwrap();
        got.push(delivery.event);
        delivery.ack.ack();
    }
    let shape: Vec<(i64, Option<bool>)> = got
        .iter()
        .map(|e| (e.id().as_i64().unwrap(), e.last_in_transaction()))
        .collect();
    let mut want: Vec<(i64, Option<bool>)> = (1..LONG).map(|id| (id, Some(false))).collect();
    want.push((LONG, Some(true)));
    want.push((0, Some(true)));
    assert_eq!(
        shape.iter().position(|&(id, _)| id == 0),
        Some(LONG as usize),
        "the short transaction after the whole long one"
    );
    assert_eq!(shape, want);
    assert!(
        notifier.stats().await.unwrap().restarts >= 1,
        "the listener's session failed"
    );
    let _ = (short.disconnect().await, long.disconnect().await);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn the_purge_removes_the_journals_history_and_empties_the_transaction_registry() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL DEFAULT 0)")
        .await;
    let notifier = builder(&db)
        .mysql_transaction_ids(true)
        .start()
        .await
        .unwrap();
    let mut rx = stream(&notifier).await;
    db.exec("BEGIN; INSERT INTO t (id) VALUES (1); INSERT INTO t (id) VALUES (2); COMMIT")
        .await;
    let tx = take(&mut rx, 2).await[0].transaction_id().unwrap();
    let registered =
        format!("SELECT COUNT(*) FROM mysql.transaction_registry WHERE transaction_id = {tx}");
    assert_eq!(db.count(&registered).await, 1, "MariaDB registers it");
    for id in 3..=5 {
        db.exec(&format!("INSERT INTO t (id) VALUES ({id})")).await;
    }
    take(&mut rx, 3).await;

    // Another notifier purges everything but the newest row.
    let purger = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Delete))
        .retention(Duration::from_millis(1))
        .purge_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let history = "SELECT COUNT(*) FROM sqlnotify_journal FOR SYSTEM_TIME ALL";
    let purged = wait_until(ARRIVES, || async {
        db.count("SELECT COUNT(*) FROM sqlnotify_journal").await == 1
            && db.count(history).await == 1
            && db.count(&registered).await == 0
    })
    .await;
    assert!(
        purged,
        "journal {} rows, {} with history, registry has the transaction: {}",
        db.count("SELECT COUNT(*) FROM sqlnotify_journal").await,
        db.count(history).await,
        db.count(&registered).await
    );
    // Events keep flowing with their transactions after the registry was emptied.
    db.exec("BEGIN; INSERT INTO t (id) VALUES (6); INSERT INTO t (id) VALUES (7); COMMIT")
        .await;
    let got = summary(&take(&mut rx, 2).await);
    assert!(got[0].2.is_some() && got[0].2 == got[1].2, "{got:?}");
    purger.stop().await.unwrap();
    notifier.stop().await.unwrap();
}

/// A transaction left open past the gap timeout holds the watermark, while other writers roll
/// back inserts above it (each burns a journal id: a gap) and commit. The burned gaps above
/// the held one are given up after the gap timeout, though the watermark stays below the open
/// transaction; and a read never gets stuck on rows it has read already — past 64 gaps the
/// read's condition used to merge the rest into one range up to the highest id read, and with
/// 10,000 rows read there each read took only those (defect: the marker never arrived while
/// the transaction was open).
#[actix_rt::test]
async fn burned_ids_above_a_transaction_held_open_do_not_stop_delivery() {
    const ROUNDS: i64 = 70;
    const BULK: i64 = 12_000;
    const MARKER: i64 = 1_000_000;
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL DEFAULT 0)")
        .await;
    let (notifier, mut rx) = start_tracked_fast(&db).await;
    let mut held = db.conn().await;
    held.query_drop("BEGIN; INSERT INTO t (id) VALUES (1)")
        .await
        .unwrap();
    let mut other = db.conn().await;
    let mut expected: Vec<i64> = Vec::new();
    for round in 0..ROUNDS {
        other
            .query_drop(format!(
                "BEGIN; INSERT INTO t (id) VALUES ({}); ROLLBACK",
                500_000 + round
            ))
            .await
            .unwrap();
        let id = 100 + round;
        other
            .query_drop(format!("INSERT INTO t (id) VALUES ({id})"))
            .await
            .unwrap();
        expected.push(id);
    }
    // The gaps are noticed, and the open transaction's is held, before the bulk comes.
    let first = take(&mut rx, ROUNDS as usize).await;
    for chunk in (0..BULK).collect::<Vec<_>>().chunks(1_000) {
        let values: Vec<String> = chunk.iter().map(|i| format!("({})", 10_000 + i)).collect();
        other
            .query_drop(format!("INSERT INTO t (id) VALUES {}", values.join(", ")))
            .await
            .unwrap();
        expected.extend(chunk.iter().map(|i| 10_000 + i));
    }
    other
        .query_drop(format!("INSERT INTO t (id) VALUES ({MARKER})"))
        .await
        .unwrap();
    expected.push(MARKER);
    let rest = take(&mut rx, expected.len() - ROUNDS as usize).await;
    let got: Vec<i64> = first
        .iter()
        .chain(&rest)
        .map(|e| e.id().as_i64().unwrap())
        .collect();
    assert_eq!(got, expected, "each committed row once, in order");
    assert_quiet(&mut rx).await;
    held.query_drop("COMMIT").await.unwrap();
    let late = take(&mut rx, 1).await;
    assert_eq!(late[0].id().as_i64(), Some(1), "the held transaction's row");
    assert_quiet(&mut rx).await;
    let _ = (held.disconnect().await, other.disconnect().await);
    notifier.stop().await.unwrap();
}
