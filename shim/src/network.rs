//! The pod's own network (eth0 and any other CNI interface that is not a VF): each
//! interface CNI left in the pod's network namespace (a veth of bridge, Calico or
//! Flannel; a macvlan or ipvlan) reaches the guest as a virtio-net device on a tap of
//! its own in that namespace, the two joined by tc ingress redirects both ways
//! (Kata's "tcfilter" model). The interface keeps its addresses and MAC on the host
//! side; the guest's interface gets the same name, MAC, MTU, addresses and routes.
//!
//! - The tap is not persistent: the VMM holds its queue files (one per vCPU) and it
//!   goes with the VMM however the VMM ends. What outlives it is the ingress qdisc on
//!   the pod's interface, journaled (the sandbox record's `pod_links`) before it is
//!   made, and removed by [`disconnect`] on every teardown path.
//! - Links that are down are left alone (the kernel's fallback tunnels, `sit0` and
//!   the like, sit in every namespace). An up link of another kind is refused, naming
//!   it, before anything is changed. PCI netdevs (VFs) are the SR-IOV path's.

use std::fs::File;
use std::path::Path;

use vfvm_netlink::{create_tap, Handle, Link, Netns};
use vfvm_protocols::agent as api;

use crate::record::{Journal, PodLinkEntry, RecordError};
use crate::vf::journal::NetdevRecord;

/// The most interfaces of a pod connected this way.
pub const MAX_POD_INTERFACES: usize = 8;
/// The most queue pairs of one interface (the VMM's limit).
pub const MAX_QUEUE_PAIRS: usize = 16;
/// The link kinds connected to a tap.
const CONNECTABLE_KINDS: &[&str] = &["veth", "macvlan", "ipvlan"];

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("pod network namespace {}: {source}", path.display())]
    Netns { path: std::path::PathBuf, source: vfvm_netlink::Error },
    #[error(
        "interface {name:?} in the pod's network namespace is a {kind} link, which vfvm cannot connect to the VM \
         (it connects veth, macvlan and ipvlan interfaces, and VFs of pods with enable_sriov)"
    )]
    Unsupported { name: String, kind: String },
    #[error("{0} interfaces in the pod's network namespace: vfvm connects at most {MAX_POD_INTERFACES}")]
    TooMany(usize),
    #[error("interface {name:?}: {what}: {source}")]
    Connect { name: String, what: &'static str, source: vfvm_netlink::Error },
    #[error("interface {name:?}: reading its configuration: {reason}")]
    Capture { name: String, reason: String },
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// A pod interface joined to a tap.
pub struct TapEndpoint {
    /// The interface as CNI configured it (name, MAC, MTU, addresses, routes).
    pub netdev: NetdevRecord,
    pub tap: String,
    /// The tap's queue files, for the VMM (dropped by the shim once it has them).
    pub files: Vec<File>,
}

/// The tap for the pod's `index`th interface (at most 15 bytes, as link names are).
fn tap_name(index: usize) -> String {
    format!("tap{index}_vfvm")
}

/// Whether `link` is one to connect; `Err` for an up link of a kind vfvm cannot join.
fn connectable(link: &Link) -> Result<bool, NetworkError> {
    if link.name == "lo" || !link.admin_up {
        return Ok(false);
    }
    match link.kind.as_deref() {
        Some(k) if CONNECTABLE_KINDS.contains(&k) => Ok(true),
        // A physical function or a VF: the SR-IOV path's (or nobody's).
        None if link.parent_bus.as_deref() == Some("pci") => Ok(false),
        Some(k) => Err(NetworkError::Unsupported { name: link.name.clone(), kind: k.to_string() }),
        None => Err(NetworkError::Unsupported { name: link.name.clone(), kind: "kernel (no kind)".into() }),
    }
}

/// Connects every interface of the pod network namespace `netns` to a tap with
/// `queues` queue files. Each connection is journaled in `journal` before it is made;
/// on an error the caller undoes the journal (see [`disconnect`]).
pub fn connect(netns: &Path, queues: usize, journal: &Journal) -> Result<Vec<TapEndpoint>, NetworkError> {
    let ns_err = |source| NetworkError::Netns { path: netns.to_path_buf(), source };
    let ns = Netns::open(netns).map_err(ns_err)?;
    let h = Handle::in_netns(&ns).map_err(ns_err)?;
    let mut links = Vec::new();
    for link in h.links().map_err(ns_err)? {
        if connectable(&link)? {
            links.push(link);
        }
    }
    if links.len() > MAX_POD_INTERFACES {
        return Err(NetworkError::TooMany(links.len()));
    }
    let queues = queues.clamp(1, MAX_QUEUE_PAIRS);
    let mut endpoints = Vec::with_capacity(links.len());
    for (i, link) in links.iter().enumerate() {
        let name = link.name.clone();
        let netdev =
            crate::vf::net::capture_netdev(&h, link).map_err(|e| NetworkError::Capture { name: name.clone(), reason: e.to_string() })?;
        let tap = tap_name(i);
        journal.will_connect(PodLinkEntry { netns: netns.to_path_buf(), link: name.clone(), tap: tap.clone() })?;
        let step = |what: &'static str| {
            let name = name.clone();
            move |source| NetworkError::Connect { name, what, source }
        };
        let files = ns.run_in(|| create_tap(&tap, queues)).map_err(step("creating its tap"))?.map_err(step("creating its tap"))?;
        let tap_link = h.link_by_name(&tap).map_err(step("finding its tap"))?;
        h.set_link_mtu(tap_link.index, link.mtu).map_err(step("setting its tap's MTU"))?;
        h.set_link_up(tap_link.index, true).map_err(step("bringing its tap up"))?;
        for (from, to, what) in
            [(link.index, tap_link.index, "redirecting it to its tap"), (tap_link.index, link.index, "redirecting its tap to it")]
        {
            h.add_ingress_qdisc(from).map_err(step("adding an ingress qdisc"))?;
            h.redirect_ingress(from, to).map_err(step(what))?;
        }
        tracing::info!(interface = %name, tap = %tap, queues, "pod interface connected to its tap");
        endpoints.push(TapEndpoint { netdev, tap, files });
    }
    Ok(endpoints)
}

/// Undoes one connection: the ingress qdisc (and so the redirect) on the pod's
/// interface, and the tap if it is still there. A namespace or link that is gone is
/// nothing left to undo.
pub fn disconnect(entry: &PodLinkEntry) -> Result<(), String> {
    let ns = match Netns::open(&entry.netns) {
        Ok(ns) => ns,
        Err(_) if !entry.netns.exists() => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let h = Handle::in_netns(&ns).map_err(|e| e.to_string())?;
    if let Some(link) = h.find_link(&entry.link).map_err(|e| e.to_string())? {
        if h.has_ingress_qdisc(link.index).map_err(|e| e.to_string())? {
            h.delete_ingress_qdisc(link.index).map_err(|e| e.to_string())?;
        }
    }
    if let Some(tap) = h.find_link(&entry.tap).map_err(|e| e.to_string())? {
        match h.delete_link(tap.index) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// The VMM's `--net` arguments (`fd=` the queue files' descriptor numbers, which the
/// VMM inherits).
pub fn vmm_args(endpoints: &[TapEndpoint], datapath: &str) -> Vec<String> {
    use std::os::fd::AsRawFd;
    endpoints
        .iter()
        .flat_map(|e| {
            let fds: Vec<String> = e.files.iter().map(|f| f.as_raw_fd().to_string()).collect();
            let mtu = u16::try_from(e.netdev.mtu).map(|m| format!(",mtu={m}")).unwrap_or_default();
            ["--net".to_string(), format!("fd={},mac={}{mtu},datapath={datapath}", fds.join(":"), e.netdev.mac)]
        })
        .collect()
}

/// What the agent gets: each interface found by its MAC, configured as on the host.
pub fn guest_config(endpoints: &[TapEndpoint], wait_timeout_ms: u32) -> (Vec<api::Interface>, Vec<api::Route>) {
    let mut interfaces = Vec::new();
    let mut routes = Vec::new();
    for e in endpoints {
        let (mut iface, mut r) = crate::sriov::guest_interface(&e.netdev);
        iface.match_mac = e.netdev.mac.clone();
        iface.wait_timeout_ms = wait_timeout_ms;
        interfaces.push(iface);
        routes.append(&mut r);
    }
    (interfaces, routes)
}

#[cfg(test)]
mod tests;
