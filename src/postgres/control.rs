//! The control connection: a second PostgreSQL connection (never the listener's) for catalog
//! reads, custom notifications and the overflow table. It reconnects on demand, so a
//! restarted server only costs the call that found the connection closed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::Mutex;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::ddl::SCHEMA;
use super::PgConfig;
use crate::error::{Error, Result};
use crate::overflow::OverflowStore;
use crate::sql::quote_ident;

/// Overflow rows deleted per statement, so expiry never holds long locks.
const PURGE_BATCH: i64 = 5_000;

pub(crate) struct Control {
    config: PgConfig,
    /// What the connection is for, in its errors and logs.
    purpose: &'static str,
    client: Mutex<Option<Arc<Client>>>,
}

impl Control {
    /// The control connection (opened on first use).
    pub fn new(config: PgConfig) -> Self {
        Self::for_purpose(config, "control")
    }

    /// A connection like the control connection, kept for `purpose` alone (opened on first
    /// use): replays of the journal for resuming clients, whose reads must never hold up the
    /// overflow reads the pipeline waits for.
    pub fn for_purpose(config: PgConfig, purpose: &'static str) -> Self {
        Control {
            config,
            purpose,
            client: Mutex::new(None),
        }
    }

    /// Opens a new connection with the user's settings, driven by a spawned task.
    pub async fn connect(config: &PgConfig, purpose: &str) -> Result<Client> {
        let (client, connection) = config.connect(purpose).await?;
        let purpose = purpose.to_string();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("sqlnotify: {purpose} connection ended: {e}");
            }
        });
        Ok(client)
    }

    /// The shared client, reconnecting if the previous connection is closed.
    ///
    /// The connect runs without the lock held: a connect the server never answers (its
    /// bound is 30 s by default) holds up only its own caller. Held, it held every overflow
    /// read behind a purge's connect, and the `close()` of a read that gave up waited for it
    /// too. Callers that find no connection at the same time each open one; the first stored
    /// is kept, and the others are dropped.
    pub async fn client(&self) -> Result<Arc<Client>> {
        if let Some(client) = self.live().await {
            return Ok(client);
        }
        let client = Arc::new(Self::connect(&self.config, self.purpose).await?);
        let mut slot = self.client.lock().await;
        if let Some(stored) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(stored.clone());
        }
        *slot = Some(client.clone());
        Ok(client)
    }

    /// The stored client, if its connection is still open.
    async fn live(&self) -> Option<Arc<Client>> {
        let slot = self.client.lock().await;
        slot.as_ref().filter(|c| !c.is_closed()).cloned()
    }

    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    pub async fn close(&self) {
        self.client.lock().await.take();
    }
}

/// How long reading an overflow row may take (connecting included) before the control
/// connection is given up and the event delivered with its key only: the decoder, and every
/// event behind it, waits for the answer.
const FETCH_LIMIT: Duration = Duration::from_secs(10);

impl OverflowStore for Arc<Control> {
    fn fetch(
        &self,
        channel: String,
        reference: String,
    ) -> BoxFuture<'static, Result<Option<String>>> {
        let this = self.clone();
        Box::pin(async move {
            let context = || format!("reading overflow row {reference} of {channel}");
            let read = async {
                let client = this.client().await?;
                // Bound to the channel: a reference seen on one channel never reads another's
                // row. The decoder only passes references in the canonical UUID form (see
                // payload.rs), so the cast cannot fail.
                let sql = format!(
                    "SELECT payload FROM {}.overflow WHERE token = $1::uuid AND channel = $2",
                    quote_ident(SCHEMA)
                );
                let row = client
                    .query_typed_opt(&sql, &[(&reference, Type::TEXT), (&channel, Type::TEXT)])
                    .await
                    .map_err(|e| Error::db(context(), e))?;
                // A column whose type someone changed is this read's error, not a panic in
                // the decoder.
                row.map(|r| r.try_get(0))
                    .transpose()
                    .map_err(|e| Error::db(context(), e))
            };
            match tokio::time::timeout(FETCH_LIMIT, read).await {
                Ok(result) => result,
                Err(_) => {
                    // A connection gone silent (no FIN, no RST) stays "open" for minutes; the
                    // decoder waits for this answer, and the whole pipeline with it. Dropped:
                    // the next read opens a new one.
                    this.close().await;
                    Err(Error::Database {
                        context: context(),
                        source: format!("no answer within {FETCH_LIMIT:?}").into(),
                    })
                }
            }
        })
    }

    fn purge(&self, retention: Duration) -> BoxFuture<'static, Result<u64>> {
        let this = self.clone();
        Box::pin(async move {
            let client = this.client().await?;
            // Nothing to purge where sqlnotify's tables were never installed (a notifier with
            // only Tier::Logical watches): no warning every interval.
            let installed: bool = client
                .query_one(
                    &format!(
                        "SELECT pg_catalog.to_regclass({}) IS NOT NULL",
                        crate::sql::quote_literal(&format!("{}.overflow", quote_ident(SCHEMA)))
                    ),
                    &[],
                )
                .await
                .map_err(|e| Error::db("deleting expired overflow rows", e))?
                .get(0);
            if !installed {
                return Ok(0);
            }
            let sql = format!(
                "WITH d AS (DELETE FROM {s}.overflow WHERE id IN (SELECT id FROM {s}.overflow \
                 WHERE created_at < now() - pg_catalog.make_interval(secs => $1) ORDER BY id LIMIT $2) \
                 RETURNING 1) SELECT count(*) FROM d",
                s = quote_ident(SCHEMA)
            );
            let secs = retention.as_secs_f64();
            let mut total = 0;
            loop {
                let n = client
                    .query_typed_one(
                        sql.as_str(),
                        &[(&secs, Type::FLOAT8), (&PURGE_BATCH, Type::INT8)],
                    )
                    .await
                    .map_err(|e| Error::db("deleting expired overflow rows", e))?
                    .get::<_, i64>(0) as u64;
                total += n;
                if n < PURGE_BATCH as u64 {
                    break;
                }
            }
            drop(client);
            // Journal rows: only those no registered consumer still has to read.
            total += super::consumers::purge_journal(&this, retention).await?;
            Ok(total)
        })
    }
}
