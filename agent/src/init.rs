//! PID 1's duties in the guest: the filesystems every process expects, the kernel
//! modules baked into the image, and reaping orphans.

use std::path::Path;

/// A failure of one init step, naming it.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct InitError {
    pub step: String,
    pub source: std::io::Error,
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>) -> Result<(), InitError> {
    let err = |source| InitError { step: format!("mount {fstype} on {target}"), source };
    std::fs::create_dir_all(target).map_err(err)?;
    let c = |s: &str| std::ffi::CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput));
    let (src, tgt, fs) = (c(source).map_err(err)?, c(target).map_err(err)?, c(fstype).map_err(err)?);
    let data = data.map(c).transpose().map_err(err)?;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), flags, data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()))
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // Already mounted (e.g. devtmpfs by the kernel) is fine.
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(err(e));
        }
    }
    Ok(())
}

/// The filesystems of a running system.
pub fn mount_filesystems() -> Result<(), InitError> {
    let nodev_nosuid_noexec = libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nodev_nosuid_noexec, None)?;
    mount("sysfs", "/sys", "sysfs", nodev_nosuid_noexec, None)?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, Some("mode=0755"))?;
    mount("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, Some("gid=5,mode=620,ptmxmode=666"))?;
    mount("tmpfs", "/dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, Some("mode=1777"))?;
    mount("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, Some("mode=0755"))?;
    mount("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, Some("mode=1777"))?;
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev_nosuid_noexec, None)?;
    Ok(())
}

/// Loads the kernel modules listed, one path per line (relative to `modules_dir`),
/// in that order; `#` comments and blank lines are skipped. A module already
/// loaded is fine; any other failure names the module. Returns how many loaded.
pub fn load_modules(manifest: &Path, modules_dir: &Path) -> Result<usize, InitError> {
    let text = std::fs::read_to_string(manifest).map_err(|source| InitError { step: format!("read {}", manifest.display()), source })?;
    let mut loaded = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let path = modules_dir.join(line);
        let err = |source| InitError { step: format!("load module {}", path.display()), source };
        let file = std::fs::File::open(&path).map_err(err)?;
        use std::os::fd::AsRawFd;
        // SAFETY: finit_module on an open module file with empty parameters.
        let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(err(e));
            }
        }
        loaded += 1;
    }
    Ok(loaded)
}

/// As PID 1, every orphan in the guest becomes our child: reap them all so none
/// stays a zombie. SIGCHLD must be blocked in every thread (call before spawning
/// any), so this thread alone takes it.
pub fn spawn_reaper() -> std::io::Result<()> {
    // SAFETY: signal mask calls on a zeroed local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        set
    };
    std::thread::Builder::new().name("reaper".into()).spawn(move || loop {
        let mut sig = 0;
        // SAFETY: waiting on a signal set we own.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        loop {
            let mut status = 0;
            // SAFETY: plain waitpid for any child, non-blocking.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            tracing::debug!(pid, status, "reaped");
        }
    })?;
    Ok(())
}
