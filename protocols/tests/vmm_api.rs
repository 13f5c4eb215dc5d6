//! The VMM control API over a real Unix socket pair: framing, versions, bad input.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vfvm_protocols::vmm_api::*;

fn handler(req: Request) -> Response {
    match req {
        Request::Status => Response::Status {
            state: VmState::Running,
            vcpus: 2,
            memory_mib: 256,
            vmm_version: "test".into(),
            exits: ExitStats::default(),
            devices: Vec::new(),
            resources: ResourceUsage::default(),
        },
        Request::Resume => Response::error(ErrorCode::InvalidState, "the VM is running"),
        Request::AddVfioDevice { id, .. } => Response::DeviceAdded { id, guest_pci_address: "0000:00:05.0".parse().unwrap() },
        _ => Response::Done,
    }
}

/// A server thread on a fresh socket; returns the path.
fn server(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vfvm-vmm-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                let _ = serve_connection(&mut s, &mut handler);
            });
        }
    });
    path
}

fn raw_exchange(s: &mut UnixStream, payload: &[u8]) -> Envelope<Response> {
    s.write_all(&u32::try_from(payload.len()).expect("a test frame under 4 GiB").to_be_bytes()).unwrap();
    s.write_all(payload).unwrap();
    let frame = read_frame(s).unwrap().expect("an answer");
    serde_json::from_slice(&frame).unwrap()
}

#[test]
fn requests_round_trip_with_their_ids() {
    let path = server("rt");
    let mut c = VmmClient::connect(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(
        c.call(Request::Status).unwrap(),
        Response::Status {
            state: VmState::Running,
            vcpus: 2,
            memory_mib: 256,
            vmm_version: "test".into(),
            exits: ExitStats::default(),
            devices: Vec::new(),
            resources: ResourceUsage::default()
        }
    );
    assert!(matches!(c.call(Request::Resume).unwrap(), Response::Error { code: ErrorCode::InvalidState, .. }));
    let added =
        c.call(Request::AddVfioDevice { id: "vf0".into(), host_pci_address: "0000:01:10.2".parse().unwrap(), guest_slot: None }).unwrap();
    assert_eq!(added, Response::DeviceAdded { id: "vf0".into(), guest_pci_address: "0000:00:05.0".parse().unwrap() });
    assert_eq!(c.call(Request::Shutdown { force: true }).unwrap(), Response::Done);
}

#[test]
fn bad_frames_get_bad_request_and_the_connection_keeps_serving() {
    let path = server("bad");
    let mut s = UnixStream::connect(&path).unwrap();
    for (payload, says) in [
        (&b"{not json"[..], "key must be a string"),
        (br#"{"version":1,"id":7,"body":{"op":"format_disk"}}"#, "unknown variant"),
        (br#"{"version":1,"id":8,"body":{"op":"shutdown","force":true,"extra":1}}"#, "unknown field"),
        (br#"{"version":1,"id":9,"body":{"op":"shutdown","force":"yes"}}"#, "invalid type"),
        // A malformed PCI address is refused as it is decoded, quoted.
        (
            br#"{"version":1,"id":9,"body":{"op":"add_vfio_device","id":"vf0","host_pci_address":"0000:01:30.0","guest_slot":null}}"#,
            "invalid PCI address \"0000:01:30.0\": device must be at most 1f",
        ),
    ] {
        let answer = raw_exchange(&mut s, payload);
        match &answer.body {
            Response::Error { code: ErrorCode::BadRequest, message } => assert!(message.contains(says), "{message}"),
            other => panic!("{payload:?}: {other:?}"),
        }
    }
    let answer = raw_exchange(&mut s, br#"{"version":99,"id":10,"body":{"op":"status"}}"#);
    assert_eq!(answer.id, 10);
    assert!(matches!(answer.body, Response::Error { code: ErrorCode::UnsupportedVersion, .. }), "{answer:?}");
    // Still in step: a good request on the same connection.
    let answer = raw_exchange(&mut s, br#"{"version":1,"id":11,"body":{"op":"status"}}"#);
    assert_eq!(answer.id, 11);
    assert!(matches!(answer.body, Response::Status { .. }));
}

#[test]
fn an_oversized_length_closes_the_connection_without_reading_it() {
    let path = server("big");
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(&(64u32 << 20).to_be_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "the VMM should close an out-of-step stream");
    // The server lives on for new connections.
    let mut c = VmmClient::connect(&path, Duration::from_secs(5)).unwrap();
    assert!(matches!(c.call(Request::Status).unwrap(), Response::Status { .. }));
    // And the client refuses to send one.
    let huge = Request::RemoveDevice { id: "x".repeat(MAX_MESSAGE_BYTES as usize), eject_timeout_ms: None };
    assert!(matches!(c.call(huge), Err(ApiError::TooLarge(_))));
}

#[test]
fn a_silent_vmm_is_a_bounded_wait() {
    let dir = std::env::temp_dir().join(format!("vfvm-vmm-api-silent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // Accepts, then holds the connection without ever answering, until told to stop.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let conn = listener.accept();
        let _ = stopped.recv();
        drop(conn);
    });
    let mut c = VmmClient::connect(&path, Duration::from_millis(300)).unwrap();
    let started = Instant::now();
    assert!(matches!(c.call(Request::Status), Err(ApiError::Io(_))));
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    stop.send(()).unwrap();
    holder.join().unwrap();
}
