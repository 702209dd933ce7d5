//! The server-sent-events wire format: frames (`id:`, `event:`, `data:`, `retry:`, comments)
//! and the event ids a client sends back in `Last-Event-ID`.
//!
//! A field value never spans lines: `data` is split into one `data:` line per line (so a
//! payload with newlines arrives whole, joined by `\n`), and the other fields have line breaks
//! replaced, so nothing a row holds can end a frame early or inject a field.

use std::fmt::Write;

use crate::event::ChangeEvent;

/// Where an event stands in the journal: its journal row and its index in that row (statement
/// capture), the `id:` of its frame — `"17"` for row 17 (index 0), `"17.2"` for its third row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    pub sequence: i64,
    pub part: u32,
}

impl Position {
    /// The position of `event`; `None` without a journal (PostgreSQL's notify tier).
    pub fn of(event: &ChangeEvent) -> Option<Position> {
        event.sequence().map(|sequence| Position {
            sequence,
            part: event.part(),
        })
    }

    /// Reads a `Last-Event-ID`; `None` when it is not one of ours.
    pub fn parse(text: &str) -> Option<Position> {
        let text = text.trim();
        let (sequence, part) = match text.split_once('.') {
            Some((s, p)) => (s, p.parse().ok()?),
            None => (text, 0),
        };
        let sequence: i64 = sequence.parse().ok()?;
        (sequence >= 0 && !text.starts_with('+')).then_some(Position { sequence, part })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.part == 0 {
            write!(f, "{}", self.sequence)
        } else {
            write!(f, "{}.{}", self.sequence, self.part)
        }
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
    let id = Position::of(event).map(|p| p.to_string());
    let name = format!("{}/{}", event.table(), event.operation().as_str());
    frame(id.as_deref(), Some(&name), &event.to_record())
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
        for text in ["0", "17", "17.2"] {
            assert_eq!(Position::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            Position::parse("17"),
            Some(Position {
                sequence: 17,
                part: 0
            })
        );
        assert!(Position::parse("17.0") < Position::parse("17.1"));
        assert!(Position::parse("17.9") < Position::parse("18"));
        for bad in ["", "-1", "+3", "x", "1.x", "1.-1", "1.2.3"] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }
}
