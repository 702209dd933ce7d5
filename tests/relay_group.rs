//! The relay under fault: three relay processes of one consumer group publish a PostgreSQL
//! table's changes into a JetStream stream of a `nats-server` of the test's own (4
//! partitions); four writers commit 20,000 new rows and updates of earlier rows in
//! overlapping transactions (some rolled back); meanwhile the active relay is SIGKILLed three
//! times (a fresh process joins after each kill, so three remain) and NATS is restarted twice.
//! Then the whole stream is read back: every committed change exactly once (count and message
//! ids), no rolled-back one, and each key's changes in commit order (version 0 from its
//! insert, then 1, 2, … from its updates) within its one partition subject. Failovers and NATS
//! outages are measured and printed.
//!
//! The test binary re-executes itself as the relay processes (`SQLNOTIFY_RELAY_CHILD_URL`
//! set). Each appends `active <ns>` / `standby <ns>` lines to a record file of its own with
//! one plain `write` per line, which a SIGKILL cannot take back; it runs until killed (or
//! until its stdin closes: then it stops gracefully).
//!
//! And in one process, two relays of one group: the active one's path to NATS hangs (a TCP
//! proxy of the test's own), its lease goes to the other, and once the stream's duplicate
//! window has passed the path comes back — the relay that lost its lease publishes nothing of
//! what it had queued, and publishes as ever once it takes the lease again.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use sqlnotify::relay::Relay;
use sqlnotify::Operation::{Insert, Update};
use sqlnotify::{Notifier, Status, StatusEvent, Tier, Watch};

use common::children::{self, RecordDir};
use common::nats::{read_stream, NatsServer};
use common::proxy::Proxy;
use common::{prerequisite_missing, TestDb};

const TEST: &str = "three_relays_through_kills_and_nats_restarts_store_every_change_once_in_order";
const CHILD_URL: &str = "SQLNOTIFY_RELAY_CHILD_URL";
const CHILD_NATS: &str = "SQLNOTIFY_RELAY_CHILD_NATS";
const CHILD_RECORD: &str = "SQLNOTIFY_RELAY_CHILD_RECORD";
const STREAM: &str = "GROUP";
const PARTITIONS: u32 = 4;

const PROCESSES: usize = 3;
const WRITERS: usize = 4;
const ROWS: i64 = 20_000;
/// New rows per transaction (1 to this); earlier rows updated per transaction (0 to this).
const MAX_INSERTS: i64 = 20;
const MAX_UPDATES: i64 = 3;
const ROLLBACK_PERCENT: u64 = 10;
/// New rows per second over all writers.
const ROWS_PER_SECOND: f64 = 1_500.0;
/// The faults, in order, each once this many new rows are committed or being committed.
const FAULTS: [(i64, Fault); 5] = [
    (3_000, Fault::KillActive),
    (6_000, Fault::RestartNats),
    (9_000, Fault::KillActive),
    (12_000, Fault::RestartNats),
    (15_000, Fault::KillActive),
];
const WITHIN: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillActive,
    RestartNats,
}

// ---------------------------------------------------------------------------------------------
// A relay process
// ---------------------------------------------------------------------------------------------

/// Appends `active <ns>` / `standby <ns>` to the record file, one `write` per line.
struct Recorder {
    file: File,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<StatusEvent> for Recorder {
    type Result = ();
    fn handle(&mut self, event: StatusEvent, _: &mut Context<Self>) {
        let ns = event.at.duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let line = match event.status {
            Status::Active => format!("active {ns}\n"),
            Status::Standby => format!("standby {ns}\n"),
            _ => return,
        };
        self.file
            .write_all(line.as_bytes())
            .expect("a relay process: write its record");
    }
}

async fn relay_process() -> bool {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return false;
    };
    common::init_logging();
    let nats = std::env::var(CHILD_NATS).expect("the NATS URL");
    let file = children::record_file(CHILD_RECORD, "a relay process");
    // Subscribed on the builder: the first status (Active or Standby) comes during start.
    let recorder = Recorder { file }.start();
    let builder = Notifier::builder(&url)
        .watch(
            Watch::new("t", Insert)
                .extra_columns(["version"])
                .tier(Tier::Durable),
        )
        .watch(
            Watch::new("t", Update)
                .extra_columns(["version"])
                .tier(Tier::Durable),
        )
        .consumer("relay-group")
        .subscribe_status(recorder.recipient());
    let relay = Relay::builder(builder, nats, STREAM)
        .partitions(PARTITIONS)
        .ack_timeout(Duration::from_secs(2))
        .start()
        .await
        .expect("a relay process: start");
    let _ = children::stdin_closed().await;
    relay.stop().await.expect("a relay process: stop");
    true
}

// ---------------------------------------------------------------------------------------------
// The test's side: the relay processes
// ---------------------------------------------------------------------------------------------

struct Member {
    child: Child,
    _stdin: ChildStdin,
    record: PathBuf,
    stderr: PathBuf,
    killed: bool,
}

impl Member {
    /// When it became active, if it did (complete lines only).
    fn active_since(&self) -> Option<SystemTime> {
        children::complete_lines(&self.record)
            .lines()
            .find_map(|line| {
                let ns: u64 = line.strip_prefix("active ")?.parse().ok()?;
                Some(UNIX_EPOCH + Duration::from_nanos(ns))
            })
    }

    fn stderr(&self) -> String {
        children::tail(&self.stderr, 3_000)
    }
}

struct Group {
    url: String,
    nats: String,
    dir: RecordDir,
    members: Vec<Member>,
}

impl Group {
    fn spawn(&mut self) {
        let n = self.members.len();
        let record = self.dir.join(format!("relay-{n}.record"));
        let stderr = self.dir.join(format!("relay-{n}.stderr"));
        let mut command = children::rerun(TEST, &stderr);
        command
            .env(CHILD_URL, &self.url)
            .env(CHILD_NATS, &self.nats)
            .env(CHILD_RECORD, &record);
        let (child, stdin) = children::spawn(command, "start a relay process");
        self.members.push(Member {
            child,
            _stdin: stdin,
            record,
            stderr,
            killed: false,
        });
    }

    /// Waits (bounded) until exactly one running member is active; returns it and when it
    /// became active.
    async fn active(&mut self) -> (usize, SystemTime) {
        let deadline = Instant::now() + WITHIN;
        loop {
            let active: Vec<(usize, SystemTime)> = (0..self.members.len())
                .filter(|&n| !self.members[n].killed)
                .filter_map(|n| Some((n, self.members[n].active_since()?)))
                .collect();
            match active[..] {
                [] => {}
                [one] => return one,
                _ => panic!("several relays active at once: {active:?}"),
            }
            for member in &mut self.members {
                if !member.killed {
                    assert!(
                        member.child.try_wait().unwrap().is_none(),
                        "a relay process exited:\n{}",
                        member.stderr()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "no relay became active within {WITHIN:?}"
            );
            tokio::time::sleep(POLL).await; // bounded poll of the record files
        }
    }

    fn kill(&mut self, n: usize) -> SystemTime {
        let member = &mut self.members[n];
        let at = SystemTime::now();
        member.killed = true;
        member.child.kill().expect("SIGKILL a relay");
        member.child.wait().unwrap();
        at
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

/// What the writers committed: each key's committed version (0 = inserted, +1 per update:
/// the stream must show a key's versions 0, 1, … in order). Locked only between awaits.
#[derive(Default)]
struct Committed {
    versions: HashMap<i64, i64>,
    rolled_back: HashSet<i64>,
    changes: u64,
}

/// Commits rows `next..` until `ROWS` are taken, at `ROWS_PER_SECOND / WRITERS`, never past
/// `gate` (the faults wait for their mark before the writers go on).
async fn writer(
    url: String,
    seed: u64,
    next: Arc<AtomicI64>,
    gate: Arc<AtomicI64>,
    committed: Arc<Mutex<Committed>>,
) {
    let mut client = common::connect(&url).await;
    let mut rng = seed;
    let mut random = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n.max(1)
    };
    let per_second = ROWS_PER_SECOND / WRITERS as f64;
    let started = Instant::now();
    let mut taken = 0i64;
    loop {
        let inserts = 1 + random(MAX_INSERTS as u64) as i64;
        // The last transaction is cut at ROWS; below ROWS the gate holds.
        while next.load(Ordering::SeqCst) + inserts > gate.load(Ordering::SeqCst)
            && gate.load(Ordering::SeqCst) < ROWS
        {
            tokio::time::sleep(POLL).await; // waits for the fault schedule
        }
        let first = next.fetch_add(inserts, Ordering::SeqCst) + 1;
        if first > ROWS {
            return;
        }
        let last = (first + inserts - 1).min(ROWS);
        // Updates of rows committed earlier, in key order (no deadlock between writers).
        let mut updates: Vec<i64> = {
            let c = committed.lock().unwrap();
            let n = random(MAX_UPDATES as u64 + 1);
            (0..n)
                .filter_map(|_| {
                    let key = 1 + random(first.max(2) as u64 - 1) as i64;
                    c.versions.contains_key(&key).then_some(key)
                })
                .collect()
        };
        updates.sort_unstable();
        updates.dedup();
        let rollback = random(100) < ROLLBACK_PERCENT;
        let tx = client.transaction().await.unwrap();
        tx.execute(
            "INSERT INTO t (id, version) SELECT g, 0 FROM generate_series($1::bigint, $2::bigint) g",
            &[&first, &last],
        )
        .await
        .unwrap();
        for key in &updates {
            tx.execute("UPDATE t SET version = version + 1 WHERE id = $1", &[key])
                .await
                .unwrap();
        }
        if rollback {
            tx.rollback().await.unwrap();
            committed.lock().unwrap().rolled_back.extend(first..=last);
        } else {
            tx.commit().await.unwrap();
            let mut c = committed.lock().unwrap();
            for key in first..=last {
                c.versions.insert(key, 0);
            }
            for key in &updates {
                *c.versions.get_mut(key).expect("updates committed rows") += 1;
            }
            c.changes += (last - first + 1) as u64 + updates.len() as u64;
        }
        taken += last - first + 1;
        let due = Duration::from_secs_f64(taken as f64 / per_second);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await; // paces the writer
        }
    }
}

#[actix_rt::test]
async fn three_relays_through_kills_and_nats_restarts_store_every_change_once_in_order() {
    if relay_process().await {
        return;
    }
    let Some(mut nats) = NatsServer::start() else {
        return prerequisite_missing(TEST, "no nats-server binary");
    };
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, version int NOT NULL)")
        .await;
    let dir = RecordDir::new(
        "sqlnotify-relay-group",
        format!("{TEST}: the relays' records"),
    );
    let mut group = Group {
        url: db.url.clone(),
        nats: nats.url(),
        dir,
        members: Vec::new(),
    };
    group.spawn();
    let (first, _) = group.active().await;
    for _ in 1..PROCESSES {
        group.spawn();
    }
    let _ = first;

    let next = Arc::new(AtomicI64::new(0));
    let gate = Arc::new(AtomicI64::new(FAULTS[0].0 + 500));
    let committed = Arc::new(Mutex::new(Committed::default()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(writer(
                db.url.clone(),
                0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1),
                next.clone(),
                gate.clone(),
                committed.clone(),
            ))
        })
        .collect();

    let mut failovers = Vec::new();
    let mut outages = Vec::new();
    for (i, (mark, fault)) in FAULTS.iter().enumerate() {
        let deadline = Instant::now() + WITHIN;
        while next.load(Ordering::SeqCst) < *mark {
            assert!(
                Instant::now() < deadline,
                "the writers stalled before {mark}"
            );
            tokio::time::sleep(POLL).await; // bounded wait for the writers' progress
        }
        match fault {
            Fault::KillActive => {
                let (active, _) = group.active().await;
                let killed_at = group.kill(active);
                group.spawn();
                let (next_active, since) = group.active().await;
                assert_ne!(next_active, active);
                failovers.push(since.duration_since(killed_at).unwrap_or_default());
            }
            Fault::RestartNats => {
                let down = Instant::now();
                nats.stop();
                // Written while NATS is down: the writers go on meanwhile.
                let deadline = Instant::now() + WITHIN;
                while next.load(Ordering::SeqCst) < mark + 300 {
                    assert!(
                        Instant::now() < deadline,
                        "the writers stalled while NATS was down"
                    );
                    tokio::time::sleep(POLL).await; // bounded wait for the writers' progress
                }
                nats.start_again();
                outages.push(down.elapsed());
            }
        }
        let following = FAULTS.get(i + 1).map_or(ROWS, |(m, _)| m + 500);
        gate.store(following, Ordering::SeqCst);
    }
    for w in writers {
        w.await.unwrap();
    }

    let (changes, versions, rolled_back) = {
        let c = committed.lock().unwrap();
        (c.changes, c.versions.clone(), c.rolled_back.clone())
    };
    // Everything reaches the stream (the last relay sends what is left).
    let url = nats.url();
    let deadline = Instant::now() + WITHIN;
    loop {
        let stored = common::nats::stream_messages(&url, STREAM).await;
        if stored >= changes {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {stored} of {changes} changes in the stream within {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // bounded poll of the stream
    }
    let stored = read_stream(&url, STREAM).await;
    assert_eq!(
        stored.len() as u64,
        changes,
        "every committed change once, nothing more"
    );
    let mut ids = HashSet::new();
    let mut per_key: BTreeMap<i64, Vec<(i64, String)>> = BTreeMap::new();
    for m in &stored {
        assert!(ids.insert(m.id.clone()), "message id {} stored twice", m.id);
        let key: i64 = m.key.parse().unwrap();
        assert!(!rolled_back.contains(&key), "rolled-back row {key} relayed");
        let version = m.body["columns"]["version"].as_i64().expect("a version");
        per_key
            .entry(key)
            .or_default()
            .push((version, m.subject.clone()));
    }
    assert_eq!(per_key.len(), versions.len(), "every committed row");
    for (key, changes) in &per_key {
        let got: Vec<i64> = changes.iter().map(|(v, _)| *v).collect();
        let want: Vec<i64> = (0..=versions[key]).collect();
        assert_eq!(
            got, want,
            "key {key}: its insert, then its updates, in commit order"
        );
        let subjects: HashSet<&str> = changes
            .iter()
            .map(|(_, s)| s.rsplit_once('.').unwrap().1)
            .collect();
        assert_eq!(
            subjects.len(),
            1,
            "key {key} stays in one partition: {subjects:?}"
        );
    }
    eprintln!(
        "{TEST}: {} changes ({} rows, {} rolled back) stored once each; failovers {failovers:?}; \
         NATS outages {outages:?}",
        changes,
        versions.len(),
        rolled_back.len()
    );
    assert!(
        failovers.iter().all(|f| *f <= Duration::from_secs(5)),
        "each failover within 5 s: {failovers:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// A relay that lost its lease publishes nothing it had queued
// ---------------------------------------------------------------------------------------------

const FENCE_TEST: &str = "a_relay_that_lost_its_lease_publishes_nothing_it_had_queued_even_late";

/// Every message id once, and each key's versions in stream order 0, 1, … `versions[key]`.
fn assert_once_in_order(stored: &[common::nats::Stored], versions: &BTreeMap<i64, i64>) {
    let mut ids = HashSet::new();
    let mut per_key: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for m in stored {
        assert!(ids.insert(m.id.clone()), "message id {} stored twice", m.id);
        let version = m.body["columns"]["version"].as_i64().expect("a version");
        per_key
            .entry(m.key.parse().expect("an integer key"))
            .or_default()
            .push(version);
    }
    for (key, last) in versions {
        assert_eq!(
            per_key.get(key),
            Some(&(0..=*last).collect::<Vec<_>>()),
            "key {key}: its insert, then its update, in commit order, once each"
        );
    }
    assert_eq!(per_key.len(), versions.len(), "no other key");
}

/// Relay A's path to NATS hangs while it holds the consumer's lease, so its queues fill up
/// (`max_pending` unconfirmed, more in its subscription); its database backend is ended
/// (`pg_terminate_backend`, as an operator failing over would) and relay B takes over and
/// publishes everything, then newer changes of the same keys. Once the stream's duplicate
/// window (2 s here) has passed, A's path comes back: A, a standby now, must publish nothing
/// of what it had queued — sent then, every message would be stored a second time, behind
/// the newer changes. Its drops are counted in `RelayStats::fenced`. Then B stops, A takes
/// the lease again and publishes what follows as ever.
#[actix_rt::test]
async fn a_relay_that_lost_its_lease_publishes_nothing_it_had_queued_even_late() {
    const WINDOW: Duration = Duration::from_secs(2);
    const FIRST: i64 = 10;
    const ROWS: i64 = 100;
    let Some(nats) = common::nats::shared(FENCE_TEST) else {
        return;
    };
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, version int NOT NULL)")
        .await;
    let stream = common::unique_name("RELAYFENCE");
    let prefix = common::unique_name("relayfence");
    let path = Proxy::start(nats.trim_start_matches("nats://").to_string()).await;
    // Each relay's connections carry its name, so that the test ends A's lease only.
    let relay = |name: &str, nats: String| {
        let sep = if db.url.contains('?') { '&' } else { '?' };
        let builder = Notifier::builder(format!("{}{sep}application_name={name}", db.url))
            .watch(
                Watch::new("t", Insert)
                    .extra_columns(["version"])
                    .tier(Tier::Durable),
            )
            .watch(
                Watch::new("t", Update)
                    .extra_columns(["version"])
                    .tier(Tier::Durable),
            )
            .consumer("relay-fence");
        Relay::builder(builder, nats, &stream)
            .subject_prefix(&prefix)
            .duplicate_window(WINDOW)
            .max_pending(16)
            .ack_timeout(Duration::from_secs(1))
            .start()
    };
    let stored_in_stream = |n: u64| {
        let (nats, stream) = (nats.clone(), stream.clone());
        async move { common::nats::stream_messages(&nats, &stream).await == n }
    };
    let a = relay("relay_a", format!("nats://127.0.0.1:{}", path.port))
        .await
        .expect("start A");
    let mut a_statuses = common::statuses(a.notifier()).await;
    assert!(
        common::wait_until(WITHIN, || async {
            a.notifier().stats().await.unwrap().role == sqlnotify::Role::Active
        })
        .await,
        "A, the first, is active"
    );
    let b = relay("relay_b", nats.clone()).await.expect("start B");
    let mut versions: BTreeMap<i64, i64> = BTreeMap::new();

    // A publishes through the path.
    db.exec(&format!(
        "INSERT INTO t SELECT g, 0 FROM generate_series(1, {FIRST}) g"
    ))
    .await;
    versions.extend((1..=FIRST).map(|k| (k, 0)));
    assert!(
        common::wait_until(WITHIN, || async { a.stats().published == FIRST as u64 }).await,
        "A publishes the first rows: {:?}",
        a.stats()
    );

    // The path hangs; A reads on and queues.
    path.black_hole();
    db.exec(&format!(
        "INSERT INTO t SELECT g, 0 FROM generate_series({}, {ROWS}) g",
        FIRST + 1
    ))
    .await;
    versions.extend((FIRST + 1..=ROWS).map(|k| (k, 0)));
    assert!(
        common::wait_until(WITHIN, || async {
            a.notifier().stats().await.unwrap().received >= ROWS as u64
                && a.stats().pending > 0
                && a.stats().failures > 0
        })
        .await,
        "A reads every row and queues what it cannot publish: {:?}",
        a.stats()
    );

    // A's lease connection ends until B is the one that takes the lease (A reconnects fast
    // and may take it back first).
    common::end_lease_until_lost(&db, "relay_a", &mut a_statuses, WITHIN).await;

    // B publishes everything, then newer changes of the same keys.
    assert!(
        common::wait_until(WITHIN, || stored_in_stream(ROWS as u64)).await,
        "B publishes every row: {:?}",
        b.stats()
    );
    let first_copies_stored = Instant::now();
    db.exec(&format!("UPDATE t SET version = 1 WHERE id > {FIRST}"))
        .await;
    versions.extend((FIRST + 1..=ROWS).map(|k| (k, 1)));
    let changes = (ROWS + ROWS - FIRST) as u64;
    assert!(
        common::wait_until(WITHIN, || stored_in_stream(changes)).await,
        "B publishes the updates: {:?}",
        b.stats()
    );

    // The stream forgets the ids once its window has passed (it purges them on a timer).
    let forgotten = first_copies_stored + 3 * WINDOW;
    tokio::time::sleep_until(forgotten.into()).await; // a bounded wait past the dedup window

    // A's path comes back: A connects again, and accounts for every event it was handed.
    let links = a.stats().connections;
    path.reopen();
    assert!(
        common::wait_until(WITHIN, || async { a.stats().connections > links }).await,
        "A connects to NATS again: {:?}",
        a.stats()
    );
    assert!(
        common::wait_until(WITHIN, || async {
            let (relay, notifier) = (a.stats(), a.notifier().stats().await.unwrap());
            notifier.queued == 0
                && notifier.in_flight == 0
                && relay.pending == 0
                && relay.published + relay.duplicates + relay.fenced == notifier.delivered
        })
        .await,
        "A takes and settles everything it was handed: {:?}, {:?}",
        a.stats(),
        a.notifier().stats().await.unwrap()
    );
    let stored = read_stream(&nats, &stream).await;
    assert_once_in_order(&stored, &versions);
    assert_eq!(stored.len() as u64, changes, "{:?}", a.stats());
    assert!(
        a.stats().fenced > 0,
        "A had queued messages when it lost the lease: {:?}",
        a.stats()
    );
    assert_eq!(a.stats().published, FIRST as u64, "{:?}", a.stats());

    // B stops: A takes the lease again and publishes what follows.
    b.stop().await.expect("stop B");
    assert!(
        common::wait_until(WITHIN, || async {
            a.notifier().stats().await.unwrap().role == sqlnotify::Role::Active
        })
        .await,
        "A takes the lease again"
    );
    db.exec(&format!(
        "INSERT INTO t SELECT g, 0 FROM generate_series({}, {}) g",
        ROWS + 1,
        ROWS + FIRST
    ))
    .await;
    versions.extend((ROWS + 1..=ROWS + FIRST).map(|k| (k, 0)));
    assert!(
        common::wait_until(WITHIN, || stored_in_stream(changes + FIRST as u64)).await,
        "A, active again, publishes the new rows: {:?}",
        a.stats()
    );
    // The stream stores a message before A has read its acknowledgement: wait for those.
    assert!(
        common::wait_until(WITHIN, || async {
            let stats = a.stats();
            stats.pending == 0 && stats.published >= 2 * FIRST as u64
        })
        .await,
        "A has every acknowledgement: {:?}",
        a.stats()
    );
    assert_eq!(a.stats().published, 2 * FIRST as u64, "{:?}", a.stats());
    // And its position moves past them: nothing of the lost lease holds it back.
    let backlog = || async {
        let consumers = a.notifier().consumers().await.expect("list consumers");
        let me = consumers.iter().find(|c| c.name == "relay-fence");
        me.expect("the relays' consumer").backlog
    };
    assert!(
        common::wait_until(WITHIN, || async { backlog().await == 0 }).await,
        "A saves its position past what it published: backlog {}",
        backlog().await
    );
    let stored = read_stream(&nats, &stream).await;
    assert_once_in_order(&stored, &versions);
    eprintln!("{FENCE_TEST}: A {:?}", a.stats());
    a.stop().await.expect("stop A");
    common::nats::delete_stream(&nats, &stream).await;
}
