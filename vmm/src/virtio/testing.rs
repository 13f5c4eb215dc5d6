//! A mock guest driver's pieces for device tests: split rings in real guest memory,
//! written from the driver's side, and an interrupt that counts.
//!
//! Hand-written rather than virtio-queue's `MockSplitQueue`, whose layout puts the used
//! ring over the second half of the available ring (its ring `end()` counts entries as
//! bytes), which a test that goes round the rings would trip over.

use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioInterrupt;

/// How long a test waits for the device before it fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

#[derive(Default)]
pub struct TestIrq {
    count: Mutex<u64>,
    cv: Condvar,
}

impl VirtioInterrupt for TestIrq {
    fn queue_notifier(&self, _queue: u16) -> Option<EventFd> {
        None
    }
    fn notify_queue(&self, _queue: u16) {
        *self.count.lock().unwrap() += 1;
        self.cv.notify_all();
    }
    fn notify_config(&self) {}
}

impl TestIrq {
    /// Waits (on interrupts, not sleeps) until `cond` holds; panics after DEADLINE.
    pub fn wait_until(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + DEADLINE;
        let mut g = self.count.lock().unwrap();
        loop {
            if cond() {
                return;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
    }
}

/// One split ring, from the driver's side.
pub struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
}

impl Ring {
    pub fn new(base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Ring { desc: base, avail, used, size }
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used)).unwrap();
        q.set_ready(true);
        q
    }

    pub fn set_desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(self.desc + 16 * u64::from(i));
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&b, a).unwrap();
    }

    /// Publishes chain `head` as avail entry number `n`.
    pub fn publish(&self, mem: &GuestMemoryMmap, n: u16, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(n % self.size));
        mem.write_obj(head.to_le(), slot).unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(n.wrapping_add(1).to_le(), GuestAddress(self.avail + 2)).unwrap();
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// (id, len) of used entry number `n`.
    pub fn used_elem(&self, mem: &GuestMemoryMmap, n: u16) -> (u32, u32) {
        let a = self.used + 4 + 8 * u64::from(n % self.size);
        let id: u32 = mem.read_obj(GuestAddress(a)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(a + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }
}
