//! cgroup v2: a cgroup per container under `<root>/vfvm/<id>`, with the spec's
//! memory/cpu/pids limits where those controllers are available. In the guest the
//! root is /sys/fs/cgroup (the agent mounts cgroup2 there); on a host with the
//! hybrid layout the unified hierarchy at /sys/fs/cgroup/unified is used, which
//! usually has no controllers: limits are then skipped, with a log line.

use std::path::{Path, PathBuf};

use super::spec::Resources;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn is_cgroup2(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: `statfs` is a plain C struct for which all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs of a NUL-terminated path we own, into `st`, a live, correctly typed local.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == CGROUP2_SUPER_MAGIC
}

/// The parent of every container cgroup, set up once; None when there is no
/// cgroup v2 hierarchy to use.
pub fn parent() -> Option<PathBuf> {
    static PARENT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    PARENT
        .get_or_init(|| {
            let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].into_iter().map(PathBuf::from).find(|p| is_cgroup2(p));
            let Some(root) = root else {
                tracing::warn!("no cgroup v2 hierarchy: containers run without cgroups (no limits, no stats)");
                return None;
            };
            let parent = root.join("vfvm");
            if let Err(e) = std::fs::create_dir_all(&parent) {
                tracing::warn!("cannot create {}: {e}: containers run without cgroups", parent.display());
                return None;
            }
            let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let wanted: Vec<&str> = available.split_whitespace().filter(|c| ["cpu", "memory", "pids"].contains(c)).collect();
            for dir in [&root, &parent] {
                for c in &wanted {
                    if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
                        tracing::warn!("cannot enable the {c} controller in {}: {e}", dir.display());
                    }
                }
            }
            let missing: Vec<&str> = ["cpu", "memory", "pids"].into_iter().filter(|c| !wanted.contains(c)).collect();
            if !missing.is_empty() {
                tracing::warn!("cgroup controllers {missing:?} not available under {}: those limits and stats are skipped", root.display());
            }
            tracing::info!("container cgroups under {}", parent.display());
            Some(parent)
        })
        .clone()
}

pub struct Cgroup {
    pub path: PathBuf,
}

/// The controllers enabled in the cgroup at `path`.
fn controllers(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path.join("cgroup.controllers")).unwrap_or_default().split_whitespace().map(str::to_string).collect()
}

impl Cgroup {
    pub fn create(id: &str) -> Option<Cgroup> {
        let path = parent()?.join(id);
        match std::fs::create_dir(&path) {
            Ok(()) => Some(Cgroup { path }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Some(Cgroup { path }),
            Err(e) => {
                tracing::warn!("cannot create cgroup {}: {e}", path.display());
                None
            }
        }
    }

    pub fn add(&self, pid: libc::pid_t) -> std::io::Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
    }

    fn set(&self, enabled: &[String], file: &str, value: String) {
        let controller = file.split('.').next().unwrap_or_default();
        if !enabled.iter().any(|c| c == controller) {
            tracing::info!(cgroup = %self.path.display(), "no {controller} controller here: {file} = {value} skipped");
            return;
        }
        match std::fs::write(self.path.join(file), &value) {
            Ok(()) => tracing::debug!(cgroup = %self.path.display(), "{file} = {value}"),
            Err(e) => tracing::warn!(cgroup = %self.path.display(), "cannot set {file} = {value}: {e}"),
        }
    }

    pub fn apply(&self, r: &Resources) {
        let enabled = controllers(&self.path);
        let set = |file: &str, value: String| self.set(&enabled, file, value);
        if let Some(m) = &r.memory {
            if let Some(l) = m.limit {
                set("memory.max", if l < 0 { "max".into() } else { l.to_string() });
            }
            if let (Some(swap), Some(l)) = (m.swap, m.limit) {
                // OCI's swap is memory+swap; cgroup v2's is swap alone.
                if swap >= 0 && l >= 0 && swap >= l {
                    set("memory.swap.max", (swap - l).to_string());
                }
            }
        }
        if let Some(c) = &r.cpu {
            if let Some(shares) = c.shares.filter(|s| *s > 0) {
                // runc's conversion of cgroup v1 shares to v2 weight.
                let weight = 1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142;
                set("cpu.weight", weight.to_string());
            }
            if c.quota.is_some() || c.period.is_some() {
                let period = c.period.filter(|p| *p > 0).unwrap_or(100_000);
                let quota = match c.quota {
                    Some(q) if q > 0 => q.to_string(),
                    _ => "max".into(),
                };
                set("cpu.max", format!("{quota} {period}"));
            }
        }
        if let Some(p) = &r.pids {
            set("pids.max", if p.limit <= 0 { "max".into() } else { p.limit.to_string() });
        }
    }

    fn read_key(&self, file: &str, key: &str) -> Option<u64> {
        let text = std::fs::read_to_string(self.path.join(file)).ok()?;
        text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
    }

    fn read_num(&self, file: &str) -> Option<u64> {
        std::fs::read_to_string(self.path.join(file)).ok()?.trim().parse().ok()
    }

    /// (cpu usage ns, memory usage, memory limit, pids), 0 where unknown.
    pub fn stats(&self) -> (u64, u64, u64, u64) {
        (
            self.read_key("cpu.stat", "usage_usec").map_or(0, |u| u * 1000),
            self.read_num("memory.current").unwrap_or(0),
            self.read_num("memory.max").unwrap_or(0),
            self.read_num("pids.current").unwrap_or(0),
        )
    }

    pub fn oom_kills(&self) -> u64 {
        self.read_key("memory.events", "oom_kill").unwrap_or(0)
    }

    pub fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// Removes the cgroup, waiting briefly for its last processes to go.
    pub fn remove(&self) {
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        tracing::warn!("cannot remove cgroup {}", self.path.display());
    }
}
