//! The dead-letter table on PostgreSQL, SQLite and MySQL / MariaDB (feature `mysql`): the
//! handler engine's calls (recording failures, upserts across processes, resolving, taking
//! requested rows, handing them back — a handler's, or some by id) through `sqlnotify::bench_support::DeadLetterCalls`,
//! and the public `DeadLetters` API (list, get, retry, discard, counts) — from a builder
//! without a notifier and from a running one. Also: reads create nothing, the first record
//! creates the table (several at once), the install and its script create it, cleanup keeps
//! it, two processes taking requested rows at once never take one twice, and rows holding
//! what no dead letter can are errors naming the table, and rows the driver cannot convert are
//! errors too, never panics; a stored attempt count at its column's largest ends in a dead
//! letter after a restart.
//!
//! Each test uses a database of its own (a file for SQLite), dropped at the end.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use common::backend::{Backend, Kind, Pg};
use sqlnotify::bench_support::{DeadLetterCalls, FailedAttempt};
use sqlnotify::{DeadLetterCounts, DeadLetterState, DeadLetters, Error, Operation, Tier};

/// The dead-letter table's name on `db`'s dialect.
fn table(db: &impl Backend) -> &'static str {
    match db.kind() {
        Kind::Postgres(_) => "sqlnotify.dead_letters",
        _ => "sqlnotify_dead_letters",
    }
}

/// Whether the dead-letter table exists in `db`.
async fn has_table(db: &impl Backend) -> bool {
    let sql = match db.kind() {
        Kind::Postgres(_) => {
            "SELECT (to_regclass('sqlnotify.dead_letters') IS NOT NULL)::int::int8".to_string()
        }
        Kind::Sqlite => "SELECT count(*) FROM sqlite_master WHERE type = 'table' \
                         AND name = 'sqlnotify_dead_letters'"
            .to_string(),
        Kind::Mysql => "SELECT COUNT(*) FROM information_schema.TABLES \
                        WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'sqlnotify_dead_letters'"
            .to_string(),
    };
    db.number(&sql).await == 1
}

fn dead_letters(db: &impl Backend) -> DeadLetters {
    db.builder().dead_letters().expect("a dead-letter store")
}

/// A first failed attempt of `handler` on event (`sequence`, `part`).
fn attempt(handler: &str, sequence: Option<i64>, part: u32) -> FailedAttempt {
    let key = format!("[{}]", sequence.unwrap_or(0));
    FailedAttempt {
        id: None,
        handler: handler.into(),
        channel: "sqlnotify_app_orders_insert".into(),
        sequence,
        part,
        event: format!(
            r#"{{"channel":"sqlnotify_app_orders_insert","id":{},"sequence":{}}}"#,
            sequence.unwrap_or(0),
            sequence.map_or("null".to_string(), |s| s.to_string())
        ),
        key,
        attempts: 1,
        error: "first try failed".into(),
        state: DeadLetterState::Retrying,
    }
}

fn counts(retrying: u64, dead: u64, requested: u64, redelivering: u64) -> DeadLetterCounts {
    let mut counts = DeadLetterCounts::default();
    counts.retrying = retrying;
    counts.dead = dead;
    counts.requested = requested;
    counts.redelivering = redelivering;
    counts
}

/// Within a minute of now (the database's clock is this machine's).
fn recent(t: SystemTime) -> bool {
    let now = SystemTime::now();
    let off = now
        .duration_since(t)
        .or_else(|_| t.duration_since(now))
        .unwrap();
    off < Duration::from_secs(60)
}

fn ids(letters: &[sqlnotify::DeadLetter]) -> Vec<i64> {
    letters.iter().map(|l| l.id).collect()
}

/// Every call on a database where sqlnotify was never installed: no rows, nothing created.
async fn reads_find_nothing_and_create_nothing(db: &impl Backend) {
    let letters = dead_letters(db);
    let calls = DeadLetterCalls::new(&letters);
    assert!(letters.list(None, None).await.unwrap().is_empty());
    assert_eq!(
        letters.counts(None).await.unwrap(),
        DeadLetterCounts::default()
    );
    let e = letters.get(1).await.unwrap_err();
    assert!(matches!(e, Error::UnknownDeadLetter { id: 1 }), "{e:?}");
    assert_eq!(letters.retry(&[1, 2]).await.unwrap(), 0);
    assert_eq!(letters.retry_handler("billing").await.unwrap(), 0);
    assert_eq!(letters.discard(&[1]).await.unwrap(), 0);
    assert_eq!(letters.discard_handler("billing").await.unwrap(), 0);
    assert!(calls.retrying("billing").await.unwrap().is_empty());
    assert!(calls.dead("billing").await.unwrap().is_empty());
    assert_eq!(calls.resolve_event("billing", 1, 0).await.unwrap(), 0);
    assert!(calls
        .take_requested("billing", 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(calls.reset_redelivering("billing").await.unwrap(), 0);
    assert_eq!(calls.hand_back(&[1, 2]).await.unwrap(), 0);
    calls.resolve(1).await.unwrap();
    assert!(!has_table(db).await, "reading created the table");
}

/// A row's whole life, and the API around it.
async fn a_failure_is_recorded_retried_and_discarded(db: &impl Backend) {
    reads_find_nothing_and_create_nothing(db).await;
    let letters = dead_letters(db);
    let calls = DeadLetterCalls::new(&letters);

    // the first failure creates the table and a `retrying` row
    let id = calls.record(attempt("billing", Some(10), 0)).await.unwrap();
    assert!(has_table(db).await);
    let first = letters.get(id).await.unwrap();
    assert_eq!(
        (
            first.id,
            first.handler.as_str(),
            first.state,
            first.attempts
        ),
        (id, "billing", DeadLetterState::Retrying, 1)
    );
    assert_eq!((first.sequence, first.part), (Some(10), 0));
    assert_eq!(first.channel, "sqlnotify_app_orders_insert");
    assert_eq!(first.key, "[10]");
    assert_eq!(
        first.event,
        r#"{"channel":"sqlnotify_app_orders_insert","id":10,"sequence":10}"#
    );
    assert_eq!(first.error, "first try failed");
    assert!(recent(first.first_failed), "{:?}", first.first_failed);
    assert!(first.last_failed >= first.first_failed);

    // another process (restart, failover) failing on the same event: the same row
    let mut again = attempt("billing", Some(10), 0);
    again.attempts = 2;
    again.error = "second try failed".into();
    assert_eq!(calls.record(again).await.unwrap(), id);
    // and this process again, by id, with a multi-line error kept whole
    let mut third = attempt("billing", Some(10), 0);
    third.id = Some(id);
    third.attempts = 3;
    third.error = "third try failed:\n  connection reset".into();
    assert_eq!(calls.record(third.clone()).await.unwrap(), id);
    let now = letters.get(id).await.unwrap();
    assert_eq!(now.attempts, 3);
    assert_eq!(now.error, "third try failed:\n  connection reset");
    assert_eq!(now.first_failed, first.first_failed, "first_failed is kept");
    assert!(now.last_failed >= first.last_failed);

    // another row of the same statement-capture journal row; events without a sequence are
    // new rows each time; another handler's failure on the same event is its own row
    let part1 = calls.record(attempt("billing", Some(10), 1)).await.unwrap();
    let loose1 = calls.record(attempt("billing", None, 0)).await.unwrap();
    let loose2 = calls.record(attempt("billing", None, 0)).await.unwrap();
    let audit = calls.record(attempt("audit", Some(10), 0)).await.unwrap();
    let all = [id, part1, loose1, loose2, audit];
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 5, "{all:?}");
    assert_eq!(
        ids(&letters.list(None, None).await.unwrap()),
        all,
        "oldest first"
    );
    assert_eq!(
        ids(&letters.list(Some("billing"), Some(2)).await.unwrap()),
        [id, part1]
    );
    assert!(letters.list(Some("nobody"), None).await.unwrap().is_empty());
    let loose = letters.get(loose1).await.unwrap();
    assert_eq!((loose.sequence, loose.key.as_str()), (None, "[0]"));

    // what a process taking over continues: the rows with a sequence
    assert_eq!(
        calls.retrying("billing").await.unwrap(),
        [(id, 10, 0, 3), (part1, 10, 1, 1)]
    );
    assert_eq!(calls.retrying("audit").await.unwrap(), [(audit, 10, 0, 1)]);

    // retry and discard act on dead rows only
    assert_eq!(letters.retry(&all).await.unwrap(), 0);
    assert_eq!(letters.retry_handler("billing").await.unwrap(), 0);
    assert_eq!(letters.discard(&all).await.unwrap(), 0);
    assert_eq!(letters.discard_handler("billing").await.unwrap(), 0);
    assert_eq!(letters.counts(None).await.unwrap(), counts(5, 0, 0, 0));

    // out of attempts: dead (by id), and by upsert for an event recorded by another process
    let mut last = third;
    last.attempts = 5;
    last.state = DeadLetterState::Dead;
    last.error = "gave up".into();
    assert_eq!(calls.record(last).await.unwrap(), id);
    let mut dead_part = attempt("billing", Some(10), 1);
    dead_part.attempts = 5;
    dead_part.state = DeadLetterState::Dead;
    assert_eq!(calls.record(dead_part).await.unwrap(), part1);
    let mut dead_loose = attempt("billing", None, 0);
    dead_loose.id = Some(loose2);
    dead_loose.state = DeadLetterState::Dead;
    assert_eq!(calls.record(dead_loose).await.unwrap(), loose2);
    let dead = letters.get(id).await.unwrap();
    assert_eq!(
        (dead.state, dead.attempts, dead.error.as_str()),
        (DeadLetterState::Dead, 5, "gave up")
    );
    assert_eq!(letters.counts(None).await.unwrap(), counts(2, 3, 0, 0));
    assert_eq!(
        letters.counts(Some("billing")).await.unwrap(),
        counts(1, 3, 0, 0)
    );
    assert_eq!(
        letters.counts(Some("audit")).await.unwrap(),
        counts(1, 0, 0, 0)
    );
    assert_eq!(
        calls.retrying("billing").await.unwrap(),
        [],
        "loose1 has no sequence"
    );

    // retry: dead → requested (unknown ids and rows not dead are left alone), once
    assert_eq!(letters.retry(&[id, loose1, 999_999]).await.unwrap(), 1);
    assert_eq!(letters.retry(&[id]).await.unwrap(), 0);
    assert_eq!(
        letters.get(id).await.unwrap().state,
        DeadLetterState::Requested
    );
    assert_eq!(
        letters.get(loose1).await.unwrap().state,
        DeadLetterState::Retrying
    );
    assert_eq!(letters.retry_handler("billing").await.unwrap(), 2);
    assert_eq!(letters.counts(None).await.unwrap(), counts(2, 0, 3, 0));

    // taking: oldest first, at most `limit`, each once; marked redelivering
    assert_eq!(calls.take_requested("audit", 10).await.unwrap(), []);
    let taken = calls.take_requested("billing", 2).await.unwrap();
    assert_eq!(ids(&taken), [id, part1]);
    assert!(taken
        .iter()
        .all(|l| l.state == DeadLetterState::Redelivering));
    assert_eq!((taken[0].attempts, taken[0].sequence), (5, Some(10)));
    assert_eq!(taken[0].event, first.event, "the whole event comes back");
    assert_eq!(
        ids(&calls.take_requested("billing", 10).await.unwrap()),
        [loose2]
    );
    assert_eq!(calls.take_requested("billing", 10).await.unwrap(), []);
    assert_eq!(letters.counts(None).await.unwrap(), counts(2, 0, 0, 3));
    // neither retried nor discarded while being delivered again
    assert_eq!(letters.retry(&[id]).await.unwrap(), 0);
    assert_eq!(letters.discard(&[id]).await.unwrap(), 0);

    // the process delivering them is gone: handed back, taken again
    assert_eq!(calls.reset_redelivering("audit").await.unwrap(), 0);
    assert_eq!(calls.reset_redelivering("billing").await.unwrap(), 3);
    assert_eq!(letters.counts(None).await.unwrap(), counts(2, 0, 3, 0));
    assert_eq!(
        ids(&calls.take_requested("billing", 10).await.unwrap()),
        [id, part1, loose2]
    );

    // a process that stood by hands back what it had taken, by id: rows being delivered
    // again only (a retrying row and unknown ids are left alone)
    assert_eq!(calls.hand_back(&[]).await.unwrap(), 0);
    assert_eq!(calls.hand_back(&[part1, loose1, 999_999]).await.unwrap(), 1);
    assert_eq!(letters.counts(None).await.unwrap(), counts(2, 0, 1, 2));
    assert_eq!(
        letters.get(loose1).await.unwrap().state,
        DeadLetterState::Retrying
    );
    assert_eq!(
        ids(&calls.take_requested("billing", 10).await.unwrap()),
        [part1]
    );
    assert_eq!(letters.counts(None).await.unwrap(), counts(2, 0, 0, 3));

    // delivered again: one succeeds (the row goes), one fails (dead again, by id)
    calls.resolve(id).await.unwrap();
    let e = letters.get(id).await.unwrap_err();
    assert!(
        matches!(e, Error::UnknownDeadLetter { id: gone } if gone == id),
        "{e:?}"
    );
    let mut failed_again = attempt("billing", Some(10), 1);
    failed_again.id = Some(part1);
    failed_again.state = DeadLetterState::Dead;
    failed_again.error = "still failing".into();
    assert_eq!(calls.record(failed_again).await.unwrap(), part1);
    let mut loose_again = attempt("billing", None, 0);
    loose_again.id = Some(loose2);
    loose_again.state = DeadLetterState::Dead;
    assert_eq!(calls.record(loose_again).await.unwrap(), loose2);
    assert_eq!(letters.counts(None).await.unwrap(), counts(2, 2, 0, 0));

    // discard: dead rows only, by id or by handler
    assert_eq!(letters.discard(&[part1, loose1]).await.unwrap(), 1);
    assert_eq!(letters.discard_handler("audit").await.unwrap(), 0);
    assert_eq!(letters.discard_handler("billing").await.unwrap(), 1);
    assert_eq!(
        ids(&letters.list(None, None).await.unwrap()),
        [loose1, audit]
    );

    // a row deleted by hand while its event was retried: recorded afresh
    db.run(&format!("DELETE FROM {} WHERE id = {audit}", table(db)))
        .await;
    let mut gone = attempt("audit", Some(10), 0);
    gone.id = Some(audit);
    gone.attempts = 2;
    let fresh = calls.record(gone).await.unwrap();
    assert_ne!(fresh, audit, "ids are not reused");
    assert_eq!(letters.get(fresh).await.unwrap().attempts, 2);
}

/// Two stores (two processes) taking requested rows at the same time never take one twice,
/// and together take them all.
async fn concurrent_takers_take_each_row_once(db: &impl Backend) {
    let (a, b) = (dead_letters(db), dead_letters(db));
    let (calls_a, calls_b) = (DeadLetterCalls::new(&a), DeadLetterCalls::new(&b));
    let mut recorded = BTreeSet::new();
    for seq in 1..=40 {
        let mut failure = attempt("billing", Some(seq), 0);
        failure.state = DeadLetterState::Dead;
        recorded.insert(calls_a.record(failure).await.unwrap());
    }
    assert_eq!(a.retry_handler("billing").await.unwrap(), 40);
    let take = |calls: DeadLetterCalls| async move {
        let mut taken = Vec::new();
        loop {
            let batch = calls.take_requested("billing", 3).await.unwrap();
            if batch.is_empty() {
                return taken;
            }
            taken.extend(ids(&batch));
        }
    };
    let (took_a, took_b) = tokio::join!(take(calls_a), take(calls_b));
    let mut all = took_a.clone();
    all.extend(&took_b);
    let unique: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(
        unique.len(),
        all.len(),
        "taken twice: {took_a:?} {took_b:?}"
    );
    assert_eq!(unique, recorded);
    assert_eq!(a.counts(None).await.unwrap(), counts(0, 0, 0, 40));
}

/// Rows holding what no dead letter can: errors naming the table and the row, no panic.
async fn rows_that_cannot_be_dead_letters_are_errors(db: &impl Backend, bad_time: Option<&str>) {
    let letters = dead_letters(db);
    let calls = DeadLetterCalls::new(&letters);
    let id = calls.record(attempt("billing", Some(1), 0)).await.unwrap();
    let t = table(db);
    let check = |e: Error, what: &str| {
        let text = e.to_string();
        assert!(matches!(e, Error::InvalidPayload { .. }), "{e:?}");
        assert!(text.contains(t) && text.contains(what), "{text}");
    };
    db.run(&format!("UPDATE {t} SET state = 'Dead' WHERE id = {id}"))
        .await;
    check(
        letters.get(id).await.unwrap_err(),
        &format!("dead letter {id} has an unknown state \"Dead\""),
    );
    check(
        letters.list(None, None).await.unwrap_err(),
        "unknown state \"Dead\"",
    );
    check(
        letters.counts(None).await.unwrap_err(),
        "unknown state \"Dead\"",
    );
    db.run(&format!(
        "UPDATE {t} SET state = 'retrying', attempts = -1 WHERE id = {id}"
    ))
    .await;
    check(
        letters.get(id).await.unwrap_err(),
        "has attempts -1, not a count",
    );
    check(
        calls.retrying("billing").await.unwrap_err(),
        "has attempts -1, not a count",
    );
    if let Some(value) = bad_time {
        db.run(&format!(
            "UPDATE {t} SET attempts = 1, first_failed = {value} WHERE id = {id}"
        ))
        .await;
        check(letters.get(id).await.unwrap_err(), "has first_failed");
    }
    // One such row among those of a handler requested for retry: it is marked dead, its error
    // saying why, and the others are taken (it used to fail every take, for ever).
    let record_dead = |sequence| {
        let mut failure = attempt("audit", Some(sequence), 0);
        failure.state = DeadLetterState::Dead;
        calls.record(failure)
    };
    let bad = record_dead(2).await.unwrap();
    let good = record_dead(3).await.unwrap();
    assert_eq!(letters.retry(&[bad, good]).await.unwrap(), 2);
    db.run(&format!("UPDATE {t} SET attempts = -1 WHERE id = {bad}"))
        .await;
    assert_eq!(
        ids(&calls.take_requested("audit", 10).await.unwrap()),
        [good]
    );
    assert_eq!(calls.take_requested("audit", 10).await.unwrap(), []);
    assert_eq!(
        letters.counts(Some("audit")).await.unwrap(),
        counts(0, 1, 0, 1)
    );
    let why = format!(
        "SELECT count(*) FROM {t} WHERE id = {bad} AND state = 'dead' \
         AND error LIKE 'cannot be delivered again:%attempts -1%'"
    );
    assert_eq!(db.number(&why).await, 1, "marked dead, saying why");
}

/// A row the driver cannot convert (a NULL state, once someone let the column hold one) is
/// an error of the call that read it, never a panic: the API answers with the error, and a
/// running handler, whose every look at the table counts its rows by state, goes on handling
/// (a panic there used to end its loop, silently). `allow_null` lets `state` hold a NULL.
async fn a_row_the_driver_cannot_convert_is_an_error_and_handlers_go_on(
    db: &impl Backend,
    allow_null: &str,
) {
    db.run("CREATE TABLE orders (id INTEGER PRIMARY KEY)").await;
    let notifier = db
        .builder()
        .watch(db.watch("orders", Operation::Insert))
        .start()
        .await
        .unwrap();
    let letters = notifier.dead_letters().unwrap();
    let id = DeadLetterCalls::new(&letters)
        .record(attempt("billing", Some(1), 0))
        .await
        .unwrap();
    db.run(allow_null).await;
    db.run(&format!(
        "UPDATE {} SET state = NULL WHERE id = {id}",
        table(db)
    ))
    .await;
    let e = letters.counts(None).await.unwrap_err();
    assert!(
        matches!(e, Error::Database { .. })
            && e.to_string()
                .starts_with("counting in the dead-letter table: panicked"),
        "{e}"
    );
    let handled = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let h = handled.clone();
    notifier
        .handle(
            sqlnotify::Subscription::new("orders", Operation::Insert),
            sqlnotify::Handling::new("billing").redelivery_poll(Duration::from_millis(20)),
            move |event: sqlnotify::ChangeEvent| {
                let h = h.clone();
                async move {
                    h.borrow_mut().push(event.id().as_i64().unwrap());
                    Ok::<(), sqlnotify::HandlerError>(())
                }
            },
        )
        .await
        .unwrap();
    for (ids, total) in [(1..=3, 3), (4..=6, 6)] {
        db.insert_ids("orders", ids).await;
        assert!(
            common::wait_until(Duration::from_secs(10), || async {
                handled.borrow().len() == total
            })
            .await,
            "the handler stopped: handled {:?}",
            handled.borrow()
        );
    }
    notifier.stop().await.unwrap();
}

/// Starts consumer `limit` with handler `limit`, which fails on every event (1,000 attempts,
/// 200 ms apart).
async fn start_always_failing(db: &impl Backend) -> sqlnotify::Notifier {
    start_failing(
        db,
        "limit",
        1_000,
        Duration::from_millis(200),
        "always fails",
    )
    .await
}

/// Starts consumer `name` on the inserts into `orders`, with handler `name`, which fails on
/// every event with `error` (`attempts` attempts, `delay` apart).
async fn start_failing(
    db: &impl Backend,
    name: &str,
    attempts: u32,
    delay: Duration,
    error: &'static str,
) -> sqlnotify::Notifier {
    let notifier = db
        .builder()
        .watch(db.watch("orders", Operation::Insert))
        .consumer(name)
        .start()
        .await
        .unwrap();
    notifier
        .handle(
            sqlnotify::Subscription::new("orders", Operation::Insert),
            sqlnotify::Handling::new(name)
                .max_attempts(attempts)
                .backoff(delay, delay),
            move |_: sqlnotify::ChangeEvent| async move { Err::<(), _>(error.into()) },
        )
        .await
        .unwrap();
    notifier
}

/// A `retrying` row whose attempt count is the largest the column holds (a row changed by
/// hand, or by a role that can write the table): after a restart the event comes back, its
/// next attempt is past the last allowed, and it fails into a dead letter whose count stays
/// at the column's largest. On MySQL the count one past it failed the write under a strict
/// `sql_mode`: the event was retried for ever, never dead-lettered, holding the consumer's
/// position. `largest` is the column's largest value.
async fn a_count_at_the_columns_limit_ends_in_a_dead_letter(db: &impl Backend, largest: u32) {
    db.run("CREATE TABLE orders (id INTEGER PRIMARY KEY)").await;
    let letters = dead_letters(db);
    let stored = || async {
        let list = letters.list(Some("limit"), None).await.unwrap();
        list.first().map(|l| (l.attempts, l.state))
    };
    let notifier = start_always_failing(db).await;
    db.insert_ids("orders", 1..=1).await;
    assert!(
        common::wait_until(Duration::from_secs(10), || async {
            matches!(stored().await, Some((_, DeadLetterState::Retrying)))
        })
        .await,
        "the event never failed"
    );
    notifier.stop().await.unwrap();
    db.run(&format!("UPDATE {} SET attempts = {largest}", table(db)))
        .await;
    let notifier = start_always_failing(db).await;
    assert!(
        common::wait_until(Duration::from_secs(10), || async {
            stored().await == Some((largest, DeadLetterState::Dead))
        })
        .await,
        "never a dead letter: {:?}",
        stored().await
    );
    notifier.stop().await.unwrap();
}

/// Starts consumer `consumer` with handler `billing`, which handles every event (recording
/// its id in `handled`), or — `fails` — fails on every one, dead-lettering it at its first
/// attempt.
async fn start_billing(
    db: &impl Backend,
    consumer: &str,
    fails: bool,
    handled: std::rc::Rc<std::cell::RefCell<Vec<i64>>>,
) -> sqlnotify::Notifier {
    let notifier = db
        .builder()
        .watch(db.watch("orders", Operation::Insert))
        .consumer(consumer)
        .start()
        .await
        .unwrap();
    notifier
        .handle(
            sqlnotify::Subscription::new("orders", Operation::Insert),
            sqlnotify::Handling::new("billing")
                .max_attempts(1)
                .redelivery_poll(Duration::from_millis(20)),
            move |event: sqlnotify::ChangeEvent| {
                let handled = handled.clone();
                async move {
                    if fails {
                        return Err::<(), _>("fails".into());
                    }
                    handled.borrow_mut().push(event.id().as_i64().unwrap());
                    Ok(())
                }
            },
        )
        .await
        .unwrap();
    notifier
}

/// A dead letter whose event the journal delivers again — the process that stored it ended
/// before the position was saved past it — goes once the handler handles the event: else,
/// retried later, the stale dead letter would run the event again after newer ones of its
/// key. A dead letter of an event not delivered again stays. Here consumer `late` stands for
/// the position not saved past the event: registered before it, it reads it from the journal
/// after consumer `first` dead-lettered it. Before, the dead letter stayed.
async fn a_dead_letter_goes_when_its_event_is_handled_later(db: &impl Backend) {
    db.run("CREATE TABLE orders (id INTEGER PRIMARY KEY)").await;
    let handled = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let letters = dead_letters(db);
    let calls = DeadLetterCalls::new(&letters);
    // `late`'s position, placed before the event.
    start_billing(db, "late", false, handled.clone())
        .await
        .stop()
        .await
        .unwrap();
    let notifier = start_billing(db, "first", true, handled.clone()).await;
    db.insert_ids("orders", 1..=1).await;
    assert!(
        common::wait_until(Duration::from_secs(10), || async {
            calls.dead("billing").await.unwrap().len() == 1
        })
        .await,
        "never dead-lettered: {:?}",
        letters.list(None, None).await.unwrap()
    );
    notifier.stop().await.unwrap();
    let mut other = attempt("billing", Some(1_000_000), 0);
    other.state = DeadLetterState::Dead;
    let other = calls.record(other).await.unwrap();

    let notifier = start_billing(db, "late", false, handled.clone()).await;
    assert!(
        common::wait_until(Duration::from_secs(10), || async {
            handled.borrow().contains(&1)
        })
        .await,
        "the event was not delivered again"
    );
    assert!(
        common::wait_until(Duration::from_secs(5), || async {
            ids(&letters.list(Some("billing"), None).await.unwrap()) == [other]
        })
        .await,
        "the handled event's dead letter stayed: {:?}",
        letters.list(Some("billing"), None).await.unwrap()
    );
    notifier.stop().await.unwrap();
    assert_eq!(*handled.borrow(), [1]);
    // The store's delete takes `retrying` and `dead` rows only: a row a retry was asked for
    // is in the hands of the handler's active process.
    let mut requested = attempt("billing", Some(2_000_000), 0);
    requested.state = DeadLetterState::Dead;
    let requested = calls.record(requested).await.unwrap();
    assert_eq!(letters.retry(&[requested]).await.unwrap(), 1);
    assert_eq!(
        calls.resolve_event("billing", 2_000_000, 0).await.unwrap(),
        0
    );
    assert_eq!(calls.resolve_event("audit", 1_000_000, 0).await.unwrap(), 0);
    assert_eq!(
        calls.resolve_event("billing", 1_000_000, 0).await.unwrap(),
        1
    );
    assert_eq!(ids(&letters.list(None, None).await.unwrap()), [requested]);
}

/// Starting a notifier creates the table with sqlnotify's others; a running notifier's
/// `dead_letters()` works (and still after `stop()`); `cleanup()` keeps the table and its rows.
async fn the_install_creates_the_table_and_cleanup_keeps_it(db: &impl Backend) {
    db.run("CREATE TABLE orders (id INTEGER PRIMARY KEY)").await;
    let builder = db.builder().watch(db.watch("orders", Operation::Insert));
    let notifier = builder.clone().start().await.unwrap();
    assert!(has_table(db).await, "installed with the other tables");
    let letters = notifier.dead_letters().unwrap();
    let id = DeadLetterCalls::new(&letters)
        .record(attempt("billing", Some(1), 0))
        .await
        .unwrap();
    assert_eq!(letters.list(None, None).await.unwrap().len(), 1);
    notifier.stop().await.unwrap();
    assert_eq!(letters.get(id).await.unwrap().id, id, "after stop()");
    assert_eq!(builder.cleanup().await.unwrap(), 1);
    assert!(has_table(db).await);
    assert_eq!(ids(&dead_letters(db).list(None, None).await.unwrap()), [id]);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn postgres_records_retries_and_discards() {
    a_failure_is_recorded_retried_and_discarded(&Pg::new(Tier::Durable).await).await;
}

#[actix_rt::test]
async fn postgres_a_dead_letter_goes_when_its_event_is_handled_later() {
    a_dead_letter_goes_when_its_event_is_handled_later(&Pg::new(Tier::Durable).await).await;
}

#[actix_rt::test]
async fn postgres_takers_take_each_row_once() {
    concurrent_takers_take_each_row_once(&Pg::new(Tier::Durable).await).await;
}

#[actix_rt::test]
async fn postgres_rows_that_cannot_be_dead_letters_are_errors() {
    let db = Pg::new(Tier::Durable).await;
    rows_that_cannot_be_dead_letters_are_errors(&db, Some("'infinity'")).await;
}

#[actix_rt::test]
async fn postgres_a_row_the_driver_cannot_convert_is_an_error_and_handlers_go_on() {
    let db = Pg::new(Tier::Durable).await;
    a_row_the_driver_cannot_convert_is_an_error_and_handlers_go_on(
        &db,
        "ALTER TABLE sqlnotify.dead_letters ALTER COLUMN state DROP NOT NULL",
    )
    .await;
}

/// A requested row holding a NULL the driver cannot read (its `error` column relaxed) is an
/// error naming the row, and a taker marks it dead and takes the others of its batch: the
/// read used to panic, failing the whole take and leaving every row it had moved to
/// `redelivering` there, held by nobody, until the next activation.
#[actix_rt::test]
async fn postgres_a_requested_row_the_driver_cannot_read_is_marked_dead_and_the_rest_taken() {
    let db = Pg::new(Tier::Durable).await;
    let letters = dead_letters(&db);
    let calls = DeadLetterCalls::new(&letters);
    let mut taken = Vec::new();
    for sequence in 1..=3 {
        let mut failure = attempt("audit", Some(sequence), 0);
        failure.state = DeadLetterState::Dead;
        taken.push(calls.record(failure).await.unwrap());
    }
    let [good, bad, also_good] = taken[..] else {
        unreachable!()
    };
    db.run("ALTER TABLE sqlnotify.dead_letters ALTER COLUMN error DROP NOT NULL")
        .await;
    db.run(&format!(
        "UPDATE sqlnotify.dead_letters SET error = NULL WHERE id = {bad}"
    ))
    .await;
    let e = letters.get(bad).await.unwrap_err();
    assert!(
        matches!(e, Error::InvalidPayload { .. })
            && e.to_string()
                .contains(&format!("dead letter {bad} has an unreadable error")),
        "{e}"
    );
    assert_eq!(letters.retry(&[good, bad, also_good]).await.unwrap(), 3);
    assert_eq!(
        ids(&calls.take_requested("audit", 10).await.unwrap()),
        [good, also_good]
    );
    assert_eq!(
        letters.counts(Some("audit")).await.unwrap(),
        counts(0, 1, 0, 2)
    );
    let why = format!(
        "SELECT count(*) FROM sqlnotify.dead_letters WHERE id = {bad} AND state = 'dead' \
         AND error LIKE 'cannot be delivered again:%unreadable error%'"
    );
    assert_eq!(db.number(&why).await, 1, "marked dead, saying why");
}

/// A handler error holding a NUL character ends in a dead letter, the NUL replaced, and the
/// named consumer's position moves past the event. PostgreSQL refuses a NUL in `text`: the
/// dead letter could never be stored, so the engine retried it for ever — the key and the
/// consumer's position stuck behind it for good.
#[actix_rt::test]
async fn postgres_an_error_with_a_nul_ends_in_a_dead_letter() {
    let db = Pg::new(Tier::Durable).await;
    db.run("CREATE TABLE orders (id bigint PRIMARY KEY)").await;
    let notifier = start_failing(&db, "nul", 1, Duration::from_millis(50), "bad\0byte").await;
    db.insert_ids("orders", 1..=1).await;
    let letters = notifier.dead_letters().unwrap();
    assert!(
        common::wait_until(Duration::from_secs(10), || async {
            letters.list(Some("nul"), None).await.unwrap().len() == 1
        })
        .await,
        "never stored as a dead letter (stats: {:?})",
        notifier.stats().await
    );
    let letter = letters.list(Some("nul"), None).await.unwrap().remove(0);
    assert_eq!(
        (letter.state, letter.attempts, letter.error.as_str()),
        (DeadLetterState::Dead, 1, "bad\u{FFFD}byte")
    );
    assert_eq!(notifier.stats().await.unwrap().dead_lettered, 1);
    let backlog = || async {
        let consumers = notifier.consumers().await.unwrap();
        consumers
            .iter()
            .find(|c| c.name == "nul")
            .map(|c| c.backlog)
    };
    assert!(
        common::wait_until(Duration::from_secs(30), || async {
            backlog().await == Some(0)
        })
        .await,
        "the position stayed before the event: backlog {:?}",
        backlog().await
    );
    notifier.stop().await.unwrap();
}

/// (`integer` column.)
#[actix_rt::test]
async fn postgres_a_count_at_the_columns_limit_ends_in_a_dead_letter() {
    let db = Pg::new(Tier::Durable).await;
    a_count_at_the_columns_limit_ends_in_a_dead_letter(&db, i32::MAX as u32).await;
}

#[actix_rt::test]
async fn postgres_install_creates_the_table_and_cleanup_keeps_it() {
    the_install_creates_the_table_and_cleanup_keeps_it(&Pg::new(Tier::Durable).await).await;
}

/// Several processes recording their first failures at once on a database without the table:
/// it is created once (under the install lock) and every record lands.
#[actix_rt::test]
async fn postgres_first_records_at_once_create_the_table_once() {
    let db = Pg::new(Tier::Durable).await;
    let records = (0..6).map(|i| {
        let calls = DeadLetterCalls::new(&dead_letters(&db));
        async move { calls.record(attempt("billing", Some(i), 0)).await }
    });
    let recorded = futures_util::future::join_all(records).await;
    let ids: BTreeSet<i64> = recorded.into_iter().map(Result::unwrap).collect();
    assert_eq!(ids.len(), 6);
    assert_eq!(
        db.number("SELECT count(*) FROM sqlnotify.dead_letters")
            .await,
        6
    );
}

/// The install script creates the table (and a role granted what a notifier needs may record).
#[actix_rt::test]
async fn postgres_install_script_creates_the_table_and_grants_it() {
    let db = Pg::new(Tier::Durable).await;
    db.run("CREATE TABLE orders (id bigint PRIMARY KEY)").await;
    let (role, role_url) = db.role("app").await;
    let builder = db.builder().watch(db.watch("orders", Operation::Insert));
    let script = builder.install_sql_granting(&role).await.unwrap();
    assert!(!has_table(&db).await);
    db.run(&script).await;
    assert!(has_table(&db).await);
    let letters = sqlnotify::Notifier::builder(role_url)
        .dead_letters()
        .unwrap();
    let id = DeadLetterCalls::new(&letters)
        .record(attempt("billing", Some(1), 0))
        .await
        .unwrap();
    assert_eq!(letters.get(id).await.unwrap().handler, "billing");
}

// ---------------------------------------------------------------------------------------------
// SQLite
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn sqlite_records_retries_and_discards() {
    a_failure_is_recorded_retried_and_discarded(&common::sqlite::TempDb::new()).await;
}

#[actix_rt::test]
async fn sqlite_a_dead_letter_goes_when_its_event_is_handled_later() {
    let db = common::sqlite::TempDb::new();
    a_dead_letter_goes_when_its_event_is_handled_later(&db).await;
}

#[actix_rt::test]
async fn sqlite_takers_take_each_row_once() {
    concurrent_takers_take_each_row_once(&common::sqlite::TempDb::new()).await;
}

#[actix_rt::test]
async fn sqlite_rows_that_cannot_be_dead_letters_are_errors() {
    let db = common::sqlite::TempDb::new();
    rows_that_cannot_be_dead_letters_are_errors(&db, Some("'yesterday'")).await;
}

#[actix_rt::test]
async fn sqlite_install_creates_the_table_and_cleanup_keeps_it() {
    the_install_creates_the_table_and_cleanup_keeps_it(&common::sqlite::TempDb::new()).await;
}

/// A record whose commit fails is an error, never a row id: on a database in rollback-journal
/// mode (WAL could not be enabled), an application reader holding its shared lock past the
/// busy timeout keeps the write from committing. The insert's `RETURNING id` was read with
/// `query_row`, which commits only when the statement is reset on drop, and rusqlite drops
/// that error: the record answered the id of a row that was rolled back, and the engine
/// acknowledged an event neither handled nor stored. Once the reader is done, the same record
/// lands.
#[actix_rt::test]
async fn sqlite_a_record_that_could_not_commit_is_an_error() {
    let db = common::sqlite::TempDb::new();
    assert_eq!(db.strings("PRAGMA journal_mode"), ["delete"]);
    let letters = dead_letters(&db);
    let calls = DeadLetterCalls::new(&letters);
    // The table exists (the first record creates it).
    let first = calls.record(attempt("billing", Some(1), 0)).await.unwrap();
    let stored = || db.count("SELECT count(*) FROM sqlnotify_dead_letters");
    let reader = db.conn();
    reader.execute_batch("BEGIN").unwrap();
    let seen: i64 = reader
        .query_row("SELECT count(*) FROM sqlnotify_dead_letters", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(seen, 1);
    // A new row, and an update of the first by id: neither commits, both are errors.
    let insert = calls.record(attempt("billing", Some(2), 0)).await;
    assert!(
        matches!(insert, Err(Error::Database { .. })),
        "reported stored while a reader held the lock: {insert:?}"
    );
    let mut again = attempt("billing", Some(1), 0);
    again.id = Some(first);
    again.attempts = 2;
    let update = calls.record(again.clone()).await;
    assert!(
        matches!(update, Err(Error::Database { .. })),
        "reported stored while a reader held the lock: {update:?}"
    );
    reader.execute_batch("COMMIT").unwrap();
    assert_eq!(stored(), 1, "nothing was written meanwhile");
    let second = calls.record(attempt("billing", Some(2), 0)).await.unwrap();
    assert_eq!(calls.record(again).await.unwrap(), first);
    assert_eq!(stored(), 2);
    assert_eq!(letters.get(second).await.unwrap().sequence, Some(2));
    assert_eq!(letters.get(first).await.unwrap().attempts, 2);
}

/// `stats().dead_letters` counts each handler's rows once: a handler that ends (here
/// unsubscribed) takes its count back, so handling it again shows its rows, not twice as
/// many. The engine added its count at each poll and never took it back: 3 dead letters,
/// unsubscribed, still 3; handled again, 6.
#[actix_rt::test]
async fn sqlite_the_dead_letter_gauge_is_taken_back_when_a_handler_ends() {
    let db = common::sqlite::TempDb::new();
    db.exec("CREATE TABLE orders (id INTEGER PRIMARY KEY)");
    let notifier = db
        .builder()
        .watch(db.watch("orders", Operation::Insert))
        .start()
        .await
        .unwrap();
    let handle = || {
        notifier.handle(
            sqlnotify::Subscription::new("orders", Operation::Insert),
            sqlnotify::Handling::new("h")
                .max_attempts(1)
                .redelivery_poll(Duration::from_millis(20)),
            |_: sqlnotify::ChangeEvent| async { Err::<(), _>("always fails".into()) },
        )
    };
    let gauge = || async { notifier.stats().await.unwrap().dead_letters };
    let id = handle().await.unwrap();
    db.insert_ids("orders", 1..=3).await;
    assert!(
        common::wait_until(Duration::from_secs(10), || async { gauge().await == 3 }).await,
        "never counted 3 dead letters: {}",
        gauge().await
    );
    notifier.unsubscribe(id).await.unwrap();
    assert!(
        common::wait_until(Duration::from_secs(5), || async { gauge().await == 0 }).await,
        "an unsubscribed handler's count stayed: {}",
        gauge().await
    );
    handle().await.unwrap();
    assert!(
        common::wait_until(Duration::from_secs(5), || async { gauge().await == 3 }).await,
        "handled again: {}",
        gauge().await
    );
    // Several polls later, still the number of rows.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gauge().await, 3);
    assert_eq!(
        dead_letters(&db).list(Some("h"), None).await.unwrap().len(),
        3
    );
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn sqlite_install_script_creates_the_table() {
    let db = common::sqlite::TempDb::new();
    db.exec("CREATE TABLE orders (id INTEGER PRIMARY KEY)");
    let script = db
        .builder()
        .watch(db.watch("orders", Operation::Insert))
        .install_sql()
        .await
        .unwrap();
    assert!(!has_table(&db).await);
    db.exec(&script);
    assert!(has_table(&db).await);
}

// ---------------------------------------------------------------------------------------------
// MySQL / MariaDB
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use common::mysql::TestDb;
    use mysql_async::prelude::Queryable;

    #[actix_rt::test]
    async fn mysql_records_retries_and_discards() {
        a_failure_is_recorded_retried_and_discarded(&TestDb::new().await).await;
    }

    #[actix_rt::test]
    async fn mysql_a_dead_letter_goes_when_its_event_is_handled_later() {
        a_dead_letter_goes_when_its_event_is_handled_later(&TestDb::new().await).await;
    }

    #[actix_rt::test]
    async fn mysql_takers_take_each_row_once() {
        concurrent_takers_take_each_row_once(&TestDb::new().await).await;
    }

    /// (A TIMESTAMP column holds only times.)
    #[actix_rt::test]
    async fn mysql_rows_that_cannot_be_dead_letters_are_errors() {
        rows_that_cannot_be_dead_letters_are_errors(&TestDb::new().await, None).await;
    }

    #[actix_rt::test]
    async fn mysql_a_row_the_driver_cannot_convert_is_an_error_and_handlers_go_on() {
        a_row_the_driver_cannot_convert_is_an_error_and_handlers_go_on(
            &TestDb::new().await,
            "ALTER TABLE sqlnotify_dead_letters MODIFY `state` VARCHAR(16) NULL",
        )
        .await;
    }

    /// (`INT` column.)
    #[actix_rt::test]
    async fn mysql_a_count_at_the_columns_limit_ends_in_a_dead_letter() {
        a_count_at_the_columns_limit_ends_in_a_dead_letter(&TestDb::new().await, i32::MAX as u32)
            .await;
    }

    #[actix_rt::test]
    async fn mysql_install_creates_the_table_and_cleanup_keeps_it() {
        the_install_creates_the_table_and_cleanup_keeps_it(&TestDb::new().await).await;
    }

    /// A MySQL account of one test (accounts are server-wide), dropped when it ends.
    struct Account {
        name: String,
    }

    impl Drop for Account {
        fn drop(&mut self) {
            let sql = format!("DROP USER IF EXISTS '{}'@'%'", self.name);
            common::on_a_runtime_of_its_own(async move {
                let mut admin = common::mysql::connect(&common::mysql::server_url()).await;
                let _ = admin.query_drop(sql).await;
                let _ = admin.disconnect().await;
            });
        }
    }

    /// The install script creates the table, and an account granted what a notifier needs
    /// may record.
    #[actix_rt::test]
    async fn mysql_install_script_creates_the_table_and_grants_it() {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE orders (id INT PRIMARY KEY)").await;
        // MySQL account names hold at most 32 characters.
        let account = Account {
            name: format!("sqn_dl_{}", &db.name[db.name.len().saturating_sub(20)..]),
        };
        db.exec(&format!(
            "CREATE USER '{}'@'%' IDENTIFIED BY 'sqlnotify-test'",
            account.name
        ))
        .await;
        let script = db
            .builder()
            .watch(db.watch("orders", Operation::Insert))
            .install_sql_granting(&account.name)
            .await
            .unwrap();
        assert!(!has_table(&db).await);
        db.exec(&script).await;
        assert!(has_table(&db).await);
        let host = db.url.split_once("://").unwrap().1;
        let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
        let url = format!("mysql://{}:sqlnotify-test@{host}", account.name);
        let letters = sqlnotify::Notifier::builder(url).dead_letters().unwrap();
        let id = DeadLetterCalls::new(&letters)
            .record(attempt("billing", Some(1), 0))
            .await
            .unwrap();
        assert_eq!(letters.retry(&[id]).await.unwrap(), 0);
        assert_eq!(letters.get(id).await.unwrap().handler, "billing");
    }
}
