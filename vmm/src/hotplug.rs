//! ACPI PCI hot-plug: how a running guest learns that a device arrived in a slot of
//! bus 0 or is asked to give one up, with no driver of ours in the guest. The DSDT
//! ([`crate::acpi`]) describes the registers below, one `Device` per slot with
//! `_ADR`, `_SUN` and `_EJ0`, and a Generic Event Device (ACPI0013) whose interrupt
//! this controller raises; Linux's built-in `acpiphp` and `acpi-ged` do the rest.
//! (Cloud Hypervisor's `PCIU`/`PCID`/`B0EJ` registers and GED, QEMU's legacy PCI
//! hot-plug ports.)
//!
//! Registers, 32 bits each, one bit per slot, at [`HOTPLUG_PORT`]:
//!
//! | offset | name | access | meaning                                              |
//! |--------|------|--------|------------------------------------------------------|
//! | 0      | PCIU | read   | slots with a new device since the last read (clears) |
//! | 4      | PCID | read   | slots the VMM asks the guest to eject (clears)       |
//! | 8      | B0EJ | write  | the guest ejected these slots (its `_EJ0`)           |
//!
//! The flow: [`PciHotplug::device_up`] or [`PciHotplug::request_eject`] sets bits
//! and pulses the GED's interrupt (an edge on [`GED_GSI`]); the GED's `_EVT` runs
//! `\_SB.PCI0.PCNT`, which reads PCIU and PCID and notifies each slot (device check,
//! or eject request). On eject the guest unbinds its driver, removes the device and
//! calls `_EJ0`, whose B0EJ write takes the device off the root bus at once, on the
//! vCPU that wrote it; the device itself is released (VFIO reset, fds closed) by the
//! device manager, off the vCPU, when it collects it ([`PciHotplug::take_ejected`]).
//!
//! Only slots marked removable (passed-through devices) can be ejected: a guest
//! ejecting a virtio slot is ignored, since the VMM's own devices stay for the VM's
//! life.
//!
//! Locking: the state's lock is a leaf; the root complex's lock is never taken while
//! holding it.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::bus::{read_registers, BusAction, BusDevice};
use crate::pci::{PciDevice, PciRoot, NUM_SLOTS};

/// The controller's ports (QEMU's legacy PCI hot-plug range).
pub const HOTPLUG_PORT: u64 = 0xae00;
pub const HOTPLUG_PORT_LEN: u64 = 12;
/// Register offsets.
pub const PCIU_OFFSET: u64 = 0;
pub const PCID_OFFSET: u64 = 4;
pub const B0EJ_OFFSET: u64 = 8;
/// The Generic Event Device's interrupt: an IOAPIC pin above the ISA ones, edge
/// triggered, active high, used by nothing else.
pub const GED_GSI: u32 = 16;

type SharedDevice = Arc<Mutex<dyn PciDevice>>;

/// Raises the GED's interrupt (one edge).
pub type Notifier = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct State {
    /// Slots with a device the guest has not yet been told of.
    up: u32,
    /// Slots the guest is asked to eject and has not yet read.
    down: u32,
    /// Slots whose device may be ejected.
    removable: u32,
    /// Devices the guest ejected, off the bus, not yet released.
    ejected: Vec<(u8, SharedDevice)>,
}

pub struct PciHotplug {
    root: Arc<Mutex<PciRoot>>,
    notify: Notifier,
    state: Mutex<State>,
    /// Signalled on every eject.
    ejected: Condvar,
}

fn slot_bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0)
}

impl PciHotplug {
    pub fn new(root: Arc<Mutex<PciRoot>>, notify: Notifier) -> Arc<Self> {
        Arc::new(Self { root, notify, state: Mutex::default(), ejected: Condvar::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `slot` holds a device the guest may eject.
    pub fn set_removable(&self, slot: u8, removable: bool) {
        let mut state = self.lock();
        if removable {
            state.removable |= slot_bit(slot);
        } else {
            state.removable &= !slot_bit(slot);
            state.up &= !slot_bit(slot);
            state.down &= !slot_bit(slot);
        }
    }

    /// Tells the guest a device is now in `slot`.
    pub fn device_up(&self, slot: u8) {
        {
            let mut state = self.lock();
            state.up |= slot_bit(slot);
            state.down &= !slot_bit(slot);
        }
        (self.notify)();
    }

    /// Asks the guest to eject the device in `slot`.
    pub fn request_eject(&self, slot: u8) {
        {
            let mut state = self.lock();
            state.down |= slot_bit(slot);
            state.up &= !slot_bit(slot);
        }
        (self.notify)();
    }

    /// Waits up to `limit` for the guest to eject `slot`; returns the device if it did.
    pub fn wait_ejected(&self, slot: u8, limit: Duration) -> Option<SharedDevice> {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        loop {
            if let Some(at) = state.ejected.iter().position(|(s, _)| *s == slot) {
                return Some(state.ejected.swap_remove(at).1);
            }
            let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
            state = self.ejected.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Every device the guest ejected on its own since the last call.
    pub fn take_ejected(&self) -> Vec<(u8, SharedDevice)> {
        std::mem::take(&mut self.lock().ejected)
    }

    /// The guest's `_EJ0` for the slots in `bits`: each removable one leaves the bus.
    fn eject(&self, bits: u32) {
        let wanted = {
            let mut state = self.lock();
            let wanted = bits & state.removable;
            state.removable &= !wanted;
            state.down &= !wanted;
            wanted
        };
        if bits & !wanted != 0 {
            tracing::debug!(
                slots = format_args!("{:#x}", bits & !wanted),
                "the guest ejected slots that hold no removable device; ignored"
            );
        }
        let mut gone = Vec::new();
        for slot in (0u8..).take(NUM_SLOTS).filter(|&s| wanted & slot_bit(s) != 0) {
            let removed = self.root.lock().unwrap_or_else(|e| e.into_inner()).remove_device(slot);
            match removed {
                Ok(device) => {
                    tracing::info!(slot, "the guest ejected the device in slot {slot}");
                    gone.push((slot, device));
                }
                Err(e) => tracing::debug!(slot, "eject: {e}"),
            }
        }
        if !gone.is_empty() {
            self.lock().ejected.extend(gone);
            self.ejected.notify_all();
        }
    }
}

/// The registers on the port I/O bus.
pub struct HotplugRegisters(pub Arc<PciHotplug>);

impl BusDevice for HotplugRegisters {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Reads of a whole register clear it; partial reads see it unchanged.
        let whole = data.len() == 4;
        let value = {
            let mut state = self.0.lock();
            match offset {
                PCIU_OFFSET if whole => std::mem::take(&mut state.up),
                PCID_OFFSET if whole => std::mem::take(&mut state.down),
                _ => 0,
            }
        };
        let within = offset % 4;
        read_registers(&value.to_le_bytes(), within, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if offset == B0EJ_OFFSET && data.len() == 4 {
            let bits = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.0.eject(bits);
        }
        BusAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::pci::config::BarRequest;
    use crate::pci::PciWindows;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vfvm_protocols::vmm_api::AddressSpace;

    struct Plain;
    impl PciDevice for Plain {
        fn read_config(&mut self, _: u16, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _: u16, _: &[u8]) {}
        fn bars(&self) -> Vec<BarRequest> {
            Vec::new()
        }
        fn read_bar(&mut self, _: u8, _: u64, _: &mut [u8]) {}
        fn write_bar(&mut self, _: u8, _: u64, _: &[u8]) {}
    }

    fn read(regs: &mut HotplugRegisters, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        regs.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// The guest's view through the registers: a device announced once, an eject
    /// request read once, an eject taking the device off the bus and waking the
    /// waiter, ejects of other slots ignored.
    #[test]
    fn slots_go_up_and_down_through_the_registers() {
        let root = Arc::new(Mutex::new(PciRoot::new(Bus::new(AddressSpace::Mmio), PciWindows::for_ram(256 << 20))));
        let pulses = Arc::new(AtomicU32::new(0));
        let counted = pulses.clone();
        let hotplug = PciHotplug::new(
            root.clone(),
            Box::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let mut regs = HotplugRegisters(hotplug.clone());
        let vf = root.lock().unwrap().add_device(Arc::new(Mutex::new(Plain)), Some(5)).unwrap();
        let virtio = root.lock().unwrap().add_device(Arc::new(Mutex::new(Plain)), Some(1)).unwrap();
        assert_eq!((vf.device(), virtio.device()), (5, 1));
        hotplug.set_removable(5, true);
        hotplug.device_up(5);
        assert_eq!(pulses.load(Ordering::SeqCst), 1);
        assert_eq!(read(&mut regs, PCIU_OFFSET), 1 << 5);
        assert_eq!(read(&mut regs, PCIU_OFFSET), 0, "PCIU clears on read");
        assert_eq!(read(&mut regs, PCID_OFFSET), 0);

        // Nobody ejects in time: the wait gives up.
        hotplug.request_eject(5);
        assert!(hotplug.wait_ejected(5, Duration::from_millis(20)).is_none());
        assert_eq!(read(&mut regs, PCID_OFFSET), 1 << 5);

        // The guest's _EJ0 for slots 1 (virtio: not removable) and 5, from a vCPU.
        let waiter = {
            let hotplug = hotplug.clone();
            std::thread::spawn(move || hotplug.wait_ejected(5, Duration::from_secs(30)).is_some())
        };
        regs.write(B0EJ_OFFSET, &((1u32 << 5) | (1 << 1)).to_le_bytes());
        assert!(waiter.join().unwrap(), "the waiter saw the eject");
        assert!(root.lock().unwrap().device(5).is_none(), "slot 5 is empty");
        assert!(root.lock().unwrap().device(1).is_some(), "slot 1 stays");
        // A second eject of the slot (now empty and not removable) does nothing.
        regs.write(B0EJ_OFFSET, &(1u32 << 5).to_le_bytes());
        assert!(hotplug.take_ejected().is_empty());

        // An eject the VMM did not ask for is collected later.
        root.lock().unwrap().add_device(Arc::new(Mutex::new(Plain)), Some(7)).unwrap();
        hotplug.set_removable(7, true);
        regs.write(B0EJ_OFFSET, &(1u32 << 7).to_le_bytes());
        let taken = hotplug.take_ejected();
        assert_eq!(taken.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [7]);
        // Partial reads and odd writes change nothing.
        hotplug.device_up(9);
        let mut b = [0u8; 1];
        regs.read(PCIU_OFFSET, &mut b);
        assert_eq!(read(&mut regs, PCIU_OFFSET), 1 << 9);
        regs.write(B0EJ_OFFSET, &[0xff]);
    }
}
