//! The vfvm guest image: Debian's generic kernel (the lab's cached one) plus an
//! initramfs whose `/init` is `vfvm-agent`. `cargo xtask image [--agent PATH] [--out DIR]`.
//!
//! The image costs (almost) nothing beyond a bare busybox initramfs boot: the agent is
//! a release build stripped of its symbols (`objcopy --strip-all` of whatever agent it
//! is given), only what the agent needs to serve over vsock is loaded at boot, and
//! every other module it carries is loaded by the agent when needed (device drivers by
//! modalias, at boot for the PCI devices present and on hot-plug; `virtiofs`, `overlay`,
//! `8021q` before the agent mounts or creates what needs them).
//!
//! Layout of the initramfs (every entry uid/gid 0, mtime 0: byte-for-byte reproducible;
//! the archive is then compressed as `--compress` says, see [`Compression`]):
//!
//! ```text
//! /init                              the agent (PID 1), stripped, mode 0755
//! <interpreter and libraries>        the agent's PT_INTERP and DT_NEEDED closure, at the
//!                                    paths the guest's ld.so opens, with this machine's
//!                                    symlinks kept (e.g. /lib -> usr/lib on merged /usr)
//! /lib/modules/<release>/kernel/...  the modules below and their dependencies,
//!                                    decompressed (plain .ko), at their modules.dep paths
//! /lib/modules/<release>/modules.load  the modules to load at boot, in order (format below)
//! /lib/modules/<release>/modules.dep   every module of the image with the modules it needs
//! /lib/modules/<release>/modules.alias the aliases (device modaliases, `fs-<type>`, ...)
//!                                    of the image's modules
//! /dev/console                       char device 5:1 (the kernel opens it for init)
//! /proc /sys /dev /run /tmp /etc /sbin  empty directories (/tmp 1777)
//! ```
//!
//! `modules.dep` and `modules.alias` are depmod's text formats, filtered to the
//! modules of the image: `kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko
//! ...` (paths relative to the directory, every module the first needs, transitively;
//! lines in load order, dependencies first) and `alias <pattern> <module_name>`.
//!
//! With `--init-script` (for tests) `/init` is instead a busybox shell script that loads
//! every module of `modules.load` with `insmod`, then every other module of
//! `modules.dep` in its order (the `.ko.zst` ones with `vfvm-agent --insert-module`), reports `/proc/modules` and the agent's `--version` on
//! the console with the L3 marker, and powers off; busybox is at `/bin/busybox` and
//! the agent at `/sbin/vfvm-agent`.
//!
//! # `modules.load`
//!
//! Plain text, UTF-8, one entry per line. A line that is empty or starts with `#` is a
//! comment. Every other line is the path of one module file relative to the directory
//! holding `modules.load` (i.e. `/lib/modules/<release>/`), for example
//! `kernel/net/vmw_vsock/vsock.ko`. Lines are in load order: every module comes after
//! all the modules it depends on, and each appears once. The module's name is the
//! file name without `.ko`, with `-` read as `_`. Modules built into the kernel are
//! not listed. The loader (the agent; the guest has no modprobe) calls
//! `finit_module(fd, "", 0)` on each in order, treating `EEXIST` as success.

use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cpio::Archive;
use crate::images::{fnv1a64, read_module, store, L3_MARKER};
use crate::kernel::Kernel;
use crate::modules::{module_name, Availability, ModuleIndex};
use crate::{elf, host, progress};

/// The boot list's file name in `/lib/modules/<release>/`.
pub const MODULES_LOAD: &str = "modules.load";
/// The image's module index (depmod's text formats, filtered to its modules).
pub const MODULES_DEP: &str = "modules.dep";
pub const MODULES_ALIAS: &str = "modules.alias";

/// Loaded at boot (`modules.load`), with their dependencies: what the agent needs to
/// serve over vsock (the virtio PCI transport and the vsock stack). Everything else
/// the image carries is loaded on demand.
const BOOT_MODULES: &[&str] = &["virtio_pci", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"];

/// Modules every vfvm guest needs: the build fails if one is neither a module nor built in.
const REQUIRED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "fuse",
    "virtiofs",
    "overlay",
];

/// Modules included when this kernel has them as modules, noted as skipped otherwise:
/// (name, what it is, the kernel config symbol that builds it in as a bool option).
const OPTIONAL_MODULES: &[(&str, &str, Option<&str>)] = &[
    ("9pnet_virtio", "9p over virtio", None),
    ("9p", "9p filesystem", None),
    ("pciehp", "PCIe native hot-plug", Some("CONFIG_HOTPLUG_PCI_PCIE")),
    ("acpiphp", "ACPI PCI hot-plug", Some("CONFIG_HOTPLUG_PCI_ACPI")),
    ("shpchp", "SHPC PCI hot-plug", Some("CONFIG_HOTPLUG_PCI_SHPC")),
    ("igbvf", "Intel 82576 VF", None),
    ("ixgbevf", "Intel 82599/X540 VF", None),
    ("iavf", "Intel Adaptive VF (X710/E810)", None),
    ("mlx5_core", "Mellanox ConnectX-4+ (VFs included)", None),
    // The agent's VLAN interfaces; modules.dep brings garp, mrp, stp and llc.
    ("8021q", "802.1Q VLAN links", None),
];

/// `cargo xtask image` options.
#[derive(Debug, Default)]
pub struct Options {
    pub agent: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub init_script: bool,
    /// `None`: [`Compression::DEFAULT`].
    pub compress: Option<Compression>,
}

pub const USAGE: &str = "\
usage: cargo xtask image [--agent PATH] [--out DIR] [--compress KIND] [--init-script]

  --agent PATH     the agent binary to put at /init, stripped of its symbols (default:
                   the workspace's release agent, built with cargo build --release)
  --out DIR        also write DIR/vmlinux, DIR/initrd.img and DIR/manifest.txt (each
                   only when its content changed); without it the kernel and initrd
                   are only in the lab cache
  --compress KIND  how the initramfs is compressed: none, gzip, lz4, zstd or xz
                   (default: none, which the guest boots fastest from, as measured)
  --init-script    for tests: /init is a busybox script that loads the modules, reports
                   them with the L3 console marker and powers off; the agent goes to
                   /sbin/vfvm-agent
";

pub fn parse_options(args: impl IntoIterator<Item = String>) -> Result<Options> {
    let mut opts = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agent" => opts.agent = Some(PathBuf::from(args.next().context("--agent needs a path")?)),
            "--out" => opts.out = Some(PathBuf::from(args.next().context("--out needs a directory")?)),
            "--compress" => opts.compress = Some(Compression::parse(&args.next().context("--compress needs a kind")?)?),
            "--init-script" => opts.init_script = true,
            other => bail!("unknown image option {other:?}\n\n{USAGE}"),
        }
    }
    Ok(opts)
}

/// How the initramfs is compressed. The kernel unpacks each of them (`CONFIG_RD_*=y`
/// in Debian's); which boots fastest was measured in the lab (see `DEFAULT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Lz4,
    Zstd,
    Xz,
}

impl Compression {
    /// Uncompressed boots fastest. Measured in the lab on 2026-12-03 (release
    /// vfvm-vmm in L2, 1 vCPU, 512 MiB, the shim's command line; VMM start to the
    /// agent answering Health over hybrid vsock; variants alternating, two runs of 4
    /// and 6 rounds): medians none 9.79 / 12.06 s (12.5 MB), lz4 10.18 / 12.92 s
    /// (4.9 MB), zstd 10.31 / 13.57 s (3.7 MB); the bare 2 MiB busybox initramfs to
    /// its init's first line 13.76 / 15.32 s. Reading 8 MB more costs the VMM less
    /// than decompressing costs the guest's CPU.
    pub const DEFAULT: Compression = Compression::None;
    pub const ALL: [Compression; 5] = [Compression::None, Compression::Gzip, Compression::Lz4, Compression::Zstd, Compression::Xz];

    pub fn parse(s: &str) -> Result<Compression> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .with_context(|| format!("--compress {s:?}: expected one of {}", Compression::ALL.map(|c| c.name()).join(", ")))
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
        }
    }

    /// The file name suffix after `.cpio`.
    fn suffix(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Gzip => Some("gz"),
            Compression::Lz4 => Some("lz4"),
            Compression::Zstd => Some("zst"),
            Compression::Xz => Some("xz"),
        }
    }

    /// The tool and its arguments, compressing stdin to stdout in a form the kernel
    /// unpacks (lz4's legacy frames, xz with CRC32), the same bytes every time.
    fn compressor(self) -> Option<(&'static str, &'static [&'static str])> {
        match self {
            Compression::None => None,
            Compression::Gzip => Some(("gzip", &["-n", "-9", "-c"])),
            Compression::Lz4 => Some(("lz4", &["-l", "-9", "-q", "-c"])),
            Compression::Zstd => Some(("zstd", &["-q", "-9", "-T1", "-c"])),
            Compression::Xz => Some(("xz", &["--check=crc32", "-6", "-T1", "-c"])),
        }
    }

    pub fn compress(self, bytes: &[u8]) -> Result<Vec<u8>> {
        match self.compressor() {
            None => Ok(bytes.to_vec()),
            Some((tool, args)) => filter(tool, args, bytes),
        }
    }

    #[cfg(test)]
    pub fn decompress(self, bytes: &[u8]) -> Result<Vec<u8>> {
        match self.compressor() {
            None => Ok(bytes.to_vec()),
            Some((tool, _)) => filter(tool, &["-d", "-c"], bytes),
        }
    }
}

/// Pipes `input` through `tool args`, returning its output.
fn filter(tool: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool} (is it installed?)"))?;
    let mut stdin = child.stdin.take().context("the compressor's stdin")?;
    let out = std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(input));
        let out = child.wait_with_output();
        (writer.join(), out)
    });
    let out = out.1.with_context(|| format!("waiting for {tool}"))?;
    ensure!(out.status.success(), "{tool} {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    Ok(out.stdout)
}

/// What went into an image.
#[derive(Debug, Default)]
pub struct Manifest {
    pub release: String,
    /// The agent's size as given and as put into the image (stripped).
    pub agent_sizes: (usize, usize),
    /// Every non-directory entry: (path, description).
    pub files: Vec<(String, String)>,
    /// Every module of the image, dependencies first: (name, path relative to
    /// /lib/modules/<release>, size).
    pub modules: Vec<(String, String, usize)>,
    /// The modules loaded at boot, in order (`modules.load`); the others are loaded on demand.
    pub boot_modules: Vec<String>,
    /// Lines of the image's `modules.alias`.
    pub aliases: usize,
    /// Wanted modules that are built into this kernel (nothing to load).
    pub built_in: Vec<String>,
    /// Optional modules this kernel does not have as modules, with why.
    pub skipped: Vec<String>,
    /// The archive's size, and how it is stored.
    pub initrd_size: usize,
    pub compression: Option<Compression>,
    pub stored_size: usize,
}

impl Manifest {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let stored = match self.compression {
            None | Some(Compression::None) => "uncompressed".to_string(),
            Some(c) => format!("{} compressed to {} bytes", c.name(), self.stored_size),
        };
        let _ = writeln!(s, "guest image for kernel {} ({} byte initramfs, {stored})", self.release, self.initrd_size);
        let _ = writeln!(s, "agent: {} bytes, stripped to {}", self.agent_sizes.0, self.agent_sizes.1);
        let _ = writeln!(s, "files:");
        for (path, what) in &self.files {
            let _ = writeln!(s, "  {path:<60} {what}");
        }
        let _ = writeln!(s, "empty dirs: /proc /sys /dev /run /tmp /etc /sbin");
        let _ = writeln!(s, "modules loaded at boot, in order (/lib/modules/{}/{MODULES_LOAD}):", self.release);
        let mut n = 0;
        for name in &self.boot_modules {
            if let Some((name, path, size)) = self.modules.iter().find(|(m, _, _)| m == name) {
                n += 1;
                let _ = writeln!(s, "  {n:>3} {name:<36} {path} ({size} bytes)");
            }
        }
        let _ = writeln!(s, "modules loaded on demand ({MODULES_DEP}, {MODULES_ALIAS} with {} aliases):", self.aliases);
        for (name, path, size) in self.modules.iter().filter(|(m, _, _)| !self.boot_modules.contains(m)) {
            n += 1;
            let packed = if path.ends_with(".zst") { " before zstd" } else { "" };
            let _ = writeln!(s, "  {n:>3} {name:<36} {path} ({size} bytes{packed})");
        }
        let _ = writeln!(s, "built in (nothing to load): {}", if self.built_in.is_empty() { "-".into() } else { self.built_in.join(", ") });
        let _ = writeln!(s, "skipped:{}", if self.skipped.is_empty() { " -" } else { "" });
        for line in &self.skipped {
            let _ = writeln!(s, "  {line}");
        }
        s
    }

    #[cfg(test)]
    pub fn module_names(&self) -> Vec<&str> {
        self.modules.iter().map(|(n, _, _)| n.as_str()).collect()
    }
}

enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
    Symlink(String),
    CharDev(u32, u32),
}

/// The image's file tree, written out sorted by path (so parents come first and the
/// order does not depend on how it was built).
#[derive(Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
}

/// `/a/./b/../c/` -> `/a/c` (lexically).
fn normalize(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    format!("/{}", out.join("/"))
}

fn parent_and_name(path: &str) -> Result<(String, String)> {
    let path = normalize(path);
    let (parent, name) = path.rsplit_once('/').context("path without a parent")?;
    ensure!(!name.is_empty(), "{path:?} names no file");
    Ok((normalize(parent), name.to_string()))
}

impl Tree {
    /// `path` with every symlink of the tree followed (the last component too).
    fn resolve(&self, path: &str) -> Result<String> {
        let mut path = normalize(path);
        'restart: for _ in 0..40 {
            let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
            let mut cur = String::new();
            for (i, c) in comps.iter().enumerate() {
                let next = format!("{cur}/{c}");
                if let Some(Node::Symlink(target)) = self.nodes.get(&next) {
                    let base = if target.starts_with('/') { "" } else { cur.as_str() };
                    path = normalize(&format!("{base}/{target}/{}", comps[i + 1..].join("/")));
                    continue 'restart;
                }
                cur = next;
            }
            return Ok(normalize(&cur));
        }
        bail!("too many levels of symlinks in the image resolving {path}")
    }

    fn mkdir_p(&mut self, path: &str, perm: u32) -> Result<String> {
        let path = self.resolve(path)?;
        let mut cur = String::new();
        for c in path.split('/').filter(|c| !c.is_empty()) {
            cur = format!("{cur}/{c}");
            match self.nodes.get(&cur) {
                None => {
                    self.nodes.insert(cur.clone(), Node::Dir(0o755));
                }
                Some(Node::Dir(_)) => {}
                Some(_) => bail!("{cur} is in the image as a non-directory; cannot create {path}"),
            }
        }
        if path != "/" {
            self.nodes.insert(path.clone(), Node::Dir(perm));
        }
        Ok(path)
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<String> {
        let (parent, name) = parent_and_name(path)?;
        let parent = self.mkdir_p(&parent, 0o755).map(|p| if p == "/" { String::new() } else { p })?;
        let full = format!("{parent}/{name}");
        let same = match (self.nodes.get(&full), &node) {
            (None, _) => true,
            (Some(Node::File(p1, d1)), Node::File(p2, d2)) => p1 == p2 && d1 == d2,
            (Some(Node::Symlink(t1)), Node::Symlink(t2)) => t1 == t2,
            _ => false,
        };
        ensure!(same, "{full} would be added to the image twice, differently");
        self.nodes.insert(full.clone(), node);
        Ok(full)
    }

    fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<String> {
        self.insert(path, Node::File(perm, data))
    }

    /// Copies this machine's file at `path` to the same path in the image, recreating
    /// every symlink on the way (in a directory component or the file itself).
    fn host_file(&mut self, path: &str) -> Result<()> {
        let mut path = normalize(path);
        'restart: for _ in 0..40 {
            let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
            let mut cur = String::new();
            for (i, c) in comps.iter().enumerate() {
                let next = format!("{cur}/{c}");
                let meta = std::fs::symlink_metadata(&next).with_context(|| format!("reading {next}"))?;
                if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(&next).with_context(|| format!("reading link {next}"))?;
                    let target = target.to_string_lossy().into_owned();
                    self.insert(&next, Node::Symlink(target.clone()))?;
                    let base = if target.starts_with('/') { "" } else { cur.as_str() };
                    path = normalize(&format!("{base}/{target}/{}", comps[i + 1..].join("/")));
                    continue 'restart;
                }
                let last = i + 1 == comps.len();
                if meta.is_dir() && !last {
                    self.mkdir_p(&next, 0o755)?;
                } else if meta.is_file() && last {
                    use std::os::unix::fs::PermissionsExt;
                    let data = std::fs::read(&next).with_context(|| format!("reading {next}"))?;
                    self.file(&next, meta.permissions().mode() & 0o777, data)?;
                } else {
                    bail!("{next} is neither a directory on the way nor the regular file at the end of {path}");
                }
                cur = next;
            }
            return Ok(());
        }
        bail!("too many levels of symlinks copying {path}")
    }

    fn listing(&self) -> Vec<(String, String)> {
        self.nodes
            .iter()
            .filter_map(|(path, node)| {
                let what = match node {
                    Node::Dir(_) => return None,
                    Node::File(perm, data) => format!("{:>9} bytes  mode {perm:o}", data.len()),
                    Node::Symlink(t) => format!("-> {t}"),
                    Node::CharDev(major, minor) => format!("char device {major}:{minor}"),
                };
                Some((path.clone(), what))
            })
            .collect()
    }

    fn archive(&self) -> Result<Vec<u8>> {
        let mut a = Archive::new();
        for (path, node) in &self.nodes {
            match node {
                Node::Dir(perm) => a.dir(path, *perm),
                Node::File(perm, data) => a.file(path, *perm, data),
                Node::Symlink(target) => a.symlink(path, target),
                Node::CharDev(major, minor) => a.char_device(path, 0o600, *major, *minor),
            }
        }
        a.finish()
    }
}

/// The module set for `kernel`: load order (paths relative to the modules dir) plus
/// the manifest's built-in and skipped notes.
/// `kernel_config`: the kernel's `/boot/config-<release>`, if it has one.
fn select_modules(index: &ModuleIndex, kernel_config: &str) -> Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let (mut wanted, mut built_in, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for m in REQUIRED_MODULES {
        match index.availability(m) {
            Availability::Module => wanted.push(*m),
            Availability::BuiltIn => built_in.push(m.to_string()),
            Availability::Absent => bail!("this kernel has no {m} (neither a module nor built in): a vfvm guest needs it"),
        }
    }
    for (m, what, symbol) in OPTIONAL_MODULES {
        let bool_builtin = symbol.is_some_and(|sym| kernel_config.lines().any(|l| l == format!("{sym}=y")));
        match index.availability(m) {
            Availability::Module => wanted.push(*m),
            Availability::BuiltIn => built_in.push(m.to_string()),
            Availability::Absent if bool_builtin => built_in.push(format!("{m} ({}=y)", symbol.unwrap_or_default())),
            Availability::Absent => skipped.push(format!("{m} ({what}): not in this kernel")),
        }
    }
    Ok((index.load_order(&wanted)?, built_in, skipped))
}

fn test_init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
# Test /init of a vfvm guest image (vfvm-lab image --init-script): loads the modules of
# modules.load like the agent does at boot, then every other module of modules.dep (in
# its order: dependencies first; the zstd ones through the agent), reports what is
# loaded, and powers off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "{m} userspace $(cut -d' ' -f1 /proc/uptime)"
D=/lib/modules/$(uname -r)
ok=0; failed=0
# busybox's insmod reads plain .ko files; the agent inserts the zstd ones as it
# does on demand.
insert() {{
  case "$1" in
    *.zst) /sbin/vfvm-agent --insert-module "$1" ;;
    *) insmod "$1" ;;
  esac
}}
load() {{
  n=${{1##*/}}; n=${{n%.zst}}; n=${{n%.ko}}; n=$(echo "$n" | tr - _)
  [ -e /sys/module/$n/initstate ] && return 0
  if insert "$D/$1"; then ok=$((ok+1)); else failed=$((failed+1)); echo "{m} insmod-failed $1"; fi
}}
while read -r p; do
  case "$p" in ''|'#'*) continue;; esac
  load "$p"
done < "$D/{load}"
echo "{m} boot modules loaded: ok=$ok failed=$failed"
while IFS=: read -r p deps; do
  case "$p" in ''|'#'*) continue;; esac
  load "$p"
done < "$D/{dep}"
echo "{m} insmod ok=$ok failed=$failed"
while read -r name rest; do echo "{m} module $name"; done < /proc/modules
v=$(/sbin/vfvm-agent --version 2>&1)
echo "{m} agent rc=$? $(echo $v | tr '\n' ' ')"
poweroff -f
"#,
        m = L3_MARKER,
        load = MODULES_LOAD,
        dep = MODULES_DEP,
    )
}

/// The agent's bytes without symbols or debug sections (`objcopy --strip-all` on a
/// copy; the file given is left alone). objcopy's output is the same for the same input.
fn stripped(agent: &Path) -> Result<Vec<u8>> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("vfvm-lab-agent-stripped-{}-{seq}", std::process::id()));
    let out = Command::new("objcopy")
        .arg("--strip-all")
        .arg(agent)
        .arg(&tmp)
        .stdin(Stdio::null())
        .output()
        .context("running objcopy (binutils) to strip the agent")?;
    let bytes = if out.status.success() {
        std::fs::read(&tmp).with_context(|| format!("reading {}", tmp.display()))
    } else {
        Err(anyhow::anyhow!(
            "objcopy --strip-all {} failed ({}): {}",
            agent.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    };
    let _ = std::fs::remove_file(&tmp);
    bytes
}

/// The image's module files: what is loaded at boot (`modules.load`), the index of
/// all of them (`modules.dep`, `modules.alias`), and the manifest's module lists.
#[derive(Debug)]
struct ModuleFiles {
    load: String,
    dep: String,
    alias: String,
    boot: Vec<String>,
    aliases: usize,
}

/// A module path without its compression suffix (the image holds plain `.ko` files).
fn plain_path(rel: &str) -> Result<String> {
    ensure!(!rel.ends_with(".gz"), "module {rel}: gzip-compressed modules are not supported");
    let plain = rel.trim_end_matches(".xz").trim_end_matches(".zst").to_string();
    ensure!(plain.ends_with(".ko"), "module {rel}: unknown compression");
    Ok(plain)
}

/// Where a module goes in the image: boot modules as plain `.ko` files (the kernel
/// reads them at every boot), the others zstd-compressed as `.ko.zst`, which the
/// agent inflates when it loads one (a third of their bytes to unpack at boot).
fn image_path(rel: &str, boot: &HashSet<String>) -> Result<String> {
    let plain = plain_path(rel)?;
    Ok(if boot.contains(&module_name(rel)) { plain } else { format!("{plain}.zst") })
}

/// `order`: every module of the image (paths, dependencies first); `boot`: the
/// modules loaded at boot (paths, dependencies first, each in `order`);
/// `kernel_aliases`: the kernel's whole `modules.alias`.
fn module_files(release: &str, index: &ModuleIndex, order: &[String], boot: &[String], kernel_aliases: &str) -> Result<ModuleFiles> {
    let shipped: HashSet<String> = order.iter().map(|p| module_name(p)).collect();
    let at_boot: HashSet<String> = boot.iter().map(|p| module_name(p)).collect();
    let mut load = format!(
        "# vfvm guest kernel modules for {release}, generated by vfvm-lab: the modules loaded at boot,\n\
         # one per line, its path relative to this directory, in load order (dependencies first);\n\
         # '#' lines are comments. The image's other modules (modules.dep) are loaded on demand.\n"
    );
    for rel in boot {
        ensure!(shipped.contains(&module_name(rel)), "boot module {rel} is not among the image's modules");
        load.push_str(&plain_path(rel)?);
        load.push('\n');
    }
    let mut dep = String::new();
    for rel in order {
        let name = module_name(rel);
        let (path, deps) = index.entry(&name).with_context(|| format!("module {name} is not in the kernel's modules.dep"))?;
        let mut line = format!("{}:", image_path(path, &at_boot)?);
        for d in deps {
            ensure!(shipped.contains(&module_name(d)), "module {name} needs {d}, which is not in the image");
            line.push(' ');
            line.push_str(&image_path(d, &at_boot)?);
        }
        dep.push_str(&line);
        dep.push('\n');
    }
    let mut alias = String::from("# Aliases of the vfvm guest image's modules, from the kernel's modules.alias.\n");
    let mut aliases = 0;
    for line in kernel_aliases.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["alias", _, module] = words[..] {
            if shipped.contains(&module.replace('-', "_")) {
                alias.push_str(&words.join(" "));
                alias.push('\n');
                aliases += 1;
            }
        }
    }
    Ok(ModuleFiles { load, dep, alias, boot: boot.iter().map(|p| module_name(p)).collect(), aliases })
}

/// Builds the initramfs in memory (uncompressed). `test_busybox`: the `--init-script` variant.
pub fn build(kernel: &Kernel, agent: &Path, test_busybox: Option<&Path>) -> Result<(Vec<u8>, Manifest)> {
    let mut tree = Tree::default();
    progress!("resolving the shared libraries of {}", agent.display());
    let deps = elf::runtime_deps(agent).with_context(|| format!("the agent {} cannot run in the guest", agent.display()))?;
    // Host files first: their symlinks (/lib -> usr/lib) shape where the rest goes.
    for dep in &deps {
        tree.host_file(&dep.to_string_lossy())?;
    }
    for (d, perm) in
        [("/proc", 0o755), ("/sys", 0o755), ("/dev", 0o755), ("/run", 0o755), ("/tmp", 0o1777), ("/etc", 0o755), ("/sbin", 0o755)]
    {
        tree.mkdir_p(d, perm)?;
    }
    tree.insert("/dev/console", Node::CharDev(5, 1))?;
    let given = std::fs::metadata(agent).with_context(|| format!("reading the agent {}", agent.display()))?.len();
    let agent_bytes = stripped(agent)?;
    let agent_sizes = (usize::try_from(given).unwrap_or(usize::MAX), agent_bytes.len());
    match test_busybox {
        None => {
            tree.file("/init", 0o755, agent_bytes)?;
        }
        Some(busybox) => {
            ensure!(host::is_static_elf(busybox)?, "{} is not a static busybox", busybox.display());
            tree.file("/bin/busybox", 0o755, std::fs::read(busybox)?)?;
            tree.file("/sbin/vfvm-agent", 0o755, agent_bytes)?;
            tree.file("/init", 0o755, test_init_script().into_bytes())?;
        }
    }

    let index = ModuleIndex::parse(&kernel.read_modules_file("modules.dep")?, &kernel.read_modules_file("modules.builtin")?)?;
    let config = std::fs::read_to_string(kernel.root.join(format!("boot/config-{}", kernel.release))).unwrap_or_default();
    let (order, built_in, skipped) = select_modules(&index, &config)?;
    let boot = index.load_order(BOOT_MODULES)?;
    let files = module_files(&kernel.release, &index, &order, &boot, &kernel.read_modules_file("modules.alias")?)?;
    progress!(
        "adding {} kernel modules for {}: {} loaded at boot (plain), the others on demand (zstd)",
        order.len(),
        kernel.release,
        files.boot.len()
    );
    let mut manifest = Manifest {
        release: kernel.release.clone(),
        agent_sizes,
        built_in,
        skipped,
        boot_modules: files.boot,
        aliases: files.aliases,
        ..Default::default()
    };
    let mods_dir = format!("/lib/modules/{}", kernel.release);
    let at_boot: HashSet<String> = manifest.boot_modules.iter().cloned().collect();
    for rel in &order {
        let path = image_path(rel, &at_boot)?;
        let bytes = read_module(&kernel.modules_dir().join(rel))?;
        manifest.modules.push((module_name(rel), path.clone(), bytes.len()));
        let stored = if path.ends_with(".zst") { Compression::Zstd.compress(&bytes)? } else { bytes };
        tree.file(&format!("{mods_dir}/{path}"), 0o644, stored)?;
    }
    tree.file(&format!("{mods_dir}/{MODULES_LOAD}"), 0o644, files.load.into_bytes())?;
    tree.file(&format!("{mods_dir}/{MODULES_DEP}"), 0o644, files.dep.into_bytes())?;
    tree.file(&format!("{mods_dir}/{MODULES_ALIAS}"), 0o644, files.alias.into_bytes())?;

    let bytes = tree.archive()?;
    manifest.files = tree.listing();
    manifest.initrd_size = bytes.len();
    Ok((bytes, manifest))
}

/// The workspace's agent as a release build in `target_dir` (see host::release_build).
pub fn release_agent(target_dir: &Path) -> Result<PathBuf> {
    host::release_build(target_dir, "vfvm-agent")
}

/// The workspace's release agent in the target directory this program was built in.
fn default_agent() -> Result<PathBuf> {
    release_agent(&host::target_dir()?)
}

/// Guest images kept in the cache per kind (each agent build makes a new one).
const KEEP_IMAGES: usize = 4;

/// Removes all but the newest `KEEP_IMAGES` `<stem>-*.cpio` images (compressed ones,
/// `.cpio.<suffix>`, included), never `current`.
pub fn prune(images: &Path, stem: &str, current: &Path) {
    let prefix = format!("{stem}-");
    let Ok(dir) = std::fs::read_dir(images) else { return };
    let mut old: Vec<(std::time::SystemTime, PathBuf)> = dir
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // `guest-` must not match `guest-test-`.
            name.strip_prefix(&prefix).is_some_and(|rest| !rest.starts_with("test-"))
                && (name.ends_with(".cpio") || name.rsplit_once(".cpio.").is_some_and(|(_, ext)| !ext.starts_with("tmp")))
        })
        .filter(|e| e.path() != current)
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    old.sort_by(|a, b| b.cmp(a));
    for (_, path) in old.into_iter().skip(KEEP_IMAGES - 1) {
        let _ = std::fs::remove_file(path);
    }
}

/// Writes `bytes` to `path` unless it already holds exactly them.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).ok().as_deref() == Some(bytes) {
        return Ok(());
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    progress!("wrote {}", path.display());
    Ok(())
}

pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub manifest: Manifest,
}

/// Writes `bytes` under a name derived from their hash (`<stem>-<hash>.cpio`, plus the
/// compression's suffix), unless already there.
fn store_image(dir: &Path, stem: &str, compression: Compression, bytes: &[u8]) -> Result<PathBuf> {
    let Some(suffix) = compression.suffix() else { return store(dir, stem, bytes) };
    let path = dir.join(format!("{stem}-{:016x}.cpio.{suffix}", fnv1a64(bytes)));
    if !path.is_file() {
        let tmp = dir.join(format!("{stem}.tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        progress!("built image {} ({} KiB)", path.display(), bytes.len() / 1024);
    }
    Ok(path)
}

/// Builds the image, stores the initramfs content-addressed in `<cache>/images` and,
/// with `--out`, copies kernel, initramfs and manifest there.
pub fn ensure(cache: &Path, kernel: &Kernel, busybox: &Path, opts: &Options) -> Result<GuestImage> {
    let agent = match &opts.agent {
        Some(a) => a.clone(),
        None => default_agent()?,
    };
    ensure!(agent.is_file(), "the agent {} does not exist", agent.display());
    let (cpio, mut manifest) = build(kernel, &agent, opts.init_script.then_some(busybox))?;
    let compression = opts.compress.unwrap_or(Compression::DEFAULT);
    let bytes = compression.compress(&cpio)?;
    drop(cpio);
    manifest.compression = Some(compression);
    manifest.stored_size = bytes.len();
    let stem = if opts.init_script { "guest-test" } else { "guest" };
    let images = cache.join("images");
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let initrd = store_image(&images, &format!("{stem}-{}", kernel.release), compression, &bytes)?;
    prune(&images, stem, &initrd);
    let Some(out) = &opts.out else {
        return Ok(GuestImage { kernel: kernel.vmlinux()?, initrd, manifest });
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    // The ELF vmlinux: the guest does not decompress its kernel (under the lab's
    // emulation that saved ~3 s of a pod's boot).
    let vmlinux_path = kernel.vmlinux()?;
    let vmlinux = std::fs::read(&vmlinux_path).with_context(|| format!("reading {}", vmlinux_path.display()))?;
    write_if_changed(&out.join("vmlinux"), &vmlinux)?;
    write_if_changed(&out.join("initrd.img"), &bytes)?;
    write_if_changed(&out.join("manifest.txt"), manifest.render().as_bytes())?;
    Ok(GuestImage { kernel: out.join("vmlinux"), initrd: out.join("initrd.img"), manifest })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalize_and_resolve_through_the_trees_symlinks() {
        assert_eq!(normalize("/a/./b/../c/"), "/a/c");
        assert_eq!(normalize("/"), "/");
        let mut t = Tree::default();
        t.insert("/lib", Node::Symlink("usr/lib".into())).unwrap();
        t.insert("/lib64", Node::Symlink("/usr/lib64".into())).unwrap();
        assert_eq!(t.resolve("/lib/modules/x").unwrap(), "/usr/lib/modules/x");
        assert_eq!(t.resolve("/lib64/ld.so").unwrap(), "/usr/lib64/ld.so");
        assert_eq!(t.file("/lib/modules/x/a.ko", 0o644, vec![1]).unwrap(), "/usr/lib/modules/x/a.ko");
        assert!(t.mkdir_p("/lib/modules/x/a.ko/sub", 0o755).is_err(), "a file is not a directory");
        assert!(t.file("/usr/lib/modules/x/a.ko", 0o644, vec![2]).is_err(), "conflicting contents");
        t.insert("/loop", Node::Symlink("/loop".into())).unwrap();
        assert!(t.resolve("/loop/x").is_err());
    }

    #[test]
    fn options_parse() {
        let o = parse_options(["--agent", "/a", "--out", "/o", "--init-script", "--compress", "zstd"].map(String::from)).unwrap();
        assert_eq!((o.agent, o.out, o.init_script, o.compress), (Some("/a".into()), Some("/o".into()), true, Some(Compression::Zstd)));
        assert!(parse_options(["--frob".to_string()]).unwrap_err().to_string().contains("--frob"));
        assert!(parse_options(["--agent".to_string()]).is_err());
        let e = parse_options(["--compress", "bz2"].map(String::from)).unwrap_err().to_string();
        assert!(e.contains("\"bz2\"") && e.contains("none, gzip, lz4, zstd, xz"), "{e}");
        assert!(parse_options(["--compress".to_string()]).is_err());
    }

    /// A small fake kernel index: the boot set, a filesystem, a VF driver, 8021q.
    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko.xz:
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/net/vmw_vsock/vsock.ko.xz:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz: kernel/net/vmw_vsock/vsock.ko.xz
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz \
kernel/net/vmw_vsock/vsock.ko.xz kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/fs/fuse/fuse.ko.xz:
kernel/fs/fuse/virtiofs.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz kernel/fs/fuse/fuse.ko.xz
kernel/drivers/net/ethernet/intel/igbvf/igbvf.ko.xz:
kernel/drivers/net/ethernet/intel/igb/igb.ko.xz:
";
    const ALIAS: &str = "\
# Aliases extracted from modules themselves.
alias fs-fuse fuse
alias fs-virtiofs virtiofs
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000013v* vmw_vsock_virtio_transport
alias pci:v00008086d000010CAsv*sd*bc*sc*i* igbvf
alias pci:v00008086d000010C9sv*sd*bc*sc*i* igb
";

    #[test]
    fn module_files_load_the_boot_set_and_index_the_rest() {
        let index = ModuleIndex::parse(DEP, "").unwrap();
        let order = index.load_order(&["virtio_pci", "vmw_vsock_virtio_transport", "virtiofs", "igbvf"]).unwrap();
        let boot = index.load_order(BOOT_MODULES).unwrap();
        let f = module_files("6.1.0-test", &index, &order, &boot, ALIAS).unwrap();
        assert_eq!(
            f.boot,
            ["virtio", "virtio_ring", "virtio_pci", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"]
        );
        let load: Vec<&str> = f.load.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(load[2], "kernel/drivers/virtio/virtio_pci.ko");
        assert_eq!(load.len(), 6);
        assert!(f.load.lines().filter(|l| l.starts_with('#')).count() >= 1);
        // The whole image, dependencies first, the kernel's dependency lists; the boot
        // modules as plain paths, the others as .ko.zst.
        let dep: Vec<&str> = f.dep.lines().collect();
        assert_eq!(dep.len(), order.len());
        assert!(dep.contains(
            &"kernel/fs/fuse/virtiofs.ko.zst: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko.zst"
        ));
        assert!(
            dep.iter().position(|l| l.starts_with("kernel/fs/fuse/fuse.ko.zst:"))
                < dep.iter().position(|l| l.starts_with("kernel/fs/fuse/virtiofs.ko.zst:"))
        );
        assert!(dep.contains(&"kernel/drivers/net/ethernet/intel/igbvf/igbvf.ko.zst:"));
        // Boot modules stay plain: the kernel reads them at every boot.
        assert!(dep.iter().any(|l| l.starts_with("kernel/drivers/virtio/virtio_pci.ko: ")), "{dep:?}");
        // Aliases of the image's modules only (igb is not in it).
        assert_eq!(f.aliases, 5);
        assert!(f.alias.contains("alias pci:v00008086d000010CAsv*sd*bc*sc*i* igbvf\n") && !f.alias.contains(" igb\n"), "{}", f.alias);
        // The boot set must be in the image, and the image must hold every dependency.
        let small = index.load_order(&["virtiofs"]).unwrap();
        assert!(module_files("6.1.0-test", &index, &small, &boot, ALIAS).unwrap_err().to_string().contains("boot module"));
        let no_fuse: Vec<String> = order.iter().filter(|p| !p.contains("/fuse.ko")).cloned().collect();
        let e = module_files("6.1.0-test", &index, &no_fuse, &boot, ALIAS).unwrap_err().to_string();
        assert!(e.contains("virtiofs needs kernel/fs/fuse/fuse.ko.xz"), "{e}");
    }

    #[test]
    fn compression_round_trips_and_is_reproducible() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for c in Compression::ALL {
            let packed = c.compress(&data).unwrap();
            assert_eq!(packed, c.compress(&data).unwrap(), "{} is not reproducible", c.name());
            assert_eq!(c.decompress(&packed).unwrap(), data, "{}", c.name());
            if c != Compression::None {
                assert!(packed.len() < data.len() / 2, "{}: {} bytes", c.name(), packed.len());
            }
        }
        // The kernel's unpackers: gzip, legacy lz4 frames, zstd and xz magics.
        let magic = |c: Compression| c.compress(&data).unwrap()[..4].to_vec();
        assert_eq!(magic(Compression::Gzip)[..2], [0x1f, 0x8b]);
        assert_eq!(magic(Compression::Lz4), [0x02, 0x21, 0x4c, 0x18]);
        assert_eq!(magic(Compression::Zstd), [0x28, 0xb5, 0x2f, 0xfd]);
        assert_eq!(magic(Compression::Xz), [0xfd, b'7', b'z', b'X']);
    }

    #[test]
    fn compressed_images_are_pruned_like_plain_ones() {
        let dir = std::env::temp_dir().join(format!("vfvm-lab-prune-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let names = ["guest-r-1.cpio", "guest-r-2.cpio.zst", "guest-r-3.cpio.lz4", "guest-r-4.cpio", "guest-r-5.cpio.zst"];
        for (i, n) in names.iter().enumerate() {
            std::fs::write(dir.join(n), b"x").unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + u64::try_from(i).unwrap());
            std::fs::File::options().write(true).open(dir.join(n)).unwrap().set_modified(t).unwrap();
        }
        std::fs::write(dir.join("guest-test-r-9.cpio.zst"), b"x").unwrap();
        std::fs::write(dir.join("guest-r.tmp77"), b"x").unwrap();
        prune(&dir, "guest", &dir.join("guest-r-1.cpio"));
        let mut left: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        // The current one, the newest KEEP_IMAGES - 1 others, and what is not a guest image.
        assert_eq!(
            left,
            ["guest-r-1.cpio", "guest-r-3.cpio.lz4", "guest-r-4.cpio", "guest-r-5.cpio.zst", "guest-r.tmp77", "guest-test-r-9.cpio.zst"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_agent_is_stripped_of_its_symbols() {
        let me = std::env::current_exe().unwrap();
        let bytes = stripped(&me).unwrap();
        assert!(bytes.len() < usize::try_from(std::fs::metadata(&me).unwrap().len()).unwrap());
        assert_eq!(bytes, stripped(&me).unwrap(), "reproducible");
        assert!(elf::parse(&bytes).is_ok());
        let e = stripped(Path::new("/etc/hostname")).unwrap_err().to_string();
        assert!(e.contains("objcopy --strip-all /etc/hostname failed"), "{e}");
    }

    /// The lab's cached kernel (fetched by `cargo xtask install`, which `cargo xtask
    /// test` runs first).
    fn lab_kernel() -> Kernel {
        crate::kernel::ensure(&crate::cache_dir()).expect("the lab kernel: run `cargo xtask install`")
    }

    fn entries(cpio: &[u8]) -> Vec<String> {
        use std::io::Write;
        let busybox = host::find_busybox().expect("busybox-static: run `cargo xtask install`");
        let mut child = Command::new(busybox)
            .args(["cpio", "-t"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let bytes = cpio.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&bytes));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    #[test]
    fn images_are_reproducible_and_hold_the_guest_modules() {
        let kernel = lab_kernel();
        let base = std::env::temp_dir().join(format!("vfvm-lab-guest-image-{}", std::process::id()));
        let cache = base.join("cache");
        let agent = std::env::current_exe().unwrap(); // dynamically linked against glibc
        let opts = |out: &str| Options { agent: Some(agent.clone()), out: Some(base.join(out)), ..Default::default() };
        let busybox = host::find_busybox().unwrap();
        let a = ensure(&cache, &kernel, &busybox, &opts("a")).unwrap();
        let b = ensure(&cache, &kernel, &busybox, &opts("b")).unwrap();
        let read = |p: &Path| std::fs::read(p).unwrap();
        assert!(read(&a.initrd) == read(&b.initrd), "two builds from the same inputs differ");
        assert!(read(&a.kernel) == read(&kernel.vmlinux().unwrap()));
        assert_eq!(read(&base.join("a/manifest.txt")), read(&base.join("b/manifest.txt")));
        // One content-addressed copy in the cache for both.
        assert_eq!(std::fs::read_dir(cache.join("images")).unwrap().count(), 1);

        let names = a.manifest.module_names();
        let pos = |m: &str| names.iter().position(|n| *n == m).unwrap_or_else(|| panic!("{m} missing from {names:?}"));
        for m in [
            "vsock",
            "vmw_vsock_virtio_transport_common",
            "vmw_vsock_virtio_transport",
            "virtio_pci",
            "virtio_net",
            "virtio_blk",
            "virtio_mmio",
            "virtiofs",
            "fuse",
            "overlay",
            "igbvf",
        ] {
            pos(m);
        }
        // Dependencies first.
        assert!(pos("vsock") < pos("vmw_vsock_virtio_transport_common"));
        assert!(pos("vmw_vsock_virtio_transport_common") < pos("vmw_vsock_virtio_transport"));
        assert!(pos("virtio_ring") < pos("virtio_net") && pos("fuse") < pos("virtiofs"));
        let text = a.manifest.render();
        assert!(text.contains("skipped:") && text.contains("modules loaded on demand"), "{text}");
        // At boot only the virtio PCI transport and the vsock stack (this kernel has
        // them as modules); the rest on demand.
        let boot = &a.manifest.boot_modules;
        for m in ["virtio", "virtio_ring", "virtio_pci", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"] {
            assert!(boot.iter().any(|b| b == m), "{m} is not loaded at boot: {boot:?}");
        }
        for m in ["mlx5_core", "igbvf", "fuse", "virtiofs", "overlay", "virtio_net", "8021q"] {
            assert!(!boot.iter().any(|b| b == m), "{m} is loaded at boot: {boot:?}");
        }
        assert!(a.manifest.aliases > 10, "{text}");
        assert!(a.manifest.agent_sizes.1 < a.manifest.agent_sizes.0, "the agent was not stripped: {:?}", a.manifest.agent_sizes);
        assert_eq!(a.manifest.compression, Some(Compression::DEFAULT));

        // The archive itself, read by busybox: init, console, libc, the module files.
        let cpio = Compression::DEFAULT.decompress(&read(&a.initrd)).unwrap();
        assert_eq!(cpio.len(), a.manifest.initrd_size);
        let listing = entries(&cpio);
        let release = &kernel.release;
        for want in ["init", "dev/console", "proc", "sys", "run", "tmp", "etc", "sbin"] {
            assert!(listing.iter().any(|l| l == want), "{want} missing from the image: {listing:?}");
        }
        assert!(listing.iter().any(|l| l.ends_with("/libc.so.6")), "no libc: {listing:?}");
        // Boot modules plain, on-demand ones zstd-compressed.
        assert!(listing.iter().any(|l| l.ends_with("/virtio_pci.ko")), "no plain virtio_pci.ko: {listing:?}");
        assert!(listing.iter().any(|l| l.ends_with("/igbvf.ko.zst")), "no igbvf.ko.zst: {listing:?}");
        for file in [MODULES_LOAD, MODULES_DEP, MODULES_ALIAS] {
            let found = a.manifest.files.iter().find(|(p, _)| p.ends_with(&format!("/modules/{release}/{file}")));
            assert!(found.is_some(), "no {file} in {:?}", a.manifest.files);
            assert!(listing.iter().any(|l| l.ends_with(&format!("/modules/{release}/{file}"))), "no {file} in {listing:?}");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
