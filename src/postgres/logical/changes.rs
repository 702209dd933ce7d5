//! pgoutput changes turned into the payloads the trigger tiers would have written: a
//! connection's Relation cache, and for each Insert/Update/Delete one payload per watched
//! channel of its table and operation (key columns, extra columns, and for `old_values`
//! watches the old row and the changed columns). Pure: unit-tested below.
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
use crate::operation::Operation;
use crate::payload::META_KEY;

/// What one watched channel needs from a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub channel: String,
    pub schema: String,
    pub table: String,
    pub operation: Operation,
    /// Key columns, then extra columns: the payload's members in order.
    pub columns: Vec<String>,
    /// The payload carries the old row (and, on UPDATE, the changed columns).
    pub old_values: bool,
}

/// One change for one channel, ready for the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub channel: String,
    pub payload: String,
    /// The change's WAL position.
    pub lsn: u64,
}

/// Decodes a connection's pgoutput changes; its Relation cache lives as long as the
/// connection (the server sends a Relation again on a new one).
pub(crate) struct Changes {
    routes: Arc<Vec<Route>>,
    relations: HashMap<u32, Relation>,
}

impl Changes {
    /// Decodes for `routes`, with an empty Relation cache.
    pub fn new(routes: Arc<Vec<Route>>) -> Self {
        Changes {
            routes,
            relations: HashMap::new(),
        }
    }

    /// Forgets the Relations of a closed connection.
    pub fn reset(&mut self) {
        self.relations.clear();
    }

    /// Reads one pgoutput message at WAL position `lsn`, appending the rows it makes to
    /// `out`. An error says what was wrong with the message (it is skipped).
    pub fn read(&mut self, bytes: &[u8], lsn: u64, out: &mut Vec<Row>) -> Result<(), String> {
        let (relation, operation, new, old) = match pgoutput::parse(bytes)? {
            Message::Relation(r) => {
                self.relations.insert(r.id, r);
                return Ok(());
            }
            Message::Insert { relation, new } => (relation, Operation::Insert, Some(new), None),
            Message::Update { relation, old, new } => {
                (relation, Operation::Update, Some(new), old.map(|(_, t)| t))
            }
            Message::Delete { relation, old } => (relation, Operation::Delete, None, Some(old.1)),
            Message::Truncate { .. } | Message::Other(_) => return Ok(()),
        };
        let r = self
            .relations
            .get(&relation)
            .ok_or_else(|| format!("a change of relation {relation} before its description"))?;
        for route in self.routes.iter() {
            if route.operation != operation || route.schema != r.schema || route.table != r.table {
                continue;
            }
            out.push(Row {
                channel: route.channel.clone(),
                payload: payload(route, r, new.as_ref(), old.as_ref())?,
                lsn,
            });
        }
        Ok(())
    }
}

/// A column's value in a tuple: `None` when the column is unknown or its value was not sent.
fn value(r: &Relation, tuple: &Tuple, column: &str) -> Result<Option<Value>, String> {
    let Some(at) = r.columns.iter().position(|c| c.name == column) else {
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

fn payload(
    route: &Route,
    r: &Relation,
    new: Option<&Tuple>,
    old: Option<&Tuple>,
) -> Result<String, String> {
    // The row the event describes: the new one, else (DELETE) the old one.
    let row = new.or(old).ok_or("a change without a row")?;
    let mut object = Map::new();
    for column in &route.columns {
        let mut v = value(r, row, column)?;
        if v.is_none() && new.is_some() {
            // An unchanged TOASTed value: the old row has it under REPLICA IDENTITY FULL.
            if let Some(old) = old {
                v = value(r, old, column)?;
            }
        }
        if let Some(v) = v {
            object.insert(column.clone(), v);
        }
    }
    if route.old_values && route.operation != Operation::Insert {
        if let Some(old) = old {
            let mut meta = Map::new();
            let mut before = Map::new();
            for column in &route.columns {
                if let Some(v) = value(r, old, column)? {
                    before.insert(column.clone(), v);
                }
            }
            meta.insert("old".into(), Value::Object(before));
            if let (Operation::Update, Some(new)) = (route.operation, new) {
                let changed: Vec<Value> = r
                    .columns
                    .iter()
                    .zip(new.iter().zip(old.iter()))
                    .filter(|(_, (n, o))| !matches!(n, Datum::Unchanged) && n != o)
                    .map(|(c, _)| Value::String(c.name.clone()))
                    .collect();
                meta.insert("changed".into(), Value::Array(changed));
            }
            object.insert(META_KEY.into(), Value::Object(meta));
        }
    }
    Ok(Value::Object(object).to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::pgoutput::tests::{relation_bytes, Bytes};
    use super::*;

    fn route(op: Operation, old_values: bool) -> Route {
        Route {
            channel: format!("c_{}", op.as_str()),
            schema: "public".into(),
            table: "t".into(),
            operation: op,
            columns: vec!["id".into(), "v".into()],
            old_values,
        }
    }

    fn json_of(row: &Row) -> Value {
        serde_json::from_str(&row.payload).unwrap()
    }

    #[test]
    fn changes_become_the_trigger_tiers_payloads() {
        let routes = vec![
            route(Operation::Insert, false),
            route(Operation::Update, true),
            route(Operation::Delete, true),
        ];
        let mut c = Changes::new(Arc::new(routes));
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
        assert_eq!((out[0].channel.as_str(), out[0].lsn), ("c_insert", 2));
        assert_eq!(json_of(&out[0]), json!({"id": 1, "v": "a"}));
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
            json_of(&out[0]),
            json!({"id": 1, "v": "big", "__sqlnotify": {"old": {"id": 1, "v": "big"}, "changed": ["n"]}})
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
            json_of(&out[0]),
            json!({"id": 1, "v": "x", "__sqlnotify": {"old": {"id": 1, "v": "x"}}})
        );
    }

    #[test]
    fn without_an_old_row_an_unchanged_toasted_value_is_left_out() {
        let mut c = Changes::new(Arc::new(vec![route(Operation::Update, false)]));
        let mut out = Vec::new();
        c.read(
            &relation_bytes(9, b'd', &[("id", 23, true), ("v", 25, false)]),
            1,
            &mut out,
        )
        .unwrap();
        let upd = Bytes::default()
            .u8(b'U')
            .u32(9)
            .u8(b'N')
            .tuple(&[Some("1"), Some("\u{0}unchanged")])
            .0;
        c.read(&upd, 2, &mut out).unwrap();
        assert_eq!(json_of(&out[0]), json!({"id": 1}));
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
}
