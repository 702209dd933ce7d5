//! One session of a listener: connect, place the position (first session, and the first after a
//! lost lease), restore what keeps it if it was removed meanwhile, then read, save, check and
//! wait until stopped or failed. Runs on the listener's arbiter; everything a dialect does in it
//! goes through [`Source`].

use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{select, Either};
use tokio::sync::oneshot;

use super::saving::Saving;
use super::{Pace, Shell, Source, State};
use crate::consumer::{report_gap, ConsumerParams};
use crate::error::Result;
use crate::stats::Role;
use crate::status::Status;

/// How often a named consumer waiting for its first subscription looks again.
const GATE_CHECK: Duration = Duration::from_millis(10);
/// How often a standby tries to take its consumer's lease (what a takeover adds to the time
/// the database takes to notice the holder's death).
pub(crate) const LEASE_RETRY: Duration = Duration::from_millis(250);

/// How a session ended.
pub(super) struct Outcome {
    /// It got through its setup (connect, lease, place, restore) and then a read or a wait
    /// without error that its source counts as proof ([`Source::proved`]: a logical stream
    /// only once something the server sent went through), or it handed events to the
    /// pipeline: with `lasted`, what decides whether the next restart starts the backoff from
    /// the beginning ([`Backoff::healthy`](crate::backoff::Backoff::healthy)). Connecting
    /// alone proves nothing: a server that accepts the connection and then fails the next step
    /// — or a stream that fails on its first message — every time would be retried at the
    /// shortest delay for ever.
    pub proved: bool,
    /// How long it lasted, from the start of its connect.
    pub lasted: Duration,
    /// Why it failed; `None` when it stopped as told or its first start failed (reported to
    /// `start()` through the ready signal).
    pub failure: Option<String>,
    /// The failure's error when it is fatal ([`Error::is_fatal`](crate::Error)): the listener
    /// stops for good.
    pub fatal: Option<crate::Error>,
}

pub(super) struct Session<P> {
    pub shell: Arc<Shell<P>>,
    /// The first session reports readiness (or its failure) here.
    pub ready: Option<oneshot::Sender<Result<()>>>,
}

impl<P: Clone + PartialEq + std::fmt::Debug + Send + 'static> Session<P> {
    /// Runs the session to its end and gives the state back.
    pub async fn run<S: Source<Position = P>>(
        mut self,
        mut state: State<S>,
    ) -> (State<S>, Outcome) {
        let began = Instant::now();
        let outlet = self.shell.outlet.clone();
        let connecting = state.source.connect(&outlet);
        let mut conn = match unless_stopped::<S, _>(&outlet, "connecting", connecting).await {
            Ok(Some(conn)) => conn,
            Ok(None) => return stopped(state, began),
            Err(e) => return self.failed(state, None, e, began),
        };
        self.shell.status(Status::Connected);
        let group = match &self.shell.consumer {
            Some(consumer) if state.source.reads() => Some(consumer.clone()),
            _ => None,
        };
        if let Some(consumer) = &group {
            match self.take_lease(&mut state, &mut conn, consumer).await {
                Ok(true) => {}
                Ok(false) => {
                    // Told to stop while standing by.
                    close(&mut state.source, conn).await;
                    return stopped(state, began);
                }
                Err(e) => return self.failed(state, Some(conn), e, began),
            }
        }
        let mut missed = Vec::new();
        if !state.placed {
            let placing = state.source.place(&mut conn, self.shell.consumer.as_ref());
            match unless_stopped::<S, _>(&outlet, "placing its position", placing).await {
                Ok(Some(m)) => missed = m,
                Ok(None) => return stopped(state, began),
                Err(e) => return self.failed(state, Some(conn), e, began),
            }
            state.placed = true;
            if let Some(position) = state.source.position() {
                state.saving.placed(position.clone(), Instant::now());
                self.set_latest(position);
            }
        }
        let restoring = state
            .source
            .restore(&mut conn, self.shell.consumer.as_ref());
        let restored =
            match unless_stopped::<S, _>(&outlet, "restoring its position", restoring).await {
                Ok(Some(restored)) => restored,
                Ok(None) => return stopped(state, began),
                Err(e) => return self.failed(state, Some(conn), e, began),
            };
        let restarted = std::mem::replace(&mut state.was_connected, true);
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Ok(()));
        }
        self.gap(missed);
        self.restored(&mut state, restored);
        if restarted {
            let lossy = state.source.lossy_channels();
            if !lossy.is_empty() {
                self.shell.status(Status::Gap { channels: lossy });
            }
        }
        let mut proved = false;
        let forwarded = self.shell.stats.forwarded.load(Ordering::Relaxed);
        let serving = self.serve(&mut state, &mut conn, restarted, &mut proved);
        let served = serving.await;
        // Events that went down the pipeline prove the session too: a notify-tier session
        // hands them over from its connection's reader while its wait goes on, and one
        // terminated right after is no failing server.
        proved |= self.shell.stats.forwarded.load(Ordering::Relaxed) > forwarded;
        let (failure, fatal) = match served {
            Ok(()) => {
                close(&mut state.source, conn).await;
                (None, None)
            }
            Err(e) => (
                Some(state.source.describe(Some(&conn), &e)),
                e.is_fatal().then_some(e),
            ),
        };
        (
            state,
            Outcome {
                proved,
                lasted: began.elapsed(),
                failure,
                fatal,
            },
        )
    }

    /// Ends a session that failed before serving: the first one reports to `start()`.
    fn failed<S: Source<Position = P>>(
        &mut self,
        state: State<S>,
        conn: Option<S::Conn>,
        e: crate::Error,
        began: Instant,
    ) -> (State<S>, Outcome) {
        let (failure, fatal) = match self.ready.take() {
            Some(ready) => {
                let _ = ready.send(Err(e));
                (None, None)
            }
            None => (
                Some(state.source.describe(conn.as_ref(), &e)),
                e.is_fatal().then_some(e),
            ),
        };
        (
            state,
            Outcome {
                proved: false,
                lasted: began.elapsed(),
                failure,
                fatal,
            },
        )
    }

    /// Takes the consumer's lease, standing by while another process holds it. Returns
    /// false when told to stop meanwhile. A standby reports readiness: `start()` returns.
    async fn take_lease<S: Source<Position = P>>(
        &mut self,
        state: &mut State<S>,
        conn: &mut S::Conn,
        consumer: &ConsumerParams,
    ) -> Result<bool> {
        let shell = self.shell.clone();
        shell.stats.set_role(Role::Starting);
        let mut standing_by = false;
        let mut last_io = Instant::now();
        loop {
            let taking = state.source.lease(conn, consumer);
            match unless_stopped::<S, _>(&shell.outlet, "taking the consumer's lease", taking)
                .await?
            {
                Some(true) => break,
                Some(false) => {}
                None => return Ok(false),
            }
            if !standing_by {
                standing_by = true;
                if std::mem::take(&mut state.held_lease) {
                    // Another process took over while this one was away: what it knew is
                    // stale, the new holder's saved position is what counts.
                    log::warn!(
                        "sqlnotify: consumer {:?} lost its lease to another process; standing by",
                        consumer.name
                    );
                    state.placed = false;
                    state.saving = Saving::default();
                    // Nor is the position it had read to its own to save any more: a stop as
                    // a standby must not move the saved position past what it never saw
                    // acknowledged (the holds it forgets below).
                    *shell.latest.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    // What acknowledged subscriptions still hold is the new holder's to
                    // deliver: held here, it would keep this process from ever saving again.
                    // Every unit read under the lost lease was forwarded (and counted) by the
                    // session that ended: the fence goes above them all (`src/holds.rs`),
                    // and the relay drops what it has not published of them.
                    let forwarded = shell.stats.forwarded.load(Ordering::Relaxed);
                    shell.stats.holds.fence(forwarded);
                    shell.status(Status::LostLease);
                }
                let asking = async { Ok(state.source.lease_holder(conn, consumer).await) };
                let Some(holder) = unless_stopped::<S, _>(&shell.outlet, "asking", asking).await?
                else {
                    return Ok(false);
                };
                log::info!(
                    "sqlnotify: consumer {:?} is active in another process{}; standing by",
                    consumer.name,
                    holder.map_or_else(String::new, |h| format!(" ({h})"))
                );
                shell.stats.set_role(Role::Standby);
                shell.status(Status::Standby);
                if let Some(ready) = self.ready.take() {
                    let _ = ready.send(Ok(()));
                }
            }
            if self.check_due(&mut last_io) {
                let checking = state.source.check(conn, shell.health_check);
                let checked =
                    unless_stopped::<S, _>(&shell.outlet, "checking the connection", checking);
                if checked.await?.is_none() {
                    return Ok(false);
                }
                last_io = Instant::now();
            }
            let retry = pin!(tokio::time::sleep(LEASE_RETRY));
            let stopping = pin!(shell.outlet.stopping());
            if let Either::Right(_) = select(retry, stopping).await {
                return Ok(false);
            }
        }
        state.held_lease = true;
        log::info!(
            "sqlnotify: consumer {:?} is active in this process",
            consumer.name
        );
        shell.stats.set_role(Role::Active);
        shell.status(Status::Active);
        Ok(true)
    }

    /// Reads, saves, checks and waits until told to stop (Ok) or the connection fails; sets
    /// `proved` once a read or a wait went without error and the source counts it as proof
    /// ([`Source::proved`]).
    async fn serve<S: Source<Position = P>>(
        &self,
        state: &mut State<S>,
        conn: &mut S::Conn,
        restarted: bool,
        proved: &mut bool,
    ) -> Result<()> {
        let shell = &*self.shell;
        let outlet = &shell.outlet;
        let reads = state.source.reads();
        let mut pacer = Pacer::new(state.source.pace());
        let mut resync = restarted && reads;
        let mut may_have_rows = true;
        let mut last_read = Instant::now();
        let mut last_io = Instant::now();
        // Whether a named consumer waited for its first subscriber this session.
        let mut gated = false;
        loop {
            if shell.outlet.stopped() {
                return Ok(());
            }
            let gate_open =
                shell.consumer.is_none() || shell.stats.has_subscriber.load(Ordering::Acquire);
            if !gate_open {
                gated = true;
            } else if std::mem::take(&mut gated) && reads {
                // What keeps the position may have been removed, or replaced, while nothing
                // read it (a logical slot nobody streams can be dropped and made again without
                // ending this session): restored again before the first read.
                let restoring = state.source.restore(conn, shell.consumer.as_ref());
                let restoring = unless_stopped::<S, _>(outlet, "restoring its position", restoring);
                let Some(restored) = restoring.await? else {
                    return Ok(());
                };
                self.restored(state, restored);
            }
            let safety_net = last_read.elapsed() >= shell.health_check;
            if reads && gate_open && (may_have_rows || resync || safety_net) {
                let reading = state.source.read(conn, outlet);
                let Some(forwarded) = unless_stopped::<S, _>(outlet, "reading", reading)
                    .await?
                    .flatten()
                else {
                    return Ok(()); // told to stop (while waiting for room, or reading)
                };
                *proved |= state.source.proved(conn);
                self.purged(state.source.missed());
                (last_read, last_io) = (Instant::now(), Instant::now());
                may_have_rows = false;
                pacer.read(forwarded);
                if std::mem::take(&mut resync) {
                    shell.status(Status::Resynced {
                        replayed: forwarded,
                    });
                }
                // Only a named consumer saves a position: without one, none is built.
                if let (Some(_), Some(position)) = (&shell.consumer, state.source.position()) {
                    let forwarded = shell.stats.forwarded.load(Ordering::Relaxed);
                    state.saving.note(forwarded, position.clone());
                    self.set_latest(position);
                }
            }
            if let Some(consumer) = &shell.consumer {
                let safe = shell.stats.safe();
                let due = state.saving.due(safe, consumer.heartbeat(), Instant::now());
                if let Some(position) = due {
                    let saving = state.source.save(conn, consumer, &position);
                    let saving =
                        unless_stopped::<S, _>(outlet, "saving the consumer's position", saving);
                    let Some(missed) = saving.await? else {
                        return Ok(());
                    };
                    state.saving.saved(position, Instant::now());
                    last_io = Instant::now();
                    self.gap(missed);
                }
            }
            if self.check_due(&mut last_io) {
                let checking = state.source.check(conn, shell.health_check);
                let checked = unless_stopped::<S, _>(outlet, "checking the connection", checking);
                if checked.await?.is_none() {
                    return Ok(());
                }
                last_io = Instant::now();
            }
            // Wait for a sign of new rows, but no longer than the next thing due.
            let mut timeout = pacer.interval();
            timeout = timeout.min(shell.health_check.saturating_sub(last_io.elapsed()));
            if reads {
                timeout = timeout.min(shell.health_check.saturating_sub(last_read.elapsed()));
            }
            if let Some(consumer) = &shell.consumer {
                let next = state
                    .saving
                    .next_check(consumer.heartbeat(), Instant::now());
                timeout = timeout.min(next.max(Duration::from_millis(1)));
                if !gate_open {
                    timeout = timeout.min(GATE_CHECK);
                }
            }
            let waiting = state.source.wait(conn, timeout);
            let Some(woke) = unless_stopped::<S, _>(outlet, "waiting", waiting).await? else {
                return Ok(());
            };
            may_have_rows |= woke;
            *proved |= state.source.proved(conn);
            pacer.waited();
        }
    }

    /// What `restore` found removed (its channels; none: nothing was): the source is placed
    /// anew, at "now" — what was noted, saved or read up to before belongs to what was
    /// removed, and must not be saved into what replaced it — and the loss is announced as a
    /// [`Status::Gap`] (the source logged it).
    fn restored<S: Source<Position = P>>(&self, state: &mut State<S>, restored: Vec<String>) {
        if restored.is_empty() {
            return;
        }
        state.saving = Saving::default();
        let position = state.source.position();
        if let Some(position) = &position {
            state.saving.placed(position.clone(), Instant::now());
        }
        *self.shell.latest.lock().unwrap_or_else(|p| p.into_inner()) = position;
        self.shell.status(Status::Gap { channels: restored });
    }

    fn set_latest(&self, position: P) {
        *self.shell.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(position);
    }

    /// Whether the connection's health check is due: quiet since `last_io` for the interval,
    /// and no reader waiting for room in the pipeline — such a wait is the pipeline's, not the
    /// connection's (see `Outlet::waiting`), and counts as I/O.
    fn check_due(&self, last_io: &mut Instant) -> bool {
        if last_io.elapsed() < self.shell.health_check {
            return false;
        }
        if self.shell.outlet.waiting() {
            *last_io = Instant::now();
            return false;
        }
        true
    }

    /// Announces that a listener without a consumer found rows purged before it read them
    /// on `missed` ([`Source::missed`]), if any.
    fn purged(&self, missed: Vec<String>) {
        if !missed.is_empty() {
            log::warn!(
                "sqlnotify: the listener fell behind the journal's retention and rows it had \
                 not read were purged; events on {missed:?} may be lost (a named consumer's \
                 rows are kept until it reads them: NotifierBuilder::consumer)"
            );
            self.shell.status(Status::Gap { channels: missed });
        }
    }

    /// Announces that a (re)registered consumer missed purged rows on `missed`, if any.
    fn gap(&self, missed: Vec<String>) {
        if let (false, Some(consumer)) = (missed.is_empty(), &self.shell.consumer) {
            report_gap(&consumer.name, &missed);
            self.shell.status(Status::Gap { channels: missed });
        }
    }
}

/// A dialect's call, with a panic in it turned into this session's error. A driver can panic
/// on a reply it did not expect (mysql_async on a row whose column type changed under it):
/// unguarded, the panic would end the listener's task, and with it all reading, silently —
/// guarded, the session fails like on a lost connection, the failure is announced
/// ([`Status::Disconnected`], or to `start()` on the first session), and the supervisor
/// starts the next session from the source's position.
/// A session that ended before serving because the listener was told to stop.
fn stopped<S: Source>(state: State<S>, began: Instant) -> (State<S>, Outcome) {
    (
        state,
        Outcome {
            proved: true,
            lasted: began.elapsed(),
            failure: None,
            fatal: None,
        },
    )
}

/// [`guarded`] `call`, unless the listener is told to stop first: then `None`, the call
/// dropped where it stands. Every step of a session but closing goes through it, so `stop()`
/// never waits for a step stuck on the server (a journal read behind a lock, a connection that
/// never answers). Nothing read is skipped by a step cut short: a source moves its position
/// only once a read was handed over, the listener's newest position is set only after a read
/// completed, and a save cut short leaves the last one standing (the final save follows).
async fn unless_stopped<S: Source, T>(
    outlet: &super::Outlet,
    doing: &'static str,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<Option<T>> {
    let call = pin!(guarded::<S, _>(doing, call));
    let stopping = pin!(outlet.stopping());
    match select(call, stopping).await {
        Either::Left((result, _)) => result.map(Some),
        Either::Right(_) => Ok(None),
    }
}

async fn guarded<S: Source, T>(
    doing: &'static str,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    crate::error::caught(|| format!("the {} listener, {doing}", S::NAME), call).await
}

/// Closes a connection; a panic while closing is logged (the connection is gone either way).
/// A close that takes longer than [`CLOSE_WITHIN`] (a driver draining the answer to a step
/// cut short, which waits on the server) is given up: the connection is dropped.
async fn close<S: Source>(source: &mut S, conn: S::Conn) {
    let closing = async {
        source.close(conn).await;
        Ok(())
    };
    match tokio::time::timeout(CLOSE_WITHIN, guarded::<S, _>("closing", closing)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("sqlnotify: {e}"),
        Err(_) => log::warn!(
            "sqlnotify: the {} listener's connection did not close within {CLOSE_WITHIN:?}; \
             dropped",
            S::NAME
        ),
    }
}

/// How long closing a connection may take.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// The adaptive polling interval: `active` right after events, doubling up to `idle` once
/// none came for `stay_active`.
#[derive(Debug)]
struct Pacer {
    pace: Pace,
    interval: Duration,
    last_event: Instant,
}

impl Pacer {
    fn new(pace: Pace) -> Self {
        Pacer {
            pace,
            interval: pace.active,
            last_event: Instant::now(),
        }
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    /// A read forwarded `events`.
    fn read(&mut self, events: u64) {
        if events > 0 {
            self.interval = self.pace.active;
            self.last_event = Instant::now();
        }
    }

    /// A wait ended.
    fn waited(&mut self) {
        if self.last_event.elapsed() >= self.pace.stay_active {
            self.interval = self.interval.saturating_mul(2).min(self.pace.idle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_stays_active_after_events_then_doubles_to_idle() {
        let ms = Duration::from_millis;
        let mut p = Pacer::new(Pace {
            active: ms(1),
            idle: ms(10),
            stay_active: Duration::ZERO,
        });
        assert_eq!(p.interval(), ms(1));
        p.waited();
        assert_eq!(p.interval(), ms(2));
        p.waited();
        p.waited();
        p.waited();
        assert_eq!(p.interval(), ms(10));
        p.read(0);
        assert_eq!(p.interval(), ms(10));
        p.read(3);
        assert_eq!(p.interval(), ms(1));

        let mut p = Pacer::new(Pace {
            active: ms(1),
            idle: ms(10),
            stay_active: Duration::from_secs(3600),
        });
        p.waited();
        assert_eq!(p.interval(), ms(1), "stays active within stay_active");
    }
}
