//! Statement-level capture (`Capture::Statement`) on PostgreSQL's journal tiers: one journal
//! row per statement (split every `STATEMENT_CHUNK_ROWS` rows), decoded back into one event
//! per row, in order, exactly once — through big statements, `trigger_columns`, a tight
//! in-flight budget, killed listeners and hostile journal rows.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{assert_every_row_once_through_kills, gated, wait_until, Events, TestDb};
use serde_json::json;
use sqlnotify::Operation::{Delete, Insert, Update};
use sqlnotify::{
    Capture, Error, Notifier, OverflowPolicy, Subscription, Tier, Watch, STATEMENT_CHUNK_ROWS,
};

const TIERS: [Tier; 2] = [Tier::Durable, Tier::Poll];

fn watch(table: &str, op: sqlnotify::Operation, tier: Tier) -> Watch {
    Watch::new(table, op).tier(tier).capture(Capture::Statement)
}

#[actix_rt::test]
async fn every_row_of_a_statement_arrives_in_order_from_one_journal_row() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY, name text, doc jsonb)")
            .await;
        let notifier = Notifier::builder(&db.url)
            .watch(watch("t", Insert, tier).extra_columns(["name", "doc"]))
            .watch(watch("t", Update, tier).extra_columns(["name"]))
            .watch(watch("t", Delete, tier))
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        let mut upd = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
        let mut del = Events::subscribe(&notifier, Subscription::new("t", Delete)).await;

        db.exec(
            "INSERT INTO t SELECT i, 'n' || i, jsonb_build_object('i', i) FROM generate_series(1, 5) i",
        )
        .await;
        let events = ins.take(5).await;
        let ids: Vec<i64> = events.iter().map(|e| e.id().as_i64().unwrap()).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5], "{tier:?}");
        assert_eq!(events[2].get("name"), Some(&json!("n3")));
        assert_eq!(events[2].get("doc"), Some(&json!({"i": 3})));
        let sequence = events[0].sequence();
        assert!(sequence.is_some());
        assert!(
            events.iter().all(|e| e.sequence() == sequence),
            "one journal row"
        );
        assert_eq!(
            db.count("SELECT count(*) FROM sqlnotify.journal WHERE channel LIKE '%insert'")
                .await,
            1
        );

        // a statement touching no row writes nothing; the next one still arrives
        db.exec("UPDATE t SET name = 'x' WHERE id > 100").await;
        db.exec("UPDATE t SET name = upper(name) WHERE id IN (2, 4)")
            .await;
        let events = upd.take(2).await;
        assert_eq!(events[0].id().as_i64(), Some(2));
        assert_eq!(events[1].get("name"), Some(&json!("N4")));
        db.exec("DELETE FROM t WHERE id <= 3").await;
        let ids: BTreeSet<i64> = del
            .take(3)
            .await
            .iter()
            .map(|e| e.id().as_i64().unwrap())
            .collect();
        assert_eq!(ids, BTreeSet::from([1, 2, 3]));
        db.exec("INSERT INTO t VALUES (6, 'six', null)").await;
        assert_eq!(ins.next().await.id().as_i64(), Some(6));
        ins.assert_empty();
        upd.assert_empty();
        del.assert_empty();
        notifier.stop().await.unwrap();
    }
}

#[actix_rt::test]
async fn a_big_statement_is_split_into_chunks_and_arrives_whole_and_in_order() {
    let rows = 3 * STATEMENT_CHUNK_ROWS + 17;
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY, body text)")
            .await;
        let notifier = Notifier::builder(&db.url)
            .watch(watch("t", Insert, tier).extra_columns(["body"]))
            .start()
            .await
            .unwrap();
        let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        // inserted in descending id order: the events follow the statement's order
        db.exec(&format!(
            "INSERT INTO t SELECT i, repeat('x', 100) FROM generate_series({rows}, 1, -1) i"
        ))
        .await;
        let ids: Vec<i64> = ev
            .take(rows)
            .await
            .iter()
            .map(|e| e.id().as_i64().unwrap())
            .collect();
        let expected: Vec<i64> = (1..=rows as i64).rev().collect();
        assert_eq!(ids, expected, "{tier:?}");
        assert_eq!(
            journal_events(&db).await,
            [512, 512, 512, 17],
            "{tier:?}: {rows} rows in chunks of {STATEMENT_CHUNK_ROWS}"
        );
        db.exec("INSERT INTO t VALUES (0, 'sentinel')").await;
        assert_eq!(ev.next().await.id().as_i64(), Some(0));
        ev.assert_empty();
        let stats = notifier.stats().await.unwrap();
        assert_eq!(stats.received, rows as u64 + 1);
        assert_eq!(stats.malformed, 0);
        notifier.stop().await.unwrap();
    }
}

#[actix_rt::test]
async fn trigger_columns_keep_only_rows_that_really_changed() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY, email text, doc json, hits int)")
            .await;
        db.exec("INSERT INTO t SELECT i, 'e' || i, '{\"a\": 1}', 0 FROM generate_series(1, 6) i")
            .await;
        let notifier = Notifier::builder(&db.url)
            .watch(
                watch("t", Update, tier)
                    .extra_columns(["email"])
                    .trigger_columns(["email", "doc"]),
            )
            .start()
            .await
            .unwrap();
        let mut ev = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
        // hits changes everywhere; email changes on 2 and 5 only; doc (json: no equality
        // operator, compared as text) changes on 3; id 6's key changes
        db.exec(
            "UPDATE t SET hits = hits + 1,
                          email = CASE WHEN id IN (2, 5) THEN 'new' || id ELSE email END,
                          doc = CASE WHEN id = 3 THEN '{\"a\": 2}'::json ELSE doc END,
                          id = CASE WHEN id = 6 THEN 60 ELSE id END",
        )
        .await;
        let ids: BTreeSet<i64> = ev
            .take(4)
            .await
            .iter()
            .map(|e| e.id().as_i64().unwrap())
            .collect();
        assert_eq!(ids, BTreeSet::from([2, 3, 5, 60]), "{tier:?}");
        // nothing really changed: no journal row at all
        let before = db.count("SELECT count(*) FROM sqlnotify.journal").await;
        db.exec("UPDATE t SET email = email, hits = 0").await;
        assert_eq!(
            db.count("SELECT count(*) FROM sqlnotify.journal").await,
            before
        );
        // INSERT … ON CONFLICT DO UPDATE fires the UPDATE watch for the updated rows
        db.exec(
            "INSERT INTO t VALUES (1, 'e1', '{\"a\": 1}', 0), (4, 'upserted', '{\"a\": 1}', 0)
             ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email",
        )
        .await;
        let e = ev.next().await;
        assert_eq!(
            (e.id().as_i64(), e.get("email")),
            (Some(4), Some(&json!("upserted")))
        );
        ev.assert_empty();
        notifier.stop().await.unwrap();
    }
}

#[actix_rt::test]
async fn a_json_key_without_equality_never_fails_the_write() {
    let db = TestDb::new().await;
    // no primary key: the declared key is a json column, which has no `=` operator
    db.exec("CREATE TABLE t (k json, v int)").await;
    db.exec("INSERT INTO t VALUES ('{\"a\": 1}', 1), ('[2]', 2)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(
            watch("t", Update, Tier::Durable)
                .primary_keys(["k"])
                .trigger_columns(["v"]),
        )
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
    db.exec("UPDATE t SET v = v + 1 WHERE v = 2").await;
    let e = ev.next().await;
    assert_eq!(e.id(), &sqlnotify::Key::Single(json!([2])));
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn the_notify_tier_refuses_statement_capture_and_installs_nothing() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let Err(err) = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).capture(Capture::Statement))
        .start()
        .await
    else {
        panic!("statement capture on the notify tier was accepted");
    };
    assert!(matches!(err, Error::InvalidWatch { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("public.t INSERT") && message.contains("Tier::Durable"),
        "{message}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
            .await,
        0
    );
}

/// Old values under statement capture: each new row is paired with its own old row, also when
/// the statement changes keys (two ids swapped); changed columns per row, NULL ↔ value, jsonb
/// as values; a DELETE's old values are the deleted rows; a statement cut into several
/// journal rows keeps them.
#[actix_rt::test]
async fn old_values_pair_each_row_with_its_old_row() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec(
            "CREATE TABLE t (id int PRIMARY KEY DEFERRABLE, v text, n int, doc jsonb); \
             INSERT INTO t VALUES (1, 'one', NULL, '{\"a\": 1}'), (2, 'two', 2, NULL), (3, 'three', 3, NULL)",
        )
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(
                watch("t", Update, tier)
                    .extra_columns(["v"])
                    .old_values(true),
            )
            .watch(
                watch("t", Delete, tier)
                    .extra_columns(["v"])
                    .old_values(true),
            )
            .start()
            .await
            .unwrap();
        let mut upd = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
        let mut del = Events::subscribe(&notifier, Subscription::new("t", Delete)).await;

        // swap the keys of rows 1 and 2 (the key is checked at the end of the statement); row 3
        // keeps its key; NULL -> 5, 2 -> NULL, NULL -> NULL; jsonb with other spacing: no change
        db.exec(
            "UPDATE t SET id = CASE id WHEN 1 THEN 2 WHEN 2 THEN 1 ELSE id END, \
             n = CASE id WHEN 1 THEN 5 WHEN 2 THEN NULL ELSE n END, \
             doc = CASE id WHEN 1 THEN '{\"a\":1}'::jsonb ELSE doc END",
        )
        .await;
        let mut events = upd.take(3).await;
        events.sort_by_key(|e| e.get("v").unwrap().as_str().unwrap().to_string());
        let seen: Vec<_> = events
            .iter()
            .map(|e| {
                (
                    e.get("v").unwrap().clone(),
                    e.id().as_i64(),
                    e.old("id").cloned(),
                    e.old("v").cloned(),
                    e.changed_columns().unwrap().to_vec(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (
                    json!("one"),
                    Some(2),
                    Some(json!(1)),
                    Some(json!("one")),
                    vec!["id".to_string(), "n".into()]
                ),
                (
                    json!("three"),
                    Some(3),
                    Some(json!(3)),
                    Some(json!("three")),
                    vec![]
                ),
                (
                    json!("two"),
                    Some(1),
                    Some(json!(2)),
                    Some(json!("two")),
                    vec!["id".to_string(), "n".into()]
                ),
            ],
            "{tier:?}"
        );
        assert!(
            events.iter().all(|e| e.old("n").is_none()),
            "n is not carried"
        );

        // a statement larger than one journal row
        let rows = STATEMENT_CHUNK_ROWS as i64 + 10;
        db.exec(&format!(
            "INSERT INTO t SELECT g, 'r' || g FROM generate_series(10, {}) g",
            rows + 9
        ))
        .await;
        db.exec("UPDATE t SET v = v || '!' WHERE id >= 10").await;
        let events = upd.take(rows as usize).await;
        for e in &events {
            let id = e.id().as_i64().unwrap();
            assert_eq!(e.old("v"), Some(&json!(format!("r{id}"))), "{tier:?}");
            assert_eq!(e.get("v"), Some(&json!(format!("r{id}!"))));
            assert_eq!(e.changed_columns().unwrap(), ["v"]);
        }

        db.exec("DELETE FROM t WHERE id <= 3").await;
        let mut events = del.take(3).await;
        events.sort_by_key(|e| e.id().as_i64());
        let olds: Vec<_> = events.iter().map(|e| e.old("v").cloned()).collect();
        assert_eq!(
            olds,
            [Some(json!("two")), Some(json!("one")), Some(json!("three"))],
            "{tier:?}"
        );
        assert!(events.iter().all(|e| e.changed_columns().is_none()));
        upd.assert_empty();
        del.assert_empty();
        notifier.stop().await.unwrap();
    }
}

#[actix_rt::test]
async fn switching_capture_is_drift_and_reinstalls_on_request() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let row = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .start()
        .await
        .unwrap();
    row.stop().await.unwrap();
    let Err(err) = Notifier::builder(&db.url)
        .watch(watch("t", Insert, Tier::Durable))
        .revoke_on_model_change(false)
        .start()
        .await
    else {
        panic!("a changed capture was installed without revoke_on_model_change");
    };
    assert!(matches!(err, Error::DefinitionDrift { .. }), "{err:?}");
    let notifier = Notifier::builder(&db.url)
        .watch(watch("t", Insert, Tier::Durable))
        .revoke_on_model_change(true)
        .start()
        .await
        .unwrap();
    let statement_level = "SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass \
                           AND NOT tgisinternal AND tgtype & 1 = 0";
    assert_eq!(db.count(statement_level).await, 1);
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t VALUES (1), (2)").await;
    assert_eq!(ev.take(2).await[1].id().as_i64(), Some(2));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn partitioned_and_inherited_tables_are_refused() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE m (id int, at int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE m_low PARTITION OF m FOR VALUES FROM (0) TO (100);
         CREATE TABLE base (id int PRIMARY KEY);
         CREATE TABLE child (extra int) INHERITS (base);
         ALTER TABLE child ADD PRIMARY KEY (id);",
    )
    .await;
    // a statement trigger on the parent would miss `INSERT INTO m_low …`, one on a partition
    // every write through the parent: both silently lose events, so both are refused
    for table in ["m", "m_low", "base", "child"] {
        let Err(err) = Notifier::builder(&db.url)
            .watch(watch(table, Insert, Tier::Durable))
            .start()
            .await
        else {
            panic!("statement capture on {table} was accepted");
        };
        assert!(
            matches!(err, Error::InvalidWatch { .. }),
            "{table}: {err:?}"
        );
        assert!(err.to_string().contains("Capture::Row"), "{err}");
    }
    assert_eq!(
        db.count("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
            .await,
        0,
        "nothing installed"
    );
    // row capture works there (its trigger is cloned to every partition)
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("m", Insert).tier(Tier::Durable))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("m", Insert)).await;
    db.exec("INSERT INTO m_low VALUES (1, 5)").await;
    assert_eq!(ev.next().await.id().values(), [json!(1), json!(5)]);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn columns_named_like_the_triggers_internals_are_refused() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (_sqn_n int PRIMARY KEY, v text)")
        .await;
    let Err(err) = Notifier::builder(&db.url)
        .watch(watch("t", Insert, Tier::Durable))
        .start()
        .await
    else {
        panic!("a column named _sqn_n was accepted");
    };
    assert!(err.to_string().contains("\"_sqn_n\""), "{err}");
    // row capture has no such restriction
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .start()
        .await
        .unwrap();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn big_rows_are_chunked_by_size_and_arrive_whole_in_order() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, body text)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(watch("t", Insert, Tier::Durable).extra_columns(["body"]))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    // 600 rows of 4,096 incompressible characters: ~2.4 MB stored, over the 1 MiB per
    // journal row, so the statement is cut by size long before 512 rows
    db.exec(
        "INSERT INTO t SELECT i, (SELECT string_agg(md5(random()::text || i || j), '')
                                  FROM generate_series(1, 128) j)
           FROM generate_series(1, 600) i",
    )
    .await;
    let events = ev.take(600).await;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.id().as_i64(), Some(i as i64 + 1), "in order");
        assert_eq!(
            e.get("body").and_then(|b| b.as_str()).map(str::len),
            Some(4096)
        );
    }
    let chunks = journal_events(&db).await;
    assert!(chunks.len() >= 3, "{chunks:?}");
    assert!(chunks.iter().all(|&n| n < 300), "{chunks:?}");
    assert_eq!(chunks.iter().sum::<i32>(), 600);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_big_filtered_update_keeps_the_statement_order_even_when_the_join_spills() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, status text, hits int)")
        .await;
    db.exec("INSERT INTO t SELECT i, 'new', 0 FROM generate_series(1, 20000) i")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(watch("t", Update, Tier::Poll).trigger_columns(["status"]))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
    // the trigger runs in the writer's session: a tiny work_mem makes its hash join spill
    db.client()
        .await
        .batch_execute(
            "SET work_mem = '64kB';
             UPDATE t SET hits = hits + 1, status = CASE WHEN id % 3 = 0 THEN status ELSE 'seen' END",
        )
        .await
        .unwrap();
    let ids: Vec<i64> = ev
        .take(13334)
        .await
        .iter()
        .map(|e| e.id().as_i64().unwrap())
        .collect();
    let expected: Vec<i64> = (1..=20000).filter(|i| i % 3 != 0).collect();
    assert_eq!(ids, expected, "every changed row, in the update's order");
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn an_old_install_script_is_reported_when_triggers_are_managed_outside() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let builder = Notifier::builder(&db.url).watch(Watch::new("t", Insert).tier(Tier::Durable));
    builder.start().await.unwrap().stop().await.unwrap();
    db.exec("ALTER TABLE sqlnotify.journal DROP COLUMN events")
        .await;
    let Err(err) = builder.clone().manage_triggers(false).start().await else {
        panic!("started on a journal without the events column");
    };
    assert!(matches!(err, Error::DefinitionDrift { .. }), "{err:?}");
    assert!(err.to_string().contains("install_sql()"), "{err}");
}

#[actix_rt::test]
async fn hostile_journal_rows_are_counted_and_the_budget_stays_exact() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(watch("t", Insert, Tier::Durable))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    let channel = "sqlnotify_public_t_insert";
    db.exec(&format!(
        "INSERT INTO sqlnotify.journal (channel, payload, events) VALUES
           ('{channel}', '[{{\"id\": 1}}, {{\"id\": 2}}, {{\"id\": 3}}]', 2),  -- says fewer rows than it holds
           ('{channel}', '[{{\"id\": 4}}, 7, {{\"nope\": 1}}, {{\"id\": 5}}]', 4), -- two bad rows
           ('{channel}', '[1, 2', 2),                                           -- not JSON
           ('{channel}', '{{\"id\": 6}}', 300),                                 -- one object, big count
           ('{channel}', '[]', 1);
         NOTIFY {channel};"
    ))
    .await;
    let ids: Vec<i64> = ev
        .take(3)
        .await
        .iter()
        .map(|e| e.id().as_i64().unwrap())
        .collect();
    assert_eq!(ids, [4, 5, 6]);
    db.exec("INSERT INTO t VALUES (7)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(7));
    ev.assert_empty();
    assert_eq!(notifier.stats().await.unwrap().malformed, 5);
    // every unit of budget the listener took for the hostile rows was given back (a unit
    // handed back twice fails a debug assertion in the pipeline instead)
    let caught_up = wait_until(Duration::from_secs(10), || async {
        notifier.stats().await.unwrap().in_flight == 0
    })
    .await;
    assert!(caught_up, "{:?}", notifier.stats().await.unwrap());
    // the budget is intact: a statement of the smallest budget's size still gets through
    // twice over (it could not if units had leaked or been over-returned)
    for round in 0..2 {
        let first = 1000 + round * 1024 + 1;
        db.exec(&format!(
            "INSERT INTO t SELECT i FROM generate_series({first}, {first} + 1023) i"
        ))
        .await;
        let ids: Vec<i64> = ev
            .take(1024)
            .await
            .iter()
            .map(|e| e.id().as_i64().unwrap())
            .collect();
        assert_eq!(ids, (first..first + 1024).collect::<Vec<_>>());
    }
    // sentinel: nothing else (no repeat of those rows) was on its way
    db.exec("INSERT INTO t VALUES (9999)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(9999));
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_stuck_subscriber_holds_reading_at_the_budget_then_everything_arrives() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(watch("t", Insert, Tier::Poll))
        .max_in_flight(1024)
        .start()
        .await
        .unwrap();
    let (slow, release, mut events, arbiter) = gated();
    notifier
        .subscribe(
            Subscription::new("t", Insert)
                .buffer(10)
                .policy(OverflowPolicy::Wait),
            slow,
        )
        .await
        .unwrap();
    db.exec("INSERT INTO t SELECT i FROM generate_series(1, 6000) i")
        .await;
    // reading stops at the budget: of the 12 journal rows only the first few are read
    let stalled = wait_until(Duration::from_secs(10), || async {
        notifier.stats().await.unwrap().received >= 512
    })
    .await;
    assert!(stalled, "{:?}", notifier.stats().await.unwrap());
    let settled = wait_until(Duration::from_millis(500), || async {
        notifier.stats().await.unwrap().received > 1024 + 512
    })
    .await;
    let received = notifier.stats().await.unwrap().received;
    assert!(
        !settled && received < 6000,
        "read past the budget: {received}"
    );
    release.send(()).unwrap();
    for next in 1..=6000 {
        let e = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("all rows arrive")
            .unwrap();
        assert_eq!(e.id().as_i64(), Some(next), "in order");
    }
    notifier.stop().await.unwrap();
    arbiter.stop();
}

#[actix_rt::test]
async fn every_committed_row_arrives_once_while_the_listener_is_killed() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
        let notifier = Notifier::builder(&db.url)
            .watch(watch("t", Insert, tier))
            .start()
            .await
            .unwrap();
        // two writers commit multi-row statements (1–700 rows, so some are split), one
        // transaction in five rolled back, while the listener is killed 10 times
        let writers = (0..2i64).map(|w| {
            let db = &db;
            async move {
                let client = db.client().await;
                let mut committed = Vec::new();
                let mut next = w * 10_000_000;
                for n in 0..40i64 {
                    let size = 1 + (n * 97 + w * 13) % 700;
                    client.execute("BEGIN", &[]).await.unwrap();
                    client
                        .execute(
                            "INSERT INTO t SELECT generate_series($1::int, $2::int)",
                            &[&(next as i32), &((next + size - 1) as i32)],
                        )
                        .await
                        .unwrap();
                    if n % 5 == 2 {
                        client.execute("ROLLBACK", &[]).await.unwrap();
                    } else {
                        client.execute("COMMIT", &[]).await.unwrap();
                        committed.extend(next..next + size);
                    }
                    next += size;
                }
                committed
            }
        });
        let writes = async {
            let committed = futures_util::future::join_all(writers).await;
            committed.into_iter().flatten()
        };
        assert_every_row_once_through_kills(&db, &notifier, 10, writes, &format!("{tier:?}")).await;
        notifier.stop().await.unwrap();
    }
}

#[actix_rt::test]
async fn a_journal_of_an_older_version_is_upgraded_at_start() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let builder = Notifier::builder(&db.url).watch(watch("t", Insert, Tier::Durable));
    builder.start().await.unwrap().stop().await.unwrap();
    // the journal as versions before statement capture created it, written to by a
    // row-capture watch of that version
    db.exec("ALTER TABLE sqlnotify.journal DROP COLUMN events")
        .await;
    db.exec(
        "CREATE TABLE old_t (id int PRIMARY KEY);
         CREATE FUNCTION old_capture() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO sqlnotify.journal (channel, payload) VALUES ('x', '{}'); RETURN NULL; END $$;
         CREATE TRIGGER old_capture AFTER INSERT ON old_t FOR EACH ROW EXECUTE FUNCTION old_capture();",
    )
    .await;
    // while a writer holds a journal row uncommitted, the upgrade gives up after the install
    // timeout with an error naming the journal and the writer, instead of queueing every
    // writer behind it (tests/locking.rs: writers go through meanwhile)
    let mut writer = db.client().await;
    let writer_pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let open = writer.transaction().await.unwrap();
    open.execute("INSERT INTO old_t VALUES (1)", &[])
        .await
        .unwrap();
    let Err(err) = builder
        .clone()
        .install_timeout(Duration::from_secs(1))
        .start()
        .await
    else {
        panic!("upgraded under an open writer");
    };
    match &err {
        Error::LockTimeout {
            object,
            holder_pids,
            ..
        } => assert_eq!(
            (object.as_str(), holder_pids.as_slice()),
            ("sqlnotify.journal", &[writer_pid as u64][..]),
            "{err}"
        ),
        other => panic!("expected a lock timeout, got {other}"),
    }
    open.commit().await.unwrap();
    let notifier = builder.start().await.unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t VALUES (1), (2)").await;
    assert_eq!(ev.take(2).await[1].id().as_i64(), Some(2));
    notifier.stop().await.unwrap();
}

/// The `events` column of every journal row, in journal order.
async fn journal_events(db: &TestDb) -> Vec<i32> {
    db.client()
        .await
        .query("SELECT events FROM sqlnotify.journal ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Context with statement capture: every row of a statement carries the values of the writing
/// transaction (`SET LOCAL`), a statement over one chunk too; a custom setting that is not set
/// is null and never fails the write.
#[actix_rt::test]
async fn context_is_carried_by_every_row_of_a_statement() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
        let notifier = Notifier::builder(&db.url)
            .watch(watch("t", Insert, tier).context([
                "app.user_id",
                "app.unset",
                "application_name",
            ]))
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        let rows = STATEMENT_CHUNK_ROWS as i64 + 5;
        db.exec(&format!(
            "BEGIN; SET LOCAL app.user_id = 'u-7'; SET LOCAL application_name = 'bulk-loader'; \
             INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, {rows}) AS g; COMMIT;"
        ))
        .await;
        let events = ins.take(rows as usize).await;
        for e in &events {
            assert_eq!(e.context("app.user_id"), Some(&json!("u-7")), "{tier:?}");
            assert_eq!(e.context("app.unset"), Some(&json!(null)));
            assert_eq!(e.context("application_name"), Some(&json!("bulk-loader")));
        }
        let ids: Vec<i64> = events.iter().map(|e| e.id().as_i64().unwrap()).collect();
        assert_eq!(ids, (1..=rows).collect::<Vec<_>>(), "in order");
        // a writer that sets nothing: null
        db.exec("INSERT INTO t VALUES (0, 'z')").await;
        assert_eq!(ins.next().await.context("app.user_id"), Some(&json!(null)));
        ins.assert_empty();
        notifier.stop().await.unwrap();
    }
}
