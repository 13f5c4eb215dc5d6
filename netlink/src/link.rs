//! Links: list, get, set, create (veth, bridge, VLAN), move between namespaces, delete.

use std::os::fd::{AsFd, AsRawFd};

use netlink_packet_core::{DefaultNla, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVlan, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo, LinkMessage, Prop, State, VlanProtocol,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::error::{Error, Result};
use crate::netns::Netns;
use crate::socket::{Ctx, Handle, Kind};
use crate::types::{Link, MacAddr, OperState};

/// `IFNAMSIZ - 1`.
const IFNAME_MAX: usize = 15;
/// `ALTIFNAMSIZ - 1`.
const ALTIFNAME_MAX: usize = 127;
const IFLA_ALT_IFNAME: u16 = 53;
/// Highest 802.1Q VLAN id (`VLAN_VID_MASK - 1`; 4095 is reserved).
const MAX_VLAN_ID: u16 = 4094;
/// The name the VLAN support probe asks for (nothing is ever created).
const VLAN_PROBE_NAME: &str = "vfvmvlanprobe";

/// Adds what an EOPNOTSUPP from a VLAN creation means.
fn no_8021q(e: Error) -> Error {
    match e {
        Error::Kernel { op, object, errno: libc::EOPNOTSUPP, message } => Error::Kernel {
            op,
            object,
            errno: libc::EOPNOTSUPP,
            message: Some(format!(
                "{}: the kernel has no 802.1Q VLAN support (module 8021q not built, not loaded and not loadable)",
                message.as_deref().unwrap_or("Unknown device type")
            )),
        },
        e => e,
    }
}

pub(crate) fn link_obj(index: u32) -> String {
    format!("link {index}")
}

fn check_name(ctx: &Ctx<'_>, name: &str, max: usize) -> Result<()> {
    if name.is_empty() || name.len() > max {
        return Err(ctx.invalid(format!("interface name {name:?} must be 1 to {max} bytes long")));
    }
    if name == "." || name == ".." || name.contains(['/', ':', '\0']) || name.contains(char::is_whitespace) {
        return Err(ctx.invalid(format!("interface name {name:?} contains a character the kernel refuses")));
    }
    Ok(())
}

fn msg_for(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m
}

pub(crate) fn parse_link(m: LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        altnames: Vec::new(),
        mac: None,
        perm_mac: None,
        mtu: 0,
        admin_up: m.header.flags.contains(LinkFlags::Up),
        lower_up: m.header.flags.contains(LinkFlags::LowerUp),
        oper_state: OperState::Unknown,
        kind: None,
        parent_bus: None,
        parent_dev: None,
        link: None,
        master: None,
        vlan_id: None,
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n,
            LinkAttribute::PropList(props) => {
                for p in props {
                    if let Prop::AltIfName(n) = p {
                        l.altnames.push(n);
                    }
                }
            }
            LinkAttribute::Address(b) => l.mac = MacAddr::from_slice(&b),
            LinkAttribute::PermAddress(b) => l.perm_mac = MacAddr::from_slice(&b),
            LinkAttribute::Mtu(v) => l.mtu = v,
            LinkAttribute::OperState(s) => {
                l.oper_state = match s {
                    State::Unknown => OperState::Unknown,
                    State::NotPresent => OperState::NotPresent,
                    State::Down => OperState::Down,
                    State::LowerLayerDown => OperState::LowerLayerDown,
                    State::Testing => OperState::Testing,
                    State::Dormant => OperState::Dormant,
                    State::Up => OperState::Up,
                    State::Other(o) => OperState::Other(o),
                    _ => OperState::Unknown,
                }
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => l.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vlan(data)) => {
                            for d in data {
                                if let InfoVlan::Id(id) = d {
                                    l.vlan_id = Some(id);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            LinkAttribute::ParentDevBusName(s) => l.parent_bus = Some(s),
            LinkAttribute::ParentDevName(s) => l.parent_dev = Some(s),
            LinkAttribute::Link(v) => l.link = Some(v),
            LinkAttribute::Controller(v) => l.master = Some(v),
            _ => {}
        }
    }
    l
}

impl Handle {
    fn one_link(&self, ctx: &Ctx<'_>, msg: LinkMessage) -> Result<Link> {
        let answer = self.request(ctx, RouteNetlinkMessage::GetLink(msg), 0, Kind::Get)?;
        for m in answer {
            if let RouteNetlinkMessage::NewLink(l) = m {
                return Ok(parse_link(l));
            }
        }
        Err(ctx.protocol("no RTM_NEWLINK in the answer"))
    }

    fn set_link(&self, ctx: &Ctx<'_>, msg: LinkMessage) -> Result<()> {
        self.request(ctx, RouteNetlinkMessage::SetLink(msg), 0, Kind::Ack)?;
        Ok(())
    }

    /// All links of the namespace, in kernel (ifindex) order.
    pub fn links(&self) -> Result<Vec<Link>> {
        let ctx = Ctx { op: "list", object: "links" };
        let answer = self.request(&ctx, RouteNetlinkMessage::GetLink(LinkMessage::default()), 0, Kind::Dump)?;
        Ok(answer
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })
            .collect())
    }

    /// The link called `name`: its name or one of its altnames. A missing link is
    /// [`crate::Error::Kernel`] with errno `ENODEV` (see [`crate::Error::is_not_found`]).
    pub fn link_by_name(&self, name: &str) -> Result<Link> {
        let object = format!("link {name:?}");
        let ctx = Ctx { op: "get", object: &object };
        check_name(&ctx, name, ALTIFNAME_MAX)?;
        let mut msg = LinkMessage::default();
        if name.len() <= IFNAME_MAX {
            msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        } else {
            let mut v = name.as_bytes().to_vec();
            v.push(0);
            msg.attributes.push(LinkAttribute::Other(DefaultNla::new(IFLA_ALT_IFNAME, v)));
        }
        self.one_link(&ctx, msg)
    }

    /// Like [`Handle::link_by_name`], but a missing link is `Ok(None)`.
    pub fn find_link(&self, name: &str) -> Result<Option<Link>> {
        match self.link_by_name(name) {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The link with ifindex `index` (ENODEV if none).
    pub fn link_by_index(&self, index: u32) -> Result<Link> {
        let object = link_obj(index);
        let ctx = Ctx { op: "get", object: &object };
        if index == 0 || index > i32::MAX as u32 {
            return Err(ctx.invalid("ifindex must be in 1..=i32::MAX"));
        }
        self.one_link(&ctx, msg_for(index))
    }

    /// Sets the link administratively up (`IFF_UP`) or down.
    pub fn set_link_up(&self, index: u32, up: bool) -> Result<()> {
        let object = link_obj(index);
        let ctx = Ctx { op: if up { "set up" } else { "set down" }, object: &object };
        let mut msg = msg_for(index);
        msg.header.change_mask = LinkFlags::Up;
        if up {
            msg.header.flags = LinkFlags::Up;
        }
        self.set_link(&ctx, msg)
    }

    /// Renames a link. Kernels before 6.10 or so (Debian's 6.1 among them) refuse
    /// (EBUSY) to rename a link that is up; newer ones allow it. Set it down first.
    pub fn rename_link(&self, index: u32, new_name: &str) -> Result<()> {
        let object = format!("link {index} to {new_name:?}");
        let ctx = Ctx { op: "rename", object: &object };
        check_name(&ctx, new_name, IFNAME_MAX)?;
        let mut msg = msg_for(index);
        msg.attributes.push(LinkAttribute::IfName(new_name.to_string()));
        self.set_link(&ctx, msg)
    }

    /// Sets the MTU (EINVAL outside the device's min/max MTU).
    pub fn set_link_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let object = format!("link {index} to {mtu}");
        let ctx = Ctx { op: "set MTU of", object: &object };
        let mut msg = msg_for(index);
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.set_link(&ctx, msg)
    }

    /// Sets the hardware address. Some drivers refuse while up (EBUSY); veth
    /// and most physical NICs accept it live.
    pub fn set_link_mac(&self, index: u32, mac: MacAddr) -> Result<()> {
        let object = format!("link {index} to {mac}");
        let ctx = Ctx { op: "set MAC of", object: &object };
        let mut msg = msg_for(index);
        msg.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        self.set_link(&ctx, msg)
    }

    /// Moves a link into `target` (`IFLA_NET_NS_FD`), renaming it on the way if
    /// `new_name` is given. The kernel brings the link down and drops its
    /// addresses and routes (MAC, MTU, altnames stay); the ifindex is kept if
    /// free in `target`, else a new one is assigned: look the link up by name
    /// there afterwards.
    ///
    /// Without `new_name`, a link whose name is taken in `target` is refused
    /// (EEXIST) and stays. With `new_name`, the kernel moves first and renames
    /// after, so a `new_name` taken in `target` would leave the link moved under
    /// its old name and still answer EEXIST; this function therefore checks
    /// `target` for `new_name` first and answers EEXIST ("nothing was moved")
    /// without moving. (A name taken in between by someone else still gives the
    /// kernel's partial result: on EEXIST, look in both namespaces.)
    pub fn move_link_to_netns(&self, index: u32, target: &Netns, new_name: Option<&str>) -> Result<()> {
        let object = format!("link {index} to network namespace {}", target.path().display());
        let ctx = Ctx { op: "move", object: &object };
        let mut msg = msg_for(index);
        if let Some(n) = new_name {
            check_name(&ctx, n, IFNAME_MAX)?;
            if Handle::in_netns(target)?.find_link(n)?.is_some() {
                return Err(ctx.kernel(libc::EEXIST, Some(format!("{n:?} is taken in the target namespace; nothing was moved"))));
            }
            msg.attributes.push(LinkAttribute::IfName(n.to_string()));
        }
        msg.attributes.push(LinkAttribute::NetNsFd(target.as_fd().as_raw_fd()));
        self.set_link(&ctx, msg)
    }

    fn altname_op(&self, index: u32, altname: &str, add: bool) -> Result<()> {
        let object = format!("{altname:?} on link {index}");
        let ctx = Ctx { op: if add { "add altname" } else { "delete altname" }, object: &object };
        check_name(&ctx, altname, ALTIFNAME_MAX)?;
        let mut msg = msg_for(index);
        msg.attributes.push(LinkAttribute::PropList(vec![Prop::AltIfName(altname.to_string())]));
        let m = if add { RouteNetlinkMessage::NewLinkProp(msg) } else { RouteNetlinkMessage::DelLinkProp(msg) };
        self.request(&ctx, m, if add { NLM_F_CREATE | NLM_F_EXCL } else { 0 }, Kind::Ack)?;
        Ok(())
    }

    /// Adds an alternative name (up to 127 bytes; EEXIST if any link in the
    /// namespace already has that name or altname).
    pub fn add_altname(&self, index: u32, altname: &str) -> Result<()> {
        self.altname_op(index, altname, true)
    }

    /// Removes an alternative name (ENOENT if the link does not have it).
    pub fn del_altname(&self, index: u32, altname: &str) -> Result<()> {
        self.altname_op(index, altname, false)
    }

    fn new_link(&self, ctx: &Ctx<'_>, msg: LinkMessage) -> Result<()> {
        self.request(ctx, RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL, Kind::Ack)?;
        Ok(())
    }

    /// Creates a veth pair `name` <-> `peer`, the peer in `peer_netns` if given
    /// (else alongside). Both ends start down.
    pub fn create_veth(&self, name: &str, peer: &str, peer_netns: Option<&Netns>) -> Result<()> {
        let object = format!("{name:?} (peer {peer:?})");
        let ctx = Ctx { op: "create veth", object: &object };
        check_name(&ctx, name, IFNAME_MAX)?;
        check_name(&ctx, peer, IFNAME_MAX)?;
        let mut peer_msg = LinkMessage::default();
        peer_msg.attributes.push(LinkAttribute::IfName(peer.to_string()));
        if let Some(ns) = peer_netns {
            peer_msg.attributes.push(LinkAttribute::NetNsFd(ns.as_fd().as_raw_fd()));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth), LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg)))]));
        self.new_link(&ctx, msg)
    }

    /// Creates a bridge (down, no ports).
    pub fn create_bridge(&self, name: &str) -> Result<()> {
        let object = format!("{name:?}");
        let ctx = Ctx { op: "create bridge", object: &object };
        check_name(&ctx, name, IFNAME_MAX)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
        self.new_link(&ctx, msg)
    }

    /// Creates an 802.1Q VLAN link `name` with id `vlan_id` (0 to 4094, as the
    /// kernel takes them) on the link `parent_index` (`IFLA_LINK`). It starts
    /// down, with the parent's MAC and MTU. The kernel refuses a second VLAN of
    /// the same id on the same parent, and a taken name (EEXIST either way).
    ///
    /// A kernel without 802.1Q support (no `8021q` module, or one it cannot
    /// load) answers EOPNOTSUPP, "Unknown device type"; the error says that the
    /// kernel lacks 802.1Q ([`Handle::vlan_supported`] asks without creating
    /// anything).
    pub fn create_vlan(&self, name: &str, parent_index: u32, vlan_id: u16) -> Result<()> {
        let object = format!("{name:?} (VLAN {vlan_id} on link {parent_index})");
        let ctx = Ctx { op: "create vlan", object: &object };
        check_name(&ctx, name, IFNAME_MAX)?;
        if parent_index == 0 || parent_index > i32::MAX as u32 {
            return Err(ctx.invalid("the parent ifindex must be in 1..=i32::MAX"));
        }
        if vlan_id > MAX_VLAN_ID {
            return Err(ctx.invalid(format!("VLAN id {vlan_id} is above {MAX_VLAN_ID} (802.1Q ids are 12 bits, 4095 is reserved)")));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Link(parent_index));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vlan),
            LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(vlan_id), InfoVlan::Protocol(VlanProtocol::Ieee8021Q)])),
        ]));
        self.new_link(&ctx, msg).map_err(no_8021q)
    }

    /// Whether the kernel can create VLAN links, asked without creating
    /// anything: an `RTM_NEWLINK` of kind "vlan" with the invalid id 4095. A
    /// kernel with 802.1Q (or one that autoloads `8021q` for it) refuses the id
    /// (ERANGE or EINVAL); one without answers EOPNOTSUPP ("Unknown device
    /// type"). Needs CAP_NET_ADMIN like any link change.
    pub fn vlan_supported(&self) -> Result<bool> {
        let ctx = Ctx { op: "probe", object: "802.1Q VLAN support" };
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(VLAN_PROBE_NAME.to_string()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vlan),
            LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(MAX_VLAN_ID + 1)])),
        ]));
        match self.new_link(&ctx, msg) {
            Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(e) if matches!(e.errno(), Some(libc::ERANGE | libc::EINVAL)) => Ok(true),
            Err(e) => Err(e),
            Ok(()) => {
                // Cannot happen (the id is invalid); never leave a link behind.
                if let Ok(l) = self.link_by_name(VLAN_PROBE_NAME) {
                    let _ = self.delete_link(l.index);
                }
                Err(ctx.protocol("the kernel accepted VLAN id 4095"))
            }
        }
    }

    /// Deletes a link (deleting one end of a veth deletes both; physical
    /// devices and VFs cannot be deleted: EOPNOTSUPP).
    pub fn delete_link(&self, index: u32) -> Result<()> {
        let object = link_obj(index);
        let ctx = Ctx { op: "delete", object: &object };
        self.request(&ctx, RouteNetlinkMessage::DelLink(msg_for(index)), 0, Kind::Ack)?;
        Ok(())
    }

    /// The raw GETLINK answer for `index` with `IFLA_EXT_MASK` = VF | skip
    /// stats, for the SR-IOV code.
    pub(crate) fn link_with_vfs_raw(&self, ctx: &Ctx<'_>, index: u32) -> Result<Vec<u8>> {
        let mut msg = msg_for(index);
        msg.attributes.push(LinkAttribute::ExtMask(vec![LinkExtentMask::Vf, LinkExtentMask::SkipStats]));
        let mut answer = self.request_raw(ctx, RouteNetlinkMessage::GetLink(msg), 0, Kind::Get)?;
        answer.pop().ok_or_else(|| ctx.protocol("no RTM_NEWLINK in the answer"))
    }
}
