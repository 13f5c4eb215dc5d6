//! IPv4 and IPv6 routes.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType as NlRouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::error::Result;
use crate::socket::{Ctx, Handle, Kind};
use crate::types::{proto, table, Family, Route, RouteSpec, RouteType, Scope};

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn parse_route(m: RouteMessage) -> Option<Route> {
    let family = match m.header.address_family {
        AddressFamily::Inet => Family::V4,
        AddressFamily::Inet6 => Family::V6,
        _ => return None,
    };
    let flags = m.header.flags;
    let mut r = Route {
        family,
        dst: family.unspecified(),
        dst_len: m.header.destination_prefix_length,
        gateway: None,
        oif: None,
        priority: None,
        prefsrc: None,
        scope: Scope::from(u8::from(m.header.scope)),
        protocol: u8::from(m.header.protocol),
        table: u32::from(m.header.table),
        kind: RouteType::from(u8::from(m.header.kind)),
        onlink: flags.contains(RouteFlags::Onlink),
        linkdown: flags.contains(RouteFlags::Linkdown),
        multipath: false,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => {
                if let Some(ip) = route_ip(d) {
                    r.dst = ip;
                }
            }
            RouteAttribute::Gateway(g) => r.gateway = route_ip(g),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Priority(p) => r.priority = Some(*p),
            RouteAttribute::PrefSource(s) => r.prefsrc = route_ip(s),
            RouteAttribute::Table(t) => r.table = *t,
            RouteAttribute::MultiPath(_) => r.multipath = true,
            _ => {}
        }
    }
    Some(r)
}

fn describe(spec: &RouteSpec) -> String {
    let mut s = format!("{}/{}", spec.dst, spec.dst_len);
    if let Some(g) = spec.gateway {
        s += &format!(" via {g}");
    }
    if let Some(o) = spec.oif {
        s += &format!(" dev {o}");
    }
    if let Some(p) = spec.priority {
        s += &format!(" metric {p}");
    }
    if let Some(t) = spec.table {
        s += &format!(" table {t}");
    }
    s
}

fn route_msg(ctx: &Ctx<'_>, spec: &RouteSpec, add: bool) -> Result<RouteMessage> {
    let fam = spec.family();
    if spec.dst_len > fam.max_prefix() {
        return Err(ctx.invalid(format!("prefix length {} is longer than {}", spec.dst_len, fam.max_prefix())));
    }
    for (what, ip) in [("gateway", spec.gateway), ("prefsrc", spec.prefsrc)] {
        if let Some(ip) = ip {
            if Family::of(&ip) != fam {
                return Err(ctx.invalid(format!("{what} {ip} is not of the destination's family")));
            }
        }
    }
    let mut m = RouteMessage::default();
    m.header.address_family = match fam {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    m.header.destination_prefix_length = spec.dst_len;
    let tbl = spec.table.unwrap_or(table::MAIN);
    // Ids above 255 do not fit the header: 0 (RT_TABLE_UNSPEC) there, the full id in RTA_TABLE below.
    m.header.table = u8::try_from(tbl).unwrap_or(0);
    m.header.kind = NlRouteType::from(u8::from(spec.kind));
    let scope = match spec.scope {
        Some(s) => s,
        None if !add => Scope::Nowhere,
        None if spec.kind == RouteType::Local => Scope::Host,
        None if spec.gateway.is_none() && matches!(spec.kind, RouteType::Unicast | RouteType::Unspec) => Scope::Link,
        None => Scope::Universe,
    };
    m.header.scope = RouteScope::from(u8::from(scope));
    m.header.protocol = RouteProtocol::from(match spec.protocol {
        Some(p) => p,
        None if add => proto::BOOT,
        None => proto::UNSPEC,
    });
    if spec.onlink {
        m.header.flags = RouteFlags::Onlink;
    }
    if spec.dst_len > 0 {
        m.attributes.push(RouteAttribute::Destination(RouteAddress::from(spec.dst)));
    }
    if let Some(g) = spec.gateway {
        m.attributes.push(RouteAttribute::Gateway(RouteAddress::from(g)));
    }
    if let Some(o) = spec.oif {
        m.attributes.push(RouteAttribute::Oif(o));
    }
    if let Some(p) = spec.priority {
        m.attributes.push(RouteAttribute::Priority(p));
    }
    if let Some(s) = spec.prefsrc {
        m.attributes.push(RouteAttribute::PrefSource(RouteAddress::from(s)));
    }
    m.attributes.push(RouteAttribute::Table(tbl));
    Ok(m)
}

impl Handle {
    /// The routes of `family` in the main table, in kernel order. Kernel-made
    /// routes (prefix routes of addresses, IPv6 `fe80::/64`) are included; see
    /// [`Route::is_kernel_generated`] and the `protocol`/`scope` fields to filter.
    pub fn routes(&self, family: Family) -> Result<Vec<Route>> {
        self.routes_in_table(family, Some(table::MAIN))
    }

    /// The routes of `family` in `table`, or in every table (`None`: the local
    /// table's local/broadcast/multicast routes included).
    pub fn routes_in_table(&self, family: Family, table: Option<u32>) -> Result<Vec<Route>> {
        let ctx = Ctx {
            op: "list",
            object: match family {
                Family::V4 => "IPv4 routes",
                Family::V6 => "IPv6 routes",
            },
        };
        let mut m = RouteMessage::default();
        m.header.address_family = match family {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        };
        let answer = self.request(&ctx, RouteNetlinkMessage::GetRoute(m), 0, Kind::Dump)?;
        Ok(answer
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse_route(r),
                _ => None,
            })
            .filter(|r| r.family == family && table.is_none_or(|t| r.table == t))
            .collect())
    }

    /// Adds a route exactly as given (EEXIST if the same route is there).
    ///
    /// The library does what it is told, in the order it is told: a gateway
    /// must already be reachable through a route on an up link (add link routes
    /// and addresses first, bring the link up first) or the kernel answers
    /// ENETUNREACH (IPv4) / EHOSTUNREACH or ENETUNREACH (IPv6), unless `onlink`.
    pub fn add_route(&self, spec: &RouteSpec) -> Result<()> {
        let object = describe(spec);
        let ctx = Ctx { op: "add route", object: &object };
        let m = route_msg(&ctx, spec, true)?;
        self.request(&ctx, RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL, Kind::Ack)?;
        Ok(())
    }

    /// Deletes the first route matching `spec` (ESRCH if none). Unset
    /// scope/protocol match anything; dst/prefix, table, type, and whatever
    /// gateway/oif/metric are given must match.
    pub fn delete_route(&self, spec: &RouteSpec) -> Result<()> {
        let object = describe(spec);
        let ctx = Ctx { op: "delete route", object: &object };
        let m = route_msg(&ctx, spec, false)?;
        self.request(&ctx, RouteNetlinkMessage::DelRoute(m), 0, Kind::Ack)?;
        Ok(())
    }
}
