//! The VF manager: the host half of vfvm's SR-IOV passthrough.
//!
//! `discover` finds a pod's VFs (netdevs in its network namespace that are VFs, and
//! VFs the device plugin allocated by env var); `prepare` journals each VF's whole
//! state, then hands it to vfio-pci; `restore` gives it back exactly as it came, on
//! teardown, on every error path of `prepare`, and after a crash (driven by the
//! journal alone). All sysfs access goes through [`pci::Sysfs`]'s root.

pub mod cni_cache;
pub mod discover;
pub mod journal;
pub mod lock;
pub mod manager;
pub mod net;
pub mod pci;
pub mod spec;

use std::path::PathBuf;

pub use manager::{PreparedVf, Step, VfManager};
pub use pci::{PciAddress, Sysfs};

/// Everything that can go wrong; each names the input or object and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum VfError {
    #[error(transparent)]
    InvalidPciAddress(#[from] vfvm_protocols::PciAddressError),
    #[error("annotation {key}={value:?}: expected {expected}")]
    InvalidAnnotation { key: String, value: String, expected: &'static str },
    #[error("env var {var}={value:?}: {reason}")]
    InvalidEnv { var: String, value: String, reason: String },
    #[error("PCI device {addr} does not exist")]
    NoSuchDevice { addr: PciAddress },
    #[error("PCI device {addr} is not an SR-IOV VF: {reason}")]
    NotAVf { addr: PciAddress, reason: String },
    #[error("{path}: {op} failed: {source}")]
    Sysfs { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("VF {addr}: IOMMU group {group} is not viable: {offender} is bound to {driver} (every device in the group must be on vfio-pci, pci-stub or pcieport, or have no driver)")]
    GroupNotViable { group: String, addr: PciAddress, offender: PciAddress, driver: String },
    #[error("VF {addr} has no IOMMU group (is the IOMMU enabled, e.g. intel_iommu=on?)")]
    NoIommuGroup { addr: PciAddress },
    #[error("VF {addr}: expected driver {expected}, found {found} after {waited_ms} ms")]
    BindFailed { addr: PciAddress, expected: String, found: String, waited_ms: u64 },
    #[error("VF {addr}: {path} did not appear")]
    NoVfioDevice { addr: PciAddress, path: PathBuf },
    #[error("VF {addr} is in use by {owner}")]
    Busy { addr: PciAddress, owner: String },
    #[error("VF lock {path}: {op} failed: {source}")]
    Lock { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("VF {addr}: prepare stopped at {step:?} (simulated crash)")]
    SimulatedCrash { addr: PciAddress, step: Step },
    #[error("VF {addr}: no netdev appeared after binding {driver} ({waited_ms} ms)")]
    NoNetdev { addr: PciAddress, driver: String, waited_ms: u64 },
    #[error("journal holds an unusable {what}: {value:?}")]
    JournalValue { what: String, value: String },
    #[error(transparent)]
    Netlink(#[from] vfvm_netlink::Error),
    #[error("VF {addr}: {what} failed, and rolling back failed too: {rollback}")]
    RollbackFailed { addr: PciAddress, what: Box<VfError>, rollback: Box<VfError> },
}

#[cfg(test)]
mod fake_tree_tests;
