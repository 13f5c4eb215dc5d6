//! Port I/O and MMIO buses: address ranges mapped to devices. A vCPU exit is
//! dispatched to the device whose range holds the address, with the offset into it.
//!
//! A `Bus` is a handle: clones share one map, so every vCPU sees a range the moment
//! it is added or moved (PCI BAR reprogramming, hot-plug). The map's lock is never
//! held while a device runs, so a device may change the bus from inside an access.
//!
//! Every access is counted, by range (each has a name) or, where no device answers,
//! by address (a bounded number of addresses): what the guest makes the VMM do.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vfvm_protocols::vmm_api::{AddressSpace, RangeExits};

/// What a device asks of the VMM after an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusAction {
    None,
    /// The guest asked to power off.
    PowerOff,
    /// The guest asked to reset (reboot).
    Reset,
    /// The guest kernel panicked and will not go on.
    Panic,
}

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap { base: u64, len: u64, other_base: u64, other_len: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("no bus range starts at {0:#x}")]
    NotFound(u64),
}

type Shared = Arc<Mutex<dyn BusDevice>>;

/// How many distinct addresses with no device are counted one by one; accesses to
/// further ones are counted together (the guest chooses the addresses).
pub const MAX_UNASSIGNED_ADDRESSES: usize = 32;

struct Entry {
    len: u64,
    name: Arc<str>,
    device: Shared,
    accesses: Arc<AtomicU64>,
}

/// Accesses where no device answered.
#[derive(Default)]
struct Unassigned {
    by_address: BTreeMap<u64, u64>,
    /// Beyond [`MAX_UNASSIGNED_ADDRESSES`] distinct addresses.
    elsewhere: u64,
}

impl Unassigned {
    fn count(&mut self, addr: u64) {
        let room = self.by_address.len() < MAX_UNASSIGNED_ADDRESSES;
        match self.by_address.get_mut(&addr) {
            Some(n) => *n += 1,
            None if room => {
                self.by_address.insert(addr, 1);
            }
            None => self.elsewhere += 1,
        }
    }
}

/// A guest read of `data.len()` bytes at `offset` from a block of little-endian
/// registers (`regs`, its bytes), for devices whose registers are plain bytes;
/// bytes past the end read 0.
pub fn read_registers(regs: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, d) in data.iter_mut().enumerate() {
        *d = start.checked_add(i).and_then(|at| regs.get(at)).copied().unwrap_or(0);
    }
}

/// A set of non-overlapping ranges, each with its device.
#[derive(Clone)]
pub struct Bus {
    space: AddressSpace,
    devices: Arc<RwLock<BTreeMap<u64, Entry>>>,
    unassigned: Arc<Mutex<Unassigned>>,
}

impl Bus {
    pub fn new(space: AddressSpace) -> Self {
        Self { space, devices: Arc::default(), unassigned: Arc::default() }
    }

    /// Adds `device` at `base..base + len`, named `name` in the exit counts.
    pub fn insert(&self, base: u64, len: u64, name: &str, device: Shared) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadRange { base, len })?;
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        // The nearest range starting at or before `end - 1` is the only possible overlap.
        if let Some((&other_base, other)) = devices.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap { base, len, other_base, other_len: other.len });
            }
        }
        devices.insert(base, Entry { len, name: name.into(), device, accesses: Arc::default() });
        Ok(())
    }

    /// Removes the range starting at `base`; false if there was none.
    pub fn remove(&self, base: u64) -> bool {
        self.devices.write().unwrap_or_else(|e| e.into_inner()).remove(&base).is_some()
    }

    /// Removes every range (at VM teardown: devices that hold the bus drop too).
    pub fn clear(&self) {
        self.devices.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Moves the range at `old_base` to `new_base` (same device, same length); the
    /// range stays where it was if the new place overlaps another.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = devices.remove(&old_base) else {
            return Err(BusError::NotFound(old_base));
        };
        let len = entry.len;
        let end = new_base.checked_add(len).ok_or(BusError::BadRange { base: new_base, len })?;
        if let Some((&other_base, other)) = devices.range(..end).next_back() {
            if other_base + other.len > new_base {
                let other_len = other.len;
                devices.insert(old_base, entry);
                return Err(BusError::Overlap { base: new_base, len, other_base, other_len });
            }
        }
        devices.insert(new_base, entry);
        Ok(())
    }

    /// The device holding the whole access, with the offset into its range; the access
    /// is counted against the range, or against the address if no device holds it.
    fn find(&self, addr: u64, len: usize) -> Option<(u64, Shared)> {
        let found = {
            let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
            devices.range(..=addr).next_back().and_then(|(&base, entry)| {
                let access_end = addr.checked_add(u64::try_from(len).ok()?)?;
                (access_end <= base + entry.len).then(|| {
                    entry.accesses.fetch_add(1, Ordering::Relaxed);
                    (addr - base, entry.device.clone())
                })
            })
        };
        if found.is_none() {
            self.unassigned.lock().unwrap_or_else(|e| e.into_inner()).count(addr);
        }
        found
    }

    /// Reads from the device at `addr`; false (and `data` untouched) if none is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let found = match self.find(addr, data.len()) {
            Some((offset, device)) => {
                device.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                true
            }
            None => false,
        };
        // Every access at trace level (VFVM_LOG=trace): what a guest's exits are.
        tracing::trace!("{:?} read {addr:#x} {data:02x?}{}", self.space, if found { "" } else { " unassigned" });
        found
    }

    /// Writes to the device at `addr`; `None` if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<BusAction> {
        tracing::trace!("{:?} write {addr:#x} {data:02x?}", self.space);
        let (offset, device) = self.find(addr, data.len())?;
        let action = device.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
        Some(action)
    }

    /// The accesses so far: each range that had any, then each unassigned address
    /// (and, as one entry at `u64::MAX`, those beyond the counted addresses).
    pub fn access_counts(&self) -> Vec<RangeExits> {
        let mut counts: Vec<RangeExits> = self
            .devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(&base, e)| RangeExits {
                space: self.space,
                base,
                len: e.len,
                device: e.name.to_string(),
                exits: e.accesses.load(Ordering::Relaxed),
            })
            .filter(|r| r.exits > 0)
            .collect();
        let unassigned = self.unassigned.lock().unwrap_or_else(|e| e.into_inner());
        let range = |base, exits| RangeExits { space: self.space, base, len: 1, device: "unassigned".into(), exits };
        counts.extend(unassigned.by_address.iter().map(|(&addr, &n)| range(addr, n)));
        if unassigned.elsewhere > 0 {
            counts.push(range(u64::MAX, unassigned.elsewhere));
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
            self.0.push((offset, data.to_vec()));
            BusAction::None
        }
    }

    #[test]
    fn dispatch_by_range_with_offsets_and_no_overlaps() {
        let bus = Bus::new(AddressSpace::Pio);
        let a = Arc::new(Mutex::new(Recorder(vec![])));
        bus.insert(0x3f8, 8, "a", a.clone()).unwrap();
        bus.insert(0x400, 4, "b", Arc::new(Mutex::new(Recorder(vec![])))).unwrap();
        assert!(matches!(bus.insert(0x3fc, 8, "x", a.clone()), Err(BusError::Overlap { other_base: 0x400, .. })));
        assert!(matches!(bus.insert(0x3fc, 2, "x", a.clone()), Err(BusError::Overlap { other_base: 0x3f8, .. })));
        assert!(matches!(bus.insert(0x3f0, 9, "x", a.clone()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0x10, 0, "x", a.clone()), Err(BusError::BadRange { .. })));
        assert!(matches!(bus.insert(u64::MAX, 2, "x", a.clone()), Err(BusError::BadRange { .. })));
        bus.insert(0x3f0, 8, "c", Arc::new(Mutex::new(Recorder(vec![])))).unwrap(); // adjacent is fine

        assert_eq!(bus.write(0x3fd, &[7]), Some(BusAction::None));
        assert_eq!(a.lock().unwrap().0, [(5, vec![7])]);
        let mut buf = [0u8; 2];
        assert!(bus.read(0x3fa, &mut buf));
        assert_eq!(buf, [2, 2]);
        // Outside any device, or straddling a device's end.
        assert_eq!(bus.write(0x500, &[1]), None);
        assert!(!bus.read(0x3ff, &mut [0u8; 2]));
        assert!(bus.remove(0x3f8));
        assert_eq!(bus.write(0x3fd, &[7]), None);
    }

    #[test]
    fn clones_share_the_map_and_ranges_move() {
        let bus = Bus::new(AddressSpace::Mmio);
        let seen_by_vcpu = bus.clone();
        let a = Arc::new(Mutex::new(Recorder(vec![])));
        bus.insert(0x1000, 0x100, "a", a.clone()).unwrap();
        bus.insert(0x3000, 0x100, "b", Arc::new(Mutex::new(Recorder(vec![])))).unwrap();
        assert_eq!(seen_by_vcpu.write(0x1010, &[1]), Some(BusAction::None));
        assert!(matches!(bus.relocate(0x1000, 0x2f80), Err(BusError::Overlap { other_base: 0x3000, .. })));
        assert_eq!(seen_by_vcpu.write(0x1010, &[2]), Some(BusAction::None), "a failed move leaves the range");
        bus.relocate(0x1000, 0x2000).unwrap();
        assert_eq!(seen_by_vcpu.write(0x1010, &[3]), None);
        assert_eq!(seen_by_vcpu.write(0x2010, &[4]), Some(BusAction::None));
        assert_eq!(a.lock().unwrap().0, [(0x10, vec![1]), (0x10, vec![2]), (0x10, vec![4])]);
        assert!(matches!(bus.relocate(0x1000, 0x5000), Err(BusError::NotFound(0x1000))));
    }

    #[test]
    fn accesses_are_counted_by_range_and_unassigned_ones_by_address_bounded() {
        let bus = Bus::new(AddressSpace::Pio);
        let a = Arc::new(Mutex::new(Recorder(vec![])));
        bus.insert(0x3f8, 8, "serial", a.clone()).unwrap();
        bus.insert(0x70, 2, "cmos", Arc::new(Mutex::new(Recorder(vec![])))).unwrap();
        for _ in 0..3 {
            bus.write(0x3f9, &[1]);
        }
        bus.read(0x3fd, &mut [0]);
        // Moving the range keeps its count.
        bus.relocate(0x3f8, 0x2f8).unwrap();
        bus.read(0x2f8, &mut [0]);
        bus.read(0x80, &mut [0]);
        bus.write(0x80, &[0]);
        // Past the limit of distinct unassigned addresses, the rest count together.
        for port in 0..(MAX_UNASSIGNED_ADDRESSES as u64 + 5) {
            bus.read(0x1000 + port, &mut [0]);
        }
        let counts = bus.access_counts();
        let of = |device: &str, base: u64| counts.iter().find(|r| r.device == device && r.base == base).map(|r| r.exits);
        assert_eq!(of("serial", 0x2f8), Some(5));
        assert_eq!(of("cmos", 0x70), None, "ranges without accesses are left out");
        assert_eq!(of("unassigned", 0x80), Some(2));
        assert_eq!(counts.iter().filter(|r| r.device == "unassigned" && r.base != u64::MAX).count(), MAX_UNASSIGNED_ADDRESSES);
        assert_eq!(of("unassigned", u64::MAX), Some(6));
        assert!(counts.iter().all(|r| r.space == AddressSpace::Pio));
    }
}
