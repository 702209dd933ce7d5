//! Snapshots on MySQL / MariaDB: one `REPEATABLE READ` transaction `WITH CONSISTENT SNAPSHOT`
//! on a connection of its own reads the row count, the journal ids the snapshot sees (the
//! fence) and the table's rows, page by page in the order of an index.
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
//!   and over ids it gave up on (rolled back: no row held them after the gap timeout),
//!   publishes the watermark only after that, and never delivers an id at or below it
//!   afterwards ([`Cursor::is_new`]). So such an event that still reaches the feed was read
//!   from the journal before `low` was published, that is committed before the snapshot was
//!   taken: the rows reflect it.
//!
//! What bounds `visible`: it holds the table's journal rows committed between the watermark
//! and the snapshot, 8 bytes each, kept as long as the feed lives. The watermark trails the
//! newest id read only up to the oldest open gap — a transaction still running that holds an
//! id (for as long as it runs), or a rolled-back id waiting out the gap timeout (default
//! 10 s) — so `visible` is about a gap timeout's worth of the table's changes, or what was
//! written while the oldest transaction still running has been open, and usually a handful.
//! Where the
//! listener has not placed its cursor (a standby of a consumer group, which delivers nothing),
//! `low` is 0 and `visible` is every row of the table's channels still in the journal.
//!
//! # The rows
//!
//! Each row's payload is the expression its triggers use (`ddl::row_payload_expr`:
//! `JSON_OBJECT` with the same conversions), so a snapshot row and a change of the same row
//! decode alike. Rows are read by keyset pagination — `WHERE (cols) > (last cols) ORDER BY
//! cols LIMIT n`, the comparison spelt out as plain `c > ?` / `c = ?` terms the range
//! optimizer reads — in the same transaction, each page a short query of its own: a streamed
//! result set left unread while the feed is slow would be cut by the server's
//! `net_write_timeout`. A `DECIMAL` value goes back as `CAST(? AS DECIMAL(p, s))`: it comes
//! as text, and MySQL compares a decimal with text as doubles. `ORDER BY` sorts an `ENUM` by
//! its members' definition order and a `SET` or `BIT` by number, not by text, so "after an
//! `ENUM` value" is the list of members after it (`c IN (…)`: still a range), and a `SET` or
//! `BIT` value is read and compared as a number (`c+0`, an integer parameter).
//!
//! The columns (`choose_order`) are those of an index, so that each page is a range read of
//! `n` index entries — ordering by columns no index has would sort the rest of the table on
//! every page. The watch's key order when an index has it (the primary key, or an index the
//! key columns lead; a non-unique one followed by the primary key's other columns), else the
//! primary key's order, else a unique index on `NOT NULL` columns. The fence does not care
//! about the order (it is by journal visibility), only that every page uses the same total
//! order, so that no row is read twice or missed. On a table with neither (keys named with
//! `primary_keys`), the pages follow the key columns: the `n`-th next key is looked up first
//! and the page runs up to and including every row with that key, so rows sharing a key are
//! never split between pages; an index the key columns lead serves both queries, and without
//! one each page scans and sorts the table (a warning says so).
//!
//! The transaction stays open until the last page (it holds InnoDB's purge back meanwhile, as
//! PostgreSQL's snapshot holds its xmin); the notifier's user needs `SELECT` on the table.
//! The watched table must be InnoDB (a MyISAM table has no snapshot). Each page's query, its
//! parameters inlined, is logged at trace level (for `EXPLAIN`).
//!
//! [`Cursor::is_new`]: super::journal::Cursor::is_new

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use mysql_async::prelude::*;
use mysql_async::{Conn, Row, Value};

use super::catalog::{db_err, describe_table};
use super::ddl::{qualified, quote_ident, quote_literal, row_payload_expr, JOURNAL};
use super::tls::MysqlConfig;
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

/// An index of the table, as the snapshot's choice of order sees it.
#[derive(Debug, Clone, PartialEq)]
struct Index {
    /// `PRIMARY` for the primary key.
    name: String,
    /// Its columns in index order.
    columns: Vec<String>,
    /// A unique index.
    unique: bool,
    /// One of its columns is nullable (so a unique index does not order the rows totally:
    /// NULLs repeat).
    nullable: bool,
}

impl Index {
    /// Whether its columns order the rows totally: unique, on `NOT NULL` columns.
    fn total(&self) -> bool {
        self.unique && !self.nullable
    }
}

/// The order pages are read in: columns, and whether they order the rows totally.
#[derive(Debug, Clone, PartialEq)]
struct Order {
    columns: Vec<String>,
    /// The columns are unique (`LIMIT n` pages never overlap); otherwise pages end on a
    /// key boundary (see [`Pages::boundary_sql`]).
    unique: bool,
    /// Whether the rows come in the watch's key order.
    key_order: bool,
    /// The index that serves the order (otherwise each page scans the table).
    index: Option<String>,
}

impl Order {
    fn indexed(index: &str, columns: Vec<String>, key_order: bool) -> Self {
        Order {
            columns,
            unique: true,
            key_order,
            index: Some(index.to_string()),
        }
    }
}

/// Chooses the order of the pages so that an index serves it — each page a range read of
/// `chunk_rows` index entries, no sort — preferring one that is also the watch's key order
/// (the page queries name that index with `FORCE INDEX`: on a first page, which has no range,
/// the optimizer would otherwise often scan and sort the table for the top `n`):
///
/// 1. the primary key, when the key columns lead it;
/// 2. an index that the key columns lead: a unique one on `NOT NULL` columns as it is; a
///    non-unique one followed by the primary key's other columns (InnoDB keeps them in every
///    secondary index entry, and the optimizer reads the index in that order);
/// 3. otherwise the primary key (rows come in its order, not the key's);
/// 4. without one, a unique index on `NOT NULL` columns (InnoDB's clustered index then);
/// 5. without any, the key columns, in pages that end on a key boundary — served by an index
///    that the key columns lead if there is one; if not, each page scans the table.
///
/// The order of the rows does not matter to the fence (which is by journal visibility): it
/// only has to be the same on every page, and total or cut on key boundaries, so that no row
/// is read twice or never. A unique index on nullable columns is not total (NULLs repeat), and
/// is not extended with the primary key either: the optimizer does not read a unique index in
/// that order, and would sort every page.
fn choose_order(keys: &[String], primary_key: &[String], indexes: &[Index]) -> Order {
    let leads = |columns: &[String]| {
        !keys.is_empty() && columns.len() >= keys.len() && columns[..keys.len()] == *keys
    };
    if !primary_key.is_empty() && leads(primary_key) {
        return Order::indexed("PRIMARY", primary_key.to_vec(), true);
    }
    // (sorted: the same choice every time)
    let mut indexes: Vec<&Index> = indexes.iter().filter(|i| i.name != "PRIMARY").collect();
    indexes.sort_by(|a, b| (a.columns.len(), &a.name).cmp(&(b.columns.len(), &b.name)));
    // each index's total order, if it has one: a unique index on NOT NULL columns, or a
    // non-unique one followed by the primary key's other columns
    let total = |index: &Index| -> Option<Vec<String>> {
        if index.total() {
            Some(index.columns.clone())
        } else if !index.unique && !primary_key.is_empty() {
            let mut columns = index.columns.clone();
            columns.extend(
                primary_key
                    .iter()
                    .filter(|c| !index.columns.contains(c))
                    .cloned(),
            );
            Some(columns)
        } else {
            None
        }
    };
    // unique ones first
    for unique in [true, false] {
        for index in indexes.iter().filter(|i| i.total() == unique) {
            if let Some(columns) = total(index).filter(|c| leads(c)) {
                return Order::indexed(&index.name, columns, true);
            }
        }
    }
    if !primary_key.is_empty() {
        return Order::indexed("PRIMARY", primary_key.to_vec(), false);
    }
    if let Some(index) = indexes.iter().find(|i| i.total()) {
        return Order::indexed(&index.name, index.columns.clone(), false);
    }
    Order {
        columns: keys.to_vec(),
        unique: false,
        key_order: true,
        index: indexes
            .iter()
            .find(|i| leads(&i.columns))
            .map(|i| i.name.clone()),
    }
}

/// An order column whose values need more than a plain `c > ?` to be compared in the order
/// `ORDER BY` sorts them (from `describe_indexes`).
#[derive(Debug, Clone, PartialEq)]
enum ColumnKind {
    /// `DECIMAL(p, s)`: its value comes back as text, and MySQL compares a decimal with text as
    /// a double, which would confuse keys that differ beyond a double's 17 digits.
    Decimal(u32, u32),
    /// `ENUM`, its members in definition order: `ORDER BY` sorts by a member's position, not
    /// its text, so "after `'b'`" is spelt as the members after it, `c IN ('a', …)` — a range
    /// of the index, where a comparison by position (`c > 1`) would make every page scan the
    /// index from its start.
    Enum(Vec<String>),
    /// `SET` or `BIT`: sorted by number, so the value is read as one (`c+0`) and compared as
    /// one (an integer parameter puts the column in a numeric context). A `BIT` comparison is
    /// a range of the index; a `SET` one is not (MySQL reads the index from its start, pages
    /// after pages: slower, never wrong).
    Numeric,
}

/// How a page compares one order column with the last value read (see [`compare`]).
#[derive(Debug, Clone, PartialEq)]
enum Compared {
    /// `c > p`, `c = p` with this placeholder `p` (`?`, or a cast of it).
    Placeholder(String),
    /// An `ENUM` column's members in definition order: `c = ?` with the member's text, and
    /// "after" or "before" it as `c IN (the members after or before it)`.
    Enum(Vec<String>),
}

/// How the rows are read, page by page.
#[derive(Debug, Clone, PartialEq)]
struct Pages {
    /// The table with its alias.
    table: String,
    /// `FROM` the table with its alias and the index hint.
    from: String,
    /// The payload expression.
    payload: String,
    /// The columns pages are ordered by (qualified with the alias).
    order: Vec<String>,
    /// What each page reads of `order`'s values: the column, or `c+0` for a `SET` or `BIT`
    /// one ([`ColumnKind::Numeric`]).
    selected: Vec<String>,
    /// How each of `order`'s values is compared: with `?`, `CAST(? AS DECIMAL(p, s))` for a
    /// `DECIMAL` column, or by its members for an `ENUM` one ([`ColumnKind`]).
    compared: Vec<Compared>,
    /// Whether `order` is unique.
    unique: bool,
    chunk_rows: usize,
    /// The order columns' values of the last row read.
    after: Option<Vec<Value>>,
}

impl Pages {
    fn new(
        channel: &Channel,
        data_types: &BTreeMap<String, String>,
        order: &Order,
        kinds: &BTreeMap<String, ColumnKind>,
        chunk_rows: usize,
    ) -> Self {
        let table = format!("{} AS {ALIAS}", qualified(&channel.schema, &channel.table));
        let column = |c: &String| format!("{ALIAS}.{}", quote_ident(c));
        Pages {
            from: match &order.index {
                Some(index) => format!("{table} FORCE INDEX ({})", quote_ident(index)),
                None => table.clone(),
            },
            table,
            payload: row_payload_expr(ALIAS, channel, data_types),
            order: order.columns.iter().map(column).collect(),
            selected: order
                .columns
                .iter()
                .map(|c| match kinds.get(c) {
                    Some(ColumnKind::Numeric) => format!("{}+0", column(c)),
                    _ => column(c),
                })
                .collect(),
            compared: order
                .columns
                .iter()
                .map(|c| match kinds.get(c) {
                    Some(ColumnKind::Decimal(precision, scale)) => {
                        Compared::Placeholder(format!("CAST(? AS DECIMAL({precision}, {scale}))"))
                    }
                    Some(ColumnKind::Enum(members)) => Compared::Enum(members.clone()),
                    Some(ColumnKind::Numeric) | None => Compared::Placeholder("?".to_string()),
                })
                .collect(),
            unique: order.unique,
            chunk_rows: chunk_rows.max(1),
            after: None,
        }
    }

    /// The order columns with how each is compared.
    fn columns(&self) -> Vec<(&str, &Compared)> {
        self.order
            .iter()
            .map(String::as_str)
            .zip(self.compared.iter())
            .collect()
    }

    /// The `WHERE` clause after the last row read (empty before the first page).
    fn after_clause(&self) -> (Vec<String>, Vec<Value>) {
        match &self.after {
            Some(after) => {
                let (sql, params) = compare(&self.columns(), after, Side::After);
                (vec![sql], params)
            }
            None => (Vec::new(), Vec::new()),
        }
    }

    /// The next page's query and its parameters: `chunk_rows` rows, or — for a table without a
    /// unique order — every row up to and including the key `upto` (from [`boundary_sql`]),
    /// or all the rest when there is none.
    ///
    /// [`boundary_sql`]: Self::boundary_sql
    fn page_sql(&self, upto: Option<&[Value]>) -> (String, Vec<Value>) {
        let (mut conditions, mut params) = self.after_clause();
        if let Some(upto) = upto {
            let (sql, more) = compare(&self.columns(), upto, Side::UpTo);
            conditions.push(sql);
            params.extend(more);
        }
        let mut sql = format!(
            "SELECT {}, {} FROM {}",
            self.payload,
            self.selected.join(", "),
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

    /// For a table without a unique order: the query of the `chunk_rows`-th next key.
    fn boundary_sql(&self) -> (String, Vec<Value>) {
        let (conditions, params) = self.after_clause();
        let mut sql = format!("SELECT {} FROM {}", self.selected.join(", "), self.from);
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

/// Which rows [`compare`] selects.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    /// Strictly after the values.
    After,
    /// Up to and including the values.
    UpTo,
}

/// A condition on `columns` (each with its placeholder, in `ORDER BY … ASC` order, where NULL
/// comes first) selecting the rows strictly after `values`, or up to and including them. It
/// is a disjunction of plain comparisons (`c > ?`, `c = ?`, `c IS NULL`, …) that the range
/// optimizer turns into ranges of an index on the columns. A comparison with a NULL column is
/// unknown, which is false here: the condition is only ever used as it is, never negated.
/// An `ENUM` column's "beyond" is the list of its members beyond the value (none: that
/// alternative selects nothing and is left out).
fn compare(columns: &[(&str, &Compared)], values: &[Value], side: Side) -> (String, Vec<Value>) {
    // for some i: equal on the first i columns and beyond on column i (UpTo: or equal on all)
    let mut alternatives = Vec::new();
    let mut params = Vec::new();
    let equal = |column: &str, compared: &Compared, value: &Value, params: &mut Vec<Value>| {
        if *value == Value::NULL {
            format!("{column} IS NULL")
        } else {
            params.push(value.clone());
            match compared {
                Compared::Placeholder(placeholder) => format!("{column} = {placeholder}"),
                Compared::Enum(_) => format!("{column} = ?"),
            }
        }
    };
    for i in 0..=columns.len() {
        if i == columns.len() && side == Side::After {
            break;
        }
        let mut terms = Vec::new();
        let mut term_params = Vec::new();
        for ((column, compared), value) in columns[..i].iter().zip(values) {
            terms.push(equal(column, compared, value, &mut term_params));
        }
        if let (Some((column, compared)), Some(value)) = (columns.get(i), values.get(i)) {
            match (side, *value == Value::NULL, compared) {
                (Side::After, true, _) => terms.push(format!("{column} IS NOT NULL")),
                (Side::After, false, Compared::Placeholder(placeholder)) => {
                    terms.push(format!("{column} > {placeholder}"));
                    term_params.push(value.clone());
                }
                (Side::After, false, Compared::Enum(members)) => {
                    let (_, after) = enum_split(members, value);
                    if after.is_empty() {
                        continue;
                    }
                    terms.push(format!("{column} IN ({})", literals(after)));
                }
                // nothing comes before NULL
                (Side::UpTo, true, _) => continue,
                (Side::UpTo, false, Compared::Placeholder(placeholder)) => {
                    terms.push(format!("({column} < {placeholder} OR {column} IS NULL)"));
                    term_params.push(value.clone());
                }
                (Side::UpTo, false, Compared::Enum(members)) => {
                    let (before, _) = enum_split(members, value);
                    if before.is_empty() {
                        terms.push(format!("{column} IS NULL"));
                    } else {
                        terms.push(format!(
                            "({column} IN ({}) OR {column} IS NULL)",
                            literals(before)
                        ));
                    }
                }
            }
        }
        alternatives.push(format!("({})", terms.join(" AND ")));
        params.extend(term_params);
    }
    if alternatives.is_empty() {
        return ("FALSE".to_string(), params);
    }
    (format!("({})", alternatives.join(" OR ")), params)
}

/// An `ENUM`'s members before and after `value` (the text of one of them; any other text —
/// the empty error value, whose position 0 sorts first — comes before every member).
fn enum_split<'m>(members: &'m [String], value: &Value) -> (&'m [String], &'m [String]) {
    let text: &[u8] = match value {
        Value::Bytes(bytes) => bytes,
        _ => &[],
    };
    match members.iter().position(|m| m.as_bytes() == text) {
        Some(i) => (&members[..i], &members[i + 1..]),
        None => (&[], members),
    }
}

/// `members` as a list of SQL string literals.
fn literals(members: &[String]) -> String {
    let quoted: Vec<String> = members.iter().map(|m| quote_literal(m)).collect();
    quoted.join(", ")
}

/// The members of an `ENUM` from its `COLUMN_TYPE` (`enum('a','b''c')`: quotes doubled);
/// `None` when it does not read as one, or when a member is empty (the error value's text
/// too: the two would not be told apart) or holds a backslash (whose spelling there the
/// parse does not rely on) — the column is then compared by number.
fn enum_members(column_type: &str) -> Option<Vec<String>> {
    let list = column_type
        .strip_prefix("enum(")
        .or_else(|| column_type.strip_prefix("ENUM("))?
        .strip_suffix(')')?;
    let mut members = Vec::new();
    let mut chars = list.chars().peekable();
    loop {
        if chars.next()? != '\'' {
            return None;
        }
        let mut member = String::new();
        loop {
            match chars.next()? {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    member.push('\'');
                }
                '\'' => break,
                c => member.push(c),
            }
        }
        members.push(member);
        match chars.next() {
            None if members.iter().any(|m| m.is_empty() || m.contains('\\')) => return None,
            None => return Some(members),
            Some(',') => {}
            Some(_) => return None,
        }
    }
}

/// `sql` with its `?` placeholders replaced by `params` as SQL literals, for the trace log
/// (a statement to run `EXPLAIN` on). Placeholders inside quoted strings and identifiers
/// are left alone.
fn inline(sql: &str, params: &[Value]) -> String {
    let mut params = params.iter();
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    for c in sql.chars() {
        match (quote, c) {
            (None, '\'' | '`') => quote = Some(c),
            (Some(q), _) if q == c => quote = None,
            (None, '?') => {
                out.push_str(&match params.next() {
                    Some(Value::Bytes(bytes)) => match std::str::from_utf8(bytes) {
                        Ok(text) => quote_literal(text),
                        Err(_) => {
                            let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
                            format!("X'{hex}'")
                        }
                    },
                    Some(Value::Int(i)) => i.to_string(),
                    Some(Value::UInt(u)) => u.to_string(),
                    Some(Value::Float(f)) => f.to_string(),
                    Some(Value::Double(d)) => d.to_string(),
                    Some(value) => value.as_sql(false),
                    None => "?".to_string(),
                });
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// The table's B-tree indexes that order rows by whole column values (no prefix or
/// functional parts), and its columns that a page compares in a way of their own
/// ([`ColumnKind`]: `DECIMAL`, `ENUM`, `SET`, `BIT`).
async fn describe_indexes(
    conn: &mut Conn,
    schema: &str,
    table: &str,
) -> std::result::Result<(Vec<Index>, BTreeMap<String, ColumnKind>), mysql_async::Error> {
    type Part = (
        String,
        String,
        String,
        i64,
        Option<String>,
        i64,
        String,
        String,
    );
    let parts: Vec<Part> = conn
        .exec(
            "SELECT s.TABLE_SCHEMA, s.TABLE_NAME, s.INDEX_NAME, CAST(s.NON_UNIQUE AS SIGNED), \
               s.COLUMN_NAME, CAST(s.SUB_PART IS NOT NULL AS SIGNED), s.INDEX_TYPE, \
               COALESCE(c.IS_NULLABLE, '') \
             FROM information_schema.STATISTICS s LEFT JOIN information_schema.COLUMNS c \
               ON c.TABLE_SCHEMA = s.TABLE_SCHEMA AND c.TABLE_NAME = s.TABLE_NAME \
               AND c.COLUMN_NAME = s.COLUMN_NAME \
             WHERE s.TABLE_SCHEMA = ? AND s.TABLE_NAME = ? ORDER BY s.INDEX_NAME, s.SEQ_IN_INDEX",
            (schema, table),
        )
        .await?;
    let mut indexes: Vec<(Index, bool)> = Vec::new();
    for (s, t, name, non_unique, column, prefix, kind, nullable) in parts {
        if s != schema || t != table {
            continue;
        }
        if indexes.last().is_none_or(|(i, _)| i.name != name) {
            indexes.push((
                Index {
                    name: name.clone(),
                    columns: Vec::new(),
                    unique: non_unique == 0,
                    nullable: false,
                },
                true,
            ));
        }
        let (index, usable) = indexes.last_mut().expect("just pushed");
        match column {
            Some(column) if prefix == 0 && kind.eq_ignore_ascii_case("BTREE") => {
                index.columns.push(column);
                index.nullable |= nullable.eq_ignore_ascii_case("YES");
            }
            _ => *usable = false,
        }
    }
    let indexes = indexes
        .into_iter()
        .filter(|(i, usable)| *usable && !i.columns.is_empty())
        .map(|(i, _)| i)
        .collect();
    type Typed = (String, String, String, String, String, u32, u32);
    let typed: Vec<Typed> = conn
        .exec(
            "SELECT TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME, LOWER(DATA_TYPE), \
               CAST(COLUMN_TYPE AS CHAR), CAST(COALESCE(NUMERIC_PRECISION, 0) AS UNSIGNED), \
               CAST(COALESCE(NUMERIC_SCALE, 0) AS UNSIGNED) \
             FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
               AND LOWER(DATA_TYPE) IN ('decimal', 'enum', 'set', 'bit')",
            (schema, table),
        )
        .await?;
    let mut kinds = BTreeMap::new();
    for (s, t, column, data_type, column_type, precision, scale) in typed {
        if s != schema || t != table {
            continue;
        }
        let kind = match data_type.as_str() {
            "decimal" => ColumnKind::Decimal(precision, scale),
            // (an ENUM whose type does not read as one: by number, which is never wrong)
            "enum" => enum_members(&column_type).map_or(ColumnKind::Numeric, ColumnKind::Enum),
            _ => ColumnKind::Numeric,
        };
        kinds.insert(column, kind);
    }
    Ok((indexes, kinds))
}

impl MysqlSnapshot {
    /// Opens the read: the table's description, the transaction, the row count and the
    /// fence. `low` is the listener's watermark, read before this is called.
    pub async fn open(
        opts: MysqlConfig,
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
        let mut conn = opts
            .connect()
            .await
            .map_err(db_err(format!("{what}: connecting")))?;
        let table = describe_table(&mut conn, channel.schema(), channel.table()).await?;
        let data_types: BTreeMap<String, String> = table
            .columns
            .iter()
            .filter(|c| channel.carries(&c.name))
            .map(|c| (c.name.clone(), c.data_type.clone()))
            .collect();
        let (indexes, kinds) = describe_indexes(&mut conn, channel.schema(), channel.table())
            .await
            .map_err(db_err(format!("{what}: reading its indexes")))?;
        let order = choose_order(&channel.key_columns, &table.primary_key(), &indexes);
        if order.index.is_some() {
            log::debug!(
                "sqlnotify: {what}: pages ordered by {:?}, {}",
                order.columns,
                if order.key_order {
                    "the key's order"
                } else {
                    "an index's order, not the key's"
                }
            );
        } else {
            log::warn!(
                "sqlnotify: {what}: the table has no primary key, no unique index on NOT NULL \
                 columns and no index that its key ({}) leads, so every page of {chunk_rows} \
                 rows scans and sorts the table; an index on the key makes each page a range read",
                channel.key_columns.join(", ")
            );
        }
        let pages = Pages::new(&channel, &data_types, &order, &kinds, chunk_rows);
        conn.query_drop("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await
            .map_err(db_err(what.clone()))?;
        // InnoDB takes the snapshot here: the count, the journal ids and every page read
        // afterwards see exactly what it says.
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            .await
            .map_err(db_err(what.clone()))?;
        let total: Option<i64> = conn
            .query_first(format!("SELECT COUNT(*) FROM {}", pages.table))
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
            log::trace!("sqlnotify: {what}: page: {}", inline(&sql, &params));
            let rows: Vec<Row> = conn.exec(sql, params).await.map_err(db_err(what))?;
            let last = rows.len() < pages.chunk_rows;
            (rows, last)
        } else {
            let (sql, params) = pages.boundary_sql();
            log::trace!(
                "sqlnotify: {what}: page boundary: {}",
                inline(&sql, &params)
            );
            let upto: Option<Row> = conn.exec_first(sql, params).await.map_err(db_err(what))?;
            let upto = upto.map(Row::unwrap);
            let (sql, params) = pages.page_sql(upto.as_deref());
            log::trace!("sqlnotify: {what}: page: {}", inline(&sql, &params));
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

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn index(name: &str, columns: &[&str], unique: bool, nullable: bool) -> Index {
        Index {
            name: name.into(),
            columns: strings(columns),
            unique,
            nullable,
        }
    }

    /// The columns, uniqueness, key order and index of an order.
    fn summary(o: Order) -> (Vec<String>, bool, bool, Option<String>) {
        (o.columns, o.unique, o.key_order, o.index)
    }

    fn expect(
        columns: &[&str],
        unique: bool,
        key_order: bool,
        index: Option<&str>,
    ) -> (Vec<String>, bool, bool, Option<String>) {
        (strings(columns), unique, key_order, index.map(String::from))
    }

    #[test]
    fn the_order_is_an_index_and_the_key_order_when_one_is() {
        let ab = strings(&["a", "b"]);
        let primary = index("PRIMARY", &["a", "b"], true, false);
        // the key leads the primary key
        let o = choose_order(&ab, &ab, std::slice::from_ref(&primary));
        assert_eq!(summary(o), expect(&["a", "b"], true, true, Some("PRIMARY")));
        let o = choose_order(&strings(&["a"]), &ab, std::slice::from_ref(&primary));
        assert_eq!(summary(o), expect(&["a", "b"], true, true, Some("PRIMARY")));
        // a unique NOT NULL index the key leads, as it is (not extended: the optimizer would
        // sort); preferred to a non-unique one
        let unique_b = index("ub", &["b"], true, false);
        let plain_b = index("b", &["b"], false, false);
        let o = choose_order(
            &strings(&["b"]),
            &ab,
            &[primary.clone(), plain_b.clone(), unique_b],
        );
        assert_eq!(summary(o), expect(&["b"], true, true, Some("ub")));
        // a non-unique index the key leads, then the primary key's other columns
        let o = choose_order(&strings(&["b"]), &ab, &[primary.clone(), plain_b.clone()]);
        assert_eq!(summary(o), expect(&["b", "a"], true, true, Some("b")));
        let o = choose_order(&strings(&["b", "a"]), &ab, &[plain_b]);
        assert_eq!(summary(o), expect(&["b", "a"], true, true, Some("b")));
        let wide = index("wide", &["b", "c"], false, false);
        let o = choose_order(&strings(&["b"]), &strings(&["a", "b", "d"]), &[wide]);
        assert_eq!(o.columns, ["b", "c", "a", "d"]);
        // no index the key leads (or only a unique one on nullable columns): the primary key
        for others in [
            vec![],
            vec![primary.clone()],
            vec![index("nu", &["b"], true, true)],
            vec![index("late", &["c", "b"], false, false)],
        ] {
            let o = choose_order(&strings(&["b"]), &ab, &others);
            assert_eq!(
                summary(o),
                expect(&["a", "b"], true, false, Some("PRIMARY"))
            );
        }
        let o = choose_order(&strings(&["b", "a"]), &ab, &[]);
        assert_eq!(
            summary(o),
            expect(&["a", "b"], true, false, Some("PRIMARY"))
        );
        // no primary key: a unique index the key leads; else a unique NOT NULL index, the
        // narrowest
        let o = choose_order(
            &strings(&["u"]),
            &[],
            &[index("u", &["u", "w"], true, false)],
        );
        assert_eq!(summary(o), expect(&["u", "w"], true, true, Some("u")));
        let o = choose_order(
            &strings(&["k"]),
            &[],
            &[
                index("wide", &["a", "b"], true, false),
                index("nu", &["c"], true, true),
                index("u", &["u"], true, false),
            ],
        );
        assert_eq!(summary(o), expect(&["u"], true, false, Some("u")));
        // none: the key columns on key boundaries, through an index they lead or a scan
        let o = choose_order(
            &strings(&["k"]),
            &[],
            &[index("k", &["k", "v"], false, true)],
        );
        assert_eq!(summary(o), expect(&["k"], false, true, Some("k")));
        let o = choose_order(&strings(&["k"]), &[], &[index("nu", &["k"], true, true)]);
        assert_eq!(summary(o), expect(&["k"], false, true, Some("nu")));
        let o = choose_order(&strings(&["k"]), &[], &[index("v", &["v"], false, false)]);
        assert_eq!(summary(o), expect(&["k"], false, true, None));
    }

    #[test]
    fn pages_follow_the_order_with_plain_comparisons() {
        let order = Order::indexed("i`x", strings(&["b", "a"]), true);
        let mut pages = Pages::new(&channel(&["b"]), &types(), &order, &BTreeMap::new(), 500);
        assert!(pages.unique);
        assert_eq!(pages.order, ["_sqn_r.`b`", "_sqn_r.`a`"]);
        let (sql, params) = pages.page_sql(None);
        assert_eq!(
            sql,
            "SELECT COALESCE(JSON_OBJECT('b', _sqn_r.`b`, 'at', CAST(_sqn_r.`at` AS CHAR)), \
             JSON_INSERT(JSON_OBJECT('b', _sqn_r.`b`), '$.__sqlnotify', JSON_OBJECT('truncated', TRUE))), \
             _sqn_r.`b`, _sqn_r.`a` FROM `Shop`.`order``s` AS _sqn_r FORCE INDEX (`i``x`) \
             ORDER BY _sqn_r.`b`, _sqn_r.`a` LIMIT 500"
        );
        assert!(params.is_empty());
        pages.after = Some(vec![Value::Int(7), Value::Bytes(b"x".to_vec())]);
        let (sql, params) = pages.page_sql(None);
        assert!(
            sql.ends_with(
                " FROM `Shop`.`order``s` AS _sqn_r FORCE INDEX (`i``x`) \
                 WHERE ((_sqn_r.`b` > ?) OR (_sqn_r.`b` = ? AND _sqn_r.`a` > ?)) \
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
    fn enum_members_read_from_the_column_type() {
        assert_eq!(
            enum_members("enum('b','a','it''s',' x,y')"),
            Some(strings(&["b", "a", "it's", " x,y"]))
        );
        assert_eq!(enum_members("enum('a','')"), None);
        assert_eq!(enum_members("enum('a\\\\b')"), None);
        assert_eq!(enum_members("set('a')"), None);
    }

    #[test]
    fn enum_and_set_values_are_compared_in_their_sort_order() {
        let order = Order::indexed("PRIMARY", strings(&["k", "s", "id"]), true);
        let kinds: BTreeMap<String, ColumnKind> = [
            ("k".to_string(), ColumnKind::Enum(strings(&["b", "a", "c"]))),
            ("s".to_string(), ColumnKind::Numeric),
        ]
        .into();
        let mut pages = Pages::new(&channel(&["k", "s", "id"]), &types(), &order, &kinds, 2);
        let (sql, _) = pages.page_sql(None);
        assert!(
            sql.contains(", _sqn_r.`k`, _sqn_r.`s`+0, _sqn_r.`id` FROM "),
            "{sql}"
        );
        pages.after = Some(vec![
            Value::Bytes(b"a".to_vec()),
            Value::UInt(3),
            Value::Int(2),
        ]);
        let (sql, params) = pages.page_sql(None);
        assert!(
            sql.contains(
                " WHERE ((_sqn_r.`k` IN ('c')) OR (_sqn_r.`k` = ? AND _sqn_r.`s` > ?) OR \
                 (_sqn_r.`k` = ? AND _sqn_r.`s` = ? AND _sqn_r.`id` > ?)) ORDER BY _sqn_r.`k`, \
                 _sqn_r.`s`, _sqn_r.`id` LIMIT 2"
            ),
            "{sql}"
        );
        assert_eq!(params.len(), 5);
        // after the last member: that alternative is left out
        pages.after = Some(vec![
            Value::Bytes(b"c".to_vec()),
            Value::UInt(3),
            Value::Int(2),
        ]);
        let (sql, _) = pages.page_sql(None);
        assert!(
            sql.contains(" WHERE ((_sqn_r.`k` = ? AND _sqn_r.`s` > ?) OR "),
            "{sql}"
        );
        let plain = Compared::Placeholder("?".to_string());
        let members = Compared::Enum(strings(&["b", "a", "c"]));
        let (sql, _) = compare(
            &[("k", &members), ("id", &plain)],
            &[Value::Bytes(b"a".to_vec()), Value::Int(1)],
            Side::UpTo,
        );
        assert_eq!(
            sql,
            "(((k IN ('b') OR k IS NULL)) OR (k = ? AND (id < ? OR id IS NULL)) OR (k = ? AND id = ?))"
        );
    }

    #[test]
    fn decimal_values_are_compared_as_decimals() {
        let order = Order::indexed("PRIMARY", strings(&["d", "id"]), true);
        let kinds: BTreeMap<String, ColumnKind> =
            [("d".to_string(), ColumnKind::Decimal(30, 20))].into();
        let mut pages = Pages::new(&channel(&["d", "id"]), &types(), &order, &kinds, 10);
        pages.after = Some(vec![Value::Bytes(b"-1.10".to_vec()), Value::Int(3)]);
        let (sql, params) = pages.page_sql(None);
        assert!(
            sql.contains(
                " WHERE ((_sqn_r.`d` > CAST(? AS DECIMAL(30, 20))) OR \
                 (_sqn_r.`d` = CAST(? AS DECIMAL(30, 20)) AND _sqn_r.`id` > ?)) "
            ),
            "{sql}"
        );
        assert_eq!(params.len(), 3);
    }

    #[test]
    fn without_a_unique_order_pages_end_on_a_key_boundary() {
        let order = choose_order(&strings(&["k"]), &[], &[]);
        let mut pages = Pages::new(&channel(&["k"]), &types(), &order, &BTreeMap::new(), 100);
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
                " WHERE ((_sqn_r.`k` IS NOT NULL)) AND (((_sqn_r.`k` < ? OR _sqn_r.`k` IS NULL)) \
                 OR (_sqn_r.`k` = ?)) ORDER BY _sqn_r.`k`"
            ),
            "{sql}"
        );
        assert_eq!(params, [Value::Int(5), Value::Int(5)]);
        // up to a NULL key: the NULLs only
        pages.after = None;
        let (sql, _) = pages.page_sql(Some(&[Value::NULL]));
        assert!(
            sql.ends_with(" WHERE ((_sqn_r.`k` IS NULL)) ORDER BY _sqn_r.`k`"),
            "{sql}"
        );
    }

    /// `compare` against a reference: the lexicographic order with NULL first, where SQL's
    /// unknown is false — over every pair of 2-column values from {NULL, 1, 2}.
    #[test]
    fn comparisons_select_exactly_the_rows_after_or_up_to() {
        let domain = [None, Some(1), Some(2)];
        let mut all = Vec::new();
        for a in domain {
            for b in domain {
                all.push([a, b]);
            }
        }
        let plain = Compared::Placeholder("?".to_string());
        let columns = [("a", &plain), ("b", &plain)];
        let value = |v: Option<i64>| v.map_or(Value::NULL, Value::Int);
        for bound in &all {
            let values: Vec<Value> = bound.iter().map(|v| value(*v)).collect();
            for side in [Side::After, Side::UpTo] {
                let (sql, params) = compare(&columns, &values, side);
                for row in &all {
                    let expected = match side {
                        Side::After => row > bound,
                        Side::UpTo => row <= bound,
                    };
                    assert_eq!(
                        eval(&sql, &params, row),
                        expected,
                        "{sql} on {row:?} (bound {bound:?})"
                    );
                }
            }
        }
    }

    /// Evaluates the conditions `compare` writes on a row of columns `a` and `b` (SQL's
    /// three-valued logic, unknown as `None`).
    fn eval(sql: &str, params: &[Value], row: &[Option<i64>; 2]) -> bool {
        let mut params = params.iter().map(|p| match p {
            Value::Int(i) => *i,
            other => panic!("{other:?}"),
        });
        // (alternatives of conjunctions of terms; a term may be a parenthesised `x OR y`)
        let column = |name: &str| if name == "a" { row[0] } else { row[1] };
        let term = |t: &str, params: &mut dyn Iterator<Item = i64>| -> Option<bool> {
            let parts: Vec<&str> = t.split(' ').collect();
            let c = column(parts[0]);
            match &parts[1..] {
                ["IS", "NULL"] => Some(c.is_none()),
                ["IS", "NOT", "NULL"] => Some(c.is_some()),
                [op, "?"] => {
                    let p = params.next().expect("a parameter");
                    c.map(|c| match *op {
                        ">" => c > p,
                        "<" => c < p,
                        "=" => c == p,
                        other => panic!("{other}"),
                    })
                }
                other => panic!("{other:?}"),
            }
        };
        let or3 = |x: Option<bool>, y: Option<bool>| match (x, y) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        };
        let and3 = |x: Option<bool>, y: Option<bool>| match (x, y) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        };
        if sql == "FALSE" {
            return false;
        }
        let body = &sql[1..sql.len() - 1];
        let mut result = Some(false);
        let pieces: Vec<&str> = body.split(") OR (").collect();
        for (i, mut alternative) in pieces.iter().copied().enumerate() {
            // (the split took the parentheses between alternatives; these are the outer ones)
            if i == 0 {
                alternative = alternative.strip_prefix('(').expect("(");
            }
            if i == pieces.len() - 1 {
                alternative = alternative.strip_suffix(')').expect(")");
            }
            let mut all = Some(true);
            for t in alternative.split(" AND ") {
                let value = if let Some(inner) = t.strip_prefix('(') {
                    let mut halves = inner.split(" OR ");
                    let x = term(halves.next().unwrap(), &mut params);
                    let y = term(halves.next().unwrap().trim_end_matches(')'), &mut params);
                    or3(x, y)
                } else {
                    term(t, &mut params)
                };
                all = and3(all, value);
            }
            result = or3(result, all);
        }
        assert!(params.next().is_none(), "every parameter used: {sql}");
        result == Some(true)
    }

    #[test]
    fn traced_queries_carry_their_parameters_as_literals() {
        assert_eq!(
            inline(
                "SELECT 'a?', `b?``?` FROM t WHERE x > ? AND y = ? AND z = ? AND w = ?",
                &[
                    Value::Int(-3),
                    Value::Bytes(b"it's".to_vec()),
                    Value::Bytes(vec![0xff, 0]),
                    Value::NULL
                ]
            ),
            "SELECT 'a?', `b?``?` FROM t WHERE x > -3 AND y = 'it''s' AND z = X'FF00' AND w = NULL"
        );
    }

    #[test]
    fn the_watermark_is_zero_until_placed() {
        let w = Watermark::default();
        assert_eq!(w.get(), 0);
        w.set(42);
        assert_eq!(w.get(), 42);
    }
}
