//! A KVM virtual machine: guest memory registered with KVM, the in-kernel irqchip
//! and PIT, the TSS and identity-map pages, and the PIO/MMIO buses its vCPUs use.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VmFd};

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::bus::Bus;
use crate::exits::ExitCounters;
use crate::layout;
use crate::vcpu::Vcpu;
use vfvm_protocols::vmm_api::AddressSpace;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0}, expected 12")]
    KvmApiVersion(i32),
    #[error("KVM: {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("no free KVM memory slot: all {0} are in use")]
    NoMemorySlot(u32),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Which platform pieces KVM provides in-kernel.
#[derive(Clone, Copy, Debug)]
pub struct VmOptions {
    /// In-kernel PIC, IOAPIC and LAPIC, plus the PIT: what a Linux guest needs.
    pub irqchip: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self { irqchip: true }
    }
}

/// The VM's KVM memory slots: guest RAM takes the first ones when the VM is made;
/// devices that map host memory into the guest (VFIO BARs) take others and give
/// them back, so a device can come and go any number of times.
pub struct MemorySlots {
    vm: Arc<VmFd>,
    /// How many slots KVM allows.
    limit: u32,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    next: u32,
    /// Slots given back, reused before new ones.
    free: Vec<u32>,
}

impl MemorySlots {
    fn new(vm: Arc<VmFd>, limit: usize) -> Self {
        Self { vm, limit: u32::try_from(limit).unwrap_or(u32::MAX), state: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps `size` bytes of host memory at `host` into the guest at `guest` (both
    /// page aligned) in a slot of its own, returned for [`Self::unmap`].
    ///
    /// # Safety
    /// `host..host + size` must stay mapped until the slot is unmapped (or the VM is
    /// gone): the guest reads and writes it.
    pub unsafe fn map(&self, guest: u64, size: u64, host: *mut u8) -> Result<u32, VmError> {
        let slot = {
            let mut state = self.lock();
            match state.free.pop() {
                Some(slot) => slot,
                None if state.next < self.limit => {
                    state.next += 1;
                    state.next - 1
                }
                None => return Err(VmError::NoMemorySlot(self.limit)),
            }
        };
        let region = kvm_userspace_memory_region { slot, guest_phys_addr: guest, memory_size: size, userspace_addr: host as u64, flags: 0 };
        // SAFETY: the caller keeps the host range mapped while the slot exists.
        match unsafe { self.vm.set_user_memory_region(region) } {
            Ok(()) => Ok(slot),
            Err(source) => {
                self.lock().free.push(slot);
                Err(VmError::Kvm { what: "map memory into the guest", source })
            }
        }
    }

    /// How many slots are in use.
    pub fn in_use(&self) -> u32 {
        let state = self.lock();
        state.next.saturating_sub(u32::try_from(state.free.len()).unwrap_or(u32::MAX))
    }

    /// Takes a mapping made by [`Self::map`] out of the guest and frees its slot.
    pub fn unmap(&self, slot: u32) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region { slot, ..Default::default() };
        // SAFETY: a zero-sized region deletes the slot; nothing is mapped.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm_err("unmap memory from the guest"))?;
        self.lock().free.push(slot);
        Ok(())
    }
}

pub struct Vm {
    kvm: Kvm,
    exits: Arc<ExitCounters>,
    fd: Arc<VmFd>,
    slots: Arc<MemorySlots>,
    memory: GuestMemoryMmap,
    pub pio: Bus,
    pub mmio: Bus,
}

impl Vm {
    pub fn new(memory: GuestMemoryMmap, options: VmOptions) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::KvmApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(kvm_err("create the VM"))?;
        let tss = usize::try_from(layout::KVM_TSS_ADDRESS).expect("the TSS is below 4 GiB");
        fd.set_tss_address(tss).map_err(kvm_err("set the TSS address"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS).map_err(kvm_err("set the identity map address"))?;
        if options.irqchip {
            fd.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?;
            let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
        }
        let fd = Arc::new(fd);
        let slots = Arc::new(MemorySlots::new(fd.clone(), kvm.get_nr_memslots()));
        for region in memory.iter() {
            let host = memory.get_host_address(region.start_addr()).map_err(|e| VmError::Memory(e.to_string()))?;
            // SAFETY: the mapping lives as long as `memory`, which the Vm owns; struct
            // fields drop in declaration order, so the VM fd goes before the memory
            // (device threads holding `shared_fd` clones are stopped before the Vm drops).
            unsafe { slots.map(region.start_addr().raw_value(), region.len(), host) }?;
        }
        Ok(Self { kvm, exits: Arc::default(), fd, slots, memory, pio: Bus::new(AddressSpace::Pio), mmio: Bus::new(AddressSpace::Mmio) })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The VM fd for device threads (MSI delivery, ioeventfds, irqfds).
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// The VM's memory slots, for devices that map memory into the guest.
    pub fn memory_slots(&self) -> &Arc<MemorySlots> {
        &self.slots
    }

    /// The exits its vCPUs have handled (see [`crate::exits`]).
    pub fn exits(&self) -> &Arc<ExitCounters> {
        &self.exits
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// A vCPU with this VM's buses (as they are now: add devices first).
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, VmError> {
        let fd = self.fd.create_vcpu(id).map_err(kvm_err("create a vCPU"))?;
        Ok(Vcpu::new(fd, self.pio.clone(), self.mmio.clone(), self.exits.clone()))
    }
}
