//! `containerd-shim-vfvm-v2`: the containerd shim v2 that runs a pod sandbox in a vfvm VM.
//!
//! containerd runs this binary three ways (runtime v2 protocol):
//! - `start`: find or spawn the pod's shim server and print its address. One
//!   server per pod: containers carrying CRI's sandbox-id annotation join it.
//! - `delete`: clean up after a shim that died (stop its VMM, undo its mounts,
//!   give back its VFs) and print a DeleteResponse.
//! - no action (`-socket` given): serve the Task API until the pod is gone.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::protos::ttrpc::r#async::{transport::Listener, Server};
use containerd_shim::{asynchronous::publisher::RemotePublisher, ExitSignal, Flags, StartOpts};
use vfvm_shim::bundle::Bundle;
use vfvm_shim::service::{config_path, TaskService};

const RUNTIME_NAME: &str = "io.containerd.vfvm.v2";
/// containerd 2.x calls the task API by this name; containerd 1.x by the v2 one.
const TASK_V3: &str = "containerd.task.v3.Task";
const TASK_V2: &str = "containerd.task.v2.Task";

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).and_then(|a| a.to_str()) == Some("--version") {
        println!("containerd-shim-vfvm-v2 {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-vfvm-v2: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[std::ffi::OsString]) -> Result<()> {
    let flags = containerd_shim::parse(args.get(1..).unwrap_or_default()).map_err(|e| anyhow::anyhow!("bad arguments: {e}"))?;
    if flags.version {
        println!("containerd-shim-vfvm-v2 {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if flags.info {
        let info = containerd_shim::protos::types::introspection::RuntimeInfo { name: RUNTIME_NAME.into(), ..Default::default() };
        use std::io::Write;
        std::io::stdout().write_all(&info.write_to_bytes()?)?;
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")?;
    match flags.action.as_str() {
        "start" => rt.block_on(start(&flags)),
        "delete" => rt.block_on(delete(&flags)),
        "" => rt.block_on(serve(&flags)),
        other => bail!("unknown action {other:?}: expected start, delete, or none (serve)"),
    }
}

fn bundle_dir(flags: &Flags) -> Result<PathBuf> {
    if !flags.bundle.is_empty() {
        return Ok(PathBuf::from(&flags.bundle));
    }
    std::env::current_dir().context("the bundle directory (the working directory containerd gives the shim)")
}

/// Logs go to the bundle's `log` FIFO (containerd copies them into its own log),
/// or stderr when there is none; every line names the sandbox.
fn init_logging(bundle: &Path, debug: bool, sandbox: &str) {
    let level = if debug { tracing::Level::DEBUG } else { tracing::Level::INFO };
    let log = std::fs::OpenOptions::new().write(true).open(bundle.join("log"));
    let builder = tracing_subscriber::fmt().with_max_level(level).with_ansi(false).with_target(false);
    let _ = match log {
        Ok(f) => builder.with_writer(Mutexed(std::sync::Mutex::new(f))).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
    tracing::info!(sandbox, "containerd-shim-vfvm-v2 {}", env!("CARGO_PKG_VERSION"));
}

struct Mutexed(std::sync::Mutex<std::fs::File>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Mutexed {
    type Writer = MutexedWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        MutexedWriter(self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

struct MutexedWriter<'a>(std::sync::MutexGuard<'a, std::fs::File>);

impl std::io::Write for MutexedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The pod the container `flags.id` belongs to, from its bundle (the container itself
/// when the bundle cannot be read). Both ids checked against containerd's grammar
/// before they become paths: nothing is done with a bad one.
fn sandbox_of(flags: &Flags, bundle: &Path) -> Result<String> {
    vfvm_shim::ids::validate("container id", &flags.id)?;
    match Bundle::load(bundle) {
        Ok(b) => Ok(b.sandbox_id(&flags.id)?),
        Err(_) => Ok(flags.id.clone()),
    }
}

async fn start(flags: &Flags) -> Result<()> {
    let bundle = bundle_dir(flags)?;
    let grouping = sandbox_of(flags, &bundle)?;
    // Runtime options arrive on stdin; the server reads them again from Create.
    let mut sink = Vec::new();
    use std::io::Read;
    let _ = std::io::stdin().take(1 << 20).read_to_end(&mut sink);
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    if opts.ttrpc_address.is_empty() {
        bail!("TTRPC_ADDRESS is not set: containerd sets it when it starts a shim");
    }
    let address = containerd_shim::spawn(opts, &grouping, Vec::new())
        .await
        .map_err(|e| anyhow::anyhow!("starting the shim server for pod {grouping}: {e}"))?;
    std::fs::write(bundle.join("address"), &address).with_context(|| format!("writing {}", bundle.join("address").display()))?;
    // A plain address: containerd 1.6 reads nothing else, and containerd 2.x takes
    // it for a task v2 shim, which this one also is.
    use std::io::Write;
    let mut out = std::io::stdout();
    out.write_all(address.as_bytes())?;
    out.flush()?;
    Ok(())
}

async fn delete(flags: &Flags) -> Result<()> {
    let bundle = bundle_dir(flags)?;
    let sandbox = sandbox_of(flags, &bundle)?;
    init_logging(&bundle, flags.debug, &sandbox);
    let config = vfvm_shim::config::Config::load(&config_path(None));
    let state_dir = config.as_ref().map(|c| c.runtime.state_dir.clone()).unwrap_or_else(|_| PathBuf::from("/run/vfvm"));
    if sandbox == flags.id {
        // The pod itself: its VM (which holds the VFs' VFIO fds), then its VFs
        // (journaled in its state dir), mounts and state go, in that order.
        let lock_dir = config.as_ref().map(|c| c.sriov.lock_dir.clone()).unwrap_or_else(|_| PathBuf::from("/run/vfvm/vf-locks"));
        let dir = vfvm_shim::config::sandbox_dir_in(&state_dir, &lock_dir, &sandbox)?;
        let done = vfvm_shim::record::undo(&dir, &lock_dir, Vec::new()).with_context(|| format!("cleaning up sandbox {sandbox}"))?;
        if !done.errors.is_empty() {
            // The state (and any VF journal) stays for the next delete to retry.
            tracing::error!(sandbox, errors = ?done.errors, "sandbox not fully cleaned up");
        }
        tracing::info!(
            sandbox,
            killed = ?done.killed,
            vfs_restored = done.vfs_restored,
            unmounted = done.unmounted.len(),
            errors = ?done.errors,
            "cleaned up after the shim"
        );
    } else {
        // One container of a pod whose shim died: its rootfs mount goes.
        let rootfs = vfvm_shim::sandbox::container_rootfs(&state_dir.join(&sandbox), &flags.id);
        if let Err(e) = vfvm_shim::record::unmount(&rootfs) {
            tracing::warn!(sandbox, container = %flags.id, "unmounting {}: {e}", rootfs.display());
        }
    }
    let mut resp = containerd_shim::DeleteResponse::new();
    resp.exit_status = 137; // SIGKILL: what a container whose shim died got
    resp.exited_at =
        containerd_shim::protos::protobuf::MessageField::some(containerd_shim::util::timestamp().map_err(|e| anyhow::anyhow!("{e}"))?);
    use std::io::Write;
    std::io::stdout().write_all(&resp.write_to_bytes()?)?;
    Ok(())
}

async fn serve(flags: &Flags) -> Result<()> {
    let bundle = bundle_dir(flags)?;
    let sandbox = sandbox_of(flags, &bundle)?;
    init_logging(&bundle, flags.debug, &sandbox);
    let socket = flags.socket.strip_prefix("unix://").unwrap_or(&flags.socket).to_string();
    if socket.is_empty() {
        bail!("-socket is empty: containerd names the shim's socket");
    }
    let listener = match bind(&socket) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                // The pod's shim already serves here: this container joins it.
                tracing::info!(sandbox, "joining the pod's running shim at {socket}");
                std::fs::write("address", &flags.socket).context("writing the address file")?;
                signal_started();
                return Ok(());
            }
            std::fs::remove_file(&socket).with_context(|| format!("removing the stale socket {socket}"))?;
            bind(&socket).with_context(|| format!("listening on {socket}"))?
        }
        Err(e) => return Err(e).with_context(|| format!("listening on {socket}")),
    };
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS")?;
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to containerd's events at {ttrpc_address}: {e}"))?;
    let exit = Arc::new(ExitSignal::default());
    let service = Arc::new(TaskService::new(&flags.namespace, publisher, exit.clone()));
    let mut services = create_task(service.clone());
    let mut v2 = create_task(service);
    if let Some(s) = v2.remove(TASK_V3) {
        services.insert(TASK_V2.to_string(), s);
    }
    let listener = Listener::try_from(listener).context("ttrpc listener")?;
    let mut server = Server::new().add_listener(listener).register_service(services);
    server.start().await.map_err(|e| anyhow::anyhow!("starting the ttrpc server: {e}"))?;
    signal_started();
    tracing::info!(sandbox, "serving the task API on {socket}");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = exit.wait() => {}
        _ = term.recv() => tracing::info!(sandbox, "SIGTERM"),
    }
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!(sandbox, "shim exiting");
    Ok(())
}

fn bind(path: &str) -> std::io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = Path::new(path).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::os::unix::net::UnixListener::bind(path)
}

/// `start` waits for our stdout to close: point it at stderr (containerd's `start`
/// reads everything up to EOF).
fn signal_started() {
    // SAFETY: dup2 on the process's own standard descriptors.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}
