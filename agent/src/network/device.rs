//! Finding a device's netdev: by the guest PCI address through sysfs, by MAC
//! through netlink, and waiting for it across hot-plug on kernel uevents.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vfvm_netlink::{Handle, Link, MacAddr};

use super::config::{check_ifname, DeviceSel};
use super::error::{nl, NetError, Result};
use super::uevent::{Recv, UeventSocket};

/// Most netdevs one PCI function may show under `net/`.
const MAX_NETDEVS_PER_FUNCTION: usize = 64;

/// What is looked for: the selector, and what the interface is to become
/// (its target name and MAC), so that an interface already configured by an
/// earlier apply is recognised even though its MAC was changed.
#[derive(Clone, Debug)]
pub struct Wanted<'a> {
    /// Target interface name (for messages and for the "already applied" check).
    pub name: &'a str,
    pub device: DeviceSel,
    /// The MAC the config sets, if any.
    pub set_mac: Option<MacAddr>,
}

/// How a device was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoundVia {
    /// It was there at the first look.
    FirstLook,
    /// It was found on a re-check after the given number of relevant uevents
    /// (or socket overflows).
    Uevent { rechecks: u32 },
}

fn mac_fits(l: &Link, want: &Wanted<'_>, m: MacAddr) -> bool {
    l.mac == Some(m) || l.perm_mac == Some(m) || (want.set_mac.is_some() && l.mac == want.set_mac && l.name == want.name)
}

/// Reads a small sysfs attribute (bounded).
fn read_small(path: &Path) -> std::io::Result<String> {
    let f = std::fs::File::open(path)?;
    let mut s = String::new();
    f.take(64).read_to_string(&mut s)?;
    Ok(s.trim().to_string())
}

/// Looks once. `Ok(None)`: not there (yet).
pub fn find_device(h: &Handle, sysfs_root: &Path, want: &Wanted<'_>) -> Result<Option<Link>> {
    let iface_err = |detail: String| NetError::Device { interface: want.name.to_string(), detail };
    let mut candidates: Vec<Link> = Vec::new();
    if let Some(pci) = want.device.pci {
        let dir: PathBuf = sysfs_root.join("bus/pci/devices").join(pci.to_string()).join("net");
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(NetError::Io { op: "list", path: dir, source }),
        };
        for (n, ent) in rd.enumerate() {
            if n >= MAX_NETDEVS_PER_FUNCTION {
                return Err(iface_err(format!("{} lists more than {MAX_NETDEVS_PER_FUNCTION} netdevs", dir.display())));
            }
            let ent = match ent {
                Ok(e) => e,
                // Entries can vanish while listed (a rename, a removal).
                Err(_) => continue,
            };
            let Ok(name) = ent.file_name().into_string() else {
                continue;
            };
            if check_ifname(&name).is_err() {
                continue;
            }
            // Prefer the ifindex (stable across renames); fall back to the name.
            let by_index =
                read_small(&ent.path().join("ifindex")).ok().and_then(|s| s.parse::<u32>().ok()).filter(|&i| i > 0 && i <= i32::MAX as u32);
            let link = match by_index {
                Some(i) => match h.link_by_index(i) {
                    Ok(l) => Some(l),
                    Err(e) if e.errno() == Some(libc::ENODEV) => None,
                    Err(e) => return Err(nl(format!("interface {:?}: get link {i} of PCI device {pci}", want.name))(e)),
                },
                None => h.find_link(&name).map_err(nl(format!("interface {:?}: get link {name:?} of PCI device {pci}", want.name)))?,
            };
            if let Some(l) = link {
                candidates.push(l);
            }
        }
        if let Some(m) = want.device.mac {
            if let Some(bad) = candidates.iter().find(|l| !mac_fits(l, want, m)) {
                if candidates.len() == 1 {
                    return Err(iface_err(format!(
                        "the netdev {:?} of PCI device {pci} has MAC {}, not {m} as the config says",
                        bad.name,
                        bad.mac.map(|m| m.to_string()).unwrap_or_else(|| "(none)".into())
                    )));
                }
                candidates.retain(|l| mac_fits(l, want, m));
            }
        }
    } else if let Some(m) = want.device.mac {
        let links = h.links().map_err(nl(format!("interface {:?}: list links", want.name)))?;
        candidates = links.into_iter().filter(|l| mac_fits(l, want, m)).collect();
        if candidates.len() > 1 {
            // Stacked devices (VLAN, macvlan, bond ports) share the MAC of
            // their lower device: prefer devices that are not stacked.
            let hw: Vec<Link> = candidates.iter().filter(|l| l.kind.is_none() || l.kind.as_deref() == Some("veth")).cloned().collect();
            if !hw.is_empty() {
                candidates = hw;
            }
        }
    }
    match candidates.len() {
        0 => Ok(None),
        1 => Ok(candidates.pop()),
        _ => {
            if let Some(i) = candidates.iter().position(|l| l.name == want.name) {
                return Ok(Some(candidates.swap_remove(i)));
            }
            let names: Vec<&str> = candidates.iter().map(|l| l.name.as_str()).collect();
            Err(iface_err(format!("{} matches several links: {names:?}", want.device)))
        }
    }
}

/// Waits for several devices with one deadline, `timeout` from now: subscribes
/// to uevents first, then looks; then re-looks (for those still missing) on
/// each net `add`/`move` uevent and after a socket overflow. `after_first_miss`
/// runs once, after the first look missed something (tests use it to create the
/// device at a moment that exercises the event path).
pub fn wait_for_devices(
    h: &Handle,
    sysfs_root: &Path,
    events: &UeventSocket,
    wanted: &[Wanted<'_>],
    timeout: Duration,
    after_first_miss: impl FnOnce(),
) -> Result<Vec<(Link, FoundVia)>> {
    let start = Instant::now();
    let deadline = super::uevent::deadline_after(timeout);
    let mut found: Vec<Option<(Link, FoundVia)>> = vec![None; wanted.len()];
    let mut rechecks = 0u32;
    let mut hook = Some(after_first_miss);
    loop {
        for (w, slot) in wanted.iter().zip(found.iter_mut()) {
            if slot.is_none() {
                if let Some(l) = find_device(h, sysfs_root, w)? {
                    let via = if rechecks == 0 { FoundVia::FirstLook } else { FoundVia::Uevent { rechecks } };
                    tracing::debug!(interface = w.name, link = %l.name, ?via, "device found");
                    *slot = Some((l, via));
                }
            }
        }
        if found.iter().all(Option::is_some) {
            return Ok(found.into_iter().flatten().collect());
        }
        if let Some(f) = hook.take() {
            f();
        }
        // Wait for something that may have brought a netdev.
        loop {
            match events.recv(deadline)? {
                Recv::Event(e) if e.may_bring_a_netdev() => break,
                Recv::Event(_) => continue,
                Recv::Overflow => break,
                Recv::Timeout => {
                    let i = found.iter().position(Option::is_none).unwrap_or(0);
                    let w = &wanted[i.min(wanted.len().saturating_sub(1))];
                    tracing::warn!(interface = w.name, waited = ?start.elapsed(), "device did not appear");
                    return Err(NetError::DeviceTimeout { interface: w.name.to_string(), device: w.device.to_string(), timeout });
                }
            }
        }
        rechecks = rechecks.saturating_add(1);
    }
}
