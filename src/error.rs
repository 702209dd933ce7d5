//! The crate's one error type, [`Error`], and the [`Result`] alias used everywhere.
//!
//! Every variant that is caused by user input names the object at fault (table, column,
//! channel, label), so a failed `start()` can be fixed from the message alone.

use std::fmt;
use std::str::FromStr;

use crate::operation::Operation;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in sqlnotify.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The URL's scheme names a database this build does not support.
    UnsupportedDatabase {
        /// The scheme as given (e.g. `"mysql"`), or the whole URL when it has none.
        scheme: String,
        /// Why it is not supported (feature disabled, unknown scheme …).
        reason: String,
    },
    /// The connection URL could not be parsed.
    InvalidUrl {
        /// What the driver said about it.
        reason: String,
    },
    /// A builder option was given a value it cannot take.
    InvalidOption {
        /// The option, named as its builder method (e.g. `"gap_timeout"`).
        option: &'static str,
        /// Why the value cannot be used.
        reason: String,
    },
    /// A database call failed (connection refused, I/O error, SQL error …).
    Database {
        /// What sqlnotify was doing, e.g. `"installing trigger sqlnotify_public_users_insert"`.
        context: String,
        /// The driver's error.
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A watched schema does not exist.
    UnknownSchema {
        /// The schema name.
        schema: String,
    },
    /// A watched table does not exist (or is not a table).
    UnknownTable {
        /// The schema searched.
        schema: String,
        /// The table name.
        table: String,
    },
    /// A column named in a watch does not exist on its table.
    UnknownColumn {
        /// The table's schema.
        schema: String,
        /// The table.
        table: String,
        /// The missing column.
        column: String,
        /// Which watch list named it: `"extra_columns"`, `"trigger_columns"` or `"primary_keys"`.
        list: &'static str,
    },
    /// A `primary_keys` entry is not part of the table's primary key.
    NotPrimaryKey {
        /// The table's schema.
        schema: String,
        /// The table.
        table: String,
        /// The column that is not part of the primary key.
        column: String,
    },
    /// The table has no primary key and the watch did not name key columns.
    NoPrimaryKey {
        /// The table's schema.
        schema: String,
        /// The table.
        table: String,
    },
    /// `trigger_columns` was given for an INSERT or DELETE watch (only UPDATE has "changed" columns).
    TriggerColumnsNotAllowed {
        /// The watched table.
        table: String,
        /// The watch's operation.
        operation: Operation,
    },
    /// A watch's options do not go together (e.g. statement capture on the notify tier).
    InvalidWatch {
        /// The watch, as `schema.table operation`.
        watch: String,
        /// What is wrong, and what to do instead.
        reason: String,
    },
    /// Two watches describe the same channel.
    DuplicateWatch {
        /// The channel both watches would use.
        channel: String,
        /// The first watch, as `schema.table operation`.
        first: String,
        /// The second watch.
        second: String,
    },
    /// One channel label was given to watches of different tables or operations.
    LabelReused {
        /// The label.
        label: String,
        /// The first watch using it.
        first: String,
        /// The second watch using it.
        second: String,
    },
    /// A watch's channel differs only in case from one another notifier installed in the same
    /// SQLite database (two applications whose labels differ only in case). SQLite trigger
    /// names ignore case, so installing it would drop that notifier's trigger and put its own in
    /// its place. Nothing is installed.
    ChannelCaseConflict {
        /// This watch's channel (`sqlnotify_{label}`).
        channel: String,
        /// This watch, as `schema.table operation`.
        watch: String,
        /// The installed channel it collides with.
        installed: String,
        /// The installed watch, as `schema.table operation`.
        installed_watch: String,
    },
    /// A watch without a label would use a channel installed for another table: default
    /// channel names join schema, table and operation with `_`, which names may hold too
    /// (`a_b.c` and `a.b_c` both give `sqlnotify_a_b_c_insert`). Installing it would drop the
    /// other table's trigger — its notifier silently deaf — and feed that notifier this
    /// table's changes as its own. Nothing is installed.
    ChannelTaken {
        /// The channel both would use.
        channel: String,
        /// This watch, as `schema.table operation`.
        watch: String,
        /// The watch the channel is installed for, as `schema.table operation`.
        installed_watch: String,
    },
    /// An identifier (channel, trigger or function name) is longer than the database allows.
    IdentifierTooLong {
        /// The identifier.
        identifier: String,
        /// What it names (e.g. `"channel"`).
        kind: &'static str,
        /// The maximum, in bytes.
        max: usize,
    },
    /// A name or label is not usable (empty, contains NUL, or uses a reserved name).
    InvalidIdentifier {
        /// The identifier.
        identifier: String,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// An installed trigger differs from what the code asks for and
    /// `revoke_on_model_change` is off (or triggers are managed externally).
    DefinitionDrift {
        /// The channel (= trigger and function name) that differs.
        channel: String,
        /// The watched table.
        table: String,
        /// What differs.
        detail: String,
    },
    /// A subscription or custom notification names a table/operation/label nobody watches.
    NotWatched {
        /// `schema.table`.
        table: String,
        /// The operation.
        operation: Operation,
        /// The channel label, if one was given.
        label: Option<String>,
    },
    /// A filter names a column the channel's payload does not carry.
    UnknownFilterColumn {
        /// The channel.
        channel: String,
        /// The column.
        column: String,
        /// The columns the payload does carry.
        available: Vec<String>,
    },
    /// A custom notification's payload is not usable.
    InvalidPayload {
        /// The channel it was meant for.
        channel: String,
        /// Why.
        reason: String,
    },
    /// A custom notification is over the NOTIFY limit and overflow was not allowed.
    PayloadTooLarge {
        /// The channel.
        channel: String,
        /// The payload's size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// No subscription has this id (already removed?).
    UnknownSubscription {
        /// The id.
        id: u64,
    },
    /// The notifier is stopped (or its actors are gone).
    NotRunning,
    /// Installing, replacing or removing triggers (or upgrading sqlnotify's tables, or making
    /// a logical consumer's replication slot and publication) needed a lock that another
    /// session held for longer than
    /// [`install_timeout`](crate::NotifierBuilder::install_timeout). Nothing was changed by
    /// the attempt that gave up; start again once that session has finished.
    LockTimeout {
        /// What was waited for: a table as `schema.table`, a SQLite database file, the
        /// sqlnotify install lock (another instance installing), or a logical consumer's slot
        /// as `replication slot <slot> of consumer "<name>"` (another process making it).
        object: String,
        /// The server's ids of the sessions holding the lock (PostgreSQL backend pids, MySQL
        /// connection ids). Empty when the database does not say (SQLite; MySQL without
        /// `performance_schema` or the `metadata_lock_info` plugin).
        holder_pids: Vec<u64>,
        /// How long sqlnotify waited before giving up.
        waited: std::time::Duration,
    },
    /// No named consumer of this name is registered in the database (dropping one).
    UnknownConsumer {
        /// The name asked for.
        name: String,
    },
    /// No dead letter has this id ([`DeadLetters::get`](crate::DeadLetters::get)).
    UnknownDeadLetter {
        /// The id asked for.
        id: i64,
    },
    /// What was asked for does not exist on this dialect or tier (e.g. a transactional
    /// handler on MySQL).
    Unsupported {
        /// What was asked for and why it cannot be had, naming what to use instead.
        what: String,
    },
    /// The logical-decoding tier ([`Tier::Logical`](crate::Tier::Logical)) needs the server's
    /// `wal_level` to be `logical`.
    WalLevelNotLogical {
        /// The server's `wal_level` (`replica`, `minimal`).
        wal_level: String,
    },
    /// A table cannot be watched on the logical-decoding tier as asked: publishing it would
    /// make the application's UPDATEs and DELETEs fail (it has no replica identity), or its
    /// replica identity does not log the values the watch needs.
    ReplicaIdentity {
        /// The table, as `schema.table`.
        table: String,
        /// What is missing and the `ALTER TABLE` that fixes it.
        detail: String,
    },
    /// A logical-decoding consumer's replication slot was invalidated by the server (its
    /// `wal_status` is `lost`: it fell further behind than `max_slot_wal_keep_size`). The
    /// changes it had not read are gone; it cannot resume. Drop it
    /// ([`Notifier::drop_consumer`](crate::Notifier::drop_consumer), `sqlnotify consumers
    /// drop`) and start again, from "now".
    SlotLost {
        /// The slot.
        slot: String,
        /// The server's words.
        detail: String,
    },
    /// A message broker call failed (the relay: connecting to NATS, checking or creating
    /// the stream, publishing).
    Broker {
        /// What sqlnotify was doing, e.g. `"publishing to stream ORDERS"`.
        context: String,
        /// The client's error.
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl Error {
    /// Wraps a broker client's error with what sqlnotify was doing.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) fn broker(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Broker {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// Wraps a driver error with what sqlnotify was doing.
    pub(crate) fn db(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Database {
            context: context.into(),
            source: Box::new(source),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnsupportedDatabase { scheme, reason } => {
                write!(f, "unsupported database {scheme:?}: {reason}")
            }
            Error::InvalidUrl { reason } => write!(f, "invalid database URL: {reason}"),
            Error::InvalidOption { option, reason } => write!(f, "invalid {option}: {reason}"),
            Error::Database { context, source } => {
                // Driver errors often say little at the top ("db error") and the reason in
                // their sources: print the whole chain.
                write!(f, "{context}: {}", chain(&**source))
            }
            Error::UnknownSchema { schema } => write!(f, "schema {schema:?} does not exist"),
            Error::UnknownTable { schema, table } => {
                write!(f, "table {schema:?}.{table:?} does not exist")
            }
            Error::UnknownColumn {
                schema,
                table,
                column,
                list,
            } => write!(
                f,
                "column {column:?} named in {list} does not exist on table {schema:?}.{table:?}"
            ),
            Error::NotPrimaryKey {
                schema,
                table,
                column,
            } => write!(
                f,
                "column {column:?} is not part of the primary key of table {schema:?}.{table:?}"
            ),
            Error::NoPrimaryKey { schema, table } => write!(
                f,
                "table {schema:?}.{table:?} has no primary key; name the key columns with Watch::primary_keys"
            ),
            Error::TriggerColumnsNotAllowed { table, operation } => write!(
                f,
                "trigger_columns is only allowed for UPDATE watches, not {operation} (table {table:?})"
            ),
            Error::InvalidWatch { watch, reason } => write!(f, "watch {watch}: {reason}"),
            Error::DuplicateWatch {
                channel,
                first,
                second,
            } => write!(
                f,
                "watches {first} and {second} would both use channel {channel:?}; give one a channel_label"
            ),
            Error::LabelReused {
                label,
                first,
                second,
            } => write!(
                f,
                "channel label {label:?} is used by both {first} and {second}; a label names one table and operation"
            ),
            Error::ChannelTaken {
                channel,
                watch,
                installed_watch,
            } => write!(
                f,
                "watch {watch} would use channel {channel:?}, which is installed for \
                 {installed_watch} (default channel names join schema, table and operation \
                 with '_'); installing it would take that watch's trigger away: give one of \
                 them a channel_label"
            ),
            Error::ChannelCaseConflict {
                channel,
                watch,
                installed,
                installed_watch,
            } => {
                let label = |c: &str| c.strip_prefix("sqlnotify_").unwrap_or(c).to_string();
                write!(
                    f,
                    "channel {channel:?} of watch {watch} (label {:?}) differs only in case from \
                     channel {installed:?} of watch {installed_watch} (label {:?}), which another \
                     notifier installed in this database; SQLite trigger names ignore case, so \
                     installing it would replace that notifier's trigger: give one of them a \
                     channel_label that differs in more than case",
                    label(channel),
                    label(installed)
                )
            }
            Error::IdentifierTooLong {
                identifier,
                kind,
                max,
            } => write!(
                f,
                "{kind} {identifier:?} is {} bytes long, over the limit of {max}; use a shorter channel_label",
                identifier.len()
            ),
            Error::InvalidIdentifier { identifier, reason } => {
                write!(f, "invalid name {identifier:?}: {reason}")
            }
            Error::DefinitionDrift {
                channel,
                table,
                detail,
            } => write!(
                f,
                "installed trigger {channel:?} on {table} differs from this watch ({detail}); \
                 enable revoke_on_model_change or run cleanup to reinstall it"
            ),
            Error::NotWatched {
                table,
                operation,
                label,
            } => match label {
                Some(label) => write!(
                    f,
                    "no watch on {table} {operation} with channel label {label:?}"
                ),
                None => write!(f, "no watch on {table} {operation} (without a channel label)"),
            },
            Error::UnknownFilterColumn {
                channel,
                column,
                available,
            } => write!(
                f,
                "filter column {column:?} is not carried by channel {channel:?} (it carries {available:?}); \
                 add it to the watch's extra_columns"
            ),
            Error::InvalidPayload { channel, reason } => {
                write!(f, "invalid payload for channel {channel:?}: {reason}")
            }
            Error::PayloadTooLarge {
                channel,
                size,
                limit,
            } => write!(
                f,
                "payload for channel {channel:?} is {size} bytes, over the limit of {limit}; allow overflow to send it"
            ),
            Error::UnknownSubscription { id } => write!(f, "no subscription with id {id}"),
            Error::NotRunning => write!(f, "the notifier is not running"),
            Error::LockTimeout {
                object,
                holder_pids,
                waited,
            } => {
                write!(
                    f,
                    "gave up after {:.1} s (install_timeout) waiting for a lock on {object}, ",
                    waited.as_secs_f64()
                )?;
                match holder_pids.as_slice() {
                    [] => write!(f, "held by a session the database does not name")?,
                    [pid] => write!(f, "held by pid {pid}")?,
                    pids => {
                        let pids: Vec<String> = pids.iter().map(u64::to_string).collect();
                        write!(f, "held by pids {}", pids.join(", "))?
                    }
                }
                write!(
                    f,
                    "; nothing was changed — retry once that transaction has ended, or raise \
                     install_timeout"
                )
            }
            Error::Broker { context, source } => write!(f, "{context}: {source}"),
            Error::UnknownConsumer { name } => write!(
                f,
                "no consumer named {name:?} is registered in this database (see `consumers()` \
                 or `sqlnotify consumers list`)"
            ),
            Error::UnknownDeadLetter { id } => write!(
                f,
                "no dead letter has id {id} (see `dead_letters().list()` or `sqlnotify \
                 dead-letters list`)"
            ),
            Error::Unsupported { what } => f.write_str(what),
            Error::WalLevelNotLogical { wal_level } => write!(
                f,
                "Tier::Logical needs wal_level = logical, and the server has wal_level = \
                 {wal_level}: set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET \
                 wal_level = logical) and restart the server (a reload is not enough)"
            ),
            Error::ReplicaIdentity { table, detail } => {
                write!(f, "table {table} cannot be watched with Tier::Logical: {detail}")
            }
            Error::SlotLost { slot, detail } => write!(
                f,
                "replication slot {slot} was invalidated by the server ({detail}): the changes \
                 it had not read are lost; drop the consumer and start again"
            ),
        }
    }
}

/// An error and its sources, joined with ": ", skipping repeats.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    out
}

impl Error {
    /// Whether a listener that fails with this error must stop for good instead of
    /// reconnecting: retrying cannot help ([`Error::SlotLost`]: the slot cannot be read again).
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(self, Error::SlotLost { .. })
    }

    /// A copy of an error that stopped a listener for good — a fatal one
    /// ([`is_fatal`](Self::is_fatal)), or the `Database` error of a panic in its session —
    /// as text.
    pub(crate) fn fatal_copy(&self) -> Option<Error> {
        match self {
            Error::SlotLost { slot, detail } => Some(Error::SlotLost {
                slot: slot.clone(),
                detail: detail.clone(),
            }),
            Error::Database { context, source } => Some(Error::Database {
                context: context.clone(),
                source: std::io::Error::other(source.to_string()).into(),
            }),
            _ => None,
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Database { source, .. } | Error::Broker { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// Operation names, as the CLI and configuration give them. Here rather than in
/// `operation.rs`, so that `Operation` stays a leaf the error type can name.
impl FromStr for Operation {
    type Err = Error;

    /// Parses `insert`, `update` or `delete`, in any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "insert" => Ok(Operation::Insert),
            "update" => Ok(Operation::Update),
            "delete" => Ok(Operation::Delete),
            _ => Err(Error::InvalidIdentifier {
                identifier: s.to_string(),
                reason: "not an operation (expected insert, update or delete)",
            }),
        }
    }
}

impl From<actix::MailboxError> for Error {
    fn from(_: actix::MailboxError) -> Self {
        Error::NotRunning
    }
}

/// `call`, with a panic inside it turned into the [`Error::Database`] of `doing`. A driver can
/// panic on a row it cannot convert (a NULL where a column was altered to allow one, a
/// changed column type): for work in an actor or a background task, whose panic would end
/// it without a word, the panic becomes that call's error.
pub(crate) async fn caught<T>(
    doing: impl FnOnce() -> String,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(call).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => Err(Error::db(
            doing(),
            std::io::Error::other(format!("panicked: {}", panic_message(&*panic))),
        )),
    }
}

/// What a caught panic said (its `&str` or `String` payload), for the error it becomes.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_object() {
        let e = Error::UnknownColumn {
            schema: "public".into(),
            table: "users".into(),
            column: "emial".into(),
            list: "extra_columns",
        };
        let s = e.to_string();
        assert!(s.contains("emial") && s.contains("users") && s.contains("extra_columns"));
        let e = Error::IdentifierTooLong {
            identifier: "x".repeat(70),
            kind: "channel",
            max: 63,
        };
        assert!(e.to_string().contains("70 bytes"));
    }

    #[test]
    fn lock_timeouts_name_the_object_and_the_holders() {
        let e = |pids: Vec<u64>| Error::LockTimeout {
            object: "public.t".into(),
            holder_pids: pids,
            waited: std::time::Duration::from_millis(1500),
        };
        assert_eq!(
            e(vec![42]).to_string(),
            "gave up after 1.5 s (install_timeout) waiting for a lock on public.t, held by pid 42; \
             nothing was changed — retry once that transaction has ended, or raise install_timeout"
        );
        assert!(e(vec![7, 9]).to_string().contains("held by pids 7, 9;"));
        assert!(e(vec![])
            .to_string()
            .contains("held by a session the database does not name"));
    }
}
