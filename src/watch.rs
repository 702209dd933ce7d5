//! What to watch: the [`Watch`] builder users fill in, and its checks that need no database.
//!
//! Validation comes in three steps. [`Watch::precheck`] needs no database (names, lengths,
//! option combinations); [`check_set`] rejects duplicate channels and reused labels across all
//! watches of a notifier; `resolve.rs` then checks each watch against the table description a
//! dialect reads from the database catalog. Nothing is installed until every watch has passed
//! all three.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::operation::Operation;
use crate::payload::META_KEY;
use crate::tier::{Capture, Tier};

/// Longest identifier (channel, trigger, function name) PostgreSQL accepts, in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// Schema assumed for a table named without one, before the dialect fills in its own default
/// (`public` on PostgreSQL, `main` on SQLite, the URL's database on MySQL).
const DEFAULT_SCHEMA: &str = "public";

/// One table + operation to watch, with the columns its events carry.
///
/// ```
/// use sqlnotify::{Operation, Watch};
///
/// let w = Watch::new("users", Operation::Update)
///     .extra_columns(["email", "name"])
///     .trigger_columns(["email"]); // only when email really changed
/// let composite = Watch::new("shop.order_items", Operation::Insert)
///     .primary_keys(["order_id", "item_id"]);
/// let labelled = Watch::new("users", Operation::Insert).channel_label("new_registrations");
/// # let _ = (w, composite, labelled);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub(crate) schema: Option<String>,
    pub(crate) table: String,
    pub(crate) operation: Operation,
    pub(crate) extra_columns: Vec<String>,
    pub(crate) trigger_columns: Vec<String>,
    pub(crate) primary_keys: Option<Vec<String>>,
    pub(crate) channel_label: Option<String>,
    pub(crate) use_overflow_table: bool,
    pub(crate) tier: Tier,
    pub(crate) capture: Capture,
    pub(crate) old_values: bool,
    pub(crate) context: Vec<String>,
}

impl Watch {
    /// Watches `operation` on `table`. `table` may be schema-qualified (`"shop.orders"`);
    /// without a schema it is looked up in the database's default schema (`public` on
    /// PostgreSQL, `main` on SQLite, the URL's database on MySQL). Names are used exactly as
    /// given (case-sensitive, no quoting needed): `Watch::new("CamelCase", …)` watches the
    /// table created as `"CamelCase"`.
    pub fn new(table: impl Into<String>, operation: Operation) -> Self {
        let (schema, table) = crate::sql::split_table(table.into());
        Watch {
            schema,
            table,
            operation,
            extra_columns: Vec::new(),
            trigger_columns: Vec::new(),
            primary_keys: None,
            channel_label: None,
            use_overflow_table: true,
            tier: Tier::Notify,
            capture: Capture::Row,
            old_values: false,
            context: Vec::new(),
        }
    }

    /// Sets the schema explicitly (for table names that contain a dot). Default: the schema
    /// given in [`Watch::new`], else `public`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Columns to carry in each event besides the key. Default: none.
    pub fn extra_columns<I: IntoIterator<Item = S>, S: Into<String>>(mut self, columns: I) -> Self {
        self.extra_columns = columns.into_iter().map(Into::into).collect();
        self
    }

    /// UPDATE watches only: fire only when one of these columns really changed
    /// (`IS DISTINCT FROM`). Default: fire on every update.
    pub fn trigger_columns<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        columns: I,
    ) -> Self {
        self.trigger_columns = columns.into_iter().map(Into::into).collect();
        self
    }

    /// The key columns events carry as their `id`, in this order. Default: the table's real
    /// primary key read from the catalog (every column of a composite key, in key order).
    /// Each entry must belong to the primary key (any column, if the table has none).
    pub fn primary_keys<I: IntoIterator<Item = S>, S: Into<String>>(mut self, columns: I) -> Self {
        self.primary_keys = Some(columns.into_iter().map(Into::into).collect());
        self
    }

    /// Sends this watch's events on the channel `sqlnotify_{label}` instead of
    /// `sqlnotify_{schema}_{table}_{operation}`. A label names exactly one table and operation.
    pub fn channel_label(mut self, label: impl Into<String>) -> Self {
        self.channel_label = Some(label.into());
        self
    }

    /// Whether a row too large for one notification is stored in the overflow table (and the
    /// event resolved from it). When false such an event carries only the key and is marked
    /// [`truncated`](crate::ChangeEvent::is_truncated). Either way the user's write succeeds.
    /// Default: true.
    pub fn use_overflow_table(mut self, yes: bool) -> Self {
        self.use_overflow_table = yes;
        self
    }

    /// Fills in `schema` when the watch names none.
    pub(crate) fn or_schema(mut self, schema: &str) -> Self {
        self.schema.get_or_insert_with(|| schema.to_string());
        self
    }

    /// How events travel (PostgreSQL): [`Tier::Notify`] (default), [`Tier::Durable`] or
    /// [`Tier::Poll`]. Ignored on SQLite and MySQL, which always journal.
    pub fn tier(mut self, tier: Tier) -> Self {
        self.tier = tier;
        self
    }

    /// How the trigger captures rows: [`Capture::Row`] (default) or [`Capture::Statement`]
    /// (one journal row per statement; needs [`Tier::Durable`] or [`Tier::Poll`]).
    ///
    /// ```
    /// use sqlnotify::{Capture, Operation, Tier, Watch};
    ///
    /// // A bulk-loaded table: one journal row and one wake-up per INSERT statement.
    /// let w = Watch::new("measurements", Operation::Insert)
    ///     .tier(Tier::Durable)
    ///     .capture(Capture::Statement);
    /// # let _ = w;
    /// ```
    pub fn capture(mut self, capture: Capture) -> Self {
        self.capture = capture;
        self
    }

    /// UPDATE and DELETE watches: also carry the row's *old* values of the watch's columns (key
    /// and extra columns), read with [`ChangeEvent::old`](crate::ChangeEvent::old), and on
    /// UPDATE the names of the table's columns whose values really changed
    /// ([`ChangeEvent::changed_columns`](crate::ChangeEvent::changed_columns), `IS DISTINCT
    /// FROM` semantics: NULL to a value is a change, NULL to NULL is not). On INSERT it changes
    /// nothing (there is no old row). Part of the watch's definition: turning it on or off is a
    /// changed watch (drift, or a reinstall with `revoke_on_model_change`). With
    /// [`Capture::Statement`] on PostgreSQL each new row is paired with its old row by position
    /// in the transition tables (so statements that change keys pair correctly). Default: false.
    ///
    /// How each dialect compares values for the changed list: PostgreSQL with the column
    /// type's `IS DISTINCT FROM` (`jsonb` as values; `json` and other types without an equality
    /// operator as their text), SQLite with `IS NOT` (JSON held in TEXT compares as text),
    /// MySQL / MariaDB by binary image (`<=>` of `CAST(… AS BINARY)`: MySQL's `JSON` type
    /// compares its normalised form, so as values; MariaDB's JSON is text and compares as text).
    ///
    /// ```
    /// use sqlnotify::{Operation, Watch};
    ///
    /// let w = Watch::new("users", Operation::Update)
    ///     .extra_columns(["email"])
    ///     .old_values(true);
    /// # let _ = w;
    /// ```
    pub fn old_values(mut self, yes: bool) -> Self {
        self.old_values = yes;
        self
    }

    /// Context to capture with each event: the names of values the trigger reads from the
    /// *writer's* session when the row changes, carried in the event
    /// ([`ChangeEvent::context`](crate::ChangeEvent::context), and `"context"` in
    /// [`to_record`](crate::ChangeEvent::to_record)) — who made the change. A value that is not
    /// set is `null`, never an error in the user's write. Names a dialect does not offer fail
    /// [`start`](crate::NotifierBuilder::start) with [`Error::InvalidWatch`] naming the watch.
    /// Part of the watch's definition (changing the list is drift, or a reinstall with
    /// `revoke_on_model_change`). Repeated names count once. Default: none.
    ///
    /// What each dialect offers:
    ///
    /// * **PostgreSQL**: `current_user` (the role the trigger runs as: the writer's, as
    ///   sqlnotify's trigger functions are not `SECURITY DEFINER`), `session_user` (the role
    ///   that logged in), `application_name`, `client_addr` (`inet_client_addr()`, `null` over
    ///   a Unix socket), `backend_pid` (a number), and any custom setting whose name has a dot,
    ///   such as `app.user_id`, which the application sets with `SET LOCAL app.user_id = '42'`
    ///   (or `set_config('app.user_id', '42', true)`) in the writing transaction. Custom
    ///   settings are text, read with `current_setting(name, true)`; an unset setting — and an
    ///   empty one, which is what PostgreSQL reports for a setting once set in the session and
    ///   gone since — is `null`. Statement capture and rows that overflow carry the values too.
    /// * **MySQL / MariaDB**: `current_user` (`CURRENT_USER()`: inside a trigger, the account
    ///   the trigger runs as — its `DEFINER` — not the writer), `user` (`USER()`: the writer's
    ///   `user@host` as it connected), `connection_id` (a number) and user variables named
    ///   with `@`, such as `@app_user_id`, which the application sets with
    ///   `SET @app_user_id = 42` in the writer's session (numbers stay numbers; unset is
    ///   `null`).
    /// * **SQLite** has no server session: the application sets per-connection values with
    ///   `sqlite_context::set` (feature `sqlite`) on the connection it writes with,
    ///   under any non-empty name; a name not set on the writing connection is `null`.
    ///
    /// ```
    /// use sqlnotify::{Operation, Watch};
    ///
    /// // PostgreSQL: the application runs `SET LOCAL app.user_id = '42'` before it writes
    /// let w = Watch::new("orders", Operation::Update).context(["app.user_id", "application_name"]);
    /// # let _ = w;
    /// ```
    pub fn context<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.context = names.into_iter().map(Into::into).collect();
        self
    }

    /// The table's schema (given or default).
    pub fn schema_name(&self) -> &str {
        self.schema.as_deref().unwrap_or(DEFAULT_SCHEMA)
    }

    /// The channel this watch's events use (`sqlnotify_{label}` or
    /// `sqlnotify_{schema}_{table}_{operation}`).
    pub fn channel_name(&self) -> String {
        match &self.channel_label {
            Some(label) => format!("sqlnotify_{label}"),
            None => format!(
                "sqlnotify_{}_{}_{}",
                self.schema_name(),
                self.table,
                self.operation.as_str()
            ),
        }
    }

    /// `schema.table OPERATION`, for messages.
    pub(crate) fn describe(&self) -> String {
        format!("{}.{} {}", self.schema_name(), self.table, self.operation)
    }

    /// Checks everything that needs no database: names, label, lengths, option combinations.
    pub fn precheck(&self) -> Result<()> {
        check_name(self.schema_name())?;
        check_name(&self.table)?;
        if let Some(label) = &self.channel_label {
            check_name(label)?;
        }
        for column in self
            .extra_columns
            .iter()
            .chain(&self.trigger_columns)
            .chain(self.primary_keys.iter().flatten())
        {
            check_name(column)?;
            if column == META_KEY {
                return Err(Error::InvalidIdentifier {
                    identifier: column.clone(),
                    reason: "this column name is reserved by sqlnotify's payload format",
                });
            }
        }
        if !self.trigger_columns.is_empty() && self.operation != Operation::Update {
            return Err(Error::TriggerColumnsNotAllowed {
                table: format!("{}.{}", self.schema_name(), self.table),
                operation: self.operation,
            });
        }
        if matches!(&self.primary_keys, Some(keys) if keys.is_empty()) {
            return Err(Error::InvalidIdentifier {
                identifier: self.describe(),
                reason: "primary_keys must name at least one column",
            });
        }
        let channel = self.channel_name();
        if channel.len() > MAX_IDENTIFIER_BYTES {
            return Err(Error::IdentifierTooLong {
                identifier: channel,
                kind: "channel",
                max: MAX_IDENTIFIER_BYTES,
            });
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "names must not be empty"
    } else if name.contains('\0') {
        "names must not contain NUL characters"
    } else {
        return Ok(());
    };
    Err(Error::InvalidIdentifier {
        identifier: name.to_string(),
        reason,
    })
}

/// Rejects two watches on one channel and one label on different tables or operations.
pub fn check_set(watches: &[Watch]) -> Result<()> {
    let mut channels: HashMap<String, &Watch> = HashMap::new();
    let mut labels: HashMap<&str, &Watch> = HashMap::new();
    for watch in watches {
        if let Some(label) = &watch.channel_label {
            if let Some(first) = labels.get(label.as_str()) {
                if (first.schema_name(), &first.table, first.operation)
                    != (watch.schema_name(), &watch.table, watch.operation)
                {
                    return Err(Error::LabelReused {
                        label: label.clone(),
                        first: first.describe(),
                        second: watch.describe(),
                    });
                }
            }
            labels.insert(label, watch);
        }
        let channel = watch.channel_name();
        if let Some(first) = channels.get(&channel) {
            return Err(Error::DuplicateWatch {
                channel,
                first: first.describe(),
                second: watch.describe(),
            });
        }
        channels.insert(channel, watch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prechecks() {
        assert!(matches!(
            Watch::new("users", Operation::Insert)
                .trigger_columns(["email"])
                .precheck(),
            Err(Error::TriggerColumnsNotAllowed { .. })
        ));
        assert!(matches!(
            Watch::new("t".repeat(60), Operation::Insert).precheck(),
            Err(Error::IdentifierTooLong { .. })
        ));
        assert!(matches!(
            Watch::new("users", Operation::Insert)
                .channel_label("")
                .precheck(),
            Err(Error::InvalidIdentifier { .. })
        ));
        assert!(matches!(
            Watch::new("users", Operation::Insert)
                .extra_columns([META_KEY])
                .precheck(),
            Err(Error::InvalidIdentifier { .. })
        ));
        assert!(Watch::new("users", Operation::Insert)
            .channel_label("o'brien")
            .precheck()
            .is_ok());
        assert!(Watch::new("users", Operation::Insert)
            .old_values(true)
            .precheck()
            .is_ok());
        let w = Watch::new("shop.orders", Operation::Delete);
        assert_eq!(w.channel_name(), "sqlnotify_shop_orders_delete");
    }

    #[test]
    fn duplicate_channels_and_reused_labels() {
        let a = Watch::new("users", Operation::Insert);
        assert!(matches!(
            check_set(&[a.clone(), a.clone()]),
            Err(Error::DuplicateWatch { .. })
        ));
        let l1 = Watch::new("users", Operation::Insert).channel_label("x");
        let l2 = Watch::new("users", Operation::Delete).channel_label("x");
        assert!(
            matches!(check_set(&[l1.clone(), l2]), Err(Error::LabelReused { label, .. }) if label == "x")
        );
        assert!(check_set(&[a, l1]).is_ok());
    }
}
