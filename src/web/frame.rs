//! The server-sent-events wire format: frames (`id:`, `event:`, `data:`, `retry:`, comments)
//! and the event ids a client sends back in `Last-Event-ID`.
//!
//! A field value never spans lines: `data` is split into one `data:` line per line (so a
//! payload with newlines arrives whole, joined by `\n`), and the other fields have line breaks
//! replaced, so nothing a row holds can end a frame early or inject a field.

use std::fmt::Write;

use crate::event::ChangeEvent;
use crate::read_point::{is_snapshot_text, PointAt};
use crate::read_set::ReadSet;
use crate::replay::{Head, ReplayFrom};

/// Where an event stands in the journal: the `id:` of its frame, what a client sends back in
/// `Last-Event-ID`.
///
/// * A journal in commit order (SQLite): its journal row and its index in that row (statement
///   capture) — `"17"` for row 17 (index 0), `"17.2"` for its third row.
/// * PostgreSQL's durable and poll tiers, whose journal ids are not in commit order: the same,
///   then the point of the read that delivered it (`src/read_point.rs`) — `"17.2@19@A@B"`:
///   the last journal id of its transaction, the snapshot of the read before and of its own.
/// * MySQL / MariaDB, whose journal ids are not in commit order either: the row, then the set
///   of journal ids the listener had handed over once it handed over this row
///   (`src/read_set.rs`) — `"17@12:18:13,16-17"`: every id up to 12, and up to 18 all but 13,
///   16 and 17.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub sequence: i64,
    pub part: u32,
    pub read: Option<ReadAt>,
}

/// The read a journal row was delivered in (see [`Position`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadAt {
    /// PostgreSQL: the last journal id of the row's transaction and the read's snapshots.
    Snapshots {
        group: i64,
        before: String,
        during: String,
    },
    /// MySQL / MariaDB: the ids read once the row was handed over.
    Cursor(ReadSet),
}

impl Position {
    /// The position of `event`; `None` without a journal (PostgreSQL's notify tier).
    pub fn of(event: &ChangeEvent) -> Option<Position> {
        let sequence = event.sequence()?;
        let read = match event.read_point().map(|point| &point.at) {
            None => None,
            Some(PointAt::Snapshots { read, group }) => Some(ReadAt::Snapshots {
                group: *group,
                before: read.before.clone(),
                during: read.during.clone(),
            }),
            // A batch always has the set after each of its rows.
            Some(PointAt::Cursor { page, index }) => Some(ReadAt::Cursor(page.after(*index)?)),
        };
        Some(Position {
            sequence,
            part: event.part(),
            read,
        })
    }

    /// The position of a stream's [`Head`]: what a client that got nothing else has. A journal
    /// in commit order: its last id (`"17"`, the form a page reads from `sqlite_sequence`);
    /// PostgreSQL: no row, and every transaction the snapshot saw (`"0@0@S@S"`).
    pub fn head(head: Head) -> Position {
        match head {
            Head::Journal(id) => Position {
                sequence: id,
                part: 0,
                read: None,
            },
            Head::Snapshot(snapshot) => Position {
                sequence: 0,
                part: 0,
                read: Some(ReadAt::Snapshots {
                    group: 0,
                    before: snapshot.clone(),
                    during: snapshot,
                }),
            },
        }
    }

    /// Reads a `Last-Event-ID`; `None` when it is not one of ours.
    pub fn parse(text: &str) -> Option<Position> {
        let text = text.trim();
        let mut fields = text.split('@');
        let row = fields.next()?;
        let read = match (fields.next(), fields.next(), fields.next(), fields.next()) {
            (None, ..) => None,
            (Some(set), None, ..) => Some(ReadAt::Cursor(ReadSet::parse(set)?)),
            (Some(group), Some(before), Some(during), None)
                if !group.is_empty()
                    && group.bytes().all(|b| b.is_ascii_digit())
                    && is_snapshot_text(before)
                    && is_snapshot_text(during) =>
            {
                Some(ReadAt::Snapshots {
                    group: group.parse().ok()?,
                    before: before.to_string(),
                    during: during.to_string(),
                })
            }
            _ => return None,
        };
        let (sequence, part) = match row.split_once('.') {
            Some((s, p)) => (s, p.parse().ok()?),
            None => (row, 0),
        };
        let sequence: i64 = sequence.parse().ok()?;
        (sequence >= 0 && !row.starts_with('+')).then_some(Position {
            sequence,
            part,
            read,
        })
    }

    /// Whether `event` (read from the journal for a client resuming from this position) is
    /// one the client has: this position's row, up to this position's part — or, in a journal
    /// in commit order, any row before it; with a set of ids read, any row in it.
    pub fn has(&self, event: &ChangeEvent) -> bool {
        let (Some(sequence), part) = (event.sequence(), event.part()) else {
            return false;
        };
        match &self.read {
            None => (sequence, part) <= (self.sequence, self.part),
            Some(ReadAt::Snapshots { .. }) => sequence == self.sequence && part <= self.part,
            Some(ReadAt::Cursor(set)) => set.contains(sequence),
        }
    }

    /// Where a replay of the journal for a client at this position starts.
    pub fn replay_from(&self) -> ReplayFrom {
        match &self.read {
            // Row `sequence` is read again: the client may lack its later statement rows.
            // It must still be there when the client surely lacks some (`17.2` is a
            // statement's row); after `17` it may be gone (trimmed after the client got it)
            // — an ordinary row is one event. The one case this misses: the first event of a
            // statement's journal row received, the row trimmed by retention before the
            // client came back for the rest.
            None => ReplayFrom::Journal {
                since: if self.part > 0 {
                    self.sequence - 1
                } else {
                    self.sequence
                },
                cursor: self.sequence - 1,
            },
            Some(ReadAt::Snapshots {
                group,
                before,
                during,
            }) => ReplayFrom::Read {
                before: before.clone(),
                during: during.clone(),
                group: *group,
                id: self.sequence,
                page: None,
            },
            Some(ReadAt::Cursor(set)) => ReplayFrom::Cursor {
                read: set.clone(),
                pos: None,
            },
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.sequence)?;
        if self.part != 0 {
            write!(f, ".{}", self.part)?;
        }
        match &self.read {
            None => {}
            Some(ReadAt::Snapshots {
                group,
                before,
                during,
            }) => write!(f, "@{group}@{before}@{during}")?,
            Some(ReadAt::Cursor(set)) => write!(f, "@{set}")?,
        }
        Ok(())
    }
}

/// One frame: optional `id` and `event` fields, then `data` one line per line.
pub(crate) fn frame(id: Option<&str>, event: Option<&str>, data: &str) -> String {
    let mut out = String::with_capacity(data.len() + 64);
    if let Some(id) = id {
        // An id with a NUL is ignored by browsers: never send one.
        let _ = writeln!(out, "id: {}", one_line(id).replace('\0', ""));
    }
    if let Some(event) = event {
        let _ = writeln!(out, "event: {}", one_line(event));
    }
    for line in data.split('\n') {
        let _ = writeln!(
            out,
            "data: {}",
            line.strip_suffix('\r').unwrap_or(line).replace('\r', " ")
        );
    }
    out.push('\n');
    out
}

/// The frame of a change event: `id` its position, `event` `table/operation`, `data` its
/// JSON record ([`ChangeEvent::to_record`]).
pub(crate) fn event_frame(event: &ChangeEvent) -> String {
    event_frame_at(event, Position::of(event))
}

/// The frame of a change event at `position`.
pub(crate) fn event_frame_at(event: &ChangeEvent, position: Option<Position>) -> String {
    let id = position.map(|p| p.to_string());
    let name = format!("{}/{}", event.table(), event.operation().as_str());
    frame(id.as_deref(), Some(&name), &event.to_record())
}

/// The `id:` a stream with no position to resume from sends first (PostgreSQL's notify tier,
/// MySQL / MariaDB, the logical tier, or a position that could not be read): a browser then
/// sends it back on reconnect, and gets a `reset` rather than a live stream with a silent gap.
pub(crate) const NO_POSITION: &str = "none";

/// A frame with only an `id:`: sets the id a browser sends back on reconnect, and fires no
/// event.
pub(crate) fn id_frame(id: &str) -> String {
    format!("id: {}\n\n", one_line(id).replace('\0', ""))
}

/// The `retry:` field: how long a browser waits before it reconnects.
pub(crate) fn retry(millis: u128) -> String {
    format!("retry: {millis}\n\n")
}

/// A comment line (ignored by clients; keeps proxies from closing an idle stream).
pub(crate) fn comment(text: &str) -> String {
    format!(": {}\n\n", one_line(text))
}

fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_with_line_breaks_becomes_one_field_per_line() {
        assert_eq!(
            frame(Some("7"), Some("orders/insert"), "a\nb\r\nc"),
            "id: 7\nevent: orders/insert\ndata: a\ndata: b\ndata: c\n\n"
        );
        assert_eq!(
            frame(None, Some("x\nid: 9"), "{}"),
            "event: x id: 9\ndata: {}\n\n",
            "a name cannot inject a field"
        );
        assert_eq!(comment("a\nb"), ": a b\n\n");
        assert_eq!(retry(3000), "retry: 3000\n\n");
    }

    #[test]
    fn positions_round_trip_and_reject_what_is_not_ours() {
        for text in [
            "0",
            "17",
            "17.2",
            "17@19@5:9:6,7@5:12:",
            "17.2@17@5:5:@5:6:",
            "17@12:18:13,16-17",
            "17@17:17:",
        ] {
            assert_eq!(Position::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            Position::parse("17"),
            Some(Position {
                sequence: 17,
                part: 0,
                read: None,
            })
        );
        assert_eq!(
            Position::parse("17@19@5:9:6,7@5:12:").unwrap().read,
            Some(ReadAt::Snapshots {
                group: 19,
                before: "5:9:6,7".into(),
                during: "5:12:".into(),
            })
        );
        assert_eq!(
            Position::parse("17@12:18:13,16-17").unwrap().read,
            Some(ReadAt::Cursor(
                ReadSet::from_parts(12, 18, vec![(13, 13), (16, 17)]).unwrap()
            ))
        );
        for bad in [
            "",
            "-1",
            "+3",
            "x",
            "1.x",
            "1.-1",
            "1.2.3",
            "17@19",
            "17@19@5:9:",
            "17@19@5:9:@5:9:@1",
            "17@+19@5:9:@5:9:",
            "17@-1@5:9:@5:9:",
            "17@19@5:9:'@5:9:",
            "17@19@5:9:@5;9:",
            "17@12:18:13;1",
            "17@12:18:18",
            "17@12:18@5:9:",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_head_is_a_position_that_has_no_row_and_parses_back() {
        let sqlite = Position::head(Head::Journal(17));
        assert_eq!(sqlite.to_string(), "17");
        let postgres = Position::head(Head::Snapshot("5:9:6,7".into()));
        assert_eq!(postgres.to_string(), "0@0@5:9:6,7@5:9:6,7");
        assert_eq!(
            Position::parse(&postgres.to_string()),
            Some(postgres.clone())
        );
        assert_eq!(
            postgres.replay_from(),
            ReplayFrom::Read {
                before: "5:9:6,7".into(),
                during: "5:9:6,7".into(),
                group: 0,
                id: 0,
                page: None,
            }
        );
        assert_eq!(
            Position::parse(NO_POSITION),
            None,
            "`none` is not a position"
        );
    }

    #[test]
    fn a_position_has_the_rows_before_it_in_commit_order_and_its_own_row_up_to_its_part() {
        use crate::event::{Channel, RawNotification};
        use std::sync::Arc;
        let channel = Arc::new(Channel {
            name: "c".into(),
            schema: "public".into(),
            table: "t".into(),
            operation: crate::operation::Operation::Insert,
            label: None,
            key_columns: vec!["id".into()],
            extra_columns: vec![],
            tier: crate::tier::Tier::Durable,
            signed: false,
        });
        let event = |sequence: i64, part: u32| {
            let raw = RawNotification::new("c", "{}").with_sequence(sequence);
            crate::event::ChangeEvent::new(
                channel.clone(),
                crate::event::Key::Single(1.into()),
                crate::event::Extra::default(),
                &raw,
                false,
            )
            .placed(0, part)
        };
        let journal = Position::parse("17.1").unwrap();
        assert!(journal.has(&event(16, 5)) && journal.has(&event(17, 1)));
        assert!(!journal.has(&event(17, 2)) && !journal.has(&event(18, 0)));
        let read = Position::parse("17.1@20@5:9:@5:12:").unwrap();
        assert!(read.has(&event(17, 0)) && read.has(&event(17, 1)));
        assert!(!read.has(&event(17, 2)), "a later row of its statement");
        assert!(
            !read.has(&event(16, 0)),
            "a lower id can be a later transaction"
        );
        let set = Position::parse("17@12:18:13,16").unwrap();
        assert!(set.has(&event(12, 0)) && set.has(&event(14, 0)) && set.has(&event(17, 0)));
        assert!(!set.has(&event(13, 0)) && !set.has(&event(16, 0)) && !set.has(&event(19, 0)));
    }
}
