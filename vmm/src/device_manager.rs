//! The owner of the VM's devices: the PCI root complex and what is plugged into it,
//! the interrupt routing, the ioeventfd registrar, the KVM memory slots devices map
//! BARs through, and the VFIO container every passed-through device shares. Each
//! device has an id; the control API lists them ([`DeviceManager::devices`]).
//!
//! Passed-through devices can come and go while the guest runs (ACPI hot-plug,
//! [`crate::hotplug`]): [`DeviceManager::hot_add_vfio`] plugs one and tells the
//! guest; [`DeviceManager::remove`] asks the guest to eject one, waits (bounded),
//! and past the bound pulls it anyway. A device the guest ejects on its own is
//! released the next time the manager is used.
//!
//! Teardown order (on drop): devices leave the bus (VFIO devices: MSI-X off, BARs
//! out of the guest, device reset, fds closed; the container's DMA mappings go with
//! its last group), then the container, then the buses let go of the root complex.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::VmFd;
use vfvm_protocols::vmm_api::{DeviceInfo, ResourceUsage};
use vm_memory::GuestMemoryMmap;

use crate::bus::Bus;
use crate::hotplug::{HotplugRegisters, PciHotplug, GED_GSI, HOTPLUG_PORT, HOTPLUG_PORT_LEN};
use crate::interrupt::{GsiRouting, IoEventRegistrar};
use crate::pci::{self, PciAddress, PciDevice, PciError, PciRoot, PciWindows};
use crate::vfio::{VfioConfig, VfioContext, VfioError, VfioPciDevice};
use crate::virtio::pci::VirtioPciDevice;
use crate::virtio::VirtioDevice;
use crate::vm::{MemorySlots, Vm};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device id {0:?} is already in use")]
    IdInUse(String),
    #[error("device id {0:?}: expected 1 to 64 of A-Z a-z 0-9 . _ - :")]
    BadId(String),
    #[error("no device {0:?} is plugged")]
    NoSuchDevice(String),
    #[error("device {id} ({kind}) cannot be unplugged: only passed-through (VFIO) devices can")]
    NotRemovable { id: String, kind: String },
    #[error("device {id}: {err}")]
    Virtio { id: String, err: String },
    #[error("device {id}: PCI: {err}")]
    Pci { id: String, err: PciError },
    #[error(transparent)]
    Vfio(#[from] VfioError),
    #[error("PCI configuration access: {0}")]
    Install(String),
}

struct Entry {
    info: DeviceInfo,
    /// Keeps a VFIO device's own state (slots, fds) until it is unplugged.
    _device: Arc<Mutex<dyn PciDevice>>,
}

pub struct DeviceManager {
    memory: GuestMemoryMmap,
    vm: Arc<VmFd>,
    pio: Bus,
    mmio: Bus,
    pci: Arc<Mutex<PciRoot>>,
    interrupts: Arc<GsiRouting>,
    ioevents: Arc<dyn IoEventRegistrar>,
    slots: Arc<MemorySlots>,
    /// Made with the first VFIO device: guest RAM is DMA-mapped once for all.
    vfio: Option<Arc<VfioContext>>,
    hotplug: Arc<PciHotplug>,
    devices: Vec<Entry>,
}

/// Whether `id` is a device id: short, and safe in logs (a PCI address is one, the
/// default for `--vfio`).
pub fn valid_device_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceManager {
    /// The root complex with its configuration access on `vm`'s buses, no devices.
    pub fn new(vm: &Vm, ram_bytes: u64) -> Result<Self, DeviceError> {
        let pci = Arc::new(Mutex::new(PciRoot::new(vm.mmio.clone(), PciWindows::for_ram(ram_bytes))));
        pci::install(&pci, &vm.pio, &vm.mmio).map_err(|e| DeviceError::Install(e.to_string()))?;
        let ioevents: Arc<dyn IoEventRegistrar> = vm.shared_fd();
        // The GED's interrupt: one edge on its IOAPIC pin.
        let ged_vm = vm.shared_fd();
        let notify = Box::new(move || {
            if let Err(e) = ged_vm.set_irq_line(GED_GSI, true).and_then(|()| ged_vm.set_irq_line(GED_GSI, false)) {
                tracing::warn!("the hot-plug interrupt (GSI {GED_GSI}): {e}");
            }
        });
        let hotplug = PciHotplug::new(pci.clone(), notify);
        vm.pio
            .insert(HOTPLUG_PORT, HOTPLUG_PORT_LEN, "PCI hot-plug", Arc::new(Mutex::new(HotplugRegisters(hotplug.clone()))))
            .map_err(|e| DeviceError::Install(e.to_string()))?;
        Ok(Self {
            memory: vm.memory().clone(),
            vm: vm.shared_fd(),
            pio: vm.pio.clone(),
            mmio: vm.mmio.clone(),
            pci,
            interrupts: GsiRouting::new(vm.shared_fd()),
            ioevents,
            slots: vm.memory_slots().clone(),
            vfio: None,
            hotplug,
            devices: Vec::new(),
        })
    }

    fn check_id(&self, id: &str) -> Result<(), DeviceError> {
        if !valid_device_id(id) {
            return Err(DeviceError::BadId(id.to_string()));
        }
        if self.devices.iter().any(|d| d.info.id == id) {
            return Err(DeviceError::IdInUse(id.to_string()));
        }
        Ok(())
    }

    fn plug(&mut self, id: &str, device: Arc<Mutex<dyn PciDevice>>, slot: Option<u8>) -> Result<PciAddress, DeviceError> {
        lock(&self.pci).add_device(device, slot).map_err(|err| DeviceError::Pci { id: id.to_string(), err })
    }

    /// Plugs a virtio device (first free slot) under `id`.
    pub fn add_virtio(&mut self, id: &str, kind: &str, device: Box<dyn VirtioDevice>) -> Result<PciAddress, DeviceError> {
        self.check_id(id)?;
        let device = VirtioPciDevice::new(device, self.memory.clone(), &self.interrupts, Some(self.ioevents.clone()))
            .map_err(|e| DeviceError::Virtio { id: id.to_string(), err: e.to_string() })?;
        let device: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(device));
        let addr = self.plug(id, device.clone(), None)?;
        let info = DeviceInfo { id: id.to_string(), kind: kind.to_string(), guest_pci_address: addr, host_pci_address: None };
        self.devices.push(Entry { info, _device: device });
        Ok(addr)
    }

    /// Passes the host function `config.host` through (VFIO): opened, its group added
    /// to the VM's container (guest RAM DMA-mapped with the first), plugged in
    /// `config.slot` or the first free one. On error nothing is left behind.
    pub fn add_vfio(&mut self, config: &VfioConfig) -> Result<PciAddress, DeviceError> {
        self.check_id(&config.id)?;
        // The device's own faults first: they say more than the host's lack of VFIO.
        crate::vfio::precheck(config.host)?;
        let context = match &self.vfio {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(VfioContext::new(&self.vm, &self.memory, &config.host)?);
                self.vfio = Some(c.clone());
                c
            }
        };
        let device = VfioPciDevice::open(config, context, &self.interrupts, self.slots.clone())?;
        let device: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(device));
        let addr = lock(&self.pci).add_device(device.clone(), config.slot).map_err(|err| match err {
            PciError::NoBarSpace { index, size } => DeviceError::Vfio(VfioError::BarTooLarge { host: config.host, index, size }),
            err => DeviceError::Pci { id: config.id.clone(), err },
        })?;
        let info = DeviceInfo { id: config.id.clone(), kind: "vfio".into(), guest_pci_address: addr, host_pci_address: Some(config.host) };
        tracing::info!(id = %config.id, host = %config.host, guest = %addr, "VFIO device plugged");
        self.devices.push(Entry { info, _device: device });
        self.hotplug.set_removable(addr.device(), true);
        Ok(addr)
    }

    /// [`Self::add_vfio`] into the running guest, which is then told (ACPI device
    /// check on the slot); the guest's own PCI code takes it from there.
    pub fn hot_add_vfio(&mut self, config: &VfioConfig) -> Result<PciAddress, DeviceError> {
        self.release_ejected();
        let addr = self.add_vfio(config)?;
        self.hotplug.device_up(addr.device());
        Ok(addr)
    }

    /// Unplugs device `id` (a VFIO one): the guest is asked to eject it and given
    /// `limit`; if it has not by then, the device is pulled from under it. Then the
    /// device is released (MSI-X off, BARs out, reset, fds closed). Returns whether
    /// the removal was forced.
    pub fn remove(&mut self, id: &str, limit: Duration) -> Result<bool, DeviceError> {
        self.release_ejected();
        let at = self.devices.iter().position(|d| d.info.id == id).ok_or_else(|| DeviceError::NoSuchDevice(id.to_string()))?;
        let info = self.devices[at].info.clone();
        if info.kind != "vfio" {
            return Err(DeviceError::NotRemovable { id: id.to_string(), kind: info.kind });
        }
        let slot = info.guest_pci_address.device();
        self.hotplug.request_eject(slot);
        let mut device = self.hotplug.wait_ejected(slot, limit);
        let forced = device.is_none();
        if forced {
            // No longer the guest's to eject; an eject already under way finishes first.
            self.hotplug.set_removable(slot, false);
            match lock(&self.pci).remove_device(slot) {
                Ok(d) => device = Some(d),
                Err(_) => device = self.hotplug.wait_ejected(slot, Duration::from_secs(1)),
            }
            tracing::warn!(id, slot, "the guest did not eject device {id} within {limit:?}: removed from under it");
            // A guest that handles hot-plug but was slow rescans the slot and finds it empty.
            self.hotplug.device_up(slot);
        }
        let entry = self.devices.remove(at);
        // The last references: the device's own teardown runs here.
        drop(device);
        drop(entry);
        tracing::info!(id, guest = %info.guest_pci_address, forced, "device removed");
        Ok(forced)
    }

    /// Releases the devices the guest ejected without being asked.
    fn release_ejected(&mut self) {
        for (slot, device) in self.hotplug.take_ejected() {
            if let Some(at) = self.devices.iter().position(|d| d.info.guest_pci_address.device() == slot) {
                let entry = self.devices.remove(at);
                tracing::info!(id = %entry.info.id, slot, "the guest ejected device {} on its own: released", entry.info.id);
            }
            drop(device);
        }
    }

    /// The devices on the bus, in the order they were added.
    pub fn devices(&mut self) -> Vec<DeviceInfo> {
        self.release_ejected();
        self.devices.iter().map(|d| d.info.clone()).collect()
    }

    /// What the VM's devices hold of KVM and the host.
    pub fn resources(&self) -> ResourceUsage {
        ResourceUsage {
            memory_slots: self.slots.in_use(),
            msi_gsis: self.interrupts.msi_in_use(),
            vfio_devices: self.vfio.as_ref().map_or(0, |c| c.devices()),
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        let mut root = lock(&self.pci);
        for entry in self.devices.drain(..).rev() {
            let _ = root.remove_device(entry.info.guest_pci_address.device());
        }
        drop(root);
        for (_, device) in self.hotplug.take_ejected() {
            drop(device);
        }
        // The devices' own drops ran as their last references went (above, or with
        // the buses below).
        self.vfio = None;
        // The buses and the root complex hold each other (config and BAR ranges):
        // only this lets them, and the virtio devices' threads, go.
        self.pio.clear();
        self.mmio.clear();
    }
}
