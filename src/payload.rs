//! The notification payload format, shared by every dialect's triggers and by the decoder.
//!
//! A payload is a JSON object: the key columns, then the extra columns, e.g.
//! `{"id": 42, "email": "a@b.c"}`. When the row does not fit in one notification the trigger
//! sends a reference instead, marked by the reserved member `"__sqlnotify"` (no watched column
//! may have that name):
//!
//! * `{"__sqlnotify": {"overflow": "0b6f…-…"}, "id": 42}` — the full payload is the overflow
//!   row with that random token (a UUID: references cannot be guessed or walked), written for
//!   the channel the reference arrived on;
//! * `{"__sqlnotify": {"truncated": true}, "id": 42}` — too large and overflow unavailable:
//!   the event carries the key only.
//!
//! A watch with [`old_values`](crate::Watch::old_values) adds the old row and, on UPDATE, the
//! changed columns to the metadata of a full payload:
//! `{"id": 42, "email": "new@b.c", "__sqlnotify": {"old": {"id": 42, "email": "a@b.c"},
//! "changed": ["email", "updated_at"]}}`. Both are read as untrusted: `old` must be an object,
//! `changed` an array of strings, and no other member may appear beside them.
//!
//! A watch with [`context`](crate::Watch::context) adds the values the trigger captured from
//! the writer's session (one member per name, `null` when unset) to the same metadata:
//! `{"id": 42, "__sqlnotify": {"context": {"current_user": "app", "app.user_id": "7"}}}`.
//! Read as untrusted too: `context` must be an object.
//!
//! A journal row written by a statement-capture trigger ([`Capture::Statement`]) holds a JSON
//! array of such row objects, one per changed row, in order.
//!
//! [`Capture::Statement`]: crate::Capture::Statement

use serde_json::{Map, Value};

use crate::event::{Channel, Extra, Key};

/// Reserved payload member carrying sqlnotify's own metadata.
pub(crate) const META_KEY: &str = "__sqlnotify";

/// Largest payload, in bytes, that PostgreSQL's NOTIFY accepts.
pub const NOTIFY_PAYLOAD_LIMIT: usize = 7999;

/// A decoded payload: either the event's columns or a reference to an overflow row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decoded {
    /// The payload carried the row.
    Row {
        id: Key,
        extra: Extra,
        truncated: bool,
        change: Change,
    },
    /// The row is stored in the overflow table under this token (canonical lower-case UUID
    /// text); `id` is the key sent along.
    Overflow { reference: String, id: Key },
}

/// The old values and changed columns a payload of an [`old_values`](crate::Watch::old_values)
/// watch carries, and the context values of a [`context`](crate::Watch::context) watch (each
/// `None` otherwise).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Change {
    /// The old values of the carried columns (UPDATE and DELETE).
    pub old: Option<Map<String, Value>>,
    /// The table's columns whose values changed (UPDATE).
    pub changed: Option<Vec<String>>,
    /// The context values the trigger captured ([`Watch::context`](crate::Watch::context)).
    pub context: Option<Map<String, Value>>,
    /// The writer's transaction id, where the payload carries it (PostgreSQL's notify tier;
    /// the journal tiers read it from the journal row instead).
    pub transaction: Option<u64>,
}

/// Parses a payload received on `channel`. The error says what is wrong, for the log.
pub(crate) fn decode(payload: &str, channel: &Channel) -> Result<Decoded, String> {
    match parse_object(payload, channel) {
        Ok(parts) => decode_parts(parts, channel),
        // Not a JSON object: parsed again as any JSON value, for the same message as ever.
        Err(_) => match serde_json::from_str(payload) {
            Ok(Value::Object(map)) => decode_map(map, channel),
            Ok(_) => Err("payload is JSON but not an object".into()),
            Err(e) => match lenient(payload) {
                Some(Value::Object(map)) => decode_map(map, channel),
                _ => Err(format!("payload is not JSON: {e}")),
            },
        },
    }
}

/// A payload that is valid JSON but holds a value serde_json does not build as a [`Value`] —
/// a number beyond an `f64` (a PostgreSQL `numeric` such as `1e400`) or nesting deeper than
/// its limit of 128 (a deeply nested `jsonb` document) — read member by member: such a column
/// value becomes its JSON text, as a string (also how the logical tier delivers it), so that
/// a legal value never costs the whole event. The metadata member and its `old` and `context`
/// objects are opened the same way. `None` for text that is not JSON at all.
fn lenient(payload: &str) -> Option<Value> {
    lenient_object(payload, |name, raw| match name {
        META_KEY => lenient_object(raw, |name, raw| match name {
            "old" | "context" => lenient_object(raw, |_, raw| lenient_value(raw)),
            _ => lenient_value(raw),
        }),
        _ => lenient_value(raw),
    })
}

/// A statement payload (an array of row payloads) read as [`lenient`] reads one.
fn lenient_rows(payload: &str) -> Option<Vec<Value>> {
    use serde_json::value::RawValue;
    let rows: Vec<Box<RawValue>> = serde_json::from_str(payload).ok()?;
    rows.iter().map(|row| lenient(row.get())).collect()
}

/// `text` as a `Value`; failing that, an object whose members `member` reads from their
/// text, or anything else (valid JSON) as its text.
fn lenient_object(text: &str, member: impl Fn(&str, &str) -> Option<Value>) -> Option<Value> {
    use serde_json::value::RawValue;
    if let Ok(value) = serde_json::from_str(text) {
        return Some(value);
    }
    if !text.trim_start().starts_with('{') {
        return lenient_value(text);
    }
    let members: std::collections::BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(text).ok()?;
    members
        .into_iter()
        .map(|(name, raw)| member(&name, raw.get()).map(|value| (name, value)))
        .collect::<Option<Map<String, Value>>>()
        .map(Value::Object)
}

/// `text` as a `Value`, or, valid JSON serde_json does not build, as its text.
fn lenient_value(text: &str) -> Option<Value> {
    use serde_json::value::RawValue;
    serde_json::from_str(text).ok().or_else(|| {
        // A raw value checks the text is JSON without building it.
        let raw: Box<RawValue> = serde_json::from_str(text).ok()?;
        Some(Value::String(raw.get().to_string()))
    })
}

/// A payload object taken apart while it is parsed: the values of `channel`'s key columns (in
/// declared order, `None` where missing), the reserved member, and every other member.
struct Parts {
    /// The first key column's value, then the others' (most keys are one column: no
    /// allocation).
    first: Option<Value>,
    rest: Vec<Option<Value>>,
    meta: Option<Meta>,
    extra: Extra,
}

/// The reserved member of a payload, taken apart while it is parsed: most payloads carry only
/// a transaction id, which then costs no map, member name, string or allocation (the other
/// members live behind one box, so that moving a payload's parts stays cheap). Every member
/// sqlnotify's triggers may write has its field; anything else lands in `others` (an error,
/// unless an overflow reference or a truncation mark decides first). A member that occurs
/// twice keeps its last value, as in a map.
#[derive(Debug, Default)]
struct Meta {
    tx: Option<Tx>,
    rest: Option<Box<MetaRest>>,
}

/// The members of [`Meta`] other than `tx`.
#[derive(Debug, Default)]
struct MetaRest {
    /// Not an object at all (an error): the value as sent.
    not_object: Option<Value>,
    overflow: Option<Value>,
    truncated: Option<Value>,
    old: Option<Value>,
    changed: Option<Value>,
    context: Option<Value>,
    others: Map<String, Value>,
}

/// A metadata `tx` member: a transaction id written as a number (the fast path) or as the text
/// of one (`json_build_object` writes an `xid8` as a string), or anything else (an error).
#[derive(Debug)]
enum Tx {
    Number(u64),
    Text(u64),
    Other(Value),
}

impl Tx {
    fn from_value(value: Value) -> Tx {
        match &value {
            Value::Number(n) => n.as_u64().map_or(Tx::Other(value), Tx::Number),
            Value::String(text) => text.parse().map_or(Tx::Other(value), Tx::Text),
            _ => Tx::Other(value),
        }
    }

    fn into_value(self) -> Value {
        match self {
            Tx::Number(n) => Value::from(n),
            Tx::Text(n) => Value::String(n.to_string()),
            Tx::Other(value) => value,
        }
    }

    /// The transaction id; an error naming the member when it is not one.
    fn id(&self) -> Result<u64, String> {
        match self {
            Tx::Number(n) | Tx::Text(n) => Ok(*n),
            Tx::Other(Value::Number(n)) => {
                Err(format!("{META_KEY}.tx is not a transaction id: {n}"))
            }
            Tx::Other(Value::String(text)) => {
                Err(format!("{META_KEY}.tx is not a transaction id: {text:?}"))
            }
            Tx::Other(other) => Err(format!("{META_KEY}.tx is not a transaction id: {other}")),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Tx {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
        use serde::Deserialize as _;
        struct TxVisitor;
        impl<'de> serde::de::Visitor<'de> for TxVisitor {
            type Value = Tx;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a transaction id")
            }
            fn visit_u64<E>(self, n: u64) -> Result<Tx, E> {
                Ok(Tx::Number(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Tx, E> {
                Ok(Tx::from_value(Value::from(n)))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Tx, E> {
                Ok(Tx::from_value(Value::from(n)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Tx, E> {
                Ok(text
                    .parse()
                    .map_or_else(|_| Tx::Other(Value::String(text.into())), Tx::Text))
            }
            fn visit_bool<E>(self, b: bool) -> Result<Tx, E> {
                Ok(Tx::Other(Value::Bool(b)))
            }
            fn visit_unit<E>(self) -> Result<Tx, E> {
                Ok(Tx::Other(Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Tx, A::Error> {
                Value::deserialize(SeqAccessDeserializer::new(seq)).map(Tx::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Tx, A::Error> {
                Value::deserialize(MapAccessDeserializer::new(map)).map(Tx::Other)
            }
        }
        deserializer.deserialize_any(TxVisitor)
    }
}

impl MetaRest {
    /// No member at all.
    fn is_empty(&self) -> bool {
        self.not_object.is_none()
            && self.overflow.is_none()
            && self.truncated.is_none()
            && self.old.is_none()
            && self.changed.is_none()
            && self.context.is_none()
            && self.others.is_empty()
    }
}

impl Meta {
    /// Stores member `name`; `value` is parsed as the member requires.
    fn set<'de, A: serde::de::MapAccess<'de>>(
        &mut self,
        name: &str,
        access: &mut A,
    ) -> Result<(), A::Error> {
        if name == "tx" {
            self.tx = Some(access.next_value()?);
            return Ok(());
        }
        let value = access.next_value()?;
        let rest = self.rest.get_or_insert_with(Box::default);
        match name {
            "overflow" => rest.overflow = Some(value),
            "truncated" => rest.truncated = Some(value),
            "old" => rest.old = Some(value),
            "changed" => rest.changed = Some(value),
            "context" => rest.context = Some(value),
            _ => {
                rest.others.insert(name.to_string(), value);
            }
        }
        Ok(())
    }

    /// The metadata member of a payload parsed into a [`Value`] first.
    fn from_value(value: Value) -> Meta {
        let Value::Object(mut map) = value else {
            return Meta {
                tx: None,
                rest: Some(Box::new(MetaRest {
                    not_object: Some(value),
                    ..MetaRest::default()
                })),
            };
        };
        let tx = map.remove("tx").map(Tx::from_value);
        let rest = (!map.is_empty()).then(|| {
            Box::new(MetaRest {
                not_object: None,
                overflow: map.remove("overflow"),
                truncated: map.remove("truncated"),
                old: map.remove("old"),
                changed: map.remove("changed"),
                context: map.remove("context"),
                others: map,
            })
        });
        Meta { tx, rest }
    }

    /// No member at all.
    fn is_empty(&self) -> bool {
        self.tx.is_none() && self.rest.as_deref().is_none_or(MetaRest::is_empty)
    }

    /// The metadata as sent (for an error message).
    fn into_value(self) -> Value {
        let rest = *self.rest.unwrap_or_default();
        if let Some(value) = rest.not_object {
            return value;
        }
        let mut map = rest.others;
        for (name, value) in [
            ("overflow", rest.overflow),
            ("truncated", rest.truncated),
            ("old", rest.old),
            ("changed", rest.changed),
            ("context", rest.context),
            ("tx", self.tx.map(Tx::into_value)),
        ] {
            if let Some(value) = value {
                map.insert(name.into(), value);
            }
        }
        Value::Object(map)
    }
}

impl<'de> serde::Deserialize<'de> for Meta {
    // Inlined into the payload's parse, as it was before the decoder's other changes: called
    // out of line it costs ~170 instructions more per event (callgrind).
    #[inline]
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::value::SeqAccessDeserializer;
        use serde::Deserialize as _;
        struct MetaVisitor;
        impl<'de> serde::de::Visitor<'de> for MetaVisitor {
            type Value = Meta;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("sqlnotify's metadata")
            }
            #[inline]
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<Meta, A::Error> {
                let mut meta = Meta::default();
                while let Some(name) = access.next_key::<Name<'de>>()? {
                    meta.set(name.as_str(), &mut access)?;
                }
                Ok(meta)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Meta, A::Error> {
                Value::deserialize(SeqAccessDeserializer::new(seq)).map(Meta::from_value)
            }
            fn visit_u64<E>(self, n: u64) -> Result<Meta, E> {
                Ok(Meta::from_value(Value::from(n)))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Meta, E> {
                Ok(Meta::from_value(Value::from(n)))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Meta, E> {
                Ok(Meta::from_value(Value::from(n)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Meta, E> {
                Ok(Meta::from_value(Value::String(text.into())))
            }
            fn visit_bool<E>(self, b: bool) -> Result<Meta, E> {
                Ok(Meta::from_value(Value::Bool(b)))
            }
            fn visit_unit<E>(self) -> Result<Meta, E> {
                Ok(Meta::from_value(Value::Null))
            }
        }
        deserializer.deserialize_any(MetaVisitor)
    }
}

/// Parses `payload` as one JSON object straight into [`Parts`]: the key and extra columns'
/// names are never allocated (their values are kept by position), and no member is inserted
/// into a map only to be taken out again. A member that occurs twice keeps its last value, as
/// when parsing into a [`Value`].
fn parse_object(payload: &str, channel: &Channel) -> serde_json::Result<Parts> {
    use serde::de::Deserializer as _;
    let mut de = serde_json::Deserializer::from_str(payload);
    let parts = (&mut de).deserialize_any(PartsVisitor(channel))?;
    de.end()?;
    Ok(parts)
}

struct PartsVisitor<'c>(&'c Channel);

impl<'de> serde::de::Visitor<'de> for PartsVisitor<'_> {
    type Value = Parts;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<Parts, A::Error> {
        let key_columns = &self.0.key_columns;
        let extra_columns = &self.0.extra_columns;
        // Payloads list the extra columns in the channel's order: the next one is tried first.
        let mut next = 0;
        let mut parts = Parts {
            first: None,
            rest: nones(key_columns.len().saturating_sub(1)),
            meta: None,
            extra: Extra {
                known: nones(extra_columns.len()),
                others: Map::new(),
            },
        };
        while let Some(name) = access.next_key::<Name<'de>>()? {
            let name = name.as_str();
            if name == META_KEY {
                parts.meta = Some(access.next_value()?);
                continue;
            }
            let value: Value = access.next_value()?;
            if let Some(at) = key_columns.iter().position(|c| c == name) {
                match at.checked_sub(1) {
                    None => parts.first = Some(value),
                    Some(at) => parts.rest[at] = Some(value),
                }
            } else if let Some(at) = extra_columns
                .get(next)
                .filter(|c| *c == name)
                .map(|_| next)
                .or_else(|| extra_columns.iter().position(|c| c == name))
            {
                parts.extra.known[at] = Some(value);
                next = at + 1;
            } else {
                parts.extra.others.insert(name.to_string(), value);
            }
        }
        Ok(parts)
    }
}

/// `n` empty slots. Cheaper than `vec![None; n]`, which clones a `None` `Value` into each
/// slot but the last.
fn nones(n: usize) -> Vec<Option<Value>> {
    std::iter::repeat_with(|| None).take(n).collect()
}

/// A member name, borrowed from the payload unless it holds an escape.
enum Name<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Name<'_> {
    fn as_str(&self) -> &str {
        match self {
            Name::Borrowed(s) => s,
            Name::Owned(s) => s,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> serde::de::Visitor<'de> for NameVisitor {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Name<'de>, E> {
                Ok(Name::Borrowed(s))
            }
            fn visit_str<E>(self, s: &str) -> Result<Name<'de>, E> {
                Ok(Name::Owned(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<Name<'de>, E> {
                Ok(Name::Owned(s))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// Parses a statement-capture journal payload: a JSON array of row objects. The outer error
/// rejects the whole payload; an element that is not a row gets its own error (the other
/// rows are still good). Overflow references cannot occur in an array (journal rows have no
/// size limit) and are rejected.
pub(crate) fn decode_rows(
    payload: &str,
    channel: &Channel,
) -> Result<Vec<Result<Decoded, String>>, String> {
    let rows: Vec<Value> = match serde_json::from_str(payload) {
        Ok(rows) => rows,
        Err(e) => {
            lenient_rows(payload).ok_or_else(|| format!("payload is not a JSON array: {e}"))?
        }
    };
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, row)| match row {
            Value::Object(map) => match decode_map(map, channel) {
                Ok(Decoded::Overflow { .. }) => Err(format!(
                    "row {i}: overflow reference inside a statement payload"
                )),
                other => other.map_err(|e| format!("row {i}: {e}")),
            },
            _ => Err(format!("row {i} is not a JSON object")),
        })
        .collect())
}

/// Decodes one payload object.
fn decode_map(mut map: Map<String, Value>, channel: &Channel) -> Result<Decoded, String> {
    let meta = map.remove(META_KEY).map(Meta::from_value);
    let mut keys = channel.key_columns.iter().map(|column| map.remove(column));
    let first = keys.next().flatten();
    let rest = keys.collect();
    let known = channel
        .extra_columns
        .iter()
        .map(|column| map.remove(column))
        .collect();
    decode_parts(
        Parts {
            first,
            rest,
            meta,
            extra: Extra { known, others: map },
        },
        channel,
    )
}

/// Decodes one payload object, taken apart.
fn decode_parts(parts: Parts, channel: &Channel) -> Result<Decoded, String> {
    let Parts {
        first,
        rest,
        meta,
        extra: map,
    } = parts;
    let id = key_of(first, rest, channel)?;
    let Some(meta) = meta else {
        return Ok(Decoded::Row {
            id,
            extra: map,
            truncated: false,
            change: Change::default(),
        });
    };
    let rest = meta.rest.as_deref();
    if let Some(other) = rest.and_then(|r| r.not_object.as_ref()) {
        return Err(format!("{META_KEY} metadata is not an object: {other}"));
    }
    if let Some(reference) = rest.and_then(|r| r.overflow.as_ref()) {
        let reference = reference
            .as_str()
            .filter(|r| is_token(r))
            .ok_or_else(|| format!("overflow reference {reference} is not a token"))?;
        return Ok(Decoded::Overflow {
            reference: reference.to_string(),
            id,
        });
    }
    if rest.and_then(|r| r.truncated.as_ref()) == Some(&Value::Bool(true)) {
        return Ok(Decoded::Row {
            id,
            extra: Extra::default(),
            truncated: true,
            change: Change {
                transaction: meta.tx.as_ref().map(Tx::id).transpose()?,
                ..Change::default()
            },
        });
    }
    if meta.is_empty() || rest.is_some_and(|r| r.truncated.is_some() || !r.others.is_empty()) {
        return Err(format!("unknown {META_KEY} metadata {}", meta.into_value()));
    }
    Ok(Decoded::Row {
        id,
        extra: map,
        truncated: false,
        change: take_change(meta)?,
    })
}

/// Reads the `old`, `changed`, `context` and `tx` members of a payload's metadata (untrusted:
/// wrong types are an error naming the member).
fn take_change(meta: Meta) -> Result<Change, String> {
    let transaction = meta.tx.as_ref().map(Tx::id).transpose()?;
    let Some(rest) = meta.rest else {
        return Ok(Change {
            transaction,
            ..Change::default()
        });
    };
    let old = match rest.old {
        None => None,
        Some(Value::Object(old)) => Some(old),
        Some(other) => return Err(format!("{META_KEY}.old is not an object: {other}")),
    };
    let changed = match rest.changed {
        None => None,
        Some(Value::Array(items)) => Some(
            items
                .into_iter()
                .map(|item| match item {
                    Value::String(column) => Ok(column),
                    other => Err(format!(
                        "{META_KEY}.changed holds {other}, not a column name"
                    )),
                })
                .collect::<Result<Vec<String>, String>>()?,
        ),
        Some(other) => return Err(format!("{META_KEY}.changed is not an array: {other}")),
    };
    let context = match rest.context {
        None => None,
        Some(Value::Object(context)) => Some(context),
        Some(other) => return Err(format!("{META_KEY}.context is not an object: {other}")),
    };
    Ok(Change {
        old,
        changed,
        context,
        transaction,
    })
}

/// Whether `text` is a UUID in PostgreSQL's canonical output form (8-4-4-4-12 lower-case hex
/// digits), the only form a trigger writes.
fn is_token(text: &str) -> bool {
    text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// The [`Key`] made of the key columns' values: the first one's, then the others' in
/// declared order.
fn key_of(
    first: Option<Value>,
    rest: Vec<Option<Value>>,
    channel: &Channel,
) -> Result<Key, String> {
    let lacks = |at: usize| format!("payload lacks key column {:?}", channel.key_columns[at]);
    match channel.key_columns.len() {
        0 => Ok(Key::Composite(Vec::new())),
        1 => first.map(Key::Single).ok_or_else(|| lacks(0)),
        _ => {
            let first = first.ok_or_else(|| lacks(0))?;
            let mut values = Vec::with_capacity(rest.len() + 1);
            values.push(first);
            for (at, value) in rest.into_iter().enumerate() {
                values.push(value.ok_or_else(|| lacks(at + 1))?);
            }
            Ok(Key::Composite(values))
        }
    }
}

/// Checks a custom notification payload and renders it: a JSON object carrying every key
/// column of `channel` and not using the reserved member.
pub(crate) fn encode_custom(payload: &Value, channel: &Channel) -> Result<String, String> {
    let map = payload
        .as_object()
        .ok_or_else(|| format!("payload must be a JSON object, got {payload}"))?;
    if map.contains_key(META_KEY) {
        return Err(format!("{META_KEY:?} is reserved"));
    }
    if let Some(missing) = channel.key_columns.iter().find(|c| !map.contains_key(*c)) {
        return Err(format!("payload lacks key column {missing:?}"));
    }
    Ok(payload.to_string())
}

/// The reference payload that stands in for a payload stored under token `reference` (custom
/// events on PostgreSQL's notify tier; the triggers build theirs in SQL).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn encode_overflow_ref(reference: &str, payload: &Value, channel: &Channel) -> String {
    let mut map = Map::new();
    map.insert(
        META_KEY.into(),
        serde_json::json!({ "overflow": reference }),
    );
    for column in &channel.key_columns {
        map.insert(
            column.clone(),
            payload.get(column).cloned().unwrap_or(Value::Null),
        );
    }
    Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operation::Operation;
    use serde_json::json;

    fn channel(keys: &[&str]) -> Channel {
        Channel {
            name: "c".into(),
            schema: "public".into(),
            table: "t".into(),
            operation: Operation::Insert,
            label: None,
            key_columns: keys.iter().map(|s| s.to_string()).collect(),
            extra_columns: vec!["email".into()],
            tier: crate::tier::Tier::Notify,
            signed: false,
        }
    }

    #[test]
    fn decodes_a_row() {
        let d = decode(r#"{"id": 42, "email": "a@b.c"}"#, &channel(&["id"])).unwrap();
        let extra = Extra {
            known: vec![Some(json!("a@b.c"))],
            others: Map::new(),
        };
        assert_eq!(
            d,
            Decoded::Row {
                id: Key::Single(json!(42)),
                extra,
                truncated: false,
                change: Change::default(),
            }
        );
    }

    #[test]
    fn decodes_context_values() {
        let c = channel(&["id"]);
        match decode(
            r#"{"id": 1, "__sqlnotify": {"context": {"app.user_id": "42", "@x": null, "backend_pid": 7}}}"#,
            &c,
        )
        .unwrap()
        {
            Decoded::Row { change, extra, .. } => {
                let context = change.context.unwrap();
                assert_eq!(context.get("app.user_id"), Some(&json!("42")));
                assert_eq!(context.get("@x"), Some(&Value::Null));
                assert_eq!(context.get("backend_pid"), Some(&json!(7)));
                assert!(change.old.is_none() && extra == Extra { known: vec![None], others: Map::new() });
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            r#"{"id": 1, "__sqlnotify": {"context": "app"}}"#,
            r#"{"id": 1, "__sqlnotify": {"context": ["app"]}}"#,
            r#"{"id": 1, "__sqlnotify": {"context": null}}"#,
        ] {
            let e = decode(bad, &c).unwrap_err();
            assert!(e.contains("context is not an object"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_value_serde_json_cannot_build_arrives_as_its_text_not_lost() {
        let c = channel(&["id"]);
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let payload = format!(
            r#"{{"id": 1, "email": 1e400, "other": {deep}, "__sqlnotify": {{"old": {{"id": 1, "email": -1e999}}, "changed": ["email"], "tx": 7}}}}"#
        );
        match decode(&payload, &c).unwrap() {
            Decoded::Row { extra, change, .. } => {
                assert_eq!(extra.known, [Some(json!("1e400"))]);
                assert_eq!(extra.others.get("other"), Some(&json!(deep)));
                assert_eq!(change.old.unwrap().get("email"), Some(&json!("-1e999")));
                assert_eq!(change.changed.unwrap(), ["email"]);
                assert_eq!(change.transaction, Some(7));
            }
            other => panic!("{other:?}"),
        }
        // A statement payload: the rows beside such a row are not lost either.
        let rows = decode_rows(
            r#"[{"id": 1, "email": "a"}, {"id": 2, "email": 1e400}, {"id": 3, "email": "c"}]"#,
            &c,
        )
        .unwrap();
        assert!(rows.iter().all(Result::is_ok), "{rows:?}");
        // Still refused: what is not JSON at all.
        assert!(decode(r#"{"id": 1, "email": 1e400"#, &c).is_err());
        assert!(decode(r#"{"id": 1, "email": 01}"#, &c).is_err());
    }

    #[test]
    fn decodes_old_values_and_changed_columns() {
        let c = channel(&["id"]);
        let d = decode(
            r#"{"id": 1, "email": "new", "__sqlnotify": {"old": {"id": 1, "email": null}, "changed": ["email", "at"]}}"#,
            &c,
        )
        .unwrap();
        match d {
            Decoded::Row {
                extra,
                change,
                truncated,
                ..
            } => {
                assert!(!truncated);
                assert_eq!(extra.known, [Some(json!("new"))]);
                assert!(extra.others.is_empty());
                let old = change.old.unwrap();
                assert_eq!(old.get("email"), Some(&Value::Null));
                assert_eq!(change.changed.unwrap(), ["email", "at"]);
            }
            other => panic!("{other:?}"),
        }
        // old alone (a DELETE), and an empty changed list
        match decode(r#"{"id": 1, "__sqlnotify": {"old": {"id": 1}}}"#, &c).unwrap() {
            Decoded::Row { change, .. } => {
                assert_eq!(change.old.unwrap().len(), 1);
                assert!(change.changed.is_none());
            }
            other => panic!("{other:?}"),
        }
        match decode(r#"{"id": 1, "__sqlnotify": {"changed": []}}"#, &c).unwrap() {
            Decoded::Row { change, .. } => assert_eq!(change.changed, Some(vec![])),
            other => panic!("{other:?}"),
        }
        for (bad, needle) in [
            (
                r#"{"id": 1, "__sqlnotify": {"old": 3}}"#,
                "old is not an object",
            ),
            (
                r#"{"id": 1, "__sqlnotify": {"old": [1]}}"#,
                "old is not an object",
            ),
            (
                r#"{"id": 1, "__sqlnotify": {"changed": "a"}}"#,
                "changed is not an array",
            ),
            (
                r#"{"id": 1, "__sqlnotify": {"changed": ["a", 1]}}"#,
                "not a column name",
            ),
            (
                r#"{"id": 1, "__sqlnotify": {"changed": [null]}}"#,
                "not a column name",
            ),
            (
                r#"{"id": 1, "__sqlnotify": {"old": {}, "x": 1}}"#,
                "unknown",
            ),
        ] {
            let e = decode(bad, &c).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn decodes_transaction_ids() {
        let c = channel(&["id"]);
        let tx = |payload: &str| match decode(payload, &c) {
            Ok(Decoded::Row { change, .. }) => Ok(change.transaction),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        // the fast path writes a number, json_build_object a string
        assert_eq!(
            tx(r#"{"id": 1, "__sqlnotify": {"tx": 747}}"#),
            Ok(Some(747))
        );
        assert_eq!(
            tx(r#"{"id": 1, "__sqlnotify": {"changed": [], "tx": "4294967299"}}"#),
            Ok(Some(4_294_967_299))
        );
        // a payload cut to its key keeps the id
        match decode(
            r#"{"__sqlnotify": {"truncated": true, "tx": 12}, "id": 1}"#,
            &c,
        ) {
            Ok(Decoded::Row {
                truncated, change, ..
            }) => assert!(truncated && change.transaction == Some(12)),
            other => panic!("{other:?}"),
        }
        assert_eq!(tx(r#"{"id": 1}"#), Ok(None));
        for bad in [
            r#"{"id": 1, "__sqlnotify": {"tx": -1}}"#,
            r#"{"id": 1, "__sqlnotify": {"tx": 1.5}}"#,
            r#"{"id": 1, "__sqlnotify": {"tx": "x"}}"#,
            r#"{"id": 1, "__sqlnotify": {"tx": [1]}}"#,
            r#"{"__sqlnotify": {"truncated": true, "tx": null}, "id": 1}"#,
        ] {
            let e = tx(bad).unwrap_err();
            assert!(e.contains("tx is not a transaction id"), "{bad}: {e}");
        }
    }

    #[test]
    fn composite_keys_come_out_in_declared_order() {
        let d = decode(r#"{"b": 2, "a": 1}"#, &channel(&["a", "b"])).unwrap();
        match d {
            Decoded::Row { id, .. } => assert_eq!(id, Key::Composite(vec![json!(1), json!(2)])),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decodes_references_and_truncation() {
        let c = channel(&["id"]);
        assert_eq!(
            decode(
                r#"{"__sqlnotify": {"overflow": "0b6f1e9a-3c1d-4f2e-9a7b-5d8c2e1f0a93"}, "id": 5}"#,
                &c
            )
            .unwrap(),
            Decoded::Overflow {
                reference: "0b6f1e9a-3c1d-4f2e-9a7b-5d8c2e1f0a93".into(),
                id: Key::Single(json!(5))
            }
        );
        // sequential ids (the old format) and anything but a canonical token are refused
        for reference in [
            "17",
            "\"17\"",
            "\"0B6F1E9A-3C1D-4F2E-9A7B-5D8C2E1F0A93\"",
            "\"0b6f1e9a3c1d4f2e9a7b5d8c2e1f0a93\"",
            "\"0b6f1e9a-3c1d-4f2e-9a7b-5d8c2e1f0a93x\"",
            "\"0b6f1e9a_3c1d_4f2e_9a7b_5d8c2e1f0a93\"",
            "null",
            "{}",
        ] {
            let payload = format!(r#"{{"__sqlnotify": {{"overflow": {reference}}}, "id": 5}}"#);
            assert!(
                decode(&payload, &c).unwrap_err().contains("not a token"),
                "{payload}"
            );
        }
        match decode(r#"{"__sqlnotify": {"truncated": true}, "id": 5}"#, &c).unwrap() {
            Decoded::Row {
                truncated, extra, ..
            } => assert!(truncated && extra == Extra::default()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        let c = channel(&["id"]);
        assert!(decode("hello", &c).unwrap_err().contains("not JSON"));
        assert!(decode("[1,2]", &c).unwrap_err().contains("not an object"));
        assert!(decode(r#"{"email": 1}"#, &c)
            .unwrap_err()
            .contains("\"id\""));
        assert!(decode(r#"{"id": 1, "__sqlnotify": 3}"#, &c).is_err());
        assert!(decode(r#"{"id": 1, "__sqlnotify": {"overflow": "x"}}"#, &c).is_err());
        assert!(decode(r#"{"id": 1, "__sqlnotify": {}}"#, &c).is_err());
    }

    #[test]
    fn statement_payloads_decode_row_by_row() {
        let c = channel(&["id"]);
        let rows = decode_rows(
            r#"[{"id": 1, "email": "a"}, {"email": "x"}, 3, {"id": 2}]"#,
            &c,
        )
        .unwrap();
        assert_eq!(rows.len(), 4);
        assert!(matches!(&rows[0], Ok(Decoded::Row { id: Key::Single(v), .. }) if v == &json!(1)));
        assert!(rows[1].as_ref().unwrap_err().contains("row 1"));
        assert!(rows[2].as_ref().unwrap_err().contains("not a JSON object"));
        assert!(matches!(&rows[3], Ok(Decoded::Row { .. })));
        assert!(decode_rows(r#"{"id": 1}"#, &c)
            .unwrap_err()
            .contains("array"));
        assert!(decode_rows("[", &c).is_err());
        let r = decode_rows(r#"[{"__sqlnotify": {"overflow": 3}, "id": 1}]"#, &c).unwrap();
        assert!(r[0].as_ref().unwrap_err().contains("overflow"));
        assert!(decode_rows("[]", &c).unwrap().is_empty());
    }

    #[test]
    fn custom_payloads_are_checked() {
        let c = channel(&["id"]);
        assert!(encode_custom(&json!({"id": 1, "x": 2}), &c).is_ok());
        assert!(encode_custom(&json!([1]), &c)
            .unwrap_err()
            .contains("object"));
        assert!(encode_custom(&json!({"x": 2}), &c)
            .unwrap_err()
            .contains("\"id\""));
        assert!(encode_custom(&json!({"id": 1, "__sqlnotify": 1}), &c).is_err());
        let r = encode_overflow_ref(
            "0b6f1e9a-3c1d-4f2e-9a7b-5d8c2e1f0a93",
            &json!({"id": 1, "x": 2}),
            &c,
        );
        assert_eq!(
            decode(&r, &c).unwrap(),
            Decoded::Overflow {
                reference: "0b6f1e9a-3c1d-4f2e-9a7b-5d8c2e1f0a93".into(),
                id: Key::Single(json!(1))
            }
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::operation::Operation;
    use proptest::prelude::*;

    fn channel(keys: Vec<String>) -> Channel {
        Channel {
            name: "c".into(),
            schema: "public".into(),
            table: "t".into(),
            operation: Operation::Insert,
            label: None,
            key_columns: keys,
            extra_columns: vec![],
            tier: crate::tier::Tier::Notify,
            signed: false,
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(".*", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever arrives on a channel, decoding returns a result or a reason — never panics.
        #[test]
        fn decoding_arbitrary_text_never_panics(payload in ".*", keys in prop::collection::vec("[a-z]{1,3}", 1..3)) {
            let _ = decode(&payload, &channel(keys));
        }

        /// Any JSON value is either rejected with a reason or decoded consistently.
        #[test]
        fn decoding_arbitrary_json_never_panics(value in json_value()) {
            let _ = decode(&value.to_string(), &channel(vec!["id".into()]));
        }

        /// Parsing a payload object straight into its parts decodes exactly as parsing it into
        /// a `Value` first does: repeated members (the last one wins), escaped names, missing
        /// or composite keys, metadata, garbage members and trailing text alike.
        #[test]
        fn direct_parsing_decodes_like_parsing_a_value(
            members in prop::collection::vec(
                (prop_oneof![
                    Just("id".to_string()),
                    Just("k2".to_string()),
                    Just("i\\u0064".to_string()),
                    Just(META_KEY.to_string()),
                    "[a-z]{1,3}",
                ], prop_oneof![
                    json_value().prop_map(|v| v.to_string()),
                    Just(r#"{"truncated": true}"#.to_string()),
                    Just(r#"{"old": {"id": 1}, "tx": "7"}"#.to_string()),
                    Just(r#"{"tx": 7, "changed": ["a"], "tx": "\u0038"}"#.to_string()),
                    Just(r#"{"tx": 18446744073709551616, "context": {}}"#.to_string()),
                    Just(r#"{"tx": -3, "truncated": true}"#.to_string()),
                    Just(r#"{"tx": [1, {"a": null}], "q": 1}"#.to_string()),
                    Just(r#"{"truncated": false, "tx": 1}"#.to_string()),
                    Just(r#"{"overflow": "0b6f1e9a-3c1d-4f2e-9a7b-5d8c2e1f0a93", "x": 1}"#.to_string()),
                    Just("[1,".to_string()),
                ]),
                0..6,
            ),
            trailing in prop_oneof![Just(""), Just(" "), Just("x"), Just("}")],
            composite in any::<bool>(),
        ) {
            let body: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
            let payload = format!("{{{}}}{trailing}", body.join(", "));
            let keys = if composite { vec!["id".into(), "k2".into()] } else { vec!["id".into()] };
            let c = channel(keys);
            let via_value = match serde_json::from_str(&payload) {
                Ok(Value::Object(map)) => decode_map(map, &c),
                Ok(_) => Err("payload is JSON but not an object".into()),
                Err(e) => Err(format!("payload is not JSON: {e}")),
            };
            prop_assert_eq!(decode(&payload, &c), via_value);
        }

        /// A payload built from a key and extra columns decodes back to the same key and columns.
        #[test]
        fn rows_round_trip(
            id in json_value(),
            extra in prop::collection::btree_map("[a-z]{1,8}", json_value(), 0..6),
        ) {
            let mut map: Map<String, Value> = extra.into_iter().filter(|(k, _)| k != "id").collect();
            let expected_extra = map.clone();
            map.insert("id".into(), id.clone());
            let decoded = decode(&Value::Object(map).to_string(), &channel(vec!["id".into()])).unwrap();
            prop_assert_eq!(decoded, Decoded::Row { id: Key::Single(id), extra: Extra::from(expected_extra), truncated: false, change: Change::default() });
        }

        /// Old values and changed columns round-trip; any other value in their place is a
        /// reason, never a panic and never a silently accepted event.
        #[test]
        fn old_values_round_trip_and_wrong_types_are_rejected(
            old in prop::collection::btree_map("[a-z]{1,8}", json_value(), 0..6),
            changed in prop::collection::vec(".*", 0..5),
            junk in json_value(),
        ) {
            let c = channel(vec!["id".into()]);
            let old: Map<String, Value> = old.into_iter().collect();
            let meta = serde_json::json!({"old": old.clone(), "changed": changed.clone()});
            let payload = serde_json::json!({"id": 1, META_KEY: meta}).to_string();
            let expected = Change { old: Some(old), changed: Some(changed), context: None, transaction: None };
            match decode(&payload, &c) {
                Ok(Decoded::Row { change, .. }) => prop_assert_eq!(change, expected),
                other => prop_assert!(false, "{:?}", other),
            }
            for member in ["old", "changed", "context"] {
                let payload = serde_json::json!({"id": 1, META_KEY: {member: junk.clone()}}).to_string();
                let valid = match (member, &junk) {
                    ("old" | "context", Value::Object(_)) => true,
                    ("changed", Value::Array(items)) => items.iter().all(Value::is_string),
                    _ => false,
                };
                prop_assert_eq!(decode(&payload, &c).is_ok(), valid, "{}", payload);
            }
        }

        /// Context values round-trip beside old values or alone, whatever the names and values
        /// (the trigger writes any JSON the session held); the extra columns stay untouched.
        #[test]
        fn context_round_trips_alone_or_with_old_values(
            context in prop::collection::btree_map(".{0,12}", json_value(), 0..6),
            with_old in any::<bool>(),
            extra in prop::collection::btree_map("[a-z]{1,8}", json_value(), 0..4),
        ) {
            let c = channel(vec!["id".into()]);
            let context: Map<String, Value> = context.into_iter().collect();
            let extra: Map<String, Value> = extra.into_iter().filter(|(k, _)| k != "id").collect();
            let mut meta = Map::new();
            meta.insert("context".into(), Value::Object(context.clone()));
            if with_old {
                meta.insert("old".into(), serde_json::json!({"id": 1}));
            }
            let mut row = extra.clone();
            row.insert("id".into(), serde_json::json!(1));
            row.insert(META_KEY.into(), Value::Object(meta));
            match decode(&Value::Object(row.clone()).to_string(), &c) {
                Ok(Decoded::Row { change, extra: got, truncated: false, .. }) => {
                    prop_assert_eq!(change.context, Some(context));
                    prop_assert_eq!(change.old.is_some(), with_old);
                    prop_assert_eq!(got, Extra::from(extra));
                }
                other => prop_assert!(false, "{:?}", other),
            }
            // the same row inside a statement payload
            let rows = decode_rows(&Value::Array(vec![Value::Object(row)]).to_string(), &c).unwrap();
            let carried = matches!(&rows[..], [Ok(Decoded::Row { change, .. })] if change.context.is_some());
            prop_assert!(carried, "{:?}", rows);
        }

        /// Whatever a statement payload holds, decoding returns results or a reason.
        #[test]
        fn decoding_arbitrary_arrays_never_panics(value in json_value()) {
            let _ = decode_rows(&value.to_string(), &channel(vec!["id".into()]));
            let _ = decode_rows(&Value::Array(vec![value]).to_string(), &channel(vec!["id".into()]));
        }

        /// A custom payload accepted by `encode_custom` always decodes.
        #[test]
        fn accepted_custom_payloads_decode(value in json_value()) {
            let c = channel(vec!["id".into()]);
            if let Ok(text) = encode_custom(&value, &c) {
                prop_assert!(decode(&text, &c).is_ok());
            }
        }
    }
}
