//! Tests against the real kernel: each test makes its own anonymous network
//! namespace(s) (needs root / CAP_SYS_ADMIN). `lab_*` tests need the nested lab.

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

/// A fresh netns with a veth pair `vt0` <-> `vt1` in it.
fn setup() -> (Netns, Handle, Link, Link) {
    let ns = Netns::new_anonymous().unwrap();
    let h = Handle::in_netns(&ns).unwrap();
    h.create_veth("vt0", "vt1", None).unwrap();
    let a = h.link_by_name("vt0").unwrap();
    let b = h.link_by_name("vt1").unwrap();
    (ns, h, a, b)
}

/// `ip -j ARGS` run inside `ns`: its stdout, asserting success.
fn ip_json(ns: &Netns, args: &[&str]) -> String {
    let out = ns.run_in(|| Command::new("ip").arg("-j").args(args).output()).unwrap().unwrap();
    assert!(out.status.success(), "ip -j {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn up_both(h: &Handle, a: &Link, b: &Link) {
    h.set_link_up(a.index, true).unwrap();
    h.set_link_up(b.index, true).unwrap();
}

#[test]
fn mac_parse_and_display() {
    let m = mac("02:0A:bc:00:ff:01");
    assert_eq!(m.0, [2, 0x0a, 0xbc, 0, 0xff, 1]);
    assert_eq!(m.to_string(), "02:0a:bc:00:ff:01");
    for bad in ["", "02:00:00:00:00", "02:00:00:00:00:00:00", "02:00:00:00:00:zz", "020:00:00:00:00:00"] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn netns_open_checks_the_path() {
    // A regular file.
    let e = Netns::open("/etc/hostname").unwrap_err();
    assert!(matches!(e, Error::NotANetns { .. }), "{e:?}");
    let s = e.to_string();
    assert!(s.contains("/etc/hostname") && s.contains("not a network namespace"), "{s}");
    // Another kind of namespace.
    let e = Netns::open("/proc/self/ns/mnt").unwrap_err();
    assert!(e.to_string().contains("mount namespace"), "{e}");
    assert!(e.to_string().contains("/proc/self/ns/mnt"), "{e}");
    // Missing.
    let e = Netns::open("/nonexistent/netns").unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT));
    assert!(e.to_string().contains("/nonexistent/netns"), "{e}");
    // Real ones.
    let cur = Netns::current().unwrap();
    let byproc = Netns::open(format!("/proc/{}/ns/net", std::process::id())).unwrap();
    assert!(cur.same_as(&byproc).unwrap());
    let anon = Netns::new_anonymous().unwrap();
    assert!(!anon.same_as(&cur).unwrap());
    // Entering it: the thread sees the other namespace.
    let inside = anon.run_in(|| Netns::current().unwrap()).unwrap();
    assert!(inside.same_as(&anon).unwrap());
}

#[test]
fn anonymous_netns_is_empty_and_isolated() {
    let ns1 = Netns::new_anonymous().unwrap();
    let ns2 = Netns::new_anonymous().unwrap();
    let h1 = Handle::in_netns(&ns1).unwrap();
    let h2 = Handle::in_netns(&ns2).unwrap();
    let links = h1.links().unwrap();
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].name, "lo");
    assert_eq!(links[0].index, 1);
    assert!(!links[0].admin_up);
    h1.create_veth("iso0", "iso1", None).unwrap();
    assert_eq!(h1.links().unwrap().len(), 3);
    assert_eq!(h2.links().unwrap().len(), 1);
    assert!(h2.find_link("iso0").unwrap().is_none());
    // lo up in one namespace only.
    h1.set_link_up(1, true).unwrap();
    assert!(h1.link_by_index(1).unwrap().admin_up);
    assert!(!h2.link_by_index(1).unwrap().admin_up);
}

#[test]
fn link_fields_and_settings() {
    let (ns, h, a, b) = setup();
    assert_eq!(a.kind.as_deref(), Some("veth"));
    assert_eq!(a.mtu, 1500);
    assert!(!a.admin_up);
    assert_eq!(a.link, Some(b.index), "veth peer index");
    assert!(a.mac.is_some_and(|m| !m.is_zero()));
    assert_eq!(a.perm_mac, None, "veth has no permanent MAC");
    assert_eq!((a.parent_bus.as_ref(), a.parent_dev.as_ref()), (None, None));
    assert_eq!(h.link_by_index(a.index).unwrap(), a);
    let all = h.links().unwrap();
    let mut names: Vec<_> = all.iter().map(|l| (l.index, l.name.as_str())).collect();
    names.sort();
    // The peer is created first.
    assert_eq!(names, [(1, "lo"), (2, "vt1"), (3, "vt0")]);

    // MTU
    h.set_link_mtu(a.index, 1400).unwrap();
    assert_eq!(h.link_by_index(a.index).unwrap().mtu, 1400);
    assert!(ip_json(&ns, &["link", "show", "vt0"]).contains("\"mtu\":1400"));
    let e = h.set_link_mtu(a.index, 10).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert!(e.to_string().contains("set MTU of link"), "{e}");

    // MAC
    let m = mac("02:11:22:33:44:55");
    h.set_link_mac(a.index, m).unwrap();
    assert_eq!(h.link_by_index(a.index).unwrap().mac, Some(m));
    assert!(ip_json(&ns, &["link", "show", "vt0"]).contains("\"address\":\"02:11:22:33:44:55\""));

    // up / down, operstate
    up_both(&h, &a, &b);
    let l = h.link_by_index(a.index).unwrap();
    assert!(l.admin_up);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let l = h.link_by_index(a.index).unwrap();
        if l.oper_state == OperState::Up && l.lower_up {
            break;
        }
        assert!(Instant::now() < deadline, "vt0 never got oper up: {l:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ip_json(&ns, &["link", "show", "vt0"]).contains("\"operstate\":\"UP\""));

    // Rename while up: refused with EBUSY by older kernels (Debian's 6.1),
    // allowed by newer ones (this machine's 6.18). Either way, consistent.
    match h.rename_link(a.index, "renamed0") {
        Ok(()) => {
            assert_eq!(h.link_by_index(a.index).unwrap().name, "renamed0");
            h.set_link_up(a.index, false).unwrap();
            h.rename_link(a.index, "vt0").unwrap();
        }
        Err(e) => {
            assert_eq!(e.errno(), Some(libc::EBUSY), "{e}");
            assert_eq!(h.link_by_index(a.index).unwrap().name, "vt0");
        }
    }
    h.set_link_up(a.index, false).unwrap();
    let l = h.link_by_index(a.index).unwrap();
    assert!(!l.admin_up);
    assert_eq!(l.oper_state, OperState::Down);
    h.rename_link(a.index, "renamed0").unwrap();
    let l = h.link_by_name("renamed0").unwrap();
    assert_eq!((l.index, l.mtu, l.mac), (a.index, 1400, Some(m)));
    assert!(h.find_link("vt0").unwrap().is_none());
    assert!(ip_json(&ns, &["link", "show", "renamed0"]).contains(&format!("\"ifindex\":{}", a.index)));

    // name checks happen before the kernel is asked
    let e = h.rename_link(a.index, "this-name-is-too-long").unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
    // a taken name
    let e = h.rename_link(a.index, "vt1").unwrap_err();
    assert!(e.is_exists(), "{e}");
}

#[test]
fn missing_link_errors_name_the_link() {
    let ns = Netns::new_anonymous().unwrap();
    let h = Handle::in_netns(&ns).unwrap();
    let e = h.link_by_name("nope0").unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENODEV));
    assert!(e.is_not_found());
    let s = e.to_string();
    assert!(s.contains("\"nope0\"") && s.contains("get link"), "{s}");
    assert!(h.find_link("nope0").unwrap().is_none());
    let e = h.link_by_index(4242).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENODEV));
    assert!(e.to_string().contains("link 4242"), "{e}");
    let e = h.set_link_up(4242, true).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENODEV));
    assert!(e.to_string().starts_with("set up link 4242"), "{e}");
    let e = h.delete_link(4242).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENODEV));
}

#[test]
fn altnames() {
    let (ns, h, a, b) = setup();
    let long = "a-long-alternative-name-for-vt0";
    h.add_altname(a.index, long).unwrap();
    h.add_altname(a.index, "vt0-alt").unwrap();
    let l = h.link_by_index(a.index).unwrap();
    assert_eq!(l.altnames, [long, "vt0-alt"]);
    // Lookup by altname, short and long.
    assert_eq!(h.link_by_name("vt0-alt").unwrap().index, a.index);
    assert_eq!(h.link_by_name(long).unwrap().index, a.index);
    assert!(ip_json(&ns, &["link", "show", "vt0"]).contains(&format!("\"altnames\":[\"{long}\",\"vt0-alt\"]")));
    // Names are unique across names and altnames.
    let e = h.add_altname(b.index, "vt0-alt").unwrap_err();
    assert!(e.is_exists(), "{e}");
    assert!(e.to_string().contains("\"vt0-alt\" on link"), "{e}");
    let e = h.add_altname(b.index, "vt0").unwrap_err();
    assert!(e.is_exists(), "{e}");
    h.del_altname(a.index, long).unwrap();
    assert_eq!(h.link_by_index(a.index).unwrap().altnames, ["vt0-alt"]);
    let e = h.del_altname(a.index, long).unwrap_err();
    assert!(e.errno().is_some(), "{e}");
    h.del_altname(a.index, "vt0-alt").unwrap();
    assert!(h.link_by_index(a.index).unwrap().altnames.is_empty());
    assert!(h.find_link("vt0-alt").unwrap().is_none());
}

#[test]
fn create_and_delete_links() {
    let (_ns, h, a, b) = setup();
    h.create_bridge("br9").unwrap();
    let br = h.link_by_name("br9").unwrap();
    assert_eq!(br.kind.as_deref(), Some("bridge"));
    let e = h.create_bridge("br9").unwrap_err();
    assert!(e.is_exists(), "{e}");
    let e = h.create_veth("vt0", "other1", None).unwrap_err();
    assert!(e.is_exists(), "{e}");
    h.delete_link(br.index).unwrap();
    assert!(h.find_link("br9").unwrap().is_none());
    // deleting one end of a veth deletes both
    h.delete_link(a.index).unwrap();
    assert!(h.find_link("vt0").unwrap().is_none());
    assert!(h.find_link("vt1").unwrap().is_none());
    assert_eq!(h.link_by_index(b.index).unwrap_err().errno(), Some(libc::ENODEV));
}

#[test]
fn vlan_arguments_are_checked_before_sending() {
    let (_ns, h, a, _b) = setup();
    for (name, parent, id, want) in [
        ("v1", a.index, 4095, "4095"),
        ("v1", a.index, u16::MAX, "65535"),
        ("v1", 0, 42, "parent ifindex"),
        ("", a.index, 42, "interface name"),
        ("a-name-too-long-for-linux", a.index, 42, "interface name"),
    ] {
        let e = h.create_vlan(name, parent, id).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
        assert!(e.to_string().contains(want), "{e}");
        assert!(e.to_string().contains("create vlan"), "{e}");
    }
    // Nothing was created.
    assert_eq!(h.links().unwrap().len(), 3);
}

/// Whether this kernel has 802.1Q at all (`/proc/net/vlan/config` exists once
/// the 8021q module is in; the probe also autoloads it where it can).
#[test]
fn vlan_support_probe_agrees_with_the_kernel() {
    let (_ns, h, a, _b) = setup();
    let supported = h.vlan_supported().unwrap();
    let proc_has = std::path::Path::new("/proc/net/vlan/config").exists();
    eprintln!("802.1Q supported: {supported}, /proc/net/vlan/config: {proc_has}");
    // The probe leaves nothing behind.
    assert_eq!(h.links().unwrap().len(), 3);
    if supported {
        return;
    }
    // A kernel without 802.1Q (this project's dev hosts): creation fails with
    // EOPNOTSUPP, and the message says why.
    assert!(!proc_has);
    let e = h.create_vlan("vt0.42", a.index, 42).unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.errno(), Some(libc::EOPNOTSUPP), "{e:?}");
    let s = e.to_string();
    assert!(
        s.contains("create vlan") && s.contains("\"vt0.42\"") && s.contains("VLAN 42") && s.contains("802.1Q") && s.contains("8021q"),
        "{s}"
    );
}

#[test]
fn veth_peer_in_another_netns() {
    let ns1 = Netns::new_anonymous().unwrap();
    let ns2 = Netns::new_anonymous().unwrap();
    let h1 = Handle::in_netns(&ns1).unwrap();
    let h2 = Handle::in_netns(&ns2).unwrap();
    h1.create_veth("left0", "right0", Some(&ns2)).unwrap();
    assert!(h1.find_link("right0").unwrap().is_none());
    let r = h2.link_by_name("right0").unwrap();
    assert_eq!(r.kind.as_deref(), Some("veth"));
}

#[test]
fn many_links_dump_spans_several_datagrams() {
    let ns = Netns::new_anonymous().unwrap();
    let h = Handle::in_netns(&ns).unwrap();
    for i in 0..100 {
        h.create_veth(&format!("m{i}a"), &format!("m{i}b"), None).unwrap();
    }
    let links = h.links().unwrap();
    assert_eq!(links.len(), 201);
    let mut names: Vec<_> = links.iter().map(|l| l.name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 201, "duplicates in a dump");
    assert!(links.iter().any(|l| l.name == "m99b"));
    // And the handle still works for single requests afterwards.
    assert_eq!(h.link_by_name("m42a").unwrap().name, "m42a");
}

#[test]
fn addresses_v4_v6() {
    let (ns, h, a, b) = setup();
    up_both(&h, &a, &b);
    let v4 = AddressSpec { broadcast: Some("10.1.2.255".parse().unwrap()), ..AddressSpec::new(ip("10.1.2.3"), 24) };
    h.add_address(a.index, &v4).unwrap();
    h.add_address(a.index, &AddressSpec::new(ip("10.1.2.4"), 24)).unwrap();
    h.add_address(a.index, &AddressSpec { route_metric: Some(77), ..AddressSpec::new(ip("192.168.7.1"), 30) }).unwrap();
    h.add_address(a.index, &AddressSpec::new(ip("fd00::5"), 64).with_flags(AddrFlags::NODAD)).unwrap();
    h.add_address(a.index, &AddressSpec::new(ip("fd00:1::6"), 80).with_flags(AddrFlags::NODAD | AddrFlags::NOPREFIXROUTE)).unwrap();

    let addrs = h.addresses(a.index).unwrap();
    let find = |s: &str| addrs.iter().find(|x| x.addr == ip(s)).unwrap_or_else(|| panic!("{s} not in {addrs:#?}"));
    let x = find("10.1.2.3");
    assert_eq!((x.prefix_len, x.scope, x.peer), (24, Scope::Universe, None));
    assert_eq!(x.broadcast, Some("10.1.2.255".parse().unwrap()));
    assert_eq!(x.label.as_deref(), Some("vt0"));
    assert!(x.flags.contains(AddrFlags::PERMANENT));
    assert!(!x.flags.contains(AddrFlags::SECONDARY));
    let x = find("10.1.2.4");
    assert!(x.flags.contains(AddrFlags::SECONDARY), "{x:?}");
    assert_eq!(x.broadcast, None);
    assert_eq!(find("192.168.7.1").route_metric, Some(77));
    let x = find("fd00::5");
    assert_eq!(x.prefix_len, 64);
    assert!(x.flags.contains(AddrFlags::NODAD | AddrFlags::PERMANENT), "{x:?}");
    assert!(!x.flags.contains(AddrFlags::TENTATIVE), "{x:?}");
    let x = find("fd00:1::6");
    assert_eq!(x.prefix_len, 80);
    assert!(x.flags.contains(AddrFlags::NOPREFIXROUTE | AddrFlags::NODAD), "{x:?}");
    // Kernel-made link-local address is listed with scope link. The kernel adds it
    // from a work queue after the link comes up, so look until it is there (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let link_local =
        |list: &[Address]| list.iter().any(|x| x.scope == Scope::Link && matches!(x.addr, IpAddr::V6(v) if v.segments()[0] == 0xfe80));
    let mut current = addrs.clone();
    while !link_local(&current) {
        assert!(std::time::Instant::now() < deadline, "no IPv6 link-local address within 5 s: {current:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        current = h.addresses(a.index).unwrap();
    }
    // Not on the other link.
    assert!(h.addresses(b.index).unwrap().iter().all(|x| x.scope == Scope::Link));

    // iproute2 sees the same.
    let j = ip_json(&ns, &["addr", "show", "dev", "vt0"]);
    for s in [
        "\"local\":\"10.1.2.3\",\"prefixlen\":24,\"broadcast\":\"10.1.2.255\"",
        "\"local\":\"fd00::5\",\"prefixlen\":64",
        "\"local\":\"fd00:1::6\",\"prefixlen\":80",
        "\"noprefixroute\":true",
        "\"secondary\":true",
    ] {
        assert!(j.contains(s), "{s} not in {j}");
    }
    // The prefix route: present for fd00::/64, absent for the NOPREFIXROUTE one;
    // IPv4 one with the requested metric.
    let r6 = h.routes(Family::V6).unwrap();
    assert!(r6.iter().any(|r| r.dst == ip("fd00::") && r.dst_len == 64 && r.protocol == proto::KERNEL));
    assert!(!r6.iter().any(|r| r.dst == ip("fd00:1::") && r.dst_len == 80));
    let r4 = h.routes(Family::V4).unwrap();
    assert!(r4.iter().any(|r| r.dst == ip("192.168.7.0") && r.dst_len == 30 && r.priority == Some(77)));

    // Duplicate: EEXIST, naming the address.
    let e = h.add_address(a.index, &v4).unwrap_err();
    assert!(e.is_exists(), "{e}");
    assert_eq!(e.errno(), Some(libc::EEXIST));
    assert!(e.to_string().contains("add address 10.1.2.3/24 on link"), "{e}");
    // Round trip through AddressSpec (what the VF manager does).
    let rec = find("fd00::5").clone();
    h.delete_address(a.index, rec.addr, rec.prefix_len).unwrap();
    assert!(!h.addresses(a.index).unwrap().iter().any(|x| x.addr == rec.addr));
    h.add_address(a.index, &AddressSpec::from(&rec)).unwrap();
    let back = h.addresses(a.index).unwrap().into_iter().find(|x| x.addr == rec.addr).unwrap();
    assert_eq!(back, rec);
    // Delete: gone; deleting again: error.
    h.delete_address(a.index, ip("10.1.2.4"), 24).unwrap();
    assert!(!h.addresses(a.index).unwrap().iter().any(|x| x.addr == ip("10.1.2.4")));
    let e = h.delete_address(a.index, ip("10.1.2.4"), 24).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EADDRNOTAVAIL), "{e}");
    let e = h.add_address(a.index, &AddressSpec::new(ip("10.9.9.9"), 33)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
}

#[test]
fn routes_v4_v6() {
    let (ns, h, a, b) = setup();
    // A gateway that is not reachable yet: the link is down, no address.
    let gw_route = RouteSpec::new(ip("10.20.0.0"), 16).via(ip("10.1.2.1")).metric(100);
    let e = h.add_route(&gw_route).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENETUNREACH), "{e}");
    assert!(e.to_string().contains("add route 10.20.0.0/16 via 10.1.2.1 metric 100"), "{e}");

    up_both(&h, &a, &b);
    h.add_address(a.index, &AddressSpec::new(ip("10.1.2.3"), 24)).unwrap();
    h.add_address(a.index, &AddressSpec::new(ip("fd00::3"), 64).with_flags(AddrFlags::NODAD)).unwrap();
    // Link route, then gateway routes through it.
    h.add_route(&RouteSpec::new(ip("192.168.50.0"), 24).dev(a.index)).unwrap();
    h.add_route(&RouteSpec::new(ip("172.30.0.1"), 32).dev(a.index)).unwrap();
    h.add_route(&gw_route).unwrap();
    h.add_route(&RouteSpec::default_via(ip("10.1.2.1")).metric(50)).unwrap();
    h.add_route(&RouteSpec::new(ip("172.31.0.0"), 16).via(ip("172.30.0.1"))).unwrap();
    h.add_route(&RouteSpec::new(ip("fd01::"), 64).via(ip("fd00::1"))).unwrap();
    h.add_route(&RouteSpec::default_via(ip("fd00::1")).dev(a.index).metric(300)).unwrap();

    let r4 = h.routes(Family::V4).unwrap();
    let find4 = |dst: &str, len: u8| {
        r4.iter().find(|r| r.dst == ip(dst) && r.dst_len == len).unwrap_or_else(|| panic!("{dst}/{len} not in {r4:#?}")).clone()
    };
    let r = find4("192.168.50.0", 24);
    assert_eq!((r.gateway, r.oif, r.scope, r.protocol), (None, Some(a.index), Scope::Link, proto::BOOT));
    assert_eq!((r.table, r.kind, r.priority), (table::MAIN, RouteType::Unicast, None));
    let r = find4("10.20.0.0", 16);
    assert_eq!((r.gateway, r.oif, r.priority, r.scope), (Some(ip("10.1.2.1")), Some(a.index), Some(100), Scope::Universe));
    let r = find4("0.0.0.0", 0);
    assert_eq!((r.gateway, r.priority), (Some(ip("10.1.2.1")), Some(50)));
    assert_eq!(find4("172.31.0.0", 16).gateway, Some(ip("172.30.0.1")));
    let k = find4("10.1.2.0", 24);
    assert!(k.is_kernel_generated() && k.protocol == proto::KERNEL && k.scope == Scope::Link, "{k:?}");
    assert_eq!(k.prefsrc, Some(ip("10.1.2.3")));
    assert_eq!(r4.iter().filter(|r| !r.is_kernel_generated()).count(), 5, "{r4:#?}");
    // local table is not in `routes`, but is in every-table listing
    assert!(r4.iter().all(|r| r.table == table::MAIN));
    let all = h.routes_in_table(Family::V4, None).unwrap();
    assert!(all.iter().any(|r| r.table == table::LOCAL && r.kind == RouteType::Local && r.dst == ip("10.1.2.3")));

    let r6 = h.routes(Family::V6).unwrap();
    let r = r6.iter().find(|r| r.dst == ip("fd01::") && r.dst_len == 64).unwrap();
    assert_eq!((r.gateway, r.oif, r.priority), (Some(ip("fd00::1")), Some(a.index), Some(1024)));
    let r = r6.iter().find(|r| r.dst_len == 0).unwrap();
    assert_eq!((r.gateway, r.priority, r.dst), (Some(ip("fd00::1")), Some(300), ip("::")));

    let j = ip_json(&ns, &["route", "show"]);
    for s in [
        "{\"dst\":\"default\",\"gateway\":\"10.1.2.1\",\"dev\":\"vt0\",\"metric\":50,\"flags\":[]}",
        "{\"dst\":\"10.20.0.0/16\",\"gateway\":\"10.1.2.1\",\"dev\":\"vt0\",\"metric\":100,\"flags\":[]}",
        "{\"dst\":\"192.168.50.0/24\",\"dev\":\"vt0\",\"scope\":\"link\",\"flags\":[]}",
    ] {
        assert!(j.contains(s), "{s} not in {j}");
    }
    let j6 = ip_json(&ns, &["-6", "route", "show"]);
    assert!(j6.contains("\"dst\":\"fd01::/64\",\"gateway\":\"fd00::1\",\"dev\":\"vt0\",\"metric\":1024"), "{j6}");

    // same route again: EEXIST; same dst other metric: fine
    let e = h.add_route(&gw_route).unwrap_err();
    assert!(e.is_exists(), "{e}");
    h.add_route(&RouteSpec::new(ip("10.20.0.0"), 16).via(ip("10.1.2.1")).metric(101)).unwrap();

    // Unreachable gateway, with the link up.
    let e = h.add_route(&RouteSpec::new(ip("10.30.0.0"), 16).via(ip("172.16.0.1"))).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENETUNREACH), "{e}");
    // ... unless onlink
    let mut onl = RouteSpec::new(ip("10.30.0.0"), 16).via(ip("172.16.0.1")).dev(a.index);
    onl.onlink = true;
    h.add_route(&onl).unwrap();
    assert!(h.routes(Family::V4).unwrap().iter().any(|r| r.dst == ip("10.30.0.0") && r.onlink));

    // Round trip a listed route: delete it, re-add it from its spec.
    let rec = find4("10.20.0.0", 16);
    h.delete_route(&RouteSpec::from(&rec)).unwrap();
    assert!(!h.routes(Family::V4).unwrap().iter().any(|r| r == &rec));
    h.add_route(&RouteSpec::from(&rec)).unwrap();
    assert!(h.routes(Family::V4).unwrap().iter().any(|r| r == &rec));

    // Delete by dst (+metric): gone; again: ESRCH.
    h.delete_route(&RouteSpec::new(ip("0.0.0.0"), 0).metric(50)).unwrap();
    assert!(!h.routes(Family::V4).unwrap().iter().any(|r| r.dst_len == 0));
    let e = h.delete_route(&RouteSpec::new(ip("0.0.0.0"), 0).metric(50)).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ESRCH), "{e}");
    h.delete_route(&RouteSpec::new(ip("fd01::"), 64)).unwrap();
    assert!(!h.routes(Family::V6).unwrap().iter().any(|r| r.dst == ip("fd01::")));

    // Bad arguments never reach the kernel.
    let e = h.add_route(&RouteSpec::new(ip("10.0.0.0"), 8).via(ip("fd00::1"))).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
}

#[test]
fn routes_are_dropped_when_the_link_goes_down() {
    let (_ns, h, a, b) = setup();
    up_both(&h, &a, &b);
    h.add_address(a.index, &AddressSpec::new(ip("10.1.2.3"), 24)).unwrap();
    h.add_route(&RouteSpec::new(ip("10.20.0.0"), 16).via(ip("10.1.2.1"))).unwrap();
    h.set_link_up(a.index, false).unwrap();
    let r4 = h.routes(Family::V4).unwrap();
    assert!(!r4.iter().any(|r| r.dst == ip("10.20.0.0")), "{r4:#?}");
    // The address stays.
    assert!(h.addresses(a.index).unwrap().iter().any(|x| x.addr == ip("10.1.2.3")));
}

#[test]
fn permanent_neighbours() {
    let (ns, h, a, b) = setup();
    up_both(&h, &a, &b);
    let m4 = mac("02:00:00:00:00:09");
    let m6 = mac("02:00:00:00:00:0a");
    h.add_permanent_neighbour(a.index, ip("10.1.2.9"), m4).unwrap();
    h.add_permanent_neighbour(a.index, ip("fd00::9"), m6).unwrap();
    let n = h.neighbours(a.index).unwrap();
    let perm: Vec<_> = n.iter().filter(|x| x.is_permanent()).collect();
    assert_eq!(perm.len(), 2, "{n:#?}");
    let x = perm.iter().find(|x| x.ip == ip("10.1.2.9")).unwrap();
    assert_eq!((x.lladdr, x.state, x.ifindex), (Some(m4), nud::PERMANENT, a.index));
    let x = perm.iter().find(|x| x.ip == ip("fd00::9")).unwrap();
    assert_eq!(x.lladdr, Some(m6));
    assert!(h.neighbours(b.index).unwrap().iter().all(|x| !x.is_permanent()));
    let j = ip_json(&ns, &["neigh", "show", "dev", "vt0"]);
    assert!(j.contains("\"dst\":\"10.1.2.9\",\"lladdr\":\"02:00:00:00:00:09\",\"state\":[\"PERMANENT\"]"), "{j}");
    // replace
    let m5 = mac("02:00:00:00:00:05");
    h.add_permanent_neighbour(a.index, ip("10.1.2.9"), m5).unwrap();
    let n = h.neighbours(a.index).unwrap();
    assert_eq!(n.iter().find(|x| x.ip == ip("10.1.2.9")).unwrap().lladdr, Some(m5));
    h.delete_neighbour(a.index, ip("10.1.2.9")).unwrap();
    assert!(!h.neighbours(a.index).unwrap().iter().any(|x| x.ip == ip("10.1.2.9")));
    let e = h.delete_neighbour(a.index, ip("10.1.2.9")).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
}

#[test]
fn move_link_between_netns() {
    let (ns_a, ha, a, b) = setup();
    let ns_b = Netns::new_anonymous().unwrap();
    let hb = Handle::in_netns(&ns_b).unwrap();
    let m = mac("02:aa:bb:cc:dd:01");
    ha.set_link_mac(b.index, m).unwrap();
    ha.set_link_mtu(b.index, 1450).unwrap();
    ha.add_altname(b.index, "vt1-alt").unwrap();
    up_both(&ha, &a, &b);
    ha.add_address(b.index, &AddressSpec::new(ip("10.5.5.5"), 24)).unwrap();

    ha.move_link_to_netns(b.index, &ns_b, Some("moved0")).unwrap();
    assert!(ha.find_link("vt1").unwrap().is_none());
    assert!(ha.find_link("moved0").unwrap().is_none());
    let l = hb.link_by_name("moved0").unwrap();
    assert_eq!(l.mac, Some(m));
    assert_eq!(l.mtu, 1450);
    assert_eq!(l.index, b.index, "ifindex kept when free");
    assert_eq!(l.altnames, ["vt1-alt"], "altnames move with the link");
    assert!(!l.admin_up, "a moved link arrives down");
    assert!(hb.addresses(l.index).unwrap().is_empty(), "addresses are dropped on a move");
    assert!(ip_json(&ns_b, &["link", "show", "moved0"]).contains("\"address\":\"02:aa:bb:cc:dd:01\""));
    // The peer in A still points at it.
    assert_eq!(ha.link_by_index(a.index).unwrap().link, Some(l.index));

    // Back, under a name that is taken there: EEXIST, and the link stays put.
    let e = hb.move_link_to_netns(l.index, &ns_a, Some("vt0")).unwrap_err();
    assert!(e.is_exists(), "{e}");
    assert!(e.to_string().contains("nothing was moved"), "{e}");
    assert!(hb.find_link("moved0").unwrap().is_some());
    assert!(ha.find_link("moved0").unwrap().is_none());
    // Without rename, to where an ifindex clash exists: fine, new index.
    hb.move_link_to_netns(l.index, &ns_a, Some("vt1")).unwrap();
    let back = ha.link_by_name("vt1").unwrap();
    assert_eq!((back.mac, back.mtu), (Some(m), 1450));
    assert!(hb.find_link("vt1").unwrap().is_none());

    // Moving by a handle of the wrong namespace: ENODEV.
    let e = hb.move_link_to_netns(back.index, &ns_a, None).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENODEV), "{e}");
}

#[test]
fn ifindex_clash_on_move_gets_a_new_index() {
    let ns_a = Netns::new_anonymous().unwrap();
    let ns_b = Netns::new_anonymous().unwrap();
    let ha = Handle::in_netns(&ns_a).unwrap();
    let hb = Handle::in_netns(&ns_b).unwrap();
    ha.create_veth("xa0", "xa1", None).unwrap();
    hb.create_veth("xb0", "xb1", None).unwrap();
    let xa0 = ha.link_by_name("xa0").unwrap();
    let xb0 = hb.link_by_name("xb0").unwrap();
    assert_eq!(xa0.index, xb0.index, "both namespaces number from 1");
    ha.move_link_to_netns(xa0.index, &ns_b, None).unwrap();
    let moved = hb.link_by_name("xa0").unwrap();
    assert_ne!(moved.index, xa0.index);
}

#[test]
fn timeout_is_configurable_and_requests_keep_working() {
    let ns = Netns::new_anonymous().unwrap();
    let mut h = Handle::in_netns(&ns).unwrap();
    assert_eq!(h.timeout(), DEFAULT_TIMEOUT);
    h.set_timeout(Duration::from_millis(500));
    for _ in 0..200 {
        assert_eq!(h.link_by_index(1).unwrap().name, "lo");
    }
    // Handles are Send + Sync: share one between threads.
    let h = std::sync::Arc::new(h);
    let ts: Vec<_> = (0..4)
        .map(|i| {
            let h = h.clone();
            std::thread::spawn(move || {
                for j in 0..20 {
                    let n = format!("t{i}x{j}");
                    h.create_bridge(&n).unwrap();
                    assert_eq!(h.link_by_name(&n).unwrap().name, n);
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
    assert_eq!(h.links().unwrap().len(), 81);
}

#[test]
fn vf_configs_on_a_non_pf_is_empty() {
    let (_ns, h, a, _b) = setup();
    assert!(h.vf_configs(a.index).unwrap().is_empty());
    let e = h.vf_config(a.index, 0).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = h.set_vf_mac(a.index, 0, mac("02:00:00:00:00:01")).unwrap_err();
    assert!(e.errno().is_some(), "{e}");
    assert!(e.to_string().contains("VF 0 of PF link"), "{e}");
}

// ---------------------------------------------------------------- lab tests

/// The igb PF's netdev name inside the lab's L2.
fn lab_pf() -> (String, String) {
    assert!(std::env::var_os("VFVM_LAB_INSIDE").is_some(), "this test needs the lab: run it with cargo xtask test / cargo xtask lab run");
    let mut found = Vec::new();
    for dev in std::fs::read_dir("/sys/bus/pci/drivers/igb").unwrap().flatten() {
        let pci = dev.file_name().to_string_lossy().to_string();
        if let Ok(nets) = std::fs::read_dir(dev.path().join("net")) {
            for n in nets.flatten() {
                found.push((n.file_name().to_string_lossy().to_string(), pci.clone()));
            }
        }
    }
    assert_eq!(found.len(), 1, "expected exactly one igb netdev: {found:?}");
    found.remove(0)
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_vf_settings_round_trip() {
    let (pf_name, pci) = lab_pf();
    let h = Handle::new().unwrap();
    let pf = h.link_by_name(&pf_name).unwrap();
    eprintln!("PF {pf:?}");
    assert_eq!(pf.parent_bus.as_deref(), Some("pci"));
    assert_eq!(pf.parent_dev.as_deref(), Some(pci.as_str()));
    assert!(pf.perm_mac.is_some_and(|m| !m.is_zero()), "{pf:?}");
    assert_eq!(pf.kind, None);

    let before = h.vf_configs(pf.index).unwrap();
    eprintln!("VFs before: {before:#?}");
    let n: u32 = std::env::var("VFVM_LAB_VFS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    assert_eq!(before.len(), usize::try_from(n).unwrap());
    assert_eq!(before.iter().map(|c| c.vf).collect::<Vec<_>>(), (0..n).collect::<Vec<_>>());
    assert!(n >= 2, "need a VF other than VF 0");
    let vf = n - 1;
    let vf_index = usize::try_from(vf).unwrap();
    let orig = before[vf_index].clone();
    // igb reports spoofchk and trust.
    assert!(orig.spoofchk.is_some() && orig.trust.is_some(), "{orig:?}");

    let m = mac("02:5a:00:00:00:42");
    h.set_vf_mac(pf.index, vf, m).unwrap();
    h.set_vf_vlan(pf.index, vf, 42, 3).unwrap();
    h.set_vf_spoofchk(pf.index, vf, !orig.spoofchk.unwrap()).unwrap();
    h.set_vf_trust(pf.index, vf, !orig.trust.unwrap()).unwrap();
    let now = h.vf_config(pf.index, vf).unwrap();
    eprintln!("VF {vf} changed: {now:?}");
    assert_eq!(now.mac, m);
    assert_eq!((now.vlan, now.qos), (42, 3));
    assert_eq!(now.spoofchk, Some(!orig.spoofchk.unwrap()));
    assert_eq!(now.trust, Some(!orig.trust.unwrap()));
    // ip agrees
    let out = Command::new("ip").args(["link", "show", &pf_name]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("vf {vf}")) && text.contains("02:5a:00:00:00:42") && text.contains("vlan 42, qos 3"), "{text}");
    // The other VFs did not move.
    let all = h.vf_configs(pf.index).unwrap();
    for (i, c) in all.iter().enumerate() {
        if i != vf_index {
            assert_eq!(c, &before[i]);
        }
    }

    // Restore.
    h.set_vf_mac(pf.index, vf, orig.mac).unwrap();
    h.set_vf_vlan(pf.index, vf, orig.vlan, orig.qos).unwrap();
    h.set_vf_spoofchk(pf.index, vf, orig.spoofchk.unwrap()).unwrap();
    h.set_vf_trust(pf.index, vf, orig.trust.unwrap()).unwrap();
    let after = h.vf_configs(pf.index).unwrap();
    eprintln!("VFs after: {after:#?}");
    assert_eq!(after, before);

    // Errors: a VF the PF does not have, an out-of-range VLAN.
    let e = h.set_vf_mac(pf.index, 99, m).unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    let e = h.set_vf_vlan(pf.index, vf, 4096, 0).unwrap_err();
    eprintln!("{e}");
    assert!(e.errno().is_some(), "{e}");
    assert!(h.vf_config(pf.index, 99).unwrap_err().is_not_found());
    assert_eq!(h.vf_configs(pf.index).unwrap(), before);
}

/// Loads a module in the lab (L2 runs Debian's kernel with its modules).
fn lab_modprobe(m: &str) {
    assert!(std::env::var_os("VFVM_LAB_INSIDE").is_some(), "this test needs the lab: run it with cargo xtask test / cargo xtask lab run");
    let st = Command::new("modprobe").arg(m).status().unwrap();
    assert!(st.success(), "modprobe {m}: {st}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_vlan_links() {
    lab_modprobe("8021q");
    lab_modprobe("veth");
    let (ns, h, a, b) = setup();
    assert!(h.vlan_supported().unwrap());
    assert_eq!(h.links().unwrap().len(), 3, "the probe left a link behind");
    h.set_link_mtu(a.index, 9000).unwrap();
    h.create_vlan("vt0.42", a.index, 42).unwrap();
    let v = h.link_by_name("vt0.42").unwrap();
    eprintln!("VLAN link: {v:?}");
    assert_eq!(v.kind.as_deref(), Some("vlan"));
    assert_eq!(v.vlan_id, Some(42));
    assert_eq!(v.link, Some(a.index), "parent");
    assert_eq!(v.mac, a.mac, "a VLAN starts with its parent's MAC");
    assert_eq!(v.mtu, 9000, "and its MTU");
    assert!(!v.admin_up);
    // Other kinds have no VLAN id.
    assert_eq!(h.link_by_index(a.index).unwrap().vlan_id, None);
    // A second VLAN on the same parent, and one on the other veth end.
    h.create_vlan("vt0.4094", a.index, 4094).unwrap();
    h.create_vlan("vt1.42", b.index, 42).unwrap();
    let v2 = h.link_by_name("vt0.4094").unwrap();
    assert_eq!((v2.vlan_id, v2.link), (Some(4094), Some(a.index)));
    let v3 = h.link_by_name("vt1.42").unwrap();
    assert_eq!((v3.vlan_id, v3.link), (Some(42), Some(b.index)));
    // iproute2 reads the same.
    let j = ip_json(&ns, &["-d", "link", "show", "dev", "vt0.42"]);
    eprintln!("{j}");
    assert!(
        j.contains("\"info_kind\":\"vlan\"")
            && j.contains("\"protocol\":\"802.1Q\"")
            && j.contains("\"id\":42")
            && j.contains("\"link\":\"vt0\""),
        "{j}"
    );
    // Up, with an address, like any link.
    h.set_link_up(a.index, true).unwrap();
    h.set_link_up(v.index, true).unwrap();
    h.add_address(v.index, &AddressSpec::new(ip("198.18.42.1"), 24)).unwrap();
    let v = h.link_by_index(v.index).unwrap();
    assert!(v.admin_up);
    assert_eq!(h.addresses(v.index).unwrap().len(), 1);
    // Duplicates: the same id on the same parent, and a taken name.
    let e = h.create_vlan("other42", a.index, 42).unwrap_err();
    eprintln!("{e}");
    assert!(e.is_exists(), "{e:?}");
    let e = h.create_vlan("vt0.42", a.index, 43).unwrap_err();
    eprintln!("{e}");
    assert!(e.is_exists(), "{e:?}");
    assert!(e.to_string().contains("create vlan \"vt0.42\" (VLAN 43 on link"), "{e}");
    // A parent that does not exist.
    let e = h.create_vlan("v9", 999_999, 9).unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.errno(), Some(libc::ENODEV), "{e:?}");
    // Deleting a VLAN leaves its parent; deleting the parent takes its VLANs.
    h.delete_link(v2.index).unwrap();
    assert!(h.find_link("vt0.4094").unwrap().is_none());
    assert!(h.find_link("vt0").unwrap().is_some());
    h.delete_link(a.index).unwrap();
    assert!(h.find_link("vt0.42").unwrap().is_none());
    assert!(h.find_link("vt1.42").unwrap().is_none());
    assert_eq!(h.links().unwrap().len(), 1);
}

/// Waits up to 10 s for a frame on a non-blocking tap queue file; returns it.
fn read_tap_frame(tap: &std::fs::File, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 65_600];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no matching frame on the tap within 10 s");
        let mut pfd = libc::pollfd { fd: tap.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: poll on one pollfd that lives across the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        match (&*tap).read(&mut buf) {
            Ok(n) if want(&buf[..n]) => return buf[..n].to_vec(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("reading the tap: {e}"),
        }
    }
}

/// A tap (the VM's end) and a veth (the pod's, whose peer is the "bridge" side in
/// another namespace) connected by ingress redirects both ways: the peer's ARP
/// request comes out of the tap, and the reply written into the tap reaches the peer,
/// which learns the "guest" MAC. Deleting the qdiscs removes the filters.
#[test]
fn tap_and_veth_forward_both_ways_through_ingress_redirects() {
    use std::io::Write;
    // The kernel's default virtio-net header (the VMM sets 12, for VERSION_1).
    const HDR: usize = 10;
    let pod = Netns::new_anonymous().unwrap();
    let bridge = Netns::new_anonymous().unwrap();
    let hp = Handle::in_netns(&pod).unwrap();
    let hb = Handle::in_netns(&bridge).unwrap();
    hp.create_veth("eth0", "peer0", Some(&bridge)).unwrap();
    let taps = pod.run_in(|| create_tap("tap0_kata", 1)).unwrap().unwrap();
    let veth = hp.link_by_name("eth0").unwrap();
    let tap = hp.link_by_name("tap0_kata").unwrap();
    assert_eq!(tap.kind.as_deref(), Some("tun"));
    let peer = hb.link_by_name("peer0").unwrap();
    hb.add_address(peer.index, &AddressSpec::new(ip("198.18.5.1"), 24)).unwrap();
    for (h, l) in [(&hp, &veth), (&hp, &tap), (&hb, &peer)] {
        h.set_link_up(l.index, true).unwrap();
    }
    for (from, to) in [(veth.index, tap.index), (tap.index, veth.index)] {
        assert!(!hp.has_ingress_qdisc(from).unwrap());
        hp.add_ingress_qdisc(from).unwrap();
        assert!(hp.add_ingress_qdisc(from).unwrap_err().is_exists(), "a second ingress qdisc");
        hp.redirect_ingress(from, to).unwrap();
        assert!(hp.has_ingress_qdisc(from).unwrap());
        assert_eq!(hp.ingress_redirects(from).unwrap(), [to]);
    }

    // The bridge side sends to the "guest": its ARP request leaves through the tap.
    let sent = bridge.run_in(|| {
        let s = std::net::UdpSocket::bind("198.18.5.1:0")?;
        s.send_to(b"hello", "198.18.5.2:9")
    });
    sent.unwrap().unwrap();
    let guest_mac = [0x02, 0, 0, 0, 0x5e, 0x02];
    let request = read_tap_frame(&taps[0], |f| {
        f.len() >= HDR + 42 && f[HDR + 12..HDR + 14] == [0x08, 0x06] && f[HDR + 38..HDR + 42] == [198, 18, 5, 2]
    });
    let peer_mac: [u8; 6] = request[HDR + 6..HDR + 12].try_into().unwrap();
    assert_eq!(MacAddr(peer_mac), peer.mac.unwrap(), "the request came from the bridge side");

    // The "guest" answers through the tap; the bridge side learns its MAC.
    let mut reply = vec![0u8; HDR];
    reply.extend_from_slice(&peer_mac);
    reply.extend_from_slice(&guest_mac);
    reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&guest_mac);
    reply.extend_from_slice(&[198, 18, 5, 2]);
    reply.extend_from_slice(&peer_mac);
    reply.extend_from_slice(&[198, 18, 5, 1]);
    (&taps[0]).write_all(&reply).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let learned = hb.neighbours(peer.index).unwrap().into_iter().find(|n| n.ip == ip("198.18.5.2")).and_then(|n| n.lladdr);
        if learned == Some(MacAddr(guest_mac)) {
            break;
        }
        assert!(Instant::now() < deadline, "the bridge side never learned the guest's MAC (has {learned:?})");
        std::thread::yield_now();
    }

    for l in [veth.index, tap.index] {
        hp.delete_ingress_qdisc(l).unwrap();
        assert!(!hp.has_ingress_qdisc(l).unwrap());
        assert!(hp.ingress_redirects(l).unwrap().is_empty());
        assert!(hp.delete_ingress_qdisc(l).is_err(), "deleting a qdisc that is gone");
    }
}
