//! The notifier's process killed (SIGKILL, no chance to save anything) in the middle of a
//! stream of commits, then started again with the same named consumer: every committed row
//! reaches a subscriber at least once over the two runs — on PostgreSQL's durable and poll
//! tiers, (feature `logical`) its logical tier, on SQLite and (feature `mysql`) on MySQL /
//! MariaDB.
//!
//! The test binary re-executes itself as the notifier's process (the same test, with
//! `SQLNOTIFY_KILL_CHILD_URL` set): it starts a notifier with the consumer and a subscriber
//! that prints the id of every event it handles on stdout, says it is ready, and runs until
//! killed (or until its stdin closes: then it stops gracefully). The parent reads the ids,
//! kills the first process once it has handled some rows while rows are still being
//! committed, commits more while nothing runs, starts a second process and commits more again.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use common::wait_until;
use sqlnotify::Operation::Insert;
use sqlnotify::{ChangeEvent, Notifier, Subscription, Tier, Watch};

/// Set in the notifier's process: the database URL (and the tier, for PostgreSQL).
const CHILD_URL: &str = "SQLNOTIFY_KILL_CHILD_URL";
const CHILD_TIER: &str = "SQLNOTIFY_KILL_CHILD_TIER";
/// The consumer both processes run as.
const CONSUMER: &str = "survivor";
/// Lines the notifier's process prints.
const READY: &str = "sqlnotify-kill-test: ready";
const EVENT: &str = "sqlnotify-kill-test: event ";

/// Rows committed in the first stretch (the first process is killed on the way, after the
/// first `HOLD_AT` of them), then while no process runs, then after the second one started.
const WHILE_RUNNING: i64 = 600;
const WHILE_DEAD: i64 = 100;
const AFTER_RESTART: i64 = 100;
/// The first process is killed once it has handled this many rows.
const KILL_AFTER: usize = 100;
/// The writer waits for the kill after this many rows.
const HOLD_AT: i64 = 2 * KILL_AFTER as i64;
/// How long a process may take to start, and the rows to arrive.
const WITHIN: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The notifier's process
// ---------------------------------------------------------------------------------------------

/// Prints the id of every event it handles.
struct PrintIds;

impl Actor for PrintIds {
    type Context = Context<Self>;
}

impl Handler<ChangeEvent> for PrintIds {
    type Result = ();
    fn handle(&mut self, event: ChangeEvent, _: &mut Context<Self>) {
        println!("{EVENT}{}", event.id().as_i64().expect("an integer key"));
    }
}

/// In the notifier's process: runs it and returns true; in the test's own process: false.
async fn notifier_process() -> bool {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return false;
    };
    common::init_logging();
    let mut watch = Watch::new("t", Insert);
    match std::env::var(CHILD_TIER).as_deref() {
        Ok("durable") => watch = watch.tier(Tier::Durable),
        Ok("poll") => watch = watch.tier(Tier::Poll),
        Ok("logical") => watch = watch.tier(Tier::Logical),
        _ => {}
    }
    // Subscribed on the builder, so the subscriber sees the consumer's replay.
    let notifier = Notifier::builder(&url)
        .watch(watch)
        .consumer(CONSUMER)
        .subscribe(Subscription::new("t", Insert), PrintIds.start().recipient())
        .start()
        .await
        .expect("the notifier's process: start");
    println!("{READY}");
    // Runs until killed, or until the test closes stdin (or dies).
    let (closed, stdin_closed) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = closed.send(());
    });
    let _ = stdin_closed.await;
    notifier.stop().await.expect("the notifier's process: stop");
    true
}

// ---------------------------------------------------------------------------------------------
// The test's side
// ---------------------------------------------------------------------------------------------

/// A notifier's process started from this test binary, killed on drop.
struct NotifierProcess {
    child: std::process::Child,
    ready: Arc<Mutex<bool>>,
    /// The ids its subscriber handled, in order.
    handled: Arc<Mutex<Vec<i64>>>,
    /// The thread reading its stdout: done once the process is gone and the pipe drained.
    reader: Option<std::thread::JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
}

impl NotifierProcess {
    /// Starts `test` of this binary as a notifier's process on `url` and waits until it is
    /// ready.
    async fn start(test: &str, url: &str, tier: Option<Tier>) -> NotifierProcess {
        let tier = match tier {
            Some(Tier::Durable) => "durable",
            Some(Tier::Poll) => "poll",
            Some(Tier::Logical) => "logical",
            _ => "",
        };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_URL, url)
            .env(CHILD_TIER, tier)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the notifier's process");
        let ready = Arc::new(Mutex::new(false));
        let handled = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (r, h) = (ready.clone(), handled.clone());
        let reader = std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                // (the harness's "test … " may precede the first line)
                if line.ends_with(READY) {
                    *r.lock().unwrap() = true;
                } else if let Some((_, id)) = line.split_once(EVENT) {
                    h.lock().unwrap().push(id.parse().expect("an id"));
                }
            }
        });
        let mut from_stderr = child.stderr.take().unwrap();
        let e = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = from_stderr.read(&mut buf) {
                e.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut process = NotifierProcess {
            child,
            ready,
            handled,
            reader: Some(reader),
            stderr,
        };
        let deadline = Instant::now() + WITHIN;
        while !process.is_ready() {
            assert!(
                !process.exited() && Instant::now() < deadline,
                "the notifier's process did not start within {WITHIN:?}: {}",
                process.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await; // bounded poll
        }
        process
    }

    fn is_ready(&self) -> bool {
        *self.ready.lock().unwrap()
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// The ids its subscriber handled so far, in order.
    fn handled(&self) -> Vec<i64> {
        self.handled.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGKILL (what `Child::kill` sends on Unix): the process gets no chance to save a
    /// position or hand anything over.
    fn kill(&mut self) {
        self.child.kill().expect("kill the notifier's process");
        let status = self.child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
        // What it printed before it died is still in the pipe: read all of it.
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the stdout reader");
        }
    }

    /// Closes its stdin: it stops gracefully; waits (bounded) for it to exit.
    fn stop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + WITHIN;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the notifier's process did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status:?}: {}", self.stderr());
    }
}

impl Drop for NotifierProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the rows are committed: one transaction per row.
enum Target<'a> {
    Postgres(&'a common::TestDb),
    Sqlite(&'a common::sqlite_file::SqliteFile),
    #[cfg(feature = "mysql")]
    Mysql(&'a common::mysql::TestDb),
}

impl Target<'_> {
    async fn commit(&self, ids: std::ops::RangeInclusive<i64>) {
        match self {
            Target::Postgres(db) => {
                let client = db.client().await;
                for id in ids {
                    client
                        .execute("INSERT INTO t VALUES ($1)", &[&id])
                        .await
                        .unwrap();
                }
            }
            Target::Sqlite(db) => {
                let path = db.path.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open(path).unwrap();
                    conn.busy_timeout(Duration::from_secs(10)).unwrap();
                    for id in ids {
                        conn.execute("INSERT INTO t VALUES (?1)", [id]).unwrap();
                    }
                })
                .await
                .unwrap();
            }
            #[cfg(feature = "mysql")]
            Target::Mysql(db) => common::mysql::insert_rows(db, "t", ids).await,
        }
    }
}

/// The scenario: `test` is the calling test's name (the notifier's process runs it).
async fn killed_mid_stream_then_restarted(
    test: &str,
    url: &str,
    tier: Option<Tier>,
    target: Target<'_>,
) {
    let label = format!("{test} {tier:?}");
    let mut first = NotifierProcess::start(test, url, tier).await;
    // Rows are committed while the first process handles them; it is killed on the way. The
    // writer holds the rest back until the kill, so a fast reader cannot have handled every
    // row before the kill lands.
    let (killed, is_killed) = tokio::sync::oneshot::channel::<()>();
    tokio::join!(
        async {
            target.commit(1..=HOLD_AT).await;
            let _ = is_killed.await;
            target.commit(HOLD_AT + 1..=WHILE_RUNNING).await;
        },
        async {
            let handled_some = wait_until(WITHIN, || async {
                first.handled.lock().unwrap().len() >= KILL_AFTER
            })
            .await;
            assert!(
                handled_some,
                "{label}: the first process handled {:?}",
                first.handled()
            );
            first.kill();
            let _ = killed.send(());
        }
    );
    let before_kill = first.handled();
    assert!(
        (before_kill.len() as i64) < WHILE_RUNNING,
        "{label}: killed in the middle of the stream (it had handled {} rows)",
        before_kill.len()
    );
    target
        .commit(WHILE_RUNNING + 1..=WHILE_RUNNING + WHILE_DEAD)
        .await;

    let mut second = NotifierProcess::start(test, url, tier).await;
    let last = WHILE_RUNNING + WHILE_DEAD + AFTER_RESTART;
    target.commit(WHILE_RUNNING + WHILE_DEAD + 1..=last).await;
    let committed: BTreeSet<i64> = (1..=last).collect();
    let union = || -> BTreeSet<i64> {
        before_kill
            .iter()
            .chain(&second.handled())
            .copied()
            .collect()
    };
    let complete = wait_until(WITHIN, || async { union().is_superset(&committed) }).await;
    let missing: Vec<i64> = committed.difference(&union()).copied().collect();
    assert!(
        complete,
        "{label}: {} committed rows never reached a subscriber, the first: {:?}\n\
         second process: {}",
        missing.len(),
        &missing[..missing.len().min(20)],
        second.stderr()
    );
    let resumed = second.handled();
    eprintln!(
        "{label}: the first process handled {} rows (up to {:?}) before SIGKILL, the second {} \
         (from {:?})",
        before_kill.len(),
        before_kill.last(),
        resumed.len(),
        resumed.first()
    );
    let foreign: Vec<i64> = union().difference(&committed).copied().collect();
    assert!(
        foreign.is_empty(),
        "{label}: ids never committed: {foreign:?}"
    );
    second.stop();
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn postgres_durable_tier_loses_nothing_when_the_process_is_killed() {
    if notifier_process().await {
        return;
    }
    let db = common::TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    killed_mid_stream_then_restarted(
        "postgres_durable_tier_loses_nothing_when_the_process_is_killed",
        &db.url,
        Some(Tier::Durable),
        Target::Postgres(&db),
    )
    .await;
}

#[actix_rt::test]
async fn postgres_poll_tier_loses_nothing_when_the_process_is_killed() {
    if notifier_process().await {
        return;
    }
    let db = common::TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    killed_mid_stream_then_restarted(
        "postgres_poll_tier_loses_nothing_when_the_process_is_killed",
        &db.url,
        Some(Tier::Poll),
        Target::Postgres(&db),
    )
    .await;
}

/// On a cluster of its own with `wal_level=logical`: the second process resumes from the slot's
/// confirmed position.
#[cfg(feature = "logical")]
#[actix_rt::test]
async fn postgres_logical_tier_loses_nothing_when_the_process_is_killed() {
    if notifier_process().await {
        return;
    }
    let test = "postgres_logical_tier_loses_nothing_when_the_process_is_killed";
    let Some(cluster) = common::Cluster::start_with(
        "-c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10",
    ) else {
        common::prerequisite_missing(test, "PostgreSQL's binaries (initdb, pg_ctl)");
        return;
    };
    let db = common::TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    killed_mid_stream_then_restarted(test, &db.url, Some(Tier::Logical), Target::Postgres(&db))
        .await;
}

#[actix_rt::test]
async fn sqlite_loses_nothing_when_the_process_is_killed() {
    if notifier_process().await {
        return;
    }
    let db = common::sqlite_file::SqliteFile::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    killed_mid_stream_then_restarted(
        "sqlite_loses_nothing_when_the_process_is_killed",
        &db.url(),
        None,
        Target::Sqlite(&db),
    )
    .await;
}

#[cfg(feature = "mysql")]
#[actix_rt::test]
async fn mysql_loses_nothing_when_the_process_is_killed() {
    if notifier_process().await {
        return;
    }
    let db = common::mysql::TestDb::new().await;
    db.exec("CREATE TABLE t (id BIGINT PRIMARY KEY)").await;
    killed_mid_stream_then_restarted(
        "mysql_loses_nothing_when_the_process_is_killed",
        &db.url,
        None,
        Target::Mysql(&db),
    )
    .await;
}
