//! The server-sent-events endpoint (feature `web`) over real HTTP: an actix-web server on
//! 127.0.0.1:0 serving `sqlnotify::web::Sse` on a SQLite notifier, read by ureq (and, for the
//! client that never reads, a bare TCP socket). Events arrive framed; a grant cannot be
//! widened by query parameters; heartbeats arrive; slow clients are contained; a client that
//! resumes with `Last-Event-ID` gets every event after it once, or an explicit `reset` — on
//! SQLite, on PostgreSQL's durable and poll tiers and on MySQL / MariaDB, with writers
//! interleaving transactions
//! while the client drops and resumes again and again; and `Sse::shutdown` lets the server stop
//! gracefully at once.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpServer};
use common::sqlite_file::SqliteFile;
use common::{wait_until, ARRIVES_WITHIN};
use serde_json::Value;
use sqlnotify::web::{Denied, Grant, Param, ParamType, SlowClient, Sse, SseBuilder};
use sqlnotify::{Filter, Notifier, Operation, Subscription, Watch};
use tokio::sync::mpsc;

const SCHEMA: &str = "CREATE TABLE orders (id INTEGER PRIMARY KEY, owner_id INTEGER NOT NULL, \
                      status TEXT NOT NULL, note TEXT NOT NULL DEFAULT '', secret TEXT)";

/// An SSE frame as a client sees it.
#[derive(Debug, Default, Clone)]
struct Frame {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    comment: Option<String>,
}

impl Frame {
    fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().expect("data")).expect("JSON data")
    }

    /// The `orders.id` of a change event's frame.
    fn row(&self) -> i64 {
        self.json()["id"].as_i64().expect("an order id")
    }
}

enum Msg {
    Frame(Frame),
    End,
}

/// A streaming SSE client: ureq on a thread of its own, frames into a channel. Dropping it
/// closes the connection (the thread notices at the next frame; heartbeats make one come).
struct Client {
    rx: mpsc::UnboundedReceiver<Msg>,
}

/// Parses an SSE stream into frames until it ends or nobody listens any more.
fn read_frames(reader: impl Read, tx: mpsc::UnboundedSender<Msg>) {
    let mut frame = Frame::default();
    let mut any = false;
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        if line.is_empty() {
            if any && tx.send(Msg::Frame(std::mem::take(&mut frame))).is_err() {
                return;
            }
            any = false;
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((&line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value).to_string();
        any = true;
        match field {
            "" => frame.comment = Some(value),
            "id" => frame.id = Some(value),
            "event" => frame.event = Some(value),
            "data" => {
                frame.data = Some(match frame.data.take() {
                    Some(data) => data + "\n" + &value,
                    None => value,
                })
            }
            _ => any = frame.id.is_some() || frame.event.is_some() || frame.data.is_some(),
        }
    }
    let _ = tx.send(Msg::End);
}

/// Opens the stream; `Err((status, body))` when it is refused.
async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Client, (u16, String)> {
    let url = url.to_string();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let response = tokio::task::spawn_blocking(move || {
        let mut request = ureq::get(&url);
        for (name, value) in &headers {
            request = request.set(name, value);
        }
        match request.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => Err((code, r.into_string().unwrap())),
            Err(e) => panic!("GET {e}"),
        }
    })
    .await
    .unwrap()?;
    assert_eq!(response.content_type(), "text/event-stream");
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = response.into_reader();
    std::thread::spawn(move || read_frames(reader, tx));
    Ok(Client { rx })
}

impl Client {
    /// The next frame (comments and `retry:` included), or `None` when the stream ended.
    async fn next_frame(&mut self) -> Option<Frame> {
        match tokio::time::timeout(ARRIVES_WITHIN, self.rx.recv()).await {
            Ok(Some(Msg::Frame(f))) => Some(f),
            Ok(Some(Msg::End)) | Ok(None) => None,
            Err(_) => panic!("no frame within {ARRIVES_WITHIN:?}"),
        }
    }

    /// The next frame that is an event (not a comment, not `retry:` alone).
    async fn next_event(&mut self) -> Frame {
        loop {
            let frame = self.next_frame().await.expect("the stream ended");
            if frame.event.is_some() || frame.data.is_some() {
                return frame;
            }
        }
    }

    /// Asserts that no event arrives within `wait` (comments may).
    async fn assert_no_event_within(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(msg) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            match msg {
                Some(Msg::Frame(f)) if f.event.is_none() && f.data.is_none() => {}
                Some(Msg::Frame(f)) => panic!("unexpected event {f:?}"),
                _ => panic!("the stream ended"),
            }
        }
    }

    /// Waits for the end of the stream, skipping what comes before it.
    async fn ends(&mut self) -> bool {
        tokio::time::timeout(ARRIVES_WITHIN, async {
            loop {
                match self.rx.recv().await {
                    Some(Msg::Frame(_)) => {}
                    _ => return,
                }
            }
        })
        .await
        .is_ok()
    }
}

/// [`Served`] on a SQLite file of its own.
struct Server {
    served: Served,
    db: SqliteFile,
}

impl std::ops::Deref for Server {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.served
    }
}

/// A notifier on a database of a test's own and the endpoint serving it (see
/// [`serve_postgres`], [`serve_mysql`]).
struct Served {
    notifier: Notifier,
    sse: Sse,
    url: String,
    handle: ServerHandle,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    /// Shuts the endpoint and its server down, then stops the notifier.
    async fn stop(self) {
        self.sse.shutdown();
        self.handle.stop(true).await;
        self.server.await.unwrap().unwrap();
        self.notifier.stop().await.unwrap();
    }
}

/// Users see only their own orders: the `x-user` header names the user (no header: 401).
fn grant_own_orders(req: &actix_web::HttpRequest) -> Result<Grant, Denied> {
    let user: i64 = req
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .ok_or_else(|| Denied::unauthorized("who are you?"))?;
    Ok(Grant::new().subscription(
        Subscription::new("orders", Operation::Insert).filter(Filter::eq("owner_id", user)),
    ))
}

async fn serve(
    notifier: impl FnOnce(sqlnotify::NotifierBuilder) -> sqlnotify::NotifierBuilder,
    endpoint: impl FnOnce(SseBuilder) -> SseBuilder,
) -> Server {
    serve_with(notifier, |notifier| {
        endpoint(
            Sse::builder(notifier, grant_own_orders)
                .param("status", Param::eq("status", ParamType::Text))
                .param("secret", Param::eq("secret", ParamType::Text))
                .heartbeat(Duration::from_millis(200)),
        )
    })
    .await
}

/// A SQLite notifier watching `orders` inserts, and the endpoint `endpoint` builds on it.
async fn serve_with(
    notifier: impl FnOnce(sqlnotify::NotifierBuilder) -> sqlnotify::NotifierBuilder,
    endpoint: impl FnOnce(Notifier) -> SseBuilder,
) -> Server {
    let db = SqliteFile::new(SCHEMA);
    let notifier = notifier(Notifier::builder(db.url()).watch(
        Watch::new("orders", Operation::Insert).extra_columns(["owner_id", "status", "note"]),
    ))
    .start()
    .await
    .unwrap();
    let sse = endpoint(notifier.clone()).build();
    let (url, handle, server) = listen(&sse);
    let served = Served {
        notifier,
        sse,
        url,
        handle,
        server,
    };
    Server { served, db }
}

/// An actix-web server on 127.0.0.1:0 serving `sse` at `/events`: its URL, its handle, and
/// the task it runs in.
fn listen(
    sse: &Sse,
) -> (
    String,
    ServerHandle,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let endpoint = sse.clone();
    let server = HttpServer::new(move || App::new().route("/events", endpoint.route()))
        .workers(2)
        .shutdown_timeout(60)
        .disable_signals()
        .bind(("127.0.0.1", 0))
        .unwrap();
    let url = format!("http://{}/events", server.addrs()[0]);
    let server = server.run();
    (url, server.handle(), tokio::spawn(server))
}

impl Server {
    fn insert(&self, id: i64, owner: i64, status: &str) {
        self.db.exec(&format!(
            "INSERT INTO orders (id, owner_id, status) VALUES ({id}, {owner}, '{status}')"
        ));
    }

    async fn stop(self) {
        self.served.stop().await;
    }
}

#[actix_rt::test]
async fn events_arrive_framed_with_their_position_table_and_operation() {
    let s = serve(|n| n, |e| e).await;
    let mut client = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    let first = client.next_frame().await.unwrap();
    assert!(
        first.event.is_none() && first.data.is_none(),
        "retry: first, {first:?}"
    );
    s.insert(10, 1, "new");
    let frame = client.next_event().await;
    assert_eq!(frame.event.as_deref(), Some("orders/insert"));
    let record = frame.json();
    assert_eq!(record["table"], "orders");
    assert_eq!(record["operation"], "insert");
    assert_eq!(record["id"], 10);
    assert_eq!(record["columns"]["owner_id"], 1);
    assert_eq!(
        frame.id.as_deref(),
        Some(record["sequence"].to_string().as_str()),
        "id: is the event's journal position"
    );
    // A value with line breaks arrives whole.
    s.db.exec(
        "INSERT INTO orders (id, owner_id, status, note) VALUES (11, 1, 'new', 'a' || char(10) || 'b' || char(13, 10) || 'c')",
    );
    let frame = client.next_event().await;
    assert_eq!(frame.json()["columns"]["note"], "a\nb\r\nc");
    assert_eq!(s.sse.stats().clients, 1);
    drop(client);
    s.stop().await;
}

#[actix_rt::test]
async fn a_client_gets_only_its_grant_and_query_parameters_only_narrow_it() {
    let s = serve(|n| n, |e| e).await;
    // No session: the hook refuses.
    let (status, body) = connect(&s.url, &[]).await.err().unwrap();
    assert_eq!((status, body.as_str()), (401, "who are you?"));
    // A parameter that is not on the allow-list, e.g. one that names the grant's own column.
    let widen = format!("{}?owner_id=2", s.url);
    let (status, body) = connect(&widen, &[("x-user", "1")]).await.err().unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"owner_id\" is not allowed"), "{body}");
    // An allowed parameter on a column the watch does not carry.
    let uncarried = format!("{}?secret=x", s.url);
    let (status, body) = connect(&uncarried, &[("x-user", "1")]).await.err().unwrap();
    assert_eq!(status, 400, "{body}");

    let mut all = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    let paid = format!("{}?status=paid", s.url);
    let mut only_paid = connect(&paid, &[("x-user", "1")]).await.unwrap();
    // A second status parameter narrows further (AND), never widens.
    let both = format!("{}?status=paid&status=new", s.url);
    let mut nothing = connect(&both, &[("x-user", "1")]).await.unwrap();
    s.insert(1, 2, "paid"); // someone else's
    s.insert(2, 1, "new");
    s.insert(3, 1, "paid");
    assert_eq!(all.next_event().await.row(), 2);
    assert_eq!(all.next_event().await.row(), 3);
    assert_eq!(only_paid.next_event().await.row(), 3);
    for client in [&mut all, &mut only_paid, &mut nothing] {
        client
            .assert_no_event_within(Duration::from_millis(300))
            .await;
    }
    assert_eq!(s.sse.stats().refused, 3);
    drop((all, only_paid, nothing));
    s.stop().await;
}

#[actix_rt::test]
async fn a_client_the_hook_refuses_learns_nothing_of_the_allowed_parameters() {
    let s = serve(|n| n, |e| e).await;
    for query in ["?owner_id=2", "?status=paid&nope=1", "?%zz"] {
        let url = format!("{}{query}", s.url);
        let (status, body) = connect(&url, &[]).await.err().unwrap();
        assert_eq!(
            (status, body.as_str()),
            (401, "who are you?"),
            "{query}: the hook answers first"
        );
    }
    // Authorized, the same parameter is a 400 that names the allowed ones.
    let url = format!("{}?owner_id=2", s.url);
    let (status, body) = connect(&url, &[("x-user", "1")]).await.err().unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("allowed: [\"status\", \"secret\"]"), "{body}");
    s.stop().await;
}

#[actix_rt::test]
async fn an_async_hook_runs_once_per_connection_not_once_per_event() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let s = serve_with(
        |n| n,
        move |notifier| {
            Sse::builder_async(notifier, move |req| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    // A session store that must be awaited.
                    tokio::task::yield_now().await;
                    let user = match req.headers().get("x-session").map(|v| v.as_bytes()) {
                        Some(b"token-of-7") => 7,
                        _ => return Err(Denied::unauthorized("unknown session")),
                    };
                    Ok(Grant::new().subscription(
                        Subscription::new("orders", Operation::Insert)
                            .filter(Filter::eq("owner_id", user)),
                    ))
                }
            })
        },
    )
    .await;
    let (status, _) = connect(&s.url, &[("x-session", "forged")])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
    let mut client = connect(&s.url, &[("x-session", "token-of-7")])
        .await
        .unwrap();
    for id in 1..=20 {
        s.insert(id, if id % 2 == 0 { 7 } else { 8 }, "new");
    }
    for id in (2..=20).step_by(2) {
        assert_eq!(client.next_event().await.row(), id);
    }
    client
        .assert_no_event_within(Duration::from_millis(300))
        .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "once per connection");
    drop(client);
    s.stop().await;
}

#[actix_rt::test]
async fn an_idle_stream_gets_heartbeats() {
    let s = serve(|n| n, |e| e.heartbeat(Duration::from_millis(100))).await;
    let mut client = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    let started = Instant::now();
    let mut heartbeats = 0;
    while heartbeats < 2 {
        let frame = client.next_frame().await.unwrap();
        assert!(frame.data.is_none(), "no event expected: {frame:?}");
        heartbeats += usize::from(frame.comment.is_some());
    }
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert!(s.sse.stats().heartbeats >= 2);
    drop(client);
    s.stop().await;
}

#[actix_rt::test]
async fn a_client_that_resumes_gets_every_event_after_its_last_id_once_even_under_writes() {
    let s = serve(|n| n, |e| e).await;
    let mut client = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    for id in 1..=3 {
        s.insert(id, 1, "new");
        s.insert(1000 + id, 2, "new"); // someone else's, in between
    }
    let mut last = None;
    for id in 1..=3 {
        let frame = client.next_event().await;
        assert_eq!(frame.row(), id);
        last = frame.id;
    }
    let last = last.unwrap();
    drop(client);
    assert!(wait_until(ARRIVES_WITHIN, || async { s.sse.clients() == 0 }).await);

    // Written while the client is away, and while it comes back.
    for id in 4..=50 {
        s.insert(id, 1, "new");
    }
    let path = s.db.path.clone();
    let writer = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        for id in 51..=300 {
            conn.execute(
                "INSERT INTO orders (id, owner_id, status) VALUES (?1, 1, 'new')",
                [id],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO orders (id, owner_id, status) VALUES (?1, 2, 'new')",
                [1000 + id],
            )
            .unwrap();
        }
    });
    let mut client = connect(&s.url, &[("x-user", "1"), ("Last-Event-ID", &last)])
        .await
        .unwrap();
    let mut rows = Vec::new();
    let mut ids = Vec::new();
    while rows.last() != Some(&300) {
        let frame = client.next_event().await;
        assert_eq!(frame.event.as_deref(), Some("orders/insert"), "{frame:?}");
        rows.push(frame.row());
        ids.push(frame.id.unwrap().parse::<i64>().unwrap());
    }
    writer.join().unwrap();
    assert_eq!(
        rows,
        (4..=300).collect::<Vec<_>>(),
        "no gap, no duplicate, in order"
    );
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "positions increase");
    assert!(s.sse.stats().replayed > 0, "{:?}", s.sse.stats());
    s.insert(301, 1, "new");
    assert_eq!(client.next_event().await.row(), 301);
    client
        .assert_no_event_within(Duration::from_millis(300))
        .await;
    drop(client);
    s.stop().await;
}

#[actix_rt::test]
async fn a_last_event_id_query_parameter_resumes_where_the_header_is_absent() {
    let s = serve(|n| n, |e| e).await;
    let mut client = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    s.insert(1, 1, "new");
    s.insert(2, 1, "new");
    let first = client.next_event().await;
    let second = client.next_event().await;
    assert_eq!((first.row(), second.row()), (1, 2));
    let (first, second) = (first.id.unwrap(), second.id.unwrap());
    drop(client);
    s.insert(3, 1, "new");

    // No header: the query parameter is the position; it is no filter, and a filter
    // parameter beside it still narrows.
    let url = format!("{}?last_event_id={first}&status=new", s.url);
    let mut client = connect(&url, &[("x-user", "1")]).await.unwrap();
    assert_eq!(client.next_event().await.row(), 2);
    assert_eq!(client.next_event().await.row(), 3);
    client
        .assert_no_event_within(Duration::from_millis(300))
        .await;
    drop(client);

    // The header wins over the parameter (a browser's reconnect keeps the URL).
    let url = format!("{}?last_event_id={first}", s.url);
    let mut client = connect(&url, &[("x-user", "1"), ("Last-Event-ID", &second)])
        .await
        .unwrap();
    assert_eq!(client.next_event().await.row(), 3);
    client
        .assert_no_event_within(Duration::from_millis(300))
        .await;
    drop(client);

    // A value that is not a position: a reset, as with the header.
    let url = format!("{}?last_event_id=abc", s.url);
    let mut client = connect(&url, &[("x-user", "1")]).await.unwrap();
    assert_eq!(client.next_event().await.event.as_deref(), Some("reset"));
    drop(client);
    assert_eq!(s.sse.stats().resets, 1);
    s.stop().await;
}

/// A resume through a long run of journal pages with nothing of the client's on them (here
/// one row per page, 20,000 of someone else's rows) goes page after page in a loop: it once
/// went one nested call deeper per page, and a long enough run overflowed the worker's stack
/// and took the whole server down.
#[actix_rt::test]
async fn a_resume_through_thousands_of_pages_of_other_clients_rows_reaches_its_own() {
    let s = serve(|n| n, |e| e.replay_page(1)).await;
    let mut client = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    s.insert(1, 1, "new");
    let first = client.next_event().await;
    assert_eq!(first.row(), 1);
    drop(client);
    s.db.exec(
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 20000) \
         INSERT INTO orders (id, owner_id, status) SELECT 100000 + x, 2, 'new' FROM n",
    );
    s.insert(2, 1, "new");
    let last = first.id.unwrap();
    let mut client = connect(&s.url, &[("x-user", "1"), ("Last-Event-ID", &last)])
        .await
        .unwrap();
    let frame = client.next_event().await;
    assert_eq!(frame.row(), 2, "{frame:?}");
    assert!(s.sse.stats().replayed >= 1, "{:?}", s.sse.stats());
    client
        .assert_no_event_within(Duration::from_millis(300))
        .await;
    drop(client);
    s.stop().await;
}

#[actix_rt::test]
async fn a_position_that_cannot_be_resumed_gets_an_explicit_reset() {
    let s = serve(
        |n| {
            n.retention(Duration::ZERO)
                .purge_interval(Duration::from_millis(50))
        },
        |e| e,
    )
    .await;
    // Not one of ours, and one from the future (another database).
    for (bad, head) in [("abc", "0"), ("999999", "1")] {
        let mut client = connect(&s.url, &[("x-user", "1"), ("Last-Event-ID", bad)])
            .await
            .unwrap();
        let reset = client.next_event().await;
        assert_eq!(reset.event.as_deref(), Some("reset"), "{bad}: {reset:?}");
        // Its id is the journal's last id: a client that drops before its next event
        // resumes from there, not from the position that was reset.
        assert_eq!(reset.id.as_deref(), Some(head), "{bad}");
        // Live events follow.
        s.insert(i64::from(bad == "abc") + 1, 1, "new");
        assert_eq!(
            client.next_event().await.event.as_deref(),
            Some("orders/insert")
        );
    }
    let mut client = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    s.insert(3, 1, "new");
    let last = client.next_event().await.id.unwrap();
    drop(client);
    s.insert(4, 1, "new");
    // Retention trims what the client has not seen.
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            rusqlite::Connection::open(&s.db.path)
                .unwrap()
                .query_row("SELECT count(*) FROM sqlnotify_journal", [], |r| {
                    r.get::<_, i64>(0)
                })
                .unwrap()
                == 0
        })
        .await
    );
    let mut client = connect(&s.url, &[("x-user", "1"), ("Last-Event-ID", &last)])
        .await
        .unwrap();
    let reset = client.next_event().await;
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    assert!(reset.json()["reason"]
        .as_str()
        .unwrap()
        .contains("retention"));
    assert_eq!(s.sse.stats().resets, 3);
    drop(client);
    s.stop().await;
}

/// A registered consumer's unread row keeps the journal's oldest id low while the purge
/// deletes the rows of other channels after it: a client behind those rows gets a `reset`, not
/// a replay that skips them in silence. (Before, the replay judged by the oldest row left —
/// the stopped consumer's row 1 — that nothing after the client's position was gone, and the
/// client never got the purged rows, nor a reset.)
#[actix_rt::test]
async fn a_resume_behind_rows_purged_around_a_consumers_unread_row_gets_a_reset() {
    let s = serve(
        |n| {
            n.retention(Duration::from_secs(1))
                .purge_interval(Duration::from_millis(50))
        },
        |e| e,
    )
    .await;
    // Consumer `billing` reads invoices and is stopped: its unread row (journal id 1) stays.
    s.db.exec("CREATE TABLE invoices (id INTEGER PRIMARY KEY)");
    let billing = Notifier::builder(s.db.url())
        .watch(Watch::new("invoices", Operation::Insert))
        .consumer("billing")
        .start()
        .await
        .unwrap();
    billing.stop().await.unwrap();
    s.db.exec("INSERT INTO invoices (id) VALUES (1)");
    let journal = |sql: &'static str| {
        let path = s.db.path.clone();
        async move {
            rusqlite::Connection::open(path)
                .unwrap()
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .unwrap()
        }
    };
    let mut client = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    s.insert(1, 1, "new");
    let last = client.next_event().await.id.expect("an event id");
    assert_eq!(last, "2");
    drop(client);
    // The browser is away while its rows are written and purged around billing's.
    for id in 2..=20 {
        s.insert(id, 1, "new");
    }
    assert!(
        wait_until(Duration::from_secs(60), || async {
            journal("SELECT count(*) FROM sqlnotify_journal").await == 1
        })
        .await,
        "the purge deletes every orders row"
    );
    assert_eq!(journal("SELECT min(id) FROM sqlnotify_journal").await, 1);
    let mut client = connect(&s.url, &[("x-user", "1"), ("Last-Event-ID", &last)])
        .await
        .unwrap();
    // A live row after the resume: without a reset it would be the first event.
    s.insert(21, 1, "new");
    let reset = client.next_event().await;
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    assert!(reset.json()["reason"]
        .as_str()
        .unwrap()
        .contains("retention"));
    assert_eq!(client.next_event().await.row(), 21);
    drop(client);
    s.stop().await;
}

/// A stream that starts live names where the journal stood in its first frame (an `id:`
/// alone): a browser that drops before its first event — it has no event's id to send back —
/// resumes from there. What was committed while it was away arrives; nothing older does.
/// (Before, it reconnected with no `Last-Event-ID`, and those rows were lost silently.)
#[actix_rt::test]
async fn a_client_that_drops_before_its_first_event_resumes_from_where_its_stream_started() {
    let s = serve(|n| n, |e| e).await;
    s.insert(1, 1, "before the stream");
    let mut client = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    let first = client.next_frame().await.unwrap();
    assert!(first.event.is_none() && first.data.is_none(), "{first:?}");
    let head = first
        .id
        .expect("the first frame names where the stream starts");
    assert_eq!(head, "1", "the journal's last id");
    drop(client);
    s.insert(2, 1, "while away");
    s.insert(3, 1, "while away");
    let mut client = connect(&s.url, &[("x-user", "1"), ("Last-Event-ID", &head)])
        .await
        .unwrap();
    assert_eq!(client.next_event().await.row(), 2);
    assert_eq!(client.next_event().await.row(), 3);
    s.insert(4, 1, "live");
    assert_eq!(client.next_event().await.row(), 4);
    assert_eq!(s.sse.stats().resets, 0);
    drop(client);
    s.stop().await;
}

/// Inserts `n` orders of user 1 with a 16 KB note each: more than socket buffers hold.
fn flood(s: &Server, n: i64) {
    let mut conn = rusqlite::Connection::open(&s.db.path).unwrap();
    let tx = conn.transaction().unwrap();
    for id in 1..=n {
        tx.execute(
            "INSERT INTO orders (id, owner_id, status, note) VALUES (?1, 1, 'new', printf('%.16384c', 'x'))",
            [id],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

/// A client that sends its request and never reads a byte.
fn stalled_client(url: &str) -> TcpStream {
    let address = url.trim_start_matches("http://").split('/').next().unwrap();
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET /events HTTP/1.1\r\nHost: {address}\r\nx-user: 1\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    stream
}

/// A flood that a stalled client (user 1) cannot take: it is contained (its waiting events
/// stay within its buffer), and another client (user 2) gets its events meanwhile.
async fn contained(s: &Server, buffer: u64) -> TcpStream {
    let stalled = stalled_client(&s.url);
    let mut other = connect(&s.url, &[("x-user", "2")]).await.unwrap();
    assert!(wait_until(ARRIVES_WITHIN, || async { s.sse.clients() == 2 }).await);
    flood(s, 1500);
    s.insert(10_000, 2, "new");
    assert_eq!(other.next_event().await.row(), 10_000);
    let max_queued = std::cell::Cell::new(0);
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            let queued = s.notifier.stats().await.unwrap().queued;
            max_queued.set(max_queued.get().max(queued));
            s.sse.stats().lost > 0
        })
        .await,
        "{:?}",
        s.sse.stats()
    );
    assert!(
        max_queued.get() <= buffer,
        "the stalled client's waiting events stay within its buffer: {}",
        max_queued.get()
    );
    let stats = s.notifier.stats().await.unwrap();
    assert!(stats.queued <= buffer, "{stats:?}");
    drop(other);
    stalled
}

/// The SSE frames of a raw HTTP/1.1 response read to its end (chunked body).
fn frames_of_raw_response(raw: &[u8]) -> Vec<Frame> {
    let start = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers")
        + 4;
    let (mut rest, mut body) = (&raw[start..], Vec::new());
    while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..end]).unwrap(), 16).unwrap();
        if size == 0 || rest.len() < end + 2 + size {
            break;
        }
        body.extend_from_slice(&rest[end + 2..end + 2 + size]);
        rest = &rest[end + 2 + size + 2..];
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    read_frames(&body[..], tx);
    std::iter::from_fn(|| match rx.try_recv() {
        Ok(Msg::Frame(f)) => Some(f),
        _ => None,
    })
    .collect()
}

#[actix_rt::test]
async fn a_stalled_client_is_disconnected_holds_up_nobody_and_resumes_without_a_gap() {
    let s = serve(|n| n, |e| e.slow_client(SlowClient::Disconnect).buffer(8)).await;
    let mut stalled = contained(&s, 8).await;
    assert_eq!(s.sse.stats().slow_disconnects, 1);
    // Its stream ends: what was sent before the end, then EOF.
    stalled.set_read_timeout(Some(ARRIVES_WITHIN)).unwrap();
    let mut raw = Vec::new();
    stalled.read_to_end(&mut raw).unwrap();
    assert!(wait_until(ARRIVES_WITHIN, || async { s.sse.clients() == 0 }).await);
    let got: Vec<Frame> = frames_of_raw_response(&raw)
        .into_iter()
        .filter(|f| f.data.is_some())
        .collect();
    let rows: Vec<i64> = got.iter().map(Frame::row).collect();
    assert!(rows.len() < 1500, "it was cut off: {}", rows.len());
    assert_eq!(
        rows,
        (1..=rows.len() as i64).collect::<Vec<_>>(),
        "in order, no gap"
    );

    // It comes back with the last id it got, and gets the rest from the journal.
    let last = got
        .last()
        .and_then(|f| f.id.clone())
        .unwrap_or_else(|| "0".into());
    let mut client = connect(&s.url, &[("x-user", "1"), ("Last-Event-ID", &last)])
        .await
        .unwrap();
    for id in rows.len() as i64 + 1..=1500 {
        assert_eq!(client.next_event().await.row(), id);
    }
    client
        .assert_no_event_within(Duration::from_millis(300))
        .await;
    drop(client);
    s.stop().await;
}

#[actix_rt::test]
async fn a_stalled_client_under_drop_oldest_is_told_it_lagged() {
    let s = serve(|n| n, |e| e.slow_client(SlowClient::DropOldest).buffer(8)).await;
    let stalled = contained(&s, 8).await;
    assert!(s.sse.stats().lag_notices > 0);
    // When it finally reads: a lag event before the events that follow the loss.
    stalled.set_read_timeout(Some(ARRIVES_WITHIN)).unwrap();
    let mut lines = BufReader::new(stalled).lines();
    let (mut lag, mut after_lag) = (None, 0);
    while let Some(Ok(line)) = lines.next() {
        if line == "event: lag" {
            let data = lines.next().unwrap().unwrap();
            lag = Some(data);
        } else if lag.is_some() && line == "event: orders/insert" {
            after_lag += 1;
            if after_lag == 1 {
                break;
            }
        }
    }
    let lag = lag.expect("an event: lag");
    let dropped: Value = serde_json::from_str(lag.strip_prefix("data: ").unwrap()).unwrap();
    assert!(dropped["dropped"].as_u64().unwrap() > 0, "{lag}");
    s.stop().await;
}

/// A client that sends its request and never reads a byte, on a socket whose receive buffer
/// is as small as the kernel allows: once it and the server's socket are full, actix-web stops
/// polling the client's stream (it polls a response body only while it can write).
async fn stuck_client(url: &str, user: i64) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = url.trim_start_matches("http://").split('/').next().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    let mut stream = socket.connect(address.parse().unwrap()).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /events HTTP/1.1\r\nHost: {address}\r\nx-user: {user}\r\nAccept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

/// Inserts `count` orders of `owner` from `first` on in one transaction, each with a note of
/// `note` bytes.
fn insert_orders(s: &Server, owner: i64, first: i64, count: i64, note: usize) {
    let mut conn = rusqlite::Connection::open(&s.db.path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let tx = conn.transaction().unwrap();
    for id in first..first + count {
        tx.execute(
            "INSERT INTO orders (id, owner_id, status, note) VALUES (?1, ?2, 'new', printf('%.*c', ?3, 'x'))",
            rusqlite::params![id, owner, note as i64],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

/// The next change event of `client` within `limit` (heartbeats skipped), or `None`.
async fn event_within(client: &mut Client, limit: Duration) -> Option<Frame> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, client.rx.recv()).await {
            Ok(Some(Msg::Frame(f))) if f.event.is_some() || f.data.is_some() => return Some(f),
            Ok(Some(Msg::Frame(_))) => {}
            Ok(_) => panic!("the stream ended"),
            Err(_) => return None,
        }
    }
}

/// Clients that stop reading altogether: actix-web no longer polls their streams, so only the
/// registry can see them fall behind. Their waiting events must not keep the in-flight budget
/// (1,024 here; five clients' buffers of 256 would pass it) from the other subscribers.
#[actix_rt::test]
async fn clients_that_never_read_are_disconnected_and_never_stall_the_notifier() {
    const STUCK: i64 = 5;
    let s = serve(
        |n| n.max_in_flight(1024),
        |e| e.slow_client(SlowClient::Disconnect),
    )
    .await;
    // Users 101..=105 never read; each gets rows of its own, so no two share an event.
    let mut stuck = Vec::new();
    for user in 101..101 + STUCK {
        stuck.push(stuck_client(&s.url, user).await);
    }
    let mut reader = connect(&s.url, &[("x-user", "2")]).await.unwrap();
    let (_, plain) = s
        .notifier
        .subscribe_channel(
            Subscription::new("orders", Operation::Insert).filter(Filter::eq("owner_id", 3)),
        )
        .await
        .unwrap();
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            s.sse.clients() == STUCK as u64 + 1
        })
        .await
    );
    let mut next_id = 1;
    for round in 1.. {
        // Rounds of 32 rows of 8 KB per stuck client: each round fits in a client's buffer
        // (256) while the server still writes to it; once actix-web stops polling the
        // stream, its rows pile up in the registry until 5 × 256 would pass the budget.
        for user in 101..101 + STUCK {
            insert_orders(&s, user, next_id, 32, 8 << 10);
            next_id += 32;
        }
        // Everyone else still gets their rows.
        s.insert(next_id, 2, "new");
        let got = event_within(&mut reader, ARRIVES_WITHIN).await;
        assert_eq!(
            got.map(|f| f.row()),
            Some(next_id),
            "round {round}: the reading client's row did not arrive: {:?} {:?}",
            s.sse.stats(),
            s.notifier.stats().await.unwrap()
        );
        s.insert(next_id + 1, 3, "new");
        let got = std::cell::Cell::new(None);
        wait_until(ARRIVES_WITHIN, || async {
            if let Ok(event) = plain.try_recv() {
                got.set(event.id().as_i64());
            }
            got.get().is_some()
        })
        .await;
        assert_eq!(
            got.get(),
            Some(next_id + 1),
            "round {round}: the plain subscription's row did not arrive"
        );
        next_id += 2;
        if s.sse.stats().slow_disconnects == STUCK as u64 {
            break;
        }
        assert!(round < 100, "never cut off: {:?}", s.sse.stats());
    }
    // Cut off: nothing waits for them any more, and their rows are nobody's now.
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            let stats = s.notifier.stats().await.unwrap();
            stats.queued == 0 && stats.subscriptions == 2
        })
        .await,
        "{:?}",
        s.notifier.stats().await.unwrap()
    );
    let stats = s.sse.stats();
    assert!(stats.lost > 0, "{stats:?}");
    // Their connections end once they go.
    drop(stuck);
    assert!(wait_until(ARRIVES_WITHIN, || async { s.sse.clients() == 1 }).await);
    drop(reader);
    s.stop().await;
}

#[actix_rt::test]
async fn shutdown_ends_every_stream_and_the_server_stops_at_once() {
    let s = serve(|n| n, |e| e.heartbeat(Duration::from_secs(60))).await;
    let mut a = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    let mut b = connect(&s.url, &[("x-user", "2")]).await.unwrap();
    assert!(wait_until(ARRIVES_WITHIN, || async { s.sse.clients() == 2 }).await);
    let started = Instant::now();
    s.sse.shutdown();
    assert!(a.ends().await && b.ends().await);
    // A new client is refused meanwhile.
    let (status, _) = connect(&s.url, &[("x-user", "1")]).await.err().unwrap();
    assert_eq!(status, 503);
    s.served.handle.stop(true).await;
    s.served.server.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the graceful stop did not wait for the streams (its timeout is 60 s): {:?}",
        started.elapsed()
    );
    assert_eq!(s.served.sse.clients(), 0);
    s.served.notifier.stop().await.unwrap();
}

/// A PostgreSQL notifier watching `orders` inserts on `tier` (built further by `notifier`),
/// and the endpoint on it.
async fn serve_postgres(
    db: &common::TestDb,
    tier: sqlnotify::Tier,
    notifier: impl FnOnce(sqlnotify::NotifierBuilder) -> sqlnotify::NotifierBuilder,
) -> Served {
    serve_postgres_with(db, tier, notifier, |e| e).await
}

/// [`serve_postgres`], the endpoint built further by `endpoint`.
async fn serve_postgres_with(
    db: &common::TestDb,
    tier: sqlnotify::Tier,
    notifier: impl FnOnce(sqlnotify::NotifierBuilder) -> sqlnotify::NotifierBuilder,
    endpoint: impl FnOnce(SseBuilder) -> SseBuilder,
) -> Served {
    db.exec(SCHEMA).await;
    let notifier = notifier(
        Notifier::builder(&db.url).watch(
            Watch::new("orders", Operation::Insert)
                .extra_columns(["owner_id", "status"])
                .tier(tier),
        ),
    )
    .start()
    .await
    .unwrap();
    let sse = endpoint(
        Sse::builder(notifier.clone(), grant_own_orders).heartbeat(Duration::from_millis(200)),
    )
    .build();
    let (url, handle, server) = listen(&sse);
    Served {
        notifier,
        sse,
        url,
        handle,
        server,
    }
}

/// A small deterministic generator (xorshift): random enough to interleave, and repeatable.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// `received` holds every order of `committed` once, none twice, with no reset and some from
/// the journal. Returns the endpoint's stats.
fn assert_every_committed_once(
    received: &[i64],
    committed: &std::sync::Mutex<std::collections::BTreeSet<i64>>,
    sse: &Sse,
) -> sqlnotify::web::SseStats {
    let committed: Vec<i64> = committed.lock().unwrap().iter().copied().collect();
    let mut sorted = received.to_vec();
    sorted.sort_unstable();
    let duplicates: Vec<_> = sorted.windows(2).filter(|w| w[0] == w[1]).collect();
    assert!(duplicates.is_empty(), "duplicates: {duplicates:?}");
    assert_eq!(sorted, committed, "every committed order of user 1, once");
    let stats = sse.stats();
    assert_eq!(stats.resets, 0, "{stats:?}");
    assert!(stats.replayed > 0, "{stats:?}");
    stats
}

/// User 1's client reads a few events, drops the connection and resumes with its
/// `Last-Event-ID`, again and again (`first` is its first connection, live from before the
/// writes), until the `writers` are done and it got as many events as `committed` holds.
/// Returns the orders it got, in order, and how many connections it took.
async fn resume_while_writing(
    url: &str,
    mut first: Option<Client>,
    writers: &[tokio::task::JoinHandle<()>],
    committed: &std::sync::Mutex<std::collections::BTreeSet<i64>>,
) -> (Vec<i64>, usize) {
    let mut rng = Rng(42);
    let (mut received, mut last, mut connections) = (Vec::new(), None::<String>, 0);
    let committed_count = || committed.lock().unwrap().len();
    loop {
        // Something to read: a commit not received yet (or the writers are done).
        let writing = || writers.iter().any(|w| !w.is_finished());
        assert!(
            wait_until(ARRIVES_WITHIN, || async {
                committed_count() > received.len() || !writing()
            })
            .await
        );
        let done = !writing();
        let mut headers = vec![("x-user", "1")];
        if let Some(last) = &last {
            headers.push(("Last-Event-ID", last.as_str()));
        }
        let mut client = match first.take() {
            Some(client) => client,
            None => connect(url, &headers).await.unwrap(),
        };
        connections += 1;
        // A few events, then the connection drops; once the writers are done, everything.
        let take = if done {
            usize::MAX
        } else {
            1 + rng.below(25) as usize
        };
        for _ in 0..take {
            // Only what has surely committed is waited for.
            if received.len() >= committed_count() {
                break;
            }
            let Ok(frame) = tokio::time::timeout(ARRIVES_WITHIN, async {
                loop {
                    match client.next_frame().await {
                        Some(f) if f.event.is_some() || f.data.is_some() => return Some(f),
                        Some(_) => {}
                        // Ended by the server (a replay that lost its connection): resume.
                        None => return None,
                    }
                }
            })
            .await
            else {
                let got: std::collections::BTreeSet<i64> = received.iter().copied().collect();
                let missing: Vec<i64> = committed
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|id| !got.contains(id))
                    .copied()
                    .collect();
                panic!(
                    "no event within {ARRIVES_WITHIN:?} after {} received over {connections} \
                     connections (last {last:?}); missing {missing:?}",
                    received.len()
                );
            };
            let Some(frame) = frame else { break };
            assert_eq!(frame.event.as_deref(), Some("orders/insert"), "{frame:?}");
            received.push(frame.row());
            last = Some(frame.id.expect("a journal event has a position"));
        }
        drop(client);
        if done && received.len() >= committed_count() {
            break;
        }
    }
    (received, connections)
}

/// Four writers commit overlapping transactions of 1–3 orders (of user 1 or 2; one in five
/// rolled back) while user 1's client reads a few events, drops the connection and resumes
/// with its `Last-Event-ID`, again and again: it gets every order of user 1 that committed,
/// once, and no rolled-back one — and never a reset.
async fn postgres_resume_under_writes(tier: sqlnotify::Tier) {
    let db = common::TestDb::new().await;
    let web = serve_postgres(&db, tier, |n| n).await;
    // The first connection is live from before the first write.
    let mut first = Some(connect(&web.url, &[("x-user", "1")]).await.unwrap());
    assert!(wait_until(ARRIVES_WITHIN, || async { web.sse.clients() == 1 }).await);
    let next_id = Arc::new(std::sync::atomic::AtomicI64::new(1));
    let committed = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (client, next_id, committed) = (db.client().await, next_id.clone(), committed.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
            for _ in 0..150 {
                let mut mine = Vec::new();
                client.batch_execute("BEGIN").await.unwrap();
                for _ in 0..=rng.below(3) {
                    let id = next_id.fetch_add(1, Ordering::SeqCst);
                    let owner = 1 + rng.below(2) as i64;
                    client
                        .execute(
                            "INSERT INTO orders (id, owner_id, status) VALUES ($1, $2, 'new')",
                            &[&(id as i32), &(owner as i32)],
                        )
                        .await
                        .unwrap();
                    if owner == 1 {
                        mine.push(id);
                    }
                    // Let the other writers' transactions overlap this one.
                    tokio::task::yield_now().await;
                }
                if rng.below(4) == 0 {
                    // Held open while others commit after taking higher ids: commit order
                    // differs from id order, and the listener reads in between.
                    client.batch_execute("SELECT pg_sleep(0.01)").await.unwrap();
                }
                if rng.below(5) == 0 {
                    client.batch_execute("ROLLBACK").await.unwrap();
                } else {
                    client.batch_execute("COMMIT").await.unwrap();
                    committed.lock().unwrap().extend(mine);
                }
            }
        }));
    }
    // Meanwhile the listener's connection is terminated again and again (a read may be cut
    // part way; the listener reconnects and finishes it).
    let killer = {
        let db_name = db.name.clone();
        let admin = db.client().await;
        tokio::spawn(async move {
            let mut kills = 0;
            let mut every = tokio::time::interval(Duration::from_millis(150));
            for _ in 0..100 {
                if kills == 8 {
                    break;
                }
                every.tick().await;
                let killed = admin
                    .query_opt(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = $1 AND backend_type = 'client backend' \
                         AND pid <> pg_backend_pid() \
                         AND (query LIKE 'LISTEN %' OR query LIKE '%pg_snapshot_xip($1%') \
                         LIMIT 1",
                        &[&db_name],
                    )
                    .await
                    .unwrap();
                kills += usize::from(killed.is_some());
            }
            kills
        })
    };
    let (received, connections) =
        resume_while_writing(&web.url, first.take(), &writers, &committed).await;
    for w in writers {
        w.await.unwrap();
    }
    let kills = killer.await.unwrap();
    assert!(kills > 0, "the listener's connection was never terminated");
    let stats = assert_every_committed_once(&received, &committed, &web.sse);
    eprintln!(
        "{tier:?}: {} orders over {connections} connections, {} from the journal, \
         listener connection terminated {kills} times",
        received.len(),
        stats.replayed
    );
    web.stop().await;
}

#[actix_rt::test]
async fn on_postgresql_durable_a_client_that_resumes_again_and_again_gets_every_committed_row_once()
{
    postgres_resume_under_writes(sqlnotify::Tier::Durable).await;
}

#[actix_rt::test]
async fn on_postgresql_poll_a_client_that_resumes_again_and_again_gets_every_committed_row_once() {
    postgres_resume_under_writes(sqlnotify::Tier::Poll).await;
}

/// A MySQL notifier watching `orders` inserts (built further by `notifier`), and the endpoint
/// on it.
#[cfg(feature = "mysql")]
async fn serve_mysql(
    db: &common::mysql::TestDb,
    notifier: impl FnOnce(sqlnotify::NotifierBuilder) -> sqlnotify::NotifierBuilder,
) -> Served {
    serve_mysql_with(db, notifier, |e| e).await
}

/// [`serve_mysql`], the endpoint built further by `endpoint`.
#[cfg(feature = "mysql")]
async fn serve_mysql_with(
    db: &common::mysql::TestDb,
    notifier: impl FnOnce(sqlnotify::NotifierBuilder) -> sqlnotify::NotifierBuilder,
    endpoint: impl FnOnce(SseBuilder) -> SseBuilder,
) -> Served {
    db.exec(
        "CREATE TABLE orders (id INT PRIMARY KEY, owner_id INT NOT NULL, \
         status VARCHAR(20) NOT NULL, note TEXT, secret TEXT)",
    )
    .await;
    let notifier = notifier(
        Notifier::builder(&db.url)
            .watch(Watch::new("orders", Operation::Insert).extra_columns(["owner_id", "status"])),
    )
    .start()
    .await
    .unwrap();
    let sse = endpoint(
        Sse::builder(notifier.clone(), grant_own_orders).heartbeat(Duration::from_millis(200)),
    )
    .build();
    let (url, handle, server) = listen(&sse);
    Served {
        notifier,
        sse,
        url,
        handle,
        server,
    }
}

/// MySQL / MariaDB (`transaction_ids`: with the journal recording transactions): four writers
/// commit overlapping transactions of 1–3 orders (some held open while others commit, one in
/// five rolled back: journal ids are not in commit order, and rolled-back ids leave gaps)
/// while user 1's client drops and resumes again and again and the notifier's connections are
/// killed now and then: it gets every order of user 1 that committed, once, and never a reset.
#[cfg(feature = "mysql")]
async fn mysql_resume_under_writes(transaction_ids: bool) {
    use mysql_async::prelude::*;
    let db = common::mysql::TestDb::new().await;
    // Rolled-back ids stay open gaps for the gap timeout, and a position spells out at most 64
    // gaps (beyond that a resume may send some rows again, README "Resume"): the writers are
    // paced (4 × 40 transactions a second, one in five rolled back) and the timeout is 1 s.
    let web = serve_mysql(&db, |n| {
        n.gap_timeout(Duration::from_secs(1))
            .mysql_transaction_ids(transaction_ids)
    })
    .await;
    let first = Some(connect(&web.url, &[("x-user", "1")]).await.unwrap());
    assert!(wait_until(ARRIVES_WITHIN, || async { web.sse.clients() == 1 }).await);
    let next_id = Arc::new(std::sync::atomic::AtomicI64::new(1));
    let committed = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let mut writers = Vec::new();
    let mut writer_ids = Vec::new();
    for w in 0..4u64 {
        let (mut conn, next_id, committed) = (db.conn().await, next_id.clone(), committed.clone());
        let id: Option<u64> = conn.query_first("SELECT CONNECTION_ID()").await.unwrap();
        writer_ids.push(id.unwrap().to_string());
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
            let mut pace = tokio::time::interval(Duration::from_millis(25));
            for _ in 0..150 {
                pace.tick().await;
                let mut mine = Vec::new();
                conn.query_drop("BEGIN").await.unwrap();
                for _ in 0..=rng.below(3) {
                    let id = next_id.fetch_add(1, Ordering::SeqCst);
                    let owner = 1 + rng.below(2) as i64;
                    conn.exec_drop(
                        "INSERT INTO orders (id, owner_id, status) VALUES (?, ?, 'new')",
                        (id, owner),
                    )
                    .await
                    .unwrap();
                    if owner == 1 {
                        mine.push(id);
                    }
                    tokio::task::yield_now().await;
                }
                if rng.below(4) == 0 {
                    // Held open while others commit after taking higher ids.
                    conn.query_drop("DO SLEEP(0.01)").await.unwrap();
                }
                if rng.below(5) == 0 {
                    conn.query_drop("ROLLBACK").await.unwrap();
                } else {
                    conn.query_drop("COMMIT").await.unwrap();
                    committed.lock().unwrap().extend(mine);
                }
            }
        }));
    }
    // Meanwhile the notifier's own connections (the listener's, and the one replays read on)
    // are killed again and again.
    let killer = {
        let mut admin = db.conn().await;
        let (db_name, spared) = (db.name.clone(), writer_ids.join(", "));
        tokio::spawn(async move {
            let mut kills = 0;
            let mut every = tokio::time::interval(Duration::from_millis(150));
            for _ in 0..100 {
                if kills == 8 {
                    break;
                }
                every.tick().await;
                let ids: Vec<u64> = admin
                    .exec(
                        format!(
                            "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = ? \
                             AND ID <> CONNECTION_ID() AND ID NOT IN ({spared})"
                        ),
                        (&db_name,),
                    )
                    .await
                    .unwrap();
                for id in &ids {
                    // It may have gone meanwhile.
                    let _ = admin.query_drop(format!("KILL {id}")).await;
                }
                kills += usize::from(!ids.is_empty());
            }
            kills
        })
    };
    let (received, connections) = resume_while_writing(&web.url, first, &writers, &committed).await;
    for w in writers {
        w.await.unwrap();
    }
    let kills = killer.await.unwrap();
    assert!(
        kills > 0,
        "the web.notifier's connections were never killed"
    );
    let stats = assert_every_committed_once(&received, &committed, &web.sse);
    eprintln!(
        "MySQL (transaction ids {transaction_ids}): {} orders over {connections} connections, \
         {} from the journal, connections killed {kills} times",
        received.len(),
        stats.replayed
    );
    web.stop().await;
}

#[cfg(feature = "mysql")]
#[actix_rt::test]
async fn on_mysql_a_client_that_resumes_again_and_again_gets_every_committed_row_once() {
    mysql_resume_under_writes(false).await;
}

#[cfg(feature = "mysql")]
#[actix_rt::test]
async fn on_mariadb_with_transaction_ids_a_client_that_resumes_gets_every_committed_row_once() {
    mysql_resume_under_writes(true).await;
}

#[cfg(feature = "mysql")]
#[actix_rt::test]
async fn on_mysql_a_position_past_retention_or_of_another_journal_gets_a_reset() {
    let db = common::mysql::TestDb::new().await;
    let web = serve_mysql(&db, |n| {
        n.retention(Duration::from_millis(1))
            .purge_interval(Duration::from_millis(20))
    })
    .await;
    let insert =
        |id: i64| format!("INSERT INTO orders (id, owner_id, status) VALUES ({id}, 1, 'new')");
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    db.exec(&insert(1)).await;
    let first = client.next_event().await;
    assert_eq!(first.row(), 1);
    let last = first.id.expect("a MySQL event has a position");
    assert_eq!(last, "1@1:1:", "row 1, and every id up to it read");
    drop(client);
    db.exec(&insert(2)).await;
    db.exec(&insert(3)).await;
    // Retention removes row 2, which the client lacks (the purge keeps the newest row).
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            db.count("SELECT COUNT(*) FROM sqlnotify_journal").await == 1
        })
        .await
    );
    // The last: a set past every id this journal gave out (of another journal, or made up),
    // which would otherwise fence off the live rows below it.
    for position in [last.as_str(), "1", "1@1@1:1:@1:1:", "1@0:1000000000:"] {
        let mut client = connect(&web.url, &[("x-user", "1"), ("Last-Event-ID", position)])
            .await
            .unwrap();
        let reset = client.next_event().await;
        assert_eq!(
            reset.event.as_deref(),
            Some("reset"),
            "{position}: {reset:?}"
        );
        let id = 10 + web.sse.stats().resets as i64;
        db.exec(&insert(id)).await;
        assert_eq!(client.next_event().await.row(), id, "{position}");
    }
    assert_eq!(web.sse.stats().resets, 4);
    web.stop().await;
}

/// On MySQL, a purge by another process that commits between a replay's retention check and
/// its page (staged: the page waits for the journal, locked while the purge deletes row 2,
/// which the client lacks, and records it) is a reset: the page lacks row 2, whose id lies
/// below the settled watermark, and the client would otherwise count it as read and never
/// get it.
#[cfg(feature = "mysql")]
#[actix_rt::test]
async fn on_mysql_a_purge_between_the_retention_check_and_the_page_is_a_reset() {
    use mysql_async::prelude::*;
    use sqlnotify::bench_support::replay_page;
    let db = common::mysql::TestDb::new().await;
    // no purge of its own: it reads the journal's newest id too
    let web = serve_mysql(&db, |n| n.purge_interval(Duration::from_secs(3600))).await;
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    for id in 1..=5 {
        db.exec(&format!(
            "INSERT INTO orders (id, owner_id, status) VALUES ({id}, 1, 'new')"
        ))
        .await;
    }
    let first = client.next_event().await;
    assert_eq!(first.row(), 1);
    for want in 2..=5 {
        assert_eq!(client.next_event().await.row(), want);
    }
    drop(client);
    let after = first.id.expect("a MySQL event has a position");
    let page = replay_page(&web.notifier, &after, None, 10).await.unwrap();
    assert_eq!(
        page.map(|(rows, next)| (rows, next.is_none())),
        Some((vec![2, 3, 4, 5], true)),
        "without a purge, the rows the client lacks"
    );

    let mut purger = db.conn().await;
    purger
        .query_drop("LOCK TABLES sqlnotify_journal WRITE")
        .await
        .unwrap();
    let replay = actix_rt::spawn({
        let (notifier, after) = (web.notifier.clone(), after.clone());
        async move { replay_page(&notifier, &after, None, 10).await }
    });
    let waiting = format!(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = '{}' \
         AND STATE LIKE 'Waiting for table metadata lock%' \
         AND INFO LIKE 'SELECT MAX(`id`) FROM %sqlnotify_journal%'",
        db.name
    );
    assert!(
        wait_until(ARRIVES_WITHIN, || async { db.count(&waiting).await > 0 }).await,
        "the replay waits for the journal, past its retention check"
    );
    // What a purge commits: the rows, and how far it deleted (its own transaction, here
    // committed while the journal stays locked).
    purger
        .query_drop("DELETE FROM sqlnotify_journal WHERE id <= 2")
        .await
        .unwrap();
    db.exec(
        "INSERT INTO sqlnotify_trimmed (id, upto) VALUES (1, 2) \
         ON DUPLICATE KEY UPDATE upto = GREATEST(upto, VALUES(upto))",
    )
    .await;
    purger.query_drop("UNLOCK TABLES").await.unwrap();
    let _ = purger.disconnect().await;
    let page = replay.await.unwrap().unwrap();
    assert!(
        page.is_none(),
        "a reset, not the page {:?}",
        page.map(|(rows, _)| rows)
    );
    web.stop().await;
}

#[actix_rt::test]
async fn on_postgresql_a_position_past_retention_or_of_another_journal_gets_a_reset() {
    let db = common::TestDb::new().await;
    let web = serve_postgres(&db, sqlnotify::Tier::Durable, |n| {
        n.retention(Duration::from_millis(1))
            .purge_interval(Duration::from_millis(20))
    })
    .await;
    let insert =
        |id: i64| format!("INSERT INTO orders (id, owner_id, status) VALUES ({id}, 1, 'new')");
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    db.exec(&insert(1)).await;
    let first = client.next_event().await;
    assert_eq!(first.row(), 1);
    let last = first.id.expect("a durable event has a position");
    assert!(
        last.contains('@'),
        "a PostgreSQL position names its read: {last}"
    );
    drop(client);
    db.exec(&insert(2)).await;
    // Retention removes what the client lacks.
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            db.count("SELECT count(*) FROM sqlnotify.journal").await == 0
        })
        .await
    );
    // The last two: digits in snapshot form that are no snapshot (xmin above xmax, running ids
    // out of order), which the server's pg_snapshot input refuses.
    for position in [
        last.as_str(),
        "1",
        "1@1@1:1:@1:1:",
        "1@1@9:5:@9:5:",
        "1@1@5:9:7,6@5:9:",
        // A stream's head from the future (another cluster's, or before a restore): would
        // count every row written since as seen.
        "0@0@900000000:900000000:@900000000:900000000:",
    ] {
        let mut client = connect(&web.url, &[("x-user", "1"), ("Last-Event-ID", position)])
            .await
            .unwrap();
        let reset = client.next_event().await;
        assert_eq!(
            reset.event.as_deref(),
            Some("reset"),
            "{position}: {reset:?}"
        );
        let head = reset.id.expect("a reset names where the stream starts");
        assert!(head.starts_with("0@0@"), "a snapshot position: {head}");
        // Then live events.
        let id = 10 + web.sse.stats().resets as i64;
        db.exec(&insert(id)).await;
        assert_eq!(client.next_event().await.row(), id, "{position}");
    }
    assert_eq!(web.sse.stats().resets, 6);
    web.stop().await;
}

/// PostgreSQL's journal tiers: a stream that starts live names a snapshot taken once it was
/// subscribed (`0@0@S@S`); a client that drops before its first event and comes back with it
/// gets every transaction that snapshot did not see, once, and none it saw.
#[actix_rt::test]
async fn on_postgresql_a_client_that_drops_before_its_first_event_resumes_from_where_its_stream_started(
) {
    let db = common::TestDb::new().await;
    let web = serve_postgres(&db, sqlnotify::Tier::Durable, |n| n).await;
    let insert =
        |id: i64| format!("INSERT INTO orders (id, owner_id, status) VALUES ({id}, 1, 'new')");
    db.exec(&insert(1)).await;
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    let first = client.next_frame().await.unwrap();
    assert!(first.event.is_none() && first.data.is_none(), "{first:?}");
    let head = first
        .id
        .expect("the first frame names where the stream starts");
    assert!(head.starts_with("0@0@"), "a snapshot position: {head}");
    drop(client);
    db.exec(&insert(2)).await;
    db.exec(&insert(3)).await;
    let mut client = connect(&web.url, &[("x-user", "1"), ("Last-Event-ID", &head)])
        .await
        .unwrap();
    let second = client.next_event().await;
    assert_eq!(second.row(), 2, "{second:?}");
    assert_eq!(client.next_event().await.row(), 3);
    db.exec(&insert(4)).await;
    assert_eq!(client.next_event().await.row(), 4);
    assert_eq!(web.sse.stats().resets, 0);
    // A client that resumes from the event it got resumes as ever.
    let last = second.id.expect("a durable event has a position");
    drop(client);
    let mut client = connect(&web.url, &[("x-user", "1"), ("Last-Event-ID", &last)])
        .await
        .unwrap();
    assert_eq!(client.next_event().await.row(), 3);
    assert_eq!(client.next_event().await.row(), 4);
    drop(client);
    web.stop().await;
}

/// PostgreSQL's notify tier has no journal and its events no id: its stream's first frame is
/// the id `none`, which a browser keeps (events without an id do not change it) and sends back
/// on reconnect — and gets a `reset`. (Before, it reconnected with no `Last-Event-ID` and got
/// a live stream: what was committed while it was away was lost silently.)
#[actix_rt::test]
async fn on_postgresql_notify_a_client_that_reconnects_gets_a_reset_never_a_silent_gap() {
    let db = common::TestDb::new().await;
    let web = serve_postgres(&db, sqlnotify::Tier::Notify, |n| n).await;
    let insert =
        |id: i64| format!("INSERT INTO orders (id, owner_id, status) VALUES ({id}, 1, 'new')");
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    let first = client.next_frame().await.unwrap();
    assert_eq!(first.id.as_deref(), Some("none"), "{first:?}");
    db.exec(&insert(1)).await;
    let event = client.next_event().await;
    assert_eq!(event.row(), 1);
    assert_eq!(event.id, None, "a notify-tier event has no position");
    drop(client);
    db.exec(&insert(2)).await; // while the client is away: not replayable
    let mut client = connect(&web.url, &[("x-user", "1"), ("Last-Event-ID", "none")])
        .await
        .unwrap();
    let reset = client.next_event().await;
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    assert_eq!(reset.id.as_deref(), Some("none"));
    db.exec(&insert(3)).await;
    loop {
        let e = client.next_event().await;
        assert_eq!(e.event.as_deref(), Some("orders/insert"), "{e:?}");
        if e.row() == 3 {
            break;
        }
    }
    assert_eq!(web.sse.stats().resets, 1);
    drop(client);
    web.stop().await;
}

/// A grant that mixes a durable channel with a notify-tier one: a resume from a durable
/// event's position could replay the durable channel only, and the notify channel's rows
/// written meanwhile would be missing without a word. It is a `reset` naming the tier.
#[actix_rt::test]
async fn on_postgresql_a_grant_with_a_notify_tier_channel_resumes_with_a_reset() {
    let db = common::TestDb::new().await;
    db.exec(SCHEMA).await;
    db.exec("CREATE TABLE alerts (id INTEGER PRIMARY KEY, owner_id INTEGER NOT NULL)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(
            Watch::new("orders", Operation::Insert)
                .extra_columns(["owner_id", "status"])
                .tier(sqlnotify::Tier::Durable),
        )
        .watch(Watch::new("alerts", Operation::Insert).extra_columns(["owner_id"]))
        .start()
        .await
        .unwrap();
    let sse = Sse::builder(notifier.clone(), |_req| {
        Ok(Grant::new()
            .subscription(Subscription::new("orders", Operation::Insert))
            .subscription(Subscription::new("alerts", Operation::Insert)))
    })
    .heartbeat(Duration::from_millis(200))
    .build();
    let (url, handle, server) = listen(&sse);
    let mut client = connect(&url, &[]).await.unwrap();
    let first = client.next_frame().await.unwrap();
    assert_eq!(first.id.as_deref(), Some("none"), "{first:?}");
    db.exec("INSERT INTO orders (id, owner_id, status) VALUES (1, 1, 'new')")
        .await;
    let order = client.next_event().await;
    let last = order.id.expect("a durable event has a position");
    drop(client);
    db.exec("INSERT INTO alerts (id, owner_id) VALUES (1, 1)")
        .await;
    let mut client = connect(&url, &[("Last-Event-ID", &last)]).await.unwrap();
    let reset = client.next_event().await;
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    let reason = reset.json()["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("Tier::Notify"), "{reason}");
    assert_eq!(reset.id.as_deref(), Some("none"));
    drop(client);
    let served = Served {
        notifier,
        sse,
        url,
        handle,
        server,
    };
    served.stop().await;
}

#[actix_rt::test]
async fn streams_end_when_the_notifier_stops() {
    let s = serve(|n| n, |e| e.heartbeat(Duration::from_secs(60))).await;
    let mut client = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    assert!(wait_until(ARRIVES_WITHIN, || async { s.sse.clients() == 1 }).await);
    s.notifier.stop().await.unwrap();
    assert!(client.ends().await, "the stream outlived its notifier");
    assert!(wait_until(ARRIVES_WITHIN, || async { s.sse.clients() == 0 }).await);
    s.sse.shutdown();
    s.served.handle.stop(true).await;
    s.served.server.await.unwrap().unwrap();
}

/// The logical-decoding tier has no journal to replay from: a client that resumes with
/// `Last-Event-ID` (header or query parameter) gets a `reset` naming the tier, then live
/// events — never an error, never a silent gap.
#[cfg(feature = "logical")]
#[actix_rt::test]
async fn on_postgresql_logical_a_client_that_resumes_gets_a_reset_naming_the_tier() {
    let Some(cluster) = common::Cluster::start_with(
        "-c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10",
    ) else {
        common::prerequisite_missing(
            "on_postgresql_logical_a_client_that_resumes_gets_a_reset",
            "PostgreSQL's binaries (initdb, pg_ctl)",
        );
        return;
    };
    let db = common::TestDb::on(&cluster.url()).await;
    let web = serve_postgres(&db, sqlnotify::Tier::Logical, |b| b).await;
    let insert = |id: i64| {
        let db = &db;
        async move {
            db.exec(&format!(
                "INSERT INTO orders (id, owner_id, status) VALUES ({id}, 1, 'new')"
            ))
            .await
        }
    };
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    insert(1).await;
    let first = client.next_event().await;
    assert_eq!(first.row(), 1);
    let last = first.id.clone().expect("a logical event has an id");
    drop(client);
    insert(2).await; // while the client is away
    let resumed = [
        (
            vec![("x-user", "1"), ("Last-Event-ID", last.as_str())],
            web.url.clone(),
        ),
        (
            vec![("x-user", "1")],
            format!("{}?last_event_id={last}", web.url),
        ),
    ];
    for (round, (headers, url)) in resumed.into_iter().enumerate() {
        let mut client = connect(&url, &headers).await.unwrap();
        let reset = client.next_event().await;
        assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
        assert_eq!(
            reset.id.as_deref(),
            Some("none"),
            "no position to resume from"
        );
        let reason = reset.json()["reason"].as_str().unwrap().to_string();
        assert!(reason.contains("Tier::Logical"), "{reason}");
        // Live events follow (order 2 too, if it was still on its way when it subscribed).
        let id = 3 + round as i64;
        insert(id).await;
        loop {
            let e = client.next_event().await;
            assert_eq!(e.event.as_deref(), Some("orders/insert"), "{e:?}");
            assert!(e.row() > 1, "order 1 again");
            if e.row() == id {
                break;
            }
        }
        drop(client);
    }
    assert_eq!(web.sse.stats().resets, 2);
    web.stop().await;
}

/// A purge that runs between two pages of a PostgreSQL replay deletes rows the next page
/// would hold: that page is a reset, never a silent gap. (The purge's record was checked
/// before the first page only: the next page came back empty, as if the client had
/// everything.)
/// A purge that deleted only rows a client had resets no client, even while a transaction
/// stays open elsewhere on the server (which holds every snapshot's `xmin` back: a purge
/// record compared with that `xmin` reset every client for as long as the transaction lasted).
/// On a cluster of its own: a transaction of another test, running at the client's read and
/// finished by the purge, would rightly count as one whose rows the purge may have deleted.
#[actix_rt::test]
async fn on_postgresql_a_transaction_left_open_does_not_make_every_resume_a_reset() {
    use sqlnotify::bench_support::{purge_now, replay_page};
    let Some(cluster) = common::Cluster::start() else {
        common::prerequisite_missing(
            "on_postgresql_a_transaction_left_open_does_not_make_every_resume_a_reset",
            "no PostgreSQL cluster of its own could be started (local PostgreSQL binaries \
             under /usr/lib/postgresql, and as root a `postgres` user)",
        );
        return;
    };
    let db = common::TestDb::on(&cluster.url()).await;
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT pg_catalog.pg_current_xact_id();")
        .await
        .unwrap();
    let web = serve_postgres(&db, sqlnotify::Tier::Durable, |n| {
        n.purge_interval(Duration::from_secs(3600))
    })
    .await;
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    for id in 1..=2 {
        db.exec(&format!(
            "INSERT INTO orders (id, owner_id, status) VALUES ({id}, 1, 'new')"
        ))
        .await;
        assert_eq!(client.next_event().await.row(), id);
    }
    // Rows 1 and 2 age past a retention that row 3 will be within.
    let keep = Duration::from_secs(2);
    let aged = common::wait_until(Duration::from_secs(10), || async {
        db.count(
            "SELECT count(*) FROM sqlnotify.journal \
              WHERE created_at < now() - interval '2.5 seconds'",
        )
        .await
            == 2
    })
    .await;
    assert!(aged);
    db.exec("INSERT INTO orders (id, owner_id, status) VALUES (3, 1, 'new')")
        .await;
    let third = client.next_event().await;
    assert_eq!(third.row(), 3);
    drop(client);
    assert_eq!(
        purge_now(&web.notifier, keep).await.unwrap(),
        2,
        "rows 1 and 2"
    );
    let after = third.id.expect("a durable event has a position");
    let page = replay_page(&web.notifier, &after, None, 10).await.unwrap();
    // (A replay starts with the event's own row.)
    assert_eq!(
        page.map(|(rows, next)| (rows.len(), next.is_none())),
        Some((1, true)),
        "row 3's own journal row, nothing after it, and no reset"
    );
    web.stop().await;
    holder.batch_execute("COMMIT").await.unwrap();
}

#[actix_rt::test]
async fn on_postgresql_a_purge_between_two_pages_of_a_replay_is_a_reset() {
    use sqlnotify::bench_support::{purge_now, replay_page};
    let db = common::TestDb::new().await;
    let web = serve_postgres(&db, sqlnotify::Tier::Durable, |n| {
        n.retention(Duration::from_millis(1))
            .purge_interval(Duration::from_secs(3600))
    })
    .await;
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    for id in 1..=5 {
        db.exec(&format!(
            "INSERT INTO orders (id, owner_id, status) VALUES ({id}, 1, 'new')"
        ))
        .await;
    }
    let first = client.next_event().await;
    assert_eq!(first.row(), 1);
    for want in 2..=5 {
        assert_eq!(client.next_event().await.row(), want);
    }
    drop(client);
    let after = first.id.expect("a durable event has a position");
    let (rows, next) = replay_page(&web.notifier, &after, None, 2)
        .await
        .unwrap()
        .expect("the position resumes");
    assert_eq!(rows.len(), 2, "{rows:?}");
    let next = next.expect("a second page");
    assert!(
        purge_now(&web.notifier, Duration::from_millis(1))
            .await
            .unwrap()
            > 0
    );
    let page = replay_page(&web.notifier, &after, Some(next), 2)
        .await
        .unwrap();
    assert!(
        page.is_none(),
        "a reset, not the page {:?}",
        page.map(|(rows, _)| rows)
    );
    web.stop().await;
}

/// A PostgreSQL replay reads the journal in windows of ids, each transaction whole once the
/// window reaches its last row: over two transactions that interleave 700 rows at a time,
/// single-row transactions between them and one of 2,500 rows, pages of 50 rows (windows of
/// 1,000 ids) return every row after the position once, in the listener's order — by each
/// transaction's last id, then id — and a client resuming over them gets its own rows in that
/// order, also when it drops half way and resumes again.
#[actix_rt::test]
async fn on_postgresql_a_long_replay_in_windows_keeps_the_listeners_order() {
    use sqlnotify::bench_support::replay_page;
    let db = common::TestDb::new().await;
    let web = serve_postgres(&db, sqlnotify::Tier::Durable, |n| {
        n.purge_interval(Duration::from_secs(3600))
    })
    .await;
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    let head = client
        .next_frame()
        .await
        .and_then(|f| f.id)
        .expect("the first frame names where the stream starts");
    drop(client);
    // Every seventh order is user 1's.
    let insert = |from: i64, n: i64| {
        format!(
            "INSERT INTO orders (id, owner_id, status) \
             SELECT x, CASE WHEN x % 7 = 0 THEN 1 ELSE 2 END, 'new' \
               FROM generate_series({from}, {}) x",
            from + n - 1
        )
    };
    let (a, b) = (db.client().await, db.client().await);
    a.batch_execute("BEGIN").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    for round in 0..5 {
        a.batch_execute(&insert(1 + round * 1_400, 700))
            .await
            .unwrap();
        b.batch_execute(&insert(701 + round * 1_400, 700))
            .await
            .unwrap();
    }
    a.batch_execute("COMMIT").await.unwrap();
    for id in 0..50 {
        db.exec(&insert(10_000 + id, 1)).await;
    }
    b.batch_execute("COMMIT").await.unwrap();
    db.exec(&insert(20_000, 2_500)).await;
    for id in 0..50 {
        db.exec(&insert(30_000 + id, 1)).await;
    }
    // The listener's order (all of it came after the head).
    let oracle = db.client().await;
    let expected: Vec<i64> = oracle
        .query(
            "SELECT id FROM sqlnotify.journal \
              ORDER BY max(id) OVER (PARTITION BY xid), id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(expected.len(), 9_600);
    let (mut replayed, mut next) = (Vec::new(), None);
    loop {
        let (rows, more) = replay_page(&web.notifier, &head, next, 50)
            .await
            .unwrap()
            .expect("the head resumes");
        assert!(rows.len() <= 50);
        replayed.extend(rows);
        match more {
            Some(more) => next = Some(more),
            None => break,
        }
    }
    assert_eq!(
        replayed, expected,
        "every journal row once, in the listener's order"
    );
    // Through the endpoint: user 1's orders, in that order.
    let journal_rows: std::collections::HashMap<i64, i64> = oracle
        .query(
            "SELECT j.id, (j.payload::jsonb ->> 'id')::int8 FROM sqlnotify.journal j",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mine: Vec<i64> = expected
        .iter()
        .map(|id| journal_rows[id])
        .filter(|order| order % 7 == 0)
        .collect();
    let mut client = connect(&web.url, &[("x-user", "1"), ("Last-Event-ID", &head)])
        .await
        .unwrap();
    let (mut got, mut last) = (Vec::new(), None);
    for _ in 0..mine.len() / 2 {
        let frame = client.next_event().await;
        got.push(frame.row());
        last = frame.id;
    }
    drop(client);
    let last = last.expect("a durable event has a position");
    let mut client = connect(&web.url, &[("x-user", "1"), ("Last-Event-ID", &last)])
        .await
        .unwrap();
    while got.len() < mine.len() {
        got.push(client.next_event().await.row());
    }
    assert_eq!(got, mine, "user 1's orders once, in the listener's order");
    assert_eq!(web.sse.stats().resets, 0);
    drop(client);
    web.stop().await;
}

/// A frame of a stream, as [`replay_frames`] keeps it: an event's order and id, or an `id:`
/// alone (the progress of a replay).
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Event(i64, String),
    Progress(String),
}

/// User 1's rows among the orders [`insert_rare`] writes: one in 200.
const RARE: std::ops::RangeInclusive<i64> = 1..=10;

/// The SQL that writes orders 2 to 2001, every 200th one user 1's (200, 400, …, 2000), the
/// rest user 2's: four statements of 500 rows.
fn insert_rare_sql() -> Vec<String> {
    (0..4)
        .map(|batch| {
            let rows: Vec<String> = (2 + batch * 500..2 + (batch + 1) * 500)
                .map(|id| {
                    let owner = if id % 200 == 0 { 1 } else { 2 };
                    format!("({id}, {owner}, 'new')")
                })
                .collect();
            format!(
                "INSERT INTO orders (id, owner_id, status) VALUES {}",
                rows.join(", ")
            )
        })
        .collect()
}

/// Reads a stream until the event of order `until`: its events and `id:`-alone frames
/// (comments skipped), each event with its id.
async fn replay_frames(client: &mut Client, until: i64) -> Vec<Seen> {
    let mut seen = Vec::new();
    loop {
        let frame = client.next_frame().await.expect("the stream ended");
        match (&frame.event, &frame.id) {
            (Some(event), id) => {
                assert_eq!(event, "orders/insert", "{frame:?}");
                let row = frame.row();
                seen.push(Seen::Event(row, id.clone().expect("an event's id")));
                if row == until {
                    return seen;
                }
            }
            (None, Some(id)) if frame.data.is_none() => seen.push(Seen::Progress(id.clone())),
            _ => {}
        }
    }
}

/// User 1 got order 1 (its id `first`), then orders 2 to 2001 were written, of which user 1's
/// are one in 200 (`insert_rare_sql`), and the endpoint reads the journal 10 rows a page:
/// resuming from `first`, the client gets, besides its events, an `id:` alone after pages that
/// held nothing for it — before its first event already (it once got no byte at all until
/// then: a proxy's idle timeout cut such a replay, and the browser started it over and over).
/// A client that reconnects from such an id gets exactly the events that came after it, none
/// missed, none twice. Returns the frames of the first replay.
async fn resume_from_progress(url: &str, first: &str) -> Vec<Seen> {
    let rare: Vec<i64> = RARE.map(|n| n * 200).collect();
    let mut client = connect(url, &[("x-user", "1"), ("Last-Event-ID", first)])
        .await
        .unwrap();
    let seen = replay_frames(&mut client, *rare.last().unwrap()).await;
    drop(client);
    let events: Vec<i64> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Event(row, _) => Some(*row),
            Seen::Progress(_) => None,
        })
        .collect();
    assert_eq!(events, rare, "every row of user 1's, once, in order");
    assert!(
        matches!(seen.first(), Some(Seen::Progress(_))),
        "progress before the first event: {:?}",
        seen.first()
    );
    // A client that drops after the progress that follows its fifth event comes back from it.
    let fifth = seen
        .iter()
        .position(|s| matches!(s, Seen::Event(row, _) if *row == rare[4]))
        .unwrap();
    let (k, progress) = seen[fifth..]
        .iter()
        .enumerate()
        .find_map(|(i, s)| match s {
            Seen::Progress(id) => Some((fifth + i, id.clone())),
            Seen::Event(..) => None,
        })
        .expect("progress between the fifth and sixth events");
    let rest: Vec<i64> = seen[k..]
        .iter()
        .filter_map(|s| match s {
            Seen::Event(row, _) => Some(*row),
            Seen::Progress(_) => None,
        })
        .collect();
    let mut client = connect(url, &[("x-user", "1"), ("Last-Event-ID", &progress)])
        .await
        .unwrap();
    let again: Vec<i64> = replay_frames(&mut client, *rare.last().unwrap())
        .await
        .into_iter()
        .filter_map(|s| match s {
            Seen::Event(row, _) => Some(row),
            Seen::Progress(_) => None,
        })
        .collect();
    assert_eq!(again, rest, "from {progress}: exactly what came after it");
    client
        .assert_no_event_within(Duration::from_millis(300))
        .await;
    drop(client);
    seen
}

/// An event's id, or a progress's.
fn s_id(s: &Seen) -> String {
    match s {
        Seen::Event(_, id) | Seen::Progress(id) => id.clone(),
    }
}

#[actix_rt::test]
async fn a_filtered_resume_through_pages_of_other_rows_names_its_progress() {
    let s = serve(|n| n, |e| e.replay_page(10)).await;
    let mut client = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    s.insert(1, 1, "new");
    let first = client.next_event().await.id.unwrap();
    drop(client);
    for sql in insert_rare_sql() {
        s.db.exec(&sql);
    }
    let seen = resume_from_progress(&s.url, &first).await;
    // SQLite's ids are journal ids: they only grow, progress and events alike.
    let ids: Vec<i64> = seen.iter().map(|s| s_id(s).parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(s.sse.stats().resets, 0);
    s.stop().await;
}

#[actix_rt::test]
async fn on_postgresql_a_filtered_resume_through_pages_of_other_rows_names_its_progress() {
    let db = common::TestDb::new().await;
    let web =
        serve_postgres_with(&db, sqlnotify::Tier::Durable, |n| n, |e| e.replay_page(10)).await;
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    db.exec("INSERT INTO orders (id, owner_id, status) VALUES (1, 1, 'new')")
        .await;
    let first = client.next_event().await.id.unwrap();
    drop(client);
    for sql in insert_rare_sql() {
        db.exec(&sql).await;
    }
    resume_from_progress(&web.url, &first).await;
    assert_eq!(web.sse.stats().resets, 0);
    web.stop().await;
}

#[cfg(feature = "mysql")]
#[actix_rt::test]
async fn on_mysql_a_filtered_resume_through_pages_of_other_rows_names_its_progress() {
    let db = common::mysql::TestDb::new().await;
    let web = serve_mysql_with(&db, |n| n, |e| e.replay_page(10)).await;
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    db.exec("INSERT INTO orders (id, owner_id, status) VALUES (1, 1, 'new')")
        .await;
    let first = client.next_event().await.id.unwrap();
    drop(client);
    for sql in insert_rare_sql() {
        db.exec(&sql).await;
    }
    resume_from_progress(&web.url, &first).await;
    assert_eq!(web.sse.stats().resets, 0);
    web.stop().await;
}

/// A replay whose page waits (here for the journal, locked by another transaction) sends
/// heartbeats meanwhile, as a live stream does: a proxy does not cut it as idle. (It once
/// sent nothing at all until the page was read.) Then the events follow.
#[actix_rt::test]
async fn on_postgresql_a_replay_waiting_for_its_page_sends_heartbeats() {
    let db = common::TestDb::new().await;
    let web = serve_postgres(&db, sqlnotify::Tier::Durable, |n| n).await;
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    db.exec("INSERT INTO orders (id, owner_id, status) VALUES (1, 1, 'new')")
        .await;
    let first = client.next_event().await.id.unwrap();
    drop(client);
    db.exec("INSERT INTO orders (id, owner_id, status) VALUES (2, 1, 'new')")
        .await;
    let locker = db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE sqlnotify.journal IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut client = connect(&web.url, &[("x-user", "1"), ("Last-Event-ID", &first)])
        .await
        .unwrap();
    // The heartbeat is 200 ms; without heartbeats while a replay waits nothing comes until
    // the lock goes (5 s leaves room for a loaded machine).
    for _ in 0..3 {
        let frame = tokio::time::timeout(Duration::from_secs(5), client.next_frame())
            .await
            .expect("a frame within 5 s while the replay waits")
            .unwrap();
        assert_eq!(frame.comment.as_deref(), Some("heartbeat"), "{frame:?}");
    }
    locker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(client.next_event().await.row(), 2);
    assert!(web.sse.stats().heartbeats >= 3, "{:?}", web.sse.stats());
    drop(client);
    web.stop().await;
}

/// Users see their own orders' inserts and updates (two granted subscriptions).
fn grant_own_inserts_and_updates(req: &actix_web::HttpRequest) -> Result<Grant, Denied> {
    let grant = grant_own_orders(req)?;
    let user: i64 = req
        .headers()
        .get("x-user")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    Ok(grant.subscription(
        Subscription::new("orders", Operation::Update).filter(Filter::eq("owner_id", user)),
    ))
}

/// A SQLite notifier watching `orders` inserts and updates, and an endpoint granting each user
/// both on their own orders (built further by `endpoint`).
async fn serve_inserts_and_updates(endpoint: impl FnOnce(SseBuilder) -> SseBuilder) -> Server {
    serve_with(
        |n| n.watch(Watch::new("orders", Operation::Update).extra_columns(["owner_id", "status"])),
        |notifier| endpoint(Sse::builder(notifier, grant_own_inserts_and_updates)),
    )
    .await
}

/// The next frames of a stream's body read in the server's process (a client that reads
/// nothing until this is called: no socket buffers between), or `None` when it ended.
async fn next_frames(
    body: &mut std::pin::Pin<Box<actix_web::body::BoxBody>>,
) -> Option<Vec<Frame>> {
    use actix_web::body::MessageBody;
    let chunk = std::future::poll_fn(|cx| body.as_mut().poll_next(cx)).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    read_frames(&chunk.expect("a chunk")[..], tx);
    Some(
        std::iter::from_fn(|| match rx.try_recv() {
            Ok(Msg::Frame(f)) => Some(f),
            _ => None,
        })
        .collect(),
    )
}

/// Under `KeepLatestPerKey` a client that fell behind gets the newest waiting event of a row
/// in the place of its older one — ahead of older events of other rows. Such an event comes
/// without an `id:`: the ids the client sees never go back, and a client that drops right
/// after it and resumes with its last id gets every row's latest state. (Each event once
/// carried its own id: order 1's second update went out with an id ahead of orders 2–5's
/// first updates, and a resume from it skipped those silently.)
#[actix_rt::test]
async fn under_keep_latest_per_key_ids_never_go_back_and_a_resume_skips_nothing() {
    let s =
        serve_inserts_and_updates(|e| e.slow_client(SlowClient::KeepLatestPerKey).buffer(8)).await;
    let req = actix_web::test::TestRequest::get()
        .insert_header(("x-user", "1"))
        .to_http_request();
    let mut body = Box::pin(s.sse.respond(req).await.into_body());
    // Read nothing yet: the stream's channel fills, then its buffers.
    for id in 1..=30 {
        s.insert(id, 1, "new");
    }
    for id in 1..=5 {
        s.db.exec(&format!("UPDATE orders SET status = 'a' WHERE id = {id}"));
    }
    s.db.exec("UPDATE orders SET status = 'b' WHERE id = 1");
    s.insert(10_000, 1, "new");
    s.db.exec("UPDATE orders SET status = 'done' WHERE id = 10000");
    let newest: i64 = rusqlite::Connection::open(&s.db.path)
        .unwrap()
        .query_row("SELECT max(id) FROM sqlnotify_journal", [], |r| r.get(0))
        .unwrap();
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            s.notifier.stats().await.unwrap().last_sequence == newest
        })
        .await
    );
    assert!(s.notifier.stats().await.unwrap().queued > 0, "buffered");

    let is_last = |f: &Frame| f.event.as_deref() == Some("orders/update") && f.row() == 10_000;
    let mut frames = Vec::new();
    while !frames.iter().any(is_last) {
        let more = tokio::time::timeout(ARRIVES_WITHIN, next_frames(&mut body))
            .await
            .expect("frames")
            .expect("the stream goes on");
        frames.extend(more.into_iter().filter(|f| f.event.is_some()));
    }
    drop(body);
    let ids: Vec<i64> = frames
        .iter()
        .filter_map(|f| f.id.as_ref().map(|id| id.parse().unwrap()))
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids never go back: {ids:?}"
    );
    let updates = |frames: &[Frame]| -> Vec<(i64, String)> {
        frames
            .iter()
            .filter(|f| f.event.as_deref() == Some("orders/update"))
            .map(|f| {
                (
                    f.row(),
                    f.json()["columns"]["status"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    assert_eq!(
        updates(&frames)[0],
        (1, "b".to_string()),
        "order 1's latest update overtook the older ones of orders 2-5: {frames:?}"
    );
    assert!(
        frames
            .iter()
            .any(|f| f.event.as_deref() == Some("orders/update") && f.id.is_none()),
        "an event that overtook older ones goes without an id"
    );

    // The client drops right after order 1's update, and resumes with the last id it had.
    let k = frames
        .iter()
        .position(|f| f.event.as_deref() == Some("orders/update"))
        .unwrap();
    let last = frames[..=k]
        .iter()
        .rev()
        .find_map(|f| f.id.clone())
        .expect("an id before");
    let mut client = connect(&s.url, &[("x-user", "1"), ("Last-Event-ID", &last)])
        .await
        .unwrap();
    let mut resumed = Vec::new();
    while !resumed.iter().any(is_last) {
        let frame = client.next_event().await;
        assert_ne!(frame.event.as_deref(), Some("reset"), "{frame:?}");
        resumed.push(frame);
    }
    drop(client);
    let mut got = updates(&frames[..=k]);
    got.extend(updates(&resumed));
    for (order, status) in [
        (1, "b"),
        (2, "a"),
        (3, "a"),
        (4, "a"),
        (5, "a"),
        (10_000, "done"),
    ] {
        assert!(
            got.contains(&(order, status.to_string())),
            "order {order}'s latest update {status:?} missing: {got:?}"
        );
    }
    assert_eq!(s.sse.stats().resets, 0);
    s.stop().await;
}

/// Polls `future` once: whether it is still pending.
async fn pending_after_a_poll<F: std::future::Future + Unpin>(future: &mut F) -> bool {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::pin::Pin::new(&mut *future).poll(cx).is_pending())
    })
    .await
}

/// A request dropped while its stream subscribes (a browser that goes away, an HTTP/2 reset,
/// a worker that stops) leaves no subscription in the registry — neither one whose answer it
/// took nor one whose answer it never read. (They once stayed for good when their filters
/// never matched: only a delivery found a stream gone.) A stream that ends removes its own.
#[actix_rt::test]
async fn a_request_dropped_while_subscribing_leaves_no_subscription_behind() {
    let s = serve_inserts_and_updates(|e| e.heartbeat(Duration::from_millis(100))).await;
    let subscriptions = || async { s.notifier.stats().await.unwrap().subscriptions };
    let before = subscriptions().await;
    let req = actix_web::test::TestRequest::get()
        .insert_header(("x-user", "1"))
        .to_http_request();
    let sse = s.sse.clone();
    let mut respond = Box::pin(sse.respond(req));
    // The first subscription is made; its answer waits.
    assert!(pending_after_a_poll(&mut respond).await);
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            subscriptions().await == before + 1
        })
        .await
    );
    // Its answer taken, the second is made; its answer waits.
    assert!(pending_after_a_poll(&mut respond).await);
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            subscriptions().await == before + 2
        })
        .await
    );
    drop(respond);
    assert!(
        wait_until(ARRIVES_WITHIN, || async { subscriptions().await == before }).await,
        "{} subscriptions left behind",
        subscriptions().await - before
    );
    // A stream that ends removes its subscriptions too.
    let client = connect(&s.url, &[("x-user", "1")]).await.unwrap();
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            subscriptions().await == before + 2
        })
        .await
    );
    drop(client);
    assert!(wait_until(ARRIVES_WITHIN, || async { subscriptions().await == before }).await);
    s.stop().await;
}

/// A page of a replay holds at most 8 MiB of payloads (a row larger than that alone), however
/// many rows `replay_page` allows: each page is read whole and written to its client at once,
/// and many clients may resume together. Seven rows of 3 MiB after a position come in pages of
/// at most three (without the bound: one page of seven), every row once, in order.
#[actix_rt::test]
async fn on_postgresql_a_replay_page_is_bounded_in_bytes() {
    use sqlnotify::bench_support::replay_page;
    let db = common::TestDb::new().await;
    let web = serve_postgres(&db, sqlnotify::Tier::Durable, |n| n).await;
    let mut client = connect(&web.url, &[("x-user", "1")]).await.unwrap();
    for id in 1..=7 {
        db.exec(&format!(
            "INSERT INTO orders (id, owner_id, status) VALUES ({id}, 1, repeat('x', 3 << 20))"
        ))
        .await;
    }
    let first = client.next_event().await;
    assert_eq!(first.row(), 1);
    drop(client);
    let after = first.id.expect("a durable event has a position");
    let (mut pages, mut next) = (Vec::new(), None);
    loop {
        let (rows, more) = replay_page(&web.notifier, &after, next, 500)
            .await
            .unwrap()
            .expect("the position resumes");
        pages.push(rows);
        match more {
            Some(more) => next = Some(more),
            None => break,
        }
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|&n| n <= 3), "pages of {sizes:?} rows");
    let rows = pages.concat();
    assert_eq!(
        rows.len(),
        7,
        "the event's own row and the six after it: {rows:?}"
    );
    assert!(
        rows.windows(2).all(|w| w[0] < w[1]),
        "in order, once: {rows:?}"
    );
    web.stop().await;
}
