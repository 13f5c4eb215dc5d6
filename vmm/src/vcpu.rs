//! A vCPU's run loop: each exit goes to the bus device at the address, until the
//! guest powers off, resets, panics, the vCPU fails, or the VMM asks it to stop.
//!
//! Stopping a vCPU from another thread: set its stop flag, then send its thread
//! [`kick_signal`]. The signal's handler sets `immediate_exit` in the vCPU's
//! `kvm_run`, so the vCPU leaves (or does not enter) KVM_RUN with EINTR whenever the
//! signal lands, and the loop then sees the flag: no window where a kick is lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::{Bus, BusAction};
use crate::exits::{ExitCounters, ExitReason};

/// Why a vCPU stopped running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked to reset (i8042, ACPI reset register, or KVM's reset event).
    Reset,
    /// The guest crashed: an exception while delivering a double fault (KVM's
    /// shutdown exit). Real hardware resets here; a VMM reports it as a crash.
    TripleFault,
    /// The guest kernel panicked (seen on its console).
    Panic,
    /// HLT with interrupts that nothing will deliver (no in-kernel irqchip): only
    /// tiny test guests do this.
    Halted,
    /// Its stop flag was set: another vCPU or the VMM stopped the VM.
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_RUN: {0}")]
    Run(kvm_ioctls::Error),
    #[error("the vCPU failed to enter the guest (hardware reason {0:#x})")]
    FailEntry(u64),
    #[error("KVM internal error")]
    Internal,
    #[error("unexpected exit: {0}")]
    Unexpected(String),
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(String),
}

thread_local! {
    /// The `kvm_run` of the vCPU running on this thread, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: one volatile store through this thread's pointer.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set by `Vcpu::run` on this thread to its mapped
        // kvm_run, and cleared before that mapping can go away.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Installs the kick handler (once per process); before any kick is sent.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.to_string()))
        .clone()
        .map_err(VcpuError::Signal)
}

/// Clears this thread's kvm_run pointer when the run loop ends.
struct RunPointerGuard;

impl Drop for RunPointerGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Where vCPUs park while the VM is paused. Pausing: [`PauseGate::close`], kick
/// every vCPU thread, then [`PauseGate::wait_parked`]; a kicked vCPU parks at the top
/// of its loop, outside KVM_RUN, until [`PauseGate::open`] or [`PauseGate::release_all`].
#[derive(Default)]
pub struct PauseGate {
    closed: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    parked: usize,
    /// Stopping: parked vCPUs leave and no vCPU parks again.
    released: bool,
}

impl PauseGate {
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn open(&self) {
        let _state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Lets every parked vCPU go for good (the VM is stopping).
    pub fn release_all(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.released = true;
        self.changed.notify_all();
    }

    /// Waits until `count` vCPUs are parked; false if that did not happen in `limit`.
    pub fn wait_parked(&self, count: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.parked < count && !state.released {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self.changed.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        state.parked >= count
    }

    /// Called by a vCPU thread: parks while the gate is closed.
    fn park(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.released {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while self.closed.load(Ordering::SeqCst) && !state.released {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
        self.changed.notify_all();
    }
}

pub struct Vcpu {
    fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
    stop: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
    exits: Arc<ExitCounters>,
}

impl Vcpu {
    pub fn new(fd: VcpuFd, pio: Bus, mmio: Bus, exits: Arc<ExitCounters>) -> Self {
        Self { fd, pio, mmio, stop: Arc::new(AtomicBool::new(false)), gate: Arc::default(), exits }
    }

    /// Shares a pause gate (one for the whole VM).
    pub fn set_pause_gate(&mut self, gate: Arc<PauseGate>) {
        self.gate = gate;
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Shares a stop flag (one for the whole VM, typically).
    pub fn set_stop_flag(&mut self, stop: Arc<AtomicBool>) {
        self.stop = stop;
    }

    /// Logs where a crashed guest was, so a triple fault can be told apart from a
    /// requested reset and traced to its code.
    fn log_crash_state(&self) {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            // KVM on AMD reinitializes the vCPU before it reports the shutdown (the
            // VMCB is undefined after one), so there is nothing left to show.
            (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 => {
                tracing::warn!("the guest triple-faulted (KVM reset the vCPU before reporting it, as it does on AMD: its state is gone)")
            }
            (Ok(r), Ok(s)) => tracing::warn!(
                rip = format_args!("{:#x}", r.rip),
                rsp = format_args!("{:#x}", r.rsp),
                rflags = format_args!("{:#x}", r.rflags),
                cs = format_args!("{:#x}", s.cs.selector),
                cr0 = format_args!("{:#x}", s.cr0),
                cr2 = format_args!("{:#x}", s.cr2),
                cr3 = format_args!("{:#x}", s.cr3),
                cr4 = format_args!("{:#x}", s.cr4),
                efer = format_args!("{:#x}", s.efer),
                idt = format_args!("{:#x}/{:#x}", s.idt.base, s.idt.limit),
                gs_base = format_args!("{:#x}", s.gs.base),
                "the guest triple-faulted"
            ),
            (regs, sregs) => tracing::warn!(
                regs = ?regs.err(),
                sregs = ?sregs.err(),
                "the guest triple-faulted; its registers could not be read"
            ),
        }
    }

    /// Runs the guest until it stops. Accesses to addresses with no device read as
    /// all ones and are dropped on write, as on real hardware.
    pub fn run(&mut self) -> Result<VcpuStop, VcpuError> {
        install_kick_handler()?;
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run_ptr));
        let _guard = RunPointerGuard;
        loop {
            if self.gate.is_closed() && !self.stop.load(Ordering::SeqCst) {
                self.gate.park();
            }
            if self.stop.load(Ordering::SeqCst) {
                return Ok(VcpuStop::Stopped);
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                // A kick (or any signal): clear immediate_exit first, then look at the
                // flag, so a kick that lands in between still stops the next KVM_RUN.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.exits.count(ExitReason::Interrupted);
                    self.fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => return Err(VcpuError::Run(e)),
            };
            self.exits.count(match &exit {
                VcpuExit::IoIn(..) => ExitReason::IoIn,
                VcpuExit::IoOut(..) => ExitReason::IoOut,
                VcpuExit::MmioRead(..) => ExitReason::MmioRead,
                VcpuExit::MmioWrite(..) => ExitReason::MmioWrite,
                VcpuExit::Hlt => ExitReason::Hlt,
                _ => ExitReason::Other,
            });
            let action = match exit {
                VcpuExit::IoOut(port, data) => self.pio.write(u64::from(port), data).unwrap_or(BusAction::None),
                VcpuExit::IoIn(port, data) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    BusAction::None
                }
                VcpuExit::MmioWrite(addr, data) => self.mmio.write(addr, data).unwrap_or(BusAction::None),
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    BusAction::None
                }
                VcpuExit::Hlt => return Ok(VcpuStop::Halted),
                VcpuExit::Shutdown => {
                    self.log_crash_state();
                    return Ok(VcpuStop::TripleFault);
                }
                VcpuExit::FailEntry(reason, _) => return Err(VcpuError::FailEntry(reason)),
                VcpuExit::InternalError => return Err(VcpuError::Internal),
                VcpuExit::SystemEvent(kind, _) => {
                    return match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Ok(VcpuStop::PowerOff),
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => Ok(VcpuStop::Reset),
                        other => Err(VcpuError::Unexpected(format!("system event {other}"))),
                    }
                }
                other => return Err(VcpuError::Unexpected(format!("{other:?}"))),
            };
            match action {
                BusAction::None => {}
                BusAction::PowerOff => return Ok(VcpuStop::PowerOff),
                BusAction::Reset => return Ok(VcpuStop::Reset),
                BusAction::Panic => return Ok(VcpuStop::Panic),
            }
        }
    }
}
