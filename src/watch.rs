//! What to watch: the [`Watch`] builder users fill in, and its validation against the live
//! table description a dialect reads from the database catalog.
//!
//! Validation is split in two. [`Watch::precheck`] needs no database (names, lengths, option
//! combinations); [`resolve`] checks the watch against a [`TableInfo`] read from the catalog and
//! yields a [`ResolvedWatch`], from which a dialect generates its trigger. [`check_set`] then
//! rejects duplicate channels and reused labels across all watches of a notifier. Nothing is
//! installed until every watch has passed all three.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::event::Channel;
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
}

/// Prefix of the names statement-capture triggers use internally; a watched column may not
/// start with it under [`Capture::Statement`].
const RESERVED_PREFIX: &str = "_sqn_";

impl Watch {
    /// Watches `operation` on `table`. `table` may be schema-qualified (`"shop.orders"`);
    /// without a schema it is looked up in the database's default schema (`public` on
    /// PostgreSQL, `main` on SQLite, the URL's database on MySQL). Names are used exactly as
    /// given (case-sensitive, no quoting needed): `Watch::new("CamelCase", …)` watches the
    /// table created as `"CamelCase"`.
    pub fn new(table: impl Into<String>, operation: Operation) -> Self {
        let table = table.into();
        let (schema, table) = match table.split_once('.') {
            Some((schema, table)) => (Some(schema.to_string()), table.to_string()),
            None => (None, table),
        };
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

/// One column of a watched table, as read from the database catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// Position (0-based) in the table's primary key, if it is part of it.
    pub pk_position: Option<usize>,
    /// Whether the column's type has an equality operator (PostgreSQL's `json` has none, so it
    /// is compared as text in `trigger_columns` checks).
    pub has_equality: bool,
    /// The column's type as the catalog names it (PostgreSQL's `format_type`, SQLite's
    /// declared type, MySQL's `DATA_TYPE`); MySQL's triggers convert some types' values for
    /// the payload. Empty when unknown.
    pub data_type: String,
}

/// A watched table as read from the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Columns in table order.
    pub columns: Vec<ColumnInfo>,
}

impl TableInfo {
    fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The primary key columns in key order.
    pub fn primary_key(&self) -> Vec<String> {
        let mut pk: Vec<&ColumnInfo> = self
            .columns
            .iter()
            .filter(|c| c.pk_position.is_some())
            .collect();
        pk.sort_by_key(|c| c.pk_position);
        pk.into_iter().map(|c| c.name.clone()).collect()
    }
}

/// A watch validated against its table: everything a dialect needs to generate its trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedWatch {
    /// The channel description events will share.
    pub channel: Channel,
    /// UPDATE-only change columns, with whether their type has an equality operator.
    pub trigger_columns: Vec<(String, bool)>,
    /// The catalog type ([`ColumnInfo::data_type`]) of every column the payload carries.
    pub data_types: BTreeMap<String, String>,
    /// Whether oversized rows go to the overflow table.
    pub use_overflow_table: bool,
    /// How events travel.
    pub tier: Tier,
    /// How the trigger captures rows.
    pub capture: Capture,
}

impl ResolvedWatch {
    /// The trigger event (`INSERT`, `DELETE`, `UPDATE` or `UPDATE OF "a", "b"`) and, for
    /// `trigger_columns`, the condition "one of them really changed": `changed` renders the
    /// test for one quoted column (given whether its type has an equality operator) and the
    /// tests are OR-ed. Shared by the dialects' trigger generators.
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(crate) fn trigger_event(
        &self,
        changed: impl Fn(&str, bool) -> String,
    ) -> (String, Option<String>) {
        let keyword = self.channel.operation.sql_keyword();
        if self.trigger_columns.is_empty() {
            return (keyword.to_string(), None);
        }
        let quoted: Vec<String> = self
            .trigger_columns
            .iter()
            .map(|(c, _)| crate::sql::quote_ident(c))
            .collect();
        let tests: Vec<String> = quoted
            .iter()
            .zip(&self.trigger_columns)
            .map(|(q, (_, has_eq))| changed(q, *has_eq))
            .collect();
        (
            format!("{keyword} OF {}", quoted.join(", ")),
            Some(tests.join(" OR ")),
        )
    }
}

/// Validates `watch` against `table` (read from the catalog) and resolves its defaults.
pub fn resolve(watch: &Watch, table: &TableInfo) -> Result<ResolvedWatch> {
    let unknown = |column: &str, list| Error::UnknownColumn {
        schema: table.schema.clone(),
        table: table.table.clone(),
        column: column.to_string(),
        list,
    };
    let table_pk = table.primary_key();
    let key_columns = match &watch.primary_keys {
        Some(keys) => {
            for key in keys {
                let column = table
                    .column(key)
                    .ok_or_else(|| unknown(key, "primary_keys"))?;
                if !table_pk.is_empty() && column.pk_position.is_none() {
                    return Err(Error::NotPrimaryKey {
                        schema: table.schema.clone(),
                        table: table.table.clone(),
                        column: key.clone(),
                    });
                }
            }
            dedup(keys.iter().cloned())
        }
        None if table_pk.is_empty() => {
            return Err(Error::NoPrimaryKey {
                schema: table.schema.clone(),
                table: table.table.clone(),
            })
        }
        None => table_pk,
    };
    for column in &watch.extra_columns {
        table
            .column(column)
            .ok_or_else(|| unknown(column, "extra_columns"))?;
    }
    let extra_columns = dedup(
        watch
            .extra_columns
            .iter()
            .filter(|c| !key_columns.contains(c))
            .cloned(),
    );
    let mut trigger_columns = Vec::new();
    for name in dedup(watch.trigger_columns.iter().cloned()) {
        let column = table
            .column(&name)
            .ok_or_else(|| unknown(&name, "trigger_columns"))?;
        trigger_columns.push((name, column.has_equality));
    }
    if watch.capture == Capture::Statement {
        let reserved = key_columns
            .iter()
            .chain(&extra_columns)
            .chain(trigger_columns.iter().map(|(c, _)| c))
            .find(|c| c.starts_with(RESERVED_PREFIX));
        if let Some(column) = reserved {
            return Err(Error::InvalidWatch {
                watch: watch.describe(),
                reason: format!(
                    "column {column:?}: names starting with {RESERVED_PREFIX:?} are reserved for \
                     the statement-capture trigger's own names; use Capture::Row for this table"
                ),
            });
        }
    }
    let data_types = key_columns
        .iter()
        .chain(&extra_columns)
        .filter_map(|name| Some((name.clone(), table.column(name)?.data_type.clone())))
        .collect();
    Ok(ResolvedWatch {
        channel: Channel {
            name: watch.channel_name(),
            schema: table.schema.clone(),
            table: table.table.clone(),
            operation: watch.operation,
            label: watch.channel_label.clone(),
            key_columns,
            extra_columns,
            tier: watch.tier,
            signed: false,
        },
        trigger_columns,
        data_types,
        use_overflow_table: watch.use_overflow_table,
        tier: watch.tier,
        capture: watch.capture,
    })
}

fn dedup(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
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

    fn users() -> TableInfo {
        let col = |name: &str, pk: Option<usize>, eq: bool| ColumnInfo {
            name: name.into(),
            pk_position: pk,
            has_equality: eq,
            data_type: "text".into(),
        };
        TableInfo {
            schema: "public".into(),
            table: "users".into(),
            columns: vec![
                col("tenant", Some(0), true),
                col("id", Some(1), true),
                col("email", None, true),
                col("doc", None, false),
            ],
        }
    }

    #[test]
    fn default_key_is_the_real_composite_primary_key() {
        let r = resolve(
            &Watch::new("users", Operation::Insert).extra_columns(["email", "id"]),
            &users(),
        )
        .unwrap();
        assert_eq!(r.channel.key_columns, ["tenant", "id"]);
        assert_eq!(r.channel.extra_columns, ["email"]);
        assert_eq!(r.channel.name, "sqlnotify_public_users_insert");
    }

    #[test]
    fn each_list_reports_its_unknown_column() {
        let t = users();
        for (watch, list) in [
            (
                Watch::new("users", Operation::Update).extra_columns(["nope"]),
                "extra_columns",
            ),
            (
                Watch::new("users", Operation::Update).trigger_columns(["nope"]),
                "trigger_columns",
            ),
            (
                Watch::new("users", Operation::Update).primary_keys(["nope"]),
                "primary_keys",
            ),
        ] {
            match resolve(&watch, &t) {
                Err(Error::UnknownColumn {
                    column, list: l, ..
                }) => assert_eq!((column.as_str(), l), ("nope", list)),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            resolve(&Watch::new("users", Operation::Update).primary_keys(["email"]), &t),
            Err(Error::NotPrimaryKey { column, .. }) if column == "email"
        ));
    }

    #[test]
    fn trigger_columns_remember_equality() {
        let r = resolve(
            &Watch::new("users", Operation::Update).trigger_columns(["email", "doc"]),
            &users(),
        )
        .unwrap();
        assert_eq!(
            r.trigger_columns,
            [("email".to_string(), true), ("doc".to_string(), false)]
        );
    }

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
