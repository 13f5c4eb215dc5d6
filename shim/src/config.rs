//! The runtime configuration (`configs/vfvm.toml`) and the per-pod annotations that
//! may override parts of it, validated: a bad value is an error naming the key and
//! what was expected, never a silent default.

use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::vf::spec::sriov_enabled;

/// Pod annotations that size the VM (Kata's names, so existing pod specs work).
pub const VCPUS_ANNOTATION: &str = "io.katacontainers.config.hypervisor.default_vcpus";
pub const MEMORY_ANNOTATION: &str = "io.katacontainers.config.hypervisor.default_memory";
/// Where the shim looks when neither the runtime option nor $VFVM_CONFIG says.
pub const DEFAULT_PATH: &str = "/etc/vfvm/vfvm.toml";
/// Less than this cannot boot the guest image.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The VMM's MP table and our tests go this far.
pub const MAX_VCPUS_LIMIT: u32 = 32;
/// The largest console log bound the config may set (1 GiB).
pub const CONSOLE_LOG_MAX_KIB_LIMIT: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key} = {value}: {expected}")]
    Invalid { path: PathBuf, key: &'static str, value: String, expected: String },
    #[error("annotation {key}={value:?}: {expected}")]
    Annotation { key: String, value: String, expected: String },
    #[error("sandbox id {id:?}: {} is {what}, not a sandbox's state directory", path.display())]
    ReservedSandboxDir { id: String, path: PathBuf, what: &'static str },
}

/// [`Config::sandbox_dir`] for these directories (also where no config could be read).
pub fn sandbox_dir_in(state_dir: &Path, lock_dir: &Path, id: &str) -> Result<PathBuf, ConfigError> {
    let dir = state_dir.join(id);
    if lock_dir.starts_with(&dir) {
        return Err(ConfigError::ReservedSandboxDir { id: id.to_string(), path: dir, what: "the VF lock directory (sriov.lock_dir)" });
    }
    Ok(dir)
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub hypervisor: Hypervisor,
    pub agent: Agent,
    pub sriov: Sriov,
    pub shared_fs: SharedFs,
    pub runtime: Runtime,
}

/// How container root filesystems reach the guest: one `virtiofsd` per sandbox.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SharedFs {
    pub virtiofsd: PathBuf,
    /// virtiofsd's `--sandbox`: "namespace" (its own mount/pid namespaces, the
    /// default), "chroot", or "none".
    pub sandbox: VirtiofsdSandbox,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VirtiofsdSandbox {
    Namespace,
    Chroot,
    None,
}

impl VirtiofsdSandbox {
    pub fn as_arg(self) -> &'static str {
        match self {
            VirtiofsdSandbox::Namespace => "namespace",
            VirtiofsdSandbox::Chroot => "chroot",
            VirtiofsdSandbox::None => "none",
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Hypervisor {
    pub path: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    #[serde(default)]
    pub kernel_params: String,
    pub default_vcpus: u32,
    pub max_vcpus: u32,
    pub default_memory_mib: u32,
    pub max_memory_mib: u32,
    /// The guest console's log (`<sandbox>/console.log` and its rotated half
    /// `console.log.1`) holds at most this much: the guest decides what it prints.
    pub console_log_max_kib: u32,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub vsock_port: u32,
    /// 0: the agent keeps its logs on the console only.
    pub log_vsock_port: u32,
    pub dial_timeout_secs: u32,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Hotplug {
    Cold,
    Hot,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Sriov {
    pub enabled_by_default: bool,
    pub hotplug: Hotplug,
    pub device_wait_timeout_secs: u32,
    pub lock_dir: PathBuf,
    pub cni_cache_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    pub state_dir: PathBuf,
    pub shutdown_timeout_secs: u32,
}

/// What one pod gets: the config's defaults with the pod's annotations applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSettings {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub sriov: bool,
}

impl Config {
    /// Parses and validates the text of a config file (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string().trim().to_string() })?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, value: &dyn std::fmt::Display, expected: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            value: value.to_string(),
            expected,
        };
        let h = &self.hypervisor;
        if h.max_vcpus == 0 || h.max_vcpus > MAX_VCPUS_LIMIT {
            return Err(bad("hypervisor.max_vcpus", &h.max_vcpus, format!("expected 1 to {MAX_VCPUS_LIMIT}")));
        }
        if !(8..=CONSOLE_LOG_MAX_KIB_LIMIT).contains(&h.console_log_max_kib) {
            return Err(bad(
                "hypervisor.console_log_max_kib",
                &h.console_log_max_kib,
                format!("expected 8 to {CONSOLE_LOG_MAX_KIB_LIMIT}"),
            ));
        }
        if h.default_vcpus == 0 || h.default_vcpus > h.max_vcpus {
            return Err(bad("hypervisor.default_vcpus", &h.default_vcpus, format!("expected 1 to max_vcpus ({})", h.max_vcpus)));
        }
        if h.max_memory_mib < MIN_MEMORY_MIB {
            return Err(bad("hypervisor.max_memory_mib", &h.max_memory_mib, format!("expected at least {MIN_MEMORY_MIB}")));
        }
        if h.default_memory_mib < MIN_MEMORY_MIB || h.default_memory_mib > h.max_memory_mib {
            return Err(bad(
                "hypervisor.default_memory_mib",
                &h.default_memory_mib,
                format!("expected {MIN_MEMORY_MIB} to max_memory_mib ({})", h.max_memory_mib),
            ));
        }
        for (key, p) in [
            ("hypervisor.path", &h.path),
            ("hypervisor.kernel", &h.kernel),
            ("hypervisor.initrd", &h.initrd),
            ("shared_fs.virtiofsd", &self.shared_fs.virtiofsd),
        ] {
            if !p.is_absolute() {
                return Err(bad(key, &p.display(), "expected an absolute path".into()));
            }
        }
        if self.agent.vsock_port == 0 || self.agent.vsock_port == self.agent.log_vsock_port {
            return Err(bad("agent.vsock_port", &self.agent.vsock_port, "expected a non-zero port other than log_vsock_port".into()));
        }
        if self.agent.dial_timeout_secs == 0 {
            return Err(bad("agent.dial_timeout_secs", &0, "expected at least 1".into()));
        }
        for (key, p) in [
            ("sriov.lock_dir", &self.sriov.lock_dir),
            ("sriov.cni_cache_dir", &self.sriov.cni_cache_dir),
            ("runtime.state_dir", &self.runtime.state_dir),
        ] {
            if !p.is_absolute() {
                return Err(bad(key, &p.display(), "expected an absolute path".into()));
            }
        }
        Ok(())
    }

    /// Where sandbox `id` (a valid containerd id) keeps its journal and share:
    /// `<state_dir>/<id>`, unless that is, or holds, the VF lock directory (which the
    /// shipped config puts under `state_dir`): a sandbox's teardown removes its
    /// directory whole, and must never take every sandbox's VF locks with it.
    pub fn sandbox_dir(&self, id: &str) -> Result<PathBuf, ConfigError> {
        sandbox_dir_in(&self.runtime.state_dir, &self.sriov.lock_dir, id)
    }

    /// The pod's settings: defaults, overridden by its annotations within the limits.
    pub fn sandbox_settings(&self, annotations: &HashMap<String, String>) -> Result<SandboxSettings, ConfigError> {
        let number = |key: &str, min: u32, max: u32, default: u32| -> Result<u32, ConfigError> {
            let Some(value) = annotations.get(key) else { return Ok(default) };
            let bad = || ConfigError::Annotation {
                key: key.to_string(),
                value: value.clone(),
                expected: format!("a whole number from {min} to {max} (the runtime config's limit)"),
            };
            let n: u32 = value.trim().parse().map_err(|_| bad())?;
            if n < min || n > max {
                return Err(bad());
            }
            Ok(n)
        };
        let h = &self.hypervisor;
        Ok(SandboxSettings {
            vcpus: number(VCPUS_ANNOTATION, 1, h.max_vcpus, h.default_vcpus)?,
            memory_mib: number(MEMORY_ANNOTATION, MIN_MEMORY_MIB, h.max_memory_mib, h.default_memory_mib)?,
            sriov: sriov_enabled(annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())), self.sriov.enabled_by_default).map_err(
                |_| ConfigError::Annotation {
                    key: crate::vf::spec::ENABLE_SRIOV_ANNOTATION.into(),
                    value: annotations.get(crate::vf::spec::ENABLE_SRIOV_ANNOTATION).cloned().unwrap_or_default(),
                    expected: "\"true\" or \"false\"".into(),
                },
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../configs/vfvm.toml");

    fn shipped() -> Config {
        Config::parse(SHIPPED, Path::new("configs/vfvm.toml")).unwrap()
    }

    fn with(replace: &str, by: &str) -> Result<Config, ConfigError> {
        assert!(SHIPPED.contains(replace), "{replace}");
        Config::parse(&SHIPPED.replacen(replace, by, 1), Path::new("test.toml"))
    }

    /// The shipped config keeps the VF locks under the state directory: a sandbox
    /// named after them would remove every sandbox's locks at its teardown.
    #[test]
    fn a_sandbox_never_gets_the_vf_lock_directory_as_its_state() {
        let c = shipped();
        assert_eq!(c.sandbox_dir("pod1").unwrap(), c.runtime.state_dir.join("pod1"));
        let e = c.sandbox_dir("vf-locks").unwrap_err().to_string();
        assert!(e.contains("\"vf-locks\"") && e.contains("VF lock directory"), "{e}");
    }

    #[test]
    fn the_shipped_config_parses_and_validates() {
        let c = shipped();
        assert_eq!((c.hypervisor.default_vcpus, c.hypervisor.default_memory_mib), (1, 512));
        assert_eq!(c.agent.vsock_port, 1024);
        assert_eq!(c.sriov.hotplug, Hotplug::Cold);
        assert!(!c.sriov.enabled_by_default);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (from, to, key) in [
            ("default_vcpus = 1", "default_vcpus = 0", "hypervisor.default_vcpus"),
            ("default_vcpus = 1", "default_vcpus = 9", "hypervisor.default_vcpus"),
            ("max_vcpus = 8", "max_vcpus = 64", "hypervisor.max_vcpus"),
            ("console_log_max_kib = 1024", "console_log_max_kib = 4", "hypervisor.console_log_max_kib"),
            ("console_log_max_kib = 1024", "console_log_max_kib = 2000000", "hypervisor.console_log_max_kib"),
            ("default_memory_mib = 512", "default_memory_mib = 32", "hypervisor.default_memory_mib"),
            ("kernel = \"/usr/share/vfvm/vmlinux\"", "kernel = \"vmlinux\"", "hypervisor.kernel"),
            ("vsock_port = 1024", "vsock_port = 1025", "agent.vsock_port"),
        ] {
            let err = with(from, to).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("test.toml"), "{to}: {err}");
        }
        assert_eq!(with("hotplug = \"cold\"", "hotplug = \"hot\"").unwrap().sriov.hotplug, Hotplug::Hot);
        let err = with("hotplug = \"cold\"", "hotplug = \"warm\"").unwrap_err().to_string();
        assert!(err.contains("warm") && err.contains("cold"), "{err}");
        let err = with("dial_timeout_secs = 30", "dial_timeout = 30").unwrap_err().to_string();
        assert!(err.contains("unknown field") && err.contains("dial_timeout"), "{err}");
        let err = with("default_vcpus = 1", "default_vcpus = \"one\"").unwrap_err().to_string();
        assert!(err.contains("default_vcpus"), "{err}");
    }

    #[test]
    fn annotations_override_within_the_limits() {
        let c = shipped();
        let a = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
        assert_eq!(c.sandbox_settings(&a(&[])).unwrap(), SandboxSettings { vcpus: 1, memory_mib: 512, sriov: false });
        let s = c
            .sandbox_settings(&a(&[
                (VCPUS_ANNOTATION, "4"),
                (MEMORY_ANNOTATION, "2048"),
                ("io.katacontainers.config.runtime.enable_sriov", "true"),
            ]))
            .unwrap();
        assert_eq!(s, SandboxSettings { vcpus: 4, memory_mib: 2048, sriov: true });
        for (k, v) in [
            (VCPUS_ANNOTATION, "9"),
            (VCPUS_ANNOTATION, "0"),
            (VCPUS_ANNOTATION, "two"),
            (MEMORY_ANNOTATION, "16385"),
            (MEMORY_ANNOTATION, "-1"),
            ("io.katacontainers.config.runtime.enable_sriov", "yes"),
        ] {
            let err = c.sandbox_settings(&a(&[(k, v)])).unwrap_err().to_string();
            assert!(err.contains(k) && err.contains(&format!("{v:?}")), "{k}={v}: {err}");
            assert_eq!(err.matches(k).count(), 1, "the annotation is named once: {err}");
        }
    }

    /// The containerd snippets are TOML containerd can read, registering both handlers.
    #[test]
    fn the_containerd_snippets_register_kata_and_rune() {
        for (text, plugin, version) in [
            (include_str!("../../configs/containerd/config-v2.toml"), "io.containerd.grpc.v1.cri", 2),
            (include_str!("../../configs/containerd/config-v3.toml"), "io.containerd.cri.v1.runtime", 3),
        ] {
            let doc: toml::Table = toml::from_str(text).unwrap();
            assert_eq!(doc["version"].as_integer(), Some(version));
            for handler in ["kata", "rune"] {
                let rt = &doc["plugins"][plugin]["containerd"]["runtimes"][handler];
                assert_eq!(rt["runtime_type"].as_str(), Some("io.containerd.vfvm.v2"), "{plugin} {handler}");
                assert_eq!(rt["pod_annotations"].as_array().unwrap()[0].as_str(), Some("io.katacontainers.*"));
                assert_eq!(rt["options"]["ConfigPath"].as_str(), Some(DEFAULT_PATH));
            }
        }
    }
}
