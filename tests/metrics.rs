//! The metrics sqlnotify emits through the `metrics` facade, read back from a real recorder
//! while SQLite notifiers deliver, filter, drop, lag, handle and fall behind (and a
//! PostgreSQL one — a MySQL one too with the `mysql` feature — falls behind: each dialect
//! counts a consumer's backlog its own way). A binary of its
//! own: a recorder is process-global, and the unlabelled counters add up every notifier of
//! the process — so this binary runs one test.
//!
//! The recorder keeps its values in metrics-util's `Registry` (atomic storage), the way
//! exporters do. Not its `DebuggingRecorder`: a snapshot of that one resets every counter and
//! gauge to 0, so reading twice would not show what a scrape shows.

mod common;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::sqlite_file::SqliteFile;
use common::{wait_until, Events, TestDb, ARRIVES_WITHIN};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use sqlnotify::metrics::*;
use sqlnotify::{
    Filter, Handling, Notifier, Operation, OverflowPolicy, Stats, Status, Subscription, Tier, Watch,
};

/// Counters and gauges in a registry that reading leaves as they are.
struct Kept(Arc<Registry<Key, AtomicStorage>>);

impl Recorder for Kept {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// The recorder's registry (the recorder is installed once, before any notifier starts).
fn registry() -> &'static Registry<Key, AtomicStorage> {
    static REGISTRY: OnceLock<Arc<Registry<Key, AtomicStorage>>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let registry = Arc::new(Registry::atomic());
        metrics::set_global_recorder(Kept(registry.clone()))
            .expect("the only recorder of this binary");
        registry
    })
}

/// Whether `key` is metric `name` with exactly the labels `labels`.
fn is(key: &Key, name: &str, labels: &[(&str, &str)]) -> bool {
    let mut got: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
    let mut want = labels.to_vec();
    got.sort();
    want.sort();
    key.name() == name && got == want
}

/// The value of metric `name` with exactly the labels `labels` (`None`: never registered).
fn value(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let registry = registry();
    let counter = registry
        .get_counter_handles()
        .into_iter()
        .find(|(key, _)| is(key, name, labels))
        .map(|(_, c)| c.load(Ordering::SeqCst) as f64);
    counter.or_else(|| {
        registry
            .get_gauge_handles()
            .into_iter()
            .find(|(key, _)| is(key, name, labels))
            .map(|(_, g)| f64::from_bits(g.load(Ordering::SeqCst)))
    })
}

fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    value(name, labels).unwrap_or_else(|| panic!("{name} {labels:?} was never registered")) as u64
}

async fn stats(notifier: &Notifier) -> Stats {
    notifier.stats().await.unwrap()
}

#[actix_rt::test]
async fn the_metrics_count_what_the_notifiers_delivered_filtered_dropped_and_handled() {
    registry();
    let db = SqliteFile::new(
        "CREATE TABLE a (id INTEGER PRIMARY KEY, v TEXT);
         CREATE TABLE h (id INTEGER PRIMARY KEY);
         CREATE TABLE b (id INTEGER PRIMARY KEY);",
    );

    // Routing: one subscriber gets everything, one filters, one is stuck and drops.
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("a", Operation::Insert).extra_columns(["v"]))
        .watch(Watch::new("h", Operation::Insert))
        .start()
        .await
        .unwrap();
    let lagged = Arc::new(Mutex::new(Vec::new()));
    let notices = lagged.clone();
    notifier
        .subscribe_status_fn(move |e| {
            if let Status::Lagged { dropped, .. } = e.status {
                notices.lock().unwrap().push(dropped);
            }
        })
        .await
        .unwrap();
    let mut all = Events::subscribe(&notifier, Subscription::new("a", Operation::Insert)).await;
    let mut xs = Events::subscribe(
        &notifier,
        Subscription::new("a", Operation::Insert).filter(Filter::eq("v", "x")),
    )
    .await;
    // Its channel holds 1 and its buffer 1, never read: 1 delivered, the newest waits, the
    // other 8 are dropped.
    let (_, unread) = notifier
        .subscribe_channel(
            Subscription::new("a", Operation::Insert)
                .policy(OverflowPolicy::DropOldest)
                .buffer(1),
        )
        .await
        .unwrap();
    for id in 1..=10 {
        let v = if id % 3 == 0 { "x" } else { "y" };
        db.exec(&format!("INSERT INTO a VALUES ({id}, '{v}')"));
    }
    let got = all.take(10).await;
    assert_eq!(xs.take(3).await.len(), 3);
    let channel = got[0].channel().to_string();
    let by_channel = [(LABEL_CHANNEL, channel.as_str())];
    assert!(
        wait_until(ARRIVES_WITHIN, || {
            let lagged = lagged.clone();
            async move { lagged.lock().unwrap().iter().sum::<u64>() == 8 }
        })
        .await,
        "every drop is reported: {:?}",
        lagged.lock().unwrap()
    );
    let s = stats(&notifier).await;
    assert_eq!(
        (s.received, s.delivered, s.filtered_out, s.dropped, s.queued),
        (10, 10 + 3 + 1, 7, 8, 1)
    );
    assert_eq!(counter(EVENTS_RECEIVED, &[]), s.received);
    assert_eq!(counter(EVENTS_DELIVERED, &by_channel), s.delivered);
    assert_eq!(counter(EVENTS_FILTERED, &by_channel), s.filtered_out);
    assert_eq!(counter(EVENTS_DROPPED, &by_channel), s.dropped);
    assert_eq!(
        counter(LAGGED, &by_channel),
        lagged.lock().unwrap().len() as u64,
        "one per Lagged notice"
    );
    assert_eq!(
        value(EVENTS_QUEUED, &[]),
        Some(1.0),
        "the stuck one's newest"
    );
    assert_eq!(
        value(EVENTS_IN_FLIGHT, &[]),
        Some(0.0),
        "everything was routed"
    );
    assert_eq!(counter(EVENTS_MALFORMED, &[]), 0);

    // Handlers: id 2 fails every time (2 attempts, then a dead letter); the others succeed.
    let h = "metrics_test_handler";
    let fail_once = Rc::new(Cell::new(true));
    notifier
        .handle(
            Subscription::new("h", Operation::Insert),
            Handling::new(h)
                .max_attempts(2)
                .backoff(Duration::from_millis(1), Duration::from_millis(5)),
            move |event| {
                let id = event.id().as_i64().unwrap();
                // id 3 fails once, then succeeds on its retry
                let fail = id == 2 || (id == 3 && fail_once.replace(false));
                async move {
                    if fail {
                        Err(format!("row {id} fails").into())
                    } else {
                        Ok(())
                    }
                }
            },
        )
        .await
        .unwrap();
    db.exec("INSERT INTO h VALUES (1), (2), (3), (4)");
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            let s = stats(&notifier).await;
            s.handled == 3 && s.dead_lettered == 1
        })
        .await,
        "{:?}",
        stats(&notifier).await
    );
    let s = stats(&notifier).await;
    assert_eq!((s.handler_errors, s.retries), (3, 2));
    let by_handler = [(LABEL_HANDLER, h)];
    assert_eq!(counter(HANDLER_HANDLED, &by_handler), 3);
    assert_eq!(counter(HANDLER_ERRORS, &by_handler), 3);
    assert_eq!(counter(HANDLER_RETRIES, &by_handler), 2);
    assert_eq!(counter(HANDLER_DEAD_LETTERED, &by_handler), 1);
    // The stuck one goes away: the event it still had waiting is dropped too.
    drop(unread);
    notifier.stop().await.unwrap();
    assert_eq!(value(EVENTS_QUEUED, &[]), Some(0.0));
    assert_eq!(counter(EVENTS_DROPPED, &by_channel), 9);

    // A named consumer with no subscription reads nothing: its backlog and lag grow.
    let consumer = "metrics_test_consumer";
    let behind = Notifier::builder(db.url())
        .watch(Watch::new("b", Operation::Insert))
        .consumer(consumer)
        .start()
        .await
        .unwrap();
    db.exec("INSERT INTO b VALUES (1), (2), (3)");
    falls_behind_then_catches_up(&behind, consumer).await;

    // The same on PostgreSQL, whose backlog is counted against a horizon and seen ids.
    let pg = TestDb::new().await;
    pg.exec("CREATE TABLE b (id bigint PRIMARY KEY)").await;
    let consumer = "metrics_test_pg_consumer";
    let behind = Notifier::builder(pg.url.clone())
        .watch(Watch::new("b", Operation::Insert).tier(Tier::Durable))
        .consumer(consumer)
        .start()
        .await
        .unwrap();
    pg.exec("INSERT INTO b VALUES (1), (2), (3)").await;
    falls_behind_then_catches_up(&behind, consumer).await;

    // A listener whose connection is cut restarts, and is counted by dialect.
    let restarting = Notifier::builder(pg.url.clone())
        .watch(Watch::new("b", Operation::Insert))
        .start()
        .await
        .unwrap();
    common::kill_listener(&pg, 1).await;
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            stats(&restarting).await.restarts >= 1
        })
        .await
    );
    let by_dialect = [(LABEL_DIALECT, "PostgreSQL")];
    assert_eq!(
        counter(LISTENER_RESTARTS, &by_dialect),
        stats(&restarting).await.restarts
    );
    restarting.stop().await.unwrap();
    #[cfg(feature = "mysql")]
    {
        let my = common::mysql::TestDb::new().await;
        my.exec("CREATE TABLE b (id bigint PRIMARY KEY)").await;
        let consumer = "metrics_test_mysql_consumer";
        let behind = Notifier::builder(my.url.clone())
            .watch(Watch::new("b", Operation::Insert))
            .consumer(consumer)
            .start()
            .await
            .unwrap();
        my.exec("INSERT INTO b VALUES (1), (2), (3)").await;
        falls_behind_then_catches_up(&behind, consumer).await;
    }

    let mysql = if cfg!(feature = "mysql") { 3 } else { 0 };
    assert_eq!(counter(EVENTS_RECEIVED, &[]), 10 + 4 + 3 + 3 + mysql);
    assert_eq!(value(EVENTS_IN_FLIGHT, &[]), Some(0.0));
    assert_eq!(value(SSE_CLIENTS, &[]), None, "the library never sets it");
}

/// `notifier`, a named consumer with no subscription yet and 3 rows of table `b` unread:
/// its backlog and lag gauges show them (the lag growing past half a second: counted every
/// 2 s), and go back to 0 once a subscription has read them. Stops the notifier.
async fn falls_behind_then_catches_up(notifier: &Notifier, consumer: &str) {
    let by_consumer = [(LABEL_CONSUMER, consumer)];
    let gauges = || {
        (
            value(CONSUMER_BACKLOG, &by_consumer),
            value(CONSUMER_LAG, &by_consumer),
        )
    };
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            let (backlog, lag) = gauges();
            backlog == Some(3.0) && lag.is_some_and(|lag| lag > 0.5)
        })
        .await,
        "{consumer}: backlog and lag {:?}",
        gauges()
    );
    let lag = gauges().1.unwrap();
    assert!(
        lag < 60.0,
        "the rows were written just now, not {lag} s ago"
    );
    assert_eq!(stats(notifier).await.backlog, 3);
    let mut events = Events::subscribe(notifier, Subscription::new("b", Operation::Insert)).await;
    events.take(3).await;
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            gauges() == (Some(0.0), Some(0.0))
        })
        .await,
        "{consumer}: caught up, yet backlog and lag {:?}",
        gauges()
    );
    notifier.stop().await.unwrap();
}
