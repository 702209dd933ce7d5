//! SQL text for PostgreSQL: the `sqlnotify` schema, and one trigger function + trigger per
//! watch. Pure functions, unit-tested here; `catalog.rs` runs what they produce.
//!
//! Every object is named after its channel: the function `sqlnotify."<channel>"()` and the
//! trigger `"<channel>"` on the watched table. The channel name is unique in the database, so
//! one name identifies a watch everywhere (catalog row, function, trigger, LISTEN).

use super::signing::{self, SIGNATURE_LEN};
use crate::payload::{META_KEY, NOTIFY_PAYLOAD_LIMIT};
use crate::resolve::ResolvedWatch;
use crate::sql::{quote_ident, quote_literal};
use crate::tier::{Capture, Tier, STATEMENT_CHUNK_ROWS};

/// Schema holding every sqlnotify object except the triggers themselves.
pub(crate) const SCHEMA: &str = "sqlnotify";

/// Advisory lock key (the bytes of "sqlnotif") serialising installation across instances.
pub(crate) const INSTALL_LOCK: i64 = 0x7371_6c6e_6f74_6966;

/// `json_build_object` takes at most 100 arguments (50 columns); wider payloads use `row_to_json`.
const MAX_BUILD_OBJECT_COLUMNS: usize = 50;

/// Creates the schema, the catalog, the overflow table, the journal, the consumers table, the
/// dead-letter table and the record of transactional handlers' events (`effects`) if missing, and upgrades a journal of an older version (the `events` column). Run under the
/// install lock, at every start.
///
/// Only what is missing is touched: `CREATE INDEX IF NOT EXISTS` and `ALTER TABLE … IF NOT
/// EXISTS` lock the table *before* finding there is nothing to do, and a lock on the journal
/// at start would queue every writer's trigger behind the longest running transaction — so
/// those run in a DO block only when the catalog says the object is absent.
pub(crate) fn setup_sql() -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.catalog (
    channel text PRIMARY KEY,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    operation text NOT NULL,
    definition text NOT NULL,
    definition_hash text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.overflow (
    id bigserial PRIMARY KEY,
    token uuid DEFAULT pg_catalog.gen_random_uuid(),
    channel text NOT NULL,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.journal (
    id bigserial PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    channel text NOT NULL,
    payload text NOT NULL,
    events integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now()
);
{signing}
CREATE TABLE IF NOT EXISTS {s}.trimmed (
    id integer PRIMARY KEY CHECK (id = 1),
    xid xid8 NOT NULL,
    snapshot pg_snapshot,
    writer xid8
);
CREATE TABLE IF NOT EXISTS {s}.consumers (
    name text PRIMARY KEY,
    horizon xid8 NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
DO $sqn$
DECLARE
  _sqn_lock text := pg_catalog.current_setting('lock_timeout');
  _sqn_key bytea;
  _sqn_pad bytea;
  _sqn_ipad bytea;
  _sqn_opad bytea;
  _sqn_fn text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                  WHERE attrelid = '{s}.journal'::regclass AND attname = 'events' AND NOT attisdropped) THEN
    -- once, on upgrade: never wait for writers' open transactions without bound (every new
    -- writer would queue behind the lock). start() sets a short lock_timeout and retries; a
    -- script applied without one waits at most 5 s.
    IF _sqn_lock = '0' THEN
      PERFORM pg_catalog.set_config('lock_timeout', '5s', true);
    END IF;
    BEGIN
      ALTER TABLE {s}.journal ADD COLUMN events integer NOT NULL DEFAULT 1;
    EXCEPTION WHEN lock_not_available THEN
      RAISE EXCEPTION 'sqlnotify: upgrading {s}.journal (adding the events column) needs a moment with no open transaction writing to it; retry'
        USING ERRCODE = 'lock_not_available';
    END;
    PERFORM pg_catalog.set_config('lock_timeout', _sqn_lock, true);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                  WHERE attrelid = '{s}.overflow'::regclass AND attname = 'token' AND NOT attisdropped) THEN
    -- once, on upgrade: overflow rows are referenced by an unguessable token, not their id.
    -- Rows of older versions keep a NULL token: nothing can reference them any more.
    PERFORM pg_catalog.set_config('lock_timeout', '5s', true);
    BEGIN
      ALTER TABLE {s}.overflow ADD COLUMN token uuid, ALTER COLUMN token SET DEFAULT pg_catalog.gen_random_uuid();
    EXCEPTION WHEN lock_not_available THEN
      RAISE EXCEPTION 'sqlnotify: upgrading {s}.overflow (adding the token column) needs a moment with no open transaction writing to it; retry start()';
    END;
    PERFORM pg_catalog.set_config('lock_timeout', _sqn_lock, true);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                  WHERE attrelid = '{s}.trimmed'::regclass AND attname = 'writer' AND NOT attisdropped) THEN
    -- once, on upgrade: the purge records its snapshot with the newest transaction it deleted
    -- (src/postgres/replay.rs). Only the purge and a resuming SSE client use the table.
    IF _sqn_lock = '0' THEN
      PERFORM pg_catalog.set_config('lock_timeout', '5s', true);
    END IF;
    BEGIN
      ALTER TABLE {s}.trimmed ADD COLUMN IF NOT EXISTS snapshot pg_snapshot, ADD COLUMN IF NOT EXISTS writer xid8;
    EXCEPTION WHEN lock_not_available THEN
      RAISE EXCEPTION 'sqlnotify: upgrading {s}.trimmed (adding the snapshot column) needs a moment when no purge is running; retry'
        USING ERRCODE = 'lock_not_available';
    END;
    PERFORM pg_catalog.set_config('lock_timeout', _sqn_lock, true);
  END IF;
  IF pg_catalog.to_regclass('{s}.overflow_token_idx') IS NULL THEN
    CREATE UNIQUE INDEX overflow_token_idx ON {s}.overflow (token);
  END IF;
  IF pg_catalog.to_regclass('{s}.overflow_created_at_idx') IS NULL THEN
    CREATE INDEX overflow_created_at_idx ON {s}.overflow (created_at);
  END IF;
  IF pg_catalog.to_regclass('{s}.journal_xid_idx') IS NULL THEN
    CREATE INDEX journal_xid_idx ON {s}.journal (xid);
  END IF;
  IF pg_catalog.to_regclass('{s}.journal_created_at_idx') IS NOT NULL THEN
    -- once, on upgrade: versions before this one indexed created_at for the purge, which now
    -- walks the primary key instead (the index cost every journal row ~5 µs of its writer's
    -- time). Optional: when the journal stays busy, the index is kept until the next start.
    IF _sqn_lock = '0' THEN
      PERFORM pg_catalog.set_config('lock_timeout', '5s', true);
    END IF;
    BEGIN
      DROP INDEX {s}.journal_created_at_idx;
    EXCEPTION WHEN lock_not_available THEN
      RAISE WARNING 'sqlnotify: kept {s}.journal_created_at_idx (dropping it needs a moment with no open transaction writing to the journal); the next start tries again';
    END;
    PERFORM pg_catalog.set_config('lock_timeout', _sqn_lock, true);
  END IF;
  {key}
  -- Nothing in the schema is anyone else's business: PUBLIC gets no privilege on its tables,
  -- sequences and trigger functions (not the EXECUTE that new functions get by default, nor
  -- what ALTER DEFAULT PRIVILEGES may grant) — only USAGE on the schema and EXECUTE on the
  -- watches' helpers, which writers call from their triggers and which check the caller
  -- themselves. Checked first, so an unchanged install rewrites no catalog row.
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n,
                    pg_catalog.aclexplode(coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner))) a
              WHERE n.nspname = {lit} AND a.grantee = 0 AND a.privilege_type <> 'USAGE') THEN
    REVOKE ALL ON SCHEMA {s} FROM PUBLIC;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n,
                        pg_catalog.aclexplode(coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner))) a
                  WHERE n.nspname = {lit} AND a.grantee = 0 AND a.privilege_type = 'USAGE') THEN
    GRANT USAGE ON SCHEMA {s} TO PUBLIC;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
              WHERE c.relnamespace = {lit}::regnamespace AND a.grantee = 0) THEN
    REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM PUBLIC;
  END IF;
  FOR _sqn_fn IN SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p,
                        pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
                  WHERE p.pronamespace = {lit}::regnamespace AND a.grantee = 0
                    AND p.prorettype = 'pg_catalog.trigger'::pg_catalog.regtype LOOP
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', _sqn_fn);
  END LOOP;
END
$sqn$;
{consumers}
{dead_letters}
{effects}",
        s = quote_ident(SCHEMA),
        lit = quote_literal(SCHEMA),
        key = signing::create_key_sql(),
        signing = signing_table_sql(),
        consumers = super::consumers::setup_sql(),
        dead_letters = super::dead_letters::setup_sql(),
        effects = super::effects::setup_sql(),
    )
}

/// `CREATE TABLE` of the signing key's table (one row: the key and its HMAC pads).
fn signing_table_sql() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {}.signing (
    id integer PRIMARY KEY CHECK (id = 1),
    key bytea NOT NULL,
    ipad bytea NOT NULL,
    opad bytea NOT NULL
);",
        quote_ident(SCHEMA)
    )
}

/// sqlnotify's schema and signing key alone, closed to PUBLIC but for `USAGE` on the schema
/// (as [`setup_sql`] leaves them): what a notifier whose watches are all on the logical tier
/// creates, to sign its custom events.
pub(crate) fn signing_setup_sql() -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
{table}
REVOKE ALL ON {s}.signing FROM PUBLIC;
DO $sqn$
DECLARE
  _sqn_key bytea;
  _sqn_pad bytea;
  _sqn_ipad bytea;
  _sqn_opad bytea;
BEGIN
  {key}
END
$sqn$;",
        s = quote_ident(SCHEMA),
        table = signing_table_sql(),
        key = signing::create_key_sql(),
    )
}

/// The qualified name of a watch's trigger function.
pub(crate) fn function_name(channel: &str) -> String {
    format!("{}.{}", quote_ident(SCHEMA), quote_ident(channel))
}

/// `CREATE OR REPLACE FUNCTION` for a trigger function with `body`.
///
/// Privileges are split in two. The trigger function runs as the writer (`SECURITY INVOKER`):
/// it turns the row into JSON, which may call functions of the table's owner (a cast to
/// `json` of a type they own, an output function …) — those must never run with sqlnotify's
/// privileges, or the owner of a watched table could act as whoever installed sqlnotify. It
/// hands the finished text to the watch's helper (see [`helper_sql`]), the only part that runs
/// as sqlnotify's owner and touches its tables and signing key.
fn function_header(channel: &str, body: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}",
        function_name(channel),
        quote_literal(body)
    )
}

/// The argument types of a watch's helper: the notify tier's `(payload, key-only payload)`,
/// the journal tiers' `(payload, events)`, or, for row capture by a statement-level trigger
/// ([`batched`]), `(payloads)`: one per row.
fn helper_args(w: &ResolvedWatch) -> &'static str {
    match w.tier {
        Tier::Notify => "text, text",
        _ if batched(w) => "text[]",
        // Logical watches have no helper (`Postgres::install` never passes them here).
        Tier::Durable | Tier::Poll | Tier::Logical => "text, integer",
    }
}

/// The helper of a watch: `sqlnotify."<channel>"(…)`, an overload of the trigger function's
/// name (its arguments tell them apart). It runs as its owner (`SECURITY DEFINER`, search path
/// pinned to `pg_catalog, pg_temp`, every name qualified) and takes text only, so no function
/// of anyone else runs inside it. Any role may call it (writers need no privilege on
/// sqlnotify's objects), so it first checks that the calling session may write to the watched
/// table the way the watch reports (`INSERT`, `UPDATE` or `DELETE` privilege, held by the
/// session's role or a role it belongs to; for INSERT and UPDATE, on the table or on any of
/// its columns), or that it has just changed a row of the table that way without such a
/// privilege — through a foreign key's cascade, a `SECURITY DEFINER` function, a view (the
/// backend's count of such row changes, see the body): otherwise it sends nothing and warns —
/// it never fails the write. A role that may write to the table could send the same event by
/// writing a row, so a call by it forges nothing it could not cause anyway — except values it
/// could not write: in the columns it was not granted, or, for a session that changed a row
/// through another path, in rows that path does not reach (for the moments its count lasts):
/// events are as trustworthy as the roles that may change the watched table, directly or
/// through such a path.
///
/// Notify tier: stores an oversized payload in the overflow table (falling back to the key,
/// marked truncated), signs it when the channel is signed, and sends it. Journal tiers:
/// appends the journal row.
pub(crate) fn helper_sql(w: &ResolvedWatch) -> String {
    let channel = &w.channel;
    let chan = quote_literal(&channel.name);
    let table = quote_literal(&format!(
        "{}.{}",
        quote_ident(&channel.schema),
        quote_ident(&channel.table)
    ));
    let privilege = quote_literal(channel.operation.sql_keyword());
    // INSERT and UPDATE may be granted on some columns only, and such a role writes rows
    // whose events must not be lost: `has_any_column_privilege` is true for a privilege on
    // the table or on any of its columns. DELETE has no column privileges.
    let holds = match channel.operation {
        crate::operation::Operation::Delete => "has_table_privilege",
        _ => "has_any_column_privilege",
    };
    // A session may also change the table without any privilege of its own: a foreign key's
    // ON DELETE CASCADE / ON UPDATE CASCADE / SET NULL, a SECURITY DEFINER function, a view,
    // writes through a parent table its role owns. Such rows are real and their events must
    // not be lost, so a session whose roles fail the test is still accepted when it has
    // changed a row of the table the watch's way: the backend's count of rows it inserted,
    // updated or deleted in the table (or its partitions: `pg_partition_tree` lists no plain
    // table, so the table itself is added) since its statistics were last reported
    // (`pg_stat_get_xact_tuples_*`: the current transaction, rolled-back parts included, and
    // its session's earlier transactions until the backend next reports them: seconds, under
    // contention at most a minute). Nothing but a real row change moves that count; a lock on
    // the table would not do: `PREPARE … AS DELETE FROM t` takes one without any privilege.
    let counter = match channel.operation {
        crate::operation::Operation::Insert => "pg_stat_get_xact_tuples_inserted",
        crate::operation::Operation::Update => "pg_stat_get_xact_tuples_updated",
        crate::operation::Operation::Delete => "pg_stat_get_xact_tuples_deleted",
    };
    // Three nested tests rather than one `A AND NOT EXISTS (…)`: the outer one, the common
    // case (the session's own role holds the privilege), has no subquery, so plpgsql evaluates
    // it as a simple expression, without starting an executor on every call (every changed
    // row); the others run only when it fails.
    let authorize = format!(
        "IF NOT coalesce(pg_catalog.{holds}(session_user, pg_catalog.to_regclass({table}), {privilege}), false) THEN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles _sqn_r
                    WHERE pg_catalog.pg_has_role(session_user, _sqn_r.oid, 'MEMBER')
                      AND pg_catalog.{holds}(_sqn_r.oid, pg_catalog.to_regclass({table}), {privilege})) THEN
      IF NOT coalesce((SELECT pg_catalog.sum(pg_catalog.{counter}(_sqn_p.relid)) > 0
                         FROM (SELECT pg_catalog.to_regclass({table})
                               UNION SELECT relid FROM pg_catalog.pg_partition_tree(pg_catalog.to_regclass({table})))
                              AS _sqn_p(relid)), false) THEN
        RAISE WARNING 'sqlnotify: role % may not % on %: no event sent on %', session_user, {privilege}, {table}, {chan};
        RETURN;
      END IF;
    END IF;
  END IF;"
    );
    let schema = quote_ident(SCHEMA);
    let body = match w.tier {
        // One journal row per payload, in the array's order (the rows' order in the
        // statement), numbered by the journal's sequence in that order.
        _ if batched(w) => format!(
            "
BEGIN
  {authorize}
  INSERT INTO {schema}.journal (channel, payload)
  SELECT {chan}, _sqn_u.p FROM pg_catalog.unnest(_sqn_payloads) WITH ORDINALITY AS _sqn_u(p, n)
   ORDER BY _sqn_u.n;
END
"
        ),
        // Row capture leaves `events` to its default (1), so its helper also writes to a
        // journal of a version before that column, until start() upgrades it.
        Tier::Durable | Tier::Poll | Tier::Logical if w.capture == Capture::Row => format!(
            "
BEGIN
  {authorize}
  INSERT INTO {schema}.journal (channel, payload) VALUES ({chan}, _sqn_payload);
END
"
        ),
        Tier::Durable | Tier::Poll | Tier::Logical => format!(
            "
BEGIN
  {authorize}
  INSERT INTO {schema}.journal (channel, payload, events) VALUES ({chan}, _sqn_payload, _sqn_events);
END
"
        ),
        Tier::Notify => notify_helper_body(w, &authorize),
    };
    let (name, args) = (function_name(&channel.name), helper_args(w));
    let params = match w.tier {
        Tier::Notify => "_sqn_full text, _sqn_key text",
        _ if batched(w) => "_sqn_payloads text[]",
        Tier::Durable | Tier::Poll | Tier::Logical => "_sqn_payload text, _sqn_events integer",
    };
    format!(
        "CREATE OR REPLACE FUNCTION {name}({params}) RETURNS void LANGUAGE plpgsql SECURITY DEFINER \
         SET search_path = pg_catalog, pg_temp AS {};\n\
         REVOKE ALL ON FUNCTION {name}({args}) FROM PUBLIC;\n\
         GRANT EXECUTE ON FUNCTION {name}({args}) TO PUBLIC",
        quote_literal(&body)
    )
}

/// A JSON-text expression of the given columns of `row` (NEW or OLD), in order.
pub(crate) fn json_expr(row: &str, columns: &[&String]) -> String {
    if columns.len() <= MAX_BUILD_OBJECT_COLUMNS {
        let args: Vec<String> = columns
            .iter()
            .map(|c| format!("{}, {row}.{}", quote_literal(c), quote_ident(c)))
            .collect();
        format!("pg_catalog.json_build_object({})::text", args.join(", "))
    } else {
        let fields: Vec<String> = columns
            .iter()
            .map(|c| format!("{row}.{} AS {}", quote_ident(c), quote_ident(c)))
            .collect();
        format!(
            "(SELECT pg_catalog.row_to_json(_sqn_r.*) FROM (SELECT {}) AS _sqn_r)::text",
            fields.join(", ")
        )
    }
}

/// The JSON text a row trigger sends for a watch: the carried columns of the row, the watch's
/// context values ([`context_expr`]) in the metadata member, and for a watch with
/// `old_values` the metadata member with the old row's carried columns and, on
/// UPDATE, the names of the table's columns that changed (compared by [`distinct`]). The
/// member is spliced in as text: the object `json_expr` renders ends in `}`.
fn row_payload(w: &ResolvedWatch) -> String {
    let new = match w.channel.operation {
        crate::operation::Operation::Delete => "OLD",
        _ => "NEW",
    };
    payload_with_old(w, new, "OLD")
}

/// The test "`old` and `new`, values of `column`, differ", never true for two NULLs: `IS
/// DISTINCT FROM` with the type's own equality (so `jsonb` compares as values), as text for
/// types without one (`json`: a cast to `jsonb` could fail on a document `jsonb` refuses, and
/// the trigger must never fail the write). An equality outside `pg_catalog` (an extension's
/// type) is named with its schema (`OPERATOR("ext".=)`, spelled out around the NULLs as `IS
/// DISTINCT FROM` would): trigger functions run with the writer's `search_path`, which may not
/// hold that schema — the unqualified operator then did not exist, and the writer's UPDATE
/// failed with it.
fn distinct(w: &ResolvedWatch, column: &str, has_eq: bool, old: &str, new: &str) -> String {
    if !has_eq {
        return format!("{old}::text IS DISTINCT FROM {new}::text");
    }
    match w.equality_schemas.get(column) {
        Some(schema) => format!(
            "CASE WHEN {old} IS NULL THEN {new} IS NOT NULL WHEN {new} IS NULL THEN true \
             ELSE NOT ({old} OPERATOR({}.=) {new}) END",
            quote_ident(schema)
        ),
        None => format!("{old} IS DISTINCT FROM {new}"),
    }
}

/// [`row_payload`] for rows named `row` (the row the event reports) and `old` (its old row;
/// for a DELETE the same row), with the metadata member when the watch carries old values or
/// context.
fn payload_with_old(w: &ResolvedWatch, row: &str, old: &str) -> String {
    let channel = &w.channel;
    let all = channel.payload_columns();
    let full = json_expr(row, &all);
    let mut members: Vec<String> = Vec::new();
    if w.old_values {
        members.push(format!("'old', ({})::json", json_expr(old, &all)));
        if channel.operation == crate::operation::Operation::Update {
            let tests: Vec<String> = w
                .table_columns
                .iter()
                .map(|(c, has_eq)| {
                    let q = quote_ident(c);
                    let test =
                        distinct(w, c, *has_eq, &format!("{old}.{q}"), &format!("{row}.{q}"));
                    format!("CASE WHEN {test} THEN {} END", quote_literal(c))
                })
                .collect();
            members.push(format!(
                "'changed', pg_catalog.to_json(pg_catalog.array_remove(ARRAY[{}]::text[], NULL))",
                tests.join(", ")
            ));
        }
    }
    if let Some(context) = context_object(&w.context) {
        members.push(format!("'context', {context}"));
    }
    // The notify tier carries the writer's transaction id in the payload (the journal tiers
    // read it from the journal row's xid column).
    let tx = w.tier == Tier::Notify;
    if members.is_empty() {
        if !tx {
            return full;
        }
        return format!(
            "pg_catalog.left({full}, -1) || {} || pg_catalog.pg_current_xact_id()::text || '}}}}'",
            quote_literal(&format!(",\"{META_KEY}\":{{\"tx\":"))
        );
    }
    if tx {
        members.push(format!("'tx', {TX_EXPR}"));
    }
    format!(
        "pg_catalog.left({full}, -1) || {} || (pg_catalog.json_build_object({}))::text || '}}'",
        quote_literal(&format!(",\"{META_KEY}\":")),
        members.join(", ")
    )
}

/// The writer's transaction id as JSON text can carry it (`json_build_object` writes an `xid8`
/// as a string; the decoder reads both forms).
const TX_EXPR: &str = "pg_catalog.pg_current_xact_id()";

/// The most context names one watch may capture on PostgreSQL (`json_build_object` takes at
/// most 100 arguments).
pub(crate) const MAX_CONTEXT_NAMES: usize = 50;

/// The SQL expression that reads context value `name` in the writer's session, or `None` for
/// a name PostgreSQL does not offer. None of them can fail: a custom setting (a dotted name
/// whose parts are identifiers, so no server setting that needs a privilege to read) is read
/// with `current_setting(name, true)`, NULL when unset — and NULL too when empty, which is
/// what PostgreSQL reports for a custom setting set earlier in the session and gone since
/// (`SET LOCAL` after its transaction).
pub(crate) fn context_expr(name: &str) -> Option<String> {
    Some(match name {
        "current_user" => "current_user".to_string(),
        "session_user" => "session_user".to_string(),
        "application_name" => "pg_catalog.current_setting('application_name')".to_string(),
        "client_addr" => "pg_catalog.host(pg_catalog.inet_client_addr())".to_string(),
        "backend_pid" => "pg_catalog.pg_backend_pid()".to_string(),
        custom if is_custom_setting(custom) => format!(
            "NULLIF(pg_catalog.current_setting({}, true), '')",
            quote_literal(custom)
        ),
        _ => return None,
    })
}

/// Whether `name` is a custom setting name: two or more dot-separated parts, each an
/// identifier (a letter or `_`, then letters, digits, `_` or `$`), at most 63 bytes.
fn is_custom_setting(name: &str) -> bool {
    name.len() <= 63
        && name.contains('.')
        && name.split('.').all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        })
}

/// The JSON object of a watch's context values (`None` when it captures none).
fn context_object(names: &[String]) -> Option<String> {
    if names.is_empty() {
        return None;
    }
    let args: Vec<String> = names
        .iter()
        .filter_map(|n| Some(format!("{}, {}", quote_literal(n), context_expr(n)?)))
        .collect();
    Some(format!("pg_catalog.json_build_object({})", args.join(", ")))
}

/// `CREATE OR REPLACE FUNCTION` for a watch's trigger function.
///
/// The function never raises because of sqlnotify: an oversized payload goes to the overflow
/// table (inside its own exception block, so even a missing table or permission only degrades
/// the event to "truncated"), and a payload that still does not fit is cut down to the key.
pub(crate) fn function_sql(w: &ResolvedWatch) -> String {
    match (w.tier, w.capture) {
        (Tier::Notify, _) => notify_function_sql(w),
        // Logical watches install no trigger (`Postgres::install` never passes them here).
        (Tier::Durable | Tier::Poll | Tier::Logical, Capture::Row) if batched(w) => {
            batched_function_sql(w)
        }
        (Tier::Durable | Tier::Poll | Tier::Logical, Capture::Row) => journal_function_sql(w),
        (Tier::Durable | Tier::Poll | Tier::Logical, Capture::Statement) => {
            statement_function_sql(w)
        }
    }
}

/// Transition table names of statement-capture triggers.
const NEW_TABLE: &str = "_sqn_new";
const OLD_TABLE: &str = "_sqn_old";

/// Stored bytes of the payload columns one statement-capture journal row may carry (besides
/// the row that crosses the limit). Stored sizes (`pg_column_size`) are cheap to read — no
/// detoasting — but understate the JSON text: compression (at most ~255× for lz4) and bytea's
/// hex doubling. 1 MiB of stored bytes therefore stays far below PostgreSQL's 1 GB limit for
/// one text value, which a JSON array of several big rows could otherwise exceed — failing
/// the user's write, which the row-level trigger would not have.
const STATEMENT_CHUNK_STORED_BYTES: usize = 1 << 20;

/// What both statement-level captures read: the transition table of the watch's rows, the
/// payload columns, the projection of the columns the payload and the change test need (the
/// only ones projected, so no other column of the table can clash with the internal names),
/// a row's stored size (`size`: of the row and, when the payload carries it, its old row),
/// its JSON, the join pairing each UPDATE's new row with its old row (when old values are
/// carried) and the `trigger_columns` filter.
struct StatementRows<'a> {
    table: &'static str,
    payload: Vec<&'a String>,
    projected: Vec<String>,
    size: String,
    json: String,
    pair: String,
    filter: String,
}

/// [`StatementRows`] of a watch. Rows are numbered (`_sqn_n`) on the plain scan of the
/// transition table, before anything that could reorder them.
fn statement_rows(w: &ResolvedWatch) -> StatementRows<'_> {
    let channel = &w.channel;
    let table = match channel.operation {
        crate::operation::Operation::Delete => OLD_TABLE,
        _ => NEW_TABLE,
    };
    let payload = channel.payload_columns();
    let (_, changed) = w.trigger_event(|q, c, has_eq| {
        distinct(w, c, has_eq, &format!("_sqn_o.{q}"), &format!("_sqn_t.{q}"))
    });
    let filter = changed
        .map(|changed| {
            let same_key: Vec<String> = channel
                .key_columns
                .iter()
                .map(|k| {
                    let k = quote_ident(k);
                    format!("_sqn_o.{k}::text = _sqn_t.{k}::text")
                })
                .collect();
            format!(
                "\n             WHERE NOT EXISTS (SELECT 1 FROM {OLD_TABLE} AS _sqn_o WHERE {} AND NOT ({changed}))",
                same_key.join(" AND ")
            )
        })
        .unwrap_or_default();
    // The columns the payload and the change test read (the only ones projected, so no other
    // column of the table can clash with the internal names).
    let mut needed: Vec<&String> = payload.clone();
    let update_with_old = w.old_values && channel.operation == crate::operation::Operation::Update;
    let changed_list: Vec<&String> = if update_with_old {
        w.table_columns.iter().map(|(c, _)| c).collect()
    } else {
        Vec::new()
    };
    for c in w.trigger_columns.iter().map(|(c, _)| c).chain(changed_list) {
        if !needed.contains(&c) {
            needed.push(c);
        }
    }
    let projected: Vec<String> = needed
        .iter()
        .map(|c| format!("_sqn_r.{}", quote_ident(c)))
        .collect();
    let size_of = |alias: &str| {
        payload
            .iter()
            .map(|c| {
                format!(
                    "coalesce(pg_catalog.pg_column_size({alias}.{}), 0)",
                    quote_ident(c)
                )
            })
            .collect::<Vec<_>>()
            .join(" + ")
    };
    // Old values: an UPDATE pairs each new row with its old row by position — PostgreSQL
    // stores the old and the new tuple of each updated row together, so the n-th rows of
    // the two transition tables are the same row (a key is no help: a statement may change
    // keys, even swap them). A DELETE's old row is the row itself.
    let (size, json, pair) = if update_with_old {
        (
            format!("{} + {}", size_of("_sqn_t"), size_of("_sqn_w")),
            payload_with_old(w, "_sqn_t", "_sqn_w"),
            format!(
                "\n              JOIN (SELECT {}, pg_catalog.row_number() OVER () AS _sqn_n\n                      \
                 FROM {OLD_TABLE} AS _sqn_r) AS _sqn_w ON _sqn_w._sqn_n = _sqn_t._sqn_n",
                projected.join(", ")
            ),
        )
    } else if w.old_values {
        (
            format!("2 * ({})", size_of("_sqn_t")),
            payload_with_old(w, "_sqn_t", "_sqn_t"),
            String::new(),
        )
    } else {
        // (with context: the same values in every row of the statement)
        (
            size_of("_sqn_t"),
            payload_with_old(w, "_sqn_t", "_sqn_t"),
            String::new(),
        )
    };
    StatementRows {
        table,
        payload,
        projected,
        size,
        json,
        pair,
        filter,
    }
}

/// The journal tiers with [`Capture::Statement`]: one journal row per statement (per
/// [`STATEMENT_CHUNK_ROWS`] rows or [`STATEMENT_CHUNK_STORED_BYTES`]) whose payload is a JSON
/// array of the rows' payloads, in the transition table's order, and whose `events` column
/// says how many rows it carries (the listener takes that much in-flight budget for it). The
/// durable tier sends one empty NOTIFY per statement.
///
/// Rows are numbered on the plain scan of the transition table, before anything that could
/// reorder them; chunks and the rows within them are ordered by that number. An UPDATE watch
/// with `trigger_columns` keeps a new row unless an old row with the same key has the same
/// values in all of them (keys compared as text, which every type has, so the comparison
/// cannot fail at run time). Internal names start with `_sqn_`, which watched columns may not
/// (see `Watch::precheck`).
fn statement_function_sql(w: &ResolvedWatch) -> String {
    let channel = &w.channel;
    let chan = quote_literal(&channel.name);
    let rows = statement_rows(w);
    let wake = match w.tier {
        Tier::Durable => {
            format!("\n  IF FOUND THEN\n    PERFORM pg_catalog.pg_notify({chan}, '');\n  END IF;")
        }
        _ => String::new(),
    };
    let helper = function_name(&channel.name);
    let chunked = chunked_sql(
        &rows,
        &format!(
            "{helper}('[' || pg_catalog.string_agg(_sqn_p, ',' ORDER BY _sqn_n) || ']', pg_catalog.count(*)::integer)"
        ),
    );
    let StatementRows {
        table,
        payload,
        size,
        filter,
        ..
    } = rows;
    let (rows, bytes) = (STATEMENT_CHUNK_ROWS, STATEMENT_CHUNK_STORED_BYTES);
    let capture = if filter.is_empty() && !w.old_values && w.context.is_empty() {
        // The common case, a statement that fits one chunk, takes a cheaper path (about half
        // the trigger time, measured): `json_agg` over the projected rows in scan order,
        // without numbering, windows or grouping. The check reads stored sizes only.
        let columns: Vec<String> = payload
            .iter()
            .map(|c| format!("_sqn_t.{}", quote_ident(c)))
            .collect();
        format!(
            "IF (SELECT pg_catalog.count(*) <= {rows} AND coalesce(pg_catalog.sum({size}), 0) <= {bytes}
        FROM {table} AS _sqn_t) THEN
    PERFORM {helper}(pg_catalog.json_agg(_sqn_s.*)::text, pg_catalog.count(*)::integer)
      FROM (SELECT {} FROM {table} AS _sqn_t) AS _sqn_s
    HAVING pg_catalog.count(*) > 0;
  ELSE
    {chunked}
  END IF;",
            columns.join(", "),
        )
    } else {
        chunked
    };
    let body = format!(
        "
BEGIN
  {capture}{wake}
  RETURN NULL;
END
"
    );
    function_header(&channel.name, &body)
}

/// `PERFORM call` once per chunk of a statement's rows: numbered, filtered, cut into chunks
/// of [`STATEMENT_CHUNK_ROWS`] rows and [`STATEMENT_CHUNK_STORED_BYTES`] stored bytes, in
/// order. `call` aggregates a chunk's payloads (`_sqn_p`, ordered by `_sqn_n`).
fn chunked_sql(rows: &StatementRows<'_>, call: &str) -> String {
    let StatementRows {
        table,
        projected,
        size,
        json,
        pair,
        filter,
        ..
    } = rows;
    let (rows, bytes) = (STATEMENT_CHUNK_ROWS, STATEMENT_CHUNK_STORED_BYTES);
    format!(
        "PERFORM {call}
      FROM (SELECT {json} AS _sqn_p, _sqn_t._sqn_n, (_sqn_t._sqn_n - 1) / {rows} AS _sqn_c,
                   (pg_catalog.sum({size}) OVER (ORDER BY _sqn_t._sqn_n) - ({size})) / {bytes} AS _sqn_d
              FROM (SELECT {projected}, pg_catalog.row_number() OVER () AS _sqn_n
                      FROM {table} AS _sqn_r) AS _sqn_t{pair}{filter}) AS _sqn_s
     GROUP BY _sqn_c, _sqn_d
     ORDER BY _sqn_c, _sqn_d;",
        projected = projected.join(", "),
    )
}

/// Whether a watch's [`Capture::Row`] is done by a statement-level trigger ([`batched_function_sql`]):
/// on the journal tiers, for a plain table (a partitioned table, a partition or a member of
/// an inheritance tree keeps the row-level trigger, which PostgreSQL clones to partitions and
/// which fires whatever table a statement names), without `trigger_columns` (a row trigger's
/// `UPDATE OF … WHEN` skips unchanged rows before any call) and without a carried or compared
/// column whose name the statement trigger uses itself (`_sqn_…`).
pub(crate) fn batched(w: &ResolvedWatch) -> bool {
    w.capture == Capture::Row
        && matches!(w.tier, Tier::Durable | Tier::Poll)
        && w.trigger_columns.is_empty()
        && !w.in_hierarchy
        && w.reserved_column().is_none()
}

/// [`Capture::Row`] on a plain table ([`batched`]): a statement-level trigger with a
/// transition table that writes one journal row per changed row — exactly the rows, payloads
/// and order of the row-level trigger ([`journal_function_sql`]), each row its own journal
/// row and sequence — but with one helper call (one privilege check, one multi-row `INSERT`)
/// per [`STATEMENT_CHUNK_ROWS`] rows and one wake-up per statement instead of one of each per
/// row: the per-row price of a 100-row statement falls by more than half, a single-row
/// statement pays ~12 µs more (README, "Row capture per statement").
///
/// A statement that fits one chunk (counted, and its stored size summed, first) has its
/// payloads aggregated in scan order in one query; a bigger one, or an UPDATE whose payload
/// carries old values (each new row paired with its old row by position, see
/// [`statement_rows`]), goes through [`chunked_sql`]. A statement that changed no row does
/// nothing.
fn batched_function_sql(w: &ResolvedWatch) -> String {
    let channel = &w.channel;
    let chan = quote_literal(&channel.name);
    let helper = function_name(&channel.name);
    let rows = statement_rows(w);
    let chunked = chunked_sql(
        &rows,
        &format!("{helper}(pg_catalog.array_agg(_sqn_p ORDER BY _sqn_n))"),
    );
    let wake = match w.tier {
        Tier::Durable => format!("\n  {DONE} := pg_catalog.pg_notify({chan}, '') IS NULL;"),
        _ => String::new(),
    };
    let StatementRows {
        table, size, json, ..
    } = rows;
    let (limit, bytes) = (STATEMENT_CHUNK_ROWS, STATEMENT_CHUNK_STORED_BYTES);
    let paired = w.old_values && channel.operation == crate::operation::Operation::Update;
    let capture = if paired {
        format!(
            "SELECT pg_catalog.count(*) INTO _sqn_count FROM {table};
  IF _sqn_count = 0 THEN
    RETURN NULL;
  END IF;
  {chunked}"
        )
    } else {
        format!(
            "SELECT pg_catalog.count(*), coalesce(pg_catalog.sum({size}), 0) INTO _sqn_count, _sqn_bytes
    FROM {table} AS _sqn_t;
  IF _sqn_count = 0 THEN
    RETURN NULL;
  END IF;
  IF _sqn_count <= {limit} AND _sqn_bytes <= {bytes} THEN
    SELECT pg_catalog.array_agg({json}) INTO _sqn_payloads FROM {table} AS _sqn_t;
    {DONE} := {helper}(_sqn_payloads) IS NULL;
  ELSE
    {chunked}
  END IF;"
        )
    };
    let body = format!(
        "
DECLARE
  _sqn_count bigint;
  _sqn_bytes bigint;
  _sqn_payloads text[];
  {DONE} boolean;
BEGIN
  {capture}{wake}
  RETURN NULL;
END
"
    );
    function_header(&channel.name, &body)
}

/// The variable a row trigger assigns its calls' (void) results to, as `… IS NULL`.
///
/// A row trigger runs once per changed row, so how it calls matters: `PERFORM f(…)` runs a
/// query (executor start and end on every row), while an assignment whose expression reads no
/// table is a plpgsql *simple expression*, evaluated directly. Measured with
/// `scripts/trigger-cost` (variant `simple` against `full`): 7–8 µs less per row.
const DONE: &str = "_sqn_done";

/// The journal tiers: the row goes to `sqlnotify.journal` inside the user's transaction (so it
/// commits or rolls back with it, and has no size limit); the durable tier then sends an empty
/// NOTIFY on the channel to wake listeners (identical notifications in one transaction are
/// folded into one by PostgreSQL), the poll tier nothing at all. Both calls are simple
/// expressions ([`DONE`]).
fn journal_function_sql(w: &ResolvedWatch) -> String {
    let channel = &w.channel;
    let chan = quote_literal(&channel.name);
    let wake = match w.tier {
        Tier::Durable => format!("\n  {DONE} := pg_catalog.pg_notify({chan}, '') IS NULL;"),
        _ => String::new(),
    };
    let body = format!(
        "
DECLARE
  {DONE} boolean;
BEGIN
  {DONE} := {helper}({payload}, 1) IS NULL;{wake}
  RETURN NULL;
END
",
        helper = function_name(&channel.name),
        payload = row_payload(w),
    );
    function_header(&channel.name, &body)
}

/// The largest payload the notify tier sends on `channel`: NOTIFY's limit, less the signature
/// in front of a signed payload.
fn notify_limit(channel: &crate::event::Channel) -> usize {
    if channel.signed {
        NOTIFY_PAYLOAD_LIMIT - SIGNATURE_LEN
    } else {
        NOTIFY_PAYLOAD_LIMIT
    }
}

/// The notify tier's trigger function: builds the payload (and, only when it is too large for
/// a notification, the key-only payload) as the writer, and hands both to the helper.
fn notify_function_sql(w: &ResolvedWatch) -> String {
    let channel = &w.channel;
    let row = channel.operation.row_variable();
    let keys: Vec<&String> = channel.key_columns.iter().collect();
    let body = format!(
        "
DECLARE
  _sqn_payload text;
  _sqn_key text;
  {DONE} boolean;
BEGIN
  _sqn_payload := {full};
  IF pg_catalog.octet_length(_sqn_payload) > {limit} THEN
    _sqn_key := {key_only};
  END IF;
  {DONE} := {helper}(_sqn_payload, _sqn_key) IS NULL;
  RETURN NULL;
END
",
        full = row_payload(w),
        key_only = json_expr(row, &keys),
        limit = notify_limit(channel),
        helper = function_name(&channel.name),
    );
    function_header(&channel.name, &body)
}

/// The notify tier's helper body: an oversized payload goes to the overflow table (inside its
/// own exception block, so even a missing table only degrades the event to "truncated"), and a
/// payload that still does not fit is cut down to the key; then it is signed (when the channel
/// is) and sent.
fn notify_helper_body(w: &ResolvedWatch, authorize: &str) -> String {
    let channel = &w.channel;
    let chan = quote_literal(&channel.name);
    let limit = notify_limit(channel);
    let send = if channel.signed {
        let signature = signing::hmac_sql("_sqn_ipad", "_sqn_opad", &chan, "_sqn_payload");
        format!(
            "{}\n  PERFORM pg_catalog.pg_notify({chan}, coalesce({signature}, '') || _sqn_payload);",
            signing::read_pads_sql()
        )
    } else {
        format!("PERFORM pg_catalog.pg_notify({chan}, _sqn_payload);")
    };
    let meta = |inner: &str| quote_literal(&format!("{{\"{META_KEY}\":{inner}")); // opening part
    let overflow_block = if w.use_overflow_table {
        format!(
            "
    BEGIN
      INSERT INTO {schema}.overflow (channel, payload) VALUES ({chan}, _sqn_payload) RETURNING token INTO _sqn_ref;
      _sqn_payload := {open_ref} || _sqn_ref::text || '\"}},' || pg_catalog.substr(_sqn_key, 2);
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'sqlnotify: cannot store an overflow row for channel %: %', {chan}, SQLERRM;
      _sqn_ref := NULL;
    END;",
            schema = quote_ident(SCHEMA),
            open_ref = meta("{\"overflow\":\""),
        )
    } else {
        String::new()
    };
    // Cut to the key: the metadata says so and keeps the transaction id.
    let open_trunc = format!(
        "{} || {TX_EXPR}::text || '}},'",
        meta("{\"truncated\":true,\"tx\":")
    );
    let bare_trunc = format!(
        "{} || {TX_EXPR}::text || '}}}}'",
        quote_literal(&format!("{{\"{META_KEY}\":{{\"truncated\":true,\"tx\":"))
    );
    format!(
        "
DECLARE
  _sqn_payload text := _sqn_full;
  _sqn_ref uuid;
  _sqn_ipad bytea;
  _sqn_opad bytea;
BEGIN
  {authorize}
  IF pg_catalog.octet_length(_sqn_payload) > {limit} THEN
    _sqn_key := coalesce(_sqn_key, '{{}}');{overflow_block}
    IF _sqn_ref IS NULL OR pg_catalog.octet_length(_sqn_payload) > {limit} THEN
      _sqn_payload := {open_trunc} || pg_catalog.substr(_sqn_key, 2);
      IF pg_catalog.octet_length(_sqn_payload) > {limit} THEN
        _sqn_payload := {bare_trunc};
      END IF;
    END IF;
  END IF;
  {send}
END
",
        open_trunc = open_trunc,
        bare_trunc = bare_trunc,
    )
}

/// `CREATE TRIGGER` for a watch. For UPDATE with `trigger_columns` the trigger is limited to
/// those columns and fires only when one of them really changed; types without an equality
/// operator (e.g. `json`) are compared as text.
pub(crate) fn trigger_sql(w: &ResolvedWatch) -> String {
    let channel = &w.channel;
    if batched(w) {
        return batched_trigger_sql(w);
    }
    if w.capture == Capture::Statement && w.tier != Tier::Notify {
        // Transition tables cannot be combined with a column list (`UPDATE OF`): the function
        // filters unchanged rows itself.
        let referencing = match channel.operation {
            crate::operation::Operation::Insert => format!("NEW TABLE AS {NEW_TABLE}"),
            crate::operation::Operation::Delete => format!("OLD TABLE AS {OLD_TABLE}"),
            crate::operation::Operation::Update => {
                format!("OLD TABLE AS {OLD_TABLE} NEW TABLE AS {NEW_TABLE}")
            }
        };
        return format!(
            "CREATE TRIGGER {} AFTER {} ON {}.{} REFERENCING {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {}()",
            quote_ident(&channel.name),
            channel.operation.sql_keyword(),
            quote_ident(&channel.schema),
            quote_ident(&channel.table),
            function_name(&channel.name),
        );
    }
    let (event, changed) = w.trigger_event(|q, c, has_eq| {
        distinct(w, c, has_eq, &format!("OLD.{q}"), &format!("NEW.{q}"))
    });
    let when = changed.map(|c| format!(" WHEN ({c})")).unwrap_or_default();
    format!(
        "CREATE TRIGGER {} AFTER {event} ON {}.{} FOR EACH ROW{when} EXECUTE FUNCTION {}()",
        quote_ident(&channel.name),
        quote_ident(&channel.schema),
        quote_ident(&channel.table),
        function_name(&channel.name),
    )
}

/// The triggers of row capture by a statement-level trigger ([`batched`]): the statement-level
/// trigger, reading the transition table its function needs (an UPDATE's old rows only when
/// the payload carries old values), and a guard: a row-level trigger with a transition table
/// that never fires (`WHEN (false)`: not even a call) and exists because PostgreSQL then
/// refuses to make the table a partition or an inheritance child ("trigger … prevents table
/// … from becoming a partition") — as one, writes made through its parent would fire the
/// parent's statement triggers, not this one, and be lost. The error tells the user to
/// reinstall the watch after the change (`start()` then installs the row-level trigger).
fn batched_trigger_sql(w: &ResolvedWatch) -> String {
    let channel = &w.channel;
    // (the guard references the table of the rows the watch reports)
    let (referencing, guarded) = match channel.operation {
        crate::operation::Operation::Insert => (format!("NEW TABLE AS {NEW_TABLE}"), "NEW"),
        crate::operation::Operation::Delete => (format!("OLD TABLE AS {OLD_TABLE}"), "OLD"),
        crate::operation::Operation::Update if w.old_values => (
            format!("OLD TABLE AS {OLD_TABLE} NEW TABLE AS {NEW_TABLE}"),
            "NEW",
        ),
        crate::operation::Operation::Update => (format!("NEW TABLE AS {NEW_TABLE}"), "NEW"),
    };
    let table = format!(
        "{}.{}",
        quote_ident(&channel.schema),
        quote_ident(&channel.table)
    );
    let (event, function) = (
        channel.operation.sql_keyword(),
        function_name(&channel.name),
    );
    format!(
        "CREATE TRIGGER {} AFTER {event} ON {table} REFERENCING {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n\
         CREATE TRIGGER {} AFTER {event} ON {table} REFERENCING {guarded} TABLE AS _sqn_guarded FOR EACH ROW WHEN (false) EXECUTE FUNCTION {function}()",
        quote_ident(&channel.name),
        quote_ident(&guard_name(&channel.name)),
    )
}

/// The name of a watch's guard trigger ([`batched_trigger_sql`]): `_sqn_guard_` and 16 hex
/// digits of the channel name's SHA-256 — a watch's triggers are named after its channel,
/// and channel names may hold any character, so no suffix could be kept apart from another
/// channel's name; the hash keeps it within PostgreSQL's 63 bytes.
pub(crate) fn guard_name(channel: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(channel.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("_sqn_guard_{hex}")
}

/// The names of a watch's triggers on its table (all must exist for it to count as installed).
pub(crate) fn trigger_names(w: &ResolvedWatch) -> Vec<String> {
    let mut names = vec![w.channel.name.clone()];
    if batched(w) {
        names.push(guard_name(&w.channel.name));
    }
    names
}

/// The full definition of a watch's objects; its hash is what drift detection compares.
pub(crate) fn definition(w: &ResolvedWatch) -> String {
    format!(
        "{};\n{};\nREVOKE ALL ON FUNCTION {}() FROM PUBLIC;\n{};\n",
        helper_sql(w),
        function_sql(w),
        function_name(&w.channel.name),
        trigger_sql(w)
    )
}

/// Drops a watch's function and, through CASCADE, its trigger on whatever table it is on.
/// Drops its helper too, whichever tier it was made for.
pub(crate) fn drop_sql(channel: &str) -> String {
    let name = function_name(channel);
    format!(
        "DROP FUNCTION IF EXISTS {name}() CASCADE;\n\
         DROP FUNCTION IF EXISTS {name}(text, text);\n\
         DROP FUNCTION IF EXISTS {name}(text, integer);\n\
         DROP FUNCTION IF EXISTS {name}(text[]);\n"
    )
}

/// Upserts a watch's catalog row (used by the exported install script).
pub(crate) fn catalog_upsert_sql(w: &ResolvedWatch) -> String {
    let def = quote_literal(&definition(w));
    format!(
        "INSERT INTO {s}.catalog (channel, table_schema, table_name, operation, definition, definition_hash)
VALUES ({}, {}, {}, {}, {def}, pg_catalog.md5({def}))
ON CONFLICT (channel) DO UPDATE SET table_schema = EXCLUDED.table_schema, table_name = EXCLUDED.table_name,
  operation = EXCLUDED.operation, definition = EXCLUDED.definition,
  definition_hash = EXCLUDED.definition_hash, installed_at = now();\n",
        quote_literal(&w.channel.name),
        quote_literal(&w.channel.schema),
        quote_literal(&w.channel.table),
        quote_literal(w.channel.operation.as_str()),
        s = quote_ident(SCHEMA),
    )
}

/// The privileges a role needs to run a notifier against objects someone else installed
/// (`manage_triggers(false)`): read the catalog (verification) and the signing key (verifying
/// notifications), read and expire the overflow table and the journal, write custom events to
/// them, record what the retention purge deleted (read by a resuming SSE client), keep consumer
/// positions, record dead letters, and record and prune transactional handlers' events
/// (`effects`; the prune reads the journal's sequence with `pg_sequence_last_value`, which
/// `USAGE` allows). Writers need none of this: trigger functions run as their owner.
pub(crate) fn grant_sql(role: &str) -> String {
    let (s, r) = (quote_ident(SCHEMA), quote_ident(role));
    format!(
        "GRANT USAGE ON SCHEMA {s} TO {r};
GRANT SELECT ON {s}.catalog, {s}.signing TO {r};
GRANT SELECT, INSERT, DELETE ON {s}.overflow, {s}.journal TO {r};
GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.consumers, {s}.dead_letters TO {r};
GRANT SELECT, INSERT, UPDATE ON {s}.trimmed TO {r};
GRANT SELECT, INSERT, DELETE ON {s}.effects TO {r};
GRANT USAGE ON SEQUENCE {s}.overflow_id_seq, {s}.journal_id_seq, {s}.dead_letters_id_seq TO {r};
"
    )
}

/// A complete, idempotent install script for `watches`: what `start()` would do, for users who
/// apply DDL through their own migrations (then start with `manage_triggers(false)`).
///
/// Applying it again changes nothing that is unchanged: each watch is (re)created by a DO
/// block only when the catalog does not record its exact definition or its trigger is gone
/// (the same test `start()` makes), so an unchanged watch takes no lock on its table.
pub(crate) fn install_script(watches: &[ResolvedWatch], grant_to: Option<&str>) -> String {
    let mut sql = format!(
        "-- sqlnotify install script (apply in one transaction)\n\
         -- A watch is recreated only when its definition changed or its trigger is missing;\n\
         -- only that locks its table (consider SET LOCAL lock_timeout for your migration).\n\
         BEGIN;\nSELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK});\n{};\n",
        setup_sql()
    );
    for w in watches {
        sql.push_str(&format!("\n-- {}\n", crate::sql::comment(&w.channel.name)));
        sql.push_str(&install_if_changed_sql(w));
    }
    if let Some(role) = grant_to {
        sql.push_str(&format!(
            "\n-- what the notifier's role {} needs\n{}",
            crate::sql::comment(&quote_ident(role)),
            grant_sql(role)
        ));
    }
    sql.push_str("COMMIT;\n");
    sql
}

/// A DO block installing one watch unless it is installed as generated.
fn install_if_changed_sql(w: &ResolvedWatch) -> String {
    let channel = &w.channel;
    let name = quote_literal(&channel.name);
    let body = format!(
        "
BEGIN
  IF EXISTS (SELECT 1 FROM {s}.catalog
              WHERE channel = {name} AND definition_hash = pg_catalog.md5({definition}))
     AND (SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger t
            JOIN pg_catalog.pg_class r ON r.oid = t.tgrelid
            JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
           WHERE t.tgname = ANY({names}) AND n.nspname = {schema} AND r.relname = {table})
         = pg_catalog.cardinality({names}) THEN
    RETURN; -- installed as generated: nothing to do, no lock taken
  END IF;
{drop}{create}{record}END
",
        s = quote_ident(SCHEMA),
        definition = quote_literal(&definition(w)),
        names = format!(
            "ARRAY[{}]::text[]",
            trigger_names(w)
                .iter()
                .map(|n| quote_literal(n))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        schema = quote_literal(&channel.schema),
        table = quote_literal(&channel.table),
        drop = drop_sql(&channel.name),
        create = definition(w),
        record = catalog_upsert_sql(w),
    );
    format!("DO {};\n", dollar_quote(&body))
}

/// `text` as a dollar-quoted literal whose tag does not occur in it (so nothing in a watch —
/// a column or label containing `$sqn$` — can end it early).
pub(super) fn dollar_quote(text: &str) -> String {
    let tag = (0..)
        .map(|i| match i {
            0 => "$sqn$".to_string(),
            i => format!("$sqn{i}$"),
        })
        .find(|tag| !text.contains(tag.as_str()))
        .expect("some tag is free");
    format!("{tag}{text}{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Channel;
    use crate::operation::Operation;

    fn watch(op: Operation, label: Option<&str>, extra: &[&str]) -> ResolvedWatch {
        ResolvedWatch {
            channel: Channel {
                name: format!("sqlnotify_{}", label.unwrap_or("public_CamelCase_x")),
                schema: "public".into(),
                table: "CamelCase".into(),
                operation: op,
                label: label.map(str::to_string),
                key_columns: vec!["id".into()],
                extra_columns: extra.iter().map(|s| s.to_string()).collect(),
                tier: crate::tier::Tier::Notify,
                signed: false,
            },
            trigger_columns: vec![],
            data_types: Default::default(),
            use_overflow_table: true,
            tier: crate::tier::Tier::Notify,
            capture: Capture::Row,
            old_values: false,
            table_columns: vec![],
            context: vec![],
            in_hierarchy: false,
            equality_schemas: Default::default(),
        }
    }

    #[test]
    fn names_are_quoted_everywhere() {
        let w = watch(Operation::Insert, Some("o'brien"), &["select"]);
        let f = function_sql(&w);
        assert!(f.starts_with("CREATE OR REPLACE FUNCTION \"sqlnotify\".\"sqlnotify_o'brien\"()"));
        assert!(f.contains("NEW.\"select\""));
        assert!(
            !f.contains("SECURITY DEFINER"),
            "the row is read as the writer: {f}"
        );
        assert!(
            f.contains(
                "_sqn_done := \"sqlnotify\".\"sqlnotify_o''brien\"(_sqn_payload, _sqn_key) IS NULL"
            ),
            "{f}"
        );
        // the helper: the channel literal inside the body is quoted, then the body again
        let h = helper_sql(&w);
        assert!(
            h.starts_with(
                "CREATE OR REPLACE FUNCTION \"sqlnotify\".\"sqlnotify_o'brien\"(_sqn_full text, \
                 _sqn_key text) RETURNS void LANGUAGE plpgsql SECURITY DEFINER \
                 SET search_path = pg_catalog, pg_temp AS"
            ),
            "{h}"
        );
        assert!(h.contains("pg_notify(''sqlnotify_o''''brien''"), "{h}");
        assert!(
            h.contains(
                "has_any_column_privilege(session_user, \
                 pg_catalog.to_regclass(''\"public\".\"CamelCase\"''), ''INSERT'')"
            ),
            "{h}"
        );
        // DELETE has no column privileges
        let d = helper_sql(&watch(Operation::Delete, None, &[]));
        assert!(
            d.contains("has_table_privilege(session_user, pg_catalog.to_regclass(''\"public\".\"CamelCase\"''), ''DELETE'')"),
            "{d}"
        );
        assert!(
            h.ends_with(
                "GRANT EXECUTE ON FUNCTION \"sqlnotify\".\"sqlnotify_o'brien\"(text, text) TO PUBLIC"
            ),
            "{h}"
        );
        let t = trigger_sql(&w);
        assert_eq!(
            t,
            "CREATE TRIGGER \"sqlnotify_o'brien\" AFTER INSERT ON \"public\".\"CamelCase\" FOR EACH ROW \
             EXECUTE FUNCTION \"sqlnotify\".\"sqlnotify_o'brien\"()"
        );
    }

    /// Per-row work stays off the executor: a row trigger calls its helper and `pg_notify` as
    /// plpgsql simple expressions, not `PERFORM` (a query per call), and the helper's common
    /// case — the session's own role may write — is a test without a subquery.
    #[test]
    fn row_triggers_call_without_starting_a_query() {
        let mut w = watch(Operation::Insert, None, &["v"]);
        // (a table where the journal tiers keep the row-level trigger: see `batched`)
        w.in_hierarchy = true;
        for tier in [Tier::Notify, Tier::Durable, Tier::Poll] {
            w.tier = tier;
            let f = function_sql(&w);
            assert!(!f.contains("PERFORM"), "{tier:?}: {f}");
            assert!(
                f.contains("_sqn_done := \"sqlnotify\".\"sqlnotify_public_CamelCase_x\"("),
                "{tier:?}: {f}"
            );
            assert_eq!(
                f.contains(
                    "_sqn_done := pg_catalog.pg_notify(''sqlnotify_public_CamelCase_x'', '''') IS NULL;"
                ),
                tier == Tier::Durable,
                "{tier:?}: {f}"
            );
            let h = helper_sql(&w);
            let first_test = h
                .split("IF NOT coalesce(pg_catalog.has_any_column_privilege(session_user")
                .nth(1)
                .and_then(|rest| rest.split(" THEN").next())
                .unwrap_or_else(|| panic!("{tier:?}: no privilege test in {h}"));
            assert!(!first_test.contains("EXISTS"), "{tier:?}: {first_test}");
            assert!(
                h.contains("IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles"),
                "{h}"
            );
        }
    }

    #[test]
    fn delete_reads_old_and_update_checks_real_changes() {
        assert!(function_sql(&watch(Operation::Delete, None, &[])).contains("OLD.\"id\""));
        let mut w = watch(Operation::Update, None, &[]);
        w.trigger_columns = vec![("email".into(), true), ("doc".into(), false)];
        let t = trigger_sql(&w);
        assert!(t.contains("AFTER UPDATE OF \"email\", \"doc\" ON"));
        assert!(t.contains(
            "WHEN (OLD.\"email\" IS DISTINCT FROM NEW.\"email\" OR OLD.\"doc\"::text IS DISTINCT FROM NEW.\"doc\"::text)"
        ));
    }

    #[test]
    fn context_values_are_read_without_fail_in_every_function() {
        assert_eq!(
            context_expr("app.user_id").as_deref(),
            Some("NULLIF(pg_catalog.current_setting('app.user_id', true), '')")
        );
        for bad in [
            "user_id",
            "app.",
            ".x",
            "app.user id",
            "app.x'y",
            "1app.x",
            "data_directory",
        ] {
            assert!(context_expr(bad).is_none(), "{bad}");
        }
        assert!(context_expr("a_1.b$2.c").is_some());
        assert!(context_expr(&format!("a.{}", "b".repeat(62))).is_none());
        let mut w = watch(Operation::Insert, None, &["v"]);
        w.in_hierarchy = true; // the row-level trigger on every tier (see `batched`)
        w.context = vec!["current_user".into(), "my.tenant".into()];
        let meta = "|| '',\"__sqlnotify\":'' || (pg_catalog.json_build_object(''context'', \
                    pg_catalog.json_build_object(''current_user'', current_user, ''my.tenant'', \
                    NULLIF(pg_catalog.current_setting(''my.tenant'', true), ''''))))::text || ''}''";
        for tier in [Tier::Notify, Tier::Durable, Tier::Poll] {
            w.tier = tier;
            let f = function_sql(&w);
            // the notify tier's payload carries the transaction id too
            let expected = match tier {
                Tier::Notify => meta.replace(
                    "''))))::text",
                    "'')), ''tx'', pg_catalog.pg_current_xact_id()))::text",
                ),
                _ => meta.to_string(),
            };
            assert!(f.contains(&expected), "{tier:?}: {f}");
        }
        // statement capture: every row, the chunked path only
        w.tier = Tier::Durable;
        w.capture = Capture::Statement;
        let f = function_sql(&w);
        assert!(!f.contains("json_agg"), "{f}");
        assert!(
            f.contains(&format!(
                "pg_catalog.left(pg_catalog.json_build_object(''id'', _sqn_t.\"id\", ''v'', _sqn_t.\"v\")::text, -1) {meta}"
            )),
            "{f}"
        );
        // beside old values
        w.capture = Capture::Row;
        w.channel.operation = Operation::Delete;
        w.old_values = true;
        let f = function_sql(&w);
        assert!(
            f.contains(
                "(pg_catalog.json_build_object(''old'', (pg_catalog.json_build_object(''id'', OLD.\"id\", ''v'', OLD.\"v\")::text)::json, \
                 ''context'', pg_catalog.json_build_object(''current_user''"
            ),
            "{f}"
        );
    }

    #[test]
    fn old_values_add_the_old_row_and_the_changed_columns() {
        let mut w = watch(Operation::Update, None, &["v"]);
        w.in_hierarchy = true; // the row-level trigger on every tier (see `batched`)
        assert!(!function_sql(&w).contains("OLD."));
        w.old_values = true;
        w.table_columns = vec![("id".into(), true), ("doc".into(), false)];
        for tier in [Tier::Notify, Tier::Durable, Tier::Poll] {
            w.tier = tier;
            let f = function_sql(&w);
            let expected = "pg_catalog.left(pg_catalog.json_build_object(''id'', NEW.\"id\", ''v'', NEW.\"v\")::text, -1) \
                     || '',\"__sqlnotify\":'' || (pg_catalog.json_build_object(''old'', \
                     (pg_catalog.json_build_object(''id'', OLD.\"id\", ''v'', OLD.\"v\")::text)::json, ''changed'', \
                     pg_catalog.to_json(pg_catalog.array_remove(ARRAY[\
                     CASE WHEN OLD.\"id\" IS DISTINCT FROM NEW.\"id\" THEN ''id'' END, \
                     CASE WHEN OLD.\"doc\"::text IS DISTINCT FROM NEW.\"doc\"::text THEN ''doc'' END]::text[], NULL))))::text || ''}''";
            // the notify tier's payload carries the transaction id too
            let expected = match tier {
                Tier::Notify => expected.replace(
                    "NULL))))::text",
                    "NULL)), ''tx'', pg_catalog.pg_current_xact_id()))::text",
                ),
                _ => expected.to_string(),
            };
            assert!(f.contains(&expected), "{tier:?}: {f}");
        }
        w.channel.operation = Operation::Delete;
        let f = function_sql(&w);
        assert!(f.contains("(pg_catalog.json_build_object(''old'', (pg_catalog.json_build_object(''id'', OLD.\"id\", ''v'', OLD.\"v\")::text)::json))::text"), "{f}");
        assert!(!f.contains("changed"), "{f}");
    }

    #[test]
    fn overflow_can_be_disabled_and_wide_rows_use_row_to_json() {
        let mut w = watch(Operation::Insert, None, &[]);
        w.use_overflow_table = false;
        assert!(!function_sql(&w).contains("overflow (channel"));
        let many: Vec<String> = (0..60).map(|i| format!("c{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(function_sql(&watch(Operation::Insert, None, &many)).contains("row_to_json"));
    }

    /// Row capture on a plain table: a statement-level trigger writing one journal row per
    /// row through one helper call per chunk, and the guard that keeps the table from
    /// becoming a partition or an inheritance child.
    #[test]
    fn row_capture_on_a_plain_table_is_batched_per_statement() {
        let mut w = watch(Operation::Insert, Some("o'brien"), &["v"]);
        w.tier = Tier::Durable;
        assert!(batched(&w));
        let guard = guard_name("sqlnotify_o'brien");
        assert_eq!(
            trigger_sql(&w),
            format!(
                "CREATE TRIGGER \"sqlnotify_o'brien\" AFTER INSERT ON \"public\".\"CamelCase\" \
                 REFERENCING NEW TABLE AS _sqn_new FOR EACH STATEMENT \
                 EXECUTE FUNCTION \"sqlnotify\".\"sqlnotify_o'brien\"();\n\
                 CREATE TRIGGER \"{guard}\" AFTER INSERT ON \"public\".\"CamelCase\" \
                 REFERENCING NEW TABLE AS _sqn_guarded FOR EACH ROW WHEN (false) \
                 EXECUTE FUNCTION \"sqlnotify\".\"sqlnotify_o'brien\"()"
            )
        );
        assert_eq!(trigger_names(&w), ["sqlnotify_o'brien".to_string(), guard]);
        let h = helper_sql(&w);
        assert!(
            h.contains("\"sqlnotify_o'brien\"(_sqn_payloads text[])"),
            "{h}"
        );
        assert!(
            h.contains(
                "INSERT INTO \"sqlnotify\".journal (channel, payload)\n  \
                 SELECT ''sqlnotify_o''''brien'', _sqn_u.p FROM pg_catalog.unnest(_sqn_payloads) \
                 WITH ORDINALITY AS _sqn_u(p, n)\n   ORDER BY _sqn_u.n;"
            ),
            "{h}"
        );
        assert!(h.contains("(text[]) TO PUBLIC"), "{h}");
        let f = function_sql(&w);
        // counted first; a statement that fits one chunk: one aggregate, one helper call
        assert!(
            f.contains(&format!(
                "IF _sqn_count <= {STATEMENT_CHUNK_ROWS} AND _sqn_bytes <= {STATEMENT_CHUNK_STORED_BYTES} THEN\n    \
                 SELECT pg_catalog.array_agg(pg_catalog.json_build_object(''id'', _sqn_t.\"id\", ''v'', _sqn_t.\"v\")::text) \
                 INTO _sqn_payloads FROM _sqn_new AS _sqn_t;\n    \
                 _sqn_done := \"sqlnotify\".\"sqlnotify_o''brien\"(_sqn_payloads) IS NULL;"
            )),
            "{f}"
        );
        assert!(
            f.contains("IF _sqn_count = 0 THEN\n    RETURN NULL;"),
            "{f}"
        );
        // a bigger one: chunks, each an array of its rows in order
        assert!(
            f.contains(
                "PERFORM \"sqlnotify\".\"sqlnotify_o''brien\"(pg_catalog.array_agg(_sqn_p ORDER BY _sqn_n))"
            ),
            "{f}"
        );
        assert!(f.contains("GROUP BY _sqn_c, _sqn_d"), "{f}");
        // one wake-up per statement, on the durable tier only
        assert_eq!(f.matches("pg_notify").count(), 1, "{f}");
        w.tier = Tier::Poll;
        assert!(!function_sql(&w).contains("pg_notify"));
        // UPDATE reads only the new rows, unless the payload carries old values: then the
        // old rows too, paired by position, always through the numbered path
        w.channel.operation = Operation::Update;
        assert!(trigger_sql(&w).contains("REFERENCING NEW TABLE AS _sqn_new FOR EACH STATEMENT"));
        w.old_values = true;
        w.table_columns = vec![("id".into(), true), ("v".into(), true)];
        assert!(trigger_sql(&w).contains(
            "REFERENCING OLD TABLE AS _sqn_old NEW TABLE AS _sqn_new FOR EACH STATEMENT"
        ));
        let f = function_sql(&w);
        assert!(!f.contains("_sqn_bytes <="), "{f}");
        assert!(f.contains("ON _sqn_w._sqn_n = _sqn_t._sqn_n"), "{f}");
        // DELETE reads the old rows, its guard too
        w.channel.operation = Operation::Delete;
        let t = trigger_sql(&w);
        assert!(
            t.contains("REFERENCING OLD TABLE AS _sqn_old FOR EACH STATEMENT"),
            "{t}"
        );
        assert!(
            t.contains("REFERENCING OLD TABLE AS _sqn_guarded FOR EACH ROW WHEN (false)"),
            "{t}"
        );
        assert!(function_sql(&w).contains("FROM _sqn_old AS _sqn_t;"));
        // dropping a watch drops this helper too
        assert!(drop_sql("c").contains("DROP FUNCTION IF EXISTS \"sqlnotify\".\"c\"(text[]);"));
    }

    /// Where a statement-level trigger would not see every write, or a row trigger is
    /// cheaper, row capture keeps the row-level trigger.
    #[test]
    fn row_capture_keeps_the_row_trigger_where_a_statement_trigger_would_not_do() {
        let mut base = watch(Operation::Update, None, &["v"]);
        base.tier = Tier::Durable;
        let mut cases = Vec::new();
        let mut w = base.clone();
        w.in_hierarchy = true; // partitioned, a partition, or in an inheritance tree
        cases.push(w);
        let mut w = base.clone();
        w.trigger_columns = vec![("v".into(), true)];
        cases.push(w);
        let mut w = base.clone();
        w.channel.extra_columns = vec!["_sqn_n".into()];
        cases.push(w);
        let mut w = base.clone();
        w.tier = Tier::Notify;
        cases.push(w);
        for w in cases {
            assert!(!batched(&w), "{w:?}");
            let t = trigger_sql(&w);
            assert!(
                t.contains("FOR EACH ROW") && !t.contains("REFERENCING"),
                "{t}"
            );
            assert_eq!(trigger_names(&w), std::slice::from_ref(&w.channel.name));
        }
    }

    #[test]
    fn guard_names_are_short_stable_and_per_channel() {
        let long = "x".repeat(63);
        for channel in ["a", "a_guard", "sqlnotify_public_t_insert", long.as_str()] {
            let name = guard_name(channel);
            assert_eq!(name, guard_name(channel));
            assert_eq!(name.len(), "_sqn_guard_".len() + 16, "{name}");
        }
        assert_ne!(guard_name("a"), guard_name("b"));
    }

    #[test]
    fn statement_capture_uses_transition_tables_and_chunks() {
        let mut w = watch(Operation::Insert, Some("o'brien"), &["v"]);
        w.tier = Tier::Durable;
        w.capture = Capture::Statement;
        let t = trigger_sql(&w);
        assert_eq!(
            t,
            "CREATE TRIGGER \"sqlnotify_o'brien\" AFTER INSERT ON \"public\".\"CamelCase\" \
             REFERENCING NEW TABLE AS _sqn_new FOR EACH STATEMENT \
             EXECUTE FUNCTION \"sqlnotify\".\"sqlnotify_o'brien\"()"
        );
        let f = function_sql(&w);
        assert!(
            f.contains("PERFORM \"sqlnotify\".\"sqlnotify_o''brien\"(pg_catalog.json_agg"),
            "{f}"
        );
        assert!(helper_sql(&w).contains(
            "INSERT INTO \"sqlnotify\".journal (channel, payload, events) \
             VALUES (''sqlnotify_o''''brien'', _sqn_payload, _sqn_events)"
        ));
        assert!(f.contains("FROM _sqn_new AS _sqn_t"), "{f}");
        assert!(f.contains("GROUP BY _sqn_c, _sqn_d"), "{f}");
        assert!(
            f.contains(&format!(
                "(_sqn_t._sqn_n - 1) / {STATEMENT_CHUNK_ROWS} AS _sqn_c"
            )),
            "{f}"
        );
        assert!(
            f.contains(
                "row_number() OVER () AS _sqn_n\n                      FROM _sqn_new AS _sqn_r"
            ),
            "{f}"
        );
        assert!(f.contains("json_agg(_sqn_s.*)"), "{f}");
        assert!(
            f.contains("string_agg(_sqn_p, '','' ORDER BY _sqn_n)"),
            "{f}"
        );
        assert!(f.contains("_sqn_t.\"v\""), "{f}");
        assert!(
            f.contains("pg_notify(''sqlnotify_o''''brien'', '''')"),
            "{f}"
        );
        w.tier = Tier::Poll;
        assert!(!function_sql(&w).contains("pg_notify"));
        // the notify tier never uses statement capture (precheck refuses the combination)
        w.tier = Tier::Notify;
        assert!(trigger_sql(&w).contains("FOR EACH ROW"));
    }

    #[test]
    fn statement_capture_reads_old_rows_for_delete_and_filters_updates_by_key() {
        let mut w = watch(Operation::Delete, None, &[]);
        w.tier = Tier::Poll;
        w.capture = Capture::Statement;
        assert!(trigger_sql(&w).contains("REFERENCING OLD TABLE AS _sqn_old FOR EACH STATEMENT"));
        assert!(function_sql(&w).contains("FROM _sqn_old AS _sqn_t"));
        let mut w = watch(Operation::Update, None, &[]);
        w.tier = Tier::Poll;
        w.capture = Capture::Statement;
        assert!(
            !function_sql(&w).contains("NOT EXISTS"),
            "no trigger_columns: every row"
        );
        w.trigger_columns = vec![("email".into(), true), ("doc".into(), false)];
        let t = trigger_sql(&w);
        assert!(
            t.contains("AFTER UPDATE ON"),
            "no column list with transition tables: {t}"
        );
        assert!(t.contains("REFERENCING OLD TABLE AS _sqn_old NEW TABLE AS _sqn_new"));
        let f = function_sql(&w);
        assert!(
            f.contains(
                "WHERE NOT EXISTS (SELECT 1 FROM _sqn_old AS _sqn_o WHERE _sqn_o.\"id\"::text = _sqn_t.\"id\"::text \
                 AND NOT (_sqn_o.\"email\" IS DISTINCT FROM _sqn_t.\"email\" OR _sqn_o.\"doc\"::text IS DISTINCT FROM _sqn_t.\"doc\"::text))"
            ),
            "{f}"
        );
    }

    #[test]
    fn statement_capture_pairs_old_rows_by_position() {
        let mut w = watch(Operation::Update, None, &["v"]);
        w.tier = Tier::Durable;
        w.capture = Capture::Statement;
        w.old_values = true;
        w.table_columns = vec![("id".into(), true), ("v".into(), true), ("x".into(), true)];
        let f = function_sql(&w);
        assert!(!f.contains("json_agg"), "no fast path: {f}");
        assert!(
            f.contains(
                "JOIN (SELECT _sqn_r.\"id\", _sqn_r.\"v\", _sqn_r.\"x\", pg_catalog.row_number() OVER () AS _sqn_n\n                      \
                 FROM _sqn_old AS _sqn_r) AS _sqn_w ON _sqn_w._sqn_n = _sqn_t._sqn_n"
            ),
            "{f}"
        );
        assert!(f.contains("(pg_catalog.json_build_object(''id'', _sqn_w.\"id\", ''v'', _sqn_w.\"v\")::text)::json"), "{f}");
        assert!(
            f.contains("CASE WHEN _sqn_w.\"x\" IS DISTINCT FROM _sqn_t.\"x\" THEN ''x'' END"),
            "{f}"
        );
        w.channel.operation = Operation::Delete;
        let f = function_sql(&w);
        assert!(!f.contains("JOIN") && !f.contains("changed"), "{f}");
        assert!(
            f.contains("FROM _sqn_old AS _sqn_r) AS _sqn_t) AS _sqn_s"),
            "{f}"
        );
        assert!(f.contains("(pg_catalog.json_build_object(''old'', (pg_catalog.json_build_object(''id'', _sqn_t.\"id\", ''v'', _sqn_t.\"v\")::text)::json))::text"), "{f}");
    }

    #[test]
    fn the_install_script_recreates_only_what_changed() {
        let w = watch(Operation::Insert, Some("o'brien"), &["v"]);
        let script = install_script(std::slice::from_ref(&w), None);
        assert!(
            script.contains("DO $sqn$\nBEGIN\n  IF EXISTS (SELECT 1 FROM \"sqlnotify\".catalog")
        );
        assert!(script.contains("WHERE t.tgname = ANY(ARRAY['sqlnotify_o''brien']::text[]) AND n.nspname = 'public' AND r.relname = 'CamelCase')\n         = pg_catalog.cardinality(ARRAY['sqlnotify_o''brien']::text[]) THEN\n    RETURN;"), "{script}");
        let guard = script.find("RETURN;").unwrap();
        let after = format!(
            "END IF;\n{}{}{}END\n$sqn$;\n",
            drop_sql(&w.channel.name),
            definition(&w),
            catalog_upsert_sql(&w)
        );
        assert!(script[guard..].contains(&after), "DDL only after the check");
        assert!(script.contains(&format!(
            "definition_hash = pg_catalog.md5({}))",
            quote_literal(&definition(&w))
        )));
    }

    #[test]
    fn the_install_script_creates_every_table_and_grants_them() {
        let script = install_script(&[], Some("app"));
        for table in [
            "catalog",
            "overflow",
            "journal",
            "signing",
            "consumers",
            "dead_letters",
            "effects",
        ] {
            assert!(
                script.contains(&format!(
                    "CREATE TABLE IF NOT EXISTS \"sqlnotify\".{table} ("
                )),
                "{table}"
            );
        }
        let grants = script.find("-- what the notifier's role").unwrap();
        assert!(script.find("dead_letters (").unwrap() < grants);
        assert!(script[grants..].contains(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON \"sqlnotify\".consumers, \"sqlnotify\".dead_letters TO \"app\";"
        ));
        assert!(script[grants..].contains("\"sqlnotify\".dead_letters_id_seq TO \"app\";"));
        assert!(script[grants..]
            .contains("GRANT SELECT, INSERT, UPDATE ON \"sqlnotify\".trimmed TO \"app\";"));
        assert!(script.find("effects (").unwrap() < grants);
        assert!(script[grants..]
            .contains("GRANT SELECT, INSERT, DELETE ON \"sqlnotify\".effects TO \"app\";"));
    }

    #[test]
    fn dollar_quotes_pick_a_tag_the_text_does_not_contain() {
        assert_eq!(dollar_quote("x"), "$sqn$x$sqn$");
        assert_eq!(dollar_quote("a $sqn$ b"), "$sqn1$a $sqn$ b$sqn1$");
        assert_eq!(dollar_quote("$sqn$ $sqn1$"), "$sqn2$$sqn$ $sqn1$$sqn2$");
        let w = watch(Operation::Insert, None, &["$sqn$"]);
        assert!(install_script(&[w], None).contains("DO $sqn1$"));
    }

    #[test]
    fn backslashes_survive_double_quoting() {
        let f = function_sql(&watch(Operation::Insert, Some("a\\b"), &[]));
        assert!(f.contains(" AS E'"), "{f}");
    }

    #[test]
    fn equalities_outside_pg_catalog_are_named_with_their_schema() {
        let mut w = watch(Operation::Update, None, &[]);
        w.old_values = true;
        w.table_columns = vec![("id".into(), true), ("h".into(), true)];
        w.trigger_columns = vec![("h".into(), true)];
        w.equality_schemas = [("h".to_string(), "my ext".to_string())].into();
        let named = "CASE WHEN OLD.\"h\" IS NULL THEN NEW.\"h\" IS NOT NULL WHEN NEW.\"h\" IS NULL THEN true \
                     ELSE NOT (OLD.\"h\" OPERATOR(\"my ext\".=) NEW.\"h\") END";
        let t = trigger_sql(&w);
        assert!(t.contains(&format!("WHEN ({named})")), "{t}");
        let f = function_sql(&w);
        assert!(
            f.contains(&format!(
                "CASE WHEN {} THEN ''h'' END",
                named.replace('\'', "''")
            )),
            "{f}"
        );
        // (the types of pg_catalog keep the plain test, so their watches' definitions stay)
        assert!(
            f.contains("CASE WHEN OLD.\"id\" IS DISTINCT FROM NEW.\"id\" THEN ''id'' END"),
            "{f}"
        );
        w.tier = Tier::Durable;
        w.capture = Capture::Statement;
        let f = function_sql(&w);
        assert!(
            f.contains("_sqn_o.\"h\" OPERATOR(\"my ext\".=) _sqn_t.\"h\""),
            "{f}"
        );
        assert!(!f.contains("_sqn_o.\"h\" IS DISTINCT FROM"), "{f}");
    }

    #[test]
    fn helpers_accept_a_session_that_changed_the_table_without_a_privilege() {
        for (op, counter) in [
            (Operation::Insert, "pg_stat_get_xact_tuples_inserted"),
            (Operation::Update, "pg_stat_get_xact_tuples_updated"),
            (Operation::Delete, "pg_stat_get_xact_tuples_deleted"),
        ] {
            let h = helper_sql(&watch(op, None, &[]));
            assert!(
                h.contains(&format!(
                    "pg_catalog.sum(pg_catalog.{counter}(_sqn_p.relid)) > 0
                         FROM (SELECT pg_catalog.to_regclass(''\"public\".\"CamelCase\"'')
                               UNION SELECT relid FROM pg_catalog.pg_partition_tree(pg_catalog.to_regclass(''\"public\".\"CamelCase\"'')))
                              AS _sqn_p(relid)), false)"
                )),
                "{h}"
            );
        }
    }
}
