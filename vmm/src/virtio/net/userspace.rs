//! The VMM's own datapath: one thread per queue pair moves frames between the rings
//! and its tap queue file, one copy each way.
//!
//! - tx: each chain's device-readable buffers (header and frame) are gathered and
//!   written to the tap as one frame; a chain over [`MAX_FRAME`] bytes, shorter than a
//!   header or with a device-writable buffer is dropped.
//! - rx: a frame read from the tap goes into as many rx chains as it needs
//!   (VIRTIO_NET_F_MRG_RXBUF; `num_buffers` in its header says how many), or into one
//!   chain without it (dropped if that is too small). When the guest has posted too few
//!   buffers, the frame waits here and the tap is not read until the guest posts more
//!   (its rx kick): the kernel's tap queue holds the rest, bounded by its length.
//! - Each wake-up handles at most [`BATCH`] chains per direction, so one busy
//!   direction cannot starve the other.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Tap, HEADER_LEN, MAX_FRAME};
use crate::virtio::segments::Segments;
use crate::virtio::{ActiveQueue, VirtioInterrupt};

/// Chains handled per direction per wake-up.
pub const BATCH: usize = 64;

const TOKEN_STOP: u64 = 0;
const TOKEN_RX_KICK: u64 = 1;
const TOKEN_TX_KICK: u64 = 2;
const TOKEN_TAP: u64 = 3;

pub(super) struct PairWorker {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub rx: ActiveQueue,
    pub tx: ActiveQueue,
    pub tap: Arc<Tap>,
    pub stop: EventFd,
    pub mergeable: bool,
}

/// Where an rx frame went.
enum Placed {
    Delivered,
    /// The guest has not posted enough buffers yet.
    NoRoom,
    /// The frame cannot be delivered (a bad chain, or too big for one buffer).
    Dropped,
}

struct Pair {
    w: PairWorker,
    epoll: Epoll,
    /// A frame read from the tap that waits for rx buffers: its length in `rx_frame`.
    pending: Option<usize>,
    rx_frame: Vec<u8>,
    tx_frame: Vec<u8>,
    /// Whether the tap is in the epoll set (it is not while rx buffers run out).
    tap_armed: bool,
}

impl PairWorker {
    pub fn run(self) -> io::Result<()> {
        let epoll = Epoll::new()?;
        let add = |fd, token| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(self.stop.as_raw_fd(), TOKEN_STOP)?;
        add(self.rx.kick.as_raw_fd(), TOKEN_RX_KICK)?;
        add(self.tx.kick.as_raw_fd(), TOKEN_TX_KICK)?;
        add(self.tap.file().as_raw_fd(), TOKEN_TAP)?;
        let mut pair = Pair { w: self, epoll, pending: None, rx_frame: vec![0; MAX_FRAME], tx_frame: vec![0; MAX_FRAME], tap_armed: true };
        pair.run()
    }
}

impl Pair {
    fn run(&mut self) -> io::Result<()> {
        let mut events = [EpollEvent::default(); 8];
        // Frames the guest queued before the worker started.
        self.process_tx();
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_TX_KICK => {
                        let _ = self.w.tx.kick.read();
                        self.process_tx();
                    }
                    TOKEN_RX_KICK => {
                        let _ = self.w.rx.kick.read();
                        self.process_rx()?;
                    }
                    TOKEN_TAP => self.process_rx()?,
                    _ => {}
                }
            }
        }
    }

    fn process_tx(&mut self) {
        let mem = &self.w.mem;
        let q = &mut self.w.tx.queue;
        let mut used = false;
        let mut handled = 0;
        loop {
            let _ = q.disable_notification(mem);
            while handled < BATCH {
                let Some(chain) = q.pop_descriptor_chain(mem) else { break };
                handled += 1;
                let head = chain.head_index();
                let readable = Segments::collect(chain.clone(), false);
                let writable = Segments::collect(chain, true).total();
                let len = readable.total();
                match usize::try_from(len) {
                    _ if writable > 0 => crate::guest_warn!("virtio-net: tx chain {head} has device-writable buffers: dropped"),
                    Ok(n) if (HEADER_LEN..=MAX_FRAME).contains(&n) => {
                        if readable.read_at(mem, 0, &mut self.tx_frame[..n]).is_err() {
                            crate::guest_warn!("virtio-net: tx chain {head} points outside guest memory: dropped");
                        } else if let Err(e) = self.w.tap.write_frame(&self.tx_frame[..n]) {
                            // A full or refusing tap drops the frame, as a NIC would.
                            crate::guest_warn!("virtio-net: tap {}: a {n}-byte frame not sent: {e}", self.w.tap.name());
                        }
                    }
                    _ => crate::guest_warn!("virtio-net: tx chain {head} of {len} bytes: expected {HEADER_LEN} to {MAX_FRAME}: dropped"),
                }
                if let Err(e) = q.add_used(mem, head, 0) {
                    crate::guest_warn!("virtio-net: tx add_used: {e}");
                }
                used = true;
            }
            if handled >= BATCH {
                // More may be waiting: come back after the other events.
                let _ = self.w.tx.kick.write(1);
                break;
            }
            match q.enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if used && q.needs_notification(mem).unwrap_or(true) {
            self.w.interrupt.notify_queue(self.w.tx.index);
        }
    }

    fn process_rx(&mut self) -> io::Result<()> {
        let mut used = false;
        for _ in 0..BATCH {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.w.tap.read_frame(&mut self.rx_frame)? {
                    Some(len) => len,
                    None => break,
                },
            };
            match self.place(len) {
                Placed::Delivered => used = true,
                Placed::Dropped => used = true,
                Placed::NoRoom => {
                    self.pending = Some(len);
                    self.arm_tap(false)?;
                    break;
                }
            }
        }
        if self.pending.is_none() {
            self.arm_tap(true)?;
        }
        let (mem, q) = (&self.w.mem, &mut self.w.rx.queue);
        if used && q.needs_notification(mem).unwrap_or(true) {
            self.w.interrupt.notify_queue(self.w.rx.index);
        }
        Ok(())
    }

    fn arm_tap(&mut self, on: bool) -> io::Result<()> {
        if on != self.tap_armed {
            let op = if on { ControlOperation::Add } else { ControlOperation::Delete };
            self.epoll.ctl(op, self.w.tap.file().as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_TAP))?;
            self.tap_armed = on;
        }
        Ok(())
    }

    /// Puts the frame in `rx_frame[..len]` into rx chains.
    fn place(&mut self, len: usize) -> Placed {
        let mem = &self.w.mem;
        let q = &mut self.w.rx.queue;
        if len < HEADER_LEN {
            crate::guest_warn!("virtio-net: tap {}: a {len}-byte read, shorter than a header: dropped", self.w.tap.name());
            return Placed::Dropped;
        }
        // (head, bytes) of each chain taken, and the first chain's buffers.
        let mut chains: Vec<(u16, u32)> = Vec::new();
        let mut first: Option<Segments> = None;
        let mut written = 0usize;
        while written < len {
            let Some(chain) = next_chain(q, mem) else {
                // Not enough room yet: give the chains back, untouched as far as the
                // guest can tell (nothing was marked used).
                for _ in &chains {
                    q.go_to_previous_position();
                }
                return Placed::NoRoom;
            };
            let head = chain.head_index();
            let segs = Segments::collect(chain, true);
            let room = usize::try_from(segs.total()).unwrap_or(usize::MAX);
            let n = room.min(len - written);
            let bad = (chains.is_empty() && room < HEADER_LEN) || segs.write_at(mem, 0, &self.rx_frame[written..written + n]).is_err();
            if bad || (!self.w.mergeable && n < len) {
                if bad {
                    crate::guest_warn!("virtio-net: rx chain {head} ({room} bytes) is unusable: the frame is dropped");
                } else {
                    crate::guest_warn!("virtio-net: a {len}-byte frame does not fit rx chain {head} ({room} bytes): dropped");
                }
                // The chains taken go back to the guest empty.
                for (h, _) in chains.iter().copied().chain([(head, 0)]) {
                    let _ = q.add_used(mem, h, 0);
                }
                return Placed::Dropped;
            }
            if chains.is_empty() {
                first = Some(segs);
            }
            chains.push((head, u32::try_from(n).unwrap_or(u32::MAX)));
            written += n;
        }
        // num_buffers, the header's last field: the chains this frame took.
        let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        if let Some(first) = first {
            let _ = first.write_at(mem, 10, &count.to_le_bytes());
        }
        for (head, n) in chains {
            if let Err(e) = q.add_used(mem, head, n) {
                crate::guest_warn!("virtio-net: rx add_used: {e}");
            }
        }
        Placed::Delivered
    }
}

/// The next rx chain; when there is none, asks the guest to kick when it posts more
/// (and looks once more, for buffers posted meanwhile).
fn next_chain<'a>(q: &mut Queue, mem: &'a GuestMemoryMmap) -> Option<virtio_queue::DescriptorChain<&'a GuestMemoryMmap>> {
    if let Some(c) = q.pop_descriptor_chain(mem) {
        return Some(c);
    }
    match q.enable_notification(mem) {
        Ok(true) => q.pop_descriptor_chain(mem),
        _ => None,
    }
}
