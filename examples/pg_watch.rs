//! Watches a `users` table in PostgreSQL and prints each change as it arrives.
//!
//! Run: `cargo run --example pg_watch -- postgres://postgres@127.0.0.1/test`
//! (creates the table if missing, writes three rows from a second connection, then exits).

use sqlnotify::{Notifier, Operation, Subscription, Watch};
use tokio_postgres::NoTls;

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1/test".into());

    let (client, connection) = tokio_postgres::connect(&url, NoTls).await?;
    actix_rt::spawn(connection);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS sqlnotify_example_users (id serial PRIMARY KEY, email text)")
        .await?;

    let notifier = Notifier::builder(&url)
        .cleanup_on_stop(true)
        .watch(Watch::new("sqlnotify_example_users", Operation::Insert).extra_columns(["email"]))
        .watch(Watch::new("sqlnotify_example_users", Operation::Update).extra_columns(["email"]))
        .watch(Watch::new("sqlnotify_example_users", Operation::Delete))
        .start()
        .await?;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for op in Operation::ALL {
        let tx = tx.clone();
        notifier
            .subscribe_fn(
                Subscription::new("sqlnotify_example_users", op),
                move |event| {
                    println!(
                        "{} {} id={} {}",
                        event.operation(),
                        event.table(),
                        event.id(),
                        event.to_json()
                    );
                    let _ = tx.send(());
                },
            )
            .await?;
    }

    client
        .batch_execute(
            "INSERT INTO sqlnotify_example_users (email) VALUES ('ann@example.com') RETURNING id;
             UPDATE sqlnotify_example_users SET email = 'ann@example.org' WHERE email = 'ann@example.com';
             DELETE FROM sqlnotify_example_users WHERE email = 'ann@example.org';",
        )
        .await?;
    for _ in 0..3 {
        tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await?;
    }
    notifier.stop().await?;
    client
        .batch_execute("DROP TABLE sqlnotify_example_users")
        .await?;
    Ok(())
}
