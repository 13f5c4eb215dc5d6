//! Which of a pod's devices are VFs, and everything about them that restore needs.
//! This half is sysfs only (the host's view of PCI); the netdev half reads the pod's
//! network namespace over netlink.

use std::path::Path;

use vfvm_netlink::{Handle, Netns};

use super::cni_cache;
use super::journal::{VfRecord, JOURNAL_VERSION};
use super::net::{capture_netdev, pf_settings};
use super::pci::{PciAddress, Sysfs};
use super::spec::allocations;
use super::VfError;

/// What a VF is on the host side.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VfIdentity {
    pub addr: PciAddress,
    pub pf: PciAddress,
    pub vf_index: u32,
    pub vendor_device: String,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    /// The PF's netdev in the host's network namespace, if it has one there.
    pub pf_netdev: Option<String>,
}

/// What a netdev in a pod's netns is, judged by its parent device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Vf(VfIdentity),
    /// An SR-IOV PF moved into the pod: not ours to pass through.
    Pf(PciAddress),
    /// A PCI NIC without SR-IOV.
    OtherPci(PciAddress),
    /// veth, bridge, loopback, tap, or a non-PCI device.
    Virtual,
}

/// Identifies a VF by PCI address; anything that is not a VF is a clear error.
pub fn identify_vf(sysfs: &Sysfs, addr: PciAddress) -> Result<VfIdentity, VfError> {
    let dev = sysfs.device(addr)?;
    let Some(pf) = dev.physfn() else {
        let reason = if dev.is_sriov_pf() { "it is an SR-IOV PF, not a VF" } else { "it has no physfn link" };
        return Err(VfError::NotAVf { addr, reason: reason.into() });
    };
    let pf_dev = sysfs.device(pf)?;
    Ok(VfIdentity {
        addr,
        pf,
        vf_index: pf_dev.vf_index_of(addr)?,
        vendor_device: dev.vendor_device()?,
        driver: dev.driver(),
        driver_override: dev.driver_override()?,
        pf_netdev: pf_dev.host_netdevs().into_iter().next(),
    })
}

/// Classifies a netdev by the parent device netlink reports for it (bus and name).
pub fn classify(sysfs: &Sysfs, parent_bus: Option<&str>, parent_name: Option<&str>) -> Result<LinkKind, VfError> {
    let (Some("pci"), Some(name)) = (parent_bus, parent_name) else { return Ok(LinkKind::Virtual) };
    let addr: PciAddress = name.parse()?;
    let dev = sysfs.device(addr)?;
    if dev.physfn().is_some() {
        return identify_vf(sysfs, addr).map(LinkKind::Vf);
    }
    Ok(if dev.is_sriov_pf() { LinkKind::Pf(addr) } else { LinkKind::OtherPci(addr) })
}

/// A pod's VFs, each with everything `restore` needs: the VF netdevs in `netns`
/// (what CNI attached), then the VFs the device plugin allocated by env var that are
/// not among them (DPDK-style VFs on vfio-pci, or VFs whose netdev is in the host's
/// netns). Reads only; changes nothing.
pub fn discover(sysfs: &Sysfs, netns: &Path, env: &[String], cni_cache_dir: &Path, sandbox_id: &str) -> Result<Vec<VfRecord>, VfError> {
    let allocated = allocations(env)?;
    let pod_ns = Netns::open(netns)?;
    let pod = Handle::in_netns(&pod_ns)?;
    let host = Handle::new()?;
    let mut records: Vec<VfRecord> = Vec::new();
    for link in pod.links()? {
        let LinkKind::Vf(id) = classify(sysfs, link.parent_bus.as_deref(), link.parent_dev.as_deref())? else { continue };
        let netdev = capture_netdev(&pod, &link)?;
        match cni_cache::attachment_for(cni_cache_dir, id.addr) {
            Some(a) if a.container_ifname == netdev.name && a.vf_index == id.vf_index => {
                tracing::debug!(sandbox = sandbox_id, vf = %id.addr, "sriov-cni's cache confirms {} as VF {}", netdev.name, id.vf_index)
            }
            Some(a) => tracing::warn!(
                sandbox = sandbox_id, vf = %id.addr,
                "sriov-cni's cache says VF {} named {}, found VF {} named {}", a.vf_index, a.container_ifname, id.vf_index, netdev.name
            ),
            None => tracing::debug!(sandbox = sandbox_id, vf = %id.addr, "no sriov-cni cache entry"),
        }
        records.push(record(&host, id, Some(netns), Some(netdev), sandbox_id));
    }
    for addr in allocated.iter().flat_map(|a| a.addrs.iter().copied()) {
        if records.iter().any(|r| r.vf.addr == addr) {
            continue;
        }
        let id = identify_vf(sysfs, addr)?;
        let host_link = host.links()?.into_iter().find(|l| l.parent_dev.as_deref() == Some(addr.to_string().as_str()));
        let netdev = host_link.map(|l| capture_netdev(&host, &l)).transpose()?;
        records.push(record(&host, id, None, netdev, sandbox_id));
    }
    Ok(records)
}

fn record(host: &Handle, id: VfIdentity, netns: Option<&Path>, netdev: Option<super::journal::NetdevRecord>, sandbox_id: &str) -> VfRecord {
    // Not every PF driver reports VF settings; without them there is nothing to restore.
    let pf_settings = id.pf_netdev.as_deref().and_then(|pf| match pf_settings(host, pf, id.vf_index) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(sandbox = sandbox_id, vf = %id.addr, "PF {pf} reports no settings for VF {}: {e}", id.vf_index);
            None
        }
    });
    VfRecord {
        version: JOURNAL_VERSION,
        sandbox_id: sandbox_id.to_string(),
        vf: id,
        netns: netns.map(Path::to_path_buf),
        netdev,
        pf_settings,
    }
}
