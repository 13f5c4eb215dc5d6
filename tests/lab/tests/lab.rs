//! The lab harness tested the way developers and CI use it: the real `vfvm-lab`
//! binary booting a real emulated L2 machine. The boots are `#[ignore]`d because each
//! takes about a minute; `cargo xtask test` runs them (`--include-ignored`).

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One L2 at a time: each is a multi-threaded TCG emulator and the machine has 2 cores.
static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

fn lab() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfvm-lab"));
    // Progress goes straight to the test's stderr, so long boots show life in CI logs.
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd
}

fn run_lab(args: &[&str]) -> Output {
    run_lab_command(lab().args(args))
}

/// `vfvm-lab`'s exit status when L2's own kernel crashed under the command (a fault
/// of TCG's emulated SVM, `l2::L2Crashed`), as opposed to the command failing.
const L2_CRASHED: i32 = 75;
/// How many more times a command runs, in a fresh L2, after L2 crashed under it.
const L2_CRASH_RERUNS: usize = 2;
/// How much of a failed command's output goes to stderr at once (see below).
const FAILURE_TAIL_LINES: usize = 30;

/// Runs a `lab()` command holding the one-lab lock, and shows its stdout. If L2's
/// kernel crashed under it, it runs again in a fresh L2 (at most `L2_CRASH_RERUNS`
/// times, each announced), as `cargo xtask test` does for the in-lab tests. A failed
/// run's last lines also go to stderr right away: libtest shows captured stdout only
/// at the end, where a long CI log is cut.
fn run_lab_command(cmd: &mut Command) -> Output {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut reruns = 0;
    loop {
        let out = cmd.output().expect("starting vfvm-lab");
        let stdout = String::from_utf8_lossy(&out.stdout);
        print!("{stdout}");
        if !out.status.success() {
            let lines: Vec<&str> = stdout.lines().collect();
            eprintln!(
                "lab test: vfvm-lab {:?} exited with {}; its last lines:\n{}",
                cmd.get_args().collect::<Vec<_>>(),
                out.status,
                lines[lines.len().saturating_sub(FAILURE_TAIL_LINES)..].join("\n")
            );
        }
        if out.status.code() != Some(L2_CRASHED) || reruns == L2_CRASH_RERUNS {
            return out;
        }
        reruns += 1;
        eprintln!(
            "lab test: L2's kernel crashed under the command; running it again in a fresh L2 ({reruns} of at most {L2_CRASH_RERUNS})"
        );
    }
}

/// `vfvm-lab lab run ARGS` with the guest image (this build's agent, built into
/// `CARGO_TARGET_TMPDIR/<image_dir>`) named to the command as `cargo xtask test` does.
fn run_lab_with_guest_image(image_dir: &str, args: &[&str]) -> Output {
    let build_dir = std::path::Path::new(env!("CARGO_BIN_EXE_vfvm-lab")).parent().unwrap().to_path_buf();
    let out_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(image_dir);
    let built = lab().args(["image", "--agent"]).arg(build_dir.join("vfvm-agent")).arg("--out").arg(&out_dir).output().unwrap();
    assert!(built.status.success(), "vfvm-lab image failed:\n{}", String::from_utf8_lossy(&built.stdout));
    run_lab_command(
        lab().args(args).env("VFVM_TEST_AGENT_KERNEL", out_dir.join("vmlinux")).env("VFVM_TEST_AGENT_INITRD", out_dir.join("initrd.img")),
    )
}

#[test]
#[ignore = "boots the nested lab (about a minute); run by `cargo xtask test`"]
fn smoke_checks_pass_inside_l2() {
    let out = run_lab(&["lab", "smoke"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "lab smoke failed:\n{stdout}");
    // Each acceptance point must have been checked, not merely not failed.
    for expected in [
        "check: /dev/kvm present, KVM API version 12",
        "sriov_numvfs=4",
        "bound to igbvf with netdev",
        "bound to vfio-pci via driver_override, IOMMU group",
        "VFIO reports the group viable",
        "back on igbvf, netdev",
        "3 packets transmitted, 3 packets received",
        "to the peer host 198.18.0.2 answered",
        "L3 guest under L2's KVM reached userspace",
        "passed through to L3 (vfio-pci): guest igbvf got admin MAC 02:00:00:00:00:03 and pinged 198.18.0.2",
        "smoke: PASSED",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}

#[test]
#[ignore = "boots the nested lab (about half a minute); run by `cargo xtask test`"]
fn a_failing_command_fails_the_harness_with_its_output_shown() {
    let out = run_lab(&["lab", "run", "--vfs", "1", "--", "sh", "-c", "echo visible-7f3a; echo on-stderr-7f3a >&2; pwd; exit 7"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "the harness should exit with the command's status:\n{stdout}");
    assert!(stdout.contains("visible-7f3a"), "command stdout not shown:\n{stdout}");
    assert!(stdout.contains("on-stderr-7f3a"), "command stderr not shown:\n{stdout}");
    // The command runs in the caller's working directory (cargo runs tests in the package dir).
    assert!(stdout.contains(env!("CARGO_MANIFEST_DIR")), "command did not run in the caller's directory:\n{stdout}");
}

#[test]
fn bad_options_fail_before_anything_starts() {
    for (args, says) in [
        (&["lab", "run", "--vfs", "9", "--", "true"][..], "--vfs 9"),
        (&["lab", "run", "--mem", "lots", "--", "true"][..], "--mem \"lots\""),
        (&["lab", "run", "--vfs", "2"][..], "no command given"),
        (&["lab", "run", "--frobnicate", "--", "true"][..], "unknown lab run option"),
        (&["no-such-command"][..], "unknown command"),
        (&["soak", "--pods", "0"][..], "--pods \"0\": expected a number, 1 or more"),
        (&["bench", "--fast"][..], "unknown bench option \"--fast\""),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vfvm-lab")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?} should say {says:?}: {stderr}");
        assert!(!stderr.contains("booting L2"), "{args:?} started a boot: {stderr}");
    }
}

/// A descriptor that becomes readable when process `pid` exits, even though it is not
/// our child (QEMU is the harness's child).
fn pidfd_open(pid: i32) -> OwnedFd {
    // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(fd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
    let fd = i32::try_from(fd).expect("syscall(2) returned a descriptor, which is an int");
    // SAFETY: fd is the fresh descriptor checked above; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn exits_within(pidfd: &OwnedFd, limit: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd that lives across the call.
    let n = unsafe { libc::poll(&mut pfd, 1, i32::try_from(limit.as_millis()).unwrap_or(i32::MAX)) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

#[test]
#[ignore = "boots the nested lab (about half a minute); run by `cargo xtask test`"]
fn killing_the_harness_leaves_no_qemu_behind() {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut harness = lab()
        .args(["lab", "run", "--vfs", "1", "--", "sh", "-c", "echo command-running-5c1d; exec sleep 600"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    for (is_stderr, stream) in [
        (false, Box::new(harness.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>),
        (true, Box::new(harness.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send((is_stderr, line)).is_err() {
                    break;
                }
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut qemu_pid, mut run_dir) = (None, None);
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let (is_stderr, line) = rx.recv_timeout(wait).expect("the command never started inside L2");
        eprintln!("{line}");
        if is_stderr {
            if let Some(rest) = line.split("QEMU pid ").nth(1) {
                qemu_pid = rest.split_whitespace().next().and_then(|p| p.parse::<i32>().ok());
            }
            if let Some(rest) = line.split("run dir ").nth(1) {
                run_dir = Some(rest.trim().to_string());
            }
        } else if line.contains("command-running-5c1d") {
            break;
        }
    }
    let qemu_pid = qemu_pid.expect("the harness did not report QEMU's pid");
    let run_dir = run_dir.expect("the harness did not report its run dir");
    let qemu = pidfd_open(qemu_pid);

    harness.kill().unwrap(); // SIGKILL: no chance to clean up in-process
    harness.wait().unwrap();
    assert!(exits_within(&qemu, Duration::from_secs(30)), "QEMU {qemu_pid} outlived the killed harness");
    // Nothing else of this run may remain either.
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok().map(|c| (e.file_name(), c)))
        .filter(|(_, c)| String::from_utf8_lossy(c).contains(&run_dir))
        .map(|(pid, c)| format!("{}: {}", pid.to_string_lossy(), String::from_utf8_lossy(&c).replace('\0', " ")))
        .collect();
    assert!(survivors.is_empty(), "processes of the killed run remain: {survivors:?}");
}

#[test]
#[ignore = "starts the lab's QEMU; run by `cargo xtask test`"]
fn a_boot_that_overruns_its_limit_is_reported_not_waited_on() {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let out = lab().args(["lab", "run", "--boot-timeout", "3", "--", "true"]).stderr(Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("L2 was not ready within 3s"), "{stderr}");
    assert!(stderr.contains("last console lines"), "{stderr}");
    // Killed at the limit, not left to finish booting (which takes well over 3 s).
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

#[test]
#[ignore = "installs packages and fetches the kernel on a fresh machine; run by `cargo xtask test`"]
fn a_second_install_downloads_nothing() {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let first = lab().arg("install").stderr(Stdio::piped()).output().unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = lab().arg("install").stderr(Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    for busy in ["installing", "fetching", "apt", "built image"] {
        assert!(!stderr.contains(busy), "second install still did work ({busy:?}):\n{stderr}");
    }
    // Same images, by content address.
    assert_eq!(first.stdout, second.stdout);
}

/// The guest image builder, end to end: `vfvm-lab image --init-script` builds the
/// image (the default agent included, at /sbin/vfvm-agent, with its libraries), and L2
/// boots it as an L3 guest under its KVM. The test /init loads every module of
/// modules.load and reports /proc/modules and the agent's `--version`.
#[test]
#[ignore = "boots the nested lab and an L3 guest in it (about two minutes); run by `cargo xtask test`"]
fn guest_image_boots_as_l3_and_loads_its_modules() {
    let out_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-image-l3");
    let built = lab().args(["image", "--init-script", "--out"]).arg(&out_dir).output().unwrap();
    let manifest = String::from_utf8_lossy(&built.stdout);
    print!("{manifest}");
    assert!(built.status.success(), "vfvm-lab image failed:\n{manifest}");
    let path_of = |what: &str| -> String {
        manifest.lines().find_map(|l| l.strip_prefix(what)).unwrap_or_else(|| panic!("no {what:?} line in:\n{manifest}")).trim().to_string()
    };
    let (kernel, initrd) = (path_of("kernel: "), path_of("initrd: "));

    let out = run_lab(&[
        "lab",
        "run",
        "--vfs",
        "1",
        "--",
        env!("CARGO_BIN_EXE_vfvm-lab"),
        "inside",
        "boot-l3",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "booting the guest image failed:\n{stdout}");
    assert!(stdout.contains("l3: userspace after"), "{stdout}");
    assert!(stdout.contains("l3: insmod ok=") && stdout.contains(" failed=0"), "not every module loaded:\n{stdout}");
    assert!(!stdout.contains("insmod-failed"), "{stdout}");
    let loaded: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("l3: module ")).collect();
    for m in [
        "vsock",
        "vmw_vsock_virtio_transport_common",
        "vmw_vsock_virtio_transport",
        "virtio_pci",
        "virtio_net",
        "virtio_blk",
        "virtiofs",
        "fuse",
        "overlay",
        "igbvf",
    ] {
        assert!(loaded.contains(&m), "{m} is not in the guest's /proc/modules: {loaded:?}\n{stdout}");
    }
    // The agent's dynamic loader and libraries made it into the image.
    assert!(stdout.contains("l3: agent rc=0 vfvm-agent "), "the agent did not run in the guest:\n{stdout}");
}

/// `vfvm-lab image` through its command line: a second run with the same inputs finds
/// everything in place and writes nothing, and prints the same manifest. (Needs the
/// lab's kernel in the cache, as `cargo xtask test` and `install` fetch it.)
#[test]
fn a_second_image_build_writes_nothing() {
    let out_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-image-cli");
    // Any glibc-linked program will do as the agent; /bin/ls does not change with every
    // build (as this harness would), so the cache keeps one image for this test.
    let build = || lab().args(["image", "--agent", "/bin/ls", "--out"]).arg(&out_dir).stderr(Stdio::piped()).output().unwrap();
    let first = build();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = build();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    for busy in ["wrote ", "built image", "fetching", "installing"] {
        assert!(!stderr.contains(busy), "the second build still wrote something ({busy:?}):\n{stderr}");
    }
    assert_eq!(first.stdout, second.stdout);
    let manifest = String::from_utf8_lossy(&second.stdout);
    for expected in ["/init ", "/dev/console ", "libc.so.6", " vsock ", " vmw_vsock_virtio_transport ", " virtio_net ", " igbvf "] {
        assert!(manifest.contains(expected), "{expected:?} missing from the manifest:\n{manifest}");
    }
    assert!(manifest.contains(&format!("initrd: {}", out_dir.join("initrd.img").display())), "{manifest}");
    assert_eq!(
        std::fs::read(out_dir.join("manifest.txt")).unwrap(),
        manifest.lines().take_while(|l| !l.starts_with("kernel: ")).map(|l| format!("{l}\n")).collect::<String>().into_bytes()
    );
}

/// `vfvm-lab inside agent-check` in L2 (2 VFs) on the guest image built into
/// `CARGO_TARGET_TMPDIR/<image_dir>`, with QEMU or, given, this vfvm-vmm as the L3
/// VMM; it must pass; returns its output.
fn agent_check(image_dir: &str, vmm: Option<&std::path::Path>) -> String {
    let out_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(image_dir);
    let built = lab().args(["image", "--out"]).arg(&out_dir).output().unwrap();
    let manifest = String::from_utf8_lossy(&built.stdout);
    assert!(built.status.success(), "vfvm-lab image failed:\n{manifest}");
    let (kernel, initrd) = (out_dir.join("vmlinux"), out_dir.join("initrd.img"));
    let mut args = vec!["lab", "run", "--vfs", "2", "--", env!("CARGO_BIN_EXE_vfvm-lab"), "inside", "agent-check"];
    args.extend(["--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()]);
    if let Some(vmm) = vmm {
        args.extend(["--vmm", vmm.to_str().unwrap()]);
    }
    let out = run_lab(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "agent check ({}) failed:\n{stdout}", if vmm.is_some() { "vfvm-vmm" } else { "QEMU" });
    stdout
}

/// The guest image with the real agent as PID 1, booted as an L3 guest with vhost-vsock
/// and a VF passed through: the agent answers over AF_VSOCK, configures the VF it
/// finds by guest PCI address, and the lab's peer host pings the address it set.
#[test]
#[ignore = "boots the nested lab and an L3 guest (about a minute); run by `cargo xtask test`"]
fn agent_image_serves_over_vsock_and_configures_a_vf_by_pci_address() {
    let stdout = agent_check("guest-image-agent", None);
    for expected in [
        "(vfvm.agent.v1) answered over vsock://3:1024",
        "modules loaded",
        "agent configured the VF at guest 0000:00:05.0 as net0 198.18.0.33/24",
        "interface updated interface=net0 changes=0",
        "3 packets transmitted, 3 packets received",
        "the agent's logs arrived over vsock port 1025",
        "agent-check: PASSED",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}

/// The same guest image and checks with vfvm-vmm as the L3 VMM: the VF passed
/// through with `--vfio` (VFIO container, DMA-mapped guest RAM, BARs in KVM slots,
/// MSI-X through irqfds), its guest address taken from the control API's status; the
/// agent configures it and the lab's peer pings the guest over it.
#[test]
#[ignore = "boots the nested lab and an L3 guest (about a minute); run by `cargo xtask test`"]
fn vfvm_vmm_passes_a_vf_through_and_the_agent_configures_it() {
    let build_dir = std::path::Path::new(env!("CARGO_BIN_EXE_vfvm-lab")).parent().unwrap().to_path_buf();
    let vmm = build_dir.join("vfvm-vmm");
    assert!(vmm.exists(), "{} is not built (cargo build -p vfvm-vmm)", vmm.display());
    let stdout = agent_check("guest-image-vfio", Some(&vmm));
    for expected in [
        "check: vfvm-vmm's status lists vf0: host ",
        "(vfvm.agent.v1) answered over hvsock://",
        "modules loaded",
        "as net0 198.18.0.33/24",
        "3 packets transmitted, 3 packets received",
        "the agent's logs arrived over vsock port 1025",
        "agent-check (vfvm-vmm, VFIO): PASSED",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}

/// VFs hot-plugged into a running vfvm-vmm guest through the control API (ACPI
/// hot-plug, the guest's stock acpiphp): 20 plug/unplug cycles of one VF with the
/// agent configuring it each time (one unplug under traffic), two VFs at once, bad
/// input, no leak of fds, KVM slots, GSIs or guest PCI functions, a guest that never
/// ejects (forced after the bound), and the VFs back on igbvf.
#[test]
#[ignore = "boots the nested lab and two L3 guests (several minutes); run by `cargo xtask test`"]
fn vfs_hot_plug_into_a_running_vm_and_unplug_without_a_trace() {
    let build_dir = std::path::Path::new(env!("CARGO_BIN_EXE_vfvm-lab")).parent().unwrap().to_path_buf();
    let vmm = build_dir.join("vfvm-vmm");
    assert!(vmm.exists(), "{} is not built (cargo build -p vfvm-vmm)", vmm.display());
    let out_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-image-hotplug");
    let built = lab().args(["image", "--out"]).arg(&out_dir).output().unwrap();
    assert!(built.status.success(), "vfvm-lab image failed:\n{}", String::from_utf8_lossy(&built.stdout));
    let (kernel, initrd) = (out_dir.join("vmlinux"), out_dir.join("initrd.img"));
    let cycles = std::env::var("VFVM_HOTPLUG_CYCLES").unwrap_or_else(|_| "20".into());
    let mut args = vec!["lab", "run", "--vfs", "3", "--", env!("CARGO_BIN_EXE_vfvm-lab"), "inside", "hotplug-check"];
    args.extend(["--vmm", vmm.to_str().unwrap(), "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()]);
    args.extend(["--cycles", &cycles]);
    let out = run_lab(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "hot-plug check failed:\n{stdout}");
    for line in stdout.lines().filter(|l| l.starts_with("hotplug: ")) {
        vfvm_test_containerd::print_figures(line);
    }
    for expected in [
        "check: cycle 0: the peer pinged the guest over hot-plugged VF",
        "(while the peer pinged over it)",
        &format!("check: {cycles} hot-plug/unplug cycles of VF"),
        "check: two VFs at once plugged, configured, pinged and unplugged",
        "check: adding the PF (on igb) is refused:",
        "check: an id in use is refused:",
        "check: removing an unknown id is refused:",
        "check: an add while paused is refused:",
        "check: no leak: memory slots, MSI GSIs, VFIO devices and guest PCI functions as before the first plug; VMM fds",
        "check: a guest that never ejects (acpiphp.disable=1): removal forced after",
        "is back on igbvf with netdev",
        "hotplug-check: PASSED",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}

/// `cargo xtask bench-hotplug --rounds 1`: a VF hot-plugged into a running guest by
/// vfvm-vmm and by QEMU (QMP on a root port), and cold-plugged; prints the figures.
#[test]
#[ignore = "boots the nested lab and three L3 guests (a few minutes); run by `cargo xtask test`"]
fn bench_hotplug_one_round_prints_vfvm_and_qemu_figures() {
    let out = run_lab(&["bench-hotplug", "--rounds", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let figures: Vec<&str> = stdout.lines().filter(|l| l.starts_with("bench-hotplug:")).collect();
    vfvm_test_containerd::print_figures(&figures.join("\n"));
    assert_eq!(out.status.code(), Some(0), "cargo xtask bench-hotplug --rounds 1 failed:\n{stdout}");
    for expected in [
        "bench-hotplug: round 1: hot-plug to configured, first/again: vfvm-vmm ",
        "bench-hotplug: median hot-plug to configured netdev, first into the VM: vfvm-vmm ",
        "bench-hotplug: median hot-plug to configured netdev, again: vfvm-vmm ",
        "bench-hotplug: median unplug (eject and release / device_del to DEVICE_DELETED): vfvm-vmm ",
        "bench-hotplug: median VMM start to the VF configured: vfvm-vmm hot-plug ",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}

/// A VF whose IOMMU group is not viable: L2 booted with the igb PF's root port
/// without ACS, so the port, the PF and the VFs share one group. A pod with the VF
/// (through containerd 2.1 and the shim) fails naming the VF, the group and the PF's
/// driver, and the VF is left exactly as it was; vfvm-vmm given the VF on vfio-pci
/// refuses it the same way.
#[test]
#[ignore = "boots the nested lab with another topology (about two minutes); run by `cargo xtask test`"]
fn a_vf_in_a_non_viable_iommu_group_fails_the_pod_and_is_left_alone() {
    let out = run_lab_with_guest_image(
        "guest-image-non-viable",
        &["lab", "run", "--no-acs", "--vfs", "1", "--", env!("CARGO_BIN_EXE_vfvm-lab"), "inside", "non-viable-group"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "the non-viable group check failed in L2:\n{stdout}");
    for expected in [
        "shares IOMMU group",
        "check: the pod failed: ",
        "is not viable: ",
        "is bound to igb",
        "left as it was",
        "check: vfvm-vmm --vfio ",
        "non-viable-group: PASSED",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}

/// `cargo xtask demo`'s host mode, on a host whose KVM boots Linux: L2. Its probe must
/// find that this KVM boots the guest image (the agent answers), and the pod then runs
/// right there, under a private containerd, in a vfvm VM, leaving nothing behind; then
/// the VF pod (L2 has the lab's igb VF): its container sees the VF and pings the peer
/// over it, and the VF is back in the pod netns afterwards.
#[test]
#[ignore = "boots the nested lab and a pod's VM in it (about three minutes); run by `cargo xtask test`"]
fn demo_host_mode_runs_the_pod_on_a_host_whose_kvm_boots_linux() {
    let out = run_lab_with_guest_image(
        "guest-image-demo-host",
        &["lab", "run", "--vfs", "1", "--", env!("CARGO_BIN_EXE_vfvm-lab"), "inside", "demo-host"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "the demo's host mode failed in L2:\n{stdout}");
    for expected in [
        "this host's KVM booted the guest image with vfvm-vmm and its agent answered in",
        ": running the pod on this host",
        "pod| hello from a container in a vfvm VM",
        "vfvm.sandbox=demo",
        "vfvm demo: nothing left behind",
        "vfvm demo: the VF pod's container saw net1 (198.18.0.50/24) in its VM and pinged 198.18.0.2 over the VF",
        "is back in the pod netns as net1 with 198.18.0.50/24, on igbvf",
        "vfvm demo: PASSED (the pod ran in a vfvm VM on this host)",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}

/// The short version of `cargo xtask bench` (one round instead of five): both VMMs
/// boot the same guest in one lab run, and vfvm-vmm the guest image to its agent
/// serving, with and without a VF cold-plugged (and QEMU with the same VF); the
/// figures (time to userspace, KVM's exit counters, vfvm-vmm's own exit breakdown,
/// the image's times, ratios) are printed, even when this passes. It asserts that the comparison ran, not how it came out.
#[test]
#[ignore = "builds a release vfvm-vmm and boots the nested lab (a few minutes); run by `cargo xtask test`"]
fn bench_boot_one_round_prints_vfvm_and_qemu_figures() {
    let out = run_lab(&["bench", "--runs", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let figures: Vec<&str> = stdout.lines().filter(|l| l.starts_with("bench:")).collect();
    vfvm_test_containerd::print_figures(&figures.join("\n"));
    assert_eq!(out.status.code(), Some(0), "cargo xtask bench --runs 1 failed:\n{stdout}");
    for expected in [
        "bench: round 1: vfvm-vmm ",
        "bench: median time to userspace: vfvm-vmm ",
        "ratio vfvm/QEMU",
        "bench: median exits (exits): vfvm-vmm ",
        "bench: median port I/O (io_exits): vfvm-vmm ",
        "bench: median guest image (agent as PID 1) to the agent serving: ",
        "bench: median guest image to the agent serving with VF ",
        "bench: vfvm-vmm's exits to the VMM (median round): ",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}
