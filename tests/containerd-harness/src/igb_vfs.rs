//! The lab's SR-IOV NIC (an igb PF and its igbvf VFs) as tests use it: finding a VF
//! and its netdev, and giving a VF the pod's MAC the way sriov-cni does (pinned on the
//! PF first, as a VF driver may not change a MAC the PF set).
//!
//! igb does not reset a VF when the PF pins its MAC, and until the VF resets, igbvf
//! refuses any MAC of its own (EADDRNOTAVAIL) and keeps the old one. Bringing an
//! igbvf netdev down resets it (`igbvf_down` calls `igbvf_reset`), which fetches the
//! pinned MAC from the PF; so a pin is followed by up and down. A pin stays after
//! the test: igb reports no pin, so a VF restored by value stays pinned; a zero MAC
//! unpins ([`unpin_vf_mac`]).

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::Command;

fn pci_device(addr: &str) -> std::path::PathBuf {
    Path::new("/sys/bus/pci/devices").join(addr)
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// The PCI address of the first function bound to igb (the lab's PF), if any.
pub fn igb_pf() -> Option<String> {
    std::fs::read_dir("/sys/bus/pci/drivers/igb")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| file_name(&e.path()))
        .find(|n| n.starts_with("0000:"))
}

/// The first netdev of PCI function `addr` in this netns, if it has one here.
pub fn netdev_of(addr: &str) -> Option<String> {
    Some(file_name(&std::fs::read_dir(pci_device(addr).join("net")).ok()?.filter_map(Result::ok).next()?.path()))
}

/// The driver PCI function `addr` is bound to, if any.
pub fn driver_of(addr: &str) -> Option<String> {
    std::fs::read_link(pci_device(addr).join("driver")).ok().map(|l| file_name(&l))
}

/// The lab's igb PF and its VF `index`.
#[derive(Debug, Clone)]
pub struct IgbVf {
    /// The PF's netdev (where VF settings are made).
    pub pf_netdev: String,
    /// The VF's index on the PF.
    pub index: u32,
    /// The VF's PCI address.
    pub pci: String,
}

impl IgbVf {
    /// VF `index` of the lab's igb PF.
    pub fn find(index: u32) -> Result<IgbVf> {
        let pf = igb_pf().context("no function bound to igb: this runs inside the lab")?;
        let pf_netdev = netdev_of(&pf).with_context(|| format!("igb PF {pf} has no netdev"))?;
        let vf =
            std::fs::read_link(pci_device(&pf).join(format!("virtfn{index}"))).with_context(|| format!("igb PF {pf} has no VF {index}"))?;
        Ok(IgbVf { pf_netdev, index, pci: file_name(&vf) })
    }

    /// The VF's netdev in this netns, if it has one here.
    pub fn netdev(&self) -> Option<String> {
        netdev_of(&self.pci)
    }

    /// Pins `mac` on the PF for this VF and makes the VF's netdev (in this netns)
    /// take it; fails if it does not show it afterwards. Leaves the netdev down.
    pub fn pin_mac(&self, mac: &str) -> Result<()> {
        let netdev = self.netdev().with_context(|| format!("VF {} has no netdev in this netns", self.pci))?;
        ip(&["link", "set", "dev", &self.pf_netdev, "vf", &self.index.to_string(), "mac", mac])?;
        ip(&["link", "set", "dev", &netdev, "up"])?;
        ip(&["link", "set", "dev", &netdev, "down"])?;
        let shown = std::fs::read_to_string(pci_device(&self.pci).join("net").join(&netdev).join("address"))?;
        ensure!(
            shown.trim().eq_ignore_ascii_case(mac),
            "VF {} ({netdev}) shows MAC {} after the PF pinned {mac} and a reset",
            self.pci,
            shown.trim()
        );
        Ok(())
    }

    /// Clears the PF's pin of this VF's MAC (a zero MAC unpins on igb).
    pub fn unpin_mac(&self) -> Result<()> {
        unpin_vf_mac(&self.pf_netdev, self.index)
    }
}

/// Clears the PF `pf_netdev`'s pin of VF `index`'s MAC.
pub fn unpin_vf_mac(pf_netdev: &str, index: u32) -> Result<()> {
    ip(&["link", "set", "dev", pf_netdev, "vf", &index.to_string(), "mac", "00:00:00:00:00:00"]).map(drop)
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
