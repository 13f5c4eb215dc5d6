//! PCI passthrough with VFIO: a host function bound to vfio-pci (a VF the VF manager
//! prepared) becomes a function on the guest's PCI bus.
//!
//! - The VM has one VFIO container ([`VfioContext`]), tied to KVM through the KVM
//!   VFIO pseudo-device; every device's IOMMU group joins it, and all guest RAM is
//!   DMA-mapped into it (IOVA = guest physical address) once the first group is in.
//! - Configuration space is the VMM's own ([`ConfigSpace`]): the device's ids and
//!   class, its memory BARs (sizes from VFIO, addresses virtual: the root complex and
//!   the guest place them), no expansion ROM, no INTx (interrupt pin 0), and one
//!   capability, MSI-X, with the device's vector count and table/PBA locations. The
//!   command register's memory-decode and bus-master bits reach the device (it must
//!   master DMA); nothing else of the guest's config writes does. The device's other
//!   capabilities (MSI, power management, PCIe, extended space) are not shown: a
//!   guest driver finds a plain PCI function with MSI-X, which is what VF drivers use.
//! - BARs are mmap'ed from the device and put into the guest as KVM memory slots where
//!   the guest placed them (moved when it moves a BAR), so the datapath never exits,
//!   except the pages holding the MSI-X table and PBA, which stay trapped: the guest's
//!   vector programming goes to [`MsixConfig`] and from there to KVM GSI routes.
//! - Interrupts: each MSI-X vector is an eventfd that vfio-pci signals and KVM
//!   injects from (an irqfd on a GSI routed to the vector's message); masking a
//!   vector detaches its irqfd, and what fired meanwhile is injected on unmask.
//! - On removal: MSI-X disabled, BARs out of the guest and unmapped, the device reset
//!   (FLR for a VF), its fds closed; guest RAM stays mapped in the container until
//!   the container goes with the last device.
//!
//! Errors name the host device and the step: not on vfio-pci, no IOMMU group (no
//! IOMMU), group not viable (another device of the group is on a host driver), group
//! busy (another process holds it), a BAR too large for the guest's windows.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioOps, VfioRegionInfoCap};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::interrupt::{GsiRouting, InterruptManager};
use crate::pci::config::{BarRequest, ConfigSpace, PciIds, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_MEMORY, REG_COMMAND};
use crate::pci::msix::{self, MsixConfig};
use crate::pci::{PciAddress, PciDevice};
use crate::vm::MemorySlots;

/// VFIO's region and interrupt indexes for a PCI device (linux/vfio.h).
const CONFIG_REGION_INDEX: u32 = 7;
const REGION_FLAG_MMAP: u32 = 1 << 2;
const MSIX_IRQ_INDEX: u32 = 2;
const PAGE_SIZE: u64 = 4096;
/// The legacy configuration space, where the capability list lives.
const LEGACY_CONFIG_SIZE: usize = 256;
const REG_CAPABILITIES: usize = 0x34;
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// A device to pass through, as `--vfio` or the control API names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioConfig {
    pub host: PciAddress,
    pub id: String,
    /// The guest slot on bus 0; the first free one if `None`.
    pub slot: Option<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("VFIO device {host}: {} does not exist (no such PCI function on this host)", sysfs.display())]
    NoSuchDevice { host: PciAddress, sysfs: PathBuf },
    #[error("VFIO device {host}: bound to {driver}, not vfio-pci (the VF manager binds it before the VM starts)")]
    NotOnVfioPci { host: PciAddress, driver: String },
    #[error("VFIO device {host}: it has no IOMMU group: this host has no IOMMU, or it is off (boot with intel_iommu=on or amd_iommu=on)")]
    NoIommu { host: PciAddress },
    #[error("VFIO device {host}: /dev/vfio/vfio: {err} (is the vfio module loaded?)")]
    NoVfio { host: PciAddress, err: std::io::Error },
    #[error("VFIO device {host}: IOMMU group {group} is not viable: {others}")]
    GroupNotViable { host: PciAddress, group: u32, others: String },
    #[error("VFIO device {host}: IOMMU group {group} is busy: another process (another VMM?) holds /dev/vfio/{group}")]
    GroupBusy { host: PciAddress, group: u32 },
    #[error("VFIO device {host}: BAR {index} ({size:#x} bytes) does not fit in the guest's PCI windows")]
    BarTooLarge { host: PciAddress, index: u8, size: u64 },
    #[error("VFIO device {host}: {step}: {err}")]
    Step { host: PciAddress, step: &'static str, err: String },
}

fn step_err(host: PciAddress, step: &'static str) -> impl FnOnce(String) -> VfioError {
    move |err| VfioError::Step { host, step, err }
}

/// The sysfs directory of host function `host`.
fn sysfs_path(host: PciAddress) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(host.to_string())
}

/// The name of the driver `dev` (a sysfs device directory) is bound to, if any.
fn driver_of(dev: &Path) -> Option<String> {
    let link = fs::read_link(dev.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Checks what the kernel would refuse later with a vaguer error; returns the
/// device's IOMMU group.
pub fn precheck(host: PciAddress) -> Result<u32, VfioError> {
    let sysfs = sysfs_path(host);
    if !sysfs.exists() {
        return Err(VfioError::NoSuchDevice { host, sysfs });
    }
    match driver_of(&sysfs) {
        Some(d) if d == "vfio-pci" => {}
        Some(driver) => return Err(VfioError::NotOnVfioPci { host, driver }),
        None => return Err(VfioError::NotOnVfioPci { host, driver: "no driver".into() }),
    }
    let group = fs::read_link(sysfs.join("iommu_group"))
        .ok()
        .and_then(|l| l.file_name()?.to_str()?.parse::<u32>().ok())
        .ok_or(VfioError::NoIommu { host })?;
    // Viable: every device of the group on vfio-pci, on no driver, or a bridge's.
    let members = Path::new("/sys/kernel/iommu_groups").join(group.to_string()).join("devices");
    let mut others = Vec::new();
    if let Ok(entries) = fs::read_dir(&members) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            match driver_of(&entry.path()) {
                None => {}
                Some(d) if d == "vfio-pci" || d == "pcieport" || d == "pci-stub" => {}
                Some(d) => others.push(format!("{name} is on {d}")),
            }
        }
    }
    if !others.is_empty() {
        others.sort();
        return Err(VfioError::GroupNotViable {
            host,
            group,
            others: format!(
                "{} (every device of the group must be on vfio-pci, pci-stub or pcieport, or have no driver)",
                others.join(", ")
            ),
        });
    }
    Ok(group)
}

/// The VM's VFIO container, with guest RAM DMA-mapped once a group is in.
pub struct VfioContext {
    container: Arc<VfioContainer>,
    memory: GuestMemoryMmap,
    dma: Mutex<DmaState>,
}

#[derive(Default)]
struct DmaState {
    mapped: bool,
    /// Devices open in the container. When the last one closes, its group leaves
    /// and the kernel drops every mapping: the next device maps guest RAM again.
    devices: usize,
}

/// One open device's share of the container (see [`DmaState::devices`]).
struct ContainerUser(Arc<VfioContext>);

impl ContainerUser {
    fn new(context: Arc<VfioContext>) -> Self {
        context.lock_dma().devices += 1;
        Self(context)
    }
}

impl Drop for ContainerUser {
    fn drop(&mut self) {
        let mut dma = self.0.lock_dma();
        dma.devices = dma.devices.saturating_sub(1);
        if dma.devices == 0 {
            dma.mapped = false;
        }
    }
}

impl VfioContext {
    /// Opens the container and ties it to the VM (the KVM VFIO device). `host` is the
    /// device the container is made for, named in errors.
    pub fn new(vm: &VmFd, memory: &GuestMemoryMmap, host: &PciAddress) -> Result<Self, VfioError> {
        let host = *host;
        // Opened once here for a clear error; VfioContainer opens its own.
        fs::OpenOptions::new().read(true).write(true).open("/dev/vfio/vfio").map_err(|err| VfioError::NoVfio { host, err })?;
        let mut request = kvm_create_device { type_: kvm_device_type_KVM_DEV_TYPE_VFIO, fd: 0, flags: 0 };
        let kvm_device = vm.create_device(&mut request).map_err(|e| step_err(host, "creating the KVM VFIO device")(e.to_string()))?;
        let container = VfioContainer::new(Some(Arc::new(VfioDeviceFd::new_from_kvm(kvm_device))))
            .map_err(|e| step_err(host, "opening the VFIO container")(e.to_string()))?;
        Ok(Self { container: Arc::new(container), memory: memory.clone(), dma: Mutex::default() })
    }

    /// How many devices are open in the container.
    pub fn devices(&self) -> u32 {
        u32::try_from(self.lock_dma().devices).unwrap_or(u32::MAX)
    }

    fn lock_dma(&self) -> std::sync::MutexGuard<'_, DmaState> {
        self.dma.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// DMA-maps guest RAM (IOVA = guest physical address) if not yet done; the
    /// container needs a group in it first.
    fn ensure_dma_mapped(&self, host: PciAddress) -> Result<(), VfioError> {
        let mut dma = self.lock_dma();
        if !dma.mapped {
            let started = std::time::Instant::now();
            // SAFETY: guest RAM stays mapped as long as `self.memory` (a clone of the
            // VM's regions) lives, and it is unmapped from the container in Drop
            // before that clone goes. The VMM never makes references into guest RAM
            // (vm-memory accesses are volatile copies).
            unsafe { self.container.vfio_map_guest_memory(&self.memory) }
                .map_err(|e| step_err(host, "DMA-mapping guest memory")(e.to_string()))?;
            dma.mapped = true;
            let mib = self.memory.iter().map(|r| r.len()).sum::<u64>() >> 20;
            tracing::info!(%host, mib, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "guest RAM DMA-mapped for VFIO");
        }
        Ok(())
    }
}

// No Drop: the mappings go with the container's last group (each device's close),
// and the pinned pages with the container fd.

/// The offset of capability `id` in a legacy configuration space, if it has one.
fn find_capability(config: &[u8], id: u8) -> Option<usize> {
    let status = u16::from_le_bytes([*config.get(6)?, *config.get(7)?]);
    if status & STATUS_CAPABILITIES == 0 {
        return None;
    }
    let mut at = usize::from(*config.get(REG_CAPABILITIES)? & !3);
    // At most 48 capabilities fit; more means a loop. A capability found must have
    // room for the largest body read here (MSI-X: 12 bytes).
    for _ in 0..48 {
        if at < 0x40 || at + 12 > config.len() {
            return None;
        }
        if config[at] == id {
            return Some(at);
        }
        at = usize::from(config[at + 1] & !3);
    }
    None
}

/// The parts of a BAR of `size` bytes that can be mmap'ed into the guest: the
/// device's mmap'able `areas` (offset, size) less the pages overlapping `holes`
/// (offset, size: the MSI-X table and PBA, which must stay trapped). Page-aligned,
/// sorted, non-empty pieces.
fn mappable_areas(size: u64, areas: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let holes: Vec<(u64, u64)> = holes
        .iter()
        .filter(|&&(_, len)| len > 0)
        .map(|&(off, len)| (off / PAGE_SIZE * PAGE_SIZE, off.saturating_add(len).div_ceil(PAGE_SIZE) * PAGE_SIZE))
        .collect();
    let mut out = Vec::new();
    for &(off, len) in areas {
        let (mut start, end) = (off.div_ceil(PAGE_SIZE) * PAGE_SIZE, (off.saturating_add(len).min(size)) / PAGE_SIZE * PAGE_SIZE);
        while start < end {
            // The first hole that overlaps what is left, by start.
            let hole = holes.iter().filter(|&&(hs, he)| hs < end && start < he).min_by_key(|&&(hs, _)| hs);
            match hole {
                Some(&(hs, he)) => {
                    if hs > start {
                        out.push((start, hs - start));
                    }
                    start = he;
                }
                None => {
                    out.push((start, end - start));
                    start = end;
                }
            }
        }
    }
    out.sort_unstable();
    out
}

/// One mmap'ed piece of a BAR, and its KVM slot while the BAR is in the guest. The
/// mapping goes when the area drops, unless KVM still maps it (a slot removal that
/// failed): then it is left mapped rather than freed under the guest.
struct MappedArea {
    offset: u64,
    size: u64,
    /// `size` as mmap took it.
    len: usize,
    host: *mut u8,
    slot: Option<u32>,
}

// SAFETY: `host` is a mapping this device owns for its whole life; it is only handed
// to KVM and munmap'ed, never dereferenced by the VMM.
unsafe impl Send for MappedArea {}

impl Drop for MappedArea {
    fn drop(&mut self) {
        if self.slot.is_some() {
            tracing::warn!("a BAR mapping KVM may still use is left mapped");
            return;
        }
        // SAFETY: `host` is a mapping of `len` bytes made in `open`, used by no slot.
        unsafe { libc::munmap(self.host.cast(), self.len) };
    }
}

struct Bar {
    request: BarRequest,
    areas: Vec<MappedArea>,
}

/// Where the MSI-X table and PBA are, and their state.
struct Msix {
    cap: usize,
    table: (u8, u64, u64),
    pba: (u8, u64, u64),
    config: MsixConfig,
    /// Whether vfio-pci has the vectors' eventfds (MSI-X enabled on the device).
    on_device: bool,
}

impl Msix {
    fn in_range(range: (u8, u64, u64), index: u8, offset: u64) -> bool {
        range.0 == index && offset >= range.1 && offset < range.1 + range.2
    }
}

/// A passed-through host PCI function.
pub struct VfioPciDevice {
    host: PciAddress,
    device: VfioDevice,
    config: ConfigSpace,
    bars: Vec<Bar>,
    msix: Option<Msix>,
    slots: Arc<MemorySlots>,
    /// Keeps the container (and its DMA mapping) alive while the device is.
    _container: ContainerUser,
}

impl VfioPciDevice {
    /// Opens `config.host` (bound to vfio-pci) into `context`'s container and builds
    /// its guest-facing function. Nothing is in the guest until the root complex
    /// plugs it.
    pub fn open(
        config: &VfioConfig,
        context: Arc<VfioContext>,
        interrupts: &Arc<GsiRouting>,
        slots: Arc<MemorySlots>,
    ) -> Result<Self, VfioError> {
        let host = config.host;
        let started = std::time::Instant::now();
        let group = precheck(host)?;
        let ops: Arc<dyn VfioOps> = context.container.clone();
        let device = VfioDevice::new(&sysfs_path(host), ops, false).map_err(|e| match e {
            vfio_ioctls::VfioError::OpenGroup(io, _) if io.raw_os_error() == Some(libc::EBUSY) => VfioError::GroupBusy { host, group },
            vfio_ioctls::VfioError::GroupViable => {
                VfioError::GroupNotViable { host, group, others: "the kernel says so (a device of the group is on a host driver)".into() }
            }
            e => VfioError::Step { host, step: "opening the device", err: e.to_string() },
        })?;
        let user = ContainerUser::new(context.clone());
        tracing::debug!(%host, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "VFIO device opened");
        context.ensure_dma_mapped(host)?;

        let mut raw = vec![0u8; LEGACY_CONFIG_SIZE];
        device.region_read(CONFIG_REGION_INDEX, &mut raw, 0);
        let u16_at = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
        let vendor_id = u16_at(0);
        if vendor_id == 0xffff || vendor_id == 0 {
            return Err(step_err(host, "reading its configuration space")(format!(
                "vendor id {vendor_id:#06x}: the device does not answer"
            )));
        }
        let ids = PciIds {
            vendor_id,
            device_id: u16_at(2),
            revision: raw[8],
            class: u32_at(8) >> 8,
            subsystem_vendor_id: u16_at(0x2c),
            subsystem_id: u16_at(0x2e),
        };
        let mut space = ConfigSpace::new(ids);

        // The MSI-X capability: vectors, and where the table and the PBA are.
        let msix_cap = find_capability(&raw, msix::CAP_ID_MSIX).map(|at| {
            let vectors = (u16_at(at + 2) & 0x7ff) + 1;
            // Each register: the BAR index in the low 3 bits, the offset above.
            let locate = |reg: u32, len: u64| ((reg & 7).to_le_bytes()[0], u64::from(reg & !7), len);
            let table = locate(u32_at(at + 4), u64::from(vectors) * msix::TABLE_ENTRY_SIZE);
            let pba = locate(u32_at(at + 8), u64::from(vectors).div_ceil(64) * 8);
            (vectors, table, pba, (u32_at(at + 4), u32_at(at + 8)))
        });

        // Memory BARs, each mmap'ed where VFIO allows, less the MSI-X pages.
        let mut bars = Vec::new();
        let mut index = 0u8;
        while index < 6 {
            let region = u32::from(index);
            let size = device.get_region_size(region);
            let reg = u32_at(0x10 + 4 * usize::from(index));
            let is_64bit = reg & 1 == 0 && (reg >> 1) & 3 == 2;
            let next = index + 1 + u8::from(is_64bit);
            if size == 0 {
                index = next;
                continue;
            }
            if reg & 1 == 1 {
                tracing::warn!(host = %host, "BAR {index} is an I/O port BAR: not passed through");
                index = next;
                continue;
            }
            let request = BarRequest { index, size, is_64bit, prefetchable: reg & 8 != 0 };
            space.add_bar(request).map_err(|e| step_err(host, "its BARs")(e.to_string()))?;
            let mut areas = Vec::new();
            if device.get_region_flags(region) & REGION_FLAG_MMAP != 0 && size >= PAGE_SIZE {
                let sparse: Option<Vec<(u64, u64)>> = device.get_region_caps(region).iter().find_map(|c| match c {
                    VfioRegionInfoCap::SparseMmap(s) => Some(s.areas.iter().map(|a| (a.offset, a.size)).collect()),
                    _ => None,
                });
                let mut holes = Vec::new();
                if let Some((_, table, pba, _)) = msix_cap {
                    for (bar, off, len) in [table, pba] {
                        if bar == index {
                            holes.push((off, len));
                        }
                    }
                }
                for (offset, len) in mappable_areas(size, &sparse.unwrap_or_else(|| vec![(0, size)]), &holes) {
                    let file_offset = device.get_region_offset(region) + offset;
                    let file_offset = libc::off_t::try_from(file_offset)
                        .map_err(|_| step_err(host, "mapping a BAR")(format!("offset {file_offset:#x}")))?;
                    let len_usize = usize::try_from(len).map_err(|_| step_err(host, "mapping a BAR")(format!("size {len:#x}")))?;
                    // SAFETY: a fresh shared mapping of the device fd's BAR range; the
                    // pointer is checked, owned by this device and unmapped in Drop.
                    let host_ptr = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            len_usize,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_SHARED,
                            device.as_raw_fd(),
                            file_offset,
                        )
                    };
                    if host_ptr == libc::MAP_FAILED {
                        let err = std::io::Error::last_os_error();
                        return Err(step_err(host, "mmap'ing a BAR")(format!("BAR {index} +{offset:#x} ({len:#x} bytes): {err}")));
                    }
                    areas.push(MappedArea { offset, size: len, len: len_usize, host: host_ptr.cast(), slot: None });
                }
            }
            tracing::debug!(host = %host, "BAR {index}: {size:#x} bytes, {} mmap'ed piece(s)", areas.len());
            bars.push(Bar { request, areas });
            index = next;
        }

        let msix = match msix_cap {
            Some((vectors, table, pba, (table_reg, pba_reg))) => {
                let available = device.get_irq_info(MSIX_IRQ_INDEX).map_or(0, |i| i.count);
                if u32::from(vectors) > available {
                    return Err(step_err(host, "its MSI-X vectors")(format!("{vectors} in config space, vfio-pci offers {available}")));
                }
                if !bars.iter().any(|b| b.request.index == table.0) || !bars.iter().any(|b| b.request.index == pba.0) {
                    return Err(step_err(host, "its MSI-X capability")(format!(
                        "table in BAR {}, PBA in BAR {}: not both memory BARs",
                        table.0, pba.0
                    )));
                }
                let cap = msix::add_capability_at(&mut space, vectors, (table.0, table_reg & !7), (pba.0, pba_reg & !7))
                    .map_err(|e| step_err(host, "its MSI-X capability")(e.to_string()));
                let group = interrupts.msi_group(vectors).map_err(|e| step_err(host, "its MSI-X vectors")(e.to_string()));
                Some(Msix { cap: cap?, table, pba, config: MsixConfig::new(vectors, group?), on_device: false })
            }
            None => {
                tracing::warn!(host = %host, "the device has no MSI-X capability: it cannot interrupt the guest");
                None
            }
        };
        tracing::info!(
            host = %host,
            "VFIO device {:04x}:{:04x}, {} BAR(s), {} MSI-X vector(s)",
            ids.vendor_id,
            ids.device_id,
            bars.len(),
            msix.as_ref().map_or(0, |m| m.config.vectors())
        );
        Ok(Self { host, device, config: space, bars, msix, slots, _container: user })
    }

    /// The guest changed the command register: memory decode and bus mastering go
    /// to the device (INTx stays disabled: there is no INTx here).
    fn forward_command(&self) {
        let mut current = [0u8; 2];
        self.device.region_read(CONFIG_REGION_INDEX, &mut current, REG_COMMAND as u64);
        let keep = COMMAND_MEMORY | COMMAND_BUS_MASTER;
        let command = (u16::from_le_bytes(current) & !keep) | (self.config.command() & keep) | COMMAND_INTX_DISABLE;
        self.device.region_write(CONFIG_REGION_INDEX, &command.to_le_bytes(), REG_COMMAND as u64);
    }

    /// The guest wrote the MSI-X message control: the state follows, and vfio-pci
    /// gets (or drops) the vectors' eventfds when MSI-X is turned on (or off).
    fn msix_control_written(&mut self) {
        let host = self.host;
        let Some(m) = self.msix.as_mut() else { return };
        let control = self.config.u16_at(m.cap + 2);
        m.config.set_control(control);
        if m.config.enabled() && !m.on_device {
            // Every vector's eventfd, in order, or none: a gap would shift the rest.
            let fds: Option<Vec<_>> = (0..m.config.vectors()).map(|v| m.config.group().notifier(v)).collect();
            let Some(fds) = fds else {
                crate::guest_warn!(host = %host, "enabling MSI-X: a vector has no eventfd");
                return;
            };
            match self.device.enable_msix(fds.iter().collect()) {
                Ok(()) => m.on_device = true,
                Err(e) => crate::guest_warn!(host = %host, "enabling MSI-X on the device: {e}"),
            }
        } else if !m.config.enabled() && m.on_device {
            if let Err(e) = self.device.disable_msix() {
                crate::guest_warn!(host = %host, "disabling MSI-X on the device: {e}");
            }
            m.on_device = false;
        }
    }
}

impl VfioPciDevice {
    /// Takes every BAR out of the guest's KVM slots (they stay on the MMIO bus,
    /// trapped); a slot that cannot be removed keeps its mapping.
    fn remove_slots(&mut self) {
        for bar in &mut self.bars {
            for area in &mut bar.areas {
                if let Some(slot) = area.slot {
                    match self.slots.unmap(slot) {
                        Ok(()) => area.slot = None,
                        Err(e) => crate::guest_warn!(host = %self.host, "BAR {}: {e}", bar.request.index),
                    }
                }
            }
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(usize::from(offset), data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        let offset = usize::from(offset);
        let decoding = self.config.command() & COMMAND_MEMORY != 0;
        self.config.write(offset, data);
        if crate::pci::config::overlaps(offset, data.len(), REG_COMMAND, 2) {
            // Decode going off: vfio-pci revokes the BAR mappings, so the guest must
            // stop reaching them through KVM first (else its next access faults the
            // vCPU). The root complex unmaps the BARs right after; this is earlier.
            if decoding && self.config.command() & COMMAND_MEMORY == 0 {
                self.remove_slots();
            }
            self.forward_command();
        }
        if let Some(cap) = self.msix.as_ref().map(|m| m.cap) {
            if crate::pci::config::overlaps(offset, data.len(), cap + 2, 2) {
                self.msix_control_written();
            }
        }
    }

    fn bars(&self) -> Vec<BarRequest> {
        self.bars.iter().map(|b| b.request).collect()
    }

    fn read_bar(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        if let Some(m) = &self.msix {
            if Msix::in_range(m.table, index, offset) {
                return m.config.read_table(offset - m.table.1, data);
            }
            if Msix::in_range(m.pba, index, offset) {
                return m.config.read_pba(offset - m.pba.1, data);
            }
        }
        self.device.region_read(u32::from(index), data, offset);
    }

    fn write_bar(&mut self, index: u8, offset: u64, data: &[u8]) {
        if let Some(m) = &mut self.msix {
            if Msix::in_range(m.table, index, offset) {
                return m.config.write_table(offset - m.table.1, data);
            }
            if Msix::in_range(m.pba, index, offset) {
                return;
            }
        }
        self.device.region_write(u32::from(index), data, offset);
    }

    fn bar_mapped(&mut self, index: u8, base: Option<u64>) {
        let host = self.host;
        let Some(bar) = self.bars.iter_mut().find(|b| b.request.index == index) else { return };
        for area in &mut bar.areas {
            if let Some(slot) = area.slot {
                match self.slots.unmap(slot) {
                    Ok(()) => area.slot = None,
                    Err(e) => {
                        // Still mapped there: not mapped anywhere else.
                        crate::guest_warn!(host = %host, "BAR {index}: {e}");
                        continue;
                    }
                }
            }
            if let Some(base) = base {
                // SAFETY: the area stays mmap'ed until Drop, which removes its slot first.
                match unsafe { self.slots.map(base + area.offset, area.size, area.host) } {
                    Ok(slot) => area.slot = Some(slot),
                    // The range stays trapped: slower, still correct.
                    Err(e) => crate::guest_warn!(host = %host, "BAR {index} +{:#x} at {:#x}: {e}", area.offset, base + area.offset),
                }
            }
        }
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        if self.msix.as_ref().is_some_and(|m| m.on_device) {
            let _ = self.device.disable_msix();
        }
        // Slots first; the mappings go as the areas drop.
        self.remove_slots();
        self.bars.clear();
        // Stops its DMA and leaves it as a fresh function for the host driver.
        self.device.reset();
        tracing::info!(host = %self.host, "VFIO device released");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_msix_pages_are_cut_out_of_the_mapped_bar() {
        // igbvf: BAR3 16 KiB with the table at 0 and the PBA at 0x2000.
        assert_eq!(mappable_areas(0x4000, &[(0, 0x4000)], &[(0, 48), (0x2000, 8)]), [(0x1000, 0x1000), (0x3000, 0x1000)]);
        // No holes in this BAR: all of it.
        assert_eq!(mappable_areas(0x4000, &[(0, 0x4000)], &[]), [(0, 0x4000)]);
        // A hole spanning pages, sparse areas, one area past the BAR's end clipped.
        assert_eq!(
            mappable_areas(0x10000, &[(0, 0x8000), (0xc000, 0x8000)], &[(0x1ff0, 0x20)]),
            [(0, 0x1000), (0x3000, 0x5000), (0xc000, 0x4000)]
        );
        // A BAR all table: nothing to map.
        assert!(mappable_areas(0x1000, &[(0, 0x1000)], &[(0, 0x800)]).is_empty());
    }

    #[test]
    fn capabilities_are_found_and_loops_do_not_hang() {
        let mut c = vec![0u8; 256];
        c[6] = STATUS_CAPABILITIES.to_le_bytes()[0];
        c[REG_CAPABILITIES] = 0x40;
        c[0x40] = 0x01; // PM
        c[0x41] = 0x50;
        c[0x50] = 0x11; // MSI-X
        c[0x51] = 0x00;
        assert_eq!(find_capability(&c, 0x11), Some(0x50));
        assert_eq!(find_capability(&c, 0x05), None);
        c[0x51] = 0x40; // a loop
        assert_eq!(find_capability(&c, 0x05), None);
        c[6] = 0;
        assert_eq!(find_capability(&c, 0x11), None, "no capability list without the status bit");
    }

    #[test]
    fn a_missing_device_is_named() {
        let host: PciAddress = "0000:7f:1f.7".parse().unwrap();
        let e = precheck(host).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VFIO device 0000:7f:1f.7: /sys/bus/pci/devices/0000:7f:1f.7 does not exist (no such PCI function on this host)"
        );
    }
}
