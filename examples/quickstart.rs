//! The quickstart: watch a SQLite table, write to it from a separate connection, and print
//! every change as it arrives. No server needed.
//!
//! Run: `cargo run --example quickstart`

use std::time::Duration;

use sqlnotify::{Notifier, Operation, Subscription, Watch};

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let dir = std::env::temp_dir().join(format!("sqlnotify-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("app.db");

    // The application's own connection: create a table.
    let app = rusqlite::Connection::open(&path)?;
    app.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL)")?;

    // Watch it.
    let notifier = Notifier::builder(format!("sqlite://{}", path.display()))
        .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]))
        .watch(
            Watch::new("users", Operation::Update)
                .extra_columns(["email"])
                .trigger_columns(["email"]),
        )
        .watch(Watch::new("users", Operation::Delete))
        .start()
        .await?;
    println!("watching {} on {}", path.display(), notifier.dialect_name());

    let (seen, mut events) = tokio::sync::mpsc::unbounded_channel();
    for op in Operation::ALL {
        let seen = seen.clone();
        notifier
            .subscribe_fn(Subscription::new("users", op), move |event| {
                println!(
                    "{:<6} users id={} {}",
                    event.operation(),
                    event.id().values()[0],
                    event.to_json()
                );
                let _ = seen.send(());
            })
            .await?;
    }

    // Write from the application's connection (a blocking thread: rusqlite is synchronous).
    tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
        app.execute("INSERT INTO users (email) VALUES ('ann@example.com')", [])?;
        app.execute("INSERT INTO users (email) VALUES ('bob@example.com')", [])?;
        app.execute(
            "UPDATE users SET email = 'ann@example.org' WHERE id = 1",
            [],
        )?;
        app.execute("DELETE FROM users WHERE id = 2", [])?;
        Ok(())
    })
    .await??;

    for _ in 0..4 {
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await?
            .ok_or("subscription closed")?;
    }
    notifier.stop().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
