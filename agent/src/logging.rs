//! The agent's logs: always to the console (stderr), and, when the host asks for it
//! (`vfvm.log_port=N` on the kernel command line), also to a vsock stream to the host
//! (CID 2, port N). The vsock copy never blocks the agent: writes are non-blocking,
//! and what the host is too slow to take is dropped and counted.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The host's vsock CID.
pub const HOST_CID: u32 = 2;

static SINK: OnceLock<Mutex<Option<std::fs::File>>> = OnceLock::new();
static DROPPED_BYTES: AtomicU64 = AtomicU64::new(0);

fn sink() -> &'static Mutex<Option<std::fs::File>> {
    SINK.get_or_init(|| Mutex::new(None))
}

/// The log port from a kernel command line (`vfvm.log_port=N`), if any.
pub fn log_port_from_cmdline(cmdline: &str) -> Option<u32> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix("vfvm.log_port=")).and_then(|p| p.parse().ok())
}

/// Connects the vsock copy of the logs (one attempt, bounded: the host may not listen).
pub fn connect_vsock(port: u32, timeout: Duration) -> std::io::Result<()> {
    let fd: OwnedFd = vfvm_protocols::client::vsock_connect(HOST_CID, port, timeout)?;
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    *sink().lock().unwrap_or_else(|e| e.into_inner()) = Some(std::fs::File::from(fd));
    Ok(())
}

/// Bytes of log the host did not take in time.
pub fn dropped_bytes() -> u64 {
    DROPPED_BYTES.load(Ordering::Relaxed)
}

/// A log line's writer: the console, plus the vsock stream if connected.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = std::io::stderr().write(buf)?;
        let mut guard = sink().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = guard.as_mut() {
            match stream.write(&buf[..n]) {
                Ok(written) => {
                    DROPPED_BYTES.fetch_add((n - written) as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    DROPPED_BYTES.fetch_add(n as u64, Ordering::Relaxed);
                }
                // The host went away: stop trying.
                Err(_) => *guard = None,
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_port_comes_from_the_command_line() {
        assert_eq!(log_port_from_cmdline("console=ttyS0 vfvm.log_port=1025 quiet"), Some(1025));
        assert_eq!(log_port_from_cmdline("console=ttyS0 quiet"), None);
        assert_eq!(log_port_from_cmdline("vfvm.log_port=banana"), None);
    }
}
