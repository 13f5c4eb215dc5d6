//! Quiet installation steps: each apt-get, dpkg or `cargo install` run says one
//! progress line, and its whole output goes to `<lab cache>/install.log` (appended,
//! step after step). A failed step shows the end of its output and the log's path.

use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::progress;

/// How much of a failed step's output is shown (all of it is in the log).
const FAILED_STEP_TAIL_LINES: usize = 40;

/// The install log of a lab cache.
#[derive(Clone, Debug)]
pub struct InstallLog {
    path: PathBuf,
}

impl InstallLog {
    /// `<cache>/install.log`.
    pub fn in_cache(cache: &Path) -> Self {
        Self { path: cache.join("install.log") }
    }

    /// Runs one step: a progress line saying `what`, the command's stdout and stderr
    /// appended to the log, and on failure an error with its last lines.
    pub fn run(&self, what: &str, cmd: &mut Command) -> Result<()> {
        progress!("{what} (output: {})", self.path.display());
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)
            .with_context(|| format!("opening the install log {}", self.path.display()))?;
        let step_start = log.seek(SeekFrom::End(0)).with_context(|| format!("seeking in {}", self.path.display()))?;
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        writeln!(log, "==== {what}\n==== unix time {since_epoch}, pid {}: {cmd:?}", std::process::id())
            .with_context(|| format!("writing {}", self.path.display()))?;
        // One descriptor for both streams keeps their lines in the order written.
        let stdout = log.try_clone().with_context(|| format!("duplicating the descriptor of {}", self.path.display()))?;
        let stderr = log.try_clone().with_context(|| format!("duplicating the descriptor of {}", self.path.display()))?;
        let status =
            cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr).status().with_context(|| format!("could not start {cmd:?} ({what})"))?;
        writeln!(log, "==== {status}\n").with_context(|| format!("writing {}", self.path.display()))?;
        if status.success() {
            return Ok(());
        }
        let tail = self.tail_since(step_start).unwrap_or_else(|e| format!("(could not read it back: {e:#})"));
        bail!("{what} failed ({status}): {cmd:?}\nthe last lines of its output (all of it is in {}):\n{tail}", self.path.display())
    }

    /// The last [`FAILED_STEP_TAIL_LINES`] lines the log got from byte `start` on.
    fn tail_since(&self, start: u64) -> Result<String> {
        let mut log = std::fs::File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        log.seek(SeekFrom::Start(start)).with_context(|| format!("seeking in {}", self.path.display()))?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes).with_context(|| format!("reading {}", self.path.display()))?;
        Ok(last_lines(&String::from_utf8_lossy(&bytes), FAILED_STEP_TAIL_LINES))
    }
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let shown = &lines[lines.len().saturating_sub(count)..];
    let mut out = String::new();
    if shown.len() < lines.len() {
        out.push_str(&format!("  [... {} earlier lines]\n", lines.len() - shown.len()));
    }
    for line in shown {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_log(name: &str) -> (PathBuf, InstallLog) {
        let dir = std::env::temp_dir().join(format!("vfvm-lab-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = InstallLog::in_cache(&dir);
        (dir, log)
    }

    #[test]
    fn steps_are_appended_and_a_failure_shows_its_tail() {
        let (dir, log) = scratch_log("steps");
        log.run("a quiet step", Command::new("sh").args(["-c", "echo to-stdout; echo to-stderr >&2"])).unwrap();
        let err = log
            .run("a failing step", Command::new("sh").args(["-c", "for i in $(seq 1 100); do echo line $i; done; echo broken >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a failing step failed"), "{err}");
        assert!(err.contains(&log.path.display().to_string()), "{err}");
        assert!(err.contains("  broken\n") && err.contains("line 100") && !err.contains("line 50\n"), "{err}");
        assert!(!err.contains("to-stdout"), "the tail is the failed step's own output: {err}");
        let text = std::fs::read_to_string(log.path).unwrap();
        for expected in ["==== a quiet step\n", "to-stdout\nto-stderr\n", "==== a failing step\n", "line 1\n", "broken\n"] {
            assert!(text.contains(expected), "the log should contain {expected:?}:\n{text}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_program_is_named() {
        let (dir, log) = scratch_log("missing");
        let err = log.run("a step", &mut Command::new("/nonexistent/vfvm-lab-no-such-program")).unwrap_err();
        assert!(format!("{err:#}").contains("could not start"), "{err:#}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
