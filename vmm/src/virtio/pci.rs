//! The virtio-pci transport, modern only (virtio 1.2, 4.1): a [`VirtioDevice`] as a
//! PCI function of the root complex in [`crate::pci`].
//!
//! The function has one 64-bit memory BAR (BAR 0, [`BAR_SIZE`] bytes):
//!
//! | offset | what                                                        |
//! |--------|-------------------------------------------------------------|
//! | 0x0000 | common configuration (`virtio_pci_common_cfg`, 0x38 bytes)  |
//! | 0x1000 | ISR status (1 byte, read clears)                            |
//! | 0x2000 | device-specific configuration                               |
//! | 0x3000 | notifications: queue `n` at `n * 4` (notify_off_multiplier 4) |
//! | 0x4000 | MSI-X table (one vector per queue, plus one for config)     |
//! | 0x5000 | MSI-X pending bit array                                     |
//!
//! Queue notifications: once the driver has started the device, each active queue's
//! notify address is a KVM ioeventfd (when the VMM has KVM), so a notify signals the
//! device's kick eventfd without an exit to the VMM; the MMIO handler remains for
//! when it is not. Interrupts go through the device's [`MsiInterruptGroup`] (KVM
//! irqfds), whose per-vector eventfds the device may hand to a vhost-user backend.
//!
//! Everything the guest writes is checked: unknown registers are ignored, a queue
//! whose size or rings are bad is not enabled, FEATURES_OK is refused for features
//! the device did not offer or without VIRTIO_F_VERSION_1, and a device that fails to
//! start sets DEVICE_NEEDS_RESET. Writing status 0 resets the device and the
//! transport (not the MSI-X table, which belongs to PCI).

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::{InterruptError, InterruptManager, IoEventRegistrar};
use crate::pci::config::{overlaps, BarRequest, ConfigError, ConfigSpace, PciIds};
use crate::pci::msix::{self, MsixConfig};
use crate::pci::PciDevice;

use super::{ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are this plus the device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

pub const BAR_INDEX: u8 = 0;
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const COMMON_LEN: u64 = COMMON_IMAGE_LEN as u64;
const COMMON_IMAGE_LEN: usize = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Queues a device may have here (the MSI-X table takes one 4 KiB page).
pub const MAX_QUEUES: usize = 255;

// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;
/// VIRTIO_RING_F_EVENT_IDX.
const F_EVENT_IDX: u64 = 1 << 29;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_ID_VENDOR: u8 = 0x09;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("the device has {0} queues; virtio-pci here supports 1..={MAX_QUEUES}")]
    QueueCount(usize),
    #[error("device type {0} has no modern virtio-pci device id")]
    DeviceType(u32),
    #[error("configuration space: {0}")]
    Config(#[from] ConfigError),
    #[error("interrupts: {0}")]
    Interrupts(#[from] InterruptError),
}

/// The PCI class code for a device type.
fn class_for(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00,  // network controller
        2 => 0x01_80_00,  // mass storage, other
        3 => 0x07_80_00,  // communication, other
        26 => 0x01_80_00, // virtio-fs: mass storage, other (as QEMU's vhost-user-fs-pci)
        _ => 0x00_ff_00,  // unclassified
    }
}

/// A queue as the driver sets it up, before DRIVER_OK.
struct QueueSetup {
    max_size: u16,
    size: u16,
    msix_vector: u16,
    desc: u64,
    driver: u64,
    device: u64,
    /// queue_enable: set once the queue was built and checked against guest memory.
    enabled: bool,
}

impl QueueSetup {
    fn new(max_size: u16) -> Self {
        Self { max_size, size: max_size, msix_vector: VIRTIO_MSI_NO_VECTOR, desc: 0, driver: 0, device: 0, enabled: false }
    }

    /// The queue as set up; checked against `memory`.
    fn build(&self, memory: &GuestMemoryMmap) -> Result<Queue, String> {
        let mut queue = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        queue.try_set_size(self.size).map_err(|e| e.to_string())?;
        queue.try_set_desc_table_address(GuestAddress(self.desc)).map_err(|e| e.to_string())?;
        queue.try_set_avail_ring_address(GuestAddress(self.driver)).map_err(|e| e.to_string())?;
        queue.try_set_used_ring_address(GuestAddress(self.device)).map_err(|e| e.to_string())?;
        queue.set_ready(true);
        if !queue.is_valid(memory) {
            return Err("rings outside guest memory".into());
        }
        Ok(queue)
    }
}

/// What the device's worker thread raises interrupts through.
struct Interrupt {
    msix: Arc<Mutex<MsixConfig>>,
    isr: Arc<AtomicU8>,
    config_vector: Arc<AtomicU16>,
    config_generation: Arc<AtomicU8>,
    /// Each queue's vector as the driver set it before DRIVER_OK.
    queue_vectors: Vec<u16>,
}

impl Interrupt {
    fn trigger(&self, vector: u16) {
        if vector != VIRTIO_MSI_NO_VECTOR {
            self.msix.lock().unwrap_or_else(|e| e.into_inner()).trigger(vector);
        }
    }
}

impl VirtioInterrupt for Interrupt {
    fn queue_notifier(&self, queue: u16) -> Option<EventFd> {
        let vector = *self.queue_vectors.get(usize::from(queue))?;
        if vector == VIRTIO_MSI_NO_VECTOR {
            return None;
        }
        self.msix.lock().unwrap_or_else(|e| e.into_inner()).group().notifier(vector)
    }

    fn notify_queue(&self, queue: u16) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        if let Some(&v) = self.queue_vectors.get(usize::from(queue)) {
            self.trigger(v);
        }
    }

    fn notify_config(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        self.trigger(self.config_vector.load(Ordering::SeqCst));
    }
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    config: ConfigSpace,
    msix_cap: usize,
    msix: Arc<Mutex<MsixConfig>>,
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueSetup>,
    isr: Arc<AtomicU8>,
    config_vector: Arc<AtomicU16>,
    config_generation: Arc<AtomicU8>,
    /// After DRIVER_OK: the eventfd each active queue's notifications go to.
    kicks: Vec<Option<EventFd>>,
    /// Where BAR 0 is mapped now.
    bar_base: Option<u64>,
    /// KVM's ioeventfds, if the VMM has them; and the BAR base the kicks are
    /// registered at.
    ioevents: Option<Arc<dyn IoEventRegistrar>>,
    kicks_registered_at: Option<u64>,
}

/// A vendor-specific virtio capability body (after id and next): cap_len,
/// cfg_type, bar, id, 2 bytes padding, offset, length, then `extra`.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let cap_len = u8::try_from(16 + extra.len()).expect("a capability of a few bytes");
    let mut b = vec![cap_len, cfg_type, BAR_INDEX, 0, 0, 0];
    b.extend_from_slice(&u32::try_from(offset).expect("an offset in the BAR").to_le_bytes());
    b.extend_from_slice(&u32::try_from(length).expect("a length within the BAR").to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl VirtioPciDevice {
    /// Wraps `device`; `memory` is what its queues live in, `interrupts` gives its
    /// MSI-X vectors, `ioevents` (if any) takes its queue notification addresses.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupts: &dyn InterruptManager,
        ioevents: Option<Arc<dyn IoEventRegistrar>>,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount(max_sizes.len()));
        }
        let device_type = device.device_type();
        let device_id = u16::try_from(device_type)
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
            .ok_or(VirtioPciError::DeviceType(device_type))?;
        let ids = PciIds {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            revision: 1,
            class: class_for(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
        };
        let mut config = ConfigSpace::new(ids);
        config.add_bar(BarRequest { index: BAR_INDEX, size: BAR_SIZE, is_64bit: true, prefetchable: false })?;
        let notify_len = max_sizes.len() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        for body in [
            virtio_cap(CAP_COMMON, COMMON_OFFSET, COMMON_LEN, &[]),
            virtio_cap(CAP_ISR, ISR_OFFSET, 1, &[]),
            virtio_cap(CAP_DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN, &[]),
            virtio_cap(CAP_NOTIFY, NOTIFY_OFFSET, notify_len, &NOTIFY_OFF_MULTIPLIER.to_le_bytes()),
        ] {
            let wmask = vec![0; body.len()];
            config.add_capability(CAP_ID_VENDOR, &body, &wmask)?;
        }
        // One vector per queue, plus one for configuration changes.
        let vectors = u16::try_from(max_sizes.len()).expect("at most MAX_QUEUES queues") + 1;
        let table_offset = u32::try_from(MSIX_TABLE_OFFSET).expect("an offset in the BAR");
        let pba_offset = u32::try_from(MSIX_PBA_OFFSET).expect("an offset in the BAR");
        let msix_cap = msix::add_capability(&mut config, vectors, BAR_INDEX, table_offset, pba_offset)?;
        let queues: Vec<QueueSetup> = max_sizes.iter().map(|&m| QueueSetup::new(m)).collect();
        Ok(Self {
            config,
            msix_cap,
            msix: Arc::new(Mutex::new(MsixConfig::new(vectors, interrupts.msi_group(vectors)?))),
            device_features: device.device_features() | VIRTIO_F_VERSION_1,
            device,
            memory,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            kicks: queues.iter().map(|_| None).collect(),
            queues,
            isr: Arc::new(AtomicU8::new(0)),
            config_vector: Arc::new(AtomicU16::new(VIRTIO_MSI_NO_VECTOR)),
            config_generation: Arc::new(AtomicU8::new(0)),
            bar_base: None,
            ioevents,
            kicks_registered_at: None,
        })
    }

    /// Queue `index`'s notify address with BAR 0 at `base`.
    fn notify_address(base: u64, index: usize) -> u64 {
        base + NOTIFY_OFFSET + index as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
    }

    /// Puts the active queues' kick eventfds on KVM ioeventfds at the notify
    /// addresses of BAR 0 where it is now, moving them from where they were. A queue
    /// whose registration fails keeps the MMIO path.
    fn register_kicks(&mut self) {
        let Some(ioevents) = self.ioevents.clone() else { return };
        let want = if self.kicks.iter().any(Option::is_some) { self.bar_base } else { None };
        if want == self.kicks_registered_at {
            return;
        }
        self.unregister_kicks();
        if let Some(base) = want {
            for (index, kick) in self.kicks.iter().enumerate().filter_map(|(i, k)| Some((i, k.as_ref()?))) {
                if let Err(e) = ioevents.register(kick, Self::notify_address(base, index)) {
                    crate::guest_warn!("virtio-pci: queue {index}: {e}; its notifications stay MMIO exits");
                }
            }
            self.kicks_registered_at = Some(base);
        }
    }

    /// Takes the kick eventfds off KVM's ioeventfds (before they close or move).
    fn unregister_kicks(&mut self) {
        let (Some(ioevents), Some(old)) = (self.ioevents.clone(), self.kicks_registered_at.take()) else { return };
        for (index, kick) in self.kicks.iter().enumerate().filter_map(|(i, k)| Some((i, k.as_ref()?))) {
            if let Err(e) = ioevents.unregister(kick, Self::notify_address(old, index)) {
                crate::guest_warn!("virtio-pci: queue {index}: {e}");
            }
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device status register (virtio 1.2, 2.1).
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Where BAR 0 is on the MMIO bus now, if it is.
    pub fn bar_base(&self) -> Option<u64> {
        self.bar_base
    }

    fn msix_vectors(&self) -> u16 {
        self.msix.lock().unwrap_or_else(|e| e.into_inner()).vectors()
    }

    /// A vector the driver asked for, or NO_VECTOR if it is out of the table.
    fn checked_vector(&self, v: u16) -> u16 {
        if v < self.msix_vectors() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn selected(&self) -> Option<&QueueSetup> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue, while its setup may still change.
    fn selected_for_setup(&mut self) -> Option<&mut QueueSetup> {
        if self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(usize::from(self.queue_select)).filter(|q| !q.enabled)
    }

    fn common_image(&self) -> [u8; COMMON_IMAGE_LEN] {
        let mut b = [0u8; COMMON_IMAGE_LEN];
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        let feature_word = |features: u64, select: u32| {
            let (low, high) = crate::split_u64(features);
            match select {
                0 => low,
                1 => high,
                _ => 0,
            }
        };
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(0x04, &feature_word(self.device_features, self.device_feature_select).to_le_bytes());
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(0x0c, &feature_word(self.driver_features, self.driver_feature_select).to_le_bytes());
        put(0x10, &self.config_vector.load(Ordering::SeqCst).to_le_bytes());
        put(0x12, &u16::try_from(self.queues.len()).expect("at most MAX_QUEUES queues").to_le_bytes());
        put(0x14, &[self.status, self.config_generation.load(Ordering::SeqCst)]);
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            put(0x18, &q.size.to_le_bytes());
            put(0x1a, &q.msix_vector.to_le_bytes());
            put(0x1c, &u16::from(q.enabled).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes()); // queue_notify_off
            put(0x20, &q.desc.to_le_bytes());
            put(0x28, &q.driver.to_le_bytes());
            put(0x30, &q.device.to_le_bytes());
        }
        b
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let image = self.common_image();
        match usize::try_from(offset).ok().and_then(|o| image.get(o..o.checked_add(data.len())?)) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let v = match *data {
            [a] => u64::from(a),
            [a, b] => u64::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => return,
        };
        // Each arm matches its register's width, so `v` (read from that many bytes)
        // fits the register's type: the conversions below cannot fail.
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = u32::try_from(v).expect("a 4-byte write"),
            (0x08, 4) => self.driver_feature_select = u32::try_from(v).expect("a 4-byte write"),
            (0x0c, 4) => {
                if self.status & STATUS_FEATURES_OK == 0 {
                    let shift = match self.driver_feature_select {
                        0 => 0,
                        1 => 32,
                        _ => return,
                    };
                    self.driver_features = (self.driver_features & !(0xffff_ffffu64 << shift)) | (v << shift);
                }
            }
            (0x10, 2) => {
                let vector = self.checked_vector(u16::try_from(v).expect("a 2-byte write"));
                self.config_vector.store(vector, Ordering::SeqCst);
            }
            (0x14, 1) => self.write_status(u8::try_from(v).expect("a 1-byte write")),
            (0x16, 2) => self.queue_select = u16::try_from(v).expect("a 2-byte write"),
            (0x18, 2) => {
                if let Some(q) = self.selected_for_setup() {
                    q.size = u16::try_from(v).expect("a 2-byte write");
                }
            }
            (0x1a, 2) => {
                let vector = self.checked_vector(u16::try_from(v).expect("a 2-byte write"));
                if let Some(q) = self.selected_for_setup() {
                    q.msix_vector = vector;
                }
            }
            (0x1c, 2) => {
                if v == 1 {
                    self.enable_queue();
                }
            }
            (0x20..=0x37, 4 | 8) if offset % data.len() as u64 == 0 => {
                if let Some(q) = self.selected_for_setup() {
                    let field = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *field = match (data.len(), offset & 4) {
                        (8, _) => v,
                        (_, 0) => (*field & !0xffff_ffff) | v,
                        _ => (*field & 0xffff_ffff) | (v << 32),
                    };
                }
            }
            _ => tracing::debug!("virtio-pci: ignored common config write at {offset:#x}"),
        }
    }

    /// queue_enable = 1: the queue is built and checked against guest memory now.
    fn enable_queue(&mut self) {
        let index = self.queue_select;
        let memory = self.memory.clone();
        let Some(q) = self.selected_for_setup() else {
            return;
        };
        match q.build(&memory) {
            Ok(_) => q.enabled = true,
            Err(e) => crate::guest_warn!("virtio-pci: queue {index}: {e}; not enabled"),
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut value = value | (old & STATUS_NEEDS_RESET);
        let added = value & !old;
        if added & STATUS_FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.device_features;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                crate::guest_warn!(
                    "virtio-pci: refusing driver features {:#x} (offered {:#x})",
                    self.driver_features,
                    self.device_features
                );
                value &= !STATUS_FEATURES_OK;
            }
        }
        if added & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK == 0 {
            crate::guest_warn!("virtio-pci: DRIVER_OK without FEATURES_OK ignored");
            value &= !STATUS_DRIVER_OK;
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 && value & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & F_EVENT_IDX != 0;
        let mut active = Vec::new();
        let mut kicks: Vec<Option<EventFd>> = self.queues.iter().map(|_| None).collect();
        for (index, q) in (0u16..).zip(&self.queues) {
            if !q.enabled {
                continue;
            }
            let mut queue = match q.build(&self.memory) {
                Ok(queue) => queue,
                Err(e) => {
                    tracing::error!("virtio-pci: queue {index}: {e}");
                    self.status |= STATUS_NEEDS_RESET;
                    return;
                }
            };
            queue.set_event_idx(event_idx);
            let kick = match EventFd::new(libc::EFD_NONBLOCK).and_then(|fd| Ok((fd.try_clone()?, fd))) {
                Ok((ours, theirs)) => {
                    kicks[usize::from(index)] = Some(ours);
                    theirs
                }
                Err(e) => {
                    tracing::error!("virtio-pci: queue {index}: eventfd: {e}");
                    self.status |= STATUS_NEEDS_RESET;
                    return;
                }
            };
            active.push(ActiveQueue { index, queue, kick });
        }
        let interrupt = Arc::new(Interrupt {
            msix: self.msix.clone(),
            isr: self.isr.clone(),
            config_vector: self.config_vector.clone(),
            config_generation: self.config_generation.clone(),
            queue_vectors: self.queues.iter().map(|q| q.msix_vector).collect(),
        });
        match self.device.activate(self.memory.clone(), interrupt.clone(), self.driver_features, active) {
            Ok(()) => {
                self.kicks = kicks;
                self.register_kicks();
            }
            Err(e) => {
                tracing::error!("virtio-pci: activating the device: {e}");
                self.status |= STATUS_NEEDS_RESET;
                interrupt.notify_config();
            }
        }
    }

    /// Status 0: the device stops, the transport forgets the driver's setup.
    fn reset(&mut self) {
        self.device.reset();
        self.unregister_kicks();
        self.kicks.iter_mut().for_each(|k| *k = None);
        for q in &mut self.queues {
            *q = QueueSetup::new(q.max_size);
        }
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.isr.store(0, Ordering::SeqCst);
        self.config_vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
    }

    fn notify(&mut self, offset: u64) {
        // An index past usize is past the queues too.
        let index = usize::try_from(offset / u64::from(NOTIFY_OFF_MULTIPLIER)).unwrap_or(usize::MAX);
        match self.kicks.get(index) {
            Some(Some(kick)) => {
                if let Err(e) = kick.write(1) {
                    crate::guest_warn!("virtio-pci: queue {index} notify: {e}");
                }
            }
            _ => tracing::debug!("virtio-pci: notify for inactive queue {index}"),
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        // An unplugged device must not leave KVM signalling eventfds at its addresses.
        self.unregister_kicks();
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(usize::from(offset), data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(usize::from(offset), data);
        if overlaps(usize::from(offset), data.len(), self.msix_cap + 2, 2) {
            let control = self.config.u16_at(self.msix_cap + 2);
            self.msix.lock().unwrap_or_else(|e| e.into_inner()).set_control(control);
        }
    }

    fn bars(&self) -> Vec<BarRequest> {
        self.config.bars()
    }

    fn read_bar(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if index != BAR_INDEX {
            return;
        }
        match offset {
            o if o < ISR_OFFSET => self.read_common(o - COMMON_OFFSET, data),
            ISR_OFFSET => {
                if let Some(b) = data.first_mut() {
                    *b = self.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.lock().unwrap_or_else(|e| e.into_inner()).read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + 0x1000).contains(&o) => {
                self.msix.lock().unwrap_or_else(|e| e.into_inner()).read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, index: u8, offset: u64, data: &[u8]) {
        if index != BAR_INDEX {
            return;
        }
        match offset {
            o if o < ISR_OFFSET => self.write_common(o - COMMON_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => self.notify(o - NOTIFY_OFFSET),
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.lock().unwrap_or_else(|e| e.into_inner()).write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_mapped(&mut self, index: u8, base: Option<u64>) {
        if index == BAR_INDEX {
            self.bar_base = base;
            self.register_kicks();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::MsiInterruptGroup;
    use crate::interrupt::MsiMessage;
    use crate::pci::msix::tests::RecordingGroup;
    use crate::virtio::ActivateError;

    #[derive(Default)]
    struct Record {
        activations: Vec<(u64, Vec<(u16, u16)>)>,
        kicks: Vec<EventFd>,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        resets: usize,
        fail: bool,
    }

    struct TestDevice(Arc<Mutex<Record>>);

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            crate::virtio::DEVICE_TYPE_VSOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[64, 64, 32]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | F_EVENT_IDX
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in (0u8..).zip(data.iter_mut()) {
                *b = offset.to_le_bytes()[0].wrapping_add(i) | 0x80;
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _memory: GuestMemoryMmap,
            interrupt: Arc<dyn VirtioInterrupt>,
            acked_features: u64,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            let mut r = self.0.lock().unwrap();
            if r.fail {
                return Err(ActivateError::Start("test".into()));
            }
            r.activations.push((acked_features, queues.iter().map(|q| (q.index, q.queue.size())).collect()));
            r.kicks = queues.into_iter().map(|q| q.kick).collect();
            r.interrupt = Some(interrupt);
            Ok(())
        }
        fn reset(&mut self) {
            let mut r = self.0.lock().unwrap();
            r.resets += 1;
            r.kicks.clear();
            r.interrupt = None;
        }
    }

    /// Gives every device the one recording group.
    struct OneGroup(Arc<RecordingGroup>);

    impl InterruptManager for OneGroup {
        fn msi_group(&self, _vectors: u16) -> Result<Arc<dyn MsiInterruptGroup>, InterruptError> {
            Ok(self.0.clone())
        }
    }

    /// The notify addresses registered now, as KVM would hold them.
    #[derive(Default)]
    struct RecordingIoEvents(Mutex<Vec<u64>>);

    impl IoEventRegistrar for RecordingIoEvents {
        fn register(&self, _fd: &EventFd, addr: u64) -> Result<(), InterruptError> {
            self.0.lock().unwrap().push(addr);
            Ok(())
        }
        fn unregister(&self, _fd: &EventFd, addr: u64) -> Result<(), InterruptError> {
            let mut held = self.0.lock().unwrap();
            let at = held.iter().position(|&a| a == addr).expect("unregistering an address that was registered");
            held.remove(at);
            Ok(())
        }
    }

    impl RecordingIoEvents {
        fn held(&self) -> Vec<u64> {
            let mut v = self.0.lock().unwrap().clone();
            v.sort_unstable();
            v
        }
    }

    struct Rig {
        dev: VirtioPciDevice,
        record: Arc<Mutex<Record>>,
        sink: Arc<RecordingGroup>,
        ioevents: Arc<RecordingIoEvents>,
    }

    fn rig() -> Rig {
        let record = Arc::new(Mutex::new(Record::default()));
        let sink = Arc::new(RecordingGroup::default());
        let ioevents = Arc::new(RecordingIoEvents::default());
        let memory = crate::memory::guest_memory(16 << 20, crate::memory::Backing::Private).unwrap();
        let dev =
            VirtioPciDevice::new(Box::new(TestDevice(record.clone())), memory, &OneGroup(sink.clone()), Some(ioevents.clone())).unwrap();
        Rig { dev, record, sink, ioevents }
    }

    impl Rig {
        fn w(&mut self, offset: u64, v: u64, len: usize) {
            self.dev.write_bar(0, offset, &v.to_le_bytes()[..len]);
        }
        fn r(&mut self, offset: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.dev.read_bar(0, offset, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn cfg(&mut self, offset: usize, len: usize) -> u32 {
            let mut b = [0u8; 4];
            self.dev.read_config(u16::try_from(offset).unwrap(), &mut b[..len]);
            u32::from_le_bytes(b)
        }
        fn negotiate(&mut self, features: u64) -> u8 {
            self.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
            for sel in 0..2u64 {
                self.w(0x08, sel, 4);
                self.w(0x0c, (features >> (32 * sel)) & 0xffff_ffff, 4);
            }
            self.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK), 1);
            u8::try_from(self.r(0x14, 1)).unwrap()
        }
        /// Queue `q` of `size` at 0x10000 * (q + 1), vector `vector`; returns queue_enable.
        fn setup_queue(&mut self, q: u16, size: u16, vector: u16) -> u64 {
            let base = 0x10000 * (u64::from(q) + 1);
            self.w(0x16, u64::from(q), 2);
            self.w(0x18, u64::from(size), 2);
            self.w(0x1a, u64::from(vector), 2);
            self.w(0x20, base, 4);
            self.w(0x24, 0, 4);
            self.w(0x28, base + 0x1000, 8);
            self.w(0x30, base + 0x2000, 4);
            self.w(0x34, 0, 4);
            self.w(0x1c, 1, 2);
            self.r(0x1c, 2)
        }
    }

    #[test]
    fn the_pci_header_and_virtio_capabilities_are_walkable() {
        let mut g = rig();
        assert_eq!(g.cfg(0, 4), 0x1053_1af4);
        assert_eq!(g.cfg(8, 4), 0x00ff_0001);
        assert_eq!(g.cfg(0x2c, 4), 0x0040_1af4);
        assert_eq!(g.cfg(0x3d, 1), 0, "no INTx pin");
        assert_eq!(g.cfg(0x10, 4), 0b100, "64-bit memory BAR");
        let mut types = vec![];
        let mut at = g.cfg(0x34, 1) as usize;
        while at != 0 {
            let id = g.cfg(at, 1);
            if id == u32::from(CAP_ID_VENDOR) {
                let (len, ty, bar) = (g.cfg(at + 2, 1), g.cfg(at + 3, 1), g.cfg(at + 4, 1));
                let (offset, length) = (g.cfg(at + 8, 4), g.cfg(at + 12, 4));
                types.push((ty, len, bar, offset, length));
                if ty == u32::from(CAP_NOTIFY) {
                    assert_eq!(g.cfg(at + 16, 4), 4);
                }
            } else {
                assert_eq!(id, 0x11);
                assert_eq!(g.cfg(at + 2, 2), 3, "4 vectors: 3 queues + config");
                assert_eq!((g.cfg(at + 4, 4), g.cfg(at + 8, 4)), (0x4000, 0x5000));
            }
            at = g.cfg(at + 1, 1) as usize;
        }
        assert_eq!(types, [(1, 16, 0, 0, 0x38), (3, 16, 0, 0x1000, 1), (4, 16, 0, 0x2000, 0x1000), (2, 20, 0, 0x3000, 12)]);
        assert_eq!(g.r(0x12, 2), 3, "num_queues");
        assert_eq!(g.r(0x2000 + 4, 2), 0x8584, "device config");
    }

    #[test]
    fn feature_negotiation_refuses_what_was_not_offered_and_legacy_drivers() {
        let mut g = rig();
        g.w(0x00, 1, 4);
        assert_eq!(g.r(0x04, 4), 1, "VERSION_1 in the high word");
        g.w(0x00, 0, 4);
        assert_eq!(g.r(0x04, 4), 1 << 29);
        g.w(0x00, 7, 4);
        assert_eq!(g.r(0x04, 4), 0);
        assert_eq!(g.negotiate(VIRTIO_F_VERSION_1 | 1), STATUS_ACKNOWLEDGE | STATUS_DRIVER, "unoffered bit 0");
        g.w(0x14, 0, 1);
        assert_eq!(g.negotiate(F_EVENT_IDX), STATUS_ACKNOWLEDGE | STATUS_DRIVER, "no VERSION_1");
        g.w(0x14, 0, 1);
        assert_eq!(g.negotiate(VIRTIO_F_VERSION_1), STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        // Features are frozen after FEATURES_OK.
        g.w(0x08, 0, 4);
        g.w(0x0c, F_EVENT_IDX, 4);
        assert_eq!(g.r(0x0c, 4), 0);
    }

    #[test]
    fn queues_are_checked_activated_notified_and_reset() {
        let mut g = rig();
        let status = g.negotiate(VIRTIO_F_VERSION_1 | F_EVENT_IDX);
        assert_ne!(status & STATUS_FEATURES_OK, 0);
        g.w(0x16, 0, 2);
        assert_eq!(g.r(0x18, 2), 64, "size defaults to the maximum");
        assert_eq!(g.r(0x1a, 2), 0xffff, "no vector");
        assert_eq!(g.r(0x1e, 2), 0, "notify_off");
        // Bad sizes, unaligned rings, rings outside memory: not enabled.
        assert_eq!(g.setup_queue(0, 3, 0), 0);
        assert_eq!(g.setup_queue(0, 128, 0), 0);
        g.w(0x16, 0, 2);
        g.w(0x18, 64, 2);
        g.w(0x20, 0x10008, 8);
        g.w(0x1c, 1, 2);
        assert_eq!(g.r(0x1c, 2), 0);
        g.w(0x20, 0xf000_0000, 8);
        g.w(0x1c, 1, 2);
        assert_eq!(g.r(0x1c, 2), 0);
        // Good ones; queue 2 stays off. Vector 9 is past the table: NO_VECTOR.
        assert_eq!(g.setup_queue(0, 64, 0), 1);
        assert_eq!(g.setup_queue(1, 16, 9), 1);
        assert_eq!(g.r(0x1a, 2), 0xffff);
        assert_eq!((g.r(0x20, 8), g.r(0x28, 4), g.r(0x30, 8)), (0x20000, 0x21000, 0x22000));
        g.w(0x18, 8, 2);
        assert_eq!(g.r(0x18, 2), 16, "an enabled queue's setup is frozen");
        g.w(0x10, 3, 2);
        assert_eq!(g.r(0x10, 2), 3, "config vector");
        g.w(0x10, 4, 2);
        assert_eq!(g.r(0x10, 2), 0xffff);
        g.w(0x10, 3, 2);

        g.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK), 1);
        assert_eq!(g.dev.status() & STATUS_NEEDS_RESET, 0);
        {
            let r = g.record.lock().unwrap();
            assert_eq!(r.activations, [(VIRTIO_F_VERSION_1 | F_EVENT_IDX, vec![(0, 64), (1, 16)])]);
        }
        // Unmapped BAR: nothing for KVM; mapped: each active queue's notify address
        // (queues 0 and 1), moved with the BAR.
        assert!(g.ioevents.held().is_empty());
        g.dev.bar_mapped(0, Some(0xc000_0000));
        assert_eq!(g.ioevents.held(), [0xc000_3000, 0xc000_3004]);
        g.dev.bar_mapped(0, Some(0xd000_0000));
        assert_eq!(g.ioevents.held(), [0xd000_3000, 0xd000_3004]);
        // Notifies that still come as MMIO writes reach the queue's eventfd.
        g.w(0x3000 + 4, 1, 2);
        assert_eq!(g.record.lock().unwrap().kicks[1].read().unwrap(), 1);
        assert!(g.record.lock().unwrap().kicks[0].read().is_err(), "queue 0 was not kicked");
        g.w(0x3000 + 8, 2, 2); // queue 2 is not active: ignored

        // Interrupts: MSI-X on, vectors 0 and 3 programmed.
        let msix_control = u16::try_from(g.dev.msix_cap + 2).unwrap();
        g.dev.write_config(msix_control, &0x8000u16.to_le_bytes());
        for (v, data) in [(0u64, 0x30u32), (3, 0x33)] {
            g.w(0x4000 + v * 16, 0xfee0_0000, 8);
            g.w(0x4000 + v * 16 + 8, u64::from(data), 4);
            g.w(0x4000 + v * 16 + 12, 0, 4);
        }
        let irq = g.record.lock().unwrap().interrupt.clone().unwrap();
        irq.notify_queue(0);
        irq.notify_queue(1); // NO_VECTOR: only the ISR
        irq.notify_config();
        assert_eq!(g.sink.take(), [MsiMessage { address: 0xfee0_0000, data: 0x30 }, MsiMessage { address: 0xfee0_0000, data: 0x33 }]);
        assert_eq!(g.r(0x15, 1), 1, "config generation moved");
        assert_eq!(g.r(0x1000, 1), 3, "ISR: queue and config");
        assert_eq!(g.r(0x1000, 1), 0, "ISR read clears");
        // Function mask: pending, then delivered on unmask.
        g.dev.write_config(msix_control, &0xc000u16.to_le_bytes());
        irq.notify_queue(0);
        assert!(g.sink.take().is_empty());
        assert_eq!(g.r(0x5000, 8), 1, "PBA");
        g.dev.write_config(msix_control, &0x8000u16.to_le_bytes());
        assert_eq!(g.sink.take().len(), 1);

        // Reset: the device is told, the transport forgets, KVM lets go of the addresses.
        g.w(0x14, 0, 1);
        assert!(g.ioevents.held().is_empty());
        assert_eq!(g.record.lock().unwrap().resets, 1);
        assert_eq!(g.r(0x14, 1), 0);
        g.w(0x16, 1, 2);
        assert_eq!((g.r(0x1c, 2), g.r(0x18, 2), g.r(0x1a, 2)), (0, 64, 0xffff));
        assert_eq!(g.r(0x10, 2), 0xffff);
        g.w(0x3000 + 4, 1, 2); // no eventfd any more: ignored
                               // And it comes back up.
        assert_ne!(g.negotiate(VIRTIO_F_VERSION_1) & STATUS_FEATURES_OK, 0);
        assert_eq!(g.setup_queue(0, 64, 0), 1);
        g.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK), 1);
        assert_eq!(g.record.lock().unwrap().activations.len(), 2);
        assert_eq!(g.ioevents.held(), [0xd000_3000], "registered again at once: the BAR is mapped");
        // An unplugged device leaves nothing registered.
        let ioevents = g.ioevents.clone();
        drop(g);
        assert!(ioevents.held().is_empty());
    }

    #[test]
    fn driver_ok_without_features_ok_or_a_failing_device_needs_reset() {
        let mut g = rig();
        g.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK), 1);
        assert_eq!(u8::try_from(g.r(0x14, 1)).unwrap() & STATUS_DRIVER_OK, 0);
        assert!(g.record.lock().unwrap().activations.is_empty());
        g.w(0x14, 0, 1);
        g.record.lock().unwrap().fail = true;
        g.negotiate(VIRTIO_F_VERSION_1);
        g.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK), 1);
        assert_ne!(u8::try_from(g.r(0x14, 1)).unwrap() & STATUS_NEEDS_RESET, 0);
        // Odd accesses are harmless.
        g.dev.write_bar(0, 0x0c, &[1, 2, 3]);
        g.dev.write_bar(0, 0x7fff, &[1]);
        g.dev.write_bar(1, 0, &[1]);
        let mut b = [0u8; 3];
        g.dev.read_bar(0, 0x36, &mut b);
        assert_eq!(b, [0; 3]);
    }
}
