//! The MySQL / MariaDB rows of the end-to-end benchmark (feature `mysql`): a sqlnotify notifier
//! on a `mysql://` URL, fed by writer processes that commit through mysql_async.
//!
//! Server: `SQLNOTIFY_BENCH_MYSQL_URL`, else `SQLNOTIFY_TEST_MYSQL_URL`, else
//! `mysql://root@127.0.0.1:3306/test`. The benchmark creates and drops a database of its own
//! (`sqlnotify_bench_<pid>`; those of killed runs are dropped at start). When no server
//! answers, it prints `skipped: no MySQL at <url>` and the other sections run as usual.
//!
//! Baselines from the same run:
//!
//! * **Latency and throughput: a raw polling loop.** MySQL has no LISTEN/NOTIFY, so there is
//!   no push path to measure against. The baseline is the cheapest poll-based capture: a
//!   minimal row trigger appending `JSON_OBJECT('id', …, 'sent_us', …, 'payload', …)` (the
//!   columns sqlnotify's watch carries) to an `AUTO_INCREMENT` log table, read on a connection
//!   of its own with `SELECT … WHERE seq > last ORDER BY seq LIMIT 1000` every millisecond —
//!   sqlnotify's interval while rows flow — without ever backing off. Its cursor would skip a
//!   row whose transaction commits after a later one (sqlnotify tracks those gaps), so it is
//!   only correct for the single-writer loads used here: it is the floor of polling at 1 ms,
//!   not an alternative to sqlnotify.
//! * **Writer cost: the same table with no trigger.** The raw trigger and sqlnotify's are each
//!   measured with their reader running and with nobody reading (sqlnotify's trigger applied
//!   from `install_sql()`), to separate the trigger from the reader's share of the two cores.
//!
//! Commits: MySQL has no per-session asynchronous commit (`innodb_flush_log_at_trx_commit`
//! is global), and the benchmark does not change server settings, so every MySQL run commits
//! with the server's setting, printed in the header (unlike the PostgreSQL throughput rows,
//! which use `synchronous_commit=off`).
//!
//! Sections (`--only=`): `mysql-latency-200`, `mysql-latency-1000`,
//! `mysql-throughput-1w-100r-small`, `mysql-cost`, `mysql-idle`, and `mysql-snapshot-1m`
//! (in `change_data.rs`; `snapshot-1m` selects it too); `mysql` selects them all.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts};
use serde_json::Value;
use sqlnotify::{Notifier, Operation, Subscription, Watch};

use crate::common::{count, ms, Table};
use crate::recorder::{RawRow, Shared};
use crate::writer::{Spec, Target, Writers};
use crate::{
    cost_row, cpu_over, in_rounds, latency_row, losses, outcome, throughput_row, with_dbname, Ctx,
    Load, Outcome, Shape, SMALL,
};

/// Where the server is when no variable names one.
const DEFAULT_URL: &str = "mysql://root@127.0.0.1:3306/test";
/// Rows the raw poller reads per query (like sqlnotify's listener).
const RAW_BATCH: usize = 1_000;
/// The raw poller's interval (sqlnotify's while rows flow).
const RAW_INTERVAL: Duration = Duration::from_millis(1);

/// What listens, and how the table is set up.
#[derive(Debug, Clone, Copy, PartialEq)]
enum System {
    /// No trigger (writer-cost baseline).
    NoTrigger,
    /// A minimal `JSON_OBJECT` row trigger into an `AUTO_INCREMENT` log table, read by a raw
    /// 1 ms polling loop (latency and throughput baseline).
    Raw,
    /// The raw trigger with nobody polling (writer cost only).
    RawUnheard,
    /// A sqlnotify notifier with one watch.
    Sqlnotify,
    /// sqlnotify's trigger (applied from `install_sql()`) with no listener (writer cost only).
    SqlnotifyUnheard,
}

impl System {
    fn label(self, flavor: &str) -> String {
        match self {
            System::NoTrigger => format!("{flavor}, no trigger"),
            System::Raw => format!("{flavor} raw JSON_OBJECT trigger + 1 ms polling loop"),
            System::RawUnheard => format!("{flavor} raw JSON_OBJECT trigger, nobody polling"),
            System::Sqlnotify => flavor.to_string(),
            System::SqlnotifyUnheard => format!("{flavor}, sqlnotify trigger, nobody listening"),
        }
    }

    fn delivers(self) -> bool {
        matches!(self, System::Raw | System::Sqlnotify)
    }
}

/// Whether any MySQL section runs.
fn wanted(args: &crate::common::Args) -> bool {
    [
        "mysql-latency-200",
        "mysql-latency-1000",
        "mysql-throughput-1w-100r-small",
        "mysql-cost",
        "mysql-idle",
    ]
    .iter()
    .any(|name| args.wants(name))
        || crate::change_data::wants_mysql(args)
}

/// `url` with its password (if any) replaced by `***`, for printing.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end], &rest[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

async fn connect(url: &str) -> mysql_async::Result<Conn> {
    Conn::new(Opts::from_url(url)?).await
}

/// The benchmark's own database on a MySQL / MariaDB server.
pub struct MysqlBench {
    server_url: String,
    db: String,
    url: String,
    /// "MySQL" or "MariaDB", for the labels.
    flavor: &'static str,
    /// How commits are made durable, for the labels: `innodb_flush_log_at_trx_commit=1,
    /// sync_binlog=1` or `innodb_flush_log_at_trx_commit=1, binlog off`.
    commit: String,
}

impl MysqlBench {
    /// Connects, drops leftovers of killed runs, creates the database and prints the server
    /// line. `None` when no MySQL section runs or no server answers (a line says so).
    pub async fn setup(args: &crate::common::Args) -> Option<MysqlBench> {
        if !wanted(args) {
            return None;
        }
        let server_url = std::env::var("SQLNOTIFY_BENCH_MYSQL_URL")
            .or_else(|_| std::env::var("SQLNOTIFY_TEST_MYSQL_URL"))
            .unwrap_or_else(|_| DEFAULT_URL.into());
        let mut admin =
            match tokio::time::timeout(Duration::from_secs(10), connect(&server_url)).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return skipped(&server_url, &e.to_string()),
                Err(_) => return skipped(&server_url, "no answer within 10 s"),
            };
        remove_leftovers(&mut admin).await;
        let db = format!("sqlnotify_bench_{}", std::process::id());
        admin
            .query_drop(format!("CREATE DATABASE `{db}` CHARACTER SET utf8mb4"))
            .await
            .expect("create the MySQL benchmark database");
        let (version, comment, flush, log_bin, sync_binlog, pool): (
            String,
            String,
            String,
            String,
            String,
            String,
        ) = admin
            .query_first(
                "SELECT VERSION(), CAST(@@version_comment AS CHAR), \
                 CAST(@@innodb_flush_log_at_trx_commit AS CHAR), CAST(@@log_bin AS CHAR), \
                 CAST(@@sync_binlog AS CHAR), CAST(@@innodb_buffer_pool_size AS CHAR)",
            )
            .await
            .expect("MySQL server settings")
            .expect("a row");
        let _ = admin.disconnect().await;
        let flavor = if version.to_ascii_lowercase().contains("mariadb") {
            "MariaDB"
        } else {
            "MySQL"
        };
        let pool_mib = pool.parse::<u64>().unwrap_or(0) / (1 << 20);
        let comment = comment.trim_matches(['(', ')']);
        let commit = if log_bin == "1" || log_bin.eq_ignore_ascii_case("on") {
            format!("innodb_flush_log_at_trx_commit={flush}, sync_binlog={sync_binlog}")
        } else {
            format!("innodb_flush_log_at_trx_commit={flush}, binlog off")
        };
        let url = with_dbname(&server_url, &db);
        println!(
            "{flavor} {version} ({comment}; innodb_flush_log_at_trx_commit={flush}, log_bin={log_bin}, sync_binlog={sync_binlog}, innodb_buffer_pool_size={pool_mib}MB) at {}; \
             MySQL writers commit with the server's setting in every section; latency/throughput baseline: a raw 1 ms polling loop behind a minimal JSON_OBJECT trigger",
            redact(&server_url)
        );
        Some(MysqlBench {
            server_url,
            db,
            url,
            flavor,
            commit,
        })
    }

    pub async fn teardown(self) {
        match connect(&self.server_url).await {
            Ok(mut admin) => {
                if let Err(e) = admin
                    .query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.db))
                    .await
                {
                    eprintln!("could not drop the MySQL database {}: {e}", self.db);
                }
                let _ = admin.disconnect().await;
            }
            Err(e) => eprintln!("could not drop the MySQL database {}: {e}", self.db),
        }
    }

    pub async fn run(&self, ctx: &Ctx, table: &mut Table) {
        self.latency(ctx, table).await;
        self.throughput(ctx, table).await;
        self.cost(ctx, table).await;
        self.idle(ctx, table).await;
        crate::change_data::snapshot_mysql(ctx, table, &self.url, self.flavor).await;
    }

    async fn latency(&self, ctx: &Ctx, table: &mut Table) {
        for rate in [200, 1000] {
            if !ctx.args.wants(&format!("mysql-latency-{rate}")) {
                continue;
            }
            eprintln!("{} latency at {rate} rows/s …", self.flavor);
            let load = Load {
                writers: 1,
                rate,
                txn_rows: 1,
                payload_bytes: SMALL,
                duration: ctx.args.run_time(),
                async_commit: false,
            };
            let systems = [System::Raw, System::Sqlnotify];
            let [raw, o]: [Outcome; 2] = self
                .interleaved(ctx, &systems, load)
                .await
                .try_into()
                .expect("two outcomes");
            table.row(latency_row(
                format!(
                    "latency {rate} rows/s · {}",
                    System::Sqlnotify.label(self.flavor)
                ),
                &o,
                Some((&raw, "raw poll")),
            ));
        }
    }

    async fn throughput(&self, ctx: &Ctx, table: &mut Table) {
        let shape = Shape {
            writers: 1,
            txn_rows: 100,
            payload_bytes: SMALL,
        };
        if !ctx
            .args
            .wants(&format!("mysql-throughput-{}", shape.name()))
        {
            return;
        }
        eprintln!("{} throughput {} …", self.flavor, shape.describe());
        let load = Load {
            writers: shape.writers,
            rate: 0,
            txn_rows: shape.txn_rows,
            payload_bytes: shape.payload_bytes,
            duration: ctx.args.run_time(),
            async_commit: false,
        };
        let systems = [System::Raw, System::Sqlnotify];
        let [raw, o]: [Outcome; 2] = self
            .interleaved(ctx, &systems, load)
            .await
            .try_into()
            .expect("two outcomes");
        table.row(throughput_row(
            format!(
                "throughput {}, {} · {}",
                shape.describe(),
                self.commit,
                System::Sqlnotify.label(self.flavor)
            ),
            &o,
            Some((&raw, "raw poll")),
        ));
    }

    async fn cost(&self, ctx: &Ctx, table: &mut Table) {
        if !ctx.args.wants("mysql-cost") {
            return;
        }
        eprintln!("{} writer cost …", self.flavor);
        let load = Load {
            writers: 1,
            rate: 0,
            txn_rows: 100,
            payload_bytes: SMALL,
            // Like the PostgreSQL rows: one second per system with --quick.
            duration: if ctx.args.quick {
                Duration::from_secs(1)
            } else {
                ctx.args.run_time()
            },
            async_commit: false,
        };
        let systems = [
            System::NoTrigger,
            System::Raw,
            System::RawUnheard,
            System::Sqlnotify,
            System::SqlnotifyUnheard,
        ];
        let mut outcomes: Vec<(System, Outcome)> = systems
            .iter()
            .copied()
            .zip(self.interleaved(ctx, &systems, load).await)
            .collect();
        let none = outcomes.remove(0).1;
        let raw = outcomes[0].1.clone();
        let what = format!(
            "writer cost, 1 writer × 100-row txns, 16 B, {}",
            self.commit
        );
        for (system, o) in outcomes {
            table.row(cost_row(
                format!("{what} · {}", system.label(self.flavor)),
                &o,
                &none,
                (system != System::Raw).then_some(&raw),
                system.delivers(),
            ));
        }
    }

    async fn idle(&self, ctx: &Ctx, table: &mut Table) {
        if !ctx.args.wants("mysql-idle") {
            return;
        }
        eprintln!("{} idle listener CPU …", self.flavor);
        let window = if ctx.args.quick {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(10)
        };
        // sqlnotify's listener polls every millisecond for 500 ms after start-up, then backs
        // off to 25 ms: let that pass.
        let settle = Duration::from_secs(1);
        let nothing = cpu_over(window).await;
        let mut raw = f64::NAN;
        for system in [System::Raw, System::Sqlnotify] {
            let (table_name, running) = self.set_up(ctx, system, &Shared::default()).await;
            cpu_over(settle).await;
            let used = cpu_over(window).await;
            running.stop().await;
            self.tear_down(&table_name).await;
            if system == System::Raw {
                raw = used;
                continue;
            }
            table.row(vec![
                format!("idle listener · {}", system.label(self.flavor)),
                "CPU, % of a core".into(),
                format!("{:.2} (nothing listening)", nothing * 100.0),
                format!("{:.2}", used * 100.0),
                "—".into(),
                format!(
                    "this process over {} s, listener started, no writes (raw 1 ms polling loop: {:.2}); the server's side of the polls is not counted",
                    window.as_secs(),
                    raw * 100.0
                ),
            ]);
        }
    }

    async fn interleaved(&self, ctx: &Ctx, systems: &[System], load: Load) -> Vec<Outcome> {
        in_rounds(ctx, systems, load, |system, load| {
            self.measure(ctx, system, load)
        })
        .await
    }

    /// Creates a table `bench_<n>` and sets `system` up on it.
    async fn set_up(&self, ctx: &Ctx, system: System, shared: &Shared) -> (String, Running) {
        let table = format!("bench_{}", ctx.id());
        let mut conn = connect(&self.url).await.expect("connect to MySQL");
        conn.query_drop(format!(
            "CREATE TABLE {table} (id BIGINT PRIMARY KEY, sent_us BIGINT NOT NULL, \
             payload TEXT NOT NULL) ENGINE=InnoDB"
        ))
        .await
        .expect("create table");
        if matches!(system, System::Raw | System::RawUnheard) {
            for sql in raw_trigger_sql(&table) {
                conn.query_drop(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        }
        let _ = conn.disconnect().await;
        let running = match system {
            System::NoTrigger | System::RawUnheard => Running::Nothing,
            System::SqlnotifyUnheard => {
                let script = Notifier::builder(&self.url)
                    .watch(bench_watch(&table))
                    .install_sql()
                    .await
                    .expect("sqlnotify's install script");
                let mut conn = connect(&self.url).await.expect("connect to MySQL");
                conn.query_drop(script)
                    .await
                    .expect("apply sqlnotify's install script");
                let _ = conn.disconnect().await;
                Running::Nothing
            }
            System::Raw => Running::Raw(
                RawPoller::start(&self.url, &format!("{table}_rawlog"), shared.clone()).await,
            ),
            System::Sqlnotify => {
                let notifier = Notifier::builder(&self.url)
                    .watch(bench_watch(&table))
                    .cleanup_on_stop(true)
                    .start()
                    .await
                    .expect("start the MySQL notifier");
                let recorder = shared.clone();
                notifier
                    .subscribe_fn(Subscription::new(&table, Operation::Insert), move |event| {
                        recorder.record(
                            event.id().as_i64(),
                            event.get("sent_us").and_then(Value::as_i64),
                        );
                    })
                    .await
                    .expect("subscribe");
                Running::Notifier(notifier)
            }
        };
        (table, running)
    }

    /// Drops the table (with its triggers) and its raw log, and empties sqlnotify's journal
    /// and catalog so that every run starts alike.
    async fn tear_down(&self, table: &str) {
        let mut conn = connect(&self.url).await.expect("connect to MySQL");
        conn.query_drop(format!("DROP TABLE {table}"))
            .await
            .expect("drop table");
        conn.query_drop(format!("DROP TABLE IF EXISTS {table}_rawlog"))
            .await
            .expect("drop the raw log");
        let journal: Option<i64> = conn
            .query_first(
                "SELECT COUNT(*) FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'sqlnotify_journal'",
            )
            .await
            .expect("look for the journal");
        if journal.unwrap_or(0) > 0 {
            conn.query_drop("TRUNCATE TABLE sqlnotify_journal")
                .await
                .expect("empty the journal");
            // A trigger installed from the script leaves a catalog row nobody removes.
            conn.query_drop("DELETE FROM sqlnotify_catalog")
                .await
                .expect("empty the catalog");
        }
        let _ = conn.disconnect().await;
    }

    /// Sets `system` up, runs the writers, waits for delivery, tears down.
    async fn measure(&self, ctx: &Ctx, system: System, load: Load) -> Outcome {
        let shared = Shared::default();
        let (table, running) = self.set_up(ctx, system, &shared).await;
        let specs: Vec<Spec> = (0..load.writers)
            .map(|w| Spec {
                target: Target::Mysql(self.url.clone()),
                table: table.clone(),
                rate: load.rate,
                duration_ms: load.duration.as_millis() as u64,
                txn_rows: load.txn_rows,
                payload_bytes: load.payload_bytes,
                writer: w,
                async_commit: false,
                update_previous: false,
                session_sql: None,
            })
            .collect();
        let mut writers = Writers::start(&specs).await;
        writers.go();
        let reports = writers.finish().await;
        let committed: u64 = reports.iter().map(|r| r.committed).sum();
        if system.delivers() {
            let (idle, cap) = ctx.args.waits();
            shared.wait_for(committed, idle, cap).await;
        }
        running.stop().await;
        self.tear_down(&table).await;
        let o = outcome(&reports, &shared, system.delivers());
        if system.delivers() {
            eprintln!(
                "  {}: p50/p99 {}/{} ms, committed {} rows/s, delivered {} ev/s, {}",
                system.label(self.flavor),
                ms(o.p(50.0)),
                ms(o.p(99.0)),
                count(o.commit_rate),
                count(o.delivered_rate),
                losses(&o)
            );
        } else {
            eprintln!(
                "  {}: committed {} rows/s",
                system.label(self.flavor),
                count(o.commit_rate)
            );
        }
        o
    }
}

/// Prints why the MySQL rows are missing.
fn skipped(url: &str, reason: &str) -> Option<MysqlBench> {
    let line = format!("MySQL: skipped: no MySQL at {} ({reason})", redact(url));
    println!("{line}");
    eprintln!("{line}");
    None
}

/// Drops the databases of earlier runs that were killed before they could clean up.
async fn remove_leftovers(admin: &mut Conn) {
    let names: Vec<String> = admin
        .query(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA \
             WHERE SCHEMA_NAME LIKE 'sqlnotify\\_bench\\_%'",
        )
        .await
        .unwrap_or_default();
    for name in names {
        let gone = name
            .strip_prefix("sqlnotify_bench_")
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
        if gone {
            eprintln!("dropping MySQL database {name}, left over by a killed run");
            let _ = admin
                .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                .await;
        }
    }
}

/// The watch every sqlnotify run uses: inserts, with the send time and payload.
fn bench_watch(table: &str) -> Watch {
    Watch::new(table, Operation::Insert).extra_columns(["sent_us", "payload"])
}

/// The raw baseline's log table and trigger.
fn raw_trigger_sql(table: &str) -> [String; 2] {
    [
        format!(
            "CREATE TABLE {table}_rawlog (seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, \
             payload LONGTEXT NOT NULL) ENGINE=InnoDB"
        ),
        format!(
            "CREATE TRIGGER {table}_raw AFTER INSERT ON {table} FOR EACH ROW \
             INSERT INTO {table}_rawlog (payload) \
             VALUES (JSON_OBJECT('id', NEW.id, 'sent_us', NEW.sent_us, 'payload', NEW.payload))"
        ),
    ]
}

/// A running listener of some kind.
enum Running {
    Nothing,
    Raw(RawPoller),
    Notifier(Notifier),
}

impl Running {
    async fn stop(self) {
        match self {
            Running::Nothing => {}
            Running::Raw(raw) => raw.stop().await,
            Running::Notifier(n) => n.stop().await.expect("stop the notifier"),
        }
    }
}

/// The raw baseline: reads the log table by `seq` every millisecond on a connection of its
/// own (READ COMMITTED, autocommit, like sqlnotify's listener) and records each row.
struct RawPoller {
    stop: Rc<Cell<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawPoller {
    async fn start(url: &str, log: &str, shared: Shared) -> RawPoller {
        let mut conn = connect(url).await.expect("raw poller: connect");
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .await
            .expect("raw poller: isolation level");
        let statement = conn
            .prep(format!(
                "SELECT seq, payload FROM {log} WHERE seq > ? ORDER BY seq LIMIT {RAW_BATCH}"
            ))
            .await
            .expect("raw poller: prepare");
        let stop = Rc::new(Cell::new(false));
        let stopped = stop.clone();
        let task = actix_rt::spawn(async move {
            let mut last = 0i64;
            while !stopped.get() {
                let rows: Vec<(i64, String)> = conn
                    .exec(&statement, (last,))
                    .await
                    .expect("raw poller: read");
                for (seq, payload) in &rows {
                    last = *seq;
                    match serde_json::from_str::<RawRow>(payload) {
                        Ok(row) => shared.record(Some(row.id), Some(row.sent_us)),
                        Err(_) => shared.record(None, None),
                    }
                }
                if rows.len() < RAW_BATCH {
                    tokio::time::sleep(RAW_INTERVAL).await; // the polling interval
                }
            }
            let _ = conn.disconnect().await;
        });
        RawPoller { stop, task }
    }

    async fn stop(self) {
        self.stop.set(true);
        let _ = self.task.await;
    }
}
