//! The MySQL journal: rows appended by the triggers, read by cursor without skipping late
//! commits (trimmed by retention, and consumers' watermarks kept, in `consumers.rs`).
//!
//! # The problem
//!
//! A journal row's id comes from `AUTO_INCREMENT` when the row is *inserted*, not when its
//! transaction commits. Transaction A may take id 10 and B id 11; B commits, a reader sees 11
//! — and if it only remembered "everything up to 11 is read", it would never read 10 when A
//! commits a moment later. Ids are also burned for good: a rolled-back insert leaves a hole
//! that never fills.
//!
//! # The method: a low watermark, the highest id read, and the gaps between
//!
//! The [`Cursor`] keeps
//!
//! * `low`, the low watermark: every id up to it was delivered, or belonged to another
//!   notifier's channels, or was given up on;
//! * `high`, the highest id read;
//! * the *gaps*: the ids between `low` and `high` not read yet — a transaction still running,
//!   or an id that will never commit — as ranges (every other id there was read), so the
//!   cursor's size is the number of gaps, however many rows are read above one;
//! * when each gap was first noticed (the time `high` first passed it).
//!
//! Each poll reads, in id order, the rows in the gaps plus every row above `high`
//! (`WHERE id > pos AND (id BETWEEN gap.start AND gap.end OR … OR id > high)`, paginated by
//! `pos`), delivers those it has not read, and takes them out of the gaps. A late commit fills
//! its gap and is delivered then, however low its id. Then gaps that have been open longer
//! than the *gap timeout* (default 10 s) and hold no row are given up — rolled-back (burned)
//! ids — also above a gap that is still open, and `low` moves up to the lowest gap left.
//!
//! Whether an expired gap holds a row is read uncommitted ([`occupied`]): a transaction still
//! running has its journal row in the table, uncommitted, and a rolled-back insert leaves
//! nothing. A gap that holds one is [held](Cursor::hold) — checked again a gap timeout later —
//! so a long transaction, or one whose insert waited on locks, holds `low` back until it commits
//! (its events are delivered then) or rolls back (its ids are given up then). The gap timeout
//! only says how soon a burned id stops holding the watermark, and how often a held one is
//! checked. The check reads the expired gaps' ids, takes no lock and runs only when a gap has
//! expired.
//!
//! A named consumer saves `low`: restarting from it re-reads (and delivers again) the rows
//! above it that were already delivered — at least once, never skipped.
//!
//! # Transactions (MariaDB)
//!
//! A journal made transaction-precise system-versioned (`mysql_transaction_ids`) carries each
//! row's InnoDB transaction id in [`JOURNAL_TX`], stamped by the server. The listener then
//! reads in one consistent snapshot per poll (each transaction seen whole or not at all), up
//! to its batch plus the rest of the transactions it has begun and every row up to where
//! they end (a transaction wholly among those rows ends first), and [`in_transactions`] puts
//! them in delivery order with their last rows marked. Those reads take each row's metadata
//! ([`RowMeta`]: the payload's size, and the payload only when it is small and fits the read's
//! budget for those); the other payloads are fetched by id for one share at a time
//! ([`share_len`], [`fetch_payloads`]), so a read's memory is bounded in bytes however large
//! the rows or the transaction. The purge removes the history the
//! versioning keeps and empties MariaDB's transaction registry ([`trim_history`]).
//!
//! The cost: each open gap is one range in the read; beyond 64 open gaps the rest are read as
//! one range up to `high` (rows already read in it are skipped), so a workload that
//! rolls back inserts on watched tables many times per gap timeout makes polls heavier. A
//! read with transactions goes through the gaps in windows of 64 instead
//! ([`Cursor::unread_window`]), so it takes only rows it has not read: its page of 10,000 rows
//! never fills with rows read already.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::Conn;

use super::catalog::db_err;
use super::ddl::{qualified, JOURNAL, JOURNAL_TX, TRANSACTION_REGISTRY};
use crate::error::{Error, Result};
use crate::read_set::{take_from_gap, ReadSet};

/// Most gap ranges spelled out in one read; the rest are read as one range (and deduped).
const MAX_RANGES: usize = 64;

/// Most open gaps a saved position carries (beyond that it saves the watermark alone).
pub(crate) const MAX_SAVED_GAPS: usize = 1_000;

/// Where a named consumer stands: every id up to `low` is settled (read, or given up as
/// rolled back); with `above`, every id up to `above.high` was read too except the open
/// `above.gaps` — so a process that takes over reads again only what was read after the last
/// save, not everything above a gap that may still fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub low: i64,
    pub above: Option<Above>,
}

/// What was read above a position's watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Above {
    /// The highest id read.
    pub high: i64,
    /// The ids not read yet below `high`, as inclusive ranges, lowest first.
    pub gaps: Vec<(i64, i64)>,
}

impl Above {
    /// As stored: `{"high": 18, "gaps": [[13, 13], [16, 17]]}`.
    pub fn to_json(&self) -> String {
        serde_json::json!({ "high": self.high, "gaps": self.gaps }).to_string()
    }

    /// Reads what [`to_json`](Self::to_json) wrote; `None` for anything else (then the rows
    /// above the watermark are read again — never skipped): also for more than
    /// [`MAX_SAVED_GAPS`] gaps, which a save never writes (a cursor with more saves its
    /// watermark alone), so a value someone filled with gaps costs a resuming cursor nothing.
    pub fn from_json(text: &str) -> Option<Above> {
        let value: serde_json::Value = serde_json::from_str(text).ok()?;
        let high = value.get("high")?.as_i64()?;
        let gaps = value.get("gaps")?.as_array()?;
        if gaps.len() > MAX_SAVED_GAPS {
            return None;
        }
        let gaps = gaps
            .iter()
            .map(|g| Some((g.get(0)?.as_i64()?, g.get(1)?.as_i64()?)))
            .collect::<Option<Vec<_>>>()?;
        // Never adjacent either (a read id lies between two gaps), as the cursor keeps them:
        // its `read_set` relies on it.
        let ordered = gaps.iter().all(|(a, b)| a <= b && *b < high)
            && gaps.windows(2).all(|w| w[0].1 + 1 < w[1].0);
        ordered.then_some(Above { high, gaps })
    }
}

/// Where a listener is in the journal (see the module documentation).
#[derive(Debug, Clone)]
pub(crate) struct Cursor {
    low: i64,
    high: i64,
    /// The gaps: the ids in `(low, high]` not read yet, as inclusive ranges, ascending,
    /// disjoint and never adjacent (a read id lies between two). Every other id there was
    /// read. Kept as ranges, not as the ids read, so that its size is the number of gaps
    /// however many rows are read above one that is held open.
    unread: Vec<(i64, i64)>,
    /// `(upto, when)`: gaps at ids up to `upto` (above the previous entry's) were first
    /// noticed at `when`. In increasing `upto`; an entry is added only for a read that leaves
    /// a gap above the highest id read before it, and dropped once no gap is left at its ids
    /// (so its size follows the gaps', not the reads', while a gap below holds the watermark).
    noticed: VecDeque<(i64, Instant)>,
    gap_timeout: Duration,
}

impl Cursor {
    /// A cursor for which every id up to `low` is settled.
    pub fn new(low: i64, gap_timeout: Duration) -> Self {
        Cursor {
            low,
            high: low,
            unread: Vec::new(),
            noticed: VecDeque::new(),
            gap_timeout,
        }
    }

    /// A cursor resuming a saved position: every id up to `position.low` is settled, and what
    /// it says was read above that counts as read.
    pub fn resume(position: &Position, gap_timeout: Duration, now: Instant) -> Self {
        let mut cursor = Cursor::new(position.low, gap_timeout);
        if let Some(above) = &position.above {
            // Checked: a position of a journal of another server (or altered) may span more
            // than an i64 holds.
            if above.high > position.low && above.high.checked_sub(position.low).is_some() {
                cursor.high = above.high;
                // `Above::from_json` checked the gaps: ascending, disjoint, below `high`.
                cursor.unread = above
                    .gaps
                    .iter()
                    .map(|&(start, end)| (start.max(position.low + 1), end))
                    .filter(|&(start, end)| start <= end)
                    .collect();
                cursor.noticed.push_back((above.high, now));
            }
        }
        cursor
    }

    /// What a named consumer saves: the watermark, and what was read above it (`None` with
    /// more than [`MAX_SAVED_GAPS`] open gaps: a restart reads those rows again).
    pub fn position(&self) -> Position {
        Position {
            low: self.low,
            above: (self.high > self.low && self.unread.len() <= MAX_SAVED_GAPS).then(|| Above {
                high: self.high,
                gaps: self.gaps(),
            }),
        }
    }

    /// The ids read, as a [`ReadSet`] (what an SSE client that had every event so far has).
    pub fn read_set(&self) -> ReadSet {
        ReadSet::from_parts(self.low, self.high, self.gaps())
            .expect("a cursor's gaps lie between its watermark and its highest id")
    }

    /// The low watermark.
    pub fn low(&self) -> i64 {
        self.low
    }

    /// The highest id read.
    pub fn high(&self) -> i64 {
        self.high
    }

    /// The index in `unread` of the gap holding `id`, if one does.
    fn gap_of(&self, id: i64) -> Option<usize> {
        let i = self.unread.partition_point(|&(start, _)| start <= id);
        (i > 0 && id <= self.unread[i - 1].1).then(|| i - 1)
    }

    /// Whether the row `id` has not been read yet.
    pub fn is_new(&self, id: i64) -> bool {
        id > self.high || (id > self.low && self.gap_of(id).is_some())
    }

    /// The open gaps, as inclusive id ranges, lowest first.
    pub fn gaps(&self) -> Vec<(i64, i64)> {
        self.unread.clone()
    }

    /// A SQL condition on `id` matching every row not read yet: the gaps and everything above
    /// `high`. Integers only, so it is safe to splice into SQL.
    pub fn unread_condition(&self) -> String {
        unread_sql(&self.unread, self.high)
    }

    /// A SQL condition on `id` matching the rows not read yet above `pos`, as far as it goes:
    /// the gaps that end above `pos`, at most [`MAX_RANGES`] of them spelled out, and the ids
    /// above `high`. With more gaps than that it matches none of the ids read between them —
    /// unlike [`unread_condition`](Self::unread_condition), whose merged range matches every
    /// row read above its 64th gap — and goes no further than the end of its last gap, which
    /// it returns: once a read with `id > pos` comes short there, the next window starts at
    /// that bound. So a read in windows takes only rows not read yet, however many rows were
    /// read above a gap held open. Integers only, so it is safe to splice into SQL.
    pub fn unread_window(&self, pos: i64) -> (String, Option<i64>) {
        let from = self.unread.partition_point(|&(_, end)| end <= pos);
        let gaps = &self.unread[from..];
        if gaps.len() > MAX_RANGES {
            let spelled = &gaps[..MAX_RANGES];
            (
                ranges_sql(spelled).join(" OR "),
                Some(spelled[MAX_RANGES - 1].1),
            )
        } else {
            (unread_sql(gaps, self.high), None)
        }
    }

    /// Gaps at ids up to `upto` were (or could have been) first noticed at `when`: a cursor
    /// resuming a saved position ages the gaps it finds by the journal's own times, so a
    /// rolled-back id that a previous process had already waited for is not waited for again
    /// from the start. Entries must come in increasing `upto`, before any read.
    pub fn noticed(&mut self, upto: i64, when: Instant) {
        if upto > self.low && self.noticed.back().is_none_or(|&(last, _)| upto > last) {
            self.noticed.push_back((upto, when));
        }
    }

    /// Records rows as read at `now`.
    pub fn mark(&mut self, ids: impl IntoIterator<Item = i64>, now: Instant) {
        let before = self.high;
        let mut filled = false;
        for id in ids {
            if id > self.high {
                // `high` is read, so a new gap is never adjacent to the one before it.
                if id > self.high + 1 {
                    self.unread.push((self.high + 1, id - 1));
                }
                self.high = id;
            } else if let Some(i) = self.gap_of(id).filter(|_| id > self.low) {
                take_from_gap(&mut self.unread, i, id);
                filled = true;
            }
        }
        if self.unread.last().is_some_and(|&(_, end)| end > before) {
            self.noticed.push_back((self.high, now));
        }
        if filled {
            self.forget_filled();
        }
    }

    /// Drops the `noticed` entries at whose ids no gap is left: every id of theirs was read.
    /// Nothing else changes — each id still unread keeps the time it had (its entry stays;
    /// the next entry only reaches down over ids that are all read) — and gaps never open
    /// again below `high`, so such an entry would never be needed. Without this, a gap held
    /// open for hours would keep one entry for every short gap opened and filled above it.
    fn forget_filled(&mut self) {
        let mut gaps = self.unread.iter().peekable();
        let mut previous = i64::MIN;
        self.noticed.retain(|&(upto, _)| {
            // The entry's ids: `previous + 1 ..= upto`.
            while gaps.next_if(|&&(_, end)| end <= previous).is_some() {}
            let keep = gaps.peek().is_some_and(|&&(start, _)| start <= upto);
            previous = upto;
            keep
        });
    }

    /// Gives up every expired gap — without checking it for rows: see [`due`](Self::due) —
    /// and moves the low watermark over read ids. Returns whether it moved.
    pub fn advance(&mut self, now: Instant) -> bool {
        let due = self.due(now, usize::MAX);
        self.give_up(&due);
        self.advance_read()
    }

    /// Moves the low watermark over the read (or given up) ids below the lowest gap. Returns
    /// whether it moved.
    pub fn advance_read(&mut self) -> bool {
        let start = self.low;
        self.low = self
            .unread
            .first()
            .map_or(self.high, |&(first, _)| first - 1);
        while self
            .noticed
            .front()
            .is_some_and(|&(upto, _)| upto <= self.low)
        {
            self.noticed.pop_front();
        }
        self.low != start
    }

    /// The part of gap `start..=end` covered by the `noticed` entry holding `start` (searched
    /// from entry `at` on): up to the end of the ids noticed with `start`, that entry's index,
    /// and whether that part has been missing for the gap timeout at `now`. `None` when no
    /// entry holds `start` (never, as `mark` and `resume` keep them).
    fn part(
        &self,
        (start, end): (i64, i64),
        at: usize,
        now: Instant,
    ) -> Option<((i64, i64), usize, bool)> {
        let at = at
            + self
                .noticed
                .range(at..)
                .take_while(|&&(upto, _)| upto < start)
                .count();
        let &(upto, when) = self.noticed.get(at)?;
        let expired = now.saturating_duration_since(when) >= self.gap_timeout;
        Some(((start, end.min(upto)), at, expired))
    }

    /// The expired gaps at `now` — ids missing for the gap timeout — lowest first, at most
    /// `limit` of them: what to check for rows still being written before giving them up
    /// ([`hold`](Self::hold) those that hold one, [`give_up`](Self::give_up) the others).
    /// Also those above a gap that is not expired (a held one, or one noticed later): a gap
    /// given up there leaves the watermark where it is, below the lowest gap, but no longer
    /// costs a range in every read — a transaction held open for long would otherwise keep
    /// every id burned above it for as long.
    pub fn due(&self, now: Instant, limit: usize) -> Vec<(i64, i64)> {
        let mut due = Vec::new();
        let mut at = 0;
        for &(start, end) in &self.unread {
            let mut next = start;
            // `end < high`, so `end + 1` never overflows.
            while next <= end {
                if due.len() >= limit {
                    return due;
                }
                let Some((range, entry, expired)) = self.part((next, end), at, now) else {
                    return due;
                };
                if expired {
                    due.push(range);
                }
                at = entry;
                next = range.1 + 1;
            }
        }
        due
    }

    /// Gives up `ranges` (some of [`due`](Self::due)'s, found to hold no row: rolled-back
    /// ids): they count as read from now on. The watermark moves only with
    /// [`advance_read`](Self::advance_read).
    pub fn give_up(&mut self, ranges: &[(i64, i64)]) {
        for &(start, end) in ranges {
            let Some(i) = self.gap_of(start) else {
                continue;
            };
            let (first, last) = self.unread[i];
            let end = end.min(last);
            log::debug!(
                "sqlnotify: journal ids {start}..={end} stayed missing for {:?} and hold no row; treating them as rolled back",
                self.gap_timeout
            );
            match (start == first, end == last) {
                (true, true) => {
                    self.unread.remove(i);
                }
                (true, false) => self.unread[i].0 = end + 1,
                (false, true) => self.unread[i].1 = start - 1,
                (false, false) => {
                    self.unread[i].1 = start - 1;
                    self.unread.insert(i + 1, (end + 1, last));
                }
            }
        }
        if !ranges.is_empty() {
            self.forget_filled();
        }
    }

    /// Gap `range` (one of [`due`](Self::due)'s) still holds a row — a transaction that has
    /// not committed yet: its ids count as noticed at `now` again, so they wait another gap
    /// timeout (and are checked again then) instead of being given up.
    pub fn hold(&mut self, (start, end): (i64, i64), now: Instant) {
        let mut noticed = VecDeque::with_capacity(self.noticed.len() + 2);
        while let Some(entry) = self.noticed.pop_front() {
            if entry.0 >= start {
                // The entry reaching into the range: its ids below the range keep its time.
                if noticed.back().is_none_or(|&(upto, _)| upto < start - 1) && start - 1 > self.low
                {
                    noticed.push_back((start - 1, entry.1));
                }
                if entry.0 > end {
                    self.noticed.push_front(entry);
                }
                break;
            }
            noticed.push_back(entry);
        }
        while self.noticed.front().is_some_and(|&(upto, _)| upto <= end) {
            self.noticed.pop_front();
        }
        noticed.push_back((end, now));
        noticed.append(&mut self.noticed);
        self.noticed = noticed;
    }
}

/// A SQL condition on `id` matching the ids in `gaps` (inclusive ranges, ascending) and above
/// `high`; beyond [`MAX_RANGES`] gaps the rest are one range up to `high` (a reader skips what
/// it has read there). Integers only, so it is safe to splice into SQL.
pub(crate) fn unread_sql(gaps: &[(i64, i64)], high: i64) -> String {
    let mut gaps = gaps.to_vec();
    if gaps.len() > MAX_RANGES {
        let start = gaps[MAX_RANGES - 1].0;
        gaps.truncate(MAX_RANGES - 1);
        gaps.push((start, high));
    }
    let mut parts = ranges_sql(&gaps);
    parts.push(format!("`id` > {high}"));
    parts.join(" OR ")
}

/// One SQL condition on `id` per range of `ranges` (inclusive).
fn ranges_sql(ranges: &[(i64, i64)]) -> Vec<String> {
    ranges
        .iter()
        .map(|(a, b)| {
            if a == b {
                format!("`id` = {a}")
            } else {
                format!("`id` BETWEEN {a} AND {b}")
            }
        })
        .collect()
}

/// Reads up to `limit` rows with `id > pos` matching `condition` (from
/// [`Cursor::unread_condition`]), in id order, as [`RowMeta`]: the payloads that fit `inline`
/// come along, the others are fetched later (see [`read_meta`]).
pub(crate) async fn read_page(
    conn: &mut Conn,
    database: &str,
    pos: i64,
    condition: &str,
    limit: usize,
    inline: &mut u64,
) -> Result<Vec<RowMeta>> {
    read_meta(conn, database, None, pos, condition, "", limit, inline).await
}

/// The rows' metadata (id, channel, payload size, and with `after` their transaction) for
/// [`read_page`] and [`read_tx_page`]. `only`: an extra condition (`AND …`). The payloads come
/// along when they are small: each of at most `inline` / `limit` bytes, so that the query's
/// payloads together fit `inline`, which is then lowered by what they take — a read passes
/// the same budget to all its queries, and holds at most that much of payloads read along
/// (small rows need no second query); the others are fetched when their share's turn comes.
#[allow(clippy::too_many_arguments)]
async fn read_meta(
    conn: &mut impl Queryable,
    database: &str,
    after: Option<i64>,
    pos: i64,
    condition: &str,
    only: &str,
    limit: usize,
    inline: &mut u64,
) -> Result<Vec<RowMeta>> {
    let tx = match after {
        Some(_) => format!(", `{JOURNAL_TX}`"),
        None => String::new(),
    };
    let inline_max = *inline / limit.max(1) as u64;
    let sql = format!(
        "SELECT `id`, `channel`, OCTET_LENGTH(`payload`), \
         IF(OCTET_LENGTH(`payload`) <= {inline_max}, `payload`, NULL){tx} FROM {} \
         WHERE `id` > {pos} AND ({condition}){only} ORDER BY `id` LIMIT {limit}",
        qualified(database, JOURNAL)
    );
    let rows: Vec<mysql_async::Row> = conn
        .query(sql)
        .await
        .map_err(db_err("reading the journal"))?;
    let rows = rows
        .into_iter()
        .map(|mut row| {
            let id = id_at(&mut row)?;
            // NULL (a payload someone made NULL), or past the row's end: nothing to hold.
            let len = row
                .take_opt::<Option<u64>, _>(2)
                .and_then(|len| len.ok().flatten())
                .unwrap_or(0);
            // As `text_at` reads it; NULL: not read along (or a NULL payload: fetched later,
            // as empty text).
            let payload = match row.take::<mysql_async::Value, _>(3) {
                Some(mysql_async::Value::Bytes(bytes)) => Some(lossy(bytes)),
                Some(mysql_async::Value::NULL) | None => None,
                Some(_) => Some(String::new()),
            };
            let tx = row
                .take_opt::<Option<u64>, _>(4)
                .and_then(|tx| tx.ok().flatten())
                .filter(|_| after.is_some_and(|after| id > after));
            Ok(RowMeta {
                id,
                channel: text_at(&mut row, 1),
                len,
                tx,
                payload,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let held: u64 = rows
        .iter()
        .filter(|row| row.payload.is_some())
        .map(|row| row.len)
        .sum();
    *inline = inline.saturating_sub(held);
    Ok(rows)
}

/// The payloads of journal rows `ids`, by id: what a read fetches for one share of the rows
/// it hands over (see [`share_len`]), so that it never holds more payload bytes than that
/// share. A row missing from the answer was deleted since its metadata was read (journal rows
/// never change otherwise); a payload that is not text (a column someone altered) is empty
/// text, as [`journal_row`] reads it.
pub(crate) async fn fetch_payloads(
    conn: &mut Conn,
    database: &str,
    ids: &[i64],
) -> Result<HashMap<i64, String>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    let sql = format!(
        "SELECT `id`, `payload` FROM {} WHERE `id` IN ({})",
        qualified(database, JOURNAL),
        list.join(", ")
    );
    let rows: Vec<mysql_async::Row> = conn
        .query(sql)
        .await
        .map_err(db_err("reading the journal's payloads"))?;
    rows.into_iter()
        .map(|mut row| Ok((id_at(&mut row)?, text_at(&mut row, 1))))
        .collect()
}

/// How many of the leading rows, whose payload sizes are `lens`, one share of a read takes:
/// at most `max_rows`, and no more payload bytes than `budget` — but always the first row,
/// however large (a row larger than the budget goes alone: it is bounded by the server's
/// `max_allowed_packet`), so that reading always moves on.
pub(crate) fn share_len(
    lens: impl IntoIterator<Item = u64>,
    budget: u64,
    max_rows: usize,
) -> usize {
    let mut held = 0u64;
    let mut taken = 0;
    for len in lens.into_iter().take(max_rows) {
        held = held.saturating_add(len);
        if taken > 0 && held > budget {
            break;
        }
        taken += 1;
    }
    taken
}

/// A journal row as `SELECT id, channel, payload[, transaction]` returns it: id, channel,
/// payload and transaction (`None` without that column, or when it is unreadable: the row is
/// then delivered outside any transaction).
///
/// Read by column, not as a tuple: mysql_async panics on a tuple it cannot convert. The
/// columns are sqlnotify's, but anyone allowed to alter the table can make them hold what the
/// journal never writes.
pub(crate) fn journal_row(mut row: mysql_async::Row) -> Result<(i64, String, String, Option<u64>)> {
    let id = id_at(&mut row)?;
    // Past the row's end (no such column), `take_opt` is `None` too.
    let tx = row
        .take_opt::<Option<u64>, _>(3)
        .and_then(|tx| tx.ok().flatten());
    Ok((id, text_at(&mut row, 1), text_at(&mut row, 2), tx))
}

/// The row's id (column 0); an error when it is none (nothing can place the row).
fn id_at(row: &mut mysql_async::Row) -> Result<i64> {
    match row.take_opt::<i64, _>(0) {
        Some(Ok(id)) => Ok(id),
        other => Err(Error::db(
            "reading the journal",
            std::io::Error::other(format!(
                "a journal row's `id` is not an integer ({:?}): was the table altered?",
                other.map(|r| r.map_err(|e| e.0))
            )),
        )),
    }
}

/// Column `index` as text; anything but text (a `NULL` in a column someone altered) as empty
/// text: an empty payload is dropped and counted as malformed by the decoder, an empty channel
/// is none of the listener's and its row is passed over.
fn text_at(row: &mut mysql_async::Row, index: usize) -> String {
    match row.take::<mysql_async::Value, _>(index) {
        Some(mysql_async::Value::Bytes(bytes)) => lossy(bytes),
        _ => String::new(),
    }
}

/// Whether the journal records transactions (see [`tracking`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tracking {
    /// No transaction column: rows are read and delivered in id order, without transactions.
    Off,
    /// Rows with ids above this one carry their transaction; those up to it were written
    /// before the journal recorded transactions (see [`JOURNAL_COMMENT`]).
    After(i64),
}

/// The journal's table comment once it records transactions: the rows it had then were
/// stamped with that change's own transaction, so they must not read as one.
pub(crate) const JOURNAL_COMMENT: &str = "sqlnotify: transactions recorded after id ";

/// The comment saying the journal's rows up to `id` predate its transactions.
pub(crate) fn journal_comment(id: i64) -> String {
    format!("{JOURNAL_COMMENT}{id}")
}

/// Where a [`journal_comment`] says transactions start; 0 for any other comment.
fn recorded_after(comment: &str) -> i64 {
    comment
        .strip_prefix(JOURNAL_COMMENT)
        .and_then(|id| id.parse().ok())
        .filter(|id: &i64| *id >= 0)
        .unwrap_or(0)
}

/// How the journal records transactions: [`Tracking::Off`] unless it has the transaction
/// column (MariaDB, `NotifierBuilder::mysql_transaction_ids`).
pub(crate) async fn tracking(conn: &mut Conn, database: &str) -> Result<Tracking> {
    if !records_transactions(conn, database).await? {
        return Ok(Tracking::Off);
    }
    let comment: Option<String> = conn
        .exec_first(
            "SELECT TABLE_COMMENT FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
            (database, JOURNAL),
        )
        .await
        .map_err(db_err("reading how the journal records transactions"))?;
    Ok(Tracking::After(recorded_after(
        &comment.unwrap_or_default(),
    )))
}

/// Whether the journal has the transaction column.
pub(crate) async fn records_transactions(conn: &mut Conn, database: &str) -> Result<bool> {
    let columns: Option<i64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? \
             AND TABLE_NAME = ? AND COLUMN_NAME = ? AND GENERATION_EXPRESSION = 'ROW START'",
            (database, JOURNAL, JOURNAL_TX),
        )
        .await
        .map_err(db_err("reading how the journal records transactions"))?;
    Ok(columns.unwrap_or(0) > 0)
}

/// After the purge deleted journal rows from a journal that records transactions: removes them
/// for good (a system-versioned table keeps deleted rows as history), then empties MariaDB's
/// transaction registry, which gains a row for every transaction that writes to the journal
/// and which the server never trims (nor lets anyone `DELETE` from: only `TRUNCATE`).
/// sqlnotify never reads the registry; other transaction-precise versioned tables do, so it is
/// emptied only when every such table this account can see is a sqlnotify journal. Without
/// the privileges (`DELETE HISTORY` on the journal, `DROP` on `mysql.transaction_registry`)
/// that part is skipped with a warning.
pub(crate) async fn trim_history(conn: &mut Conn, database: &str) -> Result<()> {
    let context = "trimming the journal's history";
    let journal = qualified(database, JOURNAL);
    let versioned: Vec<(String, String)> = conn
        .query(
            "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.COLUMNS \
             WHERE GENERATION_EXPRESSION = 'ROW START' AND DATA_TYPE = 'bigint' \
             ORDER BY TABLE_SCHEMA",
        )
        .await
        .map_err(db_err(context))?;
    let others = versioned.iter().find(|(_, table)| table != JOURNAL);
    let mut steps = vec![format!("DELETE HISTORY FROM {journal}")];
    match others {
        None => steps.push(format!("TRUNCATE TABLE {TRANSACTION_REGISTRY}")),
        Some((schema, table)) => log::debug!(
            "sqlnotify: {TRANSACTION_REGISTRY} is left as is: {schema}.{table} records \
             transactions too"
        ),
    }
    for step in steps {
        match conn.query_drop(&step).await {
            Ok(()) => {}
            Err(mysql_async::Error::Server(e)) => {
                log::warn!(
                    "sqlnotify: {step}: {} (the journal of {database:?} records transactions; \
                     without this, deleted journal rows and MariaDB's transaction registry \
                     keep growing)",
                    e.message
                );
                return Ok(());
            }
            Err(e) => return Err(Error::db(context, e)),
        }
    }
    Ok(())
}

/// One journal row as a read plans it: all but its payload — unless that is small and fits the
/// read's budget for payloads read along ([`read_meta`]) — which is fetched only when the
/// row's share is handed over ([`fetch_payloads`]), so that a read holds a bounded amount of
/// payloads however many rows it plans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowMeta {
    pub id: i64,
    pub channel: String,
    /// The payload's size in bytes (0 for a `NULL` payload).
    pub len: u64,
    /// The writer's transaction; `None` for rows written before the journal recorded them,
    /// and on a journal that does not record them.
    pub tx: Option<u64>,
    /// The payload, when it was small enough to be read along (see [`read_meta`]).
    pub payload: Option<String>,
}

/// Like [`read_page`], with each row's transaction (rows up to `after` have none); with
/// `only`, just the rows of those transactions. Runs on whatever `conn` is: the listener reads
/// inside one consistent snapshot, so a transaction is either wholly visible or not at all.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn read_tx_page(
    conn: &mut impl Queryable,
    database: &str,
    after: i64,
    pos: i64,
    condition: &str,
    only: Option<&[u64]>,
    limit: usize,
    inline: &mut u64,
) -> Result<Vec<RowMeta>> {
    let only = only.map_or(String::new(), |txs| {
        let list: Vec<String> = txs.iter().map(u64::to_string).collect();
        format!(" AND `{JOURNAL_TX}` IN ({})", list.join(", "))
    });
    read_meta(
        conn,
        database,
        Some(after),
        pos,
        condition,
        &only,
        limit,
        inline,
    )
    .await
}

/// Puts the rows of one read in delivery order and marks the last row of each transaction:
/// rows without a transaction first, in id order; then each transaction's rows together, in
/// id order, the transactions ordered by their last id — which is commit order for any two
/// that wrote the same row (the second waited for the first's commit before its trigger took
/// a higher id). Returns each row with its mark: `Some(true)` on a transaction's last row among
/// `rows`, `Some(false)` on the others, `None` without a transaction — and on the last row of a
/// transaction in `cut`, one the read may not have seen whole.
pub(crate) fn in_transactions(
    rows: Vec<RowMeta>,
    cut: &HashSet<u64>,
) -> Vec<(RowMeta, Option<bool>)> {
    let mut last: HashMap<u64, i64> = HashMap::new();
    for row in &rows {
        if let Some(tx) = row.tx {
            let id = last.entry(tx).or_insert(row.id);
            *id = (*id).max(row.id);
        }
    }
    let mut rows = rows;
    // (has a transaction, its last id, the transaction, the row's id)
    rows.sort_by_key(|row| match row.tx {
        None => (false, row.id, 0, row.id),
        Some(tx) => (true, last[&tx], tx, row.id),
    });
    let mut out: Vec<(RowMeta, Option<bool>)> = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some((previous, mark)) = out.last_mut() {
            if previous.tx.is_some() && previous.tx == row.tx {
                *mark = Some(false);
            }
        }
        let mark = row.tx.map(|_| true);
        out.push((row, mark));
    }
    for (row, mark) in &mut out {
        if *mark == Some(true) && row.tx.is_some_and(|tx| cut.contains(&tx)) {
            *mark = None;
        }
    }
    out
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Where a listener without a saved watermark starts: ids up to the returned watermark were
/// committed more than `gap_timeout` before the oldest transaction still running that has
/// written anything started (before now, when none runs); the returned ids above it are
/// already committed (to be marked read, not delivered). Ids above the watermark that are
/// missing may be transactions still running: they are delivered when they commit.
///
/// The running transactions come from `information_schema.INNODB_TRX`, which needs the
/// `PROCESS` privilege; without it the watermark is placed `gap_timeout` before now, said
/// once, at `info`. Either way it looks back at most [`MAX_LOOKBACK_IDS`] ids below the
/// newest (said at `warn` when that cuts it short). A transaction that has been running for
/// longer than that, with a journal id below one committed since, is not delivered.
pub(crate) async fn placement(
    conn: &mut Conn,
    database: &str,
    gap_timeout: Duration,
) -> Result<(i64, Vec<i64>)> {
    let journal = qualified(database, JOURNAL);
    let context = "placing the journal cursor";
    let low_sql = |floor: &str| {
        format!(
            "SELECT `id` FROM {journal} WHERE `id` > {floor} \
             AND `created_at` <= NOW(6) - INTERVAL ? MICROSECOND ORDER BY `id` DESC LIMIT 1"
        )
    };
    let now_low: i64 = conn
        .exec_first(low_sql("0"), (micros(gap_timeout),))
        .await
        .map_err(db_err(context))?
        .unwrap_or(0);
    let mut low = now_low;
    if let Some(running) = oldest_writer(conn).await? {
        let head: i64 = conn
            .query_first(format!("SELECT COALESCE(MAX(`id`), 0) FROM {journal}"))
            .await
            .map_err(db_err(context))?
            .unwrap_or(0);
        let floor = (head - MAX_LOOKBACK_IDS).max(0);
        let writer_low: Option<i64> = conn
            .exec_first(
                low_sql(&floor.to_string()),
                (micros(gap_timeout.saturating_add(running)),),
            )
            .await
            .map_err(db_err(context))?;
        if writer_low.is_none() && floor > 0 && floor < now_low {
            log::warn!(
                "sqlnotify: a transaction on the MySQL server has been writing for {running:?}; \
                 this first start looks back {MAX_LOOKBACK_IDS} journal ids for it, not further: \
                 if it wrote to watched tables before those, its events are missed"
            );
        }
        low = low.min(writer_low.unwrap_or(floor));
    }
    let ids: Vec<i64> = conn
        .query(format!(
            "SELECT `id` FROM {journal} WHERE `id` > {low} ORDER BY `id`"
        ))
        .await
        .map_err(db_err(context))?;
    Ok((low, ids))
}

/// The journal's newest id (0 when it is empty). The purge always keeps the newest row, so
/// this never goes below an id a listener has read — unless the journal's ids went back: a
/// failover to a replica that was behind, a restore, the journal truncated or its newest rows
/// deleted with `AUTO_INCREMENT` set back.
pub(crate) async fn newest(conn: &mut Conn, database: &str) -> Result<i64> {
    let newest: Option<Option<i64>> = conn
        .query_first(format!(
            "SELECT MAX(`id`) FROM {}",
            qualified(database, JOURNAL)
        ))
        .await
        .map_err(db_err("reading the journal's newest id"))?;
    Ok(newest.flatten().unwrap_or(0))
}

/// Where a listener whose journal's ids went back below what it had read (see [`newest`])
/// starts again: after the newest row written more than `ago` before now (by the journal's
/// `created_at`; `None`: not known, as for a consumer that resumes a position saved by another
/// process), and at most [`MAX_LOOKBACK_IDS`] below `newest`. Every row above it is
/// delivered: with `ago` reaching back to the listener's last read of the old journal, those
/// are the rows written since the ids went back — and some that it had delivered already,
/// again (at least once).
pub(crate) async fn written_before(
    conn: &mut Conn,
    database: &str,
    ago: Option<Duration>,
    newest: i64,
) -> Result<i64> {
    let floor = (newest - MAX_LOOKBACK_IDS).max(0);
    let Some(ago) = ago else {
        return Ok(floor);
    };
    let low: Option<i64> = conn
        .exec_first(
            format!(
                "SELECT `id` FROM {} WHERE `id` > {floor} \
                 AND `created_at` <= NOW(6) - INTERVAL ? MICROSECOND ORDER BY `id` DESC LIMIT 1",
                qualified(database, JOURNAL)
            ),
            (micros(ago),),
        )
        .await
        .map_err(db_err("placing the journal cursor again"))?;
    Ok(low.unwrap_or(floor))
}

/// How far below the newest journal id a first start looks for the rows of a transaction that
/// was already running: what it reads then is bounded whatever that transaction's age.
pub(crate) const MAX_LOOKBACK_IDS: i64 = 100_000;

/// MySQL's "access denied; you need the PROCESS privilege".
const ER_SPECIFIC_ACCESS_DENIED_ERROR: u16 = 1227;

/// How long ago the oldest transaction on the server that has written anything (other than
/// this connection's) started; `None` when none runs, or when this account may not see them
/// (then said at `info`).
async fn oldest_writer(conn: &mut Conn) -> Result<Option<Duration>> {
    // `trx_started` is shown in the server's system time zone (InnoDB formats it with
    // `localtime_r`), `NOW(6)` in the session's: both compared in the system's. Whole seconds,
    // cut down: never later than the transaction's start.
    let sql = "SELECT TIMESTAMPDIFF(MICROSECOND, MIN(`trx_started`), \
               CONVERT_TZ(NOW(6), @@session.time_zone, 'SYSTEM')) \
               FROM information_schema.INNODB_TRX WHERE `trx_rows_modified` > 0 \
               AND `trx_mysql_thread_id` <> CONNECTION_ID()";
    match conn.query_first::<Option<i64>, _>(sql).await {
        Ok(age) => Ok(age
            .flatten()
            .filter(|&us| us > 0)
            .map(|us| Duration::from_micros(us as u64))),
        Err(mysql_async::Error::Server(e)) if e.code == ER_SPECIFIC_ACCESS_DENIED_ERROR => {
            log::info!(
                "sqlnotify: cannot see the MySQL server's running transactions ({}): a \
                 transaction already running for longer than the gap timeout may be missed \
                 by this first start; grant PROCESS to avoid it",
                e.message
            );
            Ok(None)
        }
        Err(e) => Err(Error::db(
            "reading the MySQL server's running transactions",
            e,
        )),
    }
}

/// Most gaps a resuming cursor ages from the journal's times (later ones age from when they
/// are read).
const MAX_AGED_GAPS: usize = 1_000;

/// How many ids above what a resuming cursor has read it looks through for gaps to age from
/// the journal's times (later ones age from when they are read). The look is one primary-key
/// probe per row, so this bounds its cost whatever the backlog: millions of rows took longer
/// than the listener's query limit, and a consumer that far behind could never resume.
const AGED_GAPS_WINDOW: i64 = 100_000;

/// The ids [`gap_ages`] looks at for a cursor that has read up to `high`: a row at `high + 1`
/// follows a read id, one further up may follow a missing one.
fn gap_ages_range(high: i64) -> (i64, i64) {
    (
        high.saturating_add(2),
        high.saturating_add(AGED_GAPS_WINDOW),
    )
}

/// [`gap_ages`]' query: the rows in an id range (`?`, `?`) that follow a missing id, and
/// their ages in microseconds.
fn gap_ages_sql(database: &str) -> String {
    let journal = qualified(database, JOURNAL);
    format!(
        "SELECT j.`id`, COALESCE(GREATEST(TIMESTAMPDIFF(MICROSECOND, j.`created_at`, NOW(6)), 0), 0) \
         FROM {journal} j WHERE j.`id` BETWEEN ? AND ? \
         AND NOT EXISTS (SELECT 1 FROM {journal} p WHERE p.`id` = j.`id` - 1) \
         ORDER BY j.`id` LIMIT {MAX_AGED_GAPS}"
    )
}

/// For a cursor resuming with every id up to `high` read or in its saved gaps (the saved
/// position's highest id read, else its watermark): each journal row above `high` — up to
/// [`AGED_GAPS_WINDOW`] ids above — that follows a missing id, and how long ago it was
/// written: since then, a reader could have noticed that gap. The saved gaps below `high` age
/// from the resume ([`Cursor::resume`]); gaps beyond the window, from when they are read. A
/// gap aged from later than it could be is only given up later: nothing is skipped.
pub(crate) async fn gap_ages(
    conn: &mut Conn,
    database: &str,
    high: i64,
) -> Result<Vec<(i64, Duration)>> {
    let rows: Vec<(i64, i64)> = conn
        .exec(gap_ages_sql(database), gap_ages_range(high))
        .await
        .map_err(db_err("reading the journal's gaps"))?;
    Ok(rows
        .into_iter()
        .map(|(id, age)| (id, Duration::from_micros(age.max(0) as u64)))
        .collect())
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// Which of `ranges` (gaps a cursor is about to give up, see [`Cursor::due`]) hold a row, in
/// their order: one committed since the last read, or one a transaction still running wrote.
/// Read uncommitted: a rolled-back insert leaves nothing, a running one is seen, and nothing
/// is locked. Such a gap is not given up: its transaction may yet commit. One primary-key
/// probe per range.
pub(crate) async fn occupied(
    conn: &mut Conn,
    database: &str,
    ranges: &[(i64, i64)],
) -> Result<Vec<bool>> {
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    let context = "checking the journal's gaps for transactions still running";
    let journal = qualified(database, JOURNAL);
    let columns = ranges
        .iter()
        .map(|(start, end)| {
            format!("EXISTS (SELECT 1 FROM {journal} WHERE `id` BETWEEN {start} AND {end})")
        })
        .collect::<Vec<_>>()
        .join(", ");
    // mysql_async sets the isolation level for the next transaction only, then starts it. A
    // failure (or the caller's time limit) between the two would leave READ UNCOMMITTED for
    // the next statement on this connection: every error here ends the listener's session,
    // which drops the connection.
    let mut opts = mysql_async::TxOpts::default();
    opts.with_isolation_level(mysql_async::IsolationLevel::ReadUncommitted)
        .with_readonly(Some(true));
    let mut tx = conn
        .start_transaction(opts)
        .await
        .map_err(db_err(context))?;
    let row: Option<mysql_async::Row> = tx
        .query_first(format!("SELECT {columns}"))
        .await
        .map_err(db_err(context))?;
    tx.commit().await.map_err(db_err(context))?;
    let mut row =
        row.ok_or_else(|| Error::db(context, std::io::Error::other("the check returned no row")))?;
    // Anything but a clear "no" holds the gap: it is checked again a gap timeout later.
    Ok((0..ranges.len())
        .map(|i| row.take_opt::<i64, _>(i).and_then(|v| v.ok()) != Some(0))
        .collect())
}

/// Appends a row (custom notifications).
pub(crate) async fn append(
    conn: &mut Conn,
    database: &str,
    channel: &str,
    payload: &str,
) -> Result<()> {
    conn.exec_drop(
        format!(
            "INSERT INTO {} (`channel`, `payload`) VALUES (?, ?)",
            qualified(database, JOURNAL)
        ),
        (channel, payload),
    )
    .await
    .map_err(db_err(format!("writing a notification on {channel}")))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn a_resuming_cursor_ages_gaps_in_a_bounded_window_above_what_was_read() {
        // One primary-key probe per id of the window, whatever the backlog above it.
        assert_eq!(gap_ages_range(10), (12, 10 + AGED_GAPS_WINDOW));
        assert_eq!(gap_ages_range(i64::MAX - 1), (i64::MAX, i64::MAX));
        let sql = gap_ages_sql("d`b");
        assert!(
            sql.contains(
                "FROM `d``b`.`sqlnotify_journal` j WHERE j.`id` BETWEEN ? AND ? AND NOT EXISTS"
            ),
            "{sql}"
        );
        assert!(sql.ends_with(&format!("LIMIT {MAX_AGED_GAPS}")), "{sql}");

        // A gap beyond the window ages from when it is read: given up a gap timeout later.
        let now = Instant::now();
        let saved = Position {
            low: 10,
            above: None,
        };
        let mut c = Cursor::resume(&saved, TIMEOUT, now);
        // what gap_ages found: row 15 follows ids 11..=14, missing for a gap timeout
        c.noticed(15, now - TIMEOUT);
        let far = 10 + 2 * AGED_GAPS_WINDOW;
        c.mark([15, 16, far], now);
        assert!(c.advance(now));
        assert_eq!(
            c.low(),
            16,
            "the aged gap is given up at once, not the far one"
        );
        assert_eq!(c.gaps(), [(17, far - 1)]);
        assert!(!c.advance(now + TIMEOUT - Duration::from_millis(1)));
        assert!(c.advance(now + TIMEOUT));
        assert_eq!(c.low(), far);

        // With a saved position, the ids up to its highest read are not looked at again: its
        // gaps age from the resume.
        let saved = Position {
            low: 10,
            above: Some(Above {
                high: 500_000,
                gaps: vec![(11, 11)],
            }),
        };
        let mut c = Cursor::resume(&saved, TIMEOUT, now);
        assert_eq!(c.high(), 500_000);
        c.noticed(500_010, now - TIMEOUT);
        c.mark([500_010], now);
        assert_eq!(
            c.due(now, 64),
            [(500_001, 500_009)],
            "the saved gap is held from the resume, the one above aged by the journal"
        );
        assert_eq!(
            c.due(now + TIMEOUT, 64),
            [(11, 11), (500_001, 500_009)],
            "the saved gap waits a gap timeout from the resume"
        );
    }

    #[test]
    fn a_position_spanning_more_than_an_i64_resumes_at_its_watermark_alone() {
        // high - low overflows: it must not wrap into a small span and list every id.
        let altered = Position {
            low: -5_000_000_000_000_000_000,
            above: Some(Above {
                high: 5_000_000_000_000_000_000,
                gaps: Vec::new(),
            }),
        };
        let r = Cursor::resume(&altered, TIMEOUT, Instant::now());
        assert_eq!((r.low(), r.high()), (altered.low, altered.low));
    }

    #[test]
    fn due_lists_every_expired_gap_and_give_up_takes_them_out() {
        let t0 = Instant::now();
        let mut c = Cursor::new(10, TIMEOUT);
        c.mark([11, 14, 18], t0);
        assert!(c
            .due(t0 + TIMEOUT - Duration::from_millis(1), 64)
            .is_empty());
        let later = t0 + TIMEOUT;
        assert_eq!(c.due(later, 64), [(12, 13), (15, 17)]);
        assert_eq!(c.due(later, 1), [(12, 13)]);
        // Given up above a gap still open: the watermark stays below that one.
        c.give_up(&[(15, 17)]);
        assert!(c.advance_read(), "over 11");
        assert!(!c.advance_read());
        assert_eq!((c.low(), c.gaps()), (11, vec![(12, 13)]));
        c.give_up(&[(12, 13)]);
        assert!(c.advance_read());
        assert_eq!(c.low(), 18);
        assert!(c.noticed.is_empty());
        // Part of a gap, in its middle.
        let mut c = Cursor::new(0, TIMEOUT);
        c.mark([10], t0);
        c.give_up(&[(4, 6)]);
        assert_eq!(c.gaps(), [(1, 3), (7, 9)]);
        assert!(c.is_new(3) && !c.is_new(5) && c.is_new(7));
    }

    #[test]
    fn a_held_gap_waits_another_gap_timeout_and_expired_gaps_above_it_go() {
        let t0 = Instant::now();
        let mut c = Cursor::new(10, TIMEOUT);
        c.mark([11, 14, 18], t0);
        let t1 = t0 + TIMEOUT;
        c.hold((12, 13), t1);
        assert_eq!(c.due(t1, 64), [(15, 17)], "past the held gap");
        assert!(c.advance(t1));
        assert_eq!(c.low(), 11, "the held gap holds the watermark");
        assert_eq!(c.gaps(), [(12, 13)], "the expired gap above it is given up");
        assert!(c
            .due(t1 + TIMEOUT - Duration::from_millis(1), 64)
            .is_empty());
        assert_eq!(c.due(t1 + TIMEOUT, 64), [(12, 13)]);
        assert!(c.advance(t1 + TIMEOUT));
        assert_eq!(c.low(), 18);
    }

    #[test]
    fn burned_ids_above_a_held_gap_are_given_up_while_it_stays() {
        // A transaction holds id 1 for ever; every round burns an id and commits the next.
        let t0 = Instant::now();
        let mut c = Cursor::new(0, TIMEOUT);
        c.mark([3], t0);
        c.hold((1, 1), t0 + TIMEOUT);
        let mut now = t0 + TIMEOUT;
        for round in 0..1_000 {
            now += Duration::from_millis(50);
            c.mark([5 + 2 * round], now);
            for range in c.due(now, 64) {
                if range == (1, 1) {
                    c.hold(range, now);
                } else {
                    c.give_up(&[range]);
                }
            }
            c.advance_read();
            // The held gap, and those noticed within the last gap timeout.
            let recent = (TIMEOUT.as_millis() / 50) as usize;
            assert!(c.gaps().len() <= 2 + recent, "{}", c.gaps().len());
            assert!(c.noticed.len() <= c.gaps().len() + 2);
        }
        assert_eq!(c.low(), 0);
        assert!(c.unread_condition().matches(" OR ").count() <= MAX_RANGES);
    }

    #[test]
    fn a_read_in_windows_matches_only_unread_ids() {
        let t0 = Instant::now();
        let mut c = Cursor::new(0, TIMEOUT);
        // 200 gaps: ids 1, 3, …, 399 missing; 10,000 rows read above the last.
        c.mark((1..=200).map(|i| i * 2), t0);
        c.mark(401..=10_400, t0);
        let (first, bound) = c.unread_window(0);
        assert_eq!(bound, Some(2 * MAX_RANGES as i64 - 1));
        assert_eq!(first.matches(" OR ").count(), MAX_RANGES - 1);
        assert!(!first.contains('>'), "{first}");
        // The next window starts after the bound; the last takes the ids above `high`.
        let (_, bound) = c.unread_window(bound.unwrap());
        assert_eq!(bound, Some(4 * MAX_RANGES as i64 - 1));
        let (last, bound) = c.unread_window(399 - 2 * (MAX_RANGES as i64 - 10));
        assert_eq!(bound, None);
        assert!(last.ends_with("`id` > 10400"), "{last}");
        assert!(!last.contains("BETWEEN"), "{last}");
        // From the middle of a window's gaps: only those ending above it.
        let (mid, _) = c.unread_window(100);
        assert!(mid.starts_with("`id` = 101 OR"), "{mid}");
    }

    #[test]
    fn holding_part_of_a_gap_keeps_the_time_of_the_ids_below_it() {
        let t0 = Instant::now();
        let mut c = Cursor::new(10, TIMEOUT);
        c.mark([14], t0);
        let t1 = t0 + TIMEOUT;
        c.hold((12, 13), t1);
        assert_eq!(c.due(t1, 64), [(11, 11)]);
        assert!(c.advance(t1));
        assert_eq!(c.low(), 11);
        assert!(c.advance(t1 + TIMEOUT));
        assert_eq!(c.low(), 14);
    }

    #[test]
    fn a_saved_position_resumes_with_what_was_read_above_the_watermark() {
        let t0 = Instant::now();
        let mut c = Cursor::new(10, TIMEOUT);
        c.mark([11, 12, 14, 15, 18], t0);
        c.advance(t0);
        let saved = c.position();
        assert_eq!(
            saved,
            Position {
                low: 12,
                above: Some(Above {
                    high: 18,
                    gaps: vec![(13, 13), (16, 17)]
                })
            }
        );
        let r = Cursor::resume(&saved, TIMEOUT, t0);
        assert_eq!((r.low(), r.high()), (12, 18));
        assert_eq!(r.gaps(), [(13, 13), (16, 17)]);
        assert!(r.is_new(13) && r.is_new(16) && r.is_new(19));
        assert!(!r.is_new(14) && !r.is_new(18));
        let above = saved.above.clone().unwrap();
        assert_eq!(Above::from_json(&above.to_json()), Some(above));
        // At most as many gaps as a save writes.
        let many = |n: i64| Above {
            high: 2 * n + 1,
            gaps: (1..=n).map(|i| (2 * i, 2 * i)).collect(),
        };
        let most = many(MAX_SAVED_GAPS as i64);
        assert_eq!(Above::from_json(&most.to_json()), Some(most));
        let more = many(MAX_SAVED_GAPS as i64 + 1);
        assert_eq!(Above::from_json(&more.to_json()), None);
        for junk in [
            "",
            "[]",
            r#"{"high": 9, "gaps": [[5, 3]]}"#,
            r#"{"high": 9, "gaps": [[1, 9]]}"#,
            // adjacent gaps: the cursor never writes them, and its read set cannot hold them
            r#"{"high": 9, "gaps": [[2, 3], [4, 5]]}"#,
        ] {
            assert_eq!(Above::from_json(junk), None, "{junk}");
        }
        // Nothing read above: the watermark alone.
        let plain = Cursor::new(5, TIMEOUT).position();
        assert_eq!(
            plain,
            Position {
                low: 5,
                above: None
            }
        );
        assert!(Cursor::resume(&plain, TIMEOUT, t0).is_new(6));
    }

    #[test]
    fn a_resumed_cursor_ages_its_gaps_by_the_journal_not_from_the_start() {
        let t0 = Instant::now();
        // Resumed at 0: rows 3 and 6 follow gaps written 8 s and 1 s before the resume.
        let mut c = Cursor::new(0, TIMEOUT);
        c.noticed(3, t0);
        c.noticed(6, t0 + Duration::from_secs(7));
        c.noticed(2, t0); // out of order: ignored
        let resume = t0 + Duration::from_secs(8);
        c.mark([3, 4, 6], resume);
        assert!(!c.advance(resume));
        // 2 s after the resume, the first gap (1..=2) has waited its 10 s: given up; the second
        // (5) has waited 3 s and holds the position.
        let later = resume + Duration::from_secs(2);
        assert!(c.advance(later));
        assert_eq!(c.low(), 4);
        assert_eq!(c.gaps(), [(5, 5)]);
        assert!(c.advance(t0 + Duration::from_secs(17)));
        assert_eq!(c.low(), 6);
    }

    #[test]
    fn contiguous_rows_move_the_watermark() {
        let t0 = Instant::now();
        let mut c = Cursor::new(0, TIMEOUT);
        assert_eq!(c.unread_condition(), "`id` > 0");
        c.mark([1, 2, 3], t0);
        assert!(c.advance(t0));
        assert_eq!((c.low(), c.high()), (3, 3));
        assert!(c.gaps().is_empty());
        assert!(!c.is_new(2) && c.is_new(4));
        assert!(!c.advance(t0));
    }

    #[test]
    fn a_late_commit_is_read_in_its_gap_then_the_watermark_moves() {
        let t0 = Instant::now();
        let mut c = Cursor::new(0, TIMEOUT);
        // id 1 taken by a running transaction; 2 and 3 committed
        c.mark([2, 3], t0);
        assert!(!c.advance(t0));
        assert_eq!(c.low(), 0);
        assert_eq!(c.gaps(), [(1, 1)]);
        assert_eq!(c.unread_condition(), "`id` = 1 OR `id` > 3");
        assert!(c.is_new(1) && !c.is_new(2));
        // 1 commits
        c.mark([1], t0 + Duration::from_secs(1));
        assert!(c.advance(t0 + Duration::from_secs(1)));
        assert_eq!(c.low(), 3);
        assert!(c.gaps().is_empty());
    }

    #[test]
    fn gaps_expire_after_the_timeout_in_the_order_they_were_noticed() {
        let t0 = Instant::now();
        let mut c = Cursor::new(0, TIMEOUT);
        c.mark([3], t0); // 1 and 2 missing since t0
        let t5 = t0 + Duration::from_secs(5);
        c.mark([5, 8], t5); // 4, 6, 7 missing since t5
        assert_eq!(c.gaps(), [(1, 2), (4, 4), (6, 7)]);
        assert!(!c.advance(t0 + Duration::from_secs(9)));
        // 1-2 expire; 4 was noticed later and holds the watermark
        assert!(c.advance(t0 + Duration::from_secs(10)));
        assert_eq!(c.low(), 3);
        // 6 commits meanwhile
        c.mark([6], t0 + Duration::from_secs(12));
        assert_eq!(c.gaps(), [(4, 4), (7, 7)]);
        assert!(c.advance(t5 + Duration::from_secs(10)));
        assert_eq!(c.low(), 8);
        assert!(c.gaps().is_empty());
        assert!(c.noticed.is_empty());
    }

    #[test]
    fn many_gaps_are_read_as_one_tail_range() {
        let t0 = Instant::now();
        let mut c = Cursor::new(0, TIMEOUT);
        c.mark((1..=200).map(|i| i * 2), t0);
        assert_eq!(c.gaps().len(), 200);
        let cond = c.unread_condition();
        assert_eq!(cond.matches(" OR ").count(), MAX_RANGES);
        assert!(cond.contains(&format!("`id` BETWEEN {} AND 400", 2 * MAX_RANGES - 1)));
        assert!(cond.ends_with("`id` > 400"));
    }

    fn tx_row(id: i64, tx: Option<u64>) -> RowMeta {
        RowMeta {
            id,
            channel: "c".into(),
            len: 2,
            tx,
            payload: None,
        }
    }

    fn summary(rows: &[(RowMeta, Option<bool>)]) -> Vec<(i64, Option<bool>)> {
        rows.iter().map(|(r, mark)| (r.id, *mark)).collect()
    }

    #[test]
    fn transactions_go_together_ordered_by_their_last_row_which_is_marked() {
        // Transaction 7 took ids 1 and 4, transaction 9 ids 2 and 3 (so 9 ends first).
        // Row 5 predates the journal recording transactions.
        let rows = vec![
            tx_row(1, Some(7)),
            tx_row(2, Some(9)),
            tx_row(3, Some(9)),
            tx_row(4, Some(7)),
            tx_row(5, None),
        ];
        let out = in_transactions(rows, &HashSet::new());
        assert_eq!(
            summary(&out),
            [
                (5, None),
                (2, Some(false)),
                (3, Some(true)),
                (1, Some(false)),
                (4, Some(true))
            ]
        );
        // A transaction the read may not have whole: its last row here is not called last.
        let out = in_transactions(
            vec![tx_row(1, Some(7)), tx_row(2, Some(7))],
            &HashSet::from([7]),
        );
        assert_eq!(summary(&out), [(1, Some(false)), (2, None)]);
        assert!(in_transactions(Vec::new(), &HashSet::new()).is_empty());
    }

    #[test]
    fn a_share_takes_rows_up_to_its_byte_budget_and_always_one() {
        const MIB: u64 = 1 << 20;
        // 100 rows of 1 MiB against 64 MiB: shares of 64, then 36.
        let lens = vec![MIB; 100];
        assert_eq!(share_len(lens.iter().copied(), 64 * MIB, 1_000), 64);
        assert_eq!(share_len(lens[64..].iter().copied(), 64 * MIB, 1_000), 36);
        // The row cap holds whatever the sizes.
        assert_eq!(share_len([0; 5_000], 64 * MIB, 1_000), 1_000);
        // A row larger than the budget goes alone, also after smaller ones.
        assert_eq!(share_len([100 * MIB, 1, 1], 64 * MIB, 1_000), 1);
        assert_eq!(share_len([1, 100 * MIB, 1], 64 * MIB, 1_000), 1);
        // Exactly the budget fits; one byte more does not.
        assert_eq!(share_len([32 * MIB, 32 * MIB, 1], 64 * MIB, 1_000), 2);
        assert_eq!(share_len([u64::MAX, u64::MAX], 64 * MIB, 1_000), 1);
        assert_eq!(share_len([], 64 * MIB, 1_000), 0);
        // Shares in turn cover every row once, in order.
        let lens: Vec<u64> = (0..500).map(|i| (i * 7919 % 13) * MIB).collect();
        let (mut at, mut shares) = (0, 0);
        while at < lens.len() {
            let n = share_len(lens[at..].iter().copied(), 20 * MIB, 50);
            assert!((1..=50).contains(&n));
            assert!(n == 1 || lens[at..at + n].iter().sum::<u64>() <= 20 * MIB);
            at += n;
            shares += 1;
        }
        assert_eq!(at, lens.len());
        assert!(shares > 500 / 50, "{shares}");
    }

    #[test]
    fn the_journal_comment_says_where_transactions_start() {
        assert_eq!(recorded_after(&journal_comment(42)), 42);
        for other in [
            "",
            "42",
            "sqlnotify: transactions recorded after id x",
            "hello",
        ] {
            assert_eq!(recorded_after(other), 0, "{other}");
        }
        assert_eq!(recorded_after(&journal_comment(-3)), 0);
    }

    /// A small deterministic generator for the randomised test below.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// When each unread id was noticed, per id (what `hold` must change for its range only).
    fn noticed_per_id(c: &Cursor) -> BTreeMap<i64, Instant> {
        let mut times = BTreeMap::new();
        let mut previous = c.low;
        for &(upto, when) in &c.noticed {
            for id in (previous + 1).max(c.low + 1)..=upto {
                if c.gap_of(id).is_some() {
                    times.insert(id, when);
                }
            }
            previous = previous.max(upto);
        }
        times
    }

    /// Randomised against a model of the journal (ids burned, written by transactions still
    /// running, or committed), settling as the listener does: `hold` re-notices its range and
    /// nothing else, an id that holds a row is never passed nor given up, an expired gap that
    /// holds none is given up also above a held one, and once everything has ended the
    /// watermark reaches the head.
    #[test]
    fn settling_never_passes_a_row_and_gives_up_every_burned_id() {
        const GAP: Duration = Duration::from_millis(100);
        let (mut holds, mut holds_inside) = (0, 0);
        for seed in 0..3000u64 {
            let mut r = Lcg(seed * 7919 + 1);
            let mut now = Instant::now();
            let mut c = Cursor::new(0, GAP);
            let mut next_id = 1i64;
            let mut running: BTreeSet<i64> = BTreeSet::new();
            let mut committed: BTreeSet<i64> = BTreeSet::new();
            let limit = 1 + r.below(4) as usize;
            for _ in 0..60 {
                match r.below(6) {
                    0 => {
                        for _ in 0..1 + r.below(4) {
                            match r.below(3) {
                                0 => {} // burned
                                1 => {
                                    running.insert(next_id);
                                }
                                _ => {
                                    committed.insert(next_id);
                                }
                            }
                            next_id += 1;
                        }
                    }
                    1 => {
                        if let Some(&id) = running.iter().nth(r.below(3) as usize) {
                            running.remove(&id);
                            if r.below(2) == 0 {
                                committed.insert(id);
                            }
                        }
                    }
                    2 => now += Duration::from_millis(r.below(150)),
                    _ => {
                        let read: Vec<i64> =
                            committed.iter().copied().filter(|&i| c.is_new(i)).collect();
                        let (before, high) = (noticed_per_id(&c), c.high);
                        c.mark(read, now);
                        // What is still unread keeps its time; new gaps are noticed now.
                        for (id, when) in noticed_per_id(&c) {
                            let want = if id > high { now } else { before[&id] };
                            assert_eq!(when, want, "seed {seed} id {id}");
                        }
                        committed.retain(|&i| c.is_new(i));
                        c.advance_read();
                        let due = c.due(now, limit);
                        assert!(due.len() <= limit, "seed {seed}");
                        assert!(
                            due.windows(2).all(|w| w[0].1 < w[1].0)
                                && due
                                    .iter()
                                    .all(|&(a, b)| c.gap_of(a).is_some()
                                        && c.gap_of(a) == c.gap_of(b)),
                            "seed {seed}: {due:?} in {:?}",
                            c.gaps()
                        );
                        let mut empty = Vec::new();
                        for range in due.iter().copied() {
                            let holds_row = running
                                .iter()
                                .chain(&committed)
                                .any(|&id| range.0 <= id && id <= range.1);
                            if !holds_row {
                                empty.push(range);
                                continue;
                            }
                            holds += 1;
                            if range.0 > c.low + 1 {
                                holds_inside += 1;
                            }
                            let before = noticed_per_id(&c);
                            c.hold(range, now);
                            let after = noticed_per_id(&c);
                            assert_eq!(
                                before.keys().collect::<Vec<_>>(),
                                after.keys().collect::<Vec<_>>(),
                                "seed {seed}"
                            );
                            for (id, when) in &after {
                                let want = if (range.0..=range.1).contains(id) {
                                    now
                                } else {
                                    before[id]
                                };
                                assert_eq!(*when, want, "seed {seed} id {id} {range:?}");
                            }
                            let ups: Vec<i64> = c.noticed.iter().map(|e| e.0).collect();
                            assert!(ups.windows(2).all(|w| w[0] < w[1]), "seed {seed}");
                        }
                        c.give_up(&empty);
                        c.advance_read();
                        if due.len() < limit {
                            // Every expired gap was checked: none is left.
                            assert!(c.due(now, usize::MAX).is_empty(), "seed {seed}");
                        }
                        for &id in running.iter().chain(&committed) {
                            assert!(
                                id <= c.low || c.is_new(id),
                                "seed {seed}: id {id}, which holds a row, given up"
                            );
                        }
                        for &id in running.iter().chain(&committed) {
                            assert!(
                                id > c.low,
                                "seed {seed}: id {id}, which holds a row, passed"
                            );
                        }
                        let unread = c.gaps();
                        assert!(
                            unread.windows(2).all(|w| w[0].1 + 1 < w[1].0)
                                && unread
                                    .iter()
                                    .all(|&(a, b)| c.low < a && a <= b && b < c.high),
                            "seed {seed}: {unread:?}"
                        );
                    }
                }
            }
            running.clear();
            for _ in 0..200 {
                now += GAP;
                let read: Vec<i64> = committed.iter().copied().filter(|&i| c.is_new(i)).collect();
                c.mark(read, now);
                committed.clear();
                c.advance(now);
            }
            assert_eq!(c.low, c.high, "seed {seed}");
        }
        assert!(holds > 1000 && holds_inside > 100, "{holds} {holds_inside}");
    }

    #[test]
    fn a_gap_held_open_costs_one_range_however_much_is_read_above_it() {
        let t0 = Instant::now();
        let mut c = Cursor::new(0, TIMEOUT);
        c.mark(2..=2_000_001, t0);
        c.hold((1, 1), t0 + TIMEOUT);
        assert!(!c.advance(t0 + TIMEOUT));
        assert_eq!(c.gaps(), [(1, 1)]);
        assert_eq!(c.noticed.len(), 2, "the held id's entry and the read's");
        assert_eq!(
            c.position().above,
            Some(Above {
                high: 2_000_001,
                gaps: vec![(1, 1)]
            })
        );
        c.mark([1], t0 + TIMEOUT);
        assert!(c.advance(t0 + TIMEOUT));
        assert_eq!(c.low(), 2_000_001);
        assert!(c.noticed.is_empty());
    }

    #[test]
    fn short_gaps_filled_above_a_held_one_leave_no_trace() {
        // A transaction holds id 1 for hours while every read opens a gap above it that the
        // next fills: what the cursor keeps stays the size of its gaps.
        let t0 = Instant::now();
        let mut c = Cursor::new(0, TIMEOUT);
        c.mark([2], t0);
        let held = t0 + TIMEOUT;
        c.hold((1, 1), held);
        let mut now = held;
        for b in (2..200_000).step_by(2) {
            now += Duration::from_millis(1);
            c.mark([b + 2], now);
            c.mark([b + 1], now);
            assert!(
                c.noticed.len() <= c.unread.len() + 2,
                "{} entries for {} gaps",
                c.noticed.len(),
                c.unread.len()
            );
        }
        assert_eq!(c.gaps(), [(1, 1)]);
        assert!(!c.advance(held + TIMEOUT - Duration::from_millis(1)));
        assert_eq!(c.due(held + TIMEOUT, 64), [(1, 1)], "aged from its hold");
        c.mark([1], now);
        assert!(c.advance(now));
        assert_eq!(c.low(), c.high());
        assert!(c.noticed.is_empty());
    }

    #[test]
    fn rows_at_or_below_the_watermark_are_never_new() {
        let mut c = Cursor::new(10, TIMEOUT);
        c.mark([5, 10], Instant::now());
        assert!(!c.is_new(5) && !c.is_new(10));
        assert_eq!(c.high(), 10);
        assert!(c.unread.is_empty());
    }
}
