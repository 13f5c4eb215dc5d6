//! Just enough ELF reading to put a dynamically linked program into an initramfs that
//! has no libc: its interpreter (`PT_INTERP`) and, transitively, the shared libraries
//! it needs (`DT_NEEDED`), found the way the guest's `ld.so` will find them without an
//! `ld.so.cache`: `DT_RPATH`/`DT_RUNPATH` (with `$ORIGIN`), then the default
//! directories. 64-bit little-endian ELF only (the lab and the guest are x86_64).

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;
const EM_X86_64: u16 = 62;

/// Where the guest's loader looks when a library is not found through RPATH/RUNPATH
/// and there is no `/etc/ld.so.cache` (Debian's multiarch directories first).
pub const DEFAULT_LIB_DIRS: &[&str] = &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

/// What the dynamic loader needs to know about one ELF file.
#[derive(Debug, Default, PartialEq)]
pub struct Dynamic {
    /// `PT_INTERP`: the program interpreter's path (executables only).
    pub interp: Option<String>,
    /// `DT_NEEDED` sonames, in order.
    pub needed: Vec<String>,
    /// `DT_RUNPATH`, or `DT_RPATH` when there is no RUNPATH, split on `:`.
    pub search: Vec<String>,
}

struct Elf<'a> {
    bytes: &'a [u8],
}

impl Elf<'_> {
    fn uint(&self, at: u64, len: usize) -> Result<u64> {
        let at = usize::try_from(at)?;
        let raw = self.bytes.get(at..at + len).context("truncated ELF")?;
        Ok(raw.iter().rev().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn u16_at(&self, at: u64) -> Result<u16> {
        let at = usize::try_from(at)?;
        let raw = self.bytes.get(at..at + 2).context("truncated ELF")?;
        Ok(u16::from_le_bytes([raw[0], raw[1]]))
    }

    fn u32_at(&self, at: u64) -> Result<u32> {
        let at = usize::try_from(at)?;
        let raw = self.bytes.get(at..at + 4).context("truncated ELF")?;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
    }

    fn cstr(&self, at: u64) -> Result<String> {
        let rest = self.bytes.get(usize::try_from(at)?..).context("ELF string offset out of range")?;
        let end = rest.iter().position(|b| *b == 0).context("unterminated ELF string")?;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
}

/// Reads the interpreter, needed libraries and search path of an ELF file's bytes.
/// A static executable has neither interpreter nor needed libraries.
pub fn parse(bytes: &[u8]) -> Result<Dynamic> {
    ensure!(bytes.get(0..4) == Some(b"\x7fELF"), "not an ELF file");
    ensure!(bytes.get(4..6) == Some(&[2, 1][..]), "not a 64-bit little-endian ELF file");
    let elf = Elf { bytes };
    let machine = elf.u16_at(0x12)?;
    ensure!(machine == EM_X86_64, "ELF machine {machine}, expected x86_64 ({EM_X86_64})");
    let (phoff, phentsize, phnum) = (elf.uint(0x20, 8)?, elf.uint(0x36, 2)?, elf.uint(0x38, 2)?);
    let mut loads = Vec::new(); // (vaddr, offset, filesz)
    let mut dynamic = None; // (offset, filesz)
    let mut out = Dynamic::default();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (p_type, offset, vaddr, filesz) = (elf.u32_at(ph)?, elf.uint(ph + 8, 8)?, elf.uint(ph + 16, 8)?, elf.uint(ph + 32, 8)?);
        match p_type {
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC => dynamic = Some((offset, filesz)),
            PT_INTERP => out.interp = Some(elf.cstr(offset)?),
            _ => {}
        }
    }
    let Some((dyn_off, dyn_size)) = dynamic else { return Ok(out) };
    // The string table is given by address: map it to a file offset through PT_LOAD.
    let to_offset = |addr: u64| -> Result<u64> {
        loads
            .iter()
            .find(|(vaddr, _, filesz)| addr >= *vaddr && addr < vaddr + filesz)
            .map(|(vaddr, offset, _)| addr - vaddr + offset)
            .with_context(|| format!("ELF address {addr:#x} is in no loaded segment"))
    };
    let (mut strtab, mut needed, mut rpath, mut runpath) = (None, Vec::new(), None, None);
    for at in (dyn_off..dyn_off + dyn_size).step_by(16) {
        let (tag, val) = (elf.uint(at, 8)?, elf.uint(at + 8, 8)?);
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed.push(val),
            DT_STRTAB => strtab = Some(to_offset(val)?),
            DT_RPATH => rpath = Some(val),
            DT_RUNPATH => runpath = Some(val),
            _ => {}
        }
    }
    if needed.is_empty() && rpath.is_none() && runpath.is_none() {
        return Ok(out);
    }
    let strtab = strtab.context("ELF has a dynamic section without DT_STRTAB")?;
    for n in needed {
        out.needed.push(elf.cstr(strtab + n)?);
    }
    if let Some(p) = runpath.or(rpath) {
        out.search = elf.cstr(strtab + p)?.split(':').filter(|s| !s.is_empty()).map(str::to_string).collect();
    }
    Ok(out)
}

fn read_dynamic(path: &Path) -> Result<Dynamic> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{}", path.display()))
}

/// Everything `program` needs at run time besides itself: its interpreter and every
/// shared library in the closure of `DT_NEEDED`, as the absolute paths the guest's
/// loader will open (they may be symlinks on this machine: the caller copies them as
/// such). Sorted; empty for a static executable. A library found nowhere is an error
/// naming it and who needs it.
pub fn runtime_deps(program: &Path) -> Result<Vec<PathBuf>> {
    let top = read_dynamic(program)?;
    let mut found = BTreeSet::new();
    if let Some(interp) = &top.interp {
        let interp = PathBuf::from(interp);
        ensure!(interp.is_file(), "{}: its interpreter {} does not exist on this machine", program.display(), interp.display());
        found.insert(interp);
    }
    let mut seen_sonames = BTreeSet::new();
    let mut queue = vec![(program.to_path_buf(), top)];
    while let Some((who, info)) = queue.pop() {
        for soname in &info.needed {
            if !seen_sonames.insert(soname.clone()) {
                continue;
            }
            let lib = find_library(soname, &who, &info.search)?;
            let lib_info = read_dynamic(&lib)?;
            found.insert(lib.clone());
            queue.push((lib, lib_info));
        }
    }
    Ok(found.into_iter().collect())
}

fn find_library(soname: &str, needed_by: &Path, search: &[String]) -> Result<PathBuf> {
    if soname.contains('/') {
        let p = PathBuf::from(soname);
        ensure!(p.is_file(), "{} needs {soname}, which does not exist", needed_by.display());
        return Ok(p);
    }
    let origin = needed_by.parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let dirs: Vec<String> = search
        .iter()
        .map(|d| d.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin))
        .chain(DEFAULT_LIB_DIRS.iter().map(|d| d.to_string()))
        .collect();
    for dir in &dirs {
        let candidate = Path::new(dir).join(soname);
        // Skip what the loader would skip: files of another class or machine.
        if candidate.is_file() && std::fs::read(&candidate).map(|b| parse(&b).is_ok()).unwrap_or(false) {
            return Ok(candidate);
        }
    }
    bail!("{} needs the shared library {soname}, which is in none of {}", needed_by.display(), dirs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deps(path: &Path) -> Vec<String> {
        runtime_deps(path).unwrap().iter().map(|p| p.to_string_lossy().into_owned()).collect()
    }

    fn assert_glibc_closure(program: &Path) {
        let info = read_dynamic(program).unwrap();
        let interp = info.interp.clone().expect("a dynamic executable has PT_INTERP");
        assert!(info.needed.iter().any(|n| n == "libc.so.6"), "{}: {:?}", program.display(), info.needed);
        let all = deps(program);
        assert!(all.contains(&interp), "{}: interpreter {interp} missing from {all:?}", program.display());
        assert!(all.iter().any(|p| p.ends_with("/libc.so.6")), "{}: no libc in {all:?}", program.display());
        for p in &all {
            assert!(Path::new(p).exists(), "{p} does not exist");
        }
    }

    #[test]
    fn ls_and_this_test_binary_resolve_to_existing_files() {
        assert_glibc_closure(Path::new("/bin/ls"));
        assert_glibc_closure(&std::env::current_exe().unwrap());
        // ls needs more than libc (libselinux, which needs libpcre2): the closure is transitive.
        let ls = deps(Path::new("/bin/ls"));
        assert!(ls.len() > 2, "{ls:?}");
    }

    #[test]
    fn a_static_binary_needs_nothing() {
        let busybox = crate::host::find_busybox().expect("busybox-static is needed: run `cargo xtask install`");
        assert_eq!(read_dynamic(&busybox).unwrap(), Dynamic::default());
        assert!(runtime_deps(&busybox).unwrap().is_empty());
    }

    /// A minimal dynamic ELF: one PT_LOAD over the whole file, a PT_DYNAMIC with
    /// DT_NEEDED entries and DT_STRTAB, and an interpreter.
    fn fake_elf(interp: &str, needed: &[&str]) -> Vec<u8> {
        let (ehdr, phdr) = (64u16, 56u16);
        let interp_off = u64::from(ehdr) + 3 * u64::from(phdr);
        let mut strtab = vec![0u8];
        let mut name_offs = Vec::new();
        for n in needed {
            name_offs.push(strtab.len() as u64);
            strtab.extend_from_slice(n.as_bytes());
            strtab.push(0);
        }
        let strtab_off = interp_off + interp.len() as u64 + 1;
        let dyn_off = (strtab_off + strtab.len() as u64).next_multiple_of(8);
        let mut dynamic: Vec<(u64, u64)> = name_offs.iter().map(|o| (DT_NEEDED, *o)).collect();
        dynamic.push((DT_STRTAB, strtab_off));
        dynamic.push((DT_NULL, 0));
        let total = dyn_off + 16 * dynamic.len() as u64;

        let mut b = Vec::new();
        b.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        b.extend_from_slice(&3u16.to_le_bytes()); // ET_DYN
        b.extend_from_slice(&EM_X86_64.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes()); // entry
        b.extend_from_slice(&u64::from(ehdr).to_le_bytes()); // phoff
        b.extend_from_slice(&0u64.to_le_bytes()); // shoff
        b.extend_from_slice(&0u32.to_le_bytes()); // flags
        for v in [ehdr, phdr, 3, 64, 0, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let mut ph = |p_type: u32, off: u64, size: u64| {
            b.extend_from_slice(&p_type.to_le_bytes());
            b.extend_from_slice(&4u32.to_le_bytes());
            for v in [off, off, off, size, size, 8] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        };
        ph(PT_LOAD, 0, total);
        ph(PT_INTERP, interp_off, interp.len() as u64 + 1);
        ph(PT_DYNAMIC, dyn_off, 16 * dynamic.len() as u64);
        b.extend_from_slice(interp.as_bytes());
        b.push(0);
        b.extend_from_slice(&strtab);
        b.resize(usize::try_from(dyn_off).unwrap(), 0);
        for (tag, val) in dynamic {
            b.extend_from_slice(&tag.to_le_bytes());
            b.extend_from_slice(&val.to_le_bytes());
        }
        b
    }

    #[test]
    fn a_missing_needed_library_is_named() {
        let interp = "/lib64/ld-linux-x86-64.so.2";
        let bytes = fake_elf(interp, &["libc.so.6", "libvfvm-nonexistent.so.7"]);
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed.interp.as_deref(), Some(interp));
        assert_eq!(parsed.needed, ["libc.so.6", "libvfvm-nonexistent.so.7"]);

        let path = std::env::temp_dir().join(format!("vfvm-lab-fake-elf-{}", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let err = format!("{:#}", runtime_deps(&path).unwrap_err());
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("libvfvm-nonexistent.so.7"), "{err}");
        assert!(err.contains(&path.to_string_lossy().into_owned()), "should name who needs it: {err}");

        // And the fake's own libc-only variant resolves.
        let ok = fake_elf(interp, &["libc.so.6"]);
        std::fs::write(&path, ok).unwrap();
        let all = runtime_deps(&path);
        std::fs::remove_file(&path).unwrap();
        let all = all.unwrap();
        assert!(all.iter().any(|p| p.ends_with("libc.so.6")) && all.contains(&PathBuf::from(interp)), "{all:?}");
    }

    #[test]
    fn non_elf_input_is_rejected() {
        assert!(parse(b"#!/bin/sh\n").unwrap_err().to_string().contains("not an ELF"));
    }
}
