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
    /// One journal row (or notification) per changed row, each event with a
    /// [`sequence`](crate::ChangeEvent::sequence) of its own. Default.
    ///
    /// How it is captured depends on the table. The notify tier, and the journal tiers on a
    /// partitioned table, a partition, a member of an inheritance tree or for a watch with
    /// `trigger_columns`, use a row-level trigger. On a plain table the journal tiers
    /// ([`Tier::Durable`], [`Tier::Poll`]) use a statement-level trigger with a transition
    /// table that writes the same journal rows — one per changed row, in the statement's
    /// order — with one privilege check and one multi-row insert per 512 rows and one
    /// wake-up per statement: a 100-row statement costs the writer well under half of what
    /// the row trigger cost it (README, "Row capture per statement"). What that changes:
    /// * within one statement that changes a table through several watches (the INSERT and
    ///   UPDATE watches of one `INSERT … ON CONFLICT DO UPDATE`, data-modifying CTEs, two
    ///   watches of one operation), events are grouped per watch instead of interleaved row
    ///   by row; each watch's events keep the statement's order, and transactions and
    ///   commit order are unchanged;
    /// * the table cannot become a partition or an inheritance child while the watch is
    ///   installed: a row-level guard trigger (`_sqn_guard_…`, never fired) makes
    ///   PostgreSQL refuse (`trigger "_sqn_guard_…" prevents table … from becoming a
    ///   partition`), because writes through the parent would fire the parent's statement
    ///   triggers, not this one. Remove the watch (`cleanup_on_stop`, or the builder's
    ///   `cleanup`), attach, and start again: the table then gets the row-level trigger;
    /// * a single-row statement pays the statement trigger's fixed price: about 12 µs of
    ///   server time more than the row trigger (README, "Row capture per statement");
    /// * the watch's helper takes one payload per row (`sqlnotify."<channel>"(text[])`).
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
