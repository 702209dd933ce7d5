//! The logical-decoding tier (`Tier::Logical`) on a throwaway cluster with `wal_level=logical`
//! that each test starts from the local PostgreSQL binaries: events equal the durable tier's
//! for every operation and column type, the checks that refuse a server or table, at least
//! once through walsender kills, a named consumer's resume, slot lag, and cleanup.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{wait_until, Cluster, Events, TestDb};
use futures_util::future::join_all;
use sqlnotify::Operation::{Delete, Insert, Update};
use sqlnotify::{Error, Notifier, Subscription, Tier, Watch};
use tokio::sync::mpsc;

const SETTINGS: &str =
    "-c wal_level=logical -c max_replication_slots=20 -c max_wal_senders=20 -c wal_sender_timeout=10s";

/// A cluster with `wal_level=logical`, or `None` (the test is skipped, or fails under CI)
/// without PostgreSQL's binaries.
fn cluster(test: &str) -> Option<Cluster> {
    let cluster = Cluster::start_with(SETTINGS);
    if cluster.is_none() {
        common::prerequisite_missing(test, "PostgreSQL's binaries (initdb, pg_ctl)");
    }
    cluster
}

/// [`cluster`] with a database of its own holding `t (id int PRIMARY KEY)`, and a notifier
/// watching its inserts on the logical tier.
async fn watching_t(test: &str) -> Option<(Cluster, TestDb, Notifier)> {
    let cluster = cluster(test)?;
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .start()
        .await
        .unwrap();
    Some((cluster, db, notifier))
}

async fn slots(db: &TestDb) -> Vec<String> {
    let rows = db
        .client()
        .await
        .query(
            "SELECT slot_name::text FROM pg_replication_slots ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

async fn publications(db: &TestDb) -> Vec<String> {
    let rows = db
        .client()
        .await
        .query("SELECT pubname::text FROM pg_publication ORDER BY 1", &[])
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

const TYPES: &str = "CREATE TABLE t (
    id int PRIMARY KEY, small smallint, big bigint, num numeric, dbl float8, flt real,
    yes boolean, txt text, vc varchar(20), doc jsonb, raw json, at timestamptz, local timestamp,
    day date, uid uuid, bin bytea, ints int[], words text[], nan float8, huge text)";

const COLUMNS: [&str; 19] = [
    "small", "big", "num", "dbl", "flt", "yes", "txt", "vc", "doc", "raw", "at", "local", "day",
    "uid", "bin", "ints", "words", "nan", "huge",
];

fn watches(tier: Tier) -> Vec<Watch> {
    [Insert, Update, Delete]
        .into_iter()
        .map(|op| {
            let w = Watch::new("t", op).extra_columns(COLUMNS).tier(tier);
            if op == Insert {
                w
            } else {
                w.old_values(true)
            }
        })
        .collect()
}

#[actix_rt::test]
async fn every_operation_and_column_type_arrives_as_the_durable_tier_delivers_it() {
    let Some(cluster) = cluster("every_operation_and_column_type") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec(TYPES).await;
    db.exec("ALTER TABLE t REPLICA IDENTITY FULL").await;
    let mut notifiers = Vec::new();
    let mut events = Vec::new();
    for tier in [Tier::Logical, Tier::Durable] {
        let mut builder = Notifier::builder(&db.url);
        for w in watches(tier) {
            builder = builder.watch(w);
        }
        let notifier = builder.start().await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        for op in [Insert, Update, Delete] {
            let tx = tx.clone();
            notifier
                .subscribe_fn(Subscription::new("t", op), move |e| {
                    let _ = tx.send(e);
                })
                .await
                .unwrap();
        }
        notifiers.push(notifier);
        events.push(rx);
    }
    db.exec(
        "INSERT INTO t VALUES (1, -32768, 9223372036854775807, 12.50, 1.5e300, 0.25, true, \
         'héllo \"q\"', 'v', '{\"a\": [1, null, \"x\"]}', '{\"b\":2}', '2024-05-01 12:00:00.5+02', \
         '2024-05-01 12:00:00', '2024-05-01', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff', \
         '{1,NULL,3}', '{\"a b\",c}', 'NaN', repeat('z', 100000)); \
         INSERT INTO t (id) VALUES (2)",
    )
    .await;
    db.exec(
        "BEGIN; UPDATE t SET txt = 'changed', small = 1 WHERE id = 1; UPDATE t SET yes = false WHERE id = 2; COMMIT; \
         DELETE FROM t WHERE id = 2; UPDATE t SET id = 3 WHERE id = 1",
    )
    .await;
    let mut got = Vec::new();
    for rx in &mut events {
        let mut list = Vec::new();
        for _ in 0..6 {
            let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an event in time")
                .unwrap();
            list.push(e);
        }
        // Each operation has its own subscription, delivered by its own actor: order only
        // within one; (operation, key) is unique in this script.
        list.sort_by_key(|e| (e.operation().as_str(), e.id().to_string()));
        got.push(list);
    }
    let (logical, durable) = (&got[0], &got[1]);
    let find = |op: sqlnotify::Operation, id: i64| {
        logical
            .iter()
            .find(|e| e.operation() == op && e.id().as_i64() == Some(id))
            .unwrap_or_else(|| panic!("no {} {id}", op.as_str()))
    };
    for (l, d) in logical.iter().zip(durable) {
        let what = format!("{} {}", d.operation().as_str(), d.id());
        assert_eq!(l.operation(), d.operation(), "{what}");
        assert_eq!(l.id(), d.id(), "{what}");
        for c in COLUMNS {
            assert_eq!(l.get(c), d.get(c), "{what}: column {c}");
        }
        assert_eq!(l.old_values(), d.old_values(), "{what}: old values");
        assert_eq!(
            l.changed_columns()
                .map(|c| c.iter().collect::<BTreeSet<_>>()),
            d.changed_columns()
                .map(|c| c.iter().collect::<BTreeSet<_>>()),
            "{what}: changed columns"
        );
        assert_eq!(
            l.transaction_id(),
            d.transaction_id(),
            "{what}: transaction"
        );
        assert_eq!(
            l.last_in_transaction(),
            d.last_in_transaction(),
            "{what}: last mark"
        );
    }
    // The huge value is TOASTed: an UPDATE that left it alone still carries it (FULL).
    let huge = find(Insert, 1).get("huge").expect("the huge value");
    assert_eq!(huge.to_string().len(), 100_002);
    for (op, id) in [(Update, 1), (Update, 3)] {
        assert_eq!(find(op, id).get("huge"), Some(huge), "{} {id}", op.as_str());
    }
    assert_eq!(find(Update, 1).last_in_transaction(), Some(false));
    assert_eq!(find(Update, 2).last_in_transaction(), Some(true));
    assert_eq!(
        find(Update, 1).transaction_id(),
        find(Update, 2).transaction_id()
    );
    assert_ne!(
        find(Insert, 1).transaction_id(),
        find(Update, 1).transaction_id()
    );
    for n in notifiers {
        n.stop().await.unwrap();
    }
    assert!(
        slots(&db).await.is_empty(),
        "a notifier without a consumer leaves no slot"
    );
    assert!(publications(&db).await.is_empty(), "nor a publication");
}

#[actix_rt::test]
async fn start_refuses_a_server_without_wal_level_logical() {
    let db = TestDb::new().await; // the shared server
    let level: String = db
        .client()
        .await
        .query_one("SHOW wal_level", &[])
        .await
        .unwrap()
        .get(0);
    if level == "logical" {
        common::prerequisite_missing(
            "start_refuses_a_server_without_wal_level_logical",
            "a server whose wal_level is not logical",
        );
        return;
    }
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let e = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::WalLevelNotLogical { wal_level } if *wal_level == level),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains("wal_level = logical")
            && text.contains("postgresql.conf")
            && text.contains("restart"),
        "{text}"
    );
}

#[actix_rt::test]
async fn a_table_whose_identity_cannot_publish_is_refused_and_its_writes_still_work() {
    let Some(cluster) = cluster("a_table_whose_identity_cannot_publish_is_refused") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec(
        "CREATE TABLE nopk (id int, v text); INSERT INTO nopk VALUES (1, 'a'); \
         CREATE TABLE t (id int PRIMARY KEY, v text)",
    )
    .await;
    for watch in [
        Watch::new("nopk", Insert)
            .primary_keys(["id"])
            .tier(Tier::Logical),
        Watch::new("nopk", Update)
            .primary_keys(["id"])
            .tier(Tier::Logical),
    ] {
        let e = Notifier::builder(&db.url)
            .watch(watch)
            .start()
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::ReplicaIdentity { table, .. } if table == "public.nopk"),
            "{e:?}"
        );
        assert!(e.to_string().contains("REPLICA IDENTITY FULL"), "{e}");
    }
    // The application's writes were never broken: no publication holds the table.
    db.exec("UPDATE nopk SET v = 'b'; DELETE FROM nopk").await;
    assert!(publications(&db).await.is_empty());
    assert!(slots(&db).await.is_empty());
    // What a DEFAULT identity does not log is refused too, naming the fix.
    for watch in [
        Watch::new("t", Update).old_values(true).tier(Tier::Logical),
        Watch::new("t", Delete)
            .extra_columns(["v"])
            .tier(Tier::Logical),
    ] {
        let e = Notifier::builder(&db.url)
            .watch(watch)
            .start()
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::ReplicaIdentity { table, .. } if table == "public.t"),
            "{e:?}"
        );
    }
    // Mixing tiers in one notifier is refused.
    let e = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .watch(Watch::new("t", Update).tier(Tier::Durable))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidWatch { .. }), "{e:?}");
}

/// Four writers commit `per_writer` rows each in overlapping transactions of 1–20 rows, one in
/// ten rolled back; returns the ids that were committed.
async fn write_concurrently(db: &TestDb, per_writer: i64) -> BTreeSet<i64> {
    let writers = (0..4i64).map(|w| async move {
        let mut client = db.client().await;
        let mut committed = Vec::new();
        let (mut next, mut txn_no) = (0i64, 0u64);
        while next < per_writer {
            txn_no += 1;
            let size = 1 + (txn_no * 7 + w as u64) % 20;
            let tx = client.transaction().await.unwrap();
            let mut ids = Vec::new();
            for _ in 0..size.min((per_writer - next) as u64) {
                let id = w * 1_000_000 + next;
                tx.execute("INSERT INTO t VALUES ($1)", &[&(id as i32)])
                    .await
                    .unwrap();
                ids.push(id);
                next += 1;
            }
            if txn_no % 10 == 3 {
                tx.rollback().await.unwrap();
            } else {
                tx.commit().await.unwrap();
                committed.extend(ids);
            }
        }
        committed
    });
    join_all(writers).await.into_iter().flatten().collect()
}

/// The pid of the walsender streaming slot-owning notifier's changes in `db`.
async fn walsender_pid(db: &TestDb) -> Option<i32> {
    db.client()
        .await
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL LIMIT 1",
            &[&db.name],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Terminates the walsender `kills` times, each time a new one.
async fn kill_walsender(db: &TestDb, kills: usize) {
    let (mut done, mut last) = (0, None);
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while done < kills {
        assert!(
            tokio::time::Instant::now() < deadline,
            "kill {}: no new walsender",
            done + 1
        );
        if let Some(pid) = walsender_pid(db).await.filter(|pid| Some(*pid) != last) {
            let sql = format!("SELECT pg_terminate_backend({pid})::int::bigint");
            if db.count(&sql).await == 1 {
                done += 1;
                last = Some(pid);
                deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // pacing, not synchronisation
    }
}

#[actix_rt::test]
async fn every_committed_row_arrives_once_while_the_walsender_is_killed_20_times() {
    let Some((_cluster, db, notifier)) =
        watching_t("every_committed_row_arrives_once_while_killed").await
    else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    notifier
        .subscribe_fn(Subscription::new("t", Insert), move |e| {
            let _ = tx.send((e.id().as_i64().unwrap(), e.transaction_id()));
        })
        .await
        .unwrap();
    let (committed, ()) = tokio::join!(write_concurrently(&db, 1500), kill_walsender(&db, 20));
    let mut seen = BTreeSet::new();
    while seen.len() < committed.len() {
        let (id, xid) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {} rows arrived", seen.len(), committed.len()))
            .unwrap();
        assert!(committed.contains(&id), "rolled-back row {id} arrived");
        assert!(xid.is_some(), "row {id} without its transaction id");
        assert!(seen.insert(id), "row {id} arrived twice in one process");
    }
    db.exec("INSERT INTO t VALUES (-1)").await;
    let next = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.0, -1, "nothing else was on its way");
    let restarts = notifier.stats().await.unwrap().restarts;
    assert!(restarts >= 20, "{restarts} restarts");
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_named_consumer_resumes_from_its_slot_and_cleanup_removes_it() {
    let Some(cluster) = cluster("a_named_consumer_resumes_from_its_slot") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let start = || async {
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(Tier::Logical))
            .consumer("app")
            .start()
            .await
            .unwrap();
        let ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        (notifier, ev)
    };
    let (notifier, mut ev) = start().await;
    db.exec("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)")
        .await;
    assert_eq!(common::ids(&ev.take(2).await), [1, 2]);
    // While it runs, the slot is confirmed past what was delivered (not only at stop).
    let client = db.client().await;
    let written: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let confirmed = wait_until(Duration::from_secs(10), || async {
        client
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots",
                &[&written],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    assert!(
        confirmed,
        "the running consumer confirmed its slot past {written}"
    );
    notifier.stop().await.unwrap();
    assert_eq!(slots(&db).await.len(), 1, "a consumer's slot stays");
    db.exec("INSERT INTO t VALUES (3); INSERT INTO t VALUES (4)")
        .await;
    let (notifier, mut ev) = start().await;
    assert_eq!(
        common::ids(&ev.take(2).await),
        [3, 4],
        "resumed after the confirmed position"
    );
    db.exec("INSERT INTO t VALUES (5)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(5));
    notifier.stop().await.unwrap();
    // Slot lag: a consumer with no subscription reads nothing, and its lag shows.
    let idle = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("app")
        .start()
        .await
        .unwrap();
    db.exec("INSERT INTO t SELECT g FROM generate_series(100, 2000) g")
        .await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            idle.stats().await.unwrap().slot_lag > 0
        })
        .await,
        "slot lag in stats"
    );
    idle.stop().await.unwrap();
    let listed = Notifier::builder(&db.url).consumers().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].name, "app");
    assert!(
        matches!(listed[0].position, sqlnotify::ConsumerPosition::Slot { lag_bytes, .. } if lag_bytes > 0),
        "{listed:?}"
    );
    assert_eq!(listed[0].channels, Some(vec!["public.t".to_string()]));
    assert_eq!(
        Notifier::builder(&db.url).cleanup().await.unwrap(),
        0,
        "no trigger watch was installed"
    );
    assert!(
        slots(&db).await.is_empty(),
        "cleanup drops the slot: {:?}",
        slots(&db).await
    );
    assert!(publications(&db).await.is_empty(), "and the publication");
}

#[actix_rt::test]
async fn dropping_a_consumer_drops_its_slot_and_publication() {
    let Some(cluster) = cluster("dropping_a_consumer_drops_its_slot") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("Billing Service")
        .start()
        .await
        .unwrap();
    notifier.stop().await.unwrap();
    assert_eq!(slots(&db).await.len(), 1);
    Notifier::builder(&db.url)
        .drop_consumer("Billing Service")
        .await
        .unwrap();
    assert!(slots(&db).await.is_empty());
    assert!(publications(&db).await.is_empty());
    let e = Notifier::builder(&db.url)
        .drop_consumer("Billing Service")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UnknownConsumer { .. }), "{e:?}");
}

/// A cluster whose slots are invalidated past 16 MB of WAL (`max_slot_wal_keep_size`), with
/// a database holding `t (id int PRIMARY KEY, pad text)`; `None` without PostgreSQL's binaries
/// (the test is skipped, or fails under CI).
async fn small_slot_keep(test: &str) -> Option<(Cluster, TestDb)> {
    let Some(cluster) = Cluster::start_with(&format!(
        "{SETTINGS} -c max_slot_wal_keep_size=16MB -c max_wal_size=64MB -c min_wal_size=32MB"
    )) else {
        common::prerequisite_missing(test, "PostgreSQL's binaries");
        return None;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, pad text)")
        .await;
    Some((cluster, db))
}

/// Writes about 60 MB of WAL into `t` (switching segments), far past
/// [`small_slot_keep`]'s 16 MB.
async fn past_the_slot_keep(db: &TestDb) {
    for round in 0..6 {
        db.exec(&format!(
            "INSERT INTO t SELECT g, repeat('x', 1000) FROM generate_series({0} * 10000, {0} * 10000 + 9999) g; \
             SELECT pg_switch_wal()",
            round
        ))
        .await;
    }
}

#[actix_rt::test]
async fn a_consumer_whose_slot_the_server_invalidated_gets_a_distinct_error() {
    let Some((_cluster, db)) = small_slot_keep("a_consumer_whose_slot_was_invalidated").await
    else {
        return;
    };
    let start = || async {
        Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(Tier::Logical))
            .consumer("late")
            .start()
            .await
    };
    start().await.unwrap().stop().await.unwrap();
    // Stopped, it falls far behind: more WAL than max_slot_wal_keep_size, then a checkpoint.
    past_the_slot_keep(&db).await;
    db.exec("CHECKPOINT").await;
    let status: String = db
        .client()
        .await
        .query_one("SELECT wal_status FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "lost", "the server invalidated the slot");
    let e = start().await.unwrap_err();
    assert!(
        matches!(&e, Error::SlotLost { slot, .. } if slot.starts_with("sqlnotify_late_")),
        "{e:?}"
    );
    // Dropping the consumer is the way out: it starts again, from now.
    Notifier::builder(&db.url)
        .drop_consumer("late")
        .await
        .unwrap();
    start().await.unwrap().stop().await.unwrap();
}

#[actix_rt::test]
async fn custom_events_and_a_standby_of_the_same_consumer() {
    let Some(cluster) = cluster("custom_events_and_a_standby") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let start = || async {
        let notifier = Notifier::builder(&db.url)
            .watch(
                Watch::new("t", Insert)
                    .extra_columns(["v"])
                    .tier(Tier::Logical),
            )
            .consumer("group")
            .start()
            .await
            .unwrap();
        let ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        (notifier, ev)
    };
    let (a, mut a_ev) = start().await;
    // A custom event travels through the slot as a logical-decoding message.
    a.notify("t", Insert, serde_json::json!({"id": 7, "v": "custom"}))
        .await
        .unwrap();
    let e = a_ev.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("v")),
        (Some(7), Some(&serde_json::json!("custom")))
    );
    // A second process of the same consumer stands by; it takes over when the first stops.
    let (b, mut b_ev) = start().await;
    assert_eq!(b.stats().await.unwrap().role, sqlnotify::Role::Standby);
    db.exec("INSERT INTO t VALUES (1, 'a')").await;
    assert_eq!(a_ev.next().await.id().as_i64(), Some(1));
    a.stop().await.unwrap();
    db.exec("INSERT INTO t VALUES (2, 'b')").await;
    assert_eq!(
        b_ev.next().await.id().as_i64(),
        Some(2),
        "the standby took over after 1"
    );
    b.stop().await.unwrap();
}

/// Transaction ids are the full `xid8`s the durable tier records, also in a later epoch and
/// across the 32-bit wrap: a logical and a durable notifier see every row of ~300 concurrent
/// transactions with the same id, some before the wrap and some after.
#[actix_rt::test]
async fn transaction_ids_equal_the_durable_tiers_across_the_32_bit_wrap() {
    const WRAP: u64 = 3 << 32;
    let Some(cluster) = Cluster::start_at_xid(SETTINGS, WRAP - 5_000) else {
        common::prerequisite_missing(
            "transaction_ids_equal_the_durable_tiers_across_the_32_bit_wrap",
            "PostgreSQL's binaries (initdb, pg_resetwal)",
        );
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut feeds = Vec::new();
    let mut notifiers = Vec::new();
    for tier in [Tier::Logical, Tier::Durable] {
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(tier))
            .start()
            .await
            .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        notifier
            .subscribe_fn(Subscription::new("t", Insert), move |e| {
                let _ = tx.send((e.id().as_i64().unwrap(), e.transaction_id()));
            })
            .await
            .unwrap();
        feeds.push(rx);
        notifiers.push(notifier);
    }
    // Up to 100 ids before the wrap, one transaction each.
    let next: i64 = db
        .count("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8")
        .await;
    let burn = WRAP as i64 - next - 100;
    assert!(burn > 0, "the setup took {} ids", 5_000 - burn);
    db.exec(&format!(
        "DO $$ BEGIN FOR i IN 1..{burn} LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
    ))
    .await;
    let committed = write_concurrently(&db, 400).await;
    let mut ids = Vec::new();
    for rx in &mut feeds {
        let mut got = std::collections::BTreeMap::new();
        while got.len() < committed.len() {
            let (id, xid) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{} of {} rows arrived", got.len(), committed.len()))
                .unwrap();
            got.insert(id, xid.expect("a transaction id"));
        }
        ids.push(got);
    }
    assert_eq!(
        ids[0], ids[1],
        "the logical tier's ids are the durable tier's"
    );
    let before = ids[0].values().filter(|x| **x < WRAP).count();
    assert!(
        before > 0 && before < ids[0].len(),
        "{before} of {} rows before the wrap",
        ids[0].len()
    );
    assert!(ids[0]
        .values()
        .all(|x| *x > WRAP - 5_000 && *x < WRAP + 5_000));
    for n in notifiers {
        n.stop().await.unwrap();
    }
}

/// The walsender sends a transaction once its commit is flushed, before it is visible to new
/// snapshots — for as long as it waits for a synchronous standby. A snapshot feed opened then
/// waits until the transaction is visible: otherwise its snapshot would lack the row, and the
/// change, routed before the feed subscribed, would never reach it.
#[actix_rt::test]
async fn a_snapshot_waits_for_a_commit_the_stream_sent_before_it_was_visible() {
    let Some((_cluster, db, notifier)) =
        watching_t("a_snapshot_waits_for_a_commit_the_stream_sent").await
    else {
        return;
    };
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    // From now on a commit waits for a standby that never comes.
    db.exec("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        .await;
    db.exec("SELECT pg_reload_conf()").await;
    let writer = db.client().await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            writer
                .query_one("SHOW synchronous_standby_names", &[])
                .await
                .unwrap()
                .get::<_, String>(0)
                == "nobody"
        })
        .await
    );
    let pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let waiting =
        tokio::spawn(async move { writer.execute("INSERT INTO t VALUES (1)", &[]).await });
    // The stream delivers it while the writer still waits.
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    assert!(!waiting.is_finished(), "the commit waits for the standby");
    let mut feed = notifier
        .subscribe_snapshot(sqlnotify::Snapshot::new("t"))
        .await
        .unwrap();
    // The snapshot is being taken (and, listing the transaction as running, taken again) —
    // or, if that were not so, open already: then release the writer.
    let admin = db.client().await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            feed.progress().total.is_some()
                || admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
                         AND (query LIKE '%pg_snapshot_xip%' OR query = 'ROLLBACK')",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
                    > 0
        })
        .await
    );
    admin
        .execute("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap();
    waiting.await.unwrap().expect("committed locally");
    admin
        .batch_execute("ALTER SYSTEM RESET synchronous_standby_names")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), feed.next())
        .await
        .expect("the feed answers")
        .expect("the feed is open")
        .expect("the snapshot reads");
    assert_eq!(
        (first.is_snapshot(), first.id().as_i64()),
        (true, Some(1)),
        "the snapshot has the row"
    );
    assert!(first.ends_snapshot());
    db.exec("SET synchronous_commit = local; INSERT INTO t VALUES (2)")
        .await;
    let next = tokio::time::timeout(Duration::from_secs(20), feed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((next.is_snapshot(), next.id().as_i64()), (false, Some(2)));
    notifier.stop().await.unwrap();
}

/// A slot the server invalidates while the notifier runs stops its listener for good: one
/// `Status::Failed`, `Stats::failed`, `Notifier::failure()` and `stop()` give
/// `Error::SlotLost`, and no reconnect follows (each would fail the same way). Here the
/// consumer has no subscription yet: the lag task sees `wal_status` lost.
#[actix_rt::test]
async fn a_slot_invalidated_while_running_stops_the_listener_for_good() {
    slot_invalidated_while_running(false).await;
}

/// The same while the stream runs and delivers: the server terminates the walsender, and
/// reading the slot again fails with the server's own words (or the lag task saw it first).
#[actix_rt::test]
async fn a_slot_invalidated_while_streaming_stops_the_listener_for_good() {
    slot_invalidated_while_running(true).await;
}

async fn slot_invalidated_while_running(streaming: bool) {
    let Some((_cluster, db)) =
        small_slot_keep("a_slot_invalidated_while_running_stops_the_listener").await
    else {
        return;
    };
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("late")
        .start()
        .await
        .unwrap();
    let (tx, mut statuses) = mpsc::unbounded_channel();
    notifier
        .subscribe_status_fn(move |s| {
            let _ = tx.send(s.status);
        })
        .await
        .unwrap();
    // Without a subscription the consumer reads nothing and its slot falls behind. With one it
    // keeps up, and the slot's restart position follows its confirmations to the newest
    // snapshot of running transactions the server logged — at each checkpoint too, and the
    // writes below set one off: a consumer that confirmed past it before that checkpoint
    // invalidated the slot kept it within max_slot_wal_keep_size, and this test failed now
    // and then. A transaction that wrote before and stays open holds the restart position
    // before it (decoding must start there), so the slot falls behind here too.
    let (_events, _open) = if streaming {
        let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        db.exec("INSERT INTO t VALUES (-1, '')").await;
        assert_eq!(ev.next().await.id().as_i64(), Some(-1));
        let open = db.client().await;
        db.exec("CREATE TABLE held (x int)").await;
        open.batch_execute("BEGIN; INSERT INTO held VALUES (1)")
            .await
            .unwrap();
        (Some(ev), Some(open))
    } else {
        (None, None)
    };
    // Either way more WAL than max_slot_wal_keep_size is past the slot's restart position,
    // and the checkpoint invalidates it (terminating its walsender).
    past_the_slot_keep(&db).await;
    db.exec("CHECKPOINT").await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            notifier.failure().is_some()
        })
        .await,
        "the listener never failed; stats {:?}",
        notifier.stats().await.unwrap()
    );
    let failure = notifier.failure().unwrap();
    assert!(
        matches!(&failure, Error::SlotLost { slot, .. } if slot.starts_with("sqlnotify_late_")),
        "{failure:?}"
    );
    let stats = notifier.stats().await.unwrap();
    assert!(stats.failed);
    // It stays down: no reconnect within several backoff intervals (the first is ~100 ms).
    let restarts = stats.restarts;
    assert!(
        !wait_until(Duration::from_secs(3), || async {
            notifier.stats().await.unwrap().restarts > restarts
        })
        .await,
        "the listener restarted after a lost slot"
    );
    let mut failed = 0;
    while let Ok(status) = statuses.try_recv() {
        if let sqlnotify::Status::Failed { error } = status {
            assert!(error.contains("sqlnotify_late_"), "{error}");
            failed += 1;
        }
    }
    assert_eq!(failed, 1, "one Status::Failed");
    let e = notifier.stop().await.unwrap_err();
    assert!(matches!(e, Error::SlotLost { .. }), "{e:?}");
    // The way out, as for a slot lost while stopped: drop the consumer, start again.
    Notifier::builder(&db.url)
        .drop_consumer("late")
        .await
        .unwrap();
}

/// A consumer whose subscriber has stopped taking events (the pipeline is stalled, so the
/// walsender blocks on a socket nobody reads) must not hold up the checkpoint that
/// invalidates its slot: a walsender blocked that way ignores the termination invalidation
/// sends, and the checkpoint would wait for it for ever (with it, every later checkpoint and
/// the WAL removal `max_slot_wal_keep_size` is there for). The lag task sees the slot doomed
/// (`wal_status` `unreserved`) while the stream is stalled and closes the stream; the
/// checkpoint completes, the slot is lost, and once the subscriber moves again the listener
/// stops with `Error::SlotLost`.
#[actix_rt::test]
async fn a_stalled_consumer_does_not_hold_up_the_checkpoint_that_invalidates_its_slot() {
    let Some((_cluster, db)) =
        small_slot_keep("a_stalled_consumer_does_not_hold_up_the_checkpoint").await
    else {
        return;
    };
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("stalled")
        .max_in_flight(16)
        .start()
        .await
        .unwrap();
    let (slow, release, mut slow_events, _arbiter) = common::gated();
    notifier
        .subscribe(Subscription::new("t", Insert).buffer(1), slow)
        .await
        .unwrap();
    // Far more change data than the pipeline, the replication client and the socket hold:
    // the walsender ends up blocked writing, its slot far behind.
    past_the_slot_keep(&db).await;
    // A checkpoint waits for the walsender holding the slot to end; until the slot is doomed
    // and its stream closed, a checkpoint may complete without invalidating it: again.
    let client = db.client().await;
    let invalidated = wait_until(Duration::from_secs(60), || async {
        client.batch_execute("CHECKPOINT").await.unwrap();
        let status: String = client
            .query_one("SELECT wal_status FROM pg_replication_slots", &[])
            .await
            .unwrap()
            .get(0);
        status == "lost"
    });
    let invalidated = tokio::time::timeout(Duration::from_secs(90), invalidated)
        .await
        .expect("a checkpoint waited for the stalled consumer's walsender");
    assert!(invalidated, "the server never invalidated the slot");
    release.send(()).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || async {
            notifier.failure().is_some()
        })
        .await,
        "the listener never failed; stats {:?}",
        notifier.stats().await.unwrap()
    );
    let failure = notifier.failure().unwrap();
    assert!(
        matches!(&failure, Error::SlotLost { slot, .. } if slot.starts_with("sqlnotify_stalled_")),
        "{failure:?}"
    );
    // What it delivered before is still in order, no duplicates: nothing past the lost slot.
    let mut last = -1;
    while let Ok(e) = slow_events.try_recv() {
        let id = e.id().as_i64().unwrap();
        assert!(id > last, "{id} after {last}");
        last = id;
    }
    assert!(matches!(
        notifier.stop().await.unwrap_err(),
        Error::SlotLost { .. }
    ));
    Notifier::builder(&db.url)
        .drop_consumer("stalled")
        .await
        .unwrap();
}

/// A transaction of more rows than the in-flight budget (default 4,096) arrives whole: it is
/// handed to the pipeline in pieces (as one batch it waited for more units than exist, and
/// nothing arrived any more).
#[actix_rt::test]
async fn a_transaction_larger_than_the_in_flight_budget_arrives() {
    let Some((_cluster, db, notifier)) =
        watching_t("a_transaction_larger_than_the_in_flight_budget_arrives").await
    else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    notifier
        .subscribe_fn(Subscription::new("t", Insert), move |e| {
            let _ = tx.send((e.id().as_i64().unwrap(), e.last_in_transaction()));
        })
        .await
        .unwrap();
    db.exec("INSERT INTO t SELECT g FROM generate_series(1, 10000) g")
        .await;
    for want in 1..=10_000 {
        let (id, last) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("row {want} of 10000 never arrived"))
            .unwrap();
        assert_eq!(id, want, "in order");
        assert_eq!(last, Some(want == 10_000), "row {id}: the last mark");
    }
    notifier.stop().await.unwrap();
}

/// A huge transaction is read as the pipeline takes it, not whole before it is handed over:
/// with the subscriber stalled, the walsender (blocked on a socket nobody reads) stops well
/// short of the transaction's end — before, the listener kept reading it into memory to its
/// Commit — and once the subscriber moves, every row arrives once, in order, one transaction
/// id, the last marked.
#[actix_rt::test]
async fn a_huge_transaction_is_read_as_the_pipeline_takes_it_not_whole() {
    const ROWS: i64 = 400_000;
    let Some(Stalled {
        _cluster,
        db,
        notifier,
        release,
        mut events,
        _arbiter,
    }) = stalled_on_one_transaction("a_huge_transaction_is_read_as_the_pipeline_takes_it", ROWS)
        .await
    else {
        return;
    };
    // Blocked writing the transaction to a socket the listener no longer reads — not idle,
    // as it is once the listener has read every row of it.
    let settled = walsender_settles(&db).await;
    assert_eq!(
        settled.as_deref(),
        Some("WalSenderWriteData"),
        "the listener read the whole transaction before handing any of it over"
    );

    release.send(()).unwrap();
    let mut xid = None;
    for want in 1..=ROWS {
        let e = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .unwrap_or_else(|_| panic!("row {want} of {ROWS} never arrived"))
            .unwrap();
        assert_eq!(e.id().as_i64(), Some(want), "in order, once");
        assert_eq!(e.last_in_transaction(), Some(want == ROWS), "row {want}");
        assert!(e.transaction_id().is_some());
        assert_eq!(*xid.get_or_insert(e.transaction_id()), e.transaction_id());
    }
    notifier.stop().await.unwrap();
}

/// What the walsender's wait settles on: the same `wait_event` for two seconds of polls.
async fn walsender_settles(db: &TestDb) -> Option<String> {
    let client = db.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let (mut last, mut same) = (None::<Option<String>>, 0);
    loop {
        let now: Option<Option<String>> = client
            .query_opt(
                "SELECT wait_event FROM pg_stat_activity WHERE backend_type = 'walsender'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        same = if now.is_some() && now == last {
            same + 1
        } else {
            0
        };
        last = now;
        if same >= 8 {
            return last.flatten();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the walsender never settled: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The walsender is killed while a huge transaction is half handed over (the subscriber
/// stalled, the first parts in the pipeline): the server sends the transaction again from
/// its Begin, and what was handed over before is not handed over twice — every row once, in
/// order, the last marked, nothing after.
#[actix_rt::test]
async fn a_reconnect_in_the_middle_of_a_huge_transaction_hands_none_of_it_over_twice() {
    const ROWS: i64 = 100_000;
    let Some(Stalled {
        _cluster,
        db,
        notifier,
        release,
        mut events,
        _arbiter,
    }) = stalled_on_one_transaction("a_reconnect_in_the_middle_of_a_huge_transaction", ROWS).await
    else {
        return;
    };
    assert_eq!(
        walsender_settles(&db).await.as_deref(),
        Some("WalSenderWriteData"),
        "the listener is not blocked part way through the transaction"
    );
    kill_walsender(&db, 1).await;
    release.send(()).unwrap();
    for want in 1..=ROWS {
        let e = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .unwrap_or_else(|_| panic!("row {want} of {ROWS} never arrived"))
            .unwrap();
        assert_eq!(e.id().as_i64(), Some(want), "in order, once");
        assert_eq!(e.last_in_transaction(), Some(want == ROWS), "row {want}");
    }
    // Nothing handed over twice: the next event is a new row's.
    db.exec("INSERT INTO t VALUES (0, '')").await;
    let next = tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .expect("the sentinel row")
        .unwrap();
    assert_eq!(
        next.id().as_i64(),
        Some(0),
        "a row again after the transaction"
    );
    notifier.stop().await.unwrap();
}

/// A logical-tier notifier on a cluster of the test's own whose one subscriber is stalled
/// (gated, buffer 1), after one transaction inserted `rows` rows of ~100 bytes into `t`.
struct Stalled {
    _cluster: Cluster,
    db: TestDb,
    notifier: Notifier,
    release: std::sync::mpsc::Sender<()>,
    events: mpsc::UnboundedReceiver<sqlnotify::ChangeEvent>,
    _arbiter: actix::Arbiter,
}

async fn stalled_on_one_transaction(test: &str, rows: i64) -> Option<Stalled> {
    let cluster = cluster(test)?;
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, pad text NOT NULL)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .start()
        .await
        .unwrap();
    let (slow, release, events, arbiter) = common::gated();
    notifier
        .subscribe(Subscription::new("t", Insert).buffer(1), slow)
        .await
        .unwrap();
    // Far more change data than the pipeline, the replication client's queue and the
    // socket's buffers hold (400,000 rows: ~60 MB).
    db.exec(&format!(
        "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, {rows}) g"
    ))
    .await;
    Some(Stalled {
        _cluster: cluster,
        db,
        notifier,
        release,
        events,
        _arbiter: arbiter,
    })
}

/// A `COPY` writes its rows as one WAL record, so pgoutput sends every one of them at that
/// record's position: `part()` numbers them, and what is keyed by `(sequence, part)` keeps
/// each — here the dead letters, one per failing row (before, all five rows had part 0 and
/// overwrote one another's dead letter, as they would have collided in the effects table,
/// the relay's message ids and SSE event ids). Transactional handlers are refused on this
/// tier.
#[actix_rt::test]
async fn rows_a_copy_writes_at_one_wal_position_are_told_apart_by_their_part() {
    use futures_util::SinkExt;
    use sqlnotify::{HandlerError, Handling};
    let Some((_cluster, db, notifier)) =
        watching_t("rows_a_copy_writes_at_one_wal_position_are_told_apart").await
    else {
        return;
    };
    let e = notifier
        .handle_in_transaction(
            Subscription::new("t", Insert),
            Handling::new("totals"),
            |_, _| async { Ok::<(), HandlerError>(()) },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("logical tier"),
        "{e}"
    );
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    notifier
        .handle(
            Subscription::new("t", Insert),
            Handling::new("billing").max_attempts(1),
            |_| async { Err::<(), HandlerError>("declined".into()) },
        )
        .await
        .unwrap();
    let client = db.client().await;
    let sink = client
        .copy_in::<_, &'static [u8]>("COPY t (id) FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(&b"1\n2\n3\n4\n5\n"[..]).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 5);
    let got = events.take(5).await;
    assert_eq!(common::ids(&got), [1, 2, 3, 4, 5]);
    assert!(
        got.iter().all(|e| e.sequence() == got[0].sequence()),
        "a COPY's rows share one WAL position: {:?}",
        got.iter().map(|e| e.sequence()).collect::<Vec<_>>()
    );
    let parts: Vec<u32> = got.iter().map(|e| e.part()).collect();
    assert_eq!(parts, [0, 1, 2, 3, 4]);
    let letters = notifier.dead_letters().unwrap();
    let five_dead = wait_until(Duration::from_secs(20), || async {
        letters.counts(Some("billing")).await.unwrap().dead == 5
    })
    .await;
    assert!(
        five_dead,
        "one dead letter per row: {:?}",
        letters.counts(Some("billing")).await.unwrap()
    );
    notifier.stop().await.unwrap();
}

/// A replication reconnect the server takes and never answers (the path went silent) is
/// given up after twice the URL's `connect_timeout` and tried again. The replication session
/// connects in a task of its own, so the bound sits on its first answer; without it the
/// listener waited for ever.
#[actix_rt::test]
async fn a_replication_reconnect_the_server_never_answers_is_given_up_and_tried_again() {
    let Some(cluster) = cluster("a_replication_reconnect_the_server_never_answers") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (proxy, url) = common::proxy::in_front_of(&db.url, "connect_timeout=2").await;
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .health_check_interval(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let mut status = common::statuses(&notifier).await;
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));

    // The walsender ends; the reconnect goes into a path that takes it and never answers.
    proxy.swallow_new();
    db.exec(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'walsender'",
    )
    .await;
    assert!(matches!(
        common::next_status(&mut status).await,
        sqlnotify::Status::Disconnected { .. }
    ));
    // The reconnect into the dead path is given up (without the bound it waited for ever);
    // then the path comes back.
    match common::next_status(&mut status).await {
        sqlnotify::Status::Disconnected { error } => assert!(
            error.contains("connecting to replication slot") && error.contains("no answer within"),
            "{error}"
        ),
        other => panic!("expected the reconnect given up, got {other:?}"),
    }
    proxy.reopen();
    loop {
        match common::next_status(&mut status).await {
            sqlnotify::Status::Connected => break,
            sqlnotify::Status::Disconnected { .. } => {}
            other => panic!("expected a reconnect, got {other:?}"),
        }
    }
    db.exec("INSERT INTO t VALUES (2)").await;
    // Row 1 may come again (at least once); each wait for the next event is bounded.
    while events.next().await.id().as_i64() != Some(2) {}
    notifier.stop().await.unwrap();
}

/// Custom events travel as logical-decoding messages, which any role that can connect may
/// emit with any prefix: one sqlnotify did not sign is dropped and counted in
/// `stats().forged`, while the notifier's own (`notify`) and the table's changes arrive. So is
/// a notify-tier payload signed for the same channel, which anyone listening to that channel
/// sees: a logical message's signature covers its prefix, not the channel alone.
#[actix_rt::test]
async fn a_logical_decoding_message_sqlnotify_did_not_sign_is_refused_and_counted() {
    let Some((_cluster, db, notifier)) =
        watching_t("a_logical_decoding_message_sqlnotify_did_not_sign").await
    else {
        return;
    };
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    let channel = notifier.channels()[0].name().to_string();
    let (_, url) = db.role("forger").await;
    let forger = common::connect(&url).await;
    forger
        .execute(
            "SELECT pg_logical_emit_message(true, 'sqlnotify:' || $1::text, '{\"id\": 666}')",
            &[&channel],
        )
        .await
        .unwrap();
    // What a notify-tier trigger on this channel would send, replayed as a message.
    let signed: String = db
        .client()
        .await
        .query_one(
            "SELECT (SELECT encode(sha256(opad || sha256(ipad || \
               convert_to($1 || chr(10) || $2, 'UTF8'))), 'base64') \
               FROM sqlnotify.signing) || $2",
            &[&channel, &"{\"id\": 667}"],
        )
        .await
        .unwrap()
        .get(0);
    forger
        .execute(
            "SELECT pg_logical_emit_message(true, 'sqlnotify:' || $1::text, $2::text)",
            &[&channel, &signed],
        )
        .await
        .unwrap();
    notifier
        .notify("t", Insert, serde_json::json!({"id": 7}))
        .await
        .unwrap();
    db.exec("INSERT INTO t VALUES (1)").await;
    let got: Vec<i64> = events
        .take(2)
        .await
        .iter()
        .map(|e| e.id().as_i64().unwrap())
        .collect();
    assert_eq!(got, [7, 1], "the forged messages never arrive");
    assert_eq!(notifier.stats().await.unwrap().forged, 2);
    notifier.stop().await.unwrap();
}

/// Dropping a consumer whose slot a session this role may not terminate still reads (a
/// superuser's notifier, here) fails with an error naming the slot and the reader, once the
/// wait is over. It used to try terminating it every 20 ms, for ever.
#[actix_rt::test]
async fn dropping_a_consumer_read_by_a_session_this_role_cannot_end_is_an_error() {
    let Some(cluster) = cluster("dropping_a_consumer_read_by_a_session_this_role_cannot_end")
    else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE ROLE app LOGIN REPLICATION;
         GRANT USAGE ON SCHEMA public TO app",
    )
    .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("held")
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    assert!(
        walsender_pid(&db).await.is_some(),
        "the notifier reads its slot"
    );
    let app_url = db.url.replacen("postgres@", "app@", 1);
    assert_ne!(app_url, db.url);
    let dropped = tokio::time::timeout(
        Duration::from_secs(60),
        Notifier::builder(&app_url).drop_consumer("held"),
    )
    .await
    .expect("drop_consumer returned");
    let e = dropped.unwrap_err().to_string();
    assert!(
        e.contains("slot") && e.contains("pid") && e.contains("stop the notifier"),
        "{e}"
    );
    assert_eq!(slots(&db).await.len(), 1, "the slot is left to its reader");
    notifier.stop().await.unwrap();
    db.exec("DROP OWNED BY app; DROP ROLE app").await;
}

/// The slot's `confirmed_flush_lsn` (text) in `db`, where there is one slot.
async fn confirmed_flush(client: &tokio_postgres::Client, db: &TestDb) -> String {
    client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE database = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0)
}

/// Whether the slot's `confirmed_flush_lsn` in `db` is at or past `lsn`.
async fn confirmed_at_or_past(client: &tokio_postgres::Client, db: &TestDb, lsn: &str) -> bool {
    client
        .query_one(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots \
              WHERE database = $1",
            &[&db.name, &lsn],
        )
        .await
        .unwrap()
        .get(0)
}

/// The next delivery of `deliveries` (`who`'s), within 30 s.
async fn next_delivery(deliveries: &mut sqlnotify::Deliveries, who: &str) -> sqlnotify::Delivery {
    tokio::time::timeout(Duration::from_secs(30), deliveries.recv())
        .await
        .unwrap_or_else(|_| panic!("{who}: no delivery within 30 s"))
        .expect("the subscription is open")
}

/// A member of a consumer group that lost its lease with an event unacknowledged, and gets the
/// lease back after the member that took over stopped without acknowledging it either,
/// delivers the event again and keeps the slot before it: the server sends it again from the
/// slot's confirmed position. (The member used to skip it as handed over before its lease was
/// lost, then confirm the slot past it: lost for good.)
#[actix_rt::test]
async fn a_member_that_gets_its_lease_back_delivers_again_what_nobody_acknowledged() {
    let Some(cluster) = cluster("a_member_that_gets_its_lease_back") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let member = || async {
        Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(Tier::Logical))
            .consumer("group")
            .start()
            .await
    };
    // A, active: it gets the row and never acknowledges it.
    let a = member().await.unwrap();
    let mut a_statuses = common::statuses(&a).await;
    let (_, mut a_deliveries) = a
        .subscribe_acked(Subscription::new("t", Insert))
        .await
        .unwrap();
    let client = db.client().await;
    db.exec("INSERT INTO t VALUES (1)").await;
    // At or past the row's commit: a slot confirmed before it is confirmed before this.
    let after_row: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let unacked = next_delivery(&mut a_deliveries, "A").await;
    assert_eq!(unacked.event.id().as_i64(), Some(1));
    // B stands by, subscribed too.
    let b = member().await.unwrap();
    let (_, mut b_deliveries) = b
        .subscribe_acked(Subscription::new("t", Insert))
        .await
        .unwrap();
    assert_eq!(b.stats().await.unwrap().role, sqlnotify::Role::Standby);
    // End A's walsender (the slot's streamer while B stands by) until B is the one that takes
    // the lease: A reconnects fast and may take it back first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut lost = false;
    while !lost {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never lost its lease to B"
        );
        if b.stats().await.unwrap().role == sqlnotify::Role::Standby {
            if let Some(pid) = walsender_pid(&db).await {
                db.exec(&format!("SELECT pg_terminate_backend({pid})"))
                    .await;
            }
        }
        while let Ok(Some(status)) =
            tokio::time::timeout(Duration::from_secs(2), a_statuses.recv()).await
        {
            if status == sqlnotify::Status::LostLease {
                lost = true;
                break;
            }
        }
    }
    // B delivers the row, and stops without acknowledging it.
    let b_unacked = next_delivery(&mut b_deliveries, "B").await;
    assert_eq!(b_unacked.event.id().as_i64(), Some(1));
    drop(b_unacked); // unacknowledged: B's stop does not wait for it, nor saves past it
    b.stop().await.unwrap();
    // A takes the lease again: the server sends the row again, and A delivers it.
    loop {
        let status = common::next_status_within(&mut a_statuses, Duration::from_secs(30)).await;
        if status == sqlnotify::Status::Active {
            break;
        }
    }
    let again = tokio::time::timeout(Duration::from_secs(30), a_deliveries.recv())
        .await
        .ok()
        .flatten();
    let again_id = again.as_ref().and_then(|d| d.event.id().as_i64());
    // A stops without acknowledging it either (its Acks dropped: the stop does not wait).
    drop((again, unacked));
    a.stop().await.unwrap();
    let kept = !confirmed_at_or_past(&client, &db, &after_row).await;
    assert_eq!(
        again_id,
        Some(1),
        "A, active again, delivers the row nobody acknowledged"
    );
    assert!(
        kept,
        "the slot was confirmed past the row nobody acknowledged (to {}; its commit ends by {after_row})",
        confirmed_flush(&client, &db).await
    );
    // A later process of the group gets it again.
    let c = member().await.unwrap();
    let mut events = Events::subscribe(&c, Subscription::new("t", Insert)).await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    c.stop().await.unwrap();
}

/// A named consumer catching up on a backlog that its subscriber works through slowly confirms
/// its slot as it goes, not once the backlog is done: a read hands over one batch at most, so
/// the position is noted and saved between reads. Here each change makes eight events (eight
/// labelled watches of one table and operation), so a batch fills from a few dozen changes.
/// (A read used to go on as long as the stream had more, forwarding each full batch and
/// reading on, and the stream refilled while a batch waited for room in the pipeline: the
/// slot's position stood still for the whole catch-up, the server kept all of its WAL, and a
/// restart delivered everything again.)
#[actix_rt::test]
async fn a_consumer_catching_up_confirms_its_slot_as_it_goes() {
    const TRANSACTIONS: i64 = 200;
    const ROWS: i64 = 100;
    const TOTAL: usize = (TRANSACTIONS * ROWS) as usize;
    const LABELS: usize = 8;
    let Some(cluster) = cluster("a_consumer_catching_up_confirms_its_slot_as_it_goes") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let start = || async {
        let mut builder = Notifier::builder(&db.url).consumer("slow");
        for label in 0..LABELS {
            builder = builder.watch(
                Watch::new("t", Insert)
                    .channel_label(format!("t_{label}"))
                    .tier(Tier::Logical),
            );
        }
        builder.start().await
    };
    // The consumer's slot, then a backlog of small transactions while it is stopped.
    start().await.unwrap().stop().await.unwrap();
    let client = db.client().await;
    let before = confirmed_flush(&client, &db).await;
    db.exec(&format!(
        "DO $$ BEGIN FOR i IN 0..{} LOOP \
           INSERT INTO t SELECT g FROM generate_series(i * {ROWS}, i * {ROWS} + {}) g; \
           COMMIT; \
         END LOOP; END $$",
        TRANSACTIONS - 1,
        ROWS - 1
    ))
    .await;
    let notifier = start().await.unwrap();
    let (_, deliveries) = notifier
        .subscribe_acked(Subscription::new("t", Insert).channel_label("t_0"))
        .await
        .unwrap();
    let (handled, worker) = common::slow_acker(deliveries);
    let moved = wait_until(Duration::from_secs(120), || async {
        client
            .query_one(
                "SELECT confirmed_flush_lsn > $2::text::pg_lsn FROM pg_replication_slots \
                  WHERE database = $1",
                &[&db.name, &before],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    let done = handled.load(std::sync::atomic::Ordering::Relaxed);
    assert!(moved, "the slot never moved past {before}");
    assert!(
        done < TOTAL / 2,
        "the slot moved only once {done} of {TOTAL} events were handled"
    );
    worker.abort();
    notifier.stop().await.unwrap();
}

/// The replication session's output settings are pinned — ISO dates, PostgreSQL intervals,
/// hex bytea — whatever the database (or role) sets: dates and timestamps arrive as the trigger
/// tiers give them, in ISO 8601. (pgoutput wrote them in the walsender's DateStyle: with
/// `SQL, DMY`, `01/05/2024`, which no conversion reads back.)
#[actix_rt::test]
async fn values_arrive_in_their_iso_form_whatever_the_databases_output_settings() {
    let Some(cluster) = cluster("values_arrive_in_their_iso_form") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    for setting in [
        "datestyle = 'SQL, DMY'",
        "intervalstyle = 'sql_standard'",
        "bytea_output = 'escape'",
        "timezone = 'UTC'",
    ] {
        db.exec(&format!("ALTER DATABASE \"{}\" SET {setting}", db.name))
            .await;
    }
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, day date, local timestamp, at timestamptz, \
         span interval, bin bytea)",
    )
    .await;
    let columns = ["day", "local", "at", "span", "bin"];
    let mut feeds = Vec::new();
    let mut notifiers = Vec::new();
    for tier in [Tier::Logical, Tier::Durable] {
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).extra_columns(columns).tier(tier))
            .start()
            .await
            .unwrap();
        feeds.push(Events::subscribe(&notifier, Subscription::new("t", Insert)).await);
        notifiers.push(notifier);
    }
    db.exec(
        "INSERT INTO t VALUES (1, '2024-05-01', '2024-05-01 12:00:00.5', \
         '2024-05-01 12:00:00+02', '1 day 02:00:00', '\\x0102')",
    )
    .await;
    let logical = feeds[0].next().await;
    let durable = feeds[1].next().await;
    let value = |c: &str| logical.get(c).cloned();
    assert_eq!(value("day"), Some(serde_json::json!("2024-05-01")));
    assert_eq!(
        value("local"),
        Some(serde_json::json!("2024-05-01T12:00:00.5"))
    );
    assert_eq!(
        value("at"),
        Some(serde_json::json!("2024-05-01T10:00:00+00:00"))
    );
    assert_eq!(value("span"), Some(serde_json::json!("1 day 02:00:00")));
    assert_eq!(value("bin"), Some(serde_json::json!("\\x0102")));
    for c in ["day", "local", "at"] {
        assert_eq!(logical.get(c), durable.get(c), "column {c}");
    }
    for n in notifiers {
        n.stop().await.unwrap();
    }
}

/// Two processes of a new consumer that start at the same moment both create its publication
/// and its slot: each finds them missing, and without serializing the second `CREATE
/// PUBLICATION` failed with a duplicate key on `pg_publication` (or the second `COMMENT` with
/// "tuple concurrently updated"), failing its `start()`. Many rounds, each on a table and a
/// consumer of its own (a new publication and slot): both start every time, and make one
/// publication and one slot.
#[actix_rt::test]
async fn two_processes_of_a_new_consumer_that_start_together_both_start() {
    let Some(cluster) = cluster("two_processes_of_a_new_consumer_that_start_together") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    for round in 0..30 {
        let (table, consumer) = (format!("t{round}"), format!("together {round}"));
        db.exec(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
            .await;
        let start = || async {
            Notifier::builder(&db.url)
                .watch(Watch::new(table.as_str(), Insert).tier(Tier::Logical))
                .consumer(consumer.as_str())
                .start()
                .await
        };
        let (a, b) = match tokio::join!(start(), start()) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => panic!(
                "round {round}: a {:?}, b {:?}",
                a.err().map(|e| e.to_string()),
                b.err().map(|e| e.to_string())
            ),
        };
        assert_eq!(slots(&db).await.len(), 1, "round {round}: one slot");
        assert_eq!(publications(&db).await.len(), 1, "round {round}");
        a.stop().await.unwrap();
        b.stop().await.unwrap();
        Notifier::builder(&db.url)
            .drop_consumer(consumer.as_str())
            .await
            .unwrap();
    }
}

/// The channels of the next `Status::Gap` within 30 s (other statuses are skipped); a
/// `Status::Failed` before it fails the test.
async fn next_gap(statuses: &mut mpsc::UnboundedReceiver<sqlnotify::Status>) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = tokio::time::timeout_at(deadline, statuses.recv())
            .await
            .expect("a Status::Gap within 30 s")
            .expect("the status subscription is alive");
        match status {
            sqlnotify::Status::Gap { channels } => return channels,
            sqlnotify::Status::Failed { error } => panic!("the listener stopped: {error}"),
            _ => {}
        }
    }
}

/// Reads `events` until every id of `ids` arrived (others, committed while the slot was
/// missing, may arrive or not).
async fn take_ids(events: &mut Events, ids: &[i64]) {
    let mut missing: BTreeSet<i64> = ids.iter().copied().collect();
    while !missing.is_empty() {
        let id = events.next().await.id().as_i64().unwrap();
        missing.remove(&id);
    }
}

/// Drops the database's slots while notifiers use them, as an operator would: a slot in use
/// cannot be dropped, so its walsender is ended first (waiting up to 5 s for it to go); if a
/// notifier reconnected in between, again.
async fn drop_slots_in_use(db: &TestDb) {
    let client = db.client().await;
    let dropped = wait_until(Duration::from_secs(30), || async {
        client
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots
                  WHERE database = current_database() AND active_pid IS NOT NULL",
            )
            .await
            .unwrap();
        client
            .batch_execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE database = current_database()",
            )
            .await
            .is_ok()
    })
    .await;
    assert!(dropped, "the slot could not be dropped");
}

/// A running consumer `app` watching `t`'s inserts on the logical tier, with its statuses and
/// events, that has delivered row 1 (so its stream runs).
async fn running_app(
    db: &TestDb,
) -> (Notifier, mpsc::UnboundedReceiver<sqlnotify::Status>, Events) {
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (notifier, statuses, mut events) = app_on(&db.url).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    (notifier, statuses, events)
}

/// A slot dropped under a running consumer (its walsender terminated, then
/// `pg_drop_replication_slot`, as an operator would) is created again at the server's
/// current position, as the journal tiers register again a consumer whose row was deleted:
/// a `Status::Gap` names the channel (the changes committed meanwhile are not in the new
/// slot), rows committed after it arrive, and the listener goes on. It reconnected for ever
/// before, each attempt failing on the missing slot.
#[actix_rt::test]
async fn a_slot_dropped_under_a_running_consumer_is_created_again_with_a_gap() {
    let Some(cluster) = cluster("a_slot_dropped_under_a_running_consumer") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    let (notifier, mut statuses, mut events) = running_app(&db).await;
    drop_slots_in_use(&db).await;
    db.exec("INSERT INTO t VALUES (2)").await; // no slot holds it: may be lost
    assert_eq!(next_gap(&mut statuses).await, ["sqlnotify_public_t_insert"]);
    assert_eq!(slots(&db).await.len(), 1, "the slot is there again");
    db.exec("INSERT INTO t VALUES (3); INSERT INTO t VALUES (4)")
        .await;
    take_ids(&mut events, &[3, 4]).await;
    assert!(notifier.failure().is_none(), "{:?}", notifier.failure());
    assert!(!notifier.stats().await.unwrap().failed);
    notifier.stop().await.unwrap();
}

/// `consumers drop` (`Notifier::drop_consumer`) from another process while the consumer runs:
/// its walsender is terminated, its slot and then its publication dropped. The running
/// notifier makes both again — a slot it made again before the publication went is dropped
/// with it, since pgoutput could not read past the publication's removal — reports the Gap
/// and goes on.
#[actix_rt::test]
async fn a_consumer_dropped_by_another_process_while_running_comes_back_with_a_gap() {
    let Some(cluster) = cluster("a_consumer_dropped_by_another_process_while_running") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    let (notifier, mut statuses, mut events) = running_app(&db).await;
    Notifier::builder(&db.url)
        .drop_consumer("app")
        .await
        .unwrap();
    // Made again after the publication was dropped: both are there. A slot made again before
    // that is found without its publication only when the stream decodes a change: rows are
    // committed meanwhile (ids from 1000, which may arrive or not).
    let client = db.client().await;
    let mut probe = 1000;
    let restored = wait_until(Duration::from_secs(30), || {
        probe += 1;
        let (client, probe) = (&client, probe);
        async move {
            client
                .batch_execute(&format!("INSERT INTO t VALUES ({probe})"))
                .await
                .unwrap();
            client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_replication_slots
                                     WHERE database = current_database())
                        AND EXISTS (SELECT 1 FROM pg_publication)",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    })
    .await;
    assert!(restored, "the slot and publication were not made again");
    assert_eq!(next_gap(&mut statuses).await, ["sqlnotify_public_t_insert"]);
    db.exec("INSERT INTO t VALUES (2); INSERT INTO t VALUES (3)")
        .await;
    take_ids(&mut events, &[2, 3]).await;
    assert!(notifier.failure().is_none(), "{:?}", notifier.failure());
    let listed = Notifier::builder(&db.url).consumers().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].name, "app", "the publication names it again");
    notifier.stop().await.unwrap();
}

/// A publication dropped under a running consumer, its slot left: pgoutput fails on the next
/// change it decodes, and would on every attempt (it looks the publication up as of each
/// change, so one made again is not there for the changes before it). The slot is dropped and
/// both are made again: a `Status::Gap`, then rows committed after it arrive.
#[actix_rt::test]
async fn a_publication_dropped_under_a_running_consumer_is_made_again_with_its_slot() {
    let Some(cluster) = cluster("a_publication_dropped_under_a_running_consumer") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    let (notifier, mut statuses, mut events) = running_app(&db).await;
    let name = publications(&db).await.remove(0);
    db.exec(&format!("DROP PUBLICATION \"{name}\"")).await;
    db.exec("INSERT INTO t VALUES (2)").await; // decoding it fails: may be lost
    assert_eq!(next_gap(&mut statuses).await, ["sqlnotify_public_t_insert"]);
    assert_eq!(publications(&db).await, [name.as_str()], "made again");
    assert_eq!(slots(&db).await, [name.as_str()], "and its slot");
    db.exec("INSERT INTO t VALUES (3); INSERT INTO t VALUES (4)")
        .await;
    take_ids(&mut events, &[3, 4]).await;
    assert!(notifier.failure().is_none(), "{:?}", notifier.failure());
    notifier.stop().await.unwrap();
}

/// The next (process, id) of a group's events, within 30 s.
async fn next_event(
    events: &mut mpsc::UnboundedReceiver<(&'static str, i64)>,
) -> (&'static str, i64) {
    tokio::time::timeout(Duration::from_secs(30), events.recv())
        .await
        .expect("an event within 30 s")
        .unwrap()
}

/// The same under a group: two processes of consumer `app`, one reading. The slot is dropped
/// under the reader; whichever process holds the lease next makes it again — the other
/// stands by and touches nothing — so one `Status::Gap` is reported, by the process whose
/// subscribers then get the rows committed after it.
#[actix_rt::test]
async fn a_slot_dropped_under_a_group_is_made_again_once_by_the_process_that_reads() {
    let Some(cluster) = cluster("a_slot_dropped_under_a_group") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (status_tx, mut statuses) = mpsc::unbounded_channel();
    let (event_tx, mut events) = mpsc::unbounded_channel();
    let mut members = Vec::new();
    for member in ["a", "b"] {
        members.push(group_member(&db.url, member, &status_tx, &event_tx).await);
    }
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(
        next_event(&mut events).await,
        ("a", 1),
        "a reads, b stands by"
    );
    drop_slots_in_use(&db).await;
    db.exec("INSERT INTO t VALUES (2)").await; // may be lost
    let reporter = group_gap(&mut statuses).await;
    assert_eq!(slots(&db).await.len(), 1, "one slot, made once");
    rows_after_the_gap_reach(reporter, &db, &mut events, &mut statuses, false).await;
    for notifier in members {
        notifier.stop().await.unwrap();
    }
}

/// Process `member` of consumer `app` (watching `t`'s inserts on the logical tier) on `url`,
/// its statuses and its events' ids sent, tagged with `member`, to `statuses` and `events`.
async fn group_member(
    url: &str,
    member: &'static str,
    statuses: &mpsc::UnboundedSender<(&'static str, sqlnotify::Status)>,
    events: &mpsc::UnboundedSender<(&'static str, i64)>,
) -> Notifier {
    let notifier = Notifier::builder(url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("app")
        .start()
        .await
        .unwrap();
    let tx = statuses.clone();
    notifier
        .subscribe_status_fn(move |s: sqlnotify::StatusEvent| {
            let _ = tx.send((member, s.status));
        })
        .await
        .unwrap();
    let tx = events.clone();
    notifier
        .subscribe_fn(Subscription::new("t", Insert), move |e| {
            let _ = tx.send((member, e.id().as_i64().unwrap()));
        })
        .await
        .unwrap();
    notifier
}

/// The process of a group that reports the next `Status::Gap` (on `t`'s channel) within
/// 30 s; a `Status::Failed` before it fails the test.
async fn group_gap(
    statuses: &mut mpsc::UnboundedReceiver<(&'static str, sqlnotify::Status)>,
) -> &'static str {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (member, status) = tokio::time::timeout_at(deadline, statuses.recv())
            .await
            .expect("a Status::Gap within 30 s")
            .unwrap();
        match status {
            sqlnotify::Status::Gap { channels } => {
                assert_eq!(channels, ["sqlnotify_public_t_insert"]);
                return member;
            }
            sqlnotify::Status::Failed { error } => panic!("{member} stopped: {error}"),
            _ => {}
        }
    }
}

/// Rows 3 and 4, committed after the Gap, reach the process that reported it (row 2, committed
/// while no slot existed, never arrives when `lost`); then nothing reports another Gap or a
/// failure, within a short bounded wait.
async fn rows_after_the_gap_reach(
    reporter: &'static str,
    db: &TestDb,
    events: &mut mpsc::UnboundedReceiver<(&'static str, i64)>,
    statuses: &mut mpsc::UnboundedReceiver<(&'static str, sqlnotify::Status)>,
    lost: bool,
) {
    db.exec("INSERT INTO t VALUES (3); INSERT INTO t VALUES (4)")
        .await;
    let mut missing = BTreeSet::from([3, 4]);
    while !missing.is_empty() {
        let (member, id) = next_event(events).await;
        assert!(
            !lost || id != 2,
            "row 2 was committed while no slot existed"
        );
        if missing.remove(&id) {
            assert_eq!(
                member, reporter,
                "row {id} went to the process that reported the Gap"
            );
        }
    }
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some((member, status))) = tokio::time::timeout_at(until, statuses.recv()).await {
        assert!(
            !matches!(
                status,
                sqlnotify::Status::Gap { .. } | sqlnotify::Status::Failed { .. }
            ),
            "{member}: {status:?}"
        );
    }
}

/// A login role of the test's own that may do what a notifier does (a superuser), and a URL
/// of `db` connecting as it: a notifier connecting as it can be kept from reconnecting
/// (`ALTER ROLE … NOLOGIN`) while the rest of the test goes on as `postgres`.
async fn blockable_member(db: &TestDb) -> (String, String) {
    let (role, url) = db.role("member").await;
    db.exec(&format!("ALTER ROLE \"{role}\" SUPERUSER")).await;
    (role, url)
}

/// Whether `role` may log in: a notifier connecting as it cannot reconnect while not.
async fn allow_login(db: &TestDb, role: &str, allowed: bool) {
    let login = if allowed { "LOGIN" } else { "NOLOGIN" };
    db.exec(&format!("ALTER ROLE \"{role}\" {login}")).await;
}

/// The lease of consumer `app`, as a process of its group takes it.
const APP_LEASE: &str = "('x' || substr(md5('sqlnotify consumer app'), 1, 16))::bit(64)::bigint";

/// Takes consumer `app`'s lease on `client`, waiting up to 30 s for its holder to let go.
async fn take_app_lease(client: &tokio_postgres::Client) {
    let taken = wait_until(Duration::from_secs(30), || async {
        client
            .query_one(&format!("SELECT pg_try_advisory_lock({APP_LEASE})"), &[])
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    assert!(taken, "the lease was not let go of");
}

/// A process of a group that starts while its slot is missing must not make it: the lease
/// holder, back, would find a slot, report nothing, and the changes committed while it was
/// missing would be lost silently. Two processes of consumer `app`: `a` reads; its slot is
/// dropped and `a` is kept from reconnecting (its role may not log in) while `b` starts —
/// with the lease held by the test, so that `b` stands by, as a member does that starts
/// while the holder is away for a moment. `b` makes no slot; once `a` may connect again
/// (and `b` may take the lease too), the process that reads makes it and reports the one
/// Gap of the group, and its subscribers get the rows committed after it. Before, `b` made
/// the slot at `start()` and nobody reported anything.
#[actix_rt::test]
async fn a_member_starting_while_the_slot_is_missing_leaves_it_to_the_reader_and_its_gap() {
    let Some(cluster) = cluster("a_member_starting_while_the_slot_is_missing") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (role, member_url) = blockable_member(&db).await;
    let (status_tx, mut statuses) = mpsc::unbounded_channel();
    let (event_tx, mut events) = mpsc::unbounded_channel();
    let a = group_member(&member_url, "a", &status_tx, &event_tx).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(next_event(&mut events).await, ("a", 1));
    allow_login(&db, &role, false).await;
    drop_slots_in_use(&db).await;
    let lease = db.client().await;
    take_app_lease(&lease).await;
    db.exec("INSERT INTO t VALUES (2)").await; // no slot holds it: lost
    let b = group_member(&db.url, "b", &status_tx, &event_tx).await;
    // start() returns once b stands by (the test holds the lease).
    assert_eq!(b.stats().await.unwrap().role, sqlnotify::Role::Standby);
    while let Ok((member, status)) = statuses.try_recv() {
        assert!(
            !matches!(status, sqlnotify::Status::Gap { .. }),
            "{member}: {status:?}"
        );
    }
    assert_eq!(
        slots(&db).await,
        Vec::<String>::new(),
        "a process without the lease made the slot"
    );
    lease
        .batch_execute(&format!("SELECT pg_advisory_unlock({APP_LEASE})"))
        .await
        .unwrap();
    allow_login(&db, &role, true).await;
    let reporter = group_gap(&mut statuses).await;
    assert_eq!(slots(&db).await.len(), 1, "made again, once");
    rows_after_the_gap_reach(reporter, &db, &mut events, &mut statuses, true).await;
    for notifier in [a, b] {
        notifier.stop().await.unwrap();
    }
}

/// A slot made again by someone else before the holder came back — an operator, or a process
/// of an earlier version of sqlnotify starting meanwhile — is found present, yet it is not
/// the one the holder read: its confirmed position is past every position the holder read,
/// and the changes committed while no slot existed are not in it. The holder reports the Gap
/// (once) and goes on. Before, it streamed the new slot and reported nothing.
#[actix_rt::test]
async fn a_slot_made_again_by_someone_else_before_the_holder_is_back_is_a_gap() {
    let Some(cluster) = cluster("a_slot_made_again_by_someone_else") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (role, member_url) = blockable_member(&db).await;
    let notifier = Notifier::builder(&member_url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("app")
        .start()
        .await
        .unwrap();
    let mut statuses = common::statuses(&notifier).await;
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    let name = slots(&db).await.remove(0);
    allow_login(&db, &role, false).await;
    drop_slots_in_use(&db).await;
    db.exec("INSERT INTO t VALUES (2)").await; // no slot holds it: lost
    db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')"
    ))
    .await;
    allow_login(&db, &role, true).await;
    assert_eq!(next_gap(&mut statuses).await, ["sqlnotify_public_t_insert"]);
    db.exec("INSERT INTO t VALUES (3); INSERT INTO t VALUES (4)")
        .await;
    take_ids(&mut events, &[3, 4]).await;
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(status)) = tokio::time::timeout_at(until, statuses.recv()).await {
        assert!(
            !matches!(
                status,
                sqlnotify::Status::Gap { .. } | sqlnotify::Status::Failed { .. }
            ),
            "{status:?}"
        );
    }
    assert!(notifier.failure().is_none(), "{:?}", notifier.failure());
    notifier.stop().await.unwrap();
}

/// A consumer that waits for its first subscriber reads no slot, so its slot can be dropped
/// and made again (by an operator, a script, an older sqlnotify) without ending its session:
/// the first subscription checks the slot again before the stream starts, and reports the
/// Gap. Before, the stream started on the new slot and the changes committed while no slot
/// existed were lost silently.
#[actix_rt::test]
async fn a_slot_made_again_while_the_consumer_waits_for_its_first_subscriber_is_a_gap() {
    let Some(cluster) = cluster("a_slot_made_again_while_the_consumer_waits") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("app")
        .start()
        .await
        .unwrap();
    let mut statuses = common::statuses(&notifier).await;
    // start() returned: the session checked the slot, and waits for a subscriber.
    let name = slots(&db).await.remove(0);
    db.exec(&format!("SELECT pg_drop_replication_slot('{name}')"))
        .await;
    db.exec("INSERT INTO t VALUES (2)").await; // no slot holds it: lost
    db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')"
    ))
    .await;
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    assert_eq!(next_gap(&mut statuses).await, ["sqlnotify_public_t_insert"]);
    db.exec("INSERT INTO t VALUES (3)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(3), "row 2 is lost");
    assert!(notifier.failure().is_none(), "{:?}", notifier.failure());
    notifier.stop().await.unwrap();
}

/// A session that connects and then fails every time — here the stream's start: the
/// consumer's slot name is taken by a slot of another database, which the server refuses to
/// stream from this one — is retried ever more slowly, as a session that cannot connect is:
/// connecting is not a sign of health, and the listener reconnected at the shortest delay
/// (50–100 ms) for ever before. The delays before the restarts after the first five failures
/// are at least 50, 100, 200, 400 and 800 ms (half of each ceiling: jitter).
#[actix_rt::test]
async fn sessions_that_connect_then_fail_to_start_the_stream_are_retried_ever_more_slowly() {
    let Some(cluster) = cluster("sessions_that_connect_then_fail_to_start_the_stream") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    let other = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    // The name consumer "app"'s slot gets (its publication is not made either: a process
    // without the lease makes neither of a pair it finds half there).
    other
        .exec("SELECT pg_create_logical_replication_slot('sqlnotify_app_1f6a832c', 'pgoutput')")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("app")
        .start()
        .await
        .unwrap();
    let (tx, mut failures) = mpsc::unbounded_channel();
    notifier
        .subscribe_status_fn(move |s: sqlnotify::StatusEvent| {
            if let sqlnotify::Status::Disconnected { error } = s.status {
                let _ = tx.send((std::time::Instant::now(), error));
            }
        })
        .await
        .unwrap();
    // The first subscription opens the gate: the stream is started, and refused.
    let _events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    let mut at = Vec::new();
    while at.len() < 6 {
        let (when, error) = tokio::time::timeout(Duration::from_secs(30), failures.recv())
            .await
            .expect("a failure within 30 s")
            .unwrap();
        assert!(error.contains("not created in this database"), "{error}");
        at.push(when);
    }
    let took = at[5] - at[0];
    assert!(took >= Duration::from_millis(1_550), "{took:?}");
    assert!(
        notifier.failure().is_none(),
        "not fatal: {:?}",
        notifier.failure()
    );
    notifier.stop().await.unwrap();
    other
        .exec("SELECT pg_drop_replication_slot('sqlnotify_app_1f6a832c')")
        .await;
}

/// The advisory lock under which a process makes consumer `app`'s slot and publication (the
/// key `ensure` takes: the md5 of `sqlnotify logical objects ` and the slot's name).
const APP_OBJECTS_LOCK: &str =
    "('x' || substr(md5('sqlnotify logical objects sqlnotify_app_1f6a832c'), 1, 16))::bit(64)::bigint";

/// A process of the group that froze while it made the consumer's slot and publication holds
/// their lock for as long as its connection lives: `start()` waits for it at most
/// `install_timeout`, then fails with `Error::LockTimeout` naming the slot, its consumer and
/// the holder's pid — and makes nothing. Once the holder lets go, `start()` works. Before, it
/// waited in `pg_advisory_lock` for ever.
#[actix_rt::test]
async fn start_gives_up_on_a_slot_whose_lock_a_frozen_process_holds() {
    let Some(cluster) = cluster("start_gives_up_on_a_slot_whose_lock_a_frozen_process_holds")
    else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    // The frozen process: it took the lock, and says nothing more.
    let frozen = db.client().await;
    frozen
        .batch_execute(&format!("SELECT pg_advisory_lock({APP_OBJECTS_LOCK})"))
        .await
        .unwrap();
    let pid: i32 = frozen
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let timeout = Duration::from_secs(1);
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("app")
        .install_timeout(timeout);
    let start = || builder.start();
    let outcome = tokio::time::timeout(Duration::from_secs(60), start())
        .await
        .expect("start() returns within 60 s");
    common::assert_lock_timeout(
        outcome,
        "replication slot sqlnotify_app_1f6a832c of consumer \"app\"",
        &[pid as u64],
        timeout,
    );
    assert_eq!(slots(&db).await, Vec::<String>::new(), "nothing was made");
    assert_eq!(publications(&db).await, Vec::<String>::new());
    frozen
        .batch_execute(&format!("SELECT pg_advisory_unlock({APP_OBJECTS_LOCK})"))
        .await
        .unwrap();
    let notifier = tokio::time::timeout(Duration::from_secs(60), start())
        .await
        .expect("start() returns within 60 s")
        .unwrap();
    assert_eq!(slots(&db).await, ["sqlnotify_app_1f6a832c"]);
    notifier.stop().await.unwrap();
    Notifier::builder(&db.url)
        .drop_consumer("app")
        .await
        .unwrap();
}

/// A stream that fails on its first message every time — a poison message: here a change
/// logged while the consumer's publication was dropped, before someone made it again, which
/// pgoutput refuses ("publication … does not exist") each time it decodes it — is retried
/// ever more slowly, as a session that cannot connect is. Each session connects, finds the
/// slot and the publication, starts the stream and reads nothing before the stream fails: it
/// delivered nothing, so it proved nothing. Before, its first (empty) read counted as proof of
/// health and the listener reconnected at the shortest delay (50–100 ms) for ever. The delays
/// before the restarts after the first five failures are at least 50, 100, 200, 400 and
/// 800 ms (half of each ceiling: jitter).
#[actix_rt::test]
async fn a_stream_that_fails_on_its_first_message_is_retried_ever_more_slowly() {
    let Some(cluster) = cluster("a_stream_that_fails_on_its_first_message") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("app");
    // Made by a first start, which reads nothing (no subscriber) and stops.
    builder.start().await.unwrap().stop().await.unwrap();
    let name = publications(&db).await.remove(0);
    db.exec(&format!("DROP PUBLICATION \"{name}\"")).await;
    db.exec("INSERT INTO t VALUES (1)").await; // the poison
    db.exec(&format!(
        "CREATE PUBLICATION \"{name}\" FOR TABLE t WITH (publish = 'insert, update, delete')"
    ))
    .await;
    let notifier = builder.start().await.unwrap();
    let (tx, mut failures) = mpsc::unbounded_channel();
    let (gap_tx, mut statuses) = mpsc::unbounded_channel();
    notifier
        .subscribe_status_fn(move |s: sqlnotify::StatusEvent| {
            if let sqlnotify::Status::Disconnected { error } = &s.status {
                let _ = tx.send((std::time::Instant::now(), error.clone()));
            }
            let _ = gap_tx.send(s.status);
        })
        .await
        .unwrap();
    // The first subscription opens the gate: the stream is started, and fails.
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    let mut at = Vec::new();
    while at.len() < 6 {
        let (when, error) = tokio::time::timeout(Duration::from_secs(30), failures.recv())
            .await
            .expect("a failure within 30 s")
            .unwrap();
        assert!(error.contains("does not exist"), "{error}");
        at.push(when);
    }
    let took = at[5] - at[0];
    assert!(took >= Duration::from_millis(1_550), "{took:?}");
    assert!(
        notifier.failure().is_none(),
        "not fatal: {:?}",
        notifier.failure()
    );
    // The way out the README gives: the publication dropped, the notifier makes both again.
    db.exec(&format!("DROP PUBLICATION \"{name}\"")).await;
    assert_eq!(next_gap(&mut statuses).await, ["sqlnotify_public_t_insert"]);
    db.exec("INSERT INTO t VALUES (2)").await;
    let event = events.next_within(Duration::from_secs(30)).await;
    assert_eq!(event.id().as_i64(), Some(2), "row 1 is lost");
    notifier.stop().await.unwrap();
    Notifier::builder(&db.url)
        .drop_consumer("app")
        .await
        .unwrap();
}

/// Consumer `app`'s high-water mark (`sqlnotify.slot_marks`), as a `pg_lsn`'s text; `None`
/// without one (or without the table).
async fn app_mark(db: &TestDb) -> Option<String> {
    db.client()
        .await
        .query_opt(
            "SELECT mark::text FROM sqlnotify.slot_marks WHERE slot = 'sqlnotify_app_1f6a832c'",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

/// Waits (up to 30 s) until `db`'s one slot is confirmed at or past the server's current WAL
/// position: everything committed before was delivered and confirmed, and so marked.
async fn confirmed_up_to_now(db: &TestDb) {
    let client = db.client().await;
    let now: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let confirmed = wait_until(Duration::from_secs(30), || {
        confirmed_at_or_past(&client, db, &now)
    })
    .await;
    assert!(confirmed, "the slot was not confirmed up to {now}");
}

/// Asserts that consumer `app`'s slot is confirmed no further than its high-water mark: the
/// mark is saved before the slot is confirmed.
async fn confirmed_within_the_mark(db: &TestDb) {
    let (confirmed, mark): (String, Option<String>) = db
        .client()
        .await
        .query_one(
            "SELECT s.confirmed_flush_lsn::text, m.mark::text
               FROM pg_replication_slots s
               LEFT JOIN sqlnotify.slot_marks m ON m.slot = s.slot_name
              WHERE s.slot_name = 'sqlnotify_app_1f6a832c'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    let within = db
        .client()
        .await
        .query_one(
            "SELECT $1::text::pg_lsn <= $2::text::pg_lsn",
            &[&confirmed, &mark],
        )
        .await
        .unwrap()
        .get::<_, Option<bool>>(0);
    assert_eq!(within, Some(true), "confirmed {confirmed}, mark {mark:?}");
}

/// No `Status::Gap` or `Status::Failed` among `statuses` within a short bounded wait.
async fn no_gap_within(statuses: &mut mpsc::UnboundedReceiver<sqlnotify::Status>, wait: Duration) {
    let until = tokio::time::Instant::now() + wait;
    while let Ok(Some(status)) = tokio::time::timeout_at(until, statuses.recv()).await {
        assert!(
            !matches!(
                status,
                sqlnotify::Status::Gap { .. } | sqlnotify::Status::Failed { .. }
            ),
            "{status:?}"
        );
    }
}

/// An actor that sends every status into a channel: subscribed on the builder, it also gets
/// what `start()` itself finds (its first session's Gap).
struct StatusForward(mpsc::UnboundedSender<sqlnotify::Status>);

impl actix::Actor for StatusForward {
    type Context = actix::Context<Self>;
}

impl actix::Handler<sqlnotify::StatusEvent> for StatusForward {
    type Result = ();
    fn handle(&mut self, event: sqlnotify::StatusEvent, _: &mut actix::Context<Self>) {
        let _ = self.0.send(event.status);
    }
}

/// A running consumer `app` on `url` watching `t`'s inserts on the logical tier, with its
/// statuses (from the start: subscribed on the builder) and events.
async fn app_on(url: &str) -> (Notifier, mpsc::UnboundedReceiver<sqlnotify::Status>, Events) {
    let (tx, statuses) = mpsc::unbounded_channel();
    let forward = actix::Actor::start(StatusForward(tx));
    let notifier = Notifier::builder(url)
        .watch(Watch::new("t", Insert).tier(Tier::Logical))
        .consumer("app")
        .subscribe_status(forward.recipient())
        .start()
        .await
        .unwrap();
    let events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    (notifier, statuses, events)
}

/// The silent gap of the next lease holder. Consumer `app` reads row 1, and its only process
/// stops; its slot is then dropped and made again by someone else (row 2, committed in
/// between, is in no slot). The next process of the consumer has read nothing to compare the
/// slot with — but the consumer's high-water mark (`sqlnotify.slot_marks`) says how far any
/// of its processes let the slot confirm, and the new slot starts past it: a `Status::Gap`,
/// then row 3. Before, that process streamed the new slot and reported nothing. A brand-new
/// consumer's first start is no Gap, and neither is a restart after the consumer confirmed
/// its slot legitimately (while running, and at stop); the made-again slot's Gap is reported
/// once, not again by the process after.
#[actix_rt::test]
async fn a_slot_made_again_while_no_process_of_the_consumer_reads_is_a_gap_for_the_next() {
    let Some(cluster) = cluster("a_slot_made_again_while_no_process_of_the_consumer_reads") else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    let (notifier, mut statuses, _events) = running_app(&db).await;
    confirmed_up_to_now(&db).await;
    confirmed_within_the_mark(&db).await;
    no_gap_within(&mut statuses, Duration::from_millis(200)).await;
    notifier.stop().await.unwrap();
    confirmed_within_the_mark(&db).await;
    // A legitimate restart: the slot moved only as far as the consumer let it.
    db.exec("INSERT INTO t VALUES (10)").await;
    let (notifier, mut statuses, mut events) = app_on(&db.url).await;
    assert_eq!(events.next().await.id().as_i64(), Some(10));
    confirmed_up_to_now(&db).await;
    confirmed_within_the_mark(&db).await;
    no_gap_within(&mut statuses, Duration::from_millis(500)).await;
    notifier.stop().await.unwrap();
    confirmed_within_the_mark(&db).await;
    // Made again by someone else while no process of the consumer runs.
    let name = slots(&db).await.remove(0);
    db.exec(&format!("SELECT pg_drop_replication_slot('{name}')"))
        .await;
    db.exec("INSERT INTO t VALUES (2)").await; // no slot holds it: lost
    db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')"
    ))
    .await;
    let (notifier, mut statuses, mut events) = app_on(&db.url).await;
    assert_eq!(next_gap(&mut statuses).await, ["sqlnotify_public_t_insert"]);
    db.exec("INSERT INTO t VALUES (3)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(3), "row 2 is lost");
    confirmed_up_to_now(&db).await;
    notifier.stop().await.unwrap();
    // Reported once: the process after finds the new slot marked.
    db.exec("INSERT INTO t VALUES (4)").await;
    let (notifier, mut statuses, mut events) = app_on(&db.url).await;
    assert_eq!(events.next().await.id().as_i64(), Some(4));
    no_gap_within(&mut statuses, Duration::from_millis(500)).await;
    assert!(notifier.failure().is_none(), "{:?}", notifier.failure());
    notifier.stop().await.unwrap();
}

/// `consumers drop` and `cleanup()` remove a consumer's high-water mark with its slot and
/// publication: a consumer of that name started afterwards is a new one — its slot starts
/// past the old mark, and that is no Gap.
#[actix_rt::test]
async fn dropping_a_consumer_or_cleanup_removes_its_high_water_mark() {
    let Some(cluster) = cluster("dropping_a_consumer_or_cleanup_removes_its_high_water_mark")
    else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    for round in 0..2 {
        let (notifier, mut statuses, mut events) = app_on(&db.url).await;
        db.exec(&format!("INSERT INTO t VALUES ({round})")).await;
        assert_eq!(events.next().await.id().as_i64(), Some(round));
        confirmed_up_to_now(&db).await;
        no_gap_within(&mut statuses, Duration::from_millis(200)).await;
        notifier.stop().await.unwrap();
        assert!(app_mark(&db).await.is_some(), "round {round}: marked");
        db.exec("INSERT INTO t VALUES (100)").await; // written after the mark
        db.exec("DELETE FROM t").await;
        if round == 0 {
            Notifier::builder(&db.url)
                .drop_consumer("app")
                .await
                .unwrap();
        } else {
            Notifier::builder(&db.url).cleanup().await.unwrap();
        }
        assert_eq!(
            app_mark(&db).await,
            None,
            "round {round}: the mark is removed"
        );
        assert!(slots(&db).await.is_empty());
    }
}

/// The same in a group, where the next lease holder is a standby: `a` reads, `b` stands by.
/// Both are cut off (their role may not log in, their sessions ended); the slot is dropped and
/// made again by someone else; `a` stops for good and `b`, back, wins the lease. It has read
/// nothing, yet reports the Gap — the new slot is past the consumer's mark — and gets the
/// rows committed after it. Before, it streamed the new slot silently.
#[actix_rt::test]
async fn a_standby_that_wins_the_lease_after_the_slot_was_made_again_reports_the_gap() {
    let Some(cluster) = cluster("a_standby_that_wins_the_lease_after_the_slot_was_made_again")
    else {
        return;
    };
    let db = TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (role, member_url) = blockable_member(&db).await;
    let (status_tx, mut statuses) = mpsc::unbounded_channel();
    let (event_tx, mut events) = mpsc::unbounded_channel();
    let a = group_member(&member_url, "a", &status_tx, &event_tx).await;
    let b = group_member(&member_url, "b", &status_tx, &event_tx).await;
    assert_eq!(b.stats().await.unwrap().role, sqlnotify::Role::Standby);
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(next_event(&mut events).await, ("a", 1));
    confirmed_up_to_now(&db).await;
    allow_login(&db, &role, false).await;
    // `b` first (every session of the role but the slot's walsender), so that nobody takes
    // the lease when `a`'s walsender ends; then `a`, and its slot.
    db.exec(&format!(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
          WHERE usename = '{role}'
            AND pid NOT IN (SELECT active_pid FROM pg_replication_slots
                             WHERE active_pid IS NOT NULL)"
    ))
    .await;
    drop_slots_in_use(&db).await;
    db.exec("INSERT INTO t VALUES (2)").await; // no slot holds it: lost
    db.exec("SELECT pg_create_logical_replication_slot('sqlnotify_app_1f6a832c', 'pgoutput')")
        .await;
    // `a` is gone for good (its final save cannot connect: that error is not this test's).
    let _ = a.stop().await;
    while let Ok((member, status)) = statuses.try_recv() {
        assert!(
            !matches!(status, sqlnotify::Status::Gap { .. }),
            "{member}: {status:?}"
        );
    }
    allow_login(&db, &role, true).await;
    assert_eq!(group_gap(&mut statuses).await, "b");
    rows_after_the_gap_reach("b", &db, &mut events, &mut statuses, true).await;
    assert!(b.failure().is_none(), "{:?}", b.failure());
    b.stop().await.unwrap();
}
