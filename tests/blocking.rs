//! The blocking API (`sqlnotify::blocking`) from plain `#[test]` threads, with no async runtime
//! on the test thread: start / subscribe / notify / stats / unsubscribe / stop on SQLite and
//! PostgreSQL, overflow policies on the bounded receivers, handles shared between threads,
//! dropped without `stop()`, and start errors.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sqlite_file::SqliteFile as TempDb;
use common::{TestDb, ARRIVES_WITHIN};
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use serde_json::json;
use sqlnotify::{
    blocking, ChangeEvent, Error, Filter, Notifier, Operation, OverflowPolicy, Status,
    Subscription, Tier, Watch,
};

/// The next event, or a panic after [`ARRIVES_WITHIN`].
fn next(rx: &Receiver<ChangeEvent>) -> ChangeEvent {
    rx.recv_timeout(ARRIVES_WITHIN)
        .expect("an event should have arrived")
}

fn id(event: &ChangeEvent) -> i64 {
    event.id().as_i64().expect("an integer key")
}

/// Polls `check` every 10 ms until it holds, up to `limit`.
fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A current-thread tokio runtime, for the PostgreSQL test helpers (which are async).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn handle_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<blocking::Notifier>();
}

#[test]
fn sqlite_subscribe_notify_stats_unsubscribe_stop() {
    let db = TempDb::new("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)");
    let notifier = blocking::Notifier::start(
        Notifier::builder(db.url())
            .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]))
            .watch(Watch::new("users", Operation::Update).extra_columns(["email"])),
    )
    .unwrap();
    assert!(notifier.is_running());
    assert_eq!(notifier.dialect_name(), "sqlite");
    let channels: Vec<&str> = notifier.channels().iter().map(|c| c.name()).collect();
    assert_eq!(
        channels,
        ["sqlnotify_main_users_insert", "sqlnotify_main_users_update"]
    );

    let (ins_id, ins) = notifier
        .subscribe(Subscription::new("users", Operation::Insert))
        .unwrap();
    let (_, upd) = notifier
        .subscribe(Subscription::new("users", Operation::Update).filter(Filter::eq("id", 2)))
        .unwrap();

    // A row committed right after subscribe() returned arrives.
    db.exec("INSERT INTO users VALUES (1, 'ann@example.com')");
    let e = next(&ins);
    assert_eq!(id(&e), 1);
    assert_eq!(e.get("email"), Some(&json!("ann@example.com")));
    assert_eq!(e.operation(), Operation::Insert);

    // Filters apply; the sentinel on the same channel proves row 1's update was filtered out.
    db.exec("INSERT INTO users VALUES (2, 'bob@example.com')");
    db.exec("UPDATE users SET email = 'x' WHERE id = 1; UPDATE users SET email = 'y' WHERE id = 2");
    assert_eq!(id(&next(&ins)), 2);
    let e = next(&upd);
    assert_eq!((id(&e), e.get("email")), (2, Some(&json!("y"))));
    assert!(upd.try_recv().is_err());

    // Custom notifications go through the database like a trigger's event.
    notifier
        .notify(
            "users",
            Operation::Insert,
            json!({"id": 100, "email": "custom"}),
        )
        .unwrap();
    let e = next(&ins);
    assert_eq!((id(&e), e.get("email")), (100, Some(&json!("custom"))));
    let e = notifier
        .notify("users", Operation::Delete, json!({"id": 1}))
        .unwrap_err();
    assert!(matches!(e, Error::NotWatched { .. }), "{e:?}");
    let e = notifier
        .notify("users", Operation::Insert, json!([1, 2]))
        .unwrap_err();
    assert!(matches!(e, Error::InvalidPayload { .. }), "{e:?}");

    // Subscribing to something not watched is an error, as in the async API.
    let e = notifier
        .subscribe(Subscription::new("users", Operation::Delete))
        .unwrap_err();
    assert!(matches!(e, Error::NotWatched { .. }), "{e:?}");

    // The notifier's thread counts a batch after handing it over: wait until it has settled.
    let settled = wait_until(ARRIVES_WITHIN, || {
        let stats = notifier.stats().unwrap();
        stats.in_flight == 0 && stats.queued == 0
    });
    let stats = notifier.stats().unwrap();
    assert!(settled, "{stats:?}");
    // rows 1 and 2 inserted and updated, custom row 100: row 2's update and the inserts to
    // their subscribers, row 1's update filtered out
    assert_eq!(
        (stats.received, stats.delivered, stats.filtered_out),
        (5, 4, 1),
        "{stats:?}"
    );

    // Unsubscribing disconnects the receiver (nothing was queued).
    notifier.unsubscribe(ins_id).unwrap();
    assert_eq!(
        ins.recv_timeout(ARRIVES_WITHIN).unwrap_err(),
        RecvTimeoutError::Disconnected
    );
    let e = notifier.unsubscribe(ins_id).unwrap_err();
    assert!(matches!(e, Error::UnknownSubscription { .. }), "{e:?}");

    // stop() joins the thread: every receiver is disconnected when it returns.
    notifier.stop().unwrap();
    assert!(!notifier.is_running());
    assert_eq!(upd.try_recv().unwrap_err(), TryRecvError::Disconnected);
    assert!(matches!(notifier.stop(), Err(Error::NotRunning)));
    assert!(matches!(notifier.stats(), Err(Error::NotRunning)));
    assert!(matches!(
        notifier.subscribe(Subscription::new("users", Operation::Insert)),
        Err(Error::NotRunning)
    ));
    assert!(matches!(
        notifier.notify("users", Operation::Insert, json!({"id": 1})),
        Err(Error::NotRunning)
    ));
}

#[test]
fn dropping_the_handle_stops_the_notifier_and_honours_cleanup_on_stop() {
    let db = TempDb::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let notifier = blocking::Notifier::start(
        Notifier::builder(db.url())
            .cleanup_on_stop(true)
            .watch(Watch::new("t", Operation::Insert)),
    )
    .unwrap();
    assert_eq!(db.triggers(), 1);
    let (_, rx) = notifier
        .subscribe(Subscription::new("t", Operation::Insert))
        .unwrap();
    let status = notifier.subscribe_status().unwrap();
    // A subscription nobody reads, holding one event in its channel and one in its buffer:
    // the third row is a lag, reported on the status receiver.
    let (stuck_id, stuck) = notifier
        .subscribe(
            Subscription::new("t", Operation::Insert)
                .policy(OverflowPolicy::DropOldest)
                .buffer(1),
        )
        .unwrap();
    db.exec("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2); INSERT INTO t VALUES (3)");
    assert_eq!([1, 2, 3].map(|_| id(&next(&rx))), [1, 2, 3]);
    let lagged = status
        .recv_timeout(ARRIVES_WITHIN)
        .expect("a status should have arrived")
        .status;
    assert_eq!(
        lagged,
        Status::Lagged {
            subscription: stuck_id,
            dropped: 1
        }
    );
    // (stop() hands buffered events over first: it would wait for a live receiver's room)
    drop(stuck);

    drop(notifier);
    // Dropped = stopped and joined: no waiting needed.
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Disconnected);
    assert_eq!(db.triggers(), 0, "cleanup_on_stop ran on drop");
    // The stuck subscription's buffered event never reached anyone: at stop it counts as
    // dropped and is reported; then the status receiver was disconnected.
    let statuses: Vec<Status> = status.try_iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [Status::Lagged {
            subscription: stuck_id,
            dropped: 1
        }]
    );
    assert_eq!(status.try_recv().unwrap_err(), TryRecvError::Disconnected);
}

#[test]
fn start_errors_are_returned() {
    let db = TempDb::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let e = blocking::Notifier::start(
        Notifier::builder(db.url()).watch(Watch::new("nope", Operation::Insert)),
    )
    .unwrap_err();
    assert!(matches!(e, Error::UnknownTable { .. }), "{e:?}");
    assert_eq!(db.triggers(), 0);

    let missing = db.dir.join("missing.db");
    let e = blocking::Notifier::start(
        Notifier::builder(format!("sqlite://{}", missing.display()))
            .watch(Watch::new("t", Operation::Insert)),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Database { .. }), "{e:?}");

    let e = blocking::Notifier::start(
        Notifier::builder("oracle://localhost/x").watch(Watch::new("t", Operation::Insert)),
    )
    .unwrap_err();
    assert!(matches!(e, Error::UnsupportedDatabase { .. }), "{e:?}");
}

#[test]
fn drop_oldest_keeps_the_newest_events_and_reports_lag() {
    let db = TempDb::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let notifier = blocking::Notifier::start(
        Notifier::builder(db.url()).watch(Watch::new("t", Operation::Insert)),
    )
    .unwrap();
    let status = notifier.subscribe_status().unwrap();
    // Channel capacity 2 (the buffer) + 2 waiting in the subscription's buffer.
    let (sub, rx) = notifier
        .subscribe(
            Subscription::new("t", Operation::Insert)
                .policy(OverflowPolicy::DropOldest)
                .buffer(2),
        )
        .unwrap();
    // A second, fast subscriber is not affected by the slow one.
    let (_, fast) = notifier
        .subscribe(Subscription::new("t", Operation::Insert))
        .unwrap();

    let rows: Vec<String> = (1..=20)
        .map(|i| format!("INSERT INTO t VALUES ({i});"))
        .collect();
    db.exec(&format!("BEGIN; {} COMMIT;", rows.concat()));
    let fast_ids: Vec<i64> = (0..20).map(|_| id(&next(&fast))).collect();
    assert_eq!(fast_ids, (1..=20).collect::<Vec<_>>());

    assert!(
        wait_until(ARRIVES_WITHIN, || notifier.stats().unwrap().dropped == 16),
        "{:?}",
        notifier.stats()
    );
    // The channel holds the first two; the buffer kept the newest two.
    let slow: Vec<i64> = (0..4).map(|_| id(&next(&rx))).collect();
    assert_eq!(slow, [1, 2, 19, 20]);
    db.exec("INSERT INTO t VALUES (21)");
    assert_eq!(id(&next(&rx)), 21, "nothing else was queued");

    let mut lagged = 0;
    let deadline = Instant::now() + ARRIVES_WITHIN;
    while lagged < 16 {
        let s = status
            .recv_deadline(deadline)
            .expect("Lagged notices for 16 events");
        if let Status::Lagged {
            subscription,
            dropped,
        } = s.status
        {
            assert_eq!(subscription, sub);
            lagged += dropped;
        }
    }
    assert_eq!(lagged, 16);
    notifier.stop().unwrap();
}

#[test]
fn wait_policy_delivers_everything_in_order_through_a_tiny_channel() {
    let db = TempDb::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let notifier = blocking::Notifier::start(
        Notifier::builder(db.url()).watch(Watch::new("t", Operation::Insert)),
    )
    .unwrap();
    let (_, rx) = notifier
        .subscribe(Subscription::new("t", Operation::Insert).buffer(1))
        .unwrap();
    let rows: Vec<String> = (1..=300)
        .map(|i| format!("INSERT INTO t VALUES ({i});"))
        .collect();
    db.exec(&format!("BEGIN; {} COMMIT;", rows.concat()));
    let got: Vec<i64> = (0..300).map(|_| id(&next(&rx))).collect();
    assert_eq!(got, (1..=300).collect::<Vec<_>>());
    assert_eq!(notifier.stats().unwrap().dropped, 0);
    notifier.stop().unwrap();
}

#[test]
fn one_handle_shared_by_threads() {
    let db = TempDb::new("CREATE TABLE t (id INTEGER PRIMARY KEY, who TEXT)");
    let notifier = Arc::new(
        blocking::Notifier::start(
            Notifier::builder(db.url())
                .watch(Watch::new("t", Operation::Insert).extra_columns(["who"])),
        )
        .unwrap(),
    );
    let (_, rx) = notifier
        .subscribe(Subscription::new("t", Operation::Insert))
        .unwrap();
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let notifier = notifier.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    notifier
                        .notify(
                            "t",
                            Operation::Insert,
                            json!({"id": t * 100 + i, "who": format!("thread {t}")}),
                        )
                        .unwrap();
                }
            })
        })
        .collect();
    let mut got: Vec<i64> = (0..100).map(|_| id(&next(&rx))).collect();
    for s in senders {
        s.join().unwrap();
    }
    // Each thread's events in its own order.
    for t in 0..4 {
        let mine: Vec<i64> = got.iter().copied().filter(|i| i / 100 == t).collect();
        assert_eq!(mine, (0..25).map(|i| t * 100 + i).collect::<Vec<_>>());
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 100);
    // The last handle going away (in a thread other than the notifier's) stops it.
    let notifier = Arc::try_unwrap(notifier).unwrap();
    drop(notifier);
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Disconnected);
}

#[test]
fn postgres_insert_notify_durable_tier_and_cleanup_on_stop() {
    let rt = runtime();
    let db = rt.block_on(TestDb::new());
    rt.block_on(db.exec(
        "CREATE TABLE users (id bigint PRIMARY KEY, email text); \
         CREATE TABLE orders (id bigint PRIMARY KEY, total int)",
    ));
    let notifier = blocking::Notifier::start(
        Notifier::builder(&db.url)
            .cleanup_on_stop(true)
            .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]))
            .watch(
                Watch::new("orders", Operation::Update)
                    .extra_columns(["total"])
                    .tier(Tier::Durable),
            ),
    )
    .unwrap();
    assert_eq!(notifier.dialect_name(), "postgresql");
    let (_, users) = notifier
        .subscribe(Subscription::new("users", Operation::Insert))
        .unwrap();
    let (_, orders) = notifier
        .subscribe(Subscription::new("public.orders", Operation::Update))
        .unwrap();

    rt.block_on(db.exec(
        "INSERT INTO users VALUES (1, 'ann@example.com'); \
         INSERT INTO orders VALUES (7, 10); UPDATE orders SET total = 11 WHERE id = 7",
    ));
    let e = next(&users);
    assert_eq!(
        (id(&e), e.get("email")),
        (1, Some(&json!("ann@example.com")))
    );
    assert_eq!(e.channel(), "sqlnotify_public_users_insert");
    let e = next(&orders);
    assert_eq!((id(&e), e.get("total")), (7, Some(&json!(11))));

    notifier
        .notify("users", Operation::Insert, json!({"id": 2, "email": "b"}))
        .unwrap();
    assert_eq!(id(&next(&users)), 2);
    // An oversized custom event goes through the overflow table unless refused.
    let big = "x".repeat(10_000);
    let e = notifier
        .notify_with(
            sqlnotify::CustomEvent::new("users", Operation::Insert, json!({"id": 3, "email": big}))
                .allow_overflow(false),
        )
        .unwrap_err();
    assert!(matches!(e, Error::PayloadTooLarge { .. }), "{e:?}");
    notifier
        .notify("users", Operation::Insert, json!({"id": 3, "email": big}))
        .unwrap();
    let e = next(&users);
    assert_eq!(e.get("email").and_then(|v| v.as_str()), Some(big.as_str()));

    // Blocking calls are fine even from a thread that is inside an async runtime.
    let stats = rt.block_on(async { notifier.stats().unwrap() });
    assert!(stats.received >= 4, "{stats:?}");
    assert!(stats.overflow_resolved >= 1, "{stats:?}");

    notifier.stop().unwrap();
    assert_eq!(users.try_recv().unwrap_err(), TryRecvError::Disconnected);
    let triggers = rt.block_on(db.count(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'sqlnotify%' AND NOT tgisinternal",
    ));
    assert_eq!(triggers, 0, "cleanup_on_stop removed the triggers");
}

#[test]
fn postgres_dropped_handle_stops_cleanly() {
    let rt = runtime();
    let db = rt.block_on(TestDb::new());
    rt.block_on(db.exec("CREATE TABLE t (id int PRIMARY KEY)"));
    let notifier = blocking::Notifier::start(
        Notifier::builder(&db.url).watch(Watch::new("t", Operation::Delete)),
    )
    .unwrap();
    let (_, rx) = notifier
        .subscribe(Subscription::new("t", Operation::Delete))
        .unwrap();
    rt.block_on(db.exec("INSERT INTO t VALUES (5); DELETE FROM t"));
    assert_eq!(id(&next(&rx)), 5);
    drop(notifier);
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Disconnected);
    // The listener's connection is closed: nothing of ours is left on the server.
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
        db.name
    );
    // (A closed connection leaves pg_stat_activity a moment after the client is gone.)
    assert!(
        wait_until(ARRIVES_WITHIN, || rt.block_on(db.count(&sql)) == 0),
        "connections left open after drop"
    );
}
