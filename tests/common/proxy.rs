//! A TCP proxy for real network faults: it can silence the connections it carries, like a
//! network path that dies without a FIN or RST (their bytes go nowhere, the sockets stay
//! open), and black-hole new connections too until it is reopened.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A proxy on a port of its own in front of one target (`host:port`).
pub struct Proxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
    swallowed: Arc<AtomicU64>,
    stalled: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
}

impl Proxy {
    /// Starts forwarding every connection to `target`.
    pub async fn start(target: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let epoch = Arc::new(AtomicU64::new(0));
        let swallowed = Arc::new(AtomicU64::new(0));
        let stalled = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (o, e, w, st, fw) = (
            open.clone(),
            epoch.clone(),
            swallowed.clone(),
            stalled.clone(),
            forwarded.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    w.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(swallow(client));
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                fw.fetch_add(1, Ordering::SeqCst);
                let born = e.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(carry(cr, sw, e.clone(), born, st.clone()));
                tokio::spawn(carry(sr, cw, e.clone(), born, st.clone()));
            }
        });
        Proxy {
            port,
            open,
            epoch,
            swallowed,
            stalled,
            forwarded,
        }
    }

    /// How many connections were made and forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::SeqCst)
    }

    /// How many connections were made while the path was down (taken, never answered).
    pub fn swallowed(&self) -> u64 {
        self.swallowed.load(Ordering::SeqCst)
    }

    /// How many writes a silenced connection took and never passed on (each one a statement,
    /// or a reply, that will never arrive).
    pub fn stalled(&self) -> u64 {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Existing connections stop carrying bytes (but stay open); new ones are forwarded.
    pub fn silence_existing(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Existing connections are silenced, and so is every connection made until
    /// [`reopen`](Self::reopen).
    pub fn black_hole(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.silence_existing();
    }

    /// New connections are taken and never answered until [`reopen`](Self::reopen); the
    /// existing ones carry on (a server that ends one still ends it for its client).
    pub fn swallow_new(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    /// New connections are forwarded again; the silenced ones stay silent (what a sender
    /// wrote on them never arrives).
    pub fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// A proxy in front of the server `url` names (`scheme://[userinfo@]host:port/…`), and `url`
/// through it with `params` (`name=value&…`, may be empty) added to its query.
pub async fn in_front_of(url: &str, params: &str) -> (Proxy, String) {
    let authority = &url[url.find("://").expect("a URL") + 3..];
    let host_port = authority[authority.find('@').map_or(0, |at| at + 1)..]
        .split(['/', '?'])
        .next()
        .unwrap()
        .to_string();
    let proxy = Proxy::start(host_port.clone()).await;
    let mut through = url.replacen(&host_port, &format!("127.0.0.1:{}", proxy.port), 1);
    if !params.is_empty() {
        through.push(if through.contains('?') { '&' } else { '?' });
        through.push_str(params);
    }
    (proxy, through)
}

/// A connection made while the path is down: read, never answered.
async fn swallow(client: tokio::net::TcpStream) {
    let (mut from, _keep_open) = client.into_split();
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Forwards bytes until the connections are silenced after this one was made; then goes
/// silent for ever, keeping both sockets open.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    epoch: Arc<AtomicU64>,
    born: u64,
    stalled: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if epoch.load(Ordering::SeqCst) != born {
            stalled.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
