//! Hostile and broken input on PostgreSQL: SQL in names, tables dropped while running, garbage
//! in the journal and on wake-up channels, subscribers that panic — each is an error or a
//! counted drop, never a crash, a stuck listener or a lost user write.

mod common;

use actix::prelude::*;
use common::{Events, TestDb};
use serde_json::json;
use sqlnotify::Operation::{Delete, Insert};
use sqlnotify::{ChangeEvent, Notifier, Subscription, Tier, Watch};

#[actix_rt::test]
async fn sql_in_names_and_labels_is_data_not_code() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE victim (id int PRIMARY KEY);
           CREATE TABLE "t'; DROP TABLE victim; --" (id int PRIMARY KEY, "a""); DROP TABLE victim; --" text)"#,
    )
    .await;
    let table = "t'; DROP TABLE victim; --";
    let column = "a\"); DROP TABLE victim; --";
    let label = "x'); DROP TABLE victim; --";
    for tier in [Tier::Notify, Tier::Durable] {
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new(table, Insert).extra_columns([column]).tier(tier))
            .watch(Watch::new(table, Delete).channel_label(label).tier(tier))
            .cleanup_on_stop(true)
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new(table, Insert)).await;
        let mut del = Events::subscribe(
            &notifier,
            Subscription::new(table, Delete).channel_label(label),
        )
        .await;
        let client = db.client().await;
        client
            .execute(
                &format!(
                    "INSERT INTO \"{}\" VALUES (1, $1)",
                    table.replace('"', "\"\"")
                ),
                &[&"v"],
            )
            .await
            .unwrap();
        client
            .execute(
                &format!("DELETE FROM \"{}\"", table.replace('"', "\"\"")),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(ins.next().await.get(column), Some(&json!("v")), "{tier:?}");
        assert_eq!(del.next().await.channel(), format!("sqlnotify_{label}"));
        notifier.stop().await.unwrap();
    }
    assert_eq!(
        db.count("SELECT count(*) FROM victim").await,
        0,
        "the victim table still exists"
    );
}

#[actix_rt::test]
async fn a_watched_table_dropped_while_running_breaks_nothing_else() {
    for tier in [Tier::Notify, Tier::Durable, Tier::Poll] {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE doomed (id int PRIMARY KEY); CREATE TABLE kept (id int PRIMARY KEY)")
            .await;
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("doomed", Insert).tier(tier))
            .watch(Watch::new("kept", Insert).tier(tier))
            .start()
            .await
            .unwrap();
        let mut doomed = Events::subscribe(&notifier, Subscription::new("doomed", Insert)).await;
        let mut kept = Events::subscribe(&notifier, Subscription::new("kept", Insert)).await;
        db.exec("INSERT INTO doomed VALUES (1)").await;
        assert_eq!(doomed.next().await.id().as_i64(), Some(1));
        db.exec("DROP TABLE doomed").await;
        db.exec("INSERT INTO kept VALUES (2)").await;
        assert_eq!(kept.next().await.id().as_i64(), Some(2), "{tier:?}");
        // The channel still works for custom events.
        notifier
            .notify("doomed", Insert, json!({"id": 3}))
            .await
            .unwrap();
        assert_eq!(doomed.next().await.id().as_i64(), Some(3));
        notifier.stop().await.unwrap();
    }
}

#[actix_rt::test]
async fn garbage_in_the_journal_and_on_wake_channels_is_dropped_and_counted() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec(
        "INSERT INTO sqlnotify.journal (channel, payload) VALUES \
         ('sqlnotify_public_t_insert', 'not json'), ('sqlnotify_public_t_insert', '{\"no\": \"key\"}');
         SELECT pg_notify('sqlnotify_public_t_insert', 'a wake-up with a payload');
         SELECT pg_notify('sqlnotify_public_t_insert', repeat('x', 7000));",
    )
    .await;
    // NULLs where the journal never writes one, the table altered by its owner (this test's
    // database is its own): tokio-postgres panics reading one as a value.
    db.exec(
        "ALTER TABLE sqlnotify.journal ALTER COLUMN payload DROP NOT NULL, \
                                       ALTER COLUMN events DROP NOT NULL;
         INSERT INTO sqlnotify.journal (channel, payload, events) VALUES \
         ('sqlnotify_public_t_insert', NULL, 1), ('sqlnotify_public_t_insert', '{}', NULL);",
    )
    .await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(
        ev.next().await.id().as_i64(),
        Some(1),
        "the listener is alive"
    );
    ev.assert_empty();
    let stats = notifier.stats().await.unwrap();
    assert_eq!((stats.malformed, stats.restarts), (4, 0), "{stats:?}");
    notifier.stop().await.unwrap();
}

/// A consumer row the driver cannot convert (its `missed` list an `int[]`, after someone
/// altered the table) fails the retention purge that reads it, and only that: events keep
/// flowing. The
/// purge runs in the decoder, whose death used to stop every event after it, silently.
#[actix_rt::test]
async fn a_row_the_purge_cannot_convert_fails_the_purge_not_the_pipeline() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .retention(std::time::Duration::ZERO)
        .purge_interval(std::time::Duration::from_millis(10))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec(
        "INSERT INTO sqlnotify.consumers (name, horizon, state) VALUES ('ghost', '1', 'dropped');
         ALTER TABLE sqlnotify.consumers ALTER COLUMN missed TYPE int[] USING NULL;
         UPDATE sqlnotify.consumers SET missed = '{1}' WHERE name = 'ghost'",
    )
    .await;
    // Held, so that the purge is seen reaching the row: it waits for this lock.
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT 1 FROM sqlnotify.consumers WHERE name = 'ghost' FOR UPDATE")
        .await
        .unwrap();
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    let purge_waits = "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity \
                       WHERE datname = pg_catalog.current_database() AND wait_event_type = 'Lock' \
                         AND query LIKE 'SELECT name, pg_catalog.array_remove(channels%'";
    assert!(
        common::wait_until(std::time::Duration::from_secs(10), || async {
            db.count(purge_waits).await == 1
        })
        .await,
        "the purge never reached the consumer rows"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    // The purge reads the row now, and fails.
    assert!(
        common::wait_until(std::time::Duration::from_secs(10), || async {
            db.count(purge_waits).await == 0
        })
        .await
    );
    for id in 2..=3 {
        db.exec(&format!("INSERT INTO t VALUES ({id})")).await;
        assert_eq!(ev.next().await.id().as_i64(), Some(id), "events go on");
    }
    notifier.stop().await.unwrap();
}

/// NULL elements in a consumer row's lists (the application role may update
/// `sqlnotify.consumers`) are skipped: listing the consumers, the consumer's restart and the
/// purge go on. The driver cannot convert a list with a NULL element: listing panicked in the
/// caller, and the restart failed `start()`.
#[actix_rt::test]
async fn null_elements_in_a_consumer_row_are_skipped_not_a_panic() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let builder = || {
        Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(Tier::Durable))
            .consumer("c")
            .retention(std::time::Duration::ZERO)
            .purge_interval(std::time::Duration::from_millis(10))
    };
    let notifier = builder().start().await.unwrap();
    notifier.stop().await.unwrap();
    db.exec(
        "UPDATE sqlnotify.consumers SET channels = channels || NULL::text,
                missed = ARRAY[NULL]::text[], seen = ARRAY[NULL]::bigint[], state = 'expired'
          WHERE name = 'c'",
    )
    .await;
    let listed = builder().consumers().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].channels.as_ref().map(Vec::len),
        Some(1),
        "{listed:?}"
    );
    let notifier = builder().start().await.unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    assert_eq!(notifier.consumers().await.unwrap().len(), 1);
    notifier.stop().await.unwrap();
}

/// An actor that panics on every event.
struct Boom;

impl Actor for Boom {
    type Context = Context<Self>;
}

impl Handler<ChangeEvent> for Boom {
    type Result = ();
    fn handle(&mut self, _: ChangeEvent, _: &mut Context<Self>) {
        panic!("subscriber bug");
    }
}

#[actix_rt::test]
async fn an_actor_that_panics_on_its_own_arbiter_does_not_stop_routing() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .start()
        .await
        .unwrap();
    let arbiter = Arbiter::new();
    let boom = Boom::start_in_arbiter(&arbiter.handle(), |_| Boom);
    notifier
        .subscribe(Subscription::new("t", Insert), boom.recipient())
        .await
        .unwrap();
    let mut healthy = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    for id in 1..=50 {
        db.exec(&format!("INSERT INTO t VALUES ({id})")).await;
        assert_eq!(healthy.next().await.id().as_i64(), Some(id));
    }
    notifier.stop().await.unwrap();
}
