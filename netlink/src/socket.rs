//! The NETLINK_ROUTE socket and the request/answer exchange.

use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN,
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_MULTIPART, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::error::{Error, Result};
use crate::netns::Netns;

/// Default per-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer a handle starts with (and shrinks back to after a big answer).
const INITIAL_BUF: usize = 32 * 1024;
/// Largest single datagram accepted from the kernel; anything larger is an error.
pub const MAX_DATAGRAM: usize = 1 << 20;
/// How many times a dump the kernel marks inconsistent (NLM_F_DUMP_INTR) is redone.
const DUMP_RETRIES: usize = 3;
/// `NLMSGERR_ATTR_MSG` from `<linux/netlink.h>`.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSG_HDRLEN: usize = 16;

/// What a request expects back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    /// `NLM_F_DUMP`: any number of messages, then `NLMSG_DONE`.
    Dump,
    /// A plain get: exactly one answer message (or an error).
    Get,
    /// A change: `NLM_F_ACK`, answered by an `NLMSG_ERROR` with code 0.
    Ack,
}

/// What an operation is about, for error messages.
pub(crate) struct Ctx<'a> {
    pub op: &'static str,
    pub object: &'a str,
}

impl Ctx<'_> {
    pub fn kernel(&self, errno: i32, message: Option<String>) -> Error {
        Error::Kernel { op: self.op, object: self.object.to_string(), errno, message }
    }
    pub fn io(&self, source: std::io::Error) -> Error {
        Error::Io { op: self.op, object: self.object.to_string(), source }
    }
    pub fn protocol(&self, detail: impl Into<String>) -> Error {
        Error::Protocol { op: self.op, object: self.object.to_string(), detail: detail.into() }
    }
    pub fn invalid(&self, detail: impl Into<String>) -> Error {
        Error::InvalidArgument { op: self.op, object: self.object.to_string(), detail: detail.into() }
    }
    pub fn not_found(&self) -> Error {
        Error::NotFound { op: self.op, object: self.object.to_string() }
    }
}

struct State {
    seq: u32,
    buf: Vec<u8>,
}

/// A synchronous rtnetlink handle: one NETLINK_ROUTE socket, bound in the network
/// namespace it was created for. Every operation acts on that namespace, whatever
/// namespace the calling thread is in later.
///
/// Requests are serialized by an internal lock, so a `Handle` can be shared
/// between threads. Each request has a deadline (see [`Handle::set_timeout`]); a
/// late answer to a timed-out request is recognised by its sequence number and
/// dropped.
pub struct Handle {
    sock: Socket,
    timeout: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("fd", &self.sock.as_raw_fd()).field("timeout", &self.timeout).finish()
    }
}

impl Handle {
    /// A handle on the calling thread's current network namespace.
    pub fn new() -> Result<Handle> {
        Handle::from_socket(open_socket()?)
    }

    /// A handle on `ns`: the socket is created by a short-lived thread that has
    /// entered `ns` (a socket stays in the namespace it was created in).
    pub fn in_netns(ns: &Netns) -> Result<Handle> {
        let sock = ns.run_in(open_socket)??;
        Handle::from_socket(sock)
    }

    fn from_socket(sock: Socket) -> Result<Handle> {
        Ok(Handle { sock, timeout: DEFAULT_TIMEOUT, state: Mutex::new(State { seq: 0, buf: vec![0; INITIAL_BUF] }) })
    }

    /// Sets the per-request timeout (default 5 s): how long one request, a whole
    /// dump included, may take before [`Error::Timeout`].
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.max(Duration::from_millis(1));
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-request; the
        // state (a counter and a buffer) is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `msg` and returns the inner messages of the answer, parsed.
    pub(crate) fn request(&self, ctx: &Ctx<'_>, msg: RouteNetlinkMessage, flags: u16, kind: Kind) -> Result<Vec<RouteNetlinkMessage>> {
        let raw = self.request_raw(ctx, msg, flags, kind)?;
        let mut out = Vec::with_capacity(raw.len());
        for bytes in raw {
            let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes)
                .map_err(|e| ctx.protocol(format!("cannot decode message: {e}")))?;
            match parsed.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                other => return Err(ctx.protocol(format!("unexpected control message {}", other.message_type()))),
            }
        }
        Ok(out)
    }

    /// Sends `msg` and returns the raw bytes (netlink header included) of each
    /// answer message that is not a control message. Dumps the kernel marks
    /// interrupted are redone.
    pub(crate) fn request_raw(&self, ctx: &Ctx<'_>, msg: RouteNetlinkMessage, extra_flags: u16, kind: Kind) -> Result<Vec<Vec<u8>>> {
        let mut flags = NLM_F_REQUEST | extra_flags;
        match kind {
            Kind::Dump => flags |= NLM_F_DUMP,
            Kind::Ack => flags |= NLM_F_ACK,
            Kind::Get => {}
        }
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut out = Vec::new();
            let interrupted = self.exchange(ctx, &mut nl, kind, &mut |m| {
                out.push(m.to_vec());
            })?;
            if !interrupted {
                return Ok(out);
            }
            if attempt >= DUMP_RETRIES {
                return Err(ctx.protocol(format!("the dump was interrupted by concurrent changes {DUMP_RETRIES} times")));
            }
        }
    }

    /// One send and the receive loop until the answer is complete. Returns whether
    /// a dump was marked interrupted.
    fn exchange(
        &self,
        ctx: &Ctx<'_>,
        nl: &mut NetlinkMessage<RouteNetlinkMessage>,
        kind: Kind,
        on_msg: &mut dyn FnMut(&[u8]),
    ) -> Result<bool> {
        let mut st = self.lock();
        st.seq = st.seq.wrapping_add(1).max(1);
        let seq = st.seq;
        nl.header.sequence_number = seq;
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        let kernel = SocketAddr::new(0, 0);
        loop {
            match self.sock.send_to(&out, &kernel, 0) {
                Ok(n) if n == out.len() => break,
                Ok(n) => return Err(ctx.protocol(format!("short send: {n} of {} bytes", out.len()))),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ctx.io(e)),
            }
        }

        let deadline = Instant::now() + self.timeout;
        let mut interrupted = false;
        let result = loop {
            let len = match self.wait_datagram(ctx, deadline) {
                Ok(len) => len,
                Err(e) => break Err(e),
            };
            if len > MAX_DATAGRAM {
                // Consume it so the socket is usable afterwards.
                let _ = self.recv_into(&mut [0u8; 16]);
                break Err(ctx.protocol(format!("an answer of {len} bytes exceeds the {MAX_DATAGRAM}-byte limit")));
            }
            if st.buf.len() < len {
                st.buf.resize(len, 0);
            }
            let n = match self.recv_into(&mut st.buf[..len]) {
                Ok(n) => n.min(len),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => break Err(self.timeout_err(ctx)),
                Err(e) => break Err(ctx.io(e)),
            };
            match walk(ctx, &st.buf[..n], seq, kind, &mut interrupted, on_msg) {
                Ok(true) => break Ok(interrupted),
                Ok(false) => continue,
                Err(e) => break Err(e),
            }
        };
        if st.buf.len() > INITIAL_BUF {
            st.buf.truncate(INITIAL_BUF);
            st.buf.shrink_to_fit();
        }
        result
    }

    fn timeout_err(&self, ctx: &Ctx<'_>) -> Error {
        Error::Timeout { op: ctx.op, object: ctx.object.to_string(), timeout: self.timeout }
    }

    /// Waits (until `deadline`) for the next datagram and returns its full size.
    fn wait_datagram(&self, ctx: &Ctx<'_>, deadline: Instant) -> Result<usize> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_err(ctx));
            }
            self.set_rcvtimeo(left).map_err(|e| ctx.io(e))?;
            let mut probe = [0u8; 16];
            // SAFETY: recv into a stack buffer of the given length.
            let r = unsafe { libc::recv(self.sock.as_raw_fd(), probe.as_mut_ptr().cast(), probe.len(), libc::MSG_PEEK | libc::MSG_TRUNC) };
            // A negative count is the error return, handled below.
            if let Ok(size) = usize::try_from(r) {
                return Ok(size);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if is_timeout(&e) {
                return Err(self.timeout_err(ctx));
            }
            return Err(ctx.io(e));
        }
    }

    fn recv_into(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: recv into a buffer of the given length.
        let r = unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        // Negative only on error.
        usize::try_from(r).map_err(|_| std::io::Error::last_os_error())
    }

    fn set_rcvtimeo(&self, d: Duration) -> std::io::Result<()> {
        // Round up so a sub-microsecond remainder is not 0 (= block forever).
        let usec = d.subsec_micros().max(if d.as_secs() == 0 { 1 } else { 0 });
        // Capped at i32::MAX seconds, which any time_t holds.
        let secs = i32::try_from(d.as_secs()).unwrap_or(i32::MAX);
        let tv = libc::timeval { tv_sec: libc::time_t::from(secs), tv_usec: libc::suseconds_t::from(usec) };
        // SAFETY: setsockopt with a properly sized timeval.
        let r = unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).expect("a timeval is 16 bytes"),
            )
        };
        if r != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

fn open_socket() -> Result<Socket> {
    let ctx = Ctx { op: "open", object: "NETLINK_ROUTE socket" };
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| ctx.io(e))?;
    sock.bind_auto().map_err(|e| ctx.io(e))?;
    // Errors carry only the request's header back, and the kernel's text message.
    // Both are best effort: old kernels lack them, which costs only detail.
    let _ = sock.set_cap_ack(true);
    let _ = sock.set_ext_ack(true);
    Ok(sock)
}

/// Walks the messages of one datagram. Returns Ok(true) when the answer is
/// complete.
fn walk(ctx: &Ctx<'_>, data: &[u8], seq: u32, kind: Kind, interrupted: &mut bool, on_msg: &mut dyn FnMut(&[u8])) -> Result<bool> {
    let mut off = 0;
    while data.len().saturating_sub(off) >= NLMSG_HDRLEN {
        let buf = NetlinkBuffer::new_checked(&data[off..]).map_err(|e| ctx.protocol(format!("bad netlink header: {e}")))?;
        let len = buf.length() as usize;
        let msg = &data[off..off + len];
        off += (len + 3) & !3;
        if buf.sequence_number() != seq {
            // A late answer to an earlier, timed-out request, or a notification.
            continue;
        }
        let payload = &msg[NLMSG_HDRLEN..];
        match buf.message_type() {
            NLMSG_NOOP => continue,
            NLMSG_OVERRUN => return Err(ctx.protocol("NLMSG_OVERRUN")),
            NLMSG_ERROR => {
                let code = read_i32(payload).ok_or_else(|| ctx.protocol("truncated NLMSG_ERROR"))?;
                if code == 0 {
                    return Ok(true);
                }
                let message = extack_message(buf.flags(), &payload[4..]);
                return Err(ctx.kernel(code.saturating_neg(), message));
            }
            NLMSG_DONE => {
                if let Some(code) = read_i32(payload) {
                    if code < 0 {
                        let message = payload.get(4..).and_then(|tlvs| extack_message(NLM_F_ACK_TLVS, tlvs));
                        return Err(ctx.kernel(code.saturating_neg(), message));
                    }
                }
                if buf.flags() & NLM_F_DUMP_INTR != 0 {
                    *interrupted = true;
                }
                return Ok(true);
            }
            _ => {
                if buf.flags() & NLM_F_DUMP_INTR != 0 {
                    *interrupted = true;
                }
                on_msg(msg);
                if kind == Kind::Get && buf.flags() & NLM_F_MULTIPART == 0 {
                    return Ok(true);
                }
            }
        }
    }
    if off < data.len() {
        return Err(ctx.protocol(format!("{} trailing bytes after the last message", data.len() - off)));
    }
    Ok(false)
}

fn read_i32(b: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

/// The kernel's extended-ACK text from the part of an NLMSG_ERROR after the code:
/// the request's header (and its payload unless capped), then TLVs.
fn extack_message(flags: u16, after_code: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let orig_len = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        let l = u32::from_ne_bytes(after_code.get(..4)?.try_into().ok()?) as usize;
        (l + 3) & !3
    };
    let tlvs = after_code.get(orig_len..)?;
    for nla in NlasIterator::new(tlvs) {
        let nla = nla.ok()?;
        if nla.kind() == NLMSGERR_ATTR_MSG {
            let s = String::from_utf8_lossy(nla.value());
            return Some(s.trim_end_matches('\0').to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::{LinkFlags, LinkMessage};

    fn set_lo_up() -> RouteNetlinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = 1;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        RouteNetlinkMessage::SetLink(m)
    }

    /// A request the kernel never answers (a change without NLM_F_ACK, waited on
    /// as if it were a get) times out after the handle's timeout, and the handle
    /// keeps working.
    #[test]
    fn missing_answer_times_out() {
        let ns = Netns::new_anonymous().unwrap();
        let mut h = Handle::in_netns(&ns).unwrap();
        h.set_timeout(Duration::from_millis(300));
        let ctx = Ctx { op: "test", object: "lo" };
        let t0 = Instant::now();
        let e = h.request(&ctx, set_lo_up(), 0, Kind::Get).unwrap_err();
        let took = t0.elapsed();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert!(e.to_string().contains("test lo: no answer"), "{e}");
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "{took:?}");
        // The change itself was applied, and the handle still works.
        assert!(h.link_by_index(1).unwrap().admin_up);
    }

    /// Answers carrying another sequence number (left over from an abandoned
    /// request) are skipped.
    #[test]
    fn stale_answers_are_skipped() {
        let ns = Netns::new_anonymous().unwrap();
        let h = Handle::in_netns(&ns).unwrap();
        h.create_bridge("stale0").unwrap();
        // A dump nobody reads, with a foreign sequence number.
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = 0xdead_beef;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(LinkMessage::default())));
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        h.sock.send_to(&buf, &SocketAddr::new(0, 0), 0).unwrap();
        // Now ordinary requests: the dump's messages are in the way, unread.
        assert_eq!(h.link_by_name("stale0").unwrap().name, "stale0");
        assert_eq!(h.links().unwrap().len(), 2);
        h.set_link_up(1, true).unwrap();
    }

    /// The kernel's extended-ACK text makes it into the error.
    #[test]
    fn extack_message_is_reported() {
        let ns = Netns::new_anonymous().unwrap();
        let h = Handle::in_netns(&ns).unwrap();
        // Host bits set in an IPv4 route destination: the kernel explains.
        let e = h.add_route(&crate::RouteSpec::new("10.1.2.3".parse().unwrap(), 24).dev(1)).unwrap_err();
        let Error::Kernel { errno, message, .. } = &e else { panic!("{e:?}") };
        assert_eq!(*errno, libc::EINVAL);
        assert!(message.as_deref().is_some_and(|m| m.contains("prefix")), "{e}");
        assert!(e.to_string().contains("Invalid argument ("), "{e}");
    }

    #[test]
    fn walk_parses_errors_and_skips_foreign_seq() {
        let ctx = Ctx { op: "op", object: "obj" };
        // seq 7: an NLMSG_DONE that is not ours; seq 8: NLMSG_ERROR -17, capped,
        // with an NLMSGERR_ATTR_MSG "boom".
        let mut d = Vec::new();
        let hdr = |len: u32, ty: u16, flags: u16, seq: u32| {
            let mut v = Vec::new();
            v.extend_from_slice(&len.to_ne_bytes());
            v.extend_from_slice(&ty.to_ne_bytes());
            v.extend_from_slice(&flags.to_ne_bytes());
            v.extend_from_slice(&seq.to_ne_bytes());
            v.extend_from_slice(&0u32.to_ne_bytes());
            v
        };
        d.extend(hdr(20, NLMSG_DONE, 0, 7));
        d.extend_from_slice(&0i32.to_ne_bytes());
        let tlv_len: u16 = 4 + 5; // "boom\0"
        let total = 16 + 4 + 16 + ((u32::from(tlv_len) + 3) & !3);
        d.extend(hdr(total, NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 8));
        d.extend_from_slice(&(-17i32).to_ne_bytes());
        d.extend(hdr(16, 16, 0, 8));
        d.extend_from_slice(&tlv_len.to_ne_bytes());
        d.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        d.extend_from_slice(b"boom\0\0\0\0");
        let mut intr = false;
        let mut seen = 0;
        let e = walk(&ctx, &d, 8, Kind::Ack, &mut intr, &mut |_| seen += 1).unwrap_err();
        assert_eq!(e.to_string(), "op obj: File exists (os error 17) (boom)");
        assert_eq!(seen, 0);
        // Truncated garbage is an error, not a panic.
        for cut in [30, 40] {
            let e = walk(&ctx, &d[..cut], 8, Kind::Ack, &mut intr, &mut |_| ()).unwrap_err();
            assert!(matches!(e, Error::Protocol { .. }), "{e:?}");
        }
    }
}
