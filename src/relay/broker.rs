//! The narrow boundary between the relay and a message broker: open a link (connect, check
//! or create the destination), send messages pipelined, learn when the link is lost. NATS
//! JetStream (`src/relay/nats.rs`) is the one broker built; another (Redis Streams, Kafka)
//! would implement these two traits.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::error::Result;

/// One message to publish.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub subject: String,
    /// The broker deduplicates on it: the same for the same change, whoever sends it.
    pub id: String,
    /// Metadata headers (name, value).
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

impl Outgoing {
    /// Its size on the wire, headers included (NATS counts both against its limits): the
    /// body, each header as `name: value` and its line break, the id's header, and the
    /// header block's version line and end.
    pub fn size(&self) -> usize {
        const ID_HEADER: &str = "Nats-Msg-Id";
        let line = |name: &str, value: &str| name.len() + 2 + value.len() + 2;
        "NATS/1.0\r\n\r\n".len()
            + line(ID_HEADER, &self.id)
            + (self.headers.iter())
                .map(|(name, value)| line(name, value))
                .sum::<usize>()
            + self.body.len()
    }
}

/// The broker stored a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored {
    /// It was stored before (same id within the broker's duplicate window): not stored again.
    pub duplicate: bool,
}

/// Resolves once the broker confirms (or refuses) storing one sent message.
pub(crate) type Confirmation = Pin<Box<dyn Future<Output = Result<Stored>> + Send>>;

/// A broker the relay can open links to.
pub(crate) trait Broker {
    /// One connection.
    type Link: Link;

    /// Connects, and checks (or creates) where messages go.
    fn open(&self) -> impl Future<Output = Result<Self::Link>>;
}

/// One connection to a broker. Messages sent on one link are stored in the order sent; once
/// it is lost nothing more is sent on it (no silent reconnect that could reorder).
pub(crate) trait Link {
    /// Sends `message` without waiting for the broker to store it; the confirmation does.
    fn send(&mut self, message: &Outgoing) -> impl Future<Output = Result<Confirmation>>;

    /// Resolves once the connection is lost (owns what it needs, so a send can be raced
    /// against it).
    fn lost(&self) -> impl Future<Output = ()> + 'static;

    /// The largest message ([`Outgoing::size`]) the broker stores on this link: a larger one
    /// it would refuse every time it is sent.
    fn max_size(&self) -> usize;
}
