//! virtio-net (virtio 1.2, 5.1) over a tap the VMM is handed: the pod's eth0.
//!
//! - One rx/tx queue pair per tap queue file (the tap is `IFF_MULTI_QUEUE`; the shim
//!   opens one file per vCPU), plus a control queue when there is more than one pair
//!   (VIRTIO_NET_F_MQ needs it; the driver picks how many pairs to use there).
//! - Frames keep their virtio-net header end to end: the tap carries the same 12-byte
//!   header ([`HEADER_LEN`]), so checksum offload and TSO/GSO pass both ways without
//!   the VMM touching a frame. The guest's offload acks become the tap's
//!   `TUNSETOFFLOAD` flags (what the kernel may hand the guest unsegmented).
//! - The datapath is vhost-net (the kernel moves frames between the rings and the tap,
//!   no VMM thread on the path) when `/dev/vhost-net` can be opened, else the VMM's own
//!   worker per queue pair ([`userspace`]). [`Datapath`] can force either.
//! - Guest-controlled sizes are bounded: a tx chain over [`MAX_FRAME`] bytes, or with a
//!   device-writable buffer, is dropped (and logged, rate limited); an rx frame the
//!   guest has no room for waits in the tap's queue, whose length the kernel bounds.

mod ctrl;
mod tap;
#[cfg(test)]
mod tests;
mod userspace;
mod vhost;

use std::sync::Arc;

use tracing::{debug, error, info, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
pub use vfvm_protocols::net::Datapath;

use super::{
    queues_by_index, ActivateError, ActiveQueue, DeviceWorker, VirtioDevice, VirtioInterrupt, DEVICE_TYPE_NET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::bus::read_registers;

// Feature bits (virtio 1.2, 5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_MQ: u64 = 1 << 22;

/// The virtio-net header with VERSION_1 (`virtio_net_hdr_v1`, num_buffers included).
pub const HEADER_LEN: usize = 12;
/// The largest frame a queue carries: a 64 KiB GSO frame, its Ethernet and VLAN
/// headers, and the virtio-net header.
pub const MAX_FRAME: usize = HEADER_LEN + 65_535 + 14 + 4;
/// Size of each rx and tx queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the control queue.
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// The most queue pairs (the tap's queue files) one device takes.
pub const MAX_QUEUE_PAIRS: usize = 16;
/// VIRTIO_NET_S_LINK_UP.
const STATUS_LINK_UP: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0} tap queues: a device takes 1 to {MAX_QUEUE_PAIRS}")]
    QueueCount(usize),
    #[error("the tap queues belong to different taps ({0} and {1})")]
    MixedTaps(String, String),
    #[error("MTU {0}: expected 68 to 65535")]
    Mtu(u16),
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// What runs the queues while the device is active.
enum Running {
    Userspace(Vec<DeviceWorker>),
    Vhost(Vec<vhost::VhostPair>),
}

/// The virtio-net device.
pub struct Net {
    taps: Vec<Arc<Tap>>,
    mac: [u8; 6],
    mtu: Option<u16>,
    datapath: Datapath,
    queue_sizes: Vec<u16>,
    running: Option<Running>,
    /// The control queue's worker (several pairs only), in either datapath.
    ctrl: Option<DeviceWorker>,
    /// The datapath the last activation chose (for the log and tests).
    active_datapath: Option<Datapath>,
}

impl Net {
    /// A device on `taps` (one per queue pair, all of one tap) with MAC address `mac`.
    pub fn new(taps: Vec<Tap>, mac: [u8; 6], mtu: Option<u16>, datapath: Datapath) -> Result<Net, NetError> {
        if taps.is_empty() || taps.len() > MAX_QUEUE_PAIRS {
            return Err(NetError::QueueCount(taps.len()));
        }
        if let Some(other) = taps.iter().find(|t| t.name() != taps[0].name()) {
            return Err(NetError::MixedTaps(taps[0].name().to_string(), other.name().to_string()));
        }
        if let Some(m) = mtu.filter(|m| *m < 68) {
            return Err(NetError::Mtu(m));
        }
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * taps.len()];
        if taps.len() > 1 {
            queue_sizes.push(CTRL_QUEUE_SIZE);
        }
        Ok(Net {
            taps: taps.into_iter().map(Arc::new).collect(),
            mac,
            mtu,
            datapath,
            queue_sizes,
            running: None,
            ctrl: None,
            active_datapath: None,
        })
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.taps[0].name()
    }

    pub fn queue_pairs(&self) -> usize {
        self.taps.len()
    }

    /// The datapath of the running activation, if any.
    pub fn active_datapath(&self) -> Option<Datapath> {
        self.active_datapath
    }

    fn stop(&mut self) {
        match self.running.take() {
            Some(Running::Userspace(workers)) => workers.into_iter().for_each(DeviceWorker::stop),
            Some(Running::Vhost(pairs)) => drop(pairs),
            None => {}
        }
        if let Some(ctrl) = self.ctrl.take() {
            ctrl.stop();
        }
        self.active_datapath = None;
    }

    fn start_userspace(
        &self,
        memory: &GuestMemoryMmap,
        interrupt: &Arc<dyn VirtioInterrupt>,
        acked: u64,
        pairs: Vec<(ActiveQueue, ActiveQueue)>,
    ) -> Result<Running, ActivateError> {
        let mut workers = Vec::with_capacity(pairs.len());
        for (i, (rx, tx)) in pairs.into_iter().enumerate() {
            let start = |e: std::io::Error| ActivateError::Start(e.to_string());
            let stop = EventFd::new(EFD_NONBLOCK).map_err(start)?;
            let worker = userspace::PairWorker {
                mem: memory.clone(),
                interrupt: interrupt.clone(),
                rx,
                tx,
                tap: self.taps[i].clone(),
                stop: stop.try_clone().map_err(start)?,
                mergeable: acked & F_MRG_RXBUF != 0,
            };
            let spawned = DeviceWorker::spawn(&format!("net-q{i}"), stop, move || {
                if let Err(e) = worker.run() {
                    error!("virtio-net: queue pair worker failed: {e}");
                }
            });
            match spawned {
                Ok(w) => workers.push(w),
                Err(e) => {
                    workers.into_iter().for_each(DeviceWorker::stop);
                    return Err(ActivateError::Start(e.to_string()));
                }
            }
        }
        Ok(Running::Userspace(workers))
    }
}

/// The tap offload flags for the guest's acked features.
pub fn tap_offload(acked: u64) -> u32 {
    let mut flags = 0;
    if acked & F_GUEST_CSUM != 0 {
        flags |= TUN_F_CSUM;
        if acked & F_GUEST_TSO4 != 0 {
            flags |= TUN_F_TSO4;
        }
        if acked & F_GUEST_TSO6 != 0 {
            flags |= TUN_F_TSO6;
        }
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | F_MAC
            | F_STATUS
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_MRG_RXBUF;
        if self.mtu.is_some() {
            f |= F_MTU;
        }
        if self.taps.len() > 1 {
            f |= F_CTRL_VQ | F_MQ;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio_net_config: mac, status, max_virtqueue_pairs, mtu.
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        let pairs = u16::try_from(self.taps.len()).unwrap_or(u16::MAX);
        config[8..10].copy_from_slice(&pairs.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        read_registers(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is the pod's (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered): read-only.
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        acked_features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.stop();
        let n = self.taps.len();
        let mut slots = queues_by_index(queues, self.queue_sizes.len())?;
        let ctrl_queue = if n > 1 { slots.pop().flatten() } else { None };
        // The pairs the driver made ready; the first must be (a driver uses pair 0).
        let mut pairs = Vec::with_capacity(n);
        let mut slots = slots.into_iter();
        while let (Some(rx), Some(tx)) = (slots.next(), slots.next()) {
            match (rx, tx) {
                (Some(rx), Some(tx)) => pairs.push((rx, tx)),
                _ => break,
            }
        }
        if pairs.is_empty() {
            return Err(ActivateError::QueueCount { want: 2, got: 0 });
        }
        let offload = tap_offload(acked_features);
        for tap in &self.taps {
            tap.set_offload(offload).map_err(|e| ActivateError::Start(e.to_string()))?;
        }
        let want_vhost = match self.datapath {
            Datapath::Userspace => false,
            Datapath::Vhost => true,
            Datapath::Auto => vhost::available(),
        };
        let mut running = None;
        if want_vhost {
            match vhost::start(&memory, interrupt.as_ref(), acked_features, &pairs, &self.taps) {
                Ok(started) => {
                    running = Some(Running::Vhost(started));
                    self.active_datapath = Some(Datapath::Vhost);
                }
                Err(e) if self.datapath == Datapath::Vhost => return Err(ActivateError::Start(format!("vhost-net: {e}"))),
                Err(e) => warn!(tap = self.tap_name(), "vhost-net: {e}; the VMM moves the frames itself"),
            }
        }
        let running = match running {
            Some(r) => r,
            None => {
                self.active_datapath = Some(Datapath::Userspace);
                self.start_userspace(&memory, &interrupt, acked_features, pairs)?
            }
        };
        self.running = Some(running);
        if let Some(q) = ctrl_queue {
            let start = |e: std::io::Error| ActivateError::Start(e.to_string());
            let stop = EventFd::new(EFD_NONBLOCK).map_err(start)?;
            let worker = ctrl::CtrlWorker {
                mem: memory,
                interrupt,
                queue: q,
                stop: stop.try_clone().map_err(start)?,
                max_pairs: u16::try_from(n).unwrap_or(u16::MAX),
            };
            let spawned = DeviceWorker::spawn("net-ctrl", stop, move || {
                if let Err(e) = worker.run() {
                    error!("virtio-net: control queue worker failed: {e}");
                }
            });
            self.ctrl = Some(spawned.map_err(start)?);
        }
        info!(tap = self.tap_name(), datapath = ?self.active_datapath, offload, "virtio-net: activated");
        debug!(acked_features, "virtio-net: features");
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop();
    }
}
