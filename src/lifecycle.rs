//! The messages every pipeline actor answers alike: [`Flush`] and [`Shutdown`].
//!
//! They live here rather than next to one actor because several handle them: the decoder, the
//! registry and closure subscribers answer `Flush` (a flush travels down the pipeline — the
//! decoder waits for the registry, the registry for its closure subscribers), and the decoder
//! and the registry answer `Shutdown`.

use actix::Message;

/// Resolves once every message sent before it has been handled (for the decoder and the
/// registry: routed and handed over).
pub(crate) struct Flush;

impl Message for Flush {
    type Result = ();
}

/// Stops the actor (after what is already in its mailbox).
pub(crate) struct Shutdown;

impl Message for Shutdown {
    type Result = ();
}
