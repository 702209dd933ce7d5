//! The `sqlnotify` binary (feature `cli`), run as a user would: `tail` printing JSON lines on
//! SQLite and PostgreSQL and stopping cleanly on SIGINT (with and without cleanup), stdout
//! closed under it, `install-sql`, `cleanup`, `--help`, and one-line errors on bad input.

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

/// A running `sqlnotify tail`, its stdout and stderr read line by line on threads of their
/// own. Killed on drop if still running.
struct Tail {
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

impl Tail {
    /// Starts `sqlnotify tail ARGS` and waits until it is listening.
    fn start(args: &[&str]) -> Tail {
        let mut child = sqlnotify()
            .arg("tail")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run sqlnotify");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        let mut tail = Tail {
            child,
            stdout,
            stderr,
            errors: Vec::new(),
        };
        tail.wait_for_stderr("tailing");
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
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
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
                "sqlnotify tail did not exit within {ARRIVES_WITHIN:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Tail {
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
    let mut tail = Tail::start(&[
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
    assert_eq!(
        e,
        json!({
            "channel": "sqlnotify_main_users_insert",
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
        tail.errors.iter().any(|l| l.contains("interrupted")),
        "{:?}",
        tail.errors
    );
    assert_eq!(db.triggers(), 0, "--cleanup-on-exit removed the triggers");
}

#[test]
fn tail_keeps_triggers_without_cleanup_and_prints_composite_keys_and_labels() {
    let db = TempDb::new(
        "CREATE TABLE order_items (order_id INTEGER, item_id INTEGER, qty INTEGER, \
         PRIMARY KEY (order_id, item_id))",
    );
    let url = db.url();
    let mut tail = Tail::start(&[
        &url,
        "-t",
        "order_items",
        "-o",
        "update",
        "-c",
        "qty",
        "--label",
        "qty_changes",
    ]);
    db.exec("INSERT INTO order_items VALUES (100, 7, 1); UPDATE order_items SET qty = 2");
    let e = tail.next_event();
    assert_eq!(e["channel"], "sqlnotify_qty_changes");
    assert_eq!(e["id"], json!([100, 7]));
    assert_eq!(e["columns"], json!({"qty": 2}));
    let status = tail.interrupt();
    assert!(status.success(), "{status:?}; stderr: {:?}", tail.errors);
    assert_eq!(db.triggers(), 1, "triggers stay without --cleanup-on-exit");
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
    let mut tail = Tail {
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
    let mut tail = Tail::start(&[
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
        5,
        "catalog, signing, overflow, journal, consumers"
    );
    assert_eq!(
        readable("S", "USAGE"),
        2,
        "the journal's and overflow's ids"
    );
    assert_eq!(readable("r", "UPDATE"), 1, "consumers only");

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
    assert!(!status.success());
    assert!(err.contains("Tier::Durable"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
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
    assert!(err.contains("removed 2 watch"), "{err}");
    assert_eq!(db.triggers(), 0);
    // Nothing left: a second run removes nothing and still succeeds.
    let (status, _, err) = run(&["cleanup", &url]);
    assert!(status.success(), "{status:?} {err}");
    assert!(err.contains("removed 0 watch"), "{err}");
}

#[test]
fn bad_input_is_one_line_on_stderr_and_a_non_zero_exit() {
    let db = TempDb::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let url = db.url();
    let missing = format!("sqlite://{}", db.dir.join("missing.db").display());
    // Exit status 2: bad usage (the arguments); 1: what the database (or its URL) refused.
    let cases: Vec<(Vec<&str>, &str, i32)> = vec![
        (vec![], "a command is required", 2),
        (vec!["frobnicate"], "frobnicate", 2),
        (vec!["tail"], "--table", 2),
        (vec!["tail", &url], "--table", 2),
        (
            vec!["tail", &url, "--table", "t", "--op", "upsert"],
            "upsert",
            2,
        ),
        (
            vec!["tail", &url, "--table", "t", "--tier", "fast"],
            "fast",
            2,
        ),
        (vec!["tail", &url, "--tabel", "t"], "--tabel", 2),
        (
            vec!["tail", &url, "--table", "t", "--label", "x"],
            "--label names one table and one operation",
            2,
        ),
        (vec!["tail", &url, "--table", "nope"], "\"nope\"", 1),
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
            "\"zzz\"",
            1,
        ),
        (vec!["install-sql", &url, "--table", "nope"], "\"nope\"", 1),
        (vec!["tail", &missing, "--table", "t"], "missing.db", 1),
        (vec!["cleanup", "oracle://localhost/x"], "oracle", 1),
        (vec!["cleanup", "sqlite::memory:"], "in-memory", 1),
        (
            vec!["cleanup", "postgres://u:s3cr3t@127.0.0.1:1/x"],
            "connecting to PostgreSQL",
            1,
        ),
    ];
    for (args, expected, code) in cases {
        let (status, out, err) = run(&args);
        assert_eq!(status.code(), Some(code), "{args:?}: {status:?} {err:?}");
        assert!(out.is_empty(), "{args:?}: stdout {out:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: stderr {err:?}");
        assert!(err.starts_with("sqlnotify: error: "), "{args:?}: {err:?}");
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
    for word in ["tail", "install-sql", "cleanup", "sqlite://", "postgres://"] {
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
    let mut child = sqlnotify()
        .args(["tail", &db.url, "--table", "t", "--op", "insert"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut tail = Tail {
        stdout: lines(child.stdout.take().unwrap()),
        stderr: lines(child.stderr.take().unwrap()),
        child,
        errors: Vec::new(),
    };
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
