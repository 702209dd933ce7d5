//! The SQLite journal: rows appended by the triggers, read by cursor (trimmed by retention and
//! the consumers' cursors in `consumers.rs`). Synchronous helpers over one connection.
//!
//! Listeners never delete what they read, so any number of listeners in any number of
//! processes each see every row. SQLite has one writer at a time and AUTOINCREMENT ids are
//! assigned inside the writing transaction, so ids are in commit order and a cursor
//! (`id > last`) cannot skip a row that commits late.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use rusqlite::{params, Connection, OptionalExtension};

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

/// Most rows a listener's read takes past its `limit` to end on a transaction's last row.
pub(crate) const MAX_EXTENSION: i64 = 100_000;

/// Most payload bytes a listener's read holds (as MySQL's listener reads; a resuming client's
/// page holds `replay::PAGE_BYTES`): a read ends before a kept row whose payload would take
/// it past this, unless it holds no row yet (so a row larger than this is read alone). Rows
/// are collected before the in-flight budget applies, so without it a read of 1,000 rows (or
/// a transaction of 100,000) held all of their payloads at once, however large.
pub(crate) const READ_BYTES: usize = 64 << 20;

/// Reads up to `limit` rows after `cursor` — more to end with a whole transaction, when its
/// rows say which (`tx`, written for connections that track their transactions; see
/// [`crate::sqlite_transactions`]) — and keeps those on `channels`, the last kept row of each
/// transaction marked. Returns the kept rows, the id of the last row looked at (the new
/// cursor), and whether that was every row there is.
///
/// A transaction's journal rows are consecutive (one writer at a time), so a read that ends
/// where the next row belongs to another transaction (or where there is none: a transaction
/// commits all of its rows at once) has every row of its last transaction; one larger than
/// `extension` rows past `limit` (the listener's [`MAX_EXTENSION`]) is cut, and its last
/// kept row there says `None`. So is one whose kept payloads pass `max_bytes` (the
/// listener's [`READ_BYTES`]): the read ends before the row that would take it past them,
/// wherever that is — the rest of the transaction comes with the next read, in order.
pub(crate) fn read_after(
    conn: &Connection,
    cursor: i64,
    limit: i64,
    extension: i64,
    max_bytes: usize,
    channels: &HashSet<Arc<str>>,
) -> Result<(Vec<RawNotification>, i64, bool)> {
    // A journal of an older version, where sqlnotify does not manage the tables, has no `tx`.
    let mut stmt = match conn.prepare_cached(
        "SELECT id, channel, payload, tx FROM sqlnotify_journal WHERE id > ?1 ORDER BY id",
    ) {
        Ok(stmt) => stmt,
        Err(_) => conn
            .prepare_cached(
                "SELECT id, channel, payload, NULL FROM sqlnotify_journal WHERE id > ?1 ORDER BY id",
            )
            .map_err(db_err("reading the journal"))?,
    };
    let mut rows = stmt
        .query(params![cursor])
        .map_err(db_err("reading the journal"))?;
    let (mut out, mut last, mut looked, mut held) = (Vec::new(), cursor, 0i64, 0usize);
    let (mut previous_tx, mut done, mut cut) = (None::<i64>, true, None::<i64>);
    let now = SystemTime::now();
    while let Some(row) = rows.next().map_err(db_err("reading the journal"))? {
        let tx: Option<i64> = row.get(3).unwrap_or(None);
        let same = tx.is_some() && tx == previous_tx;
        // Left for the next read: past the rows' limit (once the transaction ends, or past the
        // extension), or a kept row whose payload would take the read past its bytes.
        let past_rows = looked >= limit && (!same || looked >= limit.saturating_add(extension));
        let channel = text(row, 1)?;
        let kept = channels.get(channel.as_str());
        let size = match kept {
            Some(_) => payload_len(row, 2)?,
            None => 0,
        };
        if past_rows || (held > 0 && held.saturating_add(size) > max_bytes) {
            done = false;
            cut = if same { previous_tx } else { None };
            break;
        }
        let id: i64 = row.get(0).map_err(db_err("reading the journal"))?;
        last = id;
        looked += 1;
        previous_tx = tx;
        if let Some(channel) = kept {
            held += size;
            out.push(RawNotification {
                channel: channel.clone(),
                payload: text(row, 2)?,
                received_at: now,
                sequence: Some(id),
                events: 1,
                transaction: tx.map(|t| t as u64),
                last_in_transaction: tx.map(|_| true),
                read_point: None,
                decoded: None,
                part: 0,
                read_bytes: 0,
                extra_units: 0,
            });
        }
    }
    mark_transactions(&mut out, cut);
    Ok((out, last, done))
}

/// The size in bytes of a TEXT (or BLOB) column, without copying it.
fn payload_len(row: &rusqlite::Row<'_>, index: usize) -> Result<usize> {
    let value = row
        .get_ref(index)
        .map_err(|e| crate::error::Error::db("reading the journal", e))?;
    Ok(value.as_bytes().map(<[u8]>::len).unwrap_or(0))
}

/// Marks the last row of each transaction among `rows` (consecutive per transaction, each
/// marked last so far): a row followed by one of the same transaction is not. `cut`: the
/// transaction the read stopped inside; if the last row kept is of it, whether that row is
/// its last is not known (one of an earlier transaction, whose later rows were on other
/// channels, ended before the cut and keeps its mark).
fn mark_transactions(rows: &mut [RawNotification], cut: Option<i64>) {
    for i in 1..rows.len() {
        if rows[i].transaction.is_some() && rows[i].transaction == rows[i - 1].transaction {
            rows[i - 1].last_in_transaction = Some(false);
        }
    }
    if let (Some(cut), Some(row)) = (cut, rows.last_mut()) {
        if row.transaction == Some(cut as u64) {
            row.last_in_transaction = None;
        }
    }
}

#[cfg_attr(not(feature = "web"), allow(dead_code))]
/// The last journal id given out (`0` before the first): a position a replay resumes from.
pub(crate) fn last_given(conn: &Connection) -> Result<i64> {
    conn.query_row(
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'sqlnotify_journal'), 0)",
        [],
        |r| r.get(0),
    )
    .map_err(db_err("reading the journal's last id"))
}

/// [`read_after`] `cursor` for a client that resumes, or `TooOld` when a row after `since`
/// may be gone: only the purge deletes rows, and it records the highest id it deleted
/// (`sqlnotify_trimmed`) in the transaction of each delete, so a client behind that id may
/// lack a row that is gone. The oldest row left does not say it: the purge keeps the rows a
/// registered consumer has not read and deletes the rows of other channels after them (a
/// consumer stopped with row 1 unread, rows 2..1000 purged: a client at 50 lacks 51..1000,
/// and the oldest row is 1). A row missing between `since` and the oldest row left (a purge by
/// a version that kept no record), or `since` past the newest id ever given, is `TooOld` too.
#[cfg_attr(not(feature = "web"), allow(dead_code))]
pub(crate) fn replay(
    conn: &Connection,
    (since, cursor): (i64, i64),
    limit: i64,
    channels: &HashSet<Arc<str>>,
) -> Result<crate::replay::Replay> {
    use crate::replay::{Replay, ReplayFrom};
    use crate::snapshot::fence::Fence;
    // The bounds and the rows in one read transaction: another process's purge committing
    // between them could otherwise delete rows after `since` that the check found there.
    let tx = conn
        .unchecked_transaction()
        .map_err(db_err("starting the journal's replay read"))?;
    let oldest: Option<i64> = tx
        .query_row("SELECT min(id) FROM sqlnotify_journal", [], |r| r.get(0))
        .map_err(db_err("reading the journal's oldest row"))?;
    let given = given(&tx)?;
    let gone = match oldest {
        Some(oldest) => since.saturating_add(1) < oldest,
        None => since < given,
    };
    if since < 0 || since > given || gone || since < trimmed(&tx, given)? {
        return Ok(Replay::TooOld);
    }
    // A page of at most `limit` rows (the endpoint's `replay_page`) and `PAGE_BYTES` of
    // payloads: a replay needs no whole transactions, and each resuming client holds its page.
    let page_bytes = crate::replay::PAGE_BYTES;
    let (rows, last, done) = read_after(&tx, cursor, limit, 0, page_bytes, channels)?;
    drop(tx);
    Ok(Replay::Rows {
        rows,
        next: (!done).then_some(ReplayFrom::Journal {
            since: last,
            cursor: last,
        }),
        fence: Fence::Journal { head: last },
    })
}

/// The last id the journal gave out (`sqlite_sequence`; 0 before the first row).
fn given(conn: &Connection) -> Result<i64> {
    conn.prepare_cached(
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'sqlnotify_journal'), 0)",
    )
    .and_then(|mut s| s.query_row([], |r| r.get(0)))
    .map_err(db_err("reading the journal's last id given out"))
}

/// Where a listener without a consumer starts, "now": after the newest journal row, and after
/// every row the purge deleted (with the journal emptied by the purge the newest row left says
/// 0), so that [`purged_after`] counts nothing from before the start.
pub(crate) fn start(conn: &Connection) -> Result<i64> {
    let given = given(conn)?;
    Ok(head(conn)?.max(trimmed(conn, given)?))
}

/// Whether the purge deleted a row after `cursor` (`sqlnotify_trimmed` past it): read in the
/// transaction of the read that follows `cursor`, true means a listener without a consumer
/// (whose rows nothing keeps) fell behind the retention and a row it had not read is gone —
/// one of its channels' or, the record cannot tell, another channel's of that age. The purge
/// records what it deleted in the transaction of the delete, so a read that sees the rows
/// gone sees the record too.
pub(crate) fn purged_after(conn: &Connection, cursor: i64) -> Result<bool> {
    let given = given(conn)?;
    Ok(trimmed(conn, given)? > cursor)
}

/// The highest journal id the purge has deleted (`sqlnotify_trimmed`; 0 before any purge, or
/// where an older install has no such table yet). A record past `given`, the last id the
/// journal gave out, is of a journal dropped since (its ids started again): it says nothing
/// about this one.
fn trimmed(conn: &Connection, given: i64) -> Result<i64> {
    let context = "reading how far the journal was trimmed";
    // Cached statements: a listener without a consumer asks before every read.
    let exists: bool = conn
        .prepare_cached(
            "SELECT count(*) FROM main.sqlite_master WHERE type = 'table' AND name = 'sqlnotify_trimmed'",
        )
        .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
        .map(|n| n > 0)
        .map_err(db_err(context))?;
    if !exists {
        return Ok(0);
    }
    let upto: Option<i64> = conn
        .prepare_cached("SELECT upto FROM sqlnotify_trimmed WHERE id = 1")
        .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
        .map_err(db_err(context))?;
    Ok(upto.filter(|&upto| upto <= given).unwrap_or(0))
}

/// A TEXT column as a `String`. SQLite lets an application store text that is not UTF-8
/// (`CAST(x'ff' AS TEXT)`), and the triggers copy it into the payload as is: read it lossily,
/// so one such row cannot fail every read of the journal (and wedge the listener on it).
fn text(row: &rusqlite::Row<'_>, index: usize) -> Result<String> {
    lossy_text(row, index, "reading the journal")
}

/// [`text`] for any read: `what` says which, in its error.
pub(crate) fn lossy_text(row: &rusqlite::Row<'_>, index: usize, what: &str) -> Result<String> {
    // (The error's context only on error: this runs for every payload.)
    let value = row
        .get_ref(index)
        .map_err(|e| crate::error::Error::db(what.to_string(), e))?;
    let bytes = value
        .as_bytes()
        .map_err(|e| crate::error::Error::db(what.to_string(), e))?;
    // Valid text (nearly always) through `from_utf8`, which checks ASCII a word at a time:
    // `from_utf8_lossy` goes byte by byte, about half the listener's instructions per event
    // with 4 KB payloads (callgrind).
    Ok(match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    })
}

/// Appends a row (custom notifications); returns its id.
pub(crate) fn append(conn: &Connection, channel: &str, payload: &str) -> Result<i64> {
    conn.prepare_cached(&format!(
        "INSERT INTO sqlnotify_journal (channel, payload, created_at) VALUES (?1, ?2, {NOW})"
    ))
    .and_then(|mut s| s.insert(params![channel, payload]))
    .map_err(db_err(format!("writing a notification on {channel}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(tx: Option<u64>) -> RawNotification {
        let mut raw = RawNotification::new("c", "{}");
        raw.transaction = tx;
        raw.last_in_transaction = tx.map(|_| true);
        raw
    }

    fn marks(rows: &[RawNotification]) -> Vec<Option<bool>> {
        rows.iter().map(|r| r.last_in_transaction).collect()
    }

    #[test]
    fn a_resume_from_the_end_of_the_id_range_is_too_old_not_an_overflow() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&crate::sqlite::ddl::setup_sql())
            .unwrap();
        conn.execute(
            "INSERT INTO sqlnotify_journal (channel, payload, created_at) VALUES ('c', '{}', 0)",
            [],
        )
        .unwrap();
        let channels: HashSet<Arc<str>> = [Arc::from("c")].into();
        for since in [i64::MAX, i64::MIN, -1] {
            let replay = replay(&conn, (since, since), 10, &channels).unwrap();
            assert!(matches!(replay, crate::replay::Replay::TooOld), "{since}");
        }
    }

    /// The purge keeps a stopped consumer's unread row 1 and deletes rows 2..=10 of another
    /// channel: a resume from 5 lacks 6..=10, though the oldest row left is 1.
    #[test]
    fn a_resume_behind_rows_purged_after_a_kept_row_is_too_old() {
        use crate::replay::Replay;
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&crate::sqlite::ddl::setup_sql())
            .unwrap();
        // As an older version installed it: the purge adds the table.
        conn.execute_batch("DROP TABLE sqlnotify_trimmed").unwrap();
        conn.execute(
            "INSERT INTO sqlnotify_consumers (name, cursor, updated_at, state, channels) \
             VALUES ('billing', 0, 0, 'active', '[\"y\"]')",
            [],
        )
        .unwrap();
        for channel in std::iter::once("y").chain(std::iter::repeat_n("x", 9)) {
            conn.execute(
                "INSERT INTO sqlnotify_journal (channel, payload, created_at) VALUES (?1, '{}', 0)",
                [channel],
            )
            .unwrap();
        }
        let deleted =
            crate::sqlite::consumers::purge(&mut conn, std::time::Duration::ZERO).unwrap();
        assert_eq!(deleted, 9);
        assert_eq!(head(&conn).unwrap(), 1, "billing's row is kept");
        let channels: HashSet<Arc<str>> = [Arc::from("x")].into();
        let resume = |since| replay(&conn, (since, since), 10, &channels).unwrap();
        for since in [0, 5, 9] {
            assert!(matches!(resume(since), Replay::TooOld), "{since}");
        }
        // A client that had everything the purge took resumes.
        assert!(matches!(resume(10), Replay::Rows { .. }));
        // An install of a version without the record (no table): the oldest row decides.
        conn.execute_batch("DROP TABLE sqlnotify_trimmed").unwrap();
        let resume = |since| replay(&conn, (since, since), 10, &channels).unwrap();
        assert!(matches!(resume(5), Replay::Rows { .. }));
    }

    /// An unnamed listener starts after what the purge deleted, even once it emptied the
    /// journal, and sees a purge after its position (never one before it).
    #[test]
    fn a_listener_starts_after_the_purge_and_sees_a_purge_after_its_position() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&crate::sqlite::ddl::setup_sql())
            .unwrap();
        let insert = |conn: &Connection, n: usize| {
            for _ in 0..n {
                conn.execute(
                    "INSERT INTO sqlnotify_journal (channel, payload, created_at) VALUES ('c', '{}', 0)",
                    [],
                )
                .unwrap();
            }
        };
        assert_eq!(start(&conn).unwrap(), 0);
        assert!(!purged_after(&conn, 0).unwrap(), "no purge yet");
        insert(&conn, 5);
        let zero = std::time::Duration::ZERO;
        assert_eq!(crate::sqlite::consumers::purge(&mut conn, zero).unwrap(), 5);
        assert_eq!(head(&conn).unwrap(), 0, "the journal is empty");
        assert_eq!(start(&conn).unwrap(), 5, "after what the purge deleted");
        assert!(!purged_after(&conn, 5).unwrap());
        assert!(purged_after(&conn, 4).unwrap(), "row 5 is gone");
        insert(&conn, 3);
        assert_eq!(start(&conn).unwrap(), 8);
        assert!(!purged_after(&conn, 5).unwrap(), "rows 6..=8 are there");
        // A record of a journal dropped since says nothing about the new one.
        conn.execute_batch("DROP TABLE sqlnotify_journal").unwrap();
        conn.execute_batch(&crate::sqlite::ddl::setup_sql())
            .unwrap();
        insert(&conn, 2);
        assert!(!purged_after(&conn, 0).unwrap());
        assert_eq!(start(&conn).unwrap(), 2);
    }

    #[test]
    fn the_last_row_of_each_transaction_is_marked() {
        let mut rows = vec![
            row(Some(1)),
            row(Some(1)),
            row(None),
            row(Some(4)),
            row(Some(5)),
        ];
        mark_transactions(&mut rows, None);
        assert_eq!(
            marks(&rows),
            [Some(false), Some(true), None, Some(true), Some(true)]
        );
    }

    #[test]
    fn a_read_cut_inside_a_transaction_does_not_guess_its_last_row() {
        let mut rows = vec![row(Some(1)), row(Some(2)), row(Some(2))];
        mark_transactions(&mut rows, Some(2));
        assert_eq!(marks(&rows), [Some(true), Some(false), None]);
        // Cut inside transaction 3, whose rows so far were all on other channels: the last
        // row kept ended transaction 2 before it.
        let mut rows = vec![row(Some(1)), row(Some(2)), row(Some(2))];
        mark_transactions(&mut rows, Some(3));
        assert_eq!(marks(&rows), [Some(true), Some(false), Some(true)]);
    }

    #[test]
    fn reads_end_with_a_whole_transaction_and_mark_it() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&crate::sqlite::ddl::setup_sql())
            .unwrap();
        let insert = |channel: &str, tx: Option<i64>| {
            conn.execute(
                "INSERT INTO sqlnotify_journal (channel, payload, created_at, tx) VALUES (?1, '{}', 0, ?2)",
                params![channel, tx],
            )
            .unwrap();
        };
        // Transaction 1: rows 1-3 (row 3 on another channel); untracked row 4; transaction 5:
        // rows 5-6.
        for (channel, tx) in [("a", Some(1)), ("a", Some(1)), ("b", Some(1)), ("a", None)] {
            insert(channel, tx);
        }
        insert("a", Some(5));
        insert("a", Some(5));
        let channels: HashSet<Arc<str>> = [Arc::from("a")].into();
        // A limit of 1 still reads transaction 1 whole: its last kept row is row 2.
        let read = |cursor, limit| {
            let (rows, last, done) =
                read_after(&conn, cursor, limit, MAX_EXTENSION, READ_BYTES, &channels).unwrap();
            let rows: Vec<_> = rows
                .iter()
                .map(|r| (r.sequence, r.transaction, r.last_in_transaction))
                .collect();
            (rows, last, done)
        };
        let (got, last, done) = read(0, 1);
        assert_eq!((last, done), (3, false));
        assert_eq!(
            got,
            [
                (Some(1), Some(1), Some(false)),
                (Some(2), Some(1), Some(true))
            ]
        );
        let (got, last, done) = read(3, 10);
        assert_eq!((last, done), (6, true));
        assert_eq!(
            got,
            [
                (Some(4), None, None),
                (Some(5), Some(5), Some(false)),
                (Some(6), Some(5), Some(true))
            ]
        );
    }

    /// A read holds at most `max_bytes` of payloads, or one row larger than that: it ends
    /// before the kept row that would take it past them — inside a transaction too, whose
    /// last row there then says `None` and whose rest comes with the next read. Rows of other
    /// channels weigh nothing.
    #[test]
    fn a_read_ends_before_the_row_that_would_pass_its_bytes() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&crate::sqlite::ddl::setup_sql())
            .unwrap();
        let insert = |channel: &str, bytes: usize, tx: Option<i64>| {
            conn.execute(
                "INSERT INTO sqlnotify_journal (channel, payload, created_at, tx) VALUES (?1, ?2, 0, ?3)",
                params![channel, "x".repeat(bytes), tx],
            )
            .unwrap();
        };
        // 1-3: untracked rows of 40 bytes; 4: 500 bytes on another channel; 5-7: transaction 5,
        // 40 bytes each; 8: a row of 300 bytes alone; 9: 10 bytes.
        for _ in 0..3 {
            insert("a", 40, None);
        }
        insert("b", 500, None);
        for _ in 0..3 {
            insert("a", 40, Some(5));
        }
        insert("a", 300, None);
        insert("a", 10, None);
        let channels: HashSet<Arc<str>> = [Arc::from("a")].into();
        let read = |cursor| {
            let (rows, last, done) =
                read_after(&conn, cursor, 1_000, MAX_EXTENSION, 100, &channels).unwrap();
            let bytes: usize = rows.iter().map(|r| r.payload.len()).sum();
            let rows: Vec<_> = rows
                .iter()
                .map(|r| (r.sequence.unwrap(), r.last_in_transaction))
                .collect();
            (rows, bytes, last, done)
        };
        // 80 bytes; the third row would make 120.
        assert_eq!(read(0), (vec![(1, None), (2, None)], 80, 2, false));
        // Row 3, row 4 (another channel: nothing held), row 5 (80); row 6 would make 120: the
        // transaction is cut after row 5, whose mark is not known.
        assert_eq!(read(2), (vec![(3, None), (5, None)], 80, 5, false));
        // The rest of transaction 5, marked at its end; row 8 would pass the bytes.
        assert_eq!(
            read(5),
            (vec![(6, Some(false)), (7, Some(true))], 80, 7, false)
        );
        // A row larger than the bytes is read alone.
        assert_eq!(read(7), (vec![(8, None)], 300, 8, false));
        assert_eq!(read(8), (vec![(9, None)], 10, 9, true));
    }

    #[test]
    fn a_replay_page_holds_at_most_its_limit_even_inside_a_transaction() {
        use crate::replay::{Replay, ReplayFrom};
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&crate::sqlite::ddl::setup_sql())
            .unwrap();
        for _ in 0..5 {
            conn.execute(
                "INSERT INTO sqlnotify_journal (channel, payload, created_at, tx) VALUES ('a', '{}', 0, 7)",
                [],
            )
            .unwrap();
        }
        let channels: HashSet<Arc<str>> = [Arc::from("a")].into();
        let Replay::Rows { rows, next, .. } = replay(&conn, (0, 0), 2, &channels).unwrap() else {
            panic!("a replay from the start");
        };
        // A listener's read takes the whole transaction (5 rows); a client's page takes 2.
        assert_eq!(rows.len(), 2);
        assert!(matches!(next, Some(ReplayFrom::Journal { cursor: 2, .. })));
    }
}
