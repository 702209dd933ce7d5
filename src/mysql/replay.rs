//! Resuming a stream on MySQL / MariaDB (the SSE endpoint's `Last-Event-ID`): the journal rows
//! a client lacks, read after its set of ids (`src/read_set.rs`).
//!
//! The listener hands rows over batch by batch, and an event names the set of journal ids the
//! listener had handed over once it went out (every id up to the cursor's low watermark, and
//! above it all but the open gaps): what the client had. A replay reads the ids not in that
//! set — the gaps, late commits among them, and everything above — in id order, page by page,
//! and grows the set with every id it read (rows of other channels included: the client has
//! nothing to get from them). Live events whose ids are in the grown set are dropped (the
//! stream's fence); a row that commits after the page covering its id was read is not in the
//! set and arrives live. So every row once, without a gap: the live subscription starts before
//! the first page is read, and a row the listener hands over after that is either in the set
//! (dropped) or not (sent).
//!
//! The client's set also takes in the ids a page covered that have no row, up to the
//! listener's settled low watermark: the listener read everything there or gave it up (a
//! rolled-back insert: no row held it after the gap timeout), so none of them will come
//! live — otherwise the gaps of a client that keeps resuming would only ever grow.
//!
//! Retention: the purge records the highest id it deleted in `sqlnotify_trimmed`; a client
//! whose set lacks an id at or below it may lack a row that is gone, and gets `reset`. That is
//! checked again after each page is read: a purge (in another process, say) that committed
//! between the first check and the page took rows the page then lacks, and their ids would
//! count as read (below the settled watermark) — the client would never get them, nor a reset.
//! The purge commits its deletions and `sqlnotify_trimmed` together, so a page that lacks them
//! is followed by a check that sees them.

use mysql_async::prelude::*;
use mysql_async::Conn;

use super::catalog::db_err;
use super::ddl::{qualified, JOURNAL, TRIMMED};
use super::journal::{self, Tracking};
use crate::error::Result;
use crate::event::RawNotification;
use crate::read_point::ReadPoint;
use crate::read_set::{CursorPage, ReadSet};
use crate::replay::{Replay, ReplayFrom};
use crate::snapshot::fence::Fence;

/// One page of the rows a client with `read` lacks, after journal id `pos` (the page before's
/// last), on `channels`. `settled`: the listener's low watermark, read before the page (see
/// the module documentation).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn replay(
    conn: &mut Conn,
    database: &str,
    read: ReadSet,
    pos: Option<i64>,
    channels: &[String],
    limit: i64,
    settled: i64,
) -> Result<Replay> {
    let context = "reading the journal for a client that resumes";
    let trimmed = read_trimmed(conn, database).await?;
    if read.first_unread() <= trimmed {
        return Ok(Replay::TooOld);
    }
    if pos.is_none() {
        // A set reaching past every id this journal has given out (the purge keeps its
        // newest row, and records what it deleted) is of another journal — one before a
        // `cleanup()` restarted the ids, or made up — and would fence off live rows the
        // client never got.
        let newest: Option<i64> = conn
            .query_first(format!(
                "SELECT MAX(`id`) FROM {}",
                qualified(database, JOURNAL)
            ))
            .await
            .map_err(db_err(context))?
            .flatten();
        if read.high > newest.unwrap_or(0).max(trimmed) {
            return Ok(Replay::TooOld);
        }
    }
    // Rows up to `after` predate the recorded transactions (they all carry the one that
    // added the column): they have none, as the listener delivers them.
    let tx = match journal::tracking(conn, database).await? {
        Tracking::After(after) => format!("IF(`id` > {after}, `{}`, NULL)", super::ddl::JOURNAL_TX),
        Tracking::Off => "NULL".to_string(),
    };
    let pos = pos.unwrap_or(read.low);
    let condition = journal::unread_sql(&read.gaps, read.high);
    let rows: Vec<mysql_async::Row> = conn
        .query(format!(
            "SELECT `id`, `channel`, `payload`, {tx} FROM {} \
             WHERE `id` > {pos} AND ({condition}) ORDER BY `id` LIMIT {}",
            qualified(database, JOURNAL),
            limit.max(1)
        ))
        .await
        .map_err(db_err(context))?;
    // A purge committed since the check above may have taken rows this page lacks (see the
    // module documentation).
    if read.first_unread() <= read_trimmed(conn, database).await? {
        return Ok(Replay::TooOld);
    }
    let rows = rows
        .into_iter()
        .map(journal::journal_row)
        .collect::<Result<Vec<_>>>()?;
    let full = rows.len() as i64 >= limit.max(1);
    let last = rows.last().map(|(id, ..)| *id);
    // Ids already in the set (read as one range beyond the spelled-out gaps) are skipped.
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|(id, ..)| !read.contains(*id))
        .collect();
    let ids: Vec<i64> = rows.iter().map(|(id, ..)| *id).collect();
    // The ids this page covered that have no row, up to where the listener has settled: it
    // read everything there or gave it up (rolled back: no row held it), so no event will
    // come for them — the client's set takes them in (else the gaps of a client
    // that keeps resuming would only ever grow), before any of the page's rows.
    let mut start = read;
    let upto = if full { last.unwrap_or(pos) } else { i64::MAX }.min(settled);
    let mut from = pos + 1;
    for &id in ids.iter().take_while(|&&id| id <= upto) {
        start.mark_range(from, id - 1);
        from = id + 1;
    }
    start.mark_range(from, upto);
    let page = CursorPage::new(start.clone(), ids.clone());
    let mut grown = start;
    for &id in &ids {
        grown.mark(id);
    }
    let now = std::time::SystemTime::now();
    let out: Vec<RawNotification> = rows
        .into_iter()
        .enumerate()
        .filter_map(|(index, (id, channel, payload, tx))| {
            channels.contains(&channel).then(|| RawNotification {
                channel: channel.into(),
                payload,
                received_at: now,
                sequence: Some(id),
                events: 1,
                transaction: tx,
                // Pages are in id order: where a transaction ends is not known here.
                last_in_transaction: None,
                read_point: Some(ReadPoint::in_page(page.clone(), index)),
                decoded: None,
                part: 0,
                read_bytes: 0,
                extra_units: 0,
            })
        })
        .collect();
    Ok(Replay::Rows {
        rows: out,
        next: match (full, last) {
            (true, Some(last)) => Some(ReplayFrom::Cursor {
                read: grown.clone(),
                pos: Some(last),
            }),
            _ => None,
        },
        fence: Fence::Set(grown),
    })
}

/// The highest journal id the purge has deleted (0 before any purge).
pub(super) async fn read_trimmed(conn: &mut Conn, database: &str) -> Result<i64> {
    let upto: Option<i64> = conn
        .query_first(format!(
            "SELECT `upto` FROM {} WHERE `id` = 1",
            qualified(database, TRIMMED)
        ))
        .await
        .map_err(db_err("reading how far the purge deleted the journal"))?;
    Ok(upto.unwrap_or(0))
}
