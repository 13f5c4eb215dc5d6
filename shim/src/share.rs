//! A container's host files and directories (CRI's /etc/hosts, resolv.conf,
//! hostname and termination log; the pod's volumes) shared with the guest: each is
//! bind-mounted under the container's directory of the sandbox's host-only mounts
//! tree ([`crate::sandbox::HOST_MOUNTS_DIR`]), whose mounts propagate to the
//! read-only tree virtiofsd exports. The guest reads and writes the real host file
//! or directory (a termination message reaches the kubelet, a volume is live both
//! ways), and a read-only mount is read-only on the host side too: the mount is
//! made read-only while still detached, so every copy of it (the exported one,
//! virtiofsd's) is read-only from the start. Each mount is journaled first and
//! undone at the container's removal or by the sandbox's teardown.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::bundle::ShareMount;
use crate::record::{self, Journal};

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("sharing {source_path} with the VM at {target}: {what}: {error}")]
    Mount { source_path: PathBuf, target: PathBuf, what: &'static str, error: std::io::Error },
    #[error(transparent)]
    Record(#[from] record::RecordError),
}

/// Bind-mounts each of `shares` into `files_dir` (the container's `files`, under the
/// host-only tree) as its name, journaled before it is made. Returns the mount
/// points in the order made; on an error, what was made is undone first.
pub fn mount_all(journal: &Journal, files_dir: &Path, shares: &[ShareMount]) -> Result<Vec<PathBuf>, ShareError> {
    let mut made = Vec::new();
    for share in shares {
        let target = files_dir.join(&share.name);
        if let Err(e) = mount_one(journal, share, &target, &mut made) {
            unmount_all(journal, &made);
            return Err(e);
        }
    }
    Ok(made)
}

fn mount_one(journal: &Journal, share: &ShareMount, target: &Path, made: &mut Vec<PathBuf>) -> Result<(), ShareError> {
    let fail = |what: &'static str| {
        move |error: std::io::Error| ShareError::Mount { source_path: share.source.clone(), target: target.to_path_buf(), what, error }
    };
    let parent = target.parent().unwrap_or(target);
    std::fs::create_dir_all(parent).map_err(fail("creating the directory for the mount point"))?;
    // The mount point: the host-only tree is the shim's alone, so nothing is there to follow.
    match share.dir {
        true => std::fs::create_dir(target).map_err(fail("creating the mount point"))?,
        false => drop(std::fs::OpenOptions::new().write(true).create_new(true).open(target).map_err(fail("creating the mount point"))?),
    }
    journal.will_mount(target)?;
    let attached = clone_tree(&share.source).map_err(fail("cloning the mount (open_tree)")).and_then(|tree| {
        if share.read_only {
            set_read_only(&tree).map_err(fail("making it read-only (mount_setattr)"))?;
        }
        attach(&tree, target).map_err(fail("attaching it (move_mount)"))
    });
    match attached {
        Ok(()) => {
            made.push(target.to_path_buf());
            Ok(())
        }
        // Nothing was attached: the journal forgets the mount point again.
        Err(e) => {
            let _ = journal.unmounted(target);
            Err(e)
        }
    }
}

/// Unmounts `mounts` in reverse order (without following a link at any of them),
/// each noted in the journal once gone; the errors, each naming its mount point.
pub fn unmount_all(journal: &Journal, mounts: &[PathBuf]) -> Vec<String> {
    let mut errors = Vec::new();
    for m in mounts.iter().rev() {
        match record::unmount(m) {
            Ok(_) => {
                let _ = journal.unmounted(m);
            }
            Err(e) => errors.push(format!("unmounting {}: {e}", m.display())),
        }
    }
    errors
}

fn c_path(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

// The new mount API (Linux 5.12 for mount_setattr): the libc crate has the syscall
// numbers, not the flags and struct.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached copy of the mount tree at `source` (a directory with what is mounted
/// under it, or a file), as `mount --rbind` would attach it.
fn clone_tree(source: &Path) -> std::io::Result<OwnedFd> {
    let path = c_path(source)?;
    let flags = OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint;
    // SAFETY: open_tree(2) with a NUL-terminated path we own; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other(format!("open_tree returned {fd}, not a descriptor")))?;
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes a detached tree read-only, every mount of it.
fn set_read_only(tree: &OwnedFd) -> std::io::Result<()> {
    let attr = MountAttr { attr_set: MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 };
    let flags = libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE;
    // SAFETY: mount_setattr(2) on a descriptor we own, an empty path, and a struct
    // of the size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches a detached tree at `target`.
fn attach(tree: &OwnedFd, target: &Path) -> std::io::Result<()> {
    let to = c_path(target)?;
    // SAFETY: move_mount(2) from a descriptor we own to a NUL-terminated path we own.
    let rc = unsafe {
        libc::syscall(libc::SYS_move_mount, tree.as_raw_fd(), c"".as_ptr(), libc::AT_FDCWD, to.as_ptr(), MOVE_MOUNT_F_EMPTY_PATH)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox;

    fn mount_options(p: &Path) -> Option<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.get(4) == p.to_str().as_ref())
            .map(|f| f[5].to_string())
    }

    /// On this kernel, through the sandbox's two trees: a shared file and directory
    /// show in the exported tree with their host content, live both ways; a
    /// read-only one is read-only in the exported tree as well (mounted read-only
    /// before it was attached), and the host side is unchanged by a write attempt;
    /// removal unmounts them all.
    #[test]
    fn shared_files_and_directories_are_live_and_read_only_ones_stay_so() {
        let base = std::env::temp_dir().join(format!("vfvm-share-mounts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (host, dir) = (base.join("host"), base.join("sandbox"));
        std::fs::create_dir_all(host.join("volume")).unwrap();
        std::fs::create_dir_all(host.join("config")).unwrap();
        std::fs::write(host.join("termination-log"), "").unwrap();
        std::fs::write(host.join("config").join("key"), "v1").unwrap();
        let journal = Journal::create(&dir, "sb-mounts").unwrap();
        let exported = sandbox::make_share(&dir, &journal).unwrap();
        let shares = [
            ShareMount { source: host.join("termination-log"), name: "0-termination-log".into(), read_only: false, dir: false },
            ShareMount { source: host.join("volume"), name: "1-volume".into(), read_only: false, dir: true },
            ShareMount { source: host.join("config"), name: "2-config".into(), read_only: true, dir: true },
        ];
        let files = sandbox::container_files(&dir, "c1");
        let made = mount_all(&journal, &files, &shares).unwrap();
        assert_eq!(made, shares.iter().map(|s| files.join(&s.name)).collect::<Vec<_>>());
        let seen = exported.join("c1").join("files");

        std::fs::write(seen.join("0-termination-log"), "bye").unwrap();
        assert_eq!(std::fs::read_to_string(host.join("termination-log")).unwrap(), "bye");
        std::fs::write(seen.join("1-volume").join("from-guest"), "g").unwrap();
        std::fs::write(host.join("volume").join("from-host"), "h").unwrap();
        assert_eq!(std::fs::read_to_string(host.join("volume").join("from-guest")).unwrap(), "g");
        assert_eq!(std::fs::read_to_string(seen.join("1-volume").join("from-host")).unwrap(), "h");

        assert_eq!(std::fs::read_to_string(seen.join("2-config").join("key")).unwrap(), "v1");
        let write = std::fs::write(seen.join("2-config").join("key"), "evil");
        assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
        assert!(mount_options(&seen.join("2-config")).unwrap().starts_with("ro"), "the exported copy is read-only");
        assert!(mount_options(&seen.join("1-volume")).unwrap().starts_with("rw"));
        std::fs::write(host.join("config").join("key"), "v2").unwrap();
        assert_eq!(std::fs::read_to_string(seen.join("2-config").join("key")).unwrap(), "v2", "a host-side update shows");

        assert!(unmount_all(&journal, &made).is_empty());
        assert!(made.iter().all(|m| mount_options(m).is_none()) && mount_options(&seen.join("1-volume")).is_none());
        let done = record::undo(&dir, &dir.join("no-vf-locks"), Vec::new()).unwrap();
        assert!(done.errors.is_empty(), "{done:?}");
        assert_eq!(std::fs::read_to_string(host.join("config").join("key")).unwrap(), "v2");
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// A source that goes away between the spec's check and the mount fails naming
    /// it, and leaves nothing mounted or journaled.
    #[test]
    fn a_failed_share_is_named_and_undone() {
        let base = std::env::temp_dir().join(format!("vfvm-share-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("sandbox");
        std::fs::create_dir_all(base.join("there")).unwrap();
        let journal = Journal::create(&dir, "sb-fail").unwrap();
        let _exported = sandbox::make_share(&dir, &journal).unwrap();
        let shares = [
            ShareMount { source: base.join("there"), name: "0-there".into(), read_only: false, dir: true },
            ShareMount { source: base.join("gone"), name: "1-gone".into(), read_only: false, dir: true },
        ];
        let files = sandbox::container_files(&dir, "c1");
        let e = mount_all(&journal, &files, &shares).unwrap_err().to_string();
        assert!(e.contains(&format!("sharing {} with the VM", base.join("gone").display())) && e.contains("open_tree"), "{e}");
        assert!(mount_options(&files.join("0-there")).is_none(), "the first mount should be undone");
        let record = Journal::load(&dir).unwrap().unwrap();
        assert_eq!(record.mounts.len(), 2, "only the sandbox's two trees stay journaled: {:?}", record.mounts);
        assert!(record::undo(&dir, &dir.join("no-vf-locks"), Vec::new()).unwrap().errors.is_empty());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
