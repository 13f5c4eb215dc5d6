//! PCI devices through sysfs, under a configurable root so tests can use a fake tree.
//!
//! Reads (drivers, groups, SR-IOV links) are plain file reads. Writes that make the
//! kernel act (unbind, bind, probe, driver_override) go through [`DriverControl`], so
//! the fake-tree tests can stand in for the kernel's side of those writes; the lab
//! runs the same code against real sysfs.

use std::path::{Path, PathBuf};

pub use vfvm_protocols::PciAddress;

use super::VfError;

/// The sysfs tree: `/sys` in production, a temporary directory in tests.
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> VfError {
    let path = path.to_path_buf();
    move |source| VfError::Sysfs { op, path, source }
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new("/sys")
    }
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn device_dir(&self, addr: PciAddress) -> PathBuf {
        self.root.join("bus/pci/devices").join(addr.to_string())
    }

    pub fn driver_dir(&self, driver: &str) -> PathBuf {
        self.root.join("bus/pci/drivers").join(driver)
    }

    pub fn drivers_probe(&self) -> PathBuf {
        self.root.join("bus/pci/drivers_probe")
    }

    pub fn iommu_group_dir(&self, group: &str) -> PathBuf {
        self.root.join("kernel/iommu_groups").join(group).join("devices")
    }

    /// The net class directory: which netdevs of the host's network namespace exist.
    pub fn class_net(&self) -> PathBuf {
        self.root.join("class/net")
    }

    /// The device, if it exists.
    pub fn device(&self, addr: PciAddress) -> Result<PciDevice, VfError> {
        let dir = self.device_dir(addr);
        if !dir.is_dir() {
            return Err(VfError::NoSuchDevice { addr });
        }
        Ok(PciDevice { addr, dir })
    }
}

/// The last path component a sysfs symlink points to (`driver` -> `igbvf`).
fn link_target_name(path: &Path) -> Option<String> {
    std::fs::read_link(path).ok()?.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// One PCI device's sysfs directory.
#[derive(Clone, Debug)]
pub struct PciDevice {
    pub addr: PciAddress,
    dir: PathBuf,
}

impl PciDevice {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_attr(&self, name: &str) -> Result<String, VfError> {
        let path = self.dir.join(name);
        std::fs::read_to_string(&path).map(|s| s.trim().to_string()).map_err(io_err(&path, "read"))
    }

    /// `vendor:device` in lower-case hex without `0x`, e.g. `8086:10ca`.
    pub fn vendor_device(&self) -> Result<String, VfError> {
        let v = self.read_attr("vendor")?;
        let d = self.read_attr("device")?;
        Ok(format!("{}:{}", v.trim_start_matches("0x"), d.trim_start_matches("0x")))
    }

    /// The bound driver's name, if any.
    pub fn driver(&self) -> Option<String> {
        link_target_name(&self.dir.join("driver"))
    }

    /// `driver_override`, with the kernel's "(null)" (and an empty file) read as none.
    pub fn driver_override(&self) -> Result<Option<String>, VfError> {
        let value = self.read_attr("driver_override")?;
        Ok(if value.is_empty() || value == "(null)" { None } else { Some(value) })
    }

    pub fn iommu_group(&self) -> Option<String> {
        link_target_name(&self.dir.join("iommu_group"))
    }

    /// The physical function of this VF; `None` for anything that is not a VF.
    pub fn physfn(&self) -> Option<PciAddress> {
        link_target_name(&self.dir.join("physfn"))?.parse().ok()
    }

    /// Whether this device can have VFs (an SR-IOV PF).
    pub fn is_sriov_pf(&self) -> bool {
        self.dir.join("sriov_totalvfs").exists()
    }

    /// The index of `vf` among this PF's `virtfnN` links.
    pub fn vf_index_of(&self, vf: PciAddress) -> Result<u32, VfError> {
        let entries = std::fs::read_dir(&self.dir).map_err(io_err(&self.dir, "list"))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("virtfn").and_then(|n| n.parse::<u32>().ok()) else { continue };
            if link_target_name(&entry.path()).and_then(|t| t.parse::<PciAddress>().ok()) == Some(vf) {
                return Ok(n);
            }
        }
        Err(VfError::NotAVf { addr: vf, reason: format!("no virtfnN link of PF {} points to it", self.addr) })
    }

    /// Netdevs of this device visible in the host's network namespace.
    pub fn host_netdevs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.join("net"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// The writes to sysfs that make the kernel bind and unbind drivers.
pub trait DriverControl {
    fn unbind(&self, sysfs: &Sysfs, addr: PciAddress, driver: &str) -> Result<(), VfError>;
    fn set_driver_override(&self, sysfs: &Sysfs, addr: PciAddress, driver: Option<&str>) -> Result<(), VfError>;
    /// Asks the kernel to bind whatever driver matches (honouring driver_override).
    fn probe(&self, sysfs: &Sysfs, addr: PciAddress) -> Result<(), VfError>;
    /// Binds a specific driver (which must match the device).
    fn bind(&self, sysfs: &Sysfs, addr: PciAddress, driver: &str) -> Result<(), VfError>;
}

/// The real kernel, through sysfs files.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelDrivers;

fn write(path: &Path, value: &str) -> Result<(), VfError> {
    std::fs::write(path, value).map_err(io_err(path, "write"))
}

impl DriverControl for KernelDrivers {
    fn unbind(&self, sysfs: &Sysfs, addr: PciAddress, driver: &str) -> Result<(), VfError> {
        write(&sysfs.driver_dir(driver).join("unbind"), &addr.to_string())
    }

    fn set_driver_override(&self, sysfs: &Sysfs, addr: PciAddress, driver: Option<&str>) -> Result<(), VfError> {
        // A newline clears the override; some kernels reject an empty write.
        write(&sysfs.device_dir(addr).join("driver_override"), &format!("{}\n", driver.unwrap_or("")))
    }

    fn probe(&self, sysfs: &Sysfs, addr: PciAddress) -> Result<(), VfError> {
        write(&sysfs.drivers_probe(), &addr.to_string())
    }

    fn bind(&self, sysfs: &Sysfs, addr: PciAddress, driver: &str) -> Result<(), VfError> {
        write(&sysfs.driver_dir(driver).join("bind"), &addr.to_string())
    }
}

/// Drivers that leave a group usable by VFIO: vfio-pci itself, and the drivers the
/// kernel lets share a group with it because they do no DMA of their own
/// (`driver_managed_dma`): pci-stub, and pcieport on the PCIe ports a group takes in
/// when a port lacks ACS.
const VFIO_FRIENDLY: &[&str] = &["vfio-pci", "pci-stub", "pcieport"];

/// Checks that every device in the group is bound to a VFIO-friendly driver or to
/// none, as VFIO requires before the group can be used. Names the first offender.
pub fn check_group_viable(sysfs: &Sysfs, group: &str, for_device: PciAddress) -> Result<(), VfError> {
    check_members(sysfs, group, for_device, None)
}

/// [`check_group_viable`] for the group's other members only: whether the group can
/// become viable once `for_device` itself is on vfio-pci. Changes nothing, so a group
/// that never can is refused before the VF is touched.
pub fn check_other_members_viable(sysfs: &Sysfs, group: &str, for_device: PciAddress) -> Result<(), VfError> {
    check_members(sysfs, group, for_device, Some(for_device))
}

fn check_members(sysfs: &Sysfs, group: &str, for_device: PciAddress, skip: Option<PciAddress>) -> Result<(), VfError> {
    let dir = sysfs.iommu_group_dir(group);
    let entries = std::fs::read_dir(&dir).map_err(io_err(&dir, "list"))?;
    let mut members: Vec<String> = entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    members.sort();
    for member in members {
        let Ok(addr) = member.parse::<PciAddress>() else { continue };
        if Some(addr) == skip {
            continue;
        }
        let dev = sysfs.device(addr)?;
        if let Some(driver) = dev.driver() {
            if !VFIO_FRIENDLY.contains(&driver.as_str()) {
                return Err(VfError::GroupNotViable { group: group.to_string(), addr: for_device, offender: addr, driver });
            }
        }
    }
    Ok(())
}
