//! The vfvm VMM library: KVM, guest memory, the buses and devices, and the vCPU loop.
//!
//! Being built (issue #3): so far the memory map, PIO/MMIO buses, the VM and vCPU
//! plumbing and the power-off/reset devices, tested with tiny hand-made guests on
//! this machine's KVM. Booting Linux, PCI, virtio-vsock and the control API follow.

pub mod bus;
pub mod layout;
pub mod power;
pub mod vcpu;
pub mod vm;
