//! Direct kernel boot (x86_64, Linux boot protocol): the kernel image (bzImage or
//! ELF vmlinux), the initramfs, the command line and the zero page (`boot_params`)
//! with its e820 memory map.
//!
//! Low memory as the guest finds it at entry:
//!
//! | address            | what                                                |
//! |--------------------|-----------------------------------------------------|
//! | 0x500              | GDT (see [`crate::cpu`])                            |
//! | 0x520              | IDT (empty)                                         |
//! | 0x7000             | zero page                                           |
//! | 0x8ff0             | boot stack top                                      |
//! | 0x9000..0xf000     | identity page tables (first 4 GiB, 2 MiB pages)     |
//! | 0x20000            | command line                                        |
//! | 0x9fc00            | MP table                                            |
//! | 0xe0000..0x100000  | ACPI: RSDP and tables (see [`crate::acpi`]), reserved |
//! | 0x100000           | the kernel (bzImage's protected-mode part)          |
//! | top of low RAM     | the initramfs, page-aligned, below `initrd_addr_max` |

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, BzImage, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::layout;

pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const CMDLINE_START: u64 = 0x2_0000;
/// Room for the command line (the kernel's own limit, `cmdline_size`, is usually lower).
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Start of the extended BIOS data area: base RAM ends here in the e820 map.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where the kernel is loaded ("high memory" for the boot protocol).
pub const HIMEM_START: u64 = 0x10_0000;
/// The smallest guest this VMM boots (a kernel and a small initramfs fit).
pub const MIN_MEMORY_BYTES: u64 = 32 << 20;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// setup_header.xloadflags: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// Offset of startup_64 from the start of a bzImage's protected-mode part.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// initrd_addr_max for kernels that do not say (ELF vmlinux): the protocol's default.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("not a bzImage or an ELF vmlinux ({0})")]
    KernelFormat(loader::Error),
    #[error("the bzImage has no 64-bit entry point (boot protocol {0:#x}, xloadflags {1:#x})")]
    Kernel32Only(u16, u16),
    #[error("reading the image: {0}")]
    Read(std::io::Error),
    #[error("the kernel ends at {end:#x}, beyond guest memory (top of low RAM {top:#x})")]
    KernelTooLarge { end: u64, top: u64 },
    #[error("initrd is {size} bytes: larger than the {room} bytes of guest memory free for it")]
    InitrdTooLarge { size: u64, room: u64 },
    #[error("initrd: copying into guest memory: {0}")]
    InitrdCopy(String),
    #[error("command line: {0}")]
    Cmdline(String),
    #[error("writing {what} into guest memory: {err}")]
    Memory { what: &'static str, err: String },
}

/// What the loader learnt about the kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// The 64-bit entry point (RIP).
    pub entry: u64,
    /// First address past the loaded image.
    pub end: u64,
    /// The bzImage's setup header; `None` for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    pub fn initrd_addr_max(&self) -> u64 {
        match self.setup_header {
            Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
            _ => DEFAULT_INITRD_ADDR_MAX,
        }
    }

    /// The end of the area a bzImage decompresses itself into when not randomised:
    /// `pref_address + init_size` (boot protocol 2.10+); the initrd stays above it.
    pub fn decompressed_end(&self) -> u64 {
        match self.setup_header {
            Some(h) if h.version >= 0x20a => h.pref_address.saturating_add(u64::from(h.init_size)),
            _ => 0,
        }
    }

    /// The longest command line the kernel accepts (without the NUL).
    pub fn cmdline_limit(&self) -> usize {
        match self.setup_header {
            // cmdline_size exists from protocol 2.06; earlier kernels take 255 bytes.
            Some(h) if h.version >= 0x206 && h.cmdline_size != 0 => h.cmdline_size as usize,
            Some(_) => 255,
            None => 2047,
        }
    }
}

/// The top of RAM below the 32-bit hole.
pub fn low_ram_top(ram_bytes: u64) -> u64 {
    ram_bytes.min(layout::MMIO_HOLE_START)
}

/// Loads a bzImage at 1 MiB. An ELF vmlinux goes through [`crate::elf`] instead,
/// which copies it on several threads.
pub fn load_bzimage<F>(memory: &GuestMemoryMmap, image: &mut F) -> Result<LoadedKernel, BootError>
where
    F: Read + ReadVolatile + Seek,
{
    image.seek(SeekFrom::Start(0)).map_err(BootError::Read)?;
    let top = low_ram_top(memory_size(memory));
    let r =
        BzImage::load(memory, Some(GuestAddress(HIMEM_START)), image, Some(GuestAddress(HIMEM_START))).map_err(BootError::KernelFormat)?;
    let hdr = r.setup_header.expect("the bzImage loader returns the setup header");
    if hdr.version < 0x20c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Kernel32Only(hdr.version, hdr.xloadflags));
    }
    let loaded = LoadedKernel { entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET, end: r.kernel_end, setup_header: Some(hdr) };
    if loaded.end > top {
        return Err(BootError::KernelTooLarge { end: loaded.end, top });
    }
    Ok(loaded)
}

fn memory_size(memory: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    memory.iter().map(|r| r.len()).sum()
}

/// Where an initrd of `size` bytes goes: the highest page-aligned address below
/// both the kernel's `initrd_addr_max` and the top of low RAM, above the kernel.
pub fn initrd_placement(size: u64, kernel: &LoadedKernel, ram_bytes: u64) -> Result<u64, BootError> {
    let top = low_ram_top(ram_bytes).min(kernel.initrd_addr_max().saturating_add(1));
    let bottom = kernel.end.max(kernel.decompressed_end()).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let room = top.saturating_sub(bottom);
    if size > room {
        return Err(BootError::InitrdTooLarge { size, room });
    }
    Ok((top - size) & !(PAGE_SIZE - 1))
}

/// Copies the initrd (`size` bytes from `image`) into guest memory; returns its address.
pub fn load_initrd<F: ReadVolatile>(memory: &GuestMemoryMmap, image: &mut F, size: u64, kernel: &LoadedKernel) -> Result<u64, BootError> {
    let addr = initrd_placement(size, kernel, memory_size(memory))?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, room: 0 })?;
    memory.read_exact_volatile_from(GuestAddress(addr), image, len).map_err(|e| BootError::InitrdCopy(e.to_string()))?;
    Ok(addr)
}

/// Writes the command line at [`CMDLINE_START`]; returns its length (without the NUL).
pub fn load_cmdline(memory: &GuestMemoryMmap, cmdline: &str, kernel: &LoadedKernel) -> Result<usize, BootError> {
    let limit = kernel.cmdline_limit();
    if cmdline.len() > limit {
        return Err(BootError::Cmdline(format!("{} bytes, the kernel takes at most {limit}", cmdline.len())));
    }
    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(memory, GuestAddress(CMDLINE_START), &cl).map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(cmdline.len())
}

/// The e820 map for `ram_bytes` of RAM: base memory up to the EBDA, the BIOS area
/// holding the ACPI tables (0xE0000 to 1 MiB) reserved, RAM from 1 MiB, RAM above
/// 4 GiB if any, and the top of the 32-bit hole (ECAM, IOAPIC, LAPIC, KVM's TSS
/// pages) reserved. The PCI MMIO32 window is left out of the map (a gap, not
/// "reserved"), because Linux clips PCI host bridge windows by e820 reservations.
pub fn e820_map(ram_bytes: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, kind: u32| boot_e820_entry { addr, size, r#type: kind };
    let mut map = vec![entry(0, EBDA_START, E820_RAM), entry(layout::BIOS_AREA_START, layout::BIOS_AREA_SIZE, E820_RESERVED)];
    for (start, len) in layout::ram_ranges(ram_bytes) {
        let end = start + len;
        let start = start.max(HIMEM_START);
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map.push(entry(layout::PCI_ECAM_START, layout::FOUR_GIB - layout::PCI_ECAM_START, E820_RESERVED));
    map.sort_by_key(|e| e.addr);
    map
}

/// The zero page for a loaded kernel. (The kernel finds the ACPI RSDP by scanning
/// the BIOS area, where [`crate::acpi`] puts it.)
pub fn boot_params(kernel: &LoadedKernel, cmdline_len: usize, initrd: Option<(u64, u64)>, ram_bytes: u64) -> boot_params {
    let hdr = kernel.setup_header.unwrap_or_else(|| setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
        ..Default::default()
    });
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::addr32(CMDLINE_START);
    // load_cmdline keeps it within CMDLINE_MAX_SIZE, and initrd_placement puts the
    // initrd in low RAM, below the 32-bit hole.
    params.hdr.cmdline_size = u32::try_from(cmdline_len + 1).expect("a command line of at most CMDLINE_MAX_SIZE");
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = layout::addr32(addr);
        params.hdr.ramdisk_size = u32::try_from(size).expect("an initrd in low RAM");
    }
    let map = e820_map(ram_bytes);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = u8::try_from(map.len()).expect("an e820 map of a few entries");
    params
}

pub fn write_boot_params(memory: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    memory.write_obj(*params, GuestAddress(ZERO_PAGE_START)).map_err(|e| BootError::Memory { what: "the zero page", err: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn e820(ram: u64) -> Vec<(u64, u64, u32)> {
        e820_map(ram).iter().map(|e| (e.addr, e.size, e.r#type)).collect()
    }

    #[test]
    fn e820_has_base_memory_ram_from_1mib_and_the_hole_reserved() {
        assert_eq!(
            e820(256 << 20),
            [(0, 0x9fc00, 1), (0xE_0000, 0x2_0000, 2), (0x10_0000, (256 << 20) - 0x10_0000, 1), (0xE000_0000, 0x2000_0000, 2)]
        );
        assert_eq!(
            e820(4 << 30),
            [
                (0, 0x9fc00, 1),
                (0xE_0000, 0x2_0000, 2),
                (0x10_0000, 0xC000_0000 - 0x10_0000, 1),
                (0xE000_0000, 0x2000_0000, 2),
                (1 << 32, 1 << 30, 1),
            ]
        );
    }

    fn fake_bzimage(xloadflags: u16) -> Vec<u8> {
        let mut img = vec![0u8; 0x1000 + 8192];
        img[0x1f1] = 3; // setup_sects: (3 + 1) * 512 bytes of setup
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        img[0x800] = 0xAB; // first byte of the protected-mode part
        img
    }

    fn memory(ram: u64) -> GuestMemoryMmap {
        crate::memory::guest_memory(ram, crate::memory::Backing::Private).unwrap()
    }

    #[test]
    fn a_bzimage_loads_at_1mib_with_the_64bit_entry() {
        let mem = memory(64 << 20);
        let k = load_bzimage(&mem, &mut Cursor::new(fake_bzimage(1))).unwrap();
        assert_eq!(k.entry, 0x10_0200);
        assert_eq!(k.end, 0x10_0000 + 8192 + 0x1000 - 0x800);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xAB);
        assert_eq!(k.cmdline_limit(), 2047);
        assert_eq!(k.initrd_addr_max(), 0x7fff_ffff);
    }

    #[test]
    fn corrupt_truncated_and_32bit_only_kernels_are_refused() {
        let mem = memory(64 << 20);
        let mut bad = fake_bzimage(1);
        bad[0x202] = b'X';
        assert!(matches!(load_bzimage(&mem, &mut Cursor::new(bad)), Err(BootError::KernelFormat(_))));
        let truncated = fake_bzimage(1)[..0x300].to_vec();
        assert!(matches!(load_bzimage(&mem, &mut Cursor::new(truncated)), Err(BootError::KernelFormat(_))));
        assert!(matches!(load_bzimage(&mem, &mut Cursor::new(Vec::new())), Err(BootError::KernelFormat(_))));
        let mut elf = b"\x7fELF".to_vec();
        elf.resize(100, 0);
        assert!(matches!(load_bzimage(&mem, &mut Cursor::new(elf)), Err(BootError::KernelFormat(_))));
        assert!(matches!(load_bzimage(&mem, &mut Cursor::new(fake_bzimage(0))), Err(BootError::Kernel32Only(0x20f, 0))));
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_low_ram_or_is_refused() {
        let mem = memory(64 << 20);
        let k = load_bzimage(&mem, &mut Cursor::new(fake_bzimage(1))).unwrap();
        assert_eq!(initrd_placement(0x1800, &k, 64 << 20).unwrap(), (64 << 20) - 0x2000);
        // Capped by initrd_addr_max and by the hole.
        let mut capped = k;
        capped.setup_header.as_mut().unwrap().initrd_addr_max = 0x1ff_ffff;
        assert_eq!(initrd_placement(0x1000, &capped, 64 << 20).unwrap(), 0x200_0000 - 0x1000);
        assert_eq!(initrd_placement(0x1000, &k, 8 << 30).unwrap(), 0x8000_0000 - 0x1000);
        // Larger than the room above the kernel.
        let room = (64 << 20) - 0x10_3000; // the kernel ends at 0x10_2800
        assert!(matches!(
            initrd_placement(64 << 20, &k, 64 << 20),
            Err(BootError::InitrdTooLarge { size, room: r }) if size == 64 << 20 && r == room
        ));
        let data = vec![0x5au8; 0x1800];
        let addr = load_initrd(&mem, &mut Cursor::new(data.clone()).get_ref().as_slice(), 0x1800, &k).unwrap();
        let mut back = vec![0u8; 0x1800];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn the_zero_page_describes_cmdline_initrd_and_memory() {
        let mem = memory(256 << 20);
        let k = load_bzimage(&mem, &mut Cursor::new(fake_bzimage(1))).unwrap();
        let n = load_cmdline(&mem, "console=ttyS0 quiet", &k).unwrap();
        let p = boot_params(&k, n, Some((0xF00_0000, 0x1234)), 256 << 20);
        write_boot_params(&mem, &p).unwrap();
        let back: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = back.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ hdr.ramdisk_image }, 0xF00_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!(back.e820_entries, 4);
        let e = back.e820_table[2];
        assert_eq!(({ e.addr }, { e.size }, { e.r#type }), (0x10_0000, (256 << 20) - 0x10_0000, 1));
        let mut cl = [0u8; 20];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cl, b"console=ttyS0 quiet\0");
        // Zero-page offsets the kernel reads (Documentation/arch/x86/zero-page.rst).
        let mut raw = [0u8; 4096];
        mem.read_slice(&mut raw, GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(raw[0x1e8], 4); // e820_entries
        assert_eq!(raw[0x210], 0xff);
        assert_eq!(&raw[0x228..0x22c], &0x2_0000u32.to_le_bytes());
        assert_eq!(&raw[0x2d0 + 20..0x2d0 + 28], &0xE_0000u64.to_le_bytes());
        assert_eq!(&raw[0x2d0 + 40..0x2d0 + 48], &0x10_0000u64.to_le_bytes());
    }

    #[test]
    fn a_too_long_cmdline_is_refused() {
        let mem = memory(64 << 20);
        let k = load_bzimage(&mem, &mut Cursor::new(fake_bzimage(1))).unwrap();
        assert!(matches!(load_cmdline(&mem, &"x".repeat(2048), &k), Err(BootError::Cmdline(_))));
    }
}
