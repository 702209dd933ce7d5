//! Snapshots on MySQL / MariaDB: one `REPEATABLE READ` transaction `WITH CONSISTENT SNAPSHOT`
//! on a connection of its own reads the row count, the journal ids the snapshot sees (the
//! fence) and the table's rows, page by page in key order.
//!
//! # The fence
//!
//! Journal ids come from `AUTO_INCREMENT` at insert time, not in commit order (see
//! `journal.rs`), so "every id up to the journal's head" — SQLite's fence — would skip a
//! change whose transaction took a low id and commits after the snapshot. What the snapshot
//! reflects is what it *sees*: a trigger writes its journal row in the writer's own
//! transaction, so a change is in the snapshot's rows exactly when its journal row is visible
//! in the snapshot. The fence ([`Fence::Visible`]) is therefore
//!
//! * `low`, the listener's settled low watermark ([`Watermark`]), read *before* the
//!   transaction starts (`-1`, that is 0, when the listener has not placed its cursor);
//! * `visible`, the ids above `low` on the table's channels that the snapshot sees,
//!
//! and it skips an event whose id is at most `low` or in `visible`. Why that is exact for
//! every event that reaches the feed (whose subscription is in place before the watermark is
//! read):
//!
//! * An id above `low` in `visible` committed before the snapshot was taken: the rows
//!   reflect it, and skipping it is right.
//! * An id above `low` not in `visible` had not committed when the snapshot was taken (or
//!   never commits): its change is not in the rows, and when it commits the listener reads it
//!   after the subscription was made and it reaches the feed, which passes it on.
//! * An id at or below `low`: the listener's cursor is placed once per notifier (it survives
//!   reconnects), moves its watermark only over ids it has read *and* handed to the pipeline
//!   and over ids it gave up on (the gap timeout), publishes the watermark only after that,
//!   and never delivers an id at or below it afterwards ([`Cursor::is_new`]). So such an event
//!   that still reaches the feed was read from the journal before `low` was published, that is
//!   committed before the snapshot was taken: the rows reflect it. (An id given up on is
//!   delivered to nobody: the gap-timeout limitation of `journal.rs`, the same for every
//!   subscription.)
//!
//! What bounds `visible`: it holds the table's journal rows committed between the watermark
//! and the snapshot, 8 bytes each, kept as long as the feed lives. The watermark trails the
//! newest id read only up to the oldest open gap — a transaction still running that holds an
//! id, or a rolled-back id waiting out the gap timeout (default 10 s) — so `visible` is at
//! most about a gap timeout's worth of the table's changes, and usually a handful. Where the
//! listener has not placed its cursor (a standby of a consumer group, which delivers nothing),
//! `low` is 0 and `visible` is every row of the table's channels still in the journal.
//!
//! # The rows
//!
//! Each row's payload is the expression its triggers use (`ddl::row_payload_expr`:
//! `JSON_OBJECT` with the same conversions), so a snapshot row and a change of the same row
//! decode alike. Rows are read by keyset pagination — `WHERE (keys) > (last keys) ORDER BY
//! keys LIMIT n` — in the same transaction, each page a short query of its own: a streamed
//! result set left unread while the feed is slow would be cut by the server's
//! `net_write_timeout`. On a table with a primary key the pages order by the watch's key
//! columns, then the primary key's others (unique: the pages never overlap). On a table
//! without one (keys named with `primary_keys`), the `n`-th next key is looked up first and
//! the page runs up to and including every row with that key, so rows sharing a key are never
//! split between pages. The transaction stays open until the last page (it holds InnoDB's
//! purge back meanwhile, as PostgreSQL's snapshot holds its xmin); the notifier's user needs
//! `SELECT` on the table. The watched table must be InnoDB (a MyISAM table has no snapshot).
//!
//! [`Cursor::is_new`]: super::journal::Cursor::is_new

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, Row, Value};

use super::catalog::{db_err, describe_table};
use super::ddl::{qualified, quote_ident, quote_literal, row_payload_expr, JOURNAL};
use crate::error::{Error, Result};
use crate::event::Channel;
use crate::snapshot::fence::Fence;
use crate::snapshot::reader::SnapshotReader;

/// The listener's settled low watermark, published for snapshots: every journal id up to it
/// was read and handed to the pipeline, or given up on (see the module documentation).
#[derive(Debug)]
pub(crate) struct Watermark(AtomicI64);

impl Default for Watermark {
    /// Not placed yet.
    fn default() -> Self {
        Watermark(AtomicI64::new(-1))
    }
}

impl Watermark {
    /// Publishes `low` (after every id up to it was handed over).
    pub fn set(&self, low: i64) {
        self.0.store(low.max(0), Ordering::Release);
    }

    /// The watermark, 0 when the listener has not placed its cursor.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Acquire).max(0)
    }
}

/// The alias of the table in the snapshot's queries.
const ALIAS: &str = "_sqn_r";

/// An open snapshot of one table.
pub(crate) struct MysqlSnapshot {
    /// `None` once the read ended (or failed).
    conn: Option<Conn>,
    fence: Fence,
    total: u64,
    pages: Pages,
    what: String,
}

/// How the rows are read, page by page.
#[derive(Debug, Clone, PartialEq)]
struct Pages {
    /// `FROM` the table with its alias.
    from: String,
    /// The payload expression.
    payload: String,
    /// The columns pages are ordered by (qualified with the alias).
    order: Vec<String>,
    /// Whether `order` is unique (it holds the primary key).
    unique: bool,
    chunk_rows: usize,
    /// The order columns' values of the last row read.
    after: Option<Vec<Value>>,
}

impl Pages {
    fn new(
        channel: &Channel,
        data_types: &BTreeMap<String, String>,
        primary_key: &[String],
        chunk_rows: usize,
    ) -> Self {
        let keys = &channel.key_columns;
        let order: Vec<&String> = keys
            .iter()
            .chain(primary_key.iter().filter(|c| !keys.contains(c)))
            .collect();
        Pages {
            from: format!("{} AS {ALIAS}", qualified(&channel.schema, &channel.table)),
            payload: row_payload_expr(ALIAS, channel, data_types),
            order: order
                .iter()
                .map(|c| format!("{ALIAS}.{}", quote_ident(c)))
                .collect(),
            unique: !primary_key.is_empty(),
            chunk_rows: chunk_rows.max(1),
            after: None,
        }
    }

    /// The `WHERE` clause after the last row read (empty before the first page).
    fn after_clause(&self) -> (Vec<String>, Vec<Value>) {
        match &self.after {
            Some(after) => {
                let (sql, params) = beyond(&self.order, after, false);
                (vec![sql], params)
            }
            None => (Vec::new(), Vec::new()),
        }
    }

    /// The next page's query and its parameters: `chunk_rows` rows, or — for a table without a
    /// primary key — every row up to and including the key `upto` (from [`boundary_sql`]), or
    /// all the rest when there is none.
    ///
    /// [`boundary_sql`]: Self::boundary_sql
    fn page_sql(&self, upto: Option<&[Value]>) -> (String, Vec<Value>) {
        let (mut conditions, mut params) = self.after_clause();
        if let Some(upto) = upto {
            let (sql, more) = beyond(&self.order, upto, true);
            conditions.push(format!("NOT ({sql})"));
            params.extend(more);
        }
        let mut sql = format!(
            "SELECT {}, {} FROM {}",
            self.payload,
            self.order.join(", "),
            self.from
        );
        if !conditions.is_empty() {
            sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
        }
        sql.push_str(&format!(" ORDER BY {}", self.order.join(", ")));
        if upto.is_none() && self.unique {
            sql.push_str(&format!(" LIMIT {}", self.chunk_rows));
        }
        (sql, params)
    }

    /// For a table without a primary key: the query of the `chunk_rows`-th next key.
    fn boundary_sql(&self) -> (String, Vec<Value>) {
        let (conditions, params) = self.after_clause();
        let mut sql = format!("SELECT {} FROM {}", self.order.join(", "), self.from);
        if !conditions.is_empty() {
            sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
        }
        sql.push_str(&format!(
            " ORDER BY {} LIMIT 1 OFFSET {}",
            self.order.join(", "),
            self.chunk_rows - 1
        ));
        (sql, params)
    }
}

/// A condition on `columns` (in `ORDER BY … ASC` order, where NULL comes first) selecting the
/// rows strictly after `values`. With `negatable`, every test is wrapped in
/// `COALESCE(…, FALSE)` so that the condition is never unknown (`c = ?` and `c > ?` are
/// unknown, where they mean false, on a NULL column) and `NOT (…)` selects exactly the rows
/// up to and including `values`; without, it stays plain for the range optimizer.
fn beyond(columns: &[String], values: &[Value], negatable: bool) -> (String, Vec<Value>) {
    // for some i: equal on the first i columns and greater on column i
    let mut alternatives = Vec::new();
    let mut params = Vec::new();
    for i in 0..columns.len() {
        let mut terms = Vec::new();
        let mut term_params = Vec::new();
        for (column, value) in columns[..i].iter().zip(values) {
            if *value == Value::NULL {
                terms.push(format!("{column} IS NULL"));
            } else {
                terms.push(format!("{column} = ?"));
                term_params.push(value.clone());
            }
        }
        let (column, value) = (&columns[i], &values[i]);
        if *value == Value::NULL {
            terms.push(format!("{column} IS NOT NULL"));
        } else {
            terms.push(format!("{column} > ?"));
            term_params.push(value.clone());
        }
        alternatives.push(format!("({})", terms.join(" AND ")));
        params.extend(term_params);
    }
    if alternatives.is_empty() {
        return ("FALSE".to_string(), params);
    }
    let sql = alternatives.join(" OR ");
    if !negatable {
        (format!("({sql})"), params)
    } else {
        let wrapped: Vec<String> = alternatives
            .iter()
            .map(|a| format!("COALESCE({a}, FALSE)"))
            .collect();
        (format!("({})", wrapped.join(" OR ")), params)
    }
}

impl MysqlSnapshot {
    /// Opens the read: the table's description, the transaction, the row count and the
    /// fence. `low` is the listener's watermark, read before this is called.
    pub async fn open(
        opts: Opts,
        database: &str,
        channel: Arc<Channel>,
        channels: Vec<String>,
        low: i64,
        chunk_rows: usize,
    ) -> Result<Self> {
        let what = format!(
            "reading a snapshot of {}.{}",
            channel.schema(),
            channel.table()
        );
        let mut conn = Conn::new(opts)
            .await
            .map_err(db_err(format!("{what}: connecting")))?;
        let table = describe_table(&mut conn, channel.schema(), channel.table()).await?;
        let data_types: BTreeMap<String, String> = table
            .columns
            .iter()
            .filter(|c| channel.carries(&c.name))
            .map(|c| (c.name.clone(), c.data_type.clone()))
            .collect();
        let pages = Pages::new(&channel, &data_types, &table.primary_key(), chunk_rows);
        conn.query_drop("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await
            .map_err(db_err(what.clone()))?;
        // InnoDB takes the snapshot here: the count, the journal ids and every page read
        // afterwards see exactly what it says.
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            .await
            .map_err(db_err(what.clone()))?;
        let total: Option<i64> = conn
            .query_first(format!("SELECT COUNT(*) FROM {}", pages.from))
            .await
            .map_err(db_err(what.clone()))?;
        let names: Vec<String> = channels.iter().map(|c| quote_literal(c)).collect();
        let ids: Vec<i64> = conn
            .query(format!(
                "SELECT `id` FROM {} WHERE `id` > {low} AND `channel` IN ({}) ORDER BY `id`",
                qualified(database, JOURNAL),
                names.join(", ")
            ))
            .await
            .map_err(db_err(what.clone()))?;
        log::debug!(
            "sqlnotify: {what}: fenced at journal id {low} and {} ids above it",
            ids.len()
        );
        Ok(MysqlSnapshot {
            conn: Some(conn),
            fence: Fence::visible(low, ids),
            total: total.unwrap_or(0).max(0) as u64,
            pages,
            what,
        })
    }

    /// The next page, ending the read after the last one.
    async fn page(&mut self) -> Result<Vec<String>> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        let pages = &self.pages;
        let what = &self.what;
        let (rows, last): (Vec<Row>, bool) = if pages.unique {
            let (sql, params) = pages.page_sql(None);
            let rows: Vec<Row> = conn.exec(sql, params).await.map_err(db_err(what))?;
            let last = rows.len() < pages.chunk_rows;
            (rows, last)
        } else {
            let (sql, params) = pages.boundary_sql();
            let upto: Option<Row> = conn.exec_first(sql, params).await.map_err(db_err(what))?;
            let upto = upto.map(Row::unwrap);
            let (sql, params) = pages.page_sql(upto.as_deref());
            let rows: Vec<Row> = conn.exec(sql, params).await.map_err(db_err(what))?;
            (rows, upto.is_none())
        };
        let mut payloads = Vec::with_capacity(rows.len());
        let mut after = None;
        for row in rows {
            let mut values = row.unwrap().into_iter();
            match values.next() {
                Some(Value::Bytes(bytes)) => payloads.push(
                    String::from_utf8(bytes)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                ),
                other => {
                    return Err(Error::Database {
                        context: what.clone(),
                        source: format!("a row's payload came as {other:?}").into(),
                    })
                }
            }
            after = Some(values.collect::<Vec<Value>>());
        }
        if after.is_some() {
            self.pages.after = after;
        }
        if last {
            self.finish().await?;
        }
        Ok(payloads)
    }

    /// Ends the transaction and the connection.
    async fn finish(&mut self) -> Result<()> {
        if let Some(mut conn) = self.conn.take() {
            conn.query_drop("COMMIT")
                .await
                .map_err(db_err(self.what.clone()))?;
            let _ = conn.disconnect().await;
        }
        Ok(())
    }
}

impl SnapshotReader for MysqlSnapshot {
    fn fence(&self) -> &Fence {
        &self.fence
    }

    fn total(&self) -> u64 {
        self.total
    }

    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            let page = self.page().await;
            if page.is_err() {
                // (dropped: the server rolls the read back)
                self.conn = None;
            }
            page
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operation::Operation;
    use crate::tier::Tier;

    fn channel(keys: &[&str]) -> Channel {
        Channel {
            name: "c".into(),
            schema: "Shop".into(),
            table: "order`s".into(),
            operation: Operation::Insert,
            label: None,
            key_columns: keys.iter().map(|k| k.to_string()).collect(),
            extra_columns: vec!["at".into()],
            tier: Tier::Durable,
            signed: false,
        }
    }

    fn types() -> BTreeMap<String, String> {
        [("at".to_string(), "datetime".to_string())].into()
    }

    #[test]
    fn pages_follow_the_key_then_the_rest_of_the_primary_key() {
        let mut pages = Pages::new(
            &channel(&["b"]),
            &types(),
            &["a".to_string(), "b".to_string()],
            500,
        );
        assert!(pages.unique);
        assert_eq!(pages.order, ["_sqn_r.`b`", "_sqn_r.`a`"]);
        let (sql, params) = pages.page_sql(None);
        assert_eq!(
            sql,
            "SELECT COALESCE(JSON_OBJECT('b', _sqn_r.`b`, 'at', CAST(_sqn_r.`at` AS CHAR)), \
             JSON_INSERT(JSON_OBJECT('b', _sqn_r.`b`), '$.__sqlnotify', JSON_OBJECT('truncated', TRUE))), \
             _sqn_r.`b`, _sqn_r.`a` FROM `Shop`.`order``s` AS _sqn_r ORDER BY _sqn_r.`b`, _sqn_r.`a` LIMIT 500"
        );
        assert!(params.is_empty());
        pages.after = Some(vec![Value::Int(7), Value::Bytes(b"x".to_vec())]);
        let (sql, params) = pages.page_sql(None);
        assert!(
            sql.ends_with(
                " FROM `Shop`.`order``s` AS _sqn_r WHERE ((_sqn_r.`b` > ?) OR (_sqn_r.`b` = ? AND _sqn_r.`a` > ?)) \
                 ORDER BY _sqn_r.`b`, _sqn_r.`a` LIMIT 500"
            ),
            "{sql}"
        );
        assert_eq!(
            params,
            [Value::Int(7), Value::Int(7), Value::Bytes(b"x".to_vec())]
        );
    }

    #[test]
    fn without_a_primary_key_pages_end_on_a_key_boundary() {
        let mut pages = Pages::new(&channel(&["k"]), &types(), &[], 100);
        assert!(!pages.unique);
        let (sql, params) = pages.boundary_sql();
        assert_eq!(
            sql,
            "SELECT _sqn_r.`k` FROM `Shop`.`order``s` AS _sqn_r ORDER BY _sqn_r.`k` LIMIT 1 OFFSET 99"
        );
        assert!(params.is_empty());
        pages.after = Some(vec![Value::NULL]);
        let (sql, params) = pages.page_sql(Some(&[Value::Int(5)]));
        assert!(
            sql.ends_with(
                " WHERE ((_sqn_r.`k` IS NOT NULL)) AND NOT ((COALESCE((_sqn_r.`k` > ?), FALSE))) \
                 ORDER BY _sqn_r.`k`"
            ),
            "{sql}"
        );
        assert_eq!(params, [Value::Int(5)]);
    }

    #[test]
    fn the_watermark_is_zero_until_placed() {
        let w = Watermark::default();
        assert_eq!(w.get(), 0);
        w.set(42);
        assert_eq!(w.get(), 42);
    }
}
