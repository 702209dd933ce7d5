//! Reading the PostgreSQL journal (durable and poll tiers) without ever skipping a row.
//!
//! The problem: journal ids come from a sequence when the row is *inserted*, not when its
//! transaction commits. Transaction A may take id 10, B id 11, B commits, a reader sees 11
//! and moves its cursor past it — then A commits, and row 10 is never read.
//!
//! The method: every row records its writer's transaction id (`xid8`,
//! `pg_current_xact_id()`). Each read runs as one statement and also returns that statement's
//! snapshot (`pg_current_snapshot()`): the transactions it sees as committed are exactly those
//! whose rows it returns. The cursor keeps the snapshot of its last complete read, and the next
//! read asks only for rows of transactions that snapshot did *not* see — those at or after its
//! `xmax` (begun since) and those in its `xip` list (running then) — and that the new snapshot
//! does see. A late commit is picked up however low its id, no row comes twice, and a
//! transaction left open anywhere on the server (any role can hold one) costs nothing but one
//! entry in `xip`: what committed around it is neither fetched nor remembered again. The index
//! on `xid` serves both conditions: a range from `xmax`, and a lookup per running transaction.
//!
//! What a named consumer saves (a [`Position`]) is that snapshot (the listener saves after
//! complete reads only), with its `xmin` as the horizon (the purge and the backlog use it):
//! restarting from it replays exactly what was not delivered. Older versions of sqlnotify
//! saved the horizon alone, with the ids they had delivered at or after it (`seen`); a cursor
//! resuming from such a position skips those ids until its first complete read.
//!
//! Transactions stay whole and in order. A read sees each transaction's rows all or not at
//! all (they commit together), and returns them grouped by transaction, the groups ordered
//! by their last journal id, each group in id order, the last row marked. A transaction that
//! wrote after another one committed (the only order two transactions can be seen in, e.g.
//! two updates of one row) took its ids after all of the other's, so its group comes later;
//! transactions that overlapped without waiting for each other come in the order of their
//! last writes. Across reads, a transaction read later committed after every transaction an
//! earlier read returned (it was not visible then).

use std::collections::HashSet;
use std::time::SystemTime;

use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use super::ddl::SCHEMA;
use crate::error::{Error, Result};
use crate::event::RawNotification;
use crate::listener::Outlet;
use crate::read_point::{ReadPoint, ReadSnapshots};
use crate::sql::quote_ident;
use crate::tier::STATEMENT_CHUNK_ROWS;

/// Events handed to the decoder per batch (at least; a batch ends with the row that reaches
/// it). A batch holds under `BATCH + STATEMENT_CHUNK_ROWS` units of budget, which must fit in
/// the smallest budget, or the listener would wait for room that can never be made.
const BATCH: usize = 512;
const _: () = assert!(BATCH + STATEMENT_CHUNK_ROWS <= crate::pipeline::MIN_IN_FLIGHT);

/// Most delivered ids a saved position carries; beyond that it saves the snapshot alone.
pub(crate) const MAX_SAVED_SEEN: usize = 1_000;

/// What a named consumer saves: the snapshot of its last complete read, that snapshot's
/// `xmin` (its horizon: every older transaction was delivered), and ids delivered that the
/// snapshot does not show — those of a read in progress, or of an older version's position
/// not read past yet (`None` when there were more than [`MAX_SAVED_SEEN`]: a restart delivers
/// them again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub horizon: u64,
    /// `None`: saved by a version of sqlnotify that kept no snapshot (see
    /// [`JournalCursor::resume`]).
    pub snapshot: Option<String>,
    pub seen: Option<Vec<i64>>,
}

/// The snapshot a position that names no snapshot of its own stands for: every transaction
/// before `horizon` delivered, none at or after it (the ids it says were delivered skip those).
fn below(horizon: u64) -> String {
    format!("{horizon}:{horizon}:")
}

/// The `xmin` of a snapshot in PostgreSQL's text form.
pub(crate) fn snapshot_xmin(snapshot: &str) -> Result<u64> {
    parse_xid(snapshot.split(':').next().unwrap_or_default())
}

/// Where a listener is in the journal.
#[derive(Debug, Default)]
pub(crate) struct JournalCursor {
    /// The snapshot of the last complete read (`xmin:xmax:xip,…`): every transaction visible
    /// to it has been delivered, and the next read returns only rows of the others. The rows
    /// of the next read carry it in their [`ReadPoint`](crate::ReadPoint)s. `None`: not
    /// placed yet.
    snapshot: Option<String>,
    /// Ids delivered by a read that has not completed (or, resuming from a position of an
    /// older version, at or after its horizon): that read's rows come again, and these are
    /// skipped. Empty after every complete read.
    seen: HashSet<i64>,
    /// The snapshot of a read that failed part way (its connection lost): the next read
    /// finishes it — the same rows, in the same snapshot — before reading on, so the events
    /// of one read always name the same snapshots (`src/read_point.rs`).
    unfinished: Option<String>,
}

/// The channel, payload and event count of a journal row read with them in columns 3, 4 and 5.
/// A statement-capture row carries up to `STATEMENT_CHUNK_ROWS` events (a larger count is
/// someone else's row: clamped, the decoder checks it against the payload). A NULL where the
/// journal never writes one (its table altered by its owner) is not a panic: an empty channel
/// or payload is dropped and counted as malformed by the decoder, a missing count is 1.
pub(crate) fn content(row: &tokio_postgres::Row) -> (std::sync::Arc<str>, String, u32) {
    let events = match row.try_get::<_, Option<i32>>(5) {
        Ok(Some(n)) => n.clamp(1, STATEMENT_CHUNK_ROWS as i32) as u32,
        _ => 1,
    };
    let channel = row
        .try_get::<_, Option<&str>>(3)
        .ok()
        .flatten()
        .unwrap_or("");
    let payload = row.try_get::<_, Option<String>>(4).ok().flatten();
    (channel.into(), payload.unwrap_or_default(), events)
}

impl JournalCursor {
    /// A cursor resuming from a saved position. A snapshot whose `xmin` is not the saved
    /// horizon was left behind by an older sqlnotify that saved the horizon alone (it moved
    /// the horizon on and kept, in `seen`, every id delivered at or after it): the horizon is
    /// then what the position means. (A snapshot cannot say what `seen` says: a client
    /// resuming from an event of the first read may get those rows again; see README,
    /// "Resume".)
    pub fn resume(position: Position) -> Self {
        let snapshot = position
            .snapshot
            .filter(|s| snapshot_xmin(s).ok() == Some(position.horizon))
            .unwrap_or_else(|| below(position.horizon));
        JournalCursor {
            snapshot: Some(snapshot),
            seen: position.seen.unwrap_or_default().into_iter().collect(),
            unfinished: None,
        }
    }

    /// Places a new cursor at "now": everything committed so far counts as delivered.
    pub async fn place(&mut self, client: &Client) -> Result<()> {
        let row = client
            .query_typed_one("SELECT pg_catalog.pg_current_snapshot()::text", &[])
            .await
            .map_err(|e| Error::db("reading the journal", e))?;
        *self = JournalCursor {
            snapshot: Some(row.get(0)),
            ..JournalCursor::default()
        };
        Ok(())
    }

    /// The position to save once everything read so far has left the pipeline.
    pub fn position(&self) -> Option<Position> {
        let snapshot = self.snapshot.clone()?;
        let seen = (self.seen.len() <= MAX_SAVED_SEEN).then(|| {
            let mut ids: Vec<i64> = self.seen.iter().copied().collect();
            ids.sort_unstable();
            ids
        });
        Some(Position {
            horizon: snapshot_xmin(&snapshot).ok()?,
            snapshot: Some(snapshot),
            seen,
        })
    }

    /// Reads every row of a transaction the last complete read did not see on `channels`, and
    /// hands those not delivered yet to `outlet`. Returns how many events went, or `None` when
    /// told to stop while waiting for room in the pipeline.
    pub async fn read(
        &mut self,
        client: &Client,
        channels: &[String],
        outlet: &Outlet,
    ) -> Result<Option<u64>> {
        // The index on xid answers both arms of the OR (a range, a lookup per running
        // transaction); the last condition keeps out a row whose xid column says something
        // else than its writer (an application role may insert into the journal).
        let sql = format!(
            "SELECT s.snapshot::text, j.id, j.xid::text, j.channel, j.payload, j.events, j.tx_last
               FROM (SELECT coalesce($3::text::pg_snapshot, pg_catalog.pg_current_snapshot()) AS snapshot) s
               LEFT JOIN LATERAL (
                    SELECT id, xid, channel, payload, events,
                           pg_catalog.max(id) OVER (PARTITION BY xid) AS tx_last
                      FROM {}.journal
                     WHERE (xid >= pg_catalog.pg_snapshot_xmax($1::text::pg_snapshot)
                            OR xid = ANY(ARRAY(SELECT pg_catalog.pg_snapshot_xip($1::text::pg_snapshot))))
                       AND channel = ANY($2)
                       AND pg_catalog.pg_visible_in_snapshot(xid, s.snapshot)
                     ORDER BY tx_last, id) j ON true",
            quote_ident(SCHEMA)
        );
        // (A cursor never placed — the listener places before reading — has delivered nothing.)
        let before = self.snapshot.clone().unwrap_or_else(|| below(1));
        // query_typed: one round trip, unnamed statement — works through PgBouncer in
        // transaction mode, where a named prepared statement may live on another server.
        let unfinished = self.unfinished.clone();
        let params: [(&(dyn ToSql + Sync), Type); 3] = [
            (&before, Type::TEXT),
            (&channels, Type::TEXT_ARRAY),
            (&unfinished, Type::TEXT),
        ];
        let rows = client
            .query_typed_raw(&sql, params)
            .await
            .map_err(|e| Error::db("reading the journal", e))?;
        pin_mut!(rows);
        // A row counts as seen only once it has been handed to the decoder: if this read is
        // abandoned (lost connection), rows collected but not handed over are read again.
        let (mut batch, mut ids, mut delivered) = (Vec::new(), Vec::new(), 0);
        let (mut units, mut read) = (0, None);
        while let Some(row) = rows
            .try_next()
            .await
            .map_err(|e| Error::db("reading the journal", e))?
        {
            let read = read.get_or_insert_with(|| {
                let during: String = row.get(0);
                // Until it completes, this read's rows are what the next read returns.
                self.unfinished = Some(during.clone());
                ReadSnapshots::new(before.clone(), during)
            });
            let Some(id) = row.get::<_, Option<i64>>(1) else {
                continue;
            };
            if self.seen.contains(&id) {
                continue;
            }
            let xid = parse_xid(&row.get::<_, String>(2))?;
            let (channel, payload, events) = content(&row);
            let group: i64 = row.get(6);
            batch.push(RawNotification {
                channel,
                payload,
                received_at: SystemTime::now(),
                sequence: Some(id),
                events,
                transaction: Some(xid),
                last_in_transaction: Some(id == group),
                read_point: Some(ReadPoint::new(read.clone(), group)),
                decoded: None,
                part: 0,
            });
            ids.push(id);
            units += events as usize;
            if units >= BATCH {
                let Some(n) = outlet.forward(std::mem::take(&mut batch)).await else {
                    return Ok(None);
                };
                delivered += n;
                self.seen.extend(ids.drain(..));
                units = 0;
            }
        }
        let Some(n) = outlet.forward(std::mem::take(&mut batch)).await else {
            return Ok(None);
        };
        delivered += n;
        let read = read.ok_or_else(|| Error::InvalidPayload {
            channel: "journal".into(),
            reason: "the journal read returned no snapshot".into(),
        })?;
        // Everything this read's snapshot sees is delivered: the next read asks for none of it.
        self.seen.clear();
        self.snapshot = Some(read.during.clone());
        self.unfinished = None;
        Ok(Some(delivered))
    }
}

pub(crate) fn parse_xid(text: &str) -> Result<u64> {
    text.parse().map_err(|_| Error::InvalidPayload {
        channel: "journal".into(),
        reason: format!("unexpected transaction id {text:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(horizon: u64, snapshot: Option<&str>, seen: &[i64]) -> Position {
        Position {
            horizon,
            snapshot: snapshot.map(str::to_string),
            seen: Some(seen.to_vec()),
        }
    }

    #[test]
    fn a_cursor_resumes_from_its_saved_snapshot_and_saves_it_again() {
        let cursor = JournalCursor::resume(position(5, Some("5:9:5,7"), &[12, 11]));
        assert_eq!(
            cursor.position(),
            Some(position(5, Some("5:9:5,7"), &[11, 12]))
        );
    }

    #[test]
    fn a_snapshot_an_older_version_left_behind_gives_way_to_the_horizon() {
        // The older version moved the horizon to 8 and kept the snapshot of horizon 5.
        let cursor = JournalCursor::resume(position(8, Some("5:9:5,7"), &[20]));
        assert_eq!(cursor.position(), Some(position(8, Some("8:8:"), &[20])));
        let cursor = JournalCursor::resume(position(8, None, &[]));
        assert_eq!(cursor.position(), Some(position(8, Some("8:8:"), &[])));
    }

    #[test]
    fn too_many_ids_of_a_read_in_progress_are_not_saved() {
        let ids: Vec<i64> = (1..=MAX_SAVED_SEEN as i64 + 1).collect();
        let cursor = JournalCursor::resume(position(3, Some("3:4:"), &ids));
        let saved = cursor.position().unwrap();
        assert_eq!((saved.horizon, saved.seen), (3, None));
        assert_eq!(JournalCursor::default().position(), None, "not placed");
    }

    #[test]
    fn a_snapshots_xmin_is_its_first_number() {
        assert_eq!(snapshot_xmin("742:750:742,745").unwrap(), 742);
        assert_eq!(snapshot_xmin("9:9:").unwrap(), 9);
        assert!(snapshot_xmin("nonsense").is_err());
    }
}
