//! virtio devices, apart from the transport that carries them (virtio-pci, in
//! [`pci`]). A device sees its queues only once the driver has set them up and
//! written DRIVER_OK: then [`VirtioDevice::activate`] hands it the guest memory,
//! the ready queues with the eventfd the transport signals on each queue notify, and
//! the interrupt to raise when it has used buffers.

use std::sync::Arc;
use std::thread::JoinHandle;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub mod fs;
pub mod net;
pub mod pci;
pub mod segments;
#[cfg(test)]
pub(crate) mod testing;
pub mod vsock;

/// Feature bits every device offers (virtio 1.x, "modern" only).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC: descriptors may point at tables of descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX: notifications suppressed by ring index (the transport
/// tells each queue when the driver accepted it).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device types (virtio 1.2, 5).
pub const DEVICE_TYPE_NET: u32 = 1;
pub const DEVICE_TYPE_VSOCK: u32 = 19;
pub const DEVICE_TYPE_FS: u32 = 26;

/// How a device tells the driver something happened.
pub trait VirtioInterrupt: Send + Sync {
    /// An eventfd that interrupts the driver for queue `queue` when written, for a
    /// backend process that completes buffers without the VMM (vhost-user); `None` if
    /// the queue has no interrupt vector of its own.
    fn queue_notifier(&self, queue: u16) -> Option<EventFd>;
    /// Queue `queue` has new used buffers.
    fn notify_queue(&self, queue: u16);
    /// The device configuration space changed.
    fn notify_config(&self);
}

/// A queue the driver made ready, with the eventfd its notifications arrive on.
pub struct ActiveQueue {
    pub index: u16,
    pub queue: virtio_queue::Queue,
    pub kick: EventFd,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver made {got} queues ready, the device needs {want}")]
    QueueCount { want: usize, got: usize },
    #[error("starting the device: {0}")]
    Start(String),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// The maximum size of each queue (their number is the slice's length).
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered, [`VIRTIO_F_VERSION_1`] included.
    fn device_features(&self) -> u64;
    /// Reads the device-specific configuration space; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device on DRIVER_OK.
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        acked_features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device (status 0): stop using the queues and guest memory
    /// before returning, and drop per-activation state.
    fn reset(&mut self);
}

/// The queues the driver made ready, by index, in `count` slots (a queue it left
/// disabled is `None`); an index past `count` or given twice is an error.
pub fn queues_by_index(queues: Vec<ActiveQueue>, count: usize) -> Result<Vec<Option<ActiveQueue>>, ActivateError> {
    let mut slots: Vec<Option<ActiveQueue>> = std::iter::repeat_with(|| None).take(count).collect();
    for q in queues {
        let i = usize::from(q.index);
        match slots.get_mut(i) {
            Some(slot @ None) => *slot = Some(q),
            _ => return Err(ActivateError::Start(format!("unexpected or repeated queue index {i}"))),
        }
    }
    Ok(slots)
}

/// A device's worker thread and the eventfd that tells it to stop.
pub struct DeviceWorker {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl DeviceWorker {
    /// Runs `run` on a thread named `name`; `stop` (a clone of which `run` waits on)
    /// ends it.
    pub fn spawn(name: &str, stop: EventFd, run: impl FnOnce() + Send + 'static) -> std::io::Result<DeviceWorker> {
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(run)?;
        Ok(DeviceWorker { stop, thread })
    }

    /// Signals the worker and waits for it to end.
    pub fn stop(self) {
        let _ = self.stop.write(1);
        let name = self.thread.thread().name().unwrap_or("virtio").to_string();
        if self.thread.join().is_err() {
            tracing::error!("{name}: the worker thread panicked");
        }
    }
}
