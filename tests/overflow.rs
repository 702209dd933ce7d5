//! Large rows, the overflow table, truncation, custom notifications and garbage on our
//! channels — the paths where other libraries fail the user's write or crash the listener.

mod common;

use std::time::Duration;

use common::{wait_until, Events, TestDb};
use serde_json::json;
use sqlnotify::{CustomEvent, Error, Notifier, Operation, Subscription, Watch};

const BIG: usize = 20_000;

#[actix_rt::test]
async fn a_20kb_row_goes_through_overflow_and_resolves_for_every_notifier() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        .await;
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("docs", Operation::Insert).extra_columns(["body"]));
    let (n1, n2) = (
        builder.start().await.unwrap(),
        builder.start().await.unwrap(),
    );
    let mut e1 = Events::subscribe(&n1, Subscription::new("docs", Operation::Insert)).await;
    let mut e2 = Events::subscribe(&n2, Subscription::new("docs", Operation::Insert)).await;
    db.exec(&format!(
        "INSERT INTO docs VALUES (1, repeat('x', {BIG})), (2, 'small')"
    ))
    .await;
    for events in [&mut e1, &mut e2] {
        let big = events.next().await;
        assert_eq!(big.id().as_i64(), Some(1));
        assert!(!big.is_truncated());
        assert_eq!(big.get("body").unwrap().as_str().unwrap().len(), BIG);
        let small = events.next().await;
        assert_eq!(
            small.get("body"),
            Some(&json!("small")),
            "order is kept across the overflow fetch"
        );
    }
    assert_eq!(db.count("SELECT count(*) FROM sqlnotify.overflow").await, 1);
    for n in [&n1, &n2] {
        assert_eq!(n.stats().await.unwrap().overflow_resolved, 1);
        n.stop().await.unwrap();
    }
}

#[actix_rt::test]
async fn without_overflow_the_event_carries_the_key_only_and_the_write_succeeds() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(
            Watch::new("docs", Operation::Insert)
                .extra_columns(["body"])
                .use_overflow_table(false),
        )
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("docs", Operation::Insert)).await;
    db.exec(&format!("INSERT INTO docs VALUES (7, repeat('y', {BIG}))"))
        .await;
    let e = ev.next().await;
    assert_eq!(e.id().as_i64(), Some(7));
    assert!(e.is_truncated());
    assert!(e.extra_columns().is_empty());
    assert_eq!(
        db.count("SELECT count(*) FROM docs").await,
        1,
        "the write was committed"
    );
    assert_eq!(db.count("SELECT count(*) FROM sqlnotify.overflow").await, 0);
    notifier.stop().await.unwrap();
}

/// Old values make a row larger: a 20 kB old value goes through the overflow table with the
/// rest (stored once, with the old values, and resolved whole); without the overflow table
/// the event is cut down to the key and carries no old values.
#[actix_rt::test]
async fn old_values_overflow_with_the_row_or_are_cut_with_it() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "CREATE TABLE docs (id int PRIMARY KEY, body text, n int); \
         INSERT INTO docs VALUES (1, repeat('x', {BIG}), NULL), (2, repeat('x', {BIG}), NULL)"
    ))
    .await;
    let notifier = Notifier::builder(&db.url)
        .watch(
            Watch::new("docs", Operation::Update)
                .extra_columns(["body"])
                .old_values(true),
        )
        .watch(
            Watch::new("docs", Operation::Delete)
                .extra_columns(["body"])
                .old_values(true)
                .use_overflow_table(false),
        )
        .start()
        .await
        .unwrap();
    let mut upd = Events::subscribe(&notifier, Subscription::new("docs", Operation::Update)).await;
    let mut del = Events::subscribe(&notifier, Subscription::new("docs", Operation::Delete)).await;
    // only the old value is big: the event overflows because of it
    db.exec("UPDATE docs SET body = 'small', n = 1 WHERE id = 1")
        .await;
    let e = upd.next().await;
    assert!(!e.is_truncated());
    assert_eq!(e.get("body"), Some(&json!("small")));
    assert_eq!(e.old("body"), Some(&json!("x".repeat(BIG))));
    assert_eq!(e.changed_columns().unwrap(), ["body", "n"]);
    assert_eq!(db.count("SELECT count(*) FROM sqlnotify.overflow").await, 1);

    db.exec("DELETE FROM docs WHERE id = 2").await;
    let e = del.next().await;
    assert_eq!(e.id().as_i64(), Some(2));
    assert!(e.is_truncated());
    assert!(e.old_values().is_none() && e.extra_columns().is_empty());
    assert_eq!(
        db.count("SELECT count(*) FROM docs").await,
        1,
        "the write was committed"
    );
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_broken_overflow_table_degrades_to_truncated_instead_of_failing_the_write() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("docs", Operation::Insert).extra_columns(["body"]))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("docs", Operation::Insert)).await;
    db.exec("DROP TABLE sqlnotify.overflow").await;
    db.exec(&format!("INSERT INTO docs VALUES (3, repeat('z', {BIG}))"))
        .await;
    let e = ev.next().await;
    assert_eq!(e.id().as_i64(), Some(3));
    assert!(e.is_truncated());
    assert_eq!(db.count("SELECT count(*) FROM docs").await, 1);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn expired_overflow_rows_are_purged_and_a_missing_row_degrades_to_truncated() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("docs", Operation::Insert).extra_columns(["body"]))
        .retention(Duration::from_millis(500))
        .purge_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("docs", Operation::Insert)).await;
    db.exec(&format!("INSERT INTO docs VALUES (1, repeat('x', {BIG}))"))
        .await;
    assert!(!ev.next().await.is_truncated());
    let purged = wait_until(Duration::from_secs(10), || async {
        db.count("SELECT count(*) FROM sqlnotify.overflow").await == 0
    })
    .await;
    assert!(
        purged,
        "the periodic purge deleted the expired overflow row"
    );

    // A reference to a row that no longer exists: delivered with the key, marked truncated.
    db.notify_signed(
        "sqlnotify_public_docs_insert",
        r#"{"__sqlnotify":{"overflow":"00000000-0000-4000-8000-000000000000"},"id":9}"#,
    )
    .await;
    let e = ev.next().await;
    assert_eq!((e.id().as_i64(), e.is_truncated()), (Some(9), true));
    assert_eq!(notifier.stats().await.unwrap().overflow_missing, 1);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn garbage_on_our_channel_is_counted_and_dropped() {
    // Signed channels (the default) drop it as forged before decoding; unsigned ones decode
    // it and drop it as malformed. Either way the listener lives on.
    for signed in [true, false] {
        garbage_is_dropped(signed).await;
    }
}

async fn garbage_is_dropped(signed: bool) {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .sign_notifications(signed)
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    for garbage in [
        "not json",
        "[1,2]",
        r#"{"other": 1}"#,
        r#"{"id": 1, "__sqlnotify": 5}"#,
        "",
    ] {
        db.client()
            .await
            .execute(
                "SELECT pg_notify('sqlnotify_public_t_insert', $1)",
                &[&garbage],
            )
            .await
            .unwrap();
    }
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(
        ev.next().await.id().as_i64(),
        Some(1),
        "the listener is still alive"
    );
    ev.assert_empty();
    let stats = notifier.stats().await.unwrap();
    let expected = if signed { (0, 5, 1) } else { (5, 0, 6) };
    assert_eq!(
        (stats.malformed, stats.forged, stats.received),
        expected,
        "signed: {signed}, {stats:?}"
    );
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn custom_notifications_reach_subscribers_like_trigger_events() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, email text)")
        .await;
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("users", Operation::Update).extra_columns(["email"]))
        .watch(Watch::new("users", Operation::Insert).channel_label("signups"));
    let sender = builder.start().await.unwrap();
    let other = builder.start().await.unwrap();
    let mut upd = Events::subscribe(&other, Subscription::new("users", Operation::Update)).await;
    let mut signups = Events::subscribe(
        &other,
        Subscription::new("users", Operation::Insert).channel_label("signups"),
    )
    .await;

    sender
        .notify(
            "users",
            Operation::Update,
            json!({"id": 123, "email": "a@b.c"}),
        )
        .await
        .unwrap();
    let e = upd.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("email")),
        (Some(123), Some(&json!("a@b.c")))
    );

    sender
        .notify_with(
            CustomEvent::new("users", Operation::Insert, json!({"id": 5})).channel_label("signups"),
        )
        .await
        .unwrap();
    assert_eq!(signups.next().await.id().as_i64(), Some(5));

    // too large: through overflow by default ...
    let big = "b".repeat(BIG);
    sender
        .notify("users", Operation::Update, json!({"id": 1, "email": big}))
        .await
        .unwrap();
    let e = upd.next().await;
    assert_eq!(e.get("email").unwrap().as_str().unwrap().len(), BIG);
    // ... or refused, with nothing sent
    let err = sender
        .notify_with(
            CustomEvent::new("users", Operation::Update, json!({"id": 2, "email": big}))
                .allow_overflow(false),
        )
        .await
        .unwrap_err();
    assert!(
        // NOTIFY's 7,999 bytes less the 44 of the signature
        matches!(&err, Error::PayloadTooLarge { size, limit: 7955, .. } if *size > BIG),
        "{err}"
    );
    let err = sender
        .notify("users", Operation::Update, json!([1]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPayload { .. }), "{err}");
    let err = sender
        .notify("users", Operation::Update, json!({"email": "no key"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("\"id\""), "{err}");
    let err = sender
        .notify("users", Operation::Delete, json!({"id": 1}))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotWatched { .. }), "{err}");

    sender
        .notify("users", Operation::Update, json!({"id": 3}))
        .await
        .unwrap();
    assert_eq!(upd.next().await.id().as_i64(), Some(3), "sentinel");
    upd.assert_empty();
    sender.stop().await.unwrap();
    other.stop().await.unwrap();
}
