//! `vfvm-lab`: the project's nested SR-IOV lab, and the developer commands built on it.
//!
//! On this machine it installs what the lab needs, boots L2 (an emulated machine with
//! an IOMMU, an SR-IOV NIC and KVM) and runs a command there; inside L2 the same binary
//! does the lab's setup and checks (`inside ...`). Run it as `cargo xtask ...`.

mod agent_check;
mod apt_sources;
mod bench;
mod bench_hotplug;
mod console;
mod containerd;
mod cpio;
mod demo;
mod elf;
mod fuzz;
mod group_check;
mod guest_image;
mod host;
mod hotplug_check;
mod images;
mod inside;
mod install_log;
mod kernel;
mod l2;
mod modules;
mod pci;
mod probe;
mod progress;
mod vsock;

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

const USAGE: &str = "\
usage: cargo xtask <command>

  demo                     the main job: install and build vfvm, then run a pod in a
                           vfvm VM under a private containerd, on this host if its
                           KVM boots Linux (a bounded probe decides), else inside the
                           lab; says which it chose and why
  smoke                    the lab's smoke run: /dev/kvm, the SR-IOV VFs and a VF on
                           vfio-pci inside L2, and an L3 boot (= lab smoke)
  bench [--runs N]         vfvm-vmm against QEMU in the lab, booting the same ELF kernel
                           and initramfs: time to userspace, peak RSS and KVM's exit
                           counters, N rounds (default 5), medians and ratios; the
                           guest image to its agent serving, with and without a VF
                           cold-plugged, and QEMU (-device vfio-pci) with the same VF
  bench-hotplug [--rounds N]
                           a VF hot-plugged into a running guest image until the agent
                           has it configured: vfvm-vmm (control API, ACPI) against QEMU
                           (QMP device_add vfio-pci on a pcie-root-port), and hot-plug
                           against cold-plug, N rounds (default 3), medians and ratios
  soak [--pods N]          the SR-IOV seed pod through CRI N times in a row (default
                           10) with containerd 1.6 and 2.1, in one L2 boot: the
                           leak check of `test` (which runs 2) at length; a test
                           that fails while a guest triple-faults runs again
  test                     install what the tests need, then run every test of the
                           workspace, the lab's included, and each fuzz target for
                           a short time
  fuzz [--seconds N] [TARGET...]
                           the fuzz targets in fuzz/ (cargo fuzz, nightly, ASan), each
                           for N seconds (default 300) from its seeds and the corpus
                           earlier runs grew; a crash, leak or hang fails it, naming
                           the input (targets: virtio_pci, host_api, pod_inputs,
                           agent_replies; default all)
  install                  install the lab's packages, fetch its kernel, build images
  image [--agent PATH] [--out DIR] [--compress KIND] [--init-script]
                           build the vfvm guest image: the lab's Debian kernel and an
                           initramfs with the agent as /init, its libraries and the
                           guest's kernel modules; prints its manifest and paths
                           (`cargo xtask image --help` for the options)
  oci-images [--out DIR]   write the registry-free test images (vfvm.test/busybox:1,
                           vfvm.test/pause:1) as OCI layout archives for `ctr images import`
  lab run [options] -- CMD run CMD inside L2 (chrooted into an overlay of this
                           machine's root, in the current directory); exits with
                           CMD's status, 75 if L2's kernel crashed under it, or
                           125 if the lab itself failed
  lab smoke                run the lab's smoke checks inside L2
  lab test [--filter lab_NAME] EXE...
                           run these test binaries' in-lab (lab_*) tests inside L2, as
                           `test` does: if L2's kernel crashes, the unfinished
                           binaries run once more in a fresh L2 (said, and counted);
                           --filter: only the tests whose names contain lab_NAME

lab run options:
  --vfs N             VFs to create on the igb PF (1-7, default 4)
  --mem MiB           L2 memory (1024-2815, default 2560: VFs need all RAM below 4 GiB)
  --cpus N            L2 vCPUs (default 2)
  --timeout SECS      limit for the whole run (default 1200)
  --boot-timeout SECS limit for L2 to become ready (default 300)
  --out DIR           host directory mounted at /lab/out inside L2
  --no-acs            the igb PF's root port without ACS: the port, the PF and its
                      VFs in one IOMMU group (no VF viable for VFIO)

environment:
  VFVM_LAB_DIR        cache and run directory (default /var/tmp/vfvm-lab)
  VFVM_LAB_KERNEL_PKG kernel package (default: what linux-image-amd64 depends on)
  VFVM_LAB_L2_CMDLINE more kernel parameters for L2 (e.g. kvm_amd.vgif=0)
  VFVM_LAB_ACCEL      QEMU's -accel for L2 (default tcg,thread=multi)
";

/// Exit status for a failure of the lab itself, as opposed to the command run in it.
const LAB_FAILED: u8 = 125;
/// Exit status when L2's kernel crashed under the command (see `l2::L2Crashed`).
const L2_CRASHED: u8 = 75;

fn cache_dir() -> PathBuf {
    std::env::var_os("VFVM_LAB_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp/vfvm-lab"))
}

/// An exclusive lock on the cache while it is filled, so concurrent runs neither
/// download twice nor see a half-built image. Released when dropped.
struct CacheLock {
    _file: std::fs::File,
}

impl CacheLock {
    fn take(cache: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(cache).with_context(|| format!("creating the lab cache {}", cache.display()))?;
        let file = std::fs::File::create(cache.join(".lock"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking the lab cache");
        }
        Ok(Self { _file: file })
    }
}

/// Everything a lab boot needs, installed or fetched if missing.
/// The host's packages only (the first of [`prepare`]'s steps): what building the
/// workspace needs (protoc for the CRI client), so the lints can run before the rest.
fn prepare_packages() -> Result<()> {
    let cache = cache_dir();
    let _lock = CacheLock::take(&cache)?;
    host::ensure_packages(&install_log::InstallLog::in_cache(&cache))
}

fn prepare() -> Result<(PathBuf, kernel::Kernel, images::Images)> {
    let cache = cache_dir();
    let _lock = CacheLock::take(&cache)?;
    let log = install_log::InstallLog::in_cache(&cache);
    host::ensure_packages(&log)?;
    host::ensure_virtiofsd(&log)?;
    containerd::ensure_sid(&cache)?;
    let busybox = host::find_busybox().context("no static busybox after installing busybox-static")?;
    let kernel = kernel::ensure(&cache)?;
    let images = images::ensure(&cache, &kernel, &busybox)?;
    Ok((cache, kernel, images))
}

fn parse_secs(flag: &str, value: Option<String>) -> Result<Duration> {
    let v = value.with_context(|| format!("{flag} needs a number of seconds"))?;
    let secs: u64 = v.parse().with_context(|| format!("{flag} {v:?}: expected a whole number of seconds"))?;
    if secs == 0 {
        bail!("{flag} must be at least 1 second");
    }
    Ok(Duration::from_secs(secs))
}

fn parse_run_options(args: &mut impl Iterator<Item = String>) -> Result<l2::RunOptions> {
    let mut opts = l2::RunOptions::default();
    while let Some(arg) = args.next() {
        let mut number = |flag: &str| -> Result<u32> {
            let v = args.next().with_context(|| format!("{flag} needs a value"))?;
            v.parse().with_context(|| format!("{flag} {v:?}: expected a whole number"))
        };
        match arg.as_str() {
            "--" => {
                opts.command = args.collect();
                break;
            }
            "--vfs" => opts.vfs = number("--vfs")?,
            "--mem" => opts.mem_mib = number("--mem")?,
            "--cpus" => opts.cpus = number("--cpus")?,
            "--timeout" => opts.timeout = parse_secs("--timeout", args.next())?,
            "--boot-timeout" => opts.boot_timeout = parse_secs("--boot-timeout", args.next())?,
            "--out" => opts.out_dir = Some(PathBuf::from(args.next().context("--out needs a directory")?)),
            "--no-acs" => opts.no_acs = true,
            other => bail!("unknown lab run option {other:?}\n\n{USAGE}"),
        }
    }
    if opts.mem_mib < 1024 || opts.mem_mib > l2::MAX_MEM_MIB {
        bail!(
            "--mem {}: L2 takes 1024 to {} MiB (more puts RAM above 4 GiB, which moves the VF BARs \
             above 4 GiB, where this QEMU's SR-IOV emulation does not map them)",
            opts.mem_mib,
            l2::MAX_MEM_MIB
        );
    }
    if opts.cpus == 0 {
        bail!("--cpus must be at least 1");
    }
    if opts.vfs == 0 || opts.vfs > 7 {
        bail!("--vfs {}: the lab's igb PF offers 1 to 7 VFs", opts.vfs);
    }
    if opts.command.is_empty() {
        bail!("no command given: use `cargo xtask lab run [options] -- <command> [args...]`");
    }
    Ok(opts)
}

fn lab_run(opts: &l2::RunOptions) -> Result<i32> {
    let (cache, kernel, images) = prepare()?;
    l2::run(&cache, &kernel, &images, opts)
}

/// `cargo xtask image`: builds (or finds in the cache) the guest image and prints its
/// manifest, then the kernel's and the initramfs's paths.
fn image(args: impl Iterator<Item = String>) -> Result<i32> {
    let args: Vec<String> = args.collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", guest_image::USAGE);
        return Ok(0);
    }
    let opts = guest_image::parse_options(args)?;
    let cache = cache_dir();
    let _lock = CacheLock::take(&cache)?;
    host::ensure_packages(&install_log::InstallLog::in_cache(&cache))?;
    let busybox = host::find_busybox().context("no static busybox after installing busybox-static")?;
    let kernel = kernel::ensure(&cache)?;
    let built = guest_image::ensure(&cache, &kernel, &busybox, &opts)?;
    print!("{}", built.manifest.render());
    println!("kernel: {}", built.kernel.display());
    println!("initrd: {}", built.initrd.display());
    Ok(0)
}

/// The prefix of in-lab tests run only by hand (`lab test --filter byhand_...`): the full
/// versions of tests too fault-prone in the lab for the test command, whose
/// `lab_` filter does not match them.
const BY_HAND_TEST_MARK: &str = "byhand_";

/// `cargo xtask lab test EXE...`: the in-lab tests of these test binaries, as
/// `cargo xtask test` runs them (one L2, a fresh one after an L2 crash).
fn lab_test(args: &[String]) -> Result<i32> {
    let (filter, executables) = match args {
        [flag, filter, rest @ ..] if flag == "--filter" => (filter.as_str(), rest),
        _ => (IN_LAB_TEST_MARK, args),
    };
    ensure!(!executables.is_empty(), "usage: cargo xtask lab test [--filter lab_NAME] TEST-EXECUTABLE...");
    ensure!(
        filter.starts_with(IN_LAB_TEST_MARK) || filter.starts_with(BY_HAND_TEST_MARK),
        "--filter {filter:?}: in-lab tests' names start with {IN_LAB_TEST_MARK:?} (or {BY_HAND_TEST_MARK:?}: the full versions `cargo xtask test` leaves out)"
    );
    let (_, kernel, _) = prepare()?;
    export_test_guest_image(&kernel, guest_image::release_agent(&host::target_dir()?)?)?;
    // L2 runs them from this directory: absolute paths work from anywhere.
    let executables = executables
        .iter()
        .map(|e| std::fs::canonicalize(e).with_context(|| format!("test executable {e}")).map(|p| p.to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?;
    let mut totals = TestTotals::default();
    let (ok, crashes) = run_in_lab(&executables, filter, IN_LAB_TIMEOUT, &mut totals)?;
    println!(
        "\nin-lab tests: {} passed, {} failed, {} skipped; L2 crashes: {crashes}; re-runs after a guest triple fault or stall: {}",
        totals.counts.passed, totals.counts.failed, totals.counts.ignored, totals.reruns
    );
    // A filter that matched nothing ran nothing: that is not a pass.
    Ok(if ok && totals.counts.failed == 0 && totals.counts.passed > 0 { 0 } else { 1 })
}

/// How long `cargo xtask test` runs each fuzz target.
const TEST_FUZZ_SECONDS: u64 = 20;

/// The limit for one L2 boot running in-lab tests (all of `test`'s take ~20 min).
const IN_LAB_TIMEOUT: Duration = Duration::from_secs(4500);

fn lab_smoke() -> Result<i32> {
    let me = host::self_exe()?.to_string_lossy().into_owned();
    let opts = l2::RunOptions { command: vec![me, "inside".into(), "smoke".into()], ..Default::default() };
    lab_run(&opts)
}

/// Tests with this in their name (and `#[ignore]`d, since they cannot pass on the host)
/// need the lab's hardware: `cargo xtask test` runs them inside L2, all in one boot.
const IN_LAB_TEST_MARK: &str = "lab_";

/// `cargo xtask test`: the README's test command. Installs first, so the lab tests
/// spend their time limits on testing, not downloading. Ends with one summary line
/// over every test binary, so the last word is not some crate's empty doc-test run.
fn test() -> Result<i32> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // A fresh machine has no protoc, which clippy's build of the CRI client needs.
    prepare_packages()?;
    check_conventions(&cargo)?;
    let (_, kernel, _) = prepare()?;
    // The guest image's agent is a release build (stripped into the image): built
    // first, so the tests that build the image find it up to date.
    let agent = guest_image::release_agent(&host::target_dir()?)?;
    progress!("lab ready (kernel {}); running the workspace's tests on this machine", kernel.release);
    let mut totals = TestTotals::default();
    let mut ok = run_counting(
        // Neither the in-lab tests nor their by-hand full versions can pass on the host.
        Command::new(&cargo).args([
            "test",
            "--workspace",
            "--no-fail-fast",
            "--",
            "--include-ignored",
            "--skip",
            IN_LAB_TEST_MARK,
            "--skip",
            BY_HAND_TEST_MARK,
        ]),
        &mut totals,
    )?
    .success();

    // The fuzz targets, briefly (the campaign is `cargo xtask fuzz`).
    let targets: Vec<String> = fuzz::TARGETS.iter().map(|t| t.to_string()).collect();
    let fuzzed = fuzz::run_targets(&cache_dir(), TEST_FUZZ_SECONDS, &targets)?;
    let fuzz_failed = fuzzed.iter().filter(|r| r.failed.is_some()).count();
    ok &= fuzz_failed == 0;

    let executables = test_executables(&cargo)?;
    export_test_guest_image(&kernel, agent)?;
    let mut in_lab = Vec::new();
    for exe in &executables {
        let n = in_lab_tests(exe)?;
        if n > 0 {
            progress!("{n} in-lab test(s) in {}", exe.display());
            in_lab.push(exe.to_string_lossy().into_owned());
        }
    }
    let mut lab_crashes = 0;
    if in_lab.is_empty() {
        progress!("no in-lab ({IN_LAB_TEST_MARK}*) tests in the workspace");
    } else {
        let (lab_ok, crashes) = run_in_lab(&in_lab, IN_LAB_TEST_MARK, IN_LAB_TIMEOUT, &mut totals)?;
        ok &= lab_ok;
        lab_crashes = crashes;
    }
    let mut crashed = match lab_crashes {
        0 => String::new(),
        n => format!(" (L2's kernel crashed {n} time(s); the unfinished test binaries ran again in a fresh L2)"),
    };
    if totals.reruns > 0 {
        crashed += &format!(" ({} re-run(s) of tests that failed while an L3 guest triple-faulted or stalled in KVM)", totals.reruns);
    }
    println!("\nfuzz targets: {} run for {TEST_FUZZ_SECONDS} s each, {fuzz_failed} failed", fuzzed.len());
    println!(
        "all test binaries: {} passed, {} failed, {} skipped{crashed}",
        totals.counts.passed, totals.counts.failed, totals.counts.ignored
    );
    Ok(if ok && totals.counts.failed == 0 { 0 } else { 1 })
}

/// The cheap checks first: formatting (rustfmt.toml) and the workspace's lints
/// (`[workspace.lints]`, clippy with warnings as errors). Either failing stops the
/// test command before anything is installed or booted, saying which and how to mend it.
fn check_conventions(cargo: &str) -> Result<()> {
    progress!("checking formatting: cargo fmt --all --check");
    let fmt =
        Command::new(cargo).args(["fmt", "--all", "--check"]).stdin(std::process::Stdio::null()).status().context("running cargo fmt")?;
    ensure!(fmt.success(), "cargo fmt --all --check: the code is not formatted as rustfmt.toml asks (diff above); run `cargo fmt --all`");
    progress!("checking lints: cargo clippy --workspace --all-targets -- -D warnings");
    let clippy = Command::new(cargo)
        .args(["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"])
        .stdin(std::process::Stdio::null())
        .status()
        .context("running cargo clippy")?;
    ensure!(clippy.success(), "cargo clippy --workspace --all-targets -- -D warnings failed (its findings above): fix them, or allow one on a single item with a comment saying why");
    Ok(())
}

/// How many times `cargo xtask test` starts a fresh L2 after L2's kernel crashed.
const L2_CRASH_RETRIES: u32 = 1;

/// Runs the in-lab tests of these executables in one L2. If L2's kernel crashes (a
/// fault of TCG's emulated SVM, see `l2::L2Crashed`), the binaries that had not
/// finished run again in a fresh L2, at most `L2_CRASH_RETRIES` times; the crash is
/// reported, never hidden. A binary's results count once: libtest prints its summary
/// only when it finishes. Returns whether every run succeeded, and the crash count.
fn run_in_lab(executables: &[String], filter: &str, timeout: Duration, totals: &mut TestTotals) -> Result<(bool, u32)> {
    let me = host::self_exe()?;
    let outs = cache_dir().join("test-out");
    l2::prune_runs(&outs);
    let out = outs.join(format!("{}-{}", l2::unix_secs(), std::process::id()));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut left = executables.to_vec();
    let mut crashes = 0;
    loop {
        progress!("running the in-lab tests of {} test binaries inside L2 (results kept in {})", left.len(), out.display());
        let mut lab = Command::new(&me);
        lab.args(["lab", "run", "--timeout", &timeout.as_secs().to_string(), "--out"])
            .arg(&out)
            .arg("--")
            .arg(&me)
            .args(["inside", "run-tests", "--filter", filter])
            .args(&left);
        let status = run_counting(&mut lab, totals)?;
        if status.code() != Some(i32::from(L2_CRASHED)) {
            return Ok((status.success(), crashes));
        }
        crashes += 1;
        let done = inside::finished_test_binaries(&out);
        left.retain(|exe| !done.contains(exe));
        if left.is_empty() {
            // Every binary finished (and was counted) before the crash.
            return Ok((true, crashes));
        }
        if crashes > L2_CRASH_RETRIES {
            progress!("L2's kernel crashed {crashes} time(s); not starting another L2");
            return Ok((false, crashes));
        }
        progress!(
            "L2's kernel crashed or L2 reset (a fault of TCG's emulated SVM, see the console above): running the {} unfinished test binaries in a fresh L2",
            left.len()
        );
    }
}

/// Runs a command whose stdout carries libtest output: shows it, adds up its summaries.
fn run_counting(cmd: &mut Command, totals: &mut TestTotals) -> Result<std::process::ExitStatus> {
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("running {cmd:?}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
        println!("{line}");
        totals.add(&line);
    }
    child.wait().with_context(|| format!("waiting for {cmd:?}"))
}

/// The workspace's test executables, as cargo reports them (builds them if needed):
/// artifacts built with the test profile, i.e. libtest harnesses.
fn test_executables(cargo: &str) -> Result<Vec<PathBuf>> {
    let out = host::run(Command::new(cargo).args(["test", "--workspace", "--no-run", "--quiet", "--message-format=json"]))?;
    let mut exes = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let is_test_build = msg["reason"] == "compiler-artifact" && msg["profile"]["test"] == true;
        if let (true, Some(exe)) = (is_test_build, msg["executable"].as_str()) {
            exes.push(PathBuf::from(exe));
        }
    }
    Ok(exes)
}

/// How many ignored in-lab tests a test executable holds.
fn in_lab_tests(exe: &Path) -> Result<usize> {
    let listing = host::run(Command::new(exe).args(["--list", "--ignored", IN_LAB_TEST_MARK]))?;
    Ok(listing.lines().filter(|l| l.ends_with(": test")).count())
}

#[derive(Default, Debug, PartialEq)]
struct TestTotals {
    counts: inside::TestCounts,
    /// Re-runs of tests that failed while a guest triple-faulted (see `inside::run_tests`).
    reruns: u64,
}

impl TestTotals {
    /// Adds one libtest summary (`test result: ok. 3 passed; 0 failed; 1 ignored; ...`),
    /// or notes a re-run after a guest's triple fault.
    fn add(&mut self, line: &str) {
        if line.starts_with(inside::TRIPLE_FAULT_RERUN) {
            self.reruns += 1;
        } else if let Some(c) = inside::TestCounts::parse(line) {
            self.counts.add(c);
        }
    }
}

/// A command's one option, `flag N` (N at least 1), or `default`.
fn count_option(mut args: impl Iterator<Item = String>, command: &str, flag: &str, default: u32) -> Result<u32> {
    let mut n = default;
    while let Some(arg) = args.next() {
        ensure!(arg == flag, "unknown {command} option {arg:?}\n\n{USAGE}");
        let v = args.next().with_context(|| format!("{flag} needs a number"))?;
        n = v.parse().ok().filter(|&n| n > 0).with_context(|| format!("{flag} {v:?}: expected a number, 1 or more"))?;
    }
    Ok(n)
}

/// The seed-pod tests `soak` runs, in `lab_cri`'s test binary.
const SOAK_TESTS: &str = "lab_cri_seed_pod_gets_its_vf_in_its_vm_containerd_";

/// `cargo xtask soak [--pods N]`: the seed pod (a VF through CRI) N times in a row
/// per containerd version, in one L2 boot; the same test `test` runs with 2 pods.
fn soak(args: impl Iterator<Item = String>) -> Result<i32> {
    let pods = count_option(args, "soak", "--pods", 10)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let (_, kernel, _) = prepare()?;
    export_test_guest_image(&kernel, guest_image::release_agent(&host::target_dir()?)?)?;
    // VFVM_* (not VFVM_LAB_*) variables are passed on into L2.
    std::env::set_var("VFVM_SRIOV_PODS", pods.to_string());
    let exe = test_executables(&cargo)?
        .into_iter()
        .find(|e| e.file_name().is_some_and(|n| n.to_string_lossy().starts_with("lab_cri-")))
        .context("no lab_cri test binary in the workspace")?;
    progress!("soak: the seed pod {pods} times in a row with containerd 1.6 and 2.1 ({})", exe.display());
    // As `test` runs them: a test that failed while a guest triple-faulted runs again.
    let mut totals = TestTotals::default();
    // Each round is two pods (with the VF and without), ~1-2 min in the lab, per
    // containerd version; and the boot.
    let timeout = Duration::from_secs(900 + 2 * 240 * u64::from(pods));
    let (ok, crashes) = run_in_lab(&[exe.to_string_lossy().into_owned()], SOAK_TESTS, timeout, &mut totals)?;
    println!(
        "\nsoak: {} passed, {} failed; L2 crashes: {crashes}; re-runs after a guest triple fault or stall: {}",
        totals.counts.passed, totals.counts.failed, totals.reruns
    );
    // Both versions' tests, or the soak did not run what it says.
    Ok(if ok && totals.counts.failed == 0 && totals.counts.passed == 2 { 0 } else { 1 })
}

/// The guest image with `agent` as PID 1, built into the lab cache (or found there).
fn guest_image_with_agent(cache: &std::path::Path, kernel: &kernel::Kernel, agent: PathBuf) -> Result<guest_image::GuestImage> {
    let _lock = CacheLock::take(cache)?;
    let busybox = host::find_busybox().context("no static busybox after installing busybox-static")?;
    guest_image::ensure(cache, kernel, &busybox, &guest_image::Options { agent: Some(agent), ..Default::default() })
}

/// Builds (or finds) the guest image with `agent` and tells the tests where it is:
/// the shim's lab tests boot pods from it. VFVM_* (not VFVM_LAB_*) variables are
/// passed on into L2.
fn export_test_guest_image(kernel: &kernel::Kernel, agent: PathBuf) -> Result<()> {
    let built = guest_image_with_agent(&cache_dir(), kernel, agent)?;
    progress!("guest image with this build's agent: {}", built.initrd.display());
    std::env::set_var("VFVM_TEST_AGENT_INITRD", &built.initrd);
    std::env::set_var("VFVM_TEST_AGENT_KERNEL", &built.kernel);
    Ok(())
}

/// `cargo xtask bench [--runs N]`: a release vfvm-vmm against QEMU, booting the lab's
/// L3 test guest inside L2 (see bench.rs).
fn bench(args: impl Iterator<Item = String>) -> Result<i32> {
    let runs = count_option(args, "bench", "--runs", 5)?;
    let (cache, kernel, images) = prepare()?;
    let target = host::target_dir()?;
    let vmm = host::release_build(&target, "vfvm-vmm")?;
    // The guest image as the shim boots it (this build's release agent), measured
    // against the bare initramfs.
    let image = guest_image_with_agent(&cache, &kernel, guest_image::release_agent(&target)?)?;
    let me = host::self_exe()?.to_string_lossy().into_owned();
    let opts = l2::RunOptions {
        command: vec![
            me,
            "inside".into(),
            "bench-boot".into(),
            "--vmm".into(),
            vmm.to_string_lossy().into_owned(),
            "--kernel".into(),
            kernel.vmlinux()?.to_string_lossy().into_owned(),
            "--initrd".into(),
            images.l3_initrd.to_string_lossy().into_owned(),
            "--image".into(),
            image.initrd.to_string_lossy().into_owned(),
            // The guest image with a VF cold-plugged, by vfvm-vmm and by QEMU.
            "--vf".into(),
            "0".into(),
            "--runs".into(),
            runs.to_string(),
        ],
        vfs: 1,
        ..Default::default()
    };
    l2::run(&cache, &kernel, &images, &opts)
}

/// `cargo xtask bench-hotplug [--rounds N]`: VF hot-plug into a running guest,
/// vfvm-vmm against QEMU's QMP `device_add` and against cold-plug (see bench_hotplug.rs).
fn bench_hotplug(args: impl Iterator<Item = String>) -> Result<i32> {
    let rounds = count_option(args, "bench-hotplug", "--rounds", 3)?;
    let (cache, kernel, images) = prepare()?;
    let target = host::target_dir()?;
    let vmm = host::release_build(&target, "vfvm-vmm")?;
    let image = guest_image_with_agent(&cache, &kernel, guest_image::release_agent(&target)?)?;
    let me = host::self_exe()?.to_string_lossy().into_owned();
    let command = vec![
        me,
        "inside".into(),
        "bench-hotplug".into(),
        "--vmm".into(),
        vmm.to_string_lossy().into_owned(),
        "--kernel".into(),
        kernel.vmlinux()?.to_string_lossy().into_owned(),
        "--image".into(),
        image.initrd.to_string_lossy().into_owned(),
        "--rounds".into(),
        rounds.to_string(),
    ];
    // The hot-plug checks' VFs are the PF's VFs 1 and 2.
    l2::run(&cache, &kernel, &images, &l2::RunOptions { command, vfs: 3, ..Default::default() })
}

fn dispatch(mut args: impl Iterator<Item = String>) -> Result<i32> {
    let first = args.next().unwrap_or_default();
    let second = args.next();
    match (first.as_str(), second.as_deref()) {
        ("demo", None) => demo::demo(),
        ("smoke", None) | ("lab", Some("smoke")) => lab_smoke(),
        ("test", None) => test(),
        ("install", None) => {
            let (cache, kernel, images) = prepare()?;
            println!("lab cache:  {}", cache.display());
            println!("kernel:     {}", kernel.vmlinuz().display());
            println!("L2 initrd:  {}", images.l2_initrd.display());
            println!("L3 initrd:  {}", images.l3_initrd.display());
            println!("L3 probe:   {}", images.probe_initrd.display());
            for version in vfvm_test_containerd::Version::ALL {
                println!("containerd: {} ({})", version.check_installed()?, version.bin_dir().display());
            }
            Ok(0)
        }
        ("lab", Some("run")) => lab_run(&parse_run_options(&mut args)?),
        ("lab", Some("test")) => lab_test(&args.collect::<Vec<_>>()),
        ("image", _) => image(second.into_iter().chain(args)),
        ("oci-images", _) => containerd::oci_images(second.into_iter().chain(args)),
        ("inside", Some("boot-l3")) => inside::boot_image(args),
        ("inside", Some("agent-check")) => agent_check::agent_check(args),
        ("inside", Some("hotplug-check")) => hotplug_check::hotplug_check(args),
        ("inside", Some("bench-boot")) => bench::bench_boot(args),
        ("bench", _) => bench(second.into_iter().chain(args)),
        ("bench-hotplug", _) => bench_hotplug(second.into_iter().chain(args)),
        ("inside", Some("bench-hotplug")) => bench_hotplug::bench_hotplug(args),
        ("soak", _) => soak(second.into_iter().chain(args)),
        ("fuzz", _) => fuzz::fuzz_command(&cache_dir(), second.into_iter().chain(args)),
        ("inside", Some("setup")) => {
            let vfs = match (args.next().as_deref(), args.next()) {
                (Some("--vfs"), Some(n)) => n.parse().with_context(|| format!("--vfs {n:?}: expected a number"))?,
                _ => bail!("usage: vfvm-lab inside setup --vfs N"),
            };
            inside::setup(vfs).map(|_| 0)
        }
        ("inside", Some("smoke")) => inside::smoke().map(|_| 0),
        ("inside", Some("demo-pod")) => demo::inside_demo_pod(),
        ("inside", Some("demo-host")) => demo::inside_demo_host(),
        ("inside", Some("non-viable-group")) => group_check::non_viable_group(),
        ("guest", Some("vsock-probe")) => probe::vsock_probe(args),
        ("guest", Some("virtiofs-probe")) => probe::virtiofs_probe(args),
        ("guest", Some("wait-power-button")) => probe::wait_power_button(),
        ("inside", Some("run-tests")) => {
            let args: Vec<String> = args.collect();
            match args.as_slice() {
                [flag, filter, executables @ ..] if flag == "--filter" => inside::run_tests(executables, filter),
                executables => inside::run_tests(executables, IN_LAB_TEST_MARK),
            }
        }
        ("help" | "--help" | "-h", _) => {
            print!("{USAGE}");
            Ok(0)
        }
        _ => bail!("unknown command {:?}\n\n{USAGE}", [first, second.unwrap_or_default()].join(" ").trim()),
    }
}

fn main() -> ExitCode {
    progress::start_clock();
    let inside = std::env::args().nth(1).as_deref() == Some("inside");
    match dispatch(std::env::args().skip(1)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("vfvm-lab: error: {e:#}");
            // Inside L2 a failed check is the command's failure; outside, the lab's.
            ExitCode::from(match () {
                _ if inside => 1,
                _ if e.downcast_ref::<l2::L2Crashed>().is_some() => L2_CRASHED,
                _ => LAB_FAILED,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TestTotals;

    #[test]
    fn libtest_summaries_add_up() {
        let mut t = TestTotals::default();
        t.add("test result: ok. 10 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9.00s");
        t.add("test something ... ok");
        t.add("running 4 tests");
        t.add("lab: counted below, after the re-runs: test result: FAILED. 1 passed; 1 failed; 0 ignored");
        t.add(&format!("{}target/debug/deps/lab_cri-0", crate::inside::TRIPLE_FAULT_RERUN));
        assert_eq!(t, TestTotals { counts: crate::inside::TestCounts { passed: 11, failed: 2, ignored: 3 }, reruns: 1 });
    }
}
