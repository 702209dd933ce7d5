//! Named consumers resuming after a restart on journal dialects and tiers: what was written
//! while a consumer was down arrives once when it comes back; a consumer new to the database
//! and an unnamed notifier start at the head.

use std::time::Duration;

use sqlnotify::{ChangeEvent, ConsumerPosition, Notifier, Operation, Subscription};
use tokio::sync::mpsc;

use crate::common::backend::Backend;
use crate::common::consumers::ConsumerDb;
use crate::common::{wait_until, Forward, ARRIVES_WITHIN};

/// Starts a notifier on `t` inserts (as consumer `consumer`, if any) with a `Forward` actor
/// subscribed on the builder, so nothing replayed can pass before it.
async fn start_forwarding(
    db: &impl Backend,
    consumer: Option<&str>,
) -> (Notifier, mpsc::UnboundedReceiver<ChangeEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut builder = db
        .builder()
        .watch(db.watch("t", Operation::Insert))
        .subscribe(
            Subscription::new("t", Operation::Insert),
            Forward(tx).start_actor().recipient(),
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
            .unwrap_or_else(|_| panic!("only {out:?} of {n} events arrived"))
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

/// A named consumer gets what was written while it was stopped, once, then new rows; a
/// restart with nothing written in between replays nothing.
pub async fn a_named_consumer_resumes_where_it_stopped(db: &impl Backend) {
    db.run("CREATE TABLE t (id INTEGER PRIMARY KEY)").await;
    let (notifier, mut rx) = start_forwarding(db, Some("billing")).await;
    db.insert_ids("t", 1..=3).await;
    assert_eq!(take_ids(&mut rx, 3).await, [1, 2, 3]);
    notifier.stop().await.unwrap();
    assert_drained(&mut rx);

    // written while nobody listens
    db.insert_ids("t", 4..=8).await;

    let (notifier, mut rx) = start_forwarding(db, Some("billing")).await;
    assert_eq!(take_ids(&mut rx, 5).await, [4, 5, 6, 7, 8]);
    db.run("INSERT INTO t VALUES (9)").await;
    assert_eq!(
        take_ids(&mut rx, 1).await,
        [9],
        "no duplicates, nothing missing"
    );
    assert_drained(&mut rx);
    notifier.stop().await.unwrap();

    // and once more, with nothing written in between: nothing replayed
    let (notifier, mut rx) = start_forwarding(db, Some("billing")).await;
    db.run("INSERT INTO t VALUES (10)").await;
    assert_eq!(take_ids(&mut rx, 1).await, [10]);
    assert_drained(&mut rx);
    notifier.stop().await.unwrap();
}

/// A consumer new to the database does not replay the history, not even after a quick
/// restart, nor does an unnamed notifier, while an old consumer gets everything it missed.
pub async fn a_new_consumer_and_an_unnamed_notifier_start_at_the_head(db: &impl Backend) {
    db.run("CREATE TABLE t (id INTEGER PRIMARY KEY)").await;
    // history: rows 1..5 in the journal
    let (notifier, mut rx) = start_forwarding(db, Some("old")).await;
    db.insert_ids("t", 1..=5).await;
    assert_eq!(take_ids(&mut rx, 5).await, [1, 2, 3, 4, 5]);
    notifier.stop().await.unwrap();
    db.insert_ids("t", 6..=7).await;
    assert!(db.journal_rows().await >= 7);

    for id in [100, 101] {
        let (notifier, mut rx) = start_forwarding(db, Some("brand-new")).await;
        db.run(&format!("INSERT INTO t VALUES ({id})")).await;
        assert_eq!(take_ids(&mut rx, 1).await, [id]);
        assert_drained(&mut rx);
        notifier.stop().await.unwrap();
    }

    let (notifier, mut rx) = start_forwarding(db, None).await;
    db.run("INSERT INTO t VALUES (1000)").await;
    assert_eq!(take_ids(&mut rx, 1).await, [1000]);
    assert_drained(&mut rx);
    notifier.stop().await.unwrap();

    let (notifier, mut rx) = start_forwarding(db, Some("old")).await;
    assert_eq!(take_ids(&mut rx, 5).await, [6, 7, 100, 101, 1000]);
    db.run("INSERT INTO t VALUES (1001)").await;
    assert_eq!(take_ids(&mut rx, 1).await, [1001]);
    assert_drained(&mut rx);
    notifier.stop().await.unwrap();
}

/// A running consumer saves its position up to the last row it handed over without waiting
/// for the next commit (a crash would otherwise replay everything since the previous save).
/// Journal-id dialects (SQLite, MySQL).
pub async fn a_running_consumer_saves_its_cursor_while_the_database_is_idle<D>(db: &D)
where
    D: Backend + ConsumerDb,
{
    db.run("CREATE TABLE t (id INTEGER PRIMARY KEY)").await;
    let (notifier, mut rx) = start_forwarding(db, Some("idle")).await;
    db.insert_ids("t", 1..=3).await;
    assert_eq!(take_ids(&mut rx, 3).await, [1, 2, 3]);
    let last = ConsumerPosition::JournalId(db.journal_head().await);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            db.saved_position("idle").await == last
        })
        .await,
        "saved position {} never reached {last} while running",
        db.saved_position("idle").await
    );
    notifier.stop().await.unwrap();
    assert_drained(&mut rx);
}

/// Starts notifier `consumer` on `t` inserts with an acknowledged subscription.
async fn start_acked(db: &impl Backend, consumer: &str) -> (Notifier, sqlnotify::Deliveries) {
    let notifier = db
        .builder()
        .watch(db.watch("t", Operation::Insert))
        .consumer(consumer)
        .start()
        .await
        .unwrap();
    let (_, deliveries) = notifier
        .subscribe_acked(Subscription::new("t", Operation::Insert))
        .await
        .unwrap();
    (notifier, deliveries)
}

async fn take_deliveries(
    deliveries: &mut sqlnotify::Deliveries,
    n: usize,
) -> Vec<(i64, sqlnotify::Ack)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let d = tokio::time::timeout(ARRIVES_WITHIN, deliveries.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} deliveries arrived", out.len()))
            .expect("subscription closed");
        out.push((d.event.id().as_i64().unwrap(), d.ack));
    }
    out
}

/// An acknowledged subscription holds the consumer's position before the first event it has
/// not acknowledged: after a restart that event and every one after it arrive again (an
/// acknowledged one after it too: the position is one point in the journal, saved between
/// reads), and once all are acknowledged nothing does.
pub async fn an_unacknowledged_event_is_delivered_again_after_a_restart(db: &impl Backend) {
    db.run("CREATE TABLE t (id INTEGER PRIMARY KEY)").await;
    let (notifier, mut deliveries) = start_acked(db, "acks").await;
    db.insert_ids("t", 1..=5).await;
    let mut got = take_deliveries(&mut deliveries, 5).await;
    assert_eq!(
        got.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let unacked: Vec<_> = got
        .drain(..)
        .filter_map(|(id, ack)| match id {
            3 | 5 => Some(ack),
            _ => {
                ack.ack();
                None
            }
        })
        .collect();
    // Stopping waits a bounded while for the two, then keeps the last safe save.
    notifier.stop().await.unwrap();
    drop(unacked);

    let (notifier, mut deliveries) = start_acked(db, "acks").await;
    // Positions are saved between reads: the replay starts at the start of the read that
    // held event 3 at the latest (one read can hold the whole insert).
    let mut again = Vec::new();
    while again.last().is_none_or(|(id, _)| *id != 5) {
        again.extend(take_deliveries(&mut deliveries, 1).await);
    }
    let ids: Vec<i64> = again.iter().map(|(id, _)| *id).collect();
    let from = ids[0];
    assert!(
        from <= 3 && ids == (from..=5).collect::<Vec<_>>(),
        "from the first unacknowledged event on, at the latest: {ids:?}"
    );
    for (_, ack) in again {
        ack.ack();
    }
    notifier.stop().await.unwrap();

    let (notifier, mut deliveries) = start_acked(db, "acks").await;
    db.run("INSERT INTO t VALUES (6)").await;
    let last = take_deliveries(&mut deliveries, 1).await;
    assert_eq!(last[0].0, 6, "everything acknowledged: nothing replayed");
    assert!(deliveries.try_recv().is_none());
    last.into_iter().for_each(|(_, ack)| ack.ack());
    notifier.stop().await.unwrap();
}
