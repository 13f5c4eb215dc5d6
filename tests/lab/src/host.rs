//! What the lab needs on this machine, installed idempotently from Debian's archive:
//! QEMU >= 8 with the `igb` SR-IOV NIC model (bookworm-backports), a static busybox
//! for the initramfs images, kmod for `depmod`/`modprobe`, iproute2 for L2,
//! containerd 1.6 with runc (2.1 is unpacked beside it: see containerd.rs), the CNI
//! plugins for CRI pods, and protoc (the CRI client's gRPC code is generated at build).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::progress;

pub const QEMU: &str = "qemu-system-x86_64";

/// This program's path. `cargo test --workspace` may rebuild it while it runs (feature
/// unification differs from `cargo run -p`), leaving `/proc/self/exe` as
/// "PATH (deleted)": the fresh build at PATH is the same code, so use that.
pub fn self_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the vfvm-lab binary")?;
    let text = exe.to_string_lossy();
    let path = match text.strip_suffix(" (deleted)") {
        Some(original) => PathBuf::from(original),
        None => exe.clone(),
    };
    path.canonicalize().with_context(|| format!("the vfvm-lab binary {} is gone", path.display()))
}

/// A statically linked busybox, if one is installed (busybox-static's `/bin/busybox`).
pub fn find_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"].iter().map(PathBuf::from).find(|p| is_static_elf(p).unwrap_or(false))
}

/// True for an ELF executable without a `PT_INTERP` header, i.e. one that runs without
/// a dynamic loader (as it must inside an initramfs that has no libc).
pub fn is_static_elf(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let field = |at: usize, len: usize| -> Option<u64> {
        let raw = bytes.get(at..at + len)?;
        Some(raw.iter().rev().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    };
    // 64-bit little-endian ELF only: the lab is x86_64.
    if bytes.get(0..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Ok(false);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (field(0x20, 8), field(0x36, 2), field(0x38, 2)) else {
        return Ok(false);
    };
    const PT_INTERP: u64 = 3;
    for i in 0..phnum {
        let Some(p_type) = field((phoff + i * phentsize) as usize, 4) else { return Ok(false) };
        if p_type == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether the installed QEMU emulates the `igb` (82576) NIC, which has SR-IOV.
pub fn qemu_has_igb() -> bool {
    Command::new(QEMU)
        .args(["-device", "help"])
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("name \"igb\""))
        .unwrap_or(false)
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(cmd).is_file())).unwrap_or(false)
        || ["/usr/sbin", "/sbin"].iter().any(|dir| Path::new(dir).join(cmd).is_file())
}

/// Runs a command, failing with its name, exit status and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with its output shown (apt's progress), failing on a non-zero exit.
pub fn run_shown(cmd: &mut Command) -> Result<()> {
    let status = cmd.stdin(Stdio::null()).status().with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn debian_codename() -> Result<String> {
    let os = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    os.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .context("/etc/os-release has no VERSION_CODENAME: the lab installs its tools from Debian's archive")
}

/// Installs whatever of the lab's tools is missing; does nothing (and asks no
/// registry) when everything is already there.
pub fn ensure_packages() -> Result<()> {
    let mut plain = Vec::new();
    if find_busybox().is_none() {
        plain.push("busybox-static");
    }
    if !on_path("depmod") || !on_path("modprobe") {
        plain.push("kmod");
    }
    if !on_path("ip") {
        plain.push("iproute2");
    }
    if !on_path("xz") {
        plain.push("xz-utils");
    }
    // The containerd the shim is tested with (1.6; 2.1 comes from sid, see
    // containerd.rs), and runc, which it brings, for the runc baseline.
    if !Path::new("/usr/bin/containerd").is_file() || !on_path("runc") {
        plain.push("containerd");
    }
    // CRI pods' network in the lab (bridge, host-local, loopback).
    if !Path::new("/usr/lib/cni/bridge").is_file() {
        plain.push("containernetworking-plugins");
    }
    // k8s-cri (the CRI test client) compiles the CRI protos with protoc.
    if !on_path("protoc") {
        plain.push("protobuf-compiler");
    }
    let need_qemu = !qemu_has_igb();
    if plain.is_empty() && !need_qemu {
        return Ok(());
    }
    if !on_path("apt-get") {
        bail!(
            "the lab needs {}{} and installs them with apt-get, which this machine lacks",
            plain.join(", "),
            if need_qemu { " and QEMU >= 8 with the igb NIC" } else { "" }
        );
    }
    let codename = debian_codename()?;
    let backports = format!("{codename}-backports");
    if need_qemu {
        // Debian stable's QEMU 7.2 has no igb; backports' QEMU 10 does.
        let list = Path::new("/etc/apt/sources.list.d/vfvm-lab-backports.list");
        let line = format!("deb http://deb.debian.org/debian {backports} main\n");
        if !already_configured(&backports)? {
            progress!("adding {backports} to apt's sources ({})", list.display());
            std::fs::write(list, line).with_context(|| format!("writing {}", list.display()))?;
        }
    }
    progress!("installing lab packages: {}", {
        let mut all = plain.clone();
        if need_qemu {
            all.push("qemu-system-x86 (from backports)");
        }
        all.join(", ")
    });
    run_shown(Command::new("apt-get").args(["update", "-qq"]))?;
    let apt_install = |extra: &[&str], pkgs: &[&str]| {
        run_shown(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(extra)
                .args(pkgs),
        )
    };
    if !plain.is_empty() {
        apt_install(&[], &plain)?;
    }
    if need_qemu {
        apt_install(&["-t", &backports], &["qemu-system-x86"])?;
        if !qemu_has_igb() {
            bail!("installed qemu-system-x86 from {backports}, but `{QEMU} -device help` still lists no igb device");
        }
    }
    Ok(())
}

fn already_configured(suite: &str) -> Result<bool> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    Ok(files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .any(|text| text.lines().any(|l| !l.trim_start().starts_with('#') && l.split_whitespace().any(|w| w == suite))))
}

/// The virtiofsd the VMM's virtio-fs tests run as the vhost-user backend.
pub const VIRTIOFSD_VERSION: &str = "1.14.0";

fn virtiofsd_works() -> bool {
    Command::new("virtiofsd").arg("--version").stdin(Stdio::null()).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Installs virtiofsd unless `virtiofsd --version` already works: Debian's is older
/// than the one tested, so it is built from crates.io (`cargo install --locked`) into
/// /usr/local, on PATH both here and inside L2. Its build needs pkg-config and the
/// libcap-ng and libseccomp headers, installed with apt if missing.
pub fn ensure_virtiofsd() -> Result<()> {
    if virtiofsd_works() {
        return Ok(());
    }
    let pkg_config_has =
        |lib: &str| Command::new("pkg-config").args(["--exists", lib]).stdin(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
    let mut dev: Vec<&str> = Vec::new();
    if !on_path("pkg-config") {
        dev.push("pkg-config");
    }
    if !pkg_config_has("libcap-ng") {
        dev.push("libcap-ng-dev");
    }
    if !pkg_config_has("libseccomp") {
        dev.push("libseccomp-dev");
    }
    if !dev.is_empty() {
        if !on_path("apt-get") {
            bail!("building virtiofsd needs {}, installed with apt-get, which this machine lacks", dev.join(", "));
        }
        progress!("installing virtiofsd's build dependencies: {}", dev.join(", "));
        run_shown(Command::new("apt-get").args(["update", "-qq"]))?;
        run_shown(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&dev),
        )?;
    }
    progress!("building virtiofsd {VIRTIOFSD_VERSION} with cargo install (once; a few minutes)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_shown(Command::new(cargo).args(["install", "--locked", "--root", "/usr/local", "--version", VIRTIOFSD_VERSION, "virtiofsd"]))?;
    if !virtiofsd_works() {
        bail!("installed virtiofsd {VIRTIOFSD_VERSION} into /usr/local/bin, but `virtiofsd --version` still fails (is /usr/local/bin on PATH?)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_elves_are_told_apart() {
        // This test binary itself is dynamically linked against glibc.
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
        let busybox = find_busybox().expect("busybox-static is needed: run `cargo xtask install`");
        assert!(is_static_elf(&busybox).unwrap());
        // Not an ELF at all.
        let tmp = std::env::temp_dir().join(format!("vfvm-lab-notelf-{}", std::process::id()));
        std::fs::write(&tmp, b"#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&tmp).unwrap());
        std::fs::remove_file(tmp).unwrap();
    }
}
