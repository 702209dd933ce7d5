//! Relay benchmark: what `sqlnotify::relay` stores into a NATS JetStream stream per second,
//! and how long a row takes from its commit through the stream to a worker, each next to a
//! direct subscription (a plain durable-tier notifier in this process) measured in the same run.
//!
//! One writer on a thread of its own (its own tokio runtime and tokio-postgres client, so it
//! never shares the actix thread) commits into a table watched on the durable tier; every row
//! carries the writer's wall-clock time just before the statement was sent (`sent_us`, µs since
//! the epoch; each transaction is one autocommitted INSERT, so that is just before its commit).
//!
//! * `relay-throughput`: 100-row transactions as fast as the writer can (with
//!   `synchronous_commit=off`, so that the rate shows CPU cost rather than this disk's flush
//!   time) for 10 s (2 s with `--quick`). Relay: messages the stream stored per second, from
//!   the first commit until the last row written was stored (`RelayStats::published`, checked
//!   against the stream's message count). Baseline: events a direct subscription received per
//!   second over the same span.
//! * `relay-latency`: 1,000 rows/s (10-row transactions every 10 ms). Relay: a worker — a
//!   JetStream pull consumer on a thread of its own in this process — takes each message and
//!   computes its arrival time − `columns.sent_us` of its JSON body, so the figure covers the
//!   commit, the relay's read, the publish and JetStream's acknowledgement, and the delivery to
//!   the worker. Baseline: a direct subscription computing the same. The details also give
//!   the part after the writer got its commit back (`after the commit ack`), which leaves out
//!   the commit's own flush.
//!
//! PostgreSQL: `SQLNOTIFY_TEST_PG_URL`, else `postgres://postgres@127.0.0.1:5432/postgres`; a
//! database of its own is created and dropped. NATS (with JetStream): `SQLNOTIFY_TEST_NATS_URL`,
//! else `nats://127.0.0.1:4222`; every relay run uses a stream and subject prefix of its own,
//! deleted afterwards; skipped with a line saying so when no server answers.
//!
//! Run: `scripts/bench [--quick]`, or `cargo bench --features nats,postgres --bench relay --
//! [--quick] [--only=relay-throughput,relay-latency,relay-drain]` (`--only=relay` selects all;
//! `relay-drain` is the relay's own ceiling: a backlog written before it starts).

#[path = "common/mod.rs"]
mod common;

use std::cell::Cell;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, consumer::DeliverPolicy};
use futures_util::StreamExt;
use serde_json::Value;
use sqlnotify::relay::{Relay, RelayStats};
use sqlnotify::{Capture, Notifier, Operation, Subscription, Tier, Watch};
use tokio::sync::oneshot;
use tokio_postgres::{Client, NoTls};

use common::{count, ms, percentile, ratio, with_dbname, Args, Table};

/// The sections, for `--only`.
const THROUGHPUT: &str = "relay-throughput";
const LATENCY: &str = "relay-latency";
const DRAIN: &str = "relay-drain";

/// Rows per transaction of the throughput run.
const THROUGHPUT_TXN_ROWS: u32 = 100;
/// The latency run: rows per transaction, and one transaction every so often (1,000 rows/s).
const LATENCY_TXN_ROWS: u32 = 10;
const LATENCY_INTERVAL: Duration = Duration::from_millis(10);
/// Length of the `payload` text column.
const PAYLOAD_BYTES: usize = 16;

/// The goals the table reports against.
const GOAL_EVENTS_PER_S: f64 = 50_000.0;
const GOAL_P99_MS: f64 = 10.0;

/// Prefix of the benchmark's database names (`…_PID`).
const DB_PREFIX: &str = "sqlnotify_bench_relay_";

fn main() {
    let args = Args::parse();
    if !common::refuse_unless_bench(&args, "relay") {
        return;
    }
    let _ = env_logger::builder().is_test(false).try_init();
    if !args.wants(THROUGHPUT) && !args.wants(LATENCY) && !args.wants(DRAIN) {
        println!(
            "relay: nothing selected (sections: {THROUGHPUT}, {LATENCY}, {DRAIN}; --only=relay \
             for all)"
        );
        return;
    }
    let nats =
        std::env::var("SQLNOTIFY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    if !nats_answers(&nats) {
        println!("relay: skipped: no NATS server answers at {nats} (set SQLNOTIFY_TEST_NATS_URL)");
        return;
    }
    actix::System::new().block_on(run(args, nats));
}

/// Whether something accepts TCP connections at the (first) server of a NATS URL.
fn nats_answers(url: &str) -> bool {
    let server = url.split(',').next().unwrap_or(url).trim();
    let server = server.split_once("://").map_or(server, |(_, rest)| rest);
    let server = server.rsplit_once('@').map_or(server, |(_, host)| host);
    let server = server.trim_end_matches('/');
    let address = if server.contains(':') {
        server.to_string()
    } else {
        format!("{server}:4222")
    };
    address
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
}

/// Wall clock, µs since the epoch.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as i64
}

/// Today's date (UTC), `YYYY-MM-DD`.
fn today() -> String {
    let days = now_us() / 86_400_000_000;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// What every run needs.
struct Ctx {
    args: Args,
    /// The benchmark database.
    url: String,
    nats: String,
    next: Cell<u32>,
}

impl Ctx {
    fn id(&self) -> u32 {
        let n = self.next.get();
        self.next.set(n + 1);
        n
    }
}

async fn run(args: Args, nats: String) {
    println!("# sqlnotify relay benchmark");
    println!("date: {} (UTC)", today());
    println!("machine: {}", common::machine());
    // Other work on the machine moves every number here: say how busy it was.
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        println!("load average at start (1, 5, 15 min): {}", load.join(" "));
    }
    let pg = Pg::setup().await;
    let nats_version = async_nats::connect(nats.as_str())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to NATS at {nats}: {e}"))
        .server_info()
        .version;
    println!("NATS {nats_version} (JetStream, file storage), {nats}");
    println!(
        "mode: {} — {} s per run; one writer thread (own tokio runtime and connection); relay, \
         direct subscriptions and the JetStream worker run in this process",
        if args.quick { "--quick" } else { "full" },
        args.run_time().as_secs()
    );
    println!(
        "throughput: 1 writer × {THROUGHPUT_TXN_ROWS}-row txns, synchronous_commit=off; events/s \
         from the first commit until the last row was stored (relay) / received (direct); \
         latency: {LATENCY_TXN_ROWS}-row txns every {} ms, synchronous_commit=on; arrival − \
         writer send time (includes the commit; `after the commit ack` starts when the writer \
         got its commit back)",
        LATENCY_INTERVAL.as_millis()
    );
    let ctx = Ctx {
        args,
        url: pg.url.clone(),
        nats,
        next: Cell::new(0),
    };
    let mut table = Table::new(&[
        "scenario",
        "metric",
        "baseline (direct subscription)",
        "sqlnotify relay",
        "ratio",
        "details",
    ]);
    if ctx.args.wants(THROUGHPUT) {
        throughput(&ctx, &mut table).await;
    }
    if ctx.args.wants(LATENCY) {
        latency(&ctx, &mut table).await;
    }
    if ctx.args.wants(DRAIN) {
        drain(&ctx, &mut table).await;
    }
    println!();
    print!("{}", table.render());
    pg.teardown().await;
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e} (set SQLNOTIFY_TEST_PG_URL)"));
    actix_rt::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// The benchmark's own PostgreSQL database.
struct Pg {
    admin: Client,
    db_name: String,
    url: String,
}

impl Pg {
    /// Creates the database and prints the server's version and settings.
    async fn setup() -> Pg {
        let admin_url = std::env::var("SQLNOTIFY_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let admin = connect(&admin_url).await;
        remove_leftovers(&admin).await;
        let db_name = format!("{DB_PREFIX}{}", std::process::id());
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name} TEMPLATE template0"))
            .await
            .expect("create the benchmark database");
        let version: String = admin
            .query_one("SHOW server_version", &[])
            .await
            .expect("server version")
            .get(0);
        let mut settings = Vec::new();
        for name in ["synchronous_commit", "shared_buffers"] {
            let row = admin
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .expect("setting");
            settings.push(format!("{name}={}", row.get::<_, String>(0)));
        }
        println!(
            "PostgreSQL {version} ({}), loopback TCP",
            settings.join(", ")
        );
        Pg {
            url: with_dbname(&admin_url, &db_name),
            admin,
            db_name,
        }
    }

    async fn teardown(self) {
        self.admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db_name
            ))
            .await
            .expect("drop the benchmark database");
    }
}

/// Drops the databases of earlier runs that were killed before they could clean up (their
/// process is gone).
async fn remove_leftovers(admin: &Client) {
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'sqlnotify\\_bench\\_relay\\_%'",
            &[],
        )
        .await
        .unwrap_or_default();
    for row in rows {
        let name: String = row.get(0);
        let gone = name
            .strip_prefix(DB_PREFIX)
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
        if gone {
            eprintln!("dropping {name}, left over by a killed run");
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

/// Creates a run's table.
async fn create_table(ctx: &Ctx, table: &str) {
    connect(&ctx.url)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, sent_us bigint NOT NULL, payload text NOT NULL)"
        ))
        .await
        .expect("create table");
}

/// Drops a run's table and empties the journal, so that the next run starts alike.
async fn drop_table(ctx: &Ctx, table: &str) {
    connect(&ctx.url)
        .await
        .batch_execute(&format!(
            "DROP TABLE {table} CASCADE;
             DO $$ BEGIN
               IF to_regclass('sqlnotify.journal') IS NOT NULL THEN
                 TRUNCATE sqlnotify.journal, sqlnotify.overflow;
               END IF;
             END $$;"
        ))
        .await
        .expect("drop table");
}

fn watch(table: &str, capture: Capture) -> Watch {
    Watch::new(table, Operation::Insert)
        .extra_columns(["sent_us", "payload"])
        .tier(Tier::Durable)
        .capture(capture)
}

// ---------------------------------------------------------------------------------------------
// The writer thread

/// What the writer does.
#[derive(Debug, Clone, Copy)]
struct Load {
    txn_rows: u32,
    /// One transaction every so often; `None`: as fast as possible.
    interval: Option<Duration>,
    duration: Duration,
    /// `SET synchronous_commit = off`.
    async_commit: bool,
    /// How the watch captures the writer's rows.
    capture: Capture,
}

/// What the writer reports when done.
#[derive(Debug, Default)]
struct Report {
    /// Rows committed.
    committed: u64,
    /// Failed transactions.
    errors: u64,
    /// Wall clock (µs since the epoch) before the first and after the last commit.
    start_us: i64,
    end_us: i64,
    /// Commit round trip (send → committed) of each transaction, ms, sorted.
    commit_ms: Vec<f64>,
    /// Wall clock (µs) at which each committed transaction's commit came back, in order:
    /// transaction `k` holds ids `k × txn_rows ..`.
    ack_us: Vec<i64>,
    txn_rows: u32,
}

impl Report {
    fn rows_per_s(&self) -> f64 {
        self.committed as f64 / ((self.end_us - self.start_us) as f64 / 1e6).max(1e-6)
    }
}

/// A connected writer thread waiting for [`Writer::run`].
struct Writer {
    go: oneshot::Sender<()>,
    report: oneshot::Receiver<Report>,
    thread: JoinHandle<()>,
}

impl Writer {
    /// Starts the thread and waits until it is connected and its statement prepared.
    async fn start(url: &str, table: &str, load: Load) -> Writer {
        let (ready_tx, ready) = oneshot::channel();
        let (go, go_rx) = oneshot::channel();
        let (report_tx, report) = oneshot::channel();
        let (url, table) = (url.to_string(), table.to_string());
        let thread = std::thread::Builder::new()
            .name("bench-writer".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("writer runtime");
                rt.block_on(write(&url, &table, load, ready_tx, go_rx, report_tx));
            })
            .expect("start the writer thread");
        ready.await.expect("the writer failed to connect");
        Writer { go, report, thread }
    }

    /// Lets the writer go and waits for its report.
    async fn run(self) -> Report {
        let _ = self.go.send(());
        let report = self.report.await.expect("the writer failed");
        self.thread.join().expect("writer thread");
        report
    }
}

/// The writer thread's work: ids `0..`, each transaction one INSERT of `txn_rows` rows.
async fn write(
    url: &str,
    table: &str,
    load: Load,
    ready: oneshot::Sender<()>,
    go: oneshot::Receiver<()>,
    report_tx: oneshot::Sender<Report>,
) {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("writer: connect to PostgreSQL");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    if load.async_commit {
        client
            .batch_execute("SET synchronous_commit = off")
            .await
            .expect("writer: synchronous_commit");
    }
    let statement = client
        .prepare(&format!(
            "INSERT INTO {table} (id, sent_us, payload) SELECT g, $2, $3 \
             FROM pg_catalog.generate_series($1::bigint, $1::bigint + {}) g",
            load.txn_rows - 1
        ))
        .await
        .expect("writer: prepare");
    let payload: String = "0123456789abcdefghijklmnopqrstuvwxyz"
        .chars()
        .cycle()
        .take(PAYLOAD_BYTES)
        .collect();
    let _ = ready.send(());
    if go.await.is_err() {
        return;
    }
    let start = Instant::now();
    let until = start + load.duration;
    let mut report = Report {
        start_us: now_us(),
        txn_rows: load.txn_rows,
        ..Report::default()
    };
    let mut transactions: u32 = 0;
    loop {
        match load.interval {
            // Fixed rate: the n-th transaction is due at start + n × interval (a late one goes
            // at once, so the schedule catches up).
            Some(interval) => {
                let due = start + interval * transactions;
                if due >= until {
                    break;
                }
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await; // fixed-rate pacing
                }
            }
            None => {
                if Instant::now() >= until {
                    break;
                }
            }
        }
        transactions += 1;
        let id = report.committed as i64;
        let sent = now_us();
        match client.execute(&statement, &[&id, &sent, &payload]).await {
            Ok(_) => {
                let done = now_us();
                report.committed += u64::from(load.txn_rows);
                report.commit_ms.push((done - sent) as f64 / 1e3);
                report.ack_us.push(done);
            }
            Err(e) => {
                eprintln!("writer: {e}");
                report.errors += 1;
            }
        }
    }
    report.end_us = now_us();
    report.commit_ms.sort_by(f64::total_cmp);
    let _ = report_tx.send(report);
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// What arrived: by a direct subscription (actix thread) or the JetStream worker (its thread).
#[derive(Debug, Default)]
struct Recorder {
    /// How often each row id arrived.
    seen: Vec<u8>,
    unique: u64,
    duplicates: u64,
    /// Events without an id or send time.
    malformed: u64,
    /// Arrival − send time of each first arrival, µs.
    latency_us: Vec<i64>,
    /// (id, arrival time in µs since the epoch) of each first arrival.
    arrivals: Vec<(i64, i64)>,
    last_arrival_us: i64,
}

impl Recorder {
    fn record(&mut self, arrival_us: i64, id: Option<i64>, sent_us: Option<i64>) {
        let (Some(id), Some(sent_us)) = (id, sent_us) else {
            self.malformed += 1;
            return;
        };
        let n = usize::try_from(id).unwrap_or(0);
        if self.seen.len() <= n {
            self.seen.resize((n + 1).max(self.seen.len() * 2), 0);
        }
        self.seen[n] = self.seen[n].saturating_add(1);
        if self.seen[n] > 1 {
            self.duplicates += 1;
            return;
        }
        self.unique += 1;
        self.last_arrival_us = arrival_us;
        self.latency_us.push(arrival_us - sent_us);
        self.arrivals.push((id, arrival_us));
    }
}

type Shared = Arc<Mutex<Recorder>>;

/// Waits until `progress()` reaches `target`, gives up once it has not moved for `idle` or
/// after `cap`. Returns the wall clock (µs) at which it was last seen to move (or now, when
/// it had already reached the target).
async fn wait_for(target: u64, idle: Duration, cap: Duration, progress: impl Fn() -> u64) -> i64 {
    let started = Instant::now();
    let mut last = progress();
    let mut moved = Instant::now();
    let mut moved_us = now_us();
    while last < target && moved.elapsed() < idle && started.elapsed() < cap {
        tokio::time::sleep(Duration::from_millis(1)).await; // polling a counter, 1 ms grain
        let now = progress();
        if now != last {
            last = now;
            moved = Instant::now();
            moved_us = now_us();
        }
    }
    moved_us
}

/// A plain durable-tier notifier on `table` with a counting subscription: the baseline.
async fn direct(ctx: &Ctx, table: &str, shared: &Shared, capture: Capture) -> Notifier {
    let notifier = Notifier::builder(&ctx.url)
        .watch(watch(table, capture))
        .cleanup_on_stop(true)
        .start()
        .await
        .expect("start the notifier");
    let shared = shared.clone();
    notifier
        .subscribe_fn(Subscription::new(table, Operation::Insert), move |event| {
            let arrival = now_us();
            shared.lock().expect("recorder").record(
                arrival,
                event.id().as_i64(),
                event.get("sent_us").and_then(Value::as_i64),
            );
        })
        .await
        .expect("subscribe");
    notifier
}

/// A relay of `table` into a stream and subject prefix of its own, connected to NATS.
async fn relay(ctx: &Ctx, table: &str, n: u32, capture: Capture) -> Relay {
    let pid = std::process::id();
    let relay = Relay::builder(
        Notifier::builder(&ctx.url)
            .watch(watch(table, capture))
            .consumer(format!("bench-relay-{n}"))
            .cleanup_on_stop(true),
        &ctx.nats,
        format!("SQLNOTIFY_BENCH_RELAY_{pid}_{n}"),
    )
    .subject_prefix(format!("sqlnotifybench{pid}x{n}"))
    // Messages of a stream that a killed run left behind do not stay for a week.
    .max_age(Duration::from_secs(3600))
    .start()
    .await
    .expect("start the relay");
    let connected = wait_for(1, Duration::from_secs(30), Duration::from_secs(30), || {
        u64::from(relay.stats().connected)
    });
    connected.await;
    assert!(
        relay.stats().connected,
        "the relay did not connect to NATS at {} within 30 s: {:?}",
        ctx.nats,
        relay.stats()
    );
    relay
}

async fn jetstream(ctx: &Ctx) -> jetstream::Context {
    let client = async_nats::connect(ctx.nats.as_str())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to NATS at {}: {e}", ctx.nats));
    jetstream::new(client)
}

/// Stops the relay and deletes its stream; returns how many messages the stream held, and the
/// relay's final counters.
async fn finish_relay(ctx: &Ctx, relay: Relay) -> (u64, RelayStats) {
    relay.stop().await.expect("stop the relay");
    let stats = relay.stats();
    let js = jetstream(ctx).await;
    let mut stream = js.get_stream(relay.stream()).await.expect("the stream");
    let messages = stream.info().await.expect("stream info").state.messages;
    js.delete_stream(relay.stream())
        .await
        .expect("delete the stream");
    (messages, stats)
}

/// A JetStream worker on a thread of its own: a pull consumer reading the stream from its
/// start, acknowledging each message, recording arrival − `columns.sent_us`.
struct Worker {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Worker {
    /// Starts the worker and waits until its consumer is reading.
    async fn start(nats: &str, stream: &str, shared: &Shared) -> Worker {
        let (ready_tx, ready) = oneshot::channel();
        let (stop, mut stop_rx) = oneshot::channel::<()>();
        let (nats, stream, shared) = (nats.to_string(), stream.to_string(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("bench-worker".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("worker runtime");
                rt.block_on(async move {
                    let client = async_nats::connect(nats.as_str())
                        .await
                        .expect("worker: connect to NATS");
                    let js = jetstream::new(client);
                    let consumer = js
                        .get_stream(&stream)
                        .await
                        .expect("worker: the stream")
                        .create_consumer(pull::Config {
                            deliver_policy: DeliverPolicy::All,
                            ack_policy: AckPolicy::Explicit,
                            inactive_threshold: Duration::from_secs(60),
                            ..Default::default()
                        })
                        .await
                        .expect("worker: a consumer");
                    let mut messages = consumer.messages().await.expect("worker: messages");
                    let _ = ready_tx.send(());
                    loop {
                        tokio::select! {
                            biased;
                            _ = &mut stop_rx => break,
                            message = messages.next() => match message {
                                Some(Ok(message)) => {
                                    let arrival = now_us();
                                    let body: Value =
                                        serde_json::from_slice(&message.payload).unwrap_or_default();
                                    shared.lock().expect("recorder").record(
                                        arrival,
                                        body["id"].as_i64(),
                                        body["columns"]["sent_us"].as_i64(),
                                    );
                                    if let Err(e) = message.ack().await {
                                        eprintln!("worker: ack: {e}");
                                    }
                                }
                                Some(Err(e)) => eprintln!("worker: {e}"),
                                None => break,
                            },
                        }
                    }
                });
            })
            .expect("start the worker thread");
        ready.await.expect("the worker failed to start");
        Worker { stop, thread }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        self.thread.join().expect("worker thread");
    }
}

// ---------------------------------------------------------------------------------------------
// Runs

/// What one run measured.
#[derive(Debug, Default)]
struct Outcome {
    report: Report,
    /// Distinct rows received (direct, worker) or messages stored (relay throughput).
    received: u64,
    duplicates: u64,
    malformed: u64,
    /// Events per second from the first commit to the last arrival / store.
    rate: f64,
    /// From the last commit to the last arrival / store, ms.
    lag_ms: f64,
    /// Arrival − send time, ms, sorted.
    latency: Vec<f64>,
    /// Arrival − the time the writer got the row's commit back, ms, sorted (negative when the
    /// event arrived first).
    after_commit: Vec<f64>,
    /// Relay runs: messages the stream held at the end, and the relay's counters.
    stream_messages: Option<u64>,
    relay: Option<RelayStats>,
}

impl Outcome {
    fn new(report: Report, received: u64, done_us: i64) -> Outcome {
        Outcome {
            received,
            rate: received as f64 / ((done_us - report.start_us) as f64 / 1e6).max(1e-6),
            lag_ms: (done_us - report.end_us).max(0) as f64 / 1e3,
            report,
            ..Outcome::default()
        }
    }

    /// With what a recorder saw.
    fn with_recorder(report: Report, shared: &Shared) -> Outcome {
        let rec = shared.lock().expect("recorder");
        let mut out = Outcome::new(report, rec.unique, rec.last_arrival_us);
        out.duplicates = rec.duplicates;
        out.malformed = rec.malformed;
        out.latency = rec.latency_us.iter().map(|&us| us as f64 / 1e3).collect();
        out.latency.sort_by(f64::total_cmp);
        let txn_rows = i64::from(out.report.txn_rows.max(1));
        out.after_commit = rec
            .arrivals
            .iter()
            .filter_map(|&(id, arrival)| {
                let txn = usize::try_from(id / txn_rows).ok()?;
                let ack = *out.report.ack_us.get(txn)?;
                Some((arrival - ack) as f64 / 1e3)
            })
            .collect();
        out.after_commit.sort_by(f64::total_cmp);
        out
    }

    fn p(&self, q: f64) -> f64 {
        percentile(&self.latency, q)
    }

    fn max(&self) -> f64 {
        self.latency.last().copied().unwrap_or(f64::NAN)
    }

    /// "lost 0 dup 0 of 20,000" (plus the stream's count and the relay's counters).
    fn losses(&self) -> String {
        let committed = self.report.committed;
        let mut s = format!(
            "lost {} dup {} of {}",
            count(committed.saturating_sub(self.received) as f64),
            count(self.duplicates as f64),
            count(committed as f64)
        );
        if self.malformed > 0 {
            s.push_str(&format!(", {} malformed", self.malformed));
        }
        if self.report.errors > 0 {
            s.push_str(&format!(", {} failed txns", self.report.errors));
        }
        if let Some(messages) = self.stream_messages {
            s.push_str(&format!("; stream holds {}", count(messages as f64)));
        }
        if let Some(stats) = self.relay {
            s.push_str(&format!(
                "; relay published {}, duplicates dropped {}, NATS connections {}, failures {}",
                count(stats.published as f64),
                count(stats.duplicates as f64),
                stats.connections,
                stats.failures
            ));
        }
        s
    }
}

/// Direct subscription on `load`: the baseline of both sections.
async fn run_direct(ctx: &Ctx, load: Load) -> Outcome {
    let table = format!("relay_bench_{}", ctx.id());
    create_table(ctx, &table).await;
    let shared = Shared::default();
    let notifier = direct(ctx, &table, &shared, load.capture).await;
    let report = Writer::start(&ctx.url, &table, load).await.run().await;
    let (idle, cap) = ctx.args.waits();
    wait_for(report.committed, idle, cap, || {
        shared.lock().expect("recorder").unique
    })
    .await;
    notifier.stop().await.expect("stop the notifier");
    drop_table(ctx, &table).await;
    Outcome::with_recorder(report, &shared)
}

/// The relay on `load`, counting what the stream stored.
async fn run_relay_throughput(ctx: &Ctx, load: Load) -> Outcome {
    let n = ctx.id();
    let table = format!("relay_bench_{n}");
    create_table(ctx, &table).await;
    let relay = relay(ctx, &table, n, load.capture).await;
    let report = Writer::start(&ctx.url, &table, load).await.run().await;
    let (idle, cap) = ctx.args.waits();
    let stored_us = wait_for(report.committed, idle, cap, || relay.stats().published).await;
    let stored = relay.stats().published;
    let (messages, stats) = finish_relay(ctx, relay).await;
    drop_table(ctx, &table).await;
    let mut out = Outcome::new(report, stored, stored_us);
    out.stream_messages = Some(messages);
    out.relay = Some(stats);
    out
}

/// The relay on `load`, with a worker reading the stream.
async fn run_relay_latency(ctx: &Ctx, load: Load) -> Outcome {
    let n = ctx.id();
    let table = format!("relay_bench_{n}");
    create_table(ctx, &table).await;
    let relay = relay(ctx, &table, n, load.capture).await;
    let shared = Shared::default();
    let worker = Worker::start(&ctx.nats, relay.stream(), &shared).await;
    let report = Writer::start(&ctx.url, &table, load).await.run().await;
    let (idle, cap) = ctx.args.waits();
    wait_for(report.committed, idle, cap, || {
        shared.lock().expect("recorder").unique
    })
    .await;
    worker.stop();
    let (messages, stats) = finish_relay(ctx, relay).await;
    drop_table(ctx, &table).await;
    let mut out = Outcome::with_recorder(report, &shared);
    out.stream_messages = Some(messages);
    out.relay = Some(stats);
    out
}

async fn throughput(ctx: &Ctx, table: &mut Table) {
    // Row capture is what most watches use; statement capture takes the trigger's cost off
    // the writer, so the relay rather than the writer sets the pace.
    for capture in [Capture::Row, Capture::Statement] {
        throughput_with(ctx, table, capture).await;
    }
}

async fn throughput_with(ctx: &Ctx, table: &mut Table, capture: Capture) {
    let load = Load {
        txn_rows: THROUGHPUT_TXN_ROWS,
        interval: None,
        duration: ctx.args.run_time(),
        async_commit: true,
        capture,
    };
    let capture_name = match capture {
        Capture::Row => "row capture",
        _ => "statement capture",
    };
    eprintln!("relay throughput ({capture_name}): direct subscription …");
    let base = run_direct(ctx, load).await;
    eprintln!("relay throughput ({capture_name}): relay …");
    let relay = run_relay_throughput(ctx, load).await;
    let goal = if relay.rate >= GOAL_EVENTS_PER_S {
        "met"
    } else {
        "NOT met"
    };
    // Caught up within 100 ms of the last commit: the writer set the pace, so the rate is a
    // floor of what the relay can store, not its ceiling.
    let bound = if relay.lag_ms < 100.0 {
        " (writer-bound: the relay kept up)"
    } else {
        ""
    };
    table.row(vec![
        format!(
            "relay throughput · 1 writer × {THROUGHPUT_TXN_ROWS}-row txns, {PAYLOAD_BYTES} B payload, \
             {capture_name} · relay into a JetStream stream (stored) vs direct subscription (received)"
        ),
        "events/s".into(),
        count(base.rate),
        count(relay.rate),
        ratio(relay.rate, base.rate),
        format!(
            "goal ≥ {} ev/s stored: {goal}{bound} · writer committed {} rows/s (direct run {}) · lag after \
             the last commit {} ms (direct {}) · {} (direct: {})",
            count(GOAL_EVENTS_PER_S),
            count(relay.report.rows_per_s()),
            count(base.report.rows_per_s()),
            ms(relay.lag_ms),
            ms(base.lag_ms),
            relay.losses(),
            base.losses()
        ),
    ]);
}

async fn latency(ctx: &Ctx, table: &mut Table) {
    let load = Load {
        txn_rows: LATENCY_TXN_ROWS,
        interval: Some(LATENCY_INTERVAL),
        duration: ctx.args.run_time(),
        async_commit: false,
        capture: Capture::Row,
    };
    let rate = f64::from(LATENCY_TXN_ROWS) / LATENCY_INTERVAL.as_secs_f64();
    eprintln!("relay latency: direct subscription …");
    let base = run_direct(ctx, load).await;
    eprintln!("relay latency: relay + JetStream worker …");
    let relay = run_relay_latency(ctx, load).await;
    let verdict = |p99: f64| if p99 <= GOAL_P99_MS { "met" } else { "NOT met" };
    // The headline counts the commit's own flush; say how the part after it fares too.
    let goal = format!(
        "{} (after the commit ack: {})",
        verdict(relay.p(99.0)),
        verdict(percentile(&relay.after_commit, 99.0))
    );
    let pair = |o: &Outcome| format!("{} / {}", ms(o.p(50.0)), ms(o.p(99.0)));
    table.row(vec![
        format!(
            "relay latency {} rows/s ({LATENCY_TXN_ROWS}-row txns every {} ms) · commit → \
             JetStream ack → worker (pull consumer) vs direct subscription",
            count(rate),
            LATENCY_INTERVAL.as_millis()
        ),
        "p50 / p99 ms".into(),
        pair(&base),
        pair(&relay),
        format!(
            "{} / {}",
            ratio(relay.p(50.0), base.p(50.0)),
            ratio(relay.p(99.0), base.p(99.0))
        ),
        format!(
            "goal p99 ≤ {} ms: {goal} · p95 {} (direct {}) · max {} (direct {}) · after the \
             commit ack p50/p99 {}/{} (direct {}/{}) · writer {} rows/s, commit p50/p99 {}/{} ms \
             (direct run {} rows/s, {}/{}) · {} (direct: {})",
            GOAL_P99_MS,
            ms(relay.p(95.0)),
            ms(base.p(95.0)),
            ms(relay.max()),
            ms(base.max()),
            ms(percentile(&relay.after_commit, 50.0)),
            ms(percentile(&relay.after_commit, 99.0)),
            ms(percentile(&base.after_commit, 50.0)),
            ms(percentile(&base.after_commit, 99.0)),
            count(relay.report.rows_per_s()),
            ms(percentile(&relay.report.commit_ms, 50.0)),
            ms(percentile(&relay.report.commit_ms, 99.0)),
            count(base.report.rows_per_s()),
            ms(percentile(&base.report.commit_ms, 50.0)),
            ms(percentile(&base.report.commit_ms, 99.0)),
            relay.losses(),
            base.losses()
        ),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Drain: the relay's own ceiling, with no writer setting the pace

/// Rows in the journal before the drain starts.
fn drain_rows(ctx: &Ctx) -> u64 {
    if ctx.args.quick {
        100_000
    } else {
        300_000
    }
}

/// A named consumer registered on `table` (started and stopped, triggers kept), so that it
/// will read everything written from now on.
async fn register(ctx: &Ctx, table: &str, consumer: &str) {
    let notifier = Notifier::builder(&ctx.url)
        .watch(watch(table, Capture::Row))
        .consumer(consumer)
        .start()
        .await
        .expect("register the consumer");
    notifier.stop().await.expect("stop");
}

/// Both consumers registered, `rows` rows committed in 10,000-row statements while neither
/// runs; then each drains the backlog alone: the direct subscription, then the relay.
async fn drain(ctx: &Ctx, table: &mut Table) {
    let rows = drain_rows(ctx);
    let n = ctx.id();
    let name = format!("relay_drain_{n}");
    create_table(ctx, &name).await;
    let direct_consumer = format!("bench-drain-direct-{n}");
    let relay_consumer = format!("bench-drain-relay-{n}");
    register(ctx, &name, &direct_consumer).await;
    register(ctx, &name, &relay_consumer).await;
    eprintln!("relay drain: writing {rows} rows …");
    let client = connect(&ctx.url).await;
    let mut written = 0u64;
    while written < rows {
        let upto = (written + 10_000).min(rows);
        client
            .execute(
                &format!(
                    "INSERT INTO {name} (id, sent_us, payload) \
                     SELECT g, 0, 'p' FROM generate_series($1::bigint, $2::bigint) g"
                ),
                &[&(written as i64 + 1), &(upto as i64)],
            )
            .await
            .expect("write the backlog");
        written = upto;
    }
    let (idle, cap) = ctx.args.waits();

    eprintln!("relay drain: direct subscription …");
    let received = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let counter = received.clone();
    // A named consumer reads nothing before its first subscription: none is missed.
    let notifier = Notifier::builder(&ctx.url)
        .watch(watch(&name, Capture::Row))
        .consumer(&direct_consumer)
        .start()
        .await
        .expect("start the direct consumer");
    notifier
        .subscribe_fn(Subscription::new(&name, Operation::Insert), move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .await
        .expect("subscribe");
    wait_for(rows, idle, cap, || received.load(Ordering::Relaxed)).await;
    let direct_s = started.elapsed().as_secs_f64();
    let direct_got = received.load(Ordering::Relaxed);
    notifier.stop().await.expect("stop");

    eprintln!("relay drain: relay …");
    let pid = std::process::id();
    let started = Instant::now();
    let relay = Relay::builder(
        Notifier::builder(&ctx.url)
            .watch(watch(&name, Capture::Row))
            .consumer(&relay_consumer)
            .cleanup_on_stop(true),
        &ctx.nats,
        format!("SQLNOTIFY_BENCH_DRAIN_{pid}_{n}"),
    )
    .subject_prefix(format!("sqlnotifydrain{pid}x{n}"))
    .max_age(Duration::from_secs(3600))
    .start()
    .await
    .expect("start the relay");
    wait_for(rows, idle, cap, || relay.stats().published).await;
    let relay_s = started.elapsed().as_secs_f64();
    let (stored, stats) = finish_relay(ctx, relay).await;
    drop_table(ctx, &name).await;

    eprintln!("relay drain: raw async-nats publishing …");
    let (raw_rate, raw_stored) = raw_publish(ctx, rows, n).await;

    let direct_rate = direct_got as f64 / direct_s;
    let relay_rate = stats.published as f64 / relay_s;
    table.row(vec![
        format!(
            "relay drain · a backlog of {} journal rows, read from a standing start by a named \
             consumer: relay into a JetStream stream (stored) vs direct subscription (received)",
            count(rows as f64)
        ),
        "events/s".into(),
        count(direct_rate),
        count(relay_rate),
        ratio(relay_rate, direct_rate),
        format!(
            "goal ≥ {} ev/s stored: {} · the broker's ceiling here: a raw async-nats loop \
             publishing {} same-size messages with ids, 4,096 acks outstanding, stored {} ev/s \
             (relay {}) · direct got {direct_got} in {direct_s:.2} s; relay published {} in \
             {relay_s:.2} s, stream holds {stored}, duplicates {}, failures {}",
            count(GOAL_EVENTS_PER_S),
            if relay_rate >= GOAL_EVENTS_PER_S {
                "met"
            } else {
                "NOT met"
            },
            count(raw_stored as f64),
            count(raw_rate),
            ratio(relay_rate, raw_rate),
            stats.published,
            stats.duplicates,
            stats.failures
        ),
    ]);
}

/// The broker's own ceiling: `rows` messages like the relay's (a ~230-byte JSON body, an id
/// and five headers) published by a bare async-nats loop with up to 4,096 acks outstanding
/// into a stream of its own. Returns (stored/s, stored).
async fn raw_publish(ctx: &Ctx, rows: u64, n: u32) -> (f64, u64) {
    let pid = std::process::id();
    let name = format!("SQLNOTIFY_BENCH_RAW_{pid}_{n}");
    let prefix = format!("sqlnotifyraw{pid}x{n}");
    let js = jetstream(ctx).await;
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::from_secs(3600),
        ..Default::default()
    })
    .await
    .expect("create the raw stream");
    let body = bytes::Bytes::from_static(
        br#"{"channel":"sqlnotify_public_t_insert","schema":"public","table":"t","operation":"insert","id":1,"columns":{"sent_us":0,"payload":"p"},"sequence":1,"truncated":false}"#,
    );
    let subject = format!("{prefix}.public.t.insert");
    let started = Instant::now();
    let mut pending = futures_util::stream::FuturesOrdered::new();
    let mut stored = 0u64;
    for i in 0..rows {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("raw:{i}:0").as_str());
        for (name, value) in [
            ("Sqlnotify-Sequence", i.to_string()),
            ("Sqlnotify-Part", "0".to_string()),
            ("Sqlnotify-Table", "public.t".to_string()),
            ("Sqlnotify-Operation", "insert".to_string()),
            ("Sqlnotify-Key", i.to_string()),
        ] {
            headers.insert(name, value.as_str());
        }
        let ack = js
            .publish_with_headers(subject.clone(), headers, body.clone())
            .await
            .expect("publish");
        pending.push_back(std::future::IntoFuture::into_future(ack));
        if pending.len() >= 4096 {
            pending.next().await.expect("one").expect("stored");
            stored += 1;
        }
    }
    while let Some(ack) = pending.next().await {
        ack.expect("stored");
        stored += 1;
    }
    let rate = stored as f64 / started.elapsed().as_secs_f64();
    js.delete_stream(&name)
        .await
        .expect("delete the raw stream");
    (rate, stored)
}
