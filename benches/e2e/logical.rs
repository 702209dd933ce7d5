//! The logical tier (issue 17 §1, section `logical`, feature `logical`): writer cost against no
//! trigger at 1 and 2 writers, latency at 1,000 rows/s against the raw LISTEN baseline, and
//! delivery against flat-out writers — all on a cluster of the bench's own with
//! `wal_level=logical` (the shared server runs `replica`), started from the local PostgreSQL
//! binaries (`initdb`, `pg_ctl`; as the `postgres` user when run as root) and removed at the
//! end. Its "no trigger" baseline runs on that cluster too, so both pay `wal_level=logical`,
//! and so does its second baseline, [`RawLogical`]: the same slot and stream read by a bare
//! loop, the physical limit of any logical-decoding consumer on this machine.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use sqlnotify::Tier;
use tokio::sync::oneshot;

use super::common::{count, ms, ratio, try_cpu_time_of, Table};
use super::recorder::Shared;
use super::{
    connect, cost_row, in_rounds, interleaved, latency_row, measure, us, Ctx, Load, Outcome,
    System, SMALL,
};

/// The section's name (`--only=logical`).
pub const SECTION: &str = "logical";

/// A throwaway cluster with `wal_level=logical`.
struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn start() -> Result<Cluster, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("no /usr/lib/postgresql: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .ok_or("no initdb under /usr/lib/postgresql")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let dir =
            std::env::temp_dir().join(format!("sqlnotify-bench-logical-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if as_postgres {
            Command::new("chown")
                .args(["postgres", &dir.display().to_string()])
                .status()
                .map_err(|e| e.to_string())?;
        }
        let cluster = Cluster {
            dir,
            bin,
            port,
            as_postgres,
        };
        let data = cluster.dir.join("data").display().to_string();
        cluster.run("initdb", &["-D", &data, "-U", "postgres", "--auth=trust"])?;
        cluster.pg_ctl("start")?;
        Ok(cluster)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let program = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = cmd.args(args).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("{tool}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    fn pg_ctl(&self, action: &str) -> Result<(), String> {
        let data = self.dir.join("data").display().to_string();
        let log = self.dir.join("log").display().to_string();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c wal_level=logical \
             -c max_replication_slots=20 -c max_wal_senders=20 -c max_wal_size=4GB",
            self.port,
            self.dir.display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-w", "-m", "fast", "-o", &opts, action,
            ],
        )
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The postmaster's pid (the first line of `postmaster.pid`).
    fn postmaster(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("data").join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

/// CPU the cluster's server processes used while one system ran, read from /proc every
/// [`ServerCpu::EVERY`]: the walsenders (decoding and sending the slot's changes) apart from
/// every other process (the writers' backends, the WAL writer, checkpoints …). A process that
/// ends between two readings loses at most its last interval; one that starts after the first
/// reading counts from zero (a new process's CPU is all its own).
struct ServerCpu {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Option<HashMap<u32, Seen>>>,
}

/// One server process as the sampler saw it.
struct Seen {
    /// Its title said `walsender` at some reading.
    walsender: bool,
    first: Duration,
    last: Duration,
}

impl ServerCpu {
    const EVERY: Duration = Duration::from_millis(50);

    fn start(postmaster: u32) -> ServerCpu {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = actix_rt::spawn(async move {
            let mut seen: HashMap<u32, Seen> = HashMap::new();
            let mut sweep = 0u64;
            loop {
                // None: /proc has no children list (a kernel without CONFIG_PROC_CHILDREN)
                for (pid, walsender) in children(postmaster)? {
                    let Some(now) = try_cpu_time_of(&pid.to_string()) else {
                        continue; // ended meanwhile: its last reading stands
                    };
                    let baseline = if sweep == 0 { now } else { Duration::ZERO };
                    let entry = seen.entry(pid).or_insert(Seen {
                        walsender,
                        first: baseline,
                        last: baseline,
                    });
                    entry.walsender |= walsender;
                    entry.last = entry.last.max(now);
                }
                sweep += 1;
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(Self::EVERY) => {} // the sampling interval
                }
            }
            Some(seen)
        });
        ServerCpu { stop, task }
    }

    /// Seconds of CPU: (walsenders, every other server process); `None` when /proc could not
    /// tell.
    async fn finish(self) -> Option<(f64, f64)> {
        let _ = self.stop.send(());
        let seen = self.task.await.ok()??;
        let (mut walsenders, mut others) = (0.0, 0.0);
        for process in seen.into_values() {
            let used = process.last.saturating_sub(process.first).as_secs_f64();
            if process.walsender {
                walsenders += used;
            } else {
                others += used;
            }
        }
        Some((walsenders, others))
    }
}

/// The postmaster's children (`/proc/PID/task/PID/children`: no scan of every process, so
/// that sampling costs the bench process next to nothing), each with whether it is a
/// walsender (its title says so); `None` when the kernel does not list children.
fn children(postmaster: u32) -> Option<Vec<(u32, bool)>> {
    let list =
        std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children")).ok()?;
    Some(
        list.split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .map(|pid: u32| {
                let title =
                    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                (pid, title.contains("walsender"))
            })
            .collect(),
    )
}

/// What the server spent per row while each system ran, summed over its rounds.
#[derive(Default, Clone, Copy)]
struct ServerShare {
    walsender_s: f64,
    others_s: f64,
}

/// [`interleaved`], also reading the server's CPU while each system runs (when the
/// postmaster's pid is known).
async fn with_server_cpu(
    ctx: &Ctx,
    postmaster: Option<u32>,
    systems: &[System],
    load: Load,
) -> Vec<(Outcome, Option<ServerShare>)> {
    let shares: Rc<RefCell<HashMap<&'static str, ServerShare>>> = Rc::default();
    let outcomes = in_rounds(ctx, systems, load, |system, load| {
        let shares = shares.clone();
        async move {
            let sampler = postmaster.map(ServerCpu::start);
            let outcome = measure(ctx, system, load).await;
            if let Some((walsender_s, others_s)) = match sampler {
                Some(sampler) => sampler.finish().await,
                None => None,
            } {
                let mut shares = shares.borrow_mut();
                let share = shares.entry(system.short()).or_default();
                share.walsender_s += walsender_s;
                share.others_s += others_s;
            }
            outcome
        }
    })
    .await;
    let shares = shares.borrow();
    outcomes
        .into_iter()
        .zip(systems)
        .map(|(o, s)| (o, shares.get(s.short()).copied()))
        .collect()
}

/// " · server CPU per row committed: walsender 6.90 µs, other server processes 11.20 µs"
/// (empty when it was not read).
fn server_detail(o: &Outcome, share: Option<ServerShare>) -> String {
    let Some(share) = share else {
        return String::new();
    };
    let per_row = |s: f64| us(s * 1e6 / (o.committed.max(1) as f64));
    format!(
        " · server CPU per row committed: walsender {} µs, other server processes {} µs",
        per_row(share.walsender_s),
        per_row(share.others_s)
    )
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The logical section's raw baseline, as the raw LISTEN loop is the notify path's: a
/// publication of the table, a `pgoutput` slot, and one `pgwire-replication` client (the crate
/// the logical tier streams with) whose loop takes each INSERT's first two columns (id, send
/// time) from pgoutput's text and confirms every commit — no event, no pipeline, no JSON. The
/// server's side (the walsender decoding and sending every row) is the same as the tier's.
pub struct RawLogical {
    url: String,
    name: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RawLogical {
    /// Creates the publication and slot for `table` and starts reading; rows go to `shared`.
    pub async fn start(url: &str, table: &str, shared: Shared) -> RawLogical {
        let name = format!("{table}_rawlogical");
        let admin = connect(url).await;
        // two statements: a slot cannot be made in a transaction that has written
        for sql in [
            format!("CREATE PUBLICATION {name} FOR TABLE {table}"),
            format!("SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .expect("raw logical: publication and slot");
        }
        let config: tokio_postgres::Config = url.parse().expect("raw logical: the URL");
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".into(),
        };
        let mut replication = ReplicationConfig::new(
            host,
            config.get_user().unwrap_or("postgres"),
            "",
            config.get_dbname().unwrap_or("postgres"),
            name.as_str(),
            name.as_str(),
        );
        replication.port = config.get_ports().first().copied().unwrap_or(5432);
        let mut client = ReplicationClient::connect(replication)
            .await
            .expect("raw logical: connect");
        // streaming before the writers start, as the tier is once `start()` returned
        client
            .wait_started()
            .await
            .expect("raw logical: START_REPLICATION");
        let (stop, mut stopped) = oneshot::channel();
        let task = actix_rt::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = &mut stopped => break,
                    event = client.recv() => event,
                };
                match event {
                    Ok(Some(ReplicationEvent::XLogData { data, .. })) => {
                        if data.first() == Some(&b'I') {
                            let row = insert_id_and_sent(&data);
                            shared.record(row.map(|r| r.0), row.map(|r| r.1));
                        }
                    }
                    Ok(Some(ReplicationEvent::Commit { end_lsn, .. })) => {
                        client.update_applied_lsn(end_lsn);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = client.shutdown().await;
        });
        RawLogical {
            url: url.to_string(),
            name,
            stop,
            task,
        }
    }

    /// Stops reading, then drops the slot (once its walsender has gone) and the publication.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        let admin = connect(&self.url).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let dropped = admin
                .batch_execute(&format!("SELECT pg_drop_replication_slot('{}')", self.name))
                .await;
            match dropped {
                Ok(()) => break,
                // still active until the server has seen the stream end: a bounded wait
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("raw logical: dropping slot {}: {e}", self.name),
            }
        }
        admin
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", self.name))
            .await
            .expect("raw logical: drop the publication");
    }
}

/// The id and send time of a pgoutput (protocol 1) INSERT: `I`, the relation's OID, `N`, the
/// column count, then each column as `t`, a length and its text; `None` for anything else.
fn insert_id_and_sent(data: &[u8]) -> Option<(i64, i64)> {
    let rest = data.strip_prefix(b"I")?.get(4..)?.strip_prefix(b"N")?;
    let mut columns = rest.get(2..)?;
    let mut next = || -> Option<i64> {
        let rest = columns.strip_prefix(b"t")?;
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let text = rest.get(4..4 + len)?;
        columns = &rest[4 + len..];
        std::str::from_utf8(text).ok()?.parse().ok()
    };
    Some((next()?, next()?))
}

pub async fn run(ctx: &Ctx, table: &mut Table) {
    if !ctx.args.wants(SECTION) {
        return;
    }
    let cluster = match Cluster::start() {
        Ok(c) => c,
        Err(e) => {
            println!("logical: skipped: cannot start a cluster with wal_level=logical: {e}");
            return;
        }
    };
    let postmaster = cluster.postmaster();
    let admin = connect(&cluster.url()).await;
    admin
        .batch_execute("CREATE DATABASE bench TEMPLATE template0")
        .await
        .expect("create the logical bench database");
    let version: String = admin
        .query_one("SHOW server_version", &[])
        .await
        .expect("version")
        .get(0);
    println!(
        "logical section: a cluster of its own, PostgreSQL {version}, wal_level=logical, \
         synchronous_commit=on, loopback TCP, port {}",
        cluster.port
    );
    let lctx = Ctx {
        args: ctx.args.clone(),
        url: format!("postgres://postgres@127.0.0.1:{}/bench", cluster.port),
        tmp: ctx.tmp.clone(),
        next: Cell::new(0),
    };
    let duration = if ctx.args.quick {
        Duration::from_secs(2)
    } else {
        ctx.args.run_time()
    };
    let logical = System::Tier(Tier::Logical);
    for writers in [1, 2] {
        eprintln!("logical: writer cost, {writers} writer(s) …");
        let load = Load {
            writers,
            rate: 0,
            txn_rows: 100,
            payload_bytes: SMALL,
            duration,
            async_commit: false,
        };
        let mut outcomes = with_server_cpu(
            &lctx,
            postmaster,
            &[System::NoTrigger, System::RawLogical, logical],
            load,
        )
        .await;
        let (o, o_server) = outcomes.pop().expect("logical");
        let (raw, raw_server) = outcomes.pop().expect("raw logical");
        let (none, none_server) = outcomes.pop().expect("no trigger");
        let mut row = cost_row(
            format!(
                "wal_level=logical cluster · writer cost, {writers} writer(s) × 100-row txns, 16 B, synchronous_commit=on · raw pgoutput consumer"
            ),
            &raw,
            &none,
            None,
            true,
        );
        row[5].push_str(&format!(
            " · delivered {}/s against {} committed/s, lag after the last commit {} ms · listener CPU {} µs/event{} (no trigger:{})",
            count(raw.delivered_rate),
            count(raw.commit_rate),
            ms(raw.lag_ms),
            us(raw.cpu_us_per_event()),
            server_detail(&raw, raw_server),
            server_detail(&none, none_server).trim_start_matches(" ·")
        ));
        table.row(row);
        let mut row = cost_row(
            format!(
                "wal_level=logical cluster · writer cost, {writers} writer(s) × 100-row txns, 16 B, synchronous_commit=on · logical tier"
            ),
            &o,
            &none,
            None,
            true,
        );
        row[5].push_str(&format!(
            " · vs the raw pgoutput consumer {} · delivered {}/s against {} committed/s, lag after the last commit {} ms · listener CPU {} µs/event (raw consumer {})",
            ratio(o.commit_rate, raw.commit_rate),
            count(o.delivered_rate),
            count(o.commit_rate),
            ms(o.lag_ms),
            us(o.cpu_us_per_event()),
            us(raw.cpu_us_per_event())
        ));
        row[5].push_str(&server_detail(&o, o_server));
        table.row(row);
    }
    eprintln!("logical: latency at 1000 rows/s …");
    let load = Load {
        writers: 1,
        rate: 1000,
        txn_rows: 1,
        payload_bytes: SMALL,
        duration,
        async_commit: false,
    };
    let mut outcomes = interleaved(&lctx, &[System::Raw, System::RawLogical, logical], load)
        .await
        .into_iter();
    let raw = outcomes.next().expect("raw");
    let raw_logical = outcomes.next().expect("raw logical");
    let o = outcomes.next().expect("logical");
    table.row(latency_row(
        "wal_level=logical cluster · latency 1000 rows/s · raw pgoutput consumer".into(),
        &raw_logical,
        Some((&raw, "raw")),
    ));
    table.row(latency_row(
        "wal_level=logical cluster · latency 1000 rows/s · logical tier".into(),
        &o,
        Some((&raw, "raw")),
    ));
    drop(admin);
}
