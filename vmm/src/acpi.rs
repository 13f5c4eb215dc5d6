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
//! - PCI hot-plug ([`crate::hotplug`]): a device per slot 1..=31 under `PCI0`
//!   (`_ADR`, `_SUN`, `_EJ0`), the controller's registers as a SystemIO region, and
//!   `\_SB.GED0`, a Generic Event Device (ACPI0013) on GSI [`GED_GSI`] (edge, active
//!   high) whose `_EVT` notifies the slots. The AML is built with `acpi_tables`.
//! - NUMA: an SRAT with one proximity domain holding every vCPU and all RAM. Without
//!   one, x86 Linux falls back to looking for an AMD northbridge, reading the vendor
//!   ID of all 32 slots of bus 0 through 0xCF8 (64 port exits) on any CPU vendor.

use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::hotplug::{GED_GSI, HOTPLUG_PORT, HOTPLUG_PORT_LEN};
use crate::layout::{self, addr32, IOAPIC_START, LAPIC_START, PCI_ECAM_SIZE, PCI_ECAM_START};
use crate::mptable::MAX_CPUS;
use crate::pci::{PciWindows, CONFIG_ADDRESS_PORT, NUM_SLOTS};
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

/// The last bus the ECAM covers (1 MiB per bus, at most 256 buses).
const ECAM_LAST_BUS: u8 = {
    let last = (PCI_ECAM_SIZE >> 20) - 1;
    assert!(last <= 0xff, "the ECAM covers at most 256 buses");
    last.to_le_bytes()[0]
};

/// The name of slot `slot`'s device under `\_SB.PCI0`.
fn slot_name(slot: u8) -> String {
    format!("S{slot:03}")
}

/// ACPI notify values (ACPI 6.5, 5.6.6).
const NOTIFY_DEVICE_CHECK: u8 = 1;
const NOTIFY_EJECT_REQUEST: u8 = 3;

/// The hot-plug controller's registers ([`crate::hotplug`]) and methods, and one
/// device per slot 1..32 that `acpiphp` can plug and eject:
///
/// ```text
/// OperationRegion (PCST, SystemIO, 0xAE00, 0x0C)
/// Field (PCST, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32, B0EJ, 32 }
/// Method (PCEJ, 1) { B0EJ = 1 << Arg0 }                  // eject slot Arg0
/// Device (S001) { Name (_ADR, 0x00010000) Name (_SUN, 1) Method (_EJ0, 1) { PCEJ (_SUN) } }
/// ...
/// Method (PCNT, 0, Serialized) {                          // the GED's event
///     Local0 = PCIU  Local1 = PCID
///     If (Local0 & (1 << 1)) { Notify (S001, 1) }  If (Local1 & (1 << 1)) { Notify (S001, 3) }
///     ...
/// }
/// ```
fn pci_hotplug_aml(children: &mut Vec<u8>) {
    let hotplug_port = u16::try_from(HOTPLUG_PORT).expect("a PIO port");
    let hotplug_len = u8::try_from(HOTPLUG_PORT_LEN).expect("a few registers");
    aml::OpRegion::new("PCST".into(), aml::OpRegionSpace::SystemIO, &hotplug_port, &hotplug_len).to_aml_bytes(children);
    aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"PCIU", 32), aml::FieldEntry::Named(*b"PCID", 32), aml::FieldEntry::Named(*b"B0EJ", 32)],
    )
    .to_aml_bytes(children);
    let b0ej = aml::Path::new("B0EJ");
    aml::Method::new("PCEJ".into(), 1, false, vec![&aml::ShiftLeft::new(&b0ej, &aml::ONE, &aml::Arg(0))]).to_aml_bytes(children);

    let slots: Vec<u8> = (1u8..).take(NUM_SLOTS - 1).collect();
    for &slot in &slots {
        let adr = u32::from(slot) << 16;
        let sun = u32::from(slot);
        let sun_path = aml::Path::new("_SUN");
        let eject = aml::MethodCall::new("PCEJ".into(), vec![&sun_path]);
        aml::Device::new(
            slot_name(slot).as_str().into(),
            vec![
                &aml::Name::new("_ADR".into(), &adr),
                &aml::Name::new("_SUN".into(), &sun),
                &aml::Method::new("_EJ0".into(), 1, false, vec![&eject]),
            ],
        )
        .to_aml_bytes(children);
    }

    let (pciu, pcid) = (aml::Path::new("PCIU"), aml::Path::new("PCID"));
    let read_up = aml::Store::new(&aml::Local(0), &pciu);
    let read_down = aml::Store::new(&aml::Local(1), &pcid);
    let names: Vec<aml::Path> = slots.iter().map(|&s| slot_name(s).as_str().into()).collect();
    let bits: Vec<u32> = slots.iter().map(|&s| 1u32 << s).collect();
    let tests_up: Vec<aml::And> = bits.iter().map(|b| aml::And::new(&aml::ZERO, &aml::Local(0), b)).collect();
    let tests_down: Vec<aml::And> = bits.iter().map(|b| aml::And::new(&aml::ZERO, &aml::Local(1), b)).collect();
    let notify_up: Vec<aml::Notify> = names.iter().map(|n| aml::Notify::new(n, &NOTIFY_DEVICE_CHECK)).collect();
    let notify_down: Vec<aml::Notify> = names.iter().map(|n| aml::Notify::new(n, &NOTIFY_EJECT_REQUEST)).collect();
    let ifs: Vec<aml::If> = (0..slots.len())
        .flat_map(|i| [aml::If::new(&tests_up[i], vec![&notify_up[i]]), aml::If::new(&tests_down[i], vec![&notify_down[i]])])
        .collect();
    let mut body: Vec<&dyn Aml> = vec![&read_up, &read_down];
    body.extend(ifs.iter().map(|i| i as &dyn Aml));
    aml::Method::new("PCNT".into(), 0, true, body).to_aml_bytes(children);
}

/// `\_SB.PCI0`, the root bridge with its hot-plug slots; `\_SB.MRES`, the
/// motherboard resource reserving the ECAM; and `\_SB.GED0`, the Generic Event
/// Device whose interrupt ([`GED_GSI`]) runs `\_SB.PCI0.PCNT`.
fn pci_devices(windows: &PciWindows, out: &mut Vec<u8>) {
    let config_port = u16::try_from(CONFIG_ADDRESS_PORT).expect("a PIO port");
    let bus = aml::AddressSpace::new_bus_number(0u16, u16::from(ECAM_LAST_BUS));
    let config_io = aml::IO::new(config_port, config_port, 1, 8);
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        addr32(windows.mmio32.start),
        addr32(windows.mmio32.start + windows.mmio32.size - 1),
        None,
    );
    let mmio64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        windows.mmio64.start,
        windows.mmio64.start + windows.mmio64.size - 1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &config_io, &mmio32, &mmio64]);
    let mut hotplug = Vec::new();
    pci_hotplug_aml(&mut hotplug);
    let hotplug = RawAml(hotplug);
    aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &hotplug,
        ],
    )
    .to_aml_bytes(out);

    let ecam = aml::Memory32Fixed::new(true, addr32(PCI_ECAM_START), addr32(PCI_ECAM_SIZE));
    aml::Device::new(
        "MRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ecam])),
        ],
    )
    .to_aml_bytes(out);

    let ged_irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let pcnt = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    aml::Device::new(
        "GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ged_irq])),
            &aml::Method::new("_EVT".into(), 1, true, vec![&pcnt]),
        ],
    )
    .to_aml_bytes(out);
}

/// Already-encoded AML, as one child of a builder object.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
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
/// the PCI root bridge with its hot-plug slots, and the GED.
fn dsdt(cpus: u8, windows: &PciWindows) -> Vec<u8> {
    let mut aml_bytes = Vec::new();
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLP_TYP, &aml::ZERO, &aml::ZERO, &aml::ZERO])).to_aml_bytes(&mut aml_bytes);
    let mut sb = Vec::new();
    for id in 0..cpus {
        let uid = u32::from(id);
        aml::Device::new(
            format!("C{id:03X}").as_str().into(),
            vec![&aml::Name::new("_HID".into(), &"ACPI0007"), &aml::Name::new("_UID".into(), &uid)],
        )
        .to_aml_bytes(&mut sb);
    }
    pci_devices(windows, &mut sb);
    aml::Scope::new("\\_SB_".into(), vec![&RawAml(sb)]).to_aml_bytes(&mut aml_bytes);
    sdt(b"DSDT", 2, b"VFVMDSDT", &aml_bytes)
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
            let encoded = |a: &dyn Aml| {
                let mut v = Vec::new();
                a.to_aml_bytes(&mut v);
                v
            };
            assert!(find(&encoded(&aml::AddressSpace::new_bus_number(0u16, 0))).is_some());
            let mmio32 = aml::AddressSpace::new_memory(aml::AddressSpaceCacheable::NotCacheable, true, 0xC000_0000u32, 0xDFFF_FFFF, None);
            assert!(find(&encoded(&mmio32)).is_some());
            let end64 = (1u64 << 32) + crate::layout::PCI_MMIO64_SIZE - 1;
            let mmio64 = aml::AddressSpace::new_memory(aml::AddressSpaceCacheable::NotCacheable, true, 1u64 << 32, end64, None);
            assert!(find(&encoded(&mmio64)).is_some());
            assert!(find(&encoded(&aml::Memory32Fixed::new(true, 0xE000_0000, 0x10_0000))).is_some());
            // The hot-plug slots and the GED.
            assert_eq!(dsdt.windows(4).filter(|w| w == b"_EJ0").count(), 31);
            assert!(find(b"ACPI0013").is_some() && find(b"PCNT").is_some());

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

    /// ACPICA's disassembler reads the DSDT back: every object where it belongs,
    /// the hot-plug registers where the controller is, and no parse errors.
    #[test]
    fn acpica_disassembles_the_dsdt_as_meant() {
        let dir = std::env::temp_dir().join(format!("vfvm-acpi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let table = dir.join("dsdt.dat");
        std::fs::write(&table, dsdt(2, &PciWindows::for_ram(256 << 20))).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&table)
            .current_dir(&dir)
            .output()
            .expect("iasl (Debian's acpica-tools) is needed for this test: run `cargo xtask install`");
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "iasl -d failed:\n{log}");
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let has = |needle: &str| assert!(dsl.contains(needle), "the disassembled DSDT lacks {needle:?}:\n{dsl}");
        has("Device (PCI0)");
        has("OperationRegion (PCST, SystemIO, 0xAE00, 0x0C)");
        has("Field (PCST, DWordAcc, NoLock, WriteAsZeros)");
        has("Device (S001)");
        has("Device (S031)");
        has("Name (_ADR, 0x001F0000)");
        has("Method (_EJ0, 1, NotSerialized)");
        has("PCEJ (_SUN)");
        has("Method (PCNT, 0, Serialized)");
        has("Notify (S031, 0x03)");
        has("Device (GED0)");
        has("Name (_HID, \"ACPI0013\"");
        has("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )");
        has("0x00000010,");
        has("\\_SB.PCI0.PCNT ()");
        has("Device (C001)");
        assert!(!dsl.contains("Device (S000)") && !dsl.contains("Device (S032)"), "slots 1..=31 only");
    }
}
