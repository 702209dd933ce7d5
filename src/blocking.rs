//! A blocking front end for code that is not async: the same [`NotifierBuilder`] and watches,
//! with the actix system running on a thread of its own and events arriving on bounded
//! [`crossbeam_channel`] receivers.
//!
//! [`Notifier::start`] spawns a thread (named `sqlnotify`), runs an actix [`System`] on it,
//! starts the async [`crate::Notifier`] there and returns once it is listening — so a row
//! committed after `start` returns is delivered. Every other method sends a command to that
//! thread and waits for its answer; nothing polls. [`Notifier::stop`] (or dropping the handle)
//! stops the notifier and joins the thread.
//!
//! Nothing here needs an async runtime on the calling thread, and nothing here may be called
//! from inside the notifier's own thread (a subscriber closure of the async API): those calls
//! would wait for themselves.
//!
//! ```
//! use std::time::Duration;
//! use sqlnotify::{blocking, Notifier, Operation, Subscription, Watch};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("sqlnotify-doc-blocking-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("app.db");
//! let app = rusqlite::Connection::open(&path)?;
//! app.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL)")?;
//!
//! let notifier = blocking::Notifier::start(
//!     Notifier::builder(format!("sqlite://{}", path.display()))
//!         .watch(Watch::new("users", Operation::Insert).extra_columns(["email"])),
//! )?;
//! let (_id, events) = notifier.subscribe(Subscription::new("users", Operation::Insert))?;
//!
//! app.execute("INSERT INTO users (email) VALUES ('ann@example.com')", [])?;
//! let event = events.recv_timeout(Duration::from_secs(10))?;
//! assert_eq!(event.get("email").unwrap(), "ann@example.com");
//!
//! notifier.stop()?; // joins the thread; `events` is disconnected once drained
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Mutex;
use std::thread::JoinHandle;

use actix::System;
use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::builder::NotifierBuilder;
use crate::custom::CustomEvent;
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Channel};
use crate::operation::Operation;
use crate::stats::Stats;
use crate::status::StatusEvent;
use crate::subscription::{Subscription, SubscriptionId};

/// Where the notifier's thread sends one answer (a one-shot channel: capacity 1, so the
/// notifier's thread never waits for the caller).
type Reply<T> = Sender<Result<T>>;

/// What a handle asks the notifier's thread to do.
enum Command {
    Subscribe(Subscription, Reply<(SubscriptionId, Receiver<ChangeEvent>)>),
    SubscribeStatus(Reply<Receiver<StatusEvent>>),
    Unsubscribe(SubscriptionId, Reply<()>),
    Notify(CustomEvent, Reply<()>),
    Stats(Reply<Stats>),
    Stop(Reply<()>),
}

/// A running notifier driven from blocking code. `Send + Sync`: share it (in an `Arc`) between
/// threads as you like.
///
/// Made by [`Notifier::start`]. See the [module documentation](self) for an example.
pub struct Notifier {
    commands: mpsc::UnboundedSender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    dialect: &'static str,
    channels: Vec<Channel>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("blocking::Notifier")
            .field("dialect", &self.dialect)
            .field(
                "channels",
                &self.channels.iter().map(|c| c.name()).collect::<Vec<_>>(),
            )
            .field("running", &self.is_running())
            .finish()
    }
}

impl Notifier {
    /// Starts the notifier `builder` describes on a thread of its own and returns once it is
    /// listening. Fails with the error [`NotifierBuilder::start`] would return (the thread is
    /// then already gone).
    ///
    /// ```no_run
    /// use sqlnotify::{blocking, Notifier, Operation, Watch};
    ///
    /// let notifier = blocking::Notifier::start(
    ///     Notifier::builder("postgres://postgres@127.0.0.1/app")
    ///         .watch(Watch::new("users", Operation::Insert).extra_columns(["email"])),
    /// )?;
    /// # notifier.stop()?;
    /// # Ok::<(), sqlnotify::Error>(())
    /// ```
    pub fn start(builder: NotifierBuilder) -> Result<Notifier> {
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("sqlnotify".into())
            .spawn(move || run(builder, ready_tx, command_rx))
            .map_err(|e| Error::db("spawning the sqlnotify thread", e))?;
        match ready_rx.recv() {
            Ok(Ok((dialect, channels))) => Ok(Notifier {
                commands,
                thread: Mutex::new(Some(thread)),
                dialect,
                channels,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            // The thread ended without a word: it panicked.
            Err(_) => {
                let _ = thread.join();
                Err(Error::NotRunning)
            }
        }
    }

    /// The database's dialect: `"postgresql"`, `"sqlite"` (or `"mysql"`).
    ///
    /// ```no_run
    /// # fn run(notifier: &sqlnotify::blocking::Notifier) {
    /// println!("watching {} on {}", notifier.channels().len(), notifier.dialect_name());
    /// # }
    /// ```
    pub fn dialect_name(&self) -> &'static str {
        self.dialect
    }

    /// The watched channels, sorted by name.
    ///
    /// ```no_run
    /// # fn run(notifier: &sqlnotify::blocking::Notifier) {
    /// for channel in notifier.channels() {
    ///     println!("{}: {}.{} {}", channel.name(), channel.schema(), channel.table(), channel.operation());
    /// }
    /// # }
    /// ```
    pub fn channels(&self) -> &[Channel] {
        &self.channels
    }

    /// Delivers the events `subscription` selects into a bounded channel whose capacity is
    /// the subscription's [`buffer`](Subscription::buffer). When the receiver falls behind,
    /// events wait in the subscription's buffer under its
    /// [`OverflowPolicy`](crate::OverflowPolicy), exactly as for an actor subscriber:
    /// [`Wait`](crate::OverflowPolicy::Wait) (the default) eventually pauses the whole
    /// notifier, [`DropOldest`](crate::OverflowPolicy::DropOldest) never slows anyone down.
    ///
    /// The receiver is disconnected (after handing out what it holds) once the subscription is
    /// removed or the notifier stops; dropping it removes the subscription at its next event.
    ///
    /// ```no_run
    /// # fn run(notifier: &sqlnotify::blocking::Notifier) -> sqlnotify::Result<()> {
    /// use sqlnotify::{Filter, OverflowPolicy, Operation, Subscription};
    ///
    /// let (id, events) = notifier.subscribe(
    ///     Subscription::new("users", Operation::Update)
    ///         .filter(Filter::eq("id", 42))
    ///         .policy(OverflowPolicy::DropOldest)
    ///         .buffer(100),
    /// )?;
    /// for event in events.iter().take(3) {
    ///     println!("user 42 changed: {}", event.to_json());
    /// }
    /// notifier.unsubscribe(id)?;
    /// # Ok(()) }
    /// ```
    pub fn subscribe(
        &self,
        subscription: Subscription,
    ) -> Result<(SubscriptionId, Receiver<ChangeEvent>)> {
        self.call(|reply| Command::Subscribe(subscription, reply))
    }

    /// Delivers every [`StatusEvent`] (connected, disconnected, gap, lagged …) into an
    /// unbounded channel: status messages are few, and none may be lost (a
    /// [`Gap`](crate::Status::Gap) means cached state is stale).
    ///
    /// ```no_run
    /// # fn run(notifier: &sqlnotify::blocking::Notifier) -> sqlnotify::Result<()> {
    /// let status = notifier.subscribe_status()?;
    /// std::thread::spawn(move || {
    ///     for s in status {
    ///         eprintln!("sqlnotify: {:?}", s.status);
    ///     }
    /// });
    /// # Ok(()) }
    /// ```
    pub fn subscribe_status(&self) -> Result<Receiver<StatusEvent>> {
        self.call(Command::SubscribeStatus)
    }

    /// Removes a subscription: its receiver gets no further event and is then disconnected.
    ///
    /// ```no_run
    /// # fn run(notifier: &sqlnotify::blocking::Notifier) -> sqlnotify::Result<()> {
    /// # use sqlnotify::{Operation, Subscription};
    /// let (id, events) = notifier.subscribe(Subscription::new("users", Operation::Delete))?;
    /// // …
    /// notifier.unsubscribe(id)?;
    /// for event in events.iter() {
    ///     // what was already queued; the loop then ends
    ///     println!("{}", event.to_json());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn unsubscribe(&self, id: SubscriptionId) -> Result<()> {
        self.call(|reply| Command::Unsubscribe(id, reply))
    }

    /// Sends a custom event on the channel of the watch of `operation` on `table`; see
    /// [`crate::Notifier::notify_with`].
    ///
    /// ```no_run
    /// # fn run(notifier: &sqlnotify::blocking::Notifier) -> sqlnotify::Result<()> {
    /// use serde_json::json;
    /// use sqlnotify::Operation;
    ///
    /// notifier.notify("users", Operation::Insert, json!({"id": 7, "email": "x@example.com"}))?;
    /// # Ok(()) }
    /// ```
    pub fn notify(&self, table: &str, operation: Operation, payload: Value) -> Result<()> {
        self.notify_with(CustomEvent::new(table, operation, payload))
    }

    /// Sends a custom event; returns once the database has accepted it. See
    /// [`crate::Notifier::notify_with`].
    ///
    /// ```no_run
    /// # fn run(notifier: &sqlnotify::blocking::Notifier) -> sqlnotify::Result<()> {
    /// use serde_json::json;
    /// use sqlnotify::{CustomEvent, Operation};
    ///
    /// notifier.notify_with(
    ///     CustomEvent::new("users", Operation::Insert, json!({"id": 7}))
    ///         .channel_label("new_registrations")
    ///         .allow_overflow(false),
    /// )?;
    /// # Ok(()) }
    /// ```
    pub fn notify_with(&self, event: CustomEvent) -> Result<()> {
        self.call(|reply| Command::Notify(event, reply))
    }

    /// The pipeline's counters.
    ///
    /// ```no_run
    /// # fn run(notifier: &sqlnotify::blocking::Notifier) -> sqlnotify::Result<()> {
    /// let stats = notifier.stats()?;
    /// println!("{} received, {} dropped by slow subscribers", stats.received, stats.dropped);
    /// # Ok(()) }
    /// ```
    pub fn stats(&self) -> Result<Stats> {
        self.call(Command::Stats)
    }

    /// Whether [`stop`](Self::stop) has not been called yet (and the handle not dropped).
    ///
    /// ```no_run
    /// # fn run(notifier: sqlnotify::blocking::Notifier) -> sqlnotify::Result<()> {
    /// assert!(notifier.is_running());
    /// notifier.stop()?;
    /// assert!(!notifier.is_running());
    /// # Ok(()) }
    /// ```
    pub fn is_running(&self) -> bool {
        self.thread.lock().map(|t| t.is_some()).unwrap_or(false)
    }

    /// Stops the notifier like [`crate::Notifier::stop`] (delivers what was received, honours
    /// `cleanup_on_stop`, closes the connections), then ends and joins its thread. Every
    /// subscription's receiver is disconnected once it has handed out what it holds. A second
    /// call returns [`Error::NotRunning`].
    ///
    /// ```no_run
    /// # fn run(notifier: sqlnotify::blocking::Notifier) -> sqlnotify::Result<()> {
    /// notifier.stop()?;
    /// assert!(matches!(notifier.stop(), Err(sqlnotify::Error::NotRunning)));
    /// # Ok(()) }
    /// ```
    pub fn stop(&self) -> Result<()> {
        let thread = self
            .thread
            .lock()
            .map_err(|_| Error::NotRunning)?
            .take()
            .ok_or(Error::NotRunning)?;
        if is_current(&thread) {
            // Called from one of the notifier's own tasks: it cannot wait for itself. The
            // thread stops (and ends) once this task has returned.
            let (reply, _) = crossbeam_channel::bounded(1);
            return self
                .commands
                .send(Command::Stop(reply))
                .map_err(|_| Error::NotRunning);
        }
        let result = self.call(Command::Stop);
        join(thread);
        result
    }

    /// Sends a command and waits for its answer. A thread that is gone (stopped, or panicked)
    /// drops the command or its reply channel: that is [`Error::NotRunning`].
    fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.commands
            .send(command(reply))
            .map_err(|_| Error::NotRunning)?;
        answer.recv().map_err(|_| Error::NotRunning)?
    }
}

impl Drop for Notifier {
    /// Stops the notifier and joins its thread, as [`stop`](Notifier::stop) would, ignoring
    /// errors.
    fn drop(&mut self) {
        let thread = match self.thread.get_mut() {
            Ok(thread) => thread.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(thread) = thread else { return };
        if is_current(&thread) {
            // Dropped inside one of the notifier's own tasks: ask it to stop, do not wait.
            let (reply, _) = crossbeam_channel::bounded(1);
            let _ = self.commands.send(Command::Stop(reply));
            return;
        }
        let _ = self.call(Command::Stop);
        join(thread);
    }
}

/// Whether this is the notifier's own thread.
fn is_current(thread: &JoinHandle<()>) -> bool {
    thread.thread().id() == std::thread::current().id()
}

/// Joins the notifier's thread.
fn join(thread: JoinHandle<()>) {
    if thread.join().is_err() {
        log::error!("sqlnotify: the notifier thread panicked");
    }
}

/// The notifier's thread: start, report, then serve commands until stopped (or until every
/// handle is gone).
fn run(
    builder: NotifierBuilder,
    ready: Sender<Result<(&'static str, Vec<Channel>)>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    System::new().block_on(async move {
        let notifier = match builder.start().await {
            Ok(notifier) => notifier,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok((notifier.dialect_name(), notifier.channels())));
        let mut stop_reply = None;
        while let Some(command) = commands.recv().await {
            let notifier = notifier.clone();
            match command {
                Command::Stop(reply) => {
                    stop_reply = Some(reply);
                    break;
                }
                // Each command runs as a task of its own, so a slow one (a notify waiting for
                // a lock) does not hold up the others.
                Command::Subscribe(subscription, reply) => spawn(reply, async move {
                    notifier.subscribe_channel(subscription).await
                }),
                Command::SubscribeStatus(reply) => spawn(reply, async move {
                    let (tx, rx) = crossbeam_channel::unbounded();
                    notifier
                        .subscribe_status_fn(move |status| {
                            let _ = tx.send(status);
                        })
                        .await?;
                    Ok(rx)
                }),
                Command::Unsubscribe(id, reply) => {
                    spawn(reply, async move { notifier.unsubscribe(id).await })
                }
                Command::Notify(event, reply) => {
                    spawn(reply, async move { notifier.notify_with(event).await })
                }
                Command::Stats(reply) => spawn(reply, async move { notifier.stats().await }),
            }
        }
        // Stopped, or every handle is gone: stop either way.
        let result = notifier.stop().await;
        if let Some(reply) = stop_reply {
            let _ = reply.send(result);
        } else if let Err(e) = result {
            log::warn!("sqlnotify: stopping the notifier: {e}");
        }
    });
    // The system (and every actor and channel sender in it) is dropped here, before the
    // thread ends: once `stop()` has joined, every receiver sees the disconnect.
}

/// Runs `task` on the notifier's thread and sends its result back.
fn spawn<T: 'static>(reply: Reply<T>, task: impl Future<Output = Result<T>> + 'static) {
    actix::spawn(async move {
        let _ = reply.send(task.await);
    });
}

/// Runs `f` (given a future-returning closure) to completion in an actix system on a thread of
/// its own, for the builder's one-off async calls.
fn run_once<T, Fut>(f: impl FnOnce() -> Fut + Send + 'static) -> Result<T>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T>> + 'static,
{
    std::thread::Builder::new()
        .name("sqlnotify".into())
        .spawn(move || System::new().block_on(f()))
        .map_err(|e| Error::db("spawning the sqlnotify thread", e))?
        .join()
        .map_err(|_| Error::NotRunning)?
}

/// The DDL `builder` would install, like [`NotifierBuilder::install_sql`], without an async
/// runtime.
///
/// ```no_run
/// use sqlnotify::{blocking, Notifier, Operation, Watch};
///
/// let sql = blocking::install_sql(
///     &Notifier::builder("postgres://postgres@127.0.0.1/app")
///         .watch(Watch::new("users", Operation::Insert)),
/// )?;
/// std::fs::write("migrations/0042_sqlnotify.sql", sql).unwrap();
/// # Ok::<(), sqlnotify::Error>(())
/// ```
pub fn install_sql(builder: &NotifierBuilder) -> Result<String> {
    let builder = builder.clone();
    run_once(move || async move { builder.install_sql().await })
}

/// Removes every sqlnotify object from the database, like [`NotifierBuilder::cleanup`],
/// without an async runtime. Returns how many watches were removed.
///
/// ```no_run
/// use sqlnotify::{blocking, Notifier};
///
/// let removed = blocking::cleanup(&Notifier::builder("sqlite://app.db"))?;
/// println!("removed {removed} watches");
/// # Ok::<(), sqlnotify::Error>(())
/// ```
pub fn cleanup(builder: &NotifierBuilder) -> Result<u64> {
    let builder = builder.clone();
    run_once(move || async move { builder.cleanup().await })
}
