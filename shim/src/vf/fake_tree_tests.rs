//! Tests on a fake sysfs tree. The fake kernel below does, to the tree, what the real
//! kernel does on bind/unbind/probe/driver_override writes; the lab runs the same
//! manager code against real sysfs and real igb VFs.

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::journal::{Journal, VfRecord, JOURNAL_VERSION};
use super::manager::{Step, VfManager};
use super::pci::{check_group_viable, DriverControl, PciAddress, Sysfs};
use super::VfError;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("vfvm-vf-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

/// A fake /sys (and /dev) with one igb PF, its VFs, and whatever else a test adds.
struct FakeHost {
    tmp: TempDir,
}

impl FakeHost {
    fn sys(&self) -> PathBuf {
        self.tmp.0.join("sys")
    }
    fn dev(&self) -> PathBuf {
        self.tmp.0.join("dev")
    }
    fn sysfs(&self) -> Sysfs {
        Sysfs::new(self.sys())
    }

    /// PF 0000:01:00.0 (igb) with `vfs` VFs at 0000:01:10.{0,2,4..} (igbvf), each in
    /// its own IOMMU group 10+n.
    fn new(vfs: u32) -> Self {
        let host = Self { tmp: TempDir::new() };
        std::fs::create_dir_all(host.dev().join("vfio")).unwrap();
        let pf = addr("0000:01:00.0");
        host.add_device(pf, "8086", "10c9", Some("igb"), "igb", "9");
        std::fs::write(host.sysfs().device_dir(pf).join("sriov_totalvfs"), "7\n").unwrap();
        for n in 0..vfs {
            let vf = addr(&format!("0000:01:10.{}", n * 2));
            host.add_device(vf, "8086", "10ca", Some("igbvf"), "igbvf", &(10 + n).to_string());
            symlink(host.sysfs().device_dir(pf), host.sysfs().device_dir(vf).join("physfn")).unwrap();
            symlink(host.sysfs().device_dir(vf), host.sysfs().device_dir(pf).join(format!("virtfn{n}"))).unwrap();
        }
        host
    }

    fn add_device(&self, a: PciAddress, vendor: &str, device: &str, driver: Option<&str>, default_driver: &str, group: &str) {
        let sysfs = self.sysfs();
        let dir = sysfs.device_dir(a);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vendor"), format!("0x{vendor}\n")).unwrap();
        std::fs::write(dir.join("device"), format!("0x{device}\n")).unwrap();
        std::fs::write(dir.join("driver_override"), "(null)\n").unwrap();
        std::fs::write(dir.join(".fake_default_driver"), default_driver).unwrap();
        let group_dir = sysfs.iommu_group_dir(group);
        std::fs::create_dir_all(&group_dir).unwrap();
        symlink(group_dir.parent().unwrap(), dir.join("iommu_group")).unwrap();
        symlink(&dir, group_dir.join(a.to_string())).unwrap();
        for d in ["igb", "igbvf", "vfio-pci", "e1000e", "pcieport"] {
            std::fs::create_dir_all(sysfs.driver_dir(d)).unwrap();
        }
        if let Some(driver) = driver {
            FakeKernel { dev_root: self.dev() }.attach(&sysfs, a, driver);
        }
    }

    /// Every file's content and every link's target, relative to the fake root.
    fn snapshot(&self) -> BTreeMap<String, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
            let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let path = e.path();
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.file_type().is_symlink() {
                    out.insert(rel, format!("-> {}", std::fs::read_link(&path).unwrap().display()));
                } else if meta.is_dir() {
                    out.insert(rel, "dir".into());
                    walk(root, &path, out);
                } else {
                    out.insert(rel, std::fs::read_to_string(&path).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.tmp.0, &self.sys(), &mut out);
        walk(&self.tmp.0, &self.dev(), &mut out);
        out
    }

    fn manager(&self, sandbox: &str) -> VfManager<FakeKernel> {
        VfManager {
            sysfs: self.sysfs(),
            drivers: FakeKernel { dev_root: self.dev() },
            dev_root: self.dev(),
            lock_dir: self.tmp.0.join("locks"),
            journal: Journal::new(self.tmp.0.join("state").join(sandbox)),
            sandbox_id: sandbox.to_string(),
            bind_timeout: Duration::from_millis(200),
        }
    }

    /// What discovery would record for a VF with no netdev.
    fn record(&self, vf: &str, sandbox: &str) -> VfRecord {
        VfRecord {
            version: JOURNAL_VERSION,
            sandbox_id: sandbox.into(),
            vf: super::discover::identify_vf(&self.sysfs(), addr(vf)).unwrap(),
            netns: None,
            netdev: None,
            pf_settings: None,
        }
    }
}

/// The kernel's side of the driver-control writes, applied to the fake tree.
struct FakeKernel {
    dev_root: PathBuf,
}

fn io(path: &Path, op: &'static str, msg: &str) -> VfError {
    VfError::Sysfs { op, path: path.to_path_buf(), source: std::io::Error::other(msg.to_string()) }
}

impl FakeKernel {
    fn attach(&self, sysfs: &Sysfs, a: PciAddress, driver: &str) {
        let dir = sysfs.device_dir(a);
        symlink(sysfs.driver_dir(driver), dir.join("driver")).unwrap();
        symlink(&dir, sysfs.driver_dir(driver).join(a.to_string())).unwrap();
        if driver == "vfio-pci" {
            let group = sysfs.device(a).unwrap().iommu_group().unwrap();
            let _ = std::fs::write(self.dev_root.join("vfio").join(group), "");
        }
    }
}

impl DriverControl for FakeKernel {
    fn unbind(&self, sysfs: &Sysfs, a: PciAddress, driver: &str) -> Result<(), VfError> {
        let dev = sysfs.device(a)?;
        if dev.driver().as_deref() != Some(driver) {
            return Err(io(&sysfs.driver_dir(driver).join("unbind"), "write", "No such device"));
        }
        std::fs::remove_file(dev.dir().join("driver")).unwrap();
        std::fs::remove_file(sysfs.driver_dir(driver).join(a.to_string())).unwrap();
        if driver == "vfio-pci" {
            let _ = std::fs::remove_file(self.dev_root.join("vfio").join(dev.iommu_group().unwrap()));
        }
        Ok(())
    }

    fn set_driver_override(&self, sysfs: &Sysfs, a: PciAddress, driver: Option<&str>) -> Result<(), VfError> {
        std::fs::write(sysfs.device_dir(a).join("driver_override"), format!("{}\n", driver.unwrap_or("(null)"))).unwrap();
        Ok(())
    }

    fn probe(&self, sysfs: &Sysfs, a: PciAddress) -> Result<(), VfError> {
        let dev = sysfs.device(a)?;
        if dev.driver().is_none() {
            let driver = match dev.driver_override()? {
                Some(d) => d,
                None => std::fs::read_to_string(dev.dir().join(".fake_default_driver")).unwrap(),
            };
            self.attach(sysfs, a, &driver);
        }
        Ok(())
    }

    fn bind(&self, sysfs: &Sysfs, a: PciAddress, driver: &str) -> Result<(), VfError> {
        let dev = sysfs.device(a)?;
        if dev.driver().is_some() {
            return Err(io(&sysfs.driver_dir(driver).join("bind"), "write", "Device or resource busy"));
        }
        // The kernel refuses a driver_override that names another driver.
        if let Some(o) = dev.driver_override()? {
            if o != driver {
                return Err(io(&sysfs.driver_dir(driver).join("bind"), "write", "No such device"));
            }
        }
        self.attach(sysfs, a, driver);
        Ok(())
    }
}

#[test]
fn prepare_then_restore_leaves_the_tree_as_it_started() {
    let host = FakeHost::new(2);
    let before = host.snapshot();
    let m = host.manager("sb1");
    let record = host.record("0000:01:10.2", "sb1");
    let vf = m.prepare(&record).unwrap();
    assert_eq!(vf.iommu_group, "11");
    assert_eq!(vf.vfio_group_path, host.dev().join("vfio/11"));
    let dev = host.sysfs().device(vf.addr).unwrap();
    assert_eq!(dev.driver().as_deref(), Some("vfio-pci"));
    assert_eq!(dev.driver_override().unwrap().as_deref(), Some("vfio-pci"));
    assert_eq!(m.journal.read(vf.addr).unwrap().as_ref(), Some(&record), "journal must hold the original state");
    drop(vf);
    m.restore(addr("0000:01:10.2")).unwrap();
    assert_eq!(host.snapshot(), before);
    assert!(m.journal.read_all().unwrap().is_empty());
    // Idempotent: again, and for a VF that was never taken.
    m.restore(addr("0000:01:10.2")).unwrap();
    m.restore(addr("0000:01:10.0")).unwrap();
    assert_eq!(host.snapshot(), before);
}

#[test]
fn a_crash_at_any_step_of_prepare_is_recovered_from_the_journal() {
    for crash_at in Step::ALL {
        let host = FakeHost::new(1);
        let before = host.snapshot();
        let record = host.record("0000:01:10.0", "sb1");
        {
            let m = host.manager("sb1");
            let err = m.prepare_with_checkpoints(&record, &mut |step| step != crash_at).unwrap_err();
            assert!(matches!(err, VfError::SimulatedCrash { step, .. } if step == crash_at), "{crash_at:?}: {err}");
        } // the "process" is gone: its lock with it
        let recovery = host.manager("sb1");
        let restored = recovery.restore_all_locked(Vec::new()).0.unwrap();
        assert_eq!(restored, usize::from(crash_at != Step::Locked), "{crash_at:?}");
        assert_eq!(host.snapshot(), before, "tree differs after a crash at {crash_at:?} and recovery");
        // And recovery twice is harmless.
        assert_eq!(recovery.restore_all_locked(Vec::new()).0.unwrap(), 0);
        assert_eq!(host.snapshot(), before);
    }
}

#[test]
fn an_interrupted_prepare_retried_keeps_the_original_journal() {
    let host = FakeHost::new(1);
    let before = host.snapshot();
    let record = host.record("0000:01:10.0", "sb1");
    let m = host.manager("sb1");
    let _ = m.prepare_with_checkpoints(&record, &mut |step| step != Step::Probed).unwrap_err();
    // A retry sees the VF already moved; what it would record now is not the original.
    let now = host.record("0000:01:10.0", "sb1");
    assert_ne!(now.vf.driver, record.vf.driver);
    let vf = m.prepare(&now).unwrap();
    drop(vf);
    m.restore(addr("0000:01:10.0")).unwrap();
    assert_eq!(host.snapshot(), before);
}

#[test]
fn two_sandboxes_cannot_take_the_same_vf() {
    let host = FakeHost::new(1);
    let winner = host.manager("sandbox-a");
    let loser = host.manager("sandbox-b");
    let vf = winner.prepare(&host.record("0000:01:10.0", "sandbox-a")).unwrap();
    let err = loser.prepare(&host.record("0000:01:10.0", "sandbox-b")).unwrap_err();
    assert!(matches!(&err, VfError::Busy { owner, .. } if owner == "sandbox-a"), "{err}");
    // The loser changed nothing: the winner's VF is still on vfio-pci, journaled once.
    assert_eq!(host.sysfs().device(vf.addr).unwrap().driver().as_deref(), Some("vfio-pci"));
    assert!(loser.journal.read_all().unwrap().is_empty());
    assert_eq!(winner.journal.read_all().unwrap().len(), 1);
}

#[test]
fn group_viability_verdicts() {
    let host = FakeHost::new(1);
    let sysfs = host.sysfs();
    let vf = addr("0000:01:10.0");
    let kernel = FakeKernel { dev_root: host.dev() };
    // The VF itself on its host driver blocks the group.
    let err = check_group_viable(&sysfs, "10", vf).unwrap_err().to_string();
    assert!(err.contains("0000:01:10.0 is bound to igbvf"), "{err}");
    kernel.unbind(&sysfs, vf, "igbvf").unwrap();
    check_group_viable(&sysfs, "10", vf).unwrap();
    // A second device in the VF's group (10), bound to a host driver, blocks it too.
    host.add_device(addr("0000:02:00.0"), "8086", "10d3", Some("e1000e"), "e1000e", "10");
    let err = check_group_viable(&sysfs, "10", vf).unwrap_err().to_string();
    assert!(err.contains("0000:02:00.0 is bound to e1000e") && err.contains("group 10"), "{err}");
    // With no driver it no longer does; nor with the VF on vfio-pci.
    kernel.unbind(&sysfs, addr("0000:02:00.0"), "e1000e").unwrap();
    kernel.set_driver_override(&sysfs, vf, Some("vfio-pci")).unwrap();
    kernel.probe(&sysfs, vf).unwrap();
    check_group_viable(&sysfs, "10", vf).unwrap();
    // A PCIe port in the group (a port without ACS takes in what is below it), on
    // pcieport, leaves it viable, as the kernel does.
    host.add_device(addr("0000:00:1c.0"), "8086", "a110", Some("pcieport"), "pcieport", "10");
    check_group_viable(&sysfs, "10", vf).unwrap();
}

#[test]
fn a_vf_in_a_non_viable_group_is_rolled_back() {
    let host = FakeHost::new(1);
    host.add_device(addr("0000:02:00.0"), "8086", "10d3", Some("e1000e"), "e1000e", "10");
    let before = host.snapshot();
    let m = host.manager("sb1");
    let err = m.prepare(&host.record("0000:01:10.0", "sb1")).unwrap_err().to_string();
    assert!(err.contains("not viable") && err.contains("0000:02:00.0 is bound to e1000e"), "{err}");
    assert_eq!(host.snapshot(), before, "the VF was not left as it was");
    assert!(m.journal.read_all().unwrap().is_empty(), "refused before journaling");
    assert!(host.tmp.0.join("locks").read_dir().map(|d| d.count()).unwrap_or(0) == 0, "refused before locking");
}

#[test]
fn bad_devices_are_refused_without_changes() {
    let host = FakeHost::new(1);
    let before = host.snapshot();
    let m = host.manager("sb1");
    let mut record = host.record("0000:01:10.0", "sb1");
    record.vf.addr = addr("0000:09:00.0");
    assert!(matches!(m.prepare(&record).unwrap_err(), VfError::NoSuchDevice { .. }));
    record.vf.addr = addr("0000:01:00.0"); // the PF
    let err = m.prepare(&record).unwrap_err();
    assert!(matches!(&err, VfError::NotAVf { .. }), "{err}");
    assert!(err.to_string().contains("0000:01:00.0"), "{err}");
    assert_eq!(host.snapshot(), before);
    assert!(m.journal.read_all().unwrap().is_empty());
}

#[test]
fn a_vf_already_on_vfio_stays_there() {
    // DPDK style: the device plugin handed out a VF already bound to vfio-pci.
    let host = FakeHost::new(1);
    let sysfs = host.sysfs();
    let kernel = FakeKernel { dev_root: host.dev() };
    let vf = addr("0000:01:10.0");
    kernel.unbind(&sysfs, vf, "igbvf").unwrap();
    kernel.set_driver_override(&sysfs, vf, Some("vfio-pci")).unwrap();
    kernel.probe(&sysfs, vf).unwrap();
    let before = host.snapshot();
    let m = host.manager("sb1");
    let prepared = m.prepare(&host.record("0000:01:10.0", "sb1")).unwrap();
    assert_eq!(host.snapshot(), before, "prepare must not touch a VF already on vfio-pci");
    drop(prepared);
    m.restore(vf).unwrap();
    assert_eq!(host.snapshot(), before);
}

#[test]
fn journal_round_trip_and_corruption() {
    let host = FakeHost::new(2);
    let j = Journal::new(host.tmp.0.join("journal"));
    assert!(j.read_all().unwrap().is_empty());
    let a = host.record("0000:01:10.0", "sb1");
    let mut b = host.record("0000:01:10.2", "sb1");
    b.netns = Some("/run/netns/pod".into());
    b.netdev = Some(super::journal::NetdevRecord {
        name: "net1".into(),
        altnames: vec!["enp1s0v1".into()],
        mac: "02:00:00:00:00:01".into(),
        mtu: 9000,
        up: true,
        addrs: vec![super::journal::AddrRecord { addr: "2001:db8::1".into(), prefix: 64, flags: 0x200, route_metric: None }],
        routes: vec![super::journal::RouteRecord {
            dst: "0.0.0.0".into(),
            prefix: 0,
            gateway: Some("198.18.0.254".into()),
            metric: Some(100),
            prefsrc: None,
            table: 254,
            scope: 0,
            protocol: 3,
            onlink: false,
        }],
        neighbours: vec![],
    });
    j.write(&b).unwrap();
    j.write(&a).unwrap();
    assert_eq!(j.read_all().unwrap(), vec![a.clone(), b.clone()]);
    assert_eq!(j.read(b.vf.addr).unwrap(), Some(b.clone()));
    // No temp files left behind.
    assert_eq!(std::fs::read_dir(j.dir()).unwrap().count(), 2);
    j.remove(a.vf.addr).unwrap();
    j.remove(a.vf.addr).unwrap();
    assert_eq!(j.read_all().unwrap(), vec![b.clone()]);

    let path = j.dir().join(format!("vf-{}.json", b.vf.addr));
    std::fs::write(&path, "{ truncated").unwrap();
    let err = j.read_all().unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()) && err.contains("unusable"), "{err}");
    let newer = serde_json::to_string(&VfRecord { version: JOURNAL_VERSION + 1, ..b.clone() }).unwrap();
    std::fs::write(&path, newer).unwrap();
    assert!(j.read(b.vf.addr).unwrap_err().to_string().contains("newer"));
    std::fs::write(&path, vec![b' '; 2 << 20]).unwrap();
    assert!(j.read(b.vf.addr).unwrap_err().to_string().contains("more than an entry can be"));
}

#[test]
fn discovery_tells_vfs_from_pfs_and_virtual_netdevs() {
    use super::discover::{classify, identify_vf, LinkKind};
    let host = FakeHost::new(3);
    let sysfs = host.sysfs();
    std::fs::create_dir_all(sysfs.device_dir(addr("0000:01:00.0")).join("net/enp1s0")).unwrap();
    host.add_device(addr("0000:02:00.0"), "8086", "10d3", Some("e1000e"), "e1000e", "20");

    match classify(&sysfs, Some("pci"), Some("0000:01:10.4")).unwrap() {
        LinkKind::Vf(vf) => {
            assert_eq!(vf.pf, addr("0000:01:00.0"));
            assert_eq!(vf.vf_index, 2);
            assert_eq!(vf.vendor_device, "8086:10ca");
            assert_eq!(vf.driver.as_deref(), Some("igbvf"));
            assert_eq!(vf.driver_override, None);
            assert_eq!(vf.pf_netdev.as_deref(), Some("enp1s0"));
        }
        other => panic!("expected a VF, got {other:?}"),
    }
    assert_eq!(classify(&sysfs, Some("pci"), Some("0000:01:00.0")).unwrap(), LinkKind::Pf(addr("0000:01:00.0")));
    assert_eq!(classify(&sysfs, Some("pci"), Some("0000:02:00.0")).unwrap(), LinkKind::OtherPci(addr("0000:02:00.0")));
    assert_eq!(classify(&sysfs, None, None).unwrap(), LinkKind::Virtual);
    assert_eq!(classify(&sysfs, Some("virtio"), Some("virtio3")).unwrap(), LinkKind::Virtual);
    assert!(matches!(classify(&sysfs, Some("pci"), Some("0000:07:00.0")), Err(VfError::NoSuchDevice { .. })));

    let err = identify_vf(&sysfs, addr("0000:01:00.0")).unwrap_err().to_string();
    assert!(err.contains("0000:01:00.0") && err.contains("is an SR-IOV PF, not a VF"), "{err}");
    let err = identify_vf(&sysfs, addr("0000:02:00.0")).unwrap_err().to_string();
    assert!(err.contains("0000:02:00.0") && err.contains("not an SR-IOV VF"), "{err}");
}

#[test]
fn an_unusable_journal_entry_does_not_keep_the_other_vfs_from_going_back() {
    let host = FakeHost::new(2);
    let before = host.snapshot();
    let m = host.manager("sb1");
    let (a, b) = (addr("0000:01:10.0"), addr("0000:01:10.2"));
    let record_a = host.record("0000:01:10.0", "sb1");
    let prepared_a = m.prepare(&record_a).unwrap();
    let prepared_b = m.prepare(&host.record("0000:01:10.2", "sb1")).unwrap();
    let bad = m.journal.dir().join(format!("vf-{a}.json"));
    std::fs::write(&bad, "{ torn").unwrap();
    let (result, kept) = m.restore_all_locked(vec![prepared_a.lock, prepared_b.lock]);
    let err = result.unwrap_err().to_string();
    assert!(err.contains(&bad.display().to_string()) && err.contains("unusable"), "{err}");
    // B went back and its entry went; A's entry stays, and so does A's lock.
    assert_eq!(host.sysfs().device(b).unwrap().driver().as_deref(), Some("igbvf"));
    assert_eq!(host.sysfs().device(a).unwrap().driver().as_deref(), Some("vfio-pci"));
    assert!(bad.exists());
    assert_eq!(kept.iter().map(|l| l.addr()).collect::<Vec<_>>(), vec![a]);
    // After a crash (no locks held), the unusable entry's VF is locked all the same.
    drop(kept);
    let (result, kept) = m.restore_all_locked(Vec::new());
    assert!(result.is_err());
    assert_eq!(kept.iter().map(|l| l.addr()).collect::<Vec<_>>(), vec![a]);
    // An entry that names another VF than its file's name is unusable too.
    m.journal.write(&record_a).unwrap();
    std::fs::rename(m.journal.dir().join(format!("vf-{a}.json")), m.journal.dir().join(format!("vf-{b}.json"))).unwrap();
    let e = m.journal.read_each().unwrap().pop().unwrap().1.unwrap_err().to_string();
    assert!(e.contains(&format!("it holds VF {a}")), "{e}");
    std::fs::remove_file(m.journal.dir().join(format!("vf-{b}.json"))).unwrap();
    // Mended, A goes back too.
    m.journal.write(&record_a).unwrap();
    let (result, kept) = m.restore_all_locked(kept);
    assert_eq!(result.unwrap(), 1);
    assert!(kept.is_empty());
    assert_eq!(host.snapshot(), before);
}
