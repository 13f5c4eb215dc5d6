//! vhost-net: the kernel moves frames between a queue pair's rings and its tap queue
//! file, woken by the queues' ioeventfds and raising their irqfds directly, so no VMM
//! thread is on the datapath. One `/dev/vhost-net` instance per queue pair; closing it
//! (dropping [`VhostPair`]) stops the kernel's worker.

use std::sync::Arc;

use vhost::vhost_kern::net::Net as VhostNet;
use vhost::{net::VhostNet as _, VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{Tap, F_MRG_RXBUF};
use crate::virtio::{ActiveQueue, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const DEV_VHOST_NET: &str = "/dev/vhost-net";

/// Features the kernel backend needs to know of (the offloads are the tap's).
const VHOST_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC | F_MRG_RXBUF;

pub(super) struct VhostPair {
    net: VhostNet<Arc<GuestMemoryMmap>>,
    tap: Arc<Tap>,
}

impl Drop for VhostPair {
    fn drop(&mut self) {
        // Detach the tap first so the kernel worker stops touching guest memory
        // before the rings go; closing the fd then frees the instance.
        for i in 0..2 {
            if let Err(e) = self.net.set_backend(i, None) {
                tracing::warn!(tap = self.tap.name(), "vhost-net: detaching queue {i}: {e}");
            }
        }
    }
}

/// Whether `/dev/vhost-net` is there to try.
pub(super) fn available() -> bool {
    std::path::Path::new(DEV_VHOST_NET).exists()
}

/// Starts one vhost-net instance per pair; on any failure, none stays.
pub(super) fn start(
    memory: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    acked: u64,
    pairs: &[(ActiveQueue, ActiveQueue)],
    taps: &[Arc<Tap>],
) -> Result<Vec<VhostPair>, String> {
    let mem = Arc::new(memory.clone());
    let regions: Vec<VhostUserMemoryRegionInfo> = memory
        .iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            ..Default::default()
        })
        .collect();
    let mut started = Vec::with_capacity(pairs.len());
    for (i, ((rx, tx), tap)) in pairs.iter().zip(taps).enumerate() {
        let net = VhostNet::new(mem.clone()).map_err(|e| format!("{DEV_VHOST_NET}: {e}"))?;
        let step = |what: &str, r: vhost::Result<()>| r.map_err(|e| format!("pair {i}: {what}: {e}"));
        step("SET_OWNER", net.set_owner())?;
        let offered = net.get_features().map_err(|e| format!("pair {i}: GET_FEATURES: {e}"))?;
        let features = acked & VHOST_FEATURES;
        if features & !offered != 0 {
            return Err(format!("the kernel's vhost-net lacks features {:#x}", features & !offered));
        }
        step("SET_FEATURES", net.set_features(features))?;
        step("SET_MEM_TABLE", net.set_mem_table(&regions).map(|_| ()))?;
        let pair = VhostPair { net, tap: tap.clone() };
        for (vring, q) in [(0usize, rx), (1, tx)] {
            let size = q.queue.size();
            let ring = VringConfigData {
                queue_max_size: q.queue.max_size(),
                queue_size: size,
                flags: 0,
                desc_table_addr: q.queue.desc_table(),
                avail_ring_addr: q.queue.avail_ring(),
                used_ring_addr: q.queue.used_ring(),
                log_addr: None,
            };
            let step = |what: &str, r: vhost::Result<()>| r.map_err(|e| format!("pair {i} queue {}: {what}: {e}", q.index));
            step("SET_VRING_NUM", pair.net.set_vring_num(vring, size))?;
            step("SET_VRING_ADDR", pair.net.set_vring_addr(vring, &ring))?;
            step("SET_VRING_BASE", pair.net.set_vring_base(vring, q.queue.next_avail()))?;
            let call = interrupt.queue_notifier(q.index).ok_or_else(|| format!("queue {} has no interrupt vector of its own", q.index))?;
            step("SET_VRING_CALL", pair.net.set_vring_call(vring, &call))?;
            step("SET_VRING_KICK", pair.net.set_vring_kick(vring, &q.kick))?;
        }
        for vring in 0..2 {
            step("SET_BACKEND", pair.net.set_backend(vring, Some(pair.tap.file())))?;
        }
        started.push(pair);
    }
    Ok(started)
}
