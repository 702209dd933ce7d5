//! End-to-end delivery against a real PostgreSQL: triggers → listener → decoder → registry →
//! subscribers, for every operation, key shape, naming oddity, filter and subscription kind.

mod common;
mod scenarios;

use actix::prelude::*;
use common::{Events, TestDb};
use serde_json::json;
use sqlnotify::{ChangeEvent, Error, Filter, Notifier, Operation, Subscription, Watch};

#[actix_rt::test]
async fn mixed_case_names_keyword_columns_and_quotes_in_labels_work() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE SCHEMA "Shop"; CREATE TABLE "Shop"."CamelCase" ("Id" int PRIMARY KEY, "select" text, "we""ird" text)"#,
    )
    .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("Shop.CamelCase", Operation::Insert).extra_columns(["select", "we\"ird"]))
        .watch(Watch::new("Shop.CamelCase", Operation::Insert).channel_label("o'brien\\x"))
        .start()
        .await
        .unwrap();
    let mut plain = Events::subscribe(
        &notifier,
        Subscription::new("Shop.CamelCase", Operation::Insert),
    )
    .await;
    let mut labelled = Events::subscribe(
        &notifier,
        Subscription::new("Shop.CamelCase", Operation::Insert).channel_label("o'brien\\x"),
    )
    .await;
    db.exec(r#"INSERT INTO "Shop"."CamelCase" VALUES (1, 'drop table x; --', 'q"uote')"#)
        .await;
    let e = plain.next().await;
    assert_eq!(e.channel(), "sqlnotify_Shop_CamelCase_insert");
    assert_eq!(e.get("Id"), Some(&json!(1)));
    assert_eq!(e.get("select"), Some(&json!("drop table x; --")));
    assert_eq!(e.get("we\"ird"), Some(&json!("q\"uote")));
    let e = labelled.next().await;
    assert_eq!(e.channel(), "sqlnotify_o'brien\\x");
    assert_eq!(e.id().as_i64(), Some(1));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn trigger_columns_fire_only_on_a_real_change() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, email text, name text, doc json)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(
            Watch::new("users", Operation::Update)
                .extra_columns(["email"])
                .trigger_columns(["email", "doc"]),
        )
        .start()
        .await
        .unwrap();
    let mut upd = Events::subscribe(&notifier, Subscription::new("users", Operation::Update)).await;
    db.exec("INSERT INTO users VALUES (1, 'a', 'n', '{\"k\": 1}')")
        .await;
    db.exec("UPDATE users SET name = 'other'").await; // not a trigger column
    db.exec("UPDATE users SET email = 'a'").await; // named, but unchanged
    db.exec("UPDATE users SET doc = '{\"k\": 1}'").await; // json (no = operator), unchanged
    db.exec("UPDATE users SET email = 'b'").await; // real change: the sentinel
    let e = upd.next().await;
    assert_eq!(
        e.get("email"),
        Some(&json!("b")),
        "the earlier no-op updates produced no event"
    );
    db.exec("UPDATE users SET doc = '{\"k\": 2}'").await;
    assert_eq!(upd.next().await.get("email"), Some(&json!("b")));
    db.exec("UPDATE users SET email = NULL").await;
    assert_eq!(upd.next().await.get("email"), Some(&json!(null)));
    upd.assert_empty();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn rolled_back_transactions_produce_no_event_and_order_is_commit_order() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("BEGIN; INSERT INTO t VALUES (1); ROLLBACK;").await;
    // Two overlapping transactions: the one that commits first is delivered first.
    let (mut a, mut b) = (db.client().await, db.client().await);
    let ta = a.transaction().await.unwrap();
    ta.execute("INSERT INTO t VALUES (2)", &[]).await.unwrap();
    let tb = b.transaction().await.unwrap();
    tb.execute("INSERT INTO t VALUES (3)", &[]).await.unwrap();
    tb.commit().await.unwrap();
    ta.commit().await.unwrap();
    let ids: Vec<i64> = ev
        .take(2)
        .await
        .iter()
        .map(|e| e.id().as_i64().unwrap())
        .collect();
    assert_eq!(ids, [3, 2]);
    ev.assert_empty();
    db.exec("INSERT INTO t SELECT generate_series(10, 209)")
        .await;
    let ids: Vec<i64> = ev
        .take(200)
        .await
        .iter()
        .map(|e| e.id().as_i64().unwrap())
        .collect();
    assert_eq!(ids, (10..210).collect::<Vec<_>>());
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_row_committed_right_after_start_arrives() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let writer = db.client().await;
    for round in 0..3 {
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("t", Operation::Insert))
            .start()
            .await
            .unwrap();
        let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
        writer
            .execute("INSERT INTO t VALUES ($1)", &[&round])
            .await
            .unwrap();
        assert_eq!(ev.next().await.id().as_i64(), Some(round as i64));
        notifier.stop().await.unwrap();
    }
}

#[actix_rt::test]
async fn filters_match_typed_values_combined_with_and() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, email text, score numeric, banned boolean)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("users", Operation::Insert).extra_columns(["email", "score", "banned"]))
        .start()
        .await
        .unwrap();
    let sub = |f: Vec<Filter>| {
        f.into_iter()
            .fold(Subscription::new("users", Operation::Insert), |s, f| {
                s.filter(f)
            })
    };
    let mut id42 = Events::subscribe(&notifier, sub(vec![Filter::eq("id", 42)])).await;
    let mut id_str = Events::subscribe(&notifier, sub(vec![Filter::eq("id", "42")])).await;
    let mut high = Events::subscribe(
        &notifier,
        sub(vec![Filter::gt("score", 10), Filter::ne("banned", true)]),
    )
    .await;
    let mut some =
        Events::subscribe(&notifier, sub(vec![Filter::is_in("email", ["a@x", "b@x"])])).await;
    let mut no_email = Events::subscribe(&notifier, sub(vec![Filter::is_null("email")])).await;
    let mut all = Events::subscribe(&notifier, sub(vec![])).await;

    db.exec(
        "INSERT INTO users VALUES (1, 'a@x', 5, false), (42, 'c@x', 11.5, false), \
         (3, NULL, 20, true), (4, 'b@x', 100, NULL)",
    )
    .await;
    let all_ids: Vec<i64> = all
        .take(4)
        .await
        .iter()
        .map(|e| e.id().as_i64().unwrap())
        .collect();
    assert_eq!(all_ids, [1, 42, 3, 4]);
    assert_eq!(id42.next().await.id().as_i64(), Some(42));
    let ids = |v: Vec<ChangeEvent>| {
        v.iter()
            .map(|e| e.id().as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    // NULL banned is "not equal to true"; row 3 is banned
    assert_eq!(ids(high.take(2).await), [42, 4]);
    assert_eq!(ids(some.take(2).await), [1, 4]);
    assert_eq!(ids(no_email.take(1).await), [3]);
    // sentinel: everything for the batch has been routed ("all" got the last row), so nothing
    // else can still be on its way to the filtered subscribers
    for e in [&mut id42, &mut id_str, &mut high, &mut some, &mut no_email] {
        e.assert_empty();
    }
    let stats = notifier.stats().await.unwrap();
    // 4 rows; id42 took one, id_str none (the key is a number), high two, some two, no_email
    // one, all four
    assert_eq!(stats.filtered_out, 3 + 4 + 2 + 2 + 3, "{stats:?}");
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn subscribing_to_something_not_watched_is_an_error() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, email text)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]))
        .watch(Watch::new("users", Operation::Update).channel_label("changes"))
        .start()
        .await
        .unwrap();
    let err = |r: sqlnotify::Result<_>| r.unwrap_err();
    let (tx, _rx) = std::sync::mpsc::channel::<()>();
    let f = move |_| drop(tx.clone());
    let e = err(notifier
        .subscribe_fn(Subscription::new("users", Operation::Delete), f.clone())
        .await);
    assert!(
        matches!(&e, Error::NotWatched { table, .. } if table == "public.users"),
        "{e}"
    );
    let e = err(notifier
        .subscribe_fn(Subscription::new("users", Operation::Update), f.clone())
        .await);
    assert!(
        matches!(e, Error::NotWatched { label: None, .. }),
        "unlabelled update is not watched"
    );
    let e = err(notifier
        .subscribe_fn(
            Subscription::new("users", Operation::Insert).channel_label("changes"),
            f.clone(),
        )
        .await);
    assert!(matches!(e, Error::NotWatched { label: Some(_), .. }));
    let e = err(notifier
        .subscribe_fn(
            Subscription::new("users", Operation::Insert).filter(Filter::eq("name", "x")),
            f.clone(),
        )
        .await);
    assert!(
        matches!(&e, Error::UnknownFilterColumn { column, .. } if column == "name"),
        "{e}"
    );
    assert!(e.to_string().contains("sqlnotify_public_users_insert"));
    assert!(notifier
        .subscribe_fn(
            Subscription::new("users", Operation::Update).channel_label("changes"),
            f
        )
        .await
        .is_ok());
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn unsubscribe_stops_delivery() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let mut gone = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let mut stays = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(gone.next().await.id().as_i64(), Some(1));
    assert_eq!(stays.next().await.id().as_i64(), Some(1));
    notifier.unsubscribe(gone.id).await.unwrap();
    assert!(matches!(
        notifier.unsubscribe(gone.id).await,
        Err(Error::UnknownSubscription { .. })
    ));
    db.exec("INSERT INTO t VALUES (2)").await;
    assert_eq!(stays.next().await.id().as_i64(), Some(2));
    gone.assert_empty();
    notifier.stop().await.unwrap();
}

/// A user's own actor, subscribed both through the notifier and by sending `Subscribe` to the
/// registry's address; events decode into a typed struct.
struct Collect(tokio::sync::mpsc::UnboundedSender<User>);

#[derive(serde::Deserialize, Debug, PartialEq)]
struct User {
    id: i64,
    email: String,
}

impl Actor for Collect {
    type Context = Context<Self>;
}

impl Handler<ChangeEvent> for Collect {
    type Result = ();
    fn handle(&mut self, event: ChangeEvent, _: &mut Context<Self>) {
        let _ = self.0.send(event.decode().unwrap());
    }
}

#[actix_rt::test]
async fn actor_recipients_receive_typed_events() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id bigint PRIMARY KEY, email text)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]))
        .start()
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let a = Collect(tx.clone()).start();
    let b = Collect(tx).start();
    notifier
        .subscribe(Subscription::new("users", Operation::Insert), a.recipient())
        .await
        .unwrap();
    notifier
        .registry()
        .send(sqlnotify::Subscribe::new(
            Subscription::new("users", Operation::Insert),
            b.recipient(),
        ))
        .await
        .unwrap()
        .unwrap();
    db.exec("INSERT INTO users VALUES (5, 'e@x')").await;
    for _ in 0..2 {
        let user = tokio::time::timeout(common::ARRIVES_WITHIN, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            user,
            User {
                id: 5,
                email: "e@x".into()
            }
        );
    }
    notifier.stop().await.unwrap();
}

/// A blocking handler for `subscribe_blocking`: on its first event it reports that it started
/// and blocks until the test opens the gate; then it takes 5 ms per event (a stand-in for a
/// blocking call) and reports each event's id.
fn slow_handler(
    started: tokio::sync::mpsc::UnboundedSender<()>,
    gate: std::sync::mpsc::Receiver<()>,
    done: tokio::sync::mpsc::UnboundedSender<i64>,
) -> impl FnMut(ChangeEvent) + Send + 'static {
    let mut gate = Some(gate);
    move |event| {
        if let Some(gate) = gate.take() {
            let _ = started.send(());
            let _ = gate.recv();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let _ = done.send(event.id().as_i64().unwrap());
    }
}

async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(common::ARRIVES_WITHIN, rx.recv())
        .await
        .expect("should have arrived")
        .unwrap()
}

#[actix_rt::test]
async fn a_blocking_handler_runs_on_its_own_thread_and_never_stalls_the_others() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let (release, gate) = std::sync::mpsc::channel();
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    notifier
        .subscribe_blocking(
            Subscription::new("t", Operation::Insert),
            slow_handler(started_tx, gate, done_tx),
        )
        .await
        .unwrap();
    let mut fast = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;

    const N: i64 = 200;
    db.exec(&format!("INSERT INTO t SELECT generate_series(1, {N})"))
        .await;
    // The slow handler is blocked inside its first event …
    next(&mut started).await;
    // … and yet the other subscriber gets every event, in order.
    let ids: Vec<i64> = fast
        .take(N as usize)
        .await
        .iter()
        .map(|e| e.id().as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=N).collect::<Vec<_>>());
    assert!(
        done.try_recv().is_err(),
        "the slow handler finished nothing yet"
    );

    release.send(()).unwrap();
    for id in 1..=N {
        assert_eq!(next(&mut done).await, id, "in commit order");
    }
    let stats = notifier.stats().await.unwrap();
    assert_eq!((stats.delivered, stats.dropped), (2 * N as u64, 0));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_blocking_handler_s_buffer_follows_its_policy_and_stop_waits_for_it() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let (release, gate) = std::sync::mpsc::channel();
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    notifier
        .subscribe_blocking(
            Subscription::new("t", Operation::Insert)
                .policy(sqlnotify::OverflowPolicy::DropOldest)
                .buffer(10),
            slow_handler(started_tx, gate, done_tx),
        )
        .await
        .unwrap();
    let mut fast = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;

    db.exec("INSERT INTO t VALUES (1)").await;
    next(&mut started).await;
    // The handler holds event 1; its channel takes 2..=11, its buffer keeps the newest ten
    // (92..=101), and the 80 in between are dropped.
    db.exec("INSERT INTO t SELECT generate_series(2, 101)")
        .await;
    assert_eq!(fast.take(101).await.len(), 101);
    let want = |s: &sqlnotify::Stats| (s.delivered, s.dropped, s.queued);
    common::wait_until(common::ARRIVES_WITHIN, || async {
        want(&notifier.stats().await.unwrap()) == (101 + 1 + 10, 80, 10)
    })
    .await;
    let stats = notifier.stats().await.unwrap();
    assert_eq!(want(&stats), (101 + 1 + 10, 80, 10), "{stats:?}");

    // stop() returns only once the handler has run every event it was handed.
    release.send(()).unwrap();
    notifier.stop().await.unwrap();
    let mut ids = Vec::new();
    while let Ok(id) = done.try_recv() {
        ids.push(id);
    }
    let expected: Vec<i64> = (1..=11).chain(92..=101).collect();
    assert_eq!(ids, expected);
    let stats = notifier.stats().await.unwrap();
    assert_eq!(want(&stats), (101 + 21, 80, 0), "{stats:?}");
}

// The shared delivery scenarios (tests/scenarios/delivery.rs), on every tier.

pg_tier_scenarios!([notify_tier: Notify, durable_tier: Durable, poll_tier: Poll] {
    delivery::insert_update_delete_carry_key_and_extra_columns_in_commit_order,
    delivery::composite_keys_come_in_key_order_unless_declared,
    delivery::trigger_columns_fire_only_on_a_real_change,
    delivery::filters_match_typed_values,
    delivery::two_notifiers_each_receive_every_event,
    delivery::notifiers_starting_together_on_a_fresh_database_all_start,
});

pg_tier_scenarios!([old_values_notify: Notify, old_values_durable: Durable, old_values_poll: Poll] {
    old_values::old_values_and_changed_columns_on_update_and_delete,
});

pg_tier_scenarios!([context_notify: Notify, context_durable: Durable, context_poll: Poll] {
    context::context_comes_from_the_writers_session,
    context::unknown_context_names_are_refused_at_start,
});
