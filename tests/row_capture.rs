//! Row capture (`Capture::Row`, the default) on PostgreSQL's journal tiers, seen through
//! multi-row statements: one event and one journal row (one `sequence()`) per changed row, in
//! the statement's order, exactly once, with each row's own values, old values and context —
//! whatever trigger implements it (a row trigger, or a statement trigger with transition
//! tables on plain tables) — and the partitions, inheritance members and `trigger_columns`
//! watches that keep the row trigger.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{connect, ids, Events, TestDb};
use serde_json::{json, Value};
use sqlnotify::Operation::{Delete, Insert, Update};
use sqlnotify::{ChangeEvent, Notifier, Subscription, Tier, Watch};

const TIERS: [Tier; 2] = [Tier::Durable, Tier::Poll];

/// How long a check that nothing (more) arrives waits.
const QUIET: Duration = Duration::from_millis(300);

fn watch(table: &str, op: sqlnotify::Operation, tier: Tier) -> Watch {
    Watch::new(table, op).tier(tier)
}

/// Asserts every event has a sequence of its own, strictly increasing in arrival order.
fn assert_sequences_increase(events: &[ChangeEvent], label: &str) {
    let sequences: Vec<i64> = events
        .iter()
        .map(|e| e.sequence().expect("a journal tier's event has a sequence"))
        .collect();
    for pair in sequences.windows(2) {
        assert!(
            pair[0] < pair[1],
            "{label}: sequences not strictly increasing: {pair:?} in {sequences:?}"
        );
    }
}

/// Asserts that the next event on each subscription is the sentinel row `id` and that none
/// follows it: nothing before it came twice, nothing extra is on its way.
async fn assert_last_is(subscriptions: &mut [&mut Events], id: i64, label: &str) {
    for (i, events) in subscriptions.iter_mut().enumerate() {
        assert_eq!(
            events.next().await.id().as_i64(),
            Some(id),
            "{label}: subscription {i}"
        );
        events.assert_empty();
    }
}

/// How many journal rows channel `t`/`operation` has.
async fn journal_rows(db: &TestDb, table: &str, operation: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) FROM sqlnotify.journal WHERE channel = 'sqlnotify_public_{table}_{operation}'"
    ))
    .await
}

/// The columns of table `t`'s rows as PostgreSQL renders them to JSON, by id.
async fn rendered(db: &TestDb, columns: &[&str]) -> std::collections::BTreeMap<i64, Value> {
    let members: Vec<String> = columns.iter().map(|c| format!("'{c}', {c}")).collect();
    let sql = format!(
        "SELECT id::bigint, json_build_object({})::text FROM t",
        members.join(", ")
    );
    db.client()
        .await
        .query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let text: String = r.get(1);
            (r.get(0), serde_json::from_str(&text).unwrap())
        })
        .collect()
}

/// Multi-row INSERT, UPDATE and DELETE with columns of several types: one event per row,
/// carrying exactly that row's values, each with a sequence of its own (one journal row per
/// changed row), in the statement's order for the inserts.
#[actix_rt::test]
async fn multi_row_statements_give_one_event_and_one_sequence_per_row() {
    let columns = ["name", "doc", "amount", "at", "note", "total"];
    for tier in TIERS {
        let db = TestDb::new().await;
        // a dropped column and a generated one: the row's attributes are not its columns' order
        db.exec(
            "CREATE TABLE t (junk int, id int PRIMARY KEY, name text, doc jsonb, amount numeric(12, 2),
                             at timestamptz, note text,
                             total numeric GENERATED ALWAYS AS (amount * 3) STORED);
             ALTER TABLE t DROP COLUMN junk",
        )
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(watch("t", Insert, tier).extra_columns(columns))
            .watch(watch("t", Update, tier).extra_columns(columns))
            .watch(watch("t", Delete, tier).extra_columns(["name"]))
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        let mut upd = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
        let mut del = Events::subscribe(&notifier, Subscription::new("t", Delete)).await;

        // every 7th row has NULLs; every 10th a text with quotes, backslashes, control
        // characters and non-ASCII
        db.exec(
            r#"INSERT INTO t (id, name, doc, amount, at, note)
               SELECT i,
                      CASE WHEN i % 10 = 0 THEN 'it''s "q" \ \\n ü 日本 😀' || chr(10) || chr(9) || i
                           ELSE 'n' || i END,
                      CASE WHEN i % 7 = 0 THEN NULL
                           ELSE jsonb_build_object('i', i, 'tags', jsonb_build_array('a', i), 's', 'x"y\z') END,
                      CASE WHEN i % 7 = 0 THEN NULL ELSE i * 1.25 END,
                      CASE WHEN i % 7 = 0 THEN NULL
                           ELSE timestamptz '2026-01-02 03:04:05.678+00' + i * interval '1 hour' END,
                      NULL
                 FROM generate_series(1, 100) i"#,
        )
        .await;
        let events = ins.take(100).await;
        assert_eq!(ids(&events), (1..=100).collect::<Vec<_>>(), "{tier:?}");
        assert_sequences_increase(&events, &format!("{tier:?} insert"));
        let expected = rendered(&db, &columns).await;
        for e in &events {
            let id = e.id().as_i64().unwrap();
            for c in columns {
                assert_eq!(
                    e.get(c),
                    expected[&id].get(c),
                    "{tier:?}: row {id} column {c}: {}",
                    e.to_json()
                );
            }
        }
        assert_eq!(events[9].get("note"), Some(&Value::Null));
        assert_eq!(
            journal_rows(&db, "t", "insert").await,
            100,
            "{tier:?}: one journal row per inserted row"
        );

        // an UPDATE of 60 rows: each once, with its new values
        db.exec(
            "UPDATE t SET amount = amount * 2, note = 'u' || id,
                          doc = CASE WHEN doc IS NULL THEN '[]' ELSE doc || '{\"u\": true}' END
              WHERE id > 40",
        )
        .await;
        let events = upd.take(60).await;
        let updated: BTreeSet<i64> = ids(&events).into_iter().collect();
        assert_eq!(updated, (41..=100).collect(), "{tier:?}: each row once");
        assert_sequences_increase(&events, &format!("{tier:?} update"));
        let expected = rendered(&db, &columns).await;
        for e in &events {
            let id = e.id().as_i64().unwrap();
            assert_eq!(e.get("note"), Some(&json!(format!("u{id}"))));
            for c in columns {
                assert_eq!(e.get(c), expected[&id].get(c), "{tier:?}: row {id} {c}");
            }
        }
        assert_eq!(journal_rows(&db, "t", "update").await, 60, "{tier:?}");

        // a DELETE of 75 rows
        let names = rendered(&db, &["name"]).await;
        db.exec("DELETE FROM t WHERE id % 4 <> 0").await;
        let events = del.take(75).await;
        let deleted: BTreeSet<i64> = ids(&events).into_iter().collect();
        assert_eq!(deleted, (1..=100).filter(|i| i % 4 != 0).collect());
        assert_sequences_increase(&events, &format!("{tier:?} delete"));
        for e in &events {
            let id = e.id().as_i64().unwrap();
            assert_eq!(e.get("name"), names[&id].get("name"), "{tier:?}: row {id}");
        }
        assert_eq!(journal_rows(&db, "t", "delete").await, 75, "{tier:?}");

        // statements touching no row send nothing; every subscription then gets its sentinel
        db.exec("UPDATE t SET note = 'x' WHERE id > 1000; DELETE FROM t WHERE id < 0")
            .await;
        db.exec("INSERT INTO t (id) VALUES (1000); UPDATE t SET note = 's' WHERE id = 1000; DELETE FROM t WHERE id = 1000")
            .await;
        assert_last_is(
            &mut [&mut ins, &mut upd, &mut del],
            1000,
            &format!("{tier:?}"),
        )
        .await;
        let stats = notifier.stats().await.unwrap();
        assert_eq!(stats.malformed, 0, "{stats:?}");
        notifier.stop().await.unwrap();
    }
}

/// A statement of more rows than a chunk (512), and one of more bytes than a chunk (~1 MiB):
/// every row arrives once, whole and in the statement's order, each with its own journal row.
#[actix_rt::test]
async fn a_statement_larger_than_a_chunk_arrives_whole_and_in_order() {
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

        // 1,500 rows, in descending id order: the events follow the statement
        db.exec("INSERT INTO t SELECT i, 'b' || i FROM generate_series(1500, 1, -1) i")
            .await;
        let events = ev.take(1500).await;
        assert_eq!(
            ids(&events),
            (1..=1500).rev().collect::<Vec<_>>(),
            "{tier:?}"
        );
        assert!(events
            .iter()
            .all(|e| e.get("body") == Some(&json!(format!("b{}", e.id().as_i64().unwrap())))));
        assert_sequences_increase(&events, &format!("{tier:?} 1,500 rows"));

        // 40 rows of 102,400 incompressible characters: ~4 MB stored
        db.exec(
            "INSERT INTO t SELECT 10000 + i, (SELECT string_agg(md5(i::text || '-' || g::text), '')
                                                FROM generate_series(1, 3200) g)
               FROM generate_series(1, 40) i",
        )
        .await;
        let events = ev.take(40).await;
        assert_eq!(
            ids(&events),
            (10001..=10040).collect::<Vec<_>>(),
            "{tier:?}"
        );
        let bodies: std::collections::BTreeMap<i64, String> = db
            .client()
            .await
            .query("SELECT id::bigint, body FROM t WHERE id > 10000", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for e in &events {
            let body = e.get("body").and_then(Value::as_str).expect("a body");
            assert_eq!(body.len(), 102_400, "{tier:?}: whole");
            let id = e.id().as_i64().unwrap();
            assert!(
                body == bodies[&id],
                "{tier:?}: row {id} carries its own body"
            );
        }
        assert_sequences_increase(&events, &format!("{tier:?} big rows"));
        assert_eq!(journal_rows(&db, "t", "insert").await, 1540, "{tier:?}");

        // sentinel: nothing was on its way twice
        db.exec("INSERT INTO t VALUES (0, 'sentinel')").await;
        assert_last_is(&mut [&mut ev], 0, &format!("{tier:?}")).await;
        let stats = notifier.stats().await.unwrap();
        assert_eq!((stats.received, stats.malformed), (1541, 0), "{stats:?}");
        notifier.stop().await.unwrap();
    }
}

/// Old values: every updated row is paired with its own old row, also when the statement
/// changes every key, swaps two keys or swaps values between rows; a DELETE's old values are
/// each deleted row's.
#[actix_rt::test]
async fn old_values_pair_each_updated_row_with_its_own_old_row() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec(
            "CREATE TABLE t (id int PRIMARY KEY DEFERRABLE, name text, n int);
             INSERT INTO t SELECT i, chr(96 + i), i FROM generate_series(1, 6) i",
        )
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(
                watch("t", Update, tier)
                    .extra_columns(["name"])
                    .old_values(true),
            )
            .watch(
                watch("t", Delete, tier)
                    .extra_columns(["name"])
                    .old_values(true),
            )
            .start()
            .await
            .unwrap();
        let mut upd = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
        let mut del = Events::subscribe(&notifier, Subscription::new("t", Delete)).await;
        let seen = |e: &ChangeEvent| {
            (
                e.id().as_i64().unwrap(),
                e.get("name").cloned().unwrap(),
                e.old("id").cloned().unwrap(),
                e.old("name").cloned().unwrap(),
                e.changed_columns().unwrap().to_vec(),
            )
        };
        let sorted = |mut events: Vec<ChangeEvent>| {
            events.sort_by_key(|e| e.id().as_i64());
            events
        };

        // every key changes
        db.exec("UPDATE t SET id = id + 1000, name = upper(name)")
            .await;
        let events = sorted(upd.take(6).await);
        for (i, e) in (1..=6i64).zip(&events) {
            let letter = char::from(96 + i as u8).to_string();
            assert_eq!(
                seen(e),
                (
                    1000 + i,
                    json!(letter.to_uppercase()),
                    json!(i),
                    json!(letter),
                    vec!["id".to_string(), "name".into()]
                ),
                "{tier:?}"
            );
        }

        // values swapped between two rows, a third row updated to what it was
        db.exec(
            "UPDATE t SET name = CASE id WHEN 1001 THEN 'B' WHEN 1002 THEN 'A' ELSE name END
              WHERE id IN (1001, 1002, 1003)",
        )
        .await;
        let events = sorted(upd.take(3).await);
        let got: Vec<_> = events.iter().map(seen).collect();
        let name = vec!["name".to_string()];
        assert_eq!(
            got,
            [
                (1001, json!("B"), json!(1001), json!("A"), name.clone()),
                (1002, json!("A"), json!(1002), json!("B"), name),
                (1003, json!("C"), json!(1003), json!("C"), vec![]),
            ],
            "{tier:?}"
        );

        // two keys swapped (checked at the end of the statement), names unchanged
        db.exec(
            "UPDATE t SET id = CASE id WHEN 1004 THEN 1005 ELSE 1004 END, n = n * 10
              WHERE id IN (1004, 1005)",
        )
        .await;
        let events = sorted(upd.take(2).await);
        let got: Vec<_> = events.iter().map(seen).collect();
        let changed = vec!["id".to_string(), "n".into()];
        assert_eq!(
            got,
            [
                (1004, json!("E"), json!(1005), json!("E"), changed.clone()),
                (1005, json!("D"), json!(1004), json!("D"), changed),
            ],
            "{tier:?}"
        );

        // each deleted row's own old values
        db.exec("DELETE FROM t").await;
        let events = sorted(del.take(6).await);
        let got: Vec<_> = events
            .iter()
            .map(|e| {
                (
                    e.id().as_i64().unwrap(),
                    e.old("id").cloned(),
                    e.old("name").cloned(),
                )
            })
            .collect();
        let expected: Vec<_> = [
            (1001, "B"),
            (1002, "A"),
            (1003, "C"),
            (1004, "E"),
            (1005, "D"),
            (1006, "F"),
        ]
        .into_iter()
        .map(|(id, name)| (id, Some(json!(id)), Some(json!(name))))
        .collect();
        assert_eq!(got, expected, "{tier:?}");
        assert!(events.iter().all(|e| e.changed_columns().is_none()));
        upd.assert_none_within(QUIET).await;
        del.assert_empty();
        notifier.stop().await.unwrap();
    }
}

/// Context values are read per statement from the writer's session: every row of a
/// multi-row statement carries the value set when the statement ran, and a second statement
/// of the same transaction the value set before it.
#[actix_rt::test]
async fn context_values_are_captured_per_row_of_a_statement() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
        let notifier = Notifier::builder(&db.url)
            .watch(watch("t", Insert, tier).context(["app.user_id", "application_name"]))
            .watch(watch("t", Update, tier).context(["app.user_id"]))
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        let mut upd = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
        db.exec(
            "SET app.user_id = '7'; SET application_name = 'row-loader';
             INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g;
             BEGIN;
             SET LOCAL app.user_id = '8';
             INSERT INTO t SELECT g, 'w' || g FROM generate_series(51, 60) g;
             UPDATE t SET v = upper(v) WHERE id <= 20;
             COMMIT;
             UPDATE t SET v = v || '!' WHERE id > 55;",
        )
        .await;
        let events = ins.take(60).await;
        assert_eq!(ids(&events), (1..=60).collect::<Vec<_>>(), "{tier:?}");
        for e in &events {
            let id = e.id().as_i64().unwrap();
            let user = if id <= 50 { "7" } else { "8" };
            assert_eq!(
                e.context("app.user_id"),
                Some(&json!(user)),
                "{tier:?}: row {id}"
            );
            assert_eq!(e.context("application_name"), Some(&json!("row-loader")));
        }
        let events = upd.take(25).await;
        let mut updated = ids(&events);
        updated.sort();
        let expected: Vec<i64> = (1..=20).chain(56..=60).collect();
        assert_eq!(updated, expected, "{tier:?}");
        for e in &events {
            let id = e.id().as_i64().unwrap();
            let user = if id <= 20 { "8" } else { "7" };
            assert_eq!(e.context("app.user_id"), Some(&json!(user)), "row {id}");
        }
        ins.assert_empty();
        upd.assert_none_within(QUIET).await;
        notifier.stop().await.unwrap();
    }
}

/// `INSERT … ON CONFLICT DO UPDATE` over new and existing keys: each inserted key arrives once
/// on the INSERT watch, each updated key once on the UPDATE watch, each in the statement's
/// order; `DO NOTHING` delivers only the rows it inserted.
#[actix_rt::test]
async fn insert_on_conflict_delivers_every_insert_and_update() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec(
            "CREATE TABLE t (id int PRIMARY KEY, name text);
             INSERT INTO t SELECT g, 'old' || g FROM generate_series(1, 20, 2) g",
        )
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(watch("t", Insert, tier).extra_columns(["name"]))
            .watch(watch("t", Update, tier).extra_columns(["name"]))
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        let mut upd = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
        // odd keys exist, even ones are new
        db.exec(
            "INSERT INTO t SELECT g, 'new' || g FROM generate_series(1, 20) g
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name || '!'",
        )
        .await;
        let inserted = ins.take(10).await;
        assert_eq!(
            ids(&inserted),
            (2..=20).step_by(2).collect::<Vec<_>>(),
            "{tier:?}"
        );
        assert!(inserted
            .iter()
            .all(|e| e.get("name") == Some(&json!(format!("new{}", e.id().as_i64().unwrap())))));
        let updated = upd.take(10).await;
        assert_eq!(
            ids(&updated),
            (1..=20).step_by(2).collect::<Vec<_>>(),
            "{tier:?}"
        );
        assert!(updated
            .iter()
            .all(|e| e.get("name") == Some(&json!(format!("new{}!", e.id().as_i64().unwrap())))));
        assert_sequences_increase(&inserted, &format!("{tier:?} upsert inserts"));
        assert_sequences_increase(&updated, &format!("{tier:?} upsert updates"));

        db.exec(
            "INSERT INTO t SELECT g, 'dn' || g FROM generate_series(15, 25) g ON CONFLICT DO NOTHING",
        )
        .await;
        assert_eq!(
            ids(&ins.take(5).await),
            (21..=25).collect::<Vec<_>>(),
            "{tier:?}"
        );
        // sentinels: nothing else was on its way on either channel
        db.exec("INSERT INTO t VALUES (100, 's'); UPDATE t SET name = 'u' WHERE id = 100")
            .await;
        assert_last_is(&mut [&mut ins, &mut upd], 100, &format!("{tier:?}")).await;
        notifier.stop().await.unwrap();
    }
}

/// The message of the error `sql` fails with.
async fn failure(db: &TestDb, sql: &str) -> Option<String> {
    db.client().await.batch_execute(sql).await.err().map(|e| {
        e.as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string())
    })
}

/// A watched plain table may not become a partition or an inheritance child while its
/// watches are installed (a statement trigger on it would miss the writes made through the
/// parent); once the watches are removed, it may.
#[actix_rt::test]
async fn a_watched_plain_table_cannot_become_a_partition_or_child() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE watched (id int PRIMARY KEY, v text);
         CREATE TABLE p (LIKE watched) PARTITION BY RANGE (id);
         CREATE TABLE q (LIKE watched);",
    )
    .await;
    let builder = Notifier::builder(&db.url).watch(watch("watched", Insert, Tier::Durable));
    let notifier = builder.start().await.unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("watched", Insert)).await;

    let attach = "ALTER TABLE p ATTACH PARTITION watched FOR VALUES FROM (0) TO (1000)";
    let message = failure(&db, attach).await;
    let message = message.expect("a watched table was attached as a partition");
    assert!(
        message.contains("prevents table") && message.contains("\"watched\""),
        "{message}"
    );
    let message = failure(&db, "ALTER TABLE watched INHERIT q").await;
    let message = message.expect("a watched table became an inheritance child");
    assert!(
        message.contains("prevents table") && message.contains("\"watched\""),
        "{message}"
    );
    // the watch is untouched
    db.exec("INSERT INTO watched VALUES (1, 'a'), (2, 'b')")
        .await;
    assert_eq!(ids(&ev.take(2).await), [1, 2]);
    ev.assert_empty();

    notifier.stop().await.unwrap();
    builder.cleanup().await.unwrap();
    assert_eq!(failure(&db, attach).await, None, "attached once unwatched");
    assert_eq!(
        db.count("SELECT count(*) FROM p").await,
        2,
        "the rows are the partition's"
    );
}

/// Partitioned tables, partitions and inheritance members keep capturing every row, whichever
/// table the statement names: through the parent or directly into a partition or child.
#[actix_rt::test]
async fn partitions_and_inheritance_keep_the_row_trigger() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec(
            "CREATE TABLE p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
             CREATE TABLE p_low PARTITION OF p FOR VALUES FROM (0) TO (100);
             CREATE TABLE p_high PARTITION OF p FOR VALUES FROM (100) TO (1000);
             CREATE TABLE base (id int PRIMARY KEY, v text);
             CREATE TABLE child (extra int) INHERITS (base);
             ALTER TABLE child ADD PRIMARY KEY (id);
             INSERT INTO base VALUES (1, 'b1'), (2, 'b2');
             INSERT INTO child VALUES (3, 'c3', 0), (4, 'c4', 0);",
        )
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(watch("p", Insert, tier))
            .watch(watch("p_low", Insert, tier))
            .watch(watch("base", Update, tier))
            .watch(watch("child", Update, tier))
            .start()
            .await
            .unwrap();
        let mut p = Events::subscribe(&notifier, Subscription::new("p", Insert)).await;
        let mut low = Events::subscribe(&notifier, Subscription::new("p_low", Insert)).await;
        let mut base = Events::subscribe(&notifier, Subscription::new("base", Update)).await;
        let mut child = Events::subscribe(&notifier, Subscription::new("child", Update)).await;

        // through the parent, across both partitions, then directly into each
        db.exec("INSERT INTO p SELECT g, 'v' FROM generate_series(95, 104) g")
            .await;
        db.exec("INSERT INTO p_low VALUES (1, 'direct'), (2, 'direct')")
            .await;
        db.exec("INSERT INTO p_high VALUES (500, 'direct')").await;
        let through: Vec<i64> = (95..=104).collect();
        let expected: Vec<i64> = through.iter().copied().chain([1, 2, 500]).collect();
        assert_eq!(
            ids(&p.take(13).await),
            expected,
            "{tier:?}: the parent's watch"
        );
        assert_eq!(
            ids(&low.take(7).await),
            [95, 96, 97, 98, 99, 1, 2],
            "{tier:?}: the partition's watch"
        );

        // an UPDATE naming the inheritance parent reaches the child's rows: the child's watch
        // gets them, the parent's watch its own rows; an UPDATE of the child directly too
        db.exec("UPDATE base SET v = upper(v)").await;
        db.exec("UPDATE child SET extra = 1").await;
        let mut parent_rows = ids(&base.take(2).await);
        parent_rows.sort();
        assert_eq!(parent_rows, [1, 2], "{tier:?}: the parent's watch");
        let mut child_rows = ids(&child.take(4).await);
        child_rows.sort();
        assert_eq!(child_rows, [3, 3, 4, 4], "{tier:?}: the child's watch");

        p.assert_empty();
        low.assert_none_within(QUIET).await;
        base.assert_empty();
        child.assert_empty();
        notifier.stop().await.unwrap();
    }
}

/// `trigger_columns` still filter row by row within a multi-row UPDATE: only the rows whose
/// listed columns really changed (NULL to a value counts, NULL to NULL does not) arrive.
#[actix_rt::test]
async fn trigger_columns_still_filter_per_row() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec(
            "CREATE TABLE t (id int PRIMARY KEY, name text, hits int);
             INSERT INTO t SELECT g, CASE WHEN g > 8 THEN NULL ELSE 'n' || g END, 0
               FROM generate_series(1, 10) g",
        )
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(
                watch("t", Update, tier)
                    .extra_columns(["name"])
                    .trigger_columns(["name"]),
            )
            .start()
            .await
            .unwrap();
        let mut ev = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
        // hits changes everywhere; name on 3 and 6, NULL -> value on 9, NULL -> NULL on 10
        db.exec(
            "UPDATE t SET hits = hits + 1,
                          name = CASE WHEN id IN (3, 6) THEN 'x' || id WHEN id = 9 THEN 'nine'
                                      ELSE name END",
        )
        .await;
        let events = ev.take(3).await;
        assert_eq!(ids(&events), [3, 6, 9], "{tier:?}");
        assert_eq!(events[2].get("name"), Some(&json!("nine")));
        assert_sequences_increase(&events, &format!("{tier:?}"));
        assert_eq!(journal_rows(&db, "t", "update").await, 3, "{tier:?}");
        // nothing really changed: no journal row, no event
        db.exec("UPDATE t SET name = name, hits = 0").await;
        assert_eq!(journal_rows(&db, "t", "update").await, 3, "{tier:?}");
        db.exec("UPDATE t SET name = 'last' WHERE id = 1").await;
        assert_last_is(&mut [&mut ev], 1, &format!("{tier:?}")).await;
        notifier.stop().await.unwrap();
    }
}

/// A writer with no privilege beyond the table's (granted through a group role) has every
/// row of its multi-row statements captured; a role that may not write to the table sends
/// nothing by calling the helper with several rows, and its call succeeds.
#[actix_rt::test]
async fn a_role_without_the_privilege_gets_no_events_and_its_write_succeeds() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
        let (group, _) = db.role("group").await;
        let (member, member_url) = db.role("member").await;
        let (_, mallory) = db.role("mallory").await;
        db.exec(&format!(
            "GRANT SELECT, INSERT, UPDATE ON t TO \"{group}\"; GRANT \"{group}\" TO \"{member}\""
        ))
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(watch("t", Insert, tier).extra_columns(["v"]))
            .watch(watch("t", Update, tier).extra_columns(["v"]))
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        let mut upd = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
        connect(&member_url)
            .await
            .batch_execute(
                "INSERT INTO t SELECT g, 'm' || g FROM generate_series(1, 600) g;
                 UPDATE t SET v = 'u' WHERE id <= 30",
            )
            .await
            .expect("the member's writes succeed");
        assert_eq!(
            ids(&ins.take(600).await),
            (1..=600).collect::<Vec<_>>(),
            "{tier:?}"
        );
        let mut updated = ids(&upd.take(30).await);
        updated.sort();
        assert_eq!(updated, (1..=30).collect::<Vec<_>>(), "{tier:?}");

        // the helper of row capture on a plain table takes one payload per row
        connect(&mallory)
            .await
            .batch_execute(
                r#"SELECT sqlnotify.sqlnotify_public_t_insert(
                       ARRAY['{"id": 1000, "v": "forged"}', '{"id": 1001, "v": "forged"}']);
                   SELECT sqlnotify.sqlnotify_public_t_insert(ARRAY['{"id": 1002}']);
                   SELECT pg_notify('sqlnotify_public_t_insert', '')"#,
            )
            .await
            .expect("the calls succeed and do nothing");
        assert_eq!(journal_rows(&db, "t", "insert").await, 600, "{tier:?}");
        ins.assert_none_within(QUIET).await;
        let stats = notifier.stats().await.unwrap();
        assert_eq!((stats.forged, stats.malformed), (0, 0), "{stats:?}");
        notifier.stop().await.unwrap();
    }
}

/// A multi-row statement of a rolled-back transaction delivers nothing; one rolled back to a
/// savepoint inside a committed transaction delivers only the rows that survived, in order.
#[actix_rt::test]
async fn rolled_back_statements_deliver_nothing() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
        let notifier = Notifier::builder(&db.url)
            .watch(watch("t", Insert, tier))
            .watch(watch("t", Delete, tier))
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        let mut del = Events::subscribe(&notifier, Subscription::new("t", Delete)).await;
        db.exec(
            "BEGIN; INSERT INTO t SELECT generate_series(1, 700); ROLLBACK;
             BEGIN;
             INSERT INTO t SELECT generate_series(1, 10);
             SAVEPOINT s;
             INSERT INTO t SELECT generate_series(11, 600);
             DELETE FROM t WHERE id <= 5;
             ROLLBACK TO s;
             INSERT INTO t SELECT generate_series(601, 605);
             SAVEPOINT s2;
             DELETE FROM t WHERE id > 600;
             RELEASE s2;
             COMMIT;
             INSERT INTO t VALUES (-1); DELETE FROM t WHERE id = -1;",
        )
        .await;
        let expected: Vec<i64> = (1..=10).chain(601..=605).chain([-1]).collect();
        assert_eq!(ids(&ins.take(16).await), expected, "{tier:?}");
        let mut deleted = ids(&del.take(6).await);
        let sentinel = deleted.pop();
        deleted.sort();
        assert_eq!(
            (deleted, sentinel),
            ((601..=605).collect(), Some(-1)),
            "{tier:?}"
        );
        ins.assert_empty();
        del.assert_empty();
        assert_eq!(journal_rows(&db, "t", "insert").await, 16, "{tier:?}");
        notifier.stop().await.unwrap();
    }
}

/// Several writes to the watched table in one statement (data-modifying CTEs), statements run
/// by a user's trigger or a DO block, and a user's BEFORE trigger that skips some rows and
/// rewrites the others: every row that really changed arrives once, with its final values.
#[actix_rt::test]
async fn ctes_nested_statements_and_before_triggers_deliver_every_final_row_once() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'old' FROM generate_series(101, 104) g;
             CREATE FUNCTION skip_fives() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.id % 5 = 0 THEN RETURN NULL; END IF;
               NEW.v := NEW.v || '+';
               RETURN NEW;
             END $$;
             CREATE TRIGGER skip_fives BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION skip_fives();
             CREATE TABLE src (id int);
             CREATE FUNCTION copy_src() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO t SELECT id + 1000, 'nested' FROM new_src ORDER BY id;
               RETURN NULL;
             END $$;
             CREATE TRIGGER copy_src AFTER INSERT ON src REFERENCING NEW TABLE AS new_src
               FOR EACH STATEMENT EXECUTE FUNCTION copy_src();",
        )
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(watch("t", Insert, tier).extra_columns(["v"]))
            .watch(watch("t", Update, tier).extra_columns(["v"]))
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        let mut upd = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
        let set = |events: &[ChangeEvent]| -> BTreeSet<(i64, String)> {
            events
                .iter()
                .map(|e| {
                    let v = e.get("v").and_then(Value::as_str).unwrap_or_default();
                    (e.id().as_i64().unwrap(), v.to_string())
                })
                .collect()
        };

        // two INSERTs and two UPDATEs of t in one statement (5 and 10 skipped by the trigger)
        db.exec(
            "WITH a AS (INSERT INTO t SELECT g, 'a' FROM generate_series(1, 5) g RETURNING id),
                  b AS (INSERT INTO t SELECT g, 'b' FROM generate_series(6, 10) g RETURNING id),
                  u AS (UPDATE t SET v = 'u' WHERE id IN (101, 102) RETURNING id)
             UPDATE t SET v = 'w' WHERE id IN (103, 104)",
        )
        .await;
        let inserted = ins.take(8).await;
        let expected: BTreeSet<(i64, String)> = [1, 2, 3, 4]
            .map(|i| (i, "a+".to_string()))
            .into_iter()
            .chain([6, 7, 8, 9].map(|i| (i, "b+".to_string())))
            .collect();
        assert_eq!(set(&inserted), expected, "{tier:?}: each row once");
        let updated = upd.take(4).await;
        let expected: BTreeSet<(i64, String)> = [(101, "u"), (102, "u"), (103, "w"), (104, "w")]
            .map(|(i, v)| (i, v.to_string()))
            .into_iter()
            .collect();
        assert_eq!(set(&updated), expected, "{tier:?}: each row once");

        // a statement of a user's statement trigger, then the statements of a DO block
        db.exec("INSERT INTO src SELECT generate_series(1, 6)")
            .await;
        let nested = ins.take(5).await;
        assert_eq!(ids(&nested), [1001, 1002, 1003, 1004, 1006], "{tier:?}");
        assert!(nested.iter().all(|e| e.get("v") == Some(&json!("nested+"))));
        db.exec(
            "DO $$ BEGIN
               FOR i IN 1..3 LOOP
                 INSERT INTO t SELECT g, 'loop' FROM generate_series(2000 + i * 10, 2000 + i * 10 + 5) g;
               END LOOP;
             END $$",
        )
        .await;
        let expected: Vec<i64> = (1..=3)
            .flat_map(|i| 2000 + i * 10..=2000 + i * 10 + 5)
            .filter(|id| id % 5 != 0)
            .collect();
        let looped = ins.take(expected.len()).await;
        assert_eq!(ids(&looped), expected, "{tier:?}");
        assert_sequences_increase(&looped, &format!("{tier:?} DO block"));

        db.exec("INSERT INTO t VALUES (-1, 's'); UPDATE t SET v = 'z' WHERE id = -1")
            .await;
        assert_last_is(&mut [&mut ins, &mut upd], -1, &format!("{tier:?}")).await;
        notifier.stop().await.unwrap();
    }
}

/// A table whose name needs quoting, with a composite key and columns named like trigger
/// internals (`_sqn_…`, `new`, `old`, `tg_op`): multi-row statements still deliver each row's
/// key, values and old values — row capture accepts such tables, and keeps delivering them.
#[actix_rt::test]
async fn odd_names_and_columns_named_like_internals_are_captured() {
    let table = "Odd \"T\" x'y";
    let quoted = "\"Odd \"\"T\"\" x'y\"";
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec(&format!(
            "CREATE TABLE {quoted} (\"Key\" int, _sqn_n int, _sqn_p text, new text, old text,
                                    tg_op text, _sqn_r int, PRIMARY KEY (\"Key\", _sqn_n))"
        ))
        .await;
        let extra = ["_sqn_p", "new", "old", "tg_op"];
        let notifier = Notifier::builder(&db.url)
            .watch(watch(table, Insert, tier).extra_columns(extra))
            .watch(
                watch(table, Update, tier)
                    .extra_columns(extra)
                    .old_values(true),
            )
            .watch(
                watch(table, Delete, tier)
                    .extra_columns(extra)
                    .old_values(true),
            )
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new(table, Insert)).await;
        let mut upd = Events::subscribe(&notifier, Subscription::new(table, Update)).await;
        let mut del = Events::subscribe(&notifier, Subscription::new(table, Delete)).await;
        db.exec(&format!(
            "INSERT INTO {quoted} SELECT g, -g, 'p' || g, 'new' || g, 'old' || g, 'op' || g, g
               FROM generate_series(1, 20) g"
        ))
        .await;
        let events = ins.take(20).await;
        for (g, e) in (1..=20i64).zip(&events) {
            assert_eq!(e.id().values(), [json!(g), json!(-g)], "{tier:?}");
            for (c, prefix) in extra.iter().zip(["p", "new", "old", "op"]) {
                assert_eq!(e.get(c), Some(&json!(format!("{prefix}{g}"))), "{c}");
            }
        }
        db.exec(&format!(
            "UPDATE {quoted} SET _sqn_n = _sqn_n - 100, old = new, new = old, _sqn_r = 0
              WHERE \"Key\" <= 10"
        ))
        .await;
        let mut events = upd.take(10).await;
        events.sort_by_key(|e| e.id().values()[0].as_i64());
        for (g, e) in (1..=10i64).zip(&events) {
            assert_eq!(e.id().values(), [json!(g), json!(-g - 100)], "{tier:?}");
            assert_eq!(
                (e.get("new"), e.get("old")),
                (
                    Some(&json!(format!("old{g}"))),
                    Some(&json!(format!("new{g}")))
                )
            );
            assert_eq!(
                (e.old("_sqn_n"), e.old("new"), e.old("old")),
                (
                    Some(&json!(-g)),
                    Some(&json!(format!("new{g}"))),
                    Some(&json!(format!("old{g}")))
                ),
                "{tier:?}: row {g}'s own old row"
            );
            let mut changed = e.changed_columns().unwrap().to_vec();
            changed.sort();
            assert_eq!(changed, ["_sqn_n", "_sqn_r", "new", "old"], "{tier:?}");
        }
        db.exec(&format!("DELETE FROM {quoted} WHERE \"Key\" > 15"))
            .await;
        let mut events = del.take(5).await;
        events.sort_by_key(|e| e.id().values()[0].as_i64());
        for (g, e) in (16..=20i64).zip(&events) {
            assert_eq!(e.old("_sqn_p"), Some(&json!(format!("p{g}"))), "{tier:?}");
            assert_eq!(e.id().values(), [json!(g), json!(-g)]);
        }
        ins.assert_empty();
        upd.assert_empty();
        del.assert_none_within(QUIET).await;
        notifier.stop().await.unwrap();
    }
}
