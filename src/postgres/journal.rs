//! Reading the PostgreSQL journal (durable and poll tiers) without ever skipping a row.
//!
//! The problem: journal ids come from a sequence when the row is *inserted*, not when its
//! transaction commits. Transaction A may take id 10, B id 11, B commits, a reader sees 11
//! and moves its cursor past it — then A commits, and row 10 is never read.
//!
//! The method: every row records its writer's transaction id (`xid8`,
//! `pg_current_xact_id()`). Each read has one snapshot, the `pg_current_snapshot()` of its
//! first statement (see below for reads of more than one): the transactions it sees as
//! committed are exactly those whose rows it returns. The cursor keeps the snapshot of its
//! last complete read, and the next read asks only for rows of transactions that snapshot did
//! *not* see — those at or after its `xmax` (begun since) and those in its `xip` list
//! (running then) — and that the new snapshot does see. A late commit is picked up however low its id, no row comes twice, and a
//! transaction left open anywhere on the server (any role can hold one) costs nothing but one
//! entry in `xip`: what committed around it is neither fetched nor remembered again. The index
//! on `xid` serves both conditions: a range from `xmax`, and a lookup per running transaction.
//!
//! A read is bounded, so that a consumer catching up on a long backlog behind a slow
//! subscriber saves its position (and says it is alive) as it goes, and no statement stays
//! open while the subscriber works through the backlog. Its first statement is the one
//! above, cut at [`FIRST_PAGE`] rows: a read that fits (nearly every one) costs one statement,
//! as it always did (one that does not still orders every row of the read to return its
//! first ones). A statement also ends after the first whole transaction once it has waited
//! [`PAGE_TIME`] for room in the pipeline: the subscribers are slow (the rows it still sends
//! are dropped). The rest of a read goes on in pages, each one statement that reads only
//! what the read's snapshot saw (passed back as a parameter, so no transaction is held): the
//! read's rows in the next range of journal ids ([`PAGE`] ids or more, see [`PAGE_MAX`]) from
//! its next row after where the last page ended (found on the primary key; after a restart,
//! its first row, through the index on `xid`), and of the transactions they belong to, those
//! whose last id is in the range — in full (rows of theirs before it too, found through the
//! index on `xid`), in the read's order. A transaction ends in exactly one page, so the pages
//! add up to the read, in its order; each costs about its range of the journal (rows of other
//! channels and reads included), however long the backlog (a transaction larger than a page
//! is looked up once, and read when its page comes).
//!
//! Two things only a read in pages can do, both from a role that may write the journal
//! directly (the application's roles may; a role without privileges may not): a row it
//! inserts with the `xid` of a transaction the read already delivered, after the read began,
//! makes that transaction come again (the pages see the table as it is now, in the read's
//! snapshot of transactions); and on a listener without a named consumer (nothing protects
//! its rows), a purge between pages may delete the rest of a transaction the first statement
//! delivered in part, which then never gets its last row marked.
//!
//! What a named consumer saves (a [`Position`]) is the snapshot of its last complete read, with
//! its `xmin` as the horizon (the purge and the backlog use it), and, while a read is in
//! progress, that read's snapshot and the last id its delivered transactions end at
//! ([`Reading`]): restarting from it replays exactly what was not delivered. Older versions
//! of sqlnotify saved the horizon alone, with the ids they had delivered at or after it (`seen`); a cursor
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

use std::collections::HashMap;
use std::time::SystemTime;

use futures_util::TryStreamExt;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, RowStream};

use super::ddl::SCHEMA;
use crate::error::{Error, Result};
use crate::event::RawNotification;
use crate::listener::Outlet;
use crate::read_point::{later_snapshot, ReadPoint, ReadSnapshots};
use crate::sql::quote_ident;
use crate::tier::STATEMENT_CHUNK_ROWS;

/// Events handed to the decoder per batch (at least; a batch ends with the row that reaches
/// it). A batch holds under `BATCH + STATEMENT_CHUNK_ROWS` units of budget, which must fit in
/// the smallest budget, or the listener would wait for room that can never be made.
const BATCH: usize = 512;
const _: () = assert!(BATCH + STATEMENT_CHUNK_ROWS <= crate::pipeline::MIN_IN_FLIGHT);

/// Most delivered ids a saved position carries; beyond that it saves the snapshot alone.
pub(crate) const MAX_SAVED_SEEN: usize = 1_000;

/// Rows a read's first statement returns at most: a read that fits is one statement (unless
/// it is cut short, see [`PAGE_TIME`]).
const FIRST_PAGE: i64 = 64 * 1_024;

/// Journal ids a page of a read spans, at least: the size while the subscribers are slow,
/// so that a position is saved every so many rows.
const PAGE: i64 = 1_000;

/// Journal ids a page spans at most. Each statement has a fixed cost, so while the pipeline
/// takes rows as fast as they come the pages grow (doubling while one takes less than
/// [`PAGE_TIME`] / 2), up to this. Measured (the e2e bench's backlog of 50,000 rows): pages of
/// 1,000 alone drained it at an eighth of the rate of one statement.
const PAGE_MAX: i64 = 64 * 1_024;

/// How long a statement of a read may wait for room in the pipeline: past it, the statement
/// ends after the next whole transaction, so that the position is noted and saved about as
/// often as it may be (`SAVE_EVERY` in `src/listener/saving.rs`) while the subscribers are
/// slow; the next page is then [`PAGE`] ids. While they keep up, it hardly waits. Pages grow
/// while one takes less than half of it.
const PAGE_TIME: std::time::Duration = std::time::Duration::from_millis(100);

/// A read that has not completed: its snapshot, and how far it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reading {
    /// The read's snapshot: the rest of the read returns what it saw, and nothing else.
    pub during: String,
    /// Every transaction of the read whose last journal id is at most this one has been
    /// delivered (`None`: none is known to be, and the next page starts from the read's first
    /// row).
    pub through: Option<i64>,
}

/// What a named consumer saves: the snapshot of its last complete read, that snapshot's
/// `xmin` (its horizon: every older transaction was delivered), the read in progress, and ids
/// delivered that neither shows — those of a transaction delivered in part, or of an older
/// version's position not read past yet (`None` when there were more than [`MAX_SAVED_SEEN`]:
/// a restart delivers them again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub horizon: u64,
    /// `None`: saved by a version of sqlnotify that kept no snapshot (see
    /// [`JournalCursor::resume`]).
    pub snapshot: Option<String>,
    pub seen: Option<Vec<i64>>,
    /// The read in progress, if any (saved only with the snapshot it started from).
    pub reading: Option<Reading>,
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
    /// Ids delivered of transactions the read in progress has not delivered in full (or,
    /// resuming from a position of an older version, at or after its horizon), with the last
    /// id of their transaction (`i64::MAX` when not known): those rows come again, and these
    /// are skipped. Empty after every complete read.
    seen: HashMap<i64, i64>,
    /// The read in progress — more pages to read, or a statement that failed part way (its
    /// connection lost). The next read goes on with it, in its snapshot, before reading on, so
    /// the events of one read always name the same snapshots (`src/read_point.rs`).
    reading: Option<Reading>,
    /// Transactions of the read in progress that a page found ending after it, with their
    /// last journal id: the pages do not look them up again until they reach it.
    ends_later: HashMap<u64, i64>,
    /// The last read left more to read: the next wait ends at once (once).
    more: bool,
    /// Ids the next page spans (see [`PAGE_MAX`]); 0: [`PAGE`].
    page: i64,
    /// No consumer keeps this cursor's rows (a listener without one): every statement of a
    /// read also asks whether the purge deleted rows of a transaction `before` did not see
    /// (`replay::trimmed_past`) — in the statement's own snapshot, so a purge that took rows
    /// the statement then lacks is seen too.
    unkept: bool,
    /// A statement of a read found such rows purged (until [`take_purged`]).
    ///
    /// [`take_purged`]: Self::take_purged
    purged: bool,
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
    ///
    /// The read in progress is taken up only with the snapshot it was saved with: a version
    /// of sqlnotify that keeps no read in progress may have saved a later snapshot over it
    /// and left it behind. (One it left behind that is still later than the snapshot is
    /// right: what it says was delivered was.)
    pub fn resume(position: Position) -> Self {
        let own = position
            .snapshot
            .filter(|s| snapshot_xmin(s).ok() == Some(position.horizon));
        let reading = match (&own, position.reading) {
            (Some(snapshot), Some(reading))
                if reading.during != *snapshot
                    && later_snapshot(snapshot, &reading.during) == reading.during =>
            {
                Some(reading)
            }
            _ => None,
        };
        JournalCursor {
            snapshot: Some(own.unwrap_or_else(|| below(position.horizon))),
            seen: position
                .seen
                .unwrap_or_default()
                .into_iter()
                .map(|id| (id, i64::MAX))
                .collect(),
            reading,
            ..JournalCursor::default()
        }
    }

    /// Whether a read is in progress.
    #[cfg(test)]
    fn reading(&self) -> bool {
        self.reading.is_some()
    }

    /// Whether the last read left more to read, so that the next one must come at once; says
    /// so once. (Not while a read is merely in progress: a read cut short by a lost connection
    /// is taken up by the next session, and a consumer whose subscriptions have not come yet
    /// does not read at all — asking at once then would spin.)
    pub fn take_more(&mut self) -> bool {
        std::mem::take(&mut self.more)
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

    /// Marks a cursor whose rows no consumer keeps (see `unkept`).
    pub fn unkept(&mut self) {
        self.unkept = true;
    }

    /// Whether a read found rows it had not read purged since the last call (a listener
    /// without a consumer that fell behind the retention, or a transaction that ran longer
    /// than it).
    pub fn take_purged(&mut self) -> bool {
        std::mem::take(&mut self.purged)
    }

    /// The position to save once everything read so far has left the pipeline.
    pub fn position(&self) -> Option<Position> {
        let snapshot = self.snapshot.clone()?;
        let seen = (self.seen.len() <= MAX_SAVED_SEEN).then(|| {
            let mut ids: Vec<i64> = self.seen.keys().copied().collect();
            ids.sort_unstable();
            ids
        });
        Some(Position {
            horizon: snapshot_xmin(&snapshot).ok()?,
            snapshot: Some(snapshot),
            seen,
            reading: self.reading.clone(),
        })
    }

    /// Reads on: the first statement of a new read, or the next page of the read in
    /// progress (see the module documentation), and hands the rows not delivered yet to
    /// `outlet`. Returns how many events went, or `None` when told to stop while waiting for
    /// room in the pipeline. More remains to read when [`take_more`](Self::take_more) says so.
    pub async fn read(
        &mut self,
        client: &Client,
        channels: &[String],
        outlet: &Outlet,
    ) -> Result<Option<u64>> {
        // (A cursor never placed — the listener places before reading — has delivered nothing.)
        let before = self.snapshot.clone().unwrap_or_else(|| below(1));
        let s = quote_ident(SCHEMA);
        // The transactions `before` did not see — at or after its `xmax`, or running then
        // (the index on xid answers both arms of the OR) — that the read's snapshot sees; the
        // last condition also keeps out a row whose xid column says something else than its
        // writer (an application role may insert into the journal).
        let unread = |j: &str, during: &str| {
            format!(
                "({j}.xid >= pg_catalog.pg_snapshot_xmax($1::text::pg_snapshot)
                  OR {j}.xid = ANY(ARRAY(SELECT pg_catalog.pg_snapshot_xip($1::text::pg_snapshot))))
                 AND {j}.channel = ANY($2)
                 AND pg_catalog.pg_visible_in_snapshot({j}.xid, {during})"
            )
        };
        // query_typed: one round trip, unnamed statement — works through PgBouncer in
        // transaction mode, where a named prepared statement may live on another server.
        let reading = self.reading.clone();
        let page = self.page.clamp(PAGE, PAGE_MAX);
        let started = std::time::Instant::now();
        // Column 8 of every statement: whether the purge deleted rows of a transaction
        // `before` did not see, which this read may lack (asked for a cursor no consumer keeps
        // only: a consumer's rows are kept for it). Across the pages of a read it may also be
        // rows the read delivered already: such a read is behind the retention anyway.
        let purged = if self.unkept {
            format!(
                "CASE WHEN {} THEN 1::int8 END",
                super::replay::trimmed_past(&s, "$1::text::pg_snapshot")
            )
        } else {
            "NULL::int8".to_string()
        };
        let rows = match &reading {
            None => {
                let sql = format!(
                    "SELECT s.snapshot::text, j.id, j.xid::text, j.channel, j.payload, j.events, j.tx_last,
                            NULL::int8, {purged}
                       FROM (SELECT pg_catalog.pg_current_snapshot() AS snapshot) s
                       LEFT JOIN LATERAL (
                            SELECT id, xid, channel, payload, events,
                                   pg_catalog.max(id) OVER (PARTITION BY xid) AS tx_last
                              FROM {s}.journal j
                             WHERE {}
                             ORDER BY tx_last, id LIMIT $3) j ON true",
                    unread("j", "s.snapshot")
                );
                let params: [(&(dyn ToSql + Sync), Type); 3] = [
                    (&before, Type::TEXT),
                    (&channels, Type::TEXT_ARRAY),
                    (&FIRST_PAGE, Type::INT8),
                ];
                client.query_typed_raw(&sql, params).await
            }
            Some(reading) => {
                // Where the read's rows start, when no page says yet (after a restart, or a
                // first statement cut before its first whole transaction): through the index
                // on `xid` (`k.id + 0` keeps `min` from walking the primary key from the
                // journal's first row, read long ago).
                let through = match reading.through {
                    Some(through) => through,
                    None => {
                        let sql = format!(
                            "SELECT pg_catalog.min(k.id + 0), {purged} FROM {s}.journal k WHERE {}",
                            unread("k", "$3::text::pg_snapshot")
                        );
                        let params: [(&(dyn ToSql + Sync), Type); 3] = [
                            (&before, Type::TEXT),
                            (&channels, Type::TEXT_ARRAY),
                            (&reading.during, Type::TEXT),
                        ];
                        let row = client
                            .query_typed(&sql, &params)
                            .await
                            .map_err(|e| Error::db("reading the journal", e))?;
                        self.purged |= row
                            .first()
                            .is_some_and(|r| r.get::<_, Option<i64>>(1).is_some());
                        let Some(first) = row.first().and_then(|r| r.get::<_, Option<i64>>(0))
                        else {
                            // Nothing of the read is left (a purge took it).
                            self.complete(reading.during.clone());
                            return Ok(Some(0));
                        };
                        first.saturating_sub(1)
                    }
                };
                // The page's rows are those of `m` — the read's rows with ids in
                // [`first`, `bound`], `first` being its next row after `through` (found by
                // walking the primary key: no empty range is walked, however far apart the
                // ids) and `bound` `first` + `page` - 1 — whose transaction ends in it (at or
                // before `bound`): those that end later come in a later page, in full. No next
                // row: the read is done (`bound` is NULL). The last id of each transaction in
                // `m` is looked up once (`l`); those that end past the page are returned
                // (`later`, on the first row) and passed back while the pages reach them
                // (`$6`, `$7`), so a transaction larger than a page is not looked up again on
                // every page. A page is a range of the primary key, so whatever plan the
                // statistics lead to reads that range only (a page of "the next so many rows
                // in id order" became, on a journal not analyzed yet, a bitmap scan of every
                // row after `through` and a sort, page after page). The look-ups go by the
                // index on `xid` (an array, and a LATERAL join, not `IN`, which the planner
                // made a merge join over the whole index).
                let sql = format!(
                    "WITH {}
                     SELECT $3::text, r.id, r.xid::text, r.channel, r.payload, r.events, r.last,
                            b.bound, {purged},
                            CASE WHEN pg_catalog.row_number() OVER () = 1 THEN later.xids END,
                            CASE WHEN pg_catalog.row_number() OVER () = 1 THEN later.lasts END
                       FROM b CROSS JOIN later LEFT JOIN LATERAL (
                            SELECT j.id, j.xid, j.channel, j.payload, j.events, e.last
                              FROM e CROSS JOIN LATERAL (
                                   SELECT * FROM {s}.journal j
                                    WHERE j.xid = e.xid AND j.channel = ANY($2)) j
                             ORDER BY e.last, j.id) r ON true",
                    window_ctes(
                        "NOT pg_catalog.pg_visible_in_snapshot(j.xid, $1::text::pg_snapshot)
                         AND j.channel = ANY($2)
                         AND pg_catalog.pg_visible_in_snapshot(j.xid, $3::text::pg_snapshot)",
                        Window {
                            after: "$4",
                            ids: "$5",
                            all: "$2",
                            known: ("$6", "$7"),
                        }
                    ),
                );
                let (xids, lasts): (Vec<String>, Vec<i64>) = self
                    .ends_later
                    .iter()
                    .map(|(xid, last)| (xid.to_string(), *last))
                    .unzip();
                let params: [(&(dyn ToSql + Sync), Type); 7] = [
                    (&before, Type::TEXT),
                    (&channels, Type::TEXT_ARRAY),
                    (&reading.during, Type::TEXT),
                    (&through, Type::INT8),
                    (&page, Type::INT8),
                    (&xids, Type::TEXT_ARRAY),
                    (&lasts, Type::INT8_ARRAY),
                ];
                client.query_typed_raw(&sql, params).await
            }
        }
        .map_err(|e| Error::db("reading the journal", e))?;
        let Some(read) = self.deliver(rows, &before, outlet).await? else {
            return Ok(None);
        };
        // Every transaction delivered in full ends at or before `through`.
        let (through, done) = match reading {
            _ if read.cut => (read.last_whole, false),
            None => (read.last_whole, read.rows < FIRST_PAGE),
            Some(_) => (read.bound, read.bound.is_none()),
        };
        self.more = !done;
        // The next page: small while the subscribers take their time (the last statement was
        // cut), growing while they keep up.
        self.page = match reading {
            _ if read.cut => PAGE,
            None => PAGE_MAX,
            Some(_) if started.elapsed() < PAGE_TIME / 2 => (page * 2).min(PAGE_MAX),
            Some(_) => page,
        };
        if done {
            self.complete(read.during);
        } else {
            if let Some(through) = through {
                self.seen.retain(|_, last| *last > through);
                self.ends_later.retain(|_, last| *last > through);
            }
            let through = through.or(self.reading.as_ref().and_then(|r| r.through));
            self.reading = Some(Reading {
                during: read.during,
                through,
            });
        }
        Ok(Some(read.delivered))
    }

    /// The read of snapshot `during` is complete: everything it sees is delivered, and the
    /// next read asks for none of it.
    fn complete(&mut self, during: String) {
        self.seen.clear();
        self.ends_later.clear();
        self.snapshot = Some(during);
        self.reading = None;
    }

    /// Hands the rows of one statement of a read to `outlet` (those not delivered yet), in
    /// batches; `None` when told to stop while waiting for room in the pipeline.
    async fn deliver(
        &mut self,
        rows: RowStream,
        before: &str,
        outlet: &Outlet,
    ) -> Result<Option<Statement>> {
        let mut rows = Box::pin(rows);
        // A row counts as seen only once it has been handed to the decoder: if this read is
        // abandoned (lost connection), rows collected but not handed over are read again.
        let (mut batch, mut ids, mut units) = (Vec::new(), Vec::new(), 0);
        let mut out = Statement::default();
        let mut read = None;
        // Time spent waiting for room in the pipeline.
        let mut waited = std::time::Duration::ZERO;
        while let Some(row) = rows
            .try_next()
            .await
            .map_err(|e| Error::db("reading the journal", e))?
        {
            let read = read.get_or_insert_with(|| {
                let during: String = row.get(0);
                out.bound = row.get(7);
                self.purged |= row.get::<_, Option<i64>>(8).is_some();
                // Until it completes, the read is in progress: if this statement is cut
                // short, the next read goes on with the same snapshot.
                if self.reading.is_none() {
                    self.reading = Some(Reading {
                        during: during.clone(),
                        through: None,
                    });
                }
                ReadSnapshots::new(before.to_string(), during)
            });
            if row.len() > 10 {
                // A page's transactions that end past it: on its first row only.
                let xids = row.get::<_, Option<Vec<String>>>(9).unwrap_or_default();
                let lasts = row.get::<_, Option<Vec<i64>>>(10).unwrap_or_default();
                for (xid, last) in xids.iter().zip(lasts) {
                    if let Ok(xid) = xid.parse() {
                        self.ends_later.insert(xid, last);
                    }
                }
            }
            let Some(id) = row.get::<_, Option<i64>>(1) else {
                continue;
            };
            out.rows += 1;
            let group: i64 = row.get(6);
            let ends = id == group;
            if ends {
                out.last_whole = Some(group);
            }
            if !self.seen.contains_key(&id) {
                let notification = notification(&row, id, group, read)?;
                units += notification.events as usize;
                batch.push(notification);
                ids.push((id, group));
                if units >= BATCH {
                    let forwarding = std::time::Instant::now();
                    let Some(n) = outlet.forward(std::mem::take(&mut batch)).await else {
                        return Ok(None);
                    };
                    waited += forwarding.elapsed();
                    out.delivered += n;
                    self.seen.extend(ids.drain(..));
                    units = 0;
                }
            }
            if ends && waited >= PAGE_TIME {
                // The subscribers take their time (this statement waited that long for room
                // in the pipeline): end here, between transactions, so that the position is
                // noted and saved; the rest comes with the next read. (The rows this
                // statement still sends are dropped as they come.)
                out.cut = true;
                break;
            }
        }
        // Done with the statement (or cutting it short: the connection drops what it still
        // sends) before waiting for room for the last batch.
        drop(rows);
        let Some(n) = outlet.forward(std::mem::take(&mut batch)).await else {
            return Ok(None);
        };
        out.delivered += n;
        self.seen.extend(ids.drain(..));
        let read = read.ok_or_else(|| Error::InvalidPayload {
            channel: "journal".into(),
            reason: "the journal read returned no snapshot".into(),
        })?;
        out.during = read.during.clone();
        Ok(Some(out))
    }
}

/// The parameters (`$n`) of a window statement ([`window_ctes`]).
pub(crate) struct Window<'a> {
    /// The window starts at the first row after this id.
    pub after: &'a str,
    /// How many ids it spans at most.
    pub ids: &'a str,
    /// The channels whose rows decide where a transaction ends (`text[]`).
    pub all: &'a str,
    /// The transactions known to end later: their ids (`text[]`) and last ids (`int8[]`).
    pub known: (&'a str, &'a str),
}

/// The common table expressions of a window of journal ids, shared by the listener's catch-up
/// pages and the SSE endpoint's replay (`replay.rs`): the rows `rows` selects (a condition on
/// `j`) with ids in [`first`, `bound`] — `first` their first one after `after` (found by
/// walking the primary key, so no empty range of ids is walked, however far apart they are),
/// `bound` `first` + `ids` - 1 (`b`; NULL when there is no such row) — and, in `e`, the
/// transactions that end in the window (at or before `bound`), with their last ids. The last
/// id of each transaction in the window is looked up once, through the index on `xid` (`l`:
/// an array and `= ANY`, not `IN`, which the planner made a merge join over the whole index);
/// those that end past the window are returned (`later`) to be passed back as `known` while
/// the windows reach them, so a transaction larger than a window is not looked up again on
/// every window. A window is a range of the primary key, so whatever plan the statistics lead
/// to reads that range only.
pub(crate) fn window_ctes(rows: &str, w: Window<'_>) -> String {
    let s = quote_ident(SCHEMA);
    let Window {
        after,
        ids,
        all,
        known: (xids, lasts),
    } = w;
    format!(
        "f AS (
              SELECT j.id AS first FROM {s}.journal j
               WHERE j.id > {after} AND {rows}
               ORDER BY j.id LIMIT 1),
         b AS (SELECT (SELECT f.first + LEAST({ids} - 1, 9223372036854775807 - f.first)
                         FROM f) AS bound),
         m AS (
              SELECT j.id, j.xid FROM {s}.journal j
               WHERE j.id > {after} AND j.id <= (SELECT bound FROM b) AND {rows}),
         known AS (SELECT k.xid, k.last
                     FROM ROWS FROM (pg_catalog.unnest({xids}::text[]::xid8[]),
                                    pg_catalog.unnest({lasts}::int8[])) AS k(xid, last)),
         l AS (SELECT j.xid, pg_catalog.max(j.id) AS last FROM {s}.journal j
                WHERE j.xid = ANY(ARRAY(SELECT DISTINCT m.xid FROM m
                                         WHERE m.xid NOT IN (SELECT xid FROM known)))
                  AND j.channel = ANY({all})
                GROUP BY j.xid),
         later AS (SELECT pg_catalog.array_agg(l.xid::text) AS xids,
                          pg_catalog.array_agg(l.last) AS lasts
                     FROM l, b WHERE l.last > b.bound),
         e AS (SELECT t.xid, t.last FROM (SELECT * FROM l UNION ALL SELECT * FROM known) t, b
                WHERE t.last <= b.bound AND t.last > {after})"
    )
}

/// The event of journal row `row` (id `id`, its transaction's last id `group`) of read `read`.
fn notification(
    row: &tokio_postgres::Row,
    id: i64,
    group: i64,
    read: &std::sync::Arc<ReadSnapshots>,
) -> Result<RawNotification> {
    let xid = parse_xid(&row.get::<_, String>(2))?;
    let (channel, payload, events) = content(row);
    Ok(RawNotification {
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
        read_bytes: 0,
        extra_units: 0,
    })
}

/// What one statement of a read returned.
#[derive(Debug, Default)]
struct Statement {
    /// The read's snapshot.
    during: String,
    /// Events handed to the pipeline.
    delivered: u64,
    /// Rows returned (delivered or skipped as delivered before).
    rows: i64,
    /// The last id of the last transaction returned in full (rows come by transaction).
    last_whole: Option<i64>,
    /// The last id of a page's range.
    bound: Option<i64>,
    /// Ended early, after a whole transaction (see [`PAGE_TIME`]).
    cut: bool,
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
            reading: None,
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
    fn a_read_in_progress_is_taken_up_only_with_the_snapshot_it_started_from() {
        let reading = |during: &str| {
            Some(Reading {
                during: during.to_string(),
                through: Some(40),
            })
        };
        let saved = |snapshot: &str, during: &str| Position {
            reading: reading(during),
            ..position(5, Some(snapshot), &[41])
        };
        // Saved with its snapshot: taken up, and saved again as it was.
        let cursor = JournalCursor::resume(saved("5:9:5,7", "5:12:"));
        assert!(cursor.reading());
        assert_eq!(cursor.position(), Some(saved("5:9:5,7", "5:12:")));
        // A later snapshot saved over it by a version that keeps no read in progress: that
        // snapshot is where the consumer is.
        let cursor = JournalCursor::resume(saved("5:14:", "5:12:"));
        assert!(!cursor.reading());
        assert_eq!(cursor.position().unwrap().reading, None);
        // A snapshot that older versions left behind gives way to the horizon, and the read
        // in progress with it.
        let cursor = JournalCursor::resume(Position {
            horizon: 8,
            ..saved("5:9:5,7", "5:12:")
        });
        assert!(!cursor.reading());
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
