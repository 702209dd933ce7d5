//! Reading the PostgreSQL catalog (table descriptions) and keeping sqlnotify's own catalog:
//! installing, verifying and removing watches under the install advisory lock.
//!
//! Drift detection compares the md5 of a watch's generated definition with the one recorded
//! at install time. Unchanged watches are left alone — no DROP on every start, because
//! dropping a trigger takes an ACCESS EXCLUSIVE lock on the user's table.

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::ddl;
use crate::dialect::{InstallOptions, Installed};
use crate::error::{Error, Result};
use crate::sql::quote_ident;
use crate::watch::{Capture, ColumnInfo, ResolvedWatch, TableInfo, Tier};

/// Reads one table's columns, primary-key positions and equality support.
pub(crate) async fn describe_table(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<TableInfo> {
    const SQL: &str = "
        SELECT a.attname::text,
               -- int2vector subscripts start at 0 (or wherever array_lower says): 0-based position
               (SELECT pg_catalog.array_position(i.indkey::int2[], a.attnum) - pg_catalog.array_lower(i.indkey::int2[], 1)
                  FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) AS pk_pos,
               EXISTS (SELECT 1 FROM pg_catalog.pg_operator o
                        WHERE o.oprname = '=' AND o.oprleft = a.atttypid AND o.oprright = a.atttypid) AS has_eq
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
         ORDER BY a.attnum";
    let context = || format!("reading the columns of {schema}.{table}");
    let rows = client
        .query_typed(SQL, &[(&schema, Type::TEXT), (&table, Type::TEXT)])
        .await
        .map_err(|e| Error::db(context(), e))?;
    if rows.is_empty() {
        let schema_exists = client
            .query_typed_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
                &[(&schema, Type::TEXT)],
            )
            .await
            .map_err(|e| Error::db(context(), e))?
            .get::<_, bool>(0);
        return Err(if schema_exists {
            Error::UnknownTable {
                schema: schema.to_string(),
                table: table.to_string(),
            }
        } else {
            Error::UnknownSchema {
                schema: schema.to_string(),
            }
        });
    }
    let columns = rows
        .iter()
        .map(|r| ColumnInfo {
            name: r.get(0),
            pk_position: r.get::<_, Option<i32>>(1).map(|p| p as usize),
            has_equality: r.get(2),
        })
        .collect();
    Ok(TableInfo {
        schema: schema.to_string(),
        table: table.to_string(),
        columns,
    })
}

async fn installed_state(
    client: &impl GenericClient,
    w: &ResolvedWatch,
    catalog_exists: bool,
) -> Result<Installed> {
    if !catalog_exists {
        return Ok(Installed::Missing);
    }
    let sql = format!(
        "SELECT c.definition_hash = pg_catalog.md5($2),
                EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                          JOIN pg_catalog.pg_class r ON r.oid = t.tgrelid
                          JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
                         WHERE t.tgname = $1 AND n.nspname = $3 AND r.relname = $4)
           FROM {}.catalog c WHERE c.channel = $1",
        quote_ident(ddl::SCHEMA)
    );
    let channel = &w.channel;
    let row = client
        .query_typed_opt(
            &sql,
            &[
                (&channel.name, Type::TEXT),
                (&ddl::definition(w), Type::TEXT),
                (&channel.schema, Type::TEXT),
                (&channel.table, Type::TEXT),
            ],
        )
        .await
        .map_err(|e| Error::db(format!("reading the catalog entry of {}", channel.name), e))?;
    Ok(match row {
        None => Installed::Missing,
        Some(r) => Installed::Recorded {
            same: r.get(0),
            trigger: r.get(1),
        },
    })
}

/// What both a `Client` and a `Transaction` can do, as far as the catalog code needs.
pub(crate) use tokio_postgres::GenericClient;

async fn catalog_exists(client: &impl GenericClient) -> Result<bool> {
    Ok(client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = 'catalog')",
            &[(&ddl::SCHEMA, Type::TEXT)],
        )
        .await
        .map_err(|e| Error::db("looking for the sqlnotify catalog", e))?
        .get(0))
}

/// Installs (or, with `manage_triggers` off, verifies) `watches`, atomically.
pub(crate) async fn install(
    client: &mut Client,
    watches: &[ResolvedWatch],
    options: InstallOptions,
) -> Result<()> {
    if !options.manage_triggers {
        return verify(client, watches).await;
    }
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::db("starting the install transaction", e))?;
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1)",
        &[&ddl::INSTALL_LOCK],
    )
    .await
    .map_err(|e| Error::db("taking the install lock", e))?;
    tx.batch_execute(&ddl::setup_sql())
        .await
        .map_err(|e| Error::db("creating the sqlnotify schema", e))?;
    if options.cleanup_on_start {
        let removed = drop_all(&tx).await?;
        log::info!("sqlnotify: cleanup_on_start removed {removed} installed watches");
    }
    for w in watches {
        let name = &w.channel.name;
        let Some(action) = installed_state(&tx, w, true).await?.plan(w, options)? else {
            continue;
        };
        log::info!(
            "sqlnotify: {action} {name} on {}.{}",
            w.channel.schema,
            w.channel.table
        );
        let sql = format!(
            "{}{}{}",
            ddl::drop_sql(name),
            ddl::definition(w),
            ddl::catalog_upsert_sql(w)
        );
        tx.batch_execute(&sql)
            .await
            .map_err(|e| Error::db(format!("installing trigger {name}"), e))?;
    }
    tx.commit()
        .await
        .map_err(|e| Error::db("committing the install transaction", e))
}

/// Checks that every watch is installed exactly as generated (for externally managed DDL),
/// and that the journal has this version's columns (an install script of an older version
/// lacks `events`; the listener could not read the journal).
async fn verify(client: &Client, watches: &[ResolvedWatch]) -> Result<()> {
    let exists = catalog_exists(client).await?;
    for w in watches {
        installed_state(client, w, exists).await?.verify(w)?;
    }
    let Some(journaled) = watches.iter().find(|w| w.tier != Tier::Notify) else {
        return Ok(());
    };
    let current = client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                             WHERE attrelid = pg_catalog.to_regclass('sqlnotify.journal')
                               AND attname = 'events' AND NOT attisdropped)",
            &[],
        )
        .await
        .map_err(|e| Error::db("checking the journal's columns", e))?
        .get::<_, bool>(0);
    if current {
        return Ok(());
    }
    Err(Error::DefinitionDrift {
        channel: journaled.channel.name.clone(),
        table: format!("{}.{}", journaled.channel.schema, journaled.channel.table),
        detail: "the table sqlnotify.journal lacks the `events` column this version reads \
                 (it was created by an older install script): apply this version's \
                 install_sql(), which adds it"
            .into(),
    })
}

/// Refuses [`Capture::Statement`] on the notify tier (it has no journal to carry a
/// statement's rows) and where a statement-level trigger cannot see every write:
/// it fires only for the table a statement names, so on a partitioned or inheritance parent
/// it misses writes that name a partition or child, and on a partition or child it misses
/// writes made through the parent. Row triggers have neither problem (PostgreSQL clones them
/// to every partition), so such tables keep [`Capture::Row`].
pub(crate) async fn check_statement_capture(
    client: &Client,
    watches: &[ResolvedWatch],
) -> Result<()> {
    let describe = |w: &ResolvedWatch| {
        format!(
            "{}.{} {}",
            w.channel.schema, w.channel.table, w.channel.operation
        )
    };
    if let Some(w) = watches
        .iter()
        .find(|w| w.capture == Capture::Statement && w.tier == Tier::Notify)
    {
        return Err(Error::InvalidWatch {
            watch: describe(w),
            reason: "Capture::Statement needs a journal tier (Tier::Durable or Tier::Poll); \
                     the notify tier sends one notification per row"
                .into(),
        });
    }
    const SQL: &str = "
        SELECT c.relkind = 'p' OR c.relispartition
               OR EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
                           WHERE i.inhrelid = c.oid OR i.inhparent = c.oid)
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2";
    for w in watches
        .iter()
        .filter(|w| w.capture == Capture::Statement && w.tier != Tier::Notify)
    {
        let (schema, table) = (&w.channel.schema, &w.channel.table);
        let inherited = client
            .query_typed_opt(SQL, &[(schema, Type::TEXT), (table, Type::TEXT)])
            .await
            .map_err(|e| Error::db(format!("checking partitions of {schema}.{table}"), e))?
            .is_some_and(|r| r.get::<_, bool>(0));
        if inherited {
            return Err(Error::InvalidWatch {
                watch: describe(w),
                reason: "Capture::Statement cannot see every write to a partitioned or \
                         inheritance table (a statement-level trigger fires only for the table \
                         a statement names); use Capture::Row, whose trigger PostgreSQL clones \
                         to every partition"
                    .into(),
            });
        }
    }
    Ok(())
}

/// Drops every sqlnotify trigger function (and, by CASCADE, trigger) and empties the catalog.
async fn drop_all(tx: &impl GenericClient) -> Result<u64> {
    let rows = tx
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
               JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1",
            &[&ddl::SCHEMA],
        )
        .await
        .map_err(|e| Error::db("listing sqlnotify functions", e))?;
    let mut sql = String::new();
    for row in &rows {
        let function: String = row.get(0);
        sql.push_str(&format!("DROP FUNCTION IF EXISTS {function} CASCADE;\n"));
    }
    if catalog_exists(tx).await? {
        sql.push_str(&format!(
            "DELETE FROM {}.catalog;\n",
            quote_ident(ddl::SCHEMA)
        ));
    }
    tx.batch_execute(&sql)
        .await
        .map_err(|e| Error::db("removing sqlnotify objects", e))?;
    Ok(rows.len() as u64)
}

/// Removes every sqlnotify object in the database (triggers, functions, catalog entries).
pub(crate) async fn cleanup_all(client: &mut Client) -> Result<u64> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::db("starting the cleanup transaction", e))?;
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1)",
        &[&ddl::INSTALL_LOCK],
    )
    .await
    .map_err(|e| Error::db("taking the install lock", e))?;
    let n = drop_all(&tx).await?;
    tx.commit()
        .await
        .map_err(|e| Error::db("committing the cleanup", e))?;
    Ok(n)
}

/// Removes the objects of `channels` and their catalog entries.
pub(crate) async fn uninstall(client: &mut Client, channels: &[String]) -> Result<()> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::db("starting the uninstall transaction", e))?;
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1)",
        &[&ddl::INSTALL_LOCK],
    )
    .await
    .map_err(|e| Error::db("taking the install lock", e))?;
    let sql: String = channels.iter().map(|c| ddl::drop_sql(c)).collect();
    tx.batch_execute(&sql)
        .await
        .map_err(|e| Error::db(format!("removing triggers {channels:?}"), e))?;
    if catalog_exists(&tx).await? {
        let delete = format!(
            "DELETE FROM {}.catalog WHERE channel = ANY($1)",
            quote_ident(ddl::SCHEMA)
        );
        tx.execute(&delete, &[&channels])
            .await
            .map_err(|e| Error::db("removing catalog entries", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| Error::db("committing the uninstall", e))
}
