//! A subscriber actor that works on a typed struct: `ChangeEvent::decode` turns the key and
//! the extra columns into your serde type. SQLite in a temporary directory, no setup.
//!
//! Run: `cargo run --example typed_actor`

use std::time::Duration;

use actix::prelude::*;
use serde::Deserialize;
use sqlnotify::{ChangeEvent, Notifier, Operation, Subscription, Watch};

/// The columns the watch carries, as the application sees them.
#[derive(Debug, Deserialize)]
struct Order {
    id: i64,
    customer: String,
    total_cents: i64,
}

/// Keeps a running revenue total from new orders.
struct Revenue {
    total_cents: i64,
    done: tokio::sync::mpsc::UnboundedSender<i64>,
}

impl Actor for Revenue {
    type Context = Context<Self>;
}

impl Handler<ChangeEvent> for Revenue {
    type Result = ();

    fn handle(&mut self, event: ChangeEvent, _: &mut Context<Self>) {
        match event.decode::<Order>() {
            Ok(order) => {
                self.total_cents += order.total_cents;
                println!(
                    "order {} from {}: {:.2} (revenue so far {:.2})",
                    order.id,
                    order.customer,
                    order.total_cents as f64 / 100.0,
                    self.total_cents as f64 / 100.0
                );
                let _ = self.done.send(order.id);
            }
            Err(e) => eprintln!("cannot decode {}: {e}", event.to_json()),
        }
    }
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let dir = std::env::temp_dir().join(format!("sqlnotify-typed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("shop.db");
    let app = rusqlite::Connection::open(&path)?;
    app.execute_batch(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, total_cents INTEGER NOT NULL)",
    )?;

    let notifier = Notifier::builder(format!("sqlite://{}", path.display()))
        .watch(Watch::new("orders", Operation::Insert).extra_columns(["customer", "total_cents"]))
        .start()
        .await?;
    let (done, mut orders) = tokio::sync::mpsc::unbounded_channel();
    let revenue = Revenue {
        total_cents: 0,
        done,
    }
    .start();
    notifier
        .subscribe(
            Subscription::new("orders", Operation::Insert),
            revenue.recipient(),
        )
        .await?;

    tokio::task::spawn_blocking(move || {
        app.execute_batch(
            "INSERT INTO orders (customer, total_cents) VALUES ('ann', 1250);
             INSERT INTO orders (customer, total_cents) VALUES ('bob', 399);",
        )
    })
    .await??;
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), orders.recv()).await?;
    }
    notifier.stop().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
