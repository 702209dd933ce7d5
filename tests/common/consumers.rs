//! Named-consumer scenarios shared by every dialect (issue 11 §2): each test file implements
//! [`ConsumerDb`] for its own test database and runs the same scenario, so PostgreSQL, SQLite
//! and MySQL are held to one contract.
//!
//! Every scenario uses two tables, `t` (read by the consumer under test) and `other` (watched
//! by a second notifier that purges with a short retention and reads no consumer), and proves
//! that a purge round ran with [`await_purge_round`] instead of sleeping.

use std::time::Duration;

use std::time::SystemTime;

use sqlnotify::Operation::Insert;
use sqlnotify::{
    ChangeEvent, ConsumerInfo, ConsumerPosition, ConsumerState, Error, Notifier, NotifierBuilder,
    Status, StatusEvent, Subscription, Watch,
};
use tokio::sync::mpsc;

use super::{wait_until, Forward, ARRIVES_WITHIN};

/// How long a scenario waits for a purge round that must happen.
pub const PURGE_WITHIN: Duration = Duration::from_secs(30);

/// A test database of one dialect, as the scenarios need it.
#[allow(async_fn_in_trait)]
pub trait ConsumerDb {
    /// The database URL.
    fn url(&self) -> String;
    /// A builder for `url`, with the dialect's test settings (MySQL: a short gap timeout, so
    /// a cursor moves past ids purged under it quickly).
    fn builder_at(&self, url: &str) -> NotifierBuilder {
        Notifier::builder(url)
    }
    /// A builder for the consumer under test.
    fn builder(&self) -> NotifierBuilder {
        self.builder_at(&self.url())
    }
    /// A builder for the other application, the one that purges.
    fn purger_builder(&self) -> NotifierBuilder {
        self.builder()
    }
    /// A watch of `table`'s inserts on the dialect's journal (PostgreSQL: the durable tier).
    fn watch(&self, table: &str) -> Watch;
    /// Inserts `ids` into `table (id)`, one transaction per row.
    async fn insert(&self, table: &str, ids: std::ops::RangeInclusive<i64>);
    /// The id of the newest journal row (0 when there is none).
    async fn journal_head(&self) -> i64;
    /// Whether the journal still holds the row with this id.
    async fn journal_has(&self, id: i64) -> bool;
    /// The channel of `table`'s insert watch.
    fn channel(&self, table: &str) -> String;
    /// Sets consumer `name`'s last activity to [`LONG_AGO`].
    async fn make_stale(&self, name: &str);
    /// Consumer `name`'s position, read from its table.
    async fn saved_position(&self, name: &str) -> ConsumerPosition;
    /// Creates the consumers table as sqlnotify 0.1 did (before consumers were registered),
    /// with consumer `name` at the start of the journal, last active [`LONG_AGO`].
    async fn create_old_consumer(&self, name: &str);
    /// A transaction left open.
    type Open: OpenTransaction;
    /// Does what a purge does to an inactive consumer before it commits — locks its row and
    /// records that it missed rows on `channel` — and leaves the transaction open.
    async fn purge_in_progress(&self, name: &str, channel: &str) -> Self::Open;
}

/// A transaction a test keeps open.
#[allow(async_fn_in_trait)]
pub trait OpenTransaction {
    /// Commits it.
    async fn commit(self);
}

/// 2001-01-01T00:00:00Z, as Unix seconds: a last activity long ago.
pub const LONG_AGO: u64 = 978_307_200;

/// Waits until a purge round has run after every row written so far had expired: writes a
/// marker row on `other` (no consumer reads it), then one more (MySQL never purges the newest
/// journal row), and waits for the marker to be purged. `n` keeps the keys unique per call.
pub async fn await_purge_round(db: &impl ConsumerDb, n: i64) {
    db.insert("other", n * 10..=n * 10).await;
    let marker = db.journal_head().await;
    db.insert("other", n * 10 + 1..=n * 10 + 1).await;
    assert!(
        wait_until(PURGE_WITHIN, || async { !db.journal_has(marker).await }).await,
        "no purge round deleted the marker row {marker} within {PURGE_WITHIN:?}"
    );
}

/// Another application on the same database: no consumer, a short retention, its own watch.
pub async fn start_purger(db: &impl ConsumerDb, retention: Duration) -> Notifier {
    db.purger_builder()
        .watch(db.watch("other"))
        .retention(retention)
        .purge_interval(Duration::from_millis(50))
        .start()
        .await
        .expect("start the purging notifier")
}

/// Starts `builder` with a subscription to `t` registered before the listener starts.
pub async fn start_collecting(
    builder: &NotifierBuilder,
) -> (Notifier, mpsc::UnboundedReceiver<ChangeEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let collector = Forward(tx).start_actor();
    let notifier = builder
        .clone()
        .subscribe(Subscription::new("t", Insert), collector.recipient())
        .start()
        .await
        .expect("start the consumer");
    (notifier, rx)
}

/// The ids of the next `n` events.
pub async fn next_ids(rx: &mut mpsc::UnboundedReceiver<ChangeEvent>, n: usize) -> Vec<i64> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let event = tokio::time::timeout(ARRIVES_WITHIN, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {ids:?} of {n} events arrived"))
            .expect("the collector is alive");
        ids.push(event.id().as_i64().expect("an integer key"));
    }
    ids
}

/// The scenario: consumer `c` is registered and stopped; 5 rows are committed;
/// another notifier on the same database (no consumer, retention 2 s) purges; `c` restarts
/// with its subscription on the builder and gets exactly those 5 rows.
pub async fn a_stopped_consumer_gets_every_row_through_another_notifiers_purge(
    db: &impl ConsumerDb,
) {
    let consumer = db.builder().watch(db.watch("t")).consumer("c");
    consumer.start().await.unwrap().stop().await.unwrap();
    let purger = start_purger(db, Duration::from_secs(2)).await;
    db.insert("t", 1..=5).await;
    await_purge_round(db, 1).await;
    purger.stop().await.unwrap();

    let (notifier, mut rx) = start_collecting(&consumer).await;
    assert_eq!(next_ids(&mut rx, 5).await, [1, 2, 3, 4, 5]);
    db.insert("t", 6..=6).await;
    assert_eq!(
        next_ids(&mut rx, 1).await,
        [6],
        "then new rows, nothing twice"
    );
    assert!(rx.try_recv().is_err());
    notifier.stop().await.unwrap();
}

/// A named consumer started without a subscription reads nothing (its saved position must
/// not pass rows nobody received) until the first subscription arrives, then replays.
pub async fn a_named_consumer_replays_nothing_until_its_first_subscription(db: &impl ConsumerDb) {
    let consumer = db.builder().watch(db.watch("t")).consumer("late");
    consumer.start().await.unwrap().stop().await.unwrap();
    db.insert("t", 1..=3).await;
    let notifier = consumer.start().await.unwrap();
    let read_early = wait_until(Duration::from_millis(500), || async {
        notifier.stats().await.unwrap().received > 0
    })
    .await;
    assert!(
        !read_early,
        "the consumer read the journal with no subscriber"
    );
    let mut events = super::Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    let ids: Vec<i64> = events
        .take(3)
        .await
        .iter()
        .map(|e| e.id().as_i64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3]);
    notifier.stop().await.unwrap();
}

/// An actor that forwards status messages into a channel (for builder-level status
/// subscriptions).
pub struct ForwardStatus(pub mpsc::UnboundedSender<Status>);

impl actix::Actor for ForwardStatus {
    type Context = actix::Context<Self>;
}

impl actix::Handler<StatusEvent> for ForwardStatus {
    type Result = ();
    fn handle(&mut self, event: StatusEvent, _: &mut actix::Context<Self>) {
        let _ = self.0.send(event.status);
    }
}

/// Starts `builder` with a subscription to `t` and a status subscription, both registered
/// before the listener starts.
pub async fn start_watching_status(
    builder: &NotifierBuilder,
) -> (
    Notifier,
    mpsc::UnboundedReceiver<ChangeEvent>,
    mpsc::UnboundedReceiver<Status>,
) {
    let (tx, statuses) = mpsc::unbounded_channel();
    let forward = actix::Actor::start(ForwardStatus(tx));
    let (notifier, events) =
        start_collecting(&builder.clone().subscribe_status(forward.recipient())).await;
    (notifier, events, statuses)
}

/// The next `Gap` status (others are skipped), within [`ARRIVES_WITHIN`].
pub async fn next_gap(statuses: &mut mpsc::UnboundedReceiver<Status>) -> Vec<String> {
    loop {
        let status = tokio::time::timeout(ARRIVES_WITHIN, statuses.recv())
            .await
            .expect("a Gap status should have arrived")
            .expect("the status forwarder is alive");
        if let Status::Gap { channels } = status {
            return channels;
        }
    }
}

/// Asserts no `Gap` arrives within a short bounded wait (statuses travel through an actor of
/// their own, so one sent before the last event may still be on its way).
pub async fn assert_no_gap(statuses: &mut mpsc::UnboundedReceiver<Status>) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(Some(status)) = tokio::time::timeout_at(deadline, statuses.recv()).await {
        assert!(
            !matches!(status, Status::Gap { .. }),
            "unexpected {status:?}"
        );
    }
}

/// Waits until consumer `name` has saved a position past every row on its channels (MySQL:
/// once its cursor has given up on the ids purged under it, after the gap timeout).
pub async fn await_caught_up(db: &impl ConsumerDb, name: &str) {
    let caught_up = wait_until(PURGE_WITHIN, || async {
        listed(db, name).await.backlog == 0
    })
    .await;
    assert!(caught_up, "{:?}", listed(db, name).await);
}

/// The consumer named `name`, as listed without starting a notifier.
pub async fn listed(db: &impl ConsumerDb, name: &str) -> ConsumerInfo {
    let all = Notifier::builder(db.url()).consumers().await.unwrap();
    all.into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("consumer {name:?} is not listed"))
}

fn long_ago() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(LONG_AGO)
}

/// A registered consumer keeps its rows from a purge with a short retention however long ago
/// it was last active; the listing shows it with its exact backlog; it gets them on restart.
pub async fn a_registered_consumer_protects_its_rows_however_long_ago_it_was_seen(
    db: &impl ConsumerDb,
) {
    let consumer = db.builder().watch(db.watch("t")).consumer("c");
    consumer.start().await.unwrap().stop().await.unwrap();
    db.insert("t", 1..=5).await;
    db.make_stale("c").await;
    let purger = start_purger(db, Duration::from_millis(300)).await;
    await_purge_round(db, 1).await;
    let info = listed(db, "c").await;
    assert_eq!(
        info,
        ConsumerInfo::clone(&info),
        "ConsumerInfo is a plain value"
    );
    assert_eq!(info.state, ConsumerState::Active);
    assert_eq!(info.backlog, 5, "{info:?}");
    assert_eq!(info.last_active, long_ago());
    assert_eq!(info.position, db.saved_position("c").await);
    assert_eq!(info.channels, Some(vec![db.channel("t")]));
    assert_eq!(info.expire_after, None);
    purger.stop().await.unwrap();

    let (notifier, mut rx) = start_collecting(&consumer).await;
    assert_eq!(next_ids(&mut rx, 5).await, [1, 2, 3, 4, 5]);
    db.insert("t", 6..=6).await;
    assert_eq!(next_ids(&mut rx, 1).await, [6]);
    await_caught_up(db, "c").await;
    notifier.stop().await.unwrap();
    let info = listed(db, "c").await;
    assert_eq!(info.backlog, 0, "{info:?}");
    assert!(info.last_active > SystemTime::now() - Duration::from_secs(60));
}

/// Dropping a consumer on purpose lets the purge take its rows; when it comes back it gets a
/// `Gap` naming its channel before any event, and then only new rows. Dropping an unknown
/// consumer is a typed error naming it.
pub async fn a_dropped_consumer_that_comes_back_gets_a_gap(db: &impl ConsumerDb) {
    let consumer = db.builder().watch(db.watch("t")).consumer("c");
    consumer.start().await.unwrap().stop().await.unwrap();
    db.insert("t", 1..=5).await;
    let admin = Notifier::builder(db.url());
    admin.drop_consumer("c").await.unwrap();
    match admin.drop_consumer("nobody").await {
        Err(e @ Error::UnknownConsumer { .. }) => {
            assert!(e.to_string().contains("\"nobody\""), "{e}")
        }
        other => panic!("expected UnknownConsumer, got {other:?}"),
    }
    let info = listed(db, "c").await;
    assert_eq!((info.state, info.backlog), (ConsumerState::Dropped, 5));

    let purger = start_purger(db, Duration::from_millis(300)).await;
    await_purge_round(db, 1).await;
    purger.stop().await.unwrap();
    assert_eq!(listed(db, "c").await.backlog, 0, "its rows were purged");

    let (notifier, mut rx, mut statuses) = start_watching_status(&consumer).await;
    assert_eq!(next_gap(&mut statuses).await, [db.channel("t")]);
    assert_eq!(listed(db, "c").await.state, ConsumerState::Active);
    db.insert("t", 6..=6).await;
    assert_eq!(next_ids(&mut rx, 1).await, [6], "the purged rows are gone");
    assert!(rx.try_recv().is_err());
    assert_no_gap(&mut statuses).await;
    await_caught_up(db, "c").await;
    notifier.stop().await.unwrap();

    // back again with nothing purged meanwhile: no gap
    let (notifier, mut rx, mut statuses) = start_watching_status(&consumer).await;
    db.insert("t", 7..=7).await;
    assert_eq!(next_ids(&mut rx, 1).await, [7]);
    assert_no_gap(&mut statuses).await;
    notifier.stop().await.unwrap();
}

/// A listener without a consumer, held back by a stuck subscriber (policy Wait, an in-flight
/// budget of 1,024 events) in the middle of its first rows, falls behind another
/// application's short retention: the purge deletes the rows committed after them, which it
/// had not read. Released, it announces a `Gap` on its channel — nothing keeps an unnamed
/// listener's rows, but losing them must never be silent — and goes on with the rows that
/// follow.
pub async fn an_unnamed_listener_that_falls_behind_the_retention_gets_a_gap(db: &impl ConsumerDb) {
    const ROWS: i64 = 3_000;
    let (stuck, release, mut events, arbiter) = super::gated();
    let (tx, mut statuses) = mpsc::unbounded_channel();
    let forward = actix::Actor::start(ForwardStatus(tx));
    let notifier = db
        .builder()
        .watch(db.watch("t"))
        .max_in_flight(1_024)
        .subscribe(
            Subscription::new("t", Insert)
                .policy(sqlnotify::OverflowPolicy::Wait)
                .buffer(10),
            stuck,
        )
        .subscribe_status(forward.recipient())
        .start()
        .await
        .expect("start the unnamed listener");
    db.insert("t", 1..=ROWS / 2).await;
    assert!(
        wait_until(ARRIVES_WITHIN, || async {
            notifier.stats().await.unwrap().received >= 1_000
        })
        .await,
        "the listener reads until the budget is used up"
    );
    db.insert("t", ROWS / 2 + 1..=ROWS).await;
    let purger = start_purger(db, Duration::from_millis(300)).await;
    await_purge_round(db, 1).await;
    purger.stop().await.unwrap();
    let received = notifier.stats().await.unwrap().received;
    assert!(
        received < ROWS as u64,
        "the listener was held back: it received {received} of {ROWS}"
    );
    assert!(!db.journal_has(ROWS).await, "row {ROWS} was purged unread");

    release.send(()).unwrap();
    assert_eq!(next_gap(&mut statuses).await, [db.channel("t")]);
    db.insert("t", ROWS + 1..=ROWS + 1).await;
    let mut ids = Vec::new();
    while ids.last() != Some(&(ROWS + 1)) {
        ids.extend(next_ids(&mut events, 1).await);
    }
    assert!(
        ids.len() < ROWS as usize + 1 && ids.windows(2).all(|w| w[0] < w[1]),
        "the rows before the gap in order, then the new row: {} events",
        ids.len()
    );
    notifier.stop().await.unwrap();
    arbiter.stop();
}

/// A consumer with an expiry, away longer than it, is expired by the purge (whose own
/// settings do not matter) and loses its protection; when it comes back it gets a `Gap`.
pub async fn an_expired_consumer_that_comes_back_gets_a_gap(db: &impl ConsumerDb) {
    let consumer = db
        .builder()
        .watch(db.watch("t"))
        .consumer("c")
        .consumer_expiry(Duration::from_secs(1));
    consumer.start().await.unwrap().stop().await.unwrap();
    assert_eq!(
        listed(db, "c").await.expire_after,
        Some(Duration::from_secs(1))
    );
    db.insert("t", 1..=5).await;
    let purger = start_purger(db, Duration::from_millis(300)).await;
    let expired = wait_until(PURGE_WITHIN, || async {
        listed(db, "c").await.state == ConsumerState::Expired
    })
    .await;
    assert!(expired, "the consumer was not expired");
    await_purge_round(db, 1).await;
    purger.stop().await.unwrap();
    assert_eq!(listed(db, "c").await.backlog, 0, "its rows were purged");

    let (notifier, mut rx, mut statuses) = start_watching_status(&consumer).await;
    assert_eq!(next_gap(&mut statuses).await, [db.channel("t")]);
    db.insert("t", 6..=6).await;
    assert_eq!(next_ids(&mut rx, 1).await, [6]);
    assert!(rx.try_recv().is_err());
    // running, it says it is alive often enough never to expire
    let purger = start_purger(db, Duration::from_millis(300)).await;
    await_purge_round(db, 2).await;
    await_purge_round(db, 3).await;
    assert_eq!(listed(db, "c").await.state, ConsumerState::Active);
    purger.stop().await.unwrap();
    notifier.stop().await.unwrap();
}

/// `Stats::backlog` counts the rows a running consumer has not handed over yet: a consumer
/// with no subscription reads nothing, so its backlog is every row committed since.
pub async fn stats_count_the_backlog_of_a_running_consumer(db: &impl ConsumerDb) {
    let notifier = db
        .builder()
        .watch(db.watch("t"))
        .consumer("c")
        .backlog_warning(3)
        .start()
        .await
        .unwrap();
    assert_eq!(notifier.stats().await.unwrap().backlog, 0);
    db.insert("t", 1..=7).await;
    let counted = wait_until(PURGE_WITHIN, || async {
        notifier.stats().await.unwrap().backlog == 7
    })
    .await;
    assert!(
        counted,
        "backlog {} instead of 7",
        notifier.stats().await.unwrap().backlog
    );
    assert_eq!(notifier.consumers().await.unwrap()[0].backlog, 7);
    let mut events = super::Events::subscribe(&notifier, Subscription::new("t", Insert)).await;
    events.take(7).await;
    let caught_up = wait_until(PURGE_WITHIN, || async {
        notifier.stats().await.unwrap().backlog == 0
    })
    .await;
    assert!(caught_up, "the backlog did not go back to 0");
    notifier.stop().await.unwrap();
}

/// Scenarios of this file (without a list: every one), as `#[actix_rt::test]` functions for a
/// test file whose async `consumer_db()` returns its [`ConsumerDb`].
#[macro_export]
macro_rules! consumer_scenarios {
    () => {
        $crate::consumer_scenarios!(
            a_stopped_consumer_gets_every_row_through_another_notifiers_purge,
            a_named_consumer_replays_nothing_until_its_first_subscription,
            a_registered_consumer_protects_its_rows_however_long_ago_it_was_seen,
            a_dropped_consumer_that_comes_back_gets_a_gap,
            an_expired_consumer_that_comes_back_gets_a_gap,
            stats_count_the_backlog_of_a_running_consumer,
            a_consumer_of_an_older_version_keeps_its_rows_after_the_upgrade,
            a_consumer_coming_back_during_a_purge_waits_and_sees_what_it_missed,
        );
    };
    ($($scenario:ident),* $(,)?) => {
        $(
            #[actix_rt::test]
            async fn $scenario() {
                let db = consumer_db().await;
                common::consumers::$scenario(&db).await;
            }
        )*
    };
}

/// A consumer registered by an older sqlnotify (its table without the new columns) is kept
/// after the upgrade: it protects every channel, however long ago it was seen, and gets its
/// rows when it starts again (a purge round is proven by another consumer's expiry, since
/// the old consumer protects the marker rows of every channel too).
pub async fn a_consumer_of_an_older_version_keeps_its_rows_after_the_upgrade(db: &impl ConsumerDb) {
    db.create_old_consumer("legacy").await;
    db.builder()
        .watch(db.watch("t"))
        .start()
        .await
        .unwrap()
        .stop()
        .await
        .unwrap();
    db.insert("t", 1..=5).await;
    let probe = db
        .builder()
        .watch(db.watch("other"))
        .consumer("probe")
        .consumer_expiry(Duration::from_secs(1));
    probe.start().await.unwrap().stop().await.unwrap();
    let purger = start_purger(db, Duration::from_millis(300)).await;
    let expired = wait_until(PURGE_WITHIN, || async {
        listed(db, "probe").await.state == ConsumerState::Expired
    })
    .await;
    assert!(expired, "no purge round expired the probe");
    purger.stop().await.unwrap();
    let legacy = listed(db, "legacy").await;
    assert_eq!(
        (
            legacy.state,
            legacy.channels,
            legacy.last_active,
            legacy.backlog
        ),
        (ConsumerState::Active, None, long_ago(), 5),
        "an old consumer protects every channel"
    );

    let legacy = db.builder().watch(db.watch("t")).consumer("legacy");
    let (notifier, mut rx) = start_collecting(&legacy).await;
    assert_eq!(next_ids(&mut rx, 5).await, [1, 2, 3, 4, 5]);
    assert_eq!(
        listed(db, "legacy").await.channels,
        Some(vec![db.channel("t")])
    );
    notifier.stop().await.unwrap();
}

/// The consumer under test and the purging application each connect with a role (user) of
/// their own, without the right to change the schema (`manage_triggers(false)`): the
/// watches were installed by the owner, who also writes the rows.
pub struct AsRoles<'a, D> {
    /// The owner's database.
    pub db: &'a D,
    /// The consumer's URL.
    pub consumer_url: String,
    /// The purging application's URL.
    pub purger_url: String,
}

impl<D: ConsumerDb> ConsumerDb for AsRoles<'_, D> {
    fn url(&self) -> String {
        self.consumer_url.clone()
    }
    fn builder_at(&self, url: &str) -> NotifierBuilder {
        self.db.builder_at(url).manage_triggers(false)
    }
    fn purger_builder(&self) -> NotifierBuilder {
        self.builder_at(&self.purger_url)
    }
    fn watch(&self, table: &str) -> Watch {
        self.db.watch(table)
    }
    async fn insert(&self, table: &str, ids: std::ops::RangeInclusive<i64>) {
        self.db.insert(table, ids).await
    }
    async fn journal_head(&self) -> i64 {
        self.db.journal_head().await
    }
    async fn journal_has(&self, id: i64) -> bool {
        self.db.journal_has(id).await
    }
    fn channel(&self, table: &str) -> String {
        self.db.channel(table)
    }
    async fn make_stale(&self, name: &str) {
        self.db.make_stale(name).await
    }
    async fn saved_position(&self, name: &str) -> ConsumerPosition {
        self.db.saved_position(name).await
    }
    async fn create_old_consumer(&self, name: &str) {
        self.db.create_old_consumer(name).await
    }
    type Open = D::Open;
    async fn purge_in_progress(&self, name: &str, channel: &str) -> D::Open {
        self.db.purge_in_progress(name, channel).await
    }
}

/// Installs the scenarios' watches (`t` and `other`) as the owner, so applications without
/// the right to change the schema can start with `manage_triggers(false)`.
pub async fn install_as_owner(db: &impl ConsumerDb) {
    db.builder()
        .watch(db.watch("t"))
        .watch(db.watch("other"))
        .start()
        .await
        .unwrap()
        .stop()
        .await
        .unwrap();
}

/// A dropped consumer that starts while a purge is recording what it missed waits for that
/// purge to commit (its row is locked), then sees what was recorded: a `Gap` — the purge and
/// a returning consumer never cross without a word.
pub async fn a_consumer_coming_back_during_a_purge_waits_and_sees_what_it_missed(
    db: &impl ConsumerDb,
) {
    let consumer = db.builder().watch(db.watch("t")).consumer("c");
    consumer.start().await.unwrap().stop().await.unwrap();
    Notifier::builder(db.url())
        .drop_consumer("c")
        .await
        .unwrap();
    let purge = db.purge_in_progress("c", &db.channel("t")).await;
    let starting = {
        let consumer = consumer.clone();
        actix::spawn(async move { start_watching_status(&consumer).await })
    };
    let mut starting = std::pin::pin!(starting);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut starting)
            .await
            .is_err(),
        "the consumer registered without waiting for the purge holding its row"
    );
    purge.commit().await;
    let (notifier, _events, mut statuses) = tokio::time::timeout(ARRIVES_WITHIN, starting)
        .await
        .expect("start() still waits after the purge committed")
        .unwrap();
    assert_eq!(next_gap(&mut statuses).await, [db.channel("t")]);
    assert_eq!(listed(db, "c").await.state, ConsumerState::Active);
    notifier.stop().await.unwrap();
}
