//! Plain data types of the public API.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

/// An Ethernet (EUI-48) address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// From a byte slice; `None` unless it is exactly 6 bytes.
    pub fn from_slice(b: &[u8]) -> Option<MacAddr> {
        Some(MacAddr(b.try_into().ok()?))
    }
    /// All zeroes (what drivers report for "no MAC set").
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error parsing a [`MacAddr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?} (expected six hex bytes separated by ':')")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            if p.is_empty() || p.len() > 2 {
                return Err(err());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

/// IP version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
    /// Longest prefix length of this family (32 or 128).
    pub fn max_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
    /// The unspecified address (0.0.0.0 or ::).
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        }
    }
}

/// Address / route scope (`RT_SCOPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Scope {
    #[default]
    Universe,
    Site,
    Link,
    Host,
    Nowhere,
    Other(u8),
}

impl From<u8> for Scope {
    fn from(v: u8) -> Scope {
        match v {
            0 => Scope::Universe,
            200 => Scope::Site,
            253 => Scope::Link,
            254 => Scope::Host,
            255 => Scope::Nowhere,
            o => Scope::Other(o),
        }
    }
}

impl From<Scope> for u8 {
    fn from(s: Scope) -> u8 {
        match s {
            Scope::Universe => 0,
            Scope::Site => 200,
            Scope::Link => 253,
            Scope::Host => 254,
            Scope::Nowhere => 255,
            Scope::Other(o) => o,
        }
    }
}

/// RFC 2863 operational state (`IFLA_OPERSTATE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OperState {
    Unknown,
    NotPresent,
    Down,
    LowerLayerDown,
    Testing,
    Dormant,
    Up,
    Other(u8),
}

/// A network interface as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Alternative names (`IFLA_PROP_LIST`/`IFLA_ALT_IFNAME`), in kernel order.
    pub altnames: Vec<String>,
    /// Current hardware address, if it is a 6-byte one.
    pub mac: Option<MacAddr>,
    /// Permanent hardware address (`IFLA_PERM_ADDRESS`); the kernel omits it when
    /// it is all zeroes (veth, bridge, ...).
    pub perm_mac: Option<MacAddr>,
    pub mtu: u32,
    /// `IFF_UP`: administratively up.
    pub admin_up: bool,
    /// `IFF_LOWER_UP`: carrier.
    pub lower_up: bool,
    pub oper_state: OperState,
    /// `IFLA_INFO_KIND` ("veth", "bridge", ...); `None` for plain hardware netdevs.
    pub kind: Option<String>,
    /// `IFLA_PARENT_DEV_BUS_NAME`, e.g. "pci" (kernel >= 5.16, devices with a parent).
    pub parent_bus: Option<String>,
    /// `IFLA_PARENT_DEV_NAME`, e.g. "0000:01:00.0".
    pub parent_dev: Option<String>,
    /// `IFLA_LINK` (e.g. a veth's peer index, possibly in another netns).
    pub link: Option<u32>,
    /// `IFLA_MASTER` (e.g. the bridge this link is a port of).
    pub master: Option<u32>,
    /// The VLAN id of a `vlan` link (`IFLA_INFO_DATA`/`IFLA_VLAN_ID`); its parent
    /// (lower) device is [`Link::link`]. `None` for every other kind.
    pub vlan_id: Option<u16>,
}

/// `IFA_F_*` address flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AddrFlags(pub u32);

impl AddrFlags {
    pub const SECONDARY: AddrFlags = AddrFlags(0x01);
    pub const NODAD: AddrFlags = AddrFlags(0x02);
    pub const OPTIMISTIC: AddrFlags = AddrFlags(0x04);
    pub const DADFAILED: AddrFlags = AddrFlags(0x08);
    pub const HOMEADDRESS: AddrFlags = AddrFlags(0x10);
    pub const DEPRECATED: AddrFlags = AddrFlags(0x20);
    pub const TENTATIVE: AddrFlags = AddrFlags(0x40);
    pub const PERMANENT: AddrFlags = AddrFlags(0x80);
    pub const MANAGETEMPADDR: AddrFlags = AddrFlags(0x100);
    pub const NOPREFIXROUTE: AddrFlags = AddrFlags(0x200);
    pub const MCAUTOJOIN: AddrFlags = AddrFlags(0x400);
    pub const STABLE_PRIVACY: AddrFlags = AddrFlags(0x800);
    /// The flags a caller may ask for when adding an address; the others are
    /// state the kernel sets.
    pub const CONFIGURABLE: AddrFlags = AddrFlags(0x02 | 0x04 | 0x10 | 0x100 | 0x200 | 0x400);

    pub const fn empty() -> AddrFlags {
        AddrFlags(0)
    }
    pub const fn contains(self, other: AddrFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for AddrFlags {
    type Output = AddrFlags;
    fn bitor(self, o: AddrFlags) -> AddrFlags {
        AddrFlags(self.0 | o.0)
    }
}

impl std::ops::BitAnd for AddrFlags {
    type Output = AddrFlags;
    fn bitand(self, o: AddrFlags) -> AddrFlags {
        AddrFlags(self.0 & o.0)
    }
}

impl fmt::Debug for AddrFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(u32, &str); 12] = [
            (0x01, "secondary"),
            (0x02, "nodad"),
            (0x04, "optimistic"),
            (0x08, "dadfailed"),
            (0x10, "homeaddress"),
            (0x20, "deprecated"),
            (0x40, "tentative"),
            (0x80, "permanent"),
            (0x100, "managetempaddr"),
            (0x200, "noprefixroute"),
            (0x400, "mcautojoin"),
            (0x800, "stable-privacy"),
        ];
        let mut first = true;
        let mut rest = self.0;
        write!(f, "AddrFlags(")?;
        for (bit, name) in NAMES {
            if self.0 & bit != 0 {
                write!(f, "{}{name}", if first { "" } else { "|" })?;
                first = false;
                rest &= !bit;
            }
        }
        if rest != 0 {
            write!(f, "{}{rest:#x}", if first { "" } else { "|" })?;
        }
        write!(f, ")")
    }
}

/// An address on a link, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub ifindex: u32,
    /// The local address (`IFA_LOCAL`, or `IFA_ADDRESS` when there is no local).
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// The peer address of a point-to-point address (`IFA_ADDRESS` != `IFA_LOCAL`).
    pub peer: Option<IpAddr>,
    /// IPv4 broadcast address, if one was set.
    pub broadcast: Option<Ipv4Addr>,
    /// `IFA_LABEL` (IPv4 only; defaults to the link name).
    pub label: Option<String>,
    pub scope: Scope,
    pub flags: AddrFlags,
    /// `IFA_RT_PRIORITY`: metric of the prefix route the kernel adds for it.
    pub route_metric: Option<u32>,
}

/// An address to add (or delete: only `addr` and `prefix_len` matter then).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressSpec {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub peer: Option<IpAddr>,
    pub broadcast: Option<Ipv4Addr>,
    /// IPv4 label; the kernel requires it to start with the link name.
    pub label: Option<String>,
    /// IPv4 only: IPv6 scope is derived by the kernel from the address.
    pub scope: Scope,
    /// Only [`AddrFlags::CONFIGURABLE`] bits are sent.
    pub flags: AddrFlags,
    pub route_metric: Option<u32>,
}

impl AddressSpec {
    /// `addr/prefix_len`, universe scope, no flags.
    pub fn new(addr: IpAddr, prefix_len: u8) -> AddressSpec {
        AddressSpec {
            addr,
            prefix_len,
            peer: None,
            broadcast: None,
            label: None,
            scope: Scope::Universe,
            flags: AddrFlags::empty(),
            route_metric: None,
        }
    }
    /// The same with `flags` added.
    pub fn with_flags(mut self, flags: AddrFlags) -> AddressSpec {
        self.flags = self.flags | flags;
        self
    }
}

impl From<&Address> for AddressSpec {
    /// What re-adding a listed address takes (state flags dropped; lifetimes are
    /// not carried: the address comes back permanent).
    fn from(a: &Address) -> AddressSpec {
        AddressSpec {
            addr: a.addr,
            prefix_len: a.prefix_len,
            peer: a.peer,
            broadcast: a.broadcast,
            label: a.label.clone(),
            scope: a.scope,
            flags: a.flags & AddrFlags::CONFIGURABLE,
            route_metric: a.route_metric,
        }
    }
}

/// Route type (`RTN_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum RouteType {
    Unspec,
    #[default]
    Unicast,
    Local,
    Broadcast,
    Anycast,
    Multicast,
    Blackhole,
    Unreachable,
    Prohibit,
    Throw,
    Other(u8),
}

impl From<u8> for RouteType {
    fn from(v: u8) -> RouteType {
        match v {
            0 => RouteType::Unspec,
            1 => RouteType::Unicast,
            2 => RouteType::Local,
            3 => RouteType::Broadcast,
            4 => RouteType::Anycast,
            5 => RouteType::Multicast,
            6 => RouteType::Blackhole,
            7 => RouteType::Unreachable,
            8 => RouteType::Prohibit,
            9 => RouteType::Throw,
            o => RouteType::Other(o),
        }
    }
}

impl From<RouteType> for u8 {
    fn from(t: RouteType) -> u8 {
        match t {
            RouteType::Unspec => 0,
            RouteType::Unicast => 1,
            RouteType::Local => 2,
            RouteType::Broadcast => 3,
            RouteType::Anycast => 4,
            RouteType::Multicast => 5,
            RouteType::Blackhole => 6,
            RouteType::Unreachable => 7,
            RouteType::Prohibit => 8,
            RouteType::Throw => 9,
            RouteType::Other(o) => o,
        }
    }
}

/// Route protocol numbers (`RTPROT_*`) commonly met.
pub mod proto {
    pub const UNSPEC: u8 = 0;
    pub const REDIRECT: u8 = 1;
    /// Installed by the kernel (prefix routes of addresses, IPv6 link-local).
    pub const KERNEL: u8 = 2;
    /// Installed at boot / by an admin: iproute2's default.
    pub const BOOT: u8 = 3;
    pub const STATIC: u8 = 4;
    /// IPv6 router advertisement.
    pub const RA: u8 = 9;
    pub const DHCP: u8 = 16;
}

/// Well-known routing tables.
pub mod table {
    pub const MAIN: u32 = 254;
    pub const LOCAL: u32 = 255;
    pub const DEFAULT: u32 = 253;
}

/// A route as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub family: Family,
    /// Destination network; the unspecified address with `dst_len` 0 for a default route.
    pub dst: IpAddr,
    pub dst_len: u8,
    pub gateway: Option<IpAddr>,
    /// Output interface (`RTA_OIF`).
    pub oif: Option<u32>,
    /// Metric (`RTA_PRIORITY`). IPv6 routes always have one (1024 by default).
    pub priority: Option<u32>,
    /// Preferred source (`RTA_PREFSRC`).
    pub prefsrc: Option<IpAddr>,
    pub scope: Scope,
    /// `RTPROT_*`, see [`proto`].
    pub protocol: u8,
    /// Table id (`RTA_TABLE`), see [`table`].
    pub table: u32,
    pub kind: RouteType,
    /// `RTNH_F_ONLINK`.
    pub onlink: bool,
    /// `RTNH_F_LINKDOWN`: the output link has no carrier.
    pub linkdown: bool,
    /// The route has several next hops (`RTA_MULTIPATH`): `gateway`/`oif` are
    /// then `None`, and re-adding it from a [`RouteSpec`] is not supported.
    pub multipath: bool,
}

impl Route {
    /// Whether the kernel made this route itself (`proto kernel`: the prefix
    /// route of an address, IPv6 link-local/multicast routes) or it lives in the
    /// local table (local/broadcast addresses). A caller recording routes to
    /// re-create them later skips these: the kernel re-creates them when the
    /// addresses come back.
    pub fn is_kernel_generated(&self) -> bool {
        self.protocol == proto::KERNEL || self.table == table::LOCAL
    }
}

/// A route to add or delete.
///
/// Defaults are iproute2's: type unicast, table main, protocol `boot` on add,
/// scope `link` for a unicast route without gateway, `universe` otherwise.
/// On delete, fields left `None` match anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpAddr,
    pub dst_len: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub priority: Option<u32>,
    pub prefsrc: Option<IpAddr>,
    pub scope: Option<Scope>,
    pub protocol: Option<u8>,
    pub table: Option<u32>,
    pub kind: RouteType,
    pub onlink: bool,
}

impl RouteSpec {
    /// A route to `dst/dst_len`, everything else default.
    pub fn new(dst: IpAddr, dst_len: u8) -> RouteSpec {
        RouteSpec {
            dst,
            dst_len,
            gateway: None,
            oif: None,
            priority: None,
            prefsrc: None,
            scope: None,
            protocol: None,
            table: None,
            kind: RouteType::Unicast,
            onlink: false,
        }
    }
    /// A default route (0.0.0.0/0 or ::/0) via `gateway`.
    pub fn default_via(gateway: IpAddr) -> RouteSpec {
        RouteSpec::new(Family::of(&gateway).unspecified(), 0).via(gateway)
    }
    pub fn via(mut self, gateway: IpAddr) -> RouteSpec {
        self.gateway = Some(gateway);
        self
    }
    pub fn dev(mut self, oif: u32) -> RouteSpec {
        self.oif = Some(oif);
        self
    }
    pub fn metric(mut self, priority: u32) -> RouteSpec {
        self.priority = Some(priority);
        self
    }
    pub fn family(&self) -> Family {
        Family::of(&self.dst)
    }
}

impl From<&Route> for RouteSpec {
    /// What re-adding a listed route takes (exactly its fields).
    fn from(r: &Route) -> RouteSpec {
        RouteSpec {
            dst: r.dst,
            dst_len: r.dst_len,
            gateway: r.gateway,
            oif: r.oif,
            priority: r.priority,
            prefsrc: r.prefsrc,
            scope: Some(r.scope),
            protocol: Some(r.protocol),
            table: Some(r.table),
            kind: r.kind,
            onlink: r.onlink,
        }
    }
}

/// Neighbour cache entry states (`NUD_*`).
pub mod nud {
    pub const INCOMPLETE: u16 = 0x01;
    pub const REACHABLE: u16 = 0x02;
    pub const STALE: u16 = 0x04;
    pub const DELAY: u16 = 0x08;
    pub const PROBE: u16 = 0x10;
    pub const FAILED: u16 = 0x20;
    pub const NOARP: u16 = 0x40;
    pub const PERMANENT: u16 = 0x80;
}

/// A neighbour (ARP / NDP) entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    /// Link-layer address, if known and 6 bytes long.
    pub lladdr: Option<MacAddr>,
    /// `NUD_*` bits, see [`nud`].
    pub state: u16,
}

impl Neighbour {
    pub fn is_permanent(&self) -> bool {
        self.state & nud::PERMANENT != 0
    }
}

/// Administrative link state of a VF (`IFLA_VF_LINK_STATE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VfLinkState {
    /// Follows the PF's link.
    Auto,
    Enable,
    Disable,
    Other(u32),
}

impl From<u32> for VfLinkState {
    fn from(v: u32) -> VfLinkState {
        match v {
            0 => VfLinkState::Auto,
            1 => VfLinkState::Enable,
            2 => VfLinkState::Disable,
            o => VfLinkState::Other(o),
        }
    }
}

impl From<VfLinkState> for u32 {
    fn from(s: VfLinkState) -> u32 {
        match s {
            VfLinkState::Auto => 0,
            VfLinkState::Enable => 1,
            VfLinkState::Disable => 2,
            VfLinkState::Other(o) => o,
        }
    }
}

/// One VF's settings as its PF reports them (`IFLA_VFINFO_LIST`).
/// `None` means the PF driver does not report that setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfConfig {
    pub vf: u32,
    /// Administrative MAC set on the PF (all zeroes: none set).
    pub mac: MacAddr,
    pub vlan: u16,
    pub qos: u8,
    pub spoofchk: Option<bool>,
    pub trust: Option<bool>,
    pub link_state: Option<VfLinkState>,
    /// Mbit/s, 0 = unlimited.
    pub min_tx_rate: Option<u32>,
    /// Mbit/s, 0 = unlimited.
    pub max_tx_rate: Option<u32>,
}
