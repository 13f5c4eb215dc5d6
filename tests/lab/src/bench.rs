//! `cargo xtask bench`: vfvm-vmm against QEMU booting the same guest in the same lab
//! run. Inside L2 (`vfvm-lab inside bench-boot`), each run starts both VMMs with the
//! same kernel, initramfs, command line, vCPUs and memory (alternating which goes
//! first), times process start to the guest's userspace marker on the serial console,
//! then stops the VMM and takes its peak RSS from wait4's rusage. Prints every run,
//! the medians and the ratios. A benchmark, not a test: it asserts nothing but that
//! both guests reach userspace.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::console::{die_with_parent, Lines, Next};
use crate::images::L3_MARKER;

const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

struct Sample {
    to_userspace: Duration,
    peak_rss_kib: i64,
}

fn boot_once(cmd: &mut Command, timeout: Duration) -> Result<Sample> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    die_with_parent(cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let lines = Lines::spawn(child.stdout.take().context("VMM stdout")?);
    let deadline = started + timeout;
    let reached = loop {
        match lines.next_before(deadline) {
            Next::Line(l) if l.contains(&format!("{L3_MARKER} userspace")) => break Some(started.elapsed()),
            Next::Line(_) => {}
            Next::Closed | Next::TimedOut => break None,
        }
    };
    let _ = child.kill();
    let mut status = 0;
    // SAFETY: rusage is plain data the kernel fills; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pid is our unreaped child; status and usage are ours to write.
    let rc = unsafe { libc::wait4(vfvm_test_containerd::pid_t_of(child.id()), &mut status, 0, &mut usage) };
    if rc < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    match reached {
        Some(to_userspace) => Ok(Sample { to_userspace, peak_rss_kib: usage.ru_maxrss }),
        None => bail!("{cmd:?} did not reach userspace within {}s", timeout.as_secs()),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `vfvm-lab inside bench-boot --vmm PATH --kernel PATH --initrd PATH [--runs N] [--vcpus N] [--memory MIB]`
pub fn bench_boot(mut args: impl Iterator<Item = String>) -> Result<i32> {
    const USAGE: &str = "usage: vfvm-lab inside bench-boot --vmm PATH --kernel PATH --initrd PATH [--runs N] [--vcpus N] [--memory MIB]";
    let (mut vmm, mut kernel, mut initrd) = (None, None, None);
    let (mut runs, mut vcpus, mut memory) = (5u32, 2u32, 256u32);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = |v: &str| v.parse::<u32>().with_context(|| format!("{flag} {v:?}: expected a number"));
        match flag.as_str() {
            "--vmm" => vmm = Some(PathBuf::from(value)),
            "--kernel" => kernel = Some(PathBuf::from(value)),
            "--initrd" => initrd = Some(PathBuf::from(value)),
            "--runs" => runs = number(&value)?.max(1),
            "--vcpus" => vcpus = number(&value)?.max(1),
            "--memory" => memory = number(&value)?.max(64),
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    let (Some(vmm), Some(kernel), Some(initrd)) = (vmm, kernel, initrd) else { bail!("{USAGE}") };
    let timeout = Duration::from_secs(300);
    let vfvm = || {
        let mut c = Command::new(&vmm);
        c.arg("--kernel").arg(&kernel).arg("--initrd").arg(&initrd).args(["--cmdline", CMDLINE]);
        c.args(["--vcpus", &vcpus.to_string(), "--memory", &memory.to_string(), "--serial-stdout"]);
        c
    };
    let qemu = || {
        let mut c = Command::new(crate::host::QEMU);
        c.args(["-enable-kvm", "-M", "q35", "-cpu", "host", "-smp", &vcpus.to_string(), "-m", &memory.to_string()]);
        c.args(["-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio"]);
        c.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd).args(["-append", CMDLINE]);
        c
    };
    println!("bench: {runs} runs, {vcpus} vCPUs, {memory} MiB, cmdline {CMDLINE:?}");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        // Alternate the order so neither VMM always gets the warm caches.
        let (a, b) = if run % 2 == 1 {
            (boot_once(&mut vfvm(), timeout)?, boot_once(&mut qemu(), timeout)?)
        } else {
            let q = boot_once(&mut qemu(), timeout)?;
            (boot_once(&mut vfvm(), timeout)?, q)
        };
        println!(
            "bench: run {run}: vfvm-vmm {:.2} s, {} MiB peak RSS | QEMU {:.2} s, {} MiB peak RSS",
            a.to_userspace.as_secs_f64(),
            a.peak_rss_kib / 1024,
            b.to_userspace.as_secs_f64(),
            b.peak_rss_kib / 1024
        );
        ours.push(a);
        theirs.push(b);
    }
    let t = |v: &[Sample]| median(v.iter().map(|s| s.to_userspace.as_secs_f64()).collect());
    let r = |v: &[Sample]| median(v.iter().map(|s| s.peak_rss_kib as f64 / 1024.0).collect());
    let (t_ours, t_qemu, r_ours, r_qemu) = (t(&ours), t(&theirs), r(&ours), r(&theirs));
    println!("bench: median time to userspace: vfvm-vmm {t_ours:.2} s, QEMU {t_qemu:.2} s, ratio vfvm/QEMU {:.2}", t_ours / t_qemu);
    println!("bench: median peak RSS: vfvm-vmm {r_ours:.1} MiB, QEMU {r_qemu:.1} MiB, ratio vfvm/QEMU {:.2}", r_ours / r_qemu);
    Ok(0)
}
