//! Tap devices for a VM's virtio-net, created the way the VMM takes them over: one
//! file per queue pair (`IFF_MULTI_QUEUE`), frames with a virtio-net header in front
//! (`IFF_VNET_HDR`), no packet-information prefix (`IFF_NO_PI`).
//!
//! The tap is not persistent: it exists while one of its queue files is open, so a VMM
//! that holds them (and nothing else) takes the tap with it when it exits, however it
//! exits. It is created in the network namespace of the calling thread (enter the pod's
//! with [`crate::Netns::run_in`]).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::{Error, Result};

const TUN_PATH: &str = "/dev/net/tun";
/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
/// The most queue files a tap may have (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_TAP_QUEUES: usize = 256;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest of the
/// union is padding here).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates tap `name` with `queues` queue files (1 to [`MAX_TAP_QUEUES`]) in the calling
/// thread's network namespace, and returns them in queue order. Fails if a link of that
/// name exists and is not a tap this way (the kernel's EINVAL/EBUSY).
pub fn create_tap(name: &str, queues: usize) -> Result<Vec<File>> {
    let object = || format!("tap {name:?}");
    let invalid = |detail: String| Error::InvalidArgument { op: "create", object: object(), detail };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace()) {
        return Err(invalid(format!("a link name is 1 to {} bytes without '/', NUL or spaces", libc::IFNAMSIZ - 1)));
    }
    if !(1..=MAX_TAP_QUEUES).contains(&queues) {
        return Err(invalid(format!("{queues} queues: expected 1 to {MAX_TAP_QUEUES}")));
    }
    let mut files = Vec::with_capacity(queues);
    for _ in 0..queues {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(|source| Error::Device { op: "open /dev/net/tun for", object: object(), source })?;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may write back the name into) a `struct ifreq`;
        // `req` has its layout and size and lives across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, std::ptr::from_mut(&mut req)) };
        if rc != 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            return Err(Error::Kernel { op: "create", object: object(), errno, message: None });
        }
        files.push(file);
    }
    Ok(files)
}
