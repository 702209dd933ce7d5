//! MySQL's I/O for the listener shell (`crate::listener`): a [`Source`] polling the journal.
//!
//! MySQL has no LISTEN/NOTIFY. The source keeps a connection of its own (autocommit: every
//! poll is a transaction of its own and sees everything committed before it, no snapshot is
//! held — under REPEATABLE READ too; no isolation level is forced, because READ COMMITTED
//! would make the consumer's saves fail on servers logging with `binlog_format = STATEMENT`)
//! and reads the journal past its [`Cursor`] (see `journal.rs` for how late commits are
//! caught) at the shell's adaptive interval: every millisecond while rows flow, backing off to
//! 25 ms when idle. The notifier's own writes (`notify()`) wake it at once. Every query must
//! answer within the health-check interval (at least 2 s), else the connection counts as dead.
//!
//! The position a named consumer saves is the cursor's low watermark: every id up to it was
//! read or given up as rolled back.
//!
//! A read's memory is bounded in bytes, not only in rows: it reads its rows' ids, channels,
//! transactions and payload sizes first (and the small payloads along, up to half of
//! [`READ_BYTES`], 64 MiB, so that small rows take no second query), decides what it hands
//! over and in which order (and which row ends each transaction), then fetches the other
//! payloads share by share — at most the other half of the budget, or one row larger than
//! that — handing each share over before fetching the next. A transaction larger than a
//! share goes over as it is fetched, still whole in delivery order and with its last row
//! marked; a journal row is immutable once committed, so the payload fetched later is the one
//! the snapshot saw. Should the connection fail between two shares of one transaction, the
//! next read hands over the rest of that transaction before anything else, so no other
//! transaction comes between its parts.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mysql_async::prelude::*;
use mysql_async::Conn;

use super::catalog::db_err;
use super::consumers::{self, Missed};
use super::journal::{self, Cursor, Position, RowMeta, Tracking};
use super::snapshot::Watermark;
use super::tls::MysqlConfig;
use crate::consumer::ConsumerParams;
use crate::error::{Error, Result};
use crate::event::RawNotification;
use crate::listener::{FinalSave, Outlet, Pace, Source, Wake};
use crate::read_point::ReadPoint;
use crate::read_set::CursorPage;

/// Rows read per query.
const READ_BATCH: usize = 1_000;
/// Rows a read takes in one snapshot before it ends (with transactions recorded: reading more
/// only to complete the transactions it has begun).
const READ_MAX: usize = 10 * READ_BATCH;
/// Most rows a read takes past [`READ_MAX`] to complete its transactions.
const COMPLETE_MAX: usize = 100_000;
/// Most rounds a read goes on to complete the transactions it has begun (each reads the rest
/// of the journal for theirs: see [`MysqlSource::read_transactions`]).
const COMPLETE_ROUNDS: usize = 4;
/// Most payload bytes a read holds at once (and one row larger than the rest may take). A read
/// plans its rows by their metadata (id, channel, transaction, payload size), reading along
/// the small payloads that fit half of this ([`INLINE_BYTES`]); it fetches the others and
/// hands the rows over share by share: at most [`READ_BATCH`] rows and [`SHARE_BYTES`] of
/// fetched payloads a share (a row larger than that alone), each share handed over before
/// the next is fetched.
const READ_BYTES: u64 = 64 << 20;
/// Most bytes of payloads a read takes along with its rows' metadata.
const INLINE_BYTES: u64 = READ_BYTES / 2;
/// Most bytes of payloads fetched for one share.
const SHARE_BYTES: u64 = READ_BYTES - INLINE_BYTES;
/// Most expired gaps checked for running transactions per read (the rest wait for the next).
const MAX_CHECKED_GAPS: usize = 64;
/// How long a transaction may hold a journal gap before the listener warns about it.
const HELD_WARN_AFTER: Duration = Duration::from_secs(60);
/// Shortest time a query may take before the connection counts as dead.
const MIN_QUERY_LIMIT: Duration = Duration::from_secs(2);
/// The listener's connection's `wait_timeout`, in health-check intervals (at least
/// [`MIN_IDLE_LIMIT`]): the server ends it once it went that long without a statement.
const IDLE_LIMIT_CHECKS: u32 = 6;
/// Shortest `wait_timeout` of the listener's connection.
const MIN_IDLE_LIMIT: Duration = Duration::from_secs(10);

/// Reads a MySQL database's journal.
pub(crate) struct MysqlSource {
    opts: MysqlConfig,
    database: Arc<str>,
    gap_timeout: Duration,
    query_limit: Duration,
    /// The connection's `wait_timeout` (see [`idle_limit`]).
    idle_limit: Duration,
    channels: HashSet<Arc<str>>,
    /// The same channels, sorted (what a named consumer registers).
    channel_list: Vec<String>,
    /// `None` until placed.
    cursor: Option<Cursor>,
    wake: Wake,
    /// The cursor's low watermark, published for snapshots (see `snapshot.rs`).
    settled: Arc<Watermark>,
    /// Whether the journal records transactions (read when the cursor is placed).
    tracking: Tracking,
    /// The last read's page was full: more rows may wait, and the next wait ends at once.
    more: bool,
    /// Where the next read starts after a full page (its last id); `None`: at the watermark.
    resume: Option<i64>,
    /// A transaction the last read began to hand over and did not finish (its session failed
    /// between two shares), and the last of its journal ids handed over (its rows go over in
    /// id order): the next read hands over its rows after that one before anything else.
    unfinished: Option<(u64, i64)>,
    /// The gap last held for a transaction still running (for the log).
    held: Option<Held>,
    /// When the last read that succeeded began (or the cursor was placed at now): the journal
    /// had every id the cursor read then. Rows written since then are what a journal whose ids
    /// went back gives out anew (see [`restore`](Source::restore)). `None` after resuming a
    /// saved position, until the first read: when it was read is not known here.
    last_read: Option<Instant>,
    /// The consumer's `missed` column as read when it last came back, once returned to the
    /// shell (which reports it as a `Gap`): the next save — periodic or final — clears it (see
    /// `consumers::Missed`).
    reported: Arc<Mutex<Option<Vec<u8>>>>,
    /// A named consumer reads (placed with one): the purge keeps its rows. Without one, ids
    /// given up are checked against what the purge deleted ([`Source::missed`]).
    named: bool,
    /// Ids given up that the purge may have deleted (not rolled back): reported as a `Gap`.
    purged: bool,
}

/// A gap held for a transaction still running: its first id, when it was first held, and when
/// it was last warned about.
struct Held {
    start: i64,
    since: Instant,
    warned: Option<Instant>,
}

impl MysqlSource {
    pub fn new(
        opts: MysqlConfig,
        database: Arc<str>,
        gap_timeout: Duration,
        health_check: Duration,
        channels: Vec<String>,
        wake: Wake,
        settled: Arc<Watermark>,
    ) -> Self {
        let mut channel_list = channels;
        channel_list.sort();
        channel_list.dedup();
        MysqlSource {
            opts,
            database,
            gap_timeout,
            query_limit: health_check.max(MIN_QUERY_LIMIT),
            idle_limit: idle_limit(health_check),
            channels: channel_list.iter().map(|c| Arc::from(c.as_str())).collect(),
            channel_list,
            cursor: None,
            wake,
            settled,
            tracking: Tracking::Off,
            more: false,
            resume: None,
            unfinished: None,
            held: None,
            last_read: None,
            reported: Arc::default(),
            named: false,
            purged: false,
        }
    }

    /// The `missed` column reported as a `Gap`, not cleared yet.
    fn reported(&self) -> Option<Vec<u8>> {
        self.reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records what was returned to the shell to report (`None`: nothing to clear).
    fn set_reported(&self, recorded: Option<Vec<u8>>) {
        *self.reported.lock().unwrap_or_else(|p| p.into_inner()) = recorded;
    }

    /// The shared copy of channel name `name` (a copy of it if it is none of ours).
    fn shared_name(&self, name: String) -> Arc<str> {
        self.channels
            .get(name.as_str())
            .cloned()
            .unwrap_or_else(|| name.into())
    }

    /// Runs a query future; fails if it takes longer than the query limit.
    async fn within<T>(&self, what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        within(self.query_limit, what, fut).await
    }

    /// Moves the watermark over what was read and over gaps that stayed empty for the gap
    /// timeout — only those that hold no row: a gap where a transaction still running wrote
    /// its row waits (another gap timeout, then it is checked again), so a transaction that
    /// commits late is delivered instead of skipped. Expired gaps above a held one are checked
    /// and given up too (the watermark stays below the held one): burned ids above a long
    /// transaction cost the reads nothing once expired. Publishes the new watermark.
    async fn settle(&mut self, conn: &mut Conn) -> Result<()> {
        let now = Instant::now();
        // Over what was read, up to the lowest gap.
        let mut moved = self.cursor().advance_read();
        // Most reads find no expired gap.
        let due = self.cursor().due(now, MAX_CHECKED_GAPS);
        if !due.is_empty() {
            moved |= self.settle_expired(conn, due, now).await?;
        }
        if moved {
            // Only now: every id up to the new watermark was handed over (or given up).
            let low = self.cursor().low();
            self.settled.set(low);
        }
        Ok(())
    }

    /// [`settle`](Self::settle)'s part for the expired gaps `due`: checks them for rows, holds
    /// those that hold one and gives up the others. Returns whether the watermark moved.
    async fn settle_expired(
        &mut self,
        conn: &mut Conn,
        due: Vec<(i64, i64)>,
        now: Instant,
    ) -> Result<bool> {
        let db = self.database.clone();
        let occupied = self
            .within(
                "checking the journal's gaps for transactions still running",
                journal::occupied(conn, &db, &due),
            )
            .await?;
        let mut empty = Vec::with_capacity(due.len());
        let mut reported = false;
        for (range, occupied) in due.into_iter().zip(occupied) {
            if occupied {
                // The lowest held gap is the one that holds the watermark.
                if !std::mem::replace(&mut reported, true) {
                    self.report_held(range, now);
                }
                self.cursor().hold(range, now);
            } else {
                empty.push(range);
            }
        }
        if !self.named && !empty.is_empty() {
            self.purged |= self.purged_under(conn, &empty).await?;
        }
        self.cursor().give_up(&empty);
        Ok(self.cursor().advance_read())
    }

    /// Whether the purge may have deleted ids of the `empty` gaps (a listener without a consumer,
    /// whose rows nothing keeps, fell behind the retention, or a transaction that ran longer
    /// than it committed rows already due): it records the highest id it deleted
    /// (`sqlnotify_trimmed`) with its deletes, so a gap found empty after them is below it.
    /// A rolled-back id below it counts too: the record cannot tell them apart. A record past
    /// the journal's newest id is of a journal whose ids went back since (truncated, restored):
    /// it says nothing about these ids.
    async fn purged_under(&mut self, conn: &mut Conn, empty: &[(i64, i64)]) -> Result<bool> {
        let db = self.database.clone();
        let what = "reading how far the purge deleted the journal";
        let upto = self
            .within(what, super::replay::read_trimmed(conn, &db))
            .await?;
        if !empty.iter().any(|&(start, _)| start <= upto) {
            return Ok(false);
        }
        let newest = self.within(what, journal::newest(conn, &db)).await?;
        Ok(upto <= newest)
    }

    /// Logs a gap held for a transaction still running: at `info` each time it is checked, at
    /// `warn` (at most once per [`HELD_WARN_AFTER`]) once it has been held that long — the
    /// watermark, a named consumer's saved position and the journal's retention all wait for
    /// it.
    fn report_held(&mut self, (start, end): (i64, i64), now: Instant) {
        let held = match &mut self.held {
            Some(held) if held.start == start => held,
            other => other.insert(Held {
                start,
                since: now,
                warned: None,
            }),
        };
        let open = now.saturating_duration_since(held.since) + self.gap_timeout;
        if open >= HELD_WARN_AFTER
            && held
                .warned
                .is_none_or(|at| now.saturating_duration_since(at) >= HELD_WARN_AFTER)
        {
            held.warned = Some(now);
            log::warn!(
                "sqlnotify: MySQL journal ids {start}..={end} belong to a transaction open for over {open:?}: the listener's watermark, the saved position of a named consumer and the journal's retention wait for it to commit or roll back (its events are delivered when it commits)"
            );
        } else {
            log::info!(
                "sqlnotify: MySQL journal ids {start}..={end} belong to a transaction open for over {open:?}; waiting for it to commit or roll back"
            );
        }
    }

    fn cursor(&mut self) -> &mut Cursor {
        self.cursor
            .as_mut()
            .expect("the cursor is placed before reading")
    }
}

/// The listener's connection's `wait_timeout` for `health_check`: a multiple of it, since
/// a listener that reads nothing still checks its connection every interval, and one waiting
/// for room in the pipeline pings it (`keeping_open`). Whole seconds, at least
/// [`MIN_IDLE_LIMIT`].
fn idle_limit(health_check: Duration) -> Duration {
    /// The server's largest `wait_timeout` (365 days).
    const MAX_WAIT_TIMEOUT_SECS: u64 = 31_536_000;
    let limit = health_check
        .saturating_mul(IDLE_LIMIT_CHECKS)
        .max(MIN_IDLE_LIMIT);
    let secs = (limit.as_secs()).saturating_add(u64::from(limit.subsec_nanos() > 0));
    Duration::from_secs(secs.min(MAX_WAIT_TIMEOUT_SECS))
}

pub(super) async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => Err(Error::Database {
            context: what.to_string(),
            source: format!("no answer within {limit:?}").into(),
        }),
    }
}

impl MysqlSource {
    /// A read of a journal that records transactions: up to [`READ_MAX`] rows, the rest of
    /// the transactions among them and every row up to where those end (so no transaction
    /// that ends before one of them is left for a later read), all in one consistent snapshot
    /// (so each transaction is seen whole or not at all), handed over transaction by
    /// transaction in commit order, the last row of each marked. The snapshot reads the rows
    /// without their payloads (but small ones, within [`INLINE_BYTES`]), so what it plans is
    /// known whole (where each transaction ends) while it holds a few dozen bytes a row; the
    /// other payloads come after, share by share ([`hand_over`](Self::hand_over)).
    async fn read_transactions(
        &mut self,
        conn: &mut Conn,
        outlet: &Outlet,
        after: i64,
    ) -> Result<Option<u64>> {
        if let Some((tx, through)) = self.unfinished {
            return self
                .finish_transaction(conn, outlet, after, tx, through)
                .await;
        }
        let (low, condition) = {
            let cursor = self.cursor();
            (cursor.low(), cursor.unread_condition())
        };
        let (db, limit) = (&*self.database, self.query_limit);
        let reading = "reading the journal";
        let opts = {
            let mut opts = mysql_async::TxOpts::default();
            opts.with_consistent_snapshot(true)
                .with_isolation_level(mysql_async::IsolationLevel::RepeatableRead)
                .with_readonly(Some(true));
            opts
        };
        let mut tx = within(limit, reading, async {
            conn.start_transaction(opts).await.map_err(db_err(reading))
        })
        .await?;
        let mut rows: Vec<RowMeta> = Vec::new();
        let mut inline = INLINE_BYTES;
        let mut pos = low;
        let mut more = false;
        let cursor = self
            .cursor
            .as_ref()
            .expect("the cursor is placed before reading");
        loop {
            // In windows of at most MAX_RANGES gaps: only rows not read yet. (The merged
            // `condition` matches every row read above its 64th gap: a read of those from the
            // watermark would take READ_MAX of them, all read already, and never get further.)
            let (window, bound) = cursor.unread_window(pos);
            let page = within(
                limit,
                reading,
                journal::read_tx_page(
                    &mut tx,
                    db,
                    after,
                    pos,
                    &window,
                    None,
                    READ_BATCH,
                    &mut inline,
                ),
            )
            .await?;
            let full = page.len() == READ_BATCH;
            if let Some(last) = page.last() {
                pos = last.id;
            }
            rows.extend(page);
            if full || bound.is_some() {
                if rows.len() >= READ_MAX || outlet.stopped() {
                    more = true;
                    break;
                }
            } else {
                break;
            }
            if !full {
                // Nothing more unread up to the window's end.
                pos = bound.unwrap_or(pos);
            }
        }
        let mut cut = HashSet::new();
        if more {
            // Complete the transactions begun — their other rows are visible in this snapshot
            // — and take every row up to where they end: a transaction wholly between (one
            // that committed before a begun one and wrote a row it then wrote too, say) comes
            // before it in commit order, so it must be delivered in this read, not the next.
            // Such a transaction may itself go on further: then again, for a few rounds.
            let mut known: HashSet<u64> = HashSet::new();
            let mut fresh: Vec<RowMeta> = std::mem::take(&mut rows);
            let mut taken = 0;
            for round in 1..=COMPLETE_ROUNDS {
                let mut begun: Vec<u64> = fresh
                    .iter()
                    .filter_map(|r| r.tx)
                    .filter(|tx| !known.contains(tx))
                    .collect();
                begun.sort_unstable();
                begun.dedup();
                rows.append(&mut fresh);
                if begun.is_empty() {
                    break;
                }
                known.extend(begun.iter().copied());
                let room = COMPLETE_MAX - taken;
                let rest = within(
                    limit,
                    reading,
                    journal::read_tx_page(
                        &mut tx,
                        db,
                        after,
                        pos,
                        &condition,
                        Some(&begun),
                        room + 1,
                        &mut inline,
                    ),
                )
                .await?;
                let Some(end) = rest.last().map(|r| r.id) else {
                    break; // every transaction begun is whole: this read ends here
                };
                if rest.len() > room {
                    // Still more: none of these transactions is known to be whole.
                    cut.extend(begun);
                    rows.extend(rest.into_iter().take(room));
                    break;
                }
                let between = if round < COMPLETE_ROUNDS {
                    let upto = format!("({condition}) AND `id` <= {end}");
                    within(
                        limit,
                        reading,
                        journal::read_tx_page(
                            &mut tx,
                            db,
                            after,
                            pos,
                            &upto,
                            None,
                            room + 1,
                            &mut inline,
                        ),
                    )
                    .await?
                } else {
                    Vec::new()
                };
                if round == COMPLETE_ROUNDS || between.len() > room {
                    // The transactions begun, whole; those between wait for the next read.
                    rows.extend(rest);
                    break;
                }
                // Every row up to `end`: the rest of the transactions begun among them.
                taken += between.len();
                pos = end;
                fresh = between;
            }
        }
        within(limit, reading, async {
            tx.commit().await.map_err(db_err(reading))
        })
        .await?;

        let mut others = Vec::new();
        let mut ours = Vec::new();
        for row in rows {
            if !self.cursor().is_new(row.id) {
                continue;
            }
            if self.channels.contains(row.channel.as_str()) {
                ours.push(row);
            } else {
                others.push(row.id);
            }
        }
        let ordered = journal::in_transactions(ours, &cut);
        // The set read after each row: the cursor's now plus the rows up to it, in this order
        // — after the other channels' rows of this read, which no subscriber lacks.
        let page = CursorPage::new(
            self.cursor().read_set(),
            others
                .iter()
                .copied()
                .chain(ordered.iter().map(|(row, _)| row.id))
                .collect(),
        );
        let skip = others.len();
        let planned = ordered
            .into_iter()
            .enumerate()
            .map(|(i, (row, last))| (i + skip, row, last))
            .collect();
        let Some(forwarded) = self.hand_over(conn, outlet, planned, &page).await? else {
            return Ok(None);
        };
        self.cursor().mark(others, Instant::now());
        self.settle(conn).await?;
        Ok(Some(forwarded))
    }

    /// A read that only finishes transaction `tx`, which the last read began to hand over
    /// and did not finish (its session failed between two shares): its rows not read yet, in
    /// id order, the last marked — before anything else, so that no transaction comes between
    /// its parts. Anything that committed meanwhile committed after it (it was visible to the
    /// last read), and the transactions that came after it in that read's order are read
    /// again by the next. Its rows are immutable once committed: no snapshot is needed. Past
    /// [`COMPLETE_MAX`] rows it stays unfinished, for the next read to go on.
    async fn finish_transaction(
        &mut self,
        conn: &mut Conn,
        outlet: &Outlet,
        after: i64,
        tx: u64,
        through: i64,
    ) -> Result<Option<u64>> {
        // From its row after the last one handed over: its rows before were all handed over
        // (in id order), and a window of rows from the cursor's low end could fill up with
        // them — past 64 gaps the cursor's condition covers read ids too — and never move.
        let (low, condition) = {
            let cursor = self.cursor();
            (cursor.low().max(through), cursor.unread_condition())
        };
        let db = self.database.clone();
        let mut inline = INLINE_BYTES;
        let mut rows = self
            .within(
                "reading the journal",
                journal::read_tx_page(
                    conn,
                    &db,
                    after,
                    low,
                    &condition,
                    Some(&[tx]),
                    COMPLETE_MAX + 1,
                    &mut inline,
                ),
            )
            .await?;
        let whole = rows.len() <= COMPLETE_MAX;
        rows.truncate(COMPLETE_MAX);
        let last_id = rows.last().map_or(through, |row| row.id);
        rows.retain(|row| self.cursor().is_new(row.id));
        log::debug!(
            "sqlnotify: MySQL listener finishes transaction {tx} after a failed read: {} rows",
            rows.len()
        );
        let (ours, others): (Vec<RowMeta>, Vec<RowMeta>) = rows
            .into_iter()
            .partition(|row| self.channels.contains(row.channel.as_str()));
        let others: Vec<i64> = others.into_iter().map(|row| row.id).collect();
        // As in a full read: the other channels' rows first, which no subscriber lacks.
        let page = CursorPage::new(
            self.cursor().read_set(),
            others
                .iter()
                .copied()
                .chain(ours.iter().map(|row| row.id))
                .collect(),
        );
        let (skip, count) = (others.len(), ours.len());
        let planned = ours
            .into_iter()
            .enumerate()
            .map(|(i, row)| (i + skip, row, Some(whole && i + 1 == count)))
            .collect();
        let Some(forwarded) = self.hand_over(conn, outlet, planned, &page).await? else {
            return Ok(None);
        };
        self.cursor().mark(others, Instant::now());
        if !whole {
            self.unfinished = Some((tx, last_id));
            self.more = true;
        }
        self.settle(conn).await?;
        Ok(Some(forwarded))
    }

    /// One read of the journal (see [`Source::read`]).
    async fn read_journal(&mut self, conn: &mut Conn, outlet: &Outlet) -> Result<Option<u64>> {
        if let Tracking::After(after) = self.tracking {
            return self.read_transactions(conn, outlet, after).await;
        }
        // After a full page, the next read goes on after it: the condition spells out at
        // most MAX_RANGES gaps and merges the rest into one range, so a page from the
        // watermark can hold only rows read already, and reading it again would never get
        // past them. Rows below that filled a gap meanwhile are read once a page comes short
        // and the next read starts from the watermark again.
        let resume = self.resume.take();
        let (pos, condition) = {
            let cursor = self.cursor();
            (
                resume.unwrap_or_else(|| cursor.low()),
                cursor.unread_condition(),
            )
        };
        if outlet.stopped() {
            return Ok(None);
        }
        let forwarded = {
            let mut inline = INLINE_BYTES;
            let rows = self
                .within(
                    "reading the journal",
                    journal::read_page(
                        conn,
                        &self.database,
                        pos,
                        &condition,
                        READ_BATCH,
                        &mut inline,
                    ),
                )
                .await?;
            let full = rows.len() == READ_BATCH;
            let last = rows.last().map(|row| row.id);
            let rows: Vec<RowMeta> = rows
                .into_iter()
                .filter(|row| self.cursor().is_new(row.id))
                .collect();
            let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
            // Rows go out in id order: the set read after each is the cursor's plus the page's
            // ids up to it.
            let page = CursorPage::new(self.cursor().read_set(), ids);
            let mut others = Vec::new();
            let mut planned = Vec::new();
            for (index, row) in rows.into_iter().enumerate() {
                if self.channels.contains(row.channel.as_str()) {
                    planned.push((index, row, None));
                } else {
                    others.push(row.id);
                }
            }
            let Some(n) = self.hand_over(conn, outlet, planned, &page).await? else {
                return Ok(None);
            };
            self.cursor().mark(others, Instant::now());
            // One page per read: the shell notes and saves the position (and sends a named
            // consumer's heartbeat) only between reads; a read that went on while pages came
            // full kept a consumer catching up behind a slow subscriber from saving for the
            // whole backlog. The next wait ends at once.
            self.more = full;
            self.resume = last.filter(|_| full);
            n
        };
        self.settle(conn).await?;
        Ok(Some(forwarded))
    }

    /// Places the cursor again after a journal whose ids went back below `high`, the highest
    /// the cursor read, to `newest` (see [`Source::restore`]): after the rows written more
    /// than `ago` before now, which were there when the old journal was last read. A named
    /// consumer's saved position is set back to it.
    async fn place_again(
        &mut self,
        conn: &mut Conn,
        consumer: Option<&ConsumerParams>,
        newest: i64,
        high: i64,
        ago: Option<Duration>,
    ) -> Result<()> {
        let db = self.database.clone();
        let low = self
            .within(
                "placing the journal cursor again",
                journal::written_before(conn, &db, ago, newest),
            )
            .await?;
        log::warn!(
            "sqlnotify: the MySQL journal's newest id is {newest}, below {high}, the highest the listener had read: its ids went back (a failover to a replica that was behind, a restore, the journal truncated); reading again after id {low} ({}) — events the old journal had and this one lacks are lost, some may come twice",
            ago.map_or_else(
                || format!("at most {} ids back: when the position was last read is not known here", journal::MAX_LOOKBACK_IDS),
                |ago| format!("written more than {ago:?} ago")
            )
        );
        let cursor = Cursor::new(low, self.gap_timeout);
        if let Some(consumer) = consumer {
            self.within(
                "placing the consumer's position again",
                consumers::reset(conn, &db, &consumer.name, &cursor.position()),
            )
            .await?;
        }
        (self.more, self.resume, self.unfinished, self.held) = (false, None, None, None);
        self.settled.set(low);
        self.cursor = Some(cursor);
        Ok(())
    }

    /// Waits for `handing_over`, a hand-over that may wait for room in the pipeline (a slow
    /// subscriber), pinging `conn` every [`query_limit`](Self::query_limit) meanwhile: the
    /// server ends a connection that sends nothing for its `wait_timeout` (six health checks),
    /// and a named consumer's lease with it, while this listener is alive and only waiting.
    async fn keeping_open<T>(
        &self,
        conn: &mut Conn,
        handing_over: impl Future<Output = T>,
    ) -> Result<T> {
        let mut handing_over = std::pin::pin!(handing_over);
        loop {
            match tokio::time::timeout(self.query_limit, &mut handing_over).await {
                Ok(done) => return Ok(done),
                Err(_) => {
                    let what = "keeping the listener's connection open while waiting for room";
                    self.within(what, async { conn.ping().await.map_err(db_err(what)) })
                        .await?
                }
            }
        }
    }

    /// Hands the rows a read planned over, in their order, share by share (see
    /// [`READ_BYTES`]): fetches the payloads of a share not read along, hands it to `outlet`,
    /// marks its rows read,
    /// then goes on to the next — so a read holds one share's payloads at a time, and a
    /// transaction larger than a share goes over as it is fetched, its marks as planned (its
    /// last row marked last). Each row comes with its place in `page` and its mark. A row
    /// deleted since it was planned has nothing to hand over: it is skipped and left unread
    /// (a gap that holds no row, given up after the gap timeout). Returns how many events went,
    /// `None` when told to stop while waiting for room (the rows of the shares handed over
    /// count as read, the rest do not). A failure between two shares of one transaction leaves
    /// it [`unfinished`](Self::finish_transaction) for the next read.
    async fn hand_over(
        &mut self,
        conn: &mut Conn,
        outlet: &Outlet,
        planned: Vec<(usize, RowMeta, Option<bool>)>,
        page: &Arc<CursorPage>,
    ) -> Result<Option<u64>> {
        let mut forwarded = 0;
        let mut rows = planned.into_iter();
        while !rows.as_slice().is_empty() {
            // Payloads read along are held already: only the others count.
            let lens = rows
                .as_slice()
                .iter()
                .map(|(_, row, _)| if row.payload.is_some() { 0 } else { row.len });
            let take = journal::share_len(lens, SHARE_BYTES, READ_BATCH);
            let share: Vec<_> = rows.by_ref().take(take).collect();
            let tail = share
                .last()
                .and_then(|(_, row, _)| row.tx.map(|tx| (tx, row.id)));
            let ids: Vec<i64> = share
                .iter()
                .filter(|(_, row, _)| row.payload.is_none())
                .map(|(_, row, _)| row.id)
                .collect();
            let db = self.database.clone();
            let mut payloads = self
                .within(
                    "reading the journal's payloads",
                    journal::fetch_payloads(conn, &db, &ids),
                )
                .await?;
            let now = SystemTime::now();
            let mut batch = Vec::with_capacity(share.len());
            let mut handed = Vec::with_capacity(share.len());
            for (index, row, last) in share {
                let Some(payload) = row.payload.or_else(|| payloads.remove(&row.id)) else {
                    log::warn!(
                        "sqlnotify: MySQL journal row {} was deleted while it was being read; its event is lost",
                        row.id
                    );
                    continue;
                };
                handed.push(row.id);
                batch.push(RawNotification {
                    channel: self.shared_name(row.channel),
                    payload,
                    received_at: now,
                    sequence: Some(row.id),
                    events: 1,
                    transaction: row.tx,
                    last_in_transaction: last,
                    read_point: Some(ReadPoint::in_page(page.clone(), index)),
                    decoded: None,
                    part: 0,
                    read_bytes: 0,
                    extra_units: 0,
                });
            }
            // Rows count as read only once handed over.
            match self.keeping_open(conn, outlet.forward(batch)).await? {
                Some(n) => forwarded += n,
                None => return Ok(None),
            }
            self.cursor().mark(handed, Instant::now());
            // Should the next share's fetch fail, the next read finishes this transaction.
            self.unfinished = tail.filter(|&(tx, _)| {
                rows.as_slice()
                    .first()
                    .is_some_and(|(_, next, _)| next.tx == Some(tx))
            });
        }
        self.unfinished = None;
        Ok(Some(forwarded))
    }
}

impl Source for MysqlSource {
    type Conn = Conn;
    type Position = Position;
    const NAME: &'static str = "MySQL";

    async fn connect(&mut self, _: &Outlet) -> Result<Conn> {
        let mut conn = self
            .within("connecting the listener to MySQL", async {
                self.opts
                    .connect()
                    .await
                    .map_err(db_err("connecting the listener to MySQL"))
            })
            .await?;
        let configure = format!(
            "SET SESSION autocommit = 1, SESSION wait_timeout = {}",
            self.idle_limit.as_secs()
        );
        self.within("configuring the listener connection", async {
            // Autocommit, whatever `init_connect` set: a transaction left open would hold
            // one snapshot, and the polls would never see a new row. The `wait_timeout`: a
            // process whose machine went silent leaves this connection, and its consumer's
            // lease (`GET_LOCK`), to the server, which otherwise waited 8 hours (its default)
            // before ending it — while every other member of the group stood by.
            conn.query_drop(configure)
                .await
                .map_err(db_err("configuring the listener connection"))
        })
        .await?;
        Ok(conn)
    }

    /// At a named consumer's saved watermark, else at "now" (rows already committed are
    /// marked read; rows of transactions still running are delivered when they commit). A new
    /// consumer saves that position right away — the rows read, and the gaps that may still
    /// fill — so a quick restart neither replays the history it never saw nor skips a
    /// transaction that was running at its first start. What a returning consumer missed stays
    /// recorded until the save after it was returned: a failure placing the cursor after it
    /// was read leaves it for the next attempt to report.
    async fn place(
        &mut self,
        conn: &mut Conn,
        consumer: Option<&ConsumerParams>,
    ) -> Result<Vec<String>> {
        // A new cursor: the next read starts from its watermark.
        (self.more, self.resume, self.unfinished) = (false, None, None);
        self.named = consumer.is_some();
        let (db, gap_timeout) = (&*self.database, self.gap_timeout);
        let channels = &self.channel_list;
        let placing = async {
            let saved = match consumer {
                Some(consumer) => {
                    consumers::ensure(conn, db).await?;
                    consumers::reactivate(conn, db, consumer, channels).await?
                }
                None => None,
            };
            if let Some((position, missed)) = saved {
                log::debug!(
                    "sqlnotify: MySQL consumer resumes after journal id {}",
                    position.low
                );
                let now = Instant::now();
                let mut cursor = Cursor::resume(&position, gap_timeout, now);
                // Above what the saved position says was read: below, the gaps it kept age
                // from now, and every other id was read.
                for (id, age) in journal::gap_ages(conn, db, cursor.high()).await? {
                    cursor.noticed(id, now.checked_sub(age).unwrap_or(now));
                }
                return Ok((cursor, missed, true));
            }
            let now = Instant::now();
            let (low, ids) = journal::placement(conn, db, gap_timeout).await?;
            let head = ids.last().copied().unwrap_or(low);
            let mut cursor = Cursor::new(low, gap_timeout);
            cursor.mark(ids, now);
            cursor.advance(now);
            if let Some(consumer) = consumer {
                consumers::insert(conn, db, consumer, channels, &cursor.position()).await?;
            }
            log::debug!("sqlnotify: MySQL listener starts after journal id {head}");
            Ok::<_, Error>((cursor, Missed::default(), false))
        };
        let (cursor, missed, resumed) =
            within(self.query_limit, "placing the journal cursor", placing).await?;
        // A saved position past the journal's newest id (its ids went back since it was
        // saved) is placed again by `restore`, which runs next. When this process last read
        // what the position says, nobody here knows (another process, before a restart): the
        // look-back is then as long as it may be.
        self.last_read = (!resumed).then(Instant::now);
        self.tracking = within(
            self.query_limit,
            "reading how the journal records transactions",
            journal::tracking(conn, &self.database),
        )
        .await?;
        self.settled.set(cursor.low());
        self.cursor = Some(cursor);
        self.set_reported(missed.recorded);
        Ok(missed.channels)
    }

    /// `GET_LOCK` on the listener's own connection, named after the database and the
    /// consumer: the server releases it when that connection ends (the process killed, its
    /// connection killed), and position saves run on the same connection.
    async fn lease(&mut self, conn: &mut Conn, consumer: &ConsumerParams) -> Result<bool> {
        let taken: Option<Option<i64>> = self
            .within(
                "taking the consumer's lease",
                async {
                    // Lock names are at most 64 characters: a hash of database and name.
                    conn.exec_first(
                        "SELECT GET_LOCK(CONCAT('sqlnotify:', LEFT(SHA2(CONCAT(?, '.', ?), 256), 48)), 0)",
                        (&*self.database, &consumer.name),
                    )
                    .await
                    .map_err(db_err(format!(
                        "taking the lease of consumer {:?}",
                        consumer.name
                    )))
                },
            )
            .await?;
        Ok(taken.flatten() == Some(1))
    }

    async fn lease_holder(&mut self, conn: &mut Conn, consumer: &ConsumerParams) -> Option<String> {
        let found = self
            .within("looking for the holder of the consumer's lease", async {
                let id: Option<Option<u64>> = conn
                    .exec_first(
                        "SELECT IS_USED_LOCK(CONCAT('sqlnotify:', LEFT(SHA2(CONCAT(?, '.', ?), 256), 48)))",
                        (&*self.database, &consumer.name),
                    )
                    .await
                    .map_err(db_err("looking for the holder of a consumer's lease"))?;
                let Some(id) = id.flatten() else {
                    return Ok(None);
                };
                // Shown only to an account with PROCESS (or the holder's own).
                let who: Option<(Option<String>, Option<String>)> = conn
                    .exec_first(
                        "SELECT USER, HOST FROM information_schema.PROCESSLIST WHERE ID = ?",
                        (id,),
                    )
                    .await
                    .map_err(db_err("looking for the holder of a consumer's lease"))?;
                Ok(Some(match who {
                    Some((user, host)) => format!(
                        "held by connection {id} (user {:?}, host {:?})",
                        crate::sql::comment(user.as_deref().unwrap_or("?")),
                        crate::sql::comment(host.as_deref().unwrap_or("?"))
                    ),
                    None => format!("held by connection {id}"),
                }))
            })
            .await;
        found.unwrap_or_else(|e| {
            log::debug!("sqlnotify: {e}");
            None
        })
    }

    async fn read(&mut self, conn: &mut Conn, outlet: &Outlet) -> Result<Option<u64>> {
        let began = Instant::now();
        let read = self.read_journal(conn, outlet).await;
        if matches!(read, Ok(Some(_))) {
            self.last_read = Some(began);
        }
        read
    }

    /// Checks that the journal's ids did not go back below what the cursor read: the purge
    /// keeps the newest row, so a newest id below the highest read means the journal is not
    /// the one read — a failover to a replica that was behind, a restore, the journal
    /// truncated, its newest rows deleted and `AUTO_INCREMENT` set back — and the ids it
    /// gives out again would all look read (the cursor is kept across sessions). Then the
    /// cursor is placed again after the rows written before the last read of the old journal
    /// (and a gap timeout before, for transactions that wrote before it and committed after),
    /// so what was written since is delivered — with some rows delivered already, again —
    /// and a named consumer's saved position is set back to it (this runs right after
    /// `place` too: a saved position past the newest id is placed again the same way); every
    /// channel is returned,
    /// announced as a `Status::Gap`: rows the old journal had and the new one lacks are lost.
    async fn restore(
        &mut self,
        conn: &mut Conn,
        consumer: Option<&ConsumerParams>,
    ) -> Result<Vec<String>> {
        let Some(high) = self.cursor.as_ref().map(Cursor::high) else {
            return Ok(Vec::new());
        };
        let db = self.database.clone();
        let newest = self
            .within(
                "reading the journal's newest id",
                journal::newest(conn, &db),
            )
            .await?;
        if newest >= high {
            return Ok(Vec::new());
        }
        let ago = self
            .last_read
            .map(|at| at.elapsed().saturating_add(self.gap_timeout));
        self.place_again(conn, consumer, newest, high, ago).await?;
        Ok(self.channel_list.clone())
    }

    fn position(&self) -> Option<Position> {
        self.cursor.as_ref().map(Cursor::position)
    }

    fn missed(&mut self) -> Vec<String> {
        if std::mem::take(&mut self.purged) {
            self.channel_list.clone()
        } else {
            Vec::new()
        }
    }

    async fn wait(&mut self, _: &mut Conn, timeout: Duration) -> Result<bool> {
        if std::mem::take(&mut self.more) {
            return Ok(true); // the last read left a full page behind it
        }
        self.wake.wait(timeout).await;
        Ok(true) // every poll reads: that is how MySQL learns of new rows
    }

    async fn check(&mut self, conn: &mut Conn, _: Duration) -> Result<()> {
        self.within("checking the listener connection", async {
            conn.ping()
                .await
                .map_err(db_err("checking the listener connection"))
        })
        .await
    }

    async fn save(
        &mut self,
        conn: &mut Conn,
        consumer: &ConsumerParams,
        position: &Position,
    ) -> Result<Vec<String>> {
        let reported = self.reported();
        let missed = self
            .within(
                "saving the consumer position",
                consumers::save_running(
                    conn,
                    &self.database,
                    consumer,
                    &self.channel_list,
                    position,
                    reported.as_deref(),
                ),
            )
            .await?;
        self.set_reported(missed.recorded);
        Ok(missed.channels)
    }

    fn final_save(&self) -> FinalSave<Position> {
        let (opts, database) = (self.opts.clone(), self.database.clone());
        let reported = self.reported.clone();
        Box::new(move |name, position| {
            Box::pin(async move {
                let mut conn = opts
                    .connect()
                    .await
                    .map_err(db_err("connecting to save the consumer position"))?;
                let reported = reported.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let saved =
                    consumers::save(&mut conn, &database, &name, &position, reported.as_deref())
                        .await
                        .map(|_| ());
                let _ = conn.disconnect().await;
                saved
            })
        })
    }

    async fn close(&mut self, conn: Conn) {
        let _ = conn.disconnect().await;
    }

    fn pace(&self) -> Pace {
        Pace {
            active: Duration::from_millis(1),
            idle: Duration::from_millis(25),
            stay_active: Duration::from_millis(500),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_s_idle_limit_is_six_health_checks_in_whole_seconds_at_least_ten() {
        assert_eq!(idle_limit(Duration::from_secs(10)), Duration::from_secs(60));
        assert_eq!(idle_limit(Duration::from_millis(100)), MIN_IDLE_LIMIT);
        assert_eq!(
            idle_limit(Duration::from_millis(2_100)),
            Duration::from_secs(13)
        );
        assert_eq!(
            idle_limit(Duration::MAX),
            Duration::from_secs(31_536_000),
            "the server's largest wait_timeout"
        );
    }
}
