//! A pod's SR-IOV VFs as network endpoints of its sandbox (cold-plugged).
//!
//! Attach, before the VM starts: the VF netdevs CNI (sriov-cni) put in the pod's
//! network namespace are found and each is prepared by the VF manager (locked,
//! journaled under the sandbox's state, admin MAC pinned on the PF, rebound to
//! vfio-pci, its IOMMU group checked); the VMM gets one `--vfio` per VF. After boot
//! the VMM's status says where each VF sits on the guest's bus, and the agent gets
//! each VF's pod-netns config (name, MAC, MTU, addresses, routes) by that address,
//! plus the host-to-guest address map it rewrites `PCIDEVICE_*` env values with.
//!
//! Detach is [`crate::record::undo`]'s, after the VMM is gone: the VF manager's
//! journal gives every VF back exactly as it came, in the pod netns under its CNI
//! name, before CNI DEL runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use vfvm_protocols::agent as api;
use vfvm_protocols::vmm_api::DeviceInfo;
use vfvm_protocols::PciAddress;

use crate::vf::discover::discover;
use crate::vf::journal::{NetdevRecord, VfRecord};
use crate::vf::lock::VfLock;
use crate::vf::{Sysfs, VfError, VfManager};

#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    #[error("pod annotation io.katacontainers.config.runtime.enable_sriov is on, but the pod has no network namespace to find its VFs in: nothing was changed on the host")]
    NoNetns,
    #[error("pod annotation io.katacontainers.config.runtime.enable_sriov is on, but the pod's network namespace {} holds no VF netdev (its links: {links}): nothing was changed on the host (a VF the device plugin hands over on vfio-pci, for DPDK, has no netdev there: passing such a VF through is not supported yet)", netns.display())]
    NoVf { netns: PathBuf, links: String },
    #[error("VF {addr} has no netdev (it is on vfio-pci already, as a DPDK allocation leaves it): passing such a VF through is not supported yet")]
    NoNetdev { addr: PciAddress },
    #[error("the pod has {0} VFs; at most {MAX_VFS} are passed through")]
    TooMany(usize),
    #[error(transparent)]
    Vf(#[from] VfError),
    #[error("VF {addr} (vmm id {id}): the VMM's status does not list it")]
    NotInVmm { addr: PciAddress, id: String },
}

/// More VFs than a pod could use; the guest's bus has 31 slots.
pub const MAX_VFS: usize = 8;

/// One VF of the pod, prepared and passed to the VMM under `vmm_id`.
pub struct VfEndpoint {
    pub record: VfRecord,
    pub vmm_id: String,
    /// Held while the sandbox owns the VF; released after it is given back.
    pub lock: VfLock,
}

impl VfEndpoint {
    pub fn host(&self) -> PciAddress {
        self.record.vf.addr
    }

    fn netdev(&self) -> &NetdevRecord {
        self.record.netdev.as_ref().expect("attach keeps only VFs with a netdev")
    }
}

/// The names of the links in `netns`, for an error that says what was looked at.
fn link_names(netns: &Path) -> String {
    let names = vfvm_netlink::Netns::open(netns)
        .and_then(|ns| vfvm_netlink::Handle::in_netns(&ns))
        .and_then(|h| h.links())
        .map(|links| links.into_iter().map(|l| l.name).collect::<Vec<_>>().join(", "));
    names.unwrap_or_else(|e| format!("unreadable: {e}"))
}

/// Finds the pod's VFs in `netns` and prepares each (blocking: sysfs and netlink),
/// adding it to `prepared`. On error every VF prepared so far is in `prepared` (its
/// lock held) and journaled under `journal_dir`, for the caller's undo to give back.
pub fn attach(
    sandbox_id: &str,
    netns: Option<&Path>,
    journal_dir: &Path,
    lock_dir: &Path,
    cni_cache_dir: &Path,
    prepared: &mut Vec<VfEndpoint>,
) -> Result<(), SriovError> {
    let netns = netns.ok_or(SriovError::NoNetns)?;
    let sysfs = Sysfs::default();
    // The pod's VFs are the netdevs CNI moved in; the device plugin's PCIDEVICE_*
    // values are on the application containers, which come later.
    let records = discover(&sysfs, netns, &[], cni_cache_dir, sandbox_id)?;
    if records.is_empty() {
        return Err(SriovError::NoVf { netns: netns.to_path_buf(), links: link_names(netns) });
    }
    if records.len() > MAX_VFS {
        return Err(SriovError::TooMany(records.len()));
    }
    if let Some(r) = records.iter().find(|r| r.netdev.is_none()) {
        return Err(SriovError::NoNetdev { addr: r.vf.addr });
    }
    let manager = VfManager::new(sandbox_id, journal_dir, lock_dir);
    for (i, record) in records.into_iter().enumerate() {
        let vf = manager.prepare(&record)?;
        tracing::info!(
            sandbox = sandbox_id, vf = %record.vf.addr, group = %vf.iommu_group,
            "VF {} on vfio-pci for the VM", record.netdev.as_ref().map(|n| n.name.as_str()).unwrap_or_default()
        );
        prepared.push(VfEndpoint { record, vmm_id: format!("vf{i}"), lock: vf.lock });
    }
    Ok(())
}

/// The VMM's `--vfio` arguments.
pub fn vmm_args(endpoints: &[VfEndpoint]) -> Vec<String> {
    endpoints.iter().flat_map(|e| ["--vfio".to_string(), format!("{},id={}", e.host(), e.vmm_id)]).collect()
}

/// What the agent gets for the pod's VFs, once the VMM has placed them.
pub struct GuestConfig {
    /// Host PCI address -> guest PCI address (CreateSandbox's `PCIDEVICE_*` map).
    pub address_map: HashMap<String, String>,
    pub interfaces: Vec<api::Interface>,
    pub routes: Vec<api::Route>,
}

fn scope_name(scope: u8) -> &'static str {
    // rtnetlink's RT_SCOPE_* values.
    match scope {
        253 => "link",
        254 => "host",
        _ => "universe",
    }
}

/// A pod interface's configuration as CNI left it, for the guest interface of the
/// same name (the caller says how the agent finds the device): its MAC, MTU and
/// addresses, and its main-table routes (the kernel's own come back with the
/// addresses).
pub fn guest_interface(n: &NetdevRecord) -> (api::Interface, Vec<api::Route>) {
    let mut iface = api::Interface::new();
    iface.name = n.name.clone();
    iface.mac = n.mac.clone();
    iface.mtu = n.mtu;
    iface.addresses = n.addrs.iter().map(|a| api::IpAddress { cidr: format!("{}/{}", a.addr, a.prefix), ..Default::default() }).collect();
    let mut routes = Vec::new();
    for r in n.routes.iter().filter(|r| r.table == 254) {
        let mut route = api::Route::new();
        route.dest = if r.prefix == 0 { "default".into() } else { format!("{}/{}", r.dst, r.prefix) };
        route.gateway = r.gateway.clone().unwrap_or_default();
        route.device = n.name.clone();
        route.scope = scope_name(r.scope).into();
        route.metric = r.metric.unwrap_or(0);
        routes.push(route);
    }
    (iface, routes)
}

/// Each VF's pod-netns config, addressed by the guest PCI address the VMM's status
/// (`devices`) gives it.
pub fn guest_config(endpoints: &[VfEndpoint], devices: &[DeviceInfo], wait_timeout_ms: u32) -> Result<GuestConfig, SriovError> {
    let mut out = GuestConfig { address_map: HashMap::new(), interfaces: Vec::new(), routes: Vec::new() };
    for e in endpoints {
        let guest = devices
            .iter()
            .find(|d| d.id == e.vmm_id && d.host_pci_address == Some(e.host()))
            .map(|d| d.guest_pci_address)
            .ok_or_else(|| SriovError::NotInVmm { addr: e.host(), id: e.vmm_id.clone() })?;
        out.address_map.insert(e.host().to_string(), guest.to_string());
        let (mut iface, mut routes) = guest_interface(e.netdev());
        iface.pci_address = guest.to_string();
        iface.wait_timeout_ms = wait_timeout_ms;
        out.interfaces.push(iface);
        out.routes.append(&mut routes);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vf::discover::VfIdentity;
    use crate::vf::journal::{AddrRecord, RouteRecord, JOURNAL_VERSION};

    fn endpoint(addr: &str, name: &str, vmm_id: &str, locks: &Path) -> VfEndpoint {
        let addr: PciAddress = addr.parse().unwrap();
        let route = |dst: &str, prefix, gateway: Option<&str>, table, scope| RouteRecord {
            dst: dst.into(),
            prefix,
            gateway: gateway.map(Into::into),
            metric: Some(5),
            prefsrc: None,
            table,
            scope,
            protocol: 3,
            onlink: false,
        };
        let record = VfRecord {
            version: JOURNAL_VERSION,
            sandbox_id: "sb".into(),
            vf: VfIdentity {
                addr,
                pf: "0000:01:00.0".parse().unwrap(),
                vf_index: 3,
                vendor_device: "8086:10ca".into(),
                driver: Some("igbvf".into()),
                driver_override: None,
                pf_netdev: Some("eth0".into()),
            },
            netns: Some("/run/netns/pod".into()),
            netdev: Some(NetdevRecord {
                name: name.into(),
                altnames: Vec::new(),
                mac: "02:00:00:00:10:29".into(),
                mtu: 1400,
                up: true,
                addrs: vec![AddrRecord { addr: "198.18.0.41".into(), prefix: 24, flags: 0, route_metric: None }],
                routes: vec![
                    route("0.0.0.0", 0, Some("198.18.0.1"), 254, 0),
                    route("198.19.41.0", 24, Some("198.18.0.254"), 254, 0),
                    route("198.19.42.0", 24, None, 254, 253),
                    route("10.0.0.0", 8, Some("198.18.0.1"), 100, 0),
                ],
                neighbours: Vec::new(),
            }),
            pf_settings: None,
        };
        VfEndpoint { record, vmm_id: vmm_id.into(), lock: VfLock::acquire(locks, addr, "sb").unwrap() }
    }

    fn device(id: &str, guest: &str, host: &str) -> DeviceInfo {
        DeviceInfo {
            id: id.into(),
            kind: "vfio".into(),
            guest_pci_address: guest.parse().unwrap(),
            host_pci_address: Some(host.parse().unwrap()),
        }
    }

    #[test]
    fn each_vf_gets_its_pod_config_at_the_guest_address_the_vmm_gave_it() {
        let locks = std::env::temp_dir().join(format!("vfvm-sriov-test-{}", std::process::id()));
        let eps = [endpoint("0000:01:10.6", "net1", "vf0", &locks)];
        assert_eq!(vmm_args(&eps), ["--vfio", "0000:01:10.6,id=vf0"]);
        let devices = [device("vsock", "0000:00:01.0", "0000:99:00.0"), device("vf0", "0000:00:03.0", "0000:01:10.6")];
        let g = guest_config(&eps, &devices, 30_000).unwrap();
        assert_eq!(g.address_map, HashMap::from([("0000:01:10.6".to_string(), "0000:00:03.0".to_string())]));
        let i = &g.interfaces[0];
        assert_eq!(
            (i.name.as_str(), i.pci_address.as_str(), i.mac.as_str(), i.mtu, i.wait_timeout_ms),
            ("net1", "0000:00:03.0", "02:00:00:00:10:29", 1400, 30_000)
        );
        assert_eq!(i.addresses.iter().map(|a| a.cidr.as_str()).collect::<Vec<_>>(), ["198.18.0.41/24"]);
        // Main-table routes only, each through the VF's guest name.
        let routes: Vec<_> =
            g.routes.iter().map(|r| (r.dest.as_str(), r.gateway.as_str(), r.device.as_str(), r.scope.as_str(), r.metric)).collect();
        assert_eq!(
            routes,
            [
                ("default", "198.18.0.1", "net1", "universe", 5),
                ("198.19.41.0/24", "198.18.0.254", "net1", "universe", 5),
                ("198.19.42.0/24", "", "net1", "link", 5)
            ]
        );
        // A VF the VMM does not list (or lists for another host device) is an error naming it.
        let wrong = [device("vf0", "0000:00:03.0", "0000:01:10.4")];
        let e = guest_config(&eps, &wrong, 0).err().unwrap();
        assert_eq!(e.to_string(), "VF 0000:01:10.6 (vmm id vf0): the VMM's status does not list it");
        let _ = std::fs::remove_dir_all(&locks);
    }

    #[test]
    fn no_netns_is_refused_before_anything_is_touched() {
        let dir = std::env::temp_dir().join(format!("vfvm-sriov-nonetns-{}", std::process::id()));
        let mut prepared = Vec::new();
        let e = attach("sb", None, &dir.join("vf"), &dir.join("locks"), &dir.join("cni"), &mut prepared).err().unwrap();
        assert!(matches!(e, SriovError::NoNetns), "{e}");
        assert!(!dir.exists(), "nothing created");
    }
}
