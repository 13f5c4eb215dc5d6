//! `vfvm-agent` as a library: the parts of the guest's PID 1 that are testable on
//! their own.
//!
//! - [`network`]: configure guest network devices (found by PCI address or MAC,
//!   waited for across PCI hot-plug) from the interface/route/DNS config the shim
//!   sends.

pub mod init;
pub mod network;
pub mod service;
