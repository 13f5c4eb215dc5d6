//! The vfvm VMM library: KVM, guest memory, the PCI bus and the virtio/VFIO devices.
//!
//! Not written yet (issue #3). The binary says so instead of pretending to boot.
