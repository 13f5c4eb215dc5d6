//! `cargo xtask demo`, the README's main command: builds vfvm and runs one pod in a
//! vfvm VM under a private containerd. Where: on this host if its KVM boots Linux (a
//! bounded probe boots the guest image with `vfvm-vmm` and asks the agent for its
//! health), else inside the lab's L2 machine (`vfvm-lab inside demo-pod`), whose KVM
//! does. The pod itself is run by [`run_pod`] in both cases.

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vfvm_protocols::agent;
use vfvm_protocols::client::{connect, AgentAddress, ClientError, ConnectOptions};
use vfvm_test_containerd::igb_vfs::{self, IgbVf};
use vfvm_test_containerd::{install_vfvm, oci, vfvm_leftovers, Containerd, Version, VFVM_STATE_DIR};

use crate::console::{die_with_parent, kill_and_reap};
use crate::{guest_image, host, l2, progress};

const RUNTIME: &str = "io.containerd.vfvm.v2";
/// The pod's name, which the shim puts on the VM's kernel command line as `vfvm.sandbox=`.
const POD: &str = "demo";
const POD_SCRIPT: &str = "echo hello from a container in a vfvm VM; echo \"kernel: $(uname -r)\"; echo \"cmdline: $(cat /proc/cmdline)\"";
/// The binaries the pod needs on the host, all built by [`build_binaries`] into one
/// directory (the agent goes into the guest image: a release build, see [`demo`]).
const BINARIES: [&str; 2] = ["containerd-shim-vfvm-v2", "vfvm-vmm"];
/// On a KVM that boots Linux the agent answers within a few seconds; one that does
/// not (this project's nested paravirtual KVM) shows nothing at all.
const PROBE_LIMIT: Duration = Duration::from_secs(25);
/// How long `ctr run` may take: the VM boots in about 25 s in an idle lab and in
/// about 90 s while the host is busy (L3 under TCG-emulated SVM).
const CTR_LIMIT: Duration = Duration::from_secs(300);
/// The agent's vsock port (`[agent] vsock_port` in configs/vfvm.toml).
pub(crate) const AGENT_PORT: u32 = 1024;

/// `cargo xtask demo`.
pub fn demo() -> Result<i32> {
    let (cache, kernel, images) = crate::prepare()?;
    let build_dir = build_binaries()?;
    let agent = guest_image::release_agent(build_dir.parent().context("the build directory has no parent")?)?;
    let image = {
        let _lock = crate::CacheLock::take(&cache)?;
        let busybox = host::find_busybox().context("no static busybox after installing busybox-static")?;
        let opts = guest_image::Options { agent: Some(agent), ..Default::default() };
        guest_image::ensure(&cache, &kernel, &busybox, &opts)?
    };
    progress!("guest image with this build's agent: {} (kernel {})", image.initrd.display(), kernel.release);
    // install_vfvm reads these, here and (VFVM_* pass into L2) inside the lab.
    std::env::set_var("VFVM_TEST_AGENT_KERNEL", &image.kernel);
    std::env::set_var("VFVM_TEST_AGENT_INITRD", &image.initrd);

    match probe_host_kvm(&build_dir, &image.kernel, &image.initrd, PROBE_LIMIT)? {
        Probe::Boots(why) => on_this_host(&build_dir, &why),
        Probe::DoesNot(why) => {
            println!("vfvm demo: {why}: running the pod inside the lab (QEMU-emulated machine with real KVM)");
            let me = host::self_exe()?.to_string_lossy().into_owned();
            // One VF: the second pod asks for SR-IOV.
            let opts = l2::RunOptions { command: vec![me, "inside".into(), "demo-pod".into()], vfs: 1, ..Default::default() };
            let code = l2::run(&cache, &kernel, &images, &opts)?;
            if code == 0 {
                println!("vfvm demo: PASSED (the pod ran in a vfvm VM inside the lab) in {:.0} s", progress::elapsed_secs());
            }
            Ok(code)
        }
    }
}

/// The demo on a host whose KVM boots Linux: the pod runs right here.
fn on_this_host(build_dir: &Path, why: &str) -> Result<i32> {
    println!("vfvm demo: {why}: running the pod on this host");
    run_pod(build_dir)?;
    println!("vfvm demo: PASSED (the pod ran in a vfvm VM on this host) in {:.0} s", progress::elapsed_secs());
    Ok(0)
}

/// `vfvm-lab inside demo-pod`: the pod, inside L2, with the binaries beside this one
/// (L2 sees this machine's root at the same paths).
pub fn inside_demo_pod() -> Result<i32> {
    let exe = host::self_exe()?;
    let build_dir = exe.parent().context("the vfvm-lab binary has no directory")?;
    run_pod(build_dir)?;
    Ok(0)
}

/// How long the probe may take inside L2, where the guest runs on TCG-emulated SVM:
/// the agent answers in 20-90 s there, against a few seconds on real hardware.
const PROBE_LIMIT_IN_L2: Duration = Duration::from_secs(150);

/// `vfvm-lab inside demo-host`: the demo's host mode, inside L2 (a host whose KVM
/// boots Linux): the probe, which must find that it does, then the pod on this host.
/// Takes the guest image from `VFVM_TEST_AGENT_KERNEL` and `VFVM_TEST_AGENT_INITRD`.
pub fn inside_demo_host() -> Result<i32> {
    let exe = host::self_exe()?;
    let build_dir = exe.parent().context("the vfvm-lab binary has no directory")?;
    let image = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .with_context(|| format!("{name} is not set: the guest image (cargo xtask image --agent ...)"))
    };
    let (kernel, initrd) = (image("VFVM_TEST_AGENT_KERNEL")?, image("VFVM_TEST_AGENT_INITRD")?);
    match probe_host_kvm(build_dir, &kernel, &initrd, PROBE_LIMIT_IN_L2)? {
        Probe::Boots(why) => on_this_host(build_dir, &why),
        Probe::DoesNot(why) => anyhow::bail!("the demo's probe did not find that L2's KVM boots Linux: {why}"),
    }
}

/// Builds the shim, the VMM and the agent with the cargo, target directory and
/// profile this program was built with; returns the directory holding them.
fn build_binaries() -> Result<PathBuf> {
    let exe = host::self_exe()?;
    let profile_dir = exe.parent().context("the vfvm-lab binary has no directory")?.to_path_buf();
    let target_dir = profile_dir.parent().context("the vfvm-lab binary is not in a cargo target directory")?;
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).context("the build directory's name is not UTF-8")?;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--bins"]).arg("--manifest-path").arg(&manifest).arg("--target-dir").arg(target_dir);
    for package in BINARIES {
        cmd.args(["-p", package]);
    }
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    progress!("building {} into {}", BINARIES.join(", "), profile_dir.display());
    host::run_shown(&mut cmd)?;
    for bin in BINARIES {
        ensure!(profile_dir.join(bin).is_file(), "cargo built the workspace, but {} is not in {}", bin, profile_dir.display());
    }
    Ok(profile_dir)
}

/// Whether this host's KVM runs the guest image, and why we think so.
enum Probe {
    Boots(String),
    DoesNot(String),
}

/// Boots the guest image with `vfvm-vmm` on this host's KVM (1 vCPU, 512 MiB, hybrid
/// vsock) and asks the agent for its health, for at most `limit`.
fn probe_host_kvm(build_dir: &Path, kernel: &Path, initrd: &Path, limit: Duration) -> Result<Probe> {
    if !Path::new("/dev/kvm").exists() {
        return Ok(Probe::DoesNot("this host has no /dev/kvm".into()));
    }
    progress!("probing this host's KVM: booting the guest image with vfvm-vmm (at most {} s)", limit.as_secs());
    let dir = std::env::temp_dir().join(format!("vfvm-demo-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = probe_in(&dir, &build_dir.join("vfvm-vmm"), kernel, initrd, limit);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub(crate) enum Outcome {
    Answered(Duration),
    Exited(ExitStatus),
    Refused(String),
    TimedOut,
}

fn probe_in(dir: &Path, vmm: &Path, kernel: &Path, initrd: &Path, limit: Duration) -> Result<Probe> {
    let (console, vsock, stderr) = (dir.join("console.log"), dir.join("vsock.sock"), dir.join("vmm.stderr"));
    let mut cmd = Command::new(vmm);
    // No `quiet`: any console output at all tells "the kernel started" from "nothing ran".
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", "console=ttyS0 panic=-1 vfvm.sandbox=demo-probe", "--vcpus", "1", "--memory", "512"])
        .arg("--serial-log")
        .arg(&console)
        .arg("--vsock-socket")
        .arg(&vsock)
        .args(["--vsock-cid", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?);
    die_with_parent(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {}", vmm.display()))?;
    let outcome = wait_for_agent(&mut child, &vsock, started, limit);
    kill_and_reap(&mut child);
    let outcome = outcome?;
    let last_line = |path: &Path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or_default().to_string()
    };
    let limit = limit.as_secs();
    Ok(match outcome {
        Outcome::Answered(after) => Probe::Boots(format!(
            "this host's KVM booted the guest image with vfvm-vmm and its agent answered in {:.1} s",
            after.as_secs_f64()
        )),
        Outcome::Exited(status) => {
            Probe::DoesNot(format!("vfvm-vmm could not run a VM on this host's KVM ({status}: {})", last_line(&stderr)))
        }
        Outcome::Refused(e) => Probe::DoesNot(format!("the probe VM on this host's KVM did not serve the agent ({e})")),
        Outcome::TimedOut => match last_line(&console) {
            l if l.is_empty() => Probe::DoesNot(format!("this host's KVM did not boot Linux within {limit} s (no console output)")),
            l => Probe::DoesNot(format!(
                "this host's KVM started the guest kernel, but its agent did not answer within {limit} s (last console line: {l:?})"
            )),
        },
    })
}

/// Polls the agent behind `vsock` (hybrid vsock, port 1024) until it answers Health,
/// the VMM exits, or `limit` after `started` passes.
pub(crate) fn wait_for_agent(child: &mut std::process::Child, vsock: &Path, started: Instant, limit: Duration) -> Result<Outcome> {
    wait_for_agent_at(child, &AgentAddress::Hybrid { uds: vsock.to_path_buf(), port: AGENT_PORT }, started, limit)
}

/// [`wait_for_agent`] at any agent address (AF_VSOCK for a QEMU guest).
pub(crate) fn wait_for_agent_at(
    child: &mut std::process::Child,
    addr: &AgentAddress,
    started: Instant,
    limit: Duration,
) -> Result<Outcome> {
    loop {
        if let Some(status) = child.try_wait().context("checking on the probe's vfvm-vmm")? {
            return Ok(Outcome::Exited(status));
        }
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Ok(Outcome::TimedOut);
        }
        // Short connect rounds, so a VMM that dies is noticed within a second.
        let opts = ConnectOptions { deadline: left.min(Duration::from_secs(1)), ..Default::default() };
        match connect(addr, opts) {
            Ok(client) => {
                let ctx = ttrpc::context::with_timeout(left.as_nanos().try_into().unwrap_or(i64::MAX));
                if client.health(ctx, &agent::HealthRequest::new()).is_ok() {
                    return Ok(Outcome::Answered(started.elapsed()));
                }
            }
            Err(e @ ClientError::Handshake { .. }) => return Ok(Outcome::Refused(e.to_string())),
            // Not booted yet: the next round tries again.
            Err(_) => {}
        }
    }
}

/// The pod, here: a private containerd with vfvm installed as its runtime, the test
/// images, `ctr run --rm` of a busybox container in a vfvm VM; then nothing of vfvm
/// may be left, and containerd is stopped. Fails on any step that did not work.
pub fn run_pod(build_dir: &Path) -> Result<()> {
    let left = vfvm_leftovers();
    ensure!(left.is_empty(), "vfvm pods from an earlier run are still here ({}): stop them first", left.join(", "));
    let version = match Version::V1_6.check_installed() {
        Ok(_) => Version::V1_6,
        Err(e) => {
            Version::V2_1
                .check_installed()
                .with_context(|| format!("no containerd to run the pod with (1.6: {e:#}); `cargo xtask install` installs both"))?;
            Version::V2_1
        }
    };
    install_vfvm(build_dir, None, |config| config).context("installing vfvm as containerd's runtime")?;
    progress!("starting a private containerd {} with vfvm as runtime {RUNTIME}", version.name());
    let c = Containerd::start(version)?;
    let (imported, took) = c.import_test_images()?;
    progress!("imported {} in {:.1} s", imported.iter().map(|i| i.reference).collect::<Vec<_>>().join(", "), took.as_secs_f64());

    progress!(
        "ctr run --rm --runtime {RUNTIME} {} {POD}: the shim boots the pod's VM (at most {} s)",
        oci::BUSYBOX_REF,
        CTR_LIMIT.as_secs()
    );
    let started = Instant::now();
    let out = c.ctr_within(&["run", "--rm", "--runtime", RUNTIME, oci::BUSYBOX_REF, POD, "sh", "-c", POD_SCRIPT], CTR_LIMIT)?;
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        println!("pod| {line}");
    }
    let failed = |what: &str| {
        format!(
            "{what} (ctr exited {})\nctr's stderr:\n{}\nthe VM's console:\n{}\ncontainerd's log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            console_tail(POD),
            c.log()
        )
    };
    ensure!(out.status.success(), "{}", failed("ctr run failed"));
    ensure!(stdout.contains("hello from a container"), "{}", failed("the container did not print its hello"));
    ensure!(
        stdout.contains(&format!("vfvm.sandbox={POD}")),
        "{}",
        failed("the container did not run in the pod's VM (no vfvm.sandbox= on its kernel command line)")
    );
    println!(
        "vfvm demo: the pod ran in a vfvm VM under containerd {}: `ctr run` took {:.1} s, VM boot included",
        version.name(),
        took.as_secs_f64()
    );

    let left = vfvm_leftovers();
    ensure!(left.is_empty(), "the finished pod left behind: {}", left.join(", "));
    println!("vfvm demo: nothing left behind (no vfvm-vmm, virtiofsd or shim process, nothing under {VFVM_STATE_DIR})");
    match first_vf() {
        Some(vf) => run_vf_pod(&c, &vf)?,
        None => println!("vfvm demo: no SR-IOV VF on this host (an igb PF with a VF): the VF pod runs in the lab's demo"),
    }
    c.stop().context("stopping containerd")?;
    println!("vfvm demo: containerd stopped");
    Ok(())
}

/// The VF pod's network namespace, its VF netdev there and its address.
const VF_NETNS: &str = "vfvm-demo";
const VF_IFNAME: &str = "net1";
const VF_MAC: &str = "02:00:00:00:de:01";
const VF_CIDR: &str = "198.18.0.50/24";
/// The lab's peer host on the VFs' wire.
const PEER: &str = "198.18.0.2";

/// An igb PF's VF 0 here (the lab's NIC), if it has a netdev in this netns.
fn first_vf() -> Option<IgbVf> {
    igb_vfs::igb_pf()?;
    IgbVf::find(0).ok().filter(|vf| vf.netdev().is_some())
}

/// Runs `script` with `sh -c`, failing with its stderr.
pub(crate) fn sh(script: &str) -> Result<String> {
    let out = Command::new("sh").args(["-c", script]).output().with_context(|| format!("running {script}"))?;
    ensure!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The headline: a pod with `enable_sriov` whose network namespace holds a VF (put
/// there as sriov-cni would: renamed, the pod's MAC and address) gets the VF in its
/// VM; its container shows the interface and pings the lab's peer over it; after
/// the pod the VF is back in the netns as it was, on its host driver.
fn run_vf_pod(c: &Containerd, igb_vf: &IgbVf) -> Result<()> {
    let (vf, netdev) = (&igb_vf.pci, igb_vf.netdev().context("the VF's netdev")?);
    progress!("VF pod: VF {vf} ({netdev}) into a pod network namespace as {VF_IFNAME}, {VF_MAC}, {VF_CIDR}");
    sh(&format!("ip netns add {VF_NETNS}"))?;
    let result = (|| {
        // As sriov-cni: the MAC pinned on the PF, then taken by the netdev.
        igb_vf.pin_mac(VF_MAC)?;
        sh(&format!("ip link set {netdev} netns {VF_NETNS} name {VF_IFNAME}"))?;
        sh(&format!("ip -n {VF_NETNS} link set {VF_IFNAME} up && ip -n {VF_NETNS} addr add {VF_CIDR} dev {VF_IFNAME}"))?;
        let pod = format!("{POD}-vf");
        let netns = format!("network:/run/netns/{VF_NETNS}");
        let script = format!("ip -o addr show {VF_IFNAME}; ping -c 3 -W 10 {PEER}");
        progress!("ctr run --rm --runtime {RUNTIME} --annotation enable_sriov=true --with-ns {netns} ... {pod}");
        let started = Instant::now();
        let out = c.ctr_within(
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                "--annotation",
                "io.katacontainers.config.runtime.enable_sriov=true",
                "--with-ns",
                &netns,
            ]
            .into_iter()
            .chain([oci::BUSYBOX_REF, pod.as_str(), "sh", "-c", script.as_str()])
            .collect::<Vec<_>>(),
            CTR_LIMIT,
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        for line in stdout.lines() {
            println!("vf-pod| {line}");
        }
        ensure!(
            out.status.success(),
            "the VF pod failed ({}): {}
the VM's console:
{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            console_tail(&pod)
        );
        ensure!(stdout.contains(VF_CIDR), "the container does not see {VF_IFNAME} with {VF_CIDR}");
        ensure!(stdout.contains("packets transmitted") && !stdout.contains(", 0 packets received"), "the peer did not answer over the VF");
        println!(
            "vfvm demo: the VF pod's container saw {VF_IFNAME} ({VF_CIDR}) in its VM and pinged {PEER} over the VF ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        let back = sh(&format!("ip -n {VF_NETNS} -o addr show {VF_IFNAME}"))?;
        let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{vf}/driver"))?;
        ensure!(back.contains(VF_CIDR), "the VF did not come back to the pod netns configured: {back}");
        println!(
            "vfvm demo: after the pod, VF {vf} is back in the pod netns as {VF_IFNAME} with {VF_CIDR}, on {}",
            driver.file_name().unwrap_or_default().to_string_lossy()
        );
        let left = vfvm_leftovers();
        ensure!(left.is_empty(), "the VF pod left behind: {}", left.join(", "));
        Ok(())
    })();
    // The VF back where the lab had it, its MAC unpinned on the PF.
    let _ = sh(&format!("ip -n {VF_NETNS} link set {VF_IFNAME} netns 1 name {netdev}"));
    let _ = igb_vf.unpin_mac();
    let _ = sh(&format!("ip netns del {VF_NETNS}"));
    result
}

/// The last lines of the pod's VM console, if the shim left it (for failures).
fn console_tail(pod: &str) -> String {
    let path = Path::new(VFVM_STATE_DIR).join(pod).join("console.log");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        }
        Err(_) => format!("({} is gone)", path.display()),
    }
}
