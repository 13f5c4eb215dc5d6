//! Prepare (journal, then hand to vfio-pci) and restore (give back exactly).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::journal::{Journal, VfRecord};
use super::lock::VfLock;
use super::net::{self, Placement};
use super::pci::{check_group_viable, check_other_members_viable, DriverControl, KernelDrivers, PciAddress, Sysfs};
use super::VfError;

const VFIO_PCI: &str = "vfio-pci";

/// The steps of [`VfManager::prepare`], in order; tests stop it dead after each one
/// to check that [`VfManager::restore`] recovers from a crash there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Locked,
    Journaled,
    AdminMacSet,
    Unbound,
    OverrideSet,
    Probed,
    Bound,
}

impl Step {
    pub const ALL: [Step; 7] =
        [Step::Locked, Step::Journaled, Step::AdminMacSet, Step::Unbound, Step::OverrideSet, Step::Probed, Step::Bound];
}

/// A VF on vfio-pci, owned by this sandbox until restored.
#[derive(Debug)]
pub struct PreparedVf {
    pub addr: PciAddress,
    pub iommu_group: String,
    /// `/dev/vfio/<group>`: what the VMM opens.
    pub vfio_group_path: PathBuf,
    pub lock: VfLock,
}

/// The VF manager of one sandbox.
pub struct VfManager<D: DriverControl = KernelDrivers> {
    pub sysfs: Sysfs,
    pub drivers: D,
    /// `/dev` normally; where `vfio/<group>` must appear.
    pub dev_root: PathBuf,
    /// Per-VF lock files, shared by all sandboxes on the host.
    pub lock_dir: PathBuf,
    pub journal: Journal,
    pub sandbox_id: String,
    /// How long to wait for a driver to bind after a probe.
    pub bind_timeout: Duration,
}

impl VfManager<KernelDrivers> {
    /// The manager of `sandbox_id`'s VFs, journaled in `state_dir` (the sandbox's
    /// journal directory, see [`crate::journal`]); `lock_dir` holds every sandbox's
    /// VF locks.
    pub fn new(sandbox_id: &str, state_dir: &Path, lock_dir: &Path) -> Self {
        Self {
            sysfs: Sysfs::default(),
            drivers: KernelDrivers,
            dev_root: PathBuf::from("/dev"),
            lock_dir: lock_dir.to_path_buf(),
            journal: Journal::new(state_dir),
            sandbox_id: sandbox_id.to_string(),
            bind_timeout: Duration::from_secs(10),
        }
    }
}

impl<D: DriverControl> VfManager<D> {
    /// Hands the VF described by `record` (as discovery found it) to vfio-pci.
    /// The record is journaled before the first change; on any failure the VF is put
    /// back before the error is returned.
    pub fn prepare(&self, record: &VfRecord) -> Result<PreparedVf, VfError> {
        self.prepare_with_checkpoints(record, &mut |_| true)
    }

    /// [`prepare`](Self::prepare), calling `checkpoint` after each step; when it returns
    /// false, stops at once as if the process had died there (no rollback).
    pub fn prepare_with_checkpoints(&self, record: &VfRecord, checkpoint: &mut dyn FnMut(Step) -> bool) -> Result<PreparedVf, VfError> {
        let addr = record.vf.addr;
        let crash = |step| VfError::SimulatedCrash { addr, step };
        let dev = self.sysfs.device(addr)?;
        if dev.physfn().is_none() {
            return Err(VfError::NotAVf { addr, reason: "it has no physfn link (a PF or a non-SR-IOV device)".into() });
        }
        let group = dev.iommu_group().ok_or(VfError::NoIommuGroup { addr })?;
        // A group whose other members keep it from VFIO is refused before any change.
        check_other_members_viable(&self.sysfs, &group, addr)?;
        let lock = VfLock::acquire(&self.lock_dir, addr, &self.sandbox_id)?;
        if !checkpoint(Step::Locked) {
            return Err(crash(Step::Locked));
        }
        // An entry from an earlier, interrupted attempt holds the original state; the
        // current state may already be ours, so it must not overwrite it.
        if self.journal.read(addr)?.is_none() {
            self.journal.write(record)?;
        }
        if !checkpoint(Step::Journaled) {
            return Err(crash(Step::Journaled));
        }
        let result = self.bind_to_vfio(record, &group, checkpoint);
        match result {
            Ok(vfio_group_path) => Ok(PreparedVf { addr, iommu_group: group, vfio_group_path, lock }),
            Err(e @ VfError::SimulatedCrash { .. }) => Err(e),
            Err(e) => match self.restore_record(record).and_then(|()| self.journal.remove(addr)) {
                Ok(()) => Err(e),
                Err(rollback) => Err(VfError::RollbackFailed { addr, what: Box::new(e), rollback: Box::new(rollback) }),
            },
        }
    }

    fn bind_to_vfio(&self, record: &VfRecord, group: &str, checkpoint: &mut dyn FnMut(Step) -> bool) -> Result<PathBuf, VfError> {
        let addr = record.vf.addr;
        // The guest should see the pod's MAC: pin it as the VF's admin MAC on the PF.
        if let (Some(pf_netdev), Some(netdev)) = (&record.vf.pf_netdev, &record.netdev) {
            net::set_admin_mac(&vfvm_netlink::Handle::new()?, pf_netdev, record.vf.vf_index, &netdev.mac)?;
        }
        if !checkpoint(Step::AdminMacSet) {
            return Err(VfError::SimulatedCrash { addr, step: Step::AdminMacSet });
        }
        let dev = self.sysfs.device(addr)?;
        if dev.driver().as_deref() != Some(VFIO_PCI) {
            if let Some(driver) = dev.driver() {
                self.drivers.unbind(&self.sysfs, addr, &driver)?;
            }
            if !checkpoint(Step::Unbound) {
                return Err(VfError::SimulatedCrash { addr, step: Step::Unbound });
            }
            self.drivers.set_driver_override(&self.sysfs, addr, Some(VFIO_PCI))?;
            if !checkpoint(Step::OverrideSet) {
                return Err(VfError::SimulatedCrash { addr, step: Step::OverrideSet });
            }
            self.drivers.probe(&self.sysfs, addr)?;
            if !checkpoint(Step::Probed) {
                return Err(VfError::SimulatedCrash { addr, step: Step::Probed });
            }
            self.wait_for_driver(addr, Some(VFIO_PCI))?;
        }
        if !checkpoint(Step::Bound) {
            return Err(VfError::SimulatedCrash { addr, step: Step::Bound });
        }
        check_group_viable(&self.sysfs, group, addr)?;
        let path = self.dev_root.join("vfio").join(group);
        if !path.exists() {
            return Err(VfError::NoVfioDevice { addr, path });
        }
        Ok(path)
    }

    /// Probing is synchronous for most drivers, but not all: poll, with a bound.
    fn wait_for_driver(&self, addr: PciAddress, expected: Option<&str>) -> Result<(), VfError> {
        let started = Instant::now();
        loop {
            let found = self.sysfs.device(addr)?.driver();
            if found.as_deref() == expected {
                return Ok(());
            }
            if started.elapsed() >= self.bind_timeout {
                return Err(VfError::BindFailed {
                    addr,
                    expected: expected.unwrap_or("no driver").to_string(),
                    found: found.unwrap_or_else(|| "no driver".into()),
                    waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Gives the VF back as its journal entry says, then deletes the entry. Safe to run
    /// twice, or after a partial restore or prepare; a VF without an entry is left alone.
    pub fn restore(&self, addr: PciAddress) -> Result<(), VfError> {
        match self.journal.read(addr)? {
            Some(record) => {
                self.restore_record(&record)?;
                self.journal.remove(addr)
            }
            None => Ok(()),
        }
    }

    /// Restores every VF in this sandbox's journal, each under its lock: `held` are
    /// the locks this sandbox holds (a live sandbox's teardown); the others are taken
    /// (after a crash the kernel released them with the dead shim). A VF another
    /// sandbox has locked since is left alone (its entry stays: an error), and so is
    /// an unusable entry (kept, with its VF's lock). Tries them all; returns how many
    /// went back or the first error, and the locks of the VFs not given back, for the
    /// caller to keep while their entries remain.
    pub fn restore_all_locked(&self, held: Vec<VfLock>) -> (Result<usize, VfError>, Vec<VfLock>) {
        let entries = match self.journal.read_each() {
            Ok(e) => e,
            Err(e) => return (Err(e), held),
        };
        let mut held = held;
        let mut kept = Vec::new();
        let mut first_error = None;
        let mut restored = 0;
        for (entry_addr, record) in entries {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(sandbox = %self.sandbox_id, "journal entry not restored: {e}");
                    // Its VF stays locked while the entry remains (taken now after a crash).
                    if let Some(addr) = entry_addr {
                        match held.iter().position(|l| l.addr() == addr) {
                            Some(i) => kept.push(held.swap_remove(i)),
                            None => kept.extend(VfLock::acquire(&self.lock_dir, addr, &self.sandbox_id).ok()),
                        }
                    }
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let record = &record;
            let addr = record.vf.addr;
            let lock = match held.iter().position(|l| l.addr() == addr) {
                Some(i) => Ok(held.swap_remove(i)),
                None => VfLock::acquire(&self.lock_dir, addr, &self.sandbox_id),
            };
            let result = lock.and_then(|lock| match self.restore_record(record).and_then(|()| self.journal.remove(addr)) {
                Ok(()) => Ok(()),
                Err(e) => {
                    kept.push(lock);
                    Err(e)
                }
            });
            match result {
                Ok(()) => restored += 1,
                Err(e) => {
                    tracing::error!(sandbox = %self.sandbox_id, vf = %addr, "restore failed: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        // Locks of VFs with no entry (given back already) go.
        drop(held);
        match first_error {
            Some(e) => (Err(e), kept),
            None => (Ok(restored), kept),
        }
    }

    fn restore_record(&self, record: &VfRecord) -> Result<(), VfError> {
        let addr = record.vf.addr;
        // PF settings first: the VF driver reads its MAC from the PF when it binds.
        if let (Some(pf_netdev), Some(settings)) = (&record.vf.pf_netdev, &record.pf_settings) {
            net::restore_pf_settings(&vfvm_netlink::Handle::new()?, pf_netdev, record.vf.vf_index, settings)?;
        }
        self.restore_driver(record)?;
        if let Some(netdev) = &record.netdev {
            match net::restore_netdev(&self.sysfs, addr, record.netns.as_deref(), netdev, self.bind_timeout)? {
                Placement::Original => {}
                Placement::HostBecauseNetnsGone { netns, reason } => tracing::warn!(
                    sandbox = %self.sandbox_id, vf = %addr, netns = %netns.display(),
                    "pod netns is gone ({reason}); left {} in the host's netns without the pod's addresses", netdev.name
                ),
            }
        }
        tracing::info!(sandbox = %self.sandbox_id, vf = %addr, driver = ?record.vf.driver, "VF restored");
        Ok(())
    }

    fn restore_driver(&self, record: &VfRecord) -> Result<(), VfError> {
        let addr = record.vf.addr;
        let dev = self.sysfs.device(addr)?;
        let current = dev.driver();
        if current != record.vf.driver {
            if let Some(driver) = &current {
                self.drivers.unbind(&self.sysfs, addr, driver)?;
            }
            self.drivers.set_driver_override(&self.sysfs, addr, record.vf.driver_override.as_deref())?;
            if let Some(driver) = &record.vf.driver {
                self.drivers.bind(&self.sysfs, addr, driver)?;
            }
            self.wait_for_driver(addr, record.vf.driver.as_deref())?;
        } else if dev.driver_override()? != record.vf.driver_override {
            self.drivers.set_driver_override(&self.sysfs, addr, record.vf.driver_override.as_deref())?;
        }
        Ok(())
    }
}
