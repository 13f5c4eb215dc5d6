//! virtio-vsock (virtio 1.2, 5.10) with hybrid vsock on the host, as Firecracker and
//! Cloud Hypervisor do it: the guest's stream sockets are Unix streams on the host.
//!
//! - Host-initiated: a host client connects to the device's Unix socket (`uds_path`) and
//!   writes `CONNECT <port>\n`; the device sends the guest a REQUEST from host CID 2 and a
//!   local port of its own (from [`HOST_PORT_BASE`] up). On the guest's RESPONSE the
//!   client reads `OK <local port>\n` and the stream carries the connection's data; on RST
//!   or after [`GUEST_ANSWER_TIMEOUT`], the client's socket is closed.
//! - Guest-initiated: a guest connect to CID 2 port P is a connect to the Unix socket
//!   `<uds_path>_P` (see [`guest_port_path`]), which the host must be listening on.
//!
//! Credit-based flow control both ways: the device advertises [`BUF_ALLOC`] per
//! connection and never buffers more (a guest sending beyond its credit is reset), and
//! reads a host stream only while the guest has credit and rx buffers for the data.
//!
//! The queues are served by one worker thread ("vsock") started on activate and joined
//! on reset and drop. Listening starts at construction; host clients that connect before
//! the driver is up wait in the listen backlog.

mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{debug, error};

use crate::bus::read_registers;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    queues_by_index, ActivateError, ActiveQueue, DeviceWorker, VirtioDevice, VirtioInterrupt, DEVICE_TYPE_VSOCK, VIRTIO_F_VERSION_1,
};
pub use muxer::{
    guest_port_path, parse_connect_line, BUF_ALLOC, CONNECT_LINE_TIMEOUT, GUEST_ANSWER_TIMEOUT, HOST_PORT_BASE, SHUTDOWN_TIMEOUT,
};
// The guest-facing parsers, for the fuzz targets (`fuzz/`).
pub use packet::{read_packet, write_packet, Header, PacketError, Segments, HDR_LEN};

/// Size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is invalid: it must be at least 3 and below 2^32 - 1")]
    InvalidCid(u64),
    #[error("hybrid vsock socket {}: the path already exists", .0.display())]
    PathExists(PathBuf),
    #[error("hybrid vsock socket {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    /// (dev, ino) of the socket file we bound, so drop unlinks only our own.
    socket_id: (u64, u64),
    worker: Option<DeviceWorker>,
    timeouts: muxer::Timeouts,
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening for host clients at `uds_path`
    /// right away (the path must not exist; it is removed when the device is dropped).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        if uds_path.symlink_metadata().is_ok() {
            return Err(VsockError::PathExists(uds_path));
        }
        let bind_err = |source| VsockError::Bind { path: uds_path.clone(), source };
        let listener = UnixListener::bind(&uds_path).map_err(bind_err)?;
        let setup = || -> io::Result<std::fs::Metadata> {
            listener.set_nonblocking(true)?;
            uds_path.symlink_metadata()
        };
        let meta = match setup() {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&uds_path);
                return Err(bind_err(e));
            }
        };
        debug!(guest_cid, path = %uds_path.display(), "vsock: listening");
        Ok(Vsock {
            guest_cid,
            socket_id: (meta.dev(), meta.ino()),
            uds_path,
            listener: Arc::new(listener),
            worker: None,
            timeouts: muxer::Timeouts::default(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The Unix socket host clients connect to (`CONNECT <port>\n`).
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Whether a worker thread is running (activated and not reset).
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Shortens the bounded waits (for tests); takes effect on the next activate.
    #[cfg(test)]
    fn set_timeouts(&mut self, t: muxer::Timeouts) {
        self.timeouts = t;
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_registers(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        _acked_features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount { want: QUEUE_SIZES.len(), got: queues.len() });
        }
        self.stop_worker();
        let mut slots = queues_by_index(queues, QUEUE_SIZES.len())?.into_iter();
        let (Some(Some(rx)), Some(Some(tx)), Some(Some(ev))) = (slots.next(), slots.next(), slots.next()) else {
            unreachable!("three distinct indices below 3");
        };
        let start = |e: io::Error| ActivateError::Start(e.to_string());
        let stop = EventFd::new(EFD_NONBLOCK).map_err(start)?;
        let worker = muxer::Worker {
            mem: memory,
            interrupt,
            rxq: rx.queue,
            txq: tx.queue,
            evq: ev.queue,
            kicks: [rx.kick, tx.kick, ev.kick],
            stop: stop.try_clone().map_err(start)?,
            listener: self.listener.clone(),
            guest_cid: self.guest_cid,
            uds_path: self.uds_path.clone(),
            timeouts: self.timeouts,
        };
        let spawned = DeviceWorker::spawn("vsock", stop, move || {
            if let Err(e) = worker.run() {
                error!("vsock: the worker failed: {e}");
            }
        });
        self.worker = Some(spawned.map_err(start)?);
        debug!(guest_cid = self.guest_cid, "vsock: activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
        // Unlink the socket file only if it is still the one we bound.
        if let Ok(m) = self.uds_path.symlink_metadata() {
            if (m.dev(), m.ino()) == self.socket_id {
                let _ = std::fs::remove_file(&self.uds_path);
            }
        }
    }
}
