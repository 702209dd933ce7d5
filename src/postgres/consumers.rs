//! PostgreSQL's record of named consumers (`sqlnotify.consumers`): registering, saving
//! positions, the journal purge that respects them, backlog, listing and dropping. The
//! contract is in `crate::consumer`; this file is its SQL.
//!
//! A consumer's position is the snapshot of its last complete journal read, that snapshot's
//! `xmin` as a transaction-id horizon, the read in progress (`reading`, its snapshot, and
//! `read_to`, the last id its delivered transactions end at) and the ids of transactions it
//! had delivered in part (`seen`; see `journal.rs`): a journal row is unread by a consumer
//! when `xid >= horizon`, the snapshot did not see its transaction, the read in progress has
//! not delivered it, its id is not in `seen`, and it is on one of the consumer's `channels`
//! (NULL: every channel, for consumers registered by an older sqlnotify). A consumer saved by
//! an older sqlnotify has no snapshot (its `seen` then holds every id it delivered at or above
//! the horizon), or one it left behind when it moved the horizon on: whatever that snapshot
//! saw had been delivered too, so both read the same way. The purge keeps the rows a consumer
//! has not read, but for `seen` and the read in progress (simpler, and that read completes
//! soon); the backlog counts neither.
//!
//! Why the purge runs in a transaction of its own, on a connection of its own. A dropped or
//! expired consumer that starts again sets itself active and reads what it `missed`; the purge
//! deletes what no active consumer protects and records what it deleted on the inactive ones.
//! If the purge decided from a snapshot taken before a consumer came back, and recorded the
//! miss after that consumer had looked, the rows would be gone without a word. So the purge
//! first locks the rows of the inactive consumers (`FOR UPDATE`: a consumer coming back waits
//! for the purge to commit, then sees what it missed), and then deletes with a later snapshot
//! in which every consumer *not* among the locked ones — active, new, or dropped meanwhile —
//! protects its rows. The control connection cannot hold a transaction (other calls share it),
//! hence the purge's own connection, opened only when there is something to purge.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use super::control::Control;
use super::ddl::SCHEMA;
use super::journal::{Position, Reading};
use crate::consumer::{
    add_missed, Backlog, ConsumerInfo, ConsumerParams, ConsumerPosition, ConsumerState,
};
use crate::error::{Error, Result};
use crate::sql::{quote_ident, quote_literal};

/// Journal rows deleted per purge transaction, so no lock is held long.
const PURGE_BATCH: i64 = 5_000;

/// How long the purge's session may sit idle inside its transaction
/// (`idle_in_transaction_session_timeout`) before the server ends it. The purge runs its
/// statements one after the other and is never idle in it for long; a purging process that
/// froze, or whose network went silent, mid-transaction would otherwise keep its backend and
/// its locks — the expiry `UPDATE`, `FOR UPDATE` on every dropped or expired consumer's row,
/// the `trimmed` upsert — until the OS's TCP keepalive gave up on it (about 2 h): a member of
/// a consumer coming back would wait in `place` (reactivating its row `FOR UPDATE`) holding the
/// lease and reading nothing, and every other process's purge would queue on `trimmed`.
const PURGE_IDLE_IN_TRANSACTION: &str = "30s";
/// How long one of the purge's statements waits for a lock (`lock_timeout`) before the purge
/// gives up for this round (the error is its caller's, the next round tries again): a session
/// holding a consumer's row or `trimmed` never makes the purge — and those queued behind its
/// locks — wait without bound.
const PURGE_LOCK_TIMEOUT: &str = "10s";
/// How long one of the purge's statements may run (`statement_timeout`): generous — a batch
/// deletes at most [`PURGE_BATCH`] rows, in well under a second on a healthy server — but a
/// bound all the same.
const PURGE_STATEMENT_TIMEOUT: &str = "5min";

/// Set in each of the purge's transactions (`SET LOCAL`: through a pooler in transaction
/// mode, a session setting would stay on a server connection the application's transactions
/// use next): [`PURGE_IDLE_IN_TRANSACTION`], [`PURGE_LOCK_TIMEOUT`],
/// [`PURGE_STATEMENT_TIMEOUT`]. The connection itself gets the listener's server-side TCP
/// keepalive (`listener::KEEPALIVE`), so the server finds a silent peer within seconds while
/// the connection waits for it.
fn purge_guards() -> String {
    format!(
        "SET LOCAL idle_in_transaction_session_timeout = '{PURGE_IDLE_IN_TRANSACTION}'; \
         SET LOCAL lock_timeout = '{PURGE_LOCK_TIMEOUT}'; \
         SET LOCAL statement_timeout = '{PURGE_STATEMENT_TIMEOUT}'"
    )
}

/// The columns registered consumers need, added to a `sqlnotify.consumers` of an older
/// version (small table, never written by application transactions — but listeners of other
/// processes save to it: wait at most 5 s for them, or the caller's own `lock_timeout`,
/// rather than queue everyone; a lock not obtained fails with `lock_not_available`). Part of the
/// install script; also run before every use, so a database installed by someone else's
/// migrations is upgraded by the first notifier that needs it. Does nothing when sqlnotify was
/// never installed.
pub(crate) fn setup_sql() -> String {
    let table = format!("{}.consumers", quote_ident(SCHEMA));
    format!(
        "DO $sqn_consumers$
DECLARE
  _sqn_lock text := pg_catalog.current_setting('lock_timeout');
BEGIN
  IF pg_catalog.to_regclass({name}) IS NOT NULL THEN
    IF (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute
         WHERE attrelid = pg_catalog.to_regclass({name}) AND NOT attisdropped
           AND attname IN ('state', 'channels', 'expire_after', 'missed', 'seen', 'snapshot',
                           'reading', 'read_to')) < 8 THEN
      -- never wait without bound: a caller that set its own lock_timeout keeps it
      IF _sqn_lock = '0' THEN
        PERFORM pg_catalog.set_config('lock_timeout', '5s', true);
      END IF;
      BEGIN
        ALTER TABLE {table}
          ADD COLUMN IF NOT EXISTS state text NOT NULL DEFAULT 'active',
          ADD COLUMN IF NOT EXISTS channels text[],
          ADD COLUMN IF NOT EXISTS expire_after interval,
          ADD COLUMN IF NOT EXISTS missed text[],
          ADD COLUMN IF NOT EXISTS seen bigint[],
          ADD COLUMN IF NOT EXISTS snapshot pg_snapshot,
          ADD COLUMN IF NOT EXISTS reading pg_snapshot,
          ADD COLUMN IF NOT EXISTS read_to bigint;
      EXCEPTION WHEN lock_not_available THEN
        RAISE EXCEPTION 'sqlnotify: upgrading {table} (adding the columns of registered consumers) needs a moment when no other session is using it; retry'
          USING ERRCODE = 'lock_not_available';
      END;
      PERFORM pg_catalog.set_config('lock_timeout', _sqn_lock, true);
    END IF;
  END IF;
END
$sqn_consumers$;",
        name = quote_literal(&table),
    )
}

/// Upgrades the consumers table if needed; returns whether sqlnotify is installed at all.
pub(crate) async fn ensure(client: &Client) -> Result<bool> {
    client
        .batch_execute(&setup_sql())
        .await
        .map_err(|e| Error::db("upgrading sqlnotify.consumers", e))?;
    let installed = client
        .query_typed_one(
            "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
            &[(&format!("{}.consumers", quote_ident(SCHEMA)), Type::TEXT)],
        )
        .await
        .map_err(|e| Error::db("looking for sqlnotify.consumers", e))?;
    Ok(installed.get(0))
}

fn secs(consumer: &ConsumerParams) -> Option<f64> {
    consumer.expire_after.map(|d| d.as_secs_f64())
}

fn parse_xid(text: &str) -> Result<u64> {
    text.parse().map_err(|_| Error::InvalidPayload {
        channel: "consumers".into(),
        reason: format!("unexpected transaction id {text:?}"),
    })
}

/// A consumer of this name that is registered already takes up again: active, its channels
/// and expiry updated, what it missed (as recorded by purges while it was dropped or expired)
/// taken and cleared. Returns its saved position and the missed channels; `None` when no
/// consumer has this name. The inner `FOR UPDATE` waits for a purge that holds the row and
/// returns the row as that purge left it.
pub(crate) async fn reactivate(
    client: &Client,
    consumer: &ConsumerParams,
    channels: &[String],
) -> Result<Option<(Position, Vec<String>)>> {
    let sql = format!(
        "UPDATE {s}.consumers c SET state = 'active', missed = NULL, channels = $2,
                expire_after = pg_catalog.make_interval(secs => $3), updated_at = now()
           FROM (SELECT name, missed FROM {s}.consumers WHERE name = $1 FOR UPDATE) o
          WHERE c.name = o.name
         RETURNING c.horizon::text, pg_catalog.array_remove(o.missed, NULL),
                   pg_catalog.array_remove(c.seen, NULL), c.snapshot::text, c.reading::text,
                   c.read_to",
        s = quote_ident(SCHEMA)
    );
    let name = &consumer.name;
    let row = client
        .query_typed_opt(
            &sql,
            &[
                (name, Type::TEXT),
                (&channels, Type::TEXT_ARRAY),
                (&secs(consumer), Type::FLOAT8),
            ],
        )
        .await
        .map_err(|e| Error::db(format!("registering consumer {name:?}"), e))?;
    let Some(row) = row else { return Ok(None) };
    let horizon = parse_xid(&row.get::<_, String>(0))?;
    let mut missed: Vec<String> = row.get::<_, Option<Vec<String>>>(1).unwrap_or_default();
    missed.sort();
    missed.dedup();
    let seen: Option<Vec<i64>> = row.get(2);
    let snapshot: Option<String> = row.get(3);
    let reading = row.get::<_, Option<String>>(4).map(|during| Reading {
        during,
        through: row.get(5),
    });
    Ok(Some((
        Position {
            horizon,
            snapshot,
            seen,
            reading,
        },
        missed,
    )))
}

/// Registers a new consumer at `position`.
pub(crate) async fn insert(
    client: &Client,
    consumer: &ConsumerParams,
    channels: &[String],
    position: &Position,
) -> Result<()> {
    let sql = format!(
        "INSERT INTO {s}.consumers AS c (name, horizon, seen, snapshot, reading, read_to, updated_at,
                                         state, channels, expire_after)
         VALUES ($1, $2::text::xid8, $5, $6::text::pg_snapshot, $7::text::pg_snapshot, $8, now(),
                 'active', $3, pg_catalog.make_interval(secs => $4))
         ON CONFLICT (name) DO UPDATE SET horizon = GREATEST(c.horizon, EXCLUDED.horizon),
                seen = NULL,
                snapshot = CASE WHEN {later} THEN EXCLUDED.snapshot ELSE c.snapshot END,
                reading = CASE WHEN {later} THEN EXCLUDED.reading ELSE c.reading END,
                read_to = CASE WHEN {later} THEN EXCLUDED.read_to ELSE c.read_to END,
                updated_at = now()",
        later = later("EXCLUDED.horizon", "EXCLUDED.snapshot", "c"),
        s = quote_ident(SCHEMA)
    );
    let name = &consumer.name;
    client
        .query_typed(
            &sql,
            &[
                (name, Type::TEXT),
                (&position.horizon.to_string(), Type::TEXT),
                (&channels, Type::TEXT_ARRAY),
                (&secs(consumer), Type::FLOAT8),
                (&position.seen, Type::INT8_ARRAY),
                (&position.snapshot, Type::TEXT),
                (&reading_snapshot(position), Type::TEXT),
                (&read_to(position), Type::INT8),
            ],
        )
        .await
        .map_err(|e| Error::db(format!("registering consumer {name:?}"), e))?;
    Ok(())
}

/// The condition "the position (`horizon`, `snapshot`) is not older than consumer row `c`'s":
/// a later horizon, or the same one (a transaction left open holds it) with a snapshot taken
/// no earlier — so a late save (a process that lost its lease and has not noticed yet) never
/// takes a consumer back. A missing snapshot (an older sqlnotify's) compares by horizon alone.
fn later(horizon: &str, snapshot: &str, c: &str) -> String {
    format!(
        "({horizon} > {c}.horizon OR ({horizon} = {c}.horizon
           AND coalesce(pg_catalog.pg_snapshot_xmax({snapshot}) >= pg_catalog.pg_snapshot_xmax({c}.snapshot), true)))"
    )
}

/// The snapshot of the read in progress a position saves (`reading`).
fn reading_snapshot(position: &Position) -> Option<&str> {
    position.reading.as_ref().map(|r| r.during.as_str())
}

/// How far the read in progress a position saves got (`read_to`).
fn read_to(position: &Position) -> Option<i64> {
    position.reading.as_ref().and_then(|r| r.through)
}

/// What a position save found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Saved {
    /// Saved; the consumer is active.
    Active,
    /// Saved, but the consumer had been dropped or expired meanwhile.
    Inactive,
    /// Its row is gone (deleted by hand).
    Missing,
}

/// Saves consumer `name`'s position (never moving it backwards) and marks it alive. Does not
/// change its state: see [`save_running`] for a running listener.
pub(crate) async fn save(client: &Client, name: &str, position: &Position) -> Result<Saved> {
    // SET reads the row's old values: `seen` and the snapshot follow the horizon they belong
    // to.
    let sql = format!(
        "UPDATE {s}.consumers c SET horizon = GREATEST(c.horizon, $2::text::xid8),
                seen = CASE WHEN {later} THEN $3 ELSE c.seen END,
                snapshot = CASE WHEN {later} THEN $4::text::pg_snapshot ELSE c.snapshot END,
                reading = CASE WHEN {later} THEN $5::text::pg_snapshot ELSE c.reading END,
                read_to = CASE WHEN {later} THEN $6 ELSE c.read_to END,
                updated_at = now()
          WHERE c.name = $1 RETURNING c.state, c.missed IS NOT NULL",
        s = quote_ident(SCHEMA),
        later = later("$2::text::xid8", "$4::text::pg_snapshot", "c"),
    );
    let row = client
        .query_typed_opt(
            &sql,
            &[
                (&name, Type::TEXT),
                (&position.horizon.to_string(), Type::TEXT),
                (&position.seen, Type::INT8_ARRAY),
                (&position.snapshot, Type::TEXT),
                (&reading_snapshot(position), Type::TEXT),
                (&read_to(position), Type::INT8),
            ],
        )
        .await
        .map_err(|e| Error::db(format!("saving the position of consumer {name:?}"), e))?;
    Ok(match row {
        None => Saved::Missing,
        Some(row) => {
            let state = ConsumerState::parse(&row.get::<_, String>(0));
            if state == ConsumerState::Active && !row.get::<_, bool>(1) {
                Saved::Active
            } else {
                Saved::Inactive
            }
        }
    })
}

/// A running listener's save: as [`save`], and a consumer dropped or expired while it runs
/// (or whose row was deleted) registers again. Returns the channels on which rows it had not
/// read were purged meanwhile — every channel when its row was deleted, since nothing says
/// what was purged then.
pub(crate) async fn save_running(
    client: &Client,
    consumer: &ConsumerParams,
    channels: &[String],
    position: &Position,
) -> Result<Vec<String>> {
    match save(client, &consumer.name, position).await? {
        Saved::Active => Ok(Vec::new()),
        Saved::Inactive => Ok(reactivate(client, consumer, channels)
            .await?
            .map(|(_, missed)| missed)
            .unwrap_or_default()),
        Saved::Missing => {
            insert(client, consumer, channels, position).await?;
            Ok(channels.to_vec())
        }
    }
}

/// The condition "consumer row `c` has not read journal row `j`" — but for the ids in its
/// `seen` and the read in progress — on its channels. The purge goes by it: it keeps the rows
/// a read in progress has delivered until that read completes (simpler, and it completes
/// soon).
const UNREAD: &str = "j.xid >= c.horizon
    AND NOT coalesce(pg_catalog.pg_visible_in_snapshot(j.xid, c.snapshot), false)
    AND (c.channels IS NULL OR j.channel = ANY(c.channels))";

/// The journal rows consumer row `c` has not been handed (a derived table of `id`,
/// `created_at`, correlated with `c`): [`UNREAD`], not in `seen`, and not of a transaction its
/// read in progress delivered — one that read's snapshot sees whose last row on the
/// consumer's channels is at or before `read_to` (see `journal.rs`). That needs each
/// transaction's last id, one pass over the rows (a window), and only while a read is in
/// progress: the other branch is skipped by its one-time filter.
fn undelivered_rows(s: &str) -> String {
    format!(
        "(SELECT j.id, j.created_at FROM {s}.journal j
           WHERE c.read_to IS NULL AND {UNREAD} AND NOT (j.id = ANY(coalesce(c.seen, '{{}}')))
          UNION ALL
          SELECT w.id, w.created_at FROM (
                 SELECT j.id, j.created_at, j.xid,
                        pg_catalog.max(j.id) OVER (PARTITION BY j.xid) AS last
                   FROM {s}.journal j
                  WHERE c.read_to IS NOT NULL AND {UNREAD}
                    AND NOT (j.id = ANY(coalesce(c.seen, '{{}}')))) w
           WHERE NOT coalesce(pg_catalog.pg_visible_in_snapshot(w.xid, c.reading)
                              AND w.last <= c.read_to, false))"
    )
}

/// The backlog of every consumer row `c` (a correlated subquery).
fn backlog_sql() -> String {
    format!(
        "(SELECT pg_catalog.count(*) FROM {} u)",
        undelivered_rows(&quote_ident(SCHEMA))
    )
}

/// Journal rows at or after consumer `name`'s horizon on its channels, and the oldest one's
/// age.
pub(crate) async fn backlog(client: &Client, name: &str) -> Result<Option<Backlog>> {
    let s = quote_ident(SCHEMA);
    let sql = format!(
        "SELECT u.n, extract(epoch FROM pg_catalog.clock_timestamp() - u.oldest)::float8
           FROM {s}.consumers c
           CROSS JOIN LATERAL (SELECT pg_catalog.count(*) AS n, pg_catalog.min(u.created_at) AS oldest
                                 FROM {} u) u
          WHERE c.name = $1",
        undelivered_rows(&s),
    );
    let row = client
        .query_typed_opt(&sql, &[(&name, Type::TEXT)])
        .await
        .map_err(|e| Error::db(format!("counting the backlog of consumer {name:?}"), e))?;
    Ok(row.map(|r| Backlog::new(r.get(0), r.get(1))))
}

/// Every registered consumer.
pub(crate) async fn list(client: &Client) -> Result<Vec<ConsumerInfo>> {
    if !ensure(client).await? {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT c.name, c.state, c.horizon::text, extract(epoch FROM c.updated_at)::float8,
                pg_catalog.array_remove(c.channels, NULL),
                extract(epoch FROM c.expire_after)::float8, {}
           FROM {s}.consumers c ORDER BY c.name",
        backlog_sql(),
        s = quote_ident(SCHEMA)
    );
    let rows = client
        .query_typed(&sql, &[])
        .await
        .map_err(|e| Error::db("listing the consumers", e))?;
    rows.iter()
        .map(|r| {
            Ok(ConsumerInfo {
                name: r.get(0),
                state: ConsumerState::parse(&r.get::<_, String>(1)),
                position: ConsumerPosition::Horizon(parse_xid(&r.get::<_, String>(2))?),
                last_active: crate::consumer::unix_time(r.get(3)),
                channels: r.get(4),
                expire_after: r
                    .get::<_, Option<f64>>(5)
                    .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok()),
                backlog: r.get::<_, i64>(6).max(0) as u64,
            })
        })
        .collect()
}

/// Marks consumer `name` dropped.
pub(crate) async fn drop_consumer(client: &Client, name: &str) -> Result<()> {
    if !ensure(client).await? {
        return Err(Error::UnknownConsumer { name: name.into() });
    }
    let sql = format!(
        "UPDATE {s}.consumers SET state = 'dropped' WHERE name = $1 RETURNING 1",
        s = quote_ident(SCHEMA)
    );
    let row = client
        .query_typed_opt(&sql, &[(&name, Type::TEXT)])
        .await
        .map_err(|e| Error::db(format!("dropping consumer {name:?}"), e))?;
    match row {
        Some(_) => {
            log::info!("sqlnotify: consumer {name:?} dropped");
            Ok(())
        }
        None => Err(Error::UnknownConsumer { name: name.into() }),
    }
}

/// The condition "no consumer still has to read journal row `j`", where the consumers that
/// protect nothing are those named in parameter `names` and, when given, those whose state is
/// in parameter `states`. The delete passes only `names`, the inactive consumers it locked: a
/// consumer dropped after that lock is not among them and keeps its rows for this round —
/// deleting them would leave nothing on record for it.
fn unprotected(s: &str, names: u8, states: Option<u8>) -> String {
    let states = states
        .map(|p| format!(" AND c.state <> ALL(${p})"))
        .unwrap_or_default();
    format!(
        "NOT EXISTS (SELECT 1 FROM {s}.consumers c
                      WHERE NOT (c.name = ANY(${names})){states}
                        AND {UNREAD})"
    )
}

/// The journal has no index on `created_at` (it cost writers ~5 µs per row, a fifth of row
/// capture's trigger: `scripts/trigger-cost`), so the purge finds rows older than the retention
/// (`created_at` older than parameter `secs` seconds) through the primary key: this is the
/// first id it must not reach, the smallest id of a row younger than the retention (past the
/// end when there is none). `created_at` is the writer's transaction start and ids are taken
/// in insert order, so every row below it is older than the retention — scanning the key up
/// to it reads the rows to purge (and those a consumer still protects), never the young
/// rows after them. A row of a transaction that started before the cutoff but wrote after a
/// younger one (a long transaction) lies above it: it is purged in a later round, once the
/// rows below it have aged too — later than its age says, never earlier.
fn purge_bound(s: &str, secs: u8) -> String {
    format!(
        "coalesce((SELECT k.id FROM {s}.journal k
                    WHERE k.created_at >= now() - pg_catalog.make_interval(secs => ${secs})
                    ORDER BY k.id LIMIT 1), 9223372036854775807)"
    )
}

/// States that protect nothing.
fn inactive() -> Vec<String> {
    vec![
        ConsumerState::Dropped.as_str().to_string(),
        ConsumerState::Expired.as_str().to_string(),
    ]
}

/// Expires consumers away longer than their expiry, then deletes journal rows older than
/// `retention` that no registered consumer still has to read, recording them on the inactive
/// consumers that had not read them. Returns how many journal rows were deleted.
pub(crate) async fn purge_journal(
    control: &Control,
    retention: std::time::Duration,
) -> Result<u64> {
    let client = control.client().await?;
    if !ensure(&client).await? {
        return Ok(0);
    }
    let s = quote_ident(SCHEMA);
    let secs = retention.as_secs_f64();
    let none: Vec<String> = Vec::new();
    let inactive = inactive();
    // Cheap check on the shared connection first: most rounds have nothing to do.
    // (in id order, so the plan walks the primary key up to the bound, not the whole table)
    let check = format!(
        "SELECT (SELECT j.id FROM {s}.journal j
                  WHERE j.id < {} AND j.created_at < now() - pg_catalog.make_interval(secs => $1)
                    AND {}
                  ORDER BY j.id LIMIT 1) IS NOT NULL
             OR EXISTS (SELECT 1 FROM {s}.consumers c WHERE c.state <> ALL($3)
                           AND c.expire_after IS NOT NULL AND c.updated_at < now() - c.expire_after)",
        purge_bound(&s, 1),
        unprotected(&s, 2, Some(3))
    );
    let params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&secs, Type::FLOAT8),
        (&none, Type::TEXT_ARRAY),
        (&inactive, Type::TEXT_ARRAY),
    ];
    let work: bool = client
        .query_typed_one(&check, &params)
        .await
        .map_err(|e| Error::db("looking for expired journal rows", e))?
        .get(0);
    drop(client);
    if !work {
        return Ok(0);
    }
    let mut client = Control::connect(control.config(), "purge").await?;
    client
        .batch_execute(super::listener::KEEPALIVE)
        .await
        .map_err(|e| Error::db("setting up the purge's connection (keepalive)", e))?;
    purge_in_transactions(&mut client, retention).await
}

async fn purge_in_transactions(client: &mut Client, retention: std::time::Duration) -> Result<u64> {
    let s = quote_ident(SCHEMA);
    let secs = retention.as_secs_f64();
    let inactive = inactive();
    let err = |e| Error::db("deleting expired journal rows", e);
    let expire = format!(
        "UPDATE {s}.consumers SET state = 'expired'
          WHERE state <> ALL($1) AND expire_after IS NOT NULL AND updated_at < now() - expire_after
         RETURNING name, extract(epoch FROM now() - updated_at)::float8"
    );
    let lock = format!(
        "SELECT name, pg_catalog.array_remove(channels, NULL), pg_catalog.array_remove(missed, NULL)
           FROM {s}.consumers
          WHERE state = ANY($1) ORDER BY name FOR UPDATE"
    );
    // The bound once per run, not per batch: finding it reads the expired rows, which a
    // backlog of many batches would otherwise read again for each one. It only grows, so the
    // run's first is safe for every batch.
    let bound: i64 = client
        .query_typed_one(
            &format!("SELECT {}", purge_bound(&s, 1)),
            &[(&secs, Type::FLOAT8)],
        )
        .await
        .map_err(err)?
        .get(0);
    let delete = format!(
        "WITH d AS (DELETE FROM {s}.journal WHERE id IN (
                      SELECT j.id FROM {s}.journal j
                       WHERE j.id < $4 AND j.created_at < now() - pg_catalog.make_interval(secs => $1)
                         AND {}
                       ORDER BY j.id LIMIT $2)
                    RETURNING channel, xid)
         SELECT channel, max(xid::text::numeric)::text, pg_catalog.count(*), NULL::text FROM d GROUP BY channel
         UNION ALL
         SELECT DISTINCT j.channel, NULL::text, NULL::bigint, c.name
           FROM d j JOIN {s}.consumers c ON c.name = ANY($3) AND {UNREAD}",
        unprotected(&s, 3, None)
    );
    let mark = format!("UPDATE {s}.consumers SET missed = $2 WHERE name = $1");
    let resnap =
        format!("UPDATE {s}.trimmed SET snapshot = pg_catalog.pg_current_snapshot() WHERE id = 1");
    let trimmed = format!(
        "INSERT INTO {s}.trimmed AS t (id, xid, snapshot, writer)
         VALUES (1, $1::text::xid8, pg_catalog.pg_current_snapshot(), pg_catalog.pg_current_xact_id())
         ON CONFLICT (id) DO UPDATE SET xid = GREATEST(t.xid, excluded.xid),
                                        snapshot = excluded.snapshot, writer = excluded.writer"
    );
    let (mut total, mut first) = (0u64, true);
    loop {
        let tx = client.transaction().await.map_err(err)?;
        tx.batch_execute(&purge_guards()).await.map_err(err)?;
        if std::mem::take(&mut first) {
            for row in tx
                .query_typed(&expire, &[(&inactive, Type::TEXT_ARRAY)])
                .await
                .map_err(err)?
            {
                log::info!(
                    "sqlnotify: consumer {:?} expired (not seen for {:.0} s, longer than its expiry)",
                    row.get::<_, String>(0),
                    row.get::<_, f64>(1)
                );
            }
        }
        // Inactive consumers, locked: one coming back waits for this transaction.
        let mut locked = Vec::new();
        for row in tx
            .query_typed(&lock, &[(&inactive, Type::TEXT_ARRAY)])
            .await
            .map_err(err)?
        {
            // A row altered by hand (a column of another type) fails the purge, not the process.
            let name: String = row.try_get(0).map_err(err)?;
            let channels: Option<Vec<String>> = row.try_get(1).map_err(err)?;
            let missed: Option<Vec<String>> = row.try_get(2).map_err(err)?;
            locked.push((name, channels, missed.unwrap_or_default()));
        }
        let names: Vec<String> = locked.iter().map(|(name, ..)| name.clone()).collect();
        let params: [(&(dyn ToSql + Sync), Type); 4] = [
            (&secs, Type::FLOAT8),
            (&PURGE_BATCH, Type::INT8),
            (&names, Type::TEXT_ARRAY),
            (&bound, Type::INT8),
        ];
        // Rows of two kinds: per channel, the newest transaction deleted and how many rows; and
        // per locked consumer, each channel on which it had not read a deleted row.
        let (mut newest, mut unread) = (None, Vec::new());
        let mut n = 0u64;
        for row in tx.query_typed(&delete, &params).await.map_err(err)? {
            let channel: String = row.get(0);
            match row.get::<_, Option<String>>(3) {
                Some(consumer) => unread.push((consumer, channel)),
                None => {
                    let xid = parse_xid(&row.get::<_, Option<String>>(1).unwrap_or_default())?;
                    newest = newest.max(Some(xid));
                    n += row.get::<_, Option<i64>>(2).unwrap_or(0).max(0) as u64;
                }
            }
        }
        if let Some(newest) = newest {
            // What a client resuming from an older position may lack (`replay.rs`).
            tx.query_typed(&trimmed, &[(&newest.to_string(), Type::TEXT)])
                .await
                .map_err(err)?;
            // The snapshot again, in a statement that starts once this transaction holds the
            // row: the upsert's snapshot was taken before it waited for another purge's write,
            // and may not show a transaction whose rows that purge deleted.
            tx.query_typed(&resnap, &[]).await.map_err(err)?;
        }
        for (name, channels, missed) in &locked {
            let unread = unread
                .iter()
                .filter(|(consumer, _)| consumer == name)
                .map(|(_, channel)| channel);
            if let Some(now_missed) = add_missed(missed, channels.as_deref(), unread) {
                tx.query_typed(
                    &mark,
                    &[(name, Type::TEXT), (&now_missed, Type::TEXT_ARRAY)],
                )
                .await
                .map_err(err)?;
            }
        }
        tx.commit().await.map_err(err)?;
        total += n;
        if n < PURGE_BATCH as u64 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_connection_bounds_its_waits_and_keeps_alive() {
        let sql = purge_guards();
        for setting in [
            "SET LOCAL idle_in_transaction_session_timeout = '30s';",
            "SET LOCAL lock_timeout = '10s';",
            "SET LOCAL statement_timeout = '5min'",
        ] {
            assert!(sql.contains(setting), "{setting}: {sql}");
        }
    }
}
