//! [`OverflowStore`]: the decoder's view of the rows a payload can stand in for — PostgreSQL's
//! overflow table (a notification too large for NOTIFY carries a reference to its row) — and
//! the retention purge of delivered data. Each dialect implements it; the decoder knows only
//! this trait, so it runs without a database.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::error::{caught, Result};

/// Reads (and expires) rows of the overflow table.
pub(crate) trait OverflowStore: Send + Sync + 'static {
    /// The payload stored under `reference` for `channel`, or `None` if there is none: a
    /// reference resolves only the row written for the channel it arrived on. By default there
    /// is none — a dialect whose payloads are never references (journal rows have no size
    /// limit) keeps it.
    fn fetch(
        &self,
        _channel: String,
        _reference: String,
    ) -> BoxFuture<'static, Result<Option<String>>> {
        Box::pin(async { Ok(None) })
    }
    /// Deletes overflow rows older than `retention`; returns how many.
    fn purge(&self, retention: Duration) -> BoxFuture<'static, Result<u64>>;
}

/// `store`, with a panic in a call turned into that call's error: a driver's panic on a row
/// it cannot convert would otherwise end the decoder (and every event after it) or the
/// retention purge, silently.
pub(crate) fn guarded(store: Arc<dyn OverflowStore>) -> Arc<dyn OverflowStore> {
    Arc::new(Guarded(store))
}

struct Guarded(Arc<dyn OverflowStore>);

impl OverflowStore for Guarded {
    fn fetch(
        &self,
        channel: String,
        reference: String,
    ) -> BoxFuture<'static, Result<Option<String>>> {
        let store = self.0.clone();
        Box::pin(caught(
            || "reading an overflow row".to_string(),
            async move { store.fetch(channel, reference).await },
        ))
    }

    fn purge(&self, retention: Duration) -> BoxFuture<'static, Result<u64>> {
        let store = self.0.clone();
        Box::pin(caught(|| "deleting expired rows".to_string(), async move {
            store.purge(retention).await
        }))
    }
}
