//! The PostgreSQL listener actor: one dedicated connection, LISTENing on every watched channel.
//!
//! tokio-postgres only surfaces notifications to whoever drives `Connection::poll_message`
//! (the plain `Connection` future drops them), so a reader task owns the connection, collects
//! every notification that is ready into one [`RawBatch`] and hands it to the decoder. The
//! actor owns the client and the lifecycle: it connects and LISTENs in `started()`, reports
//! readiness once LISTEN is in effect, and stops when the reader reports the connection lost —
//! its [`Supervisor`](actix::Supervisor) then restarts it after a jittered backoff.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::SystemTime;

use actix::prelude::*;
use actix::WeakAddr;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Client, Config, Connection, NoTls, Socket};

use crate::backoff::Backoff;
use crate::decoder::RawBatch;
use crate::dialect::{ListenParams, ListenerHandle};
use crate::error::{Error, Result};
use crate::event::RawNotification;
use crate::sql::quote_ident;
use crate::stats::Counters;

/// Most notifications handed to the decoder in one message (bounds latency and batch memory).
const MAX_BATCH: usize = 512;

/// A live connection: the client (kept so the connection stays open) and its reader task.
struct Live {
    _client: Client,
    reader: tokio::task::JoinHandle<()>,
}

pub(crate) struct PgListener {
    config: Config,
    channels: Vec<String>,
    decoder: Recipient<RawBatch>,
    stats: Arc<Counters>,
    backoff: Backoff,
    /// Consecutive restarts without a successful LISTEN.
    attempt: u32,
    ready: Option<oneshot::Sender<Result<()>>>,
    live: Option<Live>,
    /// Bumped per connection, so a stale reader's "connection lost" is ignored.
    generation: u64,
    shutting_down: bool,
}

impl PgListener {
    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        self.generation += 1;
        let generation = self.generation;
        let config = self.config.clone();
        let decoder = self.decoder.clone();
        let me = ctx.address().downgrade();
        let listen: String = self
            .channels
            .iter()
            .map(|c| format!("LISTEN {};", quote_ident(c)))
            .collect();
        let connecting = async move {
            let (client, connection) = config
                .connect(NoTls)
                .await
                .map_err(|e| Error::db("connecting the listener to PostgreSQL", e))?;
            let reader = tokio::task::spawn_local(read(connection, decoder, me, generation));
            if let Err(e) = client.batch_execute(&listen).await {
                reader.abort();
                return Err(Error::db("LISTENing on the watched channels", e));
            }
            Ok(Live {
                _client: client,
                reader,
            })
        };
        ctx.wait(
            connecting
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok(live) => {
                        log::info!("sqlnotify: listening on {} channels", act.channels.len());
                        act.live = Some(live);
                        act.attempt = 0;
                        if let Some(ready) = act.ready.take() {
                            let _ = ready.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        if let Some(ready) = act.ready.take() {
                            // The first connection failed: report it to start() instead of retrying.
                            act.shutting_down = true;
                            let _ = ready.send(Err(e));
                            ctx.stop();
                        } else {
                            log::warn!("sqlnotify: listener reconnect failed: {e}");
                            ctx.stop();
                        }
                    }
                }),
        );
    }
}

/// Owns the connection: forwards notifications in batches until the connection ends.
async fn read(
    mut connection: Connection<Socket, NoTlsStream>,
    decoder: Recipient<RawBatch>,
    listener: WeakAddr<PgListener>,
    generation: u64,
) {
    let mut batch = Vec::new();
    let outcome = poll_fn(|cx| loop {
        match connection.poll_message(cx) {
            Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                batch.push(RawNotification {
                    channel: n.channel().to_owned(),
                    payload: n.payload().to_owned(),
                    received_at: SystemTime::now(),
                    sequence: None,
                });
                if batch.len() >= MAX_BATCH {
                    decoder.do_send(RawBatch(std::mem::take(&mut batch)));
                }
            }
            Poll::Ready(Some(Ok(AsyncMessage::Notice(notice)))) => {
                log::debug!("sqlnotify: listener notice: {}", notice.message());
            }
            Poll::Ready(Some(Ok(_))) => {}
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(e)),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {
                if !batch.is_empty() {
                    decoder.do_send(RawBatch(std::mem::take(&mut batch)));
                }
                return Poll::Pending;
            }
        }
    })
    .await;
    if !batch.is_empty() {
        decoder.do_send(RawBatch(batch));
    }
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
            Counters::add(&self.stats.restarts, 1);
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
        let error = msg.error.unwrap_or_else(|| "closed by the server".into());
        log::warn!("sqlnotify: listener connection lost: {error}");
        ctx.stop();
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
            if let Some(Live { _client, reader }) = live {
                // Dropping the client makes the connection terminate cleanly; the reader then
                // flushes its last batch and ends.
                drop(_client);
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
pub(crate) async fn start(config: Config, params: ListenParams) -> Result<Box<dyn ListenerHandle>> {
    let ListenParams {
        channels,
        decoder,
        stats,
        ..
    } = params;
    let (ready, is_ready) = oneshot::channel();
    let addr = Supervisor::start(move |_| PgListener {
        config,
        channels,
        decoder,
        stats,
        backoff: Backoff::default(),
        attempt: 0,
        ready: Some(ready),
        live: None,
        generation: 0,
        shutting_down: false,
    });
    match is_ready.await {
        Ok(Ok(())) => Ok(Box::new(PgListenerHandle { addr })),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::NotRunning),
    }
}
