//! The logical tier (issue 17 §1, section `logical`, feature `logical`): writer cost against no
//! trigger at 1 and 2 writers, latency at 1,000 rows/s against the raw LISTEN baseline, and
//! delivery against flat-out writers — all on a cluster of the bench's own with
//! `wal_level=logical` (the shared server runs `replica`), started from the local PostgreSQL
//! binaries (`initdb`, `pg_ctl`; as the `postgres` user when run as root) and removed at the
//! end. Its "no trigger" baseline runs on that cluster too, so both pay `wal_level=logical`.

use std::cell::Cell;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sqlnotify::Tier;

use super::common::{count, ms, Table};
use super::{connect, cost_row, interleaved, latency_row, us, Ctx, Load, System, SMALL};

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
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
        let mut outcomes = interleaved(&lctx, &[System::NoTrigger, logical], load).await;
        let o = outcomes.pop().expect("logical");
        let none = outcomes.pop().expect("no trigger");
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
            " · delivered {}/s against {} committed/s, lag after the last commit {} ms · listener CPU {} µs/event",
            count(o.delivered_rate),
            count(o.commit_rate),
            ms(o.lag_ms),
            us(o.cpu_us_per_event())
        ));
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
    let mut outcomes = interleaved(&lctx, &[System::Raw, logical], load)
        .await
        .into_iter();
    let raw = outcomes.next().expect("raw");
    let o = outcomes.next().expect("logical");
    table.row(latency_row(
        "wal_level=logical cluster · latency 1000 rows/s · logical tier".into(),
        &o,
        Some((&raw, "raw")),
    ));
    drop(admin);
}
