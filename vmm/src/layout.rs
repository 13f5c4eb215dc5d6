//! The guest physical address map (x86_64). RAM sits below the 32-bit hole and
//! continues above 4 GiB; the hole holds the PCI MMIO window (BARs of virtio and
//! VFIO devices), the PCIe ECAM, the IOAPIC and the LAPIC. Designed with hot-plug and
//! pass-through in mind: the 32-bit window is large enough for several VF BAR sets,
//! and a 64-bit window sits above the top of RAM.

/// The BIOS area at the top of the first MiB, reserved in the e820 map: the ACPI
/// tables ([`crate::acpi`]) and the SMBIOS tables ([`crate::smbios`]).
pub const BIOS_AREA_START: u64 = 0xE_0000;
pub const BIOS_AREA_SIZE: u64 = 0x2_0000;

/// Start of the 32-bit hole: RAM beyond this goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// PCI 32-bit MMIO window for BARs: [3 GiB, 3.5 GiB).
pub const PCI_MMIO32_START: u64 = 0xC000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCIe enhanced configuration space (ECAM/MMCONFIG): 1 MiB per bus, and one bus, the
/// root bus (devices and hot-plug slots all sit on it; there are no bridges). The
/// guest is told exactly this range (the MCFG's last bus, the host bridge's `_CRS`):
/// x86 Linux probes every bus up to the MCFG's last one for peer host bridges, through
/// port 0xCF8, which at 256 buses was ~16,500 port exits in a boot, measured in the lab.
pub const PCI_ECAM_START: u64 = 0xE000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
pub const IOAPIC_START: u64 = 0xFEC0_0000;
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// KVM's TSS and identity-map pages live just below the BIOS area at the top.
pub const KVM_TSS_ADDRESS: u64 = 0xFFFB_D000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xFFFB_C000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// The 64-bit PCI window starts this far above the top of RAM, aligned to 1 GiB.
pub const PCI_MMIO64_ALIGN: u64 = 0x4000_0000;
/// Size of the 64-bit PCI window (64 GiB: room for large VF BARs, and with RAM in
/// the tens of GiB still below 2^39, the smallest physical address width in use).
pub const PCI_MMIO64_SIZE: u64 = 0x10_0000_0000;

// The windows inside the hole do not overlap each other: checked at compile time.
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
const _: () = assert!(KVM_IDENTITY_MAP_ADDRESS + 0x1000 <= KVM_TSS_ADDRESS);
const _: () = assert!(crate::smbios::SMBIOS_START + crate::smbios::SMBIOS_AREA_SIZE <= BIOS_AREA_START + BIOS_AREA_SIZE);

/// `addr` as a 32-bit field (ACPI and MP tables, the zero page), for an address this
/// map puts below 4 GiB: one that is not is a layout bug, reported at the caller.
#[track_caller]
pub fn addr32(addr: u64) -> u32 {
    u32::try_from(addr).expect("an address the layout puts below 4 GiB")
}

/// The RAM ranges for `ram_bytes` of guest memory: (start, length).
pub fn ram_ranges(ram_bytes: u64) -> Vec<(u64, u64)> {
    if ram_bytes <= MMIO_HOLE_START {
        vec![(0, ram_bytes)]
    } else {
        vec![(0, MMIO_HOLE_START), (FOUR_GIB, ram_bytes - MMIO_HOLE_START)]
    }
}

/// Where the 64-bit PCI window starts for this much RAM.
pub fn pci_mmio64_start(ram_bytes: u64) -> u64 {
    let top = ram_ranges(ram_bytes).last().map(|(s, l)| s + l).unwrap_or(0).max(FOUR_GIB);
    top.div_ceil(PCI_MMIO64_ALIGN) * PCI_MMIO64_ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_ranges(512 << 20), [(0, 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), [(0, MMIO_HOLE_START)]);
        assert_eq!(ram_ranges(4 << 30), [(0, MMIO_HOLE_START), (FOUR_GIB, (4 << 30) - MMIO_HOLE_START)]);
        assert_eq!(pci_mmio64_start(512 << 20), FOUR_GIB);
        assert_eq!(pci_mmio64_start(4 << 30), 5 << 30);
    }
}
