//! What a pod asks for: the SR-IOV annotation, and the VFs the SR-IOV device plugin
//! allocated to a container (`PCIDEVICE_<RESOURCE>=<addr>[,<addr>...]` in its env).

use super::pci::PciAddress;
use super::VfError;

/// The pod annotation that turns VF passthrough on or off (Kata's name, kept so
/// existing pod specs work unchanged).
pub const ENABLE_SRIOV_ANNOTATION: &str = "io.katacontainers.config.runtime.enable_sriov";

/// Whether SR-IOV handling is on: the annotation if present (`"true"` or `"false"`,
/// nothing else), else the runtime config's default.
pub fn sriov_enabled<'a>(annotations: impl IntoIterator<Item = (&'a str, &'a str)>, default: bool) -> Result<bool, VfError> {
    match annotations.into_iter().find(|(k, _)| *k == ENABLE_SRIOV_ANNOTATION) {
        None => Ok(default),
        Some((_, "true")) => Ok(true),
        Some((_, "false")) => Ok(false),
        Some((key, value)) => {
            Err(VfError::InvalidAnnotation { key: key.to_string(), value: value.to_string(), expected: "\"true\" or \"false\"" })
        }
    }
}

/// VFs allocated under one device-plugin resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The env var's suffix, e.g. `INTEL_COM_SRIOV_NETDEVICE`.
    pub resource: String,
    pub addrs: Vec<PciAddress>,
}

const PREFIX: &str = "PCIDEVICE_";
/// The device plugin also sets `PCIDEVICE_<RESOURCE>_INFO` (JSON details): not addresses.
const INFO_SUFFIX: &str = "_INFO";
/// More than any NIC has VFs: a larger list is not an allocation but garbage.
const MAX_ADDRS_PER_RESOURCE: usize = 256;

/// The allocations in an OCI process env (`KEY=VALUE` strings). A device listed under
/// two resources is reported once, under the first.
pub fn allocations(env: &[String]) -> Result<Vec<Allocation>, VfError> {
    let mut out: Vec<Allocation> = Vec::new();
    for entry in env {
        let Some((key, value)) = entry.split_once('=') else { continue };
        let Some(resource) = key.strip_prefix(PREFIX) else { continue };
        if resource.ends_with(INFO_SUFFIX) {
            continue;
        }
        let bad = |reason: String| VfError::InvalidEnv { var: key.to_string(), value: value.to_string(), reason };
        if resource.is_empty() {
            return Err(bad("no resource name after PCIDEVICE_".into()));
        }
        let mut addrs = Vec::new();
        for part in value.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(bad("empty PCI address in the list".into()));
            }
            let addr: PciAddress = part.parse().map_err(|e: vfvm_protocols::PciAddressError| bad(e.to_string()))?;
            let seen = out.iter().any(|a| a.addrs.contains(&addr)) || addrs.contains(&addr);
            if !seen {
                addrs.push(addr);
            }
        }
        if addrs.len() > MAX_ADDRS_PER_RESOURCE {
            return Err(bad(format!("more than {MAX_ADDRS_PER_RESOURCE} addresses")));
        }
        out.push(Allocation { resource: resource.to_string(), addrs });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[&str]) -> Vec<String> {
        vars.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn annotation_true_false_default_and_garbage() {
        let a = |v: &'static str| vec![(ENABLE_SRIOV_ANNOTATION, v), ("other", "x")];
        assert!(sriov_enabled(a("true"), false).unwrap());
        assert!(!sriov_enabled(a("false"), true).unwrap());
        assert!(sriov_enabled(vec![("other", "x")], true).unwrap());
        assert!(!sriov_enabled(Vec::new(), false).unwrap());
        for bad in ["yes", "True", "1", "", " true"] {
            let err = sriov_enabled(a(bad), false).unwrap_err().to_string();
            assert!(err.contains(ENABLE_SRIOV_ANNOTATION) && err.contains("\"true\" or \"false\""), "{err}");
        }
    }

    #[test]
    fn several_resources_and_addresses() {
        let got = allocations(&env(&[
            "PATH=/bin",
            "PCIDEVICE_INTEL_COM_SRIOV_NETDEVICE=0000:01:10.0,0000:01:10.2",
            "PCIDEVICE_INTEL_COM_SRIOV_NETDEVICE_INFO={\"0000:01:10.0\":{}}",
            "PCIDEVICE_MELLANOX_COM_DPDK=0000:af:00.3",
        ]))
        .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].resource, "INTEL_COM_SRIOV_NETDEVICE");
        assert_eq!(got[0].addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["0000:01:10.0", "0000:01:10.2"]);
        assert_eq!(got[1].addrs[0].to_string(), "0000:af:00.3");
    }

    #[test]
    fn duplicates_are_reported_once() {
        let got = allocations(&env(&["PCIDEVICE_A=0000:01:10.0, 0000:01:10.0", "PCIDEVICE_B=0000:01:10.0,0000:01:10.4"])).unwrap();
        assert_eq!(got[0].addrs.len(), 1);
        assert_eq!(got[1].addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["0000:01:10.4"]);
    }

    #[test]
    fn malformed_values_name_the_variable() {
        for (var, says) in [
            ("PCIDEVICE_X=0000:01:10.0,", "empty PCI address"),
            ("PCIDEVICE_X=banana", "expected DDDD:BB:DD.F"),
            ("PCIDEVICE_X=0000:01:20.0", "device must be at most 1f"),
            ("PCIDEVICE_X=0000:01:10.8", "function must be at most 7"),
            ("PCIDEVICE_X=0000:1ff:10.0", "bus must be"),
            ("PCIDEVICE_=0000:01:10.0", "no resource name"),
        ] {
            let err = allocations(&env(&[var])).unwrap_err().to_string();
            let key = var.split('=').next().unwrap();
            assert!(err.contains(key) && err.contains(says), "{var}: {err}");
        }
    }
}
