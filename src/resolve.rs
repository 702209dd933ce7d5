//! A watch resolved against its table: what a dialect reads from the database catalog
//! ([`TableInfo`], [`ColumnInfo`]), and the [`ResolvedWatch`] that [`resolve`] makes of a
//! [`Watch`] and its table — key columns defaulted, every named column checked — from which a
//! dialect generates its trigger.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::event::Channel;
use crate::operation::Operation;
use crate::payload::META_KEY;
use crate::tier::{Capture, Tier};
use crate::watch::Watch;

/// Prefix of the names statement-level triggers use internally; a watched column may not
/// start with it under [`Capture::Statement`] (under [`Capture::Row`], such a watch keeps a
/// row-level trigger).
const RESERVED_PREFIX: &str = "_sqn_";

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
    /// PostgreSQL: the schema of the type's `=` operator when it is not `pg_catalog` (an
    /// extension's type, say `hstore` installed in schema `ext`). The trigger runs with the
    /// writer's `search_path`, where that schema may be missing, so the comparison names it
    /// (`OPERATOR("ext".=)`). `None` for other dialects and for types without an equality.
    pub equality_schema: Option<String>,
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
    /// PostgreSQL: the table is partitioned, a partition, or a parent or child in an
    /// inheritance tree — a statement-level trigger on it would not see every write to it.
    /// False for the other dialects.
    pub in_hierarchy: bool,
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
    /// UPDATE and DELETE watches with [`Watch::old_values`]: the payload also carries the old
    /// values (and, on UPDATE, the changed columns). Always false for INSERT watches.
    pub old_values: bool,
    /// Every column of the table, in table order, with whether its type has an equality
    /// operator: what an UPDATE watch with `old_values` compares for its changed list.
    pub table_columns: Vec<(String, bool)>,
    /// The names of the context values the trigger captures ([`Watch::context`]), each once,
    /// in the order given; the dialect checks them ([`check_context`]).
    pub context: Vec<String>,
    /// [`TableInfo::in_hierarchy`] of the watched table.
    pub in_hierarchy: bool,
    /// [`ColumnInfo::equality_schema`] of the table's columns that have one, by column name.
    pub equality_schemas: BTreeMap<String, String>,
}

impl ResolvedWatch {
    /// A column a statement-level trigger would project whose name starts with the prefix of
    /// that trigger's own names (`_sqn_`): carried, compared by `trigger_columns`, or — an
    /// UPDATE with old values compares them all — any column of the table.
    pub(crate) fn reserved_column(&self) -> Option<&String> {
        let compared: Vec<&String> =
            if self.old_values && self.channel.operation == Operation::Update {
                self.table_columns.iter().map(|(c, _)| c).collect()
            } else {
                Vec::new()
            };
        self.channel
            .key_columns
            .iter()
            .chain(&self.channel.extra_columns)
            .chain(self.trigger_columns.iter().map(|(c, _)| c))
            .chain(compared)
            .find(|c| c.starts_with(RESERVED_PREFIX))
    }

    /// The trigger event (`INSERT`, `DELETE`, `UPDATE` or `UPDATE OF "a", "b"`) and, for
    /// `trigger_columns`, the condition "one of them really changed": `changed` renders the
    /// test for one column (given quoted, then by its name, and whether its type has an
    /// equality operator) and the tests are OR-ed. Shared by the dialects' trigger generators.
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(crate) fn trigger_event(
        &self,
        changed: impl Fn(&str, &str, bool) -> String,
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
            .map(|(q, (name, has_eq))| changed(q, name, *has_eq))
            .collect();
        (
            format!("{keyword} OF {}", quoted.join(", ")),
            Some(tests.join(" OR ")),
        )
    }
}

/// Refuses the first watch in `watches` with more than `max` context names, or with a name
/// that `known` says the dialect cannot capture (or, with `known` always false, any context at
/// all), with `available` saying what the dialect offers.
pub(crate) fn check_context(
    watches: &[ResolvedWatch],
    max: usize,
    known: impl Fn(&str) -> bool,
    available: &str,
) -> Result<()> {
    for w in watches {
        let refuse = |reason: String| Error::InvalidWatch {
            watch: format!(
                "{}.{} {}",
                w.channel.schema, w.channel.table, w.channel.operation
            ),
            reason,
        };
        if let Some(name) = w.context.iter().find(|n| !known(n)) {
            return Err(refuse(format!(
                "context {name:?} cannot be captured: {available}"
            )));
        }
        if w.context.len() > max {
            return Err(refuse(format!(
                "{} context names; at most {max} can be captured",
                w.context.len()
            )));
        }
    }
    Ok(())
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
    // The table's own key is not in the precheck's reach: a key column under the payload's
    // metadata name would make every event malformed (or, as `jsonb`, let the writer write
    // the metadata).
    if let Some(column) = key_columns.iter().find(|c| *c == META_KEY) {
        return Err(Error::InvalidIdentifier {
            identifier: format!("{}.{}.{column}", table.schema, table.table),
            reason: "this primary-key column's name is reserved by sqlnotify's payload format",
        });
    }
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
    let data_types = key_columns
        .iter()
        .chain(&extra_columns)
        .filter_map(|name| Some((name.clone(), table.column(name)?.data_type.clone())))
        .collect();
    let resolved = ResolvedWatch {
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
        old_values: watch.old_values && watch.operation != Operation::Insert,
        table_columns: table
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.has_equality))
            .collect(),
        context: dedup(watch.context.iter().cloned()),
        in_hierarchy: table.in_hierarchy,
        equality_schemas: table
            .columns
            .iter()
            .filter_map(|c| Some((c.name.clone(), c.equality_schema.clone()?)))
            .collect(),
    };
    if resolved.capture == Capture::Statement {
        if let Some(column) = resolved.reserved_column() {
            return Err(Error::InvalidWatch {
                watch: watch.describe(),
                reason: format!(
                    "column {column:?}: names starting with {RESERVED_PREFIX:?} are reserved for \
                     the statement-capture trigger's own names; use Capture::Row for this table"
                ),
            });
        }
    }
    Ok(resolved)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> TableInfo {
        let col = |name: &str, pk: Option<usize>, eq: bool| ColumnInfo {
            name: name.into(),
            pk_position: pk,
            has_equality: eq,
            equality_schema: None,
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
            in_hierarchy: false,
        }
    }

    #[test]
    fn a_primary_key_column_with_the_payload_s_reserved_name_is_refused() {
        let mut table = users();
        table.columns[1].name = META_KEY.into();
        let err = resolve(&Watch::new("users", Operation::Insert), &table).unwrap_err();
        match err {
            Error::InvalidIdentifier { identifier, .. } => {
                assert_eq!(identifier, format!("public.users.{META_KEY}"))
            }
            other => panic!("{other:?}"),
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
    fn context_names_count_once_and_unknown_ones_name_the_watch() {
        let r = resolve(
            &Watch::new("users", Operation::Insert).context(["b", "a.x", "b"]),
            &users(),
        )
        .unwrap();
        assert_eq!(r.context, ["b", "a.x"]);
        let known = |n: &str| n.contains('.');
        match check_context(std::slice::from_ref(&r), 5, known, "only dotted names") {
            Err(Error::InvalidWatch { watch, reason }) => {
                assert!(
                    watch.contains("users") && watch.contains("INSERT"),
                    "{watch}"
                );
                assert!(
                    reason.contains("\"b\"") && reason.contains("only dotted"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(check_context(std::slice::from_ref(&r), 5, |_| true, "").is_ok());
        assert!(matches!(
            check_context(&[r], 1, |_| true, ""),
            Err(Error::InvalidWatch { reason, .. }) if reason.contains("at most 1")
        ));
    }

    #[test]
    fn old_values_apply_to_updates_and_deletes_only() {
        for (op, expected) in [
            (Operation::Insert, false),
            (Operation::Update, true),
            (Operation::Delete, true),
        ] {
            let r = resolve(&Watch::new("users", op).old_values(true), &users()).unwrap();
            assert_eq!(r.old_values, expected, "{op}");
            assert_eq!(r.table_columns.len(), 4);
            assert_eq!(r.table_columns[3], ("doc".to_string(), false));
        }
        assert!(
            !resolve(&Watch::new("users", Operation::Update), &users())
                .unwrap()
                .old_values
        );
    }

    #[test]
    fn statement_capture_with_old_values_refuses_reserved_names_anywhere_in_the_table() {
        let mut t = users();
        t.columns[3].name = "_sqn_n".into();
        let w = |op| {
            Watch::new("users", op)
                .tier(Tier::Durable)
                .capture(Capture::Statement)
        };
        assert!(resolve(&w(Operation::Update), &t).is_ok());
        assert!(resolve(&w(Operation::Delete).old_values(true), &t).is_ok());
        assert!(matches!(
            resolve(&w(Operation::Update).old_values(true), &t),
            Err(Error::InvalidWatch { reason, .. }) if reason.contains("_sqn_n")
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
}
