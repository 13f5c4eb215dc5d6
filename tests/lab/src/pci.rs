//! PCI devices through sysfs, as far as the lab's checks need them: driver binding by
//! `driver_override`, netdevs, IOMMU groups and SR-IOV virtual functions.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

const DEVICES: &str = "/sys/bus/pci/devices";

#[derive(Clone, Debug)]
pub struct PciDevice {
    pub addr: String,
}

fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path).ok()?.file_name().map(|n| n.to_string_lossy().into_owned())
}

pub fn write_sysfs(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

fn read_trimmed(path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?.trim().to_string())
}

impl PciDevice {
    pub fn new(addr: &str) -> Result<Self> {
        let dev = Self { addr: addr.to_string() };
        if !dev.path().is_dir() {
            bail!("PCI device {addr} does not exist ({} is missing)", dev.path().display());
        }
        Ok(dev)
    }

    pub fn path(&self) -> PathBuf {
        Path::new(DEVICES).join(&self.addr)
    }

    pub fn attr(&self, name: &str) -> Result<String> {
        read_trimmed(&self.path().join(name))
    }

    pub fn vendor_device(&self) -> Result<String> {
        Ok(format!("{}:{}", self.attr("vendor")?.trim_start_matches("0x"), self.attr("device")?.trim_start_matches("0x")))
    }

    pub fn driver(&self) -> Option<String> {
        link_name(&self.path().join("driver"))
    }

    pub fn netdevs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path().join("net"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    pub fn iommu_group(&self) -> Result<String> {
        link_name(&self.path().join("iommu_group")).with_context(|| format!("{} has no IOMMU group (is the IOMMU on?)", self.addr))
    }

    /// The `n`th virtual function of this physical function.
    pub fn virtfn(&self, n: u32) -> Result<PciDevice> {
        let addr = link_name(&self.path().join(format!("virtfn{n}"))).with_context(|| format!("{} has no virtfn{n}", self.addr))?;
        PciDevice::new(&addr)
    }

    pub fn unbind(&self) -> Result<()> {
        if let Some(driver) = self.driver() {
            write_sysfs(&self.path().join("driver/unbind"), &self.addr)
                .with_context(|| format!("unbinding {} from {driver}", self.addr))?;
        }
        Ok(())
    }

    /// Binds to `driver` (or, with `None`, to whatever the kernel matches by ID) the way
    /// a VF is handed to VFIO: `driver_override`, then a probe.
    pub fn bind_by_override(&self, driver: Option<&str>) -> Result<()> {
        self.unbind()?;
        // An empty line clears the override; a bare "" write is rejected by some kernels.
        write_sysfs(&self.path().join("driver_override"), &format!("{}\n", driver.unwrap_or("")))?;
        write_sysfs(Path::new("/sys/bus/pci/drivers_probe"), &self.addr)?;
        Ok(())
    }
}

/// A PCI function on vfio-pci for as long as this lives, back on the driver the
/// kernel matches afterwards: on every path, a failed bind included (the guard
/// exists before the function leaves its driver).
pub struct OnVfio(pub PciDevice);

impl OnVfio {
    pub fn bind(dev: PciDevice) -> Result<OnVfio> {
        let guard = OnVfio(dev);
        guard.0.bind_by_override(Some("vfio-pci"))?;
        Ok(guard)
    }
}

impl Drop for OnVfio {
    fn drop(&mut self) {
        if let Err(e) = self.0.bind_by_override(None) {
            eprintln!("giving {} back to its driver: {e:#}", self.0.addr);
        }
    }
}

/// All PCI devices bound to `driver`.
pub fn bound_to(driver: &str) -> Vec<PciDevice> {
    let mut devs: Vec<PciDevice> = std::fs::read_dir(Path::new("/sys/bus/pci/drivers").join(driver))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(':') && n.contains('.'))
                .map(|addr| PciDevice { addr })
                .collect()
        })
        .unwrap_or_default();
    devs.sort_by(|a, b| a.addr.cmp(&b.addr));
    devs
}
