//! `vfvm-test-sriov-cni`: a CNI plugin for the lab's tests that attaches a VF to a pod
//! as sriov-cni (v2.x) does, so the shim meets the VF the way it would in a cluster
//! (the lab has no Multus and no sriov-cni).
//!
//! Network config (besides `cniVersion`, `name`, `type`):
//! - `deviceID`: the VF's PCI address (what the SR-IOV device plugin hands sriov-cni);
//! - `mac` (optional): set as the VF's admin MAC on the PF and on the netdev;
//! - `mtu` (optional);
//! - `cacheDir`: where the attachment is cached, as sriov-cni caches it
//!   (`<cacheDir>/<container id>-<ifname>`: the NetConf plus `OrigVfState`);
//! - `ipam`: delegated to the IPAM plugin it names (e.g. `static`) on `CNI_PATH`.
//!
//! ADD: the VF's netdev (found by PCI address in the host netns) is renamed
//! `CNI_IFNAME` and moved into `CNI_NETNS`, its MAC and MTU set, the IPAM result
//! applied (addresses, routes), and the cache written. DEL: `CNI_IFNAME` must be in
//! the netns (a missing one is a loud error: the runtime lost the VF), it goes back to
//! the host netns under its original name with its original MAC, and the cache entry
//! goes; a DEL with no cache entry is a no-op (already deleted). Every call is logged
//! to `<cacheDir>/calls.log`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set"))
}

/// Runs `cmd`, failing with its stderr.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS` in the network namespace at `netns` (the host's when `None`).
fn ip(netns: Option<&str>, args: &[&str]) -> Result<String> {
    match netns {
        Some(ns) => run(Command::new("nsenter").arg(format!("--net={ns}")).arg("ip").args(args)),
        None => run(Command::new("ip").args(args)),
    }
}

/// Makes the VF netdev `ifname` (in `netns`) carry `mac`, which the PF has just set
/// as its admin MAC. igb does not reset the VF when the PF pins a MAC, and igbvf
/// refuses any MAC of its own while one is pinned (EADDRNOTAVAIL) until a reset
/// hands it the pinned one; bringing the netdev down resets it (`igbvf_down`), so:
/// up, down, then check. Other VF drivers take the MAC directly (bounded retries).
fn take_admin_mac(netns: Option<&str>, ifname: &str, mac: &str) -> Result<()> {
    let current = |ns| -> Result<String> {
        let shown = ip(ns, &["-o", "link", "show", "dev", ifname])?;
        Ok(shown.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).unwrap_or_default().to_string())
    };
    if current(netns)?.eq_ignore_ascii_case(mac) {
        return Ok(());
    }
    ip(netns, &["link", "set", "dev", ifname, "up"])?;
    ip(netns, &["link", "set", "dev", ifname, "down"])?;
    if current(netns)?.eq_ignore_ascii_case(mac) {
        return Ok(());
    }
    ip_retried(netns, &["link", "set", "dev", ifname, "address", mac], 5).map(drop)
}

/// [`ip`], retried for up to `secs`: some VF drivers take a moment to accept a MAC.
fn ip_retried(netns: Option<&str>, args: &[&str], secs: u64) -> Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match ip(netns, args) {
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(100)),
            other => return other,
        }
    }
}

fn sysfs(addr: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(addr)
}

fn read_trim(path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?.trim().to_string())
}

/// The VF's PF address, the PF's netdev and the VF's index on it.
fn pf_of(vf: &str) -> Result<(String, String, u32)> {
    let pf = std::fs::read_link(sysfs(vf).join("physfn")).with_context(|| format!("{vf} is not a VF (no physfn)"))?;
    let pf = pf.file_name().context("physfn")?.to_string_lossy().into_owned();
    let pf_netdev = std::fs::read_dir(sysfs(&pf).join("net"))
        .with_context(|| format!("PF {pf} has no netdev"))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("PF {pf} has no netdev"))?;
    for entry in std::fs::read_dir(sysfs(&pf))?.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("virtfn") {
            if std::fs::read_link(entry.path()).ok().and_then(|l| l.file_name().map(|f| f.to_string_lossy() == vf)) == Some(true) {
                return Ok((pf, pf_netdev, n.parse()?));
            }
        }
    }
    bail!("{vf} is not among {pf}'s VFs")
}

/// The admin MAC the PF holds for VF `index` (`ip link show` of the PF: `vf N ... link/ether MAC`).
fn admin_mac(pf_netdev: &str, index: u32) -> Result<String> {
    let text = ip(None, &["link", "show", "dev", pf_netdev])?;
    let line = text.lines().map(str::trim).find(|l| l.starts_with(&format!("vf {index} "))).context("the PF lists no such VF")?;
    let mac = line.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).context("no MAC in the PF's VF line")?;
    Ok(mac.trim_end_matches(',').to_string())
}

fn cache_path(conf: &Value, container: &str, ifname: &str) -> Result<PathBuf> {
    let dir = PathBuf::from(conf["cacheDir"].as_str().context("cacheDir is required")?);
    Ok(dir.join(format!("{container}-{ifname}")))
}

fn log(conf: &Value, line: &str) {
    if let Some(dir) = conf["cacheDir"].as_str() {
        let _ = std::fs::create_dir_all(dir);
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(Path::new(dir).join("calls.log")) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Runs the IPAM plugin `conf.ipam.type` from `CNI_PATH` with the same environment.
fn ipam(conf: &Value, command: &str) -> Result<Value> {
    let kind = conf["ipam"]["type"].as_str().context("ipam.type is required")?;
    let path = env("CNI_PATH")?;
    let plugin = path
        .split(':')
        .map(|d| Path::new(d).join(kind))
        .find(|p| p.is_file())
        .with_context(|| format!("IPAM plugin {kind} not on CNI_PATH {path}"))?;
    let mut child =
        Command::new(&plugin).env("CNI_COMMAND", command).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(&serde_json::to_vec(conf)?)?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "IPAM {kind} {command}: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("IPAM {kind} printed no JSON"))
}

fn add(conf: &Value) -> Result<Value> {
    let (container, netns, ifname) = (env("CNI_CONTAINERID")?, env("CNI_NETNS")?, env("CNI_IFNAME")?);
    let vf = conf["deviceID"].as_str().context("deviceID is required")?;
    let host_name = std::fs::read_dir(sysfs(vf).join("net"))
        .with_context(|| format!("VF {vf} has no netdev in the host netns (driver not bound, or already in a pod)"))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("VF {vf} has no netdev"))?;
    let (_, pf_netdev, index) = pf_of(vf)?;
    let orig_admin = admin_mac(&pf_netdev, index)?;
    let orig_mac = read_trim(&sysfs(vf).join("net").join(&host_name).join("address"))?;
    let orig_mtu: i64 = read_trim(&sysfs(vf).join("net").join(&host_name).join("mtu"))?.parse()?;
    // Cached first: a DEL after a half-done ADD knows what to give back.
    let mut cached = conf.clone();
    cached["OrigVfState"] = json!({
        "HostIFName": host_name, "SpoofChk": true, "Trust": false, "AdminMAC": orig_admin, "EffectiveMAC": orig_mac,
        "Vlan": 0, "VlanQoS": 0, "VlanProto": 0, "MinTxRate": 0, "MaxTxRate": 0, "LinkState": 0, "MTU": orig_mtu
    });
    cached["Master"] = json!(pf_netdev);
    cached["VFID"] = json!(index);
    cached["MAC"] = conf.get("mac").cloned().unwrap_or(json!(""));
    let cache = cache_path(conf, &container, &ifname)?;
    std::fs::create_dir_all(cache.parent().context("cache dir")?)?;
    std::fs::write(&cache, serde_json::to_vec(&cached)?)?;

    if let Some(mac) = conf["mac"].as_str() {
        ip(None, &["link", "set", "dev", &pf_netdev, "vf", &index.to_string(), "mac", mac])?;
        take_admin_mac(None, &host_name, mac)?;
    }
    ip(None, &["link", "set", "dev", &host_name, "down"])?;
    ip(None, &["link", "set", "dev", &host_name, "netns", &netns, "name", &ifname])?;
    let ns = Some(netns.as_str());
    if let Some(mtu) = conf["mtu"].as_u64() {
        ip(ns, &["link", "set", "dev", &ifname, "mtu", &mtu.to_string()])?;
    }
    ip(ns, &["link", "set", "dev", &ifname, "up"])?;
    let result = ipam(conf, "ADD")?;
    let mut ips = Vec::new();
    for a in result["ips"].as_array().into_iter().flatten() {
        let addr = a["address"].as_str().context("IPAM address")?;
        ip(ns, &["addr", "add", addr, "dev", &ifname])?;
        let mut a = a.clone();
        a["interface"] = json!(0);
        ips.push(a);
    }
    for r in result["routes"].as_array().into_iter().flatten() {
        let dst = r["dst"].as_str().context("IPAM route dst")?;
        let mut args = vec!["route", "add", dst, "dev", ifname.as_str()];
        if let Some(gw) = r["gw"].as_str() {
            args.extend(["via", gw, "onlink"]);
        }
        ip(ns, &args)?;
    }
    let mac = ip(ns, &["-o", "link", "show", "dev", &ifname])?;
    let mac = mac.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).unwrap_or_default().to_string();
    log(conf, &format!("ADD {container} {ifname}: VF {vf} ({host_name}) into {netns}, mac {mac}"));
    Ok(json!({
        "cniVersion": conf["cniVersion"],
        "interfaces": [{"name": ifname, "mac": mac, "sandbox": netns}],
        "ips": ips,
        "routes": result["routes"].clone(),
        "dns": {}
    }))
}

fn del(conf: &Value) -> Result<()> {
    let (container, ifname) = (env("CNI_CONTAINERID")?, env("CNI_IFNAME")?);
    let netns = std::env::var("CNI_NETNS").unwrap_or_default();
    let cache = cache_path(conf, &container, &ifname)?;
    let Ok(bytes) = std::fs::read(&cache) else {
        log(conf, &format!("DEL {container} {ifname}: no cache entry, nothing to do"));
        return Ok(());
    };
    let cached: Value = serde_json::from_slice(&bytes)?;
    let orig = &cached["OrigVfState"];
    let host_name = orig["HostIFName"].as_str().context("OrigVfState.HostIFName")?;
    ensure!(
        !netns.is_empty() && Path::new(&netns).exists(),
        "DEL {container}: the pod's netns {netns:?} is gone with VF {} in it",
        conf["deviceID"]
    );
    let ns = Some(netns.as_str());
    let shown = ip(ns, &["-o", "link", "show", "dev", &ifname]);
    ensure!(shown.is_ok(), "DEL {container}: {ifname} is not in the pod's netns {netns}: the VF was not given back to the pod");
    let _ = ipam(conf, "DEL");
    ip(ns, &["addr", "flush", "dev", &ifname])?;
    ip(ns, &["link", "set", "dev", &ifname, "down"])?;
    // The MACs while the netdev is still in the pod netns: the PF's admin MAC first
    // (a VF may not change a MAC the PF set), then the netdev's. A failure is logged,
    // not fatal, as the VF itself is given back either way.
    if let (Some(pf), Some(index), Some(admin)) = (cached["Master"].as_str(), cached["VFID"].as_u64(), orig["AdminMAC"].as_str()) {
        ip(None, &["link", "set", "dev", pf, "vf", &index.to_string(), "mac", admin])?;
    }
    if let Some(mac) = orig["EffectiveMAC"].as_str() {
        if let Err(e) = take_admin_mac(ns, &ifname, mac) {
            log(conf, &format!("DEL {container} {ifname}: its MAC {mac} not restored: {e:#}"));
        }
    }
    ip(ns, &["link", "set", "dev", &ifname, "netns", "1", "name", host_name])?;
    std::fs::remove_file(&cache)?;
    log(conf, &format!("DEL {container} {ifname}: found in {netns}, given back to the host as {host_name}"));
    Ok(())
}

fn main() {
    let mut input = Vec::new();
    let conf: Result<Value> =
        std::io::stdin().read_to_end(&mut input).map_err(Into::into).and_then(|_| serde_json::from_slice(&input).map_err(Into::into));
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let version = conf.as_ref().ok().and_then(|c| c["cniVersion"].as_str().map(String::from)).unwrap_or_else(|| "0.4.0".into());
    let result = conf.and_then(|conf| match command.as_str() {
        "ADD" => add(&conf).inspect_err(|e| log(&conf, &format!("ADD failed: {e:#}"))).map(Some),
        "DEL" => del(&conf).inspect_err(|e| log(&conf, &format!("DEL failed: {e:#}"))).map(|()| None),
        "CHECK" => Ok(None),
        "VERSION" => Ok(Some(json!({"cniVersion": version, "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}))),
        other => bail!("CNI_COMMAND {other:?}: expected ADD, DEL, CHECK or VERSION"),
    });
    match result {
        Ok(Some(out)) => println!("{out}"),
        Ok(None) => {}
        Err(e) => {
            println!("{}", json!({"cniVersion": version, "code": 100, "msg": format!("{e:#}")}));
            std::process::exit(1);
        }
    }
}
