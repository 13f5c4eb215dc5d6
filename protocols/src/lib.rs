//! Wire types shared by `containerd-shim-vfvm-v2`, `vfvm-vmm` and `vfvm-agent`.
//!
//! Empty for now: the VMM control API arrives with issue #3 and the agent's ttrpc
//! services with issue #4. Nothing here pretends to speak a protocol yet.
