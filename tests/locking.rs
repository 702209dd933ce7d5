//! Installing, replacing and removing triggers on PostgreSQL while other sessions hold locks
//! on the watched tables: sqlnotify waits in short attempts (the application's writes are not
//! held up), logs what it waits for, finishes once the lock is free, and otherwise gives up
//! after `install_timeout` with `Error::LockTimeout` naming the table and the holder's pid.
//! Real lock contention on the real server; no sleeps (bounded waits on `pg_locks`).

mod common;

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{wait_until, with_dbname, Events, TestDb};
use sqlnotify::{Error, Notifier, NotifierBuilder, Operation, Subscription, Tier, Watch};
use tokio_postgres::Client;

/// Log lines of the whole test binary (tests run in parallel: each looks for its own pid).
fn logs() -> &'static Mutex<Vec<String>> {
    static LOGS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    LOGS.get_or_init(Default::default)
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            logs().lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (before `TestDb::new`, whose env_logger then stays out).
fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        log::set_logger(&Capture).expect("the first logger");
        log::set_max_level(log::LevelFilter::Info);
    });
}

fn logged(needle: &str) -> bool {
    logs().lock().unwrap().iter().any(|l| l.contains(needle))
}

async fn new_db() -> TestDb {
    capture_logs();
    TestDb::new().await
}

/// A session with an open transaction that ran `sql` (so it holds its row locks and table
/// locks) until [`commit`](Self::commit).
struct Blocker {
    client: Client,
    pid: i32,
}

impl Blocker {
    async fn hold(db: &TestDb, sql: &str) -> Blocker {
        let client = db.client().await;
        let pid = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        client
            .batch_execute(&format!("BEGIN; {sql}"))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        Blocker { client, pid }
    }

    async fn commit(&self) {
        self.client.batch_execute("COMMIT").await.unwrap();
    }
}

/// Waits until a session other than `except` waits for a lock on `relation`: sqlnotify's DDL
/// is in the lock queue, where the application's writes would queue behind it.
async fn someone_waits_for(db: &TestDb, relation: &str, except: i32) {
    let client = db.client().await;
    let sql = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND pid <> $2 \
               AND relation = to_regclass($1))";
    let seen = wait_until(Duration::from_secs(10), || async {
        client
            .query_one(sql, &[&relation, &except])
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    assert!(seen, "nobody queued for a lock on {relation}");
}

/// The application's write, as an application with a 4 s statement timeout makes it.
async fn app_write(db: &TestDb, sql: &str) -> Result<Duration, String> {
    let client = db.client().await;
    client
        .batch_execute("SET statement_timeout = '4s'")
        .await
        .unwrap();
    let started = Instant::now();
    client
        .batch_execute(sql)
        .await
        .map(|()| started.elapsed())
        .map_err(|e| format!("{sql}: {e:?}"))
}

/// While `blocker` holds its locks, `operation` must queue for a lock on `relation` yet let
/// the application write (`write`), and finish once the blocker commits.
async fn waits_without_holding_up_writers<T>(
    db: &TestDb,
    blocker: &Blocker,
    relation: &str,
    write: &str,
    operation: impl std::future::Future<Output = sqlnotify::Result<T>>,
) -> T {
    let meanwhile = async {
        someone_waits_for(db, relation, blocker.pid).await;
        let written = app_write(db, write).await;
        blocker.commit().await;
        written
    };
    let (outcome, written) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(operation, meanwhile)
    })
    .await
    .expect("the operation finished after the blocker committed");
    if let Err(e) = written {
        panic!("the application's write failed while sqlnotify waited for a lock: {e}");
    }
    outcome.unwrap_or_else(|e| panic!("the operation failed after the blocker committed: {e}"))
}

/// A lock timeout on `object` held by backend `pid`.
fn assert_lock_timeout<T>(
    outcome: sqlnotify::Result<T>,
    object: &str,
    pid: i32,
    timeout: Duration,
) {
    common::assert_lock_timeout(outcome, object, &[pid as u64], timeout);
}

/// Gives up (a bounded wait) instead of hanging when the code under test would wait forever.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("gave up within the install timeout instead of waiting forever")
}

const SHORT: Duration = Duration::from_secs(1);

async fn trigger_oid(db: &TestDb, name: &str) -> Option<i64> {
    db.client()
        .await
        .query_opt(
            "SELECT oid::bigint FROM pg_trigger WHERE tgname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

async fn function_oid(db: &TestDb, name: &str) -> Option<i64> {
    db.client()
        .await
        .query_opt(
            "SELECT p.oid::bigint FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'sqlnotify' AND p.proname = $1 \
               AND p.prorettype = 'trigger'::regtype",
            &[&name],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

const T_INSERT: &str = "sqlnotify_public_t_insert";

fn watching_t(db: &TestDb) -> NotifierBuilder {
    Notifier::builder(&db.url).watch(Watch::new("t", Operation::Insert))
}

#[actix_rt::test]
async fn start_waits_for_an_open_writer_without_holding_up_the_application() {
    let db = new_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let blocker = Blocker::hold(&db, "INSERT INTO t VALUES (1)").await;
    let notifier = waits_without_holding_up_writers(
        &db,
        &blocker,
        "public.t",
        "INSERT INTO t VALUES (2)",
        watching_t(&db).start(),
    )
    .await;
    assert!(
        logged(&format!(
            "installing triggers: waiting for a lock on public.t (held by pid {})",
            blocker.pid
        )),
        "the wait was logged with the table and the holder: {:?}",
        logs().lock().unwrap()
    );
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (3)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(3));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn start_gives_up_after_the_install_timeout_naming_the_table_and_the_holder() {
    let db = new_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let blocker = Blocker::hold(&db, "UPDATE t SET id = id; INSERT INTO t VALUES (1)").await;
    let short = watching_t(&db).install_timeout(SHORT);
    let (outcome, written) = tokio::join!(bounded(short.start()), async {
        someone_waits_for(&db, "public.t", blocker.pid).await;
        app_write(&db, "INSERT INTO t VALUES (2)").await
    });
    assert_lock_timeout(outcome, "public.t", blocker.pid, SHORT);
    written.expect("the application's write went through meanwhile");
    assert_eq!(trigger_oid(&db, T_INSERT).await, None, "nothing installed");
    assert_eq!(db.count("SELECT count(*) FROM sqlnotify.catalog").await, 0);
    blocker.commit().await;
    watching_t(&db).start().await.unwrap().stop().await.unwrap();
    assert!(trigger_oid(&db, T_INSERT).await.is_some());
}

#[actix_rt::test]
async fn a_zero_install_timeout_is_refused() {
    let db = new_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let builder = watching_t(&db).install_timeout(Duration::ZERO);
    for err in [
        builder.start().await.map(|_| ()).unwrap_err(),
        builder.cleanup().await.map(|_| ()).unwrap_err(),
    ] {
        match err {
            Error::InvalidOption { option, .. } => assert_eq!(option, "install_timeout"),
            other => panic!("expected InvalidOption, got {other:?}"),
        }
    }
    assert_eq!(trigger_oid(&db, T_INSERT).await, None);
}

#[actix_rt::test]
async fn replacing_a_changed_watch_waits_or_gives_up_and_keeps_the_old_trigger() {
    let db = new_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, a text, b text)")
        .await;
    let v1 =
        Notifier::builder(&db.url).watch(Watch::new("t", Operation::Insert).extra_columns(["a"]));
    v1.start().await.unwrap().stop().await.unwrap();
    let old = trigger_oid(&db, T_INSERT).await.unwrap();
    let v2 = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert).extra_columns(["a", "b"]));

    // a reader is enough: dropping the old trigger needs ACCESS EXCLUSIVE
    let blocker = Blocker::hold(&db, "SELECT count(*) FROM t").await;
    let outcome = bounded(v2.clone().install_timeout(SHORT).start()).await;
    assert_lock_timeout(outcome, "public.t", blocker.pid, SHORT);
    assert_eq!(
        trigger_oid(&db, T_INSERT).await,
        Some(old),
        "old trigger kept"
    );

    let notifier = waits_without_holding_up_writers(
        &db,
        &blocker,
        "public.t",
        "INSERT INTO t VALUES (1, 'x', 'y')",
        v2.start(),
    )
    .await;
    assert_ne!(trigger_oid(&db, T_INSERT).await, Some(old), "replaced");
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (2, 'x', 'y')").await;
    assert_eq!(ev.next().await.get("b"), Some(&serde_json::json!("y")));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn cleanup_on_stop_waits_or_gives_up_naming_the_holder() {
    let db = new_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let builder = watching_t(&db).cleanup_on_stop(true);

    let notifier = builder
        .clone()
        .install_timeout(SHORT)
        .start()
        .await
        .unwrap();
    let blocker = Blocker::hold(&db, "INSERT INTO t VALUES (1)").await;
    assert_lock_timeout(
        bounded(notifier.stop()).await,
        "public.t",
        blocker.pid,
        SHORT,
    );
    assert!(
        trigger_oid(&db, T_INSERT).await.is_some(),
        "still installed"
    );
    blocker.commit().await;

    let notifier = builder.start().await.unwrap();
    let blocker = Blocker::hold(&db, "INSERT INTO t VALUES (2)").await;
    waits_without_holding_up_writers(
        &db,
        &blocker,
        "public.t",
        "INSERT INTO t VALUES (3)",
        notifier.stop(),
    )
    .await;
    assert_eq!(trigger_oid(&db, T_INSERT).await, None, "removed");
    assert_eq!(db.count("SELECT count(*) FROM sqlnotify.catalog").await, 0);
}

#[actix_rt::test]
async fn cleanup_and_cleanup_on_start_wait_or_give_up_naming_the_holder() {
    let db = new_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE u (id int PRIMARY KEY)")
        .await;
    let both = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .watch(Watch::new("u", Operation::Insert));
    both.start().await.unwrap().stop().await.unwrap();

    // the lock on u is busy: cleanup gives up, having dropped nothing (not even t's trigger)
    let blocker = Blocker::hold(&db, "INSERT INTO u VALUES (1)").await;
    let outcome = bounded(Notifier::builder(&db.url).install_timeout(SHORT).cleanup()).await;
    assert_lock_timeout(outcome, "public.u", blocker.pid, SHORT);
    assert!(trigger_oid(&db, T_INSERT).await.is_some(), "all or nothing");
    assert_eq!(db.count("SELECT count(*) FROM sqlnotify.catalog").await, 2);

    let outcome = bounded(
        watching_t(&db)
            .cleanup_on_start(true)
            .install_timeout(SHORT)
            .start(),
    )
    .await;
    assert_lock_timeout(outcome, "public.u", blocker.pid, SHORT);
    assert!(trigger_oid(&db, "sqlnotify_public_u_insert")
        .await
        .is_some());

    let removed = waits_without_holding_up_writers(
        &db,
        &blocker,
        "public.u",
        "INSERT INTO u VALUES (2)",
        Notifier::builder(&db.url).cleanup(),
    )
    .await;
    assert_eq!(removed, 2);
    assert_eq!(
        db.count("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'sqlnotify%'")
            .await,
        0
    );
}

#[actix_rt::test]
async fn the_journal_upgrade_waits_for_writers_without_holding_them_up() {
    let db = new_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let builder =
        Notifier::builder(&db.url).watch(Watch::new("t", Operation::Insert).tier(Tier::Durable));
    builder.start().await.unwrap().stop().await.unwrap();
    // the journal as an older version created it; a writer of that version's trigger holds
    // a journal row uncommitted
    db.exec("ALTER TABLE sqlnotify.journal DROP COLUMN events")
        .await;
    let blocker = Blocker::hold(&db, "INSERT INTO t VALUES (1)").await;
    let outcome = bounded(builder.clone().install_timeout(SHORT).start()).await;
    assert_lock_timeout(outcome, "sqlnotify.journal", blocker.pid, SHORT);

    // writers of the watched table write the journal: they go through while start() waits
    let notifier = waits_without_holding_up_writers(
        &db,
        &blocker,
        "sqlnotify.journal",
        "INSERT INTO t VALUES (2)",
        builder.start(),
    )
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM pg_attribute WHERE attrelid = 'sqlnotify.journal'::regclass AND attname = 'events'")
            .await,
        1,
        "upgraded"
    );
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.exec("INSERT INTO t VALUES (3)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(3));
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_second_instance_waits_for_the_install_lock_at_most_the_install_timeout() {
    let db = new_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    // another instance in the middle of installing: it holds the advisory install lock
    let other = Blocker::hold(&db, "SELECT pg_advisory_xact_lock(8318549208302119270)").await;
    let outcome = bounded(watching_t(&db).install_timeout(SHORT).start()).await;
    assert_lock_timeout(outcome, "the sqlnotify install lock", other.pid, SHORT);
    let builder = watching_t(&db);
    let (started, ()) = tokio::join!(builder.start(), async {
        let client = db.client().await;
        let waiting = wait_until(Duration::from_secs(10), || async {
            client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
        });
        assert!(
            waiting.await,
            "the second instance queued for the install lock"
        );
        other.commit().await;
    });
    assert!(logged(&format!(
        "waiting for a lock on the sqlnotify install lock (held by pid {})",
        other.pid
    )));
    started.unwrap().stop().await.unwrap();
}

/// A role that may do nothing with `t` but create triggers on it (so sqlnotify cannot
/// `LOCK TABLE` it first: the DDL takes the lock itself, bounded the same way).
struct TriggerOnlyRole {
    name: String,
    db: String,
}

impl TriggerOnlyRole {
    async fn create(db: &TestDb) -> TriggerOnlyRole {
        let name = format!("{}_installer", db.name);
        db.exec(&format!(
            "CREATE ROLE \"{name}\" LOGIN; GRANT CREATE ON DATABASE \"{db}\" TO \"{name}\";
             GRANT TRIGGER ON t TO \"{name}\";",
            db = db.name
        ))
        .await;
        TriggerOnlyRole {
            name,
            db: db.name.clone(),
        }
    }

    fn url(&self, db: &TestDb) -> String {
        let url = with_dbname(&common::server_url(), &db.name);
        let (scheme, rest) = url.split_once("://").unwrap();
        let host = rest.split_once('@').map_or(rest, |(_, h)| h);
        format!("{scheme}://{}@{host}", self.name)
    }
}

impl Drop for TriggerOnlyRole {
    fn drop(&mut self) {
        let (name, db) = (self.name.clone(), self.db.clone());
        common::on_a_runtime_of_its_own(async move {
            let client = common::connect(&with_dbname(&common::server_url(), &db)).await;
            let _ = client
                .batch_execute(&format!(
                    "DROP OWNED BY \"{name}\" CASCADE; DROP ROLE IF EXISTS \"{name}\""
                ))
                .await;
        });
    }
}

#[actix_rt::test]
async fn a_role_with_only_the_trigger_privilege_waits_and_gives_up_the_same_way() {
    let db = new_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let role = TriggerOnlyRole::create(&db).await;
    let builder = Notifier::builder(role.url(&db)).watch(Watch::new("t", Operation::Insert));
    let blocker = Blocker::hold(&db, "INSERT INTO t VALUES (1)").await;
    let outcome = bounded(builder.clone().install_timeout(SHORT).start()).await;
    assert_lock_timeout(outcome, "public.t", blocker.pid, SHORT);
    let notifier = waits_without_holding_up_writers(
        &db,
        &blocker,
        "public.t",
        "INSERT INTO t VALUES (2)",
        builder.start(),
    )
    .await;
    notifier.stop().await.unwrap();
    assert!(trigger_oid(&db, T_INSERT).await.is_some());
    db.exec("DROP SCHEMA sqlnotify CASCADE").await; // owned by the role
}

#[actix_rt::test]
async fn the_install_script_applied_again_recreates_only_what_changed() {
    let db = new_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, a text, b text)")
        .await;
    let watches = |extra: &[&str]| {
        Notifier::builder(&db.url)
            .watch(Watch::new("t", Operation::Insert))
            .watch(Watch::new("t", Operation::Update).extra_columns(extra.to_vec()))
    };
    const T_UPDATE: &str = "sqlnotify_public_t_update";
    let oids = || async {
        let mut out = Vec::new();
        for name in [T_INSERT, T_UPDATE] {
            out.push((
                function_oid(&db, name).await.expect("function"),
                trigger_oid(&db, name).await.expect("trigger"),
            ));
        }
        out
    };
    let script = watches(&["a"]).install_sql().await.unwrap();
    db.exec(&script).await;
    let first = oids().await;

    // applied again while a writer holds a row of t: nothing to lock, so nothing waits
    let blocker = Blocker::hold(&db, "INSERT INTO t VALUES (1)").await;
    let client = db.client().await;
    client
        .batch_execute("SET statement_timeout = '3s'")
        .await
        .unwrap();
    client
        .batch_execute(&script)
        .await
        .expect("an unchanged script applies without waiting for the table");
    assert_eq!(oids().await, first, "nothing recreated");

    blocker.commit().await;
    db.exec(&watches(&["a", "b"]).install_sql().await.unwrap())
        .await;
    let changed = oids().await;
    assert_eq!(changed[0], first[0], "the unchanged watch is untouched");
    assert_ne!(
        changed[1].0, first[1].0,
        "the changed watch's function is new"
    );
    assert_ne!(
        changed[1].1, first[1].1,
        "the changed watch's trigger is new"
    );
    // and start() with management on finds everything as generated
    watches(&["a", "b"])
        .manage_triggers(false)
        .start()
        .await
        .unwrap()
        .stop()
        .await
        .unwrap();
}

/// Any connected role can take a consumer's lease (a session advisory lock keyed by its
/// name): a process of the group then stands by, and its log names the holder — server
/// process, role, application — so that an operator can tell a foreign holder from a process
/// of the group.
#[actix_rt::test]
async fn a_standby_names_the_holder_of_its_consumers_lease() {
    let db = new_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (role, url) = db.role("squatter").await;
    let squatter = common::connect(&url).await;
    squatter
        .batch_execute(
            "SET application_name = 'squatter'; \
             SELECT pg_advisory_lock(('x' || substr(md5('sqlnotify consumer grp'), 1, 16))::bit(64)::bigint)",
        )
        .await
        .unwrap();
    let pid: i32 = squatter
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert).tier(Tier::Durable))
        .consumer("grp")
        .start()
        .await
        .unwrap();
    let needle = format!("held by server process {pid} (role \"{role}\", application \"squatter\"");
    stands_by_naming(notifier, &needle).await;
}

/// `notifier` stands by, and a log line names the lease's holder as `needle` says.
async fn stands_by_naming(notifier: Notifier, needle: &str) {
    assert_eq!(
        notifier.stats().await.unwrap().role,
        sqlnotify::Role::Standby
    );
    assert!(
        wait_until(Duration::from_secs(10), || async { logged(needle) }).await,
        "no log line names the holder: {:?}",
        logs().lock().unwrap()
    );
    notifier.stop().await.unwrap();
}

/// The same on MySQL / MariaDB, where any account can take a `GET_LOCK`: the standby's log
/// names the holder's connection and user.
#[cfg(feature = "mysql")]
#[actix_rt::test]
async fn a_mysql_standby_names_the_holder_of_its_consumers_lease() {
    use mysql_async::prelude::Queryable;
    capture_logs();
    let db = common::mysql::TestDb::new().await;
    db.exec("CREATE TABLE t (id INT PRIMARY KEY)").await;
    let mut squatter = db.conn().await;
    let id: Option<u64> = squatter
        .exec_first(
            "SELECT CONNECTION_ID() FROM (SELECT GET_LOCK(CONCAT('sqlnotify:', \
             LEFT(SHA2(CONCAT(?, '.', 'grp'), 256), 48)), 0)) AS taken",
            (&db.name,),
        )
        .await
        .unwrap();
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert))
        .consumer("grp")
        .start()
        .await
        .unwrap();
    let needle = format!("held by connection {} (user \"root\"", id.unwrap());
    stands_by_naming(notifier, &needle).await;
    let _ = squatter.disconnect().await;
}
