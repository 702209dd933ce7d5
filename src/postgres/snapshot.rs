//! Snapshots on PostgreSQL: a `REPEATABLE READ` read-only transaction on a connection of its
//! own, whose snapshot (`pg_current_snapshot()`) is the fence, read through a cursor in key
//! order.
//!
//! The fence compares the snapshot with each event's transaction id (`xid8`), on every tier:
//! a transaction is reflected by the rows exactly when the snapshot sees it, which is what a
//! snapshot's `xmin:xmax:xip` says. On the journal tiers nothing reaches the pipeline before
//! the listener's own snapshot sees it, so a transaction the feed's subscription missed (routed
//! before it existed) is seen by the later snapshot too. The logical tier's walsender sends a
//! transaction once its commit record is flushed, which is before the transaction leaves the
//! server's list of running ones (`ProcArray`), so new snapshots do not see it — the whole wait for synchronous standbys lies
//! in between, and `pg_xact_status` reports such a transaction as in progress, so SQL cannot
//! tell. Such a transaction could be routed before the feed's subscription and still be
//! running to the snapshot taken after it: a gap. So the logical source records the
//! transactions it handed over ([`SentXids`]) for as long as the server may still report them
//! running, and a [`Tier::Logical`](crate::Tier::Logical) snapshot that does not see one of
//! them is taken again, until it sees them all (up to [`SETTLE_LIMIT`]).
//!
//! Why a fence by transaction id and not by WAL position: a transaction is reflected by the
//! rows exactly when the snapshot sees it, and that is what `xmin:xmax:xip` says. Comparing
//! the snapshot's `pg_current_wal_lsn()` with commit LSNs would have the window above and be
//! wrong for asynchronous commits too (visible before their record is written, so past the
//! write position); a snapshot exported by creating a replication slot fits only a stream that
//! starts at that slot, not a feed opened while the notifier's slot streams.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio_postgres::Client;

use super::PgConfig;

use super::control::Control;
use super::ddl::json_expr;
use crate::error::{Error, Result};
use crate::event::Channel;
use crate::snapshot::fence::Fence;
use crate::snapshot::reader::SnapshotReader;
use crate::sql::quote_ident;

/// How long a [`Tier::Logical`](crate::Tier::Logical) snapshot is taken again while a transaction it lists as
/// running was already handed over (see the module documentation) before the read fails.
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many transactions [`SentXids`] keeps by id. Normally it holds only the few that may
/// still be running (the lag task forgets the others every 2 s); while the lag task cannot
/// reach the server, the oldest beyond this are folded into a floor instead of growing the
/// set without bound.
const SENT_KEPT: usize = 8192;

/// The transactions ([`Tier::Logical`](crate::Tier::Logical)) the stream handed over that the server may still list
/// as running — kept until the lag task saw each one finished, and, while a snapshot is being
/// checked against them, all of them (a transaction the check needs must not be forgotten
/// between its snapshot and the check). At most [`SENT_KEPT`] by id: older ones are
/// remembered only as a floor, every transaction at or below which a snapshot must see as
/// finished (below its `xmin`) — stricter than by id, never looser.
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "logical"), allow(dead_code))]
pub(crate) struct SentXids {
    inner: Mutex<Sent>,
}

#[derive(Debug, Default)]
struct Sent {
    xids: BTreeSet<u64>,
    /// The newest transaction handed over that was dropped from `xids` to bound them.
    floor: Option<u64>,
    /// Snapshots being checked.
    checking: usize,
}

#[cfg_attr(not(feature = "logical"), allow(dead_code))]
impl SentXids {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sent> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A transaction handed over (before its rows are).
    pub fn insert(&self, xid: u64) {
        let mut sent = self.lock();
        sent.xids.insert(xid);
        while sent.xids.len() > SENT_KEPT {
            let oldest = sent.xids.pop_first();
            sent.floor = sent.floor.max(oldest);
        }
    }

    /// The transactions to ask the server about, and whether the server's oldest running
    /// transaction is wanted too (there is a floor).
    pub fn list(&self) -> (Vec<u64>, bool) {
        let sent = self.lock();
        (sent.xids.iter().copied().collect(), sent.floor.is_some())
    }

    /// Forgets the transactions of `asked` that are not `running`, and the floor when it is
    /// below `oldest` (the server's oldest running transaction, `pg_snapshot_xmin`) — the
    /// server said so after `list` — unless a snapshot is being checked.
    pub fn finished(&self, asked: &[u64], running: &HashSet<u64>, oldest: u64) {
        let mut sent = self.lock();
        if sent.checking == 0 {
            for xid in asked.iter().filter(|x| !running.contains(x)) {
                sent.xids.remove(xid);
            }
            if sent.floor.is_some_and(|f| f < oldest) {
                sent.floor = None;
            }
        }
    }

    /// Starts checking a snapshot: nothing is forgotten until the guard is dropped.
    fn checking(self: &Arc<Self>) -> Checking {
        self.lock().checking += 1;
        Checking(self.clone())
    }
}

/// A snapshot being checked against [`SentXids`].
struct Checking(Arc<SentXids>);

impl Checking {
    /// Whether a transaction handed over already is one snapshot `fence` does not see (one
    /// it lists as running, or one at or past its `xmax`: the server's last completed
    /// transaction plus one — a transaction still waiting in its commit has not completed).
    fn any_unseen(&self, fence: &Fence) -> bool {
        let sent = self.0.lock();
        sent.floor.is_some_and(|f| !fence.finished_through(f))
            || sent.xids.iter().any(|x| !fence.sees(*x))
    }
}

impl Drop for Checking {
    fn drop(&mut self) {
        self.0.lock().checking -= 1;
    }
}

/// An open snapshot of one table.
pub(crate) struct PgSnapshot {
    client: Client,
    fence: Fence,
    total: u64,
    fetch: String,
    what: String,
    done: bool,
}

/// `SELECT` of `channel`'s payloads (the JSON its triggers write) from its table, in key order.
pub(crate) fn rows_sql(channel: &Channel) -> String {
    let columns = channel.payload_columns();
    let keys: Vec<String> = channel
        .key_columns()
        .iter()
        .map(|k| format!("_sqn_r.{}", quote_ident(k)))
        .collect();
    format!(
        "SELECT {} FROM {}.{} AS _sqn_r ORDER BY {}",
        json_expr("_sqn_r", &columns),
        quote_ident(channel.schema()),
        quote_ident(channel.table()),
        keys.join(", ")
    )
}

impl PgSnapshot {
    /// Opens the read: the transaction, its snapshot, the row count and the cursor. With
    /// `sent` (the logical tier), a snapshot that lists as running a transaction already
    /// handed over is taken again (see the module documentation).
    pub async fn open(
        config: &PgConfig,
        channel: Arc<Channel>,
        chunk_rows: usize,
        sent: Option<Arc<SentXids>>,
    ) -> Result<Self> {
        let what = format!(
            "reading a snapshot of {}.{}",
            channel.schema(),
            channel.table()
        );
        let client = Control::connect(config, "snapshot").await?;
        let table = format!(
            "{}.{}",
            quote_ident(channel.schema()),
            quote_ident(channel.table())
        );
        let checking = sent.as_ref().map(SentXids::checking);
        let deadline = tokio::time::Instant::now() + SETTLE_LIMIT;
        let mut pause = std::time::Duration::from_millis(1);
        let (row, fence) = loop {
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(|e| Error::db(what.clone(), e))?;
            // The first statement takes the transaction's snapshot: the count and every row
            // read afterwards see exactly what it says.
            let row = client
                .query_one(
                    &format!(
                        "SELECT pg_catalog.pg_current_snapshot()::text, (SELECT pg_catalog.count(*) FROM {table})"
                    ),
                    &[],
                )
                .await
                .map_err(|e| Error::db(what.clone(), e))?;
            let text: String = row.get(0);
            let fence = Fence::parse_postgres(&text).ok_or_else(|| Error::InvalidPayload {
                channel: channel.name().to_string(),
                reason: format!("unexpected snapshot {text:?}"),
            })?;
            if !checking.as_ref().is_some_and(|c| c.any_unseen(&fence)) {
                break (row, fence);
            }
            client
                .batch_execute("ROLLBACK")
                .await
                .map_err(|e| Error::db(what.clone(), e))?;
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Database {
                    context: what,
                    source: format!(
                        "for {SETTLE_LIMIT:?}, every snapshot listed as running a transaction \
                         the stream had delivered (its commit waits, for a synchronous standby?): \
                         a snapshot taken then would miss that change"
                    )
                    .into(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(100));
        };
        drop(checking);
        let total = row.get::<_, i64>(1).max(0) as u64;
        client
            .batch_execute(&format!(
                "DECLARE _sqn_snapshot NO SCROLL CURSOR FOR {}",
                rows_sql(&channel)
            ))
            .await
            .map_err(|e| Error::db(what.clone(), e))?;
        Ok(PgSnapshot {
            client,
            fence,
            total,
            fetch: format!("FETCH {chunk_rows} FROM _sqn_snapshot"),
            what,
            done: false,
        })
    }
}

impl SnapshotReader for PgSnapshot {
    fn fence(&self) -> &Fence {
        &self.fence
    }

    fn total(&self) -> u64 {
        self.total
    }

    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            if self.done {
                return Ok(Vec::new());
            }
            let rows = self
                .client
                .query(&self.fetch, &[])
                .await
                .map_err(|e| Error::db(self.what.clone(), e))?;
            if rows.is_empty() {
                self.done = true;
                self.client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(|e| Error::db(self.what.clone(), e))?;
            }
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(text: &str) -> Fence {
        Fence::parse_postgres(text).unwrap()
    }

    #[test]
    fn sent_xids_are_forgotten_once_finished_but_not_while_a_snapshot_is_checked() {
        let sent = Arc::new(SentXids::default());
        for x in [10, 11, 12] {
            sent.insert(x);
        }
        let checking = sent.checking();
        // 12 is still running to a snapshot taken now.
        assert!(checking.any_unseen(&fence("10:13:12")));
        let (asked, floor) = sent.list();
        assert_eq!((asked.clone(), floor), (vec![10, 11, 12], false));
        sent.finished(&asked, &HashSet::from([12]), 12);
        assert_eq!(sent.list().0.len(), 3, "kept while a snapshot is checked");
        drop(checking);
        sent.finished(&asked, &HashSet::from([12]), 12);
        assert_eq!(sent.list().0, vec![12]);
        let checking = sent.checking();
        assert!(checking.any_unseen(&fence("12:13:12")));
        assert!(!checking.any_unseen(&fence("12:14:")));
    }

    #[test]
    fn sent_xids_stay_bounded_and_what_they_drop_is_checked_by_a_stricter_floor() {
        let sent = Arc::new(SentXids::default());
        let n = SENT_KEPT as u64 + 100;
        for x in 1..=n {
            sent.insert(x);
        }
        let (asked, floor) = sent.list();
        assert_eq!(asked.len(), SENT_KEPT, "bounded");
        assert_eq!(asked[0], 101, "the oldest were dropped");
        assert!(floor);
        let checking = sent.checking();
        // A snapshot that sees every id kept, but whose xmin is at or below the floor (100):
        // a dropped transaction could be one it lists as running, so it is not trusted.
        assert!(checking.any_unseen(&fence(&format!("100:{}:", n + 1))));
        assert!(!checking.any_unseen(&fence(&format!("101:{}:", n + 1))));
        drop(checking);
        // The floor goes once the server's oldest running transaction is past it.
        sent.finished(&[], &HashSet::new(), 100);
        assert!(sent.list().1, "100 may still run");
        sent.finished(&[], &HashSet::new(), 101);
        assert!(!sent.list().1);
        let checking = sent.checking();
        assert!(!checking.any_unseen(&fence(&format!("50:{}:", n + 1))));
    }
    use crate::operation::Operation;
    use crate::tier::Tier;

    #[test]
    fn rows_come_as_payloads_in_key_order() {
        let channel = Channel {
            name: "c".into(),
            schema: "Shop".into(),
            table: "order\"s".into(),
            operation: Operation::Insert,
            label: None,
            key_columns: vec!["b".into(), "a".into()],
            extra_columns: vec!["note".into()],
            tier: Tier::Durable,
            signed: false,
        };
        assert_eq!(
            rows_sql(&channel),
            "SELECT pg_catalog.json_build_object('b', _sqn_r.\"b\", 'a', _sqn_r.\"a\", 'note', _sqn_r.\"note\")::text \
             FROM \"Shop\".\"order\"\"s\" AS _sqn_r ORDER BY _sqn_r.\"b\", _sqn_r.\"a\""
        );
    }
}
