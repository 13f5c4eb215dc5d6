//! CRI acceptance: pods in vfvm VMs under real containerd 1.6 and 2.1, each
//! configured with its snippet from `configs/containerd/`, driven through CRI with
//! crictl's command lines (real `crictl` when it is on PATH, else this package's
//! `vfvm-crictl`), and the pod start benchmark against containerd's runc. These
//! run inside the lab's L2 machine (real KVM there), where `cargo xtask test` runs
//! every `lab_*` test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use vfvm_crictl::logrus::fatal_message;
use vfvm_test_containerd::igb_vfs::{self, IgbVf};
use vfvm_test_containerd::{
    install_vfvm, oci, output_within, pids_named, print_figures, vfvm_consoles, vfvm_leftovers, which, Containerd, SriovNetwork, Version,
    CRI_NAMESPACE, VFVM_STATE_DIR,
};

/// How long one CRI command may take: a pod's VM boots in about 25 s in an idle
/// lab and in about 90 s while the host is busy (L3 under TCG-emulated SVM); two
/// boot at once here.
const CALL_LIMIT: Duration = Duration::from_secs(300);
/// crictl's own per-call timeout, a little inside [`CALL_LIMIT`].
const CRICTL_TIMEOUT: &str = "280s";
/// How long a pod's processes may take to go after `rmp`.
const GONE_LIMIT: Duration = Duration::from_secs(60);
/// Between two looks at a state that changes on its own (log lines being copied).
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// An exec of `cat` takes a second or two in the lab; a minute means the exit
/// waited on a timeout somewhere.
const EXEC_LIMIT: Duration = Duration::from_secs(30);

/// The workspace's build directory, from this test binary's path (target/debug/deps/..).
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent().and_then(Path::parent).expect("target/debug").to_path_buf()
}

/// The CRI client: `crictl` if installed, else ours (same command lines).
fn crictl() -> PathBuf {
    which("crictl").unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vfvm-crictl")))
}

/// The error a failed crictl call reported, from its stderr, as plain text. Both
/// clients end with crictl's `logrus.Fatal` line, `level=fatal msg="..."`, whose
/// message is Go-quoted (`\"64\"`, `err\n`); this is that message unquoted
/// (`"64"`, a newline), so a check reads the runtime's words whichever client
/// printed them. Without such a line, the whole stderr, as it is.
fn crictl_error(stderr: &str) -> String {
    fatal_message(stderr).unwrap_or_else(|| stderr.trim().to_string())
}

/// A CRI client on one containerd, and a directory for config files and pod logs.
struct Cri<'a> {
    c: &'a Containerd,
    bin: PathBuf,
    dir: PathBuf,
}

impl<'a> Cri<'a> {
    fn new(c: &'a Containerd) -> Result<Cri<'a>> {
        let dir = c.dir().join("cri");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let bin = crictl();
        eprintln!("containerd {}: CRI client {}", c.version().name(), bin.display());
        Ok(Cri { c, bin, dir })
    }

    /// `crictl ARGS`, bounded; its output whatever its exit status.
    fn run(&self, args: &[&str]) -> Result<Output> {
        let endpoint = self.c.cri_endpoint();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--runtime-endpoint", &endpoint, "--image-endpoint", &endpoint, "--timeout", CRICTL_TIMEOUT]).args(args);
        output_within(&mut cmd, CALL_LIMIT).with_context(|| format!("crictl {}", args.join(" ")))
    }

    /// `crictl ARGS`, which must succeed; its stdout, trimmed.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        ensure!(
            out.status.success(),
            "crictl {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Writes a crictl JSON config file.
    fn file(&self, name: &str, content: &Value) -> Result<String> {
        let path = self.dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(content)?).with_context(|| format!("writing {}", path.display()))?;
        Ok(path.to_string_lossy().into_owned())
    }

    /// A pod config (crictl's `runp` file), with its own log directory.
    fn pod_config(&self, name: &str) -> Result<String> {
        self.pod_config_annotated(name, &[])
    }

    /// A pod config with these annotations.
    fn pod_config_annotated(&self, name: &str, annotations: &[(&str, &str)]) -> Result<String> {
        let logs = self.dir.join("logs").join(name);
        std::fs::create_dir_all(&logs)?;
        let annotations: serde_json::Map<String, Value> = annotations.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect();
        let pod = json!({
            "metadata": {"name": name, "namespace": "vfvm-test", "uid": format!("{name}-uid"), "attempt": 0},
            "hostname": name,
            "log_directory": logs,
            "annotations": annotations,
            "linux": {}
        });
        self.file(&format!("pod-{name}.json"), &pod)
    }

    /// A busybox container config running `script` with these env vars.
    fn container_config_env(&self, name: &str, script: &str, env: &[(&str, &str)]) -> Result<String> {
        let envs: Vec<Value> = env.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
        let container = json!({
            "metadata": {"name": name},
            "image": {"image": oci::BUSYBOX_REF},
            "command": ["sh", "-c", script],
            "envs": envs,
            "log_path": format!("{name}.log"),
            "linux": {}
        });
        self.file(&format!("container-{name}.json"), &container)
    }

    /// A busybox container config running `script`.
    fn container_config(&self, name: &str, script: &str) -> Result<String> {
        let container = json!({
            "metadata": {"name": name},
            "image": {"image": oci::BUSYBOX_REF},
            "command": ["sh", "-c", script],
            "log_path": format!("{name}.log"),
            "linux": {}
        });
        self.file(&format!("container-{name}.json"), &container)
    }

    fn runp(&self, handler: &str, pod_file: &str) -> Result<String> {
        let id = self.ok(&["runp", "--runtime", handler, pod_file])?;
        ensure!(!id.is_empty() && !id.contains(char::is_whitespace), "runp printed {id:?}, not a pod id");
        Ok(id)
    }

    /// create + start; returns the container id.
    fn create_and_start(&self, pod: &str, container_file: &str, pod_file: &str) -> Result<String> {
        let id = self.ok(&["create", "--no-pull", pod, container_file, pod_file])?;
        self.ok(&["start", &id])?;
        Ok(id)
    }

    fn inspect(&self, what: &str, id: &str) -> Result<Value> {
        let text = self.ok(&[what, id])?;
        serde_json::from_str(&text).with_context(|| format!("crictl {what} {id} printed no JSON: {text}"))
    }

    /// Polls ContainerStatus until the container is RUNNING.
    fn wait_running(&self, id: &str, deadline: Instant) -> Result<()> {
        loop {
            let status = self.inspect("inspect", id)?;
            match status["status"]["state"].as_str() {
                Some("CONTAINER_RUNNING") => return Ok(()),
                Some("CONTAINER_CREATED") if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                _ => bail!("container {id} is not running: {}", status["status"]),
            }
        }
    }

    /// Polls `crictl logs` until it shows `needle` (the runtime copies output
    /// into the log file as it comes).
    fn wait_logs(&self, id: &str, needle: &str, deadline: Instant) -> Result<String> {
        loop {
            let out = self.run(&["logs", id])?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && text.contains(needle) {
                return Ok(text);
            }
            ensure!(
                Instant::now() < deadline,
                "the log of {id} never showed {needle:?}; last `crictl logs`: {}\nstdout: {text}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// `crictl exec -s`: (exit code, stdout, stderr); it must finish within [`EXEC_LIMIT`].
    fn exec(&self, id: &str, cmd: &[&str]) -> Result<(i32, String, String)> {
        let args: Vec<&str> = ["exec", "-s", id].iter().copied().chain(cmd.iter().copied()).collect();
        let started = Instant::now();
        let out = self.run(&args)?;
        let took = started.elapsed();
        let code = out.status.code().with_context(|| format!("crictl exec {id} killed by a signal"))?;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        ensure!(
            took < EXEC_LIMIT,
            "crictl exec {id} {cmd:?} took {:.1}s (exit {code}, stdout {stdout:?}, stderr {stderr:?})",
            took.as_secs_f64()
        );
        Ok((code, stdout, stderr))
    }

    fn ids(&self, args: &[&str]) -> Result<BTreeSet<String>> {
        Ok(self.ok(args)?.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
    }

    /// stopp + rmp, timed.
    fn remove_pod(&self, pod: &str) -> Result<()> {
        let started = Instant::now();
        self.ok(&["stopp", pod])?;
        let stopped = started.elapsed();
        self.ok(&["rmp", pod])?;
        eprintln!(
            "containerd {}: pod {pod}: stopp {:.1}s, rmp {:.1}s",
            self.c.version().name(),
            stopped.as_secs_f64(),
            (started.elapsed() - stopped).as_secs_f64()
        );
        Ok(())
    }

    /// Removes whatever pods are left (after a failure), reporting nothing.
    fn remove_all_pods(&self) {
        if let Ok(pods) = self.ids(&["pods", "-q"]) {
            for pod in pods {
                if let Err(e) = self.remove_pod(&pod) {
                    eprintln!("cleanup: {e:#}");
                }
            }
        }
    }

    /// What a failure message needs: the VM consoles and containerd's log (the
    /// shim logs there too).
    fn diagnostics(&self) -> String {
        format!("VM consoles:\n{}\ncontainerd {} log:\n{}", vfvm_consoles(), self.c.version().name(), self.c.log())
    }
}

/// The pod each running vfvm-vmm serves, from its kernel command line.
fn vmm_pods() -> Vec<String> {
    pids_named("vfvm-vmm")
        .into_iter()
        .map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            text.split_whitespace().find_map(|w| w.strip_prefix("vfvm.sandbox=")).unwrap_or("?").to_string()
        })
        .collect()
}

/// Waits until no vfvm process, mount or state is left.
fn wait_nothing_left(what: &str) -> Result<()> {
    let deadline = Instant::now() + GONE_LIMIT;
    loop {
        let left = vfvm_leftovers();
        if left.is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{what}: still there after {}s: {left:?}", GONE_LIMIT.as_secs());
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Starts a containerd with CRI's images and this build as its vfvm runtime.
fn containerd(version: Version) -> Containerd {
    install_vfvm(&build_dir(), None, |c| c).unwrap();
    let c = Containerd::start(version).unwrap();
    c.import_test_images_into(CRI_NAMESPACE).unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", c.log()));
    c
}

/// Copies the VM consoles into `out` every second until dropped: the shim removes
/// a pod's console with its state, and a VM that dies takes its pod with it.
struct ConsoleKeeper {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConsoleKeeper {
    fn start(out: PathBuf) -> ConsoleKeeper {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || loop {
            if let Ok(dirs) = std::fs::read_dir(VFVM_STATE_DIR) {
                for d in dirs.filter_map(|e| e.ok()) {
                    let name = format!("console-{}.log", d.file_name().to_string_lossy());
                    let _ = std::fs::copy(d.path().join("console.log"), out.join(name));
                }
            }
            if !matches!(stopped.recv_timeout(Duration::from_secs(1)), Err(std::sync::mpsc::RecvTimeoutError::Timeout)) {
                return;
            }
        });
        ConsoleKeeper { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for ConsoleKeeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs a scenario; on failure removes its pods and fails with the diagnostics.
/// Inside the lab, containerd's log (the shim's included) and the VM consoles are
/// kept in the run's `out` directory (`$VFVM_LAB_OUT`) either way.
fn scenario(name: &str, c: &Containerd, body: impl FnOnce(&Cri) -> Result<()>) {
    let cri = Cri::new(c).unwrap();
    let keeper = std::env::var_os("VFVM_LAB_OUT").map(|out| {
        let dir = Path::new(&out).join(name);
        let _ = std::fs::create_dir_all(&dir);
        ConsoleKeeper::start(dir)
    });
    let result = body(&cri);
    if let Some(out) = std::env::var_os("VFVM_LAB_OUT") {
        let path = Path::new(&out).join(name).join("containerd.log");
        if let Err(e) = std::fs::write(&path, c.log()) {
            eprintln!("keeping containerd's log at {}: {e}", path.display());
        }
    }
    if let Err(e) = result {
        let diagnostics = cri.diagnostics();
        cri.remove_all_pods();
        panic!("containerd {}: {e:#}\n{diagnostics}", c.version().name());
    }
    drop(keeper);
}

/// Two pods at once, RuntimeClass handlers `kata` and `rune`, each in its own VM;
/// the containers of pod A share its VM; exec (output, exit code), logs, stopp,
/// rmp, nothing left.
fn pods_in_vms(version: Version) {
    let c = containerd(version);
    scenario(&format!("pods-in-vms-{}", version.name()), &c, |cri| {
        let (file_a, file_b) = (cri.pod_config("pod-a")?, cri.pod_config("pod-b")?);
        let started = Instant::now();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| cri.runp("kata", &file_a));
            let b = s.spawn(|| cri.runp("rune", &file_b));
            (a.join().expect("runp thread"), b.join().expect("runp thread"))
        });
        let (a, b) = (a?, b?);
        eprintln!("containerd {}: pods {a} (kata) and {b} (rune) ready after {:.1}s", version.name(), started.elapsed().as_secs_f64());
        for (pod, handler) in [(&a, "kata"), (&b, "rune")] {
            let status = cri.inspect("inspectp", pod)?;
            ensure!(status["status"]["state"] == "SANDBOX_READY", "pod {pod}: {}", status["status"]);
            ensure!(status["status"]["runtimeHandler"] == handler, "pod {pod} should run under handler {handler}: {}", status["status"]);
        }
        let mut vms = vmm_pods();
        vms.sort();
        let mut want = vec![a.clone(), b.clone()];
        want.sort();
        ensure!(vms == want, "one VM per pod expected; vfvm-vmm processes serve {vms:?}, pods are {want:?}");

        // Two containers in pod A, one in pod B.
        let deadline = Instant::now() + CALL_LIMIT;
        let c1 = cri.create_and_start(&a, &cri.container_config("c1", "echo started-1; cat /proc/cmdline; exec sleep 3600")?, &file_a)?;
        let c2 = cri.create_and_start(&a, &cri.container_config("c2", "echo started-2; exec sleep 3600")?, &file_a)?;
        let c3 = cri.create_and_start(&b, &cri.container_config("c3", "echo started-3; exec sleep 3600")?, &file_b)?;
        for id in [&c1, &c2, &c3] {
            cri.wait_running(id, deadline)?;
        }
        ensure!(cri.ids(&["ps", "-q", "--pod", &a])? == BTreeSet::from([c1.clone(), c2.clone()]), "pod A's containers");

        // The pod's containers share its VM: the same kernel command line, and
        // still one VM per pod.
        for (id, pod) in [(&c1, &a), (&c2, &a), (&c3, &b)] {
            let (code, stdout, stderr) = cri.exec(id, &["cat", "/proc/cmdline"])?;
            let marker = format!("vfvm.sandbox={pod}");
            ensure!(
                code == 0 && stdout.split_whitespace().any(|w| w == marker),
                "container {id} should run in pod {pod}'s VM; exec: {code}, stdout {stdout:?}, stderr {stderr:?}"
            );
        }
        let vms = vmm_pods();
        ensure!(vms.len() == 2, "containers must not start VMs of their own: vfvm-vmm processes serve {vms:?}");

        // exec: output on both streams, kept apart. crictl's `exec -s` prints a
        // command's stdout, then its stderr, each followed by a newline, all on its
        // stdout: "out" first although the command wrote "err" first.
        let (code, stdout, stderr) = cri.exec(&c1, &["sh", "-c", "echo err >&2; echo out"])?;
        ensure!(
            (code, stdout.as_str()) == (0, "out\n\nerr\n\n"),
            "exec: exit {code}, stdout {stdout:?} (want \"out\\n\\nerr\\n\\n\"), stderr {stderr:?}"
        );
        // exec: the exit code. A command that exits non-zero fails crictl's
        // `exec -s` (exit status 1, nothing on stdout) with the cri-client's error
        // `command '<cmd>' exited with <code>: <stderr>`.
        let cmd = ["sh", "-c", "echo out; echo err >&2; exit 3"];
        let (code, stdout, stderr) = cri.exec(&c1, &cmd)?;
        let error = crictl_error(&stderr);
        let want = format!("command '{}' exited with 3: err\n", cmd.join(" "));
        ensure!(
            code == 1 && stdout.is_empty() && error.ends_with(&want),
            "exec of a command that exits 3: exit status 1, no stdout and an error ending {want:?} expected; \
             exit {code}, stdout {stdout:?}, error {error:?} (stderr {stderr:?})"
        );

        // logs: what the container printed, through containerd's CRI log file.
        let log = cri.wait_logs(&c1, "started-1", deadline)?;
        ensure!(log.contains(&format!("vfvm.sandbox={a}")), "c1's log should hold its /proc/cmdline: {log:?}");
        cri.wait_logs(&c2, "started-2", deadline)?;
        cri.wait_logs(&c3, "started-3", deadline)?;

        let started = Instant::now();
        for pod in [&a, &b] {
            cri.remove_pod(pod)?;
        }
        eprintln!("containerd {}: both pods stopped and removed in {:.1}s", version.name(), started.elapsed().as_secs_f64());
        ensure!(cri.ids(&["pods", "-q"])?.is_empty() && cri.ids(&["ps", "-a", "-q"])?.is_empty(), "pods or containers left in CRI");
        wait_nothing_left("after stopp and rmp")
    });
    c.stop().unwrap();
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_pods_in_vms_containerd_1_6() {
    pods_in_vms(Version::V1_6);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_pods_in_vms_containerd_2_1() {
    pods_in_vms(Version::V2_1);
}

/// Pods with bad annotations, through CRI: runp fails with an error that names the
/// annotation, the value (in quotes, as the runtime writes it: read through
/// [`crictl_error`], whose unquoting makes crictl's `\"64\"` `"64"` again) and what
/// was expected (containerd passes `io.katacontainers.*` on, per the config
/// snippet), and nothing is left behind: no VM, no state, no pod in CRI.
fn bad_annotations(version: Version) {
    let c = containerd(version);
    scenario(&format!("bad-annotations-{}", version.name()), &c, |cri| {
        let cases: [(&str, &str, &[&str]); 3] = [
            (
                "io.katacontainers.config.hypervisor.default_vcpus",
                "64",
                &["io.katacontainers.config.hypervisor.default_vcpus", "\"64\"", "from 1 to 8"],
            ),
            (
                "io.katacontainers.config.hypervisor.default_memory",
                "lots",
                &["io.katacontainers.config.hypervisor.default_memory", "\"lots\""],
            ),
            ("io.katacontainers.config.runtime.enable_sriov", "maybe", &["io.katacontainers.config.runtime.enable_sriov", "\"maybe\""]),
        ];
        for (i, (key, value, wanted)) in cases.into_iter().enumerate() {
            let file = cri.pod_config_annotated(&format!("bad-{i}"), &[(key, value)])?;
            let out = cri.run(&["runp", "--runtime", "kata", &file])?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(
                out.status.code() == Some(1),
                "{key}={value}: runp should fail with exit status 1; it exited {} and printed {}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                stderr.trim()
            );
            let error = crictl_error(&stderr);
            for w in wanted {
                ensure!(error.contains(w), "{key}={value}: runp's error should contain {w:?}: {error}\nstderr: {}", stderr.trim());
            }
            eprintln!("containerd {}: {key}={value}: {error}", version.name());
            ensure!(cri.ids(&["pods", "-q"])?.is_empty(), "{key}={value}: the failed pod is still listed");
            wait_nothing_left(&format!("after runp with {key}={value}"))?;
        }
        Ok(())
    });
    c.stop().unwrap();
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_bad_annotations_fail_runp_clearly_containerd_1_6() {
    bad_annotations(Version::V1_6);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_bad_annotations_fail_runp_clearly_containerd_2_1() {
    bad_annotations(Version::V2_1);
}

/// Rounds per runtime handler in the benchmark.
const BENCH_ROUNDS: usize = 3;

/// One pod start as Kubernetes sees it: runp, create, start, until the container
/// is RUNNING. Returns the time; removes the pod afterwards.
fn timed_pod_start(cri: &Cri, handler: &str, n: usize) -> Result<Duration> {
    let name = format!("bench-{handler}-{n}");
    let pod_file = cri.pod_config(&name)?;
    let container_file = cri.container_config(&format!("{name}-c"), "exec sleep 3600")?;
    let started = Instant::now();
    let pod = cri.runp(handler, &pod_file)?;
    let id = cri.create_and_start(&pod, &container_file, &pod_file)?;
    cri.wait_running(&id, started + CALL_LIMIT)?;
    let took = started.elapsed();
    cri.remove_pod(&pod)?;
    Ok(took)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_bench_pod_start_vfvm_vs_runc() {
    let c = containerd(Version::V2_1);
    scenario("bench-pod-start", &c, |cri| {
        let (mut vfvm, mut runc) = (Vec::new(), Vec::new());
        // Alternating, so a busy phase of the host weighs on both.
        for n in 0..BENCH_ROUNDS {
            runc.push(timed_pod_start(cri, "runc", n)?);
            vfvm.push(timed_pod_start(cri, "kata", n)?);
        }
        let secs = |v: &[Duration]| v.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>().join(", ");
        let rounds = format!("pod start rounds (s), containerd 2.1: vfvm [{}], runc [{}]", secs(&vfvm), secs(&runc));
        let (v, r) = (median(vfvm), median(runc));
        print_figures(&format!(
            "{rounds}\npod start: vfvm {:.2} s, runc {:.2} s, ratio vfvm/runc {:.1} (medians of {BENCH_ROUNDS}, runp..container running, containerd 2.1 CRI, lab L2 under TCG)",
            v.as_secs_f64(),
            r.as_secs_f64(),
            v.as_secs_f64() / r.as_secs_f64()
        ));
        ensure!(cri.ids(&["pods", "-q"])?.is_empty(), "pods left in CRI");
        wait_nothing_left("after the benchmark")
    });
    c.stop().unwrap();
}

/// Clears the PF's pin of the VF's MAC when dropped (on a failure too): restored by
/// value, the VF's PF-side MAC stays pinned (see [`igb_vfs`]).
struct UnpinVfMac(IgbVf);

impl Drop for UnpinVfMac {
    fn drop(&mut self) {
        let _ = self.0.unpin_mac();
    }
}

/// The VF's driver and, when it has one in the host netns, its netdev.
fn vf_host_state(vf: &str) -> (Option<String>, Option<String>) {
    (igb_vfs::driver_of(vf), igb_vfs::netdev_of(vf))
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

const SEED_VF: u32 = 3;
const SEED_MAC: &str = "02:00:00:00:10:29";
const SEED_ADDR: &str = "198.18.0.41";
const PEER_NETNS: &str = "labpeer";
const PEER_ADDR: &str = "198.18.0.2";
/// Seed pods started one after another in the test (a leak shows in the second);
/// the soak runs more (`VFVM_SRIOV_PODS`).
const SEED_PODS: usize = 2;

/// The seed article's pod through CRI: RuntimeClass `rune`, the Multus and
/// `enable_sriov` annotations, a container whose env carries the VF as the SR-IOV
/// device plugin sets it (`PCIDEVICE_INTEL_COM_SRIOV=<VF>`). The VF reaches the pod
/// netns as in a cluster, by CNI during RunPodSandbox (the test plugin, a second
/// network beside the bridge: `eth1`). In the guest: the VF on igbvf as eth1 with the
/// pod's MAC, MTU, address and route; the container's PCIDEVICE value is the guest
/// address; the container and the lab's peer ping each other over the VF. stopp:
/// the VF is back in the pod netns before CNI DEL, whose check that eth1 is there
/// passes; then it is on igbvf in the host netns. Pods in a row leak nothing (the
/// VF's state, containerd's fds, vfvm processes, mounts, state).
/// How the seed pod's VF reaches its VM: at boot (`cold`) or hot-plugged into the
/// running VM (`hot`), the shim's `sriov.hotplug`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plug {
    Cold,
    Hot,
}

fn seed_pod(version: Version, plug: Plug) {
    let igb_vf = IgbVf::find(SEED_VF).unwrap();
    let vf = igb_vf.pci.clone();
    let _unpin = UnpinVfMac(igb_vf);
    let before = vf_host_state(&vf);
    assert_eq!(before.0.as_deref(), Some("igbvf"), "VF {vf} should start on igbvf");
    let mac_of = |netdev: &Option<String>| {
        std::fs::read_to_string(format!("/sys/class/net/{}/address", netdev.as_deref().unwrap_or("?")))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let before_mac = mac_of(&before.1);
    let net = SriovNetwork {
        plugin: build_dir().join("vfvm-test-sriov-cni"),
        device_id: vf.clone(),
        mac: SEED_MAC.into(),
        mtu: 1400,
        address: format!("{SEED_ADDR}/24"),
        routes: vec![("198.19.41.0/24".into(), "198.18.0.254".into())],
    };
    let c = Containerd::start_with_sriov(version, net).unwrap();
    // The shim reads the test plugin's cache as it would sriov-cni's.
    let cache = c.sriov_cache_dir();
    install_vfvm(&build_dir(), None, |cfg| {
        let cfg = cfg.replace("cni_cache_dir = \"/var/lib/cni/sriov\"", &format!("cni_cache_dir = \"{}\"", cache.display()));
        match plug {
            Plug::Cold => cfg,
            Plug::Hot => cfg.replace("hotplug = \"cold\"", "hotplug = \"hot\""),
        }
    })
    .unwrap();
    // The figures and the scenario say which: "2.1" or "2.1, hot-plug".
    let label = match plug {
        Plug::Cold => version.name().to_string(),
        Plug::Hot => format!("{}, hot-plug", version.name()),
    };
    c.import_test_images_into(CRI_NAMESPACE).unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", c.log()));
    let containerd_pid = i32::try_from(c.pid()).unwrap();
    let rounds = std::env::var("VFVM_SRIOV_PODS").ok().and_then(|n| n.parse().ok()).unwrap_or(SEED_PODS).max(1);
    let scenario_name = match plug {
        Plug::Cold => format!("seed-pod-{}", version.name()),
        Plug::Hot => format!("seed-pod-hot-{}", version.name()),
    };
    scenario(&scenario_name, &c, |cri| {
        let (mut fds, mut with_vf, mut without_vf) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            // The same pod without passthrough first (no enable_sriov): CNI moves the
            // VF into its netns all the same, and the shim leaves it there, on igbvf.
            let plain_file = cri.pod_config_annotated(&format!("plain-{round}"), &[("k8s.v1.cni.cncf.io/networks", "vfvm-sriov")])?;
            let started = Instant::now();
            let plain = cri.runp("rune", &plain_file)?;
            let ctr = cri.create_and_start(&plain, &cri.container_config_env("app", "echo started; exec sleep 3600", &[])?, &plain_file)?;
            cri.wait_running(&ctr, Instant::now() + CALL_LIMIT)?;
            without_vf.push(started.elapsed());
            let (driver, host_netdev) = vf_host_state(&vf);
            ensure!(
                driver.as_deref() == Some("igbvf") && host_netdev.is_none(),
                "without enable_sriov the VF should stay in the pod's netns on igbvf: driver {driver:?}, host netdev {host_netdev:?}"
            );
            cri.ok(&["stopp", &plain])?;
            cri.ok(&["rmp", &plain])?;
            wait_nothing_left(&format!("after the plain pod {round}"))?;

            let name = format!("seed-{round}");
            let file = cri.pod_config_annotated(
                &name,
                &[("k8s.v1.cni.cncf.io/networks", "vfvm-sriov"), ("io.katacontainers.config.runtime.enable_sriov", "true")],
            )?;
            let started = Instant::now();
            let pod = cri.runp("rune", &file)?;
            let ready = started.elapsed();
            let env = [("PCIDEVICE_INTEL_COM_SRIOV", vf.as_str())];
            let ctr = cri.create_and_start(&pod, &cri.container_config_env("app", "echo started; exec sleep 3600", &env)?, &file)?;
            cri.wait_running(&ctr, Instant::now() + CALL_LIMIT)?;
            with_vf.push(started.elapsed());
            // Seen in a passing run too: the soak's progress.
            print_figures(&format!(
                "containerd {}: seed pod {round}: ready {:.1}s, container running {:.1}s",
                label,
                ready.as_secs_f64(),
                started.elapsed().as_secs_f64()
            ));
            ensure!(
                vf_host_state(&vf).0.as_deref() == Some("vfio-pci"),
                "the running pod's VF should be on vfio-pci: {:?}",
                vf_host_state(&vf)
            );

            let (_, out, _) = cri.exec(&ctr, &["sh", "-c", "ip -o link show eth1; ip -o addr show eth1; ip route; env"])?;
            for want in [SEED_MAC, "mtu 1400", &format!("{SEED_ADDR}/24"), "198.19.41.0/24 via 198.18.0.254 dev eth1"] {
                ensure!(out.contains(want), "the container should see {want:?}:\n{out}");
            }
            let guest = out
                .lines()
                .find_map(|l| l.strip_prefix("PCIDEVICE_INTEL_COM_SRIOV="))
                .with_context(|| format!("no PCIDEVICE_INTEL_COM_SRIOV in the container's env:\n{out}"))?
                .to_string();
            ensure!(
                guest != vf && guest.starts_with("0000:00:"),
                "PCIDEVICE_INTEL_COM_SRIOV should hold the guest address, not the host's {vf}: {guest}"
            );
            let (_, driver, _) = cri.exec(&ctr, &["readlink", &format!("/sys/bus/pci/devices/{guest}/driver")])?;
            ensure!(driver.trim().ends_with("/igbvf"), "the guest's {guest} should be on igbvf: {driver}");
            let (code, ping, _) = cri.exec(&ctr, &["ping", "-c", "3", "-W", "10", PEER_ADDR])?;
            ensure!(code == 0 && !ping.contains(" 0 packets received"), "the container should reach the peer over the VF: {ping}");
            // The lab's root has busybox's ping, not iputils'.
            let back =
                Command::new("ip").args(["netns", "exec", PEER_NETNS, "busybox", "ping", "-c", "3", "-W", "10", SEED_ADDR]).output()?;
            let back_text = String::from_utf8_lossy(&back.stdout);
            ensure!(
                back.status.success(),
                "the peer should reach the container over the VF: {back_text}{}",
                String::from_utf8_lossy(&back.stderr)
            );
            if round == 0 {
                eprintln!("containerd {}: in the guest: {guest} on igbvf; pings both ways:\n{ping}{back_text}", label);
            }

            cri.ok(&["stopp", &pod])?;
            let calls = c.sriov_calls();
            ensure!(
                calls.lines().filter(|l| l.starts_with("DEL ") && l.contains("found in")).count() == 2 * (round + 1),
                "CNI DEL should have found eth1 in the pod netns each time:\n{calls}"
            );
            let after = vf_host_state(&vf);
            ensure!(after == before, "after stopp the VF should be as it came ({before:?}), found {after:?}");
            // The test plugin restores the VF's MAC (see its DEL).
            let mac = mac_of(&after.1);
            ensure!(mac == before_mac, "seed pod {round}: the VF's MAC is {mac}, was {before_mac}:\n{}", c.sriov_calls());
            cri.ok(&["rmp", &pod])?;
            wait_nothing_left(&format!("after seed pod {round}"))?;
            fds.push(open_fds(containerd_pid));
        }
        // The shim SIGKILLed with the VF in the VM: containerd's cleanup (`shim
        // delete`) gives the VF back to the pod netns, so stopp's CNI DEL finds it.
        let file = cri.pod_config_annotated(
            "seed-killed",
            &[("k8s.v1.cni.cncf.io/networks", "vfvm-sriov"), ("io.katacontainers.config.runtime.enable_sriov", "true")],
        )?;
        let pod = cri.runp("rune", &file)?;
        let ctr = cri.create_and_start(&pod, &cri.container_config_env("app", "exec sleep 3600", &[])?, &file)?;
        cri.wait_running(&ctr, Instant::now() + CALL_LIMIT)?;
        ensure!(vf_host_state(&vf).0.as_deref() == Some("vfio-pci"), "the running pod's VF should be on vfio-pci");
        let shims = pids_named("containerd-shim-vfvm-v2");
        ensure!(shims.len() == 1, "one shim for the pod: {shims:?}");
        // SAFETY: kill(2) on the shim just found.
        ensure!(unsafe { libc::kill(shims[0], libc::SIGKILL) } == 0, "kill the shim: {}", std::io::Error::last_os_error());
        // The cleanup is done when the VF is on igbvf and the sandbox's state is gone
        // (the state goes last, after the netdev is back in the pod netns).
        let deadline = Instant::now() + GONE_LIMIT;
        while vf_host_state(&vf).0.as_deref() != Some("igbvf") || !vfvm_leftovers().is_empty() {
            ensure!(
                Instant::now() < deadline,
                "containerd's cleanup of the killed shim did not give the VF back: {:?}, left: {:?}",
                vf_host_state(&vf),
                vfvm_leftovers()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
        cri.ok(&["stopp", &pod])?;
        let calls = c.sriov_calls();
        ensure!(
            calls.lines().filter(|l| l.starts_with("DEL ") && l.contains("found in")).count() == 2 * rounds + 1,
            "CNI DEL after the killed shim should have found eth1 in the pod netns:\n{calls}"
        );
        let after = vf_host_state(&vf);
        ensure!(after == before, "after the killed shim and stopp the VF should be as it came ({before:?}), found {after:?}");
        cri.ok(&["rmp", &pod])?;
        wait_nothing_left("after the pod whose shim was killed")?;
        print_figures(&format!("containerd {}: the killed shim's VF came back to the pod netns; CNI DEL found it", label));

        print_figures(&format!("containerd {}: {rounds} seed pods in a row; containerd's open fds after each: {fds:?}", label));
        let (with_vf, without_vf) = (median(with_vf), median(without_vf));
        print_figures(&format!(
            "pod start (runp..container running), containerd {}: with the VF passed through {:.1} s, the same pod without (VF left in its netns) {:.1} s, ratio with/without {:.2} (medians of {rounds})",
            label,
            with_vf.as_secs_f64(),
            without_vf.as_secs_f64(),
            with_vf.as_secs_f64() / without_vf.as_secs_f64()
        ));
        let (first, last) = (fds[0], fds[fds.len() - 1]);
        ensure!(last <= first + 2, "containerd's open fds grew from {first} to {last} over {rounds} pods");
        Ok(())
    });
    c.stop().unwrap();
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_seed_pod_gets_its_vf_in_its_vm_containerd_1_6() {
    seed_pod(Version::V1_6, Plug::Cold);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_seed_pod_gets_its_vf_in_its_vm_containerd_2_1() {
    seed_pod(Version::V2_1, Plug::Cold);
}

/// The seed pod with `sriov.hotplug = "hot"`: the VM boots without the VF, the shim
/// hot-plugs it once the agent answers and unplugs it before the VM stops; the same
/// checks as cold-plug (the VF configured in the guest, pings both ways, the VF back
/// in the pod netns for CNI DEL, a killed shim's VF recovered).
#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_seed_pod_hot_plugs_its_vf_into_its_running_vm_containerd_2_1() {
    seed_pod(Version::V2_1, Plug::Hot);
}
