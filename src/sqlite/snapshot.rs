//! Snapshots on SQLite: one read transaction on a connection of its own, on a thread of its
//! own, that reads the journal's head (the fence: journal ids are in commit order; the head
//! is the highest id ever given, [`HEAD_SQL`], not the highest one the purge left) and then
//! the table's rows in key order. The database is in WAL mode, so the open read never blocks
//! a writer (it only keeps a checkpoint from going past it until it ends).

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::catalog::db_err;
use super::ddl::json_expr;
use crate::error::{Error, Result};
use crate::event::Channel;
use crate::snapshot::fence::Fence;
use crate::snapshot::reader::SnapshotReader;
use crate::sql::quote_ident;

/// An open snapshot: chunks come from the reading thread.
pub(crate) struct SqliteSnapshot {
    fence: Fence,
    total: u64,
    chunks: mpsc::Receiver<Result<Vec<String>>>,
}

/// The fence's head: the highest journal id ever given, by a transaction that committed
/// before the read — the journal's AUTOINCREMENT sequence, read in the read's transaction.
/// Not the highest id left (`max(id)`): the retention purge may have deleted the newest rows,
/// or all of them, while the changes they carried were still on their way to the feed (read
/// by a listener, waiting for room in the pipeline); the read reflects those changes, and a
/// head below their ids would pass them on again after the rows. Every id above the sequence
/// is given to a transaction that commits after the read. (`max(id)` too, in case the
/// sequence's row was edited or removed by hand: the head is never lower than the newest
/// row's id.)
const HEAD_SQL: &str = "SELECT max(
        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'sqlnotify_journal'), 0),
        coalesce((SELECT max(id) FROM sqlnotify_journal), 0))";

/// `SELECT` of `channel`'s payloads (the JSON its triggers write) in key order.
fn rows_sql(channel: &Channel) -> String {
    let keys: Vec<String> = channel
        .key_columns()
        .iter()
        .map(|k| format!("_sqn_r.{}", quote_ident(k)))
        .collect();
    format!(
        "SELECT {} FROM {} AS _sqn_r ORDER BY {}",
        json_expr("_sqn_r", &channel.payload_columns()),
        quote_ident(channel.table()),
        keys.join(", ")
    )
}

/// The thread's side: opens the read, reports the fence and count, then sends chunks (an
/// empty one at the end) while the feed wants them.
fn read(
    path: PathBuf,
    channel: Arc<Channel>,
    chunk_rows: usize,
    opened: oneshot::Sender<Result<(Fence, u64)>>,
    chunks: mpsc::Sender<Result<Vec<String>>>,
) {
    let what = format!("reading a snapshot of {}", channel.table());
    let open = || -> Result<(Connection, Fence, u64)> {
        let conn = super::open(&path)?;
        conn.execute_batch("BEGIN").map_err(db_err(what.clone()))?;
        // The first read starts the transaction's view: the journal head and every row
        // read afterwards belong to it.
        let head: i64 = conn
            .query_row(HEAD_SQL, [], |r| r.get(0))
            .map_err(db_err(what.clone()))?;
        let total: i64 = conn
            .query_row(
                &format!("SELECT count(*) FROM {}", quote_ident(channel.table())),
                [],
                |r| r.get(0),
            )
            .map_err(db_err(what.clone()))?;
        Ok((conn, Fence::Journal { head }, total.max(0) as u64))
    };
    let conn = match open() {
        Ok((conn, fence, total)) => {
            if opened.send(Ok((fence, total))).is_err() {
                return;
            }
            conn
        }
        Err(e) => {
            let _ = opened.send(Err(e));
            return;
        }
    };
    let result = (|| -> Result<()> {
        let mut stmt = conn
            .prepare(&rows_sql(&channel))
            .map_err(db_err(what.clone()))?;
        let mut rows = stmt.query([]).map_err(db_err(what.clone()))?;
        let mut chunk = Vec::with_capacity(chunk_rows);
        while let Some(row) = rows.next().map_err(db_err(what.clone()))? {
            // Lossily, as the journal is read: one row of text that is not UTF-8 must not
            // fail every snapshot of its table.
            chunk.push(super::journal::lossy_text(row, 0, &what)?);
            if chunk.len() == chunk_rows
                && chunks
                    .blocking_send(Ok(std::mem::take(&mut chunk)))
                    .is_err()
            {
                return Ok(()); // the feed is gone
            }
        }
        if !chunk.is_empty() && chunks.blocking_send(Ok(chunk)).is_err() {
            return Ok(());
        }
        let _ = chunks.blocking_send(Ok(Vec::new()));
        Ok(())
    })();
    if let Err(e) = result {
        let _ = chunks.blocking_send(Err(e));
    }
    let _ = conn.execute_batch("COMMIT");
}

impl SqliteSnapshot {
    /// Starts the reading thread and waits for the read to be open.
    pub async fn open(path: PathBuf, channel: Arc<Channel>, chunk_rows: usize) -> Result<Self> {
        let (opened_tx, opened) = oneshot::channel();
        let (tx, chunks) = mpsc::channel(1);
        std::thread::Builder::new()
            .name("sqlnotify-snapshot".into())
            .spawn(move || read(path, channel, chunk_rows, opened_tx, tx))
            .map_err(|e| Error::db("starting the snapshot thread", e))?;
        let (fence, total) = opened
            .await
            .map_err(|e| Error::db("opening a snapshot", e))??;
        Ok(SqliteSnapshot {
            fence,
            total,
            chunks,
        })
    }
}

impl SnapshotReader for SqliteSnapshot {
    fn fence(&self) -> &Fence {
        &self.fence
    }

    fn total(&self) -> u64 {
        self.total
    }

    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Vec<String>>> {
        // The thread ends its read with an empty chunk (or an error), and no chunk is asked
        // for after that: a channel closed before it means the thread died (a panic), and
        // the rows sent so far are not the whole table.
        Box::pin(async move {
            self.chunks.recv().await.unwrap_or_else(|| {
                Err(Error::db(
                    "reading a snapshot",
                    std::io::Error::other("the snapshot thread ended before the read's end"),
                ))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot's fence is the highest journal id ever given, also when the retention purge
    /// deleted the newest rows (or all of them) before the read: their changes may still be on
    /// their way to a feed, and the read reflects them.
    #[actix_rt::test]
    async fn the_fence_is_the_highest_id_given_also_after_a_purge() {
        let dir = std::env::temp_dir().join(format!(
            "sqlnotify-snapshot-fence-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&super::super::ddl::setup_sql()).unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .unwrap();
        let channel = crate::event::test_channel(crate::tier::Tier::Durable);
        let fence = || async {
            let snapshot = SqliteSnapshot::open(path.clone(), channel.clone(), 10)
                .await
                .unwrap();
            snapshot.fence().clone()
        };
        assert_eq!(fence().await, Fence::Journal { head: 0 }, "nothing written");
        for _ in 0..3 {
            super::super::journal::append(&conn, "c", "{}").unwrap();
        }
        assert_eq!(fence().await, Fence::Journal { head: 3 });
        conn.execute_batch("DELETE FROM sqlnotify_journal WHERE id = 3")
            .unwrap();
        assert_eq!(
            fence().await,
            Fence::Journal { head: 3 },
            "the newest purged"
        );
        conn.execute_batch("DELETE FROM sqlnotify_journal").unwrap();
        assert_eq!(
            fence().await,
            Fence::Journal { head: 3 },
            "every row purged"
        );
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[actix_rt::test]
    async fn a_thread_gone_before_the_reads_end_is_an_error_not_the_end() {
        let (tx, chunks) = mpsc::channel(2);
        let mut snapshot = SqliteSnapshot {
            fence: Fence::Journal { head: 0 },
            total: 2,
            chunks,
        };
        tx.send(Ok(vec!["{\"id\": 1}".to_string()])).await.unwrap();
        drop(tx);
        assert_eq!(snapshot.next_chunk().await.unwrap().len(), 1);
        let e = snapshot.next_chunk().await.unwrap_err();
        assert!(e.to_string().contains("ended before"), "{e}");
    }
}
