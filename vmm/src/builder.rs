//! Builds a microVM from its [`MachineConfig`], in order, each step able to fail
//! with the input it concerns named: the inputs opened and checked, guest memory
//! with the kernel and initramfs copied in, the VM, the boot tables, the legacy
//! devices, the PCI devices (handed to the device manager), the vCPUs.
//! [`crate::machine::run`] runs what this builds. (Firecracker's `builder.rs` splits
//! it the same way.)

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi;
use crate::boot::{self, LoadedKernel};
use crate::cmos::{Cmos, CMOS_PORT};
use crate::cpu;
use crate::device_manager::DeviceManager;
use crate::elf;
use crate::machine::{setup, MachineConfig, MachineError};
use crate::memory::{self, Backing};
use crate::mptable;
use crate::power::{AcpiPm1aControl, AcpiPm1aEvent, I8042, I8042_COMMAND_PORT, PM1A_CNT_PORT, PM1A_EVT_PORT};
use crate::serial::{Console, ConsoleLog, SerialDevice, COM1_IRQ, COM1_PORT};
use crate::smbios;
use crate::vcpu::{self, PauseGate, Vcpu};
use crate::virtio::fs::VhostUserFs;
use crate::virtio::net::{self, Net, Tap};
use crate::virtio::vsock::Vsock;
use crate::vm::{Vm, VmOptions};

/// A VM ready to run: its vCPUs configured but not started.
pub struct BuiltVm {
    pub vm: Vm,
    pub devices: DeviceManager,
    pub vcpus: Vec<Vcpu>,
    /// Set to stop every vCPU; the pause gate parks them.
    pub stop: Arc<AtomicBool>,
    pub gate: Arc<PauseGate>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Set when the guest's console showed a kernel panic.
    pub panicked: Arc<AtomicBool>,
    /// The ACPI power button's event block.
    pub pm1a_event: Arc<Mutex<AcpiPm1aEvent>>,
}

/// The files the VM is built from, opened before anything else is done.
struct Inputs {
    kernel: File,
    initrd: Option<(PathBuf, File, u64)>,
    console_log: Option<ConsoleLog>,
}

/// Builds the VM `config` describes, with `ram` bytes of guest memory (validated).
/// `started`: when the VMM began, for the set-up steps' times in the log.
pub fn build(config: &MachineConfig, ram: u64, started: Instant) -> Result<BuiltVm, MachineError> {
    let inputs = open_inputs(config, ram)?;
    // The vsock socket is bound first: a bad path fails before any KVM work.
    let vsock = match &config.vsock {
        Some(v) => Some(Vsock::new(v.guest_cid, v.socket.clone()).map_err(|e| MachineError::Vsock(e.to_string()))?),
        None => None,
    };
    // The taps are checked (and their descriptors owned) before any KVM work.
    let mut nets = Vec::with_capacity(config.net.len());
    for n in &config.net {
        let taps = n.tap_fds.iter().map(|&fd| Tap::from_inherited_fd(fd, net::HEADER_LEN)).collect::<Result<Vec<_>, _>>();
        let taps = taps.map_err(|e| MachineError::Net(e.to_string()))?;
        nets.push(Net::new(taps, n.mac, n.mtu, n.datapath).map_err(|e| MachineError::Net(e.to_string()))?);
    }
    // A vhost-user backend maps guest memory itself: it must be shared (memfd).
    let backing = if config.fs.is_some() { Backing::Shared } else { Backing::Private };
    // Each setup step's time, at debug level: where a slow start goes.
    let step = |what: &str| tracing::debug!(ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "setup: {what}");
    let guest_memory = memory::guest_memory(ram, backing)?;
    step("guest memory");
    let (kernel, initrd_range) = load_kernel_and_initrd(config, ram, &guest_memory, inputs.kernel, inputs.initrd)?;
    step("kernel and initrd loaded");
    if config.populate_memory {
        let memory = guest_memory.clone();
        let spawned = std::thread::Builder::new().name("populate".into()).spawn(move || match memory::populate(&memory) {
            Ok(took) => tracing::info!(ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX), "guest RAM populated"),
            Err(e) => tracing::warn!("{e}"),
        });
        if let Err(e) = spawned {
            tracing::warn!("populating guest RAM: no thread: {e}");
        }
    }
    let vm = Vm::new(guest_memory, VmOptions { irqchip: true })?;
    step("the VM");
    // From here the device manager owns the buses: on every way out it empties them,
    // which lets the devices go (their threads stop, their sockets are removed).
    let mut devices = DeviceManager::new(&vm, ram)?;
    write_boot_tables(config, &vm, &kernel, initrd_range, ram)?;
    step("boot tables written");
    let (serial, panicked, pm1a_event) = add_legacy_devices(config, &vm, inputs.console_log)?;

    // The virtio-fs backend, which may have been starting meanwhile (`wait`): a
    // missing or silent virtiofsd fails here, before any vCPU runs.
    let fs_device = match &config.fs {
        Some(f) => Some(VhostUserFs::new(&f.tag, &f.socket, f.wait)?),
        None => None,
    };
    // The PCI devices, before the vCPUs exist.
    if let Some(vsock) = vsock {
        let cid = vsock.guest_cid();
        let addr = devices.add_virtio("vsock", "virtio-vsock", Box::new(vsock))?;
        tracing::info!(pci = %addr, cid, "virtio-vsock");
    }
    if let Some(fs_device) = fs_device {
        let (tag, socket) = (fs_device.tag().to_string(), fs_device.socket().display().to_string());
        let addr = devices.add_virtio("fs", "virtio-fs", Box::new(fs_device))?;
        tracing::info!(pci = %addr, tag, socket, "virtio-fs (vhost-user)");
    }
    for (i, n) in nets.into_iter().enumerate() {
        let (tap, pairs) = (n.tap_name().to_string(), n.queue_pairs());
        let addr = devices.add_virtio(&format!("net{i}"), "virtio-net", Box::new(n))?;
        tracing::info!(pci = %addr, tap, pairs, "virtio-net");
    }
    for v in &config.vfio {
        devices.add_vfio(v)?;
    }
    step("devices");

    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(PauseGate::default());
    let vcpus = create_vcpus(config, &vm, &kernel, &stop, &gate)?;
    Ok(BuiltVm { vm, devices, vcpus, stop, gate, serial, panicked, pm1a_event })
}

/// Opens the kernel, the initramfs (no larger than guest memory) and the console log.
fn open_inputs(config: &MachineConfig, ram: u64) -> Result<Inputs, MachineError> {
    let kernel_err = |err: String| MachineError::Kernel { path: config.kernel.clone(), err };
    let kernel = File::open(&config.kernel).map_err(|e| kernel_err(e.to_string()))?;
    let initrd = match &config.initrd {
        Some(path) => {
            let initrd_err = |err: String| MachineError::Initrd { path: path.clone(), err };
            let file = File::open(path).map_err(|e| initrd_err(e.to_string()))?;
            let size = file.metadata().map_err(|e| initrd_err(e.to_string()))?.len();
            if size >= ram {
                return Err(initrd_err(format!("{size} bytes: larger than the guest's memory ({} MiB)", config.memory_mib)));
            }
            Some((path.clone(), file, size))
        }
        None => None,
    };
    let console_log = match &config.serial_log {
        Some(path) => Some(
            ConsoleLog::create(path, config.serial_log_limit)
                .map_err(|e| MachineError::SerialLog { path: path.clone(), err: e.to_string() })?,
        ),
        None => None,
    };
    Ok(Inputs { kernel, initrd, console_log })
}

/// Copies the kernel and the initramfs into guest memory, before KVM knows of it:
/// their copy is most of the setup time. An ELF vmlinux and the initrd are copied
/// together on several threads; a bzImage goes through linux-loader. Returns the
/// kernel and where the initrd went.
fn load_kernel_and_initrd(
    config: &MachineConfig,
    ram: u64,
    guest_memory: &GuestMemoryMmap,
    mut kernel_file: File,
    initrd: Option<(PathBuf, File, u64)>,
) -> Result<(LoadedKernel, Option<(u64, u64)>), MachineError> {
    let kernel_err = |err: String| MachineError::Kernel { path: config.kernel.clone(), err };
    let kernel_len = kernel_file.metadata().map_err(|e| kernel_err(e.to_string()))?.len();
    let elf_image = match elf::parse(&mut kernel_file, kernel_len, boot::HIMEM_START, boot::low_ram_top(ram)) {
        Ok(image) => Some(image),
        Err(elf::ElfError::NotElf) => None,
        Err(e) => return Err(kernel_err(e.to_string())),
    };
    let Some(image) = elf_image else {
        let kernel = boot::load_bzimage(guest_memory, &mut kernel_file).map_err(|e| kernel_err(e.to_string()))?;
        let initrd_range = match initrd {
            Some((path, mut file, size)) => {
                let addr = boot::load_initrd(guest_memory, &mut file, size, &kernel)
                    .map_err(|e| MachineError::Initrd { path: path.clone(), err: e.to_string() })?;
                Some((addr, size))
            }
            None => None,
        };
        return Ok((kernel, initrd_range));
    };
    let kernel = LoadedKernel { entry: image.entry, end: image.end(), setup_header: None };
    let mut copies: Vec<elf::Copy> = image
        .segments
        .iter()
        .map(|s| elf::Copy { file: &kernel_file, path: &config.kernel, offset: s.offset, addr: s.addr, len: s.file_len })
        .collect();
    let initrd_range = match &initrd {
        Some((path, file, size)) => {
            let addr =
                boot::initrd_placement(*size, &kernel, ram).map_err(|e| MachineError::Initrd { path: path.clone(), err: e.to_string() })?;
            copies.push(elf::Copy { file, path, offset: 0, addr, len: *size });
            Some((addr, *size))
        }
        None => None,
    };
    elf::copy_parallel(guest_memory, &copies).map_err(|e| match (&e, &initrd) {
        (elf::ElfError::Copy { path, .. }, Some((initrd_path, _, _))) if path == initrd_path => {
            MachineError::Initrd { path: path.clone(), err: e.to_string() }
        }
        _ => kernel_err(e.to_string()),
    })?;
    Ok((kernel, initrd_range))
}

/// The command line, the zero page, ACPI, SMBIOS, the MP table and the CPU tables.
fn write_boot_tables(
    config: &MachineConfig,
    vm: &Vm,
    kernel: &LoadedKernel,
    initrd_range: Option<(u64, u64)>,
    ram: u64,
) -> Result<(), MachineError> {
    let memory = vm.memory();
    let cmdline_len = boot::load_cmdline(memory, &config.cmdline, kernel).map_err(|e| MachineError::Cmdline(e.to_string()))?;
    boot::write_boot_params(memory, &boot::boot_params(kernel, cmdline_len, initrd_range, ram)).map_err(setup)?;
    acpi::write_acpi_tables(memory, config.vcpus).map_err(setup)?;
    smbios::write_smbios_tables(memory).map_err(setup)?;
    // For guests booted with acpi=off; Linux prefers the MADT when it has one.
    mptable::write_mptable(memory, config.vcpus).map_err(setup)?;
    cpu::write_boot_tables(memory).map_err(setup)?;
    tracing::info!(
        entry = format_args!("{:#x}", kernel.entry),
        initrd = ?initrd_range.map(|(a, s)| format!("{a:#x}+{s:#x}")),
        "loaded {}",
        config.kernel.display()
    );
    Ok(())
}

type LegacyDevices = (Arc<Mutex<SerialDevice>>, Arc<AtomicBool>, Arc<Mutex<AcpiPm1aEvent>>);

/// COM1 (on an irqfd), the CMOS/RTC, the i8042's reset line and the ACPI PM1a
/// blocks (the power button raises the SCI).
fn add_legacy_devices(config: &MachineConfig, vm: &Vm, console_log: Option<ConsoleLog>) -> Result<LegacyDevices, MachineError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(setup)?;
    vm.fd().register_irqfd(&serial_irq, COM1_IRQ).map_err(setup)?;
    let console = Console::new(console_log, config.serial_stdout);
    let panicked = console.panicked();
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console)));
    vm.pio.insert(COM1_PORT, 8, "serial COM1", serial.clone()).map_err(setup)?;
    vm.pio.insert(CMOS_PORT, 2, "CMOS/RTC", Arc::new(Mutex::new(Cmos::default()))).map_err(setup)?;
    vm.pio.insert(I8042_COMMAND_PORT, 1, "i8042 (reset)", Arc::new(Mutex::new(I8042))).map_err(setup)?;
    let sci_vm = vm.shared_fd();
    let sci = Box::new(move |level: bool| {
        if let Err(e) = sci_vm.set_irq_line(u32::from(acpi::SCI_IRQ), level) {
            tracing::warn!("SCI line: {e}");
        }
    });
    let pm1a_event = Arc::new(Mutex::new(AcpiPm1aEvent::new(sci)));
    vm.pio.insert(PM1A_EVT_PORT, 4, "ACPI PM1a event", pm1a_event.clone()).map_err(setup)?;
    vm.pio.insert(PM1A_CNT_PORT, 2, "ACPI PM1a control", Arc::new(Mutex::new(AcpiPm1aControl))).map_err(setup)?;
    Ok((serial, panicked, pm1a_event))
}

/// One vCPU per `config.vcpus`, with KVM's CPUID and the boot state at the kernel's
/// entry, each watching `stop` and `gate`; and the signal handler that kicks them.
fn create_vcpus(
    config: &MachineConfig,
    vm: &Vm,
    kernel: &LoadedKernel,
    stop: &Arc<AtomicBool>,
    gate: &Arc<PauseGate>,
) -> Result<Vec<Vcpu>, MachineError> {
    let supported = cpu::vm_cpuid(vm.kvm()).map_err(setup)?;
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let mut vcpu = vm.create_vcpu(u64::from(id))?;
        cpu::configure_vcpu(vcpu.fd(), &supported, u32::from(id), u32::from(config.vcpus), kernel.entry)
            .map_err(|e| MachineError::Setup(format!("vCPU {id}: {e}")))?;
        vcpu.set_stop_flag(stop.clone());
        vcpu.set_pause_gate(gate.clone());
        vcpus.push(vcpu);
    }
    vcpu::install_kick_handler().map_err(setup)?;
    Ok(vcpus)
}
