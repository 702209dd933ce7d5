//! A consumer group under a real network fault: the active member's machine goes silent. Two
//! processes run one named consumer on PostgreSQL's durable tier against a cluster of the
//! test's own; member A (active first) runs in a network namespace of the test's own, reaching
//! the server over a veth pair, member B on the host. While writers commit rows at a steady
//! rate and A delivers, the veth's host side is taken down — every packet between A and the
//! server is lost, and A is *not* killed. Then: B takes over within the design bound (the
//! server-side TCP keepalive or `tcp_user_timeout` set on the listener connection ends A's
//! backend, releasing the lease, plus B's 250 ms lease retry); every committed row was handled
//! by A or B, a row only by both (A first, B again: in flight at the failover); and once the
//! network is back, A is fenced: it delivers nothing while B is active, never becomes active
//! again and reports `Status::LostLease` / `Status::Standby`.
//!
//! The test binary re-executes itself as the group's members (the same test, with
//! `SQLNOTIFY_SILENT_CHILD_URL` set; A through `ip netns exec`). Each one appends what it
//! handles to a record file of its own with one plain `write` per line: `e <id> <ns>` per
//! event, `active <ns>` / `standby <ns>` and `status <ns> <status>` for any other status
//! (`<ns>`: Unix time in nanoseconds, of the delivery or of the status). Needs root and
//! iproute2 (`ip netns`); without them the test is skipped (a failure with `CI` set).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use sqlnotify::Operation::Insert;
use sqlnotify::{ChangeEvent, Notifier, Status, StatusEvent, Subscription, Tier, Watch};

use common::children::{self, RecordDir};

/// Set in a member's process: the database URL and its record file.
const CHILD_URL: &str = "SQLNOTIFY_SILENT_CHILD_URL";
const CHILD_RECORD: &str = "SQLNOTIFY_SILENT_CHILD_RECORD";
/// The consumer both members run as.
const CONSUMER: &str = "silent";
/// The test (the members run it).
const TEST: &str = "postgres_active_members_machine_goes_silent";

/// Writers, and the rows they commit per second over all of them.
const WRITERS: u64 = 2;
const ROWS_PER_SECOND: f64 = 200.0;
/// A goes silent once it handled this many events (it is delivering); B must have handled as
/// many before the network comes back, and as many again after A reported losing its lease.
const HANDLED: usize = 200;
/// The design bound of a failover after the holder's machine went silent: the server ends its
/// backend after 1 s idle + 3 probes 1 s apart (or, with data on its way, `tcp_user_timeout`
/// 4 s), and a standby retries the lease every 250 ms: about 4.5 s; the goal is 5 s,
/// the assertion leaves room for a loaded machine.
const FAILOVER_LIMIT: Duration = Duration::from_secs(10);
/// How long a member may take to start, a takeover to show up at all (so that a slow one is
/// measured and reported rather than timed out), A to report once the network is back (its
/// own TCP retransmissions back off), and the rows to arrive.
const WITHIN: Duration = Duration::from_secs(60);
/// Polling interval of the bounded waits on record files.
const POLL: Duration = Duration::from_millis(10);

fn unix_ns(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

// ---------------------------------------------------------------------------------------------
// A member's process
// ---------------------------------------------------------------------------------------------

/// Appends every event and status it gets to the record file, one `write` per line.
struct Recorder {
    file: File,
}

impl Recorder {
    fn line(&mut self, line: String) {
        self.file
            .write_all(line.as_bytes())
            .expect("a member: write its record");
    }
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<ChangeEvent> for Recorder {
    type Result = ();
    fn handle(&mut self, event: ChangeEvent, _: &mut Context<Self>) {
        let id = event.id().as_i64().expect("an integer key");
        self.line(format!("e {id} {}\n", unix_ns(SystemTime::now())));
    }
}

impl Handler<StatusEvent> for Recorder {
    type Result = ();
    fn handle(&mut self, event: StatusEvent, _: &mut Context<Self>) {
        let ns = unix_ns(event.at);
        let line = match event.status {
            Status::Active => format!("active {ns}\n"),
            Status::Standby => format!("standby {ns}\n"),
            other => format!("status {ns} {}\n", format!("{other:?}").replace('\n', " ")),
        };
        self.line(line);
    }
}

/// In a member's process: runs it and returns true; in the test's own process: false.
async fn member_process() -> bool {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return false;
    };
    common::init_logging();
    let file = children::record_file(CHILD_RECORD, "a member");
    let recorder = Recorder { file }.start();
    // Subscribed on the builder (events and status), so nothing is missed, replay included.
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("t", Insert).tier(Tier::Durable))
        .consumer(CONSUMER)
        .subscribe(Subscription::new("t", Insert), recorder.clone().recipient())
        .subscribe_status(recorder.recipient())
        .start()
        .await
        .expect("a member: start");
    // Runs until killed, or until the test closes stdin (or dies).
    let _ = children::stdin_closed().await;
    notifier.stop().await.expect("a member: stop");
    true
}

// ---------------------------------------------------------------------------------------------
// The network: a namespace of the test's own, joined to the host by a veth pair
// ---------------------------------------------------------------------------------------------

/// Runs `ip` with `args`; its stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace ("A's machine") and a veth pair: the host side `10.X.Y.1/24`, the
/// namespace's side `10.X.Y.2/24` (X and Y from the process id, so parallel runs do not
/// clash). Removed on drop (also when the test panics).
struct Namespace {
    name: String,
    /// The veth's host side (taken down to silence A's machine) and the namespace's side.
    host_side: String,
    inside: String,
    /// `10.X.Y`.
    prefix: String,
}

impl Namespace {
    /// Creates the namespace and the link, or says why it cannot.
    fn create() -> Result<Namespace, String> {
        let pid = std::process::id();
        let prefix = format!("10.{}.{}", 64 + (pid >> 8) % 128, pid & 0xff);
        let ns = Namespace {
            name: format!("sqlnotify-silent-{pid}"),
            host_side: format!("sqnh{pid}"),
            inside: format!("sqnn{pid}"),
            prefix,
        };
        // Left over by an earlier process of the same id that could not clean up.
        let _ = ip(&["link", "del", &ns.host_side]);
        let _ = ip(&["netns", "del", &ns.name]);
        ip(&["netns", "add", &ns.name])?;
        // From here on, drop removes what was made.
        let host_address = format!("{}/24", ns.host_address());
        let inside_address = format!("{}.2/24", ns.prefix);
        let host_side = ns.host_side.clone();
        let inside = ns.inside.clone();
        ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", &inside, "netns", &ns.name,
        ])?;
        ip(&["addr", "add", &host_address, "dev", &host_side])?;
        ip(&["link", "set", &host_side, "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &inside_address,
            "dev",
            &inside,
        ])?;
        ip(&["-n", &ns.name, "link", "set", &inside, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The server's address as seen from the namespace.
    fn host_address(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// The link's network (CIDR).
    fn network(&self) -> String {
        format!("{}.0/24", self.prefix)
    }

    /// A command running `program` inside the namespace.
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Every packet between the namespace and the host is lost from now on.
    fn silence(&self) {
        ip(&["link", "set", &self.host_side, "down"]).expect("take the veth's host side down");
    }

    /// The link carries packets again.
    fn restore(&self) {
        ip(&["link", "set", &self.host_side, "up"]).expect("bring the veth's host side up");
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting one side of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.host_side]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

// ---------------------------------------------------------------------------------------------
// The test's side: the members and their records
// ---------------------------------------------------------------------------------------------

/// What a member's record file says so far (complete lines only).
#[derive(Default)]
struct Record {
    /// When it became active, each time.
    active: Vec<SystemTime>,
    /// When it announced standing by, each time.
    standby: Vec<SystemTime>,
    /// The ids it handled, in order, and when.
    events: Vec<(i64, SystemTime)>,
    /// Events it handled before its first `active` line (a standby delivering: a failure).
    before_active: usize,
    /// Its other statuses.
    other: Vec<(SystemTime, String)>,
}

impl Record {
    fn read(path: &Path) -> Record {
        let mut record = Record::default();
        let time = |ns: &str| UNIX_EPOCH + Duration::from_nanos(ns.parse().expect("a time"));
        for line in children::complete_lines(path).lines() {
            let mut words = line.splitn(3, ' ');
            let (kind, first, rest) = (words.next(), words.next(), words.next());
            match (kind, first, rest) {
                (Some("e"), Some(id), Some(at)) => {
                    record.events.push((id.parse().expect("an id"), time(at)));
                    if record.active.is_empty() {
                        record.before_active += 1;
                    }
                }
                (Some("active"), Some(at), None) => record.active.push(time(at)),
                (Some("standby"), Some(at), None) => record.standby.push(time(at)),
                (Some("status"), Some(at), Some(status)) => {
                    record.other.push((time(at), status.to_string()));
                }
                _ => panic!("unexpected record line {line:?}"),
            }
        }
        record
    }

    /// Its statuses (all kinds) at or after `since`, in order, with the time since then.
    fn statuses_since(&self, since: SystemTime) -> Vec<(Duration, String)> {
        let mut statuses: Vec<(SystemTime, String)> = self
            .active
            .iter()
            .map(|&at| (at, "Active".to_string()))
            .chain(self.standby.iter().map(|&at| (at, "Standby".to_string())))
            .chain(self.other.iter().cloned())
            .filter(|(at, _)| *at >= since)
            .collect();
        statuses.sort();
        statuses
            .into_iter()
            .map(|(at, status)| (at.duration_since(since).unwrap(), status))
            .collect()
    }
}

/// One member of the group.
struct Member {
    name: &'static str,
    child: Child,
    /// Closing it stops the process gracefully (kept open until then).
    _stdin: ChildStdin,
    record: PathBuf,
    stderr: PathBuf,
}

impl Member {
    fn record(&self) -> Record {
        Record::read(&self.record)
    }

    /// The end of what it wrote on stderr, for failure messages.
    fn stderr(&self) -> String {
        format!(
            "--- member {} stderr ({}), the end:\n{}",
            self.name,
            self.stderr.display(),
            children::tail(&self.stderr, 6_000)
        )
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits (bounded by `within`) until its record satisfies `done`; the record then.
    async fn wait_for(
        &mut self,
        within: Duration,
        what: &str,
        done: impl Fn(&Record) -> bool,
    ) -> Record {
        let deadline = Instant::now() + within;
        loop {
            let record = self.record();
            if done(&record) {
                return record;
            }
            let exited = self.exited();
            assert!(
                !exited && Instant::now() < deadline,
                "{TEST}: member {} {} {what} within {within:?} (statuses {:?})\n{}",
                self.name,
                if exited {
                    "exited before it was"
                } else {
                    "was not"
                },
                record.other,
                self.stderr()
            );
            tokio::time::sleep(POLL).await; // bounded poll of the record file
        }
    }
}

/// The members, SIGKILLed on drop; their records are kept in a directory of the test's own,
/// removed unless the test failed.
struct Group {
    dir: RecordDir,
    members: Vec<Member>,
}

impl Group {
    fn new() -> Group {
        let dir = RecordDir::new("sqlnotify-silent", format!("{TEST}: the members' records"));
        Group {
            dir,
            members: Vec::new(),
        }
    }

    /// Starts a member through `command` (the test binary, possibly wrapped); returns its
    /// index.
    fn spawn(&mut self, name: &'static str, command: Command, url: &str) -> usize {
        let record = self.dir.join(format!("member-{name}.record"));
        let stderr = self.dir.join(format!("member-{name}.stderr"));
        let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "sqlnotify=debug".into());
        let mut command = children::rerun_through(command, TEST, &stderr);
        command
            .env(CHILD_URL, url)
            .env(CHILD_RECORD, &record)
            .env("RUST_LOG", log);
        let (child, stdin) = children::spawn(command, "start a member");
        self.members.push(Member {
            name,
            child,
            _stdin: stdin,
            record,
            stderr,
        });
        self.members.len() - 1
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        children::kill_all(self.members.iter_mut().map(|m| &mut m.child));
        // The records' directory goes next (kept if the test failed).
    }
}

// ---------------------------------------------------------------------------------------------
// The writers
// ---------------------------------------------------------------------------------------------

/// Writer `w`: one row per transaction, the next id each, paced at `ROWS_PER_SECOND` over all
/// writers from `start`, until `stop`; records what it committed.
async fn write(
    url: &str,
    ids: &AtomicI64,
    stop: &AtomicBool,
    start: tokio::time::Instant,
    committed: &Mutex<BTreeSet<i64>>,
) {
    let client = common::connect(url).await;
    while !stop.load(Ordering::Relaxed) {
        let id = ids.fetch_add(1, Ordering::Relaxed);
        // Pacing (not synchronisation): this row is due at this time.
        let due = start + Duration::from_secs_f64((id - 1) as f64 / ROWS_PER_SECOND);
        tokio::time::sleep_until(due).await;
        client
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap_or_else(|e| panic!("insert row {id}: {e}"));
        committed.lock().unwrap().insert(id);
    }
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn postgres_active_members_machine_goes_silent() {
    if member_process().await {
        return;
    }
    if !running_as_root() {
        common::prerequisite_missing(TEST, "root (to make a network namespace)");
        return;
    }
    let ns = match Namespace::create() {
        Ok(ns) => ns,
        Err(e) => {
            common::prerequisite_missing(TEST, &format!("a network namespace: {e}"));
            return;
        }
    };
    let Some(cluster) = common::Cluster::start_also_on(&ns.host_address(), &ns.network()) else {
        common::prerequisite_missing(TEST, "PostgreSQL's binaries (initdb, pg_ctl)");
        return;
    };
    let db = common::TestDb::on(&cluster.url()).await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    // A reaches the server over the veth, B and the writers over the loopback.
    let url_a = db
        .url
        .replace("@127.0.0.1:", &format!("@{}:", ns.host_address()));
    assert_ne!(url_a, db.url, "the database URL names 127.0.0.1");
    let exe = std::env::current_exe().unwrap();

    let mut group = Group::new();
    let a = group.spawn("A", ns.command(&exe), &url_a);
    group.members[a]
        .wait_for(WITHIN, "active", |r| !r.active.is_empty())
        .await;
    let b = group.spawn("B", Command::new(&exe), &db.url);
    let record = group.members[b]
        .wait_for(WITHIN, "standing by", |r| {
            !r.standby.is_empty() || !r.active.is_empty()
        })
        .await;
    assert!(
        record.active.is_empty(),
        "{TEST}: B became active while A was\n{}",
        group.members[b].stderr()
    );

    let ids = AtomicI64::new(1);
    let stop = AtomicBool::new(false);
    let committed = Mutex::new(BTreeSet::new());
    let start = tokio::time::Instant::now();
    let writers = futures_util::future::join_all(
        (0..WRITERS).map(|_| write(&db.url, &ids, &stop, start, &committed)),
    );
    let fault = async {
        let group = &mut group;
        group.members[a]
            .wait_for(WITHIN, "delivering", |r| r.events.len() >= HANDLED)
            .await;
        let committed_at_silence = committed.lock().unwrap().len();
        let silent_at = SystemTime::now();
        ns.silence();
        let silenced_in = silent_at.elapsed().unwrap();
        let record = group.members[b]
            .wait_for(WITHIN, "active after A's machine went silent", |r| {
                !r.active.is_empty()
            })
            .await;
        let b_active = record.active[0];
        assert!(
            b_active >= silent_at,
            "{TEST}: B became active before A's machine went silent"
        );
        assert!(
            !group.members[a].exited(),
            "{TEST}: A exited while silent\n{}",
            group.members[a].stderr()
        );
        let b_before_restore = group.members[b]
            .wait_for(WITHIN, "delivering", |r| r.events.len() >= HANDLED)
            .await
            .events
            .len();
        let restored_at = SystemTime::now();
        ns.restore();
        // A notices its connection is gone once the network is back, finds the lease taken
        // and stands by.
        let a_report = group.members[a]
            .wait_for(
                WITHIN,
                "reporting the lost lease once the network was back",
                |r| {
                    r.standby.iter().any(|&at| at >= silent_at)
                        || r.active.iter().any(|&at| at >= silent_at)
                        || r.other
                            .iter()
                            .any(|(at, s)| *at >= silent_at && s == "LostLease")
                },
            )
            .await;
        let reported_at = a_report
            .standby
            .iter()
            .chain(&a_report.active)
            .chain(a_report.other.iter().map(|(at, _)| at))
            .filter(|&&at| at >= silent_at)
            .max()
            .copied()
            .unwrap();
        // B goes on delivering; A stays quiet.
        let handled = group.members[b].record().events.len();
        group.members[b]
            .wait_for(WITHIN, "delivering after A's report", |r| {
                r.events.len() >= handled + HANDLED
            })
            .await;
        stop.store(true, Ordering::Relaxed);
        (
            committed_at_silence,
            silent_at,
            silenced_in,
            b_active,
            b_before_restore,
            restored_at,
            reported_at,
        )
    };
    let (_, phases) = tokio::join!(writers, fault);
    let (
        committed_at_silence,
        silent_at,
        silenced_in,
        b_active,
        b_before_restore,
        restored_at,
        reported_at,
    ) = phases;
    let committed = committed.into_inner().unwrap();
    let writing = start.elapsed();

    // Every committed row reaches A or B.
    let union = |group: &Group| -> BTreeSet<i64> {
        group
            .members
            .iter()
            .flat_map(|m| m.record().events.into_iter().map(|(id, _)| id))
            .collect()
    };
    let complete =
        common::wait_until(WITHIN, || async { union(&group).is_superset(&committed) }).await;
    let missing: Vec<i64> = committed.difference(&union(&group)).copied().collect();
    assert!(
        complete,
        "{TEST}: {} committed rows never reached a member, the first: {:?}\n{}\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        group.members[a].stderr(),
        group.members[b].stderr()
    );
    let (record_a, record_b) = (group.members[a].record(), group.members[b].record());
    let foreign: Vec<i64> = union(&group).difference(&committed).copied().collect();
    assert!(foreign.is_empty(), "{TEST}: ids never written: {foreign:?}");

    // Each row at most once per member; a row handled twice was handled by A before B took
    // over, then again by B once active (in flight at the failover).
    let mut handlers: BTreeMap<i64, Vec<(SystemTime, &str)>> = BTreeMap::new();
    for (name, record) in [("A", &record_a), ("B", &record_b)] {
        for &(id, at) in &record.events {
            handlers.entry(id).or_default().push((at, name));
        }
    }
    let duplicates: Vec<i64> = handlers
        .iter_mut()
        .filter(|(_, by)| by.len() > 1)
        .map(|(&id, by)| {
            by.sort();
            let names: Vec<&str> = by.iter().map(|&(_, name)| name).collect();
            assert_eq!(names, ["A", "B"], "{TEST}: row {id} handled by {by:?}");
            assert!(
                by[0].0 < b_active && by[1].0 >= b_active,
                "{TEST}: row {id} handled by A at {:?} and by B at {:?}, B active at {b_active:?}",
                by[0].0,
                by[1].0
            );
            id
        })
        .collect();
    // What A handled after its machine went silent (from its pipeline, read before), and
    // after B took over (fencing: nothing).
    let a_after_silence = record_a
        .events
        .iter()
        .filter(|&&(_, at)| at >= silent_at)
        .count();
    let a_after_takeover: Vec<i64> = record_a
        .events
        .iter()
        .filter(|&&(_, at)| at >= b_active)
        .map(|&(id, _)| id)
        .collect();

    let since = |at: SystemTime| at.duration_since(silent_at).unwrap_or_default();
    let failover = b_active.duration_since(silent_at).unwrap_or_default();
    eprintln!(
        "{TEST}: {} rows committed by {WRITERS} writers over {writing:.1?} ({} when A's machine \
         went silent, after A handled {HANDLED})",
        committed.len(),
        committed_at_silence,
    );
    eprintln!(
        "{TEST}: A silent (veth host side down, in {silenced_in:.1?}) → B active in \
         {failover:.3?} (limit {FAILOVER_LIMIT:?})"
    );
    eprintln!(
        "{TEST}: network back at +{:.3?} (B had handled {b_before_restore}); A reported at \
         +{:.3?}; A's statuses since the silence: {:?}",
        since(restored_at),
        since(reported_at),
        record_a.statuses_since(silent_at)
    );
    eprintln!(
        "{TEST}: A handled {} rows ({a_after_silence} after the silence, {} after B took over), \
         B {}; {} duplicates (rows A handled that B handled again){}",
        record_a.events.len(),
        a_after_takeover.len(),
        record_b.events.len(),
        duplicates.len(),
        match (duplicates.first(), duplicates.last()) {
            (Some(first), Some(last)) => format!(", ids {first}..={last}"),
            _ => String::new(),
        }
    );

    // Fencing: A was active once (before the silence) and never again; it delivered nothing
    // while B was active; it is still running (not killed, not crashed), standing by.
    assert_eq!(
        record_a.active.len(),
        1,
        "{TEST}: A became active {} times; statuses since the silence {:?}\n{}",
        record_a.active.len(),
        record_a.statuses_since(silent_at),
        group.members[a].stderr()
    );
    assert!(
        record_a.active[0] < silent_at,
        "{TEST}: A became active after its machine went silent"
    );
    assert!(
        a_after_takeover.is_empty(),
        "{TEST}: A handled {} rows after B took over (fencing), the first: {:?}\n{}",
        a_after_takeover.len(),
        &a_after_takeover[..a_after_takeover.len().min(20)],
        group.members[a].stderr()
    );
    assert!(
        record_a
            .other
            .iter()
            .any(|(at, s)| *at >= silent_at && s == "LostLease")
            || record_a.standby.iter().any(|&at| at >= silent_at),
        "{TEST}: A reported neither LostLease nor Standby after the silence: {:?}",
        record_a.statuses_since(silent_at)
    );
    assert!(
        !group.members[a].exited(),
        "{TEST}: A exited\n{}",
        group.members[a].stderr()
    );
    // B: active once, after the silence, and delivered nothing before.
    assert_eq!(
        record_b.active.len(),
        1,
        "{TEST}: B became active {} times",
        record_b.active.len()
    );
    assert_eq!(
        record_b.before_active, 0,
        "{TEST}: B handled rows while standing by"
    );
    assert!(
        failover <= FAILOVER_LIMIT,
        "{TEST}: B took over {failover:?} after A's machine went silent, more than \
         {FAILOVER_LIMIT:?}\n{}\n{}",
        group.members[a].stderr(),
        group.members[b].stderr()
    );
}
