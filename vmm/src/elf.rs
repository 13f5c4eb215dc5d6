//! Loading an ELF vmlinux, and the initramfs beside it, into guest memory on several
//! threads. The copy is most of a VM's setup time (a Debian vmlinux has 58 MB of
//! segments): its cost is the host faulting fresh guest pages in and copying into
//! them, which spreads over the host's CPUs. Each worker reads its chunks with a
//! file descriptor of its own, straight into guest memory.
//!
//! Only what direct boot needs is read from the ELF: the 64-bit little-endian
//! x86-64 header, the entry point (the kernel's physical `startup_64`) and the
//! `PT_LOAD` segments at their physical addresses. Every number is checked against
//! the file and guest memory before anything is copied.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The ELF header's size (64-bit) and a program header's.
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
/// More program headers than any kernel has: a bound on what a corrupt file makes us read.
const MAX_PHDRS: u16 = 64;
/// The unit of work: big enough that a worker's per-chunk cost is nothing, small
/// enough that the workers finish together.
const CHUNK: u64 = 4 << 20;
/// Workers at most (the copy is bound by the host's memory bandwidth beyond this).
const MAX_WORKERS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian x86-64 ELF ({0})")]
    Unsupported(&'static str),
    #[error("{0} program headers (at most {MAX_PHDRS})")]
    TooManyHeaders(u16),
    #[error("segment {index}: {reason}")]
    BadSegment { index: usize, reason: String },
    #[error("no loadable segment")]
    NoSegments,
    #[error("{0}")]
    BadHeaders(String),
    #[error("reading the file: {0}")]
    Read(#[from] std::io::Error),
    #[error("copying {} into guest memory at {addr:#x}: {err}", path.display())]
    Copy { path: std::path::PathBuf, addr: u64, err: String },
}

/// A `PT_LOAD` segment: `file_len` bytes at `offset` in the file go to guest
/// physical `addr`; the segment spans `mem_len` bytes there (the rest is zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub addr: u64,
    pub file_len: u64,
    pub mem_len: u64,
}

/// What the header says: the entry point and the segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

impl ElfImage {
    /// The first address past the highest segment.
    pub fn end(&self) -> u64 {
        self.segments.iter().map(|s| s.addr + s.mem_len).max().unwrap_or(0)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads and checks the headers of the ELF in `file` (`file_len` bytes): segments
/// within the file, non-overlapping, at or above `lowest` and ending at or below
/// `top` in guest memory.
pub fn parse(file: &mut File, file_len: u64, lowest: u64, top: u64) -> Result<ElfImage, ElfError> {
    let mut ehdr = [0u8; EHDR_LEN];
    file.seek(SeekFrom::Start(0))?;
    if file.read_exact(&mut ehdr).is_err() || &ehdr[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if ehdr[4] != 2 {
        return Err(ElfError::Unsupported("not 64-bit"));
    }
    if ehdr[5] != 1 {
        return Err(ElfError::Unsupported("not little-endian"));
    }
    if u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(ElfError::Unsupported("not x86-64"));
    }
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 32), usize::from(u16_at(&ehdr, 54)), u16_at(&ehdr, 56));
    if phentsize != PHDR_LEN {
        return Err(ElfError::Unsupported("program header size is not 56"));
    }
    if phnum > MAX_PHDRS {
        return Err(ElfError::TooManyHeaders(phnum));
    }
    let table_len = PHDR_LEN * usize::from(phnum);
    if phoff.checked_add(table_len as u64).is_none_or(|end| end > file_len) {
        return Err(ElfError::BadHeaders(format!(
            "the program headers at {phoff:#x}+{table_len:#x} are beyond the file's {file_len} bytes"
        )));
    }
    let mut phdrs = vec![0u8; table_len];
    file.seek(SeekFrom::Start(phoff))?;
    file.read_exact(&mut phdrs)?;
    let mut segments: Vec<Segment> = Vec::new();
    for (index, ph) in phdrs.chunks_exact(PHDR_LEN).enumerate() {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let s = Segment { offset: u64_at(ph, 8), addr: u64_at(ph, 24), file_len: u64_at(ph, 32), mem_len: u64_at(ph, 40) };
        let bad = |reason: String| ElfError::BadSegment { index, reason };
        if s.file_len > s.mem_len {
            return Err(bad(format!("{} bytes in the file, more than its {} in memory", s.file_len, s.mem_len)));
        }
        if s.offset.checked_add(s.file_len).is_none_or(|end| end > file_len) {
            return Err(bad(format!("bytes {:#x}+{:#x} are beyond the file's {file_len}", s.offset, s.file_len)));
        }
        match s.addr.checked_add(s.mem_len) {
            Some(end) if s.addr >= lowest && end <= top => {}
            _ => return Err(bad(format!("{:#x}+{:#x} is outside guest memory {lowest:#x}..{top:#x}", s.addr, s.mem_len))),
        }
        if let Some(other) = segments.iter().find(|o| s.addr < o.addr + o.mem_len && o.addr < s.addr + s.mem_len) {
            return Err(bad(format!("{:#x}+{:#x} overlaps the segment at {:#x}", s.addr, s.mem_len, other.addr)));
        }
        segments.push(s);
    }
    if segments.is_empty() {
        return Err(ElfError::NoSegments);
    }
    // The vCPU starts at the entry point as a physical address: it must be loaded code.
    let entry = u64_at(&ehdr, 24);
    if !segments.iter().any(|s| entry >= s.addr && entry < s.addr + s.file_len) {
        return Err(ElfError::BadHeaders(format!("the entry point {entry:#x} is not in any loadable segment's bytes")));
    }
    Ok(ElfImage { entry, segments })
}

/// One copy job: `len` bytes at `offset` of `file` (opened from `path`, which names
/// it in errors) to guest `addr`.
#[derive(Clone, Copy, Debug)]
pub struct Copy<'a> {
    pub file: &'a File,
    pub path: &'a Path,
    pub offset: u64,
    pub addr: u64,
    pub len: u64,
}

/// `copies` split into chunks of at most [`CHUNK`] bytes.
fn chunks<'a>(copies: &[Copy<'a>]) -> Vec<Copy<'a>> {
    let mut out = Vec::new();
    for c in copies {
        let mut done = 0;
        while done < c.len {
            let len = (c.len - done).min(CHUNK);
            out.push(Copy { offset: c.offset + done, addr: c.addr + done, len, ..*c });
            done += len;
        }
    }
    out
}

/// Copies every range of `copies` from its file into guest memory, on up to
/// [`MAX_WORKERS`] threads (the host's CPUs). The first error is returned.
pub fn copy_parallel(memory: &GuestMemoryMmap, copies: &[Copy<'_>]) -> Result<(), ElfError> {
    let jobs = chunks(copies);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_WORKERS).min(jobs.len().max(1));
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<ElfError>> = Mutex::new(None);
    let work = || {
        // Each worker reopens the files it reads through /proc/self/fd: the very
        // files the caller opened and checked (whatever their paths name now), each
        // with an offset of the worker's own.
        let mut open: Vec<(RawFd, File)> = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(job) = jobs.get(i) else { return };
            if let Err(e) = copy_one(memory, job, &mut open) {
                failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                // The others stop at their next job.
                next.store(jobs.len(), Ordering::Relaxed);
                return;
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..workers {
            s.spawn(work);
        }
        work();
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn copy_one(memory: &GuestMemoryMmap, job: &Copy<'_>, open: &mut Vec<(RawFd, File)>) -> Result<(), ElfError> {
    let failed = |err: String| ElfError::Copy { path: job.path.to_path_buf(), addr: job.addr, err };
    let fd = job.file.as_raw_fd();
    let file = match open.iter().position(|(f, _)| *f == fd) {
        Some(i) => &mut open[i].1,
        None => {
            let reopened = File::open(format!("/proc/self/fd/{fd}")).map_err(|e| failed(format!("reopening it: {e}")))?;
            open.push((fd, reopened));
            &mut open.last_mut().expect("just pushed").1
        }
    };
    file.seek(SeekFrom::Start(job.offset)).map_err(|e| failed(e.to_string()))?;
    let len = usize::try_from(job.len).map_err(|_| failed("chunk too large".into()))?;
    memory.read_exact_volatile_from(GuestAddress(job.addr), file, len).map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 x86-64 file with the given (paddr, bytes, mem_len) PT_LOAD segments
    /// and a PT_NOTE, its data after the headers.
    fn elf(entry: u64, segments: &[(u64, &[u8], u64)]) -> Vec<u8> {
        let phnum = segments.len() + 1;
        let mut e = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
        e.extend_from_slice(&2u16.to_le_bytes());
        e.extend_from_slice(&62u16.to_le_bytes());
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&entry.to_le_bytes());
        e.extend_from_slice(&64u64.to_le_bytes());
        e.extend_from_slice(&0u64.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, u16::try_from(phnum).unwrap(), 64, 0, 0] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        let mut data_at = (64 + 56 * phnum) as u64;
        let mut data = Vec::new();
        for &(paddr, bytes, mem_len) in segments {
            e.extend_from_slice(&PT_LOAD.to_le_bytes());
            e.extend_from_slice(&7u32.to_le_bytes());
            for v in [data_at, paddr | 0xffff_ffff_0000_0000, paddr, bytes.len() as u64, mem_len, 0x1000] {
                e.extend_from_slice(&v.to_le_bytes());
            }
            data.extend_from_slice(bytes);
            data_at += bytes.len() as u64;
        }
        e.extend_from_slice(&4u32.to_le_bytes()); // PT_NOTE: skipped
        e.extend_from_slice(&[0; 52]);
        e.extend_from_slice(&data);
        e
    }

    fn file_with(name: &str, bytes: &[u8]) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("vfvm-elf-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        (path, file)
    }

    #[test]
    fn segments_load_at_their_physical_addresses_across_chunks() {
        let big: Vec<u8> = (0..2 * CHUNK + 12345).map(|i| u8::try_from(i % 253).unwrap()).collect();
        let small = b"second segment";
        let image = elf(0x100_0000, &[(0x100_0000, &big, big.len() as u64 + 0x1000), (0x400_0000, small, 0x1000)]);
        let (path, mut file) = file_with("ok", &image);
        let memory = crate::memory::guest_memory(128 << 20, crate::memory::Backing::Private).unwrap();
        let parsed = parse(&mut file, image.len() as u64, 0x10_0000, 128 << 20).unwrap();
        assert_eq!(parsed.entry, 0x100_0000);
        assert_eq!(parsed.segments.len(), 2);
        assert_eq!(parsed.end(), 0x400_1000);
        // The file is renamed away before the copy: the copy reads the file that was checked.
        let moved = path.with_extension("moved");
        std::fs::rename(&path, &moved).unwrap();
        std::fs::write(&path, b"another file now").unwrap();
        let copies: Vec<Copy> =
            parsed.segments.iter().map(|s| Copy { file: &file, path: &path, offset: s.offset, addr: s.addr, len: s.file_len }).collect();
        assert_eq!(chunks(&copies).len(), 4, "three chunks of the big segment, one of the small");
        copy_parallel(&memory, &copies).unwrap();
        let mut back = vec![0u8; big.len()];
        memory.read_slice(&mut back, GuestAddress(0x100_0000)).unwrap();
        assert!(back == big, "the big segment came back different");
        let mut back = vec![0u8; small.len()];
        memory.read_slice(&mut back, GuestAddress(0x400_0000)).unwrap();
        assert_eq!(&back, small);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&moved).unwrap();
    }

    #[test]
    fn bad_headers_are_refused_with_the_reason() {
        let seg = [0x90u8; 64];
        let check = |name: &str, image: Vec<u8>, want: &str| {
            let (path, mut file) = file_with(name, &image);
            let e = parse(&mut file, image.len() as u64, 0x10_0000, 64 << 20).unwrap_err().to_string();
            std::fs::remove_file(&path).unwrap();
            assert!(e.contains(want), "{name}: {e:?} does not say {want:?}");
        };
        check("text", b"#!/bin/sh\n".repeat(10), "not an ELF");
        let mut e32 = elf(0x20_0000, &[(0x20_0000, &seg, 64)]);
        e32[4] = 1;
        check("32", e32, "not 64-bit");
        let mut arm = elf(0x20_0000, &[(0x20_0000, &seg, 64)]);
        arm[18] = 183;
        check("arm", arm, "not x86-64");
        check("low", elf(0x1000, &[(0x1000, &seg, 64)]), "outside guest memory");
        check("high", elf(0x20_0000, &[(63 << 20, &seg, 2 << 20)]), "outside guest memory");
        check("fsz", elf(0x20_0000, &[(0x20_0000, &seg, 16)]), "more than its 16 in memory");
        check("overlap", elf(0x20_0000, &[(0x20_0000, &seg, 0x1000), (0x20_0800, &seg, 64)]), "overlaps");
        let mut short = elf(0x20_0000, &[(0x20_0000, &seg, 64)]);
        short.truncate(short.len() - 10);
        check("short", short, "beyond the file");
        let mut many = elf(0x20_0000, &[(0x20_0000, &seg, 64)]);
        many[56..58].copy_from_slice(&500u16.to_le_bytes());
        check("many", many, "500 program headers");
        let mut none = elf(0x20_0000, &[(0x20_0000, &seg, 64)]);
        none[64..68].copy_from_slice(&4u32.to_le_bytes());
        check("none", none, "no loadable segment");
        check("virtual entry", elf(0xffff_ffff_8100_0000, &[(0x20_0000, &seg, 64)]), "entry point 0xffffffff81000000 is not in any");
        let mut far = elf(0x20_0000, &[(0x20_0000, &seg, 64)]);
        far[32..40].copy_from_slice(&0x10_0000u64.to_le_bytes());
        check("phoff", far, "program headers at 0x100000+0x70 are beyond the file");
    }

    #[test]
    fn a_file_that_shrank_is_a_copy_error_naming_the_address() {
        let (path, file) = file_with("gone", &[1u8; 100]);
        let memory = crate::memory::guest_memory(64 << 20, crate::memory::Backing::Private).unwrap();
        let e = copy_parallel(&memory, &[Copy { file: &file, path: &path, offset: 0, addr: 0x20_0000, len: 4096 }]).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(e.to_string().contains("0x200000") && e.to_string().contains("vfvm-elf-"), "{e}");
    }
}
