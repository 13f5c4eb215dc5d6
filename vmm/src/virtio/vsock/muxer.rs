//! The vsock worker: one thread, one epoll loop over the queue kicks, the hybrid vsock
//! listener, every host connection and a stop eventfd. It moves packets between the
//! guest's queues and host Unix streams, one connection state machine per stream.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{
    read_packet, write_packet, Header, Segments, HDR_LEN, HOST_CID, MAX_PKT_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::virtio::VirtioInterrupt;

/// Receive buffer we advertise per connection (guest -> host bytes in flight).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Send a CREDIT_UPDATE once we forwarded this much since we last told the guest.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;
/// The first local port handed to host-initiated connections.
pub const HOST_PORT_BASE: u32 = 1 << 30;
/// How long a host client may take to send its `CONNECT <port>\n` line.
pub const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to answer a host-initiated REQUEST.
pub const GUEST_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may take to RST after we sent it SHUTDOWN.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// The bounded waits (the constants above; tests shorten them).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect_line: Duration,
    pub guest_answer: Duration,
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { connect_line: CONNECT_LINE_TIMEOUT, guest_answer: GUEST_ANSWER_TIMEOUT, shutdown: SHUTDOWN_TIMEOUT }
    }
}

/// The longest `CONNECT <port>\n` line, newline included.
pub const MAX_CONNECT_LINE: usize = 32;
/// Host clients accepted but still sending their CONNECT line, at most.
const MAX_PENDING_CLIENTS: usize = 64;
/// Connections at most (host- and guest-initiated together).
const MAX_CONNECTIONS: usize = 1024;
/// RSTs waiting for rx buffers, at most (beyond that, they are dropped).
const MAX_QUEUED_RST: usize = 1024;

pub const RXQ: u16 = 0;
pub const TXQ: u16 = 1;
pub const EVQ: u16 = 2;

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EV: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
const TOKEN_FIRST_DYNAMIC: u64 = 16;

// Control packets a connection owes the guest (a bit set: at most one of each).
const P_REQUEST: u8 = 1;
const P_RESPONSE: u8 = 2;
const P_CREDIT_UPDATE: u8 = 4;
const P_CREDIT_REQUEST: u8 = 8;
const P_SHUTDOWN: u8 = 16;

/// (local port, peer port): local is the host side, peer the guest side.
type ConnKey = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent (or owed), waiting for the guest's RESPONSE.
    LocalInit,
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// Interest registered with epoll; None once deregistered (after a hang-up).
    registered: Option<EventSet>,
    pending: u8,
    in_rx_ready: bool,
    deadline: Option<Instant>,

    // guest -> host
    tx_buf: VecDeque<u8>,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// The guest will send no more (SHUTDOWN SEND).
    peer_shut_send: bool,
    /// The guest will receive no more (SHUTDOWN RCV).
    peer_shut_rcv: bool,
    write_shut: bool,

    // host -> guest
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The stream is known to be readable (or hung up): read it when the guest can take it.
    data_ready: bool,
    hup: bool,
    /// EOF read from the host stream (SHUTDOWN owed or sent to the guest).
    host_eof: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Conn {
            stream,
            token,
            state,
            registered: None,
            pending: 0,
            in_rx_ready: false,
            deadline: None,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_shut_send: false,
            peer_shut_rcv: false,
            write_shut: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            data_ready: false,
            hup: false,
            host_eof: false,
        }
    }

    /// Bytes the guest can still take from us.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.peer_shut_rcv && self.peer_credit() > 0
    }

    fn has_rx_work(&self) -> bool {
        self.pending != 0 || (self.data_ready && self.can_send_data())
    }

    fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.state == State::Established && !self.host_eof && !self.peer_shut_rcv && !self.data_ready && self.peer_credit() > 0 {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Both directions done: the guest sends nothing more and everything it sent went out,
    /// and the host side is finished too.
    fn finished(&self) -> bool {
        self.tx_buf.is_empty() && self.peer_shut_send && (self.peer_shut_rcv || self.host_eof)
    }

    /// Writes buffered guest data to the stream. Err: the stream failed.
    fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = count_bytes(self.fwd_cnt, n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.after_forward()
    }

    /// Bookkeeping after guest data went out: half-close when the guest is done sending,
    /// and credit updates.
    fn after_forward(&mut self) -> io::Result<()> {
        if self.tx_buf.is_empty() && self.peer_shut_send && !self.write_shut {
            self.write_shut = true;
            match self.stream.shutdown(Shutdown::Write) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotConnected => {}
                Err(e) => return Err(e),
            }
        }
        if !self.peer_shut_rcv && self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= P_CREDIT_UPDATE;
        }
        Ok(())
    }
}

/// A host client that has not finished its `CONNECT <port>\n` line.
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What the worker thread needs; built by `Vsock::activate`.
pub struct Worker {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub rxq: Queue,
    pub txq: Queue,
    /// Held, never used: the device sends no transport events.
    #[allow(dead_code)]
    pub evq: Queue,
    pub kicks: [EventFd; 3],
    pub stop: EventFd,
    pub listener: Arc<UnixListener>,
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    pub timeouts: Timeouts,
}

struct Muxer {
    w: Worker,
    epoll: Epoll,
    conns: HashMap<ConnKey, Conn>,
    conn_tokens: HashMap<u64, ConnKey>,
    pending_clients: HashMap<u64, PendingClient>,
    next_token: u64,
    next_host_port: u32,
    rst_queue: VecDeque<Header>,
    rx_ready: VecDeque<ConnKey>,
    rx_used: bool,
    tx_used: bool,
    scratch: Vec<u8>,
}

impl Worker {
    /// Runs the loop until the stop eventfd fires.
    pub fn run(self) -> io::Result<()> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(self.kicks[0].as_raw_fd(), TOKEN_RX)?;
        add(self.kicks[1].as_raw_fd(), TOKEN_TX)?;
        add(self.kicks[2].as_raw_fd(), TOKEN_EV)?;
        add(self.stop.as_raw_fd(), TOKEN_STOP)?;
        add(self.listener.as_raw_fd(), TOKEN_LISTENER)?;
        let mut m = Muxer {
            w: self,
            epoll,
            conns: HashMap::new(),
            conn_tokens: HashMap::new(),
            pending_clients: HashMap::new(),
            next_token: TOKEN_FIRST_DYNAMIC,
            next_host_port: HOST_PORT_BASE,
            rst_queue: VecDeque::new(),
            rx_ready: VecDeque::new(),
            rx_used: false,
            tx_used: false,
            scratch: vec![0u8; MAX_PKT_PAYLOAD],
        };
        m.run()
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

/// Parses `CONNECT <port>` (the newline already stripped).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let mut words = s.split_ascii_whitespace();
    let word = words.next()?;
    let port = words.next()?;
    if !word.eq_ignore_ascii_case("connect") || words.next().is_some() {
        return None;
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse::<u32>().ok()
}

/// `<uds_path>_<port>`.
pub fn guest_port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// `counter` (fwd_cnt or tx_cnt) after `bytes` more bytes: virtio-vsock's byte
/// counters are free-running u32s that wrap (virtio 1.2, 5.10.6.3).
// The counters are defined modulo 2^32, so keeping the low 32 bits of `bytes` is exact.
#[allow(clippy::cast_possible_truncation)]
fn count_bytes(counter: u32, bytes: usize) -> u32 {
    counter.wrapping_add(bytes as u32)
}

/// Connects a nonblocking Unix stream socket without ever waiting: a full backlog is a
/// failure like a missing listener.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(ErrorKind::InvalidInput, "socket path too long"));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).expect("AF_UNIX is 1");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*s]); // the path's bytes as they are
    }
    // SAFETY: plain syscall; the result is checked and owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1)
        .expect("shorter than sun_path, checked above");
    // SAFETY: addr is a valid sockaddr_un of at least `len` bytes.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), &addr as *const libc::sockaddr_un as *const libc::sockaddr, len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// recv(MSG_PEEK) without blocking.
fn peek(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n =
        unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    // Negative (-1) is an error; anything else a byte count.
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl Muxer {
    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let timeout = self.next_timeout_ms();
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => 0,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                let token = ev.data();
                let set = ev.event_set();
                match token {
                    TOKEN_STOP => {
                        debug!("vsock: stopping");
                        return Ok(());
                    }
                    TOKEN_RX => {
                        let _ = self.w.kicks[RXQ as usize].read();
                    }
                    TOKEN_TX => {
                        let _ = self.w.kicks[TXQ as usize].read();
                        self.process_tx();
                    }
                    TOKEN_EV => {
                        let _ = self.w.kicks[EVQ as usize].read();
                    }
                    TOKEN_LISTENER => self.accept_clients(),
                    t => {
                        if self.pending_clients.contains_key(&t) {
                            self.read_connect_line(t);
                        } else if let Some(&key) = self.conn_tokens.get(&t) {
                            self.conn_event(key, set);
                        }
                    }
                }
            }
            self.expire(Instant::now());
            self.process_rx();
            self.sync_interest();
            self.notify();
        }
    }

    fn notify(&mut self) {
        let mem = &self.w.mem;
        if self.rx_used {
            self.rx_used = false;
            if self.w.rxq.needs_notification(mem).unwrap_or(true) {
                self.w.interrupt.notify_queue(RXQ);
            }
        }
        if self.tx_used {
            self.tx_used = false;
            if self.w.txq.needs_notification(mem).unwrap_or(true) {
                self.w.interrupt.notify_queue(TXQ);
            }
        }
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    // ---- timers ----

    fn next_timeout_ms(&self) -> i32 {
        let next = self.pending_clients.values().map(|p| p.deadline).chain(self.conns.values().filter_map(|c| c.deadline)).min();
        match next {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so we wake after the deadline, not just before it.
                i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self.pending_clients.iter().filter(|(_, p)| p.deadline <= now).map(|(t, _)| *t).collect();
        for t in late {
            debug!("vsock: host client sent no CONNECT line in time, closing it");
            self.drop_pending_client(t);
        }
        let late: Vec<ConnKey> = self.conns.iter().filter(|(_, c)| c.deadline.is_some_and(|d| d <= now)).map(|(k, _)| *k).collect();
        for key in late {
            debug!(?key, "vsock: connection timed out, resetting it");
            self.kill(key);
        }
    }

    // ---- host-initiated connections ----

    fn accept_clients(&mut self) {
        loop {
            match self.w.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending_clients.len() >= MAX_PENDING_CLIENTS {
                        warn!("vsock: too many host clients still connecting, closing a new one");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("vsock: host client: {e}");
                        continue;
                    }
                    let token = self.alloc_token();
                    if let Err(e) = self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::IN, token)) {
                        warn!("vsock: registering host client: {e}");
                        continue;
                    }
                    self.pending_clients
                        .insert(token, PendingClient { stream, line: Vec::new(), deadline: Instant::now() + self.w.timeouts.connect_line });
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    warn!("vsock: accepting on the hybrid vsock socket: {e}");
                    break;
                }
            }
        }
    }

    fn drop_pending_client(&mut self, token: u64) {
        if let Some(p) = self.pending_clients.remove(&token) {
            let _ = self.epoll.ctl(ControlOperation::Delete, p.stream.as_raw_fd(), EpollEvent::default());
        }
    }

    /// Reads what there is of a client's CONNECT line, never past its newline.
    fn read_connect_line(&mut self, token: u64) {
        let p = self.pending_clients.get_mut(&token).unwrap();
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - p.line.len();
        let n = match peek(&p.stream, &mut buf[..room]) {
            Ok(0) => {
                debug!("vsock: host client closed before its CONNECT line");
                return self.drop_pending_client(token);
            }
            Ok(n) => n,
            Err(e) if would_block(&e) || e.kind() == ErrorKind::Interrupted => return,
            Err(e) => {
                debug!("vsock: host client: {e}");
                return self.drop_pending_client(token);
            }
        };
        let newline = buf[..n].iter().position(|&b| b == b'\n');
        let take = newline.map_or(n, |i| i + 1);
        // Consume exactly what we peeked (up to the newline): it is queued, so this read
        // cannot block or come up short.
        if p.stream.read_exact(&mut buf[..take]).is_err() {
            return self.drop_pending_client(token);
        }
        match newline {
            None => {
                p.line.extend_from_slice(&buf[..take]);
                if p.line.len() >= MAX_CONNECT_LINE {
                    warn!("vsock: host client's CONNECT line is too long, closing it");
                    self.drop_pending_client(token);
                }
            }
            Some(i) => {
                p.line.extend_from_slice(&buf[..i]);
                let port = parse_connect_line(&p.line);
                let Some(port) = port else {
                    warn!(
                        line = %String::from_utf8_lossy(&p.line),
                        "vsock: bad CONNECT line from a host client, closing it"
                    );
                    return self.drop_pending_client(token);
                };
                let p = self.pending_clients.remove(&token).unwrap();
                self.host_connect(p.stream, token, port);
            }
        }
    }

    fn alloc_host_port(&mut self) -> Option<u32> {
        let used: HashSet<u32> = self.conns.keys().map(|k| k.0).collect();
        let span = u32::MAX - HOST_PORT_BASE;
        for _ in 0..span.min(u32::try_from(used.len() + 1).unwrap_or(u32::MAX)) {
            let p = self.next_host_port;
            self.next_host_port = if p >= u32::MAX - 1 { HOST_PORT_BASE } else { p + 1 };
            if !used.contains(&p) {
                return Some(p);
            }
        }
        None
    }

    /// The client asked for guest port `port`: send the guest a REQUEST.
    fn host_connect(&mut self, stream: UnixStream, token: u64, port: u32) {
        let fd = stream.as_raw_fd();
        let port_local = if self.conns.len() < MAX_CONNECTIONS { self.alloc_host_port() } else { None };
        let Some(local) = port_local else {
            warn!("vsock: too many connections, refusing a host client");
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            return;
        };
        let key = (local, port);
        debug!(local, port, "vsock: host client connecting to the guest");
        let mut c = Conn::new(stream, token, State::LocalInit);
        c.registered = Some(EventSet::IN);
        c.pending = P_REQUEST;
        c.deadline = Some(Instant::now() + self.w.timeouts.guest_answer);
        self.conns.insert(key, c);
        self.conn_tokens.insert(token, key);
        self.schedule(key);
    }

    // ---- connection plumbing ----

    /// Queues the connection for the rx path if it has something for the guest.
    fn schedule(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_rx_ready && c.has_rx_work() {
                c.in_rx_ready = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    fn queue_rst(&mut self, hdr: Header) {
        if self.rst_queue.len() >= MAX_QUEUED_RST {
            crate::guest_warn!("vsock: too many RSTs waiting for rx buffers, dropping one");
            return;
        }
        self.rst_queue.push_back(hdr);
    }

    fn rst_for(&self, key: ConnKey) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.w.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        }
    }

    /// Forgets a connection without telling the guest (it sent RST).
    fn forget(&mut self, key: ConnKey) -> Option<Conn> {
        let c = self.conns.remove(&key)?;
        self.conn_tokens.remove(&c.token);
        if c.registered.is_some() {
            let _ = self.epoll.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
        }
        Some(c)
    }

    /// Resets a connection: RST to the guest, close the host stream.
    fn kill(&mut self, key: ConnKey) {
        if self.forget(key).is_some() {
            let rst = self.rst_for(key);
            self.queue_rst(rst);
        }
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let hup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if set.contains(EventSet::ERROR) || (hup && c.state == State::LocalInit) {
            debug!(?key, "vsock: host stream failed or hung up");
            return self.kill(key);
        }
        if set.contains(EventSet::OUT) || (hup && !c.tx_buf.is_empty()) {
            if let Err(e) = c.flush() {
                debug!(?key, "vsock: writing to the host stream: {e}");
                return self.kill(key);
            }
            if c.finished() {
                return self.kill(key);
            }
        }
        if set.contains(EventSet::IN) || hup {
            c.data_ready = true;
        }
        if hup && !c.hup {
            // Level-triggered HUP would fire forever: read what is left without epoll.
            c.hup = true;
            c.registered = None;
            let _ = self.epoll.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
            if c.host_eof || c.peer_shut_rcv {
                // The host is gone and nothing more can move host -> guest.
                return self.kill(key);
            }
        }
        self.schedule(key);
    }

    fn sync_interest(&mut self) {
        for c in self.conns.values_mut() {
            let Some(reg) = c.registered else { continue };
            let want = c.interest();
            if want != reg {
                match self.epoll.ctl(ControlOperation::Modify, c.stream.as_raw_fd(), EpollEvent::new(want, c.token)) {
                    Ok(()) => c.registered = Some(want),
                    Err(e) => warn!("vsock: epoll modify: {e}"),
                }
            }
        }
    }

    // ---- tx: guest -> host ----

    fn process_tx(&mut self) {
        while let Some(chain) = self.w.txq.pop_descriptor_chain(&self.w.mem) {
            let head = chain.head_index();
            let segs = Segments::collect(chain, false);
            match read_packet(&self.w.mem, &segs) {
                Ok((hdr, payload)) => self.guest_packet(hdr, &payload),
                Err(e) => crate::guest_warn!("vsock: dropping a malformed tx packet: {e}"),
            }
            if let Err(e) = self.w.txq.add_used(&self.w.mem, head, 0) {
                crate::guest_warn!("vsock: tx add_used: {e}");
            }
            self.tx_used = true;
        }
    }

    fn guest_packet(&mut self, hdr: Header, payload: &[u8]) {
        if hdr.src_cid != self.w.guest_cid {
            crate::guest_warn!(src_cid = hdr.src_cid, "vsock: packet from the guest with a wrong source CID, dropped");
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            debug!(dst_cid = hdr.dst_cid, type_ = hdr.type_, "vsock: packet for no host stream socket");
            if hdr.op != OP_RST {
                let mut rst = self.rst_for(key);
                rst.src_cid = hdr.dst_cid;
                rst.type_ = hdr.type_;
                self.queue_rst(rst);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(key, &hdr),
                OP_RST => {}
                _ => {
                    debug!(?key, op = hdr.op, "vsock: packet for an unknown connection");
                    let rst = self.rst_for(key);
                    self.queue_rst(rst);
                }
            }
            return;
        };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            OP_RESPONSE if c.state == State::LocalInit => {
                let line = format!("OK {}\n", key.0);
                match c.stream.write(line.as_bytes()) {
                    Ok(n) if n == line.len() => {
                        debug!(?key, "vsock: host-initiated connection established");
                        c.state = State::Established;
                        c.deadline = None;
                    }
                    _ => {
                        debug!(?key, "vsock: host client went away before OK");
                        return self.kill(key);
                    }
                }
            }
            OP_RW if c.state == State::Established && !c.peer_shut_send => {
                if c.tx_buf.len() + payload.len() > BUF_ALLOC as usize {
                    crate::guest_warn!(?key, "vsock: the guest sent beyond its credit, resetting");
                    return self.kill(key);
                }
                let mut off = 0;
                if c.tx_buf.is_empty() {
                    while off < payload.len() {
                        match c.stream.write(&payload[off..]) {
                            Ok(0) => break,
                            Ok(n) => off += n,
                            Err(e) if would_block(&e) => break,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => {
                                debug!(?key, "vsock: writing to the host stream: {e}");
                                return self.kill(key);
                            }
                        }
                    }
                    c.fwd_cnt = count_bytes(c.fwd_cnt, off);
                }
                c.tx_buf.extend(&payload[off..]);
                if c.after_forward().is_err() {
                    return self.kill(key);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => c.pending |= P_CREDIT_UPDATE,
            OP_SHUTDOWN => {
                debug!(?key, flags = hdr.flags, "vsock: guest shut down");
                c.peer_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                c.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                if c.peer_shut_rcv {
                    c.pending &= !(P_CREDIT_REQUEST | P_CREDIT_UPDATE);
                }
                if c.peer_shut_rcv && c.peer_shut_send && c.deadline.is_none() {
                    // A full close: give buffered data a bounded time to drain.
                    c.deadline = Some(Instant::now() + self.w.timeouts.shutdown);
                }
                if c.after_forward().is_err() || c.finished() {
                    return self.kill(key);
                }
            }
            OP_RST => {
                debug!(?key, "vsock: guest reset the connection");
                self.forget(key);
                return;
            }
            op => {
                crate::guest_warn!(?key, op, state = ?c.state, "vsock: unexpected packet, resetting");
                return self.kill(key);
            }
        }
        self.schedule(key);
    }

    /// The guest connects to host port `key.0`: `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, req: &Header) {
        let path = guest_port_path(&self.w.uds_path, key.0);
        if self.conns.len() >= MAX_CONNECTIONS {
            crate::guest_warn!("vsock: too many connections, refusing the guest's");
            let rst = self.rst_for(key);
            return self.queue_rst(rst);
        }
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                debug!(?key, path = %path.display(), "vsock: guest connect failed: {e}");
                let rst = self.rst_for(key);
                return self.queue_rst(rst);
            }
        };
        let token = self.alloc_token();
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::empty(), token)) {
            warn!("vsock: registering a stream: {e}");
            let rst = self.rst_for(key);
            return self.queue_rst(rst);
        }
        debug!(?key, path = %path.display(), "vsock: guest connected to the host");
        let mut c = Conn::new(stream, token, State::Established);
        c.registered = Some(EventSet::empty());
        c.pending = P_RESPONSE;
        // The REQUEST carries the guest's receive credit.
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = req.fwd_cnt;
        self.conns.insert(key, c);
        self.conn_tokens.insert(token, key);
        self.schedule(key);
    }

    // ---- rx: host -> guest ----

    fn process_rx(&mut self) {
        while !self.rst_queue.is_empty() || !self.rx_ready.is_empty() {
            let Some(chain) = self.w.rxq.pop_descriptor_chain(&self.w.mem) else {
                break;
            };
            let head = chain.head_index();
            let segs = Segments::collect(chain, true);
            let written = if segs.total() < HDR_LEN as u64 {
                crate::guest_warn!("vsock: rx buffer smaller than a header, returned unused");
                Some(0)
            } else if let Some(rst) = self.rst_queue.pop_front() {
                Some(self.put(&segs, rst, 0))
            } else {
                self.conn_packet(&segs)
            };
            match written {
                Some(len) => {
                    if let Err(e) = self.w.rxq.add_used(&self.w.mem, head, len) {
                        crate::guest_warn!("vsock: rx add_used: {e}");
                    }
                    self.rx_used = true;
                }
                None => {
                    // Nothing to send after all: give the buffer back to the ring.
                    let q = &mut self.w.rxq;
                    q.set_next_avail(q.next_avail().wrapping_sub(1));
                    break;
                }
            }
        }
    }

    /// Writes a header (and `self.scratch[..len]`) into rx segments; returns the used length.
    fn put(&self, segs: &Segments, hdr: Header, len: usize) -> u32 {
        match write_packet(&self.w.mem, segs, hdr, &self.scratch[..len]) {
            Ok(n) => n,
            Err(e) => {
                crate::guest_warn!("vsock: writing an rx packet: {e}");
                0
            }
        }
    }

    /// The next packet a scheduled connection owes the guest, written into `segs`.
    fn conn_packet(&mut self, segs: &Segments) -> Option<u32> {
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_rx_ready = false;
            let mut hdr = Header {
                src_cid: HOST_CID,
                dst_cid: self.w.guest_cid,
                src_port: key.0,
                dst_port: key.1,
                type_: TYPE_STREAM,
                buf_alloc: BUF_ALLOC,
                ..Default::default()
            };
            let mut len = 0usize;
            let take = |c: &mut Conn, bit: u8| {
                let had = c.pending & bit != 0;
                c.pending &= !bit;
                had
            };
            if take(c, P_REQUEST) {
                hdr.op = OP_REQUEST;
            } else if take(c, P_RESPONSE) {
                hdr.op = OP_RESPONSE;
            } else if take(c, P_CREDIT_UPDATE) {
                hdr.op = OP_CREDIT_UPDATE;
            } else if take(c, P_CREDIT_REQUEST) {
                hdr.op = OP_CREDIT_REQUEST;
            } else if c.data_ready && c.can_send_data() {
                let room = usize::try_from(segs.total() - HDR_LEN as u64).unwrap_or(usize::MAX).min(MAX_PKT_PAYLOAD);
                let want = room.min(c.peer_credit() as usize);
                if want == 0 {
                    // A header-only buffer: nothing to put data in. Try the others later.
                    self.rx_ready.push_front(key);
                    c.in_rx_ready = true;
                    return Some(0);
                }
                match c.stream.read(&mut self.scratch[..want]) {
                    Ok(0) => {
                        debug!(?key, "vsock: host stream EOF, shutting down the guest side");
                        c.data_ready = false;
                        c.host_eof = true;
                        c.pending |= P_SHUTDOWN;
                    }
                    Ok(n) => {
                        if n < want && !c.hup {
                            // Drained for now: epoll says when there is more. A full
                            // read likely left more (read on while buffers last), and a
                            // hung-up stream is read until EOF.
                            c.data_ready = false;
                        }
                        c.tx_cnt = count_bytes(c.tx_cnt, n);
                        if c.peer_credit() == 0 {
                            c.pending |= P_CREDIT_REQUEST;
                        }
                        hdr.op = OP_RW;
                        len = n;
                    }
                    Err(e) if would_block(&e) || e.kind() == ErrorKind::Interrupted => {
                        c.data_ready = c.hup;
                    }
                    Err(e) => {
                        debug!(?key, "vsock: reading the host stream: {e}");
                        self.forget(key);
                        return Some(self.put(segs, self.rst_for(key), 0));
                    }
                }
            }
            if hdr.op == 0 && take(c, P_SHUTDOWN) {
                hdr.op = OP_SHUTDOWN;
                hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                if c.deadline.is_none() {
                    c.deadline = Some(Instant::now() + self.w.timeouts.shutdown);
                }
            }
            if hdr.op == 0 {
                // Nothing after all (a spurious wakeup); it is re-armed by interest.
                continue;
            }
            hdr.fwd_cnt = c.fwd_cnt;
            c.last_fwd_cnt_sent = c.fwd_cnt;
            if c.has_rx_work() {
                c.in_rx_ready = true;
                self.rx_ready.push_back(key);
            }
            let finished = c.finished();
            let written = self.put(segs, hdr, len);
            if finished && hdr.op == OP_SHUTDOWN {
                // The guest had shut down its side already: both sides are done.
                self.forget(key);
                self.queue_rst(self.rst_for(key));
            }
            return Some(written);
        }
        None
    }
}
