//! MySQL's record of named consumers (`sqlnotify_consumers`): registering, saving
//! positions, the journal purge that respects them, backlog, listing and dropping. The
//! contract is in `crate::consumer`.
//!
//! A consumer's position is the journal cursor's low watermark (see `journal.rs`), stored in
//! the `watermark` column: a row is unread by it when `id > watermark` and it is on one of the consumer's `channels` (a JSON array; NULL or
//! unreadable: every channel).
//!
//! The purge and a consumer coming back must not cross (see `postgres/consumers.rs` for the
//! long story): each purge batch is one transaction on the control connection that locks the
//! rows of the inactive consumers (`SELECT … FOR UPDATE` by primary key; a consumer coming
//! back locks its row the same way, so it waits and then reads what was recorded), and treats
//! every consumer it did not lock — active, new, or dropped meanwhile — as protecting its
//! rows, whatever its snapshot says.

use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::Conn;

use super::catalog::db_err;
use super::ddl::{qualified, CONSUMERS, JOURNAL, TRIMMED};
use super::journal::{Above, Position};
use crate::consumer::{
    add_missed, missed_channels, stored_channels, unix_time, Backlog, ConsumerInfo, ConsumerParams,
    ConsumerPosition, ConsumerState,
};
use crate::error::{Error, Result};

/// A consumer's row as `reactivate` reads it: watermark, missed channels, seen ids (both
/// [`bounded`]), and the digest of `missed` (what a save compares to clear it).
type StoredPosition = (i64, Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);

/// Journal rows deleted per transaction when trimming, so locks are held only briefly.
const PURGE_BATCH: usize = 2_000;

/// The columns registered consumers need, with their definitions (also in the table's
/// `CREATE TABLE`, `ddl.rs`).
pub(crate) const COLUMNS: [(&str, &str); 5] = [
    ("state", "VARCHAR(16) NOT NULL DEFAULT 'active'"),
    (
        "channels",
        "LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL",
    ),
    ("expire_after_us", "BIGINT NULL"),
    (
        "missed",
        "LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL",
    ),
    (
        "seen",
        "LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL",
    ),
];

/// "Consumer `c` reads journal row `j`'s channel" (SQL), read defensively: anything but a
/// JSON array means every channel.
const READS_CHANNEL: &str =
    "(CASE WHEN c.`channels` IS NULL OR NOT JSON_VALID(c.`channels`) THEN 1 \
     WHEN JSON_TYPE(c.`channels`) <> 'ARRAY' THEN 1 \
     ELSE JSON_CONTAINS(c.`channels`, JSON_QUOTE(j.`channel`)) END)";

/// Most bytes of a consumer's `channels` or `missed` list read as they are: sqlnotify writes
/// lists of channel names (a few dozen bytes each); a longer one — written by someone else
/// allowed to update the table — is read as unreadable (every channel), never loaded whole.
const MAX_LIST_BYTES: usize = 1 << 20;

/// Most bytes of a consumer's `seen` read as they are: sqlnotify writes at most
/// [`MAX_SAVED_GAPS`](super::journal::MAX_SAVED_GAPS) gaps, under 48 bytes each; a longer one
/// is read as unreadable (the rows above the watermark are read again, never skipped).
const MAX_SEEN_BYTES: usize = 64 << 10;

/// Column `column` in a `SELECT`, bounded: itself (or NULL) when at most `limit` bytes long,
/// else `'!'` — no JSON, so read as unreadable — so that a value someone made huge is never
/// sent, nor parsed, whole.
fn bounded(column: &str, limit: usize) -> String {
    format!("CASE WHEN {column} IS NULL OR OCTET_LENGTH({column}) <= {limit} THEN {column} ELSE '!' END")
}

/// Seconds `ALTER TABLE` waits for the table's metadata lock when upgrading.
const UPGRADE_LOCK_WAIT_SECS: u32 = 5;

async fn columns(conn: &mut Conn, database: &str) -> Result<Vec<String>> {
    conn.exec(
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
        (database, CONSUMERS),
    )
    .await
    .map_err(db_err("reading the columns of sqlnotify_consumers"))
}

/// Adds the columns an older `sqlnotify_consumers` lacks (waiting at most a few seconds for
/// other sessions using it); returns whether the table exists (sqlnotify installed).
pub(crate) async fn ensure(conn: &mut Conn, database: &str) -> Result<bool> {
    let have = columns(conn, database).await?;
    if have.is_empty() {
        return Ok(false);
    }
    let missing: Vec<String> = COLUMNS
        .iter()
        .filter(|(name, _)| !have.iter().any(|h| h.eq_ignore_ascii_case(name)))
        .map(|(name, definition)| format!("ADD COLUMN `{name}` {definition}"))
        .collect();
    if missing.is_empty() {
        return Ok(true);
    }
    conn.query_drop(format!(
        "SET @sqlnotify_saved_lock_wait = @@SESSION.lock_wait_timeout, \
         SESSION lock_wait_timeout = {UPGRADE_LOCK_WAIT_SECS}"
    ))
    .await
    .map_err(db_err("upgrading sqlnotify_consumers"))?;
    let altered = conn
        .query_drop(format!(
            "ALTER TABLE {} {}",
            qualified(database, CONSUMERS),
            missing.join(", ")
        ))
        .await;
    conn.query_drop("SET SESSION lock_wait_timeout = @sqlnotify_saved_lock_wait")
        .await
        .map_err(db_err("upgrading sqlnotify_consumers"))?;
    if let Err(e) = altered {
        // Another process may have upgraded it meanwhile.
        let have = columns(conn, database).await?;
        if COLUMNS
            .iter()
            .any(|(name, _)| !have.iter().any(|h| h.eq_ignore_ascii_case(name)))
        {
            return Err(Error::db(
                "upgrading sqlnotify_consumers (adding the columns of registered consumers; it \
                 needs a moment when no other session is using the table — retry)",
                e,
            ));
        }
    }
    Ok(true)
}

fn channels_json(channels: &[String]) -> String {
    serde_json::to_string(channels).expect("strings serialize")
}

fn lossy(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn expire_us(consumer: &ConsumerParams) -> Option<u64> {
    consumer
        .expire_after
        .map(|d| d.as_micros().min(i64::MAX as u128) as u64)
}

/// What a consumer coming back had missed: the channels on which rows it had not read were
/// purged, and the `missed` column as read, which stays recorded until a later [`save`] that
/// says it was reported clears it — so a failure between reading it and reporting the
/// [`Gap`](crate::Status::Gap) (the rest of placing the cursor, a lost reply) never forgets it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Missed {
    /// The channels to report in a `Gap` (empty: none).
    pub channels: Vec<String>,
    /// The digest (`SHA2(missed, 256)`) of the `missed` column as read (`None`: nothing
    /// recorded), to clear it once reported — a digest, so that a huge value someone stored is
    /// never loaded whole, and still cleared.
    pub recorded: Option<Vec<u8>>,
}

/// A consumer of this name that is registered already takes up again (active, channels and
/// expiry updated), in one transaction that locks its row first. Returns its position and
/// what it missed, which stays recorded until a save clears it once reported (see
/// [`Missed`]); `None` when no consumer has this name.
pub(crate) async fn reactivate(
    conn: &mut Conn,
    database: &str,
    consumer: &ConsumerParams,
    channels: &[String],
) -> Result<Option<(Position, Missed)>> {
    let name = consumer.name.as_str();
    let context = || format!("registering consumer {name:?}");
    let table = qualified(database, CONSUMERS);
    let mut tx = conn
        .start_transaction(Default::default())
        .await
        .map_err(db_err(context()))?;
    let row: Option<StoredPosition> = tx
        .exec_first(
            format!(
                "SELECT `watermark`, {}, {}, SHA2(`missed`, 256) FROM {table} \
                 WHERE `name` = ? FOR UPDATE",
                bounded("`missed`", MAX_LIST_BYTES),
                bounded("`seen`", MAX_SEEN_BYTES)
            ),
            (name,),
        )
        .await
        .map_err(db_err(context()))?;
    let Some((low, missed, seen, digest)) = row else {
        tx.commit().await.map_err(db_err(context()))?;
        return Ok(None);
    };
    tx.exec_drop(
        format!(
            "UPDATE {table} SET `state` = 'active', `channels` = ?, \
             `expire_after_us` = ?, `updated_at` = NOW(6) WHERE `name` = ?"
        ),
        (channels_json(channels), expire_us(consumer), name),
    )
    .await
    .map_err(db_err(context()))?;
    tx.commit().await.map_err(db_err(context()))?;
    // No journal id comes near the end of the id range (the cursor counts past its ids): a
    // watermark there is not this journal's.
    if low > LAST_PLAUSIBLE_ID {
        return Err(Error::Database {
            context: context(),
            source: format!(
                "its saved watermark {low} is past any journal id (altered, or another \
                 journal's): delete its row from {table} to register it afresh"
            )
            .into(),
        });
    }
    // Read defensively: anything unreadable is ignored (the rows above the watermark are read
    // again, never skipped).
    let above = lossy(seen)
        .and_then(|text| Above::from_json(&text))
        .filter(|above| above.high <= LAST_PLAUSIBLE_ID);
    Ok(Some((
        Position { low, above },
        Missed {
            channels: own_missed(lossy(missed).as_deref(), channels),
            recorded: digest,
        },
    )))
}

/// The channels to report as missed from a stored `missed` list: those of `channels` (the
/// consumer's) it names — every one of them when it is unreadable, the safe reading — so a
/// list someone filled with other names reports no more than the consumer reads.
fn own_missed(stored: Option<&str>, channels: &[String]) -> Vec<String> {
    let mut missed = missed_channels(stored, channels);
    missed.retain(|channel| channels.contains(channel));
    missed
}

/// The highest journal id a saved position may name: far past any journal's (2^62), far
/// from where counting past it overflows.
const LAST_PLAUSIBLE_ID: i64 = 1 << 62;

/// Registers a new consumer at `position` (its watermark, and what was read above it).
pub(crate) async fn insert(
    conn: &mut Conn,
    database: &str,
    consumer: &ConsumerParams,
    channels: &[String],
    position: &Position,
) -> Result<()> {
    // With what was read above the watermark, as a save stores it: ids a transaction still
    // running holds stay unread, so a restart before it commits still delivers it.
    let seen = position.above.as_ref().map(Above::to_json);
    conn.exec_drop(
        format!(
            "INSERT INTO {} (`name`, `watermark`, `seen`, `updated_at`, `state`, `channels`, `expire_after_us`) \
             VALUES (?, ?, ?, NOW(6), 'active', ?, ?) \
             ON DUPLICATE KEY UPDATE \
             `seen` = CASE WHEN VALUES(`watermark`) >= `watermark` THEN VALUES(`seen`) ELSE `seen` END, \
             `watermark` = GREATEST(`watermark`, VALUES(`watermark`)), `updated_at` = NOW(6)",
            qualified(database, CONSUMERS)
        ),
        (
            consumer.name.as_str(),
            position.low,
            seen,
            channels_json(channels),
            expire_us(consumer),
        ),
    )
    .await
    .map_err(db_err(format!("registering consumer {:?}", consumer.name)))
}

/// Saves consumer `name`'s position (never moving it backwards) and marks it alive; returns
/// whether it is still registered and active with nothing missed left to report (`None`: its
/// row is gone). Does not change its state. `reported`: the digest of the `missed` column as
/// read by the [`reactivate`] whose channels were reported since ([`Missed::recorded`]) — cleared if it still holds just that and
/// the consumer is still active: a purge records only on a consumer dropped or expired, and a
/// channel it lost rows on again may be one recorded already, so then it stays, to be
/// reported in turn.
pub(crate) async fn save(
    conn: &mut Conn,
    database: &str,
    name: &str,
    position: &Position,
    reported: Option<&[u8]>,
) -> Result<Option<bool>> {
    let context = || format!("saving the position of consumer {name:?}");
    let table = qualified(database, CONSUMERS);
    let seen = position.above.as_ref().map(Above::to_json);
    // `seen` first: it belongs to the watermark it was read with, compared before that moves
    // (MySQL assigns left to right; MariaDB may assign simultaneously — same result).
    conn.exec_drop(
        format!(
            "UPDATE {table} SET `seen` = CASE WHEN ? >= `watermark` THEN ? ELSE `seen` END, \
             `watermark` = GREATEST(`watermark`, ?), \
             `missed` = CASE WHEN SHA2(`missed`, 256) = ? AND `state` = 'active' THEN NULL ELSE `missed` END, \
             `updated_at` = NOW(6) WHERE `name` = ?"
        ),
        (position.low, seen, position.low, reported, name),
    )
    .await
    .map_err(db_err(context()))?;
    let row: Option<(Vec<u8>, i64)> = conn
        .exec_first(
            format!("SELECT `state`, `missed` IS NULL FROM {table} WHERE `name` = ?"),
            (name,),
        )
        .await
        .map_err(db_err(context()))?;
    Ok(row.map(|(state, clear)| {
        ConsumerState::parse(&String::from_utf8_lossy(&state)) == ConsumerState::Active
            && clear == 1
    }))
}

/// Sets consumer `name`'s saved position to `position` — backwards too, unlike [`save`]: for a
/// listener whose journal's ids went back below its position (which names ids the journal
/// gives out again). Run by the lease's holder, on the lease's connection. A consumer whose
/// row is gone is left to the next save, which registers it again.
pub(crate) async fn reset(
    conn: &mut Conn,
    database: &str,
    name: &str,
    position: &Position,
) -> Result<()> {
    let seen = position.above.as_ref().map(Above::to_json);
    conn.exec_drop(
        format!(
            "UPDATE {} SET `watermark` = ?, `seen` = ?, `updated_at` = NOW(6) WHERE `name` = ?",
            qualified(database, CONSUMERS)
        ),
        (position.low, seen, name),
    )
    .await
    .map_err(db_err(format!(
        "placing the position of consumer {name:?} again"
    )))
}

/// A running listener's save: as [`save`], and a consumer dropped or expired while it runs
/// (or whose row was deleted) registers again. Returns what it missed meanwhile: the channels
/// on which rows it had not read were purged (every channel when its row was deleted), as
/// [`reactivate`] returns it.
pub(crate) async fn save_running(
    conn: &mut Conn,
    database: &str,
    consumer: &ConsumerParams,
    channels: &[String],
    position: &Position,
    reported: Option<&[u8]>,
) -> Result<Missed> {
    match save(conn, database, &consumer.name, position, reported).await? {
        Some(true) => Ok(Missed::default()),
        Some(false) => Ok(reactivate(conn, database, consumer, channels)
            .await?
            .map(|(_, missed)| missed)
            .unwrap_or_default()),
        None => {
            insert(conn, database, consumer, channels, position).await?;
            Ok(Missed {
                channels: channels.to_vec(),
                recorded: None,
            })
        }
    }
}

/// The backlog of consumer row `c` (a correlated subquery).
fn backlog_sql(database: &str) -> String {
    format!(
        "(SELECT COUNT(*) FROM {} j WHERE j.`id` > c.`watermark` AND {READS_CHANNEL})",
        qualified(database, JOURNAL)
    )
}

/// Journal rows after consumer `name`'s position on its channels; `None` if not registered.
/// (Registration upgraded the table: no [`ensure`] here, this runs every few seconds.)
pub(crate) async fn backlog(
    conn: &mut Conn,
    database: &str,
    name: &str,
) -> Result<Option<Backlog>> {
    let row: Option<(i64, Option<i64>)> = conn
        .exec_first(
            format!(
                "SELECT {}, (SELECT TIMESTAMPDIFF(MICROSECOND, j.`created_at`, CURRENT_TIMESTAMP(6)) \
                               FROM {} j WHERE j.`id` > c.`watermark` AND {READS_CHANNEL} \
                              ORDER BY j.`id` LIMIT 1) \
                 FROM {} c WHERE c.`name` = ?",
                backlog_sql(database),
                qualified(database, JOURNAL),
                qualified(database, CONSUMERS)
            ),
            (name,),
        )
        .await
        .map_err(db_err(format!("counting the backlog of consumer {name:?}")))?;
    Ok(row.map(|(n, micros)| Backlog::new(n, micros.map(|us| us as f64 / 1e6))))
}

/// One row of the consumers table, as listed.
type ListRow = (
    Vec<u8>,
    Vec<u8>,
    i64,
    f64,
    Option<Vec<u8>>,
    Option<i64>,
    i64,
);

/// Every registered consumer.
pub(crate) async fn list(conn: &mut Conn, database: &str) -> Result<Vec<ConsumerInfo>> {
    if !ensure(conn, database).await? {
        return Ok(Vec::new());
    }
    let rows: Vec<ListRow> = conn
        .query(format!(
            "SELECT c.`name`, c.`state`, c.`watermark`, CAST(UNIX_TIMESTAMP(c.`updated_at`) AS DOUBLE), \
                    {}, c.`expire_after_us`, {} \
               FROM {} c ORDER BY c.`name`",
            bounded("c.`channels`", MAX_LIST_BYTES),
            backlog_sql(database),
            qualified(database, CONSUMERS)
        ))
        .await
        .map_err(db_err("listing the consumers"))?;
    Ok(rows
        .into_iter()
        .map(
            |(name, state, position, updated, channels, expire, backlog)| ConsumerInfo {
                name: String::from_utf8_lossy(&name).into_owned(),
                state: ConsumerState::parse(&String::from_utf8_lossy(&state)),
                position: ConsumerPosition::JournalId(position),
                last_active: unix_time(updated),
                channels: stored_channels(lossy(channels).as_deref()),
                expire_after: expire
                    .filter(|us| *us >= 0)
                    .map(|us| Duration::from_micros(us as u64)),
                backlog: backlog.max(0) as u64,
            },
        )
        .collect())
}

/// Marks consumer `name` dropped.
pub(crate) async fn drop_consumer(conn: &mut Conn, database: &str, name: &str) -> Result<()> {
    if !ensure(conn, database).await? {
        return Err(Error::UnknownConsumer { name: name.into() });
    }
    let context = || format!("dropping consumer {name:?}");
    let table = qualified(database, CONSUMERS);
    let known: Option<i64> = conn
        .exec_first(format!("SELECT 1 FROM {table} WHERE `name` = ?"), (name,))
        .await
        .map_err(db_err(context()))?;
    if known.is_none() {
        return Err(Error::UnknownConsumer { name: name.into() });
    }
    conn.exec_drop(
        format!("UPDATE {table} SET `state` = 'dropped' WHERE `name` = ?"),
        (name,),
    )
    .await
    .map_err(db_err(context()))?;
    log::info!("sqlnotify: consumer {name:?} dropped");
    Ok(())
}

/// An inactive consumer's row as the purge locks it: state, position, channels, missed.
type LockedRow = (Vec<u8>, i64, Option<Vec<u8>>, Option<Vec<u8>>);

/// An inactive consumer, as the purge locked it: name, position, channels, missed.
type Locked = (String, i64, Option<Vec<String>>, Vec<String>);

/// Expires consumers away longer than their expiry, then deletes journal rows older than
/// `retention` that no registered consumer still has to read — except the newest row (so that
/// `AUTO_INCREMENT`, which older servers recompute from the table after a restart, never hands
/// out an id again) — recording them on the inactive consumers that had not read them.
/// Returns how many journal rows were deleted.
pub(crate) async fn purge(conn: &mut Conn, database: &str, retention: Duration) -> Result<u64> {
    if !ensure(conn, database).await? {
        return Ok(0);
    }
    let context = "trimming the journal";
    let journal = qualified(database, JOURNAL);
    let consumers = qualified(database, CONSUMERS);
    let newest: Option<Option<i64>> = conn
        .query_first(format!("SELECT MAX(`id`) FROM {journal}"))
        .await
        .map_err(db_err(context))?;
    let newest = newest.flatten().unwrap_or(0);
    let keep = retention.as_micros().min(u64::MAX as u128) as u64;
    let (mut total, mut first) = (0u64, true);
    loop {
        let mut tx = conn
            .start_transaction(Default::default())
            .await
            .map_err(db_err(context))?;
        if std::mem::take(&mut first) {
            let due: Vec<Vec<u8>> = tx
                .query(format!(
                    "SELECT `name` FROM {consumers} WHERE `state` NOT IN ('dropped', 'expired') \
                     AND `expire_after_us` IS NOT NULL \
                     AND `updated_at` < NOW(6) - INTERVAL `expire_after_us` MICROSECOND \
                     ORDER BY `name`"
                ))
                .await
                .map_err(db_err(context))?;
            for name in due {
                // Checked again on the row itself: it may have saved meanwhile.
                tx.exec_drop(
                    format!(
                        "UPDATE {consumers} SET `state` = 'expired' WHERE `name` = ? \
                         AND `state` NOT IN ('dropped', 'expired') \
                         AND `updated_at` < NOW(6) - INTERVAL `expire_after_us` MICROSECOND"
                    ),
                    (&name,),
                )
                .await
                .map_err(db_err(context))?;
                if tx.affected_rows() > 0 {
                    log::info!(
                        "sqlnotify: consumer {:?} expired (away longer than its expiry)",
                        String::from_utf8_lossy(&name)
                    );
                }
            }
        }
        // The inactive consumers, then their rows locked by primary key, in name order (two
        // purging processes lock in the same order), and only those: the active consumers keep
        // saving meanwhile. One that came back in between is active again and is left out.
        let names: Vec<Vec<u8>> = tx
            .query(format!(
                "SELECT `name` FROM {consumers} WHERE `state` IN ('dropped', 'expired') \
                 ORDER BY `name`"
            ))
            .await
            .map_err(db_err(context))?;
        let mut locked: Vec<Locked> = Vec::new();
        for name in &names {
            let row: Option<LockedRow> = tx
                .exec_first(
                    format!(
                        "SELECT `state`, `watermark`, {}, {} FROM {consumers} \
                         WHERE `name` = ? FOR UPDATE",
                        bounded("`channels`", MAX_LIST_BYTES),
                        bounded("`missed`", MAX_LIST_BYTES)
                    ),
                    (name,),
                )
                .await
                .map_err(db_err(context))?;
            let Some((state, position, channels, missed)) = row else {
                continue;
            };
            if ConsumerState::parse(&String::from_utf8_lossy(&state)) == ConsumerState::Active {
                continue;
            }
            let channels = stored_channels(lossy(channels).as_deref());
            let missed =
                missed_channels(lossy(missed).as_deref(), channels.as_deref().unwrap_or(&[]));
            let name = String::from_utf8_lossy(name).into_owned();
            locked.push((name, position, channels, missed));
        }
        let locked_json =
            serde_json::to_string(&locked.iter().map(|(name, ..)| name).collect::<Vec<_>>())
                .expect("strings serialize");
        let rows: Vec<(i64, Option<Vec<u8>>)> = tx
            .exec(
                format!(
                    "SELECT j.`id`, j.`channel` FROM {journal} j \
                      WHERE j.`id` < ? AND j.`created_at` < NOW(6) - INTERVAL ? MICROSECOND \
                        AND NOT EXISTS (SELECT 1 FROM {consumers} c \
                                         WHERE NOT JSON_CONTAINS(?, JSON_QUOTE(c.`name`)) \
                                           AND j.`id` > c.`watermark` AND {READS_CHANNEL}) \
                      ORDER BY j.`id` LIMIT {PURGE_BATCH}"
                ),
                (newest, keep, &locked_json),
            )
            .await
            .map_err(db_err(context))?;
        let deleted: Vec<(i64, String)> = rows
            .into_iter()
            .map(|(id, channel)| {
                (
                    id,
                    String::from_utf8_lossy(&channel.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        if let Some(upto) = deleted.iter().map(|(id, _)| *id).max() {
            let ids: Vec<String> = deleted.iter().map(|(id, _)| id.to_string()).collect();
            tx.query_drop(format!(
                "DELETE FROM {journal} WHERE `id` IN ({})",
                ids.join(", ")
            ))
            .await
            .map_err(db_err(context))?;
            // For clients that resume a stream (`replay.rs`): what they lacked may be gone.
            tx.exec_drop(
                format!(
                    "INSERT INTO {} (`id`, `upto`) VALUES (1, ?) \
                     ON DUPLICATE KEY UPDATE `upto` = GREATEST(`upto`, VALUES(`upto`))",
                    qualified(database, TRIMMED)
                ),
                (upto,),
            )
            .await
            .map_err(db_err(context))?;
        }
        for (name, position, channels, missed) in &locked {
            let unread = deleted
                .iter()
                .filter(|(id, _)| id > position)
                .map(|(_, channel)| channel);
            if let Some(now_missed) = add_missed(missed, channels.as_deref(), unread) {
                tx.exec_drop(
                    format!("UPDATE {consumers} SET `missed` = ? WHERE `name` = ?"),
                    (channels_json(&now_missed), name.as_str()),
                )
                .await
                .map_err(db_err(context))?;
            }
        }
        tx.commit().await.map_err(db_err(context))?;
        let n = deleted.len() as u64;
        total += n;
        if deleted.len() < PURGE_BATCH {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_list_is_bounded_and_missed_channels_are_the_consumers_own() {
        assert_eq!(
            bounded("c.`channels`", 10),
            "CASE WHEN c.`channels` IS NULL OR OCTET_LENGTH(c.`channels`) <= 10 \
             THEN c.`channels` ELSE '!' END"
        );
        let own = vec!["a".to_string(), "b".to_string()];
        assert_eq!(own_missed(Some(r#"["b", "x", "b", "y"]"#), &own), ["b"]);
        assert!(own_missed(Some(r#"["x"]"#), &own).is_empty());
        assert!(own_missed(None, &own).is_empty());
        // What `bounded` reads for a value too long, and anything unreadable: every channel.
        assert_eq!(own_missed(Some("!"), &own), own);
        assert_eq!(own_missed(Some("{}"), &own), own);
    }
}
