//! `vfvm-lab inside non-viable-group`, for an L2 booted with `lab run --no-acs`: the
//! igb PF's root port lacks ACS there, so Linux puts the port, the PF and every VF in
//! one IOMMU group, and no VF can go to VFIO while the PF is on igb. A pod with
//! `enable_sriov` whose netns holds VF 0 (as sriov-cni leaves it) must fail with an
//! error naming the VF, the group and the PF's driver, and leave the VF exactly as it
//! was: same driver, same netns, name, MAC, MTU, addresses; nothing of vfvm left.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vfvm_test_containerd::igb_vfs::{self, IgbVf};
use vfvm_test_containerd::{install_vfvm, oci, vfvm_leftovers, Containerd, Version};

use crate::demo::sh;
use crate::host;

const NETNS: &str = "vfvm-nonviable";
const IFNAME: &str = "net1";
const MAC: &str = "02:00:00:00:0e:01";
const CIDR: &str = "198.18.0.60/24";
const CTR_LIMIT: Duration = Duration::from_secs(300);

/// The VF as the host sees it: its driver and, in the pod netns, its name, MAC,
/// MTU and IPv4 addresses (not its carrier or link flags, which come up on their own
/// time, nor an IPv6 link-local address still in DAD).
fn vf_state(vf: &IgbVf) -> Result<String> {
    let link = sh(&format!("ip -n {NETNS} -o link show {IFNAME}"))?;
    let words: Vec<&str> = link.split_whitespace().collect();
    let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied().unwrap_or("?");
    let addrs = sh(&format!("ip -n {NETNS} -4 -o addr show {IFNAME}"))?;
    let addrs: Vec<&str> = addrs.lines().filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1)).collect();
    Ok(format!(
        "driver {:?}, {IFNAME} mac {} mtu {} inet {}",
        igb_vfs::driver_of(&vf.pci),
        after("link/ether"),
        after("mtu"),
        addrs.join(",")
    ))
}

pub fn non_viable_group() -> Result<i32> {
    let vf = IgbVf::find(0)?;
    let pf = igb_vfs::igb_pf().context("no igb PF")?;
    let group = std::fs::read_link(format!("/sys/bus/pci/devices/{}/iommu_group", vf.pci))?
        .file_name()
        .context("iommu_group link")?
        .to_string_lossy()
        .into_owned();
    let mut members: Vec<String> = std::fs::read_dir(format!("/sys/kernel/iommu_groups/{group}/devices"))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    members.sort();
    ensure!(
        members.contains(&pf),
        "VF {} is in IOMMU group {group} ({members:?}) without its PF {pf}: boot L2 with `lab run --no-acs`",
        vf.pci
    );
    println!("check: VF {} shares IOMMU group {group} with {} (its PF {pf} on igb)", vf.pci, members.join(", "));

    // The pod's netns as sriov-cni leaves it.
    let netdev = vf.netdev().context("VF 0 has no netdev in the host netns")?;
    sh(&format!("ip netns add {NETNS}"))?;
    let result = (|| {
        vf.pin_mac(MAC)?;
        sh(&format!("ip link set {netdev} netns {NETNS} name {IFNAME}"))?;
        sh(&format!("ip -n {NETNS} link set {IFNAME} mtu 1400 up && ip -n {NETNS} addr add {CIDR} dev {IFNAME}"))?;
        let before = vf_state(&vf)?;

        let build_dir = host::self_exe()?.parent().context("the vfvm-lab binary has no directory")?.to_path_buf();
        install_vfvm(&build_dir, None, |c| c)?;
        let c = Containerd::start(Version::V2_1)?;
        c.import_test_images()?;
        let pod = "nonviable";
        let out = c.ctr_within(
            &[
                "run",
                "--rm",
                "--runtime",
                "io.containerd.vfvm.v2",
                "--annotation",
                "io.katacontainers.config.runtime.enable_sriov=true",
                "--with-ns",
                &format!("network:/run/netns/{NETNS}"),
                oci::BUSYBOX_REF,
                pod,
                "true",
            ],
            CTR_LIMIT,
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let _ = c.ctr_within(&["container", "delete", pod], CTR_LIMIT);
        let wanted = format!("VF {}: IOMMU group {group} is not viable: {pf} is bound to igb", vf.pci);
        ensure!(!out.status.success(), "the pod should fail: its VF's group is not viable");
        ensure!(stderr.contains(&wanted), "the error should say {wanted:?}: {stderr}");
        println!("check: the pod failed: {}", stderr.trim());
        let after = vf_state(&vf)?;
        ensure!(after == before, "the VF should be left as it was: before {before}; after {after}");
        println!("check: VF {} left as it was: {after}", vf.pci);
        let left = vfvm_leftovers();
        ensure!(left.is_empty(), "the failed pod left behind: {}", left.join(", "));
        let journal = Path::new("/run/vfvm").join(pod);
        ensure!(!journal.exists(), "the failed pod left its state directory {}", journal.display());
        println!("check: nothing of vfvm left (no process, mount, state or journal)");
        c.stop()?;
        Ok(())
    })();
    let _ = sh(&format!("ip -n {NETNS} link set {IFNAME} netns 1 name {netdev}"));
    let _ = vf.unpin_mac();
    let _ = sh(&format!("ip netns del {NETNS}"));
    result?;
    vmm_refuses_the_group(&vf, &group, &pf)?;
    println!("non-viable-group: PASSED");
    Ok(0)
}

/// vfvm-vmm given the VF on vfio-pci (which the kernel allows; only the group's use
/// is refused) fails before the guest starts, naming the VF, the group and the PF.
fn vmm_refuses_the_group(vf: &IgbVf, group: &str, pf: &str) -> Result<()> {
    let build_dir = host::self_exe()?.parent().context("the vfvm-lab binary has no directory")?.to_path_buf();
    let kernel = std::env::var("VFVM_TEST_AGENT_KERNEL").context("VFVM_TEST_AGENT_KERNEL")?;
    let on_vfio = crate::pci::OnVfio::bind(crate::pci::PciDevice::new(&vf.pci)?)?;
    let out = Command::new(build_dir.join("vfvm-vmm"))
        .args(["--kernel", &kernel, "--memory", "128", "--vfio", &format!("{},id=vf0", vf.pci)])
        .output()
        .context("running vfvm-vmm");
    drop(on_vfio);
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let wanted = format!("VFIO device {}: IOMMU group {group} is not viable: {pf} is on igb", vf.pci);
    ensure!(!out.status.success() && stderr.contains(&wanted), "vfvm-vmm should fail saying {wanted:?}: {stderr}");
    println!("check: vfvm-vmm --vfio {} refused: {}", vf.pci, stderr.lines().find(|l| l.contains("not viable")).unwrap_or_default().trim());
    Ok(())
}
