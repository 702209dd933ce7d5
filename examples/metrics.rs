//! sqlnotify's metrics in the Prometheus text format: installs `metrics-exporter-prometheus`
//! as the `metrics` recorder (before the notifier starts, so its counters register there),
//! watches a SQLite table that a writer fills once a second, and serves what the exporter
//! renders at `/metrics`.
//!
//! Run: `cargo run --example metrics`, then `curl http://127.0.0.1:9000/metrics`
//! (`SQLNOTIFY_METRICS_ADDR` picks another address). Ctrl-C stops it.

use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sqlnotify::{Filter, Notifier, Operation, Subscription, Watch};

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let dir = std::env::temp_dir().join(format!("sqlnotify-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("app.db");
    let app = rusqlite::Connection::open(&path)?;
    app.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER NOT NULL)")?;

    let notifier = Notifier::builder(format!("sqlite://{}", path.display()))
        .watch(Watch::new("orders", Operation::Insert).extra_columns(["total"]))
        .start()
        .await?;
    // Every order, and the large ones: `sqlnotify_events_filtered_total` counts the others.
    notifier
        .subscribe_fn(Subscription::new("orders", Operation::Insert), |_| {})
        .await?;
    notifier
        .subscribe_fn(
            Subscription::new("orders", Operation::Insert).filter(Filter::gt("total", 50)),
            |event| println!("large order {}", event.id()),
        )
        .await?;

    // The application writing (a blocking thread: rusqlite is synchronous).
    std::thread::spawn(move || {
        for n in 0i64.. {
            let total = n * 37 % 100;
            if app
                .execute("INSERT INTO orders (total) VALUES (?1)", [total])
                .is_err()
            {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });

    let addr = std::env::var("SQLNOTIFY_METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:9000".into());
    println!("metrics at http://{addr}/metrics");
    HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(prometheus.clone()))
            .route("/metrics", web::get().to(render))
    })
    .workers(1)
    .bind(&addr)?
    .run()
    .await?;

    notifier.stop().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// What the exporter holds now, in the Prometheus text format.
async fn render(prometheus: web::Data<PrometheusHandle>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(prometheus.render())
}
