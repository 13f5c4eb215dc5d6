//! containerd-shim-vfvm-v2 under real containerd 1.6 and 2.1, driven by `ctr`, with
//! pods in vfvm-vmm VMs: these run inside the lab's L2 machine (real KVM there),
//! where `cargo xtask test` runs every `lab_*` test.

use std::path::{Path, PathBuf};
use std::time::Instant;

use vfvm_test_containerd::{oci, pids_named, Containerd, Version};

const RUNTIME: &str = "io.containerd.vfvm.v2";
const STATE_DIR: &str = "/run/vfvm";

/// The workspace's build directory, from this test binary's path (target/debug/deps/..).
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent().and_then(Path::parent).expect("target/debug").to_path_buf()
}

fn which(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let home_bin = std::env::var("HOME").map(|h| format!("{h}/.cargo/bin")).unwrap_or_default();
    std::env::split_paths(&format!("{path}:{home_bin}:/root/.cargo/bin")).map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| panic!("{name} is not installed (cargo xtask install puts it in place)"))
}

/// Writes /etc/vfvm/vfvm.toml (L2's /etc is a throwaway overlay) from the shipped
/// config with the lab's paths, and puts the shim on containerd's PATH.
fn install(kernel_override: Option<&str>) {
    let kernel = kernel_override.map(str::to_string).unwrap_or_else(|| std::env::var("VFVM_TEST_AGENT_KERNEL").expect("VFVM_TEST_AGENT_KERNEL: cargo xtask test sets it"));
    let initrd = std::env::var("VFVM_TEST_AGENT_INITRD").expect("VFVM_TEST_AGENT_INITRD: cargo xtask test builds the guest image with the agent");
    let shipped = include_str!("../../configs/vfvm.toml");
    let config = shipped
        .replace("path = \"/usr/local/bin/vfvm-vmm\"", &format!("path = \"{}\"", build_dir().join("vfvm-vmm").display()))
        .replace("kernel = \"/usr/share/vfvm/vmlinuz\"", &format!("kernel = \"{kernel}\""))
        .replace("initrd = \"/usr/share/vfvm/initrd.img\"", &format!("initrd = \"{initrd}\""))
        .replace("virtiofsd = \"/usr/local/bin/virtiofsd\"", &format!("virtiofsd = \"{}\"", which("virtiofsd").display()))
        // The agent answers in a few seconds on real KVM; L3 under emulated SVM is slow.
        .replace("dial_timeout_secs = 30", "dial_timeout_secs = 120");
    std::fs::create_dir_all("/etc/vfvm").unwrap();
    std::fs::write("/etc/vfvm/vfvm.toml", config).unwrap();
    let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-vfvm-v2"));
    let _ = std::fs::remove_file("/usr/local/bin/containerd-shim-vfvm-v2");
    std::os::unix::fs::symlink(&shim, "/usr/local/bin/containerd-shim-vfvm-v2").unwrap();
}

/// What a finished pod must not leave behind.
fn assert_nothing_left(what: &str) {
    for name in ["vfvm-vmm", "virtiofsd", "containerd-shim-vfvm-v2"] {
        assert!(pids_named(name).is_empty(), "{what}: {name} still running: {:?}", pids_named(name));
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let ours: Vec<&str> = mounts.lines().filter(|l| l.split_whitespace().nth(1).is_some_and(|m| m.starts_with(STATE_DIR))).collect();
    assert!(ours.is_empty(), "{what}: mounts left: {ours:?}");
    let left: Vec<_> = std::fs::read_dir(STATE_DIR).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|n| n != "vf-locks").collect()).unwrap_or_default();
    assert!(left.is_empty(), "{what}: state left in {STATE_DIR}: {left:?}");
}

fn ctr_run_in_a_vm(version: Version) {
    install(None);
    let c = Containerd::start(version).unwrap();
    c.import_test_images().unwrap();
    let name = format!("vm-{}", version.name().replace('.', ""));

    // A pod in a VM: the container sees the VM's kernel command line, the shim's
    // exit code comes back through ctr.
    let started = Instant::now();
    let out = c.ctr_output(&["run", "--rm", "--runtime", RUNTIME, oci::BUSYBOX_REF, &name, "sh", "-c", "echo hello; cat /proc/cmdline; exit 7"]).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("containerd {}: ctr run in a VM took {:.1}s", version.name(), started.elapsed().as_secs_f64());
    assert!(stdout.contains("hello"), "stdout: {stdout}\nstderr: {}\ncontainerd log:\n{}", String::from_utf8_lossy(&out.stderr), c.log());
    assert!(stdout.contains(&format!("vfvm.sandbox={name}")), "the container should run in the pod's VM; /proc/cmdline: {stdout}");
    assert_eq!(out.status.code(), Some(7), "exit code; stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_nothing_left("after ctr run --rm");

    // Exec into a running pod, kill and delete it: not here yet. That sequence
    // (ctr run -d, ctr task exec, ctr task kill) passed its exec part twice in the lab
    // and then hung once with L2 idle; see the README's "Not done yet".
    c.stop().unwrap();
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_shim_ctr_run_in_a_vm_containerd_1_6() {
    ctr_run_in_a_vm(Version::V1_6);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_shim_ctr_run_in_a_vm_containerd_2_1() {
    ctr_run_in_a_vm(Version::V2_1);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_shim_a_missing_kernel_fails_the_pod_clearly_and_leaves_nothing() {
    install(Some("/nonexistent/vmlinuz"));
    let c = Containerd::start(Version::V1_6).unwrap();
    c.import_test_images().unwrap();
    let out = c.ctr_output(&["run", "--rm", "--runtime", RUNTIME, oci::BUSYBOX_REF, "nokernel", "true"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("hypervisor.kernel") && stderr.contains("/nonexistent/vmlinuz"), "the error should name the setting and the path: {stderr}");
    let _ = c.ctr_output(&["container", "delete", "nokernel"]);
    assert_nothing_left("after a failed create");
    c.stop().unwrap();
    install(None);
}
