//! Snapshot, then stream (issue 15 §2) on PostgreSQL, SQLite and MySQL / MariaDB: a feed gets the table's current rows,
//! then every change committed after them — no gap, no duplicate — while writers keep
//! writing. The replica check: a subscriber applies the feed to an in-memory map while 4
//! writers insert, update, delete and roll back on a 200,000-row table; once they stop the
//! map equals the table, and every step on the way was consistent (an insert of a key the map
//! lacks, an update of a row it holds to the next version, a delete of a row it holds).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestDb;
use sqlnotify::{Error, Filter, Notifier, Operation, Snapshot, SnapshotFeed, Tier, Watch};

/// Rows in the replica test's table before the writers start.
const ROWS: i64 = 200_000;

async fn start(db: &TestDb, tier: Tier, extra: &[&str]) -> Notifier {
    let mut builder = Notifier::builder(&db.url);
    for op in [Operation::Insert, Operation::Update, Operation::Delete] {
        let carried: &[&str] = if op == Operation::Delete { &[] } else { extra };
        builder = builder.watch(
            Watch::new("t", op)
                .extra_columns(carried.iter().copied())
                .tier(tier),
        );
    }
    builder.max_in_flight(1_024).start().await.unwrap()
}

/// The next event of `feed`, within a generous bound.
async fn next(feed: &mut SnapshotFeed) -> sqlnotify::ChangeEvent {
    tokio::time::timeout(Duration::from_secs(60), feed.next())
        .await
        .expect("an event in time")
        .expect("the feed is open")
        .expect("the snapshot reads")
}

/// Stalls `notifier`'s pipeline: a subscriber that reads nothing (policy `Wait`) until its
/// in-flight budget is used up, so changes committed now wait in the listener and reach the
/// feed only after its snapshot was taken — the case the fence is for. Returns the stalled
/// subscription's channel; [`drain`] releases it.
async fn stall(notifier: &Notifier) -> crossbeam_channel::Receiver<sqlnotify::ChangeEvent> {
    let rx = stalling(notifier).await;
    await_stall(notifier).await;
    rx
}

/// The subscription [`stall`] makes, for a test that writes once after it instead of having
/// writers write all along: changes committed before it would pass it by.
async fn stalling(notifier: &Notifier) -> crossbeam_channel::Receiver<sqlnotify::ChangeEvent> {
    let (_, rx) = notifier
        .subscribe_channel(sqlnotify::Subscription::new("t", Operation::Update).buffer(1))
        .await
        .unwrap();
    rx
}

/// Waits until the pipeline stalls behind a [`stalling`] subscription.
async fn await_stall(notifier: &Notifier) {
    // The subscriber reads nothing, so what the pipeline holds only grows until the listener
    // waits for room — how close to the budget that happens depends on the batch it waits to
    // hand over (up to 1,000 rows on MySQL: with a budget of 1,024, anywhere above 24). So:
    // stalled once it holds some and has stopped growing while the writers write. Bounded
    // generously: the writers of a loaded machine's MySQL may take a while.
    let previous = std::cell::Cell::new((0u64, 0u32));
    let stalled = common::wait_until(Duration::from_secs(180), || async {
        let s = notifier.stats().await.unwrap();
        let held = s.in_flight + s.queued;
        let (before, unchanged) = previous.get();
        let unchanged = if held == before { unchanged + 1 } else { 0 };
        previous.set((held, unchanged));
        held >= 24 && unchanged >= 10
    })
    .await;
    assert!(
        stalled,
        "the pipeline never stalled: {:?}",
        notifier.stats().await.unwrap()
    );
}

/// Waits until `what`'s read (PostgreSQL) waits for room in its feed — its transaction idle,
/// its cursor open — and terminates its backend there.
async fn terminate_waiting_read(db: &TestDb, what: &str) {
    let waiting = "FROM pg_catalog.pg_stat_activity \
                   WHERE datname = pg_catalog.current_database() \
                     AND state = 'idle in transaction' AND query LIKE 'FETCH%'";
    assert!(
        common::wait_until(Duration::from_secs(10), || async {
            db.count(&format!("SELECT pg_catalog.count(*) {waiting}"))
                .await
                == 1
        })
        .await,
        "{what}'s connection never waited"
    );
    db.exec(&format!(
        "SELECT pg_catalog.pg_terminate_backend(pid) {waiting}"
    ))
    .await;
}

/// Reads `stalled` on a thread of its own until the notifier stops.
fn drain(stalled: crossbeam_channel::Receiver<sqlnotify::ChangeEvent>) {
    std::thread::spawn(move || while stalled.recv().is_ok() {});
}

/// Waits until `feed`'s snapshot is open (its rows counted), then releases `stalled`.
async fn release_once_open(
    feed: &SnapshotFeed,
    stalled: crossbeam_channel::Receiver<sqlnotify::ChangeEvent>,
) {
    let open = common::wait_until(Duration::from_secs(60), || async {
        feed.progress().total.is_some()
    })
    .await;
    assert!(open, "the snapshot never opened");
    drain(stalled);
}

/// Applies one event to the replica `map` (id → v), checking it fits: snapshot rows and
/// inserts are new keys, updates move a held row to its next version, deletes remove a held
/// row. Returns whether it was a snapshot row.
fn apply(map: &mut BTreeMap<i64, i64>, e: &sqlnotify::ChangeEvent, snapshot_over: bool) -> bool {
    let id = e.id().as_i64().unwrap();
    if e.is_snapshot() {
        assert!(!snapshot_over, "snapshot row {id} after a change");
        let v = e.get("v").and_then(|v| v.as_i64()).unwrap();
        assert!(map.insert(id, v).is_none(), "snapshot row {id} twice");
        return true;
    }
    match e.operation() {
        Operation::Insert => {
            let v = e.get("v").and_then(|v| v.as_i64()).unwrap();
            assert!(
                map.insert(id, v).is_none(),
                "insert of {id}, which the replica holds"
            );
        }
        Operation::Update => {
            let v = e.get("v").and_then(|v| v.as_i64()).unwrap();
            let old = map.insert(id, v);
            assert_eq!(old, Some(v - 1), "update of {id} to version {v}");
        }
        Operation::Delete => {
            assert!(
                map.remove(&id).is_some(),
                "delete of {id}, which the replica lacks"
            );
        }
    }
    false
}

/// A replica fed by a snapshot feed: the map, and what came.
#[derive(Default)]
struct Replica {
    map: BTreeMap<i64, i64>,
    snapshot_rows: u64,
    changes: u64,
    /// Whether the row that ends the snapshot came.
    ended: bool,
}

impl Replica {
    /// Reads the snapshot of a table that started with `rows` rows, then 200 changes (the
    /// writers still writing), checking each step.
    async fn snapshot_then_changes(&mut self, feed: &mut SnapshotFeed, rows: i64) {
        while self.changes < 200 {
            let e = next(feed).await;
            if apply(&mut self.map, &e, self.changes > 0) {
                self.snapshot_rows += 1;
                if e.ends_snapshot() {
                    assert!(feed.progress().done, "the last row came before done");
                    self.ended = true;
                }
            } else {
                assert!(self.ended, "a change before the snapshot's last row");
                self.changes += 1;
            }
        }
        assert!(
            self.snapshot_rows >= rows as u64 - 2_000,
            "{} snapshot rows",
            self.snapshot_rows
        );
        let progress = feed.progress();
        assert!(progress.done);
        assert_eq!(progress.rows, self.snapshot_rows);
        assert_eq!(progress.total, Some(self.snapshot_rows));
    }

    /// Once the writers stopped: reads until the replica equals `want` (bounded), checking
    /// every step, then makes sure nothing more comes (a duplicate would fail `apply`).
    async fn catch_up(&mut self, feed: &mut SnapshotFeed, want: &BTreeMap<i64, i64>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while &self.map != want {
            assert!(
                Instant::now() < deadline,
                "the replica never caught up ({} rows vs {})",
                self.map.len(),
                want.len()
            );
            let e = next(feed).await;
            apply(&mut self.map, &e, true);
            self.changes += 1;
        }
        if let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(500), feed.next()).await
        {
            panic!("an event after the replica caught up: {}", e.to_record());
        }
    }
}

/// The rows of `t` in a SQLite database.
fn sqlite_table(db: &common::sqlite::TempDb) -> BTreeMap<i64, i64> {
    let conn = db.conn();
    let mut stmt = conn.prepare("SELECT id, v FROM t").unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.map(Result::unwrap).collect()
}

async fn table(db: &TestDb) -> BTreeMap<i64, i64> {
    let client = db.client().await;
    client
        .query("SELECT id::int8, v::int8 FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The replica check's run, the same on every dialect: with the writers running, stalls the
/// pipeline, opens a snapshot feed of `t` (`rows` rows) and applies it — the rows, then changes
/// until `stop_writers` has stopped the writers (returning how many transactions they ran),
/// then until the replica equals `table`. Prints what it took under `label`; returns the
/// replica and the table it equals.
async fn replicate<S, T>(
    notifier: &Notifier,
    label: &str,
    rows: i64,
    stop_writers: impl FnOnce() -> S,
    table: impl FnOnce() -> T,
) -> (Replica, BTreeMap<i64, i64>)
where
    S: std::future::Future<Output = i64>,
    T: std::future::Future<Output = BTreeMap<i64, i64>>,
{
    let stalled = stall(notifier).await;
    let started = Instant::now();
    let mut feed = notifier
        .subscribe_snapshot(Snapshot::new("t").chunk_rows(2_000))
        .await
        .unwrap();
    release_once_open(&feed, stalled).await;
    let mut replica = Replica::default();
    replica.snapshot_then_changes(&mut feed, rows).await;
    let transactions = stop_writers().await;
    let want = table().await;
    replica.catch_up(&mut feed, &want).await;
    println!(
        "{label}: snapshot of {} rows + {} changes from {transactions} transactions of 4 \
         writers; replica equal to the table ({} rows) after {:?}",
        replica.snapshot_rows,
        replica.changes,
        want.len(),
        started.elapsed()
    );
    (replica, want)
}

/// The replica check on `tier`.
async fn replica(tier: Tier) {
    replica_on(&TestDb::new().await, tier, ROWS).await;
}

/// The replica check on `tier` in `db`, with a table of `rows` rows.
async fn replica_on(db: &TestDb, tier: Tier, rows: i64) {
    db.exec(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, {rows})"
    ))
    .await;
    let notifier = start(db, tier, &["v"]).await;
    // Writers first, so the snapshot is read while they write.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut writers = Vec::new();
    for w in 0..4i64 {
        let client = db.client().await;
        let stop = stop_rx.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0i64;
            while !*stop.borrow() || i < 50 {
                i += 1;
                client.batch_execute("BEGIN").await.unwrap();
                // updates spread over the table, in id order within a transaction
                let first = 1 + (w * 7919 + i * 104_729) % (rows - 10);
                client
                    .execute(
                        "UPDATE t SET v = v + 1 WHERE id IN ($1, $2)",
                        &[&(first as i32), &((first + 3) as i32)],
                    )
                    .await
                    .unwrap();
                // new rows of this writer's own, and deletes of one of them now and then
                let new = (rows + 1 + w * 1_000_000 + i) as i32;
                client
                    .execute("INSERT INTO t (id) VALUES ($1)", &[&new])
                    .await
                    .unwrap();
                if i % 5 == 0 {
                    client
                        .execute("DELETE FROM t WHERE id = $1", &[&(new - 2)])
                        .await
                        .unwrap();
                }
                if i % 9 == 4 {
                    client.batch_execute("ROLLBACK").await.unwrap();
                } else {
                    client.batch_execute("COMMIT").await.unwrap();
                }
            }
            i
        }));
    }
    let stop_writers = || async {
        stop_tx.send(true).unwrap();
        let mut transactions = 0;
        for w in writers {
            transactions += w.await.unwrap();
        }
        transactions
    };
    let (replica, _) = replicate(&notifier, &format!("{tier:?}"), rows, stop_writers, || {
        table(db)
    })
    .await;
    let stats = notifier.stats().await.unwrap();
    assert_eq!(stats.snapshot_rows, replica.snapshot_rows);
    assert_eq!(stats.snapshot_rows_total, replica.snapshot_rows);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn durable_tier_replica_equals_the_table() {
    replica(Tier::Durable).await;
}

#[actix_rt::test]
async fn poll_tier_replica_equals_the_table() {
    replica(Tier::Poll).await;
}

#[actix_rt::test]
async fn notify_tier_replica_equals_the_table() {
    replica(Tier::Notify).await;
}

/// Filters narrow both the rows and the changes; an empty table gives an empty snapshot.
#[actix_rt::test]
async fn filters_apply_to_rows_and_changes() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, owner int NOT NULL, v int NOT NULL DEFAULT 0);
         INSERT INTO t (id, owner) SELECT i, i % 10 FROM generate_series(1, 1000) i;
         CREATE TABLE e (id int PRIMARY KEY, v int)",
    )
    .await;
    let mut builder = Notifier::builder(&db.url);
    for op in [Operation::Insert, Operation::Update] {
        builder = builder.watch(Watch::new("t", op).extra_columns(["owner", "v"]));
    }
    let notifier = builder
        .watch(Watch::new("e", Operation::Insert))
        .start()
        .await
        .unwrap();
    let mut feed = notifier
        .subscribe_snapshot(
            Snapshot::new("t")
                .filter(Filter::eq("owner", 7))
                .chunk_rows(33),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..100 {
        let e = next(&mut feed).await;
        assert!(e.is_snapshot());
        // the last row that passes the filter ends the snapshot (the table's last row, which
        // does not pass it, comes after it), and the snapshot is done by then
        assert_eq!(e.ends_snapshot(), i == 99, "row {i}");
        if i == 99 {
            assert!(feed.progress().done);
            assert!(e
                .to_record()
                .ends_with(",\"snapshot\":true,\"snapshot_end\":true}"));
        }
        assert_eq!(e.get("owner"), Some(&serde_json::json!(7)));
        assert!(
            e.to_record().contains(",\"snapshot\":true"),
            "{}",
            e.to_record()
        );
        ids.push(e.id().as_i64().unwrap());
    }
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "key order");
    db.exec(
        "UPDATE t SET v = 1 WHERE id IN (7, 8); INSERT INTO t VALUES (1001, 7, 0), (1002, 1, 0)",
    )
    .await;
    let e = next(&mut feed).await;
    assert_eq!(
        (e.operation(), e.id().as_i64(), e.is_snapshot()),
        (Operation::Update, Some(7), false)
    );
    let e = next(&mut feed).await;
    assert_eq!(
        (e.operation(), e.id().as_i64()),
        (Operation::Insert, Some(1001))
    );
    assert!(feed.progress().done);
    assert_eq!(feed.progress().rows, 1000, "rows read before the filter");

    let mut empty = notifier
        .subscribe_snapshot(Snapshot::new("e"))
        .await
        .unwrap();
    // (a row written before the read opens would be a snapshot row)
    assert!(common::wait_until(Duration::from_secs(30), || async { empty.progress().done }).await);
    db.exec("INSERT INTO e VALUES (1, 1)").await;
    let e = next(&mut empty).await;
    assert!(!e.is_snapshot() && e.id().as_i64() == Some(1));
    assert_eq!(empty.progress().total, Some(0));

    // errors name what is wrong
    match notifier
        .subscribe_snapshot(Snapshot::new("t").filter(Filter::eq("nope", 1)))
        .await
    {
        Err(Error::UnknownFilterColumn { column, .. }) => assert_eq!(column, "nope"),
        other => panic!("{other:?}"),
    }
    match notifier
        .subscribe_snapshot(Snapshot::new("unwatched"))
        .await
    {
        Err(Error::NotWatched { table, .. }) => assert_eq!(table, "public.unwatched"),
        other => panic!("{other:?}"),
    }
    notifier.stop().await.unwrap();
    // the feeds end with the notifier
    for feed in [&mut feed, &mut empty] {
        let end = tokio::time::timeout(Duration::from_secs(10), feed.next()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
        assert!(feed.backfill([]).is_err());
    }
}

/// A snapshot whose connection is lost in the middle of the read, while the feed is full (its
/// reader reads one row at a time and the feeder waits for room): the rows read so far, then
/// the error, then the end. The error used to be offered only to a feed with room, and was
/// dropped from a full one: the feed then ended as if the notifier had stopped, and the rows
/// before passed for the whole table.
#[actix_rt::test]
async fn a_snapshot_that_fails_while_its_feed_is_full_ends_with_the_error() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY);
         INSERT INTO t SELECT i FROM generate_series(1, 200) i",
    )
    .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let mut feed = notifier
        .subscribe_snapshot(Snapshot::new("t").chunk_rows(20).buffer(10))
        .await
        .unwrap();
    assert!(next(&mut feed).await.is_snapshot());
    // The feed is full now and the snapshot's transaction waits, its cursor open.
    terminate_waiting_read(&db, "the snapshot").await;
    // One row at a time, the feeder filling the room each read makes before the next read:
    // the failure meets a full feed.
    let mut rows = 1;
    let failure = loop {
        let item = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("the feed moves");
        match item {
            Some(Ok(event)) => {
                assert!(event.is_snapshot() && !event.ends_snapshot(), "row {rows}");
                rows += 1;
                tokio::task::yield_now().await;
            }
            Some(Err(e)) => break e,
            None => panic!("the feed ended after {rows} of 200 rows, without the error"),
        }
    };
    assert!(rows < 200, "{rows}");
    assert!(matches!(failure, Error::Database { .. }), "{failure:?}");
    let end = tokio::time::timeout(Duration::from_secs(10), feed.next()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    assert!(!feed.progress().done);
    notifier.stop().await.unwrap();
}

/// Dropping a feed ends its subscription, also when no change since passed its filters: the
/// feeder took (and counted as delivered) every event of every watched table for as long as
/// the notifier ran, noticing the feed was gone only when it had an event to send — never,
/// with a filter no row matches.
#[actix_rt::test]
async fn dropping_a_feed_ends_its_subscription() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE u (id int PRIMARY KEY);
         INSERT INTO t VALUES (1)",
    )
    .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .watch(Watch::new("u", Operation::Insert))
        .start()
        .await
        .unwrap();
    let feed = notifier
        .subscribe_snapshot(Snapshot::new("t").filter(Filter::eq("id", -1)))
        .await
        .unwrap();
    assert!(common::wait_until(Duration::from_secs(30), || async { feed.progress().done }).await);
    // Inserts row `id` into u, waits until the pipeline has routed it, and returns how many
    // subscriptions it was delivered to.
    let routed = |id: i32| {
        let (db, notifier) = (&db, &notifier);
        async move {
            let before = notifier.stats().await.unwrap();
            db.exec(&format!("INSERT INTO u VALUES ({id})")).await;
            let routed = common::wait_until(Duration::from_secs(30), || async {
                let s = notifier.stats().await.unwrap();
                s.received > before.received && s.in_flight == 0 && s.queued == 0
            })
            .await;
            assert!(routed, "row {id} of u was never routed");
            notifier.stats().await.unwrap().delivered - before.delivered
        }
    };
    assert_eq!(
        routed(1).await,
        1,
        "the feed's subscription takes every event"
    );
    drop(feed);
    let next = std::cell::Cell::new(1);
    let gone = common::wait_until(Duration::from_secs(10), || {
        next.set(next.get() + 1);
        let id = next.get();
        async move { routed(id).await == 0 }
    })
    .await;
    assert!(
        gone,
        "the dropped feed's subscription still takes every event"
    );
    for id in 1_000..1_005 {
        assert_eq!(routed(id).await, 0, "row {id} of u delivered");
    }
    notifier.stop().await.unwrap();
}

/// Rows of the tables whose snapshot read the tests below leave waiting: far more than a
/// chunk and the feed's room hold, so the read waits for the feed long before its end.
const UNREAD_ROWS: i64 = 5_000;

/// Rows the tests below insert once the read waits: more than the feed's feeder and its
/// subscription buffer hold (10 each), so the pipeline waits for the feed too.
const LATE_ROWS: i64 = 100;

/// Opens a snapshot feed of `t` (read 10 rows at a time, room for 10 events) that nobody
/// reads, waits until its read is open, runs `write` (which inserts [`LATE_ROWS`] rows into
/// `t`: changes after the snapshot, which wait behind it) and waits until the listener
/// received them and `held` sees the read's transaction open on the server.
async fn unread_feed<H, Fut>(
    notifier: &Notifier,
    write: impl std::future::Future<Output = ()>,
    held: &mut H,
) -> SnapshotFeed
where
    H: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let feed = notifier
        .subscribe_snapshot(Snapshot::new("t").chunk_rows(10).buffer(10))
        .await
        .unwrap();
    let open = common::wait_until(Duration::from_secs(60), || async {
        feed.progress().total == Some(UNREAD_ROWS as u64)
    })
    .await;
    assert!(open, "the snapshot never opened: {:?}", feed.progress());
    write.await;
    let waiting = common::wait_until(Duration::from_secs(60), || async {
        let s = notifier.stats().await.unwrap();
        s.received >= LATE_ROWS as u64 && s.in_flight + s.queued > 0
    })
    .await;
    assert!(
        waiting,
        "the late rows never waited: {:?}",
        notifier.stats().await.unwrap()
    );
    let open =
        common::wait_until_every(Duration::from_secs(30), Duration::from_millis(200), held).await;
    assert!(open, "the snapshot's transaction is not seen on the server");
    let progress = feed.progress();
    assert!(
        !progress.done && progress.rows < UNREAD_ROWS as u64,
        "{progress:?}"
    );
    feed
}

/// Stops `notifier` while `feed`'s read waits for room (see [`unread_feed`]): `stop()`
/// returns without the read going on to the end of the table (nor waiting out the pipeline
/// held up behind it), the read's transaction is gone from the server (`held` turns false),
/// and the feed hands over the rows it got, then `Error::NotRunning` — a read cut short
/// does not pass for a whole one — then `None`. Returns how many rows it handed over.
async fn stop_ends_the_read<H, Fut>(
    notifier: Notifier,
    feed: &mut SnapshotFeed,
    held: &mut H,
) -> i64
where
    H: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let began = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), notifier.stop())
        .await
        .expect("stop() returns")
        .unwrap();
    let took = began.elapsed();
    let ended =
        common::wait_until_every(Duration::from_secs(10), Duration::from_millis(200), || {
            let open = held();
            async move { !open.await }
        })
        .await;
    assert!(
        ended,
        "the read's transaction is still open on the server after stop() (which took {took:?})"
    );
    assert!(
        took < Duration::from_secs(5),
        "stop() took {took:?} with a read waiting"
    );
    let mut rows = 0;
    let end = loop {
        let item = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("the feed ends in time");
        match item {
            Some(Ok(event)) => {
                assert!(event.is_snapshot() && !event.ends_snapshot(), "row {rows}");
                rows += 1;
            }
            Some(Err(e)) => break e,
            None => panic!("the feed ended after {rows} rows without an error"),
        }
    };
    assert!(matches!(end, Error::NotRunning), "{end:?}");
    let after = tokio::time::timeout(Duration::from_secs(10), feed.next()).await;
    assert!(matches!(after, Ok(None)), "{after:?}");
    rows
}

/// [`stop_ends_the_read`] for a feed whose first snapshot was cut: it is not done, and the
/// rows before the error are not the whole table.
async fn stop_ends_the_snapshot<H, Fut>(notifier: Notifier, mut feed: SnapshotFeed, held: &mut H)
where
    H: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let rows = stop_ends_the_read(notifier, &mut feed, held).await;
    assert!(rows < UNREAD_ROWS, "{rows}");
    let progress = feed.progress();
    assert!(
        !progress.done && progress.rows < UNREAD_ROWS as u64,
        "{progress:?}"
    );
}

/// Drops `feed` while its read waits for room (see [`unread_feed`]), the notifier running:
/// the read's transaction is gone from the server (`held` turns false) soon after.
async fn dropping_ends_the_read<H, Fut>(notifier: Notifier, feed: SnapshotFeed, held: &mut H)
where
    H: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    drop(feed);
    let ended =
        common::wait_until_every(Duration::from_secs(10), Duration::from_millis(200), || {
            let open = held();
            async move { !open.await }
        })
        .await;
    assert!(
        ended,
        "the snapshot's transaction is still open on the server after its feed was dropped"
    );
    assert!(notifier.is_running());
    notifier.stop().await.unwrap();
}

/// A PostgreSQL table `t` of [`UNREAD_ROWS`] rows watched for inserts.
async fn postgres_unread(db: &TestDb) -> Notifier {
    db.exec(&format!(
        "CREATE TABLE t (id int PRIMARY KEY);
         INSERT INTO t SELECT i FROM generate_series(1, {UNREAD_ROWS}) i"
    ))
    .await;
    Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .max_in_flight(1_024)
        .start()
        .await
        .unwrap()
}

/// Whether a snapshot read's transaction is open on `db`: a backend in a transaction whose
/// last statement fetched from the read's cursor.
async fn postgres_held(db: &TestDb) -> bool {
    db.count(
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity \
          WHERE datname = pg_catalog.current_database() AND pid <> pg_catalog.pg_backend_pid() \
            AND xact_start IS NOT NULL AND query LIKE 'FETCH%'",
    )
    .await
        > 0
}

/// Inserts [`LATE_ROWS`] rows into the PostgreSQL table `t`, after its [`UNREAD_ROWS`].
async fn postgres_late(db: &TestDb) {
    db.exec(&format!(
        "INSERT INTO t SELECT i FROM generate_series({}, {}) i",
        UNREAD_ROWS + 1,
        UNREAD_ROWS + LATE_ROWS
    ))
    .await;
}

/// `stop()` ends a PostgreSQL snapshot read left waiting on its feed: its `REPEATABLE READ`
/// transaction (whose snapshot holds vacuum's horizon back) used to stay open, its connection
/// too, until the whole table had gone to the feed.
#[actix_rt::test]
async fn postgres_stop_ends_a_snapshot_read_in_progress() {
    let db = TestDb::new().await;
    let notifier = postgres_unread(&db).await;
    let mut held = || postgres_held(&db);
    let feed = unread_feed(&notifier, postgres_late(&db), &mut held).await;
    stop_ends_the_snapshot(notifier, feed, &mut held).await;
}

/// Dropping a PostgreSQL feed in the middle of its snapshot ends the read.
#[actix_rt::test]
async fn postgres_dropping_a_feed_ends_its_snapshot_read() {
    let db = TestDb::new().await;
    let notifier = postgres_unread(&db).await;
    let mut held = || postgres_held(&db);
    let feed = unread_feed(&notifier, postgres_late(&db), &mut held).await;
    dropping_ends_the_read(notifier, feed, &mut held).await;
}

/// `stop()` ends a backfill left waiting on its feed as it ends the first snapshot's read:
/// the feed hands over the backfill's rows it got, then `Error::NotRunning`, then `None`.
#[actix_rt::test]
async fn postgres_stop_ends_a_backfill_in_progress() {
    let db = TestDb::new().await;
    let notifier = postgres_unread(&db).await;
    let mut feed = notifier
        .subscribe_snapshot(Snapshot::new("t").chunk_rows(10).buffer(10))
        .await
        .unwrap();
    while !next(&mut feed).await.ends_snapshot() {}
    feed.backfill([]).unwrap();
    let mut held = || postgres_held(&db);
    let open = common::wait_until_every(
        Duration::from_secs(30),
        Duration::from_millis(200),
        &mut held,
    )
    .await;
    assert!(open, "the backfill's transaction is not seen on the server");
    let rows = stop_ends_the_read(notifier, &mut feed, &mut held).await;
    assert!(rows < UNREAD_ROWS, "{rows}");
}

/// A SQLite table `t` of [`UNREAD_ROWS`] rows watched for inserts.
async fn sqlite_unread(db: &common::sqlite::TempDb) -> Notifier {
    db.exec(&format!(
        "CREATE TABLE t (id INTEGER PRIMARY KEY);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {UNREAD_ROWS})
         INSERT INTO t (id) SELECT i FROM n"
    ));
    Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert))
        .max_in_flight(1_024)
        .start()
        .await
        .unwrap()
}

/// Whether a read transaction holds the SQLite database at `path` back: a
/// `PRAGMA wal_checkpoint(TRUNCATE)` (not waiting) reports busy while a reader's view ends
/// before the log's last commit — the late rows, written after the snapshot's read opened.
/// It asks again while another connection's checkpoint or write keeps it from answering.
async fn sqlite_held(path: std::path::PathBuf) -> bool {
    tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.busy_timeout(Duration::ZERO).unwrap();
        // The pragma fails with SQLITE_BUSY (rather than reporting busy) while another
        // connection checkpoints or writes, such as the late rows' writer or the notifier's
        // purge: that says nothing about the reader, so ask again.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            }) {
                Ok(busy) => return busy != 0,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("wal_checkpoint: {e}"),
            }
        }
    })
    .await
    .unwrap()
}

/// `stop()` ends a SQLite snapshot read left waiting on its feed: its read transaction (which
/// keeps checkpoints from passing it, so the log only grows) used to stay open until the
/// whole table had gone to the feed.
#[actix_rt::test]
async fn sqlite_stop_ends_a_snapshot_read_in_progress() {
    let db = common::sqlite::TempDb::new();
    let notifier = sqlite_unread(&db).await;
    let mut held = || sqlite_held(db.path.clone());
    let late = common::sqlite::insert_rows(&db, "t", UNREAD_ROWS + 1..=UNREAD_ROWS + LATE_ROWS);
    let feed = unread_feed(&notifier, late, &mut held).await;
    stop_ends_the_snapshot(notifier, feed, &mut held).await;
}

/// Dropping a SQLite feed in the middle of its snapshot ends the read.
#[actix_rt::test]
async fn sqlite_dropping_a_feed_ends_its_snapshot_read() {
    let db = common::sqlite::TempDb::new();
    let notifier = sqlite_unread(&db).await;
    let mut held = || sqlite_held(db.path.clone());
    let late = common::sqlite::insert_rows(&db, "t", UNREAD_ROWS + 1..=UNREAD_ROWS + LATE_ROWS);
    let feed = unread_feed(&notifier, late, &mut held).await;
    dropping_ends_the_read(notifier, feed, &mut held).await;
}

/// The replica check on SQLite: 4 writer threads, each on its own connection, writing
/// (`BEGIN IMMEDIATE`: SQLite has one writer at a time) while the snapshot is read.
#[actix_rt::test]
async fn sqlite_replica_equals_the_table() {
    use common::sqlite::TempDb;

    let db = TempDb::new();
    db.exec(&format!(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})
         INSERT INTO t (id) SELECT i FROM n"
    ));
    let mut builder = Notifier::builder(db.url());
    for op in [Operation::Insert, Operation::Update, Operation::Delete] {
        let carried: &[&str] = if op == Operation::Delete { &[] } else { &["v"] };
        builder = builder.watch(Watch::new("t", op).extra_columns(carried.iter().copied()));
    }
    let notifier = builder.max_in_flight(1_024).start().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4i64 {
        let conn = db.conn();
        conn.busy_timeout(Duration::from_secs(30)).unwrap();
        let stop = stop.clone();
        writers.push(std::thread::spawn(move || {
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) || i < 50 {
                i += 1;
                conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                let first = 1 + (w * 7919 + i * 104_729) % (ROWS - 10);
                conn.execute(
                    "UPDATE t SET v = v + 1 WHERE id IN (?1, ?2)",
                    [first, first + 3],
                )
                .unwrap();
                let new = ROWS + 1 + w * 1_000_000 + i;
                conn.execute("INSERT INTO t (id) VALUES (?1)", [new])
                    .unwrap();
                if i % 5 == 0 {
                    conn.execute("DELETE FROM t WHERE id = ?1", [new - 2])
                        .unwrap();
                }
                if i % 9 == 4 {
                    conn.execute_batch("ROLLBACK").unwrap();
                } else {
                    conn.execute_batch("COMMIT").unwrap();
                }
            }
            i
        }));
    }
    let stop_writers = || async {
        stop.store(true, Ordering::Relaxed);
        let mut transactions = 0;
        for w in writers {
            transactions += w.join().unwrap();
        }
        transactions
    };
    replicate(&notifier, "SQLite", ROWS, stop_writers, || async {
        sqlite_table(&db)
    })
    .await;
    notifier.stop().await.unwrap();
}

/// A snapshot taken after the retention purge emptied the journal, on SQLite: a change the
/// listener read before the purge and had not handed over yet reaches the feed after the
/// snapshot, which reflects it, so it is skipped. The fence used to be the highest journal id
/// left (none: 0), below the ids the purge deleted, and such a change came again after its row.
#[actix_rt::test]
async fn sqlite_a_snapshot_after_a_purge_emptied_the_journal_skips_what_it_reflects() {
    use common::sqlite::TempDb;
    let db = TempDb::new();
    db.exec(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0);
         CREATE TABLE u (id INTEGER PRIMARY KEY)",
    );
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert))
        .watch(Watch::new("u", Operation::Insert))
        .max_in_flight(1_024)
        .start()
        .await
        .unwrap();
    let (_, stalled) = notifier
        .subscribe_channel(sqlnotify::Subscription::new("u", Operation::Insert).buffer(1))
        .await
        .unwrap();
    // One transaction: more rows of u than the in-flight budget, then row 1 of t. The listener
    // hands over the first 1,000 rows, which the stalled subscriber holds, then reads the
    // rest, row 1 of t with them, and waits for room to hand them over.
    db.exec(
        "BEGIN;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1100)
         INSERT INTO u (id) SELECT i FROM n;
         INSERT INTO t (id) VALUES (1);
         COMMIT",
    );
    let previous = std::cell::Cell::new((0u64, 0u32));
    let waiting = common::wait_until(Duration::from_secs(30), || async {
        let s = notifier.stats().await.unwrap();
        let held = s.in_flight + s.queued + s.delivered;
        let (before, unchanged) = previous.get();
        let unchanged = if held == before { unchanged + 1 } else { 0 };
        previous.set((held, unchanged));
        held >= 1_000 && unchanged >= 10
    })
    .await;
    assert!(waiting, "the pipeline never stalled");
    // What the retention purge does to rows older than the retention that no registered
    // consumer still has to read: all of them, here.
    db.exec("DELETE FROM sqlnotify_journal");
    let mut feed = notifier
        .subscribe_snapshot(Snapshot::new("t"))
        .await
        .unwrap();
    release_once_open(&feed, stalled).await;
    let row = next(&mut feed).await;
    assert!(
        row.is_snapshot() && row.ends_snapshot(),
        "{}",
        row.to_record()
    );
    assert_eq!(row.id().as_i64(), Some(1));
    db.exec("INSERT INTO t (id) VALUES (2)");
    let change = next(&mut feed).await;
    assert!(
        !change.is_snapshot() && change.id().as_i64() == Some(2),
        "after the snapshot's row 1: {}",
        change.to_record()
    );
    // Row 1's insert was read before the purge (and is what the fence had to skip), not lost
    // with the journal's rows.
    let read = common::wait_until(Duration::from_secs(30), || async {
        notifier.stats().await.unwrap().received == 1_102
    })
    .await;
    assert!(read, "{:?}", notifier.stats().await.unwrap());
    notifier.stop().await.unwrap();
}

/// Applies an event of a feed with backfills: a snapshot row after the first snapshot is a
/// backfilled row, which must not be older than what the feed showed for its key; an update
/// must be the next version of what it showed (so a change that came before the row it
/// follows, or twice, fails).
fn apply_backfilled(map: &mut BTreeMap<i64, i64>, e: &sqlnotify::ChangeEvent) -> bool {
    let id = e.id().as_i64().unwrap();
    let v = e.get("v").and_then(|v| v.as_i64()).unwrap();
    if e.is_snapshot() {
        let shown = map
            .insert(id, v)
            .expect("a backfilled row the feed had shown");
        assert!(
            v >= shown,
            "backfilled row {id} at version {v} after version {shown}"
        );
        return true;
    }
    assert_eq!(e.operation(), Operation::Update);
    let old = map.insert(id, v);
    assert_eq!(old, Some(v - 1), "update of {id} to version {v}");
    false
}

/// Backfill while updates flow: 2 writers (started by `writers`, which write until the flag
/// is set) keep updating rows, one or two per transaction, while the feed backfills ids
/// 1..=500 twice — the pipeline stalled during the first, so changes it reflects arrive after
/// it. Every backfilled row comes once per backfill, never older than what the feed had shown
/// for its key, the changes continue from it, and the feed ends equal to the table.
async fn backfill_while_updates_flow<S, F>(
    notifier: &Notifier,
    writers: impl FnOnce(Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>>,
    state: S,
) where
    S: Fn() -> F,
    F: std::future::Future<Output = BTreeMap<i64, i64>>,
{
    let mut feed = notifier
        .subscribe_snapshot(Snapshot::new("t").chunk_rows(300))
        .await
        .unwrap();
    let mut map = BTreeMap::new();
    for _ in 0..2_000 {
        let e = next(&mut feed).await;
        assert!(e.is_snapshot());
        map.insert(
            e.id().as_i64().unwrap(),
            e.get("v").unwrap().as_i64().unwrap(),
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    // writers stop when the test ends, also when it fails (the runtime waits for blocking
    // tasks before a failing test can end)
    let _stop_on_drop = StopOnDrop(stop.clone());
    let writers = writers(stop.clone());
    let mut backfilled = 0;
    for round in 0..2 {
        // some changes first
        for _ in 0..100 {
            let e = next(&mut feed).await;
            apply_backfilled(&mut map, &e);
        }
        let stalled = if round == 0 {
            Some(stall(notifier).await)
        } else {
            None
        };
        feed.backfill([Filter::le("id", 500)]).unwrap();
        if let Some(stalled) = stalled {
            release_once_open(&feed, stalled).await;
        }
        let mut rows = 0;
        while rows < 500 {
            let e = next(&mut feed).await;
            if apply_backfilled(&mut map, &e) {
                assert!(e.id().as_i64().unwrap() <= 500);
                rows += 1;
            }
        }
        backfilled += rows;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let want = state().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while map != want {
        assert!(Instant::now() < deadline, "the feed never caught up");
        let e = next(&mut feed).await;
        assert!(!apply_backfilled(&mut map, &e), "a backfilled row too many");
    }
    if let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(500), feed.next()).await {
        panic!("an event after the feed caught up: {}", e.to_record());
    }
    assert_eq!(backfilled, 1_000);
    // rows read: the table three times (filters apply to the rows read)
    assert_eq!(feed.progress().rows, 6_000);
    // a filter on a column the watches do not carry is refused
    assert!(matches!(
        feed.backfill([Filter::eq("nope", 1)]),
        Err(Error::UnknownFilterColumn { .. })
    ));
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The row ids writer `w`'s `i`-th transaction updates.
fn rows_of(w: i64, i: i64) -> (i64, i64) {
    let id = 1 + (w * 7_919 + i * 104_729) % 1_990;
    (id, if i % 4 == 0 { id + 5 } else { id })
}

#[actix_rt::test]
async fn postgres_backfill_while_updates_flow() {
    postgres_backfill_on(&TestDb::new().await, Tier::Durable).await;
}

/// The backfill check on PostgreSQL's `tier` in `db`.
async fn postgres_backfill_on(db: &TestDb, tier: Tier) {
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 2000)",
    )
    .await;
    let notifier = start(db, tier, &["v"]).await;
    let clients = vec![db.client().await, db.client().await];
    let writers = move |stop: Arc<AtomicBool>| {
        clients
            .into_iter()
            .zip(0i64..)
            .map(|(client, w)| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) || i < 100 {
                        i += 1;
                        let (a, b) = rows_of(w, i);
                        client
                            .execute(
                                "UPDATE t SET v = v + 1 WHERE id IN ($1, $2)",
                                &[&(a as i32), &(b as i32)],
                            )
                            .await
                            .unwrap();
                    }
                })
            })
            .collect()
    };
    backfill_while_updates_flow(&notifier, writers, || table(db)).await;
    notifier.stop().await.unwrap();
}

/// A backfill skips the changes its read reflects only for the keys whose rows it sent. Two
/// backfills read while the pipeline is stalled, so the changes committed before them arrive
/// after their rows: row 7, deleted before the first backfill (`id <= 500`) read, is not among
/// its rows, and its DELETE must still come; row 800, closed then opened again before the
/// second backfill (`status = 'open'`) read, comes as open from it, and neither update may
/// come after it (the first, `closed`, used to be passed on for not matching the backfill's
/// filter, the second skipped for matching it: the feed ended at `closed`). The feed ends
/// equal to the table.
#[actix_rt::test]
async fn a_backfill_skips_only_changes_of_the_rows_it_sent() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0,
                         status text NOT NULL DEFAULT 'open');
         INSERT INTO t (id) SELECT generate_series(1, 2000)",
    )
    .await;
    let notifier = start(&db, Tier::Durable, &["v", "status"]).await;
    let mut feed = notifier
        .subscribe_snapshot(Snapshot::new("t"))
        .await
        .unwrap();
    // id → (v, status); what the feed showed
    let mut map: BTreeMap<i64, (i64, String)> = BTreeMap::new();
    let apply = |map: &mut BTreeMap<i64, (i64, String)>, e: &sqlnotify::ChangeEvent| {
        let id = e.id().as_i64().unwrap();
        if e.operation() == Operation::Delete && !e.is_snapshot() {
            assert!(map.remove(&id).is_some(), "delete of {id}, not shown");
            return;
        }
        let v = e.get("v").and_then(|v| v.as_i64()).unwrap();
        let status = e
            .get("status")
            .and_then(|s| s.as_str())
            .unwrap()
            .to_string();
        map.insert(id, (v, status));
    };
    for _ in 0..2_000 {
        let e = next(&mut feed).await;
        assert!(e.is_snapshot());
        apply(&mut map, &e);
    }
    // More changes than the in-flight budget, so the pipeline stalls with the changes below
    // waiting in the listener.
    let stalled = stalling(&notifier).await;
    db.exec("UPDATE t SET v = v + 1 WHERE id > 500").await;
    await_stall(&notifier).await;
    db.exec("DELETE FROM t WHERE id = 7").await;
    db.exec("UPDATE t SET status = 'closed' WHERE id = 800")
        .await;
    db.exec("UPDATE t SET status = 'open' WHERE id = 800").await;
    feed.backfill([Filter::le("id", 500)]).unwrap();
    feed.backfill([Filter::eq("status", "open")]).unwrap();
    release_once_open(&feed, stalled).await;
    let want: BTreeMap<i64, (i64, String)> = db
        .client()
        .await
        .query("SELECT id::int8, v::int8, status FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut backfilled = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while map != want || backfilled < 499 + 1_999 {
        assert!(
            Instant::now() < deadline,
            "the feed never caught up ({backfilled} rows backfilled): row 7 {:?}, row 800 {:?}",
            map.get(&7),
            map.get(&800)
        );
        let Ok(item) = tokio::time::timeout(Duration::from_secs(1), feed.next()).await else {
            continue;
        };
        let e = item.expect("the feed is open").expect("the backfills read");
        if e.is_snapshot() {
            backfilled += 1;
        }
        apply(&mut map, &e);
    }
    assert_eq!(backfilled, 499 + 1_999);
    if let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(500), feed.next()).await {
        panic!("an event after the feed caught up: {}", e.to_record());
    }
    notifier.stop().await.unwrap();
}

/// A backfill whose read fails part way (its connection lost while the feed is full): the
/// rows it sent before the failure reflect the changes committed before its read, so those
/// changes are not passed on for the keys of those rows, and are for the keys it did not get
/// to (the row it held back to mark the last one included). A failed backfill used to keep
/// no fence: every such change came after the row that already showed it — the row's state,
/// then an older state's change to the same state again.
#[actix_rt::test]
async fn a_backfill_that_fails_part_way_fences_the_rows_it_sent() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 200)",
    )
    .await;
    let notifier = start(&db, Tier::Durable, &["v"]).await;
    let mut feed = notifier
        .subscribe_snapshot(Snapshot::new("t").chunk_rows(20).buffer(10))
        .await
        .unwrap();
    for _ in 0..200 {
        assert!(next(&mut feed).await.is_snapshot());
    }
    // Fills the feed and holds the feeder on one more change (of row 200, which the backfill
    // does not send), so the backfill's read opens only once the feed took them: after the
    // update below committed.
    let before = notifier.stats().await.unwrap();
    for _ in 0..11 {
        db.exec("UPDATE t SET v = v + 1 WHERE id = 200").await;
    }
    let routed = common::wait_until(Duration::from_secs(30), || async {
        let s = notifier.stats().await.unwrap();
        s.received >= before.received + 11 && s.in_flight == 0 && s.queued == 0
    })
    .await;
    assert!(routed, "the changes of row 200 were never routed");
    feed.backfill([Filter::le("id", 100)]).unwrap();
    db.exec("UPDATE t SET v = 1 WHERE id <= 100").await;
    for v in 1..=11 {
        let e = next(&mut feed).await;
        assert!(
            !e.is_snapshot() && e.id().as_i64() == Some(200),
            "{}",
            e.to_record()
        );
        assert_eq!(e.get("v").and_then(|v| v.as_i64()), Some(v));
    }
    // The backfill fills the feed and its transaction waits, its cursor open: end it there.
    terminate_waiting_read(&db, "the backfill").await;
    // The backfilled rows, then the failure.
    let mut sent = std::collections::BTreeSet::new();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("the feed moves")
            .expect("the feed is open");
        match item {
            Ok(e) => {
                assert!(
                    e.is_snapshot(),
                    "a change before the failure: {}",
                    e.to_record()
                );
                assert_eq!(e.get("v").and_then(|v| v.as_i64()), Some(1));
                sent.insert(e.id().as_i64().unwrap());
            }
            Err(e) => {
                assert!(matches!(e, Error::Database { .. }), "{e:?}");
                break;
            }
        }
    }
    assert!(
        !sent.is_empty() && sent.len() < 100,
        "{} rows sent",
        sent.len()
    );
    // The changes go on: those of the rows the backfill did not send, then a later one.
    db.exec("UPDATE t SET v = v + 1 WHERE id = 200").await;
    let mut changed = std::collections::BTreeSet::new();
    loop {
        let e = next(&mut feed).await;
        assert!(!e.is_snapshot(), "{}", e.to_record());
        let id = e.id().as_i64().unwrap();
        if id == 200 {
            assert_eq!(e.get("v").and_then(|v| v.as_i64()), Some(12));
            break;
        }
        assert!(
            !sent.contains(&id),
            "the change of row {id} came after the backfilled row that reflects it"
        );
        assert!(changed.insert(id), "the change of row {id} twice");
    }
    let all: std::collections::BTreeSet<i64> = sent.union(&changed).copied().collect();
    assert_eq!(all, (1..=100).collect(), "every row: backfilled or changed");
    notifier.stop().await.unwrap();
}

/// The same checks on PostgreSQL's logical-decoding tier, on a cluster of their own with
/// `wal_level=logical` whose transaction ids are in a later epoch (past 2³²), so events whose
/// ids were the log's 32-bit ones would meet the snapshot's 64-bit ones wrongly: every one
/// would count as reflected by the snapshot.
#[cfg(feature = "logical")]
mod logical {
    use super::*;
    use common::Cluster;

    const SETTINGS: &str = "-c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10";

    /// Epoch 5, a million ids past its start.
    const NEXT_XID: u64 = (5 << 32) + 1_000_000;

    fn cluster(test: &str) -> Option<Cluster> {
        let cluster = Cluster::start_at_xid(SETTINGS, NEXT_XID);
        if cluster.is_none() {
            common::prerequisite_missing(test, "PostgreSQL's binaries (initdb, pg_resetwal)");
        }
        cluster
    }

    #[actix_rt::test]
    async fn logical_tier_replica_equals_the_table() {
        let Some(cluster) = cluster("logical_tier_replica_equals_the_table") else {
            return;
        };
        let db = TestDb::on(&cluster.url()).await;
        replica_on(&db, Tier::Logical, 20_000).await;
    }

    #[actix_rt::test]
    async fn logical_backfill_while_updates_flow() {
        let Some(cluster) = cluster("logical_backfill_while_updates_flow") else {
            return;
        };
        let db = TestDb::on(&cluster.url()).await;
        postgres_backfill_on(&db, Tier::Logical).await;
    }
}

#[actix_rt::test]
async fn sqlite_backfill_while_updates_flow() {
    use common::sqlite::TempDb;
    let db = TempDb::new();
    db.exec(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
         INSERT INTO t (id) SELECT i FROM n",
    );
    let mut builder = Notifier::builder(db.url());
    for op in [Operation::Insert, Operation::Update, Operation::Delete] {
        let carried: &[&str] = if op == Operation::Delete { &[] } else { &["v"] };
        builder = builder.watch(Watch::new("t", op).extra_columns(carried.iter().copied()));
    }
    let notifier = builder.max_in_flight(1_024).start().await.unwrap();
    let conns = vec![db.conn(), db.conn()];
    let writers = move |stop: Arc<AtomicBool>| {
        conns
            .into_iter()
            .zip(0i64..)
            .map(|(conn, w)| {
                let stop = stop.clone();
                tokio::task::spawn_blocking(move || {
                    conn.busy_timeout(Duration::from_secs(30)).unwrap();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) || i < 100 {
                        i += 1;
                        let (a, b) = rows_of(w, i);
                        conn.execute("UPDATE t SET v = v + 1 WHERE id IN (?1, ?2)", [a, b])
                            .unwrap();
                    }
                })
            })
            .collect()
    };
    let state = || async { sqlite_table(&db) };
    backfill_while_updates_flow(&notifier, writers, state).await;
    notifier.stop().await.unwrap();
}

/// The same checks on MySQL / MariaDB, whose journal ids are not in commit order: the fence is
/// the set of journal ids the consistent snapshot saw above the listener's watermark.
#[cfg(feature = "mysql")]
mod mysql {
    use mysql_async::prelude::*;

    use super::*;
    use common::mysql::TestDb;

    /// Rows in the MySQL replica test's table (as on the other dialects).
    const MYSQL_ROWS: i64 = ROWS;

    /// A table `t (id, v)` of ids 1..=`rows` (a cross join of digits: no recursive CTE,
    /// whose depth MySQL limits to 1,000 by default).
    async fn table_of(db: &TestDb, rows: i64) {
        db.exec(&format!(
            "CREATE TABLE t (id BIGINT PRIMARY KEY, v BIGINT NOT NULL DEFAULT 0);
             CREATE TABLE d (i INT PRIMARY KEY);
             INSERT INTO d VALUES (0), (1), (2), (3), (4), (5), (6), (7), (8), (9);
             INSERT INTO t (id)
               SELECT 1 + a.i + 10 * b.i + 100 * c.i + 1000 * e.i + 10000 * f.i + 100000 * g.i AS n
               FROM d a, d b, d c, d e, d f, d g
               WHERE 1 + a.i + 10 * b.i + 100 * c.i + 1000 * e.i + 10000 * f.i + 100000 * g.i <= {rows};
             DROP TABLE d"
        ))
        .await;
    }

    async fn start(db: &TestDb) -> Notifier {
        let mut builder = Notifier::builder(&db.url);
        for op in [Operation::Insert, Operation::Update, Operation::Delete] {
            let carried: &[&str] = if op == Operation::Delete { &[] } else { &["v"] };
            builder = builder.watch(Watch::new("t", op).extra_columns(carried.iter().copied()));
        }
        builder.max_in_flight(1_024).start().await.unwrap()
    }

    async fn table(db: &TestDb) -> BTreeMap<i64, i64> {
        let mut conn = db.conn().await;
        let rows: Vec<(i64, i64)> = conn.query("SELECT id, v FROM t").await.unwrap();
        let _ = conn.disconnect().await;
        rows.into_iter().collect()
    }

    /// Runs one writer transaction; on an error (a deadlock, a lock wait timeout) rolls back
    /// what is left of it: the table and the events stay consistent either way.
    async fn transaction(conn: &mut mysql_async::Conn, statements: &[String], commit: bool) {
        conn.query_drop("START TRANSACTION").await.unwrap();
        for sql in statements {
            if conn.query_drop(sql).await.is_err() {
                conn.query_drop("ROLLBACK").await.unwrap();
                return;
            }
        }
        let end = if commit { "COMMIT" } else { "ROLLBACK" };
        if conn.query_drop(end).await.is_err() {
            conn.query_drop("ROLLBACK").await.unwrap();
        }
    }

    /// The replica check on MySQL / MariaDB: 4 writers (inserts, updates, deletes,
    /// rollbacks), the pipeline stalled while the snapshot is taken.
    #[actix_rt::test]
    async fn mysql_replica_equals_the_table() {
        let db = TestDb::new().await;
        table_of(&db, MYSQL_ROWS).await;
        let notifier = start(&db).await;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut writers = Vec::new();
        for w in 0..4i64 {
            let mut conn = db.conn().await;
            let stop = stop_rx.clone();
            writers.push(tokio::spawn(async move {
                let mut i = 0i64;
                while !*stop.borrow() || i < 50 {
                    i += 1;
                    let first = 1 + (w * 7919 + i * 104_729) % (MYSQL_ROWS - 10);
                    let new = MYSQL_ROWS + 1 + w * 1_000_000 + i;
                    let mut statements = vec![
                        format!(
                            "UPDATE t SET v = v + 1 WHERE id IN ({first}, {})",
                            first + 3
                        ),
                        format!("INSERT INTO t (id) VALUES ({new})"),
                    ];
                    if i % 5 == 0 {
                        statements.push(format!("DELETE FROM t WHERE id = {}", new - 2));
                    }
                    transaction(&mut conn, &statements, i % 9 != 4).await;
                }
                let _ = conn.disconnect().await;
                i
            }));
        }
        let stop_writers = || async {
            stop_tx.send(true).unwrap();
            let mut transactions = 0;
            for w in writers {
                transactions += w.await.unwrap();
            }
            transactions
        };
        let (replica, _) =
            replicate(&notifier, "MySQL", MYSQL_ROWS, stop_writers, || table(&db)).await;
        let stats = notifier.stats().await.unwrap();
        assert_eq!(stats.snapshot_rows, replica.snapshot_rows);
        notifier.stop().await.unwrap();
    }

    /// Whether a snapshot read's transaction is open on `db`: a read-only InnoDB transaction
    /// of another connection to the database.
    async fn mysql_held(db: &TestDb) -> bool {
        db.count(
            "SELECT COUNT(*) FROM information_schema.innodb_trx t \
               JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id \
              WHERE p.db = DATABASE() AND p.id <> CONNECTION_ID() AND t.trx_is_read_only = 1",
        )
        .await
            > 0
    }

    /// `stop()` ends a MySQL / MariaDB snapshot read left waiting on its feed: its consistent
    /// read (which holds InnoDB's purge back) used to stay open, its connection too, until the
    /// whole table had gone to the feed.
    #[actix_rt::test]
    async fn mysql_stop_ends_a_snapshot_read_in_progress() {
        let db = TestDb::new().await;
        table_of(&db, UNREAD_ROWS).await;
        let notifier = start(&db).await;
        let mut held = || mysql_held(&db);
        let late = common::mysql::insert_rows(&db, "t", UNREAD_ROWS + 1..=UNREAD_ROWS + LATE_ROWS);
        let feed = unread_feed(&notifier, late, &mut held).await;
        stop_ends_the_snapshot(notifier, feed, &mut held).await;
    }

    /// Dropping a MySQL / MariaDB feed in the middle of its snapshot ends the read.
    #[actix_rt::test]
    async fn mysql_dropping_a_feed_ends_its_snapshot_read() {
        let db = TestDb::new().await;
        table_of(&db, UNREAD_ROWS).await;
        let notifier = start(&db).await;
        let mut held = || mysql_held(&db);
        let late = common::mysql::insert_rows(&db, "t", UNREAD_ROWS + 1..=UNREAD_ROWS + LATE_ROWS);
        let feed = unread_feed(&notifier, late, &mut held).await;
        dropping_ends_the_read(notifier, feed, &mut held).await;
    }

    #[actix_rt::test]
    async fn mysql_backfill_while_updates_flow() {
        let db = TestDb::new().await;
        table_of(&db, 2_000).await;
        let notifier = start(&db).await;
        let conns = vec![db.conn().await, db.conn().await];
        let writers = move |stop: Arc<AtomicBool>| {
            conns
                .into_iter()
                .zip(0i64..)
                .map(|(mut conn, w)| {
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        let mut i = 0;
                        while !stop.load(Ordering::Relaxed) || i < 100 {
                            i += 1;
                            let (a, b) = rows_of(w, i);
                            let update = format!("UPDATE t SET v = v + 1 WHERE id IN ({a}, {b})");
                            transaction(&mut conn, &[update], true).await;
                        }
                        let _ = conn.disconnect().await;
                    })
                })
                .collect()
        };
        backfill_while_updates_flow(&notifier, writers, || table(&db)).await;
        notifier.stop().await.unwrap();
    }

    /// The case that makes MySQL's fence differ from SQLite's: a transaction takes a journal
    /// id, a later one takes a higher id and commits, the snapshot is read (it sees the
    /// higher id, not the lower), then the first commits. Its change is not in the snapshot,
    /// so the feed must deliver it — a fence at the journal's head would skip it — and the
    /// other change, which the snapshot reflects, must not come again.
    #[actix_rt::test]
    async fn mysql_a_lower_journal_id_committed_after_the_snapshot_is_delivered() {
        let db = TestDb::new().await;
        table_of(&db, 10).await;
        let notifier = start(&db).await;
        let mut early = db.conn().await;
        early
            .query_drop("START TRANSACTION; INSERT INTO t (id) VALUES (100)")
            .await
            .unwrap();
        db.exec("INSERT INTO t (id) VALUES (101)").await;
        let mut feed = notifier
            .subscribe_snapshot(Snapshot::new("t"))
            .await
            .unwrap();
        let mut ids = Vec::new();
        loop {
            let e = next(&mut feed).await;
            assert!(e.is_snapshot());
            ids.push(e.id().as_i64().unwrap());
            if e.ends_snapshot() {
                break;
            }
        }
        assert_eq!(ids, (1..=10).chain([101]).collect::<Vec<_>>());
        early.query_drop("COMMIT").await.unwrap();
        let _ = early.disconnect().await;
        let e = next(&mut feed).await;
        assert_eq!(
            (e.operation(), e.id().as_i64(), e.is_snapshot()),
            (Operation::Insert, Some(100), false)
        );
        let lower = db
            .count("SELECT id FROM sqlnotify_journal WHERE payload LIKE '{\"id\": 100%'")
            .await;
        assert_eq!(e.sequence(), Some(lower));
        let higher = db
            .count("SELECT id FROM sqlnotify_journal WHERE payload LIKE '{\"id\": 101%'")
            .await;
        assert!(lower < higher, "journal ids {lower} and {higher}");
        if let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(500), feed.next()).await
        {
            panic!("an event the snapshot reflects: {}", e.to_record());
        }
        notifier.stop().await.unwrap();
    }

    /// The `v` and first key value of every snapshot row of `table`, read in pages of 4.
    async fn decimal_snapshot(notifier: &Notifier, table: &str) -> Vec<(i64, f64)> {
        let mut feed = notifier
            .subscribe_snapshot(Snapshot::new(table).chunk_rows(4))
            .await
            .unwrap();
        let mut rows = Vec::new();
        loop {
            let e = next(&mut feed).await;
            assert!(e.is_snapshot());
            let key = e.id().values()[0].as_f64().expect("a decimal key");
            rows.push((e.get("v").and_then(|v| v.as_i64()).expect("v"), key));
            if e.ends_snapshot() {
                break;
            }
        }
        rows
    }

    /// DECIMAL keys, alone and in a composite key, across pages of 4: every row once, in
    /// numeric key order — where the text order differs (`10.00` and `9.99`, `-1.10` and
    /// `-1.01`), for values a double cannot tell apart (`0.1` and `0.10000000000000000001`),
    /// for `1.1` written as `1.10`, and negative. `v` numbers the rows in the server's own key
    /// order.
    #[actix_rt::test]
    async fn mysql_decimal_keys_page_in_key_order() {
        let db = TestDb::new().await;
        let singles = [
            "-12.5",
            "-10",
            "-9.5",
            "-1.1",
            "-1.01",
            "-0.5",
            "-0.00000000000000000001",
            "0",
            "0.00000000000000000001",
            "0.1",
            "0.10000000000000000001",
            "0.10000000000000000002",
            "0.10000000000000000003",
            "1.01",
            "1.10",
            "1.10000000000000000001",
            "1.9",
            "9.5",
            "9.99",
            "10",
            "10.01",
            "12345678.9",
            "9999999999.99999999999999999999",
        ];
        let firsts = [
            "-1.10", "-1.01", "-0.01", "1.01", "1.1", "1.9", "9.99", "10.00",
        ];
        let seconds = [
            "-0.5",
            "0.1",
            "0.10000000000000000001",
            "0.10000000000000000002",
        ];
        let pairs: Vec<String> = firsts
            .iter()
            .flat_map(|a| seconds.iter().map(move |b| format!("({a}, {b}, 0)")))
            .collect();
        let values: Vec<String> = singles.iter().map(|d| format!("({d}, 0)")).collect();
        db.exec(&format!(
            "CREATE TABLE dk (d DECIMAL(30, 20) PRIMARY KEY, v INT NOT NULL);
             CREATE TABLE dc (a DECIMAL(6, 2), b DECIMAL(30, 20), v INT NOT NULL,
               PRIMARY KEY (a, b));
             INSERT INTO dk VALUES {};
             INSERT INTO dc VALUES {};
             SET @r := -1;
             UPDATE dk SET v = (@r := @r + 1) ORDER BY d;
             SET @r := -1;
             UPDATE dc SET v = (@r := @r + 1) ORDER BY a, b",
            values.join(", "),
            pairs.join(", ")
        ))
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("dk", Operation::Insert).extra_columns(["v"]))
            .watch(Watch::new("dc", Operation::Insert).extra_columns(["v"]))
            .start()
            .await
            .unwrap();

        let rows = decimal_snapshot(&notifier, "dk").await;
        let vs: Vec<i64> = rows.iter().map(|(v, _)| *v).collect();
        assert_eq!(
            vs,
            (0..singles.len() as i64).collect::<Vec<_>>(),
            "dk: each row once, in key order: {rows:?}"
        );
        let keys: Vec<f64> = rows.iter().map(|(_, k)| *k).collect();
        let want: Vec<f64> = singles.iter().map(|d| d.parse().unwrap()).collect();
        assert_eq!(keys, want, "dk: the keys as the events carry them");

        let rows = decimal_snapshot(&notifier, "dc").await;
        let vs: Vec<i64> = rows.iter().map(|(v, _)| *v).collect();
        assert_eq!(
            vs,
            (0..pairs.len() as i64).collect::<Vec<_>>(),
            "dc: each row once, in key order: {rows:?}"
        );
        let firsts_seen: Vec<f64> = rows.iter().map(|(_, a)| *a).collect();
        let want: Vec<f64> = firsts
            .iter()
            .flat_map(|a| std::iter::repeat_n(a.parse::<f64>().unwrap(), seconds.len()))
            .collect();
        assert_eq!(firsts_seen, want, "dc: the first key column, in order");
        notifier.stop().await.unwrap();
    }

    /// A snapshot row decodes exactly as the trigger's payload of the same row (the same
    /// conversions: temporal text, FLOAT digits, hex of binary strings, BIT as a number), and
    /// keys come in order (a composite key, then a table without a primary key whose key
    /// values repeat across page boundaries).
    #[actix_rt::test]
    async fn mysql_rows_match_the_triggers_and_page_by_key() {
        let db = TestDb::new().await;
        db.exec(
            "CREATE TABLE k (a INT NOT NULL, b VARCHAR(10) NOT NULL, at DATETIME(3), f FLOAT,
               bin VARBINARY(4), bits BIT(5), d DECIMAL(6, 2), s VARCHAR(20), j JSON,
               PRIMARY KEY (a, b));
             CREATE TABLE n (k INT NULL, v INT NOT NULL)",
        )
        .await;
        let carried = ["at", "f", "bin", "bits", "d", "s", "j"];
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("k", Operation::Insert).extra_columns(carried))
            .watch(
                Watch::new("n", Operation::Insert)
                    .primary_keys(["k"])
                    .extra_columns(["v"]),
            )
            .start()
            .await
            .unwrap();
        let mut live = notifier
            .subscribe_snapshot(Snapshot::new("k"))
            .await
            .unwrap();
        assert!(
            common::wait_until(Duration::from_secs(30), || async { live.progress().done }).await
        );
        db.exec(
            "INSERT INTO k VALUES (1, 'x', '2024-01-02 03:04:05.678', 1.1, X'00ff', b'10101', \
             12.50, 'caf\u{e9} \"q\"', '{\"a\": [1, 2.5, null]}')",
        )
        .await;
        let change = next(&mut live).await;
        assert!(!change.is_snapshot());
        let mut feed = notifier
            .subscribe_snapshot(Snapshot::new("k"))
            .await
            .unwrap();
        let row = next(&mut feed).await;
        assert!(row.is_snapshot() && row.ends_snapshot());
        assert_eq!(row.id(), change.id());
        assert_eq!(row.extra_columns(), change.extra_columns());
        assert_eq!(row.get("f"), Some(&serde_json::json!(1.1)));
        assert_eq!(row.get("bin"), Some(&serde_json::json!("00FF")));

        // composite key, in key order across pages of 7
        let values: Vec<String> = (0..40)
            .map(|i| format!("({}, '{}')", i % 4, (b'a' + (i / 4) as u8) as char))
            .collect();
        db.exec(&format!(
            "INSERT INTO k (a, b) VALUES {}",
            values.join(", ")
        ))
        .await;
        let mut feed = notifier
            .subscribe_snapshot(Snapshot::new("k").chunk_rows(7))
            .await
            .unwrap();
        let mut keys = Vec::new();
        loop {
            let e = next(&mut feed).await;
            let id = e.id().values().to_vec();
            keys.push((id[0].as_i64().unwrap(), id[1].as_str().unwrap().to_string()));
            if e.ends_snapshot() {
                break;
            }
        }
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(keys, sorted, "key order, each row once");
        assert_eq!(keys.len(), 41);
        assert_eq!(feed.progress().total, Some(41));

        // no primary key: keys repeat (and one is NULL); pages of 3 never split a key
        db.exec(
            "INSERT INTO n VALUES (NULL, 0), (NULL, 1), (2, 2), (2, 3), (2, 4), (2, 5), (3, 6),
             (1, 7), (1, 8), (4, 9), (4, 10), (4, 11), (5, 12)",
        )
        .await;
        let mut feed = notifier
            .subscribe_snapshot(Snapshot::new("n").chunk_rows(3))
            .await
            .unwrap();
        let mut rows = Vec::new();
        loop {
            let e = next(&mut feed).await;
            rows.push((
                e.id().as_i64(),
                e.get("v").and_then(|v| v.as_i64()).unwrap(),
            ));
            if e.ends_snapshot() {
                break;
            }
        }
        let keys: Vec<Option<i64>> = rows.iter().map(|(k, _)| *k).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "key order (NULL first)");
        let mut vs: Vec<i64> = rows.iter().map(|(_, v)| *v).collect();
        vs.sort_unstable();
        assert_eq!(vs, (0..13).collect::<Vec<_>>(), "each row once");
        notifier.stop().await.unwrap();
    }
}

/// A SQLite row holding text that is not UTF-8 (`CAST(x'ff' AS TEXT)`: SQLite stores it as
/// given) arrives in a snapshot with its bytes read lossily, as the journal reads them; it
/// used to fail every snapshot of its table.
#[actix_rt::test]
async fn sqlite_a_row_of_text_that_is_not_utf8_does_not_fail_the_snapshot() {
    use common::sqlite::TempDb;
    let db = TempDb::new();
    db.exec(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT);
         INSERT INTO t VALUES (1, 'plain'), (2, CAST(x'41ff42' AS TEXT)), (3, 'after')",
    );
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert).extra_columns(["name"]))
        .start()
        .await
        .unwrap();
    let mut feed = notifier
        .subscribe_snapshot(Snapshot::new("t"))
        .await
        .unwrap();
    let mut names = Vec::new();
    loop {
        let e = next(&mut feed).await;
        names.push(e.get("name").and_then(|v| v.as_str()).unwrap().to_string());
        if e.ends_snapshot() {
            break;
        }
    }
    assert_eq!(names, ["plain", "A\u{fffd}B", "after"]);
    notifier.stop().await.unwrap();
}
