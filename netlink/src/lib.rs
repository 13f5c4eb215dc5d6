//! Synchronous rtnetlink for vfvm.
//!
//! A small, typed layer over `netlink-packet-route` and a blocking
//! `netlink-sys` socket (no async runtime): links (creating veth, bridge and
//! 802.1Q VLAN links), addresses, routes, neighbours, moves between network
//! namespaces, and SR-IOV VF settings on a PF. Used by the shim's VF manager (record a VF netdev's config in the pod
//! netns, restore it exactly) and by the in-guest agent (apply a config).
//!
//! ```no_run
//! use vfvm_netlink::{AddressSpec, Handle, Netns, RouteSpec};
//! # fn main() -> vfvm_netlink::Result<()> {
//! let ns = Netns::open("/run/netns/pod")?;
//! let h = Handle::in_netns(&ns)?;
//! let eth0 = h.link_by_name("eth0")?;
//! h.add_address(eth0.index, &AddressSpec::new("10.0.0.2".parse().unwrap(), 24))?;
//! h.set_link_up(eth0.index, true)?;
//! h.add_route(&RouteSpec::default_via("10.0.0.1".parse().unwrap()))?;
//! # Ok(()) }
//! ```
//!
//! The library does exactly what it is told, in the order it is told, and
//! reports the kernel's answer: it does not reorder, retry, or skip. Kernel
//! behaviour callers must know about:
//! - a gateway route needs its gateway reachable already: bring the link up and
//!   add its address (or a link route) first, else ENETUNREACH;
//! - a link must be down to be renamed on older kernels (Debian 6.1: EBUSY
//!   otherwise; newer kernels allow it);
//! - moving a link to another netns brings it down and drops its addresses and
//!   routes (re-add them there); its MAC, MTU and altnames go with it; the
//!   ifindex is kept only if free there;
//! - the kernel adds routes of its own (`proto kernel`) for addresses: listing
//!   returns them, [`Route::is_kernel_generated`] tells them apart.

mod addr;
mod error;
mod link;
mod neigh;
mod netns;
mod route;
mod socket;
mod sriov;
mod tap;
mod tc;
mod types;

pub use error::{Error, Result};
pub use netns::Netns;
pub use socket::{Handle, DEFAULT_TIMEOUT, MAX_DATAGRAM};
pub use tap::{create_tap, MAX_TAP_QUEUES};
pub use types::{
    nud, proto, table, AddrFlags, Address, AddressSpec, Family, Link, MacAddr, MacParseError, Neighbour, OperState, Route, RouteSpec,
    RouteType, Scope, VfConfig, VfLinkState,
};

#[cfg(test)]
mod tests;
