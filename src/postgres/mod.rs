//! The PostgreSQL dialect: triggers that `pg_notify`, a LISTENing connection per notifier,
//! and the `sqlnotify` schema (catalog, overflow table, journal, consumers, dead letters).
//!
//! The connection URL is parsed by tokio-postgres' own [`Config`](tokio_postgres::Config)
//! (libpq's TLS parameters taken out first and kept beside it: `tls.rs`) and used unchanged
//! for every connection, so everything the user put in it — host or unix-socket directory,
//! port, user, password, dbname, `sslmode`, `application_name`, `options` — applies to the
//! listener too.

mod catalog;
mod consumers;
mod control;
mod custom;
mod ddl;
mod dead_letters;
pub(crate) mod effects;
mod journal;
mod listener;
#[cfg(feature = "logical")]
mod logical;
mod replay;
mod signing;
mod snapshot;
mod tls;

use std::sync::{Arc, Mutex};

pub(crate) use self::tls::PgConfig;
use futures_util::future::BoxFuture;
use serde_json::Value;

use self::control::Control;
use crate::consumer::{Backlog, ConsumerInfo};
use crate::dead_letters::DeadLetterStore;
use crate::dialect::{CleanupReport, Dialect, DialectOptions, InstallOptions};
use crate::error::{Error, Result};
use crate::event::Channel;
use crate::listener::{ListenParams, ListenerHandle};
use crate::overflow::OverflowStore;
use crate::resolve::{ResolvedWatch, TableInfo};
use crate::tier::{Capture, Tier};

/// PostgreSQL behind the [`Dialect`] interface.
pub(crate) struct Postgres {
    control: Arc<Control>,
    /// The connection that replays the journal for resuming clients (SSE `Last-Event-ID`):
    /// a replay's pages queue there, never in front of the overflow reads and custom events
    /// of the control connection.
    replays: Arc<Control>,
    /// Whether notify-tier payloads are signed (anyone who can connect may NOTIFY).
    sign_notifications: bool,
    /// The logical tier's watches, as the last install saw them (what its listener decodes).
    logical: Mutex<Vec<ResolvedWatch>>,
    /// How long making the logical tier's slot and publication waits for another session
    /// making them: the last install's `install_timeout`.
    #[cfg_attr(not(feature = "logical"), allow(dead_code))]
    objects_wait: Mutex<std::time::Duration>,
    /// The throwaway slot and publication of a logical listener without a consumer, dropped
    /// by `close`.
    temporary: Arc<Mutex<Option<String>>>,
    /// The transactions the logical tier's stream handed over that the server may still list
    /// as running: what its snapshots are checked against (`snapshot.rs`).
    sent: Arc<snapshot::SentXids>,
}

impl Postgres {
    /// Parses a `postgres://` / `postgresql://` URL (or key=value string). Does not connect.
    pub fn new(url: &str, options: DialectOptions) -> Result<Self> {
        // tokio-postgres only accepts lower-case schemes; the notifier matched case-insensitively.
        let url = match url.split_once("://") {
            Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
            None => url.to_string(),
        };
        let config = PgConfig::parse(&url)?;
        Ok(Postgres {
            replays: Arc::new(Control::for_purpose(config.clone(), "journal replay")),
            control: Arc::new(Control::new(config)),
            sign_notifications: options.sign_notifications,
            logical: Mutex::new(Vec::new()),
            objects_wait: Mutex::new(crate::lockwait::DEFAULT_INSTALL_TIMEOUT),
            temporary: Arc::new(Mutex::new(None)),
            sent: Arc::default(),
        })
    }

    fn config(&self) -> PgConfig {
        self.control.config().clone()
    }
}

/// The watch options the logical tier refuses; without the `logical` feature, the tier.
fn check_logical_options(watches: &[ResolvedWatch]) -> Result<()> {
    #[cfg(feature = "logical")]
    for w in watches.iter().filter(|w| w.tier == Tier::Logical) {
        logical::check_options(w)?;
    }
    #[cfg(not(feature = "logical"))]
    if let Some(w) = watches.iter().find(|w| w.tier == Tier::Logical) {
        return Err(Error::Unsupported {
            what: format!(
                "watch {}.{}: Tier::Logical needs sqlnotify's `logical` feature",
                w.channel.schema, w.channel.table
            ),
        });
    }
    Ok(())
}

/// `wal_level` and the tables' replica identity, for the logical tier's watches.
#[cfg(feature = "logical")]
async fn check_logical_tables(
    client: &tokio_postgres::Client,
    watches: &[ResolvedWatch],
) -> Result<()> {
    logical::check_server(client).await?;
    logical::check_tables(client, &watches.iter().collect::<Vec<_>>()).await
}

#[cfg(not(feature = "logical"))]
async fn check_logical_tables(_: &tokio_postgres::Client, watches: &[ResolvedWatch]) -> Result<()> {
    check_logical_options(watches)
}

impl Postgres {
    /// Starts the logical tier's listener: the publication and the slot (a consumer's, else a
    /// throwaway one dropped by `close`), then the shell over a [`logical::LogicalSource`].
    #[cfg(feature = "logical")]
    fn listen_logical(
        &self,
        params: ListenParams,
    ) -> BoxFuture<'static, Result<Box<dyn ListenerHandle>>> {
        let (config, control, sent) = (self.config(), self.control.clone(), self.sent.clone());
        let watches = self
            .logical
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let wait = *self.objects_wait.lock().unwrap_or_else(|p| p.into_inner());
        let name = match &params.consumer {
            Some(consumer) => logical::consumer_object(&consumer.name),
            None => {
                let name = logical::temporary_object();
                *self.temporary.lock().unwrap_or_else(|p| p.into_inner()) = Some(name.clone());
                name
            }
        };
        Box::pin(async move {
            let tables: Vec<(String, String)> = watches
                .iter()
                .map(|w| (w.channel.schema.clone(), w.channel.table.clone()))
                .collect();
            // On a connection of its own: `ensure` holds a session lock while it works, which
            // a cancelled start() must not leave held on the shared one.
            let own = Control::connect(&config, "making the replication slot").await?;
            logical::ensure(
                &own,
                &name,
                &tables,
                params.consumer.as_ref().map(|c| c.name.as_str()),
                logical::Making::Start,
                wait,
            )
            .await?;
            drop(own);
            let client = control.client().await?;
            // Custom events travel as logical-decoding messages, which any role may emit:
            // signed like the notify tier's payloads, or refused without a key.
            let verifier = match signing::load(&client).await {
                Ok(verifier) => Some(verifier),
                Err(e) => {
                    log::info!(
                        "sqlnotify: custom events on the logical tier are refused until the \
                         signing key can be read: {e}"
                    );
                    None
                }
            };
            drop(client);
            let source = logical::LogicalSource::new(
                config,
                name,
                params.consumer.is_some(),
                logical::routes(&watches),
                params.health_check,
                wait,
                sent,
                verifier,
            )?;
            crate::listener::start(source, params).await
        })
    }

    #[cfg(not(feature = "logical"))]
    fn listen_logical(
        &self,
        _: ListenParams,
    ) -> BoxFuture<'static, Result<Box<dyn ListenerHandle>>> {
        Box::pin(async {
            Err(Error::Unsupported {
                what: "Tier::Logical needs sqlnotify's `logical` feature".into(),
            })
        })
    }
}

impl Dialect for Postgres {
    fn name(&self) -> &'static str {
        "postgresql"
    }

    fn default_schema(&self) -> String {
        "public".to_string()
    }

    fn describe_tables(
        &self,
        tables: Vec<(String, String)>,
    ) -> BoxFuture<'static, Result<Vec<TableInfo>>> {
        let control = self.control.clone();
        Box::pin(async move {
            let client = control.client().await?;
            let mut out = Vec::with_capacity(tables.len());
            for (schema, table) in tables {
                out.push(catalog::describe_table(&client, &schema, &table).await?);
            }
            Ok(out)
        })
    }

    fn finish_watch(&self, watch: &mut ResolvedWatch) {
        watch.channel.signed = self.sign_notifications && watch.tier == Tier::Notify;
    }

    fn check_watches(&self, watches: &[ResolvedWatch]) -> BoxFuture<'static, Result<()>> {
        let (control, watches) = (self.control.clone(), watches.to_vec());
        Box::pin(async move {
            crate::resolve::check_context(
                &watches,
                ddl::MAX_CONTEXT_NAMES,
                |name| ddl::context_expr(name).is_some(),
                "PostgreSQL offers current_user, session_user, application_name, client_addr, \
                 backend_pid and custom settings whose name has a dot (such as app.user_id)",
            )?;
            check_logical_options(&watches)?;
            if !watches.iter().any(|w| w.capture == Capture::Statement) {
                return Ok(());
            }
            let client = control.client().await?;
            catalog::check_statement_capture(&client, &watches).await
        })
    }

    fn install(
        &self,
        watches: Vec<ResolvedWatch>,
        options: InstallOptions,
    ) -> BoxFuture<'static, Result<Vec<String>>> {
        let config = self.config();
        let (logical, watches): (Vec<ResolvedWatch>, Vec<ResolvedWatch>) =
            watches.into_iter().partition(|w| w.tier == Tier::Logical);
        *self.logical.lock().unwrap_or_else(|p| p.into_inner()) = logical.clone();
        *self.objects_wait.lock().unwrap_or_else(|p| p.into_inner()) = options.timeout;
        Box::pin(async move {
            // Its own connection: the install transaction must not interleave with other calls.
            let mut client = Control::connect(&config, "install").await?;
            if !logical.is_empty() {
                check_logical_tables(&client, &logical).await?;
            }
            if watches.is_empty() && !options.cleanup_on_start {
                if !logical.is_empty() && options.manage_triggers {
                    // Custom events on the logical tier are signed with sqlnotify's key: made
                    // where the role may, else custom events are refused (a role without
                    // CREATE keeps using the tier's changes).
                    if let Err(e) = catalog::set_up_signing(&mut client, options).await {
                        log::info!(
                            "sqlnotify: no signing key for custom events on the logical tier \
                             ({e}); notify() on its watches fails until one exists"
                        );
                    }
                }
                return Ok(Vec::new());
            }
            catalog::install(&mut client, &watches, options).await
        })
    }

    fn install_sql(&self, watches: &[ResolvedWatch], grant_to: Option<&str>) -> Result<String> {
        let (logical, watches): (Vec<ResolvedWatch>, Vec<ResolvedWatch>) = watches
            .iter()
            .cloned()
            .partition(|w| w.tier == Tier::Logical);
        if !logical.is_empty() && watches.is_empty() {
            return Ok(format!(
                "-- Tier::Logical watches install no trigger: start() creates a publication and a \
                 replication slot for them\n-- (the role needs REPLICATION, and ownership of {}).\n",
                logical
                    .iter()
                    .map(|w| crate::sql::comment(&format!("{}.{}", w.channel.schema, w.channel.table)))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(ddl::install_script(&watches, grant_to))
    }

    fn uninstall(
        &self,
        channels: Vec<String>,
        timeout: std::time::Duration,
    ) -> BoxFuture<'static, Result<()>> {
        let config = self.config();
        Box::pin(async move {
            let mut client = Control::connect(&config, "uninstall").await?;
            catalog::uninstall(&mut client, &channels, timeout).await
        })
    }

    fn cleanup_all(
        &self,
        timeout: std::time::Duration,
    ) -> BoxFuture<'static, Result<CleanupReport>> {
        let config = self.config();
        Box::pin(async move {
            let mut client = Control::connect(&config, "cleanup").await?;
            #[cfg(feature = "logical")]
            let dropped = logical::cleanup(&client, timeout).await?;
            let watches = catalog::cleanup_all(&mut client, timeout).await?;
            #[cfg(feature = "logical")]
            return Ok(CleanupReport {
                watches,
                slots: dropped.slots,
                consumers: dropped.consumers,
                publications: dropped.publications,
            });
            #[cfg(not(feature = "logical"))]
            Ok(CleanupReport::watches(watches))
        })
    }

    fn listen(&self, params: ListenParams) -> BoxFuture<'static, Result<Box<dyn ListenerHandle>>> {
        let (config, control) = (self.config(), self.control.clone());
        if params.channels.iter().any(|c| c.tier == Tier::Logical) {
            return self.listen_logical(params);
        }
        Box::pin(async move {
            // Read once: the key never changes while its table exists.
            let verifier = if params.channels.iter().any(|c| c.signed) {
                Some(signing::load(&*control.client().await?).await?)
            } else {
                None
            };
            let source =
                listener::PgSource::new(config, &params.channels, verifier, params.health_check);
            crate::listener::start(source, params).await
        })
    }

    fn send_custom(
        &self,
        channel: &Channel,
        payload: String,
        value: &Value,
        allow_overflow: bool,
    ) -> BoxFuture<'static, Result<()>> {
        custom::send(&self.control, channel, payload, value, allow_overflow)
    }

    fn overflow_store(&self) -> Arc<dyn OverflowStore> {
        Arc::new(self.control.clone())
    }

    fn postgres_config(&self) -> Option<PgConfig> {
        Some(self.config())
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let (control, replays) = (self.control.clone(), self.replays.clone());
        let temporary = self
            .temporary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        Box::pin(async move {
            #[cfg(feature = "logical")]
            if let Some(name) = temporary {
                let dropped = match control.client().await {
                    Ok(client) => {
                        logical::drop_objects(&client, &name, std::time::Duration::from_secs(5))
                            .await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = dropped {
                    log::warn!("sqlnotify: could not drop replication slot {name}: {e}; drop it with cleanup() — it keeps WAL on the server");
                }
            }
            #[cfg(not(feature = "logical"))]
            let _ = temporary;
            replays.close().await;
            control.close().await
        })
    }

    fn consumers(&self) -> BoxFuture<'static, Result<Vec<ConsumerInfo>>> {
        let control = self.control.clone();
        Box::pin(async move {
            let client = control.client().await?;
            #[allow(unused_mut)]
            let mut list = consumers::list(&client).await?;
            #[cfg(feature = "logical")]
            {
                list.extend(logical::list(&client).await?);
                list.sort_by(|a, b| a.name.cmp(&b.name));
            }
            Ok(list)
        })
    }

    fn drop_consumer(&self, name: String) -> BoxFuture<'static, Result<()>> {
        let control = self.control.clone();
        Box::pin(async move {
            let client = control.client().await?;
            let journal = consumers::drop_consumer(&client, &name).await;
            #[cfg(feature = "logical")]
            {
                let object = logical::consumer_object(&name);
                let wait = std::time::Duration::from_secs(5);
                if logical::drop_objects(&client, &object, wait).await? {
                    return match journal {
                        Err(Error::UnknownConsumer { .. }) => Ok(()),
                        other => other,
                    };
                }
            }
            journal
        })
    }

    fn consumer_backlog(&self, name: String) -> BoxFuture<'static, Result<Option<Backlog>>> {
        let control = self.control.clone();
        Box::pin(async move { consumers::backlog(&*control.client().await?, &name).await })
    }

    fn dead_letter_store(&self) -> Result<Arc<dyn DeadLetterStore>> {
        Ok(Arc::new(dead_letters::PgDeadLetters::new(
            self.control.clone(),
        )))
    }

    fn replay(
        &self,
        from: crate::replay::ReplayFrom,
        channels: Vec<String>,
        all: Vec<String>,
        limit: i64,
    ) -> BoxFuture<'static, Result<crate::replay::Replay>> {
        let replays = self.replays.clone();
        Box::pin(async move {
            replay::replay(&*replays.client().await?, from, &channels, &all, limit).await
        })
    }

    fn replay_head(&self) -> BoxFuture<'static, Result<Option<crate::replay::Head>>> {
        let control = self.control.clone();
        Box::pin(async move { replay::head(&*control.client().await?).await.map(Some) })
    }

    fn open_snapshot(
        &self,
        channel: Arc<Channel>,
        chunk_rows: usize,
    ) -> BoxFuture<'static, Result<Box<dyn crate::snapshot::reader::SnapshotReader>>> {
        let config = self.config();
        let sent = (channel.tier == Tier::Logical).then(|| self.sent.clone());
        Box::pin(async move {
            let reader = snapshot::PgSnapshot::open(&config, channel, chunk_rows, sent).await?;
            Ok(Box::new(reader) as Box<dyn crate::snapshot::reader::SnapshotReader>)
        })
    }
}
