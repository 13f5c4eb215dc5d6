//! The vfvm VMM library: KVM, guest memory, the buses and devices, and the vCPU loop.
//!
//! Being built (issue #3): the memory map, PIO/MMIO buses, the VM and vCPU plumbing
//! (tested with tiny hand-made guests on this machine's KVM), and direct Linux boot
//! (bzImage or ELF vmlinux, initramfs, ACPI tables and MP table, 16550 console;
//! booted in the lab). PCI, virtio-vsock and the control API follow.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod bus;
pub mod cmos;
pub mod cpu;
pub mod interrupt;
pub mod layout;
pub mod machine;
pub mod mptable;
pub mod pci;
pub mod power;
pub mod serial;
pub mod vcpu;
pub mod virtio;
pub mod vm;
