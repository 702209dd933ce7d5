//! Installation and lifecycle against a real PostgreSQL: drift detection, revoke, cleanup on
//! start/stop, externally managed DDL, stop semantics, restart, stats and subscriber panics.

mod common;
mod scenarios;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, Events, TestDb};
use sqlnotify::{Error, Notifier, Operation, Subscription, Watch};

async fn trigger_oid(db: &TestDb, name: &str) -> Option<i64> {
    db.client()
        .await
        .query_opt(
            "SELECT oid::bigint FROM pg_trigger WHERE tgname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

async fn catalog_channels(db: &TestDb) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT channel FROM sqlnotify.catalog ORDER BY channel",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

const USERS_INSERT: &str = "sqlnotify_public_users_insert";

#[actix_rt::test]
async fn unchanged_watches_are_left_alone_and_changed_ones_revoked_or_refused() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, a text, b text)")
        .await;
    let v1 = Notifier::builder(&db.url)
        .watch(Watch::new("users", Operation::Insert).extra_columns(["a"]));
    v1.start().await.unwrap().stop().await.unwrap();
    let first = trigger_oid(&db, USERS_INSERT).await.expect("installed");

    v1.start().await.unwrap().stop().await.unwrap();
    assert_eq!(
        trigger_oid(&db, USERS_INSERT).await,
        Some(first),
        "no DROP when nothing changed"
    );

    let v2 = Notifier::builder(&db.url)
        .watch(Watch::new("users", Operation::Insert).extra_columns(["a", "b"]));
    let err = v2
        .clone()
        .revoke_on_model_change(false)
        .start()
        .await
        .unwrap_err();
    match &err {
        Error::DefinitionDrift { channel, table, .. } => {
            assert_eq!(
                (channel.as_str(), table.as_str()),
                (USERS_INSERT, "public.users")
            )
        }
        other => panic!("expected drift, got {other}"),
    }
    assert_eq!(
        trigger_oid(&db, USERS_INSERT).await,
        Some(first),
        "a refused start changes nothing"
    );

    let notifier = v2.start().await.unwrap(); // revoke_on_model_change defaults to true
    let replaced = trigger_oid(&db, USERS_INSERT).await.unwrap();
    assert_ne!(replaced, first);
    let mut ev = Events::subscribe(&notifier, Subscription::new("users", Operation::Insert)).await;
    db.exec("INSERT INTO users VALUES (1, 'x', 'y')").await;
    assert_eq!(
        ev.next().await.get("b"),
        Some(&serde_json::json!("y")),
        "the new definition is live"
    );
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_trigger_dropped_behind_our_back_is_reinstalled() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY)").await;
    let builder = Notifier::builder(&db.url).watch(Watch::new("users", Operation::Insert));
    builder.start().await.unwrap().stop().await.unwrap();
    db.exec("DROP TABLE users; CREATE TABLE users (id int PRIMARY KEY)")
        .await;
    assert_eq!(trigger_oid(&db, USERS_INSERT).await, None);
    let notifier = builder.start().await.unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("users", Operation::Insert)).await;
    db.exec("INSERT INTO users VALUES (1)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn cleanup_on_start_removes_watches_dropped_from_the_code() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE orders (id int PRIMARY KEY)")
        .await;
    common::start_and_stop(
        Notifier::builder(&db.url)
            .watch(Watch::new("users", Operation::Insert))
            .watch(Watch::new("orders", Operation::Delete)),
    )
    .await;
    assert_eq!(catalog_channels(&db).await.len(), 2);

    // Without cleanup, a watch removed from the code stays installed ...
    let only_users = Notifier::builder(&db.url).watch(Watch::new("users", Operation::Insert));
    only_users.start().await.unwrap().stop().await.unwrap();
    assert!(trigger_oid(&db, "sqlnotify_public_orders_delete")
        .await
        .is_some());
    // ... with cleanup_on_start it is removed, and the remaining watch still works.
    let notifier = only_users.cleanup_on_start(true).start().await.unwrap();
    assert_eq!(
        trigger_oid(&db, "sqlnotify_public_orders_delete").await,
        None
    );
    assert_eq!(catalog_channels(&db).await, [USERS_INSERT]);
    assert_eq!(
        db.count("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE nspname = 'sqlnotify'")
            .await,
        2,
        "the remaining watch's trigger function and its helper"
    );
    let mut ev = Events::subscribe(&notifier, Subscription::new("users", Operation::Insert)).await;
    db.exec("INSERT INTO users VALUES (1)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    notifier.stop().await.unwrap();
}

/// A subscription registered on the builder is validated with the watches, before anything is
/// installed or — with `cleanup_on_start` — removed: one on an operation no watch covers, or
/// filtering on a column the channel does not carry, fails `start()` with another
/// application's trigger still in place and nothing of this builder's installed. It used to be
/// checked only once the pipeline ran, after the install had removed every other trigger.
#[actix_rt::test]
async fn a_builder_subscription_that_selects_no_watch_fails_start_before_anything_is_installed() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE orders (id int PRIMARY KEY)")
        .await;
    // Another application's watch.
    common::start_and_stop(
        Notifier::builder(&db.url).watch(Watch::new("orders", Operation::Delete)),
    )
    .await;
    let theirs = trigger_oid(&db, "sqlnotify_public_orders_delete")
        .await
        .unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let recipient = common::Forward(tx).start_actor().recipient();
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("users", Operation::Insert))
        .cleanup_on_start(true);
    let not_watched = builder.clone().subscribe(
        Subscription::new("users", Operation::Delete),
        recipient.clone(),
    );
    let err = not_watched.start().await.map(|_| ()).unwrap_err();
    assert!(
        matches!(&err, Error::NotWatched { table, operation: Operation::Delete, .. }
            if table == "public.users"),
        "{err}"
    );
    let unknown_column = builder.subscribe(
        Subscription::new("users", Operation::Insert).filter(sqlnotify::Filter::eq("email", "a")),
        recipient,
    );
    let err = unknown_column.start().await.map(|_| ()).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownFilterColumn { column, .. } if column == "email"),
        "{err}"
    );
    assert_eq!(
        trigger_oid(&db, "sqlnotify_public_orders_delete").await,
        Some(theirs),
        "the other application's trigger is untouched"
    );
    assert_eq!(
        trigger_oid(&db, USERS_INSERT).await,
        None,
        "nothing was installed"
    );
    assert_eq!(
        catalog_channels(&db).await,
        ["sqlnotify_public_orders_delete"]
    );
}

/// `cleanup_installed_on_stop` removes at stop what this notifier's `start()` installed, and
/// nothing it found installed: another notifier's trigger, identical to its own, stays.
#[actix_rt::test]
async fn cleanup_installed_on_stop_removes_only_what_start_installed() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE orders (id int PRIMARY KEY)")
        .await;
    let app = Notifier::builder(&db.url)
        .watch(Watch::new("users", Operation::Insert))
        .start()
        .await
        .unwrap();
    let theirs = trigger_oid(&db, USERS_INSERT).await.unwrap();
    assert_eq!(app.installed_channels(), [USERS_INSERT]);
    let visitor = Notifier::builder(&db.url)
        .watch(Watch::new("users", Operation::Insert))
        .watch(Watch::new("orders", Operation::Insert))
        .revoke_on_model_change(false)
        .cleanup_installed_on_stop(true)
        .start()
        .await
        .unwrap();
    assert_eq!(
        visitor.installed_channels(),
        ["sqlnotify_public_orders_insert"]
    );
    visitor.stop().await.unwrap();
    assert_eq!(trigger_oid(&db, USERS_INSERT).await, Some(theirs));
    assert_eq!(
        trigger_oid(&db, "sqlnotify_public_orders_insert").await,
        None
    );
    assert_eq!(catalog_channels(&db).await, [USERS_INSERT]);
    let mut ev = Events::subscribe(&app, Subscription::new("users", Operation::Insert)).await;
    db.exec("INSERT INTO users VALUES (1)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    app.stop().await.unwrap();
}

#[actix_rt::test]
async fn cleanup_on_stop_and_cleanup_remove_objects() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE orders (id int PRIMARY KEY)")
        .await;
    let keep = Notifier::builder(&db.url).watch(Watch::new("orders", Operation::Insert));
    keep.start().await.unwrap().stop().await.unwrap();
    let temporary = Notifier::builder(&db.url)
        .watch(Watch::new("users", Operation::Insert))
        .cleanup_on_stop(true);
    let notifier = temporary.start().await.unwrap();
    assert!(trigger_oid(&db, USERS_INSERT).await.is_some());
    notifier.stop().await.unwrap();
    assert_eq!(
        trigger_oid(&db, USERS_INSERT).await,
        None,
        "our trigger is gone"
    );
    assert_eq!(
        catalog_channels(&db).await,
        ["sqlnotify_public_orders_insert"],
        "others stay"
    );

    assert_eq!(Notifier::builder(&db.url).cleanup().await.unwrap(), 1);
    assert_eq!(
        db.count("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'sqlnotify%'")
            .await,
        0
    );
    assert!(catalog_channels(&db).await.is_empty());
}

#[actix_rt::test]
async fn install_sql_applied_by_hand_is_verified_with_manage_triggers_off() {
    let db = TestDb::new().await;
    db.exec(r#"CREATE TABLE "Users" (id int PRIMARY KEY, "e-mail" text)"#)
        .await;
    let builder = Notifier::builder(&db.url)
        .watch(
            Watch::new("Users", Operation::Update)
                .extra_columns(["e-mail"])
                .trigger_columns(["e-mail"]),
        )
        .watch(Watch::new("Users", Operation::Insert).channel_label("it's new"));
    let sql = builder.install_sql().await.unwrap();
    assert!(sql.contains("CREATE TRIGGER"));
    assert_eq!(
        db.count("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'sqlnotify%'")
            .await,
        0,
        "install_sql installs nothing"
    );
    let external = builder.clone().manage_triggers(false);
    let err = external.start().await.unwrap_err();
    assert!(matches!(err, Error::DefinitionDrift { .. }), "{err}");
    assert!(err.to_string().contains("not installed"), "{err}");

    db.exec(&sql).await;
    db.exec(&sql).await; // idempotent
    let notifier = external.start().await.unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("Users", Operation::Update)).await;
    db.exec(r#"INSERT INTO "Users" VALUES (1, 'a'); UPDATE "Users" SET "e-mail" = 'b'"#)
        .await;
    assert_eq!(ev.next().await.get("e-mail"), Some(&serde_json::json!("b")));
    notifier.stop().await.unwrap();
    // start() with management on finds the hand-applied objects unchanged.
    let before = trigger_oid(&db, "sqlnotify_it's new").await.unwrap();
    builder.start().await.unwrap().stop().await.unwrap();
    assert_eq!(trigger_oid(&db, "sqlnotify_it's new").await, Some(before));
}

/// Creates table `t` in `db`; a builder watching its inserts.
async fn watching_t(db: &TestDb) -> sqlnotify::NotifierBuilder {
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    Notifier::builder(&db.url).watch(Watch::new("t", Operation::Insert))
}

#[actix_rt::test]
async fn stop_delivers_everything_already_received_then_start_works_again() {
    let db = TestDb::new().await;
    let builder = watching_t(&db).await;
    let notifier = builder.start().await.unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    // The closure is subscribed on an arbiter of its own (closures run on the arbiter they
    // were subscribed on), so it can wait there for a gate without holding up this thread:
    // nothing is handled before the gate opens, which is after stop() has begun — so the 200
    // counted once stop() returns were handled while it waited, not before it was called.
    let (open, gate) = std::sync::mpsc::channel::<()>();
    let arbiter = actix::Arbiter::new();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let (on_arbiter, h) = (notifier.clone(), handled.clone());
    assert!(arbiter.spawn(async move {
        let mut gate = Some(gate);
        let subscription = on_arbiter
            .subscribe_fn(Subscription::new("t", Operation::Insert), move |_| {
                if let Some(gate) = gate.take() {
                    // Bounded: a test that failed before opening it ends anyway.
                    let _ = gate.recv_timeout(Duration::from_secs(60));
                }
                // A slow handler: events pile up in its buffer.
                std::thread::sleep(Duration::from_millis(2));
                h.fetch_add(1, Ordering::SeqCst);
            })
            .await;
        let _ = subscribed_tx.send(subscription);
    }));
    subscribed.await.unwrap().unwrap();
    db.exec("INSERT INTO t SELECT generate_series(1, 200)")
        .await;
    let received = wait_until(Duration::from_secs(10), || async {
        notifier.stats().await.unwrap().received == 200
    })
    .await;
    assert!(received);
    assert_eq!(
        handled.load(Ordering::SeqCst),
        0,
        "the gate holds the handler"
    );
    let mut stopping = Box::pin(notifier.stop());
    // stop() has begun (polled once) with every event still unhandled; then the gate opens
    // and the 200 take at least 400 ms to run.
    assert!(
        futures_util::FutureExt::now_or_never(&mut stopping).is_none(),
        "stop() returned at once, with every event still unhandled"
    );
    open.send(()).unwrap();
    stopping.await.unwrap();
    assert_eq!(
        handled.load(Ordering::SeqCst),
        200,
        "stop() returned only after every handler ran"
    );
    arbiter.stop();
    let stats = notifier.stats().await.unwrap();
    assert_eq!(
        (stats.received, stats.delivered, stats.malformed),
        (200, 200, 0)
    );

    assert!(matches!(notifier.stop().await, Err(Error::NotRunning)));
    assert!(!notifier.is_running());
    let err = notifier
        .subscribe_fn(Subscription::new("t", Operation::Insert), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotRunning), "{err}");

    let again = builder.start().await.unwrap();
    let mut ev = Events::subscribe(&again, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (1000)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(1000));
    again.stop().await.unwrap();
}

/// A closure subscriber on an arbiter of its own whose events take longer to run than
/// `stop()`'s stall limit (15 s), all handed over at once, is waited for: it makes progress,
/// so `stop()` returns once it ran every event, and nothing is dropped.
#[actix_rt::test]
async fn stop_waits_for_closures_that_run_longer_than_its_stall_limit() {
    let db = TestDb::new().await;
    let notifier = watching_t(&db).await.start().await.unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let (h, n) = (handled.clone(), notifier.clone());
    let arbiter = actix::Arbiter::new();
    let (subscribed, is_subscribed) = tokio::sync::oneshot::channel();
    arbiter.spawn(async move {
        let id = n
            .subscribe_fn(Subscription::new("t", Operation::Insert), move |_| {
                std::thread::sleep(Duration::from_millis(40));
                h.fetch_add(1, Ordering::SeqCst);
            })
            .await;
        let _ = subscribed.send(id.is_ok());
    });
    assert!(is_subscribed.await.unwrap());
    db.exec("INSERT INTO t SELECT generate_series(1, 450)")
        .await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            notifier.stats().await.unwrap().received == 450
        })
        .await
    );
    notifier.stop().await.unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 450, "stop() gave up on it");
    let stats = notifier.stats().await.unwrap();
    assert_eq!((stats.delivered, stats.dropped), (450, 0), "{stats:?}");
    arbiter.stop();
}

/// A subscriber that takes nothing (a channel whose reader is gone but not dropped) does not
/// hold `stop()` for ever: it waits while subscribers take events, gives up once none was
/// taken for a few seconds, counts what it could not hand over as dropped, and the notifier
/// starts again. It used to wait for that subscriber without end.
#[actix_rt::test]
async fn stop_returns_while_a_subscriber_takes_nothing() {
    let db = TestDb::new().await;
    let builder = watching_t(&db).await;
    let notifier = builder.start().await.unwrap();
    let mut taken = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let (_, _untaken) = notifier
        .subscribe_channel(Subscription::new("t", Operation::Insert).buffer(1))
        .await
        .unwrap();
    db.exec("INSERT INTO t SELECT generate_series(1, 5)").await;
    assert_eq!(common::ids(&taken.take(5).await), [1, 2, 3, 4, 5]);
    let stopped = tokio::time::timeout(Duration::from_secs(60), notifier.stop()).await;
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "stop() with a subscriber that takes nothing: {stopped:?}"
    );
    let stats = notifier.stats().await.unwrap();
    // What the subscriber was not handed is dropped: every (event, subscription) pair is
    // delivered or dropped.
    assert!(stats.dropped > 0 && stats.queued == 0, "{stats:?}");
    assert_eq!(stats.delivered + stats.dropped, 10, "{stats:?}");
    let again = builder.start().await.unwrap();
    let mut ev = Events::subscribe(&again, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (6)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(6));
    again.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_panicking_subscriber_is_isolated() {
    let db = TestDb::new().await;
    let notifier = watching_t(&db).await.start().await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    notifier
        .subscribe_fn(Subscription::new("t", Operation::Insert), move |e| {
            c.fetch_add(1, Ordering::SeqCst);
            if e.id().as_i64() == Some(1) {
                panic!("subscriber bug");
            }
        })
        .await
        .unwrap();
    let mut healthy = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)")
        .await;
    let ids: Vec<_> = healthy
        .take(2)
        .await
        .iter()
        .map(|e| e.id().as_i64())
        .collect();
    assert_eq!(ids, [Some(1), Some(2)]);
    notifier.stop().await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the panicking subscriber got the next event too"
    );
    assert_eq!(notifier.stats().await.unwrap().subscriber_panics, 1);
}

// The shared lifecycle scenarios (tests/scenarios/lifecycle.rs), on both kinds of tier.

pg_tier_scenarios!([notify_tier: Notify, durable_tier: Durable] {
    lifecycle::unchanged_watches_are_not_reinstalled_and_drift_is_an_error_or_a_replacement,
    lifecycle::cleanup_on_start_cleanup_and_cleanup_on_stop,
});

/// A database installed by an older install script lacks columns this version writes (the
/// purge record's `snapshot` and `writer`): `start()` with `manage_triggers(false)` says so,
/// naming them, instead of a purge that fails on every round; this version's `install_sql()`
/// adds them.
#[actix_rt::test]
async fn an_older_install_scripts_tables_are_drift_until_the_new_script_is_applied() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert).tier(sqlnotify::Tier::Durable));
    builder.start().await.unwrap().stop().await.unwrap();
    db.exec("ALTER TABLE sqlnotify.trimmed DROP COLUMN snapshot, DROP COLUMN writer")
        .await;
    let err = builder
        .clone()
        .manage_triggers(false)
        .start()
        .await
        .expect_err("the tables are an older version's");
    assert!(
        matches!(&err, Error::DefinitionDrift { .. })
            && err.to_string().contains("trimmed.snapshot, trimmed.writer")
            && err.to_string().contains("install_sql()"),
        "{err}"
    );
    db.exec(&builder.install_sql().await.unwrap()).await;
    builder
        .clone()
        .manage_triggers(false)
        .start()
        .await
        .unwrap()
        .stop()
        .await
        .unwrap();
}

/// A notifier dropped without `stop()` stops: its listener's connections close, so its
/// named consumer's lease goes to another process of the group, and nothing is delivered
/// any more to its subscribers. Before, the listener's session kept the pipeline alive and
/// went on reading for as long as the actix system ran, holding the lease for good.
#[actix_rt::test]
async fn a_notifier_dropped_without_stop_lets_go_of_its_connections_and_its_lease() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let url = |name: &str| {
        let sep = if db.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}application_name={name}", db.url)
    };
    let builder = |name: &str| {
        Notifier::builder(url(name))
            .watch(Watch::new("t", Operation::Insert).tier(sqlnotify::Tier::Durable))
            .consumer("g")
    };
    let first = builder("first").start().await.unwrap();
    let mut events = Events::subscribe(&first, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    let second = builder("second").start().await.unwrap();
    assert_eq!(second.stats().await.unwrap().role, sqlnotify::Role::Standby);
    let mut seconds = Events::subscribe(&second, Subscription::new("t", Operation::Insert)).await;
    drop(first);
    let connections = "SELECT count(*) FROM pg_stat_activity \
                       WHERE datname = current_database() AND application_name = 'first'";
    assert!(
        wait_until(Duration::from_secs(20), || async {
            db.count(connections).await == 0
        })
        .await,
        "the dropped notifier's connections stay open"
    );
    assert!(
        wait_until(Duration::from_secs(20), || async {
            second.stats().await.unwrap().role == sqlnotify::Role::Active
        })
        .await,
        "the lease stays with the dropped notifier"
    );
    db.exec("INSERT INTO t VALUES (2)").await;
    // Row 1 may come again (no final save: at least once), then row 2.
    let mut got = seconds.next().await.id().as_i64();
    if got == Some(1) {
        got = seconds.next().await.id().as_i64();
    }
    assert_eq!(got, Some(2));
    events.assert_empty();
    second.stop().await.unwrap();
}

/// `stop()` returns while the listener's journal read waits on a lock another session holds
/// (a DBA's `LOCK TABLE`, a `VACUUM FULL`): every step of a session is cut short by a stop.
/// Before, stop waited for the read, which waited for the lock, for as long as it was held.
#[actix_rt::test]
async fn stop_returns_while_the_listeners_read_waits_on_a_lock() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let notifier = Notifier::builder(format!("{}{sep}application_name=stuck", db.url))
        .watch(Watch::new("t", Operation::Insert).tier(sqlnotify::Tier::Durable))
        .health_check_interval(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    let locker = db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE sqlnotify.journal IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                   AND application_name = 'stuck' AND wait_event_type = 'Lock'";
    assert!(
        wait_until(Duration::from_secs(20), || async {
            db.count(waiting).await > 0
        })
        .await,
        "the listener's read never waited on the lock"
    );
    let stopped = tokio::time::timeout(Duration::from_secs(30), notifier.stop()).await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "stop() waited for the lock: {stopped:?}"
    );
}
