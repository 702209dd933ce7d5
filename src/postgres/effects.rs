//! Exactly-once effects on PostgreSQL: a transactional handler
//! ([`Notifier::handle_in_transaction`](crate::Notifier::handle_in_transaction)) runs in a
//! transaction that first records its event as done in `sqlnotify.effects` — keyed by
//! handler, journal id and part — and commits the handler's writes with that record. An event
//! delivered again (after a crash, a restart or a failover, before the consumer's position
//! passed it) finds its record and is skipped, so its writes happen once.
//!
//! The record is written first (`ON CONFLICT DO NOTHING`): a second delivery running at the
//! same time waits for the first transaction and then skips. Before `COMMIT` one `SELECT 1`
//! goes in the same round trip, so a transaction the handler left aborted (an error it caught
//! and ignored) is a failure, not a `COMMIT` that silently rolls back. Records whose journal
//! row is purged can no longer come from the journal: they are deleted every `PRUNE_EVERY`
//! events — except those of an event that still has a dead-letter row. A dead letter delivered
//! again long after its journal row was purged commits its record like any event, and its row
//! goes only after that commit; if it does not go (the process died in between, or the delete
//! failed), the next process delivers it again, and only the record makes that a skip.
//!
//! The table is one of sqlnotify's (`ddl::setup_sql`, the install script and its grants), so a
//! role granted only what `install_sql_granting` grants can run a transactional handler; the
//! prune reads the journal's sequence with `pg_sequence_last_value`, which its `USAGE` allows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::PgConfig;

use super::control::Control;
use super::ddl::SCHEMA;
use crate::error::{Error, Result};
use crate::event::ChangeEvent;
use crate::handling::engine::Call;
use crate::handling::{Attempt, HandlerError};
use crate::sql::{quote_ident, quote_literal};

/// Handled events between two deletions of records that can no longer be needed.
const PRUNE_EVERY: u64 = 1_000;

/// The open transaction a transactional handler writes in, on the source database.
///
/// Run your statements on [`client`](Self::client); they commit together with the record that
/// the event is done, once the handler returns `Ok(())`, and roll back if it returns an error
/// (the event is then tried again). Do not run `COMMIT`, `ROLLBACK` or `SAVEPOINT` release
/// statements yourself, and do not keep the transaction past the handler's return: statements
/// run on it later are outside the transaction.
#[derive(Clone)]
pub struct Transaction {
    client: Arc<Client>,
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction").finish_non_exhaustive()
    }
}

impl Transaction {
    /// The connection, inside the transaction.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The table, as errors name it.
const TABLE: &str = "sqlnotify.effects";

/// Creates the record table if missing. Part of `ddl::setup_sql` (under the install lock, at
/// every start, and in the install script, whose grants give a notifier's role what
/// [`TxCall`] needs on it); [`ensure`] runs it too when the table is still missing.
pub(crate) fn setup_sql() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {s}.effects (
    handler text NOT NULL,
    sequence bigint NOT NULL,
    part integer NOT NULL,
    done_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (handler, sequence, part)
);",
        s = quote_ident(SCHEMA)
    )
}

/// What a role needs to run a transactional handler, after `ensure` found the table missing or
/// not usable.
const REMEDY: &str = "apply the install script (install_sql_granting(role), or `sqlnotify \
     install-sql --grant-to ROLE`) as the schema's owner, or start a notifier once with a role \
     allowed to create in schema sqlnotify";

/// Makes sure `sqlnotify.effects` exists and the role may use it. Only a missing table is
/// created: PostgreSQL checks `CREATE` on the schema before `IF NOT EXISTS`, so a role granted
/// what the install script grants (no `CREATE` on the schema) could never run a `CREATE TABLE
/// IF NOT EXISTS` at all. Two processes creating it at once: the loser's duplicate-object error
/// means it exists. A table the role may not read, write and prune is refused here, naming
/// it, rather than at every event.
pub(crate) async fn ensure(config: &PgConfig) -> Result<()> {
    let client = Control::connect(config, "transactional handler").await?;
    let look = |e| Error::db(format!("looking for {TABLE}"), e);
    let table = format!("{}.effects", quote_ident(SCHEMA));
    let exists: bool = client
        .query_typed_one(
            "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
            &[(&table, Type::TEXT)],
        )
        .await
        .map_err(look)?
        .get(0);
    if !exists {
        match client.batch_execute(&setup_sql()).await {
            Ok(()) => {}
            Err(e)
                if e.code() == Some(&SqlState::UNIQUE_VIOLATION)
                    || e.code() == Some(&SqlState::DUPLICATE_TABLE) => {}
            Err(e) => {
                return Err(Error::db(
                    format!(
                        "creating {TABLE} (the record of transactional handlers' events), which \
                         is missing: {REMEDY}"
                    ),
                    e,
                ))
            }
        }
    }
    // A table the role may not use (made by an older version, with no grant for this role):
    // said here once, not at every event.
    let check = format!(
        "DO $sqn$ BEGIN
  IF NOT (pg_catalog.has_table_privilege({t}, 'SELECT')
          AND pg_catalog.has_table_privilege({t}, 'INSERT')
          AND pg_catalog.has_table_privilege({t}, 'DELETE')) THEN
    RAISE EXCEPTION 'permission denied for table {TABLE}: a transactional handler needs SELECT, INSERT and DELETE on it'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
END $sqn$",
        t = quote_literal(&table)
    );
    client
        .batch_execute(&check)
        .await
        .map_err(|e| Error::db(format!("checking {TABLE}: {REMEDY}"), e))?;
    Ok(())
}

/// A transactional handler as the handler loop calls it.
pub(crate) struct TxCall<F> {
    pub handler: std::rc::Rc<F>,
    pub name: String,
    pub config: PgConfig,
    /// Idle connections (at most one per key in flight is ever open).
    pub idle: Arc<Mutex<Vec<Arc<Client>>>>,
    /// Events handled since the start, for pruning.
    pub handled: Arc<AtomicU64>,
    /// Events found done already (delivered again after their transaction committed).
    pub skipped: Arc<AtomicU64>,
}

impl<F> TxCall<F> {
    pub fn new(handler: F, name: String, config: PgConfig, skipped: Arc<AtomicU64>) -> Self {
        TxCall {
            handler: std::rc::Rc::new(handler),
            name,
            config,
            idle: Arc::default(),
            handled: Arc::default(),
            skipped,
        }
    }
}

/// Why one attempt failed, as the handler loop records it.
fn failed(what: &str, e: tokio_postgres::Error) -> HandlerError {
    format!("{what}: {}", crate::error::chain(&e)).into()
}

/// One attempt in a transaction of its own: `Ok(true)` handled and committed, `Ok(false)`
/// done before (skipped). `clean` is set when the connection ended with no transaction open,
/// so it may be used again.
async fn run_once<Fut>(
    client: &Arc<Client>,
    name: &str,
    event: &ChangeEvent,
    sequence: i64,
    clean: &mut bool,
    run: impl FnOnce(Transaction) -> Fut,
) -> std::result::Result<bool, HandlerError>
where
    Fut: std::future::Future<Output = std::result::Result<(), HandlerError>>,
{
    let s = quote_ident(SCHEMA);
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| failed("BEGIN", e))?;
    let fresh = client
        .execute_typed(
            &format!(
                "INSERT INTO {s}.effects (handler, sequence, part) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING"
            ),
            &[
                (&name, Type::TEXT),
                (&sequence, Type::INT8),
                (&(event.part() as i32), Type::INT4),
            ],
        )
        .await;
    let fresh = match fresh {
        Ok(n) => n == 1,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(failed("recording the event in sqlnotify.effects", e));
        }
    };
    if !fresh {
        client
            .batch_execute("ROLLBACK")
            .await
            .map_err(|e| failed("ROLLBACK", e))?;
        *clean = true;
        return Ok(false);
    }
    let result = run(Transaction {
        client: client.clone(),
    })
    .await;
    if let Err(error) = result {
        // The handler's error is what the dead letter should say, whatever the ROLLBACK does.
        match client.batch_execute("ROLLBACK").await {
            Ok(()) => *clean = true,
            Err(e) => {
                return Err(format!(
                    "{error} (and the ROLLBACK after it failed: {})",
                    crate::error::chain(&e)
                )
                .into())
            }
        }
        return Err(error);
    }
    if let Err(e) = client.batch_execute("SELECT 1; COMMIT").await {
        *clean = client.batch_execute("ROLLBACK").await.is_ok();
        return Err(failed(
            "committing (the handler's transaction was aborted by an error it did not return?)",
            e,
        ));
    }
    *clean = true;
    Ok(true)
}

impl<F> TxCall<F> {
    async fn connection(
        idle: &Mutex<Vec<Arc<Client>>>,
        config: &PgConfig,
    ) -> std::result::Result<Arc<Client>, HandlerError> {
        while let Some(client) = idle.lock().await.pop() {
            if !client.is_closed() {
                return Ok(client);
            }
        }
        Ok(Arc::new(
            Control::connect(config, "transactional handler").await?,
        ))
    }

    /// Deletes the records of events whose journal rows are purged and that have no dead-letter
    /// row: neither the journal nor a retry can deliver them again. A record whose event has a
    /// dead-letter row stays (see the module docs). Failures only cost a later try.
    async fn prune(client: &Client, name: &str) {
        let s = quote_ident(SCHEMA);
        let sql = format!(
            "DELETE FROM {s}.effects e WHERE e.handler = $1 AND e.sequence < \
             coalesce((SELECT min(id) FROM {s}.journal), \
                      pg_catalog.pg_sequence_last_value('{s}.journal_id_seq'::regclass)) \
             AND NOT EXISTS (SELECT 1 FROM {s}.dead_letters d WHERE d.handler = e.handler \
                              AND d.sequence = e.sequence AND d.part = e.part)"
        );
        if let Err(e) = client.execute_typed(&sql, &[(&name, Type::TEXT)]).await {
            log::debug!("sqlnotify: handler {name:?} could not prune sqlnotify.effects: {e}");
        }
    }
}

impl<F, Fut> Call for TxCall<F>
where
    F: Fn(ChangeEvent, Transaction) -> Fut + 'static,
    Fut: std::future::Future<Output = std::result::Result<(), HandlerError>> + 'static,
{
    fn call(
        &self,
        attempt: Attempt,
    ) -> LocalBoxFuture<'static, Option<std::result::Result<(), HandlerError>>> {
        let handler = self.handler.clone();
        let name = self.name.clone();
        let config = self.config.clone();
        let idle = self.idle.clone();
        let handled = self.handled.clone();
        let skipped = self.skipped.clone();
        Box::pin(async move {
            let event = attempt.event;
            let Some(sequence) = event.sequence() else {
                return Some(Err(format!(
                    "{}.{}: a transactional handler needs journal events (durable or poll \
                     tier)",
                    event.schema(),
                    event.table()
                )
                .into()));
            };
            let client = match Self::connection(&idle, &config).await {
                Ok(client) => client,
                Err(e) => return Some(Err(e)),
            };
            let mut clean = false;
            let outcome = run_once(&client, &name, &event, sequence, &mut clean, |tx| {
                handler(event.clone(), tx)
            })
            .await;
            match outcome {
                Ok(true) => {
                    if handled
                        .fetch_add(1, Ordering::Relaxed)
                        .is_multiple_of(PRUNE_EVERY)
                    {
                        Self::prune(&client, &name).await;
                    }
                }
                Ok(false) => {
                    skipped.fetch_add(1, Ordering::Relaxed);
                    log::debug!(
                        "sqlnotify: handler {name:?} skipped {}.{} key {} (journal id \
                         {sequence}): its transaction committed before",
                        event.schema(),
                        event.table(),
                        event.id()
                    );
                }
                Err(_) => {}
            }
            // A connection whose transaction could not be ended is not reused.
            if clean && !client.is_closed() {
                idle.lock().await.push(client);
            }
            Some(outcome.map(|_| ()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_table_is_keyed_by_handler_sequence_and_part() {
        let sql = setup_sql();
        assert!(sql.contains("\"sqlnotify\".effects ("), "{sql}");
        assert!(
            sql.contains("PRIMARY KEY (handler, sequence, part)"),
            "{sql}"
        );
    }
}
