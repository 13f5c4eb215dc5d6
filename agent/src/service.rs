//! The agent's ttrpc service: what the shim can ask of it. Network calls go to the
//! network module; container and process calls are not served yet and say so.

use std::sync::Mutex;
use std::time::Duration;

use ttrpc::{Code, TtrpcContext};
use vfvm_protocols::agent::{self as api, Agent};

use crate::network::{self, NetError, Network};

/// The longest the shim may ask the agent to wait for a device to appear.
pub const MAX_DEVICE_WAIT: Duration = Duration::from_secs(300);
/// `/proc/modules` entries reported in GuestDetails, at most.
const MAX_REPORTED_MODULES: usize = 512;

pub struct AgentService {
    network: Mutex<Network>,
}

impl AgentService {
    pub fn new(network: Network) -> Self {
        Self { network: Mutex::new(network) }
    }

    fn network(&self) -> std::sync::MutexGuard<'_, Network> {
        self.network.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn net_status(e: NetError) -> ttrpc::Error {
    let code = match &e {
        NetError::Invalid { .. } | NetError::VlanUnsupported { .. } => Code::INVALID_ARGUMENT,
        NetError::DeviceTimeout { .. } => Code::DEADLINE_EXCEEDED,
        NetError::Route { .. } | NetError::Device { .. } => Code::FAILED_PRECONDITION,
        _ => Code::INTERNAL,
    };
    status(code, e.to_string())
}

/// proto3 has no "unset": empty strings and zeros mean "not given".
fn opt_str(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn opt_u32(v: u32) -> Option<u32> {
    (v != 0).then_some(v)
}

fn to_interface(i: &api::Interface) -> Result<network::Interface, ttrpc::Error> {
    let vlan = match i.vlan {
        0 => None,
        v => Some(u16::try_from(v).map_err(|_| status(Code::INVALID_ARGUMENT, format!("interface {:?}: vlan {v} is not a VLAN id", i.name)))?),
    };
    Ok(network::Interface {
        name: i.name.clone(),
        device: network::DeviceMatch { pci_address: opt_str(&i.pci_address), mac: opt_str(&i.match_mac) },
        mac: opt_str(&i.mac),
        mtu: opt_u32(i.mtu),
        addresses: i.addresses.iter().map(|a| a.cidr.clone()).collect(),
        vlan,
    })
}

fn to_route(r: &api::Route) -> network::Route {
    network::Route { dest: r.dest.clone(), gateway: opt_str(&r.gateway), device: opt_str(&r.device), scope: opt_str(&r.scope), metric: opt_u32(r.metric) }
}

fn guest_details() -> api::GuestDetailsResponse {
    let mut r = api::GuestDetailsResponse::new();
    // SAFETY: uname fills a zeroed struct we own.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } == 0 {
        // SAFETY: uname NUL-terminates the field.
        r.kernel_release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }.to_string_lossy().into_owned();
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    r.memory_bytes = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024);
    r.cpus = std::thread::available_parallelism().map_or(0, |n| n.get() as u32);
    r.loaded_modules = std::fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .take(MAX_REPORTED_MODULES)
        .collect();
    r
}

impl Agent for AgentService {
    fn health(&self, _ctx: &TtrpcContext, _req: api::HealthRequest) -> ttrpc::Result<api::HealthResponse> {
        let mut r = api::HealthResponse::new();
        r.agent_version = env!("CARGO_PKG_VERSION").into();
        r.api_version = api::API_VERSION.into();
        Ok(r)
    }

    fn guest_details(&self, _ctx: &TtrpcContext, _req: api::GuestDetailsRequest) -> ttrpc::Result<api::GuestDetailsResponse> {
        Ok(guest_details())
    }

    fn update_interface(&self, _ctx: &TtrpcContext, req: api::UpdateInterfaceRequest) -> ttrpc::Result<api::Interface> {
        let Some(iface) = req.interface.as_ref() else { return Err(status(Code::INVALID_ARGUMENT, "UpdateInterface: no interface given")) };
        let wait = match iface.wait_timeout_ms {
            0 => None,
            ms => Some(Duration::from_millis(u64::from(ms)).min(MAX_DEVICE_WAIT)),
        };
        let report = self.network().update_interface(&to_interface(iface)?, wait).map_err(net_status)?;
        tracing::info!(interface = %iface.name, changes = report.changes.len(), "interface updated");
        Ok(iface.clone())
    }

    fn remove_interface(&self, _ctx: &TtrpcContext, req: api::RemoveInterfaceRequest) -> ttrpc::Result<api::Empty> {
        self.network().remove_interface(&req.name).map_err(net_status)?;
        Ok(api::Empty::new())
    }

    fn update_routes(&self, _ctx: &TtrpcContext, req: api::UpdateRoutesRequest) -> ttrpc::Result<api::Routes> {
        let routes: Vec<network::Route> = req.routes.routes.iter().map(to_route).collect();
        let report = self.network().update_routes(&routes).map_err(net_status)?;
        tracing::info!(routes = routes.len(), changes = report.changes.len(), "routes updated");
        Ok(req.routes.unwrap_or_default())
    }

    fn set_dns(&self, _ctx: &TtrpcContext, req: api::SetDnsRequest) -> ttrpc::Result<api::Empty> {
        let dns = network::Dns { servers: req.servers, searches: req.searches, options: req.options };
        self.network().set_dns(&dns).map_err(net_status)?;
        Ok(api::Empty::new())
    }
}
