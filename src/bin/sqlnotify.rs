//! The `sqlnotify` command-line tool (feature `cli`): tail a table's changes in PostgreSQL,
//! SQLite or MySQL / MariaDB as JSON lines, print the DDL for your migrations, remove every
//! sqlnotify watch from a database, list or drop named consumers, list, inspect, retry or drop
//! dead letters, and (with feature `nats`) relay changes into a NATS JetStream stream.
//!
//! ```text
//! sqlnotify tail sqlite://app.db --table users --op insert,update --columns email
//! sqlnotify install-sql postgres://postgres@127.0.0.1/app --table users --op insert
//! sqlnotify cleanup mysql://root@127.0.0.1:3306/app
//! sqlnotify cleanup postgres://postgres@127.0.0.1/app
//! sqlnotify consumers list sqlite://app.db
//! sqlnotify consumers drop sqlite://app.db billing
//! sqlnotify dead-letters list postgres://postgres@127.0.0.1/app --handler billing
//! sqlnotify dead-letters show postgres://postgres@127.0.0.1/app 17
//! sqlnotify dead-letters retry postgres://postgres@127.0.0.1/app --handler billing
//! sqlnotify relay postgres://postgres@127.0.0.1/app --nats nats://127.0.0.1:4222 \
//!     --stream ORDERS --consumer orders-relay --watch shop.orders:insert+update:status
//! ```
//!
//! Exit status: 0 on success (and after Ctrl-C or SIGTERM); 2 on bad usage — arguments that do
//! not parse, a URL with an unknown scheme (or one this build lacks) or that is malformed, names
//! or option combinations no database accepts; 1 when the database refuses or lacks something
//! (unreachable, no such table or column, permission denied …). Events go to stdout; progress,
//! connection status and errors go to stderr, errors as one line starting with
//! `sqlnotify: error:`.

use std::cell::Cell;
use std::io::Write;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};

use serde_json::{json, Value};
use sqlnotify::{Capture, Tier, Watch};
use sqlnotify::{ChangeEvent, Notifier, NotifierBuilder, Operation, Status, Subscription};
use sqlnotify::{ConsumerInfo, DeadLetter, DeadLetters};

/// Row changes in PostgreSQL, SQLite and MySQL / MariaDB, from the command line.
///
/// URLs: postgres://user:password@host:port/db (or postgresql://…),
/// sqlite:///absolute/path.db, sqlite://relative/path.db (the file must exist),
/// mysql://user:password@host:3306/db (or mariadb://…; MySQL / MariaDB needs a build with the
/// `mysql` feature).
///
/// Events go to stdout; progress (installing, listening, stopping), connection status and
/// errors go to stderr.
#[derive(Debug, Parser)]
#[command(
    name = "sqlnotify",
    version,
    propagate_version = true,
    after_help = EXIT_STATUS
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install watches and print their events as JSON lines on stdout until interrupted.
    ///
    /// One line per event: {"channel", "schema", "table", "operation", "id", "columns",
    /// "sequence", "truncated"}. "id" is the key value (an array for a composite key),
    /// "columns" the extra columns asked for with --columns, "sequence" the journal position
    /// (null for PostgreSQL's notify tier). Progress and status messages go to stderr.
    ///
    /// tail watches through channels of its own, never an application's: "channel" is
    /// sqlnotify_tail_<table>_<op>_<hash of the options>, so tail never replaces or removes the
    /// trigger of an application watching the same table (whose channel is
    /// sqlnotify_<schema>_<table>_<op>, or its label's). Without --cleanup-on-exit its triggers
    /// stay installed, and a later tail with the same options reuses them.
    ///
    /// Example: sqlnotify tail sqlite://app.db --table users --op insert,update --columns email
    Tail {
        #[command(flatten)]
        watch: WatchArgs,
        /// On exit (Ctrl-C or SIGTERM), remove the triggers this command installed, and only
        /// those: with this option, tail's channels are this run's alone, and a trigger it found
        /// installed (a --label channel) stays.
        #[arg(long)]
        cleanup_on_exit: bool,
        /// First print every current row of each table (lines with "snapshot": true, in key
        /// order), then its changes after them — no gap, no duplicate.
        /// Progress goes to stderr.
        #[arg(long)]
        snapshot: bool,
        #[command(flatten)]
        locks: LockArgs,
    },
    /// Print the DDL the watches need, as one idempotent script; installs nothing.
    ///
    /// The tables are checked against the live database, so the URL must be reachable.
    ///
    /// Example: sqlnotify install-sql postgres://postgres@127.0.0.1/app --table users --op insert
    InstallSql {
        #[command(flatten)]
        watch: WatchArgs,
        /// Also grant ROLE what it needs to run a notifier against this install with
        /// manage_triggers(false) (PostgreSQL: a role; MySQL: `user` or `user@host`). Roles
        /// that only write to the watched tables need no grant.
        #[arg(long, value_name = "ROLE")]
        grant_to: Option<String>,
    },
    /// Remove every sqlnotify watch from the database: its triggers (and, on PostgreSQL, their
    /// functions) and catalog entries, including those installed by other applications.
    /// sqlnotify's tables (journal, overflow, consumers, dead letters, catalog) and their rows
    /// are kept, and with them the positions of the journal tiers' named consumers.
    ///
    /// On PostgreSQL, in a build with the `logical` feature, every sqlnotify replication slot
    /// and publication is dropped too: a logical-tier consumer's position is its slot, so it is
    /// gone. stderr names each slot and publication dropped, and their consumers.
    ///
    /// Example: sqlnotify cleanup sqlite://app.db
    Cleanup {
        /// The database URL.
        url: String,
        #[command(flatten)]
        locks: LockArgs,
    },
    /// List or drop the named consumers registered in the database.
    ///
    /// A named consumer (a notifier built with `.consumer("name")`) keeps every journal row it
    /// has not read from the purge, however long it is stopped, until it is dropped (or its
    /// own expiry passes).
    ///
    /// Example: sqlnotify consumers list sqlite://app.db
    Consumers {
        #[command(subcommand)]
        action: ConsumersAction,
    },
    /// List, inspect, retry or drop dead letters: events a handler failed on.
    ///
    /// An event whose every allowed attempt failed waits in the dead-letter table until it is
    /// retried (its handler's active process delivers it again within a second) or dropped.
    /// Events still being retried are listed too, in state retrying.
    ///
    /// Example: sqlnotify dead-letters list postgres://postgres@127.0.0.1/app --handler billing
    DeadLetters {
        #[command(subcommand)]
        action: DeadLettersAction,
    },
    /// Publish row changes into a NATS JetStream stream, exactly once, until interrupted.
    ///
    /// The relay reads as the named consumer --consumer: relays of the same name form a
    /// consumer group, one publishes and the others stand by, taking over when it stops. Each
    /// event goes to subject PREFIX.schema.table.operation (with a partition number appended
    /// under --partitions), its body the JSON line `tail` prints, its Nats-Msg-Id
    /// SOURCE:SEQUENCE:PART, so the stream drops what is sent again after a failure or a
    /// failover. A missing stream is created (subjects PREFIX.>); an existing one is checked.
    /// On PostgreSQL the watches use the durable tier (or --tier poll: the relay needs a
    /// journal); SQLite and MySQL / MariaDB always use their journal.
    ///
    /// On stderr: when this relay becomes active or stands by, connection trouble, and every
    /// --stats-interval seconds one line of counters (published, duplicates, pending, NATS
    /// connected). Ctrl-C or SIGTERM stops it gracefully: the publishes in flight are
    /// confirmed first.
    ///
    /// Example: sqlnotify relay postgres://postgres@127.0.0.1/app --nats nats://127.0.0.1:4222
    /// --stream ORDERS --consumer orders-relay --watch shop.orders:insert+update:status,total
    /// --watch shop.refunds:insert --partitions 8
    #[cfg(feature = "nats")]
    Relay(relay::RelayArgs),
}

/// What to do with the registered consumers.
#[derive(Debug, Subcommand)]
enum ConsumersAction {
    /// Print the registered consumers as a table on stdout.
    ///
    /// One line per consumer: name, state (active, dropped, expired), position, backlog
    /// (journal rows on its channels it has not read), last activity, expiry and channels.
    List {
        /// The database URL.
        url: String,
    },
    /// Drop a consumer on purpose.
    ///
    /// From now on it protects nothing: the purge deletes the rows it has not read once they
    /// are older than the retention. If it starts again it resumes with what is left and is
    /// told (Status::Gap) about what was purged meanwhile.
    Drop {
        /// The database URL.
        url: String,
        /// The consumer's name.
        name: String,
    },
}

/// What to do with the dead letters.
#[derive(Debug, Subcommand)]
enum DeadLettersAction {
    /// Print the dead letters (and the events being retried), oldest first, as a table on
    /// stdout.
    ///
    /// One line each: id, handler, state (retrying, dead, requested, redelivering), failed
    /// attempts, when the first and the last attempt failed, channel, key and the last error
    /// (on one line, shortened). With --json, one JSON object per line instead, with every
    /// field and the whole event.
    ///
    /// Example: sqlnotify dead-letters list sqlite://app.db --handler billing --json
    List {
        /// The database URL.
        url: String,
        /// Only this handler's.
        #[arg(long, value_name = "NAME")]
        handler: Option<String>,
        /// At most N (the oldest).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// One JSON object per line: id, handler, state, attempts, first_failed, last_failed
        /// (RFC 3339, UTC), channel, sequence, part, key, event and error.
        #[arg(long)]
        json: bool,
    },
    /// Print everything about one dead letter: its fields, the whole error and the event.
    ///
    /// Example: sqlnotify dead-letters show sqlite://app.db 17
    Show {
        /// The database URL.
        url: String,
        /// The dead letter's id (see `dead-letters list`).
        id: i64,
    },
    /// Deliver dead letters again: their handler's active process takes them within a second.
    ///
    /// Only dead letters are retried (not events still being retried, nor ones already
    /// requested); how many were is printed on stderr. A retried event that fails every
    /// attempt again becomes a dead letter again.
    ///
    /// Example: sqlnotify dead-letters retry sqlite://app.db 17 18
    #[command(override_usage = "sqlnotify dead-letters retry <URL> <ID>...\n       \
                                sqlnotify dead-letters retry <URL> --handler <NAME>")]
    Retry {
        /// The database URL.
        url: String,
        #[command(flatten)]
        which: WhichDeadLetters,
    },
    /// Delete dead letters for good.
    ///
    /// Only dead letters are deleted (events still being retried, or being delivered again,
    /// are left alone); how many were is printed on stderr.
    ///
    /// Example: sqlnotify dead-letters drop sqlite://app.db --handler billing
    #[command(override_usage = "sqlnotify dead-letters drop <URL> <ID>...\n       \
                                sqlnotify dead-letters drop <URL> --handler <NAME>")]
    Drop {
        /// The database URL.
        url: String,
        #[command(flatten)]
        which: WhichDeadLetters,
    },
}

/// The dead letters `retry` and `drop` act on: ids, or a handler's.
#[derive(Debug, Args)]
#[group(id = "which", required = true, multiple = false)]
struct WhichDeadLetters {
    /// The dead letters' ids (see `dead-letters list`).
    #[arg(value_name = "ID")]
    ids: Vec<i64>,
    /// Every dead letter of this handler instead.
    #[arg(long, value_name = "NAME")]
    handler: Option<String>,
}

/// How long to wait for locks held by other sessions.
#[derive(Debug, Args)]
struct LockArgs {
    /// Seconds to keep trying when another session holds a lock on a watched table (an open
    /// transaction) before giving up; the wait is reported on stderr, and your application's
    /// writes are not held up meanwhile.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    install_timeout: f64,
}

impl LockArgs {
    fn timeout(&self) -> Result<std::time::Duration, Failure> {
        std::time::Duration::try_from_secs_f64(self.install_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Failure::usage(format!(
                    "--install-timeout must be a number of seconds above zero, not {}",
                    self.install_timeout
                ))
            })
    }
}

/// Prints the library's warnings (a wait for a lock, a listener reconnecting …) on stderr,
/// one line each.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn && metadata.target().starts_with("sqlnotify")
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let text = record.args().to_string();
            let text = text.strip_prefix("sqlnotify: ").unwrap_or(&text);
            eprintln!("sqlnotify: {}", one_line(text));
        }
    }

    fn flush(&self) {}
}

/// The exit statuses, as `--help` shows them.
const EXIT_STATUS: &str = "Exit status: 0 on success (and after Ctrl-C or SIGTERM); 2 on bad \
usage (arguments that do not parse, an unknown or malformed URL, names or option combinations \
no database accepts); 1 when the database refuses or lacks something (unreachable, no such \
table or column, permission denied).";

/// What to watch: every --table × every --op.
#[derive(Debug, Args)]
struct WatchArgs {
    /// The database URL (postgres://…, postgresql://…, sqlite://…, mysql://…, mariadb://…).
    url: String,
    /// Table(s) to watch, optionally schema-qualified (shop.orders); repeat or separate with
    /// commas.
    #[arg(
        long,
        short,
        required = true,
        value_delimiter = ',',
        value_name = "TABLE"
    )]
    table: Vec<String>,
    /// Operation(s) to watch; repeat or separate with commas.
    #[arg(
        long,
        short,
        value_enum,
        value_delimiter = ',',
        default_value = "insert,update,delete",
        value_name = "OP"
    )]
    op: Vec<OpArg>,
    /// Extra columns each event carries besides the key.
    #[arg(long, short, value_delimiter = ',', value_name = "COLUMN")]
    columns: Vec<String>,
    /// Key columns, in this order (default: the table's primary key).
    #[arg(long, value_delimiter = ',', value_name = "COLUMN")]
    key: Vec<String>,
    /// Send events on channel sqlnotify_<LABEL> (only with one --table and one --op). tail:
    /// instead of its own channel; one already installed there with another definition is an
    /// error, never replaced.
    #[arg(long)]
    label: Option<String>,
    /// How events travel on PostgreSQL: notify (fastest, at most once), durable (journal,
    /// at least once) or poll (journal, no NOTIFY). SQLite and MySQL / MariaDB always use
    /// their journal.
    #[arg(long, value_enum, default_value_t = TierArg::Notify)]
    tier: TierArg,
    /// How the trigger captures rows (PostgreSQL journal tiers): row (one journal row per
    /// changed row) or statement (one per statement: much cheaper for batched writes; needs
    /// --tier durable or poll). SQLite and MySQL / MariaDB capture per row either way.
    #[arg(long, value_enum, default_value_t = CaptureArg::Row)]
    capture: CaptureArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CaptureArg {
    Row,
    Statement,
}

impl From<CaptureArg> for Capture {
    fn from(capture: CaptureArg) -> Capture {
        match capture {
            CaptureArg::Row => Capture::Row,
            CaptureArg::Statement => Capture::Statement,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OpArg {
    Insert,
    Update,
    Delete,
}

impl From<OpArg> for Operation {
    fn from(op: OpArg) -> Operation {
        match op {
            OpArg::Insert => Operation::Insert,
            OpArg::Update => Operation::Update,
            OpArg::Delete => Operation::Delete,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TierArg {
    Notify,
    Durable,
    Poll,
}

impl From<TierArg> for Tier {
    fn from(tier: TierArg) -> Tier {
        match tier {
            TierArg::Notify => Tier::Notify,
            TierArg::Durable => Tier::Durable,
            TierArg::Poll => Tier::Poll,
        }
    }
}

/// A failure: a one-line message and the exit status it maps to.
struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: 2,
        }
    }
}

impl From<sqlnotify::Error> for Failure {
    fn from(e: sqlnotify::Error) -> Self {
        use sqlnotify::Error as E;
        // Bad usage: wrong whatever the database holds. Everything else comes from the
        // database (unreachable, refused, no such table …).
        let usage = matches!(
            e,
            E::UnsupportedDatabase { .. }
                | E::InvalidUrl { .. }
                | E::InvalidOption { .. }
                | E::InvalidWatch { .. }
                | E::InvalidIdentifier { .. }
                | E::IdentifierTooLong { .. }
                | E::TriggerColumnsNotAllowed { .. }
                | E::DuplicateWatch { .. }
                | E::LabelReused { .. }
        );
        Failure {
            message: e.to_string(),
            code: if usage { 2 } else { 1 },
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    match actix::System::new().block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("sqlnotify: error: {}", one_line(&failure.message));
            ExitCode::from(failure.code)
        }
    }
}

/// Help and version go out as clap prints them; usage errors become one line.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let command = std::env::args().nth(1);
        eprintln!("sqlnotify: error: {}", missing_command(command.as_deref()));
        return ExitCode::from(2);
    }
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim);
    let first = lines.next().unwrap_or("invalid arguments");
    let mut first = first.strip_prefix("error: ").unwrap_or(first).to_string();
    // The rest of the first paragraph: one line per missing argument, or the possible values.
    let more: Vec<&str> = lines.by_ref().take_while(|l| !l.is_empty()).collect();
    if !more.is_empty() {
        let separator = if first.ends_with(':') { ", " } else { " " };
        first = format!("{first} {}", more.join(separator));
    }
    let tip = lines
        .find_map(|l| l.strip_prefix("tip: "))
        .map(|tip| format!("; {tip}"))
        .unwrap_or_default();
    eprintln!("sqlnotify: error: {first}{tip} (see 'sqlnotify --help')");
    ExitCode::from(2)
}

/// What is missing when a command (or, after `command`, an action) is: the choices and where
/// to read about them.
fn missing_command(command: Option<&str>) -> String {
    match command {
        Some("consumers") => {
            "consumers needs an action: list or drop (see 'sqlnotify consumers --help')".into()
        }
        Some("dead-letters") => "dead-letters needs an action: list, show, retry or drop (see \
                                 'sqlnotify dead-letters --help')"
            .into(),
        _ => {
            let commands = if cfg!(feature = "nats") {
                "tail, install-sql, cleanup, consumers, dead-letters or relay"
            } else {
                "tail, install-sql, cleanup, consumers or dead-letters"
            };
            format!("a command is required: {commands} (see 'sqlnotify --help')")
        }
    }
}

/// Multi-line driver messages (DETAIL, HINT …) folded into one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Tail {
            watch,
            cleanup_on_exit,
            snapshot,
            locks,
        } => tail(&watch, cleanup_on_exit, snapshot, &locks).await,
        Command::InstallSql { watch, grant_to } => {
            let builder = builder(&watch)?;
            eprintln!(
                "sqlnotify: checking {} in the {} database …",
                described(&watches(&watch)?),
                builder.dialect_name()?
            );
            let sql = match grant_to {
                Some(role) => builder.install_sql_granting(&role).await?,
                None => builder.install_sql().await?,
            };
            print!("{sql}");
            if !sql.ends_with('\n') {
                println!();
            }
            Ok(())
        }
        Command::Cleanup { url, locks } => {
            let builder = Notifier::builder(url).install_timeout(locks.timeout()?);
            eprintln!(
                "sqlnotify: removing every sqlnotify watch from the {} database …",
                builder.dialect_name()?
            );
            let report = builder.cleanup_with_report().await?;
            eprintln!("sqlnotify: removed {} watch(es)", report.watches);
            if !report.slots.is_empty() {
                let whose = if report.consumers.is_empty() {
                    String::new()
                } else {
                    let names: Vec<String> =
                        report.consumers.iter().map(|c| format!("{c:?}")).collect();
                    format!(
                        "; the positions of logical consumer(s) {} went with them",
                        names.join(", ")
                    )
                };
                eprintln!(
                    "sqlnotify: dropped {} replication slot(s): {}{whose}",
                    report.slots.len(),
                    report.slots.join(", ")
                );
            }
            if !report.publications.is_empty() {
                eprintln!(
                    "sqlnotify: dropped {} publication(s): {}",
                    report.publications.len(),
                    report.publications.join(", ")
                );
            }
            Ok(())
        }
        Command::Consumers {
            action: ConsumersAction::List { url },
        } => {
            let consumers = Notifier::builder(url).consumers().await?;
            print!("{}", consumer_table(&consumers, SystemTime::now()));
            if consumers.is_empty() {
                eprintln!("sqlnotify: no named consumer is registered in this database");
            }
            Ok(())
        }
        Command::Consumers {
            action: ConsumersAction::Drop { url, name },
        } => {
            Notifier::builder(url).drop_consumer(&name).await?;
            eprintln!("sqlnotify: dropped consumer {name:?}");
            Ok(())
        }
        Command::DeadLetters { action } => dead_letters(action).await,
        #[cfg(feature = "nats")]
        Command::Relay(args) => relay::run(args).await,
    }
}

/// `sqlnotify dead-letters …`.
async fn dead_letters(action: DeadLettersAction) -> Result<(), Failure> {
    let open = |url: String| -> Result<DeadLetters, Failure> {
        Ok(Notifier::builder(url).dead_letters()?)
    };
    match action {
        DeadLettersAction::List {
            url,
            handler,
            limit,
            json,
        } => {
            let letters: Vec<Letter> = open(url)?
                .list(handler.as_deref(), limit)
                .await?
                .into_iter()
                .map(Letter::from)
                .collect();
            if json {
                let mut out = std::io::stdout().lock();
                for letter in &letters {
                    let _ = writeln!(out, "{}", dead_letter_json(letter));
                }
            } else {
                print!("{}", dead_letter_table(&letters, SystemTime::now()));
            }
            if letters.is_empty() {
                match handler {
                    Some(handler) => {
                        eprintln!("sqlnotify: handler {handler:?} has no dead letters")
                    }
                    None => eprintln!("sqlnotify: no dead letters in this database"),
                }
            }
            Ok(())
        }
        DeadLettersAction::Show { url, id } => {
            let letter = Letter::from(open(url)?.get(id).await?);
            print!("{}", dead_letter_details(&letter, SystemTime::now()));
            Ok(())
        }
        DeadLettersAction::Retry { url, which } => {
            let letters = open(url)?;
            let n = match &which.handler {
                Some(handler) => letters.retry_handler(handler).await?,
                None => letters.retry(&which.ids).await?,
            };
            eprintln!(
                "sqlnotify: {n} dead letter(s) requested for retry{}",
                not_dead(&which, n)
            );
            Ok(())
        }
        DeadLettersAction::Drop { url, which } => {
            let letters = open(url)?;
            let n = match &which.handler {
                Some(handler) => letters.discard_handler(handler).await?,
                None => letters.discard(&which.ids).await?,
            };
            eprintln!(
                "sqlnotify: dropped {n} dead letter(s){}",
                not_dead(&which, n)
            );
            Ok(())
        }
    }
}

/// A dead letter as the commands show it: [`DeadLetter`]'s fields (which the library may add
/// to, so it cannot be built here; the formatting below is tested on this).
#[derive(Debug, Clone, PartialEq)]
struct Letter {
    id: i64,
    handler: String,
    channel: String,
    sequence: Option<i64>,
    part: u32,
    key: String,
    event: String,
    attempts: u32,
    first_failed: SystemTime,
    last_failed: SystemTime,
    error: String,
    state: sqlnotify::DeadLetterState,
}

impl From<DeadLetter> for Letter {
    fn from(l: DeadLetter) -> Self {
        Letter {
            id: l.id,
            handler: l.handler,
            channel: l.channel,
            sequence: l.sequence,
            part: l.part,
            key: l.key,
            event: l.event,
            attempts: l.attempts,
            first_failed: l.first_failed,
            last_failed: l.last_failed,
            error: l.error,
            state: l.state,
        }
    }
}

/// What `retry` and `drop` add when fewer ids than given were acted on.
fn not_dead(which: &WhichDeadLetters, acted_on: u64) -> String {
    let mut given = which.ids.clone();
    given.sort_unstable();
    given.dedup();
    let missing = (given.len() as u64).saturating_sub(acted_on);
    if which.handler.is_some() || missing == 0 {
        return String::new();
    }
    format!(
        "; {missing} of the {} id(s) given are not dead letters (unknown, still being \
         retried, or already requested)",
        given.len()
    )
}

/// The dead letters as an aligned table, one line each after a header.
fn dead_letter_table(letters: &[Letter], now: SystemTime) -> String {
    let ago = |t: SystemTime| {
        format!(
            "{} ago",
            short_duration(now.duration_since(t).unwrap_or_default())
        )
    };
    let mut rows = vec![[
        "ID".to_string(),
        "HANDLER".into(),
        "STATE".into(),
        "ATTEMPTS".into(),
        "FIRST FAILED".into(),
        "LAST FAILED".into(),
        "CHANNEL".into(),
        "KEY".into(),
        "ERROR".into(),
    ]];
    for l in letters {
        rows.push([
            l.id.to_string(),
            l.handler.clone(),
            l.state.to_string(),
            l.attempts.to_string(),
            ago(l.first_failed),
            ago(l.last_failed),
            l.channel.clone(),
            shortened(&one_line(&l.key), 40),
            shortened(&one_line(&l.error), 80),
        ]);
    }
    aligned(&rows)
}

/// Rows of cells as lines, each column as wide as its widest cell, two spaces apart.
fn aligned<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `text` cut to at most `max` characters, ending in `…` when cut.
fn shortened(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Stored JSON text as JSON (the key and the event are JSON text), or as a string when it is
/// not JSON.
fn stored_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// One dead letter, every field, as a JSON object (`dead-letters list --json`).
fn dead_letter_json(l: &Letter) -> Value {
    json!({
        "id": l.id,
        "handler": l.handler,
        "state": l.state.as_str(),
        "attempts": l.attempts,
        "first_failed": rfc3339(l.first_failed),
        "last_failed": rfc3339(l.last_failed),
        "channel": l.channel,
        "sequence": l.sequence,
        "part": l.part,
        "key": stored_json(&l.key),
        "event": stored_json(&l.event),
        "error": l.error,
    })
}

/// Everything about one dead letter, a field per line; the error and the event (pretty JSON)
/// in full, their further lines indented under the first.
fn dead_letter_details(l: &Letter, now: SystemTime) -> String {
    let when = |t: SystemTime| {
        format!(
            "{} ({} ago)",
            rfc3339(t),
            short_duration(now.duration_since(t).unwrap_or_default())
        )
    };
    let event = match serde_json::from_str::<Value>(&l.event) {
        Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_else(|_| l.event.clone()),
        Err(_) => l.event.clone(),
    };
    let fields = [
        ("id", l.id.to_string()),
        ("handler", l.handler.clone()),
        ("state", l.state.to_string()),
        ("attempts", l.attempts.to_string()),
        ("first failed", when(l.first_failed)),
        ("last failed", when(l.last_failed)),
        ("channel", l.channel.clone()),
        ("sequence", l.sequence.map_or("-".into(), |s| s.to_string())),
        ("part", l.part.to_string()),
        ("key", l.key.clone()),
        ("error", l.error.clone()),
        ("event", event),
    ];
    let mut out = String::new();
    for (name, value) in fields {
        let mut lines = value.lines();
        out.push_str(&format!(
            "{:<14}{}\n",
            format!("{name}:"),
            lines.next().unwrap_or("")
        ));
        for line in lines {
            out.push_str(&format!("{:14}{line}\n", ""));
        }
    }
    out
}

/// A time as RFC 3339 in UTC with microseconds: `2024-05-01T12:00:00.123456Z`.
fn rfc3339(t: SystemTime) -> String {
    let micros: i128 = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i128,
        Err(e) => -(e.duration().as_micros() as i128),
    };
    let secs = micros.div_euclid(1_000_000);
    let (days, of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date (proleptic Gregorian; Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i128::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        of_day / 3_600,
        of_day % 3_600 / 60,
        of_day % 60,
        micros.rem_euclid(1_000_000)
    )
}

/// The consumers as an aligned table, one line each after a header.
fn consumer_table(consumers: &[ConsumerInfo], now: SystemTime) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "STATE".into(),
        "POSITION".into(),
        "BACKLOG".into(),
        "LAST ACTIVE".into(),
        "EXPIRY".into(),
        "CHANNELS".into(),
    ]];
    for c in consumers {
        let ago = now.duration_since(c.last_active).unwrap_or_default();
        rows.push([
            c.name.clone(),
            c.state.to_string(),
            c.position.to_string(),
            c.backlog.to_string(),
            format!("{} ago", short_duration(ago)),
            c.expire_after.map_or("-".into(), short_duration),
            c.channels
                .as_ref()
                .map_or("(all)".into(), |channels| channels.join(",")),
        ]);
    }
    aligned(&rows)
}

/// A duration in its largest whole unit: 45s, 12m, 3h, 2d.
fn short_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3_599 => format!("{}m", secs / 60),
        3_600..=86_399 => format!("{}h", secs / 3_600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// One watch per table and operation, with the table and operation it watches.
fn watches(args: &WatchArgs) -> Result<Vec<(String, Operation, Watch)>, Failure> {
    let mut ops: Vec<Operation> = args.op.iter().copied().map(Operation::from).collect();
    ops.sort();
    ops.dedup();
    if args.label.is_some() && (args.table.len() != 1 || ops.len() != 1) {
        return Err(Failure::usage(
            "--label names one table and one operation: give exactly one --table and one --op",
        ));
    }
    if let Some(t) = args.table.iter().find(|t| t.is_empty()) {
        return Err(Failure::usage(format!("invalid table name {t:?}")));
    }
    let mut watches = Vec::new();
    for table in &args.table {
        for &op in &ops {
            let mut watch = Watch::new(table.clone(), op)
                .extra_columns(args.columns.iter().cloned())
                .tier(args.tier.into())
                .capture(args.capture.into());
            if !args.key.is_empty() {
                watch = watch.primary_keys(args.key.iter().cloned());
            }
            if let Some(label) = &args.label {
                watch = watch.channel_label(label.clone());
            }
            watches.push((table.clone(), op, watch));
        }
    }
    Ok(watches)
}

fn builder(args: &WatchArgs) -> Result<NotifierBuilder, Failure> {
    let mut builder = Notifier::builder(args.url.clone());
    for (_, _, watch) in watches(args)? {
        builder = builder.watch(watch);
    }
    Ok(builder)
}

/// "users INSERT, users UPDATE".
fn described(watches: &[(String, Operation, Watch)]) -> String {
    let what: Vec<String> = watches
        .iter()
        .map(|(table, op, _)| format!("{table} {op}"))
        .collect();
    what.join(", ")
}

/// The label of `tail`'s own channel for `table` and `op` (`sqlnotify_tail_…`), so that it
/// never installs on, replaces or removes an application's channel: the table (shortened) and
/// operation for the reader, then a hash of everything the trigger's definition depends on —
/// the table as given, the operation, tier, capture, columns, key, and sqlnotify's version —
/// so that another `tail` with other options (or another version) gets a channel of its own,
/// and one with the same options shares it; with `run` (`--cleanup-on-exit`), the run too, so
/// that the triggers it removes on exit are its alone, never read by another `tail`.
fn tail_label(args: &WatchArgs, table: &str, op: Operation, run: Option<&str>) -> String {
    // FNV-1a, 64 bits: stable across builds and platforms (the channel outlives the process).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut add = |part: &str| {
        for byte in part.bytes().chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    add(env!("CARGO_PKG_VERSION"));
    add(table);
    add(op.as_str());
    add(&format!("{:?}", args.tier));
    add(&format!("{:?}", args.capture));
    add(&args.columns.join("\u{1}"));
    add(&args.key.join("\u{1}"));
    if let Some(run) = run {
        add(run);
    }
    let short: String = table
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    // At most 5 + 24 + 1 + 6 + 1 + 12 = 49 bytes: the channel, with `sqlnotify_`, fits 63.
    format!(
        "tail_{short}_{}_{:012x}",
        op.as_str(),
        hash & 0xffff_ffff_ffff
    )
}

async fn tail(
    args: &WatchArgs,
    cleanup_on_exit: bool,
    snapshot: bool,
    locks: &LockArgs,
) -> Result<(), Failure> {
    // tail's own channels (or the one --label names): never an application's. Each watch's
    // label, for its subscription and the snapshot.
    let run = cleanup_on_exit.then(|| {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!("{}:{nanos}", std::process::id())
    });
    let mut watches = watches(args)?;
    let mut labels = Vec::with_capacity(watches.len());
    for (table, op, watch) in &mut watches {
        let label = match &args.label {
            Some(label) => label.clone(),
            None => {
                let label = tail_label(args, table, *op, run.as_deref());
                *watch = watch.clone().channel_label(label.clone());
                label
            }
        };
        labels.push(label);
    }
    let mut builder = Notifier::builder(args.url.clone());
    for (_, _, watch) in &watches {
        builder = builder.watch(watch.clone());
    }
    // An installed trigger that differs (a --label channel someone else installed) is an
    // error, never replaced; on exit, only what this run installed is removed.
    let builder = builder
        .revoke_on_model_change(false)
        .cleanup_installed_on_stop(cleanup_on_exit)
        .install_timeout(locks.timeout()?);
    eprintln!(
        "sqlnotify: installing triggers for {} in the {} database …",
        described(&watches),
        builder.dialect_name()?
    );
    let notifier = builder.start().await.map_err(|e| match e {
        sqlnotify::Error::DefinitionDrift { channel, table, .. } => Failure {
            message: format!(
                "channel {channel} on {table} is installed with another definition (by an \
                 application, or a tail with other options); tail never replaces a trigger it \
                 did not install: choose another --label"
            ),
            code: 1,
        },
        e => e.into(),
    })?;

    // stdout closed (`| head`, `None`): stop as if interrupted; a snapshot failed (`Some`):
    // stop, then fail with its error.
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<Option<Failure>>();
    // --snapshot: one feed per table, covering every operation watched on it.
    let mut tables: Vec<&String> = Vec::new();
    for (table, _, _) in &watches {
        if snapshot && !tables.contains(&table) {
            tables.push(table);
        }
    }
    for table in tables {
        let table_labels = watches
            .iter()
            .zip(&labels)
            .filter(|((t, _, _), _)| t == table)
            .map(|(_, label)| label.clone());
        let request = sqlnotify::Snapshot::new(table.clone()).channel_labels(table_labels);
        let feed = match notifier.subscribe_snapshot(request).await {
            Ok(feed) => feed,
            Err(e) => {
                let _ = notifier.stop().await;
                return Err(e.into());
            }
        };
        actix_rt::spawn(print_feed(table.clone(), feed, closed_tx.clone()));
    }
    for ((table, op, _), label) in watches.iter().zip(&labels).filter(|_| !snapshot) {
        let subscription = Subscription::new(table.clone(), *op).channel_label(label.clone());
        let closed_tx = closed_tx.clone();
        let subscribed = notifier
            .subscribe_fn(subscription, move |event| {
                if print_event(&event).is_err() {
                    let _ = closed_tx.send(None);
                }
            })
            .await;
        if let Err(e) = subscribed {
            let _ = notifier.stop().await;
            return Err(e.into());
        }
    }
    let disconnected = Rc::new(Cell::new(false));
    notifier
        .subscribe_status_fn(move |status| report_status(&status.status, &disconnected))
        .await?;

    let channels: Vec<String> = notifier
        .channels()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let mut signals = StopSignals::listen();
    eprintln!(
        "sqlnotify: tailing {} on {}: listening on {}; waiting for changes (Ctrl-C to stop)",
        described(&watches),
        notifier.dialect_name(),
        channels.join(", ")
    );

    let mut failed = None;
    let reason = tokio::select! {
        reason = signals.requested() => reason,
        ended = closed_rx.recv() => match ended.flatten() {
            Some(failure) => {
                failed = Some(failure);
                "a snapshot failed"
            }
            None => "stdout closed",
        },
    };
    let installed = notifier.installed_channels();
    match (cleanup_on_exit, installed.is_empty()) {
        (true, false) => eprintln!(
            "sqlnotify: {reason}; stopping and removing the triggers this command installed …"
        ),
        (true, true) => eprintln!(
            "sqlnotify: {reason}; stopping (this command installed no trigger: it found them \
             all installed, so they stay) …"
        ),
        (false, _) => eprintln!("sqlnotify: {reason}; stopping …"),
    }
    notifier.stop().await?;
    if cleanup_on_exit && !installed.is_empty() {
        eprintln!(
            "sqlnotify: removed the triggers of {}",
            installed.join(", ")
        );
    }
    match failed {
        Some(failure) => Err(failure),
        None => Ok(()),
    }
}

/// Ctrl-C (SIGINT) and SIGTERM, caught from [`listen`](Self::listen) on: a signal that
/// arrives before [`requested`](Self::requested) is awaited is kept, not lost or fatal. Listen
/// once a command is running, and say "Ctrl-C to stop" after it.
struct StopSignals {
    /// SIGINT and SIGTERM (None where they cannot be caught: Ctrl-C alone, then).
    #[cfg(unix)]
    unix: Option<(
        actix_rt::signal::unix::Signal,
        actix_rt::signal::unix::Signal,
    )>,
}

impl StopSignals {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use actix_rt::signal::unix::{signal, SignalKind};
            let unix = signal(SignalKind::interrupt())
                .and_then(|int| Ok((int, signal(SignalKind::terminate())?)))
                .ok();
            StopSignals { unix }
        }
        #[cfg(not(unix))]
        StopSignals {}
    }

    /// Resolves when asked to stop, with what asked: "interrupted" (Ctrl-C), "terminated"
    /// (SIGTERM) or "signal handling failed".
    async fn requested(&mut self) -> &'static str {
        #[cfg(unix)]
        if let Some((int, term)) = &mut self.unix {
            return tokio::select! {
                _ = int.recv() => "interrupted",
                _ = term.recv() => "terminated",
            };
        }
        match actix_rt::signal::ctrl_c().await {
            Ok(()) => "interrupted",
            Err(_) => "signal handling failed",
        }
    }
}

/// Tells the user about connection trouble and lost events, on stderr.
fn report_status(status: &Status, disconnected: &Cell<bool>) {
    match status {
        Status::Connected if disconnected.replace(false) => {
            eprintln!("sqlnotify: reconnected");
        }
        Status::Connected => {}
        Status::Disconnected { error } => {
            disconnected.set(true);
            eprintln!(
                "sqlnotify: connection lost ({}); reconnecting",
                one_line(error)
            );
        }
        Status::Gap { channels } => eprintln!(
            "sqlnotify: events may have been lost on {} while disconnected",
            channels.join(", ")
        ),
        Status::Resynced { replayed } => {
            eprintln!("sqlnotify: caught up ({replayed} events replayed)")
        }
        other => eprintln!("sqlnotify: {other:?}"),
    }
}

/// Prints a snapshot feed's events, and its progress on stderr until the snapshot is done
/// (a bar redrawn in place on a terminal, a line every few seconds otherwise, and a last line
/// once done). A closed stdout stops the command (`None` on `closed`); a failed snapshot
/// stops it too, and its error (`Some`) becomes the command's.
async fn print_feed(
    table: String,
    mut feed: sqlnotify::SnapshotFeed,
    closed: tokio::sync::mpsc::UnboundedSender<Option<Failure>>,
) {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let mut ticks = Some(tokio::time::interval(if terminal {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(5)
    }));
    loop {
        let tick = async {
            match &mut ticks {
                Some(ticks) => {
                    ticks.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = feed.next() => match event {
                Some(Ok(event)) => {
                    if print_event(&event).is_err() {
                        let _ = closed.send(None);
                        return;
                    }
                }
                Some(Err(e)) => {
                    if terminal {
                        eprintln!(); // (ends the progress bar's line)
                    }
                    let mut failure = Failure::from(e);
                    failure.message = format!("the snapshot of {table} failed: {}", failure.message);
                    let _ = closed.send(Some(failure));
                    return;
                }
                None => return,
            },
            () = tick => {
                let progress = feed.progress();
                let line = progress_line(&table, &progress);
                match (terminal, progress.done) {
                    (true, false) => eprint!("\r{line}"),
                    (true, true) => eprintln!("\r{line}"),
                    (false, _) => eprintln!("{line}"),
                }
                if progress.done {
                    ticks = None;
                }
            }
        }
        // once done, say so at the next tick without waiting the whole interval
        if feed.progress().done {
            if let Some(ticks) = &mut ticks {
                ticks.reset_immediately();
            }
        }
    }
}

/// `sqlnotify: snapshot of TABLE [#####-----] 5,000 / 10,000 rows (50%)`.
fn progress_line(table: &str, p: &sqlnotify::SnapshotProgress) -> String {
    const WIDTH: u64 = 30;
    match p.total {
        Some(total) if total > 0 => {
            let filled = (p.rows.min(total) * WIDTH / total) as usize;
            format!(
                "sqlnotify: snapshot of {table} [{}{}] {} / {} rows ({}%){}",
                "#".repeat(filled),
                "-".repeat(WIDTH as usize - filled),
                p.rows,
                total,
                p.rows.min(total) * 100 / total,
                if p.done {
                    ", done; now the changes"
                } else {
                    ""
                }
            )
        }
        _ => format!(
            "sqlnotify: snapshot of {table}: {} rows{}",
            p.rows,
            if p.done {
                ", done; now the changes"
            } else {
                ""
            }
        ),
    }
}

/// Writes one event as a JSON line and flushes it.
fn print_event(event: &ChangeEvent) -> std::io::Result<()> {
    let line = event.to_record();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// The `relay` command (feature `nats`): its arguments, `--watch TABLE:OP[:COLS]` parsing,
/// and running a [`Relay`](sqlnotify::relay::Relay) until Ctrl-C or SIGTERM.
#[cfg(feature = "nats")]
mod relay {
    use std::cell::Cell;
    use std::time::Duration;

    use actix::{Actor, Context, Handler};
    use clap::{Args, ValueEnum};

    use sqlnotify::relay::{
        Relay, RelayStats, DEFAULT_DUPLICATE_WINDOW, DEFAULT_MAX_PENDING, DEFAULT_SUBJECT_PREFIX,
    };
    use sqlnotify::{Notifier, Operation, Role, Status, StatusEvent, Tier, Watch};

    use super::{described, report_status, Failure, LockArgs, StopSignals};

    /// `sqlnotify relay`'s arguments.
    #[derive(Debug, Args)]
    pub(super) struct RelayArgs {
        /// The database URL (postgres://…, postgresql://…, sqlite://…, mysql://…, mariadb://…).
        #[arg(value_name = "DATABASE_URL")]
        url: String,
        /// The NATS server, nats://host:port.
        #[arg(long, value_name = "URL")]
        nats: String,
        /// The JetStream stream to publish into: created when missing, else checked (its
        /// subjects must cover the relay's, its duplicate window be long enough).
        #[arg(long, value_name = "NAME")]
        stream: String,
        /// The named consumer the relay reads as. Relays of the same name form a consumer
        /// group: one publishes, the others stand by and take over when it stops.
        #[arg(long, value_name = "NAME")]
        consumer: String,
        /// What to relay, as TABLE:OP[:COLS]: a table, optionally schema-qualified
        /// (shop.orders); one operation (insert, update or delete) or several joined with '+'
        /// (insert+update+delete); optionally a comma-separated list of extra columns each
        /// event carries besides the key. Repeat for more tables. Example:
        /// --watch shop.orders:insert+update:status,total --watch users:delete
        #[arg(
            long = "watch",
            required = true,
            value_name = "TABLE:OP[:COLS]",
            value_parser = parse_watch
        )]
        watches: Vec<WatchSpec>,
        /// The first subject token(s): events go to PREFIX.schema.table.operation.
        #[arg(long, value_name = "PREFIX", default_value = DEFAULT_SUBJECT_PREFIX)]
        subject_prefix: String,
        /// Append a partition number 0..N to every subject, chosen by a hash of the row's
        /// key: one worker per partition gets every change of its keys, in order.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        partitions: Option<u32>,
        /// What makes message ids unique to this database (default: the consumer's name); set
        /// one per database when several databases relay into one stream.
        #[arg(long, value_name = "SOURCE")]
        source: Option<String>,
        /// How long the stream remembers message ids to drop what is sent again: it must
        /// outlast the longest time a relay group may be down. A stream the relay creates gets
        /// this window; an existing one must have at least this.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = DEFAULT_DUPLICATE_WINDOW.as_secs(),
            value_parser = clap::value_parser!(u64).range(1..)
        )]
        duplicate_window_secs: u64,
        /// Publishes awaiting the stream's confirmation at most.
        #[arg(
            long,
            value_name = "N",
            default_value_t = DEFAULT_MAX_PENDING as u32,
            value_parser = clap::value_parser!(u32).range(1..)
        )]
        max_pending: u32,
        /// How events travel on PostgreSQL: durable (journal and NOTIFY) or poll (journal, no
        /// NOTIFY); the relay needs the journal, so not notify. SQLite and MySQL / MariaDB
        /// always use their journal.
        #[arg(long, value_enum, default_value_t = RelayTier::Durable)]
        tier: RelayTier,
        /// Seconds between the counter lines on stderr; 0 for none.
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        stats_interval: u64,
        #[command(flatten)]
        locks: LockArgs,
    }

    /// The tiers a relay can read (both journal tiers).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
    enum RelayTier {
        Durable,
        Poll,
    }

    impl From<RelayTier> for Tier {
        fn from(tier: RelayTier) -> Tier {
            match tier {
                RelayTier::Durable => Tier::Durable,
                RelayTier::Poll => Tier::Poll,
            }
        }
    }

    /// One `--watch`: a table, its operations (each once, in the order given) and the extra
    /// columns its events carry.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) struct WatchSpec {
        table: String,
        ops: Vec<Operation>,
        columns: Vec<String>,
    }

    /// What `--watch` expects, for its error messages.
    const WATCH_FORMAT: &str =
        "expected TABLE:OP[:COLS], e.g. shop.orders:insert+update:status,total";

    /// Parses `TABLE:OP[+OP…][:COL,…]`; an error names the part that is wrong.
    fn parse_watch(text: &str) -> Result<WatchSpec, String> {
        if text.is_empty() {
            return Err(format!("it is empty ({WATCH_FORMAT})"));
        }
        let parts: Vec<&str> = text.split(':').collect();
        let (table, ops, columns) = match parts[..] {
            [table, ops] => (table, ops, None),
            [table, ops, columns] => (table, ops, Some(columns)),
            [table] => {
                return Err(format!(
                    "no operation after the table {table:?} ({WATCH_FORMAT})"
                ))
            }
            _ => {
                return Err(format!(
                    "{} ':'-separated parts, at most 3 ({WATCH_FORMAT})",
                    parts.len()
                ))
            }
        };
        if table.is_empty() {
            return Err(format!(
                "the table before the first ':' is empty ({WATCH_FORMAT})"
            ));
        }
        if table.split('.').any(str::is_empty) {
            return Err(format!(
                "the table {table:?} has an empty schema or table name (schema-qualify it as \
                 schema.table)"
            ));
        }
        let mut operations = Vec::new();
        for op in ops.split('+') {
            let operation = match op.to_ascii_lowercase().as_str() {
                "insert" => Operation::Insert,
                "update" => Operation::Update,
                "delete" => Operation::Delete,
                _ if op.contains(',') => {
                    return Err(format!(
                        "operations {op:?}: join several with '+', not ',' (e.g. insert+update)"
                    ))
                }
                "" => {
                    return Err(format!(
                        "an empty operation in {ops:?} (OP is insert, update or delete; join \
                         several with '+', e.g. insert+update)"
                    ))
                }
                _ => {
                    return Err(format!(
                        "unknown operation {op:?} (OP is insert, update or delete; join several \
                         with '+', e.g. insert+update)"
                    ))
                }
            };
            if !operations.contains(&operation) {
                operations.push(operation);
            }
        }
        let columns: Vec<String> = match columns {
            None => Vec::new(),
            Some("") => {
                return Err(format!(
                    "no columns after the second ':' (leave out ':COLS' for none; {WATCH_FORMAT})"
                ))
            }
            Some(columns) => {
                if columns.split(',').any(str::is_empty) {
                    return Err(format!(
                        "an empty column name in {columns:?} (COLS is a comma-separated list)"
                    ));
                }
                columns.split(',').map(str::to_string).collect()
            }
        };
        Ok(WatchSpec {
            table: table.to_string(),
            ops: operations,
            columns,
        })
    }

    /// One watch per `--watch` table and operation, with the table and operation it watches.
    fn watches(specs: &[WatchSpec], tier: Tier) -> Vec<(String, Operation, Watch)> {
        let mut watches = Vec::new();
        for spec in specs {
            for &op in &spec.ops {
                let watch = Watch::new(spec.table.clone(), op)
                    .extra_columns(spec.columns.iter().cloned())
                    .tier(tier);
                watches.push((spec.table.clone(), op, watch));
            }
        }
        watches
    }

    /// Prints on stderr when the relay becomes active or stands by, and (through
    /// [`report_status`]) connection trouble.
    struct StatusPrinter {
        consumer: String,
        stream: String,
        disconnected: Cell<bool>,
    }

    impl Actor for StatusPrinter {
        type Context = Context<Self>;
    }

    impl Handler<StatusEvent> for StatusPrinter {
        type Result = ();

        fn handle(&mut self, event: StatusEvent, _: &mut Context<Self>) {
            let consumer = &self.consumer;
            match &event.status {
                Status::Active => eprintln!(
                    "sqlnotify: active: this relay publishes consumer {consumer:?}'s events \
                     into stream {}",
                    self.stream
                ),
                Status::Standby => eprintln!(
                    "sqlnotify: standby: another relay of consumer {consumer:?} is active; \
                     this one takes over when it stops"
                ),
                Status::LostLease => eprintln!(
                    "sqlnotify: another relay of consumer {consumer:?} took over while this one \
                     was disconnected"
                ),
                other => report_status(other, &self.disconnected),
            }
        }
    }

    /// The group role as the stats line shows it.
    fn role_name(role: Role) -> &'static str {
        match role {
            Role::Active => "active",
            Role::Standby => "standby",
            Role::Starting => "starting",
            _ => "independent",
        }
    }

    /// "published 7, duplicates 0, pending 0".
    fn counts(stats: &RelayStats) -> String {
        format!(
            "published {}, duplicates {}, pending {}",
            stats.published, stats.duplicates, stats.pending
        )
    }

    /// The periodic stats line (without the `sqlnotify: ` prefix).
    fn stats_line(role: Role, stats: &RelayStats) -> String {
        format!(
            "stats: {}; {}; NATS {}",
            role_name(role),
            counts(stats),
            if stats.connected {
                "connected"
            } else {
                "not connected"
            }
        )
    }

    /// Waits for the next tick, or forever without one.
    async fn next_tick(ticks: &mut Option<tokio::time::Interval>) {
        match ticks {
            Some(ticks) => {
                ticks.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Runs the relay until Ctrl-C or SIGTERM, then stops it gracefully.
    pub(super) async fn run(args: RelayArgs) -> Result<(), Failure> {
        let watches = watches(&args.watches, args.tier.into());
        let printer = StatusPrinter {
            consumer: args.consumer.clone(),
            stream: args.stream.clone(),
            disconnected: Cell::new(false),
        }
        .start();
        let mut notifier = Notifier::builder(args.url.clone())
            .consumer(args.consumer.clone())
            .install_timeout(args.locks.timeout()?)
            .subscribe_status(printer.recipient());
        for (_, _, watch) in &watches {
            notifier = notifier.watch(watch.clone());
        }
        eprintln!(
            "sqlnotify: installing triggers for {} in the {} database …",
            described(&watches),
            notifier.dialect_name()?
        );
        let mut builder = Relay::builder(notifier, args.nats.clone(), args.stream.clone())
            .subject_prefix(args.subject_prefix.clone())
            .duplicate_window(Duration::from_secs(args.duplicate_window_secs))
            .max_pending(args.max_pending as usize);
        if let Some(n) = args.partitions {
            builder = builder.partitions(n);
        }
        if let Some(source) = &args.source {
            builder = builder.source(source.clone());
        }
        let relay = builder.start().await?;

        let mut signals = StopSignals::listen();
        eprintln!(
            "sqlnotify: relaying {} on {} as consumer {:?} into stream {} (subjects {}.>); \
             Ctrl-C to stop",
            described(&watches),
            relay.notifier().dialect_name(),
            args.consumer,
            args.stream,
            args.subject_prefix
        );
        let mut ticks = (args.stats_interval > 0).then(|| {
            let every = Duration::from_secs(args.stats_interval);
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        let reason = {
            let stop = signals.requested();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    reason = &mut stop => break reason,
                    _ = next_tick(&mut ticks) => {
                        let role = relay.notifier().stats().await.map_or(Role::Starting, |s| s.role);
                        eprintln!("sqlnotify: {}", stats_line(role, &relay.stats()));
                    }
                }
            }
        };
        eprintln!("sqlnotify: {reason}; stopping (the publishes in flight are confirmed first) …");
        let stopped = relay.stop().await;
        let stats = relay.stats();
        if stats.pending > 0 {
            eprintln!(
                "sqlnotify: stopped; {}: the next relay of consumer {:?} sends the pending ones",
                counts(&stats),
                args.consumer
            );
        } else {
            eprintln!("sqlnotify: stopped; {}", counts(&stats));
        }
        Ok(stopped?)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use sqlnotify::Operation::{Delete, Insert, Update};

        fn spec(table: &str, ops: &[Operation], columns: &[&str]) -> WatchSpec {
            WatchSpec {
                table: table.into(),
                ops: ops.to_vec(),
                columns: columns.iter().map(|c| c.to_string()).collect(),
            }
        }

        #[test]
        fn a_watch_is_a_table_its_operations_and_columns() {
            assert_eq!(
                parse_watch("orders:insert"),
                Ok(spec("orders", &[Insert], &[]))
            );
            assert_eq!(
                parse_watch("shop.orders:insert+update:status,total"),
                Ok(spec("shop.orders", &[Insert, Update], &["status", "total"]))
            );
            assert_eq!(
                parse_watch("t:DELETE+update+delete:v"),
                Ok(spec("t", &[Delete, Update], &["v"])),
                "case-insensitive, each operation once in the order given"
            );
            assert_eq!(
                parse_watch("t:insert+update+delete"),
                Ok(spec("t", &[Insert, Update, Delete], &[]))
            );
        }

        #[test]
        fn a_bad_watch_names_the_bad_part() {
            let cases = [
                ("", "it is empty"),
                ("orders", "no operation after the table \"orders\""),
                (":insert", "the table before the first ':' is empty"),
                (
                    "shop.:insert",
                    "\"shop.\" has an empty schema or table name",
                ),
                ("orders:upsert", "unknown operation \"upsert\""),
                ("orders:insert+upsert:a", "unknown operation \"upsert\""),
                ("orders:", "an empty operation in \"\""),
                ("orders:insert+", "an empty operation in \"insert+\""),
                (
                    "orders:insert,update",
                    "operations \"insert,update\": join several with '+', not ','",
                ),
                ("orders:insert:", "no columns after the second ':'"),
                ("orders:insert:a,,b", "an empty column name in \"a,,b\""),
                ("orders:insert:a:b", "4 ':'-separated parts, at most 3"),
            ];
            for (text, expected) in cases {
                let error = parse_watch(text).expect_err(text);
                assert!(
                    error.contains(expected),
                    "{text:?}: {error:?} lacks {expected:?}"
                );
            }
        }

        #[test]
        fn every_table_and_operation_becomes_a_watch_on_the_tier() {
            let specs = [
                spec("shop.orders", &[Insert, Update], &["status"]),
                spec("users", &[Delete], &[]),
            ];
            let watches = watches(&specs, Tier::Poll);
            assert_eq!(
                described(&watches),
                "shop.orders INSERT, shop.orders UPDATE, users DELETE"
            );
            assert_eq!(
                watches[1].2,
                Watch::new("shop.orders", Update)
                    .extra_columns(["status"])
                    .tier(Tier::Poll)
            );
        }

        #[test]
        fn the_stats_line_shows_role_counters_and_connection() {
            let mut stats = RelayStats::default();
            stats.published = 7;
            stats.duplicates = 1;
            stats.pending = 2;
            stats.connected = true;
            assert_eq!(
                stats_line(Role::Active, &stats),
                "stats: active; published 7, duplicates 1, pending 2; NATS connected"
            );
            stats.connected = false;
            assert_eq!(
                stats_line(Role::Standby, &stats),
                "stats: standby; published 7, duplicates 1, pending 2; NATS not connected"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_shown_in_their_largest_whole_unit() {
        let d = Duration::from_secs;
        assert_eq!(short_duration(d(0)), "0s");
        assert_eq!(short_duration(d(59)), "59s");
        assert_eq!(short_duration(d(60)), "1m");
        assert_eq!(short_duration(d(3_599)), "59m");
        assert_eq!(short_duration(d(7_200)), "2h");
        assert_eq!(short_duration(d(3 * 86_400 + 5)), "3d");
    }

    #[test]
    fn a_missing_action_names_the_choices_of_its_command() {
        assert!(missing_command(None).starts_with("a command is required: tail, install-sql"));
        assert!(missing_command(Some("--verbose")).contains("dead-letters"));
        assert_eq!(
            missing_command(Some("consumers")),
            "consumers needs an action: list or drop (see 'sqlnotify consumers --help')"
        );
        assert!(missing_command(Some("dead-letters"))
            .starts_with("dead-letters needs an action: list, show, retry or drop"));
    }

    fn letter() -> Letter {
        let at = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        Letter {
            id: 17,
            handler: "billing".into(),
            channel: "sqlnotify_public_orders_insert".into(),
            sequence: Some(1234),
            part: 2,
            key: "[42]".into(),
            event: r#"{"channel":"sqlnotify_public_orders_insert","id":42,"columns":{"total":3}}"#
                .into(),
            attempts: 5,
            first_failed: at(1_714_564_800) + Duration::from_micros(500_000),
            last_failed: at(1_714_565_100),
            error: "payment gateway said no:\n  502 Bad Gateway".into(),
            state: sqlnotify::DeadLetterState::Dead,
        }
    }

    #[test]
    fn times_are_rfc3339_in_utc_with_microseconds() {
        let at = |secs: u64, micros: u64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
        };
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(at(1_714_564_800, 500_000)),
            "2024-05-01T12:00:00.500000Z"
        );
        assert_eq!(rfc3339(at(951_782_400, 1)), "2000-02-29T00:00:00.000001Z");
        assert_eq!(
            rfc3339(at(4_102_444_799, 999_999)),
            "2099-12-31T23:59:59.999999Z"
        );
        let before = SystemTime::UNIX_EPOCH - Duration::from_micros(1);
        assert_eq!(rfc3339(before), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn the_list_shows_one_line_per_dead_letter_with_the_error_shortened() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_568_400);
        assert_eq!(
            dead_letter_table(&[], now),
            "ID  HANDLER  STATE  ATTEMPTS  FIRST FAILED  LAST FAILED  CHANNEL  KEY  ERROR\n"
        );
        let mut long = letter();
        long.id = 18;
        long.error = "x".repeat(100);
        let table = dead_letter_table(&[letter(), long], now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let first: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            first,
            [
                "17",
                "billing",
                "dead",
                "5",
                "59m",
                "ago",
                "55m",
                "ago",
                "sqlnotify_public_orders_insert",
                "[42]",
                "payment",
                "gateway",
                "said",
                "no:",
                "502",
                "Bad",
                "Gateway"
            ]
        );
        assert!(
            lines[2].ends_with(&format!("{}…", "x".repeat(79))),
            "{table}"
        );
    }

    #[test]
    fn json_lines_carry_every_field_and_the_event_as_json() {
        let line = dead_letter_json(&letter());
        assert_eq!(
            line,
            json!({
                "id": 17,
                "handler": "billing",
                "state": "dead",
                "attempts": 5,
                "first_failed": "2024-05-01T12:00:00.500000Z",
                "last_failed": "2024-05-01T12:05:00.000000Z",
                "channel": "sqlnotify_public_orders_insert",
                "sequence": 1234,
                "part": 2,
                "key": [42],
                "event": {"channel": "sqlnotify_public_orders_insert", "id": 42, "columns": {"total": 3}},
                "error": "payment gateway said no:\n  502 Bad Gateway",
            })
        );
        let mut odd = letter();
        odd.event = "not json".into();
        odd.sequence = None;
        let line = dead_letter_json(&odd);
        assert_eq!(
            (&line["event"], &line["sequence"]),
            (&json!("not json"), &Value::Null)
        );
    }

    #[test]
    fn show_prints_every_field_and_the_error_and_event_whole() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_568_400);
        assert_eq!(
            dead_letter_details(&letter(), now),
            "id:           17
handler:      billing
state:        dead
attempts:     5
first failed: 2024-05-01T12:00:00.500000Z (59m ago)
last failed:  2024-05-01T12:05:00.000000Z (55m ago)
channel:      sqlnotify_public_orders_insert
sequence:     1234
part:         2
key:          [42]
error:        payment gateway said no:
                502 Bad Gateway
event:        {
                \"channel\": \"sqlnotify_public_orders_insert\",
                \"columns\": {
                  \"total\": 3
                },
                \"id\": 42
              }
"
        );
    }

    #[test]
    fn retry_and_drop_say_how_many_ids_were_not_dead_letters() {
        let which = |ids: &[i64], handler: Option<&str>| WhichDeadLetters {
            ids: ids.to_vec(),
            handler: handler.map(str::to_string),
        };
        assert_eq!(not_dead(&which(&[1, 2], None), 2), "");
        assert_eq!(
            not_dead(&which(&[1, 2, 2, 3], None), 1),
            "; 2 of the 3 id(s) given are not dead letters (unknown, still being retried, or \
             already requested)"
        );
        assert_eq!(not_dead(&which(&[], Some("billing")), 0), "");
    }

    #[test]
    fn an_empty_list_is_just_the_header() {
        assert_eq!(
            consumer_table(&[], SystemTime::now()),
            "NAME  STATE  POSITION  BACKLOG  LAST ACTIVE  EXPIRY  CHANNELS\n"
        );
    }
}
