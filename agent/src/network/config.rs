//! The wire form of the network config (what the shim sends), and its
//! validation into typed values. Validation is complete and static: every
//! field of every interface, route and DNS entry is checked before the agent
//! looks at the system, so a bad config changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use vfvm_netlink::{Family, MacAddr, Scope};
use vfvm_protocols::PciAddress;

use super::error::{invalid, NetError, Result};

/// Most interfaces in one config.
pub const MAX_INTERFACES: usize = 64;
/// Most addresses on one interface.
pub const MAX_ADDRESSES: usize = 64;
/// Most routes in one config.
pub const MAX_ROUTES: usize = 256;
/// Most DNS servers.
pub const MAX_DNS_SERVERS: usize = 16;
/// Most DNS search domains.
pub const MAX_DNS_SEARCHES: usize = 32;
/// Most resolver options.
pub const MAX_DNS_OPTIONS: usize = 32;
/// Longest interface name (`IFNAMSIZ - 1`).
pub const MAX_IFNAME: usize = 15;
/// Largest JSON document [`NetworkConfig::from_json`] accepts.
pub const MAX_JSON_BYTES: usize = 1 << 20;
/// Longest string field of any kind (addresses, MACs, domains, options).
const MAX_STR: usize = 253;

/// The whole network config of the guest: the desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub routes: Vec<Route>,
    /// `None`: resolv.conf is left alone.
    #[serde(default)]
    pub dns: Option<Dns>,
}

/// One guest interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// The name it gets in the guest (1 to 15 bytes).
    pub name: String,
    /// How to find the device.
    pub device: DeviceMatch,
    /// MAC to set (unicast), if any.
    #[serde(default)]
    pub mac: Option<String>,
    /// MTU to set (68 to 65535; at least 1280 with IPv6 addresses), if any.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// "198.18.0.1/24", "fd00::1/64": the complete set of addresses (IPv6
    /// link-local ones the kernel makes are left alone).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// 802.1Q VLAN id (1 to 4094): the interface is then a VLAN link of that
    /// id on the device (its parent), created unless it exists; `mac`, `mtu`
    /// (at most the parent's) and `addresses` are the VLAN link's. Several
    /// VLAN interfaces (distinct ids) and one interface without `vlan` may name
    /// the same device. See the module docs ("VLAN").
    #[serde(default)]
    pub vlan: Option<u16>,
}

/// How to find a device: by the guest's PCI address, by MAC, or both (then both
/// must agree).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMatch {
    /// The guest's PCI address, "0000:00:05.0".
    #[serde(default)]
    pub pci_address: Option<String>,
    /// The device's MAC as it appears (current or permanent address).
    #[serde(default)]
    pub mac: Option<String>,
}

/// One route (main table).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// "default" (needs a gateway; its family is the gateway's) or a CIDR
    /// without host bits ("10.1.0.0/16", "fd01::/64", "0.0.0.0/0").
    pub dest: String,
    #[serde(default)]
    pub gateway: Option<String>,
    /// Interface name (one of the config's interfaces, or a link that exists).
    #[serde(default)]
    pub device: Option<String>,
    /// "universe" (alias "global"), "site", "link", "host". Default: "link"
    /// without gateway, "universe" with one. IPv4 only (IPv6 has no route scope).
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub metric: Option<u32>,
}

/// resolv.conf contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    #[serde(default)]
    pub servers: Vec<String>,
    #[serde(default)]
    pub searches: Vec<String>,
    /// resolv.conf `options`, e.g. "ndots:5", "edns0".
    #[serde(default)]
    pub options: Vec<String>,
}

impl NetworkConfig {
    /// Decodes the JSON wire form (at most [`MAX_JSON_BYTES`]; unknown fields are
    /// refused). Does not validate: see [`NetworkConfig::validate`].
    pub fn from_json(bytes: &[u8]) -> Result<NetworkConfig> {
        if bytes.len() > MAX_JSON_BYTES {
            return Err(NetError::Decode(format!("{} bytes is more than the {MAX_JSON_BYTES} allowed", bytes.len())));
        }
        serde_json::from_slice(bytes).map_err(|e| NetError::Decode(e.to_string()))
    }

    /// Checks every field; the typed result is what [`super::Network::apply`] works from.
    pub fn validate(&self) -> Result<ValidConfig> {
        validate(self)
    }
}

/// An address with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Cidr {
    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = mask32(self.prefix_len);
                u32::from(n) & m == u32::from(*a) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = mask128(self.prefix_len);
                u128::from(n) & m == u128::from(*a) & m
            }
            _ => false,
        }
    }
    fn has_host_bits(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => u32::from(a) & !mask32(self.prefix_len) != 0,
            IpAddr::V6(a) => u128::from(a) & !mask128(self.prefix_len) != 0,
        }
    }
}

fn mask32(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

/// Parses "addr/len" strictly: both parts required, the length within the
/// family's range.
fn parse_cidr(s: &str) -> std::result::Result<Cidr, String> {
    if s.len() > 64 {
        return Err("too long for an address with prefix".into());
    }
    let (a, l) = s.split_once('/').ok_or("expected ADDRESS/PREFIX_LENGTH, e.g. \"198.18.0.1/24\" or \"fd00::1/64\"")?;
    let addr: IpAddr = a.parse().map_err(|_| format!("{a:?} is not an IPv4 or IPv6 address"))?;
    let max = Family::of(&addr).max_prefix();
    if l.is_empty() || l.len() > 3 || !l.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("prefix length {l:?} is not a number"));
    }
    let prefix_len: u8 = l.parse().map_err(|_| format!("prefix length {l:?} is not a number from 0 to {max}"))?;
    if prefix_len > max {
        return Err(format!("prefix length {prefix_len} is longer than {max} for an {} address", if max == 32 { "IPv4" } else { "IPv6" }));
    }
    Ok(Cidr { addr, prefix_len })
}

fn parse_ip(s: &str) -> std::result::Result<IpAddr, String> {
    if s.len() > 64 {
        return Err("too long for an IP address".into());
    }
    s.parse().map_err(|_| "not an IPv4 or IPv6 address".to_string())
}

fn parse_mac(s: &str) -> std::result::Result<MacAddr, String> {
    if s.len() > 17 {
        return Err("too long for a MAC address".into());
    }
    let m: MacAddr = s.parse().map_err(|e: vfvm_netlink::MacParseError| e.to_string())?;
    Ok(m)
}

/// Checks an interface name the way the kernel does (`dev_valid_name`).
pub(crate) fn check_ifname(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(format!("an interface name is 1 to {MAX_IFNAME} bytes long, this one is {}", name.len()));
    }
    if name == "." || name == ".." {
        return Err("\".\" and \"..\" are not interface names".into());
    }
    if name.contains(['/', ':', '\0']) || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("an interface name cannot contain '/', ':', whitespace or control characters".into());
    }
    Ok(())
}

/// Where a device is looked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSel {
    pub pci: Option<PciAddress>,
    pub mac: Option<MacAddr>,
}

impl fmt::Display for DeviceSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pci, self.mac) {
            (Some(p), Some(m)) => write!(f, "PCI address {p} and MAC {m}"),
            (Some(p), None) => write!(f, "PCI address {p}"),
            (None, Some(m)) => write!(f, "MAC {m}"),
            (None, None) => write!(f, "no selector"),
        }
    }
}

/// A validated interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidInterface {
    pub name: String,
    pub device: DeviceSel,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u32>,
    /// In config order, no duplicates.
    pub addresses: Vec<Cidr>,
    pub vlan: Option<u16>,
}

/// A validated route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidRoute {
    /// Position in the config, for messages.
    pub index: usize,
    pub dst: Cidr,
    pub gateway: Option<IpAddr>,
    pub device: Option<String>,
    /// Effective scope (IPv4); IPv6 routes carry `Universe`.
    pub scope: Scope,
    /// As given (`None`: the kernel default, 0 for IPv4, 1024 for IPv6).
    pub metric: Option<u32>,
}

impl ValidRoute {
    pub fn family(&self) -> Family {
        Family::of(&self.dst.addr)
    }
    /// The metric the kernel will list.
    pub fn effective_metric(&self) -> u32 {
        self.metric.unwrap_or(match self.family() {
            Family::V4 => 0,
            Family::V6 => 1024,
        })
    }
    pub fn is_default(&self) -> bool {
        self.dst.prefix_len == 0
    }
    /// Installation order: link routes (no gateway) first, then gateway
    /// routes, default routes last.
    pub fn order_class(&self) -> u8 {
        match (self.gateway.is_some(), self.is_default()) {
            (false, false) => 0,
            (false, true) => 1,
            (true, false) => 2,
            (true, true) => 3,
        }
    }
}

impl fmt::Display for ValidRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} \"", self.index)?;
        if self.is_default() {
            write!(f, "default")?;
        } else {
            write!(f, "{}", self.dst)?;
        }
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(d) = &self.device {
            write!(f, " dev {d}")?;
        }
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        write!(f, "\"")
    }
}

/// A validated DNS config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidDns {
    pub servers: Vec<IpAddr>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl ValidDns {
    /// The resolv.conf text.
    pub fn render(&self) -> String {
        let mut s = String::from("# Generated by vfvm-agent. Do not edit.\n");
        for n in &self.servers {
            s += &format!("nameserver {n}\n");
        }
        if !self.searches.is_empty() {
            s += &format!("search {}\n", self.searches.join(" "));
        }
        if !self.options.is_empty() {
            s += &format!("options {}\n", self.options.join(" "));
        }
        s
    }
}

/// A config that passed [`NetworkConfig::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidConfig {
    pub interfaces: Vec<ValidInterface>,
    /// In installation order (see [`ValidRoute::order_class`]), stable within a class.
    pub routes: Vec<ValidRoute>,
    pub dns: Option<ValidDns>,
}

fn count(field: &str, n: usize, max: usize) -> Result<()> {
    if n > max {
        return Err(invalid(field, format!("{n} entries"), format!("at most {max} are allowed")));
    }
    Ok(())
}

fn validate(c: &NetworkConfig) -> Result<ValidConfig> {
    count("interfaces", c.interfaces.len(), MAX_INTERFACES)?;
    count("routes", c.routes.len(), MAX_ROUTES)?;
    let mut interfaces = Vec::with_capacity(c.interfaces.len());
    let mut names = BTreeSet::new();
    let mut pcis = BTreeSet::new();
    let mut macs = BTreeSet::new();
    for (i, iface) in c.interfaces.iter().enumerate() {
        let v = validate_interface(i, iface)?;
        if !names.insert(v.name.clone()) {
            return Err(invalid(format!("interfaces[{i}].name"), &v.name, "another interface has this name"));
        }
        // One interface per device, plus VLAN interfaces on it (one per id).
        let (dup_pci, dup_mac) = match v.vlan {
            None => ("another interface uses this PCI address", "another interface uses this MAC"),
            Some(_) => {
                ("another interface has a VLAN of this id on this PCI address", "another interface has a VLAN of this id on this MAC")
            }
        };
        if let Some(p) = v.device.pci {
            if !pcis.insert((p, v.vlan)) {
                return Err(invalid(format!("interfaces[{i}].device.pci_address"), p.to_string(), dup_pci));
            }
        }
        if let Some(m) = v.device.mac {
            if !macs.insert((m.0, v.vlan)) {
                return Err(invalid(format!("interfaces[{i}].device.mac"), m.to_string(), dup_mac));
            }
        }
        interfaces.push(v);
    }
    let mut routes = Vec::with_capacity(c.routes.len());
    let mut keys = BTreeMap::new();
    for (i, r) in c.routes.iter().enumerate() {
        let v = validate_route(i, r)?;
        let key = (v.dst, v.effective_metric());
        if let Some(prev) = keys.insert(key, i) {
            return Err(invalid(
                format!("routes[{i}]"),
                v.to_string(),
                format!("routes[{prev}] has the same destination and metric; the kernel keeps one route per destination and metric"),
            ));
        }
        routes.push(v);
    }
    routes.sort_by_key(|r| r.order_class());
    let dns = c.dns.as_ref().map(validate_dns).transpose()?;
    Ok(ValidConfig { interfaces, routes, dns })
}

fn validate_interface(i: usize, iface: &Interface) -> Result<ValidInterface> {
    let f = |s: &str| format!("interfaces[{i}].{s}");
    check_ifname(&iface.name).map_err(|r| invalid(f("name"), &iface.name, r))?;
    let pci = match &iface.device.pci_address {
        Some(p) => Some(p.parse::<PciAddress>().map_err(|e| invalid(f("device.pci_address"), p, e.reason))?),
        None => None,
    };
    let dmac = match &iface.device.mac {
        Some(m) => Some(parse_mac(m).map_err(|r| invalid(f("device.mac"), m, r))?),
        None => None,
    };
    if pci.is_none() && dmac.is_none() {
        return Err(invalid(f("device"), "{}", "give pci_address and/or mac to find the device by"));
    }
    let mac = match &iface.mac {
        Some(m) => {
            let v = parse_mac(m).map_err(|r| invalid(f("mac"), m, r))?;
            if v.is_zero() || v.0[0] & 1 != 0 {
                return Err(invalid(f("mac"), m, "not a unicast MAC (all zeroes, or the multicast bit is set)"));
            }
            Some(v)
        }
        None => None,
    };
    count(&f("addresses"), iface.addresses.len(), MAX_ADDRESSES)?;
    let mut addresses = Vec::with_capacity(iface.addresses.len());
    for (j, a) in iface.addresses.iter().enumerate() {
        let field = f(&format!("addresses[{j}]"));
        let c = parse_cidr(a).map_err(|r| invalid(&field, a, r))?;
        let bad = match c.addr {
            IpAddr::V4(v) => {
                if v.is_unspecified() || v.is_multicast() || v.is_broadcast() {
                    Some("unspecified, multicast and broadcast addresses cannot be assigned")
                } else if c.prefix_len == 0 {
                    Some("prefix length 0 is not an interface address")
                } else {
                    None
                }
            }
            IpAddr::V6(v) => {
                if v.is_unspecified() || v.is_multicast() {
                    Some("unspecified and multicast addresses cannot be assigned")
                } else if c.prefix_len == 0 {
                    Some("prefix length 0 is not an interface address")
                } else {
                    None
                }
            }
        };
        if let Some(r) = bad {
            return Err(invalid(&field, a, r));
        }
        if addresses.contains(&c) {
            return Err(invalid(&field, a, "listed twice"));
        }
        if let Some(o) = addresses.iter().find(|o: &&Cidr| o.addr == c.addr) {
            return Err(invalid(&field, a, format!("the same address is also listed as {o}")));
        }
        addresses.push(c);
    }
    if let Some(m) = iface.mtu {
        if !(68..=65535).contains(&m) {
            return Err(invalid(f("mtu"), m.to_string(), "must be 68 to 65535"));
        }
        if m < 1280 && addresses.iter().any(|a| a.addr.is_ipv6()) {
            return Err(invalid(f("mtu"), m.to_string(), "IPv6 needs an MTU of at least 1280 and the interface has IPv6 addresses"));
        }
    }
    if let Some(v) = iface.vlan {
        if !(1..=4094).contains(&v) {
            return Err(invalid(f("vlan"), v.to_string(), "a VLAN id is 1 to 4094"));
        }
    }
    Ok(ValidInterface { name: iface.name.clone(), device: DeviceSel { pci, mac: dmac }, mac, mtu: iface.mtu, addresses, vlan: iface.vlan })
}

fn validate_route(i: usize, r: &Route) -> Result<ValidRoute> {
    let f = |s: &str| format!("routes[{i}].{s}");
    let gateway = match &r.gateway {
        Some(g) => {
            let ip = parse_ip(g).map_err(|e| invalid(f("gateway"), g, e))?;
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(invalid(f("gateway"), g, "not a unicast address"));
            }
            Some(ip)
        }
        None => None,
    };
    let dst = if r.dest == "default" {
        let Some(g) = gateway else {
            return Err(invalid(
                f("dest"),
                &r.dest,
                "\"default\" needs a gateway (for a default route through a device, write 0.0.0.0/0 or ::/0)",
            ));
        };
        Cidr { addr: Family::of(&g).unspecified(), prefix_len: 0 }
    } else {
        let c = parse_cidr(&r.dest).map_err(|e| invalid(f("dest"), &r.dest, e))?;
        if c.has_host_bits() {
            return Err(invalid(f("dest"), &r.dest, "the address has bits set beyond the prefix length (not a network address)"));
        }
        c
    };
    let fam = Family::of(&dst.addr);
    if let Some(g) = gateway {
        if Family::of(&g) != fam {
            return Err(invalid(f("gateway"), g.to_string(), format!("not of the destination's family ({})", r.dest)));
        }
    }
    let device = match &r.device {
        Some(d) => {
            check_ifname(d).map_err(|e| invalid(f("device"), d, e))?;
            Some(d.clone())
        }
        None => None,
    };
    if gateway.is_none() && device.is_none() {
        return Err(invalid(format!("routes[{i}]"), &r.dest, "a route needs a gateway or a device"));
    }
    let scope = match r.scope.as_deref() {
        None => {
            if gateway.is_none() && fam == Family::V4 {
                Scope::Link
            } else {
                Scope::Universe
            }
        }
        Some(s) => {
            let sc = match s {
                "universe" | "global" => Scope::Universe,
                "site" => Scope::Site,
                "link" => Scope::Link,
                "host" => Scope::Host,
                _ => return Err(invalid(f("scope"), s, "expected \"universe\", \"global\", \"site\", \"link\" or \"host\"")),
            };
            if gateway.is_some() && sc != Scope::Universe {
                return Err(invalid(f("scope"), s, "a route with a gateway has scope universe"));
            }
            if fam == Family::V6 && sc != Scope::Universe {
                return Err(invalid(f("scope"), s, "IPv6 routes have no scope"));
            }
            sc
        }
    };
    Ok(ValidRoute { index: i, dst, gateway, device, scope, metric: r.metric })
}

fn check_token(field: &str, s: &str, what: &str, ok: impl Fn(char) -> bool) -> Result<()> {
    if s.is_empty() || s.len() > MAX_STR {
        return Err(invalid(field, s, format!("a {what} is 1 to {MAX_STR} bytes long")));
    }
    if !s.chars().all(ok) {
        return Err(invalid(field, s, format!("a {what} has only letters, digits and the characters allowed for it")));
    }
    Ok(())
}

fn validate_dns(d: &Dns) -> Result<ValidDns> {
    count("dns.servers", d.servers.len(), MAX_DNS_SERVERS)?;
    count("dns.searches", d.searches.len(), MAX_DNS_SEARCHES)?;
    count("dns.options", d.options.len(), MAX_DNS_OPTIONS)?;
    let mut servers = Vec::new();
    for (i, s) in d.servers.iter().enumerate() {
        let ip = parse_ip(s).map_err(|e| invalid(format!("dns.servers[{i}]"), s, e))?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(invalid(format!("dns.servers[{i}]"), s, "not a unicast address"));
        }
        servers.push(ip);
    }
    for (i, s) in d.searches.iter().enumerate() {
        check_token(&format!("dns.searches[{i}]"), s, "search domain", |c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')?;
    }
    for (i, s) in d.options.iter().enumerate() {
        check_token(&format!("dns.options[{i}]"), s, "resolver option", |c| {
            c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.')
        })?;
    }
    Ok(ValidDns { servers, searches: d.searches.clone(), options: d.options.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        assert_eq!(parse_cidr("198.18.0.1/24").unwrap(), Cidr { addr: "198.18.0.1".parse().unwrap(), prefix_len: 24 });
        assert!(parse_cidr("fd00::1/64").is_ok());
        for bad in ["300.1.1.1/33", "1.2.3.4", "1.2.3.4/", "1.2.3.4/33", "::1/129", "1.2.3.4/+1", "x/1", "1.2.3.4/024x"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        let c = parse_cidr("10.1.0.0/16").unwrap();
        assert!(c.contains(&"10.1.200.3".parse().unwrap()));
        assert!(!c.contains(&"10.2.0.1".parse().unwrap()));
        assert!(!c.has_host_bits());
        assert!(parse_cidr("10.1.0.1/16").unwrap().has_host_bits());
        assert!(parse_cidr("0.0.0.0/0").unwrap().contains(&"1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn dns_render() {
        let d = validate_dns(&Dns {
            servers: vec!["10.96.0.10".into(), "fd00::a".into()],
            searches: vec!["svc.cluster.local".into(), "cluster.local".into()],
            options: vec!["ndots:5".into()],
        })
        .unwrap();
        assert_eq!(
            d.render(),
            "# Generated by vfvm-agent. Do not edit.\nnameserver 10.96.0.10\nnameserver fd00::a\nsearch svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        let e = validate_dns(&Dns { searches: vec!["a\nnameserver 1.1.1.1".into()], ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("dns.searches[0]"), "{e}");
    }

    #[test]
    fn route_ordering_and_defaults() {
        let c = NetworkConfig {
            routes: vec![
                Route { dest: "default".into(), gateway: Some("10.0.0.1".into()), ..Default::default() },
                Route { dest: "10.9.0.0/16".into(), gateway: Some("10.0.0.1".into()), ..Default::default() },
                Route { dest: "10.8.0.0/16".into(), device: Some("eth0".into()), ..Default::default() },
            ],
            ..Default::default()
        };
        let v = c.validate().unwrap();
        let order: Vec<usize> = v.routes.iter().map(|r| r.index).collect();
        assert_eq!(order, [2, 1, 0]);
        assert_eq!(v.routes[0].scope, Scope::Link);
        assert_eq!(v.routes[2].scope, Scope::Universe);
        assert_eq!(v.routes[2].to_string(), "#0 \"default via 10.0.0.1\"");
    }
}
