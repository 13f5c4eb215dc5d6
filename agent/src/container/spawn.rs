//! Creating a container's processes. Everything the child needs is prepared in
//! the parent (paths, argv, env as C strings); the child, a raw `clone` of a
//! multithreaded process, then makes only system calls: no allocation, no locks,
//! credentials changed with raw syscalls (glibc's setuid would try to signal
//! threads that do not exist in the child). It reports each failure as a fixed
//! record on a CLOEXEC pipe, and success by that pipe closing at execve.
//!
//! Protocol on the sync pipe (child -> parent): a `Record { tag: READY }` when
//! set-up is done; then it blocks on the go pipe (parent -> child) until the
//! parent writes a byte (Start), and execs. A `Record { tag: ERROR, step, errno }`
//! at any point is a failure at `step` (an index into `Plan::steps`).

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const TAG_READY: u32 = 1;
const TAG_ERROR: u32 = 2;

/// One step of the child's set-up.
pub enum Op {
    Mkdir(CString),
    /// Create an empty file (a bind-mount target for a file).
    Touch(CString),
    Mount { source: Option<CString>, target: CString, fstype: Option<CString>, flags: libc::c_ulong, data: Option<CString>, optional: bool },
    Symlink { target: CString, link: CString },
}

pub struct InitRoot {
    pub rootfs: CString,
    pub ops: Vec<Op>,
    /// Descriptions of `ops`, same index.
    pub op_names: Vec<String>,
    pub readonly: bool,
    pub hostname: Option<CString>,
}

pub enum Kind {
    /// A container's init: new mount/pid/uts/ipc namespaces, its root pivoted to.
    Init(InitRoot),
    /// Joins an existing container: ipc, uts, mnt (the pid namespace is joined by
    /// the spawning thread, so the child is born in it).
    Exec { ipc: OwnedFd, uts: OwnedFd, mnt: OwnedFd },
}

pub enum ChildStdio {
    Pipes { stdin: OwnedFd, stdout: OwnedFd, stderr: OwnedFd },
    Pty { slave: OwnedFd },
}

pub struct Plan {
    pub kind: Kind,
    pub stdio: ChildStdio,
    pub rlimits: Vec<(libc::c_int, libc::rlimit)>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub umask: u32,
    pub cwd: CString,
    pub no_new_privs: bool,
    /// Where to look for the program, in order (PATH resolved in the parent).
    pub exec_paths: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub pdeathsig: bool,
}

// Fixed steps, after the plan's ops.
const STEP_NAMES: &[&str] = &[
    "reset signals",
    "set up stdio",
    "join ipc namespace",
    "join uts namespace",
    "join mount namespace",
    "make mounts private",
    "bind the rootfs",
    "remount the rootfs read-only",
    "pivot_root into the rootfs",
    "set hostname",
    "set rlimits",
    "set additional gids",
    "set gid",
    "set uid",
    "set no_new_privs",
    "chdir to the process cwd",
    "wait for start",
    "execve",
];
const S_SIGNALS: u32 = 0;
const S_STDIO: u32 = 1;
const S_IPC: u32 = 2;
const S_UTS: u32 = 3;
const S_MNT: u32 = 4;
const S_PRIVATE: u32 = 5;
const S_BIND: u32 = 6;
const S_RO: u32 = 7;
const S_PIVOT: u32 = 8;
const S_HOST: u32 = 9;
const S_RLIMIT: u32 = 10;
const S_GROUPS: u32 = 11;
const S_GID: u32 = 12;
const S_UID: u32 = 13;
const S_NNP: u32 = 14;
const S_CWD: u32 = 15;
const S_GO: u32 = 16;
const S_EXEC: u32 = 17;
/// Steps at and above this index are the plan's ops.
const S_OPS: u32 = 1000;

/// A child created, blocked before execve until [`Child::start`].
pub struct Child {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    sync: std::fs::File,
    go: Option<std::fs::File>,
    names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct SpawnError {
    pub step: String,
    pub source: std::io::Error,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from pipe2.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn ptrs(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

/// Creates the child described by `plan` with `clone(flags)` from the calling
/// thread, inside `register` (the reaper's spawn, which registers the pid before
/// it can be reaped), and waits for it to finish set-up.
pub fn spawn(
    plan: Plan,
    register: impl FnOnce(&mut dyn FnMut() -> std::io::Result<(libc::pid_t, OwnedFd)>) -> std::io::Result<(libc::pid_t, OwnedFd)>,
) -> Result<Child, SpawnError> {
    let io = |step: &str| {
        let step = step.to_string();
        move |source| SpawnError { step, source }
    };
    let (sync_r, sync_w) = pipe().map_err(io("sync pipe"))?;
    let (go_r, go_w) = pipe().map_err(io("start pipe"))?;
    let argv = ptrs(&plan.argv);
    let envp = ptrs(&plan.envp);
    let flags = match plan.kind {
        Kind::Init(_) => libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC,
        Kind::Exec { .. } => 0,
    };
    let names: Vec<String> = match &plan.kind {
        Kind::Init(r) => r.op_names.clone(),
        Kind::Exec { .. } => Vec::new(),
    };
    let ctx = ChildCtx { plan: &plan, sync: sync_w.as_raw_fd(), go: go_r.as_raw_fd(), argv: &argv, envp: &envp };
    let mut do_clone = || {
        // SAFETY: a fork-like clone (no stack given: the child runs on a copy of
        // ours). The child only makes system calls and never returns.
        let pid = unsafe { libc::syscall(libc::SYS_clone, (flags | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize) };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: in the child.
            unsafe { child(&ctx) }
        }
        let pid = pid as libc::pid_t;
        // SAFETY: pidfd_open of our own unreaped child (reaping is held off).
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: killing the child we just made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Err(e);
        }
        // SAFETY: a fresh fd from pidfd_open.
        Ok((pid, unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
    };
    let (pid, pidfd) = register(&mut do_clone).map_err(io("clone"))?;
    // The child's ends (and its stdio, namespace fds) are its alone now.
    drop(sync_w);
    drop(go_r);
    drop(plan);
    let mut child = Child { pid, pidfd, sync: sync_r.into(), go: Some(go_w.into()), names };
    match child.read_record() {
        Ok(Some(TAG_READY)) => Ok(child),
        Ok(_) => Err(SpawnError { step: "set-up".into(), source: std::io::Error::other("the child ended without a word") }),
        Err(e) => {
            child.kill();
            Err(e)
        }
    }
}

impl Child {
    /// One record: Ok(Some(tag)) for READY, Ok(None) at EOF, Err for an ERROR.
    fn read_record(&mut self) -> Result<Option<u32>, SpawnError> {
        let mut buf = [0u8; 12];
        let mut got = 0;
        while got < buf.len() {
            match self.sync.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SpawnError { step: "reading the child's status".into(), source: e }),
            }
        }
        if got == 0 {
            return Ok(None);
        }
        let word = |i: usize| u32::from_ne_bytes(buf[i * 4..i * 4 + 4].try_into().unwrap());
        match word(0) {
            TAG_READY => Ok(Some(TAG_READY)),
            _ => {
                let (step, errno) = (word(1), word(2) as i32);
                let name = if step >= S_OPS {
                    self.names.get((step - S_OPS) as usize).cloned().unwrap_or_else(|| format!("step {step}"))
                } else {
                    STEP_NAMES.get(step as usize).map_or_else(|| format!("step {step}"), |s| s.to_string())
                };
                Err(SpawnError { step: name, source: std::io::Error::from_raw_os_error(errno) })
            }
        }
    }

    /// Lets the child exec; returns once it has (or failed to).
    pub fn start(&mut self) -> Result<(), SpawnError> {
        let Some(mut go) = self.go.take() else { return Ok(()) };
        use std::io::Write;
        go.write_all(&[1]).map_err(|source| SpawnError { step: "starting the process".into(), source })?;
        drop(go);
        match self.read_record()? {
            None => Ok(()),
            Some(_) => Err(SpawnError { step: "start".into(), source: std::io::Error::other("unexpected record") }),
        }
    }

    pub fn kill(&self) {
        // SAFETY: signalling through our pidfd.
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), libc::SIGKILL, 0usize, 0u32) };
    }
}

struct ChildCtx<'a> {
    plan: &'a Plan,
    sync: RawFd,
    go: RawFd,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
}

unsafe fn report(fd: RawFd, tag: u32, step: u32, errno: i32) {
    let mut rec = [0u8; 12];
    rec[0..4].copy_from_slice(&tag.to_ne_bytes());
    rec[4..8].copy_from_slice(&step.to_ne_bytes());
    rec[8..12].copy_from_slice(&(errno as u32).to_ne_bytes());
    libc::write(fd, rec.as_ptr().cast(), rec.len());
}

unsafe fn errno() -> i32 {
    *libc::__errno_location()
}

unsafe fn fail(ctx: &ChildCtx, step: u32) -> ! {
    report(ctx.sync, TAG_ERROR, step, errno());
    libc::_exit(127)
}

unsafe fn check(ctx: &ChildCtx, rc: libc::c_long, step: u32) {
    if rc < 0 {
        fail(ctx, step)
    }
}

fn opt_ptr(s: &Option<CString>) -> *const libc::c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

unsafe fn close_from(lo: RawFd, hi: RawFd) {
    if lo <= hi {
        libc::syscall(libc::SYS_close_range, lo as libc::c_uint, hi as libc::c_uint, 0u32);
    }
}

/// The child. Only system calls from here on.
unsafe fn child(ctx: &ChildCtx) -> ! {
    let plan = ctx.plan;
    // The agent blocks SIGCHLD/SIGTERM/SIGINT and ignores SIGPIPE: none of that
    // is the container's business.
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    check(ctx, libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) as _, S_SIGNALS);
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    if plan.pdeathsig {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    if let Kind::Exec { ipc, uts, mnt } = &plan.kind {
        check(ctx, libc::setns(ipc.as_raw_fd(), libc::CLONE_NEWIPC) as _, S_IPC);
        check(ctx, libc::setns(uts.as_raw_fd(), libc::CLONE_NEWUTS) as _, S_UTS);
        // Joining the mount namespace also sets our root and cwd to its root:
        // the container's pivoted rootfs.
        check(ctx, libc::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS) as _, S_MNT);
    }
    match &plan.stdio {
        ChildStdio::Pipes { stdin, stdout, stderr } => {
            check(ctx, libc::dup2(stdin.as_raw_fd(), 0) as _, S_STDIO);
            check(ctx, libc::dup2(stdout.as_raw_fd(), 1) as _, S_STDIO);
            check(ctx, libc::dup2(stderr.as_raw_fd(), 2) as _, S_STDIO);
        }
        ChildStdio::Pty { slave } => {
            check(ctx, libc::setsid() as _, S_STDIO);
            check(ctx, libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) as _, S_STDIO);
            for fd in 0..3 {
                check(ctx, libc::dup2(slave.as_raw_fd(), fd) as _, S_STDIO);
            }
        }
    }
    // Nothing of the agent's leaks in: close every other fd but our two pipes.
    let (a, b) = if ctx.sync < ctx.go { (ctx.sync, ctx.go) } else { (ctx.go, ctx.sync) };
    close_from(3, a - 1);
    close_from(a + 1, b - 1);
    close_from(b + 1, RawFd::MAX);

    if let Kind::Init(root) = &plan.kind {
        setup_root(ctx, root);
    }
    for (res, lim) in &plan.rlimits {
        check(ctx, libc::setrlimit(*res as _, lim) as _, S_RLIMIT);
    }
    check(ctx, libc::syscall(libc::SYS_setgroups, plan.groups.len(), plan.groups.as_ptr()), S_GROUPS);
    check(ctx, libc::syscall(libc::SYS_setresgid, plan.gid, plan.gid, plan.gid), S_GID);
    check(ctx, libc::syscall(libc::SYS_setresuid, plan.uid, plan.uid, plan.uid), S_UID);
    libc::umask(plan.umask as libc::mode_t);
    check(ctx, libc::chdir(plan.cwd.as_ptr()) as _, S_CWD);
    if plan.no_new_privs {
        check(ctx, libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as _, S_NNP);
    }
    report(ctx.sync, TAG_READY, 0, 0);
    let mut b = [0u8; 1];
    loop {
        let n = libc::read(ctx.go, b.as_mut_ptr().cast(), 1);
        if n == 1 {
            break;
        }
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        // The parent gave up on us (EOF), or the pipe failed.
        if n < 0 {
            report(ctx.sync, TAG_ERROR, S_GO, errno());
        }
        libc::_exit(127);
    }
    let mut err = libc::ENOENT;
    for path in &plan.exec_paths {
        libc::execve(path.as_ptr(), ctx.argv.as_ptr(), ctx.envp.as_ptr());
        let e = errno();
        if e != libc::ENOENT && e != libc::ENOTDIR {
            err = e;
        }
    }
    report(ctx.sync, TAG_ERROR, S_EXEC, err);
    libc::_exit(127)
}

unsafe fn setup_root(ctx: &ChildCtx, root: &InitRoot) {
    check(ctx, libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) as _, S_PRIVATE);
    check(ctx, libc::mount(root.rootfs.as_ptr(), root.rootfs.as_ptr(), std::ptr::null(), libc::MS_BIND | libc::MS_REC, std::ptr::null()) as _, S_BIND);
    for (i, op) in root.ops.iter().enumerate() {
        let step = S_OPS + i as u32;
        match op {
            Op::Mkdir(p) => {
                if libc::mkdir(p.as_ptr(), 0o755) != 0 && errno() != libc::EEXIST {
                    fail(ctx, step)
                }
            }
            Op::Touch(p) => {
                let fd = libc::open(p.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                if fd < 0 {
                    fail(ctx, step)
                }
                libc::close(fd);
            }
            Op::Mount { source, target, fstype, flags, data, optional } => {
                let rc = libc::mount(opt_ptr(source), target.as_ptr(), opt_ptr(fstype), *flags, opt_ptr(data).cast());
                if rc != 0 && !optional {
                    fail(ctx, step)
                }
            }
            Op::Symlink { target, link } => {
                if libc::symlink(target.as_ptr(), link.as_ptr()) != 0 && errno() != libc::EEXIST {
                    fail(ctx, step)
                }
            }
        }
    }
    if root.readonly {
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        check(ctx, libc::mount(std::ptr::null(), root.rootfs.as_ptr(), std::ptr::null(), flags, std::ptr::null()) as _, S_RO);
    }
    check(ctx, libc::chdir(root.rootfs.as_ptr()) as _, S_PIVOT);
    if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0 {
        check(ctx, libc::umount2(c".".as_ptr(), libc::MNT_DETACH) as _, S_PIVOT);
    } else if errno() == libc::EINVAL {
        // The agent's root is the initramfs (rootfs cannot be pivoted away):
        // move the container's root over / and chroot into it, as switch_root does.
        check(ctx, libc::mount(c".".as_ptr(), c"/".as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) as _, S_PIVOT);
        check(ctx, libc::chroot(c".".as_ptr()) as _, S_PIVOT);
    } else {
        fail(ctx, S_PIVOT)
    }
    check(ctx, libc::chdir(c"/".as_ptr()) as _, S_PIVOT);
    if let Some(h) = &root.hostname {
        check(ctx, libc::sethostname(h.as_ptr(), h.as_bytes().len()) as _, S_HOST);
    }
}

/// Spawns `f` on a fresh thread that first joins the pid namespace `pidns`, so
/// the children it clones are born in it. The thread ends with its namespaces.
pub fn in_pidns<T: Send>(pidns: &OwnedFd, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only (pid_for_children).
            if unsafe { libc::setns(pidns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| std::io::Error::other("spawner thread panicked"))?
    })
}
