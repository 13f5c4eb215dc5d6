//! One sandbox per VF: an exclusive, non-blocking `flock` on a per-device lock file.
//! The kernel drops it when the holder dies, so a crashed shim never wedges a VF, and
//! the recovery path simply takes it again.

use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::pci::PciAddress;
use super::VfError;

/// Held for as long as a sandbox owns the VF; dropping it releases the VF.
#[derive(Debug)]
pub struct VfLock {
    _file: std::fs::File,
    path: PathBuf,
    addr: PciAddress,
}

impl VfLock {
    /// Takes the lock for `addr` on behalf of `owner`, or fails at once with
    /// [`VfError::Busy`] naming the current owner.
    pub fn acquire(dir: &Path, addr: PciAddress, owner: &str) -> Result<Self, VfError> {
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| VfError::Lock { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let path = dir.join(format!("{addr}.lock"));
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io("open", &path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.take(256).read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(VfError::Busy { addr, owner: if holder.is_empty() { "another sandbox".into() } else { holder.to_string() } });
            }
            return Err(io("flock", &path)(err));
        }
        file.set_len(0).map_err(io("truncate", &path))?;
        file.rewind().map_err(io("seek", &path))?;
        file.write_all(owner.as_bytes()).map_err(io("write", &path))?;
        Ok(Self { _file: file, path, addr })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The VF this lock is for.
    pub fn addr(&self) -> PciAddress {
        self.addr
    }
}
