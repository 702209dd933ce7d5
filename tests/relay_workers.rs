//! Workers sharing one durable JetStream pull consumer on a relay's stream, on real servers: a
//! relay stores 600 committed rows; three worker processes (the test binary re-executed with
//! `SQLNOTIFY_WORKER_NATS` set) pull from one durable consumer (explicit acks, `ack_wait`
//! 2 s). One of them handles a message and hangs before acknowledging it, with the rest of its
//! batch in hand, and is SIGKILLed. Then: every row was handled and acknowledged (the
//! consumer has nothing pending, each message's ack was confirmed once), and handled exactly
//! once except the message the killed worker had handled and not acknowledged, which another
//! worker handled again.
//!
//! Each worker appends to a record file of its own, one plain `write` per line (which a
//! SIGKILL cannot take back): `ready` once it pulls, `h KEY ID DELIVERED` when it has handled
//! a message (its side effect, before the ack), `a KEY` once the server confirmed the ack
//! (`double_ack`), and — the worker told to hang — `stuck KEY` before it hangs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use futures_util::StreamExt;
use sqlnotify::relay::Relay;
use sqlnotify::Operation::Insert;
use sqlnotify::{Notifier, Tier, Watch};

use common::children::{self, RecordDir};
use common::nats::{delete_stream, jetstream, read_stream, shared};
use common::{unique_name, wait_until, TestDb};

/// Set in a worker process: the NATS URL, the stream, the subject filter, its record file,
/// and (the worker to kill) after how many handled messages it hangs.
const CHILD_NATS: &str = "SQLNOTIFY_WORKER_NATS";
const CHILD_STREAM: &str = "SQLNOTIFY_WORKER_STREAM";
const CHILD_FILTER: &str = "SQLNOTIFY_WORKER_FILTER";
const CHILD_RECORD: &str = "SQLNOTIFY_WORKER_RECORD";
const CHILD_HANG_AFTER: &str = "SQLNOTIFY_WORKER_HANG_AFTER";

/// The durable consumer the workers share.
const DURABLE: &str = "workers";
/// Rows committed (in transactions of 100), worker processes.
const ROWS: i64 = 600;
const WORKERS: usize = 3;
/// Worker 0 handles this many messages (each acknowledged), handles one more and hangs.
const HANG_AFTER: usize = 25;
/// The consumer: how long an unacknowledged message stays with its worker, how many may be
/// unacknowledged at once; messages a worker pulls at once.
const ACK_WAIT: Duration = Duration::from_secs(2);
const MAX_ACK_PENDING: i64 = 64;
const BATCH: usize = 10;
/// What handling one message takes (a stand-in for real work, so the kill falls mid-stream).
const WORK: Duration = Duration::from_millis(2);
/// How long anything may take.
const WITHIN: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// A worker process
// ---------------------------------------------------------------------------------------------

/// Appends lines to the record file, one `write` per line.
struct Recorder(File);

impl Recorder {
    fn line(&mut self, line: String) {
        self.0
            .write_all(line.as_bytes())
            .expect("a worker: write its record");
    }
}

/// The shared durable consumer, created by whichever worker comes first.
fn consumer_config(filter: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(DURABLE.to_string()),
        filter_subject: filter.to_string(),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: MAX_ACK_PENDING,
        ..Default::default()
    }
}

/// In a worker process: runs it and returns true; in the test's own process: false.
async fn worker_process() -> bool {
    let Ok(url) = std::env::var(CHILD_NATS) else {
        return false;
    };
    common::init_logging();
    let stream = std::env::var(CHILD_STREAM).expect("the stream");
    let filter = std::env::var(CHILD_FILTER).expect("the subject filter");
    let hang_after: Option<usize> = std::env::var(CHILD_HANG_AFTER)
        .ok()
        .map(|n| n.parse().expect("a count"));
    let mut recorder = Recorder(children::record_file(CHILD_RECORD, "a worker"));
    let js = jetstream(&url).await;
    let consumer: PullConsumer = js
        .get_stream(&stream)
        .await
        .expect("a worker: the stream")
        .get_or_create_consumer(DURABLE, consumer_config(&filter))
        .await
        .expect("a worker: the durable consumer");
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .messages()
        .await
        .expect("a worker: pull");
    recorder.line("ready\n".into());

    // Runs until killed, or until the test closes stdin (or dies).
    let mut stop = children::stdin_closed();
    let mut handled = 0;
    loop {
        let message = tokio::select! {
            _ = &mut stop => break,
            message = messages.next() => match message {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    eprintln!("a worker: pulling: {e}");
                    continue;
                }
                None => break,
            },
        };
        let delivered = message.info().expect("JetStream metadata").delivered;
        let headers = message.headers.clone().expect("headers");
        let header = |name: &str| headers.get(name).expect(name).to_string();
        let (key, id) = (header("Sqlnotify-Key"), header("Nats-Msg-Id"));
        tokio::time::sleep(WORK).await; // the handling
        recorder.line(format!("h {key} {id} {delivered}\n"));
        handled += 1;
        if hang_after.is_some_and(|n| handled > n) {
            // Handled, never acknowledged: the worker hangs (with the rest of its batch in
            // hand) until the test kills it.
            recorder.line(format!("stuck {key}\n"));
            std::future::pending::<()>().await;
        }
        message
            .double_ack()
            .await
            .unwrap_or_else(|e| panic!("a worker: acknowledge {id}: {e}"));
        recorder.line(format!("a {key}\n"));
    }
    true
}

// ---------------------------------------------------------------------------------------------
// The test's side: the workers and their records
// ---------------------------------------------------------------------------------------------

/// One message handled: its row's key, message id and delivery count.
#[derive(Debug, Clone)]
struct Handled {
    key: i64,
    id: String,
    delivered: i64,
}

/// What a worker's record file says so far (complete lines only).
#[derive(Debug, Default)]
struct Record {
    ready: bool,
    handled: Vec<Handled>,
    /// Keys whose ack the server confirmed.
    acked: Vec<i64>,
    stuck: Option<i64>,
}

impl Record {
    fn read(path: &Path) -> Record {
        let mut record = Record::default();
        for line in children::complete_lines(path).lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let key = || fields[1].parse::<i64>().expect("an integer key");
            match fields[0] {
                "ready" => record.ready = true,
                "h" => record.handled.push(Handled {
                    key: key(),
                    id: fields[2].to_string(),
                    delivered: fields[3].parse().expect("a delivery count"),
                }),
                "a" => record.acked.push(key()),
                "stuck" => record.stuck = Some(key()),
                _ => panic!("unexpected record line {line:?}"),
            }
        }
        record
    }
}

/// One worker process.
struct Worker {
    child: Child,
    /// Closing it stops the worker (kept open until then).
    stdin: Option<ChildStdin>,
    record: PathBuf,
    stderr: PathBuf,
    killed: bool,
}

impl Worker {
    fn record(&self) -> Record {
        Record::read(&self.record)
    }

    /// The end of what it wrote on stderr, for failure messages.
    fn stderr(&self) -> String {
        children::tail(&self.stderr, 4_000)
    }
}

/// The worker processes, SIGKILLed on drop; their records are kept in a directory of the
/// test's own, removed unless the test failed.
struct Pool {
    test: String,
    dir: RecordDir,
    workers: Vec<Worker>,
}

impl Pool {
    fn new(test: &str) -> Pool {
        let dir = RecordDir::new(
            &format!("sqlnotify-workers-{test}"),
            format!("{test}: the workers' records"),
        );
        Pool {
            test: test.to_string(),
            dir,
            workers: Vec::new(),
        }
    }

    /// Starts a worker on `stream` (subjects `filter`); `hang_after`: see [`HANG_AFTER`].
    fn spawn(&mut self, url: &str, stream: &str, filter: &str, hang_after: Option<usize>) {
        let n = self.workers.len();
        let record = self.dir.join(format!("worker-{n}.record"));
        let stderr = self.dir.join(format!("worker-{n}.stderr"));
        let mut command = children::rerun(&self.test, &stderr);
        command
            .env(CHILD_NATS, url)
            .env(CHILD_STREAM, stream)
            .env(CHILD_FILTER, filter)
            .env(CHILD_RECORD, &record)
            .env_remove(CHILD_HANG_AFTER);
        if let Some(after) = hang_after {
            command.env(CHILD_HANG_AFTER, after.to_string());
        }
        let (child, stdin) = children::spawn(command, "start a worker");
        self.workers.push(Worker {
            child,
            stdin: Some(stdin),
            record,
            stderr,
            killed: false,
        });
    }

    /// Waits (bounded) until worker `n`'s record satisfies `done`.
    async fn wait_for(&mut self, n: usize, what: &str, done: impl Fn(&Record) -> bool) {
        let worker = &mut self.workers[n];
        let mut exited = None;
        let reached = wait_until(WITHIN, || {
            let record = worker.record();
            exited = worker.child.try_wait().unwrap();
            let stop = done(&record) || exited.is_some();
            async move { stop }
        })
        .await;
        assert!(
            reached && done(&worker.record()),
            "{}: worker {n} was not {what} within {WITHIN:?} (exited: {exited:?})\n{}",
            self.test,
            worker.stderr()
        );
    }

    /// SIGKILL to worker `n`.
    fn kill(&mut self, n: usize) {
        let worker = &mut self.workers[n];
        worker.killed = true;
        worker.child.kill().expect("kill a worker");
        let status = worker.child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    }

    /// Closes the stdin of every worker not killed, and waits (bounded) until each exited
    /// successfully.
    async fn stop(&mut self) {
        for worker in &mut self.workers {
            worker.stdin = None;
        }
        for n in 0..self.workers.len() {
            let worker = &mut self.workers[n];
            if worker.killed {
                continue;
            }
            let mut status = None;
            let exited = wait_until(WITHIN, || {
                status = worker.child.try_wait().unwrap();
                let exited = status.is_some();
                async move { exited }
            })
            .await;
            assert!(
                exited && status.is_some_and(|s| s.success()),
                "{}: worker {n} did not stop cleanly within {WITHIN:?}: {status:?}\n{}",
                self.test,
                worker.stderr()
            );
        }
    }

    fn records(&self) -> Vec<Record> {
        self.workers.iter().map(Worker::record).collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        children::kill_all(self.workers.iter_mut().map(|w| &mut w.child));
        // The records' directory goes next (kept if the test failed).
    }
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn workers_share_one_durable_consumer_and_a_killed_one_loses_nothing() {
    if worker_process().await {
        return;
    }
    let test = "workers_share_one_durable_consumer_and_a_killed_one_loses_nothing";
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    let Some(url) = shared(test) else {
        return;
    };
    let stream = unique_name("WORKERS");
    let prefix = unique_name("workerstest");
    let relay = Relay::builder(
        Notifier::builder(&db.url)
            .watch(Watch::new("t", Insert).tier(Tier::Durable))
            .consumer("relay"),
        &url,
        &stream,
    )
    .subject_prefix(&prefix)
    .start()
    .await
    .unwrap();
    assert!(
        wait_until(WITHIN, || async { relay.stats().connections >= 1 }).await,
        "the relay did not connect (and make its stream): {:?}",
        relay.stats()
    );

    let mut pool = Pool::new(test);
    let filter = format!("{prefix}.>");
    for n in 0..WORKERS {
        pool.spawn(&url, &stream, &filter, (n == 0).then_some(HANG_AFTER));
    }
    for n in 0..WORKERS {
        pool.wait_for(n, "pulling", |r| r.ready).await;
    }
    for from in (1..=ROWS).step_by(100) {
        db.exec(&format!(
            "INSERT INTO t SELECT g FROM generate_series({from}, {}) g",
            from + 99
        ))
        .await;
    }

    // Worker 0 handled a message and hangs before acknowledging it: kill it.
    pool.wait_for(0, "stuck", |r| r.stuck.is_some()).await;
    let handled_at_kill: BTreeSet<i64> = pool
        .records()
        .iter()
        .flat_map(|r| r.handled.iter().map(|h| h.key))
        .collect();
    pool.kill(0);

    // Every message stored, handled and acknowledged: the consumer has nothing left to
    // deliver and nothing unacknowledged, and every ack was confirmed to a worker.
    let js = jetstream(&url).await;
    let handle = js.get_stream(&stream).await.unwrap();
    let settled = wait_until(WITHIN, || async {
        let info = handle.consumer_info(DURABLE).await.unwrap();
        let acked: usize = pool.records().iter().map(|r| r.acked.len()).sum();
        relay.stats().published == ROWS as u64
            && info.num_pending == 0
            && info.num_ack_pending == 0
            && acked >= ROWS as usize
    })
    .await;
    let info = handle.consumer_info(DURABLE).await.unwrap();
    assert!(
        settled,
        "not every message was handled and acknowledged within {WITHIN:?}: relay {:?}, \
         consumer: {} pending, {} unacknowledged",
        relay.stats(),
        info.num_pending,
        info.num_ack_pending
    );
    pool.stop().await;
    let records = pool.records();

    // The relay stored every row once.
    let stored = read_stream(&url, &stream).await;
    let keys: Vec<i64> = stored.iter().map(|m| m.key.parse().unwrap()).collect();
    assert_eq!(
        keys,
        (1..=ROWS).collect::<Vec<_>>(),
        "every row once, in order"
    );
    let ids: BTreeMap<i64, &str> = stored
        .iter()
        .map(|m| (m.key.parse().unwrap(), m.id.as_str()))
        .collect();
    assert_eq!(
        info.ack_floor.stream_sequence,
        stored.last().unwrap().stream_sequence,
        "the consumer's ack floor is the stream's last message"
    );

    // Every message handled at least once, acknowledged exactly once.
    let mut handled: BTreeMap<i64, Vec<(usize, &Handled)>> = BTreeMap::new();
    let mut acked: BTreeMap<i64, usize> = BTreeMap::new();
    for (n, record) in records.iter().enumerate() {
        for h in &record.handled {
            assert_eq!(ids[&h.key], h.id, "key {} came with its message id", h.key);
            handled.entry(h.key).or_default().push((n, h));
        }
        for &key in &record.acked {
            *acked.entry(key).or_default() += 1;
        }
    }
    let all: BTreeSet<i64> = (1..=ROWS).collect();
    assert_eq!(
        handled.keys().copied().collect::<BTreeSet<_>>(),
        all,
        "every message handled"
    );
    assert_eq!(
        acked.keys().copied().collect::<BTreeSet<_>>(),
        all,
        "every message acknowledged"
    );
    let twice: Vec<_> = acked.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "acknowledged more than once: {twice:?}");

    // Exactly once, except what the killed worker had handled and not acknowledged: handled
    // again, by another worker, on a later delivery.
    let victim = &records[0];
    let victim_acked: BTreeSet<i64> = victim.acked.iter().copied().collect();
    let in_hand: BTreeSet<i64> = victim
        .handled
        .iter()
        .map(|h| h.key)
        .filter(|key| !victim_acked.contains(key))
        .collect();
    assert_eq!(
        in_hand,
        BTreeSet::from([victim.stuck.unwrap()]),
        "the killed worker had in hand, unacknowledged, exactly the message it hung on"
    );
    let duplicates: BTreeMap<i64, &Vec<(usize, &Handled)>> = handled
        .iter()
        .filter(|(_, by)| by.len() > 1)
        .map(|(&key, by)| (key, by))
        .collect();
    assert_eq!(
        duplicates.keys().copied().collect::<BTreeSet<_>>(),
        in_hand,
        "only what the killed worker held unacknowledged was handled twice: {duplicates:?}"
    );
    for (key, by) in &duplicates {
        assert_eq!(by.len(), 2, "key {key}: handled twice at most: {by:?}");
        let again = by.iter().find(|(n, _)| *n != 0);
        assert!(
            again.is_some_and(|(_, h)| h.delivered >= 2),
            "key {key}: handled again by another worker, on a redelivery: {by:?}"
        );
    }
    for (n, record) in records.iter().enumerate().skip(1) {
        assert!(
            !record.handled.is_empty(),
            "worker {n} handled nothing: the work is shared"
        );
    }

    // Taken by the killed worker (in its batch) and never handled there: delivered again.
    let redelivered_unhandled = handled
        .iter()
        .filter(|(key, by)| !in_hand.contains(key) && by.iter().any(|(_, h)| h.delivered >= 2))
        .count();
    eprintln!(
        "{test}: {ROWS} messages; handled per worker {:?}; worker 0 killed after handling {} \
         ({} handled overall then), holding {} handled and unacknowledged (handled again: {} \
         duplicate) and {redelivered_unhandled} more taken but not handled (delivered again)",
        records.iter().map(|r| r.handled.len()).collect::<Vec<_>>(),
        victim.handled.len(),
        handled_at_kill.len(),
        in_hand.len(),
        duplicates.len(),
    );
    relay.stop().await.unwrap();
    delete_stream(&url, &stream).await;
}
