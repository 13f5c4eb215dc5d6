//! The control API of a running `vfvm-vmm`, on this machine's KVM: the guest is a
//! tiny hand-made 64-bit ELF "kernel" that spins (`pause; jmp`), which is all the
//! API needs to act on (vCPU threads to pause, resume and stop). Every answer is
//! checked, bad messages included, and the process's exit status and socket cleanup.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use vfvm_protocols::vmm_api::{self, Envelope, ErrorCode, Request, Response, VmState, VmmClient, MAX_MESSAGE_BYTES, VMM_API_VERSION};

mod common;

const LIMIT: Duration = Duration::from_secs(30);
struct Vmm {
    child: Child,
    dir: PathBuf,
    api: PathBuf,
    log: mpsc::Receiver<String>,
}

impl Vmm {
    /// Starts the VMM and waits (on its log, not the clock) for the API to listen.
    fn start(name: &str) -> Vmm {
        let dir = std::env::temp_dir().join(format!("vfvm-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("spin.elf");
        std::fs::write(&kernel, common::tiny_elf(common::SPIN)).unwrap();
        let api = dir.join("api.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_vfvm-vmm"))
            .args(["--kernel".as_ref(), kernel.as_os_str(), "--vcpus".as_ref(), "2".as_ref(), "--memory".as_ref(), "64".as_ref()])
            .args(["--api-socket".as_ref(), api.as_os_str()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The receiver lives as long as the Vmm, so the VMM's stderr is drained to the end.
        let (log, _reader) = common::lines(child.stderr.take().unwrap());
        loop {
            match log.recv_timeout(LIMIT) {
                Ok(line) if line.contains("control API listening") => break,
                Ok(line) => eprintln!("vmm: {line}"),
                Err(e) => panic!("the VMM never said its API is listening ({e}); status {:?}", child.try_wait()),
            }
        }
        Vmm { child, dir, api, log }
    }

    fn client(&self) -> VmmClient {
        VmmClient::connect(&self.api, LIMIT).unwrap()
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.api).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s
    }

    /// Waits for the process to end; its exit code.
    fn wait(&mut self) -> i32 {
        let deadline = common::KillAfter::new(self.child.id(), LIMIT);
        let status = self.child.wait().unwrap();
        drop(deadline);
        status.code().unwrap_or(-1)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for line in self.log.try_iter() {
            eprintln!("vmm: {line}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn error_code(r: Response) -> ErrorCode {
    match r {
        Response::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn state(c: &mut VmmClient) -> VmState {
    match c.call(Request::Status).unwrap() {
        Response::Status { state, vcpus, memory_mib, .. } => {
            assert_eq!((vcpus, memory_mib), (2, 64));
            state
        }
        other => panic!("status: {other:?}"),
    }
}

fn send_raw(s: &mut UnixStream, bytes: &[u8]) {
    s.write_all(&u32::try_from(bytes.len()).unwrap().to_be_bytes()).unwrap();
    s.write_all(bytes).unwrap();
}

fn read_answer(s: &mut UnixStream) -> Envelope<Response> {
    let frame = vmm_api::read_frame(s).unwrap().expect("an answer");
    serde_json::from_slice(&frame).unwrap()
}

#[test]
fn pause_resume_and_a_forced_shutdown_end_the_vmm_with_status_4() {
    let mut vmm = Vmm::start("lifecycle");
    let mut c = vmm.client();
    assert_eq!(state(&mut c), VmState::Running);
    assert_eq!(c.call(Request::Pause).unwrap(), Response::Done);
    assert_eq!(state(&mut c), VmState::Paused);
    assert_eq!(error_code(c.call(Request::Pause).unwrap()), ErrorCode::InvalidState);
    assert_eq!(error_code(c.call(Request::Shutdown { force: false }).unwrap()), ErrorCode::InvalidState);
    assert_eq!(c.call(Request::Resume).unwrap(), Response::Done);
    assert_eq!(state(&mut c), VmState::Running);
    assert_eq!(error_code(c.call(Request::Resume).unwrap()), ErrorCode::InvalidState);
    // This guest has no ACPI button driver: a graceful shutdown cannot work, and says so.
    assert_eq!(error_code(c.call(Request::Shutdown { force: false }).unwrap()), ErrorCode::InvalidState);
    // Pause again, then force: parked vCPUs must stop too.
    assert_eq!(c.call(Request::Pause).unwrap(), Response::Done);
    assert_eq!(c.call(Request::Shutdown { force: true }).unwrap(), Response::Done);
    assert_eq!(vmm.wait(), 4);
    assert!(!vmm.api.exists(), "the API socket is removed at exit");
}

#[test]
fn bad_messages_get_clear_errors_and_the_vmm_keeps_serving() {
    let mut vmm = Vmm::start("bad");
    let mut s = vmm.raw();
    send_raw(&mut s, b"{not json");
    let a = read_answer(&mut s);
    assert_eq!(error_code(a.body), ErrorCode::BadRequest);
    send_raw(&mut s, br#"{"version":1,"id":7,"body":{"op":"reboot_the_planet"}}"#);
    let a = read_answer(&mut s);
    assert_eq!(a.id, 7);
    assert_eq!(error_code(a.body), ErrorCode::BadRequest);
    send_raw(&mut s, br#"{"version":99,"id":8,"body":{"op":"status"}}"#);
    let a = read_answer(&mut s);
    assert_eq!((a.id, a.version), (8, VMM_API_VERSION));
    assert_eq!(error_code(a.body), ErrorCode::UnsupportedVersion);
    // A field the API does not have.
    send_raw(&mut s, br#"{"version":1,"id":9,"body":{"op":"add_vfio_device","id":"vf0","host_pci_address":"0000:01:10.0","iommu_group_path":"/dev/vfio/8"}}"#);
    assert_eq!(error_code(read_answer(&mut s).body), ErrorCode::BadRequest);
    // Still in step after all that.
    send_raw(&mut s, br#"{"version":1,"id":10,"body":{"op":"status"}}"#);
    assert!(matches!(read_answer(&mut s).body, Response::Status { state: VmState::Running, .. }));

    // A length past the limit: one answer saying so, then the connection closes.
    s.write_all(&(MAX_MESSAGE_BYTES + 1).to_be_bytes()).unwrap();
    let a = read_answer(&mut s);
    match a.body {
        Response::Error { code: ErrorCode::BadRequest, message } => assert!(message.contains("exceeds the limit"), "{message}"),
        other => panic!("{other:?}"),
    }
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "closed after a too-large message");

    // A connection beyond the limit is closed at once; the others keep working.
    let mut held: Vec<UnixStream> = (0..8).map(|_| vmm.raw()).collect();
    let mut extra = vmm.raw();
    assert_eq!(extra.read(&mut [0u8; 1]).unwrap(), 0, "the ninth connection is closed");
    send_raw(&mut held[7], br#"{"version":1,"id":11,"body":{"op":"status"}}"#);
    assert_eq!(read_answer(&mut held[7]).id, 11);
    drop(held);

    assert_eq!(vmm.client().call(Request::Shutdown { force: true }).unwrap(), Response::Done);
    assert_eq!(vmm.wait(), 4);
}

fn error_message(r: Response, code: ErrorCode) -> String {
    match r {
        Response::Error { code: got, message } if got == code => message,
        other => panic!("expected a {code:?} error, got {other:?}"),
    }
}

/// Hot-plug requests this machine can answer without VFIO: each refused with the
/// input named and nothing changed; the VM runs on.
#[test]
fn hot_plug_bad_input_gets_clear_errors_and_the_vm_keeps_running() {
    let mut vmm = Vmm::start("hotplug-bad");
    let mut c = vmm.client();
    let before = match c.call(Request::Status).unwrap() {
        Response::Status { resources, devices, .. } => {
            assert!(devices.is_empty());
            assert!(resources.memory_slots >= 1, "guest RAM takes a slot: {resources:?}");
            assert_eq!((resources.msi_gsis, resources.vfio_devices), (0, 0));
            resources
        }
        other => panic!("status: {other:?}"),
    };
    let add = |id: &str, host: &str, slot: Option<u8>| Request::AddVfioDevice {
        id: id.into(),
        host_pci_address: host.parse().unwrap(),
        guest_slot: slot,
    };
    let message = error_message(c.call(add("vf0", "0000:7e:1f.7", None)).unwrap(), ErrorCode::BadRequest);
    assert_eq!(
        message,
        "add_vfio_device vf0: VFIO device 0000:7e:1f.7: /sys/bus/pci/devices/0000:7e:1f.7 does not exist (no such PCI function on this host)"
    );
    let message = error_message(c.call(add("../vf0", "0000:7e:1f.7", None)).unwrap(), ErrorCode::BadRequest);
    assert!(message.contains("device id \"../vf0\": expected 1 to 64 of"), "{message}");
    let message = error_message(c.call(Request::RemoveDevice { id: "vf9".into(), eject_timeout_ms: None }).unwrap(), ErrorCode::BadRequest);
    assert_eq!(message, "remove_device vf9: no device \"vf9\" is plugged");
    let message = error_message(
        c.call(Request::RemoveDevice { id: "vf9".into(), eject_timeout_ms: Some(3_600_000) }).unwrap(),
        ErrorCode::BadRequest,
    );
    assert!(message.contains("eject_timeout_ms 3600000: at most 60000"), "{message}");
    // Paused: nothing is plugged or unplugged.
    assert_eq!(c.call(Request::Pause).unwrap(), Response::Done);
    let message = error_message(c.call(add("vf0", "0000:7e:1f.7", None)).unwrap(), ErrorCode::InvalidState);
    assert!(message.contains("the VM is Paused"), "{message}");
    assert_eq!(c.call(Request::Resume).unwrap(), Response::Done);
    match c.call(Request::Status).unwrap() {
        Response::Status { state, resources, devices, .. } => {
            assert_eq!((state, resources, devices.len()), (VmState::Running, before, 0));
        }
        other => panic!("status: {other:?}"),
    }
    assert_eq!(c.call(Request::Shutdown { force: true }).unwrap(), Response::Done);
    assert_eq!(vmm.wait(), 4);
}

#[test]
fn an_existing_api_socket_path_is_refused_and_left_alone() {
    let dir = std::env::temp_dir().join(format!("vfvm-api-exists-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("spin.elf");
    std::fs::write(&kernel, common::tiny_elf(common::SPIN)).unwrap();
    let api = dir.join("api.sock");
    std::fs::write(&api, b"someone else's").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vfvm-vmm"))
        .args(["--kernel".as_ref(), kernel.as_os_str(), "--api-socket".as_ref(), api.as_os_str()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("control API socket {}", api.display())), "{err}");
    assert_eq!(std::fs::read(&api).unwrap(), b"someone else's");
    let _ = std::fs::remove_dir_all(&dir);
}
