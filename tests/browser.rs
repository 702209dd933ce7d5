//! The live_dashboard example in a real browser: headless Chromium, driven through
//! chromedriver's WebDriver HTTP API, opens the page; a row inserted through `POST /items` and
//! one inserted by a separate SQLite connection must both show on the page within a second.
//! Also, without a browser: a client that stops reading its event stream does not hold up
//! the others, and a client that goes away loses its subscriptions.
//!
//! The browser test needs Debian's `chromium` and `chromium-driver` packages (scripts/test
//! installs them when it runs as root); without them it prints why it is skipped and passes,
//! unless `CI` is set: then it fails.
//! The example binary is the one `cargo test` builds; it is (re)built here when missing or
//! older than its sources.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::ARRIVES_WITHIN;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The two tests run one after the other: the flood of the second must not slow the first.
static SERIAL: Mutex<()> = Mutex::new(());

/// How long the page may take to show a committed row.
const SHOWS_WITHIN: Duration = Duration::from_secs(1);

/// Polls `check` every 20 ms until it holds, up to `limit`.
fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A directory of its own with an (empty) SQLite database file, removed on drop.
struct TempDir {
    dir: PathBuf,
}

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(common::unique_name("sqlnotify-browser-test"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir { dir }
    }

    fn db_path(&self) -> PathBuf {
        self.dir.join("app.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// target/debug/examples/live_dashboard, built with this test's features when missing or
/// older than the example or the library sources.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap(); // …/target/debug
    let binary = profile_dir.join("examples").join("live_dashboard");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).ok();
    let stale = match built {
        None => true,
        Some(built) => newest_source(&[
            manifest.join("examples/live_dashboard.rs"),
            manifest.join("src"),
            manifest.join("Cargo.toml"),
        ])
        .is_some_and(|newest| newest > built),
    };
    if stale {
        let features: Vec<&str> = [
            ("postgres", cfg!(feature = "postgres")),
            ("sqlite", cfg!(feature = "sqlite")),
            ("mysql", cfg!(feature = "mysql")),
            ("cli", cfg!(feature = "cli")),
            ("web", cfg!(feature = "web")),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(manifest)
            .args([
                "build",
                "--example",
                "live_dashboard",
                "--no-default-features",
            ])
            .arg(format!("--features={}", features.join(",")))
            .status()
            .expect("run cargo build --example live_dashboard");
        assert!(status.success(), "building the example failed");
    }
    assert!(binary.exists(), "{} was not built", binary.display());
    binary
}

/// The newest modification time of these files (and, for directories, of their files).
fn newest_source(paths: &[PathBuf]) -> Option<SystemTime> {
    let mut newest = None;
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else if let Ok(modified) = meta.modified() {
            newest = newest.max(Some(modified));
        }
    }
    newest
}

/// A running live_dashboard; interrupted (and checked to exit cleanly) by [`Dashboard::stop`],
/// killed on drop otherwise.
struct Dashboard {
    child: Child,
    base: String,
    stdout: mpsc::Receiver<String>,
}

impl Dashboard {
    fn start(url: &str) -> Dashboard {
        Self::start_at(url, "127.0.0.1:0")
    }

    /// Started on `addr` (`host:port`; port 0 picks a free one).
    fn start_at(url: &str, addr: &str) -> Dashboard {
        let mut child = Command::new(example_binary())
            .arg(url)
            .env("LIVE_DASHBOARD_ADDR", addr)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the live_dashboard example");
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let deadline = Instant::now() + ARRIVES_WITHIN;
        let base = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = stdout
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the example printed no address; stdout: {seen:?}"));
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.trim_end_matches('/').to_string();
            }
            seen.push(line);
        };
        Dashboard {
            child,
            base,
            stdout,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn stats(&self) -> Value {
        ureq::get(&self.url("/stats"))
            .call()
            .expect("GET /stats")
            .into_json()
            .unwrap()
    }

    fn add_item(&self, name: &str) -> i64 {
        let response: Value = ureq::post(&self.url("/items"))
            .send_json(json!({ "name": name }))
            .expect("POST /items")
            .into_json()
            .unwrap();
        response["id"].as_i64().expect("an id")
    }

    /// `host:port` it listens on.
    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// SIGKILL, as in a crash: no stream is ended, nothing is cleaned up.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the example");
        self.child.wait().unwrap();
    }

    /// SIGINT, then a bounded wait for a clean exit.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let mut exit = None;
        assert!(
            wait_until(ARRIVES_WITHIN, || {
                exit = self.child.try_wait().unwrap();
                exit.is_some()
            }),
            "the example did not exit after SIGINT"
        );
        assert!(exit.unwrap().success(), "{exit:?}");
        let rest: Vec<String> = self.stdout.try_iter().collect();
        assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// chromedriver on a free port, killed on drop.
struct ChromeDriver {
    child: Child,
    base: String,
    agent: ureq::Agent,
}

impl ChromeDriver {
    fn start() -> ChromeDriver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = ChromeDriver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
        };
        assert!(
            wait_until(ARRIVES_WITHIN, || driver
                .agent
                .get(&format!("{}/status", driver.base))
                .call()
                .ok()
                .and_then(|r| r.into_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == json!(true))),
            "chromedriver did not become ready"
        );
        driver
    }

    /// A WebDriver command; returns its `value`, panics with the driver's message on error.
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let request = self.agent.request(method, &format!("{}{path}", self.base));
        let result = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        let response: Value = match result {
            Ok(response) => response.into_json().unwrap(),
            Err(ureq::Error::Status(code, response)) => {
                panic!(
                    "WebDriver {method} {path}: HTTP {code}: {}",
                    response.into_string().unwrap_or_default()
                )
            }
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        };
        response["value"].clone()
    }

    /// Opens a headless Chromium session with a fresh profile in `profile`.
    fn session(&self, profile: &Path) -> Session<'_> {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let value = self.command(
            "POST",
            "/session",
            Some(json!({
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
                    }
                }
            })),
        );
        let id = value["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        Session { driver: self, id }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A browser session; closed on drop.
struct Session<'a> {
    driver: &'a ChromeDriver,
    id: String,
}

impl Session<'_> {
    fn open(&self, url: &str) {
        self.driver.command(
            "POST",
            &format!("/session/{}/url", self.id),
            Some(json!({ "url": url })),
        );
    }

    /// Runs `script` (a function body) in the page and returns its result.
    fn eval(&self, script: &str) -> Value {
        self.driver.command(
            "POST",
            &format!("/session/{}/execute/sync", self.id),
            Some(json!({ "script": script, "args": [] })),
        )
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self
            .driver
            .agent
            .delete(&format!("{}/session/{}", self.driver.base, self.id))
            .call();
    }
}

#[test]
fn the_page_shows_rows_from_the_endpoint_and_from_another_connection_within_a_second() {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if !missing.is_empty() {
        common::prerequisite_missing(
            "the browser test",
            &format!(
                "{} not found (Debian's chromium and chromium-driver packages)",
                missing.join(" and ")
            ),
        );
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::init_logging();
    let tmp = TempDir::new();
    let db = tmp.db_path();
    let dashboard = Dashboard::start(&format!("sqlite://{}", db.display()));
    let driver = ChromeDriver::start();
    let profile = tmp.dir.join("chromium-profile");
    std::fs::create_dir_all(&profile).unwrap();
    let session = driver.session(&profile);

    session.open(&format!("{}/", dashboard.base));
    // The page says "live" once its subscriptions exist: from then on nothing is missed.
    let mut state = Value::Null;
    assert!(
        wait_until(ARRIVES_WITHIN, || {
            state = session.eval("return document.getElementById('status').dataset.state;");
            state == "live"
        }),
        "the page never went live (state {state})"
    );
    assert_eq!(dashboard.stats()["clients"], 1);

    // One row through the HTTP endpoint, one through a connection of our own.
    let started = Instant::now();
    let via_http = dashboard.add_item("from the endpoint");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute(
        "INSERT INTO items (name) VALUES (?1)",
        ["from another connection"],
    )
    .unwrap();
    let via_sql = conn.last_insert_rowid();

    let script = "return Array.from(document.querySelectorAll('#events li'))\
                  .map(li => [li.dataset.op, li.dataset.id, li.textContent]);";
    let mut rows = Value::Null;
    let shown = wait_until(SHOWS_WITHIN, || {
        rows = session.eval(script);
        let text = rows.to_string();
        text.contains("from the endpoint") && text.contains("from another connection")
    });
    let elapsed = started.elapsed();
    eprintln!("both rows shown {elapsed:?} after the first insert began");
    assert!(
        shown && elapsed <= SHOWS_WITHIN + Duration::from_millis(100),
        "the page did not show both rows within {SHOWS_WITHIN:?} ({elapsed:?}): {rows}"
    );
    // Newest first, each with its operation and id.
    assert_eq!(
        rows,
        json!([
            [
                "insert",
                via_sql.to_string(),
                format!("INSERT #{via_sql} from another connection")
            ],
            [
                "insert",
                via_http.to_string(),
                format!("INSERT #{via_http} from the endpoint")
            ],
        ])
    );

    // The dashboard's /metrics: Prometheus text with the notifier's counters and the
    // endpoint's connected browser.
    let metrics = ureq::get(&dashboard.url("/metrics"))
        .call()
        .expect("GET /metrics")
        .into_string()
        .unwrap();
    for line in [
        "sqlnotify_sse_clients 1",
        "sqlnotify_events_delivered_total{channel=",
    ] {
        assert!(
            metrics.contains(line),
            "{line:?} not in /metrics:\n{metrics}"
        );
    }

    // Updates and deletes show up too.
    conn.execute(
        "UPDATE items SET name = 'renamed' WHERE id = ?1",
        [via_http],
    )
    .unwrap();
    conn.execute("DELETE FROM items WHERE id = ?1", [via_sql])
        .unwrap();
    assert!(
        wait_until(ARRIVES_WITHIN, || {
            rows = session.eval(script);
            rows.as_array().is_some_and(|r| r.len() == 4)
        }),
        "{rows}"
    );
    assert_eq!(rows[0][0], "delete");
    assert_eq!(
        rows[1],
        json!([
            "update",
            via_http.to_string(),
            format!("UPDATE #{via_http} renamed")
        ])
    );

    // Leaving the page removes the browser's subscriptions.
    session.open("about:blank");
    assert!(
        wait_until(Duration::from_secs(30), || dashboard.stats()["clients"]
            == 0),
        "the closed page is still subscribed: {}",
        dashboard.stats()
    );
    drop(session);
    drop(driver);
    dashboard.stop();
}

/// Reads an SSE stream line by line on a thread of its own.
fn read_events(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
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

#[test]
fn a_client_that_stops_reading_does_not_hold_up_the_others() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = TempDir::new();
    let db = tmp.db_path();
    let dashboard = Dashboard::start(&format!("sqlite://{}", db.display()));

    // A client that subscribes and then never reads.
    let address = dashboard.base.trim_start_matches("http://").to_string();
    let mut stuck = TcpStream::connect(&address).unwrap();
    write!(
        stuck,
        "GET /events HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    // A client that reads everything.
    let reader = ureq::get(&dashboard.url("/events"))
        .call()
        .expect("GET /events")
        .into_reader();
    let lines = read_events(reader);
    // The stream starts with its `retry:` field once the client is subscribed.
    let ready = wait_until(ARRIVES_WITHIN, || {
        lines.try_iter().any(|l| l.starts_with("retry: "))
    });
    assert!(ready, "the reading client's stream never started");
    assert!(
        wait_until(ARRIVES_WITHIN, || dashboard.stats()["clients"] == 2),
        "{}",
        dashboard.stats()
    );

    // Far more than the stuck client's socket buffers, stream and subscription buffer hold.
    let rows = 30_000;
    let name = "x".repeat(500);
    {
        let mut conn = rusqlite::Connection::open(&db).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let tx = conn.transaction().unwrap();
        for _ in 0..rows {
            tx.execute("INSERT INTO items (name) VALUES (?1)", [&name])
                .unwrap();
        }
        tx.commit().unwrap();
        conn.execute("INSERT INTO items (name) VALUES ('sentinel')", [])
            .unwrap();
    }

    // The reading client gets the last row, in order, while the other one is stuck.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_id = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("the reading client stalled behind the stuck one");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let event: Value = serde_json::from_str(data).unwrap();
        let Some(id) = event["id"].as_i64() else {
            continue; // a lag event
        };
        assert!(id > last_id, "out of order: {id} after {last_id}");
        last_id = id;
        if event["columns"]["name"] == "sentinel" {
            break;
        }
    }
    assert_eq!(last_id, rows + 1);
    let stats = dashboard.stats();
    assert!(
        stats["dropped"].as_u64().unwrap() > 0,
        "the stuck client should have lost its oldest events: {stats}"
    );

    // The stuck client goes away: its subscriptions go with it.
    drop(stuck);
    assert!(
        wait_until(Duration::from_secs(30), || dashboard.stats()["clients"]
            == 1),
        "{}",
        dashboard.stats()
    );
    drop(lines);
    dashboard.stop();
}

/// The page's rows (`[id, name]`, in page order) and its log of changes (`[op, id, text]`,
/// newest first).
fn page_state(session: &Session<'_>) -> (Value, Value) {
    let state = session.eval(
        "return [Array.from(document.querySelectorAll('#rows tr'))\
                   .map(tr => [tr.dataset.id, tr.cells[1].textContent]),\
                 Array.from(document.querySelectorAll('#events li'))\
                   .map(li => [li.dataset.op, li.dataset.id, li.textContent])];",
    );
    (state[0].clone(), state[1].clone())
}

/// `[id, name]` as the page shows a row.
fn shown(rows: &[(i64, String)]) -> Value {
    Value::from(
        rows.iter()
            .map(|(id, name)| json!([id.to_string(), name]))
            .collect::<Vec<_>>(),
    )
}

#[test]
fn the_page_shows_the_rows_then_every_change_once_across_a_crash_restart_and_reload() {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if !missing.is_empty() {
        common::prerequisite_missing(
            "the browser test",
            &format!(
                "{} not found (Debian's chromium and chromium-driver packages)",
                missing.join(" and ")
            ),
        );
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::init_logging();
    let tmp = TempDir::new();
    let db = tmp.db_path();
    let url = format!("sqlite://{}", db.display());
    let dashboard = Dashboard::start(&url);
    let addr = dashboard.addr();
    let base = dashboard.base.clone();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let insert = |name: &str| -> (i64, String) {
        conn.execute("INSERT INTO items (name) VALUES (?1)", [name])
            .unwrap();
        (conn.last_insert_rowid(), name.to_string())
    };

    // Rows from before the page: shown as rows, not as changes.
    let mut rows = vec![insert("before 1"), insert("before 2")];
    let driver = ChromeDriver::start();
    let profile = tmp.dir.join("chromium-profile");
    std::fs::create_dir_all(&profile).unwrap();
    let session = driver.session(&profile);
    session.open(&format!("{base}/"));
    let live = || session.eval("return document.getElementById('status').dataset.state;") == "live";
    assert!(wait_until(ARRIVES_WITHIN, live), "the page never went live");
    let (shown_rows, changes) = page_state(&session);
    assert_eq!(shown_rows, shown(&rows));
    assert_eq!(changes, json!([]));

    // Changes while it is up: through the endpoint and through another connection.
    let mut changed = Vec::new();
    for name in ["live 1", "live 2"] {
        changed.push((dashboard.add_item(name), name.to_string()));
    }
    changed.push(insert("live 3"));
    let mut state = (Value::Null, Value::Null);
    assert!(
        wait_until(ARRIVES_WITHIN, || {
            state = page_state(&session);
            state.1.as_array().is_some_and(|c| c.len() == changed.len())
        }),
        "{state:?}"
    );

    // A crash mid-stream; rows written while the server is down.
    dashboard.kill();
    assert!(
        wait_until(ARRIVES_WITHIN, || !live()),
        "the page did not notice the server went away"
    );
    for name in ["while down 1", "while down 2", "while down 3"] {
        changed.push(insert(name));
    }

    // The same port and database again: the page reconnects by itself with Last-Event-ID
    // and gets what it missed from the journal; then live changes go on.
    let dashboard = Dashboard::start_at(&url, &addr);
    assert_eq!(dashboard.base, base);
    changed.push((dashboard.add_item("after restart"), "after restart".into()));
    rows.extend(changed.iter().cloned());
    let expected_changes = Value::from(
        changed
            .iter()
            .rev()
            .map(|(id, name)| json!(["insert", id.to_string(), format!("INSERT #{id} {name}")]))
            .collect::<Vec<_>>(),
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            state = page_state(&session);
            state.1.as_array().is_some_and(|c| c.len() >= changed.len())
        }),
        "the page did not catch up after the restart: {state:?}"
    );
    // Nothing more comes: no duplicate on its way.
    let settled = Instant::now() + Duration::from_millis(500);
    wait_until(Duration::from_millis(600), || {
        state = page_state(&session);
        Instant::now() > settled
    });
    assert_eq!(
        state.1, expected_changes,
        "every change exactly once, in order"
    );
    assert_eq!(state.0, shown(&rows), "every row exactly once");
    assert!(live(), "the page is not live again");

    // A reload shows every row, and no change yet.
    session.open(&format!("{base}/"));
    assert!(
        wait_until(ARRIVES_WITHIN, live),
        "the reloaded page never went live"
    );
    let (shown_rows, changes) = page_state(&session);
    assert_eq!(shown_rows, shown(&rows));
    assert_eq!(changes, json!([]));
    let last = insert("after reload");
    assert!(
        wait_until(ARRIVES_WITHIN, || {
            state = page_state(&session);
            state.1.as_array().is_some_and(|c| !c.is_empty())
        }),
        "{state:?}"
    );
    assert_eq!(
        state.1,
        json!([[
            "insert",
            last.0.to_string(),
            format!("INSERT #{} after reload", last.0)
        ]])
    );
    rows.push(last);
    assert_eq!(state.0, shown(&rows));

    drop(session);
    drop(driver);
    dashboard.stop();
}
