//! Snapshots on PostgreSQL: a `REPEATABLE READ` read-only transaction on a connection of its
//! own, whose snapshot (`pg_current_snapshot()`) is the fence, read through a cursor in key
//! order.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio_postgres::{Client, Config};

use super::control::Control;
use super::ddl::json_expr;
use crate::error::{Error, Result};
use crate::event::Channel;
use crate::snapshot::fence::Fence;
use crate::snapshot::reader::SnapshotReader;
use crate::sql::quote_ident;

/// An open snapshot of one table.
pub(crate) struct PgSnapshot {
    client: Client,
    fence: Fence,
    total: u64,
    fetch: String,
    what: String,
    done: bool,
}

/// `SELECT` of `channel`'s payloads (the JSON its triggers write) from its table, in key order.
pub(crate) fn rows_sql(channel: &Channel) -> String {
    let columns = channel.payload_columns();
    let keys: Vec<String> = channel
        .key_columns()
        .iter()
        .map(|k| format!("_sqn_r.{}", quote_ident(k)))
        .collect();
    format!(
        "SELECT {} FROM {}.{} AS _sqn_r ORDER BY {}",
        json_expr("_sqn_r", &columns),
        quote_ident(channel.schema()),
        quote_ident(channel.table()),
        keys.join(", ")
    )
}

impl PgSnapshot {
    /// Opens the read: the transaction, its snapshot, the row count and the cursor.
    pub async fn open(config: &Config, channel: Arc<Channel>, chunk_rows: usize) -> Result<Self> {
        let what = format!(
            "reading a snapshot of {}.{}",
            channel.schema(),
            channel.table()
        );
        let client = Control::connect(config, "snapshot").await?;
        let table = format!(
            "{}.{}",
            quote_ident(channel.schema()),
            quote_ident(channel.table())
        );
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| Error::db(what.clone(), e))?;
        // The first statement takes the transaction's snapshot: the count and every row read
        // afterwards see exactly what it says.
        let row = client
            .query_one(
                &format!(
                    "SELECT pg_catalog.pg_current_snapshot()::text, (SELECT pg_catalog.count(*) FROM {table})"
                ),
                &[],
            )
            .await
            .map_err(|e| Error::db(what.clone(), e))?;
        let text: String = row.get(0);
        let fence = Fence::parse_postgres(&text).ok_or_else(|| Error::InvalidPayload {
            channel: channel.name().to_string(),
            reason: format!("unexpected snapshot {text:?}"),
        })?;
        let total = row.get::<_, i64>(1).max(0) as u64;
        client
            .batch_execute(&format!(
                "DECLARE _sqn_snapshot NO SCROLL CURSOR FOR {}",
                rows_sql(&channel)
            ))
            .await
            .map_err(|e| Error::db(what.clone(), e))?;
        Ok(PgSnapshot {
            client,
            fence,
            total,
            fetch: format!("FETCH {chunk_rows} FROM _sqn_snapshot"),
            what,
            done: false,
        })
    }
}

impl SnapshotReader for PgSnapshot {
    fn fence(&self) -> &Fence {
        &self.fence
    }

    fn total(&self) -> u64 {
        self.total
    }

    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            if self.done {
                return Ok(Vec::new());
            }
            let rows = self
                .client
                .query(&self.fetch, &[])
                .await
                .map_err(|e| Error::db(self.what.clone(), e))?;
            if rows.is_empty() {
                self.done = true;
                self.client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(|e| Error::db(self.what.clone(), e))?;
            }
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operation::Operation;
    use crate::tier::Tier;

    #[test]
    fn rows_come_as_payloads_in_key_order() {
        let channel = Channel {
            name: "c".into(),
            schema: "Shop".into(),
            table: "order\"s".into(),
            operation: Operation::Insert,
            label: None,
            key_columns: vec!["b".into(), "a".into()],
            extra_columns: vec!["note".into()],
            tier: Tier::Durable,
            signed: false,
        };
        assert_eq!(
            rows_sql(&channel),
            "SELECT pg_catalog.json_build_object('b', _sqn_r.\"b\", 'a', _sqn_r.\"a\", 'note', _sqn_r.\"note\")::text \
             FROM \"Shop\".\"order\"\"s\" AS _sqn_r ORDER BY _sqn_r.\"b\", _sqn_r.\"a\""
        );
    }
}
