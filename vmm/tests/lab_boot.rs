//! `vfvm-vmm` boots Linux to userspace. Runs inside the lab's L2 (its KVM boots a
//! stock kernel; this machine's does not): `cargo xtask test` runs every `lab_*` test
//! there, with VFVM_LAB_KERNEL (Debian's bzImage) and VFVM_LAB_L3_INITRD (a busybox
//! initramfs whose /init prints the marker below, then runs `poweroff -f`).
//!
//! The guest finds its ACPI tables (no "valid RSDP was not found"), brings up both
//! vCPUs from them, and powers off through ACPI's PM1a_CNT: the VMM no longer reads
//! power-off from the console, so exit status 0 means the S5 write reached it. The
//! command line leaves out `quiet` for the kernel's `smp: Brought up` line.

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vfvm_protocols::vcpu_threads;

mod common;

const MARKER: &str = "@@vfvm-l3@@ userspace";
/// L2's KVM is SVM emulated by TCG: slow, but a boot takes well under this.
const BOUND: Duration = Duration::from_secs(300);
/// From the userspace marker (right before `poweroff -f`) to the VMM's exit.
const POWER_OFF_BOUND: Duration = Duration::from_secs(30);
const VCPUS: usize = 2;
/// The guest kernel's own report that one of its CPUs stopped answering: the boot
/// will not finish, so the test stops there, saying what the vCPU threads were doing.
const GUEST_RCU_STALL: &str = "rcu: INFO: rcu_preempt detected stalls";

fn lab_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run this test in the lab (cargo xtask test)"))
}

/// Why the boot was cut short, with what the VMM's vCPU threads were doing (the
/// words the lab's harness re-runs a test on when every one was in KVM) and where
/// each of its threads waited.
fn stalled_at(why: &str, pid: u32) -> String {
    let (vcpus, threads) = (vcpu_threads::vcpu_threads(pid), common::thread_states(pid));
    format!("{why}; {}; the VMM's threads:\n{threads}", vcpu_threads::describe(&vcpus))
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_boots_linux_to_userspace() {
    let kernel = lab_env("VFVM_LAB_KERNEL");
    let initrd = lab_env("VFVM_LAB_L3_INITRD");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfvm-vmm"))
        .args(["--kernel", &kernel, "--initrd", &initrd, "--vcpus", &VCPUS.to_string(), "--memory", "256"])
        .args(["--serial-stdout", "--cmdline", "console=ttyS0 reboot=k panic=-1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vfvm-vmm");

    // Console lines as they come, each with when it came; the channel closes at EOF.
    let (rx, reader) = common::lines(child.stdout.take().unwrap());
    let (_vmm_log, log_reader) = common::vmm_log(child.stderr.take().unwrap());

    let mut console = Vec::new();
    let mut marker_at = None;
    // Why the wait ended early (a time-out or the guest's stall report), with what
    // vfvm-vmm's vCPU threads were doing then.
    let mut cut_short: Option<String> = None;
    loop {
        let left = BOUND.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if marker_at.is_none() && line.contains(MARKER) {
                    marker_at = Some(started.elapsed());
                }
                println!("console: {line}");
                let stalled = line.contains(GUEST_RCU_STALL);
                console.push(line);
                if stalled {
                    cut_short = Some(stalled_at("the guest reported an RCU stall", child.id()));
                    let _ = child.kill();
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                cut_short = Some(stalled_at(&format!("vfvm-vmm ran past {BOUND:?}"), child.id()));
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().expect("wait for vfvm-vmm");
    let exited_at = started.elapsed();
    reader.join().unwrap();
    log_reader.join().unwrap();
    if let Some(why) = cut_short {
        panic!("{why}; last console lines: {:?}", &console[console.len().saturating_sub(20)..]);
    }
    let marker_at = marker_at.unwrap_or_else(|| {
        panic!("no {MARKER:?} on the console ({status}); last lines: {:?}", &console[console.len().saturating_sub(20)..])
    });
    println!(
        "vfvm-vmm: userspace marker {:.2} s after start; VMM exited after {:.2} s with {status}",
        marker_at.as_secs_f64(),
        exited_at.as_secs_f64()
    );
    let tail = &console[console.len().saturating_sub(20)..];
    for bad in ["ACPI BIOS Error", "valid RSDP was not found", "ACPI Error"] {
        let hits: Vec<_> = console.iter().filter(|l| l.contains(bad)).collect();
        assert!(hits.is_empty(), "the guest complains about its ACPI tables: {hits:?}");
    }
    let smp = format!("smp: Brought up 1 node, {VCPUS} CPUs");
    assert!(
        console.iter().any(|l| l.contains(&smp)),
        "no {smp:?} on the console; smp lines: {:?}",
        console.iter().filter(|l| l.contains("smp:") || l.contains("CPU")).collect::<Vec<_>>()
    );
    if let Some(line) = console.iter().find(|l| l.contains(&smp)) {
        println!("vfvm-vmm: {}", line.trim());
    }
    // The initramfs powers off: status 0 (2 would be a reboot, 3 a kernel panic),
    // and promptly: the S5 write, not a halted guest left to time out.
    assert_eq!(status.code(), Some(0), "vfvm-vmm should exit 0 on guest power-off; last lines: {tail:?}");
    let power_off = exited_at - marker_at;
    println!("vfvm-vmm: power-off took {:.2} s after the marker", power_off.as_secs_f64());
    assert!(power_off < POWER_OFF_BOUND, "power-off took {power_off:?} after the marker");
}
