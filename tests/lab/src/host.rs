//! What the lab needs on this machine, installed idempotently from Debian's archive
//! (through the mirror apt already uses: see apt_sources.rs), quietly (see install_log.rs):
//! QEMU >= 8 with the `igb` SR-IOV NIC model (bookworm-backports), a static busybox
//! for the initramfs images, kmod for `depmod`/`modprobe`, iproute2 for L2,
//! containerd 1.6 with runc (2.1 is unpacked beside it: see containerd.rs), the CNI
//! plugins for CRI pods, and protoc (the CRI client's gRPC code is generated at build).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::apt_sources::{self, AptSources};
use crate::install_log::InstallLog;
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

/// The cargo target directory this program was built in (`<target>/<profile>/vfvm-lab`,
/// or `<target>/<profile>/deps/...` for a test binary): release builds of the
/// workspace's other binaries go there too, so they share one build cache.
pub fn target_dir() -> Result<PathBuf> {
    let exe = self_exe()?;
    exe.ancestors()
        .skip(1)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .with_context(|| format!("{} is not inside a cargo target directory (no CACHEDIR.TAG above it)", exe.display()))
}

/// Builds `package` of this workspace with `cargo build --release --quiet` (a second
/// when it is up to date) into `target_dir`; returns `<target_dir>/release/<package>`.
pub fn release_build(target_dir: &Path, package: &str) -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().context("locating the workspace")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    progress!("building {package} (release): cargo build --release -p {package}");
    run_shown(
        Command::new(cargo)
            .args(["build", "--release", "--quiet", "-p", package, "--manifest-path"])
            .arg(workspace.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(&workspace),
    )?;
    let binary = target_dir.join("release").join(package);
    anyhow::ensure!(binary.is_file(), "cargo build --release -p {package} did not produce {}", binary.display());
    Ok(binary)
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
        let Some(p_type) = usize::try_from(phoff + i * phentsize).ok().and_then(|at| field(at, 4)) else { return Ok(false) };
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

/// Runs a command with its output shown (cargo's build progress), failing on a non-zero exit.
pub fn run_shown(cmd: &mut Command) -> Result<()> {
    let status = cmd.stdin(Stdio::null()).status().with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// `apt-get install` of `packages`, non-interactive and without recommends.
fn apt_get_install(extra_args: &[&str], packages: &[&str]) -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y", "-q", "--no-install-recommends"]).args(extra_args).args(packages);
    cmd
}

/// `apt-get update`, its output (as every install step's) in the install log.
fn apt_get_update(log: &InstallLog, why: &str) -> Result<()> {
    log.run(&format!("apt-get update ({why})"), Command::new("apt-get").args(["update", "-q"]))
}

/// Installs whatever of the lab's tools is missing; does nothing (and asks no
/// registry) when everything is already there. Each apt step says one line; their
/// output goes to `log`.
pub fn ensure_packages(log: &InstallLog) -> Result<()> {
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
    // The guest image's on-demand modules are zstd files.
    if !on_path("zstd") {
        plain.push("zstd");
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
    // The VMM's ACPI tests read its DSDT back with ACPICA's disassembler.
    if !on_path("iasl") {
        plain.push("acpica-tools");
    }
    // The pod network benchmark's iperf3 (in a test image, and on L2 as the client).
    if !on_path("iperf3") {
        plain.push("iperf3");
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
    let codename = apt_sources::system_codename()?;
    let backports = format!("{codename}-backports");
    if need_qemu {
        // Debian stable's QEMU 7.2 has no igb; backports' QEMU 10 does. Backports
        // comes from the mirror (or proxy) apt already uses for the release.
        let sources = AptSources::system()?;
        if !sources.has_suite(&backports) {
            let mirror = sources
                .mirror(&codename)
                .with_context(|| format!("QEMU with the igb NIC comes from {backports}, added from the mirror apt uses for {codename}"))?;
            let file = Path::new(apt_sources::ETC_APT).join("sources.list.d/vfvm-lab-backports.sources");
            progress!("adding {backports} from {} to apt's sources ({})", mirror.uri, file.display());
            std::fs::write(&file, mirror.sources_stanza(&[&backports])).with_context(|| format!("writing {}", file.display()))?;
        }
    }
    apt_get_update(log, "before installing the lab's packages")?;
    if !plain.is_empty() {
        log.run(&format!("installing {}", plain.join(", ")), &mut apt_get_install(&[], &plain))?;
    }
    if need_qemu {
        log.run(&format!("installing qemu-system-x86 from {backports}"), &mut apt_get_install(&["-t", &backports], &["qemu-system-x86"]))?;
        if !qemu_has_igb() {
            bail!("installed qemu-system-x86 from {backports}, but `{QEMU} -device help` still lists no igb device");
        }
    }
    Ok(())
}

/// The virtiofsd the VMM's virtio-fs tests run as the vhost-user backend.
pub const VIRTIOFSD_VERSION: &str = "1.14.0";

fn virtiofsd_works() -> bool {
    Command::new("virtiofsd").arg("--version").stdin(Stdio::null()).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Installs virtiofsd unless `virtiofsd --version` already works: Debian's is older
/// than the one tested, so it is built from crates.io (`cargo install --locked`) into
/// /usr/local, on PATH both here and inside L2. Its build needs pkg-config and the
/// libcap-ng and libseccomp headers, installed with apt if missing. Each step says one
/// line; their output goes to `log`.
pub fn ensure_virtiofsd(log: &InstallLog) -> Result<()> {
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
        apt_get_update(log, "before installing virtiofsd's build dependencies")?;
        log.run(&format!("installing virtiofsd's build dependencies: {}", dev.join(", ")), &mut apt_get_install(&[], &dev))?;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    log.run(
        &format!("building virtiofsd {VIRTIOFSD_VERSION} with cargo install into /usr/local (once; a few minutes)"),
        Command::new(cargo).args(["install", "--locked", "--root", "/usr/local", "--version", VIRTIOFSD_VERSION, "virtiofsd"]),
    )?;
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
