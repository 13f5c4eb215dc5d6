//! Which of a pod's devices are VFs, and everything about them that restore needs.
//! This half is sysfs only (the host's view of PCI); the netdev half reads the pod's
//! network namespace over netlink.

use super::pci::{PciAddr, Sysfs};
use super::VfError;

/// What a VF is on the host side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfIdentity {
    pub addr: PciAddr,
    pub pf: PciAddr,
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
    Pf(PciAddr),
    /// A PCI NIC without SR-IOV.
    OtherPci(PciAddr),
    /// veth, bridge, loopback, tap, or a non-PCI device.
    Virtual,
}

/// Identifies a VF by PCI address; anything that is not a VF is a clear error.
pub fn identify_vf(sysfs: &Sysfs, addr: PciAddr) -> Result<VfIdentity, VfError> {
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
    let addr: PciAddr = name.parse()?;
    let dev = sysfs.device(addr)?;
    if dev.physfn().is_some() {
        return identify_vf(sysfs, addr).map(LinkKind::Vf);
    }
    Ok(if dev.is_sriov_pf() { LinkKind::Pf(addr) } else { LinkKind::OtherPci(addr) })
}
