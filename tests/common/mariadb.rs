//! A throwaway MariaDB server of a test's own (Debian's `mariadbd`, a data directory from
//! `mariadb-install-db` in a temporary directory, a free port), for tests that need server
//! options the shared server does not have; stopped and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running throwaway MariaDB.
pub struct MariaDb {
    pub port: u16,
    /// Its directory: the data directory, the socket, the error log, and files a test puts
    /// there for the server (certificates).
    pub dir: PathBuf,
    child: Child,
}

impl MariaDb {
    /// A directory for a server to come, where a test writes the files its options name.
    pub fn prepare() -> Option<PathBuf> {
        let dir = std::env::temp_dir().join(super::unique_name("sqlnotify-mariadb"));
        std::fs::create_dir_all(&dir).ok()?;
        if super::running_as_root() {
            chown_mysql(&dir)?;
        }
        Some(dir)
    }

    /// Installs a data directory in `dir` (from [`MariaDb::prepare`]) and starts a server on
    /// it with `options`; `None` (and what went wrong on stderr) when it cannot.
    pub fn start(dir: PathBuf, options: &[String]) -> Option<MariaDb> {
        let bin = ["/usr/sbin/mariadbd", "/usr/bin/mariadbd"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())?;
        let user: Vec<String> = if super::running_as_root() {
            vec!["--user=mysql".into()]
        } else {
            Vec::new()
        };
        let data = dir.join("data");
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .args(&user)
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "mariadb-install-db failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
            l.local_addr().ok()?.port()
        };
        let child = Command::new(bin)
            .arg("--no-defaults")
            .args(&user)
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mariadbd.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .args(options)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut server = MariaDb { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = std::fs::read_to_string(server.dir.join("error.log")).unwrap_or_default();
                eprintln!("mariadbd exited ({status}): {log}");
                return None;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            // A bounded wait for a process that gives no other signal of readiness.
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("mariadbd did not answer on port {port} within 60 s");
        None
    }
}

fn chown_mysql(path: &Path) -> Option<()> {
    let status = Command::new("chown")
        .args(["mysql", path.to_str()?])
        .status()
        .ok()?;
    status.success().then_some(())
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
