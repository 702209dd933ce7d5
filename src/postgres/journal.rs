//! Reading the PostgreSQL journal (durable and poll tiers) without ever skipping a row.
//!
//! The problem: journal ids come from a sequence when the row is *inserted*, not when its
//! transaction commits. Transaction A may take id 10, B id 11, B commits, a reader sees 11
//! and moves its cursor past it — then A commits, and row 10 is never read.
//!
//! The method: every row records its writer's transaction id (`xid8`,
//! `pg_current_xact_id()`). Each read runs as one statement and also returns
//! `pg_snapshot_xmin(pg_current_snapshot())` of that statement's snapshot: the oldest
//! transaction still running. Every transaction older than that horizon has finished, so all
//! of its rows were visible to this read. The next read asks for rows with `xid >= horizon`
//! — rows of transactions that were (or may have been) still running — so a late commit is
//! picked up however low its id. Rows read twice that way are suppressed with a set of the
//! ids already delivered whose xid is at or above the horizon; ids below it can never come
//! back, so the set stays as small as the set of recently committed rows. The horizon is what
//! a named consumer saves, with the ids in that set (a [`Position`]): restarting from it
//! replays exactly what was not delivered — or, when the set is too large to store (a
//! transaction somewhere in the cluster stayed open long, holding every horizon back), at
//! least that.
//!
//! Transactions stay whole and in order. A read sees each transaction's rows all or not at
//! all (they commit together), and returns them grouped by transaction, the groups ordered
//! by their last journal id, each group in id order, the last row marked. A transaction that
//! wrote after another one committed (the only order two transactions can be seen in, e.g.
//! two updates of one row) took its ids after all of the other's, so its group comes later;
//! transactions that overlapped without waiting for each other come in the order of their
//! last writes. Across reads, a transaction read later committed after every transaction an
//! earlier read returned (it was not visible then).

use std::collections::HashMap;
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

/// Most delivered ids a saved position carries; beyond that it saves the horizon alone.
pub(crate) const MAX_SAVED_SEEN: usize = 1_000;

/// What a named consumer saves: its horizon, and the ids at or above it already delivered
/// (`None` when there were more than [`MAX_SAVED_SEEN`]: a restart delivers them again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub horizon: u64,
    pub seen: Option<Vec<i64>>,
}

/// Where a listener is in the journal.
#[derive(Debug, Default)]
pub(crate) struct JournalCursor {
    /// Transactions older than this had all finished at the last read. `None`: not placed yet.
    pub horizon: Option<u64>,
    /// Ids delivered whose xid is at or above the horizon (they can be read again).
    seen: HashMap<i64, u64>,
    /// The snapshot of the last complete read (`xmin:xmax:xip,…`): every transaction visible
    /// to it has been delivered. The rows of the next read carry it in their
    /// [`ReadPoint`](crate::ReadPoint)s.
    snapshot: Option<String>,
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
    /// A cursor resuming from a saved horizon and the ids at or above it already delivered
    /// (with their transaction ids).
    pub fn resume(horizon: u64, seen: HashMap<i64, u64>) -> Self {
        JournalCursor {
            horizon: Some(horizon),
            seen,
            // Everything below the horizon was delivered (by an earlier run); what it
            // delivered at or above it is in `seen`, which a snapshot cannot say: a client
            // resuming from the first read's rows may get those again (see README, "Resume").
            snapshot: Some(format!("{horizon}:{horizon}:")),
            unfinished: None,
        }
    }

    /// The position to save once everything read so far has left the pipeline.
    pub fn position(&self) -> Option<Position> {
        let horizon = self.horizon?;
        let seen = (self.seen.len() <= MAX_SAVED_SEEN).then(|| {
            let mut ids: Vec<i64> = self.seen.keys().copied().collect();
            ids.sort_unstable();
            ids
        });
        Some(Position { horizon, seen })
    }

    /// Reads every row past the horizon on `channels`; hands those not seen yet to `outlet`
    /// (or, without one — placing a new cursor at "now" — only marks them seen). Returns how
    /// many events went, or `None` when told to stop while waiting for room in the pipeline.
    pub async fn read(
        &mut self,
        client: &Client,
        channels: &[String],
        outlet: Option<&Outlet>,
    ) -> Result<Option<u64>> {
        let sql = format!(
            "SELECT s.horizon::text, j.id, j.xid::text, j.channel, j.payload, j.events, j.tx_last, s.snapshot::text
               FROM (SELECT pg_catalog.pg_snapshot_xmin(c.snapshot) AS horizon, c.snapshot
                       FROM (SELECT coalesce($3::text::pg_snapshot, pg_catalog.pg_current_snapshot()) AS snapshot) c) s
               LEFT JOIN LATERAL (
                    SELECT id, xid, channel, payload, events,
                           pg_catalog.max(id) OVER (PARTITION BY xid) AS tx_last
                      FROM {}.journal
                     WHERE xid >= coalesce($1::text::xid8, s.horizon) AND channel = ANY($2)
                       AND ($3 IS NULL OR pg_catalog.pg_visible_in_snapshot(xid, s.snapshot))
                     ORDER BY tx_last, id) j ON true",
            quote_ident(SCHEMA)
        );
        let floor = self.horizon.map(|h| h.to_string());
        // query_typed: one round trip, unnamed statement — works through PgBouncer in
        // transaction mode, where a named prepared statement may live on another server.
        let unfinished = self.unfinished.clone();
        let params: [(&(dyn ToSql + Sync), Type); 3] = [
            (&floor, Type::TEXT),
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
        let (mut batch, mut ids, mut delivered, mut horizon) = (Vec::new(), Vec::new(), 0, None);
        let (mut units, mut read) = (0, None);
        while let Some(row) = rows
            .try_next()
            .await
            .map_err(|e| Error::db("reading the journal", e))?
        {
            if horizon.is_none() {
                let h = parse_xid(&row.get::<_, String>(0))?;
                horizon = Some(h);
                let before = self.snapshot.clone().unwrap_or_else(|| format!("{h}:{h}:"));
                let during: String = row.get(7);
                // Until it completes, this read's rows are what the next read returns.
                self.unfinished = Some(during.clone());
                read = Some(ReadSnapshots::new(before, during));
            }
            let Some(id) = row.get::<_, Option<i64>>(1) else {
                continue;
            };
            let xid = parse_xid(&row.get::<_, String>(2))?;
            let Some(outlet) = outlet else {
                self.seen.insert(id, xid);
                continue;
            };
            if self.seen.contains_key(&id) {
                continue;
            }
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
                read_point: read.clone().map(|read| ReadPoint::new(read, group)),
                decoded: None,
                part: 0,
            });
            ids.push((id, xid));
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
        if let Some(outlet) = outlet {
            let Some(n) = outlet.forward(std::mem::take(&mut batch)).await else {
                return Ok(None);
            };
            delivered += n;
            self.seen.extend(ids.drain(..));
        }
        let horizon = horizon.ok_or_else(|| Error::InvalidPayload {
            channel: "journal".into(),
            reason: "the journal read returned no snapshot horizon".into(),
        })?;
        self.seen.retain(|_, xid| *xid >= horizon);
        self.horizon = Some(horizon);
        self.snapshot = read.map(|read| read.during.clone());
        self.unfinished = None;
        Ok(Some(delivered))
    }
}

/// The transaction ids of the journal rows `ids` still there (rows a saved position says were
/// delivered; purged ones cannot come back anyway).
pub(crate) async fn seen_xids(client: &Client, ids: &[i64]) -> Result<HashMap<i64, u64>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "SELECT id, xid::text FROM {}.journal WHERE id = ANY($1)",
        quote_ident(SCHEMA)
    );
    let rows = client
        .query_typed(&sql, &[(&ids, Type::INT8_ARRAY)])
        .await
        .map_err(|e| Error::db("reading the journal", e))?;
    rows.iter()
        .map(|r| Ok((r.get::<_, i64>(0), parse_xid(&r.get::<_, String>(1))?)))
        .collect()
}

pub(crate) fn parse_xid(text: &str) -> Result<u64> {
    text.parse().map_err(|_| Error::InvalidPayload {
        channel: "journal".into(),
        reason: format!("unexpected transaction id {text:?}"),
    })
}
