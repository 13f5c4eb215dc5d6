//! The sandbox's host changes (processes started, mounts made), journaled as the
//! `sandbox.json` entry of the sandbox's journal (`<state_dir>/<sandbox>/`, see
//! [`crate::journal`]) before each is made, beside the entries of the VFs the
//! sandbox took, so that containerd's `delete` after a crashed shim undoes exactly
//! what was done, in one order.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::journal::{JournalDir, JournalError};

pub const RECORD_FILE: &str = "sandbox.json";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// A process the shim started, named by pid and the kernel's start time (so a
/// recycled pid is never mistaken for it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEntry {
    pub what: String,
    pub pid: u32,
    pub start_ticks: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub sandbox_id: String,
    pub processes: Vec<ProcessEntry>,
    /// Mount points, in the order they were made (undone in reverse).
    pub mounts: Vec<PathBuf>,
    /// Pod interfaces joined to a tap (tc ingress redirects), in the order made.
    #[serde(default)]
    pub pod_links: Vec<PodLinkEntry>,
}

/// A pod interface joined to the VM's tap: the ingress qdisc on `link` (and on
/// `tap`, which goes with the VMM) in the network namespace at `netns`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodLinkEntry {
    pub netns: PathBuf,
    pub link: String,
    pub tap: String,
}

/// The journal of one sandbox: its record, kept in memory and written whole on
/// every change.
pub struct Journal {
    store: JournalDir,
    record: Mutex<SandboxRecord>,
}

impl Journal {
    /// Starts the journal of a new sandbox in `dir` (created, mode 0700).
    pub fn create(dir: &Path, sandbox_id: &str) -> Result<Journal, RecordError> {
        let j = Journal {
            store: JournalDir::new(dir),
            record: Mutex::new(SandboxRecord { sandbox_id: sandbox_id.to_string(), ..Default::default() }),
        };
        j.store.create_dir()?;
        j.save(&j.lock())?;
        Ok(j)
    }

    /// The record in `dir`, or `None` when there is none.
    pub fn load(dir: &Path) -> Result<Option<SandboxRecord>, RecordError> {
        Ok(JournalDir::new(dir).read(RECORD_FILE)?)
    }

    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SandboxRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Written durably: a crash leaves the old or the new record.
    fn save(&self, r: &SandboxRecord) -> Result<(), RecordError> {
        Ok(self.store.write(RECORD_FILE, r)?)
    }

    /// Journals a mount point before the mount is made.
    pub fn will_mount(&self, at: &Path) -> Result<(), RecordError> {
        let mut r = self.lock();
        if !r.mounts.iter().any(|m| m == at) {
            r.mounts.push(at.to_path_buf());
        }
        self.save(&r)
    }

    /// Forgets a mount point after it was undone.
    pub fn unmounted(&self, at: &Path) -> Result<(), RecordError> {
        let mut r = self.lock();
        r.mounts.retain(|m| m != at);
        self.save(&r)
    }

    /// Journals a pod interface's connection to a tap before it is made.
    pub fn will_connect(&self, entry: PodLinkEntry) -> Result<(), RecordError> {
        let mut r = self.lock();
        if !r.pod_links.contains(&entry) {
            r.pod_links.push(entry);
        }
        self.save(&r)
    }

    /// Journals a started process. (Processes also die with the shim through
    /// PR_SET_PDEATHSIG, which covers the moment between spawn and this call.)
    pub fn started(&self, what: &str, pid: u32) -> Result<(), RecordError> {
        let mut r = self.lock();
        r.processes.push(ProcessEntry { what: what.to_string(), pid, start_ticks: start_ticks(pid).unwrap_or(0) });
        self.save(&r)
    }

    pub fn stopped(&self, pid: u32) -> Result<(), RecordError> {
        let mut r = self.lock();
        r.processes.retain(|p| p.pid != pid);
        self.save(&r)
    }
}

/// The process's start time in clock ticks since boot (`/proc/PID/stat` field 22).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What undoing a record did, for the log and for tests.
#[derive(Debug, Default)]
pub struct Undone {
    pub killed: Vec<String>,
    /// VFs given back from the sandbox's VF journal.
    pub vfs_restored: usize,
    /// The locks of VFs not given back: held while their journal entries remain.
    pub vf_locks_kept: Vec<crate::vf::lock::VfLock>,
    pub unmounted: Vec<PathBuf>,
    /// Pod interfaces whose tap connection was undone.
    pub disconnected: Vec<String>,
    pub errors: Vec<String>,
}

/// Undoes everything `dir`'s record lists, in the one teardown order: kills its
/// processes that still run (SIGKILL: the VMM first, which closes its VFIO fds),
/// gives back the VFs journaled in `dir` (driver, then the
/// netdev into the pod netns under its CNI name with its config; `vf_lock_dir` holds
/// their locks), disconnects the pod's interfaces from their taps (in reverse),
/// unmounts in reverse order, then removes `dir`. Idempotent; errors
/// are collected, not fatal, so one stuck mount does not keep the rest in place, but
/// `dir` stays while anything failed (a VF not given back keeps its journal).
/// `vf_locks` are the VF locks the caller holds (a live sandbox's); the others are
/// taken while each VF goes back. The VFs are not touched while a process could not
/// be stopped: the VMM may still hold them.
pub fn undo(dir: &Path, vf_lock_dir: &Path, vf_locks: Vec<crate::vf::lock::VfLock>) -> Result<Undone, RecordError> {
    let mut done = Undone::default();
    let Some(record) = Journal::load(dir)? else {
        let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        restore_vfs(dir, &id, vf_lock_dir, vf_locks, &mut done);
        if done.errors.is_empty() {
            remove_dir(dir, &mut done);
        }
        return Ok(done);
    };
    for p in record.processes.iter().rev() {
        if p.pid == 0 {
            continue;
        }
        match kill_and_wait(p.pid, p.start_ticks, std::time::Duration::from_secs(5)) {
            Ok(true) => done.killed.push(format!("{} ({})", p.what, p.pid)),
            Ok(false) => {} // gone already, or the pid now names another process
            Err(e) => done.errors.push(format!("stopping {} ({}): {e}", p.what, p.pid)),
        }
    }
    if done.errors.is_empty() {
        restore_vfs(dir, &record.sandbox_id, vf_lock_dir, vf_locks, &mut done);
    } else {
        done.vf_locks_kept = vf_locks;
    }
    for link in record.pod_links.iter().rev() {
        match crate::network::disconnect(link) {
            Ok(()) => done.disconnected.push(link.link.clone()),
            Err(e) => done.errors.push(format!("disconnecting pod interface {} from tap {}: {e}", link.link, link.tap)),
        }
    }
    for m in record.mounts.iter().rev() {
        match unmount(m) {
            Ok(true) => done.unmounted.push(m.clone()),
            Ok(false) => {}
            Err(e) => done.errors.push(format!("unmounting {}: {e}", m.display())),
        }
    }
    if done.errors.is_empty() {
        remove_dir(dir, &mut done);
    }
    Ok(done)
}

/// Where shims before the one journal kept a sandbox's VF entries, under its state
/// directory: still read, so a sandbox an older shim left is given back too.
const LEGACY_VF_JOURNAL_DIR: &str = "vf/vf-journal";

/// Gives back every VF the sandbox's journal lists (after the VMM is gone).
fn restore_vfs(dir: &Path, sandbox_id: &str, vf_lock_dir: &Path, vf_locks: Vec<crate::vf::lock::VfLock>, done: &mut Undone) {
    let legacy = dir.join(LEGACY_VF_JOURNAL_DIR);
    let mut locks = vf_locks;
    for journal in [dir.to_path_buf(), legacy].iter().filter(|d| d.exists()) {
        let (result, kept) = crate::vf::VfManager::new(sandbox_id, journal, vf_lock_dir).restore_all_locked(locks);
        locks = kept;
        match result {
            Ok(n) => done.vfs_restored += n,
            Err(e) => done.errors.push(format!("giving back the VFs: {e}")),
        }
    }
    done.vf_locks_kept = locks;
}

fn remove_dir(dir: &Path, done: &mut Undone) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => done.errors.push(format!("removing {}: {e}", dir.display())),
    }
}

/// SIGKILLs `pid` if it is still the process that started at `ticks`, and waits
/// (bounded) until it is gone, so its mounts and sockets are released. A pidfd
/// pins the process between the identity check and the signal, and tells when it
/// ends even though it is not our child. `Ok(false)`: it was not running.
pub fn kill_and_wait(pid: u32, ticks: u64, bound: std::time::Duration) -> std::io::Result<bool> {
    // SAFETY: pidfd_open(2) takes a pid and flags, returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) { Ok(false) } else { Err(e) };
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other(format!("pidfd_open returned {fd}, not a descriptor")))?;
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    if start_ticks(pid) != Some(ticks) {
        return Ok(false);
    }
    // SAFETY: pidfd_send_signal(2) on our pidfd, no siginfo.
    if unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd() as libc::c_long,
            libc::SIGKILL as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    } != 0
    {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) { Ok(false) } else { Err(e) };
    }
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd we own; a pidfd polls readable once the process has exited.
    let n = unsafe { libc::poll(&mut pfd, 1, i32::try_from(bound.as_millis()).unwrap_or(i32::MAX)) };
    if n <= 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("still running {} ms after SIGKILL", bound.as_millis())));
    }
    Ok(true)
}

/// Unmounts `at` (lazily, so a busy mount still goes); `Ok(false)` when nothing was
/// mounted there. A symlink at `at` is not followed: the guest can write the
/// virtio-fs share the sandbox's mounts are under, and a link it planted there must
/// not make the shim unmount a host path.
pub fn unmount(at: &Path) -> std::io::Result<bool> {
    let c =
        std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: umount2 with a NUL-terminated path we own.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_a_reload_and_undo_kills_and_removes() {
        let dir = std::env::temp_dir().join(format!("vfvm-record-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let j = Journal::create(&dir, "sb1").unwrap();
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        j.started("sleep", child.id()).unwrap();
        j.will_mount(&dir.join("not-mounted")).unwrap();
        let r = Journal::load(&dir).unwrap().unwrap();
        assert_eq!(r.sandbox_id, "sb1");
        assert_eq!(r.processes[0].pid, child.id());
        assert!(r.processes[0].start_ticks > 0);
        assert_eq!(r.mounts, vec![dir.join("not-mounted")]);

        let done = undo(&dir, &dir.join("no-vf-locks"), Vec::new()).unwrap();
        assert_eq!(done.killed.len(), 1, "{done:?}");
        assert!(done.errors.is_empty(), "{done:?}");
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!dir.exists());
        // Idempotent: nothing left to do.
        let again = undo(&dir, &dir.join("no-vf-locks"), Vec::new()).unwrap();
        assert!(again.killed.is_empty() && again.errors.is_empty());
    }

    #[test]
    fn a_recycled_pid_is_not_killed() {
        let dir = std::env::temp_dir().join(format!("vfvm-record-recycle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let j = Journal::create(&dir, "sb2").unwrap();
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        {
            let mut r = j.lock();
            // The same pid with another start time: what a recycled pid looks like.
            r.processes.push(ProcessEntry { what: "old".into(), pid: child.id(), start_ticks: start_ticks(child.id()).unwrap() + 1 });
            j.save(&r).unwrap();
        }
        let done = undo(&dir, &dir.join("no-vf-locks"), Vec::new()).unwrap();
        assert!(done.killed.is_empty(), "{done:?}");
        assert!(child.try_wait().unwrap().is_none(), "the unrelated process must still run");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A symlink planted where a mount was (as a guest can in the share) is not
    /// followed: the mount it points at stays.
    #[test]
    fn unmount_does_not_follow_a_symlink() {
        let dir = std::env::temp_dir().join(format!("vfvm-record-nofollow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let target = dir.join("host-mount");
        std::fs::create_dir_all(&target).unwrap();
        crate::sandbox::mount(Path::new("tmpfs"), &target, Some("tmpfs"), 0, None)
            .expect("mounting a tmpfs (the shim's tests run as root)");
        let link = dir.join("rootfs");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let mounted = |p: &Path| {
            std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
        };
        assert!(mounted(&target));
        assert!(!unmount(&link).unwrap(), "nothing is mounted on the link itself");
        assert!(mounted(&target), "the mount behind the link must stay");
        assert!(unmount(&target).unwrap());
        assert!(!mounted(&target));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let dir = std::env::temp_dir().join(format!("vfvm-record-corrupt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(RECORD_FILE), "{not json").unwrap();
        let err = Journal::load(&dir).unwrap_err().to_string();
        assert!(err.contains(RECORD_FILE) && err.contains("unusable"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
