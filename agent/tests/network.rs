//! The network module against the real kernel: each test makes its own
//! anonymous network namespace with veth pairs in it (needs root). No mocks;
//! the only fake is a sysfs tree for PCI addresses (veths have no PCI parent).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use std::process::Command;
use vfvm_agent::network::{
    Change, DeviceMatch, DeviceSel, Dns, FoundVia, Interface, NetError, Network, NetworkConfig, Options, Route, Wanted,
};
use vfvm_netlink::{proto, table, AddrFlags, Family, Handle, Link, MacAddr, Netns, Scope};

// ---------------------------------------------------------------- helpers

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!("vfvm-agent-net-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Env {
    ns: Netns,
    h: Handle,
    dir: Scratch,
}

impl Env {
    /// A fresh netns with veth `vt0` <-> `vp0`, the peer up (so `vt0` gets carrier
    /// once the agent sets it up).
    fn new() -> Env {
        let ns = Netns::new_anonymous().unwrap();
        let h = Handle::in_netns(&ns).unwrap();
        h.create_veth("vt0", "vp0", None).unwrap();
        let p = h.link_by_name("vp0").unwrap();
        h.set_link_up(p.index, true).unwrap();
        let dir = Scratch::new();
        std::fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).unwrap();
        Env { ns, h, dir }
    }
    fn opts(&self, timeout: Duration) -> Options {
        Options {
            sysfs_root: self.dir.path().join("sys"),
            proc_root: PathBuf::from("/proc"),
            resolv_conf: self.dir.path().join("resolv.conf"),
            device_timeout: timeout,
        }
    }
    fn net(&self) -> Network {
        Network::in_netns(&self.ns, self.opts(Duration::from_secs(5))).unwrap()
    }
    fn link(&self, name: &str) -> Link {
        self.h.link_by_name(name).unwrap()
    }
    /// Makes `<sysfs>/bus/pci/devices/<pci>/net/<name>[/ifindex]`, as the kernel
    /// shows a PCI NIC's netdev.
    fn fake_pci(&self, pci: &str, name: &str, ifindex: Option<u32>) {
        let d = self.dir.path().join("sys/bus/pci/devices").join(pci).join("net").join(name);
        std::fs::create_dir_all(&d).unwrap();
        if let Some(i) = ifindex {
            std::fs::write(d.join("ifindex"), format!("{i}\n")).unwrap();
        }
    }
    /// The addresses of `ifindex`, IPv6 link-local left out.
    fn addrs(&self, ifindex: u32) -> BTreeSet<String> {
        self.h.addresses(ifindex).unwrap().into_iter().filter(|a| !is_ll(&a.addr)).map(|a| format!("{}/{}", a.addr, a.prefix_len)).collect()
    }
    /// Non-kernel main-table routes through `ifindex`, as "dst via gw metric m".
    fn routes(&self, ifindex: u32) -> BTreeSet<String> {
        let mut v = self.h.routes(Family::V4).unwrap();
        v.extend(self.h.routes(Family::V6).unwrap());
        v.into_iter()
            .filter(|r| r.oif == Some(ifindex) && !r.is_kernel_generated())
            .map(|r| {
                let mut s = format!("{}/{}", r.dst, r.dst_len);
                if let Some(g) = r.gateway {
                    s += &format!(" via {g}");
                }
                s += &format!(" metric {}", r.priority.unwrap_or(0));
                s
            })
            .collect()
    }
    /// Everything netlink says about the namespace that the agent could change
    /// (IPv6 link-local state, DAD/carrier flags, which the kernel changes on
    /// its own time, normalised away; the local table is left out: it is derived
    /// from the addresses, and the kernel adds an IPv6 address's local route from
    /// a work queue, some time after the address).
    fn snapshot(&self) -> String {
        let mut out = String::new();
        for l in self.h.links().unwrap() {
            out += &format!("link {} {} mac={:?} mtu={} up={} master={:?}\n", l.index, l.name, l.mac, l.mtu, l.admin_up, l.master);
        }
        let volatile = AddrFlags::TENTATIVE.0 | AddrFlags::OPTIMISTIC.0 | AddrFlags::DADFAILED.0 | AddrFlags::DEPRECATED.0;
        let mut addrs: Vec<String> = self
            .h
            .all_addresses()
            .unwrap()
            .into_iter()
            .filter(|a| !is_ll(&a.addr))
            .map(|a| {
                format!(
                    "addr {} {}/{} peer={:?} brd={:?} scope={:?} flags={:#x} metric={:?}",
                    a.ifindex,
                    a.addr,
                    a.prefix_len,
                    a.peer,
                    a.broadcast,
                    a.scope,
                    a.flags.0 & !volatile,
                    a.route_metric
                )
            })
            .collect();
        addrs.sort();
        for a in addrs {
            out += &a;
            out.push('\n');
        }
        for fam in [Family::V4, Family::V6] {
            let mut rs: Vec<String> = self
                .h
                .routes_in_table(fam, None)
                .unwrap()
                .into_iter()
                .filter(|r| r.table != table::LOCAL)
                .filter(|r| !is_ll(&r.dst) && !r.dst.is_multicast())
                .map(|mut r| {
                    r.linkdown = false;
                    format!("route {r:?}")
                })
                .collect();
            rs.sort();
            for r in rs {
                out += &r;
                out.push('\n');
            }
        }
        out
    }
}

fn is_ll(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80)
}

fn iface(name: &str, device: DeviceMatch, addresses: &[&str]) -> Interface {
    Interface { name: name.into(), device, mac: None, mtu: None, addresses: addresses.iter().map(|s| s.to_string()).collect(), vlan: None }
}

fn by_mac(m: MacAddr) -> DeviceMatch {
    DeviceMatch { pci_address: None, mac: Some(m.to_string()) }
}

fn by_pci(p: &str) -> DeviceMatch {
    DeviceMatch { pci_address: Some(p.into()), mac: None }
}

fn route(dest: &str, gw: Option<&str>, dev: Option<&str>, metric: Option<u32>) -> Route {
    Route { dest: dest.into(), gateway: gw.map(Into::into), device: dev.map(Into::into), scope: None, metric }
}

/// Config "A": rename vt0 (found by its MAC) to eth0, new MAC, MTU, v4+v6,
/// link route, static routes, both default routes, DNS.
fn config_a(found_by: DeviceMatch) -> NetworkConfig {
    let mut i = iface("eth0", found_by, &["198.18.0.2/24", "fd00:18::2/64"]);
    i.mac = Some("02:aa:bb:cc:dd:01".into());
    i.mtu = Some(1400);
    NetworkConfig {
        interfaces: vec![i],
        routes: vec![
            route("default", Some("198.18.0.1"), None, None),
            route("10.20.0.0/16", Some("198.18.0.1"), Some("eth0"), Some(50)),
            route("default", Some("fd00:18::1"), Some("eth0"), None),
            route("10.30.0.0/24", None, Some("eth0"), None),
            route("fd00:99::/64", Some("fd00:18::1"), None, Some(300)),
        ],
        dns: Some(Dns {
            servers: vec!["10.96.0.10".into(), "fd00:18::53".into()],
            searches: vec!["default.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn apply_then_read_back_and_second_apply_is_a_noop() {
    let env = Env::new();
    let vt0 = env.link("vt0");
    let net = env.net();
    let cfg = config_a(by_mac(vt0.mac.unwrap()));

    let report = net.apply(&cfg).unwrap();

    // Link settings.
    let eth0 = env.link("eth0");
    assert_eq!(eth0.index, vt0.index, "renamed in place");
    assert!(env.h.find_link("vt0").unwrap().is_none());
    assert_eq!(eth0.mac, Some(mac("02:aa:bb:cc:dd:01")));
    assert_eq!(eth0.mtu, 1400);
    assert!(eth0.admin_up);
    assert_eq!(report.interfaces, vec![("eth0".to_string(), eth0.index)]);

    // Addresses: exactly the config's (plus the kernel's link-local), the v6 one
    // usable at once (NODAD, not tentative).
    assert_eq!(env.addrs(eth0.index), ["198.18.0.2/24", "fd00:18::2/64"].iter().map(|s| s.to_string()).collect());
    let v6 = env.h.addresses(eth0.index).unwrap().into_iter().find(|a| a.addr == ip("fd00:18::2")).unwrap();
    assert!(v6.flags.contains(AddrFlags::NODAD), "{:?}", v6.flags);
    assert!(!v6.flags.contains(AddrFlags::TENTATIVE), "{:?}", v6.flags);

    // Routes, read back field by field.
    let v4 = env.h.routes(Family::V4).unwrap();
    let v6r = env.h.routes(Family::V6).unwrap();
    let def4 = v4.iter().find(|r| r.dst_len == 0).expect("IPv4 default route");
    assert_eq!(def4.gateway, Some(ip("198.18.0.1")));
    assert_eq!(def4.oif, Some(eth0.index));
    assert_eq!(def4.table, table::MAIN);
    assert_eq!(def4.scope, Scope::Universe);
    let st = v4.iter().find(|r| r.dst == ip("10.20.0.0") && r.dst_len == 16).expect("static route");
    assert_eq!((st.gateway, st.oif, st.priority), (Some(ip("198.18.0.1")), Some(eth0.index), Some(50)));
    let lr = v4.iter().find(|r| r.dst == ip("10.30.0.0") && r.dst_len == 24).expect("link route");
    assert_eq!((lr.gateway, lr.oif, lr.scope), (None, Some(eth0.index), Scope::Link));
    assert_ne!(lr.protocol, proto::KERNEL);
    let def6 = v6r.iter().find(|r| r.dst_len == 0).expect("IPv6 default route");
    assert_eq!((def6.gateway, def6.oif, def6.priority), (Some(ip("fd00:18::1")), Some(eth0.index), Some(1024)));
    let st6 = v6r.iter().find(|r| r.dst == ip("fd00:99::") && r.dst_len == 64).expect("static IPv6 route");
    assert_eq!((st6.gateway, st6.priority), (Some(ip("fd00:18::1")), Some(300)));

    // resolv.conf.
    let rc = std::fs::read_to_string(env.dir.path().join("resolv.conf")).unwrap();
    assert_eq!(
        rc,
        "# Generated by vfvm-agent. Do not edit.\nnameserver 10.96.0.10\nnameserver fd00:18::53\n\
         search default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
    );

    // The report: every change, in the order made; link routes before gateway
    // routes, default routes last.
    let c = &report.changes;
    assert!(c.contains(&Change::Renamed { from: "vt0".into(), to: "eth0".into() }), "{c:?}");
    assert!(c.contains(&Change::MtuSet { link: "eth0".into(), from: 1500, to: 1400 }), "{c:?}");
    assert!(c.iter().any(|x| matches!(x, Change::MacSet { to, .. } if *to == mac("02:aa:bb:cc:dd:01"))));
    assert!(c.contains(&Change::LinkUp { link: "eth0".into() }), "{c:?}");
    let routes: Vec<String> = c
        .iter()
        .filter_map(|x| match x {
            Change::RouteAdded { route } => Some(route.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        routes,
        [
            "#3 \"10.30.0.0/24 dev eth0\"",
            "#1 \"10.20.0.0/16 via 198.18.0.1 dev eth0 metric 50\"",
            "#4 \"fd00:99::/64 via fd00:18::1 metric 300\"",
            "#0 \"default via 198.18.0.1\"",
            "#2 \"default via fd00:18::1 dev eth0\"",
        ],
        "{c:?}"
    );
    assert!(matches!(c.last(), Some(Change::DnsWritten { .. })), "{c:?}");
    assert_eq!(c.len(), 4 + 2 + 5 + 1, "{c:#?}");

    // Second apply: nothing to do, nothing changed. (An empty report means no
    // mutating request was sent: every mutation is recorded.)
    let before = env.snapshot();
    let again = net.apply(&cfg).unwrap();
    assert!(again.is_noop(), "{:#?}", again.changes);
    assert_eq!(env.snapshot(), before);
    // The same through the JSON wire form.
    let json = serde_json::to_vec(&cfg).unwrap();
    let decoded = NetworkConfig::from_json(&json).unwrap();
    assert_eq!(decoded, cfg);
    assert!(net.apply(&decoded).unwrap().is_noop());
    assert_eq!(env.snapshot(), before);
}

#[test]
fn find_by_pci_address_in_sysfs_and_converge_a_then_b() {
    let env = Env::new();
    let vt0 = env.link("vt0");
    let vp0 = env.link("vp0");
    env.fake_pci("0000:00:05.0", "vt0", Some(vt0.index));
    // Things the agent must remove (on the managed link) and leave alone (on
    // vp0, which the config does not name).
    env.h.add_address(vt0.index, &vfvm_netlink::AddressSpec::new(ip("192.0.2.9"), 24)).unwrap();
    env.h.add_address(vp0.index, &vfvm_netlink::AddressSpec::new(ip("192.0.3.1"), 24)).unwrap();
    env.h.add_route(&vfvm_netlink::RouteSpec::new(ip("10.77.0.0"), 16).via(ip("192.0.3.254"))).unwrap();
    let vp0_before = (env.addrs(vp0.index), env.routes(vp0.index));
    let net = env.net();

    let a = config_a(by_pci("0000:00:05.0"));
    net.apply(&a).unwrap();
    let eth0 = env.link("eth0");
    assert_eq!(eth0.index, vt0.index);
    assert_eq!(
        env.addrs(eth0.index),
        ["198.18.0.2/24", "fd00:18::2/64"].iter().map(|s| s.to_string()).collect(),
        "the stray 192.0.2.9/24 was removed"
    );
    // Found by the ifindex sysfs shows even though it was renamed.
    assert!(net.apply(&a).unwrap().is_noop());

    // Config B: other addresses, routes, MTU; no DNS (resolv.conf left alone).
    let mut b = NetworkConfig {
        interfaces: vec![iface("eth0", by_pci("0000:00:05.0"), &["198.19.0.2/24", "fd00:19::2/64"])],
        routes: vec![
            route("default", Some("198.19.0.1"), None, Some(10)),
            route("10.40.0.0/16", Some("198.19.0.1"), Some("eth0"), None),
            route("fd00:40::/48", Some("fd00:19::1"), Some("eth0"), None),
        ],
        dns: None,
    };
    b.interfaces[0].mtu = Some(1500);
    let rep = net.apply(&b).unwrap();
    assert!(rep.changes.iter().any(|c| matches!(c, Change::RouteRemoved { .. })), "{rep:#?}");
    assert_eq!(env.addrs(eth0.index), ["198.19.0.2/24", "fd00:19::2/64"].iter().map(|s| s.to_string()).collect());
    assert_eq!(
        env.routes(eth0.index),
        ["0.0.0.0/0 via 198.19.0.1 metric 10", "10.40.0.0/16 via 198.19.0.1 metric 0", "fd00:40::/48 via fd00:19::1 metric 1024",]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let l = env.link("eth0");
    assert_eq!(l.mtu, 1500);
    // MAC not in B: left as A set it (the agent only sets what is asked).
    assert_eq!(l.mac, Some(mac("02:aa:bb:cc:dd:01")));
    // The unmanaged link is untouched.
    assert_eq!((env.addrs(vp0.index), env.routes(vp0.index)), vp0_before);
    // resolv.conf still A's.
    assert!(std::fs::read_to_string(env.dir.path().join("resolv.conf")).unwrap().contains("10.96.0.10"));
    let before = env.snapshot();
    assert!(net.apply(&b).unwrap().is_noop());
    assert_eq!(env.snapshot(), before);

    // And back to A: A exactly again.
    net.apply(&a).unwrap();
    assert_eq!(env.addrs(eth0.index), ["198.18.0.2/24", "fd00:18::2/64"].iter().map(|s| s.to_string()).collect());
    assert_eq!(env.routes(eth0.index).len(), 5, "{:?}", env.routes(eth0.index));
}

#[test]
fn pci_and_mac_must_agree() {
    let env = Env::new();
    let vt0 = env.link("vt0");
    env.fake_pci("0000:00:05.0", "vt0", Some(vt0.index));
    let net = env.net();
    let before = env.snapshot();
    let cfg = NetworkConfig {
        interfaces: vec![iface(
            "eth0",
            DeviceMatch { pci_address: Some("0000:00:05.0".into()), mac: Some("02:00:00:00:00:99".into()) },
            &[],
        )],
        ..Default::default()
    };
    let e = net.apply(&cfg).unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, NetError::Device { .. }), "{e:?}");
    assert!(s.contains("0000:00:05.0") && s.contains("02:00:00:00:00:99"), "{s}");
    assert_eq!(env.snapshot(), before);
    // With the right MAC it works.
    let mut ok = cfg.clone();
    ok.interfaces[0].device.mac = Some(vt0.mac.unwrap().to_string());
    net.apply(&ok).unwrap();
    assert_eq!(env.link("eth0").index, vt0.index);
}

#[test]
fn renames_can_swap_names() {
    let env = Env::new();
    env.h.create_veth("vt1", "vp1", None).unwrap();
    let vt0 = env.link("vt0");
    let vt1 = env.link("vt1");
    let net = env.net();
    let cfg = NetworkConfig {
        interfaces: vec![
            iface("vt1", by_mac(vt0.mac.unwrap()), &["198.18.0.2/24"]),
            iface("vt0", by_mac(vt1.mac.unwrap()), &["198.18.1.2/24"]),
        ],
        ..Default::default()
    };
    net.apply(&cfg).unwrap();
    assert_eq!(env.link("vt1").index, vt0.index);
    assert_eq!(env.link("vt0").index, vt1.index);
    assert!(net.apply(&cfg).unwrap().is_noop());
}

/// UpdateInterface, one interface per call, as the shim configures a pod's VF and its
/// eth0: the kernel named the VF's device `vt1` and the virtio-net device `vt0`, the
/// pod wants them the other way round. Each call moves an unconfigured holder of its
/// name out of the way; a name held by an interface the agent configured stays an
/// error, and `lo` is never moved.
#[test]
fn one_interface_per_call_takes_its_name_from_a_device_not_yet_configured() {
    let env = Env::new();
    env.h.create_veth("vt1", "vp1", None).unwrap();
    let vt0 = env.link("vt0");
    let vt1 = env.link("vt1");
    let net = env.net();
    let first = net.update_interface(&iface("vt1", by_mac(vt0.mac.unwrap()), &["198.18.0.2/24"]), None).unwrap();
    assert!(first.changes.iter().any(|c| matches!(c, Change::Renamed { from, .. } if from == "vt1")), "{first:#?}");
    assert_eq!(env.link("vt1").index, vt0.index);
    net.update_interface(&iface("vt0", by_mac(vt1.mac.unwrap()), &["198.18.1.2/24"]), None).unwrap();
    assert_eq!(env.link("vt0").index, vt1.index);
    assert_eq!(net.configured().len(), 2);
    // Now both names are the agent's: a third interface wanting one is refused.
    env.h.create_veth("vt2", "vp2", None).unwrap();
    let vt2 = env.link("vt2");
    let e = net.update_interface(&iface("vt0", by_mac(vt2.mac.unwrap()), &[]), None).unwrap_err();
    assert!(e.to_string().contains("as interface") || e.to_string().contains("the name is taken"), "{e}");
    assert_eq!(env.link("vt0").index, vt1.index, "the configured interface kept its name");
    let e = net.update_interface(&iface("lo", by_mac(vt2.mac.unwrap()), &[]), None).unwrap_err();
    assert!(e.to_string().contains("the name is taken by link \"lo\""), "{e}");
}

#[test]
fn a_device_that_never_appears_times_out_clearly() {
    let env = Env::new();
    let timeout = Duration::from_millis(300);
    let net = Network::in_netns(&env.ns, env.opts(timeout)).unwrap();
    let before = env.snapshot();
    for (dev, what) in [(by_pci("0000:00:1f.7"), "PCI address 0000:00:1f.7"), (by_mac(mac("02:de:ad:00:00:01")), "MAC 02:de:ad:00:00:01")] {
        let cfg = NetworkConfig { interfaces: vec![iface("eth9", dev, &["198.18.0.2/24"])], ..Default::default() };
        let t = Instant::now();
        let e = net.apply(&cfg).unwrap_err();
        let took = t.elapsed();
        assert!(matches!(e, NetError::DeviceTimeout { .. }), "{e:?}");
        let s = e.to_string();
        assert!(s.contains(what) && s.contains("300ms") && s.contains("eth9"), "{s}");
        assert!(took >= timeout, "gave up early: {took:?}");
        assert!(took < timeout + Duration::from_millis(700), "overran: {took:?}");
    }
    assert_eq!(env.snapshot(), before);
}

/// A uevent socket in the test's netns sees the `add` of a veth made there
/// (netdev uevents are delivered only in the device's namespace).
#[test]
fn hotplug_by_mac_is_found_through_uevents() {
    let env = Env::new();
    let staging = Netns::new_anonymous().unwrap();
    let sh = Handle::in_netns(&staging).unwrap();
    let want_mac = mac("02:42:00:00:00:07");
    let net = env.net();
    let target = Netns::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&env.ns)))).unwrap();
    let mut creator = None;
    let want = Wanted { name: "eth1", device: DeviceSel { pci: None, mac: Some(want_mac) }, set_mac: None };
    let (link, via) = net
        .wait_for_device(&want, Duration::from_secs(5), || {
            // The first look has missed; the socket is subscribed. Make the
            // device elsewhere with its MAC, then move it in (as a hot-plugged
            // NIC arrives: an `add` in this namespace).
            creator = Some(std::thread::spawn(move || {
                sh.create_veth("hp0", "hp1", None).unwrap();
                let l = sh.link_by_name("hp0").unwrap();
                sh.set_link_mac(l.index, want_mac).unwrap();
                sh.move_link_to_netns(l.index, &target, None).unwrap();
            }));
        })
        .unwrap();
    creator.unwrap().join().unwrap();
    assert_eq!(link.name, "hp0");
    assert_eq!(link.mac, Some(want_mac));
    assert!(matches!(via, FoundVia::Uevent { .. }), "{via:?}");
}

#[test]
fn hotplug_by_pci_address_is_found_through_uevents() {
    let env = Env::new();
    // sysfs names the netdev before it exists in netlink: the first look misses.
    env.fake_pci("0000:00:06.0", "hpp0", None);
    let net = env.net();
    let h2 = Handle::in_netns(&env.ns).unwrap();
    let mut creator = None;
    let want = Wanted { name: "eth2", device: DeviceSel { pci: Some("0000:00:06.0".parse().unwrap()), mac: None }, set_mac: None };
    let t = Instant::now();
    let (link, via) = net
        .wait_for_device(&want, Duration::from_secs(5), || {
            creator = Some(std::thread::spawn(move || {
                h2.create_veth("hpp0", "hpp1", None).unwrap();
            }));
        })
        .unwrap();
    creator.unwrap().join().unwrap();
    assert_eq!(link.name, "hpp0");
    assert!(matches!(via, FoundVia::Uevent { .. }), "{via:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // And a whole apply for it, now that it is there, finds it at once.
    let cfg = NetworkConfig { interfaces: vec![iface("eth2", by_pci("0000:00:06.0"), &["198.18.6.2/24"])], ..Default::default() };
    let r = net.apply(&cfg).unwrap();
    assert!(r.changes.contains(&Change::Renamed { from: "hpp0".into(), to: "eth2".into() }));
}

/// `apply` itself waits: the device arrives while it waits (whichever way it
/// is found, the config is applied).
#[test]
fn apply_waits_for_a_late_device() {
    let env = Env::new();
    let net = env.net();
    let staging = Netns::new_anonymous().unwrap();
    let sh = Handle::in_netns(&staging).unwrap();
    let target = Netns::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&env.ns)))).unwrap();
    let m = mac("02:42:00:00:00:08");
    let t = std::thread::spawn(move || {
        sh.create_veth("late0", "late1", None).unwrap();
        let l = sh.link_by_name("late0").unwrap();
        sh.set_link_mac(l.index, m).unwrap();
        sh.move_link_to_netns(l.index, &target, None).unwrap();
    });
    let cfg = NetworkConfig { interfaces: vec![iface("eth3", by_mac(m), &["198.18.8.2/24"])], ..Default::default() };
    let r = net.apply(&cfg).unwrap();
    t.join().unwrap();
    assert_eq!(r.interfaces[0].0, "eth3");
    assert_eq!(env.link("eth3").mac, Some(m));
}

// ---------------------------------------------------------------- bad input

/// Applies `cfg`, expects an error whose text contains every `needle`, and
/// checks nothing changed.
fn refused(env: &Env, net: &Network, cfg: &NetworkConfig, needles: &[&str]) -> NetError {
    let before = env.snapshot();
    let rc = env.dir.path().join("resolv.conf");
    let e = net.apply(cfg).unwrap_err();
    let s = e.to_string();
    for n in needles {
        assert!(s.contains(n), "{n:?} not in {s:?}");
    }
    assert_eq!(env.snapshot(), before, "changed something: {s}");
    assert!(!rc.exists(), "wrote resolv.conf: {s}");
    e
}

fn good(env: &Env) -> NetworkConfig {
    config_a(by_mac(env.link("vt0").mac.unwrap()))
}

#[test]
fn invalid_address_is_refused_naming_field_and_value() {
    let env = Env::new();
    let net = env.net();
    let mut cfg = good(&env);
    cfg.interfaces[0].addresses.push("300.1.1.1/33".into());
    let e = refused(&env, &net, &cfg, &["interfaces[0].addresses[2]", "\"300.1.1.1/33\"", "not an IPv4 or IPv6 address"]);
    assert!(matches!(e, NetError::Invalid { .. }));
    cfg.interfaces[0].addresses[2] = "10.1.1.1/33".into();
    refused(&env, &net, &cfg, &["interfaces[0].addresses[2]", "prefix length 33 is longer than 32"]);
    cfg.interfaces[0].addresses[2] = "10.1.1.1".into();
    refused(&env, &net, &cfg, &["interfaces[0].addresses[2]", "ADDRESS/PREFIX_LENGTH"]);
    cfg.interfaces[0].addresses[2] = "fd00::1/129".into();
    refused(&env, &net, &cfg, &["prefix length 129 is longer than 128"]);
}

#[test]
fn unreachable_gateway_is_refused_naming_the_route() {
    let env = Env::new();
    let net = env.net();
    let mut cfg = good(&env);
    cfg.routes.push(route("10.50.0.0/16", Some("203.0.113.1"), Some("eth0"), None));
    let e = refused(&env, &net, &cfg, &["route #5 \"10.50.0.0/16 via 203.0.113.1 dev eth0\"", "gateway 203.0.113.1 is unreachable"]);
    assert!(matches!(e, NetError::Route { .. }), "{e:?}");
    // IPv6, no device given: no configured prefix on any interface covers it.
    let mut cfg = good(&env);
    cfg.routes.push(route("fd00:51::/64", Some("fd00:77::1"), None, None));
    refused(&env, &net, &cfg, &["#5 \"fd00:51::/64 via fd00:77::1\"", "fd00:77::1 is unreachable", "on any interface"]);
    // Covered by vp0's address, but the route says eth0.
    let vp0 = env.link("vp0");
    env.h.add_address(vp0.index, &vfvm_netlink::AddressSpec::new(ip("192.0.3.1"), 24)).unwrap();
    let mut cfg = good(&env);
    cfg.routes.push(route("10.52.0.0/16", Some("192.0.3.254"), Some("eth0"), None));
    refused(&env, &net, &cfg, &["#5", "192.0.3.254 is unreachable", "on device \"eth0\""]);
    // Without a device it is reachable through vp0, which the agent does not manage.
    cfg.routes[5].device = None;
    net.apply(&cfg).unwrap();
    let r = env.h.routes(Family::V4).unwrap().into_iter().find(|r| r.dst == ip("10.52.0.0")).unwrap();
    assert_eq!(r.oif, Some(vp0.index));
}

#[test]
fn unknown_route_device_is_refused() {
    let env = Env::new();
    let net = env.net();
    let mut cfg = good(&env);
    cfg.routes.push(route("10.60.0.0/16", None, Some("nope0"), None));
    refused(&env, &net, &cfg, &["10.60.0.0/16 dev nope0", "\"nope0\" is neither an interface of this config nor an existing link"]);
    // The current name of a link the config renames is not a valid route device either.
    let mut cfg = good(&env);
    cfg.routes.push(route("10.60.0.0/16", None, Some("vt0"), None));
    refused(&env, &net, &cfg, &["dev vt0", "neither"]);
}

#[test]
fn oversized_lists_and_long_names_are_refused() {
    let env = Env::new();
    let net = env.net();
    let mut cfg = good(&env);
    cfg.interfaces[0].name = "a-name-of-16-byt".into();
    refused(&env, &net, &cfg, &["interfaces[0].name", "a-name-of-16-byt", "1 to 15 bytes"]);

    let mut cfg = good(&env);
    cfg.interfaces = (0..65).map(|i| iface(&format!("e{i}"), by_mac(mac(&format!("02:00:00:00:01:{i:02x}"))), &[])).collect();
    refused(&env, &net, &cfg, &["interfaces", "65 entries", "at most 64"]);

    let mut cfg = good(&env);
    cfg.routes = (0..257).map(|i| route(&format!("10.{}.{}.0/24", i / 256, i % 256), Some("198.18.0.1"), None, None)).collect();
    refused(&env, &net, &cfg, &["routes", "257 entries", "at most 256"]);

    let mut cfg = good(&env);
    cfg.dns.as_mut().unwrap().servers = (0..17).map(|i| format!("10.0.0.{}", i + 1)).collect();
    refused(&env, &net, &cfg, &["dns.servers", "17 entries", "at most 16"]);

    let mut cfg = good(&env);
    cfg.interfaces[0].addresses = (0..65).map(|i| format!("10.9.{}.1/24", i)).collect();
    refused(&env, &net, &cfg, &["interfaces[0].addresses", "65 entries", "at most 64"]);

    // The JSON wire form: too big, unknown fields, wrong types.
    let big = vec![b' '; (1 << 20) + 1];
    assert!(NetworkConfig::from_json(&big).unwrap_err().to_string().contains("bytes"));
    let e = NetworkConfig::from_json(br#"{"interfaces":[],"bogus":1}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
    let e = NetworkConfig::from_json(br#"{"interfaces":[{"name":"eth0","device":{},"mtu":-1}]}"#).unwrap_err();
    assert!(matches!(e, NetError::Decode(_)), "{e}");
}

#[test]
fn other_bad_fields_are_refused() {
    let env = Env::new();
    let net = env.net();
    type Edit = Box<dyn Fn(&mut NetworkConfig)>;
    let cases: Vec<(Edit, &[&str])> = vec![
        (Box::new(|c| c.interfaces[0].mtu = Some(1000)), &["interfaces[0].mtu", "IPv6 needs an MTU of at least 1280"]),
        (Box::new(|c| c.interfaces[0].mtu = Some(67)), &["interfaces[0].mtu", "68 to 65535"]),
        (Box::new(|c| c.interfaces[0].mac = Some("03:00:00:00:00:01".into())), &["interfaces[0].mac", "unicast"]),
        (Box::new(|c| c.interfaces[0].device = DeviceMatch::default()), &["interfaces[0].device", "pci_address and/or mac"]),
        (
            Box::new(|c| c.interfaces[0].device.pci_address = Some("0000:00:05".into())),
            &["interfaces[0].device.pci_address", "DDDD:BB:DD.F"],
        ),
        (Box::new(|c| c.routes[1].dest = "10.20.0.1/16".into()), &["routes[1].dest", "beyond the prefix length"]),
        (Box::new(|c| c.routes[0].gateway = Some("fd00:18::1".into())), &["routes[", "same destination and metric"]),
        (Box::new(|c| c.routes[1].gateway = Some("fd00:18::1".into())), &["routes[1].gateway", "not of the destination's family"]),
        (Box::new(|c| c.routes[3].scope = Some("planet".into())), &["routes[3].scope", "planet"]),
        (Box::new(|c| c.routes[0].device = None), &[]), // fine: not an error
        (Box::new(|c| c.dns.as_mut().unwrap().options.push("ndots:5\nnameserver 6.6.6.6".into())), &["dns.options[1]"]),
        (Box::new(|c| c.interfaces.push(c.interfaces[0].clone())), &["interfaces[1].name", "another interface has this name"]),
    ];
    for (edit, needles) in cases {
        let mut cfg = good(&env);
        edit(&mut cfg);
        if needles.is_empty() {
            assert!(cfg.validate().is_ok());
            continue;
        }
        let e = refused(&env, &net, &cfg, needles);
        assert!(matches!(e, NetError::Invalid { .. }), "{e:?}");
    }
}

/// A VLAN interface "vlan42" (id 42) on vt0, found by vt0's MAC, with
/// addresses, an MTU, a MAC of its own and routes through it.
fn vlan_config(env: &Env) -> NetworkConfig {
    let mut i = iface("vlan42", by_mac(env.link("vt0").mac.unwrap()), &["198.18.42.2/24", "fd00:42::2/64"]);
    i.vlan = Some(42);
    i.mtu = Some(1400);
    i.mac = Some("02:42:00:00:00:02".into());
    NetworkConfig {
        interfaces: vec![i],
        routes: vec![
            route("10.42.0.0/16", Some("198.18.42.1"), Some("vlan42"), None),
            route("default", Some("198.18.42.1"), None, None),
            route("fd00:4242::/64", None, Some("vlan42"), Some(100)),
        ],
        dns: None,
    }
}

fn kernel_has_8021q(env: &Env) -> bool {
    env.h.vlan_supported().unwrap()
}

/// VLAN ids outside 1..=4094 are refused by validation, before anything.
#[test]
fn vlan_ids_are_validated() {
    let env = Env::new();
    let net = env.net();
    for bad in [0u16, 4095, 4096, u16::MAX] {
        let mut cfg = vlan_config(&env);
        cfg.interfaces[0].vlan = Some(bad);
        let e = refused(&env, &net, &cfg, &["interfaces[0].vlan", &format!("{bad:?}"), "1 to 4094"]);
        assert!(matches!(e, NetError::Invalid { .. }), "{e:?}");
    }
    for ok in [1u16, 4094] {
        let mut cfg = vlan_config(&env);
        cfg.interfaces[0].vlan = Some(ok);
        assert!(cfg.validate().is_ok());
    }
}

/// Checks against the system come before the kernel's 802.1Q support is
/// asked for, so they are testable here: a VLAN MTU above the parent's (its MTU
/// after this config), two VLAN interfaces with one id on one parent, a name
/// held by the parent or by another link. Nothing changes.
#[test]
fn vlan_checks_against_the_system_come_first() {
    let env = Env::new();
    let net = env.net();
    let vt0 = env.link("vt0");
    assert_eq!(vt0.mtu, 1500);

    // VLAN MTU above the parent's current MTU.
    let mut cfg = vlan_config(&env);
    cfg.interfaces[0].mtu = Some(1600);
    let e = refused(&env, &net, &cfg, &["interface \"vlan42\"", "MTU 1600 of VLAN 42 is above the MTU 1500 of its parent \"vt0\""]);
    assert!(matches!(e, NetError::Device { .. }), "{e:?}");

    // The parent configured by the same config (no vlan, same selector): its
    // new MTU counts.
    let mut cfg = vlan_config(&env);
    let mut parent = iface("eth0", cfg.interfaces[0].device.clone(), &[]);
    parent.mtu = Some(1300);
    cfg.interfaces.insert(0, parent);
    let e = refused(&env, &net, &cfg, &["MTU 1400 of VLAN 42 is above the MTU 1300 of its parent \"vt0\""]);
    assert!(matches!(e, NetError::Device { .. }), "{e:?}");

    // Two VLAN interfaces with one id on one parent: the same selector is
    // caught by validation, two selectors of one device when it is found.
    let mut cfg = vlan_config(&env);
    let mut twin = cfg.interfaces[0].clone();
    twin.name = "vlan42b".into();
    twin.addresses.clear();
    cfg.interfaces.push(twin);
    refused(&env, &net, &cfg, &["interfaces[1].device.mac", "another interface has a VLAN of this id on this MAC"]);
    env.fake_pci("0000:00:07.0", "vt0", Some(vt0.index));
    cfg.interfaces[1].device = by_pci("0000:00:07.0");
    refused(&env, &net, &cfg, &["interface \"vlan42", "VLAN 42 on \"vt0\"", "a parent has one VLAN link per id"]);
    // Distinct ids on one parent pass validation.
    cfg.interfaces[1].vlan = Some(43);
    assert!(cfg.validate().is_ok());

    // The VLAN named like its (unmanaged) parent.
    let mut cfg = vlan_config(&env);
    cfg.interfaces[0].name = "vt0".into();
    cfg.routes.clear();
    refused(&env, &net, &cfg, &["interface \"vt0\"", "the name is that of the VLAN's parent device"]);

    // The name held by a link that is not that VLAN.
    let mut cfg = vlan_config(&env);
    cfg.interfaces[0].name = "vp0".into();
    cfg.routes.clear();
    refused(&env, &net, &cfg, &["interface \"vp0\"", "link \"vp0\"", "veth", "exists but is not VLAN 42 on \"vt0\""]);
}

/// This host's kernel has no 802.1Q: a VLAN that must be created is an
/// explicit error that says so, before any change.
#[test]
fn vlan_without_kernel_8021q_is_refused_clearly() {
    let env = Env::new();
    if kernel_has_8021q(&env) {
        eprintln!("this kernel has 802.1Q: the lab_ VLAN tests cover it");
        return;
    }
    let net = env.net();
    // Also with the parent configured by the same config, up to MTU 9000.
    for with_parent in [false, true] {
        let mut cfg = vlan_config(&env);
        if with_parent {
            let mut parent = iface("eth0", cfg.interfaces[0].device.clone(), &["10.9.0.2/24"]);
            parent.mtu = Some(9000);
            cfg.interfaces[0].mtu = Some(9000);
            cfg.interfaces.insert(0, parent);
        }
        let e = refused(
            &env,
            &net,
            &cfg,
            &[
                "interface \"vlan42\"",
                "VLAN 42 is unsupported here",
                "the kernel has no 802.1Q VLAN support",
                "/proc/net/vlan/config is missing",
                "8021q",
            ],
        );
        assert!(matches!(e, NetError::VlanUnsupported { vlan: 42, .. }), "{e:?}");
        eprintln!("{e}");
    }
    // The per-call entry point too.
    let cfg = vlan_config(&env);
    let e = net.update_interface(&cfg.interfaces[0], None).unwrap_err();
    assert!(matches!(e, NetError::VlanUnsupported { .. }), "{e:?}");
    assert!(net.configured().is_empty());
}

#[test]
fn route_colliding_with_an_unmanaged_route_is_refused() {
    let env = Env::new();
    let vp0 = env.link("vp0");
    env.h.add_address(vp0.index, &vfvm_netlink::AddressSpec::new(ip("192.0.3.1"), 24)).unwrap();
    env.h.add_route(&vfvm_netlink::RouteSpec::new(ip("10.20.0.0"), 16).via(ip("192.0.3.254")).metric(50)).unwrap();
    let net = env.net();
    let cfg = good(&env);
    refused(
        &env,
        &net,
        &cfg,
        &["#1 \"10.20.0.0/16 via 198.18.0.1 dev eth0 metric 50\"", "10.20.0.0/16 via 192.0.3.254 dev vp0 metric 50", "does not manage"],
    );
}

/// Netdev uevents are delivered only to uevent sockets in the device's own
/// namespace: why the agent opens its socket in the namespace it configures.
/// (Deterministic: a socket sees its namespace's events in order, so when A's
/// socket sees A's device, B's earlier device would have come first.)
#[test]
fn netdev_uevents_are_per_namespace() {
    use vfvm_agent::network::{Recv, UeventSocket};
    let a = Netns::new_anonymous().unwrap();
    let b = Netns::new_anonymous().unwrap();
    let sa = UeventSocket::open_in(&a).unwrap();
    Handle::in_netns(&b).unwrap().create_veth("inb0", "inb1", None).unwrap();
    Handle::in_netns(&a).unwrap().create_veth("ina0", "ina1", None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    loop {
        match sa.recv(deadline).unwrap() {
            Recv::Event(e) => {
                if let Some(i) = e.interface.clone() {
                    seen.push(i);
                    // veth registers the peer first, then the device.
                    if seen.iter().any(|s| s == "ina0") && seen.iter().any(|s| s == "ina1") {
                        break;
                    }
                }
            }
            Recv::Overflow => panic!("overflow"),
            Recv::Timeout => panic!("no uevents for ina0 and ina1; saw {seen:?}"),
        }
    }
    assert!(seen.iter().all(|i| i.starts_with("ina")), "{seen:?}");
}

/// The per-call entry points the agent's RPCs map to: UpdateInterface,
/// UpdateRoutes, SetDns, RemoveInterface.
#[test]
fn per_call_entry_points_converge_and_are_idempotent() {
    let env = Env::new();
    let vt0 = env.link("vt0");
    let net = env.net();
    let a = config_a(by_mac(vt0.mac.unwrap()));

    let r = net.update_interface(&a.interfaces[0], Some(Duration::from_millis(500))).unwrap();
    assert!(r.changes.contains(&Change::Renamed { from: "vt0".into(), to: "eth0".into() }));
    assert!(!r.changes.iter().any(|c| matches!(c, Change::RouteAdded { .. })));
    assert_eq!(net.configured(), vec![("eth0".to_string(), vt0.index)]);
    let r = net.update_routes(&a.routes).unwrap();
    assert_eq!(r.changes.len(), 5, "{r:#?}");
    let r = net.set_dns(a.dns.as_ref().unwrap()).unwrap();
    assert_eq!(r.changes.len(), 1);

    // Same again: nothing.
    let before = env.snapshot();
    assert!(net.update_interface(&a.interfaces[0], None).unwrap().is_noop());
    assert!(net.update_routes(&a.routes).unwrap().is_noop());
    assert!(net.set_dns(a.dns.as_ref().unwrap()).unwrap().is_noop());
    // A whole apply of the same state is a no-op too.
    assert!(net.apply(&a).unwrap().is_noop());
    assert_eq!(env.snapshot(), before);

    // UpdateRoutes converges the route set of the configured interfaces.
    let r = net.update_routes(&[route("default", Some("198.18.0.254"), None, None)]).unwrap();
    assert_eq!(env.routes(vt0.index), ["0.0.0.0/0 via 198.18.0.254 metric 0".to_string()].into_iter().collect(), "{r:#?}");
    // A route through a device the agent has not configured but which exists
    // is fine, and not owned (a later UpdateRoutes leaves other devices alone).
    let vp0 = env.link("vp0");
    net.update_routes(&[route("default", Some("198.18.0.254"), None, None), route("10.88.0.0/16", None, Some("vp0"), None)]).unwrap();
    net.update_routes(&[route("default", Some("198.18.0.254"), None, None)]).unwrap();
    assert_eq!(env.routes(vp0.index).len(), 1, "vp0's route is not the agent's to remove");

    // RemoveInterface: addresses gone (link-local aside), down, forgotten.
    let r = net.remove_interface("eth0").unwrap();
    assert!(r.changes.contains(&Change::LinkDown { link: "eth0".into() }));
    assert!(env.addrs(vt0.index).is_empty());
    assert!(!env.link("eth0").admin_up);
    assert!(net.configured().is_empty());
    let e = net.remove_interface("eth0").unwrap_err();
    assert!(e.to_string().contains("has not configured"), "{e}");
}

// ---------------------------------------------------------------- lab tests

/// Loads a module in the lab (L2 runs Debian's kernel with its modules).
fn lab_modprobe(m: &str) {
    assert!(std::env::var_os("VFVM_LAB_INSIDE").is_some(), "this test needs the lab: run it with cargo xtask test / cargo xtask lab run");
    let st = Command::new("modprobe").arg(m).status().unwrap();
    assert!(st.success(), "modprobe {m}: {st}");
}

fn ip_json(env: &Env, args: &[&str]) -> String {
    let out = env.ns.run_in(|| Command::new("ip").arg("-j").args(args).output()).unwrap().unwrap();
    assert!(out.status.success(), "ip -j {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_vlan_interface_applies_and_is_idempotent() {
    lab_modprobe("8021q");
    lab_modprobe("veth");
    let env = Env::new();
    assert!(kernel_has_8021q(&env));
    let net = env.net();
    let vt0 = env.link("vt0");
    let cfg = vlan_config(&env);

    // First apply: parent up, VLAN link created and configured, routes.
    let r = net.apply(&cfg).unwrap();
    for c in &r.changes {
        eprintln!("change: {c}");
    }
    let v = env.link("vlan42");
    assert_eq!(r.interfaces, vec![("vlan42".to_string(), v.index)]);
    let c = &r.changes;
    let pos = |want: &Change| c.iter().position(|x| x == want).unwrap_or_else(|| panic!("{want:?} not in {c:#?}"));
    let parent_up = pos(&Change::LinkUp { link: "vt0".into() });
    let created = pos(&Change::VlanCreated { link: "vlan42".into(), parent: "vt0".into(), vlan: 42 });
    let up = pos(&Change::LinkUp { link: "vlan42".into() });
    assert!(parent_up < created && created < up, "{c:#?}");
    assert_eq!(c.iter().filter(|x| matches!(x, Change::RouteAdded { .. })).count(), 3, "{c:#?}");
    // Read back with netlink.
    assert_eq!(v.kind.as_deref(), Some("vlan"));
    assert_eq!(v.vlan_id, Some(42));
    assert_eq!(v.link, Some(vt0.index));
    assert_eq!(v.mtu, 1400);
    assert_eq!(v.mac, Some(mac("02:42:00:00:00:02")));
    assert!(v.admin_up);
    let p = env.link("vt0");
    assert!(p.admin_up, "the parent is up");
    assert_eq!((p.index, p.mtu, p.mac), (vt0.index, vt0.mtu, vt0.mac), "and otherwise untouched");
    assert!(env.addrs(vt0.index).is_empty());
    assert_eq!(env.addrs(v.index), ["198.18.42.2/24", "fd00:42::2/64"].into_iter().map(String::from).collect());
    assert_eq!(
        env.routes(v.index),
        ["10.42.0.0/16 via 198.18.42.1 metric 0", "0.0.0.0/0 via 198.18.42.1 metric 0", "fd00:4242::/64 metric 100",]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert!(env.routes(vt0.index).is_empty());
    // And with iproute2.
    let j = ip_json(&env, &["-d", "link", "show", "dev", "vlan42"]);
    eprintln!("{j}");
    assert!(
        j.contains("\"info_kind\":\"vlan\"")
            && j.contains("\"protocol\":\"802.1Q\"")
            && j.contains("\"id\":42")
            && j.contains("\"link\":\"vt0\"")
            && j.contains("\"mtu\":1400"),
        "{j}"
    );
    assert_eq!(net.configured(), vec![("vlan42".to_string(), v.index)]);

    // Second apply: nothing to do, nothing changed.
    let before = env.snapshot();
    let r = net.apply(&cfg).unwrap();
    assert!(r.is_noop(), "{r:#?}");
    assert_eq!(r.interfaces, vec![("vlan42".to_string(), v.index)]);
    assert!(net.update_interface(&cfg.interfaces[0], None).unwrap().is_noop());
    assert_eq!(env.snapshot(), before);
    eprintln!("second apply: no change");

    // Converge: another address, MTU back to the parent's; the link is kept.
    let mut cfg2 = cfg.clone();
    cfg2.interfaces[0].addresses = vec!["198.18.42.3/24".into()];
    cfg2.interfaces[0].mtu = Some(1500);
    cfg2.routes.truncate(2);
    let r = net.apply(&cfg2).unwrap();
    assert!(!r.changes.iter().any(|c| matches!(c, Change::VlanCreated { .. })), "{r:#?}");
    assert_eq!(env.link("vlan42").index, v.index);
    assert_eq!(env.link("vlan42").mtu, 1500);
    assert_eq!(env.addrs(v.index), ["198.18.42.3/24".to_string()].into_iter().collect());
    assert!(net.apply(&cfg2).unwrap().is_noop());

    // Conflicts, refused before any change: the name held by a VLAN link with
    // another id, or on another parent.
    let mut other = cfg2.clone();
    other.interfaces[0].vlan = Some(43);
    let e = refused(
        &env,
        &net,
        &other,
        &["interface \"vlan42\"", "link \"vlan42\"", "vlan 42 on \"vt0\"", "exists but is not VLAN 43 on \"vt0\""],
    );
    eprintln!("conflicting id: {e}");
    let vp0 = env.link("vp0");
    env.h.create_vlan("vp0.7", vp0.index, 7).unwrap();
    let mut other = cfg2.clone();
    other.interfaces[0].name = "vp0.7".into();
    other.interfaces[0].vlan = Some(7);
    other.routes.clear();
    let e = refused(&env, &net, &other, &["link \"vp0.7\"", "vlan 7 on \"vp0\"", "exists but is not VLAN 7 on \"vt0\""]);
    eprintln!("conflicting parent: {e}");

    // A VLAN link that exists with that id on that parent under another name
    // is adopted (renamed), not duplicated; a second VLAN on the same parent.
    env.h.create_vlan("tmp100", vt0.index, 100).unwrap();
    let t100 = env.link("tmp100");
    let mut two = cfg2.clone();
    let mut i100 = iface("vlan100", two.interfaces[0].device.clone(), &["198.18.100.2/24"]);
    i100.vlan = Some(100);
    two.interfaces.push(i100);
    let r = net.apply(&two).unwrap();
    assert!(r.changes.contains(&Change::Renamed { from: "tmp100".into(), to: "vlan100".into() }), "{r:#?}");
    assert!(!r.changes.iter().any(|c| matches!(c, Change::VlanCreated { .. })), "{r:#?}");
    assert_eq!(env.link("vlan100").index, t100.index);
    assert!(net.apply(&two).unwrap().is_noop());

    // RemoveInterface deletes the VLAN link; the parent stays.
    let r = net.remove_interface("vlan100").unwrap();
    assert_eq!(r.changes, vec![Change::LinkDeleted { link: "vlan100".into() }]);
    assert!(env.h.find_link("vlan100").unwrap().is_none());
    assert!(env.link("vt0").admin_up);
    assert_eq!(net.configured(), vec![("vlan42".to_string(), v.index)]);

    // The parent configured by the same config (found by the same MAC),
    // raised to MTU 9000 before its VLAN gets 9000.
    let mut both = cfg.clone();
    both.interfaces[0].mtu = Some(9000);
    let mut parent = iface("eth0", both.interfaces[0].device.clone(), &["10.9.0.2/24"]);
    parent.mtu = Some(9000);
    both.interfaces.insert(0, parent);
    let r = net.apply(&both).unwrap();
    for c in &r.changes {
        eprintln!("change: {c}");
    }
    let eth0 = env.link("eth0");
    assert_eq!((eth0.index, eth0.mtu), (vt0.index, 9000));
    let v = env.link("vlan42");
    assert_eq!((v.mtu, v.link, v.vlan_id), (9000, Some(vt0.index), Some(42)));
    assert_eq!(r.interfaces, vec![("eth0".to_string(), vt0.index), ("vlan42".to_string(), v.index)]);
    let before = env.snapshot();
    assert!(net.apply(&both).unwrap().is_noop());
    assert_eq!(env.snapshot(), before);
    eprintln!("VLAN on a configured parent: second apply no change");
}
