//! virtio-vsock end to end: a Linux guest under `vfvm-vmm` talks to host programs
//! over hybrid vsock, both ways, several streams at once, every byte checked on
//! both ends. Runs inside the lab's L2 (`cargo xtask test`), with VFVM_LAB_KERNEL
//! and VFVM_LAB_PROBE_INITRD, whose /init runs `vfvm-lab guest vsock-probe`.
//!
//! - guest-initiated: the guest connects to host port 5000; the VMM forwards each
//!   stream to `<vsock socket>_5000`, where this test echoes it (checking it first);
//! - host-initiated: once the guest says it listens on 5001, this test connects to
//!   the vsock socket, sends `CONNECT 5001\n`, expects `OK <port>\n`, then sends a
//!   stream the guest checks and echoes back, and checks the echo.
//!
//! Then the control API: status while the guest runs, and a graceful shutdown: the
//! VMM presses the ACPI power button, the guest's button driver reports it (the probe
//! waits for KEY_POWER on its input device) and the guest powers off: exit status 0.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfvm_protocols::vmm_api::{Request, Response, VmState, VmmClient};

mod common;

const BOUND: Duration = Duration::from_secs(300);
const IO_LIMIT: Duration = Duration::from_secs(300);
const STREAMS: u64 = 3;
const BYTES: u64 = 2 << 20;
const HOST_PORT: u32 = 5000;
const GUEST_PORT: u32 = 5001;
const MARKER: &str = "@@vfvm-l3@@";

/// The probe's pattern (tests/lab/src/probe.rs): byte `offset` of stream `id`.
fn pattern_byte(id: u64, offset: u64) -> u8 {
    // The low byte of the mix.
    (offset ^ (offset >> 9) ^ (offset >> 17) ^ id.wrapping_mul(0x9d)).wrapping_mul(0x45).to_le_bytes()[0]
}

fn lab_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run this test in the lab (cargo xtask test)"))
}

/// Reads exactly `bytes` of stream `id`, checking each byte; echoes them if asked.
fn check(r: &mut UnixStream, id: u64, bytes: u64, mut echo: Option<&mut UnixStream>) -> Result<(), String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < bytes {
        let want = usize::try_from(bytes - off).unwrap_or(usize::MAX).min(buf.len());
        let n = r.read(&mut buf[..want]).map_err(|e| format!("stream {id}: read at {off}: {e}"))?;
        if n == 0 {
            return Err(format!("stream {id}: closed after {off} of {bytes} bytes"));
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern_byte(id, off + i as u64)) {
            return Err(format!("stream {id}: byte {} differs", off + i as u64));
        }
        if let Some(w) = echo.as_deref_mut() {
            w.write_all(&buf[..n]).map_err(|e| format!("stream {id}: echo at {off}: {e}"))?;
        }
        off += n as u64;
    }
    Ok(())
}

fn send(w: &mut UnixStream, id: u64, bytes: u64) -> Result<(), String> {
    let data: Vec<u8> = (0..bytes).map(|o| pattern_byte(id, o)).collect();
    w.write_all(&data).map_err(|e| format!("stream {id}: send: {e}"))
}

fn timeouts(s: &UnixStream) {
    s.set_read_timeout(Some(IO_LIMIT)).unwrap();
    s.set_write_timeout(Some(IO_LIMIT)).unwrap();
}

/// Serves the guest's streams to host port 5000: check and echo each.
fn echo_server(listener: UnixListener) -> JoinHandle<Vec<Result<u64, String>>> {
    std::thread::spawn(move || {
        let mut workers = Vec::new();
        for _ in 0..STREAMS {
            let Ok((mut s, _)) = listener.accept() else { break };
            workers.push(std::thread::spawn(move || {
                timeouts(&s);
                let mut id = [0u8; 8];
                s.read_exact(&mut id).map_err(|e| format!("reading a stream id: {e}"))?;
                let id = u64::from_le_bytes(id);
                let mut echo = s.try_clone().map_err(|e| e.to_string())?;
                check(&mut s, id, BYTES, Some(&mut echo)).map(|_| id)
            }));
        }
        workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err("panicked".into()))).collect()
    })
}

/// A host-initiated stream through the hybrid vsock handshake.
fn host_stream(socket: &Path, id: u64) -> Result<u32, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    timeouts(&s);
    s.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 32 {
        match s.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            other => return Err(format!("stream {id}: handshake answer cut short ({other:?}) after {line:?}")),
        }
    }
    let answer = String::from_utf8_lossy(&line).into_owned();
    let port: u32 = answer.strip_prefix("OK ").and_then(|p| p.parse().ok()).ok_or_else(|| format!("handshake answer {answer:?}"))?;
    s.write_all(&id.to_le_bytes()).map_err(|e| e.to_string())?;
    let mut writer = s.try_clone().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || send(&mut writer, id, BYTES));
    check(&mut s, id, BYTES, None)?;
    sender.join().unwrap_or_else(|_| Err("sender panicked".into()))?;
    Ok(port)
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_vsock_streams_both_ways_then_graceful_shutdown_over_the_api() {
    let kernel = lab_env("VFVM_LAB_KERNEL");
    let initrd = lab_env("VFVM_LAB_PROBE_INITRD");
    let dir = std::env::temp_dir().join(format!("vfvm-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vsock.sock");
    let api = dir.join("api.sock");
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", socket.display())).unwrap();
    let echoes = echo_server(listener);

    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 no_timer_check vfvm.power_button vfvm.probe=--streams,{STREAMS},--bytes,{BYTES},--host-port,{HOST_PORT},--listen-port,{GUEST_PORT}"
    );
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfvm-vmm"))
        .args(["--kernel", &kernel, "--initrd", &initrd, "--vcpus", "2", "--memory", "512", "--serial-stdout"])
        .args(["--cmdline".as_ref(), cmdline.as_ref() as &std::ffi::OsStr, "--vsock-socket".as_ref(), socket.as_os_str()])
        .args(["--api-socket".as_ref(), api.as_os_str()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vfvm-vmm");
    let (rx, _reader) = common::lines(child.stdout.take().unwrap());
    let (_vmm_log, _log_reader) = common::vmm_log(child.stderr.take().unwrap());

    let mut clients: Vec<JoinHandle<Result<u32, String>>> = Vec::new();
    let mut answers = Vec::new();
    let console = common::follow_console(&rx, &mut child, started, BOUND, |line| {
        if line.contains(&format!("{MARKER} probe listening")) {
            for id in 0..STREAMS {
                let socket = socket.clone();
                clients.push(std::thread::spawn(move || host_stream(&socket, 100 + id)));
            }
        }
        if line.contains(&format!("{MARKER} probe waiting for the power button")) {
            let mut c = VmmClient::connect(&api, IO_LIMIT).expect("connect to the control API");
            answers.push(c.call(Request::Status).expect("status"));
            answers.push(c.call(Request::Shutdown { force: false }).expect("graceful shutdown"));
        }
    });
    let status = child.wait().unwrap();
    println!("vfvm-vmm ended: {status}");
    let secs = started.elapsed().as_secs_f64();
    let has = |s: &str| console.iter().any(|l| l.contains(s));
    assert!(!clients.is_empty(), "the guest never listened; console:\n{}", console.join("\n"));
    for c in clients {
        let port = c.join().unwrap().unwrap_or_else(|e| panic!("host-initiated: {e}\nconsole:\n{}", console.join("\n")));
        assert!(port > 0);
    }
    let mut ids: Vec<u64> = echoes.join().unwrap().into_iter().map(|r| r.unwrap_or_else(|e| panic!("guest-initiated: {e}"))).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..STREAMS).collect::<Vec<_>>(), "each guest stream reached the host once");
    assert!(has("probe guest-initiated ok"), "the guest's verdict; console:\n{}", console.join("\n"));
    assert!(has("probe host-initiated ok"), "the guest's verdict; console:\n{}", console.join("\n"));
    assert!(has("probe exit 0"));
    assert!(matches!(answers.first(), Some(Response::Status { state: VmState::Running, vcpus: 2, memory_mib: 512, .. })), "{answers:?}");
    // Queue notifications are KVM ioeventfds: after 72 MiB of streams the device's
    // BAR has cost only the driver's setup (~150 accesses, measured in the lab), where
    // MMIO notifications added ~260 more exits in the same test.
    if let Some(Response::Status { exits, .. }) = answers.first() {
        let bar: u64 = exits.ranges.iter().filter(|r| r.device.ends_with(" BAR0")).map(|r| r.exits).sum();
        println!("exits to the VMM after the streams: {:?}; the vsock device's BAR0: {bar}", exits.reasons);
        assert!(bar > 0 && bar < 250, "the vsock BAR took {bar} exits: are queue notifications still MMIO exits? {exits:?}");
    }
    assert_eq!(answers.get(1), Some(&Response::Done), "the guest's button driver enabled the power button event");
    assert!(has("probe power button pressed"), "console:\n{}", console.join("\n"));
    assert_eq!(status.code(), Some(0), "the guest powered off");
    assert!(!socket.exists(), "the VMM removes its vsock socket at exit");
    assert!(!api.exists(), "the VMM removes its API socket at exit");
    println!("vsock: {STREAMS} streams each way, {} MiB per stream each direction, checked on both ends; VMM ran {secs:.1} s", BYTES >> 20);
    let _ = std::fs::remove_dir_all(&dir);
}
