use super::*;
use vfvm_protocols::vmm_api::AddressSpace;

/// A device with a config space, given BARs, recording BAR writes and mappings.
struct TestDevice {
    config: ConfigSpace,
    writes: Vec<(u8, u64, Vec<u8>)>,
    mapped: Vec<(u8, Option<u64>)>,
}

impl TestDevice {
    fn shared(bars: &[BarRequest]) -> Arc<Mutex<TestDevice>> {
        // Class 02.80 (other network controller).
        let mut config = ConfigSpace::new(PciIds { vendor_id: 0x1234, device_id: 0x5678, class: 0x02_80_00, ..Default::default() });
        for b in bars {
            config.add_bar(*b).unwrap();
        }
        Arc::new(Mutex::new(TestDevice { config, writes: vec![], mapped: vec![] }))
    }
}

impl PciDevice for TestDevice {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(usize::from(offset), data);
    }
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(usize::from(offset), data);
    }
    fn bars(&self) -> Vec<BarRequest> {
        self.config.bars()
    }
    fn read_bar(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        data.fill(index * 0x10 + offset.to_le_bytes()[0]);
    }
    fn write_bar(&mut self, index: u8, offset: u64, data: &[u8]) {
        self.writes.push((index, offset, data.to_vec()));
    }
    fn bar_mapped(&mut self, index: u8, base: Option<u64>) {
        self.mapped.push((index, base));
    }
}

fn bar(index: u8, size: u64, is_64bit: bool) -> BarRequest {
    BarRequest { index, size, is_64bit, prefetchable: false }
}

const RAM: u64 = 512 << 20;

struct Rig {
    root: Arc<Mutex<PciRoot>>,
    pio: Bus,
    mmio: Bus,
}

fn rig() -> Rig {
    let (pio, mmio) = (Bus::new(AddressSpace::Pio), Bus::new(AddressSpace::Mmio));
    let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone(), PciWindows::for_ram(RAM))));
    install(&root, &pio, &mmio).unwrap();
    Rig { root, pio, mmio }
}

impl Rig {
    fn cf8(&self, bus: u8, dev: u8, reg: u8) {
        let a = 0x8000_0000u32 | u32::from(bus) << 16 | u32::from(dev) << 11 | u32::from(reg & 0xfc);
        self.pio.write(0xcf8, &a.to_le_bytes());
    }
    fn pio_read32(&self, dev: u8, reg: u8) -> u32 {
        self.cf8(0, dev, reg);
        let mut b = [0u8; 4];
        assert!(self.pio.read(0xcfc, &mut b));
        u32::from_le_bytes(b)
    }
    fn pio_write32(&self, dev: u8, reg: u8, v: u32) {
        self.cf8(0, dev, reg);
        self.pio.write(0xcfc, &v.to_le_bytes());
    }
    fn ecam_read32(&self, bus: u64, dev: u64, func: u64, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.mmio.read(layout::PCI_ECAM_START + (bus << 20 | dev << 15 | func << 12 | reg), &mut b));
        u32::from_le_bytes(b)
    }
    fn ecam_write(&self, dev: u64, reg: u64, data: &[u8]) {
        self.mmio.write(layout::PCI_ECAM_START + (dev << 15 | reg), data);
    }
    fn mmio_read8(&self, addr: u64) -> Option<u8> {
        let mut b = [0u8; 1];
        self.mmio.read(addr, &mut b).then_some(b[0])
    }
}

#[test]
fn both_config_mechanisms_reach_a_device_and_absent_ones_read_ones() {
    let r = rig();
    // No host bridge function: slot 0 is empty.
    assert_eq!(r.pio_read32(0, 0), 0xffff_ffff);
    assert_eq!(r.ecam_read32(0, 0, 0, 0), 0xffff_ffff);
    assert!(matches!(r.root.lock().unwrap().add_device(TestDevice::shared(&[]), Some(0)), Err(PciError::BadSlot(0))));
    assert_eq!(r.root.lock().unwrap().add_device(TestDevice::shared(&[]), None).unwrap().device(), 1);
    assert_eq!(r.pio_read32(1, 0), 0x5678_1234);
    assert_eq!(r.ecam_read32(0, 1, 0, 0), 0x5678_1234);
    assert_eq!(r.pio_read32(3, 0), 0xffff_ffff);
    assert_eq!(r.ecam_read32(0, 3, 0, 0), 0xffff_ffff);
    assert_eq!(r.ecam_read32(0, 1, 1, 0), 0xffff_ffff, "function 1");
    // One bus: bus 1 lies beyond the ECAM (not decoded there) and reads ones through CF8.
    assert!(!r.mmio.read(layout::PCI_ECAM_START + (1 << 20), &mut [0u8; 4]), "bus 1 is beyond the ECAM");
    r.cf8(1, 0, 0);
    let mut bus1 = [0u8; 4];
    assert!(r.pio.read(0xcfc, &mut bus1));
    assert_eq!(bus1, [0xff; 4], "bus 1 through CF8");
    // The address register reads back; without the enable bit the data port reads ones.
    r.pio.write(0xcf8, &0x8000_0008u32.to_le_bytes());
    let mut b = [0u8; 4];
    r.pio.read(0xcf8, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_0008);
    r.pio.write(0xcf8, &0x0000_0000u32.to_le_bytes());
    r.pio.read(0xcfc, &mut b);
    assert_eq!(b, [0xff; 4]);
    // Byte and word reads at 0xCFC + n.
    r.cf8(0, 1, 0);
    let mut w = [0u8; 2];
    r.pio.read(0xcfe, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x5678);
    let mut one = [0u8; 1];
    r.pio.read(0xcfd, &mut one);
    assert_eq!(one[0], 0x12);
    // ECAM at a non-zero register, and a straddling access reads ones.
    assert_eq!(r.ecam_read32(0, 1, 0, 0x0a) & 0xffff, 0xffff);
    let mut w = [0u8; 2];
    r.mmio.read(layout::PCI_ECAM_START + (1 << 15) + 0x0a, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x0280);
}

#[test]
fn devices_get_aligned_bars_in_the_windows_mapped_on_the_bus() {
    let r = rig();
    let dev = TestDevice::shared(&[bar(0, 0x4000, true), bar(2, 0x1000, false)]);
    let addr = r.root.lock().unwrap().add_device(dev.clone(), None).unwrap();
    assert_eq!(addr, PciAddress::new(0, 0, 1, 0).unwrap());
    assert_eq!(addr.to_string(), "0000:00:01.0");
    let w = PciWindows::for_ram(RAM);
    let b0 = dev.lock().unwrap().config.bar_address(0).unwrap();
    let b2 = dev.lock().unwrap().config.bar_address(2).unwrap();
    assert_eq!(b0, w.mmio64.start, "64-bit BAR above 4 GiB");
    assert_eq!(b2, w.mmio32.start);
    assert_eq!(dev.lock().unwrap().mapped, [(0, Some(b0)), (2, Some(b2))]);
    assert_ne!(r.pio_read32(1, 4) & 2, 0, "memory decode on");
    assert_eq!(r.mmio_read8(b0 + 3), Some(3));
    assert_eq!(r.mmio_read8(b2 + 3), Some(0x23));
    r.mmio.write(b0 + 0x10, &[7, 8]);
    assert_eq!(dev.lock().unwrap().writes, [(0, 0x10, vec![7, 8])]);

    // A second device goes after the first, naturally aligned.
    let dev2 = TestDevice::shared(&[bar(0, 0x2000, false)]);
    assert_eq!(r.root.lock().unwrap().add_device(dev2.clone(), Some(5)).unwrap().device(), 5);
    assert_eq!(dev2.lock().unwrap().config.bar_address(0), Some(w.mmio32.start + 0x2000));
    assert_eq!(r.root.lock().unwrap().add_device(TestDevice::shared(&[]), Some(5)), Err(PciError::SlotTaken(5)));
    assert_eq!(r.root.lock().unwrap().add_device(TestDevice::shared(&[]), Some(0)), Err(PciError::BadSlot(0)));
    assert_eq!(r.root.lock().unwrap().add_device(TestDevice::shared(&[]), Some(32)), Err(PciError::BadSlot(32)));

    // Hot-unplug frees the slot and the space; the next device reuses both.
    r.root.lock().unwrap().remove_device(5).unwrap();
    assert_eq!(r.mmio_read8(w.mmio32.start + 0x2000), None);
    assert_eq!(dev2.lock().unwrap().mapped.last(), Some(&(0, None)));
    assert_eq!(r.root.lock().unwrap().remove_device(5).err(), Some(PciError::SlotEmpty(5)));
    let dev3 = TestDevice::shared(&[bar(0, 0x2000, false)]);
    r.root.lock().unwrap().add_device(dev3.clone(), Some(5)).unwrap();
    assert_eq!(dev3.lock().unwrap().config.bar_address(0), Some(w.mmio32.start + 0x2000));
}

#[test]
fn the_guest_probes_and_moves_bars_and_the_bus_follows() {
    let r = rig();
    let dev = TestDevice::shared(&[bar(0, 0x1000, false)]);
    r.root.lock().unwrap().add_device(dev.clone(), Some(2)).unwrap();
    let old = layout::PCI_MMIO32_START;
    assert_eq!(r.mmio_read8(old), Some(0));

    // Linux's way: decode off, all ones, read the mask, restore, decode on.
    let cmd = r.pio_read32(2, 4) & 0xffff;
    r.pio_write32(2, 4, cmd & !2);
    assert_eq!(r.mmio_read8(old), None, "decode off: off the bus");
    r.pio_write32(2, 0x10, 0xffff_ffff);
    assert_eq!(r.pio_read32(2, 0x10), 0xffff_f000);
    r.pio_write32(2, 0x10, u32::try_from(old).unwrap());
    r.pio_write32(2, 4, cmd);
    assert_eq!(r.mmio_read8(old), Some(0));

    // Probing with decode on: the BAR leaves the bus for the probe, never lands at 0xFFFFF000.
    r.ecam_write(2, 0x10, &0xffff_ffffu32.to_le_bytes());
    assert_eq!(r.mmio_read8(0xffff_f000), None);
    assert_eq!(r.mmio_read8(old), None);
    // A new address in the window: mapped there.
    let new = layout::PCI_MMIO32_START + 0x10_0000;
    r.ecam_write(2, 0x10, &u32::try_from(new).unwrap().to_le_bytes());
    assert_eq!(r.mmio_read8(new + 5), Some(5));
    assert_eq!(r.mmio_read8(old), None);
    assert_eq!(dev.lock().unwrap().mapped.last(), Some(&(0, Some(new))));
    // Outside the windows (in RAM): refused, off the bus.
    r.ecam_write(2, 0x10, &0x10_0000u32.to_le_bytes());
    assert_eq!(r.mmio_read8(0x10_0000), None);
    // New devices avoid the range the guest chose.
    r.ecam_write(2, 0x10, &u32::try_from(new).unwrap().to_le_bytes());
    let dev2 = TestDevice::shared(&[bar(0, 0x20_0000, false)]);
    r.root.lock().unwrap().add_device(dev2.clone(), None).unwrap();
    assert_eq!(dev2.lock().unwrap().config.bar_address(0), Some(old + 0x20_0000));
}

#[test]
fn full_bus_and_full_windows_are_typed_errors() {
    let r = rig();
    let mut root = r.root.lock().unwrap();
    let too_big = TestDevice::shared(&[bar(0, 1 << 31, false)]);
    assert_eq!(root.add_device(too_big, None), Err(PciError::NoBarSpace { index: 0, size: 1 << 31 }));
    assert!(root.device(1).is_none(), "nothing left behind");
    for _ in 1..NUM_SLOTS {
        root.add_device(TestDevice::shared(&[]), None).unwrap();
    }
    assert_eq!(root.add_device(TestDevice::shared(&[]), None), Err(PciError::BusFull));
}

#[test]
fn find_free_is_first_fit_and_aligned() {
    let w = Window { start: 0x1000, size: 0x10000 };
    assert_eq!(find_free(w, 0x1000, &[]), Some(0x1000));
    assert_eq!(find_free(w, 0x2000, &[]), Some(0x2000));
    assert_eq!(find_free(w, 0x1000, &[(0x1000, 0x1000), (0x3000, 0x1000)]), Some(0x2000));
    assert_eq!(find_free(w, 0x8000, &[(0x9000, 0x10)]), None);
    assert_eq!(find_free(w, 0x20000, &[]), None);
}
