//! PCI devices through sysfs, under a configurable root so tests can use a fake tree.
//!
//! Reads (drivers, groups, SR-IOV links) are plain file reads. Writes that make the
//! kernel act (unbind, bind, probe, driver_override) go through [`DriverControl`], so
//! the fake-tree tests can stand in for the kernel's side of those writes; the lab
//! runs the same code against real sysfs.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::VfError;

/// A PCI address, `DDDD:BB:DD.F`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PciAddr {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl FromStr for PciAddr {
    type Err = VfError;

    /// Accepts `DDDD:BB:DD.F` and the domain-less `BB:DD.F` (domain 0), hex, any case.
    fn from_str(input: &str) -> Result<Self, VfError> {
        let bad = |reason: &str| VfError::InvalidPciAddress { input: input.to_string(), reason: reason.to_string() };
        let parts: Vec<&str> = input.split(':').collect();
        let (domain, bus, rest) = match parts.as_slice() {
            [d, b, r] => (*d, *b, *r),
            [b, r] => ("0", *b, *r),
            _ => return Err(bad("expected DDDD:BB:DD.F")),
        };
        let (device, function) = rest.split_once('.').ok_or_else(|| bad("expected DDDD:BB:DD.F"))?;
        let hex = |s: &str, max_len: usize, what: &str| -> Result<u32, VfError> {
            if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(&format!("{what} must be 1 to {max_len} hex digits")));
            }
            u32::from_str_radix(s, 16).map_err(|_| bad(what))
        };
        let domain = hex(domain, 8, "domain")?;
        let bus = hex(bus, 2, "bus")? as u8;
        let device = hex(device, 2, "device")?;
        let function = hex(function, 1, "function")?;
        if device > 0x1f {
            return Err(bad("device must be at most 1f"));
        }
        if function > 7 {
            return Err(bad("function must be at most 7"));
        }
        Ok(Self { domain, bus, device: device as u8, function: function as u8 })
    }
}

impl TryFrom<String> for PciAddr {
    type Error = VfError;
    fn try_from(s: String) -> Result<Self, VfError> {
        s.parse()
    }
}

impl From<PciAddr> for String {
    fn from(a: PciAddr) -> String {
        a.to_string()
    }
}

impl fmt::Display for PciAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

impl fmt::Debug for PciAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

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

    pub fn device_dir(&self, addr: PciAddr) -> PathBuf {
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
    pub fn device(&self, addr: PciAddr) -> Result<PciDevice, VfError> {
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
    pub addr: PciAddr,
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
    pub fn physfn(&self) -> Option<PciAddr> {
        link_target_name(&self.dir.join("physfn"))?.parse().ok()
    }

    /// Whether this device can have VFs (an SR-IOV PF).
    pub fn is_sriov_pf(&self) -> bool {
        self.dir.join("sriov_totalvfs").exists()
    }

    /// The index of `vf` among this PF's `virtfnN` links.
    pub fn vf_index_of(&self, vf: PciAddr) -> Result<u32, VfError> {
        let entries = std::fs::read_dir(&self.dir).map_err(io_err(&self.dir, "list"))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("virtfn").and_then(|n| n.parse::<u32>().ok()) else { continue };
            if link_target_name(&entry.path()).and_then(|t| t.parse::<PciAddr>().ok()) == Some(vf) {
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
    fn unbind(&self, sysfs: &Sysfs, addr: PciAddr, driver: &str) -> Result<(), VfError>;
    fn set_driver_override(&self, sysfs: &Sysfs, addr: PciAddr, driver: Option<&str>) -> Result<(), VfError>;
    /// Asks the kernel to bind whatever driver matches (honouring driver_override).
    fn probe(&self, sysfs: &Sysfs, addr: PciAddr) -> Result<(), VfError>;
    /// Binds a specific driver (which must match the device).
    fn bind(&self, sysfs: &Sysfs, addr: PciAddr, driver: &str) -> Result<(), VfError>;
}

/// The real kernel, through sysfs files.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelDrivers;

fn write(path: &Path, value: &str) -> Result<(), VfError> {
    std::fs::write(path, value).map_err(io_err(path, "write"))
}

impl DriverControl for KernelDrivers {
    fn unbind(&self, sysfs: &Sysfs, addr: PciAddr, driver: &str) -> Result<(), VfError> {
        write(&sysfs.driver_dir(driver).join("unbind"), &addr.to_string())
    }

    fn set_driver_override(&self, sysfs: &Sysfs, addr: PciAddr, driver: Option<&str>) -> Result<(), VfError> {
        // A newline clears the override; some kernels reject an empty write.
        write(&sysfs.device_dir(addr).join("driver_override"), &format!("{}\n", driver.unwrap_or("")))
    }

    fn probe(&self, sysfs: &Sysfs, addr: PciAddr) -> Result<(), VfError> {
        write(&sysfs.drivers_probe(), &addr.to_string())
    }

    fn bind(&self, sysfs: &Sysfs, addr: PciAddr, driver: &str) -> Result<(), VfError> {
        write(&sysfs.driver_dir(driver).join("bind"), &addr.to_string())
    }
}

/// The drivers that leave an IOMMU group usable by VFIO.
const VFIO_FRIENDLY: &[&str] = &["vfio-pci"];

/// Checks that every device in the group is bound to vfio-pci or to no driver, as
/// VFIO requires before the group can be used. Names the first offender otherwise.
pub fn check_group_viable(sysfs: &Sysfs, group: &str, for_device: PciAddr) -> Result<(), VfError> {
    let dir = sysfs.iommu_group_dir(group);
    let entries = std::fs::read_dir(&dir).map_err(io_err(&dir, "list"))?;
    let mut members: Vec<String> = entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    members.sort();
    for member in members {
        let Ok(addr) = member.parse::<PciAddr>() else { continue };
        let dev = sysfs.device(addr)?;
        if let Some(driver) = dev.driver() {
            if !VFIO_FRIENDLY.contains(&driver.as_str()) {
                return Err(VfError::GroupNotViable { group: group.to_string(), addr: for_device, offender: addr, driver });
            }
        }
    }
    Ok(())
}
