//! What the guest VM has, as its kernel sees it: memory, CPUs, and how much of them
//! is in use. The VM's size is the pod's (the shim sizes it from the pod's
//! resources), so these are the pod's ceilings.

/// The guest's memory, from /proc/meminfo (0 where unknown).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// Parses /proc/meminfo's text (values in KiB).
pub fn parse_meminfo(text: &str) -> Memory {
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |k| k.saturating_mul(1024))
    };
    Memory { total_bytes: kib("MemTotal"), available_bytes: kib("MemAvailable") }
}

pub fn memory() -> Memory {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
}

/// CPU time the guest spent busy on all its CPUs (the first line of /proc/stat,
/// less idle and iowait), in ns.
pub fn parse_cpu_busy_nanos(stat: &str, ticks_per_second: u64) -> u64 {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0 };
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal (guest time is within user).
    let busy: u64 = ticks.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4 && *i < 8).map(|(_, t)| *t).sum();
    if ticks_per_second == 0 {
        return 0;
    }
    busy.saturating_mul(1_000_000_000 / ticks_per_second)
}

pub fn cpu_busy_nanos() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    parse_cpu_busy_nanos(&std::fs::read_to_string("/proc/stat").unwrap_or_default(), u64::try_from(hz).unwrap_or(0))
}

/// The guest's online CPUs (the VM's vCPUs).
pub fn cpus() -> u32 {
    // SAFETY: sysconf only reads a configuration value.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_stat_read_as_the_kernel_writes_them() {
        let meminfo =
            "MemTotal:        1791612 kB\nMemFree:         1650000 kB\nMemAvailable:    1700000 kB\nBuffers:               0 kB\n";
        assert_eq!(parse_meminfo(meminfo), Memory { total_bytes: 1_791_612 * 1024, available_bytes: 1_700_000 * 1024 });
        assert_eq!(parse_meminfo("garbage\nMemTotal: lots kB\n"), Memory::default());
        let stat = "cpu  100 5 20 9000 7 1 2 3 0 0\ncpu0 50 2 10 4500 3 0 1 1 0 0\nintr 1\n";
        assert_eq!(parse_cpu_busy_nanos(stat, 100), (100 + 5 + 20 + 1 + 2 + 3) * 10_000_000);
        assert_eq!(parse_cpu_busy_nanos("intr 1\n", 100), 0);
        assert_eq!(parse_cpu_busy_nanos(stat, 0), 0);
    }
}
