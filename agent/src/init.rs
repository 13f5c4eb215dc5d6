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

/// What the reaper calls with a registered child's raw wait status, on its thread:
/// keep it short and never take the reaper's lock.
pub type ExitCallback = Box<dyn FnOnce(libc::c_int) + Send>;

/// The one place that waits for children. As PID 1 every orphan in the guest
/// becomes our child; outside a VM the agent makes itself a child subreaper so
/// the same holds for its own descendants. Every child is reaped here: a child
/// registered with [`Reaper::spawn`] has its exit status handed to its callback,
/// any other is discarded. Registration happens under the same lock as the spawn
/// and the reap, so an exit is never lost, stolen, or matched to a recycled pid.
pub struct Reaper {
    waiters: std::sync::Mutex<std::collections::HashMap<libc::pid_t, ExitCallback>>,
}

impl Reaper {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<libc::pid_t, ExitCallback>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `spawn` (which creates one child and returns its pid plus whatever
    /// the caller needs, e.g. a pidfd) with reaping held off, and registers
    /// `on_exit` for that pid before the reaper can see it exit.
    pub fn spawn<T>(
        &self,
        spawn: impl FnOnce() -> std::io::Result<(libc::pid_t, T)>,
        on_exit: ExitCallback,
    ) -> std::io::Result<(libc::pid_t, T)> {
        let mut waiters = self.lock();
        let (pid, extra) = spawn()?;
        waiters.insert(pid, on_exit);
        Ok((pid, extra))
    }

    /// Reaps every child that has exited, dispatching registered ones.
    fn sweep(&self) {
        loop {
            let mut status = 0;
            let (pid, cb) = {
                let mut waiters = self.lock();
                // SAFETY: plain waitpid for any child, non-blocking.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    return;
                }
                (pid, waiters.remove(&pid))
            };
            match cb {
                Some(cb) => cb(status),
                None => tracing::debug!(pid, status, "reaped"),
            }
        }
    }
}

/// The exit status as a shell reports it: the code, or 128 + the signal.
pub fn shell_status(raw: libc::c_int) -> i32 {
    if libc::WIFEXITED(raw) {
        libc::WEXITSTATUS(raw)
    } else if libc::WIFSIGNALED(raw) {
        128 + libc::WTERMSIG(raw)
    } else {
        raw
    }
}

static REAPER: std::sync::Mutex<Option<&'static Reaper>> = std::sync::Mutex::new(None);

/// Starts the reaper (once; later calls return the same one). SIGCHLD is blocked
/// in the calling thread, so call it before spawning the threads that must not
/// take it; the reaper also sweeps every second, so a SIGCHLD that some other
/// thread took costs at most that delay. When not PID 1, it makes the agent a
/// child subreaper so double-forked descendants are reaped here too.
pub fn spawn_reaper() -> std::io::Result<&'static Reaper> {
    let mut started = REAPER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = *started {
        return Ok(r);
    }
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
    if std::process::id() != 1 {
        // SAFETY: plain prctl.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            tracing::warn!("cannot become a child subreaper: {}", std::io::Error::last_os_error());
        }
    }
    let reaper: &'static Reaper = Box::leak(Box::new(Reaper { waiters: Default::default() }));
    std::thread::Builder::new().name("reaper".into()).spawn(move || loop {
        let timeout = libc::timespec { tv_sec: 1, tv_nsec: 0 };
        // SAFETY: waiting on a signal set we own; the siginfo is not needed.
        unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        reaper.sweep();
    })?;
    *started = Some(reaper);
    Ok(reaper)
}
