//! The VF manager against real igb VFs, real vfio-pci and real IOMMU groups: these
//! run inside the nested lab's L2 machine (`cargo xtask test` runs every `lab_*`
//! test there), never on the host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};

use vfvm_netlink::{AddressSpec, Handle, MacAddr, Netns, RouteSpec};
use vfvm_shim::vf::discover::discover;
use vfvm_shim::vf::journal::VfRecord;
use vfvm_shim::vf::net::capture_netdev;
use vfvm_shim::vf::{PciAddress, Step, Sysfs, VfError, VfManager};

const NO_CNI_CACHE: &str = "/nonexistent/cni-cache";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn pf() -> (PciAddress, String) {
    let mut pfs: Vec<String> = std::fs::read_dir("/sys/bus/pci/drivers/igb")
        .expect("no igb driver: this test runs inside the lab")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<PciAddress>().is_ok())
        .collect();
    assert_eq!(pfs.len(), 1, "{pfs:?}");
    let addr: PciAddress = pfs.remove(0).parse().unwrap();
    let netdev = std::fs::read_dir(format!("/sys/bus/pci/devices/{addr}/net")).unwrap().next().unwrap().unwrap();
    (addr, netdev.file_name().to_string_lossy().into_owned())
}

fn vf(n: u32) -> PciAddress {
    let (pf, _) = pf();
    let link = std::fs::read_link(format!("/sys/bus/pci/devices/{pf}/virtfn{n}")).unwrap();
    link.file_name().unwrap().to_string_lossy().parse().unwrap()
}

fn link_of(h: &Handle, addr: PciAddress) -> Option<vfvm_netlink::Link> {
    h.links().unwrap().into_iter().find(|l| l.parent_dev.as_deref() == Some(addr.to_string().as_str()))
}

/// A pod network namespace with VF `n`'s netdev in it, configured as sriov-cni would.
struct Pod {
    name: String,
    vf: PciAddress,
    host_name: String,
}

impl Pod {
    fn new(name: &str, n: u32) -> Pod {
        run(Command::new("ip").args(["netns", "add", name]));
        let vf = vf(n);
        let host = Handle::new().unwrap();
        let link = link_of(&host, vf).expect("the VF's netdev should be in the host netns");
        let host_name = link.name.clone();
        let ns = Netns::open(format!("/run/netns/{name}")).unwrap();
        host.set_link_up(link.index, false).unwrap();
        host.move_link_to_netns(link.index, &ns, Some("net1")).unwrap();
        let h = Handle::in_netns(&ns).unwrap();
        let l = h.link_by_name("net1").unwrap();
        let octet = 10 + u8::try_from(n).expect("the lab has at most 7 VFs");
        h.set_link_mtu(l.index, 1400).unwrap();
        h.set_link_mac(l.index, MacAddr([0x02, 0, 0, 0, 0x10, octet])).unwrap();
        h.add_address(l.index, &AddressSpec::new(format!("198.18.{octet}.1").parse().unwrap(), 24)).unwrap();
        h.set_link_up(l.index, true).unwrap();
        h.add_route(
            &RouteSpec::new(format!("198.19.{octet}.0").parse().unwrap(), 24)
                .via(format!("198.18.{octet}.254").parse().unwrap())
                .dev(l.index),
        )
        .unwrap();
        h.add_permanent_neighbour(l.index, format!("198.18.{octet}.254").parse().unwrap(), MacAddr([0x02, 0, 0, 0, 0xfe, octet])).unwrap();
        Pod { name: name.to_string(), vf, host_name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // A physical netdev would go back to the host's netns when its netns dies,
        // but the kernel does that later, in a workqueue: the next test could look
        // for it before it is back. Moving it back first makes the return synchronous.
        if let (Ok(pod), Ok(host)) = (Netns::open(self.path()), Netns::current()) {
            if let Ok(h) = Handle::in_netns(&pod) {
                if let Some(l) = link_of(&h, self.vf) {
                    let _ = h.set_link_up(l.index, false);
                    let _ = h.move_link_to_netns(l.index, &host, Some(&self.host_name));
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Everything about a VF that must survive a prepare/restore cycle, as the kernel
/// reports it: driver binding, the PF's settings, and its netdev wherever it is.
fn snapshot(vfs: &[PciAddress], pods: &[&Pod]) -> BTreeMap<String, String> {
    let sysfs = Sysfs::default();
    let (_, pf_netdev) = pf();
    let host = Handle::new().unwrap();
    let pf_index = host.link_by_name(&pf_netdev).unwrap().index;
    let mut out = BTreeMap::new();
    for &addr in vfs {
        let dev = sysfs.device(addr).unwrap();
        out.insert(format!("{addr} driver"), format!("{:?} override {:?}", dev.driver(), dev.driver_override().unwrap()));
        let vf_index = sysfs.device(dev.physfn().unwrap()).unwrap().vf_index_of(addr).unwrap();
        out.insert(format!("{addr} pf settings"), format!("{:?}", host.vf_config(pf_index, vf_index).unwrap()));
        let mut place = None;
        if let Some(l) = link_of(&host, addr) {
            place = Some(("host".to_string(), capture_netdev(&host, &l).unwrap()));
        }
        for pod in pods {
            let h = Handle::in_netns(&Netns::open(pod.path()).unwrap()).unwrap();
            if let Some(l) = link_of(&h, addr) {
                assert!(place.is_none(), "{addr} has netdevs in two places");
                place = Some((pod.name.clone(), capture_netdev(&h, &l).unwrap()));
            }
        }
        out.insert(format!("{addr} netdev"), format!("{place:?}"));
    }
    out
}

fn manager(sandbox: &str, tmp: &Path) -> VfManager {
    VfManager::new(sandbox, &tmp.join("state").join(sandbox), &tmp.join("locks"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vfvm-vf-lab-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn discover_one(pod: &Pod, sandbox: &str) -> VfRecord {
    let mut records = discover(&Sysfs::default(), &pod.path(), &[], Path::new(NO_CNI_CACHE), sandbox).unwrap();
    assert_eq!(records.len(), 1, "{records:#?}");
    records.remove(0)
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_vf_discover_prepare_restore_in_pod_netns() {
    let tmp = scratch("one");
    let pod = Pod::new("vfpod1", 1);
    let before = snapshot(&[pod.vf], &[&pod]);

    let rec = discover_one(&pod, "sb-1");
    assert_eq!(rec.vf.addr, pod.vf);
    assert_eq!(rec.vf.vf_index, 1);
    assert_eq!(rec.vf.driver.as_deref(), Some("igbvf"));
    assert_eq!(rec.netns.as_deref(), Some(pod.path().as_path()));
    let nd = rec.netdev.as_ref().unwrap();
    assert_eq!((nd.name.as_str(), nd.mac.as_str(), nd.mtu, nd.up), ("net1", "02:00:00:00:10:0b", 1400, true));
    assert!(nd.addrs.iter().any(|a| a.addr == "198.18.11.1" && a.prefix == 24), "{nd:?}");
    assert!(nd.routes.iter().any(|r| r.dst == "198.19.11.0" && r.gateway.as_deref() == Some("198.18.11.254")), "{nd:?}");
    assert_eq!(nd.neighbours.len(), 1);
    assert!(rec.vf.pf_netdev.is_some() && rec.pf_settings.is_some());

    let m = manager("sb-1", &tmp);
    let prepared = m.prepare(&rec).unwrap();
    let sysfs = Sysfs::default();
    assert_eq!(sysfs.device(pod.vf).unwrap().driver().as_deref(), Some("vfio-pci"));
    assert!(prepared.vfio_group_path.exists(), "{}", prepared.vfio_group_path.display());
    let pod_handle = Handle::in_netns(&Netns::open(pod.path()).unwrap()).unwrap();
    assert!(link_of(&pod_handle, pod.vf).is_none(), "the netdev should be gone from the pod netns");
    let (_, pf_netdev) = pf();
    let host = Handle::new().unwrap();
    let admin = host.vf_config(host.link_by_name(&pf_netdev).unwrap().index, 1).unwrap();
    assert_eq!(admin.mac.to_string(), "02:00:00:00:10:0b", "the VF's admin MAC should be the pod's");
    assert_eq!(m.journal.read_all().unwrap().len(), 1);

    drop(prepared);
    m.restore(pod.vf).unwrap();
    assert_eq!(snapshot(&[pod.vf], &[&pod]), before);
    assert!(m.journal.read_all().unwrap().is_empty());
    m.restore(pod.vf).unwrap(); // idempotent
    assert_eq!(snapshot(&[pod.vf], &[&pod]), before);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_vf_fifty_cycles_over_four_vfs() {
    let tmp = scratch("cycles");
    let pods: Vec<Pod> = (0..4).map(|n| Pod::new(&format!("vfcyc{n}"), n)).collect();
    let pod_refs: Vec<&Pod> = pods.iter().collect();
    let vfs: Vec<PciAddress> = pods.iter().map(|p| p.vf).collect();
    let before = snapshot(&vfs, &pod_refs);
    for cycle in 0..50 {
        let mut held = Vec::new();
        for (n, pod) in pods.iter().enumerate() {
            let sandbox = format!("sb-cyc{n}");
            let m = manager(&sandbox, &tmp);
            let rec = discover_one(pod, &sandbox);
            held.push((m.prepare(&rec).unwrap_or_else(|e| panic!("cycle {cycle} VF {}: {e}", pod.vf)), m));
        }
        for (vf, m) in held {
            let addr = vf.addr;
            drop(vf);
            m.restore(addr).unwrap_or_else(|e| panic!("cycle {cycle} restore {addr}: {e}"));
        }
    }
    assert_eq!(snapshot(&vfs, &pod_refs), before, "after 50 cycles");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_vf_recovery_after_the_process_is_killed() {
    let tmp = scratch("kill");
    let pod = Pod::new("vfkill", 2);
    let before = snapshot(&[pod.vf], &[&pod]);
    let state = tmp.join("state");
    let locks = tmp.join("locks");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfvm-vf"))
        .args(["prepare", "--sandbox", "sb-kill", "--netns"])
        .arg(pod.path())
        .arg("--state-dir")
        .arg(&state)
        .arg("--lock-dir")
        .arg(&locks)
        .args(["--cni-cache", NO_CNI_CACHE, "--hold"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.by_ref().map_while(Result::ok).find(|l| l.starts_with("ready"));
    assert!(ready.is_some(), "vfvm-vf prepare never became ready");
    assert_eq!(Sysfs::default().device(pod.vf).unwrap().driver().as_deref(), Some("vfio-pci"));
    child.kill().unwrap(); // SIGKILL between prepare and restore: no chance to clean up
    child.wait().unwrap();
    assert_eq!(Sysfs::default().device(pod.vf).unwrap().driver().as_deref(), Some("vfio-pci"), "nothing undid it yet");

    let out = Command::new(env!("CARGO_BIN_EXE_vfvm-vf"))
        .args(["restore", "--sandbox", "sb-kill", "--state-dir"])
        .arg(&state)
        .arg("--lock-dir")
        .arg(&locks)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "restored 1 VF(s)");
    // Every log line carries the sandbox id.
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(!logs.trim().is_empty() && logs.lines().all(|l| l.contains("sandbox=\"sb-kill\"") || l.contains("sandbox=sb-kill")), "{logs}");
    assert_eq!(snapshot(&[pod.vf], &[&pod]), before);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_vf_two_concurrent_prepares_exactly_one_wins() {
    let tmp = scratch("race");
    let pod = Pod::new("vfrace", 3);
    let before = snapshot(&[pod.vf], &[&pod]);
    let rec = discover_one(&pod, "sb-a");
    let barrier = Arc::new(Barrier::new(2));
    let results: Vec<_> = ["sb-a", "sb-b"]
        .into_iter()
        .map(|sandbox| {
            let (barrier, tmp, mut rec) = (barrier.clone(), tmp.clone(), rec.clone());
            rec.sandbox_id = sandbox.to_string();
            std::thread::spawn(move || {
                let m = manager(sandbox, &tmp);
                barrier.wait();
                let r = m.prepare(&rec);
                (m, r)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let (winners, losers): (Vec<_>, Vec<_>) = results.into_iter().partition(|(_, r)| r.is_ok());
    assert_eq!((winners.len(), losers.len()), (1, 1));
    let (loser_m, loser_r) = &losers[0];
    assert!(matches!(loser_r, Err(VfError::Busy { .. })), "{loser_r:?}");
    assert!(loser_m.journal.read_all().unwrap().is_empty(), "the loser must change nothing");
    assert_eq!(Sysfs::default().device(pod.vf).unwrap().driver().as_deref(), Some("vfio-pci"), "the winner is unaffected");
    let (winner_m, winner_r) = winners.into_iter().next().unwrap();
    drop(winner_r); // releases the winner's lock
    winner_m.restore(pod.vf).unwrap();
    assert_eq!(snapshot(&[pod.vf], &[&pod]), before);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_vf_bad_input_changes_nothing() {
    let tmp = scratch("bad");
    let pod = Pod::new("vfbad", 1);
    let (pf_addr, _) = pf();
    let before = snapshot(&[pod.vf], &[&pod]);
    let sysfs = Sysfs::default();
    let cache = Path::new(NO_CNI_CACHE);

    let not_netns = tmp.join("not-a-netns");
    std::fs::write(&not_netns, "").unwrap();
    let err = discover(&sysfs, &not_netns, &[], cache, "sb").unwrap_err().to_string();
    assert!(err.contains("not a network namespace") && err.contains(&not_netns.display().to_string()), "{err}");

    let env = |v: &str| vec![format!("PCIDEVICE_INTEL_COM_SRIOV={v}")];
    let err = discover(&sysfs, &pod.path(), &env("0000:7f:00.0"), cache, "sb").unwrap_err().to_string();
    assert!(err.contains("0000:7f:00.0") && err.contains("does not exist"), "{err}");
    let err = discover(&sysfs, &pod.path(), &env(&pf_addr.to_string()), cache, "sb").unwrap_err().to_string();
    assert!(err.contains(&pf_addr.to_string()) && err.contains("SR-IOV PF, not a VF"), "{err}");

    let m = manager("sb", &tmp);
    let mut rec = discover_one(&pod, "sb");
    rec.vf.addr = pf_addr;
    let err = m.prepare(&rec).unwrap_err().to_string();
    assert!(err.contains("not an SR-IOV VF"), "{err}");
    rec.vf.addr = "0000:7f:00.0".parse().unwrap();
    assert!(matches!(m.prepare(&rec), Err(VfError::NoSuchDevice { .. })));
    assert!(m.journal.read_all().unwrap().is_empty());
    assert_eq!(snapshot(&[pod.vf], &[&pod]), before);
}

/// A VF that disappears while it is being prepared (here: the PF's VFs removed, as
/// an operator resetting `sriov_numvfs` or a PF driver reload does, right after the
/// VF left its driver): prepare fails naming the VF, and its journal entry stays,
/// since it could not be given back. Once the VF exists again, restore gives it back
/// to the pod netns as the journal says, and clears the entry.
#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_vf_that_vanishes_during_prepare_fails_naming_it_and_comes_back_from_the_journal() {
    let tmp = scratch("vanish");
    let pod = Pod::new("vfvanish", 3);
    let before = snapshot(&[pod.vf], &[&pod]);
    let (pf_addr, _) = pf();
    let numvfs_path = format!("/sys/bus/pci/devices/{pf_addr}/sriov_numvfs");
    let numvfs = std::fs::read_to_string(&numvfs_path).unwrap().trim().to_string();
    // The lab's VFs come back even if this test fails half-way: later tests need them.
    struct RestoreVfs(String, String);
    impl Drop for RestoreVfs {
        fn drop(&mut self) {
            if std::fs::read_to_string(&self.0).map(|n| n.trim() == "0").unwrap_or(false) {
                let _ = std::fs::write(&self.0, &self.1);
            }
        }
    }
    let _restore_vfs = RestoreVfs(numvfs_path.clone(), numvfs.clone());
    let rec = discover_one(&pod, "sb-vanish");
    let m = manager("sb-vanish", &tmp);
    let mut removed = false;
    let err = m
        .prepare_with_checkpoints(&rec, &mut |step| {
            if step == Step::Unbound && !removed {
                std::fs::write(&numvfs_path, "0").unwrap();
                removed = true;
            }
            true
        })
        .unwrap_err()
        .to_string();
    assert!(removed, "the checkpoint after the unbind never came");
    assert!(!Path::new(&format!("/sys/bus/pci/devices/{}", pod.vf)).exists(), "the VF should be gone");
    assert!(err.contains(&pod.vf.to_string()), "the error should name the VF: {err}");
    eprintln!("a VF that vanished during prepare: {err}");
    assert_eq!(m.journal.read_all().unwrap().len(), 1, "the entry of a VF not given back stays");

    // The VFs come back; the VF is on its driver again, its netdev in the host netns.
    std::fs::write(&numvfs_path, &numvfs).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while link_of(&Handle::new().unwrap(), pod.vf).is_none() {
        assert!(std::time::Instant::now() < deadline, "VF {} got no netdev after sriov_numvfs={numvfs}", pod.vf);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    m.restore(pod.vf).unwrap();
    assert!(m.journal.read_all().unwrap().is_empty());
    assert_eq!(snapshot(&[pod.vf], &[&pod]), before);
}
