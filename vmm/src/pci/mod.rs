//! The PCI root complex (being written).
