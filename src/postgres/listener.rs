//! PostgreSQL's I/O for the listener shell (`crate::listener`): a [`Source`] over one dedicated
//! connection LISTENing on every watched channel.
//!
//! tokio-postgres only surfaces notifications to whoever drives `Connection::poll_message`
//! (the plain `Connection` future drops them), so a reader task owns the connection, collects
//! every notification that is ready into one batch and hands it to the pipeline's [`Outlet`]
//! — which takes one unit of the in-flight budget per notification first, so a pipeline that
//! cannot keep up stops the reading (PostgreSQL then holds notifications in its own queue)
//! instead of growing memory. Signed channels' payloads are verified there; forgeries are
//! dropped and counted. NOTIFY is fire-and-forget: whatever was committed while disconnected is
//! gone, so a new connection announces the notify channels as a [`Status::Gap`] (the shell
//! does, from [`Source::lossy_channels`]).
//!
//! Journal tiers (see `journal.rs`): durable channels are LISTENed to as well, but their
//! (empty) notifications only wake a journal read; poll channels are read at the shell's
//! adaptive interval. The position a named consumer saves is the snapshot of the journal
//! cursor's last complete read ([`Position`]). LISTEN comes before the
//! cursor is placed, so nothing committed in between is missed.
//!
//! [`Status::Gap`]: crate::Status::Gap

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use futures_util::future::{select, Either};
use tokio::sync::watch;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, Connection, Socket};

use super::consumers;
use super::control::Control;
use super::journal::{JournalCursor, Position};
use super::signing::{Refused, Verifier};
use super::tls::PgStream;
use super::PgConfig;
use crate::consumer::ConsumerParams;
use crate::error::{Error, Result};
use crate::event::{Channel, RawNotification};
use crate::listener::{FinalSave, Outlet, Pace, Source, Wake};
use crate::sql::quote_ident;
use crate::tier::Tier;

/// Most notifications handed to the pipeline in one batch (bounds latency and batch memory).
const MAX_BATCH: usize = 512;
/// tokio-postgres' default keepalive idle time; replaced by the health-check interval unless
/// the URL set its own.
const DRIVER_DEFAULT_KEEPALIVE_IDLE: Duration = Duration::from_secs(2 * 60 * 60);
/// Longest TCP keepalive idle time Linux takes, in seconds (`MAX_TCP_KEEPIDLE`): a longer
/// health-check interval keeps its checks, and its connection's keepalive probes start after
/// this.
const MAX_KEEPALIVE_IDLE: u64 = 32_767;
/// Refuses a server in recovery (a hot standby, which a multi-host URL or a load balancer may
/// pick): a snapshot taken there lists no running transaction in `xip` (PostgreSQL keeps them
/// all in its sub-transaction list), so the journal cursor (`journal.rs`) would count a
/// transaction running at one read as read, and never fetch its rows. The listener reconnects
/// until it reaches the primary.
const PRIMARY_ONLY: &str = "DO $sqn$ BEGIN IF pg_catalog.pg_is_in_recovery() THEN RAISE EXCEPTION \
    'sqlnotify: this server is a standby in recovery; the durable and poll tiers read the journal on the primary \
    (with several hosts in the URL, add target_session_attrs=read-write)'; END IF; END $sqn$;";
/// Fastest poll-tier interval (while rows keep coming).
const POLL_MIN: Duration = Duration::from_millis(1);
/// Slowest poll-tier interval (when idle).
const POLL_MAX: Duration = Duration::from_millis(25);
/// Server-side TCP keepalive on the listener's connection: a machine gone silent loses its
/// backend — and a consumer's lease on it — within about 1 + 3 × 1 s while the connection is
/// idle (ignored on Unix sockets). While the server has data on its way to it keepalive
/// probes are not sent: see [`LEASE_USER_TIMEOUT`]. The purge's connection sets it too
/// (`consumers::purge_guards`).
pub(super) const KEEPALIVE: &str =
    "SET tcp_keepalives_idle = 1; SET tcp_keepalives_interval = 1; SET tcp_keepalives_count = 3";
/// Set by the lease query on the connection that holds (or asks for) a consumer's lease
/// (PostgreSQL 12+): the server ends the connection when data it sent stays unacknowledged
/// for 4 s, so a machine gone silent while notifications were on their way to it loses its
/// lease within 4 s too, and a standby takes over within 5 s of the silence. Only there: the
/// timeout also ends a connection whose reader waits for room in the pipeline (a subscriber
/// with policy `Wait` holding it) once the server's notifications fill its buffers — Linux
/// counts a receive window held shut as unacknowledged data — and with it the notifications
/// PostgreSQL held for it. A notifier without a consumer keeps its connection however long a
/// subscriber holds the pipeline.
const LEASE_USER_TIMEOUT: &str =
    "CASE WHEN pg_catalog.current_setting('server_version_num')::int >= 120000 \
     THEN pg_catalog.set_config('tcp_user_timeout', '4000', false) END";

/// A live connection: the client, and the reader task driving the connection.
pub(crate) struct PgConn {
    client: Client,
    reader: Option<tokio::task::JoinHandle<()>>,
    /// A durable channel was notified: read the journal.
    wake: Wake,
    /// Set (with the reason) when the reader found the connection closed.
    lost: watch::Receiver<Option<String>>,
}

impl PgConn {
    /// Why the connection closed, when it did.
    fn lost_reason(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Runs `fut` unless the connection is lost first.
    async fn guard<T>(&self, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let mut lost = self.lost.clone();
        let outcome = match select(pin!(fut), pin!(lost.wait_for(Option::is_some))).await {
            Either::Left((result, _)) => Some(result),
            Either::Right(_) => None,
        };
        match outcome {
            Some(result) => result,
            None => Err(Error::Database {
                context: "the listener connection".into(),
                source: self.lost_reason().unwrap_or_else(|| "closed".into()).into(),
            }),
        }
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

/// Journal-tier state (durable and poll channels); survives reconnects.
struct Journal {
    channels: Vec<String>,
    cursor: JournalCursor,
    poll: bool,
}

/// Reads a PostgreSQL database's notifications and journal.
pub(crate) struct PgSource {
    config: PgConfig,
    /// Channels to LISTEN on: notify and durable tiers.
    listen: Vec<String>,
    /// Every channel LISTENed on, by name, with what a notification on it is.
    listened: Arc<HashMap<Arc<str>, Listened>>,
    /// The key signed channels' payloads are verified with.
    verifier: Option<Arc<Verifier>>,
    /// Notify-tier channels (a reconnect may have lost their events).
    notify: Vec<String>,
    journal: Option<Journal>,
    health_check: Duration,
}

impl PgSource {
    pub fn new(
        mut config: PgConfig,
        channels: &[Channel],
        verifier: Option<Verifier>,
        health_check: Duration,
    ) -> Self {
        config.keepalives(true);
        if config.get_keepalives_idle() == DRIVER_DEFAULT_KEEPALIVE_IDLE {
            // The kernel takes whole seconds, and refuses 0 and more than MAX_KEEPALIVE_IDLE.
            config.keepalives_idle(Duration::from_secs(
                health_check.as_secs().clamp(1, MAX_KEEPALIVE_IDLE),
            ));
        }
        let by_tier = |tiers: &[Tier]| -> Vec<String> {
            channels
                .iter()
                .filter(|c| tiers.contains(&c.tier))
                .map(|c| c.name.clone())
                .collect()
        };
        let listened = channels
            .iter()
            .filter_map(|c| {
                let kind = match c.tier {
                    Tier::Durable => Listened::Wake,
                    Tier::Notify if c.signed => Listened::Signed,
                    Tier::Notify => Listened::Plain,
                    _ => return None,
                };
                Some((Arc::from(c.name.as_str()), kind))
            })
            .collect();
        let journal_channels = by_tier(&[Tier::Durable, Tier::Poll]);
        PgSource {
            config,
            listen: by_tier(&[Tier::Notify, Tier::Durable]),
            listened: Arc::new(listened),
            verifier: verifier.map(Arc::new),
            notify: by_tier(&[Tier::Notify]),
            journal: (!journal_channels.is_empty()).then(|| Journal {
                channels: journal_channels,
                cursor: JournalCursor::default(),
                poll: channels.iter().any(|c| c.tier == Tier::Poll),
            }),
            health_check,
        }
    }
}

impl Source for PgSource {
    type Conn = PgConn;
    type Position = Position;
    const NAME: &'static str = "PostgreSQL";

    async fn connect(&mut self, outlet: &Outlet) -> Result<PgConn> {
        let (client, connection) = self.config.connect("the listener").await?;
        let wake = Wake::default();
        let (lost_tx, lost) = watch::channel(None);
        let reader = Reader {
            outlet: outlet.clone(),
            listened: self.listened.clone(),
            wake: wake.clone(),
            verifier: self.verifier.clone(),
            lost: lost_tx,
        };
        let conn = PgConn {
            client,
            reader: Some(tokio::task::spawn_local(reader.run(connection))),
            wake,
            lost,
        };
        // The LISTENs and the server-side keepalive in one round trip: a connection whose
        // machine goes silent is ended by the server — with a consumer's lease on it. A
        // journal listener refuses a standby first (see `PRIMARY_ONLY`).
        let setup: String = self
            .journal
            .as_ref()
            .map(|_| PRIMARY_ONLY.to_string())
            .into_iter()
            .chain(
                self.listen
                    .iter()
                    .map(|c| format!("LISTEN {};", quote_ident(c))),
            )
            .chain(std::iter::once(format!("{KEEPALIVE};")))
            .collect();
        conn.guard(async {
            conn.client
                .batch_execute(&setup)
                .await
                .map_err(|e| Error::db("setting up the listener connection (keepalive, LISTEN)", e))
        })
        .await?;
        log::info!("sqlnotify: listening on {} channels", self.listen.len());
        Ok(conn)
    }

    /// At a named consumer's saved position, else at "now" (registering a new named consumer
    /// there).
    async fn place(
        &mut self,
        conn: &mut PgConn,
        consumer: Option<&ConsumerParams>,
    ) -> Result<Vec<String>> {
        let Some(journal) = self.journal.as_mut() else {
            if let Some(consumer) = consumer {
                log::warn!(
                    "sqlnotify: consumer {:?} has no effect without durable or poll watches (NOTIFY cannot be replayed)",
                    consumer.name
                );
            }
            return Ok(Vec::new());
        };
        let client = &conn.client;
        let placing = async {
            if let Some(consumer) = consumer {
                consumers::ensure(client).await?;
                let registered = consumers::reactivate(client, consumer, &journal.channels).await?;
                if let Some((position, missed)) = registered {
                    log::debug!(
                        "sqlnotify: consumer {:?} resumes at horizon {}",
                        consumer.name,
                        position.horizon
                    );
                    journal.cursor = JournalCursor::resume(position);
                    return Ok(missed);
                }
            }
            // What is already committed counts as delivered.
            journal.cursor.place(client).await?;
            if consumer.is_none() {
                journal.cursor.unkept();
            }
            if let (Some(consumer), Some(position)) = (consumer, journal.cursor.position()) {
                consumers::insert(client, consumer, &journal.channels, &position).await?;
            }
            Ok(Vec::new())
        };
        conn.guard(placing).await
    }

    /// A session advisory lock on the listener's own connection, keyed by the consumer's
    /// name: the server releases it the moment that connection ends — the process killed, its
    /// backend terminated, or (with the server-side keepalive set at connect) its machine gone
    /// silent — and position saves run on the same connection, so a process whose lease is
    /// gone cannot save a position any more.
    async fn lease(&mut self, conn: &mut PgConn, consumer: &ConsumerParams) -> Result<bool> {
        let key = format!("sqlnotify consumer {}", consumer.name);
        let client = &conn.client;
        conn.guard(async {
            let context = || format!("taking the lease of consumer {:?}", consumer.name);
            let lease = format!(
                "SELECT pg_catalog.pg_try_advisory_lock(\
                 ('x' || pg_catalog.substr(pg_catalog.md5($1), 1, 16))::bit(64)::bigint), \
                 {LEASE_USER_TIMEOUT}"
            );
            let row = client
                .query_typed_one(&lease, &[(&key, Type::TEXT)])
                .await
                .map_err(|e| Error::db(context(), e))?;
            Ok(row.get::<_, bool>(0))
        })
        .await
    }

    async fn lease_holder(
        &mut self,
        conn: &mut PgConn,
        consumer: &ConsumerParams,
    ) -> Option<String> {
        let key = format!("sqlnotify consumer {}", consumer.name);
        let client = &conn.client;
        let found = conn
            .guard(async {
                client
                    .query_typed(LEASE_HOLDER_SQL, &[(&key, Type::TEXT)])
                    .await
                    .map_err(|e| Error::db("looking for the holder of a consumer's lease", e))
            })
            .await;
        match found {
            Ok(rows) => rows.first().map(|row| {
                describe_holder(
                    row.get(0),
                    row.get::<_, Option<String>>(1).as_deref(),
                    row.get::<_, Option<String>>(2).as_deref(),
                    row.get::<_, Option<String>>(3).as_deref(),
                )
            }),
            Err(e) => {
                log::debug!("sqlnotify: {e}");
                None
            }
        }
    }

    fn reads(&self) -> bool {
        self.journal.is_some()
    }

    async fn read(&mut self, conn: &mut PgConn, outlet: &Outlet) -> Result<Option<u64>> {
        let journal = self.journal.as_mut().expect("read only with a journal");
        // Abandoned on a lost connection, the read leaves the cursor consistent: only rows
        // handed over count as seen.
        conn.guard(journal.cursor.read(&conn.client, &journal.channels, outlet))
            .await
    }

    fn position(&self) -> Option<Position> {
        self.journal.as_ref()?.cursor.position()
    }

    fn missed(&mut self) -> Vec<String> {
        let Some(journal) = self.journal.as_mut() else {
            return Vec::new();
        };
        if journal.cursor.take_purged() {
            journal.channels.clone()
        } else {
            Vec::new()
        }
    }

    async fn wait(&mut self, conn: &mut PgConn, timeout: Duration) -> Result<bool> {
        if self.journal.as_mut().is_some_and(|j| j.cursor.take_more()) {
            return Ok(true); // the last read left more to read
        }
        let woken = conn.guard(async { Ok(conn.wake.wait(timeout).await) });
        let woken = woken.await?;
        Ok(woken || self.journal.as_ref().is_some_and(|j| j.poll))
    }

    /// A query that must answer within the interval; otherwise the connection is treated as
    /// dead even if the socket still looks open (TCP keepalive alone can take hours to notice
    /// a dead peer).
    async fn check(&mut self, conn: &mut PgConn, limit: Duration) -> Result<()> {
        let query = conn.guard(async {
            conn.client
                .simple_query("")
                .await
                .map(|_| ())
                .map_err(|e| Error::Database {
                    context: "checking the listener connection".into(),
                    source: describe(&e).into(),
                })
        });
        match tokio::time::timeout(limit, query).await {
            Ok(checked) => checked,
            Err(_) => Err(Error::Database {
                context: "checking the listener connection".into(),
                source: format!("health check got no answer within {limit:?}").into(),
            }),
        }
    }

    async fn save(
        &mut self,
        conn: &mut PgConn,
        consumer: &ConsumerParams,
        position: &Position,
    ) -> Result<Vec<String>> {
        let journal = self
            .journal
            .as_ref()
            .expect("a consumer saves with a journal");
        conn.guard(consumers::save_running(
            &conn.client,
            consumer,
            &journal.channels,
            position,
        ))
        .await
    }

    fn final_save(&self) -> FinalSave<Position> {
        let config = self.config.clone();
        Box::new(move |name, position| {
            Box::pin(async move {
                let client = Control::connect(&config, "consumer position").await?;
                consumers::save(&client, &name, &position).await.map(|_| ())
            })
        })
    }

    /// Dropping the client makes the connection terminate cleanly; the reader then passes on
    /// its last batch and ends.
    async fn close(&mut self, mut conn: PgConn) {
        let reader = conn.reader.take();
        drop(conn);
        if let Some(reader) = reader {
            let _ = reader.await;
        }
    }

    fn pace(&self) -> Pace {
        match &self.journal {
            Some(journal) if journal.poll => Pace {
                active: POLL_MIN,
                idle: POLL_MAX,
                stay_active: Duration::ZERO,
            },
            // Woken by notifications; the interval is the safety net's.
            _ => Pace {
                active: self.health_check,
                idle: self.health_check,
                stay_active: Duration::ZERO,
            },
        }
    }

    fn lossy_channels(&self) -> Vec<String> {
        self.notify.clone()
    }

    fn describe(&self, conn: Option<&PgConn>, error: &Error) -> String {
        conn.and_then(PgConn::lost_reason)
            .unwrap_or_else(|| error.to_string())
    }
}

/// What a notification on a LISTENed channel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listened {
    /// A durable channel's: it only wakes a journal read (its payload is never read).
    Wake,
    /// A signed notify-tier channel's: its payload is verified.
    Signed,
    /// An unsigned notify-tier channel's.
    Plain,
}

/// The server process holding the advisory lock that is consumer `$1`'s lease (the key
/// [`Source::lease`] takes: a session lock on a `bigint`, split by `pg_locks` into `classid`,
/// the high half, and `objid`, the low one) in this database: its pid, role, application
/// name and client address.
const LEASE_HOLDER_SQL: &str = "\
    WITH k AS (SELECT ('x' || pg_catalog.substr(pg_catalog.md5($1), 1, 16))::bit(64)::bigint AS key)
    SELECT a.pid, a.usename::text, a.application_name, pg_catalog.host(a.client_addr)
      FROM pg_catalog.pg_locks l
      JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid, k
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
       AND l.database = (SELECT oid FROM pg_catalog.pg_database
                          WHERE datname = pg_catalog.current_database())
       AND l.classid::bigint = (k.key >> 32) & 4294967295
       AND l.objid::bigint = k.key & 4294967295
     LIMIT 1";

/// A lease holder as the standby's log shows it: `held by server process 4242 (role app,
/// application "worker", client 10.0.0.5)`. What the database reports is shown as text: a
/// role without privileges sets its own application name.
fn describe_holder(
    pid: i32,
    role: Option<&str>,
    application: Option<&str>,
    client: Option<&str>,
) -> String {
    let shown = |s: Option<&str>| format!("{:?}", crate::sql::comment(s.unwrap_or("?")));
    format!(
        "held by server process {pid} (role {}, application {}, client {})",
        shown(role),
        shown(application),
        client.unwrap_or("local")
    )
}

/// The reader task: owns the connection and forwards notifications in batches.
struct Reader {
    outlet: Outlet,
    /// Every channel LISTENed on: one lookup per notification gives its kind and the shared
    /// name its `RawNotification` carries (no copy of the name per notification).
    listened: Arc<HashMap<Arc<str>, Listened>>,
    wake: Wake,
    /// The key signed channels' payloads are verified with.
    verifier: Option<Arc<Verifier>>,
    lost: watch::Sender<Option<String>>,
}

impl Reader {
    /// The payload of a notification on `channel` (of kind `kind`), without its signature if
    /// the channel is signed; refused when that signature does not verify.
    fn open<'a>(
        &self,
        kind: Listened,
        channel: &str,
        payload: &'a str,
    ) -> std::result::Result<&'a str, Refused> {
        match &self.verifier {
            Some(verifier) if kind == Listened::Signed => verifier.open(channel, payload),
            _ => Ok(payload),
        }
    }

    async fn run(self, mut connection: Connection<Socket, PgStream>) {
        let mut batch = Vec::new();
        // Forgeries are counted one by one but logged at most once a minute: whoever sends
        // them must not be able to flood the application's log.
        let mut forgery_logged = crate::throttle::Throttled::default();
        // The channel of the notification before, and its kind.
        let mut last: Option<(Arc<str>, Listened)> = None;
        let outcome = loop {
            // Collect what is ready (at least one notification), or learn that the
            // connection ended.
            let mut wake = false;
            let ended = poll_fn(|cx| loop {
                match connection.poll_message(cx) {
                    Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                        let (channel, kind) = match &last {
                            // Notifications come in runs of one channel's (a transaction's
                            // rows): a comparison instead of hashing the name.
                            Some((name, kind)) if **name == *n.channel() => (name.clone(), *kind),
                            // Only LISTENed channels' notifications arrive; anything else
                            // would be read as an unsigned one (and refused by the decoder).
                            _ => {
                                let (name, kind) = match self.listened.get_key_value(n.channel()) {
                                    Some((name, kind)) => (name.clone(), *kind),
                                    None => (Arc::from(n.channel()), Listened::Plain),
                                };
                                last = Some((name.clone(), kind));
                                (name, kind)
                            }
                        };
                        if kind == Listened::Wake {
                            // A journal tier's wake-up: its payload is never read.
                            wake = true;
                            continue;
                        }
                        let payload = match self.open(kind, &channel, n.payload()) {
                            Ok(payload) => payload,
                            Err(refused) => {
                                self.outlet.stats().forged.fetch_add(1, Ordering::Relaxed);
                                if forgery_logged.due() {
                                    log::warn!(
                                        "sqlnotify: dropping a notification on {:?} that sqlnotify's trigger did not send: {refused} (counted in stats().forged; further ones are logged at most once a minute)",
                                        n.channel()
                                    );
                                }
                                continue;
                            }
                        };
                        batch.push(RawNotification {
                            channel,
                            payload: payload.to_owned(),
                            received_at: SystemTime::now(),
                            sequence: None,
                            events: 1,
                            transaction: None,
                            last_in_transaction: None,
                            read_point: None,
                            decoded: None,
                            part: 0,
                            read_bytes: 0,
                            extra_units: 0,
                        });
                        if batch.len() >= MAX_BATCH {
                            return Poll::Ready(None);
                        }
                    }
                    Poll::Ready(Some(Ok(AsyncMessage::Notice(notice)))) => {
                        log::debug!("sqlnotify: listener notice: {}", notice.message());
                    }
                    Poll::Ready(Some(Ok(_))) => {}
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Some(e))),
                    Poll::Ready(None) => return Poll::Ready(Some(None)),
                    Poll::Pending if batch.is_empty() && !wake => return Poll::Pending,
                    Poll::Pending => return Poll::Ready(None),
                }
            })
            .await;
            if wake {
                self.wake.wake();
            }
            // Meanwhile nothing is read from the socket.
            // The next batch is likely about as long as this one (a transaction's rows may
            // split across reads): room for twice as many up front instead of growing (and
            // copying) it notification by notification.
            let room = (batch.len() * 2).clamp(16, MAX_BATCH);
            if self
                .outlet
                .forward(std::mem::replace(&mut batch, Vec::with_capacity(room)))
                .await
                .is_none()
            {
                break None;
            }
            if let Some(outcome) = ended {
                break outcome;
            }
        };
        let reason = outcome.map_or_else(|| "closed by the server".into(), |e| describe(&e));
        let _ = self.lost.send(Some(reason));
    }
}

/// Why the connection failed, in the server's words when it sent any ("FATAL: terminating
/// connection due to administrator command"): tokio-postgres' own text is just "db error".
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => crate::error::chain(e),
    }
}
