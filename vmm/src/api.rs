//! The control API server: [`vfvm_protocols::vmm_api`] on a Unix socket, served by
//! one thread that polls the listener, its stop eventfd and every open connection.
//!
//! Bounds (the socket is the shim's, but nothing on it is trusted): at most
//! [`MAX_CONNECTIONS`] open at once (more are closed at once); a frame longer than
//! the protocol's limit is answered with `BadRequest` and the connection closed
//! (the stream is out of step); a frame must arrive whole, and an answer be taken,
//! within [`IO_TIMEOUT`] or the connection is dropped. A frame that does not decode
//! gets `BadRequest` and the connection stays usable.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use vfvm_protocols::vmm_api::{self, ApiError, Envelope, ErrorCode, Request, Response, VMM_API_VERSION};
use vmm_sys_util::eventfd::EventFd;

pub const MAX_CONNECTIONS: usize = 8;
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What answers requests; called on the API thread.
pub type Handler = Box<dyn FnMut(Request) -> Response + Send>;

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("control API socket {}: {err}", path.display())]
    Socket { path: PathBuf, err: std::io::Error },
    #[error("control API thread: {0}")]
    Thread(std::io::Error),
}

/// A running server; stopping (or dropping) it joins its thread and removes the
/// socket file.
pub struct ApiServer {
    path: PathBuf,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` (which must not exist) and starts serving.
    pub fn start(path: &Path, handler: Handler) -> Result<Self, ApiServerError> {
        let socket_err = |err| ApiServerError::Socket { path: path.to_path_buf(), err };
        let listener = UnixListener::bind(path).map_err(socket_err)?;
        let started = (|| {
            listener.set_nonblocking(true)?;
            let stop = EventFd::new(libc::EFD_NONBLOCK)?;
            let thread_stop = stop.try_clone()?;
            Ok::<_, std::io::Error>((stop, thread_stop))
        })();
        let (stop, thread_stop) = match started {
            Ok(fds) => fds,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(socket_err(e));
            }
        };
        let thread = std::thread::Builder::new().name("api".into()).spawn(move || serve(listener, thread_stop, handler)).map_err(|e| {
            let _ = std::fs::remove_file(path);
            ApiServerError::Thread(e)
        })?;
        tracing::info!(socket = %path.display(), "control API listening");
        Ok(Self { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = thread.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(listener: UnixListener, stop: EventFd, mut handler: Handler) {
    let mut conns: Vec<UnixStream> = Vec::new();
    loop {
        let mut fds: Vec<libc::pollfd> = [stop.as_raw_fd(), listener.as_raw_fd()]
            .into_iter()
            .chain(conns.iter().map(|c| c.as_raw_fd()))
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("control API: poll: {err}");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        // Connections first (indices shift as closed ones are removed).
        let mut closed = Vec::new();
        for (i, pfd) in fds.iter().enumerate().skip(2) {
            if pfd.revents != 0 && !serve_one(&mut conns[i - 2], &mut handler) {
                closed.push(i - 2);
            }
        }
        for i in closed.into_iter().rev() {
            conns.swap_remove(i);
        }
        if fds[1].revents != 0 {
            accept_all(&listener, &mut conns);
        }
    }
}

fn accept_all(listener: &UnixListener, conns: &mut Vec<UnixStream>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if conns.len() >= MAX_CONNECTIONS {
                    tracing::warn!("control API: {MAX_CONNECTIONS} connections already open; closing a new one");
                    continue;
                }
                let ok = stream.set_nonblocking(false).is_ok()
                    && stream.set_read_timeout(Some(IO_TIMEOUT)).is_ok()
                    && stream.set_write_timeout(Some(IO_TIMEOUT)).is_ok();
                if ok {
                    conns.push(stream);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("control API: accept: {e}");
                return;
            }
        }
    }
}

/// Reads and answers one frame; false when the connection is done.
fn serve_one(stream: &mut UnixStream, handler: &mut Handler) -> bool {
    let answer = match vmm_api::read_frame(stream) {
        Ok(Some(frame)) => vmm_api::answer_frame(&frame, &mut **handler),
        Ok(None) => return false,
        Err(ApiError::TooLarge(len)) => {
            let body = Response::error(
                ErrorCode::BadRequest,
                format!("message of {len} bytes exceeds the limit of {} bytes", vmm_api::MAX_MESSAGE_BYTES),
            );
            let _ = vmm_api::write_message(stream, &Envelope { version: VMM_API_VERSION, id: 0, body });
            return false;
        }
        Err(e) => {
            tracing::debug!("control API: dropping a connection: {e}");
            return false;
        }
    };
    match vmm_api::write_message(stream, &answer) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("control API: dropping a connection: {e}");
            false
        }
    }
}
