//! The pod's VM sized from the pod's resources. containerd (1.6.20 and 2.x alike)
//! puts the pod's totals, as the kubelet computed them from its containers' limits,
//! on the sandbox container as annotations; the VM gets the base (what the agent and
//! the guest kernel need) plus those totals, so containers never find less room in
//! the VM than the kubelet granted them.

use std::collections::HashMap;

use crate::config::ConfigError;

/// containerd's names (its `internal/cri/annotations`): the pod's CPU limit as a
/// CFS quota and period (µs), and its memory limit in bytes. 0 or absent: no limit.
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

const MIB: u64 = 1 << 20;

/// What the pod's containers may use together, by their limits, as a VM needs it:
/// whole vCPUs and MiB, rounded up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodResources {
    pub cpus: u64,
    pub memory_mib: u64,
}

impl PodResources {
    /// From containerd's sandbox annotations; None when it passed none (a client
    /// that gives no pod resources, or a containerd that predates them).
    pub fn from_annotations(annotations: &HashMap<String, String>) -> Result<Option<PodResources>, ConfigError> {
        let number = |key: &str| -> Result<Option<i64>, ConfigError> {
            let Some(value) = annotations.get(key) else { return Ok(None) };
            value.trim().parse::<i64>().map(Some).map_err(|_| ConfigError::Annotation {
                key: key.to_string(),
                value: value.clone(),
                expected: "a whole number (containerd writes the pod's limits there)".into(),
            })
        };
        let (quota, period, memory) = (number(SANDBOX_CPU_QUOTA)?, number(SANDBOX_CPU_PERIOD)?, number(SANDBOX_MEMORY)?);
        if quota.is_none() && period.is_none() && memory.is_none() {
            return Ok(None);
        }
        // A quota without a period (or either ≤ 0) is no CPU limit: the kubelet
        // writes 0 for containers without one.
        let positive = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0);
        let cpus = match (positive(quota), positive(period)) {
            (Some(q), Some(p)) => q.div_ceil(p),
            _ => 0,
        };
        let memory_mib = positive(memory).map_or(0, |m| m.div_ceil(MIB));
        Ok(Some(PodResources { cpus, memory_mib }))
    }

    /// The annotations as they came, for messages.
    pub fn describe(annotations: &HashMap<String, String>) -> String {
        [SANDBOX_CPU_QUOTA, SANDBOX_CPU_PERIOD, SANDBOX_MEMORY]
            .iter()
            .filter_map(|k| annotations.get(*k).map(|v| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn containerds_totals_round_up_to_whole_vcpus_and_mib() {
        assert_eq!(PodResources::from_annotations(&a(&[])).unwrap(), None);
        for (quota, period, memory, want) in [
            ("200000", "100000", "1342177280", PodResources { cpus: 2, memory_mib: 1280 }),
            // 1.5 CPUs need 2 vCPUs; a byte over a MiB needs another MiB.
            ("150000", "100000", "1048577", PodResources { cpus: 2, memory_mib: 2 }),
        ] {
            let r =
                PodResources::from_annotations(&a(&[(SANDBOX_CPU_QUOTA, quota), (SANDBOX_CPU_PERIOD, period), (SANDBOX_MEMORY, memory)]));
            assert_eq!(r.unwrap(), Some(want), "{quota}/{period}, {memory}");
        }
        // What the kubelet writes for a pod without limits.
        let r =
            PodResources::from_annotations(&a(&[(SANDBOX_CPU_QUOTA, "0"), (SANDBOX_CPU_PERIOD, "100000"), (SANDBOX_MEMORY, "0")])).unwrap();
        assert_eq!(r, Some(PodResources::default()));
        let r = PodResources::from_annotations(&a(&[(SANDBOX_CPU_QUOTA, "-1"), (SANDBOX_CPU_PERIOD, "0")])).unwrap();
        assert_eq!(r, Some(PodResources::default()));
        // The largest numbers do not overflow.
        let r = PodResources::from_annotations(&a(&[
            (SANDBOX_CPU_QUOTA, &i64::MAX.to_string()),
            (SANDBOX_CPU_PERIOD, "1"),
            (SANDBOX_MEMORY, &i64::MAX.to_string()),
        ]))
        .unwrap()
        .unwrap();
        let max = u64::try_from(i64::MAX).unwrap();
        assert_eq!((r.cpus, r.memory_mib), (max, max.div_ceil(MIB)));
    }

    #[test]
    fn a_value_that_is_no_number_is_named() {
        for (k, v) in [(SANDBOX_MEMORY, "1Gi"), (SANDBOX_CPU_QUOTA, "2.5"), (SANDBOX_CPU_PERIOD, "")] {
            let err = PodResources::from_annotations(&a(&[(k, v)])).unwrap_err().to_string();
            assert!(err.contains(k) && err.contains(&format!("{v:?}")), "{err}");
        }
    }
}
