//! End-to-end benchmark of the server-sent-events endpoint (`sqlnotify::web`, feature `web`):
//! thousands of SSE clients on loopback, rows committed into SQLite, and how long a row takes
//! from its commit to the client it is addressed to — with the server's CPU and memory.
//!
//! Three processes' worth of work in two processes:
//!
//! * **The server** is this binary re-executed with `SQLNOTIFY_BENCH_SSE_SERVER` set (see
//!   [`server`]): a SQLite notifier watching the table's inserts (the journal, with `user_id`
//!   carried as an extra column) and an actix-web `HttpServer` (default workers: one per core)
//!   with two `Sse` endpoints. `/user` authorizes each request by its `x-user-id: i` header and
//!   grants `Subscription::new(table, Insert).filter(Filter::eq("user_id", i))` (the registry's
//!   routing index finds the one subscriber of an event without looking at the others); `/all`
//!   grants the unfiltered subscription. Being a process of its own, its CPU time
//!   (`/proc/PID/stat` utime + stime, every thread) and memory (`VmRSS`, `VmHWM` of
//!   `/proc/PID/status`) are the server's alone; a fresh server and SQLite file per scenario.
//! * **The load generator and the writer** are this process. Clients are raw tokio
//!   `TcpStream`s on two threads with a current-thread runtime each: a hand-written
//!   `GET` with the `x-user-id` header, the response's chunked encoding and the SSE frames
//!   parsed by hand, each event's `data:` decoded with serde_json (its row id, and its
//!   `user_id`, checked against the client's own). At most 128 connections per thread are
//!   being opened at a time; a client counts as connected once its stream's `retry:` frame
//!   arrived, i.e. once the server has made its subscription. The writer is a thread with its
//!   own rusqlite connection committing one single-row transaction per row at a fixed rate
//!   (SQLite's defaults: WAL as the notifier sets it, `synchronous=FULL`); it records, by row
//!   id, the instant just before the `INSERT` and the instant its commit returned. Clients
//!   record the instant each event arrived; *commit → client* is arrival − commit return (it
//!   can be negative: an event may overtake the commit's return), *send → client* arrival −
//!   send (it includes the commit).
//!
//! Scenarios (sections for `--only`; `--only=sse` selects all):
//!
//! * `sse-user`: 1,000 rows/s, each addressed to one connected client chosen at random.
//! * `sse-all-2`, `sse-all-10`: every client receives every row, at 2 and 10 rows/s (10,000
//!   clients: 20,000 and 100,000 deliveries/s).
//!
//! Each scenario: start the server; sample it; connect every client (bounded: 60 s); sample; an
//! idle second (2 s in a full run) with every client connected, for the idle CPU (heartbeats
//! every 15 s, the default); write for the run time (10 s, 2 s with `--quick`) and sample at
//! its start and end; wait until every expected event arrived (or nothing arrived for a while,
//! bounded; then the missing ones are reported); stop the clients and the server, which prints
//! its endpoint's counters. Besides the latency percentiles over every delivery: per row, the
//! commit → its last client (how long a row's fan-out takes), the server's CPU per delivery
//! above its idle CPU, and its memory per connected client. Nothing is asserted: numbers are
//! printed, as a markdown table.
//!
//! Run: `cargo bench --features web --bench sse -- [--quick] [--clients=N] [--only=…]`
//! (default 10,000 clients, 2,000 with `--quick`). The process needs a file descriptor per
//! client (`ulimit -n`; checked before it starts).

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

use common::{count, ms, percentile, Args, Table};

/// The scenarios, for `--only`.
const SECTIONS: [&str; 3] = ["sse-user", "sse-all-2", "sse-all-10"];
/// Set (to the SQLite file's path) in the server process.
const SERVER_ENV: &str = "SQLNOTIFY_BENCH_SSE_SERVER";
/// The watched table.
const TABLE: &str = "messages";
/// Threads of the load generator, each with a current-thread tokio runtime.
const LOAD_THREADS: usize = 2;
/// Connections being opened at once, per load-generator thread.
const CONNECTING: usize = 128;
/// The longest the clients may take to connect.
const CONNECT_WITHIN: Duration = Duration::from_secs(60);
/// File descriptors the process needs besides its clients'.
const SPARE_FDS: u64 = 256;

fn main() {
    if let Ok(db) = std::env::var(SERVER_ENV) {
        server::main(&db);
        return;
    }
    let args = Args::parse();
    if !common::refuse_unless_bench(&args, "sse") {
        return;
    }
    let _ = env_logger::builder().is_test(false).try_init();
    let clients = std::env::args()
        .find_map(|a| a.strip_prefix("--clients=").and_then(|n| n.parse().ok()))
        .unwrap_or(if args.quick { 2_000 } else { 10_000 });
    if let Some(limit) = open_files_limit() {
        if (clients as u64) + SPARE_FDS > limit {
            eprintln!(
                "sse: {clients} clients need about {} file descriptors, the limit is {limit}: \
                 raise it (`ulimit -n`) or pass fewer --clients=N",
                clients as u64 + SPARE_FDS
            );
            return;
        }
    }
    let run_time = args.run_time();
    if !SECTIONS.iter().any(|s| args.wants(s)) {
        println!(
            "sse: no section selected (sections: {})",
            SECTIONS.join(", ")
        );
        return;
    }
    let scenarios = [
        Scenario {
            name: SECTIONS[0],
            fan_out: FanOut::PerUser,
            rate: 1_000,
        },
        Scenario {
            name: SECTIONS[1],
            fan_out: FanOut::Everyone,
            rate: 2,
        },
        Scenario {
            name: SECTIONS[2],
            fan_out: FanOut::Everyone,
            rate: 10,
        },
    ];
    let started = Instant::now();
    println!(
        "SSE fan-out benchmark: {} clients on loopback, {} s of writing per scenario; {}; load average {}",
        count(clients as f64),
        run_time.as_secs(),
        common::machine(),
        load_average()
    );
    let mut table = Table::new(&[
        "scenario",
        "deliveries/s",
        "commit → client p50 / p99 / max (ms)",
        "delivered / expected",
        "server CPU while writing",
        "server RSS",
        "details",
    ]);
    for scenario in scenarios.iter().filter(|s| args.wants(s.name)) {
        eprintln!("sse: {} …", scenario.label(clients));
        match run(&args, scenario, clients, run_time) {
            Ok(row) => table.row(row),
            Err(e) => eprintln!("sse: {} failed: {e}", scenario.name),
        }
    }
    println!("\n{}", table.render());
    println!(
        "({:.0} s in all; load average {})",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}

/// The 1, 5 and 15 minute load averages (/proc/loadavg): how busy the shared machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The soft limit on open files (`Max open files` of /proc/self/limits).
fn open_files_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Who gets a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FanOut {
    /// The one client whose `user_id` it carries (`/user`).
    PerUser,
    /// Every client (`/all`).
    Everyone,
}

impl FanOut {
    fn path(self) -> &'static str {
        match self {
            FanOut::PerUser => "/user",
            FanOut::Everyone => "/all",
        }
    }
}

struct Scenario {
    name: &'static str,
    fan_out: FanOut,
    /// Rows per second, one transaction each.
    rate: u32,
}

impl Scenario {
    fn label(&self, clients: usize) -> String {
        match self.fan_out {
            FanOut::PerUser => format!(
                "{} · {} clients, {} rows/s, each row to one client (eq(user_id) filter)",
                self.name,
                count(clients as f64),
                count(f64::from(self.rate))
            ),
            FanOut::Everyone => format!(
                "{} · {} clients, {} rows/s, every row to every client",
                self.name,
                count(clients as f64),
                self.rate
            ),
        }
    }
}

/// The server's CPU time and memory at one instant.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    cpu: Duration,
    rss_kb: u64,
    hwm_kb: u64,
}

impl Sample {
    fn of(pid: &str) -> Sample {
        Sample {
            at: Instant::now(),
            cpu: common::cpu_time_of(pid),
            rss_kb: common::proc_status_kb_of(pid, "VmRSS"),
            hwm_kb: common::proc_status_kb_of(pid, "VmHWM"),
        }
    }

    /// CPU used between `self` and `later`, in % of one core.
    fn cpu_pct(&self, later: &Sample) -> f64 {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        if wall <= 0.0 {
            return f64::NAN;
        }
        later.cpu.saturating_sub(self.cpu).as_secs_f64() / wall * 100.0
    }
}

/// One scenario, start to end: the table row.
fn run(
    args: &Args,
    scenario: &Scenario,
    clients: usize,
    run_time: Duration,
) -> Result<Vec<String>, String> {
    let dir = std::env::temp_dir().join(format!(
        "sqlnotify-bench-sse-{}-{}",
        std::process::id(),
        scenario.name
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_in(args, scenario, clients, run_time, &dir.join("app.db"));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(
    args: &Args,
    scenario: &Scenario,
    clients: usize,
    run_time: Duration,
    db: &Path,
) -> Result<Vec<String>, String> {
    {
        let conn = rusqlite::Connection::open(db).map_err(|e| e.to_string())?;
        conn.execute_batch(&format!(
            "CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, body TEXT NOT NULL)"
        ))
        .map_err(|e| e.to_string())?;
    }
    let mut server = Server::start(db)?;
    let pid = server.child.id().to_string();
    let before = Sample::of(&pid);

    // Connect every client.
    let load = LoadGenerator::start(server.port, clients, scenario.fan_out);
    let connect_started = Instant::now();
    while load.shared.connected.load(Ordering::Relaxed) + load.shared.failed.load(Ordering::Relaxed)
        < clients as u64
        && connect_started.elapsed() < CONNECT_WITHIN + Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20)); // polling a counter, bounded
    }
    let connect_time = connect_started.elapsed();
    let connected_users: Vec<u32> = load
        .shared
        .connected_flags
        .iter()
        .enumerate()
        .filter(|(_, f)| f.load(Ordering::Relaxed))
        .map(|(i, _)| i as u32)
        .collect();
    let connected = connected_users.len();
    let after_connect = Sample::of(&pid);
    eprintln!(
        "  {connected} of {clients} clients connected in {:.2} s; server RSS {} → {} kB",
        connect_time.as_secs_f64(),
        count(before.rss_kb as f64),
        count(after_connect.rss_kb as f64)
    );
    if connected == 0 {
        load.stop();
        server.stop();
        return Err("no client connected".into());
    }

    // Idle, every client connected.
    std::thread::sleep(if args.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(2)
    }); // a measuring window, not a synchronisation
    let idle_end = Sample::of(&pid);

    // Write.
    let write_start = Sample::of(&pid);
    let own_cpu_start = common::cpu_time();
    let writer = {
        let db = db.to_path_buf();
        let base = load.shared.base;
        let rate = scenario.rate;
        std::thread::spawn(move || write(&db, rate, run_time, &connected_users, base))
    };
    let written = writer.join().map_err(|_| "the writer panicked")??;
    let write_end = Sample::of(&pid);
    let own_cpu = common::cpu_time().saturating_sub(own_cpu_start);
    let write_wall = write_end.at.duration_since(write_start.at);

    // Wait for the events.
    let committed = written.committed();
    let expected = match scenario.fan_out {
        FanOut::PerUser => committed,
        FanOut::Everyone => committed * connected as u64,
    };
    let (quiet, at_most) = args.waits();
    let wait_started = Instant::now();
    let mut last = load.shared.received.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    loop {
        let now = load.shared.received.load(Ordering::Relaxed);
        if now >= expected || last_change.elapsed() >= quiet || wait_started.elapsed() >= at_most {
            break;
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10)); // polling a counter, bounded
    }
    let drained = Sample::of(&pid);
    let outcomes = load.stop();
    let stats = server.stop();

    // Latencies and counts.
    let mut after_commit = Vec::new();
    let mut after_send = Vec::new();
    let (mut received, mut duplicates, mut misrouted, mut notices, mut closed) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut last_arrival = 0u64;
    // Per row: its last arrival at any client (every client's, with `/all`).
    let mut row_last = vec![0u64; written.commit_ns.len()];
    for outcome in &outcomes {
        received += outcome.arrivals.len() as u64;
        misrouted += outcome.misrouted;
        notices += outcome.notices;
        closed += u64::from(outcome.closed_early);
        let mut newest = 0u32;
        for &(id, at) in &outcome.arrivals {
            if id <= newest {
                duplicates += 1;
            }
            newest = newest.max(id);
            last_arrival = last_arrival.max(at);
            if let Some(last) = row_last.get_mut(id as usize) {
                *last = (*last).max(at);
            }
            let (Some(&sent), Some(&commit)) = (
                written.sent_ns.get(id as usize),
                written.commit_ns.get(id as usize),
            ) else {
                continue;
            };
            if commit == 0 {
                continue;
            }
            after_commit.push((at as f64 - commit as f64) / 1e6);
            after_send.push((at as f64 - sent as f64) / 1e6);
        }
    }
    after_commit.sort_by(f64::total_cmp);
    after_send.sort_by(f64::total_cmp);
    // Commit → the row's last client, per row (with `/all`: how long one row's fan-out takes).
    let mut fan_out_ms: Vec<f64> = row_last
        .iter()
        .zip(&written.commit_ns)
        .filter(|(&last, &commit)| last > 0 && commit > 0)
        .map(|(&last, &commit)| (last as f64 - commit as f64) / 1e6)
        .collect();
    fan_out_ms.sort_by(f64::total_cmp);
    let unique = received - duplicates;
    let missing = expected.saturating_sub(unique);
    let first_commit = written
        .commit_ns
        .iter()
        .copied()
        .find(|&c| c > 0)
        .unwrap_or(0);
    // From the first commit to the last arrival, but at least the writing time: a client
    // that keeps up gets `rate × its share` per second, whenever the last row happens to land.
    let nominal_s = committed as f64 / f64::from(scenario.rate);
    let span_s = ((last_arrival.saturating_sub(first_commit)) as f64 / 1e9).max(nominal_s);
    let deliveries_per_s = if span_s > 0.0 {
        unique as f64 / span_s
    } else {
        f64::NAN
    };
    let mut commits = written.commit_ms.clone();
    commits.sort_by(f64::total_cmp);
    let grew_kb = after_connect.rss_kb.saturating_sub(before.rss_kb);
    let p = |v: &[f64], q: f64| ms(percentile(v, q));
    let max = |v: &[f64]| v.last().map_or("—".into(), |&m| ms(m));

    let idle_pct = after_connect.cpu_pct(&idle_end);
    let mut details = vec![
        format!(
            "{} of {} clients connected in {:.2} s",
            count(connected as f64),
            count(clients as f64),
            connect_time.as_secs_f64()
        ),
        format!(
            "{} rows committed at {} rows/s (commit p50/p99 {} / {} ms)",
            count(committed as f64),
            count(f64::from(scenario.rate)),
            p(&commits, 50.0),
            p(&commits, 99.0)
        ),
        format!(
            "send → client (includes the commit) p50/p99 {} / {} ms",
            p(&after_send, 50.0),
            p(&after_send, 99.0)
        ),
        format!("server CPU idle with every client connected {idle_pct:.1}%"),
        format!(
            "connecting: {:.0}% of a core over {:.2} s, {:.0} µs of server CPU per connection",
            before.cpu_pct(&after_connect),
            connect_time.as_secs_f64(),
            after_connect.cpu.saturating_sub(before.cpu).as_secs_f64() * 1e6 / connected as f64
        ),
        format!(
            "server RSS {} kB before connecting, +{} kB with the clients ({:.1} kB per client), {} kB after the run, VmHWM {} kB",
            count(before.rss_kb as f64),
            count(grew_kb as f64),
            grew_kb as f64 / connected as f64,
            count(drained.rss_kb as f64),
            count(drained.hwm_kb as f64)
        ),
        format!(
            "load generator + writer process CPU {:.0}% while writing",
            own_cpu.as_secs_f64() / write_wall.as_secs_f64() * 100.0
        ),
        format!(
            "duplicates {duplicates}, misrouted {misrouted}, lag/reset notices {notices}, streams closed early {closed}"
        ),
    ];
    if unique > 0 {
        details.insert(
            2,
            format!(
                "server CPU per delivery {:.1} µs (while writing, above its idle CPU)",
                (write_end.cpu.saturating_sub(write_start.cpu).as_secs_f64()
                    - idle_pct / 100.0 * write_wall.as_secs_f64())
                .max(0.0)
                    * 1e6
                    / unique as f64
            ),
        );
    }
    if scenario.fan_out == FanOut::Everyone {
        details.insert(
            2,
            format!(
                "commit → a row's last client p50/p99 {} / {} ms",
                p(&fan_out_ms, 50.0),
                p(&fan_out_ms, 99.0)
            ),
        );
    }
    if let Some(stats) = stats {
        details.push(format!("server: {stats}"));
    }
    if written.errors > 0 {
        details.push(format!("writer errors {}", written.errors));
    }
    Ok(vec![
        scenario.label(clients),
        count(deliveries_per_s),
        format!(
            "{} / {} / {}",
            p(&after_commit, 50.0),
            p(&after_commit, 99.0),
            max(&after_commit)
        ),
        format!(
            "{} / {} (missing {})",
            count(unique as f64),
            count(expected as f64),
            count(missing as f64)
        ),
        format!("{:.0}% of a core", write_start.cpu_pct(&write_end)),
        format!(
            "{} → {} kB",
            count(before.rss_kb as f64),
            count(after_connect.rss_kb.max(drained.rss_kb) as f64)
        ),
        details.join(" · "),
    ])
}

/// The server process.
struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    port: u16,
}

impl Server {
    fn start(db: &Path) -> Result<Server, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .env(SERVER_ENV, db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start the server: {e}"))?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().ok_or("server stdout")?);
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .map_err(|e| format!("server: {e}"))?;
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok());
        let mut server = Server {
            child,
            stdin,
            stdout,
            port: 0,
        };
        match port {
            Some(port) => {
                server.port = port;
                Ok(server)
            }
            None => {
                server.stop();
                Err(format!("the server said {line:?} instead of its port"))
            }
        }
    }

    /// Closes its stdin (it shuts its endpoints and itself down), and returns the counters it
    /// prints last.
    fn stop(&mut self) -> Option<String> {
        drop(self.stdin.take());
        let mut stats = None;
        let mut line = String::new();
        while self.stdout.read_line(&mut line).is_ok_and(|n| n > 0) {
            if let Some(s) = line.trim().strip_prefix("stats ") {
                stats = Some(s.to_string());
            }
            line.clear();
        }
        let _ = self.child.wait();
        stats
    }
}

/// What the clients share with the rest of the benchmark.
struct Shared {
    /// Instants are nanoseconds since this one (+1, so 0 means "not yet").
    base: Instant,
    connected: AtomicU64,
    failed: AtomicU64,
    /// Change events received by every client together.
    received: AtomicU64,
    /// Client `i` connected.
    connected_flags: Vec<AtomicBool>,
}

fn nanos_since(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64 + 1
}

/// What one client saw.
#[derive(Debug, Default)]
struct ClientOutcome {
    /// (row id, arrival) of each change event, in arrival order.
    arrivals: Vec<(u32, u64)>,
    /// Events of another user's row (`/user` only).
    misrouted: u64,
    /// `lag` and `reset` events.
    notices: u64,
    /// The stream ended before the benchmark stopped it.
    closed_early: bool,
}

struct LoadGenerator {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<Vec<ClientOutcome>>>,
}

impl LoadGenerator {
    fn start(port: u16, clients: usize, fan_out: FanOut) -> LoadGenerator {
        let shared = Arc::new(Shared {
            base: Instant::now(),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            received: AtomicU64::new(0),
            connected_flags: (0..clients).map(|_| AtomicBool::new(false)).collect(),
        });
        let (stop, stopped) = watch::channel(false);
        let threads = (0..LOAD_THREADS)
            .map(|t| {
                let shared = shared.clone();
                let stopped = stopped.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("load generator runtime");
                    rt.block_on(async move {
                        let gate = Arc::new(Semaphore::new(CONNECTING));
                        let tasks: Vec<_> = (t..clients)
                            .step_by(LOAD_THREADS)
                            .map(|user| {
                                tokio::spawn(client(
                                    user,
                                    port,
                                    fan_out,
                                    shared.clone(),
                                    gate.clone(),
                                    stopped.clone(),
                                ))
                            })
                            .collect();
                        let mut outcomes = Vec::with_capacity(tasks.len());
                        for task in tasks {
                            outcomes.push(task.await.unwrap_or_default());
                        }
                        outcomes
                    })
                })
            })
            .collect();
        LoadGenerator {
            shared,
            stop,
            threads,
        }
    }

    /// Ends every client; what each saw.
    fn stop(self) -> Vec<ClientOutcome> {
        self.stop.send_replace(true);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect()
    }
}

/// The JSON record of an event (`ChangeEvent::to_record`): what a client looks at.
#[derive(Deserialize)]
struct Record {
    id: u32,
    columns: Columns,
}

#[derive(Deserialize)]
struct Columns {
    user_id: u32,
}

/// One SSE client: connects as `user`, then records every event until told to stop.
async fn client(
    user: usize,
    port: u16,
    fan_out: FanOut,
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) -> ClientOutcome {
    let mut outcome = ClientOutcome::default();
    let mut parser = Parser::default();
    let mut buf = vec![0u8; 4096];
    let connecting = async {
        let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\nx-user-id: {user}\r\n\r\n",
            fan_out.path()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        // Connected once the stream's first frame (`retry:`) is here.
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed while connecting".to_string());
            }
            parser.push(&buf[..n])?;
            let mut first = false;
            parser.frames(|_| first = true);
            if first {
                return Ok(stream);
            }
        }
    };
    let connected = tokio::select! {
        c = tokio::time::timeout(CONNECT_WITHIN, connecting) => c.unwrap_or_else(|_| Err("timed out".into())),
        _ = stop.wait_for(|s| *s) => Err("stopped while connecting".into()),
    };
    let mut stream = match connected {
        Ok(stream) => stream,
        Err(e) => {
            log::warn!("sse bench: client {user}: {e}");
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return outcome;
        }
    };
    shared.connected_flags[user].store(true, Ordering::Relaxed);
    shared.connected.fetch_add(1, Ordering::Relaxed);
    loop {
        let n = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            n = stream.read(&mut buf) => n,
        };
        let n = match n {
            Ok(0) | Err(_) => {
                outcome.closed_early = true;
                break;
            }
            Ok(n) => n,
        };
        let at = nanos_since(shared.base);
        let ended = match parser.push(&buf[..n]) {
            Ok(ended) => ended,
            Err(e) => {
                log::warn!("sse bench: client {user}: {e}");
                outcome.closed_early = true;
                break;
            }
        };
        let mut events = 0u64;
        parser.frames(|frame| {
            let mut kind: &[u8] = b"";
            for line in frame.split(|&b| b == b'\n') {
                if let Some(name) = line.strip_prefix(b"event: ") {
                    kind = name;
                } else if let Some(data) = line.strip_prefix(b"data: ") {
                    if kind != b"messages/insert" {
                        outcome.notices += 1;
                        continue;
                    }
                    match serde_json::from_slice::<Record>(data) {
                        Ok(record) => {
                            if fan_out == FanOut::PerUser && record.columns.user_id as usize != user
                            {
                                outcome.misrouted += 1;
                            }
                            outcome.arrivals.push((record.id, at));
                            events += 1;
                        }
                        Err(e) => log::warn!("sse bench: client {user}: bad event: {e}"),
                    }
                }
            }
        });
        shared.received.fetch_add(events, Ordering::Relaxed);
        if ended {
            outcome.closed_early = true;
            break;
        }
    }
    outcome
}

/// An HTTP/1.1 response read by hand: the head, then the chunked body cut into SSE frames.
#[derive(Default)]
struct Parser {
    raw: Vec<u8>,
    head_done: bool,
    chunked: bool,
    body: Vec<u8>,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Parser {
    /// Takes bytes read from the socket; true once the body ended (its last chunk).
    fn push(&mut self, data: &[u8]) -> Result<bool, String> {
        self.raw.extend_from_slice(data);
        if !self.head_done {
            let Some(end) = find(&self.raw, b"\r\n\r\n") else {
                return Ok(false);
            };
            let head = String::from_utf8_lossy(&self.raw[..end]).to_ascii_lowercase();
            let status = head.split(' ').nth(1).unwrap_or("");
            if status != "200" {
                return Err(format!(
                    "HTTP status {status}: {}",
                    String::from_utf8_lossy(&self.raw)
                ));
            }
            self.chunked = head.contains("\r\ntransfer-encoding: chunked");
            self.raw.drain(..end + 4);
            self.head_done = true;
        }
        if !self.chunked {
            self.body.append(&mut self.raw);
            return Ok(false);
        }
        let mut pos = 0;
        let ended = loop {
            let Some(eol) = find(&self.raw[pos..], b"\r\n") else {
                break false;
            };
            let line = std::str::from_utf8(&self.raw[pos..pos + eol]).map_err(|e| e.to_string())?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size =
                usize::from_str_radix(size, 16).map_err(|e| format!("chunk size {size:?}: {e}"))?;
            if size == 0 {
                break true;
            }
            let start = pos + eol + 2;
            if self.raw.len() < start + size + 2 {
                break false;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            pos = start + size + 2;
        };
        self.raw.drain(..pos);
        Ok(ended)
    }

    /// Hands every complete SSE frame (without its blank line) to `f`.
    fn frames(&mut self, mut f: impl FnMut(&[u8])) {
        let mut pos = 0;
        while let Some(at) = find(&self.body[pos..], b"\n\n") {
            f(&self.body[pos..pos + at]);
            pos += at + 2;
        }
        self.body.drain(..pos);
    }
}

/// What the writer did: per row id (index), the instants just before its `INSERT` and when
/// its commit returned (nanoseconds since `Shared::base`, +1; 0: not committed).
struct Written {
    sent_ns: Vec<u64>,
    commit_ns: Vec<u64>,
    /// Commit round trips, ms.
    commit_ms: Vec<f64>,
    errors: u64,
}

impl Written {
    fn committed(&self) -> u64 {
        self.commit_ns.iter().filter(|&&c| c > 0).count() as u64
    }
}

/// Commits `rate` single-row transactions per second for `duration`, each row addressed to
/// one of `users` (xorshift, fixed seed).
fn write(
    db: &Path,
    rate: u32,
    duration: Duration,
    users: &[u32],
    base: Instant,
) -> Result<Written, String> {
    let conn = rusqlite::Connection::open(db).map_err(|e| e.to_string())?;
    conn.busy_timeout(Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    let mut insert = conn
        .prepare(&format!(
            "INSERT INTO {TABLE} (id, user_id, body) VALUES (?1, ?2, ?3)"
        ))
        .map_err(|e| e.to_string())?;
    let total = (duration.as_secs_f64() * f64::from(rate)).round() as usize;
    let mut written = Written {
        sent_ns: vec![0; total + 1],
        commit_ns: vec![0; total + 1],
        commit_ms: Vec::with_capacity(total),
        errors: 0,
    };
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let start = Instant::now();
    for k in 0..total {
        let due = start + Duration::from_secs_f64(k as f64 / f64::from(rate));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait); // fixed-rate pacing
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let user = users[(seed % users.len() as u64) as usize];
        let id = k + 1;
        let sent = nanos_since(base);
        match insert.execute(rusqlite::params![id as i64, user, "a 16-byte body.."]) {
            Ok(_) => {
                let done = nanos_since(base);
                written.sent_ns[id] = sent;
                written.commit_ns[id] = done;
                written.commit_ms.push((done - sent) as f64 / 1e6);
            }
            Err(e) => {
                written.errors += 1;
                log::warn!("sse bench: writer: {e}");
            }
        }
    }
    Ok(written)
}

/// The server process: a SQLite notifier and an actix-web server with the two endpoints.
mod server {
    use std::io::{BufRead, Write as _};

    use actix_web::{App, HttpServer};
    use serde_json::json;
    use sqlnotify::web::{Denied, Grant, Sse};
    use sqlnotify::{Filter, Notifier, Operation, Subscription, Watch};

    use super::TABLE;

    /// Serves until stdin closes, then prints `stats {…}` and exits.
    pub fn main(db: &str) {
        actix_web::rt::System::new().block_on(serve(db.to_string()));
    }

    async fn serve(db: String) {
        let notifier = Notifier::builder(format!("sqlite://{db}"))
            .watch(Watch::new(TABLE, Operation::Insert).extra_columns(["user_id"]))
            .start()
            .await
            .expect("server: start the notifier");
        let per_user = Sse::builder(notifier.clone(), |req| {
            let user: i64 = req
                .headers()
                .get("x-user-id")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .ok_or_else(|| Denied::unauthorized("x-user-id"))?;
            Ok(Grant::new().subscription(
                Subscription::new(TABLE, Operation::Insert).filter(Filter::eq("user_id", user)),
            ))
        })
        .build();
        let everyone = Sse::builder(notifier.clone(), |_| {
            Ok(Grant::new().subscription(Subscription::new(TABLE, Operation::Insert)))
        })
        .build();
        let (user_route, all_route) = (per_user.clone(), everyone.clone());
        let server = HttpServer::new(move || {
            App::new()
                .route("/user", user_route.route())
                .route("/all", all_route.route())
        })
        .backlog(4096)
        .bind(("127.0.0.1", 0))
        .expect("server: bind");
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening {port}").expect("stdout");
            out.flush().expect("stdout");
        }
        let (closed, on_close) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut line = String::new();
            while std::io::stdin()
                .lock()
                .read_line(&mut line)
                .is_ok_and(|n| n > 0)
            {
                line.clear();
            }
            let _ = closed.send(());
        });
        let (a, b) = (per_user.clone(), everyone.clone());
        actix_web::rt::spawn(async move {
            let _ = on_close.await;
            a.shutdown();
            b.shutdown();
            handle.stop(true).await;
        });
        server.await.expect("server");
        let sse = [per_user.stats(), everyone.stats()];
        let stats = notifier.stats().await.ok();
        let line = json!({
            "connections": sse[0].connections + sse[1].connections,
            "refused": sse[0].refused + sse[1].refused,
            "events_sent": sse[0].events + sse[1].events,
            "lag_notices": sse[0].lag_notices + sse[1].lag_notices,
            "lost": sse[0].lost + sse[1].lost,
            "slow_disconnects": sse[0].slow_disconnects + sse[1].slow_disconnects,
            "heartbeats": sse[0].heartbeats + sse[1].heartbeats,
            "notifier_received": stats.as_ref().map(|s| s.received),
            "notifier_delivered": stats.as_ref().map(|s| s.delivered),
            "notifier_dropped": stats.as_ref().map(|s| s.dropped),
        });
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "stats {line}").expect("stdout");
            out.flush().expect("stdout");
        }
        let _ = notifier.stop().await;
    }
}
