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
//!
//! A terminal is allocated by the child itself, as runc does with its console
//! socket: it opens the ptmx of the devpts it will see (see [`PtyPlan`]), makes
//! the slave its controlling terminal and stdio, and sends the master back over
//! a CLOEXEC socketpair (SCM_RIGHTS) before it reports READY; the parent picks
//! it up once READY is read, without waiting (it is queued by then).

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
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
        optional: bool,
    },
    Symlink {
        target: CString,
        link: CString,
    },
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
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// A terminal the child allocates; its master comes back in [`Child::take_pty_master`].
    Pty(PtyPlan),
}

/// Where and how the child allocates its terminal.
pub struct PtyPlan {
    /// The container has its own devpts at /dev/pts: allocate there, once in
    /// the container's root (after pivot_root, or after joining its mount
    /// namespace), so the slave is a /dev/pts/N the process can name (`tty`).
    /// Otherwise the guest's /dev/ptmx, opened before entering the container:
    /// the behaviour before in-container allocation (a working terminal that
    /// `ttyname` cannot find, as no devpts in the container holds it).
    pub in_container: bool,
    /// Initial window size, set on the master before the process can run.
    pub size: Option<libc::winsize>,
}

/// The ptmx of the container's own devpts, as the spec mounts it (its
/// `/dev/ptmx` is a link to it); the guest's; where a devpts's slaves are.
const CONTAINER_PTMX: &std::ffi::CStr = c"/dev/pts/ptmx";
const GUEST_PTMX: &std::ffi::CStr = c"/dev/ptmx";
const PTS_DIR: &[u8] = b"/dev/pts/";

/// setrlimit(2)'s resource argument as libc declares it: glibc's enum type, or a plain int.
#[cfg(target_env = "gnu")]
pub type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
pub type RlimitResource = libc::c_int;

pub struct Plan {
    pub kind: Kind,
    pub stdio: ChildStdio,
    pub rlimits: Vec<(RlimitResource, libc::rlimit)>,
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
    "open the terminal's ptmx",
    "set up the terminal",
    "make the terminal the controlling one",
    "send the terminal to the agent",
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
const S_PTMX: u32 = 18;
const S_PTY: u32 = 19;
const S_CTTY: u32 = 20;
const S_PTY_SEND: u32 = 21;
/// Steps at and above this index are the plan's ops.
const S_OPS: u32 = 1000;

/// A child created, blocked before execve until [`Child::start`].
pub struct Child {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    sync: std::fs::File,
    go: Option<std::fs::File>,
    names: Vec<String>,
    /// The terminal's master, from the child (a [`ChildStdio::Pty`] plan).
    pty_master: Option<OwnedFd>,
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

fn socketpair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two fds we then own.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from socketpair.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Room for one SCM_RIGHTS message of one fd (CMSG_SPACE(4) is 24 on 64-bit
/// targets, 16 on 32-bit), aligned as a cmsghdr.
type CmsgBuf = [u64; 4];
/// The size of one fd (a c_int) in a control message.
const C_INT_BYTES: libc::c_uint = libc::c_int::BITS / 8;

/// The pty master the child sent on `sock`, already queued: the child sends it
/// before it reports READY, so this does not wait (MSG_DONTWAIT).
fn recv_master(sock: &OwnedFd) -> std::io::Result<OwnedFd> {
    let mut cbuf: CmsgBuf = [0; 4];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: a zeroed msghdr is valid; we point it at buffers we own.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
    let n = loop {
        // SAFETY: recvmsg into the buffers above.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Err(std::io::Error::other("the child reported ready without sending its terminal"));
        }
        return Err(e);
    }
    // Every fd that came is owned (and closed) here; the first is the master.
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: walking the control buffer recvmsg filled, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() != 1 {
        return Err(std::io::Error::other(format!("the child sent {} fds for its terminal, not one", fds.len())));
    }
    let master = fds.pop().expect("one fd");
    // A pty master answers TIOCGPTN; anything else does not.
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN into a c_uint we own.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) } != 0 {
        return Err(std::io::Error::other(format!("the child's terminal is not a pty master: {}", std::io::Error::last_os_error())));
    }
    Ok(master)
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
    // Ours, the child's.
    let (console, console_child) = match plan.stdio {
        ChildStdio::Pty(_) => {
            let (a, b) = socketpair().map_err(io("terminal socket"))?;
            (Some(a), Some(b))
        }
        ChildStdio::Pipes { .. } => (None, None),
    };
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
    let console_fd = console_child.as_ref().map_or(-1, |c| c.as_raw_fd());
    let ctx = ChildCtx { plan: &plan, sync: sync_w.as_raw_fd(), go: go_r.as_raw_fd(), console: console_fd, argv: &argv, envp: &envp };
    let clone_flags = libc::c_ulong::try_from(flags | libc::SIGCHLD).expect("CLONE_NEW* flags and SIGCHLD are positive");
    let mut do_clone = || {
        // SAFETY: a fork-like clone (no stack given: the child runs on a copy of
        // ours). The child only makes system calls and never returns.
        let pid = unsafe { libc::syscall(libc::SYS_clone, clone_flags, 0usize, 0usize, 0usize, 0usize) };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: pid 0: this is the clone's child, where child() belongs; ctx was made before the clone.
            unsafe { child(&ctx) }
        }
        let pid = libc::pid_t::try_from(pid).expect("the kernel's pids fit pid_t");
        // SAFETY: pidfd_open of our own unreaped child (reaping is held off).
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: killing the child we just made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Err(e);
        }
        let fd = RawFd::try_from(fd).expect("the kernel's fds fit c_int");
        // SAFETY: a fresh fd from pidfd_open.
        Ok((pid, unsafe { OwnedFd::from_raw_fd(fd) }))
    };
    let (pid, pidfd) = register(&mut do_clone).map_err(io("clone"))?;
    // The child's ends (and its stdio, namespace fds) are its alone now.
    drop(sync_w);
    drop(go_r);
    drop(console_child);
    drop(plan);
    let mut child = Child { pid, pidfd, sync: sync_r.into(), go: Some(go_w.into()), names, pty_master: None };
    match child.read_record() {
        Ok(Some(TAG_READY)) => {
            if let Some(console) = console {
                match recv_master(&console) {
                    Ok(m) => child.pty_master = Some(m),
                    Err(source) => {
                        child.kill();
                        return Err(SpawnError { step: "receiving the terminal from the child".into(), source });
                    }
                }
            }
            Ok(child)
        }
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
                let (step, errno) = (word(1), i32::from_ne_bytes(buf[8..12].try_into().unwrap()));
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

    /// The terminal's master (once), for a [`ChildStdio::Pty`] plan.
    pub fn take_pty_master(&mut self) -> Option<OwnedFd> {
        self.pty_master.take()
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
    /// The child's end of the terminal socket, or -1.
    console: RawFd,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
}

/// Sends one record on the sync pipe. Async-signal-safe.
///
/// # Safety
///
/// `fd` must be the sync pipe's write end, owned by the caller (the child).
unsafe fn report(fd: RawFd, tag: u32, step: u32, errno: i32) {
    let mut rec = [0u8; 12];
    rec[0..4].copy_from_slice(&tag.to_ne_bytes());
    rec[4..8].copy_from_slice(&step.to_ne_bytes());
    rec[8..12].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: write(2) (async-signal-safe) from a local buffer, within its length, to the caller's pipe.
    unsafe { libc::write(fd, rec.as_ptr().cast(), rec.len()) };
}

/// The calling thread's errno. Async-signal-safe.
fn errno() -> i32 {
    // SAFETY: __errno_location returns the calling thread's errno slot, valid and aligned while the thread lives.
    unsafe { *libc::__errno_location() }
}

/// Reports a failure at `step`, with the current errno, and ends the child.
///
/// # Safety
///
/// Only in the cloned child, whose sync pipe `ctx.sync` is: it ends the process with `_exit` (no unwinding, no
/// destructors, no atexit handlers).
unsafe fn fail(ctx: &ChildCtx, step: u32) -> ! {
    // SAFETY: the caller is the child and `ctx.sync` its pipe (the contract above); both calls are async-signal-safe.
    unsafe {
        report(ctx.sync, TAG_ERROR, step, errno());
        libc::_exit(127)
    }
}

/// Fails `step` (see [`fail`]) if `rc`, a system call's return value, is negative.
///
/// # Safety
///
/// As for [`fail`]: only in the cloned child.
unsafe fn check(ctx: &ChildCtx, rc: libc::c_long, step: u32) {
    if rc < 0 {
        // SAFETY: the caller is the child (the contract above).
        unsafe { fail(ctx, step) }
    }
}

fn opt_ptr(s: &Option<CString>) -> *const libc::c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

/// Closes the fds `lo..=hi` (none if `lo > hi`). Async-signal-safe.
///
/// # Safety
///
/// Nothing may use those fds afterwards (an `OwnedFd` that still names one would close another file later): the
/// child, which execs or exits without dropping what it copied from the agent.
unsafe fn close_from(lo: RawFd, hi: RawFd) {
    // A negative bound: nothing to close (close_range would refuse it converted, or find no fd that high).
    let (Ok(lo), Ok(hi)) = (libc::c_uint::try_from(lo), libc::c_uint::try_from(hi)) else { return };
    if lo <= hi {
        // SAFETY: close_range(2) of fds the caller has given up (the contract above).
        unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0u32) };
    }
}

/// Closes every fd from 3 up but those in `keep` (-1: none). In-place sort, no allocation.
///
/// # Safety
///
/// As for [`close_from`]: nothing may use the closed fds afterwards (the child).
unsafe fn close_all_but(mut keep: [RawFd; 3]) {
    keep.sort_unstable();
    let mut lo = 3;
    // SAFETY: the caller has given up every fd from 3 up but `keep` (the contract above).
    unsafe {
        for fd in keep {
            if fd >= lo {
                close_from(lo, fd - 1);
                lo = fd + 1;
            }
        }
        close_from(lo, RawFd::MAX);
    }
}

/// `fd`, moved above 0-2 (where an agent with a closed stdio could have put it,
/// and where the dup2s onto stdio would clobber it).
///
/// # Safety
///
/// Only in the cloned child (a failure ends it, see [`fail`]); `fd` is the caller's, and closed if moved.
unsafe fn above_stdio(ctx: &ChildCtx, fd: RawFd, step: u32) -> RawFd {
    if fd > 2 {
        return fd;
    }
    // SAFETY: in the child (the contract above): fcntl and close, async-signal-safe, of the caller's own fd.
    unsafe {
        let moved = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
        check(ctx, moved as _, step);
        libc::close(fd);
        moved
    }
}

/// The slave of master `m` by its name, for kernels before TIOCGPTPEER (4.13):
/// TIOCGPTN and /dev/pts/N, formatted on the stack (ptsname is not async-signal-safe).
///
/// # Safety
///
/// `m` must be a pty master of the caller's. The fd returned (or -1) is the caller's to close.
unsafe fn open_slave_by_name(m: RawFd) -> RawFd {
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN on the caller's pty master writes one c_uint, into `n`.
    if unsafe { libc::ioctl(m, libc::TIOCGPTN, &mut n) } < 0 {
        return -1;
    }
    let mut path = [0u8; 32];
    path[..PTS_DIR.len()].copy_from_slice(PTS_DIR);
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        path[PTS_DIR.len() + i] = digits[len - 1 - i];
    }
    // SAFETY: `path` is NUL-terminated: its 9 + at most 10 bytes are followed by zeros.
    unsafe { libc::open(path.as_ptr().cast(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) }
}

/// Sends `fd` on `sock` with SCM_RIGHTS (and one byte: a message needs data). Async-signal-safe.
///
/// # Safety
///
/// `sock` and `fd` must be open fds of the caller's (the child's terminal socket and pty master).
unsafe fn send_fd(sock: RawFd, fd: RawFd) -> libc::ssize_t {
    let mut cbuf: CmsgBuf = [0; 4];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: a zeroed msghdr is a valid value; it is pointed at the local buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: the CMSG_* macros only compute. `cbuf` is aligned as a cmsghdr and holds CMSG_SPACE of one c_int (at
    // most 24 of its 32 bytes), so the header CMSG_FIRSTHDR finds is there, and the writes through it stay in `cbuf`.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(C_INT_BYTES) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(C_INT_BYTES) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd);
    }
    loop {
        // SAFETY: sendmsg(2) reads `msg` and the buffers it points at, all live locals.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        return n;
    }
}

/// Allocates the terminal (see [`PtyPlan`]), makes it the controlling terminal
/// of a new session and stdio, and sends the master to the agent. Only system
/// calls: glibc's grantpt may look up the tty group (not async-signal-safe) and
/// is a no-op on devpts anyway; unlockpt is the ioctl below.
///
/// # Safety
///
/// Only in the cloned child (a failure ends it, see [`fail`]), with `ctx.console` its end of the terminal socket: it
/// makes the process a session leader and replaces its fds 0-2.
unsafe fn setup_pty(ctx: &ChildCtx, p: &PtyPlan) {
    let ptmx = if p.in_container { CONTAINER_PTMX } else { GUEST_PTMX };
    // SAFETY: in the child (the contract above): async-signal-safe system calls only, on the fds opened here, fds 0-2
    // and the terminal socket, with pointers to static C strings, locals and the plan's window size.
    unsafe {
        let m = libc::open(ptmx.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        check(ctx, m as _, S_PTMX);
        let m = above_stdio(ctx, m, S_PTY);
        let unlock: libc::c_int = 0;
        check(ctx, libc::ioctl(m, libc::TIOCSPTLCK, &unlock) as _, S_PTY);
        // The slave by the master itself, not by a name looked up in some /dev/pts.
        let mut s = libc::ioctl(m, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if s < 0 && matches!(errno(), libc::EINVAL | libc::ENOTTY) {
            s = open_slave_by_name(m);
        }
        check(ctx, s as _, S_PTY);
        let s = above_stdio(ctx, s, S_PTY);
        if let Some(ws) = &p.size {
            check(ctx, libc::ioctl(m, libc::TIOCSWINSZ, ws) as _, S_PTY);
        }
        // The process's user owns its terminal (as runc does for stdio); the group
        // stays devpts's (gid=5, tty).
        check(ctx, libc::fchown(s, ctx.plan.uid, libc::gid_t::MAX) as _, S_PTY);
        check(ctx, libc::setsid() as _, S_CTTY);
        check(ctx, libc::ioctl(s, libc::TIOCSCTTY, 0) as _, S_CTTY);
        for fd in 0..3 {
            check(ctx, libc::dup2(s, fd) as _, S_CTTY);
        }
        libc::close(s);
        check(ctx, send_fd(ctx.console, m) as _, S_PTY_SEND);
        // The container keeps no master; the socket goes at execve (CLOEXEC).
        libc::close(m);
    }
}

/// The child. Only system calls from here on.
///
/// # Safety
///
/// Only in the child of a fork-like clone, never in the agent: it changes the whole process's namespaces, root,
/// credentials and fds, and ends it (execve or `_exit`). `ctx` and all it points at were prepared before the clone.
unsafe fn child(ctx: &ChildCtx) -> ! {
    let plan = ctx.plan;
    // SAFETY: we are the cloned child (the contract above), so the process is ours to change. Only async-signal-safe
    // system calls follow, with pointers into the plan's C strings and the argv/envp arrays the parent prepared, which
    // live in this copy of its memory until execve, or to locals; every failure ends the process (fail, _exit).
    unsafe {
        // The agent blocks SIGCHLD/SIGTERM/SIGINT and ignores SIGPIPE: none of that
        // is the container's business.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        check(ctx, libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) as _, S_SIGNALS);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if plan.pdeathsig {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        }
        // The guest's devpts (see PtyPlan): before entering the container.
        if let ChildStdio::Pty(p @ PtyPlan { in_container: false, .. }) = &plan.stdio {
            setup_pty(ctx, p);
        }
        if let Kind::Exec { ipc, uts, mnt } = &plan.kind {
            check(ctx, libc::setns(ipc.as_raw_fd(), libc::CLONE_NEWIPC) as _, S_IPC);
            check(ctx, libc::setns(uts.as_raw_fd(), libc::CLONE_NEWUTS) as _, S_UTS);
            // Joining the mount namespace also sets our root and cwd to its root:
            // the container's pivoted rootfs.
            check(ctx, libc::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS) as _, S_MNT);
        }
        if let ChildStdio::Pipes { stdin, stdout, stderr } = &plan.stdio {
            check(ctx, libc::dup2(stdin.as_raw_fd(), 0) as _, S_STDIO);
            check(ctx, libc::dup2(stdout.as_raw_fd(), 1) as _, S_STDIO);
            check(ctx, libc::dup2(stderr.as_raw_fd(), 2) as _, S_STDIO);
        }
        // Nothing of the agent's leaks in: close every other fd but our two pipes
        // and the terminal socket.
        close_all_but([ctx.sync, ctx.go, ctx.console]);

        if let Kind::Init(root) = &plan.kind {
            setup_root(ctx, root);
        }
        // The container's own devpts: now that we are in its root, before the
        // credentials change (its ptmx may be root's alone: ptmxmode=000).
        if let ChildStdio::Pty(p @ PtyPlan { in_container: true, .. }) = &plan.stdio {
            setup_pty(ctx, p);
        }
        for (res, lim) in &plan.rlimits {
            check(ctx, libc::setrlimit(*res, lim) as _, S_RLIMIT);
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
}

/// Makes the container's root: private mounts, the rootfs bound and the plan's
/// ops done in it, then pivoted (or moved and chrooted) into.
///
/// # Safety
///
/// Only in the cloned child of a container's init, in its own new mount namespace (a failure ends it, see [`fail`]):
/// it changes the process's mounts and root.
unsafe fn setup_root(ctx: &ChildCtx, root: &InitRoot) {
    // SAFETY: in the init's child, in its own mount namespace (the contract above): async-signal-safe system calls
    // only, with pointers to static C strings and the plan's C strings, which live until execve.
    unsafe {
        check(
            ctx,
            libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) as _,
            S_PRIVATE,
        );
        check(
            ctx,
            libc::mount(root.rootfs.as_ptr(), root.rootfs.as_ptr(), std::ptr::null(), libc::MS_BIND | libc::MS_REC, std::ptr::null()) as _,
            S_BIND,
        );
        for (step, op) in (S_OPS..).zip(&root.ops) {
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
