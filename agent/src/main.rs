//! `vfvm-agent`: PID 1 of a vfvm guest. Mounts the basic filesystems, loads the
//! image's boot modules (what serving over vsock needs), starts loading the others on
//! demand (device drivers by modalias: the PCI devices present now and those
//! hot-plugged later), reaps orphans, and serves the agent API (ttrpc) on vsock for
//! the shim. Outside a VM (`--no-init`) it serves on any address, which is how the
//! host tests run it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use vfvm_agent::network::{Network, Options};
use vfvm_agent::{init, logging, modules, service::AgentService};
use vfvm_netlink::Netns;

const USAGE: &str = "\
usage: vfvm-agent [--listen ADDR] [--no-init] [--netns PATH] [--resolv-conf PATH]
                  [--modules-dir DIR] [--modules-manifest PATH]

  As PID 1 it loads the modules listed in DIR/modules.load (DIR defaults to
  /lib/modules/<running kernel>), one path relative to DIR per line, in order;
  the other modules of DIR/modules.dep are loaded when needed: device drivers by
  the devices' modaliases (DIR/modules.alias), at boot and on hot-plug, and the
  modules of what the agent mounts or creates (virtiofs, overlay, 8021q).

  --listen ADDR   where to serve the agent API (default vsock://-1:1024; unix://PATH)
  --no-init       not PID 1: skip mounts, module loading and reaping
  --netns PATH    configure interfaces in this network namespace (tests)
  --log-vsock-port N  also send logs to the host (CID 2) on this vsock port; as PID 1
                  the kernel command line's vfvm.log_port=N asks the same
  --insert-module PATH  insert one module file (.ko, or .ko.zst as the image stores
                  its on-demand modules) into the running kernel and exit: the
                  image's tests load every module through it";

/// The vsock port the shim connects to.
const DEFAULT_LISTEN: &str = "vsock://-1:1024";
/// The image builder's module list, relative to `/lib/modules/<release>/`.
const MANIFEST_NAME: &str = "modules.load";

struct Args {
    listen: String,
    init: bool,
    netns: Option<PathBuf>,
    resolv_conf: Option<PathBuf>,
    manifest: Option<PathBuf>,
    modules_dir: Option<PathBuf>,
    log_port: Option<u32>,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        listen: DEFAULT_LISTEN.into(),
        init: std::process::id() == 1,
        netns: None,
        resolv_conf: None,
        manifest: None,
        modules_dir: None,
        log_port: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value\n\n{USAGE}"));
        match flag.as_str() {
            "--listen" => a.listen = value()?,
            "--no-init" => a.init = false,
            "--netns" => a.netns = Some(value()?.into()),
            "--resolv-conf" => a.resolv_conf = Some(value()?.into()),
            "--modules-manifest" => a.manifest = Some(value()?.into()),
            "--modules-dir" => a.modules_dir = Some(value()?.into()),
            "--log-vsock-port" => a.log_port = Some(value()?.parse().context("--log-vsock-port: expected a port number")?),
            "--version" => {
                println!("vfvm-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "--insert-module" => {
                use vfvm_agent::modules::ModuleSink;
                let path = PathBuf::from(value()?);
                match vfvm_agent::modules::RunningKernel.insert(&path) {
                    Ok(()) => std::process::exit(0),
                    Err(e) => {
                        eprintln!("vfvm-agent: inserting {}: {e}", path.display());
                        std::process::exit(1);
                    }
                }
            }
            // As PID 1 the kernel passes unknown command-line words as arguments.
            other if a.init => tracing::debug!("ignoring argument {other:?}"),
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    Ok(a)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn run(a: Args) -> Result<()> {
    if a.init {
        init::spawn_reaper().context("starting the reaper")?;
        init::mount_filesystems().context("mounting filesystems")?;
        let dir = a.modules_dir.clone().unwrap_or_else(|| PathBuf::from("/lib/modules").join(kernel_release()));
        let manifest = a.manifest.clone().unwrap_or_else(|| dir.join(MANIFEST_NAME));
        match init::load_modules(&manifest, &dir) {
            Ok(n) => tracing::info!("loaded {n} kernel modules from {}", manifest.display()),
            Err(e) if !manifest.exists() => tracing::info!("no module manifest ({e})"),
            Err(e) => return Err(e).context("loading kernel modules"),
        }
        modules_on_demand(&dir)?;
    }
    // The vsock transport is loaded now: mirror the logs to the host if it asked.
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(port) = a.log_port.or_else(|| if a.init { logging::log_port_from_cmdline(&cmdline) } else { None }) {
        match logging::connect_vsock(port, std::time::Duration::from_secs(2)) {
            Ok(()) => tracing::info!("logging to the host over vsock port {port}"),
            Err(e) => tracing::warn!("no log stream to the host on vsock port {port}: {e}"),
        }
    }
    let mut opts = Options::default();
    if let Some(r) = a.resolv_conf {
        opts.resolv_conf = r;
    }
    let network = match &a.netns {
        Some(path) => Network::in_netns(&Netns::open(path)?, opts)?,
        None => Network::new(opts)?,
    };
    let service = Arc::new(AgentService::new(network));
    let mut server = ttrpc::Server::new()
        .bind(&a.listen)
        .with_context(|| format!("listening on {}", a.listen))?
        .register_service(vfvm_protocols::agent::create_agent(service));
    server.start().context("starting the ttrpc server")?;
    tracing::info!(listen = %a.listen, "agent serving {}", vfvm_protocols::agent::API_VERSION);
    // The server runs on its own threads; this one waits for the end.
    wait_for_termination();
    tracing::info!("terminating");
    server.shutdown();
    Ok(())
}

/// Starts loading the image's other modules on demand: the index of `dir`, the
/// hot-plug listener, then the drivers of the PCI devices present now (a VF the VMM
/// cold-plugged), so they are bound before the shim can ask for their netdevs.
fn modules_on_demand(dir: &std::path::Path) -> Result<()> {
    let loader = match modules::ModuleLoader::open(dir) {
        Ok(l) => modules::install(l),
        Err(e) if e.is_missing_index() => {
            tracing::info!("no module index ({e}): no modules on demand");
            return Ok(());
        }
        Err(e) => return Err(e).context("reading the image's module index"),
    };
    let sysfs = PathBuf::from("/sys");
    if let Err(e) = modules::spawn_hotplug_listener(loader, sysfs.clone()) {
        tracing::warn!("no modules on hot-plug: {e}");
    }
    // The PCI devices' drivers, then those of the virtio devices the virtio-pci
    // driver (a boot module) made of them: virtio-net's, for the pod's eth0.
    let mut loaded = loader.coldplug(&sysfs, "pci");
    loaded.extend(loader.coldplug(&sysfs, "virtio"));
    tracing::info!(
        "modules on demand: {} in the index, {} aliases; drivers of the PCI and virtio devices present: {}",
        loader.index().len(),
        loader.index().alias_count(),
        if loaded.is_empty() { "none needed".to_string() } else { loaded.join(", ") }
    );
    Ok(())
}

/// Blocks until SIGTERM or SIGINT.
fn wait_for_termination() {
    // SAFETY: signal mask calls on a zeroed local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        while libc::sigwait(&set, &mut sig) != 0 {}
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_writer(|| logging::LogWriter).with_target(false).with_ansi(false).init();
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vfvm-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    let pid1 = args.init;
    if let Err(e) = run(args) {
        tracing::error!("{e:#}");
        if pid1 {
            // PID 1 must not exit (the kernel would panic): power the VM off so the
            // shim sees the failure at once.
            // SAFETY: plain reboot syscall.
            unsafe { libc::reboot(libc::RB_POWER_OFF) };
        }
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
