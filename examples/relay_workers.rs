//! Work sharing over the relay: a relay publishes the inserts of an `orders` table into a NATS
//! JetStream stream, and several worker processes share ONE durable pull consumer on it —
//! each message is handled by one worker, acknowledged only once handled, and delivered again
//! (to whichever worker pulls next) when its handling fails.
//!
//! Run:
//!
//! ```text
//! cargo run --example relay_workers --features nats,postgres -- DATABASE_URL NATS_URL [WORKERS]
//! cargo run --example relay_workers --features nats,postgres -- \
//!     postgres://postgres@127.0.0.1/app nats://127.0.0.1:4222 3
//! ```
//!
//! The process given a database starts:
//!
//! * a relay ([`sqlnotify::relay::Relay`]) of table `sqlnotify_example_orders` (created if
//!   missing; inserts, durable tier) running as named consumer `orders-relay`, publishing into
//!   stream `SQLNOTIFY_EXAMPLE_ORDERS` under subjects `sqlnotify_example.public.…`;
//! * `WORKERS` (default 3) worker processes — itself again, run as `relay_workers worker N
//!   NATS_URL` — each of which pulls from the durable consumer `orders-workers` (creating it
//!   if missing: explicit acks, `ack_wait` 10 s, at most 64 messages unacknowledged) and prints
//!   what it handles. Order ids ≡ 3 (mod 7) fail on their first delivery: the worker naks
//!   them and JetStream delivers them again, usually to another worker.
//!
//! It then inserts 20 orders; once every one was handled it closes the workers' stdin (each
//! flushes its last acks and exits), stops the relay and exits 0 — or exits with an error
//! after 60 s. Everything stays in place for the next run: the relay resumes from its saved
//! position, the workers from the durable consumer's. To remove it: `sqlnotify consumers drop
//! DATABASE_URL orders-relay` (CLI, feature `cli`), `nats stream rm SQLNOTIFY_EXAMPLE_ORDERS`
//! and `DROP TABLE sqlnotify_example_orders`.
//!
//! # Delivery
//!
//! The relay stores each committed insert in the stream exactly once. From there on, delivery
//! to the workers is JetStream's: *at least once*. A message is handed to one worker at a
//! time, and it comes back — to any worker — when that worker naks it, or does not acknowledge
//! it within `ack_wait` (it died, hung, or lost its connection). A worker that dies after
//! handling a message and before its ack reached the server has that message handled twice:
//! make handling idempotent, keyed by the `Nats-Msg-Id` header (`source:sequence:part`, unique
//! per change). `message.double_ack()` waits for the server to confirm an ack, where
//! `message.ack()` (used here) only sends it; set `max_deliver` so that a message failing for
//! good stops coming back.
//!
//! # Order
//!
//! The stream holds the changes in commit order. Workers sharing one consumer do **not**
//! handle them in that order, not even per key: with `max_ack_pending` > 1 two changes of the
//! same row can be in the hands of two workers at once, and a message nak'ed or timed out
//! (`ack_wait`) comes back after messages that followed it.
//!
//! Per-key order needs one consumer per partition instead: start the relay with
//! `.partitions(P)` (subjects `PREFIX.schema.table.operation.p`, `p` the key's hash modulo
//! `P`), and create P durable consumers, consumer `p` with `filter_subject`
//! `PREFIX.*.*.*.p` and `max_ack_pending` 1: it hands out one message at a time and the next
//! only after the previous one was acknowledged, and a redelivery comes before anything
//! later. Any number of workers may pull from each partition's consumer (a spare takes over
//! when one dies); the parallelism is P. Keep `ack_wait` above the longest handling time (or
//! send `AckKind::Progress` while working): a message whose `ack_wait` runs out while it is
//! still being handled is delivered again to another worker, and its two handlings overlap.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use sqlnotify::relay::Relay;
use sqlnotify::{Notifier, Operation, Tier, Watch};
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

/// The table relayed (created if missing).
const TABLE: &str = "sqlnotify_example_orders";
/// The relay's named consumer: start this example twice and the relays form a group.
const RELAY_CONSUMER: &str = "orders-relay";
/// The stream the relay fills, and its subjects' first token.
const STREAM: &str = "SQLNOTIFY_EXAMPLE_ORDERS";
const PREFIX: &str = "sqlnotify_example";
/// The durable pull consumer every worker shares.
const DURABLE: &str = "orders-workers";
/// How long a worker has to acknowledge a message before it is delivered again.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Messages delivered and not acknowledged yet, over all workers.
const MAX_ACK_PENDING: i64 = 64;
/// Messages a worker pulls at once: small, so that work spreads over the workers (a message
/// waiting in one worker's batch is in its hands, and its `ack_wait` runs).
const BATCH: usize = 4;
/// What handling an order takes (a stand-in for real work).
const WORK: Duration = Duration::from_millis(50);
/// Orders inserted: transactions × rows.
const TRANSACTIONS: i32 = 4;
const ROWS: i32 = 5;
/// How long everything may take before the example gives up.
const WITHIN: Duration = Duration::from_secs(60);

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

#[actix::main]
async fn main() -> Result<()> {
    env_logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [mode, n, nats] if mode == "worker" => worker(n.parse()?, nats).await,
        [database, nats] => run(database, nats, 3).await,
        [database, nats, workers] => run(database, nats, workers.parse()?).await,
        _ => {
            eprintln!(
                "usage: cargo run --example relay_workers --features nats,postgres -- \
                 DATABASE_URL NATS_URL [WORKERS]"
            );
            std::process::exit(2);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A worker
// ---------------------------------------------------------------------------------------------

/// Worker `n`: pulls from the shared durable consumer until its stdin closes.
async fn worker(n: usize, nats: &str) -> Result<()> {
    let client = async_nats::connect(nats).await?;
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(STREAM).await?;
    // Every worker asks for the same durable consumer: the first creates it, the others (and
    // every later run) get the existing one and resume where it is.
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            DURABLE,
            pull::Config {
                durable_name: Some(DURABLE.to_string()),
                description: Some("sqlnotify relay_workers example".to_string()),
                filter_subject: format!("{PREFIX}.>"),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
                // A message failing this often is given up (it stays in the stream).
                max_deliver: 10,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .messages()
        .await?;

    // The parent closes our stdin to stop us (it also closes when the parent dies).
    let (closed, mut stop) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = closed.send(());
    });
    println!("worker {n}: pulling from {STREAM} / {DURABLE}");

    loop {
        let message = tokio::select! {
            _ = &mut stop => break,
            message = messages.next() => match message {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    // Missed heartbeats and the like: the stream carries on.
                    eprintln!("worker {n}: {e}");
                    continue;
                }
                None => break,
            },
        };
        let info = message.info()?;
        let (sequence, delivered) = (info.stream_sequence, info.delivered);
        // The body is the event as JSON (`ChangeEvent::to_record`).
        let order: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let Some(id) = order["id"].as_i64() else {
            eprintln!("worker {n}: message {sequence} is no order: terminated");
            message.ack_with(AckKind::Term).await?;
            continue;
        };
        let item = order["columns"]["item"].as_str().unwrap_or("?");
        let qty = &order["columns"]["qty"];

        tokio::time::sleep(WORK).await; // handle the order
        if id % 7 == 3 && delivered == 1 {
            println!("worker {n}: order {id} failed (delivery {delivered}): nak, it comes back");
            message.ack_with(AckKind::Nak(None)).await?;
            continue;
        }
        println!(
            "worker {n}: handled order {id}: {qty} × {item} (stream seq {sequence}, \
             delivery {delivered})"
        );
        // Acknowledged only now that it is handled.
        message.ack().await?;
    }
    // The acks sent last are on their way out: make sure they reached the server.
    client.flush().await?;
    println!("worker {n}: stopped");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The parent: relay, workers, demo rows
// ---------------------------------------------------------------------------------------------

/// What the workers' output says.
enum Report {
    /// Worker `worker` handled order `id`.
    Handled { worker: usize, id: i64 },
    /// A worker nak'ed an order.
    Failed,
    /// Worker `worker`'s stdout closed: it exited.
    Exited { worker: usize },
}

/// The worker processes; whichever still runs when this is dropped is killed.
#[derive(Default)]
struct Pool {
    children: Vec<(usize, Child)>,
    stdins: Vec<ChildStdin>,
}

impl Pool {
    /// Starts worker `n` (this program again), echoing its output and reporting it on `tx`.
    fn spawn(&mut self, n: usize, nats: &str, tx: mpsc::UnboundedSender<Report>) -> Result<()> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["worker", &n.to_string(), nats])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        self.stdins.push(child.stdin.take().expect("piped"));
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                println!("{line}");
                let report = if let Some(rest) = line.split("handled order ").nth(1) {
                    let id = rest.split(':').next().and_then(|id| id.parse().ok());
                    id.map(|id| Report::Handled { worker: n, id })
                } else if line.contains(" failed ") {
                    Some(Report::Failed)
                } else {
                    None
                };
                if let Some(report) = report {
                    let _ = tx.send(report);
                }
            }
            let _ = tx.send(Report::Exited { worker: n });
        });
        self.children.push((n, child));
        Ok(())
    }

    /// Closes every worker's stdin: each stops after the message in hand.
    fn stop(&mut self) {
        self.stdins.clear();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// The parent process: relay, `workers` workers, 20 orders; returns once every one was
/// handled and everything stopped.
async fn run(database: &str, nats: &str, workers: usize) -> Result<()> {
    let (client, connection) = tokio_postgres::connect(database, NoTls).await?;
    actix_rt::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} \
             (id bigserial PRIMARY KEY, item text NOT NULL, qty int NOT NULL)"
        ))
        .await?;

    // The relay: a named consumer of the table's inserts (a journal tier: the notify tier has
    // no position to make a message id from), published into the stream.
    let relay = Relay::builder(
        Notifier::builder(database)
            .watch(
                Watch::new(TABLE, Operation::Insert)
                    .extra_columns(["item", "qty"])
                    .tier(Tier::Durable),
            )
            .consumer(RELAY_CONSUMER),
        nats,
        STREAM,
    )
    .subject_prefix(PREFIX)
    .start()
    .await?;
    println!(
        "relay {RELAY_CONSUMER} ({:?}): {TABLE} inserts → stream {STREAM}",
        relay.notifier().stats().await?.role
    );
    let outcome = share_the_work(&client, &relay, nats, workers).await;
    relay.stop().await?;
    outcome
}

/// Starts the workers, inserts the orders and waits until each was handled, then stops the
/// workers.
async fn share_the_work(
    client: &tokio_postgres::Client,
    relay: &Relay,
    nats: &str,
    workers: usize,
) -> Result<()> {
    // The relay connects to NATS (and creates the stream) in the background.
    let deadline = Instant::now() + WITHIN;
    while relay.stats().connections == 0 {
        if Instant::now() > deadline {
            return Err(format!("the relay could not use NATS at {nats}: see its log").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut pool = Pool::default();
    for n in 1..=workers {
        pool.spawn(n, nats, tx.clone())?;
    }
    drop(tx);

    let mut orders = BTreeSet::new();
    for t in 0..TRANSACTIONS {
        let rows = client
            .query(
                &format!(
                    "INSERT INTO {TABLE} (item, qty) \
                     SELECT (ARRAY['apple', 'pear', 'plum', 'fig'])[1 + g % 4], g + $1 \
                     FROM generate_series(1, {ROWS}) g RETURNING id"
                ),
                &[&(t * ROWS)],
            )
            .await?;
        orders.extend(rows.iter().map(|row| row.get::<_, i64>(0)));
    }
    println!(
        "inserted {} orders ({}..={})",
        orders.len(),
        orders.first().unwrap(),
        orders.last().unwrap()
    );

    // Until every order of this run was handled (a message left over from an earlier run is
    // handled too, and not counted).
    let mut remaining = orders.clone();
    let mut by_worker: BTreeMap<usize, usize> = BTreeMap::new();
    let mut naks = 0;
    let mut exited = 0;
    let waited = tokio::time::timeout(WITHIN, async {
        while !remaining.is_empty() {
            match rx.recv().await {
                Some(Report::Handled { worker, id }) => {
                    if remaining.remove(&id) {
                        *by_worker.entry(worker).or_default() += 1;
                    }
                }
                Some(Report::Failed) => naks += 1,
                Some(Report::Exited { worker }) => {
                    exited += 1;
                    return Err(format!("worker {worker} exited early"));
                }
                None => return Err("every worker exited".to_string()),
            }
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|_| {
        Err(format!(
            "{} orders not handled within {WITHIN:?}: {remaining:?}",
            remaining.len()
        ))
    });

    // Stop the workers: each acks what it handled, flushes and exits.
    pool.stop();
    let stopped = tokio::time::timeout(Duration::from_secs(10), async {
        while exited < workers {
            match rx.recv().await {
                Some(Report::Exited { .. }) => exited += 1,
                Some(_) => {}
                None => break,
            }
        }
    })
    .await;
    waited?;
    if stopped.is_err() {
        return Err("the workers did not stop within 10 s".into());
    }
    // Every worker closed its stdout: each is exiting.
    for (n, child) in &mut pool.children {
        let status = child.wait()?;
        if !status.success() {
            return Err(format!("worker {n} {status}").into());
        }
    }
    println!(
        "every order handled and acknowledged: {} orders, {naks} nak'ed and delivered again, \
         handled per worker {by_worker:?}; relay {:?}",
        orders.len(),
        relay.stats()
    );
    Ok(())
}
