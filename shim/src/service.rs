//! containerd's Task service for one pod: containers are created in the pod's VM
//! through its agent. Served as `containerd.task.v3.Task` (containerd 2.x) and
//! `containerd.task.v2.Task` (containerd 1.x), which carry the same messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api::{self, Status};
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};
use containerd_shim::ExitSignal;
use tokio::sync::watch;
use vfvm_protocols::agent as agent_api;

use crate::bundle::Bundle;
use crate::config::Config;
use crate::events::{self, EventSink};
use crate::sandbox::{self, call, LaunchSpec, Sandbox};
use crate::share;
use crate::stdio::{self, OutStream, StdioPaths};

/// How long a process's output may keep draining after its exit event.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// What a process "exits" with when its VM dies under it.
const VM_GONE_STATUS: u32 = 255;

type Empty = containerd_shim::protos::protobuf::well_known_types::empty::Empty;

fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn sandbox_status(e: sandbox::SandboxError) -> ttrpc::Error {
    use sandbox::SandboxError as E;
    let code = match &e {
        E::Missing { .. } | E::Sriov(_) => Code::FAILED_PRECONDITION,
        E::Config(_) => Code::INVALID_ARGUMENT,
        E::VirtiofsdTimeout { .. } | E::AgentTimeout { .. } => Code::DEADLINE_EXCEEDED,
        _ => Code::INTERNAL,
    };
    status(code, e.to_string())
}

/// The pod's VM as the guest sees it, for `stats`.
struct VmFigures {
    memory_bytes: u64,
    memory_used_bytes: u64,
    cpu_usage_nanos: u64,
}

/// A container's memory ceiling: its cgroup limit (0: none), never more than the VM.
fn effective_memory_limit(cgroup_limit: u64, vm_memory: u64) -> u64 {
    match (cgroup_limit, vm_memory) {
        (0, vm) => vm,
        (l, 0) => l,
        (l, vm) => l.min(vm),
    }
}

fn timestamp(nanos: u64) -> Timestamp {
    let mut t = Timestamp::new();
    // u64 seconds / 1e9 fit an i64, and the remainder is below 1e9.
    t.seconds = i64::try_from(nanos / 1_000_000_000).expect("u64 nanoseconds in seconds fit an i64");
    t.nanos = i32::try_from(nanos % 1_000_000_000).expect("below 1e9");
    t
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

/// A container's init or exec process.
struct Process {
    container_id: String,
    exec_id: String,
    stdio: StdioPaths,
    /// An exec's OCI process (JSON), sent to the agent on Start.
    exec_spec: Option<Vec<u8>>,
    state: Mutex<(Phase, u32, u64)>,
    exited: watch::Sender<bool>,
    /// Set once its stdio copiers run: an exit event waits for it, so output the
    /// agent holds is read before the exit is reported.
    attached: watch::Sender<bool>,
    /// One message per output copier when it stops.
    drained: Mutex<Option<(mpsc::Receiver<()>, usize)>>,
    /// Tells the output copiers to stop once the drain bound has passed.
    abandon_output: Arc<AtomicBool>,
}

impl Process {
    fn new(container_id: &str, exec_id: &str, stdio: StdioPaths, exec_spec: Option<Vec<u8>>) -> Arc<Process> {
        Arc::new(Process {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            exec_spec,
            state: Mutex::new((Phase::Created, 0, 0)),
            exited: watch::channel(false).0,
            attached: watch::channel(false).0,
            drained: Mutex::new(None),
            abandon_output: Arc::new(AtomicBool::new(false)),
        })
    }

    fn phase(&self) -> (Phase, u32, u64) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, phase: Phase, code: u32, at: u64) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = (phase, code, at);
    }

    /// Starts the stdio copiers (before the process runs, so no output is missed).
    fn attach(&self, agent: &Arc<agent_api::AgentClient>, log_id: &str) {
        let (tx, rx) = mpsc::channel();
        let control = stdio::CopierControl { done: tx, abandon: self.abandon_output.clone() };
        let mut n = 0;
        let outs = [
            (OutStream::Stdout, self.stdio.stdout.clone()),
            (OutStream::Stderr, if self.stdio.terminal { String::new() } else { self.stdio.stderr.clone() }),
        ];
        for (stream, target) in outs {
            if stdio::spawn_output(
                agent.clone(),
                self.container_id.clone(),
                self.exec_id.clone(),
                stream,
                target,
                control.clone(),
                log_id.into(),
            )
            .is_some()
            {
                n += 1;
            }
        }
        stdio::spawn_input(agent.clone(), self.container_id.clone(), self.exec_id.clone(), self.stdio.stdin.clone(), log_id.into());
        *self.drained.lock().unwrap_or_else(|p| p.into_inner()) = Some((rx, n));
        // send_replace: `send` drops the value when no receiver is subscribed yet.
        self.attached.send_replace(true);
    }

    /// Waits (bounded) until the output copiers have passed on everything; past the
    /// bound they are told to stop, so the FIFOs close and an attached client ends.
    fn wait_drained(&self) {
        let taken = self.drained.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((rx, n)) = taken {
            let deadline = std::time::Instant::now() + OUTPUT_DRAIN;
            for _ in 0..n {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if rx.recv_timeout(left).is_err() {
                    self.abandon_output.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
        stdio::release_stdin(&self.stdio.stdin);
    }
}

struct Container {
    bundle: PathBuf,
    is_sandbox: bool,
    rootfs: Option<PathBuf>,
    /// Its host files and volumes bind-mounted into the share (`share::mount_all`).
    shared: Vec<PathBuf>,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    config: Mutex<Option<Config>>,
    sandbox: tokio::sync::Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Container>>,
}

#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

/// The runtime config's path: containerd's runtime option `ConfigPath`, else
/// `$VFVM_CONFIG`, else the default.
pub fn config_path(options_config_path: Option<String>) -> PathBuf {
    if let Some(p) = options_config_path.filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::var_os("VFVM_CONFIG").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH))
}

/// `runtimeoptions.v1.Options` (containerd's options for non-runc runtimes) is
/// `{string type_url = 1; string config_path = 2;}`: read field 2 by hand rather
/// than carry the whole proto for one string.
pub fn options_config_path(any: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>) -> Option<String> {
    let any = any?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = containerd_shim::protos::protobuf::CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if wire != 2 {
            return None;
        }
        let s = input.read_string().ok()?;
        if field == 2 {
            return Some(s);
        }
    }
    None
}

impl TaskService {
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> TaskService {
        TaskService {
            inner: Arc::new(Inner {
                namespace: namespace.into(),
                publisher,
                exit,
                config: Mutex::new(None),
                sandbox: tokio::sync::Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = ttrpc::context::with_timeout(0);
        if let Err(e) = self.inner.publisher.publish(ctx, topic, &self.inner.namespace, event).await {
            tracing::warn!("publishing {topic}: {e}");
        }
    }

    fn process(&self, id: &str, exec_id: &str) -> ttrpc::Result<(Arc<Process>, PathBuf)> {
        let cs = self.inner.containers.lock().unwrap_or_else(|p| p.into_inner());
        let c = cs.get(id).ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))?;
        if exec_id.is_empty() {
            return Ok((c.init.clone(), c.bundle.clone()));
        }
        let p = c.execs.get(exec_id).ok_or_else(|| status(Code::NOT_FOUND, format!("exec {exec_id} of container {id} not found")))?;
        Ok((p.clone(), c.bundle.clone()))
    }

    async fn sandbox(&self) -> ttrpc::Result<Arc<Sandbox>> {
        self.inner.sandbox.lock().await.clone().ok_or_else(|| status(Code::FAILED_PRECONDITION, "the pod's VM is not running"))
    }

    fn pid(sb: Option<&Arc<Sandbox>>) -> u32 {
        sb.map_or(0, |s| s.vmm_pid)
    }

    /// Follows the agent's process-exit events until the VM goes away; then every
    /// process still running has exited with [`VM_GONE_STATUS`].
    fn watch_events(&self, sb: Arc<Sandbox>) {
        let followed = events::follow(sb.agent.clone(), Arc::new(self.clone()), tokio::runtime::Handle::current(), sb.id.clone());
        if let Err(e) = followed {
            tracing::error!(sandbox = %sb.id, "cannot follow the agent's events: {e}");
        }
    }

    async fn vm_gone(&self) {
        let running: Vec<(String, String)> = {
            let cs = self.inner.containers.lock().unwrap_or_else(|p| p.into_inner());
            cs.iter()
                .flat_map(|(id, c)| {
                    std::iter::once((id.clone(), String::new())).chain(c.execs.keys().map(move |e| (id.clone(), e.clone())))
                })
                .collect()
        };
        for (id, exec) in running {
            self.process_exited(&id, &exec, VM_GONE_STATUS, now_nanos(), true).await;
        }
    }

    async fn process_exited(&self, id: &str, exec_id: &str, code: u32, at: u64, vm_gone: bool) {
        let Ok((p, _)) = self.process(id, exec_id) else { return };
        if p.phase().0 == Phase::Stopped {
            return;
        }
        if !vm_gone {
            let mut attached = p.attached.subscribe();
            let _ = tokio::time::timeout(sandbox::AGENT_CALL_TIMEOUT, attached.wait_for(|a| *a)).await;
        }
        let p2 = p.clone();
        let _ = tokio::task::spawn_blocking(move || p2.wait_drained()).await;
        let at = if at == 0 { now_nanos() } else { at };
        p.set(Phase::Stopped, code, at);
        // send_replace: a Wait that subscribes later must still see the exit.
        p.exited.send_replace(true);
        let pid = Self::pid(self.inner.sandbox.lock().await.as_ref());
        let ev = TaskExit {
            container_id: id.into(),
            id: if exec_id.is_empty() { id.into() } else { exec_id.into() },
            pid,
            exit_status: code,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        };
        tracing::info!(container = id, exec = exec_id, code, "process exited");
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
    }

    fn load_config(&self, options: Option<String>) -> ttrpc::Result<Config> {
        let mut slot = self.inner.config.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let path = config_path(options);
        let c = Config::load(&path).map_err(|e| status(Code::FAILED_PRECONDITION, format!("vfvm runtime config: {e}")))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Mounts the container's rootfs (containerd's mounts, or the bundle's
    /// `rootfs`) at [`sandbox::container_rootfs`], journaled first.
    fn mount_rootfs(
        sb: &Sandbox,
        id: &str,
        bundle: &Path,
        mounts: &[containerd_shim::protos::types::mount::Mount],
    ) -> ttrpc::Result<PathBuf> {
        let target = sandbox::container_rootfs(&sb.dir, id);
        std::fs::create_dir_all(&target).map_err(|e| status(Code::INTERNAL, format!("creating {}: {e}", target.display())))?;
        sb.journal.will_mount(&target).map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        let r = match mounts {
            [] => sandbox::mount(&bundle.join("rootfs"), &target, None, libc::MS_BIND | libc::MS_REC, None),
            [m] => {
                let mut flags = 0;
                let mut data = Vec::new();
                for o in &m.options {
                    match o.as_str() {
                        "ro" => flags |= libc::MS_RDONLY,
                        "bind" => flags |= libc::MS_BIND,
                        "rbind" => flags |= libc::MS_BIND | libc::MS_REC,
                        "nosuid" => flags |= libc::MS_NOSUID,
                        "nodev" => flags |= libc::MS_NODEV,
                        "rw" => {}
                        other => data.push(other.to_string()),
                    }
                }
                let data = data.join(",");
                sandbox::mount(
                    Path::new(&m.source),
                    &target,
                    Some(&m.type_).filter(|t| !t.is_empty() && flags & libc::MS_BIND == 0).map(String::as_str),
                    flags,
                    Some(&data).filter(|d| !d.is_empty()).map(String::as_str),
                )
            }
            _ => return Err(status(Code::INVALID_ARGUMENT, format!("container {id}: {} rootfs mounts; expected one", mounts.len()))),
        };
        if let Err(e) = r {
            let _ = sb.journal.unmounted(&target);
            return Err(status(Code::INTERNAL, format!("mounting the rootfs of {id} at {}: {e}", target.display())));
        }
        Ok(target)
    }

    async fn remove_container(&self, id: &str) -> ttrpc::Result<(Container, Option<Arc<Sandbox>>)> {
        let c = self
            .inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))?;
        let sb = self.inner.sandbox.lock().await.clone();
        if let Some(sb) = &sb {
            let cid = id.to_string();
            if let Err(e) = call(&sb.agent, "RemoveContainer", move |a| {
                let mut r = agent_api::RemoveContainerRequest::new();
                r.container_id = cid;
                a.remove_container(sandbox::ctx(), &r)
            })
            .await
            {
                tracing::debug!(container = id, "{e}");
            }
            // Its shared files and volumes, then its rootfs; its directory goes only
            // once nothing is mounted under it (else the sandbox's teardown retries).
            let mounts: Vec<PathBuf> = c.rootfs.iter().chain(c.shared.iter()).cloned().collect();
            let errors = share::unmount_all(&sb.journal, &mounts);
            for e in &errors {
                tracing::warn!(sandbox = %sb.id, container = id, "{e}");
            }
            if errors.is_empty() {
                if let Some(dir) = c.rootfs.as_ref().and_then(|r| r.parent()) {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
        Ok((c, sb))
    }
}

#[async_trait]
impl EventSink for TaskService {
    fn is_running(&self, container_id: &str, exec_id: &str) -> bool {
        self.process(container_id, exec_id).is_ok_and(|(p, _)| p.phase().0 != Phase::Stopped)
    }

    fn has_container(&self, container_id: &str) -> bool {
        self.inner.containers.lock().unwrap_or_else(|p| p.into_inner()).contains_key(container_id)
    }

    async fn exited(&self, container_id: String, exec_id: String, exit_status: u32, exited_at_unix_nanos: u64) {
        self.process_exited(&container_id, &exec_id, exit_status, exited_at_unix_nanos, false).await;
    }

    async fn oom_killed(&self, container_id: String) {
        self.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(TaskOOM { container_id, ..Default::default() })).await;
    }

    async fn stream_ended(&self, reason: String) {
        // An agent that stopped answering: say what the VM's vCPUs are doing, so a
        // guest stalled inside KVM is told apart from a VMM that holds it back.
        // try_lock: a stop holding the sandbox may be waiting for the exits below.
        let sandbox = self.inner.sandbox.try_lock().ok().and_then(|s| s.clone());
        if let Some(sb) = sandbox {
            if reason.contains("timeout") || reason.contains("timed out") {
                let vcpus = vfvm_protocols::vcpu_threads::describe(&vfvm_protocols::vcpu_threads::vcpu_threads(sb.vmm_pid));
                tracing::warn!(sandbox = %sb.id, "the agent stopped answering ({reason}); the VM's vCPU threads: {vcpus}");
            }
            // Its processes are reported gone below, so the VM must be too: a VM left
            // running with a dead agent keeps the pod's mounts and VFs, and containerd
            // would see a sandbox that is neither running nor stopped. Idempotent, and
            // quick when the VMM already exited.
            let stopping = sb.clone();
            tokio::spawn(async move { stopping.stop().await });
        }
        self.vm_gone().await;
    }
}

#[async_trait]
impl containerd_shim::protos::shim_async::Task for TaskService {
    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> ttrpc::Result<api::StateResponse> {
        let (p, bundle) = self.process(&req.id, &req.exec_id)?;
        let (phase, code, at) = p.phase();
        let pid = Self::pid(self.inner.sandbox.lock().await.as_ref());
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: bundle.to_string_lossy().into_owned(),
            pid,
            status: match phase {
                Phase::Created => Status::CREATED,
                Phase::Running => Status::RUNNING,
                Phase::Stopped => Status::STOPPED,
            }
            .into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: code,
            exited_at: if phase == Phase::Stopped { MessageField::some(timestamp(at)) } else { MessageField::none() },
            ..Default::default()
        })
    }

    async fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> ttrpc::Result<api::CreateTaskResponse> {
        let id = req.id.clone();
        if !req.checkpoint.is_empty() {
            return Err(status(Code::UNIMPLEMENTED, "vfvm does not restore checkpoints"));
        }
        let bundle_dir = PathBuf::from(&req.bundle);
        let bundle = Bundle::load(&bundle_dir).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        // Checked before anything is made of them (paths, the guest's command line).
        let sandbox_id = bundle.sandbox_id(&id).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let stdio_paths =
            StdioPaths { stdin: req.stdin.clone(), stdout: req.stdout.clone(), stderr: req.stderr.clone(), terminal: req.terminal };
        stdio::validate(&stdio_paths).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        if self.inner.containers.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&id) {
            return Err(status(Code::ALREADY_EXISTS, format!("container {id} exists")));
        }
        let is_sandbox = bundle.is_sandbox(&id).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let sb = {
            let mut slot = self.inner.sandbox.lock().await;
            match slot.clone() {
                Some(sb) => sb,
                None => {
                    let config = self.load_config(options_config_path(req.options.as_ref()))?;
                    let settings =
                        config.sandbox_settings(&bundle.annotations).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
                    let spec = LaunchSpec { id: sandbox_id.clone(), settings, netns: bundle.netns(), hostname: bundle.hostname() };
                    match spec.settings.pod_resources {
                        Some(pod) => tracing::info!(
                            sandbox = %spec.id, vcpus = spec.settings.vcpus, memory_mib = spec.settings.memory_mib,
                            pod_cpus = pod.cpus, pod_memory_mib = pod.memory_mib,
                            "starting the pod's VM: the base plus the pod's resources"
                        ),
                        None => tracing::info!(
                            sandbox = %spec.id, vcpus = spec.settings.vcpus, memory_mib = spec.settings.memory_mib,
                            "starting the pod's VM: no pod resources from containerd, the base size"
                        ),
                    }
                    let sb = Arc::new(Sandbox::launch(&config, spec).await.map_err(sandbox_status)?);
                    self.watch_events(sb.clone());
                    *slot = Some(sb.clone());
                    sb
                }
            }
        };
        let rootfs = Self::mount_rootfs(&sb, &id, &bundle_dir, &req.rootfs)?;
        let guest_dir = format!("{}/{id}", agent_api::GUEST_SHARED_DIR);
        let shared = bundle.guest_spec(&format!("{guest_dir}/files")).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string())).and_then(
            |(spec, shares)| {
                share::mount_all(&sb.journal, &sandbox::container_files(&sb.dir, &id), &shares)
                    .map(|made| (spec, made))
                    .map_err(|e| status(Code::INTERNAL, e.to_string()))
            },
        );
        let (spec_json, shared) = match shared {
            Ok(v) => v,
            Err(e) => {
                share::unmount_all(&sb.journal, std::slice::from_ref(&rootfs));
                return Err(e);
            }
        };
        let init = Process::new(&id, "", stdio_paths.clone(), None);
        self.inner.containers.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id.clone(),
            Container { bundle: bundle_dir.clone(), is_sandbox, rootfs: Some(rootfs), shared, init: init.clone(), execs: HashMap::new() },
        );
        let mut creq = agent_api::CreateContainerRequest::new();
        creq.container_id = id.clone();
        creq.oci_spec_json = spec_json;
        creq.rootfs_path = format!("{guest_dir}/rootfs");
        creq.terminal = req.terminal;
        if let Err(e) = call(&sb.agent, "CreateContainer", move |a| a.create_container(sandbox::ctx(), &creq)).await {
            let _ = self.remove_container(&id).await;
            return Err(status(Code::INTERNAL, format!("creating container {id} in the VM: {e}")));
        }
        init.attach(&sb.agent, &sb.id);
        let ev = TaskCreate {
            container_id: id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid: sb.vmm_pid,
            ..Default::default()
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev)).await;
        Ok(api::CreateTaskResponse { pid: sb.vmm_pid, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> ttrpc::Result<api::StartResponse> {
        let sb = self.sandbox().await?;
        let (p, _) = self.process(&req.id, &req.exec_id)?;
        if p.phase().0 != Phase::Created {
            return Err(status(Code::FAILED_PRECONDITION, format!("{} {} is not in the created state", req.id, req.exec_id)));
        }
        let (id, exec) = (req.id.clone(), req.exec_id.clone());
        if exec.is_empty() {
            call(&sb.agent, "StartContainer", move |a| {
                let mut r = agent_api::StartContainerRequest::new();
                r.container_id = id;
                a.start_container(sandbox::ctx(), &r)
            })
            .await
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        } else {
            let mut r = agent_api::ExecProcessRequest::new();
            r.container_id = id;
            r.exec_id = exec;
            r.oci_process_json = p.exec_spec.clone().unwrap_or_default();
            r.terminal = p.stdio.terminal;
            call(&sb.agent, "ExecProcess", move |a| a.exec_process(sandbox::ctx(), &r))
                .await
                .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
            // The agent keeps what the process writes until it is read: attaching
            // once the exec exists loses nothing.
            p.attach(&sb.agent, &sb.id);
        }
        // An exit event may already have marked it stopped.
        if p.phase().0 == Phase::Created {
            p.set(Phase::Running, 0, 0);
        }
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart { container_id: req.id.clone(), pid: sb.vmm_pid, ..Default::default() }),
            )
            .await;
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid: sb.vmm_pid,
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(api::StartResponse { pid: sb.vmm_pid, ..Default::default() })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> ttrpc::Result<api::DeleteResponse> {
        let pid = Self::pid(self.inner.sandbox.lock().await.as_ref());
        if !req.exec_id.is_empty() {
            let (p, _) = self.process(&req.id, &req.exec_id)?;
            let (phase, code, at) = p.phase();
            if phase == Phase::Running {
                return Err(status(Code::FAILED_PRECONDITION, format!("exec {} is still running", req.exec_id)));
            }
            if let Some(c) = self.inner.containers.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
            return Ok(api::DeleteResponse {
                pid,
                exit_status: code,
                exited_at: MessageField::some(timestamp(at.max(1))),
                ..Default::default()
            });
        }
        let (p, _) = self.process(&req.id, "")?;
        let (phase, code, at) = p.phase();
        if phase == Phase::Running {
            return Err(status(Code::FAILED_PRECONDITION, format!("container {} is still running", req.id)));
        }
        let (c, sb) = self.remove_container(&req.id).await?;
        stdio::release_stdin(&c.init.stdio.stdin);
        let at = if at == 0 { now_nanos() } else { at };
        let last = self.inner.containers.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
        if let Some(sb) = sb {
            if c.is_sandbox || last {
                tracing::info!(sandbox = %sb.id, "stopping the pod's VM");
                sb.stop().await;
                *self.inner.sandbox.lock().await = None;
            }
        }
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid,
                exit_status: code,
                exited_at: MessageField::some(timestamp(at)),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::DeleteResponse { pid, exit_status: code, exited_at: MessageField::some(timestamp(at)), ..Default::default() })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> ttrpc::Result<api::PidsResponse> {
        let sb = self.sandbox().await?;
        let id = req.id.clone();
        let pids = call(&sb.agent, "ListProcesses", move |a| sandbox::list_processes(a, &id))
            .await
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        let processes =
            pids.into_iter().map(|pid| containerd_shim::protos::types::task::ProcessInfo { pid, ..Default::default() }).collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> ttrpc::Result<Empty> {
        Err(status(Code::UNIMPLEMENTED, "vfvm does not pause containers (pause the pod's VM is not offered yet)"))
    }

    async fn resume(&self, _ctx: &TtrpcContext, _req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        Err(status(Code::UNIMPLEMENTED, "vfvm does not pause or resume containers"))
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> ttrpc::Result<Empty> {
        Err(status(Code::UNIMPLEMENTED, "vfvm does not checkpoint containers"))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        let (p, _) = self.process(&req.id, &req.exec_id)?;
        if p.phase().0 == Phase::Stopped {
            return Ok(Empty::new());
        }
        let sb = self.sandbox().await?;
        let mut r = agent_api::SignalProcessRequest::new();
        r.container_id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.signal = req.signal;
        r.all = req.all;
        call(&sb.agent, "SignalProcess", move |a| a.signal_process(sandbox::ctx(), &r))
            .await
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> ttrpc::Result<Empty> {
        let stdio_paths =
            StdioPaths { stdin: req.stdin.clone(), stdout: req.stdout.clone(), stderr: req.stderr.clone(), terminal: req.terminal };
        stdio::validate(&stdio_paths).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        let spec = req.spec.as_ref().map(|a| a.value.clone()).ok_or_else(|| status(Code::INVALID_ARGUMENT, "exec: no process spec"))?;
        {
            let mut cs = self.inner.containers.lock().unwrap_or_else(|p| p.into_inner());
            let c = cs.get_mut(&req.id).ok_or_else(|| status(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
            if c.execs.contains_key(&req.exec_id) {
                return Err(status(Code::ALREADY_EXISTS, format!("exec {} exists", req.exec_id)));
            }
            c.execs.insert(req.exec_id.clone(), Process::new(&req.id, &req.exec_id, stdio_paths, Some(spec)));
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded { container_id: req.id.clone(), exec_id: req.exec_id.clone(), ..Default::default() }),
        )
        .await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> ttrpc::Result<Empty> {
        let sb = self.sandbox().await?;
        let mut r = agent_api::TtyWinResizeRequest::new();
        r.container_id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.rows = req.height;
        r.columns = req.width;
        call(&sb.agent, "TtyWinResize", move |a| a.tty_win_resize(sandbox::ctx(), &r))
            .await
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> ttrpc::Result<Empty> {
        let (p, _) = self.process(&req.id, &req.exec_id)?;
        // The stdin copier ends when containerd closes its end of the FIFO, and
        // then closes the process's stdin itself; this makes sure.
        stdio::release_stdin(&p.stdio.stdin);
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let sb = self.sandbox().await?;
        let resources =
            req.resources.as_ref().map(|a| a.value.clone()).ok_or_else(|| status(Code::INVALID_ARGUMENT, "update: no resources"))?;
        let mut r = agent_api::UpdateContainerRequest::new();
        r.container_id = req.id.clone();
        r.resources_json = resources;
        call(&sb.agent, "UpdateContainer", move |a| a.update_container(sandbox::ctx(), &r))
            .await
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> ttrpc::Result<api::WaitResponse> {
        let (p, _) = self.process(&req.id, &req.exec_id)?;
        let mut rx = p.exited.subscribe();
        let _ = rx.wait_for(|done| *done).await;
        let (_, code, at) = p.phase();
        Ok(api::WaitResponse { exit_status: code, exited_at: MessageField::some(timestamp(at)), ..Default::default() })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> ttrpc::Result<api::StatsResponse> {
        use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
        let sb = self.sandbox().await?;
        let id = req.id.clone();
        let is_sandbox = self.inner.containers.lock().unwrap_or_else(|p| p.into_inner()).get(&id).is_some_and(|c| c.is_sandbox);
        let s = call(&sb.agent, "StatsContainer", move |a| {
            let mut r = agent_api::StatsContainerRequest::new();
            r.container_id = id;
            a.stats_container(sandbox::ctx(), &r)
        })
        .await
        .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        let vm = VmFigures {
            memory_bytes: s.guest_memory_total_bytes,
            memory_used_bytes: s.guest_memory_total_bytes.saturating_sub(s.guest_memory_available_bytes),
            cpu_usage_nanos: s.guest_cpu_usage_nanos,
        };
        // The sandbox (pause) container stands for the pod: its figures are the
        // whole VM's, whose size is the pod's ceiling. A container's are its
        // cgroup's; without a memory limit of its own, the VM is its limit.
        let (cpu_nanos, usage, limit) = if is_sandbox {
            (vm.cpu_usage_nanos, vm.memory_used_bytes, vm.memory_bytes)
        } else {
            (s.cpu_usage_nanos, s.memory_usage_bytes, effective_memory_limit(s.memory_limit_bytes, vm.memory_bytes))
        };
        let m = Metrics {
            cpu: MessageField::some(CPUStat { usage_usec: cpu_nanos / 1000, ..Default::default() }),
            memory: MessageField::some(MemoryStat { usage, usage_limit: limit, ..Default::default() }),
            pids: MessageField::some(PidsStat { current: s.pids_current, ..Default::default() }),
            ..Default::default()
        };
        let any = containerd_shim::util::convert_to_any(Box::new(m)).map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn connect(&self, _ctx: &TtrpcContext, _req: api::ConnectRequest) -> ttrpc::Result<api::ConnectResponse> {
        let pid = Self::pid(self.inner.sandbox.lock().await.as_ref());
        Ok(api::ConnectResponse { shim_pid: std::process::id(), task_pid: pid, ..Default::default() })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> ttrpc::Result<Empty> {
        if !self.inner.containers.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            return Ok(Empty::new());
        }
        if let Some(sb) = self.inner.sandbox.lock().await.take() {
            sb.stop().await;
        }
        self.inner.exit.signal();
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;

    #[test]
    fn a_containers_memory_ceiling_is_its_limit_within_the_vm() {
        assert_eq!(effective_memory_limit(0, 1792 << 20), 1792 << 20);
        assert_eq!(effective_memory_limit(768 << 20, 1792 << 20), 768 << 20);
        assert_eq!(effective_memory_limit(4096 << 20, 1792 << 20), 1792 << 20);
        assert_eq!(effective_memory_limit(768 << 20, 0), 768 << 20);
    }

    #[test]
    fn the_config_path_comes_from_the_runtime_options() {
        // runtimeoptions.v1.Options{type_url: "x", config_path: "/etc/vfvm/other.toml"}
        let mut value = vec![0x0a, 1, b'x', 0x12, 20];
        value.extend_from_slice(b"/etc/vfvm/other.toml");
        let any = Any { type_url: "runtimeoptions.v1.Options".into(), value, ..Default::default() };
        assert_eq!(options_config_path(Some(&any)).as_deref(), Some("/etc/vfvm/other.toml"));
        let other = Any { type_url: "containerd.runc.v1.Options".into(), value: vec![0x12, 1, b'y'], ..Default::default() };
        assert_eq!(options_config_path(Some(&other)), None);
        let truncated = Any { type_url: "runtimeoptions.v1.Options".into(), value: vec![0x12, 50, b'y'], ..Default::default() };
        assert_eq!(options_config_path(Some(&truncated)), None);
        assert_eq!(config_path(Some("/x.toml".into())), PathBuf::from("/x.toml"));
    }
}
