//! Guest network configuration: find the devices (by guest PCI address or MAC,
//! waiting for hot-plugged ones), converge them to the config the shim sent,
//! install routes in an order the kernel accepts, write resolv.conf.
//!
//! # Semantics
//!
//! A [`NetworkConfig`] is the *desired state* of the interfaces it names:
//! - **Validation first.** Every field is checked ([`NetworkConfig::validate`]),
//!   then every device is found, then route devices, gateway reachability and
//!   collisions with routes the agent does not own are checked against the
//!   system, all before the first change. A bad config changes nothing.
//! - **Ownership.** The agent owns the interfaces the config names, and only
//!   those: their name, MAC, MTU, admin state, addresses and routes converge to
//!   exactly the config. Addresses not in the config are removed from them,
//!   except IPv6 link-local ones (`fe80::/10`), which are never touched. Routes
//!   in the main table whose output device is an owned interface and that are
//!   not in the config are removed, except the kernel's own (`proto kernel`:
//!   prefix routes of addresses, IPv6 link-local). Interfaces and routes the
//!   config does not mention are left alone (`lo`, other devices), and a
//!   route the config asks for that collides with one on such a device is an
//!   error, not a replacement.
//! - **Order.** Per interface: (down, if it must be renamed: Linux 6.1 refuses
//!   to rename an up link) rename, MAC, MTU, up, addresses (IPv6 ones with
//!   `NODAD`: usable at once); interfaces without `vlan` first, then VLAN ones
//!   (parent up, create). Then routes: removals first, then link routes
//!   (no gateway), gateway routes, default routes last.
//! - **Idempotence.** Nothing is written that is already so. [`Network::apply`]
//!   returns the changes it made; applying the same config again returns an
//!   empty [`Report`] and issues no mutating netlink request.
//! - **VLAN.** An interface with `vlan: Some(id)` is an 802.1Q VLAN link named
//!   `name` on a *parent*: the device its `device` selector finds (by PCI
//!   address and/or MAC, waiting across hot-plug as for any interface). The
//!   parent is brought up (a VLAN link cannot be up on a down parent) and is
//!   otherwise untouched, unless another interface of the config (without
//!   `vlan`, same selector) configures it too. The VLAN link is found and kept
//!   when it exists (a `vlan` link with that id on that parent; under another
//!   name it is renamed), else created; its MAC, MTU, addresses and the routes
//!   through it converge like any interface's, and the agent owns it:
//!   [`Network::remove_interface`] deletes it. Several VLAN interfaces may share
//!   a parent (distinct ids), and one interface without `vlan` may configure
//!   that parent. Refused before any change: a VLAN id outside 1..=4094
//!   (validation), two VLAN interfaces with the same id on the same parent, a
//!   VLAN MTU above the parent's (its MTU after this config), the name held by
//!   another link (by a VLAN link of another id or parent: "exists but is VLAN
//!   .."; by the parent itself), and, when a VLAN link must be created, a
//!   kernel without 802.1Q ([`NetError::VlanUnsupported`], asked through
//!   [`Handle::vlan_supported`], which also lets the kernel autoload `8021q`;
//!   in the guest, which has no modprobe, the agent loads it first through
//!   [`crate::modules::request`]).
//!   The VLAN links are created after the other interfaces are configured (so a
//!   parent's new MTU is in place), in config order.
//! - **DNS.** When the config has `dns`, resolv.conf is replaced atomically
//!   (temporary file in the same directory, fsync, rename) unless it already
//!   has exactly that content.
//!
//! # Entry points
//!
//! [`Network::apply`] takes a whole [`NetworkConfig`] (routes owned: those
//! through its interfaces). The agent's RPCs map to the per-call ones, which
//! share the same validation, bounds and idempotence:
//! [`Network::update_interface`] (one interface, routes untouched, with its own
//! wait timeout), [`Network::update_routes`] (the route set of every interface
//! configured so far through this [`Network`]), [`Network::set_dns`],
//! [`Network::remove_interface`]. The configurator remembers which links it
//! configured ([`Network::configured`]).

pub mod config;
pub mod device;
pub mod error;
pub mod uevent;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use vfvm_netlink::{table, AddrFlags, AddressSpec, Family, Handle, Link, MacAddr, Netns, Route as NlRoute, RouteSpec, RouteType};

pub use config::{Cidr, DeviceMatch, DeviceSel, Dns, Interface, NetworkConfig, Route, ValidConfig, ValidDns, ValidInterface, ValidRoute};
pub use device::{find_device, wait_for_devices, FoundVia, Wanted};
pub use error::{NetError, Result};
pub use uevent::{Recv, Uevent, UeventSocket};

use error::nl;

/// Where the module looks and writes, and how long it waits.
#[derive(Clone, Debug)]
pub struct Options {
    /// sysfs mount point (`/sys`); tests point it at a fake tree.
    pub sysfs_root: PathBuf,
    /// procfs mount point (`/proc`), to tell whether the kernel has 802.1Q.
    pub proc_root: PathBuf,
    /// The resolv.conf to write (`/etc/resolv.conf`).
    pub resolv_conf: PathBuf,
    /// How long an apply waits, in all, for the config's devices to appear.
    pub device_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            sysfs_root: PathBuf::from("/sys"),
            proc_root: PathBuf::from("/proc"),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            device_timeout: Duration::from_secs(30),
        }
    }
}

/// One change an apply made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Set down, to rename it (it is set up again later).
    LinkDown {
        link: String,
    },
    Renamed {
        from: String,
        to: String,
    },
    MacSet {
        link: String,
        from: Option<MacAddr>,
        to: MacAddr,
    },
    MtuSet {
        link: String,
        from: u32,
        to: u32,
    },
    LinkUp {
        link: String,
    },
    /// An 802.1Q VLAN link was created on `parent` (it starts down; `LinkUp`
    /// follows).
    VlanCreated {
        link: String,
        parent: String,
        vlan: u16,
    },
    /// A link the agent created (a VLAN link) was deleted.
    LinkDeleted {
        link: String,
    },
    AddressAdded {
        link: String,
        address: Cidr,
    },
    AddressRemoved {
        link: String,
        address: Cidr,
    },
    RouteAdded {
        route: String,
    },
    RouteRemoved {
        route: String,
    },
    DnsWritten {
        path: PathBuf,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::LinkDown { link } => write!(f, "set {link} down"),
            Change::Renamed { from, to } => write!(f, "renamed {from} to {to}"),
            Change::MacSet { link, from, to } => match from {
                Some(m) => write!(f, "set MAC of {link} from {m} to {to}"),
                None => write!(f, "set MAC of {link} to {to}"),
            },
            Change::MtuSet { link, from, to } => write!(f, "set MTU of {link} from {from} to {to}"),
            Change::LinkUp { link } => write!(f, "set {link} up"),
            Change::VlanCreated { link, parent, vlan } => {
                write!(f, "created VLAN {vlan} on {parent} as {link}")
            }
            Change::LinkDeleted { link } => write!(f, "deleted {link}"),
            Change::AddressAdded { link, address } => write!(f, "added {address} to {link}"),
            Change::AddressRemoved { link, address } => write!(f, "removed {address} from {link}"),
            Change::RouteAdded { route } => write!(f, "added route {route}"),
            Change::RouteRemoved { route } => write!(f, "removed route {route}"),
            Change::DnsWritten { path } => write!(f, "wrote {}", path.display()),
        }
    }
}

/// What an apply did, in order. Empty when the system already matched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub changes: Vec<Change>,
    /// The link each interface of the config ended up as (target name, ifindex).
    pub interfaces: Vec<(String, u32)>,
}

impl Report {
    pub fn is_noop(&self) -> bool {
        self.changes.is_empty()
    }
    fn push(&mut self, c: Change) {
        tracing::info!(change = %c, "network");
        self.changes.push(c);
    }
}

/// The network configurator of one network namespace.
#[derive(Debug)]
pub struct Network {
    handle: Handle,
    /// `None`: the namespace the value was made in (uevent sockets are opened in
    /// the calling thread's namespace then).
    netns: Option<Netns>,
    opts: Options,
    /// The links this configurator has configured, by ifindex.
    configured: Mutex<BTreeMap<u32, Configured>>,
}

/// A link this configurator has configured.
#[derive(Clone, Debug)]
struct Configured {
    name: String,
    /// Its VLAN id, for a VLAN interface (the agent deletes the link when the
    /// interface is removed).
    vlan: Option<u16>,
}

/// Stand-in ifindexes for VLAN links still to be created, while routes are
/// planned (real ifindexes are at most `i32::MAX`): `NEW_VLAN_BASE + k` for
/// interface `k` of the config.
const NEW_VLAN_BASE: u32 = 0x8000_0000;

/// What an interface of the config is applied to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// An existing link: the device (interface without VLAN), or the VLAN link
    /// already on the parent.
    Link(u32),
    /// A VLAN link to create on `parent`; `stand_in` is its ifindex until then.
    NewVlan { parent: u32, vlan: u16, stand_in: u32 },
}

impl Target {
    fn index(&self) -> u32 {
        match *self {
            Target::Link(i) => i,
            Target::NewVlan { stand_in, .. } => stand_in,
        }
    }
}

fn is_vlan_link(l: &Link) -> bool {
    l.kind.as_deref() == Some("vlan")
}

fn describe_link(l: &Link, all: &[Link]) -> String {
    let mut s = format!("link {:?} (index {}", l.name, l.index);
    if let Some(k) = &l.kind {
        s += &format!(", {k}");
    }
    if is_vlan_link(l) {
        let parent = l
            .link
            .and_then(|p| all.iter().find(|o| o.index == p))
            .map(|p| format!("{:?}", p.name))
            .or_else(|| l.link.map(|p| format!("#{p}")))
            .unwrap_or_else(|| "?".into());
        match l.vlan_id {
            Some(id) => s += &format!(" {id} on {parent}"),
            None => s += &format!(" on {parent}"),
        }
    }
    s + ")"
}

/// What to do with a link that holds a wanted name and that the config does not manage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holders {
    /// An error naming it.
    Refuse,
    /// Rename it out of the way when the agent has not configured it (one interface
    /// per call: it may be the kernel's name of a device a later call configures).
    DisplaceUnconfigured,
}

/// Which routes a run converges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RouteOwnership {
    /// Leave routes alone.
    Untouched,
    /// Routes through the interfaces of this config.
    ThisConfig,
    /// Routes through every interface configured so far.
    AllConfigured,
}

fn is_v6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v) if (v.segments()[0] & 0xffc0) == 0xfe80)
}

fn describe_nl_route(r: &NlRoute, names: &BTreeMap<u32, String>) -> String {
    let mut s = if r.dst_len == 0 { "default".to_string() } else { format!("{}/{}", r.dst, r.dst_len) };
    if let Some(g) = r.gateway {
        s += &format!(" via {g}");
    }
    if let Some(o) = r.oif {
        match names.get(&o) {
            Some(n) => s += &format!(" dev {n}"),
            None => s += &format!(" dev #{o}"),
        }
    }
    if let Some(p) = r.priority {
        s += &format!(" metric {p}");
    }
    s
}

/// A desired route with its output device resolved.
struct PlannedRoute<'a> {
    route: &'a ValidRoute,
    oif: Option<u32>,
}

impl PlannedRoute<'_> {
    fn satisfied_by(&self, r: &NlRoute) -> bool {
        let w = self.route;
        r.table == table::MAIN
            && !r.multipath
            && r.kind == RouteType::Unicast
            && r.family == w.family()
            && r.dst == w.dst.addr
            && r.dst_len == w.dst.prefix_len
            && r.gateway == w.gateway
            && r.priority.unwrap_or(0) == w.effective_metric()
            && self.oif.is_none_or(|o| r.oif == Some(o))
            && (w.family() == Family::V6 || r.scope == w.scope)
    }
    /// Same kernel key (the kernel keeps one route per destination and metric).
    fn same_key(&self, r: &NlRoute) -> bool {
        let w = self.route;
        r.table == table::MAIN
            && r.family == w.family()
            && r.dst == w.dst.addr
            && r.dst_len == w.dst.prefix_len
            && r.priority.unwrap_or(0) == w.effective_metric()
    }
    fn spec(&self) -> RouteSpec {
        let w = self.route;
        let mut s = RouteSpec::new(w.dst.addr, w.dst.prefix_len);
        s.gateway = w.gateway;
        s.oif = self.oif;
        s.priority = w.metric;
        s.table = Some(table::MAIN);
        if w.family() == Family::V4 {
            s.scope = Some(w.scope);
        }
        s
    }
}

impl Network {
    /// A configurator for the calling thread's network namespace.
    pub fn new(opts: Options) -> Result<Network> {
        let handle = Handle::new().map_err(nl("open a netlink socket"))?;
        Ok(Network { handle, netns: None, opts, configured: Mutex::new(BTreeMap::new()) })
    }

    /// A configurator for `ns` (which it keeps open: a duplicate descriptor).
    pub fn in_netns(ns: &Netns, opts: Options) -> Result<Network> {
        let handle = Handle::in_netns(ns).map_err(nl("open a netlink socket in the namespace"))?;
        let dup = Netns::open(format!("/proc/self/fd/{}", ns.as_fd().as_raw_fd())).map_err(nl("keep the network namespace open"))?;
        Ok(Network { handle, netns: Some(dup), opts, configured: Mutex::new(BTreeMap::new()) })
    }

    /// The options in use.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The netlink handle (on this configurator's namespace).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Opens a subscribed uevent socket in this configurator's namespace.
    pub fn uevent_socket(&self) -> Result<UeventSocket> {
        match &self.netns {
            Some(ns) => UeventSocket::open_in(ns),
            None => UeventSocket::open(),
        }
    }

    /// Waits (up to `timeout`) for one device, as [`wait_for_devices`] does.
    pub fn wait_for_device(&self, want: &Wanted<'_>, timeout: Duration, after_first_miss: impl FnOnce()) -> Result<(Link, FoundVia)> {
        let events = self.uevent_socket()?;
        let mut v = wait_for_devices(&self.handle, &self.opts.sysfs_root, &events, std::slice::from_ref(want), timeout, after_first_miss)?;
        v.pop().ok_or_else(|| NetError::Device { interface: want.name.to_string(), detail: "internal: wait returned nothing".into() })
    }

    /// Validates `cfg`, then converges the system to it (see the module docs).
    pub fn apply(&self, cfg: &NetworkConfig) -> Result<Report> {
        let v = cfg.validate()?;
        self.apply_valid(&v)
    }

    /// [`Network::apply`] for an already validated config.
    pub fn apply_valid(&self, v: &ValidConfig) -> Result<Report> {
        self.run(v, RouteOwnership::ThisConfig, self.opts.device_timeout)
    }

    /// Configures one interface (the `UpdateInterface` call): waits up to
    /// `timeout` (default: [`Options::device_timeout`]) for its device, then
    /// converges its name, MAC, MTU, state and addresses. Routes are left to
    /// [`Network::update_routes`]; the interface is remembered as configured.
    ///
    /// Interfaces come one call at a time, so the name wanted may still be the
    /// kernel's name of another pod device that a later call configures (a VF probed
    /// as `eth0` before the virtio-net device that becomes `eth0`): a link holding the
    /// name that the agent has not configured is renamed out of the way (a
    /// temporary name) first, as Kata's agent does. A name held by an interface the
    /// agent configured stays an error.
    pub fn update_interface(&self, iface: &Interface, timeout: Option<Duration>) -> Result<Report> {
        let v = NetworkConfig { interfaces: vec![iface.clone()], ..Default::default() }.validate()?;
        self.run_with(&v, RouteOwnership::Untouched, timeout.unwrap_or(self.opts.device_timeout), Holders::DisplaceUnconfigured)
    }

    /// Converges the routes (the `UpdateRoutes` call): `routes` becomes the
    /// complete set of non-kernel main-table routes through every interface
    /// configured so far; other devices' routes are left alone.
    pub fn update_routes(&self, routes: &[Route]) -> Result<Report> {
        let v = NetworkConfig { routes: routes.to_vec(), ..Default::default() }.validate()?;
        self.run(&v, RouteOwnership::AllConfigured, self.opts.device_timeout)
    }

    /// Writes resolv.conf (the `SetDns` call) unless it already says that.
    pub fn set_dns(&self, dns: &Dns) -> Result<Report> {
        let v = NetworkConfig { dns: Some(dns.clone()), ..Default::default() }.validate()?;
        self.run(&v, RouteOwnership::Untouched, self.opts.device_timeout)
    }

    /// Gives an interface up (the `RemoveInterface` call): removes its
    /// addresses (not IPv6 link-local; its routes go with them), sets it down
    /// and forgets it. A link already gone (hot-unplugged) is just forgotten.
    pub fn remove_interface(&self, name: &str) -> Result<Report> {
        config::check_ifname(name).map_err(|r| error::invalid("name", name, r))?;
        let mut report = Report::default();
        let found = {
            let c = self.configured_lock();
            c.iter().find(|(_, c)| c.name == name).map(|(i, c)| (*i, c.vlan))
        };
        let Some((index, vlan)) = found else {
            return Err(NetError::Device {
                interface: name.to_string(),
                detail: "the agent has not configured an interface of that name".into(),
            });
        };
        let ctx = |what: &str| format!("interface {name:?}: {what}");
        match self.handle.link_by_index(index) {
            Ok(l) if l.name == name && vlan.is_some() && is_vlan_link(&l) => {
                // A VLAN link is the agent's: it goes (with its addresses and
                // routes); its parent stays as it is.
                match self.handle.delete_link(index) {
                    Ok(()) => {}
                    Err(e) if e.errno() == Some(libc::ENODEV) => {}
                    Err(e) => return Err(nl(ctx("delete the VLAN link"))(e)),
                }
                report.push(Change::LinkDeleted { link: name.to_string() });
            }
            Ok(l) if l.name == name => {
                for a in self.handle.addresses(index).map_err(nl(ctx("list addresses")))? {
                    if is_v6_link_local(&a.addr) {
                        continue;
                    }
                    match self.handle.delete_address(index, a.addr, a.prefix_len) {
                        Ok(()) => {}
                        Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => {}
                        Err(e) => return Err(nl(ctx("remove address"))(e)),
                    }
                    report
                        .push(Change::AddressRemoved { link: name.to_string(), address: Cidr { addr: a.addr, prefix_len: a.prefix_len } });
                }
                if l.admin_up {
                    self.handle.set_link_up(index, false).map_err(nl(ctx("set down")))?;
                    report.push(Change::LinkDown { link: name.to_string() });
                }
            }
            Ok(_) => {} // the index now has another name: not ours any more
            Err(e) if e.errno() == Some(libc::ENODEV) => {}
            Err(e) => return Err(nl(ctx("get link"))(e)),
        }
        self.configured_lock().remove(&index);
        Ok(report)
    }

    /// The interfaces configured so far: (name, ifindex).
    pub fn configured(&self) -> Vec<(String, u32)> {
        self.configured_lock().iter().map(|(i, c)| (c.name.clone(), *i)).collect()
    }

    fn configured_lock(&self) -> MutexGuard<'_, BTreeMap<u32, Configured>> {
        // A poisoned lock only means a panic elsewhere; the map is still whole.
        self.configured.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, v: &ValidConfig, routes: RouteOwnership, timeout: Duration) -> Result<Report> {
        self.run_with(v, routes, timeout, Holders::Refuse)
    }

    fn run_with(&self, v: &ValidConfig, routes: RouteOwnership, timeout: Duration, holders: Holders) -> Result<Report> {
        // 1. The devices (a VLAN interface's is its parent). A VLAN interface
        // whose parent another interface of the config configures looks for
        // what that interface makes of it (its name, its new MAC).
        let wanted: Vec<Wanted<'_>> = v
            .interfaces
            .iter()
            .map(|i| {
                let own = match i.vlan {
                    None => i,
                    Some(_) => v.interfaces.iter().find(|p| p.vlan.is_none() && p.device == i.device).unwrap_or(i),
                };
                Wanted { name: &own.name, device: i.device, set_mac: if own.vlan.is_none() { own.mac } else { None } }
            })
            .collect();
        let links: Vec<Link> = if wanted.is_empty() {
            Vec::new()
        } else {
            let events = self.uevent_socket()?;
            // A device that is there without a driver (cold-plugged, or hot-plugged
            // just now) gets it before the wait; the hot-plug listener does the same
            // for devices that come later.
            for pci in wanted.iter().filter_map(|w| w.device.pci) {
                let _ = crate::modules::request_pci_driver(&self.opts.sysfs_root, &pci.to_string());
            }
            wait_for_devices(&self.handle, &self.opts.sysfs_root, &events, &wanted, timeout, || {})?.into_iter().map(|(l, _)| l).collect()
        };
        // 2. Checks against the system, before any change.
        let all = self.handle.links().map_err(nl("list links"))?;
        let targets = self.targets(v, &links, &all)?;
        let managed: BTreeMap<u32, &ValidInterface> = targets.iter().zip(&v.interfaces).map(|(t, i)| (t.index(), i)).collect();
        // Unconfigured links holding a wanted name, renamed out of the way in step 3.
        let mut displaced: Vec<Link> = Vec::new();
        for (k, (t, i)) in targets.iter().zip(&v.interfaces).enumerate() {
            if let Some((_, other)) = v.interfaces.iter().enumerate().find(|(j, _)| *j != k && targets[*j].index() == t.index()) {
                let l = all.iter().find(|l| l.index == t.index()).unwrap_or(&links[k]);
                return Err(NetError::Device {
                    interface: i.name.clone(),
                    detail: format!("resolves to link {:?} (index {}), as interface {:?} does", l.name, l.index, other.name),
                });
            }
            if let Some(holder) = all.iter().find(|o| (o.name == i.name || o.altnames.contains(&i.name)) && !managed.contains_key(&o.index))
            {
                let displaceable = holders == Holders::DisplaceUnconfigured
                    && i.vlan.is_none()
                    && holder.name == i.name
                    && holder.name != "lo"
                    && !self.configured_lock().contains_key(&holder.index);
                if displaceable {
                    displaced.push(holder.clone());
                    continue;
                }
                let detail = match i.vlan {
                    None => {
                        format!("the name is taken by link {:?} (index {}), which this config does not manage", holder.name, holder.index)
                    }
                    Some(id) if holder.index == links[k].index => format!(
                        "the name is that of the VLAN's parent device ({}); a VLAN {id} link needs a name of its own",
                        describe_link(holder, &all)
                    ),
                    Some(id) => format!(
                        "{} exists but is not VLAN {id} on {:?}; remove it or change the config",
                        describe_link(holder, &all),
                        links[k].name
                    ),
                };
                return Err(NetError::Device { interface: i.name.clone(), detail });
            }
            if let (Some(id), Some(mtu)) = (i.vlan, i.mtu) {
                let parent = &links[k];
                let parent_mtu = v
                    .interfaces
                    .iter()
                    .zip(&targets)
                    .find(|(_, pt)| **pt == Target::Link(parent.index))
                    .and_then(|(p, _)| p.mtu)
                    .unwrap_or(parent.mtu);
                if mtu > parent_mtu {
                    return Err(NetError::Device {
                        interface: i.name.clone(),
                        detail: format!(
                            "MTU {mtu} of VLAN {id} is above the MTU {parent_mtu} of its parent {:?}: a VLAN link's MTU cannot exceed its parent's",
                            parent.name
                        ),
                    });
                }
            }
        }
        if let Some((i, id)) = targets.iter().zip(&v.interfaces).find_map(|(t, i)| match t {
            Target::NewVlan { vlan, .. } => Some((i, *vlan)),
            Target::Link(_) => None,
        }) {
            // The guest has no modprobe for the kernel to autoload 802.1Q with.
            let _ = crate::modules::request("8021q");
            let supported = self.handle.vlan_supported().map_err(nl(format!("interface {:?}: VLAN {id}", i.name)))?;
            if !supported {
                return Err(NetError::VlanUnsupported { interface: i.name.clone(), vlan: id, reason: self.vlan_reason() });
            }
        }
        let target_index: BTreeMap<&str, u32> = targets.iter().zip(&v.interfaces).map(|(t, i)| (i.name.as_str(), t.index())).collect();
        let mut owned: BTreeSet<u32> = match routes {
            RouteOwnership::Untouched => BTreeSet::new(),
            RouteOwnership::ThisConfig => managed.keys().copied().collect(),
            RouteOwnership::AllConfigured => {
                let mut o: BTreeSet<u32> = self.configured_lock().keys().copied().collect();
                o.extend(managed.keys().copied());
                o
            }
        };
        let mut planned =
            if routes == RouteOwnership::Untouched { Vec::new() } else { self.plan_routes(v, &target_index, &all, &managed, &owned)? };

        // 3. Interfaces.
        let mut report = Report::default();
        for l in &displaced {
            let tmp = self.free_temp_name(l.index, &all)?;
            self.rename(l, &tmp, &mut report)?;
        }
        // Free target names held by other managed links (name swaps).
        for (t, i) in targets.iter().zip(&v.interfaces) {
            let Target::Link(index) = *t else { continue };
            let Some(l) = all.iter().find(|l| l.index == index) else {
                continue;
            };
            if i.name != l.name && target_index.contains_key(l.name.as_str()) {
                let tmp = self.free_temp_name(l.index, &all)?;
                self.rename(l, &tmp, &mut report)?;
            }
        }
        let mut resolved: Vec<u32> = targets.iter().map(Target::index).collect();
        // Interfaces without VLAN first: a VLAN's parent is configured (its MTU
        // among others) before the VLAN link is made.
        let order = (0..targets.len())
            .filter(|&k| v.interfaces[k].vlan.is_none())
            .chain((0..targets.len()).filter(|&k| v.interfaces[k].vlan.is_some()));
        for k in order {
            let i = &v.interfaces[k];
            if let Some(id) = i.vlan {
                resolved[k] = self.vlan_link(i, id, &links[k], targets[k], &mut report)?;
            }
            self.apply_interface(resolved[k], i, &mut report)?;
            let mut c = self.configured_lock();
            c.retain(|_, n| n.name != i.name);
            c.insert(resolved[k], Configured { name: i.name.clone(), vlan: i.vlan });
        }
        report.interfaces = v.interfaces.iter().zip(&resolved).map(|(i, idx)| (i.name.clone(), *idx)).collect();

        // 4. Routes (stand-in indexes of new VLAN links replaced by the real ones).
        if routes != RouteOwnership::Untouched {
            for (t, real) in targets.iter().zip(&resolved) {
                if let Target::NewVlan { stand_in, .. } = *t {
                    for p in planned.iter_mut() {
                        if p.oif == Some(stand_in) {
                            p.oif = Some(*real);
                        }
                    }
                    if owned.remove(&stand_in) {
                        owned.insert(*real);
                    }
                }
            }
            self.converge_routes(&planned, &owned, &mut report)?;
        }

        // 5. DNS.
        if let Some(d) = &v.dns {
            if write_if_changed(&self.opts.resolv_conf, d.render().as_bytes())? {
                report.push(Change::DnsWritten { path: self.opts.resolv_conf.clone() });
            }
        }
        Ok(report)
    }

    /// What each interface is applied to: its device, or for a VLAN interface
    /// the VLAN link on its device (existing, or to create). Refuses two VLAN
    /// interfaces with the same id on the same parent.
    fn targets(&self, v: &ValidConfig, links: &[Link], all: &[Link]) -> Result<Vec<Target>> {
        let mut out = Vec::with_capacity(links.len());
        for (k, (l, i)) in links.iter().zip(&v.interfaces).enumerate() {
            let Some(id) = i.vlan else {
                out.push(Target::Link(l.index));
                continue;
            };
            if let Some(other) =
                v.interfaces.iter().zip(links).find(|(oi, ol)| oi.name != i.name && oi.vlan == Some(id) && ol.index == l.index)
            {
                return Err(NetError::Device {
                    interface: i.name.clone(),
                    detail: format!(
                        "VLAN {id} on {:?} (index {}) is also interface {:?}: a parent has one VLAN link per id",
                        l.name, l.index, other.0.name
                    ),
                });
            }
            let existing = all.iter().find(|o| is_vlan_link(o) && o.link == Some(l.index) && o.vlan_id == Some(id));
            out.push(match existing {
                Some(e) => Target::Link(e.index),
                None => Target::NewVlan {
                    parent: l.index,
                    vlan: id,
                    stand_in: NEW_VLAN_BASE + u32::try_from(k).expect("at most MAX_INTERFACES"),
                },
            });
        }
        Ok(out)
    }

    /// Makes sure the VLAN link of `i` exists on its parent (up): returns its
    /// ifindex.
    fn vlan_link(&self, i: &ValidInterface, id: u16, parent: &Link, target: Target, report: &mut Report) -> Result<u32> {
        let name = &i.name;
        let ctx = |what: String| format!("interface {name:?}: {what}");
        let p = self.handle.link_by_index(parent.index).map_err(nl(ctx(format!("get its parent link {}", parent.index))))?;
        if !p.admin_up {
            self.handle.set_link_up(p.index, true).map_err(nl(ctx(format!("set its parent {:?} up", p.name))))?;
            report.push(Change::LinkUp { link: p.name.clone() });
        }
        let Target::NewVlan { parent: pi, .. } = target else {
            return Ok(target.index());
        };
        self.handle.create_vlan(name, pi, id).map_err(nl(ctx(format!("create VLAN {id} on {:?}", p.name))))?;
        report.push(Change::VlanCreated { link: name.clone(), parent: p.name.clone(), vlan: id });
        let l = self.handle.link_by_name(name).map_err(nl(ctx("get the new VLAN link".into())))?;
        Ok(l.index)
    }

    /// Why VLAN links cannot be made here (the kernel refused kind "vlan").
    fn vlan_reason(&self) -> String {
        let p = self.opts.proc_root.join("net/vlan/config");
        if p.exists() {
            format!("the kernel refuses to create 802.1Q VLAN links (\"Unknown device type\") although {} exists", p.display())
        } else {
            format!(
                "the kernel has no 802.1Q VLAN support: it does not know link type \"vlan\" and {} is missing (module 8021q not built, not in the image or not loaded)",
                p.display()
            )
        }
    }

    fn free_temp_name(&self, index: u32, all: &[Link]) -> Result<String> {
        for n in 0..16u32 {
            let cand = format!("vfvm{index:x}t{n}");
            if cand.len() <= config::MAX_IFNAME && !all.iter().any(|l| l.name == cand) {
                return Ok(cand);
            }
        }
        Err(NetError::Device { interface: format!("#{index}"), detail: "no free temporary name for a rename".into() })
    }

    fn rename(&self, l: &Link, to: &str, report: &mut Report) -> Result<()> {
        let cur = self.handle.link_by_index(l.index).map_err(nl(format!("interface {to:?}: get link {}", l.index)))?;
        if cur.admin_up {
            self.handle.set_link_up(l.index, false).map_err(nl(format!("interface {to:?}: set {:?} down to rename it", cur.name)))?;
            report.push(Change::LinkDown { link: cur.name.clone() });
        }
        self.handle.rename_link(l.index, to).map_err(nl(format!("interface {to:?}: rename {:?}", cur.name)))?;
        report.push(Change::Renamed { from: cur.name, to: to.to_string() });
        Ok(())
    }

    fn apply_interface(&self, index: u32, i: &ValidInterface, report: &mut Report) -> Result<()> {
        let name = &i.name;
        let ctx = |what: &str| format!("interface {name:?}: {what}");
        let l = self.handle.link_by_index(index).map_err(nl(ctx("get link")))?;
        if l.name != *name {
            self.rename(&l, name, report)?;
        }
        let l = self.handle.link_by_index(index).map_err(nl(ctx("get link")))?;
        if let Some(m) = i.mac {
            if l.mac != Some(m) {
                match self.handle.set_link_mac(index, m) {
                    Ok(()) => {}
                    Err(e) if e.errno() == Some(libc::EBUSY) && l.admin_up => {
                        // Some drivers only take a new MAC while down.
                        self.handle.set_link_up(index, false).map_err(nl(ctx("set down to change the MAC")))?;
                        report.push(Change::LinkDown { link: name.clone() });
                        self.handle.set_link_mac(index, m).map_err(nl(ctx(&format!("set MAC {m} (the device refuses it)"))))?;
                    }
                    Err(e) => return Err(nl(ctx(&format!("set MAC {m} (the device refuses it)")))(e)),
                }
                report.push(Change::MacSet { link: name.clone(), from: l.mac, to: m });
            }
        }
        if let Some(mtu) = i.mtu {
            if l.mtu != mtu {
                self.handle.set_link_mtu(index, mtu).map_err(nl(ctx(&format!("set MTU {mtu}"))))?;
                report.push(Change::MtuSet { link: name.clone(), from: l.mtu, to: mtu });
            }
        }
        let l = self.handle.link_by_index(index).map_err(nl(ctx("get link")))?;
        if !l.admin_up {
            self.handle.set_link_up(index, true).map_err(nl(ctx("set up")))?;
            report.push(Change::LinkUp { link: name.clone() });
        }
        // Addresses: remove what is not wanted (never IPv6 link-local), then
        // add what is missing, from a fresh listing (removing an IPv4 primary
        // can take its secondaries with it).
        let wanted: BTreeSet<Cidr> = i.addresses.iter().copied().collect();
        let current = self.handle.addresses(index).map_err(nl(ctx("list addresses")))?;
        let mut removed = false;
        for a in &current {
            let c = Cidr { addr: a.addr, prefix_len: a.prefix_len };
            if is_v6_link_local(&a.addr) || wanted.contains(&c) {
                continue;
            }
            match self.handle.delete_address(index, a.addr, a.prefix_len) {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(nl(ctx(&format!("remove address {c}")))(e)),
            }
            removed = true;
            report.push(Change::AddressRemoved { link: name.clone(), address: c });
        }
        let current = if removed { self.handle.addresses(index).map_err(nl(ctx("list addresses")))? } else { current };
        for c in &i.addresses {
            if current.iter().any(|a| a.addr == c.addr && a.prefix_len == c.prefix_len) {
                continue;
            }
            let mut spec = AddressSpec::new(c.addr, c.prefix_len);
            if c.addr.is_ipv6() {
                spec = spec.with_flags(AddrFlags::NODAD);
            }
            self.handle.add_address(index, &spec).map_err(nl(ctx(&format!("add address {c}"))))?;
            report.push(Change::AddressAdded { link: name.clone(), address: *c });
        }
        Ok(())
    }

    /// Resolves route devices, checks gateway reachability against what the
    /// config will set up (and link routes on devices it does not manage), and
    /// refuses collisions with routes the agent does not own.
    fn plan_routes<'a>(
        &self,
        v: &'a ValidConfig,
        target_index: &BTreeMap<&str, u32>,
        all: &[Link],
        reconfigured: &BTreeMap<u32, &ValidInterface>,
        owned: &BTreeSet<u32>,
    ) -> Result<Vec<PlannedRoute<'a>>> {
        if v.routes.is_empty() {
            return Ok(Vec::new());
        }
        let mut existing = self.handle.routes(Family::V4).map_err(nl("list IPv4 routes"))?;
        existing.extend(self.handle.routes(Family::V6).map_err(nl("list IPv6 routes"))?);
        let names: BTreeMap<u32, String> = all.iter().map(|l| (l.index, l.name.clone())).collect();
        let mut out = Vec::with_capacity(v.routes.len());
        for r in &v.routes {
            let oif = match &r.device {
                None => None,
                Some(d) => match target_index.get(d.as_str()) {
                    Some(&i) => Some(i),
                    None => match all.iter().find(|l| l.name == *d) {
                        Some(l) if !reconfigured.contains_key(&l.index) => Some(l.index),
                        _ => {
                            return Err(NetError::Route {
                                route: r.to_string(),
                                detail: format!("device {d:?} is neither an interface of this config nor an existing link"),
                            })
                        }
                    },
                },
            };
            out.push(PlannedRoute { route: r, oif });
        }
        // Reachability of gateways.
        for p in &out {
            let r = p.route;
            let Some(g) = r.gateway else { continue };
            if is_v6_link_local(&g) {
                if p.oif.is_none() {
                    return Err(NetError::Route { route: r.to_string(), detail: format!("the link-local gateway {g} needs a device") });
                }
                continue;
            }
            let on = |idx: u32| p.oif.is_none_or(|o| o == idx);
            let by_address = v
                .interfaces
                .iter()
                .any(|i| target_index.get(i.name.as_str()).is_some_and(|&idx| on(idx)) && i.addresses.iter().any(|a| a.contains(&g)));
            let by_config_link_route = out.iter().any(|o| {
                o.route.gateway.is_none()
                    && o.route.dst.contains(&g)
                    && match (o.oif, p.oif) {
                        (Some(a), Some(b)) => a == b,
                        _ => true,
                    }
            });
            let by_unmanaged = existing.iter().any(|e| {
                e.gateway.is_none()
                    && e.kind == RouteType::Unicast
                    && e.oif.is_some_and(|o| !reconfigured.contains_key(&o) && on(o))
                    && Cidr { addr: e.dst, prefix_len: e.dst_len }.contains(&g)
            });
            if !(by_address || by_config_link_route || by_unmanaged) {
                let via = match &r.device {
                    Some(d) => format!("on device {d:?}"),
                    None => "on any interface".into(),
                };
                return Err(NetError::Route {
                    route: r.to_string(),
                    detail: format!("gateway {g} is unreachable: no configured address or link route {via} covers it"),
                });
            }
        }
        // Collisions with routes the agent does not own.
        for p in &out {
            for e in &existing {
                let ours = e.oif.is_some_and(|o| owned.contains(&o));
                if !ours && !e.is_kernel_generated() && p.same_key(e) && !p.satisfied_by(e) {
                    return Err(NetError::Route {
                        route: p.route.to_string(),
                        detail: format!(
                            "conflicts with the existing route \"{}\" on a device this config does not manage (same destination and metric)",
                            describe_nl_route(e, &names)
                        ),
                    });
                }
            }
        }
        Ok(out)
    }

    fn converge_routes(&self, planned: &[PlannedRoute<'_>], owned: &BTreeSet<u32>, report: &mut Report) -> Result<()> {
        if owned.is_empty() && planned.is_empty() {
            return Ok(());
        }
        let names: BTreeMap<u32, String> = self.handle.links().map_err(nl("list links"))?.into_iter().map(|l| (l.index, l.name)).collect();
        let list = || -> Result<Vec<NlRoute>> {
            let mut v = self.handle.routes(Family::V4).map_err(nl("list IPv4 routes"))?;
            v.extend(self.handle.routes(Family::V6).map_err(nl("list IPv6 routes"))?);
            Ok(v)
        };
        let current = list()?;
        let mut removed = false;
        for e in &current {
            let ours = e.oif.is_some_and(|o| owned.contains(&o));
            if !ours || e.is_kernel_generated() || e.multipath {
                continue;
            }
            if planned.iter().any(|p| p.satisfied_by(e)) {
                continue;
            }
            let desc = describe_nl_route(e, &names);
            match self.handle.delete_route(&RouteSpec::from(e)) {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::ESRCH) => {}
                Err(err) => return Err(nl(format!("remove route \"{desc}\""))(err)),
            }
            removed = true;
            report.push(Change::RouteRemoved { route: desc });
        }
        let current = if removed { list()? } else { current };
        for p in planned {
            if current.iter().any(|e| p.satisfied_by(e)) {
                continue;
            }
            let spec = p.spec();
            if let Err(e) = self.handle.add_route(&spec) {
                let route = p.route.to_string();
                return Err(match e.errno() {
                    Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => {
                        NetError::Route { route, detail: format!("the kernel finds the gateway unreachable: {e}") }
                    }
                    _ => nl(format!("add route {route}"))(e),
                });
            }
            report.push(Change::RouteAdded { route: p.route.to_string() });
        }
        Ok(())
    }
}

/// Most bytes of an existing resolv.conf compared before rewriting it.
const MAX_RESOLV_CONF: u64 = 64 * 1024;

/// Writes `content` to `path` atomically unless it already holds exactly that.
/// Returns whether it wrote.
pub fn write_if_changed(path: &Path, content: &[u8]) -> Result<bool> {
    match std::fs::File::open(path) {
        Ok(f) => {
            let mut cur = Vec::new();
            f.take(MAX_RESOLV_CONF + 1).read_to_end(&mut cur).map_err(|source| NetError::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            })?;
            if cur == content {
                return Ok(false);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(NetError::Io { op: "open", path: path.to_path_buf(), source }),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.vfvm-agent.tmp"));
    let io = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| NetError::Io { op, path: p, source }
    };
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io("create", &tmp))?;
        f.write_all(content).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("rename into place", path)(e));
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        // Best effort: make the rename durable.
        let _ = d.sync_all();
    }
    Ok(true)
}
