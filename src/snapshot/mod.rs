//! Snapshot, then stream (issue 15 §2): the current rows of a watched table, then every change
//! committed after them — no gap and no duplicate — in one feed.
//!
//! How it holds together: the feed's subscription to the table's channels is in place
//! *before* the dialect opens its consistent read, so every change that commits after the
//! read was taken reaches the subscription; changes the read already reflects (a [`Fence`]
//! tells which: on PostgreSQL the read's snapshot decides by transaction id, on SQLite the
//! highest journal id given when the read was taken, on MySQL the journal ids the read sees
//! above the listener's watermark) are skipped when they arrive. While the rows stream, the
//! live events wait in the subscription's buffer (and, when it is full, the pipeline waits:
//! nothing is dropped), so they come after the last snapshot row. Rows are read in key order
//! (on MySQL in an index's order when no index has the key's: see `src/mysql/snapshot.rs`) in
//! chunks, each sent only when the feed's reader has room, so memory stays flat however large
//! the table.
//!
//! A read holds its consistent view open until its last row went out — a PostgreSQL snapshot
//! (vacuum's horizon), a MySQL consistent read (purge), a SQLite read transaction (the
//! checkpoint) — so a read nobody will finish is dropped where it stands: when the feed is
//! dropped, and when the notifier stops ([`Notifier::stop`](crate::Notifier::stop)), which
//! then ends the feed with [`Error::NotRunning`](crate::Error::NotRunning) after the rows it
//! got (never `None` alone after part of the table).

pub(crate) mod feeder;
pub(crate) mod fence;
pub(crate) mod reader;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use actix::{Addr, WeakAddr};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::event::{ChangeEvent, Channel};
use crate::filter::Filter;

pub(crate) use feeder::Feeder;

/// Rows read per chunk unless [`Snapshot::chunk_rows`] says otherwise.
pub const DEFAULT_CHUNK_ROWS: usize = 1_000;

/// What a snapshot feed reads: the current rows of one watched table (narrowed by filters),
/// then the changes of every watch on that table.
///
/// ```
/// use sqlnotify::{Filter, Snapshot};
///
/// let s = Snapshot::new("orders").filter(Filter::eq("customer_id", 42)).chunk_rows(500);
/// # let _ = s;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub(crate) schema: Option<String>,
    pub(crate) table: String,
    /// The labels of the table's watches it covers; empty: its watches without a label.
    pub(crate) labels: Vec<String>,
    pub(crate) filters: Vec<Filter>,
    pub(crate) chunk_rows: usize,
    pub(crate) buffer: usize,
}

impl Snapshot {
    /// The rows and changes of `table` (`"schema.table"`, or a table in the database's default
    /// schema), from its watches without a channel label.
    pub fn new(table: impl Into<String>) -> Self {
        let (schema, table) = crate::sql::split_table(table.into());
        Snapshot {
            schema,
            table,
            labels: Vec::new(),
            filters: Vec::new(),
            chunk_rows: DEFAULT_CHUNK_ROWS,
            buffer: crate::subscription::DEFAULT_BUFFER,
        }
    }

    /// Sets the schema explicitly (for table names that contain a dot).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// The table's watches with this channel label instead.
    pub fn channel_label(mut self, label: impl Into<String>) -> Self {
        self.labels = vec![label.into()];
        self
    }

    /// The table's watches with any of these channel labels instead — one per operation, say,
    /// since a label names one table and operation: one feed of the rows, then the changes of
    /// every one of those watches. No label at all: the watches without a label.
    pub fn channel_labels<I, S>(mut self, labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.labels = labels.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a filter, applied to the snapshot's rows and to the changes after them; all must
    /// match (AND). A change whose event does not carry a filtered column does not match (a
    /// DELETE watch that carries only the key, say): carry the column on every watch of the
    /// table to see those.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filters.push(filter);
        self
    }

    /// Rows read from the database per round trip (default 1,000; from 1 to
    /// [`MAX_BUFFER`](crate::MAX_BUFFER)).
    pub fn chunk_rows(mut self, rows: usize) -> Self {
        self.chunk_rows = rows.clamp(1, crate::MAX_BUFFER);
        self
    }

    /// How many events may wait for the feed's reader (default 1,024; from 1 to
    /// [`MAX_BUFFER`](crate::MAX_BUFFER)). Live changes — of every channel the notifier
    /// routes, not only the table's — wait in as many again while the rows stream; beyond
    /// that the pipeline waits.
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events.clamp(1, crate::MAX_BUFFER);
        self
    }
}

/// How far a snapshot has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotProgress {
    /// Rows of the snapshot read so far (before filters), backfills included.
    pub rows: u64,
    /// Rows the snapshot holds, counted in the same consistent read (known once it is open),
    /// plus those of the backfills opened since.
    pub total: Option<u64>,
    /// Whether the snapshot's read is over: set just before its last row (the one that
    /// [ends the snapshot](ChangeEvent::ends_snapshot)) is handed to the feed, so a reader that
    /// got that row sees it done; what follows are changes.
    pub done: bool,
}

/// Shared between the feeder and the feed: what the snapshot read so far.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    rows: AtomicU64,
    total: AtomicU64,
    /// Whether the first read is open (`total` counts its rows).
    opened: AtomicBool,
    done: AtomicBool,
    /// Set when the notifier's stop cut a read (the snapshot or a backfill) before its last
    /// row went out: the feed ends with [`Error::NotRunning`](crate::Error::NotRunning) once
    /// it has handed over the rows before (taken back by the feed when it does).
    cut: AtomicBool,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Progress::default()
    }

    fn get(&self) -> SnapshotProgress {
        SnapshotProgress {
            rows: self.rows.load(Ordering::Relaxed),
            total: self
                .opened
                .load(Ordering::Acquire)
                .then(|| self.total.load(Ordering::Relaxed)),
            done: self.done.load(Ordering::Acquire),
        }
    }
}

/// The events of a [`Snapshot`]: first the table's current rows
/// ([`ChangeEvent::is_snapshot`] is true; they report the table's INSERT watch, or its first
/// watch when there is none), then its changes from every watch on the table, in commit
/// order. Dropping the feed ends its subscription, and a read still open (the snapshot's or a
/// backfill's) with it.
#[derive(Debug)]
pub struct SnapshotFeed {
    rx: mpsc::Receiver<Result<ChangeEvent>>,
    progress: Arc<Progress>,
    /// Weak: the feeder lives as long as its subscription in the registry (so the feed ends
    /// when the notifier stops) or until the feed is dropped.
    feeder: WeakAddr<Feeder>,
    channel: Arc<Channel>,
}

/// Ends the feeder and with it the subscription, also while no event comes its way.
impl Drop for SnapshotFeed {
    fn drop(&mut self) {
        if let Some(feeder) = self.feeder.upgrade() {
            feeder.do_send(feeder::Stop);
        }
    }
}

impl SnapshotFeed {
    pub(crate) fn new(
        rx: mpsc::Receiver<Result<ChangeEvent>>,
        progress: Arc<Progress>,
        feeder: Addr<Feeder>,
        channel: Arc<Channel>,
    ) -> Self {
        SnapshotFeed {
            rx,
            progress,
            feeder: feeder.downgrade(),
            channel,
        }
    }

    /// The next event; `None` once the notifier stopped. An error from the first snapshot
    /// means it could not be read, and the feed ends after it (nothing after an incomplete
    /// snapshot could be trusted); an error from a [`backfill`](Self::backfill) means that
    /// backfill stopped, and the changes go on — the rows it sent before the error are
    /// backfilled rows all the same (the changes they reflect are not passed on for their keys;
    /// those of the keys it did not get to are).
    ///
    /// [`Notifier::stop`](crate::Notifier::stop) does not wait for a snapshot or a backfill
    /// still being read: it ends the read (its transaction and connection) where it stands,
    /// and the feed hands over the rows read before, then
    /// [`Error::NotRunning`](crate::Error::NotRunning), then `None` — so a read the stop cut
    /// short never passes for a whole one. A feed whose reads were all over ends with `None`
    /// alone.
    pub async fn next(&mut self) -> Option<Result<ChangeEvent>> {
        match self.rx.recv().await {
            Some(item) => Some(item),
            // Once: the end follows.
            None if self.progress.cut.swap(false, Ordering::AcqRel) => {
                Some(Err(crate::Error::NotRunning))
            }
            None => None,
        }
    }

    /// How far the snapshot (and any backfill) has come.
    pub fn progress(&self) -> SnapshotProgress {
        self.progress.get()
    }

    /// Sends the table's current rows again — those `filters` select (a key range, say, with
    /// [`Filter::ge`] and [`Filter::le`] on the key; none: every row), within the feed's own
    /// filters — as snapshot events, while changes keep flowing. Returns once the backfill
    /// is queued; its rows follow the changes already passed on, and read them from the feed
    /// as usual.
    ///
    /// The rule for a key changed during the backfill: the backfilled row is the row as of the
    /// backfill's consistent read, and it never overtakes a later change of its key — changes
    /// committed after that read come after the row. A change committed *before* the read
    /// and not passed on yet is not passed on at all for the keys whose rows the backfill
    /// sent: the row already reflects it. So for each backfilled key the feed shows the
    /// changes it had shown, then the row, then the changes after it — never an older state
    /// after a newer one. A change of a key the backfill did *not* send (the row was deleted
    /// before its read, or no longer matches its filters) is passed on as usual, since only
    /// the change tells the feed. (A feed remembers the keys of its last 64 backfills, within
    /// 64 MiB; a change a forgotten backfill reflects comes after its row, like a change of
    /// a key the backfill did not send.)
    ///
    /// A filter on a column the watches do not carry is refused with
    /// [`Error::UnknownFilterColumn`](crate::Error::UnknownFilterColumn).
    pub fn backfill(&self, filters: impl IntoIterator<Item = Filter>) -> Result<()> {
        let filters: Vec<Filter> = filters.into_iter().collect();
        crate::filter::check_columns(&self.channel, &filters)?;
        let Some(feeder) = self.feeder.upgrade().filter(|f| f.connected()) else {
            return Err(crate::Error::Unsupported {
                what: format!(
                    "a backfill of {}.{}: the feed has ended",
                    self.channel.schema(),
                    self.channel.table()
                ),
            });
        };
        // (past the mailbox's capacity, which bounds the live events only)
        feeder.do_send(feeder::Backfill { filters });
        Ok(())
    }
}
