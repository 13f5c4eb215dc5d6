//! A KVM virtual machine: guest memory registered with KVM, the in-kernel irqchip
//! and PIT, the TSS and identity-map pages, and the PIO/MMIO buses its vCPUs use.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use std::sync::Arc;

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

pub struct Vm {
    kvm: Kvm,
    exits: Arc<ExitCounters>,
    fd: Arc<VmFd>,
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
        for (slot, region) in (0u32..).zip(memory.iter()) {
            let host = memory.get_host_address(region.start_addr()).map_err(|e| VmError::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the mapping lives as long as `memory`, which the Vm owns; struct
            // fields drop in declaration order, so the VM fd goes before the memory
            // (device threads holding `shared_fd` clones are stopped before the Vm drops).
            unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("register guest memory"))?;
        }
        Ok(Self {
            kvm,
            exits: Arc::default(),
            fd: Arc::new(fd),
            memory,
            pio: Bus::new(AddressSpace::Pio),
            mmio: Bus::new(AddressSpace::Mmio),
        })
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
