//! Consumer groups under fault: three processes run one named consumer, four writers commit
//! 20,000 rows in overlapping transactions (some rolled back), and the active process is
//! SIGKILLed five times in a row, each time once the next one has taken over (a fresh process
//! joins after every kill, so three remain). Then: every committed row was handled, no
//! rolled-back one; at any time at most one process was active, and a standby handled
//! nothing; every duplicate is explained by a failover (first handled by a process shortly
//! before it was killed: within 5 s, 15 s on MySQL, whose saved position waits for missing
//! journal ids); every failover (SIGKILL → the next process's `Status::Active`) took at most
//! 5 s. On PostgreSQL's durable and poll tiers, on SQLite and (feature `mysql`) on MySQL /
//! MariaDB.
//!
//! The test binary re-executes itself as the group's processes (the same test, with
//! `SQLNOTIFY_GROUP_CHILD_URL` set). Each one appends what it handles to a record file of its
//! own with one plain `write` per line — which a SIGKILL cannot take back — before it
//! acknowledges the event (an acknowledged subscription): `e <id> <ns>` per event,
//! `active <ns>` / `standby <ns>` (Unix time of the status) and `status <ns> <status>` for any
//! other status. It runs until killed (or until its stdin closes: then it stops gracefully).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use sqlnotify::Operation::Insert;
use sqlnotify::{ChangeEvent, Notifier, Status, StatusEvent, Subscription, Tier, Watch};

use common::children::{self, RecordDir};

/// Set in a group's process: the database URL, the tier (PostgreSQL) and its record file.
const CHILD_URL: &str = "SQLNOTIFY_GROUP_CHILD_URL";
const CHILD_TIER: &str = "SQLNOTIFY_GROUP_CHILD_TIER";
const CHILD_RECORD: &str = "SQLNOTIFY_GROUP_CHILD_RECORD";
/// The consumer every process of the group runs as.
const CONSUMER: &str = "group";

/// Processes running at once, writers, committed rows, kills (the numbers).
const PROCESSES: usize = 3;
const WRITERS: u64 = 4;
const ROWS: i64 = 20_000;
const KILLS: usize = 5;
/// Rows per transaction (1 to this), and how many transactions in a hundred roll back.
const MAX_TRANSACTION: u64 = 20;
const ROLLBACK_PERCENT: u64 = 10;
/// Committed rows per second, over all writers (about 13 s for all of them).
const ROWS_PER_SECOND: f64 = 1_500.0;
/// The kills are spread over the stream: kill `k` (from 0) once `(k + 1) × STRETCH` rows are
/// committed or being committed, so the last sixth is committed after the last kill.
const STRETCH: i64 = ROWS / (KILLS as i64 + 1);

/// An active process is killed once it handled this many events (it is delivering).
const HANDLED_BEFORE_KILL: usize = 100;
/// The longest a failover may take.
const FAILOVER_LIMIT: Duration = Duration::from_secs(5);
/// How long a process may take to start (or a takeover to show up at all, so that a slow
/// one is measured and reported rather than timed out), and the rows to arrive.
const WITHIN: Duration = Duration::from_secs(60);
/// Polling interval of the bounded waits on record files.
const POLL: Duration = Duration::from_millis(10);

/// How far the writers may go before kill `kills` (the next one): half a stretch past its
/// mark, so each kill falls in the middle of the stream however slow the previous failover.
fn gate(kills: usize) -> i64 {
    if kills == KILLS {
        ROWS
    } else {
        mark(kills) + STRETCH / 2
    }
}

/// The rows committed or being committed when kill `k` is due.
fn mark(k: usize) -> i64 {
    (k as i64 + 1) * STRETCH
}

// ---------------------------------------------------------------------------------------------
// A group's process
// ---------------------------------------------------------------------------------------------

/// Appends every event and status it gets to the record file, one `write` per line.
struct Recorder {
    file: File,
}

impl Recorder {
    fn line(&mut self, line: String) {
        self.file
            .write_all(line.as_bytes())
            .expect("the group's process: write its record");
    }
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<ChangeEvent> for Recorder {
    type Result = ();
    fn handle(&mut self, event: ChangeEvent, _: &mut Context<Self>) {
        let id = event.id().as_i64().expect("an integer key");
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        self.line(format!("e {id} {ns}\n"));
    }
}

impl Handler<StatusEvent> for Recorder {
    type Result = ();
    fn handle(&mut self, event: StatusEvent, _: &mut Context<Self>) {
        let ns = event.at.duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let line = match event.status {
            Status::Active => format!("active {ns}\n"),
            Status::Standby => format!("standby {ns}\n"),
            other => format!("status {ns} {}\n", format!("{other:?}").replace('\n', " ")),
        };
        self.line(line);
    }
}

/// In a group's process: runs it and returns true; in the test's own process: false.
async fn group_process() -> bool {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return false;
    };
    common::init_logging();
    let file = children::record_file(CHILD_RECORD, "the group's process");
    let recorder = Recorder { file }.start();
    let mut watch = Watch::new("t", Insert);
    match std::env::var(CHILD_TIER).as_deref() {
        Ok("durable") => watch = watch.tier(Tier::Durable),
        Ok("poll") => watch = watch.tier(Tier::Poll),
        _ => {}
    }
    // Statuses subscribed on the builder, so none is missed. Events through an acknowledged
    // subscription, acknowledged once recorded: a plain one's event counts as done once it is
    // in the recorder's mailbox, and a SIGKILL before the recorder wrote it would lose it
    // (README: acknowledged subscriptions) — this test is about what the group delivers, not
    // that. A named consumer reads nothing before its first subscription: nothing is missed.
    let notifier = Notifier::builder(&url)
        .watch(watch)
        .consumer(CONSUMER)
        .subscribe_status(recorder.clone().recipient())
        .start()
        .await
        .expect("the group's process: start");
    let (_, mut deliveries) = notifier
        .subscribe_acked(Subscription::new("t", Insert))
        .await
        .expect("the group's process: subscribe");
    actix_rt::spawn(async move {
        while let Some(delivery) = deliveries.recv().await {
            recorder
                .send(delivery.event)
                .await
                .expect("the group's process: record");
            delivery.ack.ack();
        }
    });
    // Runs until killed, or until the test closes stdin (or dies).
    let _ = children::stdin_closed().await;
    notifier.stop().await.expect("the group's process: stop");
    true
}

// ---------------------------------------------------------------------------------------------
// The test's side: the group's processes and their records
// ---------------------------------------------------------------------------------------------

/// What a process's record file says so far (complete lines only).
#[derive(Default)]
struct Record {
    /// When it became active, each time (more than once is a failure).
    active: Vec<SystemTime>,
    standby: bool,
    /// The ids it handled, in order, with when.
    events: Vec<(i64, SystemTime)>,
    /// Events it handled before its first `active` line (a standby delivering: a failure).
    before_active: usize,
    /// Its other statuses, for failure messages.
    other: Vec<String>,
}

impl Record {
    fn read(path: &Path) -> Record {
        let mut record = Record::default();
        for line in children::complete_lines(path).lines() {
            let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
            let time = || {
                let ns: u64 = rest.split(' ').next().unwrap().parse().expect("a time");
                UNIX_EPOCH + Duration::from_nanos(ns)
            };
            match kind {
                "e" => {
                    let (id, _) = rest.split_once(' ').expect("an id and a time");
                    let ns: u64 = rest[id.len() + 1..].parse().expect("a time");
                    let at = UNIX_EPOCH + Duration::from_nanos(ns);
                    record.events.push((id.parse().expect("an id"), at));
                    if record.active.is_empty() {
                        record.before_active += 1;
                    }
                }
                "active" => record.active.push(time()),
                "standby" => record.standby = true,
                "status" => {
                    let status = rest.split_once(' ').map_or("", |(_, status)| status);
                    record.other.push(status.to_string());
                }
                _ => panic!("unexpected record line {line:?}"),
            }
        }
        record
    }
}

/// One process of the group.
struct Member {
    child: Child,
    /// Closing it stops the process gracefully (kept open until then).
    _stdin: ChildStdin,
    record: PathBuf,
    stderr: PathBuf,
    /// When the test sent it SIGKILL to make the group fail over.
    killed_at: Option<SystemTime>,
}

impl Member {
    fn record(&self) -> Record {
        Record::read(&self.record)
    }

    /// The end of what it wrote on stderr, for failure messages.
    fn stderr(&self) -> String {
        children::tail(&self.stderr, 4_000)
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }
}

/// The group's processes (every one started, killed ones included), SIGKILLed on drop; their
/// records are kept in a directory of the test's own, removed unless the test failed.
struct Group {
    test: String,
    url: String,
    tier: Option<Tier>,
    dir: RecordDir,
    members: Vec<Member>,
}

impl Group {
    fn new(test: &str, url: &str, tier: Option<Tier>) -> Group {
        let dir = RecordDir::new(
            &format!("sqlnotify-groups-{test}"),
            format!("{test}: the group's records"),
        );
        Group {
            test: test.to_string(),
            url: url.to_string(),
            tier,
            dir,
            members: Vec::new(),
        }
    }

    /// Starts another process of the group; returns its index.
    fn spawn(&mut self) -> usize {
        let n = self.members.len();
        let record = self.dir.join(format!("member-{n}.record"));
        let stderr = self.dir.join(format!("member-{n}.stderr"));
        let tier = match self.tier {
            Some(Tier::Durable) => "durable",
            Some(Tier::Poll) => "poll",
            _ => "",
        };
        let mut command = children::rerun(&self.test, &stderr);
        command
            .env(CHILD_URL, &self.url)
            .env(CHILD_TIER, tier)
            .env(CHILD_RECORD, &record);
        let (child, stdin) = children::spawn(command, "start a group's process");
        self.members.push(Member {
            child,
            _stdin: stdin,
            record,
            stderr,
            killed_at: None,
        });
        n
    }

    /// Waits (bounded) until member `n`'s record satisfies `done`.
    async fn wait_for(&mut self, n: usize, what: &str, done: impl Fn(&Record) -> bool) {
        let deadline = Instant::now() + WITHIN;
        loop {
            let record = self.members[n].record();
            if done(&record) {
                return;
            }
            let exited = self.members[n].exited();
            assert!(
                !exited && Instant::now() < deadline,
                "{}: member {n} {} {what} within {WITHIN:?} (statuses {:?})\n{}",
                self.test,
                if exited {
                    "exited before it was"
                } else {
                    "was not"
                },
                record.other,
                self.members[n].stderr()
            );
            tokio::time::sleep(POLL).await; // bounded poll of the record file
        }
    }

    /// Waits (bounded) until member `n`, started while another one is active, stands by.
    async fn wait_standby(&mut self, n: usize) {
        self.wait_for(n, "standing by", |r| r.standby || !r.active.is_empty())
            .await;
        assert!(
            self.members[n].record().active.is_empty(),
            "{}: member {n} became active while another one was",
            self.test
        );
    }

    /// The members running now, not counting those killed.
    fn alive(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&n| self.members[n].killed_at.is_none())
            .collect()
    }

    /// SIGKILL to member `n` (no chance to save a position or hand anything over).
    fn kill(&mut self, n: usize) {
        let member = &mut self.members[n];
        member.killed_at = Some(SystemTime::now());
        member.child.kill().expect("kill a group's process");
        let status = member.child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    }

    /// Waits (bounded) until one of the running members other than `old` is active; returns
    /// it.
    async fn next_active(&mut self, old: usize) -> usize {
        let deadline = Instant::now() + WITHIN;
        loop {
            let active: Vec<usize> = self
                .alive()
                .into_iter()
                .filter(|&n| !self.members[n].record().active.is_empty())
                .collect();
            match active[..] {
                [] => {}
                [n] => return n,
                _ => panic!("{}: several members took over: {active:?}", self.test),
            }
            assert!(
                Instant::now() < deadline,
                "{}: no member took over from member {old} within {WITHIN:?}",
                self.test
            );
            tokio::time::sleep(POLL).await; // bounded poll of the record files
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        children::kill_all(self.members.iter_mut().map(|m| &mut m.child));
        // The records' directory goes next (kept if the test failed).
    }
}

// ---------------------------------------------------------------------------------------------
// The test's side: the writers
// ---------------------------------------------------------------------------------------------

/// Where the rows are committed.
#[derive(Clone)]
enum Target {
    Postgres(String),
    Sqlite(PathBuf),
    #[cfg(feature = "mysql")]
    Mysql(String),
}

/// One writer's connection.
enum Writer {
    Postgres(tokio_postgres::Client),
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    #[cfg(feature = "mysql")]
    Mysql(mysql_async::Conn),
}

impl Target {
    async fn writer(&self) -> Writer {
        match self {
            Target::Postgres(url) => Writer::Postgres(common::connect(url).await),
            Target::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.busy_timeout(Duration::from_secs(30)).unwrap();
                Writer::Sqlite(Arc::new(Mutex::new(conn)))
            }
            #[cfg(feature = "mysql")]
            Target::Mysql(url) => Writer::Mysql(common::mysql::connect(url).await),
        }
    }
}

impl Writer {
    /// One transaction of `rows` rows, each with the next id (drawn row by row, so the
    /// writers' ids interleave), committed or rolled back; returns the ids.
    async fn transaction(&mut self, ids: &Arc<AtomicI64>, rows: u64, commit: bool) -> Vec<i64> {
        let end = if commit { "COMMIT" } else { "ROLLBACK" };
        let next = || ids.fetch_add(1, Ordering::Relaxed);
        match self {
            Writer::Postgres(client) => {
                client.batch_execute("BEGIN").await.unwrap();
                let mut written = Vec::new();
                for _ in 0..rows {
                    let id = next();
                    client
                        .execute("INSERT INTO t VALUES ($1)", &[&id])
                        .await
                        .unwrap();
                    written.push(id);
                }
                client.batch_execute(end).await.unwrap();
                written
            }
            Writer::Sqlite(conn) => {
                let (conn, ids) = (conn.clone(), ids.clone());
                tokio::task::spawn_blocking(move || {
                    let conn = conn.lock().unwrap();
                    // One writer at a time on SQLite: IMMEDIATE takes the write lock up front
                    // (waiting in the busy handler) rather than failing on an upgrade.
                    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                    let mut written = Vec::new();
                    for _ in 0..rows {
                        let id = ids.fetch_add(1, Ordering::Relaxed);
                        conn.execute("INSERT INTO t VALUES (?1)", [id]).unwrap();
                        written.push(id);
                    }
                    conn.execute_batch(end).unwrap();
                    written
                })
                .await
                .unwrap()
            }
            #[cfg(feature = "mysql")]
            Writer::Mysql(conn) => {
                use mysql_async::prelude::Queryable;
                conn.query_drop("BEGIN").await.unwrap();
                let mut written = Vec::new();
                for _ in 0..rows {
                    let id = next();
                    conn.exec_drop("INSERT INTO t VALUES (?)", (id,))
                        .await
                        .unwrap();
                    written.push(id);
                }
                conn.query_drop(end).await.unwrap();
                written
            }
        }
    }
}

/// A small deterministic generator (xorshift64*): the transactions' sizes and fates.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// What the writers did.
#[derive(Default)]
struct Written {
    committed: BTreeSet<i64>,
    rolled_back: BTreeSet<i64>,
    transactions: usize,
}

/// Writer `w`: transactions of 1–20 rows, about one in ten rolled back, until `ROWS` rows
/// are committed over all writers (`reserved` counts the rows committed or being committed).
/// Paced at `ROWS_PER_SECOND` from `start`, and held at [`gate`]`(kills)`.
async fn write(
    w: u64,
    target: &Target,
    ids: &Arc<AtomicI64>,
    reserved: &AtomicI64,
    kills: &AtomicUsize,
    start: tokio::time::Instant,
    written: &Mutex<Written>,
) {
    let mut conn = target.writer().await;
    let mut dice = Dice(0x9e37_79b9_7f4a_7c15 ^ (w + 1).wrapping_mul(0x1234_5678_9abc_def1));
    loop {
        let rows = 1 + dice.next() % MAX_TRANSACTION;
        let commit = dice.next() % 100 >= ROLLBACK_PERCENT;
        let mut rows_to_write = rows;
        if commit {
            let Ok(before) = reserved.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                (r < ROWS).then(|| (r + rows as i64).min(ROWS))
            }) else {
                return; // all rows committed (or being committed by the others)
            };
            rows_to_write = (ROWS - before).min(rows as i64) as u64;
            let after = before + rows_to_write as i64;
            let held = common::wait_until(WITHIN, || async {
                after <= gate(kills.load(Ordering::Relaxed))
            })
            .await;
            assert!(
                held,
                "writer {w}: the kills did not go on within {WITHIN:?}"
            );
            // Pacing (not synchronisation): this transaction's rows are due at this time.
            let due = start + Duration::from_secs_f64(before as f64 / ROWS_PER_SECOND);
            tokio::time::sleep_until(due).await;
        }
        let ids = conn.transaction(ids, rows_to_write, commit).await;
        let mut written = written.lock().unwrap();
        written.transactions += 1;
        if commit {
            written.committed.extend(ids);
        } else {
            written.rolled_back.extend(ids);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------------

/// The scenario: `test` is the calling test's name (the group's processes run it).
async fn fail_over_under_writes(test: &str, url: &str, tier: Option<Tier>, target: Target) {
    // How long before its kill a process may have handled a row its successor delivers
    // again: what it handed over since its last save (every 100 ms while it moves), with a
    // margin for a loaded machine; on MySQL also since the oldest journal id still missing
    // within the gap timeout (10 s), which the saved position cannot pass (README).
    let redelivered_within = match target {
        #[cfg(feature = "mysql")]
        Target::Mysql(_) => Duration::from_secs(15),
        _ => Duration::from_secs(5),
    };
    let started = SystemTime::now();
    let mut group = Group::new(test, url, tier);
    // The first process takes the lease (and registers the consumer: rows count from here);
    // the others stand by.
    let first = group.spawn();
    group
        .wait_for(first, "active", |r| !r.active.is_empty())
        .await;
    for _ in 1..PROCESSES {
        let n = group.spawn();
        group.wait_standby(n).await;
    }

    let ids = Arc::new(AtomicI64::new(1));
    let reserved = AtomicI64::new(0);
    let kills = AtomicUsize::new(0);
    let written = Mutex::new(Written::default());
    let start = tokio::time::Instant::now();
    let writers = futures_util::future::join_all(
        (0..WRITERS).map(|w| write(w, &target, &ids, &reserved, &kills, start, &written)),
    );
    // Rows committed or being committed at each kill.
    let mut at_kill = Vec::new();
    let killer = async {
        let mut active = first;
        for k in 0..KILLS {
            let due = common::wait_until(WITHIN, || async {
                reserved.load(Ordering::Relaxed) >= mark(k)
            })
            .await;
            assert!(due, "{test}: the writers did not reach row {}", mark(k));
            group
                .wait_for(active, "delivering", |r| {
                    r.events.len() >= HANDLED_BEFORE_KILL
                })
                .await;
            group.kill(active);
            kills.store(k + 1, Ordering::Relaxed);
            at_kill.push(reserved.load(Ordering::Relaxed));
            active = group.next_active(active).await;
            let fresh = group.spawn();
            group.wait_standby(fresh).await;
        }
    };
    tokio::join!(writers, killer);
    let written = written.into_inner().unwrap();
    let writing = start.elapsed();
    assert_eq!(
        written.committed.len() as i64,
        ROWS,
        "{test}: rows committed"
    );

    // Every committed row reaches some process.
    let union = |group: &Group| -> BTreeSet<i64> {
        group
            .members
            .iter()
            .flat_map(|m| m.record().events)
            .map(|(id, _)| id)
            .collect()
    };
    let complete = common::wait_until(WITHIN, || async {
        union(&group).is_superset(&written.committed)
    })
    .await;
    let missing: Vec<i64> = written
        .committed
        .difference(&union(&group))
        .copied()
        .collect();
    assert!(
        complete,
        "{test}: {} committed rows never reached a process, the first: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)],
    );
    let handled = union(&group);
    let rolled_back: Vec<_> = handled.intersection(&written.rolled_back).collect();
    assert!(
        rolled_back.is_empty(),
        "{test}: rolled-back rows were handled: {rolled_back:?}"
    );
    let foreign: Vec<_> = handled
        .difference(&written.committed)
        .filter(|id| !written.rolled_back.contains(id))
        .collect();
    assert!(foreign.is_empty(), "{test}: ids never written: {foreign:?}");

    // Who was active when: one at a time, each taking over only after the previous one's
    // SIGKILL, within the limit; a standby delivered nothing.
    let records: Vec<Record> = group.members.iter().map(Member::record).collect();
    let mut actives: Vec<(SystemTime, usize)> = Vec::new();
    for (n, record) in records.iter().enumerate() {
        assert!(
            record.active.len() <= 1,
            "{test}: member {n} became active {} times",
            record.active.len()
        );
        assert_eq!(
            record.before_active, 0,
            "{test}: member {n} handled events while it was not active"
        );
        actives.extend(record.active.iter().map(|&at| (at, n)));
    }
    actives.sort();
    assert_eq!(
        actives.len(),
        KILLS + 1,
        "{test}: the first active process and one per kill: {actives:?}"
    );
    assert_eq!(
        actives[0].1, first,
        "{test}: the first process was active first"
    );
    let mut failovers = Vec::new();
    for pair in actives.windows(2) {
        let ((_, old), (at, new)) = (pair[0], pair[1]);
        let killed = group.members[old].killed_at.unwrap_or_else(|| {
            panic!("{test}: member {new} became active while member {old} was, and alive")
        });
        let failover = at.duration_since(killed).unwrap_or_else(|_| {
            panic!(
                "{test}: member {new} became active {:?} before member {old}, active, was killed",
                killed.duration_since(at).unwrap()
            )
        });
        failovers.push((old, new, failover));
    }
    // (Any standby may take over, the newest as well as the oldest.)
    let mut kills_in_order: Vec<(SystemTime, usize)> = (0..group.members.len())
        .filter_map(|n| group.members[n].killed_at.map(|at| (at, n)))
        .collect();
    kills_in_order.sort();
    assert_eq!(
        kills_in_order.iter().map(|&(_, n)| n).collect::<Vec<_>>(),
        actives[..KILLS].iter().map(|&(_, n)| n).collect::<Vec<_>>(),
        "{test}: each kill hit the active process"
    );

    // Duplicates: an id handled by several processes, by none twice, and by each but the
    // last in the order they were active only shortly before that one was killed (events it
    // handed over after its last saved position, delivered again by its successor).
    let order: BTreeMap<usize, usize> = actives
        .iter()
        .enumerate()
        .map(|(i, &(_, n))| (n, i))
        .collect();
    let mut handlers: BTreeMap<i64, Vec<(usize, SystemTime)>> = BTreeMap::new();
    for (n, record) in records.iter().enumerate() {
        for &(id, at) in &record.events {
            handlers.entry(id).or_default().push((order[&n], at));
        }
    }
    let mut duplicates = [0usize; KILLS];
    let mut earliest = Duration::ZERO;
    for (id, by) in &mut handlers {
        if by.len() < 2 {
            continue;
        }
        by.sort();
        let distinct: BTreeSet<usize> = by.iter().map(|&(i, _)| i).collect();
        assert_eq!(
            distinct.len(),
            by.len(),
            "{test}: row {id} handled twice by one process (in activation order: {by:?})"
        );
        for &(i, at) in &by[..by.len() - 1] {
            let member = actives[i].1;
            let killed = group.members[member].killed_at.unwrap_or_else(|| {
                panic!("{test}: row {id} handled again after member {member}, never killed")
            });
            let before = killed.duration_since(at).unwrap_or_default();
            earliest = earliest.max(before);
            assert!(
                before <= redelivered_within,
                "{test}: row {id}, handled by member {member} {before:?} before it was killed, \
                 was delivered again (by activation order {by:?}): more than \
                 {redelivered_within:?} back, not in flight at the failover"
            );
        }
        duplicates[by[0].0] += by.len() - 1;
    }

    eprintln!(
        "{test}: {} rows committed, {} rolled back, in {} transactions by {WRITERS} writers \
         over {writing:.1?}; {} processes started, {KILLS} killed",
        written.committed.len(),
        written.rolled_back.len(),
        written.transactions,
        group.members.len(),
    );
    for (k, &(old, new, failover)) in failovers.iter().enumerate() {
        eprintln!(
            "{test}: failover {}: member {old} killed at row {} → member {new} active in \
             {failover:.3?}; {} extra deliveries of rows member {old} handled first",
            k + 1,
            at_kill[k],
            duplicates[k]
        );
    }
    eprintln!(
        "{test}: {} duplicates (extra deliveries) in all, the earliest handled first \
         {earliest:?} before its process was killed",
        duplicates.iter().sum::<usize>()
    );
    for (n, record) in records.iter().enumerate() {
        eprintln!(
            "{test}: member {n}: handled {} rows, active at {:?}, killed at {:?}, other statuses {:?}",
            record.events.len(),
            record.active.first().map(|at| at.duration_since(started).unwrap()),
            group.members[n].killed_at.map(|at| at.duration_since(started).unwrap()),
            record.other
        );
    }
    for (k, &(old, new, failover)) in failovers.iter().enumerate() {
        assert!(
            failover <= FAILOVER_LIMIT,
            "{test}: failover {} (member {old} → member {new}) took {failover:?}, more than \
             {FAILOVER_LIMIT:?}",
            k + 1
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn postgres_durable_tier_group_fails_over_without_losing_rows() {
    if group_process().await {
        return;
    }
    let db = common::TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    fail_over_under_writes(
        "postgres_durable_tier_group_fails_over_without_losing_rows",
        &db.url,
        Some(Tier::Durable),
        Target::Postgres(db.url.clone()),
    )
    .await;
}

#[actix_rt::test]
async fn postgres_poll_tier_group_fails_over_without_losing_rows() {
    if group_process().await {
        return;
    }
    let db = common::TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    fail_over_under_writes(
        "postgres_poll_tier_group_fails_over_without_losing_rows",
        &db.url,
        Some(Tier::Poll),
        Target::Postgres(db.url.clone()),
    )
    .await;
}

#[actix_rt::test]
async fn sqlite_group_fails_over_without_losing_rows() {
    if group_process().await {
        return;
    }
    let db = common::sqlite_file::SqliteFile::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    fail_over_under_writes(
        "sqlite_group_fails_over_without_losing_rows",
        &db.url(),
        None,
        Target::Sqlite(db.path.clone()),
    )
    .await;
}

#[cfg(feature = "mysql")]
#[actix_rt::test]
async fn mysql_group_fails_over_without_losing_rows() {
    if group_process().await {
        return;
    }
    let db = common::mysql::TestDb::new().await;
    db.exec("CREATE TABLE t (id BIGINT PRIMARY KEY)").await;
    fail_over_under_writes(
        "mysql_group_fails_over_without_losing_rows",
        &db.url,
        None,
        Target::Mysql(db.url.clone()),
    )
    .await;
}

/// The lease holder's connection is terminated (`pg_terminate_backend`, as an administrator
/// or a pooler's reaper would): the lease goes with it, and a member of the group — the
/// standby, or the old holder once reconnected — holds it again within the failover bound.
/// Rows written around the terminations all arrive, and the group ends with one active member.
#[actix_rt::test]
async fn postgres_a_terminated_lease_connection_hands_the_lease_on() {
    if group_process().await {
        return;
    }
    let db = common::TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<i64>();
    let mut members = Vec::new();
    for _ in 0..2 {
        let tx = tx.clone();
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(Tier::Durable))
            .consumer(CONSUMER)
            .start()
            .await
            .expect("start a member");
        notifier
            .subscribe_fn(Subscription::new("t", Insert), move |e| {
                let _ = tx.send(e.id().as_i64().expect("an integer key"));
            })
            .await
            .expect("subscribe");
        members.push(notifier);
    }
    // The backend holding the consumer's lease: the one granted advisory lock in this database.
    let holder = || async {
        db.count(
            "SELECT coalesce(max(pid), 0)::bigint FROM pg_catalog.pg_locks \
             WHERE locktype = 'advisory' AND granted \
               AND database = (SELECT oid FROM pg_catalog.pg_database \
                                WHERE datname = pg_catalog.current_database())",
        )
        .await
    };
    let client = db.client().await;
    let insert = |ids: std::ops::RangeInclusive<i64>| {
        let client = &client;
        async move {
            for id in ids {
                client
                    .execute("INSERT INTO t VALUES ($1)", &[&id])
                    .await
                    .expect("insert");
            }
        }
    };
    for round in 0..3_i64 {
        insert(round * 50 + 1..=round * 50 + 50).await;
        assert!(
            common::wait_until(FAILOVER_LIMIT, || async { holder().await != 0 }).await,
            "round {round}: nobody holds the lease"
        );
        let pid = holder().await;
        let killed = db
            .count(&format!(
                "SELECT pg_catalog.pg_terminate_backend({pid})::int::bigint"
            ))
            .await;
        assert_eq!(killed, 1, "round {round}: terminate the holder {pid}");
        let at = Instant::now();
        assert!(
            common::wait_until(FAILOVER_LIMIT, || async {
                let now = holder().await;
                now != 0 && now != pid
            })
            .await,
            "round {round}: the lease was not held again within {FAILOVER_LIMIT:?}"
        );
        println!(
            "termination {round}: lease held again in {:?}",
            at.elapsed()
        );
    }
    insert(151..=200).await;
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + WITHIN;
    while seen.len() < 200 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(id)) => {
                seen.insert(id);
            }
            _ => panic!(
                "rows missing: {:?}",
                (1..=200)
                    .filter(|id| !seen.contains(id))
                    .collect::<Vec<_>>()
            ),
        }
    }
    assert_eq!(seen, (1..=200).collect::<BTreeSet<i64>>());
    // The group settles with one active member and one standing by.
    let settled = common::wait_until(FAILOVER_LIMIT, || async {
        let mut roles = Vec::new();
        for member in &members {
            roles.push(member.stats().await.expect("stats").role);
        }
        roles.sort_by_key(|r| format!("{r:?}"));
        roles == [sqlnotify::Role::Active, sqlnotify::Role::Standby]
    })
    .await;
    assert!(
        settled,
        "the group did not settle with one active and one standby member"
    );
    for member in members {
        member.stop().await.expect("stop");
    }
}

/// Consumers of different names are different groups: each holds a lease of its own, so two
/// running at once on one database are both active and both receive every row (on every
/// dialect the lease is keyed by the consumer's name).
#[actix_rt::test]
async fn consumers_of_different_names_are_both_active() {
    if group_process().await {
        return;
    }
    let db = common::TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    let mut running = Vec::new();
    for name in ["billing", "audit"] {
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(Tier::Durable))
            .consumer(name)
            .start()
            .await
            .expect("start");
        let events = common::Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
        running.push((notifier, events));
    }
    db.exec("INSERT INTO t SELECT generate_series(1, 10)").await;
    for (notifier, events) in &mut running {
        let mut ids = Vec::new();
        for _ in 0..10 {
            ids.push(events.next().await.id().as_i64().expect("an integer key"));
        }
        assert_eq!(ids, (1..=10).collect::<Vec<_>>());
        let role = notifier.stats().await.expect("stats").role;
        assert_eq!(role, sqlnotify::Role::Active);
    }
    for (notifier, _) in running {
        notifier.stop().await.expect("stop");
    }
}

/// A member that loses the lease while events it delivered are still unacknowledged, and is
/// then stopped as a standby, does not save the position it had read to: those events are the
/// new holder's to deliver, and a later process gets them again. (Its final save once moved
/// the saved position past them: lost for good if the new holder stopped before acking.)
#[actix_rt::test]
async fn postgres_a_member_that_lost_its_lease_saves_nothing_past_what_it_did_not_ack() {
    if group_process().await {
        return;
    }
    const ROWS: i64 = 10;
    let db = common::TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    // Each member's connections carry its name, so that the test ends A's lease only.
    let member = |name: &str| {
        let sep = if db.url.contains('?') { '&' } else { '?' };
        Notifier::builder(format!("{}{sep}application_name={name}", db.url))
            .watch(Watch::new("t", Insert).tier(Tier::Durable))
            .consumer(CONSUMER)
    };
    // A, active: it gets every row and acknowledges none.
    let a = member("member_a").start().await.expect("start A");
    let mut a_statuses = common::statuses(&a).await;
    let (_, mut a_deliveries) = a
        .subscribe_acked(Subscription::new("t", Insert))
        .await
        .expect("subscribe A");
    for id in 1..=ROWS {
        db.exec(&format!("INSERT INTO t VALUES ({id})")).await;
    }
    let mut unacked = Vec::new();
    for id in 1..=ROWS {
        let delivery = tokio::time::timeout(Duration::from_secs(30), a_deliveries.recv())
            .await
            .expect("A gets the row")
            .expect("A's subscription is open");
        assert_eq!(delivery.event.id().as_i64(), Some(id));
        unacked.push(delivery.ack);
    }
    // B stands by; A's lease connection ends; B takes over, A stands by.
    let b = member("member_b").start().await.expect("start B");
    let (_, mut b_deliveries) = b
        .subscribe_acked(Subscription::new("t", Insert))
        .await
        .expect("subscribe B");
    // End A's lease connection until B is the one that takes the lease (A reconnects fast
    // and may take it back first).
    common::end_lease_until_lost(&db, "member_a", &mut a_statuses, Duration::from_secs(60)).await;
    // B delivers the rows again, unacknowledged too.
    for id in 1..=ROWS {
        let delivery = tokio::time::timeout(Duration::from_secs(30), b_deliveries.recv())
            .await
            .expect("B gets the row again")
            .expect("B's subscription is open");
        assert_eq!(delivery.event.id().as_i64(), Some(id));
        unacked.push(delivery.ack);
    }
    a.stop().await.expect("stop A");
    b.stop().await.expect("stop B");
    drop(unacked);

    // A later process gets every row again: no one acknowledged them.
    let c = member("member_c").start().await.expect("start C");
    let mut events = common::Events::subscribe(&c, Subscription::new("t", Insert)).await;
    let ids: Vec<i64> = events
        .take(ROWS as usize)
        .await
        .iter()
        .map(|e| e.id().as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=ROWS).collect::<Vec<_>>());
    c.stop().await.unwrap();
}
