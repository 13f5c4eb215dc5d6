//! Network namespaces as file descriptors.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `NSFS_MAGIC` from `<linux/magic.h>`.
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `NS_GET_NSTYPE` = `_IO(0xb7, 0x3)` from `<linux/nsfs.h>`.
const NS_GET_NSTYPE: u64 = 0xb703;

/// An open network namespace (a descriptor on an nsfs file). The namespace stays
/// alive as long as this value does, even if no process is left in it.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    path: PathBuf,
}

impl Netns {
    /// Opens a network namespace by path (`/run/netns/NAME`, `/proc/PID/ns/net`,
    /// a bind mount of one). A path that exists but is not a network namespace
    /// gives [`Error::NotANetns`] naming the path.
    pub fn open(path: impl AsRef<Path>) -> Result<Netns> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| Error::Netns { op: "open network namespace", path: path.to_path_buf(), source })?;
        let fd: OwnedFd = file.into();
        check_netns(&fd, path)?;
        Ok(Netns { fd, path: path.to_path_buf() })
    }

    /// The calling thread's current network namespace.
    pub fn current() -> Result<Netns> {
        Netns::open("/proc/thread-self/ns/net")
    }

    /// A new, empty network namespace (only `lo`, down) that no process lives in.
    /// Made by a short-lived thread that `unshare(CLONE_NEWNET)`s; needs
    /// CAP_SYS_ADMIN. Meant for tests, here and in the crates that use this one.
    pub fn new_anonymous() -> Result<Netns> {
        let joined = std::thread::Builder::new()
            .name("netns-new".into())
            .spawn(|| -> Result<Netns> {
                // SAFETY: plain syscall; affects only this short-lived thread.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(Error::Netns {
                        op: "unshare(CLONE_NEWNET) for",
                        path: PathBuf::from("a new anonymous network namespace"),
                        source: std::io::Error::last_os_error(),
                    });
                }
                let mut ns = Netns::open("/proc/thread-self/ns/net")?;
                ns.path = PathBuf::from("<anonymous netns>");
                Ok(ns)
            })
            .map_err(|source| Error::Netns {
                op: "spawn a thread to create",
                path: PathBuf::from("a new anonymous network namespace"),
                source,
            })?
            .join();
        match joined {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// The path this namespace was opened from (a placeholder for anonymous ones).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `other` is the same namespace (same nsfs inode).
    pub fn same_as(&self, other: &Netns) -> Result<bool> {
        Ok(self.ident()? == other.ident()?)
    }

    fn ident(&self) -> Result<(u64, u64)> {
        // SAFETY: `stat` is a plain C struct for which all-zero bytes are a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into `st`, a live, correctly typed local, on a descriptor we own.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } != 0 {
            return Err(Error::Netns { op: "fstat", path: self.path.clone(), source: std::io::Error::last_os_error() });
        }
        Ok((st.st_dev, st.st_ino))
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its
    /// result. The calling thread is not affected. Children spawned by `f`
    /// (e.g. `std::process::Command`) start in this namespace. A panic in `f` is
    /// propagated.
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let fd = self.fd.as_raw_fd();
        let path = &self.path;
        let joined = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("netns-enter".into())
                .spawn_scoped(s, move || -> Result<T> {
                    // SAFETY: setns on a descriptor kept open by `self` for the
                    // whole scope; affects only this thread.
                    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                        return Err(Error::Netns {
                            op: "setns into network namespace",
                            path: path.clone(),
                            source: std::io::Error::last_os_error(),
                        });
                    }
                    Ok(f())
                })
                .map(|h| h.join())
        });
        match joined {
            Ok(Ok(r)) => r,
            Ok(Err(p)) => std::panic::resume_unwind(p),
            Err(source) => Err(Error::Netns { op: "spawn a thread to enter", path: self.path.clone(), source }),
        }
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn check_netns(fd: &OwnedFd, path: &Path) -> Result<()> {
    let not = |reason: String| Error::NotANetns { path: path.to_path_buf(), reason };
    // SAFETY: `statfs` is a plain C struct for which all-zero bytes are a valid value.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `sfs`, a live, correctly typed local, on a descriptor `fd` keeps open.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut sfs) } != 0 {
        return Err(Error::Netns { op: "fstatfs", path: path.to_path_buf(), source: std::io::Error::last_os_error() });
    }
    // f_type is i64 on x86_64 but differs in width and sign between libc targets:
    // the cast is a no-op here and needed elsewhere.
    #[allow(clippy::unnecessary_cast)]
    let magic = sfs.f_type as i64;
    if magic != NSFS_MAGIC {
        return Err(not(format!("it is not on nsfs (filesystem magic {magic:#x})")));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and returns the CLONE_NEW* type.
    let ty = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if ty < 0 {
        return Err(not(format!("NS_GET_NSTYPE failed: {}", std::io::Error::last_os_error())));
    }
    if ty != libc::CLONE_NEWNET {
        let kind = match ty {
            libc::CLONE_NEWNS => "a mount namespace",
            libc::CLONE_NEWUTS => "a UTS namespace",
            libc::CLONE_NEWIPC => "an IPC namespace",
            libc::CLONE_NEWUSER => "a user namespace",
            libc::CLONE_NEWPID => "a PID namespace",
            libc::CLONE_NEWCGROUP => "a cgroup namespace",
            0x80 => "a time namespace",
            _ => "another kind of namespace",
        };
        return Err(not(format!("it is {kind}")));
    }
    Ok(())
}
