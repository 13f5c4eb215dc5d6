//! `vfvm-vmm` boots Linux to userspace. Runs inside the lab's L2 (its KVM boots a
//! stock kernel; this machine's does not): `cargo xtask test` runs every `lab_*` test
//! there, with VFVM_LAB_KERNEL (Debian's bzImage) and VFVM_LAB_L3_INITRD (a busybox
//! initramfs whose /init prints the marker below, then runs `poweroff -f`).

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MARKER: &str = "@@vfvm-l3@@ userspace";
/// L2's KVM is SVM emulated by TCG: slow, but a boot takes well under this.
const BOUND: Duration = Duration::from_secs(300);

fn lab_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run this test in the lab (cargo xtask test)"))
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_boots_linux_to_userspace() {
    let kernel = lab_env("VFVM_LAB_KERNEL");
    let initrd = lab_env("VFVM_LAB_L3_INITRD");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfvm-vmm"))
        .args(["--kernel", &kernel, "--initrd", &initrd, "--vcpus", "2", "--memory", "256", "--serial-stdout"])
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1 quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vfvm-vmm");

    // Console lines as they come, each with when it came; the channel closes at EOF.
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let mut console = Vec::new();
    let mut marker_at = None;
    let mut timed_out = false;
    loop {
        let left = BOUND.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if marker_at.is_none() && line.contains(MARKER) {
                    marker_at = Some(started.elapsed());
                }
                println!("console: {line}");
                console.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().expect("wait for vfvm-vmm");
    reader.join().unwrap();
    let log = err_reader.join().unwrap();
    println!("vfvm-vmm stderr:\n{log}");
    assert!(
        !timed_out,
        "vfvm-vmm ran past {BOUND:?}; last console lines: {:?}",
        &console[console.len().saturating_sub(20)..]
    );
    let marker_at = marker_at.unwrap_or_else(|| {
        panic!(
            "no {MARKER:?} on the console ({status}); last lines: {:?}",
            &console[console.len().saturating_sub(20)..]
        )
    });
    println!(
        "vfvm-vmm: userspace marker {:.2} s after start; VMM exited after {:.2} s with {status}",
        marker_at.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    // The initramfs powers off: status 0 (2 would be a reboot, 3 a kernel panic).
    assert_eq!(status.code(), Some(0), "vfvm-vmm should exit 0 on guest power-off");
}
