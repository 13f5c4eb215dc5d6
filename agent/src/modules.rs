//! Kernel modules on demand. The guest has no modprobe and no udev: the image loads
//! only what the agent needs to serve (its `modules.load`, see [`crate::init`]) and
//! carries, for every module it ships, depmod's text index (`modules.dep` and
//! `modules.alias`, filtered to those modules). This module reads that index and
//! loads the rest when it is needed:
//!
//! - by name ([`ModuleLoader::load`]): a filesystem before the agent mounts it, `8021q`
//!   before it creates a VLAN link; dependencies first;
//! - by modalias ([`ModuleLoader::load_for_modalias`]): the drivers of devices, for the
//!   PCI devices present at boot ([`ModuleLoader::coldplug`]) and for devices that
//!   appear later (the kernel's `add` uevents carrying `MODALIAS`, see
//!   [`spawn_hotplug_listener`]). Patterns are `fnmatch(3)` globs, as kmod matches them.
//!
//! Loading is idempotent (a module loaded, by us or anyone, is not loaded again; a
//! module whose load failed is not retried), serialised by one mutex, bounded (index
//! file sizes, line counts, alias lengths, load attempts) and logged.
//!
//! # Index formats (depmod's)
//!
//! `modules.dep`: one module per line, `PATH: DEP DEP ...`, paths relative to the
//! index's directory (`kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko`). A module's
//! name is its file name without `.ko` (and a compression suffix), `-` read as `_`.
//! `modules.alias`: `alias PATTERN MODULE_NAME` lines; blank lines and `#` comments are
//! skipped.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// The index's file names in the modules directory (`/lib/modules/<release>/`).
pub const DEP_FILE: &str = "modules.dep";
pub const ALIAS_FILE: &str = "modules.alias";
/// Largest index file read; a bigger one is refused, not truncated.
pub const MAX_INDEX_FILE_BYTES: u64 = 4 << 20;
/// Most modules, dependencies of one module, and aliases an index may list.
pub const MAX_MODULES: usize = 8192;
pub const MAX_DEPS: usize = 256;
pub const MAX_ALIASES: usize = 65_536;
/// Longest modalias (asked for) or alias pattern (in the index), in bytes.
pub const MAX_ALIAS_LEN: usize = 512;
/// Most `finit_module` calls one loader makes (each module is tried at most once).
pub const MAX_LOAD_ATTEMPTS: usize = 256;
/// Most devices one coldplug pass looks at on one bus.
pub const MAX_COLDPLUG_DEVICES: usize = 1024;

/// Result alias for this module.
pub type Result<T, E = ModuleError> = std::result::Result<T, E>;

/// What can go wrong reading the index or loading a module; each names its input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModuleError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: larger than {max} bytes: refusing a module index that big", path.display())]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{} line {line}: {reason}", file.display())]
    Parse { file: PathBuf, line: usize, reason: String },
    #[error("no kernel module {name:?} in the module index of {}", dir.display())]
    Unknown { name: String, dir: PathBuf },
    #[error("modalias {alias:?}: {reason}")]
    BadAlias { alias: String, reason: String },
    #[error("module {name}: dependency cycle ({chain})")]
    Cycle { name: String, chain: String },
    #[error("loading kernel module {name} from {}: {source}", path.display())]
    Load {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel module {name}: an earlier load failed ({reason}); not trying again")]
    FailedBefore { name: String, reason: String },
    #[error("kernel module {name}: refused: {max} module loads were attempted already")]
    TooManyLoads { name: String, max: usize },
}

impl ModuleError {
    /// The index does not exist (an image without one): not an error of its content.
    pub fn is_missing_index(&self) -> bool {
        matches!(self, ModuleError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// A module's canonical name: `-` read as `_`.
pub fn canonical_name(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path in `modules.dep` (`kernel/fs/9p/9p.ko.xz` -> `9p`).
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    canonical_name(base.split(".ko").next().unwrap_or(base))
}

#[derive(Debug, Clone)]
struct Module {
    /// Relative to the index's directory.
    path: String,
    /// Names of the modules it needs.
    deps: Vec<String>,
}

/// The module index of one modules directory.
#[derive(Debug)]
pub struct ModuleIndex {
    dir: PathBuf,
    modules: HashMap<String, Module>,
    /// (pattern, module name), in file order.
    aliases: Vec<(String, String)>,
}

/// Reads `path` whole, refusing more than `max` bytes.
fn read_bounded(path: &Path, max: u64) -> Result<String> {
    let err = |source| ModuleError::Read { path: path.to_path_buf(), source };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut bytes = Vec::new();
    f.take(max + 1).read_to_end(&mut bytes).map_err(err)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > max {
        return Err(ModuleError::TooLarge { path: path.to_path_buf(), max });
    }
    String::from_utf8(bytes).map_err(|_| err(io::Error::new(io::ErrorKind::InvalidData, "not UTF-8")))
}

/// A `modules.dep` path: relative, inside the directory, a `.ko` file.
fn check_module_path(path: &str) -> std::result::Result<(), String> {
    let p = Path::new(path);
    if path.is_empty() || p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("{path:?} is not a plain relative path"));
    }
    let compressed = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"];
    if !compressed.iter().any(|s| path.ends_with(s)) {
        return Err(format!("{path:?} is not a module file (.ko)"));
    }
    Ok(())
}

/// A modalias asked for (`spaces`: DMI ones have them) or an alias pattern of the
/// index (no blanks: they separate the fields): bounded, printable ASCII.
fn check_alias(alias: &str, spaces: bool) -> std::result::Result<(), String> {
    if alias.is_empty() {
        return Err("empty".into());
    }
    if alias.len() > MAX_ALIAS_LEN {
        return Err(format!("{} bytes, at most {MAX_ALIAS_LEN}", alias.len()));
    }
    if !alias.bytes().all(|b| b.is_ascii_graphic() || (spaces && b == b' ')) {
        return Err("only printable ASCII is allowed".into());
    }
    Ok(())
}

impl ModuleIndex {
    /// Parses the two index files of `dir` (given as text; `dir` is where module
    /// paths are relative to, and what errors name).
    pub fn parse(dir: &Path, modules_dep: &str, modules_alias: &str) -> Result<ModuleIndex> {
        let dep_file = dir.join(DEP_FILE);
        let bad = |file: &Path, line: usize, reason: String| ModuleError::Parse { file: file.to_path_buf(), line, reason };
        // Pass 1: every module and its dependency paths.
        let mut by_path: HashMap<&str, String> = HashMap::new();
        let mut names: HashSet<String> = HashSet::new();
        let mut lines: Vec<(usize, String, &str, Vec<&str>)> = Vec::new();
        for (n, line) in modules_dep.lines().enumerate().map(|(n, l)| (n + 1, l)) {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, rest) = line.split_once(':').ok_or_else(|| bad(&dep_file, n, format!("expected `path: deps`, got {line:?}")))?;
            let path = path.trim();
            check_module_path(path).map_err(|r| bad(&dep_file, n, r))?;
            let deps: Vec<&str> = rest.split_whitespace().collect();
            if deps.len() > MAX_DEPS {
                return Err(bad(&dep_file, n, format!("{} dependencies, at most {MAX_DEPS}", deps.len())));
            }
            for d in &deps {
                check_module_path(d).map_err(|r| bad(&dep_file, n, format!("dependency {r}")))?;
            }
            if lines.len() >= MAX_MODULES {
                return Err(bad(&dep_file, n, format!("more than {MAX_MODULES} modules")));
            }
            let name = module_name(path);
            if !names.insert(name.clone()) {
                return Err(bad(&dep_file, n, format!("module {name} is listed twice")));
            }
            by_path.insert(path, name.clone());
            lines.push((n, name, path, deps));
        }
        // Pass 2: dependencies by name; each must be in the index.
        let mut modules = HashMap::with_capacity(lines.len());
        for (n, name, path, deps) in lines {
            let deps = deps
                .iter()
                .map(|d| by_path.get(d).cloned().ok_or_else(|| bad(&dep_file, n, format!("dependency {d} is not listed itself"))))
                .collect::<Result<Vec<String>>>()?;
            modules.insert(name, Module { path: path.to_string(), deps });
        }
        let alias_file = dir.join(ALIAS_FILE);
        let mut aliases = Vec::new();
        for (n, line) in modules_alias.lines().enumerate().map(|(n, l)| (n + 1, l)) {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let [keyword, pattern, module] = words[..] else {
                return Err(bad(&alias_file, n, format!("expected `alias PATTERN MODULE`, got {line:?}")));
            };
            if keyword != "alias" {
                return Err(bad(&alias_file, n, format!("expected `alias PATTERN MODULE`, got {line:?}")));
            }
            check_alias(pattern, false).map_err(|r| bad(&alias_file, n, format!("pattern {pattern:?}: {r}")))?;
            let module = canonical_name(module);
            if !modules.contains_key(&module) {
                return Err(bad(&alias_file, n, format!("module {module} is not in {DEP_FILE}")));
            }
            if aliases.len() >= MAX_ALIASES {
                return Err(bad(&alias_file, n, format!("more than {MAX_ALIASES} aliases")));
            }
            aliases.push((pattern.to_string(), module));
        }
        Ok(ModuleIndex { dir: dir.to_path_buf(), modules, aliases })
    }

    /// Reads `dir/modules.dep` and `dir/modules.alias` (each at most
    /// [`MAX_INDEX_FILE_BYTES`]).
    pub fn open(dir: &Path) -> Result<ModuleIndex> {
        let dep = read_bounded(&dir.join(DEP_FILE), MAX_INDEX_FILE_BYTES)?;
        let alias = read_bounded(&dir.join(ALIAS_FILE), MAX_INDEX_FILE_BYTES)?;
        ModuleIndex::parse(dir, &dep, &alias)
    }

    /// The modules directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many modules the index lists.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// How many alias patterns the index lists.
    pub fn alias_count(&self) -> usize {
        self.aliases.len()
    }

    /// Whether `name` is a module of the index.
    pub fn contains(&self, name: &str) -> bool {
        self.modules.contains_key(&canonical_name(name))
    }

    /// The file of module `name`.
    pub fn path_of(&self, name: &str) -> Option<PathBuf> {
        self.modules.get(&canonical_name(name)).map(|m| self.dir.join(&m.path))
    }

    /// `name` and everything it needs, dependencies first, each once.
    pub fn load_order(&self, name: &str) -> Result<Vec<String>> {
        let name = canonical_name(name);
        if !self.modules.contains_key(&name) {
            return Err(ModuleError::Unknown { name, dir: self.dir.clone() });
        }
        let mut order = Vec::new();
        self.visit(&name, &mut HashSet::new(), &mut Vec::new(), &mut order)?;
        Ok(order)
    }

    fn visit(&self, name: &str, done: &mut HashSet<String>, stack: &mut Vec<String>, order: &mut Vec<String>) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            return Err(ModuleError::Cycle { name: name.to_string(), chain: format!("{} -> {name}", stack.join(" -> ")) });
        }
        // Every dependency was checked to be in the index when it was parsed.
        let Some(m) = self.modules.get(name) else { return Err(ModuleError::Unknown { name: name.to_string(), dir: self.dir.clone() }) };
        stack.push(name.to_string());
        for d in &m.deps {
            self.visit(d, done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }

    /// The modules whose alias patterns match `alias`, in index order, each once.
    pub fn modules_for_alias(&self, alias: &str) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for (pattern, module) in &self.aliases {
            if !out.contains(&module.as_str()) && fnmatch(pattern.as_bytes(), alias.as_bytes()) {
                out.push(module);
            }
        }
        out
    }
}

/// `fnmatch(3)` without flags, as kmod matches modaliases: `*` any run (`/`
/// included), `?` any byte, `[...]` a set (ranges `a-z`, negation `!` or `^`, `]`
/// first is literal; an unclosed `[` is literal), `\` quotes the next byte.
pub fn fnmatch(pattern: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, input index it matched up to).
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pattern.get(pi) == Some(&b'*') {
            pi += 1;
            star = Some((pi, si));
            continue;
        }
        if let Some(next) = match_one(pattern, pi, s[si]) {
            pi = next;
            si += 1;
            continue;
        }
        match star {
            // Let the `*` take one more byte and try again from there.
            Some((after, taken)) => {
                pi = after;
                si = taken + 1;
                star = Some((after, taken + 1));
            }
            None => return false,
        }
    }
    pattern[pi.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// Whether the single-byte token of `pattern` at `pi` (not `*`) matches `c`; the
/// index after the token if it does.
fn match_one(pattern: &[u8], pi: usize, c: u8) -> Option<usize> {
    let &p = pattern.get(pi)?;
    match p {
        b'?' => Some(pi + 1),
        b'[' => match bracket(pattern, pi + 1, c) {
            Some((true, next)) => Some(next),
            Some((false, _)) => None,
            // No closing `]`: a literal `[`.
            None => (c == b'[').then_some(pi + 1),
        },
        b'\\' if pi + 1 < pattern.len() => (pattern[pi + 1] == c).then_some(pi + 2),
        _ => (p == c).then_some(pi + 1),
    }
}

/// A bracket expression starting after its `[`: (matches `c`, index after its `]`),
/// or `None` if it is not closed.
fn bracket(pattern: &[u8], mut i: usize, c: u8) -> Option<(bool, usize)> {
    let negate = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let &b = pattern.get(i)?;
        if b == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        let (lo, after) = if b == b'\\' && i + 1 < pattern.len() { (pattern[i + 1], i + 2) } else { (b, i + 1) };
        if pattern.get(after) == Some(&b'-') && pattern.get(after + 1).is_some_and(|&h| h != b']') {
            let (hi, next) = if pattern[after + 1] == b'\\' && after + 2 < pattern.len() {
                (pattern[after + 2], after + 3)
            } else {
                (pattern[after + 1], after + 2)
            };
            matched |= lo <= c && c <= hi;
            i = next;
        } else {
            matched |= lo == c;
            i = after;
        }
    }
}

/// Where modules go: the running kernel, or a fake in tests.
pub trait ModuleSink: Send + Sync {
    /// Whether module `name` is in the kernel already (its file need not be read).
    fn is_loaded(&self, name: &str) -> bool;
    /// Loads the module file at `path`. `EEXIST` means it was loaded already.
    fn insert(&self, path: &Path) -> io::Result<()>;
}

/// The running kernel: `/sys/module/<name>/initstate` tells a loaded module (built-in
/// ones have none), `finit_module(2)` loads one.
#[derive(Debug, Default)]
pub struct RunningKernel;

/// `finit_module` flag: the file is compressed (the kernel decompresses it, if built to).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// The most a module may decompress to (mlx5_core, the largest the image carries, is
/// ~4 MB): a corrupt file is refused, not inflated without bound.
const MAX_MODULE_BYTES: u64 = 64 << 20;
/// The largest zstd window accepted: the decoder reserves the window a frame declares
/// up front, and the agent is PID 1 in a guest that may have 32 MiB. `zstd -19` uses
/// at most 8 MiB.
const MAX_ZSTD_WINDOW: u64 = 16 << 20;

/// The module in a `.ko.zst` file (one zstd frame), decompressed: the image stores
/// its on-demand modules so (a third of the bytes to unpack at every boot), and the
/// agent inflates the few it loads, since Debian's kernel cannot decompress modules
/// itself.
pub fn decompress_zstd_module(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {what}", path.display()));
    let file = std::fs::File::open(path)?;
    let mut decoder = ruzstd::decoding::StreamingDecoder::new_with_max_window_size(file, MAX_ZSTD_WINDOW)
        .map_err(|e| invalid(format!("not a zstd frame with a window of at most {MAX_ZSTD_WINDOW} bytes: {e}")))?;
    let mut module = Vec::new();
    (&mut decoder).take(MAX_MODULE_BYTES + 1).read_to_end(&mut module).map_err(|e| invalid(format!("corrupt zstd data: {e}")))?;
    if module.len() as u64 > MAX_MODULE_BYTES {
        return Err(invalid(format!("decompresses to more than {MAX_MODULE_BYTES} bytes")));
    }
    // One frame, nothing after it: a file with more would load truncated.
    let mut rest = [0u8; 1];
    if decoder.get_mut().read(&mut rest)? != 0 {
        return Err(invalid("data after the zstd frame (expected exactly one)".into()));
    }
    Ok(module)
}

impl ModuleSink for RunningKernel {
    fn is_loaded(&self, name: &str) -> bool {
        Path::new("/sys/module").join(name).join("initstate").exists()
    }

    fn insert(&self, path: &Path) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let name = path.to_string_lossy();
        if name.ends_with(".ko.zst") {
            let module = decompress_zstd_module(path)?;
            // SAFETY: init_module reads `module.len()` bytes from a buffer we own and
            // an empty NUL-terminated parameter string.
            let rc = unsafe { libc::syscall(libc::SYS_init_module, module.as_ptr(), module.len(), c"".as_ptr()) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(());
        }
        let file = std::fs::File::open(path)?;
        let flags = if name.ends_with(".ko") { 0 } else { MODULE_INIT_COMPRESSED_FILE };
        // SAFETY: finit_module on a descriptor we own, with empty NUL-terminated parameters.
        let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), flags) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct LoadState {
    /// Modules known to be in the kernel.
    loaded: HashSet<String>,
    /// Modules whose load failed, with why.
    failed: HashMap<String, String>,
    attempts: usize,
}

/// Loads modules of one [`ModuleIndex`] on demand (see the module docs).
pub struct ModuleLoader {
    index: ModuleIndex,
    sink: Box<dyn ModuleSink>,
    state: Mutex<LoadState>,
}

impl std::fmt::Debug for ModuleLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleLoader").field("index", &self.index).finish_non_exhaustive()
    }
}

impl ModuleLoader {
    /// A loader into the running kernel.
    pub fn new(index: ModuleIndex) -> ModuleLoader {
        ModuleLoader::with_sink(index, Box::new(RunningKernel))
    }

    pub fn with_sink(index: ModuleIndex, sink: Box<dyn ModuleSink>) -> ModuleLoader {
        ModuleLoader { index, sink, state: Mutex::default() }
    }

    /// A loader for the index in `dir`.
    pub fn open(dir: &Path) -> Result<ModuleLoader> {
        Ok(ModuleLoader::new(ModuleIndex::open(dir)?))
    }

    pub fn index(&self) -> &ModuleIndex {
        &self.index
    }

    fn state(&self) -> MutexGuard<'_, LoadState> {
        // A panic elsewhere leaves the sets whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads module `name` and what it needs, dependencies first. Returns the modules
    /// this call loaded (empty when all were loaded already).
    pub fn load(&self, name: &str) -> Result<Vec<String>> {
        self.load_for(name, &format!("asked for {}", canonical_name(name)))
    }

    fn load_for(&self, name: &str, why: &str) -> Result<Vec<String>> {
        let order = self.index.load_order(name)?;
        let mut st = self.state();
        let mut loaded = Vec::new();
        for m in order {
            if st.loaded.contains(&m) {
                continue;
            }
            if let Some(reason) = st.failed.get(&m) {
                return Err(ModuleError::FailedBefore { name: m, reason: reason.clone() });
            }
            if self.sink.is_loaded(&m) {
                st.loaded.insert(m);
                continue;
            }
            if st.attempts >= MAX_LOAD_ATTEMPTS {
                return Err(ModuleError::TooManyLoads { name: m, max: MAX_LOAD_ATTEMPTS });
            }
            st.attempts += 1;
            let path = self.index.path_of(&m).ok_or_else(|| ModuleError::Unknown { name: m.clone(), dir: self.index.dir.clone() })?;
            match self.sink.insert(&path) {
                Ok(()) => {
                    tracing::info!("loaded kernel module {m} ({why})");
                    loaded.push(m.clone());
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => tracing::debug!("kernel module {m} was loaded already"),
                Err(source) => {
                    st.failed.insert(m.clone(), source.to_string());
                    return Err(ModuleError::Load { name: m, path, source });
                }
            }
            st.loaded.insert(m);
        }
        Ok(loaded)
    }

    /// Loads every module whose alias pattern matches `alias` (a device's modalias,
    /// or a kernel request name such as `fs-overlay`), each with its dependencies.
    /// No match is not an error (the driver is built in, or the image has none).
    /// Every match is tried; the first failure is returned after that.
    pub fn load_for_modalias(&self, alias: &str) -> Result<Vec<String>> {
        check_alias(alias, true).map_err(|reason| ModuleError::BadAlias { alias: alias.to_string(), reason })?;
        let matches = self.index.modules_for_alias(alias);
        if matches.is_empty() {
            tracing::debug!(modalias = alias, "no kernel module for it");
        }
        let why = format!("for {alias}");
        let mut loaded = Vec::new();
        let mut first_err = None;
        for m in matches {
            match self.load_for(m, &why) {
                Ok(l) => loaded.extend(l),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(loaded),
        }
    }

    /// The driver of the device at `device_dir` (a sysfs device directory): loads
    /// the modules for its `modalias` unless a driver is bound already. A device
    /// without a modalias (or gone) needs nothing.
    pub fn load_for_device(&self, device_dir: &Path) -> Result<Vec<String>> {
        if std::fs::symlink_metadata(device_dir.join("driver")).is_ok() {
            return Ok(Vec::new());
        }
        let path = device_dir.join("modalias");
        let alias = match read_bounded(&path, u64::try_from(MAX_ALIAS_LEN).unwrap_or(u64::MAX)) {
            Ok(a) => a,
            Err(ModuleError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let alias = alias.trim();
        if alias.is_empty() {
            return Ok(Vec::new());
        }
        self.load_for_modalias(alias)
    }

    /// Coldplug: the drivers of the devices on `bus` (`<sysfs>/bus/<bus>/devices/*`)
    /// that have none bound. Failures are logged; returns the modules loaded.
    pub fn coldplug(&self, sysfs_root: &Path, bus: &str) -> Vec<String> {
        let dir = sysfs_root.join("bus").join(bus).join("devices");
        let entries = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                tracing::debug!("coldplug: cannot list {}: {e}", dir.display());
                return Vec::new();
            }
        };
        let mut devices: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).take(MAX_COLDPLUG_DEVICES + 1).collect();
        if devices.len() > MAX_COLDPLUG_DEVICES {
            tracing::warn!("coldplug: {} lists more than {MAX_COLDPLUG_DEVICES} devices; looking at the first ones only", dir.display());
            devices.truncate(MAX_COLDPLUG_DEVICES);
        }
        devices.sort();
        let mut loaded = Vec::new();
        for d in devices {
            match self.load_for_device(&d) {
                Ok(l) => loaded.extend(l),
                Err(e) => tracing::warn!("coldplug: device {}: {e}", d.display()),
            }
        }
        loaded
    }
}

static GLOBAL: OnceLock<ModuleLoader> = OnceLock::new();

/// Makes `loader` the agent's (PID 1's) loader, which [`request`] and friends use.
/// Only the first call installs one; later ones get that one back.
pub fn install(loader: ModuleLoader) -> &'static ModuleLoader {
    GLOBAL.get_or_init(|| loader)
}

/// The agent's loader, if one was installed (as PID 1, from the image's index).
pub fn global() -> Option<&'static ModuleLoader> {
    GLOBAL.get()
}

/// Loads module `name` with the agent's loader, if there is one. A module the index
/// does not know is fine (built in, or not in this image): whatever needed it reports
/// the real error if it is missing. Failures are logged and returned.
pub fn request(name: &str) -> Result<()> {
    let Some(loader) = global() else { return Ok(()) };
    match loader.load(name) {
        Ok(_) => Ok(()),
        Err(ModuleError::Unknown { .. }) => Ok(()),
        Err(e) => {
            tracing::warn!("{e}");
            Err(e)
        }
    }
}

/// [`ModuleLoader::load_for_modalias`] with the agent's loader, if there is one
/// (e.g. `fs-overlay` before mounting an overlay); failures are logged and returned.
pub fn request_alias(alias: &str) -> Result<()> {
    let Some(loader) = global() else { return Ok(()) };
    loader.load_for_modalias(alias).map(drop).inspect_err(|e| tracing::warn!("{e}"))
}

/// The driver of the PCI device `addr` (`0000:00:05.0`), if it is there without
/// one, with the agent's loader, if there is one; failures are logged and returned.
pub fn request_pci_driver(sysfs_root: &Path, addr: &str) -> Result<()> {
    let Some(loader) = global() else { return Ok(()) };
    loader
        .load_for_device(&sysfs_root.join("bus/pci/devices").join(addr))
        .map(drop)
        .inspect_err(|e| tracing::warn!("PCI device {addr}: {e}"))
}

/// Hot-plug: subscribes to the kernel's uevents now (so nothing that happens after
/// this returns is missed) and, on a thread of its own, loads the modules for every
/// `add` event that carries a `MODALIAS`. When the socket overflowed (events were
/// lost), the PCI and virtio buses are scanned again as at boot.
pub fn spawn_hotplug_listener(loader: &'static ModuleLoader, sysfs_root: PathBuf) -> crate::network::Result<()> {
    use crate::network::uevent::{deadline_after, Recv, UeventSocket};
    let socket = UeventSocket::open()?;
    let spawned = std::thread::Builder::new().name("modules-hotplug".into()).spawn(move || {
        let mut errors = 0u32;
        loop {
            match socket.recv(deadline_after(Duration::from_secs(3600))) {
                Ok(Recv::Event(e)) => {
                    errors = 0;
                    let Some(alias) = e.modalias.as_deref().filter(|_| e.action == "add") else { continue };
                    if let Err(err) = loader.load_for_modalias(alias) {
                        tracing::warn!(devpath = %e.devpath, "hot-plug: {err}");
                    }
                }
                Ok(Recv::Overflow) => {
                    tracing::warn!("hot-plug: uevents were lost (socket overflow): scanning the PCI and virtio buses again");
                    loader.coldplug(&sysfs_root, "pci");
                    loader.coldplug(&sysfs_root, "virtio");
                }
                Ok(Recv::Timeout) => {}
                Err(e) => {
                    errors += 1;
                    tracing::warn!("hot-plug: {e}");
                    if errors >= 10 {
                        tracing::error!("hot-plug: giving up on uevents after {errors} errors in a row: no more modules on hot-plug");
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    });
    spawned.map(drop).map_err(|source| crate::network::NetError::Uevent { op: "start the hot-plug thread", source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const DIR: &str = "/lib/modules/6.1.0-test";
    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/fuse.ko:
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko
kernel/fs/overlayfs/overlay.ko:
kernel/net/802/stp-x.ko:
kernel/net/8021q/8021q.ko: kernel/net/802/stp-x.ko
kernel/drivers/net/ethernet/intel/igbvf/igbvf.ko:
kernel/drivers/net/ethernet/intel/iavf/iavf.ko:
";
    const ALIAS: &str = "\
# Aliases extracted from modules themselves.
alias fs-fuse fuse
alias fs-virtiofs virtiofs
alias virtio:d0000001Av* virtiofs
alias fs-overlay overlay
alias rtnl-link-vlan 8021q
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias pci:v00008086d000010CAsv*sd*bc*sc*i* igbvf
alias pci:v00008086d00001520sv*sd*bc*sc*i* igbvf
alias pci:v00008086d0000154[CD]sv*sd*bc*sc*i* iavf
alias i40evf iavf
";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(Path::new(DIR), DEP, ALIAS).unwrap()
    }

    /// Records what it loads; `present` modules are in the kernel already; `broken`
    /// ones fail with EINVAL; `exists` ones answer EEXIST.
    #[derive(Default)]
    struct FakeKernel {
        inserted: Mutex<Vec<String>>,
        present: HashSet<String>,
        broken: HashSet<String>,
        exists: HashSet<String>,
    }

    impl ModuleSink for Arc<FakeKernel> {
        fn is_loaded(&self, name: &str) -> bool {
            self.present.contains(name)
        }
        fn insert(&self, path: &Path) -> io::Result<()> {
            let name = module_name(&path.to_string_lossy());
            assert!(path.starts_with(DIR), "{}", path.display());
            // Widen the window for the concurrency test.
            std::thread::sleep(Duration::from_millis(2));
            if self.broken.contains(&name) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            if self.exists.contains(&name) {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            self.inserted.lock().unwrap().push(name);
            Ok(())
        }
    }

    fn loader(fake: &Arc<FakeKernel>) -> ModuleLoader {
        ModuleLoader::with_sink(index(), Box::new(fake.clone()))
    }

    fn inserted(fake: &FakeKernel) -> Vec<String> {
        fake.inserted.lock().unwrap().clone()
    }

    #[test]
    fn globs_match_as_fnmatch_does() {
        let m = |p: &str, s: &str| fnmatch(p.as_bytes(), s.as_bytes());
        assert!(m("pci:v00008086d000010CAsv*sd*bc*sc*i*", "pci:v00008086d000010CAsv00008086sd00000000bc02sc00i00"));
        assert!(!m("pci:v00008086d000010CAsv*sd*bc*sc*i*", "pci:v00008086d000010CBsv00008086sd00000000bc02sc00i00"));
        assert!(m("*", "") && m("*", "anything/at all") && m("a*", "a") && !m("a*", "b"));
        assert!(m("a*b*c", "aXXbYYc") && m("a*b*c", "abc") && !m("a*b*c", "aXXbYY") && m("*c", "abcbc"));
        assert!(m("a?c", "abc") && !m("a?c", "ac") && !m("a?c", "abbc"));
        assert!(m("d0[0-2]x", "d01x") && !m("d0[0-2]x", "d03x") && m("[!a-c]", "d") && !m("[!a-c]", "b") && m("[^a]", "b"));
        assert!(m("[]x]", "]") && m("[]x]", "x") && !m("[]x]", "y") && m("[a-]", "-"));
        assert!(m("[unclosed", "[unclosed") && !m("[unclosed", "u"));
        assert!(m("a\\*b", "a*b") && !m("a\\*b", "aXb") && m("a\\", "a\\"));
        assert!(m("usb:v13FDp3940d0[0-2]*dc*", "usb:v13FDp3940d01FFdc00"));
        assert!(!m("", "x") && m("", ""));
        // Many stars against a long input stay cheap (no exponential backtracking).
        let long = "a".repeat(MAX_ALIAS_LEN);
        assert!(!m(&format!("{}b", "*a".repeat(20)), &long));
    }

    #[test]
    fn the_index_parses_and_orders_dependencies_first() {
        let idx = index();
        assert_eq!((idx.len(), idx.alias_count()), (10, 10));
        assert!(idx.contains("stp-x") && idx.contains("stp_x") && !idx.contains("e1000"));
        assert_eq!(idx.load_order("virtiofs").unwrap(), ["virtio", "virtio_ring", "fuse", "virtiofs"]);
        assert_eq!(idx.load_order("8021q").unwrap(), ["stp_x", "8021q"]);
        assert_eq!(idx.path_of("igbvf").unwrap(), Path::new(DIR).join("kernel/drivers/net/ethernet/intel/igbvf/igbvf.ko"));
        assert_eq!(idx.modules_for_alias("pci:v00008086d0000154Dsv00008086sd00000000bc02sc00i00"), ["iavf"]);
        assert_eq!(idx.modules_for_alias("fs-overlay"), ["overlay"]);
        assert!(idx.modules_for_alias("fs-ext4").is_empty());
        let e = idx.load_order("e1000").unwrap_err();
        assert!(matches!(e, ModuleError::Unknown { .. }) && e.to_string().contains("e1000"), "{e}");
    }

    #[test]
    fn malformed_indexes_are_refused_naming_file_and_line() {
        let dir = Path::new(DIR);
        let err = |dep: &str, alias: &str| ModuleIndex::parse(dir, dep, alias).unwrap_err().to_string();
        let e = err("a.ko: b.ko\nno colon here\n", "");
        assert!(e.contains("modules.dep line 2") && e.contains("no colon"), "{e}");
        assert!(err("a.ko: b.ko\n", "").contains("dependency b.ko is not listed"));
        assert!(err("../evil.ko:\n", "").contains("not a plain relative path"));
        assert!(err("/abs/a.ko:\n", "").contains("not a plain relative path"));
        assert!(err("a.txt:\n", "").contains("not a module file"));
        assert!(err("x/a.ko:\ny/a.ko:\n", "").contains("listed twice"));
        let e = err("a.ko:\n", "\nalias x a\nalias y\n");
        assert!(e.contains("modules.alias line 3") && e.contains("alias PATTERN MODULE"), "{e}");
        assert!(err("a.ko:\n", "options a x=1\n").contains("alias PATTERN MODULE"));
        assert!(err("a.ko:\n", "alias x b\n").contains("module b is not in modules.dep"));
        assert!(err("a.ko:\n", &format!("alias {} a\n", "x".repeat(MAX_ALIAS_LEN + 1))).contains("at most"));
        let cyclic = ModuleIndex::parse(dir, "a.ko: b.ko\nb.ko: a.ko\n", "").unwrap();
        assert!(matches!(cyclic.load_order("a").unwrap_err(), ModuleError::Cycle { .. }));
    }

    #[test]
    fn index_files_are_read_bounded() {
        let dir = std::env::temp_dir().join(format!("vfvm-agent-modules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = ModuleIndex::open(&dir).unwrap_err();
        assert!(e.is_missing_index(), "{e}");
        std::fs::write(dir.join(DEP_FILE), DEP).unwrap();
        std::fs::write(dir.join(ALIAS_FILE), ALIAS).unwrap();
        let idx = ModuleIndex::open(&dir).unwrap();
        assert_eq!(idx.dir(), dir);
        assert_eq!(idx.len(), 10);
        let big = std::fs::File::create(dir.join(ALIAS_FILE)).unwrap();
        big.set_len(MAX_INDEX_FILE_BYTES + 1).unwrap();
        let e = ModuleIndex::open(&dir).unwrap_err();
        assert!(matches!(e, ModuleError::TooLarge { .. }) && e.to_string().contains("modules.alias"), "{e}");
        assert!(!e.is_missing_index());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_takes_dependencies_first_once_and_skips_loaded_modules() {
        let fake = Arc::new(FakeKernel { present: ["virtio".to_string()].into(), ..Default::default() });
        let l = loader(&fake);
        assert_eq!(l.load("virtiofs").unwrap(), ["virtio_ring", "fuse", "virtiofs"]);
        assert!(l.load("virtiofs").unwrap().is_empty(), "idempotent");
        assert!(l.load("fuse").unwrap().is_empty());
        assert_eq!(l.load("8021q").unwrap(), ["stp_x", "8021q"]);
        assert_eq!(inserted(&fake), ["virtio_ring", "fuse", "virtiofs", "stp_x", "8021q"]);
        assert!(matches!(l.load("nope").unwrap_err(), ModuleError::Unknown { .. }));
    }

    #[test]
    fn eexist_counts_as_loaded_and_failures_are_not_retried() {
        let fake =
            Arc::new(FakeKernel { exists: ["fuse".to_string()].into(), broken: ["virtio_ring".into()].into(), ..Default::default() });
        let l = loader(&fake);
        assert!(l.load("fuse").unwrap().is_empty(), "EEXIST: in the kernel already");
        let e = l.load("virtiofs").unwrap_err();
        assert!(matches!(e, ModuleError::Load { .. }) && e.to_string().contains("virtio_ring.ko"), "{e}");
        let again = l.load("virtiofs").unwrap_err();
        assert!(matches!(again, ModuleError::FailedBefore { .. }), "{again}");
        assert_eq!(inserted(&fake), ["virtio"]);
    }

    #[test]
    fn modaliases_load_every_matching_module() {
        let fake = Arc::new(FakeKernel::default());
        let l = loader(&fake);
        assert_eq!(l.load_for_modalias("pci:v00008086d000010CAsv00008086sd00000000bc02sc00i00").unwrap(), ["igbvf"]);
        assert!(l.load_for_modalias("pci:v00008086d000010CAsv00008086sd00000000bc02sc00i00").unwrap().is_empty());
        assert!(l.load_for_modalias("pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00").unwrap().is_empty(), "no driver here");
        assert_eq!(l.load_for_modalias("fs-overlay").unwrap(), ["overlay"]);
        assert_eq!(l.load_for_modalias("rtnl-link-vlan").unwrap(), ["stp_x", "8021q"]);
        for bad in ["", "tab\there", "nl\n", "\u{e9}", &"x".repeat(MAX_ALIAS_LEN + 1)] {
            assert!(matches!(l.load_for_modalias(bad).unwrap_err(), ModuleError::BadAlias { .. }), "{bad:?}");
        }
        assert!(l.load_for_modalias("dmi:bvnSeaBIOS:pnStandard PC (Q35 + ICH9, 2009):").unwrap().is_empty(), "blanks are fine");
        assert_eq!(inserted(&fake), ["igbvf", "overlay", "stp_x", "8021q"]);
    }

    #[test]
    fn concurrent_loads_insert_each_module_once() {
        let fake = Arc::new(FakeKernel::default());
        let l = Arc::new(loader(&fake));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let l = l.clone();
                std::thread::spawn(move || if i % 2 == 0 { l.load("virtiofs") } else { l.load_for_modalias("virtio:d0000001Av00001AF4") })
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap().unwrap().len()).sum();
        assert_eq!(total, 4);
        let mut got = inserted(&fake);
        got.sort();
        assert_eq!(got, ["fuse", "virtio", "virtio_ring", "virtiofs"]);
    }

    #[test]
    fn load_attempts_are_bounded() {
        let dep: String = (0..MAX_LOAD_ATTEMPTS + 1).map(|i| format!("m{i}.ko:\n")).collect();
        let fake = Arc::new(FakeKernel::default());
        let l = ModuleLoader::with_sink(ModuleIndex::parse(Path::new(DIR), &dep, "").unwrap(), Box::new(fake.clone()));
        for i in 0..MAX_LOAD_ATTEMPTS {
            l.load(&format!("m{i}")).unwrap();
        }
        let e = l.load(&format!("m{MAX_LOAD_ATTEMPTS}")).unwrap_err();
        assert!(matches!(e, ModuleError::TooManyLoads { .. }), "{e}");
        assert_eq!(inserted(&fake).len(), MAX_LOAD_ATTEMPTS);
    }

    /// A fake sysfs PCI bus: a VF without a driver, one with a driver, a virtio device
    /// whose driver is in, a host bridge nothing matches.
    #[test]
    fn coldplug_loads_drivers_of_devices_without_one() {
        let root = std::env::temp_dir().join(format!("vfvm-agent-coldplug-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let devices = root.join("bus/pci/devices");
        let dev = |addr: &str, modalias: &str, driver: bool| {
            let d = devices.join(addr);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("modalias"), format!("{modalias}\n")).unwrap();
            if driver {
                std::os::unix::fs::symlink("../../../bus/pci/drivers/x", d.join("driver")).unwrap();
            }
        };
        dev("0000:00:00.0", "pci:v00008086d000029C0sv00001AF4sd00001100bc06sc00i00", false);
        dev("0000:00:02.0", "pci:v00001AF4d00001053sv00001AF4sd00001100bc05sc80i00", true);
        dev("0000:00:05.0", "pci:v00008086d000010CAsv00008086sd00000000bc02sc00i00", false);
        dev("0000:00:06.0", "pci:v00008086d00001520sv00008086sd00000000bc02sc00i00", true);
        std::fs::create_dir_all(devices.join("0000:00:07.0")).unwrap(); // no modalias
        let fake = Arc::new(FakeKernel::default());
        let l = loader(&fake);
        assert_eq!(l.coldplug(&root, "pci"), ["igbvf"]);
        assert!(l.coldplug(&root, "pci").is_empty());
        assert!(l.coldplug(&root, "nosuchbus").is_empty());
        assert!(l.load_for_device(&devices.join("0000:00:09.0")).unwrap().is_empty(), "gone");
        assert_eq!(inserted(&fake), ["igbvf"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn without_an_installed_loader_requests_do_nothing() {
        // Unit tests never install one (only PID 1 does).
        assert!(global().is_none());
        request("8021q").unwrap();
        request_alias("fs-overlay").unwrap();
        request_pci_driver(Path::new("/nonexistent"), "0000:00:05.0").unwrap();
    }

    /// A `.ko.zst` module inflates to its bytes; a corrupt or oversized one is refused
    /// with the file named. The data is compressed by ruzstd's own encoder here; the
    /// lab's image test loads zstd(1)-compressed modules into a real guest kernel.
    #[test]
    fn zstd_modules_decompress_within_bounds() {
        let dir = std::env::temp_dir().join(format!("vfvm-zst-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let module: Vec<u8> = (0..300_000u32).flat_map(|i| (i % 7919).to_le_bytes()).collect();
        let good = dir.join("m.ko.zst");
        let packed = ruzstd::encoding::compress_to_vec(&module[..], ruzstd::encoding::CompressionLevel::Fastest);
        assert!(packed.len() < module.len());
        std::fs::write(&good, &packed).unwrap();
        assert_eq!(decompress_zstd_module(&good).unwrap(), module);

        let corrupt = dir.join("bad.ko.zst");
        std::fs::write(&corrupt, b"not zstd at all").unwrap();
        let e = decompress_zstd_module(&corrupt).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("bad.ko.zst"), "{e}");

        // Two frames back to back: refused, not loaded truncated.
        let twice = dir.join("twice.ko.zst");
        std::fs::write(&twice, [packed.clone(), packed.clone()].concat()).unwrap();
        let e = decompress_zstd_module(&twice).unwrap_err();
        assert!(e.to_string().contains("data after the zstd frame"), "{e}");

        // 65 MiB of zeros compresses to a few KiB: refused at the bound.
        let zeros = vec![0u8; usize::try_from(MAX_MODULE_BYTES + (1 << 20)).unwrap()];
        let big = dir.join("big.ko.zst");
        std::fs::write(&big, ruzstd::encoding::compress_to_vec(&zeros[..], ruzstd::encoding::CompressionLevel::Fastest)).unwrap();
        let e = decompress_zstd_module(&big).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
