//! Writer processes: the benchmark binary re-executed with `SQLNOTIFY_BENCH_WRITER` set to a
//! JSON [`Spec`]. A writer connects, says `ready`, waits for `go` on stdin, commits for the
//! given time (at a fixed rate, or as fast as it can) and prints one JSON [`Report`] line.
//!
//! Every row carries the writer's wall-clock time just before the statement was sent, in
//! microseconds since the epoch (`sent_us`), and a unique id: `writer * ID_SPAN + n`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Environment variable that turns the benchmark binary into a writer.
pub const WRITER_ENV: &str = "SQLNOTIFY_BENCH_WRITER";
/// Ids of writer `w` are `w * ID_SPAN ..`.
pub const ID_SPAN: i64 = 1_000_000_000_000;

/// Where a writer writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Target {
    /// A PostgreSQL URL.
    Postgres(String),
    /// A SQLite database file.
    Sqlite(String),
    /// A MySQL / MariaDB URL (feature `mysql`).
    #[cfg(feature = "mysql")]
    Mysql(String),
}

/// What one writer process does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub target: Target,
    pub table: String,
    /// Transactions per second; 0 = as fast as possible.
    pub rate: u32,
    pub duration_ms: u64,
    /// Rows per transaction.
    pub txn_rows: u32,
    /// Length of the `payload` text column.
    pub payload_bytes: usize,
    /// Writer number (id range).
    pub writer: u32,
    /// PostgreSQL: `SET synchronous_commit = off` (commits do not wait for the WAL flush, so
    /// the rate shows CPU cost rather than disk latency). SQLite: `PRAGMA synchronous = OFF`.
    /// MySQL: not available per session (`innodb_flush_log_at_trx_commit` is global), so the
    /// server's setting applies and this must be false.
    pub async_commit: bool,
    /// PostgreSQL only: each transaction also updates the rows the previous one inserted
    /// (`sent_us` and a different payload of the same length), in the same statement — a
    /// data-modifying `WITH … UPDATE` before the `INSERT` — so old values have something to
    /// capture. [`Report::updated`] counts them.
    #[serde(default)]
    pub update_previous: bool,
    /// PostgreSQL only: SQL run once on the connection before the first transaction (e.g.
    /// `SET app.user_id = '42'`).
    #[serde(default)]
    pub session_sql: Option<String>,
}

/// What a writer reports when done.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Rows committed.
    pub committed: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// Rows updated (`Spec::update_previous`), not counted in `committed`.
    #[serde(default)]
    pub updated: u64,
    /// Wall clock (µs since the epoch) before the first and after the last commit.
    pub start_us: i64,
    pub end_us: i64,
    /// Failed transactions (e.g. SQLITE_BUSY), not counted as committed.
    pub errors: u64,
    /// Commit round trip (send → committed) of each transaction, in µs.
    pub commit_us: Vec<u32>,
    /// Paced runs only: (first row id, wall clock when the commit was acknowledged, µs) of
    /// each transaction.
    pub acks: Vec<(i64, i64)>,
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as i64
}

/// A payload of `len` letters and digits that does not compress (like real text, unlike
/// `repeat('x', n)`, which TOAST would shrink to nothing).
fn payload(len: usize, seed: u32) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (u64::from(seed) + 1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}

/// The child side: runs the writer described by `spec_json`.
pub fn child_main(spec_json: &str) {
    let spec: Spec = serde_json::from_str(spec_json).expect("writer spec");
    let report = match &spec.target {
        Target::Postgres(url) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(write_postgres(url, &spec))
        }
        Target::Sqlite(path) => write_sqlite(path, &spec),
        #[cfg(feature = "mysql")]
        Target::Mysql(url) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(write_mysql(url, &spec))
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&report).expect("report")).expect("stdout");
    out.flush().expect("stdout");
}

/// Says ready and blocks until the parent says go.
fn ready_and_wait() {
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready").expect("stdout");
        out.flush().expect("stdout");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("stdin");
}

/// Paces transactions: the n-th is due at `start + n / rate` (a late one is sent at once, so
/// the schedule catches up), or unpaced until the duration is over.
struct Pace {
    rate: u32,
    total: u64,
    start: Instant,
    until: Instant,
    done: u64,
}

impl Pace {
    fn new(spec: &Spec) -> Pace {
        let duration = Duration::from_millis(spec.duration_ms);
        let start = Instant::now();
        Pace {
            rate: spec.rate,
            total: (duration.as_secs_f64() * f64::from(spec.rate)).round() as u64,
            start,
            until: start + duration,
            done: 0,
        }
    }

    /// When the next transaction is due (`None`: the run is over).
    fn due(&mut self) -> Option<Instant> {
        let due = if self.rate > 0 {
            if self.done >= self.total {
                return None;
            }
            self.start + Duration::from_secs_f64(self.done as f64 / f64::from(self.rate))
        } else {
            let now = Instant::now();
            if now >= self.until {
                return None;
            }
            now
        };
        self.done += 1;
        Some(due)
    }

    /// Waits until the next transaction is due; false when the run is over.
    async fn next(&mut self) -> bool {
        match self.due() {
            Some(due) => {
                // Only when it is not due yet: tokio's timer has a 1 ms resolution, so even a
                // sleep until "now" would wait for the next tick.
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await; // fixed-rate pacing
                }
                true
            }
            None => false,
        }
    }

    /// The same for the blocking SQLite writer.
    fn next_blocking(&mut self) -> bool {
        match self.due() {
            Some(due) => {
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait); // fixed-rate pacing
                }
                true
            }
            None => false,
        }
    }
}

async fn write_postgres(url: &str, spec: &Spec) -> Report {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("writer: connect to PostgreSQL");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    if spec.async_commit {
        client
            .batch_execute("SET synchronous_commit = off")
            .await
            .expect("writer: synchronous_commit");
    }
    if let Some(sql) = &spec.session_sql {
        client
            .batch_execute(sql)
            .await
            .expect("writer: session set-up");
    }
    let mut sql = if spec.txn_rows <= 1 {
        format!(
            "INSERT INTO {} (id, sent_us, payload) VALUES ($1, $2, $3)",
            spec.table
        )
    } else {
        format!(
            "INSERT INTO {} (id, sent_us, payload) SELECT g, $2, $3 \
             FROM pg_catalog.generate_series($1::bigint, $1::bigint + {}) g",
            spec.table,
            spec.txn_rows - 1
        )
    };
    if spec.update_previous {
        // The previous transaction's rows: ids $1 - rows … $1 - 1 (none before the first).
        sql = format!(
            "WITH _prev AS (UPDATE {} SET sent_us = $2, payload = $4 \
             WHERE id BETWEEN $1::bigint - {} AND $1::bigint - 1) {sql}",
            spec.table,
            spec.txn_rows.max(1)
        );
    }
    let statement = client.prepare(&sql).await.expect("writer: prepare");
    let text = payload(spec.payload_bytes, spec.writer);
    let changed = payload(spec.payload_bytes, spec.writer + 1_000);
    let base = i64::from(spec.writer) * ID_SPAN;
    let rows = u64::from(spec.txn_rows.max(1));
    ready_and_wait();
    let mut pace = Pace::new(spec);
    let mut report = Report {
        start_us: now_us(),
        ..Report::default()
    };
    while pace.next().await {
        let id = base + report.committed as i64;
        let sent = now_us();
        let result = if spec.update_previous {
            client
                .execute(&statement, &[&id, &sent, &text, &changed])
                .await
        } else {
            client.execute(&statement, &[&id, &sent, &text]).await
        };
        match result {
            Ok(_) => {
                let done = now_us();
                if spec.update_previous && report.transactions > 0 {
                    report.updated += rows;
                }
                report.committed += rows;
                report.transactions += 1;
                report.commit_us.push((done - sent) as u32);
                if spec.rate > 0 {
                    report.acks.push((id, done));
                }
            }
            Err(e) => {
                match e.as_db_error() {
                    Some(db) => eprintln!("writer {}: {}", spec.writer, db.message()),
                    None => eprintln!("writer {}: {e}", spec.writer),
                }
                report.errors += 1;
            }
        }
    }
    report.end_us = now_us();
    report
}

fn write_sqlite(path: &str, spec: &Spec) -> Report {
    let mut conn = rusqlite::Connection::open(path).expect("writer: open SQLite");
    conn.busy_timeout(Duration::from_secs(30))
        .expect("busy timeout");
    if spec.async_commit {
        conn.execute_batch("PRAGMA synchronous = OFF")
            .expect("writer: synchronous");
    }
    let sql = format!(
        "INSERT INTO {} (id, sent_us, payload) VALUES (?1, ?2, ?3)",
        spec.table
    );
    conn.prepare_cached(&sql).expect("writer: prepare");
    let text = payload(spec.payload_bytes, spec.writer);
    let base = i64::from(spec.writer) * ID_SPAN;
    ready_and_wait();
    let mut pace = Pace::new(spec);
    let mut report = Report {
        start_us: now_us(),
        ..Report::default()
    };
    while pace.next_blocking() {
        let first = base + report.committed as i64;
        let sent = now_us();
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut insert = tx.prepare_cached(&sql)?;
                for i in 0..i64::from(spec.txn_rows.max(1)) {
                    insert.execute(rusqlite::params![first + i, sent, text])?;
                }
            }
            tx.commit()
        })();
        match result {
            Ok(()) => {
                let done = now_us();
                report.committed += u64::from(spec.txn_rows.max(1));
                report.transactions += 1;
                report.commit_us.push((done - sent) as u32);
                if spec.rate > 0 {
                    report.acks.push((first, done));
                }
            }
            Err(e) => {
                eprintln!("writer {}: {e}", spec.writer);
                report.errors += 1;
            }
        }
    }
    report.end_us = now_us();
    report
}

/// MySQL / MariaDB: each transaction is one autocommitted multi-row `INSERT … VALUES (…), …`
/// (a prepared statement with three parameters per row).
#[cfg(feature = "mysql")]
async fn write_mysql(url: &str, spec: &Spec) -> Report {
    use mysql_async::prelude::Queryable;
    use mysql_async::Value;

    assert!(
        !spec.async_commit,
        "MySQL has no per-session asynchronous commit"
    );
    let opts = mysql_async::Opts::from_url(url).expect("writer: MySQL URL");
    let mut conn = mysql_async::Conn::new(opts)
        .await
        .expect("writer: connect to MySQL");
    let rows = spec.txn_rows.max(1);
    let sql = format!(
        "INSERT INTO {} (id, sent_us, payload) VALUES {}",
        spec.table,
        vec!["(?, ?, ?)"; rows as usize].join(", ")
    );
    let statement = conn.prep(sql).await.expect("writer: prepare");
    let text = payload(spec.payload_bytes, spec.writer).into_bytes();
    let base = i64::from(spec.writer) * ID_SPAN;
    ready_and_wait();
    let mut pace = Pace::new(spec);
    let mut report = Report {
        start_us: now_us(),
        ..Report::default()
    };
    while pace.next().await {
        let first = base + report.committed as i64;
        let sent = now_us();
        let mut params = Vec::with_capacity(3 * rows as usize);
        for i in 0..i64::from(rows) {
            params.push(Value::Int(first + i));
            params.push(Value::Int(sent));
            params.push(Value::Bytes(text.clone()));
        }
        match conn.exec_drop(&statement, params).await {
            Ok(()) => {
                let done = now_us();
                report.committed += u64::from(rows);
                report.transactions += 1;
                report.commit_us.push((done - sent) as u32);
                if spec.rate > 0 {
                    report.acks.push((first, done));
                }
            }
            Err(e) => {
                eprintln!("writer {}: {e}", spec.writer);
                report.errors += 1;
            }
        }
    }
    report.end_us = now_us();
    let _ = conn.disconnect().await;
    report
}

/// Parent side: the running writer processes of one scenario.
pub struct Writers {
    children: Vec<(Child, ChildStdin)>,
    lines: mpsc::UnboundedReceiver<(usize, Option<String>)>,
}

impl Writers {
    /// Starts one process per spec and waits until every one is connected and ready.
    pub async fn start(specs: &[Spec]) -> Writers {
        let exe = std::env::current_exe().expect("current exe");
        let (tx, lines) = mpsc::unbounded_channel();
        let mut children = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let mut child = Command::new(&exe)
                .env(WRITER_ENV, serde_json::to_string(spec).expect("spec"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start a writer process");
            let stdin = child.stdin.take().expect("stdin");
            let stdout = child.stdout.take().expect("stdout");
            let tx = tx.clone();
            // A thread per child turns its stdout lines into messages (no blocking on the
            // actix thread, which must keep delivering events meanwhile).
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    match line {
                        Ok(line) => {
                            let _ = tx.send((i, Some(line)));
                        }
                        Err(_) => break,
                    }
                }
                let _ = tx.send((i, None));
            });
            children.push((child, stdin));
        }
        let mut writers = Writers { children, lines };
        for _ in 0..specs.len() {
            match writers.lines.recv().await {
                Some((_, Some(line))) if line == "ready" => {}
                other => panic!("a writer failed to start: {other:?}"),
            }
        }
        writers
    }

    /// Tells every writer to start.
    pub fn go(&mut self) {
        for (_, stdin) in &mut self.children {
            stdin.write_all(b"go\n").expect("writer stdin");
            stdin.flush().expect("writer stdin");
        }
    }

    /// Waits for every writer's report.
    pub async fn finish(mut self) -> Vec<Report> {
        let mut reports = vec![None; self.children.len()];
        while reports.iter().any(Option::is_none) {
            match self.lines.recv().await {
                Some((i, Some(line))) => {
                    reports[i] = Some(serde_json::from_str(&line).expect("writer report"));
                }
                Some((i, None)) => {
                    if reports[i].is_none() {
                        panic!("writer {i} ended without a report");
                    }
                }
                None => panic!("writers vanished"),
            }
        }
        for (mut child, stdin) in self.children {
            drop(stdin);
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
        reports.into_iter().map(|r| r.expect("report")).collect()
    }
}
