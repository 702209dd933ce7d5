//! One test database of any dialect, as the shared scenarios (`tests/scenarios/`) need it:
//! [`Backend`] is implemented by PostgreSQL ([`Pg`], one per tier), SQLite
//! ([`super::sqlite::TempDb`]) and MySQL ([`super::mysql::TestDb`]). Each creates a database
//! of its own (a file for SQLite) and removes it on drop, so tests run in parallel and leave
//! nothing behind.
//!
//! Scenarios write portable SQL (`INTEGER`, `VARCHAR(n)`, `TEXT`, `DOUBLE PRECISION`,
//! `BEGIN; … COMMIT;`): every dialect accepts it as it is.

use sqlnotify::{Notifier, NotifierBuilder, Operation, Tier, Watch};

use super::TestDb;

/// Which dialect (and for PostgreSQL, which tier) a backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Postgres(Tier),
    Sqlite,
    Mysql,
}

/// A test database of one dialect (and tier).
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// The dialect and tier.
    fn kind(&self) -> Kind;
    /// The database URL.
    fn url(&self) -> String;
    /// A builder for [`Backend::url`].
    fn builder(&self) -> NotifierBuilder {
        Notifier::builder(self.url())
    }
    /// What `Notifier::dialect_name` says.
    fn dialect_name(&self) -> &'static str {
        match self.kind() {
            Kind::Postgres(_) => "postgresql",
            Kind::Sqlite => "sqlite",
            Kind::Mysql => "mysql",
        }
    }
    /// The schema a table named without one is in (SQLite: `main`, MySQL: the database).
    fn schema(&self) -> String;
    /// A watch of `table`'s `op` on this backend's tier.
    fn watch(&self, table: &str, op: Operation) -> Watch {
        match self.kind() {
            Kind::Postgres(tier) => Watch::new(table, op).tier(tier),
            _ => Watch::new(table, op),
        }
    }
    /// The channel of the unlabelled watch of `table`'s `op`.
    fn channel_of(&self, table: &str, op: Operation) -> String {
        format!("sqlnotify_{}_{table}_{}", self.schema(), op.as_str())
    }
    /// Whether events carry their journal position (every tier but PostgreSQL's notify).
    fn journal(&self) -> bool {
        self.kind() != Kind::Postgres(Tier::Notify)
    }
    /// Runs SQL (several statements allowed) on a fresh connection.
    async fn run(&self, sql: &str);
    /// Runs `sql` on a fresh connection that first sets the context values `context` (name,
    /// text value) the way an application does on this dialect: PostgreSQL `SET LOCAL` in one
    /// transaction with `sql` (`set_config(name, value, true)`), MySQL `SET @name = 'value'`
    /// (names given with their `@`), SQLite `sqlite_context::set` on the writing connection.
    async fn run_with_context(&self, context: &[(&str, &str)], sql: &str);
    /// A query returning one integer.
    async fn number(&self, sql: &str) -> i64;
    /// Inserts `ids` into `table (id)`, one transaction per row.
    async fn insert_ids(&self, table: &str, ids: std::ops::RangeInclusive<i64>);
    /// The sqlnotify triggers installed, sorted (a trigger is named like its channel).
    async fn installed_triggers(&self) -> Vec<String>;
    /// The channels recorded in the catalog, sorted.
    async fn catalog_channels(&self) -> Vec<String>;
    /// How many sqlnotify objects there are besides triggers (tables, functions; PostgreSQL:
    /// functions and catalog rows).
    async fn sqlnotify_objects(&self) -> i64;
    /// The journal table (PostgreSQL: of the journal tiers).
    fn journal_table(&self) -> &'static str {
        match self.kind() {
            Kind::Postgres(_) => "sqlnotify.journal",
            _ => "sqlnotify_journal",
        }
    }
    /// The number of rows in the journal.
    async fn journal_rows(&self) -> i64 {
        self.number(&format!("SELECT count(*) FROM {}", self.journal_table()))
            .await
    }
    /// When `channel` was installed, per its catalog row, as text that sorts in time order.
    async fn installed_at(&self, channel: &str) -> String;
    /// What `channel`'s trigger runs, as the database shows it (PostgreSQL: the trigger and
    /// its function).
    async fn definition(&self, channel: &str) -> String;
    /// A fingerprint of how `channel` is installed that any DDL touching it changes (trigger
    /// identity or text, catalog timestamp, schema version).
    async fn fingerprint(&self, channel: &str) -> String;
}

/// A PostgreSQL database of its own, watched on one tier.
pub struct Pg {
    pub db: TestDb,
    pub tier: Tier,
}

impl Pg {
    pub async fn new(tier: Tier) -> Pg {
        Pg {
            db: TestDb::new().await,
            tier,
        }
    }
}

impl std::ops::Deref for Pg {
    type Target = TestDb;
    fn deref(&self) -> &TestDb {
        &self.db
    }
}

impl Backend for Pg {
    fn kind(&self) -> Kind {
        Kind::Postgres(self.tier)
    }
    fn url(&self) -> String {
        self.db.url.clone()
    }
    fn schema(&self) -> String {
        "public".into()
    }
    async fn run(&self, sql: &str) {
        self.db.exec(sql).await
    }
    async fn run_with_context(&self, context: &[(&str, &str)], sql: &str) {
        let sets: Vec<String> = context
            .iter()
            .map(|(name, value)| {
                format!(
                    "SELECT pg_catalog.set_config('{}', '{}', true);",
                    name.replace('\'', "''"),
                    value.replace('\'', "''")
                )
            })
            .collect();
        self.db
            .exec(&format!("BEGIN; {} {sql}; COMMIT;", sets.join(" ")))
            .await
    }
    async fn number(&self, sql: &str) -> i64 {
        self.db.count(sql).await
    }
    async fn insert_ids(&self, table: &str, ids: std::ops::RangeInclusive<i64>) {
        let client = self.db.client().await;
        let sql = format!("INSERT INTO \"{table}\" (id) VALUES ($1::bigint)");
        for id in ids {
            client.execute(&sql, &[&id]).await.unwrap();
        }
    }
    async fn installed_triggers(&self) -> Vec<String> {
        strings(
            &self.db,
            "SELECT tgname::text FROM pg_trigger WHERE NOT tgisinternal \
             AND tgname LIKE 'sqlnotify%' ORDER BY 1",
        )
        .await
    }
    async fn catalog_channels(&self) -> Vec<String> {
        strings(
            &self.db,
            "SELECT channel FROM sqlnotify.catalog ORDER BY channel",
        )
        .await
    }
    async fn installed_at(&self, channel: &str) -> String {
        strings(
            &self.db,
            &format!(
                "SELECT to_char(installed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') \
                 FROM sqlnotify.catalog WHERE channel = '{channel}'"
            ),
        )
        .await
        .pop()
        .unwrap_or_else(|| panic!("{channel} is not in the catalog"))
    }
    async fn sqlnotify_objects(&self) -> i64 {
        let functions = self
            .db
            .count(
                "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname = 'sqlnotify'",
            )
            .await;
        let catalog = self
            .db
            .count("SELECT (to_regclass('sqlnotify.catalog') IS NOT NULL)::int::int8")
            .await;
        let rows = match catalog {
            1 => {
                self.db
                    .count("SELECT count(*) FROM sqlnotify.catalog")
                    .await
            }
            _ => 0,
        };
        functions + rows
    }
    async fn definition(&self, channel: &str) -> String {
        strings(
            &self.db,
            &format!(
                "SELECT pg_get_triggerdef(oid) || ' ' || pg_get_functiondef(tgfoid)                  FROM pg_trigger WHERE tgname = '{channel}'"
            ),
        )
        .await
        .pop()
        .unwrap_or_else(|| panic!("{channel} is not installed"))
    }
    async fn fingerprint(&self, channel: &str) -> String {
        strings(
            &self.db,
            &format!(
                "SELECT t.oid::text || ' ' || c.installed_at::text || ' ' || \
                 pg_get_triggerdef(t.oid) FROM pg_trigger t \
                 JOIN sqlnotify.catalog c ON c.channel = t.tgname WHERE t.tgname = '{channel}'"
            ),
        )
        .await
        .pop()
        .unwrap_or_else(|| panic!("{channel} is not installed"))
    }
}

async fn strings(db: &TestDb, sql: &str) -> Vec<String> {
    db.client()
        .await
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}
