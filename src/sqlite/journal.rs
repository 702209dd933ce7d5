//! The SQLite journal: rows appended by the triggers, read by cursor (trimmed by retention and
//! the consumers' cursors in `consumers.rs`). Synchronous helpers over one connection.
//!
//! Listeners never delete what they read, so any number of listeners in any number of
//! processes each see every row. SQLite has one writer at a time and AUTOINCREMENT ids are
//! assigned inside the writing transaction, so ids are in commit order and a cursor
//! (`id > last`) cannot skip a row that commits late.

use std::collections::HashSet;
use std::time::SystemTime;

use rusqlite::{params, Connection};

use super::catalog::db_err;
use super::ddl::NOW;
use crate::error::Result;
use crate::event::RawNotification;

/// `PRAGMA data_version`: changes whenever another connection commits to the database.
pub(crate) fn data_version(conn: &Connection) -> Result<i64> {
    conn.prepare_cached("PRAGMA data_version")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db_err("reading PRAGMA data_version"))
}

/// The id of the newest journal row (0 when there is none).
pub(crate) fn head(conn: &Connection) -> Result<i64> {
    conn.query_row(
        "SELECT coalesce(max(id), 0) FROM sqlnotify_journal",
        [],
        |r| r.get(0),
    )
    .map_err(db_err("reading the journal head"))
}

/// Reads up to `limit` rows after `cursor`; keeps those on `channels`. Returns the kept rows,
/// the id of the last row looked at (the new cursor), and whether that was every row there
/// is (fewer than `limit` came back).
pub(crate) fn read_after(
    conn: &Connection,
    cursor: i64,
    limit: i64,
    channels: &HashSet<String>,
) -> Result<(Vec<RawNotification>, i64, bool)> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, channel, payload FROM sqlnotify_journal WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(db_err("reading the journal"))?;
    let mut rows = stmt
        .query(params![cursor, limit])
        .map_err(db_err("reading the journal"))?;
    let (mut out, mut last, mut looked) = (Vec::new(), cursor, 0);
    let now = SystemTime::now();
    while let Some(row) = rows.next().map_err(db_err("reading the journal"))? {
        let id: i64 = row.get(0).map_err(db_err("reading the journal"))?;
        last = id;
        looked += 1;
        let channel = text(row, 1)?;
        if channels.contains(&channel) {
            out.push(RawNotification {
                channel,
                payload: text(row, 2)?,
                received_at: now,
                sequence: Some(id),
                events: 1,
                transaction: None,
                last_in_transaction: None,
                read_point: None,
            });
        }
    }
    Ok((out, last, looked < limit))
}

/// [`read_after`] `cursor` for a client that resumes, or `TooOld` when a row after `since`
/// may be gone: ids are AUTOINCREMENT and only the purge deletes rows, so a row missing
/// between `since` and the oldest row left — or `since` past the newest id ever given — means
/// the client cannot continue without a gap.
#[cfg_attr(not(feature = "web"), allow(dead_code))]
pub(crate) fn replay(
    conn: &Connection,
    (since, cursor): (i64, i64),
    limit: i64,
    channels: &HashSet<String>,
) -> Result<crate::replay::Replay> {
    use crate::replay::{Replay, ReplayFrom};
    use crate::snapshot::fence::Fence;
    let (oldest, given): (Option<i64>, i64) = conn
        .query_row(
            "SELECT (SELECT min(id) FROM sqlnotify_journal),
                    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'sqlnotify_journal'), 0)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db_err("reading the journal's bounds"))?;
    let gone = match oldest {
        Some(oldest) => since + 1 < oldest,
        None => since < given,
    };
    if since < 0 || since > given || gone {
        return Ok(Replay::TooOld);
    }
    let (rows, last, done) = read_after(conn, cursor, limit, channels)?;
    Ok(Replay::Rows {
        rows,
        next: (!done).then_some(ReplayFrom::Journal {
            since: last,
            cursor: last,
        }),
        fence: Fence::Journal { head: last },
    })
}

/// A TEXT column as a `String`. SQLite lets an application store text that is not UTF-8
/// (`CAST(x'ff' AS TEXT)`), and the triggers copy it into the payload as is: read it lossily,
/// so one such row cannot fail every read of the journal (and wedge the listener on it).
fn text(row: &rusqlite::Row<'_>, index: usize) -> Result<String> {
    let value = row.get_ref(index).map_err(db_err("reading the journal"))?;
    let bytes = value
        .as_bytes()
        .map_err(|e| crate::error::Error::db("reading the journal", e))?;
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// Appends a row (custom notifications); returns its id.
pub(crate) fn append(conn: &Connection, channel: &str, payload: &str) -> Result<i64> {
    conn.prepare_cached(&format!(
        "INSERT INTO sqlnotify_journal (channel, payload, created_at) VALUES (?1, ?2, {NOW})"
    ))
    .and_then(|mut s| s.insert(params![channel, payload]))
    .map_err(db_err(format!("writing a notification on {channel}")))
}
