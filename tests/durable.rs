//! The journal tiers on PostgreSQL (durable and poll): late commits, replay after faults and
//! restarts, consumers, retention — every committed row arrives, no rolled-back row does, and
//! a running process never sees a duplicate.

mod common;
mod scenarios;

use std::collections::BTreeSet;
use std::time::Duration;

use common::consumers::ConsumerDb;
use common::{assert_every_row_once_through_kills, wait_until, Events, TestDb};
use futures_util::future::join_all;
use sqlnotify::Operation::Insert;
use sqlnotify::{ConsumerPosition, Notifier, Status, Subscription, Tier, Watch};
use tokio::sync::mpsc;

const TIERS: [Tier; 2] = [Tier::Durable, Tier::Poll];

#[actix_rt::test]
async fn journal_tiers_deliver_rows_of_any_size_with_a_sequence() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE docs (id int PRIMARY KEY, body text)")
            .await;
        let notifier = Notifier::builder(&db.url)
            .watch(
                Watch::new("docs", Insert)
                    .extra_columns(["body"])
                    .tier(tier),
            )
            .start()
            .await
            .unwrap();
        let mut ev = Events::subscribe(&notifier, Subscription::new("docs", Insert)).await;
        db.exec("INSERT INTO docs VALUES (1, 'small'), (2, repeat('x', 50000))")
            .await;
        let (a, b) = (ev.next().await, ev.next().await);
        assert_eq!(a.get("body"), Some(&serde_json::json!("small")), "{tier:?}");
        assert_eq!(
            b.get("body").unwrap().as_str().unwrap().len(),
            50000,
            "no payload limit"
        );
        assert!(a.sequence().unwrap() < b.sequence().unwrap());
        assert!(!b.is_truncated());
        notifier.stop().await.unwrap();
    }
}

#[actix_rt::test]
async fn a_transaction_that_commits_late_is_not_skipped() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(tier))
            .start()
            .await
            .unwrap();
        let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        let (mut a, mut b) = (db.client().await, db.client().await);
        let late = a.transaction().await.unwrap();
        late.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap(); // takes the lower id
        let early = b.transaction().await.unwrap();
        early
            .execute("INSERT INTO t VALUES (2)", &[])
            .await
            .unwrap();
        early.commit().await.unwrap();
        let e = ev.next().await;
        assert_eq!(e.id().as_i64(), Some(2));
        late.commit().await.unwrap();
        let e2 = ev.next().await;
        assert_eq!(e2.id().as_i64(), Some(1), "{tier:?}: the late row arrives");
        assert!(e2.sequence() < e.sequence(), "it had the lower journal id");
        db.exec("INSERT INTO t VALUES (3)").await;
        assert_eq!(ev.next().await.id().as_i64(), Some(3));
        ev.assert_empty();
        notifier.stop().await.unwrap();
    }
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

#[actix_rt::test]
async fn every_committed_row_arrives_once_while_the_listener_is_killed_20_times() {
    for tier in TIERS {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(tier))
            .start()
            .await
            .unwrap();
        assert_every_row_once_through_kills(
            &db,
            &notifier,
            20,
            write_concurrently(&db, 5_000),
            &format!("{tier:?}"),
        )
        .await;
        notifier.stop().await.unwrap();
    }
}

#[actix_rt::test]
async fn the_poll_tier_never_listens() {
    // What the notifier sends, read on the wire; the durable tier shows the tap sees a LISTEN.
    for (tier, listens) in [(Tier::Poll, false), (Tier::Durable, true)] {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
        let tap = common::WireTap::start().await;
        let notifier = Notifier::builder(tap.url(&db.name))
            .watch(Watch::new("t", Insert).tier(tier))
            .start()
            .await
            .unwrap();
        let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        db.exec("INSERT INTO t VALUES (1)").await;
        assert_eq!(ev.next().await.id().as_i64(), Some(1));
        notifier.stop().await.unwrap();
        let sent = tap.statements();
        assert!(
            sent.iter().any(|sql| sql.contains("pg_snapshot_xip($1")),
            "{tier:?}: the tap saw the journal being read through {} connections: {sent:?}",
            tap.connections()
        );
        let listen: Vec<&String> = sent.iter().filter(|sql| common::is_listen(sql)).collect();
        assert_eq!(!listen.is_empty(), listens, "{tier:?}: {listen:?}");
        let function = db
            .client()
            .await
            .query_one(
                "SELECT prosrc FROM pg_proc WHERE proname = 'sqlnotify_public_t_insert' \
                 AND prorettype = 'trigger'::regtype",
                &[],
            )
            .await
            .unwrap()
            .get::<_, String>(0);
        assert_eq!(
            function.contains("pg_notify"),
            listens,
            "{tier:?}: NOTIFY in the writer's transaction only to wake a listener: {function}"
        );
    }
}

/// The journal has no index on `created_at` (it cost every journal row a fifth of row
/// capture's trigger time): a journal of an older version loses it at start, and the purge
/// finds expired rows through the primary key — below the first row younger than the
/// retention. A row of a long transaction (started before the cutoff, written after a young
/// row) waits until the rows below it have aged too; nothing young is ever purged.
#[actix_rt::test]
async fn an_older_journal_loses_its_created_at_index_and_the_purge_walks_the_key() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .retention(Duration::from_secs(600))
        .purge_interval(Duration::from_millis(50));
    builder.clone().start().await.unwrap().stop().await.unwrap();
    let index =
        "SELECT count(*) FROM pg_class WHERE oid = to_regclass('sqlnotify.journal_created_at_idx')";
    assert_eq!(db.count(index).await, 0, "a new journal has none");
    // the journal as versions before this one created it, with rows: 1–3 expired, 4 young,
    // 5 expired but written after 4 (a long transaction), 6 young
    db.exec(
        "CREATE INDEX journal_created_at_idx ON sqlnotify.journal (created_at);
         INSERT INTO sqlnotify.journal (id, channel, payload, created_at) VALUES
           (1, 'x', '{}', now() - interval '1 hour'), (2, 'x', '{}', now() - interval '1 hour'),
           (3, 'x', '{}', now() - interval '1 hour'), (4, 'x', '{}', now()),
           (5, 'x', '{}', now() - interval '1 hour'), (6, 'x', '{}', now());
         SELECT setval('sqlnotify.journal_id_seq', 6);",
    )
    .await;
    let notifier = builder.start().await.unwrap();
    assert_eq!(db.count(index).await, 0, "dropped at start");
    let ids = "SELECT coalesce(sum(1 << (id::int)), 0) FROM sqlnotify.journal";
    let purged = wait_until(Duration::from_secs(10), || async {
        db.count(ids).await == (1 << 4) | (1 << 5) | (1 << 6)
    })
    .await;
    assert!(purged, "rows 1–3 purged, 4–6 kept: {}", db.count(ids).await);
    // once 4 has aged, 5 goes with it; 6 stays
    db.exec("UPDATE sqlnotify.journal SET created_at = now() - interval '1 hour' WHERE id = 4")
        .await;
    let purged = wait_until(Duration::from_secs(10), || async {
        db.count(ids).await == 1 << 6
    })
    .await;
    assert!(
        purged,
        "rows 4 and 5 purged, 6 kept: {}",
        db.count(ids).await
    );
    // and the watch works on the upgraded journal
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    notifier.stop().await.unwrap();
}

/// Dropping the older journal's `created_at` index is optional: while a writer holds the
/// journal, `start()` keeps the index and starts anyway (after the install timeout's lock
/// wait, not failing), and the next start drops it.
#[actix_rt::test]
async fn a_busy_journal_keeps_its_created_at_index_until_a_later_start() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .install_timeout(Duration::from_secs(1));
    builder.clone().start().await.unwrap().stop().await.unwrap();
    db.exec("CREATE INDEX journal_created_at_idx ON sqlnotify.journal (created_at)")
        .await;
    let index =
        "SELECT count(*) FROM pg_class WHERE oid = to_regclass('sqlnotify.journal_created_at_idx')";
    let mut writer = db.client().await;
    let open = writer.transaction().await.unwrap();
    open.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    let notifier = builder
        .clone()
        .start()
        .await
        .expect("starts with the index kept");
    assert_eq!(
        db.count(index).await,
        1,
        "kept while a writer holds the journal"
    );
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    open.commit().await.unwrap();
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    notifier.stop().await.unwrap();
    builder.start().await.unwrap().stop().await.unwrap();
    assert_eq!(db.count(index).await, 0, "dropped by the next start");
}

#[actix_rt::test]
async fn the_journal_is_trimmed_but_a_live_consumer_keeps_what_it_has_not_read() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .retention(Duration::from_millis(300))
        .purge_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t SELECT generate_series(1, 10)").await;
    ev.take(10).await;
    let trimmed = wait_until(Duration::from_secs(10), || async {
        db.count("SELECT count(*) FROM sqlnotify.journal").await == 0
    })
    .await;
    assert!(trimmed, "expired journal rows are deleted");

    // A consumer (alive: updated now) whose horizon is at the current transaction keeps every
    // row written from here on.
    db.exec(
        "INSERT INTO sqlnotify.consumers (name, horizon, updated_at) \
         VALUES ('reader', pg_current_xact_id(), now() + interval '1 hour')",
    )
    .await;
    db.exec("INSERT INTO t SELECT generate_series(11, 20)")
        .await;
    ev.take(10).await;
    // Proof the purge ran meanwhile: a row written before the consumer's horizon... none here,
    // so wait for several purge rounds by watching a marker row expire.
    db.exec(
        "INSERT INTO sqlnotify.overflow (channel, payload, created_at) VALUES ('x', 'y', now())",
    )
    .await;
    let purged = wait_until(Duration::from_secs(10), || async {
        db.count("SELECT count(*) FROM sqlnotify.overflow").await == 0
    })
    .await;
    assert!(purged);
    assert_eq!(
        db.count("SELECT count(*) FROM sqlnotify.journal").await,
        10,
        "kept for the consumer"
    );
    // A registered consumer keeps protecting its rows however long ago it was last seen …
    db.exec("UPDATE sqlnotify.consumers SET updated_at = now() - interval '1 hour'")
        .await;
    db.exec(
        "INSERT INTO sqlnotify.overflow (channel, payload, created_at) VALUES ('x', 'y', now())",
    )
    .await;
    let purged = wait_until(Duration::from_secs(10), || async {
        db.count("SELECT count(*) FROM sqlnotify.overflow").await == 0
    })
    .await;
    assert!(purged);
    assert_eq!(
        db.count("SELECT count(*) FROM sqlnotify.journal").await,
        10,
        "kept for a consumer last seen an hour ago"
    );
    // … until it is dropped on purpose.
    notifier.drop_consumer("reader").await.unwrap();
    let trimmed = wait_until(Duration::from_secs(10), || async {
        db.count("SELECT count(*) FROM sqlnotify.journal").await == 0
    })
    .await;
    assert!(trimmed, "a dropped consumer protects nothing");
    notifier.stop().await.unwrap();
}

/// A snapshot taken on a hot standby lists no running transaction in `xip`, so the journal
/// cursor would count one running at a read as read and never fetch its rows. A poll-tier
/// listener given two hosts (the primary, then its standby) that loses the primary reconnects
/// to the standby, and refuses it, saying why, until the primary is back.
#[actix_rt::test]
async fn a_journal_listener_refuses_a_standby_it_reconnects_to() {
    let cluster = common::Cluster::start();
    let standby = cluster.as_ref().and_then(common::Cluster::standby_of);
    let (Some(primary), Some(standby)) = (cluster, standby) else {
        common::prerequisite_missing(
            "a_journal_listener_refuses_a_standby_it_reconnects_to",
            "no PostgreSQL cluster and standby of its own could be started (local PostgreSQL \
             binaries under /usr/lib/postgresql, pg_basebackup, and as root a `postgres` user)",
        );
        return;
    };
    let admin = common::connect(&primary.url()).await;
    admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        primary.port, standby.port
    );
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("t", Insert).tier(Tier::Poll))
        .health_check_interval(Duration::from_millis(500))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    admin
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    let mut statuses = common::statuses(&notifier).await;
    drop(admin);
    primary.stop();
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match common::next_status(&mut statuses).await {
                Status::Disconnected { error } if error.contains("standby in recovery") => {
                    return error
                }
                Status::Connected => panic!("the listener read from the standby"),
                _ => {}
            }
        }
    })
    .await
    .expect("the standby was refused, saying why");
    assert!(
        refused.contains("target_session_attrs=read-write"),
        "{refused}"
    );
    primary.start_again();
    let back = tokio::time::timeout(Duration::from_secs(30), async {
        while common::next_status(&mut statuses).await != Status::Connected {}
    })
    .await;
    assert!(back.is_ok(), "the listener reconnected to the primary");
    let admin = common::connect(&primary.url()).await;
    admin
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    assert_eq!(ev.next().await.id().as_i64(), Some(2));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_server_restart_loses_nothing_on_the_durable_tier() {
    let Some(cluster) = common::Cluster::start() else {
        common::prerequisite_missing(
            "a_server_restart_loses_nothing_on_the_durable_tier",
            "no PostgreSQL cluster of its own could be started (local PostgreSQL binaries \
             under /usr/lib/postgresql, and as root a `postgres` user)",
        );
        return;
    };
    let admin = common::connect(&cluster.url()).await;
    admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    drop(admin);
    let notifier = Notifier::builder(cluster.url())
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .watch(Watch::new("t", sqlnotify::Operation::Delete))
        .health_check_interval(Duration::from_millis(500))
        .start()
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    notifier
        .subscribe_fn(Subscription::new("t", Insert), move |e| {
            let _ = tx.send(e.id().as_i64().unwrap());
        })
        .await
        .unwrap();
    let mut statuses = common::statuses(&notifier).await;
    let writer = common::connect(&cluster.url()).await;
    writer
        .batch_execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    for _ in 0..100 {
        tokio::time::timeout(common::ARRIVES_WITHIN, rx.recv())
            .await
            .unwrap();
    }

    cluster.stop();
    let status = tokio::time::timeout(common::ARRIVES_WITHIN, statuses.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(status, Status::Disconnected { .. }), "{status:?}");
    cluster.start_again();
    // Rows committed right after the restart, possibly before the listener is back.
    let writer = common::connect(&cluster.url()).await;
    writer
        .batch_execute("INSERT INTO t SELECT generate_series(101, 200)")
        .await
        .unwrap();
    let mut got = BTreeSet::new();
    while got.len() < 100 {
        let id = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(got.insert(id), "row {id} twice");
    }
    assert_eq!(got, (101..=200).collect());
    let mut seen = Vec::new();
    while let Ok(s) = statuses.try_recv() {
        seen.push(s);
    }
    assert!(seen.contains(&Status::Connected), "{seen:?}");
    assert!(
        seen.iter().any(
            |s| matches!(s, Status::Gap { channels } if channels == &["sqlnotify_public_t_delete"])
        ),
        "the notify-tier channel reports a gap, the durable one does not: {seen:?}"
    );
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn the_poll_tier_works_through_pgbouncer_in_transaction_mode() {
    let Some(bouncer) = common::Bouncer::start() else {
        common::prerequisite_missing(
            "the_poll_tier_works_through_pgbouncer_in_transaction_mode",
            "pgbouncer is not installed or did not start (Debian's pgbouncer package)",
        );
        return;
    };
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let url = bouncer.url(&db.name);
    // Other clients keep the small pool busy, so one client's consecutive statements land on
    // different server connections (a named prepared statement would then be missing).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for _ in 0..6 {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let c = common::connect(&url).await;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = c.simple_query("SELECT pg_sleep(0.002)").await;
            }
        });
    }
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("t", Insert).tier(Tier::Poll))
        .consumer("through-the-pooler")
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    for i in 0..100 {
        db.exec(&format!("INSERT INTO t VALUES ({i})")).await;
        assert_eq!(ev.next().await.id().as_i64(), Some(i));
    }
    notifier
        .notify("t", Insert, serde_json::json!({"id": 1000}))
        .await
        .unwrap();
    assert_eq!(ev.next().await.id().as_i64(), Some(1000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn starting_never_waits_for_a_writer_in_the_middle_of_a_transaction() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let builder = Notifier::builder(&db.url).watch(Watch::new("t", Insert).tier(Tier::Durable));
    builder.start().await.unwrap().stop().await.unwrap();
    // a writer holds its journal row (and its lock on the journal) uncommitted …
    let mut writer = db.client().await;
    let open = writer.transaction().await.unwrap();
    open.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    // … while the service restarts: a lock on the journal here would wait for the writer and
    // queue every other writer's trigger behind it
    let notifier = tokio::time::timeout(Duration::from_secs(5), builder.start())
        .await
        .expect("start() waited for a writer's transaction")
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    open.commit().await.unwrap();
    assert_eq!(ev.next().await.id().as_i64(), Some(1));
    notifier.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Registered consumers and retention (issue 11 §2); the scenarios are in common/consumers.rs
// ---------------------------------------------------------------------------------------------

impl ConsumerDb for TestDb {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn watch(&self, table: &str) -> Watch {
        Watch::new(table, Insert).tier(Tier::Durable)
    }

    async fn insert(&self, table: &str, ids: std::ops::RangeInclusive<i64>) {
        let client = self.client().await;
        for id in ids {
            client
                .execute(&format!("INSERT INTO \"{table}\" (id) VALUES ($1)"), &[&id])
                .await
                .unwrap();
        }
    }

    async fn journal_head(&self) -> i64 {
        self.count("SELECT coalesce(max(id), 0) FROM sqlnotify.journal")
            .await
    }

    async fn journal_has(&self, id: i64) -> bool {
        self.count(&format!(
            "SELECT count(*) FROM sqlnotify.journal WHERE id = {id}"
        ))
        .await
            == 1
    }

    fn channel(&self, table: &str) -> String {
        format!("sqlnotify_public_{table}_insert")
    }

    async fn make_stale(&self, name: &str) {
        self.exec(&format!(
            "UPDATE sqlnotify.consumers SET updated_at = to_timestamp({}) WHERE name = '{name}'",
            common::consumers::LONG_AGO
        ))
        .await;
    }

    async fn saved_position(&self, name: &str) -> ConsumerPosition {
        let horizon: String = self
            .client()
            .await
            .query_one(
                "SELECT horizon::text FROM sqlnotify.consumers WHERE name = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        ConsumerPosition::Horizon(horizon.parse().unwrap())
    }

    async fn create_old_consumer(&self, name: &str) {
        self.exec(&format!(
            "CREATE SCHEMA sqlnotify;
             CREATE TABLE sqlnotify.consumers (
                 name text PRIMARY KEY,
                 horizon xid8 NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now()
             );
             INSERT INTO sqlnotify.consumers VALUES ('{name}', pg_current_xact_id(), to_timestamp({}))",
            common::consumers::LONG_AGO
        ))
        .await;
    }

    type Open = OpenPg;

    async fn purge_in_progress(&self, name: &str, channel: &str) -> OpenPg {
        let client = self.client().await;
        client
            .batch_execute(&format!(
                "BEGIN; UPDATE sqlnotify.consumers SET missed = ARRAY['{channel}'] WHERE name = '{name}'"
            ))
            .await
            .unwrap();
        OpenPg(client)
    }
}

/// A transaction left open on a connection of its own.
pub struct OpenPg(tokio_postgres::Client);

impl common::consumers::OpenTransaction for OpenPg {
    async fn commit(self) {
        self.0.batch_execute("COMMIT").await.unwrap();
    }
}

/// A test database with the scenarios' tables `t` and `other`.
async fn consumer_db() -> TestDb {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY); CREATE TABLE other (id bigint PRIMARY KEY)")
        .await;
    db
}

consumer_scenarios!();
consumer_scenarios!(an_unnamed_listener_that_falls_behind_the_retention_gets_a_gap);

/// Roles of one test (roles are cluster-wide), dropped when it ends: declare it before the
/// test's database, so the database (and the privileges in it) goes first.
struct Roles(Vec<String>);

impl Roles {
    fn new(kinds: &[&str]) -> Roles {
        let unique = format!(
            "{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        Roles(kinds.iter().map(|k| format!("sqn_{k}_{unique}")).collect())
    }

    /// `url` connecting as role `i`.
    fn url(&self, url: &str, i: usize) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}@{rest}", self.0[i])
    }

    /// Creates the roles, with what an application needs on sqlnotify's objects and the
    /// scenarios' tables, and nothing more.
    async fn grant(&self, db: &TestDb) {
        for role in &self.0 {
            db.exec(&format!(
                "CREATE ROLE {role} LOGIN;
                 GRANT USAGE ON SCHEMA sqlnotify TO {role};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA sqlnotify TO {role};
                 GRANT USAGE ON ALL SEQUENCES IN SCHEMA sqlnotify TO {role};
                 GRANT SELECT ON t, other TO {role};"
            ))
            .await;
        }
    }

    /// The owner installs the scenarios' watches; then the consumer (user 0) and the purging
    /// application (user 1) get what an application needs and connect as roles of their own.
    async fn apps<'a>(&self, db: &'a TestDb) -> common::consumers::AsRoles<'a, TestDb> {
        common::consumers::install_as_owner(db).await;
        self.grant(db).await;
        common::consumers::AsRoles {
            db,
            consumer_url: self.url(&db.url, 0),
            purger_url: self.url(&db.url, 1),
        }
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        let names = self.0.join(", ");
        common::on_a_runtime_of_its_own(async move {
            let admin = common::connect(&common::server_url()).await;
            let _ = admin
                .batch_execute(&format!("DROP ROLE IF EXISTS {names}"))
                .await;
        });
    }
}

#[actix_rt::test]
async fn applications_with_roles_of_their_own_keep_each_others_rows() {
    let roles = Roles::new(&["consumer", "purger"]);
    let db = consumer_db().await;
    let apps = roles.apps(&db).await;
    common::consumers::a_stopped_consumer_gets_every_row_through_another_notifiers_purge(&apps)
        .await;
}

#[actix_rt::test]
async fn a_purge_by_another_role_expires_a_consumer_and_it_gets_a_gap() {
    let roles = Roles::new(&["consumer", "purger"]);
    let db = consumer_db().await;
    let apps = roles.apps(&db).await;
    common::consumers::an_expired_consumer_that_comes_back_gets_a_gap(&apps).await;
}

/// A transaction left open elsewhere on the server — any role can hold one (`BEGIN; SELECT
/// pg_current_xact_id();`, then idle) — holds every snapshot's `xmin` back. The journal reader
/// still knows exactly what it delivered: a restarted consumer delivers none of it again, and
/// its backlog counts none of it. (Before, the reader kept every id delivered since, fetched
/// them all again on every read, and saved only the horizon once they were more than 1,000: a
/// restart replayed them all.)
#[actix_rt::test]
async fn a_transaction_left_open_elsewhere_makes_no_row_come_twice() {
    for tier in TIERS {
        let db = consumer_db().await;
        let holder = db.client().await;
        holder
            .batch_execute("BEGIN; SELECT pg_catalog.pg_current_xact_id();")
            .await
            .unwrap();
        let builder = Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(tier))
            .consumer("c");
        let (notifier, mut rx) = common::consumers::start_collecting(&builder).await;
        // 1,200 rows in 12 transactions: more ids than a saved position can list.
        for k in 0..12 {
            db.exec(&format!(
                "INSERT INTO t SELECT generate_series({}, {})",
                k * 100 + 1,
                k * 100 + 100
            ))
            .await;
        }
        let ids = common::consumers::next_ids(&mut rx, 1200).await;
        assert_eq!(ids, (1..=1200).collect::<Vec<i64>>(), "{tier:?}");
        notifier.stop().await.unwrap();

        let (notifier, mut rx) = common::consumers::start_collecting(&builder).await;
        let consumers = notifier.consumers().await.unwrap();
        assert_eq!(consumers.len(), 1, "{tier:?}: {consumers:?}");
        assert_eq!(consumers[0].backlog, 0, "{tier:?}: {consumers:?}");
        db.exec("INSERT INTO t VALUES (1201)").await;
        assert_eq!(
            common::consumers::next_ids(&mut rx, 1).await,
            [1201],
            "{tier:?}: nothing delivered before the restart comes again"
        );
        notifier.stop().await.unwrap();
        assert!(rx.try_recv().is_err(), "{tier:?}");
        holder.batch_execute("COMMIT").await.unwrap();
    }
}

/// A fleet being upgraded runs old and new processes against one database: an older
/// sqlnotify saves a consumer's horizon (and the ids it delivered at or after it) and leaves
/// the snapshot column as it was. A newer process that takes over goes by that horizon, not by
/// the older snapshot left behind, which would deliver again what the old process delivered.
#[actix_rt::test]
async fn a_position_an_older_version_saved_over_a_snapshot_resumes_by_its_horizon() {
    let db = consumer_db().await;
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .consumer("c");
    builder.start().await.unwrap().stop().await.unwrap();
    // What an older process saves after delivering rows 1..3: the horizon of its last read,
    // with no id at or after it (none of those rows is). The horizon is the read's `xmin`,
    // which is its `xmax` when nothing else runs — taken as such, since another test's open
    // transaction (xids are the cluster's) would hold `xmin` back to the older snapshot's.
    db.exec("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2); INSERT INTO t VALUES (3);")
        .await;
    db.exec(
        "UPDATE sqlnotify.consumers \
            SET horizon = pg_snapshot_xmax(pg_current_snapshot()), seen = '{}' WHERE name = 'c'",
    )
    .await;
    let stale = db
        .count(
            "SELECT count(*) FROM sqlnotify.consumers \
              WHERE name = 'c' AND pg_snapshot_xmin(snapshot) < horizon",
        )
        .await;
    assert_eq!(
        stale, 1,
        "the snapshot column still holds the older snapshot"
    );
    db.exec("INSERT INTO t VALUES (4); INSERT INTO t VALUES (5);")
        .await;
    let (notifier, mut rx) = common::consumers::start_collecting(&builder).await;
    assert_eq!(common::consumers::next_ids(&mut rx, 2).await, [4, 5]);
    notifier.stop().await.unwrap();
    assert!(rx.try_recv().is_err(), "rows 1..3 are not delivered again");
}

/// A notifier of `db` that purges only when asked (watching another table), after it dropped
/// consumer `c`.
#[cfg(feature = "bench")]
async fn dropping_c(db: &TestDb) -> Notifier {
    let purger = Notifier::builder(&db.url)
        .watch(Watch::new("other", Insert).tier(Tier::Durable))
        .purge_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    purger.drop_consumer("c").await.unwrap();
    purger
}

/// A dropped consumer's rows are purged, and a miss (a `Gap` when it comes back) is recorded
/// for the rows it had not read — only those: with a transaction left open elsewhere its
/// horizon stays behind the rows it did read, and those are no miss.
#[cfg(feature = "bench")]
#[actix_rt::test]
async fn the_purge_records_a_miss_only_for_rows_a_dropped_consumer_had_not_read() {
    use sqlnotify::bench_support::purge_now;
    let db = consumer_db().await;
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT pg_catalog.pg_current_xact_id();")
        .await
        .unwrap();
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .consumer("c");
    let (notifier, mut rx) = common::consumers::start_collecting(&builder).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    db.exec("INSERT INTO t VALUES (2)").await;
    assert_eq!(common::consumers::next_ids(&mut rx, 2).await, [1, 2]);
    notifier.stop().await.unwrap();
    let purger = dropping_c(&db).await;
    let missed = "SELECT count(*) FROM sqlnotify.consumers WHERE name = 'c' AND missed IS NOT NULL";
    assert_eq!(purge_now(&purger, Duration::ZERO).await.unwrap(), 2);
    assert_eq!(db.count(missed).await, 0, "rows 1 and 2 were read");
    db.exec("INSERT INTO t VALUES (3)").await;
    assert_eq!(purge_now(&purger, Duration::ZERO).await.unwrap(), 1);
    assert_eq!(db.count(missed).await, 1, "row 3 was not");
    purger.stop().await.unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
}

/// The purge's connection is guarded: a session holding a dropped consumer's row and staying
/// idle in its transaction (what a process whose network went silent mid-purge leaves behind,
/// until the OS's keepalive gives up on it: about 2 h) makes the purge give up within its
/// `lock_timeout` (10 s), saying so, instead of waiting for the lock without bound — and with
/// the lock released the next purge deletes the row. Before the fix the purge waited past
/// [`PURGE_GIVES_UP_WITHIN`].
#[cfg(feature = "bench")]
#[actix_rt::test]
async fn a_purge_gives_up_on_a_consumer_row_locked_by_a_silent_session() {
    use sqlnotify::bench_support::purge_now;
    /// The purge's lock_timeout, and room for a busy machine.
    const PURGE_GIVES_UP_WITHIN: Duration = Duration::from_secs(30);
    let db = consumer_db().await;
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .consumer("c");
    let (notifier, mut rx) = common::consumers::start_collecting(&builder).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(common::consumers::next_ids(&mut rx, 1).await, [1]);
    notifier.stop().await.unwrap();
    let purger = dropping_c(&db).await;
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT * FROM sqlnotify.consumers WHERE name = 'c' FOR UPDATE")
        .await
        .unwrap();
    let outcome = tokio::time::timeout(PURGE_GIVES_UP_WITHIN, purge_now(&purger, Duration::ZERO))
        .await
        .unwrap_or_else(|_| {
            panic!("the purge still waits for the lock after {PURGE_GIVES_UP_WITHIN:?}")
        });
    let err = outcome.expect_err("the consumer's row stays locked");
    assert!(err.to_string().contains("lock timeout"), "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(purge_now(&purger, Duration::ZERO).await.unwrap(), 1);
    purger.stop().await.unwrap();
}

#[actix_rt::test]
async fn upgrading_an_old_consumers_table_waits_a_few_seconds_at_most_for_its_users() {
    let db = consumer_db().await;
    db.create_old_consumer("legacy").await;
    // another session reads the table and keeps its transaction open
    let mut holder = db.client().await;
    let open = holder.transaction().await.unwrap();
    open.query("SELECT * FROM sqlnotify.consumers", &[])
        .await
        .unwrap();
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .consumer("legacy")
        .install_timeout(Duration::from_secs(2));
    let e = tokio::time::timeout(Duration::from_secs(30), builder.start())
        .await
        .expect("start() waited for the open transaction")
        .unwrap_err();
    assert!(
        matches!(&e, sqlnotify::Error::LockTimeout { object, .. } if object.contains("consumers")),
        "{e:?}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'sqlnotify%'")
            .await,
        0,
        "nothing was installed"
    );
    // the reader was never blocked, and once it is done the upgrade goes through
    open.query("SELECT * FROM sqlnotify.consumers", &[])
        .await
        .unwrap();
    open.commit().await.unwrap();
    let notifier = builder.start().await.unwrap();
    let legacy = notifier.consumers().await.unwrap();
    assert_eq!(
        (legacy[0].name.as_str(), legacy[0].state),
        ("legacy", sqlnotify::ConsumerState::Active)
    );
    notifier.stop().await.unwrap();
}

// The shared journal scenarios (tests/scenarios/), on both journal tiers.

pg_tier_scenarios!([durable_tier: Durable, poll_tier: Poll] {
    resume::a_named_consumer_resumes_where_it_stopped,
    resume::an_unacknowledged_event_is_delivered_again_after_a_restart,
    resume::a_new_consumer_and_an_unnamed_notifier_start_at_the_head,
    custom::custom_notifications_reach_every_notifier_and_bad_payloads_are_rejected,
    handling::a_restart_in_the_middle_of_a_retry_continues_it,
    handling::a_failover_continues_retries_and_key_order,
    handling::a_handler_gone_during_a_dead_letter_retry_keeps_the_position_before_later_events,
    handling::unsubscribing_a_handler_lets_go_of_the_events_it_had_not_handled,
});

pg_tier_scenarios!([notify_handling: Notify, durable_handling: Durable] {
    handling::a_flaky_handler_handles_every_event_once_in_key_order,
    handling::a_poison_event_becomes_a_dead_letter_and_a_cli_retry_delivers_it_again,
    handling::a_retried_dead_letter_that_fails_again_is_not_stranded_by_a_stop,
    handling::a_handler_that_panics_before_its_future_fails_the_attempt_and_goes_on,
});

/// A `numeric` beyond an `f64` (`1e400`, 401 digits in the payload's JSON) and a `jsonb`
/// document nested 200 deep are legal values serde_json does not build: they arrive as their
/// JSON text, on row capture and on statement capture, and nothing is dropped. Before, the
/// event was dropped as malformed — on statement capture with every other row of its
/// statement.
#[actix_rt::test]
async fn values_serde_json_cannot_build_arrive_as_their_text() {
    let db = TestDb::new().await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    for capture in [sqlnotify::Capture::Row, sqlnotify::Capture::Statement] {
        let table = format!("big_{capture:?}").to_lowercase();
        db.exec(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, n numeric, doc jsonb)"
        ))
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(
                Watch::new(&table, Insert)
                    .extra_columns(["n", "doc"])
                    .tier(Tier::Durable)
                    .capture(capture),
            )
            .start()
            .await
            .unwrap();
        let mut events = Events::subscribe(&notifier, Subscription::new(&table, Insert)).await;
        db.exec(&format!(
            "INSERT INTO {table} VALUES (1, 1e400, '{deep}'), (2, 2.5, '{{}}'), (3, 3, 'null')"
        ))
        .await;
        let got = events.take(3).await;
        assert_eq!(common::ids(&got), [1, 2, 3], "{capture:?}");
        let n = got[0].get("n").and_then(|v| v.as_str()).unwrap_or_default();
        assert!(
            n.len() == 401 && n.starts_with("1000"),
            "{capture:?}: {n:?}"
        );
        assert_eq!(
            got[0]
                .get("doc")
                .and_then(|v| v.as_str())
                .map(|d| d.replace(' ', "")),
            Some(deep.clone()),
            "{capture:?}"
        );
        assert_eq!(got[1].get("n"), Some(&serde_json::json!(2.5)));
        assert_eq!(notifier.stats().await.unwrap().malformed, 0);
        notifier.stop().await.unwrap();
    }
}

/// A named consumer catching up on a backlog that its subscriber works through slowly saves
/// its position as it goes, and a restart in the middle delivers again only the little it had
/// not saved: a read goes on in pages, one statement each, and the shell saves between them.
/// (A read used to be one statement over the whole backlog: the position moved, and the
/// consumer said it was alive, only once the backlog was done, and a restart replayed it all.)
#[actix_rt::test]
async fn a_consumer_catching_up_saves_its_position_as_it_goes() {
    use std::sync::atomic::Ordering::Relaxed;
    for tier in TIERS {
        let db = consumer_db().await;
        let builder = Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(tier))
            .consumer("slow");
        builder.start().await.unwrap().stop().await.unwrap();
        // A backlog of 125 transactions of 160 rows while the consumer is stopped: the reads'
        // bounds (2,000 rows, then pages of 1,000) fall inside transactions.
        for k in 0..125i64 {
            db.exec(&format!(
                "INSERT INTO t SELECT generate_series({}, {})",
                k * 160 + 1,
                k * 160 + 160
            ))
            .await;
        }
        let notifier = builder.start().await.unwrap();
        let (_, deliveries) = notifier
            .subscribe_acked(Subscription::new("t", Insert))
            .await
            .unwrap();
        let (handled, worker) = common::slow_acker(deliveries);
        let moved = wait_until(Duration::from_secs(120), || async {
            db.count("SELECT count(*) FROM sqlnotify.consumers WHERE name = 'slow' AND read_to IS NOT NULL")
                .await
                == 1
        })
        .await;
        let done = handled.load(Relaxed);
        assert!(moved, "{tier:?}: the position never moved");
        assert!(
            done < 10_000,
            "{tier:?}: the position moved only once {done} of 20,000 events were handled"
        );
        let backlog = notifier.consumers().await.unwrap()[0].backlog;
        assert!(
            backlog < 20_000,
            "{tier:?}: the backlog counts what was delivered: {backlog}"
        );
        assert!(
            wait_until(Duration::from_secs(120), || async {
                handled.load(Relaxed) >= 5_000
            })
            .await,
            "{tier:?}: the subscriber stalled"
        );
        notifier.stop().await.unwrap();
        worker.abort();
        let handled = handled.load(Relaxed) as i64;

        // The restart goes on from the saved read: everything not acknowledged comes, in
        // order, with at most what was acknowledged since the last save again. Its
        // subscription comes after `start()`: the listener reads only once it has one.
        let notifier = builder.start().await.unwrap();
        let (_, mut deliveries) = tokio::time::timeout(
            Duration::from_secs(5),
            notifier.subscribe_acked(Subscription::new("t", Insert)),
        )
        .await
        .unwrap_or_else(|_| panic!("{tier:?}: subscribing was held up"))
        .unwrap();
        let mut ids = Vec::new();
        while ids.last() != Some(&20_000) {
            let event = next_acked(&mut deliveries, Duration::ZERO, ids.len()).await;
            ids.push(event.id().as_i64().unwrap());
        }
        notifier.stop().await.unwrap();
        let first = ids[0];
        assert_eq!(
            ids,
            (first..=20_000).collect::<Vec<i64>>(),
            "{tier:?}: in order, none missing"
        );
        assert!(
            first <= handled + 1,
            "{tier:?}: rows {}..{first} were never acknowledged",
            handled + 1
        );
        assert!(
            handled + 1 - first <= 3_000,
            "{tier:?}: {} of {handled} acknowledged rows came again",
            handled + 1 - first
        );
    }
}

/// A read that does not fit in one statement goes on in pages, and transactions whose rows
/// interleave (two writers at once) and straddle the pages' bounds still come whole, once, in
/// the order of their last rows, each marked where it ends.
#[actix_rt::test]
async fn a_long_read_in_pages_keeps_interleaved_transactions_whole_and_in_order() {
    for tier in TIERS {
        let db = consumer_db().await;
        let builder = Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(tier))
            .consumer("c");
        builder.start().await.unwrap().stop().await.unwrap();
        // Transactions A and B write 700 rows at a time, in turn, 3,500 rows each; B ends
        // last. Then 50 single-row transactions, and one of 2,500 rows.
        let (a, b) = (db.client().await, db.client().await);
        a.batch_execute("BEGIN").await.unwrap();
        b.batch_execute("BEGIN").await.unwrap();
        for k in 0..10i64 {
            let writer = if k % 2 == 0 { &a } else { &b };
            writer
                .batch_execute(&format!(
                    "INSERT INTO t SELECT generate_series({}, {})",
                    k * 700 + 1,
                    k * 700 + 700
                ))
                .await
                .unwrap();
        }
        a.batch_execute("COMMIT").await.unwrap();
        b.batch_execute("COMMIT").await.unwrap();
        for id in 7_001..=7_050 {
            db.exec(&format!("INSERT INTO t VALUES ({id})")).await;
        }
        db.exec("INSERT INTO t SELECT generate_series(7051, 9550)")
            .await;
        // A subscriber that takes 1 ms per event: the read's statements end early, and the
        // rest comes in pages.
        let notifier = builder.start().await.unwrap();
        let (_, mut deliveries) = notifier
            .subscribe_acked(Subscription::new("t", Insert))
            .await
            .unwrap();
        let mut events = Vec::new();
        while events.len() < 9_550 {
            let slow = Duration::from_millis(1);
            events.push(next_acked(&mut deliveries, slow, events.len()).await);
        }
        notifier.stop().await.unwrap();
        assert!(deliveries.try_recv().is_none(), "{tier:?}: no event twice");
        let ids: Vec<i64> = events.iter().map(|e| e.id().as_i64().unwrap()).collect();
        let of = |k: i64| k * 700 + 1..=k * 700 + 700;
        let expected: Vec<i64> = [0, 2, 4, 6, 8]
            .into_iter()
            .flat_map(of)
            .chain([1, 3, 5, 7, 9].into_iter().flat_map(of))
            .chain(7_001..=9_550)
            .collect();
        assert_eq!(ids, expected, "{tier:?}: whole transactions, in order");
        let ends: Vec<i64> = events
            .iter()
            .filter(|e| e.last_in_transaction() == Some(true))
            .map(|e| e.id().as_i64().unwrap())
            .collect();
        let expected_ends: Vec<i64> = [6_300, 7_000]
            .into_iter()
            .chain(7_001..=7_050)
            .chain([9_550])
            .collect();
        assert_eq!(ends, expected_ends, "{tier:?}: each transaction's end");
    }
}

/// A journal row whose id lies far beyond the others (a role that may write the journal chose
/// it, or a `setval` moved the sequence on) does not stall a read in pages: a page starts at
/// the read's next row, so the empty ids between are never walked. (Pages used to walk every
/// id up to the read's last one, 65,536 at a time: this read would never have ended.)
#[actix_rt::test]
async fn a_read_in_pages_jumps_over_ids_no_row_has() {
    let db = consumer_db().await;
    // The smallest pipeline: the first transaction fills it, so the read's first statement
    // waits and ends after it, and the rest comes in pages.
    let builder = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .consumer("c")
        .max_in_flight(1_024);
    builder.start().await.unwrap().stop().await.unwrap();
    db.exec("INSERT INTO t SELECT generate_series(1, 1500)")
        .await;
    db.exec(
        "INSERT INTO sqlnotify.journal (id, channel, payload)
         VALUES (9000000000000000000, 'sqlnotify_public_t_insert', 'not an event')",
    )
    .await;
    db.exec("INSERT INTO t SELECT generate_series(1501, 3000)")
        .await;
    // A subscriber that takes 1 ms per event.
    let notifier = builder.start().await.unwrap();
    let (_, mut deliveries) = notifier
        .subscribe_acked(Subscription::new("t", Insert))
        .await
        .unwrap();
    let mut ids = Vec::new();
    while ids.last() != Some(&3_001) {
        if ids.len() == 3_000 {
            db.exec("INSERT INTO t VALUES (3001)").await;
        }
        let event = next_acked(&mut deliveries, Duration::from_millis(1), ids.len()).await;
        ids.push(event.id().as_i64().unwrap());
    }
    notifier.stop().await.unwrap();
    assert_eq!(ids, (1..=3_001).collect::<Vec<i64>>());
}

/// The next delivery's event, acknowledged after `work` (a subscriber that takes its time;
/// `got`: how many came before, for the failure message). Fails when none comes within 30 s.
async fn next_acked(
    deliveries: &mut sqlnotify::Deliveries,
    work: Duration,
    got: usize,
) -> sqlnotify::ChangeEvent {
    let delivery = tokio::time::timeout(Duration::from_secs(30), deliveries.recv())
        .await
        .unwrap_or_else(|_| panic!("only {got} events came"))
        .expect("the subscription is open");
    if !work.is_zero() {
        tokio::time::sleep(work).await;
    }
    delivery.ack.ack();
    delivery.event
}
