//! ACPI tables, hand-written: how a Linux guest finds its CPUs and interrupt
//! controllers (MADT) and how it powers off (FADT's PM1a control block plus the
//! DSDT's `\_S5` sleep type). Full (not hardware-reduced) ACPI, so that power-off is
//! the classic SLP_TYP|SLP_EN write to PM1a_CNT that [`crate::power`] turns into a
//! VMM exit.
//!
//! Everything lives in the BIOS area, which the e820 map from [`crate::boot`] marks
//! reserved:
//!
//! | address  | what                                                            |
//! |----------|-----------------------------------------------------------------|
//! | 0xE0000  | RSDP (revision 2: XSDT only), where Linux scans for it          |
//! | 0xE0040  | FACS (64-byte aligned; no waking vector, global lock unused)    |
//! | then     | XSDT -> FADT, MADT, MCFG, SRAT; FADT -> DSDT, FACS; 16-aligned  |
//!
//! Platform choices the tables describe:
//! - PM1a_EVT_BLK: PIO 0x600, 4 bytes, with the fixed-feature power button;
//!   PM1a_CNT_BLK: PIO 0x604, 2 bytes; no PM timer, no GPE blocks, no SMI_CMD (the
//!   machine is always in ACPI mode).
//! - Reset register: the i8042 command port 0x64, value 0xFE (the device in
//!   [`crate::power`]).
//! - SCI on IRQ 9, level-triggered active-high (raised by the power button). KVM's
//!   in-kernel IOAPIC does no polarity inversion, so "asserted" is a high line, as
//!   QEMU describes it under KVM.
//! - ISA IRQs go to the IOAPIC pin of the same number (KVM's default GSI routing
//!   delivers the PIT on GSI 0, pin 0): the MADT has no IRQ0 -> GSI 2 override, which
//!   would point Linux at a pin nothing drives. The only override is the SCI's.
//! - IOAPIC id = the number of vCPUs (after the LAPIC ids), as in the MP table, which
//!   stays for guests booted with `acpi=off`.
//! - PCI: `\_SB.PCI0` (PNP0A08, segment 0, the ECAM's buses) with the config ports
//!   0xCF8..0xCFF and the two memory windows of [`PciWindows::for_ram`] in its
//!   `_CRS`; the MCFG points at the ECAM for the buses it covers (bus 0 only), which `\_SB.MRES`
//!   (PNP0C02) and the e820 map both reserve. No `_PRT`: PCI devices use MSI-X.
//! - NUMA: an SRAT with one proximity domain holding every vCPU and all RAM. Without
//!   one, x86 Linux falls back to looking for an AMD northbridge, reading the vendor
//!   ID of all 32 slots of bus 0 through 0xCF8 (64 port exits) on any CPU vendor.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{self, addr32, IOAPIC_START, LAPIC_START, PCI_ECAM_SIZE, PCI_ECAM_START};
use crate::mptable::MAX_CPUS;
use crate::pci::{PciWindows, CONFIG_ADDRESS_PORT};
use crate::power::{I8042_COMMAND_PORT, PM1A_CNT_PORT, PM1A_EVT_PORT};

/// The RSDP, and the tables after it, in the BIOS area.
pub const RSDP_START: u64 = 0xE_0000;
/// The part of the BIOS area for the tables (below the SMBIOS tables).
pub const ACPI_AREA_START: u64 = layout::BIOS_AREA_START;
pub const ACPI_AREA_SIZE: u64 = 0x1_0000;
const _: () = assert!(ACPI_AREA_START + ACPI_AREA_SIZE <= crate::smbios::SMBIOS_START);
/// The SCI's ISA IRQ (and GSI).
pub const SCI_IRQ: u8 = 9;
/// `\_S5`'s SLP_TYP (any value does: the VMM powers off on SLP_EN alone).
pub const S5_SLP_TYP: u8 = 5;

const OEM_ID: &[u8; 6] = b"VFVM  ";
const CREATOR_ID: &[u8; 4] = b"VFVM";
const HEADER_LEN: usize = 36;
const FADT_LEN: usize = 276;
const FACS_LEN: usize = 64;
const RSDP_LEN: usize = 36;
const PM1_EVT_LEN: u8 = 4;
const PM1_CNT_LEN: u8 = 2;

// FADT flags.
const FADT_WBINVD: u32 = 1 << 0;
const FADT_PROC_C1: u32 = 1 << 2;
// PWR_BUTTON (bit 4) stays clear: the power button is the fixed-feature one in
// PM1a_EVT, which the control API's graceful shutdown presses.
const FADT_SLP_BUTTON: u32 = 1 << 5; // no fixed-feature sleep button
const FADT_RESET_REG_SUP: u32 = 1 << 10;
// IA-PC boot architecture flags: ISA devices (COM1, CMOS) exist; no VGA. The i8042
// flag stays clear: there is no keyboard controller, only its reset command.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
// No CMOS RTC for the guest to drive: it takes the wall clock from kvmclock, and Linux
// then registers no rtc-cmos device, whose probe and clock read cost ~110 port exits.
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

// Generic address structure: address spaces and access sizes.
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;

// MADT.
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LAPIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_ISO: u8 = 2;
const MADT_LAPIC_NMI: u8 = 4;
const LAPIC_ENABLED: u32 = 1;
// SRAT.
const SRAT_LAPIC_AFFINITY: u8 = 0;
const SRAT_MEMORY_AFFINITY: u8 = 1;
const SRAT_ENABLED: u32 = 1;

/// MPS INTI flags: active-high polarity (01), level trigger (11 << 2).
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0b1101;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables for 1..={MAX_CPUS} CPUs, not {0}")]
    Cpus(u8),
    #[error("the ACPI tables ({0} bytes) do not fit the BIOS area")]
    TooLarge(usize),
    #[error("writing the ACPI tables: {0}")]
    Memory(String),
}

/// Makes `bytes` sum to 0 (mod 256) by setting the byte at `at`.
fn set_checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    bytes[at] = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg();
}

/// A system description table: the 36-byte header, then `body`; length and
/// checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, table_id: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&u32::try_from(len).expect("tables fit the 128 KiB ACPI area").to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(table_id);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    set_checksum(&mut t, 9);
    t
}

/// A generic address structure (12 bytes).
fn gas(space: u8, bit_width: u8, access: u8, address: u64) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = space;
    g[1] = bit_width;
    g[2] = 0; // bit offset
    g[3] = access;
    g[4..].copy_from_slice(&address.to_le_bytes());
    g
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// The FADT (revision 6, ACPI 6.0 layout): PM1a blocks, reset register, SCI, DSDT.
/// SMI_CMD and ACPI_ENABLE/DISABLE stay 0: the machine is always in ACPI mode.
fn fadt(dsdt: u64, facs: u32) -> Vec<u8> {
    let mut b = vec![0u8; FADT_LEN - HEADER_LEN];
    // Offsets below are the specification's, from the table start.
    let mut at = |off: usize, bytes: &[u8]| put(&mut b, off - HEADER_LEN, bytes);
    // FIRMWARE_CTRL only: the spec wants X_FIRMWARE_CTRL zero when it is set, and
    // ACPICA would load the FACS twice from both.
    at(36, &facs.to_le_bytes()); // FIRMWARE_CTRL
    at(40, &addr32(dsdt).to_le_bytes()); // DSDT
    at(46, &u16::from(SCI_IRQ).to_le_bytes()); // SCI_INT
    at(56, &u32::try_from(PM1A_EVT_PORT).expect("a PIO port").to_le_bytes()); // PM1a_EVT_BLK
    at(64, &u32::try_from(PM1A_CNT_PORT).expect("a PIO port").to_le_bytes()); // PM1a_CNT_BLK
    at(88, &[PM1_EVT_LEN, PM1_CNT_LEN]); // PM1_EVT_LEN, PM1_CNT_LEN; the rest 0
    at(96, &101u16.to_le_bytes()); // P_LVL2_LAT > 100: no C2
    at(98, &1001u16.to_le_bytes()); // P_LVL3_LAT > 1000: no C3
    at(109, &(IAPC_LEGACY_DEVICES | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).to_le_bytes());
    let flags = FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RESET_REG_SUP;
    at(112, &flags.to_le_bytes());
    at(116, &gas(GAS_SYSTEM_IO, 8, GAS_ACCESS_BYTE, I8042_COMMAND_PORT)); // RESET_REG
    at(128, &[0xfe]); // RESET_VALUE
    at(131, &[0]); // FADT minor version: 6.0
    at(140, &dsdt.to_le_bytes()); // X_DSDT
    at(148, &gas(GAS_SYSTEM_IO, PM1_EVT_LEN * 8, 0, PM1A_EVT_PORT)); // X_PM1a_EVT_BLK
    at(172, &gas(GAS_SYSTEM_IO, PM1_CNT_LEN * 8, 0, PM1A_CNT_PORT)); // X_PM1a_CNT_BLK
    at(268, b"VFVM-KVM"); // hypervisor vendor identity
    sdt(b"FACP", 6, b"VFVMFACP", &b)
}

/// The FACS: no checksum, 64 bytes, 64-byte aligned.
fn facs() -> Vec<u8> {
    let mut f = vec![0u8; FACS_LEN];
    f[..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&u32::try_from(FACS_LEN).expect("64 bytes").to_le_bytes());
    f[32] = 2; // version
    f
}

/// An AML PkgLength for `body_len` bytes after it (the encoding counts itself).
fn aml_pkg_length(body_len: usize) -> Vec<u8> {
    if body_len + 1 < 0x40 {
        return vec![u8::try_from(body_len + 1).expect("below 0x40")];
    }
    for extra in 1..=3u8 {
        let extra_len = usize::from(extra);
        let total = body_len + 1 + extra_len;
        if total < 1 << (4 + 8 * extra_len) {
            // Lead byte: the count of extra bytes and the low nibble; then the rest of
            // the length, least significant byte first.
            let mut v = vec![(extra << 6) | (total.to_le_bytes()[0] & 0xf)];
            v.extend_from_slice(&(total >> 4).to_le_bytes()[..extra_len]);
            return v;
        }
    }
    unreachable!("AML packages are far below 256 MiB here")
}

/// `op PkgLength body`.
fn aml_pkg(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = op.to_vec();
    v.extend(aml_pkg_length(body.len()));
    v.extend_from_slice(body);
    v
}

/// `Name(name, value)` with an already-encoded value.
fn aml_name(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08]; // NameOp
    v.extend_from_slice(name);
    v.extend_from_slice(value);
    v
}

/// An integer constant: ZeroOp, OneOp, or the smallest prefixed form.
fn aml_int(n: u32) -> Vec<u8> {
    match n {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, n.to_le_bytes()[0]],
        0x100..=0xffff => [&[0x0b][..], &n.to_le_bytes()[..2]].concat(),
        _ => [&[0x0c][..], &n.to_le_bytes()].concat(),
    }
}

/// An `EISAID("AAA####")` as the 32-bit compressed id AML stores (DWordPrefix).
fn aml_eisaid(id: &[u8; 7]) -> Vec<u8> {
    let c = |i: usize| u16::from(id[i].wrapping_sub(0x40) & 0x1f);
    let hex = |i: usize| char::from(id[i]).to_digit(16).map_or(0, |d| u8::try_from(d).expect("a hex digit"));
    let vendor = (c(0) << 10 | c(1) << 5 | c(2)).to_be_bytes();
    let product = [hex(3) << 4 | hex(4), hex(5) << 4 | hex(6)];
    vec![0x0c, vendor[0], vendor[1], product[0], product[1]]
}

/// `Name(_CRS, ResourceTemplate() { descriptors })`: a buffer ending with the
/// end tag (checksum 0).
fn aml_crs(descriptors: &[u8]) -> Vec<u8> {
    let mut bytes = descriptors.to_vec();
    bytes.extend_from_slice(&[0x79, 0x00]); // End Tag
    let mut body = aml_int(u32::try_from(bytes.len()).expect("a resource template of a few descriptors"));
    body.extend(bytes);
    aml_name(b"_CRS", &aml_pkg(&[0x11], &body)) // BufferOp
}

// Address space descriptor general flags: MinFixed, MaxFixed, producer, positive decode.
const ADDR_FIXED: u8 = 0b1100;

/// WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, len).
fn word_bus_number(min: u16, max: u16) -> Vec<u8> {
    let mut d = vec![0x88, 13, 0, 2, ADDR_FIXED, 0];
    for v in [0, min, max, 0, max - min + 1] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    d
}

/// IO(Decode16, base, base, 1, len).
fn io_port(base: u16, len: u8) -> Vec<u8> {
    let mut d = vec![0x47, 1];
    d.extend_from_slice(&base.to_le_bytes());
    d.extend_from_slice(&base.to_le_bytes());
    d.extend_from_slice(&[1, len]);
    d
}

/// DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite).
fn dword_memory(start: u32, len: u32) -> Vec<u8> {
    let mut d = vec![0x87, 23, 0, 0, ADDR_FIXED, 0x01];
    for v in [0, start, start + (len - 1), 0, len] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    d
}

/// QWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite).
fn qword_memory(start: u64, len: u64) -> Vec<u8> {
    let mut d = vec![0x8a, 43, 0, 0, ADDR_FIXED, 0x01];
    for v in [0, start, start + (len - 1), 0, len] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    d
}

/// Memory32Fixed(ReadWrite, base, len).
fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
    let mut d = vec![0x86, 9, 0, 1];
    d.extend_from_slice(&base.to_le_bytes());
    d.extend_from_slice(&len.to_le_bytes());
    d
}

/// The last bus the ECAM covers (1 MiB per bus, at most 256 buses).
const ECAM_LAST_BUS: u8 = {
    let last = (PCI_ECAM_SIZE >> 20) - 1;
    assert!(last <= 0xff, "the ECAM covers at most 256 buses");
    last.to_le_bytes()[0]
};

/// `\_SB.PCI0`, the root bridge, and `\_SB.MRES`, the motherboard resource
/// reserving the ECAM.
fn pci_devices(windows: &PciWindows) -> Vec<u8> {
    let mut pci0 = b"PCI0".to_vec();
    pci0.extend(aml_name(b"_HID", &aml_eisaid(b"PNP0A08")));
    pci0.extend(aml_name(b"_CID", &aml_eisaid(b"PNP0A03")));
    pci0.extend(aml_name(b"_SEG", &aml_int(0)));
    pci0.extend(aml_name(b"_BBN", &aml_int(0)));
    pci0.extend(aml_name(b"_UID", &aml_int(0)));
    let mut crs = word_bus_number(0, u16::from(ECAM_LAST_BUS));
    crs.extend(io_port(u16::try_from(CONFIG_ADDRESS_PORT).expect("a PIO port"), 8));
    crs.extend(dword_memory(addr32(windows.mmio32.start), addr32(windows.mmio32.size)));
    crs.extend(qword_memory(windows.mmio64.start, windows.mmio64.size));
    pci0.extend(aml_crs(&crs));
    let mut out = aml_pkg(&[0x5b, 0x82], &pci0); // DeviceOp

    let mut mres = b"MRES".to_vec();
    mres.extend(aml_name(b"_HID", &aml_eisaid(b"PNP0C02")));
    mres.extend(aml_name(b"_UID", &aml_int(0)));
    mres.extend(aml_crs(&memory32_fixed(addr32(PCI_ECAM_START), addr32(PCI_ECAM_SIZE))));
    out.extend(aml_pkg(&[0x5b, 0x82], &mres));
    out
}

/// The MCFG: one ECAM allocation, segment 0, buses 0..=[`ECAM_LAST_BUS`].
fn mcfg() -> Vec<u8> {
    let mut b = vec![0u8; 8]; // reserved
    b.extend_from_slice(&PCI_ECAM_START.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes()); // segment
    b.extend_from_slice(&[0, ECAM_LAST_BUS]);
    b.extend_from_slice(&[0; 4]);
    sdt(b"MCFG", 1, b"VFVMMCFG", &b)
}

/// The DSDT: `\_S5` (SLP_TYPa, SLP_TYPb and two reserved zeros), one processor
/// device (`_HID` ACPI0007, `_UID` = the MADT's processor UID) per vCPU under `\_SB`,
/// and the PCI root bridge.
fn dsdt(cpus: u8, windows: &PciWindows) -> Vec<u8> {
    let mut aml = Vec::new();
    let s5 = [&[4u8][..], &aml_int(u32::from(S5_SLP_TYP)), &[0x00, 0x00, 0x00]].concat();
    aml.extend(aml_name(b"_S5_", &aml_pkg(&[0x12], &s5))); // PackageOp, 4 elements
    let mut sb = b"_SB_".to_vec();
    for id in 0..cpus {
        let name = format!("C{id:03X}");
        let mut dev = name.as_bytes().to_vec();
        dev.extend(aml_name(b"_HID", b"\x0dACPI0007\x00")); // StringPrefix
        dev.extend(aml_name(b"_UID", &aml_int(u32::from(id))));
        sb.extend(aml_pkg(&[0x5b, 0x82], &dev)); // DeviceOp
    }
    sb.extend(pci_devices(windows));
    aml.extend(aml_pkg(&[0x10], &sb)); // ScopeOp
    sdt(b"DSDT", 2, b"VFVMDSDT", &aml)
}

/// The MADT: one enabled local APIC per vCPU, the IOAPIC (GSI base 0), the SCI's
/// interrupt source override and LINT1 as NMI on every CPU.
fn madt(cpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&addr32(LAPIC_START).to_le_bytes());
    b.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..cpus {
        b.extend_from_slice(&[MADT_LAPIC, 8, id, id]);
        b.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    }
    b.extend_from_slice(&[MADT_IOAPIC, 12, cpus, 0]);
    b.extend_from_slice(&addr32(IOAPIC_START).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    b.extend_from_slice(&[MADT_ISO, 10, 0, SCI_IRQ]);
    b.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
    b.extend_from_slice(&INTI_ACTIVE_HIGH_LEVEL.to_le_bytes());
    b.extend_from_slice(&[MADT_LAPIC_NMI, 6, 0xff, 0, 0, 1]); // all CPUs, flags 0, LINT1
    sdt(b"APIC", 5, b"VFVMAPIC", &b)
}

/// The SRAT: proximity domain 0 for every vCPU's local APIC and every RAM range
/// (`(start, length)` of guest memory).
fn srat(cpus: u8, ram: &[(u64, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&1u32.to_le_bytes()); // reserved, 1 for compatibility
    b.extend_from_slice(&[0; 8]);
    for id in 0..cpus {
        // Type, length, domain bits 7:0, APIC id, flags, SAPIC EID, domain bits
        // 31:8, clock domain.
        b.extend_from_slice(&[SRAT_LAPIC_AFFINITY, 16, 0, id]);
        b.extend_from_slice(&SRAT_ENABLED.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
    }
    for &(start, len) in ram {
        b.extend_from_slice(&[SRAT_MEMORY_AFFINITY, 40]);
        b.extend_from_slice(&0u32.to_le_bytes()); // proximity domain
        b.extend_from_slice(&[0; 2]);
        b.extend_from_slice(&start.to_le_bytes()); // base, low then high dword
        b.extend_from_slice(&len.to_le_bytes()); // length, low then high dword
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&SRAT_ENABLED.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
    }
    sdt(b"SRAT", 3, b"VFVMSRAT", &b)
}

fn xsdt(tables: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = tables.iter().flat_map(|a| a.to_le_bytes()).collect();
    sdt(b"XSDT", 1, b"VFVMXSDT", &body)
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RSDP_LEN);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum over the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&u32::try_from(RSDP_LEN).expect("36 bytes").to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.push(0); // extended checksum over all 36
    r.extend_from_slice(&[0; 3]);
    set_checksum(&mut r[..20], 8);
    set_checksum(&mut r, 32);
    r
}

/// The whole area as it goes at [`RSDP_START`]: the RSDP first, then the tables,
/// for a guest with RAM at `ram` (`(start, length)` ranges; their total places the
/// 64-bit PCI window).
pub fn acpi_bytes(cpus: u8, ram: &[(u64, u64)]) -> Result<Vec<u8>, AcpiError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(AcpiError::Cpus(cpus));
    }
    let ram_bytes = ram.iter().map(|&(_, len)| len).sum();
    let base = RSDP_START;
    let mut area = vec![0u8; 0x40]; // the RSDP, written last
    let place = |area: &mut Vec<u8>, bytes: &[u8], align: usize| -> u64 {
        area.resize(area.len().div_ceil(align) * align, 0);
        let addr = base + area.len() as u64;
        area.extend_from_slice(bytes);
        addr
    };
    let facs_addr = place(&mut area, &facs(), 64);
    let windows = PciWindows::for_ram(ram_bytes);
    let dsdt_addr = place(&mut area, &dsdt(cpus, &windows), 16);
    let fadt_addr = place(&mut area, &fadt(dsdt_addr, addr32(facs_addr)), 16);
    let madt_addr = place(&mut area, &madt(cpus), 16);
    let mcfg_addr = place(&mut area, &mcfg(), 16);
    let srat_addr = place(&mut area, &srat(cpus, ram), 16);
    let xsdt_addr = place(&mut area, &xsdt(&[fadt_addr, madt_addr, mcfg_addr, srat_addr]), 16);
    area[..RSDP_LEN].copy_from_slice(&rsdp(xsdt_addr));
    if area.len() as u64 > ACPI_AREA_SIZE {
        return Err(AcpiError::TooLarge(area.len()));
    }
    Ok(area)
}

/// Writes the tables for `cpus` vCPUs; returns the RSDP's address. The PCI windows
/// and the SRAT follow from the RAM in `memory` ([`PciWindows::for_ram`] of its
/// total size).
pub fn write_acpi_tables(memory: &GuestMemoryMmap, cpus: u8) -> Result<u64, AcpiError> {
    let ram: Vec<(u64, u64)> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let bytes = acpi_bytes(cpus, &ram)?;
    memory.write_slice(&bytes, GuestAddress(RSDP_START)).map_err(|e| AcpiError::Memory(e.to_string()))?;
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table at guest address `addr` in guest memory, its signature and length
    /// and checksum checked.
    fn table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let mut head = [0u8; 8];
        mem.read_slice(&mut head, GuestAddress(addr)).unwrap_or_else(|e| panic!("{sig:?} at {addr:#x}: {e}"));
        assert_eq!(&head[..4], sig, "signature at {addr:#x}");
        let len = u32_at(&head, 4) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        assert!(addr >= ACPI_AREA_START && addr + len as u64 <= ACPI_AREA_START + ACPI_AREA_SIZE);
        if sig != b"FACS" {
            assert_eq!(sum(&t), 0, "{sig:?} checksum");
        }
        t
    }

    #[test]
    fn pointers_resolve_and_checksums_hold() {
        for cpus in [1u8, 2, 7, MAX_CPUS] {
            let mem = crate::memory::guest_memory(64 << 20, crate::memory::Backing::Private).unwrap();
            assert_eq!(write_acpi_tables(&mem, cpus).unwrap(), 0xE0000);

            let mut r = [0u8; RSDP_LEN];
            mem.read_slice(&mut r, GuestAddress(RSDP_START)).unwrap();
            assert_eq!(&r[..8], b"RSD PTR ");
            assert_eq!(sum(&r[..20]), 0);
            assert_eq!(sum(&r), 0);
            assert_eq!((r[15], u32_at(&r, 20)), (2, 36));
            assert_eq!(RSDP_START % 16, 0);

            let x = table(&mem, u64_at(&r, 24), b"XSDT");
            assert_eq!(x.len(), 36 + 32);
            // SRAT: every vCPU's APIC and the RAM in proximity domain 0.
            let srat = table(&mem, u64_at(&x, 60), b"SRAT");
            assert_eq!((srat[8], u32_at(&srat, 36)), (3, 1));
            assert_eq!(srat.len(), 48 + 16 * cpus as usize + 40);
            for id in 0..cpus {
                let e = &srat[48 + 16 * id as usize..][..16];
                assert_eq!((e[0], e[1], e[2], e[3], u32_at(e, 4), &e[9..12]), (0, 16, 0, id, 1, &[0u8, 0, 0][..]));
            }
            let m = &srat[48 + 16 * cpus as usize..];
            assert_eq!((m[0], m[1], u32_at(m, 2), u64_at(m, 8), u64_at(m, 16), u32_at(m, 28)), (1, 40, 0, 0, 64 << 20, 1));
            let mcfg = table(&mem, u64_at(&x, 52), b"MCFG");
            assert_eq!((mcfg.len(), mcfg[8]), (60, 1));
            assert_eq!((u64_at(&mcfg, 44), &mcfg[52..56]), (0xE000_0000, &[0u8, 0, 0, 0][..]), "segment 0, buses 0..=0");
            let fadt = table(&mem, u64_at(&x, 36), b"FACP");
            let madt = table(&mem, u64_at(&x, 44), b"APIC");

            assert_eq!((fadt.len(), fadt[8]), (276, 6));
            let dsdt_addr = u64_at(&fadt, 140);
            assert_eq!(u64::from(u32_at(&fadt, 40)), dsdt_addr);
            let dsdt = table(&mem, dsdt_addr, b"DSDT");
            let facs_addr = u64::from(u32_at(&fadt, 36));
            assert_eq!(u64_at(&fadt, 132), 0, "X_FIRMWARE_CTRL: zero, FIRMWARE_CTRL is set");
            assert_eq!(facs_addr % 64, 0);
            assert_eq!(table(&mem, facs_addr, b"FACS").len(), 64);
            // PM1 blocks, SCI, reset register, flags.
            assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9);
            assert_eq!(u32_at(&fadt, 48), 0, "no SMI_CMD");
            assert_eq!((u32_at(&fadt, 56), u32_at(&fadt, 64)), (0x600, 0x604));
            assert_eq!((fadt[88], fadt[89], fadt[91]), (4, 2, 0));
            assert_eq!(&fadt[148..152], &[1, 32, 0, 0]);
            assert_eq!(u64_at(&fadt, 152), 0x600);
            assert_eq!(&fadt[172..176], &[1, 16, 0, 0]);
            assert_eq!(u64_at(&fadt, 176), 0x604);
            assert_eq!((&fadt[116..120], u64_at(&fadt, 120), fadt[128]), (&[1u8, 8, 0, 1][..], 0x64, 0xfe));
            let flags = u32_at(&fadt, 112);
            assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
            assert_ne!(flags & (1 << 10), 0, "reset register supported");

            // DSDT: Name(_S5_, Package(4) {5, 0, 0, 0}) and a processor device per vCPU.
            let s5 = [0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00];
            assert!(dsdt.windows(s5.len()).any(|w| w == s5), "no _S5_ package");
            assert_eq!(dsdt.windows(8).filter(|w| w == b"ACPI0007").count(), cpus as usize);
            // PCI0: _HID EISAID("PNP0A08"), _CID EISAID("PNP0A03"), the windows.
            let find = |needle: &[u8]| dsdt.windows(needle.len()).position(|w| w == needle);
            assert!(find(b"PCI0").is_some());
            assert!(find(&[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x08]).is_some());
            assert!(find(&[0x08, b'_', b'C', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x03]).is_some());
            assert!(find(&[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0c, 0x02]).is_some(), "PNP0C02");
            assert!(find(&word_bus_number(0, 0)).is_some());
            assert!(find(&dword_memory(0xC000_0000, 0x2000_0000)).is_some());
            assert!(find(&qword_memory(1 << 32, crate::layout::PCI_MMIO64_SIZE)).is_some());
            assert!(find(&memory32_fixed(0xE000_0000, 0x10_0000)).is_some());

            // MADT: LAPIC address, one LAPIC per vCPU, the IOAPIC, the SCI override.
            assert_eq!((u32_at(&madt, 36), madt[8]), (0xFEE0_0000, 5));
            let mut entries = Vec::new();
            let mut at = 44;
            while at < madt.len() {
                let len = madt[at + 1] as usize;
                assert!(len >= 2 && at + len <= madt.len());
                entries.push(madt[at..at + len].to_vec());
                at += len;
            }
            assert_eq!(at, madt.len());
            let lapics: Vec<_> = entries.iter().filter(|e| e[0] == 0).collect();
            assert_eq!(lapics.len(), cpus as usize);
            for (id, e) in lapics.iter().enumerate() {
                let id = u8::try_from(id).unwrap();
                assert_eq!((e[1], e[2], e[3], u32_at(e, 4)), (8, id, id, 1));
            }
            let ioapics: Vec<_> = entries.iter().filter(|e| e[0] == 1).collect();
            assert_eq!(ioapics.len(), 1);
            assert_eq!((ioapics[0][2], u32_at(ioapics[0], 4), u32_at(ioapics[0], 8)), (cpus, 0xFEC0_0000, 0));
            let isos: Vec<_> = entries.iter().filter(|e| e[0] == 2).collect();
            assert_eq!(isos, [&vec![2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0]]);
        }
        assert!(acpi_bytes(0, &[(0, 64 << 20)]).is_err());
        assert!(acpi_bytes(MAX_CPUS + 1, &[(0, 64 << 20)]).is_err());
    }

    /// RAM on both sides of the 32-bit hole: one memory affinity entry each.
    #[test]
    fn srat_lists_every_ram_range() {
        let t = srat(1, &[(0, 3 << 30), (1 << 32, 1 << 30)]);
        assert_eq!(t.len(), 48 + 16 + 2 * 40);
        let second = &t[48 + 16 + 40..];
        assert_eq!((second[0], u64_at(second, 8), u64_at(second, 16)), (1, 1 << 32, 1 << 30));
    }

    #[test]
    fn resource_templates_encode_as_the_spec_says() {
        assert_eq!(aml_eisaid(b"PNP0A08"), [0x0c, 0x41, 0xd0, 0x0a, 0x08]);
        assert_eq!(aml_eisaid(b"PNP0C02"), [0x0c, 0x41, 0xd0, 0x0c, 0x02]);
        assert_eq!(word_bus_number(0, 255), [0x88, 13, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0xff, 0, 0, 0, 0, 1]);
        assert_eq!(io_port(0xcf8, 8), [0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]);
        let d = dword_memory(0xC000_0000, 0x2000_0000);
        assert_eq!((d.len(), &d[..6]), (26, &[0x87, 23, 0, 0, 0x0c, 1][..]));
        assert_eq!(&d[10..14], &0xC000_0000u32.to_le_bytes());
        assert_eq!(&d[14..18], &0xDFFF_FFFFu32.to_le_bytes());
        assert_eq!(&d[22..26], &0x2000_0000u32.to_le_bytes());
        let q = qword_memory(1 << 32, 1 << 36);
        assert_eq!((q.len(), &q[..6]), (46, &[0x8a, 43, 0, 0, 0x0c, 1][..]));
        assert_eq!(&q[22..30], &0x10_FFFF_FFFFu64.to_le_bytes());
        // Name(_CRS, Buffer(n) {...; EndTag}).
        let crs = aml_crs(&io_port(0xcf8, 8));
        assert_eq!(crs[..5], [0x08, b'_', b'C', b'R', b'S']);
        assert_eq!(crs[5..9], [0x11, 13, 0x0a, 10]);
        assert_eq!(crs[crs.len() - 2..], [0x79, 0]);
    }

    #[test]
    fn aml_package_lengths_encode_as_the_spec_says() {
        assert_eq!(aml_pkg_length(0), [1]);
        assert_eq!(aml_pkg_length(62), [63]);
        // 63 body bytes + 2 length bytes = 65 = 0x41: low nibble 1, then 0x04.
        assert_eq!(aml_pkg_length(63), [0x41, 0x04]);
        assert_eq!(aml_pkg_length(0xffd), [0x4f, 0xff]);
        assert_eq!(aml_pkg_length(0xffe), [0x81, 0x00, 0x01]);
        assert_eq!(aml_int(0), [0]);
        assert_eq!(aml_int(31), [0x0a, 31]);
    }
}
