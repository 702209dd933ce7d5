//! The handler rows of the end-to-end benchmark: what delivering each event through a handler
//! costs, against plain delivery measured in the same run. Everything runs on PostgreSQL's
//! durable tier with a named consumer (a fresh table, consumer and handler name per run), in
//! this process:
//!
//! * **plain delivery** (the baseline): a `subscribe_fn` closure;
//! * **acknowledged handler**: `Notifier::handle`, answering `Ok(())` at once — per-key order,
//!   acknowledgements, and the position moving only past handled events;
//! * **exactly-once handler**: `Notifier::handle_in_transaction` doing one `INSERT` into a table
//!   of its own through `Transaction::client().execute` (as the docs show) — per event a
//!   transaction that records the event in `sqlnotify.effects` and commits with the insert,
//!   with the server's `synchronous_commit` (each commit waits for its flush).
//!
//! Each one records `(id, sent_us)` when it is called with the event (the handlers default to
//! 16 keys in flight).
//!
//! Sections (`--only=`; `handlers` selects both):
//!
//! * `handlers-backlog`: the consumer is registered, then a backlog of 50,000 rows is committed
//!   while it does not run; then it starts and drains it (one round with `--quick`, else 5,
//!   the kinds interleaved; the median round counts). Events/s from the first handler call to
//!   the last, so start-up is left out.
//! * `handlers-latency-1000`: one writer process, single-row transactions at 1,000 rows/s for
//!   the run time (5 interleaved rounds in a full run), the consumer running: from the
//!   writer's commit acknowledgement to the handler call (p50 / p99; it can be negative, the
//!   event overtaking the ack), and in the details from the writer's send (which includes the
//!   commit and its flush).

use std::rc::Rc;
use std::time::Duration;

use serde_json::Value;
use sqlnotify::{ChangeEvent, Handling, Notifier, Operation, Subscription, Tier};
use tokio_postgres::Client;

use crate::common::{count, ms, ratio, Table};
use crate::recorder::Shared;
use crate::writer::{Spec, Target, Writers};
use crate::{connect, create_table_sql, losses, outcome, watch, Ctx, Load, Outcome, SMALL};

/// The sections, for `--only`.
pub const BACKLOG: &str = "handlers-backlog";
pub const LATENCY: &str = "handlers-latency-1000";

/// Rows of one backlog run: enough that plain delivery takes tens of milliseconds to drain
/// them (the exactly-once handler takes seconds).
const BACKLOG_ROWS: u64 = 50_000;
/// Rows committed per backlog statement.
const BACKLOG_CHUNK: u64 = 10_000;

/// How the events are taken.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// `subscribe_fn` (the baseline).
    Plain,
    /// `Notifier::handle`, always `Ok`.
    Acked,
    /// `Notifier::handle_in_transaction`, one `INSERT`.
    Exactly,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Plain => "plain delivery (subscribe_fn)",
            Kind::Acked => "acknowledged handler (handle, Ok at once)",
            Kind::Exactly => "exactly-once handler (handle_in_transaction, one INSERT)",
        }
    }
}

/// Compared in each section; the first is the baseline.
const KINDS: [Kind; 3] = [Kind::Plain, Kind::Acked, Kind::Exactly];

/// What one run measured, and (exactly-once) the effect rows it committed.
struct Run {
    outcome: Outcome,
    effects: Option<i64>,
}

/// Runs the handler sections that `--only` selects.
pub async fn run(ctx: &Ctx, table: &mut Table) {
    if ctx.args.wants(BACKLOG) {
        backlog(ctx, table).await;
    }
    if ctx.args.wants(LATENCY) {
        latency(ctx, table).await;
    }
}

/// `id, sent_us` of `event` into the recorder.
fn record(shared: &Shared, event: &ChangeEvent) {
    shared.record(
        event.id().as_i64(),
        event.get("sent_us").and_then(Value::as_i64),
    );
}

/// Starts a notifier for `consumer` on `table` with the `kind` of taker, recording into
/// `shared`.
async fn start(ctx: &Ctx, kind: Kind, table: &str, consumer: &str, shared: &Shared) -> Notifier {
    let notifier = Notifier::builder(&ctx.url)
        .watch(watch(table, Tier::Durable))
        .consumer(consumer)
        .cleanup_on_stop(true)
        .start()
        .await
        .expect("start the notifier");
    let subscription = Subscription::new(table, Operation::Insert);
    let shared = shared.clone();
    let started = match kind {
        Kind::Plain => {
            notifier
                .subscribe_fn(subscription, move |event| record(&shared, &event))
                .await
        }
        Kind::Acked => {
            notifier
                .handle(subscription, Handling::new(consumer), move |event| {
                    record(&shared, &event);
                    async { Ok(()) }
                })
                .await
        }
        Kind::Exactly => {
            let sql: Rc<str> = format!("INSERT INTO {table}_fx (id) VALUES ($1)").into();
            notifier
                .handle_in_transaction(subscription, Handling::new(consumer), move |event, tx| {
                    record(&shared, &event);
                    let sql = sql.clone();
                    async move {
                        let id = event.id().as_i64().ok_or("an integer key")?;
                        tx.client().execute(&*sql, &[&id]).await?;
                        Ok(())
                    }
                })
                .await
        }
    };
    started.expect("subscribe the handler");
    notifier
}

/// The exactly-once handler's effect rows in `table`'s effect table, once `expected` are
/// there (or `cap` has passed): its last transactions commit just after their handler call.
async fn effects(client: &Client, table: &str, expected: u64, cap: Duration) -> i64 {
    let deadline = tokio::time::Instant::now() + cap;
    loop {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}_fx"), &[])
            .await
            .expect("count the effects")
            .get(0);
        if n as u64 >= expected || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // bounded poll
    }
}

/// Drops the run's tables and empties the journal (and the effect records) for the next run.
async fn clean_up(client: &Client, table: &str) {
    client
        .batch_execute(&format!(
            "DROP TABLE {table} CASCADE; DROP TABLE {table}_fx;
             DO $$ BEGIN
               IF to_regclass('sqlnotify.journal') IS NOT NULL THEN
                 TRUNCATE sqlnotify.journal, sqlnotify.overflow;
               END IF;
               IF to_regclass('sqlnotify.effects') IS NOT NULL THEN
                 TRUNCATE sqlnotify.effects;
               END IF;
             END $$;"
        ))
        .await
        .expect("drop the run's tables");
}

/// A fresh table (and effect table) and consumer; `rows` committed while the consumer is
/// registered but not running; then the `kind` of taker drains them.
async fn drain(ctx: &Ctx, kind: Kind, rows: u64) -> Run {
    let n = ctx.id();
    let table = format!("bench_{n}");
    let consumer = format!("bench-handler-{n}");
    let client = connect(&ctx.url).await;
    client
        .batch_execute(&format!(
            "{}; CREATE TABLE {table}_fx (id bigint NOT NULL)",
            create_table_sql(&table)
        ))
        .await
        .expect("create the tables");
    // Registered (triggers kept): it reads everything committed from now on.
    Notifier::builder(&ctx.url)
        .watch(watch(&table, Tier::Durable))
        .consumer(&consumer)
        .start()
        .await
        .expect("register the consumer")
        .stop()
        .await
        .expect("stop");
    let mut written = 0;
    while written < rows {
        let upto = (written + BACKLOG_CHUNK).min(rows);
        client
            .execute(
                &format!(
                    "INSERT INTO {table} (id, sent_us, payload) \
                     SELECT g, 0, 'p' FROM generate_series($1::bigint, $2::bigint) g"
                ),
                &[&(written as i64 + 1), &(upto as i64)],
            )
            .await
            .expect("write the backlog");
        written = upto;
    }
    let shared = Shared::default();
    let (idle, cap) = ctx.args.waits();
    let notifier = start(ctx, kind, &table, &consumer, &shared).await;
    shared.wait_for(rows, idle, cap).await;
    let effects = match kind {
        Kind::Exactly => Some(effects(&client, &table, rows, idle).await),
        _ => None,
    };
    notifier.stop().await.expect("stop the notifier");
    let _ = notifier.drop_consumer(&consumer).await;
    clean_up(&client, &table).await;
    let rec = shared.recorder.borrow();
    let span_s = ((rec.last_arrival_us - rec.first_arrival_us) as f64 / 1e6).max(1e-6);
    Run {
        outcome: Outcome {
            rounds: 1,
            committed: rows,
            unique: rec.unique,
            duplicates: rec.duplicates,
            malformed: rec.malformed,
            lost: rows.saturating_sub(rec.unique),
            delivered_rate: rec.unique.saturating_sub(1) as f64 / span_s,
            ..Outcome::default()
        },
        effects,
    }
}

/// A fresh table and consumer with the `kind` of taker running; one writer process commits
/// `load`.
async fn paced(ctx: &Ctx, kind: Kind, load: Load) -> Run {
    let n = ctx.id();
    let table = format!("bench_{n}");
    let consumer = format!("bench-handler-{n}");
    let client = connect(&ctx.url).await;
    client
        .batch_execute(&format!(
            "{}; CREATE TABLE {table}_fx (id bigint NOT NULL)",
            create_table_sql(&table)
        ))
        .await
        .expect("create the tables");
    let shared = Shared::default();
    let notifier = start(ctx, kind, &table, &consumer, &shared).await;
    let specs: Vec<Spec> = (0..load.writers)
        .map(|w| Spec {
            target: Target::Postgres(ctx.url.clone()),
            table: table.clone(),
            rate: load.rate,
            duration_ms: load.duration.as_millis() as u64,
            txn_rows: load.txn_rows,
            payload_bytes: load.payload_bytes,
            writer: w,
            async_commit: load.async_commit,
            update_previous: false,
            session_sql: None,
        })
        .collect();
    let mut writers = Writers::start(&specs).await;
    writers.go();
    let reports = writers.finish().await;
    let committed: u64 = reports.iter().map(|r| r.committed).sum();
    let (idle, cap) = ctx.args.waits();
    shared.wait_for(committed, idle, cap).await;
    let effects = match kind {
        Kind::Exactly => Some(effects(&client, &table, committed, idle).await),
        _ => None,
    };
    notifier.stop().await.expect("stop the notifier");
    let _ = notifier.drop_consumer(&consumer).await;
    clean_up(&client, &table).await;
    Run {
        outcome: outcome(&reports, &shared, true),
        effects,
    }
}

/// Each kind's runs merged (in `KINDS` order), and the effect rows over all its rounds.
fn merge(runs: Vec<Vec<Run>>) -> Vec<(Outcome, Option<i64>)> {
    runs.into_iter()
        .map(|runs| {
            let effects = runs
                .iter()
                .map(|r| r.effects)
                .reduce(|a, b| Some(a? + b?))
                .flatten();
            (
                Outcome::merge(runs.into_iter().map(|r| r.outcome).collect()),
                effects,
            )
        })
        .collect()
}

/// "1/144 of plain delivery's rate · " when the ratio is too small for two decimals.
fn fraction(rate: f64, plain: f64) -> String {
    if rate > 0.0 && rate < plain / 10.0 {
        format!("1/{:.0} of plain delivery's rate · ", plain / rate)
    } else {
        String::new()
    }
}

/// "effect rows committed 50,000 of 50,000 · " for the exactly-once handler.
fn effects_note(effects: Option<i64>, o: &Outcome) -> String {
    match effects {
        Some(n) => format!(
            "effect rows committed {} of {} · ",
            count(n as f64),
            count(o.committed as f64)
        ),
        None => String::new(),
    }
}

/// The backlog section: 1 round with `--quick`, else 5, each kind in turn per round.
async fn backlog(ctx: &Ctx, table: &mut Table) {
    let (rounds, rows): (u64, u64) = if ctx.args.quick {
        (1, BACKLOG_ROWS)
    } else {
        (5, BACKLOG_ROWS)
    };
    eprintln!("handlers: a backlog of {rows} rows, {rounds} round(s) …");
    let mut runs: Vec<Vec<Run>> = KINDS.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, &kind) in KINDS.iter().enumerate() {
            runs[i].push(drain(ctx, kind, rows).await);
        }
    }
    let mut merged = merge(runs).into_iter();
    let (plain, _) = merged.next().expect("plain");
    eprintln!(
        "  plain delivery: {} ev/s, {}",
        count(plain.delivered_rate),
        losses(&plain)
    );
    for (kind, (o, effects)) in KINDS[1..].iter().zip(merged) {
        table.row(vec![
            format!(
                "handlers · a backlog of {} rows{} drained by a named consumer, durable tier · {}",
                count(rows as f64),
                if rounds > 1 {
                    format!(" (× {rounds} rounds)")
                } else {
                    String::new()
                },
                kind.label()
            ),
            "handled ev/s".into(),
            count(plain.delivered_rate),
            count(o.delivered_rate),
            ratio(o.delivered_rate, plain.delivered_rate),
            format!(
                "baseline: plain delivery (subscribe_fn), same consumer setup; from the first \
                 handler call to the last; {}{}{} (plain: {})",
                fraction(o.delivered_rate, plain.delivered_rate),
                effects_note(effects, &o),
                losses(&o),
                losses(&plain)
            ),
        ]);
    }
}

/// The latency section: one writer, single-row transactions at 1,000 rows/s.
async fn latency(ctx: &Ctx, table: &mut Table) {
    eprintln!("handlers: latency at 1000 rows/s …");
    let load = Load {
        writers: 1,
        rate: 1_000,
        txn_rows: 1,
        payload_bytes: SMALL,
        duration: ctx.args.run_time(),
        async_commit: false,
    };
    // As the other latency sections: 5 interleaved rounds of a fifth of the run time, one
    // with --quick.
    let rounds = if ctx.args.quick { 1 } else { 5 };
    let load = Load {
        duration: load.duration / rounds,
        ..load
    };
    let mut runs: Vec<Vec<Run>> = KINDS.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, &kind) in KINDS.iter().enumerate() {
            runs[i].push(paced(ctx, kind, load).await);
        }
    }
    let mut merged = merge(runs).into_iter();
    let (plain, _) = merged.next().expect("plain");
    eprintln!(
        "  plain delivery: p50 {} p99 {} ms; after the commit ack p50 {} p99 {}; {}",
        ms(plain.p(50.0)),
        ms(plain.p(99.0)),
        ms(plain.after_commit_p(50.0)),
        ms(plain.after_commit_p(99.0)),
        losses(&plain)
    );
    for (kind, (o, effects)) in KINDS[1..].iter().zip(merged) {
        table.row(latency_row(kind, &o, effects, &plain));
    }
}

/// A latency row: commit acknowledged to the writer → handler call, against plain delivery;
/// send → handler call (which includes the commit) in the details.
fn latency_row(kind: &Kind, o: &Outcome, effects: Option<i64>, plain: &Outcome) -> Vec<String> {
    let pair = |a: f64, b: f64| format!("{} / {}", ms(a), ms(b));
    vec![
        format!(
            "handlers · latency 1000 rows/s, named consumer, durable tier, commit ack → handler \
             call · {}",
            kind.label()
        ),
        "p50 / p99 ms".into(),
        pair(plain.after_commit_p(50.0), plain.after_commit_p(99.0)),
        pair(o.after_commit_p(50.0), o.after_commit_p(99.0)),
        format!(
            "{} / {}",
            ratio(o.after_commit_p(50.0), plain.after_commit_p(50.0)),
            ratio(o.after_commit_p(99.0), plain.after_commit_p(99.0))
        ),
        format!(
            "{}send → handler call (includes the commit) p50/p99 {} (plain {}) · p95 {} (plain \
             {}) · max {} (plain {}) · commit p50/p99 {} (plain {}) · {} (plain: {})",
            effects_note(effects, o),
            pair(o.p(50.0), o.p(99.0)),
            pair(plain.p(50.0), plain.p(99.0)),
            ms(o.after_commit_p(95.0)),
            ms(plain.after_commit_p(95.0)),
            ms(o.after_commit.last().copied().unwrap_or(f64::NAN)),
            ms(plain.after_commit.last().copied().unwrap_or(f64::NAN)),
            pair(o.commit_p(50.0), o.commit_p(99.0)),
            pair(plain.commit_p(50.0), plain.commit_p(99.0)),
            losses(o),
            losses(plain)
        ),
    ]
}
