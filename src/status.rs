//! Pipeline status messages: what happened to the connection and to delivery, for
//! subscribers that want to know (cache invalidators must flush on a [`Status::Gap`]).

use std::time::SystemTime;

use crate::subscription::SubscriptionId;

/// Something subscribers may need to react to. Subscribe with
/// [`Notifier::subscribe_status`](crate::Notifier::subscribe_status).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// The listener is connected and listening (after start, and after every reconnect).
    Connected,
    /// The listener lost its connection; it reconnects on its own, with backoff.
    Disconnected {
        /// Why.
        error: String,
    },
    /// The listener stopped for good after an error it cannot recover from, and reads
    /// nothing more: a [`Tier::Logical`](crate::Tier::Logical) replication slot the server
    /// invalidated ([`Error::SlotLost`](crate::Error::SlotLost)) — the changes it had not read
    /// are gone, so reconnecting would only fail again — or a panic in the listener's own
    /// code (a bug; a panic in a driver's call only fails the session, which reconnects),
    /// which took its reading position with it. Sent once;
    /// [`Stats::failed`](crate::Stats::failed) is set and
    /// [`Notifier::failure`](crate::Notifier::failure) gives the error. Stop the notifier (and,
    /// for a lost slot, drop the consumer before starting again).
    Failed {
        /// Why.
        error: String,
    },
    /// After a reconnect, the listener read a journal again: `replayed` events came with its
    /// first read. (A read is bounded, so a longer backlog goes on in the reads after it.)
    Resynced {
        /// Events the first read after the reconnect handed over.
        replayed: u64,
    },
    /// Events on these channels may have been lost: while the listener was disconnected
    /// (NOTIFY is fire-and-forget), or — for a named consumer that comes back after it was
    /// dropped or expired — journal rows it had not read were purged meanwhile (it gets this
    /// before any event; subscribe with
    /// [`NotifierBuilder::subscribe_status`](crate::NotifierBuilder::subscribe_status) to see
    /// it). Treat cached state derived from them as stale.
    Gap {
        /// The channels concerned.
        channels: Vec<String>,
    },
    /// A subscriber lost events: its buffer was full and its policy dropped them, or they
    /// were still waiting when it went away or was unsubscribed. Coalesced: at most one notice
    /// per subscription per [`lag_report_interval`](crate::NotifierBuilder::lag_report_interval)
    /// (default 1 s) — the first drop is reported at once, later ones added up and reported
    /// when the interval has passed, and what is left when the subscription ends or the
    /// notifier stops is reported then. The counts add up to [`Stats::dropped`](crate::Stats::dropped).
    Lagged {
        /// The subscription that lost events.
        subscription: SubscriptionId,
        /// How many events it lost since its last `Lagged` notice.
        dropped: u64,
    },
    /// This notifier holds its named consumer's lease: of all the processes running that
    /// consumer (a consumer group), it is the one that reads and delivers. Sent when it takes
    /// the lease — at start, or when it takes over from an active process that died.
    Active,
    /// Another process holds the lease of this notifier's named consumer: this one delivers
    /// nothing and stands by, ready to take over when the active one dies.
    Standby,
    /// This notifier held the lease and lost it (its connection to the database was lost
    /// and another process took over meanwhile): it stopped reading and stands by, its
    /// position and its acknowledged subscriptions' holds forgotten. Events it had read and
    /// not yet handed over still reach its subscribers — a relay drops them instead
    /// (`RelayStats::fenced`, feature `nats`) — and every event after the new
    /// active process's last saved position is delivered again by that process.
    LostLease,
}

/// A [`Status`] with the time it was observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusEvent {
    /// What happened.
    pub status: Status,
    /// When sqlnotify noticed.
    pub at: SystemTime,
}

impl StatusEvent {
    pub(crate) fn now(status: Status) -> Self {
        StatusEvent {
            status,
            at: SystemTime::now(),
        }
    }
}

impl actix::Message for StatusEvent {
    type Result = ();
}
