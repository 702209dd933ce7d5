//! How a watch's events are captured ([`Capture`]: per row or per statement) and how they
//! travel from the trigger to the listener ([`Tier`]). A leaf: channels, watches and the
//! dialects name these, they name nothing.

/// How a watch's events travel from the trigger to the listener (PostgreSQL; SQLite and MySQL
/// always use their journal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Tier {
    /// The trigger sends the row with `pg_notify`. Lowest latency; at most once — events
    /// committed while the listener is disconnected are lost, and subscribers are told with a
    /// [`Status::Gap`](crate::Status::Gap).
    #[default]
    Notify,
    /// The trigger writes a journal row in the user's transaction and NOTIFY only wakes the
    /// listener. At least once: after a reconnect (and, for a named
    /// [`consumer`](crate::NotifierBuilder::consumer), after a restart) the listener replays
    /// from its cursor; duplicates are suppressed within a running process.
    Durable,
    /// Like `Durable`, without any NOTIFY: the listener polls the journal adaptively. Keeps
    /// NOTIFY's commit-time lock off the writers and works through poolers in transaction
    /// mode.
    Poll,
    /// No trigger at all: changes are read from PostgreSQL's write-ahead log through logical
    /// decoding (a publication of the watched tables and a replication slot, which sqlnotify
    /// creates at `start()`; pgoutput over the streaming replication protocol). Writers pay
    /// only the extra WAL. Needs the `logical` feature, `wal_level = logical` on the server
    /// (else [`Error::WalLevelNotLogical`](crate::Error::WalLevelNotLogical)), the
    /// `REPLICATION` attribute, and tables with a replica identity
    /// ([`Error::ReplicaIdentity`](crate::Error::ReplicaIdentity)). At least once, like
    /// `Durable`: a named [`consumer`](crate::NotifierBuilder::consumer) resumes from its
    /// slot's confirmed position after a restart. See README, "The logical tier", for what it
    /// carries per replica identity and how to operate the slot. PostgreSQL only.
    Logical,
}

/// How a watch's trigger captures changed rows (PostgreSQL journal tiers).
///
/// Either way every changed row becomes one [`ChangeEvent`](crate::ChangeEvent), in order;
/// what differs is the work done inside the user's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Capture {
    /// A row-level trigger: one journal row (or notification) per changed row. Default.
    #[default]
    Row,
    /// A statement-level trigger with a transition table: one journal row per statement
    /// (split every [`STATEMENT_CHUNK_ROWS`] rows) carrying all its rows as a JSON array, and,
    /// on the durable tier, one wake-up per statement instead of one per row. Much cheaper
    /// for writers that change many rows per statement (see README, "Benchmarks"); the same
    /// for single-row statements.
    ///
    /// On PostgreSQL it needs [`Tier::Durable`] or [`Tier::Poll`]: with the notify tier, which
    /// has no journal to carry a statement's rows, `start()` and `install_sql()` fail with
    /// [`Error::InvalidWatch`](crate::Error::InvalidWatch). Differences from [`Capture::Row`]:
    /// * the events of one journal row share its [`sequence`](crate::ChangeEvent::sequence);
    ///   a journal row carries at most [`STATEMENT_CHUNK_ROWS`] rows and about 1 MiB of
    ///   stored data, so big statements and big rows are split;
    /// * an UPDATE watch with `trigger_columns` compares each new row with the old row of the
    ///   same key: a row whose key changed to one no old row had counts as changed, while an
    ///   update that swaps keys between rows compares each with the other's old values; a key
    ///   that is not unique (a `primary_keys` override) may compare with the wrong old row;
    /// * within one statement, events of different watches (e.g. the INSERT and UPDATE
    ///   watches of one `INSERT … ON CONFLICT DO UPDATE`) are grouped per watch instead of
    ///   interleaved row by row;
    /// * partitioned tables, partitions and inheritance parents or children are refused
    ///   ([`Error::InvalidWatch`](crate::Error::InvalidWatch)): a statement-level trigger
    ///   fires only for the table a statement names, so it would miss writes through the
    ///   parent or to a partition directly; views have no transition tables either;
    /// * watched column names may not start with `_sqn_` (the trigger's internal names);
    /// * a process running an older sqlnotify drops statement journal rows as malformed:
    ///   upgrade every listener before switching a watch to `Statement`.
    ///
    /// SQLite and MySQL have no statement-level triggers with transition tables: there a
    /// `Statement` watch is captured per row, with the same events.
    Statement,
}

/// Largest number of rows one statement-capture journal row carries; bigger statements are
/// split. Kept below the smallest in-flight budget so one journal row always fits in it.
pub const STATEMENT_CHUNK_ROWS: usize = 512;
