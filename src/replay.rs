//! The dialect boundary of resuming a stream (the SSE endpoint's `Last-Event-ID`): where a
//! replay of the journal for a client stands ([`ReplayFrom`]) and what a dialect reads for it
//! ([`Replay`]).

use crate::event::RawNotification;
use crate::read_set::ReadSet;
use crate::snapshot::fence::Fence;

/// About the most bytes of payloads one page of a replay holds (it ends with the row that
/// takes it past them, however large — SQLite's before that row, unless it is the first): a
/// page is read whole and written to its client at once, and many clients may resume at the
/// same time — counted in rows alone (`replay_page`, 500 by default), a page of journal rows
/// of a few MiB each held hundreds of MiB per client.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) const PAGE_BYTES: usize = 8 << 20;

/// Where a client's replay of the journal stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "web"), allow(dead_code))]
pub(crate) enum ReplayFrom {
    /// A journal in commit order (SQLite): the rows after journal id `cursor`; every row
    /// after `since` must still be there.
    Journal { since: i64, cursor: i64 },
    /// After a row of a PostgreSQL journal read (see `src/read_point.rs`): that read's
    /// snapshots, the last journal id of the row's transaction (`group`) and the row's id.
    /// `page`: where the replay is, once its first page was read.
    Read {
        before: String,
        during: String,
        group: i64,
        id: i64,
        page: Option<Box<ReadPage>>,
    },
    /// After a row of a journal read by a gap-aware cursor (MySQL / MariaDB, see
    /// `src/read_set.rs`): the ids the client had (`read`, grown by the replay's pages) and
    /// where the next page starts (`pos`: the last id the replay read).
    Cursor { read: ReadSet, pos: Option<i64> },
}

/// How far a PostgreSQL replay got: the snapshot its first page was read in (every page reads
/// what that snapshot saw, so the pages add up to one consistent read), the key after which
/// the next page starts — (read after the client's read, a transaction's last id, an id) —
/// and the transactions known to end later than the last page's window (xid, last id), so
/// that the pages do not look them up again.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "web"), allow(dead_code))]
pub(crate) struct ReadPage {
    pub snapshot: String,
    pub key: (bool, i64, i64),
    pub ends_later: Vec<(String, i64)>,
}

/// What a journal holds after a position, for a client that resumes from it.
#[derive(Debug)]
#[cfg_attr(not(feature = "web"), allow(dead_code))]
pub(crate) enum Replay {
    /// Rows after the position on the channels asked for, in the order the listener delivers
    /// them.
    Rows {
        /// The rows.
        rows: Vec<RawNotification>,
        /// Where the next page starts; `None` when this was the last one.
        next: Option<ReplayFrom>,
        /// The live events the replay read so far covers (a client drops them when they
        /// arrive live).
        fence: Fence,
    },
    /// Rows after the position may be gone (trimmed by retention), or the position is not one
    /// of this journal's: the client must start over.
    TooOld,
    /// This dialect or tier cannot resume from a position.
    Unsupported,
}

/// Where the journal stands as a stream starts live: the first `id:` it sends, so that a
/// client that drops before its first event resumes from there instead of missing what was
/// committed meanwhile. Taken after the stream's subscriptions were made, so that every change
/// after it reaches the stream live or through a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "web"), allow(dead_code))]
pub(crate) enum Head {
    /// A journal in commit order (SQLite): its last id given out.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    Journal(i64),
    /// PostgreSQL's journal tiers: a snapshot; the client has every transaction it saw.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Snapshot(String),
}
