//! Message-signalled interrupts: how devices on the PCI bus interrupt the guest.
//!
//! Each device gets a group of MSI vectors ([`MsiInterruptGroup`]) from the VM's
//! [`InterruptManager`]. With KVM ([`GsiRouting`]) every vector is an eventfd that
//! KVM injects from (an irqfd) through a GSI whose route holds the vector's MSI
//! message, so a device thread raises an interrupt with one eventfd write, and a
//! vhost-user backend (virtiofsd) with the same eventfd, without the VMM. The MSI-X
//! capability ([`crate::pci::msix`]) programs the routes and, by attaching and
//! detaching the irqfd, the vectors' masks; VFIO devices will hand the same eventfds
//! to the kernel.
//!
//! Queue notifications go the other way with ioeventfds ([`IoEventRegistrar`]): KVM
//! signals an eventfd on a guest write to an address, without an exit to the VMM.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// One MSI write, as the guest programmed it (x86: address 0xFEExxxxx).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("no free GSI for an MSI route: all {0} are in use")]
    NoGsi(u32),
    #[error("KVM: {what}: {source}")]
    Kvm { what: String, source: kvm_ioctls::Error },
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("a GSI routing table of {0} entries could not be built")]
    RoutingTable(usize),
}

fn kvm_error(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> InterruptError {
    let what = what.into();
    move |source| InterruptError::Kvm { what, source }
}

/// The MSI vectors of one device.
pub trait MsiInterruptGroup: Send + Sync {
    /// Vector `vector` now carries `msg`, and may (`deliverable`) or may not (masked,
    /// or MSI-X off) reach the guest; what arrives while it may not stays pending
    /// with the group and goes out once it may.
    fn program(&self, vector: u16, msg: MsiMessage, deliverable: bool) -> Result<(), InterruptError>;
    /// Raises `vector`.
    fn fire(&self, vector: u16) -> Result<(), InterruptError>;
    /// An eventfd that raises `vector` when written, for a process that interrupts
    /// the guest on its own (a vhost-user backend); `None` where there is none.
    fn notifier(&self, vector: u16) -> Option<EventFd>;
}

/// Where devices get their vector groups.
pub trait InterruptManager: Send + Sync {
    fn msi_group(&self, vectors: u16) -> Result<Arc<dyn MsiInterruptGroup>, InterruptError>;
}

/// Where devices register their queue notification addresses.
pub trait IoEventRegistrar: Send + Sync {
    /// KVM signals `fd` on a guest write of any size to MMIO address `addr`.
    fn register(&self, fd: &EventFd, addr: u64) -> Result<(), InterruptError>;
    fn unregister(&self, fd: &EventFd, addr: u64) -> Result<(), InterruptError>;
}

impl IoEventRegistrar for VmFd {
    fn register(&self, fd: &EventFd, addr: u64) -> Result<(), InterruptError> {
        self.register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(kvm_error(format!("ioeventfd at {addr:#x}")))
    }

    fn unregister(&self, fd: &EventFd, addr: u64) -> Result<(), InterruptError> {
        self.unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_error(format!("removing the ioeventfd at {addr:#x}")))
    }
}

/// GSIs 0..24 are the in-kernel irqchip's (IOAPIC pins, and the PICs' below 16);
/// MSI routes take GSIs from here up.
pub const FIRST_MSI_GSI: u32 = 24;
/// The most GSIs used for MSI routes (KVM allows 4096 routes on x86).
pub const MAX_MSI_GSIS: u32 = 2048;

/// The VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole table, so it
/// always carries the irqchip routes KVM starts with (each GSI below 24 to the IOAPIC
/// pin of that number, and below 16 to the PIC pin too) besides the MSI routes.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    state: Mutex<RoutingState>,
}

#[derive(Default)]
struct RoutingState {
    msi: BTreeMap<u32, MsiMessage>,
    /// GSIs given back, reused before new ones.
    free: Vec<u32>,
    next: u32,
}

impl GsiRouting {
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(Self { vm, state: Mutex::new(RoutingState { next: FIRST_MSI_GSI, ..Default::default() }) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RoutingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many GSIs carry MSI routes.
    pub fn msi_in_use(&self) -> u32 {
        u32::try_from(self.lock().msi.len()).unwrap_or(u32::MAX)
    }

    fn allocate(&self) -> Result<u32, InterruptError> {
        let mut state = self.lock();
        let gsi = match state.free.pop() {
            Some(gsi) => gsi,
            None if state.next < FIRST_MSI_GSI + MAX_MSI_GSIS => {
                state.next += 1;
                state.next - 1
            }
            None => return Err(InterruptError::NoGsi(MAX_MSI_GSIS)),
        };
        state.msi.insert(gsi, MsiMessage::default());
        Ok(gsi)
    }

    fn release(&self, gsi: u32) {
        let mut state = self.lock();
        if state.msi.remove(&gsi).is_some() {
            state.free.push(gsi);
        }
        // The stale route is harmless (no irqfd points at it); it goes with the next commit.
    }

    /// Routes `gsi` to `msg`; the table goes to KVM only when it changed, and the
    /// route is kept only once KVM took it (a failed one is tried again next time).
    fn route(&self, gsi: u32, msg: MsiMessage) -> Result<(), InterruptError> {
        let mut state = self.lock();
        if state.msi.get(&gsi) == Some(&msg) {
            return Ok(());
        }
        let mut msi = state.msi.clone();
        msi.insert(gsi, msg);
        let entries = routing_entries(&msi);
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| InterruptError::RoutingTable(entries.len()))?;
        self.vm.set_gsi_routing(&table).map_err(kvm_error("KVM_SET_GSI_ROUTING"))?;
        state.msi = msi;
        Ok(())
    }
}

/// The whole table: the irqchip's default routes, then one MSI route per GSI.
fn routing_entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut entries = Vec::with_capacity(40 + msi.len());
    for gsi in 0..FIRST_MSI_GSI {
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            entries.push(irqchip(gsi, if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE }, gsi % 8));
        }
    }
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
        let (address_lo, address_hi) = crate::split_u64(m.address);
        e.u.msi.address_lo = address_lo;
        e.u.msi.address_hi = address_hi;
        e.u.msi.data = m.data;
        entries.push(e);
    }
    entries
}

impl InterruptManager for Arc<GsiRouting> {
    fn msi_group(&self, vectors: u16) -> Result<Arc<dyn MsiInterruptGroup>, InterruptError> {
        let mut group = IrqfdGroup { routing: self.clone(), vectors: Vec::with_capacity(usize::from(vectors)) };
        for _ in 0..vectors {
            // On error, dropping the group gives back what was taken.
            let gsi = self.allocate()?;
            let eventfd = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd);
            let eventfd = match eventfd {
                Ok(fd) => fd,
                Err(e) => {
                    self.release(gsi);
                    return Err(e);
                }
            };
            group.vectors.push(IrqfdVector { gsi, eventfd, attached: Mutex::new(false) });
        }
        Ok(Arc::new(group))
    }
}

struct IrqfdVector {
    gsi: u32,
    eventfd: EventFd,
    /// Whether KVM injects from the eventfd (the vector is deliverable).
    attached: Mutex<bool>,
}

/// A device's vectors as KVM irqfds, each on a GSI of its own.
struct IrqfdGroup {
    routing: Arc<GsiRouting>,
    vectors: Vec<IrqfdVector>,
}

impl MsiInterruptGroup for IrqfdGroup {
    fn program(&self, vector: u16, msg: MsiMessage, deliverable: bool) -> Result<(), InterruptError> {
        let Some(v) = self.vectors.get(usize::from(vector)) else { return Ok(()) };
        // Only a deliverable vector's route matters (no irqfd points at a masked
        // one's GSI), so a masked vector's message goes to KVM when it is unmasked:
        // a guest writes address and data one register at a time with the vector
        // masked, and each KVM_SET_GSI_ROUTING replaces the whole table (costly
        // under nesting: every vector programmed would cost several).
        let routed = if deliverable { self.routing.route(v.gsi, msg) } else { Ok(()) };
        let mut attached = v.attached.lock().unwrap_or_else(|e| e.into_inner());
        // A vector whose route failed is not delivered (it would go to the old one).
        let deliverable = deliverable && routed.is_ok();
        if deliverable && !*attached {
            // KVM injects at once if the eventfd was written while detached: that
            // is the pending interrupt going out on unmask.
            self.routing.vm.register_irqfd(&v.eventfd, v.gsi).map_err(kvm_error(format!("irqfd on GSI {}", v.gsi)))?;
            *attached = true;
        } else if !deliverable && *attached {
            self.routing.vm.unregister_irqfd(&v.eventfd, v.gsi).map_err(kvm_error(format!("removing the irqfd of GSI {}", v.gsi)))?;
            *attached = false;
        }
        routed
    }

    fn fire(&self, vector: u16) -> Result<(), InterruptError> {
        match self.vectors.get(usize::from(vector)) {
            Some(v) => v.eventfd.write(1).map_err(InterruptError::EventFd),
            None => Ok(()),
        }
    }

    fn notifier(&self, vector: u16) -> Option<EventFd> {
        self.vectors.get(usize::from(vector))?.eventfd.try_clone().ok()
    }
}

impl Drop for IrqfdGroup {
    fn drop(&mut self) {
        for v in &self.vectors {
            if *v.attached.lock().unwrap_or_else(|e| e.into_inner()) {
                let _ = self.routing.vm.unregister_irqfd(&v.eventfd, v.gsi);
            }
            self.routing.release(v.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_the_irqchip_routes_and_adds_one_msi_route_per_gsi() {
        let msi = BTreeMap::from([(24, MsiMessage { address: 0xfee0_1000, data: 0x41 }), (30, MsiMessage::default())]);
        let entries = routing_entries(&msi);
        // 24 IOAPIC pins, 16 PIC pins, 2 MSI routes.
        assert_eq!(entries.len(), 24 + 16 + 2);
        let chips: Vec<(u32, u32, u32)> = entries
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: irqchip entries carry the irqchip member of the union.
            .map(|e| (e.gsi, unsafe { e.u.irqchip.irqchip }, unsafe { e.u.irqchip.pin }))
            .collect();
        assert!(chips.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)) && chips.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(chips.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(chips.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)) && !chips.iter().any(|&(g, c, _)| g == 23 && c != KVM_IRQCHIP_IOAPIC));
        let route = entries.iter().find(|e| e.gsi == 24).unwrap();
        assert_eq!(route.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: MSI entries carry the msi member of the union.
        let m = unsafe { route.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 0, 0x41));
    }

    /// With this machine's KVM: a group's vectors get GSIs from 24 up, reused after
    /// the group goes; the routing table and the irqfds are accepted by KVM.
    #[test]
    fn groups_take_gsis_route_them_and_give_them_back() {
        let kvm = kvm_ioctls::Kvm::new().expect("KVM is needed for this test (/dev/kvm)");
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let routing = GsiRouting::new(vm);
        let group = routing.msi_group(3).unwrap();
        assert_eq!(routing.lock().msi.keys().copied().collect::<Vec<_>>(), [24, 25, 26]);
        // Masked: nothing goes to KVM yet; unmasked: the route is there.
        group.program(1, MsiMessage { address: 0xfee0_0000, data: 0x30 }, false).unwrap();
        assert_eq!(routing.lock().msi[&25], MsiMessage::default());
        group.program(1, MsiMessage { address: 0xfee0_0000, data: 0x30 }, true).unwrap();
        assert_eq!(routing.lock().msi[&25], MsiMessage { address: 0xfee0_0000, data: 0x30 });
        group.fire(1).unwrap();
        group.program(1, MsiMessage { address: 0xfee0_0000, data: 0x30 }, false).unwrap();
        assert!(group.notifier(2).is_some() && group.notifier(3).is_none());
        drop(group);
        assert!(routing.lock().msi.is_empty());
        let again = routing.msi_group(1).unwrap();
        assert_eq!(routing.lock().msi.keys().copied().collect::<Vec<_>>(), [26], "a freed GSI is reused");
        drop(again);
    }
}
