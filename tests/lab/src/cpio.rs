//! A minimal writer for the "newc" cpio format the kernel unpacks as an initramfs.
//!
//! Written here rather than shelling out to `cpio` so that images are byte-for-byte
//! reproducible (fixed inode numbers and mtimes) and can hold device nodes such as
//! `/dev/console` without needing root or `mknod`.

use anyhow::{bail, Result};

const MODE_DIR: u32 = 0o040000;
const MODE_FILE: u32 = 0o100000;
const MODE_CHAR: u32 = 0o020000;
const MODE_SYMLINK: u32 = 0o120000;

/// An in-memory newc archive, built entry by entry.
#[derive(Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_ino: u32,
    /// The first entry whose data or name is too long for newc's 32-bit size fields:
    /// `finish` reports it, so adding entries stays infallible.
    oversized: Option<String>,
}

impl Archive {
    pub fn new() -> Self {
        Self { bytes: Vec::new(), next_ino: 1, oversized: None }
    }

    /// A directory. Parents must be added first (the kernel does not create them).
    pub fn dir(&mut self, path: &str, perm: u32) {
        self.entry(path, MODE_DIR | perm, &[], (0, 0));
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, MODE_FILE | perm, data, (0, 0));
    }

    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.entry(path, MODE_CHAR | perm, &[], (major, minor));
    }

    /// A symbolic link at `path` pointing to `target` (stored as the entry's data).
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, MODE_SYMLINK | 0o777, target.as_bytes(), (0, 0));
    }

    /// Closes the archive with the trailer entry and returns its bytes; fails if an
    /// entry did not fit the format.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        if let Some(problem) = self.oversized {
            bail!("cannot write the cpio archive: {problem}");
        }
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        Ok(self.bytes)
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name = path.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & MODE_DIR != 0 { 2 } else { 1 };
        // newc's name size counts the terminating NUL.
        let (Ok(data_size), Ok(name_size)) = (u32::try_from(data.len()), u32::try_from(name.len() + 1)) else {
            self.oversized.get_or_insert_with(|| {
                format!(
                    "entry {path}: {} bytes of data, a {}-byte name; newc's size fields hold at most {}",
                    data.len(),
                    name.len(),
                    u32::MAX
                )
            });
            return;
        };
        let fields = [
            ino, mode, 0, // uid
            0, // gid
            nlink, 0, // mtime: fixed, for reproducible images
            data_size, 0, // dev major
            0, // dev minor
            rdev.0, rdev.1, name_size, 0, // checksum: unused by newc
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut a = Archive::new();
        a.dir("/bin", 0o755);
        a.file("/bin/hello", 0o755, b"#!/bin/sh\necho hi\n");
        a.dir("/dev", 0o755);
        a.char_device("/dev/console", 0o600, 5, 1);
        a.symlink("/bin/sh", "hello");
        a.finish().expect("a small archive fits newc")
    }

    #[test]
    fn layout_is_aligned_and_ends_with_trailer() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let tail = String::from_utf8_lossy(&bytes[bytes.len() - 128..]).to_string();
        assert!(tail.contains("TRAILER!!!"), "no trailer in {tail:?}");
    }

    #[test]
    fn output_is_reproducible() {
        assert_eq!(sample(), sample());
    }

    /// The real check: an independent cpio implementation (busybox, which the lab
    /// needs anyway) lists exactly the entries we wrote, with their types.
    #[test]
    fn busybox_cpio_reads_it_back() {
        let Some(busybox) = crate::host::find_busybox() else {
            panic!("busybox is needed for this test: run `cargo xtask install` (or apt-get install busybox-static)");
        };
        let mut child = Command::new(busybox)
            .args(["cpio", "-t", "-v"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "busybox cpio failed: {}", String::from_utf8_lossy(&out.stderr));
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(lines[0].starts_with('d') && lines[0].ends_with(" bin"), "{listing}");
        assert!(lines[1].starts_with("-rwxr-xr-x") && lines[1].ends_with(" bin/hello"), "{listing}");
        assert!(lines[2].starts_with('d') && lines[2].ends_with(" dev"), "{listing}");
        assert!(lines[3].starts_with("crw-------") && lines[3].ends_with(" dev/console"), "{listing}");
        assert!(lines[4].starts_with('l') && lines[4].ends_with(" bin/sh -> hello"), "{listing}");
    }
}
