//! End-to-end benchmark: latency, throughput and writer cost on a real PostgreSQL, a real
//! SQLite file and (feature `mysql`) a real MySQL / MariaDB server, against baselines taken in
//! the same run.
//!
//! Writers are separate processes (this binary re-executed in writer mode, see `writer.rs`);
//! each row carries the writer's wall-clock send time, and the subscriber — in this process —
//! records when it arrives. Baselines: a raw tokio-postgres LISTEN loop behind a minimal
//! `pg_notify` trigger (latency, throughput), and a table with no trigger at all (writer cost).
//! MySQL has no LISTEN: its latency and throughput baseline is a raw 1 ms polling loop behind
//! a minimal trigger (see `mysql.rs`).
//!
//! PostgreSQL: `SQLNOTIFY_TEST_PG_URL`, else `postgres://postgres@127.0.0.1:5432/postgres`; a
//! database of its own is created and dropped (only when a PostgreSQL or SQLite section runs).
//! SQLite: files in a temporary directory. MySQL: `SQLNOTIFY_BENCH_MYSQL_URL`, else
//! `SQLNOTIFY_TEST_MYSQL_URL`, else `mysql://root@127.0.0.1:3306/test`; a database of its own;
//! skipped with a line saying so when no server answers.
//!
//! Run: `scripts/bench [--quick]`, or `cargo bench [--features mysql] --bench e2e -- [--quick]
//! [--only=latency,…]` (sections: `latency`, `throughput`, `cost`, `idle`, with finer names
//! such as `latency-200` or `throughput-1w-100r-small`; handlers against plain delivery on a
//! named consumer: `handlers`, i.e. `handlers-backlog`, `handlers-latency-1000` (see
//! `handlers.rs`); change data (issue 15, see `change_data.rs`): `snapshot-1m` (also selected
//! by `snapshot`: a 1,000,000-row table read by `subscribe_snapshot` against a plain cursor
//! read, PostgreSQL, SQLite and — as `mysql-snapshot-1m` — MySQL, with peak memory) and `cost-change-data` (also selected by
//! `cost`: writer cost of `old_values` and `context` on INSERT+UPDATE transactions); MySQL:
//! `mysql`, i.e. `mysql-latency-200`, `mysql-latency-1000`, `mysql-throughput-1w-100r-small`,
//! `mysql-cost`, `mysql-idle`); the listener's CPU per event at a fixed rate: `cpu`, i.e.
//! `cpu-15000-100r`, `cpu-2000-1r`; the durable tier while another session keeps a
//! transaction open, against the same without it: `open-txn`; writer cost with single-row transactions (asynchronous
//! commit), where a statement-level trigger's price per statement shows most: `cost-1row`
//! (also selected by `cost`). `--systems=notify,notify-unsigned,…` narrows the latency and
//! throughput sections to those systems (short names in `System::short`) beside the raw
//! baseline. Throughput rows give the listener's CPU per delivered event: this process's CPU
//! time (listener, pipeline, subscriber — the writers are other processes) from the writers'
//! start to the last arrival, over the events delivered.

mod change_data;
#[path = "../common/mod.rs"]
mod common;
mod handlers;
#[cfg(feature = "logical")]
mod logical;
#[cfg(feature = "mysql")]
mod mysql;
mod recorder;
mod writer;

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use sqlnotify::{Capture, Notifier, Operation, Subscription, Tier, Watch};
use tokio_postgres::{Client, NoTls};

use common::{count, ms, percentile, ratio, with_dbname, Args, Table};
use recorder::{raw_trigger_sql, RawListener, Shared};
use writer::{Report, Spec, Target, Writers};

/// Built with `RUSTFLAGS="--cfg sqlnotify_bench_mimalloc"`: mimalloc instead of the system's
/// allocator, in this process and its writer processes (the same binary), to measure what an
/// application's allocator changes; the header says which one ran.
#[cfg(sqlnotify_bench_mimalloc)]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Ok(spec) = std::env::var(writer::WRITER_ENV) {
        writer::child_main(&spec);
        return;
    }
    let args = Args::parse();
    if !common::refuse_unless_bench(&args, "e2e") {
        return;
    }
    let _ = env_logger::builder().is_test(false).try_init();
    actix::System::new().block_on(run(args));
}

/// Payload sizes: "small" and "~4 KB".
const SMALL: usize = 16;
const LARGE: usize = 4000;

/// What listens, and how the table is set up (PostgreSQL and SQLite; MySQL has its own in
/// `mysql.rs`). A new system needs a label, a set-up arm in [`measure`], and a place in the
/// system lists of the sections ([`DELIVERING`], [`cost_with`], [`idle`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum System {
    /// PostgreSQL, no trigger (writer-cost baseline).
    NoTrigger,
    /// PostgreSQL, a minimal `pg_notify` row trigger and a raw LISTEN loop.
    Raw,
    /// PostgreSQL, a sqlnotify notifier with one watch of this tier.
    Tier(Tier),
    /// PostgreSQL, the notify tier with `sign_notifications(false)`: what the signature costs.
    NotifyUnsigned,
    /// PostgreSQL, the raw trigger with nobody LISTENing (trigger cost without a listener
    /// competing for the CPU; writer cost only).
    RawUnheard,
    /// PostgreSQL, a sqlnotify notifier with one `Capture::Statement` watch of this tier
    /// (durable or poll): one journal row per statement.
    Statement(Tier),
    /// PostgreSQL, the durable tier's statement-capture trigger installed and nobody
    /// listening: the trigger's own cost, without a listener competing for the CPU (writer
    /// cost only).
    StatementUnheard,
    /// PostgreSQL, a statement-level trigger that only sends one empty NOTIFY: the floor of
    /// any trigger-based capture (captures nothing; writer cost only).
    StatementWake,
    /// PostgreSQL with `wal_level=logical`: a publication, a `pgoutput` slot and a bare
    /// replication-stream loop (the logical section's baseline, [`logical::RawLogical`]).
    #[cfg(feature = "logical")]
    RawLogical,
    /// SQLite, no trigger (writer-cost baseline; WAL mode like sqlnotify sets it).
    SqliteNoTrigger,
    /// SQLite, a sqlnotify notifier.
    Sqlite,
}

impl System {
    /// The name `--systems=` selects it by.
    fn short(self) -> &'static str {
        match self {
            System::NoTrigger => "none",
            System::Raw => "raw",
            System::Tier(Tier::Notify) => "notify",
            System::NotifyUnsigned => "notify-unsigned",
            System::Tier(Tier::Durable) => "durable",
            System::Tier(Tier::Poll) => "poll",
            System::Tier(Tier::Logical) => "logical",
            System::RawUnheard => "raw-unheard",
            System::Statement(Tier::Durable) => "durable-statement",
            System::Statement(_) => "poll-statement",
            System::StatementUnheard => "statement-unheard",
            System::StatementWake => "statement-wake",
            #[cfg(feature = "logical")]
            System::RawLogical => "raw-logical",
            System::SqliteNoTrigger => "sqlite-none",
            System::Sqlite => "sqlite",
        }
    }

    fn label(self) -> &'static str {
        match self {
            System::NoTrigger => "no trigger",
            System::Raw => "raw pg_notify trigger + LISTEN loop",
            System::Tier(Tier::Notify) => "notify tier",
            System::NotifyUnsigned => "notify tier, unsigned",
            System::Tier(Tier::Durable) => "durable tier",
            System::Tier(Tier::Poll) => "poll tier",
            System::Tier(Tier::Logical) => "logical tier (replication slot)",
            System::RawUnheard => "raw pg_notify trigger, nobody listening",
            System::Statement(Tier::Durable) => "durable tier, statement capture",
            System::Statement(_) => "poll tier, statement capture",
            System::StatementUnheard => "durable tier, statement capture, nobody listening",
            System::StatementWake => {
                "floor: statement-level trigger sending one empty NOTIFY, capturing nothing"
            }
            #[cfg(feature = "logical")]
            System::RawLogical => "raw pgoutput consumer (slot + replication stream, no pipeline)",
            System::SqliteNoTrigger => "SQLite, no trigger",
            System::Sqlite => "SQLite",
        }
    }

    fn sqlite(self) -> bool {
        matches!(self, System::Sqlite | System::SqliteNoTrigger)
    }

    /// Whether events are delivered to this process.
    fn delivers(self) -> bool {
        #[cfg(feature = "logical")]
        if self == System::RawLogical {
            return true;
        }
        matches!(
            self,
            System::Raw
                | System::Tier(_)
                | System::NotifyUnsigned
                | System::Statement(_)
                | System::Sqlite
        )
    }
}

/// The write load of one run.
#[derive(Debug, Clone, Copy)]
struct Load {
    writers: u32,
    /// Transactions per second per writer; 0 = as fast as possible.
    rate: u32,
    txn_rows: u32,
    payload_bytes: usize,
    duration: Duration,
    /// Writers commit without waiting for the disk (see `Spec::async_commit`).
    async_commit: bool,
}

/// What one system measured: one run, or several rounds merged.
#[derive(Debug, Default, Clone)]
struct Outcome {
    rounds: usize,
    committed: u64,
    errors: u64,
    unique: u64,
    duplicates: u64,
    malformed: u64,
    lost: u64,
    /// Rows committed per second (median over rounds).
    commit_rate: f64,
    /// Events delivered per second, from the first commit to the last arrival (median).
    delivered_rate: f64,
    /// From the last commit to the last arrival (worst round).
    lag_ms: f64,
    /// Writer send → subscriber arrival, ms, sorted (every round).
    latency: Vec<f64>,
    /// Commit acknowledged to the writer → subscriber arrival, ms, sorted (paced runs only;
    /// negative when the event arrived before the writer heard of its commit).
    after_commit: Vec<f64>,
    /// sqlnotify only: the listener's read → the subscriber's call, µs, sorted (every round).
    inside_us: Vec<f64>,
    /// Writers' commit round trips, ms, sorted.
    commit: Vec<f64>,
    /// CPU this process (listener, pipeline, subscriber; the writers are other processes)
    /// used from the writers' start until the last event arrived, seconds (every round).
    cpu_s: f64,
    /// This process's wake-ups (voluntary context switches) over the same span (every round).
    wakeups: u64,
}

impl Outcome {
    fn p(&self, q: f64) -> f64 {
        percentile(&self.latency, q)
    }

    fn max(&self) -> f64 {
        self.latency.last().copied().unwrap_or(f64::NAN)
    }

    fn commit_p(&self, q: f64) -> f64 {
        percentile(&self.commit, q)
    }

    fn after_commit_p(&self, q: f64) -> f64 {
        percentile(&self.after_commit, q)
    }

    /// Several rounds as one: counts and samples add up, rates are the median, lag the worst.
    fn merge(runs: Vec<Outcome>) -> Outcome {
        let median = |f: fn(&Outcome) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            percentile(&v, 50.0)
        };
        let sum = |f: fn(&Outcome) -> u64| runs.iter().map(f).sum::<u64>();
        let samples = |f: fn(&Outcome) -> &Vec<f64>| {
            let mut v: Vec<f64> = runs.iter().flat_map(|o| f(o).iter().copied()).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        Outcome {
            rounds: runs.iter().map(|o| o.rounds).sum(),
            committed: sum(|o| o.committed),
            errors: sum(|o| o.errors),
            unique: sum(|o| o.unique),
            duplicates: sum(|o| o.duplicates),
            malformed: sum(|o| o.malformed),
            lost: sum(|o| o.lost),
            commit_rate: median(|o| o.commit_rate),
            delivered_rate: median(|o| o.delivered_rate),
            lag_ms: runs.iter().map(|o| o.lag_ms).fold(0.0, f64::max),
            latency: samples(|o| &o.latency),
            after_commit: samples(|o| &o.after_commit),
            inside_us: samples(|o| &o.inside_us),
            commit: samples(|o| &o.commit),
            cpu_s: runs.iter().map(|o| o.cpu_s).sum(),
            wakeups: sum(|o| o.wakeups),
        }
    }

    /// CPU per delivered event, µs (NaN when nothing arrived).
    fn cpu_us_per_event(&self) -> f64 {
        if self.unique == 0 {
            return f64::NAN;
        }
        self.cpu_s * 1e6 / self.unique as f64
    }

    /// Wake-ups of this process per delivered event (NaN when nothing arrived).
    fn wakeups_per_event(&self) -> f64 {
        if self.unique == 0 {
            return f64::NAN;
        }
        self.wakeups as f64 / self.unique as f64
    }
}

struct Ctx {
    args: Args,
    url: String,
    tmp: PathBuf,
    next: Cell<u32>,
}

impl Ctx {
    fn id(&self) -> u32 {
        let n = self.next.get();
        self.next.set(n + 1);
        n
    }
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e} (set SQLNOTIFY_TEST_PG_URL)"));
    actix_rt::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Today's date (UTC), `YYYY-MM-DD`.
fn today() -> String {
    let days = writer::now_us() / 86_400_000_000;
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

/// The PostgreSQL and SQLite section names (every throughput shape of a full run).
fn pg_sections() -> Vec<String> {
    let mut names: Vec<String> = [
        "latency-200",
        "cpu-15000-100r",
        "cpu-2000-1r",
        "latency-1000",
        "cost-sync",
        "cost-async",
        "cost-1row",
        "idle",
        OPEN_TXN,
        handlers::BACKLOG,
        handlers::LATENCY,
        change_data::SNAPSHOT,
        change_data::COST,
    ]
    .map(String::from)
    .to_vec();
    names.extend(
        shapes(false)
            .iter()
            .map(|s| format!("throughput-{}", s.name())),
    );
    names
}

async fn run(args: Args) {
    let time = args.run_time();
    println!("# sqlnotify end-to-end benchmark");
    println!("date: {} (UTC)", today());
    println!("machine: {}", common::machine());
    println!(
        "allocator: {}",
        if cfg!(sqlnotify_bench_mimalloc) {
            "mimalloc (--cfg sqlnotify_bench_mimalloc), here and in the writer processes"
        } else {
            "the system's"
        }
    );
    let tmp = std::env::temp_dir().join(format!("sqlnotify-bench-{}", std::process::id()));
    // PostgreSQL (and SQLite, whose rows sit in the same sections) only when one of their
    // sections runs, so that `--only=mysql` needs no PostgreSQL.
    let pg = if pg_sections().iter().any(|name| args.wants(name)) {
        Some(Pg::setup(&tmp).await)
    } else {
        None
    };
    #[cfg(feature = "mysql")]
    let my = mysql::MysqlBench::setup(&args).await;
    #[cfg(not(feature = "mysql"))]
    if args.only.is_empty() || args.only.iter().any(|o| o.starts_with("mysql")) {
        println!(
            "MySQL: skipped: this build has no `mysql` feature (cargo bench --features mysql --bench e2e)"
        );
    }
    println!(
        "mode: {} — {} s per system and scenario{}; writers are separate processes",
        if args.quick { "--quick" } else { "full" },
        time.as_secs(),
        if args.quick {
            ""
        } else {
            ", in 5 interleaved rounds (rates: median round; lag: worst round; latency and losses: all rounds)"
        }
    );
    println!(
        "latency: subscriber arrival − writer send time (includes the commit; `after the commit ack` starts when the writer got its commit back); \
         throughput: writers commit with synchronous_commit=off / SQLite synchronous=OFF (CPU-bound, not bound by this disk's flush time); \
         writer cost: both settings; listeners run in this process"
    );
    let ctx = Ctx {
        args: args.clone(),
        url: pg.as_ref().map(|pg| pg.url.clone()).unwrap_or_default(),
        tmp: tmp.clone(),
        next: Cell::new(0),
    };
    let mut table = Table::new(&[
        "scenario",
        "metric",
        "baseline",
        "sqlnotify",
        "ratio",
        "details",
    ]);
    if pg.is_some() {
        latency(&ctx, &mut table).await;
        throughput(&ctx, &mut table).await;
        cpu(&ctx, &mut table).await;
        cost(&ctx, &mut table).await;
        idle(&ctx, &mut table).await;
        open_transaction(&ctx, &mut table).await;
        handlers::run(&ctx, &mut table).await;
        change_data::run(&ctx, &mut table).await;
    }
    #[cfg(feature = "logical")]
    logical::run(&ctx, &mut table).await;
    #[cfg(feature = "mysql")]
    if let Some(my) = my {
        my.run(&ctx, &mut table).await;
        my.teardown().await;
    }
    println!();
    print!("{}", table.render());
    if let Some(pg) = pg {
        pg.teardown().await;
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The benchmark's own PostgreSQL database.
struct Pg {
    admin: Client,
    db_name: String,
    url: String,
}

impl Pg {
    /// Creates the database and the SQLite directory `tmp`, and prints what runs (PostgreSQL
    /// and SQLite versions, settings).
    async fn setup(tmp: &std::path::Path) -> Pg {
        let admin_url = std::env::var("SQLNOTIFY_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let admin = connect(&admin_url).await;
        remove_leftovers(&admin).await;
        let db_name = format!("sqlnotify_bench_{}", std::process::id());
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name} TEMPLATE template0"))
            .await
            .expect("create the benchmark database");
        let url = with_dbname(&admin_url, &db_name);
        let pg_version: String = admin
            .query_one("SHOW server_version", &[])
            .await
            .expect("server version")
            .get(0);
        let settings: Vec<String> = {
            let mut out = Vec::new();
            for name in ["synchronous_commit", "shared_buffers", "max_wal_size"] {
                let row = admin
                    .query_one(&format!("SHOW {name}"), &[])
                    .await
                    .expect("setting");
                out.push(format!("{name}={}", row.get::<_, String>(0)));
            }
            out
        };
        std::fs::create_dir_all(tmp).expect("temp dir");
        let sqlite_sync: i64 = {
            let conn = rusqlite::Connection::open(tmp.join("probe.db")).expect("sqlite");
            conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
                .expect("pragma")
        };
        println!(
            "PostgreSQL {pg_version} ({}), loopback TCP; SQLite {} (bundled, WAL, synchronous={sqlite_sync}), file in {}",
            settings.join(", "),
            rusqlite::version(),
            std::env::temp_dir().display()
        );
        Pg {
            admin,
            db_name,
            url,
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

/// Drops the databases and temporary directories of earlier runs that were killed before they
/// could clean up (their process is gone).
async fn remove_leftovers(admin: &Client) {
    let gone = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'sqlnotify\\_bench\\_%'",
            &[],
        )
        .await
        .unwrap_or_default();
    for row in rows {
        let name: String = row.get(0);
        if gone(&name, "sqlnotify_bench_") {
            eprintln!("dropping {name}, left over by a killed run");
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if gone(&name, "sqlnotify-bench-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// A running listener of some kind.
enum Running {
    Nothing,
    Raw(RawListener),
    #[cfg(feature = "logical")]
    RawLogical(logical::RawLogical),
    Notifier(Notifier),
}

impl Running {
    async fn stop(self) {
        match self {
            Running::Nothing => {}
            Running::Raw(raw) => raw.stop().await,
            #[cfg(feature = "logical")]
            Running::RawLogical(raw) => raw.stop().await,
            Running::Notifier(n) => n.stop().await.expect("stop the notifier"),
        }
    }
}

/// The table every run writes to.
fn create_table_sql(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, sent_us bigint NOT NULL, payload text NOT NULL)"
    )
}

/// The floor of any trigger-based capture (see [`System::StatementWake`]): a statement-level
/// trigger that sends one empty NOTIFY and captures nothing.
fn wake_floor_sql(table: &str) -> String {
    format!(
        "CREATE FUNCTION {table}_stmt() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM pg_notify('{table}_stmt', '');
           RETURN NULL;
         END $$;
         CREATE TRIGGER {table}_stmt AFTER INSERT ON {table}
           FOR EACH STATEMENT EXECUTE FUNCTION {table}_stmt();"
    )
}

fn watch(table: &str, tier: Tier) -> Watch {
    Watch::new(table, Operation::Insert)
        .extra_columns(["sent_us", "payload"])
        .tier(tier)
}

fn statement_watch(table: &str, tier: Tier) -> Watch {
    watch(table, tier).capture(Capture::Statement)
}

/// Subscribes the recorder to the table's inserts.
async fn subscribe(notifier: &Notifier, table: &str, shared: &Shared) {
    let shared = shared.clone();
    notifier
        .subscribe_fn(Subscription::new(table, Operation::Insert), move |event| {
            shared.inside(event.timestamp());
            shared.record(
                event.id().as_i64(),
                event.get("sent_us").and_then(Value::as_i64),
            );
        })
        .await
        .expect("subscribe");
}

/// Sets up `system`, runs the writers, waits for delivery, tears down.
async fn measure(ctx: &Ctx, system: System, load: Load) -> Outcome {
    let n = ctx.id();
    let table = format!("bench_{n}");
    let shared = Shared::default();
    let (target, running, sqlite_dir) = if system.sqlite() {
        let dir = ctx.tmp.join(format!("run{n}"));
        std::fs::create_dir_all(&dir).expect("sqlite dir");
        let path = dir.join("app.db");
        {
            let conn = rusqlite::Connection::open(&path).expect("create the SQLite file");
            conn.execute_batch(&create_table_sql(&table))
                .expect("create table");
            // sqlnotify switches the file to WAL; the baseline gets the same.
            conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
                .expect("WAL");
        }
        let running = if system == System::Sqlite {
            let notifier = Notifier::builder(format!("sqlite://{}", path.display()))
                .watch(watch(&table, Tier::Notify))
                .start()
                .await
                .expect("start the SQLite notifier");
            subscribe(&notifier, &table, &shared).await;
            Running::Notifier(notifier)
        } else {
            Running::Nothing
        };
        (
            Target::Sqlite(path.display().to_string()),
            running,
            Some(dir),
        )
    } else {
        let client = connect(&ctx.url).await;
        client
            .batch_execute(&create_table_sql(&table))
            .await
            .expect("create table");
        let running = match system {
            System::Raw => {
                let channel = format!("{table}_raw");
                client
                    .batch_execute(&raw_trigger_sql(&table, &channel))
                    .await
                    .expect("raw trigger");
                Running::Raw(RawListener::start(&ctx.url, &channel, shared.clone()).await)
            }
            System::Tier(_) | System::NotifyUnsigned | System::Statement(_) => {
                let w = match system {
                    System::Statement(tier) => statement_watch(&table, tier),
                    System::Tier(tier) => watch(&table, tier),
                    System::NotifyUnsigned => watch(&table, Tier::Notify),
                    _ => unreachable!("matched above"),
                };
                let notifier = Notifier::builder(&ctx.url)
                    .sign_notifications(system != System::NotifyUnsigned)
                    .watch(w)
                    .cleanup_on_stop(true)
                    .start()
                    .await
                    .expect("start the notifier");
                subscribe(&notifier, &table, &shared).await;
                Running::Notifier(notifier)
            }
            System::RawUnheard => {
                client
                    .batch_execute(&raw_trigger_sql(&table, &format!("{table}_raw")))
                    .await
                    .expect("raw trigger");
                Running::Nothing
            }
            System::StatementUnheard => {
                // install the trigger, then stop listening (the trigger stays)
                Notifier::builder(&ctx.url)
                    .watch(statement_watch(&table, Tier::Durable))
                    .start()
                    .await
                    .expect("start the notifier")
                    .stop()
                    .await
                    .expect("stop the notifier");
                Running::Nothing
            }
            System::StatementWake => {
                client
                    .batch_execute(&wake_floor_sql(&table))
                    .await
                    .expect("wake-up trigger");
                Running::Nothing
            }
            #[cfg(feature = "logical")]
            System::RawLogical => Running::RawLogical(
                logical::RawLogical::start(&ctx.url, &table, shared.clone()).await,
            ),
            _ => Running::Nothing,
        };
        (Target::Postgres(ctx.url.clone()), running, None)
    };
    let specs: Vec<Spec> = (0..load.writers)
        .map(|w| Spec {
            target: target.clone(),
            table: table.clone(),
            rate: load.rate,
            duration_ms: load.duration.as_millis() as u64,
            txn_rows: load.txn_rows,
            payload_bytes: load.payload_bytes,
            writer: w,
            async_commit: load.async_commit,
            update_previous: false,
            session_sql: None,
        })
        .collect();
    let mut writers = Writers::start(&specs).await;
    let cpu_before = common::cpu_time();
    let wakeups_before = common::wakeups();
    writers.go();
    let reports = writers.finish().await;
    let committed: u64 = reports.iter().map(|r| r.committed).sum();
    if system.delivers() {
        let (idle, cap) = ctx.args.waits();
        shared.wait_for(committed, idle, cap).await;
    }
    let cpu_s = (common::cpu_time() - cpu_before).as_secs_f64();
    let wakeups = common::wakeups() - wakeups_before;
    running.stop().await;
    match sqlite_dir {
        Some(dir) => {
            let _ = std::fs::remove_dir_all(dir);
        }
        None => {
            let client = connect(&ctx.url).await;
            client
                .batch_execute(&format!(
                    "DROP TABLE {table} CASCADE; DROP TABLE IF EXISTS {table}_journal;
                     DO $$ BEGIN
                       IF to_regclass('sqlnotify.journal') IS NOT NULL THEN
                         TRUNCATE sqlnotify.journal, sqlnotify.overflow;
                       END IF;
                     END $$;"
                ))
                .await
                .expect("drop table");
        }
    }
    Outcome {
        cpu_s,
        wakeups,
        ..outcome(&reports, &shared, system.delivers())
    }
}

fn outcome(reports: &[Report], shared: &Shared, delivers: bool) -> Outcome {
    let committed: u64 = reports.iter().map(|r| r.committed).sum();
    let start = reports.iter().map(|r| r.start_us).min().unwrap_or(0);
    let end = reports.iter().map(|r| r.end_us).max().unwrap_or(0);
    let secs = |us: i64| (us as f64 / 1e6).max(1e-6);
    let mut out = Outcome {
        rounds: 1,
        committed,
        errors: reports.iter().map(|r| r.errors).sum(),
        commit_rate: committed as f64 / secs(end - start),
        commit: reports
            .iter()
            .flat_map(|r| r.commit_us.iter().map(|&us| f64::from(us) / 1e3))
            .collect(),
        ..Outcome::default()
    };
    out.commit.sort_by(f64::total_cmp);
    if !delivers {
        return out;
    }
    let rec = shared.recorder.borrow();
    out.latency = rec.latency_us.iter().map(|&us| us as f64 / 1e3).collect();
    out.latency.sort_by(f64::total_cmp);
    let acks: HashMap<i64, i64> = reports
        .iter()
        .flat_map(|r| r.acks.iter().copied())
        .collect();
    if !acks.is_empty() {
        out.after_commit = rec
            .arrivals
            .iter()
            .filter_map(|(id, arrival)| acks.get(id).map(|ack| (arrival - ack) as f64 / 1e3))
            .collect();
        out.after_commit.sort_by(f64::total_cmp);
    }
    out.inside_us = rec.inside_us.clone();
    out.inside_us.sort_by(f64::total_cmp);
    out.unique = rec.unique;
    out.duplicates = rec.duplicates;
    out.malformed = rec.malformed;
    out.lost = committed.saturating_sub(rec.unique);
    out.delivered_rate = rec.unique as f64 / secs(rec.last_arrival_us - start);
    out.lag_ms = (rec.last_arrival_us - end).max(0) as f64 / 1e3;
    out
}

/// Runs every system in turn, in rounds — 5 rounds of a fifth of the run time each, one
/// round with `--quick` — so that a machine getting busier or quieter meanwhile affects all
/// systems alike. Returns one merged outcome per system, in order.
async fn interleaved(ctx: &Ctx, systems: &[System], load: Load) -> Vec<Outcome> {
    in_rounds(ctx, systems, load, |system, load| {
        measure(ctx, system, load)
    })
    .await
}

/// [`interleaved`] for any kind of system: `measure` runs one system once.
async fn in_rounds<S, F, Fut>(ctx: &Ctx, systems: &[S], load: Load, mut measure: F) -> Vec<Outcome>
where
    S: Copy,
    F: FnMut(S, Load) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let rounds = if ctx.args.quick { 1 } else { 5 };
    let load = Load {
        duration: load.duration / rounds,
        ..load
    };
    let mut all: Vec<Vec<Outcome>> = vec![Vec::new(); systems.len()];
    for _ in 0..rounds {
        for (i, &system) in systems.iter().enumerate() {
            all[i].push(measure(system, load).await);
        }
    }
    all.into_iter().map(Outcome::merge).collect()
}

/// "lost 0 dup 0 of 2,000"
fn losses(o: &Outcome) -> String {
    let mut s = format!(
        "lost {} dup {} of {}",
        count(o.lost as f64),
        count(o.duplicates as f64),
        count(o.committed as f64)
    );
    if o.malformed > 0 {
        s.push_str(&format!(", {} malformed", o.malformed));
    }
    if o.errors > 0 {
        s.push_str(&format!(", {} failed txns", o.errors));
    }
    s
}

/// The systems compared in the latency and throughput sections; the first is the baseline.
const DELIVERING: [System; 8] = [
    System::Raw,
    System::Tier(Tier::Notify),
    System::NotifyUnsigned,
    System::Tier(Tier::Durable),
    System::Tier(Tier::Poll),
    System::Statement(Tier::Durable),
    System::Statement(Tier::Poll),
    System::Sqlite,
];

/// Runs the raw baseline and the other systems `--systems=` selects under `load`, interleaved:
/// the baseline's outcome, then each other system's.
async fn against_raw(ctx: &Ctx, load: Load) -> (Outcome, Vec<(System, Outcome)>) {
    let systems = delivering(ctx);
    let mut outcomes = interleaved(ctx, &systems, load).await.into_iter();
    let raw = outcomes.next().expect("the raw baseline runs first");
    (raw, systems[1..].iter().copied().zip(outcomes).collect())
}

/// [`DELIVERING`] as `--systems=` narrows it (the baseline always stays first).
fn delivering(ctx: &Ctx) -> Vec<System> {
    DELIVERING
        .into_iter()
        .enumerate()
        .filter(|&(i, s)| {
            i == 0 || ctx.args.systems.is_empty() || ctx.args.systems.iter().any(|n| n == s.short())
        })
        .map(|(_, s)| s)
        .collect()
}

async fn latency(ctx: &Ctx, table: &mut Table) {
    for rate in [200, 1000] {
        if !ctx.args.wants(&format!("latency-{rate}")) {
            continue;
        }
        eprintln!("latency at {rate} rows/s …");
        let load = Load {
            writers: 1,
            rate,
            txn_rows: 1,
            payload_bytes: SMALL,
            duration: ctx.args.run_time(),
            async_commit: false,
        };
        let (raw, outcomes) = against_raw(ctx, load).await;
        eprintln!(
            "  raw baseline: p50 {} p95 {} p99 {} max {} ms; after commit p50 {} p99 {}; commit p50 {} p99 {} ms; {}",
            ms(raw.p(50.0)),
            ms(raw.p(95.0)),
            ms(raw.p(99.0)),
            ms(raw.max()),
            ms(raw.after_commit_p(50.0)),
            ms(raw.after_commit_p(99.0)),
            ms(raw.commit_p(50.0)),
            ms(raw.commit_p(99.0)),
            losses(&raw)
        );
        for (system, o) in outcomes {
            let base = (system != System::Sqlite).then_some((&raw, "raw"));
            table.row(latency_row(
                format!("latency {rate} rows/s · {}", system.label()),
                &o,
                base,
            ));
        }
    }
}

/// A latency row; `base` is the same-run baseline and its short name in the details.
fn latency_row(scenario: String, o: &Outcome, base: Option<(&Outcome, &str)>) -> Vec<String> {
    let pair = |o: &Outcome| format!("{} / {}", ms(o.p(50.0)), ms(o.p(99.0)));
    let inside = if o.inside_us.is_empty() {
        String::new()
    } else {
        format!(
            " · inside the pipeline (listener read → subscriber call) p50/p99 {}/{} µs",
            ms(percentile(&o.inside_us, 50.0)),
            ms(percentile(&o.inside_us, 99.0))
        )
    };
    let details = match base {
        Some((b, name)) => format!(
            "p95 {} ({name} {}) · max {} ({name} {}) · after the commit ack p50/p99 {}/{} ({name} {}/{}) · commit p50/p99 {}/{} ({name} {}/{}) · {} ({name}: {})",
            ms(o.p(95.0)),
            ms(b.p(95.0)),
            ms(o.max()),
            ms(b.max()),
            ms(o.after_commit_p(50.0)),
            ms(o.after_commit_p(99.0)),
            ms(b.after_commit_p(50.0)),
            ms(b.after_commit_p(99.0)),
            ms(o.commit_p(50.0)),
            ms(o.commit_p(99.0)),
            ms(b.commit_p(50.0)),
            ms(b.commit_p(99.0)),
            losses(o),
            losses(b)
        ) + &inside,
        None => format!(
            "p95 {} · max {} · after the commit ack p50/p99 {}/{} · commit p50/p99 {}/{} · {}",
            ms(o.p(95.0)),
            ms(o.max()),
            ms(o.after_commit_p(50.0)),
            ms(o.after_commit_p(99.0)),
            ms(o.commit_p(50.0)),
            ms(o.commit_p(99.0)),
            losses(o)
        ) + &inside,
    };
    vec![
        scenario,
        "p50 / p99 ms".into(),
        base.map_or("—".into(), |(b, _)| pair(b)),
        pair(o),
        base.map_or("—".into(), |(b, _)| {
            format!(
                "{} / {}",
                ratio(o.p(50.0), b.p(50.0)),
                ratio(o.p(99.0), b.p(99.0))
            )
        }),
        details,
    ]
}

/// One throughput configuration.
struct Shape {
    writers: u32,
    txn_rows: u32,
    payload_bytes: usize,
}

impl Shape {
    fn name(&self) -> String {
        format!(
            "{}w-{}r-{}",
            self.writers,
            self.txn_rows,
            if self.payload_bytes >= LARGE {
                "4kb"
            } else {
                "small"
            }
        )
    }

    fn describe(&self) -> String {
        format!(
            "{} writer{} × {}-row txns, {} payload",
            self.writers,
            if self.writers > 1 { "s" } else { "" },
            self.txn_rows,
            if self.payload_bytes >= LARGE {
                "4 KB"
            } else {
                "16 B"
            }
        )
    }
}

/// The throughput shapes of a run.
fn shapes(quick: bool) -> Vec<Shape> {
    let shape = |writers, txn_rows, payload_bytes| Shape {
        writers,
        txn_rows,
        payload_bytes,
    };
    if quick {
        vec![
            shape(1, 100, SMALL),
            shape(4, 1, SMALL),
            shape(1, 100, LARGE),
        ]
    } else {
        let mut all = Vec::new();
        for writers in [1, 4] {
            for txn_rows in [1, 100] {
                for payload in [SMALL, LARGE] {
                    all.push(shape(writers, txn_rows, payload));
                }
            }
        }
        all
    }
}

async fn throughput(ctx: &Ctx, table: &mut Table) {
    for s in shapes(ctx.args.quick) {
        if !ctx.args.wants(&format!("throughput-{}", s.name())) {
            continue;
        }
        eprintln!("throughput {} …", s.describe());
        let load = Load {
            writers: s.writers,
            rate: 0,
            txn_rows: s.txn_rows,
            payload_bytes: s.payload_bytes,
            duration: ctx.args.run_time(),
            async_commit: true,
        };
        let (raw, outcomes) = against_raw(ctx, load).await;
        eprintln!(
            "  raw baseline: committed {} rows/s, delivered {} ev/s, lag {} ms, listener CPU {} µs/event, {}",
            count(raw.commit_rate),
            count(raw.delivered_rate),
            ms(raw.lag_ms),
            us(raw.cpu_us_per_event()),
            losses(&raw)
        );
        for (system, o) in outcomes {
            let base = (system != System::Sqlite).then_some((&raw, "raw"));
            table.row(throughput_row(
                format!("throughput {} · {}", s.describe(), system.label()),
                &o,
                base,
            ));
        }
    }
}

/// A throughput row; `base` is the same-run baseline and its short name in the details.
fn throughput_row(scenario: String, o: &Outcome, base: Option<(&Outcome, &str)>) -> Vec<String> {
    vec![
        scenario,
        "delivered ev/s".into(),
        base.map_or("—".into(), |(b, _)| count(b.delivered_rate)),
        count(o.delivered_rate),
        base.map_or("—".into(), |(b, _)| ratio(o.delivered_rate, b.delivered_rate)),
        match base {
            Some((b, name)) => format!(
                "committed {} rows/s ({name} {}) · lag {} ms ({name} {}) · p50/p99 {}/{} ms ({name} {}/{}) · listener CPU {} µs/event ({name} {}) · {} ({name}: {})",
                count(o.commit_rate),
                count(b.commit_rate),
                ms(o.lag_ms),
                ms(b.lag_ms),
                ms(o.p(50.0)),
                ms(o.p(99.0)),
                ms(b.p(50.0)),
                ms(b.p(99.0)),
                us(o.cpu_us_per_event()),
                us(b.cpu_us_per_event()),
                losses(o),
                losses(b)
            ),
            None => format!(
                "committed {} rows/s · lag {} ms · p50/p99 {}/{} ms · listener CPU {} µs/event · {}",
                count(o.commit_rate),
                ms(o.lag_ms),
                ms(o.p(50.0)),
                ms(o.p(99.0)),
                us(o.cpu_us_per_event()),
                losses(o)
            ),
        },
    ]
}

/// The listener's CPU per event at a fixed rate, so that every system gets the same events in
/// the same batches (at full speed a slower system gets fewer events per wake-up, and its CPU
/// per event would include more wake-ups): this process's CPU from the writers' start to the
/// last arrival, over the events delivered.
async fn cpu(ctx: &Ctx, table: &mut Table) {
    for (rows_per_s, txn_rows) in [(15_000, 100), (2_000, 1)] {
        let name = format!("cpu-{rows_per_s}-{txn_rows}r");
        if !ctx.args.wants(&name) {
            continue;
        }
        let shape = if txn_rows == 1 {
            "1-row txns".to_string()
        } else {
            format!("{txn_rows}-row txns")
        };
        eprintln!("listener CPU at {rows_per_s} rows/s in {shape} …");
        let load = Load {
            writers: 1,
            rate: rows_per_s / txn_rows,
            txn_rows,
            payload_bytes: SMALL,
            duration: ctx.args.run_time(),
            async_commit: true,
        };
        let (raw, outcomes) = against_raw(ctx, load).await;
        eprintln!(
            "  raw baseline: listener CPU {} µs/event, {:.3} wake-ups/event, delivered {} ev/s, {}",
            us(raw.cpu_us_per_event()),
            raw.wakeups_per_event(),
            count(raw.delivered_rate),
            losses(&raw)
        );
        for (system, o) in outcomes {
            let base = system != System::Sqlite;
            table.row(vec![
                format!(
                    "listener CPU at {} rows/s, {shape} · {}",
                    count(f64::from(rows_per_s)),
                    system.label()
                ),
                "µs of CPU per event".into(),
                if base {
                    us(raw.cpu_us_per_event())
                } else {
                    "—".into()
                },
                us(o.cpu_us_per_event()),
                if base {
                    ratio(o.cpu_us_per_event(), raw.cpu_us_per_event())
                } else {
                    "—".into()
                },
                format!(
                    "this process (listener, pipeline, subscriber; the writer is another) · {:.3} wake-ups/event (raw {:.3}) · delivered {} ev/s (raw {}) · p50/p99 {}/{} ms (raw {}/{}) · {} (raw: {})",
                    o.wakeups_per_event(),
                    raw.wakeups_per_event(),
                    count(o.delivered_rate),
                    count(raw.delivered_rate),
                    ms(o.p(50.0)),
                    ms(o.p(99.0)),
                    ms(raw.p(50.0)),
                    ms(raw.p(99.0)),
                    losses(&o),
                    losses(&raw)
                ),
            ]);
        }
    }
}

/// Section name: the durable tier with a transaction left open elsewhere.
const OPEN_TXN: &str = "open-txn";

/// The durable tier at 2,000 single-row transactions per second while another session keeps
/// a transaction open for the whole run (any role can: it holds every snapshot's `xmin`
/// back), against the same run without it. The journal reader asks each read only for the
/// transactions its last read did not see, so the open transaction should cost nothing; a
/// reader that went by `xmin` would fetch again everything written since it began.
async fn open_transaction(ctx: &Ctx, table: &mut Table) {
    if !ctx.args.wants(OPEN_TXN) {
        return;
    }
    eprintln!("durable tier with a transaction left open elsewhere …");
    let load = Load {
        writers: 1,
        rate: 2_000,
        txn_rows: 1,
        payload_bytes: SMALL,
        duration: ctx.args.run_time(),
        async_commit: true,
    };
    let system = System::Tier(Tier::Durable);
    let rounds = if ctx.args.quick { 1 } else { 3 };
    let (mut plain, mut held) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(measure(ctx, system, load).await);
        let holder = connect(&ctx.url).await;
        holder
            .batch_execute("BEGIN; SELECT pg_catalog.pg_current_xact_id();")
            .await
            .expect("open a transaction");
        held.push(measure(ctx, system, load).await);
        holder.batch_execute("COMMIT").await.expect("commit");
    }
    let (plain, held) = (Outcome::merge(plain), Outcome::merge(held));
    for (metric, base, with, unit) in [
        ("p50 latency", plain.p(50.0), held.p(50.0), "ms"),
        ("p99 latency", plain.p(99.0), held.p(99.0), "ms"),
        (
            "listener CPU per event",
            plain.cpu_us_per_event(),
            held.cpu_us_per_event(),
            "µs",
        ),
    ] {
        let show = |v: f64| if unit == "ms" { ms(v) } else { us(v) };
        table.row(vec![
            "durable tier, 2,000 1-row txns/s, a transaction open elsewhere".into(),
            format!("{metric} ({unit})"),
            show(base),
            show(with),
            ratio(with, base),
            format!(
                "baseline: the same run with no open transaction · delivered {} ev/s (baseline {}) · {} (baseline: {})",
                count(held.delivered_rate),
                count(plain.delivered_rate),
                losses(&held),
                losses(&plain)
            ),
        ]);
    }
}

async fn cost(ctx: &Ctx, table: &mut Table) {
    for async_commit in [false, true] {
        let name = if async_commit {
            "cost-async"
        } else {
            "cost-sync"
        };
        if ctx.args.wants(name) {
            cost_with(ctx, table, async_commit, 100).await;
        }
    }
    // Single-row transactions: what a statement-level trigger's fixed price per statement
    // costs the most (asynchronous commit, or the commit's flush would hide it).
    if ctx.args.wants("cost-1row") {
        cost_with(ctx, table, true, 1).await;
    }
}

async fn cost_with(ctx: &Ctx, table: &mut Table, async_commit: bool, txn_rows: u32) {
    let commit = if async_commit {
        "synchronous_commit=off"
    } else {
        "synchronous_commit=on"
    };
    eprintln!("writer cost, {txn_rows}-row txns, {commit} …");
    let load = Load {
        writers: 1,
        rate: 0,
        txn_rows,
        payload_bytes: SMALL,
        // Commit rates settle within a second: --quick spends one per system here.
        duration: if ctx.args.quick {
            Duration::from_secs(1)
        } else {
            ctx.args.run_time()
        },
        async_commit,
    };
    let what = format!("writer cost, 1 writer × {txn_rows}-row txns, 16 B, {commit}");
    let systems = [
        System::NoTrigger,
        System::Raw,
        System::RawUnheard,
        System::Tier(Tier::Notify),
        System::NotifyUnsigned,
        System::Tier(Tier::Durable),
        System::Tier(Tier::Poll),
        System::Statement(Tier::Durable),
        System::Statement(Tier::Poll),
        System::StatementUnheard,
        System::StatementWake,
    ];
    let mut outcomes: Vec<(System, Outcome)> = systems
        .iter()
        .copied()
        .zip(interleaved(ctx, &systems, load).await)
        .collect();
    let none = outcomes.remove(0).1;
    let raw = outcomes[0].1.clone();
    for (system, o) in outcomes {
        let vs_raw = (system != System::Raw).then_some(&raw);
        table.row(cost_row(
            format!("{what} · {}", system.label()),
            &o,
            &none,
            vs_raw,
            system.delivers(),
        ));
    }
    let mut sqlite = interleaved(ctx, &[System::SqliteNoTrigger, System::Sqlite], load).await;
    let o = sqlite.pop().expect("sqlite");
    let none = sqlite.pop().expect("no trigger");
    let sqlite_commit = if async_commit {
        "synchronous=OFF"
    } else {
        "synchronous=FULL"
    };
    table.row(vec![
        format!("writer cost, 1 writer × {txn_rows}-row txns, 16 B, {sqlite_commit} · SQLite"),
        "committed rows/s".into(),
        format!("{} (no trigger)", count(none.commit_rate)),
        count(o.commit_rate),
        ratio(o.commit_rate, none.commit_rate),
        format!(
            "loses {:.0}% of the no-trigger rate · listener running; {}",
            (1.0 - o.commit_rate / none.commit_rate) * 100.0,
            losses(&o)
        ),
    ]);
}

/// A writer-cost row against the no-trigger rate `none`; `vs_raw`: the raw trigger's outcome,
/// when the row should compare with it too.
fn cost_row(
    scenario: String,
    o: &Outcome,
    none: &Outcome,
    vs_raw: Option<&Outcome>,
    delivers: bool,
) -> Vec<String> {
    let mut details = format!(
        "loses {:.0}% of the no-trigger rate",
        (1.0 - o.commit_rate / none.commit_rate) * 100.0
    );
    if let Some(raw) = vs_raw {
        details.push_str(&format!(
            " · vs raw trigger {}",
            ratio(o.commit_rate, raw.commit_rate)
        ));
    }
    details.push_str(&format!(" · commit p50 {} ms", ms(o.commit_p(50.0))));
    if delivers {
        details.push_str(&format!(" · listener running; {}", losses(o)));
    } else {
        details.push_str(" · nobody listening");
    }
    vec![
        scenario,
        "committed rows/s".into(),
        format!("{} (no trigger)", count(none.commit_rate)),
        count(o.commit_rate),
        ratio(o.commit_rate, none.commit_rate),
        details,
    ]
}

/// CPU used by this process over `window`, as a fraction of one core.
async fn cpu_over(window: Duration) -> f64 {
    let before = common::cpu_time();
    let started = std::time::Instant::now();
    tokio::time::sleep(window).await; // the measuring window itself
    (common::cpu_time() - before).as_secs_f64() / started.elapsed().as_secs_f64()
}

async fn idle(ctx: &Ctx, table: &mut Table) {
    if !ctx.args.wants("idle") {
        return;
    }
    eprintln!("idle listener CPU …");
    let (window, settle) = if ctx.args.quick {
        (Duration::from_secs(2), Duration::from_millis(500))
    } else {
        (Duration::from_secs(10), Duration::from_secs(1))
    };
    let nothing = cpu_over(window).await;
    let mut raw = f64::NAN;
    for system in [
        System::Raw,
        System::Tier(Tier::Notify),
        System::Tier(Tier::Durable),
        System::Tier(Tier::Poll),
        System::Sqlite,
    ] {
        let n = ctx.id();
        let table_name = format!("bench_{n}");
        let shared = Shared::default();
        let mut cleanup: Option<PathBuf> = None;
        let running = if system == System::Sqlite {
            let dir = ctx.tmp.join(format!("idle{n}"));
            std::fs::create_dir_all(&dir).expect("dir");
            let path = dir.join("app.db");
            rusqlite::Connection::open(&path)
                .expect("sqlite")
                .execute_batch(&create_table_sql(&table_name))
                .expect("table");
            cleanup = Some(dir);
            let notifier = Notifier::builder(format!("sqlite://{}", path.display()))
                .watch(watch(&table_name, Tier::Notify))
                .start()
                .await
                .expect("start");
            subscribe(&notifier, &table_name, &shared).await;
            Running::Notifier(notifier)
        } else {
            let client = connect(&ctx.url).await;
            client
                .batch_execute(&create_table_sql(&table_name))
                .await
                .expect("table");
            match system {
                System::Raw => {
                    let channel = format!("{table_name}_raw");
                    client
                        .batch_execute(&raw_trigger_sql(&table_name, &channel))
                        .await
                        .expect("raw trigger");
                    Running::Raw(RawListener::start(&ctx.url, &channel, shared.clone()).await)
                }
                System::Tier(tier) => {
                    let notifier = Notifier::builder(&ctx.url)
                        .watch(watch(&table_name, tier))
                        .cleanup_on_stop(true)
                        .start()
                        .await
                        .expect("start");
                    subscribe(&notifier, &table_name, &shared).await;
                    Running::Notifier(notifier)
                }
                _ => unreachable!(),
            }
        };
        // Let start-up work settle (the poll tier backs off to its idle interval).
        cpu_over(settle).await;
        let used = cpu_over(window).await;
        running.stop().await;
        match cleanup {
            Some(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            None => connect(&ctx.url)
                .await
                .batch_execute(&format!("DROP TABLE {table_name} CASCADE"))
                .await
                .expect("drop"),
        }
        if system == System::Raw {
            raw = used;
            eprintln!(
                "  idle: nothing listening {:.2}%, raw LISTEN loop {:.2}% of a core",
                nothing * 100.0,
                raw * 100.0
            );
            continue;
        }
        let baseline = if system == System::Sqlite {
            format!("{:.2} (nothing listening)", nothing * 100.0)
        } else {
            format!("{:.2} (raw LISTEN loop)", raw * 100.0)
        };
        table.row(vec![
            format!("idle listener · {}", system.label()),
            "CPU, % of a core".into(),
            baseline,
            format!("{:.2}", used * 100.0),
            "—".into(),
            format!(
                "this process over {} s, listener started, no writes (nothing listening: {:.2})",
                window.as_secs(),
                nothing * 100.0
            ),
        ]);
    }
}

/// Microseconds, two decimals; `—` when not measured.
fn us(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.2}")
    } else {
        "—".into()
    }
}
