//! virtio-fs (virtio 1.2, 5.11) as a vhost-user frontend: the FUSE requests on the
//! guest's queues are served by a separate backend process (`virtiofsd`) that maps
//! guest memory itself; this device only sets the backend up and relays interrupts.
//!
//! - At construction the device connects to the backend's socket and does the
//!   feature handshake, so a missing or silent backend fails before the guest starts.
//! - On DRIVER_OK it hands the backend the memory table (guest RAM must be shared, see
//!   [`crate::memory::Backing::Shared`]) and each queue: size, ring addresses, base,
//!   a call eventfd and the kick eventfd the transport signals on queue notifies (a
//!   KVM ioeventfd: the guest's notify reaches the backend without the VMM).
//! - Interrupts: a queue's call eventfd is its MSI-X vector's own eventfd, which KVM
//!   injects from (an irqfd whose GSI route and mask follow the guest's MSI-X
//!   table), so the backend interrupts the guest without the VMM. A queue the driver
//!   gave no vector gets a call eventfd of ours, which the worker thread ("virtio-fs")
//!   turns into the queue's interrupt through the transport.
//! - Backend death: the worker also watches the socket. When the backend hangs up it
//!   logs an error and takes the queues over, answering every request (those the
//!   backend had taken but not completed included, as it completes them in order)
//!   with a FUSE EIO error, so the guest's file operations fail instead of hanging.
//! - Reset (status 0 after DRIVER_OK) and drop close the connection (virtiofsd exits
//!   when its frontend goes); a later DRIVER_OK connects again.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, error, info};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::read_registers;

use super::{ActivateError, ActiveQueue, DeviceWorker, VirtioDevice, VirtioInterrupt, DEVICE_TYPE_FS, VIRTIO_F_VERSION_1};

/// The tag's field in the configuration space: UTF-8, NUL padded, not NUL terminated.
pub const TAG_MAX_LEN: usize = 36;
/// Size of each queue (the hiprio queue and the one request queue).
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
const NUM_QUEUES: usize = QUEUE_SIZES.len();
const REQUEST_QUEUES: u32 = 1;
/// How long the backend may take to answer one vhost-user message.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);

const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Ring features the backend implements and the guest may use (the backend's own,
/// e.g. LOG_ALL or PROTOCOL_FEATURES, stay between us).
const GUEST_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

// FUSE wire format (include/uapi/linux/fuse.h).
const FUSE_IN_HEADER_LEN: usize = 40;
const FUSE_OUT_HEADER_LEN: u32 = 16;
const FUSE_FORGET: u32 = 2;
const FUSE_BATCH_FORGET: u32 = 42;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("tag {0:?}: must not be empty")]
    EmptyTag(String),
    #[error("tag {tag:?}: {len} bytes, at most {TAG_MAX_LEN}")]
    TagTooLong { tag: String, len: usize },
    #[error("tag {0:?}: must not contain NUL")]
    TagNul(String),
    #[error("vhost-user socket {}: {source} (is virtiofsd listening there?)", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("vhost-user backend at {}: {what}: {source}", path.display())]
    Handshake { path: PathBuf, what: &'static str, source: vhost::Error },
    #[error("vhost-user backend at {}: {what}", path.display())]
    Backend { path: PathBuf, what: String },
}

/// Checks a virtio-fs tag: 1 to [`TAG_MAX_LEN`] bytes of UTF-8, no NUL.
pub fn validate_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() {
        return Err(FsError::EmptyTag(tag.into()));
    }
    if tag.len() > TAG_MAX_LEN {
        return Err(FsError::TagTooLong { tag: tag.into(), len: tag.len() });
    }
    if tag.contains('\0') {
        return Err(FsError::TagNul(tag.into()));
    }
    Ok(())
}

/// A connected, negotiated backend.
struct Backend {
    frontend: Frontend,
    /// Virtio features the backend offers.
    features: u64,
    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was offered (rings then start disabled
    /// and are enabled with SET_VRING_ENABLE).
    protocol: bool,
}

/// How often a starting backend's socket is tried (see [`VhostUserFs::new`]).
const BACKEND_START_POLL: Duration = Duration::from_millis(10);

/// Connects to `socket`, trying again while it does not exist or refuses (the
/// backend is starting) for up to `wait`.
fn connect_stream(socket: &Path, wait: Duration) -> io::Result<UnixStream> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match UnixStream::connect(socket) {
            Err(e)
                if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(BACKEND_START_POLL);
            }
            r => return r,
        }
    }
}

/// Connects to `socket` (waiting up to `wait` for it to listen) and does the first
/// part of the handshake (owner, features, protocol features), every reply bounded
/// by [`BACKEND_TIMEOUT`].
fn connect(socket: &Path, wait: Duration) -> Result<Backend, FsError> {
    let connect_err = |source| FsError::Connect { path: socket.to_path_buf(), source };
    let stream = connect_stream(socket, wait).map_err(connect_err)?;
    stream.set_read_timeout(Some(BACKEND_TIMEOUT)).map_err(connect_err)?;
    stream.set_write_timeout(Some(BACKEND_TIMEOUT)).map_err(connect_err)?;
    let mut frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);
    let hs = |what| move |source| FsError::Handshake { path: socket.to_path_buf(), what, source };
    frontend.set_owner().map_err(hs("SET_OWNER"))?;
    let features = frontend.get_features().map_err(hs("GET_FEATURES"))?;
    if features & VIRTIO_F_VERSION_1 == 0 {
        return Err(FsError::Backend { path: socket.to_path_buf(), what: format!("features {features:#x} lack VIRTIO_F_VERSION_1") });
    }
    let protocol = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
    if protocol {
        let offered = frontend.get_protocol_features().map_err(hs("GET_PROTOCOL_FEATURES"))?;
        // Only REPLY_ACK: every setup message is then confirmed, so a backend that
        // refuses one fails the activation instead of leaving a dead queue.
        let wanted = offered & VhostUserProtocolFeatures::REPLY_ACK;
        frontend.set_protocol_features(wanted).map_err(hs("SET_PROTOCOL_FEATURES"))?;
        if wanted.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    debug!(socket = %socket.display(), features = format_args!("{features:#x}"), protocol, "virtio-fs: backend connected");
    Ok(Backend { frontend, features, protocol })
}

/// The virtio-fs device, its requests served by a vhost-user backend.
pub struct VhostUserFs {
    tag: String,
    socket: PathBuf,
    /// tag (36 bytes, NUL padded) + num_request_queues (le32).
    config: [u8; TAG_MAX_LEN + 4],
    /// What the guest is offered: fixed at construction (the transport reads it once).
    features: u64,
    backend: Option<Backend>,
    /// The backend has been given the queues since the last reset.
    activated: bool,
    worker: Option<DeviceWorker>,
}

impl VhostUserFs {
    /// A device for `tag`, connected to the backend at `socket`, which may take up to
    /// `wait` to start listening.
    pub fn new(tag: &str, socket: &Path, wait: Duration) -> Result<Self, FsError> {
        validate_tag(tag)?;
        let backend = connect(socket, wait)?;
        let mut config = [0u8; TAG_MAX_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_MAX_LEN..].copy_from_slice(&REQUEST_QUEUES.to_le_bytes());
        Ok(Self {
            tag: tag.into(),
            socket: socket.into(),
            config,
            features: backend.features & GUEST_FEATURES,
            backend: Some(backend),
            activated: false,
            worker: None,
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the backend connection is open.
    pub fn is_connected(&self) -> bool {
        self.backend.is_some()
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    /// Gives the backend guest memory and the queues; returns, for each queue, the
    /// call eventfd the worker must relay (`None` when the backend interrupts the
    /// guest directly through the queue's vector).
    fn setup_backend(
        backend: &mut Backend,
        memory: &GuestMemoryMmap,
        acked_features: u64,
        queues: &[ActiveQueue],
        interrupt: &dyn VirtioInterrupt,
    ) -> Result<Vec<Option<EventFd>>, String> {
        let fe = &mut backend.frontend;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = (acked_features & backend.features) | (backend.features & protocol_bit);
        fe.set_features(features).map_err(|e| format!("SET_FEATURES {features:#x}: {e}"))?;
        let regions = memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("guest memory cannot be shared with the backend (not memfd-backed): {e}"))?;
        fe.set_mem_table(&regions).map_err(|e| format!("SET_MEM_TABLE: {e}"))?;
        let mut calls = Vec::with_capacity(queues.len());
        for q in queues {
            let i = usize::from(q.index);
            let size = q.queue.size();
            let host = |gpa: u64, len: usize, what: &str| -> Result<u64, String> {
                memory
                    .get_slice(GuestAddress(gpa), len)
                    .map(|s| s.ptr_guard().as_ptr() as u64)
                    .map_err(|e| format!("queue {i}: {what} at {gpa:#x}: {e}"))
            };
            let n = usize::from(size);
            let ring = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: size,
                flags: 0,
                desc_table_addr: host(q.queue.desc_table(), 16 * n, "descriptor table")?,
                avail_ring_addr: host(q.queue.avail_ring(), 6 + 2 * n, "available ring")?,
                used_ring_addr: host(q.queue.used_ring(), 6 + 8 * n, "used ring")?,
                log_addr: None,
            };
            let step = |what: &str, r: vhost::Result<()>| r.map_err(|e| format!("queue {i}: {what}: {e}"));
            step("SET_VRING_NUM", fe.set_vring_num(i, size))?;
            step("SET_VRING_ADDR", fe.set_vring_addr(i, &ring))?;
            step("SET_VRING_BASE", fe.set_vring_base(i, q.queue.next_avail()))?;
            match interrupt.queue_notifier(q.index) {
                Some(vector) => {
                    step("SET_VRING_CALL", fe.set_vring_call(i, &vector))?;
                    calls.push(None);
                }
                None => {
                    let call = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("queue {i}: eventfd: {e}"))?;
                    step("SET_VRING_CALL", fe.set_vring_call(i, &call))?;
                    calls.push(Some(call));
                }
            }
            step("SET_VRING_KICK", fe.set_vring_kick(i, &q.kick))?;
        }
        if backend.protocol {
            for q in queues {
                let i = usize::from(q.index);
                fe.set_vring_enable(i, true).map_err(|e| format!("queue {i}: SET_VRING_ENABLE: {e}"))?;
            }
        }
        Ok(calls)
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        self.features | VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_registers(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        acked_features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount { want: NUM_QUEUES, got: queues.len() });
        }
        let mut indices: Vec<u16> = queues.iter().map(|q| q.index).collect();
        indices.sort_unstable();
        if indices != [0, 1] {
            return Err(ActivateError::Start(format!("unexpected queue indices {indices:?}")));
        }
        self.stop_worker();
        let start = |e: String| ActivateError::Start(format!("virtio-fs {}: {e}", self.socket.display()));
        // The first activation uses the connection made at construction; after a reset
        // (which closed it) connect again.
        let mut backend = match self.backend.take() {
            Some(b) if !self.activated => b,
            _ => connect(&self.socket, Duration::ZERO).map_err(|e| start(e.to_string()))?,
        };
        self.activated = true;
        // On failure `backend` drops here: the connection closes.
        let calls = Self::setup_backend(&mut backend, &memory, acked_features, &queues, interrupt.as_ref()).map_err(start)?;
        let socket_fd = backend.frontend.as_fd_owned().map_err(|e| start(format!("duplicating the socket: {e}")))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| start(e.to_string()))?;
        let worker = Worker {
            mem: memory,
            interrupt,
            queues: queues
                .into_iter()
                .zip(calls)
                .map(|(q, call)| WorkerQueue { index: q.index, queue: q.queue, kick: q.kick, call })
                .collect(),
            backend: Some(socket_fd),
            stop: stop.try_clone().map_err(|e| start(e.to_string()))?,
            socket: self.socket.clone(),
        };
        let spawned = DeviceWorker::spawn("virtio-fs", stop, move || worker.run()).map_err(|e| start(e.to_string()))?;
        self.backend = Some(backend);
        self.worker = Some(spawned);
        info!(tag = %self.tag, socket = %self.socket.display(), "virtio-fs: activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        if self.activated && self.backend.take().is_some() {
            info!(tag = %self.tag, "virtio-fs: device reset; closing the backend connection");
        }
    }
}

impl Drop for VhostUserFs {
    fn drop(&mut self) {
        // The worker holds a duplicate of the socket: stop it first, so dropping the
        // frontend really closes the connection.
        self.stop_worker();
    }
}

/// A duplicate of the frontend's socket, for the worker to see the backend hang up.
trait DupSocket {
    fn as_fd_owned(&self) -> io::Result<OwnedFd>;
}

impl DupSocket for Frontend {
    fn as_fd_owned(&self) -> io::Result<OwnedFd> {
        // SAFETY: the descriptor belongs to the frontend, which outlives this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.as_raw_fd()) };
        fd.try_clone_to_owned()
    }
}

struct WorkerQueue {
    index: u16,
    queue: Queue,
    kick: EventFd,
    /// The backend's used-buffer notifications to relay, unless it signals the
    /// queue's interrupt vector itself.
    call: Option<EventFd>,
}

/// Relays the backend's used-buffer notifications as interrupts; after the backend is
/// gone, fails the guest's requests itself.
struct Worker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<WorkerQueue>,
    /// The backend's socket while it is connected.
    backend: Option<OwnedFd>,
    stop: EventFd,
    socket: PathBuf,
}

fn pollfd(fd: Option<i32>, events: i16) -> libc::pollfd {
    libc::pollfd { fd: fd.unwrap_or(-1), events, revents: 0 }
}

impl Worker {
    fn run(mut self) {
        loop {
            // [stop, backend socket, calls..., kicks...]; fd -1 entries are ignored.
            let alive = self.backend.is_some();
            let mut fds = vec![
                pollfd(Some(self.stop.as_raw_fd()), libc::POLLIN),
                pollfd(self.backend.as_ref().map(|b| b.as_fd().as_raw_fd()), libc::POLLRDHUP),
            ];
            fds.extend(self.queues.iter().map(|q| pollfd(q.call.as_ref().map(AsRawFd::as_raw_fd), libc::POLLIN)));
            fds.extend(self.queues.iter().map(|q| pollfd((!alive).then(|| q.kick.as_raw_fd()), libc::POLLIN)));
            // SAFETY: `fds` is a valid array of pollfd of the length given.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("virtio-fs: poll: {e}; the device stops");
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            let nq = self.queues.len();
            for (i, q) in self.queues.iter().enumerate() {
                if fds[2 + i].revents & libc::POLLIN != 0 && q.call.as_ref().is_some_and(|c| c.read().is_ok()) {
                    self.interrupt.notify_queue(q.index);
                }
            }
            if alive && fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                error!(
                    socket = %self.socket.display(),
                    "virtio-fs: the backend closed the connection (did virtiofsd die?); \
                     the guest's file requests fail with EIO from now on"
                );
                self.backend = None;
                for i in 0..nq {
                    self.take_over(i);
                }
                continue;
            }
            if !alive {
                for i in 0..nq {
                    if fds[2 + nq + i].revents & libc::POLLIN != 0 {
                        let _ = self.queues[i].kick.read();
                        self.serve(i);
                    }
                }
            }
        }
    }

    /// Starts serving queue `i` here: the backend completes requests in order, so
    /// everything past the used index is still to be answered.
    fn take_over(&mut self, i: usize) {
        let q = &mut self.queues[i];
        match q.queue.used_idx(&self.mem, Ordering::Acquire) {
            Ok(used) => {
                q.queue.set_next_avail(used.0);
                q.queue.set_next_used(used.0);
            }
            Err(e) => {
                crate::guest_warn!("virtio-fs: queue {}: reading the used index: {e}", q.index);
                return;
            }
        }
        self.serve(i);
        // Whatever the backend completed last may not have been signalled.
        self.interrupt.notify_queue(self.queues[i].index);
    }

    /// Answers every available request of queue `i` with EIO.
    fn serve(&mut self, i: usize) {
        let mem = &self.mem;
        let q = &mut self.queues[i];
        let mut used_any = false;
        loop {
            if let Err(e) = q.queue.disable_notification(mem) {
                crate::guest_warn!("virtio-fs: queue {}: {e}", q.index);
                return;
            }
            while let Some(chain) = q.queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = fail_request(mem, chain);
                if let Err(e) = q.queue.add_used(mem, head, len) {
                    crate::guest_warn!("virtio-fs: queue {}: {e}", q.index);
                    return;
                }
                used_any = true;
            }
            match q.queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    crate::guest_warn!("virtio-fs: queue {}: {e}", q.index);
                    return;
                }
            }
        }
        if used_any && q.queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.notify_queue(q.index);
        }
    }
}

/// Writes a FUSE error reply (EIO) for one request; returns the bytes written (0 for
/// requests that get no reply, FORGETs, and for malformed ones).
fn fail_request(mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32 {
    let mut header = [0u8; FUSE_IN_HEADER_LEN];
    let mut got = 0;
    let mut writable = Vec::new();
    let mut room = 0u64;
    for desc in chain {
        if desc.is_write_only() {
            // Only the first 16 bytes are needed.
            if room < u64::from(FUSE_OUT_HEADER_LEN) {
                writable.push((desc.addr(), desc.len()));
                room += u64::from(desc.len());
            }
        } else if got < FUSE_IN_HEADER_LEN && writable.is_empty() {
            let n = (FUSE_IN_HEADER_LEN - got).min(desc.len() as usize);
            if mem.read_slice(&mut header[got..got + n], desc.addr()).is_err() {
                return 0;
            }
            got += n;
        }
    }
    if got < FUSE_IN_HEADER_LEN || room < u64::from(FUSE_OUT_HEADER_LEN) {
        return 0;
    }
    let opcode = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if opcode == FUSE_FORGET || opcode == FUSE_BATCH_FORGET {
        return 0;
    }
    let mut reply = [0u8; FUSE_OUT_HEADER_LEN as usize];
    reply[..4].copy_from_slice(&FUSE_OUT_HEADER_LEN.to_le_bytes());
    reply[4..8].copy_from_slice(&(-libc::EIO).to_le_bytes());
    reply[8..].copy_from_slice(&header[8..16]); // unique
    let mut done = 0;
    for (addr, len) in writable {
        let n = (reply.len() - done).min(len as usize);
        if mem.write_slice(&reply[done..done + n], addr).is_err() {
            return 0;
        }
        done += n;
        if done == reply.len() {
            break;
        }
    }
    FUSE_OUT_HEADER_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_bounded() {
        assert!(validate_tag("myfs").is_ok());
        assert!(validate_tag(&"a".repeat(36)).is_ok());
        assert_eq!(validate_tag(&"a".repeat(37)).unwrap_err().to_string(), format!("tag \"{}\": 37 bytes, at most 36", "a".repeat(37)));
        assert!(matches!(validate_tag(""), Err(FsError::EmptyTag(_))));
        assert!(matches!(validate_tag("a\0b"), Err(FsError::TagNul(_))));
    }

    #[derive(Default)]
    struct Notified(std::sync::Mutex<Vec<u16>>);

    impl VirtioInterrupt for Notified {
        fn queue_notifier(&self, _queue: u16) -> Option<EventFd> {
            None
        }
        fn notify_queue(&self, queue: u16) {
            self.0.lock().unwrap().push(queue);
        }
        fn notify_config(&self) {}
    }

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn put_desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, at).unwrap();
    }

    fn fuse_in(mem: &GuestMemoryMmap, at: u64, opcode: u32, unique: u64) {
        let mut h = [0u8; FUSE_IN_HEADER_LEN];
        h[..4].copy_from_slice(&u32::try_from(FUSE_IN_HEADER_LEN).unwrap().to_le_bytes());
        h[4..8].copy_from_slice(&opcode.to_le_bytes());
        h[8..16].copy_from_slice(&unique.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// After the backend is gone, requests it had not completed and new ones get a
    /// FUSE EIO reply (FORGETs and malformed ones none), in the used ring after what
    /// the backend completed.
    #[test]
    fn without_a_backend_requests_fail_with_eio() {
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let mem = crate::memory::guest_memory(16 << 20, crate::memory::Backing::Private).unwrap();
        let mut queue = Queue::new(16).unwrap();
        queue.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        queue.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        queue.set_ready(true);
        // Chain 0 (the backend answered it), chain 2: a LOOKUP split over two
        // readable descriptors, its reply buffer over two writable ones; chain 5: a
        // FORGET; chain 6: a header cut short.
        put_desc(&mem, 0, 0x10000, 48, NEXT, 1);
        put_desc(&mem, 1, 0x11000, 64, WRITE, 0);
        fuse_in(&mem, 0x10000, 1, 100);
        put_desc(&mem, 2, 0x12000, 24, NEXT, 3);
        put_desc(&mem, 3, 0x12018, 30, NEXT, 4);
        put_desc(&mem, 4, 0x13000, 10, WRITE | NEXT, 7);
        put_desc(&mem, 7, 0x13800, 100, WRITE, 0);
        fuse_in(&mem, 0x12000, 1, 0xabcd_ef01);
        put_desc(&mem, 5, 0x14000, 48, 0, 0);
        fuse_in(&mem, 0x14000, FUSE_FORGET, 102);
        put_desc(&mem, 6, 0x15000, 20, NEXT, 8);
        put_desc(&mem, 8, 0x16000, 64, WRITE, 0);
        for (slot, head) in [0u16, 2, 5, 6].iter().enumerate() {
            mem.write_obj(*head, GuestAddress(AVAIL + 4 + 2 * slot as u64)).unwrap();
        }
        mem.write_obj(4u16, GuestAddress(AVAIL + 2)).unwrap();
        // The backend used chain 0.
        mem.write_obj(0u32, GuestAddress(USED + 4)).unwrap();
        mem.write_obj(80u32, GuestAddress(USED + 8)).unwrap();
        mem.write_obj(1u16, GuestAddress(USED + 2)).unwrap();

        let notified = Arc::new(Notified::default());
        let mut worker = Worker {
            mem: mem.clone(),
            interrupt: notified.clone(),
            queues: vec![WorkerQueue {
                index: 1,
                queue,
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
                call: Some(EventFd::new(EFD_NONBLOCK).unwrap()),
            }],
            backend: None,
            stop: EventFd::new(EFD_NONBLOCK).unwrap(),
            socket: "/test".into(),
        };
        worker.take_over(0);
        let used = |slot: u64| -> (u32, u32) {
            let at = USED + 4 + 8 * slot;
            (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
        };
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 4);
        assert_eq!([used(0), used(1), used(2), used(3)], [(0, 80), (2, 16), (5, 0), (6, 0)]);
        let mut reply = [0u8; 16];
        mem.read_slice(&mut reply[..10], GuestAddress(0x13000)).unwrap();
        mem.read_slice(&mut reply[10..], GuestAddress(0x13800)).unwrap();
        assert_eq!(u32::from_le_bytes(reply[..4].try_into().unwrap()), 16);
        assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), -libc::EIO);
        assert_eq!(u64::from_le_bytes(reply[8..].try_into().unwrap()), 0xabcd_ef01);
        assert!(notified.0.lock().unwrap().iter().all(|&q| q == 1));
        assert!(!notified.0.lock().unwrap().is_empty());

        // A request the guest adds later, on its kick.
        put_desc(&mem, 9, 0x17000, 40, NEXT, 10);
        put_desc(&mem, 10, 0x18000, 16, WRITE, 0);
        fuse_in(&mem, 0x17000, 3, 7);
        mem.write_obj(9u16, GuestAddress(AVAIL + 4 + 2 * 4)).unwrap();
        mem.write_obj(5u16, GuestAddress(AVAIL + 2)).unwrap();
        worker.serve(0);
        assert_eq!(used(4), (9, 16));
        assert_eq!(mem.read_obj::<i32>(GuestAddress(0x18004)).unwrap(), -libc::EIO);
    }

    #[test]
    fn a_missing_backend_is_named() {
        let e = VhostUserFs::new("t", Path::new("/nonexistent/virtiofsd.sock"), Duration::ZERO).err().unwrap();
        assert!(e.to_string().starts_with("vhost-user socket /nonexistent/virtiofsd.sock: "), "{e}");
        // Waiting for a backend that never comes ends at the bound, with the same error.
        let started = std::time::Instant::now();
        let e = VhostUserFs::new("t", Path::new("/nonexistent/virtiofsd.sock"), Duration::from_millis(200)).err().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200) && e.to_string().contains("is virtiofsd listening there?"), "{e}");
    }

    #[test]
    fn a_backend_socket_that_appears_within_the_wait_is_connected() {
        let dir = std::env::temp_dir().join(format!("vfvm-fs-wait-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fs.sock");
        let connecting = {
            let path = path.clone();
            std::thread::spawn(move || connect_stream(&path, Duration::from_secs(30)))
        };
        // The socket did not exist when the connect began; it appears now.
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        assert!(connecting.join().unwrap().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
