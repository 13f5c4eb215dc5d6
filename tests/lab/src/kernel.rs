//! Debian's generic `linux-image-*-amd64`, fetched once with apt and kept in the lab's
//! cache. It has everything the lab needs as modules (igb, igbvf, vfio-pci, kvm_amd,
//! 9p, vsock); the `-cloud-amd64` flavour lacks several of them.

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::host::run;
use crate::install_log::InstallLog;
use crate::progress;

/// An unpacked kernel package: `<root>/boot/vmlinuz-<release>` and
/// `<root>/lib/modules/<release>` with a fresh `modules.dep`.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub root: PathBuf,
    pub release: String,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join("boot").join(format!("vmlinuz-{}", self.release))
    }

    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// The same kernel as an uncompressed ELF `vmlinux` (what Firecracker and PVH boot
    /// take), unpacked from the bzImage's payload once and kept beside it.
    pub fn vmlinux(&self) -> Result<PathBuf> {
        let out = self.root.join("boot").join(format!("vmlinux-{}", self.release));
        if out.is_file() {
            return Ok(out);
        }
        let bzimage = std::fs::read(self.vmlinuz()).with_context(|| format!("reading {}", self.vmlinuz().display()))?;
        let elf = elf_from_bzimage(&bzimage).with_context(|| format!("unpacking the ELF kernel from {}", self.vmlinuz().display()))?;
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, elf).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
        Ok(out)
    }

    pub fn read_modules_file(&self, name: &str) -> Result<String> {
        let path = self.modules_dir().join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }
}

/// The compressed kernel inside a bzImage (boot protocol 2.08+: `payload_offset` and
/// `payload_length` in the setup header, counted from the protected-mode code after
/// the setup sectors), decompressed with the tool its magic names.
pub fn elf_from_bzimage(bzimage: &[u8]) -> Result<Vec<u8>> {
    let u32_at = |at: usize| -> Result<usize> {
        let bytes = bzimage.get(at..at + 4).context("truncated setup header")?;
        usize::try_from(u32::from_le_bytes(bytes.try_into().expect("four bytes"))).context("a 32-bit field")
    };
    ensure!(bzimage.get(0x202..0x206) == Some(&b"HdrS"[..]), "no bzImage setup header (HdrS)");
    let setup_sects = match bzimage.get(0x1f1).copied().context("truncated setup header")? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let payload = bzimage.get(start..start + u32_at(0x24c)?).context("the payload lies beyond the file")?;
    let tool = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => "xz",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [0x1f, 0x8b, ..] => "gzip",
        _ => bail!("a payload compressed with something other than xz, zstd or gzip (magic {:02x?})", &payload[..payload.len().min(6)]),
    };
    // The build appends the decompressed size (4 bytes) after the compressed stream.
    let stream = &payload[..payload.len().saturating_sub(4)];
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool} -dc"))?;
    let mut stdin = child.stdin.take().context("decompressor stdin")?;
    let stream = stream.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &stream));
    let out = child.wait_with_output().with_context(|| format!("waiting for {tool}"))?;
    let _ = writer.join();
    ensure!(out.status.success(), "{tool} -dc failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    ensure!(out.stdout.starts_with(b"\x7fELF"), "{tool} gave {} bytes that are not an ELF file", out.stdout.len());
    Ok(out.stdout)
}

/// The kernel in `cache`, fetching it first if the cache has none. The package is
/// `$VFVM_LAB_KERNEL_PKG` if set, else what `linux-image-amd64` depends on. apt's
/// output goes to `<cache>/install.log`.
pub fn ensure(cache: &Path) -> Result<Kernel> {
    let kernels = cache.join("kernel");
    let pinned = kernels.join("current");
    if let Ok(release) = std::fs::read_to_string(&pinned) {
        let kernel = Kernel { root: kernels.join(release.trim()), release: release.trim().to_string() };
        if kernel.vmlinuz().is_file() && kernel.modules_dir().join("modules.dep").is_file() {
            return Ok(kernel);
        }
        progress!("cached kernel {} is incomplete; fetching it again", kernel.release);
    }
    let log = InstallLog::in_cache(cache);
    let package = match std::env::var("VFVM_LAB_KERNEL_PKG") {
        Ok(p) if !p.is_empty() => p,
        _ => generic_kernel_package(&log)?,
    };
    let release = package
        .strip_prefix("linux-image-")
        .filter(|r| r.ends_with("-amd64") && !r.contains('/'))
        .with_context(|| format!("kernel package {package:?}: expected linux-image-<release>-amd64"))?
        .to_string();
    let staging = kernels.join(format!(".staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    log.run(
        &format!("fetching {package} with apt-get download (once; cached in {})", kernels.display()),
        Command::new("apt-get").args(["download", "-q", &package]).current_dir(&staging),
    )?;
    let deb = std::fs::read_dir(&staging)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb in {}", staging.display()))?;
    let root = staging.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    std::fs::remove_file(&deb)?;
    if !root.join("lib/modules").join(&release).is_dir() {
        bail!("{package} unpacked without lib/modules/{release}");
    }
    run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    let target = kernels.join(&release);
    let _ = std::fs::remove_dir_all(&target);
    std::fs::rename(&root, &target)?;
    std::fs::remove_dir_all(&staging)?;
    std::fs::write(&pinned, &release)?;
    let kernel = Kernel { root: target, release };
    if !kernel.vmlinuz().is_file() {
        bail!("{package} has no {}", kernel.vmlinuz().display());
    }
    progress!("kernel {} ready", kernel.release);
    Ok(kernel)
}

fn generic_kernel_package(log: &InstallLog) -> Result<String> {
    let depends = |refresh: bool| -> Result<Option<String>> {
        if refresh {
            log.run("apt-get update (apt-cache knows no linux-image-amd64 yet)", Command::new("apt-get").args(["update", "-q"]))?;
        }
        let out = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"])).unwrap_or_default();
        Ok(out
            .split_whitespace()
            .find(|w| w.starts_with("linux-image-") && w.ends_with("-amd64") && *w != "linux-image-amd64")
            .map(str::to_string))
    };
    match depends(false)? {
        Some(p) => Ok(p),
        None => depends(true)?.context("apt-cache knows no linux-image-amd64 dependency even after apt-get update"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped file: one setup sector after the boot sector, `HdrS`, and the
    /// payload (as the kernel build leaves it: stream, then the 4-byte size) at an offset.
    fn bzimage_with(payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 2 * 512 + 0x40];
        image[0x1f1] = 1;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x248..0x24c].copy_from_slice(&0x40u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&u32::try_from(payload.len() + 4).unwrap().to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(&[0xaa; 4]);
        image
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut child = Command::new("xz")
            .args(["-c", "--check=crc32"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("xz (xz-utils) is needed: run `cargo xtask install`");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), data).unwrap();
        child.wait_with_output().unwrap().stdout
    }

    #[test]
    fn the_elf_kernel_comes_out_of_the_bzimage_payload() {
        let elf = [&b"\x7fELF"[..], &[7u8; 5000]].concat();
        assert_eq!(elf_from_bzimage(&bzimage_with(&xz(&elf))).unwrap(), elf);
        let not_elf = elf_from_bzimage(&bzimage_with(&xz(b"plain text"))).unwrap_err().to_string();
        assert!(not_elf.contains("not an ELF file"), "{not_elf}");
        let lz4 = elf_from_bzimage(&bzimage_with(&[0x02, 0x21, 0x4c, 0x18, 0, 0])).unwrap_err().to_string();
        assert!(lz4.contains("other than xz, zstd or gzip"), "{lz4}");
        let mut no_header = bzimage_with(&xz(&elf));
        no_header[0x202] = b'X';
        assert!(elf_from_bzimage(&no_header).unwrap_err().to_string().contains("HdrS"));
    }
}
