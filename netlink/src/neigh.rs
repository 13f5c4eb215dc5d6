//! Neighbour (ARP / NDP) entries.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::error::Result;
use crate::socket::{Ctx, Handle, Kind};
use crate::types::{nud, MacAddr, Neighbour};

fn neigh_msg(ifindex: u32, ip: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    m.header.ifindex = ifindex;
    m.attributes.push(NeighbourAttribute::Destination(match ip {
        IpAddr::V4(v) => NeighbourAddress::Inet(v),
        IpAddr::V6(v) => NeighbourAddress::Inet6(v),
    }));
    m
}

fn parse_neigh(m: NeighbourMessage) -> Option<Neighbour> {
    let mut ip = None;
    let mut lladdr = None;
    for a in m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(IpAddr::V4(v)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => ip = Some(IpAddr::V6(v)),
            NeighbourAttribute::LinkLayerAddress(b) => lladdr = MacAddr::from_slice(&b),
            _ => {}
        }
    }
    Some(Neighbour { ifindex: m.header.ifindex, ip: ip?, lladdr, state: u16::from(m.header.state) })
}

impl Handle {
    /// The IPv4 and IPv6 neighbour entries of link `ifindex`, whatever their
    /// state (learned ones included: use [`Neighbour::is_permanent`] to keep the
    /// configured ones).
    pub fn neighbours(&self, ifindex: u32) -> Result<Vec<Neighbour>> {
        let ctx = Ctx { op: "list", object: "neighbours" };
        let answer = self.request(&ctx, RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()), 0, Kind::Dump)?;
        Ok(answer
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => parse_neigh(n),
                _ => None,
            })
            .filter(|n| n.ifindex == ifindex)
            .collect())
    }

    /// Adds a permanent entry `ip -> lladdr` on link `ifindex`, replacing any
    /// entry for `ip` there (learned or not), like `ip neigh replace ... nud
    /// permanent`.
    pub fn add_permanent_neighbour(&self, ifindex: u32, ip: IpAddr, lladdr: MacAddr) -> Result<()> {
        let object = format!("{ip} lladdr {lladdr} on link {ifindex}");
        let ctx = Ctx { op: "add neighbour", object: &object };
        let mut m = neigh_msg(ifindex, ip);
        m.header.state = NeighbourState::from(nud::PERMANENT);
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(lladdr.0.to_vec()));
        self.request(&ctx, RouteNetlinkMessage::NewNeighbour(m), NLM_F_CREATE | NLM_F_REPLACE, Kind::Ack)?;
        Ok(())
    }

    /// Deletes the entry for `ip` on link `ifindex` (ENOENT if none).
    pub fn delete_neighbour(&self, ifindex: u32, ip: IpAddr) -> Result<()> {
        let object = format!("{ip} on link {ifindex}");
        let ctx = Ctx { op: "delete neighbour", object: &object };
        self.request(&ctx, RouteNetlinkMessage::DelNeighbour(neigh_msg(ifindex, ip)), 0, Kind::Ack)?;
        Ok(())
    }
}
