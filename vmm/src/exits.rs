//! The VM exits the VMM handles, counted: by reason here, by device range on the
//! buses ([`crate::bus::Bus::access_counts`]). The control API's status reports both,
//! so a guest that costs exits shows where.

use std::sync::atomic::{AtomicU64, Ordering};

use vfvm_protocols::vmm_api::ExitStats;

use crate::bus::Bus;

/// Why a vCPU came back from KVM_RUN to the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    /// KVM_RUN returned EINTR or EAGAIN: a kick, or another signal.
    Interrupted,
    Other,
}

impl ExitReason {
    const ALL: [ExitReason; 7] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Hlt,
        ExitReason::Interrupted,
        ExitReason::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitReason::IoIn => "io_in",
            ExitReason::IoOut => "io_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::Hlt => "hlt",
            ExitReason::Interrupted => "interrupted",
            ExitReason::Other => "other",
        }
    }
}

/// Per-reason counters, shared by every vCPU of a VM.
#[derive(Default, Debug)]
pub struct ExitCounters {
    counts: [AtomicU64; ExitReason::ALL.len()],
}

impl ExitCounters {
    pub fn count(&self, reason: ExitReason) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// What the control API reports: the reasons seen, and the port-I/O and MMIO
    /// accesses by range, most first.
    pub fn stats(&self, buses: &[&Bus]) -> ExitStats {
        let reasons = ExitReason::ALL
            .iter()
            .map(|&r| (r.name().to_string(), self.counts[r as usize].load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect();
        let mut ranges: Vec<_> = buses.iter().flat_map(|bus| bus.access_counts()).collect();
        ranges.sort_by(|a, b| b.exits.cmp(&a.exits).then(a.space.cmp(&b.space)).then(a.base.cmp(&b.base)));
        ExitStats { reasons, ranges }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vfvm_protocols::vmm_api::AddressSpace;

    struct Nothing;
    impl crate::bus::BusDevice for Nothing {
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) -> crate::bus::BusAction {
            crate::bus::BusAction::None
        }
    }

    #[test]
    fn stats_name_the_reasons_seen_and_rank_the_ranges() {
        let counters = ExitCounters::default();
        for _ in 0..3 {
            counters.count(ExitReason::IoOut);
        }
        counters.count(ExitReason::MmioRead);
        let (pio, mmio) = (Bus::new(AddressSpace::Pio), Bus::new(AddressSpace::Mmio));
        pio.insert(0xcf8, 8, "PCI config (CF8/CFC)", Arc::new(Mutex::new(Nothing))).unwrap();
        mmio.insert(0xe000_0000, 1 << 20, "PCI config (ECAM)", Arc::new(Mutex::new(Nothing))).unwrap();
        for _ in 0..3 {
            pio.write(0xcf8, &[0; 4]);
        }
        mmio.read(0xe000_0000, &mut [0; 4]);
        let stats = counters.stats(&[&pio, &mmio]);
        assert_eq!(stats.total(), 4);
        assert_eq!(stats.reasons.keys().collect::<Vec<_>>(), ["io_out", "mmio_read"]);
        let ranked: Vec<_> = stats.ranges.iter().map(|r| (r.device.as_str(), r.exits)).collect();
        assert_eq!(ranked, [("PCI config (CF8/CFC)", 3), ("PCI config (ECAM)", 1)]);
    }
}
