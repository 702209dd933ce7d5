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
//! The replay is read in pages, each one statement; the first page's snapshot is kept, and
//! every page reads only what that snapshot saw, so the pages add up to one consistent read and
//! live events that snapshot saw are dropped by the client (the page's [`Fence`]).
//!
//! Retention: the purge records the newest transaction id it ever deleted, with its snapshot
//! (`sqlnotify.trimmed`); every row a client may lack has a transaction id that `before` did
//! not see — if the purge may have deleted one (see `trimmed_past`), the client gets `TooOld`.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use super::ddl::SCHEMA;
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
fn trimmed_past(s: &str, before: &str) -> String {
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

/// Reads the next page of a replay (see the module documentation).
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
    let s = quote_ident(SCHEMA);
    let err = |e| Error::db("reading the journal for a client that resumes", e);
    if page.is_none() {
        // The event's own row (the start of the replay) and everything the client may lack
        // must still be there (the second part is checked again with every page).
        let check = format!(
            "SELECT $1 = 0 OR EXISTS (SELECT 1 FROM {s}.journal WHERE id = $1), {}",
            trimmed_past(&s, "$2::text::pg_snapshot")
        );
        let row = client
            .query_typed_raw(
                &check,
                [
                    (&id as &(dyn ToSql + Sync), Type::INT8),
                    (&before, Type::TEXT),
                ],
            )
            .await
            .map_err(err)?;
        futures_util::pin_mut!(row);
        let row = futures_util::TryStreamExt::try_next(&mut row)
            .await
            .map_err(err)?;
        let (present, trimmed) = row
            .map(|r| (r.get::<_, bool>(0), r.get::<_, Option<bool>>(1)))
            .unwrap_or((false, None));
        if !present || trimmed == Some(true) {
            return Ok(Replay::TooOld);
        }
    }
    let sql = format!(
        "WITH s AS (
            SELECT coalesce($1::text::pg_snapshot, pg_catalog.pg_current_snapshot()) AS replay,
                   $2::text::pg_snapshot AS before, $3::text::pg_snapshot AS during),
         j AS (
            SELECT j.id, j.xid, j.channel, j.payload, j.events,
                   pg_catalog.max(j.id) OVER (PARTITION BY j.xid) AS tx_last,
                   NOT pg_catalog.pg_visible_in_snapshot(j.xid, s.during) AS later
              FROM {s}.journal j, s
             WHERE (j.xid >= pg_catalog.pg_snapshot_xmax($2::text::pg_snapshot)
                    OR j.xid = ANY(ARRAY(SELECT pg_catalog.pg_snapshot_xip($2::text::pg_snapshot))))
               AND j.channel = ANY($4)
               AND pg_catalog.pg_visible_in_snapshot(j.xid, s.replay))
         SELECT s.replay::text, r.id, r.xid::text, r.channel, r.payload, r.events, r.tx_last, r.later,
                {} AS trimmed, pg_catalog.pg_is_in_recovery() AS standby
           FROM s LEFT JOIN LATERAL (
                SELECT * FROM j
                 WHERE j.channel = ANY($5)
                   AND (j.later OR (j.tx_last, j.id) >= ($6, $7))
                   AND ($8::bool IS NULL OR (j.later, j.tx_last, j.id) > ($8, $9, $10))
                 ORDER BY j.later, j.tx_last, j.id
                 LIMIT $11) r ON true",
        trimmed_past(&s, "s.before")
    );
    let snapshot = page.as_ref().map(|p| p.snapshot.clone());
    let (k_later, k_group, k_id) = match &page {
        Some(p) => (Some(p.key.0), Some(p.key.1), Some(p.key.2)),
        None => (None, None, None),
    };
    let params: [(&(dyn ToSql + Sync), Type); 11] = [
        (&snapshot, Type::TEXT),
        (&before, Type::TEXT),
        (&during, Type::TEXT),
        (&all, Type::TEXT_ARRAY),
        (&channels, Type::TEXT_ARRAY),
        (&group, Type::INT8),
        (&id, Type::INT8),
        (&k_later, Type::BOOL),
        (&k_group, Type::INT8),
        (&k_id, Type::INT8),
        (&limit, Type::INT8),
    ];
    let rows = client.query_typed(&sql, &params).await.map_err(err)?;
    // A purge that committed since the check above (or the page before) deleted rows this
    // page would have held: it records the newest transaction it reached in the same
    // transaction, which this statement sees if it misses their rows.
    // A standby (a multi-host URL may reach one) lists no running transaction in a
    // snapshot's `xip`: the page's fence would drop live events of transactions it counts as
    // finished. Refused, as the listener refuses it.
    if rows.first().is_some_and(|r| r.get::<_, bool>(9)) {
        return Err(Error::Database {
            context: "reading the journal for a client that resumes".into(),
            source: "this server is a standby in recovery; the journal is read on the primary \
                     (with several hosts in the URL, add target_session_attrs=read-write)"
                .into(),
        });
    }
    if rows.first().and_then(|r| r.get::<_, Option<bool>>(8)) == Some(true) {
        return Ok(Replay::TooOld);
    }
    let replay_snapshot: String = match rows.first() {
        Some(row) => row.get(0),
        None => {
            return Err(Error::InvalidPayload {
                channel: "journal".into(),
                reason: "the replay read returned no snapshot".into(),
            })
        }
    };
    let fence = Fence::parse_postgres(&replay_snapshot).ok_or_else(|| Error::InvalidPayload {
        channel: "journal".into(),
        reason: format!("unexpected snapshot {replay_snapshot:?}"),
    })?;
    // The rows carry read points of the reads the listener would have made: `during` for the
    // rest of the client's read, the replay's own snapshot for what came later — so a client
    // that drops again during the replay resumes from where it got to.
    let same_read = ReadSnapshots::new(before.clone(), during.clone());
    let later_read = ReadSnapshots::new(during.clone(), replay_snapshot.clone());
    let mut out = Vec::new();
    let mut key = None;
    for row in &rows {
        let Some(row_id) = row.get::<_, Option<i64>>(1) else {
            continue;
        };
        let xid = super::journal::parse_xid(&row.get::<_, String>(2))?;
        let tx_last: i64 = row.get(6);
        let later: bool = row.get(7);
        let (channel, payload, events) = super::journal::content(row);
        let read = if later { &later_read } else { &same_read };
        out.push(RawNotification {
            channel,
            payload,
            received_at: std::time::SystemTime::now(),
            sequence: Some(row_id),
            events,
            transaction: Some(xid),
            last_in_transaction: Some(row_id == tx_last),
            read_point: Some(ReadPoint::new(read.clone(), tx_last)),
            decoded: None,
            part: 0,
        });
        key = Some((later, tx_last, row_id));
    }
    let full = out.len() as i64 >= limit;
    Ok(Replay::Rows {
        rows: out,
        next: match (full, key) {
            (true, Some(key)) => Some(ReplayFrom::Read {
                before,
                during,
                group,
                id,
                page: Some(ReadPage {
                    snapshot: replay_snapshot,
                    key,
                }),
            }),
            _ => None,
        },
        fence,
    })
}
