//! The control queue (virtio 1.2, 5.1.6.5), there when the device has several queue
//! pairs: the driver says how many it uses (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET), which
//! is acknowledged when in range. Every other command gets VIRTIO_NET_ERR (no other
//! control feature is offered). A command is a readable `{class, command}` header and
//! its data, then one writable byte for the answer.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::segments::Segments;
use crate::virtio::{ActiveQueue, VirtioInterrupt};

const CLASS_MQ: u8 = 4;
const CMD_MQ_VQ_PAIRS_SET: u8 = 0;
pub const ACK_OK: u8 = 0;
pub const ACK_ERR: u8 = 1;
/// Commands handled per wake-up (the queue's size bounds a round anyway).
const BATCH: usize = 64;

pub(super) struct CtrlWorker {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub queue: ActiveQueue,
    pub stop: EventFd,
    pub max_pairs: u16,
}

/// The answer to one command (readable part `cmd`).
pub fn answer(cmd: &[u8], max_pairs: u16) -> u8 {
    match cmd {
        [CLASS_MQ, CMD_MQ_VQ_PAIRS_SET, lo, hi] => {
            let pairs = u16::from_le_bytes([*lo, *hi]);
            if (1..=max_pairs).contains(&pairs) {
                ACK_OK
            } else {
                crate::guest_warn!("virtio-net: the driver asked for {pairs} queue pairs of {max_pairs}");
                ACK_ERR
            }
        }
        _ => ACK_ERR,
    }
}

impl CtrlWorker {
    pub fn run(mut self) -> io::Result<()> {
        let epoll = Epoll::new()?;
        epoll.ctl(ControlOperation::Add, self.stop.as_raw_fd(), EpollEvent::new(EventSet::IN, 0))?;
        epoll.ctl(ControlOperation::Add, self.queue.kick.as_raw_fd(), EpollEvent::new(EventSet::IN, 1))?;
        let mut events = [EpollEvent::default(); 2];
        self.process();
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                if ev.data() == 0 {
                    return Ok(());
                }
                let _ = self.queue.kick.read();
                self.process();
            }
        }
    }

    fn process(&mut self) {
        let (mem, q) = (&self.mem, &mut self.queue.queue);
        let mut used = false;
        for _ in 0..BATCH {
            let Some(chain) = q.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let readable = Segments::collect(chain.clone(), false);
            let writable = Segments::collect(chain, true);
            // Commands here are 4 bytes; anything much longer is not one we know.
            let mut cmd = [0u8; 8];
            let n = usize::try_from(readable.total()).unwrap_or(usize::MAX).min(cmd.len());
            let ack = if readable.read_at(mem, 0, &mut cmd[..n]).is_ok() { answer(&cmd[..n], self.max_pairs) } else { ACK_ERR };
            let written = u32::from(writable.total() > 0 && writable.write_at(mem, 0, &[ack]).is_ok());
            if let Err(e) = q.add_used(mem, head, written) {
                crate::guest_warn!("virtio-net: control add_used: {e}");
            }
            used = true;
        }
        if used && q.needs_notification(mem).unwrap_or(true) {
            self.interrupt.notify_queue(self.queue.index);
        }
    }
}
