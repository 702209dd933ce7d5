//! Exactly-once effects (`Notifier::handle_in_transaction`) on PostgreSQL's durable tier.
//!
//! The main test SIGKILLs the handler's process at random moments, 10 times, while 5,000
//! source rows are committed (in small transactions, some rolled back); the effect table has
//! no unique constraint, so only the handler's record in `sqlnotify.effects` can keep an event
//! delivered again from being applied twice. At the end it has exactly one effect row per
//! committed source row and the counter equals the number of committed rows.
//!
//! The test binary re-executes itself as the handler's processes (the same test, with
//! `SQLNOTIFY_EXACTLY_CHILD_URL` set). Each one runs a notifier with the named consumer and a
//! transactional handler on inserts into `src` that inserts a row into `effects_t`, pauses
//! 0–3 ms and adds one to the counter row — so kills land inside handler transactions too.
//! It appends to a record file of its own with one plain `write` per line (which a SIGKILL
//! cannot take back): `ready` once its handler runs, `h <id>` as the handler begins on a row,
//! `skipped <n>` whenever `Stats::effects_skipped` changes (looked at every 5 ms, so a kill
//! may take the last few with it), and `final <skipped> <handled>` when it stops gracefully
//! (its stdin closed). Its connections carry an `application_name` of its own, so the test
//! can tell when the server has dropped a killed process's sessions.
//!
//! The smaller tests: a failed attempt (an error returned, or an error the handler caught and
//! ignored, which leaves its transaction aborted) rolls back its writes and the retry applies
//! them once; a handler failing every attempt leaves no effect and a dead letter; a dead
//! letter delivered again after its journal row was purged is applied once even when its row
//! could not be removed after the commit; a role granted only what the install script grants
//! runs a transactional handler, and its prune works; and `handle_in_transaction` is
//! `Error::Unsupported`, saying why, on SQLite, on MySQL (feature `mysql`) and on PostgreSQL's
//! notify tier.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlnotify::Operation::Insert;
use sqlnotify::{Error, Handling, Notifier, Subscription, Tier, Watch};

use common::children::{self, RecordDir};

/// Set in a handler's process: the database URL (with its `application_name`), its record
/// file and its number (stored with each effect row).
const CHILD_URL: &str = "SQLNOTIFY_EXACTLY_CHILD_URL";
const CHILD_RECORD: &str = "SQLNOTIFY_EXACTLY_CHILD_RECORD";
const CHILD_NUMBER: &str = "SQLNOTIFY_EXACTLY_CHILD_NUMBER";
/// Set to a number to repeat a run's random choices (each run prints its seed).
const SEED: &str = "SQLNOTIFY_EXACTLY_SEED";
/// The consumer and the handler every process runs as.
const CONSUMER: &str = "exactly";
const HANDLER: &str = "effects";

/// Committed source rows, and kills (the numbers).
const ROWS: i64 = 5_000;
const KILLS: usize = 10;
/// Rows per transaction (1 to this), and how many transactions in a hundred roll back.
const MAX_TRANSACTION: u64 = 5;
const ROLLBACK_PERCENT: u64 = 10;
/// Committed rows per second (about 12.5 s for all of them, if the kills keep up).
const ROWS_PER_SECOND: f64 = 400.0;
/// The kills are spread over the stream: kill `k` (from 0) comes once `(k + ½) × STRETCH`
/// rows are committed or being committed, and the writer waits at `(k + 1½) × STRETCH` until
/// it came, so the last stretch is committed after the last kill.
const STRETCH: i64 = ROWS / (KILLS as i64 + 1);
/// A process is killed a random time in this range (ms) after it said it is ready (and once
/// the writer is far enough); a new one starts a random time in the other after the kill.
const KILL_AFTER_MS: (u64, u64) = (20, 1_000);
const DOWNTIME_MS: (u64, u64) = (0, 500);
/// The handler's random pause inside its transaction, at most (µs).
const MAX_PAUSE_US: u64 = 3_000;
/// How long a process may take to start, the server to drop a killed one's sessions, and the
/// rows to be handled at the end.
const WITHIN: Duration = Duration::from_secs(60);
/// Polling interval of the bounded waits on record files, and of a process's stats report.
const POLL: Duration = Duration::from_millis(10);
const REPORT_EVERY: Duration = Duration::from_millis(5);

/// A small generator (xorshift64*): pauses, delays, transaction sizes and fates.
struct Dice(u64);

impl Dice {
    fn new(seed: u64) -> Dice {
        Dice(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `low..high`.
    fn within(&mut self, (low, high): (u64, u64)) -> u64 {
        low + self.next() % (high - low).max(1)
    }
}

/// A seed from the clock (or `SQLNOTIFY_EXACTLY_SEED`).
fn seed() -> u64 {
    std::env::var(SEED)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            now.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        })
}

/// One line, one `write` (a SIGKILL cannot leave half of it).
fn line(file: &File, text: String) {
    let mut file = file;
    file.write_all(text.as_bytes())
        .expect("a handler's process: write its record");
}

// ---------------------------------------------------------------------------------------------
// A handler's process
// ---------------------------------------------------------------------------------------------

/// A database of its own with `src (id)`, whose inserts are handled, and `effects_t
/// (src_id)`, where handlers write their effects.
async fn src_and_effects() -> common::TestDb {
    let db = common::TestDb::new().await;
    db.exec(
        "CREATE TABLE src (id bigint PRIMARY KEY);
         CREATE TABLE effects_t (src_id bigint NOT NULL);",
    )
    .await;
    db
}

/// In a handler's process: runs it and returns true; in the test's own process: false.
async fn handler_process() -> bool {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return false;
    };
    common::init_logging();
    let number: i32 = std::env::var(CHILD_NUMBER)
        .expect("the process's number")
        .parse()
        .expect("a number");
    let record = Rc::new(children::record_file(CHILD_RECORD, "a handler's process"));
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("src", Insert).tier(Tier::Durable))
        .consumer(CONSUMER)
        .start()
        .await
        .expect("a handler's process: start");
    let dice = Rc::new(RefCell::new(Dice::new(seed() ^ number as u64)));
    let r = record.clone();
    notifier
        .handle_in_transaction(
            Subscription::new("src", Insert),
            Handling::new(HANDLER)
                .backoff(Duration::from_millis(10), Duration::from_millis(200))
                .keys_in_flight(8),
            move |event, tx| {
                let (record, dice) = (r.clone(), dice.clone());
                async move {
                    let id = event.id().as_i64().ok_or("an integer key")?;
                    line(&record, format!("h {id}\n"));
                    tx.client()
                        .execute(
                            "INSERT INTO effects_t (src_id, process) VALUES ($1, $2)",
                            &[&id, &number],
                        )
                        .await?;
                    // The transaction stays open a while: kills land in it too.
                    let pause = dice.borrow_mut().within((0, MAX_PAUSE_US + 1));
                    tokio::time::sleep(Duration::from_micros(pause)).await;
                    tx.client()
                        .execute("UPDATE counter SET n = n + 1 WHERE id = 1", &[])
                        .await?;
                    Ok(())
                }
            },
        )
        .await
        .expect("a handler's process: handle_in_transaction");
    line(&record, "ready\n".into());
    let reporter = {
        let (notifier, record) = (notifier.clone(), record.clone());
        actix_rt::spawn(async move {
            let mut reported = 0;
            loop {
                let skipped = notifier.stats().await.expect("stats").effects_skipped;
                if skipped != reported {
                    line(&record, format!("skipped {skipped}\n"));
                    reported = skipped;
                }
                tokio::time::sleep(REPORT_EVERY).await; // a report's pace, not a wait
            }
        })
    };
    // Runs until killed, or until the test closes stdin (or dies).
    let _ = children::stdin_closed().await;
    reporter.abort();
    notifier.stop().await.expect("a handler's process: stop");
    let stats = notifier.stats().await.expect("stats");
    line(
        &record,
        format!("final {} {}\n", stats.effects_skipped, stats.handled),
    );
    true
}

// ---------------------------------------------------------------------------------------------
// The test's side: the handler's processes and their records
// ---------------------------------------------------------------------------------------------

/// What a process's record file says so far (complete lines only).
#[derive(Default)]
struct Record {
    ready: bool,
    /// The rows its handler began on, in order.
    calls: Vec<i64>,
    /// The last `effects_skipped` it reported.
    skipped: u64,
    /// `(effects_skipped, handled)` when it stopped gracefully.
    last: Option<(u64, u64)>,
}

impl Record {
    fn read(path: &Path) -> Record {
        let mut record = Record::default();
        for line in children::complete_lines(path).lines() {
            let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
            match kind {
                "ready" => record.ready = true,
                "h" => record.calls.push(rest.parse().expect("an id")),
                "skipped" => record.skipped = rest.parse().expect("a count"),
                "final" => {
                    let (skipped, handled) = rest.split_once(' ').expect("two counts");
                    let skipped = skipped.parse().expect("a count");
                    record.skipped = skipped;
                    record.last = Some((skipped, handled.parse().expect("a count")));
                }
                _ => panic!("unexpected record line {line:?}"),
            }
        }
        record
    }
}

/// One handler's process.
struct Process {
    child: Child,
    /// Closing it stops the process gracefully (kept open until then).
    stdin: Option<ChildStdin>,
    record: PathBuf,
    stderr: PathBuf,
    /// The `application_name` of its connections.
    application: String,
}

impl Process {
    fn record(&self) -> Record {
        Record::read(&self.record)
    }

    /// The end of what it wrote on stderr, for failure messages.
    fn stderr(&self) -> String {
        children::tail(&self.stderr, 4_000)
    }
}

/// The handler's processes (every one started), SIGKILLed on drop; their records are kept in
/// a directory of the test's own, removed unless the test failed.
struct Processes {
    test: String,
    url: String,
    dir: RecordDir,
    all: Vec<Process>,
}

impl Processes {
    fn new(test: &str, url: &str) -> Processes {
        let dir = RecordDir::new(
            &format!("sqlnotify-exactly-{test}"),
            format!("{test}: the handler processes' records"),
        );
        Processes {
            test: test.to_string(),
            url: url.to_string(),
            dir,
            all: Vec::new(),
        }
    }

    /// Starts another process and waits (bounded) until its handler runs; returns its number.
    async fn start(&mut self) -> usize {
        let n = self.all.len();
        let record = self.dir.join(format!("process-{n}.record"));
        let stderr = self.dir.join(format!("process-{n}.stderr"));
        let application = common::unique_name(&format!("exactly-{n}"));
        let url = if !self.url.contains("://") {
            format!("{} application_name={application}", self.url)
        } else if self.url.contains('?') {
            format!("{}&application_name={application}", self.url)
        } else {
            format!("{}?application_name={application}", self.url)
        };
        let mut command = children::rerun(&self.test, &stderr);
        command
            .env(CHILD_URL, url)
            .env(CHILD_RECORD, &record)
            .env(CHILD_NUMBER, n.to_string());
        let (child, stdin) = children::spawn(command, "start a handler's process");
        self.all.push(Process {
            child,
            stdin: Some(stdin),
            record,
            stderr,
            application,
        });
        let deadline = Instant::now() + WITHIN;
        while !self.all[n].record().ready {
            let exited = self.all[n].child.try_wait().unwrap().is_some();
            assert!(
                !exited && Instant::now() < deadline,
                "{}: process {n} {} ready within {WITHIN:?}\n{}",
                self.test,
                if exited {
                    "exited before it was"
                } else {
                    "was not"
                },
                self.all[n].stderr()
            );
            tokio::time::sleep(POLL).await; // bounded poll of the record file
        }
        n
    }

    /// SIGKILL to process `n` (no chance to commit, save a position or hand anything over),
    /// then waits (bounded) until the server has dropped its sessions — its open transactions
    /// rolled back, its lease released.
    async fn kill(&mut self, n: usize, db: &common::TestDb) {
        let process = &mut self.all[n];
        process.child.kill().expect("kill a handler's process");
        let status = process.child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
        let client = db.client().await;
        let application = process.application.clone();
        let gone = common::wait_until(WITHIN, || async {
            let sessions: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1",
                    &[&application],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            sessions == 0
        })
        .await;
        assert!(
            gone,
            "{}: the server kept process {n}'s sessions for {WITHIN:?} after SIGKILL",
            self.test
        );
    }

    /// Closes process `n`'s stdin and waits (bounded) until it has stopped gracefully.
    async fn stop(&mut self, n: usize) {
        drop(self.all[n].stdin.take());
        let deadline = Instant::now() + WITHIN;
        let status = loop {
            if let Some(status) = self.all[n].child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: process {n} did not stop within {WITHIN:?}",
                self.test
            );
            tokio::time::sleep(POLL).await; // bounded wait for the exit
        };
        assert!(
            status.success(),
            "{}: process {n} stopped with {status:?}\n{}",
            self.test,
            self.all[n].stderr()
        );
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        children::kill_all(self.all.iter_mut().map(|p| &mut p.child));
        // The records' directory goes next (kept if the test failed).
    }
}

// ---------------------------------------------------------------------------------------------
// The test's side: the writer
// ---------------------------------------------------------------------------------------------

/// What the writer did.
#[derive(Default)]
struct Written {
    committed: BTreeSet<i64>,
    rolled_back: BTreeSet<i64>,
    transactions: usize,
}

/// How far the writer may go before kill `kills` (the next one).
fn gate(kills: usize) -> i64 {
    if kills == KILLS {
        ROWS
    } else {
        (kills as i64 + 1) * STRETCH + STRETCH / 2
    }
}

/// The writer: transactions of 1–5 rows, about one in ten rolled back, until `ROWS` rows are
/// committed (`reserved` counts the rows committed or being committed). Paced at
/// `ROWS_PER_SECOND` from `start`, and held at [`gate`]`(kills)`; it goes on whether or not
/// a handler's process runs.
async fn write(
    url: &str,
    seed: u64,
    reserved: &AtomicI64,
    kills: &AtomicUsize,
    start: tokio::time::Instant,
    written: &Mutex<Written>,
) {
    let client = common::connect(url).await;
    let mut dice = Dice::new(seed ^ 0x5eed);
    let mut next_id = 1_i64;
    loop {
        let rows = 1 + dice.next() % MAX_TRANSACTION;
        let commit = dice.next() % 100 >= ROLLBACK_PERCENT;
        let mut rows_to_write = rows as i64;
        if commit {
            let before = reserved.load(Ordering::Relaxed);
            if before >= ROWS {
                return;
            }
            rows_to_write = (ROWS - before).min(rows_to_write);
            let after = before + rows_to_write;
            let held = common::wait_until(WITHIN, || async {
                after <= gate(kills.load(Ordering::Relaxed))
            })
            .await;
            assert!(
                held,
                "the writer: the kills did not go on within {WITHIN:?}"
            );
            reserved.store(after, Ordering::Relaxed);
            // Pacing (not synchronisation): this transaction's rows are due at this time.
            let due = start + Duration::from_secs_f64(before as f64 / ROWS_PER_SECOND);
            tokio::time::sleep_until(due).await;
        }
        let ids: Vec<i64> = (next_id..next_id + rows_to_write).collect();
        next_id += rows_to_write;
        client.batch_execute("BEGIN").await.unwrap();
        for id in &ids {
            client
                .execute("INSERT INTO src VALUES ($1)", &[id])
                .await
                .unwrap();
        }
        client
            .batch_execute(if commit { "COMMIT" } else { "ROLLBACK" })
            .await
            .unwrap();
        let mut written = written.lock().unwrap();
        written.transactions += 1;
        if commit {
            written.committed.extend(ids);
        } else {
            written.rolled_back.extend(ids);
        }
    }
}

/// The rows of `ids` that have an effect row now.
async fn with_effect(db: &common::TestDb, ids: &BTreeSet<i64>) -> BTreeSet<i64> {
    let ids: Vec<i64> = ids.iter().copied().collect();
    db.client()
        .await
        .query(
            "SELECT DISTINCT src_id FROM effects_t WHERE src_id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("read effects_t")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// What one kill hit.
struct Kill {
    process: usize,
    /// Rows committed or being committed when it came.
    at_row: i64,
    /// How long after the process said it was ready.
    after: Duration,
    /// Rows its handler began on, and those of them left without an effect: their
    /// transaction was open (or its commit not sent) when the kill came.
    calls: usize,
    interrupted: usize,
    /// How long no process ran.
    downtime: Duration,
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// 5,000 committed rows, 10 SIGKILLs at random moments, one effect per committed row.
#[actix_rt::test]
async fn each_committed_row_has_one_effect_across_ten_random_kills() {
    const TEST: &str = "each_committed_row_has_one_effect_across_ten_random_kills";
    if handler_process().await {
        return;
    }
    let db = common::TestDb::new().await;
    db.exec(
        "CREATE TABLE src (id bigint PRIMARY KEY);
         CREATE TABLE effects_t (src_id bigint NOT NULL, process integer NOT NULL,
                                 at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE TABLE counter (id integer PRIMARY KEY, n bigint NOT NULL);
         INSERT INTO counter VALUES (1, 0);",
    )
    .await;
    let seed = seed();
    eprintln!("{TEST}: seed {seed} (set {SEED}={seed} to repeat the random choices)");
    let mut dice = Dice::new(seed);
    let mut processes = Processes::new(TEST, &db.url);
    // The first process registers the consumer: rows count from here.
    processes.start().await;

    let reserved = AtomicI64::new(0);
    let kills = AtomicUsize::new(0);
    let written = Mutex::new(Written::default());
    let start = tokio::time::Instant::now();
    let writer = write(&db.url, seed, &reserved, &kills, start, &written);
    let mut record_of_kills: Vec<Kill> = Vec::new();
    let killer = async {
        for k in 0..KILLS {
            let current = processes.all.len() - 1;
            let ready_at = Instant::now();
            let due = common::wait_until(WITHIN, || async {
                reserved.load(Ordering::Relaxed) >= k as i64 * STRETCH + STRETCH / 2
            })
            .await;
            assert!(due, "{TEST}: the writer did not go on");
            // The random moment itself (not synchronisation).
            let delay = Duration::from_millis(dice.within(KILL_AFTER_MS));
            tokio::time::sleep(delay).await;
            let at_row = reserved.load(Ordering::Relaxed);
            let after = ready_at.elapsed();
            processes.kill(current, &db).await;
            kills.store(k + 1, Ordering::Relaxed);
            let began: BTreeSet<i64> = processes.all[current].record().calls.into_iter().collect();
            let interrupted = began.len() - with_effect(&db, &began).await.len();
            // The writer goes on while no process runs.
            let downtime = Duration::from_millis(dice.within(DOWNTIME_MS));
            let down = Instant::now();
            tokio::time::sleep(downtime).await; // the random downtime itself
            processes.start().await;
            record_of_kills.push(Kill {
                process: current,
                at_row,
                after,
                calls: began.len(),
                interrupted,
                downtime: down.elapsed(),
            });
        }
    };
    tokio::join!(writer, killer);
    let writing = start.elapsed();
    let written = written.into_inner().unwrap();
    assert_eq!(
        written.committed.len() as i64,
        ROWS,
        "{TEST}: rows committed"
    );

    // The last process drains everything, then stops gracefully.
    let last = processes.all.len() - 1;
    let effects = || async { db.count("SELECT count(*) FROM effects_t").await };
    let drained = common::wait_until(WITHIN, || async { effects().await >= ROWS }).await;
    processes.stop(last).await;

    // Exactly one effect per committed row, none for a rolled-back one, and the counter.
    let rows = db
        .client()
        .await
        .query(
            "SELECT src_id, count(*) FROM effects_t GROUP BY src_id",
            &[],
        )
        .await
        .expect("read effects_t");
    let per_row: BTreeMap<i64, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let missing: Vec<i64> = written
        .committed
        .iter()
        .filter(|id| !per_row.contains_key(id))
        .copied()
        .collect();
    let twice: Vec<(i64, i64)> = per_row
        .iter()
        .filter(|&(_, &n)| n > 1)
        .map(|(&id, &n)| (id, n))
        .collect();
    let rolled_back: Vec<i64> = per_row
        .keys()
        .filter(|id| written.rolled_back.contains(id))
        .copied()
        .collect();
    let foreign: Vec<i64> = per_row
        .keys()
        .filter(|id| !written.committed.contains(id) && !written.rolled_back.contains(id))
        .copied()
        .collect();
    let counter = db.count("SELECT n FROM counter WHERE id = 1").await;

    let records: Vec<Record> = processes.all.iter().map(Process::record).collect();
    let skipped: u64 = records.iter().map(|r| r.skipped).sum();
    let calls: usize = records.iter().map(|r| r.calls.len()).sum();
    eprintln!(
        "{TEST}: {} rows committed, {} rolled back, in {} transactions over {writing:.1?}; \
         {} processes started, {KILLS} killed",
        written.committed.len(),
        written.rolled_back.len(),
        written.transactions,
        processes.all.len()
    );
    for (k, kill) in record_of_kills.iter().enumerate() {
        eprintln!(
            "{TEST}: kill {}: process {} at row {}, {:.0?} after it was ready; its handler \
             began on {} rows, {} of them with the transaction still open (rolled back); no \
             process ran for {:.0?}",
            k + 1,
            kill.process,
            kill.at_row,
            kill.after,
            kill.calls,
            kill.interrupted,
            kill.downtime
        );
    }
    for (n, record) in records.iter().enumerate() {
        eprintln!(
            "{TEST}: process {n}: handler began on {} rows, skipped {} as already done{}",
            record.calls.len(),
            record.skipped,
            match record.last {
                Some((_, handled)) => format!(" (stopped gracefully, handled {handled})"),
                None => " (as last reported before the kill)".into(),
            }
        );
    }
    eprintln!(
        "{TEST}: {skipped} events skipped as already done (Stats::effects_skipped, at least: a \
         kill may take a process's last report with it); {calls} handler calls for {} rows; \
         {} transactions rolled back by a kill",
        written.committed.len(),
        record_of_kills.iter().map(|k| k.interrupted).sum::<usize>()
    );

    assert!(
        missing.is_empty(),
        "{TEST}: {} committed rows have no effect (drained within {WITHIN:?}: {drained}), the \
         first: {:?}\nthe last process: {}",
        missing.len(),
        &missing[..missing.len().min(20)],
        processes.all[last].stderr()
    );
    assert!(
        twice.is_empty(),
        "{TEST}: {} rows have their effect more than once (row, times), the first: {:?}",
        twice.len(),
        &twice[..twice.len().min(20)]
    );
    assert!(
        rolled_back.is_empty(),
        "{TEST}: rolled-back rows have an effect: {rolled_back:?}"
    );
    assert!(
        foreign.is_empty(),
        "{TEST}: effects of rows never written: {foreign:?}"
    );
    assert_eq!(
        counter,
        written.committed.len() as i64,
        "{TEST}: the counter against the committed rows"
    );
    // The kills must have made the consumer deliver rows again, or they tested nothing.
    assert!(
        skipped > 0,
        "{TEST}: no process skipped an event as already done: no row was delivered again"
    );
}

/// Attempts that fail roll back what they wrote: an error returned, and an error the handler
/// caught and ignored (its transaction is aborted: that attempt fails at the commit rather
/// than committing nothing). The retry applies the writes once. A handler that fails every
/// attempt leaves no effect, and a dead letter.
#[actix_rt::test]
async fn a_failed_attempt_rolls_back_its_writes_and_the_retry_applies_them_once() {
    if handler_process().await {
        return;
    }
    let db = common::TestDb::new().await;
    db.exec(
        "CREATE TABLE src (id bigint PRIMARY KEY);
         CREATE TABLE effects_t (src_id bigint NOT NULL, attempt integer NOT NULL);
         CREATE TABLE counter (id integer PRIMARY KEY, n bigint NOT NULL);
         INSERT INTO counter VALUES (1, 0);",
    )
    .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("src", Insert).tier(Tier::Durable))
        .consumer("rollback")
        .start()
        .await
        .expect("start");
    let calls: Rc<RefCell<HashMap<i64, i32>>> = Rc::default();
    let c = calls.clone();
    notifier
        .handle_in_transaction(
            Subscription::new("src", Insert),
            Handling::new("rollback")
                .max_attempts(3)
                .backoff(Duration::from_millis(20), Duration::from_millis(20)),
            move |event, tx| {
                let calls = c.clone();
                async move {
                    let id = event.id().as_i64().ok_or("an integer key")?;
                    let attempt = {
                        let mut calls = calls.borrow_mut();
                        let n = calls.entry(id).or_insert(0);
                        *n += 1;
                        *n
                    };
                    tx.client()
                        .execute("INSERT INTO effects_t VALUES ($1, $2)", &[&id, &attempt])
                        .await?;
                    tx.client()
                        .execute("UPDATE counter SET n = n + 1 WHERE id = 1", &[])
                        .await?;
                    match (id, attempt) {
                        (1, 1) => Err("row 1 fails its first attempt".into()),
                        (2, 1) => {
                            // Caught and ignored: the transaction is aborted all the same.
                            let ignored = tx.client().execute("SELECT 1 / 0", &[]).await;
                            assert!(ignored.is_err(), "1 / 0 fails");
                            Ok(())
                        }
                        (3, _) => Err("row 3 always fails".into()),
                        _ => Ok(()),
                    }
                }
            },
        )
        .await
        .expect("handle_in_transaction");
    let client = db.client().await;
    for id in 1..=4_i64 {
        client
            .execute("INSERT INTO src VALUES ($1)", &[&id])
            .await
            .expect("insert");
    }
    let settled = common::wait_until(Duration::from_secs(30), || async {
        let stats = notifier.stats().await.expect("stats");
        stats.handled == 3 && stats.dead_lettered == 1
    })
    .await;
    let stats = notifier.stats().await.expect("stats");
    assert!(settled, "rows 1, 2 and 4 handled, row 3 dead: {stats:?}");
    let dead = notifier
        .dead_letters()
        .expect("dead letters")
        .list(Some("rollback"), None)
        .await
        .expect("list the dead letters");
    notifier.stop().await.expect("stop");

    let effects: Vec<(i64, i32)> = client
        .query(
            "SELECT src_id, attempt FROM effects_t ORDER BY src_id, attempt",
            &[],
        )
        .await
        .expect("read effects_t")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        effects,
        vec![(1, 2), (2, 2), (4, 1)],
        "each row's effect once, from the attempt that succeeded; none of row 3"
    );
    assert_eq!(db.count("SELECT n FROM counter WHERE id = 1").await, 3);
    let calls = calls.borrow().clone();
    assert_eq!(
        calls,
        HashMap::from([(1, 2), (2, 2), (3, 3), (4, 1)]),
        "attempts per row"
    );
    assert_eq!(
        (
            stats.handler_errors,
            stats.retries,
            stats.dead_lettered,
            stats.effects_skipped
        ),
        (5, 4, 1, 0),
        "errors: 1 + 1 + 3; retries: 1 + 1 + 2; {stats:?}"
    );
    // The records of the events done: only the three that committed.
    let records = db
        .count("SELECT count(*) FROM sqlnotify.effects WHERE handler = 'rollback'")
        .await;
    assert_eq!(records, 3, "records in sqlnotify.effects");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let letter = &dead[0];
    assert_eq!(
        (letter.key.as_str(), letter.attempts, letter.state),
        ("3", 3, sqlnotify::DeadLetterState::Dead),
        "{letter:?}"
    );
    assert!(
        letter.error.contains("row 3 always fails"),
        "{:?}",
        letter.error
    );
}

/// Starts consumer `redeliver` with a transactional handler `redeliver` on inserts into `src`
/// that inserts the row's effect and fails on row 1 while `fail` is set (one attempt: a dead
/// letter at once).
async fn start_failing_on_1(db: &common::TestDb, fail: Rc<std::cell::Cell<bool>>) -> Notifier {
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("src", Insert).tier(Tier::Durable))
        .consumer("redeliver")
        .start()
        .await
        .expect("start");
    notifier
        .handle_in_transaction(
            Subscription::new("src", Insert),
            Handling::new("redeliver")
                .max_attempts(1)
                .redelivery_poll(Duration::from_millis(100)),
            move |event, tx| {
                let fail = fail.clone();
                async move {
                    let id = event.id().as_i64().ok_or("an integer key")?;
                    tx.client()
                        .execute("INSERT INTO effects_t VALUES ($1)", &[&id])
                        .await?;
                    if id == 1 && fail.get() {
                        return Err("row 1 fails".into());
                    }
                    Ok(())
                }
            },
        )
        .await
        .expect("handle_in_transaction");
    notifier
}

/// A dead letter delivered again after its journal row was purged commits its effect; if its
/// dead-letter row then cannot be removed (here a trigger makes the delete fail once; a crash
/// at that moment does the same), the record of its effect must outlive the prune of records
/// of purged rows (1,000 events later), so that the next process, which delivers it again,
/// skips it rather than applying it a second time.
#[actix_rt::test]
async fn a_dead_letter_delivered_again_is_applied_once_even_if_its_row_stays() {
    if handler_process().await {
        return;
    }
    let db = src_and_effects().await;
    let fail = Rc::new(std::cell::Cell::new(true));
    let notifier = start_failing_on_1(&db, fail.clone()).await;
    db.exec("INSERT INTO src VALUES (1)").await;
    db.exec("INSERT INTO src VALUES (2)").await;
    let stats = || async { notifier.stats().await.expect("stats") };
    assert!(
        common::wait_until(Duration::from_secs(10), || async {
            let s = stats().await;
            s.dead_lettered == 1 && s.handled == 1
        })
        .await,
        "row 1 dead, row 2 handled: {:?}",
        stats().await
    );
    // Row 1's journal row is purged (as the retention does once the position passed it).
    let sequence = db.count("SELECT min(id) FROM sqlnotify.journal").await;
    db.exec(&format!(
        "DELETE FROM sqlnotify.journal WHERE id = {sequence}"
    ))
    .await;
    // Its dead-letter row cannot be deleted for now.
    db.exec(
        "CREATE FUNCTION keep_dead_letters() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'dead letters cannot be deleted right now'; END $$;
         CREATE TRIGGER keep_dead_letters BEFORE DELETE ON sqlnotify.dead_letters
           FOR EACH ROW EXECUTE FUNCTION keep_dead_letters();",
    )
    .await;
    fail.set(false);
    let dead_letters = notifier.dead_letters().expect("dead letters");
    assert_eq!(dead_letters.retry_handler("redeliver").await.unwrap(), 1);
    assert!(
        common::wait_until(Duration::from_secs(10), || async {
            stats().await.handled == 2
        })
        .await,
        "row 1 delivered again and handled: {:?}",
        stats().await
    );
    db.exec("DROP TRIGGER keep_dead_letters ON sqlnotify.dead_letters")
        .await;
    let effects_of_1 = || async {
        db.count("SELECT count(*) FROM effects_t WHERE src_id = 1")
            .await
    };
    assert_eq!(effects_of_1().await, 1);
    let left = dead_letters.counts(Some("redeliver")).await.unwrap();
    assert_eq!(left.redelivering, 1, "its row stayed: {left:?}");
    // 1,000 more events: the records of purged rows are pruned.
    db.exec("INSERT INTO src SELECT g FROM generate_series(3, 1002) g")
        .await;
    assert!(
        common::wait_until(Duration::from_secs(60), || async {
            stats().await.handled == 1002
        })
        .await,
        "1,000 more handled: {:?}",
        stats().await
    );
    notifier.stop().await.expect("stop");

    // The next process takes the row back and delivers row 1 again: a skip.
    let notifier = start_failing_on_1(&db, fail).await;
    let gone = common::wait_until(Duration::from_secs(10), || async {
        dead_letters.counts(Some("redeliver")).await.unwrap() == Default::default()
    })
    .await;
    let stats = notifier.stats().await.expect("stats");
    notifier.stop().await.expect("stop");
    assert!(
        gone,
        "the dead letter was delivered again and removed: {stats:?}"
    );
    assert_eq!(
        effects_of_1().await,
        1,
        "row 1's effect applied again after a prune: {stats:?}"
    );
    // Row 1 comes back as the dead letter; how much of the journal is read again besides
    // depends on the saved position (an open transaction elsewhere on the server holds the
    // durable tier's horizon back), and whatever comes again is skipped, not applied.
    assert_eq!(stats.redelivered, 1, "{stats:?}");
    assert!(stats.effects_skipped >= 1, "{stats:?}");
    assert_eq!(
        db.count("SELECT count(*) FROM effects_t").await,
        1002,
        "one effect per row"
    );
}

/// A least-privilege role: an administrator applies `install_sql_granting(app)`, and the
/// application runs as `app` — no `CREATE` on schema sqlnotify, `USAGE` only on the journal's
/// sequence — with `manage_triggers(false)`. Its transactional handler applies each row once,
/// and the prune (after the first event) deletes the record of an event whose journal row is
/// long gone. Before the fix, `handle_in_transaction` failed at once ("permission denied for
/// schema sqlnotify": `CREATE TABLE IF NOT EXISTS` at every call, and the install did not make
/// the table), and the prune could not read the sequence, so records were never deleted.
#[actix_rt::test]
async fn a_role_granted_by_the_install_script_handles_in_transaction_and_prunes() {
    if handler_process().await {
        return;
    }
    let db = src_and_effects().await;
    let (app, app_url) = db.role("app").await;
    db.exec(&format!("GRANT INSERT ON effects_t TO \"{app}\""))
        .await;
    let builder = |url: &str| {
        Notifier::builder(url)
            .watch(Watch::new("src", Insert).tier(Tier::Durable))
            .consumer("granted")
    };
    let script = builder(&db.url)
        .install_sql_granting(&app)
        .await
        .expect("install script");
    db.exec(&script).await;
    let notifier = builder(&app_url)
        .manage_triggers(false)
        .start()
        .await
        .unwrap_or_else(|e| panic!("{app} with the script's grants: {e}"));
    notifier
        .handle_in_transaction(
            Subscription::new("src", Insert),
            Handling::new("granted"),
            |event, tx| async move {
                let id = event.id().as_i64().ok_or("an integer key")?;
                tx.client()
                    .execute("INSERT INTO effects_t VALUES ($1)", &[&id])
                    .await?;
                Ok(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("handle_in_transaction as {app}: {e}"));
    // The record of an event whose journal row was purged long ago: no delivery can need it.
    db.exec("INSERT INTO sqlnotify.effects (handler, sequence, part) VALUES ('granted', 0, 0)")
        .await;
    db.exec("INSERT INTO src SELECT g FROM generate_series(1, 20) g")
        .await;
    let stats = || async { notifier.stats().await.expect("stats") };
    assert!(
        common::wait_until(Duration::from_secs(30), || async {
            stats().await.handled == 20
        })
        .await,
        "20 rows handled: {:?}",
        stats().await
    );
    let stats = stats().await;
    notifier.stop().await.expect("stop");
    assert_eq!(
        (stats.handler_errors, stats.dead_lettered),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM (SELECT DISTINCT src_id FROM effects_t) e")
            .await,
        20
    );
    assert_eq!(
        db.count("SELECT count(*) FROM effects_t").await,
        20,
        "each row once"
    );
    // The prune ran after the first event, before the handler's call returned.
    assert_eq!(
        db.count(
            "SELECT count(*) FROM sqlnotify.effects WHERE handler = 'granted' AND sequence = 0"
        )
        .await,
        0,
        "the record below the journal's horizon was pruned"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM sqlnotify.effects WHERE handler = 'granted'")
            .await,
        20,
        "one record per row handled"
    );

    // A table the role may not use, or none and no right to make it: refused at once, naming
    // the table and what to run.
    let refused = |sql: String| {
        let (db, app_url) = (&db, app_url.clone());
        async move {
            db.exec(&sql).await;
            let notifier = builder(&app_url)
                .manage_triggers(false)
                .start()
                .await
                .expect("start");
            let outcome = notifier
                .handle_in_transaction(
                    Subscription::new("src", Insert),
                    Handling::new("granted"),
                    nothing,
                )
                .await;
            notifier.stop().await.expect("stop");
            match outcome {
                Err(e @ Error::Database { .. }) => e.to_string(),
                other => panic!("{sql}: expected Error::Database, got {other:?}"),
            }
        }
    };
    let error = refused(format!("REVOKE DELETE ON sqlnotify.effects FROM \"{app}\"")).await;
    assert!(
        error.contains("permission denied for table sqlnotify.effects")
            && error.contains("install-sql --grant-to"),
        "{error}"
    );
    let error = refused("DROP TABLE sqlnotify.effects".into()).await;
    assert!(
        error.contains("sqlnotify.effects")
            && error.contains("missing")
            && error.contains("install-sql --grant-to"),
        "{error}"
    );
}

/// Asserts that `outcome` is `Error::Unsupported` whose text contains each of `needles`.
fn assert_unsupported<T: std::fmt::Debug>(outcome: sqlnotify::Result<T>, needles: &[&str]) {
    match outcome {
        Err(Error::Unsupported { what }) => {
            for needle in needles {
                assert!(what.contains(needle), "{what:?} should say {needle:?}");
            }
        }
        other => panic!("expected Error::Unsupported saying {needles:?}, got {other:?}"),
    }
}

/// A no-op transactional handler.
async fn nothing(
    _: sqlnotify::ChangeEvent,
    _: sqlnotify::Transaction,
) -> Result<(), sqlnotify::HandlerError> {
    Ok(())
}

/// SQLite and PostgreSQL's notify tier have nothing to record an event in with the
/// handler's writes (SQLite: no `Transaction`; the notify tier: no journal id): the call
/// fails at once, naming why and what to use, and records nothing.
#[actix_rt::test]
async fn transactional_handlers_are_unsupported_on_sqlite_and_the_notify_tier() {
    if handler_process().await {
        return;
    }
    let file = common::sqlite_file::SqliteFile::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let notifier = Notifier::builder(file.url())
        .watch(Watch::new("t", Insert))
        .start()
        .await
        .expect("start on SQLite");
    assert_unsupported(
        notifier
            .handle_in_transaction(Subscription::new("t", Insert), Handling::new("tx"), nothing)
            .await,
        &[
            "\"tx\"",
            "need PostgreSQL, not sqlite",
            "handle()",
            "idempotent",
        ],
    );
    notifier.stop().await.expect("stop");

    let db = common::TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert).tier(Tier::Notify))
        .start()
        .await
        .expect("start on the notify tier");
    let channel = notifier.channels()[0].name().to_string();
    assert_unsupported(
        notifier
            .handle_in_transaction(Subscription::new("t", Insert), Handling::new("tx"), nothing)
            .await,
        &["\"tx\"", "need a journal", "notify tier", &channel],
    );
    let stats = notifier.stats().await.expect("stats");
    notifier.stop().await.expect("stop");
    assert_eq!(
        db.count("SELECT count(*) FROM sqlnotify.effects").await,
        0,
        "nothing was recorded in sqlnotify.effects (made by the install)"
    );
    assert_eq!(stats.handled + stats.handler_errors, 0, "{stats:?}");
}

/// MySQL / MariaDB: no transactional handlers either.
#[cfg(feature = "mysql")]
#[actix_rt::test]
async fn transactional_handlers_are_unsupported_on_mysql() {
    if handler_process().await {
        return;
    }
    let db = common::mysql::TestDb::new().await;
    db.exec("CREATE TABLE t (id BIGINT PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Insert))
        .start()
        .await
        .expect("start on MySQL");
    assert_unsupported(
        notifier
            .handle_in_transaction(Subscription::new("t", Insert), Handling::new("tx"), nothing)
            .await,
        &["\"tx\"", "need PostgreSQL, not mysql", "handle()"],
    );
    notifier.stop().await.expect("stop");
}
