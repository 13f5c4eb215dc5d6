//! `cargo xtask bench-hotplug`: a VF hot-plugged into a running guest, vfvm-vmm
//! against QEMU, and hot-plug against cold-plug, in one lab run. Inside L2
//! (`vfvm-lab inside bench-hotplug`), each round boots the guest image (the release
//! agent as PID 1, 1 vCPU, 512 MiB) four times, in rotated order:
//!
//! - vfvm-vmm with no VF: once the agent answers, `add_vfio_device` over the control
//!   API, then the agent's `UpdateInterface` for the guest address the API answered
//!   (it waits for the netdev, then sets its address): "hot-plug to configured"; then
//!   `remove_device` (the guest ejects); then the same plug and unplug again;
//! - QEMU q35 with a `pcie-root-port` and vhost-vsock, as Kata runs it: QMP
//!   `device_add vfio-pci` on the port, the same agent call for the address behind
//!   it; `device_del` until QEMU's `DEVICE_DELETED` event; again;
//! - vfvm-vmm with the VF cold-plugged (`--vfio`): VMM start to the VF configured,
//!   against the hot-plug VM's VMM start to the VF configured;
//! - vfvm-vmm with no VF and `--populate-memory` (guest RAM faulted in while the
//!   guest boots), the VF then hot-plugged as in the first.
//!
//! The first plug into a VM pays for a fresh VFIO container, which DMA-maps all guest
//! RAM (page pinning, slow in L2 under TCG), in both VMMs: first and later plugs are
//! reported apart (and `--populate-memory` takes that cost off the plug). A
//! benchmark, not a test: it asserts that each step worked, and
//! prints every round, the medians and the ratios.

use anyhow::{bail, ensure, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfvm_protocols::agent::{self, AgentClient};
use vfvm_protocols::client::{connect, AgentAddress, ConnectOptions};
use vfvm_protocols::vmm_api::{Request, Response};

use crate::agent_check::{ctx, VmmUnderTest};
use crate::bench::{median, retried, GuestTripleFault, AGENT_CMDLINE};
use crate::console::{die_with_parent, kill_and_reap};
use crate::hotplug_check::{add, configure, prepare_vfs, remove, restore_vfs, LabVf, API_CALL_LIMIT};

/// QEMU's guest vsock CID (vfvm-vmm's guests use hybrid vsock).
const QEMU_CID: u32 = 7;
/// Where the VF lands behind QEMU's root port: the port's secondary bus, device 0.
const QEMU_VF_GUEST_ADDR: &str = "0000:01:00.0";
/// How long a guest may take to boot to its agent, and QEMU to report a deletion.
const BOOT_LIMIT: Duration = Duration::from_secs(300);
const QMP_LIMIT: Duration = Duration::from_secs(60);

struct Options {
    vmm: PathBuf,
    kernel: PathBuf,
    image: PathBuf,
    rounds: u32,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options> {
    const USAGE: &str = "usage: vfvm-lab inside bench-hotplug --vmm PATH --kernel PATH --image PATH [--rounds N]";
    let (mut vmm, mut kernel, mut image, mut rounds) = (None, None, None, 3);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--vmm" => vmm = Some(PathBuf::from(value)),
            "--kernel" => kernel = Some(PathBuf::from(value)),
            "--image" => image = Some(PathBuf::from(value)),
            "--rounds" => rounds = value.parse::<u32>().with_context(|| format!("--rounds {value:?}: expected a number"))?.max(1),
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    let (Some(vmm), Some(kernel), Some(image)) = (vmm, kernel, image) else { bail!("{USAGE}") };
    Ok(Options { vmm, kernel, image, rounds })
}

/// One VM's plugs: the first and the second plug to configured, and the unplugs.
struct Plugs {
    first: Duration,
    second: Duration,
    /// The VMM's part of each: until the API's answer (vfvm-vmm) or QMP's (QEMU).
    first_add: Duration,
    second_add: Duration,
    unplug: Duration,
    /// VMM start to the first VF configured.
    start_to_configured: Duration,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A boot that failed because its guest triple-faulted (the lab's emulated SVM) is
/// told apart, so [`retried`] boots again.
fn triple_fault_or(child: &mut Child, vmm: &str, e: anyhow::Error) -> anyhow::Error {
    let faulted = match child.try_wait() {
        Ok(Some(status)) if vmm == "QEMU" => status.success(),
        Ok(Some(status)) => status.code() == Some(5),
        _ => false,
    };
    if faulted {
        GuestTripleFault(format!("{vmm}'s guest triple-faulted: {e:#}")).into()
    } else {
        e
    }
}

fn connect_agent(addr: &AgentAddress) -> Result<AgentClient> {
    let client = connect(addr, ConnectOptions { deadline: BOOT_LIMIT, ..Default::default() }).context("connecting to the guest agent")?;
    client.health(ctx(), &agent::HealthRequest::new()).context("Health")?;
    Ok(client)
}

/// vfvm-vmm booted without the VF, which is then hot-plugged twice; `populate`:
/// with `--populate-memory` (guest RAM faulted in while the guest boots).
fn vfvm_hot(o: &Options, vf: &LabVf, populate: bool) -> Result<Plugs> {
    let extra: Vec<String> = if populate { vec!["--populate-memory".into()] } else { Vec::new() };
    let (mut vm, _) = VmmUnderTest::start(&o.vmm, &o.kernel, &o.image, AGENT_CMDLINE, &extra, "bench-hot", None)?;
    let mut measured = || -> Result<Plugs> {
        let mut api = vm.api_client(API_CALL_LIMIT)?;
        let agent = connect_agent(&vm.agent_address())?;
        let plug = |api: &mut vfvm_protocols::vmm_api::VmmClient| -> Result<(Duration, Duration, Duration)> {
            let t = Instant::now();
            let guest = add(api, "vf0", vf)?;
            let added = t.elapsed();
            configure(&agent, "net0", &guest, vf)?;
            let plugged = t.elapsed();
            let t = Instant::now();
            ensure!(!remove(api, "vf0", None)?, "the guest did not eject the VF");
            Ok((plugged, added, t.elapsed()))
        };
        let (first, first_add, unplug) = plug(&mut api)?;
        let start_to_configured = vm.started.elapsed().saturating_sub(unplug);
        let (second, second_add, _) = plug(&mut api)?;
        Ok(Plugs { first, second, first_add, second_add, unplug, start_to_configured })
    };
    let result = measured();
    result.map_err(|e| triple_fault_or(&mut vm.child, "vfvm-vmm", e))
}

/// vfvm-vmm booted with the VF cold-plugged: VMM start to the VF configured.
fn vfvm_cold(o: &Options, vf: &LabVf) -> Result<Duration> {
    let (mut vm, _) = VmmUnderTest::start(
        &o.vmm,
        &o.kernel,
        &o.image,
        AGENT_CMDLINE,
        &["--vfio".into(), format!("{},id=vf0", vf.dev.addr)],
        "bench-cold",
        None,
    )?;
    let mut measured = || -> Result<Duration> {
        let mut api = vm.api_client(API_CALL_LIMIT)?;
        let agent = connect_agent(&vm.agent_address())?;
        let guest = match api.call(Request::Status)? {
            Response::Status { devices, .. } => {
                devices.into_iter().find(|d| d.id == "vf0").context("the status lists no vf0")?.guest_pci_address
            }
            other => bail!("status: {other:?}"),
        };
        configure(&agent, "net0", &guest.to_string(), vf)?;
        Ok(vm.started.elapsed())
    };
    let result = measured();
    result.map_err(|e| triple_fault_or(&mut vm.child, "vfvm-vmm", e))
}

/// A QMP connection: commands answered in order, events kept aside.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<serde_json::Value>,
}

impl Qmp {
    fn connect(path: &Path, child: &mut Child) -> Result<Self> {
        let deadline = Instant::now() + QMP_LIMIT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if child.try_wait()?.is_some() || Instant::now() > deadline {
                        bail!("QMP socket {}: {e}", path.display());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream.set_read_timeout(Some(QMP_LIMIT))?;
        let mut qmp = Self { reader: BufReader::new(stream.try_clone()?), writer: stream, events: Vec::new() };
        let greeting = qmp.read()?;
        ensure!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        ensure!(self.reader.read_line(&mut line).context("reading QMP")? > 0, "QEMU closed its QMP socket");
        serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))
    }

    fn execute(&mut self, command: &str, arguments: serde_json::Value) -> Result<()> {
        let msg = serde_json::json!({ "execute": command, "arguments": arguments });
        self.writer.write_all(format!("{msg}\n").as_bytes()).context("writing QMP")?;
        loop {
            let answer = self.read()?;
            if answer.get("return").is_some() {
                return Ok(());
            }
            if let Some(error) = answer.get("error") {
                bail!("QMP {command}: {error}");
            }
            self.events.push(answer);
        }
    }

    /// Waits for `DEVICE_DELETED` of device `id`.
    fn wait_deleted(&mut self, id: &str) -> Result<()> {
        let is_it = |e: &serde_json::Value| e["event"] == "DEVICE_DELETED" && e["data"]["device"] == id;
        if let Some(at) = self.events.iter().position(is_it) {
            self.events.remove(at);
            return Ok(());
        }
        loop {
            let e = self.read().with_context(|| format!("waiting for DEVICE_DELETED of {id}"))?;
            if is_it(&e) {
                return Ok(());
            }
        }
    }
}

/// QEMU q35 with a root port, the VF hot-plugged twice through QMP.
fn qemu_hot(o: &Options, vf: &LabVf) -> Result<Plugs> {
    let dir = std::env::temp_dir().join(format!("vfvm-bench-qmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let qmp_path = dir.join("qmp.sock");
    let mut cmd = Command::new(crate::host::QEMU);
    cmd.args(["-enable-kvm", "-M", "q35", "-cpu", "host", "-smp", "1", "-m", "512"]);
    cmd.args(["-display", "none", "-nodefaults", "-no-reboot"]).arg("-serial").arg(format!("file:{}", dir.join("console.log").display()));
    cmd.arg("-kernel").arg(&o.kernel).arg("-initrd").arg(&o.image).args(["-append", AGENT_CMDLINE]);
    cmd.args(["-device", &format!("vhost-vsock-pci,guest-cid={QEMU_CID}")]);
    cmd.args(["-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1"]);
    cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting QEMU")?;
    let mut measured = || -> Result<Plugs> {
        let mut qmp = Qmp::connect(&qmp_path, &mut child)?;
        let agent = connect_agent(&AgentAddress::Vsock { cid: QEMU_CID, port: crate::agent_check::AGENT_PORT })?;
        let plug = |qmp: &mut Qmp| -> Result<(Duration, Duration, Duration)> {
            let t = Instant::now();
            qmp.execute("device_add", serde_json::json!({ "driver": "vfio-pci", "host": vf.dev.addr, "id": "vf0", "bus": "rp0" }))?;
            let added = t.elapsed();
            configure(&agent, "net0", QEMU_VF_GUEST_ADDR, vf)?;
            let plugged = t.elapsed();
            let t = Instant::now();
            qmp.execute("device_del", serde_json::json!({ "id": "vf0" }))?;
            qmp.wait_deleted("vf0")?;
            Ok((plugged, added, t.elapsed()))
        };
        let (first, first_add, unplug) = plug(&mut qmp)?;
        let start_to_configured = started.elapsed().saturating_sub(unplug);
        let (second, second_add, _) = plug(&mut qmp)?;
        Ok(Plugs { first, second, first_add, second_add, unplug, start_to_configured })
    };
    let result = measured().map_err(|e| triple_fault_or(&mut child, "QEMU", e));
    kill_and_reap(&mut child);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub fn bench_hotplug(args: impl Iterator<Item = String>) -> Result<i32> {
    let o = parse(args)?;
    crate::host::run(Command::new("modprobe").arg("vhost_vsock")).context("loading vhost_vsock for QEMU's guest")?;
    let vfs = prepare_vfs()?;
    let result = rounds(&o, &vfs[0]);
    let restored = restore_vfs(&vfs);
    result?;
    restored?;
    Ok(0)
}

fn rounds(o: &Options, vf: &LabVf) -> Result<()> {
    println!("bench-hotplug: {} rounds, VF {}, the guest image ({}), 1 vCPU, 512 MiB", o.rounds, vf.dev.addr, o.image.display());
    // One of each first, not counted: the first VMs' huge pages come out of L2's
    // fragmented free memory (compaction), later ones' out of what the earlier VMs
    // gave back; without this the first VMM of round 1 pays for all.
    let warm = (vfvm_hot(o, vf, false), qemu_hot(o, vf), vfvm_cold(o, vf), vfvm_hot(o, vf, true));
    println!(
        "bench-hotplug: warm-up (not counted): {}",
        match warm {
            (Ok(a), Ok(b), Ok(c), Ok(d)) => format!(
                "first plug vfvm-vmm {:.2} s, QEMU {:.2} s, with --populate-memory {:.2} s; cold-plug start to configured {:.2} s",
                secs(a.first),
                secs(b.first),
                secs(d.first),
                secs(c)
            ),
            _ => "a boot failed (the lab's emulated SVM); the rounds retry theirs".into(),
        }
    );
    let (mut ours, mut qemu, mut cold, mut populated) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=o.rounds {
        let (mut a, mut b, mut c, mut d) = (None, None, None, None);
        for which in (0..4).map(|i| (i + round as usize - 1) % 4) {
            match which {
                0 => a = Some(retried("vfvm-vmm hot-plug", || vfvm_hot(o, vf, false))?),
                1 => b = Some(retried("QEMU hot-plug", || qemu_hot(o, vf))?),
                2 => c = Some(retried("vfvm-vmm cold-plug", || vfvm_cold(o, vf))?),
                _ => d = Some(retried("vfvm-vmm hot-plug, guest RAM populated", || vfvm_hot(o, vf, true))?),
            }
        }
        let (Some(a), Some(b), Some(c), Some(d)) = (a, b, c, d) else { unreachable!("each of the four ran once") };
        println!(
            "bench-hotplug: round {round}: hot-plug to configured, first/again: vfvm-vmm {:.2}/{:.2} s (the VMM's part {:.2}/{:.2} s; with --populate-memory {:.2}/{:.2} s), QEMU {:.2}/{:.2} s ({:.2}/{:.2} s); unplug: vfvm-vmm {:.2} s, QEMU {:.2} s; VMM start to the VF configured: vfvm-vmm hot {:.2} s, cold {:.2} s, QEMU hot {:.2} s",
            secs(a.first),
            secs(a.second),
            secs(a.first_add),
            secs(a.second_add),
            secs(d.first),
            secs(d.second),
            secs(b.first),
            secs(b.second),
            secs(b.first_add),
            secs(b.second_add),
            secs(a.unplug),
            secs(b.unplug),
            secs(a.start_to_configured),
            secs(c),
            secs(b.start_to_configured)
        );
        ours.push(a);
        qemu.push(b);
        cold.push(c);
        populated.push(d);
    }
    let m = |v: &[Plugs], f: fn(&Plugs) -> Duration| median(v.iter().map(|p| secs(f(p))).collect());
    let line = |what: &str, a: f64, b: f64| {
        println!("bench-hotplug: median {what}: vfvm-vmm {a:.2} s, QEMU {b:.2} s, ratio vfvm/QEMU {:.2}", a / b);
    };
    line("hot-plug to configured netdev, first into the VM", m(&ours, |p| p.first), m(&qemu, |p| p.first));
    line("hot-plug to configured netdev, again", m(&ours, |p| p.second), m(&qemu, |p| p.second));
    line(
        "hot-plug to configured netdev, first into a VM started with --populate-memory",
        m(&populated, |p| p.first),
        m(&qemu, |p| p.first),
    );
    line("the VMM's part of the first plug (API / QMP answer)", m(&ours, |p| p.first_add), m(&qemu, |p| p.first_add));
    line("the VMM's part of a later plug", m(&ours, |p| p.second_add), m(&qemu, |p| p.second_add));
    line("unplug (eject and release / device_del to DEVICE_DELETED)", m(&ours, |p| p.unplug), m(&qemu, |p| p.unplug));
    let (hot, cold) = (m(&ours, |p| p.start_to_configured), median(cold.iter().map(|d| secs(*d)).collect()));
    let hot_populated = m(&populated, |p| p.start_to_configured);
    println!(
        "bench-hotplug: median VMM start to the VF configured: vfvm-vmm hot-plug {hot:.2} s (with --populate-memory {hot_populated:.2} s), cold-plug {cold:.2} s, ratio hot/cold {:.2} ({:.2} populated)",
        hot / cold,
        hot_populated / cold
    );
    Ok(())
}
