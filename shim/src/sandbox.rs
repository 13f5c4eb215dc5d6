//! A pod sandbox is a VM: `virtiofsd` sharing the sandbox's directory, `vfvm-vmm`
//! started in the pod's network namespace, and the agent inside, reached over
//! hybrid vsock. Every host change is journaled first ([`crate::record`]); a
//! failed launch undoes what it did before returning its error.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::protos::ttrpc;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::oneshot;
use vfvm_protocols::agent::{self as api, AgentClient};
use vfvm_protocols::client::{connect, AgentAddress, ConnectOptions};
use vfvm_protocols::vcpu_threads;
use vfvm_protocols::vmm_api::{Request, Response, VmmClient};

use crate::config::{Config, Hotplug, SandboxSettings};
use crate::network;
use crate::record::{self, Journal};
use crate::sriov::{self, SriovError, VfEndpoint};
use crate::vf::lock::VfLock;

/// The virtio-fs tag of the sandbox's shared directory.
pub const FS_TAG: &str = "vfvm";
/// Under a sandbox's state directory: where the shim makes everything the guest sees
/// (container rootfs mounts, copied files). Never exported, so the guest cannot plant
/// a link or rename a directory on a path the shim later creates, mounts, copies to
/// or unmounts as root.
pub const HOST_MOUNTS_DIR: &str = "mounts";
/// Under a sandbox's state directory: what virtiofsd exports, a read-only bind mount
/// of [`HOST_MOUNTS_DIR`] that receives its later mounts (a slave of its peer group).
/// The guest writes only inside those mounts (a container's rootfs), which the shim
/// never walks.
pub const SHARED_DIR: &str = "shared";

/// Where the shim mounts container `id`'s rootfs, in the sandbox state dir `dir`.
pub fn container_rootfs(dir: &Path, id: &str) -> PathBuf {
    dir.join(HOST_MOUNTS_DIR).join(id).join("rootfs")
}

/// Where the shim puts the files of container `id` (CRI's hosts, resolv.conf, ...).
pub fn container_files(dir: &Path, id: &str) -> PathBuf {
    dir.join(HOST_MOUNTS_DIR).join(id).join("files")
}
/// Every VM gets its own hybrid vsock socket, so one guest CID serves them all.
const GUEST_CID: u32 = 3;
/// How long virtiofsd may take to listen.
const VIRTIOFSD_READY: Duration = Duration::from_secs(10);
/// How long one agent RPC may take (container create waits on the guest's disk).
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest gets to eject a hot-plugged VF at teardown before the VMM
/// pulls it, and the bound on each hot-plug call's answer (a first VF DMA-maps all
/// guest RAM).
const EJECT_TIMEOUT_MS: u32 = 5_000;
const HOTPLUG_CALL_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{what} {path}: {reason}")]
    Missing { what: &'static str, path: PathBuf, reason: String },
    #[error(transparent)]
    Sriov(#[from] SriovError),
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    #[error("the VMM's control API: {0}")]
    VmmApi(String),
    #[error("{0}")]
    Record(#[from] record::RecordError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("virtiofsd exited before it listened ({status}); its last output: {output}")]
    VirtiofsdDied { status: String, output: String },
    #[error("virtiofsd did not listen on {path} within {secs} s")]
    VirtiofsdTimeout { path: PathBuf, secs: u64 },
    // The console file goes with the sandbox's state when the launch is undone, so
    // the error carries its last lines.
    #[error("the VMM exited while the guest booted ({status}); the guest console ended with:\n{console}")]
    VmmDied { status: String, console: String },
    // Whether the VMM held its vCPUs or the guest stalled inside KVM, from /proc.
    #[error("the agent did not answer within {secs} s ({reason}); {vcpus}; the guest console ended with:\n{console}")]
    AgentTimeout { secs: u64, reason: String, vcpus: String, console: String },
    #[error("agent {call}: {message}")]
    Agent { call: &'static str, message: String },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// How much of the guest console a launch error quotes.
const CONSOLE_TAIL_LINES: usize = 15;
const CONSOLE_TAIL_BYTES: u64 = 4096;

/// The last lines of the guest console (the guest wrote it: bounded, lossy UTF-8).
fn console_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return format!("(no console output in {})", path.display()) };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = f.take(CONSOLE_TAIL_BYTES).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::from("(the guest printed nothing)");
    }
    lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n")
}

/// Everything the launch needs to know about the pod.
pub struct LaunchSpec {
    pub id: String,
    pub settings: SandboxSettings,
    pub netns: Option<PathBuf>,
    pub hostname: String,
}

pub struct Sandbox {
    pub id: String,
    pub journal: Journal,
    /// The sandbox's state directory: [`container_rootfs`] and [`container_files`]
    /// under it are what the guest sees of a container, at [`api::GUEST_SHARED_DIR`].
    pub dir: PathBuf,
    pub agent: Arc<AgentClient>,
    pub vmm_pid: u32,
    vmm: tokio::sync::Mutex<Option<Child>>,
    virtiofsd: tokio::sync::Mutex<Option<Child>>,
    api_socket: PathBuf,
    /// The VMM's ids of the VFs hot-plugged into the running VM: unplugged first.
    hot_vfs: Vec<String>,
    shutdown_timeout: Duration,
    /// The locks of the pod's VFs, held until each is given back.
    vf_locks: std::sync::Mutex<Vec<VfLock>>,
    vf_lock_dir: PathBuf,
    /// Held through a stop, so a second caller (delete, then shutdown) waits for
    /// the first and finds it done.
    stopped: tokio::sync::Mutex<bool>,
}

/// One control API call to the VMM at `api`, off the runtime; `limit` bounds the answer.
async fn vmm_call(api: &Path, request: Request, limit: Duration) -> Result<Response, SandboxError> {
    let api = api.to_path_buf();
    tokio::task::spawn_blocking(move || VmmClient::connect(&api, limit).and_then(|mut c| c.call(request)))
        .await
        .map_err(|e| SandboxError::VmmApi(e.to_string()))?
        .map_err(|e| SandboxError::VmmApi(e.to_string()))
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// Checks what must exist before anything on the host changes.
pub fn preflight(config: &Config, settings: &SandboxSettings, netns: Option<&Path>) -> Result<(), SandboxError> {
    if settings.sriov && netns.is_none() {
        return Err(SriovError::NoNetns.into());
    }
    let h = &config.hypervisor;
    for (what, path) in [
        ("hypervisor.path (the VMM)", &h.path),
        ("hypervisor.kernel", &h.kernel),
        ("hypervisor.initrd", &h.initrd),
        ("shared_fs.virtiofsd", &config.shared_fs.virtiofsd),
    ] {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(SandboxError::Missing { what, path: path.clone(), reason: "not a regular file".into() }),
            Err(e) => return Err(SandboxError::Missing { what, path: path.clone(), reason: e.to_string() }),
        }
    }
    if let Some(ns) = netns {
        std::fs::metadata(ns).map_err(|e| SandboxError::Missing {
            what: "the pod's network namespace",
            path: ns.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// Makes a spawned helper die with the shim (SIGKILL when the shim's thread
/// ends), optionally inside the pod's network namespace, inheriting the descriptors
/// `inherit` (the shim opens everything close-on-exec; these stay open in the child
/// only, under the same numbers).
fn confine(cmd: &mut Command, netns: Option<std::fs::File>, inherit: Vec<std::os::fd::RawFd>) {
    // SAFETY: only async-signal-safe calls (prctl, setns, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(ns) = &netns {
                use std::os::fd::AsRawFd;
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

impl Sandbox {
    /// Starts the pod's VM and creates the sandbox in its agent.
    pub async fn launch(config: &Config, spec: LaunchSpec) -> Result<Sandbox, SandboxError> {
        preflight(config, &spec.settings, spec.netns.as_deref())?;
        let dir = config.sandbox_dir(&spec.id)?;
        if dir.join(record::RECORD_FILE).exists() {
            return Err(SandboxError::Io {
                what: format!("sandbox {}", spec.id),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} holds a live or crashed sandbox's state", dir.display()),
                ),
            });
        }
        let journal = Journal::create(&dir, &spec.id)?;
        // The VFs prepared so far, whatever happens: their locks are held until the
        // undo below has given them back.
        let mut vfs = Vec::new();
        match Self::launch_in(config, spec, journal, &mut vfs).await {
            Ok(sb) => {
                *sb.vf_locks.lock().unwrap_or_else(|e| e.into_inner()) = vfs.into_iter().map(|v| v.lock).collect();
                Ok(sb)
            }
            Err(e) => {
                let locks: Vec<VfLock> = vfs.into_iter().map(|v| v.lock).collect();
                let lock_dir = config.sriov.lock_dir.clone();
                let undo_dir = dir.clone();
                let undone = tokio::task::spawn_blocking(move || record::undo(&undo_dir, &lock_dir, locks)).await;
                let undone = undone.unwrap_or_else(|j| Ok(record::Undone { errors: vec![j.to_string()], ..Default::default() }));
                match undone {
                    Ok(done) if done.errors.is_empty() => {
                        tracing::info!(killed = ?done.killed, vfs = done.vfs_restored, unmounted = done.unmounted.len(), "failed launch undone")
                    }
                    Ok(done) => tracing::error!(errors = ?done.errors, "failed launch not fully undone"),
                    Err(u) => tracing::error!("failed launch not undone: {u}"),
                }
                Err(e)
            }
        }
    }

    async fn launch_in(config: &Config, spec: LaunchSpec, journal: Journal, vfs: &mut Vec<VfEndpoint>) -> Result<Sandbox, SandboxError> {
        let dir = journal.dir().to_path_buf();
        let started = Instant::now();
        let phase = |what: &str| tracing::debug!(sandbox = %spec.id, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "launch: {what}");
        // The pod's VFs first: on vfio-pci before the VMM opens them. They are
        // journaled in the sandbox's journal, so every failure below gives them back.
        if spec.settings.sriov {
            let (id, netns, lock_dir, cni_cache) =
                (spec.id.clone(), spec.netns.clone(), config.sriov.lock_dir.clone(), config.sriov.cni_cache_dir.clone());
            let journal_dir = dir.clone();
            let (prepared, result) = tokio::task::spawn_blocking(move || {
                let mut prepared = Vec::new();
                let result = sriov::attach(&id, netns.as_deref(), &journal_dir, &lock_dir, &cni_cache, &mut prepared);
                (prepared, result)
            })
            .await
            .map_err(|e| SandboxError::Io { what: "preparing the pod's VFs".into(), source: std::io::Error::other(e.to_string()) })?;
            vfs.extend(prepared);
            result?;
            phase("VFs on vfio-pci");
        }
        let vfs: &[VfEndpoint] = vfs;
        let share = make_share(&dir, &journal)?;
        // The pod's own interfaces (what is left in its netns once its VFs are taken),
        // each on a tap of its own; journaled, so every failure below disconnects them.
        let mut taps = match &spec.netns {
            Some(netns) => network::connect(netns, usize::try_from(spec.settings.vcpus).unwrap_or(1), &journal)?,
            None => Vec::new(),
        };
        if !taps.is_empty() {
            phase("pod interfaces on their taps");
        }

        let fs_socket = dir.join("fs.sock");
        let mut fsd = Command::new(&config.shared_fs.virtiofsd);
        fsd.arg(format!("--socket-path={}", fs_socket.display()))
            .arg(format!("--shared-dir={}", share.display()))
            .arg(format!("--sandbox={}", config.shared_fs.sandbox.as_arg()))
            .args(["--cache=never", "--announce-submounts"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        confine(&mut fsd, None, Vec::new());
        let mut virtiofsd = fsd.spawn().map_err(io(format!("starting {}", config.shared_fs.virtiofsd.display())))?;
        let fsd_pid = virtiofsd.id().unwrap_or(0);
        journal.started("virtiofsd", fsd_pid)?;
        phase("virtiofsd started");
        // The VMM starts at once: it sets the guest up while virtiofsd starts, and
        // connects to it once it listens (waiting at most VIRTIOFSD_READY).
        let mut fsd_ready = watch_virtiofsd(virtiofsd.stderr.take(), fs_socket.clone(), spec.id.clone());

        let api_socket = dir.join("api.sock");
        let vsock_socket = dir.join("vsock.sock");
        let console = dir.join("console.log");
        let h = &config.hypervisor;
        let cmdline = format!("{GUEST_KERNEL_PARAMS} vfvm.sandbox={} {}", spec.id, h.kernel_params).trim().to_string();
        let mut vmm = Command::new(&h.path);
        vmm.arg("--kernel").arg(&h.kernel).arg("--initrd").arg(&h.initrd).arg("--cmdline").arg(cmdline);
        vmm.arg("--vcpus").arg(spec.settings.vcpus.to_string()).arg("--memory").arg(spec.settings.memory_mib.to_string());
        vmm.arg("--api-socket").arg(&api_socket).arg("--vsock-socket").arg(&vsock_socket).arg("--vsock-cid").arg(GUEST_CID.to_string());
        vmm.arg("--fs").arg(format!("tag={FS_TAG},socket={},wait={}", fs_socket.display(), VIRTIOFSD_READY.as_secs()));
        vmm.arg("--serial-log").arg(&console).arg("--serial-log-max").arg((u64::from(h.console_log_max_kib) << 10).to_string());
        let hot = config.sriov.hotplug == Hotplug::Hot;
        // Hot-plug at pod start gains nothing from `--populate-memory`: the plug comes
        // right after boot, and faulting RAM in meanwhile slows the boot as much
        // (`cargo xtask bench-hotplug`).
        if !hot {
            vmm.args(sriov::vmm_args(vfs));
        }
        vmm.args(network::vmm_args(&taps, config.network.datapath.as_arg()));
        vmm.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
        let netns = match &spec.netns {
            Some(p) => Some(std::fs::File::open(p).map_err(io(format!("opening the pod's network namespace {}", p.display())))?),
            None => None,
        };
        let tap_fds = taps.iter().flat_map(|t| t.files.iter().map(std::os::fd::AsRawFd::as_raw_fd)).collect();
        confine(&mut vmm, netns, tap_fds);
        let spawned = vmm.spawn();
        // The taps are the VMM's now: they go when it does.
        for t in &mut taps {
            t.files.clear();
        }
        let mut vmm_child = spawned.map_err(io(format!("starting {}", h.path.display())))?;
        let vmm_pid = vmm_child.id().unwrap_or(0);
        journal.started("vfvm-vmm", vmm_pid)?;
        phase("vfvm-vmm started");
        forward_lines(vmm_child.stderr.take(), "vfvm-vmm", spec.id.clone());

        let addr = AgentAddress::Hybrid { uds: vsock_socket.clone(), port: config.agent.vsock_port };
        let deadline = Duration::from_secs(u64::from(config.agent.dial_timeout_secs));
        let opts = ConnectOptions { deadline, ..Default::default() };
        let mut dial = tokio::task::spawn_blocking(move || connect(&addr, opts));
        let fsd_deadline = tokio::time::sleep(VIRTIOFSD_READY);
        tokio::pin!(fsd_deadline);
        let mut fsd_listening = false;
        let agent = loop {
            tokio::select! {
                r = &mut fsd_ready, if !fsd_listening => match r {
                    Ok(Ok(())) => {
                        fsd_listening = true;
                        phase("virtiofsd listening");
                    }
                    // Its output ended (or the watcher went): it exited.
                    r => {
                        let output = r.ok().and_then(Result::err).unwrap_or_default();
                        let status = virtiofsd.wait().await.map_or_else(|e| e.to_string(), |s| s.to_string());
                        return Err(SandboxError::VirtiofsdDied { status, output });
                    }
                },
                () = &mut fsd_deadline, if !fsd_listening => {
                    return Err(SandboxError::VirtiofsdTimeout { path: fs_socket.clone(), secs: VIRTIOFSD_READY.as_secs() });
                }
                r = &mut dial => match r {
                    Ok(Ok(c)) => break c,
                    Ok(Err(e)) => {
                        let vcpus = vmm_child.id().map_or_else(|| "the VMM had exited".into(), |pid| vcpu_threads::describe(&vcpu_threads::vcpu_threads(pid)));
                        return Err(SandboxError::AgentTimeout { secs: deadline.as_secs(), reason: e.to_string(), vcpus, console: console_tail(&console) });
                    }
                    Err(e) => return Err(SandboxError::Agent { call: "connect", message: e.to_string() }),
                },
                status = vmm_child.wait() => {
                    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                    return Err(SandboxError::VmmDied { status, console: console_tail(&console) });
                }
            }
        };
        let agent = Arc::new(agent);
        tracing::info!(sandbox = %spec.id, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "agent answered");

        // Hot-plug: the VFs go into the running VM now (the guest's acpiphp takes them).
        let mut hot_vfs = Vec::new();
        if hot {
            for vf in vfs {
                let request = Request::AddVfioDevice { id: vf.vmm_id.clone(), host_pci_address: vf.host(), guest_slot: None };
                match vmm_call(&api_socket, request, HOTPLUG_CALL_LIMIT).await? {
                    Response::DeviceAdded { guest_pci_address, .. } => {
                        tracing::info!(sandbox = %spec.id, host = %vf.host(), guest = %guest_pci_address, "VF hot-plugged");
                        hot_vfs.push(vf.vmm_id.clone());
                    }
                    other => return Err(SandboxError::VmmApi(format!("hot-plugging VF {}: {other:?}", vf.host()))),
                }
            }
            if !vfs.is_empty() {
                phase("VFs hot-plugged");
            }
        }
        // Where the VMM put the VFs on the guest's bus.
        let guest = if vfs.is_empty() {
            None
        } else {
            let status = vmm_call(&api_socket, Request::Status, Duration::from_secs(5)).await?;
            let Response::Status { devices, .. } = status else { return Err(SandboxError::VmmApi(format!("status answered {status:?}"))) };
            let wait_ms = config.sriov.device_wait_timeout_secs.saturating_mul(1000);
            Some(sriov::guest_config(vfs, &devices, wait_ms)?)
        };

        let mut req = api::CreateSandboxRequest::new();
        req.sandbox_id = spec.id.clone();
        req.hostname = spec.hostname;
        req.shared_fs_tag = FS_TAG.into();
        if let Some(g) = &guest {
            req.pci_address_map = g.address_map.clone();
        }
        call(&agent, "CreateSandbox", move |a| a.create_sandbox(ctx(), &req)).await?;
        phase("sandbox created in the agent");
        // The pod's interfaces, VFs (by guest PCI address) and taps (by MAC), then
        // the routes through them all.
        let wait_ms = config.sriov.device_wait_timeout_secs.saturating_mul(1000);
        let (tap_interfaces, tap_routes) = network::guest_config(&taps, wait_ms);
        let (vf_interfaces, vf_routes) = guest.map(|g| (g.interfaces, g.routes)).unwrap_or_default();
        let configured = !vf_interfaces.is_empty() || !tap_interfaces.is_empty();
        for iface in vf_interfaces.into_iter().chain(tap_interfaces) {
            let (name, pci, mac) = (iface.name.clone(), iface.pci_address.clone(), iface.match_mac.clone());
            let mut req = api::UpdateInterfaceRequest::new();
            req.interface = Some(iface).into();
            call(&agent, "UpdateInterface", move |a| a.update_interface(ctx(), &req)).await?;
            if pci.is_empty() {
                tracing::info!(sandbox = %spec.id, interface = %name, mac = %mac, "pod interface configured in the guest");
            } else {
                tracing::info!(sandbox = %spec.id, interface = %name, guest_pci = %pci, "VF configured in the guest");
            }
        }
        let all_routes: Vec<api::Route> = vf_routes.into_iter().chain(tap_routes).collect();
        if !all_routes.is_empty() {
            let mut req = api::UpdateRoutesRequest::new();
            let mut routes = api::Routes::new();
            routes.routes = all_routes;
            req.routes = Some(routes).into();
            call(&agent, "UpdateRoutes", move |a| a.update_routes(ctx(), &req)).await?;
        }
        if configured {
            phase("pod interfaces configured in the guest");
        }

        Ok(Sandbox {
            id: spec.id,
            journal,
            dir,
            agent,
            vmm_pid,
            vmm: tokio::sync::Mutex::new(Some(vmm_child)),
            virtiofsd: tokio::sync::Mutex::new(Some(virtiofsd)),
            api_socket,
            hot_vfs,
            shutdown_timeout: Duration::from_secs(u64::from(config.runtime.shutdown_timeout_secs)),
            vf_locks: std::sync::Mutex::new(Vec::new()),
            vf_lock_dir: config.sriov.lock_dir.clone(),
            stopped: tokio::sync::Mutex::new(false),
        })
    }

    /// Stops the VM and virtiofsd and undoes every host change. Idempotent.
    pub async fn stop(&self) {
        let mut stopped = self.stopped.lock().await;
        if *stopped {
            return;
        }
        let agent = self.agent.clone();
        let id = self.id.clone();
        let _ = call(&agent, "DestroySandbox", move |a| {
            let mut r = api::DestroySandboxRequest::new();
            r.sandbox_id = id;
            a.destroy_sandbox(ctx(), &r)
        })
        .await;
        if let Some(mut vmm) = self.vmm.lock().await.take() {
            // Hot-plugged VFs leave the running guest first, as they came: its driver
            // lets go before the device does (the VMM pulls one the guest keeps).
            for id in &self.hot_vfs {
                let request = Request::RemoveDevice { id: id.clone(), eject_timeout_ms: Some(EJECT_TIMEOUT_MS) };
                match vmm_call(&self.api_socket, request, HOTPLUG_CALL_LIMIT).await {
                    Ok(Response::DeviceRemoved { forced: false, .. }) => tracing::info!(sandbox = %self.id, device = %id, "VF unplugged"),
                    Ok(Response::DeviceRemoved { forced: true, .. }) => {
                        tracing::warn!(sandbox = %self.id, device = %id, "the guest did not eject VF {id} within {EJECT_TIMEOUT_MS} ms: pulled")
                    }
                    other => tracing::warn!(sandbox = %self.id, device = %id, "unplugging VF {id}: {other:?}; it goes with the VM"),
                }
            }
            // The containers are gone and the guest keeps nothing: stop the VM
            // through its API (the agent does not act on the ACPI button yet).
            let api = self.api_socket.clone();
            let asked = tokio::task::spawn_blocking(move || {
                VmmClient::connect(&api, Duration::from_secs(5)).and_then(|mut c| c.call(Request::Shutdown { force: true }))
            })
            .await;
            if !matches!(asked, Ok(Ok(Response::Done))) {
                tracing::warn!(sandbox = %self.id, "VMM shutdown over the API failed ({asked:?}); killing it");
                let _ = vmm.start_kill();
            }
            match tokio::time::timeout(self.shutdown_timeout, vmm.wait()).await {
                Ok(status) => tracing::info!(sandbox = %self.id, ?status, "VMM stopped"),
                Err(_) => {
                    tracing::warn!(sandbox = %self.id, "VMM still running after {:?}; killing it", self.shutdown_timeout);
                    let _ = vmm.kill().await;
                }
            }
            let _ = self.journal.stopped(self.vmm_pid);
        }
        if let Some(mut fsd) = self.virtiofsd.lock().await.take() {
            // virtiofsd ends when its frontend disconnects; make sure.
            if tokio::time::timeout(Duration::from_secs(5), fsd.wait()).await.is_err() {
                let _ = fsd.kill().await;
            }
        }
        // The VMM is gone (its VFIO fds closed): the VFs go back, then the mounts.
        let dir = self.journal.dir().to_path_buf();
        let lock_dir = self.vf_lock_dir.clone();
        let locks = std::mem::take(&mut *self.vf_locks.lock().unwrap_or_else(|e| e.into_inner()));
        let undone = tokio::task::spawn_blocking(move || record::undo(&dir, &lock_dir, locks)).await;
        let mut undone = undone.unwrap_or_else(|e| Ok(record::Undone { errors: vec![e.to_string()], ..Default::default() }));
        if let Ok(done) = &mut undone {
            // A VF not given back stays ours (locked) while its journal entry remains.
            *self.vf_locks.lock().unwrap_or_else(|e| e.into_inner()) = std::mem::take(&mut done.vf_locks_kept);
        }
        *stopped = true;
        match undone {
            Ok(done) if done.errors.is_empty() => {
                if done.vfs_restored > 0 {
                    tracing::info!(sandbox = %self.id, vfs = done.vfs_restored, "VFs given back");
                }
            }
            Ok(done) => tracing::error!(sandbox = %self.id, errors = ?done.errors, "sandbox state not fully removed"),
            Err(e) => tracing::error!(sandbox = %self.id, "sandbox state not removed: {e}"),
        }
    }
}

/// A ttrpc context with the per-call bound.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(AGENT_CALL_TIMEOUT.as_nanos()).expect("the agent call bound is seconds"))
}

/// Runs one blocking agent call off the async threads.
pub async fn call<T, F>(agent: &Arc<AgentClient>, name: &'static str, f: F) -> Result<T, SandboxError>
where
    T: Send + 'static,
    F: FnOnce(&AgentClient) -> ttrpc::Result<T> + Send + 'static,
{
    let agent = agent.clone();
    match tokio::task::spawn_blocking(move || f(&agent)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(SandboxError::Agent { call: name, message: agent_message(&e) }),
        Err(e) => Err(SandboxError::Agent { call: name, message: e.to_string() }),
    }
}

/// The most processes one container's listing may name: a guest's default pid space
/// (`pid_max`) is 32768, and each pid becomes a record containerd is sent.
pub const MAX_LISTED_PROCESSES: usize = 32768;

/// A container's processes as the agent lists them; a listing past
/// [`MAX_LISTED_PROCESSES`] (a misbehaving agent) is refused before it is expanded.
pub fn list_processes(agent: &AgentClient, container_id: &str) -> ttrpc::Result<Vec<u32>> {
    let mut r = api::ListProcessesRequest::new();
    r.container_id = container_id.to_string();
    let pids = agent.list_processes(ctx(), &r)?.pids;
    if pids.len() > MAX_LISTED_PROCESSES {
        let message = format!(
            "the agent listed {} processes in container {container_id}, more than the {MAX_LISTED_PROCESSES} a VM runs: refused",
            pids.len()
        );
        return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::RESOURCE_EXHAUSTED, message)));
    }
    Ok(pids)
}

/// The most of the agent's words an error or log line carries: the guest chooses them.
pub const MAX_AGENT_MESSAGE: usize = 1024;

/// The agent's own words for an RPC error, at most [`MAX_AGENT_MESSAGE`] bytes of them.
pub fn agent_message(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => bounded_text(s.message(), MAX_AGENT_MESSAGE),
        other => bounded_text(&other.to_string(), MAX_AGENT_MESSAGE),
    }
}

/// `text` cut to at most `max` bytes (at a character boundary), saying how long it was.
pub fn bounded_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len())
}

/// Follows virtiofsd's output: every line goes to the log (so it never blocks on a
/// full pipe); the answer says when it listens on `socket`, or that it ended first
/// (with its last lines).
fn watch_virtiofsd(stderr: Option<ChildStderr>, socket: PathBuf, sandbox: String) -> oneshot::Receiver<Result<(), String>> {
    let (tx, rx) = oneshot::channel();
    let Some(stderr) = stderr else {
        let _ = tx.send(Ok(()));
        return rx;
    };
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut tail: Vec<String> = Vec::new();
        let mut tx = Some(tx);
        while let Ok(Some(l)) = lines.next_line().await {
            tracing::debug!(sandbox = %sandbox, "virtiofsd: {l}");
            let listening = l.contains("Waiting for vhost-user socket connection");
            tail.push(l);
            if tail.len() > 8 {
                tail.remove(0);
            }
            if listening && socket.exists() {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Ok(()));
                }
            }
        }
        if let Some(tx) = tx.take() {
            let _ = tx.send(Err(tail.join(" | ")));
        }
    });
    rx
}

/// The guest kernel's command line before the sandbox id and the config's
/// `kernel_params`, each word for the pod's start time in a VM that has only virtio
/// devices and COM1 (Kata's guest runs with most of them too):
/// - `no_timer_check`: the IO-APIC timer probe can stall a guest on a busy host;
/// - `cryptomgr.notests`: no self-test of every crypto algorithm as it registers;
/// - `rcupdate.rcu_expedited=1`: boot-time RCU grace periods expedited;
/// - `8250.nr_uarts=1`: no probing of COM2-COM4, which are not there;
/// - `pci=noearly`: no early quirk scan of bus 0, written for chipsets a VM lacks.
const GUEST_KERNEL_PARAMS: &str =
    "console=ttyS0 panic=-1 quiet no_timer_check cryptomgr.notests rcupdate.rcu_expedited=1 8250.nr_uarts=1 pci=noearly";

/// Copies a helper's stderr into the shim's log, line by line.
fn forward_lines(stderr: Option<ChildStderr>, what: &'static str, sandbox: String) {
    if let Some(s) = stderr {
        tokio::spawn(async move {
            let mut lines = BufReader::new(s).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                tracing::info!(sandbox = %sandbox, "{what}: {l}");
            }
        });
    }
}

/// mount(2) with paths.
/// Makes the sandbox's [`HOST_MOUNTS_DIR`] (its own shared mount, so what is mounted
/// under it later propagates) and [`SHARED_DIR`] (a read-only slave bind of it, which
/// virtiofsd exports: its copy in virtiofsd's mount namespace is a slave of the same
/// peer group and gets the container mounts too); each mount journaled first.
/// Returns the exported directory.
pub(crate) fn make_share(dir: &Path, journal: &Journal) -> Result<PathBuf, SandboxError> {
    let io = |what: String| move |source| SandboxError::Io { what, source };
    let (mounts, share) = (dir.join(HOST_MOUNTS_DIR), dir.join(SHARED_DIR));
    for d in [&mounts, &share] {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    journal.will_mount(&mounts)?;
    mount(&mounts, &mounts, None, libc::MS_BIND, None).map_err(io(format!("bind-mounting {}", mounts.display())))?;
    mount(Path::new("none"), &mounts, None, libc::MS_SHARED, None).map_err(io(format!("making {} a shared mount", mounts.display())))?;
    journal.will_mount(&share)?;
    mount(&mounts, &share, None, libc::MS_BIND, None).map_err(io(format!("bind-mounting {} at {}", mounts.display(), share.display())))?;
    let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    mount(Path::new("none"), &share, None, ro, None).map_err(io(format!("making {} read-only", share.display())))?;
    mount(Path::new("none"), &share, None, libc::MS_SLAVE, None).map_err(io(format!("making {} a slave mount", share.display())))?;
    Ok(share)
}

pub fn mount(source: &Path, target: &Path, fstype: Option<&str>, flags: libc::c_ulong, data: Option<&str>) -> std::io::Result<()> {
    use std::ffi::CString;
    let c = |s: &[u8]| CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput));
    let src = c(source.as_os_str().as_encoded_bytes())?;
    let dst = c(target.as_os_str().as_encoded_bytes())?;
    let fstype = fstype.map(|f| c(f.as_bytes())).transpose()?;
    let data = data.map(|d| c(d.as_bytes())).transpose()?;
    // SAFETY: NUL-terminated strings we own, or null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounted(p: &Path) -> bool {
        std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
    }

    /// The share as the guest gets it, on this kernel: a container mount made under
    /// the host-only directory shows in the exported one and is writable there; the
    /// exported directory itself is read-only, so nothing can be created, renamed or
    /// linked where the shim works; undo takes both mounts and the state away.
    #[test]
    fn the_guest_writes_only_inside_container_mounts_and_undo_removes_the_share() {
        let dir = std::env::temp_dir().join(format!("vfvm-share-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let journal = Journal::create(&dir, "sb-share").unwrap();
        let share = make_share(&dir, &journal).expect("making the share (the shim's tests run as root)");
        assert_eq!(share, dir.join(SHARED_DIR));
        let rootfs = container_rootfs(&dir, "c1");
        std::fs::create_dir_all(&rootfs).unwrap();
        journal.will_mount(&rootfs).unwrap();
        mount(Path::new("tmpfs"), &rootfs, Some("tmpfs"), 0, None).unwrap();

        let seen = share.join("c1").join("rootfs");
        assert!(mounted(&seen), "the container's mount should reach the exported directory");
        std::fs::write(seen.join("written-by-the-guest"), b"x").expect("the container's own mount stays writable");
        assert_eq!(std::fs::read(rootfs.join("written-by-the-guest")).unwrap(), b"x");
        for attempt in [
            std::fs::write(share.join("c1").join("planted"), b"x"),
            std::os::unix::fs::symlink("/etc", share.join("c1").join("files")),
            std::fs::rename(share.join("c1"), share.join("c2")),
            std::fs::create_dir(share.join("c3")),
        ] {
            assert_eq!(attempt.unwrap_err().raw_os_error(), Some(libc::EROFS));
        }
        assert!(!container_files(&dir, "c1").exists() && rootfs.is_dir());

        let done = record::undo(&dir, &dir.join("no-vf-locks"), Vec::new()).unwrap();
        assert!(done.errors.is_empty(), "{done:?}");
        assert_eq!(done.unmounted, vec![rootfs.clone(), share.clone(), dir.join(HOST_MOUNTS_DIR)]);
        assert!(!mounted(&seen) && !mounted(&share) && !dir.exists());
    }
}
