//! An Intel MultiProcessor Specification 1.4 table: how a Linux guest without ACPI
//! finds its processors (to start them with INIT/SIPI), the IOAPIC and how the ISA
//! interrupts are wired. Placed in the last KiB of base memory, where Linux scans.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{addr32, IOAPIC_START, LAPIC_START};

pub const MPTABLE_START: u64 = crate::boot::EBDA_START;
/// The MP table must fit in the KiB below 640 KiB.
const MPTABLE_MAX_SIZE: usize = 1024;
/// Interrupt inputs of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const CPU_FEATURE_FPU: u32 = 1;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const BUS_ID_ISA: u8 = 0;

/// The most vCPUs one table describes (processor entries are 20 bytes).
pub const MAX_CPUS: u8 = 32;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("the MP table takes 1..={MAX_CPUS} CPUs, not {0}")]
    Cpus(u8),
    #[error("writing the MP table: {0}")]
    Memory(String),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// The whole structure (floating pointer, then the configuration table) as it goes
/// at `base`.
pub fn mptable_bytes(base: u64, cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::Cpus(cpus));
    }
    let ioapic_id = cpus; // after the LAPIC ids 0..cpus
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.extend_from_slice(&[0, id, APIC_VERSION, CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 }]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&addr32(IOAPIC_START).to_le_bytes());
    count += 1;
    // ISA IRQ n on IOAPIC pin n, as KVM's default GSI routing has it; pin 0 also as
    // ExtINT (the PIC) for Linux's timer check.
    let io_int = |kind: u8, irq: u8| [3, kind, 0, 0, BUS_ID_ISA, irq, ioapic_id, irq];
    entries.extend_from_slice(&io_int(MP_IRQ_EXTINT, 0));
    count += 1;
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&io_int(MP_IRQ_INT, irq));
        count += 1;
    }
    // Local interrupts: LINT0 ExtINT on the BSP, LINT1 NMI on all.
    entries.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, BUS_ID_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&u16::try_from(table_len).expect("at most MAX_CPUS entries: under 1 KiB").to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"VFVM    ");
    table.extend_from_slice(b"VFVM-VMM    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&addr32(LAPIC_START).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&addr32(base + 16).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4);
    fp.push(0); // checksum
    fp.extend_from_slice(&[0; 5]); // feature 1 = 0: the configuration table is present
    fp[10] = checksum(&fp);

    let mut all = fp;
    all.extend_from_slice(&table);
    if all.len() > MPTABLE_MAX_SIZE {
        return Err(MpTableError::Cpus(cpus));
    }
    Ok(all)
}

pub fn write_mptable(memory: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let bytes = mptable_bytes(MPTABLE_START, cpus)?;
    memory.write_slice(&bytes, GuestAddress(MPTABLE_START)).map_err(|e| MpTableError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_and_table_check_out() {
        for cpus in [1, 2, MAX_CPUS] {
            let b = mptable_bytes(MPTABLE_START, cpus).unwrap();
            assert!(b.len() <= 1024);
            assert_eq!(&b[..4], b"_MP_");
            assert_eq!(sum(&b[..16]), 0);
            assert_eq!(u64::from(u32::from_le_bytes(b[4..8].try_into().unwrap())), MPTABLE_START + 16);
            let t = &b[16..];
            assert_eq!(&t[..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(sum(t), 0);
            let count = u16::from_le_bytes([t[34], t[35]]) as usize;
            assert_eq!(count, cpus as usize + 2 + 1 + 24 + 2);
            assert_eq!(u32::from_le_bytes(t[36..40].try_into().unwrap()), 0xFEE0_0000);
            // Processor entries: APIC ids in order, only the first is the BSP.
            for id in 0..cpus {
                let e = &t[44 + usize::from(id) * 20..];
                assert_eq!((e[0], e[1], e[3]), (0, id, if id == 0 { 3 } else { 1 }));
            }
            let ioapic = &t[44 + cpus as usize * 20 + 8..];
            assert_eq!((ioapic[0], ioapic[1]), (2, cpus));
            assert_eq!(u32::from_le_bytes(ioapic[4..8].try_into().unwrap()), 0xFEC0_0000);
        }
        assert!(mptable_bytes(MPTABLE_START, 0).is_err());
        assert!(mptable_bytes(MPTABLE_START, MAX_CPUS + 1).is_err());
    }
}
