//! Helpers shared by the benchmarks: arguments, machine facts, /proc readings, number
//! formatting and the markdown result table.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::time::Duration;

/// Command-line options of a benchmark binary.
#[derive(Debug, Clone, Default)]
pub struct Args {
    /// Started by `cargo bench` (which passes `--bench`); anything else (e.g. a test run)
    /// must not benchmark.
    pub bench: bool,
    /// `--quick`: every run is shortened.
    pub quick: bool,
    /// `--only=a,b`: run only these sections (see [`Args::wants`]).
    pub only: Vec<String>,
    /// `--systems=a,b`: in sections that compare several systems, only these (by short name;
    /// the baseline always runs). Empty: all.
    pub systems: Vec<String>,
}

impl Args {
    /// How long a run waits for stragglers once nothing arrives any more, and at most.
    pub fn waits(&self) -> (Duration, Duration) {
        if self.quick {
            (Duration::from_secs(3), Duration::from_secs(60))
        } else {
            (Duration::from_secs(5), Duration::from_secs(180))
        }
    }

    pub fn parse() -> Args {
        let mut args = Args {
            quick: std::env::var("SQLNOTIFY_BENCH_QUICK").is_ok_and(|v| v == "1"),
            ..Args::default()
        };
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--bench" => args.bench = true,
                "--quick" => args.quick = true,
                other => {
                    let words = |list: &str| -> Vec<String> {
                        list.split(',')
                            .map(str::to_string)
                            .filter(|s| !s.is_empty())
                            .collect()
                    };
                    if let Some(list) = other.strip_prefix("--only=") {
                        args.only.extend(words(list));
                    } else if let Some(list) = other.strip_prefix("--systems=") {
                        args.systems.extend(words(list));
                    }
                }
            }
        }
        args
    }

    /// Whether the section named `name` runs: no `--only`, or a word of it equals the name or
    /// a dash-separated prefix of it (`latency` selects `latency-pg-200`).
    pub fn wants(&self, name: &str) -> bool {
        self.only.is_empty()
            || self.only.iter().any(|o| {
                name == o || (name.starts_with(o.as_str()) && name[o.len()..].starts_with('-'))
            })
    }

    /// The measuring time of one run: 10 s, or 2 s with `--quick`.
    pub fn run_time(&self) -> Duration {
        if self.quick {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(10)
        }
    }
}

/// Refuses to run outside `cargo bench` (benchmarks never run inside the test suite).
pub fn refuse_unless_bench(args: &Args, name: &str) -> bool {
    if args.bench {
        return true;
    }
    eprintln!(
        "{name}: benchmark binary; run it with `scripts/bench` or `cargo bench --bench {name}` \
         (nothing to do in a test run)"
    );
    false
}

/// A field of /proc/self/status, in kB (VmRSS, VmHWM …).
pub fn proc_status_kb(field: &str) -> u64 {
    proc_status_kb_of("self", field)
}

/// A field of /proc/PID/status of another process (`pid` a number, or `self`), in kB.
pub fn proc_status_kb_of(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system, every thread, exited ones too) this process has used so far, to
/// the nanosecond (`CLOCK_PROCESS_CPUTIME_ID`; `/proc/self/stat`'s 10 ms ticks are too coarse
/// for a few seconds of a listener's work).
pub fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    } else {
        cpu_time_of("self")
    }
}

/// Times this process (every thread) has gone to sleep waiting for something so far
/// (`getrusage`'s voluntary context switches): its wake-ups.
pub fn wakeups() -> u64 {
    // SAFETY: an all-zero rusage is valid, and getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
        usage.ru_nvcsw as u64
    } else {
        0
    }
}

/// CPU time (user + system, all its threads) process `pid` (a number, or `self`) has used so far;
/// zero once it is gone.
pub fn cpu_time_of(pid: &str) -> Duration {
    try_cpu_time_of(pid).unwrap_or_default()
}

/// [`cpu_time_of`], `None` when `/proc/PID/stat` cannot be read (the process is gone).
pub fn try_cpu_time_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; the first field after the name is 3.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux configuration in use.
    Some(Duration::from_millis(ticks * 10))
}

/// "2 cores, 23.5 GiB RAM, <cpu model>".
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{cores} cores, {:.1} GiB RAM, {model}",
        mem_kb as f64 / 1024.0 / 1024.0
    )
}

/// `1234567.8` → `"1,234,568"`.
pub fn count(n: f64) -> String {
    let n = n.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Milliseconds with a precision that suits the value.
pub fn ms(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2}")
    } else if value < 100.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

/// `sqlnotify / baseline`, e.g. `"1.08×"`; `"—"` without a baseline.
pub fn ratio(sqlnotify: f64, baseline: f64) -> String {
    if baseline > 0.0 && sqlnotify.is_finite() {
        format!("{:.2}×", sqlnotify / baseline)
    } else {
        "—".into()
    }
}

/// A markdown table printed at the end of a run.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row, and echoes it to stderr as progress.
    pub fn row(&mut self, cells: Vec<String>) {
        eprintln!("  {}", cells.join(" | "));
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (cell, w) in cells.iter().zip(&widths) {
                let pad = w - cell.chars().count();
                let _ = write!(s, " {cell}{} |", " ".repeat(pad));
            }
            s.push('\n');
            s
        };
        let mut out = line(&self.headers);
        out.push('|');
        for w in &widths {
            let _ = write!(out, "{}|", "-".repeat(w + 2));
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// Percentile `p` (0–100) of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `url` with its database replaced by `dbname` (URL or key=value form).
pub fn with_dbname(url: &str, dbname: &str) -> String {
    if url.contains("://") {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let after_scheme = base.find("://").map_or(0, |i| i + 3);
        let base = match base[after_scheme..].find('/') {
            Some(slash) => &base[..after_scheme + slash],
            None => base,
        };
        match query {
            Some(q) => format!("{base}/{dbname}?{q}"),
            None => format!("{base}/{dbname}"),
        }
    } else {
        format!("{url} dbname={dbname}")
    }
}
