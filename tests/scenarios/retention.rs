//! Journal retention on journal dialects: old rows are purged, except those a consumer has
//! not read yet, until it is dropped on purpose.

use std::time::Duration;

use sqlnotify::{Operation, Subscription};

use crate::common::backend::{Backend, Kind};
use crate::common::consumers::ConsumerDb;
use crate::common::{ids, wait_until, Events, ARRIVES_WITHIN};

/// Rows past the retention are purged (MySQL keeps the newest row: its id is where the next
/// reader starts); a consumer seen recently protects the rows after its position; one seen
/// long ago and then dropped on purpose protects nothing.
pub async fn retention_trims_the_journal_but_keeps_what_an_active_consumer_has_not_read<D>(db: &D)
where
    D: Backend + ConsumerDb,
{
    db.run("CREATE TABLE t (id INTEGER PRIMARY KEY)").await;
    let notifier = Backend::builder(db)
        .watch(Backend::watch(db, "t", Operation::Insert))
        .retention(Duration::from_millis(300))
        .purge_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    db.insert_ids("t", 1..=20).await;
    assert_eq!(ids(&ev.take(20).await), (1..=20).collect::<Vec<_>>());
    let kept = i64::from(db.kind() == Kind::Mysql);
    assert!(
        wait_until(ARRIVES_WITHIN, || async { db.journal_rows().await == kept }).await,
        "the journal was not trimmed (down to {kept} rows)"
    );

    // a consumer seen recently protects the rows it has not read yet: 10 rows, and in the same
    // transaction a consumer positioned 4 rows before the last of them
    let journal = db.journal_table();
    let inserts: String = (21..=30)
        .map(|id| format!("INSERT INTO t VALUES ({id}); "))
        .collect();
    db.run(&match db.kind() {
        Kind::Sqlite => format!(
            "BEGIN; {inserts} INSERT INTO sqlnotify_consumers (name, cursor, updated_at) \
             SELECT 'reader', max(id) - 4, 1e12 FROM {journal}; COMMIT;"
        ),
        Kind::Mysql => format!(
            "START TRANSACTION; {inserts} INSERT INTO sqlnotify_consumers (name, watermark, \
             updated_at) SELECT 'reader', MAX(id) - 4, NOW(6) + INTERVAL 1 DAY FROM {journal}; \
             COMMIT;"
        ),
        Kind::Postgres(_) => panic!("PostgreSQL consumers hold a horizon, not a journal id"),
    })
    .await;
    let last = db.journal_head().await;
    assert_eq!(ids(&ev.take(10).await), (21..=30).collect::<Vec<_>>());
    assert!(
        wait_until(ARRIVES_WITHIN, || async { db.journal_rows().await == 4 }).await,
        "rows up to the consumer's position should have been trimmed"
    );
    let kept_ids = format!("SELECT min(id) * 1000000 + max(id) FROM {journal}");
    assert_eq!(
        db.number(&kept_ids).await,
        (last - 3) * 1_000_000 + last,
        "4 rows: the ones after the consumer's position, up to the last"
    );

    // a consumer last seen long ago still protects its rows (see
    // a_registered_consumer_protects_its_rows_however_long_ago_it_was_seen); once dropped on
    // purpose, it protects nothing
    db.make_stale("reader").await;
    notifier.drop_consumer("reader").await.unwrap();
    assert!(
        wait_until(ARRIVES_WITHIN, || async { db.journal_rows().await == kept }).await,
        "a dropped consumer kept rows"
    );
    ev.assert_empty();
    notifier.stop().await.unwrap();
}
