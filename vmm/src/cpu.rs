//! x86_64 vCPU state for a 64-bit Linux entry: GDT, identity page tables, control
//! registers, segments, FPU, boot MSRs, CPUID and the LAPIC's LINT pins.

use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{BOOT_STACK_POINTER, ZERO_PAGE_START};

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
/// Four page directories (one per GiB) follow the PDPT.
pub const PD_START: u64 = 0xb000;
/// The identity map covers this much (2 MiB pages): all of low RAM and the hole.
pub const IDENTITY_MAPPED_GIB: u64 = 4;

// The tables sit between the boot stack and the command line.
const _: () = assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER && BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(PD_START + IDENTITY_MAPPED_GIB * 0x1000 <= crate::boot::CMDLINE_START);

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NW: u64 = 1 << 29;
const X86_CR0_CD: u64 = 1 << 30;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The boot GDT: null, 64-bit code (selector 0x8), data (0x10), TSS (0x18).
pub const GDT: [u64; 4] = [0, gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

/// A segment descriptor from its flags (access byte in bits 0..8, flags nibble in
/// 12..16), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// KVM's view of GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = u32::try_from((entry & 0xffff) | ((entry >> 32) & 0xf_0000)).expect("masked to 20 bits");
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// The identity page tables: PML4 -> one PDPT -> four PDs of 2 MiB pages.
pub fn page_tables() -> Vec<(u64, u64)> {
    let mut writes = vec![(PML4_START, PDPT_START | 0x3)];
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PD_START + gib * 0x1000;
        writes.push((PDPT_START + gib * 8, pd | 0x3));
        for i in 0..512 {
            // Present, writable, 2 MiB page.
            writes.push((pd + i * 8, ((gib * 512 + i) << 21) | 0x83));
        }
    }
    writes
}

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("writing the boot tables into guest memory: {0}")]
    Memory(String),
    #[error("KVM: {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("KVM set {set} of the {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
    #[error("{0}")]
    Other(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

/// Writes the GDT, an empty IDT and the page tables into guest memory.
pub fn write_boot_tables(memory: &GuestMemoryMmap) -> Result<(), CpuError> {
    let err = |e: vm_memory::GuestMemoryError| CpuError::Memory(e.to_string());
    for (i, entry) in GDT.iter().enumerate() {
        memory.write_obj(*entry, GuestAddress(GDT_START + i as u64 * 8)).map_err(err)?;
    }
    memory.write_obj(0u64, GuestAddress(IDT_START)).map_err(err)?;
    for (addr, value) in page_tables() {
        memory.write_obj(value, GuestAddress(addr)).map_err(err)?;
    }
    Ok(())
}

/// Long mode with paging, flat segments from [`GDT`].
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = u16::try_from(GDT.len() * 8 - 1).expect("a GDT of a few entries");
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET | X86_CR0_PG) & !(X86_CR0_CD | X86_CR0_NW);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs { rflags: 0x2, rip: entry, rsp: BOOT_STACK_POINTER, rbp: BOOT_STACK_POINTER, rsi: ZERO_PAGE_START, ..Default::default() }
}

pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

/// The MSRs a vCPU starts with: syscall MSRs cleared, fast strings on, MTRRs enabled
/// with write-back as the default type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index: u32, data: u64| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
}

const CPUID_HYPERVISOR: u32 = 1 << 31; // leaf 1, ECX
const CPUID_TSC_DEADLINE: u32 = 1 << 24; // leaf 1, ECX
const CPUID_HTT: u32 = 1 << 28; // leaf 1, EDX
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// The CPUID every vCPU of a VM starts from: what KVM lists as supported, plus the
/// TSC-deadline timer, which KVM emulates with its in-kernel LAPIC
/// (`KVM_CAP_TSC_DEADLINE_TIMER`) but leaves for the VMM to offer, as QEMU and
/// Firecracker do. With it Linux programs its LAPIC timer by TSC deadline; without it
/// Linux calibrates the LAPIC timer against the PIT for 100 ms of guest time at boot,
/// and under nested virtualization that calibration can fail its check and leave the
/// guest ticking on the PIT.
pub fn vm_cpuid(kvm_fd: &kvm_ioctls::Kvm) -> Result<CpuId, CpuError> {
    let mut cpuid = kvm_fd.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(kvm("get the supported CPUID"))?;
    if kvm_fd.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        offer_tsc_deadline(cpuid.as_mut_slice());
    }
    Ok(cpuid)
}

fn offer_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= CPUID_TSC_DEADLINE;
    }
}

/// Bits needed to number `n` logical processors.
fn id_bits(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

/// Adapts KVM's supported CPUID for vCPU `apic_id` of `vcpus`: the APIC id in every
/// leaf that reports it, a topology of `vcpus` single-thread cores in one package,
/// the hypervisor bit, and the KVM signature leaf pointing at the features leaf.
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], apic_id: u32, vcpus: u32) {
    let core_bits = id_bits(vcpus);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx |= CPUID_HYPERVISOR;
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
                // [15:8] CLFLUSH size in 8-byte units.
                e.ebx = (apic_id << 24) | (vcpus.min(255) << 16) | (8 << 8) | (e.ebx & 0xff);
                if vcpus > 1 {
                    e.edx |= CPUID_HTT;
                } else {
                    e.edx &= !CPUID_HTT;
                }
            }
            // Deterministic cache parameters: [31:26] cores per package - 1, [25:14]
            // logical processors sharing the cache - 1 (caches are per core here).
            4 if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & 0x3fff) | ((vcpus.saturating_sub(1).min(63)) << 26);
            }
            // Extended topology: SMT level (1 thread per core), then core level.
            0xb | 0x1f => {
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = vcpus;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = apic_id;
            }
            // AMD: [15:12] APIC id bits for cores, [7:0] cores - 1.
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (vcpus.saturating_sub(1) & 0xff);
            }
            // AMD extended APIC id, core id (one thread per core), node 0.
            0x8000_001e => {
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xffff) | (apic_id & 0xff);
                e.ecx &= !0x7ff;
            }
            KVM_CPUID_SIGNATURE => e.eax = e.eax.max(KVM_CPUID_FEATURES),
            _ => {}
        }
    }
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

// The register page is raw bytes, which the bindings type as `c_char`: the
// conversions reinterpret each byte, as the kernel stores it.
fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (dst, src) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *dst = src.to_ne_bytes()[0];
    }
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *dst = std::ffi::c_char::from_ne_bytes([src]);
    }
}

/// LINT0 delivers ExtINT (the PIC), LINT1 NMI, as a BIOS leaves them.
pub fn set_lint_modes(lapic: &mut kvm_lapic_state) {
    let with_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lint0 = lapic_reg(lapic, APIC_LVT_LINT0);
    set_lapic_reg(lapic, APIC_LVT_LINT0, with_mode(lint0, APIC_MODE_EXTINT));
    let lint1 = lapic_reg(lapic, APIC_LVT_LINT1);
    set_lapic_reg(lapic, APIC_LVT_LINT1, with_mode(lint1, APIC_MODE_NMI));
}

/// Sets up vCPU `id` of `vcpus`. The boot processor (id 0) gets the full 64-bit entry
/// state; the others wait for INIT/SIPI in the in-kernel LAPIC, so they only need
/// CPUID, MSRs and the LINT pins.
pub fn configure_vcpu(fd: &VcpuFd, supported_cpuid: &CpuId, id: u32, vcpus: u32, entry: u64) -> Result<(), CpuError> {
    let mut cpuid = supported_cpuid.clone();
    patch_cpuid(cpuid.as_mut_slice(), id, vcpus);
    fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;

    let wanted = boot_msrs();
    let msrs = Msrs::from_entries(&wanted).map_err(|e| CpuError::Other(format!("MSR list: {e:?}")))?;
    let set = fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
    if set != wanted.len() {
        return Err(CpuError::Msrs { set, wanted: wanted.len() });
    }

    let mut lapic = fd.get_lapic().map_err(kvm("get the LAPIC"))?;
    set_lint_modes(&mut lapic);
    fd.set_lapic(&lapic).map_err(kvm("set the LAPIC"))?;

    if id == 0 {
        fd.set_fpu(&boot_fpu()).map_err(kvm("set the FPU"))?;
        let sregs = fd.get_sregs().map_err(kvm("get sregs"))?;
        fd.set_sregs(&boot_sregs(sregs)).map_err(kvm("set sregs"))?;
        fd.set_regs(&boot_regs(entry)).map_err(kvm("set regs"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_bytes_and_segments() {
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT[3], 0x008f_8b00_0000_ffff);
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!((cs.selector, cs.type_, cs.l, cs.db, cs.present, cs.s, cs.g), (8, 0xb, 1, 0, 1, 1, 1));
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.l, ds.db), (0x10, 3, 0, 1));
        let tr = segment_from_gdt(GDT[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s, tr.unusable), (0x18, 0xb, 0, 0));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
        assert_eq!(gdt_entry(0x4092, 0x1234_5678, 0xabcde), 0x124a_9234_5678_bcde);
    }

    #[test]
    fn page_tables_identity_map_4gib_with_2mib_pages() {
        let pt: std::collections::HashMap<u64, u64> = page_tables().into_iter().collect();
        assert_eq!(pt.len(), 1 + 4 + 4 * 512);
        assert_eq!(pt[&PML4_START], 0xa003);
        assert_eq!(pt[&PDPT_START], 0xb003);
        assert_eq!(pt[&(PDPT_START + 24)], 0xe003);
        assert_eq!(pt[&PD_START], 0x83);
        assert_eq!(pt[&(PD_START + 8)], 0x20_0083);
        // The last 2 MiB below 4 GiB (LAPIC, IOAPIC live there).
        assert_eq!(pt[&(PD_START + 3 * 0x1000 + 511 * 8)], 0xffe0_0083);
        // The tables stay below the command line and do not overlap the zero page.
    }

    #[test]
    fn long_mode_sregs_and_entry_regs() {
        let s = boot_sregs(kvm_sregs { cr0: 0x6000_0010, ..Default::default() });
        assert_eq!(s.cr0, 0x8000_0011);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit), (0x500, 31, 0x520, 7));
        assert_eq!((s.cs.selector, s.ss.selector, s.tr.selector), (8, 0x10, 0x18));
        let r = boot_regs(0x10_0200);
        assert_eq!((r.rip, r.rsi, r.rsp, r.rflags), (0x10_0200, 0x7000, 0x8ff0, 2));
    }

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax: 0x1f, ebx: 0xffff_ffff, ecx: 0x0, edx: 0, ..Default::default() }
    }

    #[test]
    fn cpuid_is_patched_per_vcpu() {
        let mut e = vec![leaf(1, 0), leaf(4, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(0x8000_0008, 0), leaf(KVM_CPUID_SIGNATURE, 0)];
        e[5].eax = 0;
        patch_cpuid(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xff, 0xff);
        assert_ne!(e[0].ecx & CPUID_HYPERVISOR, 0);
        assert_ne!(e[0].edx & CPUID_HTT, 0);
        assert_eq!(e[1].eax >> 26, 3);
        assert_eq!((e[2].ebx, e[2].ecx, e[2].edx), (1, 0x100, 3));
        assert_eq!((e[3].eax, e[3].ebx, e[3].ecx, e[3].edx), (2, 4, 0x201, 3));
        assert_eq!(e[4].ecx, (2 << 12) | 3);
        assert_eq!(e[5].eax, KVM_CPUID_FEATURES);
        let mut one = vec![leaf(1, 0)];
        one[0].edx = CPUID_HTT;
        patch_cpuid(&mut one, 0, 1);
        assert_eq!(one[0].edx & CPUID_HTT, 0);
        assert_eq!(one[0].ebx >> 16, 1);
    }

    #[test]
    fn lint_pins_extint_and_nmi() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT_LINT0, 0x0001_0700);
        set_lint_modes(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT_LINT1), 0x400);
    }

    /// KVM's own supported CPUID (this machine's) has the leaves Linux needs from us,
    /// and the VM's CPUID offers the TSC-deadline timer where KVM emulates it.
    #[test]
    fn kvm_supported_cpuid_has_the_kvm_leaves() {
        let kvm = kvm_ioctls::Kvm::new().expect("KVM is needed for this test (/dev/kvm)");
        let mut cpuid = vm_cpuid(&kvm).unwrap();
        let deadline = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap().ecx & CPUID_TSC_DEADLINE != 0;
        assert_eq!(deadline, kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer));
        patch_cpuid(cpuid.as_mut_slice(), 1, 2);
        let find = |f: u32| cpuid.as_slice().iter().find(|e| e.function == f).copied();
        let sig = find(KVM_CPUID_SIGNATURE).expect("KVM signature leaf");
        assert_eq!([sig.ebx, sig.ecx, sig.edx].map(u32::to_le_bytes).concat(), b"KVMKVMKVM\0\0\0");
        assert!(find(KVM_CPUID_FEATURES).is_some());
        assert_eq!(find(1).unwrap().ebx >> 24, 1);
    }
}
