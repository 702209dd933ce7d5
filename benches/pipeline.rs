//! In-process pipeline benchmark: decoder + registry without a database.
//!
//! Notifications shaped like a sqlnotify trigger's payload are fed through
//! `sqlnotify::bench_support::Pipeline`, which plays the listener's part (one unit of the
//! in-flight budget per notification, waiting when the pipeline is full). Subscribers are
//! closures (`subscribe_fn`) with a filter matching half of the events, or plain actors
//! (`subscribe`). Everything runs on one thread (one actix arbiter), as in a notifier.
//!
//! The baseline does the least work the same job needs, on the same thread: parse each payload
//! with serde_json and test each subscriber's filter, without actors.
//!
//! Scenarios: resident memory over 1,000,000 events (VmRSS before and after; must stay flat),
//! events/s to 1, 10 and 100 filtered closure subscribers with the default in-flight budget
//! (4,096), to 10 with a budget of 65,536, and to 10 plain actors (`subscribe`).
//! Sections for `--only=`: `memory`, `memory-large-budget`, `throughput-1`, `throughput-10`,
//! `throughput-100`, `large-budget-10`, `actors-10`.
//!
//! Routing by value (`routing-…`, selected together by `--only=routing`): 10,000 and 100,000
//! closure subscriptions each `eq("user_id", i)`, events spread over every id, so each event
//! goes to exactly one subscriber (`routing-10000`, `routing-100000`), timed until the last
//! closure ran (the final flush, which messages every closure subscriber, is reported apart);
//! the baseline parses each
//! payload and looks its `user_id` up in a hash map of the subscribers. `routing-memory`: VmRSS
//! and VmHWM before and after making 100,000 idle closure subscriptions, per subscription (what
//! the closure host keeps for each included); `routing-shared-10000`, `routing-shared-100000`:
//! the same subscriptions as recipients of one actor (`subscribe`), which counts (each
//! delivery is an actix message to it; closures instead get a routed batch's events as one
//! message to their host). `routing-memory` runs first among the routing sections, and
//! `--only=routing` runs it in a process where nothing larger was allocated before; run one
//! section per process (`--only=routing-shared-10000`) to keep one scenario's heap from
//! moving the next one's baseline.
//!
//! Run: `scripts/bench` or `cargo bench --bench pipeline [-- --quick]`.

#[path = "common/mod.rs"]
mod common;

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::Value;
use sqlnotify::bench_support::Pipeline;
use sqlnotify::{ChangeEvent, Filter, Operation, RawNotification, Subscription, Watch};

use common::{count, ratio, Args, Table};

const CHANNEL: &str = "sqlnotify_public_users_insert";
/// Notifications per batch (the PostgreSQL listener's largest batch).
const BATCH: usize = 512;
/// Distinct payloads cycled through.
const POOL: usize = 4096;
/// The notifier's default in-flight budget (`max_in_flight`).
const BUDGET: usize = 4_096;
/// A larger budget, for comparison.
const LARGE_BUDGET: usize = 65_536;
/// Events sent before the memory scenario's first reading.
const WARM_UP: usize = 300_000;

fn main() {
    let args = Args::parse();
    if !common::refuse_unless_bench(&args, "pipeline") {
        return;
    }
    actix::System::new().block_on(run(args));
}

fn watch() -> Watch {
    Watch::new("users", Operation::Insert).extra_columns(["parity", "tenant", "email", "sent_us"])
}

/// Payloads as the notify-tier trigger writes them (`json_build_object(...)::text`).
fn payloads() -> Vec<String> {
    (0..POOL)
        .map(|n| {
            format!(
                r#"{{"id" : {n}, "parity" : {}, "tenant" : {}, "email" : "user{n}@example.com", "sent_us" : 1732540000000000}}"#,
                n % 2,
                n % 100
            )
        })
        .collect()
}

/// A batch of `BATCH` notifications starting at pool index `start`.
fn batch(pool: &[String], start: usize) -> Vec<RawNotification> {
    (0..BATCH)
        .map(|i| RawNotification::new(CHANNEL, pool[(start + i) % pool.len()].clone()))
        .collect()
}

async fn run(args: Args) {
    let time = args.run_time();
    println!("# sqlnotify in-process pipeline (decoder + registry, no database)");
    println!("machine: {}", common::machine());
    println!(
        "mode: {} ({} s per scenario, baseline {} s); payload ~{} bytes; batches of {BATCH}; filters match half of the events",
        if args.quick { "--quick" } else { "full" },
        time.as_secs(),
        time.as_secs_f64() / 2.0,
        payloads()[1].len()
    );
    let mut table = Table::new(&["scenario", "baseline", "sqlnotify", "ratio", "details"]);
    // Memory first, in a fresh process: nothing allocated by earlier scenarios hides growth.
    // The default (smaller) budget runs first, so its reading is not the larger one's peak
    // (the allocator keeps what it once held).
    for (name, budget) in [("memory", BUDGET), ("memory-large-budget", LARGE_BUDGET)] {
        if !args.wants(name) {
            continue;
        }
        let m = memory(budget).await;
        table.row(vec![
            format!(
                "resident memory, 1,000,000 events to 10 filtered subscribers, max_in_flight {}",
                count(budget as f64)
            ),
            format!("{} kB before", count(m.before_kb as f64)),
            format!("{} kB after", count(m.after_kb as f64)),
            ratio(m.after_kb as f64, m.before_kb as f64),
            format!(
                "VmRSS after a {}-event warm-up, then after 1,000,000 more (every 250,000 while flowing: {} kB); VmHWM {} kB; {} events/s; queued after flush {}",
                count(WARM_UP as f64),
                m.checkpoints
                    .iter()
                    .map(|kb| count(*kb as f64))
                    .collect::<Vec<_>>()
                    .join(" / "),
                count(m.peak_kb as f64),
                count(m.events_per_s),
                m.queued
            ),
        ]);
    }
    for subscribers in [1, 10, 100] {
        if args.wants(&format!("throughput-{subscribers}")) {
            let base = baseline(subscribers, time / 2);
            let lib = pipeline(subscribers, Sink::Closure, BUDGET, time).await;
            table.row(vec![
                format!("events/s to {subscribers} filtered closure subscriber(s)"),
                count(base.events_per_s),
                count(lib.events_per_s),
                ratio(lib.events_per_s, base.events_per_s),
                format!(
                    "{} deliveries/s; {} events in {:.1} s, CPU {:.0}% of a core ({} events per CPU-second; baseline {}); delivered {} of {} expected",
                    count(lib.deliveries as f64 / lib.elapsed.as_secs_f64()),
                    count(lib.events as f64),
                    lib.elapsed.as_secs_f64(),
                    lib.cpu * 100.0,
                    count(lib.events_per_s / lib.cpu),
                    count(base.events_per_s / base.cpu),
                    count(lib.deliveries as f64),
                    count(lib.expected as f64),
                ),
            ]);
        }
    }
    if args.wants("large-budget-10") {
        let base = baseline(10, time / 2);
        let lib = pipeline(10, Sink::Closure, LARGE_BUDGET, time).await;
        table.row(vec![
            format!(
                "events/s to 10 filtered closure subscribers, max_in_flight {}",
                count(LARGE_BUDGET as f64)
            ),
            count(base.events_per_s),
            count(lib.events_per_s),
            ratio(lib.events_per_s, base.events_per_s),
            format!(
                "{} deliveries/s; CPU {:.0}% of a core ({} events per CPU-second; baseline {}); delivered {} of {} expected",
                count(lib.deliveries as f64 / lib.elapsed.as_secs_f64()),
                lib.cpu * 100.0,
                count(lib.events_per_s / lib.cpu),
                count(base.events_per_s / base.cpu),
                count(lib.deliveries as f64),
                count(lib.expected as f64),
            ),
        ]);
    }
    if args.wants("actors-10") {
        let base = baseline(10, time / 2);
        let lib = pipeline(10, Sink::Actor, BUDGET, time).await;
        table.row(vec![
            "events/s to 10 filtered actor subscribers (`subscribe`, default mailbox)".into(),
            count(base.events_per_s),
            count(lib.events_per_s),
            ratio(lib.events_per_s, base.events_per_s),
            format!(
                "{} deliveries/s; CPU {:.0}% of a core; delivered {} of {} expected",
                count(lib.deliveries as f64 / lib.elapsed.as_secs_f64()),
                lib.cpu * 100.0,
                count(lib.deliveries as f64),
                count(lib.expected as f64),
            ),
        ]);
    }
    if args.wants("routing-memory") {
        let m = idle_memory(ROUTING_MEMORY).await;
        table.row(vec![
            format!(
                "memory per idle subscription, {} `eq(\"user_id\", i)` closure subscriptions",
                count(ROUTING_MEMORY as f64)
            ),
            "–".into(),
            format!("{} bytes", count(m.per_subscription)),
            "–".into(),
            format!(
                "VmRSS {} → {} kB, VmHWM {} → {} kB (per subscription by VmHWM: {} bytes); subscribing took {:.2} s",
                count(m.rss_before as f64),
                count(m.rss_after as f64),
                count(m.hwm_before as f64),
                count(m.hwm_after as f64),
                count(m.per_subscription_hwm),
                m.subscribe_s,
            ),
        ]);
    }
    for (shared, subscribers) in [
        (false, 10_000),
        (false, 100_000),
        (true, 10_000),
        (true, 100_000),
    ] {
        let name = if shared { "routing-shared" } else { "routing" };
        if args.wants(&format!("{name}-{subscribers}")) {
            let base = routing_baseline(subscribers, time / 2);
            let lib = routing(subscribers, shared, time).await;
            table.row(vec![
                format!(
                    "events/s routed by value, {} subscriptions `eq(\"user_id\", i)` {}, each event to its one subscriber",
                    count(subscribers as f64),
                    if shared {
                        "to one actor (`subscribe`, a recipient each)"
                    } else {
                        "each a closure"
                    }
                ),
                count(base.events_per_s),
                count(lib.events_per_s),
                ratio(lib.events_per_s, base.events_per_s),
                format!(
                    "{} events in {:.1} s, CPU {:.0}% of a core ({} events per CPU-second; baseline {}); delivered {} of {} expected, {} to a subscriber whose id differs; timed until the last event reached its subscriber, the final flush apart ({:.2} s)",
                    count(lib.events as f64),
                    lib.elapsed.as_secs_f64(),
                    lib.cpu * 100.0,
                    count(lib.events_per_s / lib.cpu),
                    count(base.events_per_s / base.cpu),
                    count(lib.deliveries as f64),
                    count(lib.expected as f64),
                    lib.misrouted,
                    lib.flush_s,
                ),
            ]);
        }
    }
    println!();
    print!("{}", table.render());
}

/// Subscriptions of the memory-per-idle-subscription scenario.
const ROUTING_MEMORY: usize = 100_000;

/// The routing scenarios' watch: a `user_id` column to route on.
fn routing_watch() -> Watch {
    Watch::new("users", Operation::Insert).extra_columns(["user_id", "email", "sent_us"])
}

/// One payload per user id in `0..users`, in an order that spreads consecutive events over
/// the ids (a stride coprime with `users`).
fn routing_payloads(users: usize) -> Vec<String> {
    let stride = 7_919; // prime; neither 10,000 nor 100,000 is a multiple
    (0..users)
        .map(|n| {
            let user = (n * stride) % users;
            format!(
                r#"{{"id" : {n}, "user_id" : {user}, "email" : "user{user}@example.com", "sent_us" : 1732540000000000}}"#
            )
        })
        .collect()
}

struct Routed {
    events_per_s: f64,
    events: u64,
    deliveries: u64,
    expected: u64,
    misrouted: u64,
    elapsed: Duration,
    cpu: f64,
    /// The final flush (a message to every closure subscriber), not in `elapsed`.
    flush_s: f64,
}

/// The least work: parse every payload, find its subscriber by `user_id` in a hash map, count.
fn routing_baseline(users: usize, time: Duration) -> Throughput {
    let pool = routing_payloads(users);
    let subscribers: std::collections::HashMap<i64, usize> =
        (0..users).map(|i| (i as i64, i)).collect();
    let mut counts = vec![0u64; users];
    let (mut events, mut at) = (0u64, 0usize);
    let cpu = common::cpu_time();
    let started = Instant::now();
    while started.elapsed() < time {
        for raw in batch(&pool, at) {
            let value: Value = serde_json::from_str(&raw.payload).expect("valid JSON");
            if let Some(i) = value
                .get("user_id")
                .and_then(Value::as_i64)
                .and_then(|id| subscribers.get(&id))
            {
                counts[*i] += 1;
            }
            events += 1;
        }
        at += BATCH;
    }
    let elapsed = started.elapsed();
    let deliveries = counts.iter().sum();
    std::hint::black_box(&counts);
    Throughput {
        events_per_s: events as f64 / elapsed.as_secs_f64(),
        events,
        deliveries,
        expected: deliveries,
        elapsed,
        cpu: (common::cpu_time() - cpu).as_secs_f64() / elapsed.as_secs_f64(),
    }
}

/// Subscribes `users` closures, the `i`th to `eq("user_id", i)`; they count what they get, and
/// what they get with another `user_id`.
async fn subscribe_users(pipeline: &Pipeline, users: usize) -> (Rc<Cell<u64>>, Rc<Cell<u64>>) {
    let (delivered, misrouted) = (Rc::new(Cell::new(0u64)), Rc::new(Cell::new(0u64)));
    for i in 0..users {
        let (delivered, misrouted) = (delivered.clone(), misrouted.clone());
        let mine = Value::from(i);
        pipeline
            .subscribe_fn(
                Subscription::new("users", Operation::Insert).filter(Filter::eq("user_id", i)),
                move |event| {
                    if event.get("user_id") == Some(&mine) {
                        delivered.set(delivered.get() + 1);
                    } else {
                        misrouted.set(misrouted.get() + 1);
                    }
                },
            )
            .await
            .expect("subscribe");
    }
    (delivered, misrouted)
}

/// Subscribes `users` recipients of one actor, the `i`th to `eq("user_id", i)`; the actor
/// counts what it gets.
async fn subscribe_users_to_one(
    pipeline: &Pipeline,
    users: usize,
) -> (Rc<Cell<u64>>, Addr<Counter>) {
    let delivered = Rc::new(Cell::new(0u64));
    let actor = Counter(delivered.clone()).start();
    for i in 0..users {
        pipeline
            .subscribe(
                Subscription::new("users", Operation::Insert).filter(Filter::eq("user_id", i)),
                actor.clone().recipient(),
            )
            .await
            .expect("subscribe");
    }
    (delivered, actor)
}

/// Events per second routed to `users` subscriptions by value (closures, or recipients of one
/// `shared` actor), until every event reached its subscriber.
async fn routing(users: usize, shared: bool, time: Duration) -> Routed {
    let pool = routing_payloads(users);
    let pipeline = Pipeline::start(&[routing_watch()], BUDGET).expect("pipeline");
    let (delivered, misrouted, _actor) = if shared {
        let (delivered, actor) = subscribe_users_to_one(&pipeline, users).await;
        (delivered, Rc::new(Cell::new(0)), Some(actor))
    } else {
        let (delivered, misrouted) = subscribe_users(&pipeline, users).await;
        (delivered, misrouted, None)
    };
    let (mut events, mut at) = (0u64, 0usize);
    let cpu = common::cpu_time();
    let started = Instant::now();
    while started.elapsed() < time {
        pipeline.send(batch(&pool, at)).await.expect("send");
        events += BATCH as u64;
        at += BATCH;
    }
    // Until every event has reached its subscriber's closure (not the final flush, which
    // sends a message to every closure subscriber: its time is reported apart).
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered.get() + misrouted.get() < events {
        assert!(Instant::now() < deadline, "events lost on the way");
        tokio::task::yield_now().await;
    }
    let elapsed = started.elapsed();
    let cpu = (common::cpu_time() - cpu).as_secs_f64() / elapsed.as_secs_f64();
    let flushing = Instant::now();
    pipeline.flush().await;
    let flush_s = flushing.elapsed().as_secs_f64();
    let stats = pipeline.stats();
    pipeline.stop().await;
    assert_eq!(stats.malformed, 0);
    Routed {
        events_per_s: events as f64 / elapsed.as_secs_f64(),
        events,
        deliveries: delivered.get(),
        expected: events,
        misrouted: misrouted.get(),
        elapsed,
        cpu,
        flush_s,
    }
}

struct IdleMemory {
    rss_before: u64,
    rss_after: u64,
    hwm_before: u64,
    hwm_after: u64,
    /// Bytes per subscription by VmRSS.
    per_subscription: f64,
    /// Bytes per subscription by VmHWM.
    per_subscription_hwm: f64,
    subscribe_s: f64,
}

/// VmRSS and VmHWM before and after making `users` idle subscriptions (one event routed
/// first, so the pipeline's own first-use allocations are not counted).
async fn idle_memory(users: usize) -> IdleMemory {
    let pipeline = Pipeline::start(&[routing_watch()], BUDGET).expect("pipeline");
    pipeline
        .send(batch(&routing_payloads(1), 0))
        .await
        .expect("send");
    pipeline.flush().await;
    let (rss_before, hwm_before) = (
        common::proc_status_kb("VmRSS"),
        common::proc_status_kb("VmHWM"),
    );
    let started = Instant::now();
    let subscribed = subscribe_users(&pipeline, users).await;
    let subscribe_s = started.elapsed().as_secs_f64();
    let (rss_after, hwm_after) = (
        common::proc_status_kb("VmRSS"),
        common::proc_status_kb("VmHWM"),
    );
    drop(subscribed);
    pipeline.stop().await;
    let per = |before: u64, after: u64| after.saturating_sub(before) as f64 * 1024.0 / users as f64;
    IdleMemory {
        rss_before,
        rss_after,
        hwm_before,
        hwm_after,
        per_subscription: per(rss_before, rss_after),
        per_subscription_hwm: per(hwm_before, hwm_after),
        subscribe_s,
    }
}

struct Throughput {
    events_per_s: f64,
    events: u64,
    deliveries: u64,
    expected: u64,
    elapsed: Duration,
    /// CPU time used over wall time (1.0 = one core busy).
    cpu: f64,
}

/// The least work: parse every payload and test every subscriber's filter, on this thread.
fn baseline(subscribers: usize, time: Duration) -> Throughput {
    let pool = payloads();
    let wanted: Vec<Value> = (0..subscribers).map(|i| Value::from(i % 2)).collect();
    let (mut events, mut deliveries, mut at) = (0u64, 0u64, 0usize);
    let cpu = common::cpu_time();
    let started = Instant::now();
    while started.elapsed() < time {
        for raw in batch(&pool, at) {
            let value: Value = serde_json::from_str(&raw.payload).expect("valid JSON");
            let parity = value.get("parity");
            for w in &wanted {
                if parity == Some(w) {
                    deliveries += 1;
                }
            }
            events += 1;
        }
        at += BATCH;
    }
    let elapsed = started.elapsed();
    std::hint::black_box(deliveries);
    Throughput {
        events_per_s: events as f64 / elapsed.as_secs_f64(),
        events,
        deliveries,
        expected: deliveries,
        elapsed,
        cpu: (common::cpu_time() - cpu).as_secs_f64() / elapsed.as_secs_f64(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Sink {
    /// `subscribe_fn` closures.
    Closure,
    /// User actors through `subscribe(…, addr.recipient())`, default mailbox.
    Actor,
}

/// Counts events (a user's actor).
struct Counter(Rc<Cell<u64>>);

impl Actor for Counter {
    type Context = Context<Self>;
}

/// Answered once everything sent to the actor before it has been handled.
struct Ping;

impl Message for Ping {
    type Result = ();
}

impl Handler<Ping> for Counter {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

impl Handler<ChangeEvent> for Counter {
    type Result = ();
    fn handle(&mut self, event: ChangeEvent, _: &mut Context<Self>) {
        std::hint::black_box(event.id());
        self.0.set(self.0.get() + 1);
    }
}

async fn subscribe_all(
    pipeline: &Pipeline,
    subscribers: usize,
    sink: Sink,
) -> (Rc<Cell<u64>>, Vec<Addr<Counter>>) {
    let delivered = Rc::new(Cell::new(0u64));
    let mut actors = Vec::new();
    for i in 0..subscribers {
        let subscription =
            Subscription::new("users", Operation::Insert).filter(Filter::eq("parity", i % 2));
        match sink {
            Sink::Closure => {
                let delivered = delivered.clone();
                pipeline
                    .subscribe_fn(subscription, move |event| {
                        std::hint::black_box(event.id());
                        delivered.set(delivered.get() + 1);
                    })
                    .await
                    .expect("subscribe");
            }
            Sink::Actor => {
                let actor = Counter(delivered.clone()).start();
                pipeline
                    .subscribe(subscription, actor.clone().recipient())
                    .await
                    .expect("subscribe");
                actors.push(actor);
            }
        }
    }
    (delivered, actors)
}

/// Events per second through the pipeline for `time`, including the final flush.
async fn pipeline(subscribers: usize, sink: Sink, budget: usize, time: Duration) -> Throughput {
    let pool = payloads();
    let pipeline = Pipeline::start(&[watch()], budget).expect("pipeline");
    let (delivered, actors) = subscribe_all(&pipeline, subscribers, sink).await;
    let per_pool_cycle: Vec<u64> = {
        // Matching subscribers per event: subscribers with the event's parity.
        let even = subscribers.div_ceil(2) as u64;
        let odd = (subscribers / 2) as u64;
        (0..POOL)
            .map(|n| if n % 2 == 0 { even } else { odd })
            .collect()
    };
    let (mut events, mut expected, mut at) = (0u64, 0u64, 0usize);
    let cpu = common::cpu_time();
    let started = Instant::now();
    while started.elapsed() < time {
        let b = batch(&pool, at);
        for i in 0..BATCH {
            expected += per_pool_cycle[(at + i) % POOL];
        }
        pipeline.send(b).await.expect("send");
        events += BATCH as u64;
        at += BATCH;
    }
    // Everything routed and handed over; closures have run. Actors may still hold their last
    // events in their mailboxes: a message behind them answers once they are handled.
    pipeline.flush().await;
    futures_util::future::join_all(actors.iter().map(|a| a.send(Ping))).await;
    let elapsed_all = started.elapsed();
    let stats = pipeline.stats();
    pipeline.stop().await;
    assert_eq!(stats.malformed, 0);
    Throughput {
        events_per_s: events as f64 / elapsed_all.as_secs_f64(),
        events,
        deliveries: delivered.get(),
        expected,
        elapsed: elapsed_all,
        cpu: (common::cpu_time() - cpu).as_secs_f64() / elapsed_all.as_secs_f64(),
    }
}

struct Memory {
    before_kb: u64,
    after_kb: u64,
    peak_kb: u64,
    events_per_s: f64,
    queued: u64,
    /// VmRSS every 250,000 events (while they flow).
    checkpoints: Vec<u64>,
}

/// VmRSS after a warm-up and after 1,000,000 events to 10 filtered subscribers.
async fn memory(budget: usize) -> Memory {
    let start_kb = common::proc_status_kb("VmRSS");
    let pool = payloads();
    let pipeline = Pipeline::start(&[watch()], budget).expect("pipeline");
    let _subscribers = subscribe_all(&pipeline, 10, Sink::Closure).await;
    // Long enough for the in-flight budget to fill up (its plateau) several times over.
    let mut at = 0usize;
    for _ in 0..(WARM_UP / BATCH) {
        pipeline.send(batch(&pool, at)).await.expect("send");
        at += BATCH;
    }
    pipeline.flush().await;
    let before_kb = common::proc_status_kb("VmRSS");
    eprintln!("  (VmRSS at start {start_kb} kB, after warm-up {before_kb} kB)");
    let started = Instant::now();
    let rounds = 1_000_000usize.div_ceil(BATCH);
    let mut checkpoints = Vec::new();
    for round in 1..=rounds {
        pipeline.send(batch(&pool, at)).await.expect("send");
        at += BATCH;
        if round % (rounds / 4) == 0 {
            checkpoints.push(common::proc_status_kb("VmRSS"));
        }
    }
    pipeline.flush().await;
    let events_per_s = (rounds * BATCH) as f64 / started.elapsed().as_secs_f64();
    let after_kb = common::proc_status_kb("VmRSS");
    let peak_kb = common::proc_status_kb("VmHWM");
    let queued = pipeline.stats().queued;
    pipeline.stop().await;
    Memory {
        before_kb,
        after_kb,
        peak_kb,
        events_per_s,
        queued,
        checkpoints,
    }
}
