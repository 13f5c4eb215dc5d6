//! `vfvm-vmm`'s command line on bad input: a clear error naming the input, exit
//! status 1, no panic; and tiny guests whose stops and console the process shows.
//! These run on this machine.

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

/// The smallest ELF vmlinux the loader takes: one PT_LOAD segment of 16 bytes at
/// 16 MiB, entry there (the guest never runs in these tests).
fn tiny_elf_kernel() -> Vec<u8> {
    const ENTRY: u64 = 0x100_0000;
    let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers right after this header
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [120u64, ENTRY, ENTRY, 16, 16, 0x20_0000] {
        elf.extend_from_slice(&word.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
    }
    elf.extend_from_slice(&[0xf4; 16]); // hlt
    elf
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
    assert_refused(&out, &format!("initrd {}: 67108864 bytes: larger than the guest's memory (32 MiB)", initrd.display()));
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

/// A guest printing without end (`out` to COM1 in a loop, no newline): the console
/// log and its rotated half hold no more than `--serial-log-max` between them.
#[test]
fn a_guest_printing_without_end_fills_at_most_the_console_log_limit() {
    // mov dx, 0x3f8; mov al, 'x'; 1: out dx, al; jmp 1b
    let code = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'x', 0xee, 0xeb, 0xfd];
    let kernel = scratch("chatty.elf", &common::tiny_elf(&code));
    let log = kernel.with_file_name("chatty-console.log");
    let rotated = kernel.with_file_name("chatty-console.log.1");
    let _ = std::fs::remove_file(&rotated);
    let limit = 16_384u64;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfvm-vmm"))
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "64"])
        .args(["--serial-log", log.to_str().unwrap(), "--serial-log-max", &limit.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = common::KillAfter::new(child.id(), std::time::Duration::from_secs(60));
    // Until it has rotated more than once (the rotated half was replaced): the
    // guest has written several times the limit by then.
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    // A rotation is the rename of the log onto the rotated half: told apart by the
    // inode and the rename's ctime (the filesystem reuses freed inodes, so two
    // inodes can take turns: a CI run saw only two for a minute).
    let mut seen_rotated = std::collections::HashSet::new();
    while seen_rotated.len() < 3 && child.try_wait().unwrap().is_none() {
        if let Ok(m) = std::fs::metadata(&rotated) {
            use std::os::unix::fs::MetadataExt;
            seen_rotated.insert((m.ino(), m.ctime(), m.ctime_nsec()));
        }
        assert!(size(&log) + size(&rotated) <= limit, "{} + {} bytes", size(&log), size(&rotated));
        std::thread::yield_now();
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(deadline);
    assert!(seen_rotated.len() >= 3, "the log never rotated three times (the VMM ended or was killed)");
    assert!(size(&log) + size(&rotated) <= limit, "{} + {} bytes", size(&log), size(&rotated));
    assert_eq!(std::fs::read(&rotated).unwrap().iter().filter(|&&b| b != b'x').count(), 0);
    assert_refused(&vmm(&["--kernel", "/k", "--serial-log-max", "100"]), "--serial-log-max 100: expected bytes, at least 8192");
}

#[test]
fn bad_virtio_fs_input_is_named_before_the_guest_starts() {
    let long = "t".repeat(37);
    assert_refused(
        &vmm(&["--kernel", "/k", "--fs", &format!("tag={long},socket=/s")]),
        &format!("--fs tag={long},socket=/s: tag \"{long}\": 37 bytes, at most 36"),
    );
    assert_refused(
        &vmm(&["--kernel", "/k", "--fs", "tag=data"]),
        "--fs tag=data: socket=PATH (the backend's vhost-user socket) is missing",
    );
    assert_refused(&vmm(&["--kernel", "/k", "--fs", "socket=/s"]), "--fs socket=/s: tag=TAG is missing");
    assert_refused(
        &vmm(&["--kernel", "/k", "--fs", "tag=a,sock=/s"]),
        "--fs tag=a,sock=/s: \"sock=/s\" is not tag=TAG, socket=PATH or wait=SECS",
    );
    assert_refused(
        &vmm(&["--kernel", "/k", "--fs", "tag=a,socket=/s,wait=61"]),
        "--fs tag=a,socket=/s,wait=61: wait=61: expected whole seconds, 0 to 60",
    );
    assert_refused(&vmm(&["--kernel", "/k", "--fs", "tag=,socket=/s"]), "tag \"\": must not be empty");
    assert_refused(&vmm(&["--kernel", "/k", "--fs", "tag=a,socket=/s", "--fs", "tag=b,socket=/s"]), "only one virtio-fs device");

    // Past the command line (and the kernel, which loads first): the backend's socket
    // must be there and listening.
    let kernel = scratch("fs-kernel", &tiny_elf_kernel());
    let kernel = kernel.to_str().unwrap();
    assert_refused(
        &vmm(&["--kernel", kernel, "--fs", "tag=data,socket=/nonexistent/virtiofsd.sock"]),
        "--fs: vhost-user socket /nonexistent/virtiofsd.sock: No such file or directory",
    );
    // Bound once, nobody listening now.
    let dead = std::env::temp_dir().join(format!("vfvm-cli-{}-dead.sock", std::process::id()));
    let _ = std::fs::remove_file(&dead);
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let out = vmm(&["--kernel", kernel, "--fs", &format!("tag=data,socket={}", dead.display())]);
    std::fs::remove_file(&dead).unwrap();
    assert_refused(&out, &format!("--fs: vhost-user socket {}: Connection refused", dead.display()));
    assert_refused(&out, "is virtiofsd listening there?");
}

/// With a real virtiofsd: the VMM connects and negotiates before the guest runs, and
/// at exit it closes the connection, which ends virtiofsd (and removes its socket).
#[test]
fn a_virtiofsd_backend_is_connected_then_released_when_the_vmm_exits() {
    use std::process::Stdio;
    use std::time::Duration;
    let dir = std::env::temp_dir().join(format!("vfvm-cli-{}-fs", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("shared")).unwrap();
    let socket = dir.join("virtiofsd.sock");
    let (mut virtiofsd, lines, _reader) = common::start_virtiofsd(&socket, &dir.join("shared"), Duration::from_secs(30));
    let backend_deadline = common::KillAfter::new(virtiofsd.id(), Duration::from_secs(60));

    let kernel = scratch("fs-poweroff.elf", &common::tiny_elf(common::POWER_OFF));
    let child = Command::new(env!("CARGO_BIN_EXE_vfvm-vmm"))
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "64"])
        .arg("--fs")
        .arg(format!("tag=shared,socket={}", socket.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = common::KillAfter::new(child.id(), Duration::from_secs(30));
    let out = child.wait_with_output().unwrap();
    drop(deadline);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("virtio-fs (vhost-user)"), "{stderr}");

    let status = virtiofsd.wait().unwrap();
    drop(backend_deadline);
    let log: Vec<String> = lines.try_iter().collect();
    assert!(status.success(), "virtiofsd: {status}; {log:?}");
    assert!(log.iter().any(|l| l.contains("Client disconnected")), "{log:?}");
    assert!(!socket.exists(), "virtiofsd removes its socket when it ends");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The stall report the lab tests print: a line per thread with its state, and
/// a gone process said to be gone.
#[test]
fn thread_states_name_each_thread_and_a_gone_process() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
    // The thread names itself as it starts: wait until it runs.
    let parked = std::thread::Builder::new()
        .name("parked-probe".into())
        .spawn(move || {
            let _ = ready_tx.send(());
            rx.recv()
        })
        .unwrap();
    ready.recv().unwrap();
    let report = common::thread_states(std::process::id());
    drop(tx);
    let _ = parked.join();
    let line = report.lines().find(|l| l.contains(" parked-probe ")).unwrap_or_else(|| panic!("{report}"));
    // "<tid> parked-probe <state> wchan=...": the state is a single letter (R while it
    // is still on its way to sleep, S once asleep).
    let fields: Vec<&str> = line.split(' ').collect();
    assert!(fields.len() >= 4 && fields[0].parse::<u32>().is_ok(), "{line}");
    assert!(fields[2].len() == 1 && "RSD".contains(fields[2]) && fields[3].starts_with("wchan="), "{line}");
    assert_eq!(common::thread_states(u32::MAX), format!("(process {} is gone)", u32::MAX));
}

/// `--vfio` input: bad syntax is named at once; a device this host does not have, or
/// one not bound to vfio-pci, is named with the reason after the kernel loads, before
/// the guest runs (this machine has no IOMMU: every real device fails there too).
#[test]
fn bad_vfio_input_is_named_before_the_guest_starts() {
    assert_refused(
        &vmm(&["--kernel", "/k", "--vfio", "0000:01:00"]),
        "--vfio 0000:01:00: \"0000:01:00\" is not a PCI address (DDDD:BB:DD.F)",
    );
    assert_refused(&vmm(&["--kernel", "/k", "--vfio", "0000:01:00.0,slot=0"]), "--vfio 0000:01:00.0,slot=0: slot: expected 1 to 31");
    assert_refused(&vmm(&["--kernel", "/k", "--vfio", "0000:01:00.0,id=a/b"]), "id \"a/b\": expected 1 to 64 of A-Z a-z 0-9 . _ - :");
    assert_refused(&vmm(&["--kernel", "/k", "--vfio", "0000:01:00.0,mode=x"]), "\"mode=x\" is not id=NAME or slot=N");
    let kernel = scratch("vfio-kernel", &tiny_elf_kernel());
    let kernel = kernel.to_str().unwrap();
    assert_refused(
        &vmm(&["--kernel", kernel, "--vfio", "0000:01:00.0,id=vf0", "--vfio", "0000:01:00.0,id=vf1"]),
        "--vfio 0000:01:00.0,id=vf1: the device or the id is given twice",
    );
    assert_refused(
        &vmm(&["--kernel", kernel, "--vfio", "0000:7f:1f.7"]),
        "VFIO device 0000:7f:1f.7: /sys/bus/pci/devices/0000:7f:1f.7 does not exist",
    );
    // A real function of this machine, on its own driver (or none).
    let on_host_driver = std::fs::read_dir("/sys/bus/pci/devices")
        .unwrap()
        .flatten()
        .find(|d| std::fs::read_link(d.path().join("driver")).is_ok_and(|l| !l.ends_with("vfio-pci")))
        .expect("a PCI function on a host driver (this machine's virtio devices)");
    let bdf = on_host_driver.file_name().to_string_lossy().into_owned();
    let driver = std::fs::read_link(on_host_driver.path().join("driver")).unwrap();
    let driver = driver.file_name().unwrap().to_string_lossy();
    assert_refused(&vmm(&["--kernel", kernel, "--vfio", &bdf]), &format!("VFIO device {bdf}: bound to {driver}, not vfio-pci"));
}

/// `vfvm-vmm ARGS` that inherits `files` (close-on-exec cleared in the child only, so
/// the other tests' children, spawned meanwhile, do not get them).
fn vmm_with_files(args: &[&str], files: &[&std::fs::File]) -> Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfvm-vmm"));
    cmd.args(args);
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // fcntl, which is async-signal-safe, on descriptors the parent keeps open.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

fn fd_of(file: &std::fs::File) -> String {
    use std::os::fd::AsRawFd;
    file.as_raw_fd().to_string()
}

/// `--net` input: bad syntax is named at once; a descriptor that is no tap queue is
/// named before the guest starts; a tap's queue files handed over are the VMM's, and
/// the tap goes when the VMM exits (it is not persistent).
#[test]
fn bad_net_input_is_named_and_a_handed_over_tap_goes_with_the_vmm() {
    for (arg, needle) in [
        ("mac=02:00:00:00:00:01", "fd=N (the tap's queue files) is missing"),
        ("fd=3", "mac=MAC is missing"),
        ("fd=2,mac=02:00:00:00:00:01", "fd \"2\": expected a descriptor number, 3 or more"),
        ("fd=3:3,mac=02:00:00:00:00:01", "fd 3 is named twice"),
        ("fd=3,mac=01:00:00:00:00:01", "mac \"01:00:00:00:00:01\": expected six hex bytes, xx:xx:xx:xx:xx:xx, unicast"),
        ("fd=3,mac=02:00:00:00:01", "expected six hex bytes"),
        ("fd=3,mac=02:00:00:00:00:01,mtu=20", "mtu \"20\": expected 68 to 65535"),
        ("fd=3,mac=02:00:00:00:00:01,datapath=dpdk", "datapath \"dpdk\": expected auto, vhost or userspace"),
        ("fd=3,mac=02:00:00:00:00:01,queues=2", "\"queues=2\" is not fd=N[:N...], mac=MAC, mtu=N or datapath=auto|vhost|userspace"),
    ] {
        assert_refused(&vmm(&["--kernel", "/k", "--net", arg]), &format!("--net {arg}: "));
        assert_refused(&vmm(&["--kernel", "/k", "--net", arg]), needle);
    }
    let kernel = scratch("net-kernel.elf", &common::tiny_elf(common::POWER_OFF));
    let kernel = kernel.to_str().unwrap();
    // Not a tap: /dev/null handed over, and a descriptor that is not open.
    let null = std::fs::File::open("/dev/null").unwrap();
    let arg = format!("fd={},mac=02:00:00:00:00:01", fd_of(&null));
    assert_refused(&vmm_with_files(&["--kernel", kernel, "--net", &arg], &[&null]).output().unwrap(), "not an open tap queue");
    assert_refused(&vmm(&["--kernel", kernel, "--net", "fd=1000,mac=02:00:00:00:00:01"]), "--net: fd 1000: not an open tap queue");

    // A two-queue tap in a namespace of its own, handed over and closed here.
    let ns = vfvm_netlink::Netns::new_anonymous().expect("a network namespace (run as root)");
    let taps = ns.run_in(|| vfvm_netlink::create_tap("vfvmcli0", 2)).unwrap().unwrap();
    let fds: Vec<String> = taps.iter().map(fd_of).collect();
    let arg = format!("fd={},mac=02:00:00:00:00:07,mtu=1400,datapath=userspace", fds.join(":"));
    let child = vmm_with_files(&["--kernel", kernel, "--memory", "64", "--net", &arg], &taps.iter().collect::<Vec<_>>())
        .env("VFVM_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(taps);
    let deadline = common::KillAfter::new(child.id(), std::time::Duration::from_secs(30));
    let out = child.wait_with_output().unwrap();
    drop(deadline);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("virtio-net") && stderr.contains("tap=\"vfvmcli0\"") && stderr.contains("pairs=2"), "{stderr}");
    let h = vfvm_netlink::Handle::in_netns(&ns).unwrap();
    let gone = h.link_by_name("vfvmcli0").unwrap_err();
    assert!(gone.is_not_found(), "the tap outlived the VMM: {gone}");
}
