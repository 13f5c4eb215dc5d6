//! containerd-shim-vfvm-v2 under real containerd 1.6 and 2.1, driven by `ctr`, with
//! pods in vfvm-vmm VMs: these run inside the lab's L2 machine (real KVM there),
//! where `cargo xtask test` runs every `lab_*` test.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vfvm_protocols::vcpu_threads::VCPUS_ALL_IN_KVM;
use vfvm_test_containerd::igb_vfs::IgbVf;
use vfvm_test_containerd::{install_vfvm, oci, pids_named, vfvm_consoles, vfvm_leftovers, wait_exit, Containerd, Version, VFVM_STATE_DIR};

const RUNTIME: &str = "io.containerd.vfvm.v2";

/// The workspace's build directory, from this test binary's path (target/debug/deps/..).
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent().and_then(Path::parent).expect("target/debug").to_path_buf()
}

/// Installs this build as containerd's vfvm runtime (see `install_vfvm`).
fn install(kernel_override: Option<&str>) {
    install_vfvm(&build_dir(), kernel_override, |c| c).unwrap();
}

/// What a finished pod must not leave behind.
fn assert_nothing_left(what: &str) {
    let left = vfvm_leftovers();
    assert!(left.is_empty(), "{what}: left behind: {left:?}");
}

fn ctr_run_in_a_vm(version: Version) {
    install(None);
    let c = Containerd::start(version).unwrap();
    c.import_test_images().unwrap();
    let name = format!("vm-{}", version.name().replace('.', ""));

    // A pod in a VM: the container sees the VM's kernel command line, the shim's
    // exit code comes back through ctr.
    let started = Instant::now();
    let out = c
        .ctr_within(
            &["run", "--rm", "--runtime", RUNTIME, oci::BUSYBOX_REF, &name, "sh", "-c", "echo hello; cat /proc/cmdline; exit 7"],
            CTR_LIMIT,
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("containerd {}: ctr run in a VM took {:.1}s", version.name(), started.elapsed().as_secs_f64());
    assert!(stdout.contains("hello"), "stdout: {stdout}\nstderr: {}\ncontainerd log:\n{}", String::from_utf8_lossy(&out.stderr), c.log());
    assert!(stdout.contains(&format!("vfvm.sandbox={name}")), "the container should run in the pod's VM; /proc/cmdline: {stdout}");
    assert_eq!(out.status.code(), Some(7), "exit code; stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_nothing_left("after ctr run --rm");

    exec_kill_delete(&c, &format!("{name}-d"));
    c.stop().unwrap();
}

/// How long one ctr command may take: a pod's VM boots in about 25 s in an idle
/// lab and in about 90 s while the host is busy (L3 under TCG-emulated SVM).
const CTR_LIMIT: Duration = Duration::from_secs(300);

/// A detached pod: exec into it (output and exit code), SIGKILL an exec (137), stop
/// the pod with SIGTERM (the pause image exits 0 on it), delete it: nothing is left.
fn exec_kill_delete(c: &Containerd, pod: &str) {
    let mut events = c.events().unwrap();
    let fail = |what: &str, out: &std::process::Output| -> String {
        format!(
            "{what}: {}\nstdout: {}\nstderr: {}\nconsoles:\n{}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            vfvm_consoles(),
            c.log()
        )
    };
    let out = c.ctr_within(&["run", "-d", "--runtime", RUNTIME, oci::PAUSE_REF, pod], CTR_LIMIT).unwrap();
    assert!(out.status.success(), "{}", fail("ctr run -d", &out));

    let out = c
        .ctr_within(&["task", "exec", "--exec-id", "e1", pod, "sh", "-c", "echo from-exec; cat /proc/cmdline; exit 3"], CTR_LIMIT)
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("from-exec") && stdout.contains(&format!("vfvm.sandbox={pod}")), "{}", fail("ctr task exec", &out));
    assert_eq!(out.status.code(), Some(3), "{}", fail("the exec's exit code", &out));

    // An exec killed with SIGKILL exits 137, in its exit event and for the attached
    // ctr, which returns only once the shim has closed the exec's output FIFOs.
    std::thread::scope(|s| {
        let attached = s.spawn(|| c.ctr_within(&["task", "exec", "--exec-id", "e2", pod, "sleep", "1000"], CTR_LIMIT));
        events
            .wait_for("/tasks/exec-started", "e2", Instant::now() + CTR_LIMIT)
            .unwrap_or_else(|e| panic!("{e}\nconsoles:\n{}\ncontainerd log:\n{}", vfvm_consoles(), c.log()));
        let out = c.ctr_within(&["task", "kill", "--exec-id", "e2", "--signal", "SIGKILL", pod], CTR_LIMIT).unwrap();
        assert!(out.status.success(), "{}", fail("ctr task kill --exec-id", &out));
        let exit = events
            .wait_for("/tasks/exit", "e2", Instant::now() + CTR_LIMIT)
            .unwrap_or_else(|e| panic!("{e}\nconsoles:\n{}\ncontainerd log:\n{}", vfvm_consoles(), c.log()));
        assert!(exit.contains("\"exit_status\":137"), "the exec's exit event: {exit}");
        let out = attached.join().expect("the attached ctr exec's thread").unwrap();
        assert_eq!(out.status.code(), Some(137), "{}", fail("the attached ctr task exec of the SIGKILLed exec", &out));
    });

    exec_with_a_tty(c, pod);
    let out = c.ctr_within(&["task", "ps", pod], CTR_LIMIT).unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).lines().count() >= 2, "{}", fail("ctr task ps", &out));
    let out = c.ctr_within(&["task", "metrics", pod], CTR_LIMIT).unwrap();
    assert!(out.status.success(), "{}", fail("ctr task metrics", &out));
    let out = c.ctr_within(&["task", "pause", pod], CTR_LIMIT).unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("vfvm does not pause"),
        "{}",
        fail("ctr task pause should say vfvm does not pause", &out)
    );

    // The pod's init: SIGTERM, the pause image's clean stop.
    let out = c.ctr_within(&["task", "kill", pod], CTR_LIMIT).unwrap();
    assert!(out.status.success(), "{}", fail("ctr task kill", &out));
    // The init's exit: the execs' exits name the container too.
    let init_exit = format!("\"id\":\"{pod}\"");
    loop {
        let exit = events
            .wait_for("/tasks/exit", pod, Instant::now() + CTR_LIMIT)
            .unwrap_or_else(|e| panic!("{e}\nconsoles:\n{}\ncontainerd log:\n{}", vfvm_consoles(), c.log()));
        if exit.contains(&init_exit) {
            break;
        }
    }
    let out = c.ctr_within(&["task", "delete", pod], CTR_LIMIT).unwrap();
    assert!(out.status.success(), "{}", fail("ctr task delete (the init's exit status should be 0)", &out));
    let out = c.ctr_within(&["container", "delete", pod], CTR_LIMIT).unwrap();
    assert!(out.status.success(), "{}", fail("ctr container delete", &out));
    assert_nothing_left("after ctr task kill, task delete and container delete");
}

/// `ctr task exec -t` on a pseudo-terminal of the test's own (ctr insists on one):
/// the process has a TTY of the size ctr found, sees a new size after the terminal
/// is resized (SIGWINCH to ctr, ResizePty to the shim, the agent resizes the guest's
/// pty), and ends on the EOF typed at it.
fn exec_with_a_tty(c: &Containerd, pod: &str) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize { ws_row: 20, ws_col: 70, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: openpty fills in two new descriptors, which we own from here on.
    assert_eq!(unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) }, 0);
    // SAFETY: just created, owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = c.ctr();
    cmd.args([
        "task",
        "exec",
        "-t",
        "--exec-id",
        "tty1",
        pod,
        "sh",
        "-c",
        "tty; stty size; while read x; do stty size; done; echo tty-done",
    ]);
    cmd.stdin(slave.try_clone().unwrap()).stdout(slave.try_clone().unwrap()).stderr(slave);
    // SAFETY: setsid and TIOCSCTTY between fork and exec: the pty becomes ctr's
    // controlling terminal, so a resize signals ctr.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + CTR_LIMIT;
    assert!(
        read_until(&master, &mut seen, "/dev/pts/", deadline),
        "the exec should run on a TTY of its own devpts (`tty` names it); it printed {seen:?}\ncontainerd log:\n{}",
        c.log()
    );
    // ctr sends the size on its own after the start (and after each SIGWINCH):
    // each line typed makes the process print its size again, until it shows it.
    assert!(size_shown(&master, &mut seen, "20 70", deadline), "the exec should see its terminal's size 20x70; it printed {seen:?}");
    let bigger = libc::winsize { ws_row: 30, ws_col: 100, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ on our pty master with a valid winsize.
    assert_eq!(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ as _, &bigger) }, 0);
    assert!(size_shown(&master, &mut seen, "30 100", deadline), "the exec should see the terminal's new size 30x100; it printed {seen:?}");
    write_all(&master, b"\x04");
    assert!(read_until(&master, &mut seen, "tty-done", deadline), "EOF should end the exec's loop; it printed {seen:?}");
    let status = wait_bounded(&mut child, deadline);
    assert_eq!(status.code(), Some(0), "ctr task exec -t; it printed {seen:?}");
}

/// Types a line at a time (the process answers each with `stty size`) until `size`
/// shows up in its output; false once `deadline` passes.
fn size_shown(master: &std::os::fd::OwnedFd, seen: &mut String, size: &str, deadline: Instant) -> bool {
    let mark = seen.len();
    while !seen[mark..].contains(size) && Instant::now() < deadline {
        write_all(master, b"\n");
        let before = seen.len();
        let step = (Instant::now() + Duration::from_secs(10)).min(deadline);
        // The echoed newline, then the size line.
        while seen[before..].matches('\n').count() < 2 && read_some(master, seen, step) {}
    }
    seen[mark..].contains(size)
}

fn write_all(fd: &std::os::fd::OwnedFd, bytes: &[u8]) {
    use std::io::Write;
    std::fs::File::from(fd.try_clone().unwrap()).write_all(bytes).unwrap();
}

/// Reads what is there (waiting up to `deadline`); false on timeout or EOF.
fn read_some(fd: &std::os::fd::OwnedFd, into: &mut String, deadline: Instant) -> bool {
    use std::os::fd::AsRawFd;
    let ms = deadline.saturating_duration_since(Instant::now()).as_millis().try_into().unwrap_or(i32::MAX);
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd we own.
    if unsafe { libc::poll(&mut pfd, 1, ms) } != 1 {
        return false;
    }
    let mut buf = [0u8; 4096];
    // SAFETY: reading into our own buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return false;
    }
    into.push_str(&String::from_utf8_lossy(&buf[..usize::try_from(n).expect("checked positive")]));
    true
}

fn read_until(fd: &std::os::fd::OwnedFd, into: &mut String, needle: &str, deadline: Instant) -> bool {
    while !into.contains(needle) {
        if !read_some(fd, into, deadline) {
            return false;
        }
    }
    true
}

/// Waits for a child up to `deadline`, killing it after that.
fn wait_bounded(child: &mut std::process::Child, deadline: Instant) -> std::process::ExitStatus {
    if !wait_exit(i32::try_from(child.id()).expect("a pid fits an i32"), deadline.saturating_duration_since(Instant::now())).unwrap() {
        let _ = child.kill();
    }
    child.wait().unwrap()
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_shim_ctr_run_in_a_vm_containerd_1_6() {
    ctr_run_in_a_vm(Version::V1_6);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_shim_ctr_run_in_a_vm_containerd_2_1() {
    ctr_run_in_a_vm(Version::V2_1);
}

/// SIGKILL the shim of a running pod: containerd notices, runs the shim's `delete`,
/// which stops the VMM and virtiofsd and removes the pod's state and mounts, all
/// before containerd publishes the task's exit.
fn killed_shim(version: Version) {
    install(None);
    let c = Containerd::start(version).unwrap();
    c.import_test_images().unwrap();
    let mut events = c.events().unwrap();
    let pod = format!("killed-{}", version.name().replace('.', ""));
    let out = c.ctr_within(&["run", "-d", "--runtime", RUNTIME, oci::PAUSE_REF, &pod], CTR_LIMIT).unwrap();
    assert!(
        out.status.success(),
        "ctr run -d: {}\nconsoles:\n{}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        vfvm_consoles(),
        c.log()
    );
    let shims = pids_named("containerd-shim-vfvm-v2");
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
    assert_eq!(pids_named("vfvm-vmm").len(), 1, "the pod's VMM");
    // SAFETY: kill(2) on the shim we just found.
    assert_eq!(unsafe { libc::kill(shims[0], libc::SIGKILL) }, 0);
    let exit =
        events.wait_for("/tasks/exit", &pod, Instant::now() + CTR_LIMIT).unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", c.log()));
    eprintln!("containerd {}: after the shim's SIGKILL: {exit}", version.name());
    assert_nothing_left("after containerd's cleanup of a killed shim");
    let _ = c.ctr_within(&["task", "delete", &pod], CTR_LIMIT).unwrap();
    let out = c.ctr_within(&["container", "delete", &pod], CTR_LIMIT).unwrap();
    assert!(out.status.success(), "ctr container delete: {}", String::from_utf8_lossy(&out.stderr));
    assert_nothing_left("after ctr container delete");
    c.stop().unwrap();
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_shim_a_killed_shim_is_cleaned_up_by_containerd_1_6() {
    killed_shim(Version::V1_6);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_shim_a_killed_shim_is_cleaned_up_by_containerd_2_1() {
    killed_shim(Version::V2_1);
}

/// Pods that cannot start: each fails through ctr with an error that names the
/// input and what was expected, and leaves nothing behind. The agent that never
/// answers (the config's vsock port has no listener in the guest) fails within the
/// configured dial timeout.
fn bad_input(version: Version) {
    const DIAL_TIMEOUT_SECS: u64 = 20;
    install(None);
    let c = Containerd::start(version).unwrap();
    c.import_test_images().unwrap();
    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "io.katacontainers.config.hypervisor.default_vcpus=two",
            "bad-vcpus",
            &["io.katacontainers.config.hypervisor.default_vcpus", "\"two\"", "a whole number from 1 to 8"],
        ),
        (
            "io.katacontainers.config.hypervisor.default_vcpus=64",
            "many-vcpus",
            &["io.katacontainers.config.hypervisor.default_vcpus", "\"64\"", "from 1 to 8"],
        ),
        (
            "io.katacontainers.config.hypervisor.default_memory=1048576",
            "much-memory",
            &["io.katacontainers.config.hypervisor.default_memory", "\"1048576\"", "to 16384"],
        ),
        (
            "io.katacontainers.config.runtime.enable_sriov=maybe",
            "bad-sriov",
            &["io.katacontainers.config.runtime.enable_sriov", "\"maybe\""],
        ),
        (
            "io.katacontainers.config.runtime.enable_sriov=true",
            "sriov-no-netns",
            &["enable_sriov", "no network namespace to find its VFs in", "nothing was changed"],
        ),
    ];
    for (annotation, name, wanted) in cases {
        let out = c
            .ctr_within(&["run", "--rm", "--runtime", RUNTIME, "--annotation", annotation, oci::BUSYBOX_REF, name, "true"], CTR_LIMIT)
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{annotation}: the pod should fail");
        for w in wanted {
            assert!(stderr.contains(w), "{annotation}: the error should contain {w:?}: {stderr}");
        }
        let _ = c.ctr_within(&["container", "delete", name], CTR_LIMIT).unwrap();
        assert_nothing_left(annotation);
    }

    // A sandbox id that is a path (it would become `<state_dir>/<id>`, removed whole
    // at teardown) or words (it goes on the guest's kernel command line): refused
    // before anything is made, the path's target untouched.
    let victim = Path::new("/tmp/vfvm-victim");
    std::fs::create_dir_all(victim).unwrap();
    std::fs::write(victim.join("keep"), b"mine").unwrap();
    for (id, name) in [("../../tmp/vfvm-victim", "bad-id-path"), ("pod init=/bin/sh", "bad-id-words")] {
        let out = c
            .ctr_within(
                &[
                    "run",
                    "--rm",
                    "--runtime",
                    RUNTIME,
                    "--annotation",
                    &format!("io.kubernetes.cri.sandbox-id={id}"),
                    "--annotation",
                    "io.kubernetes.cri.container-type=sandbox",
                    oci::BUSYBOX_REF,
                    name,
                    "true",
                ],
                CTR_LIMIT,
            )
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "sandbox id {id:?}: the pod should fail");
        for w in ["annotation io.kubernetes.cri.sandbox-id", &format!("{id:?}"), "expected an id as containerd defines it"] {
            assert!(stderr.contains(w), "sandbox id {id:?}: the error should contain {w:?}: {stderr}");
        }
        let _ = c.ctr_within(&["container", "delete", name], CTR_LIMIT).unwrap();
        assert_nothing_left(id);
    }
    assert_eq!(std::fs::read(victim.join("keep")).unwrap(), b"mine", "the id's path target must be untouched");
    std::fs::remove_dir_all(victim).unwrap();

    install_vfvm(&build_dir(), None, |config| {
        config
            .replace("vsock_port = 1024", "vsock_port = 4000")
            .replace("dial_timeout_secs = 120", &format!("dial_timeout_secs = {DIAL_TIMEOUT_SECS}"))
    })
    .unwrap();
    let started = Instant::now();
    let out = c.ctr_within(&["run", "--rm", "--runtime", RUNTIME, oci::BUSYBOX_REF, "silent-agent", "true"], CTR_LIMIT).unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("the agent did not answer within {DIAL_TIMEOUT_SECS} s")), "{stderr}");
    // An idle guest (its agent listens on another port): the error says the VMM's
    // vCPU is in the guest, not held by the VMM.
    assert!(stderr.contains("the VMM's vCPU threads: vcpu0 ") && stderr.contains(VCPUS_ALL_IN_KVM), "{stderr}");
    eprintln!("containerd {}: an agent that never answers failed the pod after {:.1}s: {stderr}", version.name(), took.as_secs_f64());
    // The dial timeout, plus what comes before it (virtiofsd) and the undo after.
    assert!(took < Duration::from_secs(DIAL_TIMEOUT_SECS + 30), "the pod should fail within the dial timeout: took {took:?}");
    let _ = c.ctr_within(&["container", "delete", "silent-agent"], CTR_LIMIT).unwrap();
    assert_nothing_left("after an agent that never answered");
    c.stop().unwrap();
    install(None);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_shim_bad_input_fails_the_pod_clearly_and_leaves_nothing_containerd_1_6() {
    bad_input(Version::V1_6);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_shim_bad_input_fails_the_pod_clearly_and_leaves_nothing_containerd_2_1() {
    bad_input(Version::V2_1);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_shim_a_missing_kernel_fails_the_pod_clearly_and_leaves_nothing() {
    for version in Version::ALL {
        install(Some("/nonexistent/vmlinuz"));
        let c = Containerd::start(version).unwrap();
        c.import_test_images().unwrap();
        let out = c.ctr_within(&["run", "--rm", "--runtime", RUNTIME, oci::BUSYBOX_REF, "nokernel", "true"], CTR_LIMIT).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "containerd {}: the pod should fail", version.name());
        assert!(
            stderr.contains("hypervisor.kernel") && stderr.contains("/nonexistent/vmlinuz"),
            "containerd {}: the error should name the setting and the path: {stderr}",
            version.name()
        );
        let _ = c.ctr_within(&["container", "delete", "nokernel"], CTR_LIMIT).unwrap();
        assert_nothing_left("after a failed create");
        c.stop().unwrap();
    }
    install(None);
}

fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const VF_POD_NETNS: &str = "vfpod";

/// One VF of the test pod, as sriov-cni would leave it in the pod netns.
struct PodVf {
    index: u32,
    name: &'static str,
    mac: &'static str,
    cidr: &'static str,
    /// A route through it (destination, gateway).
    route: (&'static str, &'static str),
}

/// Two VFs: net1 on the lab's peer subnet, net2 on one of its own.
const POD_VFS: [PodVf; 2] = [
    PodVf { index: 3, name: "net1", mac: "02:00:00:00:10:29", cidr: "198.18.0.41/24", route: ("198.19.41.0/24", "198.18.0.254") },
    PodVf { index: 2, name: "net2", mac: "02:00:00:00:10:2a", cidr: "198.18.42.1/24", route: ("198.19.42.0/24", "198.18.42.254") },
];

/// A pod network namespace holding the VFs' netdevs as sriov-cni leaves them:
/// renamed, with the pod's MAC, MTU 1400, an address and a route. Returns the VFs'
/// addresses, in [`POD_VFS`] order.
fn vf_pod_netns() -> Vec<String> {
    sh(&format!("ip netns add {VF_POD_NETNS}"));
    POD_VFS
        .iter()
        .map(|v| {
            let vf = IgbVf::find(v.index).unwrap();
            let netdev = vf.netdev().expect("the VF's netdev in the host netns");
            let (name, mac, cidr, (dst, gw)) = (v.name, v.mac, v.cidr, v.route);
            // As sriov-cni: the MAC pinned on the PF, then taken by the netdev.
            vf.pin_mac(mac).unwrap();
            sh(&format!("ip link set {netdev} netns {VF_POD_NETNS} name {name}"));
            sh(&format!(
                "ip -n {VF_POD_NETNS} link set {name} mtu 1400 up && \
                 ip -n {VF_POD_NETNS} addr add {cidr} dev {name} && \
                 ip -n {VF_POD_NETNS} route add {dst} via {gw} dev {name} onlink"
            ));
            vf.pci
        })
        .collect()
}

/// What the pod's netns shows of each VF netdev (and that each VF is on igbvf again).
fn assert_vfs_back_in_pod_netns(vfs: &[String], when: &str) {
    for (vf, v) in vfs.iter().zip(&POD_VFS) {
        let driver =
            std::fs::read_link(format!("/sys/bus/pci/devices/{vf}/driver")).map(|l| l.file_name().unwrap().to_string_lossy().into_owned());
        assert_eq!(driver.as_deref().ok(), Some("igbvf"), "{when}: VF {vf}'s driver");
        let link = sh(&format!("ip -n {VF_POD_NETNS} -o link show {}", v.name));
        assert!(link.contains("mtu 1400") && link.contains(v.mac), "{when}: {} in the pod netns: {link}", v.name);
        let addr = sh(&format!("ip -n {VF_POD_NETNS} -o addr show dev {}", v.name));
        assert!(addr.contains(v.cidr), "{when}: {}'s address: {addr}", v.name);
        let routes = sh(&format!("ip -n {VF_POD_NETNS} route"));
        assert!(routes.contains(&format!("{} via {}", v.route.0, v.route.1)), "{when}: the pod's route: {routes}");
    }
}

/// The headline through ctr: a pod with `enable_sriov` whose netns holds two VFs
/// gets both in its VM (vfio-pci on the host, igbvf in the guest), each under its
/// pod-netns name with its MAC, MTU, address and route; its container pings the lab's
/// peer over net1. At the pod's end the VFs are back in the pod netns, configured, on
/// igbvf, and nothing is left. Then the same pod's shim is SIGKILLed while it runs:
/// containerd's `shim delete` gives the VFs back the same way.
fn sriov_pod(version: Version) {
    install(None);
    let c = Containerd::start(version).unwrap();
    c.import_test_images().unwrap();
    let vfs = vf_pod_netns();
    let netns = format!("network:/run/netns/{VF_POD_NETNS}");
    let sriov = "io.katacontainers.config.runtime.enable_sriov=true";
    let pod = format!("sriov-{}", version.name().replace('.', ""));
    let script = "ip -o link; ip -o addr; ip route; ping -c 3 -W 10 198.18.0.2";
    let started = Instant::now();
    let out = c
        .ctr_within(
            &["run", "--rm", "--runtime", RUNTIME, "--annotation", sriov, "--with-ns", &netns, oci::BUSYBOX_REF, &pod, "sh", "-c", script],
            CTR_LIMIT,
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("containerd {}: a pod with VFs {vfs:?} ran in {:.1}s:\n{stdout}", version.name(), started.elapsed().as_secs_f64());
    assert!(
        out.status.success(),
        "ctr run: {}\nconsoles:\n{}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        vfvm_consoles(),
        c.log()
    );
    for v in &POD_VFS {
        let route = format!("{} via {} dev {}", v.route.0, v.route.1, v.name);
        for want in [v.name, v.mac, v.cidr, route.as_str()] {
            assert!(stdout.contains(want), "the container should see {want:?}: {stdout}");
        }
    }
    assert!(stdout.matches("mtu 1400").count() >= 2, "both VFs with MTU 1400: {stdout}");
    assert!(
        stdout.contains("3 packets transmitted") && !stdout.contains(", 0 packets received"),
        "the peer should answer over net1: {stdout}"
    );
    assert_nothing_left("after the VF pod");
    assert_vfs_back_in_pod_netns(&vfs, "after the VF pod");

    // Bad input: the pod's second VF held by another sandbox (its lock taken as that
    // sandbox's shim holds it). The pod fails naming the VF and the holder, and both
    // VFs are left as they were (the first one had been prepared: rolled back).
    {
        let held: vfvm_shim::vf::PciAddress = vfs[1].parse().unwrap();
        let lock_dir = Path::new(VFVM_STATE_DIR).join("vf-locks");
        let _other = vfvm_shim::vf::lock::VfLock::acquire(&lock_dir, held, "sandbox other-pod").unwrap();
        let name = format!("{pod}-held");
        let out = c
            .ctr_within(
                &["run", "--rm", "--runtime", RUNTIME, "--annotation", sriov, "--with-ns", &netns, oci::BUSYBOX_REF, &name, "true"],
                CTR_LIMIT,
            )
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a pod whose VF another sandbox holds should fail");
        assert!(
            stderr.contains(&format!("VF {held} is in use by sandbox other-pod")),
            "the error should name the VF and its holder: {stderr}"
        );
        eprintln!("containerd {}: a pod whose VF another sandbox held: {}", version.name(), stderr.trim());
        let _ = c.ctr_within(&["container", "delete", &name], CTR_LIMIT).unwrap();
        assert_nothing_left("after a pod whose VF another sandbox held");
        assert_vfs_back_in_pod_netns(&vfs, "after a pod whose VF another sandbox held");
    }

    // The shim SIGKILLed with the VFs in the VM.
    let mut events = c.events().unwrap();
    let killed = format!("{pod}-k");
    let out = c
        .ctr_within(&["run", "-d", "--runtime", RUNTIME, "--annotation", sriov, "--with-ns", &netns, oci::PAUSE_REF, &killed], CTR_LIMIT)
        .unwrap();
    assert!(out.status.success(), "ctr run -d: {}\nconsoles:\n{}", String::from_utf8_lossy(&out.stderr), vfvm_consoles());
    for vf in &vfs {
        let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{vf}/driver")).unwrap();
        assert!(driver.ends_with("vfio-pci"), "the running pod's VF {vf} is on vfio-pci: {}", driver.display());
    }
    let shims = pids_named("containerd-shim-vfvm-v2");
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
    // SAFETY: kill(2) on the shim just found.
    assert_eq!(unsafe { libc::kill(shims[0], libc::SIGKILL) }, 0);
    events.wait_for("/tasks/exit", &killed, Instant::now() + CTR_LIMIT).unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", c.log()));
    assert_nothing_left("after containerd's cleanup of the VF pod's killed shim");
    assert_vfs_back_in_pod_netns(&vfs, "after the killed shim's cleanup");
    let _ = c.ctr_within(&["task", "delete", &killed], CTR_LIMIT).unwrap();
    let _ = c.ctr_within(&["container", "delete", &killed], CTR_LIMIT).unwrap();
    c.stop().unwrap();
    // The VFs go back to the host netns for the next test, their MACs unpinned on the
    // PF (restored by value, they are pinned: see the README).
    for v in &POD_VFS {
        sh(&format!("ip -n {VF_POD_NETNS} link set {} netns 1", v.name));
        IgbVf::find(v.index).and_then(|vf| vf.unpin_mac()).unwrap();
    }
    sh(&format!("ip netns del {VF_POD_NETNS}"));
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_shim_a_pod_gets_its_two_vfs_in_its_vm_and_back_containerd_2_1() {
    sriov_pod(Version::V2_1);
}
