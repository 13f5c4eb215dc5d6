//! The OCI bundle containerd hands the shim: the few things the shim itself reads
//! (annotations, the pod's network namespace, the hostname) and the spec rewritten
//! for the guest, where host paths mean nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// CRI's annotations (containerd 1.6 to 2.x) that tie a container to its pod.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// The agent's limit on a spec.
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(transparent)]
    Id(#[from] crate::ids::IdError),
}

#[derive(Clone, Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Value,
    pub annotations: HashMap<String, String>,
}

impl Bundle {
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let path = dir.join("config.json");
        let meta =
            std::fs::metadata(&path).map_err(|source| BundleError::Io { path: path.clone(), what: "reading the OCI spec", source })?;
        if meta.len() > MAX_SPEC_BYTES {
            return Err(BundleError::Invalid { path, message: format!("{} bytes; at most {MAX_SPEC_BYTES}", meta.len()) });
        }
        let text = std::fs::read(&path).map_err(|source| BundleError::Io { path: path.clone(), what: "reading the OCI spec", source })?;
        let spec: Value = serde_json::from_slice(&text)
            .map_err(|e| BundleError::Invalid { path: path.clone(), message: format!("not an OCI spec: {e}") })?;
        if !spec.is_object() {
            return Err(BundleError::Invalid { path, message: "not an OCI spec: expected a JSON object".into() });
        }
        let mut annotations = HashMap::new();
        if let Some(map) = spec.get("annotations").and_then(Value::as_object) {
            for (k, v) in map {
                let Some(v) = v.as_str() else {
                    return Err(BundleError::Invalid { path, message: format!("annotation {k:?}: expected a string value") });
                };
                annotations.insert(k.clone(), v.to_string());
            }
        }
        Ok(Bundle { dir: dir.to_path_buf(), spec, annotations })
    }

    /// The pod this container belongs to: CRI's sandbox id, or the container itself
    /// (`ctr run`: every container is its own pod). Both are checked against
    /// containerd's id grammar: the id becomes a path and a kernel command-line word.
    pub fn sandbox_id(&self, container_id: &str) -> Result<String, BundleError> {
        crate::ids::validate("container id", container_id)?;
        match self.annotations.get(SANDBOX_ID_ANNOTATION) {
            Some(id) if !id.is_empty() => {
                crate::ids::validate(&format!("annotation {SANDBOX_ID_ANNOTATION}"), id)?;
                Ok(id.clone())
            }
            _ => Ok(container_id.to_string()),
        }
    }

    /// Whether this container creates the pod (and so the VM).
    pub fn is_sandbox(&self, container_id: &str) -> Result<bool, BundleError> {
        Ok(match self.annotations.get(CONTAINER_TYPE_ANNOTATION).map(String::as_str) {
            Some("sandbox") => true,
            Some(_) => false,
            None => self.sandbox_id(container_id)? == container_id,
        })
    }

    /// The network namespace CNI set up for the pod (where the VMM runs), if any.
    pub fn netns(&self) -> Option<PathBuf> {
        self.spec
            .pointer("/linux/namespaces")?
            .as_array()?
            .iter()
            .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))?
            .get("path")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    }

    pub fn hostname(&self) -> String {
        self.spec.get("hostname").and_then(Value::as_str).unwrap_or_default().chars().take(64).collect()
    }

    /// The spec the agent gets, and the host paths to share for it: host namespace
    /// paths dropped (the guest has its own); every bind mount of a host file or
    /// directory (CRI's /etc/hosts, resolv.conf, hostname and termination log; the
    /// pod's volumes) becomes a [`ShareMount`] named `<i>-<file name>`, which the shim
    /// bind-mounts under the container's share directory (seen by the guest as
    /// `guest_files`), and the spec's source points there. `/dev/shm` becomes a tmpfs
    /// in the guest. A bind mount of anything else (a device, a socket, a FIFO) or of
    /// a path that is not there fails, naming the mount; nothing is changed.
    pub fn guest_spec(&self, guest_files: &str) -> Result<(Vec<u8>, Vec<ShareMount>), BundleError> {
        let mut spec = self.spec.clone();
        let mut shares = Vec::new();
        let spec_path = || self.dir.join("config.json");
        if let Some(ns) = spec.pointer_mut("/linux/namespaces").and_then(Value::as_array_mut) {
            for n in ns.iter_mut() {
                if let Some(o) = n.as_object_mut() {
                    o.remove("path");
                }
            }
            // The guest is the pod: its network and the VM's are one.
            ns.retain(|n| n.get("type").and_then(Value::as_str) != Some("network"));
        }
        if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
            if mounts.len() > MAX_MOUNTS {
                return Err(BundleError::Invalid { path: spec_path(), message: format!("{} mounts; at most {MAX_MOUNTS}", mounts.len()) });
            }
            let mut kept = Vec::with_capacity(mounts.len());
            for (i, m) in mounts.drain(..).enumerate() {
                let options: Vec<String> = m
                    .get("options")
                    .and_then(Value::as_array)
                    .map(|o| o.iter().filter_map(Value::as_str).map(String::from).collect())
                    .unwrap_or_default();
                let is_bind = m.get("type").and_then(Value::as_str) == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind");
                if !is_bind {
                    kept.push(m);
                    continue;
                }
                let dest = m.get("destination").and_then(Value::as_str).unwrap_or_default().to_string();
                if dest == "/dev/shm" {
                    kept.push(json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}));
                    continue;
                }
                let source = PathBuf::from(m.get("source").and_then(Value::as_str).unwrap_or_default());
                let unshareable = |what: String| BundleError::Invalid {
                    path: spec_path(),
                    message: format!(
                        "bind mount {} -> {dest}: {what}; only files and directories can be shared with the VM",
                        source.display()
                    ),
                };
                // Where the mount's source leads: containerd and the kubelet bind what the link points at too.
                let meta = std::fs::metadata(&source).map_err(|e| unshareable(format!("cannot be read ({e})")))?;
                let kind = meta.file_type();
                use std::os::unix::fs::FileTypeExt;
                let dir = match () {
                    _ if kind.is_dir() => true,
                    _ if kind.is_file() => false,
                    _ if kind.is_block_device() => return Err(unshareable("a block device".into())),
                    _ if kind.is_char_device() => return Err(unshareable("a character device".into())),
                    _ if kind.is_socket() => return Err(unshareable("a socket".into())),
                    _ if kind.is_fifo() => return Err(unshareable("a FIFO".into())),
                    _ => return Err(unshareable("neither a file nor a directory".into())),
                };
                let file_name = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into());
                if dir && is_memory_empty_dir(&source) {
                    // In guest memory, as Kata does: the host's tmpfs stays unused.
                    let mut m = m;
                    m["source"] = json!(format!("{}/{}", vfvm_protocols::agent::GUEST_EPHEMERAL_DIR, ephemeral_name(&source)));
                    kept.push(m);
                    continue;
                }
                let name = format!("{i}-{file_name}");
                let mut m = m;
                m["source"] = json!(format!("{guest_files}/{name}"));
                kept.push(m);
                shares.push(ShareMount { source, name, read_only: options.iter().any(|o| o == "ro"), dir });
            }
            *mounts = kept;
        }
        let bytes = serde_json::to_vec(&spec).map_err(|e| BundleError::Invalid { path: spec_path(), message: e.to_string() })?;
        Ok((bytes, shares))
    }
}

/// The kubelet's emptyDir volumes live under this path component of a pod's directory.
const KUBELET_EMPTY_DIR: &str = "kubernetes.io~empty-dir";
/// `statfs(2)`'s `f_type` of a tmpfs.
const TMPFS_MAGIC: libc::__fsword_t = 0x0102_1994;

/// An emptyDir with `medium: Memory`: the kubelet's emptyDir path, on a tmpfs.
/// Secrets and projected tokens are on a tmpfs too, but elsewhere: they are shared.
fn is_memory_empty_dir(source: &Path) -> bool {
    if !source.components().any(|c| c.as_os_str() == KUBELET_EMPTY_DIR) {
        return false;
    }
    let Ok(path) = std::ffi::CString::new(source.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs(2) with a NUL-terminated path we own and a zeroed struct to fill.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::statfs(path.as_ptr(), &mut fs) == 0 && fs.f_type == TMPFS_MAGIC }
}

/// The guest's name for an in-memory volume: one path component, the same for every
/// container of the pod that mounts the same host directory.
fn ephemeral_name(source: &Path) -> String {
    // FNV-1a: a stable short id of the host path (not a secret, just unique per pod).
    let hash = source
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    let base: String = source
        .file_name()
        .map(|n| n.to_string_lossy().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).take(64).collect())
        .unwrap_or_default();
    format!("{hash:016x}-{}", base.trim_start_matches('.'))
}

/// The most mounts a spec may have (a pod's volumes and CRI's files are a few dozen).
pub const MAX_MOUNTS: usize = 256;

/// A host file or directory that a container's spec bind-mounts: the shim
/// bind-mounts it under the container's share directory as `name`, read-only there
/// too when the spec says `ro`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareMount {
    pub source: PathBuf,
    pub name: String,
    pub read_only: bool,
    pub dir: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(spec: Value) -> (Bundle, PathBuf) {
        // A directory of its own for each call: the tests run in parallel.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vfvm-bundle-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        (Bundle::load(&dir).unwrap(), dir)
    }

    #[test]
    fn cri_annotations_group_containers_into_their_pod() {
        let (b, _) = bundle(json!({"annotations": {SANDBOX_ID_ANNOTATION: "pod1", CONTAINER_TYPE_ANNOTATION: "container"}}));
        assert_eq!(b.sandbox_id("c1").unwrap(), "pod1");
        assert!(!b.is_sandbox("c1").unwrap());
        let (b, _) = bundle(json!({"annotations": {SANDBOX_ID_ANNOTATION: "pod1", CONTAINER_TYPE_ANNOTATION: "sandbox"}}));
        assert!(b.is_sandbox("pod1").unwrap());
        let (b, _) = bundle(json!({"process": {}}));
        assert!(b.is_sandbox("solo").unwrap() && b.sandbox_id("solo").unwrap() == "solo");
    }

    /// The sandbox id becomes `<state_dir>/<id>` (removed whole at teardown) and a
    /// word on the guest's kernel command line: a path or words there are refused.
    #[test]
    fn a_sandbox_id_that_is_a_path_or_words_is_refused() {
        for bad in ["../../tmp/victim", "pod init=/bin/sh", "a/b"] {
            let (b, _) = bundle(json!({"annotations": {SANDBOX_ID_ANNOTATION: bad, CONTAINER_TYPE_ANNOTATION: "sandbox"}}));
            let e = b.sandbox_id("c1").unwrap_err().to_string();
            assert!(e.contains(SANDBOX_ID_ANNOTATION) && e.contains(&format!("{bad:?}")), "{e}");
        }
        let (b, _) = bundle(json!({"process": {}}));
        assert!(b.sandbox_id("../c1").unwrap_err().to_string().starts_with("container id \"../c1\""));
    }

    #[test]
    fn the_guest_spec_drops_host_paths_and_shares_bound_files_and_directories() {
        let src = std::env::temp_dir().join(format!("vfvm-bundle-hosts-{}", std::process::id()));
        std::fs::write(&src, "127.0.0.1 localhost\n").unwrap();
        let volume = std::env::temp_dir().join(format!("vfvm-bundle-volume-{}", std::process::id()));
        std::fs::create_dir_all(&volume).unwrap();
        let (b, _) = bundle(json!({
            "hostname": "pod-a",
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": src.to_str().unwrap(), "options": ["rbind", "ro"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/sandboxes/x/shm", "options": ["rbind"]},
                {"destination": "/data", "source": volume.to_str().unwrap(), "options": ["rbind", "rprivate", "rw"]}
            ]
        }));
        assert_eq!(b.netns(), Some(PathBuf::from("/var/run/netns/cni-1")));
        assert_eq!(b.hostname(), "pod-a");
        let (bytes, shares) = b.guest_spec("/run/vfvm/shared/c1/files").unwrap();
        let spec: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(spec["linux"]["namespaces"], json!([{"type": "pid"}, {"type": "ipc"}]));
        let mounts = spec["mounts"].as_array().unwrap();
        assert_eq!(mounts.len(), 4, "{mounts:?}");
        let hosts = format!("1-{}", src.file_name().unwrap().to_str().unwrap());
        let data = format!("3-{}", volume.file_name().unwrap().to_str().unwrap());
        assert_eq!(mounts[1]["source"], json!(format!("/run/vfvm/shared/c1/files/{hosts}")));
        assert_eq!(mounts[1]["options"], json!(["rbind", "ro"]), "the agent binds with the spec's options");
        assert_eq!(mounts[2]["type"], json!("tmpfs"));
        assert_eq!(mounts[3]["source"], json!(format!("/run/vfvm/shared/c1/files/{data}")));
        assert_eq!(
            shares,
            [
                ShareMount { source: src.clone(), name: hosts, read_only: true, dir: false },
                ShareMount { source: volume.clone(), name: data, read_only: false, dir: true }
            ]
        );
        std::fs::remove_file(src).unwrap();
        std::fs::remove_dir(volume).unwrap();
    }

    /// An emptyDir with `medium: Memory` (the kubelet's emptyDir path on a tmpfs)
    /// becomes a tmpfs in the guest, one per host directory; a disk emptyDir and a
    /// secret (a tmpfs elsewhere) are shared.
    #[test]
    fn a_memory_empty_dir_becomes_guest_memory_and_secrets_are_shared() {
        let pod = std::env::temp_dir().join(format!("vfvm-bundle-pod-{}/volumes", std::process::id()));
        let (memory, disk, secret) = (
            pod.join("kubernetes.io~empty-dir/cache"),
            pod.join("kubernetes.io~empty-dir/scratch"),
            pod.join("kubernetes.io~secret/token"),
        );
        for d in [&memory, &disk, &secret] {
            std::fs::create_dir_all(d).unwrap();
        }
        for d in [&memory, &secret] {
            crate::sandbox::mount(Path::new("tmpfs"), d, Some("tmpfs"), 0, None).expect("a tmpfs (the shim's tests run as root)");
        }
        let bind = |source: &Path, dest: &str| json!({"destination": dest, "type": "bind", "source": source.to_str().unwrap(), "options": ["rbind"]});
        let (b, _) = bundle(
            json!({"mounts": [bind(&memory, "/cache"), bind(&disk, "/scratch"), bind(&secret, "/token"), bind(&memory, "/cache2")]}),
        );
        let (bytes, shares) = b.guest_spec("/g").unwrap();
        let spec: Value = serde_json::from_slice(&bytes).unwrap();
        let sources: Vec<&str> = spec["mounts"].as_array().unwrap().iter().map(|m| m["source"].as_str().unwrap()).collect();
        let ephemeral = format!("{}/{}", vfvm_protocols::agent::GUEST_EPHEMERAL_DIR, ephemeral_name(&memory));
        assert!(ephemeral.ends_with("-cache"), "{ephemeral}");
        assert_eq!(sources, [ephemeral.as_str(), "/g/1-scratch", "/g/2-token", ephemeral.as_str()]);
        assert_eq!(shares.iter().map(|s| s.source.clone()).collect::<Vec<_>>(), [disk.clone(), secret.clone()]);
        for d in [&memory, &secret] {
            crate::record::unmount(d).unwrap();
        }
        std::fs::remove_dir_all(pod.parent().unwrap()).unwrap();
    }

    /// A device, a socket or a missing path cannot be shared: the error names the mount.
    #[test]
    fn an_unshareable_bind_mount_is_named() {
        let socket = std::env::temp_dir().join(format!("vfvm-bundle-sock-{}", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        for (source, what) in
            [("/dev/null", "a character device"), (socket.to_str().unwrap(), "a socket"), ("/nonexistent-vfvm", "cannot be read")]
        {
            let (b, _) = bundle(json!({"mounts": [{"destination": "/x", "type": "bind", "source": source, "options": ["rbind"]}]}));
            let e = b.guest_spec("/g").unwrap_err().to_string();
            assert!(e.contains(&format!("bind mount {source} -> /x: {what}")) && e.contains("config.json"), "{e}");
        }
        let many: Vec<Value> = (0..=MAX_MOUNTS).map(|_| json!({"destination": "/proc", "type": "proc", "source": "proc"})).collect();
        let (b, _) = bundle(json!({ "mounts": many }));
        assert!(b.guest_spec("/g").unwrap_err().to_string().contains(&format!("at most {MAX_MOUNTS}")));
        std::fs::remove_file(socket).unwrap();
    }

    #[test]
    fn a_bad_spec_is_named() {
        let dir = std::env::temp_dir().join(format!("vfvm-bundle-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "[1]").unwrap();
        let err = Bundle::load(&dir).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("JSON object"), "{err}");
        std::fs::write(dir.join("config.json"), r#"{"annotations": {"a": 1}}"#).unwrap();
        let err = Bundle::load(&dir).unwrap_err().to_string();
        assert!(err.contains("\"a\"") && err.contains("string"), "{err}");
        let err = Bundle::load(&dir.join("missing")).unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains("reading the OCI spec"), "{err}");
    }
}
