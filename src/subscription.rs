//! What a subscriber asks for: a table + operation (+ channel label) and column filters.

use std::fmt;

use crate::event::Operation;
use crate::filter::Filter;

/// Identifies a subscription, for [`Notifier::unsubscribe`](crate::Notifier::unsubscribe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub(crate) u64);

impl SubscriptionId {
    /// The raw number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The events a subscriber wants: one watched table and operation (and channel label, when
/// the watch has one), narrowed by filters that must all match.
///
/// ```
/// use sqlnotify::{Filter, Operation, Subscription};
///
/// let s = Subscription::new("users", Operation::Update)
///     .filter(Filter::eq("id", 42))
///     .filter(Filter::ne("email", "root@localhost"));
/// # let _ = s;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub(crate) schema: Option<String>,
    pub(crate) table: String,
    pub(crate) operation: Operation,
    pub(crate) label: Option<String>,
    pub(crate) filters: Vec<Filter>,
}

impl Subscription {
    /// Events of `operation` on `table` (`"schema.table"`, or a table in the database's default
    /// schema), from the watch without a channel label.
    pub fn new(table: impl Into<String>, operation: Operation) -> Self {
        let table = table.into();
        let (schema, table) = match table.split_once('.') {
            Some((schema, table)) => (Some(schema.to_string()), table.to_string()),
            None => (None, table),
        };
        Subscription {
            schema,
            table,
            operation,
            label: None,
            filters: Vec::new(),
        }
    }

    /// Sets the schema explicitly (for table names that contain a dot).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Events from the watch with this channel label instead.
    pub fn channel_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Adds a filter; all filters must match (AND).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filters.push(filter);
        self
    }

    /// The filters.
    pub fn filters(&self) -> &[Filter] {
        &self.filters
    }
}
