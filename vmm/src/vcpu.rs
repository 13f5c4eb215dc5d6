//! A vCPU's run loop: each exit goes to the bus device at the address, until the
//! guest powers off, resets, or the vCPU fails.

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::{Bus, BusAction};

/// Why a vCPU stopped running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked to reset (i8042, or a triple fault).
    Reset,
    /// HLT with interrupts that nothing will deliver (no in-kernel irqchip): only
    /// tiny test guests do this.
    Halted,
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
}

pub struct Vcpu {
    fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
}

impl Vcpu {
    pub fn new(fd: VcpuFd, pio: Bus, mmio: Bus) -> Self {
        Self { fd, pio, mmio }
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the guest until it stops. Accesses to addresses with no device read as
    /// all ones and are dropped on write, as on real hardware.
    pub fn run(&mut self) -> Result<VcpuStop, VcpuError> {
        loop {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                // A signal kicked the vCPU out (pause, shutdown): the caller decides.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(VcpuError::Run(e)),
            };
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
                VcpuExit::Shutdown => return Ok(VcpuStop::Reset),
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
            }
        }
    }
}
