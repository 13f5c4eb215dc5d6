//! Reading a child's serial console line by line with deadlines, so that a guest that
//! hangs is reported as a timeout instead of hanging the caller.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Instant;

/// Lines from a reader, delivered through a channel by a background thread.
pub struct Lines {
    rx: Receiver<String>,
}

pub enum Next {
    Line(String),
    Closed,
    TimedOut,
}

impl Lines {
    pub fn spawn<R: Read + Send + 'static>(reader: R) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        // Serial consoles send CR LF and may carry non-UTF-8 noise.
                        let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Self { rx }
    }

    /// The next line, waiting no later than `deadline`.
    pub fn next_before(&self, deadline: Instant) -> Next {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(wait) {
            Ok(line) => Next::Line(line),
            Err(RecvTimeoutError::Timeout) => Next::TimedOut,
            Err(RecvTimeoutError::Disconnected) => Next::Closed,
        }
    }
}

/// Makes the child die with us: if the harness is killed (even with SIGKILL), the
/// kernel sends the child SIGKILL, so no emulator is ever left running on its own.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = vfvm_test_containerd::pid_t_of(std::process::id());
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

/// Kills and reaps a child; used on every error path so nothing outlives a failure.
pub fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
