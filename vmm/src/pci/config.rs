//! A device's PCI configuration space (4 KiB, PCIe-sized), type-0 header: the
//! registers as bytes, with a write mask saying which bits the guest may change.
//! BAR size probing falls out of the masks: a BAR's writable bits are its address
//! bits, so writing all ones reads back the size mask with the read-only type bits.

/// Size of a function's configuration space (PCIe).
pub const CONFIG_SPACE_SIZE: usize = 4096;

pub const REG_VENDOR_ID: usize = 0x00;
pub const REG_DEVICE_ID: usize = 0x02;
pub const REG_COMMAND: usize = 0x04;
pub const REG_STATUS: usize = 0x06;
pub const REG_REVISION: usize = 0x08;
pub const REG_CLASS: usize = 0x09;
pub const REG_HEADER_TYPE: usize = 0x0e;
pub const REG_BAR0: usize = 0x10;
pub const REG_SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const REG_SUBSYSTEM_ID: usize = 0x2e;
pub const REG_CAPABILITIES: usize = 0x34;
pub const REG_INTERRUPT_LINE: usize = 0x3c;
pub const REG_INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_PARITY: u16 = 1 << 6;
const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;
/// BAR type bits (memory BARs only: I/O BARs are not supported).
pub const BAR_MEM_64: u32 = 0b10 << 1;
pub const BAR_PREFETCHABLE: u32 = 1 << 3;
/// Where capabilities start: right after the type-0 header.
const CAPS_START: usize = 0x40;
/// Capabilities stay in the legacy 256 bytes, where every driver looks.
const CAPS_END: usize = 0x100;

/// A memory BAR as a device asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRequest {
    /// BAR register index (0..6); a 64-bit BAR also takes `index + 1`.
    pub index: u8,
    /// Size in bytes: a power of two, at least 16 (4 KiB or more recommended).
    pub size: u64,
    pub is_64bit: bool,
    pub prefetchable: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {index}: size {size:#x} is not a power of two of at least 16 bytes")]
    BarSize { index: u8, size: u64 },
    #[error("BAR {0}: no such register (a 64-bit BAR needs the next one too), or it is taken")]
    BarIndex(u8),
    #[error("no room for a {0}-byte capability in the configuration space")]
    CapabilitySpace(usize),
    #[error("a capability's write mask must be as long as its body")]
    CapabilityMask,
}

/// Identity of a function: what its header says it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciIds {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Class code: base class << 16 | subclass << 8 | programming interface.
    pub class: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// The configuration space of one function.
#[derive(Clone)]
pub struct ConfigSpace {
    regs: Vec<u8>,
    /// Bits the guest may change.
    wmask: Vec<u8>,
    /// Bits the guest clears by writing 1 (status error bits).
    w1c: Vec<u8>,
    bars: [Option<BarRequest>; NUM_BARS],
    /// Where the next capability goes, and where the last one's next pointer is.
    next_cap: usize,
    last_cap_next: usize,
}

impl ConfigSpace {
    /// A type-0 header with these ids, no BARs, no capabilities, interrupt pin 0
    /// (no INTx: devices here interrupt with MSI-X).
    pub fn new(ids: PciIds) -> Self {
        let mut c = Self {
            regs: vec![0; CONFIG_SPACE_SIZE],
            wmask: vec![0; CONFIG_SPACE_SIZE],
            w1c: vec![0; CONFIG_SPACE_SIZE],
            bars: [None; NUM_BARS],
            next_cap: CAPS_START,
            last_cap_next: REG_CAPABILITIES,
        };
        c.set_u16(REG_VENDOR_ID, ids.vendor_id);
        c.set_u16(REG_DEVICE_ID, ids.device_id);
        c.regs[REG_REVISION] = ids.revision;
        c.regs[REG_CLASS..REG_CLASS + 3].copy_from_slice(&ids.class.to_le_bytes()[..3]);
        c.regs[REG_HEADER_TYPE] = 0;
        c.set_u16(REG_SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id);
        c.set_u16(REG_SUBSYSTEM_ID, ids.subsystem_id);
        let command_mask = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE;
        c.wmask[REG_COMMAND..REG_COMMAND + 2].copy_from_slice(&command_mask.to_le_bytes());
        // Status: the error bits (parity, target/master aborts, SERR) are RW1C.
        c.w1c[REG_STATUS + 1] = 0xf9;
        c.wmask[REG_INTERRUPT_LINE] = 0xff; // scratch for the OS
        c.regs[REG_INTERRUPT_LINE] = 0xff;
        c.regs[REG_INTERRUPT_PIN] = 0;
        c
    }

    /// Declares a memory BAR; its address starts at 0 (the root complex assigns it).
    pub fn add_bar(&mut self, bar: BarRequest) -> Result<(), ConfigError> {
        let index = usize::from(bar.index);
        if bar.size < 16 || !bar.size.is_power_of_two() || (!bar.is_64bit && bar.size > 1 << 31) {
            return Err(ConfigError::BarSize { index: bar.index, size: bar.size });
        }
        let last = index + usize::from(bar.is_64bit);
        if last >= NUM_BARS || self.bar_slot_taken(index) || (bar.is_64bit && self.bar_slot_taken(index + 1)) {
            return Err(ConfigError::BarIndex(bar.index));
        }
        self.bars[index] = Some(bar);
        let mut flags = 0u32;
        if bar.is_64bit {
            flags |= BAR_MEM_64;
        }
        if bar.prefetchable {
            flags |= BAR_PREFETCHABLE;
        }
        let (mask_low, mask_high) = crate::split_u64(!(bar.size - 1));
        let reg = REG_BAR0 + 4 * index;
        self.set_u32(reg, flags);
        self.wmask[reg..reg + 4].copy_from_slice(&(mask_low & !0xf).to_le_bytes());
        if bar.is_64bit {
            self.set_u32(reg + 4, 0);
            self.wmask[reg + 4..reg + 8].copy_from_slice(&mask_high.to_le_bytes());
        }
        Ok(())
    }

    fn bar_slot_taken(&self, index: usize) -> bool {
        self.bars[index].is_some() || (index > 0 && self.bars[index - 1].is_some_and(|b| b.is_64bit))
    }

    /// The BARs declared.
    pub fn bars(&self) -> Vec<BarRequest> {
        self.bars.iter().flatten().copied().collect()
    }

    /// The address BAR `index` holds now (as the guest or the root complex wrote it).
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let bar = self.bars.get(usize::from(index)).copied().flatten()?;
        let reg = REG_BAR0 + 4 * usize::from(index);
        let lo = u64::from(self.u32_at(reg) & !0xf);
        let hi = if bar.is_64bit { u64::from(self.u32_at(reg + 4)) } else { 0 };
        Some(hi << 32 | lo)
    }

    /// Sets BAR `index`'s address (host side, e.g. the root complex's allocation);
    /// low bits below the BAR's size are dropped.
    pub fn set_bar_address(&mut self, index: u8, address: u64) {
        let Some(bar) = self.bars.get(usize::from(index)).copied().flatten() else {
            return;
        };
        let (low, high) = crate::split_u64(address & !(bar.size - 1));
        let reg = REG_BAR0 + 4 * usize::from(index);
        let flags = self.u32_at(reg) & 0xf;
        self.set_u32(reg, (low & !0xf) | flags);
        if bar.is_64bit {
            self.set_u32(reg + 4, high);
        }
    }

    /// Appends a capability: `id`, the next pointer (filled in), then `body`;
    /// `body_wmask` says which bits of each body byte the guest may write. Returns the
    /// capability's offset (dword aligned).
    pub fn add_capability(&mut self, id: u8, body: &[u8], body_wmask: &[u8]) -> Result<usize, ConfigError> {
        if body.len() != body_wmask.len() {
            return Err(ConfigError::CapabilityMask);
        }
        let len = 2 + body.len();
        let at = self.next_cap;
        if at + len > CAPS_END {
            return Err(ConfigError::CapabilitySpace(len));
        }
        self.regs[at] = id;
        self.regs[at + 1] = 0;
        self.regs[at + 2..at + len].copy_from_slice(body);
        self.wmask[at + 2..at + len].copy_from_slice(body_wmask);
        self.regs[self.last_cap_next] = u8::try_from(at).expect("capabilities end below CAPS_END (0x100)");
        self.last_cap_next = at + 1;
        self.next_cap = (at + len).div_ceil(4) * 4;
        let status = self.u16_at(REG_STATUS) | STATUS_CAPABILITIES;
        self.set_u16(REG_STATUS, status);
        Ok(at)
    }

    /// A guest read of `data.len()` bytes at `offset`; outside the space reads ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match self.regs.get(offset..offset.saturating_add(data.len())) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    /// A guest write: only writable bits change, RW1C bits clear where a 1 is written.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let Some(end) = offset.checked_add(data.len()).filter(|&e| e <= CONFIG_SPACE_SIZE) else {
            return;
        };
        for (i, &byte) in (offset..end).zip(data) {
            let mask = self.wmask[i];
            self.regs[i] = (self.regs[i] & !mask) | (byte & mask);
            self.regs[i] &= !(byte & self.w1c[i]);
        }
    }

    pub fn command(&self) -> u16 {
        self.u16_at(REG_COMMAND)
    }

    /// Host-side command register write (ignores the write mask).
    pub fn set_command(&mut self, command: u16) {
        self.set_u16(REG_COMMAND, command);
    }

    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.regs[at], self.regs[at + 1]])
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes([self.regs[at], self.regs[at + 1], self.regs[at + 2], self.regs[at + 3]])
    }

    /// Host-side register writes (ignore the write mask).
    pub fn set_u16(&mut self, at: usize, v: u16) {
        self.regs[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.regs[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
}

/// True if the access `[offset, offset + len)` overlaps `[start, start + size)`.
pub fn overlaps(offset: usize, len: usize, start: usize, size: usize) -> bool {
    offset < start + size && start < offset + len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds { vendor_id: 0x1af4, device_id: 0x1053, revision: 1, class: 0x00ff00, subsystem_vendor_id: 0x1af4, subsystem_id: 0x40 }
    }

    fn rd32(c: &ConfigSpace, at: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(at, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_ids_and_read_only_bits() {
        let mut c = ConfigSpace::new(ids());
        assert_eq!(rd32(&c, 0), 0x1053_1af4);
        assert_eq!(rd32(&c, 8), 0x00ff_0001);
        assert_eq!(rd32(&c, 0x2c), 0x0040_1af4);
        c.write(0, &[0xff; 4]);
        c.write(8, &[0; 4]);
        assert_eq!(rd32(&c, 0), 0x1053_1af4, "ids are read-only");
        assert_eq!(rd32(&c, 8), 0x00ff_0001);
        // Command: memory, bus master, INTx disable stick; I/O space (no I/O BARs) does not.
        c.write(REG_COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE);
        assert_eq!(c.u16_at(REG_STATUS), 0);
        // Status error bits are RW1C.
        c.set_u16(REG_STATUS, 0x8000 | STATUS_CAPABILITIES);
        c.write(REG_STATUS, &0x8000u16.to_le_bytes());
        assert_eq!(c.u16_at(REG_STATUS), STATUS_CAPABILITIES);
        assert_eq!(c.regs[REG_INTERRUPT_PIN], 0);
        // Out of range: ones, writes dropped.
        let mut b = [0u8; 4];
        c.read(4094, &mut b);
        assert_eq!(b, [0xff; 4]);
        c.write(4094, &[1, 2, 3, 4]);
    }

    #[test]
    fn bar_size_probing_reads_back_the_size_mask() {
        let mut c = ConfigSpace::new(ids());
        c.add_bar(BarRequest { index: 0, size: 0x4000, is_64bit: true, prefetchable: false }).unwrap();
        c.add_bar(BarRequest { index: 2, size: 0x1000, is_64bit: false, prefetchable: true }).unwrap();
        assert!(c.add_bar(BarRequest { index: 1, size: 0x1000, is_64bit: false, prefetchable: false }).is_err());
        assert!(c.add_bar(BarRequest { index: 5, size: 0x1000, is_64bit: true, prefetchable: false }).is_err());
        assert!(c.add_bar(BarRequest { index: 3, size: 0x1001, is_64bit: false, prefetchable: false }).is_err());
        c.set_bar_address(0, 0x1_2345_6000);
        assert_eq!(c.bar_address(0), Some(0x1_2345_4000));
        assert_eq!(rd32(&c, 0x10), 0x2345_4004);
        c.write(0x10, &[0xff; 4]);
        c.write(0x14, &[0xff; 4]);
        assert_eq!(rd32(&c, 0x10), 0xffff_c004);
        assert_eq!(rd32(&c, 0x14), 0xffff_ffff);
        c.write(0x18, &[0xff; 4]);
        assert_eq!(rd32(&c, 0x18), 0xffff_f008);
        // Unused BARs read 0 and stay 0.
        c.write(0x1c, &[0xff; 4]);
        assert_eq!(rd32(&c, 0x1c), 0);
        c.write(0x10, &0xc000_0000u32.to_le_bytes());
        c.write(0x14, &[0; 4]);
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        assert_eq!(c.bar_address(1), None);
        assert_eq!(c.bars().len(), 2);
    }

    #[test]
    fn capabilities_chain_from_0x34() {
        let mut c = ConfigSpace::new(ids());
        let a = c.add_capability(0x09, &[3, 4, 5], &[0, 0xff, 0]).unwrap();
        let b = c.add_capability(0x11, &[0; 10], &[0; 10]).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_ne!(c.u16_at(REG_STATUS) & STATUS_CAPABILITIES, 0);
        let mut walk = vec![];
        let mut p = c.regs[REG_CAPABILITIES] as usize;
        while p != 0 {
            walk.push((p, c.regs[p]));
            p = c.regs[p + 1] as usize;
        }
        assert_eq!(walk, [(0x40, 0x09), (0x48, 0x11)]);
        c.write(0x40, &[0xaa; 5]);
        assert_eq!(&c.regs[0x40..0x45], &[0x09, 0x48, 3, 0xaa, 5], "only the masked byte changes");
        assert!(c.add_capability(1, &[0; 200], &[0; 200]).is_err());
        assert!(c.add_capability(1, &[0; 2], &[0; 1]).is_err());
    }
}
