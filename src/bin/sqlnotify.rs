//! The `sqlnotify` command-line tool (feature `cli`): tail a table's changes in PostgreSQL,
//! SQLite or MySQL / MariaDB as JSON lines, print the DDL for your migrations, or remove every
//! sqlnotify watch from a database.
//!
//! ```text
//! sqlnotify tail sqlite://app.db --table users --op insert,update --columns email
//! sqlnotify install-sql postgres://postgres@127.0.0.1/app --table users --op insert
//! sqlnotify cleanup mysql://root@127.0.0.1:3306/app
//! sqlnotify cleanup postgres://postgres@127.0.0.1/app
//! sqlnotify consumers list sqlite://app.db
//! sqlnotify consumers drop sqlite://app.db billing
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

use sqlnotify::ConsumerInfo;
use sqlnotify::{Capture, Tier, Watch};
use sqlnotify::{ChangeEvent, Notifier, NotifierBuilder, Operation, Status, Subscription};

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
    /// Example: sqlnotify tail sqlite://app.db --table users --op insert,update --columns email
    Tail {
        #[command(flatten)]
        watch: WatchArgs,
        /// On exit (Ctrl-C or SIGTERM), remove the triggers this command installed.
        #[arg(long)]
        cleanup_on_exit: bool,
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
    /// sqlnotify's tables (journal, overflow, consumers, catalog) and their rows are kept.
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
    /// Send events on channel sqlnotify_<LABEL> (only with one --table and one --op).
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
        eprintln!(
            "sqlnotify: error: a command is required: tail, install-sql or cleanup \
             (see 'sqlnotify --help')"
        );
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

/// Multi-line driver messages (DETAIL, HINT …) folded into one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Tail {
            watch,
            cleanup_on_exit,
            locks,
        } => tail(&watch, cleanup_on_exit, &locks).await,
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
            let removed = builder.cleanup().await?;
            eprintln!("sqlnotify: removed {removed} watch(es)");
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
    }
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
    let widths: Vec<usize> = (0..7)
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

async fn tail(args: &WatchArgs, cleanup_on_exit: bool, locks: &LockArgs) -> Result<(), Failure> {
    let watches = watches(args)?;
    let builder = builder(args)?
        .cleanup_on_stop(cleanup_on_exit)
        .install_timeout(locks.timeout()?);
    eprintln!(
        "sqlnotify: installing triggers for {} in the {} database …",
        described(&watches),
        builder.dialect_name()?
    );
    let notifier = builder.start().await?;

    // stdout closed (`| head`): stop as if interrupted.
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for (table, op, _) in &watches {
        let mut subscription = Subscription::new(table.clone(), *op);
        if let Some(label) = &args.label {
            subscription = subscription.channel_label(label.clone());
        }
        let closed_tx = closed_tx.clone();
        let subscribed = notifier
            .subscribe_fn(subscription, move |event| {
                if print_event(&event).is_err() {
                    let _ = closed_tx.send(());
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
    eprintln!(
        "sqlnotify: tailing {} on {}: listening on {}; waiting for changes (Ctrl-C to stop)",
        described(&watches),
        notifier.dialect_name(),
        channels.join(", ")
    );

    let reason = tokio::select! {
        r = actix_rt::signal::ctrl_c() => match r {
            Ok(()) => "interrupted",
            Err(_) => "signal handling failed",
        },
        _ = terminated() => "terminated",
        _ = closed_rx.recv() => "stdout closed",
    };
    if cleanup_on_exit {
        eprintln!("sqlnotify: {reason}; stopping and removing the triggers …");
    } else {
        eprintln!("sqlnotify: {reason}; stopping …");
    }
    notifier.stop().await?;
    if cleanup_on_exit {
        eprintln!("sqlnotify: removed the triggers");
    }
    Ok(())
}

/// Resolves on SIGTERM (never elsewhere).
async fn terminated() {
    #[cfg(unix)]
    {
        use actix_rt::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            term.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await
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

/// Writes one event as a JSON line and flushes it.
fn print_event(event: &ChangeEvent) -> std::io::Result<()> {
    let line = event.to_record();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// The event as one JSON object, fields in a fixed order.
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
    fn an_empty_list_is_just_the_header() {
        assert_eq!(
            consumer_table(&[], SystemTime::now()),
            "NAME  STATE  POSITION  BACKLOG  LAST ACTIVE  EXPIRY  CHANNELS\n"
        );
    }
}
