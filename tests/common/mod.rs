//! Shared test helpers: a throwaway PostgreSQL database per test (and in [`sqlite`] and
//! [`mysql`] their SQLite and MySQL counterparts, behind [`backend::Backend`] for the shared
//! scenarios), and event collection with bounded waits (never bare sleeps).
#![allow(dead_code)]

pub mod backend;
pub mod certs;
pub mod children;
pub mod consumers;
#[cfg(feature = "mysql")]
pub mod mariadb;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "nats")]
pub mod nats;
pub mod proxy;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "sqlite")]
pub mod sqlite_file;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlnotify::{ChangeEvent, Notifier, Subscription, SubscriptionId};
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls};

/// How long a test waits for an event that must arrive.
pub const ARRIVES_WITHIN: Duration = Duration::from_secs(10);

/// The server tests use: `SQLNOTIFY_TEST_PG_URL`, else the local server.
pub fn server_url() -> String {
    std::env::var("SQLNOTIFY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The test server's unix socket (directory, port): `SQLNOTIFY_TEST_PG_SOCKET` ("dir:port",
/// set by scripts/test), else Debian's default socket when the default server is used.
pub fn socket() -> Option<(String, u16)> {
    if let Ok(value) = std::env::var("SQLNOTIFY_TEST_PG_SOCKET") {
        let (dir, port) = value.rsplit_once(':')?;
        return Some((dir.to_string(), port.parse().ok()?));
    }
    let default_server =
        std::env::var("SQLNOTIFY_TEST_PG_URL").map_or(true, |u| u.contains("127.0.0.1:5432"));
    let dir = "/var/run/postgresql";
    (default_server && std::path::Path::new(dir).join(".s.PGSQL.5432").exists())
        .then(|| (dir.to_string(), 5432))
}

pub fn init_logging() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// Whether this run must not skip anything: `CI` is set (to anything but "", "0" or "false";
/// `.ci/run` sets it, and scripts/test provides every prerequisite).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// A test cannot run because `what` is missing: with [`ci`] that is a failure (a skipped test
/// must not pass as green); otherwise the caller returns after this says on stderr what was
/// skipped and why (written past the test harness's capture, so it shows in a passing run).
pub fn prerequisite_missing(test: &str, what: &str) {
    if ci() {
        panic!("{test} cannot run: {what} (CI is set: a missing prerequisite is a failure)");
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {what} (scripts/test provides it; with CI set this fails)"
    );
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e} (set SQLNOTIFY_TEST_PG_URL)"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database of its own for one test, dropped (with its connections) when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
    /// Login roles made by [`TestDb::role`], dropped after the database.
    roles: std::sync::Mutex<Vec<String>>,
}

impl TestDb {
    pub async fn new() -> TestDb {
        TestDb::on(&server_url()).await
    }

    /// A database of its own on the server `admin_url` connects to (a [`Cluster`], say).
    pub async fn on(admin_url: &str) -> TestDb {
        TestDb::create(admin_url, "").await
    }

    /// A database of its own whose server encoding is `SQL_ASCII` (bytes stored as given).
    pub async fn sql_ascii() -> TestDb {
        TestDb::create(
            &server_url(),
            " ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'",
        )
        .await
    }

    async fn create(admin_url: &str, options: &str) -> TestDb {
        init_logging();
        let name = unique_name("sqlnotify_test");
        let admin_url = admin_url.to_string();
        let admin = connect(&admin_url).await;
        admin
            .batch_execute(&format!(
                "CREATE DATABASE \"{name}\" TEMPLATE template0{options}"
            ))
            .await
            .expect("create test database");
        let url = with_dbname(&admin_url, &name);
        TestDb {
            name,
            url,
            admin_url,
            roles: Default::default(),
        }
    }

    /// A login role of this test's own with no privilege beyond what every role has (the
    /// test grants what it needs), dropped when the test ends; returns its name and a URL of
    /// this database connecting as it.
    pub async fn role(&self, suffix: &str) -> (String, String) {
        let role = format!("{}_{suffix}", self.name);
        connect(&self.admin_url)
            .await
            .batch_execute(&format!(
                "CREATE ROLE \"{role}\" LOGIN PASSWORD 'sqlnotify-test'"
            ))
            .await
            .unwrap_or_else(|e| panic!("CREATE ROLE {role}: {e}"));
        self.roles.lock().unwrap().push(role.clone());
        let url = with_user(&self.url, &role, "sqlnotify-test");
        (role, url)
    }

    /// Sends `payload` on `channel` signed with the database's signing key, the way a trigger
    /// signs it (for tests that forge references a trigger could have sent).
    pub async fn notify_signed(&self, channel: &str, payload: &str) {
        self.client()
            .await
            .execute(
                "SELECT pg_notify($1, (SELECT encode(sha256(opad || sha256(ipad || \
                   convert_to($1 || chr(10) || $2, 'UTF8'))), 'base64') \
                   FROM sqlnotify.signing) || $2)",
                &[&channel, &payload],
            )
            .await
            .unwrap_or_else(|e| panic!("signed NOTIFY on {channel}: {e}"));
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Runs SQL on a fresh connection.
    pub async fn exec(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Runs a query returning one i64.
    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let roles = std::mem::take(&mut *self.roles.lock().unwrap_or_else(|p| p.into_inner()));
        // Drop runs outside async; use a runtime of our own on a plain thread.
        on_a_runtime_of_its_own(async move {
            if let Ok((client, conn)) = tokio_postgres::connect(&admin_url, NoTls).await {
                tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
                // Privileges lived in the dropped database only: the roles can go now.
                for role in roles {
                    let _ = client
                        .batch_execute(&format!("DROP ROLE IF EXISTS \"{role}\""))
                        .await;
                }
            }
        });
    }
}

/// Runs `work` to completion on a runtime of its own on a plain thread, and waits for it:
/// for `Drop` implementations, which run outside async code (also inside a test's runtime).
pub fn on_a_runtime_of_its_own(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work)
    })
    .join();
}

/// A name no other test (in this process or another) uses: `prefix`, the process id, a
/// counter and the clock's nanoseconds.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos % 100_000
    )
}

/// `url` connecting as `user` with `password` (URL or key=value form).
pub fn with_user(url: &str, user: &str, password: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            format!("{scheme}://{user}:{password}@{host}")
        }
        None => format!("{url} user={user} password={password}"),
    }
}

/// `url` with its database replaced by `dbname` (URL or key=value form).
pub fn with_dbname(url: &str, dbname: &str) -> String {
    if url.contains("://") {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let after_scheme = base.find("://").unwrap() + 3;
        let base = match base[after_scheme..].find('/') {
            Some(slash) => &base[..after_scheme + slash],
            None => base,
        };
        match query {
            Some(q) => format!("{base}/{dbname}?{q}"),
            None => format!("{base}/{dbname}"),
        }
    } else {
        format!("{url} dbname={dbname}")
    }
}

/// Checks a stream of events of writers' transactions, each updating rows' `v` by one: every
/// transaction arrives as one run of consecutive events ending with the one marked last, no
/// transaction id comes back after its run ended, and each row's versions (`v`) arrive in
/// order. Returns how many transactions ended and the sum of the rows' last versions.
#[allow(dead_code)]
pub fn assert_transactions_whole_and_in_order(events: &[ChangeEvent]) -> (usize, i64) {
    use std::collections::{BTreeMap, HashMap};
    let mut ended: HashMap<u64, usize> = HashMap::new();
    let mut current: Option<u64> = None;
    let mut transactions = 0;
    let mut versions: BTreeMap<i64, i64> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        let x = e.transaction_id().expect("a transaction id");
        assert!(
            !ended.contains_key(&x),
            "event {i} of transaction {x}, which ended at event {}",
            ended[&x]
        );
        if let Some(c) = current {
            assert_eq!(
                c, x,
                "event {i}: transaction {c} ended without its last mark"
            );
        }
        current = Some(x);
        if e.last_in_transaction() == Some(true) {
            ended.insert(x, i);
            current = None;
            transactions += 1;
        }
        let v = e.get("v").and_then(|v| v.as_i64()).expect("a version");
        let previous = versions.insert(e.id().as_i64().unwrap(), v).unwrap_or(0);
        assert_eq!(v, previous + 1, "row {:?} out of order", e.id());
    }
    assert!(current.is_none(), "the stream ends inside a transaction");
    (transactions, versions.values().sum())
}

/// The integer keys of `events`, in order.
pub fn ids(events: &[ChangeEvent]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.id().as_i64().expect("an integer key"))
        .collect()
}

/// Events collected by a closure subscriber.
pub struct Events {
    pub id: SubscriptionId,
    rx: mpsc::UnboundedReceiver<ChangeEvent>,
}

impl Events {
    /// Subscribes and collects.
    pub async fn subscribe(notifier: &Notifier, subscription: Subscription) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = notifier
            .subscribe_fn(subscription, move |e| {
                let _ = tx.send(e);
            })
            .await
            .expect("subscribe");
        Events { id, rx }
    }

    /// The next event; panics if none arrives within [`ARRIVES_WITHIN`].
    pub async fn next(&mut self) -> ChangeEvent {
        tokio::time::timeout(ARRIVES_WITHIN, self.rx.recv())
            .await
            .expect("an event should have arrived")
            .expect("subscription closed")
    }

    /// The next event, waiting up to `limit` (for events that come late by design).
    pub async fn next_within(&mut self, limit: Duration) -> ChangeEvent {
        tokio::time::timeout(limit, self.rx.recv())
            .await
            .expect("an event should have arrived")
            .expect("subscription closed")
    }

    /// The next `n` events.
    pub async fn take(&mut self, n: usize) -> Vec<ChangeEvent> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }

    /// Asserts nothing is queued right now (use after a sentinel event proved ordering).
    pub fn assert_empty(&mut self) {
        if let Ok(e) = self.rx.try_recv() {
            panic!("unexpected event: {:?} {:?}", e.channel(), e.to_json());
        }
    }

    /// Asserts no event arrives within `wait` (bounded negative check, for cases without a
    /// sentinel on the same channel).
    pub async fn assert_none_within(&mut self, wait: Duration) {
        if let Ok(Some(e)) = tokio::time::timeout(wait, self.rx.recv()).await {
            panic!("unexpected event: {:?} {:?}", e.channel(), e.to_json());
        }
    }
}

/// The status messages of `notifier`, through a channel.
pub async fn statuses(notifier: &Notifier) -> mpsc::UnboundedReceiver<sqlnotify::Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    notifier
        .subscribe_status_fn(move |e: sqlnotify::StatusEvent| {
            let _ = tx.send(e.status);
        })
        .await
        .unwrap();
    rx
}

/// Starts `builder` (installing its watches) and stops it at once.
pub async fn start_and_stop(builder: sqlnotify::NotifierBuilder) {
    builder.start().await.unwrap().stop().await.unwrap();
}

/// Ends the lease connection of the group member whose connections carry
/// `application_name` (on `db`), again each time it takes the lease back, until it reports
/// `Status::LostLease` on `statuses` — another member took the lease. Panics after `within`.
pub async fn end_lease_until_lost(
    db: &TestDb,
    application_name: &str,
    statuses: &mut mpsc::UnboundedReceiver<sqlnotify::Status>,
    within: Duration,
) {
    let holds = format!(
        "SELECT coalesce(max(l.pid), 0)::bigint FROM pg_catalog.pg_locks l \
         JOIN pg_catalog.pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND l.granted \
           AND a.datname = pg_catalog.current_database() \
           AND a.application_name = '{application_name}'"
    );
    let deadline = tokio::time::Instant::now() + within;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{application_name} never lost its lease"
        );
        let holder = db.count(&holds).await;
        if holder != 0 {
            db.exec(&format!("SELECT pg_terminate_backend({holder})"))
                .await;
        }
        while let Ok(Some(status)) =
            tokio::time::timeout(Duration::from_secs(2), statuses.recv()).await
        {
            if status == sqlnotify::Status::LostLease {
                return;
            }
        }
    }
}

/// The next status message; panics if none arrives within [`ARRIVES_WITHIN`].
pub async fn next_status(rx: &mut mpsc::UnboundedReceiver<sqlnotify::Status>) -> sqlnotify::Status {
    next_status_within(rx, ARRIVES_WITHIN).await
}

/// The next status message; panics if none arrives within `within`.
pub async fn next_status_within(
    rx: &mut mpsc::UnboundedReceiver<sqlnotify::Status>,
    within: Duration,
) -> sqlnotify::Status {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("a status should have arrived")
        .expect("the status subscription is alive")
}

/// Asserts that `outcome` is a lock timeout on `object` held by the sessions `pids` (none:
/// the database does not say), given up after `timeout` (and not much later), with a message
/// that names the object and the holder.
pub fn assert_lock_timeout<T>(
    outcome: sqlnotify::Result<T>,
    object: &str,
    pids: &[u64],
    timeout: Duration,
) {
    let Err(err) = outcome else {
        panic!("expected a lock timeout on {object}, but it succeeded");
    };
    let text = err.to_string();
    match err {
        sqlnotify::Error::LockTimeout {
            object: got,
            holder_pids,
            waited,
        } => {
            assert_eq!(
                (got.as_str(), holder_pids.as_slice()),
                (object, pids),
                "{text}"
            );
            assert!(
                waited >= timeout && waited < timeout + Duration::from_secs(5),
                "{waited:?}"
            );
            assert!(text.contains(object), "{text}");
            match pids {
                [] => assert!(
                    text.contains("a session the database does not name"),
                    "{text}"
                ),
                [pid] => assert!(text.contains(&format!("held by pid {pid};")), "{text}"),
                _ => {}
            }
        }
        other => panic!("expected a lock timeout on {object}, got {other:?}"),
    }
}

/// A slow subscriber for `deliveries`: about a millisecond of work per event, each one
/// acknowledged. Returns how many it handled so far, and its task (abort it when done).
#[allow(dead_code)] // not every test file catches up behind a slow subscriber
pub fn slow_acker(
    mut deliveries: sqlnotify::Deliveries,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = actix_rt::spawn({
        let handled = handled.clone();
        async move {
            while let Some(delivery) = deliveries.recv().await {
                tokio::time::sleep(Duration::from_millis(1)).await;
                delivery.ack.ack();
                handled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    (handled, worker)
}

/// Waits until `check` returns true, polling every 20 ms, up to `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until_every(limit, Duration::from_millis(20), check).await
}

/// Waits until `check` returns true, polling every `every`, up to `limit`: for a view that
/// polling faster would keep stale (InnoDB refreshes `INNODB_TRX` and `INNODB_LOCK_WAITS` only
/// when nobody has read them for 100 ms).
pub async fn wait_until_every<F, Fut>(limit: Duration, every: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// A PostgreSQL cluster of the test's own (for faults that must not touch the shared server,
/// such as a restart), built from the local binaries. `None` when there are none.
pub struct Cluster {
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    as_postgres: bool,
    /// The server's `listen_addresses`.
    listen: String,
    /// More server settings, as `-c name=value …`.
    settings: String,
}

impl Cluster {
    pub fn start() -> Option<Cluster> {
        Cluster::start_listening(None, "")
    }

    /// A cluster started with more server settings (`-c wal_level=logical …`).
    pub fn start_with(settings: &str) -> Option<Cluster> {
        Cluster::start_listening(None, settings)
    }

    /// A cluster that also listens on `address` (which must exist on this machine) and trusts
    /// the clients of `network` (CIDR), as it trusts local ones: for clients in a network
    /// namespace of the test's own.
    pub fn start_also_on(address: &str, network: &str) -> Option<Cluster> {
        Cluster::start_listening(Some((address, network)), "")
    }

    /// A cluster with more server settings whose next transaction id is the full (`xid8`)
    /// `next_xid` — a later epoch, and as near the 32-bit wrap as wanted: the existing rows
    /// are frozen first, then `pg_resetwal -e -x` sets the id and a zeroed commit-log segment
    /// covers it.
    pub fn start_at_xid(settings: &str, next_xid: u64) -> Option<Cluster> {
        let cluster = Cluster::start_listening(None, settings)?;
        let (epoch, xid) = ((next_xid >> 32).to_string(), (next_xid as u32).max(3));
        cluster.run(
            "vacuumdb",
            &[
                "-h",
                cluster.dir.to_str()?,
                "-p",
                &cluster.port.to_string(),
                "-U",
                "postgres",
                "--all",
                "--freeze",
                "-q",
            ],
        )?;
        cluster.pg_ctl("stop")?;
        let data = cluster.dir.join("data");
        cluster.run(
            "pg_resetwal",
            &["-e", &epoch, "-x", &xid.to_string(), "-D", data.to_str()?],
        )?;
        // One segment of the commit log covers 2^20 transactions: make it whole (zeroed).
        let segment = data.join(format!("pg_xact/{:04X}", xid >> 20));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&segment)
            .ok()?;
        if file.metadata().ok()?.len() < 256 * 1024 {
            file.set_len(256 * 1024).ok()?;
        }
        if cluster.as_postgres {
            std::process::Command::new("chown")
                .args(["postgres", segment.to_str()?])
                .status()
                .ok()?;
        }
        cluster.pg_ctl("start")?;
        Some(cluster)
    }

    /// A cluster with more server settings that speaks TLS with `cert` and `key` (PEM) and
    /// refuses unencrypted TCP connections, replication ones too (`hostnossl … reject`); its
    /// unix socket still trusts local clients.
    pub fn start_tls(cert: &str, key: &str, settings: &str) -> Option<Cluster> {
        Cluster::start_tls_with(cert, key, None, "", settings)
    }

    /// [`Cluster::start_tls`] that also trusts the CA certificate `ca` (PEM, `ssl_ca_file`:
    /// clients' certificates are checked against it) and puts the pg_hba.conf lines
    /// `hba_first` before every other.
    pub fn start_tls_with(
        cert: &str,
        key: &str,
        ca: Option<&str>,
        hba_first: &str,
        settings: &str,
    ) -> Option<Cluster> {
        let settings = match ca {
            Some(_) => format!("-c ssl=on -c ssl_ca_file=client-ca.crt {settings}"),
            None => format!("-c ssl=on {settings}"),
        };
        Cluster::start_prepared(None, &settings, |cluster, data| {
            use std::io::Write;
            let files = [("server.crt", cert), ("server.key", key)]
                .into_iter()
                .chain(ca.map(|ca| ("client-ca.crt", ca)));
            for (name, pem) in files {
                let path = data.join(name);
                std::fs::write(&path, pem).ok()?;
                std::process::Command::new("chmod")
                    .args(["600", path.to_str()?])
                    .status()
                    .ok()?;
                if cluster.as_postgres {
                    std::process::Command::new("chown")
                        .args(["postgres", path.to_str()?])
                        .status()
                        .ok()?;
                }
            }
            // The first matching line wins: unencrypted TCP is refused before any trust line.
            let hba = data.join("pg_hba.conf");
            let rest = std::fs::read_to_string(&hba).ok()?;
            std::fs::File::create(&hba)
                .ok()?
                .write_all(
                    format!(
                        "hostnossl all all all reject\nhostnossl replication all all reject\n\
                         {hba_first}{rest}"
                    )
                    .as_bytes(),
                )
                .ok()
        })
    }

    fn start_listening(also: Option<(&str, &str)>, settings: &str) -> Option<Cluster> {
        Cluster::start_prepared(also, settings, |_, _| Some(()))
    }

    /// Creates a cluster, lets `prepare` change its data directory, then starts it.
    fn start_prepared(
        also: Option<(&str, &str)>,
        settings: &str,
        prepare: impl FnOnce(&Cluster, &std::path::Path) -> Option<()>,
    ) -> Option<Cluster> {
        let cluster = Cluster::unstarted(also, settings)?;
        let data = cluster.dir.join("data");
        cluster.run(
            "initdb",
            &["-D", data.to_str()?, "-U", "postgres", "--auth=trust"],
        )?;
        if let Some((_, network)) = also {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .ok()?
                .write_all(format!("host all all {network} trust\n").as_bytes())
                .ok()?;
        }
        prepare(&cluster, &data)?;
        cluster.pg_ctl("start")?;
        Some(cluster)
    }

    /// A hot standby of `primary` (a base backup streaming from it), started and in recovery.
    pub fn standby_of(primary: &Cluster) -> Option<Cluster> {
        let standby = Cluster::unstarted(None, "")?;
        let data = standby.dir.join("data");
        standby.run(
            "pg_basebackup",
            &[
                "-D",
                data.to_str()?,
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
            ],
        )?;
        standby.pg_ctl("start")?;
        Some(standby)
    }

    /// A cluster's directory and spare port, with no data directory yet.
    fn unstarted(also: Option<(&str, &str)>, settings: &str) -> Option<Cluster> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
            l.local_addr().ok()?.port()
        };
        let dir =
            std::env::temp_dir().join(format!("sqlnotify-cluster-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let as_postgres = running_as_root();
        let listen = match also {
            Some((address, _)) => format!("127.0.0.1,{address}"),
            None => "127.0.0.1".to_string(),
        };
        let cluster = Cluster {
            port,
            dir,
            bin,
            as_postgres,
            listen,
            settings: settings.to_string(),
        };
        if as_postgres {
            std::process::Command::new("chown")
                .args(["postgres", cluster.dir.to_str()?])
                .status()
                .ok()?;
        }
        Some(cluster)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Option<()> {
        let program = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            std::process::Command::new(&program)
        };
        let out = cmd.args(args).output().ok()?;
        if !out.status.success() {
            eprintln!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(())
    }

    fn pg_ctl(&self, action: &str) -> Option<()> {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses={} {}",
            self.port,
            self.dir.display(),
            self.listen,
            self.settings
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str()?,
                "-l",
                log.to_str()?,
                "-w",
                "-m",
                "fast",
                "-o",
                &opts,
                action,
            ],
        )
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's unix socket: (directory, port).
    pub fn socket(&self) -> (String, u16) {
        (self.dir.display().to_string(), self.port)
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&self) {
        self.pg_ctl("stop").expect("pg_ctl stop");
    }

    pub fn start_again(&self) {
        self.pg_ctl("start").expect("pg_ctl start");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// An actor that forwards every event into a channel (for builder-level subscriptions).
pub struct Forward(pub mpsc::UnboundedSender<ChangeEvent>);

impl actix::Actor for Forward {
    type Context = actix::Context<Self>;
}

impl actix::Handler<ChangeEvent> for Forward {
    type Result = ();
    fn handle(&mut self, event: ChangeEvent, _: &mut actix::Context<Self>) {
        let _ = self.0.send(event);
    }
}

impl Forward {
    pub fn start_actor(self) -> actix::Addr<Forward> {
        actix::Actor::start(self)
    }
}

/// A PgBouncer of the test's own in front of the test server, in transaction pooling mode
/// with a small pool. `None` when pgbouncer is not installed.
pub struct Bouncer {
    pub port: u16,
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl Bouncer {
    pub fn start() -> Option<Bouncer> {
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let server = server_url();
        let host_port = server
            .split_once("://")?
            .1
            .split_once('@')?
            .1
            .split_once('/')?
            .0;
        let (host, server_port) = host_port.rsplit_once(':').unwrap_or((host_port, "5432"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir =
            std::env::temp_dir().join(format!("sqlnotify-bouncer-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host={host} port={server_port} user=postgres\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = any\n\
                 pool_mode = transaction\ndefault_pool_size = 3\nunix_socket_dir =\n\
                 ignore_startup_parameters = extra_float_digits,options,application_name\n"
            ),
        )
        .ok()?;
        let mut cmd = std::process::Command::new(binary);
        if running_as_root() {
            // pgbouncer refuses to run as root; it switches user itself with -u.
            std::process::Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .ok()?;
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(&ini)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let bouncer = Bouncer { port, dir, child };
        // Bounded wait until it accepts connections.
        for _ in 0..250 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(bouncer);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A subscriber on its own arbiter that blocks on its first event until released, then
/// forwards everything it gets.
pub struct Gated {
    gate: Option<std::sync::mpsc::Receiver<()>>,
    out: mpsc::UnboundedSender<ChangeEvent>,
}

impl actix::Actor for Gated {
    type Context = actix::Context<Self>;
}

impl actix::Handler<ChangeEvent> for Gated {
    type Result = ();
    fn handle(&mut self, event: ChangeEvent, _: &mut actix::Context<Self>) {
        if let Some(gate) = self.gate.take() {
            let _ = gate.recv();
        }
        let _ = self.out.send(event);
    }
}

/// Starts a gated subscriber on a thread of its own; returns (recipient, release, events).
pub fn gated() -> (
    actix::Recipient<ChangeEvent>,
    std::sync::mpsc::Sender<()>,
    mpsc::UnboundedReceiver<ChangeEvent>,
    actix::Arbiter,
) {
    let (release, gate) = std::sync::mpsc::channel();
    let (out, events) = mpsc::unbounded_channel();
    let arbiter = actix::Arbiter::new();
    let gate = std::sync::Mutex::new(Some(gate));
    let addr = <Gated as actix::Actor>::start_in_arbiter(&arbiter.handle(), move |_| Gated {
        gate: gate.lock().unwrap().take(),
        out,
    });
    (addr.recipient(), release, events, arbiter)
}

/// Subscribes a [`gated`] subscriber to `subscription` on `notifier`; returns (release,
/// events, arbiter).
pub async fn subscribe_gated(
    notifier: &sqlnotify::Notifier,
    subscription: sqlnotify::Subscription,
) -> (
    std::sync::mpsc::Sender<()>,
    mpsc::UnboundedReceiver<ChangeEvent>,
    actix::Arbiter,
) {
    let (slow, release, events, arbiter) = gated();
    notifier.subscribe(subscription, slow).await.unwrap();
    (release, events, arbiter)
}

/// The pid of the notifier's listener backend in `db` (its connection LISTENs or reads the
/// journal), if one is connected.
pub async fn listener_pid(db: &TestDb) -> Option<i32> {
    db.client()
        .await
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' \
             AND (query LIKE 'LISTEN %' OR query LIKE '%pg_snapshot_xip($1%') AND pid <> pg_backend_pid() LIMIT 1",
            &[&db.name],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// How long [`kill_listener`] waits for each new listener backend to kill.
pub const LISTENER_BACK_WITHIN: Duration = Duration::from_secs(30);

/// Terminates the listener's backend `kills` times (`pg_terminate_backend`), each time a new
/// one: a backend already signalled may still be listed, and does not count again. Panics
/// when no new listener backend shows up within [`LISTENER_BACK_WITHIN`] of the last kill.
pub async fn kill_listener(db: &TestDb, kills: usize) {
    let (mut done, mut last) = (0, None);
    let mut deadline = tokio::time::Instant::now() + LISTENER_BACK_WITHIN;
    while done < kills {
        assert!(
            tokio::time::Instant::now() < deadline,
            "kill {} of {kills}: no new listener backend within {LISTENER_BACK_WITHIN:?}",
            done + 1
        );
        if let Some(pid) = listener_pid(db).await.filter(|pid| Some(*pid) != last) {
            let sql = format!("SELECT pg_terminate_backend({pid})::int::bigint");
            if db.count(&sql).await == 1 {
                done += 1;
                last = Some(pid);
                deadline = tokio::time::Instant::now() + LISTENER_BACK_WITHIN;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // pacing, not synchronisation
    }
}

/// Runs `writes` (which commit rows into table `t` and return the ids committed) while the
/// listener is killed `kills` times, then asserts what a journal tier promises: every
/// committed id arrives exactly once, no rolled-back one does, nothing else is on its way
/// (a sentinel row -1 arrives next), no `Gap` was reported, there were at least `kills`
/// restarts, and Resynced was announced between once and once per restart (a kill that lands
/// during a reconnection's catch-up read ends it before it can announce).
pub async fn assert_every_row_once_through_kills<W>(
    db: &TestDb,
    notifier: &Notifier,
    kills: usize,
    writes: W,
    label: &str,
) where
    W: std::future::Future,
    W::Output: IntoIterator<Item = i64>,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    notifier
        .subscribe_fn(
            Subscription::new("t", sqlnotify::Operation::Insert),
            move |e| {
                let _ = tx.send(e.id().as_i64().unwrap());
            },
        )
        .await
        .unwrap();
    let mut statuses = statuses(notifier).await;
    let (committed, ()) = tokio::join!(writes, kill_listener(db, kills));
    let committed: std::collections::HashSet<i64> = committed.into_iter().collect();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < committed.len() {
        let id = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{label}: {} of {} rows arrived",
                    seen.len(),
                    committed.len()
                )
            })
            .unwrap();
        assert!(
            committed.contains(&id),
            "{label}: rolled-back row {id} arrived"
        );
        assert!(seen.insert(id), "{label}: row {id} arrived twice");
    }
    db.exec("INSERT INTO t VALUES (-1)").await;
    assert_eq!(
        tokio::time::timeout(ARRIVES_WITHIN, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{label}: the sentinel row did not arrive")),
        Some(-1),
        "{label}: nothing else was on its way"
    );
    let mut resynced = 0u64;
    while let Ok(status) = statuses.try_recv() {
        assert!(
            !matches!(status, sqlnotify::Status::Gap { .. }),
            "{label}: journal tiers lose nothing: {status:?}"
        );
        resynced += matches!(status, sqlnotify::Status::Resynced { .. }) as u64;
    }
    let restarts = notifier.stats().await.unwrap().restarts;
    assert!(restarts >= kills as u64, "{label}: {restarts} restarts");
    assert!(
        resynced >= 1 && resynced <= restarts,
        "{label}: {resynced} resyncs for {restarts} restarts"
    );
}

/// A TCP proxy in front of the test server that records what its clients send: the SQL a
/// notifier really puts on the wire (`pg_stat_activity` only shows each session's last
/// statement).
pub struct WireTap {
    pub port: u16,
    /// Per connection, the bytes the client sent.
    sent: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WireTap {
    pub async fn start() -> WireTap {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let config: tokio_postgres::Config = server_url().parse().expect("the test server URL");
        let server = match (config.get_hosts().first(), config.get_ports().first()) {
            (Some(tokio_postgres::config::Host::Tcp(host)), port) => {
                format!("{host}:{}", port.copied().unwrap_or(5432))
            }
            other => panic!("WireTap needs a TCP test server, not {other:?}"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(&server).await else {
                    continue;
                };
                let index = {
                    let mut sent = record.lock().unwrap();
                    sent.push(Vec::new());
                    sent.len() - 1
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = upstream.into_split();
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match from_client.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        record.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = to_server.shutdown().await;
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                    let _ = to_client.shutdown().await;
                });
            }
        });
        WireTap { port, sent, task }
    }

    /// A URL of database `dbname` through the tap, as the test server's user; unencrypted
    /// (`sslmode=disable`), or the tap could not read it.
    pub fn url(&self, dbname: &str) -> String {
        let config: tokio_postgres::Config = server_url().parse().unwrap();
        let user = config.get_user().unwrap_or("postgres");
        let password = config
            .get_password()
            .map(|p| format!(":{}", String::from_utf8_lossy(p)))
            .unwrap_or_default();
        format!(
            "postgres://{user}{password}@127.0.0.1:{}/{dbname}?sslmode=disable",
            self.port
        )
    }

    /// How many connections went through the tap.
    pub fn connections(&self) -> usize {
        self.sent.lock().unwrap().len()
    }

    /// Every SQL text clients sent so far (simple queries and prepared statements), in order
    /// per connection.
    pub fn statements(&self) -> Vec<String> {
        let sent = self.sent.lock().unwrap();
        sent.iter().flat_map(|bytes| frontend_sql(bytes)).collect()
    }
}

impl Drop for WireTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The SQL in a client's side of a PostgreSQL connection: the text of every Query ('Q') and
/// Parse ('P') message after the startup packets.
fn frontend_sql(bytes: &[u8]) -> Vec<String> {
    let int = |at: usize| -> Option<usize> {
        Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let cstr = |from: usize, to: usize| -> Option<(String, usize)> {
        let end = from + bytes.get(from..to)?.iter().position(|b| *b == 0)?;
        Some((
            String::from_utf8_lossy(&bytes[from..end]).into_owned(),
            end + 1,
        ))
    };
    let mut at = 0;
    // Startup phase: untyped packets; an SSL or GSS encryption request is followed by another.
    while let (Some(len), Some(code)) = (int(at), int(at + 4)) {
        at += len;
        if code != 80877103 && code != 80877104 {
            break;
        }
    }
    let mut sql = Vec::new();
    while let (Some(&kind), Some(len)) = (bytes.get(at), int(at + 1)) {
        let (body, end) = (at + 5, at + 1 + len);
        match kind {
            b'Q' => sql.extend(cstr(body, end).map(|(q, _)| q)),
            b'P' => sql.extend(
                cstr(body, end)
                    .and_then(|(_, next)| cstr(next, end))
                    .map(|(q, _)| q),
            ),
            _ => {}
        }
        at = end;
    }
    sql
}

/// Whether `sql` holds a LISTEN statement.
pub fn is_listen(sql: &str) -> bool {
    sql.split(';').any(|statement| {
        let statement = statement.trim_start().to_ascii_lowercase();
        statement
            .strip_prefix("listen")
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_whitespace() || c == '"'))
    })
}
