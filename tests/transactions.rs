//! Transactions in events (issue 15 §1) on PostgreSQL: every event carries its writer's
//! transaction id (`xid8`), the same for all events of one transaction and different across
//! transactions, on every tier and capture; on the journal tiers the last event of each
//! transaction is marked, and the events of one transaction arrive together, transactions in
//! commit order — also when writers interleave their rows in the journal.

mod common;

use std::time::Duration;

use common::{Events, TestDb};
use sqlnotify::{Capture, ChangeEvent, Notifier, Operation, Subscription, Tier, Watch};
use tokio_postgres::Client;

/// How long nothing more must arrive after the expected events.
const QUIET: Duration = Duration::from_millis(300);

/// A notifier watching `op` on `t` (carrying `v`) on `tier` with `capture`, and a subscriber.
async fn start(db: &TestDb, op: Operation, tier: Tier, capture: Capture) -> (Notifier, Events) {
    let mut watch = Watch::new("t", op).extra_columns(["v"]).tier(tier);
    if tier != Tier::Notify {
        watch = watch.capture(capture);
    }
    let notifier = Notifier::builder(&db.url)
        .watch(watch)
        .start()
        .await
        .unwrap();
    let events = Events::subscribe(&notifier, Subscription::new("t", op)).await;
    (notifier, events)
}

/// The id of the transaction open on `client`.
async fn xid(client: &Client) -> u64 {
    let row = client
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap();
    row.get::<_, String>(0).parse().unwrap()
}

/// Two transactions interleave their rows (A: 1, 3, 5; B: 2, 4 — B commits first), a third is
/// rolled back, a fourth writes two rows in one statement and one more in another: each
/// event's transaction id is its writer's, and on the journal tiers B's events come first and
/// together, then A's, then the last one's, each transaction's last event marked.
async fn interleaved(tier: Tier, capture: Capture) {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        .await;
    let (notifier, mut events) = start(&db, Operation::Insert, tier, capture).await;
    let (a, b, c) = (db.client().await, db.client().await, db.client().await);
    for client in [&a, &b, &c] {
        client.batch_execute("BEGIN").await.unwrap();
    }
    a.execute("INSERT INTO t (id) VALUES (1)", &[])
        .await
        .unwrap();
    b.execute("INSERT INTO t (id) VALUES (2)", &[])
        .await
        .unwrap();
    c.execute("INSERT INTO t (id) VALUES (100)", &[])
        .await
        .unwrap();
    a.execute("INSERT INTO t (id) VALUES (3)", &[])
        .await
        .unwrap();
    b.execute("INSERT INTO t (id) VALUES (4)", &[])
        .await
        .unwrap();
    let (xa, xb) = (xid(&a).await, xid(&b).await);
    b.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    a.execute("INSERT INTO t (id) VALUES (5)", &[])
        .await
        .unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("BEGIN; INSERT INTO t (id) VALUES (6), (7); INSERT INTO t (id) VALUES (8)")
        .await
        .unwrap();
    let xd = xid(&c).await;
    c.batch_execute("COMMIT").await.unwrap();

    let got = events.take(8).await;
    let seen: Vec<(i64, u64, Option<bool>)> = got
        .iter()
        .map(|e| {
            (
                e.id().as_i64().unwrap(),
                e.transaction_id()
                    .expect("every PostgreSQL event has a transaction id"),
                e.last_in_transaction(),
            )
        })
        .collect();
    let journal = tier != Tier::Notify;
    let mark = |last: bool| journal.then_some(last);
    let want = vec![
        (2, xb, mark(false)),
        (4, xb, mark(true)),
        (1, xa, mark(false)),
        (3, xa, mark(false)),
        (5, xa, mark(true)),
        (6, xd, mark(false)),
        (7, xd, mark(false)),
        (8, xd, mark(true)),
    ];
    assert_eq!(seen, want, "{tier:?} {capture:?}");
    assert!(xa != xb && xb != xd && xa != xd);
    // the record carries them too
    let record: serde_json::Value = serde_json::from_str(&got[1].to_record()).unwrap();
    assert_eq!(record["transaction"], serde_json::json!(xb));
    assert_eq!(
        record["last_in_transaction"],
        if journal {
            serde_json::json!(true)
        } else {
            serde_json::Value::Null
        }
    );
    events.assert_none_within(QUIET).await;
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn notify_tier_events_carry_their_transaction() {
    interleaved(Tier::Notify, Capture::Row).await;
}

#[actix_rt::test]
async fn durable_tier_groups_transactions_and_marks_their_last_event() {
    interleaved(Tier::Durable, Capture::Row).await;
}

#[actix_rt::test]
async fn poll_tier_groups_transactions_and_marks_their_last_event() {
    interleaved(Tier::Poll, Capture::Row).await;
}

#[actix_rt::test]
async fn statement_capture_marks_the_last_row_of_the_last_statement() {
    interleaved(Tier::Durable, Capture::Statement).await;
}

/// A row too large for a notification keeps its transaction id: resolved from the overflow
/// table, and cut to its key when there is none.
#[actix_rt::test]
async fn oversized_rows_keep_their_transaction_id() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert).extra_columns(["v"]))
        .watch(
            Watch::new("t", Operation::Update)
                .extra_columns(["v"])
                .use_overflow_table(false),
        )
        .start()
        .await
        .unwrap();
    let mut inserts = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let mut updates = Events::subscribe(&notifier, Subscription::new("t", Operation::Update)).await;
    let client = db.client().await;
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute("INSERT INTO t VALUES (1, repeat('x', 10000))", &[])
        .await
        .unwrap();
    client
        .execute("UPDATE t SET v = repeat('y', 10000)", &[])
        .await
        .unwrap();
    let x = xid(&client).await;
    client.batch_execute("COMMIT").await.unwrap();
    let got = vec![inserts.next().await, updates.next().await];
    assert_eq!(
        got[0].get("v").and_then(|v| v.as_str()).map(str::len),
        Some(10000)
    );
    assert!(got[1].is_truncated());
    for e in &got {
        assert_eq!(e.transaction_id(), Some(x), "{}", e.to_record());
    }
    notifier.stop().await.unwrap();
}

/// Four writers, 60 transactions each, updating one to three of 12 shared rows (in id order,
/// so they wait for each other instead of deadlocking) in overlapping transactions, some
/// rolled back: on the durable tier every committed transaction arrives as one run of
/// consecutive events ending with the one marked last, no transaction id comes back after its
/// run ended, and each row's versions arrive in order.
#[actix_rt::test]
async fn concurrent_writers_transactions_arrive_whole_and_in_order() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 12)",
    )
    .await;
    let (notifier, mut events) = start(&db, Operation::Update, Tier::Durable, Capture::Row).await;
    let mut writers = Vec::new();
    for w in 0..4i32 {
        let client = db.client().await;
        writers.push(tokio::spawn(async move {
            let mut committed = 0;
            for i in 0..60i32 {
                client.batch_execute("BEGIN").await.unwrap();
                let rows = 1 + (i % 3);
                let first = 1 + (w * 5 + i * 7) % 10;
                for r in 0..rows {
                    client
                        .execute("UPDATE t SET v = v + 1 WHERE id = $1", &[&(first + r)])
                        .await
                        .unwrap();
                }
                if i % 7 == 3 {
                    client.batch_execute("ROLLBACK").await.unwrap();
                } else {
                    client.batch_execute("COMMIT").await.unwrap();
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
    let got: Vec<ChangeEvent> = events.take(expected).await;
    let (transactions, total) = common::assert_transactions_whole_and_in_order(&got);
    assert_eq!(
        transactions,
        4 * (60 - 9),
        "every committed transaction, once"
    );
    assert_eq!(total, db.count("SELECT sum(v) FROM t").await);
    events.assert_none_within(QUIET).await;
    notifier.stop().await.unwrap();
}
