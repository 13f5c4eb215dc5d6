//! What runs inside L2 (chrooted into the overlay of the host's root): the lab's setup
//! and its smoke checks. Every check fails with a message naming what it expected.

use anyhow::{bail, ensure, Context, Result};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::console::{die_with_parent, kill_and_reap, Lines, Next};
use crate::host::run;
use crate::images::L3_MARKER;
use crate::pci::{bound_to, PciDevice};

/// Modules L2 needs beyond its early boot: KVM on the emulated SVM, the SR-IOV PF and
/// VF drivers (igbvf before the VFs exist, so they bind at creation), VFIO, the peer NIC.
const SETUP_MODULES: &[&str] = &["kvm_amd", "igb", "igbvf", "vfio_pci", "vfio_iommu_type1", "e1000e"];

/// The lab's standing peer host: the e1000e on the PF's QEMU hub, in its own netns.
pub const PEER_NETNS: &str = "labpeer";
pub const PEER_ADDR: &str = "198.18.0.2";
/// Addresses the smoke checks give a VF in L2 and in L3.
const L2_VF_ADDR: &str = "198.18.0.1/24";
const L3_VF_ADDR: &str = "198.18.0.3/24";
const L3_VF_MAC: &str = "02:00:00:00:00:03";

fn modprobe(module: &str) -> Result<()> {
    run(Command::new("modprobe").arg(module)).map(|_| ()).with_context(|| format!("loading kernel module {module}"))
}

/// The igb physical function: the only PCI device the `igb` driver binds in the lab.
pub fn igb_pf() -> Result<PciDevice> {
    let mut pfs = bound_to("igb");
    match pfs.len() {
        1 => Ok(pfs.remove(0)),
        0 => bail!("no PCI device is bound to igb: the lab's SR-IOV NIC is missing"),
        n => bail!("expected one igb PF, found {n}: {:?}", pfs.iter().map(|p| &p.addr).collect::<Vec<_>>()),
    }
}

fn single_netdev(dev: &PciDevice) -> Result<String> {
    let mut names = dev.netdevs();
    ensure!(names.len() == 1, "{} should have exactly one netdev, has {names:?}", dev.addr);
    Ok(names.remove(0))
}

/// Where the kernel put BAR `n`: the start address from the `resource` table.
fn bar_start(dev: &PciDevice, n: usize) -> Result<u64> {
    let table = dev.attr("resource")?;
    let line = table.lines().nth(n).with_context(|| format!("{} has no BAR {n} in its resource table", dev.addr))?;
    let start = line.split_whitespace().next().unwrap_or_default();
    u64::from_str_radix(start.trim_start_matches("0x"), 16).with_context(|| format!("{}: BAR {n} start {start:?} is not hex", dev.addr))
}

/// The e1000e becomes the peer host: own netns, 198.18.0.2/24, up.
fn setup_peer() -> Result<()> {
    let mut peers = bound_to("e1000e");
    ensure!(peers.len() == 1, "expected one e1000e peer NIC, found {}", peers.len());
    let peer_if = single_netdev(&peers.remove(0))?;
    run(Command::new("ip").args(["netns", "add", PEER_NETNS]))?;
    run(Command::new("ip").args(["link", "set", "dev", &peer_if, "netns", PEER_NETNS]))?;
    run(Command::new("ip").args(["-n", PEER_NETNS, "addr", "add", &format!("{PEER_ADDR}/24"), "dev", &peer_if]))?;
    run(Command::new("ip").args(["-n", PEER_NETNS, "link", "set", "dev", &peer_if, "up"]))?;
    println!("lab: peer host {peer_if} (e1000e) in netns {PEER_NETNS} at {PEER_ADDR}/24");
    Ok(())
}

/// cgroup v2 at /sys/fs/cgroup, as on any systemd host: runc (and the shim's
/// containers) need it, and L2's init mounts only proc, sys and dev.
fn mount_cgroup2() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo")?
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/sys/fs/cgroup") && l.contains(" - cgroup2 "));
    if !mounted {
        run(Command::new("mount").args(["-t", "cgroup2", "-o", "nsdelegate", "cgroup2", "/sys/fs/cgroup"]))
            .context("mounting cgroup v2 at /sys/fs/cgroup")?;
    }
    Ok(())
}

/// `vfvm-lab inside setup`: loads the modules, mounts cgroup v2, sets up the peer
/// host, brings the PF up and creates the VFs.
pub fn setup(vfs: u32) -> Result<()> {
    for m in SETUP_MODULES {
        modprobe(m)?;
    }
    mount_cgroup2()?;
    // L2's init leaves loopback down; containerd's CRI serves its streaming API on
    // 127.0.0.1 and (2.x) exits when it cannot bind there.
    run(Command::new("ip").args(["link", "set", "dev", "lo", "up"])).context("bringing loopback up")?;
    ensure!(Path::new("/dev/kvm").exists(), "kvm_amd loaded but /dev/kvm is missing");
    setup_peer()?;
    let pf = igb_pf()?;
    let pf_if = single_netdev(&pf)?;
    // Up before the VFs exist: igb tells VFs "reset done" (CTRL_EXT.PFRSTD) on open.
    run(Command::new("ip").args(["link", "set", "dev", &pf_if, "up"]))?;
    let total: u32 = pf.attr("sriov_totalvfs")?.parse().context("sriov_totalvfs is not a number")?;
    ensure!(vfs <= total, "asked for {vfs} VFs, but {} offers {total}", pf.addr);
    crate::pci::write_sysfs(&pf.path().join("sriov_numvfs"), &vfs.to_string())?;
    println!("lab: PF {} ({}) netdev {pf_if}, sriov_totalvfs={total}, sriov_numvfs={vfs}", pf.addr, pf.vendor_device()?);
    for n in 0..vfs {
        let vf = pf.virtfn(n)?;
        let bar0 = bar_start(&vf, 0)?;
        // See l2::MAX_MEM_MIB: a VF BAR above 4 GiB is a dead VF on QEMU 10.0.
        ensure!(
            bar0 != 0 && bar0 < 1 << 32,
            "VF {} BAR0 at {bar0:#x}: QEMU 10.0 does not map VF BARs above 4 GiB (does L2 have RAM above 4 GiB?)",
            vf.addr
        );
        println!(
            "lab: VF{n} {} ({}) BAR0={bar0:#x} driver={} netdev={} iommu_group={}",
            vf.addr,
            vf.vendor_device()?,
            vf.driver().unwrap_or_else(|| "none".into()),
            vf.netdevs().join(",").chars().take(32).collect::<String>(),
            vf.iommu_group()?,
        );
    }
    Ok(())
}

fn lab_env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("${name} is not set: this check runs inside the lab (`cargo xtask lab run -- ...`)"))
}

/// `/dev/kvm` answers `KVM_GET_API_VERSION` with the stable API version, 12.
fn check_kvm() -> Result<()> {
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").context("opening /dev/kvm")?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a value.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    ensure!(version == 12, "KVM_GET_API_VERSION returned {version}, expected 12");
    println!("check: /dev/kvm present, KVM API version {version}");
    Ok(())
}

/// Opens `/dev/vfio/<group>` and asks VFIO whether the group is viable (every device in
/// it bound to vfio-pci or to no driver).
fn check_vfio_group(group: &str) -> Result<()> {
    #[repr(C)]
    struct VfioGroupStatus {
        argsz: u32,
        flags: u32,
    }
    const VFIO_GROUP_GET_STATUS: libc::c_ulong = 0x3B67; // _IO(';', 100 + 3)
    const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
    let path = PathBuf::from("/dev/vfio").join(group);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
    let argsz = u32::try_from(std::mem::size_of::<VfioGroupStatus>()).expect("two u32 fields: 8 bytes");
    let mut status = VfioGroupStatus { argsz, flags: 0 };
    // SAFETY: the kernel writes at most `argsz` bytes into `status`, which we own.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), VFIO_GROUP_GET_STATUS, &mut status as *mut VfioGroupStatus) };
    ensure!(rc == 0, "VFIO_GROUP_GET_STATUS on {}: {}", path.display(), std::io::Error::last_os_error());
    ensure!(status.flags & VFIO_GROUP_FLAGS_VIABLE != 0, "{} is not viable (flags {:#x})", path.display(), status.flags);
    println!("check: {} opened, VFIO reports the group viable", path.display());
    Ok(())
}

/// A VF bound to igbvf goes to vfio-pci through `driver_override`, shows up as a VFIO
/// group, and comes back to igbvf with a netdev again.
fn check_vf_round_trip(vf: &PciDevice) -> Result<()> {
    ensure!(vf.driver().as_deref() == Some("igbvf"), "VF {} should start bound to igbvf, is bound to {:?}", vf.addr, vf.driver());
    let netdev = single_netdev(vf)?;
    println!("check: VF {} bound to igbvf with netdev {netdev}", vf.addr);

    vf.unbind()?;
    ensure!(vf.driver().is_none(), "VF {} still bound to {:?} after unbind", vf.addr, vf.driver());
    ensure!(vf.netdevs().is_empty(), "VF {} kept netdevs {:?} after unbind", vf.addr, vf.netdevs());
    vf.bind_by_override(Some("vfio-pci"))?;
    ensure!(vf.driver().as_deref() == Some("vfio-pci"), "VF {} should be bound to vfio-pci, is bound to {:?}", vf.addr, vf.driver());
    let group = vf.iommu_group()?;
    ensure!(Path::new("/dev/vfio").join(&group).exists(), "/dev/vfio/{group} missing after binding {} to vfio-pci", vf.addr);
    println!("check: VF {} unbound, bound to vfio-pci via driver_override, IOMMU group {group}", vf.addr);
    check_vfio_group(&group)?;

    vf.bind_by_override(None)?;
    ensure!(vf.driver().as_deref() == Some("igbvf"), "VF {} should be back on igbvf, is bound to {:?}", vf.addr, vf.driver());
    ensure!(vf.attr("driver_override")? == "(null)", "driver_override of {} not cleared", vf.addr);
    // Probing is synchronous: the netdev exists once drivers_probe returns.
    let netdev = single_netdev(vf)?;
    println!("check: VF {} back on igbvf, netdev {netdev} reappeared", vf.addr);
    Ok(())
}

/// What an L3 guest reported on its console.
pub struct L3Report {
    /// From QEMU's start to the guest's init running.
    pub userspace_after: Duration,
    /// The guest init's marker lines after "userspace", marker prefix removed.
    pub reports: Vec<String>,
}

/// Boots the lab kernel with the L3 test initramfs under L2's KVM, QEMU as the VMM,
/// with `extra_args` for QEMU and `extra_cmdline` for the guest, until it powers off.
pub fn boot_l3(kernel: &Path, initrd: &Path, extra_args: &[String], extra_cmdline: &str, timeout: Duration) -> Result<L3Report> {
    let mut qemu = Command::new(crate::host::QEMU);
    qemu.args(["-enable-kvm", "-M", "q35", "-cpu", "host", "-smp", "1", "-m", "256"])
        .args(["-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {extra_cmdline}"))
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut qemu);
    let started = Instant::now();
    let mut child = qemu.spawn().context("starting the L3 QEMU")?;
    let lines = Lines::spawn(child.stdout.take().context("L3 QEMU stdout")?);
    let deadline = started + timeout;
    let mut console = Vec::new();
    let mut userspace_after = None;
    let mut reports = Vec::new();
    loop {
        match lines.next_before(deadline) {
            Next::Line(l) => {
                match l.split_once(L3_MARKER).map(|(_, rest)| rest.trim()) {
                    Some(rest) if rest.starts_with("userspace") => userspace_after = Some(started.elapsed()),
                    Some(rest) => reports.push(rest.to_string()),
                    None => {}
                }
                console.push(l);
            }
            Next::Closed => break,
            Next::TimedOut => {
                kill_and_reap(&mut child);
                bail!("the L3 guest did not power off within {}s; console:\n{}", timeout.as_secs(), console.join("\n"));
            }
        }
    }
    let status = child.wait()?;
    let Some(userspace_after) = userspace_after else {
        bail!("the L3 guest stopped ({status}) before reaching userspace; console:\n{}", console.join("\n"));
    };
    ensure!(status.success(), "L3 QEMU exited with {status}; console:\n{}", console.join("\n"));
    Ok(L3Report { userspace_after, reports })
}

/// `vfvm-lab inside boot-l3 --kernel K --initrd I [--timeout SECS]`: boots an arbitrary
/// kernel and initramfs as an L3 guest under L2's KVM (1 vCPU, 256 MiB, no devices) and
/// prints `l3: userspace after <secs>s`, then `l3: <line>` for each line its init
/// printed after the L3 marker.
pub fn boot_image(mut args: impl Iterator<Item = String>) -> Result<i32> {
    const USAGE: &str = "usage: vfvm-lab inside boot-l3 --kernel PATH --initrd PATH [--timeout SECS]";
    let (mut kernel, mut initrd, mut timeout) = (None, None, Duration::from_secs(300));
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value; {USAGE}"));
        match arg.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => initrd = Some(PathBuf::from(value()?)),
            "--timeout" => timeout = Duration::from_secs(value()?.parse().context("--timeout: expected seconds")?),
            other => bail!("unknown option {other:?}; {USAGE}"),
        }
    }
    let (Some(kernel), Some(initrd)) = (kernel, initrd) else { bail!("{USAGE}") };
    let report = boot_l3(&kernel, &initrd, &[], "", timeout)?;
    println!("l3: userspace after {:.2}s", report.userspace_after.as_secs_f64());
    for line in &report.reports {
        println!("l3: {line}");
    }
    Ok(0)
}

/// Pings `target` (from network namespace `netns`, or this one) once the path works:
/// single pings until the first reply (the link and ARP settle; bounded by `warmup`),
/// then three that must all be answered, each within `reply_wait_secs`. Returns
/// ping's report of the three.
pub fn ping_until_answered(netns: Option<&str>, target: &str, warmup: Duration, reply_wait_secs: u32) -> Result<String> {
    let ping = |count: &str, wait: &str| {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "busybox"]);
                c
            }
            None => Command::new("busybox"),
        };
        cmd.args(["ping", "-c", count, "-W", wait, target]).output().context("running busybox ping")
    };
    let from = netns.map_or(String::new(), |ns| format!(" (from netns {ns})"));
    let deadline = Instant::now() + warmup;
    while !ping("1", "2")?.status.success() {
        ensure!(Instant::now() < deadline, "no reply from {target}{from} within {}s", warmup.as_secs());
    }
    let out = ping("3", &reply_wait_secs.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success() && text.contains("3 packets received"), "{target}{from} answered once, then lost packets: {text}");
    Ok(text)
}

/// Packets over a VF driven by igbvf in L2, to the peer host and back.
fn check_vf_ping_from_l2(vf: &PciDevice) -> Result<()> {
    let netdev = single_netdev(vf)?;
    run(Command::new("ip").args(["addr", "add", L2_VF_ADDR, "dev", &netdev]))?;
    run(Command::new("ip").args(["link", "set", "dev", &netdev, "up"]))?;
    let result = ping_until_answered(None, PEER_ADDR, Duration::from_secs(30), 5).map(|report| print!("{report}"));
    run(Command::new("ip").args(["addr", "flush", "dev", &netdev]))?;
    run(Command::new("ip").args(["link", "set", "dev", &netdev, "down"]))?;
    result.with_context(|| format!("ping over VF {} ({netdev}) to the peer host", vf.addr))?;
    println!("check: ping over VF {} ({netdev}, igbvf in L2) to the peer host {PEER_ADDR} answered", vf.addr);
    Ok(())
}

/// A VF passed through to an L3 guest with VFIO, its admin MAC set through the PF:
/// the guest's igbvf sees that MAC and pings the peer host.
fn check_vf_ping_from_l3(pf: &PciDevice, vf_index: u32, kernel: &Path, initrd: &Path) -> Result<()> {
    let vf = pf.virtfn(vf_index)?;
    let pf_if = single_netdev(pf)?;
    run(Command::new("ip").args(["link", "set", "dev", &pf_if, "vf", &vf_index.to_string(), "mac", L3_VF_MAC]))?;
    vf.bind_by_override(Some("vfio-pci"))?;
    ensure!(vf.driver().as_deref() == Some("vfio-pci"), "VF {} did not bind to vfio-pci", vf.addr);
    let booted = boot_l3(
        kernel,
        initrd,
        &["-device".to_string(), format!("vfio-pci,host={}", vf.addr)],
        &format!("vfvm.ping={L3_VF_ADDR},{PEER_ADDR}"),
        Duration::from_secs(300),
    );
    vf.bind_by_override(None)?;
    let report = booted?;
    let ping = report.reports.iter().find(|r| r.starts_with("ping")).context("the L3 guest reported no ping result")?;
    ensure!(ping.starts_with("ping ok") && ping.ends_with(L3_VF_MAC), "L3 guest with VF {} passed through: {ping}", vf.addr);
    println!(
        "check: VF {} passed through to L3 (vfio-pci): guest igbvf got admin MAC {L3_VF_MAC} and pinged {PEER_ADDR} ({ping})",
        vf.addr
    );
    Ok(())
}

/// `vfvm-lab inside smoke`: the lab's acceptance checks, from inside L2.
pub fn smoke() -> Result<()> {
    check_kvm()?;
    let pf = igb_pf()?;
    let total: u32 = pf.attr("sriov_totalvfs")?.parse().context("sriov_totalvfs")?;
    let num: u32 = pf.attr("sriov_numvfs")?.parse().context("sriov_numvfs")?;
    ensure!(total >= 4, "igb PF {} reports sriov_totalvfs={total}, expected at least 4", pf.addr);
    let wanted: u32 = lab_env("VFVM_LAB_VFS")?.parse().context("VFVM_LAB_VFS")?;
    ensure!(num == wanted, "igb PF {} has {num} VFs, the lab asked for {wanted}", pf.addr);
    println!("check: igb PF {} sriov_totalvfs={total} sriov_numvfs={num}", pf.addr);
    let vf0 = pf.virtfn(0)?;
    check_vf_round_trip(&vf0)?;
    check_vf_ping_from_l2(&vf0)?;

    let kernel = PathBuf::from(lab_env("VFVM_LAB_KERNEL")?);
    let initrd = PathBuf::from(lab_env("VFVM_LAB_L3_INITRD")?);
    let plain = boot_l3(&kernel, &initrd, &[], "", Duration::from_secs(300))?;
    println!("check: L3 guest under L2's KVM reached userspace {:.2}s after QEMU start", plain.userspace_after.as_secs_f64());
    check_vf_ping_from_l3(&pf, 1, &kernel, &initrd)?;
    println!("smoke: PASSED");
    Ok(())
}

/// libtest's counts from `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestCounts {
    /// The counts of one summary line; None if it is not one.
    pub fn parse(line: &str) -> Option<TestCounts> {
        let rest = line.strip_prefix("test result: ")?;
        let mut counts = TestCounts::default();
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else { continue };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => counts.passed += n,
                "failed" => counts.failed += n,
                "ignored" => counts.ignored += n,
                _ => {}
            }
        }
        Some(counts)
    }

    pub fn add(&mut self, other: TestCounts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

struct TestBinaryRun {
    status: std::process::ExitStatus,
    /// libtest's `test result:` lines, held back until the run is judged.
    summaries: Vec<String>,
    /// Failed tests whose captured output shows a guest's triple fault, or a guest
    /// that stalled while KVM had all its vCPUs.
    guest_faulted: Vec<String>,
}

/// Runs a test binary with `args`, passing its output on as it comes, except its
/// summary lines; notes which failed tests saw a guest triple-fault or stall in KVM (from libtest's
/// `---- NAME stdout ----` sections, which hold a failed test's captured output).
fn run_test_binary(exe: &str, args: &[&str]) -> Result<TestBinaryRun> {
    let mut child = Command::new(exe)
        .args(args)
        .args(["--test-threads=1", "--color", "never"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {exe}"))?;
    let stdout = child.stdout.take().context("the test binary's stdout")?;
    let (mut summaries, mut guest_faulted) = (Vec::new(), Vec::<String>::new());
    let mut section: Option<String> = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
        if let Some(name) = line.strip_prefix("---- ").and_then(|l| l.strip_suffix(" stdout ----")) {
            section = Some(name.to_string());
        } else if line == "failures:" {
            section = None;
        } else if let Some(name) = section.as_ref().filter(|_| line.contains(GUEST_TRIPLE_FAULT) || line.contains(VCPUS_ALL_IN_KVM)) {
            if !guest_faulted.contains(name) {
                guest_faulted.push(name.clone());
            }
        }
        match line.starts_with("test result: ") {
            true => summaries.push(line),
            false => println!("{line}"),
        }
    }
    let status = child.wait().with_context(|| format!("waiting for {exe}"))?;
    Ok(TestBinaryRun { status, summaries, guest_faulted })
}

/// In the run's out directory: the test binaries that ran to their end, one per line,
/// so a run cut short by an L2 crash can go on with the others.
const FINISHED_TEST_BINARIES: &str = "finished-test-binaries";

fn note_finished_test_binary(exe: &str) {
    let Ok(out) = std::env::var("VFVM_LAB_OUT") else { return };
    let path = Path::new(&out).join(FINISHED_TEST_BINARIES);
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{exe}\n").as_bytes()).and_then(|_| f.sync_all()));
    if let Err(e) = written {
        eprintln!("lab: noting {exe} as finished in {}: {e}", path.display());
    }
}

/// The test binaries a `run-tests` run finished, from its out directory (host side).
pub fn finished_test_binaries(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join(FINISHED_TEST_BINARIES)).map(|t| t.lines().map(str::to_string).collect()).unwrap_or_default()
}

/// What vfvm-vmm logs when its guest triple-faults (vmm/src/vcpu.rs); a failing
/// test's output carries it through the shim's log.
const GUEST_TRIPLE_FAULT: &str = "the guest triple-faulted";

/// What the shim (its agent time-out) and the vfvm-vmm lab tests (a guest's RCU
/// stall report, a boot past its bound) say when every vCPU thread of the VMM was in
/// KVM_RUN or running while the guest got nowhere: not the VMM holding its vCPUs;
/// in this lab, the same emulated SVM as the triple faults (see
/// `vfvm_protocols::vcpu_threads`).
const VCPUS_ALL_IN_KVM: &str = vfvm_protocols::vcpu_threads::VCPUS_ALL_IN_KVM;

/// How a re-run after a guest's triple fault or stall is announced (counted by `cargo xtask test`).
pub const TRIPLE_FAULT_RERUN: &str = "lab: a guest VM triple-faulted or stalled inside KVM and the test failed; running it again: ";

/// At most this many more runs of one test that failed while a guest triple-faulted.
const TRIPLE_FAULT_RERUNS: usize = 3;

/// `vfvm-lab inside run-tests EXE...`: each test executable's in-lab tests, one at a
/// time (they share the lab's VFs); the exit status says whether all passed.
///
/// A test that failed while an L3 guest triple-faulted, or stalled while every vCPU
/// thread was in KVM, runs again, alone, up to
/// `TRIPLE_FAULT_RERUNS` times: in this lab a triple fault is TCG's emulated SVM
/// failing (the same fault crashes L2's own kernel, see the README), seen mostly with
/// two VMs booting at once; a guest whose vCPU stops answering while its thread is in
/// KVM_RUN is the same emulation failing more quietly. Every re-run is announced; the binary's summary then
/// counts the test by its last run. Other failures are never re-run.
pub fn run_tests(executables: &[String], mark: &str) -> Result<i32> {
    ensure!(!executables.is_empty(), "usage: vfvm-lab inside run-tests EXECUTABLE...");
    let mut failed = Vec::new();
    for exe in executables {
        println!("lab: running the {mark}* tests of {exe}");
        let run = run_test_binary(exe, &["--ignored", mark])?;
        let mut ok = run.status.success();
        if ok || run.guest_faulted.is_empty() {
            run.summaries.iter().for_each(|l| println!("{l}"));
        } else {
            let mut counts = TestCounts::default();
            for line in &run.summaries {
                println!("lab: counted below, after the re-runs: {line}");
                counts.add(TestCounts::parse(line).unwrap_or_default());
            }
            for name in &run.guest_faulted {
                if rerun_after_triple_faults(exe, name)? {
                    counts.failed = counts.failed.saturating_sub(1);
                    counts.passed += 1;
                }
            }
            ok = counts.failed == 0;
            println!(
                "test result: {}. {} passed; {} failed; {} ignored; 0 measured; 0 filtered out (counting re-runs after guest triple faults)",
                if ok { "ok" } else { "FAILED" },
                counts.passed,
                counts.failed,
                counts.ignored
            );
        }
        if !ok {
            failed.push(format!("{exe} ({})", run.status));
        }
        note_finished_test_binary(exe);
    }
    if !failed.is_empty() {
        println!("lab: in-lab tests failed in: {}", failed.join(", "));
        return Ok(1);
    }
    Ok(0)
}

/// Runs one test alone until it passes, fails for another reason than a guest's
/// triple fault, or has had `TRIPLE_FAULT_RERUNS` more runs; whether it passed.
fn rerun_after_triple_faults(exe: &str, name: &str) -> Result<bool> {
    for attempt in 1..=TRIPLE_FAULT_RERUNS {
        println!("{TRIPLE_FAULT_RERUN}{name} in {exe} ({attempt} of at most {TRIPLE_FAULT_RERUNS})");
        let again = run_test_binary(exe, &["--ignored", "--exact", name])?;
        again.summaries.iter().for_each(|l| println!("lab: counted in the binary's summary below: {l}"));
        if again.status.success() {
            return Ok(true);
        }
        if again.guest_faulted.is_empty() {
            return Ok(false);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// run-tests on a libtest stand-in (a shell script): a test that failed while a
    /// guest triple-faulted runs again alone until it passes, within the limit; a
    /// plain failure beside it still fails the binary.
    #[test]
    fn a_triple_faulted_test_runs_again_and_plain_failures_stand() {
        let fake = concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata/fake-libtest.sh").to_string();
        for (plain_failure, want) in [("0", 0), ("1", 1)] {
            let counter = std::env::temp_dir().join(format!("vfvm-fake-libtest-{}-{plain_failure}", std::process::id()));
            let _ = std::fs::remove_file(&counter);
            std::env::set_var("FAKE_COUNTER", &counter);
            std::env::set_var("FAKE_PLAIN_FAILURE", plain_failure);
            assert_eq!(run_tests(std::slice::from_ref(&fake), "lab_").unwrap(), want, "FAKE_PLAIN_FAILURE={plain_failure}");
            let runs = std::fs::read_to_string(&counter).unwrap();
            assert_eq!(runs.trim(), "2", "lab_b should have run alone twice");
            let _ = std::fs::remove_file(&counter);
        }
    }

    #[test]
    fn summaries_parse() {
        let c = TestCounts::parse("test result: FAILED. 1 passed; 2 failed; 3 ignored; 0 measured; 0 filtered out; finished in 9.00s");
        assert_eq!(c, Some(TestCounts { passed: 1, failed: 2, ignored: 3 }));
        assert_eq!(TestCounts::parse("lab: counted below: test result: ok. 1 passed"), None);
    }
}
