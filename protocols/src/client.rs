//! Connecting to a vfvm agent.
//!
//! Three transports, one address syntax:
//! - `vsock://CID:PORT`: AF_VSOCK, as with vhost-vsock (QEMU, Cloud Hypervisor's
//!   kernel vsock);
//! - `hvsock://PATH:PORT`: hybrid vsock, as Firecracker and Cloud Hypervisor expose
//!   it: connect to the VMM's Unix socket at PATH, send `CONNECT PORT\n`, and the VMM
//!   answers `OK <host port>\n` once the guest accepted;
//! - `unix://PATH`: a plain Unix socket (tests, and agents reached without a VM).
//!
//! While the guest boots the agent is not listening yet, so [`connect`] retries until
//! its deadline, each attempt bounded by its own timeout.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::agent::AgentClient;

/// Where an agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAddress {
    Vsock { cid: u32, port: u32 },
    Hybrid { uds: PathBuf, port: u32 },
    Unix(PathBuf),
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent address {input:?}: {reason} (expected vsock://CID:PORT, hvsock://PATH:PORT or unix://PATH)")]
    BadAddress { input: String, reason: String },
    #[error("{addr}: {what}: {source}")]
    Io { addr: String, what: &'static str, source: std::io::Error },
    #[error("{addr}: the VMM answered the CONNECT {port} handshake with {answer:?}, expected \"OK <port>\"")]
    Handshake { addr: String, port: u32, answer: String },
    #[error("{addr}: no agent after {attempts} attempts in {waited_ms} ms; last error: {last}")]
    GaveUp { addr: String, attempts: u32, waited_ms: u64, last: Box<ClientError> },
    #[error("ttrpc: {0}")]
    Ttrpc(#[from] ttrpc::Error),
}

impl std::fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddress::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            AgentAddress::Hybrid { uds, port } => write!(f, "hvsock://{}:{port}", uds.display()),
            AgentAddress::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

impl FromStr for AgentAddress {
    type Err = ClientError;

    fn from_str(input: &str) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::BadAddress { input: input.to_string(), reason: reason.to_string() };
        let port = |s: &str| s.parse::<u32>().map_err(|_| bad("the port must be a number from 0 to 4294967295"));
        if let Some(rest) = input.strip_prefix("vsock://") {
            let (cid, p) = rest.split_once(':').ok_or_else(|| bad("missing :PORT"))?;
            let cid = cid.parse::<u32>().map_err(|_| bad("the CID must be a number"))?;
            return Ok(AgentAddress::Vsock { cid, port: port(p)? });
        }
        if let Some(rest) = input.strip_prefix("hvsock://") {
            // The path may itself hold colons: the port follows the last one.
            let (path, p) = rest.rsplit_once(':').ok_or_else(|| bad("missing :PORT"))?;
            if path.is_empty() {
                return Err(bad("missing the VMM's socket path"));
            }
            return Ok(AgentAddress::Hybrid { uds: PathBuf::from(path), port: port(p)? });
        }
        if let Some(path) = input.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(bad("missing the socket path"));
            }
            return Ok(AgentAddress::Unix(PathBuf::from(path)));
        }
        Err(bad("unknown scheme"))
    }
}

/// How hard to try.
#[derive(Clone, Copy, Debug)]
pub struct ConnectOptions {
    /// Give up after this long in total.
    pub deadline: Duration,
    /// Each attempt (connect, and for hybrid vsock the handshake) is bounded by this.
    pub attempt_timeout: Duration,
    /// Pause between failed attempts (the guest is still booting).
    pub retry_interval: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self { deadline: Duration::from_secs(30), attempt_timeout: Duration::from_secs(2), retry_interval: Duration::from_millis(50) }
    }
}

/// The hybrid vsock handshake's answer is a short line; never read past its newline
/// (what follows is the agent's first bytes) and never more than this.
const MAX_HANDSHAKE_LINE: usize = 32;

/// Connects to the agent at `addr`, retrying until `opts.deadline`.
pub fn connect(addr: &AgentAddress, opts: ConnectOptions) -> Result<AgentClient, ClientError> {
    let fd = connect_stream(addr, opts)?;
    let raw = fd.into_raw_fd();
    // ttrpc takes ownership of the descriptor.
    Ok(AgentClient::new(ttrpc::Client::new(raw)?))
}

/// A connected stream to the agent (before ttrpc), retrying until the deadline.
pub fn connect_stream(addr: &AgentAddress, opts: ConnectOptions) -> Result<OwnedFd, ClientError> {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = opts.deadline.saturating_sub(started.elapsed());
        match connect_once(addr, opts.attempt_timeout.min(left.max(Duration::from_millis(1)))) {
            Ok(fd) => return Ok(fd),
            // A VMM that answers the handshake wrongly will not improve with retries.
            Err(e @ ClientError::Handshake { .. }) => return Err(e),
            Err(e) => {
                if started.elapsed() + opts.retry_interval >= opts.deadline {
                    return Err(ClientError::GaveUp {
                        addr: addr.to_string(),
                        attempts,
                        waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                        last: Box::new(e),
                    });
                }
                std::thread::sleep(opts.retry_interval);
            }
        }
    }
}

fn connect_once(addr: &AgentAddress, timeout: Duration) -> Result<OwnedFd, ClientError> {
    let io = |what: &'static str| {
        let addr = addr.to_string();
        move |source| ClientError::Io { addr, what, source }
    };
    match addr {
        AgentAddress::Unix(path) => {
            let s = unix_connect(path).map_err(io("connect"))?;
            Ok(OwnedFd::from(s))
        }
        AgentAddress::Vsock { cid, port } => vsock_connect(*cid, *port, timeout).map_err(io("connect")),
        AgentAddress::Hybrid { uds, port } => {
            let mut s = unix_connect(uds).map_err(io("connect to the VMM's vsock socket"))?;
            s.set_read_timeout(Some(timeout)).map_err(io("set a read timeout"))?;
            s.set_write_timeout(Some(timeout)).map_err(io("set a write timeout"))?;
            s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(io("send CONNECT"))?;
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while line.len() < MAX_HANDSHAKE_LINE {
                match s.read(&mut byte) {
                    Ok(0) => {
                        return Err(io("read the CONNECT answer")(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the VMM closed the connection (no agent listening on that port yet?)",
                        )))
                    }
                    Ok(_) if byte[0] == b'\n' => break,
                    Ok(_) => line.push(byte[0]),
                    Err(e) => return Err(io("read the CONNECT answer")(e)),
                }
            }
            let answer = String::from_utf8_lossy(&line).into_owned();
            let ok = answer.strip_prefix("OK ").is_some_and(|p| p.trim().parse::<u32>().is_ok());
            if !ok {
                return Err(ClientError::Handshake { addr: addr.to_string(), port: *port, answer });
            }
            s.set_read_timeout(None).map_err(io("clear the read timeout"))?;
            s.set_write_timeout(None).map_err(io("clear the write timeout"))?;
            Ok(OwnedFd::from(s))
        }
    }
}

/// A Unix stream connect that never waits. A blocking `connect(2)` on a Unix socket
/// waits for as long as the listener's backlog is full, and a VMM queues hybrid vsock
/// clients there until its guest's vsock driver is up: a guest that never gets there
/// would hold every retry, and so the deadline, forever. Non-blocking, a full backlog
/// is `EAGAIN` at once, which the caller retries like any refused attempt.
pub fn unix_connect(path: &std::path::Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid (empty) address.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= sa.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a Unix socket path (at most {} bytes, no NUL)", path.display(), sa.sun_path.len() - 1),
        ));
    }
    sa.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).expect("AF_UNIX (1) fits sa_family_t");
    for (dst, src) in sa.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1).expect("a short address");
    // SAFETY: plain socket calls on a descriptor this function owns, with an address
    // it built above.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        if libc::connect(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = UnixStream::from(fd);
        stream.set_nonblocking(false)?;
        Ok(stream)
    }
}

/// AF_VSOCK connect with a timeout: non-blocking connect, then poll for writability.
pub fn vsock_connect(cid: u32, port: u32, timeout: Duration) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sa: libc::sockaddr_vm = std::mem::zeroed();
        sa.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).expect("AF_VSOCK (40) fits sa_family_t");
        sa.svm_cid = cid;
        sa.svm_port = port;
        let rc = libc::connect(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>()).expect("sockaddr_vm is 16 bytes"),
        );
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err);
            }
            wait_writable(fd.as_raw_fd(), timeout)?;
            let mut so_error: libc::c_int = 0;
            let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("an int is 4 bytes");
            if libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR, &mut so_error as *mut _ as *mut libc::c_void, &mut len)
                != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if so_error != 0 {
                return Err(std::io::Error::from_raw_os_error(so_error));
            }
        }
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn wait_writable(fd: RawFd, timeout: Duration) -> std::io::Result<()> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one pollfd that outlives the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    match n {
        0 => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no connection within {} ms", timeout.as_millis()))),
        n if n < 0 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}
