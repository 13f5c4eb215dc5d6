//! The 16550 UART at 0x3f8 (COM1, IRQ 4), from vm-superio, with its output going to
//! a log file and/or stdout a line at a time. The console also watches the guest's
//! lines for a kernel panic: `Kernel panic - not syncing` marks the guest as
//! panicked (a reset that follows is reported as a panic), and `---[ end Kernel
//! panic` stops the VM at once. Power-off is not read from the console: the guest
//! asks for it through ACPI (PM1a_CNT, see [`crate::power`]).
//!
//! The guest decides how much it prints, so the log file is bounded
//! ([`ConsoleLog`]): at half the limit it is rotated to `<path>.1` (the older half
//! dropped), so the two files never hold more than the limit, and the newest lines
//! are always there.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
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

/// The smallest console log limit (two halves of a few lines each).
pub const MIN_LOG_LIMIT: u64 = 8 << 10;

/// The console's log file, rotated to `<path>.1` at half of `limit` bytes.
pub struct ConsoleLog {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    limit: u64,
}

impl ConsoleLog {
    /// Creates (truncates) `path`; `limit` (at least [`MIN_LOG_LIMIT`]) bounds it
    /// and its rotated half together.
    pub fn create(path: &Path, limit: u64) -> io::Result<Self> {
        let file = File::create(path)?;
        Ok(Self { path: path.to_path_buf(), file: Some(file), written: 0, limit: limit.max(MIN_LOG_LIMIT) })
    }

    /// The rotated half's path.
    pub fn rotated_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_os_string();
        name.push(".1");
        PathBuf::from(name)
    }

    fn write_line(&mut self, line: &[u8]) {
        let half = self.limit / 2;
        let len = u64::try_from(line.len()).unwrap_or(u64::MAX);
        if self.written.saturating_add(len) > half {
            self.rotate();
        }
        let Some(file) = self.file.as_mut() else { return };
        // A line is at most MAX_LINE bytes, far below half the smallest limit.
        let line = &line[..line.len().min(usize::try_from(half).unwrap_or(usize::MAX))];
        // The guest's console is best effort: a full disk must not stop the guest.
        if file.write_all(line).is_ok() {
            self.written += u64::try_from(line.len()).unwrap_or(u64::MAX);
        }
    }

    /// The current file becomes `<path>.1`, replacing the older half; a fresh one
    /// takes its place. If that fails, logging stops (the bound holds).
    fn rotate(&mut self) {
        self.file = None;
        let fresh = std::fs::rename(&self.path, Self::rotated_path(&self.path)).and_then(|()| File::create(&self.path));
        match fresh {
            Ok(f) => {
                self.file = Some(f);
                self.written = 0;
            }
            Err(e) => tracing::warn!(path = %self.path.display(), "console log rotation failed, the console is no longer logged: {e}"),
        }
    }

    fn flush(&mut self) {
        if let Some(f) = self.file.as_mut() {
            let _ = f.flush();
        }
    }
}

/// The UART's output: whole lines to a log file and/or stdout.
pub struct Console {
    log: Option<ConsoleLog>,
    stdout: bool,
    line: Vec<u8>,
    panicked: Arc<AtomicBool>,
    event: Option<ConsoleEvent>,
}

impl Console {
    pub fn new(log: Option<ConsoleLog>, stdout: bool) -> Self {
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
        if let Some(log) = self.log.as_mut() {
            log.write_line(&self.line);
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
        if let Some(log) = self.log.as_mut() {
            log.flush();
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
                crate::guest_warn!("serial: {e}");
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
        let console = Console::new(Some(ConsoleLog::create(&path, 1 << 20).unwrap()), false);
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

    /// A guest printing without end: the log and its rotated half never hold more
    /// than the limit, and the newest lines are in the log.
    #[test]
    fn the_log_is_bounded_and_keeps_the_newest_lines() {
        let dir = std::env::temp_dir().join(format!("vfvm-serial-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let limit = 64 << 10;
        let mut console = Console::new(Some(ConsoleLog::create(&path, limit).unwrap()), false);
        for i in 0..20_000u32 {
            writeln!(console, "line {i:05} {}", "x".repeat(80)).unwrap();
        }
        // A line with no end, longer than any line may be: cut at MAX_LINE.
        console.write_all(&vec![b'y'; 3 * MAX_LINE]).unwrap();
        drop(console);
        let (current, rotated) =
            (std::fs::read_to_string(&path).unwrap(), std::fs::read_to_string(ConsoleLog::rotated_path(&path)).unwrap());
        let total = (current.len() + rotated.len()) as u64;
        assert!(total <= limit && total > limit / 4, "{total} bytes in the two files");
        assert!(current.ends_with(&"y".repeat(MAX_LINE)), "the newest output is last");
        assert!(current.contains("line 19999 ") || rotated.contains("line 19999 "), "the last line is kept");
        assert!(!current.contains("line 00000 ") && !rotated.contains("line 00000 "), "the oldest is dropped");
        // The rotated half holds older lines than the current one, in order.
        let first = |text: &str| text.lines().find_map(|l| l.strip_prefix("line ")?.get(..5)?.parse::<u32>().ok());
        assert!(first(&rotated) < first(&current).or(Some(u32::MAX)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
