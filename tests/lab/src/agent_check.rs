//! `vfvm-lab inside agent-check`: the guest image's agent, booted as an L3 guest
//! under L2's KVM with one of the lab's VFs passed through, by QEMU (vhost-vsock,
//! `-device vfio-pci`) or, with `--vmm PATH`, by vfvm-vmm (hybrid vsock, `--vfio`).
//! The check talks to the agent and has it configure the VF, found by its guest PCI
//! address (for vfvm-vmm, as its control API's status lists the device); a ping from
//! the lab's peer host to the address proves the agent configured the right device
//! and that the VF's datapath (DMA through the IOMMU, MSI-X) works in the guest.

use anyhow::{bail, ensure, Context, Result};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vfvm_protocols::agent;
use vfvm_protocols::client::{connect, AgentAddress, ConnectOptions};

use crate::console::{die_with_parent, kill_and_reap};
use crate::host::run;
use crate::inside::{igb_pf, ping_until_answered, PEER_ADDR, PEER_NETNS};

/// The guest's vsock CID, and where the VF sits on the guest's root bus.
pub const GUEST_CID: u32 = 3;
pub const AGENT_PORT: u32 = 1024;
const VF_GUEST_SLOT: u32 = 5;
const VF_GUEST_ADDR: &str = "0000:00:05.0";
const VF_INDEX: u32 = 1;
const VF_ADMIN_MAC: &str = "02:00:00:00:00:33";
const GUEST_VF_CIDR: &str = "198.18.0.33/24";
const GUEST_VF_IP: &str = "198.18.0.33";
/// The vsock port the agent mirrors its logs to (`vfvm.log_port`).
const LOG_PORT: u32 = 1025;
/// What the check keeps of the agent's log stream, at most.
const MAX_LOG_BYTES: usize = 1 << 20;

pub type Logs = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;

/// Collects, in the background, what the first connection `accept` returns sends,
/// up to MAX_LOG_BYTES.
fn collect_logs<S: std::io::Read>(accept: impl FnOnce() -> Option<S> + Send + 'static) -> Logs {
    let logs = Logs::default();
    let sink = logs.clone();
    std::thread::spawn(move || {
        let Some(mut stream) = accept() else { return };
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut logs = sink.lock().unwrap_or_else(|e| e.into_inner());
            let room = MAX_LOG_BYTES.saturating_sub(logs.len());
            logs.extend_from_slice(&buf[..n.min(room)]);
        }
    });
    logs
}

/// The agent's log stream on vsock port `port` of this (host) side.
fn collect_vsock_logs(port: u32) -> Result<Logs> {
    let listener = crate::vsock::listen(port, 1)?;
    Ok(collect_logs(move || crate::vsock::accept(&listener).ok()))
}

/// Each agent call's limit, in the nanoseconds ttrpc takes.
const AGENT_CALL_TIMEOUT_NS: i64 = 60 * 1_000_000_000;

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(AGENT_CALL_TIMEOUT_NS)
}

pub fn agent_check(mut args: impl Iterator<Item = String>) -> Result<i32> {
    const USAGE: &str = "usage: vfvm-lab inside agent-check --kernel PATH --initrd PATH [--vmm PATH-TO-vfvm-vmm]";
    let (mut kernel, mut initrd, mut vmm) = (None, None, None);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value)),
            "--initrd" => initrd = Some(PathBuf::from(value)),
            "--vmm" => vmm = Some(PathBuf::from(value)),
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    let (Some(kernel), Some(initrd)) = (kernel, initrd) else { bail!("{USAGE}") };

    let pf = igb_pf()?;
    let pf_if = pf.netdevs().into_iter().next().context("the igb PF has no netdev")?;
    let vf = pf.virtfn(VF_INDEX)?;
    run(Command::new("ip").args(["link", "set", "dev", &pf_if, "vf", &VF_INDEX.to_string(), "mac", VF_ADMIN_MAC]))?;
    vf.bind_by_override(Some("vfio-pci"))?;
    if let Some(vmm) = vmm {
        let result = check_with_vfvm_vmm(&vmm, &kernel, &initrd, &vf.addr.to_string());
        vf.bind_by_override(None)?;
        return result.map(|()| 0);
    }
    run(Command::new("modprobe").arg("vhost_vsock")).context("loading vhost_vsock")?;
    let logs = collect_vsock_logs(LOG_PORT)?;

    let mut qemu = Command::new(crate::host::QEMU);
    qemu.args(["-enable-kvm", "-M", "q35", "-cpu", "host", "-smp", "1", "-m", "512"])
        .args(["-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet vfvm.log_port={LOG_PORT}"))
        .args(["-device", &format!("vhost-vsock-pci,guest-cid={GUEST_CID}")])
        .args(["-device", &format!("vfio-pci,host={},bus=pcie.0,addr={VF_GUEST_SLOT:#x}", vf.addr)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut qemu);
    let started = Instant::now();
    let mut child = qemu.spawn().context("starting the L3 QEMU")?;
    // The guest's console (the agent logs there) goes to our output, marked.
    let console = child.stdout.take().context("L3 stdout")?;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(console).lines().map_while(Result::ok) {
            println!("l3| {}", line.trim_end_matches('\r'));
        }
    });
    let addr = AgentAddress::Vsock { cid: GUEST_CID, port: AGENT_PORT };
    let result = talk_to_agent(&addr, VF_GUEST_ADDR, started).and_then(|()| {
        let logs = String::from_utf8_lossy(&logs.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
        ensure!(
            logs.contains("agent serving vfvm.agent.v1"),
            "the agent's log stream on vsock port {LOG_PORT} lacks its serving line:\n{logs}"
        );
        println!("check: the agent's logs arrived over vsock port {LOG_PORT} ({} bytes)", logs.len());
        println!("agent-check: PASSED");
        Ok(())
    });
    kill_and_reap(&mut child);
    vf.bind_by_override(None)?;
    result.map(|()| 0)
}

/// vfvm-vmm running an L3 guest for a check: hybrid vsock and the control API on
/// Unix sockets in a directory of its own, the console on our output (marked);
/// killed and its directory removed when dropped.
pub struct VmmUnderTest {
    pub child: std::process::Child,
    pub dir: PathBuf,
    pub api: PathBuf,
    pub vsock: PathBuf,
    pub started: Instant,
}

impl VmmUnderTest {
    /// Boots `kernel` + `initrd` with `cmdline` (1 vCPU, 512 MiB) and `extra_args`
    /// (`--vfio ...` to pass devices through at boot); `name` makes the directory. With
    /// `log_port`, what the guest sends to that host port is collected (the logs).
    pub fn start(
        vmm: &std::path::Path,
        kernel: &std::path::Path,
        initrd: &std::path::Path,
        cmdline: &str,
        extra_args: &[String],
        name: &str,
        log_port: Option<u32>,
    ) -> Result<(Self, Option<Logs>)> {
        let dir = std::env::temp_dir().join(format!("vfvm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (vsock, api) = (dir.join("vsock.sock"), dir.join("api.sock"));
        // Guest connections to host port P arrive at <vsock>_P.
        let logs = match log_port {
            Some(port) => Some(collect_unix_logs(&dir.join(format!("vsock.sock_{port}")))?),
            None => None,
        };
        let mut cmd = Command::new(vmm);
        cmd.arg("--kernel").arg(kernel).arg("--initrd").arg(initrd).args(["--cmdline", cmdline]);
        cmd.args(["--vcpus", "1", "--memory", "512", "--serial-stdout"]);
        cmd.arg("--api-socket").arg(&api).arg("--vsock-socket").arg(&vsock).args(["--vsock-cid", &GUEST_CID.to_string()]);
        cmd.args(extra_args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        die_with_parent(&mut cmd);
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("starting {}", vmm.display()))?;
        let console = child.stdout.take().context("L3 stdout")?;
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(console).lines().map_while(Result::ok) {
                println!("l3| {}", line.trim_end_matches('\r'));
            }
        });
        Ok((Self { child, dir, api, vsock, started }, logs))
    }

    /// A control API client, once the socket is there (the devices plugged, the vCPUs
    /// running); every call waits at most `call_limit`.
    pub fn api_client(&mut self, call_limit: Duration) -> Result<vfvm_protocols::vmm_api::VmmClient> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("vfvm-vmm exited ({status}) before serving its control API");
            }
            match vfvm_protocols::vmm_api::VmmClient::connect(&self.api, call_limit) {
                Ok(c) => return Ok(c),
                Err(_) if self.started.elapsed() < Duration::from_secs(60) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => bail!("vfvm-vmm's control API: {e}"),
            }
        }
    }

    /// The agent's address over the VMM's hybrid vsock.
    pub fn agent_address(&self) -> AgentAddress {
        AgentAddress::Hybrid { uds: self.vsock.clone(), port: AGENT_PORT }
    }
}

impl Drop for VmmUnderTest {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The same check with vfvm-vmm as the VMM: hybrid vsock on Unix sockets, the VF
/// passed through with `--vfio`, its guest address read from the control API.
fn check_with_vfvm_vmm(vmm: &std::path::Path, kernel: &std::path::Path, initrd: &std::path::Path, vf: &str) -> Result<()> {
    use vfvm_protocols::vmm_api::{Request, Response};
    let cmdline = format!("console=ttyS0 panic=-1 quiet vfvm.log_port={LOG_PORT}");
    let (mut under_test, logs) =
        VmmUnderTest::start(vmm, kernel, initrd, &cmdline, &["--vfio".into(), format!("{vf},id=vf0")], "agent-check", Some(LOG_PORT))?;
    let logs = logs.context("the log collector")?;
    let started = under_test.started;
    let result = (|| {
        let mut client = under_test.api_client(Duration::from_secs(5))?;
        let devices = match client.call(Request::Status)? {
            Response::Status { devices, .. } => devices,
            other => bail!("status: {other:?}"),
        };
        let dev = devices.iter().find(|d| d.id == "vf0").with_context(|| format!("the status lists no device vf0: {devices:?}"))?;
        ensure!(dev.kind == "vfio" && dev.host_pci_address.map(|a| a.to_string()).as_deref() == Some(vf), "vf0 in the status: {dev:?}");
        let guest = dev.guest_pci_address.to_string();
        println!("check: vfvm-vmm's status lists vf0: host {vf}, guest {guest}, kind vfio");
        talk_to_agent(&under_test.agent_address(), &guest, started)?;
        Ok(())
    })();
    drop(under_test);
    result?;
    let logs = String::from_utf8_lossy(&logs.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    ensure!(
        logs.contains("agent serving vfvm.agent.v1"),
        "the agent's log stream on vsock port {LOG_PORT} lacks its serving line:\n{logs}"
    );
    println!("check: the agent's logs arrived over vsock port {LOG_PORT} ({} bytes)", logs.len());
    println!("agent-check (vfvm-vmm, VFIO): PASSED");
    Ok(())
}

/// The agent's log stream on the Unix socket `path` (hybrid vsock's host port).
fn collect_unix_logs(path: &std::path::Path) -> Result<Logs> {
    let listener = std::os::unix::net::UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    Ok(collect_logs(move || listener.accept().ok().map(|(s, _)| s)))
}

fn talk_to_agent(addr: &AgentAddress, vf_guest_addr: &str, started: Instant) -> Result<()> {
    let client = connect(addr, ConnectOptions { deadline: Duration::from_secs(240), ..Default::default() })
        .context("connecting to the guest agent")?;
    let health = client.health(ctx(), &agent::HealthRequest::new()).context("Health")?;
    println!(
        "check: agent {} ({}) answered over {addr} {:.1}s after the VMM's start",
        health.agent_version,
        health.api_version,
        started.elapsed().as_secs_f64()
    );
    ensure!(health.api_version == agent::API_VERSION, "agent speaks {}", health.api_version);
    let details = client.guest_details(ctx(), &agent::GuestDetailsRequest::new()).context("GuestDetails")?;
    for m in ["igbvf", "vmw_vsock_virtio_transport"] {
        ensure!(details.loaded_modules.iter().any(|l| l == m), "the guest has not loaded {m}: {:?}", details.loaded_modules);
    }
    println!(
        "check: guest kernel {}, {} MiB, {} modules loaded",
        details.kernel_release,
        details.memory_bytes >> 20,
        details.loaded_modules.len()
    );

    let mut iface = agent::Interface::new();
    iface.name = "net0".into();
    iface.pci_address = vf_guest_addr.into();
    iface.addresses = vec![agent::IpAddress { cidr: GUEST_VF_CIDR.into(), ..Default::default() }];
    iface.wait_timeout_ms = 30_000;
    let mut req = agent::UpdateInterfaceRequest::new();
    req.interface = Some(iface).into();
    client.update_interface(ctx(), &req).context("UpdateInterface")?;
    // Twice: the second must be a no-op that succeeds.
    client.update_interface(ctx(), &req).context("UpdateInterface, again")?;
    println!("check: agent configured the VF at guest {vf_guest_addr} as net0 {GUEST_VF_CIDR}");

    let ping = ping_until_answered(Some(PEER_NETNS), GUEST_VF_IP, Duration::from_secs(60), 2)?;
    print!("{ping}");
    println!("check: the peer host {PEER_ADDR} reached the guest's VF at {GUEST_VF_IP}");
    Ok(())
}
