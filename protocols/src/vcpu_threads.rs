//! What a `vfvm-vmm` process's vCPU threads are doing, read from `/proc` by whoever
//! waits on its guest (the shim for the agent, the lab's tests for a console line).
//! When a guest stops answering, this tells a VMM that holds its vCPUs outside
//! KVM (a vCPU thread blocked in some other syscall: the VMM's fault) from a guest
//! that made no progress while KVM had every vCPU (the guest's or the hypervisor's).
//!
//! `/proc/PID/task/TID/syscall` says `running`, or the syscall the thread is blocked
//! in and its arguments; reading it needs the right to ptrace the process (root, or
//! the VMM's own user). The vCPU threads are those named `vcpuN` (vmm/src/machine.rs).

use std::path::Path;

/// `ioctl(2)` on x86-64.
const SYS_IOCTL: u64 = 16;
/// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;

/// Said by [`describe`] when every vCPU thread is in KVM_RUN or running: the VMM is
/// not the reason a guest got nowhere (the lab's harness re-runs a test whose guest
/// stalled so, as it does after a triple fault).
pub const VCPUS_ALL_IN_KVM: &str = "every vCPU thread is in KVM_RUN or running: the VMM is not holding the guest back";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuThreadState {
    /// Blocked in `ioctl(KVM_RUN)`: the vCPU is halted in KVM, waiting for an interrupt.
    InKvmRun,
    /// On a CPU: in the guest, or (briefly, normally) handling an exit.
    Running,
    /// Blocked in another syscall (its number): outside the guest, held by the VMM.
    Blocked(u64),
    /// `/proc` would not say (the thread ended, or no right to read it).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuThread {
    pub name: String,
    pub state: VcpuThreadState,
}

/// One `/proc/PID/task/TID/syscall` line as a state.
fn parse_syscall(text: &str) -> VcpuThreadState {
    let mut words = text.split_whitespace();
    let number = match words.next() {
        Some("running") => return VcpuThreadState::Running,
        Some(n) => n.parse::<u64>().ok(),
        None => None,
    };
    let request = words.nth(1).and_then(|r| u64::from_str_radix(r.trim_start_matches("0x"), 16).ok());
    match (number, request) {
        (Some(SYS_IOCTL), Some(KVM_RUN)) => VcpuThreadState::InKvmRun,
        (Some(n), _) => VcpuThreadState::Blocked(n),
        (None, _) => VcpuThreadState::Unknown,
    }
}

/// The vCPU threads of process `pid`, by name.
pub fn vcpu_threads(pid: u32) -> Vec<VcpuThread> {
    vcpu_threads_in(&Path::new("/proc").join(pid.to_string()).join("task"))
}

fn vcpu_threads_in(tasks: &Path) -> Vec<VcpuThread> {
    let Ok(dir) = std::fs::read_dir(tasks) else { return Vec::new() };
    let mut threads: Vec<VcpuThread> = dir
        .filter_map(Result::ok)
        .filter_map(|task| {
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?.trim().to_string();
            name.starts_with("vcpu").then(|| {
                let state = std::fs::read_to_string(task.path().join("syscall")).map_or(VcpuThreadState::Unknown, |s| parse_syscall(&s));
                VcpuThread { name, state }
            })
        })
        .collect();
    threads.sort_by(|a, b| a.name.cmp(&b.name));
    threads
}

/// One line for a log or an error: each vCPU thread's state, then, when every one is
/// in KVM_RUN or running, [`VCPUS_ALL_IN_KVM`].
pub fn describe(threads: &[VcpuThread]) -> String {
    if threads.is_empty() {
        return "the VMM's vCPU threads could not be read".into();
    }
    let each: Vec<String> = threads
        .iter()
        .map(|t| match &t.state {
            VcpuThreadState::InKvmRun => format!("{} in KVM_RUN (halted)", t.name),
            VcpuThreadState::Running => format!("{} running", t.name),
            VcpuThreadState::Blocked(n) => format!("{} blocked in syscall {n}, outside KVM_RUN", t.name),
            VcpuThreadState::Unknown => format!("{} unknown", t.name),
        })
        .collect();
    let in_kvm = threads.iter().all(|t| matches!(t.state, VcpuThreadState::InKvmRun | VcpuThreadState::Running));
    match in_kvm {
        true => format!("the VMM's vCPU threads: {}; {VCPUS_ALL_IN_KVM}", each.join(", ")),
        false => format!("the VMM's vCPU threads: {}", each.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_lines_read_as_the_kernel_writes_them() {
        assert_eq!(parse_syscall("running\n"), VcpuThreadState::Running);
        assert_eq!(parse_syscall("16 0xe 0xae80 0x0 0x0 0x0 0x0 0x7ffc 0x7f00\n"), VcpuThreadState::InKvmRun);
        // Another ioctl on the vCPU fd, and a futex wait: outside the guest.
        assert_eq!(parse_syscall("16 0xe 0x4090ae82 0x0 0x0 0x0 0x0 0x7ffc 0x7f00\n"), VcpuThreadState::Blocked(16));
        assert_eq!(parse_syscall("202 0x55d0 0x80 0x0 0x0 0x0 0x0 0x7ffc 0x7f00\n"), VcpuThreadState::Blocked(202));
        assert_eq!(parse_syscall(""), VcpuThreadState::Unknown);
    }

    #[test]
    fn only_vcpus_all_in_kvm_say_the_guest_stalled() {
        let t = |name: &str, state| VcpuThread { name: name.into(), state };
        let stalled = describe(&[t("vcpu0", VcpuThreadState::Running), t("vcpu1", VcpuThreadState::InKvmRun)]);
        assert_eq!(stalled, format!("the VMM's vCPU threads: vcpu0 running, vcpu1 in KVM_RUN (halted); {VCPUS_ALL_IN_KVM}"));
        let held = describe(&[t("vcpu0", VcpuThreadState::Running), t("vcpu1", VcpuThreadState::Blocked(202))]);
        assert!(!held.contains(VCPUS_ALL_IN_KVM) && held.contains("vcpu1 blocked in syscall 202, outside KVM_RUN"), "{held}");
        assert!(!describe(&[t("vcpu0", VcpuThreadState::Unknown)]).contains(VCPUS_ALL_IN_KVM));
        assert!(!describe(&[]).contains(VCPUS_ALL_IN_KVM));
    }

    /// This test process's own threads, read the real way: libtest names its threads
    /// after the tests, so a thread named `vcpu…` here is one this test starts, blocked
    /// in a syscall (a channel's futex) that is not KVM_RUN.
    #[test]
    fn a_thread_blocked_outside_kvm_is_read_from_proc() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vcpu9".into())
            .spawn(move || {
                started_tx.send(()).unwrap();
                let _ = rx.recv();
            })
            .unwrap();
        started_rx.recv().unwrap();
        // The thread may still be between its send and its futex wait: read until it is blocked.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let state = loop {
            let threads = vcpu_threads(std::process::id());
            let me = threads.iter().find(|t| t.name == "vcpu9").cloned();
            match me.map(|t| t.state) {
                Some(VcpuThreadState::Blocked(n)) => break Some(n),
                _ if std::time::Instant::now() > deadline => break None,
                _ => std::thread::yield_now(),
            }
        };
        tx.send(()).unwrap();
        thread.join().unwrap();
        assert_eq!(state, Some(202), "the thread should be seen blocked in futex(2)");
    }
}
