//! SMBIOS 3.0 tables, where Linux looks for them without UEFI: a 64-bit entry point
//! (`_SM3_`) at [`SMBIOS_START`], in the BIOS area the e820 map reserves, followed by
//! the structure table: BIOS information (type 0), system information (type 1) and
//! the end marker (type 127).
//!
//! What the guest gets from them: its DMI identity (`/sys/class/dmi/id`: vendor
//! "vfvm", product "vfvm-vmm", "system is a virtual machine"), and a BIOS date. The
//! date matters to Linux's PCI setup: without one, its check that configuration
//! mechanism #1 works reads the class of every function on bus 0 (up to 256 reads,
//! two port exits each) looking for a host bridge; with a BIOS from 2001 or later it
//! trusts the mechanism.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The entry point: the first 16-byte boundary Linux scans (0xF0000..0x100000).
pub const SMBIOS_START: u64 = 0xF_0000;
/// The room for the entry point and the structure table.
pub const SMBIOS_AREA_SIZE: u64 = 0x1_0000;

const ENTRY_POINT_LEN: u8 = 0x18;
/// The structure table follows the entry point, 16-byte aligned.
const TABLE_OFFSET: u64 = 0x20;
/// SMBIOS 3.2: the version whose structure layouts these are.
const VERSION: (u8, u8) = (3, 2);
/// The BIOS release date, in the "mm/dd/yyyy" form of type 0.
const BIOS_DATE: &str = "12/01/2026";

// Type 0 characteristics: bit 3, "BIOS characteristics are not supported"; extension
// byte 2, bit 4: "the system is a virtual machine".
const BIOS_CHARACTERISTICS_NOT_SUPPORTED: u64 = 1 << 3;
const BIOS_EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
// Type 1 wake-up type: "power switch".
const WAKE_UP_POWER_SWITCH: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum SmbiosError {
    #[error("writing the SMBIOS tables: {0}")]
    Memory(String),
}

/// One structure: the formatted part (type, length, handle, fields) and its strings,
/// referred to by 1-based index, each NUL-terminated, the set ended by another NUL.
fn structure(kind: u8, handle: u16, fields: &[u8], strings: &[&str]) -> Vec<u8> {
    let len = u8::try_from(4 + fields.len()).expect("SMBIOS structures here are far below 256 bytes");
    let mut s = vec![kind, len];
    s.extend_from_slice(&handle.to_le_bytes());
    s.extend_from_slice(fields);
    for text in strings {
        s.extend_from_slice(text.as_bytes());
        s.push(0);
    }
    if strings.is_empty() {
        s.push(0);
    }
    s.push(0);
    s
}

fn bios_information() -> Vec<u8> {
    let mut f = vec![1, 2]; // vendor, BIOS version: strings 1 and 2
    f.extend_from_slice(&0u16.to_le_bytes()); // starting address segment: none (no legacy BIOS)
    f.push(3); // release date: string 3
    f.push(0); // ROM size: none
    f.extend_from_slice(&BIOS_CHARACTERISTICS_NOT_SUPPORTED.to_le_bytes());
    f.extend_from_slice(&[0, BIOS_EXT2_VIRTUAL_MACHINE]);
    f.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]); // BIOS and EC firmware release: not given
    f.extend_from_slice(&0u16.to_le_bytes()); // extended ROM size: none
    structure(0, 0, &f, &["vfvm", env!("CARGO_PKG_VERSION"), BIOS_DATE])
}

fn system_information() -> Vec<u8> {
    let mut f = vec![1, 2, 3, 0]; // manufacturer, product, version; no serial number
    f.extend_from_slice(&[0; 16]); // UUID: not set
    f.push(WAKE_UP_POWER_SWITCH);
    f.extend_from_slice(&[0, 4]); // no SKU; family: string 4
    structure(1, 1, &f, &["vfvm", "vfvm-vmm", env!("CARGO_PKG_VERSION"), "vfvm microVM"])
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// The entry point and the structure table, as they go at [`SMBIOS_START`].
pub fn smbios_bytes() -> Vec<u8> {
    let table: Vec<u8> = [bios_information(), system_information(), structure(127, 2, &[], &[])].concat();
    let mut ep = Vec::with_capacity(usize::from(ENTRY_POINT_LEN));
    ep.extend_from_slice(b"_SM3_");
    ep.push(0); // checksum, below
    ep.push(ENTRY_POINT_LEN);
    ep.extend_from_slice(&[VERSION.0, VERSION.1, 0]); // major, minor, docrev
    ep.push(1); // entry point revision: 3.0
    ep.push(0); // reserved
    ep.extend_from_slice(&u32::try_from(table.len()).expect("a small table").to_le_bytes()); // maximum size
    ep.extend_from_slice(&(SMBIOS_START + TABLE_OFFSET).to_le_bytes());
    ep[5] = checksum(&ep);
    let mut area = ep;
    area.resize(usize::try_from(TABLE_OFFSET).expect("a small offset"), 0);
    area.extend_from_slice(&table);
    area
}

/// Writes the tables into guest memory at [`SMBIOS_START`].
pub fn write_smbios_tables(memory: &GuestMemoryMmap) -> Result<(), SmbiosError> {
    let bytes = smbios_bytes();
    debug_assert!(bytes.len() as u64 <= SMBIOS_AREA_SIZE);
    memory.write_slice(&bytes, GuestAddress(SMBIOS_START)).map_err(|e| SmbiosError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the structure table as Linux's DMI scanner does: formatted part, then
    /// strings up to a double NUL.
    fn structures(table: &[u8]) -> Vec<(u8, Vec<u8>, Vec<String>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < table.len() {
            let (kind, len) = (table[at], usize::from(table[at + 1]));
            let formatted = table[at..at + len].to_vec();
            let mut strings_end = at + len;
            while table[strings_end..strings_end + 2] != [0, 0] {
                strings_end += 1;
            }
            let strings = table[at + len..strings_end].split(|&b| b == 0).filter(|s| !s.is_empty());
            out.push((kind, formatted, strings.map(|s| String::from_utf8(s.to_vec()).unwrap()).collect()));
            at = strings_end + 2;
            if kind == 127 {
                break;
            }
        }
        out
    }

    #[test]
    fn the_entry_point_checksums_and_points_at_a_well_formed_table() {
        let area = smbios_bytes();
        assert!(area.len() as u64 <= SMBIOS_AREA_SIZE);
        assert_eq!(&area[..5], b"_SM3_");
        let ep_len = usize::from(area[6]);
        assert_eq!(ep_len, 0x18);
        assert_eq!(area[..ep_len].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "entry point checksum");
        assert_eq!((area[7], area[8], area[10]), (3, 2, 1));
        let max = usize::try_from(u32::from_le_bytes(area[12..16].try_into().unwrap())).unwrap();
        let addr = u64::from_le_bytes(area[16..24].try_into().unwrap());
        assert_eq!(addr % 16, 0);
        let start = usize::try_from(addr - SMBIOS_START).unwrap();
        assert_eq!(area.len(), start + max, "the table's maximum size is its size");
        let s = structures(&area[start..]);
        let kinds: Vec<u8> = s.iter().map(|(k, ..)| *k).collect();
        assert_eq!(kinds, [0, 1, 127]);
        let (_, bios, bios_strings) = &s[0];
        assert_eq!(bios.len(), 0x1a);
        assert_eq!(bios_strings[usize::from(bios[8]) - 1], BIOS_DATE);
        assert_eq!(bios[0x13] & BIOS_EXT2_VIRTUAL_MACHINE, BIOS_EXT2_VIRTUAL_MACHINE);
        let (_, system, system_strings) = &s[1];
        assert_eq!(system.len(), 0x1b);
        assert_eq!((&*system_strings[usize::from(system[4]) - 1], &*system_strings[usize::from(system[5]) - 1]), ("vfvm", "vfvm-vmm"));
        // Handles are unique.
        let handles: std::collections::BTreeSet<u16> = s.iter().map(|(_, f, _)| u16::from_le_bytes([f[2], f[3]])).collect();
        assert_eq!(handles.len(), 3);
    }
}
