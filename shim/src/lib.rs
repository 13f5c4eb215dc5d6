//! The host side of vfvm: the containerd shim's library parts.
//!
//! - [`config`]: the runtime configuration (`configs/vfvm.toml`) and per-pod overrides.
//! - [`sizing`]: the pod's VM sized from the pod's resources (containerd's annotations).
//! - [`bundle`]: the OCI bundle containerd gives the shim, and its spec rewritten for the guest.
//! - [`record`]: the sandbox's journal of host changes, undone by `delete` after a crash.
//! - [`sandbox`]: a pod's VM: virtiofsd, `vfvm-vmm` in the pod's netns, the agent.
//! - [`share`]: a container's host files and volumes bind-mounted into the pod's share.
//! - [`stdio`]: containerd's FIFOs streamed to and from the agent.
//! - [`events`]: the agent's event stream, bounded and paced.
//! - [`pacing`]: pacing of the agent's empty answers (a guest cannot make the shim spin).
//! - [`service`]: containerd's Task API (v2 and v3) for one pod.
//! - [`vf`]: the VF manager. Finds a pod's SR-IOV VFs, hands them to vfio-pci with a
//!   journal written first, and always gives them back exactly as they came.

pub mod bundle;
pub mod config;
pub mod events;
pub mod ids;
pub mod journal;
pub mod network;
pub mod pacing;
pub mod record;
pub mod sandbox;
pub mod service;
pub mod share;
pub mod sizing;
pub mod sriov;
pub mod stdio;
pub mod vf;
