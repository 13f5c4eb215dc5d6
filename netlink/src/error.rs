//! Typed errors: every error names the operation and the object it was about.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking rtnetlink or opening a namespace.
///
/// `op` is a short verb phrase ("add address", "get link"), `object` says what it
/// was about ("10.0.0.1/24 on link 5", "link \"eth0\"").
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel refused the request (an `NLMSG_ERROR` with a negative errno).
    /// `message` is the kernel's extended-ACK text when it gave one.
    #[error("{op} {object}: {}", kernel_text(*errno, message.as_deref()))]
    Kernel { op: &'static str, object: String, errno: i32, message: Option<String> },
    /// No (complete) answer arrived within the handle's timeout.
    #[error("{op} {object}: no answer from the kernel within {timeout:?}")]
    Timeout { op: &'static str, object: String, timeout: Duration },
    /// A socket call failed (send/recv/setsockopt), not a kernel NACK.
    #[error("{op} {object}: netlink socket: {source}")]
    Io {
        op: &'static str,
        object: String,
        #[source]
        source: io::Error,
    },
    /// The kernel's answer could not be understood (malformed, oversized,
    /// not the message type expected).
    #[error("{op} {object}: unexpected answer from the kernel: {detail}")]
    Protocol { op: &'static str, object: String, detail: String },
    /// The caller's arguments were rejected before anything was sent.
    #[error("{op} {object}: invalid argument: {detail}")]
    InvalidArgument { op: &'static str, object: String, detail: String },
    /// Something the kernel answered without error does not contain what was asked
    /// for (e.g. a VF index the PF does not have).
    #[error("{op} {object}: not found")]
    NotFound { op: &'static str, object: String },
    /// A device file (`/dev/net/tun`) could not be opened.
    #[error("{op} {object}: {source}")]
    Device {
        op: &'static str,
        object: String,
        #[source]
        source: io::Error,
    },
    /// The path exists but is not a network namespace.
    #[error("{}: not a network namespace: {reason}", path.display())]
    NotANetns { path: PathBuf, reason: String },
    /// Opening or entering a namespace failed.
    #[error("{op} {}: {source}", path.display())]
    Netns {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn kernel_text(errno: i32, message: Option<&str>) -> String {
    let base = io::Error::from_raw_os_error(errno).to_string();
    match message {
        Some(m) if !m.is_empty() => format!("{base} ({m})"),
        _ => base,
    }
}

impl Error {
    /// The errno behind this error, if it has one (kernel NACKs and socket errors).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            Error::Io { source, .. } | Error::Netns { source, .. } | Error::Device { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// True when the kernel said the object does not exist (ENODEV, ENOENT, ESRCH,
    /// EADDRNOTAVAIL), or the object was missing from an answer.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
            || matches!(self.errno(), Some(libc::ENODEV | libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL))
                && matches!(self, Error::Kernel { .. })
    }

    /// True when the kernel said the object already exists (EEXIST).
    pub fn is_exists(&self) -> bool {
        matches!(self, Error::Kernel { errno: libc::EEXIST, .. })
    }
}
