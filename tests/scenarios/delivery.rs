//! Delivery: every operation with its key and extra columns in commit order, composite keys,
//! trigger columns, filters, and several notifiers on one database.

use serde_json::json;
use sqlnotify::{Filter, Key, Notifier, Operation, Subscription};

use crate::common::backend::Backend;
use crate::common::{ids, Events};

/// Insert, update and delete each arrive on their channel with the key and the watched
/// columns only; rows of one transaction arrive in order (with increasing journal positions
/// where there is a journal); a rolled-back transaction produces nothing.
pub async fn insert_update_delete_carry_key_and_extra_columns_in_commit_order(db: &impl Backend) {
    db.run("CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(100), name VARCHAR(100))")
        .await;
    let notifier = db
        .builder()
        .watch(
            db.watch("users", Operation::Insert)
                .extra_columns(["email", "name"]),
        )
        .watch(
            db.watch("users", Operation::Update)
                .extra_columns(["email"]),
        )
        .watch(db.watch("users", Operation::Delete))
        .start()
        .await
        .unwrap();
    assert_eq!(notifier.dialect_name(), db.dialect_name());
    let mut ins = Events::subscribe(&notifier, Subscription::new("users", Operation::Insert)).await;
    let mut upd = Events::subscribe(&notifier, Subscription::new("users", Operation::Update)).await;
    let mut del = Events::subscribe(
        &notifier,
        Subscription::new(format!("{}.users", db.schema()), Operation::Delete),
    )
    .await;
    let sequence = |e: &sqlnotify::ChangeEvent| {
        let s = e.sequence();
        assert_eq!(
            s.is_some(),
            db.journal(),
            "a journal position iff a journal"
        );
        s.unwrap_or(0)
    };

    db.run("INSERT INTO users VALUES (1, 'a@b.c', 'Ann')").await;
    let e = ins.next().await;
    assert_eq!(e.channel(), db.channel_of("users", Operation::Insert));
    assert_eq!(
        (e.schema(), e.table(), e.operation()),
        (db.schema().as_str(), "users", Operation::Insert)
    );
    assert_eq!(e.id(), &Key::Single(json!(1)));
    assert_eq!(e.key_columns(), ["id"]);
    assert_eq!(e.extra_columns().get("email"), Some(&json!("a@b.c")));
    assert_eq!(e.get("name"), Some(&json!("Ann")));
    assert!(!e.is_truncated());
    let s1 = sequence(&e);

    db.run("UPDATE users SET email = 'x@y.z', name = 'Bob' WHERE id = 1")
        .await;
    let e = upd.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("email")),
        (Some(1), Some(&json!("x@y.z")))
    );
    assert_eq!(e.get("name"), None, "only the watched columns are carried");
    let s2 = sequence(&e);

    db.run("DELETE FROM users WHERE id = 1").await;
    let e = del.next().await;
    assert_eq!(e.id().as_i64(), Some(1));
    assert!(e.extra_columns().is_empty());
    let s3 = sequence(&e);
    if db.journal() {
        assert!(s1 < s2 && s2 < s3, "{s1} {s2} {s3}");
    }

    // many rows in one transaction: in order, journal positions strictly increasing
    db.run(
        "BEGIN; INSERT INTO users (id, email) VALUES (10, 'a'), (11, 'b'), (12, 'c'); \
         UPDATE users SET email = 'z' WHERE id = 11; COMMIT;",
    )
    .await;
    let batch = ins.take(3).await;
    assert_eq!(ids(&batch), [10, 11, 12]);
    assert_eq!(batch[2].get("name"), Some(&json!(null)));
    let seqs: Vec<i64> = batch.iter().map(sequence).collect();
    let e = upd.next().await;
    assert_eq!(e.id().as_i64(), Some(11));
    if db.journal() {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert!(seqs[0] > s3);
        assert!(sequence(&e) > seqs[2]);
    }

    // a rolled-back transaction produces nothing; the sentinel proves it
    db.run("BEGIN; INSERT INTO users (id) VALUES (99); ROLLBACK;")
        .await;
    db.run("INSERT INTO users (id) VALUES (13)").await;
    assert_eq!(ins.next().await.id().as_i64(), Some(13));
    ins.assert_empty();
    upd.assert_empty();
    del.assert_empty();
    notifier.stop().await.unwrap();
}

/// A composite key comes in the primary key's order unless the watch declares another.
pub async fn composite_keys_come_in_key_order_unless_declared(db: &impl Backend) {
    db.run(
        "CREATE TABLE order_items (item_id INTEGER, order_id INTEGER, qty INTEGER, \
         PRIMARY KEY (order_id, item_id))",
    )
    .await;
    let notifier = db
        .builder()
        // default: the real primary key, in key order (order_id, item_id)
        .watch(
            db.watch("order_items", Operation::Insert)
                .extra_columns(["qty"]),
        )
        // declared order wins
        .watch(
            db.watch("order_items", Operation::Update)
                .primary_keys(["item_id", "order_id"]),
        )
        .start()
        .await
        .unwrap();
    let mut ins = Events::subscribe(
        &notifier,
        Subscription::new("order_items", Operation::Insert),
    )
    .await;
    let mut upd = Events::subscribe(
        &notifier,
        Subscription::new("order_items", Operation::Update),
    )
    .await;
    db.run("INSERT INTO order_items VALUES (7, 100, 2)").await;
    let e = ins.next().await;
    assert_eq!(e.id(), &Key::Composite(vec![json!(100), json!(7)]));
    assert_eq!(e.key_columns(), ["order_id", "item_id"]);
    assert_eq!(e.get("qty"), Some(&json!(2)));
    db.run("UPDATE order_items SET qty = 3").await;
    let e = upd.next().await;
    assert_eq!(e.id(), &Key::Composite(vec![json!(7), json!(100)]));
    assert_eq!(e.key_columns(), ["item_id", "order_id"]);
    ins.assert_empty();
    upd.assert_empty();
    notifier.stop().await.unwrap();
}

/// An update watch with trigger columns fires only when one of them really changed: not for
/// other columns, not for the same value, not for NULL → NULL; NULL ↔ value and a change
/// of case (equal under MySQL's case-insensitive default collation) do count.
pub async fn trigger_columns_fire_only_on_a_real_change(db: &impl Backend) {
    db.run(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(100), name VARCHAR(100), \
         score DOUBLE PRECISION)",
    )
    .await;
    let notifier = db
        .builder()
        .watch(
            db.watch("users", Operation::Update)
                .extra_columns(["email", "score"])
                .trigger_columns(["email", "score"]),
        )
        .start()
        .await
        .unwrap();
    let mut upd = Events::subscribe(&notifier, Subscription::new("users", Operation::Update)).await;
    db.run("INSERT INTO users VALUES (1, 'a', 'n', NULL)").await;
    db.run("UPDATE users SET name = 'other'").await; // not a trigger column
    db.run("UPDATE users SET email = 'a'").await; // named, but unchanged
    db.run("UPDATE users SET score = NULL").await; // NULL -> NULL is no change
    db.run("UPDATE users SET email = 'b'").await; // real change: the sentinel
    let e = upd.next().await;
    assert_eq!(
        e.get("email"),
        Some(&json!("b")),
        "the earlier no-op updates produced no event"
    );
    upd.assert_empty();
    // 'b' -> 'B' may be equal under a case-insensitive collation, but it is a real change
    db.run("UPDATE users SET email = 'B'").await;
    assert_eq!(upd.next().await.get("email"), Some(&json!("B")));
    db.run("UPDATE users SET score = 1.5").await; // NULL -> value
    let e = upd.next().await;
    assert_eq!(e.get("score"), Some(&json!(1.5)));
    db.run("UPDATE users SET score = 1.5, email = 'B'").await; // unchanged again
    db.run("UPDATE users SET email = NULL").await; // value -> NULL
    let e = upd.next().await;
    assert_eq!(e.get("email"), Some(&json!(null)));
    assert_eq!(e.get("score"), Some(&json!(1.5)));
    db.run("UPDATE users SET email = NULL").await; // NULL -> NULL
    db.run("UPDATE users SET score = NULL").await; // value -> NULL: the sentinel
    let e = upd.next().await;
    assert_eq!(e.get("score"), Some(&json!(null)));
    upd.assert_empty();
    notifier.stop().await.unwrap();
}

/// Filters compare typed values (a number key never equals a string), and what they reject
/// is counted.
pub async fn filters_match_typed_values(db: &impl Backend) {
    db.run(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(100), score DOUBLE PRECISION)",
    )
    .await;
    let notifier = db
        .builder()
        .watch(
            db.watch("users", Operation::Insert)
                .extra_columns(["email", "score"]),
        )
        .start()
        .await
        .unwrap();
    let sub = |f: Option<Filter>| {
        let s = Subscription::new("users", Operation::Insert);
        match f {
            Some(f) => s.filter(f),
            None => s,
        }
    };
    let mut id42 = Events::subscribe(&notifier, sub(Some(Filter::eq("id", 42)))).await;
    let mut id_str = Events::subscribe(&notifier, sub(Some(Filter::eq("id", "42")))).await;
    let mut high = Events::subscribe(&notifier, sub(Some(Filter::gt("score", 10)))).await;
    let mut some =
        Events::subscribe(&notifier, sub(Some(Filter::is_in("email", ["a@x", "b@x"])))).await;
    let mut no_email = Events::subscribe(&notifier, sub(Some(Filter::is_null("email")))).await;
    let mut all = Events::subscribe(&notifier, sub(None)).await;

    db.run(
        "INSERT INTO users VALUES (1, 'a@x', 5), (42, 'c@x', 11.5), (3, NULL, 20), \
         (4, 'b@x', 100), (5, '42', 10)",
    )
    .await;
    assert_eq!(ids(&all.take(5).await), [1, 42, 3, 4, 5]);
    assert_eq!(ids(&id42.take(1).await), [42]);
    assert_eq!(ids(&high.take(3).await), [42, 3, 4]);
    assert_eq!(ids(&some.take(2).await), [1, 4]);
    assert_eq!(ids(&no_email.take(1).await), [3]);
    // "all" got the last row: nothing else can still be on its way to the others
    for e in [
        &mut id42,
        &mut id_str,
        &mut high,
        &mut some,
        &mut no_email,
        &mut all,
    ] {
        e.assert_empty();
    }
    let stats = notifier.stats().await.unwrap();
    // 5 rows for the five filtered subscribers, of which they took 1 + 0 + 3 + 2 + 1
    assert_eq!(stats.filtered_out, 5 * 5 - 7, "{stats:?}");
    notifier.stop().await.unwrap();
}

/// Two notifiers on one database each receive every event, in order, once.
pub async fn two_notifiers_each_receive_every_event(db: &impl Backend) {
    db.run("CREATE TABLE t (id INTEGER PRIMARY KEY)").await;
    let builder = db.builder().watch(db.watch("t", Operation::Insert));
    let (n1, n2) = (
        builder.start().await.unwrap(),
        builder.start().await.unwrap(),
    );
    let mut e1 = Events::subscribe(&n1, Subscription::new("t", Operation::Insert)).await;
    let mut e2 = Events::subscribe(&n2, Subscription::new("t", Operation::Insert)).await;
    db.insert_ids("t", 1..=200).await;
    for events in [&mut e1, &mut e2] {
        assert_eq!(ids(&events.take(200).await), (1..=200).collect::<Vec<_>>());
    }
    // and the rows of one statement, in order
    db.run("INSERT INTO t VALUES (201), (202), (203)").await;
    for events in [&mut e1, &mut e2] {
        assert_eq!(ids(&events.take(3).await), [201, 202, 203]);
        events.assert_empty();
    }
    n1.stop().await.unwrap();
    n2.stop().await.unwrap();
}

/// Four notifiers starting at once on a database sqlnotify has never seen all start (named
/// consumers where there is a journal), install each watch once, and all deliver.
pub async fn notifiers_starting_together_on_a_fresh_database_all_start(db: &impl Backend) {
    db.run("CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(100))")
        .await;
    let builder = db
        .builder()
        .watch(
            db.watch("users", Operation::Insert)
                .extra_columns(["email"]),
        )
        .watch(db.watch("users", Operation::Delete));
    let started = futures_util::future::join_all((0..4).map(|i| {
        let builder = match db.journal() {
            true => builder.clone().consumer(format!("c{i}")),
            false => builder.clone(),
        };
        async move { builder.start().await }
    }))
    .await;
    let notifiers: Vec<Notifier> = started
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("racing start #{i} failed: {e:?}")))
        .collect();
    let mut channels = vec![
        db.channel_of("users", Operation::Delete),
        db.channel_of("users", Operation::Insert),
    ];
    channels.sort();
    assert_eq!(
        db.installed_triggers().await,
        channels,
        "one trigger per watch"
    );
    assert_eq!(
        db.catalog_channels().await,
        channels,
        "one catalog row per watch"
    );
    let mut events = Vec::new();
    for n in &notifiers {
        events.push(Events::subscribe(n, Subscription::new("users", Operation::Insert)).await);
    }
    db.run("INSERT INTO users VALUES (1, 'a@b.c')").await;
    for ev in &mut events {
        let e = ev.next().await;
        assert_eq!(
            (e.id().as_i64(), e.get("email")),
            (Some(1), Some(&json!("a@b.c")))
        );
    }
    for ev in &mut events {
        ev.assert_empty();
    }
    for n in notifiers {
        n.stop().await.unwrap();
    }
}
