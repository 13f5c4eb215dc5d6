//! Against the real kernel: a pod namespace with a veth whose peer is in a "bridge"
//! namespace, as the bridge CNI leaves it (needs root).

use std::net::IpAddr;
use std::path::PathBuf;

use vfvm_netlink::{AddressSpec, Handle, Netns, RouteSpec};

use super::*;
use crate::record::{self, Journal};

/// A named pod netns (a bind mount under /run/netns, as CNI makes them) with `eth0`
/// at 198.18.7.2/24, default route via .1, and its peer in a second namespace.
struct Pod {
    path: PathBuf,
    handle: Handle,
    _bridge: Netns,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "delete"]).arg(self.path.file_name().unwrap()).status();
    }
}

fn pod(name: &str) -> Pod {
    let name = format!("{name}-{}", std::process::id());
    let _ = std::process::Command::new("ip").args(["netns", "delete", &name]).status();
    let made = std::process::Command::new("ip").args(["netns", "add", &name]).status().unwrap();
    assert!(made.success(), "ip netns add {name} (run the tests as root)");
    let path = PathBuf::from("/run/netns").join(&name);
    let ns = Netns::open(&path).unwrap();
    let bridge = Netns::new_anonymous().unwrap();
    let handle = Handle::in_netns(&ns).unwrap();
    handle.create_veth("eth0", "peer0", Some(&bridge)).unwrap();
    let eth0 = handle.link_by_name("eth0").unwrap();
    handle.set_link_mtu(eth0.index, 1450).unwrap();
    handle.add_address(eth0.index, &AddressSpec::new("198.18.7.2".parse().unwrap(), 24)).unwrap();
    handle.set_link_up(eth0.index, true).unwrap();
    handle.add_route(&RouteSpec::default_via("198.18.7.1".parse().unwrap())).unwrap();
    Pod { path, handle, _bridge: bridge }
}

fn journal(name: &str) -> (Journal, PathBuf) {
    let dir = std::env::temp_dir().join(format!("vfvm-network-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    (Journal::create(&dir, "sb").unwrap(), dir)
}

#[test]
fn a_veth_is_joined_to_a_tap_journaled_and_the_undo_leaves_nothing() {
    let p = pod("vfvm-net-ok");
    let (j, dir) = journal("ok");
    let mut eps = connect(&p.path, 2, &j).unwrap();
    assert_eq!(eps.len(), 1);
    let e = &eps[0];
    let eth0 = p.handle.link_by_name("eth0").unwrap();
    let tap = p.handle.link_by_name("tap0_vfvm").unwrap();
    assert_eq!((e.tap.as_str(), e.files.len(), e.netdev.name.as_str(), e.netdev.mtu), ("tap0_vfvm", 2, "eth0", 1450));
    assert_eq!(e.netdev.mac, eth0.mac.unwrap().to_string());
    assert_eq!((tap.mtu, tap.admin_up, tap.kind.as_deref()), (1450, true, Some("tun")));
    assert_eq!(p.handle.ingress_redirects(eth0.index).unwrap(), [tap.index]);
    assert_eq!(p.handle.ingress_redirects(tap.index).unwrap(), [eth0.index]);
    // eth0 keeps its address on the host side.
    assert!(p.handle.addresses(eth0.index).unwrap().iter().any(|a| a.addr == "198.18.7.2".parse::<IpAddr>().unwrap()));

    // What the VMM and the agent get.
    let args = vmm_args(&eps, "userspace");
    assert_eq!(args[0], "--net");
    assert!(args[1].starts_with("fd=") && args[1].contains(':'), "{args:?}");
    assert!(args[1].ends_with(&format!(",mac={},mtu=1450,datapath=userspace", e.netdev.mac)), "{args:?}");
    let (ifaces, routes) = guest_config(&eps, 7000);
    assert_eq!(
        (ifaces[0].name.as_str(), ifaces[0].match_mac.as_str(), ifaces[0].pci_address.as_str(), ifaces[0].mtu, ifaces[0].wait_timeout_ms),
        ("eth0", e.netdev.mac.as_str(), "", 1450, 7000)
    );
    assert_eq!(ifaces[0].addresses.iter().map(|a| a.cidr.as_str()).collect::<Vec<_>>(), ["198.18.7.2/24"]);
    let r: Vec<_> = routes.iter().map(|r| (r.dest.as_str(), r.gateway.as_str(), r.device.as_str())).collect();
    assert_eq!(r, [("default", "198.18.7.1", "eth0")]);

    // Journaled before it was made; the undo removes the qdisc and the tap.
    let record = Journal::load(&dir).unwrap().unwrap();
    assert_eq!(record.pod_links, [PodLinkEntry { netns: p.path.clone(), link: "eth0".into(), tap: "tap0_vfvm".into() }]);
    eps.iter_mut().for_each(|e| e.files.clear());
    let done = record::undo(&dir, &dir.join("locks"), Vec::new()).unwrap();
    assert!(done.errors.is_empty(), "{:?}", done.errors);
    assert_eq!(done.disconnected, ["eth0"]);
    assert!(!p.handle.has_ingress_qdisc(eth0.index).unwrap(), "the ingress qdisc is left");
    assert!(p.handle.find_link("tap0_vfvm").unwrap().is_none(), "the tap is left");
    assert!(!dir.exists());
}

#[test]
fn an_interface_vfvm_cannot_join_is_named_and_nothing_is_changed() {
    let p = pod("vfvm-net-tun");
    let ns = Netns::open(&p.path).unwrap();
    // A bare tap/tun device, up, beside eth0 (its file held here).
    let _tun = ns.run_in(|| vfvm_netlink::create_tap("tun9", 1)).unwrap().unwrap();
    let tun = p.handle.link_by_name("tun9").unwrap();
    p.handle.set_link_up(tun.index, true).unwrap();
    let (j, dir) = journal("tun");
    let err = connect(&p.path, 1, &j).err().expect("refused");
    assert!(matches!(err, NetworkError::Unsupported { .. }), "{err}");
    assert!(err.to_string().starts_with("interface \"tun9\" in the pod's network namespace is a tun link"), "{err}");
    let eth0 = p.handle.link_by_name("eth0").unwrap();
    assert!(!p.handle.has_ingress_qdisc(eth0.index).unwrap());
    assert!(p.handle.find_link("tap0_vfvm").unwrap().is_none());
    assert!(Journal::load(&dir).unwrap().unwrap().pod_links.is_empty(), "nothing journaled");
    // Down, the same device is left alone (as the kernel's fallback tunnels are).
    p.handle.set_link_up(tun.index, false).unwrap();
    let mut eps = connect(&p.path, 1, &j).unwrap();
    assert_eq!(eps.iter().map(|e| e.netdev.name.as_str()).collect::<Vec<_>>(), ["eth0"]);
    eps.iter_mut().for_each(|e| e.files.clear());
    let done = record::undo(&dir, &dir.join("locks"), Vec::new()).unwrap();
    assert!(done.errors.is_empty(), "{:?}", done.errors);
    // A namespace already gone (CNI DEL ran first) is nothing left to undo.
    assert_eq!(disconnect(&PodLinkEntry { netns: "/run/netns/vfvm-none".into(), link: "eth0".into(), tap: "tap0_vfvm".into() }), Ok(()));
}
