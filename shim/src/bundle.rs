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

    /// The spec the agent gets: host namespace paths dropped (the guest has its
    /// own), and bind mounts of host files (CRI's /etc/hosts, resolv.conf,
    /// hostname, termination log) copied into `host_files` (shared with the guest
    /// as `guest_files`) and pointed there. Bind mounts of host directories cannot
    /// follow the container into a VM yet: `/dev/shm` becomes a tmpfs, the others
    /// are left out and listed in the returned warnings.
    pub fn guest_spec(&self, host_files: &Path, guest_files: &str) -> Result<(Vec<u8>, Vec<String>), BundleError> {
        let mut spec = self.spec.clone();
        let mut warnings = Vec::new();
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
            let mut kept = Vec::with_capacity(mounts.len());
            for (i, m) in mounts.drain(..).enumerate() {
                let is_bind = m.get("type").and_then(Value::as_str) == Some("bind")
                    || m.get("options")
                        .and_then(Value::as_array)
                        .is_some_and(|o| o.iter().any(|x| x.as_str() == Some("bind") || x.as_str() == Some("rbind")));
                if !is_bind {
                    kept.push(m);
                    continue;
                }
                let dest = m.get("destination").and_then(Value::as_str).unwrap_or_default().to_string();
                let source = PathBuf::from(m.get("source").and_then(Value::as_str).unwrap_or_default());
                match std::fs::metadata(&source) {
                    Ok(meta) if meta.is_file() => {
                        std::fs::create_dir_all(host_files).map_err(|e| BundleError::Io { path: host_files.to_path_buf(), what: "creating", source: e })?;
                        let name = format!("{i}-{}", source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
                        let copy = host_files.join(&name);
                        std::fs::copy(&source, &copy).map_err(|e| BundleError::Io { path: source.clone(), what: "copying a bind-mounted file for the guest", source: e })?;
                        let mut m = m;
                        m["source"] = json!(format!("{guest_files}/{name}"));
                        kept.push(m);
                    }
                    _ if dest == "/dev/shm" => kept.push(json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})),
                    _ => warnings.push(format!("bind mount {} -> {dest} left out: host directories are not shared with the VM yet", source.display())),
                }
            }
            *mounts = kept;
        }
        let bytes =
            serde_json::to_vec(&spec).map_err(|e| BundleError::Invalid { path: self.dir.join("config.json"), message: e.to_string() })?;
        Ok((bytes, warnings))
    }
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
    fn the_guest_spec_drops_host_paths_and_carries_bound_files() {
        let src = std::env::temp_dir().join(format!("vfvm-bundle-hosts-{}", std::process::id()));
        std::fs::write(&src, "127.0.0.1 localhost\n").unwrap();
        let (b, dir) = bundle(json!({
            "hostname": "pod-a",
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": src.to_str().unwrap(), "options": ["rbind", "ro"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/sandboxes/x/shm", "options": ["rbind"]},
                {"destination": "/data", "type": "bind", "source": "/", "options": ["rbind"]}
            ]
        }));
        assert_eq!(b.netns(), Some(PathBuf::from("/var/run/netns/cni-1")));
        assert_eq!(b.hostname(), "pod-a");
        let files = dir.join("files");
        let (bytes, warnings) = b.guest_spec(&files, "/run/vfvm/shared/c1/files").unwrap();
        let spec: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(spec["linux"]["namespaces"], json!([{"type": "pid"}, {"type": "ipc"}]));
        let mounts = spec["mounts"].as_array().unwrap();
        assert_eq!(mounts.len(), 3, "{mounts:?}");
        assert_eq!(mounts[1]["source"], json!("/run/vfvm/shared/c1/files/1-".to_string() + src.file_name().unwrap().to_str().unwrap()));
        assert_eq!(
            std::fs::read_to_string(files.join(format!("1-{}", src.file_name().unwrap().to_str().unwrap()))).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(mounts[2]["type"], json!("tmpfs"));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("/data"), "{warnings:?}");
        std::fs::remove_file(src).unwrap();
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
