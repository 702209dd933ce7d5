//! The change-data rows of the end-to-end benchmark (issue 15): reading a large table as a
//! snapshot against a plain read of the same rows, and what old values and context cost the
//! writer, each against a baseline measured in the same run.
//!
//! Sections (`--only=`):
//!
//! * `snapshot-1m` (`snapshot` selects it): a fresh table of 1,000,000 rows (200,000 with
//!   `--quick`; the row count is printed) — `id integer` key, an `integer`, a 40-byte `text`
//!   and a `timestamptz` — watched for INSERT, UPDATE and DELETE with the three as extra
//!   columns, on PostgreSQL's durable tier and on a SQLite file. The baseline reads the same
//!   rows as the same JSON the snapshot reads: on PostgreSQL a `REPEATABLE READ` transaction
//!   and a cursor, `FETCH 1000` at a time (as `src/postgres/snapshot.rs` reads); on SQLite
//!   one read transaction stepping through the `SELECT json_object(…)` in key order (as
//!   `src/sqlite/snapshot.rs` reads). sqlnotify: `Notifier::subscribe_snapshot` with
//!   `chunk_rows(1000)`, read until `progress().done` and every row of `total` arrived. Rows/s
//!   from the start of each read (the connection included) to its last row; VmHWM (peak
//!   resident memory) before and after the snapshot.
//! * `mysql-snapshot-1m` (feature `mysql`; `snapshot-1m`, `snapshot` and `mysql` select it):
//!   the same on MySQL / MariaDB (`id INT` key, an `INT`, a `VARCHAR(40)`, a `DATETIME`,
//!   InnoDB), in the database of `mysql.rs`. The baseline is one plain `SELECT` of the same
//!   `JSON_OBJECT` in key order, streamed through mysql_async in a `REPEATABLE READ`
//!   transaction `WITH CONSISTENT SNAPSHOT`; the details add the snapshot's own keyset pages
//!   (`WHERE id > last ORDER BY id LIMIT 1000`, as `src/mysql/snapshot.rs` reads) from
//!   mysql_async, to tell the paging's share from sqlnotify's.
//! * `cost-change-data` (`cost` selects it, like `cost-sync` and `cost-async`): one writer
//!   process, 100-row transactions that each insert 100 rows and update the 100 rows the
//!   previous one inserted (one statement; `synchronous_commit=off`, so the rate is CPU, not
//!   the disk's flush), on a table with no trigger, and on the durable tier with row capture
//!   of INSERT, UPDATE and DELETE: today's trigger (extra columns), `old_values(true)`,
//!   `context([..])` and both. Every writer runs `SET app.user_id = '42'` once on its
//!   connection. The listener runs and must see every insert and update.

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlnotify::{Notifier, Operation, Snapshot, Subscription, Tier, Watch};

use crate::common::{count, ms, proc_status_kb, ratio, Table};
use crate::recorder::Shared;
use crate::writer::{Spec, Target, Writers};
use crate::{
    connect, create_table_sql, in_rounds, losses, outcome, subscribe, Ctx, Load, Outcome, SMALL,
};

/// The sections, for `--only`.
pub const SNAPSHOT: &str = "snapshot-1m";
/// The MySQL / MariaDB snapshot row (also selected by [`SNAPSHOT`] and by `mysql`).
#[cfg(feature = "mysql")]
pub const MYSQL_SNAPSHOT: &str = "mysql-snapshot-1m";
pub const COST: &str = "cost-change-data";

/// Rows of the snapshot table: a full run, and `--quick`.
const SNAPSHOT_ROWS: u64 = 1_000_000;
const SNAPSHOT_ROWS_QUICK: u64 = 200_000;
/// Rows per snapshot chunk, and per baseline `FETCH`.
const CHUNK: usize = 1_000;
/// The snapshot table's extra columns.
const COLUMNS: [&str; 4] = ["id", "n", "note", "at"];

/// Runs the change-data sections that `--only` selects.
pub async fn run(ctx: &Ctx, table: &mut Table) {
    if ctx.args.wants(SNAPSHOT) {
        let rows = snapshot_rows(ctx);
        snapshot_postgres(ctx, table, rows).await;
        snapshot_sqlite(ctx, table, rows).await;
    }
    if ctx.args.wants(COST) {
        cost(ctx, table).await;
    }
}

/// Rows of the snapshot table in this run.
fn snapshot_rows(ctx: &Ctx) -> u64 {
    if ctx.args.quick {
        SNAPSHOT_ROWS_QUICK
    } else {
        SNAPSHOT_ROWS
    }
}

/// The snapshot table's watches: INSERT, UPDATE and DELETE carrying every column.
fn snapshot_watches(table: &str, tier: Option<Tier>) -> Vec<Watch> {
    [Operation::Insert, Operation::Update, Operation::Delete]
        .into_iter()
        .map(|op| {
            let w = Watch::new(table, op).extra_columns(COLUMNS[1..].iter().copied());
            match tier {
                Some(tier) => w.tier(tier),
                None => w,
            }
        })
        .collect()
}

/// One read of every row: how many, how long, and the JSON's bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Read {
    rows: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Read {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What the snapshot did to this process's memory: VmHWM and VmRSS before and after, in kB.
struct Memory {
    hwm_before: u64,
    hwm_after: u64,
    rss_before: u64,
    rss_after: u64,
}

impl Memory {
    fn describe(&self, data_bytes: u64) -> String {
        let growth = self.hwm_after.saturating_sub(self.hwm_before);
        format!(
            "VmHWM {} → {} kB (+{} kB; the rows' JSON is {} kB, so {:.1}% of it) · VmRSS {} → {} kB",
            count(self.hwm_before as f64),
            count(self.hwm_after as f64),
            count(growth as f64),
            count(data_bytes as f64 / 1024.0),
            growth as f64 * 1024.0 / (data_bytes as f64).max(1.0) * 100.0,
            count(self.rss_before as f64),
            count(self.rss_after as f64)
        )
    }
}

/// Reads the snapshot of `table` until every row of its `total` arrived and it is `done`
/// (giving up when nothing arrives for the first of `ctx_waits`); the memory around it.
async fn read_snapshot(
    notifier: &Notifier,
    table: &str,
    ctx_waits: (Duration, Duration),
) -> (Read, Memory, u64) {
    let hwm_before = proc_status_kb("VmHWM");
    let rss_before = proc_status_kb("VmRSS");
    let started = Instant::now();
    let mut feed = notifier
        .subscribe_snapshot(Snapshot::new(table).chunk_rows(CHUNK))
        .await
        .expect("subscribe a snapshot");
    let (mut rows, mut other) = (0u64, 0u64);
    let (idle, _) = ctx_waits;
    loop {
        let event = match tokio::time::timeout(idle, feed.next()).await {
            Ok(Some(event)) => event.expect("a snapshot event"),
            Ok(None) => panic!("the snapshot feed ended: {:?}, {rows} rows", feed.progress()),
            Err(_) => panic!(
                "no snapshot event for {idle:?}: {:?}, {rows} snapshot rows and {other} changes arrived",
                feed.progress()
            ),
        };
        if event.is_snapshot() {
            rows += 1;
            // Touch the row as a reader would (as the baseline touches its text).
            std::hint::black_box(event.get("note"));
        } else {
            other += 1;
        }
        // The last row arrives before the feeder marks the snapshot done (it sets the flag
        // once its send of that row returned), so the count decides; `done` must follow.
        if feed.progress().total == Some(rows) {
            break;
        }
    }
    let elapsed = started.elapsed();
    let deadline = Instant::now() + idle;
    while !feed.progress().done {
        assert!(
            Instant::now() < deadline,
            "every row arrived but the snapshot is not done: {:?}",
            feed.progress()
        );
        tokio::time::sleep(Duration::from_millis(1)).await; // bounded wait for the flag
    }
    drop(feed);
    let memory = Memory {
        hwm_before,
        hwm_after: proc_status_kb("VmHWM"),
        rss_before,
        rss_after: proc_status_kb("VmRSS"),
    };
    (
        Read {
            rows,
            bytes: 0,
            elapsed,
        },
        memory,
        other,
    )
}

/// The PostgreSQL baseline: the snapshot's query through a cursor in a `REPEATABLE READ`
/// transaction on a new connection, `FETCH 1000` at a time; with `parse`, each row's JSON
/// parsed into a `serde_json::Value` too (what turning it into an event starts with).
async fn pg_baseline(url: &str, table: &str, parse: bool) -> Read {
    let select: Vec<String> = COLUMNS
        .iter()
        .map(|c| format!("'{c}', _sqn_r.\"{c}\""))
        .collect();
    let started = Instant::now();
    let client = connect(url).await;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
             DECLARE _bench NO SCROLL CURSOR FOR
               SELECT pg_catalog.json_build_object({})::text FROM \"public\".\"{table}\" AS _sqn_r
               ORDER BY _sqn_r.\"id\"",
            select.join(", ")
        ))
        .await
        .expect("baseline: open the cursor");
    let fetch = format!("FETCH {CHUNK} FROM _bench");
    let mut read = Read::default();
    loop {
        let chunk = client.query(&fetch, &[]).await.expect("baseline: fetch");
        if chunk.is_empty() {
            break;
        }
        for row in &chunk {
            let text: &str = row.get(0);
            read.rows += 1;
            read.bytes += text.len() as u64;
            if parse {
                let v: Value = serde_json::from_str(text).expect("baseline: JSON");
                assert!(v.get("note").is_some(), "baseline: a note");
            }
        }
    }
    client
        .batch_execute("COMMIT")
        .await
        .expect("baseline: commit");
    read.elapsed = started.elapsed();
    read
}

/// The snapshot section on PostgreSQL.
async fn snapshot_postgres(ctx: &Ctx, out: &mut Table, rows: u64) {
    eprintln!("change data: snapshot of {rows} rows, PostgreSQL …");
    let table = format!("cd_{}", ctx.id());
    let client = connect(&ctx.url).await;
    let filled = Instant::now();
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id integer PRIMARY KEY, n integer NOT NULL, note text NOT NULL,
                                   at timestamptz NOT NULL);
             INSERT INTO {table}
               SELECT g, g % 1000, substr(md5(g::text) || md5((g * 7)::text), 1, 40),
                      timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second'
               FROM generate_series(1, {rows}) g"
        ))
        .await
        .expect("fill the snapshot table");
    client
        .batch_execute(&format!("VACUUM ANALYZE {table}"))
        .await
        .expect("vacuum");
    let size: i64 = client
        .query_one(
            &format!("SELECT pg_catalog.pg_total_relation_size('{table}')"),
            &[],
        )
        .await
        .expect("table size")
        .get(0);
    eprintln!(
        "  table filled in {:.1} s ({} MB with its index)",
        filled.elapsed().as_secs_f64(),
        size / 1024 / 1024
    );
    let mut builder = Notifier::builder(&ctx.url).cleanup_on_stop(true);
    for w in snapshot_watches(&table, Some(Tier::Durable)) {
        builder = builder.watch(w);
    }
    let notifier = builder.start().await.expect("start the notifier");
    // A warm-up read, so neither measured read pays for a cold cache.
    let _ = pg_baseline(&ctx.url, &table, false).await;
    let base = pg_baseline(&ctx.url, &table, false).await;
    let parsed = pg_baseline(&ctx.url, &table, true).await;
    let (snap, memory, other) = read_snapshot(&notifier, &table, ctx.args.waits()).await;
    // The count(*) the snapshot runs when it opens (the baseline does not).
    let counted = Instant::now();
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count");
    let count_ms = counted.elapsed().as_secs_f64() * 1e3;
    notifier.stop().await.expect("stop the notifier");
    client
        .batch_execute(&format!(
            "DROP TABLE {table} CASCADE;
             DO $$ BEGIN
               IF to_regclass('sqlnotify.journal') IS NOT NULL THEN
                 TRUNCATE sqlnotify.journal, sqlnotify.overflow;
               END IF;
             END $$;"
        ))
        .await
        .expect("drop the snapshot table");
    out.row(snapshot_row(
        format!(
            "snapshot of {} rows (id, int, 40-byte text, timestamptz), durable tier · PostgreSQL",
            count(rows as f64)
        ),
        &base,
        &snap,
        format!(
            "baseline: tokio-postgres, the snapshot's json_build_object query through a cursor, \
             FETCH {CHUNK} (the same with serde_json parsing each row: {} rows/s, {} ms) · \
             sqlnotify: subscribe_snapshot, chunk_rows({CHUNK}), {} rows in {} ms (baseline {} \
             in {} ms; table {} MB, count(*) alone {} ms){} · {}",
            count(parsed.rate()),
            ms(parsed.elapsed.as_secs_f64() * 1e3),
            count(snap.rows as f64),
            ms(snap.elapsed.as_secs_f64() * 1e3),
            count(base.rows as f64),
            ms(base.elapsed.as_secs_f64() * 1e3),
            size / 1024 / 1024,
            ms(count_ms),
            if other > 0 {
                format!(" · {other} change events too")
            } else {
                String::new()
            },
            memory.describe(base.bytes)
        ),
    ));
}

/// Whether the MySQL / MariaDB snapshot row runs.
#[cfg(feature = "mysql")]
pub fn wants_mysql(args: &crate::common::Args) -> bool {
    args.wants(SNAPSHOT) || args.wants(MYSQL_SNAPSHOT)
}

/// MySQL's snapshot JSON for the snapshot table's row `_sqn_r`: what `row_payload_expr` in
/// `src/mysql/ddl.rs` renders for these columns (the `COALESCE` fallback to the key alone
/// left out: it never applies here).
#[cfg(feature = "mysql")]
const MYSQL_JSON: &str = "JSON_OBJECT('id', _sqn_r.`id`, 'n', _sqn_r.`n`, 'note', _sqn_r.`note`, \
                          'at', CAST(_sqn_r.`at` AS CHAR))";

/// The MySQL baselines, on a new connection in a `REPEATABLE READ` transaction `WITH
/// CONSISTENT SNAPSHOT` as sqlnotify's read: with `pages`, the snapshot's own keyset query
/// (`WHERE id > last ORDER BY id LIMIT 1000`, one query per page); without, one plain
/// `SELECT` of every row in key order, streamed.
#[cfg(feature = "mysql")]
async fn mysql_baseline(url: &str, table: &str, pages: bool) -> Read {
    use mysql_async::prelude::Queryable;
    let started = Instant::now();
    let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(url).expect("MySQL URL"))
        .await
        .expect("baseline: connect");
    conn.query_drop("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .expect("baseline: isolation");
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        .await
        .expect("baseline: begin");
    let mut read = Read::default();
    if pages {
        let mut last = 0i64;
        loop {
            let page: Vec<(String, i64)> = conn
                .exec(
                    format!(
                        "SELECT {MYSQL_JSON}, _sqn_r.`id` FROM `{table}` AS _sqn_r \
                         WHERE _sqn_r.`id` > ? ORDER BY _sqn_r.`id` LIMIT {CHUNK}"
                    ),
                    (last,),
                )
                .await
                .expect("baseline: page");
            for (text, id) in &page {
                read.rows += 1;
                read.bytes += text.len() as u64;
                last = *id;
            }
            if page.len() < CHUNK {
                break;
            }
        }
    } else {
        let mut result = conn
            .query_iter(format!(
                "SELECT {MYSQL_JSON} FROM `{table}` AS _sqn_r ORDER BY _sqn_r.`id`"
            ))
            .await
            .expect("baseline: query");
        result
            .for_each(|row| {
                let text: String = mysql_async::from_row(row);
                read.rows += 1;
                read.bytes += text.len() as u64;
            })
            .await
            .expect("baseline: rows");
    }
    conn.query_drop("COMMIT").await.expect("baseline: commit");
    read.elapsed = started.elapsed();
    let _ = conn.disconnect().await;
    read
}

/// The snapshot section on MySQL / MariaDB (`url`: the benchmark's database there).
#[cfg(feature = "mysql")]
pub async fn snapshot_mysql(ctx: &Ctx, out: &mut Table, url: &str, flavor: &str) {
    use mysql_async::prelude::Queryable;
    if !wants_mysql(&ctx.args) {
        return;
    }
    let rows = snapshot_rows(ctx);
    eprintln!("change data: snapshot of {rows} rows, {flavor} …");
    let table = format!("cd_{}", ctx.id());
    let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(url).expect("MySQL URL"))
        .await
        .expect("connect to MySQL");
    let filled = Instant::now();
    // ids 1..=rows from a cross join of digits (no recursive CTE: MySQL limits its depth)
    conn.query_drop(format!(
        "CREATE TABLE `{table}` (id INT PRIMARY KEY, n INT NOT NULL, note VARCHAR(40) NOT NULL,
                                 at DATETIME NOT NULL) ENGINE=InnoDB;
         CREATE TABLE `{table}_d` (i INT PRIMARY KEY);
         INSERT INTO `{table}_d` VALUES (0), (1), (2), (3), (4), (5), (6), (7), (8), (9);
         INSERT INTO `{table}`
           SELECT g, g % 1000, LEFT(CONCAT(MD5(g), MD5(g * 7)), 40),
                  TIMESTAMP '2026-01-01 00:00:00' + INTERVAL g SECOND
           FROM (SELECT 1 + a.i + 10 * b.i + 100 * c.i + 1000 * d.i + 10000 * e.i
                        + 100000 * f.i AS g
                 FROM `{table}_d` a, `{table}_d` b, `{table}_d` c, `{table}_d` d, `{table}_d` e,
                      `{table}_d` f) x
           WHERE g <= {rows};
         DROP TABLE `{table}_d`;
         ANALYZE TABLE `{table}`"
    ))
    .await
    .expect("fill the MySQL snapshot table");
    let size: Option<u64> = conn
        .exec_first(
            "SELECT CAST(DATA_LENGTH + INDEX_LENGTH AS UNSIGNED) FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            (&table,),
        )
        .await
        .expect("table size");
    let size = size.unwrap_or(0);
    eprintln!(
        "  table filled in {:.1} s ({} MB)",
        filled.elapsed().as_secs_f64(),
        size / 1024 / 1024
    );
    let mut builder = Notifier::builder(url).cleanup_on_stop(true);
    for w in snapshot_watches(&table, None) {
        builder = builder.watch(w);
    }
    let notifier = builder.start().await.expect("start the MySQL notifier");
    // A warm-up read, so neither measured read pays for a cold buffer pool.
    let _ = mysql_baseline(url, &table, false).await;
    let base = mysql_baseline(url, &table, false).await;
    let paged = mysql_baseline(url, &table, true).await;
    let (snap, memory, other) = read_snapshot(&notifier, &table, ctx.args.waits()).await;
    // The COUNT(*) the snapshot runs when it opens (the baselines do not).
    let counted = Instant::now();
    let _: Option<i64> = conn
        .query_first(format!("SELECT COUNT(*) FROM `{table}`"))
        .await
        .expect("count");
    let count_ms = counted.elapsed().as_secs_f64() * 1e3;
    notifier.stop().await.expect("stop the notifier");
    conn.query_drop(format!("DROP TABLE `{table}`"))
        .await
        .expect("drop the MySQL snapshot table");
    let _ = conn.disconnect().await;
    out.row(snapshot_row(
        format!(
            "snapshot of {} rows (id, int, 40-byte varchar, datetime) · {flavor}",
            count(rows as f64)
        ),
        &base,
        &snap,
        format!(
            "baseline: mysql_async, one plain SELECT of the snapshot's JSON_OBJECT in key order, \
             streamed, in a consistent-snapshot transaction (the snapshot's own keyset pages, \
             WHERE id > last … LIMIT {CHUNK}, from mysql_async: {} rows/s, {} ms) · sqlnotify: \
             subscribe_snapshot, chunk_rows({CHUNK}), {} rows in {} ms (baseline {} in {} ms; \
             table {} MB, COUNT(*) alone {} ms){} · {}",
            count(paged.rate()),
            ms(paged.elapsed.as_secs_f64() * 1e3),
            count(snap.rows as f64),
            ms(snap.elapsed.as_secs_f64() * 1e3),
            count(base.rows as f64),
            ms(base.elapsed.as_secs_f64() * 1e3),
            size / 1024 / 1024,
            ms(count_ms),
            if other > 0 {
                format!(" · {other} change events too")
            } else {
                String::new()
            },
            memory.describe(base.bytes)
        ),
    ));
}

/// A snapshot row: rows/s of the baseline and of sqlnotify.
fn snapshot_row(scenario: String, base: &Read, snap: &Read, details: String) -> Vec<String> {
    vec![
        scenario,
        "rows/s".into(),
        count(base.rate()),
        count(snap.rate()),
        ratio(snap.rate(), base.rate()),
        details,
    ]
}

/// SQLite's snapshot JSON for `columns` of the row `_sqn_r`: what `src/sqlite/ddl.rs`
/// renders (`json_object`, blobs as hex, infinities as text).
fn sqlite_json(columns: &[&str]) -> String {
    let args: Vec<String> = columns
        .iter()
        .map(|c| {
            let v = format!("_sqn_r.\"{c}\"");
            format!(
                "'{c}', CASE WHEN typeof({v}) = 'blob' THEN hex({v}) \
                 WHEN typeof({v}) = 'real' AND abs({v}) > 1.7976931348623157e308 \
                 THEN CASE WHEN {v} > 0 THEN 'Infinity' ELSE '-Infinity' END ELSE {v} END"
            )
        })
        .collect();
    format!("json_object({})", args.join(", "))
}

/// The SQLite baseline, on a thread of its own as sqlnotify's read is: one read transaction
/// on a new connection stepping through the snapshot's query.
async fn sqlite_baseline(path: std::path::PathBuf, table: String) -> Read {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let conn = rusqlite::Connection::open(&path).expect("baseline: open");
        conn.execute_batch("BEGIN").expect("baseline: begin");
        let mut read = Read::default();
        {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {} FROM \"{table}\" AS _sqn_r ORDER BY _sqn_r.\"id\"",
                    sqlite_json(&COLUMNS)
                ))
                .expect("baseline: prepare");
            let mut rows = stmt.query([]).expect("baseline: query");
            while let Some(row) = rows.next().expect("baseline: step") {
                let text: String = row.get(0).expect("baseline: text");
                read.rows += 1;
                read.bytes += text.len() as u64;
            }
        }
        conn.execute_batch("COMMIT").expect("baseline: commit");
        read.elapsed = started.elapsed();
        read
    })
    .await
    .expect("baseline thread")
}

/// The snapshot section on SQLite.
async fn snapshot_sqlite(ctx: &Ctx, out: &mut Table, rows: u64) {
    eprintln!("change data: snapshot of {rows} rows, SQLite …");
    let n = ctx.id();
    let table = format!("cd_{n}");
    let dir = ctx.tmp.join(format!("snapshot{n}"));
    std::fs::create_dir_all(&dir).expect("sqlite dir");
    let path = dir.join("app.db");
    {
        let conn = rusqlite::Connection::open(&path).expect("create the SQLite file");
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .expect("WAL");
        conn.execute_batch(&format!(
            "CREATE TABLE {table} (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, note TEXT NOT NULL,
                                   at TEXT NOT NULL);
             INSERT INTO {table}
               WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < {rows})
               SELECT x, x % 1000, lower(hex(randomblob(20))),
                      strftime('%Y-%m-%dT%H:%M:%SZ', 1767225600 + x, 'unixepoch')
               FROM g;"
        ))
        .expect("fill the SQLite table");
    }
    let mut builder = Notifier::builder(format!("sqlite://{}", path.display()));
    for w in snapshot_watches(&table, None) {
        builder = builder.watch(w);
    }
    let notifier = builder.start().await.expect("start the SQLite notifier");
    let _ = sqlite_baseline(path.clone(), table.clone()).await;
    let base = sqlite_baseline(path.clone(), table.clone()).await;
    let (snap, memory, other) = read_snapshot(&notifier, &table, ctx.args.waits()).await;
    notifier.stop().await.expect("stop the notifier");
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    let _ = std::fs::remove_dir_all(&dir);
    out.row(snapshot_row(
        format!(
            "snapshot of {} rows (id, int, 40-byte text, timestamp text) · SQLite",
            count(rows as f64)
        ),
        &base,
        &snap,
        format!(
            "baseline: rusqlite, the snapshot's json_object query in one read transaction on a \
             thread · sqlnotify: subscribe_snapshot, chunk_rows({CHUNK}), {} rows in {} ms \
             (baseline {} in {} ms; file {} MB){} · {}",
            count(snap.rows as f64),
            ms(snap.elapsed.as_secs_f64() * 1e3),
            count(base.rows as f64),
            ms(base.elapsed.as_secs_f64() * 1e3),
            size / 1024 / 1024,
            if other > 0 {
                format!(" · {other} change events too")
            } else {
                String::new()
            },
            memory.describe(base.bytes)
        ),
    ));
}

/// How the writer's rows are captured in the cost section.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Capture {
    /// No trigger (the baseline).
    None,
    /// Today's row trigger: the watches with extra columns.
    Today,
    /// `old_values(true)`.
    OldValues,
    /// `context([..])`.
    Context,
    /// Both.
    Both,
}

impl Capture {
    fn label(self) -> &'static str {
        match self {
            Capture::None => "no trigger",
            Capture::Today => "durable tier, row capture (extra columns; today's trigger)",
            Capture::OldValues => "durable tier, row capture + old_values(true)",
            Capture::Context => {
                "durable tier, row capture + context([current_user, application_name, app.user_id])"
            }
            Capture::Both => "durable tier, row capture + old_values(true) + context([..])",
        }
    }

    fn old_values(self) -> bool {
        matches!(self, Capture::OldValues | Capture::Both)
    }

    fn context(self) -> bool {
        matches!(self, Capture::Context | Capture::Both)
    }
}

/// Compared in the cost section; the first is the baseline.
const CAPTURES: [Capture; 5] = [
    Capture::None,
    Capture::Today,
    Capture::OldValues,
    Capture::Context,
    Capture::Both,
];

/// The context the cost section captures.
const CONTEXT: [&str; 3] = ["current_user", "application_name", "app.user_id"];

/// A fresh table with `capture`; one writer process commits `load` (inserting and updating);
/// the listener (when there is a trigger) must see every insert and update. The outcome counts
/// row changes: `committed` and `commit_rate` are inserts plus updates.
async fn measure(ctx: &Ctx, capture: Capture, load: Load) -> Outcome {
    let table = format!("bench_{}", ctx.id());
    let client = connect(&ctx.url).await;
    client
        .batch_execute(&create_table_sql(&table))
        .await
        .expect("create table");
    let inserts = Shared::default();
    let updates = Shared::default();
    let notifier = if capture == Capture::None {
        None
    } else {
        let mut builder = Notifier::builder(&ctx.url).cleanup_on_stop(true);
        for op in [Operation::Insert, Operation::Update, Operation::Delete] {
            let mut w = Watch::new(&table, op)
                .extra_columns(["sent_us", "payload"])
                .tier(Tier::Durable)
                .old_values(capture.old_values());
            if capture.context() {
                w = w.context(CONTEXT);
            }
            builder = builder.watch(w);
        }
        let notifier = builder.start().await.expect("start the notifier");
        subscribe(&notifier, &table, &inserts).await;
        let shared = updates.clone();
        notifier
            .subscribe_fn(Subscription::new(&table, Operation::Update), move |event| {
                shared.record(
                    event.id().as_i64(),
                    event.get("sent_us").and_then(Value::as_i64),
                );
            })
            .await
            .expect("subscribe to updates");
        Some(notifier)
    };
    let spec = Spec {
        target: Target::Postgres(ctx.url.clone()),
        table: table.clone(),
        rate: load.rate,
        duration_ms: load.duration.as_millis() as u64,
        txn_rows: load.txn_rows,
        payload_bytes: load.payload_bytes,
        writer: 0,
        async_commit: load.async_commit,
        update_previous: true,
        session_sql: Some("SET app.user_id = '42'".into()),
    };
    let mut writers = Writers::start(&[spec]).await;
    writers.go();
    let reports = writers.finish().await;
    let inserted: u64 = reports.iter().map(|r| r.committed).sum();
    let updated: u64 = reports.iter().map(|r| r.updated).sum();
    let delivers = notifier.is_some();
    if let Some(notifier) = notifier {
        let (idle, cap) = ctx.args.waits();
        inserts.wait_for(inserted, idle, cap).await;
        updates.wait_for(updated, idle, cap).await;
        notifier.stop().await.expect("stop the notifier");
    }
    client
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
    let mut o = outcome(&reports, &inserts, delivers);
    // Row changes: the updates join the inserts.
    o.commit_rate *= (inserted + updated) as f64 / (inserted as f64).max(1.0);
    o.committed += updated;
    if delivers {
        let rec = updates.recorder.borrow();
        o.unique += rec.unique;
        o.duplicates += rec.duplicates;
        o.malformed += rec.malformed;
        o.lost += updated.saturating_sub(rec.unique);
    }
    o
}

/// The cost section: every capture in interleaved rounds (5 in a full run, 1 with `--quick`).
async fn cost(ctx: &Ctx, table: &mut Table) {
    eprintln!("change data: writer cost of old values and context …");
    let load = Load {
        writers: 1,
        rate: 0,
        txn_rows: 100,
        payload_bytes: SMALL,
        duration: ctx.args.run_time(),
        async_commit: true,
    };
    let mut outcomes = in_rounds(ctx, &CAPTURES, load, |capture, load| {
        measure(ctx, capture, load)
    })
    .await
    .into_iter();
    let none = outcomes.next().expect("no trigger");
    let today = outcomes.next().expect("today's trigger");
    let what = "writer cost, 1 writer × 100-row txns inserting 100 rows and updating the previous \
                100, 16 B, synchronous_commit=off";
    let rows: Vec<(Capture, Outcome)> = std::iter::once((Capture::Today, today.clone()))
        .chain(CAPTURES[2..].iter().copied().zip(outcomes))
        .collect();
    for (capture, o) in rows {
        let mut details = format!(
            "loses {:.0}% of the no-trigger rate",
            (1.0 - o.commit_rate / none.commit_rate) * 100.0
        );
        if capture != Capture::Today {
            details.push_str(&format!(
                " · vs today's trigger {}",
                ratio(o.commit_rate, today.commit_rate)
            ));
        }
        details.push_str(&format!(
            " · commit p50 {} ms (no trigger {}) · listener running; {} (inserts and updates)",
            ms(o.commit_p(50.0)),
            ms(none.commit_p(50.0)),
            losses(&o)
        ));
        table.row(vec![
            format!("{what} · {}", capture.label()),
            "committed row changes/s".into(),
            format!("{} (no trigger)", count(none.commit_rate)),
            count(o.commit_rate),
            ratio(o.commit_rate, none.commit_rate),
            details,
        ]);
    }
}
