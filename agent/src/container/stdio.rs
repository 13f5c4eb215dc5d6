//! A process's stdio as the shim sees it: output drained by a thread per stream
//! into a bounded buffer (when it is full the thread stops reading, so the
//! process blocks on its pipe: back-pressure, not growth), input written straight
//! to the pipe without blocking.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Per stream, buffered output at most.
pub const BUFFER_BOUND: usize = 4 << 20;
const READ_CHUNK: usize = 64 << 10;

#[derive(Default)]
struct OutState {
    buf: VecDeque<u8>,
    eof: bool,
    closed: bool,
}

/// Output of one stream (stdout, stderr, or a pty's master).
pub struct Output {
    state: Mutex<OutState>,
    cv: Condvar,
}

fn set_nonblocking(fd: &OwnedFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// Waits until `fd` is ready for `events`, up to `timeout_ms` (-1: forever).
fn poll(fd: &OwnedFd, events: libc::c_short, timeout_ms: libc::c_int) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    // SAFETY: poll on one pollfd we own.
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}

impl Output {
    /// An output that is already at its end (a pty process's stderr).
    pub fn empty() -> Arc<Output> {
        Arc::new(Output { state: Mutex::new(OutState { eof: true, ..Default::default() }), cv: Condvar::new() })
    }

    /// Starts draining `fd` into a new buffer.
    pub fn drain(fd: OwnedFd, name: String) -> std::io::Result<Arc<Output>> {
        let out = Arc::new(Output { state: Mutex::default(), cv: Condvar::new() });
        let o = out.clone();
        set_nonblocking(&fd);
        std::thread::Builder::new().name(name).spawn(move || o.pump(fd))?;
        Ok(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pump(&self, fd: OwnedFd) {
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            let space = {
                let mut s = self.lock();
                while s.buf.len() >= BUFFER_BOUND && !s.closed {
                    s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                if s.closed {
                    return;
                }
                BUFFER_BOUND - s.buf.len()
            };
            // Wake now and then to notice a close() of an idle stream.
            if !poll(&fd, libc::POLLIN, 1000) {
                if self.lock().closed {
                    return;
                }
                continue;
            }
            let want = space.min(READ_CHUNK);
            // SAFETY: reading into our buffer, within its length.
            let n = unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), want) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                    continue;
                }
                // EIO: a pty whose other side is all closed. Either way: the end.
            }
            let mut s = self.lock();
            // 0 is the end; a negative count, an error that ends the stream too.
            let Ok(got @ 1..) = usize::try_from(n) else {
                s.eof = true;
                self.cv.notify_all();
                return;
            };
            s.buf.extend(&chunk[..got]);
            self.cv.notify_all();
        }
    }

    /// Up to `max` bytes, waiting up to `wait` for at least one; `eof` once the
    /// stream is closed and everything has been read.
    pub fn read(&self, max: usize, wait: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + wait;
        let mut s = self.lock();
        while s.buf.is_empty() && !s.eof && !s.closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            s = self.cv.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        let n = s.buf.len().min(max);
        let data: Vec<u8> = s.buf.drain(..n).collect();
        if n > 0 {
            self.cv.notify_all();
        }
        (data, (s.eof || s.closed) && s.buf.is_empty())
    }

    /// Whether everything has been read (or the stream dropped).
    pub fn drained(&self) -> bool {
        let s = self.lock();
        (s.eof || s.closed) && s.buf.is_empty()
    }

    /// Drops what is buffered and stops the draining thread.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.buf = VecDeque::new();
        self.cv.notify_all();
    }
}

/// A process's stdin: a pipe's write end or a pty's master.
pub struct Input {
    fd: Mutex<Option<OwnedFd>>,
    pty: bool,
}

impl Input {
    pub fn new(fd: OwnedFd, pty: bool) -> Input {
        set_nonblocking(&fd);
        Input { fd: Mutex::new(Some(fd)), pty }
    }

    /// Writes what the pipe takes now, waiting up to `wait` for room for the
    /// first byte. Returns how much was written.
    pub fn write(&self, data: &[u8], wait: Duration) -> std::io::Result<usize> {
        let guard = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = guard.as_ref() else { return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin is closed")) };
        let mut written = 0;
        let deadline = Instant::now() + wait;
        while written < data.len() {
            // SAFETY: writing from a slice we own, within its length.
            let n = unsafe { libc::write(fd.as_raw_fd(), data[written..].as_ptr().cast(), data.len() - written) };
            // Nothing written, or an error (a negative count): errno decides below.
            if let Ok(wrote @ 1..) = usize::try_from(n) {
                written += wrote;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if written == 0 => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || !poll(fd, libc::POLLOUT, i32::try_from(left.as_millis()).unwrap_or(i32::MAX)) {
                        break;
                    }
                }
                Some(libc::EAGAIN) => break,
                _ => return Err(e),
            }
        }
        Ok(written)
    }

    /// Closes stdin: the pipe's write end, or for a pty an end-of-file (^D).
    pub fn close(&self) {
        let mut guard = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        if self.pty {
            if let Some(fd) = guard.as_ref() {
                // SAFETY: writing one byte we own.
                unsafe { libc::write(fd.as_raw_fd(), [4u8].as_ptr().cast(), 1) };
            }
            return;
        }
        guard.take();
    }
}
