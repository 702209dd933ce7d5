//! Replaying the PostgreSQL journal for a client that resumes after an event (the SSE
//! endpoint's `Last-Event-ID`): exactly the rows the listener delivered after that event, in
//! its order, or `TooOld` when retention may have removed one of them.
//!
//! The event names its read ([`ReadPoint`](crate::ReadPoint), `src/read_point.rs`): the
//! snapshot of the read before it (`before`), its read's snapshot (`during`), its
//! transaction's last journal id (`group`) and its own id. The listener had delivered, by
//! then, every transaction `before` saw and, of those only `during` saw, the ones with a
//! smaller `group` (and the event's own rows up to it). What came after, in order: the rest of
//! `during`'s transactions, by (`group`, id); then every transaction committed since, by
//! (`group`, id) as one read of the listener returns them.
//!
//! The transactions `before` did not see are those at or after its `xmax` and those in its
//! `xip` list: the replay asks for exactly those, through the index on `xid` (not for every
//! row from its `xmin`, which a transaction left open anywhere holds back).
//!
//! The replay is read in pages; the first page's snapshot is kept, and every page reads only
//! what that snapshot saw, so the pages add up to one consistent read and live events that
//! snapshot saw are dropped by the client (the page's [`Fence`]). A page reads windows of
//! journal ids, one statement each, as the listener's own catch-up reads do
//! (`journal.rs`): a window starts at the next row after the last one (found on the primary
//! key) and holds the transactions that end in it, each fetched whole through the index on
//! `xid`; those that end past it are remembered, with their last id, until a window reaches
//! it. So a page costs its window, not the whole backlog: the statement a page was before
//! ranked every row since the client's position on every page (a window function over all of
//! them), which made a long replay quadratic — 600 pages each reading every row of an hour's
//! backlog. A page goes on to the next window until it holds `limit` rows or has read for
//! [`PAGE_TIME`], so a client whose rows are rare still gets pages (possibly empty) at that
//! pace. A transaction of many pages' rows is fetched whole by each page that returns part
//! of it (its rows after the page's key), a cost linear in its size per page.
//!
//! Replays run on a connection of their own (`Postgres::replays`), never on the control
//! connection whose overflow reads the pipeline waits for.
//!
//! A position whose snapshots are later than the server's (another cluster's, or this one's
//! before a restore to an earlier point) is refused (`TooOld`): it would count every row
//! written since as seen.
//!
//! Retention: the purge records the newest transaction id it ever deleted, with its snapshot
//! (`sqlnotify.trimmed`); every row a client may lack has a transaction id that `before` did
//! not see — if the purge may have deleted one (see `trimmed_past`), the client gets `TooOld`.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use super::ddl::SCHEMA;
use super::journal::{window_ctes, Window};
use crate::error::{Error, Result};
use crate::event::RawNotification;
use crate::read_point::{is_snapshot_text, ReadPoint, ReadSnapshots};
use crate::replay::{ReadPage, Replay, ReplayFrom};
use crate::snapshot::fence::Fence;
use crate::sql::quote_ident;

/// The condition "a purge may have deleted a row of a transaction snapshot `before` did not
/// see" (a scalar subquery; NULL when nothing was ever purged). Such a transaction is at or
/// after `before`'s `xmax`, or in its `xip` list; the purge deleted rows of transactions up to
/// the newest it records (`t.xid`), each of which had committed when it deleted it — so its
/// recorded snapshot (that of its last round, which sees what every earlier one saw) shows
/// them. A transaction left open while the purge ran is in `xip` and not in that snapshot: it
/// resets no client. The record is read that way only when the purge of this version wrote
/// it last (the row's `xmin` is its `writer`): an older sqlnotify's purge moves `xid` alone,
/// and then any transaction from `before`'s `xmin` on counts.
pub(super) fn trimmed_past(s: &str, before: &str) -> String {
    format!(
        "(SELECT CASE WHEN t.snapshot IS NOT NULL AND t.xmin = pg_catalog.xid(t.writer)
                     THEN t.xid >= pg_catalog.pg_snapshot_xmax({before})
                          OR EXISTS (SELECT 1 FROM pg_catalog.pg_snapshot_xip({before}) x
                                      WHERE x <= t.xid AND pg_catalog.pg_visible_in_snapshot(x, t.snapshot))
                     ELSE t.xid >= pg_catalog.pg_snapshot_xmin({before}) END
            FROM {s}.trimmed t WHERE t.id = 1)"
    )
}

/// Where the journal stands now, for a stream that starts live ([`Head`]): the current
/// snapshot. A resume from it (`0@0@S@S`) reads every transaction it did not see.
///
/// [`Head`]: crate::replay::Head
pub(crate) async fn head(client: &Client) -> Result<crate::replay::Head> {
    let err = |e| Error::db("reading where the journal stands for an event stream", e);
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_current_snapshot()::text, pg_catalog.pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(err)?;
    let snapshot: String = row.try_get(0).map_err(err)?;
    if row.try_get::<_, bool>(1).map_err(err)? || !is_snapshot_text(&snapshot) {
        return Err(Error::Database {
            context: "reading where the journal stands for an event stream".into(),
            source: format!(
                "not a primary's snapshot ({snapshot:?}): the journal is read on the primary \
                 (with several hosts in the URL, add target_session_attrs=read-write)"
            )
            .into(),
        });
    }
    Ok(crate::replay::Head::Snapshot(snapshot))
}

/// Ids a page's window covers at least (`window`: four pages' worth of rows, at least this
/// many).
const WINDOW_MIN: i64 = 1_000;

/// Most transactions that end past a page's window carried to the next page; past it, those
/// not carried are looked up again by the pages that reach them (cost, never correctness).
const ENDS_LATER_MAX: usize = 10_000;

/// How long a page goes on reading windows that hold too few of the client's rows before it
/// returns what it has (the endpoint writes in between, so a long replay is never silent).
const PAGE_TIME: std::time::Duration = std::time::Duration::from_millis(200);

/// Reads the next page of a replay (see the module documentation): at most `limit` rows, from
/// as many windows as it takes to fill it, within [`PAGE_TIME`].
pub(crate) async fn replay(
    client: &Client,
    from: ReplayFrom,
    channels: &[String],
    all: &[String],
    limit: i64,
) -> Result<Replay> {
    let ReplayFrom::Read {
        before,
        during,
        group,
        id,
        page,
    } = from
    else {
        // A position of a journal in commit order: not one of ours.
        return Ok(Replay::TooOld);
    };
    let snapshots_ok = is_snapshot_text(&before)
        && is_snapshot_text(&during)
        && page.as_ref().is_none_or(|p| is_snapshot_text(&p.snapshot));
    // `0@0@S@S`, a stream's head (`head`): every transaction `S` saw, and no row of it.
    let at_head = id == 0 && group == 0;
    if !snapshots_ok || (id < 1 && !at_head) || group < id {
        return Ok(Replay::TooOld);
    }
    let (mut page, first) = match page {
        Some(page) => (page, false),
        None => match first_page(client, &before, &during, group, id).await? {
            Some(page) => (Box::new(page), true),
            None => return Ok(Replay::TooOld),
        },
    };
    let fence = Fence::parse_postgres(&page.snapshot).ok_or_else(|| Error::InvalidPayload {
        channel: "journal".into(),
        reason: format!("unexpected snapshot {:?}", page.snapshot),
    })?;
    let read = Read {
        before: &before,
        during: &during,
        channels,
        all,
    };
    let mut more = true;
    if first && before == during {
        // A stream's head, or a read that saw nothing new: no rest of the client's read to
        // look for (its windows would walk every later row of the journal finding none).
        match first_later_row(client, &during, all, &page.snapshot).await? {
            Some(first) => page.key = (true, first, i64::MIN),
            None => more = false,
        }
    }
    let started = std::time::Instant::now();
    let mut rows = Vec::new();
    // Payload bytes the page may still take (`PAGE_BYTES`; a window's first row whatever its
    // size, so that a replay always moves on).
    let mut bytes = crate::replay::PAGE_BYTES;
    while more && (rows.len() as i64) < limit && bytes > 0 {
        if !rows.is_empty() && started.elapsed() >= PAGE_TIME {
            break;
        }
        let left = (limit - rows.len() as i64, bytes);
        match window(client, &read, &mut page, left).await? {
            None => return Ok(Replay::TooOld),
            Some((window_rows, window_more)) => {
                let taken: usize = window_rows.iter().map(|r| r.payload.len()).sum();
                bytes = bytes.saturating_sub(taken.max(1));
                rows.extend(window_rows);
                more = window_more;
            }
        }
        if started.elapsed() >= PAGE_TIME {
            break;
        }
    }
    Ok(Replay::Rows {
        rows,
        next: more.then_some(ReplayFrom::Read {
            before,
            during,
            group,
            id,
            page: Some(page),
        }),
        fence,
    })
}

/// What a replay reads: transactions snapshot `before` did not see, on `all` channels (which
/// decide where each transaction ends), the rows of `channels` among them.
struct Read<'a> {
    before: &'a str,
    during: &'a str,
    channels: &'a [String],
    all: &'a [String],
}

/// Reads at most `limit` rows of the window at `page`'s key — ending with the row whose
/// payload takes them past `bytes` — and moves the key past them.
/// Returns them and whether more may follow; `None` when a purge may have deleted rows the
/// client lacks (`TooOld`).
async fn window(
    client: &Client,
    read: &Read<'_>,
    page: &mut ReadPage,
    (limit, bytes): (i64, usize),
) -> Result<Option<(Vec<RawNotification>, bool)>> {
    let s = quote_ident(SCHEMA);
    let err = |e| Error::db("reading the journal for a client that resumes", e);
    let (later, k_group, k_id) = page.key;
    // The rows of this part of the replay: transactions `before` did not see, that the
    // replay's snapshot sees, and that the client's read saw (`later` false) or did not (true).
    let part = "(j.xid >= pg_catalog.pg_snapshot_xmax($1::text::pg_snapshot)
          OR j.xid = ANY(ARRAY(SELECT pg_catalog.pg_snapshot_xip($1::text::pg_snapshot))))
         AND j.channel = ANY($3)
         AND pg_catalog.pg_visible_in_snapshot(j.xid, $4::text::pg_snapshot)
         AND pg_catalog.pg_visible_in_snapshot(j.xid, $2::text::pg_snapshot) = NOT $5";
    // The listener's windows (`journal::window_ctes`), from the part's first row at or after
    // `k_group`: a window returns the rows of the transactions that end in it (and at or after
    // `k_group`: one that ends before was replayed whole) after the key, fetched whole through
    // the index on `xid`, in (last id, id) order, at most `limit`. No first row: the part is
    // done (`bound` NULL). The rows are also cut once their payloads pass `$13` bytes (a row
    // is kept while `before_bytes`, the payloads ahead of it, are below that, so the first
    // always is), and `cut` says that rows of the window were left for the next page.
    let sql = format!(
        "WITH {ctes}
         SELECT r.id, r.xid::text, r.last, r.channel, r.payload, r.events,
                b.bound, later.xids, later.lasts, {trimmed} AS trimmed,
                pg_catalog.pg_is_in_recovery() AS standby, r.cut
           FROM b CROSS JOIN later LEFT JOIN LATERAL (
                SELECT c.* FROM (
                       SELECT q.*, pg_catalog.bool_or(q.before_bytes >= $13) OVER () AS cut
                         FROM (SELECT j.id, j.xid, j.channel, j.payload, j.events, e.last,
                                      pg_catalog.sum(coalesce(pg_catalog.octet_length(j.payload), 0))
                                        OVER (ORDER BY e.last, j.id ROWS UNBOUNDED PRECEDING)
                                      - coalesce(pg_catalog.octet_length(j.payload), 0) AS before_bytes
                                 FROM e CROSS JOIN LATERAL (
                                      SELECT * FROM {s}.journal j
                                       WHERE j.xid = e.xid AND j.channel = ANY($11)) j
                                WHERE (e.last, j.id) > ($6, $7)
                                ORDER BY e.last, j.id
                                LIMIT $12) q) c
                 WHERE c.before_bytes < $13
                 ORDER BY c.last, c.id) r ON true",
        trimmed = trimmed_past(&s, "$1::text::pg_snapshot"),
        ctes = window_ctes(
            part,
            Window {
                after: "($6 - 1)",
                ids: "$8",
                all: "$3",
                known: ("$9", "$10"),
            }
        ),
    );
    let window = limit.saturating_mul(4).max(WINDOW_MIN);
    let (xids, lasts): (Vec<String>, Vec<i64>) = page.ends_later.iter().cloned().unzip();
    let page_bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
    let params: [(&(dyn ToSql + Sync), Type); 13] = [
        (&read.before, Type::TEXT),
        (&read.during, Type::TEXT),
        (&read.all, Type::TEXT_ARRAY),
        (&page.snapshot, Type::TEXT),
        (&later, Type::BOOL),
        (&k_group, Type::INT8),
        (&k_id, Type::INT8),
        (&window, Type::INT8),
        (&xids, Type::TEXT_ARRAY),
        (&lasts, Type::INT8_ARRAY),
        (&read.channels, Type::TEXT_ARRAY),
        (&limit, Type::INT8),
        (&page_bytes, Type::INT8),
    ];
    let rows = client.query_typed(&sql, &params).await.map_err(err)?;
    let Some(first) = rows.first() else {
        return Err(Error::InvalidPayload {
            channel: "journal".into(),
            reason: "the replay read returned no row".into(),
        });
    };
    // A standby (a multi-host URL may reach one) lists no running transaction in a
    // snapshot's `xip`: the page's fence would drop live events of transactions it counts as
    // finished. Refused, as the listener refuses it.
    if first.get::<_, bool>(10) {
        return Err(Error::Database {
            context: "reading the journal for a client that resumes".into(),
            source: "this server is a standby in recovery; the journal is read on the primary \
                     (with several hosts in the URL, add target_session_attrs=read-write)"
                .into(),
        });
    }
    // A purge that committed since the check of the first page (or the window before)
    // deleted rows this window would have held: it records the newest transaction it reached
    // in the same transaction, which this statement sees if it misses their rows.
    if first.get::<_, Option<bool>>(9) == Some(true) {
        return Ok(None);
    }
    let bound: Option<i64> = first.get(6);
    let cut = first.get::<_, Option<bool>>(11) == Some(true);
    let found = first.get::<_, Option<Vec<String>>>(7).unwrap_or_default();
    let found_lasts = first.get::<_, Option<Vec<i64>>>(8).unwrap_or_default();
    page.ends_later
        .retain(|(_, last)| bound.is_some_and(|b| *last > b));
    page.ends_later.extend(found.into_iter().zip(found_lasts));
    page.ends_later.sort_by_key(|(_, last)| *last);
    page.ends_later.truncate(ENDS_LATER_MAX);
    // The rows carry read points of the reads the listener would have made: `during` for the
    // rest of the client's read, the replay's own snapshot for what came later — so a client
    // that drops again during the replay resumes from where it got to.
    let snapshots = if later {
        ReadSnapshots::new(read.during.to_string(), page.snapshot.clone())
    } else {
        ReadSnapshots::new(read.before.to_string(), read.during.to_string())
    };
    let mut out = Vec::new();
    let mut key = None;
    for row in &rows {
        let Some(row_id) = row.get::<_, Option<i64>>(0) else {
            continue;
        };
        let xid = super::journal::parse_xid(&row.get::<_, String>(1))?;
        let tx_last: i64 = row.get(2);
        let (channel, payload, events) = super::journal::content(row);
        out.push(RawNotification {
            channel,
            payload,
            received_at: std::time::SystemTime::now(),
            sequence: Some(row_id),
            events,
            transaction: Some(xid),
            last_in_transaction: Some(row_id == tx_last),
            read_point: Some(ReadPoint::new(snapshots.clone(), tx_last)),
            decoded: None,
            part: 0,
            read_bytes: 0,
            extra_units: 0,
        });
        key = Some((tx_last, row_id));
    }
    let next = match (bound, key) {
        // A full page (in rows, or in bytes): the next one goes on after its last row, in the
        // same window.
        (_, Some(key)) if cut || out.len() as i64 >= limit => Some((later, key.0, key.1)),
        // The window is done: the next one starts after it.
        (Some(bound), _) => Some((later, bound.saturating_add(1), i64::MIN)),
        // The client's read is done: the transactions it did not see, from the first one's
        // first row on (through the index on `xid`).
        (None, _) if !later => first_later_row(client, read.during, read.all, &page.snapshot)
            .await?
            .map(|first| (true, first, i64::MIN)),
        (None, _) => None,
    };
    if let Some(next) = next {
        if next.0 != later {
            page.ends_later.clear();
        }
        page.key = next;
    }
    Ok(Some((out, next.is_some())))
}

/// The first page of a replay: checks that the event's own row (the start of the replay) and
/// everything the client may lack are still there (the second part is checked again with
/// every page), and takes the replay's snapshot. `None`: the client must start over.
async fn first_page(
    client: &Client,
    before: &str,
    during: &str,
    group: i64,
    id: i64,
) -> Result<Option<ReadPage>> {
    let s = quote_ident(SCHEMA);
    let err = |e| Error::db("reading the journal for a client that resumes", e);
    // A position from the future — another cluster's, or this one's before a restore to an
    // earlier point — would count the rows written since as seen: refused.
    let check = format!(
        "SELECT $1 = 0 OR EXISTS (SELECT 1 FROM {s}.journal WHERE id = $1), {},
                pg_catalog.pg_current_snapshot()::text,
                pg_catalog.pg_snapshot_xmax($3::text::pg_snapshot)
                  <= pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())
                AND pg_catalog.pg_snapshot_xmax($2::text::pg_snapshot)
                  <= pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())",
        trimmed_past(&s, "$2::text::pg_snapshot")
    );
    let row = client
        .query_typed_opt(
            &check,
            &[
                (&id, Type::INT8),
                (&before, Type::TEXT),
                (&during, Type::TEXT),
            ],
        )
        .await
        .map_err(err)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let present: bool = row.get(0);
    let trimmed: Option<bool> = row.get(1);
    let snapshot: String = row.get(2);
    let from_now: bool = row.get(3);
    if !present || trimmed == Some(true) || !from_now || !is_snapshot_text(&snapshot) {
        return Ok(None);
    }
    // The rest of the client's read: its transaction's rows after the event's (from the
    // event's own row: a row may carry several events), then the transactions that end later.
    Ok(Some(ReadPage {
        snapshot,
        key: (false, group, id.saturating_sub(1)),
        ends_later: Vec::new(),
    }))
}

/// The first journal id of the transactions the client's read (`during`) did not see and the
/// replay's snapshot does (`None`: there are none), through the index on `xid` (`k.id + 0`
/// keeps `min` from walking the primary key from the journal's first row).
async fn first_later_row(
    client: &Client,
    during: &str,
    all: &[String],
    replay: &str,
) -> Result<Option<i64>> {
    let sql = format!(
        "SELECT pg_catalog.min(k.id + 0) FROM {s}.journal k
          WHERE (k.xid >= pg_catalog.pg_snapshot_xmax($1::text::pg_snapshot)
                 OR k.xid = ANY(ARRAY(SELECT pg_catalog.pg_snapshot_xip($1::text::pg_snapshot))))
            AND k.channel = ANY($2)
            AND pg_catalog.pg_visible_in_snapshot(k.xid, $3::text::pg_snapshot)",
        s = quote_ident(SCHEMA)
    );
    let row = client
        .query_typed_opt(
            &sql,
            &[
                (&during, Type::TEXT),
                (&all, Type::TEXT_ARRAY),
                (&replay, Type::TEXT),
            ],
        )
        .await
        .map_err(|e| Error::db("reading the journal for a client that resumes", e))?;
    Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
}
