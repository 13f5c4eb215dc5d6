//! The vfvm guest image: Debian's generic kernel (the lab's cached one) plus an
//! initramfs whose `/init` is `vfvm-agent`. `cargo xtask image [--agent PATH] [--out DIR]`.
//!
//! Layout of the initramfs (every entry uid/gid 0, mtime 0: byte-for-byte reproducible):
//!
//! ```text
//! /init                              the agent (PID 1), mode 0755
//! <interpreter and libraries>        the agent's PT_INTERP and DT_NEEDED closure, at the
//!                                    paths the guest's ld.so opens, with this machine's
//!                                    symlinks kept (e.g. /lib -> usr/lib on merged /usr)
//! /lib/modules/<release>/kernel/...  the modules below and their dependencies,
//!                                    decompressed (plain .ko), at their modules.dep paths
//! /lib/modules/<release>/modules.load  the load order (format below)
//! /dev/console                       char device 5:1 (the kernel opens it for init)
//! /proc /sys /dev /run /tmp /etc /sbin  empty directories (/tmp 1777)
//! ```
//!
//! With `--init-script` (for tests) `/init` is instead a busybox shell script that loads
//! every module of `modules.load` with `insmod`, reports `/proc/modules` and the agent's
//! `--version` on the console with the L3 marker, and powers off; busybox is at
//! `/bin/busybox` and the agent at `/sbin/vfvm-agent`.
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
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::Archive;
use crate::images::{read_module, store, L3_MARKER};
use crate::kernel::Kernel;
use crate::modules::{module_name, Availability, ModuleIndex};
use crate::{elf, host, progress};

/// The manifest's file name in `/lib/modules/<release>/`.
pub const MODULES_LOAD: &str = "modules.load";

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
}

pub const USAGE: &str = "\
usage: cargo xtask image [--agent PATH] [--out DIR] [--init-script]

  --agent PATH     the agent binary to put at /init (default: the workspace's
                   target/debug/vfvm-agent, built with cargo if missing)
  --out DIR        also write DIR/vmlinuz, DIR/initrd.img and DIR/manifest.txt (each
                   only when its content changed); without it the kernel and initrd
                   are only in the lab cache
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
            "--init-script" => opts.init_script = true,
            other => bail!("unknown image option {other:?}\n\n{USAGE}"),
        }
    }
    Ok(opts)
}

/// What went into an image.
#[derive(Debug, Default)]
pub struct Manifest {
    pub release: String,
    /// Every non-directory entry: (path, description).
    pub files: Vec<(String, String)>,
    /// Modules in load order: (name, path relative to /lib/modules/<release>, size).
    pub modules: Vec<(String, String, usize)>,
    /// Wanted modules that are built into this kernel (nothing to load).
    pub built_in: Vec<String>,
    /// Optional modules this kernel does not have as modules, with why.
    pub skipped: Vec<String>,
    pub initrd_size: usize,
}

impl Manifest {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "guest image for kernel {} ({} byte initramfs)", self.release, self.initrd_size);
        let _ = writeln!(s, "files:");
        for (path, what) in &self.files {
            let _ = writeln!(s, "  {path:<60} {what}");
        }
        let _ = writeln!(s, "empty dirs: /proc /sys /dev /run /tmp /etc /sbin");
        let _ = writeln!(s, "modules, in load order (/lib/modules/{}/{MODULES_LOAD}):", self.release);
        for (i, (name, path, size)) in self.modules.iter().enumerate() {
            let _ = writeln!(s, "  {:>3} {name:<36} {path} ({size} bytes)", i + 1);
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
# modules.load like the agent will, reports what is loaded, and powers off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "{m} userspace $(cut -d' ' -f1 /proc/uptime)"
D=/lib/modules/$(uname -r)
ok=0; failed=0
while read -r p; do
  case "$p" in ''|'#'*) continue;; esac
  if insmod "$D/$p"; then ok=$((ok+1)); else failed=$((failed+1)); echo "{m} insmod-failed $p"; fi
done < "$D/{load}"
echo "{m} insmod ok=$ok failed=$failed"
while read -r name rest; do echo "{m} module $name"; done < /proc/modules
v=$(/sbin/vfvm-agent --version 2>&1)
echo "{m} agent rc=$? $(echo $v | tr '\n' ' ')"
poweroff -f
"#,
        m = L3_MARKER,
        load = MODULES_LOAD,
    )
}

/// Builds the initramfs in memory. `test_busybox`: the `--init-script` variant.
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
    let agent_bytes = std::fs::read(agent).with_context(|| format!("reading the agent {}", agent.display()))?;
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
    progress!("adding {} kernel modules (decompressed) for {}", order.len(), kernel.release);
    let mut manifest = Manifest { release: kernel.release.clone(), built_in, skipped, ..Default::default() };
    let mut load = format!(
        "# vfvm guest kernel modules for {}, generated by vfvm-lab: one module per line, its path\n\
         # relative to this directory, in load order (dependencies first); '#' lines are comments\n",
        kernel.release
    );
    let mods_dir = format!("/lib/modules/{}", kernel.release);
    for rel in &order {
        let plain = rel.trim_end_matches(".xz").trim_end_matches(".zst").trim_end_matches(".gz").to_string();
        ensure!(plain.ends_with(".ko"), "module {rel}: unknown compression");
        ensure!(!rel.ends_with(".gz"), "module {rel}: gzip-compressed modules are not supported");
        let bytes = read_module(&kernel.modules_dir().join(rel))?;
        manifest.modules.push((module_name(rel), plain.clone(), bytes.len()));
        tree.file(&format!("{mods_dir}/{plain}"), 0o644, bytes)?;
        load.push_str(&plain);
        load.push('\n');
    }
    tree.file(&format!("{mods_dir}/{MODULES_LOAD}"), 0o644, load.into_bytes())?;

    let bytes = tree.archive()?;
    manifest.files = tree.listing();
    manifest.initrd_size = bytes.len();
    Ok((bytes, manifest))
}

/// The workspace's `target/debug/vfvm-agent` (`$CARGO_TARGET_DIR` honoured), built
/// with cargo if it is not there.
fn default_agent() -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().context("locating the workspace")?;
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) if !t.is_empty() => workspace.join(t),
        _ => workspace.join("target"),
    };
    let agent = target.join("debug/vfvm-agent");
    if !agent.is_file() {
        progress!("{} is missing: building it (cargo build -p vfvm-agent)", agent.display());
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        host::run_shown(Command::new(cargo).args(["build", "-p", "vfvm-agent"]).current_dir(&workspace))?;
        ensure!(agent.is_file(), "cargo build -p vfvm-agent did not produce {}", agent.display());
    }
    Ok(agent)
}

/// Guest images kept in the cache per kind (each agent build makes a new one).
const KEEP_IMAGES: usize = 4;

/// Removes all but the newest `KEEP_IMAGES` `<stem>-*.cpio` images, never `current`.
pub fn prune(images: &Path, stem: &str, current: &Path) {
    let prefix = format!("{stem}-");
    let Ok(dir) = std::fs::read_dir(images) else { return };
    let mut old: Vec<(std::time::SystemTime, PathBuf)> = dir
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // `guest-` must not match `guest-test-`.
            name.strip_prefix(&prefix).is_some_and(|rest| !rest.starts_with("test-")) && name.ends_with(".cpio")
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

/// Builds the image, stores the initramfs content-addressed in `<cache>/images` and,
/// with `--out`, copies kernel, initramfs and manifest there.
pub fn ensure(cache: &Path, kernel: &Kernel, busybox: &Path, opts: &Options) -> Result<GuestImage> {
    let agent = match &opts.agent {
        Some(a) => a.clone(),
        None => default_agent()?,
    };
    ensure!(agent.is_file(), "the agent {} does not exist", agent.display());
    let (bytes, manifest) = build(kernel, &agent, opts.init_script.then_some(busybox))?;
    let stem = if opts.init_script { "guest-test" } else { "guest" };
    let images = cache.join("images");
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let initrd = store(&images, &format!("{stem}-{}", kernel.release), &bytes)?;
    prune(&images, stem, &initrd);
    let Some(out) = &opts.out else {
        return Ok(GuestImage { kernel: kernel.vmlinuz(), initrd, manifest });
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let vmlinuz = std::fs::read(kernel.vmlinuz()).with_context(|| format!("reading {}", kernel.vmlinuz().display()))?;
    write_if_changed(&out.join("vmlinuz"), &vmlinuz)?;
    write_if_changed(&out.join("initrd.img"), &bytes)?;
    write_if_changed(&out.join("manifest.txt"), manifest.render().as_bytes())?;
    Ok(GuestImage { kernel: out.join("vmlinuz"), initrd: out.join("initrd.img"), manifest })
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
        let o = parse_options(["--agent", "/a", "--out", "/o", "--init-script"].map(String::from)).unwrap();
        assert_eq!((o.agent, o.out, o.init_script), (Some("/a".into()), Some("/o".into()), true));
        assert!(parse_options(["--frob".to_string()]).unwrap_err().to_string().contains("--frob"));
        assert!(parse_options(["--agent".to_string()]).is_err());
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
        let opts = |out: &str| Options { agent: Some(agent.clone()), out: Some(base.join(out)), init_script: false };
        let busybox = host::find_busybox().unwrap();
        let a = ensure(&cache, &kernel, &busybox, &opts("a")).unwrap();
        let b = ensure(&cache, &kernel, &busybox, &opts("b")).unwrap();
        let read = |p: &Path| std::fs::read(p).unwrap();
        assert!(read(&a.initrd) == read(&b.initrd), "two builds from the same inputs differ");
        assert!(read(&a.kernel) == read(&kernel.vmlinuz()));
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
        assert!(text.contains("skipped:"), "{text}");

        // The archive itself, read by busybox: init, console, libc, the manifest.
        let listing = entries(&read(&a.initrd));
        let release = &kernel.release;
        for want in ["init", "dev/console", "proc", "sys", "run", "tmp", "etc", "sbin"] {
            assert!(listing.iter().any(|l| l == want), "{want} missing from the image: {listing:?}");
        }
        assert!(listing.iter().any(|l| l.ends_with("/libc.so.6")), "no libc: {listing:?}");
        let load = a.manifest.files.iter().find(|(p, _)| p.ends_with(&format!("/modules/{release}/{MODULES_LOAD}")));
        assert!(load.is_some(), "no {MODULES_LOAD} in {:?}", a.manifest.files);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
