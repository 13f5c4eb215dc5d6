//! Port I/O and MMIO buses: address ranges mapped to devices. A vCPU exit is
//! dispatched to the device whose range holds the address, with the offset into it.
//!
//! A `Bus` is a handle: clones share one map, so every vCPU sees a range the moment
//! it is added or moved (PCI BAR reprogramming, hot-plug). The map's lock is never
//! held while a device runs, so a device may change the bus from inside an access.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

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
#[derive(Default, Clone)]
pub struct Bus {
    devices: Arc<RwLock<BTreeMap<u64, (u64, Shared)>>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, base: u64, len: u64, device: Shared) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadRange { base, len })?;
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        // The nearest range starting at or before `end - 1` is the only possible overlap.
        if let Some((&other_base, &(other_len, _))) = devices.range(..end).next_back() {
            if other_base + other_len > base {
                return Err(BusError::Overlap { base, len, other_base, other_len });
            }
        }
        devices.insert(base, (len, device));
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
        let Some((len, device)) = devices.remove(&old_base) else {
            return Err(BusError::NotFound(old_base));
        };
        let end = new_base.checked_add(len).ok_or(BusError::BadRange { base: new_base, len })?;
        if let Some((&other_base, &(other_len, _))) = devices.range(..end).next_back() {
            if other_base + other_len > new_base {
                devices.insert(old_base, (len, device));
                return Err(BusError::Overlap { base: new_base, len, other_base, other_len });
            }
        }
        devices.insert(new_base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, Shared)> {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (&base, (dev_len, device)) = devices.range(..=addr).next_back()?;
        let access_end = addr.checked_add(len as u64)?;
        (access_end <= base + dev_len).then(|| (addr - base, device.clone()))
    }

    /// Reads from the device at `addr`; false (and `data` untouched) if none is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                device.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; `None` if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<BusAction> {
        let (offset, device) = self.find(addr, data.len())?;
        let action = device.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
        Some(action)
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
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder(vec![])));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x400, 4, Arc::new(Mutex::new(Recorder(vec![])))).unwrap();
        assert!(matches!(bus.insert(0x3fc, 8, a.clone()), Err(BusError::Overlap { other_base: 0x400, .. })));
        assert!(matches!(bus.insert(0x3fc, 2, a.clone()), Err(BusError::Overlap { other_base: 0x3f8, .. })));
        assert!(matches!(bus.insert(0x3f0, 9, a.clone()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0x10, 0, a.clone()), Err(BusError::BadRange { .. })));
        assert!(matches!(bus.insert(u64::MAX, 2, a.clone()), Err(BusError::BadRange { .. })));
        bus.insert(0x3f0, 8, Arc::new(Mutex::new(Recorder(vec![])))).unwrap(); // adjacent is fine

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
        let bus = Bus::new();
        let seen_by_vcpu = bus.clone();
        let a = Arc::new(Mutex::new(Recorder(vec![])));
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x3000, 0x100, Arc::new(Mutex::new(Recorder(vec![])))).unwrap();
        assert_eq!(seen_by_vcpu.write(0x1010, &[1]), Some(BusAction::None));
        assert!(matches!(bus.relocate(0x1000, 0x2f80), Err(BusError::Overlap { other_base: 0x3000, .. })));
        assert_eq!(seen_by_vcpu.write(0x1010, &[2]), Some(BusAction::None), "a failed move leaves the range");
        bus.relocate(0x1000, 0x2000).unwrap();
        assert_eq!(seen_by_vcpu.write(0x1010, &[3]), None);
        assert_eq!(seen_by_vcpu.write(0x2010, &[4]), Some(BusAction::None));
        assert_eq!(a.lock().unwrap().0, [(0x10, vec![1]), (0x10, vec![2]), (0x10, vec![4])]);
        assert!(matches!(bus.relocate(0x1000, 0x5000), Err(BusError::NotFound(0x1000))));
    }
}
