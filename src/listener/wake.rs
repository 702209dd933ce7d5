//! Wake-ups: what cuts a source's wait short — the notifier's own writes on the polling
//! dialects, a durable channel's notification on PostgreSQL.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{select, BoxFuture, Either};
use tokio::sync::Notify;

use crate::error::Result;

/// A wake-up signal. Cheap to clone; a wake-up with nobody waiting is kept for the next wait.
#[derive(Clone, Default)]
pub(crate) struct Wake(Arc<Notify>);

impl Wake {
    /// Wakes the waiter (now, or at its next wait).
    pub fn wake(&self) {
        self.0.notify_one();
    }

    /// Waits at most `timeout`; true when woken.
    pub async fn wait(&self, timeout: Duration) -> bool {
        let sleep = pin!(tokio::time::sleep(timeout));
        let woken = pin!(self.0.notified());
        matches!(select(sleep, woken).await, Either::Right(_))
    }

    /// `write` (the notifier's own write to the journal), then a wake-up, so the listener
    /// reads it at once instead of at its next poll.
    #[cfg_attr(not(any(feature = "sqlite", feature = "mysql")), allow(dead_code))]
    pub fn after<T>(
        &self,
        write: impl Future<Output = Result<T>> + Send + 'static,
    ) -> BoxFuture<'static, Result<()>> {
        let wake = self.clone();
        Box::pin(async move {
            write.await?;
            wake.wake();
            Ok(())
        })
    }
}
