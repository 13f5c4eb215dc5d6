//! `vfvm-vmm`'s command line on bad input: a clear error naming the input, exit
//! status 1, no panic. These stop before (or right after) creating the VM, so they
//! run on this machine.

use std::path::PathBuf;
use std::process::{Command, Output};

mod common;

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfvm-vmm")).args(args).output().expect("run vfvm-vmm")
}

fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vfvm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn assert_refused(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn usage_errors() {
    assert_refused(&vmm(&[]), "--kernel is required");
    assert_refused(&vmm(&["--kernel", "/k", "--bogus"]), "unknown argument \"--bogus\"");
    assert_refused(&vmm(&["--kernel", "/k", "--vcpus", "many"]), "--vcpus many: not a number");
    assert_refused(&vmm(&["--kernel", "/k", "--vcpus", "0"]), "--vcpus 0: must be between 1 and 32");
    assert_refused(&vmm(&["--kernel", "/k", "--memory", "4"]), "--memory 4: too small");
    assert_refused(&vmm(&["--kernel"]), "--kernel needs a path");
    assert!(vmm(&["--help"]).status.success());
}

#[test]
fn missing_corrupt_and_truncated_kernels_are_named() {
    assert_refused(&vmm(&["--kernel", "/nonexistent/vmlinuz"]), "kernel /nonexistent/vmlinuz: No such file");
    let junk = scratch("junk", &[0x42; 8192]);
    assert_refused(&vmm(&["--kernel", junk.to_str().unwrap()]), "not a bzImage or an ELF vmlinux");
    // A bzImage header, cut off after the first sector.
    let mut bz = vec![0u8; 0x400];
    bz[0x1f1] = 4;
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
    bz[0x211] = 1;
    bz[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    let truncated = scratch("truncated", &bz);
    assert_refused(&vmm(&["--kernel", truncated.to_str().unwrap()]), "truncated: not a bzImage or an ELF vmlinux");
}

#[test]
fn an_initrd_larger_than_memory_is_named() {
    let kernel = scratch("k", &[0; 16]);
    let initrd = std::env::temp_dir().join(format!("vfvm-cli-{}-big", std::process::id()));
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(64 << 20).unwrap(); // sparse
    let out = vmm(&["--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap(), "--memory", "32"]);
    std::fs::remove_file(&initrd).unwrap();
    assert_refused(
        &out,
        &format!("initrd {}: 67108864 bytes: larger than the guest's memory (32 MiB)", initrd.display()),
    );
    assert_refused(
        &vmm(&["--kernel", kernel.to_str().unwrap(), "--initrd", "/nonexistent/initrd"]),
        "initrd /nonexistent/initrd: No such file",
    );
}

/// The whole process, guest-triggered stops: the exit status says which.
#[test]
fn guest_power_off_reset_and_panic_end_the_vmm_with_their_status() {
    let panic_text = b"Kernel panic - not syncing: tiny\n---[ end Kernel panic - not syncing: tiny ]---\n";
    for (name, code, status) in [
        ("poweroff", common::POWER_OFF.to_vec(), 0),
        ("reset", common::RESET.to_vec(), 2),
        ("panic", common::print_then_spin(panic_text), 3),
    ] {
        let kernel = scratch(&format!("{name}.elf"), &common::tiny_elf(&code));
        let child = Command::new(env!("CARGO_BIN_EXE_vfvm-vmm"))
            .args(["--kernel", kernel.to_str().unwrap(), "--memory", "64", "--vcpus", "2"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A VMM that misses the stop would spin forever: kill it after a generous bound.
        let deadline = common::KillAfter::new(child.id(), std::time::Duration::from_secs(30));
        let out = child.wait_with_output().unwrap();
        drop(deadline);
        assert_eq!(out.status.code(), Some(status), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
