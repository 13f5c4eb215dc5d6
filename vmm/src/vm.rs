//! A KVM virtual machine: guest memory registered with KVM, the in-kernel irqchip
//! and PIT, the TSS and identity-map pages, and the PIO/MMIO buses its vCPUs use.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};
use std::os::fd::FromRawFd;

use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::bus::Bus;
use crate::layout;
use crate::vcpu::Vcpu;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0}, expected 12")]
    KvmApiVersion(i32),
    #[error("KVM: {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("guest memory: {0}")]
    Memory(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Which platform pieces KVM provides in-kernel.
#[derive(Clone, Copy, Debug)]
pub struct VmOptions {
    /// In-kernel PIC, IOAPIC and LAPIC, plus the PIT: what a Linux guest needs.
    pub irqchip: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self { irqchip: true }
    }
}

pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    pub pio: Bus,
    pub mmio: Bus,
}

fn ram_ranges(ram_bytes: u64) -> Result<Vec<(GuestAddress, usize)>, VmError> {
    layout::ram_ranges(ram_bytes)
        .into_iter()
        .map(|(start, len)| usize::try_from(len).map(|l| (GuestAddress(start), l)))
        .collect::<Result<_, _>>()
        .map_err(|_| VmError::Memory(format!("{ram_bytes} bytes do not fit this host's address space")))
}

/// Guest memory for `ram_bytes`, split around the 32-bit MMIO hole: anonymous private
/// memory, which only this process can map.
pub fn guest_memory(ram_bytes: u64) -> Result<GuestMemoryMmap, VmError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(ram_bytes)?).map_err(|e| VmError::Memory(e.to_string()))
}

/// Guest memory another process can map too, as vhost-user backends must: one memfd,
/// mapped MAP_SHARED, each range at its own offset (the file descriptor and offsets go
/// to the backend with SET_MEM_TABLE). Only used when a vhost-user device is
/// configured: anonymous private memory keeps transparent huge pages where the host
/// enables them only for anonymous memory (the default), and is the tested path of
/// every other guest.
pub fn shared_guest_memory(ram_bytes: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges = ram_ranges(ram_bytes)?;
    let mem_err = |what: &str, e: std::io::Error| VmError::Memory(format!("{what}: {e}"));
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vfvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(mem_err("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    let total: u64 = ranges.iter().map(|&(_, len)| len as u64).sum();
    file.set_len(total).map_err(|e| mem_err("sizing the guest memory file", e))?;
    let file = Arc::new(file);
    let mut offset = 0u64;
    let with_files: Vec<_> = ranges
        .into_iter()
        .map(|(start, len)| {
            let at = FileOffset::from_arc(file.clone(), offset);
            offset += len as u64;
            (start, len, Some(at))
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(with_files).map_err(|e| VmError::Memory(e.to_string()))
}

impl Vm {
    pub fn new(memory: GuestMemoryMmap, options: VmOptions) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::KvmApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(kvm_err("create the VM"))?;
        let tss = usize::try_from(layout::KVM_TSS_ADDRESS).expect("the TSS is below 4 GiB");
        fd.set_tss_address(tss).map_err(kvm_err("set the TSS address"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS).map_err(kvm_err("set the identity map address"))?;
        if options.irqchip {
            fd.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?;
            let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
        }
        for (slot, region) in (0u32..).zip(memory.iter()) {
            let host = memory.get_host_address(region.start_addr()).map_err(|e| VmError::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the mapping lives as long as `memory`, which the Vm owns; struct
            // fields drop in declaration order, so the VM fd goes before the memory
            // (device threads holding `shared_fd` clones are stopped before the Vm drops).
            unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("register guest memory"))?;
        }
        Ok(Self { kvm, fd: Arc::new(fd), memory, pio: Bus::new(), mmio: Bus::new() })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The VM fd for device threads (MSI delivery, ioeventfds, irqfds).
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// A vCPU with this VM's buses (as they are now: add devices first).
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, VmError> {
        let fd = self.fd.create_vcpu(id).map_err(kvm_err("create a vCPU"))?;
        Ok(Vcpu::new(fd, self.pio.clone(), self.mmio.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    #[test]
    fn shared_memory_is_one_memfd_with_each_range_at_its_offset() {
        // Above the 32-bit hole too: two ranges.
        let ram = layout::MMIO_HOLE_START + (16 << 20);
        let mem = shared_guest_memory(ram).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        let mut expected_offset = 0;
        for r in &regions {
            let at = r.file_offset().expect("file-backed");
            assert_eq!(at.start(), expected_offset);
            expected_offset += r.len();
            // What the guest writes is what another mapping of the file sees.
            let gpa = r.start_addr().unchecked_add(0x1234);
            let mark = 0xfeed_f00d_u32 ^ u32::try_from(at.start()).unwrap();
            mem.write_obj(mark, gpa).unwrap();
            let mut b = [0u8; 4];
            at.file().read_exact_at(&mut b, at.start() + 0x1234).unwrap();
            assert_eq!(u32::from_le_bytes(b), mark);
        }
        assert_eq!(expected_offset, ram);
        assert!(guest_memory(64 << 20).unwrap().iter().all(|r| r.file_offset().is_none()));
    }
}
