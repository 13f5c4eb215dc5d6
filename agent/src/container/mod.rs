//! The container runner: containers from OCI runtime specs on a rootfs directory,
//! their processes, stdio and events.
//!
//! Process model: a container's init is cloned straight from the agent into new
//! mount/pid/uts/ipc namespaces (the network namespace is the guest's: the pod is
//! the VM), sets itself up (mounts, pivot_root, hostname, rlimits, user) and
//! blocks before execve until StartContainer. An exec'd process is cloned by a
//! thread that has joined the container's pid namespace, joins its ipc, uts and
//! mount namespaces (which puts it in the container's root), and execs at once.
//! Every process is a direct child of the agent, registered with the reaper
//! before it can exit, and held by a pidfd, so signals never hit a recycled pid.
//! Its stdio are pipes (or a pty) drained into bounded buffers (see [`stdio`]).
//! A pty is allocated by the child in the container's own devpts and its master
//! handed back to the agent (see [`spawn::PtyPlan`]), so `tty` names it there.

pub mod cgroup;
pub mod pci;
pub mod spawn;
pub mod spec;
pub mod stdio;

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::init::{shell_status, Reaper};
use cgroup::Cgroup;
use spawn::{ChildStdio, InitRoot, Kind, Op, Plan, PtyPlan};
use stdio::{Input, Output};

/// Bounds on what the shim controls.
pub const MAX_SPEC_BYTES: usize = 1 << 20;
pub const MAX_PROCESS_BYTES: usize = 256 << 10;
pub const MAX_RESOURCES_BYTES: usize = 64 << 10;
pub const MAX_IO_BYTES: usize = 1 << 20;
pub const MAX_CONTAINERS: usize = 128;
pub const MAX_EXECS: usize = 256;
pub const MAX_PCI_MAP: usize = 64;
pub const MAX_EVENT_WAIT: Duration = Duration::from_secs(60);
pub const MAX_READ_WAIT: Duration = Duration::from_secs(60);
pub const MAX_WRITE_WAIT: Duration = Duration::from_secs(1);
/// Events kept for the shim, at most; the oldest go first.
pub const MAX_EVENTS: usize = 1024;
const MAX_ID: usize = 128;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Nodes bound from the guest's /dev into a container whose /dev is a tmpfs.
const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// `[A-Za-z0-9_.-]{1,128}`.
pub fn check_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("{what} {id:?}: must be 1 to {MAX_ID} of [A-Za-z0-9_.-]")))
    }
}

/// Mounts the shim's virtio-fs share (a no-op when it is already there: the
/// shim may retry `CreateSandbox` after a lost answer).
fn mount_shared_fs(tag: &str, at: &Path) -> Result<()> {
    std::fs::create_dir_all(at).map_err(|e| Error::Internal(format!("creating {}: {e}", at.display())))?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let at_str = at.to_string_lossy();
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(&*at_str)) {
        return Ok(());
    }
    let src = CString::new(tag).map_err(|_| Error::Invalid("shared_fs_tag: contains NUL".into()))?;
    let dst = CString::new(at_str.as_bytes()).map_err(|_| Error::Invalid("shared dir: contains NUL".into()))?;
    // The image loads virtiofs (and fuse) only now, when the share is first mounted.
    let module = crate::modules::request("virtiofs");
    // SAFETY: plain mount(2) with NUL-terminated strings we own.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), c"virtiofs".as_ptr(), libc::MS_NODEV, std::ptr::null()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let module = module.err().map(|m| format!(" ({m})")).unwrap_or_default();
        return Err(Error::Internal(format!("mounting virtio-fs tag {tag:?} at {}: {e}{module}", at.display())));
    }
    Ok(())
}

fn now_nanos() -> u64 {
    // Saturates in the year 2554.
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn cstring(what: &str, s: impl Into<Vec<u8>>) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Invalid(format!("{what}: contains a NUL byte")))
}

fn path_cstring(p: &Path) -> Result<CString> {
    cstring(&p.display().to_string(), p.as_os_str().as_encoded_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Exited { container_id: String, exec_id: String, exit_status: i32, exited_at_unix_nanos: u64 },
    Oom { container_id: String },
}

#[derive(Default)]
struct Events {
    q: Mutex<VecDeque<Event>>,
    cv: Condvar,
}

impl Events {
    fn push(&self, e: Event) {
        let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_EVENTS {
            let dropped = q.pop_front();
            tracing::warn!("event queue full, dropping the oldest: {dropped:?}");
        }
        q.push_back(e);
        self.cv.notify_one();
    }

    fn next(&self, wait: Duration) -> Option<Event> {
        let q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        let (mut q, _) = self.cv.wait_timeout_while(q, wait, |q| q.is_empty()).unwrap_or_else(|e| e.into_inner());
        q.pop_front()
    }
}

/// A process's exit, once known: (shell status, when).
#[derive(Default)]
struct Exit {
    m: Mutex<Option<(i32, u64)>>,
    cv: Condvar,
}

impl Exit {
    fn set(&self, status: i32) -> u64 {
        let at = now_nanos();
        *self.m.lock().unwrap_or_else(|e| e.into_inner()) = Some((status, at));
        self.cv.notify_all();
        at
    }

    fn get(&self) -> Option<(i32, u64)> {
        *self.m.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self, wait: Duration) -> Option<(i32, u64)> {
        let g = self.m.lock().unwrap_or_else(|e| e.into_inner());
        *self.cv.wait_timeout_while(g, wait, |s| s.is_none()).unwrap_or_else(|e| e.into_inner()).0
    }
}

struct Process {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    stdin: Input,
    stdout: Arc<Output>,
    stderr: Arc<Output>,
    pty: Option<OwnedFd>,
    exit: Arc<Exit>,
}

impl Process {
    /// A spawned child with our ends of its stdio and its exit slot.
    fn new(child: &spawn::Child, stdio: ParentStdio, exit: Arc<Exit>) -> Result<Arc<Self>> {
        Ok(Arc::new(Process {
            pid: child.pid,
            pidfd: child.pidfd.try_clone().map_err(|e| Error::Internal(format!("pidfd: {e}")))?,
            stdin: stdio.stdin,
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            pty: stdio.pty,
            exit,
        }))
    }

    fn signal(&self, sig: i32) -> Result<()> {
        if self.exit.get().is_some() {
            return Err(Error::NotFound(format!("process {} has exited", self.pid)));
        }
        // SAFETY: signalling through our pidfd.
        let rc = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), sig, 0usize, 0u32) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Err(Error::NotFound(format!("process {} has exited", self.pid)));
            }
            return Err(Error::Internal(format!("signal {sig} to process {}: {e}", self.pid)));
        }
        Ok(())
    }

    fn close_output(&self) {
        self.stdout.close();
        self.stderr.close();
    }
}

struct Container {
    id: String,
    init: Arc<Process>,
    /// The init, created and waiting for StartContainer; None once started.
    pending: Mutex<Option<spawn::Child>>,
    cgroup: Option<Cgroup>,
    /// The init's pid namespace, as /proc/PID/ns/pid reads ("pid:[4026532...]").
    pidns: String,
    /// The spec mounts a devpts of its own at /dev/pts (where execs' ptys go).
    own_devpts: bool,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    fn execs(&self) -> MutexGuard<'_, HashMap<String, Arc<Process>>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs().get(exec_id).cloned().ok_or_else(|| Error::NotFound(format!("container {}: no process {exec_id:?}", self.id)))
    }

    /// The processes in the container's pid namespace (pids as the agent sees them).
    fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        if self.init.exit.get().is_some() {
            return pids;
        }
        let Ok(dir) = std::fs::read_dir("/proc") else { return pids };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if std::fs::read_link(e.path().join("ns/pid")).is_ok_and(|l| l.as_os_str() == self.pidns.as_str()) {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        pids
    }
}

struct Sandbox {
    id: String,
    hostname: String,
    pci_map: pci::PciAddressMap,
}

#[derive(Default)]
struct State {
    sandbox: Option<Sandbox>,
    containers: HashMap<String, Arc<Container>>,
    /// Ids being created (reserved while the runner's lock is not held).
    creating: HashSet<String>,
}

/// What a process runs, from an OCI process.
struct ProcessSpec<'a> {
    p: &'a spec::Process,
    terminal: bool,
}

pub struct Runner {
    state: Mutex<State>,
    events: Arc<Events>,
    reaper: &'static Reaper,
}

/// Output stream selector.
#[derive(Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

pub struct Stats {
    pub cpu_usage_nanos: u64,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids_current: u64,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Internal(format!("pipe: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: fresh fds.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The parent's ends of a new process's stdio.
struct ParentStdio {
    stdin: Input,
    stdout: Arc<Output>,
    stderr: Arc<Output>,
    pty: Option<OwnedFd>,
}

fn stdio_error(e: std::io::Error) -> Error {
    Error::Internal(format!("stdio: {e}"))
}

/// A new process's stdio: the child's side, and ours. Ours is ready now for
/// pipes; for a terminal it is None, made by [`finish_stdio`] from the master
/// the child sends back once it has allocated its pty.
fn make_stdio(
    name: &str,
    terminal: bool,
    in_container: bool,
    size: Option<&spec::ConsoleSize>,
) -> Result<(ChildStdio, Option<ParentStdio>)> {
    if terminal {
        let size = size.filter(|s| s.height > 0 && s.width > 0).map(|s| libc::winsize {
            ws_row: u16::try_from(s.height).unwrap_or(u16::MAX),
            ws_col: u16::try_from(s.width).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        return Ok((ChildStdio::Pty(PtyPlan { in_container, size }), None));
    }
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let stdout = Output::drain(out_r, format!("out-{name}")).map_err(stdio_error)?;
    let stderr = Output::drain(err_r, format!("err-{name}")).map_err(stdio_error)?;
    Ok((
        ChildStdio::Pipes { stdin: in_r, stdout: out_w, stderr: err_w },
        Some(ParentStdio { stdin: Input::new(in_w, false), stdout, stderr, pty: None }),
    ))
}

/// Our side of a spawned child's stdio: `ready` (pipes), or its pty master.
/// The child has not exec'd yet (it waits for Start), so nothing is missed.
fn finish_stdio(name: &str, ready: Option<ParentStdio>, child: &mut spawn::Child) -> Result<ParentStdio> {
    if let Some(p) = ready {
        return Ok(p);
    }
    let master = child.take_pty_master().ok_or_else(|| Error::Internal("stdio: the child sent no terminal".into()))?;
    let w = master.try_clone().map_err(stdio_error)?;
    let r = master.try_clone().map_err(stdio_error)?;
    let out = Output::drain(r, format!("pty-{name}")).map_err(stdio_error)?;
    Ok(ParentStdio { stdin: Input::new(w, true), stdout: out, stderr: Output::empty(), pty: Some(master) })
}

/// Whether the spec's mounts (or our defaults, for none) give the container a
/// devpts of its own at /dev/pts, where its ptys are then allocated. Without
/// one, a pty comes from the guest's devpts (see [`spawn::PtyPlan`]).
fn has_own_devpts(spec: &spec::Spec) -> bool {
    let mounts = if spec.mounts.is_empty() { default_mounts() } else { spec.mounts.clone() };
    mounts.iter().any(|m| m.kind == "devpts" && Path::new(&m.destination) == Path::new("/dev/pts"))
}

/// Everything of a Plan that comes from the OCI process.
fn process_plan(ps: &ProcessSpec, kind: Kind, stdio: ChildStdio) -> Result<Plan> {
    let p = ps.p;
    if p.args.is_empty() || p.args[0].is_empty() {
        return Err(Error::Invalid("process.args is empty".into()));
    }
    let cwd = if p.cwd.is_empty() { "/".to_string() } else { p.cwd.clone() };
    if !cwd.starts_with('/') {
        return Err(Error::Invalid(format!("process.cwd {cwd:?} is not absolute")));
    }
    let mut rlimits = Vec::new();
    for r in &p.rlimits {
        let res = spec::rlimit_resource(&r.kind).ok_or_else(|| Error::Invalid(format!("process.rlimits: unknown {:?}", r.kind)))?;
        rlimits.push((res, libc::rlimit { rlim_cur: r.soft, rlim_max: r.hard }));
    }
    let path = p.env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    let prog = &p.args[0];
    let exec_paths = if prog.contains('/') {
        vec![cstring("process.args[0]", prog.as_str())?]
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| cstring("PATH", format!("{}/{prog}", d.trim_end_matches('/'))))
            .collect::<Result<_>>()?
    };
    Ok(Plan {
        kind,
        stdio,
        rlimits,
        uid: p.user.uid,
        gid: p.user.gid,
        groups: p.user.additional_gids.clone(),
        umask: p.user.umask.unwrap_or(0o022),
        cwd: cstring("process.cwd", cwd)?,
        no_new_privs: p.no_new_privileges,
        exec_paths,
        argv: p.args.iter().map(|a| cstring("process.args", a.as_str())).collect::<Result<_>>()?,
        envp: p.env.iter().map(|e| cstring("process.env", e.as_str())).collect::<Result<_>>()?,
        pdeathsig: false,
    })
}

/// A mount destination inside the rootfs, refusing `..`.
fn inside(rootfs: &Path, dest: &str) -> Result<PathBuf> {
    let rel = Path::new(dest);
    if !rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(Error::Invalid(format!("mount destination {dest:?}: must be absolute, without ..")));
    }
    Ok(rootfs.join(rel.strip_prefix("/").unwrap_or(rel)))
}

fn mkdirs(rootfs: &Path, dir: &Path, ops: &mut Vec<Op>, names: &mut Vec<String>) -> Result<()> {
    let mut chain: Vec<&Path> = dir.ancestors().take_while(|a| a.starts_with(rootfs) && *a != rootfs).collect();
    chain.reverse();
    for d in chain {
        ops.push(Op::Mkdir(path_cstring(d)?));
        names.push(format!("mkdir {}", d.display()));
    }
    Ok(())
}

fn default_mounts() -> Vec<spec::Mount> {
    let m = |dest: &str, kind: &str, opts: &[&str]| spec::Mount {
        destination: dest.into(),
        kind: kind.into(),
        source: kind.into(),
        options: opts.iter().map(|s| s.to_string()).collect(),
    };
    vec![
        m("/proc", "proc", &["nosuid", "noexec", "nodev"]),
        m("/dev", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
        m("/dev/pts", "devpts", &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        m("/dev/shm", "tmpfs", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        m("/sys", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
    ]
}

/// The pod's in-memory volume `name` (see `GUEST_EPHEMERAL_DIR`): a tmpfs made at
/// the first container that names it, then the same one for the pod's others.
fn ensure_ephemeral(name: &str) -> std::result::Result<(), String> {
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let valid = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(format!("in-memory volume {name:?}: expected one path component of letters, digits, '-', '_' or '.'"));
    }
    let _one = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(vfvm_protocols::agent::GUEST_EPHEMERAL_DIR).join(name);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == dir.to_str()) {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let target = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| "in-memory volume: NUL in its path".to_string())?;
    // An emptyDir is writable by every user of the pod, as the kubelet makes it.
    // SAFETY: plain mount(2) with NUL-terminated strings we own.
    let rc = unsafe {
        libc::mount(
            c"ephemeral".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=1777".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!("mounting a tmpfs at {}: {}", dir.display(), std::io::Error::last_os_error()));
    }
    tracing::info!(volume = name, "in-memory volume made");
    Ok(())
}

/// The init's root set-up: the spec's mounts, in order, under the rootfs.
fn root_plan(rootfs: &Path, spec: &spec::Spec, hostname: Option<&str>) -> Result<InitRoot> {
    let mut ops = Vec::new();
    let mut names = Vec::new();
    let mounts = if spec.mounts.is_empty() { default_mounts() } else { spec.mounts.clone() };
    for m in &mounts {
        let target = inside(rootfs, &m.destination)?;
        let o = spec::parse_mount_options(&m.options);
        let data = if o.data.is_empty() { None } else { Some(cstring("mount options", o.data.join(","))?) };
        let bind = o.bind || m.kind == "bind";
        let what = format!("mount {} ({}) on {}", m.source, m.kind, m.destination);
        if bind {
            let src = Path::new(&m.source);
            if let Some(name) = m.source.strip_prefix(vfvm_protocols::agent::GUEST_EPHEMERAL_DIR).and_then(|r| r.strip_prefix('/')) {
                ensure_ephemeral(name).map_err(|e| Error::Invalid(format!("{what}: {e}")))?;
            }
            let meta = std::fs::metadata(src).map_err(|e| Error::Invalid(format!("{what}: source: {e}")))?;
            if meta.is_dir() {
                mkdirs(rootfs, &target, &mut ops, &mut names)?;
            } else {
                if let Some(parent) = target.parent() {
                    mkdirs(rootfs, parent, &mut ops, &mut names)?;
                }
                ops.push(Op::Touch(path_cstring(&target)?));
                names.push(format!("create {}", target.display()));
            }
            let rec = if o.recursive { libc::MS_REC } else { 0 };
            ops.push(Op::Mount {
                source: Some(path_cstring(src)?),
                target: path_cstring(&target)?,
                fstype: None,
                flags: libc::MS_BIND | rec,
                data: None,
                optional: false,
            });
            names.push(what.clone());
            if o.flags != 0 {
                ops.push(Op::Mount {
                    source: None,
                    target: path_cstring(&target)?,
                    fstype: None,
                    flags: libc::MS_BIND | libc::MS_REMOUNT | rec | o.flags,
                    data: None,
                    optional: false,
                });
                names.push(format!("{what}: remount with its flags"));
            }
            continue;
        }
        let (fstype, optional) = match m.kind.as_str() {
            // The container sees the guest's cgroup tree, where there is one.
            "cgroup" | "cgroup2" => ("cgroup2", true),
            "mqueue" => ("mqueue", true),
            "" => return Err(Error::Invalid(format!("mount on {}: no type", m.destination))),
            other => (other, false),
        };
        mkdirs(rootfs, &target, &mut ops, &mut names)?;
        let source = if m.source.is_empty() { fstype.to_string() } else { m.source.clone() };
        ops.push(Op::Mount {
            source: Some(cstring("mount source", source)?),
            target: path_cstring(&target)?,
            fstype: Some(cstring("mount type", fstype)?),
            flags: o.flags,
            data,
            optional,
        });
        names.push(what);
        if m.destination.trim_end_matches('/') == "/dev" && m.kind == "tmpfs" {
            for node in DEV_NODES {
                let host = Path::new("/dev").join(node);
                if !host.exists() {
                    continue;
                }
                let t = target.join(node);
                ops.push(Op::Touch(path_cstring(&t)?));
                names.push(format!("create {}", t.display()));
                ops.push(Op::Mount {
                    source: Some(path_cstring(&host)?),
                    target: path_cstring(&t)?,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                    optional: false,
                });
                names.push(format!("bind {} on {}", host.display(), t.display()));
            }
            for (link, to) in [
                ("fd", "/proc/self/fd"),
                ("stdin", "/proc/self/fd/0"),
                ("stdout", "/proc/self/fd/1"),
                ("stderr", "/proc/self/fd/2"),
                ("ptmx", "pts/ptmx"),
            ] {
                let l = target.join(link);
                ops.push(Op::Symlink { target: cstring("symlink", to)?, link: path_cstring(&l)? });
                names.push(format!("symlink {} -> {to}", l.display()));
            }
        }
    }
    let readonly = spec.root.as_ref().is_some_and(|r| r.readonly);
    Ok(InitRoot {
        rootfs: path_cstring(rootfs)?,
        ops,
        op_names: names,
        readonly,
        hostname: hostname.map(|h| cstring("hostname", h)).transpose()?,
    })
}

/// The modules of the filesystems the init will mount (e.g. `overlay`), which the
/// image loads only when they are needed: the kernel's own autoload (`fs-<type>`)
/// has no modprobe to call in the guest. A filesystem without a module here is
/// left to the mount to report.
fn load_filesystems(root: &InitRoot) {
    let mut done: Vec<&[u8]> = Vec::new();
    for op in &root.ops {
        let Op::Mount { fstype: Some(fs), .. } = op else { continue };
        let fs = fs.as_bytes();
        if done.contains(&fs) {
            continue;
        }
        done.push(fs);
        if let Ok(fs) = std::str::from_utf8(fs) {
            let _ = crate::modules::request_alias(&format!("fs-{fs}"));
        }
    }
}

/// A container whose memory limit is more than the whole VM could never get it: it
/// would be OOM-killed by the guest's kernel while the kubelet believes it has room.
/// It fails its create (or update) instead, naming the figures.
fn check_fits_in_vm(id: &str, r: &spec::Resources, vm: crate::guest::Memory) -> Result<()> {
    let Some(limit) = r.memory.as_ref().and_then(|m| m.limit).and_then(|l| u64::try_from(l).ok()).filter(|l| *l > 0) else {
        return Ok(());
    };
    if vm.total_bytes == 0 || limit <= vm.total_bytes {
        return Ok(());
    }
    const MIB: u64 = 1 << 20;
    Err(Error::Precondition(format!(
        "container {id:?}: its memory limit of {limit} bytes ({} MiB, linux.resources.memory.limit) does not fit in the pod's VM, \
         whose guest has {} bytes ({} MiB, MemTotal); the VM is sized from the pod's resources (containerd's \
         io.kubernetes.cri.sandbox-memory) or io.katacontainers.config.hypervisor.default_memory",
        limit.div_ceil(MIB),
        vm.total_bytes,
        vm.total_bytes / MIB
    )))
}

fn spawn_error(e: spawn::SpawnError) -> Error {
    let msg = e.to_string();
    match e.source.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::EACCES) | Some(libc::ENOTDIR) | Some(libc::ENOEXEC) | Some(libc::EPERM) | Some(libc::EINVAL) => {
            Error::Precondition(msg)
        }
        _ => Error::Internal(msg),
    }
}

impl Runner {
    pub fn new(reaper: &'static Reaper) -> Runner {
        Runner { state: Mutex::default(), events: Arc::default(), reaper }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        check_id("container id", id)?;
        self.state().containers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("no container {id:?}")))
    }

    pub fn create_sandbox(&self, id: &str, hostname: &str, pci_map: pci::PciAddressMap, shared_fs_tag: &str) -> Result<()> {
        check_id("sandbox id", id)?;
        let tag_ok = shared_fs_tag.len() <= vfvm_protocols::agent::MAX_FS_TAG
            && shared_fs_tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
        if !tag_ok {
            return Err(Error::Invalid(format!(
                "shared_fs_tag {shared_fs_tag:?}: must be at most {} of [A-Za-z0-9_-]",
                vfvm_protocols::agent::MAX_FS_TAG
            )));
        }
        if hostname.len() > 64 {
            return Err(Error::Invalid("hostname: longer than 64 bytes".into()));
        }
        let mut s = self.state();
        if let Some(sb) = &s.sandbox {
            return Err(Error::Exists(format!("sandbox {:?} exists", sb.id)));
        }
        if !shared_fs_tag.is_empty() {
            mount_shared_fs(shared_fs_tag, Path::new(vfvm_protocols::agent::GUEST_SHARED_DIR))?;
        }
        tracing::info!(sandbox = id, pci_map = pci_map.len(), shared_fs = shared_fs_tag, "sandbox created");
        s.sandbox = Some(Sandbox { id: id.into(), hostname: hostname.into(), pci_map });
        Ok(())
    }

    pub fn destroy_sandbox(&self, id: &str) -> Result<()> {
        check_id("sandbox id", id)?;
        let ids: Vec<String> = {
            let s = self.state();
            match &s.sandbox {
                Some(sb) if sb.id == id => {}
                _ => return Err(Error::NotFound(format!("no sandbox {id:?}"))),
            }
            s.containers.keys().cloned().collect()
        };
        for c in ids {
            if let Err(e) = self.remove(&c) {
                tracing::warn!("destroying sandbox: container {c}: {e}");
            }
        }
        self.state().sandbox = None;
        Ok(())
    }

    pub fn create(&self, id: &str, spec_json: &[u8], rootfs: &str, terminal: bool) -> Result<()> {
        check_id("container id", id)?;
        if spec_json.len() > MAX_SPEC_BYTES {
            return Err(Error::Invalid(format!("oci spec: {} bytes, at most {MAX_SPEC_BYTES}", spec_json.len())));
        }
        let mut spec: spec::Spec = serde_json::from_slice(spec_json).map_err(|e| Error::Invalid(format!("oci spec: {e}")))?;
        let (hostname, pci_map) = {
            let mut s = self.state();
            if s.containers.contains_key(id) || s.creating.contains(id) {
                return Err(Error::Exists(format!("container {id:?} exists")));
            }
            if s.containers.len() + s.creating.len() >= MAX_CONTAINERS {
                return Err(Error::Precondition(format!("at most {MAX_CONTAINERS} containers")));
            }
            s.creating.insert(id.to_string());
            let sb = s.sandbox.as_ref();
            (sb.map(|s| s.hostname.clone()).unwrap_or_default(), sb.map(|s| s.pci_map.clone()).unwrap_or_default())
        };
        let r = self.create_reserved(id, &mut spec, rootfs, terminal, &hostname, &pci_map);
        let mut s = self.state();
        s.creating.remove(id);
        let c = r?;
        s.containers.insert(id.to_string(), c);
        Ok(())
    }

    fn create_reserved(
        &self,
        id: &str,
        spec: &mut spec::Spec,
        rootfs: &str,
        terminal: bool,
        sandbox_hostname: &str,
        pci_map: &pci::PciAddressMap,
    ) -> Result<Arc<Container>> {
        let Some(process) = spec.process.as_mut() else { return Err(Error::Invalid("oci spec: no process".into())) };
        if let Some(r) = spec.linux.as_ref().and_then(|l| l.resources.as_ref()) {
            check_fits_in_vm(id, r, crate::guest::memory())?;
        }
        for w in pci::rewrite_env(&mut process.env, pci_map) {
            tracing::warn!(container = id, "{w}");
        }
        let rootfs = if rootfs.is_empty() { spec.root.as_ref().map(|r| r.path.clone()).unwrap_or_default() } else { rootfs.to_string() };
        let rootfs = PathBuf::from(rootfs);
        if !rootfs.is_absolute() {
            return Err(Error::Invalid(format!("rootfs {:?}: must be an absolute path", rootfs.display())));
        }
        match std::fs::metadata(&rootfs) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::Invalid(format!("rootfs {}: not a directory", rootfs.display()))),
            Err(e) => return Err(Error::Invalid(format!("rootfs {}: {e}", rootfs.display()))),
        }
        let hostname = if spec.hostname.is_empty() { sandbox_hostname } else { spec.hostname.as_str() };
        let hostname = (!hostname.is_empty()).then_some(hostname);
        let root = root_plan(&rootfs, spec, hostname)?;
        load_filesystems(&root);
        let process = spec.process.as_ref().expect("checked above");
        let ps = ProcessSpec { p: process, terminal: terminal || process.terminal };
        let own_devpts = has_own_devpts(spec);
        let (child_stdio, parent_stdio) = make_stdio(id, ps.terminal, own_devpts, process.console_size.as_ref())?;
        // No PDEATHSIG: it follows the spawning thread (an RPC worker), not the agent.
        let plan = process_plan(&ps, Kind::Init(root), child_stdio)?;

        let cgroup = Cgroup::create(id);
        if let (Some(cg), Some(res)) = (&cgroup, spec.linux.as_ref().and_then(|l| l.resources.as_ref())) {
            cg.apply(res);
        }
        let exit = Arc::new(Exit::default());
        let on_exit = {
            let (exit, events, cid, cg) = (exit.clone(), self.events.clone(), id.to_string(), cgroup.as_ref().map(|c| c.path.clone()));
            Box::new(move |raw: libc::c_int| {
                let status = shell_status(raw);
                let at = exit.set(status);
                tracing::info!(container = %cid, status, "container init exited");
                if cg.is_some_and(|p| Cgroup { path: p }.oom_kills() > 0) {
                    events.push(Event::Oom { container_id: cid.clone() });
                }
                events.push(Event::Exited { container_id: cid, exec_id: String::new(), exit_status: status, exited_at_unix_nanos: at });
            })
        };
        let reaper = self.reaper;
        let child = spawn::spawn(plan, |clone| reaper.spawn(clone, on_exit));
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                return Err(spawn_error(e));
            }
        };
        let parent_stdio = match finish_stdio(id, parent_stdio, &mut child) {
            Ok(p) => p,
            Err(e) => {
                child.kill();
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                return Err(e);
            }
        };
        if let Some(cg) = &cgroup {
            if let Err(e) = cg.add(child.pid) {
                tracing::warn!(container = id, "cannot move the init into {}: {e}", cg.path.display());
            }
        }
        let pidns = std::fs::read_link(format!("/proc/{}/ns/pid", child.pid)).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
        let init = Process::new(&child, parent_stdio, exit)?;
        tracing::info!(container = id, pid = child.pid, rootfs = %rootfs.display(), "container created");
        Ok(Arc::new(Container {
            id: id.into(),
            init,
            pending: Mutex::new(Some(child)),
            cgroup,
            pidns,
            own_devpts,
            execs: Mutex::default(),
        }))
    }

    pub fn start(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        let mut pending = c.pending.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut child) = pending.take() else { return Err(Error::Precondition(format!("container {id:?} was started already"))) };
        if c.init.exit.get().is_some() {
            return Err(Error::Precondition(format!("container {id:?}: its init has exited")));
        }
        child.start().map_err(spawn_error)?;
        tracing::info!(container = id, pid = c.init.pid, "container started");
        Ok(())
    }

    pub fn exec(&self, id: &str, exec_id: &str, process_json: &[u8], terminal: bool) -> Result<()> {
        check_id("exec id", exec_id)?;
        if process_json.len() > MAX_PROCESS_BYTES {
            return Err(Error::Invalid(format!("oci process: {} bytes, at most {MAX_PROCESS_BYTES}", process_json.len())));
        }
        let mut process: spec::Process = serde_json::from_slice(process_json).map_err(|e| Error::Invalid(format!("oci process: {e}")))?;
        // An exec's env comes from the container's host-side spec (CRI copies it), so
        // its PCIDEVICE_* values need the same host-to-guest rewrite.
        let pci_map = self.state().sandbox.as_ref().map(|s| s.pci_map.clone()).unwrap_or_default();
        for w in pci::rewrite_env(&mut process.env, &pci_map) {
            tracing::warn!(container = id, exec = exec_id, "{w}");
        }
        let c = self.container(id)?;
        if c.pending.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            return Err(Error::Precondition(format!("container {id:?} is not started")));
        }
        {
            let mut execs = c.execs();
            if execs.contains_key(exec_id) {
                return Err(Error::Exists(format!("container {id:?}: process {exec_id:?} exists")));
            }
            if execs.len() >= MAX_EXECS {
                // Forget processes that are over and read out.
                execs.retain(|_, p| p.exit.get().is_none() || !(p.stdout.drained() && p.stderr.drained()));
                if execs.len() >= MAX_EXECS {
                    return Err(Error::Precondition(format!("container {id:?}: at most {MAX_EXECS} processes")));
                }
            }
        }
        let ns = |n: &str| -> Result<OwnedFd> {
            std::fs::File::open(format!("/proc/{}/ns/{n}", c.init.pid))
                .map(OwnedFd::from)
                .map_err(|e| Error::Precondition(format!("container {id:?}: its {n} namespace: {e}")))
        };
        let (ipc, uts, mnt, pidns) = (ns("ipc")?, ns("uts")?, ns("mnt")?, ns("pid")?);
        if c.init.exit.get().is_some() {
            return Err(Error::Precondition(format!("container {id:?} has exited")));
        }
        let ps = ProcessSpec { p: &process, terminal: terminal || process.terminal };
        let name = format!("{id}-{exec_id}");
        let (child_stdio, parent_stdio) = make_stdio(&name, ps.terminal, c.own_devpts, process.console_size.as_ref())?;
        let plan = process_plan(&ps, Kind::Exec { ipc, uts, mnt }, child_stdio)?;
        let exit = Arc::new(Exit::default());
        let on_exit = {
            let (exit, events, cid, eid) = (exit.clone(), self.events.clone(), id.to_string(), exec_id.to_string());
            Box::new(move |raw: libc::c_int| {
                let status = shell_status(raw);
                let at = exit.set(status);
                tracing::info!(container = %cid, exec = %eid, status, "process exited");
                events.push(Event::Exited { container_id: cid, exec_id: eid, exit_status: status, exited_at_unix_nanos: at });
            })
        };
        let reaper = self.reaper;
        let mut child = spawn::in_pidns(&pidns, move || spawn::spawn(plan, |clone| reaper.spawn(clone, on_exit)))
            .map_err(|e| Error::Precondition(format!("container {id:?}: joining its pid namespace: {e}")))?
            .map_err(spawn_error)?;
        if let Some(cg) = &c.cgroup {
            if let Err(e) = cg.add(child.pid) {
                tracing::warn!(container = id, exec = exec_id, "cannot move the process into {}: {e}", cg.path.display());
            }
        }
        let parent_stdio = finish_stdio(&name, parent_stdio, &mut child).inspect_err(|_| child.kill())?;
        let p = Process::new(&child, parent_stdio, exit)?;
        // Registered before it runs: a fast exit's output is still read.
        c.execs().insert(exec_id.to_string(), p);
        if let Err(e) = child.start() {
            c.execs().remove(exec_id);
            return Err(spawn_error(e));
        }
        tracing::info!(container = id, exec = exec_id, pid = child.pid, "process started");
        Ok(())
    }

    pub fn signal(&self, id: &str, exec_id: &str, sig: u32, all: bool) -> Result<()> {
        let sig = i32::try_from(sig)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| Error::Invalid(format!("signal {sig}: not a signal")))?;
        let c = self.container(id)?;
        if all {
            for pid in c.pids() {
                // The kernel's pids fit pid_t; a wrapped one would signal a process group.
                let Ok(pid) = libc::pid_t::try_from(pid) else { continue };
                // SAFETY: plain kill; every pid listed is in the container's namespace.
                unsafe { libc::kill(pid, sig) };
            }
            return Ok(());
        }
        c.process(exec_id)?.signal(sig)
    }

    pub fn wait(&self, id: &str, exec_id: &str, wait: Duration) -> Result<(i32, u64)> {
        let p = self.container(id)?.process(exec_id)?;
        p.exit.wait(wait).ok_or_else(|| Error::Timeout(format!("container {id:?} process {exec_id:?}: still running after {wait:?}")))
    }

    pub fn list(&self, id: &str) -> Result<Vec<u32>> {
        Ok(self.container(id)?.pids())
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        if resources_json.len() > MAX_RESOURCES_BYTES {
            return Err(Error::Invalid(format!("resources: {} bytes, at most {MAX_RESOURCES_BYTES}", resources_json.len())));
        }
        let r: spec::Resources = serde_json::from_slice(resources_json).map_err(|e| Error::Invalid(format!("resources: {e}")))?;
        let c = self.container(id)?;
        let Some(cg) = &c.cgroup else { return Err(Error::Precondition(format!("container {id:?} has no cgroup (no cgroup v2 here)"))) };
        check_fits_in_vm(id, &r, crate::guest::memory())?;
        cg.apply(&r);
        tracing::info!(container = id, memory_limit = ?r.memory.as_ref().and_then(|m| m.limit), "resources updated");
        Ok(())
    }

    pub fn stats(&self, id: &str) -> Result<Stats> {
        let c = self.container(id)?;
        let (cpu, mem, limit, pids) = c.cgroup.as_ref().map_or((0, 0, 0, 0), |cg| cg.stats());
        let pids = if pids == 0 { c.pids().len() as u64 } else { pids };
        Ok(Stats { cpu_usage_nanos: cpu, memory_usage_bytes: mem, memory_limit_bytes: limit, pids_current: pids })
    }

    pub fn read(&self, id: &str, exec_id: &str, stream: Stream, max: u32, wait_ms: u32) -> Result<(Vec<u8>, bool)> {
        let max = match max as usize {
            0 => MAX_IO_BYTES,
            n if n > MAX_IO_BYTES => return Err(Error::Invalid(format!("max_len {n}: at most {MAX_IO_BYTES}"))),
            n => n,
        };
        let p = self.container(id)?.process(exec_id)?;
        let out = match stream {
            Stream::Stdout => &p.stdout,
            Stream::Stderr => &p.stderr,
        };
        Ok(out.read(max, Duration::from_millis(wait_ms.into()).min(MAX_READ_WAIT)))
    }

    pub fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        if data.len() > MAX_IO_BYTES {
            return Err(Error::Invalid(format!("stdin data: {} bytes, at most {MAX_IO_BYTES}", data.len())));
        }
        let p = self.container(id)?.process(exec_id)?;
        p.stdin.write(data, MAX_WRITE_WAIT).map_err(|e| Error::Precondition(format!("stdin of container {id:?} process {exec_id:?}: {e}")))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        self.container(id)?.process(exec_id)?.stdin.close();
        Ok(())
    }

    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let p = self.container(id)?.process(exec_id)?;
        let Some(pty) = &p.pty else { return Err(Error::Precondition(format!("container {id:?} process {exec_id:?} has no terminal"))) };
        let ws = libc::winsize {
            ws_row: u16::try_from(rows).unwrap_or(u16::MAX),
            ws_col: u16::try_from(cols).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ on our pty master with a winsize we own.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(Error::Internal(format!("resize: {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }

    /// Kills what still runs, waits for the init, removes the cgroup. The mounts
    /// live in the container's mount namespace and go with its last process.
    pub fn remove(&self, id: &str) -> Result<()> {
        check_id("container id", id)?;
        let c = self.state().containers.remove(id).ok_or_else(|| Error::NotFound(format!("no container {id:?}")))?;
        let _ = c.init.signal(libc::SIGKILL);
        for pid in c.pids() {
            // The kernel's pids fit pid_t; a wrapped one would signal a process group.
            let Ok(pid) = libc::pid_t::try_from(pid) else { continue };
            // SAFETY: plain kill of a process in the container's namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        if c.init.exit.wait(Duration::from_secs(10)).is_none() {
            tracing::warn!(container = id, "init not reaped 10 s after SIGKILL");
        }
        for p in c.execs().values() {
            let _ = p.signal(libc::SIGKILL);
            p.exit.wait(deadline.saturating_duration_since(Instant::now()));
            p.close_output();
        }
        c.init.close_output();
        drop(c.pending.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(cg) = &c.cgroup {
            for pid in cg.procs() {
                // The kernel's pids fit pid_t; a wrapped one would signal a process group.
                let Ok(pid) = libc::pid_t::try_from(pid) else { continue };
                // SAFETY: plain kill of a process left in the container's cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            cg.remove();
        }
        tracing::info!(container = id, "container removed");
        Ok(())
    }

    pub fn next_event(&self, wait: Duration) -> Option<Event> {
        self.events.next(wait.min(MAX_EVENT_WAIT))
    }
}

#[cfg(test)]
mod tests {
    /// An in-memory volume's name comes from the shim's spec: one path component only.
    #[test]
    fn an_in_memory_volume_name_is_one_plain_component() {
        for bad in ["", ".", "..", "../etc", "a/b", "a b", &"x".repeat(129)] {
            let e = ensure_ephemeral(bad).unwrap_err();
            assert!(e.contains("expected one path component"), "{bad:?}: {e}");
        }
    }

    use super::*;

    fn limited(limit: Option<i64>) -> spec::Resources {
        spec::Resources { memory: Some(spec::Memory { limit, swap: None }), ..Default::default() }
    }

    #[test]
    fn a_memory_limit_beyond_the_vm_fails_naming_both_figures() {
        let vm = crate::guest::Memory { total_bytes: 1750 << 20, available_bytes: 1600 << 20 };
        for fits in [None, Some(-1), Some(0), Some(768 << 20), Some(1750 << 20)] {
            assert!(check_fits_in_vm("c1", &limited(fits), vm).is_ok(), "{fits:?}");
        }
        assert!(check_fits_in_vm("c1", &spec::Resources::default(), vm).is_ok());
        let err = check_fits_in_vm("c1", &limited(Some(4096 << 20)), vm).unwrap_err().to_string();
        assert!(err.contains("\"c1\"") && err.contains("4096 MiB") && err.contains("1750 MiB"), "{err}");
        // An unknown VM size (no /proc/meminfo) refuses nothing.
        assert!(check_fits_in_vm("c1", &limited(Some(4096 << 20)), crate::guest::Memory::default()).is_ok());
    }
}
