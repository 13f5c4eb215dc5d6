//! `vfvm-lab inside hotplug-check`: VFs hot-plugged into, and unplugged from, a
//! running vfvm-vmm L3 guest (the guest image, Debian's stock kernel, its own
//! `acpiphp`) through the control API, with the agent configuring each one by the
//! guest address the API answered and the lab's peer pinging it:
//!
//! - `--cycles N` plug/unplug cycles of one VF into one VM, one of them unplugged
//!   while the peer pings the guest over it; then two VFs at once;
//! - after all that, nothing leaked: the VMM's fds, KVM memory slots, MSI GSIs and
//!   VFIO devices (its status) and the guest's PCI functions (the agent's view) are
//!   as before the first plug;
//! - bad input over the API (a function not on vfio-pci, an id in use, an unknown
//!   id, an add while paused): clear errors, the VM runs on;
//! - a second VM whose guest has ACPI hot-plug off (`acpiphp.disable=1`) never
//!   ejects: the removal is forced after its bound, and says so;
//! - the VFs end on igbvf, with their netdevs.
//!
//! Each cycle's times are printed (`hotplug: cycle ...`): API add, add to the agent
//! reporting the interface configured, API remove.

use anyhow::{bail, ensure, Context, Result};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vfvm_protocols::agent;
use vfvm_protocols::agent::AgentClient;
use vfvm_protocols::client::{connect, ConnectOptions};
use vfvm_protocols::vmm_api::{ErrorCode, Request, ResourceUsage, Response, VmState, VmmClient};

use crate::agent_check::{ctx, VmmUnderTest};
use crate::console::{die_with_parent, kill_and_reap};
use crate::host::run;
use crate::inside::{igb_pf, ping_until_answered, PEER_NETNS};
use crate::pci::PciDevice;

/// The VFs used (their index on the PF), their pinned MACs and guest addresses.
const VFS: [(u32, &str, &str); 2] = [(1, "02:00:00:00:00:41", "198.18.0.41"), (2, "02:00:00:00:00:42", "198.18.0.42")];
/// Each control API call's limit: above the longest eject wait asked for.
pub(crate) const API_CALL_LIMIT: Duration = Duration::from_secs(90);
/// The eject bound for the guest that never ejects.
const FORCED_EJECT_MS: u32 = 3_000;

struct Options {
    vmm: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    cycles: u32,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options> {
    const USAGE: &str = "usage: vfvm-lab inside hotplug-check --vmm PATH --kernel PATH --initrd PATH [--cycles N]";
    let (mut vmm, mut kernel, mut initrd, mut cycles) = (None, None, None, 20);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--vmm" => vmm = Some(PathBuf::from(value)),
            "--kernel" => kernel = Some(PathBuf::from(value)),
            "--initrd" => initrd = Some(PathBuf::from(value)),
            "--cycles" => cycles = value.parse().with_context(|| format!("--cycles {value:?}: expected a number"))?,
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    let (Some(vmm), Some(kernel), Some(initrd)) = (vmm, kernel, initrd) else { bail!("{USAGE}") };
    Ok(Options { vmm, kernel, initrd, cycles })
}

/// A lab VF on vfio-pci with its MAC pinned, for the check's length.
pub(crate) struct LabVf {
    pub dev: PciDevice,
    pub mac: &'static str,
    pub ip: &'static str,
}

pub(crate) fn prepare_vfs() -> Result<Vec<LabVf>> {
    let pf = igb_pf()?;
    let pf_if = pf.netdevs().into_iter().next().context("the igb PF has no netdev")?;
    let mut vfs = Vec::new();
    for (index, mac, ip) in VFS {
        let dev = pf.virtfn(index)?;
        run(Command::new("ip").args(["link", "set", "dev", &pf_if, "vf", &index.to_string(), "mac", mac]))?;
        // The VFIO open resets the VF, so the guest's igbvf reads the pinned MAC.
        dev.bind_by_override(Some("vfio-pci"))?;
        ensure!(dev.driver().as_deref() == Some("vfio-pci"), "VF {} did not bind to vfio-pci", dev.addr);
        vfs.push(LabVf { dev, mac, ip });
    }
    Ok(vfs)
}

/// The VFs back on the driver the kernel matches (igbvf), all of them tried.
pub(crate) fn restore_vfs(vfs: &[LabVf]) -> Result<()> {
    let mut restored = Ok(());
    for vf in vfs {
        if let Err(e) = vf.dev.bind_by_override(None) {
            restored = Err(e);
        }
    }
    restored
}

/// The VMM's resident memory and how much of it is in transparent huge pages, as
/// `smaps_rollup` says ("Rss 123456 kB, AnonHugePages 2048 kB").
fn memory_summary(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap_or_else(|| "?".into());
    format!("Rss {}, AnonHugePages {}", field("Rss:"), field("AnonHugePages:"))
}

/// The VMM's open fds.
fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd")).with_context(|| format!("listing /proc/{pid}/fd"))?.count())
}

fn status(api: &mut VmmClient) -> Result<(VmState, ResourceUsage, usize)> {
    match api.call(Request::Status)? {
        Response::Status { state, resources, devices, .. } => Ok((state, resources, devices.len())),
        other => bail!("status: {other:?}"),
    }
}

pub(crate) fn guest_pci(agent: &AgentClient) -> Result<Vec<String>> {
    Ok(agent.guest_details(ctx(), &agent::GuestDetailsRequest::new()).context("GuestDetails")?.pci_devices)
}

pub(crate) fn add(api: &mut VmmClient, id: &str, vf: &LabVf) -> Result<String> {
    let host = vf.dev.addr.parse().with_context(|| format!("{} as a PCI address", vf.dev.addr))?;
    match api.call(Request::AddVfioDevice { id: id.into(), host_pci_address: host, guest_slot: None })? {
        Response::DeviceAdded { id: got, guest_pci_address } if got == id => Ok(guest_pci_address.to_string()),
        other => bail!("add_vfio_device {id} ({}): {other:?}", vf.dev.addr),
    }
}

/// Removes `id`; whether it was forced.
pub(crate) fn remove(api: &mut VmmClient, id: &str, eject_timeout_ms: Option<u32>) -> Result<bool> {
    match api.call(Request::RemoveDevice { id: id.into(), eject_timeout_ms })? {
        Response::DeviceRemoved { id: got, forced } if got == id => Ok(forced),
        other => bail!("remove_device {id}: {other:?}"),
    }
}

/// Has the agent configure the VF at `guest` (with its pinned MAC) as `name` with its address.
pub(crate) fn configure(agent: &AgentClient, name: &str, guest: &str, vf: &LabVf) -> Result<()> {
    let mut iface = agent::Interface::new();
    iface.name = name.into();
    iface.pci_address = guest.into();
    // Both must match: the guest's igbvf has the MAC pinned on the PF.
    iface.match_mac = vf.mac.into();
    iface.addresses = vec![agent::IpAddress { cidr: format!("{}/24", vf.ip), ..Default::default() }];
    iface.wait_timeout_ms = 30_000;
    let mut req = agent::UpdateInterfaceRequest::new();
    req.interface = Some(iface).into();
    agent.update_interface(ctx(), &req).with_context(|| format!("UpdateInterface {name} at guest {guest}"))?;
    Ok(())
}

fn error_of(r: Response) -> Result<(ErrorCode, String)> {
    match r {
        Response::Error { code, message } => Ok((code, message)),
        other => bail!("expected an error, got {other:?}"),
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

pub fn hotplug_check(args: impl Iterator<Item = String>) -> Result<i32> {
    let o = parse(args)?;
    let vfs = prepare_vfs()?;
    let result = check_plug_cycles(&o, &vfs).and_then(|()| check_forced_removal(&o, &vfs[0]));
    let restored = restore_vfs(&vfs);
    result?;
    restored?;
    for vf in &vfs {
        ensure!(vf.dev.driver().as_deref() == Some("igbvf"), "VF {} is on {:?} afterwards, not igbvf", vf.dev.addr, vf.dev.driver());
        ensure!(!vf.dev.netdevs().is_empty(), "VF {} has no netdev on igbvf afterwards", vf.dev.addr);
        println!("check: VF {} is back on igbvf with netdev {}", vf.dev.addr, vf.dev.netdevs().join(","));
    }
    println!("hotplug-check: PASSED");
    Ok(0)
}

fn connect_agent(under_test: &VmmUnderTest) -> Result<AgentClient> {
    let client = connect(&under_test.agent_address(), ConnectOptions { deadline: Duration::from_secs(240), ..Default::default() })
        .context("connecting to the guest agent")?;
    client.health(ctx(), &agent::HealthRequest::new()).context("Health")?;
    println!("check: the agent answered {:.1}s after the VMM's start", under_test.started.elapsed().as_secs_f64());
    Ok(client)
}

fn check_plug_cycles(o: &Options, vfs: &[LabVf]) -> Result<()> {
    let (mut vm, _) = VmmUnderTest::start(&o.vmm, &o.kernel, &o.initrd, "console=ttyS0 panic=-1 quiet", &[], "hotplug", None)?;
    let mut api = vm.api_client(API_CALL_LIMIT)?;
    let agent = connect_agent(&vm)?;
    let pid = vm.child.id();
    let (_, resources_before, devices_before) = status(&mut api)?;
    let fds_before = fd_count(pid)?;
    // The VM's VFIO container and its KVM VFIO device stay open once the first VFIO
    // device made them (KVM allows one VFIO device per VM): fds are compared from
    // the first unplug on.
    let mut fds_after_first = None;
    let pci_before = guest_pci(&agent)?;
    println!("check: before any plug: {resources_before:?}, {fds_before} VMM fds, guest PCI {pci_before:?}");
    let thp = |name: &str| std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{name}")).unwrap_or_default();
    println!("hotplug: transparent huge pages: enabled {}, defrag {}", thp("enabled").trim(), thp("defrag").trim());

    let vf = &vfs[0];
    for cycle in 0..o.cycles {
        let memory_before = memory_summary(pid);
        let t0 = Instant::now();
        let guest = add(&mut api, "vf0", vf)?;
        let added = t0.elapsed();
        if cycle == 0 {
            // The first plug DMA-maps (pins) all guest RAM: what it costs shows here.
            println!("hotplug: the VMM's memory before the first plug: {memory_before}; after: {}", memory_summary(pid));
        }
        configure(&agent, "net0", &guest, vf)?;
        let configured = t0.elapsed();
        ensure!(guest_pci(&agent)?.contains(&guest), "cycle {cycle}: the guest does not list {guest}");
        let first_or_last = cycle == 0 || cycle + 1 == o.cycles;
        if first_or_last {
            print!("{}", ping_until_answered(Some(PEER_NETNS), vf.ip, Duration::from_secs(60), 2)?);
            println!("check: cycle {cycle}: the peer pinged the guest over hot-plugged VF {} at guest {guest}", vf.dev.addr);
        }
        // One unplug with traffic on the VF: the peer pings all along.
        let mut traffic = if cycle == 1 {
            let mut ping = Command::new("ip");
            ping.args(["netns", "exec", PEER_NETNS, "busybox", "ping", "-i", "0.2", vf.ip]).stdout(Stdio::null()).stderr(Stdio::null());
            die_with_parent(&mut ping);
            Some(ping.spawn().context("starting the peer's ping")?)
        } else {
            None
        };
        let t1 = Instant::now();
        let forced = remove(&mut api, "vf0", None);
        let removed = t1.elapsed();
        if let Some(child) = traffic.as_mut() {
            kill_and_reap(child);
        }
        ensure!(!forced?, "cycle {cycle}: the guest did not eject vf0 (the removal was forced)");
        ensure!(!guest_pci(&agent)?.contains(&guest), "cycle {cycle}: the guest still lists {guest} after the eject");
        ensure!(vf.dev.driver().as_deref() == Some("vfio-pci"), "cycle {cycle}: VF {} left vfio-pci", vf.dev.addr);
        let fds = fd_count(pid)?;
        let first = *fds_after_first.get_or_insert(fds);
        ensure!(fds == first, "cycle {cycle}: the VMM holds {fds} fds, {first} after the first unplug");
        println!(
            "hotplug: cycle {cycle}: add {} ms, add to configured {} ms, remove {} ms{}",
            ms(added),
            ms(configured),
            ms(removed),
            if traffic.is_some() { " (while the peer pinged over it)" } else { "" }
        );
    }
    println!("check: {} hot-plug/unplug cycles of VF {} into one VM", o.cycles, vf.dev.addr);

    // Two at once.
    let t0 = Instant::now();
    let guests = [add(&mut api, "vf0", &vfs[0])?, add(&mut api, "vf1", &vfs[1])?];
    for (i, (guest, vf)) in guests.iter().zip(vfs).enumerate() {
        configure(&agent, &format!("net{i}"), guest, vf)?;
    }
    println!("hotplug: two VFs: both added and configured in {} ms", ms(t0.elapsed()));
    for (guest, vf) in guests.iter().zip(vfs) {
        print!("{}", ping_until_answered(Some(PEER_NETNS), vf.ip, Duration::from_secs(60), 2)?);
        println!("check: the peer pinged the guest over VF {} at guest {guest}, beside the other", vf.dev.addr);
    }
    check_bad_input(&mut api, vfs)?;
    for id in ["vf0", "vf1"] {
        ensure!(!remove(&mut api, id, None)?, "{id}: the removal was forced");
    }
    println!("check: two VFs at once plugged, configured, pinged and unplugged");

    let (state, resources_after, devices) = status(&mut api)?;
    let fds_after = fd_count(pid)?;
    let pci_after = guest_pci(&agent)?;
    println!("check: after all plugs: {resources_after:?}, {fds_after} VMM fds, guest PCI {pci_after:?}");
    ensure!(
        state == VmState::Running && devices == devices_before,
        "the VM is {state:?} with {devices} devices, {devices_before} before the first plug"
    );
    ensure!(resources_after == resources_before, "KVM or VFIO resources leaked: {resources_before:?} before, {resources_after:?} after");
    let fds_after_first = fds_after_first.unwrap_or(fds_before);
    ensure!(
        fds_after == fds_after_first && fds_after_first <= fds_before + 2,
        "the VMM's fds: {fds_before} before the first plug, {fds_after_first} after the first unplug (the VFIO container and KVM device), {fds_after} at the end"
    );
    ensure!(pci_after == pci_before, "the guest's PCI functions went from {pci_before:?} to {pci_after:?}");
    println!(
        "check: no leak: memory slots, MSI GSIs, VFIO devices and guest PCI functions as before the first plug; VMM fds {fds_after} after every unplug ({fds_before} before the VFIO container was made)"
    );
    drop(agent);
    drop(vm);
    Ok(())
}

/// Bad requests while two VFs are in: each refused with its input named; the VM and
/// the devices stay.
fn check_bad_input(api: &mut VmmClient, vfs: &[LabVf]) -> Result<()> {
    let pf = igb_pf()?;
    let pf_addr = pf.addr.parse().with_context(|| format!("{} as a PCI address", pf.addr))?;
    let (code, message) = error_of(api.call(Request::AddVfioDevice { id: "pf".into(), host_pci_address: pf_addr, guest_slot: None })?)?;
    ensure!(code == ErrorCode::BadRequest && message.contains("bound to igb, not vfio-pci"), "the PF: {code:?} {message}");
    println!("check: adding the PF (on igb) is refused: {message}");
    let host = vfs[1].dev.addr.parse()?;
    let (code, message) = error_of(api.call(Request::AddVfioDevice { id: "vf0".into(), host_pci_address: host, guest_slot: None })?)?;
    ensure!(code == ErrorCode::BadRequest && message.contains("already in use"), "an id in use: {code:?} {message}");
    println!("check: an id in use is refused: {message}");
    let (code, message) = error_of(api.call(Request::RemoveDevice { id: "vf7".into(), eject_timeout_ms: None })?)?;
    ensure!(code == ErrorCode::BadRequest && message.contains("no device \"vf7\""), "an unknown id: {code:?} {message}");
    println!("check: removing an unknown id is refused: {message}");
    let (code, message) = error_of(api.call(Request::RemoveDevice { id: "vsock".into(), eject_timeout_ms: None })?)?;
    ensure!(code == ErrorCode::BadRequest && message.contains("cannot be unplugged"), "the vsock device: {code:?} {message}");
    println!("check: removing the VMM's own vsock device is refused: {message}");
    ensure!(api.call(Request::Pause)? == Response::Done, "pause");
    let (code, message) = error_of(api.call(Request::AddVfioDevice { id: "vf9".into(), host_pci_address: host, guest_slot: None })?)?;
    ensure!(api.call(Request::Resume)? == Response::Done, "resume");
    ensure!(code == ErrorCode::InvalidState && message.contains("Paused"), "an add while paused: {code:?} {message}");
    println!("check: an add while paused is refused: {message}");
    let (state, _, devices) = status(api)?;
    ensure!(state == VmState::Running && devices == 3, "after the bad input: {state:?} with {devices} devices");
    println!("check: after the bad input the VM runs with its devices");
    Ok(())
}

/// A guest with ACPI hot-plug off: the device is plugged (the guest never scans it)
/// and its removal is forced once the bound passes; the VF is released.
fn check_forced_removal(o: &Options, vf: &LabVf) -> Result<()> {
    let (mut vm, _) =
        VmmUnderTest::start(&o.vmm, &o.kernel, &o.initrd, "console=ttyS0 panic=-1 quiet acpiphp.disable=1", &[], "hotplug-noeject", None)?;
    let mut api = vm.api_client(API_CALL_LIMIT)?;
    let _agent = connect_agent(&vm)?;
    let (_, before, devices_before) = status(&mut api)?;
    add(&mut api, "vf0", vf)?;
    let t0 = Instant::now();
    let forced = remove(&mut api, "vf0", Some(FORCED_EJECT_MS))?;
    let waited = t0.elapsed();
    ensure!(forced, "a guest without acpiphp ejected vf0");
    ensure!(waited >= Duration::from_millis(u64::from(FORCED_EJECT_MS)), "forced after {} ms, before the bound", ms(waited));
    let (state, after, devices) = status(&mut api)?;
    ensure!(
        state == VmState::Running && devices == devices_before && after == before,
        "after the forced removal: {state:?}, {devices} devices, {after:?} (before: {devices_before} devices, {before:?})"
    );
    ensure!(vf.dev.driver().as_deref() == Some("vfio-pci"), "VF {} left vfio-pci", vf.dev.addr);
    println!("check: a guest that never ejects (acpiphp.disable=1): removal forced after {} ms, the VF released", ms(waited));
    drop(vm);
    Ok(())
}
