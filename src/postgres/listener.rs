//! The PostgreSQL listener actor: one dedicated connection, LISTENing on every watched channel.
//!
//! tokio-postgres only surfaces notifications to whoever drives `Connection::poll_message`
//! (the plain `Connection` future drops them), so a reader task owns the connection, collects
//! every notification that is ready into one [`RawBatch`] and hands it to the decoder — after
//! taking one unit of the in-flight budget per notification, so a pipeline that cannot keep
//! up stops the reading (PostgreSQL then holds notifications in its own queue) instead of
//! growing memory.
//!
//! The actor owns the client and the lifecycle: it connects and LISTENs in `started()`,
//! reports readiness once LISTEN is in effect, checks the connection with a query every
//! health-check interval (TCP keepalive alone can take hours to notice a dead peer), and stops
//! when the connection is lost — its [`Supervisor`](actix::Supervisor) then restarts it after
//! a jittered backoff. NOTIFY is fire-and-forget: whatever was committed while disconnected is
//! gone, so every reconnect is announced to status subscribers as a [`Status::Gap`].

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use actix::WeakAddr;
use futures_util::future::BoxFuture;
use tokio::sync::{oneshot, Semaphore};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Client, Config, Connection, NoTls, Socket};

use crate::backoff::Backoff;
use crate::decoder::RawBatch;
use crate::dialect::{ListenParams, ListenerHandle};
use crate::error::{Error, Result};
use crate::event::RawNotification;
use crate::sql::quote_ident;
use crate::stats::Counters;
use crate::status::{Status, StatusEvent};

/// Most notifications handed to the decoder in one message (bounds latency and batch memory).
const MAX_BATCH: usize = 512;

/// tokio-postgres' default keepalive idle time; replaced by the health-check interval unless
/// the URL set its own.
const DRIVER_DEFAULT_KEEPALIVE_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// A live connection: the client (shared with health checks) and its reader task.
struct Live {
    client: Arc<Client>,
    reader: tokio::task::JoinHandle<()>,
}

pub(crate) struct PgListener {
    config: Config,
    params: ListenParams,
    backoff: Backoff,
    /// Consecutive restarts without a successful LISTEN.
    attempt: u32,
    ready: Option<oneshot::Sender<Result<()>>>,
    live: Option<Live>,
    /// Bumped per connection, so a stale reader's "connection lost" is ignored.
    generation: u64,
    /// Has been connected before: a new connection means notifications may have been missed.
    was_connected: bool,
    shutting_down: bool,
}

impl PgListener {
    fn status(&self, status: Status) {
        self.params.status.do_send(StatusEvent::now(status));
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        self.generation += 1;
        let generation = self.generation;
        let config = self.config.clone();
        let decoder = self.params.decoder.clone();
        let budget = self.params.budget.clone();
        let me = ctx.address().downgrade();
        let listen: String = self
            .params
            .channels
            .iter()
            .map(|c| format!("LISTEN {};", quote_ident(c)))
            .collect();
        let connecting = async move {
            let (client, connection) = config
                .connect(NoTls)
                .await
                .map_err(|e| Error::db("connecting the listener to PostgreSQL", e))?;
            let reader =
                tokio::task::spawn_local(read(connection, decoder, budget, me, generation));
            if let Err(e) = client.batch_execute(&listen).await {
                reader.abort();
                return Err(Error::db("LISTENing on the watched channels", e));
            }
            Ok(Live {
                client: Arc::new(client),
                reader,
            })
        };
        ctx.wait(
            connecting
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok(live) => {
                        log::info!(
                            "sqlnotify: listening on {} channels",
                            act.params.channels.len()
                        );
                        act.live = Some(live);
                        act.attempt = 0;
                        act.status(Status::Connected);
                        if act.was_connected {
                            act.status(Status::Gap {
                                channels: act.params.channels.clone(),
                            });
                        }
                        act.was_connected = true;
                        if let Some(ready) = act.ready.take() {
                            let _ = ready.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        if let Some(ready) = act.ready.take() {
                            // The first connection failed: report it to start() instead of retrying.
                            act.shutting_down = true;
                            let _ = ready.send(Err(e));
                        } else {
                            log::warn!("sqlnotify: listener reconnect failed: {e}");
                        }
                        ctx.stop();
                    }
                }),
        );
    }

    /// A query that must answer within the interval; otherwise the connection is treated as
    /// dead even if the socket still looks open.
    fn health_check(&mut self, ctx: &mut Context<Self>) {
        let Some(live) = &self.live else { return };
        let (client, limit, generation) = (
            live.client.clone(),
            self.params.health_check,
            self.generation,
        );
        let check = async move {
            match tokio::time::timeout(limit, client.simple_query("")).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("health check got no answer within {limit:?}")),
            }
        };
        ctx.spawn(check.into_actor(self).map(move |result, act, ctx| {
            if let Err(error) = result {
                if act.generation == generation && !act.shutting_down {
                    act.lost(error, ctx);
                }
            }
        }));
    }

    fn lost(&mut self, error: String, ctx: &mut Context<Self>) {
        log::warn!("sqlnotify: listener connection lost: {error}");
        if let Some(live) = self.live.take() {
            live.reader.abort();
        }
        self.status(Status::Disconnected { error });
        ctx.stop();
    }
}

/// Owns the connection: forwards notifications in batches until the connection ends.
async fn read(
    mut connection: Connection<Socket, NoTlsStream>,
    decoder: Recipient<RawBatch>,
    budget: Arc<Semaphore>,
    listener: WeakAddr<PgListener>,
    generation: u64,
) {
    let mut batch = Vec::new();
    let outcome = loop {
        // Collect what is ready (at least one notification), or learn that the connection ended.
        let ended = poll_fn(|cx| loop {
            match connection.poll_message(cx) {
                Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                    batch.push(RawNotification {
                        channel: n.channel().to_owned(),
                        payload: n.payload().to_owned(),
                        received_at: SystemTime::now(),
                        sequence: None,
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
                Poll::Pending if batch.is_empty() => return Poll::Pending,
                Poll::Pending => return Poll::Ready(None),
            }
        })
        .await;
        if !batch.is_empty() {
            // Wait for room in the pipeline; meanwhile nothing is read from the socket.
            match budget.acquire_many(batch.len() as u32).await {
                Ok(permits) => permits.forget(),
                Err(_) => break None,
            }
            decoder.do_send(RawBatch(std::mem::take(&mut batch)));
        }
        if let Some(outcome) = ended {
            break outcome;
        }
    };
    if let Some(listener) = listener.upgrade() {
        listener.do_send(ConnectionLost {
            generation,
            error: outcome.map(|e| e.to_string()),
        });
    }
}

impl Actor for PgListener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.params.health_check, |act, ctx| act.health_check(ctx));
        if self.attempt == 0 {
            self.connect(ctx);
        } else {
            let delay = self.backoff.delay(self.attempt);
            log::info!(
                "sqlnotify: reconnecting the listener in {delay:?} (attempt {})",
                self.attempt
            );
            ctx.run_later(delay, |act, ctx| act.connect(ctx));
        }
    }
}

impl Supervised for PgListener {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.live = None;
        if !self.shutting_down {
            self.attempt = self.attempt.saturating_add(1);
            Counters::add(&self.params.stats.restarts, 1);
        }
    }
}

/// The reader found the connection closed (error, server shutdown, terminated backend).
struct ConnectionLost {
    generation: u64,
    error: Option<String>,
}

impl Message for ConnectionLost {
    type Result = ();
}

impl Handler<ConnectionLost> for PgListener {
    type Result = ();

    fn handle(&mut self, msg: ConnectionLost, ctx: &mut Context<Self>) {
        if msg.generation != self.generation || self.shutting_down {
            return;
        }
        self.lost(
            msg.error.unwrap_or_else(|| "closed by the server".into()),
            ctx,
        );
    }
}

/// Stops listening for good; resolves after the reader has passed on what it read.
struct Shutdown;

impl Message for Shutdown {
    type Result = ();
}

impl Handler<Shutdown> for PgListener {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        let live = self.live.take();
        Box::pin(async move {
            if let Some(Live { client, reader }) = live {
                // Dropping the client makes the connection terminate cleanly; the reader then
                // passes on its last batch and ends.
                drop(client);
                let _ = reader.await;
            }
        })
    }
}

/// The notifier's handle on a running listener.
pub(crate) struct PgListenerHandle {
    addr: Addr<PgListener>,
}

impl ListenerHandle for PgListenerHandle {
    fn shutdown(&mut self) -> BoxFuture<'static, ()> {
        let addr = self.addr.clone();
        Box::pin(async move {
            let _ = addr.send(Shutdown).await;
        })
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        // Dropping the last Addr lets the idle actor stop without being restarted.
        Box::pin(async { Ok(()) })
    }
}

/// Starts a supervised listener and waits until it is LISTENing (or failed to).
pub(crate) async fn start(
    mut config: Config,
    params: ListenParams,
) -> Result<Box<dyn ListenerHandle>> {
    config.keepalives(true);
    if config.get_keepalives_idle() == DRIVER_DEFAULT_KEEPALIVE_IDLE {
        // The kernel takes whole seconds (and refuses 0).
        config.keepalives_idle(Duration::from_secs(params.health_check.as_secs().max(1)));
    }
    let (ready, is_ready) = oneshot::channel();
    let addr = Supervisor::start(move |_| PgListener {
        config,
        params,
        backoff: Backoff::default(),
        attempt: 0,
        ready: Some(ready),
        live: None,
        generation: 0,
        was_connected: false,
        shutting_down: false,
    });
    match is_ready.await {
        Ok(Ok(())) => Ok(Box::new(PgListenerHandle { addr })),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::NotRunning),
    }
}
