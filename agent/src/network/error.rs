//! Typed errors of the network module. Every error names what it was about: the
//! config field and value, the interface, the route, the device, the path.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Result alias for the network module.
pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// Everything that can go wrong validating or applying a network config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The config was refused before anything was changed. `field` is a path
    /// into the config (`interfaces[0].addresses[1]`), `value` the offending
    /// value (cut to a bounded length).
    #[error("invalid network config: {field} = {value:?}: {reason}")]
    Invalid { field: String, value: String, reason: String },
    /// The JSON wire form could not be decoded.
    #[error("invalid network config: cannot decode: {0}")]
    Decode(String),
    /// A VLAN was asked for, which cannot be done here. Nothing was changed.
    #[error("interface {interface:?}: VLAN {vlan} is unsupported here: {reason}")]
    VlanUnsupported { interface: String, vlan: u16, reason: String },
    /// The device did not show up within the configured time.
    #[error("interface {interface:?}: no network device with {device} appeared within {timeout:?}")]
    DeviceTimeout {
        interface: String,
        /// "PCI address 0000:00:05.0", "MAC 02:..", or both.
        device: String,
        timeout: Duration,
    },
    /// The device was found but does not fit the config (two interfaces resolve
    /// to the same link, a PCI address whose netdev has another MAC, several
    /// candidates, the target name held by a link the config does not manage).
    #[error("interface {interface:?}: {detail}")]
    Device { interface: String, detail: String },
    /// A route cannot be installed: its gateway is not reachable through the
    /// configured addresses/link routes, or it collides with a route the agent
    /// does not own. Nothing was changed when this comes from validation.
    #[error("route {route}: {detail}")]
    Route { route: String, detail: String },
    /// The kernel refused a netlink request (or a read failed). `context` says
    /// which step of which interface/route.
    #[error("{context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: vfvm_netlink::Error,
    },
    /// A file operation failed (sysfs, resolv.conf).
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel uevent socket failed.
    #[error("uevent socket: {op}: {source}")]
    Uevent {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Longest value echoed back in an [`NetError::Invalid`].
const MAX_ECHO: usize = 80;

pub(crate) fn invalid(field: impl Into<String>, value: impl AsRef<str>, reason: impl Into<String>) -> NetError {
    let v = value.as_ref();
    let value = if v.len() > MAX_ECHO {
        let mut end = MAX_ECHO;
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...({} bytes)", &v[..end], v.len())
    } else {
        v.to_string()
    };
    NetError::Invalid { field: field.into(), value, reason: reason.into() }
}

pub(crate) fn nl(context: impl Into<String>) -> impl FnOnce(vfvm_netlink::Error) -> NetError {
    let context = context.into();
    move |source| NetError::Netlink { context, source }
}
