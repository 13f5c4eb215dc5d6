//! The owner of the VM's devices: the PCI root complex and what is plugged into it,
//! the interrupt routing, the ioeventfd registrar, the KVM memory slots devices map
//! BARs through, and the VFIO container every passed-through device shares. Each
//! device has an id; the control API lists them ([`DeviceManager::devices`]).
//!
//! Teardown order (on drop): devices leave the bus (VFIO devices: MSI-X off, BARs
//! out of the guest, device reset, fds closed; the container's DMA mappings go with
//! its last group), then the container, then the buses let go of the root complex.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vfvm_protocols::vmm_api::DeviceInfo;
use vm_memory::GuestMemoryMmap;

use crate::bus::Bus;
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
    devices: Vec<Entry>,
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
            devices: Vec::new(),
        })
    }

    fn check_id(&self, id: &str) -> Result<(), DeviceError> {
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
        Ok(addr)
    }

    /// The devices on the bus, in the order they were added.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.devices.iter().map(|d| d.info.clone()).collect()
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        let mut root = lock(&self.pci);
        for entry in self.devices.drain(..).rev() {
            let _ = root.remove_device(entry.info.guest_pci_address.device());
        }
        drop(root);
        // The devices' own drops ran as their last references went (above, or with
        // the buses below).
        self.vfio = None;
        // The buses and the root complex hold each other (config and BAR ranges):
        // only this lets them, and the virtio devices' threads, go.
        self.pio.clear();
        self.mmio.clear();
    }
}
