//! Where an event stands in the journal read that delivered it (PostgreSQL's durable and poll
//! tiers): what a client needs to resume a stream right after that event.
//!
//! PostgreSQL's journal ids are not in commit order (see `src/postgres/journal.rs`), so "the
//! rows after id 17" is not "what came after event 17". What is exact: the listener reads the
//! journal in a sequence of reads, each with its own snapshot (a long one in several
//! statements, all reading what that snapshot saw), and each read
//! delivers the transactions it sees that an earlier read did not, grouped by transaction and
//! ordered by each transaction's last journal id. So an event `E` of read `R` was preceded by
//! exactly
//!
//! * every transaction visible to the read before `R` (delivered by then), and
//! * the transactions `R` delivered before `E`'s: visible to `R`, not to the read before, with
//!   a smaller last journal id — and the rows of `E`'s own transaction up to `E`.
//!
//! Both snapshots (PostgreSQL's text form, `xmin:xmax:xip,…`, compact unless many transactions
//! run at once) and the last id of `E`'s transaction are what a [`ReadPoint`] holds; with `E`'s
//! own journal id they name the point exactly, and the SQL that replays what came after it
//! uses `pg_visible_in_snapshot` on them.

use std::sync::Arc;

/// The snapshots of one journal read and of the read before it, in PostgreSQL's text form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSnapshots {
    /// The snapshot of the previous complete read: everything visible to it was delivered
    /// before this read.
    pub(crate) before: String,
    /// This read's snapshot.
    pub(crate) during: String,
}

impl ReadSnapshots {
    /// Snapshots of a read and of the one before it.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn new(before: String, during: String) -> Arc<Self> {
        Arc::new(ReadSnapshots { before, during })
    }
}

/// Where a journal row stands in the read that delivered it — on PostgreSQL that read's
/// snapshots (shared by its rows) and the last journal id of the row's transaction (its place
/// in the read); on MySQL / MariaDB the batch the cursor handed it over in and its place there
/// (`src/read_set.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPoint {
    pub(crate) at: PointAt,
}

/// The kinds of [`ReadPoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PointAt {
    /// A PostgreSQL journal read.
    Snapshots {
        read: Arc<ReadSnapshots>,
        group: i64,
    },
    /// A batch of a gap-aware cursor (MySQL / MariaDB): the row is its `index`-th.
    Cursor {
        page: Arc<crate::read_set::CursorPage>,
        index: usize,
    },
}

impl ReadPoint {
    /// The point of a row whose transaction's last journal id is `group`, in read `read`.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn new(read: Arc<ReadSnapshots>, group: i64) -> Self {
        ReadPoint {
            at: PointAt::Snapshots { read, group },
        }
    }

    /// The point of the `index`-th row of a cursor's batch.
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    pub(crate) fn in_page(page: Arc<crate::read_set::CursorPage>, index: usize) -> Self {
        ReadPoint {
            at: PointAt::Cursor { page, index },
        }
    }
}

/// Whether `text` is a PostgreSQL snapshot in text form (`xmin:xmax:xip,…`) that the server's
/// `pg_snapshot` input takes: digits only, `0 < xmin <= xmax`, and running ids in
/// `[xmin, xmax)` in ascending order. What a client sends back is checked before it goes
/// anywhere near SQL, so that a forged or damaged position is "too old" (a `reset`), not a
/// failing query.
#[cfg_attr(not(any(feature = "postgres", feature = "web")), allow(dead_code))]
pub(crate) fn is_snapshot_text(text: &str) -> bool {
    let mut parts = text.splitn(3, ':');
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (Some(xmin), Some(xmax), Some(xip)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Some(xmin), Some(xmax)) = (number(xmin), number(xmax)) else {
        return false;
    };
    if xmin == 0 || xmin > xmax {
        return false;
    }
    if xip.is_empty() {
        return true;
    }
    let mut last = xmin;
    xip.split(',').all(|id| {
        number(id).is_some_and(|id| {
            let ok = id >= last && id < xmax;
            last = id;
            ok
        })
    })
}

/// The later of two snapshots of one cluster, which therefore sees everything the other one
/// sees: a transaction visible to a snapshot had committed when it was taken, and is visible
/// to every snapshot taken after. Later means a higher `xmax` (transactions started since),
/// else a higher `xmin` (old ones finished), else fewer still running.
#[cfg_attr(not(any(feature = "web", feature = "postgres")), allow(dead_code))]
pub(crate) fn later_snapshot<'a>(a: &'a str, b: &'a str) -> &'a str {
    let rank = |text: &str| {
        let mut parts = text.splitn(3, ':');
        let xmin: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let xmax: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let running = parts
            .next()
            .map_or(0, |p| p.split(',').filter(|x| !x.is_empty()).count());
        (xmax, xmin, std::cmp::Reverse(running))
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_later_snapshot_is_the_one_taken_after() {
        assert_eq!(later_snapshot("5:9:6", "5:12:"), "5:12:");
        assert_eq!(later_snapshot("7:9:", "5:9:6"), "7:9:");
        assert_eq!(later_snapshot("5:9:6,7", "5:9:7"), "5:9:7");
        assert_eq!(later_snapshot("5:9:7", "5:9:7"), "5:9:7");
    }

    #[test]
    fn snapshot_texts_are_what_the_servers_pg_snapshot_input_takes() {
        for ok in ["1:1:", "100:105:101,103", "7:9:8", "5:9:5,6,6", "5:5:"] {
            assert!(is_snapshot_text(ok), "{ok}");
        }
        for bad in [
            "",
            "1:1",
            "1::",
            ":1:",
            "a:1:",
            "1:1:2,",
            "1:1:,2",
            "1:1:2;3",
            "1:1:2'",
            "-1:1:",
            "1:1:2:3",
            // digits, but no snapshot: xmin 0, xmin above xmax, a running id outside
            // [xmin, xmax) or out of order, a number past u64
            "0:5:",
            "9:5:",
            "5:9:4",
            "5:9:9",
            "5:9:7,6",
            "5:18446744073709551616:",
        ] {
            assert!(!is_snapshot_text(bad), "{bad}");
        }
    }
}
