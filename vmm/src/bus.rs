//! Port I/O and MMIO buses: address ranges mapped to devices. A vCPU exit is
//! dispatched to the device whose range holds the address, with the offset into it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
}

type Shared = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping ranges, each with its device.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, Shared)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, device: Shared) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadRange { base, len })?;
        // The nearest range starting at or before `end - 1` is the only possible overlap.
        if let Some((&other_base, &(other_len, _))) = self.devices.range(..end).next_back() {
            if other_base + other_len > base {
                return Err(BusError::Overlap { base, len, other_base, other_len });
            }
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    pub fn remove(&mut self, base: u64) -> bool {
        self.devices.remove(&base).is_some()
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &Shared)> {
        let (&base, (dev_len, device)) = self.devices.range(..=addr).next_back()?;
        let access_end = addr.checked_add(len as u64)?;
        (access_end <= base + dev_len).then_some((addr - base, device))
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
        Some(device.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
            self.0.push((offset, data.to_vec()));
            BusAction::None
        }
    }

    #[test]
    fn dispatch_by_range_with_offsets_and_no_overlaps() {
        let mut bus = Bus::new();
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
}
