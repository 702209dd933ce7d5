//! pgoutput changes turned into the events the trigger tiers' payloads would have decoded
//! to: a connection's Relation cache, and for each Insert/Update/Delete one decoded payload
//! per watched channel of its table and operation (key columns, extra columns, and for
//! `old_values` watches the old row and the changed columns). The decoder takes these as
//! they are: no JSON is written here or parsed there. Pure: unit-tested below.
//!
//! What each replica identity gives (the install refuses the combinations that would lose
//! values, see `mod.rs`): an INSERT and an UPDATE carry the new row; a DELETE carries the
//! identity's columns only (`DEFAULT`: the primary key, `USING INDEX`: the index's columns),
//! or the whole old row under `FULL`. An UPDATE carries an old row only under `FULL` (or the
//! old key when the key changed). A TOASTed value an UPDATE left unchanged is not sent by the
//! server: under `FULL` it is taken from the old row, otherwise the column is left out of the
//! event (`get` returns `None`).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::pgoutput::{self, Datum, Message, Relation, Tuple};
use super::values::to_json;
use crate::event::{Extra, Key};
use crate::operation::Operation;
use crate::payload::{Change, Decoded};

/// What one watched channel needs from a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// The channel's name, shared by every row made for it.
    pub channel: Arc<str>,
    pub schema: String,
    pub table: String,
    pub operation: Operation,
    /// Key columns, then extra columns: the channel's payload columns in order.
    pub columns: Vec<String>,
    /// How many of `columns` are key columns.
    pub keys: usize,
    /// The event carries the old row (and, on UPDATE, the changed columns).
    pub old_values: bool,
}

/// One change for one channel (or one custom event), ready for the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub channel: Arc<str>,
    /// A change: the event's parts, as the decoder reads them from a trigger tier's payload.
    pub decoded: Option<Box<Decoded>>,
    /// A custom event: its payload text (empty for a change).
    pub payload: String,
    /// The change's WAL position.
    pub lsn: u64,
    /// Its index among the transaction's rows at `lsn` ([`part_after`]).
    pub part: u32,
    /// Size of the message it was read from, in bytes (what the in-flight budget weighs).
    pub size: usize,
}

/// The part of a row at `lsn` appended to a transaction's `rows`: one more than the row
/// before when that one shares its WAL position, else 0. Rows share one because a `COPY`
/// writes up to 1,000 rows as one WAL record (every Insert pgoutput sends for it carries that
/// record's position), and because one change may feed several channels. `(lsn, part)` then
/// tells every row from every other — what effects, dead letters, the relay's message ids
/// and SSE event ids are keyed by — and is the same each time the server sends the
/// transaction again, which it decodes from the same records in the same order.
pub(crate) fn part_after(rows: &[Row], lsn: u64) -> u32 {
    match rows.last() {
        Some(row) if row.lsn == lsn => row.part.saturating_add(1),
        _ => 0,
    }
}

/// Decodes a connection's pgoutput changes; its Relation cache lives as long as the
/// connection (the server sends a Relation again on a new one).
pub(crate) struct Changes {
    routes: Arc<Vec<Route>>,
    /// By relation OID; foldhash (seeded at random) rather than SipHash: one lookup per change.
    relations: HashMap<u32, Described, foldhash::fast::RandomState>,
}

/// A table's description, with where each of its routes' columns sits in its tuples (worked
/// out once per Relation message, not per change).
struct Described {
    relation: Relation,
    /// The routes of this table: their index in [`Changes::routes`] and, for each of their
    /// columns, its position in the table (`None`: the table has no such column).
    routes: Vec<(usize, Vec<Option<usize>>)>,
}

impl Changes {
    /// Decodes for `routes`, with an empty Relation cache.
    pub fn new(routes: Arc<Vec<Route>>) -> Self {
        Changes {
            routes,
            relations: HashMap::default(),
        }
    }

    /// Forgets the Relations of a closed connection.
    pub fn reset(&mut self) {
        self.relations.clear();
    }

    /// Reads one pgoutput message at WAL position `lsn`, appending the rows it makes to
    /// `out`. An error says what was wrong with the message, or with its row for one channel
    /// (the other channels' rows are still appended).
    pub fn read(&mut self, bytes: &[u8], lsn: u64, out: &mut Vec<Row>) -> Result<(), String> {
        let (relation, operation, new, old) = match pgoutput::parse(bytes)? {
            Message::Relation(relation) => {
                let routes = (self.routes.iter().enumerate())
                    .filter(|(_, route)| {
                        route.schema == relation.schema && route.table == relation.table
                    })
                    .map(|(at, route)| {
                        let positions = (route.columns.iter())
                            .map(|name| relation.columns.iter().position(|c| &c.name == name))
                            .collect();
                        (at, positions)
                    })
                    .collect();
                self.relations
                    .insert(relation.id, Described { relation, routes });
                return Ok(());
            }
            Message::Insert { relation, new } => (relation, Operation::Insert, Some(new), None),
            // An old key ('K', an UPDATE that changed the key under DEFAULT or USING INDEX)
            // has NULL for every other column: no value to carry forward an unchanged
            // TOASTed value from, and no old row. Only a whole old row ('O', FULL) is one.
            Message::Update { relation, old, new } => (
                relation,
                Operation::Update,
                Some(new),
                old.filter(|(kind, _)| *kind == b'O').map(|(_, t)| t),
            ),
            Message::Delete { relation, old } => (relation, Operation::Delete, None, Some(old.1)),
            Message::Truncate { .. } | Message::Other(_) => return Ok(()),
        };
        let described = self
            .relations
            .get(&relation)
            .ok_or_else(|| format!("a change of relation {relation} before its description"))?;
        let mut failed = Ok(());
        for (at, positions) in &described.routes {
            let route = &self.routes[*at];
            if route.operation != operation {
                continue;
            }
            let table = Table {
                relation: &described.relation,
                positions,
            };
            match decoded(route, table, new.as_ref(), old.as_ref()) {
                Ok(decoded) => out.push(Row {
                    channel: route.channel.clone(),
                    decoded: Some(Box::new(decoded)),
                    payload: String::new(),
                    lsn,
                    part: part_after(out, lsn),
                    size: bytes.len(),
                }),
                Err(e) => failed = Err(format!("channel {}: {e}", route.channel)),
            }
        }
        failed
    }
}

/// A change's table as one route sees it.
#[derive(Clone, Copy)]
struct Table<'a> {
    relation: &'a Relation,
    /// The position in the table of each of the route's columns.
    positions: &'a [Option<usize>],
}

impl Table<'_> {
    /// The value in `tuple` of the route's column at `column` (an index into its columns):
    /// `None` when the table has no such column or its value was not sent.
    fn value(self, tuple: &Tuple, column: usize) -> Result<Option<Value>, String> {
        let r = self.relation;
        let Some(at) = self.positions.get(column).copied().flatten() else {
            return Ok(None);
        };
        match tuple.get(at) {
            None => Err(format!(
                "a tuple of {}.{} has {} values for {} columns",
                r.schema,
                r.table,
                tuple.len(),
                r.columns.len()
            )),
            Some(Datum::Null) => Ok(Some(Value::Null)),
            Some(Datum::Unchanged) => Ok(None),
            Some(Datum::Text(text)) => Ok(Some(to_json(r.columns[at].type_oid, text))),
        }
    }
}

/// The event `route`'s channel gets for a change: what the decoder would have read from the
/// payload a trigger tier writes for it.
fn decoded(
    route: &Route,
    table: Table,
    new: Option<&Tuple>,
    old: Option<&Tuple>,
) -> Result<Decoded, String> {
    let r = table.relation;
    // The row the event describes: the new one, else (DELETE) the old one.
    let row = new.or(old).ok_or("a change without a row")?;
    let carried = |column: usize| -> Result<Option<Value>, String> {
        match table.value(row, column)? {
            // An unchanged TOASTed value: the old row has it under REPLICA IDENTITY FULL.
            None if new.is_some() => match old {
                Some(old) => table.value(old, column),
                None => Ok(None),
            },
            v => Ok(v),
        }
    };
    let keys = route.keys.min(route.columns.len());
    let key = |column: usize| {
        carried(column)?.ok_or_else(|| {
            format!(
                "{}.{} sent no value for key column {:?}",
                r.schema, r.table, route.columns[column]
            )
        })
    };
    let id = match keys {
        1 => Key::Single(key(0)?),
        keys => Key::Composite((0..keys).map(key).collect::<Result<_, _>>()?),
    };
    let known = (keys..route.columns.len())
        .map(carried)
        .collect::<Result<_, _>>()?;
    let mut change = Change::default();
    if route.old_values && route.operation != Operation::Insert {
        if let Some(old) = old {
            let mut before = Map::new();
            for (at, column) in route.columns.iter().enumerate() {
                if let Some(v) = table.value(old, at)? {
                    before.insert(column.clone(), v);
                }
            }
            change.old = Some(before);
            if let (Operation::Update, Some(new)) = (route.operation, new) {
                change.changed = Some(
                    r.columns
                        .iter()
                        .zip(new.iter().zip(old.iter()))
                        .filter(|(_, (n, o))| !matches!(n, Datum::Unchanged) && n != o)
                        .map(|(c, _)| c.name.clone())
                        .collect(),
                );
            }
        }
    }
    Ok(Decoded::Row {
        id,
        extra: Extra {
            known,
            others: Map::new(),
        },
        truncated: false,
        change,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::pgoutput::tests::{relation_bytes, Bytes};
    use super::*;
    use crate::event::Channel;
    use crate::payload::decode;
    use crate::tier::Tier;

    fn route(op: Operation, old_values: bool) -> Route {
        Route {
            channel: format!("c_{}", op.as_str()).into(),
            schema: "public".into(),
            table: "t".into(),
            operation: op,
            columns: vec!["id".into(), "v".into()],
            keys: 1,
            old_values,
        }
    }

    /// Changes for `routes` that read the description of `public.t` (relation 9) with
    /// `columns`, and the rows out (none yet).
    fn described(routes: &[Route], columns: &[(&str, u32, bool)]) -> (Changes, Vec<Row>) {
        let mut c = Changes::new(Arc::new(routes.to_vec()));
        let mut out = Vec::new();
        c.read(&relation_bytes(9, b'd', columns), 1, &mut out)
            .unwrap();
        assert!(out.is_empty());
        (c, out)
    }

    /// What the decoder makes of `payload` (a trigger tier's payload) on `route`'s channel:
    /// the logical tier must hand over the same.
    fn decoded_from(route: &Route, payload: Value) -> Option<Box<Decoded>> {
        let channel = Channel {
            name: route.channel.to_string(),
            schema: route.schema.clone(),
            table: route.table.clone(),
            operation: route.operation,
            label: None,
            key_columns: route.columns[..route.keys].to_vec(),
            extra_columns: route.columns[route.keys..].to_vec(),
            tier: Tier::Logical,
            signed: false,
        };
        Some(Box::new(decode(&payload.to_string(), &channel).unwrap()))
    }

    #[test]
    fn rows_at_one_wal_position_are_numbered_in_order() {
        let mut second = route(Operation::Insert, false);
        second.channel = "c_insert_audit".into();
        let (mut c, mut out) = described(
            &[route(Operation::Insert, false), second],
            &[("id", 23, true)],
        );
        let ins = |id: &str| {
            Bytes::default()
                .u8(b'I')
                .u32(9)
                .u8(b'N')
                .tuple(&[Some(id)])
                .0
        };
        // A COPY: three Inserts at one position, each feeding two channels; then a change
        // at a position of its own, where the numbering starts again.
        for id in ["1", "2", "3"] {
            c.read(&ins(id), 7, &mut out).unwrap();
        }
        c.read(&ins("4"), 8, &mut out).unwrap();
        let parts: Vec<(u64, u32)> = out.iter().map(|r| (r.lsn, r.part)).collect();
        assert_eq!(
            parts,
            [
                (7, 0),
                (7, 1),
                (7, 2),
                (7, 3),
                (7, 4),
                (7, 5),
                (8, 0),
                (8, 1)
            ]
        );
    }

    #[test]
    fn changes_become_the_trigger_tiers_payloads() {
        let routes = vec![
            route(Operation::Insert, false),
            route(Operation::Update, true),
            route(Operation::Delete, true),
        ];
        let mut c = Changes::new(Arc::new(routes.clone()));
        let mut out = Vec::new();
        let ins = Bytes::default()
            .u8(b'I')
            .u32(9)
            .u8(b'N')
            .tuple(&[Some("1"), Some("a")])
            .0;
        assert!(
            c.read(&ins, 1, &mut out).is_err(),
            "a change before its Relation"
        );
        let rel = relation_bytes(
            9,
            b'f',
            &[("id", 23, true), ("v", 25, false), ("n", 23, false)],
        );
        c.read(&rel, 1, &mut out).unwrap();
        let ins = Bytes::default()
            .u8(b'I')
            .u32(9)
            .u8(b'N')
            .tuple(&[Some("1"), Some("a"), None])
            .0;
        c.read(&ins, 2, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!((&*out[0].channel, out[0].lsn), ("c_insert", 2));
        assert_eq!(
            out[0].decoded,
            decoded_from(&routes[0], json!({"id": 1, "v": "a"}))
        );
        assert!(out[0].payload.is_empty());
        // FULL: the old row, the changed columns, and the unchanged TOASTed value carried
        // forward from the old row.
        let upd = Bytes::default()
            .u8(b'U')
            .u32(9)
            .u8(b'O')
            .tuple(&[Some("1"), Some("big"), Some("5")])
            .u8(b'N')
            .tuple(&[Some("1"), Some("\u{0}unchanged"), Some("6")])
            .0;
        out.clear();
        c.read(&upd, 3, &mut out).unwrap();
        assert_eq!(
            out[0].decoded,
            decoded_from(
                &routes[1],
                json!({"id": 1, "v": "big", "__sqlnotify": {"old": {"id": 1, "v": "big"}, "changed": ["n"]}})
            )
        );
        let del = Bytes::default()
            .u8(b'D')
            .u32(9)
            .u8(b'O')
            .tuple(&[Some("1"), Some("x"), None])
            .0;
        out.clear();
        c.read(&del, 4, &mut out).unwrap();
        assert_eq!(
            out[0].decoded,
            decoded_from(
                &routes[2],
                json!({"id": 1, "v": "x", "__sqlnotify": {"old": {"id": 1, "v": "x"}}})
            )
        );
    }

    #[test]
    fn without_an_old_row_an_unchanged_toasted_value_is_left_out() {
        let routes = vec![route(Operation::Update, false)];
        let (mut c, mut out) = described(&routes, &[("id", 23, true), ("v", 25, false)]);
        let upd = Bytes::default()
            .u8(b'U')
            .u32(9)
            .u8(b'N')
            .tuple(&[Some("1"), Some("\u{0}unchanged")])
            .0;
        c.read(&upd, 2, &mut out).unwrap();
        assert_eq!(out[0].decoded, decoded_from(&routes[0], json!({"id": 1})));
        // An UPDATE that changed the key sends the old key ('K'), NULL in every other column:
        // the unchanged value is left out, not taken from it as a NULL.
        let key_changed = Bytes::default()
            .u8(b'U')
            .u32(9)
            .u8(b'K')
            .tuple(&[Some("1"), None])
            .u8(b'N')
            .tuple(&[Some("1001"), Some("\u{0}unchanged")])
            .0;
        out.clear();
        c.read(&key_changed, 3, &mut out).unwrap();
        assert_eq!(
            out[0].decoded,
            decoded_from(&routes[0], json!({"id": 1001}))
        );
        out.clear();
        // Another table, a short tuple: nothing, or an error naming the table.
        c.read(
            &relation_bytes(10, b'd', &[("id", 23, true), ("v", 25, false)]),
            3,
            &mut out,
        )
        .unwrap();
        let short = Bytes::default()
            .u8(b'U')
            .u32(9)
            .u8(b'N')
            .tuple(&[Some("1")])
            .0;
        let e = c.read(&short, 4, &mut out).unwrap_err();
        assert!(e.contains("public.t"), "{e}");
    }

    #[test]
    fn a_key_the_change_lacks_fails_that_channel_only() {
        let mut keyed = route(Operation::Delete, false);
        keyed.columns = vec!["v".into(), "id".into()];
        let routes = vec![route(Operation::Delete, false), keyed.clone()];
        let (mut c, mut out) = described(&routes, &[("id", 23, true), ("v", 25, false)]);
        // A key column whose value was not sent (hostile: only an UPDATE's TOASTed values
        // may be left out).
        let del = Bytes::default()
            .u8(b'D')
            .u32(9)
            .u8(b'K')
            .tuple(&[Some("7"), Some("\u{0}unchanged")])
            .0;
        let e = c.read(&del, 2, &mut out).unwrap_err();
        assert!(e.contains("c_delete") && e.contains("\"v\""), "{e}");
        assert_eq!(out.len(), 1, "the other channel's event is kept");
        assert_eq!(out[0].decoded, decoded_from(&routes[0], json!({"id": 7})));
        // A composite key, values in declared order.
        let mut composite = route(Operation::Insert, false);
        composite.keys = 2;
        let routes = vec![composite];
        let (mut c, mut out) = described(&routes, &[("id", 23, true), ("v", 25, true)]);
        let ins = Bytes::default()
            .u8(b'I')
            .u32(9)
            .u8(b'N')
            .tuple(&[Some("3"), Some("x")])
            .0;
        c.read(&ins, 2, &mut out).unwrap();
        assert_eq!(
            out[0].decoded,
            decoded_from(&routes[0], json!({"id": 3, "v": "x"}))
        );
        let Some(Decoded::Row { id, .. }) = out[0].decoded.as_deref() else {
            panic!("not a row")
        };
        assert_eq!(id, &Key::Composite(vec![json!(3), json!("x")]));
    }
}
