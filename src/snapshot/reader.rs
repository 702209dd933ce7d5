//! The dialect boundary of snapshots: a dialect opens a consistent read of a watched table and
//! hands back its rows chunk by chunk, with the [`Fence`] that separates them from the stream.

use futures_util::future::BoxFuture;

use super::fence::Fence;
use crate::error::Result;

/// A consistent read of one table, open until dropped (or read to the end). Dropping it ends
/// the read without reading on — its transaction rolled back, its connection closed — which
/// is how the feeder ends a read nobody will finish (the feed dropped, the notifier stopping),
/// also in the middle of opening it or of a chunk.
pub(crate) trait SnapshotReader: Send {
    /// Where the read was taken: the live events it already reflects.
    fn fence(&self) -> &Fence;
    /// How many rows the read holds (counted in the same read).
    fn total(&self) -> u64;
    /// The next rows in one order for the whole read (the key's, or on MySQL an index's), each
    /// as the JSON text a trigger of the channel would write for it (its key and carried
    /// columns); empty once every row was read, which also ends the read.
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Vec<String>>>;
}
