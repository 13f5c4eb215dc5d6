//! What a guest can do to a virtio-pci device: port I/O to CF8/CFC, ECAM and BAR
//! accesses through the VMM's buses (config space, BAR programming, the common
//! config, the MSI-X table, queue set-up, notifications), guest memory it fills as it
//! likes (rings, descriptor tables, indirect tables that were never offered), and the
//! vsock device's parse of the chains it pops (`read_packet`, `write_packet`).
//!
//! The input is a list of operations, each a kind byte and its operands.

#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use vfvm_protocols::vmm_api::AddressSpace;
use vfvm_vmm::bus::Bus;
use vfvm_vmm::interrupt::{InterruptError, InterruptManager, IoEventRegistrar, MsiInterruptGroup, MsiMessage};
use vfvm_vmm::layout::PCI_ECAM_START;
use vfvm_vmm::memory::{guest_memory, Backing};
use vfvm_vmm::pci::{install, PciRoot, PciWindows};
use vfvm_vmm::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use vfvm_vmm::virtio::vsock::{read_packet, write_packet, Header, Segments};
use vfvm_vmm::virtio::{ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, DEVICE_TYPE_VSOCK, VIRTIO_F_VERSION_1};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM: small, so random addresses often land in it.
const RAM: u64 = 1 << 20;

struct Nothing;

impl MsiInterruptGroup for Nothing {
    fn program(&self, _vector: u16, _msg: MsiMessage, _deliverable: bool) -> Result<(), InterruptError> {
        Ok(())
    }
    fn fire(&self, _vector: u16) -> Result<(), InterruptError> {
        Ok(())
    }
    fn notifier(&self, _vector: u16) -> Option<EventFd> {
        None
    }
}

impl InterruptManager for Nothing {
    fn msi_group(&self, _vectors: u16) -> Result<Arc<dyn MsiInterruptGroup>, InterruptError> {
        Ok(Arc::new(Nothing))
    }
}

impl IoEventRegistrar for Nothing {
    fn register(&self, _fd: &EventFd, _addr: u64) -> Result<(), InterruptError> {
        Ok(())
    }
    fn unregister(&self, _fd: &EventFd, _addr: u64) -> Result<(), InterruptError> {
        Ok(())
    }
}

impl VirtioInterrupt for Nothing {
    fn queue_notifier(&self, _queue: u16) -> Option<EventFd> {
        None
    }
    fn notify_queue(&self, _queue: u16) {}
    fn notify_config(&self) {}
}

/// The queues the driver made ready, as a device holds them once activated.
#[derive(Default)]
struct Activated {
    queues: Vec<ActiveQueue>,
    memory: Option<GuestMemoryMmap>,
}

/// A vsock-shaped device (three queues, its config) that keeps its queues for the
/// "kick" operation instead of handing them to a thread.
struct Device(Arc<Mutex<Activated>>);

impl VirtioDevice for Device {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 64]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        vfvm_vmm::bus::read_registers(&3u64.to_le_bytes(), offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        _interrupt: Arc<dyn VirtioInterrupt>,
        _acked_features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let mut a = self.0.lock().unwrap();
        a.queues = queues;
        a.memory = Some(memory);
        Ok(())
    }
    fn reset(&mut self) {
        *self.0.lock().unwrap() = Activated::default();
    }
}

/// The device's side of a notification: the vsock muxer's tx and rx paths over every
/// chain the guest offers (bounded, as a guest may loop the ring).
fn kick(activated: &Mutex<Activated>) {
    let mut a = activated.lock().unwrap();
    let Some(mem) = a.memory.clone() else { return };
    for q in a.queues.iter_mut() {
        for _ in 0..16 {
            let Some(chain) = q.queue.pop_descriptor_chain(&mem) else { break };
            let head = chain.head_index();
            let (readable, writable) = (Segments::collect(chain.clone(), false), Segments::collect(chain, true));
            let _ = read_packet(&mem, &readable);
            let used = if writable.total() >= 44 + 4 { write_packet(&mem, &writable, Header::default(), b"pong").unwrap_or(0) } else { 0 };
            let _ = q.queue.add_used(&mem, head, used);
        }
    }
}

/// Reads operands off the input, zero once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    /// An access width the buses take: 1, 2, 4 or 8 bytes.
    fn width(&mut self) -> usize {
        1 << (self.u8() % 4)
    }
}

/// The VMM maps guest RAM once for the VM's life and never unmaps it: one mapping
/// for all inputs, zeroed before each.
fn memory() -> GuestMemoryMmap {
    static RAM_MAP: OnceLock<GuestMemoryMmap> = OnceLock::new();
    static ZEROS: [u8; RAM as usize] = [0; RAM as usize];
    let memory = RAM_MAP.get_or_init(|| guest_memory(RAM, Backing::Private).expect("1 MiB of guest RAM")).clone();
    memory.write_slice(&ZEROS, GuestAddress(0)).expect("guest RAM is 1 MiB from 0");
    memory
}

fuzz_target!(|data: &[u8]| {
    let memory = memory();
    let (pio, mmio) = (Bus::new(AddressSpace::Pio), Bus::new(AddressSpace::Mmio));
    let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone(), PciWindows::for_ram(RAM))));
    install(&root, &pio, &mmio).expect("the PCI root on fresh buses");
    let activated = Arc::new(Mutex::new(Activated::default()));
    let device = VirtioPciDevice::new(Box::new(Device(activated.clone())), memory.clone(), &Nothing, Some(Arc::new(Nothing)))
        .expect("a virtio-pci device");
    let addr = root.lock().unwrap().add_device(Arc::new(Mutex::new(device)), None).expect("a free slot");
    let ecam_function = PCI_ECAM_START + (u64::from(addr.device()) << 15);
    let mut input = Input(data);
    let mut steps = 0;
    while !input.0.is_empty() && steps < 256 {
        steps += 1;
        let kind = input.u8() % 8;
        let mut buf = [0u8; 8];
        match kind {
            // CF8 address then CFC data, as a legacy guest reaches config space.
            0 => {
                let (a, w, v) = (input.u32(), input.width().min(4), input.u32());
                let _ = pio.write(0xcf8, &a.to_le_bytes());
                let _ = pio.write(0xcfc + u64::from(a & 3), &v.to_le_bytes()[..w]);
            }
            1 => {
                let (a, w) = (input.u32(), input.width().min(4));
                let _ = pio.write(0xcf8, &a.to_le_bytes());
                pio.read(0xcfc, &mut buf[..w]);
            }
            // ECAM: mostly the device's own function, sometimes anywhere in the window.
            2 | 3 => {
                let (off, w, v) = (u64::from(input.u16() & 0xfff), input.width().min(4), input.u32());
                let at = if input.u8() & 1 == 0 { ecam_function + off } else { PCI_ECAM_START + (u64::from(input.u32()) % (1 << 20)) };
                if kind == 2 {
                    let _ = mmio.write(at, &v.to_le_bytes()[..w]);
                } else {
                    mmio.read(at, &mut buf[..w]);
                }
            }
            // The BAR where config space says it is now (the guest may have moved it).
            4 | 5 => {
                let (off, w, v) = (input.u64() % BAR_SIZE, input.width(), input.u64());
                let mut lo = [0u8; 4];
                let mut hi = [0u8; 4];
                root.lock().unwrap().config_read(addr, 0x10, &mut lo);
                root.lock().unwrap().config_read(addr, 0x14, &mut hi);
                let base = (u64::from(u32::from_le_bytes(hi)) << 32) | u64::from(u32::from_le_bytes(lo) & !0xf);
                if kind == 4 {
                    let _ = mmio.write(base.wrapping_add(off), &v.to_le_bytes()[..w]);
                } else {
                    mmio.read(base.wrapping_add(off), &mut buf[..w]);
                }
            }
            // Guest memory as the guest writes it: rings, descriptors, packets.
            6 => {
                let at = u64::from(input.u32()) % RAM;
                let n = usize::from(input.u8() % 64);
                let bytes: Vec<u8> = (0..n).map(|_| input.u8()).collect();
                let _ = memory.write_slice(&bytes, GuestAddress(at));
            }
            _ => kick(&activated),
        }
    }
    // The root and the buses hold each other (as in a VM, for its life): cut the
    // cycle, so each input starts from nothing.
    pio.clear();
    mmio.clear();
});
