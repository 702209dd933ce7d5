//! The logical tier's [`Source`] for the listener shell: one replication connection
//! (`pgwire-replication`, `replication=database`) streaming pgoutput from the notifier's slot.
//!
//! A session connects without starting the stream, so a named consumer can take its lease —
//! a session advisory lock held by the walsender itself, so it goes with the connection —
//! then starts `START_REPLICATION … LOGICAL 0/0`, which resumes at the slot's confirmed
//! position. Transactions arrive whole and in commit order — pgoutput without streaming sends
//! a transaction only once it committed — and their rows are handed to the [`Outlet`] at their
//! Commit, each with the Begin's xid — widened to the 64-bit `xid8` the journal tiers record
//! ([`widen_xid`]) — and the last one marked; a transaction of more than [`MAX_OPEN_ROWS`]
//! rows is handed over as it arrives (all but its newest change's rows, which wait for the
//! last mark), so that one huge statement does not sit in memory whole, and what of it went
//! before a reconnect is not handed over again when the server sends it anew. The position
//! is the Commit's end LSN (or, while idle, the server's WAL end from a keepalive: nothing
//! before it is still to come). The slot is confirmed (`update_applied_lsn`, sent
//! with the next status update) only with a position the shell's save rule declared safe —
//! every event up to it left the pipeline — for a named consumer in [`Source::save`], for a
//! notifier without one by the same count here. After a reconnect the server sends again
//! what was not confirmed; transactions whose commit LSN was already handed over are skipped
//! — unless the consumer lost its lease meanwhile: then the shell places the source again,
//! which forgets what it handed over, and everything from the slot's position comes again.
//!
//! Memory: what is read but not yet in the pipeline is bounded by counts, not bytes. The
//! replication client's worker holds at most [`BUFFER_MESSAGES`] (2,048) received pgoutput
//! messages — each one row change, Begin, Commit, Relation or custom event, and each as large
//! as its row (up to PostgreSQL's 1 GiB message limit) — plus its 128 KiB socket buffer and
//! the one message it is reading; this source holds at most [`MAX_OPEN_ROWS`] rows of the
//! open transaction and one batch of [`MAX_BATCH`] events; the pipeline then takes one unit
//! of its in-flight budget per event. So the worst case is about 3,000 times the largest row
//! in flight, which is small for ordinary rows and large for rows of many megabytes. A real
//! bound in bytes cannot be had from `pgwire-replication` 0.5: its only byte limit,
//! `max_message_size`, refuses a larger message and ends the stream for good (the message
//! stays on the wire, the slot cannot be read past it), which would stop the consumer at
//! the first wide row; its event buffer counts messages (`buffer_events`), which this source
//! sets to [`BUFFER_MESSAGES`], a quarter of the crate's default.
//!
//! The slot and its publication are made again, at "now", by the lease holder alone, in
//! [`Source::restore`] at the start of each session, which reports the changes committed
//! while they were missing as a `Status::Gap`: a process of the group that starts meanwhile
//! makes a named consumer's slot and publication only when neither exists (a new consumer;
//! [`super::Making::Start`]), never one that lost only its slot — made there, it would be
//! present when the holder looks, and the loss silent. A slot made again by anyone else all
//! the same (an operator, an earlier version of sqlnotify, or a process that made both after
//! someone dropped both by hand) is told by its confirmed position: the slot this source
//! reads never confirms past the furthest position it read or found confirmed (`reached`),
//! nor past the consumer's high-water mark, which every process of the consumer raises before
//! it confirms (`marks.rs`), and a new one starts past all of them; one found past them is
//! reported the same way — also by a process that holds the lease next and has read nothing
//! itself, which has the mark to compare with.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio_postgres::config::Host;

use super::changes::{part_after, Changes, Route, Row};
use super::marks;
use crate::consumer::ConsumerParams;
use crate::error::{Error, Result};
use crate::event::RawNotification;
use crate::listener::{FinalSave, Outlet, Pace, Source};
use crate::postgres::control::Control;
use crate::postgres::signing::Verifier;
use crate::postgres::snapshot::SentXids;
use crate::postgres::PgConfig;

/// The prefix of the logical-decoding messages that carry custom events (`src/postgres/custom.rs`).
const MESSAGE_PREFIX: &str = "sqlnotify:";
/// Most events handed to the pipeline in one batch: at most the smallest in-flight budget,
/// so a batch can always get its units.
const MAX_BATCH: usize = 512;
const _: () = assert!(MAX_BATCH <= crate::pipeline::MIN_IN_FLIGHT);
/// Rows of a transaction kept until its Commit at most: beyond, they go to the pipeline as
/// they arrive (a transaction that arrives has committed; its position still moves only at
/// the Commit, so a restart in the middle sends all of it again, as at least once allows).
const MAX_OPEN_ROWS: usize = MAX_BATCH;
/// How often the confirmed position is sent to the server at most (the crate's status
/// interval): what a crash may deliver again on top of the save rule's own delay.
const STATUS_INTERVAL: Duration = Duration::from_millis(200);
/// How long a read goes on taking events at most before it hands them over and returns (a
/// full batch returns sooner): the shell saves, and so confirms, only between reads.
const READ_BUDGET: Duration = Duration::from_millis(100);
/// How often the slot's lag is read.
const LAG_EVERY: Duration = Duration::from_secs(2);
/// Slot lag (WAL bytes kept for the slot) past which a warning is logged.
pub(crate) const LAG_WARNING: u64 = 1 << 30;
/// Messages the replication client's worker may hold received and not yet read
/// (`pgwire-replication`'s `buffer_events`, 8,192 by default): the bound of its buffer, by
/// count — the crate has no bound by bytes (see the module docs). A full batch of one-row
/// transactions takes three messages a row (Begin, the change, Commit), and the worker runs on
/// the listener's thread, so it refills the buffer only between reads: four batches' worth
/// lets a read still fill a whole batch, at a quarter of the default's worst case.
const BUFFER_MESSAGES: usize = 4 * MAX_BATCH;
const _: () = assert!(BUFFER_MESSAGES >= 3 * MAX_BATCH);
/// How long a read waits for room in the pipeline, its slot doomed, before it closes the
/// stream (see [`LogicalSource::forward`]).
const DOOMED_STALL: Duration = Duration::from_secs(1);

/// The server's next full transaction id (`xid8`): the reference [`widen_xid`] needs.
const NEXT_XID_SQL: &str =
    "SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text";

/// The full transaction id (`xid8`, epoch and xid, as `pg_current_xact_id()` reports it) of
/// `xid`, the 32-bit id pgoutput's Begin carries: of the full ids whose low 32 bits are `xid`,
/// the one nearest `reference`, a full id the server reported (its next one, or one widened
/// before).
///
/// Why nearest is right: every transaction the slot still has to send is younger than the
/// slot's `catalog_xmin`, which holds back the database's freeze horizon, and the server stops
/// assigning ids before the next one is 2³¹ past that horizon; so each such id is less than
/// 2³¹ below the server's next id at any time since. The reference is read when a session
/// connects and every [`LAG_EVERY`] after, and ids are not assigned 2³¹ apart in that time:
/// a transaction committed later is less than 2³¹ above it. Either way the nearest full id is
/// the transaction's own, also across an epoch's wrap.
pub(crate) fn widen_xid(xid: u32, reference: u64) -> u64 {
    // The signed 32-bit distance from the reference's low half to `xid`.
    let distance = xid.wrapping_sub(reference as u32) as i32;
    reference
        .checked_add_signed(i64::from(distance))
        .unwrap_or(u64::from(xid))
}

/// The query that tries to take consumer `name`'s lease: the advisory lock the other tiers
/// take (`md5` of the same text), through the replication protocol's simple queries, so with
/// the name as a literal — one that reads the same whatever `standard_conforming_strings`
/// says (a backslash in the name can neither end it nor change the key).
fn lease_sql(name: &str) -> String {
    let key = crate::sql::quote_literal(&format!("sqlnotify consumer {name}"));
    format!(
        "SELECT pg_catalog.pg_try_advisory_lock(('x' || pg_catalog.substr(\
         pg_catalog.md5({key}), 1, 16))::bit(64)::bigint)"
    )
}

/// Parses a `xid8`'s text form.
pub(crate) fn parse_xid8(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The pipeline's notification of `row` of transaction `xid`.
fn raw(row: Row, xid: u64, last: bool, received_at: SystemTime) -> RawNotification {
    RawNotification {
        channel: row.channel,
        payload: row.payload,
        received_at,
        sequence: Some(row.lsn.min(i64::MAX as u64) as i64),
        events: 1,
        transaction: Some(xid),
        last_in_transaction: Some(last),
        read_point: None,
        decoded: row.decoded,
        part: row.part,
        read_bytes: row.size,
        extra_units: 0,
    }
}

/// A transaction being received.
struct Open {
    /// Its full id ([`widen_xid`]).
    xid: u64,
    commit_lsn: u64,
    /// Its rows not handed over yet.
    rows: Vec<Row>,
}

/// How a slot and its publication stand ([`LogicalSource::slot_state`]).
struct SlotLook {
    /// The slot's `wal_status` (`lost`: invalidated), `missing`, or `foreign` (a slot of this
    /// name in another database).
    slot: String,
    /// Whether the publication exists.
    publication: bool,
    /// The slot's confirmed position, `None` without one.
    confirmed: Option<u64>,
    /// A named consumer's high-water mark (`marks.rs`): `None` where it cannot be read (no
    /// table, no privilege, or no consumer), `Some(None)` without one.
    mark: Option<Option<u64>>,
}

/// One replication connection.
pub(crate) struct LogicalConn {
    client: ReplicationClient,
    started: bool,
    /// An event `wait` received, for the next `read`.
    pending: Option<ReplicationEvent>,
    open: Option<Open>,
    /// Where the stream starts: the slot's confirmed position, read by `restore` before the
    /// stream starts (`START_REPLICATION … 0/0` starts there).
    from: Option<u64>,
    /// The stream got past its start ([`Source::proved`]): a read handled the Commit of a
    /// transaction not handed over before, or a keepalive whose WAL end is past `from` (the
    /// server decoded everything up to there). The keepalive the server sends as the stream
    /// starts carries the start itself, before anything was decoded: no proof.
    proved: bool,
}

/// Reads a notifier's replication slot.
pub(crate) struct LogicalSource {
    replication: ReplicationConfig,
    config: PgConfig,
    slot: String,
    named: bool,
    /// The watched tables (`schema`, `table`): the publication's, made again with the slot.
    tables: Vec<(String, String)>,
    /// The channels read (custom events name theirs).
    channels: Vec<Arc<str>>,
    changes: Changes,
    /// The commit LSN of the last transaction handed over: one at or below it came again.
    delivered: u64,
    /// The transaction whose first rows were handed over before its Commit (`spill`): its
    /// commit LSN and the LSN of the last change handed over. Kept across reconnects.
    spilled: Option<(u64, u64)>,
    /// The position after everything read so far (an end LSN).
    position: Option<u64>,
    /// The furthest position this source knows its slot had: the slot's confirmed position
    /// when a session began, or more. With `position` it bounds what the slot
    /// it reads can have confirmed; a slot found past both is another one (see
    /// [`Source::restore`]). `None` once placed, until a session looked.
    reached: Option<u64>,
    /// Without a consumer: (events forwarded, position) not confirmed yet.
    unconfirmed: VecDeque<(u64, u64)>,
    /// A named consumer's connection for its high-water mark (`marks.rs`), opened on the
    /// first save.
    marks: Option<tokio_postgres::Client>,
    /// The highest mark this source saved for the slot it reads (0: none yet): positions up
    /// to it are confirmed without another write.
    marked: u64,
    /// Whether the mark's table was found missing or not writable (warned once).
    marks_unavailable: bool,
    outlet: Option<Outlet>,
    health_check: Duration,
    /// How long making the slot and publication again waits for another session making them
    /// (the notifier's `install_timeout`; see [`super::ensure`]).
    objects_wait: Duration,
    lag: Option<tokio::task::JoinHandle<()>>,
    /// The newest full transaction id known (the server's next one, read at connect and by
    /// the lag task, or one widened since): the reference of [`widen_xid`].
    next_xid: Arc<AtomicU64>,
    /// Set by the lag task when the server invalidated the slot (`wal_status` `lost`).
    lost: Arc<AtomicBool>,
    /// Wakes a session's `wait` when `lost` is set.
    wake: Arc<tokio::sync::Notify>,
    /// Set by the lag task while the slot's `wal_status` is `unreserved`: past
    /// `max_slot_wal_keep_size`, the next checkpoint invalidates it unless it catches up.
    doomed: Arc<AtomicBool>,
    /// The transactions handed over that the server may still list as running (snapshot
    /// feeds check theirs against them: `src/postgres/snapshot.rs`).
    sent: Arc<SentXids>,
    /// The row buffer of the last transaction handed over, empty, for the next one's rows
    /// (so that a transaction's rows do not grow a new vector each time).
    spare_rows: Vec<Row>,
    /// Verifies custom events' signatures; `None` without a signing key (`sqlnotify.signing`
    /// missing or unreadable): then every message is refused.
    verifier: Option<Verifier>,
    /// When a refused message was last logged (at most once a minute).
    forgery_logged: crate::throttle::Throttled,
}

impl LogicalSource {
    /// Reads slot (and publication) `slot` of the database `config` connects to, decoding for
    /// `routes`; `named`: a named consumer confirms through the shell's saves; every
    /// transaction handed over is recorded in `sent`; `objects_wait`: how long making the
    /// slot again waits for another session making it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: PgConfig,
        slot: String,
        named: bool,
        routes: Vec<Route>,
        health_check: Duration,
        objects_wait: Duration,
        sent: Arc<SentXids>,
        verifier: Option<Verifier>,
    ) -> Result<Self> {
        let replication = replication_config(&config, &slot)?;
        Ok(LogicalSource {
            replication,
            config,
            slot,
            named,
            tables: routes
                .iter()
                .map(|r| (r.schema.clone(), r.table.clone()))
                .collect(),
            channels: routes.iter().map(|r| r.channel.clone()).collect(),
            changes: Changes::new(Arc::new(routes)),
            delivered: 0,
            spilled: None,
            position: None,
            reached: None,
            unconfirmed: VecDeque::new(),
            marks: None,
            marked: 0,
            marks_unavailable: false,
            outlet: None,
            health_check,
            objects_wait,
            lag: None,
            next_xid: Arc::new(AtomicU64::new(0)),
            lost: Arc::new(AtomicBool::new(false)),
            doomed: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(tokio::sync::Notify::new()),
            sent,
            spare_rows: Vec::new(),
            verifier,
            forgery_logged: Default::default(),
        })
    }

    /// The payload of custom event `content` on `channel`, without its signature; `None`
    /// (counted in `forged`, logged at most once a minute) when it carries no valid one: any
    /// role that can connect may emit a logical-decoding message with any prefix.
    ///
    /// The signature is over the message's prefix (`sqlnotify:` and the channel), not the
    /// channel alone as a notify-tier payload's is: a signed NOTIFY payload anyone listening
    /// saw is not a valid message (channel names start `sqlnotify_`, never `sqlnotify:`).
    fn open_message(&mut self, channel: &str, content: &[u8]) -> Option<String> {
        let content = String::from_utf8_lossy(content);
        let prefix = format!("{MESSAGE_PREFIX}{channel}");
        let refused = match &self.verifier {
            Some(verifier) => match verifier.open(&prefix, &content) {
                Ok(payload) => return Some(payload.to_string()),
                Err(refused) => refused.to_string(),
            },
            None => "there is no signing key to check it with (sqlnotify.signing)".to_string(),
        };
        if let Some(outlet) = &self.outlet {
            outlet.stats().forged.fetch_add(1, Ordering::Relaxed);
        }
        if self.forgery_logged.due() {
            log::warn!(
                "sqlnotify: slot {}: dropping a logical-decoding message on {channel:?} that \
                 sqlnotify did not send: {refused} (counted in stats().forged; further ones are \
                 logged at most once a minute)",
                self.slot
            );
        }
        None
    }

    /// Without a consumer: confirms the newest position whose events all left the pipeline.
    fn confirm_settled(&mut self, conn: &LogicalConn) {
        if self.named {
            return;
        }
        let Some(outlet) = &self.outlet else { return };
        let safe = outlet.stats().safe();
        let mut newest = None;
        while self.unconfirmed.front().is_some_and(|(n, _)| *n <= safe) {
            newest = self.unconfirmed.pop_front().map(|(_, lsn)| lsn);
        }
        if let Some(lsn) = newest {
            conn.client.update_applied_lsn(Lsn(lsn));
        }
    }

    async fn start(&mut self, conn: &mut LogicalConn) -> Result<()> {
        if conn.started {
            return Ok(());
        }
        conn.client.start().await.map_err(|e| self.error(e))?;
        conn.client
            .wait_started()
            .await
            .map_err(|e| self.error(e))?;
        conn.started = true;
        log::debug!("sqlnotify: streaming replication slot {}", self.slot);
        Ok(())
    }

    /// How the slot and its publication stand, read on the replication connection before its
    /// stream starts.
    async fn slot_state(&self, conn: &mut LogicalConn) -> Result<SlotLook> {
        let literal = crate::sql::quote_literal(&self.slot);
        let rows = conn
            .client
            .simple_query(&format!(
                "SELECT COALESCE((SELECT CASE WHEN s.database = pg_catalog.current_database()
                                              THEN COALESCE(s.wal_status, '') ELSE 'foreign' END
                                    FROM pg_catalog.pg_replication_slots s
                                   WHERE s.slot_name = {literal}), 'missing'),
                        EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = {literal}),
                        (SELECT (s.confirmed_flush_lsn - '0/0'::pg_lsn)::text
                           FROM pg_catalog.pg_replication_slots s
                          WHERE s.slot_name = {literal}),
                        {marks}",
                marks = marks::readable_sql(),
            ))
            .await
            .map_err(|e| self.error(e))?;
        let text = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i).cloned().flatten())
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        let (Some(slot), Some(publication)) = (text(0), text(1)) else {
            return Err(Error::Database {
                context: format!("reading replication slot {}", self.slot),
                source: "the server's answer had no row".into(),
            });
        };
        let mark = if self.named && text(3).as_deref() == Some("t") {
            let rows = conn
                .client
                .simple_query(&marks::read_sql(&self.slot))
                .await
                .map_err(|e| self.error(e))?;
            let mark = rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .and_then(|v| String::from_utf8_lossy(&v).split('.').next()?.parse().ok());
            Some(mark)
        } else {
            None
        };
        Ok(SlotLook {
            slot,
            publication: publication == "t",
            confirmed: text(2).and_then(|t| t.split('.').next()?.parse().ok()),
            mark,
        })
    }

    /// Raises named consumer `consumer`'s high-water mark (`marks.rs`) to cover `position`
    /// — to the furthest position read, so that the saves that follow need no write — before
    /// the slot is confirmed up to it. Fails (and the slot must not be confirmed) when the
    /// mark could not be saved; where the table is missing or not writable, the consumer
    /// goes on without a mark, with a warning.
    async fn mark(&mut self, consumer: &str, position: u64) -> Result<()> {
        if position <= self.marked {
            return Ok(());
        }
        let lsn = position.max(self.position.unwrap_or(0));
        let client = match self.marks.take().filter(|c| !c.is_closed()) {
            Some(client) => client,
            None => Control::connect(&self.config, "the consumer's high-water mark").await?,
        };
        let limit = self.health_check;
        let saved = tokio::time::timeout(limit, marks::save(&client, &self.slot, consumer, lsn));
        match saved.await {
            Ok(Ok(marks::Saved::Yes)) => self.marks_unavailable = false,
            Ok(Ok(marks::Saved::Unavailable(why))) => {
                if !std::mem::replace(&mut self.marks_unavailable, true) {
                    log::warn!(
                        "sqlnotify: cannot save the high-water mark of replication slot {} \
                         ({why}): if the slot is dropped and made again while no process of \
                         consumer {consumer:?} reads it, the next one to read will not notice",
                        self.slot
                    );
                }
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::Database {
                    context: format!(
                        "saving the high-water mark of replication slot {}",
                        self.slot
                    ),
                    source: format!("no answer within {limit:?}").into(),
                })
            }
        }
        self.marks = Some(client);
        self.marked = lsn;
        Ok(())
    }

    /// [`mark`](Self::mark), a failure logged: where the slot is not confirmed next (a slot
    /// just found or made), the next save tries again.
    async fn mark_or_warn(&mut self, consumer: &str, position: u64) {
        if let Err(e) = self.mark(consumer, position).await {
            log::warn!(
                "sqlnotify: saving the high-water mark of replication slot {}: {e}",
                self.slot
            );
        }
    }

    /// [`Error::SlotLost`] once the lag task saw the server invalidate the slot.
    fn check_lost(&self) -> Result<()> {
        if self.lost.load(Ordering::Relaxed) {
            return Err(self.slot_lost());
        }
        Ok(())
    }

    /// [`Error::SlotLost`] for a slot whose `wal_status` is `lost`.
    fn slot_lost(&self) -> Error {
        Error::SlotLost {
            slot: self.slot.clone(),
            detail: "its wal_status is lost: it fell behind by more than max_slot_wal_keep_size"
                .into(),
        }
    }

    /// The error for a panic caught while reading the stream.
    fn panicked(&self, panic: &(dyn std::any::Any + Send)) -> Error {
        Error::Database {
            context: format!("streaming replication slot {}", self.slot),
            source: format!("panicked: {}", crate::error::panic_message(panic)).into(),
        }
    }

    fn error(&self, e: pgwire_replication::PgWireError) -> Error {
        let text = e.to_string();
        // PostgreSQL 15 refuses to start an invalidated slot with "cannot read from logical
        // replication slot" (the detail, "has been invalidated…", may not be in the text).
        if text.contains("can no longer get changes from replication slot")
            || text.contains("cannot read from logical replication slot")
            || text.contains("has been invalidated")
        {
            return Error::SlotLost {
                slot: self.slot.clone(),
                detail: text,
            };
        }
        Error::Database {
            context: format!("streaming replication slot {}", self.slot),
            source: text.into(),
        }
    }

    /// Hands `batch` over ([`Outlet::forward`]). While it waits for room — the pipeline is
    /// stalled, a subscriber takes no events — the walsender soon blocks writing to a socket
    /// nobody reads, and such a walsender ignores the termination the server sends to
    /// invalidate its slot: the checkpoint that must invalidate it would wait for it for ever,
    /// and with it every later checkpoint and the WAL removal `max_slot_wal_keep_size` is set
    /// for. So once the wait has lasted [`DOOMED_STALL`] while the slot is doomed (the lag
    /// task saw `wal_status` `unreserved`), the stream is closed: its walsender ends, the
    /// checkpoint goes on. The batch is still handed over when there is room (it was read
    /// before); the closed stream then ends the session, and the next one fails with
    /// [`Error::SlotLost`] if the slot was invalidated, or resumes from the slot.
    async fn forward(
        &self,
        conn: &mut LogicalConn,
        outlet: &Outlet,
        batch: Vec<RawNotification>,
    ) -> Option<u64> {
        let mut forward = std::pin::pin!(outlet.forward(batch));
        loop {
            tokio::select! {
                biased;
                forwarded = &mut forward => return forwarded,
                () = tokio::time::sleep(DOOMED_STALL) => {}
            }
            if self.doomed.load(Ordering::Relaxed) && conn.client.is_running() {
                log::warn!(
                    "sqlnotify: replication slot {} is past max_slot_wal_keep_size (wal_status \
                     unreserved) while its subscribers take no events: closing its stream so \
                     that the server can invalidate it; the consumer fails with SlotLost if it \
                     does",
                    self.slot
                );
                conn.client.abort();
            }
        }
    }

    /// Handles one event: a Commit moves its transaction's rows into `batch`.
    fn handle(
        &mut self,
        conn: &mut LogicalConn,
        event: ReplicationEvent,
        batch: &mut Vec<RawNotification>,
    ) {
        log::trace!("sqlnotify: slot {}: {event:?}", self.slot);
        match event {
            ReplicationEvent::Begin { final_lsn, xid, .. } => {
                let xid = widen_xid(xid, self.next_xid.load(Ordering::Relaxed));
                self.next_xid.fetch_max(xid, Ordering::Relaxed);
                conn.open = Some(Open {
                    xid,
                    commit_lsn: final_lsn.0,
                    rows: std::mem::take(&mut self.spare_rows),
                });
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                let Some(open) = conn.open.as_mut() else {
                    return;
                };
                let before = open.rows.len();
                if let Err(e) = self.changes.read(&data, wal_start.0, &mut open.rows) {
                    if let Some(outlet) = &self.outlet {
                        outlet.stats().malformed.fetch_add(1, Ordering::Relaxed);
                    }
                    log::warn!("sqlnotify: slot {}: skipping a change: {e}", self.slot);
                }
                // Decoded all the same (a Relation message shares its change's LSN, and the
                // rows after it need it), but rows handed over before a reconnect go.
                if self.handed_over(open, wal_start.0) {
                    open.rows.truncate(before);
                }
                self.spill(open, batch);
            }
            ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                let Some(mut open) = conn.open.take() else {
                    return;
                };
                let commit = if open.commit_lsn != 0 {
                    open.commit_lsn
                } else {
                    lsn.0
                };
                if commit <= self.delivered {
                    return; // sent again after a reconnect: handed over before
                }
                conn.proved = true;
                self.sent.insert(open.xid);
                let last = open.rows.len().saturating_sub(1);
                let received_at = SystemTime::now();
                for (i, row) in open.rows.drain(..).enumerate() {
                    batch.push(raw(row, open.xid, i == last, received_at));
                }
                self.spare_rows = open.rows;
                self.delivered = commit;
                self.spilled = None;
                self.position = Some(self.position.unwrap_or(0).max(end_lsn.0));
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                conn.proved |= conn.from.is_some_and(|from| wal_end.0 > from);
                // Idle: everything committed before the server's WAL end has been sent.
                if conn.open.is_none() && conn.pending.is_none() {
                    self.position = Some(self.position.unwrap_or(0).max(wal_end.0));
                }
            }
            ReplicationEvent::Message {
                transactional: true,
                lsn,
                prefix,
                content,
            } => {
                // A custom event (`Notifier::notify_with`), in its transaction.
                let (Some(open), Some(channel)) =
                    (conn.open.as_mut(), prefix.strip_prefix(MESSAGE_PREFIX))
                else {
                    return;
                };
                let known = self.channels.iter().find(|c| ***c == *channel).cloned();
                if let Some(channel) = known.filter(|_| !self.handed_over(open, lsn.0)) {
                    let Some(payload) = self.open_message(&channel, &content) else {
                        return;
                    };
                    open.rows.push(Row {
                        channel,
                        decoded: None,
                        payload,
                        lsn: lsn.0,
                        part: part_after(&open.rows, lsn.0),
                        size: 0,
                    });
                    self.spill(open, batch);
                }
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
    }

    /// Moves the rows of `open` past [`MAX_OPEN_ROWS`] into `batch`, all but those of its
    /// newest change (one change can make several rows, all of its LSN; the Commit marks the
    /// last one): a transaction is not kept whole however large it is. What went is recorded
    /// in `spilled`, so that after a reconnect, which sends the transaction again from its
    /// Begin, those rows are not handed over twice. A transaction without a commit LSN in its
    /// Begin (pgoutput always sends one) is kept whole; one sent again after a reconnect and
    /// handed over before (its commit at or below `delivered`) is dropped as it comes.
    fn spill(&mut self, open: &mut Open, batch: &mut Vec<RawNotification>) {
        if open.rows.len() <= MAX_OPEN_ROWS || open.commit_lsn == 0 {
            return;
        }
        if open.commit_lsn <= self.delivered {
            open.rows.clear();
            return;
        }
        let newest = open.rows.last().map_or(0, |row| row.lsn);
        let keep = open
            .rows
            .iter()
            .rposition(|row| row.lsn != newest)
            .map_or(0, |i| i + 1);
        if keep == 0 {
            return; // one change's rows: they wait for the next change or the Commit
        }
        // Handed over before its Commit: snapshot feeds must know it is on its way.
        self.sent.insert(open.xid);
        let last = open.rows[keep - 1].lsn;
        let received_at = SystemTime::now();
        batch.extend((open.rows.drain(..keep)).map(|row| raw(row, open.xid, false, received_at)));
        self.spilled = Some((open.commit_lsn, last));
    }

    /// Whether the rows of the change at `lsn` in `open` were handed over already (by
    /// [`LogicalSource::spill`], before a reconnect sent the transaction again).
    fn handed_over(&self, open: &Open, lsn: u64) -> bool {
        self.spilled
            .is_some_and(|(commit, last)| commit == open.commit_lsn && lsn <= last)
    }

    /// Reads the slot's lag every [`LAG_EVERY`] into the counters, warning past
    /// [`LAG_WARNING`]; also the server's next transaction id (the reference of
    /// [`widen_xid`]), and whether the server invalidated the slot (`wal_status` `lost`: the
    /// session fails with [`Error::SlotLost`] at its next step, and the shell stops for good).
    fn watch_lag(&mut self, outlet: &Outlet) {
        if self.lag.is_some() {
            return;
        }
        let (config, slot, outlet) = (self.config.clone(), self.slot.clone(), outlet.clone());
        let (next_xid, lost) = (self.next_xid.clone(), self.lost.clone());
        let doomed = self.doomed.clone();
        let (wake, sent) = (self.wake.clone(), self.sent.clone());
        self.lag = Some(tokio::task::spawn_local(async move {
            let mut client = None;
            let mut warned = false;
            while !outlet.stopped() {
                if client.is_none() {
                    client = Control::connect(&config, "slot lag").await.ok();
                }
                if let Some(c) = &client {
                    // Guarded: a panic would end this task, and with it the lag, the
                    // warning and the detection of a lost slot, for good.
                    let read = crate::error::caught(
                        || "reading the slot's lag".into(),
                        super::lag(c, &slot),
                    );
                    match read.await {
                        Ok(Some(state)) => {
                            outlet.stats().slot_lag.store(state.lag, Ordering::Relaxed);
                            next_xid.fetch_max(state.next_xid, Ordering::Relaxed);
                            let bytes = state.lag;
                            doomed.store(state.wal_status == "unreserved", Ordering::Relaxed);
                            if state.wal_status == "lost" {
                                if !lost.swap(true, Ordering::Relaxed) {
                                    wake.notify_one();
                                }
                            } else if bytes > LAG_WARNING && !warned {
                                warned = true;
                                log::warn!("sqlnotify: replication slot {slot} holds {bytes} bytes of WAL on the server (wal_status {}); a consumer that stops reading fills the server's disk: drop it if it will not come back", state.wal_status);
                            } else if bytes <= LAG_WARNING / 2 {
                                warned = false;
                            }
                        }
                        Ok(None) => {}
                        Err(_) => client = None,
                    }
                }
                if let Some(c) = &client {
                    let (asked, floor) = sent.list();
                    if !asked.is_empty() || floor {
                        match super::running(c, &asked).await {
                            Ok((running, oldest)) => sent.finished(&asked, &running, oldest),
                            Err(e) => {
                                log::debug!("sqlnotify: slot {slot}: {e}");
                                client = None;
                            }
                        }
                    }
                }
                let stop = outlet.clone();
                tokio::select! {
                    _ = tokio::time::sleep(LAG_EVERY) => {}
                    _ = stop.stopping() => {}
                }
            }
        }));
    }
}

impl Drop for LogicalSource {
    fn drop(&mut self) {
        if let Some(lag) = &self.lag {
            lag.abort();
        }
    }
}

/// The walsender's output settings, pinned whatever the role, database or server set:
/// pgoutput writes values in their text form, with the session's `DateStyle`, `IntervalStyle`
/// and `bytea_output`, and `values.rs` reads dates and timestamps as ISO (what the trigger
/// tiers' `to_json` writes whatever `DateStyle` says).
const OUTPUT_SETTINGS: &str = "-c DateStyle=ISO -c IntervalStyle=postgres -c bytea_output=hex";

/// The replication connection's settings from the URL's: first host and port, user,
/// password, database, and (feature `tls`) libpq's TLS parameters; without the feature the
/// URL cannot ask for TLS (`PgConfig::parse` refuses it) and the connection is plaintext.
/// The output settings are [`OUTPUT_SETTINGS`].
fn replication_config(config: &PgConfig, slot: &str) -> Result<ReplicationConfig> {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config
        .get_user()
        .map(str::to_string)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "postgres".into());
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = config
        .get_dbname()
        .map_or_else(|| user.clone(), str::to_string);
    let mut c = ReplicationConfig::new(host, user, password, database, slot, slot);
    c.port = port;
    c.status_interval = STATUS_INTERVAL;
    c.buffer_events = BUFFER_MESSAGES;
    c.application_name = Some("sqlnotify logical".into());
    c.options = Some(OUTPUT_SETTINGS.into());
    #[cfg(feature = "tls")]
    {
        c.tls = config.tls().replication(c.is_unix_socket());
    }
    Ok(c)
}

impl Source for LogicalSource {
    type Conn = LogicalConn;
    type Position = u64;
    const NAME: &'static str = "PostgreSQL (logical)";

    async fn connect(&mut self, outlet: &Outlet) -> Result<LogicalConn> {
        self.outlet = Some(outlet.clone());
        self.watch_lag(outlet);
        self.changes.reset();
        let mut client = ReplicationClient::connect_gated(self.replication.clone())
            .await
            .map_err(|e| self.error(e))?;
        // The reference for widening transaction ids, before the stream starts. The session
        // connects and authenticates in a task of its own, so this first answer is the
        // connect's end: bounded like every other connect (`PgConfig::connect_within`), a
        // server that takes the socket and never answers would hold the reconnect for ever.
        // Given up, the task is aborted (a drop only asks it to stop, which it hears once
        // connected), its socket with it.
        let within = self.config.connect_within();
        let rows = match tokio::time::timeout(within, client.simple_query(NEXT_XID_SQL)).await {
            Ok(rows) => rows.map_err(|e| self.error(e))?,
            Err(_) => {
                client.abort();
                return Err(Error::Database {
                    context: format!("connecting to replication slot {}", self.slot),
                    source: format!("no answer within {within:?}").into(),
                });
            }
        };
        let next = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|v| parse_xid8(&String::from_utf8_lossy(v.as_ref())))
            .ok_or_else(|| Error::Database {
                context: format!("streaming replication slot {}", self.slot),
                source: "the server did not report its next transaction id".into(),
            })?;
        self.next_xid.fetch_max(next, Ordering::Relaxed);
        Ok(LogicalConn {
            client,
            started: false,
            pending: None,
            open: None,
            from: None,
            proved: false,
        })
    }

    /// The slot holds the position: reading starts at its confirmed position, so what this
    /// source read before is forgotten — what it handed over, spilled, reached or has still to
    /// confirm. The shell places again after its consumer lost the lease: another process held
    /// it meanwhile and may have read past this one's events without confirming them, and the
    /// server now sends again from the slot's confirmed position; skipped as handed over
    /// before, those events would be lost, and this source's old position saved past them.
    async fn place(
        &mut self,
        _: &mut LogicalConn,
        _: Option<&ConsumerParams>,
    ) -> Result<Vec<String>> {
        self.delivered = 0;
        self.spilled = None;
        self.position = None;
        self.unconfirmed.clear();
        self.reached = None;
        self.marked = 0;
        Ok(Vec::new())
    }

    /// The slot and its publication keep the position. Removed while this notifier runs — by
    /// an operator, by `cleanup` or `consumers drop` in another process, or by a failover to a
    /// server without them — the session could only fail to start the stream, and the
    /// listener reconnect for ever: they are created again at the server's current position
    /// (this notifier made them at `start()`, so they are its to make again), as a journal
    /// tier registers again a consumer whose row was deleted, and every channel is reported
    /// missed, since the changes committed meanwhile are not in the new slot. Only the lease
    /// holder gets here, so one process of a group does it, the one whose subscribers miss
    /// the changes; a process that starts meanwhile makes neither ([`super::Making::Start`]).
    /// A slot present without its publication is made again too (see [`super::recreate`]).
    ///
    /// A slot made again by someone else before this session looked — an operator, a process
    /// of an earlier version of sqlnotify starting meanwhile, or one that made both after
    /// someone dropped both by hand — is told from the one the consumer read by its confirmed
    /// position: only positions read are confirmed, so the slot it read never confirmed past
    /// the furthest position this source knows it had (`reached`: the confirmed position a
    /// session found, or a position read since), nor past the consumer's high-water mark
    /// (`marks.rs`: raised by every process of the consumer before it confirms), while a new
    /// slot starts past every position of the WAL written before it was made, both included.
    /// Found past them, it is a new slot (or the old one moved on by someone,
    /// `pg_replication_slot_advance` skipping changes): the same Gap. The mark is what a
    /// process that has just taken the lease compares with — it has read nothing (`reached`
    /// is `None` once placed) — and it also covers what another process of the group
    /// confirmed during a takeover this one never saw, which `reached` alone would report as a
    /// needless Gap. A slot found with no mark (a consumer of an earlier version) is taken as
    /// it is and marked; the new slot of a Gap is marked too, so that the Gap is reported
    /// once.
    ///
    /// An invalidated slot (`wal_status` `lost`) is not made again: it was not removed but
    /// declared unreadable by the server, which the tier reports as fatal
    /// [`Error::SlotLost`] (drop the consumer to start again from now); that stays so. A slot
    /// of this name in another database is left for the stream's start to report.
    async fn restore(
        &mut self,
        conn: &mut LogicalConn,
        consumer: Option<&ConsumerParams>,
    ) -> Result<Vec<String>> {
        let state = self.slot_state(conn).await?;
        conn.from = state.confirmed;
        let reached = self.reached.max(self.position);
        // What the slot may have confirmed at most: what this source read or found, and what
        // any process of the consumer let it confirm (its high-water mark, `marks.rs`).
        let mark = state.mark.flatten();
        let known = reached.max(mark);
        let what = match (state.slot.as_str(), state.publication) {
            ("lost", _) => return Err(self.slot_lost()),
            ("foreign", _) => return Ok(Vec::new()),
            ("missing", _) => "was dropped while the notifier ran",
            (_, false) => "lost its publication while the notifier ran",
            (_, true) => match (state.confirmed, known) {
                (Some(confirmed), Some(known)) if confirmed > known => {
                    if reached.is_some_and(|reached| reached >= mark.unwrap_or(0)) {
                        "was made again by someone else while the notifier ran (its confirmed \
                         position is past any this notifier read)"
                    } else {
                        "was made again by someone else while no process of its consumer read \
                         it (its confirmed position is past the consumer's high-water mark)"
                    }
                }
                _ => {
                    self.reached = reached.max(state.confirmed);
                    if let (Some(consumer), Some(None), Some(confirmed)) =
                        (consumer, state.mark, state.confirmed)
                    {
                        // No mark yet (a consumer of an earlier version, or a creation cut
                        // short before its mark): nothing to compare with, marked from now on.
                        self.mark_or_warn(&consumer.name, confirmed.max(reached.unwrap_or(0)))
                            .await;
                    }
                    return Ok(Vec::new());
                }
            },
        };
        let replaced = state.slot != "missing" && state.publication;
        if !replaced {
            let client =
                Control::connect(&self.config, "creating the replication slot again").await?;
            let name = consumer.map(|c| c.name.as_str());
            let stale = state.slot != "missing";
            super::recreate(
                &client,
                &self.slot,
                &self.tables,
                name,
                stale,
                self.objects_wait,
            )
            .await?;
        }
        let mut channels: Vec<String> = self.channels.iter().map(|c| c.to_string()).collect();
        channels.sort();
        channels.dedup();
        log::warn!(
            "sqlnotify: replication slot {} {what}{}; changes committed meanwhile on {} are \
             lost, subscribers get Status::Gap",
            self.slot,
            if replaced {
                ""
            } else {
                ": created again at the server's current position"
            },
            channels.join(", ")
        );
        // The new slot's positions follow none of the old one's.
        self.delivered = 0;
        self.spilled = None;
        self.position = None;
        self.unconfirmed.clear();
        self.marked = 0;
        // (A failure to read the new slot's position must not cost the Gap: the slot is made.)
        self.reached = match self.slot_state(conn).await {
            Ok(state) => {
                conn.from = state.confirmed;
                state.confirmed
            }
            Err(e) => {
                log::warn!(
                    "sqlnotify: reading the position of replication slot {} made again: {e}",
                    self.slot
                );
                None
            }
        };
        // The new slot is the consumer's now: marked, so that the next lease holder does not
        // report this Gap again (made again here, `ensure` marked it already).
        if let (Some(consumer), Some(confirmed)) = (consumer, self.reached) {
            self.mark_or_warn(&consumer.name, confirmed).await;
        }
        Ok(channels)
    }

    async fn lease(&mut self, conn: &mut LogicalConn, consumer: &ConsumerParams) -> Result<bool> {
        if conn.started {
            return Ok(true); // held by this walsender since it was taken
        }
        let rows = conn
            .client
            .simple_query(&lease_sql(&consumer.name))
            .await
            .map_err(|e| self.error(e))?;
        let held = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .is_some_and(|v| v.as_ref() == b"t");
        Ok(held)
    }

    async fn read(&mut self, conn: &mut LogicalConn, outlet: &Outlet) -> Result<Option<u64>> {
        self.check_lost()?;
        self.start(conn).await?;
        let mut batch = Vec::new();
        let began = Instant::now();
        // A failure ends the read once the transactions already complete are handed over:
        // they count as delivered (a reconnect skips them), so they must not be dropped. A
        // panic (the driver's, on a message it did not expect) is such a failure too, caught
        // here rather than by the session's guard, which would drop the batch.
        let mut failure = None;
        loop {
            let event = match conn.pending.take() {
                Some(event) => Some(event),
                None => {
                    match catch_unwind(AssertUnwindSafe(|| conn.client.recv().now_or_never())) {
                        Ok(None) => None,
                        Ok(Some(Ok(Some(event)))) => Some(event),
                        Ok(Some(Ok(None))) => {
                            failure = Some(Error::Database {
                                context: format!("streaming replication slot {}", self.slot),
                                source: "the server ended the stream".into(),
                            });
                            None
                        }
                        Ok(Some(Err(e))) => {
                            failure = Some(self.error(e));
                            None
                        }
                        Err(panic) => {
                            failure = Some(self.panicked(&*panic));
                            None
                        }
                    }
                }
            };
            let Some(event) = event else { break };
            let handled = catch_unwind(AssertUnwindSafe(|| self.handle(conn, event, &mut batch)));
            if let Err(panic) = handled {
                failure = Some(self.panicked(&*panic));
                break;
            }
            // A full batch (an event adds a Commit's at most MAX_OPEN_ROWS rows, or one
            // change's: memory stays bounded whatever the transactions' sizes), or the read's
            // time, ends it whatever else the stream holds: the shell notes the position and
            // saves between reads, and behind slow subscribers the stream refills while a
            // batch waits for room, so a read that went on until it found the stream empty
            // would keep the slot unconfirmed for a whole catch-up. A transaction still open
            // waits in `conn` for the next read (what of it went is in `spilled`); the next
            // wait finds the events already received at once.
            if batch.len() >= MAX_BATCH || began.elapsed() >= READ_BUDGET {
                break;
            }
        }
        let Some(forwarded) = self.forward(conn, outlet, batch).await else {
            return Ok(None);
        };
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(position) = self.position {
            if !self.named {
                let count = outlet.stats().forwarded.load(Ordering::Relaxed);
                if self.unconfirmed.back().is_none_or(|(_, p)| *p != position) {
                    self.unconfirmed.push_back((count, position));
                }
            }
        }
        self.confirm_settled(conn);
        Ok(Some(forwarded))
    }

    fn position(&self) -> Option<u64> {
        self.position
    }

    /// Only once the stream got past its start ([`LogicalConn::proved`]): a read returns
    /// before the server sent anything, and a wait wakes for a message not handled yet, so a
    /// read or a wait without error proves nothing by itself — a stream that fails on its
    /// first message (one the server cannot decode, such as a change logged while the
    /// publication was missing) would look healthy every time, and be retried at the
    /// shortest delay for ever. Nor does the keepalive the server sends as the stream starts
    /// (its WAL end is the start), nor a transaction sent again after a reconnect that was
    /// handed over before: one ahead of the failing message would prove the session each
    /// time. Never before the stream starts (a consumer waiting for its first subscription,
    /// whose session ends within the longest delay, counts as failed). An idle stream whose
    /// slot is confirmed up to the server's WAL end proves itself only with the next
    /// transaction, or by lasting the longest delay.
    fn proved(&self, conn: &LogicalConn) -> bool {
        conn.proved
    }

    async fn wait(&mut self, conn: &mut LogicalConn, timeout: Duration) -> Result<bool> {
        if conn.pending.is_some() {
            // Not read: a consumer waiting for its first subscription. Wait as asked.
            tokio::time::sleep(timeout).await;
            return Ok(true);
        }
        self.check_lost()?;
        let gated = self.named
            && !conn.started
            && !self.outlet.as_ref().is_some_and(|o| {
                o.stats()
                    .has_subscriber
                    .load(std::sync::atomic::Ordering::Acquire)
            });
        if gated {
            // A consumer before its first subscription reads nothing: the stream is not
            // started yet, so no walsender waits on a socket nobody reads (one that does
            // blocks a checkpoint that must invalidate the slot).
            return match tokio::time::timeout(timeout, self.wake.notified()).await {
                Ok(()) => self.check_lost().map(|()| true),
                Err(_) => Ok(false),
            };
        }
        self.start(conn).await?;
        self.confirm_settled(conn);
        let received = tokio::select! {
            received = tokio::time::timeout(timeout, conn.client.recv()) => received,
            () = self.wake.notified() => return self.check_lost().map(|()| true),
        };
        match received {
            Err(_) => Ok(false),
            Ok(Ok(Some(event))) => {
                conn.pending = Some(event);
                Ok(true)
            }
            Ok(Ok(None)) => Err(Error::Database {
                context: format!("streaming replication slot {}", self.slot),
                source: "the server ended the stream".into(),
            }),
            Ok(Err(e)) => Err(self.error(e)),
        }
    }

    async fn check(&mut self, conn: &mut LogicalConn, _limit: Duration) -> Result<()> {
        self.check_lost()?;
        // The crate answers the server's keepalives and fails the stream when the socket
        // does; before the stream starts, a query.
        if conn.started {
            if conn.client.is_running() || conn.pending.is_some() {
                return Ok(());
            }
            return Err(Error::Database {
                context: format!("streaming replication slot {}", self.slot),
                source: "the replication connection ended".into(),
            });
        }
        conn.client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    async fn save(
        &mut self,
        conn: &mut LogicalConn,
        consumer: &ConsumerParams,
        position: &u64,
    ) -> Result<Vec<String>> {
        if *position > 0 {
            // The high-water mark first: a slot confirmed past its mark would look made again
            // to the next lease holder (`marks.rs`). Not saved: not confirmed.
            self.mark(&consumer.name, *position).await?;
            conn.client.update_applied_lsn(Lsn(*position));
        }
        Ok(Vec::new())
    }

    /// After stop the stream is closed: the slot is advanced on a connection of its own,
    /// after its high-water mark was raised to the position (`marks.rs`).
    fn final_save(&self) -> FinalSave<u64> {
        let (config, slot) = (self.config.clone(), self.slot.clone());
        let limit = self.health_check;
        Box::new(move |consumer, position| {
            Box::pin(async move {
                if position == 0 {
                    return Ok(());
                }
                let client = Control::connect(&config, "advancing the replication slot").await?;
                // The high-water mark first, as in `save`.
                marks::save_within(&client, &slot, &consumer, position, limit).await?;
                advance(&client, &slot, position).await
            })
        })
    }

    async fn close(&mut self, mut conn: LogicalConn) {
        self.confirm_settled(&conn);
        if !conn.started {
            // Never streamed (a consumer before its first subscription, or a standby):
            // nothing was read or is to confirm, and the session waits for its gate, not for
            // a stop, so a graceful shutdown would only wait out its timeout (5 s of every
            // stop). Its walsender ends with the connection.
            conn.client.abort();
            return;
        }
        conn.client.stop();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.client.shutdown()).await;
        conn.client.abort();
    }

    /// Woken by the stream itself; the interval only bounds how long a wait lasts.
    fn pace(&self) -> Pace {
        Pace {
            active: self.health_check,
            idle: self.health_check,
            stay_active: Duration::ZERO,
        }
    }
}

/// Moves slot `slot`'s confirmed position to `lsn` (not backwards), waiting up to a second for
/// the walsender of the closed stream to let go of it. A slot still in use after that belongs
/// to another process of the consumer that took over: it confirms from now on, and what this
/// one did not confirm is delivered again (at least once), so stop does not fail over it.
async fn advance(client: &tokio_postgres::Client, slot: &str, lsn: u64) -> Result<()> {
    let target = format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff);
    let sql = "SELECT pg_catalog.pg_replication_slot_advance($1, $2::text::pg_lsn)
                 FROM pg_catalog.pg_replication_slots
                WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        match client.execute(sql, &[&slot, &target]).await {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                if tokio::time::Instant::now() >= deadline {
                    log::info!(
                        "sqlnotify: replication slot {slot} is read by another process now; \
                         not advancing it to {target}"
                    );
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(Error::db(format!("advancing replication slot {slot}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_query_quotes_a_name_with_backslashes_and_quotes_whatever_the_settings() {
        assert!(lease_sql("orders").contains("md5('sqlnotify consumer orders')"));
        // An E'' literal means the same with standard_conforming_strings on or off; the
        // plain one the name used to be put in let `\'` end it when off.
        let sql = lease_sql(r"x\'; SELECT 1; --");
        assert!(
            sql.contains(r"md5(E'sqlnotify consumer x\\''; SELECT 1; --')"),
            "{sql}"
        );
    }

    #[test]
    fn a_replication_connection_gets_the_urls_settings() {
        let plain = PgConfig::parse("postgres://u@h:6543/d?sslmode=disable").unwrap();
        let c = replication_config(&plain, "s").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.database.as_str()),
            ("h", 6543, "d")
        );
        assert!(!c.tls.mode.requires_tls());
        assert_eq!(
            c.options.as_deref(),
            Some("-c DateStyle=ISO -c IntervalStyle=postgres -c bytea_output=hex"),
            "values in the forms values.rs reads"
        );
        assert_eq!(
            c.buffer_events, BUFFER_MESSAGES,
            "a quarter of the crate's default"
        );
        #[cfg(feature = "tls")]
        {
            use pgwire_replication::SslMode;
            for (mode, expected) in [
                ("prefer", SslMode::Prefer),
                ("require", SslMode::Require),
                ("verify-ca", SslMode::VerifyCa),
                ("verify-full", SslMode::VerifyFull),
            ] {
                let url = format!("postgres://h/d?sslmode={mode}");
                let c = replication_config(&PgConfig::parse(&url).unwrap(), "s").unwrap();
                assert_eq!(c.tls.mode, expected, "{mode}");
            }
            let socket = PgConfig::parse("postgresql:///d?host=/run/pg&sslmode=require").unwrap();
            let c = replication_config(&socket, "s").unwrap();
            assert_eq!(c.tls.mode, SslMode::Disable, "no TLS on a unix socket");
        }
    }

    #[test]
    fn a_32_bit_xid_widens_to_the_full_id_nearest_the_reference() {
        const EPOCH: u64 = 1 << 32;
        // epoch 0, as on a new cluster: unchanged
        assert_eq!(widen_xid(750, 800), 750);
        assert_eq!(widen_xid(900, 800), 900);
        // a later epoch: older and newer transactions keep it
        assert_eq!(widen_xid(1_000, 3 * EPOCH + 5_000), 3 * EPOCH + 1_000);
        assert_eq!(widen_xid(9_000, 3 * EPOCH + 5_000), 3 * EPOCH + 9_000);
        // across a wrap: a transaction of the epoch before, and one of the next
        assert_eq!(
            widen_xid(u32::MAX - 10, 3 * EPOCH + 20),
            2 * EPOCH + u64::from(u32::MAX) - 10
        );
        assert_eq!(widen_xid(5, 3 * EPOCH - 100), 3 * EPOCH + 5);
        // up to 2³¹ either way
        assert_eq!(
            widen_xid((1 << 31) + 99, 3 * EPOCH + 100),
            3 * EPOCH + (1 << 31) + 99
        );
        assert_eq!(widen_xid(101, 3 * EPOCH + (1 << 31) + 100), 3 * EPOCH + 101);
        // the reference of a new cluster is never older than 2³¹ below epoch 0: no underflow
        assert_eq!(widen_xid(u32::MAX - 1, 10), u64::from(u32::MAX) - 1);
        assert_eq!(parse_xid8(" 12884902098\n"), Some(12_884_902_098));
        assert_eq!(parse_xid8("x"), None);
    }
}
