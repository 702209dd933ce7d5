//! What a subscriber asks for: a table + operation (+ channel label) and column filters.

use std::fmt;

use std::sync::Arc;

use crate::event::{Channel, Channels};
use crate::filter::Filter;
use crate::operation::Operation;

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

/// What happens when a subscriber cannot keep up and its buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Deliver every event: when the buffer is full the whole notifier waits (the pipeline's
    /// in-flight budget runs out, the listener stops reading; PostgreSQL holds notifications in
    /// its queue, journals pause their cursor). Memory stays bounded; other subscribers wait too.
    /// The listener's connection is kept meanwhile, except that PostgreSQL ends a connection
    /// holding a named consumer's lease once its notify-tier notifications wait for more than
    /// 4 s (README, "Consumer groups"): those channels then report a
    /// [`Status::Gap`](crate::Status::Gap).
    #[default]
    Wait,
    /// Drop the oldest buffered event to make room; the subscriber is told with a
    /// [`Status::Lagged`](crate::Status::Lagged). Never slows anyone else down, within its
    /// buffer: the events waiting for it hold in-flight budget, so subscribers that take
    /// nothing at all could together hold the whole budget (README, "Subscribing").
    DropOldest,
    /// Keep only the newest buffered event per row key (then drop the oldest if still full):
    /// right for "latest state" consumers such as caches. Replacements count as lag. Its
    /// waiting events hold in-flight budget, as under [`DropOldest`](Self::DropOldest).
    KeepLatestPerKey,
}

/// Default per-subscriber buffer, in events.
pub const DEFAULT_BUFFER: usize = 1024;

/// The largest buffer (and snapshot chunk) any option takes, in events or rows: a larger
/// value is taken as this one, so that no setting makes a queue allocate or reserve more than
/// memory holds.
pub const MAX_BUFFER: usize = 1 << 16;

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
    pub(crate) policy: OverflowPolicy,
    pub(crate) buffer: usize,
}

impl Subscription {
    /// The channel of `channels` this subscription selects, once its filters are checked
    /// against the columns that channel carries: [`Error::NotWatched`](crate::Error::NotWatched)
    /// when no watch matches its table, operation and label,
    /// [`Error::UnknownFilterColumn`](crate::Error::UnknownFilterColumn) when a filter names a
    /// column the channel does not carry. What the registry checks on every subscribe, and
    /// `start()` on the builder's subscriptions before it installs anything.
    pub(crate) fn channel_in<'a>(&self, channels: &'a Channels) -> crate::Result<&'a Arc<Channel>> {
        let channel = channels.find(
            self.schema.as_deref(),
            &self.table,
            self.operation,
            self.label.as_deref(),
        )?;
        crate::filter::check_columns(channel, &self.filters)?;
        Ok(channel)
    }

    /// Events of `operation` on `table` (`"schema.table"`, or a table in the database's default
    /// schema), from the watch without a channel label.
    pub fn new(table: impl Into<String>, operation: Operation) -> Self {
        let (schema, table) = crate::sql::split_table(table.into());
        Subscription {
            schema,
            table,
            operation,
            label: None,
            filters: Vec::new(),
            policy: OverflowPolicy::default(),
            buffer: DEFAULT_BUFFER,
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

    /// What to do when this subscriber falls behind. Default: [`OverflowPolicy::Wait`].
    pub fn policy(mut self, policy: OverflowPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many events may wait for this subscriber (besides those already in its actor's
    /// mailbox) before its policy applies. Default: 1024; from 1 to [`MAX_BUFFER`].
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events.clamp(1, MAX_BUFFER);
        self
    }

    /// The filters.
    pub fn filters(&self) -> &[Filter] {
        &self.filters
    }
}
