//! `vfvm-vmm`: the KVM microVM monitor, one process per pod sandbox.
//!
//! Runs one VM from its command line (the shim starts it so; so can a person, for
//! debugging): boots a Linux kernel with an initramfs, serves the control API and
//! hybrid vsock on Unix sockets when asked, and exits when the guest stops. Exit
//! status: 0 the guest powered off, 2 it rebooted (reset), 3 its kernel panicked,
//! 4 a forced shutdown through the control API, 1 the VMM failed or the input was bad.

use std::path::PathBuf;
use std::process::ExitCode;

use vfvm_vmm::device_manager::valid_device_id;
use vfvm_vmm::machine::{self, FsConfig, MachineConfig, NetConfig, VsockConfig};
use vfvm_vmm::vfio::VfioConfig;
use vfvm_vmm::virtio::fs::validate_tag;
use vfvm_vmm::virtio::net::Datapath;

const USAGE: &str = "\
usage: vfvm-vmm --kernel PATH [--initrd PATH] [--cmdline STR] [--vcpus N] [--memory MIB]
                [--serial-log PATH [--serial-log-max BYTES]] [--serial-stdout] [--api-socket PATH]
                [--vsock-socket PATH [--vsock-cid CID]] [--fs tag=TAG,socket=PATH[,wait=SECS]]
                [--vfio BDF[,id=NAME][,slot=N]]... [--populate-memory]
                [--net fd=N[:N...],mac=MAC[,mtu=N][,datapath=auto|vhost|userspace]]...

  --kernel PATH       bzImage or ELF vmlinux (64-bit entry)
  --initrd PATH       initramfs, loaded at the top of low memory
  --cmdline STR       kernel command line (default: \"console=ttyS0 reboot=k panic=-1 no_timer_check\")
  --vcpus N           vCPUs, 1 to 32 (default 1)
  --memory MIB        guest memory in MiB (default 256, at least 32)
  --serial-log PATH   write the guest's console (COM1) to this file, rotated to PATH.1
                      at half of --serial-log-max (default 4 MiB, at least 8192):
                      the two files never hold more
  --serial-stdout     also copy the guest's console to stdout
  --api-socket PATH   serve the control API on this Unix socket (created; must not exist)
  --vsock-socket PATH add a virtio-vsock device; host programs connect to PATH and
                      send \"CONNECT <port>\\n\"; guest connections to host port P go to PATH_P
  --vsock-cid CID     the guest's vsock context id (default 3)
  --fs tag=TAG,socket=PATH[,wait=SECS]
                      add a virtio-fs device served by the vhost-user backend (virtiofsd)
                      listening on PATH; the guest mounts it with
                      `mount -t virtiofs TAG DIR` (TAG: 1 to 36 bytes). With wait, the
                      backend may still be starting: the VMM sets the guest up first
                      and waits up to SECS (at most 60) for PATH to accept
  --vfio BDF[,id=NAME][,slot=N]
                      pass the host PCI function BDF (bound to vfio-pci) through to
                      the guest, in slot N of its bus 0 (1 to 31; default the first
                      free one); NAME (default the BDF) names it in the control API.
                      Repeatable
  --net fd=N[:N...],mac=MAC[,mtu=N][,datapath=auto|vhost|userspace]
                      add a virtio-net device on the tap whose queue files this
                      process inherited as descriptors N (one per queue pair, at most
                      16; opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR), the guest's MAC
                      address MAC and MTU N (68 to 65535). datapath: vhost-net, the
                      VMM's own threads, or auto (vhost-net when /dev/vhost-net opens;
                      the default). Repeatable
  --populate-memory   fault all guest RAM in, in the background while the guest boots,
                      for a VM that will get VFIO devices hot-plugged: their DMA
                      mapping pins all of it, and then takes a fraction of the time

Exit status: 0 guest power-off, 2 guest reboot/reset, 3 guest kernel panic,
4 forced shutdown through the control API, 1 error (bad input or a VMM failure). Logs go to stderr (VFVM_LOG=error|warn|info|debug|trace).";

const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 no_timer_check";
const EXIT_ERROR: u8 = 1;

enum Parsed {
    Run(Box<MachineConfig>),
    Help,
    Version,
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut kernel = None;
    let mut config = MachineConfig {
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: DEFAULT_CMDLINE.to_string(),
        vcpus: 1,
        memory_mib: 256,
        serial_log: None,
        serial_log_limit: machine::DEFAULT_SERIAL_LOG_LIMIT,
        populate_memory: false,
        serial_stdout: false,
        api_socket: None,
        vsock: None,
        fs: None,
        vfio: Vec::new(),
        net: Vec::new(),
    };
    let mut vsock_socket = None;
    let mut vsock_cid = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value =
            |what: &str| -> Result<String, String> { inline.clone().or_else(|| args.next()).ok_or_else(|| format!("{name} needs {what}")) };
        match name.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--version" => return Ok(Parsed::Version),
            "--kernel" => kernel = Some(PathBuf::from(value("a path")?)),
            "--initrd" => config.initrd = Some(PathBuf::from(value("a path")?)),
            "--cmdline" => config.cmdline = value("a command line")?,
            "--vcpus" => {
                let v = value("a number")?;
                config.vcpus = v.parse().map_err(|_| format!("--vcpus {v}: not a number between 1 and 32"))?;
            }
            "--memory" => {
                let v = value("a size in MiB")?;
                config.memory_mib = v.parse().map_err(|_| format!("--memory {v}: not a size in MiB"))?;
            }
            "--serial-log" => config.serial_log = Some(PathBuf::from(value("a path")?)),
            "--serial-log-max" => {
                let v = value("a size in bytes")?;
                let min = vfvm_vmm::serial::MIN_LOG_LIMIT;
                config.serial_log_limit =
                    v.parse().ok().filter(|&n| n >= min).ok_or_else(|| format!("--serial-log-max {v}: expected bytes, at least {min}"))?;
            }
            "--serial-stdout" if inline.is_none() => config.serial_stdout = true,
            "--populate-memory" if inline.is_none() => config.populate_memory = true,
            "--api-socket" => config.api_socket = Some(PathBuf::from(value("a path")?)),
            "--vsock-socket" => vsock_socket = Some(PathBuf::from(value("a path")?)),
            "--fs" => {
                let v = value("tag=TAG,socket=PATH")?;
                if config.fs.is_some() {
                    return Err(format!("--fs {v}: only one virtio-fs device is supported"));
                }
                config.fs = Some(parse_fs(&v)?);
            }
            "--vfio" => {
                let v = value("BDF[,id=NAME][,slot=N]")?;
                config.vfio.push(parse_vfio(&v)?);
            }
            "--net" => {
                let v = value("fd=N[:N...],mac=MAC")?;
                config.net.push(parse_net(&v)?);
            }
            "--vsock-cid" => {
                let v = value("a context id")?;
                let cid: u64 = v.parse().map_err(|_| format!("--vsock-cid {v}: not a number"))?;
                if !(3..u64::from(u32::MAX)).contains(&cid) {
                    return Err(format!("--vsock-cid {v}: must be at least 3 and below 2^32-1 (0-2 are reserved)"));
                }
                vsock_cid = Some(cid);
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    config.kernel = kernel.ok_or("--kernel is required")?;
    config.vsock = match (vsock_socket, vsock_cid) {
        (Some(socket), cid) => Some(VsockConfig { guest_cid: cid.unwrap_or(3), socket }),
        (None, Some(_)) => return Err("--vsock-cid needs --vsock-socket".into()),
        (None, None) => None,
    };
    Ok(Parsed::Run(Box::new(config)))
}

/// `--fs tag=TAG,socket=PATH[,wait=SECS]` (the socket path cannot contain a comma).
fn parse_fs(v: &str) -> Result<FsConfig, String> {
    let (mut tag, mut socket, mut wait) = (None, None, std::time::Duration::ZERO);
    for part in v.split(',') {
        match part.split_once('=') {
            Some(("tag", t)) => tag = Some(t.to_string()),
            Some(("socket", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
            Some(("wait", s)) => {
                let secs = s.parse::<u64>().ok().filter(|&n| n <= MAX_FS_WAIT_SECS);
                let secs = secs.ok_or_else(|| format!("--fs {v}: wait={s}: expected whole seconds, 0 to {MAX_FS_WAIT_SECS}"))?;
                wait = std::time::Duration::from_secs(secs);
            }
            _ => return Err(format!("--fs {v}: {part:?} is not tag=TAG, socket=PATH or wait=SECS")),
        }
    }
    let tag = tag.ok_or_else(|| format!("--fs {v}: tag=TAG is missing"))?;
    validate_tag(&tag).map_err(|e| format!("--fs {v}: {e}"))?;
    let socket = socket.ok_or_else(|| format!("--fs {v}: socket=PATH (the backend's vhost-user socket) is missing"))?;
    Ok(FsConfig { tag, socket, wait })
}

/// `--vfio BDF[,id=NAME][,slot=N]`.
fn parse_vfio(v: &str) -> Result<VfioConfig, String> {
    let mut parts = v.split(',');
    let bdf = parts.next().unwrap_or_default();
    let host = bdf.parse().map_err(|_| format!("--vfio {v}: {bdf:?} is not a PCI address (DDDD:BB:DD.F)"))?;
    let (mut id, mut slot) = (None, None);
    for part in parts {
        match part.split_once('=') {
            Some(("id", name)) if valid_device_id(name) => id = Some(name.to_string()),
            Some(("id", name)) => return Err(format!("--vfio {v}: id {name:?}: expected 1 to 64 of A-Z a-z 0-9 . _ - :")),
            Some(("slot", n)) => {
                let n = n.parse::<u8>().ok().filter(|n| (1..32).contains(n));
                slot = Some(n.ok_or_else(|| format!("--vfio {v}: slot: expected 1 to 31"))?);
            }
            _ => return Err(format!("--vfio {v}: {part:?} is not id=NAME or slot=N")),
        }
    }
    Ok(VfioConfig { host, id: id.unwrap_or_else(|| bdf.to_string()), slot })
}

/// `--net fd=N[:N...],mac=MAC[,mtu=N][,datapath=...]`.
fn parse_net(v: &str) -> Result<NetConfig, String> {
    let (mut fds, mut mac, mut mtu, mut datapath) = (Vec::new(), None, None, Datapath::Auto);
    for part in v.split(',') {
        match part.split_once('=') {
            Some(("fd", list)) => {
                for n in list.split(':') {
                    let fd = n.parse::<i32>().ok().filter(|&fd| fd >= 3);
                    let fd = fd.ok_or_else(|| format!("--net {v}: fd {n:?}: expected a descriptor number, 3 or more"))?;
                    if fds.contains(&fd) {
                        return Err(format!("--net {v}: fd {fd} is named twice"));
                    }
                    fds.push(fd);
                }
            }
            Some(("mac", m)) => {
                mac = Some(parse_mac(m).ok_or_else(|| format!("--net {v}: mac {m:?}: expected six hex bytes, xx:xx:xx:xx:xx:xx, unicast"))?)
            }
            Some(("mtu", m)) => {
                let n = m.parse::<u16>().ok().filter(|&n| n >= 68);
                mtu = Some(n.ok_or_else(|| format!("--net {v}: mtu {m:?}: expected 68 to 65535"))?);
            }
            Some(("datapath", d)) => datapath = d.parse().map_err(|e| format!("--net {v}: datapath {e}"))?,
            _ => return Err(format!("--net {v}: {part:?} is not fd=N[:N...], mac=MAC, mtu=N or datapath=auto|vhost|userspace")),
        }
    }
    if fds.is_empty() {
        return Err(format!("--net {v}: fd=N (the tap's queue files) is missing"));
    }
    let mac = mac.ok_or_else(|| format!("--net {v}: mac=MAC is missing"))?;
    Ok(NetConfig { tap_fds: fds, mac, mtu, datapath })
}

/// A unicast MAC address, `xx:xx:xx:xx:xx:xx`.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().filter(|p| p.len() == 2)?;
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// The longest `--fs ...,wait=SECS`.
const MAX_FS_WAIT_SECS: u64 = 60;

fn init_logging() {
    let level = match std::env::var("VFVM_LOG").unwrap_or_default().to_ascii_lowercase().as_str() {
        "error" => tracing::Level::ERROR,
        "warn" => tracing::Level::WARN,
        "debug" => tracing::Level::DEBUG,
        "trace" => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt().with_max_level(level).with_writer(std::io::stderr).with_target(false).init();
}

fn main() -> ExitCode {
    let config = match parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("vfvm-vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vfvm-vmm: {e}\n\n{USAGE}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    init_logging();
    match machine::run(&config) {
        Ok(exit) => ExitCode::from(exit.exit_status()),
        Err(e) => {
            eprintln!("vfvm-vmm: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
