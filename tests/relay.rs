//! The relay into NATS JetStream on real servers: subjects, headers, ids and partitions of
//! what it stores (PostgreSQL durable and poll tiers, SQLite, MySQL); the checks of an
//! existing stream; NATS unreachable at start and stopped mid-stream (a `nats-server` of the
//! test's own) — every committed change stored exactly once, in order.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use sqlnotify::relay::Relay;
use sqlnotify::Operation::{Delete, Insert, Update};
use sqlnotify::{Error, Notifier, NotifierBuilder, Tier, Watch};

use common::nats::{delete_stream, read_stream, shared, stream_messages, NatsServer, Stored};
use common::{prerequisite_missing, unique_name, wait_until, TestDb};

/// How long everything written may take to reach the stream.
const STORED_WITHIN: Duration = Duration::from_secs(30);

/// A notifier on `t` (insert, update, delete; column `v`), durable tier, consumer `relay`.
fn notifier(url: &str) -> NotifierBuilder {
    let mut builder = Notifier::builder(url).consumer("relay");
    for op in [Insert, Update, Delete] {
        builder = builder.watch(Watch::new("t", op).extra_columns(["v"]).tier(Tier::Durable));
    }
    builder
}

/// FNV-1a 64 of `key` modulo `n`: the partition the relay documents.
fn partition(key: &str, n: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash % n
}

/// Each key's operations in stream order.
fn per_key(stored: &[Stored]) -> BTreeMap<i64, Vec<String>> {
    let mut keys: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for m in stored {
        keys.entry(m.key.parse().expect("an integer key"))
            .or_default()
            .push(m.operation.clone());
    }
    keys
}

/// No message id twice.
fn assert_ids_unique(stored: &[Stored]) {
    let mut seen = HashSet::new();
    for m in stored {
        assert!(seen.insert(&m.id), "message id {} stored twice", m.id);
    }
}

async fn write(db: &TestDb, sql: &str) {
    db.exec(sql).await;
}

#[actix_rt::test]
async fn every_committed_change_is_stored_once_with_its_subject_headers_and_partition() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let Some(url) = shared("every_committed_change_is_stored_once") else {
        return;
    };
    let stream = unique_name("RELAY");
    let prefix = unique_name("relaytest");
    let relay = Relay::builder(notifier(&db.url), &url, &stream)
        .subject_prefix(&prefix)
        .partitions(4)
        .start()
        .await
        .unwrap();

    write(
        &db,
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g",
    )
    .await;
    write(
        &db,
        "BEGIN; INSERT INTO t VALUES (1000, 'rolled back'); ROLLBACK",
    )
    .await;
    write(&db, "UPDATE t SET v = 'new' WHERE id <= 10").await;
    write(&db, "DELETE FROM t WHERE id > 40").await;
    let expected = 50 + 10 + 10;
    assert!(
        wait_until(STORED_WITHIN, || async {
            relay.stats().published >= expected
        })
        .await,
        "only {:?} of {expected} stored",
        relay.stats()
    );
    let stored = read_stream(&url, &stream).await;
    assert_eq!(stored.len() as u64, expected, "nothing more, nothing twice");
    assert_ids_unique(&stored);
    for m in &stored {
        let key: u64 = m.key.parse().unwrap();
        assert_eq!(m.table, "public.t");
        assert_eq!(
            m.subject,
            format!("{prefix}.public.t.{}.{}", m.operation, partition(&m.key, 4)),
            "subject = prefix.schema.table.operation.partition of the key"
        );
        assert_eq!(m.body["id"], serde_json::json!(key));
        assert_eq!(m.body["operation"], m.operation.as_str());
        assert_eq!(m.body["sequence"], serde_json::json!(m.sequence));
        assert!(
            m.id.starts_with("relay:"),
            "ids start with the source: {}",
            m.id
        );
    }
    let keys = per_key(&stored);
    assert!(
        !keys.contains_key(&1000),
        "a rolled-back row is never relayed"
    );
    for (key, ops) in &keys {
        let want: Vec<&str> = match key {
            1..=10 => vec!["insert", "update"],
            41..=50 => vec!["insert", "delete"],
            _ => vec!["insert"],
        };
        assert_eq!(ops, &want, "key {key}: its changes in commit order");
    }
    let updated = stored.iter().find(|m| m.operation == "update").unwrap();
    assert_eq!(updated.body["columns"]["v"], "new");
    assert_eq!(relay.stats().duplicates, 0);
    relay.stop().await.unwrap();
    delete_stream(&url, &stream).await;
}

#[actix_rt::test]
async fn a_relay_needs_a_named_consumer_a_journal_tier_and_a_stream_that_fits() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let Some(url) = shared("a_relay_needs_a_named_consumer") else {
        return;
    };

    let unnamed = Notifier::builder(&db.url).watch(Watch::new("t", Insert).tier(Tier::Durable));
    let err = Relay::builder(unnamed, &url, "X")
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidOption {
                option: "consumer",
                ..
            }
        ),
        "{err}"
    );

    let notify = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .consumer("relay");
    let err = Relay::builder(notify, &url, "X").start().await.unwrap_err();
    assert!(err.to_string().contains("public.t insert"), "{err}");

    let err = Relay::builder(notifier(&db.url), &url, "X")
        .subject_prefix("a b")
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("\"a b\""), "{err}");

    // A line break would end the message-id header (async-nats panics on one): refused in
    // the consumer's name and in the source.
    let broken = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .consumer("relay\r\nX-Injected: 1");
    let err = Relay::builder(broken, &url, "X").start().await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidOption { option: "consumer", reason } if reason.contains("\\r\\n")),
        "{err}"
    );
    let err = Relay::builder(notifier(&db.url), &url, "X")
        .source("db1\n")
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::InvalidOption {
                option: "source",
                ..
            }
        ),
        "{err}"
    );

    // An existing stream that does not take the relay's subjects, then one whose duplicate
    // window is too short: the relay keeps retrying, nothing is stored, the log says why.
    let js = common::nats::jetstream(&url).await;
    let stream = unique_name("RELAYCHECK");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.other.>")],
        ..Default::default()
    })
    .await
    .unwrap();
    let relay = Relay::builder(notifier(&db.url), &url, &stream)
        .subject_prefix(&stream)
        .start()
        .await
        .unwrap();
    write(&db, "INSERT INTO t VALUES (1, 'a')").await;
    assert!(
        wait_until(STORED_WITHIN, || async { relay.stats().failures >= 2 }).await,
        "a stream that does not fit is never used: {:?}",
        relay.stats()
    );
    assert_eq!((relay.stats().connections, relay.stats().published), (0, 0));
    // Fix the stream: the relay uses it on its next attempt.
    js.update_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        wait_until(STORED_WITHIN, || async { relay.stats().published == 1 }).await,
        "{:?}",
        relay.stats()
    );
    relay.stop().await.unwrap();
    assert_eq!(stream_messages(&url, &stream).await, 1);
    delete_stream(&url, &stream).await;
}

#[actix_rt::test]
async fn nats_down_at_start_and_stopped_mid_stream_loses_and_duplicates_nothing() {
    let Some(mut nats) = NatsServer::start() else {
        return prerequisite_missing(
            "nats_down_at_start_and_stopped_mid_stream_loses_and_duplicates_nothing",
            "no nats-server binary",
        );
    };
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let stream = "FAULTS";
    // Down before the relay starts: it starts anyway and keeps trying.
    nats.stop();
    let relay = Relay::builder(notifier(&db.url), nats.url(), stream)
        .max_pending(64)
        .ack_timeout(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    write(
        &db,
        "INSERT INTO t SELECT g, 'a' FROM generate_series(1, 100) g",
    )
    .await;
    assert!(
        wait_until(STORED_WITHIN, || async { relay.stats().failures >= 2 }).await,
        "{:?}",
        relay.stats()
    );
    assert_eq!(relay.stats().published, 0);
    nats.start_again();
    assert!(
        wait_until(STORED_WITHIN, || async { relay.stats().published == 100 }).await,
        "{:?}",
        relay.stats()
    );

    // Stopped mid-stream, written to while down, started again.
    let writer = {
        let url = db.url.clone();
        tokio::spawn(async move {
            let client = common::connect(&url).await;
            for id in 101..=2_000i64 {
                client
                    .execute("INSERT INTO t VALUES ($1, 'b')", &[&id])
                    .await
                    .unwrap();
            }
        })
    };
    assert!(wait_until(STORED_WITHIN, || async { relay.stats().published >= 300 }).await);
    nats.stop();
    let failures = relay.stats().failures;
    assert!(
        wait_until(STORED_WITHIN, || async {
            relay.stats().failures > failures
        })
        .await
    );
    nats.start_again();
    writer.await.unwrap();
    assert!(
        wait_until(STORED_WITHIN, || async {
            relay.stats().published + relay.stats().duplicates >= 2_000
                && relay.stats().pending == 0
        })
        .await,
        "{:?}",
        relay.stats()
    );
    let stored = read_stream(&nats.url(), stream).await;
    assert_ids_unique(&stored);
    let keys: Vec<i64> = stored.iter().map(|m| m.key.parse().unwrap()).collect();
    assert_eq!(
        keys,
        (1..=2_000).collect::<Vec<_>>(),
        "every row once, in commit order"
    );
    eprintln!("relay through NATS faults: {:?}", relay.stats());
    relay.stop().await.unwrap();
}

/// The relay on any journal dialect: 200 inserts, each stored once, in order, on
/// `PREFIX.<schema>.t.insert`, with ids from the consumer's name and the journal sequence.
async fn every_row_once_in_order(db: &impl common::backend::Backend, test: &str) {
    let Some(url) = shared(test) else {
        return;
    };
    db.run("CREATE TABLE t (id INTEGER PRIMARY KEY)").await;
    let stream = unique_name("RELAYDIALECT");
    let prefix = unique_name("relaydialect");
    let relay = Relay::builder(
        db.builder()
            .watch(db.watch("t", Insert))
            .consumer("dialect"),
        &url,
        &stream,
    )
    .subject_prefix(&prefix)
    .start()
    .await
    .unwrap();
    db.insert_ids("t", 1..=200).await;
    assert!(
        wait_until(STORED_WITHIN, || async { relay.stats().published >= 200 }).await,
        "{:?}",
        relay.stats()
    );
    relay.stop().await.unwrap();
    let stored = read_stream(&url, &stream).await;
    assert_ids_unique(&stored);
    let keys: Vec<i64> = stored.iter().map(|m| m.key.parse().unwrap()).collect();
    assert_eq!(
        keys,
        (1..=200).collect::<Vec<_>>(),
        "every row once, in commit order"
    );
    let subject = format!("{prefix}.{}.t.insert", db.schema());
    for m in &stored {
        assert_eq!(m.subject, subject);
        assert_eq!(m.id, format!("dialect:{}:0", m.sequence));
    }
    delete_stream(&url, &stream).await;
}

#[actix_rt::test]
async fn the_relay_on_sqlite() {
    let db = common::sqlite::TempDb::new();
    every_row_once_in_order(&db, "the_relay_on_sqlite").await;
}

#[actix_rt::test]
async fn the_relay_on_postgres_poll_tier() {
    let db = common::backend::Pg::new(Tier::Poll).await;
    every_row_once_in_order(&db, "the_relay_on_postgres_poll_tier").await;
}

#[cfg(feature = "mysql")]
#[actix_rt::test]
async fn the_relay_on_mysql() {
    let db = common::mysql::TestDb::new().await;
    every_row_once_in_order(&db, "the_relay_on_mysql").await;
}

/// A relay dropped without `stop()` (an early return, a cancelled task) stops its notifier
/// instead of leaving it reading with nobody to publish: the changes written after the drop
/// are not saved past, and the next relay of the group stores them — every row once, in
/// order. Before, the notifier went on, and its events counted as done unpublished.
#[actix_rt::test]
async fn a_relay_dropped_without_stop_leaves_what_follows_to_the_next_relay() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let Some(url) = shared("a_relay_dropped_without_stop") else {
        return;
    };
    let stream = unique_name("RELAYDROP");
    let prefix = unique_name("relaydrop");
    let start = || {
        Relay::builder(notifier(&db.url), &url, &stream)
            .subject_prefix(&prefix)
            .start()
    };
    let relay = start().await.unwrap();
    write(
        &db,
        "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 5) g",
    )
    .await;
    assert!(
        wait_until(STORED_WITHIN, || async { relay.stats().published >= 5 }).await,
        "{:?}",
        relay.stats()
    );
    let first = relay.notifier().clone();
    drop(relay);
    assert!(
        wait_until(STORED_WITHIN, || async { !first.is_running() }).await,
        "the dropped relay's notifier still runs"
    );
    write(
        &db,
        "INSERT INTO t SELECT g, 'v' FROM generate_series(6, 10) g",
    )
    .await;
    let next = start().await.unwrap();
    assert!(
        wait_until(STORED_WITHIN, || async { next.stats().published >= 5 }).await,
        "the next relay stored {:?}",
        next.stats()
    );
    next.stop().await.unwrap();
    let stored = read_stream(&url, &stream).await;
    assert_ids_unique(&stored);
    let keys: Vec<i64> = stored.iter().map(|m| m.key.parse().unwrap()).collect();
    assert_eq!(
        keys,
        (1..=10).collect::<Vec<_>>(),
        "every row once, in order"
    );
    delete_stream(&url, &stream).await;
}

/// A subscription on the relay's notifier builder is refused: it would open the listener's
/// gate before the relay's own subscription exists, and the replay it took would be saved
/// past without being published.
#[actix_rt::test]
async fn a_relay_refuses_subscriptions_on_its_notifier_builder() {
    use actix::prelude::*;
    struct Sink;
    impl Actor for Sink {
        type Context = Context<Self>;
    }
    impl Handler<sqlnotify::ChangeEvent> for Sink {
        type Result = ();
        fn handle(&mut self, _: sqlnotify::ChangeEvent, _: &mut Context<Self>) {}
    }
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let builder = notifier(&db.url).subscribe(
        sqlnotify::Subscription::new("t", Insert),
        Sink.start().recipient(),
    );
    let e = Relay::builder(builder, "nats://127.0.0.1:1", "NEVER")
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                option: "subscribe",
                ..
            }
        ) && e.to_string().contains("relay.notifier()"),
        "{e}"
    );
}

/// A change larger than the stream takes (here its `max_msg_size`, 4 KiB) is published with
/// its key only, marked truncated, and the changes after it flow: before, the broker refused
/// it on every try and the relay stood still behind it for ever.
#[actix_rt::test]
async fn a_change_larger_than_the_stream_takes_is_published_with_its_key_only() {
    use async_nats::jetstream::stream::Config;
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let Some(url) = shared("a_change_larger_than_the_stream_takes") else {
        return;
    };
    let stream = unique_name("RELAYSIZE");
    let prefix = unique_name("relaysize");
    common::nats::jetstream(&url)
        .await
        .create_stream(Config {
            name: stream.clone(),
            subjects: vec![format!("{prefix}.>")],
            max_message_size: 4096,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
    let relay = Relay::builder(notifier(&db.url), &url, &stream)
        .subject_prefix(&prefix)
        .start()
        .await
        .unwrap();
    write(&db, "INSERT INTO t VALUES (1, 'small')").await;
    write(&db, "INSERT INTO t VALUES (2, repeat('x', 10000))").await;
    write(&db, "INSERT INTO t VALUES (3, 'small')").await;
    assert!(
        wait_until(STORED_WITHIN, || async { relay.stats().published >= 3 }).await,
        "{:?}",
        relay.stats()
    );
    let stats = relay.stats();
    relay.stop().await.unwrap();
    assert_eq!((stats.truncated, stats.skipped), (1, 0), "{stats:?}");
    let stored = read_stream(&url, &stream).await;
    let keys: Vec<&str> = stored.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(keys, ["1", "2", "3"], "in order, each once");
    assert_eq!(stored[0].body["columns"]["v"], "small");
    assert_eq!(stored[1].body["truncated"], true);
    assert_eq!(stored[1].body["id"], 2);
    assert_eq!(stored[1].body["columns"], serde_json::json!({}));
    assert_eq!(stored[2].body["truncated"], false);
    delete_stream(&url, &stream).await;
}
