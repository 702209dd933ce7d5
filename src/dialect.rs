//! The dialect boundary: everything database-specific sits behind [`Dialect`].
//!
//! A dialect reads table descriptions from the catalog, generates and installs triggers,
//! runs the listener, sends custom notifications and serves overflow rows. Everything after
//! the listener (decoder, registry, subscribers) sees only [`RawNotification`]s and this trait,
//! so it can be driven and tested without a database.
//!
//! [`RawNotification`]: crate::RawNotification

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;

pub(crate) mod open;

use crate::consumer::{Backlog, ConsumerInfo};
use crate::dead_letters::DeadLetterStore;
use crate::error::Result;
use crate::event::Channel;
use crate::listener::{ListenParams, ListenerHandle};
use crate::overflow::OverflowStore;
use crate::replay::{Head, Replay, ReplayFrom};
use crate::resolve::{ResolvedWatch, TableInfo};
use crate::snapshot::reader::SnapshotReader;

/// What [`cleanup_with_report`](crate::NotifierBuilder::cleanup_with_report) removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CleanupReport {
    /// How many watches were removed: their triggers (on PostgreSQL also their trigger
    /// functions) and catalog entries.
    pub watches: u64,
    /// The replication slots dropped (PostgreSQL's logical tier, in a build with feature
    /// `logical`): every sqlnotify slot of the database, by name. A named consumer's slot is
    /// its position, so each one dropped is a position gone (see `consumers`).
    pub slots: Vec<String>,
    /// The named consumers of the logical tier whose slot (their position) or publication was
    /// dropped, by name; a notifier without a consumer leaves only a throwaway
    /// `sqlnotify_tmp_…` slot behind, which names none.
    pub consumers: Vec<String>,
    /// The publications dropped (logical tier), by name.
    pub publications: Vec<String>,
}

impl CleanupReport {
    /// A report of `watches` removed watches and nothing else.
    #[cfg_attr(
        all(
            not(any(feature = "sqlite", feature = "mysql")),
            any(not(feature = "postgres"), feature = "logical")
        ),
        allow(dead_code)
    )]
    pub(crate) fn watches(watches: u64) -> Self {
        CleanupReport {
            watches,
            ..CleanupReport::default()
        }
    }
}

/// How `start()` treats existing database objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InstallOptions {
    /// Replace objects whose definition changed (else: drift error).
    pub revoke_on_model_change: bool,
    /// Drop every sqlnotify object in the database first.
    pub cleanup_on_start: bool,
    /// Create/replace objects; when false only verify they are installed as expected.
    pub manage_triggers: bool,
    /// How long to keep retrying when a lock is held by another session.
    pub timeout: Duration,
}

/// Builder settings that only some dialects act on, given when a dialect is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DialectOptions {
    /// Sign notify-tier payloads, where any client may send notifications (PostgreSQL).
    pub sign_notifications: bool,
    /// How long a missing journal id is waited for before it counts as rolled back, when set
    /// on the builder (`None`: the URL's or the dialect's default). Only MySQL's journal has
    /// such gaps.
    pub gap_timeout: Option<Duration>,
    /// Make the journal record each row's transaction (MariaDB).
    pub mysql_transaction_ids: bool,
}

/// One database family.
pub(crate) trait Dialect: Send + Sync + 'static {
    /// `"postgresql"`, `"sqlite"`, `"mysql"`.
    fn name(&self) -> &'static str;
    /// Schema of tables named without one: `public`, `main`, the URL's database.
    fn default_schema(&self) -> String;
    /// Reads each `(schema, table)` from the catalog, failing on the first unknown one.
    fn describe_tables(
        &self,
        tables: Vec<(String, String)>,
    ) -> BoxFuture<'static, Result<Vec<TableInfo>>>;
    /// Completes a watch just resolved against its table with what only the dialect decides
    /// (PostgreSQL: whether its channel's payloads are signed).
    fn finish_watch(&self, _watch: &mut ResolvedWatch) {}
    /// Dialect-specific checks of resolved watches, before anything is installed or an
    /// install script is produced (PostgreSQL: where statement capture cannot work).
    fn check_watches(&self, _watches: &[ResolvedWatch]) -> BoxFuture<'static, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Installs (or verifies) the objects for `watches`; returns the channels whose objects it
    /// created or replaced (with `cleanup_on_start`, every watch's), none of those it found
    /// installed as generated — what `cleanup_installed_on_stop` removes.
    fn install(
        &self,
        watches: Vec<ResolvedWatch>,
        options: InstallOptions,
    ) -> BoxFuture<'static, Result<Vec<String>>>;
    /// The DDL `install` would run for `watches`, for users who apply migrations themselves;
    /// with `grant_to`, followed by the grants that role needs to run a notifier.
    fn install_sql(&self, watches: &[ResolvedWatch], grant_to: Option<&str>) -> Result<String>;
    /// Removes the objects of these channels, retrying lock waits for up to `timeout`.
    fn uninstall(&self, channels: Vec<String>, timeout: Duration)
        -> BoxFuture<'static, Result<()>>;
    /// Removes every sqlnotify object in the database, retrying lock waits for up to
    /// `timeout` (sqlnotify's tables excepted); says what it removed.
    fn cleanup_all(&self, timeout: Duration) -> BoxFuture<'static, Result<CleanupReport>>;
    /// Starts a listener; resolves once it is listening.
    fn listen(&self, params: ListenParams) -> BoxFuture<'static, Result<Box<dyn ListenerHandle>>>;
    /// Sends a custom event on `channel` (on a connection other than the listener's) the way
    /// the channel's trigger would, so listeners treat it like a trigger's event. `payload` is
    /// `value` checked and rendered. Where the channel limits payload sizes (PostgreSQL's
    /// notify tier), a larger payload goes to the overflow table when `allow_overflow`, and
    /// otherwise fails with `Error::PayloadTooLarge`.
    fn send_custom(
        &self,
        channel: &Channel,
        payload: String,
        value: &Value,
        allow_overflow: bool,
    ) -> BoxFuture<'static, Result<()>>;
    /// The overflow table reader, for the decoder.
    fn overflow_store(&self) -> Arc<dyn OverflowStore>;
    /// The connection settings of a PostgreSQL database (transactional handlers open their
    /// own connections); `None` on other dialects.
    #[cfg(feature = "postgres")]
    fn postgres_config(&self) -> Option<crate::postgres::PgConfig> {
        None
    }
    /// Closes the dialect's connections.
    fn close(&self) -> BoxFuture<'static, ()>;
    /// The named consumers registered in the database (none if sqlnotify was never
    /// installed), by name.
    fn consumers(&self) -> BoxFuture<'static, Result<Vec<ConsumerInfo>>>;
    /// Marks consumer `name` dropped (it protects nothing from then on); fails with
    /// `Error::UnknownConsumer` when no consumer has that name.
    fn drop_consumer(&self, name: String) -> BoxFuture<'static, Result<()>>;
    /// Journal rows on consumer `name`'s channels at or after its saved position, and the
    /// oldest one's age; `None` when it is not registered.
    fn consumer_backlog(&self, name: String) -> BoxFuture<'static, Result<Option<Backlog>>>;
    /// The dead-letter table of handlers ([`DeadLetterStore`]), on the dialect's own
    /// connections (never the listener's); usable whether a notifier runs or not.
    fn dead_letter_store(&self) -> Result<Arc<dyn DeadLetterStore>>;
    /// Opens a consistent read of `channel`'s table for a snapshot feed, returning its rows
    /// `chunk_rows` at a time as `channel`'s payloads.
    fn open_snapshot(
        &self,
        channel: Arc<Channel>,
        _chunk_rows: usize,
    ) -> BoxFuture<'static, Result<Box<dyn SnapshotReader>>> {
        let what = format!(
            "a snapshot of {}.{} on {}: not available on this dialect",
            channel.schema(),
            channel.table(),
            self.name()
        );
        Box::pin(async move { Err(crate::Error::Unsupported { what }) })
    }
    /// Up to `limit` journal rows on `channels` after `from`, in the order the listener
    /// delivers them — or `TooOld` when a row the client lacks may have been trimmed. `all`:
    /// the notifier's journal channels (those its listener reads). `Unsupported` where a
    /// dialect cannot say what came after a position.
    #[cfg_attr(not(feature = "web"), allow(dead_code))]
    fn replay(
        &self,
        _from: ReplayFrom,
        _channels: Vec<String>,
        _all: Vec<String>,
        _limit: i64,
    ) -> BoxFuture<'static, Result<Replay>> {
        Box::pin(async { Ok(Replay::Unsupported) })
    }
    /// Where the journal stands now, as a position [`replay`](Self::replay) can resume from
    /// ([`Head`]); `None` where a dialect cannot name one.
    #[cfg_attr(not(feature = "web"), allow(dead_code))]
    fn replay_head(&self) -> BoxFuture<'static, Result<Option<Head>>> {
        Box::pin(async { Ok(None) })
    }
}

/// What a dialect's catalog says about one watch: the input to install planning, which is the
/// same for every dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Installed {
    /// No catalog entry.
    Missing,
    /// A catalog entry: `same` — its recorded definition equals the generated one; `trigger`
    /// — the trigger still exists on the watched table.
    Recorded { same: bool, trigger: bool },
}

impl Installed {
    /// What `install` does for this watch: `None` when it is installed as generated (nothing
    /// is touched — dropping a trigger locks the user's table), `Some(why)` to (re)create it,
    /// or a drift error when it changed and `revoke_on_model_change` is off.
    pub fn plan(self, w: &ResolvedWatch, options: InstallOptions) -> Result<Option<&'static str>> {
        Ok(Some(match self {
            Installed::Recorded {
                same: true,
                trigger: true,
            } => return Ok(None),
            Installed::Recorded {
                same: true,
                trigger: false,
            } => "reinstalling (trigger was missing)",
            Installed::Missing => "installing",
            Installed::Recorded { same: false, .. } if options.revoke_on_model_change => {
                "replacing (definition changed)"
            }
            Installed::Recorded { same: false, .. } => {
                return Err(drift(w, "the installed definition differs from the watch"))
            }
        }))
    }

    /// With `manage_triggers` off: Ok only when installed exactly as generated.
    pub fn verify(self, w: &ResolvedWatch) -> Result<()> {
        let detail = match self {
            Installed::Recorded {
                same: true,
                trigger: true,
            } => return Ok(()),
            Installed::Missing => "it is not installed (apply install_sql() first)",
            Installed::Recorded { trigger: false, .. } => "its trigger is missing",
            Installed::Recorded { same: false, .. } => {
                "the installed definition differs from the watch"
            }
        };
        Err(drift(w, detail))
    }
}

fn drift(w: &ResolvedWatch, detail: &str) -> crate::Error {
    crate::Error::DefinitionDrift {
        channel: w.channel.name.clone(),
        table: format!("{}.{}", w.channel.schema, w.channel.table),
        detail: detail.into(),
    }
}
