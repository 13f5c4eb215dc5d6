//! virtio-fs end to end: a real virtiofsd serves a directory tree of this (L2) host;
//! a Linux guest under `vfvm-vmm --fs` mounts it, reports a digest of the whole tree
//! (one file 8 MiB and more, with a position-dependent pattern) that must equal the
//! one computed here, and writes a file back that this test then checks byte by byte.
//! Then a graceful shutdown over the control API (exit status 0), after which
//! virtiofsd must have ended on its own (the VMM closed the connection) and no socket
//! may be left behind. Runs inside the lab's L2 (`cargo xtask test`), with
//! VFVM_LAB_KERNEL and VFVM_LAB_PROBE_INITRD, whose /init runs
//! `vfvm-lab guest virtiofs-probe` (tests/lab/src/probe.rs) given
//! `vfvm.probe_cmd=virtiofs-probe`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vfvm_protocols::vmm_api::{Request, Response, VmmClient};

mod common;

const BOUND: Duration = Duration::from_secs(300);
const IO_LIMIT: Duration = Duration::from_secs(60);
const MARKER: &str = "@@vfvm-l3@@";
const TAG: &str = "labfs";
const BIG_BYTES: u64 = (8 << 20) + 4099;
const WRITE_NAME: &str = "from-guest.bin";
const WRITE_BYTES: u64 = (1 << 20) + 17;
/// The probe's stream id for the file it writes.
const WRITE_ID: u64 = 7;

/// The probe's pattern (tests/lab/src/probe.rs): byte `offset` of stream `id`.
fn pattern_byte(id: u64, offset: u64) -> u8 {
    // The low byte of the mix.
    (offset ^ (offset >> 9) ^ (offset >> 17) ^ id.wrapping_mul(0x9d)).wrapping_mul(0x45).to_le_bytes()[0]
}

fn pattern(id: u64, bytes: u64) -> Vec<u8> {
    (0..bytes).map(|o| pattern_byte(id, o)).collect()
}

fn fnv1a64_update(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The probe's tree digest: entries in sorted relative path order, `D <path>\n` for a
/// directory, `F <path> <size>\n` and the contents for a file.
fn tree_digest(root: &Path) -> (u64, usize, u64) {
    let mut entries = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let is_dir = e.file_type().unwrap().is_dir();
            if is_dir {
                todo.push(e.path());
            }
            entries.push((rel, is_dir, e.path()));
        }
    }
    entries.sort();
    let (mut h, mut files, mut bytes) = (0xcbf2_9ce4_8422_2325, 0, 0);
    for (rel, is_dir, path) in entries {
        if is_dir {
            h = fnv1a64_update(h, format!("D {rel}\n").as_bytes());
        } else {
            let data = std::fs::read(path).unwrap();
            h = fnv1a64_update(h, format!("F {rel} {}\n", data.len()).as_bytes());
            h = fnv1a64_update(h, &data);
            files += 1;
            bytes += data.len() as u64;
        }
    }
    (h, files, bytes)
}

/// Kills and reaps the child on drop unless it was waited for: a failing test leaves
/// no virtiofsd behind.
struct Reaped(Option<std::process::Child>);

impl Reaped {
    fn wait_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("waited once");
        let deadline = common::KillAfter::new(child.id(), limit);
        let status = child.wait().unwrap();
        drop(deadline);
        status
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn lab_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run this test in the lab (cargo xtask test)"))
}

/// The shared tree: small and empty files, nested directories, and the big one.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello from L2 over virtio-fs\n").unwrap();
    std::fs::write(root.join("sub/page.bin"), pattern(2, 4096)).unwrap();
    std::fs::write(root.join("sub/deeper/odd.bin"), pattern(3, 12345)).unwrap();
    std::fs::write(root.join("sub/deeper/empty"), b"").unwrap();
    std::fs::write(root.join("big.bin"), pattern(1, BIG_BYTES)).unwrap();
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_virtiofs_guest_reads_the_tree_writes_back_then_virtiofsd_ends_with_the_vmm() {
    let kernel = lab_env("VFVM_LAB_KERNEL");
    let initrd = lab_env("VFVM_LAB_PROBE_INITRD");
    let dir = std::env::temp_dir().join(format!("vfvm-virtiofs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let shared = dir.join("shared");
    make_tree(&shared);
    let (digest, files, bytes) = tree_digest(&shared);
    let socket = dir.join("virtiofsd.sock");
    let api = dir.join("api.sock");

    let (virtiofsd, backend_log, _backend_reader) = common::start_virtiofsd(&socket, &shared, IO_LIMIT);
    let mut virtiofsd = Reaped(Some(virtiofsd));

    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 no_timer_check vfvm.power_button vfvm.probe_cmd=virtiofs-probe \
         vfvm.probe=--tag,{TAG},--write,{WRITE_NAME},--write-bytes,{WRITE_BYTES}"
    );
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfvm-vmm"))
        .args(["--kernel", &kernel, "--initrd", &initrd, "--vcpus", "2", "--memory", "512", "--serial-stdout"])
        .args(["--cmdline", &cmdline])
        .arg("--fs")
        .arg(format!("tag={TAG},socket={}", socket.display()))
        .arg("--api-socket")
        .arg(&api)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vfvm-vmm");
    let vmm_deadline = common::KillAfter::new(child.id(), BOUND + IO_LIMIT);
    let (rx, _reader) = common::lines(child.stdout.take().unwrap());
    let (_vmm_log, _log_reader) = common::vmm_log(child.stderr.take().unwrap());

    let mut shutdown = None;
    let console = common::follow_console(&rx, &mut child, started, BOUND, |line| {
        if line.contains(&format!("{MARKER} probe waiting for the power button")) {
            let mut c = VmmClient::connect(&api, IO_LIMIT).expect("connect to the control API");
            shutdown = Some(c.call(Request::Shutdown { force: false }).expect("graceful shutdown"));
        }
    });
    let status = child.wait().unwrap();
    println!("vfvm-vmm ended: {status}");
    drop(vmm_deadline);
    let secs = started.elapsed().as_secs_f64();
    let text = console.join("\n");
    let find = |s: &str| console.iter().find(|l| l.contains(s)).cloned();

    let want = format!("{MARKER} probe virtiofs digest {digest:016x} files {files} bytes {bytes}");
    let got = find("probe virtiofs digest").unwrap_or_else(|| panic!("no digest from the guest; console:\n{text}"));
    assert!(got.contains(&want), "the guest saw another tree:\n  guest: {got}\n  host:  {want}\nconsole:\n{text}");
    assert!(find("probe virtiofs ok").is_some(), "the probe failed; console:\n{text}");
    assert!(find("probe exit 0").is_some(), "console:\n{text}");
    assert_eq!(shutdown, Some(Response::Done), "the guest's button driver enabled the power button event");
    assert_eq!(status.code(), Some(0), "the guest powered off; console:\n{text}");

    // What the guest wrote is on the host, byte for byte.
    let written = std::fs::read(shared.join(WRITE_NAME)).expect("the guest's file is on the host");
    assert_eq!(written.len() as u64, WRITE_BYTES);
    if let Some(at) = (0..written.len()).find(|&i| written[i] != pattern_byte(WRITE_ID, i as u64)) {
        panic!("the guest's file differs at byte {at}");
    }

    // The VMM closed the connection: virtiofsd ends on its own, and cleans up.
    let backend_status = virtiofsd.wait_within(IO_LIMIT);
    let backend_lines: Vec<String> = backend_log.try_iter().collect();
    assert!(backend_status.success(), "virtiofsd: {backend_status}; log: {backend_lines:?}");
    assert!(backend_lines.iter().any(|l| l.contains("Client disconnected")), "{backend_lines:?}");
    assert!(!socket.exists(), "virtiofsd removes its socket when it ends");
    assert!(!api.exists(), "the VMM removes its API socket at exit");
    for line in ["probe virtiofs read", "probe virtiofs wrote"] {
        if let Some(l) = find(line) {
            println!("{}", l.trim_start_matches(MARKER).trim());
        }
    }
    println!("virtio-fs: {files} files, {bytes} bytes checked by digest, {WRITE_BYTES} bytes written back; VMM ran {secs:.1} s");
    let _ = std::fs::remove_dir_all(&dir);
}

/// virtiofsd dies under a mounted guest: the VMM neither hangs nor crashes, it logs
/// the loss and answers the guest's file requests with EIO; the guest still shuts
/// down gracefully (exit status 0).
#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_virtiofs_backend_death_gives_the_guest_eio_and_the_vmm_carries_on() {
    use std::io::{BufRead, BufReader, Write};
    const PORT: u32 = 5002;
    let kernel = lab_env("VFVM_LAB_KERNEL");
    let initrd = lab_env("VFVM_LAB_PROBE_INITRD");
    let dir = std::env::temp_dir().join(format!("vfvm-virtiofs-death-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), b"soon gone\n").unwrap();
    let socket = dir.join("virtiofsd.sock");
    let vsock = dir.join("vsock.sock");
    let api = dir.join("api.sock");

    let (virtiofsd, _backend_log, _backend_reader) = common::start_virtiofsd(&socket, &shared, IO_LIMIT);
    let mut virtiofsd = Reaped(Some(virtiofsd));

    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 no_timer_check vfvm.power_button vfvm.probe_cmd=virtiofs-probe \
         vfvm.probe=--tag,{TAG},--write,x.bin,--write-bytes,4096,--backend-death-port,{PORT}"
    );
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfvm-vmm"))
        .args(["--kernel", &kernel, "--initrd", &initrd, "--vcpus", "2", "--memory", "512", "--serial-stdout"])
        .args(["--cmdline", &cmdline])
        .arg("--fs")
        .arg(format!("tag={TAG},socket={}", socket.display()))
        .args(["--vsock-socket".as_ref(), vsock.as_os_str(), "--api-socket".as_ref(), api.as_os_str()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vfvm-vmm");
    let vmm_deadline = common::KillAfter::new(child.id(), BOUND + IO_LIMIT);
    let (rx, _reader) = common::lines(child.stdout.take().unwrap());
    let (vmm_log, _log_reader) = common::vmm_log(child.stderr.take().unwrap());

    let mut shutdown = None;
    let mut lost = None;
    let console = common::follow_console(&rx, &mut child, started, BOUND, |line| {
        if line.contains(&format!("{MARKER} probe virtiofs waiting for the host on vsock port {PORT}")) {
            // Kill the backend, see the VMM notice, then let the guest go on.
            let status = {
                let mut c = virtiofsd.0.take().unwrap();
                c.kill().unwrap();
                c.wait().unwrap()
            };
            assert!(!status.success());
            lost = Some(
                common::wait_for_line(&vmm_log, "the backend closed the connection", IO_LIMIT)
                    .unwrap_or_else(|seen| panic!("the VMM did not notice: {seen:?}")),
            );
            let mut s = std::os::unix::net::UnixStream::connect(&vsock).unwrap();
            s.set_read_timeout(Some(IO_LIMIT)).unwrap();
            s.write_all(format!("CONNECT {PORT}\n").as_bytes()).unwrap();
            let mut answer = String::new();
            BufReader::new(&s).read_line(&mut answer).unwrap();
            assert!(answer.starts_with("OK "), "{answer:?}");
        }
        if line.contains(&format!("{MARKER} probe waiting for the power button")) {
            let mut c = VmmClient::connect(&api, IO_LIMIT).expect("connect to the control API");
            shutdown = Some(c.call(Request::Shutdown { force: false }).expect("graceful shutdown"));
        }
    });
    let status = child.wait().unwrap();
    println!("vfvm-vmm ended: {status}");
    drop(vmm_deadline);
    let text = console.join("\n");
    let has = |s: &str| console.iter().any(|l| l.contains(s));
    assert!(lost.is_some(), "the guest never got to the backend's death; console:\n{text}");
    assert!(has("probe virtiofs backend gone: EIO"), "console:\n{text}");
    assert!(has("probe exit 0"), "console:\n{text}");
    assert_eq!(shutdown, Some(Response::Done));
    assert_eq!(status.code(), Some(0), "the guest powered off; console:\n{text}");
    assert!(!vsock.exists() && !api.exists(), "the VMM removes its sockets at exit");
    println!("virtio-fs backend death: {}", lost.unwrap_or_default().trim());
    // A killed virtiofsd leaves its socket file: ours to remove.
    let _ = std::fs::remove_dir_all(&dir);
}
