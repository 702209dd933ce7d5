//! Tests whose processes are the test binary re-executed as children: starting one (the same
//! test alone, told by environment variables that it is a child), its stop signal (its stdin
//! closing), reading its record file and the end of its stderr, and the directory of the
//! test's own they are kept in.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

/// The test binary running only `test`, as a child: `--exact TEST --nocapture
/// --test-threads=1`, stdin piped (closing it is the child's stop signal: see
/// [`stdin_closed`]), stdout discarded, stderr written to the file `stderr`. The caller adds
/// the environment that makes it a child, then [`spawn`]s it.
pub fn rerun(test: &str, stderr: &Path) -> Command {
    rerun_through(Command::new(std::env::current_exe().unwrap()), test, stderr)
}

/// Like [`rerun`], but through `command`: one that runs the test binary wrapped (say, `ip
/// netns exec NAME <test binary>`), to which the test's arguments are appended.
pub fn rerun_through(mut command: Command, test: &str, stderr: &Path) -> Command {
    command
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(File::create(stderr).unwrap());
    command
}

/// Starts `command` (from [`rerun`]); the child and its stdin, to keep open until the child
/// should stop. Panics with `what` ("start a worker", say) when it cannot start.
pub fn spawn(mut command: Command, what: &str) -> (Child, ChildStdin) {
    let mut child = command.spawn().unwrap_or_else(|e| panic!("{what}: {e:?}"));
    let stdin = child.stdin.take().unwrap();
    (child, stdin)
}

/// SIGKILLs each of `children` and waits for it (for a `Drop`: errors, such as a child
/// already reaped, are ignored).
pub fn kill_all<'a>(children: impl IntoIterator<Item = &'a mut Child>) {
    for child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// In a child: its record file, named by the environment variable `var`, opened for appending
/// (created if need be). Panics naming `who` ("a worker", say) when it cannot.
pub fn record_file(var: &str, who: &str) -> File {
    let record = std::env::var(var).expect("the record file");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&record)
        .unwrap_or_else(|e| panic!("{who}: open {record}: {e}"))
}

/// In a child: receives (or errs: either way) once its stdin closes — the test closed it, or
/// died. A thread of its own reads stdin to its end from the call on.
pub fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (closed, stdin_closed) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = closed.send(());
    });
    stdin_closed
}

/// The complete lines of the record file `path` so far (empty if there is none yet): its text
/// up to its last newline, since a line being written may be incomplete.
pub fn complete_lines(path: &Path) -> String {
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    text.truncate(text.rfind('\n').unwrap_or(0));
    text
}

/// The end of the file `path` (a child's stderr), at most its last `max` bytes (from a
/// character boundary), for failure messages; empty if there is none.
pub fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

/// A directory of the test's own for its children's record and stderr files: removed on drop,
/// unless the test is failing (panicking) — then kept, and where it is said on stderr. Drop it
/// after the children are stopped.
pub struct RecordDir {
    /// The directory.
    pub path: PathBuf,
    /// What its files are, for the message when it is kept ("TEST: the workers' records").
    what: String,
}

impl RecordDir {
    /// Creates a directory in the temporary directory, named from `prefix` (see
    /// [`super::unique_name`]); `what` says what it holds when it is kept.
    pub fn new(prefix: &str, what: String) -> RecordDir {
        let path = std::env::temp_dir().join(super::unique_name(prefix));
        std::fs::create_dir_all(&path).unwrap();
        RecordDir { path, what }
    }

    /// The path of the file `name` in it.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for RecordDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{} are in {}", self.what, self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
