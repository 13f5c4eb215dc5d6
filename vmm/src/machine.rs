//! A whole microVM booting Linux directly: checks the inputs, builds guest memory and
//! the VM, loads the kernel, initramfs and boot tables, adds the legacy devices, runs
//! one thread per vCPU, serves the control API, and stops everything when the guest
//! powers off, resets or panics, the API forces a shutdown, or a vCPU fails.

use std::fs::File;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use vfvm_protocols::vmm_api::{ErrorCode, Request, Response, VmState};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi;
use crate::api::ApiServer;
use crate::boot::{self, MIN_MEMORY_BYTES};
use crate::bus::Bus;
use crate::cmos::{Cmos, CMOS_PORT};
use crate::cpu;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::elf;
use crate::exits::ExitCounters;
use crate::memory::{self, Backing, MemoryError};
use crate::mptable::{self, MAX_CPUS};
use crate::power::{AcpiPm1aControl, AcpiPm1aEvent, I8042, I8042_COMMAND_PORT, PM1A_CNT_PORT, PM1A_EVT_PORT};
use crate::serial::{Console, SerialDevice, COM1_IRQ, COM1_PORT};
use crate::smbios;
use crate::vcpu::{self, PauseGate, VcpuError, VcpuStop};
use crate::vfio::VfioConfig;
use crate::virtio::fs::{self, FsError, VhostUserFs};
use crate::virtio::vsock::Vsock;
use crate::vm::{Vm, VmError, VmOptions};

/// The largest guest accepted (a sanity bound, not a KVM limit).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub serial_log: Option<PathBuf>,
    pub serial_stdout: bool,
    /// Where to serve the control API (a Unix socket this process creates).
    pub api_socket: Option<PathBuf>,
    /// A virtio-vsock device, with hybrid vsock on the host.
    pub vsock: Option<VsockConfig>,
    /// A virtio-fs device served by a vhost-user backend (virtiofsd).
    pub fs: Option<FsConfig>,
    /// Host PCI functions passed through (bound to vfio-pci), plugged at boot after
    /// the virtio devices.
    pub vfio: Vec<VfioConfig>,
}

#[derive(Clone, Debug)]
pub struct FsConfig {
    /// The tag the guest mounts (`mount -t virtiofs TAG DIR`): 1 to 36 bytes.
    pub tag: String,
    /// The backend's vhost-user socket (virtiofsd --socket-path).
    pub socket: PathBuf,
    /// How long the backend may take to start listening: the VMM connects after the
    /// guest is set up, so its start overlaps the backend's. Zero: listening already.
    pub wait: std::time::Duration,
}

#[derive(Clone, Debug)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The Unix socket host programs connect to (`CONNECT <port>`); guest
    /// connections to host port P go to `<socket>_P`.
    pub socket: PathBuf,
}

/// How the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    PowerOff,
    Reset,
    Panic,
    /// The guest crashed with a triple fault.
    TripleFault,
    /// Stopped by the control API (a forced shutdown).
    Stopped,
}

impl GuestExit {
    /// The VMM process's exit status for it (1 is kept for VMM errors).
    pub fn exit_status(self) -> u8 {
        match self {
            GuestExit::PowerOff => 0,
            GuestExit::Reset => 2,
            GuestExit::Panic => 3,
            GuestExit::Stopped => 4,
            GuestExit::TripleFault => 5,
        }
    }
}

/// How long a pause waits for every vCPU to park.
const PAUSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the control API acts on: the vCPU threads and the power button.
struct VmControl {
    vcpus: u8,
    memory_mib: u64,
    stop: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
    /// The vCPU threads, to kick; emptied before they are joined.
    threads: Mutex<Vec<libc::pthread_t>>,
    forced: AtomicBool,
    pm1a_event: Arc<Mutex<AcpiPm1aEvent>>,
    /// For the exit counts in the status.
    exits: Arc<ExitCounters>,
    buses: [Bus; 2],
    /// The devices; taken out (and so torn down) once the vCPUs have stopped.
    devices: Mutex<Option<DeviceManager>>,
}

impl VmControl {
    fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for &thread in threads.iter() {
            // SAFETY: the list holds only threads not yet joined (it is emptied
            // before joining), and the kick handler is installed.
            unsafe { libc::pthread_kill(thread, vcpu::kick_signal()) };
        }
    }

    /// Stops every vCPU (each returns `Stopped`), parked ones included.
    fn stop_all(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.gate.release_all();
        self.kick_all();
    }

    fn state(&self) -> VmState {
        if self.stop.load(Ordering::SeqCst) {
            VmState::ShuttingDown
        } else if self.gate.is_closed() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    fn handle(&self, request: Request) -> Response {
        tracing::debug!(?request, "control API request");
        let state = self.state();
        match request {
            Request::Status => Response::Status {
                state,
                vcpus: u32::from(self.vcpus),
                memory_mib: self.memory_mib,
                vmm_version: env!("CARGO_PKG_VERSION").to_string(),
                exits: self.exits.stats(&[&self.buses[0], &self.buses[1]]),
                devices: self.devices.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(DeviceManager::devices).unwrap_or_default(),
            },
            Request::Pause => match state {
                VmState::Running => {
                    self.gate.close();
                    self.kick_all();
                    if self.gate.wait_parked(usize::from(self.vcpus), PAUSE_LIMIT) {
                        tracing::info!("paused");
                        Response::Done
                    } else {
                        self.gate.open();
                        Response::error(ErrorCode::Internal, format!("the vCPUs did not all stop within {PAUSE_LIMIT:?}"))
                    }
                }
                other => Response::error(ErrorCode::InvalidState, format!("pause: the VM is {other:?}")),
            },
            Request::Resume => match state {
                VmState::Paused => {
                    self.gate.open();
                    tracing::info!("resumed");
                    Response::Done
                }
                other => Response::error(ErrorCode::InvalidState, format!("resume: the VM is {other:?}")),
            },
            Request::Shutdown { force: true } => {
                tracing::info!("forced shutdown requested");
                self.forced.store(true, Ordering::SeqCst);
                self.stop_all();
                Response::Done
            }
            Request::Shutdown { force: false } => match state {
                VmState::Running => {
                    let seen = self.pm1a_event.lock().unwrap_or_else(|e| e.into_inner()).press_power_button();
                    if seen {
                        tracing::info!("ACPI power button pressed");
                        Response::Done
                    } else {
                        Response::error(
                            ErrorCode::InvalidState,
                            "the guest has not enabled the ACPI power button (no button driver loaded): shut down with force",
                        )
                    }
                }
                other => Response::error(ErrorCode::InvalidState, format!("graceful shutdown: the VM is {other:?}")),
            },
            Request::AddVfioDevice { id, .. } => {
                Response::error(ErrorCode::Unsupported, format!("device {id}: VFIO devices cannot be plugged yet"))
            }
            Request::RemoveDevice { id } => Response::error(ErrorCode::BadRequest, format!("no device {id:?} was added")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("--vcpus {0}: must be between 1 and {MAX_CPUS}")]
    Vcpus(u8),
    #[error("--memory {0}: too small, at least {min} MiB", min = MIN_MEMORY_BYTES >> 20)]
    MemoryTooSmall(u64),
    #[error("--memory {0}: too large, at most {MAX_MEMORY_MIB} MiB")]
    MemoryTooLarge(u64),
    #[error("kernel {}: {err}", path.display())]
    Kernel { path: PathBuf, err: String },
    #[error("initrd {}: {err}", path.display())]
    Initrd { path: PathBuf, err: String },
    #[error("vsock: {0}")]
    Vsock(String),
    #[error("--fs: {0}")]
    Fs(#[from] FsError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("serial log {}: {err}", path.display())]
    SerialLog { path: PathBuf, err: String },
    #[error("command line: {0}")]
    Cmdline(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("setting up the guest: {0}")]
    Setup(String),
    #[error("vCPU {id}: {err}")]
    Vcpu { id: u8, err: VcpuError },
    #[error("vCPU {0} halted with nothing to wake it")]
    Halted(u8),
}

fn setup<E: std::fmt::Display>(e: E) -> MachineError {
    MachineError::Setup(e.to_string())
}

/// Checks what can be checked before touching KVM; returns the RAM size in bytes.
pub fn validate(config: &MachineConfig) -> Result<u64, MachineError> {
    if config.vcpus == 0 || config.vcpus > MAX_CPUS {
        return Err(MachineError::Vcpus(config.vcpus));
    }
    if config.memory_mib > MAX_MEMORY_MIB {
        return Err(MachineError::MemoryTooLarge(config.memory_mib));
    }
    let ram = config.memory_mib << 20;
    if ram < MIN_MEMORY_BYTES {
        return Err(MachineError::MemoryTooSmall(config.memory_mib));
    }
    if let Some(f) = &config.fs {
        fs::validate_tag(&f.tag)?;
    }
    for (i, v) in config.vfio.iter().enumerate() {
        if config.vfio[..i].iter().any(|o| o.id == v.id || o.host == v.host) {
            return Err(MachineError::Setup(format!("--vfio {},id={}: the device or the id is given twice", v.host, v.id)));
        }
    }
    Ok(ram)
}

/// Boots the guest and runs it to the end.
pub fn run(config: &MachineConfig) -> Result<GuestExit, MachineError> {
    let ram = validate(config)?;
    let started = Instant::now();
    let kernel_err = |err: String| MachineError::Kernel { path: config.kernel.clone(), err };
    let mut kernel_file = File::open(&config.kernel).map_err(|e| kernel_err(e.to_string()))?;
    let initrd = match &config.initrd {
        Some(path) => {
            let initrd_err = |err: String| MachineError::Initrd { path: path.clone(), err };
            let file = File::open(path).map_err(|e| initrd_err(e.to_string()))?;
            let size = file.metadata().map_err(|e| initrd_err(e.to_string()))?.len();
            if size >= ram {
                return Err(initrd_err(format!("{size} bytes: larger than the guest's memory ({} MiB)", config.memory_mib)));
            }
            Some((path, file, size))
        }
        None => None,
    };
    let console_log = match &config.serial_log {
        Some(path) => Some(File::create(path).map_err(|e| MachineError::SerialLog { path: path.clone(), err: e.to_string() })?),
        None => None,
    };

    // The vsock socket is bound first: a bad path fails before any KVM work.
    let vsock = match &config.vsock {
        Some(v) => Some(Vsock::new(v.guest_cid, v.socket.clone()).map_err(|e| MachineError::Vsock(e.to_string()))?),
        None => None,
    };
    // A vhost-user backend maps guest memory itself: it must be shared (memfd).
    let backing = if config.fs.is_some() { Backing::Shared } else { Backing::Private };
    // Each setup step's time, at debug level: where a slow start goes.
    let step = |what: &str| tracing::debug!(ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "setup: {what}");
    let guest_memory = memory::guest_memory(ram, backing)?;
    step("guest memory");
    // The kernel and the initrd go into guest memory before KVM knows of it: their
    // copy is most of the setup time. An ELF vmlinux and the initrd are copied
    // together on several threads; a bzImage goes through linux-loader.
    let kernel_len = kernel_file.metadata().map_err(|e| kernel_err(e.to_string()))?.len();
    let elf_image = match elf::parse(&mut kernel_file, kernel_len, boot::HIMEM_START, boot::low_ram_top(ram)) {
        Ok(image) => Some(image),
        Err(elf::ElfError::NotElf) => None,
        Err(e) => return Err(kernel_err(e.to_string())),
    };
    let (kernel, initrd_range) = match elf_image {
        Some(image) => {
            let kernel = boot::LoadedKernel { entry: image.entry, end: image.end(), setup_header: None };
            let mut copies: Vec<elf::Copy> = image
                .segments
                .iter()
                .map(|s| elf::Copy { file: &kernel_file, path: &config.kernel, offset: s.offset, addr: s.addr, len: s.file_len })
                .collect();
            let initrd_range = match &initrd {
                Some((path, file, size)) => {
                    let addr = boot::initrd_placement(*size, &kernel, ram)
                        .map_err(|e| MachineError::Initrd { path: (*path).clone(), err: e.to_string() })?;
                    copies.push(elf::Copy { file, path, offset: 0, addr, len: *size });
                    Some((addr, *size))
                }
                None => None,
            };
            elf::copy_parallel(&guest_memory, &copies).map_err(|e| match (&e, &initrd) {
                (elf::ElfError::Copy { path, .. }, Some((initrd_path, _, _))) if path == *initrd_path => {
                    MachineError::Initrd { path: path.clone(), err: e.to_string() }
                }
                _ => kernel_err(e.to_string()),
            })?;
            (kernel, initrd_range)
        }
        None => {
            let kernel = boot::load_bzimage(&guest_memory, &mut kernel_file).map_err(|e| kernel_err(e.to_string()))?;
            let initrd_range = match initrd {
                Some((path, mut file, size)) => {
                    let addr = boot::load_initrd(&guest_memory, &mut file, size, &kernel)
                        .map_err(|e| MachineError::Initrd { path: path.clone(), err: e.to_string() })?;
                    Some((addr, size))
                }
                None => None,
            };
            (kernel, initrd_range)
        }
    };
    step("kernel and initrd loaded");
    let vm = Vm::new(guest_memory, VmOptions { irqchip: true })?;
    step("the VM");
    // From here the device manager owns the buses: on every way out it empties them,
    // which lets the devices go (their threads stop, their sockets are removed).
    let mut devices = DeviceManager::new(&vm, ram)?;
    let memory = vm.memory();
    let cmdline_len = boot::load_cmdline(memory, &config.cmdline, &kernel).map_err(|e| MachineError::Cmdline(e.to_string()))?;
    boot::write_boot_params(memory, &boot::boot_params(&kernel, cmdline_len, initrd_range, ram)).map_err(setup)?;
    acpi::write_acpi_tables(memory, config.vcpus).map_err(setup)?;
    step("boot tables written");
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

    // Legacy devices.
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
    for v in &config.vfio {
        devices.add_vfio(v)?;
    }

    // vCPUs.
    step("devices");
    let supported = cpu::vm_cpuid(vm.kvm()).map_err(setup)?;
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(PauseGate::default());
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

    let (tx, rx) = mpsc::channel();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut spawn_error = None;
    for (id, mut vcpu) in (0..config.vcpus).zip(vcpus) {
        let tx = tx.clone();
        let spawned = std::thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
            let result = vcpu.run();
            let _ = tx.send((id, result));
        });
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                spawn_error = Some(MachineError::Setup(format!("starting vCPU {id}'s thread: {e}")));
                break;
            }
        }
    }
    drop(tx);
    let control = Arc::new(VmControl {
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        stop: stop.clone(),
        gate,
        threads: Mutex::new(threads.iter().map(|h| h.as_pthread_t()).collect()),
        forced: AtomicBool::new(false),
        pm1a_event,
        exits: vm.exits().clone(),
        buses: [vm.pio.clone(), vm.mmio.clone()],
        devices: Mutex::new(Some(devices)),
    });
    let api = match (&config.api_socket, &spawn_error) {
        (Some(path), None) => {
            let handler_control = control.clone();
            match ApiServer::start(path, Box::new(move |request| handler_control.handle(request))) {
                Ok(server) => Some(server),
                Err(e) => {
                    spawn_error = Some(MachineError::Setup(e.to_string()));
                    None
                }
            }
        }
        _ => None,
    };
    tracing::debug!(setup_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "vCPUs running");

    // The first vCPU to stop decides; then stop the others and wait for them all.
    let first = if spawn_error.is_none() { rx.recv().ok() } else { None };
    control.stop_all();
    // No kicks once the threads may be gone: the API thread ends first.
    if let Some(api) = api {
        api.stop();
    }
    control.threads.lock().unwrap_or_else(|e| e.into_inner()).clear();
    for handle in threads {
        let _ = handle.join();
    }
    for (id, rest) in rx.try_iter() {
        tracing::debug!(vcpu = id, result = ?rest, "vCPU stopped");
    }
    serial.lock().unwrap_or_else(|e| e.into_inner()).console_mut().finish();
    // Devices go now, in the device manager's order, before guest memory.
    drop(control.devices.lock().unwrap_or_else(|e| e.into_inner()).take());
    if let Some(e) = spawn_error {
        return Err(e);
    }

    let (id, result) = first.ok_or_else(|| MachineError::Setup("every vCPU thread ended without a word".into()))?;
    let exit = match result.map_err(|err| MachineError::Vcpu { id, err })? {
        VcpuStop::PowerOff => GuestExit::PowerOff,
        VcpuStop::Panic => GuestExit::Panic,
        VcpuStop::Reset if panicked.load(Ordering::SeqCst) => GuestExit::Panic,
        VcpuStop::Reset => GuestExit::Reset,
        VcpuStop::TripleFault => GuestExit::TripleFault,
        VcpuStop::Stopped if control.forced.load(Ordering::SeqCst) => GuestExit::Stopped,
        VcpuStop::Halted | VcpuStop::Stopped => return Err(MachineError::Halted(id)),
    };
    tracing::info!(?exit, vcpu = id, secs = started.elapsed().as_secs_f64(), "guest stopped");
    Ok(exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MachineConfig {
        MachineConfig {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            memory_mib: 128,
            serial_log: None,
            serial_stdout: false,
            api_socket: None,
            vsock: None,
            fs: None,
            vfio: Vec::new(),
        }
    }

    #[test]
    fn bad_sizes_are_refused_with_the_option_named() {
        let e = validate(&MachineConfig { vcpus: 0, ..config() }).unwrap_err();
        assert_eq!(e.to_string(), "--vcpus 0: must be between 1 and 32");
        let e = validate(&MachineConfig { memory_mib: 8, ..config() }).unwrap_err();
        assert_eq!(e.to_string(), "--memory 8: too small, at least 32 MiB");
        assert!(matches!(validate(&MachineConfig { memory_mib: u64::MAX, ..config() }), Err(MachineError::MemoryTooLarge(_))));
        assert_eq!(validate(&config()).unwrap(), 128 << 20);
        let fs = |tag: &str| Some(FsConfig { tag: tag.into(), socket: "/nonexistent.sock".into(), wait: std::time::Duration::ZERO });
        let e = validate(&MachineConfig { fs: fs(&"x".repeat(37)), ..config() }).unwrap_err();
        assert_eq!(e.to_string(), format!("--fs: tag \"{}\": 37 bytes, at most 36", "x".repeat(37)));
        assert!(validate(&MachineConfig { fs: fs("ok"), ..config() }).is_ok());
    }

    #[test]
    fn a_missing_kernel_is_named() {
        let e = run(&config()).unwrap_err();
        assert!(e.to_string().starts_with("kernel /nonexistent/vmlinuz: "), "{e}");
    }
}
