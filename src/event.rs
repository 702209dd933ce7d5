//! The values that flow through the pipeline: [`RawNotification`] (what a listener read, before
//! decoding), [`ChangeEvent`] (what subscribers receive), the row [`Key`], and [`Channel`], the
//! static description of one watched channel that events share.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::operation::Operation;
use crate::payload::{Change, Decoded};
use crate::read_point::ReadPoint;
use crate::tier::Tier;

/// A notification as a listener read it from the database, before decoding.
///
/// Dialects convert their driver's type to this at the edge, so everything after the listener
/// can be driven (and tested) without a database.
#[derive(Debug, Clone, PartialEq)]
pub struct RawNotification {
    /// The channel it arrived on (shared: a listener hands out one name per channel rather
    /// than a copy per notification).
    pub channel: Arc<str>,
    /// The payload text (JSON written by a sqlnotify trigger, or anything someone else sent).
    pub payload: String,
    /// When the listener read it.
    pub received_at: SystemTime,
    /// Position in the dialect's journal, where there is one (SQLite); `None` for NOTIFY.
    pub sequence: Option<i64>,
    /// How many events it carries: 1, or for a [`Capture::Statement`](crate::Capture)
    /// journal row the number of rows in it. The listener takes this many units of the
    /// in-flight budget for it.
    pub events: u32,
    /// The id of the writer's transaction, where the journal records it (PostgreSQL's durable
    /// and poll tiers); `None` otherwise (a payload may carry it instead).
    pub transaction: Option<u64>,
    /// Whether this is the last journal row of its transaction among the rows the listener
    /// read (PostgreSQL's durable and poll tiers); `None` where that is not known.
    pub last_in_transaction: Option<bool>,
    /// Where the row stands in the journal read that delivered it (PostgreSQL's durable and
    /// poll tiers), for resuming a stream right after it; `None` elsewhere.
    pub read_point: Option<ReadPoint>,
    /// The event's parts, already decoded, where the listener read them from something other
    /// than a payload (the logical tier's pgoutput); `payload` is then empty and the decoder
    /// takes these as they are.
    pub(crate) decoded: Option<Box<Decoded>>,
    /// Its index among the notifications that share its `sequence` (the logical tier: rows
    /// of one WAL record, as a `COPY` writes them, or of one change fed to several channels);
    /// 0 elsewhere. Becomes the event's [`part`](ChangeEvent::part).
    pub(crate) part: u32,
    /// Size of what `decoded` was read from (the logical tier's message), in bytes; 0 when
    /// there is a payload instead.
    pub(crate) read_bytes: usize,
    /// Units of in-flight budget the listener took for it beyond one per event, for its size
    /// (`pipeline::Weight`); the decoder passes them on to its events or gives them back.
    pub(crate) extra_units: u32,
}

impl RawNotification {
    /// A notification received now.
    pub fn new(channel: impl Into<Arc<str>>, payload: impl Into<String>) -> Self {
        RawNotification {
            channel: channel.into(),
            payload: payload.into(),
            received_at: SystemTime::now(),
            sequence: None,
            events: 1,
            transaction: None,
            last_in_transaction: None,
            read_point: None,
            decoded: None,
            part: 0,
            read_bytes: 0,
            extra_units: 0,
        }
    }

    /// Bytes its payload holds, for the in-flight budget: the payload's length, or the size
    /// of what a listener decoded its parts from.
    pub(crate) fn bytes(&self) -> usize {
        self.payload.len().max(self.read_bytes)
    }

    /// The same notification, at journal position `sequence`.
    pub fn with_sequence(mut self, sequence: i64) -> Self {
        self.sequence = Some(sequence);
        self
    }

    /// The same notification, from transaction `id`; `last` says whether it is the last
    /// journal row of that transaction.
    pub fn with_transaction(mut self, id: u64, last: bool) -> Self {
        self.transaction = Some(id);
        self.last_in_transaction = Some(last);
        self
    }
}

/// One watched channel: which table and operation it reports and which columns its payload
/// carries. Built from a validated watch; shared (behind an `Arc`) by every event on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub(crate) name: String,
    pub(crate) schema: String,
    pub(crate) table: String,
    pub(crate) operation: Operation,
    pub(crate) label: Option<String>,
    pub(crate) key_columns: Vec<String>,
    pub(crate) extra_columns: Vec<String>,
    pub(crate) tier: Tier,
    /// PostgreSQL notify tier: payloads carry an HMAC the listener verifies.
    pub(crate) signed: bool,
}

impl Channel {
    /// The channel name, e.g. `sqlnotify_public_users_insert` or `sqlnotify_new_registrations`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The watched table's schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }
    /// The watched table.
    pub fn table(&self) -> &str {
        &self.table
    }
    /// The operation reported on this channel.
    pub fn operation(&self) -> Operation {
        self.operation
    }
    /// The channel label, when the watch has one.
    pub fn label(&self) -> Option<&str> {
        self.label.as_deref()
    }
    /// The key columns, in declared order.
    pub fn key_columns(&self) -> &[String] {
        &self.key_columns
    }
    /// The extra columns the payload carries.
    pub fn extra_columns(&self) -> &[String] {
        &self.extra_columns
    }
    /// How events travel on this channel.
    pub fn tier(&self) -> Tier {
        self.tier
    }
    /// Every column the payload carries: the key columns, then the extra columns.
    pub(crate) fn payload_columns(&self) -> Vec<&String> {
        self.key_columns.iter().chain(&self.extra_columns).collect()
    }
    /// Whether the payload carries `column` (as a key or an extra column).
    pub fn carries(&self, column: &str) -> bool {
        self.key_columns.iter().any(|c| c == column)
            || self.extra_columns.iter().any(|c| c == column)
    }
}

/// The key of the changed row: one value for a single-column key, several (in the declared
/// key order) for a composite key.
///
/// `Display` writes a single key as its value — a string without quotes, anything else as
/// JSON — and a composite key as a tuple of JSON values:
///
/// ```
/// use serde_json::json;
/// use sqlnotify::Key;
///
/// assert_eq!(Key::Single(json!(42)).to_string(), "42");
/// assert_eq!(Key::Single(json!("alice")).to_string(), "alice");
/// assert_eq!(Key::Composite(vec![json!(1), json!("a")]).to_string(), r#"(1, "a")"#);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    /// A single-column key.
    Single(Value),
    /// A composite key, values in declared key order.
    Composite(Vec<Value>),
}

impl Key {
    /// The key's values, in declared order (one element for a single key).
    pub fn values(&self) -> &[Value] {
        match self {
            Key::Single(v) => std::slice::from_ref(v),
            Key::Composite(vs) => vs,
        }
    }

    /// The single key value as an `i64`, when the key is one integer.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Key::Single(v) => v.as_i64(),
            Key::Composite(_) => None,
        }
    }

    /// The single key value as a string slice, when the key is one string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Key::Single(v) => v.as_str(),
            Key::Composite(_) => None,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Single(Value::String(s)) => f.write_str(s),
            Key::Single(v) => write!(f, "{v}"),
            Key::Composite(values) => {
                f.write_str("(")?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// A row change (or a custom notification) delivered to subscribers.
///
/// Cheap to clone: the contents are shared, so routing one event to many subscribers does not
/// copy its columns.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    inner: Arc<EventInner>,
}

/// An event's extra columns. The decoder keeps the values of its channel's extra columns by
/// position, allocating no column name per event; any other member a payload carries, and
/// every column of an event made from a map, is kept by name. The name → value map
/// [`ChangeEvent::extra_columns`] returns is built the first time it is asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Extra {
    /// The values of the channel's extra columns, in its order (`None`: not carried); empty,
    /// or as long as the channel's list.
    pub known: Vec<Option<Value>>,
    /// Every other carried column.
    pub others: Map<String, Value>,
}

impl From<Map<String, Value>> for Extra {
    fn from(others: Map<String, Value>) -> Self {
        Extra {
            known: Vec::new(),
            others,
        }
    }
}

impl Extra {
    /// Every carried column with its name (`names`: the channel's extra columns), unordered.
    fn pairs<'a>(&'a self, names: &'a [String]) -> impl Iterator<Item = (&'a str, &'a Value)> {
        names
            .iter()
            .zip(&self.known)
            .filter_map(|(name, value)| Some((name.as_str(), value.as_ref()?)))
            .chain(
                self.others
                    .iter()
                    .map(|(name, value)| (name.as_str(), value)),
            )
    }

    /// Whether it holds nothing by position (then `others` is every carried column).
    fn by_name_only(&self) -> bool {
        self.known.iter().all(Option::is_none)
    }
}

#[derive(Debug)]
struct EventInner {
    channel: Arc<Channel>,
    id: Key,
    extra: Extra,
    /// `extra` as a map by name, once asked for (when `extra` holds columns by position).
    extra_map: OnceLock<Map<String, Value>>,
    timestamp: SystemTime,
    truncated: bool,
    sequence: Option<i64>,
    /// How many units the listener forwarded before this event's notification, plus its row
    /// index in a statement-capture journal row (see `src/holds.rs`).
    ordinal: u64,
    /// Its row index in a statement-capture journal row, or [`RawNotification::part`].
    part: u32,
    /// Old values and changed columns ([`Watch::old_values`](crate::Watch::old_values)).
    change: Change,
    /// The writer's transaction id (from the journal row, else from the payload).
    transaction: Option<u64>,
    /// Whether it is the last event of its transaction (journal tiers that know it).
    last_in_transaction: Option<bool>,
    /// Where its journal row stands in the read that delivered it.
    read_point: Option<ReadPoint>,
    /// A row of a snapshot rather than a change.
    snapshot: bool,
    /// The last row a snapshot (or backfill) read hands over.
    snapshot_end: bool,
    /// Units of in-flight budget it carries beyond its own one, for its payload's size
    /// (`pipeline::Weight`).
    extra_units: u32,
}

impl ChangeEvent {
    pub(crate) fn new(
        channel: Arc<Channel>,
        id: Key,
        extra: impl Into<Extra>,
        raw: &RawNotification,
        truncated: bool,
    ) -> Self {
        ChangeEvent {
            inner: Arc::new(EventInner {
                channel,
                id,
                extra: extra.into(),
                extra_map: OnceLock::new(),
                timestamp: raw.received_at,
                truncated,
                sequence: raw.sequence,
                ordinal: 0,
                part: raw.part,
                change: Change::default(),
                transaction: raw.transaction,
                last_in_transaction: raw.last_in_transaction,
                read_point: raw.read_point.clone(),
                snapshot: false,
                snapshot_end: false,
                extra_units: 0,
            }),
        }
    }

    /// The same (just built) event, carrying the old values and changed columns of `change`
    /// (and its transaction id, unless the journal row gave one).
    pub(crate) fn with_change(mut self, change: Change) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            if inner.transaction.is_none() {
                inner.transaction = change.transaction;
            }
            inner.change = change;
        }
        self
    }

    /// The same (just built) event, as a row of a snapshot.
    pub(crate) fn into_snapshot(mut self) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.snapshot = true;
        }
        self
    }

    /// Marks the (just built) snapshot event as the last one its read hands over.
    pub(crate) fn set_ends_snapshot(&mut self) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.snapshot_end = true;
        }
    }

    /// Sets the (just built) event's last-of-transaction mark to `last` (the rows
    /// of a statement-capture journal row share the row's mark; only the last one ends it).
    pub(crate) fn set_last_in_transaction(&mut self, last: bool) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            if inner.last_in_transaction.is_some() {
                inner.last_in_transaction = Some(last);
            }
        }
    }

    /// The same (just built) event, `part` rows into a notification that starts at `ordinal`.
    pub(crate) fn placed(mut self, ordinal: u64, part: u32) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.ordinal = ordinal + u64::from(part);
            inner.part = part;
        }
        self
    }

    /// The same (just built) event, carrying `extra` units of in-flight budget beyond its
    /// own one (its payload's weight: `pipeline::Weight`).
    pub(crate) fn weighing(mut self, extra: u32) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.extra_units = extra;
        }
        self
    }

    /// Units of in-flight budget the event carries: one, and its payload's weight.
    pub(crate) fn units(&self) -> usize {
        1 + self.inner.extra_units as usize
    }

    /// The same (just built) event, the one event of a notification that starts at `ordinal`
    /// (its part stays the notification's own: see [`RawNotification::part`]).
    pub(crate) fn at(mut self, ordinal: u64) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.ordinal = ordinal;
        }
        self
    }

    /// The same change with its key only, marked truncated: what is published of it where
    /// the whole event does not fit in a message (the relay). Its position, transaction and
    /// marks stay.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) fn key_only(&self) -> ChangeEvent {
        let inner = &*self.inner;
        ChangeEvent {
            inner: Arc::new(EventInner {
                channel: inner.channel.clone(),
                id: inner.id.clone(),
                extra: Extra::default(),
                extra_map: OnceLock::new(),
                timestamp: inner.timestamp,
                truncated: true,
                sequence: inner.sequence,
                ordinal: inner.ordinal,
                part: inner.part,
                change: Change::default(),
                transaction: inner.transaction,
                last_in_transaction: inner.last_in_transaction,
                read_point: inner.read_point.clone(),
                snapshot: inner.snapshot,
                snapshot_end: inner.snapshot_end,
                extra_units: 0,
            }),
        }
    }

    /// See `EventInner::ordinal`.
    pub(crate) fn ordinal(&self) -> u64 {
        self.inner.ordinal
    }

    /// Its row index in a statement-capture journal row; on the logical tier, its index among
    /// the rows that share its WAL position (a `COPY` writes up to 1,000 rows as one WAL
    /// record, and one change may feed several channels); 0 otherwise. With
    /// [`sequence`](Self::sequence), what tells one change from every other.
    pub fn part(&self) -> u32 {
        self.inner.part
    }

    /// The channel the event arrived on.
    pub fn channel(&self) -> &str {
        &self.inner.channel.name
    }
    /// The channel the event arrived on, shared.
    pub(crate) fn channel_arc(&self) -> &Arc<Channel> {
        &self.inner.channel
    }
    /// The description of the channel (table, operation, carried columns).
    pub fn channel_info(&self) -> &Channel {
        &self.inner.channel
    }
    /// The table's schema.
    pub fn schema(&self) -> &str {
        &self.inner.channel.schema
    }
    /// The table.
    pub fn table(&self) -> &str {
        &self.inner.channel.table
    }
    /// The operation.
    pub fn operation(&self) -> Operation {
        self.inner.channel.operation
    }
    /// The changed row's key (declared key order for composite keys).
    pub fn id(&self) -> &Key {
        &self.inner.id
    }
    /// The key column names, in the order of [`ChangeEvent::id`].
    pub fn key_columns(&self) -> &[String] {
        &self.inner.channel.key_columns
    }
    /// The extra columns the watch asked for (empty when [`ChangeEvent::is_truncated`]).
    pub fn extra_columns(&self) -> &Map<String, Value> {
        let extra = &self.inner.extra;
        if extra.by_name_only() {
            return &extra.others;
        }
        self.inner.extra_map.get_or_init(|| {
            extra
                .pairs(&self.inner.channel.extra_columns)
                .map(|(name, value)| (name.to_string(), value.clone()))
                .collect()
        })
    }
    /// A column's value, key or extra; `None` when the payload does not carry it.
    pub fn get(&self, column: &str) -> Option<&Value> {
        if let Some(pos) = self.key_columns().iter().position(|c| c == column) {
            return self.inner.id.values().get(pos);
        }
        let extra = &self.inner.extra;
        let names = &self.inner.channel.extra_columns;
        match names.iter().position(|c| c == column) {
            Some(at) if at < extra.known.len() => extra.known[at].as_ref(),
            _ => extra.others.get(column),
        }
    }
    /// Wall-clock time at which the listener received the notification.
    pub fn timestamp(&self) -> SystemTime {
        self.inner.timestamp
    }
    /// The event's position in the journal, on dialects and tiers that have one (SQLite,
    /// MySQL, PostgreSQL's durable and poll tiers): increasing in commit order. `None` for
    /// PostgreSQL NOTIFY events. The events of one [`Capture::Statement`](crate::Capture)
    /// journal row share its position.
    pub fn sequence(&self) -> Option<i64> {
        self.inner.sequence
    }
    /// True when the row was too large for a notification and could not be stored in the
    /// overflow table: the event carries the key only, read the row yourself if you need it.
    pub fn is_truncated(&self) -> bool {
        self.inner.truncated
    }

    /// A carried column's value *before* the change (key or extra column), on UPDATE and DELETE
    /// events of a watch with [`old_values`](crate::Watch::old_values); `None` otherwise (and
    /// always on INSERT). A column whose old value was NULL gives `Some(&Value::Null)`.
    pub fn old(&self, column: &str) -> Option<&Value> {
        self.inner.change.old.as_ref()?.get(column)
    }
    /// The old values of the carried columns (key and extra columns), on UPDATE and DELETE
    /// events of a watch with [`old_values`](crate::Watch::old_values); `None` otherwise.
    pub fn old_values(&self) -> Option<&Map<String, Value>> {
        self.inner.change.old.as_ref()
    }
    /// The names of the table's columns (every column, carried or not) whose values really
    /// changed, in table order, on UPDATE events of a watch with
    /// [`old_values`](crate::Watch::old_values); `None` otherwise. An UPDATE that set every
    /// column to its old value gives an empty list.
    pub fn changed_columns(&self) -> Option<&[String]> {
        self.inner.change.changed.as_deref()
    }

    /// A context value the trigger captured from the writer's session (see
    /// [`Watch::context`](crate::Watch::context) for the names each dialect offers), on events
    /// of a watch that names it; `None` for a name the watch does not capture. A value that was
    /// not set in the writer's session gives `Some(&Value::Null)`.
    pub fn context(&self, name: &str) -> Option<&Value> {
        self.inner.change.context.as_ref()?.get(name)
    }
    /// Every context value the trigger captured, by name, on events of a watch with
    /// [`context`](crate::Watch::context); `None` otherwise (and on events cut to their key).
    pub fn context_values(&self) -> Option<&Map<String, Value>> {
        self.inner.change.context.as_ref()
    }

    /// The id of the transaction that made the change: the same for every event of one
    /// transaction, different across transactions. On PostgreSQL it is the writer's top-level
    /// transaction id (`xid8`, as `pg_current_xact_id()` reports it; a savepoint's rows carry
    /// their top-level transaction's id), on every tier. On SQLite, for writes on connections
    /// that track their transactions (`sqlnotify::sqlite_transactions::track`): the id of the
    /// transaction's first journal row. On MariaDB, once the journal records transactions
    /// ([`mysql_transaction_ids`](crate::NotifierBuilder::mysql_transaction_ids)): the InnoDB
    /// transaction id the server stamped on the journal row. `None` for other SQLite writers,
    /// on Oracle MySQL and MariaDB journals that do not record them (see README,
    /// "Transactions") and on custom notifications.
    pub fn transaction_id(&self) -> Option<u64> {
        self.inner.transaction
    }
    /// Whether this is the last event of its transaction, on PostgreSQL's durable and poll
    /// tiers, for SQLite writers that track their transactions and on MariaDB journals that
    /// record them (`None` elsewhere). The events of one transaction arrive together, one after
    /// another, so a subscriber can collect them and apply the transaction as a unit when it
    /// sees `Some(true)`. The mark is counted over the notifier's watches: a subscription
    /// whose filters drop the transaction's last event does not see it — such a subscriber
    /// can also take a change of [`transaction_id`](Self::transaction_id) as the boundary.
    pub fn last_in_transaction(&self) -> Option<bool> {
        self.inner.last_in_transaction
    }

    /// Where its journal row stands in the read that delivered it (PostgreSQL's durable and
    /// poll tiers).
    #[cfg_attr(not(feature = "web"), allow(dead_code))]
    pub(crate) fn read_point(&self) -> Option<&ReadPoint> {
        self.inner.read_point.as_ref()
    }

    /// Whether the event is a row of a [`Snapshot`](crate::Snapshot) (the row as it was when
    /// the snapshot was read) rather than a change. Its [`operation`](Self::operation) is
    /// that of the watch it was read for.
    pub fn is_snapshot(&self) -> bool {
        self.inner.snapshot
    }
    /// Whether this is the last row a snapshot (or a backfill) hands over: what follows in its
    /// feed are changes. A snapshot none of whose rows passes the filters has no such event:
    /// `SnapshotFeed::progress` says when it is done.
    pub fn ends_snapshot(&self) -> bool {
        self.inner.snapshot_end
    }

    /// All carried columns (key columns first, then extra columns) as one JSON object.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        for (name, value) in self.key_columns().iter().zip(self.inner.id.values()) {
            map.insert(name.clone(), value.clone());
        }
        for (name, value) in self.inner.extra.pairs(&self.inner.channel.extra_columns) {
            map.insert(name.to_string(), value.clone());
        }
        Value::Object(map)
    }

    /// The whole event as one JSON object, what `sqlnotify tail` prints and the relay
    /// publishes: `{"channel", "schema", "table", "operation", "id", "columns", "sequence",
    /// "truncated"}`, plus `old`, `changed`, `context`, `transaction`,
    /// `last_in_transaction` and `snapshot` when the event carries them. `id` is the key value (an array for a composite key), `columns` the
    /// extra columns, `sequence` the journal position (`null` on PostgreSQL's notify tier).
    ///
    /// ```
    /// # fn show(event: &sqlnotify::ChangeEvent) {
    /// let record: serde_json::Value = serde_json::from_str(&event.to_record()).unwrap();
    /// assert_eq!(record["table"], event.table());
    /// # }
    /// ```
    pub fn to_record(&self) -> String {
        // Written straight into one buffer: the relay and `tail` call this per event.
        fn put<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
            serde_json::to_writer(&mut *out, value).expect("JSON values serialize");
        }
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(b"{\"channel\":");
        put(&mut out, self.channel());
        out.extend_from_slice(b",\"schema\":");
        put(&mut out, self.schema());
        out.extend_from_slice(b",\"table\":");
        put(&mut out, self.table());
        out.extend_from_slice(b",\"operation\":");
        put(&mut out, self.operation().as_str());
        out.extend_from_slice(b",\"id\":");
        match self.id() {
            Key::Single(v) => put(&mut out, v),
            Key::Composite(vs) => put(&mut out, vs),
        }
        out.extend_from_slice(b",\"columns\":");
        put(&mut out, &Columns(self));
        out.extend_from_slice(b",\"sequence\":");
        match self.sequence() {
            Some(s) => put(&mut out, &s),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"truncated\":");
        put(&mut out, &self.is_truncated());
        if let Some(old) = &self.inner.change.old {
            out.extend_from_slice(b",\"old\":");
            put(&mut out, old);
        }
        if let Some(changed) = &self.inner.change.changed {
            out.extend_from_slice(b",\"changed\":");
            put(&mut out, changed);
        }
        if let Some(context) = &self.inner.change.context {
            out.extend_from_slice(b",\"context\":");
            put(&mut out, context);
        }
        if let Some(transaction) = self.inner.transaction {
            out.extend_from_slice(b",\"transaction\":");
            put(&mut out, &transaction);
        }
        if let Some(last) = self.inner.last_in_transaction {
            out.extend_from_slice(b",\"last_in_transaction\":");
            put(&mut out, &last);
        }
        if self.inner.snapshot {
            out.extend_from_slice(b",\"snapshot\":true");
        }
        if self.inner.snapshot_end {
            out.extend_from_slice(b",\"snapshot_end\":true");
        }
        out.push(b'}');
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    /// The event [`to_record`](Self::to_record) wrote, rebuilt against the notifier's
    /// `channels` (a dead letter delivered again), `part` rows into its journal row. The
    /// record is read as untrusted: it must name a watched channel and match its key.
    pub(crate) fn from_record(record: &str, part: u32, channels: &Channels) -> Result<Self> {
        let invalid = |channel: &str, reason: String| Error::InvalidPayload {
            channel: channel.to_string(),
            reason,
        };
        let value: Value = serde_json::from_str(record)
            .map_err(|e| invalid("dead letter", format!("the stored event is not JSON: {e}")))?;
        let name = value["channel"]
            .as_str()
            .ok_or_else(|| invalid("dead letter", "the stored event names no channel".into()))?;
        let channel = channels.get(name).ok_or_else(|| {
            invalid(
                name,
                "the stored event's channel is not watched by this notifier".into(),
            )
        })?;
        let keys = channel.key_columns.len();
        let id = match (&value["id"], keys) {
            (Value::Array(values), n) if n > 1 && values.len() == n => {
                Key::Composite(values.clone())
            }
            (v, 1) => Key::Single(v.clone()),
            _ => {
                return Err(invalid(
                    name,
                    format!("the stored event's key does not have {keys} value(s)"),
                ))
            }
        };
        let extra = match &value["columns"] {
            Value::Object(map) => map.clone(),
            Value::Null => Map::new(),
            _ => {
                return Err(invalid(
                    name,
                    "the stored event's columns are not an object".into(),
                ))
            }
        };
        let mut raw = RawNotification::new(name, String::new());
        if let Some(sequence) = value["sequence"].as_i64() {
            raw = raw.with_sequence(sequence);
        }
        raw.transaction = match &value["transaction"] {
            Value::Null => None,
            v => Some(v.as_u64().ok_or_else(|| {
                invalid(
                    name,
                    "the stored event's transaction id is not a number".into(),
                )
            })?),
        };
        raw.last_in_transaction = match &value["last_in_transaction"] {
            Value::Null => None,
            v => Some(v.as_bool().ok_or_else(|| {
                invalid(
                    name,
                    "the stored event's last_in_transaction is not a boolean".into(),
                )
            })?),
        };
        let truncated = value["truncated"].as_bool().unwrap_or(false);
        let change = crate::payload::Change {
            old: match &value["old"] {
                Value::Object(map) => Some(map.clone()),
                Value::Null => None,
                _ => {
                    return Err(invalid(
                        name,
                        "the stored event's old values are not an object".into(),
                    ))
                }
            },
            changed: match &value["changed"] {
                Value::Null => None,
                Value::Array(items) => Some(
                    items
                        .iter()
                        .map(|item| item.as_str().map(str::to_string))
                        .collect::<Option<Vec<String>>>()
                        .ok_or_else(|| {
                            invalid(
                                name,
                                "the stored event's changed columns are not all names".into(),
                            )
                        })?,
                ),
                _ => {
                    return Err(invalid(
                        name,
                        "the stored event's changed columns are not an array".into(),
                    ))
                }
            },
            context: match &value["context"] {
                Value::Object(map) => Some(map.clone()),
                Value::Null => None,
                _ => {
                    return Err(invalid(
                        name,
                        "the stored event's context values are not an object".into(),
                    ))
                }
            },
            transaction: None,
        };
        let mut event =
            ChangeEvent::new(channel.clone(), id, extra, &raw, truncated).with_change(change);
        if let Some(inner) = Arc::get_mut(&mut event.inner) {
            inner.part = part;
            inner.snapshot = value["snapshot"] == Value::Bool(true);
            inner.snapshot_end = value["snapshot_end"] == Value::Bool(true);
        }
        Ok(event)
    }

    /// Deserializes the carried columns (key and extra) into a user type.
    ///
    /// ```
    /// # use sqlnotify::ChangeEvent;
    /// #[derive(serde::Deserialize)]
    /// struct User { id: i64, email: String }
    ///
    /// fn on_event(event: &ChangeEvent) -> sqlnotify::Result<()> {
    ///     let user: User = event.decode()?;
    ///     println!("user {} is now {}", user.id, user.email);
    ///     Ok(())
    /// }
    /// ```
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.to_json()).map_err(|e| Error::InvalidPayload {
            channel: self.channel().to_string(),
            reason: format!(
                "cannot decode event into {}: {e}",
                std::any::type_name::<T>()
            ),
        })
    }
}

impl actix::Message for ChangeEvent {
    type Result = ();
}

/// An event's extra columns, serialized as one JSON object in name order (as a map of them
/// would be), without building the map.
struct Columns<'a>(&'a ChangeEvent);

impl serde::Serialize for Columns<'_> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let inner = &self.0.inner;
        let mut pairs: Vec<_> = inner.extra.pairs(&inner.channel.extra_columns).collect();
        pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        serializer.collect_map(pairs)
    }
}

/// For tests: channel `c`, inserts into `public.t` (key `id`) on `tier`.
#[cfg(test)]
pub(crate) fn test_channel(tier: Tier) -> Arc<Channel> {
    Arc::new(Channel {
        name: "c".into(),
        schema: "public".into(),
        table: "t".into(),
        operation: Operation::Insert,
        label: None,
        key_columns: vec!["id".into()],
        extra_columns: Vec::new(),
        tier,
        signed: false,
    })
}

/// For tests: an insert into `public.t` with key `ordinal`, on a durable channel, at
/// journal position and ordinal `ordinal`.
#[cfg(test)]
pub(crate) fn test_event(ordinal: u64) -> ChangeEvent {
    let raw = RawNotification::new("c", "").with_sequence(ordinal as i64);
    let key = Key::Single(serde_json::json!(ordinal));
    ChangeEvent::new(test_channel(Tier::Durable), key, Map::new(), &raw, false).at(ordinal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn channel(keys: &[&str], extra: &[&str]) -> Arc<Channel> {
        Arc::new(Channel {
            name: "sqlnotify_public_t_insert".into(),
            schema: "public".into(),
            table: "t".into(),
            operation: Operation::Insert,
            label: None,
            key_columns: keys.iter().map(|s| s.to_string()).collect(),
            extra_columns: extra.iter().map(|s| s.to_string()).collect(),
            tier: Tier::Notify,
            signed: false,
        })
    }

    /// Columns kept by position (as the decoder keeps them) read exactly like the same columns
    /// kept by name: `get`, `extra_columns`, `to_json` and `to_record`, whatever the order.
    #[test]
    fn columns_by_position_read_like_columns_by_name() {
        let c = channel(&["id"], &["b", "a", "c"]);
        let raw = RawNotification::new("c", "");
        let payload = r#"{"z": [1], "a": null, "id": 1, "b": {"x": 2}, "a": "last"}"#;
        let Ok(crate::payload::Decoded::Row { id, extra, .. }) =
            crate::payload::decode(payload, &c)
        else {
            panic!("decodes");
        };
        assert_eq!(
            extra.known,
            [Some(json!({"x": 2})), Some(json!("last")), None]
        );
        let by_position = ChangeEvent::new(c.clone(), id.clone(), extra, &raw, false);
        let mut map = Map::new();
        map.insert("z".into(), json!([1]));
        map.insert("a".into(), json!("last"));
        map.insert("b".into(), json!({"x": 2}));
        let by_name = ChangeEvent::new(c, id, map.clone(), &raw, false);
        for event in [&by_position, &by_name] {
            assert_eq!(event.extra_columns(), &map);
            for (column, value) in [
                ("a", Some(json!("last"))),
                ("b", Some(json!({"x": 2}))),
                ("c", None),
                ("z", Some(json!([1]))),
                ("id", Some(json!(1))),
            ] {
                assert_eq!(event.get(column), value.as_ref(), "{column}");
            }
        }
        assert_eq!(by_position.to_json(), by_name.to_json());
        assert_eq!(by_position.to_record(), by_name.to_record());
        assert!(by_position
            .to_record()
            .contains(r#""columns":{"a":"last","b":{"x":2},"z":[1]}"#));
    }

    #[test]
    fn keys_display_as_their_values() {
        assert_eq!(Key::Single(json!(1)).to_string(), "1");
        assert_eq!(Key::Single(json!(-7)).to_string(), "-7");
        assert_eq!(Key::Single(json!(1.5)).to_string(), "1.5");
        assert_eq!(Key::Single(json!("a b")).to_string(), "a b");
        assert_eq!(Key::Single(json!("")).to_string(), "");
        assert_eq!(Key::Single(json!(true)).to_string(), "true");
        assert_eq!(Key::Single(Value::Null).to_string(), "null");
        assert_eq!(
            Key::Single(json!({"k": [1, "x"]})).to_string(),
            r#"{"k":[1,"x"]}"#
        );
        assert_eq!(
            Key::Composite(vec![json!(1), json!("a")]).to_string(),
            r#"(1, "a")"#
        );
        assert_eq!(
            Key::Composite(vec![json!("x, y"), Value::Null, json!(2)]).to_string(),
            r#"("x, y", null, 2)"#
        );
        assert_eq!(Key::Composite(vec![]).to_string(), "()");
    }

    #[test]
    fn get_and_decode_see_keys_and_extras() {
        #[derive(serde::Deserialize)]
        struct Row {
            a: i64,
            b: String,
            c: Option<bool>,
        }
        let mut extra = Map::new();
        extra.insert("c".into(), json!(true));
        let ev = ChangeEvent::new(
            channel(&["a", "b"], &["c"]),
            Key::Composite(vec![json!(1), json!("x")]),
            extra,
            &RawNotification::new("c", ""),
            false,
        );
        assert_eq!(ev.get("b"), Some(&json!("x")));
        assert_eq!(ev.get("c"), Some(&json!(true)));
        assert_eq!(ev.get("zzz"), None);
        let row: Row = ev.decode().unwrap();
        assert_eq!((row.a, row.b.as_str(), row.c), (1, "x", Some(true)));
        assert!(ev.decode::<Vec<i32>>().is_err());
    }

    #[test]
    fn a_record_is_one_json_object_and_reads_back_as_the_same_event() {
        let mut extra = Map::new();
        extra.insert("note".into(), json!("a \"quoted\" ü"));
        let ev = ChangeEvent::new(
            channel(&["a", "b"], &["note"]),
            Key::Composite(vec![json!(1), json!("x")]),
            extra,
            &RawNotification::new("sqlnotify_public_t_insert", "").with_sequence(42),
            false,
        )
        .placed(0, 3);
        let record = ev.to_record();
        assert_eq!(
            record,
            r#"{"channel":"sqlnotify_public_t_insert","schema":"public","table":"t","operation":"insert","id":[1,"x"],"columns":{"note":"a \"quoted\" ü"},"sequence":42,"truncated":false}"#
        );
        let channels = Channels::new([(*channel(&["a", "b"], &["note"])).clone()], "public");
        let back = ChangeEvent::from_record(&record, 3, &channels).unwrap();
        assert_eq!(back.to_record(), record);
        assert_eq!(back.part(), 3);
        assert_eq!(back.sequence(), Some(42));

        // no old values: no "old"/"changed" fields (the string above); with them: at the end,
        // and they read back
        let mut old = Map::new();
        old.insert("note".into(), Value::Null);
        let with_old = ChangeEvent::new(
            channel(&["a", "b"], &["note"]),
            Key::Composite(vec![json!(1), json!("x")]),
            Map::new(),
            &RawNotification::new("sqlnotify_public_t_insert", ""),
            false,
        )
        .with_change(Change {
            old: Some(old),
            changed: Some(vec!["note".into()]),
            context: None,
            transaction: None,
        });
        assert_eq!(with_old.old("note"), Some(&Value::Null));
        assert_eq!(with_old.old("a"), None);
        assert_eq!(with_old.changed_columns(), Some(&["note".to_string()][..]));
        assert_eq!(ev.old("note"), None);
        assert!(ev.old_values().is_none() && ev.changed_columns().is_none());
        let record = with_old.to_record();
        assert!(
            record.ends_with(r#","truncated":false,"old":{"note":null},"changed":["note"]}"#),
            "{record}"
        );
        let back = ChangeEvent::from_record(&record, 0, &channels).unwrap();
        assert_eq!(back.to_record(), record);
        assert_eq!(back.old_values(), with_old.old_values());

        // context values: after old and changed, and they read back
        let mut context = Map::new();
        context.insert("app.user_id".into(), json!("42"));
        context.insert("@unset".into(), Value::Null);
        let with_context = ChangeEvent::new(
            channel(&["a", "b"], &["note"]),
            Key::Composite(vec![json!(1), json!("x")]),
            Map::new(),
            &RawNotification::new("sqlnotify_public_t_insert", ""),
            false,
        )
        .with_change(Change {
            old: None,
            changed: Some(vec![]),
            context: Some(context),
            transaction: None,
        });
        assert_eq!(with_context.context("app.user_id"), Some(&json!("42")));
        assert_eq!(with_context.context("@unset"), Some(&Value::Null));
        assert_eq!(with_context.context("current_user"), None);
        assert_eq!(with_context.context_values().map(Map::len), Some(2));
        assert!(ev.context("app.user_id").is_none() && ev.context_values().is_none());
        assert!(!ev.to_record().contains("context"));
        let record = with_context.to_record();
        assert!(
            record.ends_with(
                r#","truncated":false,"changed":[],"context":{"@unset":null,"app.user_id":"42"}}"#
            ),
            "{record}"
        );
        let back = ChangeEvent::from_record(&record, 0, &channels).unwrap();
        assert_eq!(back.to_record(), record);
        assert_eq!(back.context_values(), with_context.context_values());

        // a transaction id and mark from the journal row: last in the record, and they read
        // back; a payload's id (the notify tier) carries no mark
        let in_tx = ChangeEvent::new(
            channel(&["a", "b"], &["note"]),
            Key::Composite(vec![json!(1), json!("x")]),
            Map::new(),
            &RawNotification::new("sqlnotify_public_t_insert", "").with_transaction(747, true),
            false,
        )
        .with_change(Change {
            transaction: Some(1),
            ..Change::default()
        });
        assert_eq!(
            in_tx.transaction_id(),
            Some(747),
            "the journal row's id wins"
        );
        assert_eq!(in_tx.last_in_transaction(), Some(true));
        let record = in_tx.to_record();
        assert!(
            record.ends_with(r#","truncated":false,"transaction":747,"last_in_transaction":true}"#),
            "{record}"
        );
        let back = ChangeEvent::from_record(&record, 0, &channels).unwrap();
        assert_eq!(back.to_record(), record);
        let notified = ChangeEvent::new(
            channel(&["a", "b"], &["note"]),
            Key::Composite(vec![json!(1), json!("x")]),
            Map::new(),
            &RawNotification::new("sqlnotify_public_t_insert", ""),
            false,
        )
        .with_change(Change {
            transaction: Some(9),
            ..Change::default()
        });
        assert_eq!(notified.transaction_id(), Some(9));
        assert_eq!(notified.last_in_transaction(), None);
        assert!(ev.transaction_id().is_none() && !ev.to_record().contains("transaction"));

        for (bad, needle) in [
            (
                r#"{"channel":"sqlnotify_public_t_insert","id":[1,2],"transaction":"x"}"#,
                "transaction id is not a number",
            ),
            (
                r#"{"channel":"sqlnotify_public_t_insert","id":[1,2],"last_in_transaction":1}"#,
                "not a boolean",
            ),
            (
                r#"{"channel":"sqlnotify_public_t_insert","id":[1,2],"context":"x"}"#,
                "context values are not an object",
            ),
            (
                r#"{"channel":"sqlnotify_public_t_insert","id":[1,2],"old":[1]}"#,
                "old values are not an object",
            ),
            (
                r#"{"channel":"sqlnotify_public_t_insert","id":[1,2],"changed":{}}"#,
                "not an array",
            ),
            (
                r#"{"channel":"sqlnotify_public_t_insert","id":[1,2],"changed":["a",2]}"#,
                "not all names",
            ),
            ("not json", "not JSON"),
            (r#"{"channel":"other","id":1}"#, "not watched"),
            (
                r#"{"channel":"sqlnotify_public_t_insert","id":1}"#,
                "does not have 2",
            ),
            (
                r#"{"channel":"sqlnotify_public_t_insert","id":[1,2],"columns":3}"#,
                "not an object",
            ),
        ] {
            let e = ChangeEvent::from_record(bad, 0, &channels)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn operation_parses_and_prints() {
        assert_eq!("UPDATE".parse::<Operation>().unwrap(), Operation::Update);
        assert!("upsert".parse::<Operation>().is_err());
        assert_eq!(Operation::Delete.to_string(), "DELETE");
    }
}

/// The channels of one notifier, by name; shared read-only by the decoder and the registry.
#[derive(Debug, Default)]
pub(crate) struct Channels {
    by_name: std::collections::HashMap<String, Arc<Channel>>,
    default_schema: String,
}

impl Channels {
    pub fn new(
        channels: impl IntoIterator<Item = Channel>,
        default_schema: impl Into<String>,
    ) -> Self {
        Channels {
            default_schema: default_schema.into(),
            by_name: channels
                .into_iter()
                .map(|c| (c.name.clone(), Arc::new(c)))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Channel>> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Every channel.
    pub fn list(&self) -> Vec<Channel> {
        self.by_name.values().map(|c| (**c).clone()).collect()
    }

    /// The channel of the watch on `schema.table`/`operation` with this label (or none);
    /// no schema means the dialect's default one.
    pub fn find(
        &self,
        schema: Option<&str>,
        table: &str,
        operation: Operation,
        label: Option<&str>,
    ) -> Result<&Arc<Channel>> {
        let schema = schema.unwrap_or(&self.default_schema);
        self.by_name
            .values()
            .find(|c| {
                c.schema == schema
                    && c.table == table
                    && c.operation == operation
                    && c.label.as_deref() == label
            })
            .ok_or_else(|| Error::NotWatched {
                table: format!("{schema}.{table}"),
                operation,
                label: label.map(str::to_string),
            })
    }
}
