//! Guest RAM: the host mappings behind guest physical memory.
//!
//! Each RAM range (see [`crate::layout::ram_ranges`]) is mapped at a host address
//! aligned to 2 MiB, the guest physical alignment of every range, and advised for
//! transparent huge pages. KVM can only back guest memory with 2 MiB stage-2 pages when
//! guest and host addresses agree modulo 2 MiB; a page-aligned mapping (what a plain
//! `mmap` returns on kernels before 6.7) makes the guest fault each 4 KiB page in on its
//! first touch: about 19,500 such exits in a 256 MiB guest's boot, measured in the lab,
//! against about 370 for QEMU, which aligns its RAM the same way.
//!
//! The mappings live as long as the process, as Firecracker's do: clones of the guest
//! memory handle reach device threads, so nothing short of the process's end is known to
//! be their last user. A VMM process runs one VM.

use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout;

/// The alignment of huge pages (and of every guest RAM range's start).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{0} bytes of guest memory do not fit this host's address space")]
    TooLarge(u64),
    #[error("guest memory: {what}: {source}")]
    Os { what: &'static str, source: std::io::Error },
    #[error("guest memory: {0}")]
    Region(String),
}

fn os_error(what: &'static str) -> MemoryError {
    MemoryError::Os { what, source: std::io::Error::last_os_error() }
}

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous private memory: only this process maps it.
    Private,
    /// One memfd, mapped shared, each range at its own offset: what vhost-user backends
    /// (virtiofsd) need, since they map guest memory themselves (the descriptor and the
    /// offsets go to them with SET_MEM_TABLE).
    Shared,
}

/// Maps `len` bytes (a multiple of [`HUGE_PAGE_SIZE`] is best) at a 2 MiB-aligned host
/// address: anonymous, or from `file` at `offset`. Advises transparent huge pages.
fn map_aligned(len: usize, file: Option<(&std::fs::File, u64)>) -> Result<*mut u8, MemoryError> {
    let reserve_len = len.checked_add(HUGE_PAGE_SIZE).ok_or(MemoryError::TooLarge(u64::MAX))?;
    // SAFETY: a fresh PROT_NONE reservation at an address the kernel picks; it touches
    // no existing mapping.
    let reserve = unsafe {
        libc::mmap(std::ptr::null_mut(), reserve_len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
    };
    if reserve == libc::MAP_FAILED {
        return Err(os_error("reserving address space"));
    }
    let start = reserve.cast::<u8>();
    let head = start.align_offset(HUGE_PAGE_SIZE);
    // SAFETY: `head` < HUGE_PAGE_SIZE, so both stay inside the reservation.
    let (aligned, end) = unsafe { (start.add(head), start.add(reserve_len)) };
    let (fd, offset, flags) = match file {
        Some((file, offset)) => {
            let offset = libc::off_t::try_from(offset).map_err(|_| MemoryError::TooLarge(offset))?;
            (file.as_raw_fd(), offset, libc::MAP_SHARED)
        }
        None => (-1, 0, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS),
    };
    // SAFETY: MAP_FIXED over the part of our own reservation that starts at `aligned`,
    // `len` bytes, which lies inside it; nothing else lives there.
    let mapped = unsafe {
        libc::mmap(aligned.cast(), len, libc::PROT_READ | libc::PROT_WRITE, flags | libc::MAP_NORESERVE | libc::MAP_FIXED, fd, offset)
    };
    if mapped == libc::MAP_FAILED {
        let error = os_error("mapping guest RAM");
        // SAFETY: the whole reservation is ours and nothing was mapped into it.
        unsafe { libc::munmap(reserve, reserve_len) };
        return Err(error);
    }
    // The reservation's unused head and tail go back; each is page-aligned.
    // SAFETY: [start, aligned) and [aligned + len, end) are the reservation's own
    // PROT_NONE pages around the new mapping.
    unsafe {
        if head > 0 {
            libc::munmap(reserve, head);
        }
        let tail = aligned.add(len);
        let tail_len = usize::try_from(end.offset_from(tail)).unwrap_or(0);
        if tail_len > 0 {
            libc::munmap(tail.cast(), tail_len);
        }
    }
    // A hint only: kernels without transparent huge pages (or shmem without them
    // enabled) answer EINVAL and the guest runs on small pages.
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(aligned.cast(), len, libc::MADV_HUGEPAGE) };
    Ok(aligned)
}

/// Faults every page of guest RAM in, writable, without changing what any holds
/// (`MADV_POPULATE_WRITE`, Linux 5.14+): what a VFIO DMA mapping does anyway when it
/// pins guest RAM, done ahead of it, so that a device plugged later is mapped in a
/// fraction of the time. Safe while the guest runs. Returns how long it took.
pub fn populate(memory: &GuestMemoryMmap) -> Result<std::time::Duration, MemoryError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let started = std::time::Instant::now();
    for region in memory.iter() {
        let host = region.as_ptr();
        let len = usize::try_from(region.len()).map_err(|_| MemoryError::TooLarge(region.len()))?;
        // SAFETY: advice on a mapping of ours, `len` bytes at `host`; populating
        // writes nothing to the pages, it only faults them in.
        if unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) } != 0 {
            return Err(os_error("populating guest RAM (MADV_POPULATE_WRITE)"));
        }
    }
    Ok(started.elapsed())
}

/// Guest memory for `ram_bytes`, split around the 32-bit MMIO hole.
pub fn guest_memory(ram_bytes: u64, backing: Backing) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(ram_bytes)
        .into_iter()
        .map(|(start, len)| usize::try_from(len).map(|l| (GuestAddress(start), l)))
        .collect::<Result<_, _>>()
        .map_err(|_| MemoryError::TooLarge(ram_bytes))?;
    let file = match backing {
        Backing::Private => None,
        Backing::Shared => {
            // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
            let fd = unsafe { libc::memfd_create(c"vfvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(os_error("memfd_create"));
            }
            // SAFETY: `fd` is a new descriptor that nothing else owns.
            let file = std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            file.set_len(ram_bytes).map_err(|source| MemoryError::Os { what: "sizing the guest memory file", source })?;
            Some(Arc::new(file))
        }
    };
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for (start, len) in ranges {
        let host = map_aligned(len, file.as_deref().map(|f| (f, offset)))?;
        let mut builder = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(if file.is_some() { libc::MAP_SHARED } else { libc::MAP_PRIVATE | libc::MAP_ANONYMOUS });
        if let Some(file) = &file {
            builder = builder.with_file_offset(FileOffset::from_arc(file.clone(), offset));
        }
        // SAFETY: `host` is a mapping of `len` bytes made above, never unmapped (see
        // the module docs).
        let mapping = unsafe { builder.with_raw_mmap_pointer(host) }.build().map_err(|e| MemoryError::Region(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, start).ok_or_else(|| MemoryError::Region(format!("range at {start:?} wraps")))?;
        regions.push(region);
        offset += u64::try_from(len).map_err(|_| MemoryError::TooLarge(ram_bytes))?;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn every_range_is_2mib_aligned_on_the_host_and_advised_for_huge_pages() {
        // Above the 32-bit hole too: two ranges.
        let ram = layout::MMIO_HOLE_START + (16 << 20);
        for backing in [Backing::Private, Backing::Shared] {
            let mem = guest_memory(ram, backing).unwrap();
            assert_eq!(mem.iter().count(), 2);
            for region in mem.iter() {
                let host = mem.get_host_address(region.start_addr()).unwrap();
                assert_eq!(host.align_offset(HUGE_PAGE_SIZE), 0, "{backing:?} range at {:?}", region.start_addr());
                let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
                let start = format!("{:x}-", host as usize);
                let flags = smaps
                    .lines()
                    .skip_while(|l| !l.starts_with(&start))
                    .find_map(|l| l.strip_prefix("VmFlags:"))
                    .expect("the mapping is listed with its flags");
                assert!(flags.split_whitespace().any(|f| f == "hg"), "{backing:?}: no MADV_HUGEPAGE in {flags}");
            }
        }
    }

    #[test]
    fn shared_memory_is_one_memfd_with_each_range_at_its_offset() {
        let ram = layout::MMIO_HOLE_START + (16 << 20);
        let mem = guest_memory(ram, Backing::Shared).unwrap();
        let mut expected_offset = 0;
        for r in mem.iter() {
            let at = r.file_offset().expect("file-backed");
            assert_eq!(at.start(), expected_offset);
            expected_offset += r.len();
            // What the guest writes is what another mapping of the file sees.
            let gpa = r.start_addr().unchecked_add(0x1234);
            let value = 0xfeed_f00d_u32 ^ u32::try_from(at.start() >> 20).unwrap();
            mem.write_obj(value, gpa).unwrap();
            let mut b = [0u8; 4];
            at.file().read_exact_at(&mut b, at.start() + 0x1234).unwrap();
            assert_eq!(u32::from_le_bytes(b), value);
        }
        assert_eq!(expected_offset, ram);
        assert!(guest_memory(64 << 20, Backing::Private).unwrap().iter().all(|r| r.file_offset().is_none()));
    }
}
