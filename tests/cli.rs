//! The `sqlnotify` binary (feature `cli`), run as a user would: `tail` printing JSON lines on
//! SQLite and PostgreSQL and stopping cleanly on SIGINT (with and without cleanup), stdout
//! closed under it, `install-sql`, `cleanup`, `consumers`, `dead-letters`, `relay` into NATS (feature `nats`:
//! active, standby, taking over, stopping on SIGTERM), `--help`, and one-line errors on bad
//! input.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::sqlite_file::SqliteFile as TempDb;
use common::{TestDb, ARRIVES_WITHIN};
use serde_json::{json, Value};

fn sqlnotify() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sqlnotify"));
    cmd.stdin(Stdio::null());
    cmd
}

/// A running `sqlnotify` command (`tail`, `relay`), its stdout and stderr read line by line on
/// threads of their own. Killed on drop if still running.
struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// Every stderr line read so far.
    errors: Vec<String>,
}

fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Running {
    /// Starts `sqlnotify ARGS` (the command first).
    fn spawn(args: &[&str]) -> Running {
        let mut child = sqlnotify()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run sqlnotify");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
            errors: Vec::new(),
        }
    }

    /// Starts `sqlnotify tail ARGS` and waits until it is listening (having said, on stderr,
    /// first that it installs the triggers, then what it listens on).
    fn tail(args: &[&str]) -> Running {
        let mut tail = Running::spawn(&[&["tail"], args].concat());
        tail.wait_for_stderr("installing triggers for");
        let listening = tail.wait_for_stderr("tailing");
        assert!(
            listening.contains("listening on sqlnotify_") && listening.contains("waiting for"),
            "{listening}"
        );
        tail
    }

    /// Waits (bounded) for a stderr line containing `text`.
    fn wait_for_stderr(&mut self, text: &str) -> String {
        let deadline = Instant::now() + ARRIVES_WITHIN;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.errors.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no stderr line containing {text:?} within {ARRIVES_WITHIN:?}; got {:?}",
                    self.errors
                ),
            }
        }
    }

    /// A stderr line containing `text`: one already read, else the next such (bounded).
    #[cfg(feature = "nats")]
    fn seen_or_wait(&mut self, text: &str) -> String {
        match self.errors.iter().find(|l| l.contains(text)) {
            Some(line) => line.clone(),
            None => self.wait_for_stderr(text),
        }
    }

    /// The next JSON line on stdout, within [`ARRIVES_WITHIN`].
    fn next_event(&mut self) -> Value {
        let line = self
            .stdout
            .recv_timeout(ARRIVES_WITHIN)
            .unwrap_or_else(|_| panic!("no event line; stderr so far: {:?}", self.errors));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
    }

    /// Sends SIGINT (what Ctrl-C sends) and waits (bounded) for the process to exit.
    fn interrupt(&mut self) -> ExitStatus {
        self.signal("INT")
    }

    /// Sends signal `name` (INT, TERM) and waits (bounded) for the process to exit.
    fn signal(&mut self, name: &str) -> ExitStatus {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + ARRIVES_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Collect what stderr still had to say.
                while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(1)) {
                    self.errors.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sqlnotify did not exit within {ARRIVES_WITHIN:?}; stderr: {:?}",
                self.errors
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `sqlnotify ARGS` to completion: (status, stdout, stderr).
fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let out = sqlnotify().args(args).output().expect("run sqlnotify");
    (
        out.status,
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn tail_prints_json_lines_and_cleans_up_on_ctrl_c() {
    let db = TempDb::new("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, name TEXT)");
    let url = db.url();
    let mut tail = Running::tail(&[
        &url,
        "--table",
        "users",
        "--op",
        "insert,update",
        "--columns",
        "email,name",
        "--cleanup-on-exit",
    ]);
    assert_eq!(db.triggers(), 2);

    db.exec("INSERT INTO users VALUES (1, 'ann@example.com', 'Ann')");
    let e = tail.next_event();
    // tail's own channel: never an application's sqlnotify_main_users_insert.
    let channel = e["channel"].as_str().unwrap_or_default();
    assert!(channel.starts_with("sqlnotify_tail_users_insert_"), "{e}");
    assert_eq!(
        e,
        json!({
            "channel": channel,
            "schema": "main",
            "table": "users",
            "operation": "insert",
            "id": 1,
            "columns": {"email": "ann@example.com", "name": "Ann"},
            "sequence": e["sequence"],
            "truncated": false,
        })
    );
    let first_sequence = e["sequence"]
        .as_i64()
        .expect("SQLite events carry a sequence");

    // DELETE is not watched: the sentinel update after it is the next line.
    db.exec("DELETE FROM users WHERE id = 1; INSERT INTO users VALUES (2, 'b', 'Bob')");
    db.exec("UPDATE users SET name = 'Robert' WHERE id = 2");
    let e = tail.next_event();
    assert_eq!(
        (e["operation"].as_str(), e["id"].as_i64()),
        (Some("insert"), Some(2))
    );
    let e = tail.next_event();
    assert_eq!(e["operation"], "update");
    assert_eq!(e["columns"]["name"], "Robert");
    assert!(e["sequence"].as_i64().unwrap() > first_sequence);

    let status = tail.interrupt();
    assert!(status.success(), "{status:?}; stderr: {:?}", tail.errors);
    assert!(
        tail.errors.iter().any(|l| l
            == "sqlnotify: interrupted; stopping and removing the triggers this command \
                    installed …"),
        "{:?}",
        tail.errors
    );
    assert_eq!(db.triggers(), 0, "--cleanup-on-exit removed the triggers");
}

/// `tail --snapshot`: every current row first ("snapshot": true, in key order), then the
/// changes after them; progress on stderr (not a terminal here: plain lines, the last saying
/// it is done).
#[test]
fn tail_with_a_snapshot_prints_the_rows_then_the_changes() {
    let db = TempDb::new(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 250)
         INSERT INTO t SELECT i, 'row ' || i FROM n",
    );
    let url = db.url();
    let mut tail = Running::tail(&[&url, "--table", "t", "--columns", "v", "--snapshot"]);
    for id in 1..=250 {
        let e = tail.next_event();
        assert_eq!(
            (e["id"].as_i64(), &e["snapshot"]),
            (Some(id), &json!(true)),
            "{e}"
        );
        assert_eq!(e["columns"]["v"], json!(format!("row {id}")));
    }
    let done = tail.wait_for_stderr("done; now the changes");
    assert!(done.contains("250 / 250 rows (100%), done"), "{done}");
    db.exec("UPDATE t SET v = 'changed' WHERE id = 7; DELETE FROM t WHERE id = 8");
    let e = tail.next_event();
    assert_eq!(
        (e["operation"].as_str(), e["id"].as_i64()),
        (Some("update"), Some(7))
    );
    assert!(e.get("snapshot").is_none(), "{e}");
    let e = tail.next_event();
    assert_eq!(
        (e["operation"].as_str(), e["id"].as_i64()),
        (Some("delete"), Some(8))
    );
    assert!(tail.interrupt().success());
}

/// `tail --snapshot` whose snapshot fails — its connection terminated in the middle of the
/// read, while stdout is not read (the pipe full, the read waits with its cursor open): the
/// rows read so far, then exit status 1 and, last, one `sqlnotify: error:` line naming the
/// snapshot. It used to print a line of its own, say "stdout closed" and exit 0.
#[test]
fn tail_exits_with_an_error_when_its_snapshot_fails() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::new());
    rt.block_on(db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, repeat('x', 100) FROM generate_series(1, 50000) i",
    ));
    let mut child = sqlnotify()
        .args([
            "tail",
            &db.url,
            "--table",
            "t",
            "--columns",
            "v",
            "--snapshot",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // not read until the snapshot's connection is gone
    let stdout = child.stdout.take().unwrap();
    let mut tail = Running {
        stdout: mpsc::channel().1,
        stderr: lines(child.stderr.take().unwrap()),
        child,
        errors: Vec::new(),
    };
    let snapshot = "FROM pg_catalog.pg_stat_activity \
                    WHERE datname = pg_catalog.current_database() \
                      AND state = 'idle in transaction' AND query LIKE '%\\_sqn\\_snapshot%'";
    let waiting = rt.block_on(common::wait_until(ARRIVES_WITHIN, || async {
        db.count(&format!("SELECT pg_catalog.count(*) {snapshot}"))
            .await
            == 1
    }));
    assert!(waiting, "the snapshot's cursor never waited");
    rt.block_on(db.exec(&format!(
        "SELECT pg_catalog.pg_terminate_backend(pid) {snapshot}"
    )));
    tail.stdout = lines(stdout);
    let status = tail.wait_exit();
    let mut rows = 0;
    while let Ok(line) = tail.stdout.try_recv() {
        let e: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(e["snapshot"], json!(true), "{e}");
        rows += 1;
    }
    assert!(rows < 50_000, "{rows} rows");
    assert_eq!(status.code(), Some(1), "stderr: {:?}", tail.errors);
    let last = tail.errors.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("sqlnotify: error: the snapshot of t failed: "),
        "{:?}",
        tail.errors
    );
    assert!(
        !tail.errors.iter().any(|l| l.contains("stdout closed")),
        "{:?}",
        tail.errors
    );
}

#[test]
fn tail_keeps_triggers_without_cleanup_and_prints_composite_keys_and_labels() {
    let db = TempDb::new(
        "CREATE TABLE order_items (order_id INTEGER, item_id INTEGER, qty INTEGER, \
         PRIMARY KEY (order_id, item_id))",
    );
    let url = db.url();
    let args = [
        url.as_str(),
        "-t",
        "order_items",
        "-o",
        "update",
        "-c",
        "qty",
        "--label",
        "qty_changes",
    ];
    let mut tail = Running::tail(&args);
    db.exec("INSERT INTO order_items VALUES (100, 7, 1); UPDATE order_items SET qty = 2");
    let e = tail.next_event();
    assert_eq!(e["channel"], "sqlnotify_qty_changes");
    assert_eq!(e["id"], json!([100, 7]));
    assert_eq!(e["columns"], json!({"qty": 2}));
    let status = tail.interrupt();
    assert!(status.success(), "{status:?}; stderr: {:?}", tail.errors);
    assert_eq!(db.triggers(), 1, "triggers stay without --cleanup-on-exit");
    let installed = db.trigger_definitions();

    // The same --label and options with --cleanup-on-exit: it finds the trigger installed,
    // so the trigger is not this run's to remove.
    let mut again = Running::tail(&[&args[..], &["--cleanup-on-exit"]].concat());
    db.exec("UPDATE order_items SET qty = 3");
    assert_eq!(again.next_event()["columns"], json!({"qty": 3}));
    let status = again.interrupt();
    assert!(status.success(), "{status:?}; stderr: {:?}", again.errors);
    assert!(
        again.errors.iter().any(|l| l
            == "sqlnotify: interrupted; stopping (this command installed no trigger: it found \
                them all installed, so they stay) …"),
        "{:?}",
        again.errors
    );
    assert_eq!(
        db.trigger_definitions(),
        installed,
        "the trigger stays as it was"
    );

    // Other options on that --label: refused, and the installed trigger is not replaced.
    let (status, _, err) = run(&[
        "tail",
        &url,
        "-t",
        "order_items",
        "-o",
        "update",
        "--label",
        "qty_changes",
        "--cleanup-on-exit",
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("sqlnotify_qty_changes") && err.contains("tail never replaces"),
        "{err}"
    );
    assert_eq!(
        db.trigger_definitions(),
        installed,
        "the trigger stays as it was"
    );
}

#[test]
fn tail_stops_when_stdout_is_closed() {
    let db = TempDb::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let url = db.url();
    let mut child = sqlnotify()
        .args(["tail", &url, "--table", "t", "--op", "insert"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end of stdout right away (as `| head -0` would).
    drop(child.stdout.take());
    let mut tail = Running {
        stdout: mpsc::channel().1,
        stderr: lines(child.stderr.take().unwrap()),
        child,
        errors: Vec::new(),
    };
    tail.wait_for_stderr("tailing");
    db.exec("INSERT INTO t VALUES (1)");
    let status = tail.wait_exit();
    assert!(status.success(), "{status:?}; stderr: {:?}", tail.errors);
    assert!(
        tail.errors.iter().any(|l| l.contains("stdout closed")),
        "{:?}",
        tail.errors
    );
}

#[test]
fn tail_on_postgres_with_the_durable_tier() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::new());
    rt.block_on(db.exec(
        "CREATE TABLE users (id bigint PRIMARY KEY, email text); \
         CREATE TABLE orders (id bigint PRIMARY KEY)",
    ));
    let mut tail = Running::tail(&[
        &db.url,
        "--table",
        "users,public.orders",
        "--op",
        "insert",
        "--op",
        "delete",
        "--columns",
        "id",
        "--tier",
        "durable",
        "--cleanup-on-exit",
    ]);
    let installed =
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'sqlnotify%' AND NOT tgisinternal";
    assert_eq!(rt.block_on(db.count(installed)), 4);
    rt.block_on(db.exec(
        "INSERT INTO users VALUES (1, 'a'); INSERT INTO orders VALUES (9); DELETE FROM users",
    ));
    let events: Vec<Value> = (0..3).map(|_| tail.next_event()).collect();
    let summary: Vec<(String, String, i64)> = events
        .iter()
        .map(|e| {
            (
                e["table"].as_str().unwrap().to_string(),
                e["operation"].as_str().unwrap().to_string(),
                e["id"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("users".into(), "insert".into(), 1),
            ("orders".into(), "insert".into(), 9),
            ("users".into(), "delete".into(), 1),
        ]
    );
    assert_eq!(events[0]["schema"], "public");
    let status = tail.interrupt();
    assert!(status.success(), "{status:?}; stderr: {:?}", tail.errors);
    assert_eq!(rt.block_on(db.count(installed)), 0);
}

/// `tail` next to an application that watches the same table and operation — durably, with
/// another column, as a named consumer — goes through a channel of its own: the application's
/// trigger is not replaced by tail's notify-tier one (which wrote no journal row: the
/// application lost every row of the period, with no Gap), and `--cleanup-on-exit` removes only
/// tail's own trigger (it used to drop the application's). The application gets every row,
/// during the tail and after it.
#[test]
fn tail_never_changes_or_removes_an_applications_trigger() {
    use sqlnotify::{Notifier, Operation, Subscription, Tier, Watch};

    actix::System::new().block_on(async {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE orders (id bigint PRIMARY KEY, total int, note text)")
            .await;
        let app = Notifier::builder(&db.url)
            .watch(
                Watch::new("orders", Operation::Insert)
                    .tier(Tier::Durable)
                    .extra_columns(["total"]),
            )
            .consumer("billing")
            .start()
            .await
            .unwrap();
        let mut received =
            common::Events::subscribe(&app, Subscription::new("orders", Operation::Insert)).await;
        // The application's triggers on orders and their functions, and its catalog entry.
        let apps_objects = "SELECT coalesce(string_agg(t.oid || ':' || t.tgname || ':' || p.oid \
                                || ':' || md5(p.prosrc), ',' ORDER BY t.oid), '') \
                                || '/' || (SELECT md5(definition) FROM sqlnotify.catalog \
                                           WHERE channel = 'sqlnotify_public_orders_insert') \
                              FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
                             WHERE t.tgrelid = 'orders'::regclass AND NOT t.tgisinternal \
                               AND t.tgname NOT LIKE 'sqlnotify\\_tail\\_%'";
        let objects = || async {
            let row = db
                .client()
                .await
                .query_one(apps_objects, &[])
                .await
                .unwrap();
            row.get::<_, String>(0)
        };
        let before = objects().await;
        assert!(
            before.contains("sqlnotify_public_orders_insert"),
            "{before}"
        );
        let journaled = "SELECT count(*) FROM sqlnotify.journal \
                         WHERE channel = 'sqlnotify_public_orders_insert'";

        let mut tail = Running::tail(&[
            &db.url,
            "-t",
            "orders",
            "--op",
            "insert",
            "--columns",
            "note",
            "--cleanup-on-exit",
        ]);
        assert_eq!(
            objects().await,
            before,
            "tail left the application's trigger alone"
        );
        db.exec("INSERT INTO orders VALUES (1, 10, 'first')").await;
        let e = tail.next_event();
        assert_eq!(
            (e["id"].as_i64(), &e["columns"]),
            (Some(1), &json!({"note": "first"}))
        );
        let channel = e["channel"].as_str().unwrap().to_string();
        assert!(
            channel.starts_with("sqlnotify_tail_orders_insert_"),
            "{channel}"
        );
        let status = tail.interrupt();
        assert!(status.success(), "{status:?}; stderr: {:?}", tail.errors);
        assert!(
            tail.errors.iter().any(|l| l
                == "sqlnotify: interrupted; stopping and removing the triggers this command \
                    installed …"),
            "{:?}",
            tail.errors
        );
        assert!(
            tail.errors
                .iter()
                .any(|l| l == &format!("sqlnotify: removed the triggers of {channel}")),
            "{:?}",
            tail.errors
        );

        assert_eq!(
            objects().await,
            before,
            "the application's trigger is unchanged"
        );
        let tails = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'sqlnotify\\_tail\\_%'";
        assert_eq!(db.count(tails).await, 0, "tail removed its own trigger");
        assert_eq!(db.count(journaled).await, 1, "the row was journaled");
        let e = received.next().await;
        assert_eq!(
            (e.id().as_i64(), e.get("total")),
            (Some(1), Some(&json!(10)))
        );
        db.exec("INSERT INTO orders VALUES (2, 20, 'second')").await;
        assert_eq!(received.next().await.id().as_i64(), Some(2));
        assert_eq!(db.count(journaled).await, 2);
        app.stop().await.unwrap();
    });
}

#[test]
fn install_sql_prints_the_ddl_and_installs_nothing() {
    let db = TempDb::new("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)");
    let url = db.url();
    let (status, out, err) = run(&[
        "install-sql",
        &url,
        "--table",
        "users",
        "--op",
        "insert,update",
        "--columns",
        "email",
    ]);
    assert!(status.success(), "{status:?} {err}");
    assert!(out.contains("CREATE TRIGGER"), "{out}");
    assert!(out.contains("sqlnotify_main_users_insert"), "{out}");
    assert!(out.contains("sqlnotify_main_users_update"), "{out}");
    assert!(!out.contains("sqlnotify_main_users_delete"), "{out}");
    assert_eq!(db.triggers(), 0, "install-sql installs nothing");

    // The script is usable as is (here: applied by the application's own connection).
    db.exec(&out);
    assert_eq!(db.triggers(), 2);

    // And on PostgreSQL.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pg = rt.block_on(TestDb::new());
    rt.block_on(pg.exec("CREATE TABLE users (id bigint PRIMARY KEY)"));
    let (status, out, err) = run(&["install-sql", &pg.url, "-t", "users", "-o", "delete"]);
    assert!(status.success(), "{status:?} {err}");
    assert!(out.contains("CREATE TRIGGER"), "{out}");
    assert!(out.contains("sqlnotify_public_users_delete"), "{out}");
    assert!(out.contains("FOR EACH ROW"), "{out}");

    // With the grants an application role needs; applied, the role can read the catalog.
    let (role, _) = rt.block_on(pg.role("app"));
    let (status, out, err) = run(&[
        "install-sql",
        &pg.url,
        "-t",
        "users",
        "-o",
        "delete",
        "--grant-to",
        &role,
    ]);
    assert!(status.success(), "{status:?} {err}");
    assert!(
        out.contains(&format!(
            "GRANT SELECT ON \"sqlnotify\".catalog, \"sqlnotify\".signing TO \"{role}\""
        )),
        "{out}"
    );
    rt.block_on(pg.exec(&out));
    let readable = |kind: &str, privilege: &str| {
        rt.block_on(pg.count(&format!(
            "SELECT coalesce(sum(CASE WHEN relkind = '{kind}' \
             THEN has_{}_privilege('{role}', oid, '{privilege}')::int END), 0) \
             FROM pg_class WHERE relnamespace = 'sqlnotify'::regnamespace",
            if kind == "S" { "sequence" } else { "table" }
        )))
    };
    assert_eq!(
        readable("r", "SELECT"),
        8,
        "catalog, signing, overflow, journal, consumers, dead_letters, trimmed, effects"
    );
    assert_eq!(
        readable("S", "USAGE"),
        3,
        "the journal's, overflow's and dead letters' ids"
    );
    assert_eq!(
        readable("r", "UPDATE"),
        3,
        "consumers, dead_letters and the purge's record (trimmed) only"
    );

    // Statement capture, on a journal tier only.
    let statement = ["install-sql", &pg.url, "-t", "users", "-o", "insert"];
    let (status, out, err) = run(&[
        &statement[..],
        &["--tier", "durable", "--capture", "statement"],
    ]
    .concat());
    assert!(status.success(), "{status:?} {err}");
    assert!(
        out.contains("REFERENCING NEW TABLE AS _sqn_new FOR EACH STATEMENT"),
        "{out}"
    );
    let (status, _, err) = run(&[&statement[..], &["--capture", "statement"]].concat());
    assert_eq!(status.code(), Some(2), "bad usage: {err}");
    assert!(err.contains("Tier::Durable"), "{err}");
    let errors = err.lines().filter(|l| l.starts_with("sqlnotify: error: "));
    assert_eq!(errors.count(), 1, "one-line error: {err}");
}

#[test]
fn cleanup_removes_every_watch() {
    let db = TempDb::new(
        "CREATE TABLE a (id INTEGER PRIMARY KEY); CREATE TABLE b (id INTEGER PRIMARY KEY)",
    );
    let url = db.url();
    // Install watches (a notifier stopped without cleanup leaves them in place).
    let notifier = sqlnotify::blocking::Notifier::start(
        sqlnotify::Notifier::builder(&url)
            .watch(sqlnotify::Watch::new("a", sqlnotify::Operation::Insert))
            .watch(sqlnotify::Watch::new("b", sqlnotify::Operation::Delete)),
    )
    .unwrap();
    notifier.stop().unwrap();
    assert_eq!(db.triggers(), 2);

    let (status, out, err) = run(&["cleanup", &url]);
    assert!(status.success(), "{status:?} {err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [
            "sqlnotify: removing every sqlnotify watch from the sqlite database …",
            "sqlnotify: removed 2 watch(es)"
        ]
    );
    assert_eq!(db.triggers(), 0);
    // Nothing left: a second run removes nothing and still succeeds.
    let (status, _, err) = run(&["cleanup", &url]);
    assert!(status.success(), "{status:?} {err}");
    assert!(err.contains("removed 0 watch"), "{err}");
}

/// `cleanup` on a database with a logical-tier named consumer drops its replication slot and
/// publication — the consumer's position — and says so, naming them and the consumer: it used
/// to report only "removed 0 watch(es)" (the slot count was logged at info, which the CLI does
/// not show).
#[cfg(feature = "logical")]
#[test]
fn cleanup_names_the_replication_slots_and_publications_it_drops() {
    use sqlnotify::{Notifier, Operation, Tier, Watch};

    let Some(cluster) = common::Cluster::start_with(
        "-c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10",
    ) else {
        common::prerequisite_missing(
            "cleanup_names_the_replication_slots_and_publications_it_drops",
            "PostgreSQL's binaries (initdb, pg_ctl)",
        );
        return;
    };
    actix::System::new().block_on(async {
        let db = TestDb::on(&cluster.url()).await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
        common::start_and_stop(
            Notifier::builder(&db.url)
                .watch(Watch::new("t", Operation::Insert).tier(Tier::Logical))
                .consumer("billing"),
        )
        .await;
        let names = |sql: &'static str| {
            let db = &db;
            async move {
                let rows = db.client().await.query(sql, &[]).await.unwrap();
                rows.iter().map(|r| r.get(0)).collect::<Vec<String>>()
            }
        };
        let slots = names("SELECT slot_name::text FROM pg_replication_slots").await;
        assert_eq!(
            slots.len(),
            1,
            "the consumer's slot stays after stop: {slots:?}"
        );
        let slot = &slots[0];
        assert_eq!(
            names("SELECT pubname::text FROM pg_publication").await,
            std::slice::from_ref(slot),
            "its publication has the slot's name"
        );

        let (status, out, err) = run(&["cleanup", &db.url]);
        assert!(status.success(), "{status:?} {err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(
            err.lines().collect::<Vec<_>>(),
            [
                "sqlnotify: removing every sqlnotify watch from the postgresql database …",
                "sqlnotify: removed 0 watch(es)",
                &format!(
                    "sqlnotify: dropped 1 replication slot(s): {slot}; the positions of logical \
                     consumer(s) \"billing\" went with them"
                ),
                &format!("sqlnotify: dropped 1 publication(s): {slot}"),
            ]
        );
        assert!(names("SELECT slot_name::text FROM pg_replication_slots")
            .await
            .is_empty());
        assert!(names("SELECT pubname::text FROM pg_publication")
            .await
            .is_empty());
    });
}

#[test]
fn bad_input_is_one_line_on_stderr_and_a_non_zero_exit() {
    let db = TempDb::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let url = db.url();
    let missing = format!("sqlite://{}", db.dir.join("missing.db").display());
    // (arguments, exit status: 2 bad usage / 1 the database refuses or lacks it, message)
    let mut cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec![], 2, "a command is required"),
        (vec!["frobnicate"], 2, "frobnicate"),
        (vec!["tail"], 2, "--table"),
        (vec!["tail", &url], 2, "--table"),
        (
            vec!["tail", &url, "--table", "t", "--op", "upsert"],
            2,
            "upsert",
        ),
        (
            vec!["tail", &url, "--table", "t", "--tier", "fast"],
            2,
            "fast",
        ),
        (vec!["tail", &url, "--tabel", "t"], 2, "--tabel"),
        (
            vec!["tail", &url, "--table", "t", "--label", "x"],
            2,
            "--label names one table and one operation",
        ),
        (
            vec!["tail", &url, "-t", "t", "-o", "insert", "--label", ""],
            2,
            "invalid name \"\"",
        ),
        (vec!["tail", &url, "--table", "nope"], 1, "\"nope\""),
        (
            vec![
                "tail",
                &url,
                "--table",
                "t",
                "--op",
                "insert",
                "--columns",
                "zzz",
            ],
            1,
            "\"zzz\"",
        ),
        (vec!["install-sql", &url, "--table", "nope"], 1, "\"nope\""),
        (
            vec!["consumers"],
            2,
            "consumers needs an action: list or drop",
        ),
        (
            vec!["dead-letters"],
            2,
            "dead-letters needs an action: list, show, retry or drop",
        ),
        (
            vec!["dead-letters", "retry", &url],
            2,
            "<ID|--handler <NAME>>",
        ),
        (
            vec!["dead-letters", "drop", &url, "1", "--handler", "billing"],
            2,
            "cannot be used with",
        ),
        (vec!["dead-letters", "show", &url, "x"], 2, "'x'"),
        (
            vec!["dead-letters", "list", &url, "--limit", "0"],
            2,
            "--limit",
        ),
        (
            vec!["dead-letters", "show", &url, "99"],
            1,
            "no dead letter has id 99",
        ),
        (vec!["tail", &missing, "--table", "t"], 1, "missing.db"),
        (vec!["cleanup", "oracle://localhost/x"], 2, "oracle"),
        (vec!["tail", "ftp://h/x", "-t", "t"], 2, "ftp"),
        (vec!["cleanup", "localhost/x"], 2, "no scheme"),
        (vec!["cleanup", "sqlite::memory:"], 2, "in-memory"),
        (
            vec!["cleanup", "postgres://u:s3cr3t@127.0.0.1:1/x"],
            1,
            "connecting to PostgreSQL",
        ),
    ];
    if cfg!(feature = "mysql") {
        cases.push((
            vec!["cleanup", "mysql://u:s3cr3t@127.0.0.1:1/x"],
            1,
            "MySQL",
        ));
    } else {
        cases.push((
            vec!["cleanup", "mysql://u:s3cr3t@127.0.0.1:1/x"],
            2,
            "`mysql` feature disabled",
        ));
    }
    for (args, code, expected) in cases {
        let (status, out, err) = run(&args);
        assert_eq!(status.code(), Some(code), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: stdout {out:?}");
        // One error line, the last; before it at most the progress line of what failed.
        let lines: Vec<&str> = err.lines().collect();
        assert!(
            lines
                .last()
                .is_some_and(|l| l.starts_with("sqlnotify: error: ")),
            "{args:?}: {err:?}"
        );
        assert!(
            lines.len() == 1 || (lines.len() == 2 && lines[0].ends_with(" …")),
            "{args:?}: stderr {err:?}"
        );
        if code == 2 && lines.len() == 2 {
            assert!(
                lines[0].contains("installing triggers"),
                "{args:?}: {err:?}"
            );
        }
        assert!(
            err.contains(expected),
            "{args:?}: {err:?} lacks {expected:?}"
        );
        assert!(
            !err.contains("s3cr3t"),
            "{args:?}: password echoed: {err:?}"
        );
    }
    assert_eq!(db.triggers(), 0, "nothing was installed by bad input");
}

#[test]
fn help_describes_every_command() {
    let (status, out, _) = run(&["--help"]);
    assert!(status.success());
    for word in [
        "tail",
        "install-sql",
        "cleanup",
        "consumers",
        "dead-letters",
        "sqlite://",
        "postgres://",
        "mysql://",
        "mariadb://",
        "PostgreSQL, SQLite and MySQL / MariaDB",
        "stderr",
        "Exit status: 0 on success",
        "2 on bad usage",
        "1 when the database refuses",
    ] {
        assert!(out.contains(word), "--help lacks {word}: {out}");
    }
    let (status, out, _) = run(&["tail", "--help"]);
    assert!(status.success());
    for word in [
        "--table",
        "--op",
        "--columns",
        "--label",
        "--tier",
        "--cleanup-on-exit",
        "JSON",
        "Example:",
    ] {
        assert!(out.contains(word), "tail --help lacks {word}: {out}");
    }
    for (action, words) in [
        ("list", &["--handler", "--limit", "--json", "Example:"][..]),
        ("show", &["<ID>", "Example:"][..]),
        ("retry", &["[ID]...", "--handler", "Example:"][..]),
        ("drop", &["[ID]...", "--handler", "Example:"][..]),
    ] {
        let (status, out, _) = run(&["dead-letters", action, "--help"]);
        assert!(status.success());
        for word in words {
            assert!(
                out.contains(word),
                "dead-letters {action} --help lacks {word}: {out}"
            );
        }
    }
    if cfg!(feature = "nats") {
        let (status, out, _) = run(&["relay", "--help"]);
        assert!(status.success());
        for word in [
            "--nats",
            "--stream",
            "--consumer",
            "--watch <TABLE:OP[:COLS]>",
            "insert+update",
            "--subject-prefix",
            "--partitions",
            "--source",
            "--duplicate-window-secs",
            "[possible values: durable, poll]",
            "consumer group",
            "Example: sqlnotify relay",
        ] {
            assert!(out.contains(word), "relay --help lacks {word}: {out}");
        }
        let (_, out, _) = run(&["--help"]);
        assert!(out.contains("relay"), "{out}");
    }
    let (status, out, _) = run(&["help", "install-sql"]);
    assert!(status.success());
    assert!(out.contains("DDL"), "{out}");
    let (status, out, _) = run(&["--version"]);
    assert!(status.success());
    assert!(out.starts_with("sqlnotify "), "{out}");
}

#[test]
fn tail_says_which_lock_it_waits_for_and_gives_up_after_the_install_timeout() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::new());
    rt.block_on(db.exec("CREATE TABLE t (id bigint PRIMARY KEY)"));
    // an open transaction that wrote to t
    let blocker = rt.block_on(db.client());
    let pid: i32 = rt
        .block_on(blocker.query_one("SELECT pg_backend_pid()", &[]))
        .unwrap()
        .get(0);
    rt.block_on(blocker.batch_execute("BEGIN; INSERT INTO t VALUES (1)"))
        .unwrap();
    let waiting = format!("waiting for a lock on public.t (held by pid {pid})");

    let (status, out, err) = run(&[
        "tail",
        &db.url,
        "--table",
        "t",
        "--op",
        "insert",
        "--install-timeout",
        "1",
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(out.is_empty());
    assert!(err.contains(&waiting), "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("sqlnotify: error: gave up after")
            && last.contains(&format!("public.t, held by pid {pid};")),
        "{err}"
    );

    // with the default timeout it waits, says so, and tails once the transaction ends
    let mut tail = Running::spawn(&["tail", &db.url, "--table", "t", "--op", "insert"]);
    tail.wait_for_stderr(&waiting);
    rt.block_on(blocker.batch_execute("COMMIT")).unwrap();
    tail.wait_for_stderr("tailing");
    rt.block_on(db.exec("INSERT INTO t VALUES (2)"));
    assert_eq!(tail.next_event()["id"], 2);
    let status = tail.interrupt();
    assert!(status.success(), "{status:?}; stderr: {:?}", tail.errors);

    let (status, _, err) = run(&["cleanup", &db.url, "--install-timeout", "0"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--install-timeout must be a number of seconds above zero"));
}

#[test]
fn consumers_list_shows_each_consumer_and_drop_drops_it() {
    let db = TempDb::new(
        "CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE TABLE u (id INTEGER PRIMARY KEY)",
    );
    let url = db.url();
    let header = "NAME  STATE  POSITION  BACKLOG  LAST ACTIVE  EXPIRY  CHANNELS";
    // sqlnotify not installed yet: nothing registered
    let (status, out, err) = run(&["consumers", "list", &url]);
    assert!(status.success(), "{status:?} {err}");
    assert_eq!(out.trim_end(), header);
    assert!(err.contains("no named consumer"), "{err}");

    // two consumers registered (started and stopped), then rows only one of them reads
    for (name, table, expiry) in [("billing", "t", None), ("audit", "u", Some(3600))] {
        let mut builder = sqlnotify::Notifier::builder(&url)
            .watch(sqlnotify::Watch::new(table, sqlnotify::Operation::Insert))
            .consumer(name);
        if let Some(secs) = expiry {
            builder = builder.consumer_expiry(Duration::from_secs(secs));
        }
        sqlnotify::blocking::Notifier::start(builder)
            .unwrap()
            .stop()
            .unwrap();
    }
    db.exec("INSERT INTO t VALUES (1), (2), (3)");
    let (status, out, err) = run(&["consumers", "list", &url]);
    assert!(status.success(), "{status:?} {err}");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(out.starts_with("NAME "), "{out}");
    // NAME STATE POSITION(2) BACKLOG LAST-ACTIVE(2) EXPIRY CHANNELS
    let (audit, billing) = (&lines[1], &lines[2]);
    assert_eq!(
        (audit[0], audit[1], audit[2], audit[3], audit[4]),
        ("audit", "active", "id", "0", "0")
    );
    assert!(audit[5].ends_with('s') && audit[6] == "ago", "{out}");
    assert_eq!((audit[7], audit[8]), ("1h", "sqlnotify_main_u_insert"));
    assert_eq!(
        (billing[0], billing[1], billing[2], billing[3], billing[4]),
        ("billing", "active", "id", "0", "3")
    );
    assert_eq!((billing[7], billing[8]), ("-", "sqlnotify_main_t_insert"));

    let (status, out, err) = run(&["consumers", "drop", &url, "billing"]);
    assert!(status.success(), "{status:?} {err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("dropped consumer \"billing\""), "{err}");
    let (_, out, _) = run(&["consumers", "list", &url]);
    let billing: Vec<&str> = out.lines().nth(2).unwrap().split_whitespace().collect();
    assert_eq!(
        (billing[0], billing[1], billing[4]),
        ("billing", "dropped", "3")
    );

    let (status, out, err) = run(&["consumers", "drop", &url, "nobody"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("sqlnotify: error: no consumer named \"nobody\""),
        "{err}"
    );
}

/// Three rows in a dead-letter table `table` (times through `at`, from Unix seconds): 1 and 2
/// of handler billing (dead with a two-line error; retrying), 3 of handler audit (dead, no
/// sequence).
fn dead_letter_rows(table: &str, at: fn(f64) -> String) -> String {
    let event = r#"{"channel":"sqlnotify_main_orders_insert","id":7,"columns":{"total":3}}"#;
    format!(
        "INSERT INTO {table} (handler, channel, sequence, part, key, event, attempts, \
         first_failed, last_failed, error, state) VALUES \
         ('billing', 'sqlnotify_main_orders_insert', 7, 0, '[7]', '{event}', 5, {}, {}, \
          'payment gateway said no:\n  502 Bad Gateway', 'dead'), \
         ('billing', 'sqlnotify_main_orders_insert', 8, 0, '[8]', '{{}}', 2, {}, {}, 'boom', \
          'retrying'), \
         ('audit', 'sqlnotify_main_orders_insert', NULL, 0, '[9]', '{{}}', 3, {}, {}, 'nope', \
          'dead')",
        at(1_714_564_800.5),
        at(1_714_565_100.0),
        at(1_714_564_800.0),
        at(1_714_564_801.0),
        at(1_714_564_802.0),
        at(1_714_564_803.0),
    )
}

/// `dead-letters list` as JSON lines.
fn dead_letters_json(args: &[&str]) -> Vec<Value> {
    let (status, out, err) = run(&[&["dead-letters", "list"], args, &["--json"]].concat());
    assert!(status.success(), "{status:?} {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// `dead-letters list / show / retry / drop` on the rows of [`dead_letter_rows`].
fn dead_letters_commands_on(url: &str) {
    let (status, out, err) = run(&["dead-letters", "list", url]);
    assert!(status.success(), "{status:?} {err}");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        lines[0],
        [
            "ID", "HANDLER", "STATE", "ATTEMPTS", "FIRST", "FAILED", "LAST", "FAILED", "CHANNEL",
            "KEY", "ERROR"
        ]
    );
    // ID HANDLER STATE ATTEMPTS FIRST-FAILED(2) LAST-FAILED(2) CHANNEL KEY ERROR…
    assert_eq!(&lines[1][..4], ["1", "billing", "dead", "5"]);
    assert_eq!(lines[1][5], "ago");
    assert_eq!(&lines[1][8..10], ["sqlnotify_main_orders_insert", "[7]"]);
    assert_eq!(
        lines[1][10..].join(" "),
        "payment gateway said no: 502 Bad Gateway",
        "the error on one line"
    );
    assert_eq!(&lines[2][..4], ["2", "billing", "retrying", "2"]);
    assert_eq!(&lines[3][..4], ["3", "audit", "dead", "3"]);

    // --json: every field, the key and the event as JSON; --handler, --limit
    let all = dead_letters_json(&[url]);
    assert_eq!(
        all[0],
        json!({
            "id": 1, "handler": "billing", "state": "dead", "attempts": 5,
            "first_failed": "2024-05-01T12:00:00.500000Z",
            "last_failed": "2024-05-01T12:05:00.000000Z",
            "channel": "sqlnotify_main_orders_insert", "sequence": 7, "part": 0, "key": [7],
            "event": {"channel": "sqlnotify_main_orders_insert", "id": 7, "columns": {"total": 3}},
            "error": "payment gateway said no:\n  502 Bad Gateway",
        })
    );
    assert_eq!(all[2]["sequence"], Value::Null);
    let audit = dead_letters_json(&[url, "--handler", "audit"]);
    assert_eq!(
        audit.iter().map(|l| l["id"].clone()).collect::<Vec<_>>(),
        [json!(3)]
    );
    let oldest = dead_letters_json(&[url, "--limit", "1"]);
    assert_eq!(
        oldest.iter().map(|l| l["id"].clone()).collect::<Vec<_>>(),
        [json!(1)]
    );
    let (status, out, err) = run(&["dead-letters", "list", url, "--handler", "nobody"]);
    assert!(status.success(), "{status:?} {err}");
    assert_eq!(out.lines().count(), 1, "the header only: {out}");
    assert!(
        err.contains("handler \"nobody\" has no dead letters"),
        "{err}"
    );

    // show: every field, the error and the event whole
    let (status, out, err) = run(&["dead-letters", "show", url, "1"]);
    assert!(status.success(), "{status:?} {err}");
    for line in [
        "id:           1",
        "state:        dead",
        "first failed: 2024-05-01T12:00:00.500000Z (",
        "error:        payment gateway said no:",
        "                502 Bad Gateway",
        "event:        {",
        "                \"id\": 7",
    ] {
        assert!(out.contains(line), "{line:?} not in {out}");
    }

    // drop and retry act on dead letters only, and say how many they did
    let (status, out, err) = run(&["dead-letters", "drop", url, "3", "2"]);
    assert!(status.success(), "{status:?} {err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(
        err.trim_end(),
        "sqlnotify: dropped 1 dead letter(s); 1 of the 2 id(s) given are not dead letters \
         (unknown, still being retried, or already requested)"
    );
    let (status, _, err) = run(&["dead-letters", "retry", url, "1", "99"]);
    assert!(status.success(), "{status:?} {err}");
    assert!(
        err.starts_with("sqlnotify: 1 dead letter(s) requested for retry; 1 of the 2 id(s)"),
        "{err}"
    );
    let states: Vec<(Value, Value)> = dead_letters_json(&[url])
        .into_iter()
        .map(|l| (l["id"].clone(), l["state"].clone()))
        .collect();
    assert_eq!(
        states,
        [
            (json!(1), json!("requested")),
            (json!(2), json!("retrying"))
        ]
    );
    for action in ["retry", "drop"] {
        let (status, _, err) = run(&["dead-letters", action, url, "--handler", "billing"]);
        assert!(status.success(), "{status:?} {err}");
        assert!(err.contains(" 0 dead letter(s)"), "{action}: {err}");
    }
}

#[test]
fn dead_letters_lists_shows_retries_and_drops() {
    let db = TempDb::new("CREATE TABLE orders (id INTEGER PRIMARY KEY)");
    let url = db.url();
    // the table comes with the install
    sqlnotify::blocking::Notifier::start(sqlnotify::Notifier::builder(&url).watch(
        sqlnotify::Watch::new("orders", sqlnotify::Operation::Insert),
    ))
    .unwrap()
    .stop()
    .unwrap();
    db.exec(&dead_letter_rows("sqlnotify_dead_letters", |secs| {
        secs.to_string()
    }));
    dead_letters_commands_on(&url);

    // And on PostgreSQL.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pg = rt.block_on(TestDb::new());
    let (status, out, err) = run(&["dead-letters", "list", &pg.url]);
    assert!(status.success(), "{status:?} {err}");
    assert_eq!(
        out.lines().count(),
        1,
        "sqlnotify not installed: the header only: {out}"
    );
    assert!(err.contains("no dead letters in this database"), "{err}");
    rt.block_on(pg.exec("CREATE TABLE orders (id bigint PRIMARY KEY)"));
    let (status, out, err) = run(&["install-sql", &pg.url, "-t", "orders", "-o", "insert"]);
    assert!(status.success(), "{status:?} {err}");
    rt.block_on(pg.exec(&out));
    rt.block_on(pg.exec(&dead_letter_rows("sqlnotify.dead_letters", |secs| {
        format!("to_timestamp({secs})")
    })));
    dead_letters_commands_on(&pg.url);
}

/// Deletes a NATS stream when dropped (also when the test fails).
#[cfg(feature = "nats")]
struct StreamCleanup {
    nats: String,
    stream: String,
}

#[cfg(feature = "nats")]
impl Drop for StreamCleanup {
    fn drop(&mut self) {
        let (nats, stream) = (self.nats.clone(), self.stream.clone());
        common::on_a_runtime_of_its_own(async move {
            common::nats::delete_stream(&nats, &stream).await;
        });
    }
}

/// How many messages `stream` holds: 0 while it does not exist yet.
#[cfg(feature = "nats")]
async fn stored_count(nats: &str, stream: &str) -> u64 {
    let js = common::nats::jetstream(nats).await;
    match js.get_stream(stream).await {
        Ok(mut handle) => handle.info().await.map_or(0, |info| info.state.messages),
        Err(_) => 0,
    }
}

#[cfg(feature = "nats")]
#[test]
fn relay_publishes_each_change_once_stands_by_takes_over_and_stops_on_sigterm() {
    use std::collections::{BTreeMap, HashSet};

    use common::nats::{read_stream, shared};
    use common::{unique_name, wait_until};

    const STORED_WITHIN: Duration = Duration::from_secs(30);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::new());
    rt.block_on(db.exec(
        "CREATE SCHEMA shop; \
         CREATE TABLE shop.orders (id bigint PRIMARY KEY, status text, total int)",
    ));
    let Some(nats) = shared("relay_publishes_each_change_once_stands_by_takes_over") else {
        return;
    };
    let stream = unique_name("CLI_RELAY");
    let prefix = unique_name("clirelay");
    let _cleanup = StreamCleanup {
        nats: nats.clone(),
        stream: stream.clone(),
    };
    let args = [
        "relay",
        &db.url,
        "--nats",
        &nats,
        "--stream",
        &stream,
        "--consumer",
        "cli-relay",
        "--watch",
        "shop.orders:insert+update:status",
        "--subject-prefix",
        &prefix,
        "--stats-interval",
        "1",
    ];
    let mut first = Running::spawn(&args);
    first.wait_for_stderr(
        "sqlnotify: installing triggers for shop.orders INSERT, shop.orders UPDATE in the \
         postgresql database …",
    );
    let relaying = first.wait_for_stderr("sqlnotify: relaying");
    assert_eq!(
        relaying,
        format!(
            "sqlnotify: relaying shop.orders INSERT, shop.orders UPDATE on postgresql as consumer \
             \"cli-relay\" into stream {stream} (subjects {prefix}.>); Ctrl-C to stop"
        )
    );
    first.seen_or_wait(&format!(
        "sqlnotify: active: this relay publishes consumer \"cli-relay\"'s events into stream \
         {stream}"
    ));

    // A second relay of the same consumer stands by.
    let mut second = Running::spawn(&args);
    second.wait_for_stderr("sqlnotify: relaying");
    second.seen_or_wait("sqlnotify: standby: another relay of consumer \"cli-relay\" is active");

    // 5 inserts and 2 updates relayed; the delete is not watched.
    rt.block_on(db.exec(
        "INSERT INTO shop.orders SELECT g, 'new', g * 10 FROM generate_series(1, 5) g; \
         UPDATE shop.orders SET status = 'paid' WHERE id <= 2; \
         DELETE FROM shop.orders WHERE id = 5",
    ));
    assert!(
        rt.block_on(wait_until(STORED_WITHIN, || async {
            stored_count(&nats, &stream).await >= 7
        })),
        "the stream holds {} of 7 messages; stderr: {:?}",
        rt.block_on(stored_count(&nats, &stream)),
        first.errors
    );
    // The counters say so too (a stats line every second).
    first.wait_for_stderr(
        "sqlnotify: stats: active; published 7, duplicates 0, pending 0; NATS connected",
    );
    second.wait_for_stderr("sqlnotify: stats: standby; published 0");

    let stored = rt.block_on(read_stream(&nats, &stream));
    assert_eq!(stored.len(), 7, "nothing more, nothing twice: {stored:?}");
    let ids: HashSet<&str> = stored.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), 7, "message ids are unique: {stored:?}");
    let mut per_key: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    for m in &stored {
        assert_eq!(m.subject, format!("{prefix}.shop.orders.{}", m.operation));
        assert_eq!(m.table, "shop.orders");
        assert!(
            m.id.starts_with("cli-relay:"),
            "source = consumer: {}",
            m.id
        );
        assert_eq!(m.body["schema"], "shop");
        assert_eq!(m.body["operation"], m.operation.as_str());
        assert_eq!(m.body["id"].to_string(), m.key);
        let status = if m.operation == "update" {
            "paid"
        } else {
            "new"
        };
        assert_eq!(m.body["columns"], json!({ "status": status }), "{m:?}");
        per_key
            .entry(m.key.parse().unwrap())
            .or_default()
            .push(&m.operation);
    }
    assert_eq!(
        per_key.into_iter().collect::<Vec<_>>(),
        [
            (1, vec!["insert", "update"]),
            (2, vec!["insert", "update"]),
            (3, vec!["insert"]),
            (4, vec!["insert"]),
            (5, vec!["insert"]),
        ]
    );

    // SIGTERM: the first stops gracefully (exit 0), the second takes over.
    let status = first.signal("TERM");
    assert!(status.success(), "{status:?}; stderr: {:?}", first.errors);
    assert!(
        first.errors.iter().any(|l| l
            == "sqlnotify: terminated; stopping (the publishes in flight are confirmed first) …"),
        "{:?}",
        first.errors
    );
    assert_eq!(
        first.errors.last().map(String::as_str),
        Some("sqlnotify: stopped; published 7, duplicates 0, pending 0")
    );
    assert!(
        !first.errors.iter().any(|l| l.contains("error")),
        "{:?}",
        first.errors
    );
    second.wait_for_stderr("sqlnotify: active: this relay publishes consumer \"cli-relay\"");
    rt.block_on(db.exec("INSERT INTO shop.orders VALUES (6, 'new', 60)"));
    assert!(
        rt.block_on(wait_until(STORED_WITHIN, || async {
            stored_count(&nats, &stream).await >= 8
        })),
        "the row written after the takeover was not stored; stderr: {:?}",
        second.errors
    );
    let status = second.signal("TERM");
    assert!(status.success(), "{status:?}; stderr: {:?}", second.errors);
    let stored = rt.block_on(read_stream(&nats, &stream));
    assert_eq!(stored.len(), 8, "{stored:?}");
    assert_eq!(
        (stored[7].key.as_str(), stored[7].operation.as_str()),
        ("6", "insert")
    );
    let ids: HashSet<&str> = stored.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), 8, "message ids are unique: {stored:?}");
}

#[cfg(feature = "nats")]
#[test]
fn relay_rejects_bad_arguments_with_one_line_naming_the_bad_part() {
    let db = TempDb::new("CREATE TABLE orders (id INTEGER PRIMARY KEY, status TEXT)");
    let url = db.url();
    // Nothing reaches NATS: every case fails before the relay connects.
    let base = [
        "relay",
        &url,
        "--nats",
        "nats://127.0.0.1:1",
        "--stream",
        "S",
        "--consumer",
        "c",
    ];
    // (extra arguments, exit status, message)
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["--watch", "orders:upsert"],
            2,
            "invalid value 'orders:upsert' for '--watch <TABLE:OP[:COLS]>': unknown operation \
             \"upsert\" (OP is insert, update or delete; join several with '+'",
        ),
        (
            vec!["--watch", "orders"],
            2,
            "no operation after the table \"orders\" (expected TABLE:OP[:COLS]",
        ),
        (
            vec!["--watch", "orders:insert,update"],
            2,
            "operations \"insert,update\": join several with '+', not ','",
        ),
        (
            vec!["--watch", "orders:insert:status,,total"],
            2,
            "an empty column name in \"status,,total\"",
        ),
        (
            vec!["--watch", "orders:insert:a:b"],
            2,
            "4 ':'-separated parts, at most 3",
        ),
        (vec![], 2, "--watch"),
        (
            vec!["--watch", "orders:insert", "--tier", "notify"],
            2,
            "'notify' for '--tier <TIER>' [possible values: durable, poll]",
        ),
        (
            vec!["--watch", "orders:insert", "--partitions", "0"],
            2,
            "--partitions",
        ),
        (
            vec!["--watch", "orders:insert", "--subject-prefix", "a b"],
            2,
            "\"a b\" is not a NATS subject prefix",
        ),
        (vec!["--watch", "nope:insert"], 1, "\"nope\""),
        (vec!["--watch", "orders:insert:nope"], 1, "\"nope\""),
    ];
    for (extra, code, expected) in cases {
        let args = [&base[..], &extra].concat();
        let (status, out, err) = run(&args);
        assert_eq!(status.code(), Some(code), "{extra:?}: {err}");
        assert!(out.is_empty(), "{extra:?}: stdout {out:?}");
        let lines: Vec<&str> = err.lines().collect();
        // One error line, the last; before it at most the progress line of what failed.
        assert!(
            lines
                .last()
                .is_some_and(|l| l.starts_with("sqlnotify: error: ")),
            "{extra:?}: {err:?}"
        );
        assert!(
            lines.len() == 1 || (lines.len() == 2 && lines[0].contains("installing triggers")),
            "{extra:?}: stderr {err:?}"
        );
        assert!(
            err.contains(expected),
            "{extra:?}: {err:?} lacks {expected:?}"
        );
    }
    // --consumer is required.
    let (status, _, err) = run(&[
        "relay",
        &url,
        "--nats",
        "n",
        "--stream",
        "S",
        "--watch",
        "orders:insert",
    ]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--consumer"), "{err}");
    assert_eq!(db.triggers(), 0, "nothing was installed by bad input");
}
