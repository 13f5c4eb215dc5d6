//! The lab's initramfs images, built from busybox and the cached kernel's modules,
//! stored content-addressed in the cache so a second run reuses them untouched.
//!
//! - L2: PID 1 of the emulated machine. Mounts this machine's root read-only over 9p
//!   with a tmpfs overlay on top, runs `vfvm-lab inside setup` there, then the
//!   requested command, chrooted, and records its exit status in the run directory.
//! - L3: a minimal guest that reports reaching userspace and powers off, for booting
//!   under L2's KVM.
//! - L3 probe: the L3 guest plus this very binary (stripped, with its shared
//!   libraries), the virtio-vsock and virtio-fs modules and the ACPI button driver;
//!   /init runs `vfvm-lab guest vsock-probe` (or the `vfvm.probe_cmd=` one, e.g.
//!   `virtiofs-probe`) with the arguments of `vfvm.probe=A,B,...` on the kernel
//!   command line, then (given `vfvm.power_button`) waits for the ACPI power button
//!   before it powers off.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

use crate::cpio::Archive;
use crate::kernel::Kernel;
use crate::modules::{module_name, ModuleIndex};

/// Console marker prefix for the harness's own lines from inside L2.
pub const L2_MARKER: &str = "@@vfvm-lab@@";
/// Console marker prefix of an L3 guest's init.
pub const L3_MARKER: &str = "@@vfvm-l3@@";

/// Modules L2's init loads itself, before the shared root is reachable.
const L2_EARLY_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

pub struct Images {
    pub l2_initrd: PathBuf,
    pub l3_initrd: PathBuf,
    pub probe_initrd: PathBuf,
}

pub fn ensure(cache: &Path, kernel: &Kernel, busybox: &Path) -> Result<Images> {
    let dir = cache.join("images");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let busybox_bytes = std::fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let l2 = l2_initrd(kernel, &busybox_bytes)?;
    let l3 = l3_initrd(kernel, &busybox_bytes)?;
    let probe = probe_initrd(kernel, &busybox_bytes)?;
    let probe_initrd = store(&dir, "l3-probe", &probe)?;
    crate::guest_image::prune(&dir, "l3-probe", &probe_initrd);
    Ok(Images { l2_initrd: store(&dir, &format!("l2-{}", kernel.release), &l2)?, l3_initrd: store(&dir, "l3-test", &l3)?, probe_initrd })
}

/// Writes `bytes` under a name derived from their hash, unless already there.
pub fn store(dir: &Path, stem: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(format!("{stem}-{:016x}.cpio", fnv1a64(bytes)));
    if !path.is_file() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)?;
        crate::progress!("built image {} ({} KiB)", path.display(), bytes.len() / 1024);
    }
    Ok(path)
}

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Adds `wanted` and their dependencies under /mods; returns the names in load order.
fn add_modules(a: &mut Archive, kernel: &Kernel, wanted: &[&str]) -> Result<Vec<String>> {
    let index = ModuleIndex::parse(&kernel.read_modules_file("modules.dep")?, &kernel.read_modules_file("modules.builtin")?)?;
    let mut names = Vec::new();
    for rel in index.load_order(wanted)? {
        let name = module_name(&rel);
        let bytes = read_module(&kernel.modules_dir().join(&rel))?;
        a.file(&format!("/mods/{name}.ko"), 0o644, &bytes);
        names.push(name);
    }
    Ok(names)
}

fn base_tree(a: &mut Archive, busybox: &[u8]) {
    for d in ["/bin", "/dev", "/proc", "/sys", "/mods"] {
        a.dir(d, 0o755);
    }
    a.file("/bin/busybox", 0o755, busybox);
    // The kernel opens /dev/console for init before anything can mount devtmpfs.
    a.char_device("/dev/console", 0o600, 5, 1);
}

fn l2_initrd(kernel: &Kernel, busybox: &[u8]) -> Result<Vec<u8>> {
    let mut a = Archive::new();
    base_tree(&mut a, busybox);
    let names = add_modules(&mut a, kernel, L2_EARLY_MODULES)?;
    a.file("/init", 0o755, l2_init_script(&names).as_bytes());
    a.finish()
}

/// A module's bytes, decompressed: busybox `insmod` takes plain `.ko` files only.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(tool) => {
            let out = std::process::Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {tool} to decompress {}", path.display()))?;
            anyhow::ensure!(out.status.success(), "{tool} -dc {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            Ok(out.stdout)
        }
    }
}

fn l2_init_script(modules: &[String]) -> String {
    format!(
        r#"#!/bin/busybox sh
# PID 1 of the lab's L2 machine, generated by vfvm-lab. Every step either works or
# reports "{m} error ..." and powers off, so the harness never waits on a dead guest.
/bin/busybox --install -s /bin
# Full PATH for the chroot; in the initramfs itself only /bin exists.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say() {{ echo "{m} $*"; }}
die() {{ say "error $*"; sync; poweroff -f; }}
up() {{ cut -d' ' -f1 /proc/uptime; }}
mount -t proc proc /proc && mount -t sysfs sys /sys && mount -t devtmpfs dev /dev || die "mounting /proc, /sys and /dev"
say "stage kernel up after $(up)s; loading 9p and overlay"
for m in {mods}; do insmod /mods/$m.ko || die "insmod $m"; done
mkdir -p /host /share /out /ovl
o=trans=virtio,version=9p2000.L,msize=512000
# The host's root is read-only here and stays put for this L2's life: cache=loose
# keeps what L2 reads (binaries, kernels, guest images) in its page cache, as a
# machine's own disk would, instead of fetching it through 9p on every read.
mount -t 9p -o $o,ro,cache=loose hostfs /host || die "mounting the host's root (9p tag hostfs)"
mount -t 9p -o $o labrun /share || die "mounting the run directory (9p tag labrun)"
mount -t 9p -o $o labout /out || die "mounting the output directory (9p tag labout)"
. /share/lab.env || die "reading lab.env from the run directory"
mount -t tmpfs -o mode=755 tmpfs /ovl && mkdir -p /ovl/upper /ovl/work /ovl/root || die "tmpfs for the overlay"
R=/ovl/root
mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work $R || die "overlay over the host's root"
for d in proc sys dev; do mount --bind /$d $R/$d || die "bind /$d"; done
mkdir -p $R/dev/pts && mount -t devpts devpts $R/dev/pts || die "devpts"
# A fresh /run (the host's netns and lock files mean nothing here). /tmp stays the
# host's, writable through the overlay: the caller's checkout may live there.
mount -t tmpfs tmpfs $R/run || die "tmpfs on /run"
mkdir -p $R/lab && mount --bind /share $R/lab && mkdir -p $R/lab/out && mount --bind /out $R/lab/out || die "bind the run directory at /lab"
K=$(uname -r)
mkdir -p $R/lib/modules/$K && mount --bind $R$VFVM_LAB_MODULES $R/lib/modules/$K || die "bind the lab kernel's modules at /lib/modules/$K"
say "stage userspace after $(up)s; preparing KVM and the SR-IOV NIC"
chroot $R "$VFVM_LAB_SELF" inside setup --vfs "$VFVM_LAB_VFS" </dev/null || die "lab setup failed (see its output above)"
say "ready $(up)"
chroot $R /bin/sh /lab/step.sh </dev/null
echo $? > /share/exit-status
sync
say "exit $(cat /share/exit-status)"
poweroff -f
"#,
        m = L2_MARKER,
        mods = modules.join(" "),
    )
}

/// The L3 test guest. It reports reaching userspace; given `vfvm.ping=ADDR/LEN,PEER`
/// on its command line it also loads igbvf, puts ADDR on the passed-through VF and
/// pings PEER, reporting `ping ok <if> <mac>` or `ping failed`.
fn l3_initrd(kernel: &Kernel, busybox: &[u8]) -> Result<Vec<u8>> {
    let mut a = Archive::new();
    base_tree(&mut a, busybox);
    let mods = add_modules(&mut a, kernel, &["igbvf"])?;
    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys
echo "{m} userspace $(cut -d' ' -f1 /proc/uptime)"
# Benchmarks read the VM's exit counters at this point: vfvm.hold keeps it there.
grep -qw vfvm.hold /proc/cmdline && exec sleep 2147483647
for w in $(cat /proc/cmdline); do case $w in vfvm.ping=*) P=${{w#vfvm.ping=}};; esac; done
if [ -n "$P" ]; then
  for m in {mods}; do insmod /mods/$m.ko || echo "{m} insmod $m failed"; done
  IF=$(ls /sys/class/net | grep -vx lo | head -n 1)
  # Single pings until the first reply (link and ARP settle; at most 15 tries of
  # up to 2 s each), then three that must all be answered.
  warm() {{ for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do ping -c 1 -W 2 $1 >/dev/null && return 0; done; return 1; }}
  if [ -n "$IF" ] && ip addr add ${{P%,*}} dev $IF && ip link set $IF up && warm ${{P#*,}} && ping -c 3 -W 5 ${{P#*,}}; then
    echo "{m} ping ok $IF $(cat /sys/class/net/$IF/address)"
  else
    echo "{m} ping failed (netdevs: $(ls /sys/class/net | tr '\n' ' '))"
  fi
fi
poweroff -f
"#,
        m = L3_MARKER,
        mods = mods.join(" "),
    );
    a.file("/init", 0o755, init.as_bytes());
    a.finish()
}

/// This binary without its debug sections (a third of the size: the guest unpacks
/// the initramfs under nested emulation), or as it is if objcopy is missing.
fn stripped_self() -> Result<Vec<u8>> {
    let me = crate::host::self_exe()?;
    let tmp = std::env::temp_dir().join(format!("vfvm-lab-stripped-{}", std::process::id()));
    let stripped =
        std::process::Command::new("objcopy").arg("--strip-debug").arg(&me).arg(&tmp).status().map(|s| s.success()).unwrap_or(false);
    let bytes = std::fs::read(if stripped { &tmp } else { &me }).with_context(|| format!("reading {}", me.display()));
    let _ = std::fs::remove_file(&tmp);
    bytes
}

/// The vsock probe guest (see the module doc).
fn probe_initrd(kernel: &Kernel, busybox: &[u8]) -> Result<Vec<u8>> {
    let mut a = Archive::new();
    base_tree(&mut a, busybox);
    let mods = add_modules(&mut a, kernel, &["vmw_vsock_virtio_transport", "virtio_pci", "button", "evdev", "fuse", "virtiofs"])?;
    let me = crate::host::self_exe()?;
    let deps = crate::elf::runtime_deps(&me).context("the probe's shared libraries")?;
    // Directories first (the kernel's unpacker does not create parents); sorted, so
    // each comes after its own parent.
    let dirs: std::collections::BTreeSet<&Path> =
        deps.iter().flat_map(|d| d.ancestors().skip(1)).filter(|p| *p != Path::new("/")).collect();
    for d in dirs {
        a.dir(&d.to_string_lossy(), 0o755);
    }
    for dep in &deps {
        let bytes = std::fs::read(dep).with_context(|| format!("reading {}", dep.display()))?;
        a.file(&dep.to_string_lossy(), 0o755, &bytes);
    }
    a.file("/bin/vfvm-probe", 0o755, &stripped_self()?);
    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "{m} userspace $(cut -d' ' -f1 /proc/uptime)"
for m in {mods}; do insmod /mods/$m.ko || echo "{m} insmod $m failed"; done
C=vsock-probe
for w in $(cat /proc/cmdline); do case $w in vfvm.probe=*) A=${{w#vfvm.probe=}};; vfvm.probe_cmd=*) C=${{w#vfvm.probe_cmd=}};; esac; done
/bin/vfvm-probe guest $C $(echo "$A" | tr ',' ' ')
echo "{m} probe exit $?"
# With vfvm.power_button on the command line, power off only when the button is pressed.
grep -qw vfvm.power_button /proc/cmdline && /bin/vfvm-probe guest wait-power-button
poweroff -f
"#,
        m = L3_MARKER,
        mods = mods.join(" "),
    );
    a.file("/init", 0o755, init.as_bytes());
    a.finish()
}
