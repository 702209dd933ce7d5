//! The relay's broker: NATS JetStream through async-nats. A link is one connection that never
//! reconnects by itself (a reconnect could send buffered messages after a lost one and break
//! the order); the relay opens a new link instead and sends again what was not confirmed.

use std::time::Duration;

use async_nats::jetstream::context::{ContextBuilder, GetStreamErrorKind};
use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::ErrorCode;
use async_nats::{Event, HeaderMap};
use tokio::sync::watch;

use super::broker::{Broker, Confirmation, Link, Outgoing, Stored};
use super::subject::covers;
use crate::error::{Error, Result};
use crate::redact::redact;

/// Where and how the relay publishes.
#[derive(Clone)]
pub(crate) struct Nats {
    pub url: String,
    pub stream: String,
    /// The stream's subject filter when sqlnotify creates it: `PREFIX.>`.
    pub filter: String,
    /// Every subject the relay can publish to: an existing stream must cover them all.
    pub subjects: Vec<String>,
    /// The shortest duplicate window the stream may have (and the one it is created with).
    pub duplicate_window: Duration,
    /// How long a created stream keeps messages.
    pub max_age: Duration,
    /// How long to wait for one acknowledgement.
    pub ack_timeout: Duration,
    /// Acknowledgements outstanding at most.
    pub max_pending: usize,
}

/// One JetStream connection.
pub(crate) struct NatsLink {
    js: async_nats::jetstream::Context,
    lost: watch::Receiver<bool>,
    stream: String,
    /// The server's `max_payload`, or the stream's `max_msg_size` if smaller.
    max_size: usize,
}

impl Broker for Nats {
    type Link = NatsLink;

    async fn open(&self) -> Result<NatsLink> {
        let (lost_tx, lost) = watch::channel(false);
        let options = async_nats::ConnectOptions::new()
            .name("sqlnotify-relay")
            .connection_timeout(Duration::from_secs(5))
            // One reconnect at most, at once: async-nats counts attempts from the last
            // successful connect and reads 0 as "no limit", so one immediate reconnect after
            // a loss is the least it allows. The relay opens a new link and sends what was not
            // confirmed again, in order; the old client may still write the publishes queued
            // in it on that one reconnect (README, "Ordering"). A client left to reconnect
            // later — after a long delay, say — would write them after newer ones, stored
            // again once the stream's duplicate window had passed.
            .max_reconnects(1)
            .event_callback(move |event| {
                let lost_tx = lost_tx.clone();
                async move {
                    if matches!(event, Event::Disconnected | Event::Closed) {
                        let _ = lost_tx.send(true);
                    }
                }
            });
        let client = options.connect(self.url.as_str()).await.map_err(|e| {
            Error::broker(format!("connecting to NATS at {}", redact(&self.url)), e)
        })?;
        let max_payload = client.max_payload();
        let js = ContextBuilder::new()
            .timeout(self.ack_timeout)
            .max_ack_inflight(self.max_pending.max(1))
            .backpressure_on_inflight(true)
            .build(client);
        let max_message_size = self.ensure_stream(&js).await?;
        Ok(NatsLink {
            js,
            lost,
            stream: self.stream.clone(),
            max_size: usize::try_from(max_message_size)
                .ok()
                .filter(|&n| n > 0)
                .map_or(max_payload, |n| n.min(max_payload)),
        })
    }
}

impl Nats {
    /// Uses the stream if it exists and fits (it covers every subject, its duplicate window
    /// is long enough); creates it otherwise. Returns its `max_msg_size` (-1: no limit).
    async fn ensure_stream(&self, js: &async_nats::jetstream::Context) -> Result<i32> {
        let name = &self.stream;
        match js.get_stream(name).await {
            Ok(mut stream) => {
                let info = stream
                    .info()
                    .await
                    .map_err(|e| Error::broker(format!("reading stream {name}"), e))?;
                self.check(&info.config)
                    .map(|()| info.config.max_message_size)
            }
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                let config = Config {
                    name: name.clone(),
                    subjects: vec![self.filter.clone()],
                    duplicate_window: self.duplicate_window,
                    max_age: self.max_age,
                    storage: StorageType::File,
                    retention: RetentionPolicy::Limits,
                    discard: DiscardPolicy::Old,
                    ..Default::default()
                };
                match js.create_stream(config).await {
                    Ok(_) => {
                        log::info!(
                            "sqlnotify: created JetStream stream {name} on {} (duplicate window {:?})",
                            self.filter,
                            self.duplicate_window
                        );
                        Ok(-1)
                    }
                    // Another relay of the group created it meanwhile: check theirs.
                    Err(create) => match js.get_stream(name).await {
                        Ok(mut stream) => match stream.info().await {
                            Ok(info) => self
                                .check(&info.config)
                                .map(|()| info.config.max_message_size),
                            Err(_) => Err(Error::broker(format!("creating stream {name}"), create)),
                        },
                        Err(_) => Err(Error::broker(format!("creating stream {name}"), create)),
                    },
                }
            }
            Err(e) => Err(Error::broker(format!("looking up stream {name}"), e)),
        }
    }

    /// Whether an existing stream's configuration fits the relay.
    fn check(&self, config: &Config) -> Result<()> {
        let name = &self.stream;
        if let Some(subject) = self
            .subjects
            .iter()
            .find(|s| !config.subjects.iter().any(|f| covers(f, s)))
        {
            return Err(Error::InvalidOption {
                option: "stream",
                reason: format!(
                    "stream {name} (subjects {:?}) does not take subject {subject}; add {:?} \
                     to its subjects or relay into another stream",
                    config.subjects, self.filter
                ),
            });
        }
        if config.duplicate_window < self.duplicate_window {
            return Err(Error::InvalidOption {
                option: "stream",
                reason: format!(
                    "stream {name} keeps message ids for {:?}, less than the relay's duplicate \
                     window of {:?}: a change relayed again after a failover could be stored \
                     twice; raise the stream's duplicate_window or lower the relay's",
                    config.duplicate_window, self.duplicate_window
                ),
            });
        }
        Ok(())
    }
}

impl Link for NatsLink {
    async fn send(&mut self, message: &Outgoing) -> Result<Confirmation> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message.id.as_str());
        for (name, value) in &message.headers {
            headers.insert(*name, value.as_str());
        }
        let stream = self.stream.clone();
        let ack = self
            .js
            .publish_with_headers(message.subject.clone(), headers, message.body.clone())
            .await
            .map_err(|e| Error::broker(format!("publishing to stream {stream}"), e))?;
        Ok(Box::pin(async move {
            let ack = ack.await.map_err(|e| {
                Error::broker(format!("waiting for stream {stream} to store a message"), e)
            })?;
            if ack.stream != stream {
                return Err(Error::InvalidOption {
                    option: "stream",
                    reason: format!(
                        "a message meant for stream {stream} was stored by stream {} (their \
                         subjects overlap)",
                        ack.stream
                    ),
                });
            }
            Ok(Stored {
                duplicate: ack.duplicate,
            })
        }))
    }

    fn lost(&self) -> impl std::future::Future<Output = ()> + 'static {
        let mut lost = self.lost.clone();
        async move {
            let _ = lost.wait_for(|lost| *lost).await;
        }
    }

    fn max_size(&self) -> usize {
        self.max_size
    }
}
