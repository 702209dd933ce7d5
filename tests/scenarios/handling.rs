//! Handlers (`Notifier::handle`) on every dialect and tier: failures retried until handled,
//! per-key order across retries, dead letters after the last attempt while other keys go on,
//! a dead letter delivered again by `sqlnotify dead-letters retry`, and a restart in the
//! middle of a retry continuing its attempt count, and a handler that panics before it returns
//! its future failing that attempt only; a named consumer's position kept before the events an
//! actor handler that stopped did not handle, and moving on past those an unsubscribed one let
//! go.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::rc::Rc;
use std::time::Duration;

use sqlnotify::{ChangeEvent, Handling, Notifier, Operation, Subscription};

use crate::common::backend::Backend;
use crate::common::{wait_until, Events};

/// Keys of the flaky-handler scenario, and events in all.
const KEYS: i64 = 100;
const EVENTS: i64 = 10_000;

fn value(event: &ChangeEvent, column: &str) -> i64 {
    event
        .get(column)
        .and_then(|v| v.as_i64())
        .unwrap_or_else(|| panic!("{column} missing from {}", event.to_record()))
}

/// Whether the handler "fails" this attempt: 30% of attempts, decided by a hash so the run
/// is the same every time.
fn flaky(key: i64, version: i64, attempt: u32) -> bool {
    let mut h = DefaultHasher::new();
    (key, version, attempt).hash(&mut h);
    h.finish() % 100 < 30
}

#[derive(Default)]
struct Tally {
    /// Per key, the versions handled successfully, in the order they were.
    handled: HashMap<i64, Vec<i64>>,
    calls: u64,
    failures: u64,
    /// Attempt numbers seen per (key, version): 1, 2, … with no gap.
    attempts: HashMap<(i64, i64), u32>,
}

/// A handler failing at random 30% of the time over 10,000 events on 100 keys (updates
/// spread over 100 rows): every event is handled successfully exactly
/// once, each key's versions in commit order, and the attempts add up — in the handler's own
/// count and in `stats()`.
pub async fn a_flaky_handler_handles_every_event_once_in_key_order(db: &impl Backend) {
    db.run("CREATE TABLE h (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
        .await;
    // The rows exist before the watch: 10,000 updates spread over them are the events.
    let inserts: Vec<String> = (1..=KEYS)
        .map(|k| format!("INSERT INTO h VALUES ({k}, 0);"))
        .collect();
    db.run(&inserts.join("\n")).await;
    let notifier = db
        .builder()
        .watch(db.watch("h", Operation::Update).extra_columns(["v"]))
        .start()
        .await
        .unwrap();
    let tally = Rc::new(RefCell::new(Tally::default()));
    let t = tally.clone();
    notifier
        .handle(
            Subscription::new("h", Operation::Update),
            Handling::new("flaky")
                .max_attempts(50)
                .backoff(Duration::from_millis(1), Duration::from_millis(20))
                .keys_in_flight(8),
            move |event| {
                let tally = t.clone();
                async move {
                    let (key, version) = (value(&event, "id"), value(&event, "v"));
                    let attempt = {
                        let mut t = tally.borrow_mut();
                        t.calls += 1;
                        let attempt = t.attempts.entry((key, version)).or_insert(0);
                        *attempt += 1;
                        *attempt
                    };
                    // Give other keys a chance to interleave.
                    tokio::task::yield_now().await;
                    let mut t = tally.borrow_mut();
                    if flaky(key, version, attempt) {
                        t.failures += 1;
                        return Err(format!("flaky failure on {key}@{version}").into());
                    }
                    t.handled.entry(key).or_default().push(version);
                    Ok(())
                }
            },
        )
        .await
        .unwrap();
    // 10,000 updates in transactions of 250, keys interleaved.
    let updates: Vec<String> = (0..EVENTS)
        .map(|i| format!("UPDATE h SET v = v + 1 WHERE id = {};", (i * 37) % KEYS + 1))
        .collect();
    for chunk in updates.chunks(250) {
        db.run(&format!("BEGIN;\n{}\nCOMMIT;", chunk.join("\n")))
            .await;
    }
    let done = || async {
        let t = tally.borrow();
        t.handled.values().map(Vec::len).sum::<usize>() as i64 >= EVENTS
    };
    let finished = wait_until(Duration::from_secs(120), done).await;
    let stats = notifier.stats().await.unwrap();
    notifier.stop().await.unwrap();
    // Every failure was recorded as retrying and removed once its event was handled.
    let left = notifier_dead_letters(db).await;
    assert!(left.is_empty(), "rows left: {left:?}");
    let t = tally.borrow();
    let handled: usize = t.handled.values().map(Vec::len).sum();
    assert!(
        finished,
        "only {handled} of {EVENTS} events handled in 120 s ({stats:?})"
    );
    assert_eq!(handled as i64, EVENTS, "an event handled twice");
    for (key, versions) in &t.handled {
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        assert_eq!(
            versions, &expected,
            "key {key}: versions out of order, missing or repeated"
        );
    }
    assert!(
        t.failures > EVENTS as u64 / 5,
        "the handler should have failed about 30% of its attempts: {} of {}",
        t.failures,
        t.calls
    );
    assert_eq!(
        t.calls,
        EVENTS as u64 + t.failures,
        "attempts = events + failures"
    );
    assert_eq!(stats.handled, EVENTS as u64, "{stats:?}");
    assert_eq!(stats.handler_errors, t.failures, "{stats:?}");
    assert_eq!(
        stats.retries, t.failures,
        "every failure retried: {stats:?}"
    );
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    eprintln!(
        "flaky handler: {EVENTS} events on {KEYS} keys, {} attempts, {} failures",
        t.calls, t.failures
    );
}

/// Waits (at most 5 s) until `notifier`'s counter `name`, read by `get`, is `want`; fails
/// the test with the stats otherwise. For counters that follow a database write the test
/// may see first.
async fn stat_reaches(
    notifier: &Notifier,
    name: &str,
    get: fn(&sqlnotify::Stats) -> u64,
    want: u64,
) {
    let reached = wait_until(Duration::from_secs(5), || async {
        get(&notifier.stats().await.unwrap()) == want
    })
    .await;
    assert!(
        reached,
        "stats().{name} never reached {want}: {:?}",
        notifier.stats().await
    );
}

async fn notifier_dead_letters(db: &impl Backend) -> Vec<sqlnotify::DeadLetter> {
    db.builder()
        .dead_letters()
        .unwrap()
        .list(None, None)
        .await
        .unwrap()
}

/// Runs the CLI on `args`, returning its stdout; fails the test on a non-zero exit.
fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sqlnotify"))
        .args(args)
        .output()
        .expect("the sqlnotify binary runs");
    assert!(
        out.status.success(),
        "sqlnotify {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A poison event (row 7) fails every attempt: after 3 it is a dead letter — its error,
/// attempts and times stored — while the other keys were handled meanwhile; once the cause
/// is fixed, `sqlnotify dead-letters retry` has the running handler deliver it again, and the
/// row goes.
pub async fn a_poison_event_becomes_a_dead_letter_and_a_cli_retry_delivers_it_again(
    db: &impl Backend,
) {
    db.run("CREATE TABLE p (id INTEGER PRIMARY KEY)").await;
    let notifier = db
        .builder()
        .watch(db.watch("p", Operation::Insert))
        .start()
        .await
        .unwrap();
    let handled = Rc::new(RefCell::new(Vec::<(i64, u32)>::new()));
    let poisoned = Rc::new(std::cell::Cell::new(true));
    let (h, p) = (handled.clone(), poisoned.clone());
    let (tx, mut attempts7) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |attempt: sqlnotify::Attempt| {
        let (h, p, tx) = (h.clone(), p.clone(), tx.clone());
        async move {
            let id = attempt.event.id().as_i64().unwrap();
            if id == 7 {
                let _ = tx.send(attempt.attempt);
                if p.get() {
                    return Err("row 7 is poison".into());
                }
            }
            h.borrow_mut().push((id, attempt.attempt));
            Ok::<(), sqlnotify::HandlerError>(())
        }
    };
    // The actor form: an attempt per message.
    let actor = AttemptActor(Box::new(move |a| Box::pin(handler(a)))).start_actor();
    notifier
        .handle_actor(
            Subscription::new("p", Operation::Insert),
            Handling::new("poison")
                .max_attempts(3)
                .backoff(Duration::from_millis(50), Duration::from_millis(200))
                .redelivery_poll(Duration::from_millis(100)),
            actor.recipient(),
        )
        .await
        .unwrap();
    db.insert_ids("p", 1..=20).await;
    // Three attempts at 7, then the dead letter.
    for n in 1..=3 {
        let got = tokio::time::timeout(Duration::from_secs(10), attempts7.recv())
            .await
            .expect("attempt at row 7");
        assert_eq!(got, Some(n));
    }
    let letters = db.builder().dead_letters().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            letters.counts(Some("poison")).await.unwrap().dead == 1
        })
        .await,
        "row 7 never became a dead letter: {:?}",
        letters.list(None, None).await
    );
    let others: Vec<i64> = handled.borrow().iter().map(|(id, _)| *id).collect();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            handled.borrow().len() == 19
        })
        .await,
        "the other keys go on: handled {others:?}"
    );
    let list = letters.list(Some("poison"), None).await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let letter = &list[0];
    assert_eq!(letter.state, sqlnotify::DeadLetterState::Dead);
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.error, "row 7 is poison");
    assert_eq!(letter.key, "7");
    assert_eq!(letter.channel, db.channel_of("p", Operation::Insert));
    assert!(letter.first_failed <= letter.last_failed);
    assert!(letter.event.contains("\"table\":\"p\""), "{}", letter.event);
    stat_reaches(&notifier, "dead_letters", |s| s.dead_letters, 1).await;
    // Counted once the dead letter is stored, which the count above may see first.
    stat_reaches(&notifier, "dead_lettered", |s| s.dead_lettered, 1).await;
    let stats = notifier.stats().await.unwrap();
    assert_eq!(stats.handler_errors, 3, "{stats:?}");

    // Fixed: the CLI asks for a retry, the running handler delivers it again.
    poisoned.set(false);
    let url = db.url();
    let id = letter.id.to_string();
    tokio::task::spawn_blocking(move || cli(&["dead-letters", "retry", &url, &id]))
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), attempts7.recv())
        .await
        .expect("row 7 delivered again");
    assert_eq!(
        again,
        Some(1),
        "a retried dead letter starts its attempts again"
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            letters.list(None, None).await.unwrap().is_empty()
        })
        .await,
        "the handled dead letter's row goes: {:?}",
        letters.list(None, None).await
    );
    assert!(handled.borrow().contains(&(7, 1)));
    stat_reaches(&notifier, "handled", |s| s.handled, 20).await;
    let stats = notifier.stats().await.unwrap();
    assert_eq!(stats.redelivered, 1, "{stats:?}");
    notifier.stop().await.unwrap();
}

/// A closure handler that panics before it returns its future (in the code in front of its
/// `async` block) fails that attempt as a panic inside the future does: counted, retried,
/// stored as a dead letter after the last attempt, and the handler goes on with the events
/// that follow. Such a panic used to end the handler's loop for good without a word.
pub async fn a_handler_that_panics_before_its_future_fails_the_attempt_and_goes_on(
    db: &impl Backend,
) {
    db.run("CREATE TABLE sp (id INTEGER PRIMARY KEY)").await;
    let notifier = db
        .builder()
        .watch(db.watch("sp", Operation::Insert))
        .start()
        .await
        .unwrap();
    let handled = Rc::new(RefCell::new(Vec::<i64>::new()));
    let h = handled.clone();
    notifier
        .handle(
            Subscription::new("sp", Operation::Insert),
            Handling::new("sync-panic")
                .max_attempts(2)
                .backoff(Duration::from_millis(1), Duration::from_millis(10)),
            move |event: ChangeEvent| {
                let id = event.id().as_i64().unwrap();
                assert_ne!(id, 3, "row 3 is poison");
                let h = h.clone();
                async move {
                    h.borrow_mut().push(id);
                    Ok::<(), sqlnotify::HandlerError>(())
                }
            },
        )
        .await
        .unwrap();
    db.insert_ids("sp", 1..=5).await;
    stat_reaches(&notifier, "dead_lettered", |s| s.dead_lettered, 1).await;
    // Written after the panics: the handler still runs.
    db.insert_ids("sp", 6..=8).await;
    let went_on = wait_until(Duration::from_secs(10), || async {
        handled.borrow().len() == 7
    })
    .await;
    let stats = notifier.stats().await.unwrap();
    assert!(
        went_on,
        "the handler went on after the panic: handled {:?}, {stats:?}",
        handled.borrow()
    );
    let mut ids = handled.borrow().clone();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, 4, 5, 6, 7, 8]);
    // Counted once the call returned, which the handler's own record may precede.
    stat_reaches(&notifier, "handled", |s| s.handled, 7).await;
    let stats = notifier.stats().await.unwrap();
    assert_eq!(
        (stats.subscriber_panics, stats.handler_errors, stats.handled),
        (2, 2, 7),
        "{stats:?}"
    );
    let letters = notifier_dead_letters(db).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0].key.as_str(), letters[0].attempts), ("3", 2));
    assert!(
        letters[0].error.contains("panicked") && letters[0].error.contains("row 3 is poison"),
        "{}",
        letters[0].error
    );
    notifier.stop().await.unwrap();
}

/// A dead letter delivered again that fails again (attempts left) and whose notifier then
/// stops during the backoff is not stranded: its row says `redelivering` (nothing in the
/// journal brings it back, unlike a live event's `retrying`), and the next notifier of the
/// handler takes it back and delivers it.
pub async fn a_retried_dead_letter_that_fails_again_is_not_stranded_by_a_stop(db: &impl Backend) {
    db.run("CREATE TABLE q (id INTEGER PRIMARY KEY)").await;
    // Fails 3 times in a row (a dead letter after 2 attempts, then its first retry), then
    // handles.
    let failures = Rc::new(std::cell::Cell::new(3u32));
    let start = |failures: Rc<std::cell::Cell<u32>>| async move {
        let notifier = db
            .builder()
            .watch(db.watch("q", Operation::Insert))
            .start()
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        notifier
            .handle(
                Subscription::new("q", Operation::Insert),
                Handling::new("stranded")
                    .max_attempts(2)
                    .backoff(Duration::from_millis(50), Duration::from_secs(3600))
                    .redelivery_poll(Duration::from_millis(100)),
                move |event| {
                    let (tx, failures) = (tx.clone(), failures.clone());
                    async move {
                        let _ = tx.send(event.id().as_i64().unwrap());
                        if failures.get() > 0 {
                            failures.set(failures.get() - 1);
                            return Err("not yet".into());
                        }
                        Ok(())
                    }
                },
            )
            .await
            .unwrap();
        (notifier, rx)
    };
    let (notifier, mut calls) = start(failures.clone()).await;
    db.insert_ids("q", 1..=1).await;
    let letters = db.builder().dead_letters().unwrap();
    let state = || async {
        letters
            .list(Some("stranded"), None)
            .await
            .unwrap()
            .first()
            .map(|l| l.state)
    };
    assert!(
        wait_until(Duration::from_secs(10), || async {
            state().await == Some(sqlnotify::DeadLetterState::Dead)
        })
        .await,
        "row 1 never became a dead letter"
    );
    letters.retry_handler("stranded").await.unwrap();
    // Its retry fails; the next attempt waits an hour (backoff): stop meanwhile.
    assert!(
        wait_until(Duration::from_secs(10), || async { failures.get() == 0 }).await,
        "the retried dead letter was not delivered again"
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            state().await == Some(sqlnotify::DeadLetterState::Redelivering)
        })
        .await,
        "a retried dead letter that failed again: {:?}",
        state().await
    );
    notifier.stop().await.unwrap();
    while calls.try_recv().is_ok() {}

    // The next notifier of the handler takes it back and delivers it: handled, row gone.
    let (notifier, mut calls) = start(failures.clone()).await;
    let again = tokio::time::timeout(Duration::from_secs(30), calls.recv())
        .await
        .expect("the stranded dead letter delivered again");
    assert_eq!(again, Some(1));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            state().await.is_none()
        })
        .await,
        "the handled dead letter's row goes: {:?}",
        state().await
    );
    notifier.stop().await.unwrap();
}

type Boxed =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), sqlnotify::HandlerError>>>>;

/// An actor whose handler of [`sqlnotify::Attempt`] runs a closure's future.
struct AttemptActor(Box<dyn Fn(sqlnotify::Attempt) -> Boxed>);

impl AttemptActor {
    fn start_actor(self) -> actix::Addr<Self> {
        actix::Actor::start(self)
    }
}

impl actix::Actor for AttemptActor {
    type Context = actix::Context<Self>;
}

impl actix::Handler<sqlnotify::Attempt> for AttemptActor {
    type Result = actix::ResponseFuture<Result<(), sqlnotify::HandlerError>>;

    fn handle(&mut self, attempt: sqlnotify::Attempt, _: &mut Self::Context) -> Self::Result {
        (self.0)(attempt)
    }
}

/// Stops an [`AttemptActor`] (as a panic in it would).
struct StopActor;

impl actix::Message for StopActor {
    type Result = ();
}

impl actix::Handler<StopActor> for AttemptActor {
    type Result = ();

    fn handle(&mut self, _: StopActor, ctx: &mut Self::Context) {
        actix::ActorContext::stop(ctx);
    }
}

/// The journal rows after consumer `name`'s saved position, as its listing says.
async fn backlog(db: &impl Backend, name: &str) -> u64 {
    let consumers = db.builder().consumers().await.unwrap();
    let consumer = consumers.iter().find(|c| c.name == name);
    consumer
        .unwrap_or_else(|| panic!("no consumer {name}: {consumers:?}"))
        .backlog
}

/// A named consumer's actor handler that stopped while nothing but a dead letter delivered
/// again was in its hands (that one carries no ack: the position is past it already) keeps
/// the position before the events written after it: stop() does not save past them, and the
/// restarted notifier's handler handles them. Before, the registry released each event as the
/// gone handler's closed channel refused it, the position moved past them, and they were never
/// handled — though the engine's log said they would be delivered again after a restart.
pub async fn a_handler_gone_during_a_dead_letter_retry_keeps_the_position_before_later_events(
    db: &impl Backend,
) {
    db.run("CREATE TABLE ga (id INTEGER PRIMARY KEY)").await;
    let start = || async {
        db.builder()
            .watch(db.watch("ga", Operation::Insert))
            .consumer("c")
            .start()
            .await
            .unwrap()
    };
    let handling = || {
        Handling::new("gone")
            .max_attempts(1)
            .redelivery_poll(Duration::from_millis(100))
    };
    let notifier = start().await;
    // A plain subscription on the same watch: once it has an event, the registry has offered
    // it to the handler's subscription too.
    let mut seen = Events::subscribe(&notifier, Subscription::new("ga", Operation::Insert)).await;
    let actor = AttemptActor(Box::new(|a: sqlnotify::Attempt| {
        let poison = a.event.id().as_i64() == Some(1);
        Box::pin(async move {
            if poison {
                Err("row 1 is poison".into())
            } else {
                Ok(())
            }
        })
    }))
    .start_actor();
    notifier
        .handle_actor(
            Subscription::new("ga", Operation::Insert),
            handling(),
            actor.clone().recipient(),
        )
        .await
        .unwrap();
    db.insert_ids("ga", 1..=1).await;
    assert_eq!(seen.next().await.id().as_i64(), Some(1));
    let letters = db.builder().dead_letters().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            letters.counts(Some("gone")).await.unwrap().dead == 1
        })
        .await,
        "row 1 never became a dead letter: {:?}",
        letters.list(None, None).await
    );
    // The actor stops while idle; the retry asked for then is the handler's last attempt.
    actor.do_send(StopActor);
    assert!(
        wait_until(Duration::from_secs(30), || async { !actor.connected() }).await,
        "the actor did not stop"
    );
    assert_eq!(letters.retry_handler("gone").await.unwrap(), 1);
    // Counted as the poll hands the dead letter to the loop, which then tries it, finds the
    // actor gone and returns, in the same turn: the handler is gone once this is seen.
    assert!(
        wait_until(Duration::from_secs(30), || async {
            notifier.stats().await.unwrap().redelivered == 1
        })
        .await,
        "the dead letter was not delivered again: {:?}",
        notifier.stats().await
    );
    db.insert_ids("ga", 2..=5).await;
    let later: Vec<i64> = seen
        .take(4)
        .await
        .iter()
        .filter_map(|e| e.id().as_i64())
        .collect();
    assert_eq!(later, [2, 3, 4, 5]);
    // The handler's subscription refused row 2: its receiver is gone.
    assert!(
        wait_until(Duration::from_secs(30), || async {
            notifier.stats().await.unwrap().dropped >= 1
        })
        .await,
        "{:?}",
        notifier.stats().await
    );
    notifier.stop().await.unwrap();
    assert!(
        backlog(db, "c").await >= 4,
        "the position stays before rows 2-5: backlog {}",
        backlog(db, "c").await
    );

    // Restarted with a handler that works: rows 2-5 come back to it.
    let notifier = start().await;
    let (tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    notifier
        .handle(
            Subscription::new("ga", Operation::Insert),
            handling(),
            move |event| {
                let _ = tx.send(event.id().as_i64().unwrap());
                async { Ok(()) }
            },
        )
        .await
        .unwrap();
    let mut ids = std::collections::BTreeSet::new();
    let all = wait_until(Duration::from_secs(30), || {
        while let Ok(id) = handled.try_recv() {
            ids.insert(id);
        }
        let done = (2..=5).all(|id| ids.contains(&id));
        async move { done }
    })
    .await;
    assert!(all, "rows 2-5 handled after the restart: {ids:?}");
    notifier.stop().await.unwrap();
}

/// Starts consumer `retry-restart` with a handler that fails on row 3 (reporting each call
/// on the channel) and handles the rest.
async fn start_failing_on_3(
    db: &impl Backend,
) -> (Notifier, tokio::sync::mpsc::UnboundedReceiver<i64>) {
    let notifier = db
        .builder()
        .watch(db.watch("r", Operation::Insert))
        .consumer("retry-restart")
        .start()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    notifier
        .handle(
            Subscription::new("r", Operation::Insert),
            Handling::new("retry-restart")
                .max_attempts(4)
                .backoff(Duration::from_millis(200), Duration::from_millis(200)),
            move |event| {
                let tx = tx.clone();
                async move {
                    let id = event.id().as_i64().unwrap();
                    let _ = tx.send(id);
                    if id == 3 {
                        return Err("3 fails".into());
                    }
                    Ok(())
                }
            },
        )
        .await
        .unwrap();
    (notifier, rx)
}

/// The attempt count stored for the handler's one failing event, and its state.
async fn stored_attempts(db: &impl Backend) -> Option<(u32, sqlnotify::DeadLetterState)> {
    let list = notifier_dead_letters(db).await;
    list.first().map(|l| (l.attempts, l.state))
}

/// A named consumer stopped while its handler waits to retry row 3 (2 of 4 attempts failed):
/// after the restart row 3 comes back, its attempts continue at 3, and after the 4th it is a
/// dead letter — 4 attempts in all, not 4 more.
pub async fn a_restart_in_the_middle_of_a_retry_continues_it(db: &impl Backend) {
    db.run("CREATE TABLE r (id INTEGER PRIMARY KEY)").await;
    let (notifier, mut calls) = start_failing_on_3(db).await;
    db.insert_ids("r", 1..=5).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            stored_attempts(db).await == Some((2, sqlnotify::DeadLetterState::Retrying))
        })
        .await,
        "row 3 never failed twice: {:?}",
        notifier_dead_letters(db).await
    );
    notifier.stop().await.unwrap();
    let mut first = Vec::new();
    while let Ok(id) = calls.try_recv() {
        first.push(id);
    }
    let threes = first.iter().filter(|&&id| id == 3).count();
    assert!(
        (2..=3).contains(&threes),
        "2 attempts failed before the stop (a 3rd may have been running): {first:?}"
    );
    // The stop may have caught a third attempt running: it is recorded before the ack.
    let (stored, _) = stored_attempts(db).await.expect("row 3 is recorded");
    assert_eq!(stored as usize, threes, "each failed attempt recorded");

    let (notifier, mut calls) = start_failing_on_3(db).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            stored_attempts(db).await == Some((4, sqlnotify::DeadLetterState::Dead))
        })
        .await,
        "row 3 never became a dead letter after 4 attempts: {:?}",
        notifier_dead_letters(db).await
    );
    // Counted once the dead letter is stored, which the look above may see first.
    stat_reaches(&notifier, "dead_lettered", |s| s.dead_lettered, 1).await;
    let stats = notifier.stats().await.unwrap();
    notifier.stop().await.unwrap();
    let mut second = Vec::new();
    while let Ok(id) = calls.try_recv() {
        second.push(id);
    }
    assert_eq!(
        second.iter().filter(|&&id| id == 3).count(),
        4 - threes,
        "the count continued: {second:?}"
    );
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
}

/// Unsubscribing a named consumer's handler while it holds events — key 1's first update
/// waiting out a minute's retry delay, its two later updates waiting behind it — lets go of
/// them, as the registry lets go of the events in the subscription's buffer: the consumer's
/// position moves on past the rows written afterwards on another watch, and the failing
/// event's row stays `retrying`. Before, their holds stayed for the rest of the process: the
/// position never moved again, for every channel of the consumer.
pub async fn unsubscribing_a_handler_lets_go_of_the_events_it_had_not_handled(db: &impl Backend) {
    db.run("CREATE TABLE ua (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
        .await;
    db.run("CREATE TABLE ub (id INTEGER PRIMARY KEY)").await;
    db.run("INSERT INTO ua VALUES (1, 0)").await;
    let notifier = db
        .builder()
        .watch(db.watch("ua", Operation::Update).extra_columns(["v"]))
        .watch(db.watch("ub", Operation::Insert))
        .consumer("c")
        .start()
        .await
        .unwrap();
    let mut other = Events::subscribe(&notifier, Subscription::new("ub", Operation::Insert)).await;
    let (tx, mut calls) = tokio::sync::mpsc::unbounded_channel();
    let minute = Duration::from_secs(60);
    let id = notifier
        .handle(
            Subscription::new("ua", Operation::Update),
            Handling::new("unsub").backoff(minute, minute),
            move |event| {
                let _ = tx.send(value(&event, "v"));
                async { Err("key 1 fails".into()) }
            },
        )
        .await
        .unwrap();
    for _ in 0..3 {
        db.run("UPDATE ua SET v = v + 1 WHERE id = 1").await;
    }
    let first = tokio::time::timeout(Duration::from_secs(30), calls.recv())
        .await
        .expect("the first update's attempt");
    assert_eq!(first, Some(1));
    let letters = db.builder().dead_letters().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            letters.counts(Some("unsub")).await.unwrap().retrying == 1
        })
        .await,
        "the failure was never recorded: {:?}",
        letters.list(None, None).await
    );
    notifier.unsubscribe(id).await.unwrap();
    db.insert_ids("ub", 1..=100).await;
    assert_eq!(other.take(100).await.len(), 100);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            backlog(db, "c").await == 0
        })
        .await,
        "the position stays before the handler's events: backlog {}",
        backlog(db, "c").await
    );
    notifier.stop().await.unwrap();
    assert_eq!(backlog(db, "c").await, 0, "saved by stop() too");
    assert!(
        calls.try_recv().is_err(),
        "the handler ran again after its unsubscribe"
    );
    assert_eq!(
        letters.counts(Some("unsub")).await.unwrap().retrying,
        1,
        "the failing event's row stays `retrying`"
    );
}

/// One attempt as a process of the group saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Seen {
    process: char,
    id: i64,
    v: i64,
    attempt: u32,
    ok: bool,
}

/// Starts process `process` of consumer group `grp`, whose handler fails `(3, v=1)` until its
/// 4th attempt (counted across the group) and logs every attempt.
async fn start_member(db: &impl Backend, process: char, log: Rc<RefCell<Vec<Seen>>>) -> Notifier {
    let notifier = db
        .builder()
        .watch(db.watch("g", Operation::Update).extra_columns(["v"]))
        .consumer("grp")
        .start()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
    let log2 = log.clone();
    actix::spawn(async move {
        let mut rx = rx;
        while let Some(seen) = rx.recv().await {
            log2.borrow_mut().push(seen);
        }
    });
    drop(log);
    let recorder = tx;
    notifier
        .handle_actor(
            Subscription::new("g", Operation::Update),
            Handling::new("grp-h")
                .max_attempts(10)
                .backoff(Duration::from_millis(300), Duration::from_millis(300))
                .redelivery_poll(Duration::from_millis(50)),
            AttemptActor(Box::new(move |a: sqlnotify::Attempt| {
                let (id, v) = (value(&a.event, "id"), value(&a.event, "v"));
                let ok = !(id == 3 && v == 1 && a.attempt < 4);
                let _ = recorder.send(Seen {
                    process,
                    id,
                    v,
                    attempt: a.attempt,
                    ok,
                });
                Box::pin(async move {
                    if ok {
                        Ok(())
                    } else {
                        Err("3@1 fails until its 4th attempt".into())
                    }
                })
            }))
            .start_actor()
            .recipient(),
        )
        .await
        .unwrap();
    notifier
}

/// A consumer group's active process stops while its handler retries row 3's first update
/// (2 attempts failed): the standby takes over, continues the attempt count (its first attempt
/// at it is the 3rd or later, not the 1st) and handles row 3's later updates only after it, in
/// commit order — while the old process, once it stopped, handles nothing more.
pub async fn a_failover_continues_retries_and_key_order(db: &impl Backend) {
    db.run("CREATE TABLE g (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
        .await;
    db.run(
        "INSERT INTO g VALUES (1, 0); INSERT INTO g VALUES (2, 0); INSERT INTO g VALUES (3, 0); \
         INSERT INTO g VALUES (4, 0); INSERT INTO g VALUES (5, 0);",
    )
    .await;
    let log = Rc::new(RefCell::new(Vec::<Seen>::new()));
    let a = start_member(db, 'A', log.clone()).await;
    assert_eq!(a.stats().await.unwrap().role, sqlnotify::Role::Active);
    let b = start_member(db, 'B', log.clone()).await;
    assert_eq!(b.stats().await.unwrap().role, sqlnotify::Role::Standby);
    let bump = |id: i64| format!("UPDATE g SET v = v + 1 WHERE id = {id};");
    let script: Vec<String> = [3, 1, 2, 3, 4, 5, 3, 1, 2, 4, 5]
        .iter()
        .map(|&id| bump(id))
        .collect();
    for statement in &script {
        db.run(statement).await;
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            stored_attempts(db).await.is_some_and(|(n, _)| n >= 2)
        })
        .await,
        "row 3 never failed twice: {:?}",
        log.borrow()
    );
    a.stop().await.unwrap();
    let stopped_at = log.borrow().len();
    // Every row's last version handled (row 3: v = 3), by the new active process.
    let finished = || {
        let log = log.borrow();
        [(1, 2), (2, 2), (3, 3), (4, 2), (5, 2)]
            .iter()
            .all(|&(id, v)| {
                log.iter()
                    .any(|s| s.process == 'B' && s.id == id && s.v == v && s.ok)
            })
    };
    assert!(
        wait_until(Duration::from_secs(20), || async { finished() }).await,
        "the standby did not finish: {:?}",
        log.borrow()
    );
    assert_eq!(b.stats().await.unwrap().role, sqlnotify::Role::Active);
    b.stop().await.unwrap();
    let log = log.borrow().clone();
    let after: Vec<Seen> = log[stopped_at..].to_vec();
    assert!(
        after.iter().all(|s| s.process == 'B'),
        "the stopped process handled something: {after:?}"
    );
    let threes: Vec<&Seen> = log.iter().filter(|s| s.id == 3).collect();
    let first_b = threes
        .iter()
        .find(|s| s.process == 'B')
        .expect("B attempted row 3");
    assert_eq!(
        first_b.v, 1,
        "row 3's first update comes back first: {threes:?}"
    );
    assert!(
        first_b.attempt >= 3,
        "the attempt count continued across the failover: {threes:?}"
    );
    let b_ok: Vec<i64> = threes
        .iter()
        .filter(|s| s.process == 'B' && s.ok)
        .map(|s| s.v)
        .collect();
    assert_eq!(
        b_ok,
        [1, 2, 3],
        "row 3's updates in commit order: {threes:?}"
    );
    assert!(
        !threes.iter().any(|s| s.process == 'A' && s.v > 1),
        "row 3's later updates waited for the failing one: {threes:?}"
    );
    assert!(
        notifier_dead_letters(db).await.is_empty(),
        "the row of 3@1 goes once it is handled"
    );
}

/// A stored attempt count at the largest a count can be (a row written by hand, or by a role
/// that can write the table): the event that comes back after a restart fails its next
/// attempt into a dead letter instead of overflowing the count — which, in a build with
/// overflow checks, ended the handler's loop silently. `table` is the dialect's dead-letter
/// table; only a dialect whose column holds `u32::MAX` can store such a count.
pub async fn a_stored_attempt_count_at_its_limit_ends_in_a_dead_letter(
    db: &impl Backend,
    table: &str,
) {
    db.run("CREATE TABLE r (id INTEGER PRIMARY KEY)").await;
    let (notifier, _) = start_failing_on_3(db).await;
    db.insert_ids("r", 1..=5).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            matches!(
                stored_attempts(db).await,
                Some((_, sqlnotify::DeadLetterState::Retrying))
            )
        })
        .await,
        "row 3 never failed: {:?}",
        notifier_dead_letters(db).await
    );
    notifier.stop().await.unwrap();
    db.run(&format!("UPDATE {table} SET attempts = {}", u32::MAX))
        .await;
    let (notifier, mut calls) = start_failing_on_3(db).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            stored_attempts(db).await == Some((u32::MAX, sqlnotify::DeadLetterState::Dead))
        })
        .await,
        "row 3 never became a dead letter: {:?}",
        notifier_dead_letters(db).await
    );
    db.insert_ids("r", 6..=6).await;
    let mut seen = Vec::new();
    while seen.last() != Some(&6) {
        let id = tokio::time::timeout(Duration::from_secs(10), calls.recv())
            .await
            .expect("the handler goes on")
            .unwrap();
        seen.push(id);
    }
    notifier.stop().await.unwrap();
}
