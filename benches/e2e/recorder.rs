//! The subscriber side: a [`Recorder`] that every listener (raw baseline or sqlnotify) feeds
//! with `(id, sent_us)` on arrival, and the raw baseline itself — a tokio-postgres LISTEN loop
//! behind a minimal `pg_notify` trigger.

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::writer::{now_us, ID_SPAN};

/// What arrived, shared by the listener and the scenario (single thread).
#[derive(Default)]
pub struct Recorder {
    /// Arrival minus send time of each first arrival, in µs.
    pub latency_us: Vec<i64>,
    /// (id, arrival time in µs since the epoch) of each first arrival.
    pub arrivals: Vec<(i64, i64)>,
    /// Per writer, how often each row arrived.
    seen: Vec<Vec<u8>>,
    pub unique: u64,
    pub duplicates: u64,
    /// Events that did not carry an id / send time.
    pub malformed: u64,
    pub first_arrival_us: i64,
    pub last_arrival_us: i64,
    /// sqlnotify only: from the listener's read of each event
    /// ([`ChangeEvent::timestamp`](sqlnotify::ChangeEvent::timestamp)) to the subscriber's
    /// call, in µs — the time spent inside the pipeline.
    pub inside_us: Vec<f64>,
}

impl Recorder {
    pub fn record(&mut self, id: i64, sent_us: i64) {
        let now = now_us();
        let (writer, n) = ((id / ID_SPAN) as usize, (id % ID_SPAN) as usize);
        if self.seen.len() <= writer {
            self.seen.resize_with(writer + 1, Vec::new);
        }
        let seen = &mut self.seen[writer];
        if seen.len() <= n {
            seen.resize((n + 1).max(seen.len() * 2), 0);
        }
        seen[n] = seen[n].saturating_add(1);
        if seen[n] > 1 {
            self.duplicates += 1;
            return;
        }
        if self.unique == 0 {
            self.first_arrival_us = now;
        }
        self.unique += 1;
        self.last_arrival_us = now;
        self.latency_us.push(now - sent_us);
        self.arrivals.push((id, now));
    }
}

/// A recorder and the signal its listener raises on every arrival.
#[derive(Clone, Default)]
pub struct Shared {
    pub recorder: Rc<RefCell<Recorder>>,
    pub arrived: Rc<Notify>,
}

impl Shared {
    pub fn record(&self, id: Option<i64>, sent_us: Option<i64>) {
        match (id, sent_us) {
            (Some(id), Some(sent)) => self.recorder.borrow_mut().record(id, sent),
            _ => self.recorder.borrow_mut().malformed += 1,
        }
        self.arrived.notify_one();
    }

    /// The pipeline delivered an event the listener read at `read_at`.
    pub fn inside(&self, read_at: std::time::SystemTime) {
        if let Ok(spent) = std::time::SystemTime::now().duration_since(read_at) {
            let us = spent.as_secs_f64() * 1e6;
            self.recorder.borrow_mut().inside_us.push(us);
        }
    }

    pub fn unique(&self) -> u64 {
        self.recorder.borrow().unique
    }

    /// Waits until `expected` distinct rows have arrived, or nothing has arrived for `idle`
    /// (those rows are lost), or `cap` has passed.
    pub async fn wait_for(&self, expected: u64, idle: Duration, cap: Duration) {
        let deadline = tokio::time::Instant::now() + cap;
        while self.unique() < expected && tokio::time::Instant::now() < deadline {
            let wait = idle.min(deadline - tokio::time::Instant::now());
            if tokio::time::timeout(wait, self.arrived.notified())
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

/// The physical limit of the notify path: SQL for a minimal row trigger that sends the same
/// columns as sqlnotify's notify tier, and nothing else.
pub fn raw_trigger_sql(table: &str, channel: &str) -> String {
    format!(
        "CREATE FUNCTION {table}_raw() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM pg_notify('{channel}', json_build_object('id', NEW.id, 'sent_us', NEW.sent_us,
                                                            'payload', NEW.payload)::text);
           RETURN NULL;
         END $$;
         CREATE TRIGGER {table}_raw AFTER INSERT ON {table}
           FOR EACH ROW EXECUTE FUNCTION {table}_raw();"
    )
}

/// The raw baseline listener: a tokio-postgres connection LISTENing on one channel; each
/// notification's payload is parsed for id and send time and recorded.
pub struct RawListener {
    client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

/// The id and send time in a raw baseline's JSON payload.
#[derive(Deserialize)]
pub struct RawRow {
    pub id: i64,
    pub sent_us: i64,
}

impl RawListener {
    pub async fn start(url: &str, channel: &str, shared: Shared) -> RawListener {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("raw listener: connect");
        let task = actix_rt::spawn(async move {
            while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        match serde_json::from_str::<RawRow>(n.payload()) {
                            Ok(row) => shared.record(Some(row.id), Some(row.sent_us)),
                            Err(_) => shared.record(None, None),
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .expect("raw listener: LISTEN");
        RawListener { client, task }
    }

    pub async fn stop(self) {
        drop(self.client);
        let _ = self.task.await;
    }
}
