//! Real faults and slow consumers on PostgreSQL: terminated backends, a connection that goes
//! silent, subscribers that cannot keep up (each overflow policy), and status reporting.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::proxy::Proxy;
use common::{
    gated, listener_pid, next_status, statuses, subscribe_gated, wait_until, Events, TestDb,
};
use sqlnotify::Operation::{Insert, Update};
use sqlnotify::{ChangeEvent, Notifier, OverflowPolicy, Stats, Status, Subscription, Tier, Watch};
use tokio::sync::mpsc;

#[actix_rt::test]
async fn a_terminated_backend_is_reconnected_and_reported_as_a_gap_every_time() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .start()
        .await
        .unwrap();
    let mut status = statuses(&notifier).await;
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    for round in 0..20 {
        let pid = listener_pid(&db).await.expect("the listener is connected");
        db.exec(&format!("SELECT pg_terminate_backend({pid})"))
            .await;
        let disconnected = next_status(&mut status).await;
        assert!(
            matches!(disconnected, Status::Disconnected { .. }),
            "{disconnected:?}"
        );
        assert_eq!(next_status(&mut status).await, Status::Connected);
        assert_eq!(
            next_status(&mut status).await,
            Status::Gap {
                channels: vec!["sqlnotify_public_t_insert".into()]
            }
        );
        // The Gap is reported before anything that happens after the reconnect.
        db.exec(&format!("INSERT INTO t VALUES ({round})")).await;
        assert_eq!(events.next().await.id().as_i64(), Some(round));
    }
    let stats = notifier.stats().await.unwrap();
    assert!(stats.restarts >= 20, "{stats:?}");
    notifier.stop().await.unwrap();
}

/// A proxy in front of the test server, and `db`'s URL through it.
async fn proxy_in_front_of(db: &TestDb) -> (Proxy, String) {
    common::proxy::in_front_of(&db.url, "").await
}

/// A notifier on table `t` of a new database, through a proxy (`params` added to its URL),
/// checking its connection every 300 ms, its statuses and inserts subscribed, the first
/// insert received.
async fn checked_through_a_proxy(
    params: &str,
) -> (
    TestDb,
    Proxy,
    Notifier,
    mpsc::UnboundedReceiver<Status>,
    Events,
) {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (proxy, url) = proxy_in_front_of(&db).await;
    let url = match params {
        "" => url,
        params => format!("{url}{}{params}", if url.contains('?') { '&' } else { '?' }),
    };
    let notifier = Notifier::builder(url)
        .watch(Watch::new("t", Insert))
        .health_check_interval(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let status = statuses(&notifier).await;
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    (db, proxy, notifier, status, events)
}

/// `stop()` saves a named consumer's position on a connection of its own: a server that takes
/// the connection and then never answers (the network path gone silent) must not hold
/// `stop()` for ever. The save is given up (after 10 s) with an error that says so; the
/// position saved before stands.
#[actix_rt::test]
async fn stop_gives_up_a_final_save_the_server_never_answers() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (proxy, url) = proxy_in_front_of(&db).await;
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .consumer("c")
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    proxy.black_hole();
    let stopped = tokio::time::timeout(Duration::from_secs(60), notifier.stop())
        .await
        .expect("stop() returns though the server never answers");
    let error = stopped.expect_err("the final save was given up");
    assert!(
        error.to_string().contains("consumer \"c\"") && error.to_string().contains("no answer"),
        "{error}"
    );
}

/// A reconnect the server takes and never answers (the path went silent again) is given up
/// after the URL's `connect_timeout` and tried again; it held the listener for ever before,
/// since tokio-postgres bounds only the socket's connect with it.
#[actix_rt::test]
async fn a_reconnect_the_server_never_answers_is_given_up_and_tried_again() {
    let (db, proxy, notifier, mut status, mut events) =
        checked_through_a_proxy("connect_timeout=2").await;

    proxy.black_hole();
    assert!(matches!(
        next_status(&mut status).await,
        Status::Disconnected { .. }
    ));
    // The reconnect into the dead path is given up (without the bound it waited for ever);
    // then the path comes back.
    match next_status(&mut status).await {
        Status::Disconnected { error } => assert!(
            error.contains("connecting to PostgreSQL (the listener): no answer within"),
            "{error}"
        ),
        other => panic!("expected the reconnect given up, got {other:?}"),
    }
    proxy.reopen();
    loop {
        match next_status(&mut status).await {
            Status::Connected => break,
            Status::Disconnected { .. } => {}
            other => panic!("expected a reconnect, got {other:?}"),
        }
    }
    assert!(matches!(next_status(&mut status).await, Status::Gap { .. }));
    db.exec("INSERT INTO t VALUES (2)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(2));
    notifier.stop().await.unwrap();
}

/// The control connection is opened without its lock held: an overflow read (the decoder,
/// and every event behind it, waits for it) does not wait for a purge whose connect the
/// server never answers. It did before, and the read's `close()` after its 10 s limit then
/// waited for that connect too.
#[cfg(feature = "bench")]
#[actix_rt::test]
async fn an_overflow_read_does_not_wait_for_a_purge_s_unanswered_connect() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (proxy, url) = proxy_in_front_of(&db).await;
    let keep = Duration::from_secs(3600);
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("t", Insert))
        .purge_interval(keep)
        .health_check_interval(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    // A read on the dead path gives up after 10 s and drops the control connection; the
    // purge then connects, into the dead path.
    proxy.black_hole();
    let channel = "sqlnotify_public_t_insert";
    let token = "00000000-0000-0000-0000-000000000000";
    let read = sqlnotify::bench_support::fetch_overflow(&notifier, channel, token).await;
    assert!(read.unwrap_err().to_string().contains("no answer"));
    let before = proxy.swallowed();
    let purging = notifier.clone();
    let purge = tokio::task::spawn_local(async move {
        sqlnotify::bench_support::purge_now(&purging, keep).await
    });
    assert!(
        wait_until(common::ARRIVES_WITHIN, || async {
            proxy.swallowed() > before
        })
        .await
    );
    proxy.reopen();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        sqlnotify::bench_support::fetch_overflow(&notifier, channel, token),
    )
    .await
    .expect("the read opens a connection of its own");
    assert_eq!(read.unwrap(), None);
    assert!(
        !purge.is_finished(),
        "the purge still waits for its connect"
    );
    purge.abort();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_silently_dead_connection_is_detected_by_the_health_check() {
    let (db, proxy, notifier, mut status, mut events) = checked_through_a_proxy("").await;

    proxy.silence_existing();
    match next_status(&mut status).await {
        Status::Disconnected { error } => assert!(error.contains("health check"), "{error}"),
        other => panic!("expected a disconnect, got {other:?}"),
    }
    assert_eq!(next_status(&mut status).await, Status::Connected);
    assert!(matches!(next_status(&mut status).await, Status::Gap { .. }));
    db.exec("INSERT INTO t VALUES (2)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(2));
    notifier.stop().await.unwrap();
}

async fn drain(rx: &mut mpsc::UnboundedReceiver<ChangeEvent>, until_id: i64) -> Vec<ChangeEvent> {
    let mut got = Vec::new();
    loop {
        let e = tokio::time::timeout(common::ARRIVES_WITHIN, rx.recv())
            .await
            .expect("events should keep arriving")
            .unwrap();
        let last = e.id().as_i64() == Some(until_id);
        got.push(e);
        if last {
            return got;
        }
    }
}

#[actix_rt::test]
async fn drop_oldest_bounds_a_stuck_subscriber_and_never_delays_the_others() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .start()
        .await
        .unwrap();
    let mut status = statuses(&notifier).await;
    let (slow, release, mut slow_events, arbiter) = gated();
    let slow_id = notifier
        .subscribe(
            Subscription::new("t", Insert)
                .policy(OverflowPolicy::DropOldest)
                .buffer(100),
            slow,
        )
        .await
        .unwrap();
    let fast = Arc::new(AtomicU64::new(0));
    let out_of_order = Arc::new(AtomicU64::new(0));
    let (f, o) = (fast.clone(), out_of_order.clone());
    notifier
        .subscribe_fn(Subscription::new("t", Insert), move |e| {
            // in order, nothing skipped; counted here and asserted by the test (a panic in a
            // subscriber closure is caught by the notifier: it could not fail the test)
            let expected = f.fetch_add(1, Ordering::SeqCst) as i64 + 1;
            if e.id().as_i64() != Some(expected) {
                o.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await
        .unwrap();

    const N: i64 = 100_000;
    db.exec(&format!("INSERT INTO t SELECT generate_series(1, {N})"))
        .await;
    let all_fast = wait_until(Duration::from_secs(60), || async {
        fast.load(Ordering::SeqCst) == N as u64
    })
    .await;
    assert!(
        all_fast,
        "the fast subscriber got all {N} events while the slow one was stuck"
    );
    assert_eq!(
        out_of_order.load(Ordering::SeqCst),
        0,
        "the fast subscriber got events 1..={N} in order"
    );
    let stats = notifier.stats().await.unwrap();
    assert!(
        stats.queued <= 100,
        "the stuck subscriber's buffer stays bounded: {stats:?}"
    );
    assert!(stats.dropped >= (N as u64) - 100 - 16 - 1, "{stats:?}");

    release.send(()).unwrap();
    let got = drain(&mut slow_events, N).await;
    assert!(got.len() <= 1 + 16 + 100, "got {}", got.len());
    let ids: Vec<i64> = got.iter().map(|e| e.id().as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "still in commit order");

    let mut lagged = 0;
    while lagged < stats.dropped {
        match next_status(&mut status).await {
            Status::Lagged {
                subscription,
                dropped,
            } => {
                assert_eq!(subscription, slow_id);
                lagged += dropped;
            }
            other => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!(lagged, notifier.stats().await.unwrap().dropped);
    notifier.stop().await.unwrap();
    arbiter.stop();
}

#[actix_rt::test]
async fn keep_latest_per_key_keeps_the_newest_state_of_each_row() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    db.exec("INSERT INTO t SELECT g, 0 FROM generate_series(1, 10) g")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Update).extra_columns(["v"]))
        .start()
        .await
        .unwrap();
    let (release, mut slow_events, arbiter) = subscribe_gated(
        &notifier,
        Subscription::new("t", Update)
            .policy(OverflowPolicy::KeepLatestPerKey)
            .buffer(50),
    )
    .await;
    let mut sentinel = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
    for v in 1..=100 {
        db.exec(&format!("UPDATE t SET v = {v}")).await;
    }
    db.exec("UPDATE t SET v = 1000 WHERE id = 10").await;
    // everything has been routed once the unbuffered subscriber saw the last update
    let seen = sentinel.take(1001).await;
    assert_eq!(
        seen.last().unwrap().get("v"),
        Some(&serde_json::json!(1000))
    );
    release.send(()).unwrap();
    // Receive until every row's newest state has arrived (each row's events stay in order).
    let final_value = |id: i64| if id == 10 { 1000 } else { 100 };
    let mut latest = std::collections::HashMap::new();
    let mut received = 0;
    while (1..=10).any(|id| latest.get(&id) != Some(&final_value(id))) {
        let e = tokio::time::timeout(common::ARRIVES_WITHIN, slow_events.recv())
            .await
            .expect("the newest state of every row should arrive")
            .unwrap();
        let (id, v) = (
            e.id().as_i64().unwrap(),
            e.get("v").unwrap().as_i64().unwrap(),
        );
        assert!(
            latest.get(&id).is_none_or(|&old| old < v),
            "row {id} went back in time"
        );
        latest.insert(id, v);
        received += 1;
    }
    assert!(
        received < 1001 / 2,
        "older states were replaced, got {received}"
    );
    notifier.stop().await.unwrap();
    arbiter.stop();
}

#[actix_rt::test]
async fn wait_delivers_everything_to_a_slow_subscriber_with_bounded_memory() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .max_in_flight(1024)
        .start()
        .await
        .unwrap();
    const N: i64 = 5_000;
    let insert = format!("INSERT INTO t SELECT generate_series(1, {N})");
    // Bound: the budget, plus what the subscriber's mailbox (16) and handler (1) hold.
    stuck_subscriber_stops_reading_at(&notifier, &db, &insert, N, 1024 + 16 + 1).await;
    notifier.stop().await.unwrap();
}

/// A subscriber that holds the pipeline (policy Wait) stops the notify tier's reading, and
/// PostgreSQL keeps the notifications in its queue meanwhile: that must not cost the
/// connection — whose notifications would be lost with it — however long the subscriber holds
/// on. The reader reads nothing from the connection while it waits for room, so the health
/// check (every second here) is not asked of it then, and the server, whose notifications
/// find the connection's buffers full, must not give up on it either (a `tcp_user_timeout`
/// ended it after 4 s: "Connection reset by peer", a `Gap`, 1,188 of 20,000 rows). Released, the subscriber
/// gets every row once, in order, and no `Disconnected` or `Gap` was reported.
#[actix_rt::test]
async fn a_notify_listener_waiting_for_room_keeps_its_connection_and_loses_nothing() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, body text)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).extra_columns(["body"]))
        .max_in_flight(1024)
        .health_check_interval(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let mut statuses = statuses(&notifier).await;
    let (release, mut events, arbiter) = subscribe_gated(
        &notifier,
        Subscription::new("t", Insert)
            .policy(OverflowPolicy::Wait)
            .buffer(10),
    )
    .await;
    // 20,000 notifications of about 1 KB: far more than the connection's socket buffers hold.
    const N: i64 = 20_000;
    db.exec(&format!(
        "INSERT INTO t SELECT i, repeat('x', 1000) FROM generate_series(1, {N}) i"
    ))
    .await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            notifier.stats().await.unwrap().received > 0
        })
        .await
    );
    // Held for six health-check intervals (and past the server's 4 s TCP user timeout).
    let held = wait_until(Duration::from_secs(6), || async {
        notifier.stats().await.unwrap().received >= N as u64
    })
    .await;
    assert!(!held, "the subscriber held the pipeline");
    release.send(()).unwrap();
    let got = drain(&mut events, N).await;
    let ids: Vec<i64> = got.iter().map(|e| e.id().as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=N).collect::<Vec<_>>(), "every row once, in order");
    while let Ok(status) = statuses.try_recv() {
        assert!(
            !matches!(status, Status::Disconnected { .. } | Status::Gap { .. }),
            "{status:?}"
        );
    }
    notifier.stop().await.unwrap();
    arbiter.stop();
}

#[actix_rt::test]
async fn wait_bounds_the_payload_bytes_in_flight_as_well_as_the_events() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, body text)")
        .await;
    // 1,024 units for 4 MiB: one unit per 4 KiB of payload, so a row of 64 KiB weighs 17.
    let notifier = Notifier::builder(&db.url)
        .watch(
            Watch::new("t", Insert)
                .tier(Tier::Durable)
                .extra_columns(["body"]),
        )
        .max_in_flight(1024)
        .max_in_flight_bytes(4 << 20)
        .start()
        .await
        .unwrap();
    const N: i64 = 400;
    let insert =
        format!("INSERT INTO t SELECT i, repeat('x', 65536) FROM generate_series(1, {N}) i");
    // Counted in events alone the budget would take all 400 rows; by weight it holds 60.
    // Bound: those, plus what the subscriber's mailbox (16) and handler (1) hold.
    let got =
        stuck_subscriber_stops_reading_at(&notifier, &db, &insert, N, 1024 / 17 + 16 + 1).await;
    let whole = |e: &ChangeEvent| e.get("body").and_then(|b| b.as_str()).map(str::len);
    assert!(got.iter().all(|e| whole(e) == Some(65536)), "whole bodies");
    let stats = notifier.stats().await.unwrap();
    assert_eq!((stats.in_flight, stats.queued), (0, 0));
    notifier.stop().await.unwrap();
}

/// A subscriber of `t` (policy Wait, buffer 10) stuck until released holds the pipeline:
/// after `insert` (rows 1 to `n`), reading stops once the in-flight budget is used up, at no
/// more than `bound` events received (it would reach `n` otherwise). Released, it gets every
/// row once, in order, none dropped; returns them.
async fn stuck_subscriber_stops_reading_at(
    notifier: &Notifier,
    db: &TestDb,
    insert: &str,
    n: i64,
    bound: u64,
) -> Vec<ChangeEvent> {
    let (release, mut slow_events, arbiter) = subscribe_gated(
        notifier,
        Subscription::new("t", Insert)
            .policy(OverflowPolicy::Wait)
            .buffer(10),
    )
    .await;
    db.exec(insert).await;
    let started = wait_until(Duration::from_secs(30), || async {
        notifier.stats().await.unwrap().received > 0
    })
    .await;
    assert!(started);
    // Over a bounded window, reading never gets past the bound.
    let exceeded = wait_until(Duration::from_secs(2), || async {
        let s = notifier.stats().await.unwrap();
        s.received > bound || s.queued > bound
    })
    .await;
    let stats = notifier.stats().await.unwrap();
    assert!(!exceeded && stats.received < n as u64, "{stats:?}");
    release.send(()).unwrap();
    let got = drain(&mut slow_events, n).await;
    let ids: Vec<i64> = got.iter().map(|e| e.id().as_i64().unwrap()).collect();
    assert_eq!(
        ids,
        (1..=n).collect::<Vec<_>>(),
        "every event, in order, none lost"
    );
    assert_eq!(notifier.stats().await.unwrap().dropped, 0);
    arbiter.stop();
    got
}

/// Receives `n` events from a channel subscription, off the actix thread (a blocking receive
/// there would stall the very pipeline that fills the channel); returns their ids.
async fn receive(rx: &crossbeam_channel::Receiver<ChangeEvent>, n: usize) -> Vec<i64> {
    let rx = rx.clone();
    tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|_| {
                let e = rx
                    .recv_timeout(common::ARRIVES_WITHIN)
                    .expect("an event should have arrived");
                e.id().as_i64().unwrap()
            })
            .collect()
    })
    .await
    .unwrap()
}

/// The counters once `done` holds for them (bounded wait); the last snapshot otherwise.
async fn stats_when(notifier: &Notifier, done: impl Fn(&Stats) -> bool) -> Stats {
    wait_until(common::ARRIVES_WITHIN, || async {
        done(&notifier.stats().await.unwrap())
    })
    .await;
    notifier.stats().await.unwrap()
}

#[actix_rt::test]
async fn delivered_counts_only_what_a_drop_oldest_subscriber_was_handed() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .start()
        .await
        .unwrap();
    // Nobody reads this channel: it takes the first 100 events, its buffer keeps the newest
    // 100, and the policy drops the 1,800 in between.
    let (_, stuck) = notifier
        .subscribe_channel(
            Subscription::new("t", Insert)
                .policy(OverflowPolicy::DropOldest)
                .buffer(100),
        )
        .await
        .unwrap();
    let mut fast = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t SELECT generate_series(1, 2000)")
        .await;
    assert_eq!(fast.take(2000).await.len(), 2000);

    let s = stats_when(&notifier, |s| s.delivered + s.dropped + s.queued == 4000).await;
    assert_eq!(
        (s.received, s.delivered, s.dropped, s.queued),
        (2000, 2000 + 100, 1800, 100),
        "{s:?}"
    );
    let got = receive(&stuck, 200).await;
    let expected: Vec<i64> = (1..=100).chain(1901..=2000).collect();
    assert_eq!(got, expected);
    let s = stats_when(&notifier, |s| s.queued == 0 && s.delivered == 2200).await;
    assert_eq!((s.delivered, s.dropped, s.queued), (2200, 1800, 0), "{s:?}");
    assert_eq!(
        s.delivered + s.dropped,
        2 * 2000,
        "every routed event is one or the other"
    );
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn keep_latest_per_key_replacements_count_as_dropped_not_delivered() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    db.exec("INSERT INTO t SELECT g, 0 FROM generate_series(1, 10) g")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Update).extra_columns(["v"]))
        .start()
        .await
        .unwrap();
    // The channel takes the first 10 events; the buffer then keeps the newest state of each
    // of the 10 rows, so 80 of the other 90 are replaced.
    let (_, stuck) = notifier
        .subscribe_channel(
            Subscription::new("t", Update)
                .policy(OverflowPolicy::KeepLatestPerKey)
                .buffer(10),
        )
        .await
        .unwrap();
    let mut fast = Events::subscribe(&notifier, Subscription::new("t", Update)).await;
    for _ in 0..10 {
        db.exec("UPDATE t SET v = v + 1").await;
    }
    assert_eq!(fast.take(100).await.len(), 100);

    let s = stats_when(&notifier, |s| s.delivered + s.dropped + s.queued == 200).await;
    assert_eq!(
        (s.delivered, s.dropped, s.queued),
        (100 + 10, 80, 10),
        "{s:?}"
    );
    let mut got = receive(&stuck, 20).await;
    got[10..].sort();
    assert_eq!(
        got[10..],
        (1..=10).collect::<Vec<_>>(),
        "each row's newest state"
    );
    let s = stats_when(&notifier, |s| s.queued == 0 && s.delivered == 120).await;
    assert_eq!((s.delivered, s.dropped, s.queued), (120, 80, 0), "{s:?}");
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_gone_subscriber_s_waiting_events_count_as_dropped_and_are_reported() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .start()
        .await
        .unwrap();
    let mut status = statuses(&notifier).await;
    // Wait policy, channel of 2: the first 2 events are handed over, 8 wait in the buffer.
    let (gone_id, gone) = notifier
        .subscribe_channel(Subscription::new("t", Insert).buffer(2))
        .await
        .unwrap();
    // A closure that panics on every event was still handed every event.
    notifier
        .subscribe_fn(Subscription::new("t", Insert), |_| panic!("boom"))
        .await
        .unwrap();
    let mut fast = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    db.exec("INSERT INTO t SELECT generate_series(1, 10)").await;
    assert_eq!(fast.take(10).await.len(), 10);
    let s = stats_when(&notifier, |s| s.subscriber_panics == 10 && s.queued == 8).await;
    assert_eq!(
        (s.delivered, s.dropped, s.queued, s.subscriber_panics),
        (2 + 10 + 10, 0, 8, 10),
        "{s:?}"
    );

    // The receiver goes away with 8 events still waiting for it: they are lost, not delivered.
    drop(gone);
    let s = stats_when(&notifier, |s| s.dropped == 8 && s.queued == 0).await;
    assert_eq!((s.delivered, s.dropped, s.queued), (22, 8, 0), "{s:?}");
    assert_eq!(s.delivered + s.dropped, 3 * 10);
    assert_eq!(
        next_status(&mut status).await,
        Status::Lagged {
            subscription: gone_id,
            dropped: 8
        }
    );
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn lagged_is_reported_at_most_once_a_second_per_subscription_and_adds_up() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .start()
        .await
        .unwrap();
    let mut status = statuses(&notifier).await;
    let stuck = Subscription::new("t", Insert)
        .policy(OverflowPolicy::DropOldest)
        .buffer(10);
    let (a, a_rx) = notifier.subscribe_channel(stuck.clone()).await.unwrap();
    let (b, b_rx) = notifier.subscribe_channel(stuck).await.unwrap();
    let mut fast = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;

    // One transaction per row: the listener reads (and the registry drops) a few at a time.
    const N: usize = 1000;
    let started = std::time::Instant::now();
    let client = db.client().await;
    for id in 1..=N as i32 {
        client
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    assert_eq!(fast.take(N).await.len(), N);
    // Each stuck subscription holds 10 in its channel and 10 in its buffer.
    let dropped_each = (N - 20) as u64;
    let s = stats_when(&notifier, |s| s.dropped == 2 * dropped_each).await;
    assert_eq!(s.dropped, 2 * dropped_each, "{s:?}");

    // Every drop is reported (the last ones within a second of happening), in few notices.
    let mut reported = std::collections::HashMap::new();
    let mut notices = std::collections::HashMap::new();
    while reported.values().sum::<u64>() < 2 * dropped_each {
        match next_status(&mut status).await {
            Status::Lagged {
                subscription,
                dropped,
            } => {
                assert!(subscription == a || subscription == b, "{subscription}");
                *reported.entry(subscription).or_insert(0) += dropped;
                *notices.entry(subscription).or_insert(0u64) += 1;
            }
            other => panic!("unexpected status {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(reported[&a], dropped_each);
    assert_eq!(reported[&b], dropped_each);
    // At most one notice per second per subscription: one at the first drop, then one per
    // full second since.
    let bound = 1 + elapsed.as_secs();
    for id in [a, b] {
        assert!(
            notices[&id] <= bound,
            "{} Lagged notices for {id} in {elapsed:?}",
            notices[&id]
        );
    }
    // stop() waits for every buffer to drain; these never would.
    drop((a_rx, b_rx));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_disconnect_carries_the_server_s_message() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .start()
        .await
        .unwrap();
    let mut status = statuses(&notifier).await;
    common::kill_listener(&db, 1).await;
    match next_status(&mut status).await {
        // Not tokio-postgres' bare "db error": what the server said when it closed.
        Status::Disconnected { error } => assert_eq!(
            error,
            "FATAL: terminating connection due to administrator command"
        ),
        other => panic!("expected a disconnect, got {other:?}"),
    }
    assert_eq!(next_status(&mut status).await, Status::Connected);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn drops_not_yet_reported_are_reported_on_unsubscribe_and_on_stop() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    // An interval no test outlives: after the first notice, only the end of a subscription
    // or of the notifier can report.
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .lag_report_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let mut status = statuses(&notifier).await;
    let stuck = Subscription::new("t", Insert)
        .policy(OverflowPolicy::DropOldest)
        .buffer(1);
    let (a, a_rx) = notifier.subscribe_channel(stuck.clone()).await.unwrap();
    let (b, b_rx) = notifier.subscribe_channel(stuck).await.unwrap();
    let mut fast = Events::subscribe(&notifier, Subscription::new("t", Insert)).await;

    // Each takes 1 into its channel, keeps 1 in its buffer and drops 3. A subscription's first
    // drop is reported at once (with whatever else its batch dropped).
    db.exec("INSERT INTO t SELECT generate_series(1, 5)").await;
    assert_eq!(fast.take(5).await.len(), 5);
    let mut reported = std::collections::HashMap::new();
    while reported.len() < 2 {
        match next_status(&mut status).await {
            Status::Lagged {
                subscription,
                dropped,
            } => assert!(reported.insert(subscription, dropped).is_none()),
            other => panic!("unexpected status {other:?}"),
        }
    }
    // 5 more: each drops its buffered event and 4 of the new ones: 8 in all for each.
    db.exec("INSERT INTO t SELECT generate_series(6, 10)").await;
    assert_eq!(fast.take(5).await.len(), 5);
    let s = stats_when(&notifier, |s| s.dropped == 2 * 8).await;
    assert_eq!((s.dropped, s.queued), (16, 2), "{s:?}");

    // Unsubscribing reports the rest of what a lost, the event still waiting included.
    notifier.unsubscribe(a).await.unwrap();
    assert_eq!(
        next_status(&mut status).await,
        Status::Lagged {
            subscription: a,
            dropped: 8 + 1 - reported[&a]
        }
    );
    assert_eq!(notifier.stats().await.unwrap().dropped, 17);
    drop(a_rx);

    // Stopping reports the rest of b's (its buffer drains into its channel first).
    assert_eq!(receive(&b_rx, 1).await, [1]);
    notifier.stop().await.unwrap();
    assert_eq!(
        next_status(&mut status).await,
        Status::Lagged {
            subscription: b,
            dropped: 8 - reported[&b]
        }
    );
    assert_eq!(receive(&b_rx, 1).await, [10]);
    let s = notifier.stats().await.unwrap();
    assert_eq!(
        (s.delivered, s.dropped, s.queued),
        (10 + 1 + 2, 17, 0),
        "{s:?}"
    );
    assert_eq!(s.delivered + s.dropped, 3 * 10);
}

/// A status subscriber (an actor) that is busy while statuses come in bursts gets every one
/// once it moves again: its mailbox's capacity (16) does not drop them. (A `Gap` — the only
/// sign that purged rows were missed — or a `LostLease` lost that way is not seen at all.)
#[actix_rt::test]
async fn a_busy_status_subscriber_gets_every_status_once_it_moves() {
    struct Gated {
        gate: Option<std::sync::mpsc::Receiver<()>>,
        out: mpsc::UnboundedSender<Status>,
    }
    impl actix::Actor for Gated {
        type Context = actix::Context<Self>;
    }
    impl actix::Handler<sqlnotify::StatusEvent> for Gated {
        type Result = ();
        fn handle(&mut self, event: sqlnotify::StatusEvent, _: &mut actix::Context<Self>) {
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            let _ = self.out.send(event.status);
        }
    }

    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .start()
        .await
        .unwrap();
    let mut reference = statuses(&notifier).await;
    let (release, gate) = std::sync::mpsc::channel();
    let (out, mut busy) = mpsc::unbounded_channel();
    let arbiter = actix::Arbiter::new();
    let gate = std::sync::Mutex::new(Some(gate));
    let addr = <Gated as actix::Actor>::start_in_arbiter(&arbiter.handle(), move |_| Gated {
        gate: gate.lock().unwrap().take(),
        out,
    });
    notifier.subscribe_status(addr.recipient()).await.unwrap();
    // Eight reconnects: Disconnected, Connected and Gap each, 24 statuses.
    let mut seen = Vec::new();
    for _ in 0..8 {
        let pid = listener_pid(&db).await.expect("the listener is connected");
        db.exec(&format!("SELECT pg_terminate_backend({pid})"))
            .await;
        for _ in 0..3 {
            seen.push(next_status(&mut reference).await);
        }
        assert!(
            matches!(seen[seen.len() - 1], Status::Gap { .. }),
            "{seen:?}"
        );
    }
    release.send(()).unwrap();
    let mut got = Vec::new();
    while got.len() < seen.len() {
        match tokio::time::timeout(Duration::from_secs(30), busy.recv()).await {
            Ok(Some(status)) => got.push(status),
            _ => break,
        }
    }
    assert_eq!(got, seen, "the busy subscriber's statuses");
    notifier.stop().await.unwrap();
    arbiter.stop();
}

/// The control connection that reads overflow rows goes silent (no FIN, no RST) while the
/// listener reconnects on a fresh one: the next large row's read is given up after its limit
/// (10 s) and the event delivered with its key only — instead of the decoder, and every event
/// behind it, waiting for minutes — and the row after it is read in full on a new control
/// connection.
#[actix_rt::test]
async fn an_overflow_read_on_a_silent_connection_is_given_up_and_the_pipeline_goes_on() {
    const BIG: usize = 10_000;
    let db = TestDb::new().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL)")
        .await;
    let (proxy, url) = proxy_in_front_of(&db).await;
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("docs", Insert).extra_columns(["body"]))
        .health_check_interval(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let mut status = statuses(&notifier).await;
    let mut events = Events::subscribe(&notifier, Subscription::new("docs", Insert)).await;
    let big = |id: i64| format!("INSERT INTO docs VALUES ({id}, repeat('x', {BIG}))");
    db.exec(&big(1)).await;
    let first = events.next().await;
    assert!(
        !first.is_truncated(),
        "read in full on the control connection"
    );

    // Every connection through the proxy goes silent; the listener's health check notices
    // and reconnects, the control connection stays as it is.
    proxy.silence_existing();
    assert!(matches!(
        next_status(&mut status).await,
        Status::Disconnected { .. }
    ));
    assert_eq!(next_status(&mut status).await, Status::Connected);
    db.exec(&big(2)).await;
    db.exec(&big(3)).await;
    let second = events.next_within(Duration::from_secs(40)).await;
    assert_eq!(second.id().as_i64(), Some(2));
    assert!(second.is_truncated(), "delivered with its key only");
    let third = events.next().await;
    assert_eq!(third.id().as_i64(), Some(3));
    assert!(
        !third.is_truncated(),
        "read in full on a new control connection"
    );
    notifier.stop().await.unwrap();
}
