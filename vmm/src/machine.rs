//! A whole microVM booting Linux directly: checks the configuration, has the builder
//! ([`crate::builder`]) build the VM, runs one thread per vCPU, serves the control
//! API, and stops everything when the guest powers off, resets or panics, the API
//! forces a shutdown, or a vCPU fails.

use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use vfvm_protocols::vmm_api::{ErrorCode, Request, Response, VmState, DEFAULT_EJECT_TIMEOUT_MS, MAX_EJECT_TIMEOUT_MS};

use crate::api::ApiServer;
use crate::boot::MIN_MEMORY_BYTES;
use crate::builder::{self, BuiltVm};
use crate::bus::Bus;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::exits::ExitCounters;
use crate::memory::MemoryError;
use crate::mptable::MAX_CPUS;
use crate::power::AcpiPm1aEvent;
use crate::vcpu::{self, PauseGate, VcpuError, VcpuStop};
use crate::vfio::{VfioConfig, VfioError};
use crate::virtio::fs::{self, FsError};
use crate::vm::VmError;

/// The console log's bound unless `--serial-log-max` says otherwise.
pub const DEFAULT_SERIAL_LOG_LIMIT: u64 = 4 << 20;

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
    /// The most bytes the console log and its rotated half hold together.
    pub serial_log_limit: u64,
    /// Fault all guest RAM in, in the background while the guest boots: for a VM that
    /// will get VFIO devices later (their DMA mapping pins it all anyway).
    pub populate_memory: bool,
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
    /// virtio-net devices on taps handed to this process, plugged before the VFIO ones.
    pub net: Vec<NetConfig>,
}

/// A virtio-net device on a tap whose queue files this process inherited.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The tap's queue files (one per queue pair), as inherited descriptor numbers.
    pub tap_fds: Vec<i32>,
    /// The guest interface's MAC address.
    pub mac: [u8; 6],
    /// The MTU the guest is told (VIRTIO_NET_F_MTU); none: the driver's default.
    pub mtu: Option<u16>,
    pub datapath: crate::virtio::net::Datapath,
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
            Request::Status => {
                let (devices, resources) = match self.devices.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    Some(d) => (d.devices(), d.resources()),
                    None => Default::default(),
                };
                Response::Status {
                    state,
                    vcpus: u32::from(self.vcpus),
                    memory_mib: self.memory_mib,
                    vmm_version: env!("CARGO_PKG_VERSION").to_string(),
                    exits: self.exits.stats(&[&self.buses[0], &self.buses[1]]),
                    devices,
                    resources,
                }
            }
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
            Request::AddVfioDevice { id, host_pci_address, guest_slot } => {
                if state != VmState::Running {
                    return Response::error(
                        ErrorCode::InvalidState,
                        format!("add_vfio_device {id}: the VM is {state:?}; devices are plugged into a running VM"),
                    );
                }
                let config = VfioConfig { host: host_pci_address, id: id.clone(), slot: guest_slot };
                let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
                let Some(devices) = devices.as_mut() else {
                    return Response::error(ErrorCode::InvalidState, "the VM is shutting down");
                };
                match devices.hot_add_vfio(&config) {
                    Ok(addr) => Response::DeviceAdded { id, guest_pci_address: addr },
                    Err(e) => Response::error(device_error_code(&e), format!("add_vfio_device {id}: {e}")),
                }
            }
            Request::RemoveDevice { id, eject_timeout_ms } => {
                let limit = eject_timeout_ms.unwrap_or(DEFAULT_EJECT_TIMEOUT_MS);
                if limit > MAX_EJECT_TIMEOUT_MS {
                    return Response::error(
                        ErrorCode::BadRequest,
                        format!("remove_device {id}: eject_timeout_ms {limit}: at most {MAX_EJECT_TIMEOUT_MS}"),
                    );
                }
                if state != VmState::Running {
                    return Response::error(
                        ErrorCode::InvalidState,
                        format!("remove_device {id}: the VM is {state:?}; a paused guest cannot eject"),
                    );
                }
                let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
                let Some(devices) = devices.as_mut() else {
                    return Response::error(ErrorCode::InvalidState, "the VM is shutting down");
                };
                match devices.remove(&id, std::time::Duration::from_millis(u64::from(limit))) {
                    Ok(forced) => Response::DeviceRemoved { id, forced },
                    Err(e) => Response::error(device_error_code(&e), format!("remove_device {id}: {e}")),
                }
            }
        }
    }
}

/// The API's code for a device error: the request's fault, or the VMM's.
fn device_error_code(e: &DeviceError) -> ErrorCode {
    match e {
        DeviceError::Vfio(VfioError::Step { .. } | VfioError::NoVfio { .. }) | DeviceError::Install(_) | DeviceError::Virtio { .. } => {
            ErrorCode::Internal
        }
        _ => ErrorCode::BadRequest,
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
    #[error("--net: {0}")]
    Net(String),
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

pub(crate) fn setup<E: std::fmt::Display>(e: E) -> MachineError {
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

/// Boots the guest and runs it to the end: builds the VM ([`builder::build`]), runs
/// one thread per vCPU, serves the control API, and stops everything when the first
/// vCPU stops.
pub fn run(config: &MachineConfig) -> Result<GuestExit, MachineError> {
    let ram = validate(config)?;
    let started = Instant::now();
    let BuiltVm { vm, devices, vcpus, stop, gate, serial, panicked, pm1a_event } = builder::build(config, ram, started)?;

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
            serial_log_limit: DEFAULT_SERIAL_LOG_LIMIT,
            populate_memory: false,
            serial_stdout: false,
            api_socket: None,
            vsock: None,
            fs: None,
            vfio: Vec::new(),
            net: Vec::new(),
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
