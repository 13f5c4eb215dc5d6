//! Message-signalled interrupts: how devices on the PCI bus interrupt the guest.
//! A device (or its MSI-X table) produces an [`MsiMessage`]; an [`MsiSink`] delivers
//! it. With KVM's in-kernel irqchip the sink is `KVM_SIGNAL_MSI` on the VM fd, which
//! needs no GSI routing table, so vectors can be added and moved at any time.

use std::sync::Arc;

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;

/// One MSI write, as the guest programmed it (x86: address 0xFEExxxxx).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("KVM_SIGNAL_MSI to {address:#x} data {data:#x}: {source}")]
    Signal { address: u64, data: u32, source: kvm_ioctls::Error },
}

/// Delivers MSI messages to the guest.
pub trait MsiSink: Send + Sync {
    fn signal(&self, msg: MsiMessage) -> Result<(), InterruptError>;
}

/// Delivery through the VM's in-kernel irqchip.
pub struct KvmMsiSink {
    vm: Arc<VmFd>,
}

impl KvmMsiSink {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl MsiSink for KvmMsiSink {
    fn signal(&self, msg: MsiMessage) -> Result<(), InterruptError> {
        let (address_lo, address_hi) = crate::split_u64(msg.address);
        let m = kvm_msi { address_lo, address_hi, data: msg.data, ..Default::default() };
        // 0: the interrupt was blocked (e.g. the LAPIC is disabled), which is the
        // guest's business, not an error.
        self.vm.signal_msi(m).map(|_| ()).map_err(|source| InterruptError::Signal { address: msg.address, data: msg.data, source })
    }
}
