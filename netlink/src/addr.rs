//! IPv4 and IPv6 addresses.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::error::Result;
use crate::socket::{Ctx, Handle, Kind};
use crate::types::{AddrFlags, Address, AddressSpec, Family, Scope};

fn af(f: Family) -> AddressFamily {
    match f {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn parse_address(m: AddressMessage) -> Option<Address> {
    let mut local = None;
    let mut address = None;
    let mut a = Address {
        ifindex: m.header.index,
        addr: IpAddr::from([0u8; 4]),
        prefix_len: m.header.prefix_len,
        peer: None,
        broadcast: None,
        label: None,
        scope: Scope::from(u8::from(m.header.scope)),
        flags: AddrFlags(u32::from(m.header.flags.bits())),
        route_metric: None,
    };
    for attr in m.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(ip),
            AddressAttribute::Address(ip) => address = Some(ip),
            AddressAttribute::Broadcast(ip) => a.broadcast = Some(ip),
            AddressAttribute::Label(l) => a.label = Some(l),
            AddressAttribute::Flags(f) => a.flags = AddrFlags(f.bits()),
            AddressAttribute::RoutePriority(p) => a.route_metric = Some(p),
            _ => {}
        }
    }
    match (local, address) {
        (Some(l), Some(p)) => {
            a.addr = l;
            if p != l {
                a.peer = Some(p);
            }
        }
        (Some(l), None) => a.addr = l,
        (None, Some(p)) => a.addr = p,
        (None, None) => return None,
    }
    Some(a)
}

fn addr_msg(ifindex: u32, spec: &AddressSpec) -> AddressMessage {
    let fam = Family::of(&spec.addr);
    let mut m = AddressMessage::default();
    m.header.family = af(fam);
    m.header.prefix_len = spec.prefix_len;
    m.header.index = ifindex;
    m.attributes.push(AddressAttribute::Local(spec.addr));
    m.attributes.push(AddressAttribute::Address(spec.peer.unwrap_or(spec.addr)));
    m
}

impl Handle {
    /// The addresses (v4 and v6) on link `ifindex`, IPv4 first, in kernel order.
    /// Kernel-made ones (IPv6 link-local `fe80::/64`, scope link) are included:
    /// filter on [`Address::scope`] if unwanted.
    pub fn addresses(&self, ifindex: u32) -> Result<Vec<Address>> {
        Ok(self.all_addresses()?.into_iter().filter(|a| a.ifindex == ifindex).collect())
    }

    /// Every address in the namespace.
    pub fn all_addresses(&self) -> Result<Vec<Address>> {
        let ctx = Ctx { op: "list", object: "addresses" };
        let answer = self.request(&ctx, RouteNetlinkMessage::GetAddress(AddressMessage::default()), 0, Kind::Dump)?;
        Ok(answer
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => parse_address(a),
                _ => None,
            })
            .collect())
    }

    /// Adds an address to link `ifindex` (EEXIST if it is already there). For
    /// IPv4 the kernel adds the prefix route (`proto kernel`) at once when the
    /// link is up, else when it comes up; IPv6 likewise unless `NOPREFIXROUTE`.
    /// IPv6 addresses without `NODAD` stay `TENTATIVE` (not usable as a source)
    /// until DAD finishes, about 1 s after the link has carrier; pass
    /// [`AddrFlags::NODAD`] to use them at once.
    pub fn add_address(&self, ifindex: u32, spec: &AddressSpec) -> Result<()> {
        let object = format!("{}/{} on link {ifindex}", spec.addr, spec.prefix_len);
        let ctx = Ctx { op: "add address", object: &object };
        let fam = Family::of(&spec.addr);
        if spec.prefix_len > fam.max_prefix() {
            return Err(ctx.invalid(format!("prefix length {} is longer than {}", spec.prefix_len, fam.max_prefix())));
        }
        if let Some(p) = spec.peer {
            if Family::of(&p) != fam {
                return Err(ctx.invalid(format!("peer {p} is not of the address's family")));
            }
        }
        let mut m = addr_msg(ifindex, spec);
        let flags = spec.flags & AddrFlags::CONFIGURABLE;
        m.header.flags = AddressHeaderFlags::from_bits_retain((flags.0 & 0xff) as u8);
        if fam == Family::V4 {
            m.header.scope = AddressScope::from(u8::from(spec.scope));
            if let Some(b) = spec.broadcast {
                m.attributes.push(AddressAttribute::Broadcast(b));
            }
            if let Some(l) = &spec.label {
                m.attributes.push(AddressAttribute::Label(l.clone()));
            }
        } else if spec.broadcast.is_some() {
            return Err(ctx.invalid("IPv6 addresses have no broadcast address"));
        }
        if flags.0 != 0 {
            m.attributes.push(AddressAttribute::Flags(AddressFlags::from_bits_retain(flags.0)));
        }
        if let Some(p) = spec.route_metric {
            m.attributes.push(AddressAttribute::RoutePriority(p));
        }
        self.request(&ctx, RouteNetlinkMessage::NewAddress(m), NLM_F_CREATE | NLM_F_EXCL, Kind::Ack)?;
        Ok(())
    }

    /// Removes `addr/prefix_len` from link `ifindex` (EADDRNOTAVAIL if absent).
    /// Removing an IPv4 primary address also removes its secondaries unless
    /// `net.ipv4.conf.*.promote_secondaries` is set.
    pub fn delete_address(&self, ifindex: u32, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let object = format!("{addr}/{prefix_len} on link {ifindex}");
        let ctx = Ctx { op: "delete address", object: &object };
        let m = addr_msg(ifindex, &AddressSpec::new(addr, prefix_len));
        self.request(&ctx, RouteNetlinkMessage::DelAddress(m), 0, Kind::Ack)?;
        Ok(())
    }
}
