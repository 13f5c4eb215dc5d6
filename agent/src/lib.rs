//! `vfvm-agent` as a library: the parts of the guest's PID 1 that are testable on
//! their own.
//!
//! - [`network`]: configure guest network devices (found by PCI address or MAC,
//!   waited for across PCI hot-plug) from the interface/route/DNS config the shim
//!   sends.
//! - [`container`]: containers from OCI runtime specs on a rootfs directory (new
//!   mount/pid/uts/ipc namespaces, cgroup v2), exec, stdio, signals, exit events.
//! - [`guest`]: the VM's memory and CPUs and their use (the pod's ceilings).
//! - [`init`]: PID 1's mounts and boot modules, and the reaper every child exit goes
//!   through.
//! - [`modules`]: the image's other kernel modules, loaded on demand (by name, by
//!   device modalias at boot and on hot-plug).

pub mod container;
pub mod guest;
pub mod init;
pub mod logging;
pub mod modules;
pub mod network;
pub mod service;
