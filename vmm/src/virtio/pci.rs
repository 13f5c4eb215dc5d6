//! The virtio-pci (modern) transport (being written).
