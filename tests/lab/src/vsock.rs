//! AF_VSOCK listening for the lab's programs: the probe in an L3 guest and the agent
//! check's log collector in L2. (Connecting is `vfvm_protocols::client::vsock_connect`.)

use anyhow::{ensure, Result};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A stream socket listening on vsock `port` of every local CID.
pub fn listen(port: u32, backlog: i32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "socket(AF_VSOCK): {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    sa.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).expect("AF_VSOCK is 40");
    sa.svm_cid = libc::VMADDR_CID_ANY;
    sa.svm_port = port;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>()).expect("a sockaddr_vm is 16 bytes");
    // SAFETY: sa is a valid sockaddr_vm of `len` bytes.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) };
    ensure!(rc == 0, "bind vsock port {port}: {}", std::io::Error::last_os_error());
    // SAFETY: listen(2) on our socket.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), backlog) };
    ensure!(rc == 0, "listen on vsock port {port}: {}", std::io::Error::last_os_error());
    Ok(fd)
}

/// The next connection on `listener`.
pub fn accept(listener: &OwnedFd) -> Result<File> {
    // SAFETY: accept(2) without an address; the new fd is owned at once.
    let fd = unsafe { libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    ensure!(fd >= 0, "accept: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}
