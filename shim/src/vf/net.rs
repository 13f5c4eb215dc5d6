//! The network half of the VF manager, over rtnetlink: what a VF netdev looks like in
//! the pod's netns (captured before it is taken), the PF's settings for the VF, and
//! putting both back.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vfvm_netlink::{AddrFlags, AddressSpec, Family, Handle, Link, MacAddr, Netns, RouteSpec, Scope};

use super::journal::{AddrRecord, NeighbourRecord, NetdevRecord, PfVfSettings, RouteRecord};
use super::pci::{PciAddress, Sysfs};
use super::VfError;

fn parse_ip(what: &str, s: &str) -> Result<IpAddr, VfError> {
    s.parse().map_err(|_| VfError::JournalValue { what: what.to_string(), value: s.to_string() })
}

fn parse_mac(what: &str, s: &str) -> Result<MacAddr, VfError> {
    s.parse().map_err(|_| VfError::JournalValue { what: what.to_string(), value: s.to_string() })
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// Everything about `link` that CNI may have set: name, altnames, MAC, MTU, state,
/// permanent addresses (not IPv6 link-local: the kernel makes those), the routes
/// through it that the kernel did not make, and permanent neighbours.
pub fn capture_netdev(h: &Handle, link: &Link) -> Result<NetdevRecord, VfError> {
    let addrs = h
        .addresses(link.index)?
        .into_iter()
        .filter(|a| a.flags.contains(AddrFlags::PERMANENT) && !is_ipv6_link_local(&a.addr))
        .map(|a| AddrRecord {
            addr: a.addr.to_string(),
            prefix: a.prefix_len,
            flags: (a.flags & AddrFlags::CONFIGURABLE).0,
            route_metric: a.route_metric,
        })
        .collect();
    let mut routes = Vec::new();
    for family in [Family::V4, Family::V6] {
        for r in h.routes(family)? {
            if r.oif != Some(link.index) || r.is_kernel_generated() || r.multipath {
                continue;
            }
            routes.push(RouteRecord {
                dst: r.dst.to_string(),
                prefix: r.dst_len,
                gateway: r.gateway.map(|g| g.to_string()),
                metric: r.priority,
                prefsrc: r.prefsrc.map(|p| p.to_string()),
                table: r.table,
                scope: u8::from(r.scope),
                protocol: r.protocol,
                onlink: r.onlink,
            });
        }
    }
    let neighbours = h
        .neighbours(link.index)?
        .into_iter()
        .filter(|n| n.is_permanent())
        .filter_map(|n| Some(NeighbourRecord { addr: n.ip.to_string(), lladdr: n.lladdr?.to_string() }))
        .collect();
    Ok(NetdevRecord {
        name: link.name.clone(),
        altnames: link.altnames.clone(),
        mac: link.mac.map(|m| m.to_string()).unwrap_or_default(),
        mtu: link.mtu,
        up: link.admin_up,
        addrs,
        routes,
        neighbours,
    })
}

/// The PF's settings for VF `vf_index`.
pub fn pf_settings(host: &Handle, pf_netdev: &str, vf_index: u32) -> Result<PfVfSettings, VfError> {
    let pf = host.link_by_name(pf_netdev)?;
    let c = host.vf_config(pf.index, vf_index)?;
    Ok(PfVfSettings { mac: c.mac.to_string(), vlan: u32::from(c.vlan), qos: u32::from(c.qos), spoofchk: c.spoofchk, trust: c.trust })
}

/// Sets the VF's administrative MAC through its PF.
pub fn set_admin_mac(host: &Handle, pf_netdev: &str, vf_index: u32, mac: &str) -> Result<(), VfError> {
    let pf = host.link_by_name(pf_netdev)?;
    host.set_vf_mac(pf.index, vf_index, parse_mac("the pod MAC", mac)?)?;
    Ok(())
}

/// Puts back the PF's settings for the VF; only what differs is written.
pub fn restore_pf_settings(host: &Handle, pf_netdev: &str, vf_index: u32, want: &PfVfSettings) -> Result<(), VfError> {
    let now = pf_settings(host, pf_netdev, vf_index)?;
    if &now == want {
        return Ok(());
    }
    let pf = host.link_by_name(pf_netdev)?.index;
    if now.mac != want.mac {
        host.set_vf_mac(pf, vf_index, parse_mac("the VF's admin MAC", &want.mac)?)?;
    }
    if (now.vlan, now.qos) != (want.vlan, want.qos) {
        let vlan = u16::try_from(want.vlan).map_err(|_| VfError::JournalValue { what: "VLAN".into(), value: want.vlan.to_string() })?;
        let qos = u8::try_from(want.qos).map_err(|_| VfError::JournalValue { what: "QoS".into(), value: want.qos.to_string() })?;
        host.set_vf_vlan(pf, vf_index, vlan, qos)?;
    }
    if let (Some(want), true) = (want.spoofchk, now.spoofchk != want.spoofchk) {
        host.set_vf_spoofchk(pf, vf_index, want)?;
    }
    if let (Some(want), true) = (want.trust, now.trust != want.trust) {
        host.set_vf_trust(pf, vf_index, want)?;
    }
    Ok(())
}

/// Where a restored netdev ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Back where it came from (the pod's netns, or the host's if it came from there).
    Original,
    /// The pod's netns no longer exists: left in the host's netns, with its name,
    /// MAC and MTU but none of the pod's addresses or routes.
    HostBecauseNetnsGone { netns: PathBuf, reason: String },
}

/// The link of PCI device `addr` in the namespace `h` looks at, if there.
fn link_of_device(h: &Handle, addr: PciAddress) -> Result<Option<Link>, VfError> {
    let name = addr.to_string();
    Ok(h.links()?.into_iter().find(|l| l.parent_bus.as_deref() == Some("pci") && l.parent_dev.as_deref() == Some(name.as_str())))
}

/// Waits (bounded) for the device's netdev in the host's netns after a driver bind.
fn wait_for_host_link(host: &Handle, addr: PciAddress, sysfs: &Sysfs, timeout: Duration) -> Result<Link, VfError> {
    let started = Instant::now();
    loop {
        if let Some(link) = link_of_device(host, addr)? {
            return Ok(link);
        }
        if started.elapsed() >= timeout {
            let dev = sysfs.device(addr)?;
            return Err(VfError::NoNetdev {
                addr,
                driver: dev.driver().unwrap_or_else(|| "no driver".into()),
                waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Puts the VF's netdev back as `rec` says: into `netns` (the host's if `None`),
/// under its old name, with its MAC, MTU, altnames, addresses, routes (link routes
/// before gateway routes) and neighbours. Safe to repeat: what is already right
/// is left alone.
pub fn restore_netdev(
    sysfs: &Sysfs,
    addr: PciAddress,
    netns: Option<&Path>,
    rec: &NetdevRecord,
    wait: Duration,
) -> Result<Placement, VfError> {
    let host = Handle::new()?;
    let pod = match netns {
        None => None,
        Some(path) => match Netns::open(path) {
            Ok(ns) => Some((ns, path)),
            Err(e) => {
                // The pod is gone (or going): put the device back, not the pod's IPs.
                let link = wait_for_host_link(&host, addr, sysfs, wait)?;
                configure_device(&host, &link, rec)?;
                return Ok(Placement::HostBecauseNetnsGone { netns: path.to_path_buf(), reason: e.to_string() });
            }
        },
    };
    let (h, link) = match &pod {
        None => {
            let link = wait_for_host_link(&host, addr, sysfs, wait)?;
            (host, link)
        }
        Some((ns, _)) => {
            let h = Handle::in_netns(ns)?;
            match link_of_device(&h, addr)? {
                Some(link) => (h, link), // moved already by an earlier, partial restore
                None => {
                    let link = wait_for_host_link(&host, addr, sysfs, wait)?;
                    host.set_link_up(link.index, false)?;
                    host.move_link_to_netns(link.index, ns, Some(&rec.name))?;
                    let link = link_of_device(&h, addr)?.ok_or(VfError::NoNetdev {
                        addr,
                        driver: "moved, then not found".into(),
                        waited_ms: 0,
                    })?;
                    (h, link)
                }
            }
        }
    };
    configure_device(&h, &link, rec)?;
    configure_ip(&h, &h.link_by_index(link.index)?, rec)?;
    Ok(Placement::Original)
}

/// Name, MAC, MTU and altnames: what belongs to the device wherever it is.
fn configure_device(h: &Handle, link: &Link, rec: &NetdevRecord) -> Result<(), VfError> {
    if link.name != rec.name {
        // Debian 6.1 refuses to rename an up link.
        h.set_link_up(link.index, false)?;
        h.rename_link(link.index, &rec.name)?;
    }
    if !rec.mac.is_empty() && link.mac.map(|m| m.to_string()) != Some(rec.mac.clone()) {
        h.set_link_mac(link.index, parse_mac("the netdev MAC", &rec.mac)?)?;
    }
    if link.mtu != rec.mtu {
        h.set_link_mtu(link.index, rec.mtu)?;
    }
    for alt in &rec.altnames {
        if !link.altnames.contains(alt) {
            h.add_altname(link.index, alt)?;
        }
    }
    Ok(())
}

/// Addresses, up state, routes and neighbours, in the order the kernel needs.
fn configure_ip(h: &Handle, link: &Link, rec: &NetdevRecord) -> Result<(), VfError> {
    let ignore_exists = |r: Result<(), vfvm_netlink::Error>| match r {
        Err(e) if e.is_exists() => Ok(()),
        other => other,
    };
    for a in &rec.addrs {
        let mut spec = AddressSpec::new(parse_ip("address", &a.addr)?, a.prefix).with_flags(AddrFlags(a.flags));
        spec.route_metric = a.route_metric;
        ignore_exists(h.add_address(link.index, &spec))?;
    }
    if link.admin_up != rec.up {
        h.set_link_up(link.index, rec.up)?;
    }
    // Link routes first: a gateway must be reachable when its route goes in.
    let mut routes: Vec<&RouteRecord> = rec.routes.iter().collect();
    routes.sort_by_key(|r| r.gateway.is_some());
    for r in routes {
        let mut spec = RouteSpec::new(parse_ip("route destination", &r.dst)?, r.prefix).dev(link.index);
        spec.gateway = r.gateway.as_deref().map(|g| parse_ip("gateway", g)).transpose()?;
        spec.priority = r.metric;
        spec.prefsrc = r.prefsrc.as_deref().map(|p| parse_ip("preferred source", p)).transpose()?;
        spec.table = Some(r.table);
        spec.scope = Some(Scope::from(r.scope));
        spec.protocol = Some(r.protocol);
        spec.onlink = r.onlink;
        ignore_exists(h.add_route(&spec))?;
    }
    for n in &rec.neighbours {
        ignore_exists(h.add_permanent_neighbour(link.index, parse_ip("neighbour", &n.addr)?, parse_mac("neighbour MAC", &n.lladdr)?))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VF netdev stand-in on the real kernel: one end of a veth pair in a fresh
    /// netns, configured the way CNI configures a VF.
    fn cni_configured_veth() -> (Netns, Handle, Link) {
        let ns = Netns::new_anonymous().expect("creating a netns needs root");
        let h = Handle::in_netns(&ns).unwrap();
        h.create_veth("net1", "peer1", None).unwrap();
        let link = h.link_by_name("net1").unwrap();
        h.set_link_mtu(link.index, 1400).unwrap();
        h.set_link_mac(link.index, "02:00:00:00:aa:01".parse().unwrap()).unwrap();
        h.add_altname(link.index, "pod-sriov-net1").unwrap();
        h.add_address(link.index, &AddressSpec::new("198.18.1.1".parse().unwrap(), 24)).unwrap();
        h.add_address(link.index, &AddressSpec::new("2001:db8:1::1".parse().unwrap(), 64).with_flags(AddrFlags::NODAD)).unwrap();
        h.set_link_up(link.index, true).unwrap();
        let peer = h.link_by_name("peer1").unwrap();
        h.set_link_up(peer.index, true).unwrap();
        h.add_route(&RouteSpec::new("198.18.2.0".parse().unwrap(), 24).via("198.18.1.254".parse().unwrap()).dev(link.index).metric(50))
            .unwrap();
        h.add_route(&RouteSpec::default_via("198.18.1.254".parse().unwrap()).dev(link.index)).unwrap();
        h.add_route(&RouteSpec::new("2001:db8:2::".parse().unwrap(), 64).via("2001:db8:1::fe".parse().unwrap()).dev(link.index)).unwrap();
        h.add_permanent_neighbour(link.index, "198.18.1.254".parse().unwrap(), "02:00:00:00:00:fe".parse().unwrap()).unwrap();
        let link = h.link_by_index(link.index).unwrap();
        (ns, h, link)
    }

    #[test]
    fn capture_records_what_cni_set_and_nothing_the_kernel_made() {
        let (_ns, h, link) = cni_configured_veth();
        let rec = capture_netdev(&h, &link).unwrap();
        assert_eq!((rec.name.as_str(), rec.mac.as_str(), rec.mtu, rec.up), ("net1", "02:00:00:00:aa:01", 1400, true));
        assert_eq!(rec.altnames, ["pod-sriov-net1"]);
        let addrs: Vec<String> = rec.addrs.iter().map(|a| format!("{}/{}", a.addr, a.prefix)).collect();
        assert_eq!(addrs, ["198.18.1.1/24", "2001:db8:1::1/64"], "no link-local, no kernel-made addresses");
        let routes: Vec<String> =
            rec.routes.iter().map(|r| format!("{}/{} via {:?} metric {:?}", r.dst, r.prefix, r.gateway, r.metric)).collect();
        assert_eq!(routes.len(), 3, "{routes:?}");
        assert!(routes.contains(&"0.0.0.0/0 via Some(\"198.18.1.254\") metric None".to_string()), "{routes:?}");
        assert!(routes.contains(&"198.18.2.0/24 via Some(\"198.18.1.254\") metric Some(50)".to_string()), "{routes:?}");
        assert!(routes.iter().any(|r| r.starts_with("2001:db8:2::/64 via Some(\"2001:db8:1::fe\")")), "{routes:?}");
        assert_eq!(rec.neighbours, [NeighbourRecord { addr: "198.18.1.254".into(), lladdr: "02:00:00:00:00:fe".into() }]);
    }

    #[test]
    fn configure_puts_a_scrambled_netdev_back_exactly_and_is_idempotent() {
        let (_ns, h, link) = cni_configured_veth();
        let want = capture_netdev(&h, &link).unwrap();
        // What a driver rebind leaves: another name and MAC, default MTU, down, no
        // addresses, routes or neighbours, no altname.
        h.set_link_up(link.index, false).unwrap();
        h.rename_link(link.index, "eth7").unwrap();
        h.set_link_mac(link.index, "02:00:00:00:bb:02".parse().unwrap()).unwrap();
        h.set_link_mtu(link.index, 1500).unwrap();
        h.del_altname(link.index, "pod-sriov-net1").unwrap();
        for a in h.addresses(link.index).unwrap() {
            h.delete_address(link.index, a.addr, a.prefix_len).unwrap();
        }
        for n in h.neighbours(link.index).unwrap().into_iter().filter(|n| n.is_permanent()) {
            h.delete_neighbour(link.index, n.ip).unwrap();
        }
        let scrambled = capture_netdev(&h, &h.link_by_index(link.index).unwrap()).unwrap();
        assert!(scrambled.routes.is_empty() && scrambled.addrs.is_empty() && scrambled.name == "eth7", "{scrambled:?}");

        for _ in 0..2 {
            let now = h.link_by_index(link.index).unwrap();
            configure_device(&h, &now, &want).unwrap();
            configure_ip(&h, &h.link_by_index(link.index).unwrap(), &want).unwrap();
            let got = capture_netdev(&h, &h.link_by_index(link.index).unwrap()).unwrap();
            assert_eq!(got, want);
        }
    }
}
