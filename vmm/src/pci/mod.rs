//! The PCI root complex: one PCI segment, bus 0, 32 slots (function 0 only; slot 0
//! stays empty), configuration access through both port 0xCF8/0xCFC and the ECAM
//! at [`layout::PCI_ECAM_START`], and memory BARs placed in the 32-bit and 64-bit
//! windows and mapped on the MMIO bus. Devices interrupt with MSI-X only (interrupt
//! pin 0, no INTx, so the DSDT needs no `_PRT`).
//!
//! # API (what the machine calls)
//!
//! ```text
//! use vfvm_vmm::pci::{self, PciRoot, PciWindows};
//! // Once, after the Vm exists:
//! let root = Arc::new(Mutex::new(PciRoot::new(vm.mmio.clone(), PciWindows::for_ram(ram_bytes))));
//! pci::install(&root, &vm.pio, &vm.mmio)?;            // CF8..CFF + ECAM on the buses
//! // Each device (before or after boot): BARs allocated, programmed, mapped.
//! let dev: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(VirtioPciDevice::new(..)?));
//! let addr: PciAddress = root.lock().unwrap().add_device(dev, None)?;  // or Some(slot)
//! root.lock().unwrap().remove_device(addr.device)?;   // hot-unplug: BARs unmapped, space freed
//! ```
//!
//! The ACPI side ([`crate::acpi`]) describes the same windows (`PciWindows::for_ram`
//! and the layout constants), and the e820 map ([`crate::boot`]) reserves the ECAM.
//!
//! # BAR mapping
//!
//! A BAR is on the MMIO bus when the device's command register has memory decode on
//! and the BAR holds a size-aligned address whose whole range lies inside one of the
//! windows; otherwise it is off the bus. The root re-evaluates this after every
//! configuration write to the device, so a guest that disables decode, probes sizes
//! (writes all ones) and writes a new address moves the range with it, and a guest
//! that probes with decode on just has the BAR off the bus for the probe. Each
//! mapping change is reported to the device ([`PciDevice::bar_mapped`]), e.g. to
//! move ioeventfds or, for VFIO, KVM memory slots.
//!
//! Locking: configuration accesses lock the root, then the device; BAR accesses lock
//! only the device. Nothing locks a device and then the root.
//!
//! # No host bridge function
//!
//! The ACPI namespace describes the host bridge (`\_SB.PCI0`, PNP0A08), which is all
//! Linux needs; a host bridge function at 00.0 would only be another device for the
//! guest to enumerate (about 110 configuration accesses at boot, two port exits each
//! through 0xCF8, measured in the lab). Linux trusts configuration mechanism #1
//! without looking for one because the SMBIOS tables ([`crate::smbios`]) give a BIOS
//! date. Slot 0 stays empty, where guests expect a host bridge if anything.

use std::sync::{Arc, Mutex};

use crate::bus::{Bus, BusAction, BusDevice, BusError};
use crate::layout;

pub mod config;
pub mod msix;

pub use config::{BarRequest, ConfigSpace, PciIds};

use config::{COMMAND_MEMORY, REG_BAR0, REG_COMMAND};

/// Slots on bus 0.
pub const NUM_SLOTS: usize = 32;
/// The port holding the configuration address (mechanism #1); data at 0xCFC..0xCFF.
pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
pub const CONFIG_DATA_PORT: u64 = 0xcfc;
const CONFIG_ENABLE: u32 = 1 << 31;

/// A function's address (the project's one type); this root complex is segment 0.
pub use vfvm_protocols::PciAddress;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("no free slot on PCI bus 0")]
    BusFull,
    #[error("PCI slot {0} is taken")]
    SlotTaken(u8),
    #[error("PCI slot {0} does not exist (1..32; slot 0 stays empty)")]
    BadSlot(u8),
    #[error("PCI slot {0} is empty")]
    SlotEmpty(u8),
    #[error("no room for BAR {index} ({size:#x} bytes) in the PCI windows")]
    NoBarSpace { index: u8, size: u64 },
    #[error("mapping BAR {index}: {source}")]
    Map { index: u8, source: BusError },
}

/// A function on the PCI bus: its configuration space and its memory BARs.
///
/// Configuration accesses are 1, 2 or 4 bytes within one dword, `offset < 4096`.
/// BAR accesses are given the BAR's index and the offset into it.
pub trait PciDevice: Send {
    fn read_config(&mut self, offset: u16, data: &mut [u8]);
    fn write_config(&mut self, offset: u16, data: &[u8]);
    /// The memory BARs this device has (fixed for its lifetime).
    fn bars(&self) -> Vec<BarRequest>;
    fn read_bar(&mut self, index: u8, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, index: u8, offset: u64, data: &[u8]);
    /// BAR `index` is now on the MMIO bus at `base`, or off it (`None`).
    fn bar_mapped(&mut self, _index: u8, _base: Option<u64>) {}
}

type SharedDevice = Arc<Mutex<dyn PciDevice>>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An address window for BARs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub size: u64,
}

impl Window {
    fn contains(&self, base: u64, size: u64) -> bool {
        base >= self.start && base.checked_add(size).is_some_and(|end| end <= self.start + self.size)
    }
}

/// The root bus's memory windows, as the DSDT's `_CRS` describes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindows {
    pub mmio32: Window,
    pub mmio64: Window,
}

impl PciWindows {
    /// The windows of the address map in [`crate::layout`] for this much RAM.
    pub fn for_ram(ram_bytes: u64) -> Self {
        Self {
            mmio32: Window { start: layout::PCI_MMIO32_START, size: layout::PCI_MMIO32_SIZE },
            mmio64: Window { start: layout::pci_mmio64_start(ram_bytes), size: layout::PCI_MMIO64_SIZE },
        }
    }

    fn contains(&self, base: u64, size: u64) -> bool {
        self.mmio32.contains(base, size) || self.mmio64.contains(base, size)
    }
}

/// A BAR's range on the MMIO bus, forwarding to its device.
struct BarRange {
    device: SharedDevice,
    index: u8,
}

impl BusDevice for BarRange {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.index, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        lock(&self.device).write_bar(self.index, offset, data);
        BusAction::None
    }
}

struct BarState {
    request: BarRequest,
    /// The address the BAR register holds now.
    address: u64,
    /// Where it is on the MMIO bus, if it is.
    mapped: Option<u64>,
}

struct Slot {
    device: SharedDevice,
    bars: Vec<BarState>,
}

/// Bus 0 of segment 0.
pub struct PciRoot {
    mmio: Bus,
    windows: PciWindows,
    slots: Vec<Option<Slot>>,
}

/// A type-0 header register (`config::REG_*`) as [`PciDevice`] offsets go.
#[track_caller]
fn header_reg(reg: usize) -> u16 {
    u16::try_from(reg).expect("header registers are below 0x40")
}

fn config_u32(device: &mut dyn PciDevice, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    device.read_config(header_reg(offset), &mut b);
    u32::from_le_bytes(b)
}

/// The address a BAR register pair of `device` holds.
fn read_bar_address(device: &mut dyn PciDevice, bar: &BarRequest) -> u64 {
    let reg = REG_BAR0 + 4 * usize::from(bar.index);
    let lo = u64::from(config_u32(device, reg) & !0xf);
    let hi = if bar.is_64bit { u64::from(config_u32(device, reg + 4)) } else { 0 };
    hi << 32 | lo
}

impl PciRoot {
    /// An empty root bus; BARs go on `mmio`, inside `windows`.
    pub fn new(mmio: Bus, windows: PciWindows) -> Self {
        Self { mmio, windows, slots: (0..NUM_SLOTS).map(|_| None).collect() }
    }

    pub fn windows(&self) -> PciWindows {
        self.windows
    }

    /// The device in `slot`, if any.
    pub fn device(&self, slot: u8) -> Option<SharedDevice> {
        self.slots.get(usize::from(slot))?.as_ref().map(|s| s.device.clone())
    }

    /// Plugs `device` into `slot` (or the first free one): its BARs get addresses in
    /// the windows (64-bit BARs above 4 GiB when that window has room), memory
    /// decode is turned on and the BARs are mapped. On error nothing is left behind.
    pub fn add_device(&mut self, device: SharedDevice, slot: Option<u8>) -> Result<PciAddress, PciError> {
        let slot = match slot {
            Some(s) if s == 0 || usize::from(s) >= NUM_SLOTS => return Err(PciError::BadSlot(s)),
            Some(s) if self.slots[usize::from(s)].is_some() => return Err(PciError::SlotTaken(s)),
            Some(s) => s,
            None => (1u8..).take(NUM_SLOTS - 1).find(|&s| self.slots[usize::from(s)].is_none()).ok_or(PciError::BusFull)?,
        };
        let requests = lock(&device).bars();
        let mut used = self.used_ranges();
        let mut bars = Vec::with_capacity(requests.len());
        for request in requests {
            let mut windows = vec![self.windows.mmio32];
            if request.is_64bit {
                windows.insert(0, self.windows.mmio64);
            }
            let address = windows
                .iter()
                .find_map(|w| find_free(*w, request.size, &used))
                .ok_or(PciError::NoBarSpace { index: request.index, size: request.size })?;
            used.push((address, request.size));
            bars.push(BarState { request, address, mapped: None });
        }
        {
            let mut dev = lock(&device);
            for bar in &bars {
                let reg = header_reg(REG_BAR0 + 4 * usize::from(bar.request.index));
                let (low, high) = crate::split_u64(bar.address);
                dev.write_config(reg, &low.to_le_bytes());
                if bar.request.is_64bit {
                    dev.write_config(reg + 4, &high.to_le_bytes());
                }
            }
            let mut cmd = [0u8; 2];
            dev.read_config(header_reg(REG_COMMAND), &mut cmd);
            let cmd = u16::from_le_bytes(cmd) | COMMAND_MEMORY;
            dev.write_config(header_reg(REG_COMMAND), &cmd.to_le_bytes());
        }
        self.slots[usize::from(slot)] = Some(Slot { device, bars });
        if let Err(e) = self.sync_bars(slot) {
            let _ = self.remove_device(slot);
            return Err(e);
        }
        PciAddress::new(0, 0, slot, 0).ok_or(PciError::BadSlot(slot))
    }

    /// Unplugs the device in `slot`: its BARs leave the bus and their space is free.
    pub fn remove_device(&mut self, slot: u8) -> Result<SharedDevice, PciError> {
        if slot == 0 || usize::from(slot) >= NUM_SLOTS {
            return Err(PciError::BadSlot(slot));
        }
        let s = self.slots[usize::from(slot)].take().ok_or(PciError::SlotEmpty(slot))?;
        let mut dev = lock(&s.device);
        for bar in &s.bars {
            if let Some(base) = bar.mapped {
                self.mmio.remove(base);
                dev.bar_mapped(bar.request.index, None);
            }
        }
        drop(dev);
        Ok(s.device)
    }

    /// Every BAR range in use, by its current address (assigned by us or the guest).
    fn used_ranges(&self) -> Vec<(u64, u64)> {
        self.slots.iter().flatten().flat_map(|s| s.bars.iter().map(|b| (b.address, b.request.size))).collect()
    }

    /// Brings the bus in line with the device's command register and BARs.
    fn sync_bars(&mut self, slot: u8) -> Result<(), PciError> {
        let Some(s) = self.slots.get_mut(usize::from(slot)).and_then(|s| s.as_mut()) else {
            return Ok(());
        };
        let mut dev = lock(&s.device);
        let mut cmd = [0u8; 2];
        dev.read_config(header_reg(REG_COMMAND), &mut cmd);
        let decode = u16::from_le_bytes(cmd) & COMMAND_MEMORY != 0;
        let mut result = Ok(());
        for bar in &mut s.bars {
            bar.address = read_bar_address(&mut *dev, &bar.request);
            let size = bar.request.size;
            let want =
                (decode && bar.address != 0 && bar.address % size == 0 && self.windows.contains(bar.address, size)).then_some(bar.address);
            if want == bar.mapped {
                continue;
            }
            if let Some(old) = bar.mapped.take() {
                self.mmio.remove(old);
            }
            if let Some(base) = want {
                let range = Arc::new(Mutex::new(BarRange { device: s.device.clone(), index: bar.request.index }));
                match self.mmio.insert(base, size, &format!("PCI 00:{slot:02x}.0 BAR{}", bar.request.index), range) {
                    Ok(()) => bar.mapped = Some(base),
                    Err(source) => {
                        crate::guest_warn!("PCI {slot:02x}.0 BAR {} at {base:#x}: {source}", bar.request.index);
                        if result.is_ok() {
                            result = Err(PciError::Map { index: bar.request.index, source });
                        }
                    }
                }
            }
            dev.bar_mapped(bar.request.index, bar.mapped);
        }
        result
    }

    fn slot_of(&self, addr: PciAddress) -> Option<&Slot> {
        if addr.domain() != 0 || addr.bus() != 0 || addr.function() != 0 {
            return None;
        }
        self.slots.get(usize::from(addr.device()))?.as_ref()
    }

    /// A configuration read; absent functions and bad accesses read all ones.
    pub fn config_read(&self, addr: PciAddress, reg: u16, data: &mut [u8]) {
        let valid = matches!(data.len(), 1 | 2 | 4) && usize::from(reg & 3) + data.len() <= 4 && reg < 4096;
        match self.slot_of(addr) {
            Some(s) if valid => lock(&s.device).read_config(reg, data),
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; BAR mappings follow.
    pub fn config_write(&mut self, addr: PciAddress, reg: u16, data: &[u8]) {
        let valid = matches!(data.len(), 1 | 2 | 4) && usize::from(reg & 3) + data.len() <= 4 && reg < 4096;
        let Some(s) = self.slot_of(addr) else {
            return;
        };
        if !valid {
            return;
        }
        lock(&s.device).write_config(reg, data);
        // Errors are logged in sync_bars: the guest's programming is its business.
        let _ = self.sync_bars(addr.device());
    }
}

/// First size-aligned free range of `size` bytes in `w`, avoiding `used`.
fn find_free(w: Window, size: u64, used: &[(u64, u64)]) -> Option<u64> {
    let mut used: Vec<_> = used.iter().copied().filter(|&(_, s)| s > 0).collect();
    used.sort_unstable();
    let end = w.start.checked_add(w.size)?;
    let mut candidate = w.start.checked_next_multiple_of(size)?;
    loop {
        let cand_end = candidate.checked_add(size)?;
        if cand_end > end {
            return None;
        }
        match used.iter().find(|&&(b, s)| b < cand_end && candidate < b.saturating_add(s)) {
            Some(&(b, s)) => candidate = b.saturating_add(s).checked_next_multiple_of(size)?,
            None => return Some(candidate),
        }
    }
}

/// Configuration mechanism #1: address at 0xCF8, data at 0xCFC..0xCFF.
struct PioConfigAccess {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PioConfigAccess {
    fn target(&self, data_offset: u64) -> Option<(PciAddress, u16)> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        // Bits 23:16 the bus, 15:8 device and function, 7:2 the register.
        let [register, devfn, bus, _] = a.to_le_bytes();
        let addr = PciAddress::from_devfn(0, bus, devfn);
        Some((addr, u16::from(register & 0xfc) + u16::try_from(data_offset).ok()?))
    }
}

impl BusDevice for PioConfigAccess {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4) {
                Some((addr, reg)) => {
                    lock(&self.root).config_read(addr, reg, data);
                    trace_config("CF8", "read", addr, reg, data);
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & !3;
            }
            4..=7 => {
                if let Some((addr, reg)) = self.target(offset - 4) {
                    trace_config("CF8", "write", addr, reg, data);
                    lock(&self.root).config_write(addr, reg, data);
                }
            }
            _ => {}
        }
        BusAction::None
    }
}

/// Every configuration access at trace level (`VFVM_LOG=trace`): which
/// function and register the guest's PCI code touches, and through which mechanism,
/// is what the boot-exit work is measured by.
fn trace_config(via: &str, op: &str, addr: PciAddress, reg: u16, data: &[u8]) {
    tracing::trace!("config {via} {op} {addr} reg {reg:#05x} len {} data {data:02x?}", data.len());
}

/// ECAM: bus << 20 | device << 15 | function << 12 | register.
struct EcamAccess {
    root: Arc<Mutex<PciRoot>>,
}

fn ecam_target(offset: u64) -> (PciAddress, u16) {
    // Above the 12-bit register: the device/function byte, then the bus byte.
    let [devfn, bus, ..] = (offset >> 12).to_le_bytes();
    let addr = PciAddress::from_devfn(0, bus, devfn);
    (addr, (offset & 0xfff) as u16)
}

impl BusDevice for EcamAccess {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (addr, reg) = ecam_target(offset);
        lock(&self.root).config_read(addr, reg, data);
        trace_config("ECAM", "read", addr, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        let (addr, reg) = ecam_target(offset);
        trace_config("ECAM", "write", addr, reg, data);
        lock(&self.root).config_write(addr, reg, data);
        BusAction::None
    }
}

/// Puts the root's configuration access on the buses: ports 0xCF8..0xCFF and the
/// ECAM ([`layout::PCI_ECAM_START`], [`layout::PCI_ECAM_SIZE`]: the buses the guest is told of, of
/// which only bus 0 has devices).
pub fn install(root: &Arc<Mutex<PciRoot>>, pio: &Bus, mmio: &Bus) -> Result<(), BusError> {
    pio.insert(CONFIG_ADDRESS_PORT, 8, "PCI config (CF8/CFC)", Arc::new(Mutex::new(PioConfigAccess { root: root.clone(), address: 0 })))?;
    if let Err(e) = mmio.insert(
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
        "PCI config (ECAM)",
        Arc::new(Mutex::new(EcamAccess { root: root.clone() })),
    ) {
        pio.remove(CONFIG_ADDRESS_PORT);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
