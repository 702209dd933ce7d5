//! The fence between a snapshot and the stream after it: which live events a snapshot already
//! reflects (and must not be delivered again) and which come after it.
//!
//! A fence only has to be right for the events that can still reach a feed once its
//! subscription is in place; the dialects' snapshot readers say why theirs is.

use crate::event::ChangeEvent;

/// Where a snapshot was taken, in the terms of the events that may still arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    not(all(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code)
)]
pub(crate) enum Fence {
    /// A PostgreSQL snapshot (`pg_current_snapshot()`): every transaction below `xmin` had
    /// finished, none from `xmax` on had started, and of those between, the ones in `running`
    /// were still running. A transaction is in the snapshot when it finished before it was
    /// taken, that is when it is neither at or past `xmax` nor in `running`.
    Postgres {
        xmin: u64,
        xmax: u64,
        running: Vec<u64>,
    },
    /// A journal in commit order (SQLite): the snapshot saw every row up to `head`.
    Journal { head: i64 },
    /// A journal whose ids are not in commit order (MySQL / MariaDB: they are taken at insert
    /// time), read in one consistent snapshot: the snapshot reflects every row up to `low`
    /// that may still arrive, and above `low` exactly the rows whose ids are in `visible`
    /// (sorted, no duplicates) — those its read saw. Why no row at or below `low` can arrive
    /// unreflected, and what bounds `visible`: `mysql/snapshot.rs`.
    Visible { low: i64, visible: Vec<i64> },
    /// The same kind of journal, and the exact set of ids a client has: those it had when it
    /// resumed, and those the journal replay for it sent (`src/read_set.rs`).
    Set(crate::read_set::ReadSet),
}

impl Fence {
    /// Parses PostgreSQL's text form of a snapshot, `xmin:xmax:xip,xip,…`.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub fn parse_postgres(text: &str) -> Option<Fence> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let running = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        (xmin <= xmax).then_some(Fence::Postgres {
            xmin,
            xmax,
            running,
        })
    }

    /// PostgreSQL's text form of a [`Fence::Postgres`] (`xmin:xmax:xip,…`).
    #[cfg_attr(not(all(feature = "postgres", feature = "web")), allow(dead_code))]
    pub fn postgres_text(&self) -> Option<String> {
        match self {
            Fence::Postgres {
                xmin,
                xmax,
                running,
            } => {
                let running: Vec<String> = running.iter().map(u64::to_string).collect();
                Some(format!("{xmin}:{xmax}:{}", running.join(",")))
            }
            Fence::Journal { .. } | Fence::Visible { .. } | Fence::Set(_) => None,
        }
    }

    /// A [`Fence::Visible`] from the ids a read saw above `low` (in any order; those at or
    /// below `low` are dropped, being covered anyway).
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    pub fn visible(low: i64, ids: impl IntoIterator<Item = i64>) -> Fence {
        let mut visible: Vec<i64> = ids.into_iter().filter(|&id| id > low).collect();
        visible.sort_unstable();
        visible.dedup();
        visible.shrink_to_fit();
        Fence::Visible { low, visible }
    }

    /// Whether a [`Fence::Postgres`] snapshot sees transaction `xid` (`xid8`): it had
    /// committed when the snapshot was taken. False for the other fences.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub fn sees(&self, xid: u64) -> bool {
        match self {
            Fence::Postgres {
                xmin,
                xmax,
                running,
            } => xid < *xmin || (xid < *xmax && !running.contains(&xid)),
            Fence::Journal { .. } | Fence::Visible { .. } | Fence::Set(_) => false,
        }
    }

    /// Whether a [`Fence::Postgres`] snapshot saw every transaction up to `xid` finished
    /// (`xid` is below its `xmin`). False for the other fences.
    #[cfg_attr(not(feature = "logical"), allow(dead_code))]
    pub fn finished_through(&self, xid: u64) -> bool {
        match self {
            Fence::Postgres { xmin, .. } => xid < *xmin,
            Fence::Journal { .. } | Fence::Visible { .. } | Fence::Set(_) => false,
        }
    }

    /// Whether the snapshot already reflects `event` (its transaction had committed when the
    /// snapshot was taken), so the stream after the snapshot must skip it. An event that says
    /// nothing about its transaction or position is never skipped: a duplicate is better than
    /// a gap.
    pub fn covers(&self, event: &ChangeEvent) -> bool {
        match self {
            Fence::Postgres { .. } => event.transaction_id().is_some_and(|x| self.sees(x)),
            Fence::Journal { head } => event.sequence().is_some_and(|s| s <= *head),
            Fence::Visible { low, visible } => event
                .sequence()
                .is_some_and(|s| s <= *low || visible.binary_search(&s).is_ok()),
            Fence::Set(read) => event.sequence().is_some_and(|s| read.contains(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Key, RawNotification};
    use crate::tier::Tier;

    fn event(raw: RawNotification) -> ChangeEvent {
        let channel = crate::event::test_channel(Tier::Durable);
        ChangeEvent::new(
            channel,
            Key::Single(1.into()),
            crate::event::Extra::default(),
            &raw,
            false,
        )
    }

    fn in_tx(x: u64) -> ChangeEvent {
        event(RawNotification::new("c", "").with_transaction(x, true))
    }

    #[test]
    fn parses_postgres_snapshots() {
        assert_eq!(
            Fence::parse_postgres("10:20:12,15"),
            Some(Fence::Postgres {
                xmin: 10,
                xmax: 20,
                running: vec![12, 15]
            })
        );
        assert_eq!(
            Fence::parse_postgres("7:7:"),
            Some(Fence::Postgres {
                xmin: 7,
                xmax: 7,
                running: vec![]
            })
        );
        for bad in ["", "1", "1:2", "3:2:", "a:2:", "1:2:x", "1:2:3,,4"] {
            assert_eq!(Fence::parse_postgres(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_transaction_through_one_finished_means_below_xmin() {
        let fence = Fence::parse_postgres("10:20:12,15").unwrap();
        assert!(fence.finished_through(9));
        assert!(!fence.finished_through(10), "10 itself may still run");
        assert!(!fence.finished_through(19));
        assert!(!Fence::Journal { head: 5 }.finished_through(1));
    }

    #[test]
    fn a_transaction_is_covered_when_it_had_committed() {
        let fence = Fence::parse_postgres("10:20:12,15").unwrap();
        for (x, covered) in [
            (1, true),
            (9, true),
            (10, true),
            (11, true),
            (12, false),
            (15, false),
            (19, true),
            (20, false),
            (99, false),
        ] {
            assert_eq!(fence.covers(&in_tx(x)), covered, "xid {x}");
        }
        // no transaction id: delivered (a duplicate rather than a gap)
        assert!(!fence.covers(&event(RawNotification::new("c", ""))));
    }

    #[test]
    fn a_journal_fence_covers_rows_up_to_its_head() {
        let fence = Fence::Journal { head: 100 };
        assert!(fence.covers(&event(RawNotification::new("c", "").with_sequence(100))));
        assert!(!fence.covers(&event(RawNotification::new("c", "").with_sequence(101))));
        assert!(!fence.covers(&event(RawNotification::new("c", ""))));
    }

    #[test]
    fn a_visible_fence_covers_its_watermark_and_the_ids_its_read_saw() {
        // read at watermark 10; the snapshot saw 11, 12, 15 and 20 (13, 14: transactions still
        // running or rolled back; 16-19: not committed yet or on other tables)
        let fence = Fence::visible(10, [20, 12, 15, 11, 12, 3, 10]);
        assert_eq!(
            fence,
            Fence::Visible {
                low: 10,
                visible: vec![11, 12, 15, 20]
            }
        );
        let at = |s| event(RawNotification::new("c", "").with_sequence(s));
        for (s, covered) in [
            (1, true),
            (10, true),
            (11, true),
            (12, true),
            (13, false),
            (14, false),
            (15, true),
            (16, false),
            (20, true),
            (21, false),
            (i64::MAX, false),
        ] {
            assert_eq!(fence.covers(&at(s)), covered, "journal id {s}");
        }
        // no journal id: delivered (a duplicate rather than a gap)
        assert!(!fence.covers(&event(RawNotification::new("c", ""))));
        // nothing seen above the watermark
        let empty = Fence::visible(0, []);
        assert!(!empty.covers(&at(1)));
        assert!(empty.covers(&at(0)));
    }
}
