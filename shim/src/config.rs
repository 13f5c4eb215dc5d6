//! The runtime configuration (`configs/vfvm.toml`) and the per-pod annotations that
//! may override parts of it, validated: a bad value is an error naming the key and
//! what was expected, never a silent default.

use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::sizing::PodResources;
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
    #[error(
        "the pod needs a VM of {vcpus} vCPUs and {memory_mib} MiB ({base_vcpus} vCPU and {base_memory_mib} MiB of base, \
         plus {pod_cpus} CPU and {pod_memory_mib} MiB for its containers' limits: {resources}); the runtime config allows \
         at most {max_vcpus} vCPUs and {max_memory_mib} MiB (hypervisor.max_vcpus, hypervisor.max_memory_mib)"
    )]
    PodTooLarge {
        vcpus: u64,
        memory_mib: u64,
        base_vcpus: u32,
        base_memory_mib: u32,
        pod_cpus: u64,
        pod_memory_mib: u64,
        resources: String,
        max_vcpus: u32,
        max_memory_mib: u32,
    },
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
    #[serde(default)]
    pub network: Network,
}

/// The pod's own interfaces (veth, macvlan, ipvlan), each a virtio-net device on a
/// tap joined to it by tc redirects.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(default)]
    pub datapath: Datapath,
}

pub use vfvm_protocols::net::Datapath;

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

/// What one pod gets: the base (the config's defaults, or the pod's Kata
/// annotations) plus the pod's resources, within the config's maximums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSettings {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The pod's own share of the above, when containerd passed its resources.
    pub pod_resources: Option<PodResources>,
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

    /// The pod's settings: the base (defaults, overridden by its Kata annotations
    /// within the limits, as Kata has it) plus the pod's resources from containerd's
    /// sandbox annotations; more than the maximums is an error naming the figures.
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
        let base_vcpus = number(VCPUS_ANNOTATION, 1, h.max_vcpus, h.default_vcpus)?;
        let base_memory_mib = number(MEMORY_ANNOTATION, MIN_MEMORY_MIB, h.max_memory_mib, h.default_memory_mib)?;
        let pod_resources = PodResources::from_annotations(annotations)?;
        let pod = pod_resources.unwrap_or_default();
        let vcpus = u64::from(base_vcpus).saturating_add(pod.cpus);
        let memory_mib = u64::from(base_memory_mib).saturating_add(pod.memory_mib);
        if vcpus > u64::from(h.max_vcpus) || memory_mib > u64::from(h.max_memory_mib) {
            return Err(ConfigError::PodTooLarge {
                vcpus,
                memory_mib,
                base_vcpus,
                base_memory_mib,
                pod_cpus: pod.cpus,
                pod_memory_mib: pod.memory_mib,
                resources: PodResources::describe(annotations),
                max_vcpus: h.max_vcpus,
                max_memory_mib: h.max_memory_mib,
            });
        }
        Ok(SandboxSettings {
            // Within the maximums, both u32, just above.
            vcpus: u32::try_from(vcpus).unwrap_or(h.max_vcpus),
            memory_mib: u32::try_from(memory_mib).unwrap_or(h.max_memory_mib),
            pod_resources,
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
        assert_eq!(c.sandbox_settings(&a(&[])).unwrap(), SandboxSettings { vcpus: 1, memory_mib: 512, pod_resources: None, sriov: false });
        let s = c
            .sandbox_settings(&a(&[
                (VCPUS_ANNOTATION, "4"),
                (MEMORY_ANNOTATION, "2048"),
                ("io.katacontainers.config.runtime.enable_sriov", "true"),
            ]))
            .unwrap();
        assert_eq!(s, SandboxSettings { vcpus: 4, memory_mib: 2048, pod_resources: None, sriov: true });
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

    /// A pod of two containers limited to 1 CPU + 768 MiB and 1 CPU + 512 MiB gets
    /// the base plus 2 vCPUs and 1280 MiB; Kata's annotations set the base.
    #[test]
    fn the_vm_is_the_base_plus_the_pods_resources() {
        use crate::sizing::{SANDBOX_CPU_PERIOD, SANDBOX_CPU_QUOTA, SANDBOX_MEMORY};
        let c = shipped();
        let a = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
        let pod = [(SANDBOX_CPU_QUOTA, "200000"), (SANDBOX_CPU_PERIOD, "100000"), (SANDBOX_MEMORY, "1342177280")];
        let s = c.sandbox_settings(&a(&pod)).unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (1 + 2, 512 + 1280));
        assert_eq!(s.pod_resources, Some(PodResources { cpus: 2, memory_mib: 1280 }));
        let mut with_base = pod.to_vec();
        with_base.extend([(VCPUS_ANNOTATION, "2"), (MEMORY_ANNOTATION, "256")]);
        let s = c.sandbox_settings(&a(&with_base)).unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (2 + 2, 256 + 1280));
        // Up to the maximums exactly, and not a vCPU or MiB more.
        let at_max =
            [(SANDBOX_CPU_QUOTA, "700000"), (SANDBOX_CPU_PERIOD, "100000"), (SANDBOX_MEMORY, &format!("{}", (16384u64 - 512) << 20))];
        let s = c.sandbox_settings(&a(&at_max)).unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (8, 16384));
        for (key, value, figures) in [
            (SANDBOX_CPU_QUOTA, "800000", "9 vCPUs and 16384 MiB"),
            (SANDBOX_MEMORY, &format!("{}", ((16384u64 - 512) << 20) + 1), "8 vCPUs and 16385 MiB"),
            (SANDBOX_MEMORY, &i64::MAX.to_string(), "8 vCPUs and 8796093022720 MiB"),
        ] {
            let mut over = at_max.to_vec();
            over.retain(|(k, _)| *k != key);
            over.push((key, value));
            let err = c.sandbox_settings(&a(&over)).unwrap_err().to_string();
            assert!(
                err.contains(figures) && err.contains("at most 8 vCPUs and 16384 MiB") && err.contains(&format!("{key}={value}")),
                "{err}"
            );
        }
        let err = c.sandbox_settings(&a(&[(SANDBOX_MEMORY, "lots")])).unwrap_err().to_string();
        assert!(err.contains(SANDBOX_MEMORY) && err.contains("\"lots\""), "{err}");
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
