//! The 16550 UART at 0x3f8 (COM1, IRQ 4), from vm-superio, with its output going to
//! a log file and/or stdout a line at a time. The console also watches the guest's
//! lines for a kernel panic: `Kernel panic - not syncing` marks the guest as
//! panicked (a reset that follows is reported as a panic), and `---[ end Kernel
//! panic` stops the VM at once. Power-off is not read from the console: the guest
//! asks for it through ACPI (PM1a_CNT, see [`crate::power`]).

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAction, BusDevice};

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const PANIC_MARKER: &str = "Kernel panic - not syncing";
pub const PANIC_END_MARKER: &str = "---[ end Kernel panic";
const MAX_LINE: usize = 4096;

/// Raises the UART's interrupt through a KVM irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// What a completed console line asks of the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleEvent {
    PanicEnd,
}

/// The UART's output: whole lines to a log file and/or stdout.
pub struct Console {
    log: Option<File>,
    stdout: bool,
    line: Vec<u8>,
    panicked: Arc<AtomicBool>,
    event: Option<ConsoleEvent>,
}

impl Console {
    pub fn new(log: Option<File>, stdout: bool) -> Self {
        Self { log, stdout, line: Vec::new(), panicked: Arc::new(AtomicBool::new(false)), event: None }
    }

    /// Set once the guest printed a kernel panic.
    pub fn panicked(&self) -> Arc<AtomicBool> {
        self.panicked.clone()
    }

    pub fn take_event(&mut self) -> Option<ConsoleEvent> {
        self.event.take()
    }

    fn emit(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        if text.contains(PANIC_MARKER) {
            self.panicked.store(true, Ordering::SeqCst);
        }
        if text.contains(PANIC_END_MARKER) {
            self.event = Some(ConsoleEvent::PanicEnd);
        }
        // The guest's console is best effort: a full disk or a closed stdout must
        // not stop the guest.
        if let Some(f) = self.log.as_mut() {
            let _ = f.write_all(&self.line);
        }
        if self.stdout {
            let mut out = io::stdout().lock();
            let _ = out.write_all(&self.line);
            let _ = out.flush();
        }
        self.line.clear();
    }

    /// Writes out a last partial line.
    pub fn finish(&mut self) {
        self.emit();
        if let Some(f) = self.log.as_mut() {
            let _ = f.flush();
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b == b'\r' {
                continue;
            }
            self.line.push(b);
            if b == b'\n' || self.line.len() >= MAX_LINE {
                self.emit();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Lines go out when complete; see `finish` for the last one.
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.finish();
    }
}

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Console>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, console: Console) -> Self {
        Self { serial: Serial::new(EventFdTrigger(interrupt), console) }
    }

    pub fn console_mut(&mut self) -> &mut Console {
        self.serial.writer_mut()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [first, rest @ ..]) = (u8::try_from(offset), data) {
            *first = self.serial.read(offset);
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.serial.write(offset, value) {
                tracing::warn!("serial: {e}");
            }
        }
        match self.serial.writer_mut().take_event() {
            Some(ConsoleEvent::PanicEnd) => BusAction::Panic,
            None => BusAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn type_line(dev: &mut SerialDevice, s: &str) -> Vec<BusAction> {
        s.bytes().map(|b| dev.write(0, &[b])).filter(|a| *a != BusAction::None).collect()
    }

    #[test]
    fn lines_reach_the_log_and_markers_are_seen() {
        let dir = std::env::temp_dir().join(format!("vfvm-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let console = Console::new(Some(File::create(&path).unwrap()), false);
        let panicked = console.panicked();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), console);
        // Enable the THR-empty interrupt: each byte written raises IRQ 4.
        dev.write(1, &[0x02]);
        assert!(type_line(&mut dev, "hello\r\n").is_empty());
        assert!(irq.read().unwrap() > 0);
        // LSR: transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
        assert!(type_line(&mut dev, "[ 1.0] Kernel panic - not syncing: test\n").is_empty());
        assert!(panicked.load(Ordering::SeqCst));
        assert_eq!(type_line(&mut dev, "---[ end Kernel panic - not syncing: test ]---\n"), [BusAction::Panic]);
        // Power-off comes through ACPI, not from what the guest prints.
        assert!(type_line(&mut dev, "[ 2.0] reboot: Power down\n").is_empty());
        assert!(type_line(&mut dev, "[ 2.0] reboot: System halted\n").is_empty());
        type_line(&mut dev, "partial");
        drop(dev);
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.starts_with("hello\n[ 1.0] Kernel panic"), "{log}");
        assert!(log.ends_with("System halted\npartial"), "{log}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
