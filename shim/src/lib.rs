//! The host side of vfvm: the containerd shim's library parts.
//!
//! - [`config`]: the runtime configuration (`configs/vfvm.toml`) and per-pod overrides.
//! - [`vf`]: the VF manager. Finds a pod's SR-IOV VFs, hands them to vfio-pci with a
//!   journal written first, and always gives them back exactly as they came.

pub mod config;
pub mod vf;
