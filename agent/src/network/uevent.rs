//! Kernel uevents (`NETLINK_KOBJECT_UEVENT`, multicast group 1: the kernel's own
//! messages, not udev's re-broadcasts).
//!
//! Uevents of network devices are tagged with the device's network namespace:
//! the kernel delivers them only to uevent sockets opened in that namespace. So
//! the socket must be opened in the namespace the devices appear in
//! ([`UeventSocket::open_in`]).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vfvm_netlink::Netns;

use super::error::{NetError, Result};

/// Receive buffer asked for: hot-plug bursts (a PCI device, its driver, its
/// queues) are a few dozen messages; overflow is survived anyway (see
/// [`Recv::Overflow`]).
const RCVBUF: libc::c_int = 1 << 20;
/// Largest uevent the kernel sends (`UEVENT_BUFFER_SIZE`) plus its header.
const MSG_MAX: usize = 4096 + 512;

/// One kernel uevent, the fields that matter here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Uevent {
    /// "add", "remove", "move", "change", "bind", ...
    pub action: String,
    pub devpath: String,
    pub subsystem: Option<String>,
    /// `INTERFACE=` of net devices.
    pub interface: Option<String>,
    /// `MODALIAS=`: what a driver for the device matches (PCI, virtio, ... devices).
    pub modalias: Option<String>,
}

/// What one receive gave.
#[derive(Debug)]
pub enum Recv {
    Event(Uevent),
    /// The socket overflowed (ENOBUFS): events were lost; look again.
    Overflow,
    /// Nothing arrived before the deadline.
    Timeout,
}

/// The size of `T` as a socket call takes it.
fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).expect("a socket option or address is a few bytes")
}

/// A subscribed uevent socket.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
}

impl UeventSocket {
    /// Opens and subscribes a socket in the calling thread's network namespace.
    pub fn open() -> Result<UeventSocket> {
        let err = |op| move |source| NetError::Uevent { op, source };
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, libc::NETLINK_KOBJECT_UEVENT)
        };
        if fd < 0 {
            return Err(err("socket")(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt with a c_int option value of the right size.
            let r = unsafe {
                libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, (&RCVBUF as *const libc::c_int).cast(), socklen_of::<libc::c_int>())
            };
            if r == 0 {
                break; // FORCE needs CAP_NET_ADMIN; plain RCVBUF is capped but fine
            }
        }
        // SAFETY: zeroed sockaddr_nl is a valid value; fields set below.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::sa_family_t::try_from(libc::AF_NETLINK).expect("AF_NETLINK is 16");
        sa.nl_pid = 0;
        sa.nl_groups = 1;
        // SAFETY: bind with a properly sized sockaddr_nl.
        let r = unsafe { libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_nl).cast(), socklen_of::<libc::sockaddr_nl>()) };
        if r != 0 {
            return Err(err("bind to the kernel's group")(io::Error::last_os_error()));
        }
        Ok(UeventSocket { fd })
    }

    /// Opens and subscribes a socket in `ns` (the socket stays in `ns`).
    pub fn open_in(ns: &Netns) -> Result<UeventSocket> {
        ns.run_in(UeventSocket::open)
            .map_err(|source| NetError::Netlink { context: "open a uevent socket in the network namespace".into(), source })?
    }

    /// Waits until `deadline` for one message. Messages not from the kernel
    /// (sender port id other than 0) and ones that do not parse are skipped.
    pub fn recv(&self, deadline: Instant) -> Result<Recv> {
        let mut buf = vec![0u8; MSG_MAX];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(Recv::Timeout);
            }
            let left = deadline - now;
            // Round up so a sub-millisecond remainder does not spin.
            let ms = libc::c_int::try_from(left.as_millis().saturating_add(1)).unwrap_or(libc::c_int::MAX);
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetError::Uevent { op: "poll", source: e });
            }
            if r == 0 {
                continue; // the loop head decides whether the deadline passed
            }
            // SAFETY: zeroed sockaddr_nl is valid; recvfrom fills at most its size.
            let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut salen = socklen_of::<libc::sockaddr_nl>();
            // SAFETY: buf is valid for buf.len() bytes; sa/salen as above.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut sa as *mut libc::sockaddr_nl).cast(),
                    &mut salen,
                )
            };
            // Negative: an error.
            let Ok(n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                    Some(libc::ENOBUFS) => return Ok(Recv::Overflow),
                    _ => return Err(NetError::Uevent { op: "recv", source: e }),
                }
            };
            if sa.nl_pid != 0 {
                continue; // not the kernel
            }
            let n = n.min(buf.len());
            if let Some(ev) = parse(&buf[..n]) {
                return Ok(Recv::Event(ev));
            }
        }
    }
}

/// Parses "ACTION@DEVPATH\0KEY=VALUE\0...".
pub(crate) fn parse(msg: &[u8]) -> Option<Uevent> {
    let mut parts = msg.split(|&b| b == 0);
    let head = std::str::from_utf8(parts.next()?).ok()?;
    let (action, devpath) = head.split_once('@')?;
    let mut ev = Uevent { action: action.to_string(), devpath: devpath.to_string(), ..Default::default() };
    for p in parts {
        let Ok(kv) = std::str::from_utf8(p) else {
            continue;
        };
        if let Some((k, v)) = kv.split_once('=') {
            match k {
                "ACTION" => ev.action = v.to_string(),
                "SUBSYSTEM" => ev.subsystem = Some(v.to_string()),
                "INTERFACE" => ev.interface = Some(v.to_string()),
                "MODALIAS" => ev.modalias = Some(v.to_string()),
                _ => {}
            }
        }
    }
    Some(ev)
}

impl Uevent {
    /// An event after which a network device may have appeared or changed name.
    pub fn may_bring_a_netdev(&self) -> bool {
        self.subsystem.as_deref() == Some("net") && matches!(self.action.as_str(), "add" | "move")
    }
}

/// Helper for callers waiting with a total budget.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or(now + Duration::from_secs(86_400 * 365))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_format() {
        let m = b"add@/devices/virtual/net/vt0\0ACTION=add\0DEVPATH=/devices/virtual/net/vt0\0SUBSYSTEM=net\0INTERFACE=vt0\0IFINDEX=5\0SEQNUM=1\0";
        let e = parse(m).unwrap();
        assert_eq!(e.action, "add");
        assert_eq!(e.subsystem.as_deref(), Some("net"));
        assert_eq!(e.interface.as_deref(), Some("vt0"));
        assert!(e.may_bring_a_netdev());
        assert_eq!(e.modalias, None);
        let m = b"add@/devices/pci0000:00/0000:00:05.0\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:05.0\0SUBSYSTEM=pci\0\
PCI_ID=8086:10CA\0MODALIAS=pci:v00008086d000010CAsv00008086sd00000000bc02sc00i00\0SEQNUM=7\0";
        let e = parse(m).unwrap();
        assert_eq!((e.action.as_str(), e.subsystem.as_deref()), ("add", Some("pci")));
        assert_eq!(e.modalias.as_deref(), Some("pci:v00008086d000010CAsv00008086sd00000000bc02sc00i00"));
        assert!(!e.may_bring_a_netdev());
        assert!(parse(b"garbage").is_none());
        assert!(parse(b"").is_none());
    }
}
