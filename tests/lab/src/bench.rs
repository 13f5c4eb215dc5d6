//! `cargo xtask bench`: vfvm-vmm against QEMU booting the same guest in the same lab
//! run. Inside L2 (`vfvm-lab inside bench-boot`), each round starts both VMMs with the
//! same ELF kernel, initramfs, command line, vCPUs and memory (alternating which goes
//! first), times process start to the guest's userspace marker on the serial console,
//! and there reads KVM's own counters for the VM (`/sys/kernel/debug/kvm/<pid>-<fd>/`:
//! every exit, port I/O, MMIO, stage-2 page faults, halts...); the guest holds there
//! (`vfvm.hold` on its command line) so the counters stay readable. For vfvm-vmm it
//! also asks the control API where the exits it handled went (by reason and device
//! range). Then it stops the VMM and takes its peak RSS from wait4's rusage. One
//! uncounted warm-up boot of each comes first (page cache). Prints every round, the
//! medians and the ratios. A benchmark, not a test: it asserts
//! nothing but that both guests reach userspace.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vfvm_protocols::client::AgentAddress;
use vfvm_protocols::vmm_api::{ExitStats, Request, Response, VmmClient};

use crate::console::{die_with_parent, Lines, Next};
use crate::images::L3_MARKER;

/// The command line every VMM boots the guest with (the issue's), plus `vfvm.hold`.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet vfvm.hold";
/// The guest image's: the same, less the hold (the agent serves instead), with a
/// sandbox id as the shim gives one.
pub(crate) const AGENT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet vfvm.sandbox=bench";

/// KVM's per-VM debugfs counters the bench reports, in this order.
const KVM_COUNTERS: &[(&str, &str)] = &[
    ("exits", "exits"),
    ("io_exits", "port I/O"),
    ("mmio_exits", "MMIO"),
    ("pf_fixed", "stage-2 faults"),
    ("halt_exits", "HLT"),
    ("irq_exits", "host interrupts"),
    ("irq_window_exits", "interrupt windows"),
    ("insn_emulation", "emulated instructions"),
];

struct Sample {
    to_userspace: Duration,
    /// The guest's own clock at the marker (its `/proc/uptime`): the kernel's part of
    /// `to_userspace` since the kernel's clock started (early in its setup); the rest
    /// is the VMM's setup, firmware, and the kernel's first steps.
    guest_uptime: Option<f64>,
    peak_rss_kib: i64,
    /// KVM's debugfs counters at the marker (name -> value).
    kvm: BTreeMap<String, u64>,
    /// vfvm-vmm's own account of the exits it handled.
    own: Option<ExitStats>,
}

impl Sample {
    fn counter(&self, name: &str) -> u64 {
        self.kvm.get(name).copied().unwrap_or(0)
    }

    /// Time before the guest kernel's clock started: VMM setup (loading included),
    /// firmware, the kernel's first steps.
    fn before_kernel(&self) -> Option<f64> {
        self.guest_uptime.map(|up| (self.to_userspace.as_secs_f64() - up).max(0.0))
    }

    fn summary(&self) -> String {
        let split = match (self.guest_uptime, self.before_kernel()) {
            (Some(up), Some(before)) => format!(" ({before:.2} s before the guest's clock, {up:.2} s after)"),
            _ => String::new(),
        };
        format!(
            "{:.2} s{split}, {} MiB, {} exits ({} port I/O, {} MMIO, {} stage-2 faults)",
            self.to_userspace.as_secs_f64(),
            self.peak_rss_kib / 1024,
            self.counter("exits"),
            self.counter("io_exits"),
            self.counter("mmio_exits"),
            self.counter("pf_fixed")
        )
    }
}

/// KVM's debugfs, mounted if it is not yet (L2 boots without it).
fn kvm_debugfs() -> Result<PathBuf> {
    let dir = Path::new("/sys/kernel/debug/kvm");
    if !dir.is_dir() {
        let status = Command::new("mount").args(["-t", "debugfs", "debugfs", "/sys/kernel/debug"]).status().context("running mount")?;
        if !status.success() || !dir.is_dir() {
            bail!("KVM's debugfs ({}) is not there and mounting debugfs failed ({status})", dir.display());
        }
    }
    Ok(dir.to_path_buf())
}

/// The counters of the VM that process `pid` created (its directory is `<pid>-<fd>`).
fn read_kvm_counters(debugfs: &Path, pid: u32) -> Result<BTreeMap<String, u64>> {
    let prefix = format!("{pid}-");
    let vm = std::fs::read_dir(debugfs)
        .with_context(|| format!("listing {}", debugfs.display()))?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .with_context(|| format!("no VM of process {pid} in {}", debugfs.display()))?
        .path();
    let mut counters = BTreeMap::new();
    for (name, _) in KVM_COUNTERS {
        let path = vm.join(name);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        counters.insert((*name).to_string(), text.trim().parse().with_context(|| format!("{}: {text:?}", path.display()))?);
    }
    Ok(counters)
}

fn boot_once(cmd: &mut Command, api_socket: Option<&Path>, debugfs: &Path, timeout: Duration) -> Result<Sample> {
    use std::os::unix::process::ExitStatusExt;
    let vmm_name = if api_socket.is_some() { "vfvm-vmm" } else { "QEMU" };
    // QEMU's stderr reaches the run's log: how it failed, when it does.
    let stderr = if api_socket.is_some() { Stdio::null() } else { Stdio::inherit() };
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
    die_with_parent(cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let lines = Lines::spawn(child.stdout.take().context("VMM stdout")?);
    let deadline = started + timeout;
    let marker = format!("{L3_MARKER} userspace");
    let (mut guest_uptime, mut timed_out) = (None, false);
    let reached = loop {
        match lines.next_before(deadline) {
            Next::Line(l) if l.contains(&marker) => {
                guest_uptime = marker_uptime(&l, &marker);
                break Some(started.elapsed());
            }
            Next::Line(_) => {}
            Next::Closed => break None,
            Next::TimedOut => {
                timed_out = true;
                break None;
            }
        }
    };
    // Read while the guest holds at the marker, before the VM goes.
    let measured = reached.map(|to_userspace| {
        let kvm = read_kvm_counters(debugfs, child.id());
        let own = api_socket.map(vfvm_exit_stats).transpose();
        (to_userspace, kvm, own)
    });
    let _ = child.kill();
    let mut status = 0;
    // SAFETY: rusage is plain data the kernel fills; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pid is our unreaped child; status and usage are ours to write.
    let rc = unsafe { libc::wait4(vfvm_test_containerd::pid_t_of(child.id()), &mut status, 0, &mut usage) };
    if rc < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    match measured {
        Some((to_userspace, kvm, own)) => Ok(Sample { to_userspace, guest_uptime, peak_rss_kib: usage.ru_maxrss, kvm: kvm?, own: own? }),
        // Exited by itself before the marker (it was killed only after the output closed).
        None if libc::WIFEXITED(status) && triple_faulted(vmm_name, std::process::ExitStatus::from_raw(status)) => {
            Err(GuestTripleFault(format!("{vmm_name}'s guest triple-faulted (exit status {}) before userspace", libc::WEXITSTATUS(status)))
                .into())
        }
        // QEMU, the baseline, ending by itself before its guest's userspace (seen once
        // in CI, exit status unknown then; its stderr now reaches the log): a fault of
        // the lab's emulated SVM under QEMU, not a figure of either VMM; boot again.
        None if !timed_out && vmm_name == "QEMU" => {
            Err(GuestTripleFault(format!("QEMU ended ({}) before its guest reached userspace", std::process::ExitStatus::from_raw(status)))
                .into())
        }
        None if !timed_out => bail!("{cmd:?} ended ({}) before its guest reached userspace", std::process::ExitStatus::from_raw(status)),
        None => bail!("{cmd:?} did not reach userspace within {}s", timeout.as_secs()),
    }
}

/// The guest's uptime the marker line carries (`<marker> 3.21`).
fn marker_uptime(line: &str, marker: &str) -> Option<f64> {
    let (_, rest) = line.split_once(marker)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// vfvm-vmm's exit accounting, from its control API.
fn vfvm_exit_stats(socket: &Path) -> Result<ExitStats> {
    let mut client = VmmClient::connect(socket, Duration::from_secs(10)).with_context(|| format!("connecting to {}", socket.display()))?;
    match client.call(Request::Status).context("status from vfvm-vmm")? {
        Response::Status { exits, .. } => Ok(exits),
        other => bail!("status from vfvm-vmm: unexpected answer {other:?}"),
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Integers as f64 for medians and ratios (counts far below 2^53).
fn as_f64(n: u64) -> f64 {
    n as f64
}

/// vfvm-vmm booting the guest image (`image`, the agent as PID 1) with hybrid vsock
/// until the agent answers Health: the image's cost is this against the bare
/// initramfs's time to userspace.
fn boot_agent(vmm: &Path, kernel: &Path, image: &Path, vcpus: u32, memory: u32, vf: Option<&str>, timeout: Duration) -> Result<Duration> {
    let dir = std::env::temp_dir().join(format!("vfvm-bench-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let vsock = dir.join("vsock.sock");
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel").arg(kernel).arg("--initrd").arg(image).args(["--cmdline", AGENT_CMDLINE]);
    cmd.args(["--vcpus", &vcpus.to_string(), "--memory", &memory.to_string()]);
    cmd.arg("--serial-log").arg(dir.join("console.log")).arg("--vsock-socket").arg(&vsock).args(["--vsock-cid", "3"]);
    if let Some(vf) = vf {
        cmd.args(["--vfio", &format!("{vf},id=vf0")]);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {}", vmm.display()))?;
    let outcome = crate::demo::wait_for_agent(&mut child, &vsock, started, timeout);
    crate::console::kill_and_reap(&mut child);
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    agent_answered("vfvm-vmm", outcome?, &console, timeout)
}

/// QEMU q35 booting the guest image with the VF `vf` cold-plugged (`-device
/// vfio-pci`) and vhost-vsock, until the agent answers Health over AF_VSOCK: what
/// Kata does with QEMU, against [`boot_agent`] with the same VF.
fn boot_agent_qemu(kernel: &Path, image: &Path, vcpus: u32, memory: u32, vf: &str, timeout: Duration) -> Result<Duration> {
    const CID: u32 = 7;
    let dir = std::env::temp_dir().join(format!("vfvm-bench-qemu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let console = dir.join("console.log");
    let mut cmd = Command::new(crate::host::QEMU);
    cmd.args(["-enable-kvm", "-M", "q35", "-cpu", "host", "-smp", &vcpus.to_string(), "-m", &memory.to_string()]);
    cmd.args(["-display", "none", "-nodefaults", "-no-reboot"]).arg("-serial").arg(format!("file:{}", console.display()));
    cmd.arg("-kernel").arg(kernel).arg("-initrd").arg(image).args(["-append", AGENT_CMDLINE]);
    cmd.args(["-device", &format!("vhost-vsock-pci,guest-cid={CID}"), "-device", &format!("vfio-pci,host={vf}")]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting QEMU")?;
    let addr = AgentAddress::Vsock { cid: CID, port: crate::demo::AGENT_PORT };
    let outcome = crate::demo::wait_for_agent_at(&mut child, &addr, started, timeout);
    crate::console::kill_and_reap(&mut child);
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    agent_answered("QEMU", outcome?, &console, timeout)
}

/// A boot the lab's emulated SVM broke: the guest triple-faulted (vfvm-vmm exits
/// with 5; QEMU, under `-no-reboot`, exits with 0) before it got where the bench
/// measures. A fault of TCG's SVM (see the README's "Tests"), not a figure of either
/// VMM: [`retried`] boots again, and says so.
#[derive(Debug)]
pub(crate) struct GuestTripleFault(pub String);

impl std::fmt::Display for GuestTripleFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GuestTripleFault {}

/// Whether `status` is a VMM's exit after its guest triple-faulted.
fn triple_faulted(vmm: &str, status: std::process::ExitStatus) -> bool {
    match vmm {
        "QEMU" => status.success(),
        _ => status.code() == Some(5),
    }
}

/// At most this many more boots after a guest triple fault, for one figure.
const TRIPLE_FAULT_RETRIES: u32 = 2;

/// `boot`, again (announced) when its guest triple-faulted, up to [`TRIPLE_FAULT_RETRIES`] times.
pub(crate) fn retried<T>(what: &str, mut boot: impl FnMut() -> Result<T>) -> Result<T> {
    let mut retries = 0;
    loop {
        match boot() {
            Err(e) if retries < TRIPLE_FAULT_RETRIES && e.downcast_ref::<GuestTripleFault>().is_some() => {
                retries += 1;
                println!("bench: {what}: {e}; booting again (a fault of the lab's emulated SVM, see the README)");
            }
            other => return other,
        }
    }
}

fn agent_answered(vmm: &str, outcome: crate::demo::Outcome, console: &str, timeout: Duration) -> Result<Duration> {
    let tail = || console.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    match outcome {
        crate::demo::Outcome::Answered(after) => Ok(after),
        crate::demo::Outcome::Exited(status) if triple_faulted(vmm, status) => {
            Err(GuestTripleFault(format!("{vmm}'s guest triple-faulted ({status}) before the agent answered")).into())
        }
        crate::demo::Outcome::Exited(status) => {
            bail!("{vmm} with the guest image exited ({status}) before the agent answered; console:\n{}", tail())
        }
        crate::demo::Outcome::Refused(why) => bail!("the guest image's agent under {vmm} refused the connection: {why}"),
        crate::demo::Outcome::TimedOut => {
            bail!("the guest image's agent under {vmm} did not answer within {}s; console:\n{}", timeout.as_secs(), tail())
        }
    }
}

/// VF `index` of the lab's igb PF, on vfio-pci for as long as the guard lives.
fn vf_on_vfio(index: u32) -> Result<crate::pci::OnVfio> {
    let pf = crate::pci::bound_to("igb").into_iter().next().context("no igb PF: the VF benchmark runs in the lab")?;
    crate::pci::OnVfio::bind(pf.virtfn(index)?)
}

/// Medians of the VF boots: the guest image with the VF vs without (vfvm-vmm), and
/// vfvm-vmm vs QEMU with the same VF.
fn report_vf(vf: &str, without: &[Duration], ours: &[Duration], qemu: &[Duration]) {
    let m = |v: &[Duration]| median(v.iter().map(Duration::as_secs_f64).collect());
    let (without, ours, qemu) = (m(without), m(ours), m(qemu));
    println!(
        "bench: median guest image to the agent serving with VF {vf} cold-plugged: vfvm-vmm {ours:.2} s (without the VF {without:.2} s, ratio with/without {:.2}), QEMU q35 -device vfio-pci {qemu:.2} s, ratio vfvm/QEMU {:.2}",
        ours / without,
        ours / qemu
    );
}

/// `vfvm-lab inside bench-boot --vmm PATH --kernel PATH --initrd PATH [--image PATH [--vf N]] [--runs N] [--vcpus N] [--memory MIB]`
///
/// With `--vf N` (and `--image`), each round also boots the guest image with the lab
/// PF's VF N cold-plugged, by vfvm-vmm (`--vfio`) and by QEMU (`-device vfio-pci`).
pub fn bench_boot(mut args: impl Iterator<Item = String>) -> Result<i32> {
    const USAGE: &str = "usage: vfvm-lab inside bench-boot --vmm PATH --kernel PATH --initrd PATH [--image PATH [--vf N]] [--runs N] [--vcpus N] [--memory MIB]";
    let (mut vmm, mut kernel, mut initrd, mut image, mut vf_index) = (None, None, None, None, None);
    let (mut runs, mut vcpus, mut memory) = (5u32, 2u32, 256u32);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = |v: &str| v.parse::<u32>().with_context(|| format!("{flag} {v:?}: expected a number"));
        match flag.as_str() {
            "--vmm" => vmm = Some(PathBuf::from(value)),
            "--kernel" => kernel = Some(PathBuf::from(value)),
            "--initrd" => initrd = Some(PathBuf::from(value)),
            "--image" => image = Some(PathBuf::from(value)),
            "--runs" => runs = number(&value)?.max(1),
            "--vcpus" => vcpus = number(&value)?.max(1),
            "--memory" => memory = number(&value)?.max(64),
            "--vf" => vf_index = Some(number(&value)?),
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    let (Some(vmm), Some(kernel), Some(initrd)) = (vmm, kernel, initrd) else { bail!("{USAGE}") };
    if vf_index.is_some() && image.is_none() {
        bail!("--vf needs --image (the VF boots are of the guest image)\n{USAGE}");
    }
    let vf = vf_index.map(vf_on_vfio).transpose()?;
    if vf.is_some() {
        crate::host::run(Command::new("modprobe").arg("vhost_vsock")).context("loading vhost_vsock for QEMU's guest")?;
    }
    let vf_addr = vf.as_ref().map(|v| v.0.addr.clone());
    let debugfs = kvm_debugfs()?;
    let timeout = Duration::from_secs(300);
    let api_socket = std::env::temp_dir().join(format!("vfvm-bench-{}.sock", std::process::id()));
    let vfvm = || {
        let _ = std::fs::remove_file(&api_socket);
        let mut c = Command::new(&vmm);
        c.arg("--kernel").arg(&kernel).arg("--initrd").arg(&initrd).args(["--cmdline", CMDLINE]);
        c.args(["--vcpus", &vcpus.to_string(), "--memory", &memory.to_string(), "--serial-stdout"]);
        c.arg("--api-socket").arg(&api_socket);
        c
    };
    let qemu = || {
        let mut c = Command::new(crate::host::QEMU);
        c.args(["-enable-kvm", "-M", "q35", "-cpu", "host", "-smp", &vcpus.to_string(), "-m", &memory.to_string()]);
        c.args(["-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio"]);
        // An ELF vmlinux: QEMU boots it through its PVH entry.
        c.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd).args(["-append", CMDLINE]);
        c
    };
    println!("bench: {runs} rounds, {vcpus} vCPUs, {memory} MiB, kernel {}, cmdline {CMDLINE:?}", kernel.display());
    let boot_vfvm = || retried("vfvm-vmm", || boot_once(&mut vfvm(), Some(&api_socket), &debugfs, timeout));
    let boot_qemu = || retried("QEMU q35", || boot_once(&mut qemu(), None, &debugfs, timeout));
    // One boot of each first, not counted: the first reader of the kernel, the
    // initramfs and each VMM's binary fills the page cache, and neither VMM should
    // pay that in a measured round.
    let boot_image =
        || image.as_deref().map(|i| retried("the guest image", || boot_agent(&vmm, &kernel, i, vcpus, memory, None, timeout))).transpose();
    // With a VF: the guest image with it, by vfvm-vmm and by QEMU.
    let boot_vf = || -> Result<Option<(Duration, Duration)>> {
        let (Some(i), Some(vf)) = (image.as_deref(), vf_addr.as_deref()) else { return Ok(None) };
        Ok(Some((
            retried("the guest image with the VF", || boot_agent(&vmm, &kernel, i, vcpus, memory, Some(vf), timeout))?,
            retried("QEMU with the VF", || boot_agent_qemu(&kernel, i, vcpus, memory, vf, timeout))?,
        )))
    };
    let (a, b, c) = (boot_vfvm()?, boot_qemu()?, boot_image()?);
    if let Some((ours, qemu)) = boot_vf()? {
        println!("bench: warm-up with the VF (not counted): vfvm-vmm {:.2} s | QEMU {:.2} s", ours.as_secs_f64(), qemu.as_secs_f64());
    }
    let image_part =
        |c: Option<Duration>| c.map(|c| format!(" | guest image to the agent serving {:.2} s", c.as_secs_f64())).unwrap_or_default();
    println!(
        "bench: warm-up (not counted): vfvm-vmm {:.2} s | QEMU q35 {:.2} s{}",
        a.to_userspace.as_secs_f64(),
        b.to_userspace.as_secs_f64(),
        image_part(c)
    );
    let (mut ours, mut theirs, mut images, mut vf_ours, mut vf_qemu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        // Rotate the order (bare vfvm-vmm, QEMU, the guest image, the VF pair) so
        // that none always goes first or follows the same one.
        let (mut a, mut b, mut c, mut d) = (None, None, None, None);
        for which in (0..4).map(|i| (i + run as usize - 1) % 4) {
            match which {
                0 => a = Some(boot_vfvm()?),
                1 => b = Some(boot_qemu()?),
                2 => c = Some(boot_image()?),
                _ => d = Some(boot_vf()?),
            }
        }
        let (Some(a), Some(b), Some(c), Some(d)) = (a, b, c, d) else { unreachable!("each of the four booted once") };
        let vf_part =
            d.map(|(o, q)| format!(" | with the VF: vfvm-vmm {:.2} s, QEMU {:.2} s", o.as_secs_f64(), q.as_secs_f64())).unwrap_or_default();
        println!("bench: round {run}: vfvm-vmm {} | QEMU q35 {}{}{vf_part}", a.summary(), b.summary(), image_part(c));
        ours.push(a);
        theirs.push(b);
        images.extend(c);
        if let Some((o, q)) = d {
            vf_ours.push(o);
            vf_qemu.push(q);
        }
    }
    let _ = std::fs::remove_file(&api_socket);
    let t = |v: &[Sample]| median(v.iter().map(|s| s.to_userspace.as_secs_f64()).collect());
    let r = |v: &[Sample]| median(v.iter().map(|s| as_f64(s.peak_rss_kib.unsigned_abs()) / 1024.0).collect());
    let c = |v: &[Sample], name: &str| median(v.iter().map(|s| as_f64(s.counter(name))).collect());
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}", a / b) } else { "-".into() };
    let (t_ours, t_qemu, r_ours, r_qemu) = (t(&ours), t(&theirs), r(&ours), r(&theirs));
    println!("bench: median time to userspace: vfvm-vmm {t_ours:.2} s, QEMU {t_qemu:.2} s, ratio vfvm/QEMU {}", ratio(t_ours, t_qemu));
    let split = |v: &[Sample], f: fn(&Sample) -> Option<f64>| {
        let values: Vec<f64> = v.iter().filter_map(f).collect();
        (!values.is_empty()).then(|| median(values))
    };
    if let (Some(bo), Some(bq), Some(ko), Some(kq)) = (
        split(&ours, Sample::before_kernel),
        split(&theirs, Sample::before_kernel),
        split(&ours, |s| s.guest_uptime),
        split(&theirs, |s| s.guest_uptime),
    ) {
        println!(
            "bench: median before the guest kernel's clock starts (VMM setup, firmware, the kernel's first steps): vfvm-vmm {bo:.2} s, QEMU {bq:.2} s; from then to userspace: vfvm-vmm {ko:.2} s, QEMU {kq:.2} s, ratio vfvm/QEMU {}",
            ratio(ko, kq)
        );
    }
    if !images.is_empty() {
        let agent = median(images.iter().map(Duration::as_secs_f64).collect());
        println!(
            "bench: median guest image (agent as PID 1) to the agent serving: {agent:.2} s, bare initramfs to userspace {t_ours:.2} s, ratio image/bare {}",
            ratio(agent, t_ours)
        );
    }
    if let Some(vf) = vf_addr.as_deref().filter(|_| !vf_ours.is_empty()) {
        report_vf(vf, &images, &vf_ours, &vf_qemu);
    }
    drop(vf);
    println!("bench: median peak RSS: vfvm-vmm {r_ours:.1} MiB, QEMU {r_qemu:.1} MiB, ratio vfvm/QEMU {}", ratio(r_ours, r_qemu));
    for (name, what) in KVM_COUNTERS {
        let (a, b) = (c(&ours, name), c(&theirs, name));
        println!("bench: median {what} ({name}): vfvm-vmm {a:.0}, QEMU {b:.0}, ratio vfvm/QEMU {}", ratio(a, b));
    }
    // Where vfvm-vmm's own exits went, in the round with the median time.
    let mut by_time: Vec<&Sample> = ours.iter().collect();
    by_time.sort_by_key(|s| s.to_userspace);
    if let Some(stats) = by_time.get(by_time.len() / 2).and_then(|s| s.own.as_ref()) {
        let reasons: Vec<String> = stats.reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("bench: vfvm-vmm's exits to the VMM (median round): {} in all: {}", stats.total(), reasons.join(", "));
        for range in stats.ranges.iter().take(12) {
            println!("bench:   {:>6} {:?} {:#x}+{:#x} {}", range.exits, range.space, range.base, range.len, range.device);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    /// A boot whose guest triple-faulted runs again, at most twice more; any other
    /// failure stands at once.
    #[test]
    fn only_a_guest_triple_fault_boots_again_and_only_so_often() {
        let fault = || anyhow::Error::from(super::GuestTripleFault("vfvm-vmm's guest triple-faulted".into()));
        let mut calls = 0;
        let r = super::retried("x", || {
            calls += 1;
            if calls == 1 {
                Err(fault())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 2);
        let mut calls = 0;
        let r: anyhow::Result<()> = super::retried("x", || {
            calls += 1;
            Err(fault())
        });
        assert!(r.is_err() && calls == 3, "{calls}");
        let mut calls = 0;
        let r: anyhow::Result<()> = super::retried("x", || {
            calls += 1;
            anyhow::bail!("no kernel")
        });
        assert!(r.is_err() && calls == 1);
    }

    #[test]
    fn the_marker_carries_the_guest_uptime() {
        let m = "@@vfvm-l3@@ userspace";
        assert_eq!(super::marker_uptime("[   3.1] @@vfvm-l3@@ userspace 4.25", m), Some(4.25));
        assert_eq!(super::marker_uptime("@@vfvm-l3@@ userspace", m), None);
        assert_eq!(super::marker_uptime("@@vfvm-l3@@ userspace soon", m), None);
    }
}
