//! Tiny hand-made "kernels" for running the whole `vfvm-vmm` process on this
//! machine's KVM (which runs tiny guests but not Linux).

#![allow(dead_code)] // each test binary includes this module and uses its own part

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

/// The lines `source` produces, as they come, on a channel that closes at its end.
/// Read to the end whether or not anyone listens, so the writer never blocks on a
/// full pipe.
pub fn lines<R: Read + Send + 'static>(source: R) -> (Receiver<String>, JoinHandle<()>) {
    forward_lines(source, false)
}

/// The VMM's log (its stderr), as [`lines`], each line also printed into the test's
/// captured output as it comes: a failed test shows it, and the lab's runner sees a
/// guest's triple fault there.
pub fn vmm_log<R: Read + Send + 'static>(stderr: R) -> (Receiver<String>, JoinHandle<()>) {
    forward_lines(stderr, true)
}

fn forward_lines<R: Read + Send + 'static>(source: R, print: bool) -> (Receiver<String>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    // The reader thread inherits the test's output capture.
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(source).lines().map_while(Result::ok) {
            if print {
                println!("vmm: {line}");
            }
            let _ = tx.send(line);
        }
    });
    (rx, reader)
}

/// Follows a guest's console until the VMM closes it: each line is printed, handed
/// to `on_line` and kept. Past `bound` (from `started`) the VMM is killed and the test
/// fails with the console so far. Returns every line.
pub fn follow_console(
    rx: &Receiver<String>,
    child: &mut std::process::Child,
    started: std::time::Instant,
    bound: Duration,
    mut on_line: impl FnMut(&str),
) -> Vec<String> {
    let mut console = Vec::new();
    loop {
        match rx.recv_timeout(bound.saturating_sub(started.elapsed())) {
            Ok(line) => {
                println!("guest: {line}");
                on_line(&line);
                console.push(line);
            }
            Err(RecvTimeoutError::Disconnected) => return console,
            Err(RecvTimeoutError::Timeout) => {
                // Where the VMM's threads wait tells a stuck guest (vCPUs in KVM_RUN)
                // from a stuck VMM (threads asleep in user space).
                let (threads, vcpus) = (thread_states(child.id()), vfvm_protocols::vcpu_threads::vcpu_threads(child.id()));
                let _ = child.kill();
                panic!(
                    "no end within {bound:?}; {}; the VMM's threads:\n{threads}\nconsole:\n{}",
                    vfvm_protocols::vcpu_threads::describe(&vcpus),
                    console.join("\n")
                );
            }
        }
    }
}

/// One line per thread of process `pid`: name, state, wait channel, then its kernel
/// stack where readable (root).
pub fn thread_states(pid: u32) -> String {
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(process {pid} is gone)");
    };
    let mut out = String::new();
    for task in tasks.flatten() {
        let dir = task.path();
        let stat = read(dir.join("stat"));
        // The state is the field after the parenthesised name.
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.split(' ').next().unwrap_or("?")).unwrap_or("?");
        let (name, wchan) = (read(dir.join("comm")), read(dir.join("wchan")));
        out += &format!("{} {} {state} wchan={wchan}\n", task.file_name().to_string_lossy(), name.trim());
        for frame in read(dir.join("stack")).lines() {
            out += &format!("    {frame}\n");
        }
    }
    out
}

/// SIGKILLs process `pid` unless dropped within `limit`: bounds a wait on a VMM that
/// might miss its stop and run forever.
pub struct KillAfter {
    done: Option<Sender<()>>,
    killer: Option<JoinHandle<()>>,
}

impl KillAfter {
    pub fn new(pid: u32, limit: Duration) -> Self {
        let (done, waiting) = mpsc::channel::<()>();
        let killer = std::thread::spawn(move || {
            // Dropping the guard disconnects the channel: only a timeout kills.
            if matches!(waiting.recv_timeout(limit), Err(RecvTimeoutError::Timeout)) {
                // SAFETY: plain kill(2) of the test's own child, not yet reaped (the
                // waiter drops this guard only after reaping it).
                unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGKILL) };
            }
        });
        Self { done: Some(done), killer: Some(killer) }
    }
}

impl Drop for KillAfter {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(k) = self.killer.take() {
            let _ = k.join();
        }
    }
}

const LOAD_ADDR: u64 = 0x20_0000;

/// `pause; jmp .-2`: runs until stopped.
pub const SPIN: &[u8] = &[0xf3, 0x90, 0xeb, 0xfc];
/// ACPI power-off: `mov dx, 0x604; mov ax, SLP_TYP 5 | SLP_EN; out dx, ax; hlt`.
pub const POWER_OFF: &[u8] = &[0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef, 0xf4];
/// i8042 reset: `mov al, 0xfe; out 0x64, al; hlt`.
pub const RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4];

/// Writes `text` to COM1 (`lea rsi, [rip+8]; mov ecx, len; mov dx, 0x3f8; rep outsb`),
/// then spins; the text follows the code.
pub fn print_then_spin(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0x48, 0x8d, 0x35];
    // rsi = address of the text: right after this 17-byte sequence (lea 7, mov ecx 5,
    // mov dx 4, rep outsb 2 = 18; plus the 4-byte spin).
    let after_lea: u32 = 18 - 7 + 4;
    code.extend_from_slice(&after_lea.to_le_bytes());
    code.push(0xb9);
    code.extend_from_slice(&u32::try_from(text.len()).unwrap().to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xf3, 0x6e]);
    code.extend_from_slice(SPIN);
    code.extend_from_slice(text);
    code
}

/// An ELF64 executable with one PT_LOAD segment holding `code` at its entry.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let code_off = 64 + 56;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"); // 64-bit, LSB, v1
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(LOAD_ADDR + code_off as u64).to_le_bytes()); // e_entry
    e.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
        e.extend_from_slice(&v.to_le_bytes());
    }
    let size = (code_off + code.len()) as u64;
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0, LOAD_ADDR, LOAD_ADDR, size, size, 0x1000] {
        // offset, vaddr, paddr, filesz, memsz, align
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(code);
    e
}

/// Waits for a line containing `needle` on `lines`, up to `limit`; returns it, or the
/// lines seen before the channel closed or the time ran out.
pub fn wait_for_line(lines: &Receiver<String>, needle: &str, limit: Duration) -> Result<String, Vec<String>> {
    let deadline = std::time::Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(line) if line.contains(needle) => return Ok(line),
            Ok(line) => seen.push(line),
            Err(_) => return Err(seen),
        }
    }
}

/// Starts virtiofsd serving `shared` on `socket` and waits (up to `limit`) until it
/// listens; returns it with its stderr lines. If it never listens, it is killed and
/// the test fails with what it printed.
pub fn start_virtiofsd(
    socket: &std::path::Path,
    shared: &std::path::Path,
    limit: Duration,
) -> (std::process::Child, Receiver<String>, JoinHandle<()>) {
    let mut child = std::process::Command::new(virtiofsd())
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", shared.display()))
        .args(["--cache=never", "--sandbox=none"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start virtiofsd");
    let (log, reader) = lines(child.stderr.take().expect("virtiofsd's stderr"));
    if let Err(seen) = wait_for_line(&log, "Waiting for vhost-user socket connection", limit) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("virtiofsd did not start listening: {seen:?}");
    }
    (child, log, reader)
}

/// The virtiofsd binary: on PATH, or where `cargo xtask install` puts it.
pub fn virtiofsd() -> std::path::PathBuf {
    let candidates =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join("virtiofsd")).collect::<Vec<_>>()).unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo/bin/virtiofsd"));
    candidates
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/local/bin/virtiofsd")])
        .chain(home)
        .find(|p| p.is_file())
        .expect("virtiofsd is needed: run `cargo xtask install`")
}
