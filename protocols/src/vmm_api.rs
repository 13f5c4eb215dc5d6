//! The VMM control API: how the shim drives `vfvm-vmm` over its Unix socket.
//!
//! Each message is a 4-byte big-endian length followed by that many bytes of JSON
//! (at most [`MAX_MESSAGE_BYTES`]): an [`Envelope`] holding the API version, a request
//! id the answer repeats, and the body. Versioned: a VMM answers a request of another
//! version with [`ErrorCode::UnsupportedVersion`] and keeps serving.

use serde::{Deserialize, Serialize};

use crate::PciAddress;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The API version this crate speaks.
pub const VMM_API_VERSION: u32 = 1;
/// No control message needs more; a larger length is refused unread.
pub const MAX_MESSAGE_BYTES: u32 = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope<T> {
    pub version: u32,
    pub id: u64,
    pub body: T,
}

/// What the shim can ask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Pause,
    Resume,
    /// `force`: stop now; otherwise ask the guest to power off (ACPI) and wait.
    Shutdown {
        force: bool,
    },
    /// Hot-plug a VFIO device (a VF the VF manager bound to vfio-pci) into the
    /// running VM: answered with `device_added` once it is on the guest's bus and the
    /// guest has been told (ACPI). The VMM finds its IOMMU group itself.
    AddVfioDevice {
        id: String,
        host_pci_address: PciAddress,
        /// The slot on the guest's bus 0 (1..=31); the first free one if absent.
        #[serde(default)]
        guest_slot: Option<u8>,
    },
    /// Unplug a hot-pluggable device (VFIO): the guest is asked to eject it and given
    /// `eject_timeout_ms` (default [`DEFAULT_EJECT_TIMEOUT_MS`], at most
    /// [`MAX_EJECT_TIMEOUT_MS`]); past that it is removed anyway, and the answer says so.
    RemoveDevice {
        id: String,
        #[serde(default)]
        eject_timeout_ms: Option<u32>,
    },
}

/// How long a removal waits for the guest's eject by default.
pub const DEFAULT_EJECT_TIMEOUT_MS: u32 = 10_000;
/// The longest eject wait a removal may ask for.
pub const MAX_EJECT_TIMEOUT_MS: u32 = 60_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    ShuttingDown,
}

/// VM exits that reached the VMM (KVM handles the rest in the kernel: its debugfs
/// counts those), by reason and, for port I/O and MMIO, by the device range hit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStats {
    /// By reason: `io_in`, `io_out`, `mmio_read`, `mmio_write`, `interrupted` (a kick or
    /// other signal), `hlt`, `other`; only reasons seen.
    pub reasons: std::collections::BTreeMap<String, u64>,
    /// Port-I/O and MMIO exits by range, most first; addresses with no device are
    /// listed one by one (a bounded number of them) with `device` "unassigned".
    pub ranges: Vec<RangeExits>,
}

impl ExitStats {
    /// Every exit counted, whatever its reason.
    pub fn total(&self) -> u64 {
        self.reasons.values().sum()
    }
}

/// Which address space a range is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressSpace {
    Pio,
    Mmio,
}

/// The exits of one device range (or one unassigned address).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeExits {
    pub space: AddressSpace,
    pub base: u64,
    pub len: u64,
    pub device: String,
    pub exits: u64,
}

/// One device on the guest's PCI bus, as the status lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    /// The name it was added under (the `id=` of `--vfio`, the API's `id`), or the
    /// VMM's own name for built-in devices (`vsock`, `fs`).
    pub id: String,
    /// `virtio-vsock`, `virtio-fs` or `vfio`.
    pub kind: String,
    pub guest_pci_address: PciAddress,
    /// The host function passed through (VFIO devices only).
    #[serde(default)]
    pub host_pci_address: Option<PciAddress>,
}

/// Counts of what devices take from KVM and the host, for leak checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceUsage {
    /// KVM memory slots in use (guest RAM and passed-through BARs).
    pub memory_slots: u32,
    /// GSIs routed to MSI vectors.
    pub msi_gsis: u32,
    /// Devices open in the VM's VFIO container.
    pub vfio_devices: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not decodable, unknown op, or bad field values.
    BadRequest,
    UnsupportedVersion,
    /// Valid, but not possible in the VM's state (e.g. resume a running VM).
    InvalidState,
    /// This VMM does not do that (yet).
    Unsupported,
    Internal,
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Status {
        state: VmState,
        vcpus: u32,
        memory_mib: u64,
        vmm_version: String,
        /// The VM exits the VMM has handled so far (absent from VMMs that do not count).
        #[serde(default)]
        exits: ExitStats,
        /// The devices on the guest's PCI bus (absent from VMMs that do not list them).
        #[serde(default)]
        devices: Vec<DeviceInfo>,
        /// What the VM holds of the host's and KVM's resources (to see leaks).
        #[serde(default)]
        resources: ResourceUsage,
    },
    Done,
    /// A device was plugged at this guest PCI address.
    DeviceAdded {
        id: String,
        guest_pci_address: PciAddress,
    },
    /// A device is off the guest's bus and released. `forced`: the guest did not
    /// eject it within the bound, so it was pulled from under the guest's driver.
    DeviceRemoved {
        id: String,
        forced: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error { code, message: message.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control message of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge(u64),
    #[error("control message is not valid: {0}")]
    Decode(String),
    #[error("answer to request {got}, expected {want}")]
    WrongId { want: u64, got: u64 },
    #[error("the VMM speaks API version {0}, this client {VMM_API_VERSION}")]
    Version(u32),
}

/// Writes one framed message.
pub fn write_message<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| ApiError::Decode(e.to_string()))?;
    let len = match u32::try_from(bytes.len()) {
        Ok(len) if len <= MAX_MESSAGE_BYTES => len,
        _ => return Err(ApiError::TooLarge(u64::try_from(bytes.len()).unwrap_or(u64::MAX))),
    };
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's bytes; `Ok(None)` at a clean end of stream. The length is
/// checked before anything is allocated.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, ApiError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_MESSAGE_BYTES {
        return Err(ApiError::TooLarge(u64::from(len)));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(Some(buf))
}

/// The answer to one request frame, whatever its bytes: a frame that does not
/// decode is answered with `BadRequest`, another API version with
/// `UnsupportedVersion`; only a valid request reaches `handler`.
pub fn answer_frame(frame: &[u8], handler: &mut dyn FnMut(Request) -> Response) -> Envelope<Response> {
    let value: serde_json::Value = match serde_json::from_slice(frame) {
        Ok(v) => v,
        Err(e) => return Envelope { version: VMM_API_VERSION, id: 0, body: Response::error(ErrorCode::BadRequest, e.to_string()) },
    };
    let id = value.get("id").and_then(|v| v.as_u64()).unwrap_or(0);
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    let body = if version != u64::from(VMM_API_VERSION) {
        Response::error(ErrorCode::UnsupportedVersion, format!("version {version}; this VMM speaks {VMM_API_VERSION}"))
    } else {
        match serde_json::from_value::<Envelope<Request>>(value) {
            Ok(env) => handler(env.body),
            Err(e) => Response::error(ErrorCode::BadRequest, e.to_string()),
        }
    };
    Envelope { version: VMM_API_VERSION, id, body }
}

/// Serves one connection: each request frame gets exactly one answer. A frame that
/// does not decode is answered with `BadRequest` (the stream stays usable); a length
/// past the limit closes the connection, since the stream is out of step.
pub fn serve_connection(stream: &mut UnixStream, handler: &mut dyn FnMut(Request) -> Response) -> Result<(), ApiError> {
    while let Some(frame) = read_frame(stream)? {
        write_message(stream, &answer_frame(&frame, handler))?;
    }
    Ok(())
}

/// A blocking client for one VMM's control socket.
pub struct VmmClient {
    stream: UnixStream,
    next_id: u64,
}

impl VmmClient {
    /// Connects; every call then waits at most `timeout` for its answer.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ApiError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self { stream, next_id: 1 })
    }

    pub fn call(&mut self, request: Request) -> Result<Response, ApiError> {
        let id = self.next_id;
        self.next_id += 1;
        write_message(&mut self.stream, &Envelope { version: VMM_API_VERSION, id, body: request })?;
        let frame = read_frame(&mut self.stream)?.ok_or_else(|| ApiError::Io(std::io::ErrorKind::UnexpectedEof.into()))?;
        let env: Envelope<Response> = serde_json::from_slice(&frame).map_err(|e| ApiError::Decode(e.to_string()))?;
        if env.version != VMM_API_VERSION {
            return Err(ApiError::Version(env.version));
        }
        if env.id != id {
            return Err(ApiError::WrongId { want: id, got: env.id });
        }
        Ok(env.body)
    }
}
