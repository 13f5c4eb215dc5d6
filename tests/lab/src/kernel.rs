//! Debian's generic `linux-image-*-amd64`, fetched once with apt and kept in the lab's
//! cache. It has everything the lab needs as modules (igb, igbvf, vfio-pci, kvm_amd,
//! 9p, vsock); the `-cloud-amd64` flavour lacks several of them.

use anyhow::{bail, Context, Result};
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

    pub fn read_modules_file(&self, name: &str) -> Result<String> {
        let path = self.modules_dir().join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }
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
