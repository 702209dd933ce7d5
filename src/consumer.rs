//! Named consumers as the database records them: what [`Notifier::consumers`] lists
//! ([`ConsumerInfo`]) and their lifecycle ([`ConsumerState`]). The backlog a running consumer
//! counts ([`Stats::backlog`]) is `backlog.rs`'s.
//!
//! The contract, the same on every dialect (each dialect's `consumers.rs` implements it):
//!
//! * A named consumer is **registered** in the database when it starts: its position is
//!   placed and saved before `start()` returns, together with the channels it reads.
//! * The purge (run by every notifier on the database, whatever its own retention) deletes a
//!   journal row only when it is older than the retention **and** no registered consumer
//!   reading its channel is still before it. How long ago a consumer was last active does not
//!   matter — unless that consumer asked for an expiry.
//! * A consumer leaves on purpose: [`Notifier::drop_consumer`] (or the CLI) marks it
//!   `dropped`, or the purge marks it `expired` once it has been away longer than its own
//!   [`consumer_expiry`](crate::NotifierBuilder::consumer_expiry). Either way its row stays
//!   (a few bytes): when the purge then deletes rows it had not read, it records the channels
//!   on that row, and a consumer of that name that starts again resumes from its old position
//!   and receives [`Status::Gap`] naming them before any event — never silence.
//!
//! [`Notifier::consumers`]: crate::Notifier::consumers
//! [`Notifier::drop_consumer`]: crate::Notifier::drop_consumer
//! [`Stats::backlog`]: crate::Stats::backlog
//! [`Status::Gap`]: crate::Status::Gap

use std::fmt;
use std::time::{Duration, SystemTime};

/// Where a registered consumer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConsumerState {
    /// Registered: the journal keeps every row it has not read.
    Active,
    /// Dropped on purpose ([`Notifier::drop_consumer`](crate::Notifier::drop_consumer)): it
    /// protects nothing; if it starts again it resumes, told of what was purged meanwhile.
    Dropped,
    /// Away longer than its expiry: as `Dropped`, but done by the purge.
    Expired,
}

impl ConsumerState {
    /// `"active"`, `"dropped"` or `"expired"`: how the state is stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerState::Active => "active",
            ConsumerState::Dropped => "dropped",
            ConsumerState::Expired => "expired",
        }
    }

    /// Reads a stored state. Anything unknown counts as active: a row sqlnotify cannot read
    /// keeps protecting the journal rather than letting it be purged.
    pub(crate) fn parse(stored: &str) -> Self {
        match stored {
            "dropped" => ConsumerState::Dropped,
            "expired" => ConsumerState::Expired,
            _ => ConsumerState::Active,
        }
    }
}

impl fmt::Display for ConsumerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A consumer's saved position in the journal: every row before it has been handed to its
/// subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConsumerPosition {
    /// PostgreSQL: a transaction-id horizon (`xid8`): every older transaction had finished
    /// and was read. The consumer saves with it the snapshot of its last journal read, and a
    /// restart replays the rows of the transactions that snapshot did not see.
    Horizon(u64),
    /// SQLite, MySQL / MariaDB: the journal id up to which every row was read.
    JournalId(i64),
    /// PostgreSQL's logical tier: the replication slot's confirmed position (an LSN; changes
    /// of transactions committed after it are read on restart) and how many bytes of WAL the
    /// server keeps for the slot past it (its lag).
    Slot {
        /// `confirmed_flush_lsn`.
        confirmed: u64,
        /// `pg_current_wal_lsn() - confirmed_flush_lsn`, in bytes.
        lag_bytes: u64,
    },
}

impl fmt::Display for ConsumerPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsumerPosition::Horizon(xid) => write!(f, "xid {xid}"),
            ConsumerPosition::JournalId(id) => write!(f, "id {id}"),
            ConsumerPosition::Slot {
                confirmed,
                lag_bytes,
            } => write!(
                f,
                "lsn {:X}/{:X}, lag {lag_bytes} B",
                confirmed >> 32,
                confirmed & 0xffff_ffff
            ),
        }
    }
}

/// A named consumer registered in the database, as [`Notifier::consumers`] lists it.
///
/// [`Notifier::consumers`]: crate::Notifier::consumers
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerInfo {
    /// The name given to [`NotifierBuilder::consumer`](crate::NotifierBuilder::consumer).
    pub name: String,
    /// Registered, dropped or expired.
    pub state: ConsumerState,
    /// Its saved position.
    pub position: ConsumerPosition,
    /// Journal rows on its channels after its position: what a restart would deliver (and,
    /// while it is active, what the purge keeps for it). On PostgreSQL, a position an older
    /// sqlnotify saved without a snapshot counts the rows it had delivered above its horizon
    /// too when they were more than 1,000: a restart would deliver them again.
    pub backlog: u64,
    /// When it last saved its position or said it was alive (every 10 s while running, more
    /// often with a short expiry).
    pub last_active: SystemTime,
    /// The journal channels it reads; `None` for a consumer registered by an older sqlnotify
    /// (it protects every channel).
    pub channels: Option<Vec<String>>,
    /// Its expiry, if it asked for one.
    pub expire_after: Option<Duration>,
}

/// A running named consumer's backlog, as counted every few seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Backlog {
    /// Journal rows on its channels at or after its saved position.
    pub rows: u64,
    /// How long ago the oldest of them was written, by the database's clock (`None`: no
    /// row, or a clock running behind the row's time).
    pub oldest_age: Option<Duration>,
}

impl Backlog {
    /// `rows`, and the oldest one's age in seconds as the database computed it.
    pub fn new(rows: i64, oldest_age_secs: Option<f64>) -> Self {
        Backlog {
            rows: rows.max(0) as u64,
            oldest_age: oldest_age_secs.and_then(|s| Duration::try_from_secs_f64(s).ok()),
        }
    }
}

/// What a listener needs to know about its named consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConsumerParams {
    /// The consumer's name.
    pub name: String,
    /// Expire it when away longer than this (`None`: never).
    pub expire_after: Option<Duration>,
}

/// How often a running consumer says it is alive without an expiry.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// Shortest consumer expiry: the heartbeat runs at a quarter of it.
pub(crate) const MIN_EXPIRY: Duration = Duration::from_secs(1);

impl ConsumerParams {
    /// How often the listener refreshes the consumer's last activity while idle: well within
    /// its expiry, so a running consumer never expires.
    pub fn heartbeat(&self) -> Duration {
        match self.expire_after {
            Some(expiry) => (expiry / 4).min(HEARTBEAT_EVERY),
            None => HEARTBEAT_EVERY,
        }
    }
}

/// Channels recorded as missed, read from the database: `None` (nothing missed) stays
/// `None`; a value that is not a list of channel names counts as "every channel".
#[cfg_attr(not(any(feature = "sqlite", feature = "mysql")), allow(dead_code))]
pub(crate) fn missed_channels(stored: Option<&str>, channels: &[String]) -> Vec<String> {
    let Some(stored) = stored else {
        return Vec::new();
    };
    match serde_json::from_str::<Vec<String>>(stored) {
        Ok(mut missed) => {
            missed.sort();
            missed.dedup();
            missed
        }
        Err(_) => channels.to_vec(),
    }
}

/// A channel list read from the database (JSON): `None` when absent or unreadable, which
/// means "every channel" (the safe reading: it protects more, never less).
#[cfg_attr(not(any(feature = "sqlite", feature = "mysql")), allow(dead_code))]
pub(crate) fn stored_channels(stored: Option<&str>) -> Option<Vec<String>> {
    serde_json::from_str::<Vec<String>>(stored?).ok()
}

/// What a non-active consumer has `missed` once rows it had not read are deleted on
/// `unread` channels: `None` when that adds nothing, else the new sorted list. Only channels
/// it reads count (`channels`; `None`: all).
pub(crate) fn add_missed<'a>(
    missed: &[String],
    channels: Option<&[String]>,
    unread: impl IntoIterator<Item = &'a String>,
) -> Option<Vec<String>> {
    let mut out: Vec<String> = missed.to_vec();
    let mut added = false;
    for channel in unread {
        let reads = channels.is_none_or(|c| c.contains(channel));
        if reads && !out.contains(channel) {
            out.push(channel.clone());
            added = true;
        }
    }
    out.sort();
    added.then_some(out)
}

/// A time stored as Unix seconds (fractional); unreadable values (negative, NaN) are the epoch.
pub(crate) fn unix_time(secs: f64) -> SystemTime {
    Duration::try_from_secs_f64(secs)
        .ok()
        .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Logs and announces a gap found when a consumer (re)registered.
pub(crate) fn report_gap(name: &str, channels: &[String]) {
    log::warn!(
        "sqlnotify: consumer {name:?} was dropped or expired and journal rows it had not read \
         were purged meanwhile on {}; subscribers get Status::Gap",
        channels.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_stays_within_a_quarter_of_the_expiry() {
        let p = |expire_after| ConsumerParams {
            name: "c".into(),
            expire_after,
        };
        assert_eq!(p(None).heartbeat(), Duration::from_secs(10));
        assert_eq!(
            p(Some(Duration::from_secs(1))).heartbeat(),
            Duration::from_millis(250)
        );
        assert_eq!(
            p(Some(Duration::from_secs(3600))).heartbeat(),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn unknown_states_protect_and_positions_display() {
        assert_eq!(ConsumerState::parse("dropped"), ConsumerState::Dropped);
        assert_eq!(ConsumerState::parse("expired"), ConsumerState::Expired);
        assert_eq!(ConsumerState::parse("garbage"), ConsumerState::Active);
        assert_eq!(ConsumerPosition::Horizon(7).to_string(), "xid 7");
        assert_eq!(ConsumerPosition::JournalId(42).to_string(), "id 42");
        let slot = ConsumerPosition::Slot {
            confirmed: 0x1_0000_00AB,
            lag_bytes: 512,
        };
        assert_eq!(slot.to_string(), "lsn 1/AB, lag 512 B");
    }

    #[test]
    fn missed_channels_are_read_defensively() {
        let all = vec!["a".to_string(), "b".to_string()];
        assert!(missed_channels(None, &all).is_empty());
        assert_eq!(missed_channels(Some(r#"["b","a","b"]"#), &all), ["a", "b"]);
        assert_eq!(missed_channels(Some("not json"), &all), all);
        assert_eq!(stored_channels(Some(r#"["x"]"#)), Some(vec!["x".into()]));
        assert_eq!(stored_channels(Some("{")), None);
        assert_eq!(stored_channels(None), None);
    }

    #[test]
    fn only_channels_it_reads_count_as_missed() {
        let (a, b) = ("a".to_string(), "b".to_string());
        let chans = vec![a.clone()];
        assert_eq!(
            add_missed(&[], Some(&chans), [&a, &b]),
            Some(vec![a.clone()])
        );
        assert_eq!(add_missed(&[], Some(&chans), [&b]), None, "not its channel");
        assert_eq!(
            add_missed(std::slice::from_ref(&b), None, [&a]),
            Some(vec![a.clone(), b.clone()])
        );
        assert_eq!(
            add_missed(std::slice::from_ref(&a), Some(&chans), [&a]),
            None,
            "nothing new"
        );
    }
}
