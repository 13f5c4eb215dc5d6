//! Wire types shared by `containerd-shim-vfvm-v2`, `vfvm-vmm` and `vfvm-agent`.
//!
//! - [`agent`] (feature `agent`, on by default): the agent API (`vfvm.agent.v1`), generated from `proto/agent.proto`:
//!   messages, the ttrpc server trait `Agent` and the client `AgentClient`.
//! - [`client`]: connecting to an agent over AF_VSOCK, hybrid vsock (a Unix socket
//!   with a `CONNECT <port>` handshake) or a plain Unix socket, with timeouts and
//!   retries while the guest boots.
//! - [`net`]: [`net::Datapath`], who moves a pod interface's frames (config and VMM flag).
//! - [`pci`]: [`PciAddress`], the one PCI address type, text `0000:01:10.2` on every wire.
//! - [`vcpu_threads`]: what a VMM's vCPU threads are doing, from `/proc`, for a guest
//!   that stopped answering.
//! - [`vmm_api`]: the VMM control API (typed, versioned, length-framed JSON on the
//!   VMM's Unix socket) with its client and per-connection server loop.

#[cfg(feature = "agent")]
pub mod client;
pub mod net;
pub mod pci;
pub mod vcpu_threads;
pub mod vmm_api;

pub use pci::{PciAddress, PciAddressError};

/// What ttrpc-codegen generates, as the sibling modules its code expects.
#[cfg(feature = "agent")]
#[allow(
    clippy::all,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    unused_results,
    trivial_casts,
    clippy::pedantic,
    unused_mut
)]
mod generated {
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }
    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
    }
}

/// The agent API, version 1: messages, the server trait [`agent::Agent`] (register
/// with [`agent::create_agent`]) and [`agent::AgentClient`].
#[cfg(feature = "agent")]
pub mod agent {
    pub use super::generated::agent::*;
    pub use super::generated::agent_ttrpc::*;

    /// The API version string the agent reports in `Health`.
    pub const API_VERSION: &str = "vfvm.agent.v1";
    /// Where the agent mounts the sandbox's shared filesystem (`CreateSandbox`'s
    /// `shared_fs_tag`); the shim's `rootfs_path`s point under it.
    pub const GUEST_SHARED_DIR: &str = "/run/vfvm/shared";
    /// Where the agent makes the pod's in-memory volumes (an emptyDir with `medium:
    /// Memory`): a bind mount whose source is `<GUEST_EPHEMERAL_DIR>/<name>` (one
    /// path component) gets a tmpfs there, made for the first container that names
    /// it and shared by the pod's containers that name it after.
    pub const GUEST_EPHEMERAL_DIR: &str = "/run/vfvm/ephemeral";
    /// A virtio-fs tag is at most this long (the device's config field).
    pub const MAX_FS_TAG: usize = 36;
}
