//! A tap queue file handed to the VMM (by the shim, which created the tap in the pod's
//! network namespace): checked to be a tap that carries virtio-net headers, then set up
//! for the header this device uses and the offloads the guest accepted.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `TUNGETIFF`: `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ`: `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

// TUNSETOFFLOAD bits: what the tap may hand us (and so the guest) unsegmented.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// `struct ifreq` as TUNGETIFF writes it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("fd {fd}: not an open tap queue ({source})")]
    NotATap { fd: RawFd, source: io::Error },
    #[error("fd {fd} (tap {name}): {what}")]
    Flags { fd: RawFd, name: String, what: &'static str },
    #[error("tap {name}: {op}: {source}")]
    Ioctl { name: String, op: &'static str, source: io::Error },
}

/// One queue of a tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Takes over `fd`, inherited from the process that started the VMM. It must be a
    /// tap queue opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; it is made
    /// non-blocking and close-on-exec, with `header_len` bytes of virtio-net header.
    pub fn from_inherited_fd(fd: RawFd, header_len: usize) -> Result<Tap, TapError> {
        // SAFETY: fcntl(F_GETFD) on any number only reports whether it is open.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotATap { fd, source: io::Error::from_raw_os_error(libc::EBADF) });
        }
        // SAFETY: `fd` is open (checked above) and, by this function's contract, was
        // handed to this process for the VMM alone: owning it closes it exactly once.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let tap = Tap::from_file(file, header_len).map_err(|e| match e {
            TapError::NotATap { source, .. } => TapError::NotATap { fd, source },
            other => other,
        })?;
        Ok(tap)
    }

    /// As [`Tap::from_inherited_fd`], for a file this process opened.
    pub fn from_file(file: File, header_len: usize) -> Result<Tap, TapError> {
        let fd = file.as_raw_fd();
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`, which has its layout.
        if unsafe { libc::ioctl(fd, TUNGETIFF, std::ptr::from_mut(&mut req)) } != 0 {
            return Err(TapError::NotATap { fd, source: io::Error::last_os_error() });
        }
        let end = req.name.iter().position(|&b| b == 0).unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        let flag_error = |what| TapError::Flags { fd, name: name.clone(), what };
        if req.flags & IFF_TAP == 0 {
            return Err(flag_error("a tun (layer 3) device, not a tap"));
        }
        if req.flags & IFF_VNET_HDR == 0 {
            return Err(flag_error("opened without IFF_VNET_HDR (virtio-net headers)"));
        }
        if req.flags & IFF_NO_PI == 0 {
            return Err(flag_error("opened without IFF_NO_PI (it prefixes packet information)"));
        }
        let ioctl_error = |op| {
            let name = name.clone();
            move |source| TapError::Ioctl { name, op, source }
        };
        let header_len = libc::c_int::try_from(header_len).unwrap_or(libc::c_int::MAX);
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which outlives the call.
        if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, std::ptr::from_ref(&header_len)) } != 0 {
            return Err(ioctl_error("TUNSETVNETHDRSZ")(io::Error::last_os_error()));
        }
        set_flag(fd, libc::F_SETFL, libc::O_NONBLOCK, libc::F_GETFL).map_err(ioctl_error("O_NONBLOCK"))?;
        set_flag(fd, libc::F_SETFD, libc::FD_CLOEXEC, libc::F_GETFD).map_err(ioctl_error("FD_CLOEXEC"))?;
        Ok(Tap { file, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Which unsegmented frames the tap may hand us: [`TUN_F_CSUM`] and the TSO bits,
    /// as the guest accepts them (0: only complete, checksummed frames).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) } != 0 {
            return Err(TapError::Ioctl { name: self.name.clone(), op: "TUNSETOFFLOAD", source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Reads one frame (header first) into `buf`: `Ok(None)` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: read into `buf`, which is valid for `buf.len()` bytes.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) => Ok(Some(n)),
            Err(_) => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Writes one frame (header first).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: write from `frame`, which is valid for `frame.len()` bytes.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

fn set_flag(fd: RawFd, set: libc::c_int, flag: libc::c_int, get: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl get/set of descriptor or status flags on an open fd.
    let old = unsafe { libc::fcntl(fd, get) };
    // SAFETY: as above.
    if old < 0 || unsafe { libc::fcntl(fd, set, old | flag) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
