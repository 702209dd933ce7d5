//! NATS for the relay tests: the shared server (`SQLNOTIFY_TEST_NATS_URL`, else the local one),
//! a `nats-server` of the test's own (spare port, temporary store) for faults, and reading a
//! whole stream back.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, consumer::DeliverPolicy};
use futures_util::StreamExt;

/// The shared NATS server with JetStream: `SQLNOTIFY_TEST_NATS_URL`, else the local one.
pub fn shared_url() -> String {
    std::env::var("SQLNOTIFY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The shared server's URL, or `None` (after [`prerequisite_missing`](super::prerequisite_missing))
/// when nothing answers there.
pub fn shared(test: &str) -> Option<String> {
    let url = shared_url();
    let address = url.trim_start_matches("nats://");
    if std::net::TcpStream::connect(address).is_ok() {
        return Some(url);
    }
    super::prerequisite_missing(test, &format!("no NATS server answers at {url}"));
    None
}

/// The `nats-server` binary: `SQLNOTIFY_NATS_SERVER`, else the first on PATH or in /usr/sbin.
fn server_binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("SQLNOTIFY_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.exists())
}

/// A `nats-server -js` of the test's own on a spare port, with its store in a temporary
/// directory; killed and removed when dropped.
pub struct NatsServer {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// `None` when no `nats-server` binary is installed.
    pub fn start() -> Option<NatsServer> {
        let bin = server_binary()?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
            l.local_addr().ok()?.port()
        };
        let dir =
            std::env::temp_dir().join(format!("sqlnotify-nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let mut server = NatsServer {
            port,
            dir,
            bin,
            child: None,
        };
        server.start_again();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port and store) and waits until it answers.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let child = Command::new(&self.bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not listen on {} within 20 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server with SIGTERM (every connection drops; it writes out what it
    /// acknowledged — a SIGKILL could lose acknowledged messages NATS had not flushed, which
    /// is NATS's durability, not the relay's) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One stored message, as read back.
#[derive(Debug, Clone)]
pub struct Stored {
    pub stream_sequence: u64,
    pub subject: String,
    pub id: String,
    pub sequence: i64,
    pub table: String,
    pub operation: String,
    pub key: String,
    pub body: serde_json::Value,
}

pub async fn jetstream(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url).await.unwrap_or_else(|e| {
        panic!("cannot connect to NATS at {url}: {e} (set SQLNOTIFY_TEST_NATS_URL)")
    });
    jetstream::new(client)
}

/// Every message of `stream`, in stream order.
pub async fn read_stream(url: &str, stream: &str) -> Vec<Stored> {
    let js = jetstream(url).await;
    let mut handle = js.get_stream(stream).await.expect("the stream exists");
    let total = handle.info().await.expect("stream info").state.messages;
    let consumer = handle
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("a reading consumer");
    let mut out = Vec::with_capacity(total as usize);
    while (out.len() as u64) < total {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .expect("fetch");
        let before = out.len();
        while let Some(message) = batch.next().await {
            let message = message.expect("a message");
            let info = message.info().expect("JetStream metadata");
            let stream_sequence = info.stream_sequence;
            let headers = message.headers.clone().expect("headers");
            let header = |name: &str| {
                headers
                    .get(name)
                    .unwrap_or_else(|| panic!("header {name} missing"))
                    .to_string()
            };
            out.push(Stored {
                stream_sequence,
                subject: message.subject.to_string(),
                id: header("Nats-Msg-Id"),
                sequence: header("Sqlnotify-Sequence").parse().expect("a sequence"),
                table: header("Sqlnotify-Table"),
                operation: header("Sqlnotify-Operation"),
                key: header("Sqlnotify-Key"),
                body: serde_json::from_slice(&message.payload).expect("a JSON body"),
            });
        }
        assert!(
            out.len() > before,
            "reading the stream stalled at {} of {total}",
            out.len()
        );
    }
    out
}

/// How many messages `stream` holds.
pub async fn stream_messages(url: &str, stream: &str) -> u64 {
    let js = jetstream(url).await;
    let mut handle = js.get_stream(stream).await.expect("the stream exists");
    handle.info().await.expect("stream info").state.messages
}

/// Deletes `stream` (the tests' cleanup on the shared server).
pub async fn delete_stream(url: &str, stream: &str) {
    let js = jetstream(url).await;
    let _ = js.delete_stream(stream).await;
}
