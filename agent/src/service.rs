//! The agent's ttrpc service: what the shim can ask of it. Network calls go to the
//! network module, sandbox, container, process, stdio and event calls to the
//! container runner.

use std::sync::Mutex;
use std::time::Duration;

use ttrpc::{Code, TtrpcContext};
use vfvm_protocols::agent::{self as api, Agent};

use crate::container::{self, Runner, Stream};
use crate::network::{self, NetError, Network};

/// The longest the shim may ask the agent to wait for a device to appear.
pub const MAX_DEVICE_WAIT: Duration = Duration::from_secs(300);
/// `/proc/modules` entries reported in GuestDetails, at most.
const MAX_REPORTED_MODULES: usize = 512;

/// The longest a WaitProcess waits when the caller set no deadline.
pub const MAX_PROCESS_WAIT: Duration = Duration::from_secs(3600);

pub struct AgentService {
    network: Mutex<Network>,
    runner: Runner,
}

impl AgentService {
    /// Starts the reaper if it is not running (outside a VM: the agent becomes a
    /// child subreaper), so call it before the server's threads exist.
    pub fn new(network: Network) -> Self {
        let reaper = crate::init::spawn_reaper().expect("starting the reaper thread");
        Self { network: Mutex::new(network), runner: Runner::new(reaper) }
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
        NetError::Invalid { .. } => Code::INVALID_ARGUMENT,
        // The request is fine; this guest's kernel cannot do it.
        NetError::VlanUnsupported { .. } => Code::FAILED_PRECONDITION,
        NetError::DeviceTimeout { .. } => Code::DEADLINE_EXCEEDED,
        NetError::Route { .. } | NetError::Device { .. } => Code::FAILED_PRECONDITION,
        _ => Code::INTERNAL,
    };
    status(code, e.to_string())
}

/// Runner errors as ttrpc statuses, naming the call.
fn run_status(call: &str, e: container::Error) -> ttrpc::Error {
    use container::Error as E;
    let code = match &e {
        E::Invalid(_) => Code::INVALID_ARGUMENT,
        E::NotFound(_) => Code::NOT_FOUND,
        E::Exists(_) => Code::ALREADY_EXISTS,
        E::Precondition(_) => Code::FAILED_PRECONDITION,
        E::Timeout(_) => Code::DEADLINE_EXCEEDED,
        E::Internal(_) => Code::INTERNAL,
    };
    tracing::debug!("{call}: {e}");
    status(code, format!("{call}: {e}"))
}

/// How long a call may block: the caller's deadline, within `max`.
fn call_wait(ctx: &TtrpcContext, max: Duration) -> Duration {
    match u64::try_from(ctx.timeout_nano) {
        Ok(n) if n > 0 => Duration::from_nanos(n).min(max),
        _ => max,
    }
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
        v => Some(
            u16::try_from(v).map_err(|_| status(Code::INVALID_ARGUMENT, format!("interface {:?}: vlan {v} is not a VLAN id", i.name)))?,
        ),
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
    network::Route {
        dest: r.dest.clone(),
        gateway: opt_str(&r.gateway),
        device: opt_str(&r.device),
        scope: opt_str(&r.scope),
        metric: opt_u32(r.metric),
    }
}

/// The most PCI functions GuestDetails lists.
const MAX_REPORTED_PCI_DEVICES: usize = 256;

fn guest_details() -> api::GuestDetailsResponse {
    let mut r = api::GuestDetailsResponse::new();
    // SAFETY: `utsname` is a plain C struct (char arrays) for which all-zero bytes are a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills `uts`, a live, correctly typed local.
    if unsafe { libc::uname(&mut uts) } == 0 {
        // SAFETY: uname NUL-terminates the field.
        r.kernel_release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }.to_string_lossy().into_owned();
    }
    r.memory_bytes = crate::guest::memory().total_bytes;
    r.cpus = crate::guest::cpus();
    r.loaded_modules = std::fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .take(MAX_REPORTED_MODULES)
        .collect();
    let mut pci: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .map(|entries| entries.flatten().take(MAX_REPORTED_PCI_DEVICES).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    pci.sort();
    r.pci_devices = pci;
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

    fn create_sandbox(&self, _ctx: &TtrpcContext, req: api::CreateSandboxRequest) -> ttrpc::Result<api::Empty> {
        let map = crate::container::pci::address_map(req.pci_address_map).map_err(|e| run_status("CreateSandbox", e))?;
        self.runner.create_sandbox(&req.sandbox_id, &req.hostname, map, &req.shared_fs_tag).map_err(|e| run_status("CreateSandbox", e))?;
        Ok(api::Empty::new())
    }

    fn destroy_sandbox(&self, _ctx: &TtrpcContext, req: api::DestroySandboxRequest) -> ttrpc::Result<api::Empty> {
        self.runner.destroy_sandbox(&req.sandbox_id).map_err(|e| run_status("DestroySandbox", e))?;
        Ok(api::Empty::new())
    }

    fn create_container(&self, _ctx: &TtrpcContext, req: api::CreateContainerRequest) -> ttrpc::Result<api::Empty> {
        self.runner
            .create(&req.container_id, &req.oci_spec_json, &req.rootfs_path, req.terminal)
            .map_err(|e| run_status("CreateContainer", e))?;
        Ok(api::Empty::new())
    }

    fn start_container(&self, _ctx: &TtrpcContext, req: api::StartContainerRequest) -> ttrpc::Result<api::Empty> {
        self.runner.start(&req.container_id).map_err(|e| run_status("StartContainer", e))?;
        Ok(api::Empty::new())
    }

    fn remove_container(&self, _ctx: &TtrpcContext, req: api::RemoveContainerRequest) -> ttrpc::Result<api::Empty> {
        self.runner.remove(&req.container_id).map_err(|e| run_status("RemoveContainer", e))?;
        Ok(api::Empty::new())
    }

    fn exec_process(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> ttrpc::Result<api::Empty> {
        self.runner.exec(&req.container_id, &req.exec_id, &req.oci_process_json, req.terminal).map_err(|e| run_status("ExecProcess", e))?;
        Ok(api::Empty::new())
    }

    fn signal_process(&self, _ctx: &TtrpcContext, req: api::SignalProcessRequest) -> ttrpc::Result<api::Empty> {
        self.runner.signal(&req.container_id, &req.exec_id, req.signal, req.all).map_err(|e| run_status("SignalProcess", e))?;
        Ok(api::Empty::new())
    }

    fn wait_process(&self, ctx: &TtrpcContext, req: api::WaitProcessRequest) -> ttrpc::Result<api::WaitProcessResponse> {
        let (code, at) = self
            .runner
            .wait(&req.container_id, &req.exec_id, call_wait(ctx, MAX_PROCESS_WAIT))
            .map_err(|e| run_status("WaitProcess", e))?;
        let mut r = api::WaitProcessResponse::new();
        r.exit_status = code;
        r.exited_at_unix_nanos = at;
        Ok(r)
    }

    fn list_processes(&self, _ctx: &TtrpcContext, req: api::ListProcessesRequest) -> ttrpc::Result<api::ListProcessesResponse> {
        let mut r = api::ListProcessesResponse::new();
        r.pids = self.runner.list(&req.container_id).map_err(|e| run_status("ListProcesses", e))?;
        Ok(r)
    }

    fn update_container(&self, _ctx: &TtrpcContext, req: api::UpdateContainerRequest) -> ttrpc::Result<api::Empty> {
        self.runner.update(&req.container_id, &req.resources_json).map_err(|e| run_status("UpdateContainer", e))?;
        Ok(api::Empty::new())
    }

    fn stats_container(&self, _ctx: &TtrpcContext, req: api::StatsContainerRequest) -> ttrpc::Result<api::StatsContainerResponse> {
        let s = self.runner.stats(&req.container_id).map_err(|e| run_status("StatsContainer", e))?;
        let mut r = api::StatsContainerResponse::new();
        r.cpu_usage_nanos = s.cpu_usage_nanos;
        r.memory_usage_bytes = s.memory_usage_bytes;
        r.memory_limit_bytes = s.memory_limit_bytes;
        r.pids_current = s.pids_current;
        let memory = crate::guest::memory();
        r.guest_memory_total_bytes = memory.total_bytes;
        r.guest_memory_available_bytes = memory.available_bytes;
        r.guest_cpu_usage_nanos = crate::guest::cpu_busy_nanos();
        r.guest_cpus = crate::guest::cpus();
        Ok(r)
    }

    fn write_stdin(&self, _ctx: &TtrpcContext, req: api::WriteStreamRequest) -> ttrpc::Result<api::WriteStreamResponse> {
        let n = self.runner.write_stdin(&req.container_id, &req.exec_id, &req.data).map_err(|e| run_status("WriteStdin", e))?;
        let mut r = api::WriteStreamResponse::new();
        r.written = u32::try_from(n).expect("at most MAX_IO_BYTES are written");
        Ok(r)
    }

    fn read_stdout(&self, ctx: &TtrpcContext, req: api::ReadStreamRequest) -> ttrpc::Result<api::ReadStreamResponse> {
        self.read_stream(ctx, req, Stream::Stdout, "ReadStdout")
    }

    fn read_stderr(&self, ctx: &TtrpcContext, req: api::ReadStreamRequest) -> ttrpc::Result<api::ReadStreamResponse> {
        self.read_stream(ctx, req, Stream::Stderr, "ReadStderr")
    }

    fn close_stdin(&self, _ctx: &TtrpcContext, req: api::CloseStdinRequest) -> ttrpc::Result<api::Empty> {
        self.runner.close_stdin(&req.container_id, &req.exec_id).map_err(|e| run_status("CloseStdin", e))?;
        Ok(api::Empty::new())
    }

    fn tty_win_resize(&self, _ctx: &TtrpcContext, req: api::TtyWinResizeRequest) -> ttrpc::Result<api::Empty> {
        self.runner.resize(&req.container_id, &req.exec_id, req.rows, req.columns).map_err(|e| run_status("TtyWinResize", e))?;
        Ok(api::Empty::new())
    }

    fn get_event(&self, ctx: &TtrpcContext, req: api::GetEventRequest) -> ttrpc::Result<api::GetEventResponse> {
        if req.timeout_ms > 60_000 {
            return Err(status(Code::INVALID_ARGUMENT, format!("GetEvent: timeout_ms {}: at most 60000", req.timeout_ms)));
        }
        let wait = call_wait(ctx, Duration::from_millis(req.timeout_ms.into()));
        let mut r = api::GetEventResponse::new();
        match self.runner.next_event(wait) {
            Some(container::Event::Exited { container_id, exec_id, exit_status, exited_at_unix_nanos }) => {
                r.set_exited(api::ProcessExited { container_id, exec_id, exit_status, exited_at_unix_nanos, ..Default::default() });
            }
            Some(container::Event::Oom { container_id }) => r.set_oom(api::OomKilled { container_id, ..Default::default() }),
            None => {}
        }
        Ok(r)
    }
}

impl AgentService {
    fn read_stream(
        &self,
        ctx: &TtrpcContext,
        req: api::ReadStreamRequest,
        stream: Stream,
        call: &str,
    ) -> ttrpc::Result<api::ReadStreamResponse> {
        // Never saturates: it is at most req.wait_ms, a u32.
        let wait_ms = u32::try_from(call_wait(ctx, Duration::from_millis(req.wait_ms.into())).as_millis()).unwrap_or(u32::MAX);
        let (data, eof) =
            self.runner.read(&req.container_id, &req.exec_id, stream, req.max_len, wait_ms).map_err(|e| run_status(call, e))?;
        let mut r = api::ReadStreamResponse::new();
        r.data = data;
        r.eof = eof;
        Ok(r)
    }
}
