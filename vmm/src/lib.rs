//! The vfvm VMM library: KVM, guest memory, the buses and devices, and the vCPU loop.
//!
//! What it has: the memory map, PIO/MMIO buses, the VM and vCPU plumbing (tested with
//! tiny hand-made guests on this machine's KVM), direct Linux boot (bzImage or ELF
//! vmlinux, initramfs, ACPI tables and MP table, 16550 console), a PCI root complex
//! (ECAM and CF8, BARs, MSI-X) with virtio-pci devices (vsock with hybrid vsock on the
//! host, virtio-fs as a vhost-user frontend), the control API and the ACPI power
//! button; booted in the lab. Host PCI functions are passed through with VFIO
//! ([`vfio`]), owned with the other devices by the [`device_manager`].

pub mod acpi;
pub mod api;
pub mod boot;
pub mod builder;
pub mod bus;
pub mod cmos;
pub mod cpu;
pub mod device_manager;
pub mod elf;
pub mod exits;
pub mod hotplug;
pub mod interrupt;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod mptable;
pub mod pci;
pub mod power;
pub mod ratelimit;
pub mod serial;
pub mod smbios;
pub mod vcpu;
pub mod vfio;
pub mod virtio;
pub mod vm;

/// The low and high 32-bit halves of `v`: how a 64-bit value (an address, feature
/// bits) sits in a pair of 32-bit registers or table fields.
pub fn split_u64(v: u64) -> (u32, u32) {
    let [b0, b1, b2, b3, b4, b5, b6, b7] = v.to_le_bytes();
    (u32::from_le_bytes([b0, b1, b2, b3]), u32::from_le_bytes([b4, b5, b6, b7]))
}
