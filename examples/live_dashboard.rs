//! Live dashboard: push database changes to browsers with actix-web and Server-Sent Events.
//!
//! Serves a page at `/` that shows the rows of the `items` table and keeps them current, with a
//! log of every change as it happens; the SSE stream it reads at `/events` (one JSON object
//! per change); `GET /items` (the rows, and the journal position they were read at);
//! `POST /items` (`{"name": "…"}`) to insert a row; `GET /stats` (connected clients and the notifier's counters) and
//! `GET /metrics` (every `sqlnotify_*` metric in Prometheus' text format, through
//! `metrics-exporter-prometheus`). Rows written by any other connection or process show up
//! the same way.
//!
//! ```text
//! cargo run --example live_dashboard                                  # SQLite in a temp dir
//! cargo run --example live_dashboard -- sqlite:///path/to/app.db      # your SQLite file
//! cargo run --example live_dashboard -- postgres://postgres@127.0.0.1/app
//! ```
//!
//! The URL may also come from `DATABASE_URL`; the address to listen on from
//! `LIVE_DASHBOARD_ADDR` (default `127.0.0.1:8080`; port 0 picks a free one). The first
//! lines on stdout are `database: URL` and `listening on http://ADDR/`.
//!
//! How it is put together:
//! * The page first reads the rows (`GET /items`), then opens the event stream from the
//!   position they were read at (`/events?last_event_id=POSITION`: `EventSource` cannot set
//!   the `Last-Event-ID` header). On SQLite the rows and the position come from one read
//!   transaction, so no change falls between the two and none is shown twice. (On PostgreSQL
//!   there is no position to resume from: the stream starts live, and a change committed
//!   between the read and the subscription can be missed.)
//! * The notifier is started before the server accepts connections and stopped after the
//!   server has shut down (Ctrl-C or SIGTERM).
//! * `/events` is `sqlnotify::web::Sse` (feature `web`): every browser gets the `items`
//!   events as server-sent events (`event: items/insert`, `id:` the event's journal position,
//!   `data:` its JSON record). A browser that reconnects sends `Last-Event-ID` and, on SQLite,
//!   gets what it missed from the journal (elsewhere: an `event: reset`, and the page reloads).
//! * A browser that cannot keep up loses its oldest pending events (`SlowClient::DropOldest`,
//!   and an `event: lag`) and never slows down the notifier or the other browsers.
//! * On Ctrl-C / SIGTERM the event streams are ended first (`Sse::shutdown`), so the graceful
//!   stop of the server does not wait for them. After a restart (or a crash) on the same
//!   database the browsers reconnect on their own with `Last-Event-ID` and get, from the
//!   journal, what was written while the server was away.

use std::path::PathBuf;
use std::time::Duration;

use actix_web::web;
use actix_web::{App, HttpResponse, HttpServer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlnotify::web::{Grant, SlowClient, Sse};
use sqlnotify::{Notifier, Operation, Subscription, Watch};

/// How often an idle event stream sends a comment line (so a closed browser is noticed).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Events waiting for one browser (per operation) before the oldest are dropped.
const CLIENT_BUFFER: usize = 256;

type Error = Box<dyn std::error::Error>;

/// Where the `items` table lives.
enum Db {
    Sqlite(PathBuf),
    #[cfg(feature = "postgres")]
    Postgres(tokio_postgres::Client),
}

impl Db {
    /// Connects and creates the `items` table if needed.
    async fn open(url: &str) -> Result<Db, Error> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let path = PathBuf::from(path);
            let conn = rusqlite::Connection::open(&path)?;
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
            )?;
            return Ok(Db::Sqlite(path));
        }
        #[cfg(feature = "postgres")]
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            actix_rt::spawn(async move {
                if let Err(e) = connection.await {
                    eprintln!("database connection closed: {e}");
                }
            });
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, name text NOT NULL)",
                )
                .await?;
            return Ok(Db::Postgres(client));
        }
        Err(format!("unsupported database URL {url:?} (use sqlite://… or postgres://…)").into())
    }

    /// Every row, by id, and the journal position they were read at (`None` where the stream
    /// cannot resume from one: PostgreSQL).
    async fn rows(&self) -> Result<(Vec<Item>, Option<String>), Error> {
        match self {
            Db::Sqlite(path) => {
                let path = path.clone();
                let read = web::block(move || -> rusqlite::Result<(Vec<Item>, i64)> {
                    let mut conn = rusqlite::Connection::open(path)?;
                    conn.busy_timeout(Duration::from_secs(5))?;
                    // One read transaction: the rows and the position are of the same moment.
                    let tx = conn.transaction()?;
                    let rows = tx
                        .prepare("SELECT id, name FROM items ORDER BY id")?
                        .query_map([], |r| {
                            Ok(Item {
                                id: r.get(0)?,
                                name: r.get(1)?,
                            })
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    // The newest journal id ever given (AUTOINCREMENT): right even when the
                    // purge has emptied the journal, where max(id) would be 0.
                    let position = tx.query_row(
                        "SELECT coalesce((SELECT seq FROM sqlite_sequence \
                         WHERE name = 'sqlnotify_journal'), 0)",
                        [],
                        |r| r.get(0),
                    )?;
                    tx.commit()?;
                    Ok((rows, position))
                })
                .await??;
                Ok((read.0, Some(read.1.to_string())))
            }
            #[cfg(feature = "postgres")]
            Db::Postgres(client) => {
                let rows = client
                    .query("SELECT id, name FROM items ORDER BY id", &[])
                    .await?
                    .iter()
                    .map(|r| Item {
                        id: r.get(0),
                        name: r.get(1),
                    })
                    .collect();
                Ok((rows, None))
            }
        }
    }

    /// Inserts an item; returns its id.
    async fn insert(&self, name: String) -> Result<i64, Error> {
        match self {
            Db::Sqlite(path) => {
                let path = path.clone();
                let id = web::block(move || -> rusqlite::Result<i64> {
                    let conn = rusqlite::Connection::open(path)?;
                    conn.busy_timeout(Duration::from_secs(5))?;
                    conn.execute("INSERT INTO items (name) VALUES (?1)", [name])?;
                    Ok(conn.last_insert_rowid())
                })
                .await??;
                Ok(id)
            }
            #[cfg(feature = "postgres")]
            Db::Postgres(client) => {
                let row = client
                    .query_one(
                        "INSERT INTO items (name) VALUES ($1) RETURNING id",
                        &[&name],
                    )
                    .await?;
                Ok(row.get(0))
            }
        }
    }
}

/// What every request handler shares.
struct State {
    notifier: Notifier,
    sse: Sse,
    db: Db,
}

/// Every browser may see every change of `items` (a real app decides per request: see
/// `Sse::builder`).
fn grant_items(_: &actix_web::HttpRequest) -> Result<Grant, sqlnotify::web::Denied> {
    Ok(Operation::ALL.iter().fold(Grant::new(), |grant, &op| {
        grant.subscription(Subscription::new("items", op))
    }))
}

/// A row of `items`, as `GET /items` returns it.
#[derive(Serialize)]
struct Item {
    id: i64,
    name: String,
}

#[derive(Deserialize)]
struct NewItem {
    name: String,
}

/// `POST /items` with `{"name": "…"}`: inserts a row; the page learns about it through
/// `/events` like about any other change.
async fn add_item(
    state: web::Data<State>,
    item: web::Json<NewItem>,
) -> actix_web::Result<HttpResponse> {
    let name = item.into_inner().name.trim().to_string();
    if name.is_empty() || name.chars().count() > 200 {
        return Ok(
            HttpResponse::BadRequest().json(json!({"error": "name must be 1 to 200 characters"}))
        );
    }
    let id = state
        .db
        .insert(name)
        .await
        .map_err(|e| actix_web::error::ErrorInternalServerError(e.to_string()))?;
    Ok(HttpResponse::Created().json(json!({ "id": id })))
}

/// `GET /items`: `{"rows": [{"id": 1, "name": "…"}, …], "position": "17"}` — every row, and
/// the journal position to open `/events` from (`null` on PostgreSQL).
async fn list_items(state: web::Data<State>) -> actix_web::Result<HttpResponse> {
    let (rows, position) = state
        .db
        .rows()
        .await
        .map_err(|e| actix_web::error::ErrorInternalServerError(e.to_string()))?;
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(json!({ "rows": rows, "position": position })))
}

/// `GET /stats`: connected browsers and the notifier's counters.
async fn stats(state: web::Data<State>) -> actix_web::Result<HttpResponse> {
    let s = state
        .notifier
        .stats()
        .await
        .map_err(actix_web::error::ErrorInternalServerError)?;
    Ok(HttpResponse::Ok().json(json!({
        "clients": state.sse.stats().clients,
        "received": s.received,
        "delivered": s.delivered,
        "dropped": s.dropped,
    })))
}

/// `GET /metrics`: the Prometheus text format.
async fn render_metrics(prometheus: web::Data<PrometheusHandle>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(prometheus.render())
}

async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(PAGE)
}

#[actix_web::main]
async fn main() -> Result<(), Error> {
    env_logger::init();
    let (url, temp_dir) = match std::env::args()
        .nth(1)
        .or_else(|| std::env::var("DATABASE_URL").ok())
    {
        Some(url) => (url, None),
        None => {
            let dir = std::env::temp_dir()
                .join(format!("sqlnotify-live-dashboard-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let url = format!("sqlite://{}", dir.join("app.db").display());
            (url, Some(dir))
        }
    };
    let db = Db::open(&url).await?;
    // Installed before the notifier starts, which registers its metrics with it.
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    // Started before the server accepts anyone: no browser can miss a change.
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("items", Operation::Insert).extra_columns(["name"]))
        .watch(Watch::new("items", Operation::Update).extra_columns(["name"]))
        .watch(Watch::new("items", Operation::Delete))
        .start()
        .await?;
    let sse = Sse::builder(notifier.clone(), grant_items)
        .slow_client(SlowClient::DropOldest)
        .buffer(CLIENT_BUFFER)
        .heartbeat(HEARTBEAT)
        .build();

    let state = web::Data::new(State {
        notifier: notifier.clone(),
        sse: sse.clone(),
        db,
    });
    let addr =
        std::env::var("LIVE_DASHBOARD_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".to_string());
    let server = HttpServer::new({
        let state = state.clone();
        move || {
            App::new()
                .app_data(state.clone())
                .route("/", web::get().to(index))
                .route("/events", state.sse.route())
                .route("/items", web::get().to(list_items))
                .route("/items", web::post().to(add_item))
                .route("/stats", web::get().to(stats))
                .route("/metrics", web::get().to(render_metrics))
                .app_data(web::Data::new(prometheus.clone()))
        }
    })
    .workers(2)
    // Ctrl-C / SIGTERM are handled below: the event streams end first.
    .disable_signals()
    .bind(&addr)?;
    println!("database: {url}");
    for addr in server.addrs() {
        println!("listening on http://{addr}/");
    }

    // Runs until Ctrl-C / SIGTERM.
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        let mut terminate = actix_web::rt::signal::unix::signal(
            actix_web::rt::signal::unix::SignalKind::terminate(),
        )
        .expect("a SIGTERM handler");
        tokio::select! {
            _ = actix_web::rt::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        sse.shutdown();
        handle.stop(true).await;
    });
    let served = server.await;
    let stopped = notifier.stop().await;
    drop(state);
    if let Some(dir) = temp_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    served?;
    stopped?;
    println!("stopped");
    Ok(())
}

/// The page: a form, a connection indicator, the rows (kept current by the stream) and the log
/// of changes since the page was loaded (newest first). Item names are inserted as text, never
/// as HTML.
const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>sqlnotify live dashboard</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 2rem auto; max-width: 40rem; }
  h2 { font-size: 1.05rem; margin: 1.5rem 0 .5rem; }
  #status { display: inline-block; padding: 0 .5em; border-radius: .3em; background: #eee; }
  #status[data-state="live"] { background: #c8f0c8; }
  #status[data-state="down"] { background: #f6c6c6; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .2em .6em; border-bottom: 1px solid #e4e4e4; }
  th { font-weight: 600; color: #555; }
  td:first-child, th:first-child { width: 5em; font-family: ui-monospace, monospace; }
  tr.changed { animation: flash 1.2s ease-out; }
  @keyframes flash { from { background: #fff3b0; } to { background: transparent; } }
  #empty { color: #888; }
  li { font-family: ui-monospace, monospace; }
  li[data-op="insert"] { color: #176317; }
  li[data-op="update"] { color: #6a4a00; }
  li[data-op="delete"] { color: #8a1010; }
</style>
</head>
<body>
<h1>items, live</h1>
<p>Stream: <span id="status" data-state="connecting">connecting…</span></p>
<form id="add">
  <input id="name" name="name" placeholder="item name" required maxlength="200">
  <button>Add</button>
</form>
<h2>Rows (<span id="count">0</span>)</h2>
<table>
  <thead><tr><th>id</th><th>name</th></tr></thead>
  <tbody id="rows"></tbody>
</table>
<p id="empty">no rows yet</p>
<h2>Changes since this page was loaded</h2>
<ul id="events"></ul>
<script>
const list = document.getElementById("events");
const table = document.getElementById("rows");
const status = document.getElementById("status");
function setStatus(state, text) { status.dataset.state = state; status.textContent = text; }

// The rows, by id, in id order.
function showCount() {
  document.getElementById("count").textContent = table.rows.length;
  document.getElementById("empty").hidden = table.rows.length > 0;
}
function putRow(id, name, flash) {
  const key = JSON.stringify(id);
  let tr = table.querySelector(`tr[data-id='${CSS.escape(key)}']`);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset.id = key;
    tr.append(document.createElement("td"), document.createElement("td"));
    tr.cells[0].textContent = key;
    const after = Array.from(table.rows).find((r) => JSON.parse(r.dataset.id) > id);
    table.insertBefore(tr, after || null);
  }
  tr.cells[1].textContent = name;
  if (flash) { tr.classList.remove("changed"); void tr.offsetWidth; tr.classList.add("changed"); }
}
function removeRow(id) {
  const tr = table.querySelector(`tr[data-id='${CSS.escape(JSON.stringify(id))}']`);
  if (tr) tr.remove();
}

// One change: into the log, and onto the rows.
const show = (message) => {
  lastId = message.lastEventId || lastId;
  const e = JSON.parse(message.data);
  const li = document.createElement("li");
  li.dataset.op = e.operation;
  li.dataset.id = JSON.stringify(e.id);
  const name = e.columns && e.columns.name !== undefined ? " " + e.columns.name : "";
  li.textContent = e.operation.toUpperCase() + " #" + JSON.stringify(e.id) + name;
  list.prepend(li);
  if (e.operation === "delete") removeRow(e.id);
  else if (e.columns && e.columns.name !== undefined) putRow(e.id, e.columns.name, true);
  showCount();
};

// The stream, from `lastId` on. Open: subscribed, nothing is missed from here on. The browser
// reconnects by itself with the last id it got (Last-Event-ID), also after a server restart;
// should it give up, a new stream resumes from the same place. "reset" means the server
// could not resume (start again from the rows), "lag" that this page fell behind.
let lastId = null;
let source = null;
function connect() {
  const url = lastId === null ? "/events" : "/events?last_event_id=" + encodeURIComponent(lastId);
  source = new EventSource(url);
  source.onopen = () => setStatus("live", "live");
  source.onerror = () => {
    setStatus("down", "reconnecting…");
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, 3000);
  };
  source.addEventListener("reset", () => location.reload());
  source.addEventListener("lag", (message) => {
    const li = document.createElement("li");
    li.textContent = "(missed " + JSON.parse(message.data).dropped + " changes)";
    list.prepend(li);
  });
  for (const op of ["insert", "update", "delete"]) source.addEventListener("items/" + op, show);
}

// First the rows and the position they were read at, then the changes after it.
async function start() {
  try {
    const response = await fetch("/items", { cache: "no-store" });
    if (!response.ok) throw new Error("GET /items: HTTP " + response.status);
    const { rows, position } = await response.json();
    for (const row of rows) putRow(row.id, row.name, false);
    showCount();
    lastId = position;
    connect();
  } catch (err) {
    setStatus("down", "cannot read the rows, retrying…");
    setTimeout(start, 3000);
  }
}
start();

// Leaving the page closes the stream (also when the browser keeps the page in its
// back/forward cache); coming back from that cache starts afresh.
window.addEventListener("pagehide", () => { if (source) source.close(); });
window.addEventListener("pageshow", (ev) => { if (ev.persisted) location.reload(); });

document.getElementById("add").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = document.getElementById("name");
  const response = await fetch("/items", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name: input.value }),
  });
  if (response.ok) input.value = "";
});
</script>
</body>
</html>
"#;
