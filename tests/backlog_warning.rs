//! A named consumer's backlog past `backlog_warning` is logged once, not once per count (a
//! binary of its own: it installs a logger that records what sqlnotify logs).

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::sqlite_file::SqliteFile;
use common::{wait_until, Events};
use sqlnotify::{Notifier, Operation, Subscription, Watch};

/// Every warning sqlnotify logged.
static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Recorder;

impl log::Log for Recorder {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) && record.target().starts_with("sqlnotify") {
            WARNINGS.lock().unwrap().push(record.args().to_string());
        }
    }

    fn flush(&self) {}
}

fn backlog_warnings() -> Vec<String> {
    WARNINGS
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.contains("journal rows not yet handed"))
        .cloned()
        .collect()
}

#[actix_rt::test]
async fn a_backlog_past_the_threshold_is_logged_once_while_it_stays_there() {
    log::set_logger(&Recorder).expect("the only logger of this binary");
    log::set_max_level(log::LevelFilter::Warn);
    let db = SqliteFile::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    // no subscription: the consumer reads nothing, so every row is backlog
    let notifier = Notifier::builder(db.url())
        .watch(Watch::new("t", Operation::Insert))
        .consumer("c")
        .backlog_warning(5)
        .start()
        .await
        .unwrap();
    let backlog_is = |n: u64| {
        let notifier = notifier.clone();
        move || {
            let notifier = notifier.clone();
            async move { notifier.stats().await.unwrap().backlog == n }
        }
    };
    db.exec("INSERT INTO t VALUES (1), (2), (3), (4)");
    assert!(wait_until(Duration::from_secs(10), backlog_is(4)).await);
    assert!(backlog_warnings().is_empty(), "under the threshold");

    db.exec("INSERT INTO t VALUES (5)");
    assert!(wait_until(Duration::from_secs(10), backlog_is(5)).await);
    let warnings = backlog_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("consumer \"c\" has 5 journal rows"),
        "{warnings:?}"
    );

    // counted again (higher), still over: no second warning within the minute
    db.exec("INSERT INTO t VALUES (6), (7), (8)");
    assert!(wait_until(Duration::from_secs(10), backlog_is(8)).await);
    assert_eq!(backlog_warnings().len(), 1, "{:?}", backlog_warnings());

    // read: the backlog goes back to 0
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    events.take(8).await;
    assert!(wait_until(Duration::from_secs(10), backlog_is(0)).await);
    notifier.stop().await.unwrap();
}
